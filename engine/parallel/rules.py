"""The layout rules: which (model shape, tp, pp, vpp, dp, batch) combinations the engine can run.

One copy, used by the trainer's flag validation and by `engine.estimate`, so a layout the estimator accepts is one
the trainer runs and the other way round.
"""
from __future__ import annotations

from engine.models.llama import ModelConfig


def optimizer_errors(optimizer: str, tp: int = 1, zero: int = 0, dp: int = 1, cp: int = 1,
                     zero_by_default: bool = False) -> list[str]:
    """What the optimizer cannot do in this layout: Adafactor's factored statistics need whole matrices, so it
    takes neither tensor parallelism nor ZeRO sharding (which shards over dp x cp). zero_by_default: the stage
    was not given but filled in (the message says so)."""
    if optimizer != "adafactor":
        return []
    errors = []
    if tp > 1:
        errors.append(f"--optimizer adafactor: not with --tp {tp} (its factored statistics span whole matrices, "
                      "which tensor parallelism splits); use --tp 1 or --optimizer adamw")
    if zero > 0 and dp * cp > 1:
        default = " (the default when dp > 1)" if zero_by_default else ""
        errors.append(f"--optimizer adafactor: not with --zero {zero}{default} over dp x cp = {dp * cp} ranks (ZeRO "
                      "shards matrices, and its factored statistics need whole ones); pass --zero 0, or use "
                      "--optimizer adamw")
    return errors


def layout_errors(model: ModelConfig, tp: int, pp: int, vpp: int = 1, dp: int = 1, sequence_parallel: bool = False,
                  schedule: str | None = None, micro_batch_size: int | None = None,
                  global_batch_size: int | None = None, cp: int = 1) -> list[str]:
    """Every rule the layout breaks, as 'flag: message' lines (empty when it is runnable). schedule None means the
    default for vpp (interleaved when vpp > 1); batch rules are checked when both batch sizes are given."""
    errors = []
    undivided = [f"{flag} {value}" for flag, value in [("--num-heads", model.num_heads),
                 ("--num-kv-heads", model.num_kv_heads), ("--ffn-hidden-size", model.ffn_hidden_size)] if value % tp]
    if undivided:
        errors.append(f"--tp: {tp} does not divide {', '.join(undivided)}; choose a tp that divides them (each "
                      "rank holds whole heads and an equal slice of the MLP)")
    if model.num_layers % (pp * vpp):
        errors.append(f"--pp: --num-layers {model.num_layers} is not divisible by pp * vpp = {pp * vpp}; choose pp "
                      "and vpp whose product divides the layer count")
    if cp > 1 and model.seq_length % (2 * cp):
        errors.append(f"--cp: --seq-length {model.seq_length} is not divisible by 2 * cp = {2 * cp} (each rank holds "
                      "two of the sequence's 2 x cp chunks); choose a cp that fits the sequence length")
    if sequence_parallel and tp == 1:
        errors.append("--sequence-parallel: needs --tp > 1 (it shards the sequence across the tp group)")
    elif sequence_parallel and (model.seq_length // cp) % tp:
        errors.append(f"--sequence-parallel: the sequence each rank holds (--seq-length {model.seq_length} / cp {cp}) "
                      f"is not divisible by --tp {tp}")
    if vpp > 1 and pp == 1:
        errors.append("--vpp: virtual stages need --pp > 1")
    schedule = schedule or ("interleaved" if vpp > 1 else "1f1b")
    if schedule == "interleaved" and vpp == 1:
        errors.append("--schedule interleaved: needs --vpp > 1 (virtual stages per pipeline rank)")
    if schedule != "interleaved" and vpp > 1:
        errors.append(f"--schedule {schedule}: --vpp > 1 needs --schedule interleaved")
    if micro_batch_size is None or global_batch_size is None:
        return errors
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        errors.append(f"--global-batch-size: {global_batch_size} is not divisible by micro-batch-size * dp = "
                      f"{micro_batch_size}*{dp} = {per_step}; use a multiple of {per_step}")
    elif schedule == "interleaved" and (global_batch_size // per_step) % pp:
        errors.append(f"--schedule interleaved: the micro-batches per step (global batch / (micro-batch * dp) = "
                      f"{global_batch_size // per_step}) must be a multiple of --pp {pp}; raise "
                      "--global-batch-size or lower --micro-batch-size")
    return errors
