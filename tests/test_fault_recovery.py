"""Fault recovery end to end: a rank killed mid-run at 8 processes, and the documented restart recipe
(`python -m engine.launch`: a fresh torchrun per attempt with --auto-resume) finishes the run with every step's
loss and gradient norm identical to an uninterrupted run, losing at most the save interval."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, trajectory

pytestmark = pytest.mark.e2e
FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-heads", "8",
         "--num-kv-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--steps", "10", "--lr-warmup-steps", "2", "--eval-interval", "5", "--eval-iters", "2", "--device", "cpu",
         "--precision", "fp32", "--tp", "2", "--pp", "2", "--dp", "2", "--save-interval", "2", "--data", "corpus"]


def run(cmd, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_a_killed_rank_is_restarted_and_the_run_matches_an_uninterrupted_one(tmp_path):
    from engine.data.datasets import stdlib_sources
    (tmp_path / "corpus").mkdir()
    for i, path in enumerate(stdlib_sources()[:40]):
        (tmp_path / "corpus" / f"doc{i:03d}.py").write_bytes(open(path, "rb").read())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8",
                os.path.join(ROOT, "examples", "pretrain_llama.py")]
    proc = run(torchrun + FLAGS + ["--run-name", "whole"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launcher = [sys.executable, "-m", "engine.launch", "--nproc-per-node", "8", "--max-restarts", "2", "--"]
    proc = run(launcher + FLAGS + ["--run-name", "killed", "--inject-fault", "kill@8:3"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--inject-fault: killing rank 3 at step 8" in proc.stderr
    restarts = [line for line in proc.stderr.splitlines() if line.startswith("engine.launch:")]
    assert len(restarts) == 1 and "latest checkpoint: step 6; restarting" in restarts[0], restarts
    expected = trajectory(tmp_path / "runs" / "whole" / "metrics.jsonl")
    got = trajectory(tmp_path / "runs" / "killed" / "metrics.jsonl")  # steps 7 and 8 were run twice: the later wins
    assert sorted(got) == sorted(expected) and len({k[0] for k in got}) == 10
    assert got == expected  # resuming is bit-exact: the restart changed nothing


def test_a_bad_flag_is_refused_before_any_launch(tmp_path):
    proc = run([sys.executable, "-m", "engine.launch", "--nproc-per-node", "8", "--", "--tp", "3"], tmp_path)
    assert proc.returncode == 2 and "error: --tp" in proc.stderr and "engine.launch: attempt" not in proc.stderr
