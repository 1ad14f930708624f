"""Documents -> one packed token stream -> fixed-length samples.

Every source (text files, directories, .jsonl, .parquet, the built-in corpus, a preprocessed .bin/.idx pair)
becomes a flat stream of token ids in which each document is followed by EOS, plus the offsets where documents
start.
A sample is the window of `seq_length + 1` tokens starting at `i * seq_length` (inputs are the first
seq_length tokens, targets the last), so packing never wastes a token and samples cross document boundaries
exactly as Megatron's GPT dataset does. The last `valid_fraction` of the documents is held out for evaluation.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import socket
import struct
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
import torch

# PREFIX.idx, little-endian: magic, then (version u32, token dtype code u32, num_docs u64); version 2 adds
# (vocab_size u64, max_id u64); then num_docs + 1 int64 document offsets into PREFIX.bin.
_IDX_MAGIC = b"ENGINEIDX\x00"
_IDX_VERSION = 2
_HEADER = struct.Struct("<IIQ")
_HEADER_V2 = struct.Struct("<QQ")
_DTYPES = {1: np.uint16, 2: np.int32}
_SNIFF_BYTES = 8192


@dataclass
class TokenStream:
    tokens: np.ndarray      # flat token ids, EOS after every document (may be a read-only memmap)
    doc_offsets: np.ndarray  # int64 [num_docs + 1]: where each document starts in `tokens`
    vocab_size: int | None = None  # the tokenizer's vocabulary size, None when unknown (version-1 .idx)
    max_id: int | None = None      # the largest token id in `tokens`, None when unknown


def stdlib_sources() -> list[str]:
    """The Python standard library's own .py files (tests and site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _open(path: str):
    """The file as a binary stream, decompressed when it ends in .gz or .zst (the latter needs zstandard)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise RuntimeError(f"--data {path}: reading .zst files needs the 'zstandard' package; "
                               "pip install zstandard") from None
        return io.BufferedReader(zstandard.open(path, "rb"))  # (its reader has no readline)
    return open(path, "rb")


def _damaged() -> tuple:
    """The exceptions a damaged compressed file raises while it is read."""
    errors = (EOFError, gzip.BadGzipFile, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)


def _kind(path: str) -> str:
    """'jsonl', 'parquet' or 'text', from the name without a compression suffix."""
    name = path.removesuffix(".gz").removesuffix(".zst")
    return "jsonl" if name.endswith(".jsonl") else "parquet" if name.endswith(".parquet") else "text"


def _read_text(path: str) -> str:
    try:
        with _open(path) as fh:
            data = fh.read()
    except _damaged() as exc:
        raise ValueError(f"--data {path}: not a readable compressed file ({exc})") from None
    head = data[:_SNIFF_BYTES]
    # Bytes dropped by a lenient decode are the invalid ones; a cut multi-byte character at the end of the
    # sample costs at most 3 of them.
    invalid = len(head) - len(head.decode("utf-8", errors="ignore").encode("utf-8"))
    if b"\x00" in head or invalid > 0.3 * len(head):
        why = "NUL bytes" if b"\x00" in head else "mostly invalid UTF-8"
        raise ValueError(f"--data {path}: not a text file ({why} in its first 8 KiB); give text, .jsonl or "
                         ".parquet files, or the PREFIX of a preprocessed .bin/.idx pair")
    return data.decode("utf-8", errors="replace")


def _iter_jsonl(path: str, field: str = "text"):
    with _open(path) as fh:
        try:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line.decode("utf-8"))[field]
                    if not isinstance(text, str):
                        raise TypeError
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"--data {path}: line {line_no} is not a JSON object with a string field "
                                     f"{field!r} (--text-field names it)") from None
                yield text
        except _damaged() as exc:
            raise ValueError(f"--data {path}: not a readable compressed file ({exc})") from None


def _iter_parquet(path: str, field: str = "text", batch_rows: int = 1024):
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(f"--data {path}: reading .parquet files needs the 'pyarrow' package; "
                           "pip install pyarrow") from None
    try:
        # pre_buffer (the default) keeps every row group's buffered bytes until the file is closed: memory
        # would grow with the file.
        pf = pq.ParquetFile(path, pre_buffer=False)
    except (pyarrow.ArrowException, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--data {path}: not a readable parquet file ({first})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise ValueError(f"--data {path}: no {field!r} column (its columns: {', '.join(schema.names)}); name the "
                         "one holding the documents with --text-field")
    kind = schema.field(field).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise ValueError(f"--data {path}: column {field!r} holds {kind}, not strings; store the documents as "
                         "strings")
    # Small record batches: rows are whole documents, so the default 64Ki rows could be gigabytes.
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[field], use_threads=False):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def list_files(paths: list[str]) -> list[str]:
    """The files of `paths` in reading order: each given file, and each directory's files walked in sorted order
    (hidden files and directories, whose names start with '.', left out)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"--data: {path!r} not found")
    return files


