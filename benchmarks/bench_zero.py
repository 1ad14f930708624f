"""Data parallelism and ZeRO: ``engine`` (``Trainer`` + ``ZeroOptimizer``) vs PyTorch's
``ZeroRedundancyOptimizer`` + DDP and FSDP2 (``fully_shard``), and the overlap of our bucketed reduction.

All contenders run in the same processes (launch with torchrun; gloo on CPU), on the same model shape, the
same initial weights (``Llama.init_weights`` is layout-invariant), the same micro-batches (taken from our
trainer's sampler: ``Trainer._micro_batches(position, global_batch)``, moved to the device), the same precision
and clipping:

* ours: a ``Trainer`` built from ``parse_config([... "--dp", W, "--zero", Z ...])`` + ``validate(cfg, W)``;
  a step is ``trainer.train_step()`` (micro-batches -> forward/backward with gradients in flat fp32 buckets whose
  reduction starts asynchronously as soon as a bucket is complete in the last micro-batch's backward -> global
  norm -> clip folded into the fused AdamW pass over the owned shards -> all-gather of the updated shards).
* ``--compare zero1``: ``torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=torch.optim.AdamW)``
  (fused=True: the fastest torch AdamW on CPU) + ``DistributedDataParallel`` (``gradient_as_bucket_view=True``,
  ``broadcast_buffers=False``, ``bucket_cap_mb`` = our bucket size in bytes) on a plain ``Llama(cfg)``; gradient
  accumulation with ``no_sync()`` on all but the last micro-batch; ``clip_grad_norm_(1.0, foreach=True)``.
* ``--compare zero3``: our ``--zero 3`` against FSDP2 (``fully_shard`` on every transformer layer, then the
  root, default ``reshard_after_forward=True``) when the engine accepts ``--zero 3`` (when ``validate`` raises
  ``ConfigError`` for it, a NOTE says so and only the ZeRO-2 pair runs); always also our
  ``--zero 2`` against FSDP2 with ``reshard_after_forward=False`` and ``set_reshard_after_backward(False)`` on
  all but the last micro-batch (parameters gathered once per step and kept: the ZeRO-2-like setting). FSDP2
  reduce-scatters every micro-batch's gradients (its default; ours at stage >= 2 does the same).
  Optimizer ``torch.optim.AdamW(fused=True)`` on the DTensor shards, clipping with ``clip_grad_norm_``.
* ``--compare api``: the library as a user embeds it - ``ZeroOptimizer(model, FusedAdamW, stage=S)`` on the
  baselines' own plain ``Llama`` and loop (mean reduction, ``no_sync()`` on all but the last micro-batch, its
  ``clip_grad_norm_``) - stage 1 against ZeroRedundancyOptimizer + DDP, stage 2 against FSDP2 with
  ``reshard_after_forward=False``, stage 3 against FSDP2 (default resharding).
* ``--compare overlap``: our ``--zero 1`` at dp = W (the world size) with the engine's default ``--bucket-size``
  (4M elements: few buckets for these models, little overlap) and with each ``--small-bucket-size`` (more
  buckets, each reduction starting earlier in the last micro-batch's backward), against dp = 1
  run on every rank at the same time (independent replicas, no communication: both cases load the cores the
  same way), with the same per-rank work (global batch mbs * micro-batches * dp). Tokens/s per rank and the
  ratio dp = W / dp = 1 (1.0 = perfect scaling, the reduction fully hidden).

Precision: fp32 everywhere, or ``--precision bf16``: ours bf16 parameters and compute with fp32 gradients and
fp32 master weights in the optimizer; DDP under ``torch.autocast("cpu", bfloat16)`` (fp32 parameters); FSDP2 with
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``. The step-1 tolerance is then 2e-2.

PyTorch reduces gradients as a mean over ranks, ours as a sum of losses normalised by the global token count;
the baselines therefore normalise each rank's summed token loss by the rank's own token count, so both take the
gradient of the global-batch mean loss. Step-1 losses (and gradient norms) must agree within 1e-5 (fp32) before
anything is timed; the models then train in lock-step and the largest loss difference is reported.

Timing (benchmarks/ab.py): after warm-up, the contenders alternate in rotating order, each step preceded by a
barrier; a step's time is the slower rank's. Read the median of the per-pair ratios ours / theirs (< 1.0: ours is
faster).

Bytes per rank: ours are ``trainer.memory_event()`` (param_bytes, grad_bytes, optimizer_bytes; rank 0) and the
same sums on every rank (max over ranks shown); theirs are ``numel() * element_size()`` over what a rank holds
after a step: parameters (the local shards ``DTensor._local_tensor`` under FSDP2), gradients (the local shards;
DDP's ``gradient_as_bucket_view`` gradients are its buckets) and ``optimizer.state`` (the local optimizer of
ZeroRedundancyOptimizer). 0-dim ``step`` counters are left out on both sides (as memory_event does). For FSDP2
and our ZeRO-3 the peak of gathered (unsharded) parameters held during forward, on top of the shards, is also
shown (measured in forward pre/post hooks of every layer and of the root, during one untimed step).

Where the time goes: every side's step is split into phases (rank 0, median over the timed steps): ours wraps
``Trainer.forward_backward``, ``ZeroOptimizer.finish_gradients`` (waiting for the reductions still in flight),
``Trainer.grad_norm`` and ``ZeroOptimizer.step`` (optimizer + parameter all-gather); the baselines time their
forward/backward loop (DDP's reduction and FSDP2's gathers/reduce-scatters happen inside it), clipping and the
optimizer step (ZeroRedundancyOptimizer's includes its parameter broadcast). ``--overlap-param-gather`` adds
(overlap mode) or substitutes (zero1 mode) ours with the engine's ``--overlap-param-gather`` (ZeRO-1/2's
parameter all-gather overlapped with the next step's forward).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 benchmarks/bench_zero.py --compare zero1 [--repeats 3]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 benchmarks/bench_zero.py --compare zero3 [--repeats 3]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/bench_zero.py --compare overlap [--repeats 3]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 benchmarks/bench_zero.py --compare api [--repeats 3]
    [--model-size small|medium] [--precision fp32|bf16] [--steps N] [--bucket-size N] [--json out.json]
    [--profile DIR] [--overlap-param-gather]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.models.llama import Llama  # noqa: E402
from engine.optim import FusedAdamW, ZeroOptimizer, param_groups  # noqa: E402
from engine.parallel import Topology  # noqa: E402
from engine.training.config import ConfigError, parse_config, validate  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402
from ab import ABResult, add_timing_args, finish, profile, profile_table, repeat_table, run_ab  # noqa: E402

SEED = 1234
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # bf16: ours rounds the weights, autocast rounds per op
LR = 1e-3
BETAS, EPS, WEIGHT_DECAY, CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0

SIZES = {
    # hidden 512, seq 128: 12.07M parameters (48 MB of fp32 gradients to reduce per step) against 2 x 2 x 128
    # tokens of compute per rank, so the communication is a visible share of the step on 2 cores
    "medium": dict(num_layers=4, hidden_size=512, ffn_hidden_size=1408, num_heads=8, num_kv_heads=4,
                   vocab_size=259, seq_length=128, micro_batch_size=2),
    # the engine's `tiny` shape (3.08M parameters)
    "small": dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_heads=8, num_kv_heads=4,
                  vocab_size=259, seq_length=256, micro_batch_size=2),
}


def model_flags(size: dict) -> list[str]:
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads", "vocab_size", "seq_length")
    return [x for k in keys for x in ("--" + k.replace("_", "-"), str(size[k]))]


def build_ours(args, size: dict, dp: int, zero: int, bucket_size: int, world: int, topology=None,
               overlap_param_gather: bool = False) -> Trainer:
    """A Trainer for dp ranks at ZeRO stage `zero` (raises ConfigError when the engine rejects the stage)."""
    gb = size["micro_batch_size"] * args.micro_batches * dp
    argv = model_flags(size) + [
        "--micro-batch-size", str(size["micro_batch_size"]), "--global-batch-size", str(gb),
        "--dp", str(dp), "--zero", str(zero), "--precision", args.precision, "--bucket-size", str(bucket_size),
        "--lr", str(LR), "--lr-warmup-steps", "0", "--lr-decay-style", "constant", "--steps", "100000",
        "--clip-grad", str(CLIP), "--weight-decay", str(WEIGHT_DECAY), "--beta1", str(BETAS[0]),
        "--beta2", str(BETAS[1]), "--eps", str(EPS), "--seed", str(SEED), "--run-name", "bench_zero",
        "--device", "cpu"] + (["--overlap-param-gather"] if overlap_param_gather else [])
    cfg = parse_config(argv)
    validate(cfg, world)
    return Trainer(cfg, topology)


def single_rank_topology() -> Topology:
    """A dp = 1 topology for one rank of a larger world (no process groups: no communication at all)."""
    return Topology(alone=True)


def nbytes(tensors) -> int:
    """numel * element_size over distinct tensors (local shards of DTensors; 0-dim tensors left out)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.ndim == 0 or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def state_tensors(optimizer) -> list:
    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


