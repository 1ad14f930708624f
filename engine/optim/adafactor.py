"""Adafactor (Shazeer & Stern, 2018) with an external learning rate.

For matrices the second moment is factored into row and column running means of g^2 (memory O(n + m)
instead of O(nm)); vectors keep a full second moment. beta2 follows the paper's schedule
1 - step^decay_rate; updates are clipped to RMS <= clip_threshold; optional first moment (beta1) and decoupled
weight decay. The learning rate comes from the engine's schedule (no relative step, no parameter scaling).
"""
from __future__ import annotations

import torch

from engine.optim.adamw import gradient, keep_fp32_state


class Adafactor(torch.optim.Optimizer):
    """State per parameter, all fp32: "step" (0-dim, CPU); "exp_avg_sq_row" (shape[:-1]) and "exp_avg_sq_col"
    (shape[:-2] + shape[-1:]) for tensors of two or more dimensions, else "exp_avg_sq" (the parameter's shape);
    "exp_avg" when beta1 > 0; and, with master_weights=True, "master_param" for bf16/fp16 parameters: the fp32
    weights the step updates, the parameter receiving their rounding (as FusedAdamW does). Without masters a
    low-precision parameter is updated through a temporary fp32 copy, so an update smaller than half its
    resolution is lost. Gradients are read by `gradient(p)`: `p.main_grad` when set, else `p.grad`."""

    def __init__(self, params, lr=1e-3, beta1=0.0, decay_rate=-0.8, eps=1e-30, clip_threshold=1.0,
                 weight_decay=0.0, master_weights=False):
        defaults = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps=eps, clip_threshold=clip_threshold,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.master_weights = master_weights

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x.norm() / (x.numel() ** 0.5)

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float = 1.0):
        """grad_scale multiplies the gradients first (the fp16 unscale times the clip coefficient)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                grad = gradient(p)
                if grad is None:
                    continue
                grad = grad.float() * grad_scale
                self._update(p, grad, self._state(p, grad, group), group)
        return loss

    def _state(self, p, grad, group) -> dict:
        """The parameter's state, each entry created when missing (first step, or a restore that lacks it)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        if grad.ndim >= 2:
            if "exp_avg_sq_row" not in state:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
        elif "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        if group["beta1"] > 0 and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
        if self.master_weights and p.dtype != torch.float32 and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
        return state

    def _update(self, p, grad, state, group):
        state["step"] += 1
        beta2 = 1.0 - state["step"].item() ** group["decay_rate"]
        sq = grad * grad + group["eps"]
        if grad.ndim >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.lerp_(sq.mean(dim=-1), 1.0 - beta2)
            col.lerp_(sq.mean(dim=-2), 1.0 - beta2)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            update = grad * row_factor * col.rsqrt().unsqueeze(-2)
        else:
            state["exp_avg_sq"].lerp_(sq, 1.0 - beta2)
            update = grad * state["exp_avg_sq"].rsqrt()
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        if group["beta1"] > 0:
            update = state["exp_avg"].lerp_(update, 1.0 - group["beta1"])
        weights = state.get("master_param")  # a restored master is used even when master_weights is off
        if weights is None:
            weights = p if p.dtype == torch.float32 else p.float()
        if group["weight_decay"]:
            weights.mul_(1.0 - group["lr"] * group["weight_decay"])
        weights.add_(update, alpha=-group["lr"])
        if weights is not p:
            p.copy_(weights)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        keep_fp32_state(self, state_dict)
