"""Text --data tokenized once into the cache (engine.data.cache): the same stream as tokenizing in memory, reused
while nothing changes, written by one process while the others wait, failures shared, the trainer's default."""
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import ROOT, SMALL, step_losses
from engine.data.cache import cache_key, cached_prefix
from engine.data.datasets import list_files, load_stream, read_indexed
from engine.data.tokenizers import ByteTokenizer

# A child process tokenizing the files of argv[2] into the cache argv[1], slowly (so the others have to wait),
# printing the prefix it got or the error it raised. The children start together: each waits until all argv[4] have
# written their file into the directory argv[3]. argv[5] == "nolock": as on a file system whose locks do not reach
# the other nodes.
CHILD = """
import fcntl, os, sys, time
barrier, n = sys.argv[3], int(sys.argv[4])
if sys.argv[5] == "nolock":
    fcntl.flock = lambda fd, op: None
from engine.data import cache
from engine.data.cache import cached_prefix
from engine.data.tokenizers import ByteTokenizer

class Slow(ByteTokenizer):
    def encode(self, text):
        time.sleep(0.02)
        return super().encode(text)

cache.ANNOUNCE_AFTER_S = 0  # (the trainer says it after 2 s)
# One document per encode_batch call: a bad line is met after the slow documents before it, as in a big file.
import functools
from engine.data import datasets, preprocess
preprocess.encode_documents = functools.partial(datasets.encode_documents, batch_chars=1)
open(os.path.join(barrier, str(os.getpid())), "w").close()
deadline = time.time() + 60
while len(os.listdir(barrier)) < n and time.time() < deadline:
    time.sleep(0.01)
try:
    print("prefix", cached_prefix([sys.argv[2]], Slow(), sys.argv[1]))
except ValueError as exc:
    print("error", exc)
"""


def test_cached_stream_equals_the_in_memory_one_and_is_reused(tmp_path, corpus):
    cache = str(tmp_path / "cache")
    tok = ByteTokenizer()
    direct = load_stream([corpus], tok)
    cached = load_stream([corpus], tok, cache)
    assert np.array_equal(np.asarray(cached.tokens), direct.tokens)
    assert np.array_equal(cached.doc_offsets, direct.doc_offsets)
    assert (cached.vocab_size, cached.max_id) == (259, int(direct.tokens.max()))
    prefix = cached_prefix([corpus], tok, cache)
    written = os.stat(prefix + ".bin").st_mtime_ns
    load_stream([corpus], tok, cache)
    assert os.stat(prefix + ".bin").st_mtime_ns == written
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(prefix) + ext
                                               for ext in (".bin", ".idx", ".json", ".lock"))


def test_the_key_follows_the_files_and_the_tokenizer(tmp_path, corpus):
    tok = ByteTokenizer()
    files = list_files([corpus])
    key = cache_key(files, tok)
    assert cache_key(list_files([corpus]), tok) == key
    assert cache_key(files[::-1], tok) != key  # order is part of the stream

    class Other(ByteTokenizer):
        fingerprint = "other"
    assert cache_key(files, Other()) != key
    with open(files[3], "a") as fh:
        fh.write("# one more line\n")
    assert cache_key(files, tok) != key
    os.utime(files[3], ns=(0, 0))
    changed = cache_key(files, tok)
    os.utime(files[3])
    assert cache_key(files, tok) != changed  # touched: tokenized again
    (tmp_path / "corpus" / "new.txt").write_text("a new document")
    assert cache_key(list_files([corpus]), tok) != cache_key(files, tok)


