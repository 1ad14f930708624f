"""benchmarks/bench_mfu.py: the sizes' shapes, the peer model (its loss, RoPE and parameter count), the MFU
arithmetic against the Trainer's, and a few-second CPU run of the whole loop without compilation (an unknown flag
reported as unavailable, a failing side, the out-of-memory retry one side at a time)."""
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import weakref

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_mfu as bench  # noqa: E402
from engine.estimate import count_parameters, model_flops_per_token  # noqa: E402
from engine.models.llama import apply_rope, preset, rope_tables  # noqa: E402


def tiny(kv_heads=2, seq=16):
    return dataclasses.replace(bench.size_config("smoke", seq), num_kv_heads=kv_heads)


def test_sizes():
    assert bench.size_config("1b", 2048) == preset("llama-1b")
    small = bench.size_config("124m", 2048)
    assert (small.num_layers, small.hidden_size, small.num_heads, small.num_kv_heads, small.ffn_hidden_size,
            small.vocab_size, small.seq_length) == (12, 768, 12, 12, 2048, 32000, 2048)
    medium = bench.size_config("350m", 1024)
    assert (medium.num_layers, medium.hidden_size, medium.num_heads, medium.ffn_hidden_size, medium.seq_length) == \
        (24, 1024, 16, 2816, 1024)
    for name in bench.SIZES + bench.SMOKE_SIZES:
        cfg = bench.size_config(name, 64)
        assert not cfg.validate()
        assert bench.parameter_count(cfg) == count_parameters(cfg)["total"]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_peer_forward_and_loss(kv_heads):
    cfg = tiny(kv_heads)
    torch.manual_seed(0)
    model = bench.PeerLlama(cfg)
    assert sum(p.numel() for p in model.parameters()) == bench.parameter_count(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1))
    logits = model(idx[:, :-1])
    assert logits.shape == (2, cfg.seq_length, cfg.vocab_size)
    loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.shape == () and abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    with torch.autocast("cpu", torch.bfloat16):
        assert model(idx[:, :-1], idx[:, 1:]).dtype == torch.float32  # the loss in fp32 under autocast


def test_peer_rope_is_the_engines():
    cos, sin = rope_tables(16, 8, 10000.0)
    model = bench.PeerLlama(dataclasses.replace(tiny(), hidden_size=32, num_heads=4, num_kv_heads=4))
    torch.testing.assert_close(model.cos, cos)
    torch.testing.assert_close(model.sin, sin)
    x = torch.randn(2, 4, 16, 8)
    torch.testing.assert_close(bench.peer_rope(x, cos, sin), apply_rope(x, cos, sin))


def test_peer_step_accumulates_and_updates():
    cfg = tiny()
    data = bench.RandomTokens(8, cfg.seq_length, cfg.vocab_size)
    side = bench.PeerSide(cfg, data, 2, 4, torch.device("cpu"), "bf16", compile=False)
    before = side.model.head.weight.detach().clone()
    loss = side()
    assert loss.shape == () and abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    assert not torch.equal(before, side.model.head.weight) and side.model.head.weight.grad is None
    assert side.position == 4
    params = bench.parameter_count(cfg)
    assert side.state_bytes() == 16 * params and side.persistent_bytes() == 12 * params
    assert side.optimizer.param_groups[0]["weight_decay"] == bench.WEIGHT_DECAY
    assert all(p.ndim == 1 for p in side.optimizer.param_groups[1]["params"])


def test_a_closed_side_is_freed(tmp_path):
    """(a dropped Trainer is never collected while ZeRO's gradient hooks are registered: OursSide.close removes them)"""
    cfg = tiny()
    data = bench.RandomTokens(8, cfg.seq_length, cfg.vocab_size)
    side = bench.OursSide(bench.ours_argv(cfg, 2, 4, "cpu", "bf16", str(tmp_path), None), data, cfg)
    side()
    refs = [weakref.ref(p) for _, p in side.trainer.named_params] + [weakref.ref(side.trainer.zero.grads.tensors()[0])]
    side.close()
    del side
    gc.collect()
    assert not [r for r in refs if r() is not None]


