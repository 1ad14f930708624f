"""Metrics: the JSON-lines file (and its TensorBoard copy), the console progress line, peak-FLOP/s table and the
loss plot."""
from __future__ import annotations

import json
import math
import os
import resource
import struct
import sys
import time
import zlib

import numpy as np
import torch

from engine.training.config import ConfigError

TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard"

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


class PhaseTimer:
    """Durations of a step's phases without waiting for the device: on CUDA each mark is an event on the current
    stream, read once the step's own wait has passed them all (the stream's time between marks, communication
    waits included); elsewhere the host clock, which is the work's own time there."""

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.cuda, self.clock = device.type == "cuda", clock
        self.marks: list[tuple[str, object]] = []

    def start(self) -> None:
        """The step begins (what an interrupted step marked is dropped)."""
        self.marks = []
        self.mark("start")

    def mark(self, name: str) -> None:
        """The end of phase `name`."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, self.clock()))

    def seconds(self) -> dict[str, float]:
        """{"<phase>_s": seconds} of each phase marked since start (on CUDA: once the device has passed the last
        mark)."""
        return {f"{name}_s": a.elapsed_time(b) / 1e3 if self.cuda else b - a
                for (_, a), (name, b) in zip(self.marks, self.marks[1:])}


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def require_tensorboard():
    """torch's SummaryWriter; a ConfigError (one line, exit status 2) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(TENSORBOARD_MISSING) from None
    return SummaryWriter


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so a crash loses nothing already logged.
    Only the writing rank (global rank 0) opens the file."""

    def __init__(self, path: str | None, append: bool):
        self.path, self._fh, self._tb = path, None, None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fh = open(path, "a" if append else "w")

    def add_tensorboard(self, log_dir: str, purge_step: int) -> None:
        """Also writes every step line's numeric fields and every eval loss as TensorBoard scalars in log_dir,
        tagged with the metrics' own keys (a field holding {name: number} as key/name). TensorBoard hides what
        earlier runs logged there from purge_step on (the next step of this run), as a resumed run's metrics
        supersede those lines."""
        self._tb = require_tensorboard()(log_dir=log_dir, purge_step=purge_step)

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._fh.flush()
        if self._tb is not None and record.get("event") in (None, "eval"):
            for key, value in record.items():
                items = value.items() if isinstance(value, dict) else [(None, value)]  # {name: number}: key/name
                for name, number in items:
                    if key not in ("step", "event") and isinstance(number, (int, float)):  # (bools as 0/1)
                        self._tb.add_scalar(key if name is None else f"{key}/{name}", float(number),
                                            global_step=record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


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


def read_losses(metrics_path: str) -> tuple[dict, dict]:
    """({step: train loss}, {step: eval loss}) of a metrics file, finite values only (after a rollback the
    repeated steps overwrite)."""
    train, evals = {}, {}
    with open(metrics_path) as fh:
        for line in fh:
            rec = json.loads(line)
            if "event" not in rec:
                key, into = "loss", train
            elif rec["event"] == "eval":
                key, into = "eval_loss", evals
            else:
                continue
            value = rec.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                into[rec["step"]] = value
    return train, evals


def plot_losses(metrics_path: str, out_path: str) -> bool:
    """Writes the loss curve (and eval points) to a PNG: with matplotlib when it is installed, else with the
    dependency-free renderer below. Never raises: a failure prints one line and returns False."""
    try:
        train, evals = read_losses(metrics_path)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            tmp = out_path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(png_bytes(render_losses(train, evals)))
            os.replace(tmp, out_path)
            return True
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
    except Exception as exc:  # noqa: BLE001 - the plot is a convenience; the run's results are already saved
        print(f"warning: loss curve not written to {out_path} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return False


# ---- the loss plot without matplotlib: a numpy raster encoded as PNG -------------------------------------------

TRAIN_COLOR, EVAL_COLOR = (31, 119, 180), (255, 127, 14)
_FRAME, _GRID, _TEXT = (60, 60, 60), (225, 225, 225), (40, 40, 40)
# 3x5 glyphs of the characters the axis labels and the legend use
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "e": "010101111100011", "a": "000110011101111", "i": "010000010010010",
    "l": "110010010010111", "n": "000110101101101", "o": "000010101101010", "p": "000110101110100",
    "r": "000101110100100", "s": "000011110011110", "t": "010111010010011", "v": "000101101101010",
    " ": "000000000000000",
}
_SCALE = 2  # pixels per glyph dot


def _text(img: np.ndarray, x: int, y: int, text: str, color=_TEXT, anchor: str = "left") -> None:
    """Draws text with its top at y; x is its left edge, centre or right edge (anchor)."""
    width = (4 * len(text) - 1) * _SCALE
    x -= {"left": 0, "center": width // 2, "right": width}[anchor]
    for i, ch in enumerate(text):
        dots = np.array([int(b) for b in _GLYPHS.get(ch, _GLYPHS[" "])], dtype=bool).reshape(5, 3)
        block = np.kron(dots, np.ones((_SCALE, _SCALE), dtype=bool))
        x0 = x + 4 * i * _SCALE
        if x0 < 0 or y < 0:  # (a negative start would wrap around)
            continue
        region = img[y:y + block.shape[0], x0:x0 + block.shape[1]]
        region[block[:region.shape[0], :region.shape[1]]] = color


def _line(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, color, width: int = 2) -> None:
    """A polyline through the points (pixel coordinates), every segment sampled once per pixel."""
    if len(xs) == 1:
        xs, ys = np.repeat(xs, 2), np.repeat(ys, 2)
    dx, dy = np.diff(xs), np.diff(ys)
    n = np.maximum(np.abs(dx), np.abs(dy)).astype(np.int64) + 1
    seg = np.repeat(np.arange(len(n)), n)
    t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n, n)
    px = np.rint(xs[:-1][seg] + t * dx[seg]).astype(np.int64)
    py = np.rint(ys[:-1][seg] + t * dy[seg]).astype(np.int64)
    for ox in range(width):
        for oy in range(width):
            img[np.clip(py + oy, 0, img.shape[0] - 1), np.clip(px + ox, 0, img.shape[1] - 1)] = color


def _ticks(lo: float, hi: float, count: int = 5, min_step: float = 0.0) -> list[float]:
    """Round tick values (1, 2 or 5 x a power of ten apart, at least min_step) within [lo, hi]."""
    raw = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = max(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw), min_step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{round(value, 10):g}"


def render_losses(train: dict, evals: dict, width: int = 700, height: int = 400) -> np.ndarray:
    """The loss curve as an RGB image (uint8 [height, width, 3]): a framed plot with a light grid, labelled
    ticks, the train losses as a blue line, eval losses as orange squares joined by a line, and a legend."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 64, width - 24, 28, height - 44
    steps = list(train) + list(evals)
    values = list(train.values()) + list(evals.values())
    x_lo, x_hi = (min(steps), max(steps)) if steps else (0, 1)
    y_lo, y_hi = (min(values), max(values)) if values else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = 0.05 * (y_hi - y_lo) or 0.5
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_x(s):
        return left + (np.asarray(s, dtype=float) - x_lo) / (x_hi - x_lo) * (right - left)

    def to_y(v):
        return bottom - (np.asarray(v, dtype=float) - y_lo) / (y_hi - y_lo) * (bottom - top)

    for tick in _ticks(x_lo, x_hi, min_step=1):
        x = int(round(float(to_x(tick))))
        img[top:bottom, x] = _GRID
        img[bottom:bottom + 5, x] = _FRAME
        _text(img, x, bottom + 9, _label(tick), anchor="center")
    for tick in _ticks(y_lo, y_hi):
        y = int(round(float(to_y(tick))))
        img[y, left:right] = _GRID
        img[y, left - 5:left] = _FRAME
        _text(img, left - 9, y - 5, _label(tick), anchor="right")
    _text(img, (left + right) // 2, height - 14, "step", anchor="center")
    _text(img, left, top - 16, "loss")
    img[top, left:right + 1] = img[bottom, left:right + 1] = _FRAME
    img[top:bottom + 1, left] = img[top:bottom + 1, right] = _FRAME
    if train:
        _line(img, to_x(list(train)), to_y(list(train.values())), TRAIN_COLOR)
    if evals:
        ex, ey = to_x(list(evals)), to_y(list(evals.values()))
        _line(img, ex, ey, EVAL_COLOR, width=1)
        for x, y in zip(np.rint(ex).astype(int), np.rint(ey).astype(int)):
            img[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4] = EVAL_COLOR
    legend = [("train loss", TRAIN_COLOR)] + ([("eval loss", EVAL_COLOR)] if evals else [])
    for i, (name, color) in enumerate(legend):
        y = top + 10 + 16 * i
        img[y:y + 3, right - 120:right - 100] = color
        _text(img, right - 94, y - 4, name)
    return img


def png_bytes(img: np.ndarray) -> bytes:
    """An 8-bit RGB image (uint8 [height, width, 3]) as a PNG file: signature, IHDR, one zlib IDAT, IEND."""
    height, width, _ = img.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), np.uint8), img.reshape(height, 3 * width)], axis=1)  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))
