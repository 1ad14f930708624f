"""Learning-rate schedule: linear warm-up, then a decay to min_lr.

The LR is a pure function of the step number (1-based: the step being taken), so resuming needs nothing but
the step. After `decay_steps` the LR stays at `min_lr`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    style: str = "cosine"          # linear | cosine | inverse-sqrt | constant | wsd
    wsd_decay_fraction: float = 0.1  # wsd: the last fraction of decay_steps decays linearly

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if self.style == "constant":
            return self.peak_lr
        if self.style == "inverse-sqrt":
            return max(self.min_lr, self.peak_lr * math.sqrt(max(self.warmup_steps, 1)) / math.sqrt(step))
        if step >= self.decay_steps:
            return self.min_lr
        span = self.peak_lr - self.min_lr
        if self.style == "wsd":
            decay_start = self.decay_steps - max(1, round(self.wsd_decay_fraction * self.decay_steps))
            decay_start = max(decay_start, self.warmup_steps)
            if step <= decay_start:
                return self.peak_lr
            return self.peak_lr - span * (step - decay_start) / (self.decay_steps - decay_start)
        ratio = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.style == "linear":
            return self.peak_lr - span * ratio
        if self.style == "cosine":
            return self.min_lr + span * 0.5 * (1.0 + math.cos(math.pi * ratio))
        raise ValueError(f"unknown LR decay style {self.style!r}")
