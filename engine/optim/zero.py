"""Data-parallel gradients and the ZeRO optimizer (stages 0-3), with fp32 master weights for bf16/fp16.

Parameters live in one flat buffer (their `.data` are views into it), laid out in reverse order of use so that
the buckets the backward pass completes first come first. The buffer is cut into buckets of about
`bucket_numel` elements, each padded to a multiple of dp and split into dp contiguous shards; data-parallel
rank r owns shard r of every bucket.

- stage 0: fp32 gradients accumulate in a flat buffer; each bucket is all-reduced (asynchronously) as soon as
  all its gradients are final during the last micro-batch's backward; every rank updates everything.
- stage 1: the same gradients, but the optimizer state (and fp32 master weights) exist only for the owned
  shards; after the step the updated shards are all-gathered into the parameters.
- stage 2: additionally each rank keeps only its gradient shard: every micro-batch's bucket is reduce-scattered
  as soon as it is complete (asynchronously) and accumulated into the shard, and the full bucket is freed.
- stage 3: additionally each rank keeps only its parameter shard. Buckets are the model's units (embedding, each
  layer, norm + head); a unit's parameters are all-gathered just before its forward (the next unit's gather is
  started at the same time) and again when its output's gradient arrives, and released after each. With
  keep_params_in_step they stay gathered from first use to the end of the step: one gather per step instead of
  two per micro-batch, at the cost of holding the stage's full parameters during the step.
- overlap_param_gather (stages 1-2): the step launches every bucket's all-gather of the updated shards
  asynchronously, in forward order, and each unit's next forward (a pre-hook) waits only for the buckets that
  hold its parameters, so the gathers overlap the optimizer's tail and the forward of earlier units.
  `gather_all()` waits for all of them (before anything else reads the parameters: checkpoints, rollbacks).

The optimizer is any engine optimizer built over "shard parameters": views of the owned ranges of each
parameter, whose gradients are views of the reduced gradients. Checkpoints see whole tensors: states are
gathered per parameter, and restored into whatever shards the loading layout owns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from engine.optim.adamw import gradient
from engine.optim.clip import global_grad_norm

# torch 2.13 renamed the flat-buffer collectives (the old names now warn); older torch has only the old names
all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


@dataclass
class Bucket:
    names: list
    params: list
    offsets: list          # start of each parameter in the flat buffer
    start: int             # first element of the bucket in the flat buffer
    size: int              # padded to a multiple of dp
    deferred: bool = False  # reduced only after the whole schedule (tied embeddings across pipeline stages)
    ready: int = 0
    full: torch.Tensor | None = None   # stage 3: the gathered parameters (storage released when not in use)
    shard: torch.Tensor | None = None  # stage 3: this rank's persistent shard of them
    gather: object = None              # the in-flight parameter all-gather (stage 3; stages 1-2 with overlap)
    send: torch.Tensor | None = None   # stages 1-2: its input (a copy of the owned shard), held until it is done
    gathered: bool = False
    pending: list = field(default_factory=list)  # stage 2: (work, output, input) of in-flight reduce-scatters


@dataclass
class Piece:
    """The part [lo, hi) (flat, within the parameter) of parameter `name` that this rank optimises."""
    name: str
    param: nn.Parameter
    lo: int
    hi: int
    shard: nn.Parameter


def _dp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class ZeroOptimizer:
    def __init__(self, named_params, stage: int, make_optimizer, dp_group=None, bucket_numel: int = 4_000_000,
                 deferred: set = frozenset(), tp_reduced: set = frozenset(), tp_group=None, embedding_group=None,
                 units: list | None = None, keep_params_in_step: bool = False, overlap_param_gather: bool = False):
        """named_params: in forward order. make_optimizer(param_groups) builds the inner optimizer. deferred:
        names whose gradients must first be summed over `embedding_group` after the schedule; tp_reduced:
        names whose gradients are partial sums over `tp_group` (sequence-parallel norm gains). units:
        [(module entered first, module left last, [parameter names], [names of other units' parameters it reads,
        e.g. a tied head's embedding])] in forward order (stage 3, and stages 1-2 with overlap_param_gather)."""
        self.stage, self.dp_group, self.dp = stage, dp_group, _dp_size(dp_group)
        self.dp_rank = 0 if dp_group is None else dist.get_group_rank(dp_group, dist.get_rank())
        self.tp_group, self.embedding_group = tp_group, embedding_group
        self.tp_reduced, self.keep_params, self.deferred_names = tp_reduced, keep_params_in_step, set(deferred)
        self.sharded_params = stage >= 3 and self.dp > 1
        named = list(named_params)
        self.dtype, self.device = named[0][1].dtype, named[0][1].device
        if self.sharded_params:
            by_name = dict(named)
            self.buckets = self._layout_units(units, by_name, deferred)
        else:
            self.buckets = self._layout(list(reversed(named)), bucket_numel, deferred)
        self.total = sum(b.size for b in self.buckets)
        self.where, self.names = {}, {}
        self._place_parameters()
        self.sharded_grads = stage >= 2 and self.dp > 1
        self._allocate_grads(self.total)
        self.pieces = self._pieces()
        self.optimizer = make_optimizer(self._param_groups())
        self.num_microbatches, self.counts = 1, {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b.params]
        if self.sharded_params:
            self._install_unit_hooks(units)
        self.overlap_param_gather = overlap_param_gather and stage in (1, 2) and self.dp > 1
        if self.overlap_param_gather:
            if units is None:
                raise ValueError("overlap_param_gather needs `units`: the modules whose forward waits for the gathers")
            self._install_param_wait_hooks(units)
        # NCCL gathers in place from the rank's own slice of the output; gloo needs a separate input
        self._inplace_gather = dp_group is not None and dist.get_backend(dp_group) == "nccl"

    def _place_parameters(self) -> None:
        """Makes every parameter a view of a flat buffer: one for the model (stages 0-2), or one per unit whose
        storage is released after this rank's shard has been copied out (stage 3)."""
        if not self.sharded_params:
            self.param_buffer = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for b in self.buckets:
            base = self.param_buffer[b.start:b.start + b.size] if not self.sharded_params else \
                torch.zeros(b.size, dtype=self.dtype, device=self.device)
            for name, p, off in zip(b.names, b.params, b.offsets):
                view = base[off - b.start:off - b.start + p.numel()]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
                self.where[p], self.names[p] = (b, off), name
            if self.sharded_params:
                b.full, b.gathered = base, True
                lo, hi = self._owned(b)
                b.shard = base[lo - b.start:hi - b.start].clone()
                self._release(b)

    # ---- layout -------------------------------------------------------------------------------------------
    def _layout(self, named, bucket_numel: int, deferred: set) -> list[Bucket]:
        groups = [[(n, p) for n, p in named if n in deferred], [(n, p) for n, p in named if n not in deferred]]
        buckets, start = [], 0
        for is_deferred, members in zip((True, False), groups):
            current: list = []
            for item in members + [None]:
                if item is not None:
                    current.append(item)
                full = item is None or sum(p.numel() for _, p in current) >= bucket_numel
                if current and full:
                    offsets, off = [], start
                    for _, p in current:
                        offsets.append(off)
                        off += p.numel()
                    size = -(-(off - start) // self.dp) * self.dp
                    buckets.append(Bucket([n for n, _ in current], [p for _, p in current], offsets, start, size,
                                          is_deferred))
                    start += size
                    current = []
        return buckets

    def _layout_units(self, units, by_name: dict, deferred: set) -> list[Bucket]:
        buckets, start = [], 0
        for _, _, names, _ in units:
            off, offsets = start, []
            for n in names:
                offsets.append(off)
                off += by_name[n].numel()
            size = -(-(off - start) // self.dp) * self.dp
            buckets.append(Bucket(list(names), [by_name[n] for n in names], offsets, start, size,
                                  any(n in deferred for n in names)))
            start += size
        return buckets

    def _owned(self, b: Bucket) -> tuple[int, int]:
        if self.stage == 0 or self.dp == 1:
            return b.start, b.start + b.size
        shard = b.size // self.dp
        return b.start + self.dp_rank * shard, b.start + (self.dp_rank + 1) * shard

    def _allocate_grads(self, total: int) -> None:
        """stage 0/1: a full fp32 gradient buffer. stage 2: the owned shard of each bucket, plus full buffers
        for deferred buckets (they accumulate over the whole schedule before their reduction)."""
        f32 = dict(dtype=torch.float32, device=self.device)
        if not self.sharded_grads:
            self.grad_buffer = torch.zeros(total, **f32)
            self.main_grad = {p: self.grad_buffer[off:off + p.numel()].view_as(p) for p, (_, off) in self.where.items()}
            for p, g in self.main_grad.items():
                p.grad = g if p.dtype == torch.float32 else None
            return
        self.shard_grads = {id(b): torch.zeros(b.size // self.dp, **f32) for b in self.buckets}
        self.deferred_full = {id(b): torch.zeros(b.size, **f32) for b in self.buckets if b.deferred}
        self.temp_full: dict[int, torch.Tensor] = {}

    def _grad_view(self, lo: int, hi: int, b: Bucket) -> torch.Tensor:
        """The reduced gradient for flat elements [lo, hi) owned by this rank."""
        if not self.sharded_grads:
            return self.grad_buffer[lo:hi]
        base = b.start + self.dp_rank * (b.size // self.dp)
        return self.shard_grads[id(b)][lo - base:hi - base]

    def _pieces(self) -> list[Piece]:
        pieces = []
        for b in self.buckets:
            own_lo, own_hi = self._owned(b)
            for name, p, off in zip(b.names, b.params, b.offsets):
                lo, hi = max(off, own_lo), min(off + p.numel(), own_hi)
                if lo >= hi:
                    continue
                whole = (lo, hi) == (off, off + p.numel())  # whole parameters keep their shape (Adafactor)
                shape = p.shape if whole else (hi - lo,)
                shard = nn.Parameter(self._param_flat(b, lo, hi).view(shape), requires_grad=False)
                grad = self._grad_view(lo, hi, b).view(shape)
                if shard.dtype == torch.float32:
                    shard.grad = grad
                else:  # fp32 gradients of low-precision parameters: the optimizers read them (adamw.gradient)
                    shard.main_grad = grad
                pieces.append(Piece(name, p, lo - off, hi - off, shard))
        return pieces

    def _param_flat(self, b: Bucket, lo: int, hi: int) -> torch.Tensor:
        if not self.sharded_params:
            return self.param_buffer[lo:hi]
        own_lo, _ = self._owned(b)
        return b.shard[lo - own_lo:hi - own_lo]

    # ---- stage 3: gathering and releasing parameters -------------------------------------------------------
    def _gather(self, b: Bucket, wait: bool = True) -> None:
        if not b.gathered:
            b.full.untyped_storage().resize_(b.size * b.full.element_size())
            b.gather = all_gather_flat(b.full, b.shard, group=self.dp_group, async_op=True)
            b.gathered = True
        if wait:
            self._wait_gather(b)

    def _release(self, b: Bucket) -> None:
        if b.gathered:
            self._wait_gather(b)
            b.full.untyped_storage().resize_(0)
            b.gathered = False

    def _maybe_release(self, b: Bucket) -> None:
        if not self.keep_params:
            self._release(b)

    def gather_all(self) -> None:
        """Makes every parameter whole and current on this rank: ZeRO-3 gathers every unit; ZeRO-1/2 with
        overlap_param_gather waits for the step's in-flight gathers."""
        for b in self.buckets:
            if self.sharded_params:
                self._gather(b)
            else:
                self._wait_gather(b)

    def release_all(self, refresh_shards: bool = False) -> None:
        """Releases every gathered unit; refresh_shards first copies this rank's part back into its shard (after
        the full parameters were overwritten, e.g. by a checkpoint load)."""
        for b in self.buckets if self.sharded_params else []:
            if refresh_shards and b.gathered:
                lo, hi = self._owned(b)
                b.shard.copy_(b.full[lo - b.start:hi - b.start])
            self._release(b)

    def _install_unit_hooks(self, units) -> None:
        """Stage 3: each unit gathers its bucket, and those of other units' parameters it reads (`needs`), for
        its forward and again for its backward, prefetching the neighbouring unit's bucket."""
        order = [self._buckets_holding(names)[0] for _, _, names, _ in units]
        for i, (first, last, _, borrowed) in enumerate(units):
            needs = [order[i]] + self._buckets_holding(borrowed)
            nxt = order[i + 1] if i + 1 < len(order) else None
            prev = order[i - 1] if i > 0 else None
            first.register_forward_pre_hook(lambda *_, needs=needs, nxt=nxt: self._before_forward(needs, nxt))
            last.register_forward_hook(lambda m, args, out, needs=needs, prev=prev: self._after_forward(needs, prev,
                                                                                                      out))

    def _before_forward(self, needs: list[Bucket], nxt: Bucket | None) -> None:
        for b in needs:
            self._gather(b)
        if nxt is not None:
            self._gather(nxt, wait=False)  # prefetch: overlaps the next unit's gather with this unit's compute

    def _after_forward(self, needs: list[Bucket], prev: Bucket | None, out) -> None:
        if torch._C._current_graph_task_id() != -1:  # a recomputation inside backward: keep the parameters
            return
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(lambda grad, needs=needs, prev=prev: self._before_backward(needs, prev))
        for b in needs:
            self._maybe_release(b)

    def _before_backward(self, needs: list[Bucket], prev: Bucket | None) -> None:
        for b in needs:
            self._gather(b)
        if prev is not None:
            self._gather(prev, wait=False)

    # ---- stages 1-2: overlapping the parameter all-gather with the next forward ----------------------------
    def _buckets_holding(self, names: list[str]) -> list[Bucket]:
        """The buckets that hold these parameters, each once, in the order first met."""
        bucket_of = {name: self.where[p][0] for p, name in self.names.items()}
        return list({id(b): b for b in (bucket_of[n] for n in names)}.values())

    def _install_param_wait_hooks(self, units) -> None:
        for first, _, names, borrowed in units:
            buckets = self._buckets_holding(names + borrowed)
            first.register_forward_pre_hook(lambda *_, buckets=buckets: self._wait_gathers(buckets))

    def _gather_params(self, b: Bucket, async_op: bool) -> None:
        """All-gathers bucket b's updated shards into the parameters."""
        own_lo, own_hi = self._owned(b)
        b.send = self.param_buffer[own_lo:own_hi]
        if not self._inplace_gather:
            b.send = b.send.clone()
        b.gather = all_gather_flat(self.param_buffer[b.start:b.start + b.size], b.send, group=self.dp_group,
                                   async_op=async_op)
        if not async_op:
            b.gather, b.send = None, None

    def _gather_all_params(self, async_op: bool) -> None:
        for b in reversed(self.buckets):  # buckets are in backward order: the embedding's goes first
            self._gather_params(b, async_op)

    def _wait_gather(self, b: Bucket) -> None:
        """Waits for b's in-flight parameter all-gather, if any (every stage)."""
        if b.gather is not None:
            b.gather.wait()
            b.gather, b.send = None, None

    def _wait_gathers(self, buckets) -> None:
        for b in buckets:
            self._wait_gather(b)

    def _param_groups(self) -> list[dict]:
        """Weight decay on pieces of matrices, none on pieces of vectors (norm gains)."""
        decay = [pc.shard for pc in self.pieces if pc.param.ndim >= 2]
        no_decay = [pc.shard for pc in self.pieces if pc.param.ndim < 2]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ---- gradients ----------------------------------------------------------------------------------------
    def start_step(self, num_microbatches: int) -> None:
        """Zeroes the gradients and arms the reduction for a step of `num_microbatches` micro-batches."""
        self.num_microbatches = num_microbatches
        self.counts = {p: 0 for b in self.buckets for p in b.params}
        for b in self.buckets:
            b.ready = 0
        if self.sharded_grads:
            for g in list(self.shard_grads.values()) + list(self.deferred_full.values()):
                g.zero_()
        else:
            self.grad_buffer.zero_()

    def _on_grad(self, p: nn.Parameter) -> None:
        b, off = self.where[p]
        if self.sharded_grads:
            self._accumulate_sharded(p, b, off)
            return
        if p.grad is not self.main_grad[p]:  # low-precision parameters: add into the fp32 main gradient
            self.main_grad[p].add_(p.grad)
            p.grad = None
        self.counts[p] += 1
        if self.counts[p] == self.num_microbatches:
            if self.names[p] in self.tp_reduced and self.tp_group is not None:
                dist.all_reduce(self.main_grad[p], group=self.tp_group)
            b.ready += 1
            if b.ready == len(b.params) and not b.deferred and self.dp > 1:
                b.pending.append((dist.all_reduce(self.grad_buffer[b.start:b.start + b.size], group=self.dp_group,
                                                  async_op=True), None, None))

    def _accumulate_sharded(self, p, b: Bucket, off: int) -> None:
        """stage 2/3: gradients of one micro-batch go into a temporary full bucket, reduce-scattered when full."""
        grad = p.grad.reshape(-1)
        p.grad = None
        if self.names[p] in self.tp_reduced and self.tp_group is not None:
            # only this micro-batch's contribution: the bucket may already hold reduced ones (interleaved chunks)
            grad = grad.to(torch.float32, copy=True)
            dist.all_reduce(grad, group=self.tp_group)
        if b.deferred:
            self.deferred_full[id(b)][off - b.start:off - b.start + p.numel()].add_(grad)
            return
        full = self.temp_full.get(id(b))
        if full is None:
            full = self.temp_full[id(b)] = torch.zeros(b.size, dtype=torch.float32, device=self.device)
        full[off - b.start:off - b.start + p.numel()].add_(grad)
        b.ready += 1
        if b.ready == len(b.params):
            b.ready = 0
            if self.sharded_params:
                self._maybe_release(b)
            self._drain()
            out = torch.empty(b.size // self.dp, dtype=torch.float32, device=self.device)
            work = reduce_scatter_flat(out, self.temp_full.pop(id(b)), group=self.dp_group, async_op=True)
            b.pending.append((work, out, None))

    def _drain(self) -> None:
        for b in self.buckets:
            for work, out, _ in b.pending:
                work.wait()
                if out is not None:
                    self.shard_grads[id(b)].add_(out)
            b.pending = []

    def finish_gradients(self) -> None:
        """After the schedule: reduces the deferred (tied-embedding) buckets and waits for every reduction."""
        deferred = [b for b in self.buckets if b.deferred]
        if deferred and self.embedding_group is not None:
            for b in deferred:  # only the tied weight itself: a ZeRO-3 unit may hold more (the final norm)
                full = self.deferred_full[id(b)] if self.sharded_grads else self.grad_buffer[b.start:b.start + b.size]
                for name, p, off in zip(b.names, b.params, b.offsets):
                    if name in self.deferred_names:
                        dist.all_reduce(full[off - b.start:off - b.start + p.numel()], group=self.embedding_group)
        if self.sharded_grads:
            for b in deferred:
                out = torch.empty(b.size // self.dp, dtype=torch.float32, device=self.device)
                reduce_scatter_flat(out, self.deferred_full[id(b)], group=self.dp_group)
                self.shard_grads[id(b)].add_(out)
        elif self.dp > 1:
            for b in self.buckets:
                if b.deferred or not b.pending:  # deferred, or never completed (unused parameters)
                    b.pending.append((dist.all_reduce(self.grad_buffer[b.start:b.start + b.size],
                                                      group=self.dp_group, async_op=True), None, None))
        self._drain()
        self.release_all()

    def grad_norm_squared(self, counted) -> torch.Tensor:
        """Sum of squares of the reduced gradients this rank owns, for parameters `counted(name, param)`
        accepts, summed over the data-parallel group when the optimizer is sharded."""
        grads = [gradient(pc.shard) for pc in self.pieces if counted(pc.name, pc.param)]
        total = global_grad_norm(grads).to(self.device).square() if grads else torch.zeros((), device=self.device)
        if self.stage >= 1 and self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
        return total

    # ---- the update ---------------------------------------------------------------------------------------
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        self._wait_gathers(self.buckets)  # the last step's, where no forward waited (unused parameters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step(grad_scale=grad_scale)
        if self.stage in (1, 2) and self.dp > 1:
            self._gather_all_params(async_op=self.overlap_param_gather)

    # ---- accounting and checkpoints ------------------------------------------------------------------------
    def param_bytes(self) -> int:
        if self.sharded_params:
            return sum(b.shard.numel() * b.shard.element_size() for b in self.buckets)
        return sum(p.numel() * p.element_size() for p in self.where)

    def grad_bytes(self) -> int:
        if not self.sharded_grads:
            return self.grad_buffer.numel() * 4
        return 4 * sum(t.numel() for t in list(self.shard_grads.values()) + list(self.deferred_full.values()))

    def optimizer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.ndim)

    def state_by_name(self) -> dict[str, dict[str, torch.Tensor]]:
        """{parameter name: {state key: tensor}} for every parameter, with the shards of all data-parallel ranks
        combined (complete on data-parallel rank 0; every rank must call this)."""
        if self.stage == 0 or self.dp == 1:  # every piece is a whole parameter
            return {pc.name: {k: v.detach().clone() for k, v in self.optimizer.state.get(pc.shard, {}).items()
                              if torch.is_tensor(v)} for pc in self.pieces}
        keys = sorted({k for s in self.optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and v.ndim})
        step = max([float(s["step"]) for s in self.optimizer.state.values() if "step" in s] or [0.0])
        step_t = torch.tensor(step, dtype=torch.float32, device=self.device)
        dist.all_reduce(step_t, op=dist.ReduceOp.MAX, group=self.dp_group)
        out: dict[str, dict[str, torch.Tensor]] = {name: {"step": step_t.cpu().clone()} for name in self.names.values()}
        for key in keys:
            flat = torch.zeros(self.total, dtype=torch.float32, device=self.device)
            for pc in self.pieces:
                value = self.optimizer.state.get(pc.shard, {}).get(key)
                if value is not None:
                    _, off = self.where[pc.param]
                    flat[off + pc.lo:off + pc.hi] = value.reshape(-1)
            dist.all_reduce(flat, group=self.dp_group)  # every element is owned by exactly one rank
            for p, (_, off) in self.where.items():
                out[self.names[p]][key] = flat[off:off + p.numel()].view_as(p).clone()
        return out

    def load_state_by_name(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """states[name][key]: the saved state of this rank's slice of parameter `name` (tensors shaped like the
        parameter, or whole tensors for other state). Fills the optimizer state of every owned piece; an fp32 run
        takes a saved fp32 master (of a bf16/fp16 run) as the weight itself."""
        self.optimizer.state.clear()
        if hasattr(self.optimizer, "forget_plans"):  # free the old state now: a rollback must not hold it twice
            self.optimizer.forget_plans()
        for pc in self.pieces:
            saved = states.get(pc.name, {})
            state = {}
            for key, value in saved.items():
                if key == "step":
                    state[key] = value.to("cpu", torch.float32).reshape(())
                elif value.shape == pc.param.shape and value.ndim:  # shaped like the parameter: take our piece
                    # (by shape, not size: Adafactor's row statistics of an (n, 1) matrix have its size too)
                    piece = value.reshape(-1)[pc.lo:pc.hi].view(pc.shard.shape)
                    if key == "master_param" and pc.shard.dtype == torch.float32:
                        pc.shard.copy_(piece)  # an fp32 run resuming a bf16/fp16 one: the master is the weight
                        continue
                    state[key] = piece.to(self.device, torch.float32).clone()
                else:
                    state[key] = value.to(self.device).clone()
            if state:
                self.optimizer.state[pc.shard] = state
        if self.stage in (1, 2) and self.dp > 1:  # every rank wrote only its own pieces of the weights
            self._gather_all_params(async_op=False)
