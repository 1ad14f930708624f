"""The single-process trainer: metrics, exact resume, rollback, non-finite steps, SIGTERM, checkpoints."""
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, SMALL, read_metrics, step_losses, traced, trajectory
from engine.training import main, parse_config, validate
from engine.training.checkpoint import CheckpointError, CheckpointReader, list_checkpoints, resolve
from engine.training.trainer import StopTraining, Trainer

STEP_KEYS = {"step", "loss", "lr", "grad_norm", "global_batch_size", "consumed_samples", "tokens_per_s",
             "tflops_per_device", "mfu", "peak_mem_bytes", "loss_scale", "skipped"}


def make_trainer(argv):
    cfg = parse_config(argv)
    validate(cfg, 1)
    return Trainer(cfg)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_metrics_contract(run_dir, corpus):
    assert main(SMALL + ["--data", corpus, "--steps", "4", "--eval-interval", "2", "--save-interval", "2",
                         "--run-name", "m"]) == 0
    records = read_metrics("runs/m/metrics.jsonl")
    layout = [r for r in records if r.get("event") == "layout"]
    assert layout == [{"event": "layout", "tp": 1, "pp": 1, "dp": 1, "vpp": 1, "zero": 0, "world": 1}]
    memory = [r for r in records if r.get("event") == "memory"][0]
    num_params = 2 * (259 * 64) + 64 + 2 * (2 * 64 + 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert memory["param_bytes"] == 4 * num_params and memory["grad_bytes"] == 4 * num_params
    assert memory["optimizer_bytes"] == 8 * num_params  # fp32 AdamW: m and v; the params are their own master
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert STEP_KEYS <= set(r) and r["skipped"] is False and r["loss_scale"] == 1.0
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
    assert [r["consumed_samples"] for r in steps] == [4, 8, 12, 16]
    assert steps[0]["loss"] == pytest.approx(5.55, abs=0.15)  # ln(259): uniform over the byte vocabulary
    evals = [r for r in records if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:  # recomputed from the checkpoint of that step, over the same validation samples
        assert e["eval_loss"] == pytest.approx(recomputed_eval_loss(corpus, f"runs/m/checkpoints/step_{e['step']:08d}"),
                                               rel=1e-5)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] < steps[0]["loss"]
    assert os.path.isfile("runs/m/loss.png")
    assert open("runs/m/checkpoints/latest").read().strip() == "step_00000004"


def recomputed_eval_loss(corpus, step_dir, eval_iters=4, global_batch=4, seq=32):
    """Trainer.evaluate's number for the defaults (--valid-fraction 0.01, --eval-iters 4) done independently:
    the checkpoint's whole model (engine.load_model) over the validation samples 0..eval_iters*global_batch-1
    (wrapping around the held-out set), one forward, mean token cross-entropy."""
    import engine
    from engine.data.datasets import load_stream, train_valid_split
    from engine.data.tokenizers import ByteTokenizer
    _, valid = train_valid_split(load_stream([corpus], ByteTokenizer()), seq, 0.01)
    samples = torch.stack([valid[i % len(valid)] for i in range(eval_iters * global_batch)])
    model = engine.load_model(step_dir)
    with torch.no_grad():
        logits = model(samples[:, :-1])
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), samples[:, 1:].flatten()).item()


def test_resume_is_bit_exact(run_dir, corpus):
    # the LR schedule spans --lr-decay-steps, which defaults to --steps: pin it so both runs share it
    base = SMALL + ["--data", corpus, "--steps", "12", "--dropout", "0.1", "--lr-warmup-steps", "2",
                    "--lr-decay-steps", "12"]
    assert main(base + ["--run-name", "full"]) == 0
    assert main(base + ["--run-name", "half", "--steps", "6"]) == 0
    assert main(base + ["--run-name", "half", "--load", "runs/half/checkpoints"]) == 0
    full, half = step_losses("runs/full/metrics.jsonl"), step_losses("runs/half/metrics.jsonl")
    assert sorted(half) == list(range(1, 13))
    assert half == full  # bit-identical, dropout included


