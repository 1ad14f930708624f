"""LR schedule, batch-size ramp-up, sampler, Adafactor and clipping."""
import math

import pytest
import torch

from engine.data.sampler import BatchSizeRampup, GlobalBatchSampler
from engine.optim import Adafactor, LRSchedule, clip_grad_norm_, param_groups


def sched(style, **kw):
    return LRSchedule(peak_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, style=style, **kw)


def test_warmup_is_linear_for_every_style():
    for style in ["linear", "cosine", "inverse-sqrt", "constant", "wsd"]:
        s = sched(style)
        assert s(1) == pytest.approx(0.1) and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)


@pytest.mark.parametrize("style,step,expected", [
    ("linear", 60, 0.55), ("linear", 110, 0.1), ("linear", 500, 0.1),
    ("cosine", 60, 0.55), ("cosine", 35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))), ("cosine", 110, 0.1),
    ("inverse-sqrt", 40, math.sqrt(10 / 40)), ("inverse-sqrt", 10_000, 0.1),
    ("constant", 60, 1.0), ("constant", 500, 1.0),
    ("wsd", 99, 1.0), ("wsd", 105, 1.0 - 0.9 * 6 / 11), ("wsd", 110, 0.1),
])
def test_decay_values(style, step, expected):
    assert sched(style)(step) == pytest.approx(expected)


def test_zero_warmup_starts_at_peak():
    assert LRSchedule(1.0, 0.1, 0, 100, "cosine")(1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 100)))


def test_rampup_follows_consumed_samples():
    ramp = BatchSizeRampup(final=32, start=8, increment=8, rampup_samples=300)  # 3 increments, every 100 samples
    assert [ramp.global_batch_size(c) for c in [0, 99, 100, 199, 200, 299, 300, 10_000]] == [8, 8, 16, 16, 24, 24, 32, 32]
    assert BatchSizeRampup(final=32).global_batch_size(0) == 32


def test_rampup_in_the_trainer(tmp_path, corpus, monkeypatch):
    from conftest import SMALL, read_metrics
    from engine.training import main
    monkeypatch.chdir(tmp_path)
    argv = SMALL + ["--data", corpus, "--steps", "6", "--global-batch-size", "8", "--rampup-batch-size", "4,2,12",
                    "--run-name", "r"]
    assert main(argv) == 0
    steps = [r for r in read_metrics("runs/r/metrics.jsonl") if "event" not in r]
    assert [r["global_batch_size"] for r in steps] == [4, 4, 6, 8, 8, 8]
    assert [r["consumed_samples"] for r in steps] == [4, 8, 14, 22, 30, 38]


def test_sampler_is_deterministic_and_covers_each_epoch():
    a, b = GlobalBatchSampler(50, seed=7), GlobalBatchSampler(50, seed=7)
    assert a.indices(0, 120) == b.indices(0, 120)
    assert sorted(a.indices(0, 50)) == list(range(50)) and sorted(a.indices(50, 50)) == list(range(50))
    assert a.indices(0, 50) != a.indices(50, 50)  # reshuffled per epoch
    assert a.indices(0, 50) != GlobalBatchSampler(50, seed=8).indices(0, 50)
    assert a.indices(37, 20) == a.indices(0, 57)[37:]  # resuming at a position continues the same order


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
def test_global_batch_is_independent_of_dp(dp):
    s = GlobalBatchSampler(1000, seed=3)
    for position in [0, 32, 992]:
        parts = [s.rank_slice(position, 32, r, dp) for r in range(dp)]
        assert sum(parts, []) == s.indices(position, 32)


