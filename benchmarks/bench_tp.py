"""One tensor-parallel training step: ``engine`` at ``--tp 2`` vs PyTorch DTensor tensor parallelism.

Both sides run in the same processes (launch with torchrun, world size = tp size), on the same model shape,
the same full weights, the same batches and fp32:

* ours: ``Llama`` built with ``Parallelism(TPContext(group, tp, rank, sequence_parallel))`` (ColumnParallel /
  RowParallel / VocabParallelEmbedding layers, Megatron mappings) and the step of engine/training/trainer.py
  (vocab-parallel cross-entropy summed / global tokens -> backward, ``reduce_gradients``, ``clip_gradients``,
  optimizer step; see ``OursStep``).
* DTensor: an equivalent model of plain ``nn.Linear`` / ``nn.Embedding`` modules (``parallelize_module`` only
  accepts those; our layers take their weights directly in ``TPContext.enter_linears``, so module hooks would
  never fire) sharing our RMSNorm / RoPE / attention core, with the weights of a dense ``Llama(cfg)`` copied in,
  parallelised with torchtitan's LLaMA plan: ``RowwiseParallel(input_layouts=Replicate())`` for the embedding
  (``output_layouts=Shard(1)`` with sequence parallelism), ``PrepareModuleInput`` on attention and MLP (one
  input redistribution per block, so the three q/k/v input gradients - two for gate/up - are summed as Partial
  and reduced once), ``ColwiseParallel`` for wq/wk/wv/w_gate/w_up, ``RowwiseParallel`` for wo/w_down,
  ``SequenceParallel`` for the norms under ``--sequence-parallel``, and the head as
  ``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)`` with ``loss_parallel()`` (the logits are
  never gathered; ``--no-loss-parallel`` gathers them instead). Loss: ``F.cross_entropy(reduction="sum")`` /
  global tokens. Gradient clipping (max norm ``--clip-grad``) as torchtitan does it: ``get_total_norm`` over
  the gradients (one all-reduce for the sharded ones) then ``clip_grads_with_norm_``. Optimizer: the same
  ``torch.optim.AdamW(foreach=True)`` with the same two parameter groups (decay on matrices only).

Both sides clip at the same max norm (ours as ``Trainer.clip_gradients``: the norm over the slices each rank owns,
all-reduced over the model-parallel group, then a conditional ``_foreach_mul_``) and use
``torch.optim.AdamW(foreach=True)`` (lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices).
Before timing, the step-0 losses must agree within 1e-5; during the timed steps both models train in lock-step on
the same batches, and the largest loss difference is reported.

Timing (benchmarks/ab.py): after warm-up, steps alternate ours / DTensor (the order flips every pair), each
preceded by a barrier; a step's time is the slower rank's. The figure to read is the median of the per-pair
ratios ours / DTensor (< 1.0: ours is faster).

    torchrun --nproc_per_node 2 benchmarks/bench_tp.py [--model-size small|medium] [--steps 20] [--repeats 3] \
        [--sequence-parallel] [--micro-batches 1] [--json out.json] [--activations] [--profile DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.models.llama import Llama, ModelConfig, Parallelism, RMSNorm, apply_rope, attention_core, rope_tables  # noqa: E402
from engine.optim import param_groups  # noqa: E402
from engine.parallel import RNGTracker, TPContext, Topology, vocab_parallel_cross_entropy  # noqa: E402
from engine.parallel.recompute import SavedTensorCounter  # noqa: E402
from ab import add_timing_args, finish, profile, profile_table, repeat_table, run_ab  # noqa: E402

SEED = 1234
LOSS_TOLERANCE = 1e-5
ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

SIZES = {
    # byte vocabulary (259 ids: odd, so the DTensor vocabulary shards are uneven and ours is padded to 260)
    "small": dict(model=ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_heads=8,
                                    num_kv_heads=4, vocab_size=259, seq_length=256), micro_batch_size=4),
    # the shape of the brief: TP matters (hidden 512, ffn 1408) and a 32k vocabulary makes the head count
    "medium": dict(model=ModelConfig(num_layers=4, hidden_size=512, ffn_hidden_size=1408, num_heads=8,
                                     num_kv_heads=4, vocab_size=32000, seq_length=256), micro_batch_size=4),
}


# ---------------------------------------------------------------------------------------------------------
# The DTensor side: the same LLaMA out of plain nn.Linear / nn.Embedding modules.

class PlainAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        q = cfg.num_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, q, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(q, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # column shards: this rank's heads
        b, s, _ = q.shape
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos[:s], sin[:s]), apply_rope(k, cos[:s], sin[:s])
        out = attention_core(q, k, v, 0.0)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class PlainMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class PlainLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = PlainAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = PlainMLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PlainLlama(nn.Module):
    """Parameter names are those of engine's Llama, so its state dict loads as it is."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): PlainLayer(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.seq_length, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, ids):
        x = self.embedding(ids)
        for layer in self.layers.values():
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.head(self.norm(x))