def test_the_device_busy_share_of_a_trace(tmp_path):
    """--profile-steps on CUDA reports the share of the traced steps' time in which a kernel ran: kernels on two
    streams overlap, one starts before a step and one runs between steps; without kernels there is no share."""
    import json
    from engine.training.profiling import device_busy_fraction
    step = lambda n, ts, dur: {"ph": "X", "name": f"train step {n}", "cat": "user_annotation", "ts": ts,  # noqa: E731
                               "dur": dur}
    kernel = lambda ts, dur: {"ph": "X", "name": "k", "cat": "kernel", "ts": ts, "dur": dur}  # noqa: E731
    events = [step(1, 0, 100), step(2, 200, 100), kernel(10, 20), kernel(20, 30), kernel(90, 120), kernel(250, 10),
              kernel(150, 20), {"ph": "X", "name": "aten::mm", "cat": "cpu_op", "ts": 0, "dur": 300}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    # busy within the steps: [10, 50] + [90, 100] + [200, 210] + [250, 260] = 70 of 200
    assert device_busy_fraction(str(path)) == pytest.approx(0.35)
    path.write_text(json.dumps({"traceEvents": [e for e in events if e["cat"] != "kernel"]}))
    assert device_busy_fraction(str(path)) is None


def test_a_step_line_times_its_phases(run_dir, corpus):
    """data_s, forward_backward_s, grad_sync_s and optimizer_s time what their names say: on a clock that moves only
    when the batch is built (by 2 s), in the forward-backward (1 s), the gradient norm (0.5 s) and the optimizer step
    (4 s), each phase takes exactly its own; on the real clock the phases fit within the step."""
    trainer = make_trainer(SMALL + ["--data", corpus, "--steps", "2"])
    rec = trainer.train_step()
    phases = ("data_s", "forward_backward_s", "grad_sync_s", "optimizer_s")
    assert all(rec[k] >= 0 for k in phases) and sum(rec[k] for k in phases) <= rec["step_time_s"]
    now = [100.0]
    build, run, norm, update = trainer._micro_batches, trainer.forward_backward, trainer.grad_norm, trainer.zero.step

    def advancing(seconds, fn):
        def wrapped(*args, **kwargs):
            now[0] += seconds
            return fn(*args, **kwargs)
        return wrapped

    trainer.timer.clock = lambda: now[0]
    trainer._micro_batches, trainer.forward_backward = advancing(2.0, build), advancing(1.0, run)
    trainer.grad_norm, trainer.zero.step = advancing(0.5, norm), advancing(4.0, update)
    rec = trainer.train_step()
    assert {k: rec[k] for k in phases} == {"data_s": 2.0, "forward_backward_s": 1.0, "grad_sync_s": 0.5,
                                           "optimizer_s": 4.0}


def test_profile_steps_trace_the_window_and_change_nothing(run_dir, corpus, capsys):
    """--profile-steps 2:3 traces exactly steps 2 and 3 (with --profile-memory, the allocations too) into a Chrome
    trace and an operator table, says where, and trains exactly as the same run without it."""
    base = SMALL + ["--data", corpus, "--steps", "4", "--eval-interval", "2"]
    assert main(base + ["--run-name", "plain"]) == 0
    assert main(base + ["--run-name", "profiled", "--profile-steps", "2:3", "--profile-memory"]) == 0
    assert trajectory("runs/profiled/metrics.jsonl") == trajectory("runs/plain/metrics.jsonl")
    assert sorted(os.listdir("runs/profiled/profile")) == ["ops_rank0_steps2-3.txt", "trace_rank0_steps2-3.json"]
    steps, allocations = traced("runs/profiled/profile/trace_rank0_steps2-3.json")
    assert steps == [2, 3] and allocations > 0
    table = open("runs/profiled/profile/ops_rank0_steps2-3.txt").read()
    assert "aten::mm" in table and "Self CPU" in table
    out = capsys.readouterr().out
    assert "profiling from step 2 to 3 on rank(s) 0" in out
    assert "profile of steps 2-3 written to runs/profiled/profile/ by rank(s) 0" in out
    assert not os.path.exists("runs/plain/profile")
    os.makedirs("runs/blocked")
    open("runs/blocked/profile", "w").close()  # a file where the directory should go: one warning, the run goes on
    assert main(base + ["--run-name", "blocked", "--profile-steps", "3:3"]) == 0
    err = capsys.readouterr().err
    assert "warning: rank 0 could not write its --profile-steps trace to runs/blocked/profile" in err
    assert trajectory("runs/blocked/metrics.jsonl") == trajectory("runs/plain/metrics.jsonl")


def test_a_wrong_load_is_an_error_and_latest_never_moves_back(run_dir, corpus, capsys):
    """Issue 11's lost-progress case: --save holds step 4; a mistyped --load, or a fresh run that would save step 2
    there, exits 2 before any step and leaves `latest` at 4; --auto-resume continues from 4; --overwrite-checkpoints
    lets an earlier step replace it (with a warning); --auto-resume on an empty --save starts fresh."""
    from engine.training.checkpoint import latest_step
    base = SMALL + ["--data", corpus, "--save", "ckpt", "--save-interval", "2"]
    assert main(base + ["--steps", "4"]) == 0
    assert latest_step("ckpt") == 4
    os.makedirs("empty")
    for bad in (["--load", "empty"], ["--load", "ckpt_typo"]):
        with pytest.raises(SystemExit) as exc:
            main(base + ["--steps", "6"] + bad)
        assert exc.value.code == 2 and "--load: no checkpoint in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(base + ["--steps", "6"])  # forgot --load: its first save (step 2) would move `latest` back
    assert exc.value.code == 2 and "--save: ckpt holds step 4" in capsys.readouterr().err
    assert latest_step("ckpt") == 4 and sorted(os.listdir("ckpt")) == ["latest", "step_00000002", "step_00000004"]
    assert main(base + ["--steps", "6", "--auto-resume"]) == 0
    assert "resumed from ckpt/step_00000004 at step 4" in capsys.readouterr().out and latest_step("ckpt") == 6
    assert main(base + ["--steps", "2", "--overwrite-checkpoints"]) == 0
    assert "holds step 6, newer than this run's start" in capsys.readouterr().err and latest_step("ckpt") == 2
    assert main(SMALL + ["--data", corpus, "--save", "fresh", "--steps", "1", "--auto-resume"]) == 0
    assert latest_step("fresh") == 1


def test_an_unplanned_earlier_save_leaves_latest_alone(tmp_path, capsys):
    """finalize() never moves `latest` backwards without overwrite (a SIGTERM save below a newer checkpoint)."""
    from engine.training import checkpoint as ckpt
    for step, overwrite, expected in ((5, False, 5), (3, False, 5), (3, True, 3)):
        tmp = ckpt.prepare_tmp_dir(str(tmp_path), step)
        name, digest = ckpt.write_rank_file(tmp, 0, {"x": torch.zeros(1)}, {})
        ckpt.finalize(str(tmp_path), step, {}, {name: digest}, None, overwrite)
        assert ckpt.latest_step(str(tmp_path)) == expected
        assert os.path.isdir(tmp_path / ckpt.step_dir_name(step))
    assert "still names the newer step 5" in capsys.readouterr().err


def test_nonfinite_gradient_skips_the_update(run_dir, corpus):
    trainer = make_trainer(SMALL + ["--data", corpus, "--steps", "3", "--run-name", "nf"])
    original = trainer.forward_backward

    def poisoned(*args):
        loss = original(*args)
        if trainer.state.step == 1:  # during the second step
            trainer.named_params[0][1].grad[0, 0] = float("inf")
        return loss

    trainer.forward_backward = poisoned
    weights = lambda: [p.detach().clone() for _, p in trainer.named_params]
    # (the skip is decided by the optimizer's kernels on the device; its step counters are put back afterwards)
    opt_state = lambda: [t.clone() for s in trainer.zero.optimizer.state.values() for t in s.values()]
    records = [trainer.train_step()]
    after_first, state_after_first = weights(), opt_state()
    records.append(trainer.train_step())
    assert all(torch.equal(a, b) for a, b in zip(after_first, weights()))
    assert all(torch.equal(a, b) for a, b in zip(state_after_first, opt_state()))
    records.append(trainer.train_step())
    assert [r["skipped"] for r in records] == [False, True, False]
    assert trainer.state.skipped_steps == 1 and trainer.state.step == 3
    assert not all(torch.equal(a, b) for a, b in zip(after_first, weights()))


def test_spike_rolls_back_and_skips_the_data(run_dir, corpus):
    trainer = make_trainer(SMALL + ["--data", corpus, "--steps", "12", "--save-interval", "6",
                                    "--spike-factor", "3", "--run-name", "sp", "--lr-warmup-steps", "0"])
    original = trainer.forward_backward
    spiked = []

    def spiky(*args):
        loss = original(*args)
        if trainer.state.step == 8 and not spiked:  # step 9 reports a spike, once
            spiked.append(True)
            return loss * 10
        return loss

    trainer.forward_backward = spiky
    state = trainer.train()
    records = read_metrics("runs/sp/metrics.jsonl")
    rollback = [r for r in records if r.get("event") == "rollback"]
    # global batch 4: steps 7..9 consumed positions [24, 36) after the step-6 checkpoint
    assert rollback == [{"event": "rollback", "from_step": 9, "to_step": 6, "skipped_samples": [24, 36]}]
    assert state.step == 12 and state.rollbacks == 1 and state.skipped_ranges == [[24, 36]]
    assert state.consumed_samples == 48 and state.data_position == 60
    # After the rollback, step 7 trains on the data at position 36, i.e. what step 10 would have seen.
    reference = make_trainer(SMALL + ["--data", corpus, "--steps", "6", "--run-name", "ref",
                                      "--lr-warmup-steps", "0"])
    reference.load_checkpoint(os.path.join("runs/sp/checkpoints", "step_00000006"))
    reference.state.data_position = 36
    rec = reference.train_step()
    assert rec["loss"] == step_losses("runs/sp/metrics.jsonl")[7]


def test_max_rollbacks_stops_with_a_message(run_dir, corpus, capsys):
    trainer = make_trainer(SMALL + ["--data", corpus, "--steps", "20", "--save-interval", "5",
                                    "--spike-factor", "2", "--max-rollbacks", "1", "--run-name", "mr"])
    original = trainer.forward_backward
    trainer.forward_backward = lambda *args: original(*args) * (10 if trainer.state.step >= 7 else 1)
    from engine.training.trainer import StopTraining
    with pytest.raises(StopTraining, match="max-rollbacks"):
        trainer.train()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_and_exits_zero(run_dir, corpus, sig):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) finish the step, save it and exit 0."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    name = signal.Signals(sig).name
    cmd = [sys.executable, os.path.join(ROOT, "examples", "pretrain_llama.py")] + SMALL + [
        "--data", corpus, "--steps", "100000", "--run-name", name]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "runs" / name / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(step_losses(metrics)) < 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    last = max(step_losses(metrics))
    step_dir = resolve(str(run_dir / "runs" / name / "checkpoints"))
    assert step_dir.endswith(f"step_{last:08d}")
    assert "stop signal (SIGTERM/SIGINT): saved" in out


