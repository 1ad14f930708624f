"""Text --data tokenized once: into a .bin/.idx pair in a cache directory that every process of the job, and every
later run, memory-maps (the operating system's page cache holds one copy per node).

The pair is named by a key over the files' absolute paths, sizes and modification times and the tokenizer's
fingerprint, so editing, adding or removing a file, or changing the tokenizer, tokenizes again. The first process
to take the key's lock file writes the pair with the streaming writer of engine.data.preprocess (bounded memory);
the others wait on the lock and then read it. A failure while tokenizing (a malformed .jsonl line, say) is kept
beside the lock so that processes which waited for it raise the same one line instead of each tokenizing again.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import sys
import threading
import time

from engine.data.datasets import WriteError, is_indexed, list_files, temporary_suffix

CACHE_FORMAT = 1
ANNOUNCE_AFTER_S = 2.0
STALE_AFTER_S = 600.0


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/engine/tokens, else ~/.cache/engine/tokens."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "engine", "tokens")


def cache_key(files: list[str], tokenizer, text_field: str = "text") -> str:
    """Hex digest naming the tokenization of `files` (in this order, documents from `text_field`) by `tokenizer`."""
    described = [[os.path.abspath(f), st.st_size, st.st_mtime_ns] for f, st in ((f, os.stat(f)) for f in files)]
    text = json.dumps({"format": CACHE_FORMAT, "tokenizer": tokenizer.fingerprint, "files": described,
                       "text_field": text_field})
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_prefix(paths: list[str], tokenizer, cache_dir: str, text_field: str = "text",
                  name: str | None = None) -> str:
    """The prefix of the cached .bin/.idx holding the documents of `paths` tokenized by `tokenizer`; writes it
    unless it exists (one process at a time: the others wait and reuse it). name: the sources in messages."""
    from engine.data.preprocess import preprocess

    name = name or (f"--data {paths[0]}" if len(paths) == 1 else f"--data ({len(paths)} sources)")
    files = list_files(paths)
    if not files:
        raise ValueError(f"{name}: holds no files (hidden ones, whose names start with '.', are not read)")
    prefix = os.path.join(cache_dir, cache_key(files, tokenizer, text_field))
    if is_indexed(prefix):  # the writer renames .idx into place last: both present means complete
        _mark_used(prefix)
        return prefix
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = open(prefix + ".lock", "a")
    except OSError as exc:
        raise OSError(f"--data-cache {cache_dir}: cannot write there ({exc.strerror}); give a writable directory, "
                      "or --data-cache none to tokenize in memory") from None
    failure = prefix + ".failed"
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process is tokenizing these files
            waited = True
        except OSError as exc:  # a network file system mounted without lock support
            raise OSError(f"--data-cache {cache_dir}: its file system does not support file locks ({exc.strerror}); "
                          "give a directory on a local disk, or --data-cache none") from None
        if is_indexed(prefix):
            return prefix
        # The writer removes the failure file when it starts: one present after a wait is that writer's.
        if waited and os.path.exists(failure):
            with open(failure) as fh:
                raise ValueError(fh.read().strip() or f"{name}: tokenizing it failed in another process")
        _remove_stale(prefix, failure)
        # Said only when it takes a while: a file refused at once stays a one-line error.
        notice = threading.Timer(ANNOUNCE_AFTER_S, print, [f"tokenizing {name} ({len(files)} files) once into "
                                                           f"{prefix}.bin/.idx; later runs reuse it"],
                                 {"file": sys.stderr, "flush": True})
        notice.start()
        try:
            documents, tokens = preprocess(files, prefix, tokenizer, progress=sys.stderr.isatty(), flag=name,
                                           text_field=text_field)
        except WriteError as exc:
            message = f"--data-cache {cache_dir}: {exc}, or --data-cache none"
            _record(failure, message)
            raise OSError(message) from None
        except (OSError, ValueError, RuntimeError) as exc:
            _record(failure, str(exc))
            raise
        finally:
            notice.cancel()
        with open(prefix + ".json", "w") as fh:  # for a person looking into the cache directory
            json.dump({"paths": [os.path.abspath(p) for p in paths], "files": len(files), "text_field": text_field,
                       "tokenizer": tokenizer.fingerprint, "documents": documents, "tokens": tokens}, fh, indent=1)
    return prefix


def _mark_used(prefix: str) -> None:
    """The entry's last use, for `python -m engine.data.cache --prune-days` (its .json's modification time)."""
    try:
        os.utime(prefix + ".json")
    except OSError:
        pass  # a read-only cache, or an entry written before the .json: nothing to mark


def _record(failure: str, message: str) -> None:
    """The failure, for the processes waiting on the lock (written whole, then renamed into place)."""
    try:
        with open(failure + temporary_suffix(), "w") as fh:
            fh.write(message)
        os.replace(failure + temporary_suffix(), failure)
    except OSError:
        pass  # the waiting processes will meet the problem themselves


def _remove_stale(prefix: str, failure: str) -> None:
    """An earlier failure, and temporary files a killed writer left (untouched for STALE_AFTER_S: a live writer
    appends every few seconds)."""
    for path in [failure] + glob.glob(glob.escape(prefix) + ".*.tmp-*"):
        try:
            if path == failure or time.time() - os.path.getmtime(path) > STALE_AFTER_S:
                os.remove(path)
        except OSError:
            pass


# --- looking after the cache: python -m engine.data.cache

def entries(cache_dir: str) -> list[dict]:
    """The complete entries of a cache directory, least recently used first: key, bytes on disk, last use (the
    .json's modification time, else the .idx's) and what its .json records (paths, documents, tokens, ...)."""
    found = []
    for name in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []:
        prefix = os.path.join(cache_dir, name[:-4])
        if not name.endswith(".idx") or not is_indexed(prefix):
            continue
        info = {}
        try:
            with open(prefix + ".json") as fh:
                info = json.load(fh)
        except (OSError, ValueError):
            pass
        stamp = prefix + ".json" if os.path.exists(prefix + ".json") else prefix + ".idx"
        found.append({**info, "key": name[:-4], "bytes": sum(os.path.getsize(prefix + e) for e in (".bin", ".idx")),
                      "last_used": os.path.getmtime(stamp)})
    return sorted(found, key=lambda e: e["last_used"])


def remove_entry(cache_dir: str, key: str) -> None:
    """Deletes an entry's files (a job still reading it keeps its memory map: the data goes once that ends)."""
    for path in glob.glob(glob.escape(os.path.join(cache_dir, key)) + ".*"):
        os.remove(path)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m engine.data.cache",
                                     description="List, prune or clear the tokenized text the trainer keeps in "
                                                 "--data-cache (default: " + default_cache_dir() + ").")
    parser.add_argument("--data-cache", default=default_cache_dir(), help="the cache directory [%(default)s]")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--prune-days", type=float, help="delete the entries not used for this many days")
    what.add_argument("--clear", action="store_true", help="delete every entry")
    args = parser.parse_args(argv)
    if args.prune_days is not None and not args.prune_days >= 0:
        parser.error(f"--prune-days: must be >= 0, got {args.prune_days}")
    now, listed = time.time(), entries(args.data_cache)
    if args.clear or args.prune_days is not None:
        gone = [e for e in listed if args.clear or now - e["last_used"] > args.prune_days * 86400]
        for e in gone:
            remove_entry(args.data_cache, e["key"])
        print(f"deleted {len(gone)} of {len(listed)} entries ({sum(e['bytes'] for e in gone) / 2**30:.2f} GiB) "
              f"from {args.data_cache}")
        return 0
    for e in listed:
        sources = ", ".join(e.get("paths", [])) or "?"
        tokens = f"{e['tokens']:,} tokens" if "tokens" in e else "? tokens"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        print(f"{e['key']}  {e['bytes'] / 2**20:10,.1f} MiB  {tokens:>20}  used {used}  {sources}")
    print(f"{len(listed)} entries, {sum(e['bytes'] for e in listed) / 2**30:.2f} GiB in {args.data_cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
