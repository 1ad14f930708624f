"""Tokenize text once into the memory-mapped .bin/.idx format the trainer reads with `--data PREFIX`.

    python -m engine.data.preprocess --input corpus/ more.jsonl --output-prefix data/corpus --tokenizer byte
"""
from __future__ import annotations

import argparse
import sys

from engine.data.datasets import iter_documents, stdlib_sources, tokenize_documents, write_indexed
from engine.data.tokenizers import build_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.data.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="text files, directories or .jsonl files "
                                                   "[the Python standard library's sources]")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path [byte]")
    args = parser.parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer)
        stream = tokenize_documents(iter_documents(args.input or stdlib_sources()), tokenizer)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_indexed(args.output_prefix, stream, tokenizer.vocab_size)
    print(f"wrote {args.output_prefix}.bin/.idx: {len(stream.doc_offsets) - 1} documents, "
          f"{len(stream.tokens)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
