"""Layout invariance end to end: every parallel layout, trained in spawned process groups or launched with torchrun
through examples/pretrain_llama.py, reproduces the single-process run (fp32, same seed and data): the loss and the
gradient norm of every step, and the eval loss; and checkpoints resume under other layouts."""
import functools
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import distributed
from conftest import ROOT, trajectory
from engine.training import main, parse_config, validate
from engine.training.trainer import Trainer

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-heads", "8",
         "--num-kv-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--steps", "8", "--lr-decay-steps", "8", "--lr-warmup-steps", "2", "--eval-interval", "4",
         "--eval-iters", "2", "--device", "cpu", "--precision", "fp32"]
pytestmark = pytest.mark.e2e
RTOL = 1e-5
# The gradient is a sum over the global batch's tokens whose terms are ~10x larger than the sum by step 6, so
# reduction order moves its norm more than the loss: up to 3.6e-5 measured (tied, tp2 SP pp2 vpp2 dp2 ZeRO-3).
GRAD_NORM_RTOL = 1e-4
# bf16 with fp32 masters at tp2 SP pp2 against fp32, measured over the 8 steps (relative): loss 3.7e-4 / 2.6e-4,
# eval loss 1.0e-4 / 1.7e-4, grad norm 7.1e-3 / 4.0e-2, on the corpus Python 3.11's / 3.12's sources make (the GPU
# hosts run 3.12). A replica counted twice in the norm moves it by tens of percent.
BF16_RTOL, BF16_GRAD_NORM_RTOL = 2e-3, 8e-2


def launch(nproc, argv, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "examples", "pretrain_llama.py")] if nproc > 1 else [
           sys.executable, os.path.join(ROOT, "examples", "pretrain_llama.py")]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _train_runs(rank, world, workdir, runs):
    os.chdir(workdir)
    for argv in runs:
        cfg = parse_config(argv)
        validate(cfg, world)
        Trainer(cfg).train()
        dist.barrier()


def train(workdir, world, *runs):
    """Each run (its training flags) in turn at `world` ranks, in one spawned process group for them all (a
    torchrun launch each would cost ~10 s of start-up apiece), or through the CLI's main in this process at world
    1. A few tests launch torchrun instead, so that path stays covered."""
    if world > 1:
        distributed.run(functools.partial(_train_runs, workdir=str(workdir), runs=list(runs)), world=world)
        return
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for argv in runs:
            assert main(argv) == 0, argv
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from engine.data.datasets import stdlib_sources
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, path in enumerate(stdlib_sources()[:40]):
        (corpus / f"doc{i:03d}.py").write_bytes(open(path, "rb").read())
    train(root, 1, MODEL + ["--data", "corpus", "--run-name", "single", "--save-interval", "4"])
    return root


def assert_same_trajectory(workdir, run, steps=range(1, 9), ref="single", rtol=RTOL,
                           grad_norm_rtol=GRAD_NORM_RTOL):
    """Every step's loss and grad norm, and the eval losses, of `run` match those of `ref` over `steps`."""
    expected = {k: v for k, v in trajectory(workdir / "runs" / ref / "metrics.jsonl").items() if k[0] in steps}
    got = trajectory(workdir / "runs" / run / "metrics.jsonl")
    assert sorted(got) == sorted(expected) and any(k[1] == "eval_loss" for k in got)
    for key, value in expected.items():
        tolerance = grad_norm_rtol if key[1] == "grad_norm" else rtol
        assert got[key] == pytest.approx(value, rel=tolerance), (key, got[key], value)


