"""Runs a test body on several real processes (gloo by default; NCCL on request when there are enough GPUs).

`run(fn, world)` spawns `world` processes that each call fn(rank, world) inside an initialised process group.
The test fails when any rank fails to start, raises anywhere (process-group init, the body, teardown), or exits
without reporting success (a non-zero exit code, a signal, os._exit): the message names every failed rank with
its traceback or exit status. As soon as one rank fails the others are terminated, so a peer left waiting in a
collective or a rendezvous for the dead rank cannot hang the test.
"""
import datetime
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Bounds the rendezvous and every collective on the default group. Far above any wait in a real test body (the
# ranks of a body run the same steps), far below the 30 minutes a stuck peer would otherwise cost.
TIMEOUT = datetime.timedelta(minutes=5)
# after the first failure: how long the other ranks get to finish reporting before they are terminated
GRACE_S = 2.0


def use_nccl(world: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def resolve_backend(backend: str, world: int) -> str:
    if backend == "auto":
        return "nccl" if use_nccl(world) else "gloo"
    return backend


def _entry(rank, world, port, backend, fn, conn):
    """One rank: reports ("ok",) or ("error", traceback) on conn, then leaves through os._exit, skipping the
    interpreter's teardown (gloo's worker threads can abort a finished process there; the body's verdict is
    already reported)."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=TIMEOUT)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
        # no body starts before every rank is through init: a fast rank leaving early would break a slow rank's
        # connection set-up (seen under load), failing it in init instead of where the test looks
        store.set(f"initialised/{rank}", "1")
        store.wait([f"initialised/{r}" for r in range(world)])
        fn(rank, world)
        if torch.__version__ >= (2, 5):  # torch 2.4's gloo teardown can hang one rank (after ring attention at 4)
            dist.destroy_process_group()
        message, code = ("ok",), 0
    except BaseException:  # noqa: B036 - SystemExit and KeyboardInterrupt in a body are failures too
        message, code = ("error", traceback.format_exc()), 1
    try:
        conn.send(message)
        conn.close()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        return f"killed by signal {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def run(fn, world: int, backend: str = "gloo") -> None:
    """fn(rank, world) on `world` fresh processes. backend: "gloo", "nccl", or "auto" (NCCL when there is a GPU
    per rank, else gloo). fn must be picklable (a module-level function or a functools.partial of one)."""
    backend = resolve_backend(backend, world)
    ctx = mp.get_context("spawn")
    # the parent holds the rendezvous store on a port the OS picks: no race for a free port between tests
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    procs, conns = [], []
    try:
        for rank in range(world):
            receive, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_entry, args=(rank, world, store.port, backend, fn, send),
                            name=f"rank {rank}")
            p.start()
            send.close()
            procs.append(p)
            conns.append(receive)
        failures = _join(procs, conns)
    finally:
        for p in procs:  # the survivors of a failure (and everything on an interrupt)
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        del store
    if failures:
        raise AssertionError("\n".join(f"rank {rank} failed: {why}" for rank, why in failures))


def _join(procs, conns) -> list[tuple[int, str]]:
    """Waits for every rank; returns [(rank, why)] of the failed ones, in the order seen. After the first
    failure the others get GRACE_S to finish or report; the caller then terminates them."""
    reports: dict[int, tuple] = {}
    failures: list[tuple[int, str]] = []
    live, listening = set(range(len(procs))), set(range(len(procs)))
    deadline = None
    while live:
        # the pipes too: a long traceback fills a pipe, and its sender cannot exit until it is read
        waitables = {procs[r].sentinel: ("exit", r) for r in live}
        waitables.update({conns[r]: ("report", r) for r in listening})
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(list(waitables), timeout)
        if not ready:
            break  # the grace period is over
        events = [waitables[w] for w in ready]
        for rank in [r for kind, r in events if kind == "report"] + [r for kind, r in events if kind == "exit"]:
            if rank in listening and conns[rank].poll():
                try:
                    reports[rank] = conns[rank].recv()
                except (EOFError, OSError):  # closed: the rank has exited or is exiting
                    listening.discard(rank)
        for rank in sorted(r for kind, r in events if kind == "exit"):
            procs[rank].join()
            live.discard(rank)
            listening.discard(rank)
            failure = _verdict(reports.get(rank), procs[rank].exitcode)
            if failure:
                failures.append((rank, failure))
        if failures and deadline is None:
            deadline = time.monotonic() + GRACE_S
    for rank in sorted(live):  # still running after the grace period; terminated next
        if reports.get(rank, ("",))[0] == "error":
            failures.append((rank, f"still running\n{reports[rank][1]}"))
    return failures


def _verdict(report, exitcode: int) -> str | None:
    """Why a finished rank failed, or None."""
    if report is not None and report[0] == "error":
        return f"{_describe(exitcode)}\n{report[1]}"
    if exitcode != 0 or report != ("ok",):
        return (f"{_describe(exitcode)} without reporting success (it died before its body returned, or before "
                "the process group was up; its stderr shows any output)")
    return None
