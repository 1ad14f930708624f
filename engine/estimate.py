"""Accounting for a LLaMA training run: parameters, training FLOPs and time, and the memory one GPU holds.

    python -m engine.estimate --model llama-7b --tp 2 --pp 4 --gpus 64 --zero 1 [--json]
    python -m engine.estimate --params 6.5e10 --tokens 1.4e12 --gpus 2048 --flops-per-gpu 2e14 --recompute full

Parameters: embedding V*H, per layer attention H*(a*d) + 2*H*kv + (a*d)*H (q, k, v, o; kv = kv_heads*d),
MLP 3*H*F (SwiGLU), norms 2H (+ H final), head V*H (0 when tied). Without GQA or tying this is
2VH + H + L(4H^2 + 3HF + 2H).

Training FLOPs: 6 * tokens * params (forward 2, backward 4 per parameter and token), 8 * tokens * params with
full recomputation (one more forward). Time: train_flops / (gpus * flops_per_gpu).

Memory is what one rank holds: its shard of the weights (matrices / tp, vocabulary rows / tp padded up, norms
replicated; layers / pp with the embedding on the first stage and the final norm + head on the last, the last
stage keeping its own copy of a tied embedding when pp > 1), gradients (fp32 "main_grad"), optimizer state
(AdamW: m and v; Adafactor: a row and a column statistic per matrix, a full one per vector, and its momentum when
beta1 > 0; plus an fp32 master copy in bf16/fp16) with ZeRO sharding over dp x cp, and the saved activations of the
micro-batches in flight (each context-parallel rank holding 1/cp of every sequence). `total` sums those; the step's
transient buffers come on top: `zero_buffers` (ZeRO-2/3 with dp x cp > 1: temporary fp32 gradient buckets and
ZeRO-3's gathered units, zero_working_bytes), `loss_buffers` (the head and loss, loss_buffer_bytes) and
`recompute_buffers` (--recompute full: the layer being recomputed), giving `peak` (see memory_per_rank). The stage
whose peak is largest is reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import NoReturn

from engine.models.llama import (PRESETS, ModelConfig, Parallelism, partial_gradient, pipeline_chunk, preset,
                                 sdpa_native_gqa)
from engine.parallel.rules import layout_errors, optimizer_errors

H100_BF16_DENSE_FLOPS = 989e12
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
# Optimizer state per parameter: fp32 trains its parameters directly (m, v); bf16/fp16 add an fp32 master.
OPTIMIZER_BYTES = {"fp32": 8, "bf16": 12, "fp16": 12}
GRAD_BYTES = 4  # fp32 in fp32 training; fp32 main_grad accumulators in bf16/fp16
GIB = 2 ** 30


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------- params

def count_parameters(cfg: ModelConfig) -> dict:
    """Parameters by component: embedding, attention, mlp, norms, head, total (equals sum(p.numel()))."""
    h, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    q = cfg.num_heads * cfg.head_dim
    counts = {
        "embedding": v * h,
        "attention": layers * (h * q + 2 * h * cfg.kv_dim + q * h),
        "mlp": layers * 3 * h * cfg.ffn_hidden_size,
        "norms": layers * 2 * h + h,
        "head": 0 if cfg.tie_embeddings else v * h,
    }
    return {**counts, "total": sum(counts.values())}


def model_flops_per_token(cfg: ModelConfig, seq_length: int | None = None) -> float:
    """Model FLOPs of one training token (forward + backward), Megatron's MFU convention.

    6 x the matmul parameters (every attention and MLP weight plus the LM head V*H, counted even when tied;
    not the embedding lookup, not the norms) + 12 * num_layers * seq_length * (num_heads * head_dim) for the
    attention scores and the attention-weighted values, over the full s x s square (causal masking ignored),
    as in Megatron's 72*B*s*L*h^2 * (1 + s/(6h) + V/(12hL)). Recomputation is not counted: MFU counts model
    FLOPs, not hardware FLOPs. seq_length defaults to cfg.seq_length.
    """
    s = cfg.seq_length if seq_length is None else seq_length
    counts = count_parameters(cfg)
    matmul = counts["attention"] + counts["mlp"] + cfg.vocab_size * cfg.hidden_size
    return 6.0 * matmul + 12.0 * cfg.num_layers * s * cfg.num_heads * cfg.head_dim


def training_flops(params: float, tokens: float, recompute: str = "none") -> tuple[float, float]:
    """(flops_per_token, train_flops): 6P per token, 8P with full recomputation (a second forward)."""
    per_token = (8.0 if recompute == "full" else 6.0) * params
    return per_token, per_token * tokens


# --------------------------------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    microbatches: int | None = None  # per optimizer step and pipeline; None: enough to fill the pipeline
    schedule: str = "1f1b"
    precision: str = "bf16"
    recompute: str = "none"
    loss_chunk_tokens: int = 0  # the trainer's --loss-chunk-tokens: head and loss fused, a chunk at a time
    fused_elementwise: bool = False  # the trainer's --fused-elementwise: RMSNorm and SwiGLU keep less
    optimizer: str = "adamw"  # or "adafactor" (tp 1, no ZeRO sharding)
    beta1: float = 0.9  # Adafactor keeps a momentum only when beta1 > 0
    bucket_size: int = 4_000_000  # the trainer's --bucket-size: elements per gradient bucket (ZeRO 0-2)
    keep_params: bool = False  # the trainer's --zero3-keep-params: a stage's units stay gathered for the step


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters one rank of pipeline stage `stage` holds (its tensor-parallel shard)."""
    h = cfg.hidden_size
    q = cfg.num_heads * cfg.head_dim
    per_layer = (h * q + 2 * h * cfg.kv_dim + q * h + 3 * h * cfg.ffn_hidden_size) // tp + 2 * h
    return _stage_sum(cfg, pp, stage, per_layer, vocab_matrix=_ceil_div(cfg.vocab_size, tp) * h, final_norm=h)


