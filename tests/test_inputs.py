"""The front door: own tokenizers (--eos-token, tokenizer_config.json), and every bad input - data, tokenizer,
`latest`, --device, a layout rule - ends the command with one `error:` line and exit status 2 before any process
group exists, printed once per node."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SMALL, step_losses
from engine.training import main

pytest.importorskip("tokenizers")


def make_tokenizer(directory, corpus, specials, vocab_size=400, config=None):
    """A byte-level BPE tokenizer.json trained on a few corpus files, with `specials`; tokenizer_config.json beside
    it when `config` is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([os.path.join(corpus, f) for f in sorted(os.listdir(corpus))[:5]],
              trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials)))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    if config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
            json.dump(config, fh)
    return path, tok


@pytest.mark.parametrize("how", ["--eos-token", "tokenizer_config.json"])
def test_a_tokenizer_whose_eos_is_named_otherwise_trains(tmp_path, corpus, monkeypatch, how):
    """`[EOS]`/`[UNK]`-style specials (the tokenizers library's usual ones): the end-of-document token is named
    by --eos-token or by the tokenizer_config.json beside tokenizer.json (Hugging Face's convention)."""
    from engine.data.tokenizers import build_tokenizer
    specials = ["[UNK]", "[BOS]", "[END]"]
    config = {"eos_token": {"content": "[END]"}, "bos_token": "[BOS]"} if how != "--eos-token" else None
    path, tok = make_tokenizer(str(tmp_path / "tok"), corpus, specials, config=config)
    with pytest.raises(ValueError, match="no end-of-document token"):
        build_tokenizer(path) if how == "--eos-token" else build_tokenizer(make_tokenizer(
            str(tmp_path / "bare"), corpus, specials)[0])
    eos_tok = make_tokenizer(str(tmp_path / "eos"), corpus, ["[UNK]", "[EOS]"])  # the library's usual name
    assert build_tokenizer(eos_tok[0]).eos_id == eos_tok[1].token_to_id("[EOS]")
    flags = ["--eos-token", "[END]"] if how == "--eos-token" else []
    hf = build_tokenizer(path, *flags[1:])
    assert hf.eos_id == tok.token_to_id("[END]")
    if how != "--eos-token":
        assert hf.bos_id == tok.token_to_id("[BOS]")
    monkeypatch.chdir(tmp_path)
    assert main(SMALL + ["--data", corpus, "--tokenizer", path, "--steps", "2", "--run-name", "own"] + flags) == 0
    assert sorted(step_losses("runs/own/metrics.jsonl")) == [1, 2]


def test_the_data_and_the_model_vocabulary_must_agree(tmp_path, corpus, monkeypatch):
    """A .bin written by a 1000-token tokenizer is not trained on by the byte model (at tp 1 it crashed, at tp 2 it
    trained on garbage), and ids beyond --vocab-size are refused, naming the largest."""
    from engine.data.datasets import load_stream, write_indexed
    path, _ = make_tokenizer(str(tmp_path / "tok"), corpus, ["<unk>", "</s>"], vocab_size=1000)
    from engine.data.tokenizers import build_tokenizer
    monkeypatch.chdir(tmp_path)
    stream = load_stream([corpus], build_tokenizer(path))
    write_indexed(str(tmp_path / "bpe"), stream, 1000)
    for tp in ("1", "2"):
        err = run_error(monkeypatch, ["--data", str(tmp_path / "bpe"), "--tp", tp], world=int(tp))
        assert "-token tokenizer" in err or "holds token id" in err, err
    err = run_error(monkeypatch, ["--data", str(tmp_path / "bpe"), "--tokenizer", path, "--vocab-size", "300"])
    assert f"holds token id {int(np.max(stream.tokens))}, but the model's vocabulary has 300 ids" in err


