"""Tokenize text once into the memory-mapped .bin/.idx format the trainer reads with `--data PREFIX`.

    python -m engine.data.preprocess --input corpus/ more.jsonl --output-prefix data/corpus --tokenizer byte

Documents are tokenized and written one at a time, so memory does not grow with the corpus.
"""
from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from engine.data.datasets import IndexedWriter, encode_documents, iter_documents, stdlib_sources
from engine.data.tokenizers import build_tokenizer


def preprocess(paths: list[str], prefix: str, tokenizer, chunk_tokens: int = 1 << 20,
               progress: bool = False, flag: str = "--input", text_field: str = "text") -> tuple[int, int]:
    """Writes PREFIX.bin/.idx for the documents under `paths` (of .jsonl and .parquet files: their `text_field`);
    returns (documents, tokens). `flag` names the sources in an error."""
    bar = tqdm(unit="tok", unit_scale=True, file=sys.stderr, disable=not progress, mininterval=0.5)
    pending = 0
    with bar, IndexedWriter(prefix, tokenizer.vocab_size, chunk_tokens) as writer:
        for ids in encode_documents(iter_documents(paths, text_field), tokenizer):
            writer.add(ids)
            pending += len(ids)
            if writer.num_docs % 256 == 0:
                bar.set_postfix_str(f"{writer.num_docs} docs", refresh=False)
                bar.update(pending)
                pending = 0
        if writer.num_docs == 0:
            raise ValueError(f"{flag}: the given sources contain no text")
        writer.finish()
        bar.set_postfix_str(f"{writer.num_docs} docs", refresh=False)
        bar.update(pending)
    return writer.num_docs, writer.num_tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.data.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="text files, directories, .jsonl or .parquet files; text and "
                                                   ".jsonl may be compressed (.gz, .zst) "
                                                   "[the Python standard library's sources]")
    parser.add_argument("--text-field", default="text",
                        help="the .jsonl field / .parquet column holding each document [text]")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path [byte]")
    args = parser.parse_args(argv)
    prefix = args.output_prefix
    try:
        stem, ext = os.path.splitext(prefix)
        if ext in (".bin", ".idx"):
            raise ValueError(f"--output-prefix {prefix}: pass the prefix {stem} without .bin/.idx")
        if not os.path.isdir(os.path.dirname(prefix) or "."):
            raise FileNotFoundError(f"--output-prefix {prefix}: the directory {os.path.dirname(prefix)} does not "
                                    "exist; create it first")
        tokenizer = build_tokenizer(args.tokenizer)
        num_docs, num_tokens = preprocess(args.input or stdlib_sources(), prefix, tokenizer,
                                          progress=sys.stderr.isatty(),
                                          text_field=args.text_field)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {prefix}.bin/.idx: {num_docs} documents, {num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
