"""What a run shows and leaves besides checkpoints: the start-up banner, --tensorboard event files, and the loss
plot (with or without matplotlib)."""
import json
import math
import os
import struct
import sys
import zlib

import numpy as np
import pytest

from conftest import SMALL, read_metrics, step_losses
from engine.training import main
from engine.training.banner import LABEL_WIDTH, format_banner, human_bytes, human_count
from engine.training.metrics import (
    EVAL_COLOR,
    TENSORBOARD_MISSING,
    TRAIN_COLOR,
    plot_losses,
    png_bytes,
    read_losses,
    render_losses,
)

SMALL_PARAMS = 2 * (259 * 64) + 64 + 2 * (2 * 64 + 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def banner_args(**overrides):
    args = dict(
        run_name="tiny-tp2-pp2-dp2", model="tiny: 4 layers, hidden 256", steps=200, params=3_149_824,
        params_per_rank=811_136,
        layout={"tp": 2, "pp": 2, "dp": 2, "vpp": 1, "zero": 1, "world": 8, "schedule": "1f1b",
                "sequence_parallel": True},
        precision="bf16", loss_scale=None, kernels="CUDA prebuilt: engine._fused_cuda",
        batch={"global": 16, "micro": 4, "seq": 256, "rampup": None},
        data={"documents": 731, "tokens": 12_119_372, "train": {"tokens": 12_000_000, "samples": 46_875},
              "valid": {"tokens": 119_372, "samples": 466}},
        memory={"params": 2 ** 20, "grads": 2 ** 21, "optimizer": 3 * 2 ** 21, "activations": 5 * 2 ** 19,
                "total": 11.5 * 2 ** 20, "zero_buffers": 0, "loss_buffers": 2 ** 19, "peak": 12 * 2 ** 20},
        memory_stage=0,
        outputs={"metrics": "runs/x/metrics.jsonl", "plot": "runs/x/loss.png", "checkpoints": "runs/x/checkpoints",
                 "tensorboard": None})
    args.update(overrides)
    return args


def banner_rows(text):
    """{label: text} of the banner's aligned lines (and the header under key None)."""
    header, *lines = text.splitlines()
    rows = {None: header}
    for line in lines:
        assert line.startswith("  ") and line[2 + LABEL_WIDTH - 1] == " ", line  # labels in one column
        rows[line[2:2 + LABEL_WIDTH].strip()] = line[2 + LABEL_WIDTH:]
    return rows


def test_banner_format():
    rows = banner_rows(format_banner(**banner_args()))
    assert list(rows) == [None, "parameters", "layout", "precision", "kernels", "batch", "data", "memory", "metrics",
                          "plot", "checkpoints", "tensorboard"]
    assert rows[None] == "engine | run tiny-tp2-pp2-dp2 | model tiny: 4 layers, hidden 256"
    assert rows["parameters"] == "3,149,824 (3.15M) total | 811,136 (811K) per rank"
    assert rows["layout"] == ("world 8 = tp 2 x pp 2 x dp 2 | vpp 1, schedule 1f1b | sequence parallel on | "
                              "ZeRO-1")
    assert rows["precision"] == "bf16 parameters and compute; fp32 master weights in the optimizer"
    assert rows["kernels"] == "CUDA prebuilt: engine._fused_cuda"
    assert rows["batch"] == "global 16 = 2 micro-batches of 4 x dp 2 | seq 256 | 4,096 tokens/step | 200 steps"
    assert rows["data"] == ("731 documents, 12.1M tokens | train 12.0M tokens, 46.9K samples | "
                            "valid 119K tokens, 466 samples")
    assert rows["memory"] == ("~12.0 MiB per rank at the step's peak (estimate, pipeline stage 0): params 1.0 MiB, "
                              "grads 2.0 MiB, optimizer 6.0 MiB, activations 2.5 MiB, loss buffers 512.0 KiB")
    assert rows["metrics"] == "runs/x/metrics.jsonl" and rows["plot"] == "runs/x/loss.png"
    assert rows["checkpoints"] == "runs/x/checkpoints" and rows["tensorboard"].startswith("off")


def test_banner_variants():
    """fp16's loss scale, ZeRO-3's parameter shard, a ramp-up, a blend, no validation set, unknown counts."""
    text = format_banner(**banner_args(
        precision="fp16", loss_scale="dynamic",
        layout={"tp": 1, "pp": 1, "dp": 4, "vpp": 1, "zero": 3, "world": 4, "schedule": "1f1b",
                "sequence_parallel": False},
        batch={"global": 16, "micro": 2, "seq": 64, "rampup": "8,8,1000"},
        data={"documents": None, "tokens": None, "train": {"tokens": None, "samples": 100}, "valid": None},
        memory=None, blend=[(0.7, "web.jsonl"), (0.3, "code/")],
        outputs={"metrics": "m.jsonl", "plot": "p.png", "checkpoints": "ck", "tensorboard": "tb"}))
    rows = banner_rows(text)
    assert rows["precision"].endswith("fp32 master weights in the optimizer; loss scale dynamic")
    assert rows["parameters"].endswith("per rank, 1/4 of it held between steps (ZeRO-3)")
    assert rows["batch"].startswith("global 16 (ramp-up 8,8,1000) = 2 micro-batches of 2 x dp 4")
    assert rows["data"] == "train 100 samples | valid: none"
    assert rows["blend"] == "0.7 web.jsonl | 0.3 code/"
    assert "memory" not in rows and rows["tensorboard"] == "tb"
    assert "fp32 parameters and compute; the fp32 parameters are their own master weights" in \
        format_banner(**banner_args(precision="fp32"))


def test_banner_names_the_speed_flags_and_estimates_with_them(run_dir, corpus):
    from engine.training import parse_config, validate
    from engine.training.banner import trainer_banner
    from engine.training.trainer import Trainer
    rows = {}
    for name, flags in (("plain", []), ("fast", ["--compile", "--loss-chunk-tokens", "64"]),
                        ("fused", ["--fused-elementwise"])):
        cfg = parse_config(SMALL + ["--data", corpus, "--run-name", name, "--seq-length", "128"] + flags)
        validate(cfg, 1)
        rows[name] = banner_rows(trainer_banner(Trainer(cfg)))
    assert rows["fast"]["kernels"].endswith(" | layers compiled (torch.compile) | head + loss fused, 64 tokens at a "
                                            "time")
    assert rows["fast"]["memory"] != rows["plain"]["memory"]  # the estimate without the logits (vocab 259 > 64)
    assert rows["fused"]["kernels"].endswith(" | layers eager | RMSNorm, RoPE, SwiGLU fused (in torch ops: no kernels "
                                             "here)")
    assert rows["fused"]["memory"] != rows["plain"]["memory"]  # the norms and SwiGLU keep less


def test_human_units():
    assert [human_count(n) for n in (999, 1000, 46_875, 3_149_824, 6_738_415_616)] == \
        ["999", "1.00K", "46.9K", "3.15M", "6.74B"]
    assert [human_bytes(n) for n in (512, 2048, 3 * 2 ** 30)] == ["512 B", "2.0 KiB", "3.0 GiB"]


def test_banner_and_tensorboard_of_a_run(run_dir, corpus, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert main(SMALL + ["--data", corpus, "--steps", "4", "--eval-interval", "2", "--run-name", "t",
                         "--tensorboard", "tb"]) == 0
    out = capsys.readouterr().out
    assert out.count("engine | run t | model tiny") == 1
    assert out.index("engine | run t") < out.index("step      1/4")  # printed before the first step
    rows = banner_rows(out[out.index("engine | run t"):out.index("\nstep      1/4")])
    assert rows["parameters"].startswith(f"{SMALL_PARAMS:,} (")
    assert rows["layout"].startswith("world 1 = tp 1 x pp 1 x dp 1")
    assert rows["data"].startswith("40 documents")
    assert rows["memory"].startswith("~") and rows["tensorboard"] == "tb"
    assert rows["metrics"] == os.path.join("runs", "t", "metrics.jsonl")
    assert rows["kernels"].endswith(" | layers eager")

    # the event file holds the metrics file's scalars: every step line's numeric fields and the eval losses
    acc = EventAccumulator("tb", size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "global_batch_size", "consumed_samples", "tokens_per_s", "tflops_per_device",
            "peak_mem_bytes", "loss_scale", "skipped", "eval_loss"} <= tags
    losses = {e.step: e.value for e in acc.Scalars("loss")}
    expected = step_losses("runs/t/metrics.jsonl")
    assert list(losses) == [1, 2, 3, 4]
    assert losses == pytest.approx(expected, rel=1e-6)  # (stored as float32)
    records = read_metrics("runs/t/metrics.jsonl")
    evals = {r["step"]: r["eval_loss"] for r in records if r.get("event") == "eval"}
    assert {e.step: e.value for e in acc.Scalars("eval_loss")} == pytest.approx(evals, rel=1e-6)
    lrs = {r["step"]: r["lr"] for r in records if "event" not in r}
    assert {e.step: e.value for e in acc.Scalars("lr")} == pytest.approx(lrs, rel=1e-6)
    assert [e.value for e in acc.Scalars("skipped")] == [0.0] * 4


def test_tensorboard_missing_is_one_line_exit_2(run_dir, corpus, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails, as when not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(SMALL + ["--data", corpus, "--steps", "2", "--run-name", "t", "--tensorboard", "tb"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {TENSORBOARD_MISSING}"
    assert TENSORBOARD_MISSING == "--tensorboard needs the tensorboard package: pip install tensorboard"
    assert "engine | run" not in captured.out and not os.path.exists("runs/t/metrics.jsonl")  # before training


def decode_png(data: bytes) -> np.ndarray:
    """The RGB pixels of an 8-bit RGB, non-interlaced PNG whose rows use filter 0 (what png_bytes writes), after
    checking the signature, every chunk's CRC and the chunk order."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def pixels_of(img: np.ndarray, color) -> np.ndarray:
    """(row, column) of the pixels of exactly `color`."""
    return np.argwhere((img == np.array(color, np.uint8)).all(axis=-1))


def test_plot_without_matplotlib(run_dir, corpus, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, as on a fresh install
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert main(SMALL + ["--data", corpus, "--steps", "4", "--eval-interval", "2", "--run-name", "p"]) == 0
    assert "loss curve: runs/p/loss.png" in capsys.readouterr().out
    with open("runs/p/loss.png", "rb") as fh:
        data = fh.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (700, 400)
    img = decode_png(data)
    assert img.shape == (400, 700, 3)
    assert len(pixels_of(img, TRAIN_COLOR)) > 100 and len(pixels_of(img, EVAL_COLOR)) > 20
    try:  # an independent decoder agrees, where one is installed
        from PIL import Image
    except ImportError:
        return
    with Image.open("runs/p/loss.png") as im:
        assert im.size == (700, 400) and (np.asarray(im.convert("RGB")) == img).all()


def test_png_renderer_draws_the_curve(tmp_path):
    """A falling curve starts high on the left and ends low on the right, an eval point sits where its value is,
    and non-finite losses are left out."""
    lines = [{"event": "layout", "tp": 1}]
    lines += [{"step": s, "loss": 5.0 - s / 25} for s in range(1, 101)]
    lines += [{"step": 101, "loss": None}, {"step": 102, "loss": "inf"},
              {"event": "eval", "step": 50, "eval_loss": 3.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    train, evals = read_losses(str(path))
    assert len(train) == 100 and math.isclose(train[50], 3.0) and evals == {50: 3.0}
    img = decode_png(png_bytes(render_losses(train, evals)))
    curve = pixels_of(img, TRAIN_COLOR)
    curve = curve[curve[:, 0] > 60]  # below the legend's swatch
    first, last = curve[curve[:, 1].argmin()], curve[curve[:, 1].argmax()]
    assert first[0] < last[0] and last[1] - first[1] > 500  # high to low across the plot's width
    marker = pixels_of(img, EVAL_COLOR)
    marker = marker[marker[:, 0] > 60].mean(axis=0)
    beside = curve[np.abs(np.abs(curve[:, 1] - marker[1]) - 6) <= 1]  # the curve just left and right of it
    assert abs(beside[:, 0].mean() - marker[0]) < 2  # eval 3.0 = the train loss at step 50: on the curve


def test_plot_failure_is_one_line_not_an_error(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert plot_losses(str(metrics), str(blocker / "loss.png")) is False  # its directory is a file
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: loss curve not written to {blocker / 'loss.png'}")
