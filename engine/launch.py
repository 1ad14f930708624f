"""Restart loop for a training job: `python -m engine.launch --nproc-per-node 8 [--max-restarts 3] -- FLAGS`.

Each attempt is a fresh `torchrun -m engine.training FLAGS --auto-resume`: it resumes from `--save`'s latest
checkpoint (the first attempt starts fresh, or from --load), so a job whose rank died, was killed or was preempted
continues where its last checkpoint left it, losing at most --save-interval steps. A fresh torchrun per attempt
works on every torch >= 2.4 (torchrun's own --max-restarts re-rendezvous fails at >= 4 gloo processes on some
versions). The flags are validated once before the first attempt (a bad flag exits 2 without launching). The
first failed attempt is always retried; a later one that ends without moving `latest` forward is not (the
failure repeats where it stands: a diverged run, a broken node). SIGTERM / SIGINT are passed on to the running
attempt (it saves and exits) and end the loop. The exit code is the last attempt's, except that a dead or stalled
rank (reported by the job's one line) gives 3 where torchrun itself gives 1. `--inject-fault` applies to the first
attempt only (drills). Every attempt gets the job's start time ($ENGINE_JOB_START), from which `--time-limit` counts.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from engine.training import checkpoint as ckpt
from engine.training.config import (
    JOB_START_ENV,
    exit_on_config_error,
    parse_config,
    preflight,
    run_dir,
    save_dir,
    validate,
)
from engine.training.watchdog import EXIT_FAULT, FAULT_FILE


def without_faults(flags: list[str]) -> list[str]:
    """FLAGS minus --inject-fault and its values."""
    out, skipping = [], False
    for token in flags:
        if token.startswith("--inject-fault="):
            continue
        if token == "--inject-fault":
            skipping = True
        elif skipping and not token.startswith("--"):
            continue
        else:
            skipping = False
            out.append(token)
    return out


def attempt_command(args, flags: list[str]) -> list[str]:
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc_per_node}"]
    if args.nnodes == 1:
        run.append("--standalone")
    else:
        run += [f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={args.rdzv_endpoint}", f"--rdzv_id={args.rdzv_id}"]
    return run + ["-m", "engine.training"] + flags + ["--auto-resume"]


stopping = False  # a SIGTERM / SIGINT reached the launcher: passed on to the attempt, and no restart after it


def run_attempt(command: list[str]) -> int:
    """Runs one attempt; SIGTERM and SIGINT are passed on to it (the job saves and exits), and waited for."""
    global stopping
    child = subprocess.Popen(command)

    def forward(signum, frame):
        global stopping
        stopping = True
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fault_reported(cfg, since: float) -> bool:
    """Whether this node's ranks reported a dead or stalled rank (the job's one line) since `since`: torchrun exits
    1 for any failed worker; the launcher passes EXIT_FAULT (3) on instead."""
    try:
        return os.path.getmtime(os.path.join(run_dir(cfg), "failures", FAULT_FILE)) >= since
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc-per-node", type=int, default=1)
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--rdzv-endpoint", default="localhost:29500", help="multi-node: host:port of node 0")
    ap.add_argument("--rdzv-id", default="engine", help="multi-node: a job id shared by the nodes")
    ap.add_argument("--max-restarts", type=int, default=3, help="attempts after the first [3]")
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the training flags (as for pretrain_llama.py)")
    args = ap.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    world = args.nproc_per_node * args.nnodes

    def check():
        cfg = parse_config(flags + ["--auto-resume"])
        validate(cfg, world)
        preflight(cfg)
        return cfg

    cfg = exit_on_config_error(check)
    where = save_dir(cfg)
    os.environ.setdefault(JOB_START_ENV, repr(time.time()))  # every attempt's --time-limit counts from here
    for attempt in range(args.max_restarts + 1):
        before, started = ckpt.latest_step(where), time.time()
        code = run_attempt(attempt_command(args, flags if attempt == 0 else without_faults(flags)))
        if code in (-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT) or stopping:
            return code  # stopped on purpose: the job has saved
        if code == 0:
            return 0
        if fault_reported(cfg, started - 1):  # (file times may be coarser than time.time())
            code = EXIT_FAULT
        after = ckpt.latest_step(where)
        stalled = attempt > 0 and after == before
        verdict = ("no progress since the last attempt: not retrying" if stalled else
                   "out of restarts" if attempt == args.max_restarts else
                   f"restarting from {where} (step {after or 0}) with --auto-resume")
        print(f"engine.launch: attempt {attempt + 1} exited with code {code}; latest checkpoint: step "
              f"{after if after is not None else 'none'}; {verdict}", file=sys.stderr, flush=True)
        if stalled or attempt == args.max_restarts:
            return code
    return 1


if __name__ == "__main__":
    sys.exit(main())
