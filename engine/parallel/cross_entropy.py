"""Cross-entropy over vocabulary-parallel logits, without ever gathering them.

Each rank holds logits for its slice of the (padded) vocabulary. Two reductions over the tp group give the
exact softmax cross-entropy: the max logit (for stability), then the target's logit (owned by one rank) and the
sum of exponentials together. Padded vocabulary columns are excluded. Targets equal to `ignore_index` give zero
loss and zero gradient, as in F.cross_entropy.

chunked_head_cross_entropy fuses the LM head's matmul into the loss and runs both a chunk of tokens at a time,
so the [tokens, vocab] logits (and their fp32 softmax, the largest activation of a small model) never exist.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _softmax_ce(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int, group,
                ignore_index: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token loss of fp32 vocabulary-parallel logits [n, local_vocab] (overwritten), and when `grad` the
    gradient of the summed loss with respect to them (softmax - one-hot; zero rows for ignored targets)."""
    local_rows = logits.shape[-1]
    real = max(0, min(local_rows, vocab_size - vocab_start))
    if real < local_rows:  # padded columns take no part in the softmax
        logits[..., real:] = float("-inf")
    logits_max = logits.max(dim=-1).values
    if group is not None:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits.sub_(logits_max.unsqueeze(-1))
    local_target = target - vocab_start
    mine = (local_target >= 0) & (local_target < real) & (target != ignore_index)
    index = local_target.masked_fill(~mine, 0).unsqueeze(-1)
    target_logit = shifted.gather(-1, index).squeeze(-1).masked_fill(~mine, 0.0)
    exp = shifted.exp_()
    sums = torch.stack([target_logit, exp.sum(dim=-1)])  # one all-reduce for both
    if group is not None:
        dist.all_reduce(sums, group=group)
    target_logit, sum_exp = sums
    ignored = target == ignore_index
    loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
    if not grad:
        return loss, None
    softmax = exp.div_(sum_exp.unsqueeze(-1))
    softmax.scatter_add_(-1, index, -mine.unsqueeze(-1).to(softmax.dtype))
    return loss, softmax.mul_(~ignored.unsqueeze(-1))


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group, ignore_index):
        # a copy (_softmax_ce works in place): the caller's logits stay intact
        loss, grad = _softmax_ce(logits.to(torch.float32, copy=True), target, vocab_start, vocab_size, group,
                                 ignore_index, grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, = ctx.saved_tensors
        return grad.mul_(grad_loss.unsqueeze(-1)), None, None, None, None, None


class _ChunkedHeadCE(torch.autograd.Function):
    """The head matmul and the cross-entropy, `chunk` tokens at a time: only one chunk's logits [chunk,
    local_vocab] exist at once. The gradients of the summed loss with respect to the hidden states and the head
    weight are taken chunk by chunk in forward (the logits are never kept) and scaled in backward by the
    incoming gradient, a scalar since the output is the summed loss."""

    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_start, vocab_size, group, chunk, ignore_index, need_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight)
            loss, grad = _softmax_ce(logits.float(), target[rows], vocab_start, vocab_size, group, ignore_index,
                                     grad=need_grad)
            total += loss.sum()
            if need_grad:  # the matmuls in the logits' dtype, as autograd through F.linear would run them
                grad = grad.to(logits.dtype)
                grad_hidden[rows] = grad @ weight
                grad_weight += (grad.t() @ hidden[rows]).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_total).to(hidden_dtype), (grad_weight * grad_total).to(weight_dtype),
                None, None, None, None, None, None, None)


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


def chunked_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int,
                               vocab_start: int = 0, vocab_size: int | None = None, group=None,
                               ignore_index: int = -100) -> torch.Tensor:
    """The summed token loss of F.linear(hidden, weight) against target, computed `chunk` tokens at a time so
    the full [tokens, vocab] logits never exist: hidden [..., h] (entered into the tensor-parallel region),
    weight [local_vocab, h] (this rank's vocabulary rows, starting at vocab_start), target [...] with global ids.
    Equals vocab_parallel_cross_entropy(F.linear(hidden, weight), target, ...).sum()."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    if chunk < 1:
        raise ValueError(f"chunk: must be a positive number of tokens, got {chunk}")
    group = group if group is not None and dist.get_world_size(group) > 1 else None
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)  # (not in eval)
    return _ChunkedHeadCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), vocab_start,
                                vocab_size, group, chunk, ignore_index, need_grad)
