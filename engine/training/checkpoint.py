"""Checkpoints: atomic step directories, checksums, no pickles, and layout-portable tensors.

    DIR/step_00000012/rank_00000.safetensors   tensors this rank holds: model/<name>, optim/<name>/<state>,
                                               rng/<stream>; the header records, for each tensor, the global
                                               shape and the offset of the slice it holds
    DIR/step_00000012/meta.json                step, data position, scheduler/scaler state, config, layout and
                                               the sha256 of every rank file (written last)
    DIR/step_00000012/meta.json.sha256         the sha256 of meta.json
    DIR/latest                                 the name of the newest complete step directory

A step directory is written under a temporary name and renamed when complete; `latest` is replaced atomically
after that, so a crash mid-save leaves the previous checkpoint intact. Any rank's slice of any tensor can be
reassembled from the saved slices, whatever layout wrote them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str) -> None:
    """Forces a file's (or a directory's entries') data to disk: a checkpoint that `latest` names must survive a
    power failure, not only a crash of the process."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_rank_file(tmp_dir: str, rank: int, tensors: dict[str, torch.Tensor],
                    slices: dict[str, tuple[list[int], list[int]]]) -> tuple[str, str]:
    """Writes one rank's tensors; `slices[key] = (global_shape, offset)` for tensors that are shards (the
    rest are whole). Returns (file name, sha256)."""
    name = f"rank_{rank:05d}.safetensors"
    header = {key: {"global_shape": list(t.shape), "offset": [0] * t.ndim} for key, t in tensors.items()}
    for key, (global_shape, offset) in slices.items():
        header[key] = {"global_shape": list(global_shape), "offset": list(offset)}
    path = os.path.join(tmp_dir, name)
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, path,
              metadata={"slices": json.dumps(header)})
    _fsync(path)
    return name, sha256_file(path)


def latest_step(save_dir: str) -> int | None:
    """The step `save_dir/latest` names (None: no such file, or it names no step directory)."""
    try:
        with open(os.path.join(save_dir, "latest")) as fh:
            name = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(name[5:]) if re.fullmatch(r"step_\d{8}", name) else None


def finalize(save_dir: str, step: int, meta: dict, files: dict[str, str], keep_last: int | None,
             overwrite: bool = False) -> str:
    """Called by one rank once every rank file is written: meta.json, rename into place, update `latest` - unless
    `latest` names a newer step and not `overwrite` (it never moves backwards by accident; the step directory is
    kept, and a warning names it)."""
    final = os.path.join(save_dir, step_dir_name(step))
    tmp = final + ".tmp"
    _write_atomic(os.path.join(tmp, "meta.json"), json.dumps({**meta, "format": FORMAT_VERSION, "step": step,
                                                              "files": files}, indent=1))
    _write_atomic(os.path.join(tmp, "meta.json.sha256"), sha256_file(os.path.join(tmp, "meta.json")) + "\n")
    _fsync(tmp)
    replaced = None
    if os.path.exists(final):  # re-saving a step (after a rollback): keep the old one until the new is in place
        replaced = final + ".old"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    newer = latest_step(save_dir)
    if newer is not None and newer > step and not overwrite:
        print(f"warning: saved {final}, but {save_dir}/latest still names the newer step {newer} (pass "
              "--overwrite-checkpoints to let an earlier step replace it)", file=sys.stderr, flush=True)
    else:
        _write_atomic(os.path.join(save_dir, "latest"), step_dir_name(step) + "\n")
    _fsync(save_dir)
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)
    if keep_last:  # only older steps: a run restarted from an earlier step must not delete what it just wrote
        older = [d for d in list_checkpoints(save_dir) if d < step_dir_name(step)]
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)
    return final