def _stage_sum(cfg: ModelConfig, pp: int, stage: int, per_layer: int, vocab_matrix: int, final_norm: int) -> int:
    """A per-parameter quantity summed over what stage `stage` holds: its layers, the embedding on the first stage,
    the final norm and the head on the last (the head only when it is not the first stage's tied embedding)."""
    first, last = stage == 0, stage == pp - 1
    has_head = last and not (cfg.tie_embeddings and first)
    return cfg.num_layers // pp * per_layer + (first + has_head) * vocab_matrix + last * final_norm


def adafactor_statistics(cfg: ModelConfig, pp: int, stage: int) -> int:
    """Elements of Adafactor's second-moment statistics on a rank of pipeline stage `stage` (tp 1, unsharded): a
    matrix [n, m] keeps n row and m column means, a vector (a norm's weight) one entry per element."""
    h, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.kv_dim, cfg.ffn_hidden_size
    per_layer = (q + h) + 2 * (kv + h) + (h + q) + 2 * (f + h) + (h + f) + 2 * h  # q, k, v, o, gate, up, down, norms
    return _stage_sum(cfg, pp, stage, per_layer, vocab_matrix=cfg.vocab_size + h, final_norm=h)


def adafactor_bytes(cfg: ModelConfig, layout: Layout, stage: int) -> int:
    """Bytes of Adafactor's state on a rank of stage `stage`: fp32 statistics, momentum (beta1 > 0) and masters
    (bf16/fp16)."""
    params = stage_parameters(cfg, layout.tp, layout.pp, stage)
    full_copies = (layout.beta1 > 0) + (layout.precision != "fp32")
    return 4 * (adafactor_statistics(cfg, layout.pp, stage) + full_copies * params)


def state_bytes(params: int, precision: str, zero: int, dp: int) -> dict:
    """Bytes of weights, gradients and optimizer state for `params` parameters, ZeRO-sharded over dp."""
    def shard(sharded: bool) -> int:
        return _ceil_div(params, dp) if sharded else params
    return {"params": shard(zero >= 3) * BYTES_PER_ELEMENT[precision], "grads": shard(zero >= 2) * GRAD_BYTES,
            "optimizer": shard(zero >= 1) * OPTIMIZER_BYTES[precision]}


def zero_buckets(cfg: ModelConfig, layout: Layout, stage: int) -> tuple[list, list]:
    """(buckets, units) of the ZeRO optimizer on a rank of pipeline stage `stage`, laid out by the optimizer's own
    rules over the stage's parameters (built on the meta device: shapes only). Buckets come in backward order."""
    import torch

    from engine.optim.zero.layout import layout_buckets, layout_units
    from engine.parallel.layers import TPContext
    from engine.pipeline.schedules import virtual_stage

    lo = layout
    par = Parallelism(tp=TPContext(size=lo.tp, sequence_parallel=lo.sequence_parallel))
    with torch.device("meta"):
        chunks = [pipeline_chunk(cfg, virtual_stage(stage, c, lo.pp), lo.pp * lo.vpp, par) for c in range(lo.vpp)]
    named = [(n, p) for chunk in chunks for n, p in chunk.named_parameters()]
    tied_across_stages = cfg.tie_embeddings and lo.pp > 1
    partial = {"embedding", "tp"} if lo.tp > 1 else {"embedding"}  # (sums over a group of one are no partial sums)
    deferred = {n for n, p in named if partial_gradient(n, p, tied_across_stages) in partial}
    dp = lo.dp * lo.cp
    units = [(c, u) for c, chunk in enumerate(chunks) for u in chunk.gathering_units()]
    if lo.zero >= 3:
        return list(reversed(layout_units([u for _, u in units], dict(named), dp, deferred))), units
    module_of = {n: i for i, chunk in enumerate(chunks) for n, _ in chunk.named_parameters()}
    return layout_buckets(list(reversed(named)), dp, lo.bucket_size, deferred, module_of), units


