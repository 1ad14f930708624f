"""The embedding examples run as a user runs them, and train the same at tp 2 x dp 2 as in one process.

examples/embed_plain_loop.py (a user's model, ZeRO-3) and examples/embed_hf_llama.py (transformers'
LlamaForCausalLM, ZeRO-2) are each launched once with torchrun at world 4 (tp 2, dp 2) and once as a plain
script (world 1: no tensor parallelism, nothing sharded); every step's loss and gradient norm must agree. Clipping
is active in the runs, so a norm that missed the other tp rank's slices, or counted a replica twice, would change
the losses too. fp32 on CPU: the layouts differ only in the order of sums (measured: 2.3e-7 relative at most).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.e2e
RTOL = 1e-5


def run_example(script, nproc, argv, workdir):
    """The example's per-step {"loss": [...], "grad_norm": [...]} (its --json output)."""
    out = workdir / f"{script}.{nproc}.json"
    path = os.path.join(ROOT, "examples", script)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [path, *argv, "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as fh:
        return json.load(fh)


def assert_same_run(got, ref, clip):
    assert max(ref["grad_norm"]) > clip, "clipping should be active in the comparison"
    assert ref["loss"][-1] < ref["loss"][0]
    for key in ("loss", "grad_norm"):
        assert len(got[key]) == len(ref[key])
        for step, (value, expected) in enumerate(zip(got[key], ref[key]), 1):
            assert value == pytest.approx(expected, rel=RTOL), (key, step, value, expected)


def test_plain_loop_tp2_dp2_zero3_matches_one_process(tmp_path):
    argv = ["--steps", "20", "--clip", "0.5"]
    ref = run_example("embed_plain_loop.py", 1, argv, tmp_path)
    got = run_example("embed_plain_loop.py", 4, argv + ["--tp", "2", "--zero-stage", "3"], tmp_path)
    assert_same_run(got, ref, clip=0.5)


def test_hf_llama_tp2_dp2_zero2_matches_one_process(tmp_path):
    pytest.importorskip("transformers")
    argv = ["--steps", "10", "--clip", "1.0"]
    ref = run_example("embed_hf_llama.py", 1, argv, tmp_path)
    got = run_example("embed_hf_llama.py", 4, argv + ["--tp", "2", "--zero-stage", "2"], tmp_path)
    assert_same_run(got, ref, clip=1.0)
