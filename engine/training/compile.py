"""--compile: torch.compile applied to each transformer layer (as torchtitan does), and the count of what the
compiler did, for the metrics.

Layers compile one by one rather than the whole model: every layer has the same code and shapes, so one
compiled graph serves them all (dynamo treats the parameters as inputs), and the embedding, the head, the
pipeline's transfers and the loss stay eager. Only each layer's `forward` is compiled: the parameter names do
not change (checkpoints and ZeRO's buffers see the same model) and the module hooks around it (ZeRO-3's
gathers, the overlap waits) stay eager.
"""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters


def compile_layers(chunks) -> None:
    """Compiles the forward of every transformer layer of the model chunks, in place."""
    for chunk in chunks:
        for layer in chunk.layers.values():
            layer.forward = torch.compile(layer.forward)


def _totals() -> tuple[int, int]:
    return counters["frames"]["total"], sum(counters["graph_break"].values())


def graph_break_reasons() -> list[str]:
    """The first line of each distinct graph-break reason so far."""
    return sorted({reason.strip().splitlines()[0] for reason in counters["graph_break"]})


class CompileCounts:
    """What the compiler did since the last call: frames compiled (first compilations and recompilations alike)
    and graph breaks met while tracing. Both are zero in a steady state (an evaluation's first forward
    compiles its own graphs once)."""

    def __init__(self):
        self._last = _totals()  # (the counters are the process's: another model compiling in between counts too)

    def since_last(self) -> dict:
        now = _totals()
        frames, breaks = (a - b for a, b in zip(now, self._last))
        self._last = now
        return {"compiled_frames": frames, "graph_breaks": breaks}
