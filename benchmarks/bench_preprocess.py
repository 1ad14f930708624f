"""Preprocessing memory: peak RSS of `python -m engine.data.preprocess` on a small and a large corpus.

Writes two corpora in a temporary directory (.jsonl, or .parquet with --format parquet) of --small-mb and
--large-mb megabytes: documents of about 8 KB cut from the Python standard library's sources, each with a
running number so no two are equal. Runs the preprocess CLI (byte tokenizer) on each in its own process and
reports its peak resident memory (ru_maxrss of that child, from os.wait4) and tokens per second (net: the wall
time less that of a process that only imports the preprocess module, i.e. torch). Streaming
preprocessing keeps memory flat: the large corpus's peak should be about the small one's. With --in-memory the
small corpus is also run through the trainer's in-memory path, write_indexed(tokenize_documents(...)), for
comparison. With --processes N the small corpus is also loaded as the trainer loads text --data, by N processes
started together (one node's ranks): tokenized in memory by each (--data-cache none), and through the token cache
(engine.data.cache) cold (one process tokenizes, the others wait) and warm (a later run); reported are the largest
peak RSS of one process, their sum, and the wall time until the last is done. Everything written is deleted at the
end.

    python benchmarks/bench_preprocess.py [--small-mb 110 --large-mb 1200] [--format jsonl|parquet] [--in-memory]
                                          [--processes N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

from engine.data.datasets import stdlib_sources  # noqa: E402

IN_MEMORY = ("import sys; from engine.data.datasets import iter_documents, tokenize_documents, write_indexed; "
             "from engine.data.tokenizers import ByteTokenizer; "
             "s = tokenize_documents(iter_documents([sys.argv[1]]), ByteTokenizer()); "
             "write_indexed(sys.argv[2], s, 259); print(f'{len(s.doc_offsets) - 1} documents, {len(s.tokens)} tokens')")

# The trainer's load of text --data (engine.training.data.prepare_data's call) in one process: argv = corpus, cache
# directory or "none".
TRAINER_LOAD = ("import sys; from engine.data.datasets import load_stream; "
                "from engine.data.tokenizers import ByteTokenizer; "
                "s = load_stream([sys.argv[1]], ByteTokenizer(), None if sys.argv[2] == 'none' else sys.argv[2]); "
                "print(f'{len(s.doc_offsets) - 1} documents, {len(s.tokens)} tokens')")


def documents(doc_bytes: int = 8000):
    """An endless supply of distinct ~doc_bytes documents of real text."""
    pieces = []
    for path in stdlib_sources():
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8", errors="replace")
        pieces += [text[i:i + doc_bytes] for i in range(0, len(text), doc_bytes)]
    n = 0
    while True:
        for piece in pieces:
            yield f"# document {n}\n{piece}"
            n += 1


def write_corpus(path: str, megabytes: int, fmt: str) -> int:
    """Writes about `megabytes` MB of documents to `path`; returns the file's size in bytes."""
    target = megabytes * 1_000_000
    docs = documents()
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as fh:
            while fh.tell() < target:
                fh.write("".join(json.dumps({"text": next(docs)}) + "\n" for _ in range(1000)))
    else:
        import pyarrow
        import pyarrow.parquet as pq
        written = 0
        with pq.ParquetWriter(path, pyarrow.schema([("text", pyarrow.string())]), compression="none") as writer:
            while written < target:
                batch = [next(docs) for _ in range(1000)]
                written += sum(len(t) for t in batch)
                writer.write_table(pyarrow.table({"text": batch}))
    return os.path.getsize(path)