def test_a_time_limit_saves_the_step_and_exits_zero(run_dir, corpus, capsys):
    """--time-limit: past it the run saves after the step it is in and exits 0 (a --profile-steps window cut short
    by it still writes its trace, named by the steps it traced), and a run that starts past it trains nothing;
    --auto-resume then continues the run step for step as if it had not stopped (and traces the rest of the window
    into files of their own)."""
    base = SMALL + ["--data", corpus, "--steps", "4", "--lr-decay-steps", "4"]
    assert main(base + ["--run-name", "straight"]) == 0
    profile = ["--profile-steps", "1:3"]
    limited = make_trainer(base + ["--run-name", "limited", "--time-limit", "1e6"] + profile)
    run = limited.forward_backward  # the limit passes during step 1
    limited.forward_backward = lambda *args: (setattr(limited.cfg.run, "time_limit", 1e-9), run(*args))[1]
    assert limited.train().step == 1
    assert "--time-limit passed (1e-09 s): saved runs/limited/checkpoints/step_00000001 at step 1; exiting" in \
        capsys.readouterr().out
    assert sorted(step_losses("runs/limited/metrics.jsonl")) == [1]
    assert traced("runs/limited/profile/trace_rank0_steps1-1.json")[0] == [1]
    # a restart with the job's time already spent trains nothing and leaves the checkpoint as it was
    assert main(base + ["--run-name", "limited", "--time-limit", "1e-9", "--auto-resume"]) == 0
    assert "--time-limit passed (1e-09 s) before step 2: nothing trained; exiting" in capsys.readouterr().out
    assert sorted(step_losses("runs/limited/metrics.jsonl")) == [1]
    assert main(base + ["--run-name", "limited", "--auto-resume"] + profile) == 0
    assert traced("runs/limited/profile/trace_rank0_steps2-3.json")[0] == [2, 3]
    assert traced("runs/limited/profile/trace_rank0_steps1-1.json")[0] == [1]
    assert step_losses("runs/limited/metrics.jsonl") == step_losses("runs/straight/metrics.jsonl")


