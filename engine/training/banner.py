"""The start-up banner: what a run is about to do, printed once by global rank 0 before its first step.

`format_banner` is a pure function of plain values (tested on its own); `trainer_banner` collects them from a
Trainer: the parameter count and the memory estimate come from engine.estimate (the same accounting as
`python -m engine.estimate`), the kernel path from engine.ext (as `python -m engine.ext` reports it).
"""
from __future__ import annotations

LABEL_WIDTH = 13


def human_count(n: float) -> str:
    """3,149,824 -> '3.15M', 12,019,456 -> '12.0M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            x = n / size
            return f"{x:.{2 if x < 10 else 1 if x < 100 else 0}f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _split(name: str, counts: dict | None) -> str:
    if counts is None:
        return f"{name}: none"
    parts = [f"{human_count(counts[k])} {k}" for k in ("tokens", "samples") if counts.get(k) is not None]
    return f"{name} " + (", ".join(parts) if parts else "streamed (the caller's iterable)")


def _data(data: dict) -> str:
    whole = [f"{human_count(data[k])} {k}" for k in ("documents", "tokens") if data.get(k) is not None]
    return " | ".join(([", ".join(whole)] if whole else []) + [_split("train", data["train"]),
                                                                _split("valid", data.get("valid"))])


def format_banner(*, run_name: str, model: str, steps: int, params: int, params_per_rank: int, layout: dict,
                  precision: str, loss_scale: str | None, kernels: str, batch: dict, data: dict, memory: dict | None,
                  memory_stage: int, outputs: dict, blend: list | None = None) -> str:
    """The banner: a header line, then one aligned line per topic.

    model: the model's name and shape in words. layout: tp, pp, dp, vpp, zero, world, schedule, sequence_parallel.
    precision: of the parameters and compute (bf16/fp16 keep fp32 master weights in the optimizer). loss_scale:
    fp16's ("dynamic" or a number), else None. kernels: the fused-kernel path, as engine.ext reports it. batch:
    global, micro, seq (tokens per sample) and rampup (the --rampup-batch-size text, or None). data: documents
    and tokens of the whole corpus, and "train" / "valid": {tokens, samples} of each split (None where unknown;
    valid None: no validation set). memory: engine.estimate's bytes per rank (params, grads, optimizer,
    activations, total, zero_buffers, loss_buffers, recompute_buffers, peak) for the pipeline stage with the
    largest peak, memory_stage. outputs: metrics, plot, checkpoints, tensorboard (None: off). blend:
    [(weight, source), ...] of a data blend, a line of its own when given."""
    lo = layout
    micro_batches = batch["global"] // (batch["micro"] * lo["dp"])
    ramp = f" (ramp-up {batch['rampup']})" if batch.get("rampup") else ""
    per_rank = f"{params_per_rank:,} ({human_count(params_per_rank)}) per rank"
    if lo["zero"] >= 3 and lo["dp"] > 1:
        per_rank += f", 1/{lo['dp']} of it held between steps (ZeRO-3)"
    if precision == "fp32":
        prec = "fp32 parameters and compute; the fp32 parameters are their own master weights"
    else:
        prec = f"{precision} parameters and compute; fp32 master weights in the optimizer"
    if loss_scale is not None:
        prec += f"; loss scale {loss_scale}"
    cp = f" x cp {lo['cp']}" if lo.get("cp", 1) > 1 else ""
    rows = [
        ("parameters", f"{params:,} ({human_count(params)}) total | {per_rank}"),
        ("layout", f"world {lo['world']} = tp {lo['tp']}{cp} x pp {lo['pp']} x dp {lo['dp']} | vpp {lo['vpp']}, "
                   f"schedule {lo['schedule']} | sequence parallel {'on' if lo['sequence_parallel'] else 'off'} | "
                   f"ZeRO-{lo['zero']}"),
        ("precision", prec),
        ("kernels", kernels),
        ("batch", f"global {batch['global']}{ramp} = {micro_batches} micro-batches of {batch['micro']} x dp "
                  f"{lo['dp']} | seq {batch['seq']} | {batch['global'] * batch['seq']:,} tokens/step | "
                  f"{steps:,} steps"),
        ("data", _data(data)),
    ]
    if blend:
        rows.append(("blend", " | ".join(f"{weight:g} {source}" for weight, source in blend)))
    if memory is not None:
        names = {"zero_buffers": "ZeRO buffers", "loss_buffers": "loss buffers", "recompute_buffers": "recompute"}
        shown = ["params", "grads", "optimizer", "activations"] + \
            [k for k in ("zero_buffers", "loss_buffers", "recompute_buffers") if memory.get(k) or k == "loss_buffers"]
        parts = ", ".join(f"{names.get(k, k)} {human_bytes(memory[k])}" for k in shown)
        rows.append(("memory", f"~{human_bytes(memory['peak'])} per rank at the step's peak (estimate, pipeline "
                               f"stage {memory_stage}): {parts}"))
    out = outputs
    rows += [("metrics", out["metrics"]), ("plot", out["plot"]), ("checkpoints", out["checkpoints"]),
             ("tensorboard", out.get("tensorboard") or "off (--tensorboard DIR)")]
    lines = [f"engine | run {run_name} | model {model}"]
    return "\n".join(lines + [f"  {label:<{LABEL_WIDTH}}{text}" for label, text in rows])


def data_counts(train, valid, sources=None) -> dict:
    """format_banner's `data`: samples (len()) and tokens (a packed dataset's `num_tokens`) of each split; documents
    and tokens of the whole corpus from the trainer's data sources (objects with `documents` and `tokens`)."""
    def counts(dataset):
        if dataset is None:
            return None
        return {"tokens": getattr(dataset, "num_tokens", None),
                "samples": len(dataset) if hasattr(dataset, "__len__") else None}
    return {"documents": sum(s.documents for s in sources) if sources else None,
            "tokens": sum(s.tokens for s in sources) if sources else None,
            "train": counts(train), "valid": counts(valid)}


