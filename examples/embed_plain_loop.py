"""Your own model and your own training loop, with the engine's tensor parallelism and ZeRO optimizer.

    python examples/embed_plain_loop.py                                     # one process
    torchrun --nproc_per_node 4 examples/embed_plain_loop.py --tp 2 --zero-stage 2
    torchrun --nproc_per_node 4 examples/embed_plain_loop.py --tp 2 --zero-stage 3 --steps 50 --json losses.json

The world is split into tensor-parallel groups of --tp consecutive ranks (tp innermost: at world 4, tp 2 the tp
groups are [0, 1] and [2, 3], the data-parallel groups [0, 2] and [1, 3]). Every rank of a tp group reads the
same data; each data-parallel rank reads its share of the global batch. The printed loss is the global batch's
mean, the same on every rank and at any --tp / world size / --zero-stage.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from engine.optim import FusedAdamW, ZeroOptimizer  # noqa: E402
from engine.parallel import parallelize  # noqa: E402

VOCAB, WIDTH, SEQ = 64, 32, 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyNet(nn.Module):
    """Embedding, two residual MLP blocks, a head: predicts each token's successor."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# Hugging Face's tp-plan format. Each up/down pair needs one all-reduce in forward; the head stays whole.
TP_PLAN = {"embed": "embedding", "blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


def global_batch(step, size):
    """The global batch of `step` (the same at any world size): sequences that follow t -> 5t + 3 mod VOCAB
    with one random token in four, so the loss has something to learn and a floor above zero."""
    g = torch.Generator().manual_seed(step)
    ids = torch.empty(size, SEQ + 1, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (size,), generator=g)
    noise = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    for t in range(SEQ):
        ids[:, t + 1] = torch.where(noise[:, t] % 4 == 0, noise[:, t], (5 * ids[:, t] + 3) % VOCAB)
    return ids


def init_distributed(device):
    """torchrun's environment, or a world of one when run as a plain script."""
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no GPU is visible")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return torch.device(device)


def make_groups(tp):
    """(tp group, dp group) of this rank. Every rank must create every group, in the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        sys.exit(f"--tp {tp} does not divide the world size {world}")
    mine = {}
    for first in range(0, world, tp):
        ranks = list(range(first, first + tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["tp"] = group
    for offset in range(tp):
        ranks = list(range(offset, world, tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["dp"] = group
    return mine["tp"], mine["dp"]


def warmup_cosine(warmup, total):
    def factor(step):  # LambdaLR's multiplier of the peak lr after `step` scheduler steps
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def parse_args(description: str, zero_stage: int, steps: int) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=zero_stage, choices=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", help="write the per-step losses and grad norms here (rank 0)")
    return ap.parse_args()


def setup(args):
    """(device, tp group, dp group, dp size, dp rank), after checking that dp splits the global batch."""
    device = init_distributed(args.device)
    tp_group, dp_group = make_groups(args.tp)
    dp, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    if args.global_batch % dp:
        sys.exit(f"--global-batch {args.global_batch} is not divisible by the data-parallel size {dp}")
    return device, tp_group, dp_group, dp, dp_rank


def log_step(history: dict, step: int, loss: torch.Tensor, norm: torch.Tensor, dp_group, sched) -> None:
    """Records the global-batch loss (each dp rank's share is the same size: the mean of the means)."""
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=dp_group)
    mean_loss = mean_loss.item() / dist.get_world_size(dp_group)
    history["loss"].append(mean_loss)
    history["grad_norm"].append(float(norm))
    if dist.get_rank() == 0:
        print(f"step {step + 1:3d}  loss {mean_loss:.5f}  grad_norm {float(norm):.4f}  "
              f"lr {sched.get_last_lr()[0]:.2e}", flush=True)


def finish(history: dict, json_path: str | None) -> None:
    if json_path and dist.get_rank() == 0:
        with open(json_path, "w") as fh:
            json.dump(history, fh)
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's worker threads can abort it (SIGABRT, "terminate called
    # without an active exception") after the run has finished; the engine's own entry points leave the same way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main():
    args = parse_args(__doc__, zero_stage=1, steps=20)
    device, tp_group, dp_group, dp, dp_rank = setup(args)

    torch.manual_seed(0)  # the same initial weights on every rank; parallelize keeps this rank's slices
    model = TinyNet().to(device)
    if args.tp > 1:
        parallelize(model, tp_group, TP_PLAN)
    opt = ZeroOptimizer(model, FusedAdamW, stage=args.zero_stage, group=dp_group, lr=args.lr, betas=(0.9, 0.95),
                        weight_decay=0.1, no_weight_decay=lambda name, p: p.ndim < 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, args.steps // 10), args.steps))

    per_rank = args.global_batch // dp
    history = {"loss": [], "grad_norm": []}
    for step in range(args.steps):
        ids = global_batch(step, args.global_batch)[dp_rank * per_rank:(dp_rank + 1) * per_rank].to(device)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()  # ZeroOptimizer averages the gradients over the dp group as they are produced
        norm = opt.clip_grad_norm_(args.clip, model_parallel_group=tp_group)  # over dp and tp, replicas once
        opt.step()
        sched.step()
        opt.zero_grad()
        log_step(history, step, loss, norm, dp_group, sched)
    finish(history, args.json)


if __name__ == "__main__":
    main()
