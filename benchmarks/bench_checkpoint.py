"""Checkpoint saves: how long the training loop is blocked by a synchronous save and by --async-save.

One process, the engine's Trainer on a model of --hidden-size/--num-layers (fp32 weights + AdamW state: 16 bytes
per parameter on disk). Each round saves once synchronously and once in the background (order flipped every
round), and times plain training steps. "blocked" is what the training thread waits for: the save call (directory
set-up) plus the next optimizer step's wait for the writer's host copy of the state. Training goes on until the
background save is published ("until published", `latest` moves); the loop time a save loses is the time from
the save call to then minus that many plain steps - for a background save the blocked time plus what the writer
thread takes from the steps' compute while they share the cores (a synchronous save: its whole time).

    python benchmarks/bench_checkpoint.py [--hidden-size 1024 --num-layers 8 --seq-length 128] [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.training.config import parse_config, validate  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--seq-length", type=int, default=128, help="tokens per step (one sequence)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        cfg = parse_config(["--hidden-size", str(args.hidden_size), "--num-layers", str(args.num_layers),
                            "--ffn-hidden-size", str(args.hidden_size * 11 // 4), "--num-heads", "8",
                            "--num-kv-heads", "4", "--seq-length", str(args.seq_length), "--micro-batch-size", "1",
                            "--global-batch-size", "1", "--device", "cpu", "--precision", "fp32",
                            "--save", os.path.join(root, "ckpt"), "--keep-last", "1", "--run-name", "bench",
                            "--steps", "1"])
        validate(cfg, 1)
        trainer = Trainer(cfg)
        trainer.train_step()
        params = sum(q.numel() for _, q in trainer.named_params)
        rows = {"plain step": [], "sync": [], "async blocked": [], "async": [], "async steps to publish": [],
                "async until published": []}
        for r in range(args.repeats + 1):
            plain = []
            for _ in range(3):
                start = time.perf_counter()
                trainer.train_step()
                plain.append(time.perf_counter() - start)
            step_s = statistics.median(plain)
            for mode in (("sync", "async") if r % 2 else ("async", "sync")):
                waited, steps = trainer.snapshot_wait_s, 1
                start = time.perf_counter()
                trainer.save_checkpoint(background=mode == "async")
                call = time.perf_counter() - start
                trainer.train_step()
                while trainer.finish_pending_save(when_written=True) is None and trainer.pending_save is not None:
                    trainer.train_step()  # training goes on while the writer works
                    steps += 1
                total = time.perf_counter() - start
                if r == 0:
                    continue  # warm-up round (page cache, allocator)
                rows[mode].append(total - steps * step_s)
                if mode == "async":
                    rows["async blocked"].append(call + trainer.snapshot_wait_s - waited)
                    rows["async steps to publish"].append(steps)
                    rows["async until published"].append(total)
            if r:
                rows["plain step"].append(step_s)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "ckpt"))
                   for f in fs)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = {k: statistics.median(a / s for a, s in zip(rows[k], rows["sync"])) for k in ("async blocked", "async")}
    print(f"{params:,} parameters, checkpoint {size / 2**20:.1f} MiB on disk, {args.repeats} rounds")
    print("| save | median |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.0f} |" if k.endswith("publish") else f"| {k} | {v * 1e3:.1f} ms |")
    print(f"async / sync, median of per-round ratios: training thread blocked **{ratios['async blocked']:.3f}**, "
          f"loop time lost (blocked + slower steps while the writer shares the cores) **{ratios['async']:.3f}**")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"params": params, "bytes": size, "seconds": rows, "ratios": ratios}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
