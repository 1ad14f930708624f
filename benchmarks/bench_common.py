"""What the distributed benchmark scripts (bench_tp, bench_pp, bench_zero) share."""
from __future__ import annotations

import json

import torch.distributed as dist


def finish(result: dict, json_path: str | None, rank: int) -> int:
    """Rank 0 writes `result` to json_path (when given); then every rank leaves the process group. Returns the
    exit status."""
    if json_path and rank == 0:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    dist.barrier()
    dist.destroy_process_group()
    return 0
