"""Runs one rank's action list: the single executor behind every schedule (and behind pp = 1, where the list
is simply F0 B0 F1 B1 ...).

After a stage's output has been sent, its storage is released (only the autograd graph is kept: the stage's
backward starts from the received gradient, not from the output's values), as Megatron does.
"""
from __future__ import annotations

import contextlib

import torch

from .p2p import P2P
from .schedules import COMMUNICATION, RECV_B, RECV_F, SEND_B, SEND_F, Action, F, runs, virtual_stage


def _release(t: torch.Tensor) -> None:
    t.data = torch.empty((1,), device=t.device, dtype=t.dtype)


def _backward_from(output: torch.Tensor, grad: torch.Tensor) -> None:
    """Backward from an output whose storage was released (the shape check of torch.autograd.backward would
    reject it; the engine call skips that check)."""
    torch.autograd.Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(grad,), keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True)


class PipelineExecutor:
    """chunks: this rank's model chunks (chunk c is virtual stage c * pp + rank); p2p: the transfers to the
    neighbouring stages (None without pipeline parallelism)."""

    def __init__(self, chunks, topo, p2p: P2P | None):
        self.chunks, self.topo, self.p2p = chunks, topo, p2p
        self.last_stage = topo.pp * len(chunks) - 1
        self.peak_inflight = 0

    def run(self, actions: list[Action], micro_batches: list[torch.Tensor], loss_fn, loss_scale: float = 1.0,
            forward_only: bool = False, first_forward_context=contextlib.nullcontext) -> torch.Tensor:
        """Executes the list; returns this rank's summed loss (zero off the last stage). loss_fn(output,
        targets) gives a micro-batch's loss, already normalised by the global batch's token count."""
        self.loss_fn = loss_fn
        inputs, outputs, grads_in, received = {}, {}, {}, {}
        total = torch.zeros((), device=micro_batches[0].device)
        inflight = set()
        for batch in runs(actions):
            if batch[0].op in COMMUNICATION:  # consecutive transfers are posted together
                outgoing = {a: (outputs[(a.microbatch, a.chunk)].detach() if a.op == SEND_F else
                                grads_in.pop((a.microbatch, a.chunk))) for a in batch if a.op in (SEND_F, SEND_B)}
                received.update(self.p2p.exchange(batch, outgoing))
                for a in batch:
                    if a.op == SEND_F and not forward_only:
                        _release(outputs[(a.microbatch, a.chunk)])
                    elif a.op == SEND_F:
                        del outputs[(a.microbatch, a.chunk)]
                continue
            a = batch[0]
            unit = (a.microbatch, a.chunk)
            if a.op == F:
                context = first_forward_context() if a.microbatch == 0 else contextlib.nullcontext()
                with context:
                    total += self._forward(a, micro_batches, inputs, outputs, received, forward_only)
                if forward_only and virtual_stage(self.topo.pp_rank, a.chunk, self.topo.pp) == self.last_stage:
                    del outputs[unit]
                if not forward_only:
                    inflight.add(unit)
                    self.peak_inflight = max(self.peak_inflight, len(inflight))
            else:
                self._backward(a, inputs, outputs, grads_in, received, loss_scale)
                inflight.discard(unit)
        if self.p2p is not None:
            self.p2p.finish()
        return total

    def _forward(self, a, micro_batches, inputs, outputs, received, forward_only) -> torch.Tensor:
        v = virtual_stage(self.topo.pp_rank, a.chunk, self.topo.pp)
        tokens = micro_batches[a.microbatch]
        unit = (a.microbatch, a.chunk)
        if v == 0:
            x = tokens[:, :-1]
        else:
            x = received.pop(Action(RECV_F, *unit))
            x.requires_grad_(not forward_only)
        if not forward_only:
            inputs[unit] = x
        with torch.set_grad_enabled(not forward_only):
            out = self.chunks[a.chunk](x)
            if v == self.last_stage:
                out = self.loss_fn(out, tokens[:, 1:])
        outputs[unit] = out
        return out.detach() if v == self.last_stage else torch.zeros((), device=out.device)

    def _backward(self, a, inputs, outputs, grads_in, received, loss_scale) -> None:
        unit = (a.microbatch, a.chunk)
        v = virtual_stage(self.topo.pp_rank, a.chunk, self.topo.pp)
        out = outputs.pop(unit)
        if v == self.last_stage:
            (out * loss_scale).backward()
        else:
            _backward_from(out, received.pop(Action(RECV_B, *unit)))
        x = inputs.pop(unit, None)
        if v > 0:
            grads_in[unit] = x.grad
