"""The activation bytes the trainer measures (saved-tensor hooks, one micro-batch) agree with the
estimator's per-tensor accounting, for every recompute mode and the chunked loss, with and without tensor and sequence
parallelism."""
import functools

import pytest

import distributed
from engine import estimate as est
from engine.training import parse_config, validate
from engine.training.trainer import Trainer

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-heads", "8",
         "--num-kv-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--device", "cpu"]


def predicted(trainer) -> int:
    cfg, p = trainer.model_cfg, trainer.cfg.parallel
    return est.microbatch_activation_bytes(cfg, trainer.cfg.batch.micro_batch_size, cfg.seq_length, p.tp,
                                           p.sequence_parallel, trainer.cfg.recompute.recompute, 4, device="cpu",
                                           loss_chunk_tokens=trainer.cfg.performance.loss_chunk_tokens,
                                           fused_elementwise=trainer.cfg.performance.fused_elementwise)


def measure(argv, world=1):
    cfg = parse_config(argv)
    validate(cfg, world)
    trainer = Trainer(cfg)
    trainer.train_step()
    return trainer.activation_bytes, predicted(trainer)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_single_process(corpus, recompute, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    measured, expected = measure(MODEL + ["--data", corpus, "--recompute", recompute])
    assert measured == expected


def test_chunked_loss_keeps_no_logits(corpus, tmp_path, monkeypatch):
    """--loss-chunk-tokens: the estimator's rows hold, and the saved bytes drop by the logits' softmax gradient
    less the two gradients kept instead (vocabulary 259 > hidden 64, so the chunked loss saves less)."""
    monkeypatch.chdir(tmp_path)
    plain, _ = measure(MODEL + ["--data", corpus])
    measured, expected = measure(MODEL + ["--data", corpus, "--loss-chunk-tokens", "24"])
    assert measured == expected
    sb, h, vocab = 2 * 32, 64, 259
    assert plain - measured == sb * vocab * 4 + sb * h * 4 - (sb * h * 4 + vocab * h * 4)


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_fused_elementwise_keeps_less(corpus, recompute, tmp_path, monkeypatch):
    """--fused-elementwise: the estimator's rows hold, and each RMSNorm keeps its input in place of the fp32 copy
    and the normalised x (fp32 here: 2 of 3 hidden-wide tensors less), SwiGLU no SiLU(gate)."""
    monkeypatch.chdir(tmp_path)
    plain, _ = measure(MODEL + ["--data", corpus, "--recompute", recompute])
    measured, expected = measure(MODEL + ["--data", corpus, "--recompute", recompute, "--fused-elementwise"])
    assert measured == expected
    sb, h, f, norms = 2 * 32, 64, 128, 2 * 2 + 1
    assert plain - measured == norms * sb * h * 4 + 2 * sb * f * 4


def _worker(rank, world, corpus, workdir):
    import os
    os.chdir(workdir)
    for layout in (["--tp", "2"], ["--tp", "2", "--sequence-parallel"]):
        for recompute in ("none", "selective", "full"):
            measured, expected = measure(MODEL + ["--data", corpus, "--recompute", recompute] + layout, world)
            assert measured == expected, (layout, recompute, measured, expected)
        measured, expected = measure(MODEL + ["--data", corpus, "--loss-chunk-tokens", "24"] + layout, world)
        assert measured == expected, (layout, "chunked loss", measured, expected)
        measured, expected = measure(MODEL + ["--data", corpus, "--fused-elementwise"] + layout, world)
        assert measured == expected, (layout, "fused elementwise", measured, expected)


def test_tensor_and_sequence_parallel(corpus, tmp_path):
    distributed.run(functools.partial(_worker, corpus=corpus, workdir=str(tmp_path)), world=2)
