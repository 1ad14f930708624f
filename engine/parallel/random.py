"""Named random streams (Megatron's RNG tracker).

"default" is seeded identically on every tensor-parallel rank and drives randomness in replicated regions (where
every tp rank must draw the same mask); "tp" differs per tp rank and drives randomness inside tensor-parallel
regions (different heads, or sequence shards, on each rank). `fork(name)` makes a stream the device's generator
for the duration of a block and puts the caller's generator back afterwards, so the engine's random work (run
inside `fork("default")`) never reseeds or advances the generator of the program that embeds it. States are
saved in checkpoints.
"""
from __future__ import annotations

import contextlib

import torch

TP_SEED_OFFSET = 2718


class RNGTracker:
    def __init__(self, seed: int, tp_rank: int = 0, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}
        self._active: list[str] = []  # the streams forked in, innermost last
        self._states["default"] = self._seeded(seed)
        self._states["tp"] = self._seeded(seed + TP_SEED_OFFSET + tp_rank)

    def _seeded(self, seed: int) -> torch.Tensor:
        """The state of this device's generator seeded with `seed`, made without touching any process-wide one."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator.get_state()

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def fork(self, name: str = "tp"):
        """Runs the block with stream `name` as the device's generator, then puts the outer state back."""
        if self._active and self._active[-1] == name:  # already in: forking again would replay its draws
            yield
            return
        outer = self._get()
        if self._active:  # the stream being left keeps what it drew so far
            self._states[self._active[-1]] = outer
        self._set(self._states[name])
        self._active.append(name)
        try:
            yield
        finally:
            self._active.pop()
            self._states[name] = self._get()
            self._set(outer)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Every stream's current state (the one forked in read live from the device), as CPU byte tensors."""
        states = {k: v.clone() for k, v in self._states.items()}
        if self._active:
            states[self._active[-1]] = self._get().clone()
        return states

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {k: v.clone() for k, v in states.items() if k != "cpu"}  # "cpu": older checkpoints
        if self._active:
            self._set(self._states[self._active[-1]])
