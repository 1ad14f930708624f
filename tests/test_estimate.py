"""engine.estimate: parameter counts against real models, FLOPs, memory rules, and the activation table
against the tensors autograd actually saves."""
import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import engine.models.llama as llama
from engine import estimate as est
from engine.models.llama import Llama, ModelConfig, Parallelism, preset

REPO = Path(__file__).resolve().parents[1]
GQA_TIED = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_heads=8, num_kv_heads=2,
                       vocab_size=50, seq_length=16, tie_embeddings=True)


def run_json(capsys, *argv):
    est.main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        est.main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "Traceback" not in err
    return err


def test_llama_7b_exact_parameter_count(capsys):
    assert est.count_parameters(preset("llama-7b"))["total"] == 6_738_415_616
    report = run_json(capsys, "--model", "llama-7b")
    assert report["params"] == 6_738_415_616
    assert report["params_by_component"]["total"] == 6_738_415_616
    assert report["flops_per_token"] == 6 * 6_738_415_616
    assert set(report["memory_bytes"]) == {"params", "grads", "optimizer", "activations", "total"}
    assert all(isinstance(v, int) for v in report["memory_bytes"].values())


def test_65b_training_time(capsys):
    r = run_json(capsys, "--params", "6.5e10", "--tokens", "1.4e12", "--gpus", "2048", "--flops-per-gpu", "2e14",
                 "--recompute", "full")
    assert r["flops_per_token"] == 8 * 6.5e10
    assert r["train_flops"] == pytest.approx(8 * 6.5e10 * 1.4e12)
    assert r["train_seconds"] == pytest.approx(1.777e6, rel=5e-3)
    assert r["train_days"] == pytest.approx(20.6, abs=0.05)
    assert r["memory_bytes"]["activations"] == 0


def test_default_tokens_are_chinchilla(capsys):
    r = run_json(capsys, "--params", "1e9")
    assert r["tokens"] == 2e10 and r["train_flops"] == pytest.approx(6 * 1e9 * 2e10)


def test_tied_embeddings_drop_the_head():
    untied = est.count_parameters(preset("tiny"))
    tied = est.count_parameters(ModelConfig(tie_embeddings=True))
    assert tied["head"] == 0 and untied["head"] == untied["embedding"]
    assert untied["total"] - tied["total"] == untied["embedding"]


def test_gqa_attention_by_hand():
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2)  # head_dim 8, kv_dim 16
    assert est.count_parameters(cfg)["attention"] == 2 * (64 * 64 + 2 * 64 * 16 + 64 * 64)
    mha = ModelConfig(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=8)
    assert est.count_parameters(mha)["attention"] == 2 * 4 * 64 * 64


@pytest.mark.parametrize("cfg", [preset("tiny"), GQA_TIED, preset("llama-1b")], ids=["tiny", "gqa-tied", "1b"])
def test_components_match_the_model(cfg):
    with torch.device("meta"):
        model = Llama(cfg)
    assert est.count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cfg", [preset("tiny"), GQA_TIED], ids=["untied", "tied"])
def test_pipeline_stages_match_the_stage_models(cfg):
    pp = 3 if cfg.num_layers % 3 == 0 else 2
    per = cfg.num_layers // pp
    for stage in range(pp):
        with torch.device("meta"):
            part = Llama(cfg, layers=list(range(stage * per, (stage + 1) * per)), has_embedding=stage == 0,
                         has_head=stage == pp - 1)
        # with tied embeddings and pp > 1 the last stage builds its own copy of the embedding as its head
        assert est.stage_parameters(cfg, 1, pp, stage) == sum(p.numel() for p in part.parameters())


