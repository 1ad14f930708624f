"""Named random streams (Megatron's RNG tracker).

"default" is the process's own generator: seeded identically on every tensor-parallel rank, it drives
randomness in replicated regions (where every tp rank must draw the same mask). "tp" differs per tp rank and
drives randomness inside tensor-parallel regions (different heads, or sequence shards, on each rank).
`fork(name)` swaps a stream in for the duration of a block; states are saved in checkpoints.
"""
from __future__ import annotations

import contextlib

import torch

TP_SEED_OFFSET = 2718


class RNGTracker:
    def __init__(self, seed: int, tp_rank: int = 0, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}
        with self._fresh_generator(seed + TP_SEED_OFFSET + tp_rank):
            self._states["tp"] = self._get()

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def _fresh_generator(self, seed: int):
        outer = self._get()
        (torch.cuda.manual_seed if self.device.type == "cuda" else torch.manual_seed)(seed)
        try:
            yield
        finally:
            self._set(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "tp"):
        """Runs the block with stream `name` as the device's generator, then puts the outer state back."""
        outer = self._get()
        self._set(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get()
            self._set(outer)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Every stream including "default" (the device generator's current state), as CPU byte tensors."""
        return {"default": self._get().clone(), **{k: v.clone() for k, v in self._states.items()}}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._set(states["default"])
        self._states = {k: v.clone() for k, v in states.items() if k != "default"}
