"""Run configuration: one dataclass per group, filled from defaults < model preset < TOML file < command line.

Every field is a flag (`--field-name`, help text in the field's metadata) and a TOML key (either flat,
`lr = 3e-4`, or inside a table named after its group, `[optimizer] lr = 3e-4`). `validate` collects every
inconsistency before anything is built or any collective issued, each naming the flag and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from engine.data.blend import parse_blend
from engine.models.llama import PRESETS, ModelConfig
from engine.parallel.rules import layout_errors, optimizer_errors


JOB_START_ENV = "ENGINE_JOB_START"  # when the job began (Unix time), for --time-limit; set by engine.launch


class ConfigError(ValueError):
    """A bad setting; the message names the flag and the fix."""


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    model: str = _f("tiny", "model preset: " + ", ".join(PRESETS), choices=list(PRESETS))
    num_layers: int = _f(None, "override: transformer layers")
    hidden_size: int = _f(None, "override: model width")
    ffn_hidden_size: int = _f(None, "override: SwiGLU inner width")
    num_heads: int = _f(None, "override: query heads")
    num_kv_heads: int = _f(None, "override: key/value heads (grouped-query attention when < --num-heads)")
    vocab_size: int = _f(None, "override: vocabulary size (default: the preset's, or the tokenizer's)")
    seq_length: int = _f(None, "override: tokens per sample")
    rope_theta: float = _f(None, "override: rotary embedding base")
    norm_eps: float = _f(None, "override: RMSNorm epsilon")
    dropout: float = _f(0.0, "dropout on attention probabilities and residual branches")
    tie_embeddings: bool = _f(False, "share the input embedding with the LM head")


@dataclass
class ParallelArgs:
    tp: int = _f(None, "tensor-parallel size [2 when none of --tp, --pp, --dp, --cp is given and the world size is "
                       "a multiple of 4 (the 3D default), else 1]")
    pp: int = _f(None, "pipeline-parallel size [2 under the 3D default, else 1]")
    dp: int = _f(None, "data-parallel size [world / (tp * cp * pp)]")
    cp: int = _f(1, "context-parallel size: each sequence is split across cp ranks (ring attention; the sequence "
                    "is cut into 2 x cp chunks, rank r holding chunks r and 2cp-1-r)")
    vpp: int = _f(1, "virtual pipeline stages per pipeline rank")
    schedule: str = _f(None, "pipeline schedule [1f1b; interleaved when --vpp > 1]",
                       choices=["1f1b", "interleaved", "gpipe"])
    sequence_parallel: bool = _f(False, "shard norms and residuals along the sequence across the tp group")
    zero: int = _f(None, "ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters [1 when dp > 1, "
                         "else 0]", choices=[0, 1, 2, 3])
    zero3_keep_params: bool = _f(False, "ZeRO-3: keep a stage's parameters gathered from first use to the end of "
                                        "the step (one all-gather per step instead of two per micro-batch; holds "
                                        "the stage's full parameters during the step)")
    overlap_param_gather: bool = _f(False, "ZeRO-1/2: all-gather the updated parameter shards asynchronously "
                                           "after the step; each unit's next forward waits only for its own "
                                           "buckets (Megatron's --overlap-param-gather)")


@dataclass
class PrecisionArgs:
    precision: str = _f(None, "compute precision [fp32 on CPU, bf16 on GPU]", choices=["fp32", "bf16", "fp16"])
    loss_scale: float = _f(None, "static loss scale for fp16 [dynamic]")
    loss_scale_hysteresis: int = _f(2, "fp16 dynamic scaling: overflows tolerated before the scale is halved")


@dataclass
class RecomputeArgs:
    recompute: str = _f("none", "activation recomputation", choices=["none", "selective", "full"])
    recompute_layers: int = _f(None, "with --recompute full: recompute the first N layers of each stage [all]")


@dataclass
class PerformanceArgs:
    compile: bool = _f(False, "torch.compile each transformer layer (fuses the norms, RoPE, SwiGLU and their "
                              "backward); the first steps pay the compilation; graph breaks and recompilations "
                              "are counted in the metrics")
    loss_chunk_tokens: int = _f(0, "compute the LM head and the cross-entropy this many tokens at a time, never "
                                   "holding the whole [tokens, vocab] logits (same loss and gradients; e.g. 4096; "
                                   "0: off)")
    fused_elementwise: bool = _f(False, "RMSNorm, RoPE and SwiGLU (forward and backward) through the engine's fused "
                                        "CUDA kernels, which also keep fewer activations (eager layers; not with "
                                        "--compile, which fuses them itself; elsewhere than CUDA the same functions "
                                        "run in torch ops)")
    profile_steps: str = _f(None, "START:END: trace these steps (inclusive, 1-based) with torch.profiler on "
                                  "--profile-ranks; each writes a Chrome/Perfetto trace and a table of its costliest "
                                  "operators to runs/<name>/profile/ [off]")
    profile_ranks: str = _f("0", "global ranks that trace under --profile-steps: comma-separated, or 'all'")
    profile_memory: bool = _f(False, "with --profile-steps: record allocations in the trace (and on CUDA write the "
                                     "caching allocator's history of the window, for pytorch.org/memory_viz)")


@dataclass
class OptimizerArgs:
    optimizer: str = _f("adamw", "optimizer", choices=["adamw", "adafactor"])
    lr: float = _f(3e-3, "peak learning rate")
    min_lr: float = _f(None, "final learning rate [0.1 * --lr]")
    beta1: float = _f(0.9, "Adam beta1 (Adafactor: momentum; 0 disables it)")
    beta2: float = _f(0.95, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.1, "decoupled weight decay (matrices and embeddings only, not norms or biases)")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this value (0 disables)")


@dataclass
class ScheduleArgs:
    lr_warmup_steps: int = _f(None, "linear warm-up steps [--lr-warmup-fraction of --lr-decay-steps]")
    lr_warmup_fraction: float = _f(0.005, "warm-up as a fraction of --lr-decay-steps")
    lr_decay_style: str = _f("cosine", "decay after warm-up",
                             choices=["linear", "cosine", "inverse-sqrt", "constant", "wsd"])
    lr_decay_steps: int = _f(None, "steps over which the LR reaches --min-lr [--steps]")
    lr_wsd_decay_fraction: float = _f(0.1, "wsd: fraction of --lr-decay-steps spent in the final linear decay")


@dataclass
class BatchArgs:
    micro_batch_size: int = _f(4, "samples per micro-batch per data-parallel rank")
    global_batch_size: int = _f(16, "samples per optimizer step, all data-parallel ranks together")
    rampup_batch_size: str = _f(None, "START,INCREMENT,RAMPUP_SAMPLES: grow the global batch from START by "
                                      "INCREMENT evenly over RAMPUP_SAMPLES consumed samples (GPT-3)")


@dataclass
class DataArgs:
    data: list = _f(None, "text files, directories, .jsonl files (field 'text'), .parquet files (column 'text') or "
                          "preprocessed .bin/.idx prefixes; text and .jsonl may be compressed (.gz, .zst); "
                          "W1 PATH1 W2 PATH2 ... blends sources by weight "
                          "[built-in corpus: the Python standard library's sources]", nargs="+")
    text_field: str = _f("text", "the .jsonl field / .parquet column that holds each document")
    tokenizer: str = _f("byte", "'byte' or a path to a tokenizer.json (needs the 'tokenizers' package)")
    eos_token: str = _f(None, "the end-of-document token of a tokenizer.json [its tokenizer_config.json's eos_token, "
                              "else </s>, <|endoftext|>, ...]")
    document_mask: bool = _f(False, "a token attends only to earlier tokens of its own document (packed samples are "
                                    "split at each end-of-document token) and RoPE positions restart at each "
                                    "document (Llama 3's intra-document masking)")
    valid_fraction: float = _f(0.01, "fraction of documents held out for evaluation")
    data_cache: str = _f("auto", "directory where text --data is tokenized once into a .bin/.idx that every process "
                                 "and later run memory-maps (keyed by the files' paths, sizes and modification times "
                                 "and the tokenizer); 'none' tokenizes in memory in each process "
                                 "[auto: $XDG_CACHE_HOME/engine/tokens, else ~/.cache/engine/tokens]")
    eval_interval: int = _f(None, "evaluate every N steps [never]")
    eval_iters: int = _f(4, "global batches per evaluation")


@dataclass
class RunArgs:
    steps: int = _f(200, "total optimizer steps of the run (a resumed run continues up to it)")
    seed: int = _f(1234, "seed of weights, data order and dropout")
    log_interval: int = _f(1, "write a metrics line every N steps")
    metrics_file: str = _f(None, "JSON-lines metrics [runs/<name>/metrics.jsonl]")
    plot: str = _f(None, "loss-curve PNG written at the end (with matplotlib when installed, else a built-in "
                         "renderer) [runs/<name>/loss.png]")
    tensorboard: str = _f(None, "also write the metrics' scalars (step fields, eval loss) as TensorBoard events to "
                                "this directory (needs the tensorboard package) [off]")
    run_name: str = _f(None, "name of the run directory runs/<name> [derived from model and layout]")
    peak_tflops: float = _f(None, "peak TFLOP/s per device for MFU [known for A100/H100/H200]")
    device: str = _f(None, "cpu or cuda [cuda when available]", choices=["cpu", "cuda"])
    collective_timeout: float = _f(600.0, "seconds a collective may wait before the job fails naming it")
    step_timeout: float = _f(None, "seconds a training step (or an evaluation, a save, a rollback) may take: past "
                                   "it the job ends (exit 3) with one line naming the stalled rank [off]")
    time_limit: float = _f(None, "seconds the job may take: once past them, every rank stops after the same step, "
                                 "saves it and exits 0 (a scheduler's wall-time limit less a step and a save, so "
                                 "that the job ends saved; --auto-resume continues). Counted from the start of "
                                 "python -m engine.launch, across its restarts, else of the trainer ($" + JOB_START_ENV
                                 + " overrides it: a Unix time). Megatron's --exit-duration-in-mins, in seconds [off]")
    bucket_size: int = _f(4_000_000, "elements per gradient bucket: each bucket's data-parallel reduction starts "
                                     "as soon as its gradients are final, overlapping the rest of backward")


@dataclass
class CheckpointArgs:
    save: str = _f(None, "checkpoint directory [runs/<name>/checkpoints]")
    save_interval: int = _f(None, "save every N steps [at the end only]")
    load: str = _f(None, "start from this checkpoint (a step directory, or the one a directory's 'latest' names); "
                         "a path without one is an error")
    auto_resume: bool = _f(False, "resume from --save's latest checkpoint when it has one (else from --load, else "
                                  "fresh): the switch for restart loops")
    overwrite_checkpoints: bool = _f(False, "let this run's checkpoints replace newer ones in --save (`latest` "
                                            "never moves back to an earlier step otherwise)")
    keep_last: int = _f(None, "keep only the newest K checkpoints [all]")
    async_save: bool = _f(False, "periodic saves are copied to host memory and written by a background thread "
                                 "while training goes on; the step is published (`latest`) once every rank's file "
                                 "is on disk")


@dataclass
class StabilityArgs:
    spike_factor: float = _f(None, "roll back to the last checkpoint when the loss exceeds F x its running mean, "
                                   "skipping the data consumed since")
    max_rollbacks: int = _f(3, "stop after this many rollbacks")
    max_skipped_steps: int = _f(5, "stop (exit 1) after this many non-finite steps in a row (a non-finite loss, or "
                                   "non-finite gradients outside fp16's loss scaling); 0: never")
    inject_fault: list = _f(None, "fault injection for tests and drills, each once per run: nan@STEP (non-finite loss "
                                  "and gradients), spike@STEP (the loss reported x100), kill@STEP:RANK (SIGKILL), "
                                  "hang@STEP:RANK",
                            nargs="+")


GROUPS = {"model": ModelArgs, "parallel": ParallelArgs, "precision": PrecisionArgs, "recompute": RecomputeArgs,
          "performance": PerformanceArgs, "optimizer": OptimizerArgs, "schedule": ScheduleArgs, "batch": BatchArgs,
          "data": DataArgs, "run": RunArgs, "checkpoint": CheckpointArgs, "stability": StabilityArgs}


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    precision: PrecisionArgs = field(default_factory=PrecisionArgs)
    recompute: RecomputeArgs = field(default_factory=RecomputeArgs)
    performance: PerformanceArgs = field(default_factory=PerformanceArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    batch: BatchArgs = field(default_factory=BatchArgs)
    data: DataArgs = field(default_factory=DataArgs)
    run: RunArgs = field(default_factory=RunArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    stability: StabilityArgs = field(default_factory=StabilityArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self) -> ModelConfig:
        """The model shape: the preset with explicit overrides applied."""
        cfg = dataclasses.replace(PRESETS[self.model.model])
        for f in dataclasses.fields(ModelConfig):
            value = getattr(self.model, f.name, None)
            if value is not None and f.name != "init_std":
                setattr(cfg, f.name, value)
        return cfg


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    return {f.name: (group, f) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_llama.py", argument_default=argparse.SUPPRESS,
                description="Pretrain a LLaMA-family model with tensor, pipeline and data parallelism. "
                    "Run with torchrun for several processes; every flag can also be set in a TOML file.")
    parser.add_argument("--config", help="TOML file of settings (flat keys or [group] tables); flags override it")
    for group, cls in GROUPS.items():
        arg_group = parser.add_argument_group(group)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            meta = f.metadata
            help_text = meta["help"] + ("" if f.default is None or "[" in meta["help"] else f" [{f.default}]")
            if f.type == "bool":
                arg_group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
                continue
            kind = {"int": int, "float": float, "str": str, "list": str}[f.type]
            arg_group.add_argument(flag, dest=f.name, type=kind, help=help_text, choices=meta.get("choices"),
                                   nargs=meta.get("nargs"), metavar=None if meta.get("choices") else f.name.upper())
    return parser


def _load_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} not found; give the path of a TOML file")
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML ({exc})") from None
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in GROUPS:
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key.replace("-", "_")] = value
    return flat


def parse_config(argv: list[str] | None = None) -> Config:
    """Parses flags (and the TOML file they name) into a validated-shape Config; raises ConfigError."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    settings = _load_toml(args.pop("config")) if "config" in args else {}
    settings.update(args)
    index = _field_index()
    cfg = Config()
    for key, value in settings.items():
        if key not in index:
            raise ConfigError(f"--config: unknown setting {key!r}; see --help for the list of settings")
        group, f = index[key]
        setattr(getattr(cfg, group), key, _coerce(key, value, f))
    return cfg