def zero_working_bytes(layout: Layout, buckets: list, units: list) -> int:
    """The peak of ZeRO-2/3's transient buffers during a step, in bytes (buckets and units from zero_buckets).

    Gradients (stages 2-3): a micro-batch's gradients go into a temporary fp32 copy of their whole bucket,
    reduce-scattered into a 1/dp output once complete; the next bucket fills while one is in flight, and the last
    one of a micro-batch stays in flight into the next (with more than one micro-batch). Gradients are taken to
    arrive bucket by bucket in backward order. Parameters (stage 3): the unit running is gathered with its
    neighbour (prefetched: the next in forward, the previous in backward), a tied head's embedding from the head's
    backward until the embedding's own (its gradient arrives once, when both uses are summed); with keep_params
    every unit of the stage.
    """
    lo, dp = layout, layout.dp * layout.cp
    if lo.zero < 2 or dp == 1:
        return 0
    wraps = lo.microbatches is None or lo.microbatches > 1

    def in_flight(size: int) -> int:  # a bucket being reduced: its fp32 copy and the reduction's output
        return 4 * (size + size // dp)

    if lo.zero == 2:
        sizes = [b.size for b in buckets if not b.deferred]  # (deferred buckets accumulate in persistent copies)
        before = ([sizes[-1]] if wraps else [0]) + sizes[:-1]
        return max(4 * size + (in_flight(prev) if prev else 0) for size, prev in zip(sizes, before))
    size = {id(b): b.size * BYTES_PER_ELEMENT[lo.precision] for b in buckets}
    grad_size = {id(b): b.size for b in buckets if not b.deferred}
    holding = {n: id(b) for b in buckets for n in b.names}
    chunk = [c for c, _ in units]
    own = [{holding[n] for n in names} for _, (_, _, names, _) in units]
    needs = [o | {holding[n] for n in borrowed} for o, (_, (_, _, _, borrowed)) in zip(own, units)]
    n = len(units)
    # (prefetching stays within a chunk)
    nxt = [own[i + 1] if i + 1 < n and chunk[i + 1] == chunk[i] else set() for i in range(n)]
    prev = [own[i - 1] if i > 0 and chunk[i - 1] == chunk[i] else set() for i in range(n)]
    unit_grads = [sum(grad_size.get(b, 0) for b in o) for o in own]  # elements of the unit's temporary bucket
    last_reduced = next(g for g in unit_grads if g)  # the first unit's: the end of a micro-batch's backward

    def gathered_bytes(ids: set) -> int:
        return sum(size.values()) if lo.keep_params else sum(size[b] for b in ids)

    peak = 0
    carried = in_flight(last_reduced) if wraps else 0
    for i in range(n):  # forward: unit i with the next prefetched, the previous micro-batch's last bucket in flight
        peak = max(peak, gathered_bytes(needs[i] | nxt[i]) + carried)
    flight = carried
    for i in reversed(range(n)):  # backward: unit i with the previous prefetched and borrowed units still held
        held = set().union(*needs[i + 1:]) - set().union(*own[i + 1:])
        gathered = gathered_bytes(needs[i] | held | prev[i])
        peak = max(peak, gathered + 4 * unit_grads[i] + flight)
        flight = in_flight(unit_grads[i]) if unit_grads[i] else flight
    return peak


def saved_activations(cfg: ModelConfig, micro_batch_size: int, seq_length: int, recompute: str,
                      bytes_per_element: int, device: str = "cuda",
                      fused_elementwise: bool = False) -> list[tuple[str, int, int, str]]:
    """The tensors one transformer layer saves for backward: (what, elements, bytes per element, region).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), adapted to this
    engine's LLaMA layer: SwiGLU MLP of width F (four F-wide tensors instead of GeLU's two 4h ones), GQA,
    RMSNorm that upcasts its input to fp32 (so it saves the fp32 input, 1/rms, the normalised x and the
    weighted output, the latter shared with the next matmul), no dropout masks when dropout = 0, and attention
    through SDPA (flash / memory-efficient: q, k, v, the output and an fp32 log-sum-exp per head and token are
    saved, never the s x s scores). Where llama.sdpa_native_gqa holds for `device` and the precision (torch >=
    2.5, but not fp32 on CUDA) attention_core passes the un-expanded k and v with enable_gqa and SDPA saves them
    kv_dim wide (measured on CPU: the flash kernel saves k, v at kv_dim and the log-sum-exp per query head);
    otherwise it expands them to num_heads with repeat_interleave first, so SDPA saves them at full width.

    region "tp": inside the tensor-parallel region, split over tp. "seq": norm/residual region, split over
    tp only with sequence parallelism (assuming, as Megatron does, that the column-parallel matmuls save their
    sequence-sharded input and all-gather it again in backward).

    recompute "none": all of the above. "selective": the attention core (SDPA, plus repeat_interleave on old
    torch) is recomputed, so only its inputs are kept: q and the un-expanded k, v (kv_dim wide); its output is
    still saved as the input of wo; the log-sum-exp (and on old torch the expanded k, v) is dropped. With flash
    attention there is no s^2 term left to save, so selective saves little (nothing but the log-sum-exp with
    native GQA or without GQA). "full": only the layer input is kept. Transients (one layer's rematerialised
    activations during its backward, gradient buffers) are not counted. With dropout > 0 the residual dropout
    masks are counted as CUDA's native_dropout keeps them (1 byte each); dropout on the attention
    probabilities is not (flash attention replays it from the RNG state).

    fused_elementwise (engine/models/fused.py): each RMSNorm keeps its input (not upcast) and 1/rms only, and
    SwiGLU its gate and up (not SiLU(gate)); the rotary embedding keeps nothing either way.
    """
    e, sb, h, f = bytes_per_element, micro_batch_size * seq_length, cfg.hidden_size, cfg.ffn_hidden_size
    q, kv, heads = cfg.num_heads * cfg.head_dim, cfg.kv_dim, cfg.num_heads
    if recompute == "full":
        return [("layer input", sb * h, e, "seq")]

    def norm(name: str, consumer: str) -> list:
        return [*norm_rows(name, sb, h, e, fused_elementwise), (f"{name} output = {consumer} input", sb * h, e, "seq")]
    native = kv == q or sdpa_native_gqa(device, fp32=bytes_per_element == 4)
    sdpa_kv, expanded = (kv, "") if native else (q, ", expanded to num_heads")
    attention_core = {
        "none": [("q after RoPE (SDPA input)", sb * q, e, "tp"),
                 (f"k after RoPE{expanded} (SDPA input)", sb * sdpa_kv, e, "tp"),
                 (f"v{expanded} (SDPA input)", sb * sdpa_kv, e, "tp"),
                 ("SDPA log-sum-exp", sb * heads, 4, "tp")],
        "selective": [("q after RoPE (checkpoint input)", sb * q, e, "tp"),
                      ("k after RoPE (checkpoint input)", sb * kv, e, "tp"),
                      ("v (checkpoint input)", sb * kv, e, "tp")],
    }[recompute]
    dropout_masks = [("residual dropout mask", sb * h, 1, "seq")] * 2 if cfg.dropout > 0 else []
    swiglu = [("gate = SiLU input", sb * f, e, "tp"), *([] if fused_elementwise else [("SiLU(gate)", sb * f, e, "tp")]),
              ("up", sb * f, e, "tp")]
    return [*norm("attn_norm", "wq/wk/wv"), *attention_core, ("attention output = wo input", sb * q, e, "tp"),
            *norm("mlp_norm", "w_gate/w_up"), *swiglu, ("SiLU(gate) * up = w_down input", sb * f, e, "tp"),
            *dropout_masks]


def norm_rows(name: str, sb: int, h: int, e: int, fused_elementwise: bool) -> list[tuple[str, int, int, str]]:
    """What one RMSNorm saves besides its output: the plain code its input upcast to fp32, 1/rms and the
    normalised x; the fused one its input and 1/rms."""
    if fused_elementwise:
        return [(f"{name} input", sb * h, e, "seq"), (f"{name} 1/rms", sb, 4, "seq")]
    return [(f"{name} input, upcast to fp32", sb * h, 4, "seq"), (f"{name} 1/rms", sb, 4, "seq"),
            (f"{name} normalised x (for the weight grad)", sb * h, e, "seq")]


def saved_head_activations(cfg: ModelConfig, micro_batch_size: int, seq_length: int, tp: int,
                           bytes_per_element: int, loss_chunk_tokens: int = 0,
                           fused_elementwise: bool = False) -> list[tuple[str, int, int, str]]:
    """What the last stage saves beyond its layers: the final norm, and the fp32 softmax gradient of the
    (vocab-parallel, padded) logits that the cross-entropy keeps, with the head's input. With a chunked loss
    (loss_chunk_tokens > 0) the logits never outlive a chunk: the gradients of the head's input (all tokens, fp32)
    and of its weight (this rank's vocabulary rows, fp32), taken in forward, are kept instead, and the final norm's
    output is not (the one chunk of logits alive at a time is a transient, not counted). Same row format as
    saved_activations; region "all": held whole on every rank."""
    e, sb, h = bytes_per_element, micro_batch_size * seq_length, cfg.hidden_size
    padded_vocab = _ceil_div(cfg.vocab_size, tp) * tp
    norm = norm_rows("final norm", sb, h, e, fused_elementwise)
    if loss_chunk_tokens > 0:
        return norm + [("head input gradient, fp32", sb * h, 4, "all"),
                       ("head weight gradient, fp32", padded_vocab * h, 4, "tp")]
    return norm + [("final norm output = head input", sb * h, e, "seq"),
                   ("softmax gradient of the logits, fp32", sb * padded_vocab, 4, "tp")]


def _rows_bytes(rows: list, tp: int, sequence_parallel: bool) -> int:
    split = {"tp": tp, "seq": tp if sequence_parallel else 1, "all": 1}
    return sum(_ceil_div(n, split[region]) * nbytes for _, n, nbytes, region in rows)


def activation_bytes_per_layer(cfg: ModelConfig, micro_batch_size: int, seq_length: int, tp: int,
                               sequence_parallel: bool, recompute: str, bytes_per_element: int,
                               device: str = "cuda", fused_elementwise: bool = False) -> int:
    """Bytes one rank saves for backward per transformer layer and micro-batch (see saved_activations)."""
    rows = saved_activations(cfg, micro_batch_size, seq_length, recompute, bytes_per_element, device,
                             fused_elementwise)
    return _rows_bytes(rows, tp, sequence_parallel)


def microbatch_activation_bytes(cfg: ModelConfig, micro_batch_size: int, seq_length: int, tp: int,
                                sequence_parallel: bool, recompute: str, bytes_per_element: int,
                                num_layers: int | None = None, last_stage: bool = True, device: str = "cuda",
                                loss_chunk_tokens: int = 0, fused_elementwise: bool = False) -> int:
    """Bytes one rank saves for backward for one micro-batch through `num_layers` layers (default: all),
    plus the final norm and loss when it holds the last stage: what the trainer's memory event measures."""
    layers = cfg.num_layers if num_layers is None else num_layers
    total = layers * activation_bytes_per_layer(cfg, micro_batch_size, seq_length, tp, sequence_parallel,
                                                recompute, bytes_per_element, device, fused_elementwise)
    if last_stage:
        rows = saved_head_activations(cfg, micro_batch_size, seq_length, tp, bytes_per_element, loss_chunk_tokens,
                                      fused_elementwise)
        total += _rows_bytes(rows, tp, sequence_parallel)
    return total


def inflight_chunks(schedule: str, pp: int, vpp: int, stage: int, microbatches: int | None) -> int:
    """(micro-batch, model chunk) activation sets pipeline rank `stage` holds at its peak.

    1F1B: min(pp - stage, m), so pp on the first stage. Interleaved (Megatron): warm-up
    2(pp - stage - 1) + (vpp - 1)pp plus the one in its steady-state step, at most m*vpp; in layers that is
    L(1 + (pp - 1)/(pp*vpp)) on the first stage. GPipe: all m. m unknown (None): enough micro-batches to fill
    the pipeline (m = pp for GPipe).
    """
    m = microbatches if microbatches is not None else math.inf
    if schedule == "gpipe":
        return microbatches or pp
    if schedule == "interleaved":
        return int(min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, m * vpp))
    return int(min(pp - stage, m))