class Phases:
    """Per-step wall time of the phases of a step (rank-local), for the breakdown tables."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict = {}

    def wrap(self, fn, name: str):
        def wrapped(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            self.add(name, time.perf_counter() - start)
            return out
        return wrapped

    def reset(self) -> None:
        self.steps, self.current = [], {}

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def end_step(self, total: float) -> None:
        self.current["other"] = total - sum(self.current.values())
        self.steps.append(self.current)
        self.current = {}

    def medians(self) -> dict:
        names = list(self.steps[0]) if self.steps else []
        return {n: statistics.median(s.get(n, 0.0) for s in self.steps) for n in names}


# ---------------------------------------------------------------------------------------------------------

class Ours:
    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer = name, trainer
        self.global_batch = trainer.cfg.batch.global_batch_size
        self.probe, self.peak_unsharded = False, 0
        self.phases = Phases()
        trainer.forward_backward = self.phases.wrap(trainer.forward_backward, "forward+backward")
        trainer.zero.finish_gradients = self.phases.wrap(trainer.zero.finish_gradients, "wait for reductions")
        trainer.grad_norm = self.phases.wrap(trainer.grad_norm, "grad norm (+all-reduce)")
        trainer.zero.step = self.phases.wrap(trainer.zero.step, "optimizer (+all-gather)")
        if trainer.zero.sharded_params:  # ZeRO-3: measure the gathered units at every layer's forward hooks
            for chunk in trainer.chunks:
                for module in [chunk, *chunk.layers.values()]:
                    module.register_forward_pre_hook(lambda *_: self._measure())
                    module.register_forward_hook(lambda *_: self._measure())

    def _measure(self) -> None:
        if self.probe:
            held = sum(b.full.untyped_storage().nbytes() for b in self.trainer.zero.buckets if b.gathered)
            self.peak_unsharded = max(self.peak_unsharded, held)

    def buckets(self) -> int:
        return len(self.trainer.zero.buckets)

    def step(self) -> tuple[float, float]:
        rec = self.trainer.train_step()
        self.last = rec
        return rec["loss"], rec["grad_norm"]

    def memory(self) -> dict:
        t = self.trainer
        local = {"param_bytes": t.zero.param_bytes(), "grad_bytes": t.zero.grad_bytes(),
                 "optimizer_bytes": t.zero.optimizer_bytes()}  # what memory_event reports, on this rank
        event = t.memory_event() if t.world_size > 1 else dict(local)
        mem = {"event": {k: event[k] for k in local}, "local": local}
        if t.zero.sharded_params:
            mem["peak_unsharded_param_bytes"] = self.peak_unsharded
        return mem


class Theirs:
    """Shared parts of the PyTorch baselines: the plain model, the micro-batches of our trainer's sampler, the
    loss normalised per rank (PyTorch averages gradients over ranks), clipping and the fused AdamW."""

    def __init__(self, name: str, source: Trainer, args, world: int):
        self.name, self.source, self.world = name, source, world
        self.precision = args.precision
        self.cfg = source.model_cfg
        self.global_batch = source.cfg.batch.global_batch_size
        self.position, self.steps = 0, 0
        self.phases = Phases()
        torch.manual_seed(SEED)
        self.model = Llama(self.cfg)
        self.model.init_weights(SEED)

    def micro_batches(self):
        mbs = self.source._on_device(self.source._micro_batches(self.position, self.global_batch))
        self.position += self.global_batch
        return mbs

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, module, mb: torch.Tensor, local_tokens: int) -> torch.Tensor:
        with self.autocast():
            logits = module(mb[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), mb[:, 1:].flatten(), reduction="sum") / local_tokens

    # the phases each side times, in order: forward + backward, loss all-reduce, clipping, optimizer step
    PHASES = ("forward+backward", "loss all-reduce", "clip", "optimizer")

    def forward_backward(self, mbs, local_tokens: int) -> torch.Tensor:
        """Runs every micro-batch; returns the summed loss."""
        raise NotImplementedError

    def step(self) -> tuple[float, float]:
        self.optimizer.zero_grad(set_to_none=True)
        mbs = self.micro_batches()
        local_tokens = len(mbs) * mbs[0].shape[0] * self.cfg.seq_length
        t0 = time.perf_counter()
        total = self.forward_backward(mbs, local_tokens)
        t1 = time.perf_counter()
        dist.all_reduce(total)
        t2 = time.perf_counter()
        norm = self.clip()
        t3 = time.perf_counter()
        self.optimizer.step()
        t4 = time.perf_counter()
        for name, dt in zip(self.PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.phases.add(name, dt)
        self.steps += 1
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2's norm is a DTensor
        return total.item() / self.world, norm.item()

    def clip(self) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP, foreach=True)

    def buckets(self) -> int:
        return 0

    def local_memory(self, optimizer) -> dict:
        params = list(self.model.parameters())
        return {"param_bytes": nbytes(params), "grad_bytes": nbytes(p.grad for p in params),
                "optimizer_bytes": nbytes(state_tensors(optimizer))}


class TheirsZero1(Theirs):
    def __init__(self, source: Trainer, args, world: int):
        super().__init__("ZeroRedundancyOptimizer+DDP", source, args, world)
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP
        bucket_mb = args.bucket_size * 4 / 2 ** 20
        self.ddp = DDP(self.model, broadcast_buffers=False, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)
        self.optimizer = ZeroRedundancyOptimizer(
            param_groups(list(self.model.named_parameters()), WEIGHT_DECAY), optimizer_class=torch.optim.AdamW,
            parameters_as_bucket_view=args.zero_bucket_view, lr=LR, betas=BETAS, eps=EPS,
            weight_decay=WEIGHT_DECAY, **({"fused": True} if args.their_adamw == "fused" else
                                          {"foreach": args.their_adamw == "foreach"}))

    PHASES = ("forward+backward", "loss all-reduce", "clip (local norm)", "optimizer (+broadcast)")

    def forward_backward(self, mbs, local_tokens: int) -> torch.Tensor:
        total = torch.zeros(())
        for i, mb in enumerate(mbs):
            with self.ddp.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext():
                loss = self.loss(self.ddp, mb, local_tokens)
                loss.backward()  # the last one waits for DDP's bucketed all-reduces
            total += loss.detach()
        return total

    def memory(self) -> dict:
        return {"local": self.local_memory(self.optimizer.optim)}


class TheirsFSDP(Theirs):
    def __init__(self, source: Trainer, args, world: int, reshard_after_forward: bool):
        label = "FSDP2" if reshard_after_forward else "FSDP2 (reshard_after_forward=False)"
        super().__init__(label, source, args, world)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        self.reshard_after_forward = reshard_after_forward
        mesh = init_device_mesh("cpu", (world,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if args.precision == "bf16" else MixedPrecisionPolicy())
        for layer in self.model.layers.values():
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        fully_shard(self.model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
        kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}
        self.optimizer = torch.optim.AdamW(param_groups(list(self.model.named_parameters()), WEIGHT_DECAY), lr=LR,
                                           betas=BETAS, eps=EPS, **kind[args.their_adamw])
        self.probe, self.peak_unsharded = False, 0
        for module in [self.model, *self.model.layers.values()]:
            module.register_forward_pre_hook(lambda *_: self._measure())
            module.register_forward_hook(lambda *_: self._measure())

    def _measure(self) -> None:
        """Bytes of the unsharded parameters registered right now (FSDP2 swaps the module's parameters to the
        unsharded tensors while a module is gathered), plus every local shard."""
        if self.probe:
            from torch.distributed.tensor import DTensor
            params = list(self.model.parameters())
            unsharded = nbytes(p for p in params if not isinstance(p, DTensor))
            self.peak_unsharded = max(self.peak_unsharded, unsharded)

    def autocast(self):
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts the gathered parameters

    PHASES = ("forward+backward (+gathers, reduce-scatters)", "loss all-reduce", "clip (+norm all-reduce)",
              "optimizer")

    def forward_backward(self, mbs, local_tokens: int) -> torch.Tensor:
        total = torch.zeros(())
        for i, mb in enumerate(mbs):
            if not self.reshard_after_forward:  # ZeRO-2-like: keep the gathered parameters across micro-batches
                self.model.set_reshard_after_backward(i == len(mbs) - 1)
            loss = self.loss(self.model, mb, local_tokens)
            loss.backward()
            total += loss.detach()
        return total

    def memory(self) -> dict:
        return {"local": self.local_memory(self.optimizer), "peak_unsharded_param_bytes": self.peak_unsharded}


class OursAPI(Theirs):
    """ZeroOptimizer as a user embeds it: the baselines' plain model, loss and loop (mean reduction, no_sync on all
    but the last micro-batch), with FusedAdamW and the optimizer's own clip_grad_norm_."""

    def __init__(self, source: Trainer, args, world: int, stage: int):
        overlap = args.overlap_param_gather and stage in (1, 2)
        super().__init__(f"ZeroOptimizer(stage={stage}{', overlap_param_gather' if overlap else ''})", source, args,
                         world)
        bf16 = args.precision == "bf16"
        if bf16:
            self.model.to(torch.bfloat16)
        self.optimizer = ZeroOptimizer(self.model, FusedAdamW, stage=stage, bucket_numel=args.bucket_size,
                                       overlap_param_gather=overlap,
                                       no_weight_decay=lambda name, p: p.ndim < 2, lr=LR, betas=BETAS, eps=EPS,
                                       weight_decay=WEIGHT_DECAY, master_weights=bf16)
        self.probe, self.peak_unsharded = False, 0
        if self.optimizer.sharded_params:  # the gathered units, measured at every layer's forward pre-hook
            for module in [self.model, *self.model.layers.values()]:
                module.register_forward_pre_hook(lambda *_: self._measure())

    def _measure(self) -> None:
        if self.probe:
            held = sum(b.full.untyped_storage().nbytes() for b in self.optimizer.buckets if b.gathered)
            self.peak_unsharded = max(self.peak_unsharded, held)

    def autocast(self):
        return contextlib.nullcontext()  # bf16 parameters (fp32 masters in the optimizer)

    PHASES = ("forward+backward (+reductions)", "loss all-reduce", "clip (+norm all-reduce)",
              "optimizer (+all-gather)")

    def forward_backward(self, mbs, local_tokens: int) -> torch.Tensor:
        total = torch.zeros(())
        for i, mb in enumerate(mbs):
            with self.optimizer.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext():
                loss = self.loss(self.model, mb, local_tokens)
                loss.backward()
            total += loss.detach().float()
        return total

    def clip(self) -> torch.Tensor:
        return self.optimizer.clip_grad_norm_(CLIP)

    def buckets(self) -> int:
        return len(self.optimizer.buckets)

    def memory(self) -> dict:
        o = self.optimizer
        mem = {"local": {"param_bytes": o.param_bytes(), "grad_bytes": o.grad_bytes(),
                         "optimizer_bytes": o.optimizer_bytes()}}
        if o.sharded_params:
            mem["peak_unsharded_param_bytes"] = self.peak_unsharded
        return mem