def iter_documents(paths: list[str], text_field: str = "text"):
    """Yields the text of every document in list_files(paths): text files, .jsonl files with a string field
    `text_field`, .parquet files with a string column `text_field` (needs pyarrow). Text and .jsonl files may be
    compressed (.gz; .zst with the zstandard package)."""
    for path in list_files(paths):
        kind = _kind(path)
        if kind == "jsonl":
            yield from _iter_jsonl(path, text_field)
        elif kind == "parquet":
            if path.endswith((".gz", ".zst")):
                raise ValueError(f"--data {path}: parquet compresses its own pages; give the .parquet file itself")
            yield from _iter_parquet(path, text_field)
        else:
            yield _read_text(path)


def _batches(docs, batch_chars: int):
    """Lists of consecutive documents, each list ending once it holds batch_chars characters."""
    batch, chars = [], 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_documents(docs, tokenizer, batch_chars: int = 1 << 20):
    """The token ids of each non-empty document followed by EOS (int32 arrays), in order. Documents reach the
    tokenizer's encode_batch about batch_chars characters at a time (a tokenizer.json encodes a batch on every
    core); memory holds one batch."""
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    for batch in _batches(docs, batch_chars):
        for ids in tokenizer.encode_batch(batch):
            if len(ids):
                yield np.concatenate([np.asarray(ids, dtype=np.int32), eos])


def tokenize_documents(docs, tokenizer) -> TokenStream:
    """All documents as one in-memory stream (the trainer's path for text --data)."""
    pieces = list(encode_documents(docs, tokenizer))
    if not pieces:
        raise ValueError("--data: the given sources contain no text")
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    tokens = np.concatenate(pieces)
    return TokenStream(tokens, offsets, vocab_size=tokenizer.vocab_size, max_id=int(tokens.max()))


# --- the preprocessed, memory-mapped format: PREFIX.bin (token ids) + PREFIX.idx (header + document offsets)

class WriteError(OSError):
    """Writing a .bin/.idx pair failed (a full disk, a quota): the callers name the flag that chose the place."""


def temporary_suffix() -> str:
    """A writer's own temporary-file suffix (host and process): two writers of one prefix never share a file."""
    return f".tmp-{socket.gethostname()}-{os.getpid()}"