LAYOUTS = [
    (2, ["--tp", "2"]),
    (4, ["--tp", "4"]),
    (2, ["--tp", "2", "--sequence-parallel"]),
    (4, ["--tp", "2", "--dp", "2"]),
    (2, ["--tp", "2", "--recompute", "full"]),
    (2, ["--tp", "2", "--recompute", "selective"]),
    (2, ["--dp", "2"]),
    (2, ["--pp", "2"]),
    (4, ["--pp", "4"]),
    (2, ["--pp", "2", "--schedule", "gpipe"]),
    (2, ["--pp", "2", "--vpp", "2"]),
    (4, ["--tp", "2", "--pp", "2", "--sequence-parallel", "--recompute", "full", "--loss-chunk-tokens", "24"]),
    (4, ["--tp", "2", "--pp", "2", "--recompute", "full", "--recompute-layers", "1"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2"]),
    (2, ["--dp", "2", "--zero", "0", "--bucket-size", "30000"]),
    (2, ["--dp", "2", "--zero", "1", "--bucket-size", "30000"]),
    (2, ["--dp", "2", "--zero", "2", "--bucket-size", "30000"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2", "--zero", "1"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2", "--zero", "2", "--sequence-parallel", "--vpp", "2"]),
    (2, ["--dp", "2", "--zero", "1", "--bucket-size", "30000", "--overlap-param-gather"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2", "--zero", "2", "--vpp", "2", "--overlap-param-gather"]),
    # context parallelism (ring attention over load-balanced sequence shards)
    (2, ["--cp", "2"]),
    (4, ["--cp", "4"]),
    (4, ["--cp", "2", "--tp", "2", "--sequence-parallel"]),
    (4, ["--cp", "2", "--pp", "2"]),
    (4, ["--cp", "2", "--dp", "2", "--zero", "3"]),
    (8, ["--cp", "2", "--tp", "2", "--pp", "2"]),
    (2, ["--cp", "2", "--recompute", "full"]),
    (2, ["--cp", "2", "--recompute", "selective", "--loss-chunk-tokens", "24"]),
    (2, ["--dp", "2", "--zero", "3"]),
    (4, ["--dp", "4", "--zero", "3", "--zero3-keep-params", "--recompute", "full"]),
    # the fused elementwise functions (their torch reference ops here) under SP, selective recompute, pp and ZeRO-3
    (2, ["--tp", "2", "--sequence-parallel", "--recompute", "selective", "--fused-elementwise"]),
    (4, ["--pp", "2", "--dp", "2", "--zero", "3", "--recompute", "full", "--fused-elementwise"]),
    (8, ["--tp", "2", "--pp", "2", "--dp", "2", "--zero", "3", "--sequence-parallel"]),
]


def _train_layouts(rank, world, workdir, layouts):
    """Trains each layout in turn in this spawned group (the CLI path is the launches of the other tests); rank 0
    compares each trajectory with the single process's as soon as its run is over."""
    os.chdir(workdir)
    for layout in layouts:
        name = "run" + "".join(layout).replace("--", "_")
        cfg = parse_config(MODEL + ["--data", "corpus", "--run-name", name] + layout)
        validate(cfg, world)
        Trainer(cfg).train()
        if rank == 0:
            try:
                assert_same_trajectory(pathlib.Path(workdir), name)
            except AssertionError as exc:
                raise AssertionError(f"{' '.join(layout)}: {exc}") from None
        dist.barrier()


@pytest.mark.parametrize("world", sorted({n for n, _ in LAYOUTS}))
def test_layouts_reproduce_single_process(workdir, world):
    """Every layout of LAYOUTS for this world size, one spawned process group for them all (a torchrun launch
    each would cost ~10 s of start-up apiece)."""
    layouts = [layout for n, layout in LAYOUTS if n == world]
    distributed.run(functools.partial(_train_layouts, workdir=str(workdir), layouts=layouts), world=world)


def test_document_mask_reproduces_single_process(workdir):
    """--document-mask (each micro-batch's document layout handed to every pipeline stage) at tp 2 + SP x pp 2 and
    at cp 2 equals the single-process run with it, which differs from the run without it. The documents are short (3-60
    bytes), so every 33-token sample holds several."""
    import json
    import random
    rng, text = random.Random(0), "".join(sorted((workdir / "corpus").glob("*.py"))[0].read_text().split())
    with open(workdir / "short-docs.jsonl", "w") as fh:
        pos = 0
        while pos < 60_000:
            n = rng.randint(3, 60)
            fh.write(json.dumps({"text": text[pos % len(text):][:n]}) + "\n")
            pos += n
    data = MODEL + ["--data", "short-docs.jsonl"]
    train(workdir, 1, data + ["--run-name", "single-docs", "--document-mask"], data + ["--run-name", "single-no-docs"])
    launch(4, data + ["--run-name", "docs-tp2-pp2", "--document-mask", "--tp", "2", "--pp", "2",
                      "--sequence-parallel"], workdir)
    launch(2, data + ["--run-name", "docs-cp2", "--document-mask", "--cp", "2"], workdir)
    assert_same_trajectory(workdir, "docs-tp2-pp2", ref="single-docs")
    assert_same_trajectory(workdir, "docs-cp2", ref="single-docs")  # document ids travel around the ring
    plain = trajectory(workdir / "runs" / "single-no-docs" / "metrics.jsonl")
    masked = trajectory(workdir / "runs" / "single-docs" / "metrics.jsonl")
    assert masked[(8, "loss")] != pytest.approx(plain[(8, "loss")], rel=1e-3)


def test_checkpoint_loads_under_another_layout(workdir):
    """The single-process step-4 checkpoint resumes at tp 2 x pp 2 and continues the same trajectory."""
    launch(4, MODEL + ["--data", "corpus", "--run-name", "resharded", "--tp", "2", "--pp", "2",
                       "--load", "runs/single/checkpoints/step_00000004"], workdir)
    assert_same_trajectory(workdir, "resharded", steps=range(5, 9))


def test_checkpoints_do_not_depend_on_cp(workdir):
    """A cp 2 checkpoint resumes in one process, and the single process's resumes at cp 4: the same trajectory."""
    launch(2, MODEL + ["--data", "corpus", "--run-name", "cp2-saves", "--cp", "2", "--save-interval", "4"], workdir)
    train(workdir, 1, MODEL + ["--data", "corpus", "--run-name", "cp2-to-1", "--load",
                               "runs/cp2-saves/checkpoints/step_00000004"])
    launch(4, MODEL + ["--data", "corpus", "--run-name", "1-to-cp4", "--cp", "4", "--load",
                       "runs/single/checkpoints/step_00000004"], workdir)
    assert_same_trajectory(workdir, "cp2-saves")
    for run in ("cp2-to-1", "1-to-cp4"):
        assert_same_trajectory(workdir, run, steps=range(5, 9))


def test_tied_embeddings_stay_in_sync_across_stages(workdir):
    tied = MODEL + ["--data", "corpus", "--tie-embeddings"]
    train(workdir, 1, tied + ["--run-name", "tied-single"])
    train(workdir, 2, tied + ["--run-name", "tied-pp2", "--pp", "2", "--save-interval", "4"],
          # one stage: the head reads the embedding's ZeRO-3 unit
          tied + ["--run-name", "tied-zero3", "--dp", "2", "--zero", "3"])
    launch(8, tied + ["--run-name", "tied-3d", "--tp", "2", "--pp", "2", "--dp", "2", "--vpp", "2",
                      "--sequence-parallel", "--zero", "3"], workdir)
    # the pp2 checkpoint holds the embedding once (first stage); one stage resumes with it as embedding and head
    train(workdir, 1, tied + ["--run-name", "tied-pp2-to-pp1", "--load", "runs/tied-pp2/checkpoints/step_00000004"])
    for run in ("tied-pp2", "tied-3d", "tied-zero3"):
        assert_same_trajectory(workdir, run, ref="tied-single")
    assert_same_trajectory(workdir, "tied-pp2-to-pp1", steps=range(5, 9), ref="tied-single")


def test_resume_at_the_same_parallel_layout_is_exact(workdir):
    """Resuming is bit-exact at 8 ranks, from a synchronous save and from an --async-save one (written on a
    background thread while the run went on, published once every rank's file was on disk)."""
    base = MODEL + ["--data", "corpus", "--tp", "2", "--pp", "2", "--dp", "2", "--sequence-parallel", "--dropout",
                    "0.1"]
    train(workdir, 8, base + ["--run-name", "straight", "--save-interval", "2", "--async-save"],
          base + ["--run-name", "halves", "--steps", "4"],
          base + ["--run-name", "halves", "--load", "runs/halves/checkpoints"],
          base + ["--run-name", "from-async", "--load", "runs/straight/checkpoints/step_00000004"])
    straight = trajectory(workdir / "runs" / "straight" / "metrics.jsonl")
    assert trajectory(workdir / "runs" / "halves" / "metrics.jsonl") == straight
    assert trajectory(workdir / "runs" / "from-async" / "metrics.jsonl") == {k: v for k, v in straight.items()
                                                                             if k[0] > 4}


def _optimizer_states(step_dir):
    from engine.training.checkpoint import CheckpointReader
    reader = CheckpointReader(str(step_dir))
    return {key: reader.read(key) for key in reader.keys("optim/")}


def test_sharded_optimizer_state_reshards(workdir):
    """A dp4 ZeRO-3 checkpoint (every tensor's optimizer state split four ways) loads at tp2 dp2 ZeRO-2 and at one
    process: the state each layout saves straight after loading equals the one it loaded, and both continue the
    single-process trajectory. The ZeRO-3 state itself matches the single process's at the same step."""
    base = MODEL + ["--data", "corpus"]
    # per layout, --steps 4: load and save again without training, then resume from that second checkpoint
    reload = lambda layout, name: [  # noqa: E731
        base + layout + ["--run-name", name, "--steps", "4", "--load", "runs/z3dp4/checkpoints/step_00000004"],
        base + layout + ["--run-name", name, "--load", f"runs/{name}/checkpoints"]]
    train(workdir, 4, base + ["--run-name", "z3dp4", "--dp", "4", "--zero", "3", "--save-interval", "4"],
          *reload(["--tp", "2", "--dp", "2", "--zero", "2"], "z3-to-tp2dp2z2"))
    train(workdir, 1, *reload([], "z3-to-single"))
    assert_same_trajectory(workdir, "z3dp4")
    saved = _optimizer_states(workdir / "runs" / "z3dp4" / "checkpoints" / "step_00000004")
    single = _optimizer_states(workdir / "runs" / "single" / "checkpoints" / "step_00000004")
    assert sorted(saved) == sorted(single) and any(k.endswith("/exp_avg_sq") for k in saved)
    for key, value in single.items():  # summation order differs: compare against each tensor's scale
        assert (saved[key] - value).abs().max() <= 1e-4 * value.abs().max(), key
    for name in ("z3-to-tp2dp2z2", "z3-to-single"):
        resaved = _optimizer_states(workdir / "runs" / name / "checkpoints" / "step_00000004")
        assert sorted(resaved) == sorted(saved)
        for key, value in saved.items():
            assert torch.equal(resaved[key], value), (name, key)
        assert_same_trajectory(workdir, name, steps=range(5, 9))


def test_batch_rampup_resumes_mid_ramp_interleaved(workdir):
    """The global batch grows 4, 4, 4, 4, 8, 8, 12, 12; a pp2 vpp2 dp2 run stopped after step 5 (mid-ramp)
    and resumed follows the single process's ramp-up run step for step."""
    ramp = MODEL + ["--data", "corpus", "--micro-batch-size", "1", "--global-batch-size", "16",
                    "--rampup-batch-size", "4,4,48"]
    layout = ["--pp", "2", "--vpp", "2", "--dp", "2"]
    train(workdir, 1, ramp + ["--run-name", "ramp-single"])
    train(workdir, 4, ramp + layout + ["--run-name", "ramp-3d", "--steps", "5"],
          ramp + layout + ["--run-name", "ramp-3d", "--load", "runs/ramp-3d/checkpoints"])
    assert_same_trajectory(workdir, "ramp-3d", ref="ramp-single")
    batches = trajectory(workdir / "runs" / "ramp-3d" / "metrics.jsonl", keys=("global_batch_size",))
    assert [batches[(s, "global_batch_size")] for s in range(1, 9)] == [4, 4, 4, 4, 8, 8, 12, 12]


def test_bf16_tracks_fp32_at_tp2_sp_pp2(workdir):
    """bf16 compute with fp32 masters at tp2 + SP x pp2 stays within bf16's tolerance of the fp32 single process
    (loss, grad norm and eval loss), while being measurably not fp32 (so the precision flag took effect)."""
    launch(4, MODEL + ["--data", "corpus", "--run-name", "bf16-tp2sp-pp2", "--precision", "bf16", "--tp", "2",
                       "--sequence-parallel", "--pp", "2"], workdir)
    assert_same_trajectory(workdir, "bf16-tp2sp-pp2", rtol=BF16_RTOL, grad_norm_rtol=BF16_GRAD_NORM_RTOL)
    ref = trajectory(workdir / "runs" / "single" / "metrics.jsonl")
    got = trajectory(workdir / "runs" / "bf16-tp2sp-pp2" / "metrics.jsonl")
    assert max(abs(got[k] - v) / v for k, v in ref.items()) > 10 * RTOL


def test_zero_parameters_match_plain_data_parallelism(workdir):
    """After the run, ZeRO-1/2/3 hold the same weights as plain data parallelism (ZeRO-0), up to the order of the
    gradient reductions: measured, the mean difference is 1e-7 of the mean weight on both corpora (Python 3.11's and
    3.12's sources), the largest 1.9e-6 / 1.4e-5 of the largest weight (embedding rows of rare tokens, where AdamW
    divides by a tiny second moment). A gradient lost or counted twice changes every update."""
    from engine.training.checkpoint import CheckpointReader
    final = lambda run: CheckpointReader(str(workdir / "runs" / run / "checkpoints" / "step_00000008"))  # noqa
    assert (workdir / "runs" / "run_dp2_zero3").is_dir(), \
        "this test reads the runs of test_layouts_reproduce_single_process[2]: select both, or the whole module"
    plain = final("run_dp2_zero0_bucket-size30000")
    for run in ("run_dp2_zero1_bucket-size30000", "run_dp2_zero2_bucket-size30000", "run_dp2_zero3"):
        sharded = final(run)
        for key in plain.keys("model/"):
            a, b = plain.read(key), sharded.read(key)
            assert (a - b).abs().mean() <= 1e-6 * a.abs().mean(), (run, key)
            assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (run, key)


def test_bf16_zero3_checkpoint_resumes_zero1(workdir):
    """bf16 ZeRO-3 (bf16 parameter shards, fp32 masters in the optimizer) follows bf16 ZeRO-1, checkpoints its fp32
    masters (not their bf16 rounding), and its checkpoint resumes a ZeRO-1 run where the ZeRO-3 run goes on.

    The stages sum each gradient in another order (ZeRO-3 reduce-scatters every micro-batch, ZeRO-1 all-reduces the
    step's sum once). Whether that shows depends on the data and the CPU's kernels: with Python 3.11's corpus on the
    CPUs of earlier sessions the runs were equal bit for bit; on an AMX CPU (Sapphire Rapids) the grad norms differ
    in the 7th digit from step 1, a master then rounds to another bf16 weight, and the runs drift apart as two bf16
    runs do.
    Measured there by step 8: loss 6.3e-5, eval loss 1.6e-5, grad norm 4.0e-2 (one step; 1.3e-4 before it); step-4
    masters 0.47 of their bf16 rounding apart (mean), moments 1.0e-2 of their mean. So the stages are compared
    with bf16's tolerance, and the resume against the ZeRO-3 run's own continuation, where one step's reduction
    order is all that differs (measured: equal to 7 digits through step 8)."""
    from engine.training.checkpoint import CheckpointReader
    bf16 = MODEL + ["--data", "corpus", "--precision", "bf16", "--dp", "2", "--save-interval", "4"]
    train(workdir, 2, bf16 + ["--run-name", "bf16-z1", "--zero", "1"],
          bf16 + ["--run-name", "bf16-z3-on", "--zero", "3"],
          bf16 + ["--run-name", "bf16-z3", "--zero", "3", "--steps", "4"],
          # (the step-4 checkpoints read below stay when the resumed run saves step 8)
          bf16 + ["--run-name", "bf16-z3", "--zero", "1", "--load", "runs/bf16-z3/checkpoints"])
    at_4 = [CheckpointReader(str(workdir / "runs" / run / "checkpoints" / "step_00000004")) for run in
            ("bf16-z1", "bf16-z3")]
    masters = [k for k in at_4[0].keys("optim/") if k.endswith("/master_param")]
    assert masters and masters == [k for k in at_4[1].keys("optim/") if k.endswith("/master_param")]
    rounding = lambda t: (t - t.bfloat16().float()).abs().mean()  # noqa: E731 (0 for bf16-rounded values)
    for key in masters:
        a, b = (r.read(key) for r in at_4)
        assert a.dtype == b.dtype == torch.float32 and rounding(b) > 0.5 * rounding(a), key
        assert (a - b).abs().mean() <= 0.75 * rounding(a), key
    moments = [k for k in at_4[0].keys("optim/") if k.endswith(("/exp_avg", "/exp_avg_sq"))]
    assert len(moments) == 2 * len(masters)
    for key in moments:
        a, b = (r.read(key) for r in at_4)  # (a shard misplaced or lost is off by the whole mean)
        assert (a - b).abs().mean() <= 5e-2 * a.abs().mean(), key
    assert_same_trajectory(workdir, "bf16-z3", ref="bf16-z1", rtol=BF16_RTOL, grad_norm_rtol=BF16_GRAD_NORM_RTOL)
    resumed, continued = (trajectory(workdir / "runs" / run / "metrics.jsonl") for run in ("bf16-z3", "bf16-z3-on"))
    for key in [(step, k) for step in (5, 6) for k in ("loss", "grad_norm")]:
        assert resumed[key] == pytest.approx(continued[key], rel=RTOL), (key, resumed[key], continued[key])