def _coerce(key, value, f):
    flag = "--" + key.replace("_", "-")
    try:
        if f.type == "bool" and not isinstance(value, bool):
            raise TypeError
        if f.type == "list":
            value = [value] if isinstance(value, str) else [str(v) for v in value]
        elif f.type == "int":
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            value = int(value)
        elif f.type == "float":
            value = float(value)
        elif f.type == "str":
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: {value!r} is not a valid {f.type}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{flag}: {value!r} is not one of {choices}")
    return value


FAULTS = ("nan", "spike", "kill", "hang")


def parse_fault(spec: str) -> tuple[str, int, int | None]:
    """'kind@STEP' or 'kind@STEP:RANK' -> (kind, step, rank or None: every rank)."""
    kind, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    if kind not in FAULTS or not step.isdigit() or int(step) < 1 or (rank and not rank.isdigit()):
        raise ValueError(f"{spec!r} is not KIND@STEP[:RANK] with KIND one of {', '.join(FAULTS)} and STEP >= 1")
    if kind in ("kill", "hang") and not rank:
        raise ValueError(f"{spec!r}: {kind} needs the rank: {kind}@STEP:RANK")
    if kind in ("nan", "spike") and rank:
        raise ValueError(f"{spec!r}: {kind} acts on every rank (the loss is the job's): {kind}@STEP")
    return kind, int(step), int(rank) if rank else None


