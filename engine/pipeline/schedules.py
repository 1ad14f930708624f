"""Pipeline schedules as data.

A schedule is a function (pp, microbatches, vpp) -> one ordered list of compute actions per pipeline rank;
`with_communication` inserts the sends and receives each compute action implies. The executor runs these lists,
and the simulator and the timeline tool (`python -m engine.pipeline`) read the very same lists.

Model chunk c on pipeline rank r is virtual stage v = c * pp + r of pp * vpp (Megatron's interleaving): virtual
stage 0 holds the embedding, virtual stage pp * vpp - 1 the final norm, head and loss.
"""
from __future__ import annotations

from dataclasses import dataclass

F, B = "F", "B"                       # forward / backward of one micro-batch through one model chunk
SEND_F, RECV_F = "SEND_F", "RECV_F"   # activations to the next virtual stage / from the previous one
SEND_B, RECV_B = "SEND_B", "RECV_B"   # input gradients to the previous virtual stage / from the next one
COMMUNICATION = (SEND_F, RECV_F, SEND_B, RECV_B)


@dataclass(frozen=True)
class Action:
    op: str
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.op}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


class ScheduleError(ValueError):
    pass


def gpipe(pp: int, m: int, vpp: int = 1) -> list[list[Action]]:
    """All forwards, then all backwards: every micro-batch's activations are alive at the peak."""
    _check(pp, m, vpp, "gpipe")
    return [[Action(F, i) for i in range(m)] + [Action(B, i) for i in range(m)] for _ in range(pp)]


