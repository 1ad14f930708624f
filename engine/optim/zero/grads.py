"""Gradient synchronisation over data parallelism: hooks, bucketed reductions overlapped with backward, per stage.

- stages 0-1: fp32 gradients accumulate in one flat buffer (the parameters' .grad, or .main_grad beside
  low-precision parameters); each bucket is all-reduced asynchronously once all its gradients are final.
- stages 2-3: each rank keeps only its shard of every bucket: a micro-batch's gradients go into a temporary full
  bucket, reduce-scattered asynchronously as soon as it is complete, and accumulated into the shard.
- deferred buckets (gradients that are partial sums over a model-parallel group: sequence-parallel norm gains, a
  tied embedding split across pipeline stages) accumulate locally over the whole backward; `finish()` sums them
  over their group (one call per group), then reduces them over data parallelism.

A reduction is armed either explicitly (`arm(M)`: a step of M micro-batches, every bucket complete after its M-th)
or by the first gradient of a user's backward, which queues `on_backward_end` to run when that backward is over.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist

from engine.optim.zero.layout import Bucket, FlatLayout

# torch 2.13 renamed the flat-buffer collectives (the old names now warn); older torch has only the old names
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class GradSync:
    def __init__(self, layout: FlatLayout, group, shard_grads: bool, mean: bool, partial_groups: dict,
                 on_backward_end, on_bucket_reduced=None):
        """partial_groups: {parameter name: the group its gradient is a partial sum over}, for the deferred
        buckets' parameters. on_backward_end(): queued at the end of a user's backward (it calls finish()).
        on_bucket_reduced(bucket): called once a bucket's gradients of a micro-batch are handed to the reduction,
        or for a deferred bucket added to its accumulator (stage 3 releases the unit's gathered parameters there)."""
        self.layout, self.buckets, self.group, self.dp = layout, layout.buckets, group, layout.dp
        self.dp_rank, self.device = layout.dp_rank, layout.device
        self.sharded = shard_grads and self.dp > 1
        self.mean = mean and self.dp > 1
        self.partial_groups = partial_groups
        self.on_backward_end, self.on_bucket_reduced = on_backward_end, on_bucket_reduced
        self.num_microbatches, self.counts = 1, {}
        self.armed = self.skip = self.reduced = False
        self._allocate()
        # the hooks hold this object weakly: a parameter's hooks live in autograd, out of the garbage collector's
        # sight, so a strong reference would keep every dropped model, buffer and optimizer alive
        owner = weakref.ref(self)

        def on_grad(param, owner=owner):
            sync = owner()
            if sync is not None:
                sync.on_grad(param)
        self.hooks = [p.register_post_accumulate_grad_hook(on_grad) for b in self.buckets for p in b.params]

    def _allocate(self) -> None:
        """Not sharded: one full fp32 buffer, the parameters' .grad (fp32) or main_grad views. Sharded: the owned
        shard of each bucket, plus a full buffer for each deferred bucket."""
        f32 = dict(dtype=torch.float32, device=self.device)
        if not self.sharded:
            self.buffer = torch.zeros(self.layout.total, **f32)
            where = self.layout.where
            self.main_grad = {p: self.buffer[off:off + p.numel()].view_as(p) for p, (_, off) in where.items()}
            for p, g in self.main_grad.items():
                p.grad = g if p.dtype == torch.float32 else None
        else:
            self.shards = {id(b): torch.zeros(b.size // self.dp, **f32) for b in self.buckets}
            self.temp_full: dict[int, torch.Tensor] = {}
        self.deferred_full = {id(b): torch.zeros(b.size, **f32) if self.sharded else self.bucket_grads(b)
                              for b in self.buckets if b.deferred}

    def bucket_grads(self, b: Bucket) -> torch.Tensor:
        return self.buffer[b.start:b.start + b.size]

    def view(self, lo: int, hi: int, b: Bucket) -> torch.Tensor:
        """The reduced gradient for flat elements [lo, hi) of bucket b owned by this rank."""
        if not self.sharded:
            return self.buffer[lo:hi]
        base = b.start + self.dp_rank * (b.size // self.dp)
        return self.shards[id(b)][lo - base:hi - base]

    def tensors(self) -> list[torch.Tensor]:
        """Every gradient buffer this rank holds."""
        if not self.sharded:
            return [self.buffer]
        return list(self.shards.values()) + list(self.deferred_full.values())

    # ---- the step's life cycle ----------------------------------------------------------------------------
    def zero(self) -> None:
        for g in self.tensors():
            g.zero_()
        if self.sharded:
            self.temp_full.clear()  # what no_sync() accumulated
            for b in self.buckets:
                b.seen = set()
        self.reduced = False

    def arm(self, num_microbatches: int) -> None:
        self.num_microbatches, self.armed = num_microbatches, True
        self.counts = {p: 0 for b in self.buckets for p in b.params}
        for b in self.buckets:
            b.ready = 0

    @contextlib.contextmanager
    def no_sync(self):
        previous, self.skip = self.skip, True
        try:
            yield
        finally:
            self.skip = previous

    def on_grad(self, p) -> None:
        if not self.armed:  # a user's backward: arm for it, finish at its end
            if self.reduced and not self.skip and not self.sharded and not self.mean and self.dp > 1:
                raise RuntimeError("ZeroOptimizer(grad_reduction='sum'): a second backward reduces gradients that "
                                   "were already reduced; run the earlier ones under no_sync() or call zero_grad()")
            self.arm(1)
            torch.autograd.Variable._execution_engine.queue_callback(self.on_backward_end)
        b, off = self.layout.where[p]
        if self.sharded:
            self._accumulate_sharded(p, b, off)
            return
        if p.grad is not self.main_grad[p]:  # low-precision parameters: add into the fp32 main gradient
            self.main_grad[p].add_(p.grad)
            p.grad = None
        if self.skip or b.deferred:
            return
        self.counts[p] += 1
        if self.counts[p] == self.num_microbatches:
            b.ready += 1
            if b.ready == len(b.params) and self.dp > 1:
                self._all_reduce(b)

    def _all_reduce(self, b: Bucket) -> None:
        flat = self.bucket_grads(b)
        if self.mean:
            flat.mul_(1.0 / self.dp)
        b.pending.append((dist.all_reduce(flat, group=self.group, async_op=True), None, None))

    def _accumulate_sharded(self, p, b: Bucket, off: int) -> None:
        """Gradients of one micro-batch go into a temporary full bucket, reduce-scattered when every parameter of
        the bucket has added its gradient, or before a parameter adds a second one (another micro-batch's: some
        parameter got none), or at the end of the backward. Deferred buckets accumulate over the whole backward."""
        grad = p.grad.reshape(-1)
        p.grad = None
        if b.deferred:
            self.deferred_full[id(b)][off - b.start:off - b.start + p.numel()].add_(grad)
            self._note_arrival(b, p)  # (stage 3: its unit's parameters are released once all are in)
            return
        if p in b.seen:
            self._reduce_scatter(b)
        full = self.temp_full.get(id(b))
        if full is None:
            full = self.temp_full[id(b)] = torch.zeros(b.size, dtype=torch.float32, device=self.device)
        full[off - b.start:off - b.start + p.numel()].add_(grad)
        if self.skip:  # no_sync: the full bucket accumulates until a backward outside it
            return
        b.seen.add(p)
        if len(b.seen) == len(b.params):
            if self.on_bucket_reduced is not None:
                self.on_bucket_reduced(b)
            self._reduce_scatter(b)

    def _note_arrival(self, b: Bucket, p) -> None:
        """A deferred bucket's micro-batch is complete once every parameter has added a gradient."""
        if p in b.seen:
            b.seen = set()
        b.seen.add(p)
        if len(b.seen) == len(b.params):
            b.seen = set()
            if self.on_bucket_reduced is not None:
                self.on_bucket_reduced(b)

    def _reduce_scatter(self, b: Bucket, full: torch.Tensor | None = None) -> None:
        """Launches the reduce-scatter of b's temporary full bucket (if any; or `full`) into this rank's shard."""
        b.seen = set()
        full = self.temp_full.pop(id(b), None) if full is None else full
        if full is None:
            return
        self.drain()
        if self.mean:
            full.mul_(1.0 / self.dp)
        out = torch.empty(b.size // self.dp, dtype=torch.float32, device=self.device)
        b.pending.append((reduce_scatter_flat(out, full, group=self.group, async_op=True), out, full))

    def drain(self) -> None:
        """Waits for every in-flight reduction (stages 2-3: and adds its result into the shard)."""
        for b in self.buckets:
            for work, out, _ in b.pending:
                work.wait()
                if out is not None:
                    self.shards[id(b)].add_(out)
            b.pending = []

    def finish(self) -> None:
        """After the backward (or the whole pipeline schedule): reduces what is still pending - buckets with
        parameters that got no gradient, the deferred buckets - and waits for every reduction."""
        deferred = [b for b in self.buckets if b.deferred]
        if not self.skip:
            self._reduce_partial_sums(deferred)
            if self.sharded:
                for b in self.buckets:
                    self._reduce_scatter(b, self.deferred_full[id(b)] if b.deferred else None)
            elif self.dp > 1:
                for b in self.buckets:
                    if b.deferred or not b.pending:  # deferred, or never completed (unused parameters)
                        self._all_reduce(b)
                self.reduced = True
        self.drain()
        if self.sharded and not self.skip:
            for b in deferred:
                self.deferred_full[id(b)].zero_()
        self.armed = False

    def _reduce_partial_sums(self, deferred: list[Bucket]) -> None:
        """Sums each deferred parameter's local gradient over its model-parallel group: one all-reduce per group,
        over the gradients of all its parameters flattened together, in the order the buckets hold them."""
        by_group: dict = {}
        for b in deferred:
            full = self.deferred_full[id(b)]
            for name, p, off in zip(b.names, b.params, b.offsets):
                group = self.partial_groups.get(name)
                if group is not None:
                    by_group.setdefault(group, []).append(full[off - b.start:off - b.start + p.numel()])
        for group, views in by_group.items():
            flat = torch.cat(views)
            dist.all_reduce(flat, group=group)
            for view, part in zip(views, flat.split([v.numel() for v in views])):
                view.copy_(part)
