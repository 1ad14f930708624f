"""The memory-bound elementwise pieces of the LLaMA layer three ways: eager, torch.compile, and the engine's own
fused kernels (--fused-elementwise: csrc/cuda/elementwise.cu). Which is at the bandwidth limit, and so which should
the engine use?

Pieces (the engine's own code, from engine.models.llama; `compiled` is torch.compile(..., fullgraph=True) of
exactly the same module or function, as --compile compiles whole layers; `fused` is engine.models.fused's function
for the piece, as --fused-elementwise runs it: the CUDA kernels on a GPU, their torch reference ops on the CPU):

    rmsnorm   RMSNorm.forward on x [b, s, hidden] (fp32 upcast, rsqrt of the mean square, weight multiply);
              x and the weight in --dtype, as the trainer runs it (the model is cast to the parameter dtype).
    rope      apply_rope to q [b, heads, s, head_dim] and k [b, kv_heads, s, head_dim] with the [s, head_dim]
              cos/sin tables in --dtype (Llama.forward passes rope_cos.to(x.dtype)), as Attention.forward calls
              it; by default q and k are transposed views of [b, s, heads, head_dim] tensors, the layout the
              attention projections produce (--rope-layout contiguous: plain [b, heads, s, d] tensors).
    swiglu    F.silu(gate) * up (MLP.forward's expression) on gate, up [b, s, ffn].

Passes: `fwd` is the training forward (the inputs require grad, so the compiled side runs the forward graph of
its forward/backward pair and saves what its backward needs; the output and graph are then dropped); `fwd+bwd`
is the forward and torch.autograd.grad of the output(s) with respect to the inputs (and the weight) given random
output gradients; `bwd` in the tables is the difference of the two (medians), not timed on its own.

Minimum bytes each pass must move (e: bytes per element of --dtype, T = b * s tokens), the figure the GB/s
columns are computed from:

    rmsnorm  N = T * hidden.  fwd: read x (N e) and w (hidden e), write y (N e) and the 1/rms each token needs
             for backward (T * 4, fp32).  bwd: read x, dy (2 N e), w (hidden e) and 1/rms (T * 4), write dx
             (N e) and dw once (hidden e; a kernel's per-block fp32 partials of dw are extra traffic that is not
             counted).  A backward that recomputes 1/rms instead of saving it moves T * 4 less in forward, which
             is 1/2048 of the forward's bytes at hidden 2048 in bf16: noise.
    rope     Q = b * heads * s * d, K = b * kv_heads * s * d.  fwd: read q, k, write q', k' (2 (Q + K) e) and read
             the cos and sin tables once (2 s d e).  bwd: read dq', dk', write dq, dk, and the tables: the same.
    swiglu   M = T * ffn.  fwd: read gate, up, write out (3 M e).  bwd: read dout, gate, up, write dgate, dup
             (5 M e).  (Eager's autograd also saves and re-reads silu(gate), and materialises dout * up.)

The bandwidth reference is a large device-to-device copy, dst.copy_(src) of --copy-mib MiB, bytes read + written
per second, measured at the start and at the end of the run (the start figure is the one the tables divide by);
as benchmarks/bench_kernels.py does; it reads and writes like the pieces do (streams in, fresh outputs out), so
~100% of it is the practical ceiling.

Every call of a side uses the next of K identical sets of inputs (K chosen so that K sets hold at least
--rotate-mib MiB, at most 16 sets), so consecutive calls do not find their inputs in the last-level cache (50 MiB
on an H100): the figures are DRAM bandwidth, as in a training step where the layer's activations do not fit.

Timing (benchmarks/ab.py): before timing, each piece runs one forward+backward of every side on the same inputs,
and the outputs and gradients are compared (max |side - eager| over max |eager| per tensor, within a tolerance
of 3e-2 for bf16, 5e-3 for fp16, 1e-4 for fp32 on CUDA, 1e-5 for fp32 on the CPU); that first compiled call
compiles the forward and backward graphs, and its wall time is reported as the compile time. Then run_ab warms up
and runs --repeats interleaved rounds (the order rotates every round), each timing --iters back-to-back calls
between two device syncs (so launch latency and syncs do not dominate); the tables give the median time per
call, and the ratios compiled / eager and fused / eager are medians of the per-round ratios. On CUDA a second
table gives the GPU kernel time per call from torch.profiler (the union of the kernel/memcpy/memset intervals,
annotations left out) and the kernel count per call: what the kernels themselves achieve, without the host
overhead a standalone call of a small compiled graph pays and that a whole compiled layer amortises (its
wall/kernel columns say how host-bound each standalone call is).

    python benchmarks/bench_elementwise.py [--device cpu|cuda] [--pieces rmsnorm rope swiglu] [--smoke]
        [--tokens 8192] [--seq 2048] [--hidden 2048] [--ffn 5632] [--heads 32] [--kv-heads 4] [--head-dim 64]
        [--dtype bf16|fp16|fp32] [--iters N] [--repeats R] [--warmup W] [--json PATH] [--profile DIR]

The exit status is 1 when a check failed or a piece could not be run (the other pieces still run, and the JSON
records the errors).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable

import torch
import torch.nn.functional as F

try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # `from ab import`, also when imported by a test
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine.models import fused  # noqa: E402
from engine.models.llama import RMSNorm, apply_rope, rope_tables  # noqa: E402
from ab import add_timing_args, markdown_table, profile, run_ab, sync, timed, write_json  # noqa: E402

PIECES = ("rmsnorm", "rope", "swiglu")
SIDES = ("eager", "compiled", "fused")  # the first is the baseline of the ratios
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NORM_EPS = 1e-5  # ModelConfig.norm_eps
ROPE_THETA = 10000.0  # ModelConfig.rope_theta (the tables' values do not change the cost)
NOT_WORK = ("annotation", "sync", "runtime", "driver", "overhead")  # profiler activity types that are not device work
SMOKE_SHAPES = dict(tokens=64, seq=32, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16)


# ---------------------------------------------------------------------------------------------------------
# The pieces.

def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """MLP.forward's activation, between w_gate/w_up and w_down."""
    return F.silu(gate) * up


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE as Attention.forward applies it: the same tables to q and to k."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def rope_qk_fused(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return fused.rope(q, cos, sin), fused.rope(k, cos, sin)


