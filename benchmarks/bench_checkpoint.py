"""Checkpoint saves: how long the training loop is blocked by a synchronous save and by --async-save.

One process, the engine's Trainer on a model of --hidden-size/--num-layers (fp32 weights + AdamW state: 16 bytes
per parameter on disk). After one training step the same step is saved alternately synchronously and in the
background (order flipped every round); a background save's blocked time is what `save_checkpoint` takes to
return (the host copy of the state and the directory set-up), its total time runs until it is published.

    python benchmarks/bench_checkpoint.py [--hidden-size 1024 --num-layers 8] [--repeats 5] [--json out.json]
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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        cfg = parse_config(["--hidden-size", str(args.hidden_size), "--num-layers", str(args.num_layers),
                            "--ffn-hidden-size", str(args.hidden_size * 11 // 4), "--num-heads", "8",
                            "--num-kv-heads", "4", "--seq-length", "64", "--micro-batch-size", "1",
                            "--global-batch-size", "1", "--device", "cpu", "--precision", "fp32",
                            "--save", os.path.join(root, "ckpt"), "--run-name", "bench", "--steps", "1"])
        validate(cfg, 1)
        trainer = Trainer(cfg)
        trainer.train_step()
        params = sum(q.numel() for _, q in trainer.named_params)
        rows = {"sync": [], "async blocked": [], "async until published": []}
        for r in range(args.repeats + 1):
            for mode in (("sync", "async") if r % 2 else ("async", "sync")):
                start = time.perf_counter()
                trainer.save_checkpoint(background=mode == "async")
                blocked = time.perf_counter() - start
                if mode == "async":
                    trainer.finish_pending_save()
                    total = time.perf_counter() - start
                if r == 0:
                    continue  # warm-up round (page cache, allocator)
                if mode == "sync":
                    rows["sync"].append(blocked)
                else:
                    rows["async blocked"].append(blocked)
                    rows["async until published"].append(total)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "ckpt"))
                   for f in fs)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = [a / s for a, s in zip(rows["async blocked"], rows["sync"])]
    print(f"{params:,} parameters, checkpoint {size / 2**20:.1f} MiB on disk, {args.repeats} rounds")
    print("| save | median ms |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} |")
    print(f"blocked time async / sync: median of per-round ratios **{statistics.median(ratios):.3f}**")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"params": params, "bytes": size, "seconds": rows, "ratio": statistics.median(ratios)}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
