"""Runs a test body on several real processes (gloo on CPU, NCCL when there are enough GPUs).

`run(fn, world)` spawns `world` processes that each call fn(rank, world) inside an initialised process group
and re-raises the first failure in the test process, with the failing rank's traceback.
"""
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_nccl(world: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def _entry(rank, world, port, fn, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    backend = "nccl" if use_nccl(world) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(rank, world)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run(fn, world: int) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(world, _free_port(), fn, errors), nprocs=world, join=True,
                           start_method="spawn")
    except mp.ProcessRaisedException:
        pass
    if not errors.empty():
        rank, tb = errors.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
