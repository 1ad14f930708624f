"""benchmarks/bench_elementwise.py: the byte counts, the profiler's busy time, and a CPU smoke run (torch.compile)."""
import json
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_elementwise as bench  # noqa: E402


def test_default_shapes_and_byte_counts():
    args = bench.parse_args(["--device", "cpu", "--dtype", "bf16"])
    assert (args.tokens, args.seq, args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim) == \
        (8192, 2048, 2048, 5632, 32, 4, 64)
    sh = bench.Shapes(64, 32, 16, 24, 4, 2, 8, "bf16")  # b = 2, s = 32
    norm = bench.make_piece("rmsnorm", sh, "cpu", {})
    N = 64 * 16
    assert norm.fwd_bytes == 2 * N * 2 + 16 * 2 + 64 * 4
    assert norm.bwd_bytes == 3 * N * 2 + 2 * 16 * 2 + 64 * 4
    rope = bench.make_piece("rope", sh, "cpu", {})
    assert rope.fwd_bytes == rope.bwd_bytes == 2 * 2 * 32 * (4 + 2) * 8 * 2 + 2 * 32 * 8 * 2
    inp = rope.make_inputs()
    q, k = inp.wrt
    assert q.shape == (2, 4, 32, 8) and k.shape == (2, 2, 32, 8) and not q.is_contiguous()  # the layer's layout
    sw = bench.make_piece("swiglu", sh, "cpu", {})
    assert (sw.fwd_bytes, sw.bwd_bytes) == (3 * 64 * 24 * 2, 5 * 64 * 24 * 2)
    assert sw.bytes_of("fwd+bwd") == sw.fwd_bytes + sw.bwd_bytes
    assert bench.num_sets(100, 1000) == 10 and bench.num_sets(10 ** 9, 1000) == 1 and bench.num_sets(1, 10 ** 9) == 16


def test_device_busy_is_the_union_without_annotations():
    from torch.autograd import DeviceType

    def ev(start, end, device=DeviceType.CUDA, annotation=False, kind="kernel"):
        return types.SimpleNamespace(device_type=device, is_user_annotation=annotation, activity_type=kind,
                                     time_range=types.SimpleNamespace(start=start, end=end))

    events = [ev(0, 10), ev(5, 12, kind="gpu_memcpy"), ev(20, 25, kind="gpu_memset"),
              ev(0, 100, annotation=True, kind="gpu_user_annotation"), ev(30, 90, DeviceType.CPU),
              ev(26, 99, kind="cuda_sync"), ev(40, 99, kind="gpu_user_annotation"), ev(21, 24)]
    assert bench.device_busy(events, DeviceType.CUDA) == (17, 4)


def test_profiled_busy_on_cpu_events():
    """The profiler path the CUDA kernel time takes, on the CPU's own events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    x = torch.randn(256, 256)
    got = bench.profiled_busy(lambda n: [x @ x for _ in range(n)], 2, "cpu", ProfilerActivity.CPU, DeviceType.CPU)
    assert got is not None and got["s"] > 0 and got["kernels"] >= 1
    assert bench.kernel_time(lambda n: None, 2, "cpu") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rel_error(dtype):
    a = torch.tensor([1.0, -2.0, 4.0], dtype=dtype)
    assert bench.rel_error(a, a) == 0
    assert bench.rel_error(a + torch.tensor([0.0, 0.0, 0.5], dtype=dtype), a) == pytest.approx(0.125)
    assert bench.rel_error(torch.tensor([1.0, float("nan"), 4.0]), a) == float("inf")


def test_smoke_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--device", "cpu", "--pieces", "swiglu", "rope", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] and [p["piece"] for p in result["pieces"]] == ["swiglu", "rope"]
    assert [(r["piece"], r["pass"]) for r in result["table"]] == \
        [(p, s) for p in ("swiglu", "rope") for s in ("fwd", "bwd", "fwd+bwd")]
    assert all(p["check"]["ok"] and p["compile_s"] > 0 for p in result["pieces"])
    assert all(set(p["check"]["errors"]) == {"compiled", "fused"} for p in result["pieces"])
    assert all(r["fused_ms"] > 0 and r["fused_ratio"] > 0 for r in result["table"] if r["pass"] != "bwd")
    assert result["fused_path"].startswith("torch reference ops")
    assert "| swiglu | fwd+bwd |" in capsys.readouterr().out


def test_kernel_table_path_with_cpu_profiles(tmp_path, capsys, monkeypatch):
    """The CUDA-only kernel-time table, fed by CPU profiles: every row and column is filled in."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    monkeypatch.setattr(bench, "kernel_time", lambda run, calls, device: bench.profiled_busy(
        run, calls, device, ProfilerActivity.CPU, DeviceType.CPU))
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--device", "cpu", "--pieces", "swiglu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["pass"] for r in result["kernel_table"]] == ["fwd", "bwd", "fwd+bwd"]
    # (the bwd row is the difference of two timings, so on a busy machine its ratio can come out at or below 0)
    measured = [r for r in result["kernel_table"] if r["pass"] != "bwd"]
    assert all(r[f"{side}_kernels"] > 0 and r[f"{side}_wall_over_kernel"] > 0 for r in measured
               for side in bench.SIDES)
    text = capsys.readouterr().out
    assert "GPU kernel time per call" in text and text.count("| swiglu | fwd+bwd |") == 2
