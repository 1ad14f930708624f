"""Runs one rank's action list: the single executor behind every schedule (and behind pp = 1, where the list
is simply F0 B0 F1 B1 ...).

What a stage passes on is a tensor or a tuple of tensors (a tuple is unpacked into the next stage's arguments);
gradients come back for its floating-point tensors, in order (zeros where one got none). After a stage's output
has been sent, the storage of what the stage computed is released (only the autograd graph is kept: the stage's
backward starts from the received gradient, not from the output's values), as Megatron does; tensors passed
through unchanged (inputs, parameters, buffers) are left alone.
"""
from __future__ import annotations

import contextlib

import torch

from .p2p import P2P, as_tuple
from .schedules import COMMUNICATION, RECV_B, RECV_F, SEND_B, SEND_F, Action, F, runs, virtual_stage


def _release(output) -> None:
    for t in as_tuple(output):
        if t.grad_fn is not None:  # computed here: nobody else holds its storage
            t.data = torch.empty((1,), device=t.device, dtype=t.dtype)


def _floats(x) -> list:
    return [t for t in as_tuple(x) if t.is_floating_point()]


def _backward_from(output, grad) -> None:
    """Backward from an output whose storage was released (the shape check of torch.autograd.backward would
    reject it; the engine call skips that check). grad holds one gradient per floating-point output; outputs
    that do not require grad are passed over."""
    pairs = [(o, g) for o, g in zip(_floats(output), as_tuple(grad)) if o.requires_grad]
    if pairs:
        torch.autograd.Variable._execution_engine.run_backward(
            tensors=tuple(o for o, _ in pairs), grad_tensors=tuple(g for _, g in pairs), keep_graph=False,
            create_graph=False, inputs=(), allow_unreachable=True, accumulate_grad=True)


def _input_grads(x) -> tuple:
    """The gradients to send back for a stage's received floating-point input(s), in order."""
    return tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in _floats(x))


class PipelineExecutor:
    """chunks: this rank's model chunks (chunk c is virtual stage c * pp + pp_rank); p2p: the transfers to the
    neighbouring stages (None without pipeline parallelism)."""

    def __init__(self, chunks, pp_rank: int, pp: int, p2p: P2P | None):
        self.chunks, self.pp_rank, self.pp, self.p2p = chunks, pp_rank, pp, p2p
        self.last_stage = pp * len(chunks) - 1
        self.device = next((p.device for c in chunks for p in c.parameters()), torch.device("cpu"))
        self.peak_inflight = 0
        self.on_action = None  # on_action(description) before each run of the list (progress for hang reports)

    def run(self, actions: list[Action], inputs: list, targets: list, loss_fn, loss_scale: float = 1.0,
            forward_only: bool = False, first_forward_context=contextlib.nullcontext,
            forward_kwargs: list[dict] | None = None, targets_in_forward: bool = False) -> torch.Tensor:
        """Executes the list; returns this rank's summed loss (zero off the last stage). inputs[i]: micro-batch
        i's input to the first stage (a tensor or a tuple); loss_fn(output, targets[i]) gives its loss.
        forward_kwargs[i]: keyword arguments every stage's chunk gets with micro-batch i (e.g. its document
        mask, which later stages cannot derive from hidden states). targets_in_forward: the last stage's chunk also
        gets `targets=targets[i]` and returns what loss_fn then takes (a loss computed inside the chunk's forward,
        e.g. a head fused into the loss, runs inside the module hooks around it)."""
        self.loss_fn, self.forward_kwargs, self.targets_in_forward = loss_fn, forward_kwargs, targets_in_forward
        saved, outputs, grads_in, received, sent = {}, {}, {}, {}, {}
        total = torch.zeros((), device=self.device)
        inflight = set()
        for batch in runs(actions):
            if self.on_action is not None:
                self.on_action(" ".join(str(a) for a in batch) + (" (pipeline transfers)" if batch[0].op in
                                                                  COMMUNICATION else ""))
            if batch[0].op in COMMUNICATION:  # consecutive transfers are posted together
                outgoing = {}
                for a in batch:
                    if a.op == SEND_F:
                        out = outputs[(a.microbatch, a.chunk)]
                        outgoing[a] = tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()
                        sent[(a.microbatch, a.chunk)] = [(t.shape, t.dtype) for t in _floats(out)]
                    elif a.op == SEND_B:
                        outgoing[a] = grads_in.pop((a.microbatch, a.chunk))
                grad_specs = {a: sent[(a.microbatch, a.chunk)] for a in batch if a.op == RECV_B}
                received.update(self.p2p.exchange(batch, outgoing, grad_specs))
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
                    total += self._forward(a, inputs, targets, saved, outputs, received, forward_only)
                if forward_only and virtual_stage(self.pp_rank, a.chunk, self.pp) == self.last_stage:
                    del outputs[unit]
                if not forward_only:
                    inflight.add(unit)
                    self.peak_inflight = max(self.peak_inflight, len(inflight))
            else:
                self._backward(a, saved, outputs, grads_in, received, loss_scale)
                sent.pop(unit, None)
                inflight.discard(unit)
        if self.p2p is not None:
            self.p2p.finish()
        return total

    def _forward(self, a, inputs, targets, saved, outputs, received, forward_only) -> torch.Tensor:
        v = virtual_stage(self.pp_rank, a.chunk, self.pp)
        unit = (a.microbatch, a.chunk)
        if v == 0:
            x = inputs[a.microbatch]
        else:
            x = received.pop(Action(RECV_F, *unit))
            for t in as_tuple(x):
                t.requires_grad_(not forward_only and t.is_floating_point())
        if not forward_only:
            saved[unit] = x
        kwargs = dict(self.forward_kwargs[a.microbatch]) if self.forward_kwargs else {}
        if v == self.last_stage and self.targets_in_forward:
            kwargs["targets"] = targets[a.microbatch]
        with torch.set_grad_enabled(not forward_only):
            out = self.chunks[a.chunk](*as_tuple(x), **kwargs)
            if v == self.last_stage:
                out = self.loss_fn(out, targets[a.microbatch])
        outputs[unit] = out
        return out.detach() if v == self.last_stage else torch.zeros((), device=self.device)

    def _backward(self, a, saved, outputs, grads_in, received, loss_scale) -> None:
        unit = (a.microbatch, a.chunk)
        v = virtual_stage(self.pp_rank, a.chunk, self.pp)
        out = outputs.pop(unit)
        if v == self.last_stage:
            (out * loss_scale).backward()
        else:
            _backward_from(out, received.pop(Action(RECV_B, *unit)))
        x = saved.pop(unit, None)
        if v > 0:
            grads_in[unit] = _input_grads(x)

