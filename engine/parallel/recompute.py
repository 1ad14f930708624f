"""Activation recomputation and the count of bytes saved for backward.

`recompute(fn, tracker, *args)` runs fn without keeping its intermediate activations and reruns it during
backward (torch's non-reentrant checkpoint). Every random stream - the device generator and the tracker's
named streams - is put back to its state at the first run before the rerun, so dropout masks are identical and
the gradients bit-identical to running without recomputation.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .random import RNGTracker


def recompute(fn, tracker: RNGTracker | None, *args):
    if not torch.is_grad_enabled():
        return fn(*args)
    if tracker is None:  # (no side effects here: torch.compile traces this as one graph)
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    snapshot = tracker.get_states()
    calls = []

    def run(*inner):
        if calls:  # the rerun in backward: replay the first run's streams
            current = tracker.get_states()
            tracker.set_states(snapshot)
            try:
                return fn(*inner)
            finally:
                tracker.set_states(current)
        calls.append(True)
        return fn(*inner)

    # the device generator is replayed by checkpoint itself, the tracker's other streams by `run`
    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward inside the block: floating-point tensors of at least one
    dimension, each storage once, leaving out the storages of `exclude` (parameters, RoPE tables; their
    storages are looked up when a tensor is saved, as ZeRO-3 gathers parameters into fresh memory)."""

    def __init__(self, exclude=()):
        self.bytes, self._exclude, self._seen = 0, list(exclude), set()

    def _pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if t.is_floating_point() and t.dim() > 0 and ptr not in self._seen:
            if ptr not in {e.untyped_storage().data_ptr() for e in self._exclude}:
                self.bytes += t.untyped_storage().nbytes()
                self._seen.add(ptr)  # saved tensors stay alive through the block: an address is never reused
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