def test_weight_decay_groups_exclude_vectors():
    from engine.models.llama import Llama, ModelConfig
    model = Llama(ModelConfig(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_heads=2, num_kv_heads=1))
    decay, no_decay = param_groups(model.named_parameters(), 0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # two layer norms + final norm


ADAFACTOR_SHAPES = [(8, 6), (6,), (3, 4, 5)]  # a matrix, a vector (full second moment), a 3-D tensor


def adafactor_gradients(steps=20, seed=0):
    """A fixed gradient sequence. Every seventh step's gradients are 3x larger than the running statistics
    expect, so update clipping acts on those steps (and the 0.1x steps are far below the clipping threshold)."""
    gen = torch.Generator().manual_seed(seed)
    scale = lambda t: 3.0 if t % 7 == 2 else 0.1 if t % 5 == 3 else 1.0  # noqa: E731
    return [[torch.randn(s, generator=gen) * scale(t) for s in ADAFACTOR_SHAPES] for t in range(steps)]


@pytest.mark.parametrize("beta1,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.9, 0.1)])
def test_adafactor_matches_transformers_step_by_step(beta1, weight_decay):
    """20 steps against transformers' Adafactor (fairseq's port) with the engine's settings: an external
    constant lr (no relative step, no parameter scaling), decay_rate -0.8, clipping at RMS 1, eps 1e-30. The
    two order the arithmetic differently (transformers scales the update by lr before the momentum and decays
    the weight by p * wd * lr before subtracting the update; here momentum averages the unscaled update and the
    weight is multiplied by 1 - lr * wd), which is the same update for a constant lr: they agree to fp32
    rounding after every step (the largest difference seen is ~5e-7 on weights of magnitude ~2)."""
    hf = pytest.importorskip("transformers.optimization")
    torch.manual_seed(0)
    init = [torch.randn(s) for s in ADAFACTOR_SHAPES]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    opt = Adafactor(ours, lr=0.05, beta1=beta1, weight_decay=weight_decay)
    ref = hf.Adafactor(theirs, lr=0.05, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                       beta1=beta1 or None, weight_decay=weight_decay, scale_parameter=False,
                       relative_step=False, warmup_init=False)
    for step, grads in enumerate(adafactor_gradients(), 1):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=lambda m: f"step {step}: {m}")
    moved = max((p - x).abs().max().item() for p, x in zip(ours, init))
    assert moved > 0.3  # the comparison is over real movement, not a few tiny steps
    (w, v, t) = ours
    assert opt.state[w]["exp_avg_sq_row"].shape == (8,) and opt.state[w]["exp_avg_sq_col"].shape == (6,)
    assert opt.state[t]["exp_avg_sq_row"].shape == (3, 4) and opt.state[t]["exp_avg_sq_col"].shape == (3, 5)
    assert opt.state[v]["exp_avg_sq"].shape == (6,)


def test_adafactor_update_clipping_acts_on_the_large_steps():
    """The gradient sequence above does exercise clipping: without it the weights move differently on the
    3x steps, and not on the steady or 0.1x ones (where the update's RMS is already below 1)."""
    init = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in ADAFACTOR_SHAPES]
    clipped = [torch.nn.Parameter(x.clone()) for x in init]
    free = [torch.nn.Parameter(x.clone()) for x in init]
    a, b = Adafactor(clipped, lr=0.05), Adafactor(free, lr=0.05, clip_threshold=float("inf"))
    changed_at, previous = [], 0.0
    for step, grads in enumerate(adafactor_gradients(), 1):
        for p, q, g in zip(clipped, free, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        gap = max((p - q).abs().max().item() for p, q in zip(clipped, free))
        if gap > previous + 1e-6:
            changed_at.append(step)
        previous = gap
    # the 3x steps (3, 10, 17), and possibly the first two, whose statistics hold one or two gradients
    assert {3, 10, 17} <= set(changed_at) <= {1, 2, 3, 10, 17}, changed_at


def test_adafactor_bf16_master_weights_track_fp32():
    """bf16 parameters with fp32 gradients and masters: the master is the fp32 run's weight bit for bit (same
    arithmetic on the same values) and the parameter is its rounding. Without masters each step's result is
    rounded into the bf16 weights, and the run drifts away from fp32 by several bf16 steps."""
    torch.manual_seed(0)
    init = [torch.randn(s).bfloat16() for s in ADAFACTOR_SHAPES]
    fp32 = [torch.nn.Parameter(x.float()) for x in init]
    with_masters = [torch.nn.Parameter(x.clone()) for x in init]
    without = [torch.nn.Parameter(x.clone()) for x in init]
    kw = dict(lr=1e-2, beta1=0.9, weight_decay=0.1)
    opts = [Adafactor(fp32, **kw), Adafactor(with_masters, master_weights=True, **kw), Adafactor(without, **kw)]
    for grads in adafactor_gradients():
        for p, q, r, g in zip(fp32, with_masters, without, grads):
            p.grad, q.main_grad, r.main_grad = g.clone(), g.clone(), g.clone()
        for opt in opts:
            opt.step()
    for p, q, r in zip(fp32, with_masters, without):
        assert q.dtype == r.dtype == torch.bfloat16
        assert torch.equal(opts[1].state[q]["master_param"], p)
        assert torch.equal(q, p.bfloat16())
        assert "master_param" not in opts[2].state[r]
    drift = max((r.float() - p).abs().max().item() for p, r in zip(fp32, without))
    assert drift > 0.02, drift  # ~0.06 here: the rounding of every step accumulates


def test_adafactor_masters_keep_updates_below_bf16_resolution():
    """Weights at 1.0 (bf16 spacing 2^-7 there) and a constant gradient: each step moves them by lr = 1e-3,
    under half a bf16 step. Without masters every step rounds back to 1.0; with masters 100 steps reach 0.9."""
    def run(master_weights):
        p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
        v = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        opt = Adafactor([p, v], lr=1e-3, master_weights=master_weights)
        for _ in range(100):
            p.grad, v.grad = torch.ones_like(p), torch.ones_like(v)
            opt.step()
        return opt, p, v
    _, p, v = run(master_weights=False)
    assert torch.equal(p, torch.ones_like(p)) and torch.equal(v, torch.ones_like(v))  # all 100 updates lost
    opt, p, v = run(master_weights=True)
    for q in (p, v):
        master = opt.state[q]["master_param"]
        torch.testing.assert_close(master, torch.full_like(master, 0.9), rtol=0, atol=1e-5)
        assert torch.equal(q, master.bfloat16()) and bool((q == 0.8984375).all())  # bf16(0.9)


def test_adafactor_state_dict_keeps_fp32_state():
    """torch's load_state_dict would cast the state to the bf16 parameter's dtype; ours keeps it fp32, and a
    restored optimizer continues exactly like the original."""
    grads = adafactor_gradients(steps=6)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(2)).bfloat16() for s in ADAFACTOR_SHAPES]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt = Adafactor(a, lr=1e-2, beta1=0.9, master_weights=True)

    def step(opt, params, gs):
        for p, g in zip(params, gs):
            p.main_grad = g.clone()
        opt.step()
    for gs in grads[:3]:
        step(opt, a, gs)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    restored = Adafactor(b, lr=1e-2, beta1=0.9, master_weights=True)
    restored.load_state_dict(opt.state_dict())
    assert all(t.dtype == torch.float32 for s in restored.state.values() for t in s.values())
    for gs in grads[3:]:
        step(opt, a, gs)
        step(restored, b, gs)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_adafactor_state_of_single_row_and_column_matrices_survives_a_resume():
    """Name-keyed optimizer state (what checkpoints hold) round-trips through ZeroOptimizer even where a factored
    statistic has as many elements as its matrix: the row statistics of an (n, 1) matrix, the column ones of a
    (1, n) matrix. The resumed optimizer continues exactly like the original."""
    from engine.optim.zero import ZeroOptimizer
    shapes = [(5, 1), (1, 5), (3, 4)]

    def build():
        module = torch.nn.ParameterDict({f"p{i}": torch.nn.Parameter(torch.ones(s)) for i, s in enumerate(shapes)})
        return list(module.items()), ZeroOptimizer(module, Adafactor, stage=0, lr=1e-2)

    def step(params, zero, seed):
        zero.zero_grad()
        g = torch.Generator().manual_seed(seed)
        sum((p * torch.randn(p.shape, generator=g)).sum() for _, p in params).backward()
        zero.step()

    params, zero = build()
    for seed in range(3):
        step(params, zero, seed)
    saved = zero.state_by_name()
    resumed_params, resumed = build()
    with torch.no_grad():
        for (_, p), (_, q) in zip(params, resumed_params):
            q.copy_(p)
    resumed.load_state_by_name(saved)
    for seed in range(3, 6):
        step(params, zero, seed)
        step(resumed_params, resumed, seed)
    for (name, p), (_, q) in zip(params, resumed_params):
        assert torch.equal(p, q), name