def build_dtensor_model(cfg: ModelConfig, mesh, sequence_parallel: bool, use_loss_parallel: bool) -> PlainLlama:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    dense = Llama(cfg)  # default Parallelism(): one process, full weights
    dense.init_weights(SEED)
    model = PlainLlama(cfg)
    model.load_state_dict(dense.state_dict())
    del dense
    act = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream between blocks
    head_out = Shard(-1) if use_loss_parallel else Replicate()
    top = {
        "embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=act),
        "head": ColwiseParallel(input_layouts=act, output_layouts=head_out, use_local_output=not use_loss_parallel),
    }
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    parallelize_module(model, mesh, top)
    for layer in model.layers.values():
        plan = {
            "attn": PrepareModuleInput(input_layouts=(act, None, None), desired_input_layouts=(Replicate(), None, None)),
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=act),
            "mlp": PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),)),
            "mlp.w_gate": ColwiseParallel(), "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel(output_layouts=act),
        }
        if sequence_parallel:
            plan["attn_norm"] = SequenceParallel()
            plan["mlp_norm"] = SequenceParallel()
        parallelize_module(layer, mesh, plan)
    return model


class DTensorStep:
    def __init__(self, cfg: ModelConfig, mesh, sequence_parallel: bool, use_loss_parallel: bool, clip_grad: float):
        self.cfg, self.clip_grad, self.use_loss_parallel = cfg, clip_grad, use_loss_parallel
        self.model = build_dtensor_model(cfg, mesh, sequence_parallel, use_loss_parallel)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(param_groups(list(self.model.named_parameters()), ADAMW["weight_decay"]),
                                           lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"], foreach=True)

    def _loss_ctx(self):
        if self.use_loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel
            return loss_parallel()
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches, num_tokens: int) -> float:
        from torch.distributed.tensor import DTensor
        total = 0.0
        self.model.train()
        for mb in micro_batches:
            logits = self.model(mb[:, :-1])
            with self._loss_ctx():
                loss = F.cross_entropy(logits.flatten(0, 1), mb[:, 1:].flatten(), reduction="sum") / num_tokens
                loss.backward()
            loss = loss.detach()
            total += float((loss.full_tensor() if isinstance(loss, DTensor) else loss).item())
        return total

    def clip(self) -> torch.Tensor:
        """torchtitan's clip_grad_norm_: get_total_norm (a DTensor with a Partial placement over the sharded
        gradients, so full_tensor() is one all-reduce), then clip_grads_with_norm_. Without sequence parallelism
        the norm gains are plain replicated tensors (their norm is local): they are measured separately, as
        foreach kernels take no mix of DTensors and tensors."""
        from torch.distributed.tensor import DTensor
        params = [p for p in self.params if p.grad is not None]
        sharded = [p for p in params if isinstance(p.grad, DTensor)]
        local = [p for p in params if not isinstance(p.grad, DTensor)]
        parts = []
        for group in (sharded, local):
            if group:
                norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, foreach=True)
                parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        total = torch.linalg.vector_norm(torch.stack(parts))
        if self.clip_grad > 0:
            for group in (sharded, local):
                if group:
                    torch.nn.utils.clip_grads_with_norm_(group, self.clip_grad, total, foreach=True)
        return total

    def step(self, micro_batches, num_tokens: int) -> tuple[float, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(micro_batches, num_tokens)
        norm = self.clip()
        self.optimizer.step()
        return loss, float(norm)


# ---------------------------------------------------------------------------------------------------------
# Our side: the trainer's own step methods on a model built like the trainer builds it.

class OursStep:
    """Our step as engine/training/trainer.py does it (train_step without pipeline, data parallelism or loss
    scaling): gradients kept allocated and zeroed in place; per micro-batch, vocabulary-parallel cross-entropy
    of the logits summed / global tokens, backward; sequence-parallel norm-gain gradients all-reduced over tp
    (reduce_gradients); the gradient norm over the slices this rank owns, all-reduced over the model-parallel
    group, and a conditional _foreach_mul_ (clip_gradients); then the optimizer. The norm is taken with
    torch._foreach_norm (the committed engine.optim.clip_grad_norm_) and the optimizer is torch AdamW (foreach),
    so both sides run the same optimizer and clipping kernels and the comparison is of tensor parallelism."""

    def __init__(self, cfg: ModelConfig, topo: Topology, sequence_parallel: bool, clip_grad: float):
        self.cfg, self.topo, self.clip_grad = cfg, topo, clip_grad
        self.rng = RNGTracker(SEED, topo.tp_rank)
        tp = TPContext(topo.tp_group, topo.tp, topo.tp_rank, sequence_parallel)
        self.model = Llama(cfg, parallelism=Parallelism(tp, self.rng))
        self.model.init_weights(SEED)
        self.named_params = list(self.model.named_parameters())
        for _, p in self.named_params:  # gradients live for the whole run (accumulated in place)
            p.grad = torch.zeros_like(p)
        self.sp_params = [q for _, q in self.named_params if getattr(q, "sequence_parallel", False)]
        # each slice counted once in the norm: tp-sharded parameters on every rank, replicated ones on rank 0
        self.owned = [q for _, q in self.named_params if hasattr(q, "shard") or topo.tp_rank == 0]
        self.optimizer = torch.optim.AdamW(param_groups(self.named_params, ADAMW["weight_decay"]), lr=ADAMW["lr"],
                                           betas=ADAMW["betas"], eps=ADAMW["eps"], foreach=True)

    def loss_sum(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens[:, :-1])
        return vocab_parallel_cross_entropy(logits, tokens[:, 1:], self.model.vocab_start, self.cfg.vocab_size,
                                            self.topo.tp_group).sum()

    @torch.no_grad()
    def clip(self) -> torch.Tensor:
        grads = [q.grad for q in self.owned]
        total_sq = torch.stack(torch._foreach_norm(grads, 2.0)).square().sum()
        dist.all_reduce(total_sq, group=self.topo.mp_group)
        norm = total_sq.sqrt()
        if self.clip_grad > 0 and torch.isfinite(norm) and norm.item() > self.clip_grad:
            torch._foreach_mul_([q.grad for _, q in self.named_params], self.clip_grad / (norm.item() + 1e-6))
        return norm

    def step(self, micro_batches, num_tokens: int) -> tuple[float, float]:
        for _, p in self.named_params:
            p.grad.zero_()
        self.model.train()
        total = torch.zeros(())
        for mb in micro_batches:
            loss = self.loss_sum(mb) / num_tokens
            loss.backward()
            total += loss.detach()
        if self.sp_params and self.topo.tp > 1:  # reduce_gradients: one all-reduce over a flat copy
            grads = [q.grad for q in self.sp_params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.topo.tp_group)
            torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])
        norm = self.clip()
        self.optimizer.step()
        return total.item(), norm.item()


