"""ZeroOptimizer as a user embeds it: a torch.optim.Optimizer over the user's own module, in a plain loop.

On a small module with a ModuleList, a parameter that takes no part in the forward and a frozen one, stages 0-3 at
dp 2 and 4 follow DDP + the same optimizer (torch.optim.AdamW and FusedAdamW) over 10 steps with gradient
accumulation (no_sync), clipping and a torch LR scheduler; a checkpoint saved at dp 2 / ZeRO-3 continues at
dp 4 / ZeRO-1 on the same trajectory. The traps of issue 10 each have a check: the unused parameter (its bucket
was never reduced at ZeRO-2/3: the other gradients were lost), frozen parameters (construction raised) and
module.state_dict() under ZeRO-3 (SIGSEGV on released storage). All cases of one world size run in one pool.
"""
import contextlib
import functools
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distributed
from engine.optim import FusedAdamW
from engine.optim.zero import ZeroOptimizer

D_IN, D, D_OUT, GLOBAL_BATCH, ACCUM, STEPS, MAX_NORM, TOL = 8, 16, 4, 8, 2, 10, 0.3, 1e-6
OPTIMIZERS = {"torch-adamw": torch.optim.AdamW, "fused-adamw": FusedAdamW}
HYPER = dict(lr=1e-2, weight_decay=0.1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.spare = nn.Linear(D, D)  # takes no part in the forward: no gradient, ever

    def forward(self, h):
        return h + self.down(torch.tanh(self.up(h)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D_IN, D)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.frozen = nn.Linear(D, D)
        self.frozen.requires_grad_(False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, D_OUT)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(self.frozen(h)))


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def batch(step, micro, rank, dp):
    """This rank's part of micro-batch `micro` of the global batch of `step` (the same global batch at any dp)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    x, y = torch.randn(GLOBAL_BATCH, D_IN, generator=g), torch.randn(GLOBAL_BATCH, D_OUT, generator=g)
    per = GLOBAL_BATCH // dp
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.3 * s))


def train(model, opt, sched, clip, no_sync, rank, dp, steps, weights, start=0):
    """The user's loop; returns [(weights after the step, the norm before clipping)] per step."""
    out = []
    for step in range(start, steps):
        for micro in range(ACCUM):
            x, y = batch(step, micro, rank, dp)
            with no_sync() if micro < ACCUM - 1 else contextlib.nullcontext():
                (nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        norm = float(clip(MAX_NORM))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)
        out.append((weights(), norm))
    return out


def ddp_run(optimizer_class, rank, dp, group=None, saved=None, start=0):
    """DDP + optimizer_class from step `start`; `saved` (ZeroOptimizer's checkpoint) gives the weights, the
    optimizer state (keyed by name) and the scheduler to start from."""
    model = toy()
    if saved is not None:
        model.load_state_dict(saved["model"])
    ddp = DistributedDataParallel(model, process_group=group, find_unused_parameters=True)
    for p in model.parameters():  # ZeroOptimizer's rule: a parameter without a gradient has a zero one (so
        p.grad = torch.zeros_like(p) if p.requires_grad else None  # AdamW still decays it; DDP would skip it)
    opt = optimizer_class(ddp.parameters(), **HYPER)
    sched = schedule(opt)
    if saved is not None:
        for name, p in model.named_parameters():
            if p.requires_grad:
                opt.state[p] = {k: v.clone() for k, v in saved["optimizer"]["state"][name].items()}
        opt.param_groups[0].update(saved["optimizer"]["param_groups"][0])
        sched.load_state_dict(saved["scheduler"])
    return train(ddp, opt, sched, lambda m: torch.nn.utils.clip_grad_norm_(ddp.parameters(), m), ddp.no_sync,
                 rank, dp, STEPS, lambda: {k: v.clone() for k, v in model.state_dict().items()}, start)


def zero_run(optimizer_class, stage, rank, dp, group=None, **options):
    model = toy()
    zero = ZeroOptimizer(model, optimizer_class, stage=stage, group=group, **HYPER, **options)
    return train(model, zero, schedule(zero), zero.clip_grad_norm_, zero.no_sync, rank, dp, STEPS,
                 zero.full_state_dict)


def max_diff(run, reference) -> float:
    worst = 0.0
    for (weights, norm), (ref_weights, ref_norm) in zip(run, reference, strict=True):
        assert weights.keys() == ref_weights.keys()
        worst = max([worst, abs(norm - ref_norm)] + [(weights[k] - ref_weights[k]).abs().max().item() for k in weights])
    return worst


def _matches_ddp(rank, world, report):
    diffs = {}
    for opt_name, cls in OPTIMIZERS.items():
        reference = ddp_run(cls, rank, world)
        assert any(norm > MAX_NORM for _, norm in reference)  # clipping really happens
        initial = toy().state_dict()
        assert all(torch.equal(w["frozen.weight"], initial["frozen.weight"]) for w, _ in reference)
        for stage in range(4):
            diffs[f"dp{world} stage {stage} {opt_name}"] = max_diff(zero_run(cls, stage, rank, world), reference)
        for stage in (1, 2):  # the step's all-gathers left in flight; each default unit's forward waits for its own
            diffs[f"dp{world} stage {stage} overlap_param_gather {opt_name}"] = max_diff(
                zero_run(cls, stage, rank, world, overlap_param_gather=True), reference)
    if rank == 0:
        with open(report, "a") as f:
            f.write(json.dumps(diffs) + "\n")
    assert all(d <= TOL for d in diffs.values()), diffs


def _traps(rank, world):
    # frozen parameters: left alone (construction used to raise), in no bucket, never changed, still usable
    for stage in range(4):
        model = toy()
        frozen = model.frozen.weight.detach().clone()
        zero = ZeroOptimizer(model, stage=stage)
        assert all(p is not model.frozen.weight for b in zero.buckets for p in b.params)
        for step in range(2):
            x, y = batch(step, 0, rank, world)
            nn.functional.mse_loss(model(x), y).backward()
            zero.step()
            zero.zero_grad()
        assert not model.frozen.weight.requires_grad and torch.equal(model.frozen.weight, frozen)

    # an unused parameter at ZeRO-2: the other gradients of its bucket are reduced (they used to be lost)
    model, reference = toy(), toy()
    zero = ZeroOptimizer(model, stage=2)
    ddp = DistributedDataParallel(reference, find_unused_parameters=True)
    x, y = batch(0, 0, rank, world)
    nn.functional.mse_loss(model(x), y).backward()
    nn.functional.mse_loss(ddp(x), y).backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for pc in zero.pieces:
        expected = grads.get(pc.name, torch.zeros_like(pc.param)).reshape(-1)[pc.lo:pc.hi]
        torch.testing.assert_close(pc.shard.grad.reshape(-1), expected, rtol=0, atol=1e-7)
    assert zero.pieces and any(pc.shard.grad.abs().sum() > 0 for pc in zero.pieces)

    # ZeRO-3: module.state_dict() gives full tensors (it used to crash on released storage), and loads
    model = toy()
    zero = ZeroOptimizer(model, stage=3)
    full = toy().state_dict()
    state = model.state_dict()
    assert state.keys() == full.keys()
    assert all(torch.equal(state[k], full[k]) for k in full)
    assert all(torch.equal(v, full[k]) for k, v in zero.full_state_dict().items())
    assert all(p.untyped_storage().nbytes() == 0 for b in zero.buckets for p in b.params)  # released again
    model.load_state_dict({k: v + 1 for k, v in full.items()})
    assert all(torch.equal(v, full[k] + 1) for k, v in model.state_dict().items())


def _checkpoint_across_layouts(rank, world, path):
    """Saved at dp 2 / ZeRO-3 (ranks 0-1) after 5 steps, continued at dp 4 / ZeRO-1: each follows DDP at its dp
    (from the same checkpoint), and the two continuations agree up to the rounding of the different split."""
    pair = dist.new_group([0, 1])
    if rank < 2:
        model = toy()
        zero = ZeroOptimizer(model, FusedAdamW, stage=3, group=pair, **HYPER)
        sched = schedule(zero)
        run = lambda start, steps: train(model, zero, sched, zero.clip_grad_norm_, zero.no_sync, rank, 2,  # noqa
                                         steps, zero.full_state_dict, start)
        first = run(0, 5)
        saved = {"model": zero.full_state_dict(), "optimizer": zero.state_dict(), "scheduler": sched.state_dict()}
        if rank == 0:
            torch.save(saved, path)
        continued = first + run(5, STEPS)
        diff = max_diff(continued, ddp_run(FusedAdamW, rank, 2, group=pair))
        assert diff <= TOL, diff
    dist.barrier()
    saved = torch.load(path, weights_only=True)
    model = toy()
    model.load_state_dict(saved["model"])
    zero = ZeroOptimizer(model, FusedAdamW, stage=1, **HYPER)
    sched = schedule(zero)  # torch's order: the scheduler, then the optimizer's state (its lr), then the scheduler's
    zero.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    resumed = train(model, zero, sched, zero.clip_grad_norm_, zero.no_sync, rank, world, STEPS, zero.full_state_dict,
                    start=5)
    diff = max_diff(resumed, ddp_run(FusedAdamW, rank, world, saved=saved, start=5))
    assert diff <= TOL, diff
    if rank < 2:  # dp 2 and dp 4 sum the same global batch in another order: rounding, amplified a little by Adam
        diff = max_diff(resumed, continued[5:])
        assert diff <= 1e-5, diff
    resaved = zero.state_dict()["state"]  # whole tensors again at the new layout
    assert resaved.keys() == saved["optimizer"]["state"].keys()


def _bf16_keeps_fp32_masters(rank, world):
    """bf16 parameters at every stage: fp32 master weights in the optimizer, the parameters their rounding."""
    for stage in range(4):
        model = toy().to(torch.bfloat16)
        zero = ZeroOptimizer(model, FusedAdamW, stage=stage, master_weights=True, **HYPER)
        for step in range(2):
            x, y = batch(step, 0, rank, world)
            nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
            zero.step()
            zero.zero_grad()
        masters = zero.state_dict()["state"]
        weights = zero.full_state_dict()
        for name, state in masters.items():
            assert state["master_param"].dtype == torch.float32
            assert torch.equal(state["master_param"].bfloat16(), weights[name]), (stage, name)


def _dp2(rank, world, report):
    _traps(rank, world)
    _bf16_keeps_fp32_masters(rank, world)
    _matches_ddp(rank, world, report)


def _dp4(rank, world, report, path):
    _matches_ddp(rank, world, report)
    _checkpoint_across_layouts(rank, world, path)


def _print_report(report):
    with open(report) as f:
        print(f.read())


def test_zero_optimizer_in_a_user_loop_dp2(tmp_path):
    report = str(tmp_path / "diffs.jsonl")
    distributed.run(functools.partial(_dp2, report=report), world=2)
    _print_report(report)


def test_zero_optimizer_in_a_user_loop_dp4_and_checkpoint_across_layouts(tmp_path):
    report = str(tmp_path / "diffs.jsonl")
    distributed.run(functools.partial(_dp4, report=report, path=str(tmp_path / "ckpt.pt")), world=4)
    _print_report(report)
    assert os.path.exists(tmp_path / "ckpt.pt")
