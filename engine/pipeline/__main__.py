"""Draws a pipeline schedule's per-rank timeline and reports its bubble and activation peak.

    python -m engine.pipeline --schedule 1f1b --pp 4 --microbatches 8
    python -m engine.pipeline --schedule interleaved --pp 4 --microbatches 8 --vpp 2 --json
"""
from __future__ import annotations

import argparse
import json
import sys

from .schedules import ScheduleError
from .simulate import draw, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved"], default="1f1b")
    parser.add_argument("--pp", type=int, required=True, help="pipeline-parallel size")
    parser.add_argument("--microbatches", type=int, required=True, help="micro-batches per step")
    parser.add_argument("--vpp", type=int, default=1, help="model chunks per rank (interleaved) [1]")
    parser.add_argument("--json", action="store_true", help="print bubble_fraction and peak_inflight as JSON")
    args = parser.parse_args(argv)
    try:
        timeline = run(args.schedule, args.pp, args.microbatches, args.vpp)
    except ScheduleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"bubble_fraction": timeline.bubble_fraction, "peak_inflight": timeline.peak_inflight,
                          "makespan": timeline.makespan}))
        return 0
    print(draw(timeline, args.vpp))
    print(f"\nschedule {args.schedule}, pp {args.pp}, micro-batches {args.microbatches}, vpp {args.vpp}")
    print("cost model: forward 1, backward 2 per micro-batch through the whole model (1/vpp, 2/vpp per chunk)")
    print(f"bubble fraction: {timeline.bubble_fraction:.4f}")
    print("peak micro-batch activations held per rank: " + ", ".join(map(str, timeline.peak_inflight)) +
          (" (micro-batch x chunk units)" if args.vpp > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
