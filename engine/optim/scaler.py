"""Loss scaling for fp16: dynamic (grow after a run of clean steps, back off on overflow) or static."""
from __future__ import annotations


class LossScaler:
    """scale starts at `initial`; an overflow multiplies it by `backoff` once `hysteresis` overflows have been
    seen since the last growth; `growth_interval` clean steps in a row multiply it by `growth`.
    With dynamic=False the scale never changes (overflowing steps are still skipped)."""

    def __init__(self, initial: float = 2.0 ** 16, dynamic: bool = True, growth: float = 2.0,
                 backoff: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2, min_scale: float = 1.0):
        self.scale, self.dynamic = float(initial), dynamic
        self.growth, self.backoff, self.growth_interval = growth, backoff, growth_interval
        self.hysteresis, self.min_scale = hysteresis, min_scale
        self.clean_steps, self.hysteresis_left = 0, hysteresis

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth
            self.clean_steps, self.hysteresis_left = 0, self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps, self.hysteresis_left = int(state["clean_steps"]), int(state["hysteresis_left"])