def test_hidden_files_in_a_directory_are_not_read(tmp_path):
    (tmp_path / "a.txt").write_text("kept")
    (tmp_path / ".notes.txt").write_text("hidden file")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("hidden directory")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("kept too")
    assert list_files([str(tmp_path)]) == [str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.txt")]
    assert list_files([str(tmp_path / ".notes.txt")]) == [str(tmp_path / ".notes.txt")]  # named: read


def _run_children(n, cache, source, lock=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    barrier = tempfile.mkdtemp()
    argv = [sys.executable, "-c", CHILD, cache, source, barrier, str(n), "lock" if lock else "nolock"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    return [out.strip() for out, _ in outs], "".join(err for _, err in outs)


def test_one_process_tokenizes_while_the_others_wait(tmp_path, corpus):
    """Four processes at once: one tokenizes, three wait and reuse it - also past the failure an earlier run left
    (the writer removes it when it starts) and the temporary files a killed writer left (old ones removed)."""
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    prefix = os.path.join(cache, cache_key(list_files([corpus]), ByteTokenizer()))
    with open(prefix + ".failed", "w") as fh:
        fh.write("an earlier run's failure")
    for name, age in (("killed", 3600), ("live", 0)):
        path = f"{prefix}.bin.tmp-otherhost-{name}"
        open(path, "w").close()
        os.utime(path, (time.time() - age, time.time() - age))
    results, err = _run_children(4, cache, corpus)
    assert err.count("tokenizing --data") == 1, err
    assert len(set(results)) == 1 and results[0] == "prefix " + prefix, results
    stream = read_indexed(prefix)
    assert np.array_equal(np.asarray(stream.tokens), load_stream([corpus], ByteTokenizer()).tokens)
    assert sorted(f for f in os.listdir(cache) if "tmp" in f or "failed" in f) == [
        os.path.basename(prefix) + ".bin.tmp-otherhost-live"]


def test_writers_the_lock_does_not_keep_apart_do_not_corrupt_the_cache(tmp_path, corpus):
    """Where flock does not reach other nodes every process writes: each into files of its own, renamed into
    place whole, so whichever rename lands last the pair is right."""
    cache = str(tmp_path / "cache")
    results, err = _run_children(3, cache, corpus, lock=False)
    assert err.count("tokenizing --data") == 3, err
    assert len(set(results)) == 1 and results[0].startswith("prefix "), results
    stream = read_indexed(results[0].split(" ", 1)[1])
    direct = load_stream([corpus], ByteTokenizer())
    assert np.array_equal(np.asarray(stream.tokens), direct.tokens)
    assert np.array_equal(stream.doc_offsets, direct.doc_offsets)
    assert not [f for f in os.listdir(cache) if "tmp" in f]


def test_a_failure_is_raised_by_the_waiting_processes_without_tokenizing_again(tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(40)) + "not json\n")
    cache = str(tmp_path / "cache")
    results, err = _run_children(3, cache, str(bad))
    assert err.count("tokenizing --data") == 1, err
    assert results == ["error --data " + str(bad) + ": line 41 is not a JSON object with a string field 'text' "
                       "(--text-field names it)"] * 3
    assert not [f for f in os.listdir(cache) if f.endswith((".bin", ".idx")) or ".tmp" in f]
    # A later run (nobody tokenizing, so no wait) does not take the old failure for its own: it tries again.
    failure = os.path.join(cache, cache_key([str(bad)], ByteTokenizer())) + ".failed"
    with open(failure, "w") as fh:
        fh.write("an earlier run's failure")
    with pytest.raises(ValueError, match="line 41"):
        cached_prefix([str(bad)], ByteTokenizer(), cache)


def test_a_full_disk_names_the_cache_and_the_fix(tmp_path, corpus, monkeypatch):
    import errno
    from engine.data.datasets import IndexedWriter

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(IndexedWriter, "_flush", full)
    cache = str(tmp_path / "cache")
    with pytest.raises(OSError) as err:
        cached_prefix([corpus], ByteTokenizer(), cache)
    assert str(err.value).startswith(f"--data-cache {cache}: writing {cache}/")
    assert str(err.value).endswith("failed (No space left on device); free space there or write elsewhere, or "
                                   "--data-cache none")
    assert not [f for f in os.listdir(cache) if "tmp" in f]


def test_a_damaged_cache_entry_says_how_to_recover(tmp_path, corpus):
    cache = str(tmp_path / "cache")
    prefix = cached_prefix([corpus], ByteTokenizer(), cache)
    with open(prefix + ".bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match="is damaged .*delete them to tokenize again, or use --data-cache none"):
        load_stream([corpus], ByteTokenizer(), cache)


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, corpus):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"--data-cache .*file/cache: cannot write there .*--data-cache none"):
        cached_prefix([corpus], ByteTokenizer(), str(tmp_path / "file" / "cache"))


def test_a_file_system_without_locks_is_one_line(tmp_path, corpus, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="does not support file locks .*local disk, or --data-cache none"):
        cached_prefix([corpus], ByteTokenizer(), str(tmp_path / "cache"))


def test_the_trainer_tokenizes_into_the_cache_by_default(tmp_path, corpus, monkeypatch):
    from engine.training import main
    monkeypatch.chdir(tmp_path)
    cache = os.path.join(os.environ["XDG_CACHE_HOME"], "engine", "tokens")
    before = set(os.listdir(cache)) if os.path.isdir(cache) else set()
    assert main(SMALL + ["--data", corpus, "--steps", "3", "--run-name", "cached"]) == 0
    made = set(os.listdir(cache)) - before
    assert sorted(f.rsplit(".", 1)[1] for f in made) == ["bin", "idx", "json", "lock"]
    assert main(SMALL + ["--data", corpus, "--steps", "3", "--run-name", "memory", "--data-cache", "none"]) == 0
    assert main(SMALL + ["--data", corpus, "--steps", "3", "--run-name", "own",
                         "--data-cache", str(tmp_path / "own")]) == 0
    assert len(os.listdir(tmp_path / "own")) == 4
    losses = step_losses("runs/cached/metrics.jsonl")
    assert len(losses) == 3
    assert losses == step_losses("runs/memory/metrics.jsonl") == step_losses("runs/own/metrics.jsonl")


def test_the_cache_cli_lists_prunes_and_clears(tmp_path, corpus, capsys):
    """python -m engine.data.cache: entries with their sources and size, least recently used first; a reuse marks
    an entry used; --prune-days deletes only what was not used since; --clear the rest."""
    from engine.data.cache import entries, main as cache_main
    cache = str(tmp_path / "cache")
    old = cached_prefix([corpus], ByteTokenizer(), cache)
    one = os.path.join(corpus, sorted(os.listdir(corpus))[0])
    new = cached_prefix([one], ByteTokenizer(), cache)
    day = 86400
    for prefix, age in ((old, 3 * day), (new, 2 * day)):
        os.utime(prefix + ".json", (time.time() - age, time.time() - age))
    assert [e["key"] for e in entries(cache)] == [os.path.basename(p) for p in (old, new)]
    cached_prefix([corpus], ByteTokenizer(), cache)  # reused: now the most recent
    listed = entries(cache)
    assert [e["key"] for e in listed] == [os.path.basename(p) for p in (new, old)]
    assert listed[1]["paths"] == [os.path.abspath(corpus)] and listed[1]["tokens"] == len(read_indexed(old).tokens)
    assert listed[1]["bytes"] == os.path.getsize(old + ".bin") + os.path.getsize(old + ".idx")
    assert cache_main(["--data-cache", cache]) == 0
    out = capsys.readouterr().out
    assert os.path.abspath(corpus) in out and "2 entries" in out
    assert cache_main(["--data-cache", cache, "--prune-days", "1"]) == 0
    assert "deleted 1 of 2 entries" in capsys.readouterr().out
    assert not [f for f in os.listdir(cache) if f.startswith(os.path.basename(new))]
    assert [e["key"] for e in entries(cache)] == [os.path.basename(old)]
    assert cache_main(["--data-cache", cache, "--clear"]) == 0
    assert entries(cache) == [] and os.listdir(cache) == []
    assert cache_main(["--data-cache", str(tmp_path / "none")]) == 0  # no cache yet: an empty list
    assert "0 entries" in capsys.readouterr().out
