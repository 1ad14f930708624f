"""Pipeline parallelism: ``engine``'s 1F1B / interleaved schedules vs ``torch.distributed.pipelining``.

Launch with torchrun, one process per pipeline rank (world size = pp; tp = dp = 1):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/bench_pp.py --schedule 1f1b [--repeats 3]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 benchmarks/bench_pp.py --schedule interleaved --vpp 2

Both sides run in the same processes, on the same model split (the same layers per chunk, the same weights), the
same batches, fp32 and gloo:

* ours: a ``Trainer`` built from a parsed config (``--pp P [--vpp V --schedule interleaved]``, tp = dp = 1); its
  chunk c on rank r is virtual stage c * pp + r of pp * vpp (embedding only on virtual stage 0, final norm + head
  only on the last). Timed: ``trainer.forward_backward(micro_batches, num_tokens)`` (the schedule's action list
  run by ``PipelineExecutor`` with ``P2P`` transfers, loss = vocab-parallel cross-entropy summed / global
  tokens, gradients accumulated into the flat buffer of the trainer's ``ZeroOptimizer`` by its per-parameter
  hooks) followed by ``trainer.zero.finish_gradients()`` (no communication at dp = 1 without tied embeddings).
* torch: ``PipelineStage(chunk, stage_index=c * pp + r, num_stages=pp * vpp)`` for each chunk, where chunk is a
  separate ``Llama`` with the same layers, embedding / head placement and weights (loaded from ours; separate so
  the engine's gradient hooks stay out of torch's step), driven by ``Schedule1F1B`` (vpp = 1) or
  ``ScheduleInterleaved1F1B`` (vpp > 1) with ``loss_fn = cross_entropy(logits, targets, reduction="sum") /
  global tokens`` and ``scale_grads=False``, so both compute the same loss and the same gradients. Timed:
  ``schedule.step(...)`` with ``return_outputs=False``.

Not timed on either side: zeroing the gradients before every step (ours ``zero.start_step``, torch
``zero_grad()``), clipping and the optimizer (identical work on both sides, no pipeline in it). Before timing,
the first step's loss (on the last stage) must agree within 1e-5 (the largest gradient difference is printed too),
and the compute calls each side actually executed on each rank (forward / backward, virtual stage, micro-batch,
in order) are compared: with the same order the comparison is one of runtime overhead only.

Timing: after warm-up, steps alternate ours / torch (the order flips every pair), each preceded by a barrier; a
step's time is the slowest rank's. The figure to read is the median of the per-pair ratios ours / torch (< 1.0:
ours is faster), with its quartiles. Also reported: CPU seconds per step summed over the ranks
(``time.process_time``), less sensitive than wall time to other jobs on a shared machine.

Bubble: "modelled" is ``engine.pipeline.simulate.run(schedule, pp, m, vpp).bubble_fraction`` (F = 1, B = 2 per
whole model, free communication). "measured" is 1 - mean over ranks of (time inside compute calls) / step
time, from wrapping the compute calls of both sides (ours: ``PipelineExecutor._forward`` / ``_backward``; torch:
``PipelineStage.forward_one_chunk`` / ``backward_one_chunk`` and the schedule's loss computation). With more
processes than cores (pp = 4 on 2 cores), or other jobs on the machine, a compute call also contains time the
OS gave to other processes and a rank also waits on a descheduled peer: the measured figure is then a mix of
schedule bubble and contention, meaningful only with an otherwise idle core per rank.

    --profile DIR      after timing, cProfile a few steps per side on every rank (DIR/{ours,torch}_rank<r>.txt)
    --no-grad-hooks    ablation: drop the ZeroOptimizer's per-parameter hooks from our side (dp = 1 only)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import engine  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.models.llama import Llama  # noqa: E402
from engine.parallel.topology import init_distributed  # noqa: E402
from engine.pipeline import simulate  # noqa: E402
from engine.training import parse_config, validate  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402
from ab import add_timing_args, finish, quartiles, repeat_table, run_ab, timed  # noqa: E402

LOSS_TOLERANCE = 1e-5


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedule", choices=["1f1b", "interleaved"], default="1f1b")
    ap.add_argument("--vpp", type=int, default=None, help="model chunks per rank [2 for interleaved, else 1]")
    ap.add_argument("--pairs", type=int, default=4, help="timed ours/torch pairs per repeat")
    add_timing_args(ap, repeats=3, warmup=2, with_profile=False, repeats_help="blocks of timed pairs (default 3)",
                    warmup_help="untimed steps per side first (default 2)")
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--ffn-hidden-size", type=int, default=704)
    ap.add_argument("--num-heads", type=int, default=8)
    ap.add_argument("--num-kv-heads", type=int, default=4)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after timing, run --profile-steps steps per side under cProfile; every rank writes "
                         "DIR/{ours,torch}_rank<r>.txt (functions by own time)")
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--no-grad-hooks", action="store_true",
                    help="ablation: remove the ZeroOptimizer's per-parameter post-accumulate-grad hooks from our "
                         "side (at dp = 1 without sequence parallelism or tied embeddings they only count)")
    return ap.parse_args(argv)


class ComputeTimer:
    """Wraps callables (instance attributes) to accumulate the wall time spent inside them; while `order` is a
    list, each call also appends key(*args) (what it computed) to it."""

    def __init__(self):
        self.busy, self.order = 0.0, None

    def wrap(self, obj, name: str, key=None) -> None:
        fn = getattr(obj, name)

        def timed(*a, **kw):
            if self.order is not None and key is not None:
                self.order.append(key(*a))
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.busy += time.perf_counter() - t
        setattr(obj, name, timed)


def main(argv=None) -> int:
    args = parse_args(argv)
    vpp = args.vpp or (2 if args.schedule == "interleaved" else 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pp, m, mbs, seq = world, args.micro_batches, args.micro_batch_size, args.seq_length
    flags = ["--model", "tiny", "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
             "--ffn-hidden-size", str(args.ffn_hidden_size), "--num-heads", str(args.num_heads),
             "--num-kv-heads", str(args.num_kv_heads), "--seq-length", str(seq),
             "--micro-batch-size", str(mbs), "--global-batch-size", str(mbs * m), "--pp", str(pp),
             "--vpp", str(vpp), "--schedule", args.schedule, "--device", "cpu", "--precision", "fp32",
             # a small text corpus (this file) instead of the built-in one: the batches are random tokens anyway
             "--data", os.path.abspath(__file__), "--valid-fraction", "0"]
    cfg = parse_config(flags)
    validate(cfg, world)
    init_distributed(cfg.run.collective_timeout, "cpu")
    rank = dist.get_rank()

    def log(*a):
        if rank == 0:
            print(*a, flush=True)

    trainer = Trainer(cfg)
    topo, mcfg = trainer.topo, trainer.model_cfg
    vocab, num_tokens = mcfg.vocab_size, mbs * m * seq
    last_rank = pp - 1  # the last virtual stage (c = vpp - 1) lives on rank pp - 1 for both schedules

    # ---- torch.distributed.pipelining on copies of the same chunks -------------------------------------------
    # Separate modules (so the engine's gradient hooks and flat buffers stay out of torch's step) with the same
    # layers, the same embedding / head placement and the same weights, loaded from ours.
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    def torch_loss(logits, targets):
        return F.cross_entropy(logits[..., :vocab].float().flatten(0, -2), targets.flatten(),
                               reduction="sum") / num_tokens

    torch_chunks = []
    for chunk in trainer.chunks:
        twin = Llama(mcfg, layers=[int(k) for k in chunk.layers.keys()], has_embedding=chunk.embedding is not None,
                     has_head=chunk.norm is not None)
        twin.load_state_dict(chunk.state_dict())
        torch_chunks.append(twin.train())
    stages = [PipelineStage(chunk, stage_index=c * pp + topo.pp_rank, num_stages=pp * vpp,
                            device=torch.device("cpu"), group=topo.pp_group) for c, chunk in enumerate(torch_chunks)]
    if vpp == 1:
        schedule = Schedule1F1B(stages[0], m, loss_fn=torch_loss, scale_grads=False)
    else:
        schedule = ScheduleInterleaved1F1B(stages, m, loss_fn=torch_loss, scale_grads=False)
    has_first = any(s.is_first for s in stages)
    has_last = any(s.is_last for s in stages)

    # ---- compute-call timers (for the measured bubble) ------------------------------------------------------
    ours_timer, torch_timer = ComputeTimer(), ComputeTimer()
    ours_timer.wrap(trainer.executor, "_forward", lambda a, *_: ("F", a.chunk * pp + topo.pp_rank, a.microbatch))
    ours_timer.wrap(trainer.executor, "_backward", lambda a, *_: ("B", a.chunk * pp + topo.pp_rank, a.microbatch))
    for st in stages:
        torch_timer.wrap(st, "forward_one_chunk", lambda mb, *_, st=st: ("F", st.stage_index, mb))
        torch_timer.wrap(st, "backward_one_chunk", lambda mb, *_, st=st: ("B", st.stage_index, mb))
    torch_timer.wrap(schedule, "_compute_loss")

    zero = getattr(trainer, "zero", None)  # the ZeroOptimizer (flat gradient buffer + hooks), when present
    if args.no_grad_hooks and zero is not None:
        for h in getattr(zero, "_hooks", []):
            h.remove()

    def ours_prepare():
        if zero is not None:
            zero.start_step(m)  # zeroes the flat gradient buffer, arms the per-parameter hooks
        else:
            for _, q in trainer.named_params:
                q.grad.zero_()

    def torch_prepare():
        for chunk in torch_chunks:
            chunk.zero_grad()  # set_to_none, as torch training loops do

    def ours_step(batch):
        loss = trainer.forward_backward(list(batch.split(mbs)), num_tokens)
        if zero is not None:
            zero.finish_gradients()  # with dp = 1 and untied embeddings: no communication
        return loss

    def torch_step(batch):
        losses = [] if has_last else None
        x, y = batch[:, :-1], batch[:, 1:]
        a = (x,) if has_first else ()
        schedule.step(*a, target=y if has_last else None, losses=losses, return_outputs=False)
        return torch.stack(losses).sum() if has_last else torch.zeros(())

    sides = {"ours": (ours_prepare, ours_step, ours_timer), "torch": (torch_prepare, torch_step, torch_timer)}
    steps = {side: fn for side, (_, fn, _) in sides.items()}

    def prepare(side):
        """Before a step, outside the timed region and before the barrier: zero the gradients."""
        sides[side][0]()

    def once(side, batch):
        """One untimed step (after a barrier, as the timed ones); this rank's loss."""
        prepare(side)
        return timed(lambda: steps[side](batch))[1]

    gen = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, vocab, (mbs * m, seq + 1), generator=gen) for _ in range(4)]

    log(f"bench_pp: pp {pp}, schedule {args.schedule}, vpp {vpp}, {m} micro-batches of {mbs} x {seq} tokens, "
        f"layers {args.num_layers}, hidden {args.hidden_size}, ffn {args.ffn_hidden_size}, heads "
        f"{args.num_heads}/{args.num_kv_heads} kv, vocab {vocab}; torch {torch.__version__}, gloo, "
        f"{torch.get_num_threads()} thread(s) per rank, {os.cpu_count()} cpus")

    # ---- correctness: same loss and gradients on the first step ---------------------------------------------
    ours_timer.order, torch_timer.order = [], []  # record what each side computes, in order
    loss_ours = once("ours", batches[0])
    loss_torch = once("torch", batches[0])
    same = torch.tensor([float(ours_timer.order == torch_timer.order)])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    same_order = bool(same.item())
    if rank == 0 and not same_order:
        print("rank 0 ours: ", " ".join(f"{op}{mb}.{v}" for op, v, mb in ours_timer.order))
        print("rank 0 torch:", " ".join(f"{op}{mb}.{v}" for op, v, mb in torch_timer.order))
    ours_timer.order = torch_timer.order = None
    log(f"executed compute order (forward / backward, virtual stage, micro-batch) on every rank: "
        f"{'identical' if same_order else 'DIFFERENT'} between ours and torch")
    ours_named = [(n, q) for chunk in trainer.chunks for n, q in chunk.named_parameters()]
    torch_named = [(n, q) for chunk in torch_chunks for n, q in chunk.named_parameters()]
    assert [n for n, _ in ours_named] == [n for n, _ in torch_named]
    grad_diff = max((float((a.grad - b.grad).abs().max()) for (_, a), (_, b) in zip(ours_named, torch_named)),
                    default=0.0)
    grad_scale = max((float(a.grad.abs().max()) for _, a in ours_named), default=0.0)
    check = torch.tensor([float(loss_ours.detach()), float(loss_torch.detach()), grad_diff, grad_scale],
                         dtype=torch.float64)
    dist.broadcast(check, src=last_rank)
    loss_diff = abs(float(check[0]) - float(check[1]))
    diffs = torch.tensor([grad_diff, grad_scale], dtype=torch.float64)
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    log(f"step-0 loss: ours {float(check[0]):.7f}, torch {float(check[1]):.7f}, |diff| {loss_diff:.2e}; "
        f"max |grad diff| {float(diffs[0]):.2e} (max |grad| {float(diffs[1]):.2e})")
    if not loss_diff <= LOSS_TOLERANCE:
        log(f"FAIL: losses differ by more than {LOSS_TOLERANCE}")
        dist.destroy_process_group()
        return 1

    # ---- warm-up, then interleaved timed pairs (benchmarks/ab.py) --------------------------------------------
    # One round per pair, the order flipping every pair: batch k % len(batches) for pair k and for warm-up step w.
    # A step's time is the slowest rank's; its CPU time is summed over the ranks. Each rank also keeps the seconds
    # it spent inside compute calls during each timed step (for the measured bubble).
    busy, mark = {"ours": [], "torch": []}, {}

    def before(side):
        prepare(side)
        mark[side] = sides[side][2].busy

    def after(side, _seconds):
        busy[side].append(sides[side][2].busy - mark[side])

    def inputs(i):
        return (batches[(i + args.warmup if i < 0 else i) % len(batches)],)

    res = run_ab(steps, args.repeats * args.pairs, args.warmup, inputs=inputs, before=before, after=after)

    # ---- report ---------------------------------------------------------------------------------------------
    modelled = simulate.run(args.schedule, pp, m, vpp).bubble_fraction
    mine = torch.tensor([busy["ours"], busy["torch"]], dtype=torch.float64)
    every_rank = [torch.zeros_like(mine) for _ in range(pp)]
    dist.all_gather(every_rank, mine)

    def measured(col, side):
        """1 - mean over ranks of the median busy fraction (compute time / the slowest rank's step time)."""
        per_rank = [statistics.median(float(b) / t for b, t in zip(r[col], res.times[side])) for r in every_rank]
        return 1.0 - sum(per_rank) / pp, per_rank

    ours_bubble, ours_busy = measured(0, "ours")
    torch_bubble, torch_busy = measured(1, "torch")
    ratios = res.ratios("ours", "torch")
    cpu_ratios = res.ratios("ours", "torch", cpu=True)
    result = {"pp": pp, "vpp": vpp, "schedule": args.schedule, "micro_batches": m, "micro_batch_size": mbs,
              "seq_length": seq, "num_layers": args.num_layers, "hidden_size": args.hidden_size,
              "ffn_hidden_size": args.ffn_hidden_size, "num_heads": args.num_heads,
              "num_kv_heads": args.num_kv_heads, "vocab_size": vocab, "torch": torch.__version__,
              "threads_per_rank": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.processor()
              or platform.machine(), "loss_ours": float(check[0]), "loss_torch": float(check[1]),
              "loss_diff": loss_diff, "max_grad_diff": float(diffs[0]),
              "ours_ms_median": 1e3 * res.median("ours"), "torch_ms_median": 1e3 * res.median("torch"),
              "median_ratio": statistics.median(ratios), "pairs": len(ratios),
              "per_pair": [{"repeat": k // args.pairs, "ours_s": o, "torch_s": t, "ours_cpu_s": oc, "torch_cpu_s": tc}
                           for k, (o, t, oc, tc) in enumerate(zip(res.times["ours"], res.times["torch"],
                                                                  res.cpu_times["ours"], res.cpu_times["torch"]))],
              "ratio_quartiles": quartiles(ratios),
              "ours_cpu_s_median": res.median("ours", cpu=True), "torch_cpu_s_median": res.median("torch", cpu=True),
              "median_cpu_ratio": statistics.median(cpu_ratios), "cpu_ratio_quartiles": quartiles(cpu_ratios),
              "no_grad_hooks": args.no_grad_hooks,
              "bubble_modelled": modelled, "bubble_measured_ours": ours_bubble,
              "bubble_measured_torch": torch_bubble, "busy_fraction_per_rank_ours": ours_busy,
              "busy_fraction_per_rank_torch": torch_busy,
              "ours_peak_inflight": trainer.executor.peak_inflight, "same_compute_order": same_order}
    log("\n" + repeat_table(res, "ours", "torch", args.repeats)[0])
    q = result["ratio_quartiles"]
    log(f"\nper-pair ratio quartiles: {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}; CPU seconds per step (all ranks): ours "
        f"{result['ours_cpu_s_median']:.2f}, torch {result['torch_cpu_s_median']:.2f}, median per-pair ratio "
        f"{result['median_cpu_ratio']:.3f} (quartiles "
        f"{' / '.join(f'{x:.3f}' for x in result['cpu_ratio_quartiles'])})")
    log(f"\nbubble: modelled (engine.pipeline.simulate) {modelled:.3f}; measured 1 - busy/step: ours "
        f"{ours_bubble:.3f} (per-rank busy {', '.join(f'{b:.2f}' for b in ours_busy)}), torch {torch_bubble:.3f} "
        f"(per-rank busy {', '.join(f'{b:.2f}' for b in torch_busy)})")
    log(f"median per-pair ratio ours/torch: {result['median_ratio']:.3f} (target < 1.0)")
    if args.profile:
        import cProfile
        import io
        import pstats
        os.makedirs(args.profile, exist_ok=True)
        for side in ("ours", "torch"):
            prof = cProfile.Profile()
            prof.enable()  # the steps as they are timed (zeroing, barrier, step, reduction of the times)
            cpu = sum(run_ab({side: steps[side]}, args.profile_steps, 0, inputs=inputs, before=prepare).cpu_times[side])
            prof.disable()
            out = io.StringIO()
            out.write(f"{side}, rank {rank}: {args.profile_steps} steps, {cpu / args.profile_steps:.3f} CPU s/step "
                      "(all ranks)\n")
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(40)
            with open(os.path.join(args.profile, f"{side}_rank{rank}.txt"), "w") as fh:
                fh.write(out.getvalue())
        log(f"profiles written to {args.profile}/")
    return finish(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
