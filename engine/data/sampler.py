"""Global-batch sampling and batch-size ramp-up.

The order of samples is a function of the seed alone: position k of the run (counting every sample ever drawn)
maps to epoch k // N and to element k % N of that epoch's permutation. A step takes the next global batch of
positions; data-parallel rank r takes the r-th contiguous slice of it, and splits its slice into micro-batches.
So the global batch, and therefore the loss, is the same whatever the layout, and resuming only needs the
position. Skipped ranges (a rollback past bad data) simply advance the position.
"""
from __future__ import annotations

import numpy as np


class GlobalBatchSampler:
    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("the dataset has no samples")
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perm

    def indices(self, position: int, count: int) -> list[int]:
        """Dataset indices of the samples at positions [position, position + count)."""
        out = []
        for k in range(position, position + count):
            out.append(int(self._permutation(k // self.num_samples)[k % self.num_samples]))
        return out

    def rank_slice(self, position: int, global_batch: int, dp_rank: int, dp_size: int) -> list[int]:
        per_rank = global_batch // dp_size
        return self.indices(position + dp_rank * per_rank, per_rank)


class BatchSizeRampup:
    """GPT-3 ramp-up: the global batch grows from `start` by `increment` evenly over `rampup_samples`
    consumed samples, then stays at `final`. Without a ramp-up it is always `final`."""

    def __init__(self, final: int, start: int | None = None, increment: int | None = None,
                 rampup_samples: int = 0):
        self.final = final
        self.start = final if start is None else start
        self.increment = increment or 1
        num_increments = (final - self.start) // self.increment
        self.samples_per_increment = rampup_samples / num_increments if num_increments else 0.0

    def global_batch_size(self, consumed_samples: int) -> int:
        if self.start >= self.final or self.samples_per_increment == 0:
            return self.final
        steps = int(consumed_samples / self.samples_per_increment)
        return min(self.start + steps * self.increment, self.final)


class IterableSamples:
    """A user's iterable of samples (a generator, an IterableDataset, a stream reader), read in its own order:
    position k is the k-th item it yields, so the global batch is still the same whatever the layout, and resuming
    (or a rollback's skip) reads forward to the position. Going back to an earlier position iterates again from
    the start, which a re-iterable source (a list, an IterableDataset) allows and a one-shot iterator does not."""

    def __init__(self, iterable):
        self.iterable, self.iterator, self.position = iterable, None, 0

    def take(self, position: int, count: int) -> list:
        """The items at positions [position, position + count)."""
        if self.iterator is None or position < self.position:
            if self.iterator is not None and iter(self.iterable) is self.iterable:
                raise ValueError(f"train_data is a one-shot iterator: it cannot go back from sample {self.position} "
                                 f"to {position} (a resume or rollback); pass a re-iterable source (a list, an "
                                 "IterableDataset) instead")
            self.iterator, self.position = iter(self.iterable), 0
        for _ in range(position - self.position):
            if next(self.iterator, None) is None:
                raise ValueError(f"train_data ended at sample {self.position}, before position {position}")
            self.position += 1
        items = [item for _, item in zip(range(count), self.iterator)]
        self.position += len(items)
        if len(items) < count:
            raise ValueError(f"train_data ended after {self.position} samples (a step needs {count} more from "
                             f"position {position}); give a longer or repeating iterable, or fewer --steps")
        return items
