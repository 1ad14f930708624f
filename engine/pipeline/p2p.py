"""Point-to-point transfers between neighbouring pipeline stages.

What goes between stages is a tensor or a tuple of tensors. Activations are received into buffers of a declared
(shape, dtype) per tensor when the stages declare one (the trainer does: micro-batch x sequence x hidden), or else
the sender first sends a small header with each tensor's shape and dtype. Gradients come back shaped like the
activations the receiving stage sent, so they never need a header. Consecutive communication actions are posted
together as one batch_isend_irecv (headers as a batch of their own first), so two neighbours that both send and
receive cannot deadlock. Receives are waited for at once (with a timeout that names the stage and the transfer);
sends are waited for at the end of the step, never blocking compute. Each message carries a tag naming (kind,
micro-batch, chunk, tensor) for backends that match on tags; the schedules also post them in the same order on
both ends (what NCCL matches on).
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .schedules import RECV_B, RECV_F, SEND_B, SEND_F, Action, peer

HEADER_LEN = 64   # int64 words: [count, then per tensor: dtype code, ndim, dims...]
MAX_TENSORS = 31  # tensors in one transfer (their tags are consecutive)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool,
          torch.uint8, torch.int8, torch.int16]


class PipelineTimeout(RuntimeError):
    pass


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def encode_header(tensors: tuple) -> torch.Tensor:
    words = [len(tensors)]
    for t in tensors:
        if t.dtype not in DTYPES:
            raise TypeError(f"pipeline: cannot send a tensor of dtype {t.dtype} between stages")
        words += [DTYPES.index(t.dtype), t.ndim, *t.shape]
    if len(tensors) > MAX_TENSORS or len(words) > HEADER_LEN:
        raise ValueError(f"pipeline: the shapes of {len(tensors)} tensors do not fit one transfer's header (at most "
                         f"{MAX_TENSORS} tensors, {HEADER_LEN} words); send fewer or flatter tensors between stages")
    return torch.tensor(words + [0] * (HEADER_LEN - len(words)), dtype=torch.int64)


def decode_header(header: torch.Tensor) -> list[tuple[tuple, torch.dtype]]:
    words, specs, i = header.tolist(), [], 1
    for _ in range(words[0]):
        dtype, ndim = DTYPES[words[i]], words[i + 1]
        specs.append((tuple(words[i + 2:i + 2 + ndim]), dtype))
        i += 2 + ndim
    return specs


class P2P:
    """pp_ranks: the global ranks of this pipeline, by stage; declared: [(shape, dtype)] of what every forward
    transfer holds, or None to send a header with each one."""

    def __init__(self, pp_ranks: list[int], pp_rank: int, device: torch.device, vpp: int,
                 declared: list[tuple] | None = None, timeout_s: float = 600.0):
        if declared is not None and len(declared) > MAX_TENSORS:
            raise ValueError(f"pipeline: at most {MAX_TENSORS} tensors between stages, {len(declared)} declared")
        self.pp_ranks, self.pp_rank, self.pp = list(pp_ranks), pp_rank, len(pp_ranks)
        self.device, self.vpp, self.declared = device, vpp, declared
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.pending_sends: list = []

    def _tag(self, action: Action, receiver_chunk: int, index: int) -> int:
        kind = 0 if action.op in (SEND_F, RECV_F) else 1
        return (((action.microbatch * self.vpp + receiver_chunk) * 2 + kind) * (MAX_TENSORS + 1)) + index

    def _op(self, fn, tensor, a: Action, index: int):
        peer_rank, peer_chunk = peer(a, self.pp_rank, self.pp)
        chunk = peer_chunk if a.op in (SEND_F, SEND_B) else a.chunk
        return dist.P2POp(fn, tensor, self.pp_ranks[peer_rank], tag=self._tag(a, chunk, index))

    def exchange(self, actions: list[Action], outgoing: dict, grad_specs: dict | None = None) -> dict:
        """Posts the given sends (a tensor or tuple from `outgoing[action]`) and receives together; returns
        {receive action: tensor or tuple}. grad_specs[RECV_B action]: [(shape, dtype)] of the gradients."""
        specs = {}
        if self.declared is None:  # headers first, so that the receivers can allocate
            headers = {a: encode_header(as_tuple(outgoing[a])).to(self.device) for a in actions if a.op == SEND_F}
            incoming = {a: torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
                        for a in actions if a.op == RECV_F}
            ops = [self._op(dist.isend, headers[a], a, 0) if a.op == SEND_F else self._op(dist.irecv, incoming[a], a, 0)
                   for a in actions if a.op in (SEND_F, RECV_F)]
            self._post(ops, [a for a in actions if a.op in (SEND_F, RECV_F)])
            specs = {a: decode_header(h.cpu()) for a, h in incoming.items()}
        ops, owners, received = [], [], {}
        for a in actions:
            if a.op in (SEND_F, SEND_B):
                for i, t in enumerate(as_tuple(outgoing[a])):
                    ops.append(self._op(dist.isend, t.contiguous(), a, i + 1))
                    owners.append(a)
            else:
                wanted = grad_specs[a] if a.op == RECV_B else specs.get(a, self.declared)
                bufs = tuple(torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in wanted)
                received[a] = bufs
                for i, buf in enumerate(bufs):
                    ops.append(self._op(dist.irecv, buf, a, i + 1))
                    owners.append(a)
        self._post(ops, owners)
        return {a: bufs[0] if len(bufs) == 1 else bufs for a, bufs in received.items()}

    def _post(self, ops: list, owners: list[Action]) -> None:
        """Posts one batch (owners[i]: the action of ops[i]); waits for its receives now, its sends at finish()."""
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) != len(ops):  # a coalescing backend (NCCL): one handle for the whole batch
            receives = any(a.op in (RECV_F, RECV_B) for a in owners)
            for work in works:
                if receives:  # the received tensors are ready once the batch is
                    self._wait(work, *dict.fromkeys(owners))
                else:
                    self.pending_sends.append((list(dict.fromkeys(owners)), work, [op.tensor for op in ops]))
            return
        for a, op, work in zip(owners, ops, works):
            if a.op in (SEND_F, SEND_B):
                self.pending_sends.append(([a], work, op.tensor))
            else:
                self._wait(work, a)

    def _wait(self, work, *actions: Action) -> None:
        """Waits for one transfer, or for a coalesced batch of them (named together in errors)."""
        what = "; ".join(self._describe(a) for a in actions)
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as exc:
            raise PipelineTimeout(what + f" failed: {exc}") from None
        if ok is False:
            raise PipelineTimeout(what + f" timed out after {self.timeout.total_seconds()} s")

    def _describe(self, action: Action) -> str:
        peer_rank, _ = peer(action, self.pp_rank, self.pp)
        what = {SEND_F: "sending activations to", RECV_F: "receiving activations from",
                SEND_B: "sending gradients to", RECV_B: "receiving gradients from"}[action.op]
        return (f"pipeline stage {self.pp_rank} (rank {self.pp_ranks[self.pp_rank]}): {what} stage {peer_rank}, "
                f"micro-batch {action.microbatch}, chunk {action.chunk}")

    def finish(self) -> None:
        """Waits for every send of the step (their buffers are released afterwards)."""
        for actions, work, _ in self.pending_sends:
            self._wait(work, *actions)
        self.pending_sends = []