# ---------------------------------------------------------------------------------------------------------
# Activation bytes per layer, measured vs engine.estimate.

def measure_layer_activation_bytes(cfg: ModelConfig, mbs: int, tp: TPContext, recompute: str) -> int:
    layer = Llama(cfg, layers=[0], has_embedding=False, has_head=False,
                  parallelism=Parallelism(tp, RNGTracker(0, tp.rank), recompute=recompute))
    s = cfg.seq_length // (tp.size if tp.sequence_parallel else 1)
    x = torch.randn(mbs, s, cfg.hidden_size, requires_grad=True)
    exclude = list(layer.parameters()) + list(layer.buffers())
    with SavedTensorCounter(exclude) as counter:
        out = layer(x)
    out.sum().backward()  # also checks the graph is complete (and runs recomputation)
    return counter.bytes


def activation_table(cfg: ModelConfig, mbs: int, topo: Topology | None) -> list[dict]:
    from engine.estimate import activation_bytes_per_layer
    rows = []
    layouts = [(1, False)] + ([(topo.tp, False), (topo.tp, True)] if topo is not None and topo.tp > 1 else [])
    for tp_size, sp in layouts:
        tp = TPContext() if tp_size == 1 else TPContext(topo.tp_group, topo.tp, topo.tp_rank, sp)
        for mode in ("none", "selective", "full"):
            measured = measure_layer_activation_bytes(cfg, mbs, tp, mode)
            estimated = activation_bytes_per_layer(cfg, mbs, cfg.seq_length, tp_size, sp, mode, 4, device="cpu")
            rows.append({"tp": tp_size, "sequence_parallel": sp, "recompute": mode, "measured": measured,
                         "estimated": estimated})
    return rows


# ---------------------------------------------------------------------------------------------------------

