"""Document-masked attention on CPU: SDPA with the boolean block mask vs causal SDPA per document span.

Forward + backward of the attention core alone (q, k, v [b, h, s, d] -> out, out.backward) on packed rows of
documents with random lengths, against plain causal SDPA on the same tensors (what attention costs without
document masking). Also times building the layout (DocumentMask.from_tokens, once per micro-batch) and the
block mask (once per micro-batch, shared by the layers). After one untimed pass of every method (which also
checks the two document-masked outputs agree), the methods are timed in turns, always in the same order
(benchmarks/ab.py, ``order="fixed"``); the median is reported.

    python benchmarks/bench_document_mask.py [--batch 4] [--heads 8] [--kv-heads 8] [--head-dim 64] \
        [--seq 2048] [--min-doc 50] [--max-doc 1500] [--threads 2] [--repeats 7] [--seed 0] [--json PATH] \
        [--profile DIR]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from engine.models.documents import DocumentMask
from engine.models.llama import attention_core, document_attention
from ab import add_timing_args, profile, run_ab, write_json

EOS = 1


def packed_ids(batch: int, seq: int, min_doc: int, max_doc: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq] token ids cut from one stream of documents of random lengths in [min_doc, max_doc] (EOS
    last), starting at a random offset into the first document, as the data layer's samples do."""
    lengths, total = [], 0
    need = batch * seq + max_doc
    while total < need:
        lengths.append(int(torch.randint(min_doc, max_doc + 1, (1,), generator=gen)))
        total += lengths[-1]
    stream = torch.full((total,), 2, dtype=torch.long)
    stream[torch.tensor(lengths).cumsum(0) - 1] = EOS
    offset = int(torch.randint(0, lengths[0], (1,), generator=gen))
    return stream[offset:offset + batch * seq].view(batch, seq)


def fwd_bwd(fn, q, k, v, grad):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--min-doc", type=int, default=50)
    parser.add_argument("--max-doc", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_timing_args(parser, repeats=7, warmup=0, warmup_help="untimed rounds after the first, checking pass "
                                                             "(default 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    b, h, hk, d, s = args.batch, args.heads, args.kv_heads, args.head_dim, args.seq
    ids = packed_ids(b, s, args.min_doc, args.max_doc, gen)
    docs = {impl: DocumentMask.from_tokens(ids, EOS, impl=impl) for impl in ("sdpa", "segments")}
    q = torch.randn(b, h, s, d, generator=gen).requires_grad_()
    k = torch.randn(b, hk, s, d, generator=gen).requires_grad_()
    v = torch.randn(b, hk, s, d, generator=gen).requires_grad_()
    grad = torch.randn(b, h, s, d, generator=gen)

    methods = {
        "causal SDPA (no document mask)": lambda q, k, v: attention_core(q, k, v, 0.0),
        "sdpa: SDPA + boolean block mask": lambda q, k, v: document_attention(q, k, v, 0.0, docs["sdpa"]),
        "segments: causal SDPA per document": lambda q, k, v: document_attention(q, k, v, 0.0, docs["segments"]),
    }
    _ = docs["sdpa"].mask  # built once per micro-batch in training; timed separately below
    outs = {name: fwd_bwd(fn, q, k, v, grad).detach() for name, fn in methods.items()}  # warm-up
    diff = (outs["sdpa: SDPA + boolean block mask"] - outs["segments: causal SDPA per document"]).abs().max()
    sides = {name: (lambda fn=fn: fwd_bwd(fn, q, k, v, grad)) for name, fn in methods.items()}
    res = run_ab(sides, args.repeats, args.warmup, order="fixed")
    times = res.times
    layout = run_ab({"layout": lambda: DocumentMask.from_tokens(ids, EOS)}, args.repeats, 0).times["layout"]
    block = run_ab({"block": lambda: DocumentMask.from_tokens(ids, EOS, impl="sdpa").mask}, args.repeats,
                   0).times["block"]
    lengths = [n for row in docs["segments"].lengths for n in row]
    print(f"attention fwd+bwd, fp32, {args.threads} threads: b={b} h={h} kv_heads={hk} d={d} s={s}; "
          f"{len(lengths)} documents of {min(lengths)}-{max(lengths)} tokens (drawn {args.min_doc}-{args.max_doc}); "
          f"median of {args.repeats}")
    base = statistics.median(times["causal SDPA (no document mask)"])
    print(f"{'method':<38}{'ms':>10}{'vs causal':>12}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<38}{m * 1e3:>10.1f}{m / base:>11.2f}x")
    print(f"{'layout (from_tokens), per micro-batch':<38}{statistics.median(layout) * 1e3:>10.2f}")
    print(f"{'block mask build, per micro-batch':<38}{statistics.median(block) * 1e3:>10.2f}")
    print(f"max |sdpa - segments| output difference: {diff.item():.2e}")
    if args.profile:
        for i, (name, fn) in enumerate(sides.items()):
            print(f"profile of {name}: {profile(fn, 3, args.profile, f'method{i}')}")
    write_json(args.json, {"args": vars(args), "documents": len(lengths),
                           "document_lengths": [min(lengths), max(lengths)],
                           "ms": {name: statistics.median(ts) * 1e3 for name, ts in times.items()},
                           "vs_causal": {name: statistics.median(ts) / base for name, ts in times.items()},
                           "layout_ms": statistics.median(layout) * 1e3,
                           "block_mask_ms": statistics.median(block) * 1e3,
                           "max_abs_diff": diff.item(), "timing": res.to_dict()})


if __name__ == "__main__":
    main()