# ---------------------------------------------------------------------------------------------------------

def run_interleaved(sides, rounds: int) -> tuple[ABResult, list[str]]:
    """`rounds` rounds of every side's step, rotating the order every round, each step after a barrier and timed
    as the slowest rank's (benchmarks/ab.py). Returns the result (values: each step's (loss, grad norm)) and the
    sides' keys in it, in order. Each side's phases are closed with this rank's step time."""
    keys = [s.name if s.name not in [t.name for t in sides[:j]] else f"{s.name} #{j}" for j, s in enumerate(sides)]
    by_key = dict(zip(keys, sides))
    for side in sides:
        side.phases.reset()
    res = run_ab({k: side.step for k, side in by_key.items()}, rounds, 0, keep_values=True,
                 after=lambda k, seconds: by_key[k].phases.end_step(seconds))
    return res, keys


def profile_side(side, steps: int, out_dir: str, rank: int) -> str:
    """torch.profiler over `steps` steps of the side (a chrome trace and a table in out_dir); returns the table."""
    name = side.name.replace(" ", "_").replace("/", "_")
    return profile_table(profile(side.step, steps, out_dir, f"{name}_rank{rank}", row_limit=25))


def log_phases(sides, log) -> dict:
    """Median per-step time of each phase on rank 0 (the slowest-rank step time is in the main tables)."""
    out = {}
    for side in sides:
        med = side.phases.medians()
        out[side.name] = med
        log(f"- {side.name} (rank 0, ms, median over timed steps): " +
            ", ".join(f"{k} {v * 1e3:.1f}" for k, v in med.items()))
    return out


