"""Context parallelism and activation memory: what one rank saves for backward at cp 1, 2, 4, 8 on long sequences.

Each run is a real training step (torchrun, gloo, one process per cp rank) of the `tiny` model on one sequence of
--seq-length tokens; the memory event's `activation_bytes` (what autograd saved for one micro-batch on rank 0,
counted with saved-tensor hooks) is compared with 1/cp of the cp 1 run and with `engine.estimate`'s prediction.
--long runs one step on a --long-seq-length sequence at cp 8 with a small model instead (does it train at all).

    python benchmarks/bench_cp_memory.py [--seq-length 16384] [--cps 1 2 4 8] [--long]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--precision", "fp32", "--device", "cpu", "--micro-batch-size", "1",
        "--global-batch-size", "1", "--steps", "1", "--lr-warmup-steps", "0"]
SMALL = ["--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-heads", "4",
         "--num-kv-heads", "2", "--precision", "fp32", "--device", "cpu", "--micro-batch-size", "1",
         "--global-batch-size", "1", "--steps", "1", "--lr-warmup-steps", "0"]


def run(cp: int, flags: list[str], workdir: str, name: str) -> tuple[dict, float]:
    """One training step at cp; returns (the metrics records by kind, seconds)."""
    script = os.path.join(ROOT, "examples", "pretrain_llama.py")
    cmd = ([sys.executable, script] if cp == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}", script, "--cp",
            str(cp)])
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(max(1, 2 // cp)))
    proc = subprocess.run(cmd + flags + ["--run-name", name, "--valid-fraction", "0"], cwd=workdir, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    records = [json.loads(line) for line in open(os.path.join(workdir, "runs", name, "metrics.jsonl"))]
    return {r.get("event", "step"): r for r in records}, seconds


def estimated_activations(seq: int, cp: int) -> int:
    from engine.estimate import Layout, memory_per_rank
    from engine.models.llama import preset
    cfg = preset("tiny")
    cfg.seq_length, cfg.vocab_size = seq, 259
    return memory_per_rank(cfg, Layout(cp=cp, precision="fp32"), 0)["activations"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-length", type=int, default=16384)
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--long", action="store_true", help="also one step at --long-seq-length on 8 ranks (cp 8)")
    ap.add_argument("--long-seq-length", type=int, default=131072)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        print(f"tiny model, one sequence of {args.seq_length} tokens, fp32, activation bytes saved on rank 0")
        print("| cp | activation bytes | x (cp 1 / cp) | estimate | measured / estimate | step s |\n|---|---|---|---|---|---|")
        base = None
        for cp in args.cps:
            records, seconds = run(cp, TINY + ["--seq-length", str(args.seq_length)], workdir, f"cp{cp}")
            measured = records["memory"]["activation_bytes"]
            base = base if base is not None else (measured if cp == 1 else None)
            ratio = f"{measured / (base / cp):.3f}" if base else "-"
            est = estimated_activations(args.seq_length, cp)
            print(f"| {cp} | {measured:,} | {ratio} | {est:,} | {measured / est:.3f} | {seconds:.0f} |", flush=True)
        if args.long:
            records, seconds = run(8, SMALL + ["--seq-length", str(args.long_seq_length)], workdir, "long")
            step = records["step"]
            print(f"\n{args.long_seq_length} tokens, 1 layer x hidden 64, cp 8: loss {step['loss']:.4f}, "
                  f"{seconds:.0f} s, activation bytes on rank 0 {records['memory']['activation_bytes']:,}, "
                  f"peak RSS not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
