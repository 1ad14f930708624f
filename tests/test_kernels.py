"""The fused kernels (engine.ext: adamw_, l2norm, scale_) and the clipping built on them, against torch, on every
kernel path; how the kernels are built and found; and the CUDA sources compiling with nvcc."""
import os
import runpy
import shutil
import subprocess
import warnings

import pytest
import torch
from kernel_paths import NO_GPU, PATHS, resolve

from engine import ext
from engine.optim import clip_coefficient, clip_grad_norm_, global_grad_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0,), (1,), (5,), (31,), (3, 5, 7), (70001,), (1000,)]


@pytest.fixture(params=PATHS)
def path(request):
    return resolve(request.param)


def tensors(device, dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]


# ---- L2 norm and scale -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_l2norm_matches_torch(path, dtype):
    device, ops = path
    ts = tensors(device, dtype)
    total, per_tensor = ops.l2norm(ts)
    expected = torch.stack([torch.linalg.vector_norm(t.double()) for t in ts])
    assert total.dtype == per_tensor.dtype == torch.float32 and per_tensor.shape == (len(ts),)
    torch.testing.assert_close(per_tensor.cpu().double(), expected.cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(total.cpu().double(), torch.linalg.vector_norm(expected).cpu(), rtol=1e-5, atol=0)


def test_l2norm_of_nothing_is_zero(path):
    device, ops = path
    total, per_tensor = ops.l2norm([])
    assert float(total) == 0.0 and per_tensor.numel() == 0
    total, per_tensor = ops.l2norm([torch.zeros(0, device=device)])
    assert float(total) == 0.0 and per_tensor.tolist() == [0.0]


@pytest.mark.parametrize("bad,expected", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_l2norm_propagates_non_finite_values(path, bad, expected):
    device, ops = path
    ts = tensors(device)
    ts[5][12345] = bad
    total, per_tensor = ops.l2norm(ts)
    check = torch.isnan if expected == "nan" else torch.isinf
    assert bool(check(total)) and bool(check(per_tensor[5]))
    assert bool(torch.isfinite(per_tensor[:5]).all()) and bool(torch.isfinite(per_tensor[6:]).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_scale_matches_multiplying(path, dtype, as_tensor):
    device, ops = path
    ts = tensors(device, dtype)
    expected = [(t.float() * 0.3).to(dtype) for t in ts]
    ops.scale_(ts, torch.tensor(0.3) if as_tensor else 0.3)
    assert all(torch.equal(t, e) for t, e in zip(ts, expected))


# ---- AdamW, every dtype combination, against the plain foreach reference -----------------------------------

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def adam_case(device, param_dtype, grad_dtype, master):
    params = tensors(device, param_dtype)
    grads = tensors(device, grad_dtype, seed=1)
    m, v = [torch.zeros(p.shape, device=device) for p in params], [torch.zeros(p.shape, device=device) for p in params]
    masters = [p.float() for p in params] if master else []
    return params, grads, m, v, masters


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("grads_fp32", [False, True])
@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_adamw_kernel_matches_reference(path, param_dtype, grads_fp32, adam_w_mode):
    device, ops = path
    master = param_dtype != torch.float32
    grad_dtype = torch.float32 if grads_fp32 else param_dtype
    ours = adam_case(device, param_dtype, grad_dtype, master)
    ref = adam_case(device, param_dtype, grad_dtype, master)
    for step in (1, 2, 3):
        ops.adamw_(*ours, **HYPER, step=step, adam_w_mode=adam_w_mode, grad_scale=0.5)
        ext.TorchOps().adamw_(*ref, **HYPER, step=step, adam_w_mode=adam_w_mode, grad_scale=0.5)
    (p, _, m, v, w), (rp, _, rm, rv, rw) = ours, ref
    for got, want in zip(m + v + w, rm + rv + rw):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want, master_value in zip(p, rp, w or p):
        assert torch.equal(got, master_value.to(param_dtype))  # the param is its master, rounded
        torch.testing.assert_close(got, want)


def test_adamw_kernel_low_precision_without_masters(path):
    """bf16 params updated in place (no masters): computed in fp32, rounded to bf16 on store."""
    device, ops = path
    params, grads, m, v, _ = adam_case(device, torch.bfloat16, torch.bfloat16, master=False)
    ref, ref_m, ref_v = [p.float() for p in params], [t.clone() for t in m], [t.clone() for t in v]
    ext.TorchOps().adamw_(ref, [g.float() for g in grads], ref_m, ref_v, [], **HYPER, step=1)
    ops.adamw_(params, grads, m, v, [], **HYPER, step=1)
    for got, want in zip(params, ref):
        torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=0)  # bf16's rounding


def test_adamw_kernel_found_inf_and_scale_tensor(path):
    device, ops = path
    case = adam_case(device, torch.float32, torch.float32, False)
    before = [t.clone() for t in case[0] + case[2] + case[3]]
    ops.adamw_(*case, **HYPER, step=1, found_inf=torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(case[0] + case[2] + case[3], before))
    ref = adam_case(device, torch.float32, torch.float32, False)
    ops.adamw_(*case, **HYPER, step=1, grad_scale=torch.tensor(0.25), found_inf=torch.tensor(0.0))
    ops.adamw_(ref[0], [g * 0.25 for g in ref[1]], *ref[2:], **HYPER, step=1)
    assert all(torch.equal(a, b) for a, b in zip(case[0], ref[0]))


# ---- clipping ------------------------------------------------------------------------------------------------

def with_grads(device, dtype=torch.float32, scale=1.0):
    params = [torch.nn.Parameter(t) for t in tensors(device, dtype)]
    for p, g in zip(params, tensors(device, dtype, seed=3)):
        p.grad = g * scale
    return params


@pytest.mark.parametrize("max_norm", [1.0, 1e6])
def test_clip_grad_norm_matches_torch(path, max_norm, monkeypatch):
    device, ops = path
    monkeypatch.setattr(ext, "ops_for", lambda _device: ops)
    ours, theirs = with_grads(device), with_grads(device)
    before = [p.grad.clone() for p in ours]
    norm = clip_grad_norm_(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, foreach=True)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    for p, q, b in zip(ours, theirs, before):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        if max_norm > 1e3:  # coefficient >= 1: the gradients are not touched at all
            assert torch.equal(p.grad, b)


def test_clip_leaves_non_finite_gradients_alone(path, monkeypatch):
    device, ops = path
    monkeypatch.setattr(ext, "ops_for", lambda _device: ops)
    params = with_grads(device)
    params[4].grad[0, 0, 0] = float("nan")
    before = [p.grad.clone() for p in params]
    assert torch.isnan(clip_grad_norm_(params, 1.0))
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)


def test_global_grad_norm_takes_params_or_grads_of_mixed_dtypes(path):
    device, ops = path
    params = with_grads(device) + with_grads(device, torch.bfloat16)
    grads = [p.grad for p in params]
    expected = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads]))
    torch.testing.assert_close(global_grad_norm(params, ops=ops), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(global_grad_norm(grads, ops=ops), expected, rtol=1e-5, atol=0)
    assert clip_coefficient(expected, 1.0) == pytest.approx(1.0 / (float(expected) + 1e-6))
    assert clip_coefficient(expected, 1e9) == 1.0 and clip_coefficient(float("inf"), 1.0) == 1.0


def _two_rank_norm(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grads = [torch.full((10,), float(rank + 1))]  # rank 0: ten 1s, rank 1: ten 2s
    norm = float(global_grad_norm(grads, group=dist.group.WORLD))
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as fh:
        fh.write(repr(norm))


def test_global_grad_norm_all_reduces_over_the_group(tmp_path):
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")  # no re-import of torch: a second instead of several
    procs = [ctx.Process(target=_two_rank_norm, args=(rank, port, str(tmp_path))) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    norms = [float((tmp_path / f"rank{rank}").read_text()) for rank in (0, 1)]
    assert norms[0] == norms[1] == pytest.approx((10 * 1 + 10 * 4) ** 0.5, rel=1e-6)


# ---- building and finding the kernels -----------------------------------------------------------------------

def test_compiled_kernels_in_use():
    """After `pip install --no-build-isolation -e .` (or a JIT build) the CPU kernels are compiled, not the
    fallback; with a GPU, the CUDA ones too."""
    backends = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for backend in backends:
        path = ext.LOADER.path(backend)
        assert path.kind in ("prebuilt", "jit"), f"{backend} kernels fell back: {path.why}"
    assert ext.LOADER.path("cpu").ops.module.isa() == ext.cpu_isa()


def test_fallback_warns_once_and_says_why():
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    def broken(backend):
        raise RuntimeError("Error building extension 'engine_fused_cpu'")

    loader = ext.KernelLoader(import_module=missing, build=broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = loader.ops("cpu")
        loader.ops("cpu")
    assert isinstance(ops, ext.TorchOps) and len(caught) == 1
    message = str(caught[0].message)
    assert "No module named 'engine._fused_cpu'" in message and "JIT build failed" in message
    assert all("fallback" in line for line in ext.report(loader)[1:4])


@pytest.mark.filterwarnings("ignore:'engine.ext' found in sys.modules")  # runpy re-runs the imported module
def test_python_m_engine_ext_reports_every_kernel(capsys):
    with pytest.raises(SystemExit) as done:
        runpy.run_module("engine.ext", run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 0
    for kernel in ext.KERNELS:
        assert any(line.split()[:2] == [kernel, "cpu"] and "CPU" in line for line in out.splitlines()), out
        assert any(line.split()[:2] == [kernel, "cuda:"] for line in out.splitlines()), out


def nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") or (os.path.join(home, "bin", "nvcc") if os.path.exists(os.path.join(home, "bin", "nvcc")) else None)


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_every_cu_file_compiles_for_sm80_and_sm90(tmp_path):
    sources = sorted(f for f in os.listdir(os.path.join(ext.CSRC, "cuda")) if f.endswith(".cu"))
    assert sources
    arch = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    jobs = {f: subprocess.Popen([nvcc(), "-c", "-std=c++17", "-O3", *arch, os.path.join(ext.CSRC, "cuda", f),
                                 "-o", str(tmp_path / f"{f}.o")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for f in sources}
    for f, job in jobs.items():
        out, _ = job.communicate()
        assert job.returncode == 0, f"{f}:\n{out}"


def cxx():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.mark.skipif(cxx() is None, reason="no C++ compiler")
def test_cuda_launch_plan_covers_every_chunk_once(tmp_path):
    """The host half of the CUDA multi-tensor apply (csrc/cuda/launch_plan.h), checked without a GPU: limits per
    launch, tensors carried over between launches, empty tensors, over 2^31 elements."""
    exe = tmp_path / "launch_plan_test"
    source = os.path.join(ext.CSRC, "cuda", "launch_plan_test.cpp")
    subprocess.run([cxx(), "-std=c++17", "-O1", source, "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout


# ---- CUDA only: launch boundaries and 64-bit sizes ----------------------------------------------------------

@NO_GPU
def test_cuda_kernels_cross_launch_and_chunk_boundaries():
    """40 tensors (> 36 per launch) of 10 chunks and one element (400 blocks > 320 per launch), an empty one."""
    _, ops = resolve(("cuda", "compiled"))
    shapes = [(65536 * 10 + 1,)] * 40 + [(0,), (65536,)]
    params, grads = tensors("cuda", shapes=shapes), tensors("cuda", shapes=shapes, seed=1)
    ref_p = [p.clone() for p in params]
    state = lambda: ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])  # noqa: E731
    ops.adamw_(params, grads, *state(), [], **HYPER, step=1)
    ext.TorchOps().adamw_(ref_p, grads, *state(), [], **HYPER, step=1)
    for p, q in zip(params, ref_p):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    total, per_tensor = ops.l2norm(grads)
    expected = torch.stack([g.double().norm() for g in grads])
    torch.testing.assert_close(per_tensor.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(total.double(), expected.norm(), rtol=1e-5, atol=0)


@NO_GPU
def test_cuda_kernels_on_a_tensor_over_2_31_elements():
    n = 2 ** 31 + 4099
    if torch.cuda.mem_get_info()[0] < 40 * 2 ** 30:
        pytest.skip("needs 40 GiB of free GPU memory")
    _, ops = resolve(("cuda", "compiled"))
    x = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    total, _ = ops.l2norm([x])
    assert float(total) == pytest.approx(n ** 0.5, rel=1e-6)
    ops.scale_([x], 2.0)
    assert int((x != 2).sum()) == 0
    g = torch.full((n,), 0.5, device="cuda", dtype=torch.bfloat16)
    m, v = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
    ops.adamw_([x], [g], [m], [v], [], **HYPER, step=1)
    small = [torch.full((8,), 2.0, device="cuda", dtype=torch.bfloat16)]
    ext.TorchOps().adamw_(small, [g[:8]], [torch.zeros(8, device="cuda")], [torch.zeros(8, device="cuda")], [],
                          **HYPER, step=1)
    assert int((x != small[0][0]).sum()) == 0 and float(m[-1]) == pytest.approx(0.05)