def test_adafactor_first_step_matches_the_paper():
    # Step 1: beta2 = 1 - 1^-0.8 = 0, so R and C are the plain row/column means of g^2 and the update is
    # g / sqrt(R C / mean(R)), clipped to RMS 1.
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    p = torch.nn.Parameter(torch.zeros(2, 2))
    p.grad = g.clone()
    Adafactor([p], lr=1.0, eps=0.0).step()
    sq = g * g
    v = torch.outer(sq.mean(1), sq.mean(0)) / sq.mean(1).mean()
    u = g / v.sqrt()
    u = u / max(1.0, (u.norm() / 2).item())
    torch.testing.assert_close(p.detach(), -u)


def test_clip_matches_torch():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (7,), (2, 2, 2)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, ref):
        p.grad = torch.randn_like(p) * 3
        r.grad = p.grad.clone()
    norm = clip_grad_norm_(params, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.testing.assert_close(norm, ref_norm)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad)


def test_clip_reads_main_grad():
    """Where a parameter keeps its gradient in main_grad (fp32 beside a bf16 parameter, as ZeRO leaves it), the
    norm and the clipping use it, as FusedAdamW does."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in [(3, 4), (7,)]]
    ref = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 4), (7,)]]
    for p, r in zip(params, ref):
        p.main_grad = torch.randn(p.shape) * 3
        r.grad = p.main_grad.clone()
    norm = clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref, 1.0))
    for p, r in zip(params, ref):
        assert p.grad is None
        torch.testing.assert_close(p.main_grad, r.grad)


def test_clip_leaves_small_and_nonfinite_gradients_alone():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 0.1)
    assert clip_grad_norm_([p], 1.0).item() == pytest.approx(0.2)
    assert torch.equal(p.grad, torch.full((4,), 0.1))
    p.grad[0] = float("nan")
    assert torch.isnan(clip_grad_norm_([p], 1.0))
