"""Documents -> one packed token stream -> fixed-length samples.

Every source (text files, directories, .jsonl, the built-in corpus, a preprocessed .bin/.idx pair) becomes a
flat stream of token ids in which each document is followed by EOS, plus the offsets where documents start.
A sample is the window of `seq_length + 1` tokens starting at `i * seq_length` (inputs are the first
seq_length tokens, targets the last), so packing never wastes a token and samples cross document boundaries
exactly as Megatron's GPT dataset does. The last `valid_fraction` of the documents is held out for evaluation.
"""
from __future__ import annotations

import json
import os
import struct
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

_IDX_MAGIC = b"ENGINEIDX\x00"
_IDX_VERSION = 1
_DTYPES = {1: np.uint16, 2: np.int32}


@dataclass
class TokenStream:
    tokens: np.ndarray      # flat token ids, EOS after every document (may be a read-only memmap)
    doc_offsets: np.ndarray  # int64 [num_docs + 1]: where each document starts in `tokens`


def stdlib_sources() -> list[str]:
    """The Python standard library's own .py files (tests and site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _read_text(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def iter_documents(paths: list[str]):
    """Yields the text of every document under `paths` (files, directories, .jsonl with a 'text' field)."""
    for path in paths:
        if os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    yield from iter_documents([os.path.join(dirpath, name)])
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"--data {path}: line {line_no} is not a JSON object with a 'text' "
                                         "field") from None
                    yield text
        elif os.path.isfile(path):
            yield _read_text(path)
        else:
            raise FileNotFoundError(f"--data: {path!r} not found")


def tokenize_documents(docs, tokenizer) -> TokenStream:
    pieces, lengths = [], []
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    for text in docs:
        ids = tokenizer.encode(text)
        if len(ids) == 0:
            continue
        pieces += [ids, eos]
        lengths.append(len(ids) + 1)
    if not pieces:
        raise ValueError("--data: the given sources contain no text")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenStream(np.concatenate(pieces), offsets)


# --- the preprocessed, memory-mapped format: PREFIX.bin (token ids) + PREFIX.idx (header + document offsets)

def write_indexed(prefix: str, stream: TokenStream, vocab_size: int) -> None:
    code = 1 if vocab_size <= 65536 else 2
    tmp_bin, tmp_idx = prefix + ".bin.tmp", prefix + ".idx.tmp"
    stream.tokens.astype(_DTYPES[code]).tofile(tmp_bin)
    with open(tmp_idx, "wb") as fh:
        fh.write(_IDX_MAGIC + struct.pack("<IIQ", _IDX_VERSION, code, len(stream.doc_offsets) - 1))
        fh.write(stream.doc_offsets.astype(np.int64).tobytes())
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(tmp_idx, prefix + ".idx")


def read_indexed(prefix: str) -> TokenStream:
    with open(prefix + ".idx", "rb") as fh:
        header = fh.read(len(_IDX_MAGIC) + 16)
        if not header.startswith(_IDX_MAGIC):
            raise ValueError(f"--data {prefix}: {prefix}.idx is not an engine index file; write it with "
                             "python -m engine.data.preprocess")
        version, code, num_docs = struct.unpack("<IIQ", header[len(_IDX_MAGIC):])
        offsets = np.frombuffer(fh.read(8 * (num_docs + 1)), dtype=np.int64)
    if version != _IDX_VERSION or code not in _DTYPES or len(offsets) != num_docs + 1:
        raise ValueError(f"--data {prefix}: unsupported or truncated index file {prefix}.idx")
    tokens = np.memmap(prefix + ".bin", dtype=_DTYPES[code], mode="r")
    if len(tokens) != offsets[-1]:
        raise ValueError(f"--data {prefix}: {prefix}.bin holds {len(tokens)} tokens but the index expects "
                         f"{offsets[-1]}; the file is truncated, preprocess again")
    return TokenStream(tokens, offsets)


def is_indexed(path: str) -> bool:
    return os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx")


def load_stream(paths: list[str] | None, tokenizer) -> TokenStream:
    """The token stream of --data (built-in corpus when None). Several .bin/.idx prefixes are concatenated."""
    if not paths:
        return tokenize_documents(iter_documents(stdlib_sources()), tokenizer)
    streams = []
    text_paths = [p for p in paths if not is_indexed(p)]
    for p in paths:
        if is_indexed(p):
            streams.append(read_indexed(p))
    if text_paths:
        streams.append(tokenize_documents(iter_documents(text_paths), tokenizer))
    if len(streams) == 1:
        return streams[0]
    tokens = np.concatenate([np.asarray(s.tokens, dtype=np.int32) for s in streams])
    starts = np.cumsum([0] + [len(s.tokens) for s in streams[:-1]])
    offsets = np.concatenate([s.doc_offsets[:-1] + a for s, a in zip(streams, starts)] + [[len(tokens)]])
    return TokenStream(tokens, offsets.astype(np.int64))


class PackedDataset(torch.utils.data.Dataset):
    """Samples of seq_length + 1 consecutive tokens from tokens[start:end]."""

    def __init__(self, tokens: np.ndarray, seq_length: int):
        self.tokens, self.seq_length = tokens, seq_length
        self.num_samples = max((len(tokens) - 1) // seq_length, 0)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_length
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int64))


def train_valid_split(stream: TokenStream, seq_length: int, valid_fraction: float):
    """(train, valid) datasets: the last `valid_fraction` of the documents (at least one) is held out."""
    num_docs = len(stream.doc_offsets) - 1
    num_valid = 0 if valid_fraction == 0 else min(max(1, round(num_docs * valid_fraction)), num_docs - 1)
    cut = int(stream.doc_offsets[num_docs - num_valid])
    train = PackedDataset(stream.tokens[:cut], seq_length)
    valid = PackedDataset(stream.tokens[cut:], seq_length) if num_valid else None
    if len(train) == 0:
        raise ValueError(f"--data: only {cut} training tokens, fewer than one sample of --seq-length "
                         f"{seq_length} + 1; give more data or a shorter --seq-length")
    return train, valid
