"""Runs a schedule's action lists on a cost model: the per-rank timeline, the bubble fraction and the peak
number of micro-batch activations each rank holds.

Cost model: a forward of one micro-batch through one model chunk takes 1/vpp, a backward 2/vpp (the whole
model's forward takes 1, as with vpp = 1); communication takes no time but a receive cannot complete before the
matching send. Under it the bubble is (p-1)/(m+p-1) for gpipe and 1f1b and (p-1)/(v*m+p-1) for interleaved.
"""
from __future__ import annotations

from dataclasses import dataclass

from .schedules import (COMMUNICATION, RECV_B, RECV_F, SEND_B, SEND_F, Action, B, F, ScheduleError, build, peer,
                        runs)


@dataclass
class Timeline:
    spans: list[list[tuple[float, float, Action]]]  # per rank: (start, end, compute action)
    makespan: float
    bubble_fraction: float
    peak_inflight: list[int]  # per rank: max (micro-batch, chunk) activation sets held at once


def simulate(lists: list[list[Action]], pp: int, vpp: int, forward_cost: float = 1.0,
             backward_cost: float = 2.0) -> Timeline:
    cost = {F: forward_cost / vpp, B: backward_cost / vpp}
    clock = [0.0] * pp
    position = [0] * pp
    sent: dict[tuple, float] = {}  # (op, microbatch, receiver rank, receiver chunk) -> time sent
    spans = [[] for _ in range(pp)]
    inflight, peak = [set() for _ in range(pp)], [0] * pp
    while any(position[r] < len(lists[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(lists[r]):
                a = lists[r][position[r]]
                if a.op in (SEND_F, SEND_B):
                    to_rank, to_chunk = peer(a, r, pp)
                    sent[(RECV_F if a.op == SEND_F else RECV_B, a.microbatch, to_rank, to_chunk)] = clock[r]
                elif a.op in (RECV_F, RECV_B):
                    key = (a.op, a.microbatch, r, a.chunk)
                    if key not in sent:
                        break  # blocked until the peer sends
                    clock[r] = max(clock[r], sent[key])
                else:
                    start, clock[r] = clock[r], clock[r] + cost[a.op]
                    spans[r].append((start, clock[r], a))
                    unit = (a.microbatch, a.chunk)
                    (inflight[r].add if a.op == F else inflight[r].discard)(unit)
                    peak[r] = max(peak[r], len(inflight[r]))
                position[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: str(lists[r][position[r]]) for r in range(pp) if position[r] < len(lists[r])}
            raise ScheduleError(f"schedule deadlocks: ranks wait on {stuck}")
    makespan = max(clock)
    busy = sum(end - start for rank in spans for start, end, _ in rank)
    return Timeline(spans, makespan, 1.0 - busy / (pp * makespan), peak)


def nccl_deadlock(lists: list[list[Action]], pp: int) -> str | None:
    """Whether the schedule's communication batches can complete under NCCL's rules, where a batch is one
    group: it finishes only when every message in it is matched by the peer's batch in flight, and a rank's
    batches run one after another. Returns None when every rank gets through, else where they stop. (gloo
    matches messages one by one, so there any consistent order completes.)"""
    def message(rank: int, a: Action) -> tuple:
        peer_rank, peer_chunk = peer(a, rank, pp)
        kind = "F" if a.op in (SEND_F, RECV_F) else "B"
        if a.op in (SEND_F, SEND_B):
            return rank, peer_rank, kind, a.microbatch, peer_chunk
        return peer_rank, rank, kind, a.microbatch, a.chunk

    batches = [[{message(r, a) for a in run} for run in runs(actions) if run[0].op in COMMUNICATION]
               for r, actions in enumerate(lists)]
    position, matched = [0] * pp, set()
    while any(position[r] < len(batches[r]) for r in range(pp)):
        current = [batches[r][position[r]] if position[r] < len(batches[r]) else set() for r in range(pp)]
        for r in range(pp):
            for msg in current[r]:
                if msg in current[msg[1] if msg[0] == r else msg[0]]:
                    matched.add(msg)
        done = [r for r in range(pp) if position[r] < len(batches[r]) and current[r] <= matched]
        if not done:
            stuck = {r: sorted(current[r] - matched) for r in range(pp) if current[r]}
            return f"every rank waits: (sender, receiver, kind, micro-batch, chunk) unmatched per rank {stuck}"
        for r in done:
            position[r] += 1
    return None


def run(name: str, pp: int, m: int, vpp: int = 1) -> Timeline:
    return simulate(build(name, pp, m, vpp), pp, vpp)


def draw(t: Timeline, vpp: int, width_per_unit: int = 4) -> str:
    """One line per rank; each compute action is drawn over its duration as F<mb>/b<mb> (chunk as a suffix
    letter when vpp > 1), idle time as dots."""
    scale = width_per_unit * vpp
    lines = []
    for r, spans in enumerate(t.spans):
        row = ["."] * int(round(t.makespan * scale))
        for start, end, a in spans:
            label = ("F" if a.op == F else "b") + str(a.microbatch) + ("abcdefgh"[a.chunk] if vpp > 1 else "")
            cells = int(round((end - start) * scale))
            text = (label + " " * cells)[:cells]
            row[int(round(start * scale)):int(round(start * scale)) + cells] = list(text)
        lines.append(f"rank {r}: " + "".join(row))
    return "\n".join(lines)
