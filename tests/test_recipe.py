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


def test_adafactor_factors_matrices_and_learns():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6))
    b = torch.nn.Parameter(torch.randn(6))
    target = torch.randn(16, 6)
    x = torch.randn(16, 8)
    opt = Adafactor([w, b], lr=0.05, beta1=0.9)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((x @ w + b - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert opt.state[w]["exp_avg_sq_row"].shape == (8,) and opt.state[w]["exp_avg_sq_col"].shape == (6,)
    assert opt.state[b]["exp_avg_sq"].shape == (6,)


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


def test_clip_leaves_small_and_nonfinite_gradients_alone():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 0.1)
    assert clip_grad_norm_([p], 1.0).item() == pytest.approx(0.2)
    assert torch.equal(p.grad, torch.full((4,), 0.1))
    p.grad[0] = float("nan")
    assert torch.isnan(clip_grad_norm_([p], 1.0))
