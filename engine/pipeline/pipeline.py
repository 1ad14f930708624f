"""A pipeline over any user modules: the engine's schedules and executor behind a small object.

    pipe = Pipeline(stages, pp_group, schedule="1f1b", microbatches=4, loss_fn=F.mse_loss)
    loss = pipe.step(inputs, target=target)    # forward and backward of the whole batch; grads accumulate
    optimizer.step()

`stages` are this rank's chunk modules: chunk c is virtual stage c * pp + rank (one chunk per rank for GPipe and
1F1B, several for the interleaved schedule). A stage may return a tensor or a tuple of tensors of any shape and
dtype; the next stage takes them as its arguments. Shapes travel with each transfer unless `shapes` declares them
([(shape, dtype)] of what every stage sends), which saves a small message per transfer.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from . import schedules
from .executor import PipelineExecutor
from .p2p import P2P, as_tuple
from .simulate import nccl_deadlock


class Pipeline:
    def __init__(self, stages, pp_group, schedule: str = "1f1b", microbatches: int = 1, loss_fn=None, *,
                 shapes: list[tuple] | None = None, timeout_s: float = 600.0):
        self.stages = list(stages) if isinstance(stages, (list, tuple)) else [stages]
        self.group, self.microbatches, self.loss_fn = pp_group, microbatches, loss_fn
        self.pp = dist.get_world_size(pp_group) if pp_group is not None else 1
        self.rank = dist.get_rank(pp_group) if pp_group is not None else 0
        vpp = len(self.stages)
        lists = schedules.build(schedule, self.pp, microbatches, vpp)
        stuck = nccl_deadlock(lists, self.pp)
        if stuck:  # (none of the engine's schedules, for pp <= 16, vpp <= 4 and up to 4 pp micro-batches)
            raise ValueError(f"Pipeline(schedule={schedule!r}, microbatches={microbatches}): its transfers would "
                             f"deadlock under NCCL's group rules ({stuck})")
        self.actions = lists[self.rank]
        device = next((p.device for s in self.stages for p in s.parameters()), torch.device("cpu"))
        p2p = None
        if self.pp > 1:
            ranks = dist.get_process_group_ranks(pp_group)
            p2p = P2P(ranks, self.rank, device, vpp, shapes, timeout_s)
            if dist.get_backend(pp_group) == "nccl" and shapes is None and self.rank == 0:
                warnings.warn(f"Pipeline(schedule={schedule!r}) on NCCL without shapes=: each forward transfer "
                              "sends a header batch first, which NCCL's group rules may not complete; declare "
                              "shapes=", stacklevel=2)
        self.executor = PipelineExecutor(self.stages, self.rank, self.pp, p2p)

    def step(self, inputs, target=None) -> torch.Tensor:
        """Runs the schedule over the batch split into micro-batches along dim 0: `inputs` (a tensor or a tuple)
        feed the first stage, loss_fn(output, target micro-batch) runs on the last; gradients of the mean of the
        micro-batch losses accumulate into the stages' parameters. Returns that mean loss on every rank."""
        inputs_mb = _split(inputs, self.microbatches) if inputs is not None else [None] * self.microbatches
        targets_mb = _split(target, self.microbatches) if target is not None else [None] * self.microbatches
        loss_fn = self.loss_fn or (lambda output, _: output)
        mean = lambda output, t: loss_fn(output, t) / self.microbatches  # noqa: E731
        total = self.executor.run(self.actions, inputs_mb, targets_mb, mean)
        if self.pp > 1:
            dist.all_reduce(total, group=self.group)  # only the last stage's is non-zero
        return total


def _split(x, m: int) -> list:
    parts = [t.tensor_split(m) for t in as_tuple(x)]
    if any(len(t) % m for t in as_tuple(x)):
        raise ValueError(f"Pipeline: a batch of {len(as_tuple(x)[0])} does not split into {m} equal micro-batches")
    return [tuple(p[i] for p in parts) if isinstance(x, tuple) else parts[0][i] for i in range(m)]