def gather_memory(side) -> dict:
    """The side's memory on every rank: {'local': max over ranks of each key, 'per_rank': [...], ...}."""
    mem = side.memory()
    keys = sorted(mem["local"])
    local = torch.tensor([mem["local"][k] for k in keys], dtype=torch.float64)
    everyone = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    mem["per_rank"] = [{k: int(v) for k, v in zip(keys, t.tolist())} for t in everyone]
    mem["max"] = {k: max(r[k] for r in mem["per_rank"]) for k in keys}
    if "peak_unsharded_param_bytes" in mem:  # max over ranks
        peak = torch.tensor([float(mem["peak_unsharded_param_bytes"])], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        mem["peak_unsharded_param_bytes"] = int(peak.item())
    return mem


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f}"


# ---------------------------------------------------------------------------------------------------------

def compare(args, size, world, rank, log) -> dict:
    """ours vs theirs pairs: check step-1 agreement, warm up, time interleaved, tabulate."""
    pairs = []
    if args.compare == "api":  # the library on a plain module, in the baselines' own loop
        source = build_ours(args, size, world, 0, args.bucket_size, world)
        baseline = {1: lambda: TheirsZero1(source, args, world),
                    2: lambda: TheirsFSDP(source, args, world, reshard_after_forward=False),
                    3: lambda: TheirsFSDP(source, args, world, reshard_after_forward=True)}
        pairs += [(OursAPI(source, args, world, stage), baseline[stage]()) for stage in args.api_stages]
    elif args.compare == "zero1":
        overlap = args.overlap_param_gather
        ours = Ours("ours --zero 1" + (" --overlap-param-gather" if overlap else ""),
                    build_ours(args, size, world, 1, args.bucket_size, world, overlap_param_gather=overlap))
        pairs.append((ours, TheirsZero1(ours.trainer, args, world)))
    else:
        try:
            ours3 = Ours("ours --zero 3", build_ours(args, size, world, 3, args.bucket_size, world))
            pairs.append((ours3, TheirsFSDP(ours3.trainer, args, world, reshard_after_forward=True)))
        except ConfigError as exc:
            log(f"NOTE: --zero 3 is rejected by this engine ({exc}); benchmarking our --zero 2 against FSDP2 "
                "with reshard_after_forward=False (ZeRO-2-like) only. TODO: rerun --compare zero3 once ZeRO-3 lands.")
        ours2 = Ours("ours --zero 2", build_ours(args, size, world, 2, args.bucket_size, world))
        pairs.append((ours2, TheirsFSDP(ours2.trainer, args, world, reshard_after_forward=False)))

    tol = LOSS_TOLERANCE[args.precision]
    result = {"pairs": []}
    for ours, theirs in pairs:
        lo, no = ours.step()
        lt, nt = theirs.step()
        log(f"step 1: loss {ours.name} {lo:.7f} / {theirs.name} {lt:.7f} (diff {abs(lo - lt):.2e}); grad norm "
            f"{no:.6f} / {nt:.6f} (diff {abs(no - nt):.2e})")
        if abs(lo - lt) > tol:
            raise SystemExit(f"step-1 losses differ by more than {tol}: the two sides do not do the same work")
        result["pairs"].append({"ours": ours.name, "theirs": theirs.name, "step1_loss": [lo, lt],
                                "step1_grad_norm": [no, nt]})
    if args.profile:
        for ours, theirs in pairs:
            for side in (ours, theirs):
                table = profile_side(side, 2, args.profile, rank)
                log(f"--- profile {side.name} (rank 0, 2 steps, self CPU time) ---\n{table}")
    for _ in range(args.warmup):
        for ours, theirs in pairs:
            ours.step()
            theirs.step()
    # memory after a step (the FSDP2 probe records the unsharded parameters during one more step's forward)
    for ours, theirs in pairs:
        if isinstance(theirs, TheirsFSDP):
            ours.probe = theirs.probe = True
            ours.step()
            theirs.step()
            ours.probe = theirs.probe = False
    mems = [(gather_memory(o), gather_memory(t)) for o, t in pairs]

    sides = [s for pair in pairs for s in pair]
    res, keys = run_interleaved(sides, args.steps * args.repeats)
    tokens = sides[0].global_batch * size["seq_length"]
    for k, ((ours, theirs), (mo, mt)) in enumerate(zip(pairs, mems)):
        a, b = keys[2 * k], keys[2 * k + 1]
        table, per_repeat = repeat_table(res, a, b, args.repeats, labels=("ours", "theirs"))
        row = result["pairs"][k]
        row.update({
            "ours_ms_median": res.median(a) * 1e3, "theirs_ms_median": res.median(b) * 1e3,
            "ours_ms_min": res.best(a) * 1e3, "theirs_ms_min": res.best(b) * 1e3,
            "median_ratio": res.ratio_summary(a, b)["median"],
            "per_repeat": [{"ours_ms": pr["a"], "theirs_ms": pr["b"], "ratio": pr["ratio"]} for pr in per_repeat],
            "max_loss_diff": max(abs(x[0] - y[0]) for x, y in zip(res.values[a], res.values[b])),
            "ours_buckets": ours.buckets(),
            "memory": {"ours": mo, "theirs": mt}})
        log(f"\n### {ours.name} vs {theirs.name}: step time (world {world}, {tokens} tokens/step, "
            f"{len(res.ratios(a, b))} pairs, ours {row['ours_buckets']} buckets)\n")
        log(table)
        log(f"\nlargest loss difference over the timed steps: {row['max_loss_diff']:.2e}\n\nwhere the time goes:")
        row["phases"] = log_phases([ours, theirs], log)
        log(f"\n### {ours.name} vs {theirs.name}: bytes held per rank after a step (max over ranks)\n")
        log("| | params | grads | optimizer state | total | ours/theirs (total) | gathered params, peak in forward |")
        log("|---|---|---|---|---|---|---|")
        for side, m in ((ours, mo), (theirs, mt)):
            peak = m.get("peak_unsharded_param_bytes")
            log(f"| {side.name} | {m['max']['param_bytes']:,} | {m['max']['grad_bytes']:,} | "
                f"{m['max']['optimizer_bytes']:,} | {sum(m['max'].values()):,} ({mib(sum(m['max'].values()))} MiB) | "
                + (f"**{sum(mo['max'].values()) / sum(mt['max'].values()):.3f}**" if side is ours else "") +
                f" | {'-' if peak is None else f'{peak:,}'} |")
        if "event" in mo:
            log(f"ours' memory_event() (rank 0): {mo['event']}")
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
            log(f"per rank {key}: ours " + ", ".join(f"{r[key]:,}" for r in mo["per_rank"]) +
                "; theirs " + ", ".join(f"{r[key]:,}" for r in mt["per_rank"]))
    return result


