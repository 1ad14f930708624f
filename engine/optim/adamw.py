"""FusedAdamW: AdamW in one fused multi-tensor pass (csrc/ kernels through engine.ext)."""
from __future__ import annotations

import dataclasses

import torch

from engine import ext

STATE_KEYS = ("exp_avg", "exp_avg_sq", "master_param")  # fp32 tensors shaped like the param; plus "step"


def gradient(p: torch.Tensor) -> torch.Tensor | None:
    """A parameter's gradient as the optimizers read it: `p.main_grad` when set (an fp32 gradient kept beside a
    low-precision parameter, as Megatron names it; torch before 2.10 refuses a .grad of another dtype), else
    `p.grad`."""
    main = getattr(p, "main_grad", None)
    return p.grad if main is None else main


def keep_fp32_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """After torch's load_state_dict, which casts floating-point state to each parameter's dtype: puts the saved
    state back as fp32 (moments, statistics and masters of bf16/fp16 parameters stay fp32), on the parameter's
    device, "step" on the CPU."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    for i, p in zip(saved_ids, params):
        saved = state_dict["state"].get(i)
        if saved is not None:
            optimizer.state[p] = {k: v.detach().to(device="cpu" if k == "step" else p.device, dtype=torch.float32,
                                                   copy=True) if torch.is_tensor(v) else v for k, v in saved.items()}


@dataclasses.dataclass
class _Bucket:
    """Parameters one kernel call updates together: same device, dtypes, master-weight mode and step. They share
    one step counter tensor (each one's state["step"] is that object), so a step advances it once."""
    params: list
    states: list  # held, so that a plan's signature (ids of these dicts) cannot match a recycled id
    exp_avgs: list
    exp_avg_sqs: list
    masters: list
    step: torch.Tensor


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter; or Adam with L2 regularisation when adam_w_mode=False) as one fused pass over
    all parameters of a group on one device: the step reads each parameter, gradient and moment once and writes
    them back, with bias correction, weight decay and an optional gradient scale folded in.

    With master_weights=True, bf16/fp16 parameters keep an fp32 copy (state "master_param") that the step
    updates, and the parameter receives its rounding in the same pass. fp32 parameters are their own master.
    Gradients are read by `gradient(p)`: `p.main_grad` when set, else `p.grad`.

    State per parameter, all tensors (checkpoints save and restore them as they are): "step" (0-dim fp32, CPU),
    "exp_avg" and "exp_avg_sq" (fp32, on the parameter's device), and "master_param" with master weights.
    Parameters stepped together share one "step" tensor (state_dict() gives each parameter its own copy).
    `ops` overrides the kernels (an engine.ext.CompiledOps or TorchOps); by default engine.ext picks them.

    The host work per step is small: which parameters go into which kernel call is worked out once and reused
    while the parameters' gradients, dtypes, devices and state tensors stay the same (a cheap signature checks it).

    The signature and defaults are torch.optim.AdamW's, so it drops into code written for it. `foreach` and
    `fused` choose an implementation there and are accepted and ignored here (the step is always fused);
    `amsgrad`, `maximize`, `capturable` and `differentiable` change what is computed and are refused.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=False, adam_w_mode=True, ops=None):
        refused = [f"{name}=True" for name, on in (("amsgrad", amsgrad), ("maximize", maximize),
                                                   ("capturable", capturable), ("differentiable", differentiable))
                   if on]
        if refused:
            raise ValueError(f"FusedAdamW does not implement {', '.join(refused)}; use torch.optim.AdamW for that")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"FusedAdamW: invalid hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode)
        super().__init__(params, defaults)
        self.master_weights = master_weights
        self.ops = ops
        self._plans: dict[int, tuple] = {}  # id(param group) -> (signature, the state it was built on, buckets)
        self._advanced: list[torch.Tensor] = []  # the step counters the last step advanced

    def _state(self, p: torch.Tensor) -> dict:
        """The parameter's state, created on first use and normalised (fp32, on the right devices) after a restore."""
        st = self.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in st:
                st[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.master_weights and p.dtype != torch.float32 and "master_param" not in st:
            st["master_param"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        for key in STATE_KEYS:
            if key in st and (st[key].device != p.device or st[key].dtype != torch.float32):
                st[key] = st[key].to(device=p.device, dtype=torch.float32)
        step = st.get("step")
        if step is None or step.device.type != "cpu" or step.dtype != torch.float32:
            st["step"] = torch.zeros((), dtype=torch.float32) if step is None else step.to("cpu", torch.float32)
        return st

    @torch.no_grad()
    def step(self, closure=None, grad_scale=None, found_inf=None, *, skip_on_device=False):
        """One step. grad_scale (a number or a one-element tensor) multiplies the gradients inside the pass (the
        fp16 unscale 1/loss_scale times the clip coefficient); found_inf (a one-element tensor), when nonzero,
        skips the step, step counters included: read on the host, as the counters live there, or with
        skip_on_device left to the kernels, so that nothing waits for the device - the counters advance then, and
        the caller, once it has read found_inf and found it nonzero, calls undo_step_counters()."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if found_inf is not None and not skip_on_device and bool(found_inf):
            return loss
        self._advanced = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for b in self._plan(group):
                step = int(b.step.add_(1.0).item())  # (a CPU tensor: no device sync)
                self._advanced.append(b.step)
                ops = self.ops or ext.ops_for(b.params[0].device)
                ops.adamw_(b.params, [gradient(p).contiguous() for p in b.params], b.exp_avgs, b.exp_avg_sqs,
                           b.masters, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"], step=step, adam_w_mode=group["adam_w_mode"],
                           grad_scale=grad_scale, found_inf=found_inf if skip_on_device else None)
        return loss

    def undo_step_counters(self) -> None:
        """After a step(skip_on_device=True) whose found_inf was nonzero: the step counters back where they were
        (the kernels left everything else untouched)."""
        for counter in self._advanced:
            counter.sub_(1.0)
        self._advanced = []

    def _signature(self, group) -> list:
        """What the group's plan depends on, per parameter."""
        sig = [id(self.state)]
        for p in group["params"]:
            g = gradient(p)
            st = self.state.get(p)
            sig.append(None if g is None else (g.dtype, p.dtype, p.device, st and tuple(map(id, st.values()))))
        return sig

    def _plan(self, group) -> list[_Bucket]:
        signature = self._signature(group)
        cached = self._plans.get(id(group))
        if cached is not None and cached[0] == signature:
            return cached[2]
        buckets = self._build_plan(group)
        self._plans[id(group)] = (self._signature(group), self.state, buckets)  # the states exist now
        return buckets

    def _build_plan(self, group) -> list[_Bucket]:
        """The group's parameters with gradients, by what one kernel call needs to share: device, dtypes, master
        weights and step."""
        params = [p for p in group["params"] if gradient(p) is not None]
        if any(gradient(p).is_sparse for p in params):
            raise RuntimeError("FusedAdamW does not support sparse gradients")
        by_key: dict[tuple, list] = {}
        for p in params:
            st = self._state(p)
            key = (p.device, p.dtype, gradient(p).dtype, "master_param" in st, float(st["step"]))
            by_key.setdefault(key, []).append((p, st))
        buckets = []
        for (*_, step), items in by_key.items():
            params, states = [p for p, _ in items], [st for _, st in items]
            shared = torch.tensor(step, dtype=torch.float32)
            for st in states:
                st["step"] = shared
            buckets.append(_Bucket(params, states, [st["exp_avg"] for st in states],
                                   [st["exp_avg_sq"] for st in states],
                                   [st["master_param"] for st in states if "master_param" in st], shared))
        return buckets

    def forget_plans(self) -> None:
        """Drops the cached plans (and their references to the state tensors) now rather than at the next step:
        for code that replaces optimizer.state wholesale and wants the old tensors freed at once."""
        self._plans.clear()

    def state_dict(self) -> dict:
        """torch's state_dict, with a step tensor of its own for every parameter (in the optimizer, the parameters
        of one kernel call share theirs; shared tensors would stay shared through torch.save and load)."""
        out = super().state_dict()
        out["state"] = {i: {**s, "step": s["step"].clone()} if "step" in s else s for i, s in out["state"].items()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.forget_plans()
        keep_fp32_state(self, state_dict)