def estimate_layout(trainer):
    """The engine.estimate Layout of a built Trainer's run (what the banner's memory line estimates)."""
    from engine.estimate import Layout

    cfg = trainer.cfg
    p, b, perf = cfg.parallel, cfg.batch, cfg.performance
    return Layout(tp=p.tp, cp=p.cp, pp=p.pp, dp=p.dp, vpp=p.vpp, zero=p.zero, sequence_parallel=p.sequence_parallel,
                  micro_batch_size=b.micro_batch_size,
                  microbatches=b.global_batch_size // (b.micro_batch_size * p.dp), schedule=p.schedule,
                  precision=trainer.precision, recompute=cfg.recompute.recompute,
                  loss_chunk_tokens=perf.loss_chunk_tokens, fused_elementwise=perf.fused_elementwise,
                  optimizer=cfg.optimizer.optimizer, beta1=cfg.optimizer.beta1, bucket_size=cfg.run.bucket_size,
                  keep_params=p.zero3_keep_params)


def trainer_banner(trainer, blend: list | None = None) -> str:
    """The banner of a built Trainer (no collective: every value is known on each rank). blend: a data blend's
    [(weight, source), ...] to show."""
    from engine import ext
    from engine.estimate import count_parameters, peak_memory, stage_parameters

    cfg, mcfg = trainer.cfg, trainer.model_cfg
    p, b = cfg.parallel, cfg.batch
    layout = {**trainer._layout(), "schedule": p.schedule, "sequence_parallel": p.sequence_parallel}
    backend = trainer.device.type
    if backend in ext.SOURCES:
        path = ext.LOADER.path(backend)
        kernels = f"{backend.upper()} {path.kind}: {path.why}"
    else:
        kernels = f"{backend}: torch foreach ops"
    perf = cfg.performance
    kernels += " | layers compiled (torch.compile)" if perf.compile else " | layers eager"
    if perf.fused_elementwise:
        fused = isinstance(ext.elementwise_ops(trainer.device), ext.CompiledOps)
        kernels += f" | RMSNorm, RoPE, SwiGLU fused ({'CUDA kernels' if fused else 'in torch ops: no kernels here'})"
    if perf.loss_chunk_tokens:
        kernels += f" | head + loss fused, {perf.loss_chunk_tokens:,} tokens at a time"
    stage, memory = peak_memory(mcfg, estimate_layout(trainer))
    loss_scale = None
    if trainer.precision == "fp16":
        loss_scale = "dynamic" if cfg.precision.loss_scale is None else f"{cfg.precision.loss_scale:g} (static)"
    model = (f"{cfg.model.model}: {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, ffn {mcfg.ffn_hidden_size}, "
             f"{mcfg.num_heads} heads ({mcfg.num_kv_heads} kv), vocab {mcfg.vocab_size}"
             + (", tied embeddings" if mcfg.tie_embeddings else ""))
    return format_banner(
        run_name=trainer.run_name, model=model, steps=cfg.run.steps, params=count_parameters(mcfg)["total"],
        params_per_rank=max(stage_parameters(mcfg, p.tp, p.pp, s) for s in range(p.pp)), layout=layout,
        precision=trainer.precision, loss_scale=loss_scale, kernels=kernels,
        batch={"global": b.global_batch_size, "micro": b.micro_batch_size, "seq": mcfg.seq_length,
               "rampup": b.rampup_batch_size},
        data=data_counts(trainer.train_data, trainer.valid_data, getattr(trainer, "data_sources", None)),
        memory=memory, memory_stage=stage,
        outputs={"metrics": trainer.metrics_path, "plot": trainer.plot_path, "checkpoints": trainer.save_dir,
                 "tensorboard": cfg.run.tensorboard},
        blend=blend)
