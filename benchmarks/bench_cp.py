"""Ring attention (engine.parallel.context) on CPU/gloo vs dense causal SDPA on the same tokens.

One causal attention forward + backward over a sequence of S tokens (b, h, d as given, fp32):

* dense SDPA: ``F.scaled_dot_product_attention(is_causal=True)`` on the whole sequence in this process, 1 thread.
* ring cp 1: ``ring_attention`` with no group (our plain-torch block kernel on one rank), 1 thread.
* ring cp N: ``ring_attention`` on N spawned gloo processes, 1 thread each, each holding S/N tokens in the
  load-balanced layout. A step's time is the slowest rank's. "compute" and "wait" are the per-rank means of the
  seconds spent in block compute and waiting on the ring's transfers (``context.TIMINGS``; a wait also covers a
  peer that is still computing); "comm alone" is the slowest rank's time for the same transfers done back to
  back without compute, and "hidden" = 1 - wait / comm alone: the share of the communication that the block
  compute covers.

Also tries ``torch.distributed.tensor.experimental.context_parallel`` on 2 gloo processes and reports whether
it runs on CPU. Medians over --repeats after --warmup (1) untimed calls (benchmarks/ab.py): dense SDPA's calls,
then ring cp 1's; on the cp ranks, the step and the transfers alone in turns. On a machine with fewer cores than
ranks the ranks share cores, and every number is wall time.

    python benchmarks/bench_cp.py [--seq-lengths 4096 8192] [--cp 2 4] [--heads 8] [--head-dim 64] [--repeats 3] \
        [--warmup 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.parallel import context
from engine.parallel.context import ring_attention, shard_sequence
from ab import add_timing_args, run_ab, write_json


def inputs(args, seq_len):
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(args.batch, args.heads, seq_len, args.head_dim, generator=gen) for _ in range(2))
    k, v = (torch.randn(args.batch, args.kv_heads, seq_len, args.head_dim, generator=gen) for _ in range(2))
    return q, k, v, dout


def single_process(args, seq_len):
    """(dense SDPA seconds, ring cp 1 seconds) on one thread."""
    torch.set_num_threads(1)
    q, k, v, dout = inputs(args, seq_len)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = args.heads // args.kv_heads

    def dense():
        F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                       is_causal=True).backward(dout)

    def ring():
        ring_attention(q, k, v).backward(dout)

    # one side at a time: all of dense's calls, then all of the ring's
    return tuple(run_ab({name: fn}, args.repeats, args.warmup).median(name) for name, fn in (("dense", dense),
                                                                                              ("ring", ring)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _ring_rank(rank, world, port, args, seq_len, queue):
    _init(rank, world, port)
    q, k, v, dout = (shard_sequence(t, world, rank, dim=2) for t in inputs(args, seq_len))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    def step():
        ring_attention(q, k, v, dist.group.WORLD).backward(dout)

    def comm():
        """The same transfers as one forward + backward, back to back, without compute."""
        peers = list(range(world))
        kv = [k.detach(), v.detach()]
        grads = [torch.zeros(k.shape), torch.zeros(v.shape)]
        for _ in range(2 * (world - 1)):
            reqs, kv = context._exchange(kv, None, world, rank, peers)
            [r.wait() for r in reqs]
        for _ in range(world):
            reqs, grads = context._exchange(grads, None, world, rank, peers)
            [r.wait() for r in reqs]

    def reset(name):
        if name == "step":
            context.TIMINGS = {"compute": 0.0, "wait": 0.0}

    split = []  # per timed step: this rank's seconds of block compute and of waiting on transfers

    def record(name, _seconds):
        if name == "step":
            split.append([context.TIMINGS["compute"], context.TIMINGS["wait"]])

    # every round: the step, then the transfers alone; each after a barrier, the slowest rank's time
    res = run_ab({"step": step, "comm": comm}, args.repeats, args.warmup, group=dist.group.WORLD, order="fixed",
                 before=reset, after=record)
    mean = torch.tensor(split, dtype=torch.float64)
    dist.all_reduce(mean)
    mean /= world
    rows = [(a, b, c, d) for a, b, (c, d) in zip(res.times["step"], res.times["comm"], mean.tolist())]
    if rank == 0:
        queue.put([statistics.median(col) for col in zip(*rows)])
    dist.destroy_process_group()


def ring(args, cp, seq_len):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ring_rank, args=(cp, _free_port(), args, seq_len, queue), nprocs=cp, start_method="spawn")
    return queue.get()


def _torch_cp_rank(rank, world, port, queue):
    _init(rank, world, port)
    message = "runs"
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        mesh = init_device_mesh("cpu", (world,))
        q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    except Exception as e:  # noqa: BLE001 - the answer is the error
        message = f"no: {type(e).__name__}: {str(e).splitlines()[0]}"
    if rank == 0:
        queue.put(message)
    dist.destroy_process_group()


def torch_cp_check():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_torch_cp_rank, args=(2, _free_port(), queue), nprocs=2, start_method="spawn")
    return queue.get()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="[= --heads]")
    ap.add_argument("--head-dim", type=int, default=64)
    add_timing_args(ap, repeats=3, warmup=1, with_profile=False)
    args = ap.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    results = []
    for seq_len in args.seq_lengths:
        dense_s, ring1_s = single_process(args, seq_len)
        results.append({"seq_len": seq_len, "cp": 1, "what": "dense SDPA", "step_s": dense_s})
        results.append({"seq_len": seq_len, "cp": 1, "what": "ring", "step_s": ring1_s})
        for cp in args.cp:
            step_s, comm_s, compute_s, wait_s = ring(args, cp, seq_len)
            results.append({"seq_len": seq_len, "cp": cp, "what": "ring", "step_s": step_s, "compute_s": compute_s,
                            "wait_s": wait_s, "comm_alone_s": comm_s, "hidden": max(0.0, 1 - wait_s / comm_s)})
    torch_cp = torch_cp_check()
    print(f"causal attention fwd+bwd, b={args.batch} h={args.heads} kv_h={args.kv_heads} d={args.head_dim} fp32, "
          f"gloo, 1 thread per rank, {os.cpu_count()} cores\n")
    print("| S | what | cp | step s | vs dense | compute s | wait s | comm alone s | comm hidden |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        dense = next(x["step_s"] for x in results if x["seq_len"] == r["seq_len"] and x["what"] == "dense SDPA")
        cells = [r["seq_len"], r["what"], r["cp"], f"{r['step_s']:.3f}", f"{r['step_s'] / dense:.2f}x"]
        if "wait_s" in r:
            cells += [f"{r['compute_s']:.3f}", f"{r['wait_s']:.3f}", f"{r['comm_alone_s']:.3f}",
                      f"{100 * r['hidden']:.0f}%"]
        else:
            cells += [""] * 4
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"\ntorch.distributed.tensor.experimental.context_parallel on CPU/gloo: {torch_cp}")
    write_json(args.json, {"results": results, "torch_context_parallel": torch_cp})
    return 0


if __name__ == "__main__":
    sys.exit(main())
