"""Conjugate communication pairs as autograd functions (Megatron's mappings).

Each forward collective has the matching backward so gradients flow correctly through tensor-parallel
regions. All are identities when the group has one rank.

    copy_to_tp          forward identity           backward all-reduce
    reduce_from_tp      forward all-reduce         backward identity
    scatter_to_tp       forward split last dim     backward all-gather last dim
    gather_from_tp      forward all-gather last    backward split last dim
    gather_seq          forward all-gather seq     backward reduce-scatter seq    (sequence parallelism)
    reduce_scatter_seq  forward reduce-scatter seq backward all-gather seq
    scatter_seq         forward split seq          backward all-gather seq
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

SEQ_DIM = 1  # activations are [batch, seq, hidden]


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


# Eager: the in-place single-tensor collectives (the names changed in torch 2.10), NCCL's native form. Inside a
# torch.compile'd layer: the functional (out-of-place) collectives, which the compiler traces into its graphs. Its own
# rewriting of the in-place forms is not enough: torch 2.11 drops the gradient through a custom autograd function
# whose forward reduce-scatters into a buffer it allocates (sequence parallelism's reduce_scatter_seq).
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", group)
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _size(group)
    if torch.compiler.is_compiling():
        gathered = funcol.all_gather_tensor(x.contiguous(), 0, group)
    else:
        gathered = x.new_empty((size * x.shape[0], *x.shape[1:]))  # the ranks' tensors one after the other
        _all_gather_single(gathered, x.contiguous(), group=group)
    return gathered if dim == 0 else torch.cat(gathered.view(size, *x.shape).unbind(0), dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _size(group)
    if x.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {size} ranks")
    parts = torch.stack(x.chunk(size, dim))  # rank r's part r-th, one after the other
    if torch.compiler.is_compiling():
        return funcol.reduce_scatter_tensor(parts.flatten(0, 1), "sum", 0, group)
    out = parts.new_empty(parts.shape[1:])
    _reduce_scatter_single(out, parts.flatten(0, 1), group=group)
    return out


def split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _size(group)
    if x.shape[dim] % size:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} over {size} ranks")
    return x.chunk(size, dim)[dist.get_group_rank(group, dist.get_rank())].contiguous()


class _Pair(torch.autograd.Function):
    """forward applies `fwd`, backward applies `bwd`; both are (tensor, group) -> tensor."""

    @staticmethod
    def forward(ctx, x, group, fwd, bwd):
        ctx.group, ctx.bwd = group, bwd
        return fwd(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.bwd(grad, ctx.group), None, None, None


def _identity(x, group):
    return x


def _pair(fwd, bwd):
    def apply(x: torch.Tensor, group) -> torch.Tensor:
        return x if _size(group) == 1 else _Pair.apply(x, group, fwd, bwd)
    return apply


def _last(op):
    return lambda x, group: op(x, -1, group)


def _seq(op):
    return lambda x, group: op(x, SEQ_DIM, group)


copy_to_tp = _pair(_identity, all_reduce)
reduce_from_tp = _pair(all_reduce, _identity)
scatter_to_tp = _pair(_last(split), _last(all_gather))
gather_from_tp = _pair(_last(all_gather), _last(split))
gather_seq = _pair(_seq(all_gather), _seq(reduce_scatter))
reduce_scatter_seq = _pair(_seq(reduce_scatter), _seq(all_gather))
scatter_seq = _pair(_seq(split), _seq(all_gather))
