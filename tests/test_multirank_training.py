"""The trainer's recovery paths with more than one rank, each against the same scenario in one process: fp16 loss
scaling (an overflow on one rank only, scale growth, the scaler resumed from a checkpoint) at dp2 ZeRO-2 and at
tp2 x pp2; loss-spike rollback at dp2 ZeRO-3 and at dp2 ZeRO-1 with --overlap-param-gather; SIGTERM reaching one
rank of a dp2 ZeRO-3 run and of a dp2 ZeRO-1 run with --overlap-param-gather; --time-limit passed on one rank only.
All multi-rank scenarios of one world size run in one spawned process group."""
import functools
import os
import signal

import pytest
import torch.distributed as dist

import distributed
from conftest import read_metrics, traced, trajectory
from engine.training import parse_config, validate
from engine.training.trainer import Trainer

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-heads", "4",
         "--num-kv-heads", "2", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--lr-warmup-steps", "0", "--device", "cpu", "--bucket-size", "20000"]
pytestmark = pytest.mark.e2e
FP16 = ["--precision", "fp16", "--steps", "8", "--lr-decay-steps", "8"]
OVERFLOW_STEPS = (3, 6, 7)  # with growth every 2 clean steps: grow, absorb, resume mid-count, absorb, back off
SPIKE = ["--steps", "12", "--lr-decay-steps", "12", "--save-interval", "6", "--spike-factor", "3",
         "--precision", "fp32"]
SPIKE_STEP = 9


def make_trainer(argv, world=1):
    cfg = parse_config(argv)
    validate(cfg, world)
    return Trainer(cfg)


def fp16_trainer(argv, world=1, poisoned_rank=None):
    """An fp16 trainer whose loss scale grows every 2 clean steps, and whose loss at OVERFLOW_STEPS is multiplied
    by 1e30 on `poisoned_rank`'s data-parallel replica (every replica when None): the fp16 backward of that
    replica overflows for real, the other replicas' do not."""
    trainer = make_trainer(FP16 + argv, world)
    trainer.scaler.growth_interval = 2  # not a flag; the default (1000) never grows in a test
    loss_fn = trainer._loss_fn

    def poisoned(num_tokens):
        fn = loss_fn(num_tokens)
        hit = trainer.state.step + 1 in OVERFLOW_STEPS and poisoned_rank in (None, trainer.topo.dp_rank)
        return (lambda logits, targets: fn(logits, targets) * 1e30) if hit else fn

    trainer._loss_fn = poisoned
    return trainer


def spiky_trainer(argv, world=1):
    """Reports a loss spike (10x) at SPIKE_STEP, once."""
    trainer = make_trainer(SPIKE + argv, world)
    original, spiked = trainer.forward_backward, []

    def spiky(*args):
        loss = original(*args)
        if trainer.state.step + 1 == SPIKE_STEP and not spiked:
            spiked.append(True)
            return loss * 10
        return loss

    trainer.forward_backward = spiky
    return trainer


def sigterm_trainer(argv, world=1, at_step=None, on_rank=None):
    """Sends itself SIGTERM during step `at_step` on global rank `on_rank`."""
    trainer = make_trainer(argv, world)
    original = trainer.forward_backward

    def signalled(*args):
        if trainer.state.step + 1 == at_step and trainer.rank == on_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    trainer.forward_backward = signalled
    return trainer


def scenarios_in_one_process(corpus):
    """The references: every scenario in one process, in the current directory."""
    data = ["--data", corpus]
    fp16_trainer(MODEL + data + ["--run-name", "fp16-single"]).train()
    spiky_trainer(MODEL + data + ["--run-name", "spike-single"]).train()
    make_trainer(MODEL + data + ["--steps", "6", "--lr-decay-steps", "6", "--run-name", "term-single"]).train()


@pytest.fixture(scope="module")
def references(tmp_path_factory, corpus_dir):
    workdir = tmp_path_factory.mktemp("multirank")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        scenarios_in_one_process(corpus_dir)
    finally:
        os.chdir(cwd)
    return workdir


def _same_on_every_rank(value: float) -> bool:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return len(set(values)) == 1


def _fp16_with_resume(argv, name, world):
    """Straight 8 steps, then 4 steps + a resume to 8 at the same layout; the overflow hits dp rank 0 only."""
    data = MODEL + argv + ["--run-name", name]
    trainer = fp16_trainer(data, world, poisoned_rank=0)
    trainer.train()
    assert _same_on_every_rank(trainer.scaler.state_dict()["scale"])
    fp16_trainer(data + ["--run-name", name + "-halves", "--steps", "4"], world, poisoned_rank=0).train()
    resumed = fp16_trainer(data + ["--run-name", name + "-halves", "--load", f"runs/{name}-halves/checkpoints"],
                           world, poisoned_rank=0)
    resumed.train()
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()