def prepare_tmp_dir(save_dir: str, step: int) -> str:
    tmp = os.path.join(save_dir, step_dir_name(step) + ".tmp")
    if os.path.exists(tmp):  # left by a crash mid-save
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of t that nothing else references (pinned when t is on a GPU)."""
    if t.device.type == "cpu":
        return t.clone()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


class PendingSave:
    """One save in progress: every rank writes its file (now, or on a background thread), then `finish()` - a
    collective - gathers the checksums and rank 0 publishes the step (meta.json, rename, `latest`). A rank whose
    write failed makes every rank drop the step: the previous checkpoint stays the newest."""

    def __init__(self, save_dir: str, step: int, rank: int, tensors: dict, slices: dict, meta: dict,
                 keep_last: int | None = None, overwrite: bool = False, background: bool = False,
                 copy_first: set[str] | None = None):
        """copy_first: the keys of tensors that are still live (views of the training's own parameters and
        optimizer state) or on a device; the writer first copies them to host memory, then sets `snapshot_taken`.
        A background save's caller must `wait_snapshot()` before it next changes them (the optimizer step)."""
        self.save_dir, self.step, self.rank, self.meta = save_dir, step, rank, meta
        self.keep_last, self.overwrite = keep_last, overwrite
        self.final = os.path.join(save_dir, step_dir_name(step))
        self.result: tuple | None = None  # ("ok", name, digest) or ("error", message)
        self.snapshot_taken = threading.Event()
        if rank == 0:
            prepare_tmp_dir(save_dir, step)
        if _distributed():
            dist.barrier()
        write = lambda: self._write(tensors, slices, copy_first or set())  # noqa: E731
        self.thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True) if background else None
        if self.thread is not None:
            self.thread.start()
        else:
            write()

    def _write(self, tensors: dict, slices: dict, copy_first: set[str]) -> None:
        try:
            try:
                tensors = {k: _host_copy(t) if k in copy_first else t for k, t in tensors.items()}
            finally:
                self.snapshot_taken.set()
            if self.thread is not None and not all(bool(torch.isfinite(t).all()) for t in tensors.values()
                                                   if t.is_floating_point()):
                raise ValueError("the parameters or optimizer state are not finite: not saved")
            name, digest = write_rank_file(self.final + ".tmp", self.rank, tensors, slices)
            self.result = ("ok", name, digest)
        except Exception as exc:  # noqa: BLE001 - reported by finish(), on every rank
            self.result = ("error", f"rank {self.rank}: {type(exc).__name__}: {exc}")

    def wait_snapshot(self) -> float:
        """Blocks until the writer holds its own copy of the state; returns the seconds waited."""
        if self.snapshot_taken.is_set():
            return 0.0
        start = time.perf_counter()
        self.snapshot_taken.wait()
        return time.perf_counter() - start

    def written(self) -> bool:
        """Whether this rank's file is written (or failed): local, no collective."""
        return self.thread is None or not self.thread.is_alive()

    def finish(self) -> str | None:
        """Waits for this rank's write, then publishes the step on rank 0 (every rank calls it). Returns the step
        directory, or None when a rank's write failed (the error is raised on a synchronous save)."""
        if self.thread is not None:
            self.thread.join()
        results = [self.result]
        if _distributed():
            results = [None] * dist.get_world_size()
            dist.all_gather_object(results, self.result)
        errors = [r[1] for r in results if r[0] != "ok"]
        if not errors:  # rank 0 publishes; every rank learns whether that worked (a full disk, ...)
            outcome = [None]
            if self.rank == 0:
                try:
                    finalize(self.save_dir, self.step, self.meta, {r[1]: r[2] for r in results}, self.keep_last,
                             self.overwrite)
                except OSError as exc:
                    outcome = [f"rank 0 publishing: {type(exc).__name__}: {exc}"]
            if _distributed():
                dist.broadcast_object_list(outcome, src=0)
            errors = [e for e in outcome if e is not None]
        if errors:
            if self.rank == 0:
                shutil.rmtree(self.final + ".tmp", ignore_errors=True)
            if _distributed():
                dist.barrier()
            if self.thread is None:
                raise CheckpointError(f"saving step {self.step} failed ({'; '.join(errors)}); the previous "
                                      "checkpoint stays the newest")
            print(f"warning: the background save of step {self.step} failed ({'; '.join(errors)}); the previous "
                  "checkpoint stays the newest, training continues", file=sys.stderr, flush=True)
            return None
        if _distributed():
            dist.barrier()
        return self.final


def save(save_dir: str, step: int, rank: int, tensors: dict, slices: dict, meta: dict,
         keep_last: int | None = None, overwrite: bool = False) -> str:
    """Every rank calls this with its own tensors; rank 0 writes meta.json and publishes the step once every
    rank file is on disk. Returns the step directory."""
    return PendingSave(save_dir, step, rank, tensors, slices, meta, keep_last, overwrite).finish()


def list_checkpoints(save_dir: str) -> list[str]:
    if not os.path.isdir(save_dir):
        return []
    return sorted(d for d in os.listdir(save_dir)
                  if re.fullmatch(r"step_\d{8}", d) and os.path.isfile(os.path.join(save_dir, d, "meta.json")))


