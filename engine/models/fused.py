"""The layer's elementwise work through fused kernels (`--fused-elementwise`): RMSNorm, rotary embedding and
SwiGLU as autograd functions over `engine.ext.elementwise_ops` - the CUDA kernels of csrc/cuda/elementwise.cu on a
GPU, the same operations in torch elsewhere (so the CPU runs, tests and measures these functions too).

Besides fewer kernel launches and passes over memory, each keeps less for backward than the plain code's autograd
graph: RMSNorm its input and 1/rms (not an fp32 copy of the input and the normalised x), SwiGLU its two inputs (not
SiLU(gate) as well), the rotary embedding nothing but the tables every layer shares.
"""
from __future__ import annotations

import torch

from engine import ext


def _ops(t: torch.Tensor):
    return ext.elementwise_ops(t.device)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        y, rstd = _ops(x).rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = _ops(x).rms_norm_backward(dy.contiguous(), x, weight, rstd)
        return dx, dweight, None


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _ops(x).rope(x if x.stride(-1) == 1 else x.contiguous(), cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _ops(dy).rope(dy if dy.stride(-1) == 1 else dy.contiguous(), cos, sin, backward=True), None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _ops(gate).swiglu(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _ops(gate).swiglu_backward(dy.contiguous(), gate, up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.RMSNorm's forward (x and weight of one dtype)."""
    return _RMSNorm.apply(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.apply_rope for x [b, heads, s, d] and tables [s, d] of x's dtype."""
    return _Rope.apply(x, cos.contiguous(), sin.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return _SwiGLU.apply(gate, up)
