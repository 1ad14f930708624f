"""engine.parallel.parallelize on models the engine did not build, against the same dense model: a transformers
LlamaForCausalLM from its own base_model_tp_plan (logits and gradients), and a user's module with biases, a padding
row and sequence parallelism (outputs, gradients after reduce_sequence_parallel_grads, the global grad norm).
tp = 2, fp32, one spawned group."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distributed
from conftest import shard_blocks
from engine.optim import clip_grad_norm_
from engine.parallel import parallelize, reduce_sequence_parallel_grads

RTOL = 1e-5


def close(actual, expected, what):
    atol = RTOL * max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=RTOL, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def compare_grads(model, dense):
    """Each rank's gradient slice against the dense gradient's same slice."""
    dense_params = dict(dense.named_parameters())
    assert sorted(dense_params) == sorted(n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        local, block = shard_blocks(p)
        close(p.grad[local], dense_params[name].grad[block], f"gradient of {name}")


class UserBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class UserModel(nn.Module):
    def __init__(self, vocab=23, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=3)
        self.blocks = nn.ModuleList(UserBlock(width) for _ in range(2))
        self.out = nn.Linear(width, 5)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


USER_PLAN = {"embed": "embedding", "blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


def check_user_model(group, sequence_parallel):
    torch.manual_seed(0)
    dense = UserModel()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases and norms away from their init
    model = parallelize(copy.deepcopy(dense), group, USER_PLAN, sequence_parallel=sequence_parallel)
    assert type(model.blocks[0].up).__name__ == "ColumnParallelLinear"
    ids = torch.randint(0, 23, (2, 8), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 3  # the padding row is looked up: it must get no gradient
    weights = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(2))
    ref = dense(ids)
    (ref * weights).sum().backward()
    out = model(ids)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if sequence_parallel:  # the output is this rank's sequence shard
        close(out, ref.chunk(size, 1)[rank], "output (sequence shard)")
        (out * weights.chunk(size, 1)[rank]).sum().backward()
        reduce_sequence_parallel_grads(model, group)
    else:
        close(out, ref, "output")
        (out * weights).sum().backward()
    compare_grads(model, dense)
    assert dense.embed.weight.grad[3].abs().sum() == 0
    norm = clip_grad_norm_(list(model.parameters()), 0.0, group=group)  # replicas counted once
    close(norm, torch.nn.utils.get_total_norm([p.grad for p in dense.parameters()]), "global grad norm")


def check_hf_llama(group):
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=32,
                                   tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg)
    model = copy.deepcopy(dense)
    plan = dict(cfg.base_model_tp_plan, embed_tokens="embedding")
    parallelize(model.model, group, plan)
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = dense(input_ids=ids, labels=ids)
    out = model(input_ids=ids, labels=ids)
    close(out.logits, ref.logits, "LlamaForCausalLM logits")
    ref.loss.backward()
    out.loss.backward()
    compare_grads(model, dense)


def _worker(rank, world):
    group = dist.group.WORLD
    for sequence_parallel in (False, True):
        check_user_model(group, sequence_parallel)
    try:
        import transformers  # noqa: F401
    except ImportError:  # an optional reference: the user-module checks above still ran
        return
    check_hf_llama(group)


def test_parallelize_matches_the_dense_model():
    distributed.run(_worker, world=2)


def test_plan_errors_name_the_entry():
    model = UserModel()
    model.out.weight = model.blocks[0].up.weight  # any parameter shared by a planned module
    with pytest.raises(ValueError, match="blocks.0.up.weight and out.weight are one tied parameter"):
        parallelize(model, None, {"blocks.*.up": "colwise"})
    model = UserModel()
    with pytest.raises(ValueError, match="colwise_gather"):
        parallelize(model, None, {"out": "colwise_gather"})
    with pytest.raises(ValueError, match="blocks.*.nothing"):
        parallelize(model, None, {"blocks.*.nothing": "colwise"})