def parse_rampup(spec: str) -> tuple[int, int, int]:
    try:
        start, increment, samples = (int(x) for x in spec.split(","))
    except ValueError:
        raise ConfigError(f"--rampup-batch-size: {spec!r} must be START,INCREMENT,RAMPUP_SAMPLES, "
                          "three integers such as 16,16,100000") from None
    return start, increment, samples


def parse_profile_steps(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B), 1 <= A <= B; 'A' -> (A, A). Raises ConfigError."""
    parts = text.split(":")
    try:
        start, end = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        start, end = 0, -1
    if not 1 <= start <= end:
        raise ConfigError(f"--profile-steps: expected START:END with 1 <= START <= END (steps, 1-based), got "
                          f"{text!r}; e.g. --profile-steps 10:12")
    return start, end


def parse_profile_ranks(text: str, world_size: int) -> list[int]:
    """'all' or comma-separated global ranks, each below the world size. Raises ConfigError."""
    if text.strip() == "all":
        return list(range(world_size))
    try:
        ranks = sorted({int(r) for r in text.split(",")})
    except ValueError:
        ranks = [-1]
    if not ranks or ranks[0] < 0 or ranks[-1] >= world_size:
        raise ConfigError(f"--profile-ranks: expected 'all' or global ranks below the world size {world_size}, "
                          f"comma-separated, got {text!r}")
    return ranks


def job_start() -> float:
    """When the job began (Unix time): $ENGINE_JOB_START, else now. Raises ConfigError."""
    value = os.environ.get(JOB_START_ENV)
    try:
        return float(value) if value else time.time()
    except ValueError:
        raise ConfigError(f"${JOB_START_ENV}: {value!r} is not a Unix time in seconds; unset it or give one "
                          "(--time-limit counts from it)") from None


def run_dir(cfg: Config) -> str:
    """runs/<run name> (after validate: the default run name names the model and layout)."""
    p = cfg.parallel
    return os.path.join("runs", cfg.run.run_name or f"{cfg.model.model}-tp{p.tp}-pp{p.pp}-dp{p.dp}")


def save_dir(cfg: Config) -> str:
    """--save, or runs/<run name>/checkpoints."""
    return cfg.checkpoint.save or os.path.join(run_dir(cfg), "checkpoints")


def checkpoint_to_load(cfg: Config) -> str | None:
    """The step directory this run starts from: with --auto-resume --save's latest if it has one, else --load's
    (an error when it holds none), else None (a fresh start)."""
    from engine.training import checkpoint as ckpt
    c = cfg.checkpoint
    try:
        if c.auto_resume:
            found = ckpt.resolve(save_dir(cfg)) if os.path.isdir(save_dir(cfg)) else None
            if found is not None:
                return found
        if not c.load:
            return None
        found = ckpt.resolve(c.load) if os.path.isdir(c.load) else None
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"--load: {exc}") from None
    if found is None:
        raise ConfigError(f"--load: no checkpoint in {c.load!r} (neither a step directory with meta.json nor a "
                          "directory with a 'latest' file); check the path, or use --auto-resume to start fresh "
                          "when --save holds no checkpoint yet")
    return found


def checkpoint_mismatch(step_dir: str, meta: dict, model: ModelConfig, optimizer: str,
                        skip: tuple = ()) -> list[str]:
    """What keeps the checkpoint whose meta.json is `meta` from loading into a run of `model` with `optimizer`:
    the model flags that differ (dropout and init_std aside; `skip`: fields not known yet), and a different
    optimizer (a weights-only checkpoint, engine.convert's output, has no optimizer state to mismatch)."""
    saved = meta.get("model_config", {})
    differ = [f"--{f.name.replace('_', '-')} (saved {saved.get(f.name)}, configured {getattr(model, f.name)})"
              for f in dataclasses.fields(ModelConfig)
              if f.name not in ("dropout", "init_std", *skip) and saved.get(f.name) != getattr(model, f.name)]
    errors = []
    if differ:
        errors.append(f"--load: {step_dir} holds another model: {', '.join(differ)}; pass the model flags of the "
                      "run that saved it")
    if meta.get("state") is not None and meta.get("optimizer") != optimizer:
        errors.append(f"--load: {step_dir} was trained with --optimizer {meta.get('optimizer')}; resume with the "
                      "same optimizer")
    return errors


def _check_checkpoints(cfg: Config) -> list[str]:
    """A mistyped --load is an error, and a run whose saves would move --save's `latest` back to an earlier step
    needs --overwrite-checkpoints (warned about otherwise)."""
    import json
    from engine.training import checkpoint as ckpt
    try:
        start_dir = checkpoint_to_load(cfg)
    except ConfigError as exc:
        return [str(exc)]
    start = 0
    if start_dir is not None:
        try:
            with open(os.path.join(start_dir, "meta.json")) as fh:
                meta = json.load(fh)
            start = int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return [f"--load: {start_dir}/meta.json is unreadable ({exc}); load an intact step directory"]
        # (the vocabulary is the tokenizer's unless --vocab-size: compared when the trainer loads)
        mismatch = checkpoint_mismatch(start_dir, meta, cfg.model_config(), cfg.optimizer.optimizer,
                                       skip=() if cfg.model.vocab_size else ("vocab_size",))
        if mismatch:
            return mismatch
    newer = ckpt.latest_step(save_dir(cfg))
    if newer is None or newer <= start:
        return []
    interval = cfg.checkpoint.save_interval
    first_save = min(cfg.run.steps, start + interval) if interval else cfg.run.steps
    if cfg.checkpoint.overwrite_checkpoints or first_save >= newer:
        if os.environ.get("RANK", "0") == "0":  # once per job
            print(f"warning: {save_dir(cfg)} holds step {newer}, newer than this run's start (step {start})"
                  + ("; --overwrite-checkpoints: this run's saves replace it" if first_save < newer else ""),
                  file=sys.stderr)
        return []
    return [f"--save: {save_dir(cfg)} holds step {newer}, and this run (from step {start}) would save step "
            f"{first_save} over it; use --auto-resume to continue from step {newer}, --overwrite-checkpoints to "
            "start over, or another --save / --run-name"]


def preflight(cfg: Config) -> None:
    """Before any process group or step (after validate): --save is created, a probe file written, fsynced and
    removed there, and its free space checked against twice a checkpoint's estimated size. Raises ConfigError."""
    import shutil
    from engine.estimate import count_parameters
    from engine.training import checkpoint as ckpt
    path = save_dir(cfg)
    try:
        ckpt.probe_writable(path)
    except OSError as exc:
        raise ConfigError(f"--save: cannot write checkpoints to {path} ({exc.strerror or exc}); choose a writable "
                          "directory with --save") from None
    model = cfg.model_config()
    if cfg.model.vocab_size is None:
        model.vocab_size = max(model.vocab_size, 1)
    need = 2 * 16 * count_parameters(model)["total"]  # weights + AdamW m, v (+ an fp32 master): <= 16 B/param
    free = shutil.disk_usage(path).free
    if free < need:
        raise ConfigError(f"--save: {path} has {free / 2**30:.2f} GiB free, less than twice a checkpoint's estimated "
                          f"size ({need / 2 / 2**30:.2f} GiB); free space or choose another --save")


def _check_schedule(cfg: Config, per_step: int) -> list[str]:
    """Every pipeline schedule the run will use (each global batch size of a ramp-up) must complete under NCCL's
    group rules, whatever the backend: a schedule that would deadlock is refused, naming where it stops."""
    from engine.pipeline import schedules
    from engine.pipeline.simulate import nccl_deadlock
    p, b = cfg.parallel, cfg.batch
    sizes = {b.global_batch_size}
    if b.rampup_batch_size is not None:
        start, inc, _ = parse_rampup(b.rampup_batch_size)
        sizes.update(range(start, b.global_batch_size, inc))
    for m in sorted(size // per_step for size in sizes):
        try:
            stuck = nccl_deadlock(schedules.build(p.schedule, p.pp, m, p.vpp), p.pp)
        except schedules.ScheduleError as exc:
            return [str(exc)]
        if stuck:
            return [f"--schedule {p.schedule}: with pp {p.pp}, vpp {p.vpp} and {m} micro-batches its transfers would "
                    f"deadlock under NCCL ({stuck}); use --schedule 1f1b"]
    return []


def validate(cfg: Config, world_size: int) -> None:
    """Fills derived defaults and raises ConfigError listing every problem (one per line)."""
    errors: list[str] = []
    p, b, o, s = cfg.parallel, cfg.batch, cfg.optimizer, cfg.schedule
    if p.tp is None and p.pp is None and p.dp is None and p.cp == 1 and world_size % 4 == 0:
        p.tp, p.pp = 2, 2  # the 3D default: tp 2 x pp 2 x dp world/4
    p.tp = 1 if p.tp is None else p.tp
    p.pp = 1 if p.pp is None else p.pp
    errors += [f"--{f.name.replace('_', '-')}: must be a finite number, got {value}"
               for group in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, group.name))
               for value in [getattr(getattr(cfg, group.name), f.name)]
               if isinstance(value, float) and not math.isfinite(value)]
    if cfg.run.tensorboard:
        try:
            from engine.training.metrics import require_tensorboard
            require_tensorboard()
        except ConfigError as exc:
            errors.append(str(exc))
    if cfg.run.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            errors.append("--device cuda: no CUDA device is visible to this torch build "
                          f"({torch.__version__}); use --device cpu, or install a CUDA build of torch")
    if errors:
        raise ConfigError("\n".join(errors))
    model = cfg.model_config()
    errors += [f"{flag}: {msg}" for flag, msg in model.validate()]
    for flag, value in [("--tp", p.tp), ("--cp", p.cp), ("--pp", p.pp), ("--vpp", p.vpp), ("--steps", cfg.run.steps),
                        ("--micro-batch-size", b.micro_batch_size), ("--global-batch-size", b.global_batch_size),
                        ("--log-interval", cfg.run.log_interval)]:
        if value < 1:
            errors.append(f"{flag}: must be a positive integer, got {value}")
    if cfg.performance.loss_chunk_tokens < 0:
        errors.append(f"--loss-chunk-tokens: must be 0 (off) or a positive number of tokens, got "
                      f"{cfg.performance.loss_chunk_tokens}")
    if cfg.performance.fused_elementwise and cfg.performance.compile:
        errors.append("--fused-elementwise: not with --compile, which fuses the same work itself; choose one")
    if errors:
        raise ConfigError("\n".join(errors))
    model_parallel = p.tp * p.cp * p.pp
    if p.dp is None:
        if world_size % model_parallel:
            errors.append(f"--tp/--cp/--pp: tp * cp * pp = {model_parallel} does not divide the world size "
                          f"{world_size}; launch a multiple of tp * cp * pp processes")
        p.dp = max(world_size // model_parallel, 1)
    elif model_parallel * p.dp != world_size:
        errors.append(f"--dp: tp * cp * pp * dp = {p.tp}*{p.cp}*{p.pp}*{p.dp} = {model_parallel * p.dp} does not "
                      f"equal the world size {world_size}; launch that many processes or change --tp/--cp/--pp/--dp")
    zero_by_default = p.zero is None
    if zero_by_default:
        p.zero = 1 if p.dp > 1 else 0
    if p.overlap_param_gather and not (p.zero in (1, 2) and p.dp > 1):
        errors.append(f"--overlap-param-gather: needs --zero 1 or 2 with --dp > 1 (got --zero {p.zero}, dp {p.dp}): "
                      "only sharded optimizer states have updated shards to gather; ZeRO-3 already gathers each "
                      "unit right before its forward")
    if p.schedule is None:
        p.schedule = "interleaved" if p.vpp > 1 else "1f1b"
    errors += optimizer_errors(cfg.optimizer.optimizer, p.tp, p.zero, p.dp, p.cp, zero_by_default)
    errors += layout_errors(model, p.tp, p.pp, p.vpp, p.dp, p.sequence_parallel, p.schedule, b.micro_batch_size,
                            b.global_batch_size, cp=p.cp)
    per_step = b.micro_batch_size * p.dp
    if b.rampup_batch_size is not None:
        try:
            start, inc, samples = parse_rampup(b.rampup_batch_size)
        except ConfigError as exc:
            errors.append(str(exc))
        else:
            if start < 1 or inc < 1 or samples < 0 or start > b.global_batch_size:
                errors.append("--rampup-batch-size: need 1 <= START <= --global-batch-size, INCREMENT >= 1 and "
                              "RAMPUP_SAMPLES >= 0")
            elif start % per_step or inc % per_step or (b.global_batch_size - start) % inc:
                errors.append(f"--rampup-batch-size: START and INCREMENT must be multiples of micro-batch-size * "
                              f"dp = {per_step}, and --global-batch-size - START a multiple of INCREMENT")
            elif p.schedule == "interleaved" and ((start // per_step) % p.pp or (inc // per_step) % p.pp):
                errors.append(f"--rampup-batch-size: with --schedule interleaved START and INCREMENT must give "
                              f"micro-batch counts that are multiples of --pp {p.pp}")
    if not errors and p.pp > 1:
        errors += _check_schedule(cfg, per_step)
    perf = cfg.performance
    if perf.profile_steps is not None:
        try:
            _, last = parse_profile_steps(perf.profile_steps)
            parse_profile_ranks(perf.profile_ranks, world_size)
            if last > cfg.run.steps:
                errors.append(f"--profile-steps: step {last} is past --steps {cfg.run.steps}; trace steps the run "
                              "takes")
        except ConfigError as exc:
            errors.append(str(exc))
    elif perf.profile_memory:
        errors.append("--profile-memory: goes with --profile-steps START:END, which chooses the steps to trace")
    if o.lr <= 0:
        errors.append(f"--lr: must be positive, got {o.lr}")
    if o.min_lr is None:
        o.min_lr = 0.1 * o.lr
    if not 0 <= o.min_lr <= o.lr:
        errors.append(f"--min-lr: {o.min_lr} must be between 0 and --lr {o.lr}")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1) or o.eps <= 0 or o.weight_decay < 0 or o.clip_grad < 0:
        errors.append("--beta1/--beta2/--eps/--weight-decay/--clip-grad: need 0 <= beta < 1, eps > 0, "
                      "weight decay >= 0 and clip-grad >= 0")
    if s.lr_decay_steps is None:
        s.lr_decay_steps = cfg.run.steps
    if s.lr_decay_steps < 1:
        errors.append(f"--lr-decay-steps: must be positive, got {s.lr_decay_steps}")
    if not 0 <= s.lr_warmup_fraction <= 1:
        errors.append(f"--lr-warmup-fraction: must be in [0, 1], got {s.lr_warmup_fraction}")
    if s.lr_warmup_steps is None:
        s.lr_warmup_steps = int(s.lr_warmup_fraction * s.lr_decay_steps)
    if not 0 <= s.lr_warmup_steps <= s.lr_decay_steps:
        errors.append(f"--lr-warmup-steps: {s.lr_warmup_steps} must be between 0 and --lr-decay-steps "
                      f"{s.lr_decay_steps}")
    if not 0 < s.lr_wsd_decay_fraction <= 1:
        errors.append("--lr-wsd-decay-fraction: must be in (0, 1]")
    prec = cfg.precision
    if prec.loss_scale is not None and (prec.precision != "fp16" or prec.loss_scale <= 0):
        errors.append("--loss-scale: only for --precision fp16, and must be positive")
    r = cfg.recompute
    if r.recompute_layers is not None and (r.recompute != "full" or r.recompute_layers < 0):
        errors.append("--recompute-layers: goes with --recompute full and must be >= 0")
    errors += _check_checkpoints(cfg)
    d = cfg.data
    try:
        sources = parse_blend(d.data or [])
    except ValueError as exc:
        errors.append(str(exc))
        sources = []
    for _, path in sources:
        if not (os.path.exists(path) or (os.path.exists(path + ".bin") and os.path.exists(path + ".idx"))):
            errors.append(f"--data: {path!r} not found; give existing text files, directories, .jsonl or .parquet "
                          "files or the prefix of a preprocessed .bin/.idx pair")
    if d.tokenizer != "byte" and not os.path.isfile(d.tokenizer):
        errors.append(f"--tokenizer: {d.tokenizer!r} is neither 'byte' nor an existing tokenizer.json file")
    if not d.text_field:
        errors.append("--text-field: must name a field, got an empty string")
    if not 0 <= d.valid_fraction < 1:
        errors.append(f"--valid-fraction: must be in [0, 1), got {d.valid_fraction}")
    if d.eval_interval is not None and (d.eval_interval < 1 or d.eval_iters < 1):
        errors.append("--eval-interval/--eval-iters: must be positive")
    c = cfg.checkpoint
    if c.save_interval is not None and c.save_interval < 1:
        errors.append(f"--save-interval: must be positive, got {c.save_interval}")
    if c.keep_last is not None and c.keep_last < 1:
        errors.append(f"--keep-last: must be at least 1, got {c.keep_last}")
    st = cfg.stability
    if st.spike_factor is not None and st.spike_factor <= 1:
        errors.append(f"--spike-factor: must be greater than 1, got {st.spike_factor}")
    if st.max_rollbacks < 0:
        errors.append("--max-rollbacks: must be >= 0")
    if cfg.run.time_limit is not None:
        if cfg.run.time_limit <= 0:
            errors.append(f"--time-limit: must be a positive number of seconds, got {cfg.run.time_limit}")
        try:
            job_start()
        except ConfigError as exc:
            errors.append(str(exc))
    if cfg.run.step_timeout is not None and cfg.run.step_timeout <= 0:
        errors.append(f"--step-timeout: must be positive, got {cfg.run.step_timeout}")
    if st.max_skipped_steps < 0:
        errors.append("--max-skipped-steps: must be >= 0")
    for spec in st.inject_fault or []:
        try:
            parse_fault(spec)
        except ValueError as exc:
            errors.append(f"--inject-fault: {exc}")
    if errors:
        raise ConfigError("\n".join(errors))
    _check_implemented(cfg)


def _check_implemented(cfg: Config) -> None:
    """Settings whose machinery has not landed yet fail with a clear message instead of running wrongly."""
    p = cfg.parallel
    pending = [("--cp", p.cp > 1 and (cfg.model.dropout or 0) > 0,
                "attention dropout under context parallelism (the ring attention has none)", "use --dropout 0")]
    for flag, used, what, fix in pending:
        if used:
            raise ConfigError(f"{flag}: {what} is not available in this version of the engine yet; {fix}")


# How long the other ranks of a node wait before exiting on a ConfigError: torchrun stops every worker as soon as
# one exits, so one that exited at once could get the first rank killed before it printed the message.
CONFIG_ERROR_GRACE_S = 10.0


def exit_on_config_error(fn):
    """Runs fn(); a ConfigError becomes one message on stderr and exit status 2, with no traceback. Under torchrun
    every rank finds the same problem: the first rank of each node prints it and exits; the others wait (torchrun
    ends them once that rank is gone), and print it themselves only if that does not happen (a problem that rank
    did not have)."""
    try:
        return fn()
    except ConfigError as exc:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            time.sleep(CONFIG_ERROR_GRACE_S)
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
