"""FusedAdamW: AdamW in one fused multi-tensor pass (csrc/ kernels through engine.ext)."""
from __future__ import annotations

import torch

from engine import ext

STATE_KEYS = ("exp_avg", "exp_avg_sq", "master_param")  # fp32 tensors shaped like the param; plus "step"


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter; or Adam with L2 regularisation when adam_w_mode=False) as one fused pass over
    all parameters of a group on one device: the step reads each parameter, gradient and moment once and writes
    them back, with bias correction, weight decay and an optional gradient scale folded in.

    With master_weights=True, bf16/fp16 parameters keep an fp32 copy (state "master_param") that the step
    updates, and the parameter receives its rounding in the same pass. fp32 parameters are their own master.

    State per parameter, all tensors (checkpoints save and restore them as they are): "step" (0-dim fp32, CPU),
    "exp_avg" and "exp_avg_sq" (fp32, on the parameter's device), and "master_param" with master weights.
    `ops` overrides the kernels (an engine.ext.CompiledOps or TorchOps); by default engine.ext picks them.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, master_weights=False,
                 adam_w_mode=True, *, ops=None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"FusedAdamW: invalid hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode)
        super().__init__(params, defaults)
        self.master_weights = master_weights
        self.ops = ops

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
    def step(self, closure=None, grad_scale=None, found_inf=None):
        """One step. grad_scale (a number or a one-element tensor) multiplies the gradients inside the pass (the
        fp16 unscale 1/loss_scale times the clip coefficient); found_inf (a one-element tensor), when nonzero,
        skips the step, step counters included (it is read on the host, as the counters live there)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if found_inf is not None and bool(found_inf):
            return loss
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for (device, *_, step), items in self._buckets(group).items():
                params = [p for p, _ in items]
                masters = [st["master_param"] for p, st in items if "master_param" in st]
                ops = self.ops or ext.ops_for(device)
                ops.adamw_(params, [p.grad.contiguous() for p in params], [st["exp_avg"] for _, st in items],
                           [st["exp_avg_sq"] for _, st in items], masters, lr=float(group["lr"]), beta1=beta1,
                           beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], step=step,
                           adam_w_mode=group["adam_w_mode"], grad_scale=grad_scale)
        return loss

    def _buckets(self, group) -> dict:
        """The group's parameters with gradients, by what one kernel call needs to share: device, dtypes, master
        weights and step. Their step counters are advanced (in one foreach op: this runs every step)."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("FusedAdamW does not support sparse gradients")
        states = [self._state(p) for p in params]
        steps = [st["step"] for st in states]
        if steps:
            torch._foreach_add_(steps, 1.0)
        buckets: dict[tuple, list] = {}
        for p, st, step in zip(params, states, torch.stack(steps).tolist() if steps else []):
            key = (p.device, p.dtype, p.grad.dtype, "master_param" in st, int(step))
            buckets.setdefault(key, []).append((p, st))
        return buckets

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating-point state to each parameter's dtype; here the moments and masters stay
        fp32, so they are taken from `state_dict` as saved (copied onto the parameter's device)."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(saved_ids, params):
            saved = state_dict["state"].get(i)
            if saved is not None:
                self.state[p] = {k: v.detach().to(device="cpu" if k == "step" else p.device, dtype=torch.float32,
                                                  copy=True) if torch.is_tensor(v) else v for k, v in saved.items()}
