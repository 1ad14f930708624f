"""Tensor-parallel layers. Each holds its shard of the full weight and records, on the parameter, which slice
of the full tensor it is (`param.shard = (global_shape, offset)`), which initialisation and checkpoints use.

The input/output communication of a tensor-parallel region is explicit (`TPContext.enter` / `exit`), so a
block that feeds several column-parallel projections from one input (q, k and v; gate and up) communicates once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import mappings


@dataclass(frozen=True)
class TPContext:
    """The tensor-parallel group as a layer sees it. With sequence parallelism, activations outside TP regions
    are sharded along the sequence: entering a region all-gathers them, leaving it reduce-scatters; without,
    entering is an identity (all-reduce in backward) and leaving all-reduces."""

    group: object = None
    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return mappings.gather_seq(x, self.group)
        return mappings.copy_to_tp(x, self.group)

    def enter_linears(self, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """x W_i^T for column-parallel weights W_i sharing one input entering the TP region. Under sequence
        parallelism the input is all-gathered once and only the sequence shard is kept for backward, which
        gathers it again (Megatron's trade: one more all-gather for 1/tp of the activation memory)."""
        if self.sequence_parallel and self.size > 1:
            return list(_GatheredLinears.apply(x, self.group, *weights))
        x = mappings.copy_to_tp(x, self.group)
        return [F.linear(x, w) for w in weights]

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return mappings.reduce_scatter_seq(x, self.group)
        return mappings.reduce_from_tp(x, self.group)

    def mark_replicas(self, module: torch.nn.Module) -> None:
        """Tags the parameters `module` holds whole on every tp rank (no `shard`) with `tp_duplicate`: True on all
        but tp rank 0, so that a global gradient norm counts each replica once (Megatron's rule)."""
        for p in module.parameters():
            if not hasattr(p, "shard"):
                p.tp_duplicate = self.rank != 0

    def shard_size(self, full: int, what: str) -> int:
        if full % self.size:
            raise ValueError(f"{what} {full} is not divisible by the tensor-parallel size {self.size}")
        return full // self.size


class _GatheredLinears(torch.autograd.Function):
    """forward: all-gather x along the sequence, then one matmul per weight. backward: all-gather x again for
    the weight gradients; the input gradient (summed over the weights) is reduce-scattered back to shards."""

    @staticmethod
    def forward(ctx, x, group, *weights):
        full = mappings.all_gather(x, mappings.SEQ_DIM, group)
        ctx.group = group
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(full, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        dtype = grads[0].dtype  # under autocast the matmuls ran in a lower precision than the weights
        full = mappings.all_gather(x, mappings.SEQ_DIM, ctx.group).to(dtype)
        grad_full = sum(g @ w.to(dtype) for g, w in zip(grads, weights))
        grad_x = mappings.reduce_scatter(grad_full, mappings.SEQ_DIM, ctx.group)
        flat = full.flatten(0, -2)
        grad_ws = [(g.flatten(0, -2).t() @ flat).to(w.dtype) for g, w in zip(grads, weights)]
        return (grad_x.to(x.dtype), None, *grad_ws)


def _mark(param: nn.Parameter, global_shape, offset) -> nn.Parameter:
    param.shard = (tuple(global_shape), tuple(offset))
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] (and b [out]) split along out: rank r holds rows [r*out/tp, (r+1)*out/tp).
    forward() enters the TP region and optionally gathers the output; forward_local() is the matmul alone,
    for inputs already in the region. real_out_features < out_features marks the last rows as padding (the
    vocabulary-parallel LM head)."""

    def __init__(self, in_features: int, out_features: int, tp: TPContext = TPContext(), gather_output=False,
                 real_out_features: int | None = None, bias: bool = False):
        super().__init__()
        self.tp, self.gather_output = tp, gather_output
        local = tp.shard_size(out_features, "output features")
        real = out_features if real_out_features is None else real_out_features  # the rest is padding
        self.weight = _mark(nn.Parameter(torch.empty(local, in_features)), (real, in_features),
                            (tp.rank * local, 0))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = _mark(nn.Parameter(torch.zeros(local)), (real,), (tp.rank * local,)) if bias else None

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.enter_linears(x, [self.weight])[0]
        if self.bias is not None:
            y = y + self.bias
        return mappings.gather_from_tp(y, self.tp.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] split along in: rank r holds columns [r*in/tp, (r+1)*in/tp) and takes the
    matching slice of x (already split, the output of a column-parallel layer). forward() sums the partial
    products across the group (reduce-scatter along the sequence under sequence parallelism), then adds the
    bias, which every rank holds whole (under sequence parallelism its gradient is a partial sum over the
    sequence shards, marked `sequence_parallel` like the norms')."""

    def __init__(self, in_features: int, out_features: int, tp: TPContext = TPContext(), bias: bool = False):
        super().__init__()
        self.tp = tp
        local = tp.shard_size(in_features, "input features")
        self.weight = _mark(nn.Parameter(torch.empty(out_features, local)), (out_features, in_features),
                            (0, tp.rank * local))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.bias is not None:
            self.bias.sequence_parallel = tp.sequence_parallel

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.exit(self.forward_local(x))
        return y if self.bias is None else y + self.bias


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary is padded up to a multiple of tp so every rank holds the same number of rows. Padded
    rows are zero, never looked up, excluded from the softmax and from checkpoints."""
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocabulary split across tp ranks: each rank looks up the ids in its range
    and the partial results are summed (reduce-scattered along the sequence under sequence parallelism)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPContext = TPContext()):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.rows = padded_vocab_size(vocab_size, tp.size) // tp.size
        self.start = tp.rank * self.rows
        self.weight = _mark(nn.Parameter(torch.empty(self.rows, hidden_size)), (vocab_size, hidden_size),
                            (self.start, 0))
        nn.init.normal_(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.exit(out)


def valid_slice(param: torch.Tensor) -> tuple[tuple, tuple, tuple]:
    """(global_shape, offset, local_shape) of the real (unpadded) part of a parameter held by this rank."""
    global_shape, offset = getattr(param, "shard", (tuple(param.shape), (0,) * param.ndim))
    local = tuple(max(0, min(n, g - o)) for n, g, o in zip(param.shape, global_shape, offset))
    return global_shape, offset, local