def loss_buffer_bytes(cfg: ModelConfig, micro_batch_size: int, seq_length: int, tp: int, bytes_per_element: int,
                      loss_chunk_tokens: int = 0) -> int:
    """The largest set of buffers the head and the loss allocate beyond the saved activations (one micro-batch of
    seq_length tokens, the last stage), measured with the CPU allocator (tests/test_activation_memory.py):

    - tp 1: F.cross_entropy's backward holds the fp32 gradients of the log-probabilities and of the logits, two
      [tokens, vocab] fp32 buffers (more than the forward's logits and their fp32 copy);
    - tp > 1: the forward's logits in the compute dtype, [tokens, vocab / tp], while the loss keeps its fp32 copy
      (in bf16 the backward's cast of the fp32 gradient is the same size again, not at the same time);
    - chunked (loss_chunk_tokens > 0): a chunk's fp32 logits (in bf16 the chunk's logits and their gradient in
      bf16), the chunk's head-weight gradient [vocab / tp, h] in the compute dtype (in bf16 with its fp32 copy),
      and the final norm's output (all tokens; the loss keeps only gradients).
    Small terms of order tokens x h besides these are not counted.
    """
    e, sb, h = bytes_per_element, micro_batch_size * seq_length, cfg.hidden_size
    vocab = _ceil_div(cfg.vocab_size, tp)
    if loss_chunk_tokens > 0:
        chunk = min(loss_chunk_tokens, sb)
        logits = chunk * vocab * 4  # fp32: the logits, overwritten by their gradient; bf16: both in bf16
        weight_grad = vocab * h * (4 if e == 4 else e + 4)
        return logits + weight_grad + sb * h * 4
    if tp == 1:
        return 2 * sb * vocab * 4
    return sb * vocab * e


