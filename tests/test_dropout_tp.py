"""Dropout under tensor and sequence parallelism against a dense model that applies the same masks.

The engine's TP model draws each dropout mask from a stream chosen by where the tensor lives: the shared default
stream where a tensor is replicated across tp ranks (the residual stream without SP), a per-rank stream where it is
split (attention heads; the residual stream's sequence shards under SP). Here every mask a tp2 model draws is
recorded (from the same stream the engine's dropout would use), the ranks' masks are checked for agreement (replicated)
or independence (split), and a dense model replaying the assembled masks must give the same logits and gradients.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distributed
from conftest import shard_blocks
from engine.models import llama
from engine.models.llama import Llama, ModelConfig, Parallelism
from engine.parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.parallel.layers import TPContext
from engine.parallel.random import RNGTracker
from engine.parallel.topology import Topology

P = 0.3
CFG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_heads=8, num_kv_heads=4, vocab_size=37,
                  seq_length=16, dropout=P)


class Masks:
    """Draws keep-masks from the current random stream and records them (`draw`), or replays given ones (`replay`)."""

    def __init__(self, replay=None):
        self.recorded, self.replay = [], list(replay or [])

    def keep(self, shape) -> torch.Tensor:
        if self.replay:
            return self.replay.pop(0)
        mask = torch.rand(shape) >= P
        self.recorded.append(mask)
        return mask


class MaskedDropout(nn.Module):
    """Stands in for a layer's nn.Dropout (called inside the engine's choice of stream)."""

    def __init__(self, masks: Masks):
        super().__init__()
        self.masks, self.p = masks, P

    def forward(self, x):
        return x * self.masks.keep(x.shape) / (1 - P)


def masked_attention(masks: Masks):
    """Causal GQA attention with the dropout of the probabilities made explicit (engine's attention_core)."""
    def core(q, k, v, dropout_p, mask=None):
        assert dropout_p == P and mask is None
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        s = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        probs = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        return (probs * masks.keep(probs.shape) / (1 - P)) @ v
    return core


def with_masks(model: Llama, masks: Masks) -> Llama:
    for layer in model.layers.values():
        layer.dropout = MaskedDropout(masks)
    return model.train()


def _gathered(mask, group):
    parts = [torch.empty_like(mask) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mask.contiguous(), group=group)
    return parts


def check(topo: Topology, sequence_parallel: bool):
    tp = TPContext(topo.tp_group, topo.tp, topo.tp_rank, sequence_parallel)
    masks = Masks()
    llama.attention_core = masked_attention(masks)
    torch.manual_seed(11)  # the default stream: the same on every rank, as the trainer seeds it
    model = with_masks(Llama(CFG, parallelism=Parallelism(tp, RNGTracker(5, topo.tp_rank))), masks)
    model.init_weights(5)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    logits = model(ids)
    targets = torch.cat([ids.flatten()[1:], ids.new_full((1,), -100)]).view(2, 16)
    vocab_parallel_cross_entropy(logits, targets, model.vocab_start, CFG.vocab_size, tp.group).sum().backward()

    # per layer: attention probabilities [b, heads/tp, s, s], then the two residual dropouts [b, s(/tp), h]
    assert len(masks.recorded) == 3 * CFG.num_layers
    full = []
    for i, mask in enumerate(masks.recorded):
        parts = _gathered(mask, tp.group)
        attention, split = i % 3 == 0, i % 3 == 0 or sequence_parallel
        if split:  # different heads / sequence shards: independent streams, assembled along their split
            assert not torch.equal(parts[0], parts[1]), ("correlated masks across tp ranks", i)
            full.append(torch.cat(parts, dim=1))
        else:  # the replicated residual stream: every rank must drop the same elements
            assert all(torch.equal(p, parts[0]) for p in parts), ("replicas drop different elements", i)
            full.append(parts[0])
        assert abs(mask.float().mean().item() - (1 - P)) < 0.1, (i, attention)

    replay = Masks(replay=full)
    llama.attention_core = masked_attention(replay)
    dense = with_masks(Llama(CFG), replay)
    dense.init_weights(5)
    ref = dense(ids)
    F.cross_entropy(ref.flatten(0, 1)[:-1], ids.flatten()[1:], reduction="sum").backward()
    assert not replay.replay, "the dense model did not use every mask"
    start = model.vocab_start
    real = max(0, min(logits.shape[-1], CFG.vocab_size - start))
    close(logits[..., :real], ref[..., start:start + real], "logits")
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        full_param = dense_params[name]
        local, block = shard_blocks(p)
        grad = p.grad.clone()
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(grad, group=tp.group)
        close(grad[local], full_param.grad[block], f"gradient of {name}")


def close(actual, expected, what):
    atol = 1e-5 * max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _worker(rank, world):
    original = llama.attention_core
    try:
        topo = Topology(tp=world)
        for sequence_parallel in (False, True):
            check(topo, sequence_parallel)
    finally:
        llama.attention_core = original


def test_dropout_under_tp_and_sp_matches_a_dense_model_with_the_same_masks():
    distributed.run(_worker, world=2)
