"""Pipeline schedules as data: the timeline tool's figures over a grid, message order, invalid settings, and
the activation memory a real step holds at its peak against the tool's in-flight count."""
import functools
import json
import os
import subprocess
import sys
import weakref
from fractions import Fraction

import pytest
import torch

import distributed
from conftest import ROOT
from engine.pipeline.schedules import RECV_B, RECV_F, SEND_B, SEND_F, ScheduleError, build, peer
from engine.pipeline.simulate import run


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 6, 8, 16])
def test_gpipe_and_1f1b_figures(pp, m):
    for name, peak in [("gpipe", [m] * pp), ("1f1b", [min(pp - r, m) for r in range(pp)])]:
        t = run(name, pp, m)
        assert t.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1))
        assert t.peak_inflight == peak


@pytest.mark.parametrize("pp,m,vpp", [(2, 2, 2), (2, 4, 2), (2, 8, 3), (4, 4, 2), (4, 8, 2), (4, 16, 4),
                                      (3, 6, 2), (8, 16, 2)])
def test_interleaved_figures(pp, m, vpp):
    t = run("interleaved", pp, m, vpp)
    assert t.bubble_fraction == pytest.approx((pp - 1) / (vpp * m + pp - 1))
    # Megatron's warm-up bound: 2(pp - rank - 1) + (vpp - 1) pp forwards in flight plus the steady-state one
    assert t.peak_inflight == [min(2 * (pp - r - 1) + (vpp - 1) * pp + 1, m * vpp) for r in range(pp)]
    assert run("interleaved", pp, m, vpp).bubble_fraction < run("1f1b", pp, m).bubble_fraction


@pytest.mark.parametrize("name,vpp", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)])
@pytest.mark.parametrize("pp", [2, 3, 4])
def test_messages_are_posted_in_the_same_order_on_both_ends(name, vpp, pp):
    """Backends without tags (NCCL) match point-to-point messages by order between each pair of ranks."""
    m = 2 * pp
    sends, recvs = {}, {}
    for rank, actions in enumerate(build(name, pp, m, vpp)):
        for a in actions:
            if a.op in (SEND_F, SEND_B, RECV_F, RECV_B):
                other, other_chunk = peer(a, rank, pp)
                kind = "act" if a.op in (SEND_F, RECV_F) else "grad"
                if a.op in (SEND_F, SEND_B):
                    sends.setdefault((rank, other), []).append((kind, a.microbatch, other_chunk))
                else:
                    recvs.setdefault((other, rank), []).append((kind, a.microbatch, a.chunk))
    assert sends == recvs


def test_invalid_schedules():
    with pytest.raises(ScheduleError, match="multiple of --pp"):
        run("interleaved", 4, 6, 2)
    with pytest.raises(ScheduleError, match="interleaved"):
        run("1f1b", 2, 4, 2)


