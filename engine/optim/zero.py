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

As a library (`ZeroOptimizer(module, optimizer_class, stage=...)`, a torch.optim.Optimizer): the reduction of
a backward pass is armed by its first gradient and finished by a callback at the end of that backward, so a user
loop is `loss.backward(); opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()`. Parameters that get no gradient
count as zero; frozen parameters (requires_grad=False) are left as they are (not sharded, not optimised).
`grad_reduction="mean"` divides by dp before the reduction (DDP's average), "sum" leaves the sum. `no_sync()`
accumulates gradients locally until the first backward outside it (stages 2/3 in full fp32 buckets, as FSDP2's
set_requires_gradient_sync(False) does). The trainer arms and finishes explicitly (`start_step(M)`,
`finish_gradients()`), with every bucket complete after its M-th micro-batch.

The optimizer is any torch optimizer built over "shard parameters": views of the owned ranges of each
parameter, whose gradients are views of the reduced gradients. Checkpoints see whole tensors: states are
gathered per parameter, and restored into whatever shards the loading layout owns.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from engine.optim.adamw import FusedAdamW, gradient
from engine.optim.clip import clip_coefficient, global_grad_norm

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
    ready: int = 0                     # stages 0-1: parameters whose gradients are final
    seen: set = field(default_factory=set)  # stages 2-3: parameters already in the temporary full bucket
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


def default_units(modules) -> list:
    """ZeRO-3's default gathering units: every child of each nn.ModuleList / nn.ModuleDict (the outermost ones
    claim their parameters first), and then the rest of each module as one unit, entered and left with it."""
    units = []
    for module in modules:
        names = {p: n for n, p in module.named_parameters() if p.requires_grad}
        claimed, children = set(), []
        for container in module.modules():
            if isinstance(container, (nn.ModuleList, nn.ModuleDict)):
                for child in container.children():
                    own = [p for p in child.parameters() if p in names and p not in claimed]
                    claimed.update(own)
                    if own:
                        children.append((child, child, [names[p] for p in own], []))
        rest = [n for p, n in names.items() if p not in claimed]
        units += ([(module, module, rest, [])] if rest else []) + children
    return units


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, module, optimizer_class=FusedAdamW, *, stage: int, group=None, units: list | None = None,
                 grad_reduction: str = "mean", bucket_numel: int = 4_000_000, no_weight_decay=None,
                 deferred: set = frozenset(), tp_reduced: set = frozenset(), tp_group=None, embedding_group=None,
                 keep_params_in_step: bool = False, overlap_param_gather: bool = False, **optimizer_kwargs):
        """module: an nn.Module, or a list of them (a pipeline rank's model chunks, their parameter names taken
        as each chunk gives them), with its parameters in forward order. optimizer_class(param_groups,
        **optimizer_kwargs) builds the inner optimizer over this rank's shards. group: the data-parallel
        process group (default: the world). grad_reduction: "mean" (DDP's average over the group) or "sum".
        no_weight_decay(name, param): parameters in a second group with weight_decay 0 (default: none).
        units: [(module entered first, module left last, [parameter names], [names of other units' parameters
        it reads, e.g. a tied head's embedding])] in forward order (stage 3 - default: `default_units` - and
        stages 1-2 with overlap_param_gather). For the trainer: deferred: names whose gradients must first be
        summed over `embedding_group` after the schedule; tp_reduced: names whose gradients are partial sums over
        `tp_group` (sequence-parallel norm gains)."""
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeroOptimizer: stage must be 0, 1, 2 or 3 (got {stage!r})")
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"ZeroOptimizer: grad_reduction must be 'mean' or 'sum' (got {grad_reduction!r})")
        modules = list(module) if isinstance(module, (list, tuple)) else [module]
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        self.stage, self.dp_group, self.dp = stage, group, _dp_size(group)
        self.dp_rank = 0 if group is None else dist.get_group_rank(group, dist.get_rank())
        self.tp_group, self.embedding_group = tp_group, embedding_group
        self.tp_reduced, self.keep_params, self.deferred_names = tp_reduced, keep_params_in_step, set(deferred)
        self.mean = grad_reduction == "mean" and self.dp > 1
        self.sharded_params = stage >= 3 and self.dp > 1
        named = [(n, p) for m in modules for n, p in m.named_parameters() if p.requires_grad]  # frozen: left alone
        if not named:
            raise ValueError("ZeroOptimizer: the module has no parameter that requires a gradient")
        if len({n for n, _ in named}) != len(named):
            raise ValueError("ZeroOptimizer: modules given as a list must have distinct parameter names (state is "
                             "keyed by name); wrap them in one nn.Module instead")
        self.dtype, self.device = named[0][1].dtype, named[0][1].device
        if units is None and self.sharded_params:
            units = default_units(modules)
        if units is not None:  # frozen parameters belong to no unit; units left without parameters go
            trainable = {n for n, _ in named}
            units = [(first, last, [n for n in names if n in trainable], borrowed)
                     for first, last, names, borrowed in units]
            units = [u for u in units if u[2]]
        if self.sharded_params:
            self.buckets = self._layout_units(units, dict(named), deferred)
        else:
            self.buckets = self._layout(list(reversed(named)), bucket_numel, deferred)
        self.total = sum(b.size for b in self.buckets)
        self.where, self.names = {}, {}
        self._place_parameters()
        self.sharded_grads = stage >= 2 and self.dp > 1
        self._allocate_grads(self.total)
        self.pieces = self._pieces()
        self.optimizer = optimizer_class(self._param_groups(no_weight_decay), **optimizer_kwargs)
        # a torch.optim.Optimizer whose param_groups and state are the inner optimizer's (LR schedulers write lr)
        super().__init__([{"params": g["params"]} for g in self.optimizer.param_groups], self.optimizer.defaults)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
        self.num_microbatches, self.counts = 1, {}
        self._armed = self._skip_sync = self._reduced = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b.params]
        self.modules = modules
        if self.sharded_params:
            self._install_unit_hooks(units)
            self._sd_depth, self._sd_gathered = 0, []
            for m in modules:
                for sub in m.modules():
                    # (plain functions: torch tags public post hooks with an attribute, which methods refuse)
                    sub.register_state_dict_pre_hook(lambda *a: self._state_dict_pre(*a))
                    sub.register_state_dict_post_hook(lambda *a: self._state_dict_post(*a))
                    sub.register_load_state_dict_pre_hook(lambda *a: self._load_state_dict_pre(*a))
                    sub.register_load_state_dict_post_hook(lambda *a: self._load_state_dict_post(*a))
        self.overlap_param_gather = overlap_param_gather and stage in (1, 2) and self.dp > 1
        if self.overlap_param_gather:
            if units is None:
                raise ValueError("overlap_param_gather needs `units`: the modules whose forward waits for the gathers")
            self._install_param_wait_hooks(units)
        # NCCL gathers in place from the rank's own slice of the output; gloo needs a separate input
        self._inplace_gather = group is not None and dist.get_backend(group) == "nccl"

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
        outputs = list(out.values()) if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
        for t in outputs:  # a tensor, or a tuple / dict of them (Hugging Face outputs)
            if torch.is_tensor(t) and t.requires_grad:
                t.register_hook(lambda grad, needs=needs, prev=prev: self._before_backward(needs, prev))
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

    def _param_groups(self, no_weight_decay=None) -> list[dict]:
        """One group, or with no_weight_decay(name, param) a second one with weight_decay 0 (the trainer's
        rule: none on vectors such as norm gains)."""
        if no_weight_decay is None:
            return [{"params": [pc.shard for pc in self.pieces]}]
        decay = [pc.shard for pc in self.pieces if not no_weight_decay(pc.name, pc.param)]
        no_decay = [pc.shard for pc in self.pieces if no_weight_decay(pc.name, pc.param)]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ---- gradients ----------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradient buffers (they stay the parameters' .grad / main_grad: set_to_none is ignored)."""
        if self.sharded_grads:
            for g in list(self.shard_grads.values()) + list(self.deferred_full.values()):
                g.zero_()
            self.temp_full.clear()  # what no_sync() accumulated
            for b in self.buckets:
                b.seen = set()
        else:
            self.grad_buffer.zero_()
        self._reduced = False

    def start_step(self, num_microbatches: int) -> None:
        """The trainer's explicit path: zeroes the gradients and arms the reduction for a step of
        `num_microbatches` micro-batches, finished by finish_gradients()."""
        self.zero_grad()
        self._arm(num_microbatches)

    def _arm(self, num_microbatches: int) -> None:
        self.num_microbatches, self._armed = num_microbatches, True
        self.counts = {p: 0 for b in self.buckets for p in b.params}
        for b in self.buckets:
            b.ready = 0

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation (DDP's no_sync): backward passes inside accumulate gradients locally (stages
        2-3: in full fp32 buckets, the memory ZeRO-2 otherwise saves); the first backward outside reduces them."""
        previous, self._skip_sync = self._skip_sync, True
        try:
            yield
        finally:
            self._skip_sync = previous

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._armed:  # a user's backward: arm for it, finish at its end
            if self._reduced and not self._skip_sync and not self.sharded_grads and not self.mean and self.dp > 1:
                raise RuntimeError("ZeroOptimizer(grad_reduction='sum'): a second backward reduces gradients that "
                                   "were already reduced; run the earlier ones under no_sync() or call zero_grad()")
            self._arm(1)
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_gradients)
        b, off = self.where[p]
        if self.sharded_grads:
            self._accumulate_sharded(p, b, off)
            return
        if p.grad is not self.main_grad[p]:  # low-precision parameters: add into the fp32 main gradient
            self.main_grad[p].add_(p.grad)
            p.grad = None
        if self._skip_sync:
            return
        self.counts[p] += 1
        if self.counts[p] == self.num_microbatches:
            if self.names[p] in self.tp_reduced and self.tp_group is not None:
                dist.all_reduce(self.main_grad[p], group=self.tp_group)
            b.ready += 1
            if b.ready == len(b.params) and not b.deferred and self.dp > 1:
                self._all_reduce(b)

    def _all_reduce(self, b: Bucket) -> None:
        flat = self.grad_buffer[b.start:b.start + b.size]
        if self.mean:
            flat.mul_(1.0 / self.dp)
        b.pending.append((dist.all_reduce(flat, group=self.dp_group, async_op=True), None, None))

    def _accumulate_sharded(self, p, b: Bucket, off: int) -> None:
        """stage 2/3: gradients of one micro-batch go into a temporary full bucket, reduce-scattered when every
        parameter of the bucket has added its gradient, or before a parameter adds a second one (another
        micro-batch's: some parameter got none), or at the end of the backward."""
        grad = p.grad.reshape(-1)
        p.grad = None
        if self.names[p] in self.tp_reduced and self.tp_group is not None:
            # only this micro-batch's contribution: the bucket may already hold reduced ones (interleaved chunks)
            grad = grad.to(torch.float32, copy=True)
            dist.all_reduce(grad, group=self.tp_group)
        if b.deferred:
            self.deferred_full[id(b)][off - b.start:off - b.start + p.numel()].add_(grad)
            return
        if p in b.seen:
            self._reduce_scatter(b)
        full = self.temp_full.get(id(b))
        if full is None:
            full = self.temp_full[id(b)] = torch.zeros(b.size, dtype=torch.float32, device=self.device)
        full[off - b.start:off - b.start + p.numel()].add_(grad)
        if self._skip_sync:  # no_sync: the full bucket accumulates until a backward outside it
            return
        b.seen.add(p)
        if len(b.seen) == len(b.params):
            if self.sharded_params:
                self._maybe_release(b)
            self._reduce_scatter(b)

    def _reduce_scatter(self, b: Bucket) -> None:
        """Launches the reduce-scatter of b's temporary full bucket (if any) into this rank's shard."""
        b.seen = set()
        full = self.temp_full.pop(id(b), None)
        if full is None:
            return
        self._drain()
        if self.mean:
            full.mul_(1.0 / self.dp)
        out = torch.empty(b.size // self.dp, dtype=torch.float32, device=self.device)
        b.pending.append((reduce_scatter_flat(out, full, group=self.dp_group, async_op=True), out, full))

    def _drain(self) -> None:
        for b in self.buckets:
            for work, out, _ in b.pending:
                work.wait()
                if out is not None:
                    self.shard_grads[id(b)].add_(out)
            b.pending = []

    def finish_gradients(self) -> None:
        """After the schedule (the trainer), or at the end of a user's backward (a callback): reduces what is
        still pending - buckets with parameters that got no gradient, the deferred (tied-embedding) buckets -
        and waits for every reduction; ZeRO-3 releases every unit."""
        deferred = [b for b in self.buckets if b.deferred]
        if not self._skip_sync:
            for b in self.buckets if self.sharded_grads else []:
                if not b.deferred:
                    self._reduce_scatter(b)
            if deferred and self.embedding_group is not None:
                for b in deferred:  # only the tied weight itself: a ZeRO-3 unit may hold more (the final norm)
                    full = self.deferred_full[id(b)] if self.sharded_grads else self.grad_buffer[b.start:b.start + b.size]
                    for name, p, off in zip(b.names, b.params, b.offsets):
                        if name in self.deferred_names:
                            dist.all_reduce(full[off - b.start:off - b.start + p.numel()], group=self.embedding_group)
            if self.sharded_grads:
                for b in deferred:
                    out = torch.empty(b.size // self.dp, dtype=torch.float32, device=self.device)
                    if self.mean:
                        self.deferred_full[id(b)].mul_(1.0 / self.dp)
                    reduce_scatter_flat(out, self.deferred_full[id(b)], group=self.dp_group)
                    self.shard_grads[id(b)].add_(out)
                    self.deferred_full[id(b)].zero_()
            elif self.dp > 1:
                for b in self.buckets:
                    if b.deferred or not b.pending:  # deferred, or never completed (unused parameters)
                        self._all_reduce(b)
                self._reduced = True
        self._drain()
        self.release_all()
        self._armed = False

    def grad_norm_squared(self, counted) -> torch.Tensor:
        """Sum of squares of the reduced gradients this rank owns, for parameters `counted(name, param)`
        accepts, summed over the data-parallel group when the optimizer is sharded."""
        grads = [gradient(pc.shard) for pc in self.pieces if counted(pc.name, pc.param)]
        total = global_grad_norm(grads).to(self.device).square() if grads else torch.zeros((), device=self.device)
        if self.stage >= 1 and self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
        return total

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scales the reduced gradients so that their global L2 norm (over the data-parallel group, a
        tensor-parallel replica tagged `tp_duplicate` counted once) is at most max_norm; returns the norm before."""
        total = self.grad_norm_squared(lambda name, p: not getattr(p, "tp_duplicate", False)).sqrt()
        coef = clip_coefficient(total, max_norm)
        if coef < 1.0:
            for pc in self.pieces:
                gradient(pc.shard).mul_(coef)
        return total

    # ---- the update ---------------------------------------------------------------------------------------
    def step(self, closure=None, *, grad_scale: float = 1.0):
        """One update of this rank's shards with each param group's lr (then stages 1-2 all-gather them);
        grad_scale multiplies the gradients (FusedAdamW and Adafactor fold it into their pass)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._armed:  # a trainer-style step whose finish_gradients() was not called
            self.finish_gradients()
        self._wait_gathers(self.buckets)  # the last step's, where no forward waited (unused parameters)
        if grad_scale != 1.0 or isinstance(self.optimizer, FusedAdamW):
            self.optimizer.step(grad_scale=grad_scale)
        else:
            self.optimizer.step()
        if self.stage in (1, 2) and self.dp > 1:
            self._gather_all_params(async_op=self.overlap_param_gather)
        return loss

    # ---- whole weights: module.state_dict() at stage 3, full_state_dict() ----------------------------------
    def full_state_dict(self) -> dict:
        """The module's full state (weights gathered under ZeRO-3) as cloned tensors, on every rank (a
        collective: every rank of the group calls it)."""
        self.gather_all()
        out = {}
        for m in self.modules:
            out.update({k: v.detach().clone() for k, v in m.state_dict().items()})
        self.release_all()
        return out

    def _state_dict_pre(self, module, prefix, keep_vars) -> None:
        if self._sd_depth == 0:  # the outermost module.state_dict(): gather (every rank calls it, like FSDP)
            self._sd_gathered = [b for b in self.buckets if not b.gathered]
            for b in self._sd_gathered:
                self._gather(b)
        self._sd_depth += 1

    def _state_dict_post(self, module, state_dict, prefix, local_metadata) -> None:
        for name, p in module.named_parameters(recurse=False):
            if p in self.where and prefix + name in state_dict:  # a copy: the gathered storage is released
                state_dict[prefix + name] = state_dict[prefix + name].detach().clone()
        self._sd_depth -= 1
        if self._sd_depth == 0:
            for b in self._sd_gathered:
                self._release(b)
            self._sd_gathered = []

    def _load_state_dict_pre(self, module, *args) -> None:
        for p in module.parameters(recurse=False):
            if p in self.where:
                self._gather(self.where[p][0])

    def _load_state_dict_post(self, module, incompatible_keys) -> None:
        for p in module.parameters(recurse=False):
            if p in self.where and self.where[p][0].gathered:
                b = self.where[p][0]
                lo, hi = self._owned(b)
                b.shard.copy_(b.full[lo - b.start:hi - b.start])
                self._maybe_release(b)

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

    def state_dict(self) -> dict:
        """{"state": {parameter name: {key: whole tensor}}, "param_groups": [hyper-parameters of each group]}:
        loadable at any dp size or stage (a collective over the group: every rank calls it)."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"state": self.state_by_name(), "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores what state_dict() returned, saved under any dp size or stage (the module's weights are
        loaded separately: module.load_state_dict(full_state_dict)). Every rank calls it."""
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"ZeroOptimizer.load_state_dict: {len(state_dict['param_groups'])} parameter groups "
                             f"saved, {len(self.param_groups)} here (same no_weight_decay rule needed)")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.load_state_by_name(state_dict["state"])

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