def run_measured(cmd: list[str], processes: int = 1) -> dict:
    """Runs `processes` copies of cmd at once; the largest and the summed peak RSS (MiB), the wall time until the
    last is done, and the numbers of the first one's summary line."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    outs, peaks = [], []
    with tempfile.TemporaryDirectory() as logs:
        procs = []
        for i in range(processes):
            out_fh, err_fh = (open(os.path.join(logs, f"{i}.{k}"), "w+") for k in ("out", "err"))
            procs.append((subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh, env=env), out_fh, err_fh))
        for proc, out_fh, err_fh in procs:
            # Reaped here rather than by Popen.wait, for this child's own rusage (RUSAGE_CHILDREN would be the
            # largest of all children so far).
            _, status, usage = os.wait4(proc.pid, 0)
            peaks.append(usage.ru_maxrss / 1024)
            out_fh.seek(0)
            err_fh.seek(0)
            if os.waitstatus_to_exitcode(status) != 0:
                for other, _, _ in procs:
                    other.kill()
                raise SystemExit(f"error: {' '.join(cmd)} exited {os.waitstatus_to_exitcode(status)}: "
                                 f"{err_fh.read().strip()}")
            outs.append(out_fh.read())
            out_fh.close()
            err_fh.close()
        wall = time.perf_counter() - start
    words = outs[0].split()
    tokens = int(words[words.index("tokens") - 1])
    return {"peak_rss_mib": max(peaks), "sum_peak_rss_mib": sum(peaks), "wall_s": wall, "tokens": tokens,
            "documents": int(words[words.index("documents,") - 1]), "processes": processes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-mb", type=int, default=110)
    ap.add_argument("--large-mb", type=int, default=1200)
    ap.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    ap.add_argument("--in-memory", action="store_true", help="also run the in-memory path on the small corpus")
    ap.add_argument("--processes", type=int, default=0,
                    help="also load the small corpus as the trainer does, by this many processes at once")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = {"imports_only": run_measured([sys.executable, "-c", "import engine.data.preprocess; "
                                             "print('0 documents, 0 tokens')"])}
    with tempfile.TemporaryDirectory() as root:
        for name, mb in (("small", args.small_mb), ("large", args.large_mb)):
            corpus = os.path.join(root, f"{name}.{args.format}")
            size = write_corpus(corpus, mb, args.format)
            prefix = os.path.join(root, name)
            r = run_measured([sys.executable, "-m", "engine.data.preprocess", "--input", corpus,
                              "--output-prefix", prefix])
            results[name] = dict(r, corpus_bytes=size)
            if args.in_memory and name == "small":
                r = run_measured([sys.executable, "-c", IN_MEMORY, corpus, prefix + "_mem"])
                results["small_in_memory"] = dict(r, corpus_bytes=size)
                os.remove(prefix + "_mem.bin")
                os.remove(prefix + "_mem.idx")
            if args.processes and name == "small":
                cache = os.path.join(root, "cache")
                for label, where in (("in memory", "none"), ("cache, cold", cache), ("cache, warm", cache)):
                    r = run_measured([sys.executable, "-c", TRAINER_LOAD, corpus, where], args.processes)
                    results[f"trainer x{args.processes}, {label}"] = dict(r, corpus_bytes=size)
                shutil.rmtree(cache)
            for path in (corpus, prefix + ".bin", prefix + ".idx"):
                os.remove(path)
    startup = results["imports_only"]["wall_s"]
    print("| run | corpus | documents | tokens | peak RSS (one process) | sum over processes | wall | tokens/s | "
          "tokens/s less start-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in list(results.items())[1:]:
        corpus = f"{r['corpus_bytes'] / 1e6:,.0f} MB"
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
        r["tokens_per_s_net"] = r["tokens"] / max(r["wall_s"] - startup, 1e-9)
        print(f"| {name} | {corpus} | {r['documents']:,} | {r['tokens']:,} | {r['peak_rss_mib']:,.0f} MiB | "
              f"{r['sum_peak_rss_mib']:,.0f} MiB | {r['wall_s']:.1f} s | {r['tokens_per_s'] / 1e6:.1f} M | "
              f"{r['tokens_per_s_net'] / 1e6:.1f} M |")
    base = results["imports_only"]["peak_rss_mib"]
    print(f"start-up (a process that only imports engine.data.preprocess): {base:.0f} MiB, {startup:.1f} s")
    ratio = results["large"]["peak_rss_mib"] / results["small"]["peak_rss_mib"]
    growth = results["large"]["corpus_bytes"] / results["small"]["corpus_bytes"]
    print(f"peak RSS large / small: {ratio:.3f} (corpus {growth:.1f}x larger)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(results, ratio=ratio, format=args.format), fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
