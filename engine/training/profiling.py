"""--profile-steps: torch.profiler over a window of training steps, on the ranks chosen by --profile-ranks.

Each traced rank writes into runs/<name>/profile/:
- trace_rank{R}_steps{A}-{B}.json: the Chrome trace of the window (every operator, and on CUDA every kernel and
  copy on its stream), for https://ui.perfetto.dev or chrome://tracing;
- ops_rank{R}_steps{A}-{B}.txt: the operators ranked by their own time (on CUDA, their kernels' time), as
  torch.profiler's key_averages table;
- with --profile-memory on CUDA, memory_rank{R}_steps{A}-{B}.pickle: the caching allocator's history over the
  window, for https://pytorch.org/memory_viz (the trace also records allocations, on any device).
The window is whole steps with what follows them in the loop (evaluation, saves), started before step A and ended
before step B + 1 or when the loop ends.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch


class StepProfiler:
    """The window `steps` = (A, B): torch.profiler starts before step A and stops before step B + 1 (or at close),
    then writes the files above. Every rank follows the window; only `traced` ones profile."""

    def __init__(self, steps: tuple[int, int] | None, traced: bool, rank: int, device: torch.device,
                 memory: bool, out_dir: str):
        self.steps, self.traced, self.rank, self.device, self.memory = steps, traced, rank, device, memory
        self.out_dir = out_dir
        self.open = self.failed = False
        self.profiler = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def before_step(self, step: int) -> str | None:
        """Called before each step (1-based): "started" or "ended" when the window opens or closes here."""
        if self.steps is None:
            return None
        start, end = self.steps
        if not self.open and start <= step <= end:
            self.open = True
            if self.traced:
                self._start()
            return "started"
        if self.open and step > end:
            self.close()
            return "ended"
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

    def close(self) -> bool:
        """Ends an open window (one cut short when the loop ends early) and writes this rank's files; one window per
        run. True when a window was open."""
        if not self.open:
            return False
        self.open, profiler, self.profiler = False, self.profiler, None
        window, self.steps = self.steps, None
        if profiler is None:
            return True
        if self.cuda:
            torch.cuda.synchronize(self.device)
        profiler.stop()
        try:
            self._write(profiler, window)
        except Exception as exc:  # (like a failed plot: one warning, never a failed run or a hidden error)
            self.failed = True
            print(f"warning: rank {self.rank} could not write its --profile-steps trace to {self.out_dir}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            if self.cuda and self.memory:
                torch.cuda.memory._record_memory_history(enabled=None)
        return True

    def _write(self, profiler, window: tuple[int, int]) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        tag = f"rank{self.rank}_steps{window[0]}-{window[1]}"
        profiler.export_chrome_trace(os.path.join(self.out_dir, f"trace_{tag}.json"))
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        with open(os.path.join(self.out_dir, f"ops_{tag}.txt"), "w") as fh:
            fh.write(profiler.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")
        if self.cuda and self.memory:
            torch.cuda.memory._dump_snapshot(os.path.join(self.out_dir, f"memory_{tag}.pickle"))