def resolve(path: str) -> str | None:
    """The step directory to load: `path` itself if it is one, else the one named by path/latest; None when
    there is no complete checkpoint. `latest` must hold a plain step_NNNNNNNN name inside `path` (an absolute
    path or `..` is never followed)."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        return None
    try:
        with open(latest, encoding="utf-8") as fh:
            name = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{latest} is unreadable ({exc}); point --load at an intact step_* directory") from None
    if not re.fullmatch(r"step_\d{8}", name):
        raise CheckpointError(f"{latest} names {name[:80]!r}, not a step_NNNNNNNN directory inside {path}; the "
                              "checkpoint directory is damaged: point --load at an intact step_* directory")
    step_dir = os.path.join(path, name)
    if not os.path.isfile(os.path.join(step_dir, "meta.json")):
        raise CheckpointError(f"{latest} names {step_dir}, which has no meta.json; the checkpoint directory is "
                              "damaged: point --load at an intact step_* directory")
    return step_dir


def clean_stale(save_dir: str) -> list[str]:
    """Removes what interrupted saves left in save_dir (step_*.tmp, step_*.old); returns the removed names."""
    if not os.path.isdir(save_dir):
        return []
    stale = sorted(d for d in os.listdir(save_dir) if re.fullmatch(r"step_\d{8}\.(tmp|old)", d))
    for d in stale:
        shutil.rmtree(os.path.join(save_dir, d), ignore_errors=True)
    return stale


def probe_writable(save_dir: str) -> None:
    """Creates save_dir and writes, fsyncs and removes a probe file there; raises OSError when it cannot."""
    os.makedirs(save_dir, exist_ok=True)
    probe = os.path.join(save_dir, f".probe-{os.getpid()}")
    try:
        _write_atomic(probe, "probe\n")
    finally:
        if os.path.exists(probe):
            os.remove(probe)


class CheckpointReader:
    """Reads a step directory and serves any slice of any saved tensor. A file's checksum is verified the
    first time it is read from, so each rank hashes only the files it needs."""

    def __init__(self, step_dir: str):
        self.step_dir = step_dir
        meta_path = os.path.join(step_dir, "meta.json")
        digest_path = meta_path + ".sha256"
        if os.path.isfile(digest_path):  # (checkpoints written before the checksum existed have none)
            with open(digest_path, encoding="utf-8", errors="replace") as fh:
                expected = fh.read().strip()
            if sha256_file(meta_path) != expected:
                raise CheckpointError(f"checkpoint file {meta_path} does not match its checksum (edited or damaged); "
                                      "load an earlier step directory instead")
        try:
            with open(meta_path) as fh:
                self.meta = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint file {os.path.join(step_dir, 'meta.json')} is corrupt or truncated "
                                  f"({exc}); load an earlier step directory instead") from None
        if self.meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{step_dir}: checkpoint format {self.meta.get('format')} is not supported "
                                  f"(this engine reads format {FORMAT_VERSION})")
        self.index: dict[str, list[tuple[str, dict]]] = {}
        self._verified: set[str] = set()
        for name in self.meta["files"]:
            if not re.fullmatch(r"rank_\d{5}\.safetensors", name):
                raise CheckpointError(f"{meta_path} names the file {name[:80]!r}, not a rank_NNNNN.safetensors file "
                                      "inside the step directory; load an intact step directory instead")
            path = os.path.join(step_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint file {path} is missing")
            try:
                with safe_open(path, "pt") as f:
                    header = json.loads(f.metadata()["slices"])
            except Exception as exc:  # safetensors raises several exception types for damaged files
                raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({exc}); load an earlier "
                                      "step directory instead") from None
            for key, info in header.items():
                self.index.setdefault(key, []).append((path, info))

    def _verify(self, path: str) -> None:
        if path in self._verified:
            return
        if sha256_file(path) != self.meta["files"][os.path.basename(path)]:
            raise CheckpointError(f"checkpoint file {path} is corrupt or truncated (sha256 mismatch); "
                                  "load an earlier step directory instead")
        self._verified.add(path)

    def verify_all(self) -> None:
        for name in self.meta["files"]:
            self._verify(os.path.join(self.step_dir, name))

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.index if k.startswith(prefix))

    def global_shape(self, key: str) -> list[int]:
        return self.index[key][0][1]["global_shape"]

    def read(self, key: str, offset: list[int] | None = None, shape: list[int] | None = None) -> torch.Tensor:
        """The block [offset, offset + shape) of the global tensor `key` (default: the whole tensor),
        assembled from every saved slice that overlaps it."""
        if key not in self.index:
            raise CheckpointError(f"{self.step_dir}: tensor {key!r} is not in the checkpoint")
        global_shape = self.global_shape(key)
        offset = [0] * len(global_shape) if offset is None else offset
        shape = list(global_shape) if shape is None else shape
        if any(n == 0 for n in shape):  # an empty block (a rank holding only vocabulary padding)
            path = self.index[key][0][0]
            with safe_open(path, "pt") as f:
                return f.get_slice(key)[tuple(slice(0, 0) for _ in shape)].reshape(shape)
        out, covered = None, 0
        for path, info in self.index[key]:
            lo = [max(a, b) for a, b in zip(offset, info["offset"])]
            with safe_open(path, "pt") as f:
                src = f.get_slice(key)
                src_shape = src.get_shape()
                hi = [min(a + n, b + m) for a, n, b, m in zip(offset, shape, info["offset"], src_shape)]
                if any(h <= l for h, l in zip(hi, lo)) and len(shape) > 0:
                    continue  # no overlap: this file is neither read nor hashed
                self._verify(path)
                piece = src[tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, info["offset"]))]
            if out is None:
                out = torch.empty(shape, dtype=piece.dtype)
            out[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offset))] = piece
            covered += piece.numel()
        if out is None or covered < out.numel():
            raise CheckpointError(f"{self.step_dir}: the saved slices of {key!r} do not cover the requested block")
        return out


def load_full_model(path: str, device: str = "cpu", dtype=None):
    """engine.load_model: rebuilds the whole model from any checkpoint's slices (read in fp32, then cast to
    `dtype`, default fp32)."""
    from engine.models.llama import Llama, ModelConfig

    step_dir = resolve(path)
    if step_dir is None:
        raise CheckpointError(f"{path}: no checkpoint here (neither meta.json nor a 'latest' file)")
    reader = CheckpointReader(step_dir)
    model = Llama(ModelConfig(**reader.meta["model_config"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(reader.read(f"model/{name}"))
    return model.to(device, dtype or torch.float32).eval()


# ---- model and optimizer shards ------------------------------------------------------------------------

def shard_tensors(named_params, optimizer_states: dict, owns) -> tuple[dict, dict]:
    """The tensors a rank saves: model/<name> and optim/<name>/<state> for every parameter `owns(name, param)`
    is true for (one copy of each slice across the job), cut to the real (unpadded) rows. optimizer_states:
    {name: {key: tensor}} with param-shaped state tensors for this rank's slice. Returns (tensors, slices)."""
    from engine.parallel.layers import valid_slice
    tensors, slices = {}, {}
    for name, p in named_params:
        if not owns(name, p):
            continue
        global_shape, offset, local = valid_slice(p)
        block = tuple(slice(0, n) for n in local)
        entries = {f"model/{name}": p.detach()}
        entries.update({f"optim/{name}/{key}": t for key, t in optimizer_states.get(name, {}).items()})
        for key, t in entries.items():
            if t.shape == p.shape and p.ndim:
                tensors[key], slices[key] = t[block], (global_shape, offset)
            else:  # scalars (step counts) and other per-parameter state are saved whole
                tensors[key] = t
    return tensors, slices


def load_shards(reader: CheckpointReader, named_params, source=lambda name: name,
                with_optimizer: bool = True) -> dict:
    """Fills every parameter with its slice of the saved tensors, whatever layout saved them (padded rows
    zeroed), and returns {name: {key: optimizer state}} for this rank's slices, param-shaped where the state
    is. source(name) is the saved name a parameter is read from (a tied copy reads the embedding)."""
    from engine.parallel.layers import valid_slice
    states = {}
    with torch.no_grad():
        for name, p in named_params:
            global_shape, offset, local = valid_slice(p)
            block = tuple(slice(0, n) for n in local)
            saved = source(name)
            p.zero_()
            p[block] = reader.read(f"model/{saved}", list(offset), list(local)).to(p.dtype)
            if not with_optimizer:
                continue
            for key in reader.keys(f"optim/{saved}/"):
                short = key.rsplit("/", 1)[1]
                if p.ndim and tuple(reader.global_shape(key)) == tuple(global_shape):
                    piece = reader.read(key, list(offset), list(local))
                    value = torch.zeros(p.shape, dtype=piece.dtype)
                    value[block] = piece
                else:
                    value = reader.read(key)
                states.setdefault(name, {})[short] = value
    return states
