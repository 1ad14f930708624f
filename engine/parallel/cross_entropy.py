"""Cross-entropy over vocabulary-parallel logits, without ever gathering them.

Each rank holds logits for its slice of the (padded) vocabulary. Three reductions over the tp group give the
exact softmax cross-entropy: the max logit (for stability), the target's logit (owned by one rank) and the sum
of exponentials. Padded vocabulary columns are excluded. Targets equal to `ignore_index` give zero loss and
zero gradient, as in F.cross_entropy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group, ignore_index):
        logits = logits.float()
        local_rows = logits.shape[-1]
        real = max(0, min(local_rows, vocab_size - vocab_start))
        if real < local_rows:  # padded columns take no part in the softmax
            logits = logits.clone()
            logits[..., real:] = float("-inf")
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local_target = target - vocab_start
        mine = (local_target >= 0) & (local_target < real) & (target != ignore_index)
        index = local_target.masked_fill(~mine, 0).unsqueeze(-1)
        target_logit = shifted.gather(-1, index).squeeze(-1).masked_fill(~mine, 0.0)
        dist.all_reduce(target_logit, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ignored = target == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, index, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, mine, ignored = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, index, -mine.unsqueeze(-1).to(grad.dtype))
        grad.mul_((grad_loss * ~ignored).unsqueeze(-1))
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int = 0,
                                 vocab_size: int | None = None, group=None, ignore_index: int = -100
                                 ) -> torch.Tensor:
    """Per-token loss [...]: logits [..., local_vocab] (this rank's vocabulary slice starting at vocab_start),
    target [...] with global ids. Without a group (one rank) this is F.cross_entropy(reduction='none')."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    if group is None or dist.get_world_size(group) == 1:
        logits = logits[..., :vocab_size].float()
        return F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                               reduction="none").view(target.shape)
    return _VocabParallelCE.apply(logits, target, vocab_start, vocab_size, group, ignore_index)
