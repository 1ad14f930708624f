"""Optimizers, clipping, LR schedule and loss scaling."""
from __future__ import annotations

from .adafactor import Adafactor
from .adamw import FusedAdamW
from .clip import clip_coefficient, clip_grad_norm_, global_grad_norm
from .lr_schedule import LRSchedule
from .scaler import LossScaler
from .zero import ZeroOptimizer

__all__ = ["Adafactor", "FusedAdamW", "LRSchedule", "LossScaler", "ZeroOptimizer", "build_optimizer", "clip_coefficient",
           "clip_grad_norm_", "global_grad_norm", "no_weight_decay", "param_groups"]


def no_weight_decay(name: str, param) -> bool:
    """The engine's rule (the trainer's, and ZeroOptimizer's no_weight_decay argument): weight decay on matrices
    (linear weights and embeddings), none on vectors (norm gains, biases)."""
    return param.ndim < 2


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """The parameters in two groups by no_weight_decay: with weight_decay, and with 0."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name: str, named_params, lr: float, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    groups = param_groups(named_params, weight_decay)
    if name == "adamw":
        return FusedAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adafactor":
        return Adafactor(groups, lr=lr, beta1=betas[0])
    raise ValueError(f"unknown optimizer {name!r}")
