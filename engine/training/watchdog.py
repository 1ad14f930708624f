"""Hang and death reports: one line per job, naming the rank that stopped, instead of a traceback per rank.

Every rank keeps a logical clock of its progress (the step, and how many of the step's schedule actions it has
started) and what it is doing now. When a rank fails (a peer died: the collective or pipeline transfer it was in
raises) or its step runs past --step-timeout (a peer stalled: everyone waits), it raises a flag in the job's store
(the c10d store torchrun set up) and posts that state. Each rank's monitor thread polls the flag, so every live
rank - even one blocked in a collective - posts within a second. Then one rank prints one line: the ranks that
posted nothing (dead) or got least far (stalled), what the others were waiting in, and how to resume. Every rank
leaves with EXIT_FAULT.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch.distributed as dist

FAULT_FILE = "fault.txt"  # the job's one line, kept in runs/<name>/failures/
EXIT_FAULT = 3  # a rank died or stalled: restart with --auto-resume (python -m engine.launch does)
GRACE_S = 10.0  # how long a reporter waits for the other ranks' posts (live ones post within ~POLL_S)
POLL_S = 0.5    # how often each rank's monitor thread looks for the flag


def _job_store():
    """The default process group's store (torchrun's), or None (one process, or a torch without it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return dist.PrefixStore("engine-fault/", get()) if get else None
    except (RuntimeError, ValueError):
        return None


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


class JobMonitor:
    def __init__(self, rank: int, world: int, step_timeout: float | None, resume_hint: str,
                 failures_dir: str | None = None):
        """resume_hint: the end of the line (how to resume); failures_dir: where failed ranks keep tracebacks."""
        self.rank, self.world, self.step_timeout, self.resume_hint = rank, world, step_timeout, resume_hint
        self.failures_dir = failures_dir
        self.step, self.actions, self.doing = 0, 0, "starting"
        self.step_started = time.monotonic()
        self.store = _job_store() if world > 1 else None
        self._stop = threading.Event()
        self._reporting = threading.Lock()
        self.alone = False  # the report could not reach the other ranks
        self.thread = None

    # ---- progress (called by the trainer and the pipeline executor; cheap, no communication) --------------
    def begin_step(self, step: int) -> None:
        self.step, self.actions, self.doing, self.step_started = step, 0, "starting the step", time.monotonic()

    def action(self, what: str) -> None:
        self.actions += 1
        self.doing = what

    def phase(self, what: str, restart_clock: bool = False) -> None:
        """What this rank does now; restart_clock: a piece of work with its own --step-timeout (an evaluation, a
        save, a rollback), timed from here."""
        self.doing = what
        if restart_clock:
            self.step_started = time.monotonic()

    # ---- the watchdog --------------------------------------------------------------------------------------
    def start(self) -> None:
        if (self.step_timeout or self.store is not None) and self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="job-monitor", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            if self.step_timeout and time.monotonic() - self.step_started > self.step_timeout:
                self.report("stalled", f"step {self.step} ({self.doing}) ran past --step-timeout "
                                       f"{self.step_timeout:g} s")
            try:
                flagged = self.store is not None and self.store.check(["flag"])
            except Exception as exc:  # noqa: BLE001 - the store's host is gone: report what this rank knows
                self.store = None
                self.report("failed", f"the job's store is unreachable ({type(exc).__name__}: {exc})")
            if flagged:
                self.report("waiting", "another rank reported a fault")

    # ---- the report ----------------------------------------------------------------------------------------
    def report(self, kind: str, error: str) -> None:
        """Posts this rank's state, gathers the others' for up to GRACE_S, prints the job's one line (on one
        rank), and ends the process with EXIT_FAULT. kind: 'failed' (this rank's communication raised) or
        'stalled' (its step ran past the timeout)."""
        with self._reporting:  # the watchdog and the training thread may both get here
            states = self._exchange({"kind": kind, "step": self.step, "actions": self.actions,
                                     "doing": self.doing, "error": error[:300]})
            if self._claim_the_line():
                line = f"error: {self._summary(states)}; {self.resume_hint}"
                print(line, file=sys.stderr, flush=True)
                self._record(line)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_FAULT)

    def _record(self, line: str) -> None:
        """Keeps the job's line in failures_dir/fault.txt: `python -m engine.launch` reads it to tell a dead or
        stalled rank (exit 3) from other failures, where torchrun exits 1 for all of them."""
        if self.failures_dir:
            try:
                os.makedirs(self.failures_dir, exist_ok=True)
                with open(os.path.join(self.failures_dir, FAULT_FILE), "w") as fh:
                    fh.write(line + "\n")
            except OSError:
                pass

    def _claim_the_line(self) -> bool:
        """Whether this rank prints the job's line: the first to claim it in the store (ranks whose grace periods
        ended at different moments may have seen different posts), or this rank when the store is gone."""
        if self.alone:
            return True
        try:
            return self.store.add("printer", 1) == 1
        except Exception:  # noqa: BLE001
            return True

    def _exchange(self, mine: dict) -> dict[int, dict]:
        try:
            return self._exchange_through_store(mine)
        except Exception:  # noqa: BLE001 - no store (or it is gone): this rank speaks for itself
            self.alone = True
            return {self.rank: mine}

    def _exchange_through_store(self, mine: dict) -> dict[int, dict]:
        if self.store is None:
            raise RuntimeError("no store")
        self.store.set(f"rank{self.rank}", json.dumps(mine))
        self.store.set("flag", "1")
        deadline = time.monotonic() + GRACE_S
        states = {}
        while True:
            for r in range(self.world):
                if r not in states and self.store.check([f"rank{r}"]):
                    states[r] = json.loads(self.store.get(f"rank{r}"))
            if len(states) == self.world or time.monotonic() > deadline:
                return states
            time.sleep(0.1)

    def _summary(self, states: dict[int, dict]) -> str:
        if self.alone:
            mine = states[self.rank]
            return (f"rank {self.rank} at step {mine['step']} ({mine['doing']}): {mine['error']} (no word from the "
                    "other ranks: the job's store is unreachable)").replace("\n", " ")
        silent = [r for r in range(self.world) if r not in states]
        waiting = sorted(states)
        if silent:  # no post from them: they died (or hang where even the watchdog cannot run)
            culprits, verb = silent, "stopped without a word (killed or crashed)"
        else:  # everyone posted: the ranks that got least far are the ones the others wait for
            least = min((s["step"], s["actions"]) for s in states.values())
            culprits = [r for r, s in states.items() if (s["step"], s["actions"]) == least]
            verb = f"stalled at step {least[0]} ({states[culprits[0]]['doing']})"
        others = [r for r in waiting if r not in culprits]
        doing = sorted({states[r]["doing"] for r in others})
        about = f"; rank(s) {_ranges(others)} were in: {', '.join(doing[:3])}" if others else ""
        causes = [states[r] for r in waiting if states[r]["kind"] in ("failed", "stalled")]
        cause = f" (first report, step {causes[0]['step']}: {causes[0]['error']})" if causes else ""
        kept = any(s["kind"] == "failed" for s in states.values()) and self.failures_dir
        where = f"; tracebacks in {self.failures_dir}/" if kept else ""
        return f"rank {_ranges(culprits)} {verb}{about}{cause}{where}".replace("\n", " ")