@pytest.mark.parametrize("cfg", [preset("tiny"), GQA_TIED], ids=["untied", "tied"])
@pytest.mark.parametrize("precision,beta1", [("fp32", 0.0), ("fp32", 0.9), ("bf16", 0.0), ("bf16", 0.9)])
def test_adafactor_state_matches_the_optimizer(cfg, precision, beta1):
    """The estimate of Adafactor's state equals the bytes of the state tensors the optimizer creates on each
    pipeline stage's parameters (counted as ZeroOptimizer.optimizer_bytes counts them)."""
    from engine.optim import Adafactor
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    pp = 3 if cfg.num_layers % 3 == 0 else 2
    per = cfg.num_layers // pp
    for stages in (1, pp):
        for stage in range(stages):
            layers = range(stage * per, (stage + 1) * per) if stages > 1 else None
            part = Llama(cfg, layers=layers, has_embedding=stage == 0, has_head=stage == stages - 1).to(dtype)
            params = list(part.parameters())
            for p in params:
                p.grad = torch.ones_like(p)
            opt = Adafactor(params, beta1=beta1, master_weights=dtype != torch.float32)
            opt.step()
            held = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.ndim)
            layout = est.Layout(pp=stages, precision=precision, optimizer="adafactor", beta1=beta1)
            assert est.memory_per_rank(cfg, layout, stage)["optimizer"] == held, (stages, stage)


def test_adafactor_flags(capsys):
    adamw = run_json(capsys, "--model", "tiny", "--precision", "fp32")["memory_bytes"]["optimizer"]
    factored = run_json(capsys, "--model", "tiny", "--precision", "fp32", "--optimizer", "adafactor",
                        "--beta1", "0")["memory_bytes"]["optimizer"]
    assert factored < adamw / 50  # row and column means instead of m and v
    assert "adafactor: not with --tp 2" in run_error(capsys, "--model", "tiny", "--tp", "2", "--optimizer", "adafactor")
    assert "over dp x cp = 2" in run_error(capsys, "--model", "tiny", "--cp", "2", "--zero", "1",
                                           "--optimizer", "adafactor")
    assert "use --model" in run_error(capsys, "--params", "1e9", "--optimizer", "adafactor")


def test_tensor_parallel_shards():
    cfg = preset("llama-7b")
    counts = est.count_parameters(cfg)
    replicated = counts["norms"]
    assert est.stage_parameters(cfg, 4, 1, 0) == (counts["total"] - replicated) // 4 + replicated


def test_model_flops_match_megatron_formula():
    # 3*h*F == 8*h^2 makes the SwiGLU MLP count like GPT's 4h MLP, so Megatron's formula applies exactly.
    h, layers, s, v = 96, 4, 128, 1000
    cfg = ModelConfig(num_layers=layers, hidden_size=h, ffn_hidden_size=256, num_heads=8, num_kv_heads=8,
                      vocab_size=v, seq_length=s)
    megatron = 72 * layers * h * h * (1 + s / (6 * h) + v / (12 * h * layers))
    assert est.model_flops_per_token(cfg) == pytest.approx(megatron)
    tied = ModelConfig(**{**cfg.__dict__, "tie_embeddings": True})
    assert est.model_flops_per_token(tied) == est.model_flops_per_token(cfg)
    assert est.model_flops_per_token(cfg, seq_length=2 * s) > est.model_flops_per_token(cfg)


