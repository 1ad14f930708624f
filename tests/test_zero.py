"""ZeRO and mixed precision: memory each rank actually holds against the optimizer's accounting and the
estimator (every stage, dp = 2, 4, 8, fp32 and bf16), ZeRO-3's peak of gathered parameters, bf16 training
against fp32, and fp16 overflow handling."""
import dataclasses
import functools
import os

import pytest
import torch
from torch import nn

import distributed
from conftest import SMALL, read_metrics, step_losses
from engine import estimate as est
from engine.training import main, parse_config, validate
from engine.training.banner import estimate_layout
from engine.training.trainer import Trainer

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-heads", "4",
         "--num-kv-heads", "2", "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "8",
         "--bucket-size", "20000", "--device", "cpu"]


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct live storages behind `tensors` (views of one buffer count once; a released
    ZeRO-3 unit has a storage of 0 bytes)."""
    sizes = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(sizes.values())


def _reachable_tensors(*roots):
    """Every tensor reachable from the roots through containers, engine objects (the ZeRO optimizer, its
    buckets and pieces, the inner optimizer and its plans) and modules' parameters, with their .grad and
    .main_grad: what the rank holds for the model's state, found without asking the accounting."""
    seen, stack, found = set(), list(roots), []
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            found.append(obj)
            if obj.is_leaf:
                stack += [obj.grad, getattr(obj, "main_grad", None)]
        elif isinstance(obj, nn.Module):
            stack += list(obj.parameters())
        elif isinstance(obj, dict):
            stack += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif dataclasses.is_dataclass(obj) or type(obj).__module__.startswith("engine."):
            stack += list(vars(obj).values())
    return found


def _held_bytes(trainer) -> int:
    return _storage_bytes(_reachable_tensors(trainer.chunks, trainer.zero))


def _gathered_bytes(trainer) -> int:
    """Bytes of the model's parameters that are materialised now (under ZeRO-3: the gathered units)."""
    return _storage_bytes(p for chunk in trainer.chunks for p in chunk.parameters())


def _transient_bytes(trainer) -> int:
    """Bytes of ZeRO-2/3's transient buffers now: temporary fp32 gradient buckets (filling, or being reduced with
    their outputs) and, under ZeRO-3, the gathered parameter units."""
    sync = trainer.zero.grads
    persistent = {id(t) for t in sync.deferred_full.values()}  # (whole gradients of deferred buckets: counted)
    in_flight = [t for b in sync.buckets for _, out, full in b.pending for t in (out, full)
                 if t is not None and id(t) not in persistent]
    temporary = list(getattr(sync, "temp_full", {}).values()) + in_flight  # (stages 0-1 have none)
    return _storage_bytes(temporary) + (_gathered_bytes(trainer) if trainer.zero.sharded_params else 0)


def _watch_transient_peak(trainer) -> list:
    """Samples the transient bytes around every parameter gather, gradient arrival and reduction launch, and
    before and after every module's forward; returns a list holding their peak and the gathered parameters'."""
    peak = [0, 0]

    def sample(*_):
        peak[0] = max(peak[0], _transient_bytes(trainer))
        peak[1] = max(peak[1], _gathered_bytes(trainer))

    def sampled(fn):
        def run(*args, **kwargs):
            sample()
            fn(*args, **kwargs)
            sample()
        return run

    sync = trainer.zero.grads  # (its hooks look these methods up on the object at every call)
    sync.on_grad, sync._reduce_scatter = sampled(sync.on_grad), sampled(sync._reduce_scatter)
    trainer.zero.params.gather = sampled(trainer.zero.params.gather)
    for chunk in trainer.chunks:
        for module in chunk.modules():
            module.register_forward_pre_hook(sample)
            module.register_forward_hook(sample)
    return peak


# What the rank holds may exceed the accounting only by the optimizer's 0-dim step counters (4 bytes per fused
# kernel group) and the padding of buckets to a multiple of dp that param_bytes leaves out (stages 0-2; under
# dp elements a bucket). Seen: 4-8 bytes over, on 0.36-3.3 MB.
HELD_SLACK_BYTES = 1024