def memory_per_rank(cfg: ModelConfig, layout: Layout, stage: int) -> dict:
    """Bytes one rank of pipeline stage `stage` holds: params, grads, optimizer and saved activations with their
    total, then the step's transient buffers - zero_buffers (ZeRO-2/3, zero_working_bytes), loss_buffers (the last
    stage, loss_buffer_bytes), recompute_buffers (--recompute full: the activations of the layer being recomputed)
    - and peak = total + all three. Measured on the CPU allocator, the loss's buffers and the recomputed layer add
    up (the first layer recomputed finds the loss's still held), while the ZeRO buffers peak at another moment:
    with them the peak is an upper bound. A layer's own backward transients (gradients of its intermediates, of
    order tokens x ffn) are not counted."""
    lo, e = layout, BYTES_PER_ELEMENT[layout.precision]
    # context-parallel ranks hold the same parameters (ZeRO shards over dp x cp) and 1/cp of each sequence
    mem = state_bytes(stage_parameters(cfg, lo.tp, lo.pp, stage), lo.precision, lo.zero, lo.dp * lo.cp)
    if lo.optimizer == "adafactor":
        mem["optimizer"] = adafactor_bytes(cfg, lo, stage)
    working = 0
    if lo.zero >= 2 and lo.dp * lo.cp > 1:
        buckets, units = zero_buckets(cfg, lo, stage)
        # a shard of every bucket, and whole fp32 copies of the buckets that accumulate model-parallel partial sums
        mem["grads"] = GRAD_BYTES * sum(b.size // (lo.dp * lo.cp) + b.deferred * b.size for b in buckets)
        working = zero_working_bytes(lo, buckets, units)
    layers = inflight_chunks(lo.schedule, lo.pp, lo.vpp, stage, lo.microbatches) * cfg.num_layers // (lo.pp * lo.vpp)
    args = (cfg, lo.micro_batch_size, cfg.seq_length // lo.cp)
    activations = layers * activation_bytes_per_layer(*args, lo.tp, lo.sequence_parallel, lo.recompute, e,
                                                      fused_elementwise=lo.fused_elementwise)
    # --recompute full: in backward each layer's forward runs again, and its activations exist until its backward
    recomputed = 0
    if lo.recompute == "full" and layers:
        recomputed = activation_bytes_per_layer(*args, lo.tp, lo.sequence_parallel, "none", e,
                                                fused_elementwise=lo.fused_elementwise) - \
            activation_bytes_per_layer(*args, lo.tp, lo.sequence_parallel, "full", e)
    loss = 0
    if stage == lo.pp - 1:
        head_inflight = (lo.microbatches or lo.pp) if lo.schedule == "gpipe" else 1
        head = saved_head_activations(*args, lo.tp, e, lo.loss_chunk_tokens, lo.fused_elementwise)
        activations += head_inflight * _rows_bytes(head, lo.tp, lo.sequence_parallel)
        loss = loss_buffer_bytes(*args, lo.tp, e, lo.loss_chunk_tokens)
    mem["activations"] = activations
    total = sum(mem.values())
    return {**mem, "total": total, "zero_buffers": working, "loss_buffers": loss, "recompute_buffers": recomputed,
            "peak": total + working + loss + recomputed}


def peak_memory(cfg: ModelConfig, layout: Layout) -> tuple[int, dict]:
    """(stage, memory_per_rank) of the pipeline stage whose peak is largest."""
    return max(((s, memory_per_rank(cfg, layout, s)) for s in range(layout.pp)), key=lambda x: x[1]["peak"])


# --------------------------------------------------------------------------------------------------- CLI

MODEL_FLAGS = [  # (flag, type, help): overrides of the preset, as in the trainer
    ("--num-layers", int, "transformer layers"), ("--hidden-size", int, "model width"),
    ("--ffn-hidden-size", int, "SwiGLU inner width"), ("--num-heads", int, "query heads"),
    ("--num-kv-heads", int, "key/value heads"), ("--vocab-size", int, "vocabulary size"),
    ("--seq-length", int, "tokens per sample"), ("--rope-theta", float, "rotary base (no effect on counts)"),
    ("--norm-eps", float, "RMSNorm epsilon (no effect on counts)"),
    ("--dropout", float, "dropout; > 0 adds two residual dropout masks per layer"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one "error: --flag: ..." line, exit status 2
        self.exit(2, f"error: {message.removeprefix('argument ')}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.estimate",
                description="Parameters, training FLOPs and time, and per-GPU memory of a LLaMA training run.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", choices=list(PRESETS), help="model preset [tiny unless --params]")
    what.add_argument("--params", type=float, help="parameter count, e.g. 6.5e10 (no architecture: no activations)")
    p.add_argument("--tokens", type=float, help="training tokens [20 x params, Chinchilla]")
    p.add_argument("--gpus", type=int, help="GPUs [tp * cp * pp * dp]")
    p.add_argument("--flops-per-gpu", type=float, default=H100_BF16_DENSE_FLOPS,
                   help="sustained FLOP/s per GPU [989e12, the dense bf16 peak of an H100 SXM; real runs reach "
                        "40-60%% of it]")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none", help="[none]")
    p.add_argument("--loss-chunk-tokens", type=int, default=0,
                   help="the trainer's fused, chunked head and loss: no [tokens, vocab] logits kept [0: off]")
    p.add_argument("--fused-elementwise", action="store_true",
                   help="the trainer's fused RMSNorm and SwiGLU, which keep fewer activations")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    model = p.add_argument_group("model overrides")
    for flag, kind, text in MODEL_FLAGS:
        model.add_argument(flag, type=kind, help=text)
    model.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, help="share embedding and head")
    layout = p.add_argument_group("layout")
    for flag, default, text in [
            ("--tp", 1, "tensor-parallel size [1]"), ("--cp", 1, "context-parallel size [1]"),
            ("--pp", 1, "pipeline-parallel size [1]"), ("--dp", None, "data-parallel size [gpus / (tp * cp * pp)]"),
            ("--vpp", 1, "virtual pipeline stages per rank [1]"),
            ("--micro-batch-size", 1, "samples per micro-batch [1]"),
            ("--global-batch-size", None, "samples per step; sets the micro-batches per step "
                                          "[unknown: enough to fill the pipeline]")]:
        layout.add_argument(flag, type=int, default=default, help=text)
    layout.add_argument("--schedule", choices=["1f1b", "interleaved", "gpipe"],
                        help="pipeline schedule [1f1b; interleaved when --vpp > 1]")
    layout.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0, help="ZeRO stage [0]")
    layout.add_argument("--bucket-size", type=int, default=4_000_000,
                        help="elements per gradient bucket, as the trainer's (sizes ZeRO-2's temporary buckets) "
                             "[4,000,000]")
    layout.add_argument("--zero3-keep-params", action="store_true",
                        help="ZeRO-3 keeps a stage's parameters gathered for the whole step, as the trainer's flag")
    layout.add_argument("--sequence-parallel", action="store_true", help="shard norm/residual activations over tp")
    layout.add_argument("--precision", choices=list(BYTES_PER_ELEMENT), default="bf16", help="[bf16]")
    layout.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw",
                        help="[adamw]; adafactor keeps factored statistics (tp 1, no ZeRO sharding)")
    layout.add_argument("--beta1", type=float, default=0.9,
                        help="Adafactor's momentum (0: none, as the trainer's --beta1) [0.9]")
    return p


def _model_config(args) -> ModelConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(preset(args.model or "tiny"), **overrides)


def _check(args, cfg: ModelConfig | None) -> list[str]:
    """Every problem with the flags, as 'flag: message' lines; fills in args.gpus, args.dp, args.schedule."""
    positive = [("--params", args.params), ("--tokens", args.tokens), ("--gpus", args.gpus),
                ("--flops-per-gpu", args.flops_per_gpu), ("--tp", args.tp), ("--cp", args.cp), ("--pp", args.pp),
                ("--dp", args.dp),
                ("--vpp", args.vpp), ("--micro-batch-size", args.micro_batch_size), ("--bucket-size", args.bucket_size),
                ("--global-batch-size", args.global_batch_size)]
    if args.loss_chunk_tokens < 0:
        positive.append(("--loss-chunk-tokens", args.loss_chunk_tokens))
    errors = [f"{flag}: must be positive, got {value:g}" for flag, value in positive
              if value is not None and not value > 0]
    if cfg is not None:
        errors += [f"{flag}: {msg}" for flag, msg in cfg.validate()]
    if errors:
        return errors
    tp, pp, vpp = args.tp, args.pp, args.vpp
    model_parallel = tp * args.cp * pp
    if args.dp is None:
        args.dp = (args.gpus or model_parallel) // model_parallel
        if args.gpus is not None and args.gpus % model_parallel:
            errors.append(f"--gpus: {args.gpus} is not a multiple of tp * cp * pp = {model_parallel}")
    elif args.gpus is not None and args.gpus != model_parallel * args.dp:
        errors.append(f"--dp: tp * cp * pp * dp = {model_parallel * args.dp} does not equal --gpus {args.gpus}; "
                      "drop one of them or make them agree")
    args.gpus = args.gpus or model_parallel * args.dp
    args.schedule = args.schedule or ("interleaved" if vpp > 1 else "1f1b")
    errors += optimizer_errors(args.optimizer, tp, args.zero, args.dp, args.cp)
    if cfg is None and args.optimizer == "adafactor":
        errors.append("--optimizer adafactor: its statistics follow the matrices' shapes, which --params does not "
                      "give; use --model with overrides")
    if cfg is not None:  # the trainer's own rules
        return errors + layout_errors(cfg, tp, pp, vpp, args.dp, args.sequence_parallel, args.schedule,
                                      args.micro_batch_size, args.global_batch_size, cp=args.cp)
    if (args.schedule == "interleaved") != (vpp > 1):
        errors.append(f"--schedule {args.schedule}: interleaved goes with --vpp > 1, and only it")
    if vpp > 1 and pp == 1:
        errors.append("--vpp: virtual stages need --pp > 1")
    if args.sequence_parallel and tp == 1:
        errors.append("--sequence-parallel: needs --tp > 1")
    if args.global_batch_size is not None and args.global_batch_size % (args.micro_batch_size * args.dp):
        errors.append(f"--global-batch-size: {args.global_batch_size} is not a multiple of micro-batch-size * dp"
                      f" = {args.micro_batch_size * args.dp}")
    return errors


def estimate(argv: list[str] | None = None) -> dict:
    """The report main() prints, as a dict; exits with status 2 on invalid flags."""
    return _report(build_parser().parse_args(argv))


def _report(args: argparse.Namespace) -> dict:
    flags = [flag for flag, _, _ in MODEL_FLAGS] + ["--tie-embeddings"]
    given_overrides = [flag for flag in flags if getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.params is not None and given_overrides:
        _fail([f"--params: gives no architecture, so {', '.join(given_overrides)} cannot apply; "
               "use --model with overrides instead"])
    cfg = None if args.params is not None else _model_config(args)
    errors = _check(args, cfg)
    if errors:
        _fail(errors)
    per_step = args.micro_batch_size * args.dp
    layout = Layout(tp=args.tp, cp=args.cp, pp=args.pp, dp=args.dp, vpp=args.vpp, zero=args.zero,
                    sequence_parallel=args.sequence_parallel, micro_batch_size=args.micro_batch_size,
                    microbatches=args.global_batch_size // per_step if args.global_batch_size else None,
                    schedule=args.schedule, precision=args.precision, recompute=args.recompute,
                    loss_chunk_tokens=args.loss_chunk_tokens, fused_elementwise=args.fused_elementwise,
                    optimizer=args.optimizer, beta1=args.beta1, bucket_size=args.bucket_size,
                    keep_params=args.zero3_keep_params)
    report = {"model": args.model or ("tiny" if cfg else None), "layout": dataclasses.asdict(layout)}
    if cfg is None:
        params = int(args.params)
        stage, memory = 0, {**state_bytes(_ceil_div(params, args.tp * args.pp), args.precision, args.zero,
                                          args.dp * args.cp),
                            "activations": 0}
        memory["total"] = sum(memory.values())
        memory.update(zero_buffers=0, loss_buffers=0, recompute_buffers=0, peak=memory["total"])
        report["notes"] = ["--params gives no architecture: weights split evenly over tp * pp, activations and "
                           "transient buffers not estimated (0)"]
    else:
        report["config"] = dataclasses.asdict(cfg)
        report["params_by_component"] = count_parameters(cfg)
        report["model_flops_per_token"] = model_flops_per_token(cfg)
        params = report["params_by_component"]["total"]
        stage, memory = peak_memory(cfg, layout)
    tokens = args.tokens if args.tokens is not None else 20.0 * params
    per_token, train_flops = training_flops(params, tokens, args.recompute)
    seconds = train_flops / (args.gpus * args.flops_per_gpu)
    return {**report, "params": params, "tokens": tokens, "flops_per_token": per_token, "train_flops": train_flops,
            "gpus": args.gpus, "flops_per_gpu": args.flops_per_gpu, "train_seconds": seconds,
            "train_days": seconds / 86400, "memory_stage": stage,
            "memory_bytes": {k: memory[k] for k in ("params", "grads", "optimizer", "activations", "total")},
            "peak_memory_bytes": {k: memory[k] for k in ("zero_buffers", "loss_buffers", "recompute_buffers", "peak")}}


def _fail(errors: list[str]) -> NoReturn:
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def format_report(r: dict) -> str:
    lay = r["layout"]
    lines = []
    if "config" in r:
        c = r["config"]
        lines += [f"model {r['model']}: {c['num_layers']} layers, hidden {c['hidden_size']}, ffn "
                  f"{c['ffn_hidden_size']}, {c['num_heads']} heads ({c['num_kv_heads']} kv), vocab "
                  f"{c['vocab_size']}, seq {c['seq_length']}{', tied embeddings' if c['tie_embeddings'] else ''}",
                  "parameters"]
        lines += [f"  {name:<12}{n:>20,}" for name, n in r["params_by_component"].items()]
    else:
        lines += ["parameters", f"  {'total':<12}{r['params']:>20,}"]
    factor = r["flops_per_token"] / r["params"]
    lines += ["compute",
              f"  {'flops/token':<24}{r['flops_per_token']:.4g}  ({factor:g} x params)"]
    if "model_flops_per_token" in r:
        lines.append(f"  {'model flops/token (MFU)':<24}{r['model_flops_per_token']:.4g}  (Megatron convention)")
    lines += [f"  {'tokens':<24}{r['tokens']:.4g}",
              f"  {'train flops':<24}{r['train_flops']:.4g}",
              f"  {'gpus':<24}{r['gpus']} x {r['flops_per_gpu'] / 1e12:g} TFLOP/s",
              f"  {'train time':<24}{r['train_seconds']:.4g} s = {r['train_days']:.2f} days",
              f"memory per GPU, GiB ({lay['precision']}, tp {lay['tp']}, cp {lay['cp']}, pp {lay['pp']}, "
              f"dp {lay['dp']}, "
              f"vpp {lay['vpp']}, zero {lay['zero']}, sp {'on' if lay['sequence_parallel'] else 'off'}, "
              f"micro-batch {lay['micro_batch_size']}, recompute {lay['recompute']}; "
              f"pipeline stage {r['memory_stage']} of {lay['pp']}, the largest)"]
    lines += [f"  {name:<14}{n / GIB:>10.2f}" for name, n in r["memory_bytes"].items()]
    names = {"zero_buffers": "ZeRO buffers", "loss_buffers": "loss buffers", "recompute_buffers": "recompute",
             "peak": "peak"}
    lines += [f"  {names[name]:<14}{n / GIB:>10.2f}" for name, n in r["peak_memory_bytes"].items()
              if n or name in ("loss_buffers", "peak")]
    lines += [f"note: {note}" for note in r.get("notes", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report = _report(args)
    print(json.dumps(report) if args.json else format_report(report))


if __name__ == "__main__":
    main()