class IndexedWriter:
    """Writes PREFIX.bin/.idx one document at a time in bounded memory: token ids and offsets are buffered up to
    `chunk_tokens` entries, then appended to temporary files of this writer's own (PREFIX.bin.tmp-HOST-PID, and the
    .idx's after a placeholder header, filled in by `finish` once the counts are known). `finish` renames the .bin,
    then the .idx into place; leaving the `with` block without it (an error) deletes the temporary files. A failed
    write raises WriteError.

        with IndexedWriter(prefix, tokenizer.vocab_size) as writer:
            for ids in encode_documents(docs, tokenizer):
                writer.add(ids)
            writer.finish()
    """

    def __init__(self, prefix: str, vocab_size: int, chunk_tokens: int = 1 << 20):
        self.prefix, self.vocab_size, self.chunk_tokens = prefix, int(vocab_size), chunk_tokens
        self.code = 1 if self.vocab_size <= 65536 else 2
        self.num_docs = self.num_tokens = 0
        self.max_id = -1
        self._tokens, self._offsets, self._pending = [], [], 0
        self._tmp_bin, self._tmp_idx = (prefix + ext + temporary_suffix() for ext in (".bin", ".idx"))
        self._done = False
        try:
            with self._writing():
                self._bin = open(self._tmp_bin, "wb")
                self._idx = open(self._tmp_idx, "wb")
                self._idx.write(bytes(len(_IDX_MAGIC) + _HEADER.size + _HEADER_V2.size))
                self._idx.write(np.zeros(1, dtype=np.int64).tobytes())
        except WriteError:
            self.__exit__()
            raise

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as exc:
            raise WriteError(f"writing {self.prefix}.bin/.idx failed ({exc.strerror or exc}); free space there or "
                             "write elsewhere") from None

    def add(self, ids: np.ndarray) -> None:
        """One document's token ids, its EOS included."""
        self._tokens.append(ids)
        self._pending += len(ids)
        self.num_tokens += len(ids)
        self.num_docs += 1
        self._offsets.append(self.num_tokens)
        if self._pending >= self.chunk_tokens or len(self._offsets) >= self.chunk_tokens:
            with self._writing():
                self._flush()

    def _flush(self) -> None:
        if self._tokens:
            chunk = np.concatenate(self._tokens)
            if len(chunk):
                lo, hi = int(chunk.min()), int(chunk.max())
                if lo < 0 or hi >= np.iinfo(_DTYPES[self.code]).max + 1:
                    raise ValueError(f"{self.prefix}: token id {hi if lo >= 0 else lo} does not fit the "
                                     f"{np.dtype(_DTYPES[self.code]).name} .bin chosen for vocabulary size "
                                     f"{self.vocab_size}; the tokenizer's vocab_size is wrong")
                self.max_id = max(self.max_id, hi)
                chunk.astype(_DTYPES[self.code], copy=False).tofile(self._bin)
        if self._offsets:
            np.asarray(self._offsets, dtype=np.int64).tofile(self._idx)
        self._tokens, self._offsets, self._pending = [], [], 0

    def finish(self) -> None:
        with self._writing():
            self._flush()
            if self.num_tokens == 0:
                raise ValueError("the given sources contain no text")
            self._idx.seek(0)
            self._idx.write(_IDX_MAGIC + _HEADER.pack(_IDX_VERSION, self.code, self.num_docs)
                            + _HEADER_V2.pack(self.vocab_size, self.max_id))
            self._bin.close()
            self._idx.close()
            os.replace(self._tmp_bin, self.prefix + ".bin")
            os.replace(self._tmp_idx, self.prefix + ".idx")
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            for fh in (getattr(self, "_bin", None), getattr(self, "_idx", None)):
                if fh is not None:
                    fh.close()
            for path in (self._tmp_bin, self._tmp_idx):
                if os.path.exists(path):
                    os.remove(path)


def write_indexed(prefix: str, stream: TokenStream, vocab_size: int | None = None) -> None:
    vocab_size = vocab_size if vocab_size is not None else stream.vocab_size
    if vocab_size is None:
        raise ValueError(f"{prefix}: write_indexed needs the vocabulary size (the stream does not record it)")
    offsets = stream.doc_offsets
    with IndexedWriter(prefix, vocab_size) as writer:
        for i in range(len(offsets) - 1):
            writer.add(stream.tokens[offsets[i]:offsets[i + 1]])
        writer.finish()


def _index_error(prefix: str, what: str) -> ValueError:
    return ValueError(f"--data {prefix}: {what}; preprocess again (python -m engine.data.preprocess)")


