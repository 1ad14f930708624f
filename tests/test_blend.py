"""Blending `--data W1 PATH1 W2 PATH2 ...`: the proportions, determinism from the seed, layout independence and
resumption, and per-source sample counts in the metrics."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL, read_metrics, step_losses
from engine.data.blend import BlendedDataset, blend_schedule, parse_blend
from engine.data.sampler import GlobalBatchSampler
from engine.training import main


def test_parse_blend():
    assert parse_blend(["a", "b"]) == [(None, "a"), (None, "b")]
    assert parse_blend(["7", "a", "3", "b"]) == [(0.7, "a"), (0.3, "b")]
    for bad in (["0.7", "a", "0.3"], ["0.7", "a", "b", "c"], ["1", "2", "3", "4"], ["0", "a", "1", "b"]):
        with pytest.raises(ValueError, match="--data"):
            parse_blend(bad)


def test_every_prefix_of_the_schedule_holds_each_share_to_one_sample():
    weights = [0.5, 0.3, 0.15, 0.05]
    source = blend_schedule(weights, 5000)
    counts = np.stack([np.cumsum(source == d) for d in range(len(weights))], axis=1)
    ideal = np.outer(np.arange(1, 5001), weights)
    assert np.abs(counts - ideal).max() <= 1.0


def sources(sizes):
    """Datasets whose items say where they come from: [source, index]."""
    return [[torch.tensor([d, i]) for i in range(n)] for d, n in enumerate(sizes)]


def test_weights_0_7_0_3_over_10000_sampled_positions():
    """Proportions within 2% over 10,000 samples in the sampler's (shuffled) order, however unequal the sources'
    sizes; a small source is drawn in whole passes over a seeded permutation (every sample before any repeats)."""
    blend = BlendedDataset(sources([300, 20_000]), [0.7, 0.3], seed=1234)
    sampler = GlobalBatchSampler(len(blend), seed=1234)
    items = [blend[i] for i in sampler.indices(0, 10_000)]
    share = sum(int(x[0]) == 0 for x in items) / len(items)
    assert share == pytest.approx(0.7, abs=0.02)
    first_pass = sorted(int(blend.sample[i]) for i in np.flatnonzero(blend.source == 0)[:300])
    assert first_pass == list(range(300))
    again = BlendedDataset(sources([300, 20_000]), [0.7, 0.3], seed=1234)
    other = BlendedDataset(sources([300, 20_000]), [0.7, 0.3], seed=99)
    assert np.array_equal(again.sample, blend.sample) and not np.array_equal(other.sample, blend.sample)


def test_the_global_batch_is_the_same_at_dp_1_and_dp_4():
    blend = BlendedDataset(sources([50, 500]), [0.6, 0.4], seed=7)
    sampler = GlobalBatchSampler(len(blend), seed=7)
    for position in (0, 16, 544):  # 544: across the blend's first epoch boundary
        whole = [blend[i] for i in sampler.rank_slice(position, 16, 0, 1)]
        parts = [blend[i] for r in range(4) for i in sampler.rank_slice(position, 16, r, 4)]
        assert all(torch.equal(a, b) for a, b in zip(whole, parts))


def test_a_blended_run_counts_samples_per_source_and_resumes_exactly(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = sorted(os.listdir(corpus))
    a, b = tmp_path / "a", tmp_path / "b"
    for directory, names in ((a, files[:10]), (b, files[10:])):
        directory.mkdir()
        for name in names:
            (directory / name).write_bytes(open(os.path.join(corpus, name), "rb").read())
    blend = ["--data", "0.7", str(a), "0.3", str(b), "--steps", "6"]
    assert main(SMALL + blend + ["--run-name", "straight", "--save-interval", "3"]) == 0
    records = [r for r in read_metrics("runs/straight/metrics.jsonl") if "event" not in r]
    for r in records:
        counts = r["consumed_samples_by_source"]
        assert list(counts) == [str(a), str(b)] and sum(counts.values()) == r["consumed_samples"]
    assert main(SMALL + blend + ["--run-name", "resumed", "--load", "runs/straight/checkpoints/step_00000003"]) == 0
    resumed = [r for r in read_metrics("runs/resumed/metrics.jsonl") if "event" not in r]
    assert [r["consumed_samples_by_source"] for r in resumed] == [r["consumed_samples_by_source"]
                                                                  for r in records[3:]]
    assert step_losses("runs/resumed/metrics.jsonl") == {s: v for s, v in step_losses(
        "runs/straight/metrics.jsonl").items() if s > 3}


@pytest.mark.e2e
def test_a_blended_run_trains_the_same_at_dp_4(tmp_path, corpus):
    files = sorted(os.listdir(corpus))
    for directory, names in (("a", files[:10]), ("b", files[10:])):
        os.makedirs(tmp_path / directory)
        for name in names:
            (tmp_path / directory / name).write_bytes(open(os.path.join(corpus, name), "rb").read())
    flags = SMALL + ["--data", "0.7", "a", "0.3", "b", "--steps", "4", "--global-batch-size", "8",
                     "--micro-batch-size", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "examples", "pretrain_llama.py")
    for cmd, name in (([sys.executable, script], "dp1"),
                      ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", script,
                        "--dp", "4"], "dp4")):
        proc = subprocess.run(cmd + flags + ["--run-name", name], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r for r in read_metrics(tmp_path / "runs/dp1/metrics.jsonl") if "event" not in r]
    four = [r for r in read_metrics(tmp_path / "runs/dp4/metrics.jsonl") if "event" not in r]
    assert [r["consumed_samples_by_source"] for r in one] == [r["consumed_samples_by_source"] for r in four]
    for x, y in zip(one, four):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
