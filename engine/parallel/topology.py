"""The parallel topology: degrees -> this rank's coordinates and its process groups.

Ranks are laid out as a grid `arange(world).view(pp, dp, tp)`: tensor parallelism innermost (adjacent ranks,
the fastest links), pipeline outermost. One object holds every group; nothing is stored in module globals, so
several topologies can live in one process (the tests build many).
"""
from __future__ import annotations

import datetime
import itertools

import torch
import torch.distributed as dist


class Topology:
    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1, vpp: int = 1, timeout_s: float = 600.0):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if tp * pp * dp != world:
            raise ValueError(f"--tp {tp} x --pp {pp} x --dp {dp} = {tp * pp * dp} does not equal the world size "
                             f"{world}; launch that many processes or change the degrees")
        self.tp, self.pp, self.dp, self.vpp, self.world, self.rank = tp, pp, dp, vpp, world, rank
        self.grid = torch.arange(world).view(pp, dp, tp)
        self.pp_rank, self.dp_rank, self.tp_rank = (int(c) for c in (self.grid == rank).nonzero()[0])
        timeout = datetime.timedelta(seconds=timeout_s)
        self.tp_group = self._groups(lambda p, d: self.grid[p, d, :], pp, dp, timeout)
        self.dp_group = self._groups(lambda p, t: self.grid[p, :, t], pp, tp, timeout)
        self.pp_group = self._groups(lambda d, t: self.grid[:, d, t], dp, tp, timeout)
        self.mp_group = self._groups(lambda d, _: self.grid[:, d, :].flatten(), dp, 1, timeout)
        self.embedding_group = self._groups(lambda d, t: self.grid[[0, pp - 1], d, t].unique(), dp, tp, timeout)

    def _groups(self, members, n0: int, n1: int, timeout):
        """Creates every group of one kind (all ranks must call new_group for all of them, in the same order)
        and returns the one containing this rank (None when the world is a single process)."""
        mine = None
        for i, j in itertools.product(range(n0), range(n1)):
            ranks = [int(r) for r in members(i, j)]
            if self.world == 1:
                continue
            group = dist.new_group(ranks, timeout=timeout)
            if self.rank in ranks:
                mine = group
        return mine

    @property
    def pipeline_ranks(self) -> list[int]:
        """The global ranks of this rank's pipeline, by stage (same dp and tp coordinates)."""
        return [int(r) for r in self.grid[:, self.dp_rank, self.tp_rank]]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"rank {self.rank}: tp {self.tp_rank}/{self.tp}, pp {self.pp_rank}/{self.pp}, "
                f"dp {self.dp_rank}/{self.dp}")


def init_distributed(timeout_s: float = 600.0, device: str | None = None) -> tuple[int, int]:
    """Initialises the default process group from torchrun's environment (NCCL with CUDA, else gloo).
    Returns (rank, world size); a single process without torchrun needs no process group."""
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