def _memory(rank, world, corpus, workdir):
    os.chdir(workdir)
    for layout in (["--tp", "2", "--pp", "2", "--dp", "2"], ["--pp", "2", "--dp", "4"], ["--dp", "8"]):
        for precision in ("fp32", "bf16"):
            for zero in ("0", "1", "2", "3"):
                cfg = parse_config(MODEL + ["--data", corpus, "--precision", precision, "--zero", zero] + layout)
                validate(cfg, world)
                trainer = Trainer(cfg)
                peak = _watch_transient_peak(trainer)
                trainer.train_step()
                case = (layout, precision, zero, rank)
                # the rank's own accounting against what it really holds after the step
                accounted = trainer.zero.param_bytes() + trainer.zero.grad_bytes() + trainer.zero.optimizer_bytes()
                held = _held_bytes(trainer)
                assert accounted <= held <= accounted + HELD_SLACK_BYTES, (case, held, accounted)
                own = est.memory_per_rank(trainer.model_cfg, estimate_layout(trainer), stage=trainer.topo.pp_rank)
                estimated = own["params"] + own["grads"] + own["optimizer"]
                assert abs(held - estimated) <= 0.05 * estimated, (case, held, estimated)
                # the transient buffers at their peak: ZeRO-2/3's gradient buckets, ZeRO-3's gathered units
                assert peak[0] == own["zero_buffers"], (case, peak[0], own)
                assert peak[0] > 0 or zero in ("0", "1"), case
                if zero == "3":  # never the whole model gathered at once, and everything released after the step
                    assert peak[1] < sum(b.size * b.full.element_size() for b in trainer.zero.buckets), case
                    assert _gathered_bytes(trainer) == 0, case
                measured = trainer.memory_event()
                expected = est.memory_per_rank(trainer.model_cfg, estimate_layout(trainer), cfg.parallel.pp - 1)
                names = {"params": "param_bytes", "grads": "grad_bytes", "optimizer": "optimizer_bytes"}
                for key in ("params", "grads", "optimizer"):
                    got = measured[names[key]]
                    assert abs(got - expected[key]) <= 0.05 * expected[key], (layout, precision, zero, key, got,
                                                                             expected[key])
    _working_set(rank, world, corpus)


def _working_set(rank, world, corpus):
    """ZeRO-2/3's gradients and transient buffers against the estimator where the layout shapes them: whole
    copies of deferred gradients (a tied embedding across stages, sequence-parallel norm gains), virtual pipeline
    chunks (no bucket spans two, no prefetch crosses one), a tied head's borrowed embedding, context parallelism,
    keeping the units gathered, a single micro-batch."""
    for layout in (["--pp", "2", "--vpp", "2", "--dp", "4", "--tie-embeddings"],
                   ["--pp", "2", "--dp", "4", "--tie-embeddings", "--global-batch-size", "4"],
                   ["--tp", "2", "--cp", "2", "--dp", "2", "--sequence-parallel"],
                   ["--dp", "8", "--tie-embeddings", "--zero3-keep-params"]):
        for zero in ("2", "3"):
            cfg = parse_config(MODEL + ["--data", corpus, "--precision", "bf16", "--zero", zero] + layout)
            validate(cfg, world)
            trainer = Trainer(cfg)
            peak = _watch_transient_peak(trainer)
            trainer.train_step()
            case = (layout, zero, rank)
            own = est.memory_per_rank(trainer.model_cfg, estimate_layout(trainer), stage=trainer.topo.pp_rank)
            assert trainer.zero.grad_bytes() == own["grads"], (case, trainer.zero.grad_bytes(), own["grads"])
            if zero == "2" and cfg.parallel.sequence_parallel:
                # autograd hands q, k and v's gradients (one node under sequence parallelism) over in forward
                # order, against the buckets' backward order: a bucket can open before the one before it is full
                largest = max(b.size for b in trainer.zero.buckets)
                assert own["zero_buffers"] <= peak[0] <= own["zero_buffers"] + 4 * largest, (case, peak[0], own)
            else:
                assert peak[0] == own["zero_buffers"], (case, peak[0], own)


def _overlapped_param_gather(rank, world, corpus, workdir):
    """--overlap-param-gather leaves the step's all-gathers in flight; the next forward and gather_all() wait.
    (That the losses equal a single process's is tested end to end in test_parallel_e2e.)"""
    os.chdir(workdir)
    cfg = parse_config(MODEL + ["--data", corpus, "--dp", str(world), "--zero", "1", "--overlap-param-gather"])
    validate(cfg, world)
    trainer = Trainer(cfg)
    buckets = trainer.zero.buckets
    trainer.train_step()
    assert len(buckets) > 1 and all(b.gather is not None for b in buckets)
    trainer.train_step()
    trainer.zero.gather_all()
    assert all(b.gather is None for b in buckets)


def _zero_checks(rank, world, corpus, workdir):
    _memory(rank, world, corpus, workdir)
    _overlapped_param_gather(rank, world, corpus, workdir)


@pytest.mark.e2e  # a spawned 4-8 rank pool: ~30 s
def test_memory_per_rank_matches_the_estimator_and_gathers_overlap(corpus, tmp_path):
    distributed.run(functools.partial(_zero_checks, corpus=corpus, workdir=str(tmp_path)), world=8)


