"""--fused-elementwise: the elementwise ops (engine.ext: the CUDA kernels of csrc/cuda/elementwise.cu, and their
torch reference) and the autograd functions over them (engine/models/fused.py) against the plain code of
engine/models/llama.py, forward and backward, fp32/bf16/fp16; the whole model with and without them. The CUDA
cases run where a GPU is visible (bash benchmarks/gpu_check.sh runs them); the kernels compile with nvcc in
tests/test_kernels.py."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine import ext
from engine.models import fused
from engine.models.llama import Llama, Parallelism, RMSNorm, apply_rope, preset
from engine.training import ConfigError, parse_config, validate

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible (CUDA kernel tests)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = [pytest.param(device, name, id=f"{device}-{name}", marks=[NO_GPU] if device == "cuda" else [])
         for device in ("cpu", "cuda") for name in DTYPES]


def ops_for(device):
    ops = ext.elementwise_ops(device)
    if device == "cuda":  # the kernels, not the reference: a GPU host without them fails here (see test_kernels)
        assert isinstance(ops, ext.CompiledOps), ext.LOADER.path("cuda").why
    return ops


def assert_close(got, want, dtype, exact=False):
    """Within a few units in the last place, relative to each element and to the tensor's largest value (a sum
    taken in another order can round the other way; SiLU's derivative cancels near gate = -1.28, where the last bits
    of exp show). exact: bitwise."""
    if exact:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    scale = ulp * (64 if dtype == torch.float32 else 1)
    torch.testing.assert_close(got.float(), want.float(), rtol=scale, atol=scale * want.float().abs().max().item())


def plain_and_grads(fn, inputs, dy):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, dy)


# rows > the kernel's 512 weight-gradient partials (several rows each), 100 features (no 16-byte vector tail)
@pytest.mark.parametrize("device,name", CASES)
def test_rms_norm(device, name):
    dtype, ops = DTYPES[name], ops_for(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1100, 100, generator=g).to(device, dtype)
    norm = RMSNorm(100, 1e-5).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(100, generator=g))
    dy = torch.randn(1100, 100, generator=g).to(device, dtype)
    want, (want_dx, want_dw) = plain_and_grads(lambda x, w: RMSNorm.forward(_with_weight(norm, w), x),
                                               [x, norm.weight], dy)
    y, rstd = ops.rms_norm(x, norm.weight.detach(), 1e-5)
    assert rstd.dtype == torch.float32 and rstd.shape == (1100,)
    assert_close(y, want, dtype)
    dx, dw = ops.rms_norm_backward(dy, x, norm.weight.detach(), rstd)
    assert_close(dx, want_dx, dtype)
    assert_close(dw, want_dw, dtype)
    got, (got_dx, got_dw) = plain_and_grads(lambda x, w: fused.rms_norm(x, w, 1e-5), [x, norm.weight], dy)
    assert_close(got, want, dtype)
    assert_close(got_dx, want_dx, dtype)
    assert_close(got_dw, want_dw, dtype)


def _with_weight(norm, weight):
    clone = RMSNorm(weight.shape[0], norm.eps)
    del clone.weight
    clone.weight = weight
    return clone


@pytest.mark.parametrize("device,name", CASES)
def test_rope_is_the_plain_rotation_bit_for_bit(device, name):
    """Products and sums rounded where the plain code rounds: equal bits, forward and backward, on a transposed
    view as the attention passes it ([b, s, heads, d] memory)."""
    dtype, ops = DTYPES[name], ops_for(device)
    g = torch.Generator().manual_seed(1)
    b, s, heads, d = 2, 33, 3, 12
    x = torch.randn(b, s, heads, d, generator=g).to(device, dtype).transpose(1, 2)
    angles = torch.randn(s, d // 2, generator=g)
    cos, sin = (f(torch.cat([angles, angles], -1)).to(device, dtype) for f in (torch.cos, torch.sin))
    dy = torch.randn(b, heads, s, d, generator=g).to(device, dtype)
    want, (want_dx,) = plain_and_grads(lambda x: apply_rope(x, cos, sin), [x], dy)
    got = ops.rope(x, cos, sin)
    assert got.stride() == x.stride()  # the input's memory layout, as the plain code keeps it
    assert_close(got, want, dtype, exact=True)
    assert_close(ops.rope(dy, cos, sin, backward=True), want_dx, dtype, exact=True)
    got, (got_dx,) = plain_and_grads(lambda x: fused.rope(x, cos, sin), [x], dy)
    assert_close(got, want, dtype, exact=True)
    assert_close(got_dx, want_dx, dtype, exact=True)


# more than one kernel block (65,536 elements) and a size that is no multiple of the 4-element vectors
@pytest.mark.parametrize("device,name", CASES)
@pytest.mark.parametrize("shape", [(3, 50, 700), (7, 13)])
def test_swiglu(device, name, shape):
    dtype, ops = DTYPES[name], ops_for(device)
    g = torch.Generator().manual_seed(2)
    gate, up, dy = (3 * torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    plain = lambda gate, up: F.silu(gate) * up  # noqa: E731 - llama.MLP's activation
    want, (want_dgate, want_dup) = plain_and_grads(plain, [gate, up], dy)
    exact = device == "cpu"  # the reference calls the plain code's own SiLU; CUDA's exp may differ in its last bit
    assert_close(ops.swiglu(gate, up), want, dtype, exact)
    dgate, dup = ops.swiglu_backward(dy, gate, up)
    assert_close(dgate, want_dgate, dtype)  # the derivative in other ops than ATen's vectorised silu_backward
    assert_close(dup, want_dup, dtype, exact)
    got, (got_dgate, got_dup) = plain_and_grads(fused.swiglu, [gate, up], dy)
    assert_close(got, want, dtype, exact)
    assert_close(got_dgate, want_dgate, dtype)
    assert_close(got_dup, want_dup, dtype, exact)


@pytest.mark.parametrize("device,name", CASES)
def test_model_with_fused_elementwise_matches_plain(device, name):
    """The tiny model with the fused functions gives the plain model's loss and gradients (to rounding: on CPU in
    bf16 they were the same bits with torch 2.13)."""
    dtype = DTYPES[name]
    cfg = dataclasses.replace(preset("tiny"), seq_length=32)
    torch.manual_seed(0)
    plain = Llama(cfg).to(device, dtype)
    with_fused = Llama(cfg, parallelism=Parallelism(fused_elementwise=True)).to(device, dtype)
    with_fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 32), device=device)
    results = []
    for model in (plain, with_fused):
        loss = model(ids, labels=ids)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (want, want_grads), (got, got_grads) = results
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tolerance, atol=0)
    for got_grad, want_grad in zip(got_grads, want_grads):  # relative to the tensor's largest gradient
        atol = tolerance * want_grad.float().abs().max().item()
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=0, atol=atol)


def test_not_with_compile():
    cfg = parse_config(["--fused-elementwise", "--compile", "--device", "cpu"])
    with pytest.raises(ConfigError, match="--fused-elementwise: not with --compile"):
        validate(cfg, 1)


def test_report_names_the_path_of_each_elementwise_kernel():
    lines = ext.report()
    for kernel in ext.ELEMENTWISE:
        cpu = next(line for line in lines if line.split()[:2] == [kernel, "cpu"])
        assert "[reference] the elementwise kernels are CUDA only" in cpu
        assert any(line.split()[:2] == [kernel, "cuda:"] for line in lines)
