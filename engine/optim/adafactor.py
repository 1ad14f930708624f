"""Adafactor (Shazeer & Stern, 2018) with an external learning rate.

For matrices the second moment is factored into row and column running means of g^2 (memory O(n + m)
instead of O(nm)); vectors keep a full second moment. beta2 follows the paper's schedule
1 - step^decay_rate; updates are clipped to RMS <= clip_threshold; optional first moment (beta1) and decoupled
weight decay. The learning rate comes from the engine's schedule (no relative step, no parameter scaling).
"""
from __future__ import annotations

import torch

from engine.optim.adamw import gradient


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, beta1=0.0, decay_rate=-0.8, eps=1e-30, clip_threshold=1.0,
                 weight_decay=0.0):
        defaults = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps=eps, clip_threshold=clip_threshold,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

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
                self._update(p, grad.float() * grad_scale, self.state[p], group)
        return loss

    def _update(self, p, grad, state, group):
        factored = grad.ndim >= 2
        if not state:
            state["step"] = torch.tensor(0.0)
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            if group["beta1"] > 0:
                state["exp_avg"] = torch.zeros_like(grad)
        state["step"] += 1
        beta2 = 1.0 - state["step"].item() ** group["decay_rate"]
        sq = grad * grad + group["eps"]
        if factored:
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
        master = p.float() if p.dtype != torch.float32 else p
        if group["weight_decay"]:
            master.mul_(1.0 - group["lr"] * group["weight_decay"])
        master.add_(update, alpha=-group["lr"])
        if master is not p:
            p.copy_(master)
