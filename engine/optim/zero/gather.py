"""Parameter gathering: ZeRO-3's units gathered around their forward and backward, and the all-gather of updated
shards after a ZeRO-1/2 step (optionally left in flight until the forward that needs them).

- stage 3: a unit's buckets are all-gathered just before its forward (the next unit's gather is started at the
  same time) and again when its output's gradient arrives, and released after each. With keep_params they stay
  gathered from first use to the end of the step: one gather per step instead of two per micro-batch, at the
  cost of holding the stage's full parameters during the step. `module.state_dict()` gathers (a collective) and
  returns copies; `module.load_state_dict()` writes into the shards.
- stages 1-2: after the step every bucket's updated shards are all-gathered into the parameters; with overlap
  the gathers are launched asynchronously in forward order and each unit's next forward (a pre-hook) waits only
  for the buckets that hold its parameters. `gather_all()` waits for all of them (before anything else reads
  the parameters: checkpoints, rollbacks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.optim.zero.layout import Bucket, FlatLayout

all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


class ParamGather:
    def __init__(self, layout: FlatLayout, group, keep_params: bool = False):
        self.layout, self.buckets, self.group, self.keep_params = layout, layout.buckets, group, keep_params
        self.sharded = layout.sharded_params
        # NCCL gathers in place from the rank's own slice of the output; gloo needs a separate input
        self.inplace = group is not None and dist.get_backend(group) == "nccl"
        self.release_all()

    # ---- stage 3 --------------------------------------------------------------------------------------------
    def gather(self, b: Bucket, wait: bool = True) -> None:
        if not b.gathered:
            b.full.untyped_storage().resize_(b.size * b.full.element_size())
            b.gather = all_gather_flat(b.full, b.shard, group=self.group, async_op=True)
            b.gathered = True
        if wait:
            self.wait(b)

    def release(self, b: Bucket) -> None:
        if b.gathered:
            self.wait(b)
            b.full.untyped_storage().resize_(0)
            b.gathered = False

    def maybe_release(self, b: Bucket) -> None:
        """Releases b unless the parameters are kept gathered for the whole step."""
        if not self.keep_params:
            self.release(b)

    def gather_all(self) -> None:
        """Makes every parameter whole and current on this rank: stage 3 gathers every unit; stages 1-2 wait for
        the step's in-flight gathers."""
        for b in self.buckets:
            if self.sharded:
                self.gather(b)
            else:
                self.wait(b)

    def release_all(self, refresh_shards: bool = False) -> None:
        """Releases every gathered unit; refresh_shards first copies this rank's part back into its shard (after
        the full parameters were overwritten, e.g. by a checkpoint load)."""
        for b in self.buckets if self.sharded else []:
            if refresh_shards and b.gathered:
                self.refresh_shard(b)
            self.release(b)

    def refresh_shard(self, b: Bucket) -> None:
        lo, hi = self.layout.owned(b)
        b.shard.copy_(b.full[lo - b.start:hi - b.start])

    def install_unit_hooks(self, units, modules: list[int]) -> None:
        """Each unit gathers its buckets, and those of other units' parameters it reads (`borrowed`), for its
        forward and again for its backward, prefetching the neighbouring unit's buckets in the same module
        (modules[i]: unit i's; a pipeline rank's model chunks run interleaved with other micro-batches, so the next
        chunk's first unit is not the next to run)."""
        own = [self.layout.buckets_holding(names) for _, _, names, _ in units]
        for i, (first, last, _, borrowed) in enumerate(units):
            needs = own[i] + self.layout.buckets_holding(borrowed)
            nxt = own[i + 1] if i + 1 < len(own) and modules[i + 1] == modules[i] else []
            prev = own[i - 1] if i > 0 and modules[i - 1] == modules[i] else []
            first.register_forward_pre_hook(lambda *_, needs=needs, nxt=nxt: self._around(needs, nxt))
            last.register_forward_hook(lambda m, args, out, needs=needs, prev=prev: self._after_forward(needs, prev,
                                                                                                      out))

    def _around(self, needs: list[Bucket], neighbour: list[Bucket]) -> None:
        for b in needs:
            self.gather(b)
        for b in neighbour:  # prefetch: overlaps the neighbour's gather with this unit's compute
            self.gather(b, wait=False)

    def _after_forward(self, needs: list[Bucket], prev: list[Bucket], out) -> None:
        if torch._C._current_graph_task_id() != -1:  # a recomputation inside backward: keep the parameters
            return
        outputs = list(out.values()) if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
        for t in outputs:  # a tensor, or a tuple / dict of them (Hugging Face outputs)
            if torch.is_tensor(t) and t.requires_grad:
                t.register_hook(lambda grad, needs=needs, prev=prev: self._around(needs, prev))
        for b in needs:
            self.maybe_release(b)

    def install_state_dict_hooks(self, modules) -> None:
        """module.state_dict() gathers every unit (every rank calls it, like FSDP) and returns copies;
        module.load_state_dict() writes into the gathered units and copies the owned part into the shards."""
        self._sd_depth, self._sd_gathered = 0, []
        for m in modules:
            for sub in m.modules():
                # (plain functions: torch tags public post hooks with an attribute, which methods refuse)
                sub.register_state_dict_pre_hook(lambda *a: self._state_dict_pre(*a))
                sub.register_state_dict_post_hook(lambda *a: self._state_dict_post(*a))
                sub.register_load_state_dict_pre_hook(lambda *a: self._load_state_dict_pre(*a))
                sub.register_load_state_dict_post_hook(lambda *a: self._load_state_dict_post(*a))

    def _state_dict_pre(self, module, prefix, keep_vars) -> None:
        if self._sd_depth == 0:  # the outermost module.state_dict()
            self._sd_gathered = [b for b in self.buckets if not b.gathered]
            for b in self._sd_gathered:
                self.gather(b)
        self._sd_depth += 1

    def _state_dict_post(self, module, state_dict, prefix, local_metadata) -> None:
        for name, p in module.named_parameters(recurse=False):
            if p in self.layout.where and prefix + name in state_dict:  # a copy: the gathered storage is released
                state_dict[prefix + name] = state_dict[prefix + name].detach().clone()
        self._sd_depth -= 1
        if self._sd_depth == 0:
            for b in self._sd_gathered:
                self.release(b)
            self._sd_gathered = []

    def _load_state_dict_pre(self, module, *args) -> None:
        for p in module.parameters(recurse=False):
            if p in self.layout.where:
                self.gather(self.layout.where[p][0])

    def _load_state_dict_post(self, module, incompatible_keys) -> None:
        for p in module.parameters(recurse=False):
            b = self.layout.where[p][0] if p in self.layout.where else None
            if b is not None and b.gathered:
                self.refresh_shard(b)
                self.maybe_release(b)

    # ---- stages 1-2 -----------------------------------------------------------------------------------------
    def install_wait_hooks(self, units) -> None:
        """Each unit's forward waits for the in-flight gathers of the buckets holding its parameters."""
        for first, _, names, borrowed in units:
            buckets = self.layout.buckets_holding(names + borrowed)
            first.register_forward_pre_hook(lambda *_, buckets=buckets: self.wait_all(buckets))

    def gather_updated(self, async_op: bool) -> None:
        """All-gathers every bucket's updated shards into the parameters, the embedding's bucket first (buckets
        are in backward order)."""
        buffer = self.layout.param_buffer
        for b in reversed(self.buckets):
            own_lo, own_hi = self.layout.owned(b)
            b.send = buffer[own_lo:own_hi] if self.inplace else buffer[own_lo:own_hi].clone()
            b.gather = all_gather_flat(buffer[b.start:b.start + b.size], b.send, group=self.group, async_op=async_op)
            if not async_op:
                b.gather, b.send = None, None

    def wait(self, b: Bucket) -> None:
        """Waits for b's in-flight parameter all-gather, if any (every stage)."""
        if b.gather is not None:
            b.gather.wait()
            b.gather, b.send = None, None

    def wait_all(self, buckets=None) -> None:
        for b in self.buckets if buckets is None else buckets:
            self.wait(b)