def test_the_time_limit_counts_from_the_jobs_start_across_restarts(run_dir, corpus, monkeypatch, capsys):
    """engine.launch hands every attempt the job's start ($ENGINE_JOB_START), and --time-limit counts from it: a
    trainer started 100 s into a job with a 50 s limit trains nothing. A malformed value is one line."""
    import engine.launch
    seen = []
    monkeypatch.setenv("ENGINE_JOB_START", "")  # (recorded as it was, so that the variable the launcher sets
    monkeypatch.delenv("ENGINE_JOB_START")       # is removed after the test)
    monkeypatch.setattr(engine.launch, "run_attempt", lambda command: seen.append(os.environ["ENGINE_JOB_START"]) or 1)
    before = time.time()
    engine.launch.main(["--max-restarts", "1", "--"] + SMALL + ["--data", corpus, "--run-name", "launched"])
    assert len(seen) == 2 and seen[0] == seen[1] and before <= float(seen[0]) <= time.time()
    monkeypatch.setenv("ENGINE_JOB_START", repr(time.time() - 100))
    assert main(SMALL + ["--data", corpus, "--steps", "4", "--run-name", "late", "--time-limit", "50"]) == 0
    assert step_losses("runs/late/metrics.jsonl") == {}
    assert "--time-limit passed (50 s) before step 1: nothing trained; exiting" in capsys.readouterr().out
    monkeypatch.setenv("ENGINE_JOB_START", "yesterday")
    with pytest.raises(SystemExit) as exc:
        main(SMALL + ["--data", corpus, "--run-name", "bad", "--time-limit", "50"])
    assert exc.value.code == 2 and "$ENGINE_JOB_START: 'yesterday' is not a Unix time" in capsys.readouterr().err
    assert main(SMALL + ["--data", corpus, "--steps", "1", "--run-name", "unlimited"]) == 0  # (unread without a limit)


