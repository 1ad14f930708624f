"""The flat buffer ZeRO works on: buckets, the shard of each a data-parallel rank owns, and parameters as views.

Parameters are laid out in one flat index space in reverse order of use (so the buckets the backward pass
completes first come first), cut into buckets of about `bucket_numel` elements (stage 3: one bucket per gathering
unit), each padded to a multiple of dp and split into dp contiguous shards: data-parallel rank r owns shard r.
Parameters whose gradients need a reduction beyond data parallelism first (`deferred`: partial sums over a
model-parallel group, reduced once the backward is over) get buckets of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Bucket:
    names: list
    params: list
    offsets: list          # start of each parameter in the flat index space
    start: int             # first element of the bucket
    size: int              # padded to a multiple of dp
    deferred: bool = False  # reduced only after the whole backward (model-parallel partial sums)
    # gradient synchronisation (GradSync)
    ready: int = 0                     # stages 0-1: parameters whose gradients are final
    seen: set = field(default_factory=set)  # stages 2-3: parameters already in the temporary full bucket
    #                                       (deferred buckets: already added in this micro-batch)
    pending: list = field(default_factory=list)  # (work, output, input) of in-flight reductions
    # parameter gathering (ParamGather)
    full: torch.Tensor | None = None   # stage 3: the gathered parameters (storage released when not in use)
    shard: torch.Tensor | None = None  # stage 3: this rank's persistent shard of them
    gather: object = None              # the in-flight parameter all-gather (stage 3; stages 1-2 with overlap)
    send: torch.Tensor | None = None   # stages 1-2: its input (a copy of the owned shard), held until it is done
    gathered: bool = False


@dataclass
class Piece:
    """The part [lo, hi) (flat, within the parameter) of parameter `name` that this rank optimises."""
    name: str
    param: nn.Parameter
    lo: int
    hi: int
    shard: nn.Parameter


def _padded(numel: int, dp: int) -> int:
    return -(-numel // dp) * dp


def _bucket(named: list, start: int, dp: int, deferred: bool) -> Bucket:
    offsets, off = [], start
    for _, p in named:
        offsets.append(off)
        off += p.numel()
    return Bucket([n for n, _ in named], [p for _, p in named], offsets, start, _padded(off - start, dp), deferred)


def layout_buckets(named: list, dp: int, bucket_numel: int, deferred: set, module_of: dict | None = None
                   ) -> list[Bucket]:
    """Stages 0-2: `named` (in backward order) cut into buckets of about bucket_numel elements; the deferred
    parameters first, in buckets of their own. module_of {name: index}: no bucket holds parameters of two modules
    (a pipeline rank's model chunks run their backward at different times: such a bucket would wait for both)."""
    module_of = module_of or {}
    buckets, start = [], 0
    for is_deferred in (True, False):
        current: list = []
        members = [(n, p) for n, p in named if (n in deferred) == is_deferred]
        for i, item in enumerate(members):
            current.append(item)
            last = i == len(members) - 1
            if last or module_of.get(members[i + 1][0]) != module_of.get(item[0]) or \
                    sum(p.numel() for _, p in current) >= bucket_numel:
                buckets.append(_bucket(current, start, dp, is_deferred))
                start += buckets[-1].size
                current = []
    return buckets


def layout_units(units: list, by_name: dict, dp: int, deferred: set) -> list[Bucket]:
    """Stage 3: one bucket per unit (in forward order), plus one for the unit's deferred parameters if any."""
    buckets, start = [], 0
    for _, _, names, _ in units:
        for is_deferred in (False, True):
            members = [(n, by_name[n]) for n in names if (n in deferred) == is_deferred]
            if members:
                buckets.append(_bucket(members, start, dp, is_deferred))
                start += buckets[-1].size
    return buckets


class FlatLayout:
    """Buckets over the trainable parameters, the range of each this rank owns, and the parameters made views of
    flat storage: one buffer for the model (stages 0-2), or per bucket a full buffer (released while not in use)
    and this rank's persistent shard (stage 3)."""

    def __init__(self, buckets: list[Bucket], dp: int, dp_rank: int, shard_optimizer: bool, shard_params: bool):
        self.buckets, self.dp, self.dp_rank = buckets, dp, dp_rank
        self.shard_optimizer, self.sharded_params = shard_optimizer and dp > 1, shard_params and dp > 1
        self.total = sum(b.size for b in buckets)
        self.where = {p: (b, off) for b in buckets for p, off in zip(b.params, b.offsets)}
        self.names = {p: n for b in buckets for p, n in zip(b.params, b.names)}
        first = buckets[0].params[0]
        self.dtype, self.device = first.dtype, first.device
        mixed = sorted({f"{n}: {p.dtype}" for b in buckets for n, p in zip(b.names, b.params) if p.dtype != self.dtype})
        if mixed:
            raise ValueError(f"ZeroOptimizer: the trainable parameters must share one dtype (one flat buffer); "
                             f"{first.dtype} and {', '.join(mixed[:3])}: cast the module first")
        self._place_parameters()

    def _place_parameters(self) -> None:
        if not self.sharded_params:
            self.param_buffer = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for b in self.buckets:
            base = self.param_buffer[b.start:b.start + b.size] if not self.sharded_params else \
                torch.zeros(b.size, dtype=self.dtype, device=self.device)
            for p, off in zip(b.params, b.offsets):
                view = base[off - b.start:off - b.start + p.numel()]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
            if self.sharded_params:
                lo, hi = self.owned(b)
                b.full, b.shard, b.gathered = base, base[lo - b.start:hi - b.start].clone(), True

    def owned(self, b: Bucket) -> tuple[int, int]:
        """The flat range [lo, hi) of bucket b whose optimizer state (and, sharded, gradients and parameters) this
        rank holds: the whole bucket unless the optimizer is sharded."""
        if not self.shard_optimizer:
            return b.start, b.start + b.size
        shard = b.size // self.dp
        return b.start + self.dp_rank * shard, b.start + (self.dp_rank + 1) * shard

    def param_flat(self, b: Bucket, lo: int, hi: int) -> torch.Tensor:
        """This rank's parameter storage for flat elements [lo, hi) of bucket b (owned, at stage 3)."""
        if not self.sharded_params:
            return self.param_buffer[lo:hi]
        own_lo, _ = self.owned(b)
        return b.shard[lo - own_lo:hi - own_lo]

    def pieces(self, grad_view) -> list[Piece]:
        """The owned part of every parameter as an optimizer parameter (a view of the parameter storage) whose
        gradient (fp32 parameters: .grad, others: .main_grad) is grad_view(lo, hi, bucket)."""
        pieces = []
        for b in self.buckets:
            own_lo, own_hi = self.owned(b)
            for name, p, off in zip(b.names, b.params, b.offsets):
                lo, hi = max(off, own_lo), min(off + p.numel(), own_hi)
                if lo >= hi:
                    continue
                whole = (lo, hi) == (off, off + p.numel())  # whole parameters keep their shape (Adafactor)
                shape = p.shape if whole else (hi - lo,)
                shard = nn.Parameter(self.param_flat(b, lo, hi).view(shape), requires_grad=False)
                grad = grad_view(lo, hi, b).view(shape)
                if shard.dtype == torch.float32:
                    shard.grad = grad
                else:  # fp32 gradients of low-precision parameters: the optimizers read them (adamw.gradient)
                    shard.main_grad = grad
                pieces.append(Piece(name, p, lo - off, hi - off, shard))
        return pieces

    def buckets_holding(self, names: list[str]) -> list[Bucket]:
        """The buckets that hold these parameters, each once, in the order first met."""
        by_name = {n: b for b in self.buckets for n in b.names}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"ZeroOptimizer units: {unknown[:3]} are not trainable parameters of the module")
        return list({id(b): b for b in (by_name[n] for n in names)}.values())