def overlap(args, size, world, rank, log) -> dict:
    """Our --zero Z at dp = world (default and small buckets) vs dp = 1 replicas running on every rank at once."""
    z = args.overlap_zero
    sides = [Ours("dp 1", build_ours(args, size, 1, 0, args.bucket_size, 1, single_rank_topology()))]
    for bucket in [args.bucket_size, *args.small_bucket_size]:
        sides.append(Ours(f"dp {world}, --zero {z}, --bucket-size {bucket:,}",
                          build_ours(args, size, world, z, bucket, world)))
    if args.overlap_param_gather:  # the last bucket size again, with the all-gather overlapped
        bucket = args.small_bucket_size[-1] if args.small_bucket_size else args.bucket_size
        sides.append(Ours(f"dp {world}, --zero {z}, --bucket-size {bucket:,}, --overlap-param-gather",
                          build_ours(args, size, world, z, bucket, world, overlap_param_gather=True)))
    for s in sides:
        s.step()
    for _ in range(args.warmup):
        for s in sides:
            s.step()
    res, keys = run_interleaved(sides, args.steps * args.repeats)
    seq = size["seq_length"]
    tokens_per_rank = [s.trainer.cfg.batch.global_batch_size * seq // s.trainer.topo.dp for s in sides]
    med = [res.median(key) for key in keys]
    result = {"zero": z, "rows": []}
    log(f"\n### Overlap: ours --zero {z}, tokens/s per rank (world {world}; dp 1 = {world} independent replicas "
        f"at once; {tokens_per_rank[0]} tokens per rank per step; {res.repeats} rounds)\n")
    log("| layout | buckets | ms/step (median) | tokens/s per rank | ratio to dp 1 (median per round) |")
    log("|---|---|---|---|---|")
    blocks = res.split(args.repeats)
    for j, s in enumerate(sides):
        ratio = res.ratio_summary(keys[0], keys[j])["median"]  # equal tokens per rank
        row = {"layout": s.name, "buckets": len(s.trainer.zero.buckets), "ms": med[j] * 1e3,
               "tokens_per_s_per_rank": tokens_per_rank[j] / med[j], "ratio": ratio,
               "per_repeat_ratio": [statistics.median(blk.ratios(keys[0], keys[j])) for blk in blocks]}
        result["rows"].append(row)
        log(f"| {s.name} | {row['buckets']} | {row['ms']:.1f} | {row['tokens_per_s_per_rank']:.0f} | "
            f"**{ratio:.3f}** ({', '.join(f'{x:.3f}' for x in row['per_repeat_ratio'])}) |")
    log("\nwhere the time goes:")
    result["phases"] = log_phases(sides, log)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=["zero1", "zero3", "overlap", "api"], required=True)
    ap.add_argument("--api-stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                    help="api mode: the ZeroOptimizer stages to run, each against its baseline")
    ap.add_argument("--model-size", choices=sorted(SIZES), default="medium")
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches per rank per step")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--bucket-size", type=int, default=None,
                    help="elements per bucket (ours; DDP's bucket_cap_mb is the same bytes) [1000000; overlap mode: "
                         "the engine's default --bucket-size]")
    ap.add_argument("--small-bucket-size", type=int, nargs="+", default=[1_000_000, 250_000],
                    help="overlap mode: the several-bucket cases")
    ap.add_argument("--overlap-zero", type=int, default=1, choices=[0, 1, 2], help="overlap mode: ZeRO stage at dp > 1")
    ap.add_argument("--their-adamw", choices=["fused", "foreach", "forloop"], default="fused")
    ap.add_argument("--zero-bucket-view", action="store_true",
                    help="ZeroRedundancyOptimizer(parameters_as_bucket_view=True)")
    ap.add_argument("--overlap-param-gather", action="store_true",
                    help="zero1/overlap/api: run ours with the engine's --overlap-param-gather (zero1, api: instead "
                         "of the default; overlap: as one more side)")
    ap.add_argument("--steps", type=int, default=8, help="timed rounds per repeat")
    add_timing_args(ap, repeats=3, warmup=2, repeats_help="blocks of --steps timed rounds (default 3)",
                    warmup_help="untimed rounds first (default 2)")
    args = ap.parse_args(argv)
    if args.bucket_size is None:
        args.bucket_size = parse_config([]).run.bucket_size if args.compare == "overlap" else 1_000_000

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    size = dict(SIZES[args.model_size])

    def log(*a):
        if rank == 0:
            print(*a, flush=True)

    log(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, world "
        f"{world}, {torch.get_num_threads()} thread(s) per rank, gloo; {args.model_size}: {size}, "
        f"{args.micro_batches} micro-batches per rank, {args.precision}, bucket {args.bucket_size} elements, "
        f"their AdamW {args.their_adamw}")
    if args.compare == "overlap":
        result = overlap(args, size, world, rank, log)
    else:
        result = compare(args, size, world, rank, log)
    result.update({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "world": world,
                   "args": vars(args), "model": size})
    return finish(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