def test_an_unwritable_save_exits_2_before_step_1(run_dir, corpus, capsys):
    open("a_file", "w").close()  # (the tests run as root, so a read-only mode would not stop writes)
    with pytest.raises(SystemExit) as exc:
        main(SMALL + ["--data", corpus, "--steps", "2", "--save", "a_file/ckpt", "--run-name", "ro"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--save: cannot write checkpoints to a_file/ckpt" in err
    assert not os.path.exists("runs/ro")  # no metrics: not a step was taken


def test_checkpoint_directory_hygiene(run_dir, corpus, capsys):
    """Interrupted saves are cleaned at start; `latest` naming anything but a step directory inside, a meta.json
    that does not match its checksum or that names files outside the step directory are refused by name."""
    base = SMALL + ["--data", corpus, "--save", "ckpt", "--save-interval", "2"]
    assert main(base + ["--steps", "2"]) == 0
    os.makedirs("ckpt/step_00000003.tmp")
    os.makedirs("ckpt/step_00000002.old")
    assert main(base + ["--steps", "4", "--auto-resume"]) == 0
    assert sorted(os.listdir("ckpt")) == ["latest", "step_00000002", "step_00000004"]
    assert "removed ckpt/step_00000003.tmp (left by an interrupted save)" in capsys.readouterr().out
    for bad in ("../step_00000002", "/etc", "\xff\xfe"):
        with open("ckpt/latest", "wb") as fh:
            fh.write(bad.encode("latin-1"))
        with pytest.raises(CheckpointError, match="ckpt/latest"):
            resolve("ckpt")
    with open("ckpt/latest", "w") as fh:
        fh.write("step_00000004\n")
    meta = "ckpt/step_00000004/meta.json"
    with open(meta) as fh:
        text = fh.read()
    with open(meta, "w") as fh:
        fh.write(text.replace('"step": 4', '"step": 40'))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        CheckpointReader("ckpt/step_00000004")
    os.remove(meta + ".sha256")  # (as a checkpoint written before checksums): the names are still checked
    with open(meta, "w") as fh:
        fh.write(text.replace("rank_00000.safetensors", "../../secret.safetensors"))
    with pytest.raises(CheckpointError, match="not a rank_NNNNN.safetensors file"):
        CheckpointReader("ckpt/step_00000004")


def test_truncated_checkpoint_is_reported_and_previous_still_loads(run_dir, corpus):
    assert main(SMALL + ["--data", corpus, "--steps", "4", "--save-interval", "2", "--run-name", "t"]) == 0
    good, bad = "runs/t/checkpoints/step_00000002", "runs/t/checkpoints/step_00000004"
    path = os.path.join(bad, "rank_00000.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match="rank_00000.safetensors"):
        CheckpointReader(bad)
    assert CheckpointReader(good).meta["step"] == 2
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_llama.py")] + SMALL + [
        "--data", corpus, "--steps", "6", "--load", "runs/t/checkpoints", "--run-name", "t2"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1 and "rank_00000.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert main(SMALL + ["--data", corpus, "--steps", "3", "--load", good, "--run-name", "t3"]) == 0


def test_keep_last(run_dir, corpus):
    assert main(SMALL + ["--data", corpus, "--steps", "6", "--save-interval", "1", "--keep-last", "2",
                         "--run-name", "k"]) == 0
    assert sorted(d for d in os.listdir("runs/k/checkpoints") if d.startswith("step_")) == [
        "step_00000005", "step_00000006"]


def test_keep_last_never_deletes_what_a_restarted_run_just_wrote(run_dir, corpus):
    """A run restarted from an earlier step into the same --save directory: its checkpoints sort before the
    later ones of the first run, and keep-last must delete only steps older than the one just written."""
    assert main(SMALL + ["--data", corpus, "--steps", "8", "--save-interval", "4", "--run-name", "k"]) == 0
    assert main(SMALL + ["--data", corpus, "--steps", "6", "--save-interval", "1", "--keep-last", "1",
                         "--load", "runs/k/checkpoints/step_00000004", "--run-name", "k",
                         "--overwrite-checkpoints"]) == 0
    steps = sorted(d for d in os.listdir("runs/k/checkpoints") if d.startswith("step_"))
    assert steps == ["step_00000006", "step_00000008"]
    assert CheckpointReader(resolve("runs/k/checkpoints")).meta["step"] == 6


def test_corrupt_meta_json_is_reported_by_name(run_dir, corpus):
    assert main(SMALL + ["--data", corpus, "--steps", "2", "--run-name", "m"]) == 0
    with open("runs/m/checkpoints/step_00000002/meta.json", "w") as fh:
        fh.write('{"format": ')
    with pytest.raises(CheckpointError, match="meta.json"):
        CheckpointReader("runs/m/checkpoints/step_00000002")


def test_fp16_and_bf16_runs_track_fp32_and_learn(run_dir, corpus):
    """bf16 weights and compute (fp32 masters) and fp16 (fp32 masters, dynamic loss scale) over the same 8
    steps as fp32: every step's loss is the fp32 one to within the formats' rounding (bf16's 8-bit mantissa:
    differences of ~1e-3 here, allowed 0.02; fp16: ~1e-4, allowed 0.01), yet not identical to it (the low
    precision is real), and all three learn: the mean of the last two losses is at least 0.5 below the first
    (~0.85 here; a model that does not train stays within ~0.05 of ln(259) = 5.55 on these batches)."""
    losses = {}
    for precision in ["fp32", "bf16", "fp16"]:
        assert main(SMALL + ["--data", corpus, "--steps", "8", "--precision", precision,
                             "--run-name", precision]) == 0
        losses[precision] = step_losses(f"runs/{precision}/metrics.jsonl")
        assert sorted(losses[precision]) == list(range(1, 9))
        curve = losses[precision]
        assert (curve[7] + curve[8]) / 2 < curve[1] - 0.5, (precision, curve)
    for precision, tolerance in [("bf16", 0.02), ("fp16", 0.01)]:
        diffs = [abs(losses[precision][s] - losses["fp32"][s]) for s in range(1, 9)]
        assert max(diffs) <= tolerance and max(diffs) > 0, (precision, diffs)
    steps = [r for r in read_metrics("runs/fp16/metrics.jsonl") if "event" not in r]
    assert steps[0]["loss_scale"] == 2.0 ** 16


ADAFACTOR = ["--optimizer", "adafactor", "--lr", "1e-2", "--lr-warmup-steps", "0"]


def test_adafactor_in_the_trainer_matches_a_plain_loop(run_dir, corpus):
    """The trainer's Adafactor (fp32, momentum 0.9, weight decay 0.1 on matrices, clipping at norm 1) step by
    step against a plain loop on a copy of the same model and batches: one whole-batch forward and backward,
    torch's clip_grad_norm_, and transformers' Adafactor with the same settings (our Adafactor when
    transformers is missing). The LR is constant: transformers applies it before the momentum, which is the
    same update only when it does not change. Weights agree to ~1e-7 after every step."""
    from engine.models.llama import Llama
    try:
        from transformers.optimization import Adafactor as Reference
        extra = dict(scale_parameter=False, relative_step=False, warmup_init=False, eps=(1e-30, 1e-3))
    except ImportError:
        from engine.optim import Adafactor as Reference
        extra = {}
    trainer = make_trainer(SMALL + ["--data", corpus, "--steps", "6", "--lr-decay-style", "constant",
                                    "--run-name", "a"] + ADAFACTOR)
    model = Llama(trainer.model_cfg)
    model.load_state_dict(trainer.chunks[0].state_dict())
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(n for n, _ in trainer.named_params)
    groups = [{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}]
    reference = Reference(groups, lr=1e-2, beta1=0.9, clip_threshold=1.0, decay_rate=-0.8, **extra)
    norms = []
    for _ in range(6):
        batch = torch.cat(trainer._micro_batches(trainer.state.data_position, 4))
        rec = trainer.train_step()
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        model.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        reference.step()
        norms.append(norm.item())
        assert rec["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
        for name, p in trainer.named_params:
            torch.testing.assert_close(p.detach(), params[name].detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {rec['step']}, {name}: {m}")
    assert min(norms) > 1.0, norms  # every step is clipped (norms 1.6-2.9 here): the clip is exercised


def test_adafactor_bf16_keeps_fp32_masters_and_resumes_bit_exactly(run_dir, corpus):
    """bf16 Adafactor keeps an fp32 master per parameter: the memory event counts it with the statistics, the
    checkpoint saves it, a resumed run continues bit for bit (losses, weights and masters), and an fp32 run
    loading the checkpoint takes the masters as its weights."""
    from engine.training.checkpoint import CheckpointReader
    base = SMALL + ["--data", corpus, "--precision", "bf16", "--lr-decay-steps", "4"] + ADAFACTOR
    assert main(base + ["--steps", "4", "--run-name", "a"]) == 0
    assert main(base + ["--steps", "2", "--run-name", "a2"]) == 0
    assert main(base + ["--steps", "4", "--run-name", "a2", "--load", "runs/a2/checkpoints"]) == 0
    assert step_losses("runs/a/metrics.jsonl") == step_losses("runs/a2/metrics.jsonl")
    full, resumed = (CheckpointReader(f"runs/{r}/checkpoints/step_00000004") for r in ("a", "a2"))
    trainer = make_trainer(SMALL + ["--data", corpus, "--precision", "fp32", "--run-name", "f"] + ADAFACTOR)
    trainer.load_checkpoint("runs/a/checkpoints/step_00000004")
    expected_bytes = 0
    for name, p in trainer.named_params:
        master = full.read(f"optim/{name}/master_param")
        assert master.dtype == torch.float32 and torch.equal(master, resumed.read(f"optim/{name}/master_param"))
        assert torch.equal(full.read(f"model/{name}"), resumed.read(f"model/{name}"))
        assert torch.equal(full.read(f"model/{name}"), master.bfloat16())
        assert torch.equal(p.detach(), master), name  # the fp32 run's weights are the masters
        stats = p.shape[:-1].numel() + (p.shape[:-2] + p.shape[-1:]).numel() if p.ndim >= 2 else p.numel()
        expected_bytes += 4 * (2 * p.numel() + stats)  # master, momentum, factored second moment
    assert all("master_param" not in s for s in trainer.zero.optimizer.state.values())
    memory = [r for r in read_metrics("runs/a/metrics.jsonl") if r.get("event") == "memory"][0]
    assert memory["optimizer_bytes"] == expected_bytes
    from engine.estimate import Layout, memory_per_rank
    layout = Layout(precision="bf16", optimizer="adafactor", beta1=0.9)
    assert memory_per_rank(trainer.cfg.model_config(), layout, 0)["optimizer"] == expected_bytes  # the banner's


def test_trainer_leaves_the_callers_random_generator_alone(run_dir, corpus):
    """Embedded in another program, the trainer neither reseeds nor advances torch's global generator (dropout
    included), and its own results do not depend on that generator's state."""
    argv = SMALL + ["--data", corpus, "--steps", "3", "--dropout", "0.1", "--run-name", "g"]
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        trainer = make_trainer(argv)
        losses.append([trainer.train_step()["loss"] for _ in range(3)])
        assert torch.equal(torch.get_rng_state(), before)
    assert losses[0] == losses[1]


def test_trainer_takes_the_callers_dataset(run_dir, corpus):
    """Trainer(cfg, train_data=...): the caller's own samples, in the engine's seeded order; the same samples as
    the engine's own --data pipeline give the same losses."""
    own = make_trainer(SMALL + ["--data", corpus, "--steps", "3", "--run-name", "own"])
    samples = [own.train_data[i].tolist() for i in range(len(own.train_data))]  # plain lists of token ids
    cfg = parse_config(SMALL + ["--data", corpus, "--steps", "3", "--run-name", "given"])
    validate(cfg, 1)
    given = Trainer(cfg, train_data=samples)
    assert [given.train_step()["loss"] for _ in range(3)] == [own.train_step()["loss"] for _ in range(3)]
    from engine.training.config import ConfigError
    with pytest.raises(ConfigError, match="token ids"):
        Trainer(cfg, train_data=[[1, 2, 3]])


def _checkpoint_is_finite(step_dir) -> bool:
    reader = CheckpointReader(step_dir)
    tensors = [reader.read(k) for k in reader.keys("")]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_injected_nan_rolls_back_and_skips_the_data(run_dir, corpus):
    base = SMALL + ["--data", corpus, "--steps", "6", "--save-interval", "2"]
    assert main(base + ["--inject-fault", "nan@5", "--run-name", "nan"]) == 0
    records = read_metrics("runs/nan/metrics.jsonl")
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    assert [(r["from_step"], r["to_step"]) for r in rollbacks] == [(5, 4)]
    assert rollbacks[0]["skipped_samples"] == [16, 20]  # step 5's global batch of 4 samples is not trained on again
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 5, 6] and steps[4]["skipped"]
    assert all(math.isfinite(r["loss"]) for r in steps if r is not steps[4])
    assert all(_checkpoint_is_finite(f"runs/nan/checkpoints/{d}") for d in list_checkpoints("runs/nan/checkpoints"))


def test_a_spike_rolls_back(run_dir, corpus):
    assert main(SMALL + ["--data", corpus, "--steps", "8", "--save-interval", "2", "--spike-factor", "3",
                         "--inject-fault", "spike@7", "--run-name", "spike"]) == 0
    rollbacks = [r for r in read_metrics("runs/spike/metrics.jsonl") if r.get("event") == "rollback"]
    assert [(r["from_step"], r["to_step"]) for r in rollbacks] == [(7, 6)]


def test_a_diverged_run_stops_nonzero_without_writing_a_checkpoint(run_dir, corpus):
    """--lr 1e20 (issue 11: the broken model saved every 2 steps, exit 0): every step from 2 on is non-finite, no
    checkpoint is written during the streak, and --max-skipped-steps (5) of them in a row stop the run, exit 1."""
    argv = ["--steps", "20", "--save-interval", "2", "--lr", "1e20", "--min-lr", "1"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_llama.py")] + SMALL + [
        "--data", corpus, "--run-name", "diverged"] + argv, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: 5 non-finite steps in a row (the last at step 6" in proc.stderr and "Traceback" not in proc.stderr
    assert list_checkpoints("runs/diverged/checkpoints") == [] and resolve("runs/diverged/checkpoints") is None
    # a checkpoint before the streak: rolled back to, until --max-rollbacks; every saved step stays finite
    with pytest.raises(StopTraining, match="after 1 rollbacks"):
        make_trainer(SMALL + ["--data", corpus, "--steps", "10", "--save-interval", "2", "--run-name", "late",
                              "--max-rollbacks", "1", "--inject-fault"] + [f"nan@{s}" for s in range(3, 9)]).train()
    assert list_checkpoints("runs/late/checkpoints") == ["step_00000002"]
    assert _checkpoint_is_finite("runs/late/checkpoints/step_00000002")


def test_async_save_writes_what_a_synchronous_save_writes(run_dir, corpus, capsys, monkeypatch):
    """--async-save: the same step directories, tensor for tensor, as synchronous saves, and a run resumed from
    one continues exactly like the uninterrupted run - even when the writer's host copy of the live state is
    slow (the next optimizer step must wait for it, or the file would hold a later step's weights)."""
    from engine.training import checkpoint as ckpt
    base = SMALL + ["--data", corpus, "--steps", "6", "--save-interval", "2"]
    assert main(base + ["--run-name", "sync"]) == 0
    original, slowed = ckpt._host_copy, []

    def slow_copy(t):
        if threading.current_thread() is not threading.main_thread() and not slowed:
            slowed.append(t)
            time.sleep(1.0)  # several training steps' time: without the wait they would change the state
        return original(t)

    monkeypatch.setattr(ckpt, "_host_copy", slow_copy)
    assert main(base + ["--run-name", "async", "--async-save"]) == 0
    assert slowed
    assert "background save published" in capsys.readouterr().out
    assert list_checkpoints("runs/async/checkpoints") == list_checkpoints("runs/sync/checkpoints") == [
        "step_00000002", "step_00000004", "step_00000006"]
    for step_dir in list_checkpoints("runs/sync/checkpoints"):
        a = CheckpointReader(f"runs/sync/checkpoints/{step_dir}")
        b = CheckpointReader(f"runs/async/checkpoints/{step_dir}")
        assert a.keys() == b.keys() and a.meta["state"] == b.meta["state"]
        assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())
    assert resolve("runs/async/checkpoints").endswith("step_00000006")
    assert main(base + ["--run-name", "resumed", "--load", "runs/async/checkpoints/step_00000004"]) == 0
    expected = step_losses("runs/sync/metrics.jsonl")
    assert step_losses("runs/resumed/metrics.jsonl") == {s: expected[s] for s in (5, 6)}


def test_a_failed_background_save_keeps_the_previous_checkpoint(run_dir, corpus, monkeypatch, capsys):
    from engine.training import checkpoint as ckpt
    original = ckpt.write_rank_file

    def failing(tmp_dir, *args):
        if "step_00000004" in tmp_dir:
            raise OSError(28, "No space left on device")
        return original(tmp_dir, *args)

    monkeypatch.setattr(ckpt, "write_rank_file", failing)
    trainer = make_trainer(SMALL + ["--data", corpus, "--steps", "6", "--save-interval", "2", "--async-save",
                                    "--run-name", "full"])
    trainer.train()
    assert "the background save of step 4 failed (rank 0: OSError: [Errno 28] No space left on device)" in \
        capsys.readouterr().err
    assert list_checkpoints("runs/full/checkpoints") == ["step_00000002", "step_00000006"]
    assert not os.path.exists("runs/full/checkpoints/step_00000004.tmp")


def test_trainer_on_an_iterable_reads_it_in_order_and_resumes(run_dir):
    """Trainer(cfg, train_data=<iterable>): the same steps as the map-style dataset whose sampler order the
    iterable follows; a checkpoint resumes by reading forward; a one-shot generator cannot go back (a rollback)."""
    from engine.data.sampler import GlobalBatchSampler
    g = torch.Generator().manual_seed(0)
    items = [torch.randint(0, 259, (33,), generator=g) for _ in range(64)]
    order = GlobalBatchSampler(len(items), 1234).indices(0, 48)
    base = SMALL + ["--steps", "6", "--save-interval", "3"]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return (items[i] for i in order)

    def trainer(data, name, extra=()):
        cfg = parse_config(base + ["--run-name", name, *extra])
        validate(cfg, 1)
        return Trainer(cfg, train_data=data)

    def run(data, name, extra=()):
        trainer(data, name, extra).train()
        return step_losses(f"runs/{name}/metrics.jsonl")

    mapped = run(items, "map")
    assert run(Stream(), "iterable") == mapped
    resumed = run(Stream(), "resumed", ["--load", "runs/iterable/checkpoints/step_00000003"])
    assert resumed == {s: mapped[s] for s in (4, 5, 6)}
    with pytest.raises(StopTraining, match="ended after 10 samples"):
        run((items[i] for i in order[:10]), "short")
    one_shot = trainer((items[i] for i in order), "oneshot")
    one_shot._micro_batches(8, 4)
    with pytest.raises(StopTraining, match="one-shot iterator"):
        one_shot._micro_batches(0, 4)


def test_fault_specs_and_a_failed_publish(run_dir, corpus, monkeypatch):
    from engine.training import checkpoint as ckpt
    from engine.training.config import parse_fault
    assert parse_fault("kill@8:3") == ("kill", 8, 3) and parse_fault("nan@2") == ("nan", 2, None)
    for bad in ("nan@2:1", "spike@3:0", "kill@8", "hang@0:1", "oops@1"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    # rank 0 cannot publish (a full disk while writing meta.json): the save fails by name, nothing half-written
    monkeypatch.setattr(ckpt, "finalize", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    trainer = make_trainer(SMALL + ["--data", corpus, "--steps", "1", "--run-name", "nospace"])
    trainer.train_step()
    with pytest.raises(CheckpointError, match="saving step 1 failed .rank 0 publishing: OSError"):
        trainer.save_checkpoint()
    assert os.listdir("runs/nospace/checkpoints") == []


def test_a_dropped_trainer_is_freed(run_dir, corpus):
    """Nothing the engine registers (ZeRO's gradient hooks live in autograd, out of the garbage collector's sight)
    keeps a trainer's parameters, buffers and optimizer state alive once the caller drops it."""
    import gc
    import weakref
    cfg = parse_config(SMALL + ["--data", corpus, "--steps", "1"])
    validate(cfg, 1)
    trainer = Trainer(cfg)
    trainer.train_step()
    refs = [weakref.ref(trainer)] + [weakref.ref(p) for _, p in trainer.named_params] + \
        [weakref.ref(t) for t in trainer.zero.grads.tensors()]
    del trainer
    gc.collect()
    assert [r for r in refs if r() is not None] == []
