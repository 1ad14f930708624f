"""Global gradient-norm clipping over many tensors with the fused multi-tensor kernels (engine.ext).

The trainer can also measure without touching the gradients - `global_grad_norm`, then `clip_coefficient` -
and fold the coefficient into FusedAdamW.step(grad_scale=...), saving a pass over the gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine import ext
from engine.optim.adamw import gradient


def _grads(parameters_or_grads) -> list[torch.Tensor]:
    """Gradients from parameters (tensors that require grad: their .grad, where set) or given directly."""
    if isinstance(parameters_or_grads, torch.Tensor):
        parameters_or_grads = [parameters_or_grads]
    out = []
    for t in parameters_or_grads:
        g = t.grad if isinstance(t, torch.nn.Parameter) or t.requires_grad else t
        if g is not None:
            out.append(g)
    return out


def _by_device_and_dtype(tensors) -> dict:
    buckets: dict[tuple, list] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return buckets


@torch.no_grad()
def global_grad_norm(parameters_or_grads, group=None, *, ops=None) -> torch.Tensor:
    """The L2 norm (0-dim fp32, on the gradients' device) of all the gradients together; with a process group,
    of all its ranks' gradients (the sums of squares are all-reduced). NaN and Inf propagate."""
    grads = _grads(parameters_or_grads)
    device = grads[0].device if grads else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for (dev, _), ts in _by_device_and_dtype(grads).items():
        norm, _ = (ops or ext.ops_for(dev)).l2norm([t.contiguous() for t in ts])
        total_sq += norm.to(device).square()
    if group is not None:
        dist.all_reduce(total_sq, group=group)
    return total_sq.sqrt()


def clip_coefficient(total_norm: torch.Tensor | float, max_norm: float) -> float:
    """The factor that brings the gradients' norm to at most max_norm: 1.0 when it already is, when max_norm <= 0
    (no clipping) or when the norm is not finite (the step will be skipped, nothing to scale)."""
    norm = float(total_norm)
    if max_norm <= 0 or norm != norm or norm == float("inf"):
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, group=None, *, ops=None) -> torch.Tensor:
    """Scales gradients in place so that their global L2 norm is at most `max_norm`; returns the norm
    before clipping (fp32). A parameter's gradient is its `main_grad` when set, else `.grad` (what FusedAdamW
    reads). With a process group the norm is taken over the gradients of all its ranks, a tensor-parallel
    replica counted once (parameters tagged `tp_duplicate` by TPContext.mark_replicas add nothing to the norm,
    and are still scaled). Non-finite norms are returned and leave the gradients untouched; max_norm <= 0 only
    measures; gradients already within max_norm are not touched."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    with_grads = [(p, gradient(p)) for p in parameters if gradient(p) is not None]
    grads = [g for _, g in with_grads]
    total = global_grad_norm([g for p, g in with_grads if not getattr(p, "tp_duplicate", False)], group, ops=ops)
    coef = clip_coefficient(total, max_norm) if grads else 1.0
    if coef < 1.0:
        for (dev, _), ts in _by_device_and_dtype(grads).items():
            (ops or ext.ops_for(dev)).scale_(ts, coef)
    return total