def test_cli_json_and_timeline():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "engine.pipeline", "--schedule", "1f1b", "--pp", "4",
                          "--microbatches", "8", "--json"], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout)
    assert result["bubble_fraction"] == pytest.approx(3 / 11) and result["peak_inflight"] == [4, 3, 2, 1]
    text = subprocess.run([sys.executable, "-m", "engine.pipeline", "--schedule", "interleaved", "--pp", "2",
                           "--microbatches", "4", "--vpp", "2"], capture_output=True, text=True, env=env,
                          check=True).stdout
    assert text.count("rank ") >= 2 and "bubble fraction: 0.1111" in text
    bad = subprocess.run([sys.executable, "-m", "engine.pipeline", "--schedule", "interleaved", "--pp", "4",
                          "--microbatches", "6", "--vpp", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "multiple of --pp" in bad.stderr


class _Saved:
    """What the pack hook hands autograd: its death (the graph node freed after its backward, or the whole graph
    dropped) is when the saved tensor stops counting."""

    def __init__(self, tensor):
        self.tensor = tensor


class LiveActivations:
    """saved_tensors_hooks that follow the bytes autograd holds for backward, by the (micro-batch, chunk) whose
    forward saved them: floating-point tensors of at least one dimension, each storage once while any saved
    reference to it lives, leaving out parameters and buffers (as engine.parallel.recompute.SavedTensorCounter
    does; integer token ids are the batch, held all step whatever the schedule)."""

    def __init__(self, exclude):
        self.exclude, self.unit = list(exclude), None
        self.storages: dict[int, list] = {}  # data_ptr -> [references alive, bytes, unit]
        self.events: list[tuple] = []        # (unit, +/- bytes) in order; ("end", unit) after each forward
        self.outside = 0                     # saves outside any forward (there should be none)

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if not t.is_floating_point() or t.dim() == 0 or ptr in {e.untyped_storage().data_ptr() for e in self.exclude}:
            return t
        if self.unit is None:
            self.outside += 1
        entry = self.storages.get(ptr)
        if entry is None:
            entry = self.storages[ptr] = [0, t.untyped_storage().nbytes(), self.unit]
            self.events.append((self.unit, entry[1]))
        entry[0] += 1
        saved = _Saved(t)
        weakref.finalize(saved, self._drop, ptr)
        return saved

    def _drop(self, ptr):
        entry = self.storages[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            del self.storages[ptr]
            self.events.append((entry[2], -entry[1]))

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda s: s.tensor if isinstance(s, _Saved) else s)

    def peak_in_microbatches(self) -> tuple[Fraction, dict]:
        """The peak over the step of the live bytes, each unit's counted in units of what micro-batch 0 of the
        same chunk saves (chunks differ: the first holds the embedding, the last the head and loss), and those
        per-chunk bytes."""
        per_chunk, live = {}, {}
        for unit, value in self.events:
            if unit == "end":
                if value[0] == 0:
                    per_chunk[value[1]] = live.get(value, 0)
            else:
                live[unit] = live.get(unit, 0) + value
        level = peak = Fraction(0)
        for unit, value in self.events:
            if unit != "end":
                level += Fraction(value, per_chunk[unit[1]])
                peak = max(peak, level)
        return peak, per_chunk


def _measure_peaks(rank, world, corpus, workdir):
    os.chdir(workdir)
    from engine.parallel.topology import Topology
    from engine.training import parse_config, validate
    from engine.training.trainer import Trainer
    base = ["--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-heads", "4",
            "--num-kv-heads", "2", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "8",
            "--data", corpus, "--device", "cpu"]
    for layout in (["--pp", "4"], ["--pp", "4", "--schedule", "gpipe"], ["--pp", "2", "--dp", "2"],
                   ["--pp", "2", "--dp", "2", "--vpp", "2"]):
        cfg = parse_config(base + layout)
        validate(cfg, world)
        p = cfg.parallel
        trainer = Trainer(cfg, Topology(p.tp, p.pp, p.dp, p.vpp))
        # step 1's micro-batch 0 is counted by the trainer's own saved-tensor hooks (nested hooks: the innermost
        # wins); step 2 is measured here
        trainer.train_step()
        exclude = [q for _, q in trainer.named_params] + [t for c in trainer.chunks for t in c.buffers()]
        live = LiveActivations(exclude)
        forward = trainer.executor._forward

        def tracked_forward(a, *args, forward=forward, live=live):
            live.unit = (a.microbatch, a.chunk)
            try:
                return forward(a, *args)
            finally:
                live.events.append(("end", live.unit))
                live.unit = None

        trainer.executor._forward = tracked_forward
        with live.hooks():
            trainer.train_step()
        del trainer.executor._forward
        m = cfg.batch.global_batch_size // (cfg.batch.micro_batch_size * p.dp)
        expected = run(p.schedule, p.pp, m, p.vpp).peak_inflight[trainer.topo.pp_rank]
        peak, per_chunk = live.peak_in_microbatches()
        case = (layout, rank, peak, expected, per_chunk)
        assert live.outside == 0 and not live.storages, case  # all saved in forwards, all freed by the backwards
        assert sum(per_chunk.values()) == trainer.activation_bytes, case
        assert trainer.executor.peak_inflight == expected, case
        # exact: every micro-batch of a chunk saves the same tensors, and a unit's graph is held whole from its
        # forward until its backward frees it (the peak falls at the end of a forward)
        assert peak == expected, case


def test_measured_activation_peak_matches_the_tool(corpus, tmp_path):
    distributed.run(functools.partial(_measure_peaks, corpus=corpus, workdir=str(tmp_path)), world=4)


def test_a_coalesced_batch_is_waited_for_when_it_holds_a_receive(monkeypatch):
    """NCCL's batch_isend_irecv returns one handle for a whole batch: the receive it carries must still be
    waited for before its tensor is used, and a batch of sends only is left for the end of the step."""
    import torch
    import torch.distributed as dist
    from engine.pipeline.p2p import P2P
    from engine.pipeline.schedules import Action

    class Work:
        def __init__(self):
            self.waited = False

        def wait(self, timeout=None):
            self.waited = True
            return True

    handed_out = []

    def coalesced(ops):
        handed_out.append(Work())
        return [handed_out[-1]]

    monkeypatch.setattr(dist, "batch_isend_irecv", coalesced)
    monkeypatch.setattr(dist, "P2POp", lambda op, tensor, peer, tag=0: type("Op", (), {"tensor": tensor})())
    p2p = P2P([0, 1], 0, torch.device("cpu"), vpp=1, declared=[((1, 2), torch.float32)])
    send, recv = Action(SEND_F, 0), Action(RECV_B, 0)
    received = p2p.exchange([send, recv], {send: torch.zeros(1, 2)}, {recv: [((1, 2), torch.float32)]})
    assert set(received) == {recv} and handed_out[-1].waited
    p2p.exchange([Action(SEND_F, 1)], {Action(SEND_F, 1): torch.zeros(1, 2)})
    assert not handed_out[-1].waited and len(p2p.pending_sends) == 1
    p2p.finish()
    assert handed_out[-1].waited and not p2p.pending_sends


def test_every_schedule_completes_under_nccl_group_rules():
    """Issue 11's grid: every schedule, pp <= 16, vpp <= 4 (interleaved), micro-batches from pp to 4 pp (the
    multiples of pp for interleaved): every communication batch completes as one NCCL group."""
    from engine.pipeline.simulate import nccl_deadlock
    checked = 0
    for pp in range(2, 17):
        for m in range(pp, 4 * pp + 1):
            cases = [("1f1b", 1), ("gpipe", 1)] + ([("interleaved", v) for v in (2, 3, 4)] if m % pp == 0 else [])
            for name, vpp in cases:
                assert nccl_deadlock(build(name, pp, m, vpp), pp) is None, (name, pp, vpp, m)
                checked += 1
    assert checked == 1020


def test_a_schedule_that_would_deadlock_is_refused_before_launch(monkeypatch):
    """The interleaved schedule with each transfer batched next to its own compute (the engine's earlier
    batching: fine on gloo, stuck under NCCL) is refused by validate, whatever the backend."""
    from engine.pipeline import schedules
    from engine.training.config import ConfigError, parse_config, validate
    def unpaired(name, pp, m, vpp=1):
        return schedules.with_communication(schedules.SCHEDULES[name](pp, m, vpp), pp, vpp)

    monkeypatch.setattr(schedules, "build", unpaired)
    cfg = parse_config(["--pp", "2", "--vpp", "2", "--num-layers", "4", "--micro-batch-size", "1",
                        "--global-batch-size", "4"])
    with pytest.raises(ConfigError, match="would deadlock under NCCL"):
        validate(cfg, 2)


def test_the_nccl_check_finds_a_deadlock():
    """Two ranks that each send in one batch and receive only in the next wait for each other under NCCL."""
    from engine.pipeline.schedules import Action
    from engine.pipeline.simulate import nccl_deadlock
    ranks = [[Action(SEND_F, 0), Action("F", 1), Action(RECV_B, 0)],
             [Action(SEND_B, 0), Action("B", 1), Action(RECV_F, 0)]]
    assert "every rank waits" in nccl_deadlock(ranks, 2)
