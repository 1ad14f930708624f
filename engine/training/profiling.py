"""--profile-steps: torch.profiler over a window of training steps, on the ranks chosen by --profile-ranks.

Each traced rank writes into runs/<name>/profile/:
- trace_rank{R}_steps{A}-{B}.json (A-B: the steps traced): the Chrome trace of the window (every operator, and on
  CUDA every kernel and copy on its stream), for https://ui.perfetto.dev or chrome://tracing;
- ops_rank{R}_steps{A}-{B}.txt: the operators ranked by their own time (on CUDA, their kernels' time), as
  torch.profiler's key_averages table, after a line with the share of the steps' time the GPU was busy;
- with --profile-memory on CUDA, memory_rank{R}_steps{A}-{B}.pickle: the caching allocator's history over the
  window, for https://pytorch.org/memory_viz (the trace also records allocations, on any device).
The window is whole steps with what follows them in the loop (evaluation, saves), started before step A and ended
before step B + 1, or when the loop ends (a stop signal, --time-limit); a failing run drops it unwritten.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch


class StepProfiler:
    """The window `steps` = (A, B): torch.profiler starts before step A (or the first step of the run within the
    window) and stops before step B + 1, or when the loop ends. Every rank follows the window; only `traced` ones
    profile. The files are named by the steps traced (a run resumed inside the window keeps the earlier files)."""

    def __init__(self, steps: tuple[int, int] | None, traced: bool, rank: int, device: torch.device,
                 memory: bool, out_dir: str):
        self.steps, self.traced, self.rank, self.device, self.memory = steps, traced, rank, device, memory
        self.out_dir = out_dir
        self.open = self.done = False
        self.first = self.last = 0  # the steps traced so far (a rollback inside the window replays some)
        self.busy: float | None = None  # on CUDA, once written: the share of the steps' time a kernel ran
        self.profiler = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def before_step(self, step: int) -> str | None:
        """Called before each step (1-based): "started" when the window opens here, "ending" when it is over and
        finish() is due."""
        if self.steps is None or self.done:
            return None
        start, end = self.steps
        if self.open and step > end:
            return "ending"
        if not self.open and start <= step <= end:
            self.open, self.first, self.last = True, step, step
            if self.traced:
                self._start()
            return "started"
        if self.open:
            self.first, self.last = min(self.first, step), max(self.last, step)
        return None

    def label(self, name: str):
        """A named range in the trace while tracing (a step, so that the viewer shows where each begins)."""
        return torch.profiler.record_function(name) if self.profiler is not None else contextlib.nullcontext()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.memory:
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self.profiler = torch.profiler.profile(activities=activities, profile_memory=self.memory)
        self.profiler.start()

    def finish(self) -> None:
        """Ends the open window and writes this rank's files (one window per run); a failed write is one warning."""
        profiler, self.profiler, self.open, self.done = self.profiler, None, False, True
        if profiler is None:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
        profiler.stop()
        try:
            self._write(profiler)
        except Exception as exc:  # (like a failed plot: one warning, never a failed run)
            print(f"warning: rank {self.rank} could not write its --profile-steps trace to {self.out_dir}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            if self.cuda and self.memory:
                torch.cuda.memory._record_memory_history(enabled=None)

    def discard(self) -> None:
        """Drops an open window without waiting for the device or writing (the run is failing)."""
        profiler, self.profiler, self.open, self.done = self.profiler, None, False, True
        if profiler is not None:
            with contextlib.suppress(Exception):
                profiler.stop()

    @property
    def tag(self) -> str:
        return f"steps{self.first}-{self.last}"

    def _write(self, profiler) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        tag = f"rank{self.rank}_{self.tag}"
        trace = os.path.join(self.out_dir, f"trace_{tag}.json")
        profiler.export_chrome_trace(trace)
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        self.busy = device_busy_fraction(trace) if self.cuda else None
        with open(os.path.join(self.out_dir, f"ops_{tag}.txt"), "w") as fh:
            if self.busy is not None:
                fh.write(f"GPU busy {100 * self.busy:.1f}% of the traced steps' time (kernels on any stream)\n")
            fh.write(profiler.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")
        if self.cuda and self.memory:
            torch.cuda.memory._dump_snapshot(os.path.join(self.out_dir, f"memory_{tag}.pickle"))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def device_busy_fraction(trace_path: str) -> float | None:
    """The share of the traced steps' time (their `train step N` ranges) in which at least one GPU kernel ran, on
    any stream, from a Chrome trace; None when it holds no kernel or no step. Under 1, the device waited on the
    host (launches, Python, synchronisations) or on communication outside kernels."""
    with open(trace_path) as fh:
        events = [e for e in json.load(fh)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    span = lambda e: (float(e["ts"]), float(e["ts"]) + float(e["dur"]))  # noqa: E731
    steps = _union([span(e) for e in events if str(e.get("name", "")).startswith("train step ")])
    kernels = _union([span(e) for e in events if e.get("cat") == "kernel"])
    if not steps or not kernels:
        return None
    busy, i, j = 0.0, 0, 0
    while i < len(steps) and j < len(kernels):  # both sorted and disjoint: one pass over each
        (lo, hi), (a, b) = steps[i], kernels[j]
        busy += max(0.0, min(hi, b) - max(lo, a))
        i, j = (i + 1, j) if hi <= b else (i, j + 1)
    return busy / sum(hi - lo for lo, hi in steps)
