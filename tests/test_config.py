"""Configuration: TOML + flags, and one clear message for every invalid setting."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from engine.training import main, parse_config, validate
from engine.training.config import ConfigError


def test_toml_then_flags(tmp_path):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('lr = 0.01\nsteps = 7\n[model]\nnum-layers = 2\n[batch]\nmicro_batch_size = 2\n')
    cfg = parse_config(["--config", str(cfg_file), "--steps", "9"])
    assert cfg.optimizer.lr == 0.01 and cfg.run.steps == 9 and cfg.batch.micro_batch_size == 2
    assert cfg.model_config().num_layers == 2 and cfg.model_config().hidden_size == 256
    validate(cfg, 1)
    assert cfg.optimizer.min_lr == pytest.approx(0.001) and cfg.schedule.lr_decay_steps == 9
    assert cfg.schedule.lr_warmup_steps == 0 and cfg.parallel.dp == 1 and cfg.parallel.schedule == "1f1b"


def test_presets():
    assert parse_config(["--model", "llama-7b"]).model_config().hidden_size == 4096
    assert parse_config(["--model", "llama-65b", "--num-layers", "2"]).model_config().num_layers == 2


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--model", "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-heads", "--num-kv-heads",
                 "--vocab-size", "--seq-length", "--rope-theta", "--norm-eps", "--dropout", "--tie-embeddings",
                 "--tp", "--pp", "--dp", "--vpp", "--schedule", "--sequence-parallel", "--zero", "--precision",
                 "--loss-scale", "--recompute", "--recompute-layers", "--optimizer", "--lr", "--min-lr", "--beta1",
                 "--beta2", "--eps", "--weight-decay", "--clip-grad", "--lr-warmup-steps", "--lr-warmup-fraction",
                 "--lr-decay-style", "--lr-decay-steps", "--micro-batch-size", "--global-batch-size",
                 "--rampup-batch-size", "--data", "--tokenizer", "--eval-interval", "--eval-iters", "--steps",
                 "--seed", "--log-interval", "--metrics-file", "--plot", "--run-name", "--save", "--save-interval",
                 "--load", "--keep-last", "--spike-factor", "--max-rollbacks", "--config", "--peak-tflops"]:
        assert flag in text, flag


# (argv, world size, the flag the message must name)
INVALID = [
    (["--tp", "2"], 1, "--tp"),
    (["--tp", "2", "--pp", "2", "--dp", "1"], 8, "--dp"),
    (["--tp", "3"], 3, "--tp"),                             # 8 heads
    (["--num-kv-heads", "2", "--tp", "4"], 4, "--tp"),      # kv heads not divisible by tp
    (["--num-heads", "6", "--num-kv-heads", "4", "--hidden-size", "384"], 1, "--num-kv-heads"),
    (["--num-layers", "3", "--pp", "2"], 2, "--pp"),
    (["--pp", "2", "--vpp", "3"], 2, "--pp"),                # 4 layers, pp * vpp = 6
    (["--global-batch-size", "10", "--micro-batch-size", "4"], 1, "--global-batch-size"),
    (["--global-batch-size", "16", "--micro-batch-size", "4", "--dp", "8"], 8, "--global-batch-size"),
    (["--model", "llama-3b"], 1, "--model"),
    (["--data", "/nonexistent/corpus.txt"], 1, "--data"),
    (["--tokenizer", "/nonexistent/tokenizer.json"], 1, "--tokenizer"),
    (["--sequence-parallel", "--tp", "2", "--seq-length", "255"], 2, "--sequence-parallel"),
    (["--sequence-parallel"], 1, "--sequence-parallel"),
    (["--schedule", "interleaved", "--pp", "2"], 2, "--schedule"),
    (["--rampup-batch-size", "4,4"], 1, "--rampup-batch-size"),
    (["--pp", "2", "--vpp", "2", "--global-batch-size", "12", "--micro-batch-size", "4"], 2, "--schedule interleaved"),
    (["--rampup-batch-size", "6,4,100"], 1, "--rampup-batch-size"),
    (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr"),
    (["--lr", "0"], 1, "--lr"),
    (["--loss-scale", "128"], 1, "--loss-scale"),
    (["--recompute-layers", "2"], 1, "--recompute-layers"),
    (["--hidden-size", "250"], 1, "--hidden-size"),
    (["--steps", "0"], 1, "--steps"),
    (["--keep-last", "0"], 1, "--keep-last"),
    (["--spike-factor", "0.5"], 1, "--spike-factor"),
    (["--lr-warmup-steps", "500", "--steps", "100"], 1, "--lr-warmup-steps"),
    (["--zero", "5"], 1, "--zero"),
    (["--overlap-param-gather"], 1, "--overlap-param-gather"),                    # nothing sharded at dp 1
    (["--overlap-param-gather", "--dp", "2", "--zero", "3"], 2, "--overlap-param-gather"),
    (["--precision", "fp8"], 1, "--precision"),
    (["--steps", "ten"], 1, "--steps"),
    (["--profile-steps", "0:2"], 1, "--profile-steps"),
    (["--profile-steps", "5:3"], 1, "--profile-steps"),
    (["--profile-steps", "two"], 1, "--profile-steps"),
    (["--profile-steps", "190:210"], 1, "--profile-steps"),                        # past --steps 200
    (["--profile-steps", "2:3", "--profile-ranks", "1"], 1, "--profile-ranks"),
    (["--profile-steps", "2:3", "--profile-ranks", "0,x"], 2, "--profile-ranks"),
    (["--profile-memory"], 1, "--profile-memory"),                                 # no window chosen
    (["--time-limit", "0"], 1, "--time-limit"),
]


@pytest.mark.parametrize("argv,world,flag", INVALID)
def test_invalid_settings_exit_with_one_clear_message(argv, world, flag, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_adafactor_needs_whole_matrices():
    with pytest.raises(ConfigError, match=r"adafactor: not with --zero 1 over dp x cp = 2"):
        validate(parse_config(["--zero", "1", "--dp", "2", "--optimizer", "adafactor"]), 2)
    with pytest.raises(ConfigError, match=r"adafactor: not with --zero 1 \(the default when dp > 1\) over dp x cp"):
        validate(parse_config(["--dp", "2", "--optimizer", "adafactor"]), 2)
    # ZeRO shards over dp x cp: context parallelism alone splits the matrices too (this once passed and failed at
    # the first save)
    with pytest.raises(ConfigError, match=r"adafactor: not with --zero 1 over dp x cp = 2"):
        validate(parse_config(["--zero", "1", "--cp", "2", "--optimizer", "adafactor"]), 2)
    with pytest.raises(ConfigError, match="adafactor: not with --tp 2"):
        validate(parse_config(["--tp", "2", "--optimizer", "adafactor"]), 2)
    validate(parse_config(["--zero", "1", "--optimizer", "adafactor"]), 1)  # one rank: nothing is sharded
    validate(parse_config(["--cp", "2", "--optimizer", "adafactor"]), 2)


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config(["--config", str(bad)])
    bad.write_text("learning_rate = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        parse_config(["--config", str(bad)])
    bad.write_text("steps = 'many'\n")
    with pytest.raises(ConfigError, match="--steps"):
        parse_config(["--config", str(bad)])


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_llama.py"), "--tp", "3"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --tp") and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "runs")