def _read_index(prefix: str):
    """(dtype code, offsets, vocab_size, max_id) from PREFIX.idx, with a one-line error for a bad file."""
    path = prefix + ".idx"
    with open(path, "rb") as fh:
        data = fh.read(len(_IDX_MAGIC) + _HEADER.size)
        if not data.startswith(_IDX_MAGIC):
            if len(data) < len(_IDX_MAGIC) and _IDX_MAGIC.startswith(data):
                raise _index_error(prefix, f"{path} is truncated ({len(data)} bytes, inside its header)")
            raise ValueError(f"--data {prefix}: {path} is not an engine index file; write it with "
                             "python -m engine.data.preprocess")
        if len(data) < len(_IDX_MAGIC) + _HEADER.size:
            raise _index_error(prefix, f"{path} is truncated ({len(data)} bytes, inside its header)")
        version, code, num_docs = _HEADER.unpack(data[len(_IDX_MAGIC):])
        if version not in (1, 2):
            raise _index_error(prefix, f"{path} has unsupported format version {version} (this engine reads "
                                       f"1 and 2)")
        if code not in _DTYPES:
            raise _index_error(prefix, f"{path} has a corrupt header (token type code {code})")
        vocab_size = max_id = None
        if version >= 2:
            extra = fh.read(_HEADER_V2.size)
            if len(extra) < _HEADER_V2.size:
                raise _index_error(prefix, f"{path} is truncated (inside its header)")
            vocab_size, max_id = _HEADER_V2.unpack(extra)
        held = os.fstat(fh.fileno()).st_size - fh.tell()  # checked before reading: num_docs may be garbage
        if held < 8 * (num_docs + 1):
            raise _index_error(prefix, f"{path} is truncated: its header lists {num_docs} documents but it holds "
                                       f"{held // 8} of their {num_docs + 1} offsets")
        if held > 8 * (num_docs + 1):
            raise _index_error(prefix, f"{path} is corrupt: data after the {num_docs + 1} offsets its header "
                                       "lists")
        offsets = np.frombuffer(fh.read(held), dtype=np.int64)
    if num_docs == 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise _index_error(prefix, f"{path} is corrupt: its document offsets are not increasing from 0")
    return code, offsets, vocab_size, max_id


def read_indexed(prefix: str) -> TokenStream:
    code, offsets, vocab_size, max_id = _read_index(prefix)
    dtype = np.dtype(_DTYPES[code])
    size = os.path.getsize(prefix + ".bin")
    length = size // dtype.itemsize
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(length,)) if length else \
        np.zeros(0, dtype=dtype)
    expected = int(offsets[-1])
    if length == expected and size % dtype.itemsize == 0:
        return TokenStream(tokens, offsets, vocab_size, max_id)
    # Every document ends with the same EOS. If the document ends that fall inside the .bin are not all one
    # token, the .idx describes other data: a mismatched pair. Otherwise a shorter .bin is a cut-off write.
    ends = offsets[1:][(offsets[1:] > 0) & (offsets[1:] <= length)] - 1
    ends = ends[np.linspace(0, len(ends) - 1, min(len(ends), 1000)).astype(np.int64)] if len(ends) else ends
    consistent = len(np.unique(np.asarray(tokens[ends]))) <= 1
    if consistent and size < expected * dtype.itemsize:
        raise _index_error(prefix, f"{prefix}.bin is truncated: it holds {length} tokens but {prefix}.idx "
                                   f"expects {expected}")
    raise _index_error(prefix, f"{prefix}.bin and {prefix}.idx are mismatched: the index describes "
                               f"{len(offsets) - 1} documents and {expected} tokens, which are not what the .bin "
                               f"({length} tokens) holds; they come from different preprocess runs")


def is_indexed(path: str) -> bool:
    return os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx")


def _check_not_half_a_pair(path: str) -> None:
    stem, ext = os.path.splitext(path)
    if ext in (".bin", ".idx") and os.path.isfile(path):
        if is_indexed(stem):
            raise ValueError(f"--data {path}: pass the prefix {stem} without .bin/.idx")
        other = stem + (".idx" if ext == ".bin" else ".bin")
        raise ValueError(f"--data {path}: {other} is missing; a preprocessed corpus is the pair PREFIX.bin + "
                         "PREFIX.idx, passed as PREFIX")


