"""Tensor parallelism for any model, from a plan in Hugging Face's `base_model_tp_plan` format.

    parallelize(model, tp_group, {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
                                  "embed_tokens": "embedding"})

replaces each `nn.Linear` / `nn.Embedding` whose dotted name matches a pattern (`*` stands for one name part, such
as a layer index) with the engine's tensor-parallel layer, holding this rank's slice of the weights the module
already had - so a loaded model can be parallelized. Names do not change, so `state_dict()` keys stay the same
(each rank's tensors are its slices; `param.shard` records which).

Styles: "colwise" (output features split; input replicated, or all-gathered along the sequence under sequence
parallelism), "rowwise" (input features split; outputs summed over the group, or reduce-scattered along the
sequence), "embedding" / "vocab" (rows of the vocabulary split; lookups summed). Attention modules that reshape
with `-1` heads (as transformers' do) work unchanged on the local heads.

With sequence_parallel=True, the activations between TP regions are sequence shards [b, s/tp, ...]: the model's
code outside the planned layers must work on shards (norms, residuals), its output is a shard, and the gradients
of the parameters outside the planned layers are partial sums over the shards: call
`reduce_sequence_parallel_grads(model, tp_group)` after backward (the engine's trainer and ZeroOptimizer do this
for their own model). This suits models written for it; transformers' models compute positions and masks from
the (then sharded) sequence length, so use them without it.

Tied weights (an embedding shared with an LM head) cannot be split under one module only: a planned module whose
parameter is shared within `module` is refused. A head outside `module` (as `LlamaForCausalLM.lm_head` is outside
`.model`) is not visible here: leave a tied embedding out of the plan, as transformers' own plans do, and pass
the head as `replicated=` so that its copies are counted once in a gradient norm.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from engine.optim.adamw import gradient
from engine.parallel.layers import ColumnParallelLinear, RowParallelLinear, TPContext, VocabParallelEmbedding

STYLES = ("colwise", "rowwise", "embedding", "vocab")


def parallelize(module: nn.Module, tp_group, plan: dict, sequence_parallel: bool = False,
                replicated: tuple = ()) -> nn.Module:
    """In place: the planned submodules of `module` become tensor-parallel over `tp_group`; returns `module`.
    Parameters left whole (in `module`, and in the `replicated` modules outside it, such as a causal LM's
    `lm_head` next to `model.model`) are tagged `tp_duplicate` on tp ranks > 0: a gradient norm counts them once."""
    unknown = sorted({style for style in plan.values() if style not in STYLES})
    if unknown:
        raise ValueError(f"parallelize: unsupported style(s) {unknown} in the plan; supported: {list(STYLES)}")
    patterns = {key: re.compile(re.escape(key).replace(r"\*", r"[^.]+")) for key in plan}
    matches = {}  # submodule name -> plan key
    for name, _ in module.named_modules():
        key = next((k for k, pattern in patterns.items() if pattern.fullmatch(name)), None)
        if key is not None:
            matches[name] = key
    unmatched = sorted(set(plan) - set(matches.values()))
    if unmatched:
        raise ValueError(f"parallelize: plan entries {unmatched} match no submodule of {type(module).__name__}; "
                         "check the names against module.named_modules()")
    names_of = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for name in matches:
        for p in module.get_submodule(name).parameters():
            if len(names_of[id(p)]) > 1:
                raise ValueError(f"parallelize: {' and '.join(names_of[id(p)])} are one tied parameter; sharding "
                                 f"{name} would untie them - leave it out of the plan or untie the weights first")
    tp = TPContext(tp_group, dist.get_world_size(tp_group), dist.get_rank(tp_group), sequence_parallel)
    for name, key in matches.items():
        parent, _, child = name.rpartition(".")
        new = _convert(module.get_submodule(name), plan[key], tp, name)
        setattr(module.get_submodule(parent) if parent else module, child, new)
    for p in module.parameters():
        if sequence_parallel and not hasattr(p, "shard"):
            p.sequence_parallel = True
    for m in (module, *replicated):
        tp.mark_replicas(m)
    return module


def _convert(sub: nn.Module, style: str, tp: TPContext, name: str) -> nn.Module:
    wanted = nn.Embedding if style in ("embedding", "vocab") else nn.Linear
    if type(sub) is not wanted:
        raise ValueError(f"parallelize: {name} is a {type(sub).__name__}; style {style!r} takes an "
                         f"nn.{wanted.__name__}")
    weight = sub.weight.detach()
    with torch.device(weight.device):
        if style == "colwise":
            new = ColumnParallelLinear(sub.in_features, sub.out_features, tp, bias=sub.bias is not None)
            rows = slice(tp.rank * new.weight.shape[0], (tp.rank + 1) * new.weight.shape[0])
            _load(new.weight, weight[rows])
            if sub.bias is not None:
                _load(new.bias, sub.bias.detach()[rows])
        elif style == "rowwise":
            new = RowParallelLinear(sub.in_features, sub.out_features, tp, bias=sub.bias is not None)
            cols = slice(tp.rank * new.weight.shape[1], (tp.rank + 1) * new.weight.shape[1])
            _load(new.weight, weight[:, cols])
            if sub.bias is not None:
                _load(new.bias, sub.bias.detach())
        else:
            new = VocabParallelEmbedding(sub.num_embeddings, sub.embedding_dim, tp)
            real = max(0, min(new.rows, sub.num_embeddings - new.start))
            with torch.no_grad():
                new.weight.zero_()
            _load(new.weight[:real], weight[new.start:new.start + real])
            if sub.padding_idx is not None and new.start <= sub.padding_idx < new.start + new.rows:
                row = sub.padding_idx - new.start  # nn.Embedding's rule: the padding row gets no gradient
                new.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([row], device=g.device), 0.0))
    return new.to(weight.dtype)


@torch.no_grad()
def _load(target: torch.Tensor, source: torch.Tensor) -> None:
    target.copy_(source)


def reduce_sequence_parallel_grads(module: nn.Module, tp_group) -> None:
    """Sums, over the tensor-parallel group, the gradients of the parameters that saw sequence shards (marked
    `sequence_parallel`: norms, row-parallel biases, everything outside the planned layers under SP) - their
    gradients on each rank cover only its shard of the sequence. Reads `main_grad` where set."""
    for p in module.parameters():
        grad = gradient(p)
        if getattr(p, "sequence_parallel", False) and grad is not None:
            dist.all_reduce(grad, group=tp_group)
