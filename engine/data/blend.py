"""Blending: one map-style dataset whose samples come from several sources in proportion to their weights.

Slot i of the blend belongs to the source whose next sample is most overdue: source d's k-th sample is due at
(k + 0.5) / w_d, and the slots are the due times in order, so every prefix of the blend holds each source's share
to within one sample (the deterministic schedule Megatron's blended dataset uses). A source's k-th draw is the
k-th element of a seeded permutation of its samples (a new permutation for each pass over a source that is drawn
more often than it has samples). The trainer's sampler then orders the blend like any dataset: the batches are
the same at every layout, and resuming needs only the sample position.
"""
from __future__ import annotations

import numpy as np
import torch


def parse_blend(tokens: list[str]) -> list[tuple[float | None, str]]:
    """--data tokens -> [(weight, path)]: `W1 P1 W2 P2 ...` when the first token is a number (weights normalised),
    else every token is a path with weight None. Raises ValueError naming the problem."""
    def number(token: str) -> float | None:
        try:
            return float(token)
        except ValueError:
            return None

    if not tokens or number(tokens[0]) is None:
        return [(None, path) for path in tokens]
    weights, paths = tokens[0::2], tokens[1::2]
    if len(tokens) % 2 or any(number(w) is None for w in weights) or any(number(p) is not None for p in paths):
        raise ValueError(f"--data: {' '.join(tokens)[:200]!r} is not a blend W1 PATH1 W2 PATH2 ...: give a weight "
                         "before every path (or no weights at all)")
    values = [number(w) for w in weights]
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--data: blend weights must be positive numbers, got {', '.join(weights)}")
    total = sum(values)
    return [(v / total, path) for v, path in zip(values, paths)]


def blend_schedule(weights: list[float], size: int) -> np.ndarray:
    """The source of each of `size` slots (int16/int32 array): source d's k-th slot is due at (k + 0.5) / w_d."""
    due, source = [], []
    for d, w in enumerate(weights):
        count = int(np.ceil(w * size)) + 1
        due.append((np.arange(count) + 0.5) / w)
        source.append(np.full(count, d, dtype=np.int32))
    order = np.argsort(np.concatenate(due), kind="stable")[:size]  # ties: the lower source index first
    return np.concatenate(source)[order]


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples (default: all sources' samples together) drawn from `datasets` by `weights` (summing to 1)."""

    def __init__(self, datasets: list, weights: list[float], seed: int, size: int | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset: one weight per dataset, at least one dataset")
        if any(len(ds) == 0 for ds in datasets):
            raise ValueError("BlendedDataset: a source has no samples")
        self.datasets, self.weights = datasets, list(weights)
        self.size = size or sum(len(ds) for ds in datasets)
        self.source = blend_schedule(self.weights, self.size)
        self.sample = np.zeros(self.size, dtype=np.int64)
        for d, ds in enumerate(datasets):
            slots = np.flatnonzero(self.source == d)
            draws = np.arange(len(slots))
            passes = [np.random.default_rng([seed, d, p]).permutation(len(ds))
                      for p in range(int(draws[-1]) // len(ds) + 1)] if len(slots) else []
            if passes:
                self.sample[slots] = np.concatenate(passes)[draws]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return self.datasets[self.source[i]][int(self.sample[i])]

    def source_counts(self, indices) -> list[int]:
        """How many of the blend's samples at `indices` come from each source."""
        return np.bincount(self.source[np.asarray(indices, dtype=np.int64)], minlength=len(self.datasets)).tolist()
