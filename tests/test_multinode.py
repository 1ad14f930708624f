"""Two torchrun agents as two "nodes" on this machine (c10d rendezvous on localhost, 4 processes each) train the
default tp 2 x pp 2 x dp 2 job with every step's loss and gradient norm equal to one agent's 8-process run."""
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, trajectory

pytestmark = pytest.mark.e2e
FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-heads", "8",
         "--num-kv-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--steps", "6", "--device", "cpu", "--precision", "fp32", "--data", "corpus"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_train_like_one(tmp_path):
    from engine.data.datasets import stdlib_sources
    (tmp_path / "corpus").mkdir()
    for i, path in enumerate(stdlib_sources()[:40]):
        (tmp_path / "corpus" / f"doc{i:03d}.py").write_bytes(open(path, "rb").read())
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "torch.distributed.run"]
    one = subprocess.run(run + ["--standalone", "--nproc-per-node", "8", "-m", "engine.training"] + FLAGS +
                         ["--run-name", "one"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    agents = [subprocess.Popen(run + ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "4",
                                      "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                      "--rdzv-id", "two-nodes", "-m", "engine.training"] + FLAGS +
                                     ["--run-name", "two"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    expected = trajectory(tmp_path / "runs" / "one" / "metrics.jsonl")
    got = trajectory(tmp_path / "runs" / "two" / "metrics.jsonl")
    assert len(got) == 12 and got == expected