class ChainedTokens:
    """Several token arrays (memory maps, say) read as one without copying them: a slice copies only the
    tokens it covers."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, step = window.indices(len(self))
        if step != 1:
            raise IndexError("ChainedTokens: only contiguous slices")
        pieces = []
        part = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            begin = int(self.ends[part]) - len(self.parts[part])
            end = min(stop, int(self.ends[part]))
            pieces.append(np.asarray(self.parts[part][start - begin:end - begin], dtype=np.int32))
            start, part = end, part + 1
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def _merge(streams: list[TokenStream]) -> TokenStream:
    """The streams one after another, as a ChainedTokens view (a big memory-mapped corpus is not loaded)."""
    tokens = ChainedTokens([s.tokens for s in streams])
    starts = np.cumsum([0] + [len(s.tokens) for s in streams[:-1]])
    offsets = np.concatenate([s.doc_offsets[:-1] + a for s, a in zip(streams, starts)] + [[len(tokens)]])
    vocabs = [s.vocab_size for s in streams if s.vocab_size is not None]
    # A version-1 index does not record its largest id: read it here, once.
    max_id = max(s.max_id if s.max_id is not None else int(np.max(s.tokens)) for s in streams)
    return TokenStream(tokens, offsets.astype(np.int64), vocab_size=max(vocabs) if vocabs else None, max_id=max_id)


def load_stream(paths: list[str] | None, tokenizer, cache_dir: str | None = None,
                text_field: str = "text") -> TokenStream:
    """The token stream of --data (the built-in corpus when None). Several sources are read one after another.
    Text is tokenized in memory, or with `cache_dir` once into a memory-mapped .bin/.idx there that every process
    and later run reads (engine.data.cache)."""
    from engine.data.cache import cached_prefix  # the cache writes with this module's IndexedWriter

    def tokenized(text_paths: list[str], name: str | None = None) -> TokenStream:
        if cache_dir is None:
            return tokenize_documents(iter_documents(text_paths, text_field), tokenizer)
        prefix = cached_prefix(text_paths, tokenizer, cache_dir, text_field, name)
        try:
            return read_indexed(prefix)
        except ValueError:
            raise ValueError(f"--data-cache: {prefix}.bin/.idx is damaged (cut short or edited); delete them to "
                             "tokenize again, or use --data-cache none") from None

    if not paths:
        return tokenized(stdlib_sources(), "the built-in corpus")
    streams = []
    text_paths = []
    for p in paths:
        if is_indexed(p):
            streams.append(read_indexed(p))
        else:
            _check_not_half_a_pair(p)
            text_paths.append(p)
    if text_paths:
        streams.append(tokenized(text_paths))
    return streams[0] if len(streams) == 1 else _merge(streams)


class PackedDataset(torch.utils.data.Dataset):
    """Samples of seq_length + 1 consecutive tokens from tokens[start:end] (an array, memory map or
    ChainedTokens; only the sample being read is copied)."""

    def __init__(self, tokens, seq_length: int, start: int = 0, end: int | None = None):
        if not 0 <= start <= (len(tokens) if end is None else end) <= len(tokens):
            raise ValueError(f"PackedDataset: [{start}, {end}) is not a range of the {len(tokens)} tokens")
        self.tokens, self.seq_length, self.start = tokens, seq_length, start
        self.num_tokens = (len(tokens) if end is None else end) - start
        self.num_samples = max((self.num_tokens - 1) // seq_length, 0)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} of {self.num_samples}")
        start = self.start + i * self.seq_length
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_length + 1], dtype=np.int64))


def train_valid_split(stream: TokenStream, seq_length: int, valid_fraction: float):
    """(train, valid) datasets: the last `valid_fraction` of the documents (at least one) is held out."""
    num_docs = len(stream.doc_offsets) - 1
    num_valid = 0 if valid_fraction == 0 else min(max(1, round(num_docs * valid_fraction)), num_docs - 1)
    cut = int(stream.doc_offsets[num_docs - num_valid])
    train = PackedDataset(stream.tokens, seq_length, 0, cut)
    valid = PackedDataset(stream.tokens, seq_length, cut, len(stream.tokens)) if num_valid else None
    if len(train) == 0:
        raise ValueError(f"--data: only {cut} training tokens, fewer than one sample of --seq-length "
                         f"{seq_length} + 1; give more data or a shorter --seq-length")
    return train, valid