@pytest.mark.e2e  # a spawned 4-8 rank pool: ~30 s
def test_bf16_tracks_fp32(tmp_path, monkeypatch):
    """A small model on the built-in corpus for 100 steps: the bf16 run (bf16 weights and compute, fp32 masters,
    fp32 gradients) ends within 3% of the fp32 loss while both learn (5.6 -> 2.7). Both runs see the same batches;
    "ends" is the mean over the last 20 steps, so one batch's rounding does not decide it; still the two runs drift
    apart by chance: measured 0.03% on the corpus Python 3.11's sources make, 1.4% (bf16 lower) on 3.12's."""
    monkeypatch.chdir(tmp_path)
    # small enough that 100 bf16 steps take seconds on a CPU without bf16 matmul units (the tiny preset: minutes)
    argv = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "384", "--num-heads", "4",
            "--num-kv-heads", "2", "--seq-length", "64", "--steps", "100", "--global-batch-size", "8",
            "--micro-batch-size", "4", "--device", "cpu"]
    assert main(argv + ["--precision", "fp32", "--run-name", "fp32"]) == 0
    assert main(argv + ["--precision", "bf16", "--run-name", "bf16"]) == 0
    fp32, bf16 = step_losses("runs/fp32/metrics.jsonl"), step_losses("runs/bf16/metrics.jsonl")
    assert sorted(fp32) == sorted(bf16) == list(range(1, 101))
    end = lambda losses: sum(losses[s] for s in range(81, 101)) / 20  # noqa: E731
    assert end(fp32) < 0.6 * fp32[1], (fp32[1], end(fp32))  # it learns
    assert abs(end(bf16) - end(fp32)) <= 0.03 * end(fp32), (end(bf16), end(fp32))
    memory = [r for r in read_metrics("runs/bf16/metrics.jsonl") if r.get("event") == "memory"][0]
    params = memory["param_bytes"] // 2
    assert memory["grad_bytes"] == 4 * params and memory["optimizer_bytes"] == 12 * params


def test_fp32_run_resumes_a_bf16_checkpoint_from_its_fp32_masters(tmp_path, monkeypatch, corpus):
    """The bf16 checkpoint's weights are rounded; its fp32 masters are the real weights, and an fp32 run loading
    it takes them (and keeps no master copy of its own)."""
    from engine.training.checkpoint import CheckpointReader
    monkeypatch.chdir(tmp_path)
    assert main(SMALL + ["--data", corpus, "--precision", "bf16", "--steps", "3", "--run-name", "bf16"]) == 0
    step_dir = "runs/bf16/checkpoints/step_00000003"
    cfg = parse_config(SMALL + ["--data", corpus, "--precision", "fp32", "--steps", "6", "--run-name", "fp32"])
    validate(cfg, 1)
    trainer = Trainer(cfg)
    trainer.load_checkpoint(step_dir)
    reader = CheckpointReader(step_dir)
    for name, param in trainer.named_params:
        master = reader.read(f"optim/{name}/master_param")
        assert torch.equal(param.detach(), master), name
        assert not torch.equal(master, reader.read(f"model/{name}").float()), name  # the rounding is real
    assert all("master_param" not in s for s in trainer.zero.optimizer.state.values())


@pytest.mark.parametrize("hysteresis", [1, 2])
def test_fp16_overflow_skips_the_step_and_backs_off(tmp_path, monkeypatch, corpus, hysteresis):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(SMALL + ["--data", corpus, "--precision", "fp16", "--steps", "5",
                                "--loss-scale-hysteresis", str(hysteresis)])
    validate(cfg, 1)
    trainer = Trainer(cfg)
    original = trainer.forward_backward
    poisoned_steps = {2, 3}

    def overflow(*args):
        loss = original(*args)
        if trainer.state.step + 1 in poisoned_steps:  # an fp16 overflow in the gradients
            trainer.zero.grads.buffer[0] = float("inf")
        return loss

    trainer.forward_backward = overflow
    before = [p.detach().clone() for _, p in trainer.named_params]
    records = [trainer.train_step()]
    weights = [p.detach().clone() for _, p in trainer.named_params]
    records.append(trainer.train_step())
    assert all(torch.equal(a, p) for a, (_, p) in zip(weights, trainer.named_params))  # nothing applied
    records += [trainer.train_step() for _ in range(3)]
    assert [r["skipped"] for r in records] == [False, True, True, False, False]
    scales = [r["loss_scale"] for r in records]
    assert scales[0] == 2.0 ** 16
    if hysteresis == 1:  # every overflow halves the scale
        assert scales[1:3] == [2.0 ** 15, 2.0 ** 14]
    else:  # the first overflow is absorbed by the hysteresis, the second halves
        assert scales[1:3] == [2.0 ** 16, 2.0 ** 15]
    assert not all(torch.equal(a, p) for a, (_, p) in zip(before, trainer.named_params))
