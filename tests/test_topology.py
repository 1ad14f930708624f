"""The topology's named axes: the grid order (tp innermost, then cp, dp, pp), a rank's coordinates, the ranks along
one or several axes, and that each process group holds exactly those ranks."""
import functools
import math

import pytest
import torch
import torch.distributed as dist

import distributed
from engine.parallel.topology import AXES, GROUPS, Topology


def _check(rank, world, sizes):
    topo = Topology(**sizes)
    c = topo.coords
    assert rank == ((c["pp"] * topo.dp + c["dp"]) * topo.cp + c["cp"]) * topo.tp + c["tp"]
    assert (topo.pp_rank, topo.dp_rank, topo.cp_rank, topo.tp_rank) == tuple(c[a] for a in AXES)
    assert topo.rank_of() == rank and topo.rank_of(tp=(c["tp"] + 1) % topo.tp) == topo.ranks_along("tp")[
        (c["tp"] + 1) % topo.tp]
    assert topo.pipeline_ranks == [topo.rank_of(pp=s) for s in range(topo.pp)]
    for axes in GROUPS:
        members = topo.ranks_along(*axes)
        assert len(members) == math.prod(topo.sizes[a] for a in axes) and rank in members
        for m in members:  # the same coordinates as this rank, except along `axes`
            assert all(_coords(topo, m)[a] == c[a] for a in AXES if a not in axes), (axes, m)
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=topo.group(*axes))
        assert total.item() == sum(members), (axes, members, total.item())
    ends = sorted({topo.pipeline_ranks[0], topo.pipeline_ranks[-1]})
    count = torch.tensor([1.0])
    dist.all_reduce(count, group=topo.embedding_group)
    assert count.item() == len(ends)


def _coords(topo, r):
    """A rank's coordinates by arithmetic (tp fastest), independent of the topology's own grid."""
    out = {}
    for a in reversed(AXES):
        out[a], r = r % topo.sizes[a], r // topo.sizes[a]
    return out


@pytest.mark.e2e  # 8 spawned ranks
def test_named_axes_and_groups_tp2_cp2_pp2():
    distributed.run(functools.partial(_check, sizes={"tp": 2, "cp": 2, "pp": 2, "dp": 1}), world=8)


def test_named_axes_and_groups_cp2_dp2():
    distributed.run(functools.partial(_check, sizes={"tp": 1, "cp": 2, "pp": 1, "dp": 2}), world=4)
