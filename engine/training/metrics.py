"""Metrics: the JSON-lines file, the console progress line, peak-FLOP/s table and the loss plot."""
from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch

# Dense peak TFLOP/s per device (no sparsity), by device-name fragment and compute precision.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, table in PEAK_TFLOPS.items():
        if fragment in name:
            return table[precision]
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so a crash loses nothing already logged.
    Only the writing rank (global rank 0) opens the file."""

    def __init__(self, path: str | None, append: bool):
        self.path, self._fh = path, None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fh = open(path, "a" if append else "w")

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class Progress:
    """A compact line per logged step; with a terminal attached, also a tqdm bar (when tqdm is installed)."""

    def __init__(self, total_steps: int, initial_step: int, enabled: bool):
        self.enabled, self.bar = enabled, None
        if enabled and sys.stdout.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def step_line(rec: dict, total_steps: int) -> str:
    text = (f"step {rec['step']:>6}/{total_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
            f"grad norm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | "
            f"{rec['tflops_per_device']:.3f} TFLOP/s/device")
    if rec.get("mfu") is not None:
        text += f" | MFU {100 * rec['mfu']:.1f}%"
    if rec.get("skipped"):
        text += " | SKIPPED (non-finite gradient)"
    return text


def plot_losses(metrics_path: str, out_path: str) -> bool:
    """Writes the loss curve (and eval points) to a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, evals = {}, {}
    with open(metrics_path) as fh:
        for line in fh:
            rec = json.loads(line)
            if "event" not in rec and rec.get("loss") is not None:
                train[rec["step"]] = rec["loss"]  # after a rollback the repeated steps overwrite
            elif rec.get("event") == "eval":
                evals[rec["step"]] = rec["eval_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(train), list(train.values()), label="train loss", linewidth=1)
    if evals:
        ax.plot(list(evals), list(evals.values()), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return True
