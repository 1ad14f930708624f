"""Tokenizers, sources, packing, the .bin/.idx format and the validation split."""
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import torch
import pytest

from conftest import ROOT, SMALL, step_losses
from engine.data import datasets
from engine.data.datasets import (PackedDataset, iter_documents, load_stream, read_indexed, stdlib_sources,
                                  tokenize_documents, train_valid_split, write_indexed)
from engine.data.preprocess import preprocess
from engine.data.tokenizers import ByteTokenizer, build_tokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids.max() < 256 and tok.decode(ids) == "héllo ✓"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)


def test_builtin_corpus_is_the_stdlib_without_tests():
    files = stdlib_sources()
    assert len(files) > 300 and all(f.endswith(".py") for f in files)
    assert not any(f"{os.sep}test{os.sep}" in f or "site-packages" in f for f in files)
    assert 5e6 < sum(os.path.getsize(f) for f in files) < 5e7


def test_sources_and_packing(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "de"}) + "\n\n" + json.dumps({"text": "f"}) + "\n")
    sub = tmp_path / "dir"
    sub.mkdir()
    (sub / "x.md").write_text("gh")
    docs = list(iter_documents([str(tmp_path / "a.txt"), str(tmp_path / "docs.jsonl"), str(sub)]))
    assert docs == ["abc", "de", "f", "gh"]
    stream = tokenize_documents(docs, ByteTokenizer())
    eos = 257
    assert stream.tokens.tolist() == [97, 98, 99, eos, 100, 101, eos, 102, eos, 103, 104, eos]
    assert stream.doc_offsets.tolist() == [0, 4, 7, 9, 12]
    ds = PackedDataset(stream.tokens, seq_length=3)
    assert len(ds) == 3  # (12 - 1) // 3
    assert ds[0].tolist() == [97, 98, 99, eos] and ds[1].tolist() == [eos, 100, 101, eos]


def test_bad_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="line 2"):
        list(iter_documents([str(bad)]))


def test_validation_split_holds_out_the_last_documents():
    stream = tokenize_documents([f"document number {i} " * 5 for i in range(100)], ByteTokenizer())
    train, valid = train_valid_split(stream, seq_length=16, valid_fraction=0.1)
    cut = stream.doc_offsets[90]
    assert train.num_tokens == cut and valid.num_tokens == len(stream.tokens) - cut
    assert torch.equal(valid[0], torch.from_numpy(stream.tokens[cut:cut + 17].astype(np.int64)))
    assert torch.equal(train[len(train) - 1], torch.from_numpy(stream.tokens[(len(train) - 1) * 16:][:17]
                                                               .astype(np.int64)))
    with pytest.raises(IndexError):
        train[len(train)]
    assert train_valid_split(stream, 16, 0.0)[1] is None