@dataclasses.dataclass
class Inputs:
    """One set of inputs: fn(*args); autograd.grad of the output(s) with respect to `wrt`, given `grads`."""
    args: tuple
    wrt: tuple
    grads: tuple

    def nbytes(self) -> int:
        """The bytes this set holds of its own (shared tensors, e.g. a weight, are counted too: they are small)."""
        seen, total = set(), 0
        for t in (*self.args, *self.grads):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


@dataclasses.dataclass
class Piece:
    name: str
    eager: Callable
    compiled: Callable
    fused: Callable
    make_inputs: Callable[[], Inputs]
    fwd_bytes: int
    bwd_bytes: int
    outputs: tuple  # names of the outputs, then of the gradients (in `wrt` order), for the check

    def bytes_of(self, pass_: str) -> int:
        return {"fwd": self.fwd_bytes, "bwd": self.bwd_bytes, "fwd+bwd": self.fwd_bytes + self.bwd_bytes}[pass_]


@dataclasses.dataclass
class Shapes:
    tokens: int
    seq: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def batch(self) -> int:
        return self.tokens // self.seq

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _randn(*shape, device, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)


def make_piece(name: str, sh: Shapes, device, compile_kwargs: dict, rope_layout: str = "layer") -> Piece:
    dt, e = sh.torch_dtype, torch.empty((), dtype=sh.torch_dtype).element_size()
    b, s, T = sh.batch, sh.seq, sh.tokens
    if name == "rmsnorm":
        norm = RMSNorm(sh.hidden, NORM_EPS).to(device=device, dtype=dt)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(sh.hidden, device=device))

        def make() -> Inputs:
            x = _randn(b, s, sh.hidden, device=device, dtype=dt).requires_grad_()
            return Inputs((x,), (x, norm.weight), (_randn(b, s, sh.hidden, device=device, dtype=dt),))

        N = T * sh.hidden
        return Piece(name, norm, torch.compile(norm, fullgraph=True, **compile_kwargs),
                     lambda x: fused.rms_norm(x, norm.weight, NORM_EPS), make,
                     fwd_bytes=2 * N * e + sh.hidden * e + T * 4,
                     bwd_bytes=3 * N * e + 2 * sh.hidden * e + T * 4,
                     outputs=("y", "dx", "dw"))
    if name == "rope":
        cos, sin = (t.to(dt) for t in rope_tables(s, sh.head_dim, ROPE_THETA, device=device))

        def qk(heads: int) -> torch.Tensor:
            if rope_layout == "layer":  # a view of the projection's output [b, s, heads, d], as in the layer
                return _randn(b, s, heads, sh.head_dim, device=device, dtype=dt).transpose(1, 2)
            return _randn(b, heads, s, sh.head_dim, device=device, dtype=dt)

        def make() -> Inputs:
            q, k = qk(sh.heads).requires_grad_(), qk(sh.kv_heads).requires_grad_()
            return Inputs((q, k, cos, sin), (q, k), (qk(sh.heads), qk(sh.kv_heads)))

        qk_elems = b * s * (sh.heads + sh.kv_heads) * sh.head_dim
        tables = 2 * s * sh.head_dim * e
        return Piece(name, rope_qk, torch.compile(rope_qk, fullgraph=True, **compile_kwargs), rope_qk_fused, make,
                     fwd_bytes=2 * qk_elems * e + tables, bwd_bytes=2 * qk_elems * e + tables,
                     outputs=("q_out", "k_out", "dq", "dk"))
    if name == "swiglu":
        def make() -> Inputs:
            gate, up = (_randn(b, s, sh.ffn, device=device, dtype=dt).requires_grad_() for _ in range(2))
            return Inputs((gate, up), (gate, up), (_randn(b, s, sh.ffn, device=device, dtype=dt),))

        M = T * sh.ffn
        return Piece(name, swiglu, torch.compile(swiglu, fullgraph=True, **compile_kwargs), fused.swiglu, make,
                     fwd_bytes=3 * M * e, bwd_bytes=5 * M * e, outputs=("out", "dgate", "dup"))
    raise ValueError(f"unknown piece {name!r}; choose from {PIECES}")