def one_f_one_b(pp: int, m: int, vpp: int = 1) -> list[list[Action]]:
    """PipeDream-flush 1F1B: pp - rank - 1 warm-up forwards, then one forward one backward, then the
    remaining backwards. A rank holds at most min(pp - rank, m) micro-batches' activations."""
    _check(pp, m, vpp, "1f1b")
    lists = []
    for rank in range(pp):
        warmup = min(pp - rank - 1, m)
        actions = [Action(F, i) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [Action(F, warmup + i), Action(B, i)]
        actions += [Action(B, i) for i in range(m - warmup, m)]
        lists.append(actions)
    return lists


def interleaved_slots(pp: int, m: int, vpp: int) -> list[list[list[Action]]]:
    """Megatron's interleaved 1F1B per rank as slots: each warm-up forward alone, then forward + backward pairs
    (the steady state), then each cool-down backward alone. Micro-batches advance through the chunks in groups of
    pp; m must be a multiple of pp (the constraint of Narayanan et al. 2021's schedule)."""
    _check(pp, m, vpp, "interleaved")
    total = m * vpp

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // pp) % vpp
        return (k // (pp * vpp)) * pp + k % pp, (vpp - 1 - chunk) if backward else chunk

    lists = []
    for rank in range(pp):
        warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
        slots = [[Action(F, *unit(k, False))] for k in range(warmup)]
        slots += [[Action(F, *unit(warmup + i, False)), Action(B, *unit(i, True))] for i in range(total - warmup)]
        slots += [[Action(B, *unit(k, True))] for k in range(total - warmup, total)]
        lists.append(slots)
    return lists


def interleaved(pp: int, m: int, vpp: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: each rank holds vpp model chunks (see interleaved_slots)."""
    return [[a for slot in slots for a in slot] for slots in interleaved_slots(pp, m, vpp)]


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved}


def _check(pp: int, m: int, vpp: int, name: str) -> None:
    if pp < 1 or m < 1 or vpp < 1:
        raise ScheduleError(f"--schedule {name}: pp, micro-batches and vpp must be positive")
    if name != "interleaved" and vpp != 1:
        raise ScheduleError(f"--schedule {name}: runs one model chunk per rank; use --schedule interleaved "
                            "with --vpp > 1")
    if name == "interleaved" and m % pp:
        raise ScheduleError(f"--schedule interleaved: the number of micro-batches per step ({m}) must be a "
                            f"multiple of --pp {pp}; raise --global-batch-size or lower --micro-batch-size")


def virtual_stage(rank: int, chunk: int, pp: int) -> int:
    return chunk * pp + rank


def owner(stage: int, pp: int) -> tuple[int, int]:
    """(rank, chunk) of virtual stage `stage`."""
    return stage % pp, stage // pp


def with_communication(compute: list[list[Action]], pp: int, vpp: int) -> list[list[Action]]:
    """Each forward receives its input just before it runs (unless it is the first virtual stage) and sends its
    output right after (unless it is the last); backwards mirror that with gradients."""
    last = pp * vpp - 1
    lists = []
    for rank, actions in enumerate(compute):
        out = []
        for a in actions:
            v = virtual_stage(rank, a.chunk, pp)
            if a.op == F:
                out += ([Action(RECV_F, a.microbatch, a.chunk)] if v > 0 else []) + [a] + \
                       ([Action(SEND_F, a.microbatch, a.chunk)] if v < last else [])
            else:
                out += ([Action(RECV_B, a.microbatch, a.chunk)] if v < last else []) + [a] + \
                       ([Action(SEND_B, a.microbatch, a.chunk)] if v > 0 else [])
        lists.append(out)
    return lists


def _transfers(a: Action, rank: int, pp: int, vpp: int) -> tuple[list[Action], list[Action]]:
    """(receives before, sends after) compute action `a` on `rank`."""
    v, last = virtual_stage(rank, a.chunk, pp), pp * vpp - 1
    if a.op == F:
        return ([Action(RECV_F, a.microbatch, a.chunk)] if v > 0 else [],
                [Action(SEND_F, a.microbatch, a.chunk)] if v < last else [])
    return ([Action(RECV_B, a.microbatch, a.chunk)] if v < last else [],
            [Action(SEND_B, a.microbatch, a.chunk)] if v > 0 else [])


def with_paired_communication(slots: list[list[list[Action]]], pp: int, vpp: int) -> list[list[Action]]:
    """Megatron's batching for the interleaved schedule, which NCCL needs: between two slots one batch holds the
    sends of the slot before and the receives of the slot after (a steady-state slot's forward and backward
    exchange in one batch). Every rank's batches then pair with its neighbours' in order, so each completes as
    one NCCL group (`simulate.nccl_deadlock` checks it, for every pp <= 16, vpp <= 4, m <= 4 pp in the tests)."""
    lists = []
    for rank, rank_slots in enumerate(slots):
        out, pending = [], []
        for slot in rank_slots:
            receives = [r for a in slot for r in _transfers(a, rank, pp, vpp)[0]]
            out += pending + receives + slot
            pending = [t for a in slot for t in _transfers(a, rank, pp, vpp)[1]]
        lists.append(out + pending)
    return lists


def build(name: str, pp: int, m: int, vpp: int = 1) -> list[list[Action]]:
    """Every rank's full action list (compute and communication) for one step."""
    if name == "interleaved":
        return with_paired_communication(interleaved_slots(pp, m, vpp), pp, vpp)
    return with_communication(SCHEDULES[name](pp, m, vpp), pp, vpp)


def runs(actions: list[Action]) -> list[list[Action]]:
    """The list cut as the executor runs it: consecutive communication actions form one run, posted as one
    batch_isend_irecv; each compute action is a run of its own."""
    out: list[list[Action]] = []
    for a in actions:
        if a.op in COMMUNICATION and out and out[-1][0].op in COMMUNICATION:
            out[-1].append(a)
        else:
            out.append([a])
    return out


def peer(action: Action, rank: int, pp: int) -> tuple[int, int]:
    """(rank, chunk) at the other end of a communication action."""
    v = virtual_stage(rank, action.chunk, pp)
    return owner(v + 1 if action.op in (SEND_F, RECV_B) else v - 1, pp)
