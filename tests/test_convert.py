"""engine.convert: Hugging Face LLaMA <-> engine checkpoints, checked by logits and exact tensor equality."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import SMALL  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import engine  # noqa: E402
from engine import convert  # noqa: E402
from engine.models.llama import Llama, ModelConfig  # noqa: E402
from engine.training import checkpoint as ckpt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5


def hf_model(tie: bool) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=tie, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at ones; randomise them so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def max_diff(a: torch.nn.Module, b: torch.nn.Module, vocab: int) -> float:
    ids = input_ids(vocab)
    la = a(ids)
    lb = b(ids)
    la, lb = getattr(la, "logits", la), getattr(lb, "logits", lb)
    assert la.shape == lb.shape == (2, 32, vocab)
    return (la - lb).abs().max().item()


@torch.no_grad()
def test_forward_takes_huggingface_keywords(tmp_path):
    """Llama.forward(input_ids=, labels=, attention_mask=) as LlamaForCausalLM: logits of the unpadded positions
    under padding on either side, and the loss with labels (ignored -100 positions included)."""
    hf = hf_model(False)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert.hf_to_engine(str(tmp_path / "hf"), str(tmp_path / "engine"))
    ours = engine.load_model(str(tmp_path / "engine"))
    ids = input_ids(300)
    mask = torch.ones_like(ids)
    mask[0, 25:] = 0  # right padding
    mask[1, :6] = 0   # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100  # nor a token predicted from a padding position (junk on both sides)
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
    logits = ours(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (logits[real] - theirs.logits[real]).abs().max().item() <= ATOL
    assert (logits - ours(ids)).abs().max().item() > 1e-2  # the mask changed something
    loss = ours(input_ids=ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(loss, theirs.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(ids, labels=ids), hf(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "engine.convert", *args], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_name_table_matches_model():
    for tie in (False, True):
        cfg = ModelConfig(num_layers=3, tie_embeddings=tie)
        ours = {name for name, _ in Llama(cfg).named_parameters()}
        assert {o for _, o in convert.name_table(cfg)} == ours


@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip(tmp_path, tie):
    hf = hf_model(tie)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    step_dir = convert.hf_to_engine(str(tmp_path / "hf"), str(tmp_path / "engine"))
    assert os.path.basename(step_dir) == "step_00000000"
    meta = json.loads((tmp_path / "engine" / "step_00000000" / "meta.json").read_text())
    assert meta["source"] == "hf" and meta["layout"]["world"] == 1
    assert meta["model_config"]["tie_embeddings"] is tie and meta["model_config"]["seq_length"] == 64

    ours = engine.load_model(str(tmp_path / "engine"))
    diff = max_diff(hf, ours, 300)
    print(f"hf -> engine max abs logits diff (tie={tie}): {diff:.3g}")
    assert diff <= ATOL

    convert.engine_to_hf(str(tmp_path / "engine"), str(tmp_path / "back"))
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    exported = load_file(str(tmp_path / "back" / "model.safetensors"))
    expected = {k for k in hf.state_dict() if not (tie and k == "lm_head.weight")}
    assert set(exported) == expected
    for key, t in exported.items():
        assert torch.equal(t, original[key]), key

    cfg = transformers.LlamaConfig.from_pretrained(tmp_path / "back")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(hf.config, field), field
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert max_diff(hf, back, 300) == 0.0


def test_sharded_hf_checkpoint(tmp_path):
    hf = hf_model(False)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    convert.hf_to_engine(str(tmp_path / "hf"), str(tmp_path / "engine"))
    assert max_diff(hf, engine.load_model(str(tmp_path / "engine")), 300) <= ATOL


def test_cli(tmp_path, capsys):
    # Two real subprocesses (each pays for importing torch); the rest goes through convert.main in-process.
    hf_model(True).save_pretrained(tmp_path / "hf", safe_serialization=True)
    r = run_cli("hf-to-engine", str(tmp_path / "hf"), str(tmp_path / "engine"))
    assert r.returncode == 0, r.stderr
    assert "step_00000000" in r.stdout
    r = run_cli("hf-to-engine", str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr

    assert convert.main(["engine-to-hf", str(tmp_path / "engine" / "step_00000000"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "config.json").exists()
    capsys.readouterr()
    assert convert.main(["engine-to-hf", str(tmp_path / "hf"), str(tmp_path / "x")]) == 2
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        convert.main(["--help"])
    assert exc.value.code == 0 and "hf-to-engine" in capsys.readouterr().out


def write_hf_config(path, **overrides):
    cfg = hf_model(False).config.to_dict()
    cfg.update(overrides)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


@pytest.mark.parametrize("overrides, field", [
    ({"model_type": "mistral"}, "model_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type"),
])
def test_unsupported_configs_are_rejected(tmp_path, overrides, field):
    write_hf_config(tmp_path / "hf", **overrides)
    with pytest.raises(convert.ConvertError, match=field):
        convert.hf_to_engine(str(tmp_path / "hf"), str(tmp_path / "engine"))
    assert not (tmp_path / "engine").exists()


def test_missing_weights_and_bin_files_are_rejected(tmp_path):
    write_hf_config(tmp_path / "hf")
    with pytest.raises(convert.ConvertError, match="model.safetensors"):
        convert.hf_to_engine(str(tmp_path / "hf"), str(tmp_path / "engine"))
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(convert.ConvertError, match="safe_serialization"):
        convert.hf_to_engine(str(tmp_path / "hf"), str(tmp_path / "engine"))
    with pytest.raises(convert.ConvertError, match="config.json"):
        convert.hf_to_engine(str(tmp_path), str(tmp_path / "engine"))


def save_like_trainer(save_dir: str, model: Llama, step: int, vocab_padding: int = 0) -> None:
    """What Trainer.save_checkpoint writes for the model part, split into two rank files the way a
    tensor-parallel run shards rows, optionally with padded vocabulary rows."""
    tmp = ckpt.prepare_tmp_dir(save_dir, step)
    shards = [({}, {}), ({}, {})]
    for name, p in model.named_parameters():
        t = p.detach()
        if name in convert.VOCAB_ROWS and vocab_padding:
            t = torch.cat([t, torch.randn(vocab_padding, t.shape[1])])
        half = t.shape[0] // 2
        for rank, (lo, hi) in enumerate([(0, half), (half, t.shape[0])]):
            tensors, slices = shards[rank]
            tensors[f"model/{name}"] = t[lo:hi]
            slices[f"model/{name}"] = (list(t.shape), [lo] + [0] * (t.ndim - 1))
    files = dict(ckpt.write_rank_file(tmp, rank, *shards[rank]) for rank in range(2))
    meta = {"state": {"step": step}, "model_config": dataclasses.asdict(model.cfg), "optimizer": "adamw",
            "layout": {"tp": 2, "pp": 1, "dp": 1, "vpp": 1, "zero": 0, "world": 2}, "scaler": None}
    ckpt.finalize(save_dir, step, meta, files, None)


@pytest.mark.parametrize("tie", [False, True])
def test_engine_checkpoint_to_hf(tmp_path, tie):
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_heads=4, num_kv_heads=2,
                      vocab_size=259, seq_length=32, tie_embeddings=tie)
    model = Llama(cfg)
    model.init_weights(1)
    model.eval()
    save_like_trainer(str(tmp_path / "ckpt"), model, step=2, vocab_padding=3)

    convert.engine_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 257, 258)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.get_output_embeddings().weight.shape[0] == 259
    diff = max_diff(model, hf, 259)
    print(f"engine -> hf max abs logits diff (tie={tie}): {diff:.3g}")
    assert diff <= ATOL

    # and back again: the same weights, bit for bit
    convert.hf_to_engine(str(tmp_path / "hf"), str(tmp_path / "again"))
    again = engine.load_model(str(tmp_path / "again"))
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


def test_trainer_checkpoint_to_hf(tmp_path, monkeypatch):
    from engine.training import main

    monkeypatch.chdir(tmp_path)  # runs/ lands here
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 100)
    rc = main(SMALL + ["--steps", "2", "--save", "ckpt", "--run-name", "x", "--data", "corpus.txt"])
    assert rc == 0
    assert convert.main(["engine-to-hf", "ckpt", "hf"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    diff = max_diff(engine.load_model("ckpt"), hf, 259)
    print(f"trainer checkpoint -> hf max abs logits diff: {diff:.3g}")
    assert diff <= ATOL


def test_refuses_to_overwrite_checkpoints(tmp_path):
    hf_model(False).save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert.hf_to_engine(str(tmp_path / "hf"), str(tmp_path / "engine"))
    with pytest.raises(convert.ConvertError, match="already holds checkpoints"):
        convert.hf_to_engine(str(tmp_path / "hf"), str(tmp_path / "engine"))


def test_training_starts_from_converted_weights(tmp_path, monkeypatch):
    """--load of a converted (weights-only) checkpoint starts a fresh run at step 0 from those weights."""
    from engine.training import main, parse_config, validate
    from engine.training.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=259, max_position_embeddings=32,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert convert.main(["hf-to-engine", "hf", "eng"]) == 0
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 100)
    argv = SMALL + ["--steps", "2", "--data", "corpus.txt", "--load", "eng", "--run-name", "ft"]
    run_cfg = parse_config(argv)
    validate(run_cfg, 1)
    trainer = Trainer(run_cfg)
    trainer.load_checkpoint(ckpt.resolve("eng"))
    reference = engine.load_model("eng")
    for (name, p), (_, q) in zip(trainer.named_params, reference.named_parameters()):
        assert torch.equal(p, q), name
    assert trainer.state.step == 0
    assert main(argv) == 0
    with open("runs/ft/metrics.jsonl") as fh:
        steps = [json.loads(line) for line in fh if '"event"' not in line]
    assert [r["step"] for r in steps] == [1, 2]
