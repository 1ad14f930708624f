"""ZeroOptimizer: ZeRO stages 0-3 over any module, as a torch.optim.Optimizer, with fp32 master weights for
bf16/fp16 parameters.

- stage 0: data parallelism (bucketed all-reduce overlapped with backward); every rank updates everything.
- stage 1: the optimizer state (and fp32 master weights) exist only for the owned shards; after the step the
  updated shards are all-gathered into the parameters.
- stage 2: additionally each rank keeps only its gradient shard (reduce-scatter per micro-batch).
- stage 3: additionally each rank keeps only its parameter shard (units gathered around their forward/backward).

It is built from the pieces in this package: `FlatLayout` (the flat buffer, its buckets and the shard each rank
owns), `GradSync` (hooks and the per-stage gradient reduction), `ParamGather` (stage-3 units, the gathers after a
ZeRO-1/2 step) and the inner optimizer (any torch optimizer) over "shard parameters": views of the owned ranges
of each parameter, whose gradients are views of the reduced gradients. Checkpoints see whole tensors: states are
gathered per parameter, and restored into whatever shards the loading layout owns.

As a library the reduction of a backward is armed by its first gradient and finished by a callback at the end of
that backward, so a user loop is `loss.backward(); opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()`. The
trainer arms and finishes explicitly (`start_step(M)`, `finish_gradients()`) around a pipeline schedule.
Parameters that get no gradient count as zero; frozen parameters (requires_grad=False) are left alone.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.optim.adamw import FusedAdamW, gradient
from engine.optim.clip import clip_coefficient, global_grad_norm
from engine.optim.zero.gather import ParamGather
from engine.optim.zero.grads import GradSync
from engine.optim.zero.layout import FlatLayout, layout_buckets, layout_units


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


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, module, optimizer_class=FusedAdamW, *, stage: int, group=None, units: list | None = None,
                 grad_reduction: str = "mean", bucket_numel: int = 4_000_000, no_weight_decay=None,
                 partial_grad_group=None, keep_params_in_step: bool = False, overlap_param_gather: bool = False,
                 **optimizer_kwargs):
        """module: an nn.Module, or a list of them (a pipeline rank's model chunks, their parameter names taken
        as each chunk gives them; no gradient bucket spans two, and stage 3 prefetches within a chunk), with its
        parameters in forward order. optimizer_class(param_groups,
        **optimizer_kwargs) builds the inner optimizer over this rank's shards. group: the data-parallel
        process group (default: the world). grad_reduction: "mean" (DDP's average over the group) or "sum".
        no_weight_decay(name, param): parameters in a second group with weight_decay 0 (default: none).
        units: [(module entered first, module left last, [parameter names], [names of other units' parameters
        it reads, e.g. a tied head's embedding])] in forward order, for stage 3 and for stages 1-2 with
        overlap_param_gather (the step's all-gathers left in flight, each unit's forward waiting for its own);
        default: `default_units`. partial_grad_group(name, param): the one hook for tensor and
        pipeline parallelism - the process group over which a parameter's gradient is only a partial sum
        (sequence-parallel norm gains: the tensor-parallel group; a tied embedding split across pipeline stages:
        the embedding group), or None; such gradients are summed over it once the backward (the whole pipeline
        schedule) is over, before the data-parallel reduction."""
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeroOptimizer: stage must be 0, 1, 2 or 3 (got {stage!r})")
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"ZeroOptimizer: grad_reduction must be 'mean' or 'sum' (got {grad_reduction!r})")
        modules = list(module) if isinstance(module, (list, tuple)) else [module]
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        self.stage, self.dp_group, self.dp = stage, group, _group_size(group)
        self.dp_rank = 0 if group is None else dist.get_group_rank(group, dist.get_rank())
        named = [(n, p) for m in modules for n, p in m.named_parameters() if p.requires_grad]  # frozen: left alone
        if not named:
            raise ValueError("ZeroOptimizer: the module has no parameter that requires a gradient")
        if len({n for n, _ in named}) != len(named):
            raise ValueError("ZeroOptimizer: modules given as a list must have distinct parameter names (state is "
                             "keyed by name); wrap them in one nn.Module instead")
        partial = {}
        for n, p in named if partial_grad_group is not None else []:
            g = partial_grad_group(n, p)
            if g is not None and _group_size(g) > 1:
                partial[n] = g
        sharded_params = stage >= 3 and self.dp > 1
        self.overlap_param_gather = overlap_param_gather and stage in (1, 2) and self.dp > 1
        if units is None and (sharded_params or self.overlap_param_gather):
            units = default_units(modules)
        if units is not None:  # frozen parameters belong to no unit; units left without parameters go
            trainable = {n for n, _ in named}
            units = [(first, last, [n for n in names if n in trainable], [n for n in borrowed if n in trainable])
                     for first, last, names, borrowed in units]
            units = [u for u in units if u[2]]
        module_of = {n: i for i, m in enumerate(modules) for n, _ in m.named_parameters()}
        buckets = layout_units(units, dict(named), self.dp, set(partial)) if sharded_params else \
            layout_buckets(list(reversed(named)), self.dp, bucket_numel, set(partial), module_of)
        self.layout = FlatLayout(buckets, self.dp, self.dp_rank, shard_optimizer=stage >= 1,
                                 shard_params=stage >= 3)
        self.buckets, self.sharded_params = self.layout.buckets, self.layout.sharded_params
        self.params = ParamGather(self.layout, group, keep_params_in_step)
        self.grads = GradSync(self.layout, group, shard_grads=stage >= 2, mean=grad_reduction == "mean",
                              partial_groups=partial, on_backward_end=self.finish_gradients,
                              on_bucket_reduced=self.params.maybe_release if sharded_params else None)
        self.pieces = self.layout.pieces(self.grads.view)
        self.optimizer = optimizer_class(self._param_groups(no_weight_decay), **optimizer_kwargs)
        # a torch.optim.Optimizer whose param_groups and state are the inner optimizer's (LR schedulers write lr)
        super().__init__([{"params": g["params"]} for g in self.optimizer.param_groups], self.optimizer.defaults)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state
        self.modules = modules
        if sharded_params:
            self.params.install_unit_hooks(units, [module_of[names[0]] for _, _, names, _ in units])
            self.params.install_state_dict_hooks(modules)
        if self.overlap_param_gather:
            self.params.install_wait_hooks(units)

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
        self.grads.zero()

    def start_step(self, num_microbatches: int) -> None:
        """The trainer's explicit path: zeroes the gradients and arms the reduction for a step of
        `num_microbatches` micro-batches, finished by finish_gradients()."""
        self.grads.zero()
        self.grads.arm(num_microbatches)

    def no_sync(self):
        """Gradient accumulation (DDP's no_sync): backward passes inside accumulate gradients locally (stages
        2-3: in full fp32 buckets, the memory ZeRO-2 otherwise saves); the first backward outside reduces them."""
        return self.grads.no_sync()

    def finish_gradients(self) -> None:
        """After the schedule (the trainer), or at the end of a user's backward (a callback): finishes every
        gradient reduction; ZeRO-3 releases every unit."""
        self.grads.finish()
        self.params.release_all()

    def gather_all(self) -> None:
        self.params.gather_all()

    def release_all(self, refresh_shards: bool = False) -> None:
        self.params.release_all(refresh_shards)

    def grad_norm_squared(self, counted) -> torch.Tensor:
        """Sum of squares of the reduced gradients this rank owns, for parameters `counted(name, param)`
        accepts, summed over the data-parallel group when the optimizer is sharded."""
        device = self.layout.device
        grads = [gradient(pc.shard) for pc in self.pieces if counted(pc.name, pc.param)]
        total = global_grad_norm(grads).to(device).square() if grads else torch.zeros((), device=device)
        if self.stage >= 1 and self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
        return total

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, model_parallel_group=None) -> torch.Tensor:
        """Scales the reduced gradients so that their global L2 norm is at most max_norm; returns the norm before.
        The norm is over the data-parallel group and, for a model split by tensor (or pipeline) parallelism, over
        `model_parallel_group` too, a tensor-parallel replica (tagged `tp_duplicate`) counted once. (A weight tied
        across pipeline stages has a copy on each: tag one copy `tp_duplicate` too, or it counts twice.)"""
        squared = self.grad_norm_squared(lambda name, p: not getattr(p, "tp_duplicate", False))
        if model_parallel_group is not None:
            dist.all_reduce(squared, group=model_parallel_group)
        total = squared.sqrt()
        coef = clip_coefficient(total, max_norm)
        if coef < 1.0:
            for pc in self.pieces:
                gradient(pc.shard).mul_(coef)
        return total

    # ---- the update ---------------------------------------------------------------------------------------
    def step(self, closure=None, *, grad_scale=1.0, found_inf=None):
        """One update of this rank's shards with each param group's lr (then stages 1-2 all-gather them);
        grad_scale (a number or a one-element device tensor) multiplies the gradients (FusedAdamW and Adafactor
        fold it into their pass). found_inf (a one-element tensor), when nonzero, skips the update: with
        FusedAdamW decided by its kernels, without waiting for the device (then call undo_step_counters() if it
        was nonzero), otherwise read here. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.grads.armed:  # a trainer-style step whose finish_gradients() was not called
            self.finish_gradients()
        self.params.wait_all()  # the last step's, where no forward waited (unused parameters)
        fused = isinstance(self.optimizer, FusedAdamW)
        if found_inf is not None and not fused and bool(found_inf):
            return loss
        if fused:
            self.optimizer.step(grad_scale=grad_scale, found_inf=found_inf, skip_on_device=True)
        elif torch.is_tensor(grad_scale) or grad_scale != 1.0:
            self.optimizer.step(grad_scale=grad_scale)
        else:
            self.optimizer.step()
        if self.stage in (1, 2) and self.dp > 1:
            self.params.gather_updated(async_op=self.overlap_param_gather)
        return loss

    def undo_step_counters(self) -> None:
        """After a step whose found_inf turned out nonzero (FusedAdamW skipped it on the device): its step counters
        back where they were. A no-op for other optimizers (their step was skipped before it began)."""
        if isinstance(self.optimizer, FusedAdamW):
            self.optimizer.undo_step_counters()

    def full_state_dict(self) -> dict:
        """The module's full state (weights gathered under ZeRO-3) as cloned tensors, on every rank (a
        collective: every rank of the group calls it)."""
        self.gather_all()
        out = {}
        for m in self.modules:
            out.update({k: v.detach().clone() for k, v in m.state_dict().items()})
        self.release_all()
        return out

    # ---- accounting and checkpoints ------------------------------------------------------------------------
    def param_bytes(self) -> int:
        if self.sharded_params:
            return sum(b.shard.numel() * b.shard.element_size() for b in self.buckets)
        return sum(p.numel() * p.element_size() for p in self.layout.where)

    def grad_bytes(self) -> int:
        return 4 * sum(t.numel() for t in self.grads.tensors())

    def optimizer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.ndim)

    def state_by_name(self, copy: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """{parameter name: {state key: tensor}} for every parameter, with the shards of all data-parallel ranks
        combined (complete on data-parallel rank 0; every rank must call this). copy=False: where the state is
        whole on every rank (stage 0 or dp 1) the live tensors themselves, to be copied before the next step
        (`states_are_live` tells whether they are)."""
        if self.states_are_live:  # every piece is a whole parameter
            return {pc.name: {k: v.detach().clone() if copy else v.detach() for k, v in self.optimizer.state.get(pc.shard, {}).items()
                              if torch.is_tensor(v)} for pc in self.pieces}
        keys = sorted({k for s in self.optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and v.ndim})
        step = max([float(s["step"]) for s in self.optimizer.state.values() if "step" in s] or [0.0])
        step_t = torch.tensor(step, dtype=torch.float32, device=self.layout.device)
        dist.all_reduce(step_t, op=dist.ReduceOp.MAX, group=self.dp_group)
        out: dict[str, dict[str, torch.Tensor]] = {name: {"step": step_t.cpu().clone()}
                                                   for name in self.layout.names.values()}
        for key in keys:
            flat = torch.zeros(self.layout.total, dtype=torch.float32, device=self.layout.device)
            for pc in self.pieces:
                value = self.optimizer.state.get(pc.shard, {}).get(key)
                if value is not None:
                    _, off = self.layout.where[pc.param]
                    flat[off + pc.lo:off + pc.hi] = value.reshape(-1)
            dist.all_reduce(flat, group=self.dp_group)  # every element is owned by exactly one rank
            for p, (_, off) in self.layout.where.items():
                out[self.layout.names[p]][key] = flat[off:off + p.numel()].view_as(p).clone()
        return out

    @property
    def states_are_live(self) -> bool:
        """Whether state_by_name(copy=False) hands out the optimizer's own tensors (else fresh combined copies)."""
        return self.stage == 0 or self.dp == 1

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
                    state[key] = piece.to(self.layout.device, torch.float32).clone()
                else:
                    state[key] = value.to(self.layout.device).clone()
            if state:
                self.optimizer.state[pc.shard] = state
        if self.stage in (1, 2) and self.dp > 1:  # every rank wrote only its own pieces of the weights
            self.params.gather_updated(async_op=False)
