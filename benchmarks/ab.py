"""The A/B timing harness the benchmark scripts share: interleaved rounds, a barrier before every timed call, the
slowest rank's time, medians and quartiles of per-pair ratios, ``--repeats --warmup --json --profile``, profiles
and markdown tables.

A comparison is a dict of named sides (zero-argument callables unless ``inputs`` is given). ``run_ab`` warms every
side up, then runs rounds; in round r the sides run in rotated order (two sides: the order flips every round), so
machine noise hits all of them alike. Each call is timed by ``timed``: barrier (when torch.distributed is
initialised), device sync, ``time.perf_counter`` around the call, sync, then the maximum over the ranks (a step
takes as long as its slowest rank). The figure to read is the median of the per-pair ratios a / b (same round,
same call index), with its quartiles, which is robust to a noisy pair.

Scripts import it as ``from ab import ...`` (benchmarks/ is on sys.path when a script runs); from the repository
root it is also ``benchmarks.ab``. No global state: everything a run measured is in its ``ABResult``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

ORDERS = ("rotate", "alternate", "fixed")
UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6}


# ---------------------------------------------------------------------------------------------------------
# Command line and output.

def add_timing_args(parser, repeats: int = 10, warmup: int = 2, *, with_json: bool = True, with_profile: bool = True,
                    repeats_help: str | None = None, warmup_help: str | None = None) -> None:
    """Adds --repeats, --warmup, --json PATH (write the results as JSON) and --profile DIR (torch.profiler traces).
    A script whose --json already means something else (print JSON instead of a table) passes with_json=False;
    one without a profile passes with_profile=False."""
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=repeats_help or f"timed rounds (default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=warmup_help or f"untimed calls per side first (default {warmup})")
    if with_json:
        parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON to PATH (rank 0)")
    if with_profile:
        parser.add_argument("--profile", default=None, metavar="DIR",
                            help="profile a few calls of each side with torch.profiler into DIR (chrome traces)")


def write_json(path: str | None, payload: dict) -> None:
    """Writes payload to path as indented JSON: on rank 0 only when torch.distributed is initialised; nothing when
    path is None."""
    if path is None or (_distributed() and dist.get_rank() != 0):
        return
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)


def finish(payload: dict, json_path: str | None) -> int:
    """The end of a distributed benchmark: rank 0 writes payload to json_path (when given), then every rank leaves
    the process group. Returns the exit status."""
    write_json(json_path, payload)
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------------------
# Timing.

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(group) -> torch.device:
    """Where the small tensors of the reductions live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync(device=None) -> None:
    """torch.cuda.synchronize when the device is CUDA (device None: when CUDA is in use in this process); nothing
    on the CPU."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable, args: tuple, group, device) -> tuple[float, float, object]:
    """One call on this rank, after a barrier: (wall seconds, process CPU seconds, fn's return value)."""
    if _distributed():
        dist.barrier(group=group)
    sync(device)
    cpu0, start = time.process_time(), time.perf_counter()
    value = fn(*args)
    sync(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return wall, cpu, value


def _over_ranks(wall: float, cpu: float, group) -> tuple[float, float]:
    """(the slowest rank's wall seconds, CPU seconds summed over the ranks); this rank's own when not distributed."""
    if not _distributed():
        return wall, cpu
    mine = torch.tensor([wall, cpu], dtype=torch.float64, device=_comm_device(group))
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return max(float(t[0]) for t in everyone), sum(float(t[1]) for t in everyone)


def timed(fn: Callable, group=None, device=None) -> tuple[float, object]:
    """Times fn(): a barrier when torch.distributed is initialised, perf_counter around the call (with a device
    sync before and after), then the maximum over the ranks. Returns (seconds, fn's return)."""
    wall, cpu, value = _measure(fn, (), group, device)
    return _over_ranks(wall, cpu, group)[0], value


def round_order(names: list[str], r: int, order: str = "rotate") -> list[str]:
    """The order the sides run in round r: "rotate" starts at side r mod n (two sides: flips every round),
    "alternate" runs them forwards in even rounds and backwards in odd ones, "fixed" always as given."""
    if order == "rotate":
        k = r % len(names)
        return names[k:] + names[:k]
    if order == "alternate":
        return list(names) if r % 2 == 0 else list(reversed(names))
    if order == "fixed":
        return list(names)
    raise ValueError(f"order must be one of {ORDERS}, not {order!r}")


def run_ab(sides: dict[str, Callable], repeats: int, warmup: int, calls_per_repeat: int = 1, group=None, device=None,
           *, order: str = "rotate", inputs: Callable[[int], tuple] | None = None,
           before: Callable[[str], None] | None = None, after: Callable[[str, float], None] | None = None,
           keep_values: bool = False) -> ABResult:
    """Warm-up: `warmup` rounds in which each side is called once, in the order given (not recorded). Then
    `repeats` rounds; in round r the sides run in round_order(names, r, order), each side called calls_per_repeat
    times in its turn, each call timed as `timed` does it (barrier, sync, perf_counter, slowest rank).

    inputs(i): the positional arguments of every side's calls in round i (the same for all sides, so they do equal
    work); warm-up rounds are i = -warmup .. -1. before(name): called before each call (warm-up included), outside
    the timed region and before the barrier (e.g. zeroing gradients). after(name, seconds): called after each timed
    call with this rank's own wall seconds (the result keeps the slowest rank's). keep_values: keep what the
    calls returned in result.values / result.warmup_values."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    names = list(sides)
    result = ABResult({n: [] for n in names}, {n: [] for n in names}, repeats, warmup, calls_per_repeat, order)
    if keep_values:
        result.values, result.warmup_values = {n: [] for n in names}, {n: [] for n in names}

    def call(name: str, i: int) -> tuple[float, float, object]:
        if before is not None:
            before(name)
        return _measure(sides[name], inputs(i) if inputs is not None else (), group, device)

    for w in range(warmup):
        for name in names:
            value = call(name, w - warmup)[2]
            if keep_values:
                result.warmup_values[name].append(value)
    for r in range(repeats):
        for name in round_order(names, r, order):
            for _ in range(calls_per_repeat):
                wall, cpu, value = call(name, r)
                slowest, cpu_all = _over_ranks(wall, cpu, group)
                result.times[name].append(slowest)
                result.cpu_times[name].append(cpu_all)
                if keep_values:
                    result.values[name].append(value)
                if after is not None:
                    after(name, wall)
    return result


# ---------------------------------------------------------------------------------------------------------
# Results.

def quartiles(xs: list[float]) -> list[float]:
    """[q1, median, q3] (statistics.quantiles, n=4); [x, x, x] for a single value."""
    xs = list(xs)
    if not xs:
        raise ValueError("no values")
    return statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3


@dataclasses.dataclass
class ABResult:
    """What run_ab measured. times[side]: every timed call in order (round by round, calls_per_repeat per round),
    seconds of the slowest rank; cpu_times[side]: the same calls' process CPU seconds summed over the ranks.
    values / warmup_values: what the calls returned, when run_ab was asked to keep them (not in to_dict)."""

    times: dict[str, list[float]]
    cpu_times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    repeats: int = 0
    warmup: int = 0
    calls_per_repeat: int = 1
    order: str = "rotate"
    values: dict[str, list] = dataclasses.field(default_factory=dict, repr=False)
    warmup_values: dict[str, list] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def sides(self) -> list[str]:
        return list(self.times)

    def _series(self, side: str, cpu: bool) -> list[float]:
        return (self.cpu_times if cpu else self.times)[side]

    def median(self, side: str, cpu: bool = False) -> float:
        return statistics.median(self._series(side, cpu))

    def best(self, side: str, cpu: bool = False) -> float:
        """The fastest call (less sensitive than the median to other jobs on a shared machine)."""
        return min(self._series(side, cpu))

    def quartiles(self, side: str, cpu: bool = False) -> list[float]:
        return quartiles(self._series(side, cpu))

    def round_means(self, side: str, cpu: bool = False) -> list[float]:
        """Mean time of the side's calls_per_repeat calls in each round."""
        xs, n = self._series(side, cpu), self.calls_per_repeat
        return [sum(xs[i:i + n]) / n for i in range(0, len(xs), n)]

    def ratios(self, a: str, b: str, cpu: bool = False) -> list[float]:
        """Per-pair ratios a / b: the calls of the same round and the same call index."""
        return [x / y for x, y in zip(self._series(a, cpu), self._series(b, cpu))]

    def ratio_summary(self, a: str, b: str, cpu: bool = False) -> dict:
        """{"median", "q1", "q3", "pairs"} of the per-pair ratios a / b."""
        rs = self.ratios(a, b, cpu)
        q1, med, q3 = quartiles(rs)
        return {"median": statistics.median(rs), "q1": q1, "q3": q3, "pairs": len(rs)}

    def split(self, blocks: int) -> list[ABResult]:
        """The rounds cut into `blocks` consecutive equal blocks (e.g. one per repeat of a script's table)."""
        if blocks <= 0 or self.repeats % blocks:
            raise ValueError(f"{self.repeats} rounds do not split into {blocks} blocks")
        n = self.repeats // blocks * self.calls_per_repeat

        def cut(d: dict, k: int) -> dict:
            return {s: xs[k * n:(k + 1) * n] for s, xs in d.items()}

        return [ABResult(cut(self.times, k), cut(self.cpu_times, k), self.repeats // blocks, 0, self.calls_per_repeat,
                         self.order, cut(self.values, k)) for k in range(blocks)]

    def to_dict(self) -> dict:
        """JSON-ready: the settings, every time, and per side its median, quartiles and best (seconds)."""
        summary = {s: dict(zip(("q1", "median", "q3"), self.quartiles(s)), best=self.best(s))
                   for s in self.sides if self.times[s]}
        return {"sides": self.sides, "repeats": self.repeats, "warmup": self.warmup,
                "calls_per_repeat": self.calls_per_repeat, "order": self.order, "times_s": self.times,
                "cpu_times_s": self.cpu_times, "summary_s": summary}

    @classmethod
    def from_dict(cls, d: dict) -> ABResult:
        return cls({s: list(d["times_s"][s]) for s in d["sides"]}, {s: list(v) for s, v in d["cpu_times_s"].items()},
                   d["repeats"], d["warmup"], d["calls_per_repeat"], d["order"])


def _num(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"


def markdown_table(result: ABResult, baseline: str, unit: str = "ms") -> str:
    """One row per side: median, q1-q3 and the ratio to `baseline` (median of the per-pair ratios, with their
    quartiles)."""
    scale = UNITS[unit]
    lines = [f"| side | median {unit} | q1-q3 {unit} | ratio to {baseline} (median per-pair, q1-q3) |",
             "|---|---:|---:|---:|"]
    for side in result.sides:
        q1, med, q3 = (x * scale for x in result.quartiles(side))
        r = result.ratio_summary(side, baseline)
        ratio = "1.000" if side == baseline else f"{r['median']:.3f} ({r['q1']:.3f}-{r['q3']:.3f})"
        lines.append(f"| {side} | {_num(med)} | {_num(q1)}-{_num(q3)} | {ratio} |")
    return "\n".join(lines)


def repeat_table(result: ABResult, a: str, b: str, repeats: int, labels: tuple[str, str] | None = None,
                 unit: str = "ms") -> tuple[str, list[dict]]:
    """The per-repeat table of the distributed scripts: for each block of rounds, the medians of a and b and the
    median per-pair ratio a / b; then all pairs (ratio in bold) and the best calls. Returns (markdown, rows), a row
    being {"repeat", "a", "b", "ratio"} in `unit`."""
    la, lb = labels or (a, b)
    scale = UNITS[unit]
    rows = [{"repeat": k, "a": blk.median(a) * scale, "b": blk.median(b) * scale,
             "ratio": statistics.median(blk.ratios(a, b))} for k, blk in enumerate(result.split(repeats))]
    pairs = len(result.ratios(a, b))
    lines = [f"| repeat | {la} {unit}/step (median) | {lb} {unit}/step (median) | median per-pair ratio {la}/{lb} |",
             "|---|---|---|---|"]
    lines += [f"| {row['repeat']} | {row['a']:.1f} | {row['b']:.1f} | {row['ratio']:.3f} |" for row in rows]
    lines.append(f"| all ({pairs} pairs) | {result.median(a) * scale:.1f} | {result.median(b) * scale:.1f} | "
                 f"**{result.ratio_summary(a, b)['median']:.3f}** |")
    lines.append(f"| min | {result.best(a) * scale:.1f} | {result.best(b) * scale:.1f} | "
                 f"{result.best(a) / result.best(b):.3f} |")
    return "\n".join(lines), rows


# ---------------------------------------------------------------------------------------------------------
# Profiles.

def profile(fn: Callable, steps: int, out_dir: str, name: str, row_limit: int = 30) -> str:
    """Runs fn() `steps` times under torch.profiler (CPU, and CUDA when available) and exports a chrome trace
    out_dir/<name>.trace.json; the operator table (by self time) goes next to it as out_dir/<name>.txt
    (see profile_table). Returns the trace's path."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync()
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name.replace(os.sep, "_"))
    prof.export_chrome_trace(base + ".trace.json")
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(base + ".txt", "w") as fh:
        fh.write(prof.key_averages().table(sort_by=sort_by, row_limit=row_limit))
    return base + ".trace.json"


def profile_table(trace_path: str) -> str:
    """The operator table profile() wrote next to the trace at trace_path."""
    with open(trace_path[:-len(".trace.json")] + ".txt") as fh:
        return fh.read()
