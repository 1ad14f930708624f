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
import hashlib
import json
import os
import sys
import threading
import time

from engine.data.datasets import is_indexed, list_files

CACHE_FORMAT = 1
ANNOUNCE_AFTER_S = 2.0


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


def cached_prefix(paths: list[str], tokenizer, cache_dir: str, text_field: str = "text") -> str:
    """The prefix of the cached .bin/.idx holding the documents of `paths` tokenized by `tokenizer`; writes it
    unless it exists (one process at a time: the others wait and reuse it)."""
    from engine.data.preprocess import preprocess

    files = list_files(paths)
    if not files:
        raise ValueError(f"--data {' '.join(paths)}: holds no files")
    prefix = os.path.join(cache_dir, cache_key(files, tokenizer, text_field))
    if is_indexed(prefix):  # the writer renames .idx into place last: both present means complete
        return prefix
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = open(prefix + ".lock", "a")
    except OSError as exc:
        raise OSError(f"--data-cache {cache_dir}: cannot write there ({exc.strerror}); give a writable directory, "
                      "or --data-cache none to tokenize in memory") from None
    with lock:
        waited_since = time.time()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited_since = None
        except BlockingIOError:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process is tokenizing these files
        except OSError as exc:  # a network file system mounted without lock support
            raise OSError(f"--data-cache {cache_dir}: its file system does not support file locks ({exc.strerror}); "
                          "give a directory on a local disk, or --data-cache none") from None
        if is_indexed(prefix):
            return prefix
        failure = prefix + ".failed"
        if waited_since is not None and os.path.exists(failure) and os.path.getmtime(failure) >= waited_since - 1:
            with open(failure) as fh:
                raise ValueError(fh.read().strip())
        name = paths[0] if len(paths) == 1 else f"{len(paths)} sources"
        # Said only when it takes a while: a file refused at once stays a one-line error.
        notice = threading.Timer(ANNOUNCE_AFTER_S, print, [f"tokenizing --data {name} ({len(files)} files) once "
                                                           f"into {prefix}.bin/.idx; later runs reuse it"],
                                 {"file": sys.stderr, "flush": True})
        notice.start()
        try:
            documents, tokens = preprocess(files, prefix, tokenizer, progress=sys.stderr.isatty(),
                                           flag="--data", text_field=text_field)
        except (OSError, ValueError, RuntimeError) as exc:
            with open(failure, "w") as fh:
                fh.write(str(exc))
            raise
        finally:
            notice.cancel()
        if os.path.exists(failure):
            os.remove(failure)
        with open(prefix + ".json", "w") as fh:  # for a person looking into the cache directory
            json.dump({"paths": [os.path.abspath(p) for p in paths], "files": len(files),
                       "tokenizer": tokenizer.fingerprint, "text_field": text_field, "documents": documents, "tokens": tokens}, fh, indent=1)
    return prefix
