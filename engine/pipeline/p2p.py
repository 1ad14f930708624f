"""Point-to-point transfers between neighbouring pipeline stages.

Activations go forward and gradients backward as tensors of one known shape (micro-batch, sequence - sharded
by tp under sequence parallelism - and hidden size). Consecutive communication actions are posted together
as one batch_isend_irecv, so two neighbours that both send and receive cannot deadlock. Receives are waited
for at once (with a timeout that names the stage and the transfer); sends are waited for at the end of the
step, never blocking compute. Each message carries a tag naming (kind, micro-batch, chunk) for backends that
match on tags; the schedules also post them in the same order on both ends (what NCCL matches on).
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .schedules import RECV_B, RECV_F, SEND_B, SEND_F, Action, peer


class PipelineTimeout(RuntimeError):
    pass


class P2P:
    def __init__(self, topo, shape: tuple, dtype: torch.dtype, device: torch.device, vpp: int,
                 timeout_s: float = 600.0):
        self.topo, self.shape, self.dtype, self.device, self.vpp = topo, shape, dtype, device, vpp
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.pending_sends: list = []

    def _global_rank(self, pp_rank: int) -> int:
        return int(self.topo.grid[pp_rank, self.topo.dp_rank, self.topo.tp_rank])

    def _tag(self, action: Action, receiver_chunk: int) -> int:
        kind = 0 if action.op in (SEND_F, RECV_F) else 1
        return (action.microbatch * self.vpp + receiver_chunk) * 2 + kind

    def exchange(self, actions: list[Action], outgoing: dict) -> dict:
        """Posts the given sends (tensors from `outgoing[action]`) and receives together; returns
        {receive action: tensor}."""
        ops, received = [], {}
        for a in actions:
            peer_rank, peer_chunk = peer(a, self.topo.pp_rank, self.topo.pp)
            if a.op in (SEND_F, SEND_B):
                ops.append(dist.P2POp(dist.isend, outgoing[a].contiguous(), self._global_rank(peer_rank),
                                      tag=self._tag(a, peer_chunk)))
            else:
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                received[a] = buf
                ops.append(dist.P2POp(dist.irecv, buf, self._global_rank(peer_rank), tag=self._tag(a, a.chunk)))
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) != len(ops):  # a coalescing backend (NCCL): one handle for the whole batch
            receives = [a for a in actions if a.op in (RECV_F, RECV_B)]
            for work in works:
                if receives:  # the received tensors are ready once the batch is
                    self._wait(work, *actions)
                else:
                    self.pending_sends.append((actions, work, [op.tensor for op in ops]))
            return received
        for a, op, work in zip(actions, ops, works):
            if a.op in (SEND_F, SEND_B):
                self.pending_sends.append(([a], work, op.tensor))
            else:
                self._wait(work, a)
        return received

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
        peer_rank, _ = peer(action, self.topo.pp_rank, self.topo.pp)
        what = {SEND_F: "sending activations to", RECV_F: "receiving activations from",
                SEND_B: "sending gradients to", RECV_B: "receiving gradients from"}[action.op]
        return (f"pipeline stage {self.topo.pp_rank} (rank {self.topo.rank}): {what} stage {peer_rank}, "
                f"micro-batch {action.microbatch}, chunk {action.chunk}")

    def finish(self) -> None:
        """Waits for every send of the step (their buffers are released afterwards)."""
        for actions, work, _ in self.pending_sends:
            self._wait(work, *actions)
        self.pending_sends = []