# ---------------------------------------------------------------------------------------------------------
# Calls.

def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def call_fwd(fn: Callable, inp: Inputs) -> None:
    fn(*inp.args)


def call_fwd_bwd(fn: Callable, inp: Inputs) -> None:
    torch.autograd.grad(_outputs(fn(*inp.args)), inp.wrt, inp.grads)


CALLS = {"fwd": call_fwd, "fwd+bwd": call_fwd_bwd}


def looped(fn: Callable, call: Callable, sets: list[Inputs]) -> Callable[[int], None]:
    """A side: called with n, it makes n calls, each on the next set of inputs (its own rotation)."""
    rotation = itertools.cycle(sets)

    def run(n: int) -> None:
        for _ in range(n):
            call(fn, next(rotation))
    return run


def num_sets(set_bytes: int, rotate_bytes: int, most: int = 16) -> int:
    """How many input sets hold at least rotate_bytes (1 .. most)."""
    return max(1, min(most, math.ceil(rotate_bytes / max(set_bytes, 1))))


# ---------------------------------------------------------------------------------------------------------
# Checks.

def tolerance(dtype: torch.dtype, device_type: str) -> float:
    if dtype == torch.bfloat16:  # 2 bf16 ulps of the largest value are up to 1.6e-2 of it
        return 3e-2
    if dtype == torch.float16:
        return 5e-3
    return 1e-5 if device_type == "cpu" else 1e-4


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (in fp32); inf if the shapes differ or got has a NaN or inf where want has
    none."""
    if got.shape != want.shape:
        return math.inf
    got, want = got.detach().float(), want.detach().float()
    if not torch.isfinite(got).all() and torch.isfinite(want).all():
        return math.inf
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def first_calls(piece: Piece, inp: Inputs, device) -> dict:
    """One forward+backward of each side on the same inputs: the first (compiling) call of the compiled side,
    timed forward and backward apart; returns their values and times."""
    result = {}
    for side in SIDES:
        fn = getattr(piece, side)
        sync(device)
        t0 = time.perf_counter()
        outs = _outputs(fn(*inp.args))
        sync(device)
        t1 = time.perf_counter()
        grads = torch.autograd.grad(outs, inp.wrt, inp.grads)
        sync(device)
        t2 = time.perf_counter()
        result[side] = {"values": [t.detach() for t in (*outs, *grads)], "fwd_s": t1 - t0, "bwd_s": t2 - t1}
    return result


def check(piece: Piece, first: dict, tol: float) -> dict:
    """{"errors": {side: {output: error}} of each side against eager, "tolerance", "ok"}."""
    errors = {side: {name: rel_error(c, e) for name, c, e in
                     zip(piece.outputs, first[side]["values"], first["eager"]["values"], strict=True)}
              for side in SIDES[1:]}
    return {"errors": errors, "tolerance": tol,
            "ok": all(err <= tol for side in errors.values() for err in side.values())}


def _errors_text(errors: dict) -> str:
    return "; ".join(f"{side}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()) for side, errs in errors.items())


# ---------------------------------------------------------------------------------------------------------
# Bandwidth reference and device time.

def copy_bandwidth(device, nbytes: int, repeats: int = 7, iters: int | None = None) -> float:
    """Bytes read + written per second by dst.copy_(src) of nbytes (median of `repeats` timings of `iters`
    copies: default 10 on CUDA, 2 on the CPU)."""
    iters = iters or (10 if torch.device(device).type == "cuda" else 2)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)

    def copies():
        for _ in range(iters):
            dst.copy_(src)

    copies()
    times = [timed(copies, device=device)[0] / iters for _ in range(repeats)]
    return 2 * nbytes / statistics.median(times)


def device_busy(events, device_type) -> tuple[float, int]:
    """(microseconds, count) of the device activities among profiler events: the union of the intervals of the
    events on `device_type` that are work (kernel, gpu_memcpy, gpu_memset), leaving out user annotations
    (torch.compile's regions appear on the GPU timeline as annotations spanning its kernels) and synchronisation
    records (cuda_sync), which span waits rather than work."""
    spans = []
    for ev in events:
        if ev.device_type != device_type or getattr(ev, "is_user_annotation", False):
            continue
        kind = str(getattr(ev, "activity_type", "") or "").lower()
        if any(word in kind for word in NOT_WORK):
            continue
        spans.append((ev.time_range.start, ev.time_range.end))
    spans.sort()
    total, end = 0.0, -math.inf
    for s, e in spans:
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total, len(spans)


def kernel_time(run: Callable[[int], None], calls: int, device) -> dict | None:
    """CUDA only: GPU time and kernel count per call of run (from torch.profiler); None elsewhere or on failure."""
    if torch.device(device).type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    try:
        return profiled_busy(run, calls, device, ProfilerActivity.CUDA, DeviceType.CUDA)
    except Exception as exc:  # the wall-clock figures stand without it
        print(f"  (kernel time not measured: {type(exc).__name__}: {exc})", flush=True)
        return None


def profiled_busy(run: Callable[[int], None], calls: int, device, activity, device_type) -> dict | None:
    """One call of run, then `calls` calls under torch.profiler (CPU and `activity`): {"s": busy seconds per call,
    "kernels": activities per call} of the events on device_type (see device_busy); None when there are none."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    run(1)
    sync(device)
    with torch_profile(activities=list({ProfilerActivity.CPU, activity})) as prof:
        run(calls)
        sync(device)
    busy_us, count = device_busy(prof.events(), device_type)
    if count == 0:
        return None
    return {"s": busy_us * 1e-6 / calls, "kernels": count / calls}


def _frames() -> int:
    from torch._dynamo.utils import counters
    return counters["frames"]["total"]


# ---------------------------------------------------------------------------------------------------------
# The run.

class Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {msg}", flush=True)


def machine(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _empty_cache(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_piece(name: str, args, sh: Shapes, copy_bps: float, clock: Clock) -> dict:
    device = args.device
    piece = make_piece(name, sh, device, args.compile_kwargs, args.rope_layout)
    probe = piece.make_inputs()
    k = num_sets(probe.nbytes(), args.rotate_mib * 2 ** 20)
    sets = [probe] + [piece.make_inputs() for _ in range(k - 1)]
    out = {"piece": name, "input_sets": k, "set_MB": probe.nbytes() / 1e6,
           "bytes": {p: piece.bytes_of(p) for p in ("fwd", "bwd", "fwd+bwd")}}

    clock.say(f"{name}: first calls (compiling forward and backward), {k} input sets of {probe.nbytes() / 1e6:.1f} MB")
    first = first_calls(piece, sets[0], device)
    out["compile_s"] = first["compiled"]["fwd_s"] + first["compiled"]["bwd_s"]
    out["compile_fwd_s"], out["compile_bwd_s"] = first["compiled"]["fwd_s"], first["compiled"]["bwd_s"]
    out["eager_first_call_s"] = first["eager"]["fwd_s"] + first["eager"]["bwd_s"]
    out["check"] = check(piece, first, args.tol if args.tol is not None else tolerance(sh.torch_dtype,
                                                                                        torch.device(device).type))
    del first
    errs = _errors_text(out["check"]["errors"])
    clock.say(f"{name}: compiled in {out['compile_s']:.1f} s (fwd {out['compile_fwd_s']:.1f} + bwd "
              f"{out['compile_bwd_s']:.1f}); against eager {errs} (tolerance {out['check']['tolerance']:.0e}): "
              f"{'ok' if out['check']['ok'] else 'MISMATCH'}")

    frames0 = _frames()
    out["timings"], out["ab"], out["kernel"] = {}, {}, {}
    for pass_ in PASSES:
        sides = {side: looped(getattr(piece, side), CALLS[pass_], sets) for side in SIDES}
        res = run_ab({s: (lambda run=run: run(args.iters)) for s, run in sides.items()}, args.repeats, args.warmup,
                     device=device)
        med = {s: res.median(s) / args.iters for s in sides}
        ratio = res.ratio_summary("compiled", "eager")
        fused_ratio = res.ratio_summary("fused", "eager")
        out["ab"][pass_] = res.to_dict()
        out["timings"][pass_] = {**{f"{s}_s": med[s] for s in SIDES}, "ratio": ratio["median"],
                                 "ratio_q1": ratio["q1"], "ratio_q3": ratio["q3"],
                                 "fused_ratio": fused_ratio["median"], "fused_ratio_q1": fused_ratio["q1"],
                                 "fused_ratio_q3": fused_ratio["q3"],
                                 **{f"{s}_best_s": res.best(s) / args.iters for s in SIDES}}
        kern = {s: kernel_time(run, args.kernel_calls, device) for s, run in sides.items()}
        if all(kern.values()):
            out["kernel"][pass_] = kern
        if args.details:
            print(f"\n{name} {pass_}, seconds per {args.iters} calls:\n{markdown_table(res, 'eager')}\n", flush=True)
        line = (f"{name} {pass_}: eager {med['eager'] * 1e3:.3f} ms, compiled {med['compiled'] * 1e3:.3f} ms "
                f"(compiled/eager {ratio['median']:.3f}), fused {med['fused'] * 1e3:.3f} ms (fused/eager "
                f"{fused_ratio['median']:.3f}); % of copy: " + ", ".join(
                    f"{s} {100 * piece.bytes_of(pass_) / med[s] / copy_bps:.0f}%" for s in SIDES))
        if pass_ in out["kernel"]:
            line += "; kernels/call: " + ", ".join(f"{s} {out['kernel'][pass_][s]['kernels']:.0f}" for s in SIDES)
        clock.say(line)
        if args.profile:
            for side, run in sides.items():
                profile(lambda run=run: run(1), 3, args.profile, f"{name}_{pass_.replace('+', '_')}_{side}")
    out["recompiled_frames_while_timing"] = _frames() - frames0
    if out["recompiled_frames_while_timing"]:
        clock.say(f"{name}: WARNING: {out['recompiled_frames_while_timing']} frames compiled while timing")
    del piece, sets, probe
    _empty_cache(device)
    return out


def table_rows(result: dict) -> tuple[list[dict], list[dict]]:
    """The rows of the wall-clock table and of the kernel-time table: fwd, bwd (the difference), fwd+bwd."""
    copy_bps = result["copy_GBps"] * 1e9
    wall, kern = [], []
    for p in result["pieces"]:
        if "timings" not in p or len(p["timings"]) < len(PASSES):
            continue
        t = dict(p["timings"])
        t["bwd"] = {f"{side}_s": t["fwd+bwd"][f"{side}_s"] - t["fwd"][f"{side}_s"] for side in SIDES}
        for pass_ in ("fwd", "bwd", "fwd+bwd"):
            row = _row(p["piece"], pass_, p["bytes"][pass_], {s: t[pass_][f"{s}_s"] for s in SIDES}, copy_bps)
            if pass_ != "bwd":  # the timed passes: the median of the per-round ratios
                row["ratio"], row["fused_ratio"] = t[pass_]["ratio"], t[pass_]["fused_ratio"]
            wall.append(row)
        if len(p["kernel"]) == len(PASSES):
            k = dict(p["kernel"])
            k["bwd"] = {side: {"s": k["fwd+bwd"][side]["s"] - k["fwd"][side]["s"],
                               "kernels": k["fwd+bwd"][side]["kernels"] - k["fwd"][side]["kernels"]}
                        for side in SIDES}
            for pass_ in ("fwd", "bwd", "fwd+bwd"):
                row = _row(p["piece"], pass_, p["bytes"][pass_], {s: k[pass_][s]["s"] for s in SIDES}, copy_bps)
                for side in SIDES:
                    busy = k[pass_][side]["s"]
                    row[f"{side}_kernels"] = k[pass_][side]["kernels"]
                    row[f"{side}_wall_over_kernel"] = t[pass_][f"{side}_s"] / busy if busy > 0 else math.nan
                kern.append(row)
    return wall, kern


def _row(piece: str, pass_: str, nbytes: int, seconds: dict, copy_bps: float) -> dict:
    """One table row: per side ms, GB/s and % of the copy bandwidth; `ratio` compiled/eager, `fused_ratio`
    fused/eager (of these times: the wall-clock table's own ratios are the per-round medians, see run_piece)."""
    def gbps(s):
        return nbytes / s / 1e9 if s > 0 else math.nan
    row = {"piece": piece, "pass": pass_, "MB": nbytes / 1e6}
    for side, sec in seconds.items():
        row.update({f"{side}_ms": sec * 1e3, f"{side}_GBps": gbps(sec),
                    f"{side}_pct_copy": 100 * gbps(sec) * 1e9 / copy_bps})
    eager = seconds["eager"]
    row["ratio"] = seconds["compiled"] / eager if eager > 0 else math.nan
    row["fused_ratio"] = seconds["fused"] / eager if eager > 0 else math.nan
    return row


def _gb(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_tables(result: dict) -> str:
    sh = result["shapes"]
    lines = [f"{result['machine']} ({result['device']}), torch {result['torch']}, {result['date']}",
             f"{sh['tokens']} tokens (batch {sh['tokens'] // sh['seq']} x seq {sh['seq']}), hidden {sh['hidden']}, "
             f"ffn {sh['ffn']}, {sh['heads']} heads / {sh['kv_heads']} kv heads x {sh['head_dim']}, {sh['dtype']}; "
             f"copy bandwidth {result['copy_GBps']:.0f} GB/s at the start, {result['copy_GBps_end']:.0f} at the end",
             f"wall clock: medians of {result['repeats']} interleaved rounds x {result['iters']} calls; ratios to "
             "eager: medians of the per-round ratios (< 1: faster than eager); bwd = (fwd+bwd) - fwd (its ratios: of "
             "the medians); GB/s from the minimum bytes (see the docstring); fused: " + result.get("fused_path", "?"),
             ""]
    wall, kern = table_rows(result)
    header = ("| piece | pass | min MB | eager ms | compiled ms | fused ms | compiled/eager | fused/eager | "
              "eager % of copy | compiled % of copy | fused % of copy |")
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"

    def fmt(r, extra=""):
        return (f"| {r['piece']} | {r['pass']} | {r['MB']:.1f} | "
                + " | ".join(f"{r[f'{s}_ms']:.4g}" for s in SIDES)
                + f" | {r['ratio']:.3f} | {r['fused_ratio']:.3f} | "
                + " | ".join(f"{r[f'{s}_pct_copy']:.0f}%" for s in SIDES) + f" |{extra}")

    lines += [header, sep] + [fmt(r) for r in wall]
    if kern:
        lines += ["", f"GPU kernel time per call (torch.profiler, {result['kernel_calls']} calls per side; the "
                  "union of kernel/memcpy/memset intervals). wall/kernel well above 1: the standalone call is "
                  "host-bound (dispatch, launches), which a whole compiled layer amortises; judge the kernels by "
                  "this table then:", "",
                  header + "".join(f" kernels/call {s} |" for s in SIDES)
                  + "".join(f" wall/kernel {s} |" for s in SIDES),
                  sep + "---:|" * (2 * len(SIDES))]
        lines += [fmt(r, "".join(f" {r[f'{s}_kernels']:.0f} |" for s in SIDES)
                      + "".join(f" {r[f'{s}_wall_over_kernel']:.2f} |" for s in SIDES)) for r in kern]
    lines += ["", "| piece | compile s (first fwd + bwd) | eager first call s | input sets | check: max rel. error "
              "against eager |", "|---|---:|---:|---:|---|"]
    for p in result["pieces"]:
        if "error" in p:
            lines.append(f"| {p['piece']} | FAILED: {p['error']} | | | |")
            continue
        c = p["check"]
        lines.append(f"| {p['piece']} | {p['compile_s']:.1f} | {p['eager_first_call_s']:.2f} | {p['input_sets']} | "
                     f"{_errors_text(c['errors'])} (tol {c['tolerance']:.0e}) {'ok' if c['ok'] else '**MISMATCH**'} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--pieces", nargs="+", default=list(PIECES), choices=list(PIECES))
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 1 repeat, 1 call per timing (fp32 on the CPU): every code path, compiles "
                        "included")
    p.add_argument("--tokens", type=int, default=None, help="b * s (default 8192)")
    p.add_argument("--seq", type=int, default=None, help="sequence length s (default 2048; at most --tokens)")
    p.add_argument("--hidden", type=int, default=None, help="default 2048")
    p.add_argument("--ffn", type=int, default=None, help="default 5632")
    p.add_argument("--heads", type=int, default=None, help="default 32")
    p.add_argument("--kv-heads", type=int, default=None, help="default 4")
    p.add_argument("--head-dim", type=int, default=None, help="default 64")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--rope-layout", default="layer", choices=["layer", "contiguous"],
                   help="q, k as transposed views of [b, s, h, d] as in the layer (default), or contiguous")
    p.add_argument("--iters", type=int, default=None, help="calls per timing (default 20 on CUDA, 3 on the CPU)")
    add_timing_args(p, repeats=10, warmup=2, repeats_help="interleaved eager/compiled rounds (default 10)",
                    warmup_help="untimed rounds first, after the compiling call (default 2)")
    p.add_argument("--kernel-calls", type=int, default=5, help="calls profiled per side for the kernel time (CUDA)")
    p.add_argument("--copy-mib", type=int, default=None, help="size of the reference copy (default 512; smoke 16)")
    p.add_argument("--rotate-mib", type=int, default=256,
                   help="rotate the inputs over enough sets to hold this many MiB (default 256)")
    p.add_argument("--tol", type=float, default=None, help="override the check's tolerance")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: none, as --compile uses)")
    p.add_argument("--details", action="store_true", help="also print ab.markdown_table of every timing")
    args = p.parse_args(argv)

    defaults = dict(tokens=8192, seq=2048, hidden=2048, ffn=5632, heads=32, kv_heads=4, head_dim=64)
    if args.smoke:
        defaults.update(SMOKE_SHAPES)
        args.repeats, args.warmup = 1, 1
        args.iters = args.iters or 1
        args.kernel_calls = 1
        args.copy_mib = args.copy_mib or 16
        args.rotate_mib = min(args.rotate_mib, 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seq = min(args.seq, args.tokens)
    if args.tokens % args.seq:
        p.error(f"--tokens {args.tokens} is not a multiple of --seq {args.seq}")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.head_dim % 2:
        p.error("--head-dim must be even (half-split RoPE)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.iters = args.iters or (20 if args.device == "cuda" else 3)
    args.copy_mib = args.copy_mib or 512
    args.compile_kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
    return args


def run(args) -> dict:
    clock = Clock()
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(torch.cuda.current_device())
    torch.manual_seed(0)
    sh = Shapes(args.tokens, args.seq, args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim, args.dtype)
    result = {"device": device, "machine": machine(device), "device_name": machine(device), "torch": torch.__version__,
              "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"), "shapes": dataclasses.asdict(sh), "pieces_requested": args.pieces,
              "rope_layout": args.rope_layout, "compile_kwargs": args.compile_kwargs, "repeats": args.repeats,
              "warmup": args.warmup, "iters": args.iters, "kernel_calls": args.kernel_calls,
              "rotate_mib": args.rotate_mib, "copy_mib": args.copy_mib, "smoke": args.smoke, "pieces": []}
    clock.say(f"{result['machine']}, torch {torch.__version__}; measuring the copy bandwidth "
              f"({args.copy_mib} MiB)")
    from engine import ext
    result["fused_path"] = ("CUDA kernels" if isinstance(ext.elementwise_ops(device), ext.CompiledOps)
                            else "torch reference ops (no elementwise kernels on this device)")
    copy_bps = copy_bandwidth(device, args.copy_mib * 2 ** 20)
    result["copy_GBps"] = copy_bps / 1e9
    clock.say(f"copy bandwidth {copy_bps / 1e9:.0f} GB/s")
    for name in args.pieces:
        try:
            result["pieces"].append(run_piece(name, args, sh, copy_bps, clock))
        except Exception as exc:  # one piece failing (e.g. a compile error) does not lose the others
            traceback.print_exc()
            result["pieces"].append({"piece": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            clock.say(f"{name}: FAILED ({type(exc).__name__})")
            _empty_cache(device)
    result["copy_GBps_end"] = copy_bandwidth(device, args.copy_mib * 2 ** 20) / 1e9
    wall, kern = table_rows(result)
    result["table"], result["kernel_table"] = wall, kern
    result["ok"] = all("error" not in p and p["check"]["ok"] for p in result["pieces"])
    result["total_s"] = time.perf_counter() - clock.start
    clock.say("done")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print()
    print(format_tables(result))
    write_json(args.json, result)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