def test_preprocess_round_trip_and_training_on_it(tmp_path, corpus, monkeypatch):
    prefix = str(tmp_path / "pre")
    proc = subprocess.run([sys.executable, "-m", "engine.data.preprocess", "--input", corpus,
                           "--output-prefix", prefix], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    indexed = read_indexed(prefix)
    direct = load_stream([corpus], ByteTokenizer())
    assert np.array_equal(np.asarray(indexed.tokens), direct.tokens)
    assert np.array_equal(indexed.doc_offsets, direct.doc_offsets)
    monkeypatch.chdir(tmp_path)
    from engine.training import main
    assert main(SMALL + ["--data", prefix, "--steps", "2", "--run-name", "bin"]) == 0
    assert main(SMALL + ["--data", corpus, "--steps", "2", "--run-name", "txt"]) == 0
    assert step_losses("runs/bin/metrics.jsonl") == step_losses("runs/txt/metrics.jsonl")


def test_truncated_bin_is_reported(tmp_path, corpus):
    from engine.data.datasets import write_indexed
    prefix = str(tmp_path / "p")
    write_indexed(prefix, load_stream([corpus], ByteTokenizer()), 259)
    with open(prefix + ".bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match="truncated"):
        read_indexed(prefix)


def test_tokenizer_json(tmp_path, corpus, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([os.path.join(corpus, f) for f in sorted(os.listdir(corpus))[:5]],
              trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"]))
    # saved with padding and truncation on (as tokenizers prepared for fine-tuning often are): the data path must
    # still get each document's own ids, whole
    tok.enable_padding(pad_id=0, pad_token="<unk>")
    tok.enable_truncation(max_length=64)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    hf = build_tokenizer(path)
    assert hf.eos_id == tok.token_to_id("</s>") and hf.vocab_size == tok.get_vocab_size()
    assert len(hf.encode(corpus_texts(corpus)[0])) > 64
    text = "def f(x):\n    return x"
    assert len(hf.encode(text)) < len(text) and hf.decode(hf.encode(text)) == text
    # the batched (multi-threaded) encoding the data path uses is the per-document one
    texts = corpus_texts(corpus)[:8]
    assert all(np.array_equal(a, hf.encode(t)) for a, t in zip(hf.encode_batch(texts), texts))
    from engine.data.datasets import encode_documents
    batched, single = (list(encode_documents(texts, hf, n)) for n in (1 << 20, 1))
    assert len(batched) == 8 and all(np.array_equal(a, b) for a, b in zip(batched, single))
    monkeypatch.chdir(tmp_path)
    from engine.training import main
    assert main(SMALL + ["--data", corpus, "--tokenizer", path, "--steps", "8", "--lr", "1e-2",
                         "--run-name", "bpe"]) == 0
    losses = step_losses("runs/bpe/metrics.jsonl")
    # untrained: ln(400) = 5.99, uniform over the BPE vocabulary (a model that does not learn stays within
    # ~0.05 of it); 8 steps end ~0.65 below it
    assert losses[1] == pytest.approx(math.log(hf.vocab_size), abs=0.15)
    assert (losses[7] + losses[8]) / 2 < losses[1] - 0.4, losses


# --- .parquet sources

def corpus_texts(corpus):
    return [open(os.path.join(corpus, f), "rb").read().decode("utf-8", errors="replace")
            for f in sorted(os.listdir(corpus))]


def write_parquet(path, columns, row_group_size=None):
    import pyarrow
    import pyarrow.parquet as pq
    pq.write_table(pyarrow.table(columns), path, row_group_size=row_group_size)


def test_parquet_file_and_directory_stream_in_record_batches(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    texts = [f"document {i}" for i in range(2500)]
    write_parquet(tmp_path / "one.parquet", {"id": list(range(2500)), "text": texts}, row_group_size=700)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "b.parquet", {"text": texts[1000:] + [None, ""]})
    write_parquet(shards / "a.parquet", {"text": texts[:1000]})
    batches = []
    real = datasets._iter_parquet
    monkeypatch.setattr(datasets, "_iter_parquet", lambda path, field: real(path, field, batch_rows=300))
    import pyarrow.parquet as pq
    real_iter = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real_iter(self, *args, **kwargs):
            batches.append((batch.num_rows, batch.schema.names))
            yield batch
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert list(iter_documents([str(tmp_path / "one.parquet")])) == texts
    assert len(batches) >= 9 and all(n <= 300 and names == ["text"] for n, names in batches)
    assert list(iter_documents([str(shards)])) == texts + [""]  # nulls are skipped, "" is an empty document


def test_parquet_memory_does_not_grow_with_the_file(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = str(tmp_path / "big.parquet")
    text = "x" * 2000
    table = pyarrow.table({"text": [f"{i} {text}" for i in range(8000)]})
    pq.write_table(table, path, row_group_size=250, compression="none", use_dictionary=False)  # 16 MB, 32 groups
    del table
    peak, count = 0, 0
    for _ in iter_documents([path]):
        count += 1
        if count % 100 == 0:
            peak = max(peak, pyarrow.total_allocated_bytes())
    assert count == 8000
    assert peak < 6e6, peak  # the batch being read (~4 MB); with pyarrow's pre-buffering the whole 16 MB file


def test_parquet_trains_and_matches_the_text_source(tmp_path, corpus, monkeypatch):
    pytest.importorskip("pyarrow")
    path = str(tmp_path / "corpus.parquet")
    write_parquet(path, {"text": corpus_texts(corpus)}, row_group_size=7)
    from_parquet = load_stream([path], ByteTokenizer())
    from_text = load_stream([corpus], ByteTokenizer())
    assert np.array_equal(from_parquet.tokens, from_text.tokens)
    assert np.array_equal(from_parquet.doc_offsets, from_text.doc_offsets)
    monkeypatch.chdir(tmp_path)
    from engine.training import main
    assert main(SMALL + ["--data", path, "--steps", "2", "--run-name", "pq"]) == 0
    assert len(step_losses("runs/pq/metrics.jsonl")) == 2


def test_parquet_without_a_text_column_names_the_file_and_its_columns(tmp_path):
    pytest.importorskip("pyarrow")
    path = str(tmp_path / "docs.parquet")
    write_parquet(path, {"id": [1, 2], "content": ["a", "b"]})
    with pytest.raises(ValueError, match=r"docs\.parquet: no 'text' column \(its columns: id, content\)"):
        list(iter_documents([path]))
    write_parquet(path, {"text": [1, 2]})
    with pytest.raises(ValueError, match="column 'text' holds int64, not strings"):
        list(iter_documents([path]))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable parquet file"):
        list(iter_documents([str(tmp_path / "junk.parquet")]))


def test_parquet_text_field_names_the_column(tmp_path):
    pytest.importorskip("pyarrow")
    path = str(tmp_path / "docs.parquet")
    write_parquet(path, {"id": [1, 2], "content": ["a", "b"]})
    assert list(iter_documents([path], text_field="content")) == ["a", "b"]
    with pytest.raises(ValueError, match="name the one holding the documents with --text-field"):
        list(iter_documents([path]))


def test_compressed_text_and_jsonl_read_as_the_plain_files(tmp_path, corpus, monkeypatch):
    """.gz and .zst text and .jsonl files give the documents of their plain versions; --text-field picks the field;
    a damaged or unsupported compressed file is one line."""
    import gzip
    zstandard = pytest.importorskip("zstandard")
    texts = [open(os.path.join(corpus, f), encoding="utf-8").read() for f in sorted(os.listdir(corpus))[:6]]
    lines = "".join(json.dumps({"id": i, "content": t}) + "\n" for i, t in enumerate(texts)).encode()
    (tmp_path / "docs.jsonl").write_bytes(lines)
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "one.txt.gz").write_bytes(gzip.compress(texts[0].encode()))
    (tmp_path / "one.py.zst").write_bytes(zstandard.ZstdCompressor().compress(texts[0].encode()))
    for name in ("docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst"):
        assert list(iter_documents([str(tmp_path / name)], text_field="content")) == texts, name
    assert list(iter_documents([str(tmp_path / "one.txt.gz"), str(tmp_path / "one.py.zst")])) == texts[:1] * 2
    with pytest.raises(ValueError, match=r"line 1 is not a JSON object with a string field 'text' \(--text-field"):
        list(iter_documents([str(tmp_path / "docs.jsonl.gz")]))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:-20])
    (tmp_path / "junk.txt.zst").write_bytes(b"not zstd at all")
    for name in ("cut.jsonl.gz", "junk.txt.zst"):
        with pytest.raises(ValueError, match=f"{name}: not a readable compressed file") as err:
            list(iter_documents([str(tmp_path / name)], text_field="content"))
        assert "\n" not in str(err.value)
    (tmp_path / "docs.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(ValueError, match="give the .parquet file itself"):
        list(iter_documents([str(tmp_path / "docs.parquet.gz")]))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(RuntimeError, match="pip install zstandard"):
        list(iter_documents([str(tmp_path / "one.py.zst")]))


def test_the_trainer_reads_a_compressed_jsonl_field(tmp_path, corpus, monkeypatch):
    """--text-field with a .jsonl.gz trains exactly as the same documents in plain text files, and preprocess
    takes the flag too."""
    import gzip
    texts = [open(os.path.join(corpus, f), encoding="utf-8").read() for f in sorted(os.listdir(corpus))]
    lines = "".join(json.dumps({"content": t}) + "\n" for t in texts).encode()
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    monkeypatch.chdir(tmp_path)
    from engine.training import main
    argv = SMALL + ["--steps", "2", "--valid-fraction", "0"]
    assert main(argv + ["--data", "docs.jsonl.gz", "--text-field", "content", "--run-name", "gz"]) == 0
    assert main(argv + ["--data", corpus, "--run-name", "txt"]) == 0
    assert step_losses("runs/gz/metrics.jsonl") == step_losses("runs/txt/metrics.jsonl")
    from engine.data.preprocess import main as preprocess_main
    assert preprocess_main(["--input", "docs.jsonl.gz", "--text-field", "content", "--output-prefix", "pre"]) == 0
    assert np.array_equal(np.asarray(read_indexed("pre").tokens), load_stream([corpus], ByteTokenizer()).tokens)


def test_parquet_without_pyarrow_says_pip_install(tmp_path, monkeypatch):
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(RuntimeError, match="pip install pyarrow") as err:
        list(iter_documents([str(path)]))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


# --- streaming preprocess and the version-2 header

def test_streaming_preprocess_is_byte_identical_to_the_in_memory_writer(tmp_path, corpus, monkeypatch):
    flushes = []
    real_flush = datasets.IndexedWriter._flush
    monkeypatch.setattr(datasets.IndexedWriter, "_flush", lambda self: flushes.append(1) or real_flush(self))
    docs, tokens = preprocess([corpus], str(tmp_path / "streamed"), ByteTokenizer(), chunk_tokens=4096)
    assert len(flushes) > 20
    write_indexed(str(tmp_path / "memory"), tokenize_documents(iter_documents([corpus]), ByteTokenizer()), 259)
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("streamed" + ext)).read_bytes() == (tmp_path / ("memory" + ext)).read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["corpus", "memory.bin", "memory.idx", "streamed.bin", "streamed.idx"]
    stream = read_indexed(str(tmp_path / "streamed"))
    assert (docs, tokens) == (len(stream.doc_offsets) - 1, len(stream.tokens))


def test_index_header_records_vocab_and_max_id(tmp_path, corpus):
    prefix = str(tmp_path / "p")
    direct = load_stream([corpus], ByteTokenizer())
    assert (direct.vocab_size, direct.max_id) == (259, 257)  # EOS is the largest id the byte tokenizer writes
    write_indexed(prefix, direct, 259)
    header = open(prefix + ".idx", "rb").read(42)
    assert header[:10] == b"ENGINEIDX\x00"
    assert struct.unpack("<IIQQQ", header[10:]) == (2, 1, len(direct.doc_offsets) - 1, 259, 257)
    stream = read_indexed(prefix)
    assert (stream.vocab_size, stream.max_id) == (259, 257)


def write_v1(prefix, stream):
    """The version-1 layout: magic, (version, dtype code, num_docs), offsets; no vocabulary or max id."""
    np.asarray(stream.tokens, dtype=np.uint16).tofile(prefix + ".bin")
    with open(prefix + ".idx", "wb") as fh:
        fh.write(b"ENGINEIDX\x00" + struct.pack("<IIQ", 1, 1, len(stream.doc_offsets) - 1))
        fh.write(stream.doc_offsets.astype(np.int64).tobytes())


def test_version_1_index_still_reads_and_merging_keeps_what_is_known(tmp_path, corpus):
    tok = ByteTokenizer()
    stream = load_stream([corpus], tok)
    write_v1(str(tmp_path / "old"), stream)
    old = read_indexed(str(tmp_path / "old"))
    assert np.array_equal(np.asarray(old.tokens), stream.tokens) and np.array_equal(old.doc_offsets,
                                                                                    stream.doc_offsets)
    assert (old.vocab_size, old.max_id) == (None, None)
    small = tokenize_documents(["ab"], tok)
    write_indexed(str(tmp_path / "new"), small, 300)  # recorded as written with a larger vocabulary
    merged = load_stream([str(tmp_path / "old"), str(tmp_path / "new")], tok)
    assert (merged.vocab_size, merged.max_id) == (300, 257)  # old's max id is unknown: read at the merge
    assert len(merged.tokens) == len(stream.tokens) + 3
    assert np.array_equal(merged.tokens[:], np.concatenate([stream.tokens, small.tokens]))
    assert merged.doc_offsets.tolist()[-2:] == [len(stream.tokens), len(stream.tokens) + 3]
    merged = load_stream([str(tmp_path / "new"), str(tmp_path / "new"), corpus], tok)
    assert (merged.vocab_size, merged.max_id) == (300, 257)
    assert merged.doc_offsets.tolist()[:3] == [0, 3, 6] and merged.doc_offsets[-1] == len(merged.tokens)
    # Read through a view (the memory-mapped parts are not copied): samples across part boundaries as if flat.
    assert isinstance(merged.tokens.parts[0], np.memmap)
    flat = np.concatenate([small.tokens, small.tokens, stream.tokens])
    chained, packed = PackedDataset(merged.tokens, 7), PackedDataset(flat, 7)
    assert len(chained) == len(packed) and all(torch.equal(chained[i], packed[i]) for i in range(len(packed)))


def test_a_token_id_that_does_not_fit_the_bin_is_an_error(tmp_path):
    stream = datasets.TokenStream(np.array([5, 70000, 257], dtype=np.int32), np.array([0, 3]))
    with pytest.raises(ValueError, match="token id 70000 does not fit the uint16 .bin"):
        write_indexed(str(tmp_path / "p"), stream, 259)
    assert os.listdir(tmp_path) == []


# --- clear failures in the read path

def test_truncated_idx_is_reported(tmp_path, corpus):
    prefix = str(tmp_path / "p")
    write_indexed(prefix, load_stream([corpus], ByteTokenizer()), 259)
    full = open(prefix + ".idx", "rb").read()
    for size in (len(full) - 8, 60, 30, 5, 0):
        with open(prefix + ".idx", "wb") as fh:
            fh.write(full[:size])
        with pytest.raises(ValueError, match=r"p\.idx is truncated") as err:
            read_indexed(prefix)
        assert "\n" not in str(err.value)


def test_mismatched_bin_and_idx_are_called_mismatched(tmp_path, corpus):
    tok = ByteTokenizer()
    texts = corpus_texts(corpus)
    big, small = str(tmp_path / "big"), str(tmp_path / "small")
    write_indexed(big, tokenize_documents(texts, tok), 259)
    write_indexed(small, tokenize_documents(texts[20:] + ["x"], tok), 259)
    # The .bin shorter than the index expects (which alone would look truncated), then longer.
    for idx_of, bin_of in ((big, small), (small, big)):
        pair = str(tmp_path / "pair")
        shutil.copy(idx_of + ".idx", pair + ".idx")
        shutil.copy(bin_of + ".bin", pair + ".bin")
        with pytest.raises(ValueError, match="mismatched") as err:
            read_indexed(pair)
        assert "truncated" not in str(err.value)


def test_corrupt_or_unsupported_header_says_so(tmp_path, corpus):
    prefix = str(tmp_path / "p")
    write_indexed(prefix, load_stream([corpus], ByteTokenizer()), 259)
    good = open(prefix + ".idx", "rb").read()

    def patched(offset, value):
        with open(prefix + ".idx", "wb") as fh:
            fh.write(good[:offset] + struct.pack("<I", value) + good[offset + 4:])
    patched(10, 7)
    with pytest.raises(ValueError, match="unsupported format version 7"):
        read_indexed(prefix)
    patched(14, 9)
    with pytest.raises(ValueError, match=r"corrupt header \(token type code 9\)"):
        read_indexed(prefix)
    with open(prefix + ".idx", "wb") as fh:
        fh.write(good[:18] + struct.pack("<Q", 2 ** 62) + good[26:])  # a garbage document count
    with pytest.raises(ValueError, match="truncated: its header lists 4611686018427387904 documents"):
        read_indexed(prefix)
    with open(prefix + ".idx", "wb") as fh:
        fh.write(good + b"\x00")
    with pytest.raises(ValueError, match="corrupt: data after the"):
        read_indexed(prefix)
    with open(prefix + ".idx", "wb") as fh:
        fh.write(good[:42] + struct.pack("<q", 5) + good[50:])
    with pytest.raises(ValueError, match="corrupt: its document offsets"):
        read_indexed(prefix)
    with open(prefix + ".idx", "wb") as fh:
        fh.write(b"something else entirely" * 4)
    with pytest.raises(ValueError, match="not an engine index file"):
        read_indexed(prefix)


@pytest.mark.parametrize("content", ["nul", "invalid_utf8"])
def test_a_binary_file_is_not_read_as_text(tmp_path, content):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    if content == "invalid_utf8":
        data = bytes(b | 0x80 for b in data)  # high bytes only: no NULs, almost never valid UTF-8
    path = tmp_path / "blob.dat"
    path.write_bytes(data)
    why = "NUL bytes" if content == "nul" else "mostly invalid UTF-8"
    with pytest.raises(ValueError, match=rf"blob\.dat: not a text file \({why}"):
        list(iter_documents([str(tmp_path)]))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Grüße aus Köln, schönes Wetter. ".encode("latin-1") * 100)
    assert list(iter_documents([str(latin1)]))[0].startswith("Gr")  # a few bad bytes are still text


def test_data_given_as_the_bin_or_idx_file_asks_for_the_prefix(tmp_path, corpus, capsys):
    prefix = str(tmp_path / "corpus")
    write_indexed(prefix, load_stream([corpus], ByteTokenizer()), 259)
    for ext in (".bin", ".idx"):
        with pytest.raises(ValueError, match=f"pass the prefix {prefix} without .bin/.idx"):
            load_stream([prefix + ext], ByteTokenizer())
    os.remove(prefix + ".idx")
    with pytest.raises(ValueError, match=r"corpus\.idx is missing"):
        load_stream([prefix + ".bin"], ByteTokenizer())
    write_indexed(prefix, load_stream([corpus], ByteTokenizer()), 259)
    from engine.training import main
    with pytest.raises(SystemExit) as exit_:
        main(SMALL + ["--data", prefix + ".bin", "--steps", "1"])
    assert exit_.value.code == 2
    assert f"error: --data {prefix}.bin: pass the prefix {prefix} without .bin/.idx" in capsys.readouterr().err


def test_preprocess_cli_errors_are_one_line_and_leave_nothing_behind(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blob = tmp_path / "blob.dat"
    blob.write_bytes(b"\x00\x01" * 100)
    env = dict(os.environ, PYTHONPATH=ROOT)
    for args, message in ((["--input", str(empty)], "the given sources contain no text"),
                          (["--input", str(blob)], "blob.dat: not a text file"),
                          (["--input", str(empty), "--output-prefix", str(tmp_path / "x.bin")],
                           "pass the prefix"),
                          (["--input", str(empty), "--output-prefix", str(tmp_path / "no" / "x")],
                           "does not exist")):
        if "--output-prefix" not in args:
            args = args + ["--output-prefix", str(tmp_path / "out")]
        proc = subprocess.run([sys.executable, "-m", "engine.data.preprocess"] + args, capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["blob.dat", "empty.txt"]