def _world2(rank, world, corpus, workdir):
    os.chdir(workdir)
    data = ["--data", corpus, "--dp", "2"]
    _fp16_with_resume(data + ["--zero", "2"], "fp16-dp2-zero2", world)
    spiky_trainer(MODEL + data + ["--zero", "3", "--run-name", "spike-dp2-zero3"], world).train()
    # (rank 1 traces step 9; the rollback after it replays steps 7-9 inside the window)
    spiky_trainer(MODEL + data + ["--zero", "1", "--overlap-param-gather", "--run-name", "spike-dp2-overlap",
                                  "--profile-steps", "9:9", "--profile-ranks", "1"], world).train()
    for name, zero in (("term-dp2-zero3", ["--zero", "3"]),
                       ("term-dp2-overlap", ["--zero", "1", "--overlap-param-gather"])):
        term = MODEL + data + zero + ["--steps", "6", "--lr-decay-steps", "6", "--run-name", name]
        stopped = sigterm_trainer(term, world, at_step=3, on_rank=1)
        stopped.train()
        assert stopped.state.step == 3  # both ranks stopped after the step in which rank 1 got the signal
        make_trainer(term + ["--load", f"runs/{name}/checkpoints"], world).train()
    limited = make_trainer(MODEL + data + ["--steps", "6", "--run-name", "time-dp2"], world)
    if rank == 1:  # during step 1 only rank 1's clock passes --time-limit: both ranks save step 1 and stop
        run = limited.forward_backward
        limited.forward_backward = lambda *args: (setattr(limited.cfg.run, "time_limit", 1e-9), run(*args))[1]
    assert limited.train().step == 1


def _world4(rank, world, corpus, workdir):
    os.chdir(workdir)
    _fp16_with_resume(["--data", corpus, "--tp", "2", "--pp", "2"], "fp16-tp2-pp2", world)


def test_recovery_paths_with_several_ranks(references, corpus_dir):
    distributed.run(functools.partial(_world2, corpus=corpus_dir, workdir=str(references)), world=2)
    distributed.run(functools.partial(_world4, corpus=corpus_dir, workdir=str(references)), world=4)
    runs = references / "runs"

    # fp16: the same steps skipped and the same loss scales as one process (which overflows on the whole batch);
    # the other steps agree to fp16's tolerance (measured, relative: loss 2.6e-6 and grad norm 1.8e-4 at dp2;
    # loss 1.6e-5 and grad norm 1.8e-3 at tp2 pp2, where the matmuls themselves are split)
    ref = [r for r in read_metrics(runs / "fp16-single" / "metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in ref if r["skipped"]] == list(OVERFLOW_STEPS)
    scales = [r["loss_scale"] for r in ref]
    assert scales == [2.0 ** 16, 2.0 ** 17, 2.0 ** 17, 2.0 ** 17, 2.0 ** 18, 2.0 ** 18, 2.0 ** 17, 2.0 ** 17]
    for name, rtol, norm_rtol in (("fp16-dp2-zero2", 1e-5, 1e-3), ("fp16-tp2-pp2", 1e-4, 1e-2)):
        for run in (name, name + "-halves"):
            got = [r for r in read_metrics(runs / run / "metrics.jsonl") if "event" not in r]
            assert [r["step"] for r in got] == list(range(1, 9)), run
            assert [r["skipped"] for r in got] == [r["skipped"] for r in ref], run
            assert [r["loss_scale"] for r in got] == scales, run
            for a, b in zip(got, ref):
                if not b["skipped"]:
                    assert a["loss"] == pytest.approx(b["loss"], rel=rtol), (run, a["step"])
                    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=norm_rtol), (run, a["step"])
        # the resumed run continues the straight one exactly (same layout, scaler restored mid-count); the
        # overflowed steps' grad norm is NaN, compared as text
        assert str(trajectory(runs / (name + "-halves") / "metrics.jsonl")) == \
            str(trajectory(runs / name / "metrics.jsonl"))

    # rollback: the same event, and every step (the replayed ones included) as in one process
    ref_events = [r for r in read_metrics(runs / "spike-single" / "metrics.jsonl") if r.get("event") == "rollback"]
    assert ref_events == [{"event": "rollback", "from_step": 9, "to_step": 6, "skipped_samples": [48, 72]}]
    expected = trajectory(runs / "spike-single" / "metrics.jsonl")
    for run in ("spike-dp2-zero3", "spike-dp2-overlap"):
        records = read_metrics(runs / run / "metrics.jsonl")
        assert [r for r in records if r.get("event") == "rollback"] == ref_events, run
        got = trajectory(runs / run / "metrics.jsonl")
        assert sorted(got) == sorted(expected), run
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5 if key[1] == "loss" else 1e-4), (run, key)

    # --profile-steps: only the chosen rank traced, the steps its window saw (the training checks below are of
    # the same run)
    assert sorted(os.listdir(runs / "spike-dp2-overlap" / "profile")) == ["ops_rank1_steps7-9.txt",
                                                                           "trace_rank1_steps7-9.json"]
    assert traced(runs / "spike-dp2-overlap" / "profile" / "trace_rank1_steps7-9.json")[0] == [7, 8, 9, 9]

    # SIGTERM on one rank: both saved step 3, and the resumed run matches one process's straight run
    from engine.training.checkpoint import resolve
    assert resolve(str(runs / "time-dp2" / "checkpoints")).endswith("step_00000001")  # (--time-limit on rank 1)
    expected = trajectory(runs / "term-single" / "metrics.jsonl")
    for run in ("term-dp2-zero3", "term-dp2-overlap"):
        assert resolve(str(runs / run / "checkpoints")).endswith("step_00000006")
        assert os.path.isdir(runs / run / "checkpoints" / "step_00000003")
        got = trajectory(runs / run / "metrics.jsonl")
        assert sorted(got) == sorted(expected), run
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5 if key[1] == "loss" else 1e-4), (run, key)