def make_batches(cfg: ModelConfig, mbs: int, micro_batches: int, count: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED)  # identical on every rank
    return [list(torch.randint(0, cfg.vocab_size, (micro_batches * mbs, cfg.seq_length + 1), generator=gen)
                 .split(mbs)) for _ in range(count)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", choices=sorted(SIZES), default="medium")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: the size's (4)")
    ap.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    ap.add_argument("--steps", type=int, default=20, help="timed step pairs per repeat")
    add_timing_args(ap, repeats=3, warmup=3, repeats_help="blocks of --steps timed pairs (default 3)",
                    warmup_help="untimed step pairs first (default 3)")
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--no-loss-parallel", action="store_true", help="DTensor head: gather the logits instead")
    ap.add_argument("--clip-grad", type=float, default=1.0, help="both sides; 0 measures the norm only")
    ap.add_argument("--activations", action="store_true", help="also measure activation bytes per layer")
    args = ap.parse_args(argv)

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    size = SIZES[args.model_size]
    cfg = dataclasses.replace(size["model"])
    mbs = args.micro_batch_size or size["micro_batch_size"]
    torch.manual_seed(SEED)
    topo = Topology(tp=world)

    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    ours = OursStep(cfg, topo, args.sequence_parallel, args.clip_grad)
    theirs = DTensorStep(cfg, mesh, args.sequence_parallel, not args.no_loss_parallel, args.clip_grad)
    batches = make_batches(cfg, mbs, args.micro_batches, 8)
    num_tokens = args.micro_batches * mbs * cfg.seq_length

    def log(*a):
        if rank == 0:
            print(*a, flush=True)

    log(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, world {world}, "
        f"{torch.get_num_threads()} thread(s) per rank, gloo")
    log(f"model {args.model_size}: {cfg}; micro-batch {mbs} x {args.micro_batches}, fp32, "
        f"sequence parallel {args.sequence_parallel}, loss parallel {not args.no_loss_parallel}, "
        f"clip {args.clip_grad}")

    # Equal work: the same loss from the same weights and batch (step 0), checked before anything is timed.
    loss_ours, norm_ours = ours.step(batches[0], num_tokens)
    loss_theirs, norm_theirs = theirs.step(batches[0], num_tokens)
    log(f"step 0: loss ours {loss_ours:.7f} DTensor {loss_theirs:.7f} (diff {abs(loss_ours - loss_theirs):.2e}); "
        f"grad norm ours {norm_ours:.6f} DTensor {norm_theirs:.6f}")
    if abs(loss_ours - loss_theirs) > LOSS_TOLERANCE:
        raise SystemExit(f"step-0 losses differ by more than {LOSS_TOLERANCE}: the two sides do not do the same work")

    if args.profile:
        for name, side in (("ours", ours), ("dtensor", theirs)):
            k = itertools.count()
            trace = profile(lambda: side.step(batches[next(k) % len(batches)], num_tokens), 3, args.profile,
                            f"{name}_rank{rank}")
            log(f"--- profile {name} (rank 0, 3 steps, self CPU time; trace {trace}) ---\n{profile_table(trace)}")

    # One round per pair; batch k % len(batches) for pair k, (w + 1) % len(batches) for warm-up pair w.
    def inputs(i):
        return batches[(i + args.warmup + 1 if i < 0 else i) % len(batches)], num_tokens

    res = run_ab({"ours": ours.step, "dtensor": theirs.step}, args.repeats * args.steps, args.warmup, inputs=inputs,
                 keep_values=True)
    max_loss_diff = max([abs(loss_ours - loss_theirs)] +
                        [abs(a[0] - b[0]) for a, b in zip(res.values["ours"], res.values["dtensor"])])
    table, rows = repeat_table(res, "ours", "dtensor", args.repeats, labels=("ours", "DTensor"))
    summary = res.ratio_summary("ours", "dtensor")
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "world": world,
              "threads_per_rank": torch.get_num_threads(), "model_size": args.model_size,
              "model": dataclasses.asdict(cfg), "micro_batch_size": mbs, "micro_batches": args.micro_batches,
              "sequence_parallel": args.sequence_parallel, "loss_parallel": not args.no_loss_parallel,
              "clip_grad": args.clip_grad, "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
              "max_loss_diff": max_loss_diff,
              "repeats_table": [{"repeat": row["repeat"], "ours_ms": row["a"], "dtensor_ms": row["b"],
                                 "ratio": row["ratio"]} for row in rows],
              "ours_ms_median": res.median("ours") * 1e3, "dtensor_ms_median": res.median("dtensor") * 1e3,
              "ours_ms_min": res.best("ours") * 1e3, "dtensor_ms_min": res.best("dtensor") * 1e3,
              "median_ratio": summary["median"], "ratio_quartiles": [summary["q1"], summary["median"], summary["q3"]],
              "timing": res.to_dict()}
    log("\n" + table)
    log(f"\nmedian per-pair ratio ours/DTensor: {result['median_ratio']:.3f} (target < 1.0); "
        f"largest loss difference over the timed steps: {max_loss_diff:.2e}")

    if args.activations:
        rows = activation_table(cfg, mbs, topo)
        result["activations"] = rows
        log("\n| tp | sequence parallel | recompute | measured bytes/layer | estimated | measured/estimated |")
        log("|---|---|---|---|---|---|")
        for row in rows:
            log(f"| {row['tp']} | {row['sequence_parallel']} | {row['recompute']} | {row['measured']:,} | "
                f"{row['estimated']:,} | {row['measured'] / row['estimated']:.3f} |")

    return finish(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