def test_state_bytes_per_parameter():
    n = 1000
    assert est.state_bytes(n, "fp32", 0, 4) == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}
    assert est.state_bytes(n, "bf16", 0, 4) == {"params": 2 * n, "grads": 4 * n, "optimizer": 12 * n}
    assert est.state_bytes(n, "bf16", 1, 4) == {"params": 2 * n, "grads": 4 * n, "optimizer": 12 * n // 4}
    assert est.state_bytes(n, "bf16", 2, 4) == {"params": 2 * n, "grads": n, "optimizer": 12 * n // 4}
    assert est.state_bytes(n, "fp16", 3, 4) == {"params": 2 * n // 4, "grads": n, "optimizer": 12 * n // 4}


def test_memory_through_the_cli(capsys):
    total = 6_738_415_616
    fp32 = run_json(capsys, "--model", "llama-7b", "--precision", "fp32", "--gpus", "8")["memory_bytes"]
    assert fp32["params"] == 4 * total and fp32["optimizer"] == 8 * total
    zero1 = run_json(capsys, "--model", "llama-7b", "--dp", "8", "--zero", "1")["memory_bytes"]
    assert zero1["optimizer"] == 12 * total // 8 and zero1["grads"] == 4 * total
    zero3 = run_json(capsys, "--model", "llama-7b", "--dp", "8", "--zero", "3")["memory_bytes"]
    assert zero3["params"] == 2 * total // 8 and zero3["grads"] == 4 * total // 8
    assert zero3["total"] == sum(v for k, v in zero3.items() if k != "total")


def test_zero_buffers_by_hand(capsys):
    """ZeRO-3 at 7B, dp 8 (every layer a unit of L parameters, a multiple of 8: no padding): the peak is in a
    middle layer's backward - that layer and the previous one (prefetched) gathered in bf16, the layer's fp32
    gradient bucket filling, the next layer's being reduced with its 1/8 output. (That the transient buffers of real
    steps equal the estimate is tested in test_zero.py, measured on real ranks.)"""
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    report = run_json(capsys, "--model", "llama-7b", "--dp", "8", "--zero", "3")
    zero3 = report["peak_memory_bytes"]
    assert zero3["zero_buffers"] == 2 * 2 * layer + 4 * layer + 4 * (layer + layer // 8)
    assert zero3["peak"] == report["memory_bytes"]["total"] + zero3["zero_buffers"] + zero3["loss_buffers"]
    kept = run_json(capsys, "--model", "llama-7b", "--dp", "8", "--zero", "3", "--zero3-keep-params")
    assert kept["peak_memory_bytes"]["zero_buffers"] == 2 * 6_738_415_616 + 4 * layer + 4 * (layer + layer // 8)
    for argv in (["--zero", "1", "--dp", "8"], ["--zero", "3", "--dp", "1"], []):
        assert run_json(capsys, "--model", "llama-7b", *argv)["peak_memory_bytes"]["zero_buffers"] == 0


def test_loss_buffers_by_hand(capsys):
    """The head and loss's transient buffers at 7B (seq 2048, vocabulary 32,000, bf16), per path; only the last
    stage has them. (Measured against the CPU allocator in test_activation_memory.py.)"""
    sb, v, h = 2048, 32000, 4096

    def loss(*argv):
        return run_json(capsys, "--model", "llama-7b", *argv)["peak_memory_bytes"]["loss_buffers"]
    assert loss() == 2 * sb * v * 4  # F.cross_entropy's backward: fp32 gradients of the log-probs and the logits
    assert loss("--tp", "2") == sb * v // 2 * 2  # vocabulary-parallel: the bf16 logits beside their fp32 copy
    assert loss("--loss-chunk-tokens", "512") == 512 * v * 4 + v * h * (2 + 4) + sb * h * 4
    assert loss("--precision", "fp32", "--loss-chunk-tokens", "512") == 512 * v * 4 + v * h * 4 + sb * h * 4
    cfg = preset("llama-7b")
    assert est.memory_per_rank(cfg, est.Layout(pp=2), 0)["loss_buffers"] == 0
    assert est.memory_per_rank(cfg, est.Layout(pp=2), 1)["loss_buffers"] == 2 * sb * v * 4
    params_only = run_json(capsys, "--params", "1e9")
    assert params_only["peak_memory_bytes"] == {"zero_buffers": 0, "loss_buffers": 0, "recompute_buffers": 0,
                                                "peak": params_only["memory_bytes"]["total"]}


def test_recompute_buffers_are_the_recomputed_layer(capsys):
    """--recompute full: the layer being recomputed in backward holds what --recompute none keeps of a layer, less
    the input full recomputation already keeps; the peak adds it to the loss's buffers."""
    cfg = preset("llama-7b")
    layer = functools.partial(est.activation_bytes_per_layer, cfg, 1, 2048, 1, False, bytes_per_element=2)
    mem = est.memory_per_rank(cfg, est.Layout(recompute="full"), 0)
    assert mem["recompute_buffers"] == layer(recompute="none") - layer(recompute="full")
    assert mem["peak"] == mem["total"] + mem["loss_buffers"] + mem["recompute_buffers"]
    assert est.memory_per_rank(cfg, est.Layout(recompute="selective"), 0)["recompute_buffers"] == 0
    printed = run_json(capsys, "--model", "llama-7b", "--recompute", "full")["peak_memory_bytes"]
    assert printed["recompute_buffers"] == mem["recompute_buffers"]


def test_zero2_buckets_by_hand():
    """ZeRO-2, one bucket holding every parameter: it fills (4 bytes each) while, from the second micro-batch on,
    the previous micro-batch's copy is still being reduced with its 1/dp output."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_heads=4, num_kv_heads=2, vocab_size=50,
                      seq_length=16)
    n = est.count_parameters(cfg)["total"]
    padded = -(-n // 2) * 2
    one = est.Layout(dp=2, zero=2, bucket_size=10 ** 9, microbatches=1)
    two = est.Layout(dp=2, zero=2, bucket_size=10 ** 9, microbatches=2)
    assert est.memory_per_rank(cfg, one, 0)["zero_buffers"] == 4 * padded
    assert est.memory_per_rank(cfg, two, 0)["zero_buffers"] == 4 * padded + 4 * (padded + padded // 2)
    assert est.memory_per_rank(cfg, two, 0)["grads"] == 4 * padded // 2


def test_zero2_keeps_whole_copies_of_partial_gradients():
    """A tied embedding split across two stages sums its gradient over both once the backward is over: ZeRO-2
    keeps it whole (fp32) on each of the two stages, besides its shard."""
    tied = dict(pp=2, dp=2, zero=2)
    untied_cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_heads=4, num_kv_heads=2,
                             vocab_size=50, seq_length=16)
    tied_cfg = dataclasses.replace(untied_cfg, tie_embeddings=True)
    vocab = 50 * 64
    for stage in (0, 1):
        grads = est.memory_per_rank(tied_cfg, est.Layout(**tied), stage)["grads"]
        assert grads == est.memory_per_rank(untied_cfg, est.Layout(**tied), stage)["grads"] + 4 * vocab


def test_activation_ordering_and_sharding():
    cfg = preset("llama-7b")

    def act(recompute, tp=1, sp=False):
        return est.activation_bytes_per_layer(cfg, 1, 2048, tp, sp, recompute, 2)
    assert act("full") < act("selective") < act("none")
    assert act("none", tp=8) < act("none")
    assert act("none", tp=8, sp=True) < act("none", tp=8)
    assert act("none", tp=8, sp=True) == pytest.approx(act("none") / 8, rel=1e-6)
    assert act("full") == 2048 * 4096 * 2 and act("full", tp=8, sp=True) == act("full") // 8


def test_pipeline_inflight():
    assert [est.inflight_chunks("1f1b", 4, 1, s, None) for s in range(4)] == [4, 3, 2, 1]
    assert est.inflight_chunks("1f1b", 4, 1, 0, 2) == 2
    assert est.inflight_chunks("gpipe", 4, 1, 3, 16) == 16
    pp, vpp = 4, 2  # Korthikanti: the first stage holds L * (1 + (pp - 1) / (pp * vpp)) layers' activations
    assert est.inflight_chunks("interleaved", pp, vpp, 0, None) / (pp * vpp) == 1 + (pp - 1) / (pp * vpp)


def _saved_bytes(fn, skip_tensors) -> int:
    """Bytes of the distinct storages autograd saves while running fn(), leaving out skip_tensors."""
    skip = {t.untyped_storage().data_ptr() for t in skip_tensors}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and t.is_floating_point() and t.dim() > 0:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype,nbytes", [(torch.float32, 4), (torch.bfloat16, 2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_activation_table_matches_autograd(monkeypatch, dtype, nbytes, kv_heads, recompute, fused):
    cfg = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=96, num_heads=8, num_kv_heads=kv_heads,
                      vocab_size=50, seq_length=16)
    model = Llama(cfg, parallelism=Parallelism(fused_elementwise=fused)).to(dtype)
    layer, cos, sin = model.layers["0"], model.rope_cos.to(dtype), model.rope_sin.to(dtype)
    x = torch.randn(2, 16, 64, dtype=dtype, requires_grad=True)
    if recompute == "selective":
        core = llama.attention_core
        monkeypatch.setattr(llama, "attention_core", lambda *a: checkpoint(core, *a, use_reentrant=True))
    run = (lambda: checkpoint(layer, x, cos, sin, use_reentrant=True)) if recompute == "full" \
        else (lambda: layer(x, cos, sin))
    measured = _saved_bytes(run, [*model.parameters(), cos, sin])
    assert measured == est.activation_bytes_per_layer(cfg, 2, 16, 1, False, recompute, nbytes, device="cpu",
                                                      fused_elementwise=fused)


def test_gqa_kv_width_follows_the_attention_kernel():
    """k and v are saved kv_dim wide where SDPA takes GQA natively (CPU; bf16/fp16 on CUDA: flash), and expanded
    to the query heads for fp32 on CUDA, whose memory-efficient kernel takes no GQA (and on torch < 2.5)."""
    from engine.models.llama import SDPA_NATIVE_GQA
    cfg = preset("tiny")
    assert cfg.kv_dim < cfg.num_heads * cfg.head_dim

    def k_width(e, device):
        rows = est.saved_activations(cfg, 1, 8, "none", e, device)
        return next(n for what, n, _, _ in rows if what.startswith("k after RoPE")) // 8
    native, expanded = cfg.kv_dim, cfg.num_heads * cfg.head_dim
    assert k_width(4, "cuda") == expanded
    assert k_width(2, "cuda") == k_width(4, "cpu") == (native if SDPA_NATIVE_GQA else expanded)


@pytest.mark.parametrize("dtype,nbytes", [(torch.float32, 4), (torch.bfloat16, 2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_head_activation_table_matches_autograd(dtype, nbytes, fused):
    model = Llama(GQA_TIED, layers=[], has_embedding=False,
                  parallelism=Parallelism(fused_elementwise=fused)).to(dtype)
    x = torch.randn(2, 16, 64, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (32,))
    measured = _saved_bytes(lambda: F.cross_entropy(model(x).float().flatten(0, 1), targets), model.parameters())
    rows = est.saved_head_activations(GQA_TIED, 2, 16, 1, nbytes, fused_elementwise=fused)
    assert measured == sum(n * b for _, n, b, _ in rows)


def test_peak_stage_and_pipeline_split(capsys):
    one = run_json(capsys, "--model", "llama-7b")["memory_bytes"]
    four = run_json(capsys, "--model", "llama-7b", "--pp", "4")
    assert four["memory_bytes"]["params"] < one["params"] / 3
    # 1F1B: the first stage holds pp micro-batches of its L/pp layers, i.e. all L layers' worth.
    assert four["memory_stage"] == 0
    assert four["memory_bytes"]["activations"] == 32 * est.activation_bytes_per_layer(
        preset("llama-7b"), 1, 2048, 1, False, "none", 2)


def test_human_output(capsys):
    est.main(["--model", "llama-7b"])
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "GiB" in out and "days" in out


@pytest.mark.parametrize("argv,flag", [
    (["--model", "llama-7b", "--pp", "5"], "--pp"),
    (["--model", "llama-7b", "--gpus", "0"], "--gpus"),
    (["--params", "-1"], "--params"),
    (["--model", "nope"], "--model"),
    (["--model", "llama-7b", "--dp", "3", "--gpus", "8"], "--dp"),
    (["--model", "tiny", "--sequence-parallel"], "--sequence-parallel"),
    (["--params", "1e9", "--num-layers", "4"], "--params"),
    (["--model", "tiny", "--hidden-size", "100"], "--hidden-size"),
    (["--model", "tiny", "--bucket-size", "0"], "--bucket-size"),
])
def test_invalid_flags_exit_2(capsys, argv, flag):
    err = run_error(capsys, *argv)
    assert err.startswith(f"error: {flag}")


def test_invalid_tp_subprocess():
    proc = subprocess.run([sys.executable, "-m", "engine.estimate", "--model", "llama-7b", "--tp", "3"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --tp:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_context_parallelism_divides_activations_and_shards_zero_over_dp_x_cp():
    from engine.estimate import Layout, memory_per_rank
    from engine.models.llama import preset
    cfg = preset("tiny")
    cfg.seq_length = 16384
    base = memory_per_rank(cfg, Layout(zero=1, dp=2), 0)
    for cp in (2, 4, 8):
        mem = memory_per_rank(cfg, Layout(zero=1, dp=2, cp=cp), 0)
        assert mem["activations"] == base["activations"] // cp
        assert mem["params"] == base["params"] and mem["optimizer"] == pytest.approx(base["optimizer"] / cp, rel=0.01)
    out = est.estimate(["--model", "tiny", "--cp", "4", "--dp", "2", "--seq-length", "1024"])
    assert out["gpus"] == 8 and out["layout"]["cp"] == 4


def test_chunked_loss_replaces_the_logits_by_two_gradients():
    """--loss-chunk-tokens: the last stage keeps [tokens, hidden] + [vocab/tp, hidden] fp32 instead of the fp32
    [tokens, vocab/tp] softmax gradient and the head input; the other stages are unchanged."""
    cfg = preset("llama-1b")
    sb, h, v = 4 * cfg.seq_length, cfg.hidden_size, cfg.vocab_size
    for tp, sp in ((1, False), (2, True)):
        plain = est.memory_per_rank(cfg, est.Layout(tp=tp, sequence_parallel=sp, pp=2, micro_batch_size=4), 1)
        fused = est.memory_per_rank(cfg, est.Layout(tp=tp, sequence_parallel=sp, pp=2, micro_batch_size=4,
                                            loss_chunk_tokens=4096), 1)
        head_input = sb * h * 2 // (tp if sp else 1)
        kept_instead = sb * h * 4 + v // tp * h * 4
        assert plain["activations"] - fused["activations"] == sb * v // tp * 4 + head_input - kept_instead
        assert est.memory_per_rank(cfg, est.Layout(tp=tp, pp=2, loss_chunk_tokens=4096), 0) == \
            est.memory_per_rank(cfg, est.Layout(tp=tp, pp=2), 0)
    out = est.estimate(["--model", "llama-1b", "--micro-batch-size", "4", "--loss-chunk-tokens", "4096"])
    assert out["layout"]["loss_chunk_tokens"] == 4096
    assert out["memory_bytes"]["activations"] < est.estimate(["--model", "llama-1b", "--micro-batch-size", "4"]
                                                              )["memory_bytes"]["activations"]
    with pytest.raises(SystemExit):
        est.estimate(["--loss-chunk-tokens", "-1"])


def test_fused_elementwise_flag_keeps_less_per_layer():
    """--fused-elementwise: per layer, each RMSNorm keeps its input (bf16) instead of an fp32 copy and the normalised
    x, and SwiGLU keeps no SiLU(gate); the layout records the flag."""
    cfg = preset("llama-1b")
    sb, h, f = 2048, cfg.hidden_size, cfg.ffn_hidden_size
    plain = est.activation_bytes_per_layer(cfg, 1, 2048, 1, False, "none", 2)
    fused = est.activation_bytes_per_layer(cfg, 1, 2048, 1, False, "none", 2, fused_elementwise=True)
    # per norm: fp32 copy (4 B) + normalised x (2 B) out, bf16 input (2 B) in; SwiGLU: SiLU(gate) (2 B) out
    assert plain - fused == 2 * sb * h * (4 + 2 - 2) + sb * f * 2
    out = est.estimate(["--model", "llama-1b", "--fused-elementwise"])
    assert out["layout"]["fused_elementwise"] is True
    assert out["memory_bytes"]["activations"] < est.estimate(["--model", "llama-1b"])["memory_bytes"]["activations"]
