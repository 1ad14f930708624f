"""engine.generate: KV-cache decoding against full recomputation and against the Hugging Face export, loading from
a tp2 x pp2 checkpoint, and the command line."""
import dataclasses
import functools
import os
import subprocess
import sys

import pytest
import torch

import distributed
from conftest import SMALL
import engine
from engine import generate as gen
from engine.data.tokenizers import ByteTokenizer
from engine.models.llama import KVCache, Llama, ModelConfig
from engine.training import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=259,
                  seq_length=32, init_std=0.2)  # large weights: peaked logits, clear greedy choices
PROMPT = "def f(x):\n    ret"
TRAIN = SMALL + ["--steps", "20", "--lr", "3e-3", "--log-interval", "10", "--data", "corpus.txt"]


def random_model(**overrides) -> Llama:
    model = Llama(dataclasses.replace(CFG, **overrides))
    model.init_weights(3)
    return model.eval()


def in_dir(path, fn, *args):
    cwd = os.getcwd()
    os.chdir(path)
    try:
        return fn(*args)
    finally:
        os.chdir(cwd)


def train(argv):
    from engine.training import main
    assert main(argv) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A --save directory of a 20-step single-process run on a tiny model (byte tokenizer)."""
    root = tmp_path_factory.mktemp("generate")
    (root / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 100)
    in_dir(root, train, TRAIN + ["--save", "ckpt", "--run-name", "single"])
    return root


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_kv_cache_matches_full_recomputation(tie):
    model = random_model(tie_embeddings=tie)
    ids = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.cfg, batch=2)
    # the prompt in two chunks (the second attends to the first through the cache), then one token at a time
    logits = torch.cat([model(ids[:, :4], cache=cache), model(ids[:, 4:], cache=cache)], dim=1)
    # fp32 rounding of other matmul shapes: measured up to 1.05e-5 (logits up to 5.8, so ~15 ulps) on an AMX CPU,
    # under 1e-5 on others
    atol = 3e-5
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=atol)
    for _ in range(CFG.seq_length - ids.shape[1]):
        next_ids = logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, next_ids], dim=1)
        logits = model(next_ids, cache=cache)
        torch.testing.assert_close(logits[:, 0], model(ids)[:, -1], rtol=0, atol=atol)
    assert cache.length == CFG.seq_length

    # greedy generate == argmax of a full forward at every step, up to the end of the context
    prompt = ids[0, :5].tolist()
    reference = list(prompt)
    while len(reference) < CFG.seq_length:
        reference.append(int(model(torch.tensor([reference]))[0, -1].argmax()))
    got = gen.generate(model, prompt, 100, temperature=0)
    assert len(got) == CFG.seq_length - len(prompt) + 1  # the last token needs no position of its own
    assert prompt + got[:-1] == reference


@torch.no_grad()
def test_kv_cache_in_bf16():
    """A bf16 model decodes with a bf16 cache; its cached logits follow its own full forward to bf16 rounding."""
    model = random_model().to(torch.bfloat16)
    ids = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.cfg, batch=1, dtype=torch.bfloat16)
    logits = torch.cat([model(ids[:, :5], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(5, 9)],
                       dim=1)
    assert logits.dtype == torch.bfloat16 and cache.length == 9
    full = model(ids)
    torch.testing.assert_close(logits.float(), full.float(), rtol=0, atol=3e-2 * full.float().abs().max().item())
    assert len(gen.generate(model, [1, 2, 3], 6, temperature=0)) == 6


def test_kv_cache_refusals():
    model = random_model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels and attention_mask"):
        model(ids, labels=ids, cache=KVCache(model.cfg))
    with pytest.raises(ValueError, match="full single-process model"):
        Llama(CFG, layers=[0])(ids, cache=KVCache(CFG))
    with pytest.raises(ValueError, match="max_length 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=KVCache(model.cfg, max_length=4))
    with pytest.raises(gen.GenerateError, match="empty"):
        gen.generate(model, [], 4)
    with pytest.raises(gen.GenerateError, match="seq_length 32"):
        gen.generate(model, [1] * 33, 4)


def test_eos_ends_generation():
    model = random_model()
    first = gen.generate(model, [1, 2, 3], 5, temperature=0)
    assert gen.generate(model, [1, 2, 3], 5, temperature=0, eos_id=first[2]) == first[:first.index(first[2]) + 1]
    assert gen.generate(model, [1, 2, 3], 0, temperature=0) == []


def test_top_k_sampling():
    model = random_model()
    greedy = gen.generate(model, [1, 2, 3], 10, temperature=0)
    assert gen.generate(model, [1, 2, 3], 10, temperature=1.5, top_k=1) == greedy

    def draw(seed):
        return gen.generate(model, [1, 2, 3], 10, temperature=1.5, top_k=20,
                            generator=torch.Generator().manual_seed(seed))
    assert draw(7) == draw(7)
    assert len({tuple(draw(s)) for s in range(5)}) > 1


def test_greedy_matches_huggingface_export(trained):
    transformers = pytest.importorskip("transformers")
    from engine import convert

    convert.engine_to_hf(str(trained / "ckpt"), str(trained / "hf"))
    hf = transformers.LlamaForCausalLM.from_pretrained(trained / "hf", attn_implementation="eager").eval()
    model = engine.load_model(str(trained / "ckpt"))
    prompt = ByteTokenizer().encode(PROMPT).tolist()
    n = CFG.seq_length - len(prompt)
    # HF stops at its config's eos_token_id (257, the byte tokenizer's), and so does generate with eos_id
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n)[0, len(prompt):].tolist()
    got = gen.generate(model, prompt, n, temperature=0, eos_id=ByteTokenizer.eos_id)
    assert got == expected
    assert len(set(got)) > 1  # (a continuation that is not one repeated token)


def _train_tp2_pp2(rank, world, workdir):
    os.chdir(workdir)
    train(TRAIN + ["--tp", "2", "--pp", "2", "--save", "ckpt-tp2-pp2", "--run-name", "tp2-pp2"])


@pytest.mark.e2e
def test_tp2_pp2_checkpoint_generates_like_one_process(trained):
    distributed.run(functools.partial(_train_tp2_pp2, workdir=str(trained)), world=4)
    sharded = engine.load_model(str(trained / "ckpt-tp2-pp2"))
    single = engine.load_model(str(trained / "ckpt"))
    assert type(sharded) is Llama and sharded.par.tp.size == 1 and len(sharded.layers) == CFG.num_layers
    # the same training to fp32 rounding (the tp/pp matmuls and reductions are split differently)
    for (name, a), (_, b) in zip(sharded.named_parameters(), single.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    prompt = ByteTokenizer().encode(PROMPT).tolist()
    assert gen.generate(sharded, prompt, 14, temperature=0) == gen.generate(single, prompt, 14, temperature=0)


def test_cli(trained, capsys):
    save_dir = str(trained / "ckpt")
    argv = [save_dir, "--prompt", PROMPT, "--max-new-tokens", "8", "--device", "cpu"]
    assert gen.main(argv + ["--temperature", "0"]) == 0
    out = capsys.readouterr().out
    model = engine.load_model(save_dir)
    greedy = gen.generate(model, ByteTokenizer().encode(PROMPT), 8, temperature=0)
    assert out == PROMPT + ByteTokenizer().decode(greedy) + "\n"

    # the step directory itself works too; seeded top-k sampling is reproducible
    step_dir = os.path.join(save_dir, open(os.path.join(save_dir, "latest")).read().strip())
    sampled = []
    for seed in ("1", "1", "2"):
        assert gen.main([step_dir, "--prompt", "def", "--temperature", "0.9", "--top-k", "5", "--seed", seed,
                         "--max-new-tokens", "20", "--tokenizer", "byte", "--device", "cpu"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] != sampled[2]
    assert all(s.startswith("def") for s in sampled)

    # --dtype bf16: the model and its cache in bf16 (greedy, as load_model(dtype=) + generate give it)
    assert gen.main(argv + ["--temperature", "0", "--dtype", "bf16"]) == 0
    model = engine.load_model(save_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    greedy = gen.generate(model, ByteTokenizer().encode(PROMPT), 8, temperature=0)
    assert capsys.readouterr().out == PROMPT + ByteTokenizer().decode(greedy) + "\n"


def save_weights(save_dir, model, run_config):
    """A one-file checkpoint of `model` whose meta records `run_config` (the trainer's config dict)."""
    tmp = ckpt.prepare_tmp_dir(save_dir, 1)
    files = dict([ckpt.write_rank_file(tmp, 0, {f"model/{n}": p for n, p in model.named_parameters()}, {})])
    meta = {"state": {"step": 1}, "model_config": dataclasses.asdict(model.cfg), "config": run_config,
            "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "zero": 0, "world": 1}, "optimizer": None,
            "scaler": None}
    ckpt.finalize(save_dir, 1, meta, files, None)


def test_cli_uses_the_recorded_tokenizer(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<unk>", "</s>"] + [f"w{i}" for i in range(30)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins the words with spaces
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    model = random_model(vocab_size=len(words))
    save_weights(str(tmp_path / "ckpt"), model, {"data": {"tokenizer": path}})

    assert gen.main([str(tmp_path / "ckpt"), "--prompt", "w3 w4 w5", "--temperature", "0", "--max-new-tokens", "6",
                     "--device", "cpu"]) == 0
    new = gen.generate(model, [5, 6, 7], 6, temperature=0, eos_id=1)
    if new[-1] == 1:
        new = new[:-1]
    assert capsys.readouterr().out == " ".join(words[i] for i in [5, 6, 7] + new) + "\n"
    # the byte tokenizer's ids run past this model's 32-token vocabulary
    assert gen.main([str(tmp_path / "ckpt"), "--prompt", "w3", "--tokenizer", "byte", "--device", "cpu"]) == 2
    assert "outside the model's vocabulary (32)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "x" * 40], "40 tokens long, more than the model's context (seq_length 32)"),
    (["--prompt", "x", "--tokenizer", "missing.json"], "'missing.json' is neither 'byte' nor"),
    (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
])
def test_cli_errors(trained, capsys, args, message):
    assert gen.main([str(trained / "ckpt"), "--device", "cpu"] + args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err


def test_cli_bad_checkpoint_dir(tmp_path, capsys):
    assert gen.main([str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}: no engine checkpoint here (neither meta.json nor a 'latest' file)\n"
    # a real process: the one line and exit code a user sees, no traceback
    run = subprocess.run([sys.executable, "-m", "engine.generate", str(tmp_path / "missing"), "--prompt", "x"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stdout == "" and run.stderr == f"error: {tmp_path / 'missing'} is not a directory\n"