def run_error(monkeypatch, argv, world=1):
    """Runs the command in-process; asserts exit 2 and one `error:` line without a traceback; returns the line."""
    import io
    from contextlib import redirect_stderr
    monkeypatch.setenv("WORLD_SIZE", str(world))
    buf = io.StringIO()
    with redirect_stderr(buf), pytest.raises(SystemExit) as exc:
        main(SMALL + ["--steps", "1"] + argv)
    err = buf.getvalue()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def bad_inputs(tmp: str, corpus: str) -> dict:
    """name -> (flags, expected words in the line); builds the broken files under tmp."""
    from engine.data.datasets import load_stream, write_indexed
    from engine.data.tokenizers import ByteTokenizer
    write_indexed(f"{tmp}/good", load_stream([corpus], ByteTokenizer()), 259)
    write_indexed(f"{tmp}/other", load_stream([os.path.join(corpus, "doc000.py")], ByteTokenizer()), 259)
    for name in ("truncated", "mismatched"):
        os.link(f"{tmp}/good.bin", f"{tmp}/{name}.bin")
    with open(f"{tmp}/good.idx", "rb") as src, open(f"{tmp}/truncated.idx", "wb") as dst:
        dst.write(src.read()[:20])
    os.link(f"{tmp}/other.idx", f"{tmp}/mismatched.idx")
    with open(f"{tmp}/random.dat", "wb") as fh:
        fh.write(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with open(f"{tmp}/tokenizer.json", "w") as fh:
        fh.write('{"version": "1.0", "model": ')
    os.makedirs(f"{tmp}/ckpt")
    with open(f"{tmp}/ckpt/latest", "wb") as fh:
        fh.write(b"\xff\xfe\x80 random bytes \x00")
    return {
        "truncated .idx": (["--data", f"{tmp}/truncated"], "truncated"),
        "mismatched .idx": (["--data", f"{tmp}/mismatched"], "mismatch"),
        "random binary file": (["--data", f"{tmp}/random.dat"], "random.dat"),
        ".bin instead of the prefix": (["--data", f"{tmp}/good.bin"], "prefix"),
        "corrupt tokenizer.json": (["--tokenizer", f"{tmp}/tokenizer.json"], "tokenizer.json"),
        "--device cuda without CUDA": (["--device", "cuda"], "--device cuda"),
        "random bytes in latest": (["--load", f"{tmp}/ckpt"], "latest"),
        "--lr nan": (["--lr", "nan"], "--lr: must be a finite number"),
        "--tp 2 --ffn-hidden-size 705": (["--tp", "2", "--ffn-hidden-size", "705"], "--ffn-hidden-size 705"),
        "--eos-token missing from the vocabulary": (["--tokenizer", "byte", "--eos-token", "[EOS]"], "--eos-token"),
        "blend without a weight": (["--data", "0.7", corpus, f"{tmp}/good"], "W1 PATH1"),
        "blend with a negative weight": (["--data", "0.7", corpus, "-0.3", f"{tmp}/good"], "positive"),
    }


BAD = ["truncated .idx", "mismatched .idx", "random binary file", ".bin instead of the prefix",
       "corrupt tokenizer.json", "--device cuda without CUDA", "random bytes in latest", "--lr nan",
       "--tp 2 --ffn-hidden-size 705", "--eos-token missing from the vocabulary", "blend without a weight",
       "blend with a negative weight"]


@pytest.mark.parametrize("name", BAD)
def test_a_bad_input_is_one_line_and_exit_2(tmp_path, corpus, monkeypatch, name):
    if name == "--device cuda without CUDA":
        import torch
        if torch.cuda.is_available():
            pytest.skip("this host has CUDA")
    monkeypatch.chdir(tmp_path)
    flags, expected = bad_inputs(str(tmp_path), corpus)[name]
    line = run_error(monkeypatch, flags, world=2 if "--tp" in flags else 1)
    assert expected in line, line


def test_estimate_and_trainer_share_the_layout_rules():
    """One copy of the rules: a layout the estimator refuses, the trainer refuses too, and the other way round."""
    from engine.estimate import estimate
    from engine.training.config import ConfigError, parse_config, validate
    shapes = [["--ffn-hidden-size", "705"], ["--num-kv-heads", "2", "--num-heads", "4"], ["--num-layers", "6"]]
    layouts = [(tp, pp, vpp) for tp in (1, 2, 4) for pp in (1, 2, 3) for vpp in (1, 2)]
    for shape in shapes:
        for tp, pp, vpp in layouts:
            flags = ["--model", "tiny", "--hidden-size", "64", *shape, "--tp", str(tp), "--pp", str(pp),
                     "--vpp", str(vpp), "--micro-batch-size", "1", "--global-batch-size", str(pp * 4)]
            try:
                validate(parse_config(flags), tp * pp)
                trainer_ok = True
            except ConfigError:
                trainer_ok = False
            try:
                estimate(flags + ["--gpus", str(tp * pp), "--tokens", "1e9"])
                estimate_ok = True
            except SystemExit:
                estimate_ok = False
            assert trainer_ok == estimate_ok, (flags, trainer_ok, estimate_ok)


def test_a_checkpoint_of_another_model_or_optimizer_is_refused_before_the_process_group(tmp_path, corpus,
                                                                                          monkeypatch):
    """--load of a checkpoint the flags do not fit names each differing model flag (saved and configured values)
    or the optimizer, in validation: WORLD_SIZE 2 without a rendezvous would fail if a process group were begun."""
    monkeypatch.chdir(tmp_path)
    assert main(SMALL + ["--data", corpus, "--steps", "2", "--run-name", "a"]) == 0
    load = ["--data", corpus, "--load", "runs/a/checkpoints", "--run-name", "b", "--dp", "2"]
    err = run_error(monkeypatch, load + ["--num-layers", "3", "--tie-embeddings"], world=2)
    assert ("holds another model: --num-layers (saved 2, configured 3), --tie-embeddings (saved False, configured "
            "True); pass the model flags of the run that saved it") in err
    err = run_error(monkeypatch, load + ["--optimizer", "adafactor", "--zero", "0"], world=2)
    assert "was trained with --optimizer adamw; resume with the same optimizer" in err
    err = run_error(monkeypatch, load + ["--vocab-size", "300"], world=2)
    assert "--vocab-size (saved 259, configured 300)" in err


def test_other_ranks_wait_for_the_first_then_print_a_problem_of_their_own(monkeypatch, capsys):
    """A rank other than the node's first waits before exiting (so torchrun cannot kill the first before it
    prints); if it is still alive after the wait, the problem was its own: it prints it."""
    import time
    from engine.training import config
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(config, "CONFIG_ERROR_GRACE_S", 0.3)

    def refused():
        raise config.ConfigError("--data-cache /x: cannot write there")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        config.exit_on_config_error(refused)
    assert exc.value.code == 2 and time.perf_counter() - start >= 0.3
    assert capsys.readouterr().err == "error: --data-cache /x: cannot write there\n"


@pytest.mark.e2e
def test_under_torchrun_the_line_is_printed_once(tmp_path):
    """Every rank finds the problem before any process group; the first rank of the node prints it."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                           os.path.join(ROOT, "examples", "pretrain_llama.py"), "--lr", "nan"],
                          cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                          timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --lr: must be a finite number") == 1, proc.stderr[-3000:]
    assert os.path.join(ROOT, "engine") not in proc.stderr  # no traceback through our code (torchrun has its own)
