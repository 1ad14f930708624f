"""engine.pipeline.Pipeline on a user's own stages that pass tuples of tensors of several shapes and dtypes
(a float activation, a float side tensor, an integer tensor and a float tensor passed through unchanged), against the same blocks run without a pipeline
on the whole batch: the loss on every rank and every parameter's gradient, for GPipe, 1F1B and interleaved, with
shapes travelling in headers or declared. pp = 2, fp32, one spawned group."""
import torch
import torch.distributed as dist
from torch import nn

import distributed
from engine.pipeline import Pipeline

WIDTH, BATCH, SEQ, BLOCKS = 8, 8, 5, 4


class Block(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.mix, self.side = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, h, gate, weight, offset):
        h = h + torch.tanh(self.mix(h)) * torch.sigmoid(gate).unsqueeze(1)
        return h, gate + self.side(h.mean(1)), weight, offset  # weight and offset pass through unchanged


def loss_fn(output, target):
    h, gate, weight, offset = output
    return (((h.mean(1) + gate + offset - target) ** 2).mean(-1) * weight).mean()


def batch():
    g = torch.Generator().manual_seed(7)
    inputs = (torch.randn(BATCH, SEQ, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g),
              torch.randint(1, 4, (BATCH,), generator=g), torch.randn(BATCH, WIDTH, generator=g))
    return inputs, torch.randn(BATCH, WIDTH, generator=g)


def _worker(rank, world):
    inputs, target = batch()
    reference = [Block(i) for i in range(BLOCKS)]
    out = inputs
    for block in reference:
        out = block(*out)
    expected = loss_fn(out, target)
    expected.backward()
    declared = [((BATCH // 4, SEQ, WIDTH), torch.float32), ((BATCH // 4, WIDTH), torch.float32),
                ((BATCH // 4,), torch.int64), ((BATCH // 4, WIDTH), torch.float32)]
    for schedule, vpp, shapes in (("gpipe", 1, None), ("1f1b", 1, declared), ("interleaved", 2, None)):
        # chunk c of rank r is virtual stage c * pp + r; each holds BLOCKS / (pp * vpp) blocks
        per = BLOCKS // (world * vpp)
        chunks = [nn.Sequential(*[Block(i) for i in range((c * world + rank) * per, (c * world + rank + 1) * per)])
                  for c in range(vpp)]
        for chunk in chunks:
            chunk.forward = _tuple_sequential(chunk)
        pipe = Pipeline(chunks, dist.group.WORLD, schedule=schedule, microbatches=4, loss_fn=loss_fn, shapes=shapes)
        loss = pipe.step(inputs if rank == 0 else None, target=target)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"{schedule}: {m}")
        for c, chunk in enumerate(chunks):
            first = (c * world + rank) * per
            for i, block in enumerate(chunk):
                for (name, p), q in zip(block.named_parameters(), reference[first + i].parameters()):
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7,
                                               msg=lambda m: f"{schedule} block {first + i} {name}: {m}")


def _tuple_sequential(seq):
    def forward(*args):
        for block in seq:
            args = block(*args)
        return args
    return forward


def test_pipeline_of_user_stages_with_tuples_matches_no_pipeline():
    distributed.run(_worker, world=2)
