"""The parallel topology: degrees -> this rank's coordinates and its process groups.

Ranks are laid out as a grid over named axes, `arange(world).view(pp, dp, cp, tp)`: tensor parallelism innermost
(adjacent ranks, the fastest links), then context, data, and pipeline outermost. This object owns all rank
arithmetic - a rank's coordinates, the ranks along one or several axes, their process groups - so nothing else
indexes the grid. One object holds every group; nothing is stored in module globals, so several topologies can
live in one process (the tests build many).
"""
from __future__ import annotations

import datetime
import itertools

import torch
import torch.distributed as dist

AXES = ("pp", "dp", "cp", "tp")  # outermost to innermost
# The groups every rank builds (all ranks must create all groups, in the same order): one per axis, data x context
# (gradients of replicated parameters are reduced over both) and pipeline x tensor (the model-parallel group).
GROUPS = (("tp",), ("cp",), ("dp",), ("pp",), ("dp", "cp"), ("pp", "tp"))


class Topology:
    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1, vpp: int = 1, timeout_s: float = 600.0,
                 cp: int = 1, alone: bool = False):
        """alone: a one-process topology without groups even inside a larger job (each rank on its own)."""
        distributed = dist.is_initialized() and not alone
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        if tp * cp * pp * dp != world:
            raise ValueError(f"--tp {tp} x --cp {cp} x --pp {pp} x --dp {dp} = {tp * cp * pp * dp} does not equal "
                             f"the world size {world}; launch that many processes or change the degrees")
        self.tp, self.cp, self.pp, self.dp, self.vpp, self.world, self.rank = tp, cp, pp, dp, vpp, world, rank
        self.sizes = {"pp": pp, "dp": dp, "cp": cp, "tp": tp}
        self._grid = torch.arange(world).view(pp, dp, cp, tp)
        self.coords = dict(zip(AXES, (int(c) for c in (self._grid == rank).nonzero()[0])))
        self.pp_rank, self.dp_rank, self.cp_rank, self.tp_rank = (self.coords[a] for a in AXES)
        timeout = datetime.timedelta(seconds=timeout_s)
        self._made: dict[tuple, object] = {}  # member lists -> this rank's group (kinds that coincide share it)
        self._groups = {axes: self._build_groups(self._partition(axes), timeout) for axes in GROUPS}
        self.tp_group, self.cp_group, self.dp_group, self.pp_group = (self.group(a) for a in ("tp", "cp", "dp", "pp"))
        self.dp_cp_group, self.mp_group = self.group("dp", "cp"), self.group("pp", "tp")
        ends = [sorted({ranks[0], ranks[-1]}) for ranks in self._partition(("pp",))]  # first and last stage
        self.embedding_group = self._build_groups(ends, timeout)

    def rank_of(self, **coords: int) -> int:
        """The global rank at `coords` (axis=index); axes not named keep this rank's coordinates."""
        at = {**self.coords, **coords}
        return int(self._grid[tuple(at[a] for a in AXES)])

    def ranks_along(self, *axes: str) -> list[int]:
        """The global ranks that differ from this one only along `axes`, in grid order."""
        return [int(r) for r in self._grid[tuple(slice(None) if a in axes else self.coords[a] for a in AXES)].flatten()]

    def group(self, *axes: str):
        """This rank's process group over `axes` (one of GROUPS, in any order; None in a single process)."""
        return self._groups[tuple(a for a in AXES if a in axes)]

    def _partition(self, axes: tuple) -> list[list[int]]:
        """Every set of ranks that differ only along `axes`, in grid order."""
        others = [a for a in AXES if a not in axes]
        sets = []
        for fixed in itertools.product(*(range(self.sizes[a]) for a in others)):
            at = dict(zip(others, fixed))
            sets.append([int(r) for r in self._grid[tuple(slice(None) if a in axes else at[a]
                                                          for a in AXES)].flatten()])
        return sets

    def _build_groups(self, sets: list[list[int]], timeout):
        """Creates a group for each rank set (every rank creates all of them, in the same order) and returns the one
        holding this rank; None in a single process. A partition already built (cp 1 makes dp x cp the dp
        partition) is not built again."""
        key = tuple(map(tuple, sets))
        if self.world == 1 or key in self._made:
            return self._made.get(key)
        mine = None
        for ranks in sets:
            group = dist.new_group(ranks, timeout=timeout)
            if self.rank in ranks:
                mine = group
        self._made[key] = mine
        return mine

    @property
    def pipeline_ranks(self) -> list[int]:
        """The global ranks of this rank's pipeline, by stage (same dp, cp and tp coordinates)."""
        return self.ranks_along("pp")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"rank {self.rank}: tp {self.tp_rank}/{self.tp}, cp {self.cp_rank}/{self.cp}, pp {self.pp_rank}/"
                f"{self.pp}, dp {self.dp_rank}/{self.dp}")


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
