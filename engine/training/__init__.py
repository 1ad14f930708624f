"""Configuration, the trainer, checkpoints and metrics; `main` is the pretraining command line."""
from __future__ import annotations

import os
import sys

from engine.training.checkpoint import CheckpointError
from engine.training.config import Config, ConfigError, exit_on_config_error, parse_config, preflight, validate


def main(argv: list[str] | None = None) -> int:
    """Entry point of examples/pretrain_llama.py. Every setting, the data and the tokenizer are checked on every
    rank before any process group exists; a bad one exits with status 2 and a message naming the flag (printed by
    the first rank of each node)."""
    from engine.parallel.topology import init_distributed
    from engine.training.data import prepare_data
    from engine.training.trainer import StopTraining, Trainer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    def setup() -> Trainer:
        cfg = parse_config(argv)
        validate(cfg, world_size)
        preflight(cfg)
        data = prepare_data(cfg)  # a problem with the data or tokenizer is one line too, before the process group
        init_distributed(cfg.run.collective_timeout, cfg.run.device)
        return Trainer(cfg, data=data)

    trainer = exit_on_config_error(setup)
    try:
        exit_on_config_error(trainer.train)
    except (StopTraining, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a collective or pipeline transfer failed: a peer died, or the network
        if trainer.world_size == 1:
            raise
        _keep_traceback(trainer.monitor.failures_dir, trainer.rank)
        trainer.monitor.report("failed", f"{type(exc).__name__}: {exc}")  # one line for the job; exits
    return 0


def _keep_traceback(directory: str, rank: int) -> None:
    """This rank's traceback in DIRECTORY/rank<r>.txt (the job prints one line, not one traceback per rank)."""
    import traceback
    try:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"rank{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
    except OSError:
        traceback.print_exc()


__all__ = ["Config", "ConfigError", "main", "parse_config", "validate"]
