"""Global gradient-norm clipping over many tensors (multi-tensor foreach ops)."""
from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, group=None) -> torch.Tensor:
    """Scales gradients in place so that their global L2 norm is at most `max_norm`; returns the norm
    before clipping (fp32). With a process group the norm is taken over the gradients of all its ranks (each
    rank passes the gradients it owns). Non-finite norms are returned and leave the gradients untouched;
    max_norm <= 0 only measures."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    norms = torch._foreach_norm(grads, 2.0) if grads else []
    total_sq = torch.stack([n.float() for n in norms]).square().sum() if norms else torch.zeros((), device=device)
    if group is not None:
        dist.all_reduce(total_sq, group=group)
    total = total_sq.sqrt()
    if max_norm > 0 and grads and torch.isfinite(total):
        coef = max_norm / (total.item() + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
    return total
