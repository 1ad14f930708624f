"""The fused kernels (csrc/ through engine.ext) against PyTorch: AdamW and gradient clipping, with the achieved
bandwidth as a fraction of the machine's measured copy bandwidth.

Cases, on N parameters in T tensors (default 64M in 128), each with the bytes every side moves per parameter:

    adamw-fp32         FusedAdamW.step vs torch.optim.AdamW(fused=True).step. Both read p, g, m, v and write
                       p, m, v: 28 B.
    adamw-bf16-master  bf16 params and grads, FusedAdamW(master_weights=True): reads g (2) and the fp32 master,
                       m, v, writes master, m, v and the bf16 param (2): 28 B. Torch's best equivalent: the bf16
                       grads copied into the fp32 masters' grads (6 B), fused AdamW on the masters (28 B), the
                       masters copied into the bf16 params (6 B): 40 B.
    clip-noop          clip_grad_norm_ when the norm is already below max_norm vs torch.nn.utils.clip_grad_norm_(
                       foreach=True). Ours measures only (4 B); torch multiplies by the clamped coefficient 1.0
                       all the same (4 + 8 = 12 B).
    clip-active        the same with max_norm below the norm (1% lower at every call): both measure and
                       scale (12 B).
    norm               global_grad_norm vs torch's measure-only equivalent, _foreach_norm + vector_norm (4 B):
                       what the trainer needs when it folds the clip coefficient into the AdamW pass.

The copy bandwidth is that of a large `dst.copy_(src)`, bytes read + written over the time. A copy also pays for
reading the destination's cache lines before writing them (write-allocate), which in-place updates (AdamW's
p, m, v) do not, so a fused in-place kernel can exceed 100% of it; the in-place reference, `x.mul_(1.0)`, is the
closer limit for those. Both references are timed in every repeat, next to the kernels.

Timing is interleaved: each repeat times `--iters` calls of each side in turn (the order alternates), so machine
noise hits all of them; the speed-up is the median of the per-repeat ratios torch / ours, and the best times of
each side give a second view that is less sensitive to other processes on a shared machine.

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--params N] [--tensors T] [--repeats R] [--json]
                                       [--out-json FILE] [--profile DIR]
    pytest benchmarks/ --benchmark-only        # the test_* functions below (pytest-benchmark)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import itertools
import json
import os
import platform
import statistics
import sys
from typing import Callable

import torch

try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import ext  # noqa: E402
from engine.optim import FusedAdamW, clip_grad_norm_, global_grad_norm  # noqa: E402
from ab import add_timing_args, profile, run_ab, timed, write_json  # noqa: E402

DEFAULT_PARAMS = 64 * 2 ** 20
DEFAULT_TENSORS = 128
ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


@dataclasses.dataclass
class Case:
    name: str
    ours: Callable[[], object]
    torch: Callable[[], object]
    ours_bytes_per_param: int
    torch_bytes_per_param: int


def _params(n: int, t: int, device, dtype, grad_dtype=None) -> list[torch.nn.Parameter]:
    size = n // t
    params = [torch.nn.Parameter(torch.randn(size, device=device).to(dtype)) for _ in range(t)]
    for p in params:
        p.grad = torch.randn(size, device=device).to(grad_dtype or dtype) * 1e-2
    return params


def adamw_fp32(n, t, device) -> Case:
    ours = FusedAdamW(_params(n, t, device, torch.float32), **ADAMW)
    theirs = torch.optim.AdamW(_params(n, t, device, torch.float32), **ADAMW, fused=True)
    return Case("adamw-fp32", ours.step, theirs.step, 28, 28)


def adamw_bf16_master(n, t, device) -> Case:
    ours = FusedAdamW(_params(n, t, device, torch.bfloat16), **ADAMW, master_weights=True)
    params = _params(n, t, device, torch.bfloat16)
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    for m in masters:
        m.grad = torch.empty_like(m)
    theirs = torch.optim.AdamW(masters, **ADAMW, fused=True)

    @torch.no_grad()
    def torch_step():
        torch._foreach_copy_([m.grad for m in masters], [p.grad for p in params])
        theirs.step()
        torch._foreach_copy_(params, masters)

    return Case("adamw-bf16-master", ours.step, torch_step, 28, 40)


def clip(n, t, device, active: bool) -> Case:
    """max_norm far above the norm (nothing to scale), or 1% lower at every call, so that every call scales
    (with a fixed max_norm the gradients would be within it after the first call)."""
    def clipper(fn, params):
        calls = itertools.count(1)
        return lambda: fn(params, 0.99 ** next(calls) if active else 1e30)

    ours, theirs = _params(n, t, device, torch.float32), _params(n, t, device, torch.float32)
    return Case("clip-active" if active else "clip-noop", clipper(clip_grad_norm_, ours),
                clipper(functools.partial(torch.nn.utils.clip_grad_norm_, foreach=True), theirs),
                12 if active else 4, 12)


def norm(n, t, device) -> Case:
    grads = [p.grad for p in _params(n, t, device, torch.float32)]
    return Case("norm", lambda: global_grad_norm(grads),
                lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0))), 4, 4)


CASES = {"adamw-fp32": adamw_fp32, "adamw-bf16-master": adamw_bf16_master,
         "clip-noop": lambda n, t, d: clip(n, t, d, False), "clip-active": lambda n, t, d: clip(n, t, d, True),
         "norm": norm}


# ---------------------------------------------------------------------------------------------------------
# Timing (benchmarks/ab.py): every side's timing is `iters` back-to-back calls between two device syncs.

def looped(fn: Callable[[], object]) -> Callable[[int], None]:
    """fn as a side of ab.run_ab: called with n, it calls fn n times."""
    def run(n: int) -> None:
        for _ in range(n):
            fn()
    return run


class Reference:
    """The bandwidth references, timed in every repeat next to the kernels (so that both see the same machine
    load): a copy, dst.copy_(src), and an in-place update, x.mul_(1.0), which reads and writes the same lines as
    AdamW does its p, m and v, and so pays no write-allocate. Both move 2 x nbytes."""

    def __init__(self, device, nbytes: int = 2 ** 29):
        self.nbytes = nbytes
        self.src = torch.randn(nbytes // 4, device=device)
        self.dst = torch.empty_like(self.src)

    def copy(self):
        self.dst.copy_(self.src)

    def inplace(self):
        self.src.mul_(1.0)


def copy_bandwidth(device, repeats: int = 7) -> float:
    """Bytes read + written per second by a large tensor copy."""
    ref = Reference(device)
    ref.copy()
    copies = looped(ref.copy)
    return 2 * ref.nbytes / statistics.median(timed(lambda: copies(3), device=device)[0] / 3 for _ in range(repeats))


def compare(case: Case, n: int, repeats: int, iters: int, warmup: int, device, ref: Reference) -> dict:
    """Warm-up: each side called once per warm-up round; then `repeats` rounds, the sides forwards in even rounds
    and backwards in odd ones, each timing `iters` calls (seconds per call)."""
    sides = {"ours": looped(case.ours), "torch": looped(case.torch), "copy": looped(ref.copy),
             "inplace": looped(ref.inplace)}
    res = run_ab(sides, repeats, warmup, device=device, order="alternate", inputs=lambda i: (1 if i < 0 else iters,))
    times = {name: [t / iters for t in ts] for name, ts in res.times.items()}
    ratios = res.ratios("torch", "ours")  # the speed-up of each repeat (iters cancels)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    gbps = {"ours": case.ours_bytes_per_param * n / med["ours"], "torch": case.torch_bytes_per_param * n / med["torch"],
            "copy": 2 * ref.nbytes / med["copy"], "inplace": 2 * ref.nbytes / med["inplace"]}
    return {"case": case.name, "ours_ms": med["ours"] * 1e3, "torch_ms": med["torch"] * 1e3,
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "ours_best_ms": min(times["ours"]) * 1e3, "torch_best_ms": min(times["torch"]) * 1e3,
            "best_speedup": min(times["torch"]) / min(times["ours"]),
            "ours_bytes_per_param": case.ours_bytes_per_param, "torch_bytes_per_param": case.torch_bytes_per_param,
            **{f"{name}_GBps": value / 1e9 for name, value in gbps.items()},
            "ours_pct_copy_bw": 100 * gbps["ours"] / gbps["copy"], "torch_pct_copy_bw": 100 * gbps["torch"] / gbps["copy"],
            "ours_pct_inplace_bw": 100 * gbps["ours"] / gbps["inplace"]}


def machine(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run(args) -> dict:
    device = args.device
    ref = Reference(device)
    path = ext.LOADER.path(torch.device(device).type)
    result = {"device": device, "machine": machine(device), "torch": torch.__version__,
              "kernels": f"{path.kind}: {path.why}", "params": args.params, "tensors": args.tensors,
              "repeats": args.repeats, "iters": args.iters, "loadavg_start": _loadavg(), "rows": []}
    for name in args.cases:
        case = CASES[name](args.params, args.tensors, device)
        result["rows"].append(compare(case, args.params, args.repeats, args.iters, args.warmup, device, ref))
        if args.profile:  # after the timing: the profiled calls change the state (parameters, moments)
            result.setdefault("profiles", []).extend(
                profile(fn, args.iters, args.profile, f"{name}_{side}")
                for side, fn in (("ours", case.ours), ("torch", case.torch)))
        del case
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    result["loadavg_end"] = _loadavg()
    return result


def _fmt_load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "n/a"


def _loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: on a shared machine, how busy it was with other work."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def format_table(result: dict) -> str:
    lines = [f"{result['machine']} ({result['device']}), torch {result['torch']}, kernels {result['kernels']}",
             f"{result['params']:,} params in {result['tensors']} tensors; medians of {result['repeats']} interleaved "
             f"repeats x {result['iters']} calls (copy and in-place references timed in each repeat too); "
             f"1/5/15-min load average {_fmt_load(result['loadavg_start'])} at the start, "
             f"{_fmt_load(result['loadavg_end'])} at the end",
             "",
             "| case | ours ms | torch ms | speed-up: median of ratios [min, max] | best: ours / torch ms (ratio) | "
             "B/param ours / torch | GB/s ours / torch | copy / in-place GB/s | ours % of copy | torch % of copy | "
             "ours % of in-place |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['ours_ms']:.2f} | {r['torch_ms']:.2f} | {r['speedup']:.2f}x "
                     f"[{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | {r['ours_best_ms']:.2f} / "
                     f"{r['torch_best_ms']:.2f} ({r['best_speedup']:.2f}x) | {r['ours_bytes_per_param']} / "
                     f"{r['torch_bytes_per_param']} | {r['ours_GBps']:.1f} / {r['torch_GBps']:.1f} | "
                     f"{r['copy_GBps']:.1f} / {r['inplace_GBps']:.1f} | {r['ours_pct_copy_bw']:.0f}% | "
                     f"{r['torch_pct_copy_bw']:.0f}% | {r['ours_pct_inplace_bw']:.0f}% |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--params", type=int, default=DEFAULT_PARAMS, help="parameters in all (default: 64M)")
    p.add_argument("--tensors", type=int, default=DEFAULT_TENSORS, help="tensors they are split into (default 128)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    add_timing_args(p, repeats=7, warmup=2, with_json=False, repeats_help="interleaved ours/torch pairs (default: 7)",
                    warmup_help="untimed calls per side first (default: 2)")
    p.add_argument("--iters", type=int, default=None, help="calls per timing (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--out-json", default=None, help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    args.iters = args.iters or (20 if args.device == "cuda" else 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    write_json(args.out_json, result)
    return 0


# ---------------------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/ --benchmark-only`, on CPU. For each case, ours and torch's in one group
# (the table shows them side by side); extra_info holds the bytes moved, GB/s and the share of copy bandwidth.

PYTEST_ROUNDS = 5

try:
    import pytest
except ImportError:  # the script does not need pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def copy_bw() -> float:
        return copy_bandwidth("cpu")

    @pytest.fixture(scope="module", params=list(CASES))
    def case(request) -> Case:
        return CASES[request.param](DEFAULT_PARAMS, DEFAULT_TENSORS, "cpu")

    @pytest.mark.parametrize("side", ["ours", "torch"])
    def test_kernel(benchmark, case, side, copy_bw):
        fn = case.ours if side == "ours" else case.torch
        benchmark.group = f"{case.name}: {DEFAULT_PARAMS:,} params in {DEFAULT_TENSORS} tensors"
        benchmark.pedantic(fn, rounds=PYTEST_ROUNDS, warmup_rounds=1, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        nbytes = DEFAULT_PARAMS * (case.ours_bytes_per_param if side == "ours" else case.torch_bytes_per_param)
        gbps = nbytes / benchmark.stats.stats.median / 1e9
        benchmark.extra_info.update(bytes=nbytes, GBps=round(gbps, 2), copy_GBps=round(copy_bw / 1e9, 2),
                                    pct_of_copy_bw=round(100 * gbps * 1e9 / copy_bw, 1))


if __name__ == "__main__":
    sys.exit(main())
