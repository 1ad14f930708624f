"""LLaMA decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention through SDPA.

The model knows nothing about pipelines: layers live in a ``ModuleDict`` keyed by their global index, and the
embedding and the head are optional, so a pipeline stage is just a ``Llama`` built with a subset of layers.
Parameter names are the same whatever the split, which is what makes initialisation and checkpoints
layout-invariant.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.models import fused
from engine.models.documents import DocumentMask
from engine.parallel.context import ring_attention, shard_positions, shard_sequence
from engine.parallel.cross_entropy import chunked_head_cross_entropy, vocab_parallel_cross_entropy
from engine.parallel.layers import (ColumnParallelLinear, RowParallelLinear, TPContext, VocabParallelEmbedding,
                                    padded_vocab_size, valid_slice)
from engine.parallel.random import RNGTracker
from engine.parallel.recompute import recompute

# SDPA takes un-expanded k, v (enable_gqa) from torch 2.5; before that attention_core repeats them to num_heads.
SDPA_NATIVE_GQA = torch.__version__ >= (2, 5)


def sdpa_native_gqa(device_type: str, fp32: bool) -> bool:
    """Whether attention_core gives SDPA the un-expanded k, v (enable_gqa): from torch 2.5, except fp32 on CUDA.
    On CUDA only the flash kernel takes GQA (bf16/fp16, sm80+); where SDPA would pick the memory-efficient kernel
    instead (fp32, older GPUs), GQA would send it to its s x s math path, so k, v are expanded there."""
    return SDPA_NATIVE_GQA and not (device_type == "cuda" and fp32)


def _native_gqa_here(q: torch.Tensor) -> bool:
    """sdpa_native_gqa for this tensor, and on CUDA only where the flash kernel can run."""
    if not sdpa_native_gqa(q.device.type, q.dtype == torch.float32):
        return False
    return q.device.type != "cuda" or (torch.backends.cuda.flash_sdp_enabled() and q.shape[-1] <= 256
                                       and torch.cuda.get_device_capability(q.device) >= (8, 0))


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 256
    ffn_hidden_size: int = 704
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = 259
    seq_length: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def validate(self) -> list[tuple[str, str]]:
        """Returns (flag, message) pairs for every inconsistency; empty when the shape is valid."""
        errors = []
        for flag, value in [("--num-layers", self.num_layers), ("--hidden-size", self.hidden_size),
                            ("--ffn-hidden-size", self.ffn_hidden_size), ("--num-heads", self.num_heads),
                            ("--num-kv-heads", self.num_kv_heads), ("--vocab-size", self.vocab_size),
                            ("--seq-length", self.seq_length)]:
            if value < 1:
                errors.append((flag, f"must be a positive integer, got {value}"))
        if errors:
            return errors
        if self.hidden_size % self.num_heads:
            errors.append(("--hidden-size", f"{self.hidden_size} is not divisible by --num-heads "
                                            f"{self.num_heads}; choose a multiple of the head count"))
        elif self.head_dim % 2:
            errors.append(("--num-heads", f"head dimension {self.head_dim} must be even for rotary embeddings"))
        if self.num_heads % self.num_kv_heads:
            errors.append(("--num-kv-heads", f"--num-heads {self.num_heads} is not divisible by --num-kv-heads "
                                             f"{self.num_kv_heads}; use a divisor of the head count"))
        if not 0.0 <= self.dropout < 1.0:
            errors.append(("--dropout", f"must be in [0, 1), got {self.dropout}"))
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            errors.append(("--norm-eps/--rope-theta", "must be positive"))
        return errors


def _llama1(layers, hidden, heads, ffn):
    return ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_heads=heads,
                       num_kv_heads=heads, vocab_size=32000, seq_length=2048, norm_eps=1e-6)


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision, --dtype

PRESETS: dict[str, ModelConfig] = {
    # ~3.1M parameters, byte vocabulary: trains on a 2-core CPU in minutes.
    "tiny": ModelConfig(),
    # TinyLlama-1.1B shape (GQA, 4 kv heads).
    "llama-1b": ModelConfig(num_layers=22, hidden_size=2048, ffn_hidden_size=5632, num_heads=32, num_kv_heads=4,
                            vocab_size=32000, seq_length=2048, norm_eps=1e-5),
    # Exact LLaMA-1 shapes (Touvron et al. 2023, table 2).
    "llama-7b": _llama1(32, 4096, 32, 11008),
    "llama-13b": _llama1(40, 5120, 40, 13824),
    "llama-65b": _llama1(80, 8192, 64, 22016),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(name)
    return dataclasses.replace(PRESETS[name])


# ---------------------------------------------------------------------------------------------------------
# Deterministic, layout-invariant initialisation.
# Row r of parameter `name` is drawn from a generator seeded by (seed, name, r). A rank holding rows [a, b)
# of a tensor (the tensor-parallel or vocabulary shard) draws exactly those rows, so every layout gets the same
# full weights, padded vocabulary rows never shift the real ones, and nothing larger than a row is materialised
# beyond the rank's own shard.

def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def init_rows_(tensor: torch.Tensor, seed: int, name: str, std: float, row_offset: int = 0,
               col_offset: int = 0, full_cols: int | None = None) -> torch.Tensor:
    """Fills a 2-D `tensor` with N(0, std) rows of the full parameter `name`.

    `tensor` holds rows [row_offset, row_offset + rows) and columns [col_offset, col_offset + cols) of a full
    matrix with `full_cols` columns (default: the tensor's own).
    """
    rows, cols = tensor.shape
    full_cols = cols if full_cols is None else full_cols
    if rows == 0 or cols == 0:
        return tensor
    base = _name_seed(seed, name)
    gen = torch.Generator(device="cpu")
    row = torch.empty(full_cols, dtype=torch.float32)
    out = torch.empty(rows, cols, dtype=torch.float32)
    for r in range(rows):
        gen.manual_seed(base + row_offset + r)
        row.normal_(0.0, std, generator=gen)
        out[r] = row[col_offset:col_offset + cols]
    with torch.no_grad():
        tensor.copy_(out)
    return tensor


# ---------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused_kernel: bool = False):
        super().__init__()
        self.eps, self.fused_kernel = eps, fused_kernel
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kernel and x.dtype == self.weight.dtype:
            return fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(seq_length: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split convention of Hugging Face LLaMA. x: [b, heads, s, d]; cos, sin: the
    tables of positions 0..s-1 [s, d], or per-token tables [b, 1, s, d] (document masking)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


@dataclass
class Parallelism:
    """How a model instance is parallelised: its tensor-parallel context, random streams and recomputation.
    The defaults describe a single process (no communication, no recomputation)."""

    tp: TPContext = dataclasses.field(default_factory=TPContext)
    rng: RNGTracker | None = None
    recompute: str = "none"           # none | selective (attention core) | full (whole layers)
    recompute_layers: int | None = None  # with full: only the first N layers of this module
    cp_group: object = None  # context parallelism: the ring of ranks that each hold a shard of every sequence
    loss_chunk_tokens: int = 0  # > 0: Llama.head_loss runs the head and the loss this many tokens at a time
    fused_elementwise: bool = False  # RMSNorm, RoPE and SwiGLU through engine.models.fused (the CUDA kernels)

    @property
    def cp(self) -> tuple[int, int]:
        """(context-parallel size, this rank's index in the ring); (1, 0) without context parallelism."""
        if self.cp_group is None or dist.get_world_size(self.cp_group) == 1:
            return 1, 0
        return dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)

    def fork_tp(self):
        return self.rng.fork("tp") if self.rng is not None else contextlib.nullcontext()

    def fork_for_residual(self):
        """Residual dropout: per-rank stream on sequence shards, the shared default stream otherwise."""
        return self.fork_tp() if self.tp.sequence_parallel else contextlib.nullcontext()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallelism):
        super().__init__()
        tp = par.tp
        self.par, self.head_dim, self.dropout = par, cfg.head_dim, cfg.dropout
        q_dim = cfg.num_heads * cfg.head_dim
        self.wq = ColumnParallelLinear(cfg.hidden_size, q_dim, tp)
        self.wk = ColumnParallelLinear(cfg.hidden_size, cfg.kv_dim, tp)
        self.wv = ColumnParallelLinear(cfg.hidden_size, cfg.kv_dim, tp)
        self.wo = RowParallelLinear(q_dim, cfg.hidden_size, tp)

    @property
    def dropout_p(self) -> float:
        """The attention dropout in effect: none in eval mode."""
        return self.dropout if self.training else 0.0

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor | DocumentMask | None = None):
        dropout = self.dropout_p
        # different heads on each tp rank: a per-rank dropout stream (not forked without dropout: the fork's
        # generator swaps are a graph break for --compile)
        with self.par.fork_tp() if dropout > 0 else contextlib.nullcontext():
            if self.par.cp[0] > 1:  # mask: None, or this rank's shard of the document ids [b, s_local]
                return ring_attention(q, k, v, self.par.cp_group, segment_ids=mask)
            if isinstance(mask, DocumentMask):
                return document_attention(q, k, v, dropout, mask)
            return attention_core(q, k, v, dropout, mask)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | DocumentMask | None = None, cache: LayerKV | None = None):
        q, k, v = self.par.tp.enter_linears(x, [self.wq.weight, self.wk.weight, self.wv.weight])
        b, s, _ = q.shape
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cos.dim() == 2:  # per-token tables (document masking) are [b, 1, s, d] already
            cos, sin = cos[:s], sin[:s]
        rotate = fused.rope if self.par.fused_elementwise and cos.dim() == 2 and cos.dtype == q.dtype else apply_rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:  # incremental decoding: attend to the cached positions as well
            k, v = cache.update(k, v)
        if self.par.recompute == "selective":  # (the random streams need replaying only for dropout)
            rng = self.par.rng if self.dropout_p > 0 else None
            out = recompute(self.core, rng, q, k, v, mask)
        else:
            out = self.core(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention. q: [b, h, s, d]; k, v: [b, h_kv, s, d]; mask: None (causal) or a boolean
    [b, 1, s, s] of the pairs that may attend (see attention_mask_from_padding)."""
    causal = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
    if q.shape[1] != k.shape[1] and _native_gqa_here(q):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True, **causal)
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **causal)


@torch.compiler.disable  # --compile: the split by document lengths would recompile for every new layout
def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                       documents: DocumentMask) -> torch.Tensor:
    """attention_core within documents: each query attends to the earlier keys of its own document. q, k, v as
    attention_core's, over the full sequence the layout describes. Rows that are one document each take the plain
    causal path. A GPU varlen kernel would replace this: flash-attention's varlen call on the flattened
    [b * s, heads, d] tokens with documents.cu_seqlens and documents.max_seqlen, causal."""
    if tuple(q.shape[::2]) != documents.shape:
        raise ValueError(f"documents: a layout of [batch, seq] {list(documents.shape)} given for attention over "
                         f"[batch, seq] {[q.shape[0], q.shape[2]]}")
    if documents.single:
        return attention_core(q, k, v, dropout_p)
    if documents.impl == "sdpa":
        return attention_core(q, k, v, dropout_p, documents.mask)
    # split, not slicing: a slice's backward writes into a zero tensor of the whole input, once per document
    rows = []
    for qi, ki, vi, lengths in zip(q.split(1), k.split(1), v.split(1), documents.lengths):
        parts = [attention_core(*qkv, dropout_p) for qkv in zip(*(t.split(lengths, dim=2) for t in (qi, ki, vi)))]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def attention_mask_from_padding(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Hugging Face's [b, s] attention_mask (1 = token, 0 = padding) as attention_core's boolean [b, 1, s, s]:
    causal, and no query attends to a padding key. Every query keeps itself, so a padding query's row is not
    empty (its output is junk, as in transformers, and is not meant to be used). None when nothing is padded."""
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None
    s = keep.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    return (causal & keep[:, None, None, :]) | torch.eye(s, dtype=torch.bool, device=keep.device)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallelism):
        super().__init__()
        tp = par.tp
        self.tp, self.fused_kernel = tp, par.fused_elementwise
        self.w_gate = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, tp)
        self.w_up = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, tp)
        self.w_down = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.tp.enter_linears(x, [self.w_gate.weight, self.w_up.weight])
        return self.w_down(fused.swiglu(gate, up) if self.fused_kernel else F.silu(gate) * up)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallelism = None):
        super().__init__()
        par = par or Parallelism()
        self.par = par
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, par.fused_elementwise)
        self.attn = Attention(cfg, par)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, par.fused_elementwise)
        self.mlp = MLP(cfg, par)
        self.dropout = nn.Dropout(cfg.dropout)
        for norm in (self.attn_norm, self.mlp_norm):
            norm.weight.sequence_parallel = par.tp.sequence_parallel

    def _residual_dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout.p == 0:
            return x
        with self.par.fork_for_residual():
            return self.dropout(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | DocumentMask | None = None, cache: LayerKV | None = None):
        x = x + self._residual_dropout(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        return x + self._residual_dropout(self.mlp(self.mlp_norm(x)))


class LayerKV:
    """One layer's keys and values in a KVCache: [b, kv_heads, max_length, head_dim] buffers."""

    def __init__(self, cache: KVCache, shape: tuple, device, dtype):
        self.cache = cache
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the new positions' k, v [b, kv_heads, s, d]; returns the keys and values of every position so
        far. The cache's length advances once all layers have run (Llama.forward)."""
        start, end = self.cache.length, self.cache.length + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of the positions decoded so far, for incremental decoding with the dense single-process
    model (tp=1, pp=1). `model(ids, cache=c)` runs ids [b, s] at positions [c.length, c.length + s): their
    rotary embeddings are taken at those absolute positions, each attends causally to everything up to itself,
    their keys and values are stored and c.length advances by s."""

    def __init__(self, cfg: ModelConfig, batch: int = 1, max_length: int | None = None, device=None,
                 dtype: torch.dtype = torch.float32):
        self.max_length = cfg.seq_length if max_length is None else max_length
        if not 0 < self.max_length <= cfg.seq_length:
            raise ValueError(f"KVCache: max_length {self.max_length} must be in [1, seq_length {cfg.seq_length}]")
        shape = (batch, cfg.num_kv_heads, self.max_length, cfg.head_dim)
        self.layers = {i: LayerKV(self, shape, device, dtype) for i in range(cfg.num_layers)}
        self.length = 0

    def mask(self, s: int, device) -> torch.Tensor:
        """Boolean [s, length + s]: new query i (at position length + i) may attend key j when j <= length + i.
        (SDPA's is_causal aligns the diagonal top-left, which is wrong once keys outnumber queries.)"""
        keys = torch.arange(self.length + s, device=device)
        queries = torch.arange(self.length, self.length + s, device=device)
        return keys[None, :] <= queries[:, None]


def partial_gradient(name: str, param: nn.Parameter, tied_across_stages: bool) -> str | None:
    """The model-parallel group over which this parameter's gradient is only a partial sum, reduced once the
    backward is over: "tp" for sequence-parallel norm gains, "embedding" for an embedding tied to a head on another
    pipeline stage (its first and last stages), else None."""
    if getattr(param, "sequence_parallel", False):
        return "tp"
    return "embedding" if tied_across_stages and name in ("embedding.weight", "head.weight") else None


def pipeline_chunk(cfg: ModelConfig, virtual_stage: int, stages: int, parallelism: Parallelism) -> "Llama":
    """Virtual pipeline stage `virtual_stage` of `stages`: layers [v*L/stages, (v+1)*L/stages), the embedding on
    the first stage, the final norm and head on the last (weights as the constructor leaves them)."""
    per = cfg.num_layers // stages
    return Llama(cfg, layers=list(range(virtual_stage * per, (virtual_stage + 1) * per)),
                 has_embedding=virtual_stage == 0, has_head=virtual_stage == stages - 1, parallelism=parallelism)


class Llama(nn.Module):
    """A LLaMA decoder or a contiguous slice of one.

    layers: the global indices this module holds (default: all). has_embedding / has_head: whether this slice
    owns the token embedding / the final norm and LM head. Without an embedding, forward takes hidden states;
    without a head, it returns hidden states; the full model maps input ids [b, s] to logits [b, s, vocab].
    Under tensor parallelism the logits are this rank's vocabulary slice (vocab_parallel_cross_entropy takes
    them as they are); under sequence parallelism hidden states between layers are sequence shards.
    """

    def __init__(self, cfg: ModelConfig, layers: list[int] | None = None, has_embedding: bool = True,
                 has_head: bool = True, parallelism: Parallelism | None = None):
        super().__init__()
        par = parallelism or Parallelism()
        self.cfg, self.par = cfg, par
        layers = range(cfg.num_layers) if layers is None else layers
        padded_vocab = padded_vocab_size(cfg.vocab_size, par.tp.size)
        self.vocab_start = par.tp.rank * (padded_vocab // par.tp.size)
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, par.tp) if has_embedding else None
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, par) for i in layers})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, par.fused_elementwise) if has_head else None
        if self.norm is not None:
            self.norm.weight.sequence_parallel = par.tp.sequence_parallel
        self.head = None
        if has_head and not (cfg.tie_embeddings and has_embedding):
            self.head = ColumnParallelLinear(cfg.hidden_size, padded_vocab, par.tp, real_out_features=cfg.vocab_size)
        cos, sin = rope_tables(cfg.seq_length, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        par.tp.mark_replicas(self)

    def head_weight(self) -> torch.Tensor:
        return self.head.weight if self.head is not None else self.embedding.weight

    def gathering_units(self) -> list:
        """ZeRO-3's gathering units of this slice in forward order, as ZeroOptimizer takes them: (module entered
        first, module left last, parameter names, names of other units' parameters it reads) for the embedding,
        each layer, and the final norm + head (which reads the embedding when tied in this slice)."""
        units = []
        if self.embedding is not None:
            units.append((self.embedding, self.embedding, ["embedding.weight"], []))
        for index, layer in self.layers.items():
            units.append((layer, layer, [f"layers.{index}.{n}" for n, _ in layer.named_parameters()], []))
        if self.norm is not None:
            names = ["norm.weight"] + (["head.weight"] if self.head is not None else [])
            tied_here = self.head is None and self.embedding is not None
            units.append((self.norm, self, names, ["embedding.weight"] if tied_here else []))
        return units

    def _run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        full = self.par.recompute == "full"
        limit = len(self.layers) if self.par.recompute_layers is None else self.par.recompute_layers
        for i, layer in enumerate(self.layers.values()):
            if full and i < limit:
                x = recompute(layer, self.par.rng, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask)
        return x

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                documents: DocumentMask | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, s] (hidden states on a stage without the embedding) -> logits [b, s, vocab] (this tp
        rank's vocabulary slice), or hidden states on a stage without the head. With `labels` [b, s]: the mean
        cross-entropy of predicting labels[:, 1:] from positions [:, :-1] over the labels that are not -100
        (Hugging Face's convention). attention_mask [b, s]: 1 for tokens, 0 for padding keys not to attend to.
        cache: incremental decoding with the full single-process model (see KVCache). documents: intra-document
        masking of packed samples (see engine.models.documents), the layout of the full micro-batch [b, s], built
        by the caller from the token ids and given to every pipeline stage; RoPE positions restart at each
        document. targets [b, s]: the next-token ids of every position (-100: none), for a slice with the head:
        returns the summed loss (head_loss), with the head's matmul inside this forward (so inside any module
        hooks around it, such as ZeRO-3's parameter gathers)."""
        if documents is not None and (cache is not None or attention_mask is not None):
            raise ValueError("documents: not supported together with a KV cache or an attention_mask")
        if cache is not None:
            if targets is not None:
                raise ValueError("targets: not supported with a KV cache (decoding computes no loss)")
            return self._forward_cached(input_ids, labels, attention_mask, cache)
        x = input_ids
        cp, cp_rank = self.par.cp
        shard = self.embedding is None and self.par.tp.sequence_parallel  # hidden states: sequence shards
        seq = x.shape[1] * (self.par.tp.size if shard else 1) * cp  # the whole sequence's length
        if cp > 1 and attention_mask is not None:
            raise ValueError("attention_mask: not supported with context parallelism")
        if documents is not None:
            batch = x.shape[0]
            if (batch, seq) != documents.shape:
                raise ValueError(f"documents: a layout of [batch, seq] {list(documents.shape)} given for a "
                                 f"micro-batch of [batch, seq] {[batch, seq]}")
        if self.embedding is not None:
            if x.shape[1] > self.cfg.seq_length:
                raise ValueError(f"sequence length {x.shape[1]} exceeds the model's --seq-length "
                                 f"{self.cfg.seq_length}")
            x = self.embedding(x)
        mask = None if attention_mask is None else attention_mask_from_padding(attention_mask)
        if cp > 1:  # this rank's tokens sit at the load-balanced global positions (and documents are sharded alike)
            if documents is None:
                x = self._run_layers(x, *self.rope_at(shard_positions(seq, cp, cp_rank), x.dtype), None)
            else:
                positions = shard_sequence(documents.positions, cp, cp_rank, dim=1)
                x = self._run_layers(x, *self.rope_at(positions, x.dtype),
                                     shard_sequence(documents.segment_ids, cp, cp_rank, dim=1))
        elif documents is None:
            x = self._run_layers(x, self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype), mask)
        else:
            x = self._run_layers(x, *self.rope_at(documents.positions, x.dtype), documents)
        if self.norm is None:
            if labels is not None or targets is not None:
                raise ValueError("labels/targets: this model slice has no head, so it cannot compute the loss")
            return x
        hidden = self.norm(x)
        if labels is not None:  # position i predicts labels[i + 1]; the last position predicts nothing
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            return self.head_loss(hidden, targets) / (targets != -100).sum().clamp(min=1)
        if targets is not None:
            return self.head_loss(hidden, targets)
        return self.par.tp.enter_linears(hidden, [self.head_weight()])[0]

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy (fp32) of the head's logits for the final norm's output `hidden` [b, s, h]
        (a sequence shard under sequence parallelism) against `targets` [b, s] (global ids over the whole
        sequence, -100 ignored). With Parallelism.loss_chunk_tokens the head and the loss run that many tokens
        at a time and the logits are never whole (same loss and gradients)."""
        tp, weight = self.par.tp, self.head_weight()
        if self.par.loss_chunk_tokens > 0:
            return chunked_head_cross_entropy(tp.enter(hidden), weight, targets, self.par.loss_chunk_tokens,
                                              self.vocab_start, self.cfg.vocab_size, tp.group)
        logits = tp.enter_linears(hidden, [weight])[0]
        return vocab_parallel_cross_entropy(logits, targets, self.vocab_start, self.cfg.vocab_size, tp.group).sum()

    def rope_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables at `positions`, shared by all layers: [s, d] for positions [s] (every row alike), per
        token [b, 1, s, d] for positions [b, s] (document masking)."""
        cos, sin = (t[positions.to(t.device)].to(dtype) for t in (self.rope_cos, self.rope_sin))
        return (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))

    def _forward_cached(self, input_ids: torch.Tensor, labels, attention_mask, cache: KVCache) -> torch.Tensor:
        whole = self.embedding is not None and self.norm is not None and len(self.layers) == len(cache.layers)
        if not whole or self.par.tp.size > 1:
            raise ValueError("cache: incremental decoding needs the full single-process model (tp=1, pp=1)")
        if labels is not None or attention_mask is not None:
            raise ValueError("cache: labels and attention_mask are not supported with a KV cache")
        start, s = cache.length, input_ids.shape[1]
        if start + s > cache.max_length:
            raise ValueError(f"cache: positions up to {start + s} exceed the cache's max_length {cache.max_length}")
        x = self.embedding(input_ids)
        # the tables from the first new position on: Attention takes their first s rows
        cos, sin = (t[start:start + s].to(x.dtype) for t in (self.rope_cos, self.rope_sin))
        mask = cache.mask(s, x.device)
        for name, layer in self.layers.items():
            x = layer(x, cos, sin, mask, cache.layers[int(name)])
        cache.length += s
        return self.par.tp.enter_linears(self.norm(x), [self.head_weight()])[0]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Layout-invariant init: N(0, init_std) for matrices, with the residual-output projections (wo, w_down)
        scaled by 1/sqrt(2 * num_layers) as in GPT-2/Megatron; ones for norms; zeros for vocabulary padding.
        Each rank draws exactly the rows of its shard (see init_rows_)."""
        out_std = self.cfg.init_std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)
                continue
            std = out_std if name.endswith(("wo.weight", "w_down.weight")) else self.cfg.init_std
            if name == "head.weight" and self.cfg.tie_embeddings:
                name = "embedding.weight"  # a pipeline's last stage holds its own copy of the tied weight
            global_shape, offset, (rows, cols) = valid_slice(param)
            param.zero_()
            init_rows_(param[:rows, :cols], seed, name, std, row_offset=offset[0], col_offset=offset[1],
                       full_cols=global_shape[1])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
