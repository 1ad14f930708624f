"""The LM head + cross-entropy: the plain path (F.linear to the whole [tokens, vocab] logits, then the fp32 loss)
against the fused, chunked one (``--loss-chunk-tokens``: engine.parallel.cross_entropy.chunked_head_cross_entropy).

For one forward + backward of ``--tokens`` hidden states through a [vocab, hidden] head, per side:

* time (ms, median over interleaved rounds, ``benchmarks/ab.py``) and the ratio chunked / plain;
* "kept": bytes saved between forward and backward (saved-tensor hooks: what stays alive for every micro-batch
  in flight), next to engine.estimate's rows for the same shapes;
* on CUDA, "peak": the allocator's peak during the forward + backward above what was allocated before (inputs
  and weight included in neither).

The two sides' loss and gradients are checked to agree before anything is timed.

    python benchmarks/bench_loss.py [--tokens 8192] [--hidden 2048] [--vocab 32000] [--chunks 1024 4096 8192]
        [--device cuda] [--dtype bf16] [--repeats 10] [--json out.json]
    python benchmarks/bench_loss.py --smoke   # CPU-sized, every path
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ab import add_timing_args, run_ab, sync, write_json  # noqa: E402

from engine import estimate as est  # noqa: E402
from engine.models.llama import ModelConfig  # noqa: E402
from engine.parallel.cross_entropy import chunked_head_cross_entropy, vocab_parallel_cross_entropy  # noqa: E402
from engine.parallel.recompute import SavedTensorCounter  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def plain(h, w, t):
    return vocab_parallel_cross_entropy(F.linear(h, w), t).sum()


def chunked(chunk):
    return lambda h, w, t: chunked_head_cross_entropy(h, w, t, chunk)


def inputs(args, device, dtype):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    t = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    return h, w, t


def step(fn, h, w, t):
    h.grad = w.grad = None
    loss = fn(h, w, t)
    loss.backward()
    return loss.detach()


def kept_bytes(fn, h, w, t) -> int:
    with SavedTensorCounter([h, w]) as counter:
        loss = fn(h, w, t)
    loss.backward()
    return counter.bytes


def peak_bytes(fn, h, w, t, device) -> int | None:
    if device.type != "cuda":
        return None
    h.grad = w.grad = None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(fn, h, w, t)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def check(sides, h, w, t, dtype):
    results = {}
    for name, fn in sides.items():
        loss = step(fn, h, w, t)
        results[name] = loss, h.grad.clone(), w.grad.clone()
    ref = results["plain"]
    rtol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, got in results.items():
        for what, a, b in zip(("loss", "hidden grad", "weight grad"), got, ref):
            err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()
            if err > rtol:
                raise SystemExit(f"{name}: {what} differs from the plain path by {err:.2e} (relative to its max)")


def estimated_kept(args, chunk: int, dtype) -> int:
    """engine.estimate's last-stage rows for the head and loss alone (the final norm's rows, including its output,
    the head's input, left out: here that input is the benchmark's own leaf tensor)."""
    cfg = ModelConfig(hidden_size=args.hidden, vocab_size=args.vocab, num_heads=1, num_kv_heads=1)
    rows = est.saved_head_activations(cfg, 1, args.tokens, 1, torch.finfo(dtype).bits // 8, chunk)
    return sum(n * b for what, n, b, _ in rows if not what.startswith("final norm"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch [8192: 4 x 2048]")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 4096], help="--loss-chunk-tokens values")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="[bf16 on CUDA, fp32 on CPU]")
    p.add_argument("--smoke", action="store_true", help="CPU-sized shapes, one round")
    add_timing_args(p, repeats=7, warmup=1)
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.chunks, args.repeats, args.warmup = 512, 64, 1000, [128], 1, 1
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    h, w, t = inputs(args, device, dtype)
    sides = {"plain": plain, **{f"chunked {c}": chunked(c) for c in args.chunks}}
    check(sides, h, w, t, dtype)
    result = run_ab({name: (lambda fn=fn: step(fn, h, w, t)) for name, fn in sides.items()}, args.repeats,
                    args.warmup, device=device)
    rows = []
    for name, fn in sides.items():
        chunk = 0 if name == "plain" else int(name.split()[1])
        rows.append({"side": name, "ms": 1e3 * result.median(name),
                     "ratio": result.ratio_summary(name, "plain")["median"],
                     "kept_bytes": kept_bytes(fn, h, w, t), "estimated_kept_bytes": estimated_kept(args, chunk, dtype),
                     "peak_bytes": peak_bytes(fn, h, w, t, device)})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"head + loss, {args.tokens} tokens x hidden {args.hidden} -> vocab {args.vocab}, {dtype}, {name}, "
          f"{args.repeats} rounds\n")
    print("| side | ms (median) | / plain | kept (MiB) | estimator (MiB) | peak above inputs (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}"
        print(f"| {r['side']} | {r['ms']:.2f} | {r['ratio']:.3f} | {r['kept_bytes'] / 2**20:,.1f} | "
              f"{r['estimated_kept_bytes'] / 2**20:,.1f} | {peak} |")
    write_json(args.json, {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                           "args": vars(args), "dtype": str(dtype), "rows": rows, "timing": result.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