def test_mfu_arithmetic_is_the_trainers():
    """tokens/s, TFLOP/s and MFU as engine.training.trainer.Trainer.train_step computes them."""
    cfg = preset("llama-1b")
    flops = model_flops_per_token(cfg, cfg.seq_length)
    tokens, seconds, peak = 16 * 2048, 0.75, 989.0
    got = bench.mfu_numbers(flops, tokens, seconds, peak)
    trainer_tflops = flops * tokens / seconds / 1 / 1e12  # train_step: flops_per_token * tokens / elapsed / world
    assert got["tokens_per_s"] == tokens / seconds
    assert got["tflops"] == pytest.approx(trainer_tflops, rel=1e-12)
    assert got["mfu"] == pytest.approx(trainer_tflops / peak, rel=1e-12)
    assert bench.mfu_numbers(flops, tokens, seconds, None)["mfu"] is None


def test_flags_the_config_lacks_are_found():
    assert bench.unknown_flags(["--seed", "--no-such-flag", "3"]) == ["--no-such-flag"]
    assert bench.unknown_flags(["--compil"]) == ["--compil"]  # a prefix argparse would accept is not the flag
    assert all(bench.unknown_flags(bench.ours_flags(side, 64)) == [] for side in bench.SIDES if side != "peer")


def _run(tmp_path, monkeypatch, extra):
    monkeypatch.setattr(bench, "PEER_COMPILE", False)  # (compilation is the slow --smoke run's business)
    path = tmp_path / "out.json"
    argv = ["--smoke", "--device", "cpu", "--sizes", "smoke", "--sides", "ours-eager", "peer", "--json", str(path)]
    assert bench.main(argv + extra) == 0
    with open(path) as fh:
        return json.load(fh)["sizes"]["smoke"]


def test_cpu_run_interleaved(tmp_path, monkeypatch, capsys):
    out = _run(tmp_path, monkeypatch, ["--repeats", "2"])
    ours, peer = out["sides"]["ours-eager"], out["sides"]["peer"]
    assert ours["status"] == peer["status"] == "ok" and len(ours["times_s"]) == len(peer["times_s"]) == 2
    assert ours["ratio_vs_peer"]["paired"] and ours["ratio_vs_peer"]["pairs"] == 2
    assert ours["ratio_vs_peer"]["median"] == pytest.approx(  # tokens/s ours / peer = peer's time / ours, per pair
        statistics.median(p / o for o, p in zip(ours["times_s"], peer["times_s"])))
    assert ours["tokens_per_s"] == pytest.approx(out["tokens_per_step"] / ours["median_s"])
    # the Trainer's own figure for its last step agrees with the benchmark's arithmetic for that step
    assert ours["trainer_record"]["tokens_per_s"] == pytest.approx(out["tokens_per_step"] / ours["times_s"][-1],
                                                                   rel=0.05)
    assert abs(ours["first_loss"] - math.log(512)) < 0.1 and abs(peer["first_loss"] - math.log(512)) < 0.1
    assert "| ours-eager |" in capsys.readouterr().out


def test_unavailable_and_failed_sides(tmp_path, monkeypatch):
    flags = bench.ours_flags
    monkeypatch.setattr(bench, "ours_flags", lambda side, n: flags(side, n) + ["--no-such-flag"])

    def broken(self):
        raise RuntimeError("the peer broke")
    monkeypatch.setattr(bench.PeerSide, "__call__", broken)
    out = _run(tmp_path, monkeypatch, [])
    assert out["sides"]["ours-eager"]["status"] == "unavailable"
    assert "--no-such-flag" in out["sides"]["ours-eager"]["reason"]
    assert out["sides"]["peer"]["status"] == "failed" and "the peer broke" in out["sides"]["peer"]["reason"]


def test_out_of_memory_side_by_side_retries_one_at_a_time(tmp_path, monkeypatch):
    run_ab = bench.ab.run_ab

    def tight(sides, *args, **kwargs):
        if len(sides) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return run_ab(sides, *args, **kwargs)
    monkeypatch.setattr(bench.ab, "run_ab", tight)
    out = _run(tmp_path, monkeypatch, [])
    assert out["retried_sequentially"] == ["ours-eager", "peer"]
    ours = out["sides"]["ours-eager"]
    assert ours["status"] == "ok" and "out of memory" in ours["first_attempt"]
    assert ours["ratio_vs_peer"] == {"median": pytest.approx(out["sides"]["peer"]["median_s"] / ours["median_s"]),
                                     "paired": False}
