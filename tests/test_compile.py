"""--compile (torch.compile per transformer layer) gives the eager run's losses: the tiny model (sequence cut to
64 tokens) for 20 steps in fp32, within 1e-5 relative at every step (grad norm 1e-4), in one process with selective
recompute and at tp 2, pp 2, dp 2 / ZeRO-1, tp 2 + SP with full recompute and dp 2 / ZeRO-3 against the one-process
eager run; the compiler does its work in
the first step and nothing after it (no recompilation, no graph break in the steady state)."""
import functools
import os

import pytest

import distributed
from conftest import trajectory
from engine.training import parse_config, validate
from engine.training.trainer import Trainer

TINY = ["--model", "tiny", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--steps", "20", "--lr-decay-steps", "20", "--lr-warmup-steps", "2", "--device", "cpu", "--precision", "fp32"]
pytestmark = pytest.mark.e2e
RTOL = 1e-5
# the gradient norm sums over the whole batch's tokens and moves more with summation order (see test_parallel_e2e)
GRAD_NORM_RTOL = 1e-4


def run(argv, world=1) -> tuple[dict, list]:
    """Trains; returns the trajectory of the metrics file and the step records."""
    import torch._dynamo
    torch._dynamo.reset()  # every run compiles from scratch (and the recompilation limit is per run)
    cfg = parse_config(TINY + argv)
    validate(cfg, world)
    trainer = Trainer(cfg)
    trainer.train()
    return trajectory(trainer.metrics_path), _steps(trainer.metrics_path)


def _steps(path) -> list:
    import json
    with open(path) as fh:
        return [r for r in map(json.loads, fh) if "event" not in r]


def assert_same(got: dict, expected: dict, what: str):
    assert sorted(got) == sorted(expected), what
    for key, value in expected.items():
        rtol = GRAD_NORM_RTOL if key[1] == "grad_norm" else RTOL
        assert abs(got[key] - value) <= rtol * abs(value), (what, key, got[key], value)


def assert_steady(steps: list, what: str):
    """Compilation happens in step 1 only; no graph break anywhere."""
    assert steps[0]["compiled_frames"] >= 1, what
    assert all(r["compiled_frames"] == 0 for r in steps[1:]), (what, [r["compiled_frames"] for r in steps])
    assert all(r["graph_breaks"] == 0 for r in steps), (what, [r["graph_breaks"] for r in steps])


@pytest.fixture(scope="module")
def eager(tmp_path_factory, corpus_dir):
    workdir = tmp_path_factory.mktemp("compile")
    os.chdir(workdir)
    got, steps = run(["--data", corpus_dir, "--run-name", "eager"])
    assert "compiled_frames" not in steps[0]
    return workdir, got


def test_single_process_selective_recompute(eager, corpus_dir):
    """Selective recompute's checkpoint traced inside the compiled layer (plain --compile: test_layouts)."""
    workdir, expected = eager
    os.chdir(workdir)
    got, steps = run(["--data", corpus_dir, "--run-name", "compiled-selective", "--compile", "--recompute",
                      "selective"])
    assert_same(got, expected, "selective")
    assert_steady(steps, "selective")


def _layouts(rank, world, corpus, workdir, expected):
    os.chdir(workdir)
    for layout in (["--tp", "2"], ["--pp", "2"], ["--dp", "2", "--zero", "1"],
                   # the traced single-tensor collectives of SP, the eager hooks of ZeRO-3
                   ["--tp", "2", "--sequence-parallel", "--recompute", "full"], ["--dp", "2", "--zero", "3"]):
        name = "compiled" + "".join(layout).replace("--", "_")
        got, steps = run(["--data", corpus, "--run-name", name, "--compile"] + layout, world)
        if rank == 0:  # (the metrics are rank 0's)
            assert_same(got, expected, name)
            assert_steady(steps, name)


def test_layouts(eager, corpus_dir):
    workdir, expected = eager
    distributed.run(functools.partial(_layouts, corpus=corpus_dir, workdir=str(workdir), expected=expected), world=2)


def test_graph_breaks_are_named(eager, corpus_dir, capsys):
    """--document-mask leaves per-document attention eager (a disabled function: counted breaks); the log names
    the cause once, in the step that met them."""
    workdir, _ = eager
    os.chdir(workdir)
    _, steps = run(["--data", corpus_dir, "--run-name", "compiled-docs", "--compile", "--document-mask",
                    "--steps", "2"])
    assert steps[0]["graph_breaks"] > 0 and steps[1]["graph_breaks"] == 0
    out = capsys.readouterr().out
    assert out.count("graph break(s) in step") == 1
    assert f"--compile: {steps[0]['graph_breaks']} graph break(s) in step 1; causes so far: " in out
