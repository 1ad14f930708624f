"""Layout invariance end to end: every parallel layout, launched with torchrun through
examples/pretrain_llama.py, reproduces the single-process loss of every step (fp32, same seed and data)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, step_losses

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-heads", "8",
         "--num-kv-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--steps", "8", "--lr-decay-steps", "8", "--lr-warmup-steps", "2"]
RTOL = 1e-5


def launch(nproc, argv, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "examples", "pretrain_llama.py")] if nproc > 1 else [
           sys.executable, os.path.join(ROOT, "examples", "pretrain_llama.py")]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from engine.data.datasets import stdlib_sources
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, path in enumerate(stdlib_sources()[:40]):
        (corpus / f"doc{i:03d}.py").write_bytes(open(path, "rb").read())
    launch(1, MODEL + ["--data", "corpus", "--run-name", "single", "--save-interval", "4"], root)
    return root


def assert_same_losses(workdir, run, steps=range(1, 9)):
    ref = step_losses(workdir / "runs" / "single" / "metrics.jsonl")
    got = step_losses(workdir / "runs" / run / "metrics.jsonl")
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=RTOL), (step, got[step], ref[step])


@pytest.mark.parametrize("nproc,layout", [
    (2, ["--tp", "2"]),
    (4, ["--tp", "4"]),
    (2, ["--tp", "2", "--sequence-parallel"]),
    (4, ["--tp", "2", "--dp", "2"]),
    (2, ["--tp", "2", "--recompute", "full"]),
    (2, ["--tp", "2", "--recompute", "selective"]),
    (2, ["--dp", "2"]),
    (2, ["--pp", "2"]),
    (4, ["--pp", "4"]),
    (2, ["--pp", "2", "--schedule", "gpipe"]),
    (2, ["--pp", "2", "--vpp", "2"]),
    (4, ["--tp", "2", "--pp", "2", "--sequence-parallel", "--recompute", "full"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2"]),
    (2, ["--dp", "2", "--zero", "0", "--bucket-size", "30000"]),
    (2, ["--dp", "2", "--zero", "1", "--bucket-size", "30000"]),
    (2, ["--dp", "2", "--zero", "2", "--bucket-size", "30000"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2", "--zero", "1"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2", "--zero", "2", "--sequence-parallel", "--vpp", "2"]),
    (2, ["--dp", "2", "--zero", "1", "--bucket-size", "30000", "--overlap-param-gather"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2", "--zero", "2", "--vpp", "2", "--overlap-param-gather"]),
    (2, ["--dp", "2", "--zero", "3"]),
    (4, ["--dp", "4", "--zero", "3", "--zero3-keep-params", "--recompute", "full"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2", "--zero", "3", "--sequence-parallel"]),
], ids=lambda v: "-".join(v).replace("--", "") if isinstance(v, list) else str(v))
def test_layout_reproduces_single_process(workdir, nproc, layout):
    name = "run" + "".join(layout).replace("--", "_")
    launch(nproc, MODEL + ["--data", "corpus", "--run-name", name] + layout, workdir)
    assert_same_losses(workdir, name)


def test_checkpoint_loads_under_another_layout(workdir):
    """The single-process step-4 checkpoint resumes at tp 2 x pp 2 and continues the same trajectory."""
    launch(4, MODEL + ["--data", "corpus", "--run-name", "resharded", "--tp", "2", "--pp", "2",
                       "--load", "runs/single/checkpoints/step_00000004"], workdir)
    assert_same_losses(workdir, "resharded", steps=range(5, 9))


def test_tied_embeddings_stay_in_sync_across_stages(workdir):
    tied = MODEL + ["--data", "corpus", "--tie-embeddings"]
    launch(1, tied + ["--run-name", "tied-single"], workdir)
    launch(2, tied + ["--run-name", "tied-pp2", "--pp", "2"], workdir)
    launch(8, tied + ["--run-name", "tied-3d", "--tp", "2", "--pp", "2", "--dp", "2", "--vpp", "2",
                      "--sequence-parallel", "--zero", "3"], workdir)
    # one stage: the head reads the embedding's ZeRO-3 unit
    launch(2, tied + ["--run-name", "tied-zero3", "--dp", "2", "--zero", "3"], workdir)
    ref = step_losses(workdir / "runs" / "tied-single" / "metrics.jsonl")
    for run in ("tied-pp2", "tied-3d", "tied-zero3"):
        assert step_losses(workdir / "runs" / run / "metrics.jsonl") == pytest.approx(ref, rel=RTOL), run


def test_resume_at_the_same_parallel_layout_is_exact(workdir):
    layout = ["--tp", "2", "--pp", "2", "--dp", "2", "--sequence-parallel", "--dropout", "0.1"]
    launch(8, MODEL + ["--data", "corpus", "--run-name", "straight"] + layout, workdir)
    launch(8, MODEL + ["--data", "corpus", "--run-name", "halves", "--steps", "4"] + layout, workdir)
    launch(8, MODEL + ["--data", "corpus", "--run-name", "halves", "--load", "runs/halves/checkpoints"] + layout,
           workdir)
    assert step_losses(workdir / "runs" / "halves" / "metrics.jsonl") == \
        step_losses(workdir / "runs" / "straight" / "metrics.jsonl")


def test_zero_parameters_match_plain_data_parallelism(workdir):
    """After the run, ZeRO-1/2 hold the same weights as plain data parallelism (ZeRO-0)."""
    from engine.training.checkpoint import CheckpointReader
    final = lambda run: CheckpointReader(str(workdir / "runs" / run / "checkpoints" / "step_00000008"))  # noqa
    plain = final("run_dp2_zero0_bucket-size30000")
    for run in ("run_dp2_zero1_bucket-size30000", "run_dp2_zero2_bucket-size30000", "run_dp2_zero3"):
        sharded = final(run)
        for key in plain.keys("model/"):
            a, b = plain.read(key), sharded.read(key)
            assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (run, key)


def test_bf16_zero3_checkpoint_resumes_zero1(workdir):
    """bf16 ZeRO-3 (bf16 parameter shards, fp32 masters in the optimizer) follows bf16 ZeRO-1, checkpoints the
    same fp32 masters, and its checkpoint resumes a ZeRO-1 run on the same trajectory."""
    from engine.training.checkpoint import CheckpointReader
    bf16 = MODEL + ["--data", "corpus", "--precision", "bf16", "--dp", "2", "--save-interval", "4"]
    launch(2, bf16 + ["--run-name", "bf16-z1", "--zero", "1"], workdir)
    launch(2, bf16 + ["--run-name", "bf16-z3", "--zero", "3", "--steps", "4"], workdir)
    at_4 = [CheckpointReader(str(workdir / "runs" / run / "checkpoints" / "step_00000004")) for run in
            ("bf16-z1", "bf16-z3")]
    masters = [k for k in at_4[0].keys("optim/") if k.endswith("/master_param")]
    assert masters and masters == [k for k in at_4[1].keys("optim/") if k.endswith("/master_param")]
    for key in masters:
        a, b = (r.read(key) for r in at_4)  # the runs differ only in reduction order: far below bf16 rounding
        bf16_rounding = (a - a.bfloat16().float()).abs().mean()
        assert a.dtype == b.dtype == torch.float32 and (a - b).abs().mean() <= 0.25 * bf16_rounding, key
    launch(2, bf16 + ["--run-name", "bf16-z3", "--zero", "1", "--load", "runs/bf16-z3/checkpoints"], workdir)
    ref = step_losses(workdir / "runs" / "bf16-z1" / "metrics.jsonl")
    got = step_losses(workdir / "runs" / "bf16-z3" / "metrics.jsonl")
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, got[step], ref[step])
