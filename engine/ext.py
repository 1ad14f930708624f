"""The fused kernels of csrc/ (AdamW step, multi-tensor L2 norm, in-place scale; on CUDA also the layer's
elementwise work: RMSNorm, rotary embedding, SwiGLU): how they are built, found and replaced.

For each device type ("cpu", "cuda") the kernels come from, in order:
1. the prebuilt extension (`engine._fused_cpu` / `engine._fused_cuda`) that `pip install --no-build-isolation
   -e .` compiled (setup.py builds it from `build_spec`);
2. a JIT build of csrc/ by `torch.utils.cpp_extension.load` (ninja), done once and cached in torch's extension
   directory;
3. `TorchOps`, the same operations in torch's foreach ops, with one warning saying why the kernels are missing.
The elementwise kernels exist for CUDA only: elsewhere `elementwise_ops` gives TorchOps, whose elementwise methods
compute what the kernels compute (the reference the CUDA tests hold them to).

`python -m engine.ext` prints the path each kernel takes on each device type, and why.
"""
from __future__ import annotations

import importlib
import math
import os
import platform
import warnings
from typing import NamedTuple

import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
KERNELS = ("adamw", "l2norm", "scale")
ELEMENTWISE = ("rms_norm", "rope", "swiglu")  # CUDA only
SOURCES = {"cpu": ["cpu/binding.cpp", "cpu/kernels.cpp"],
           "cuda": ["cuda/binding.cpp", "cuda/adamw.cu", "cuda/norm.cu", "cuda/elementwise.cu"]}
# ATen's capability names and the compiler flags of each (ATen compiles its own kernels with the same ones).
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
             "AVX2": ["-mavx2", "-mfma", "-mf16c"],
             "DEFAULT": []}


def cpu_isa() -> str:
    """The instruction set ATen uses on this CPU, as far as the kernels know it: AVX512, AVX2 or DEFAULT."""
    cap = torch.backends.cpu.get_cpu_capability()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return cap if x86 and cap in ISA_FLAGS else "DEFAULT"


def build_spec(backend: str, root: str = CSRC, isa: str | None = None) -> dict:
    """Sources and flags of one extension: the keyword arguments of CppExtension / CUDAExtension."""
    sources = [os.path.join(root, s) for s in SOURCES[backend]]
    if backend == "cuda":
        return {"sources": sources, "extra_compile_args": {"cxx": ["-O3"], "nvcc": ["-O3"]}}
    isa = isa or cpu_isa()
    defines = [f"-DCPU_CAPABILITY={isa}"] + ([f"-DCPU_CAPABILITY_{isa}"] if isa != "DEFAULT" else [])
    openmp = ["-fopenmp"] if platform.system() == "Linux" else []  # at::parallel_for's OpenMP pragmas
    return {"sources": sources, "extra_compile_args": {"cxx": ["-O3", *openmp, *ISA_FLAGS[isa], *defines]},
            "extra_link_args": openmp}


# ---------------------------------------------------------------------------------------------------------
# The two implementations of one interface: adamw_, l2norm, scale_.

def _scalar(value, device) -> tuple[float, torch.Tensor | None]:
    """(factor, tensor) for the kernels: a Python number, or a one-element fp32 tensor on the device."""
    if value is None:
        return 1.0, None
    if torch.is_tensor(value):
        return 1.0, value.detach().to(device=device, dtype=torch.float32).reshape(())
    return float(value), None


class CompiledOps:
    """The compiled kernels (one extension module) behind the common interface."""

    def __init__(self, module):
        self.module = module

    def adamw_(self, params, grads, exp_avgs, exp_avg_sqs, masters=(), *, lr, beta1, beta2, eps, weight_decay,
               step, adam_w_mode=True, grad_scale=None, found_inf=None):
        if not params:
            return
        device = params[0].device
        scale, scale_tensor = _scalar(grad_scale, device)
        flag = None if found_inf is None else torch.as_tensor(found_inf).to(device, torch.float32).reshape(())
        self.module.adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(masters),
                           float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
                           bool(adam_w_mode), scale, scale_tensor, flag)

    def l2norm(self, tensors):
        return self.module.l2norm(list(tensors))

    @property
    def has_elementwise(self) -> bool:
        return hasattr(self.module, "rms_norm")

    def rms_norm(self, x, weight, eps):
        return self.module.rms_norm(x, weight, float(eps))

    def rms_norm_backward(self, dy, x, weight, rstd):
        return self.module.rms_norm_backward(dy, x, weight, rstd)

    def rope(self, x, cos, sin, backward=False):
        return self.module.rope(x, cos, sin, bool(backward))

    def swiglu(self, gate, up):
        return self.module.swiglu(gate, up)

    def swiglu_backward(self, dy, gate, up):
        return self.module.swiglu_backward(dy, gate, up)

    def scale_(self, tensors, scale):
        if tensors:
            self.module.scale_(list(tensors), *_scalar(scale, tensors[0].device))


class TorchOps:
    """The kernels' operations in torch foreach ops: the fallback, and a plain reference for the tests."""

    def adamw_(self, params, grads, exp_avgs, exp_avg_sqs, masters=(), *, lr, beta1, beta2, eps, weight_decay,
               step, adam_w_mode=True, grad_scale=None, found_inf=None):
        if not params or (found_inf is not None and bool(found_inf)):
            return
        weights = list(masters) or [p if p.dtype == torch.float32 else p.float() for p in params]
        g = [x.float() for x in grads]
        if grad_scale is not None:
            factor, tensor = _scalar(grad_scale, params[0].device)
            g = torch._foreach_mul(g, factor if tensor is None else tensor)
        if adam_w_mode:
            torch._foreach_mul_(weights, 1 - lr * weight_decay)
        elif weight_decay:
            g = torch._foreach_add(g, weights, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** step))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(weights, exp_avgs, denom, -lr / (1 - beta1 ** step))
        for p, w in zip(params, weights):
            if w is not p:
                p.copy_(w)

    def l2norm(self, tensors):
        if not tensors:
            return torch.zeros(()), torch.zeros(0)
        per_tensor = torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))
        return torch.linalg.vector_norm(per_tensor.double()).float(), per_tensor

    def scale_(self, tensors, scale):
        if not tensors:
            return
        factor, tensor = _scalar(scale, tensors[0].device)
        factor = factor if tensor is None else tensor
        if all(t.dtype == torch.float32 for t in tensors):
            torch._foreach_mul_(list(tensors), factor)
        else:  # in fp32, rounded once, as the kernels do: torch's in-place bf16/fp16 foreach rounds the factor too
            torch._foreach_copy_(list(tensors), torch._foreach_mul([t.float() for t in tensors], factor))

    # The elementwise kernels' operations, as csrc/cuda/elementwise.cu computes them: in fp32, rounded to the
    # tensors' dtype where the plain code of engine/models/llama.py rounds (each product of two bf16 tensors).
    has_elementwise = True

    def rms_norm(self, x, weight, eps):
        """(weight * round(x * rstd), rstd): rstd = 1 / sqrt(mean(x^2) + eps) in fp32, one per row ([rows])."""
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * (xf * rstd).to(x.dtype), rstd.reshape(-1)

    def rms_norm_backward(self, dy, x, weight, rstd):
        """(dx, dweight) of rms_norm: dx = rstd * g - x * rstd^3 * mean(g * x), g = round(dy * weight)."""
        xf, r = x.float(), rstd.reshape(*x.shape[:-1], 1)
        g = (dy * weight).float()
        dot = (g * xf).sum(-1, keepdim=True)
        dx = (g * r - xf * (dot * (r * r * r) / x.shape[-1])).to(x.dtype)
        dweight = (dy * (xf * r).to(x.dtype)).float().reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dweight

    def rope(self, x, cos, sin, backward=False):
        """Rotary embedding in the half-split convention (x [b, heads, s, d], tables [s, d]); backward: the
        transposed rotation, which is the gradient of the forward."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
        out = torch.empty_like(x)  # x's memory layout, as the kernel's output (and the plain code's) has
        out[..., :half] = x1 * c1 + x2 * s2 if backward else x1 * c1 - x2 * s1
        out[..., half:] = x2 * c2 - x1 * s1 if backward else x2 * c2 + x1 * s2
        return out

    def swiglu(self, gate, up):
        return torch.nn.functional.silu(gate) * up

    def swiglu_backward(self, dy, gate, up):
        """(dgate, dup) of swiglu, with ATen's SiLU derivative: sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
        g = gate.float()
        sg = torch.sigmoid(g)
        dgate = ((dy * up).float() * sg * (1 + g * (1 - sg))).to(gate.dtype)
        return dgate, dy * torch.nn.functional.silu(gate)


# ---------------------------------------------------------------------------------------------------------
# Finding the kernels.

class KernelPath(NamedTuple):
    backend: str  # "cpu" or "cuda"
    kind: str     # "prebuilt", "jit" or "fallback"
    why: str
    ops: object


def jit_build(backend: str):
    """Compiles csrc/ for `backend` with torch.utils.cpp_extension.load (cached; a no-op once built)."""
    from torch.utils import cpp_extension

    if not os.path.isdir(os.path.join(CSRC, backend)):
        raise RuntimeError(f"the kernel sources are not at {CSRC} (a non-editable install ships none)")
    spec = build_spec(backend)
    name = f"engine_fused_{backend}" + (f"_{cpu_isa().lower()}" if backend == "cpu" else "")
    flags = spec["extra_compile_args"]
    return cpp_extension.load(name=name, sources=spec["sources"], extra_cflags=flags["cxx"],
                              extra_cuda_cflags=flags.get("nvcc"), extra_ldflags=spec.get("extra_link_args"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


class KernelLoader:
    """Finds the kernels of each device type once (see the module docstring) and keeps what it found.
    `import_module` and `build` are importlib.import_module and jit_build, replaceable for tests."""

    def __init__(self, import_module=importlib.import_module, build=None):
        self._paths: dict[str, KernelPath] = {}
        self._import = import_module
        self._build = build or jit_build

    def ops(self, device) -> CompiledOps | TorchOps:
        backend = torch.device(device).type
        if backend not in SOURCES:
            return TorchOps()
        return self.path(backend).ops

    def path(self, backend: str) -> KernelPath:
        if backend not in self._paths:
            self._paths[backend] = self._find(backend)
        return self._paths[backend]

    def _find(self, backend: str) -> KernelPath:
        if backend == "cuda" and not (torch.version.cuda and torch.cuda.is_available()):
            why = "this torch has no CUDA" if not torch.version.cuda else "no GPU is visible"
            return KernelPath(backend, "fallback", why, TorchOps())
        reasons = []
        try:
            module = self._import(f"engine._fused_{backend}")
            unusable = self._unusable(backend, module)
            if not unusable:
                return KernelPath(backend, "prebuilt", f"engine._fused_{backend}{self._detail(module)} "
                                  f"({module.__file__})", CompiledOps(module))
            reasons.append(unusable)
        except ImportError as exc:
            reasons.append(f"no prebuilt engine._fused_{backend} ({_first_line(exc)})")
        try:
            module = self._build(backend)
            return KernelPath(backend, "jit", f"JIT-compiled {module.__name__}{self._detail(module)} "
                              f"({module.__file__})", CompiledOps(module))
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
            reasons.append(f"the JIT build failed ({_first_line(exc)})")
        why = "; ".join(reasons)
        warnings.warn(f"engine: the fused {backend.upper()} kernels are unavailable: {why}. Falling back to "
                      "torch's foreach ops (slower). Build them with `pip install --no-build-isolation -e .`",
                      RuntimeWarning, stacklevel=3)
        return KernelPath(backend, "fallback", why, TorchOps())

    @staticmethod
    def _detail(module) -> str:
        return f", {module.isa()}" if hasattr(module, "isa") else ""

    @staticmethod
    def _unusable(backend: str, module) -> str | None:
        """Why a prebuilt CPU module cannot run here: built for a wider instruction set than this CPU's."""
        if backend != "cpu":
            return None
        order = list(ISA_FLAGS)[::-1]  # DEFAULT, AVX2, AVX512
        built, here = module.isa(), cpu_isa()
        if order.index(built) > order.index(here):
            return f"the prebuilt engine._fused_cpu was built for {built}, this CPU runs {here}"
        return None


LOADER = KernelLoader()
TORCH_OPS = TorchOps()


def ops_for(device) -> CompiledOps | TorchOps:
    """The kernels for tensors on `device` (compiled if possible; see the module docstring)."""
    return LOADER.ops(device)


def elementwise_ops(device) -> CompiledOps | TorchOps:
    """The elementwise kernels for tensors on `device`: the compiled CUDA ones where they exist, else TorchOps."""
    ops = LOADER.ops(device)
    return ops if isinstance(ops, CompiledOps) and ops.has_elementwise else TORCH_OPS


def report(loader: KernelLoader = LOADER) -> list[str]:
    lines = [f"engine fused kernels (torch {torch.__version__}, csrc at {CSRC})"]
    for backend in SOURCES:
        path = loader.path(backend)
        label = {"prebuilt": backend.upper(), "jit": backend.upper(), "fallback": "fallback"}[path.kind]
        kind, why = path.kind, path.why
        for kernel in KERNELS:
            lines.append(f"  {kernel:<8} {backend:<4}: {label:<8} [{kind}] {why}")
        if not (isinstance(path.ops, CompiledOps) and path.ops.has_elementwise):
            label, kind = "torch", "reference"
            why = why if backend == "cuda" else "the elementwise kernels are CUDA only"
        for kernel in ELEMENTWISE:
            lines.append(f"  {kernel:<8} {backend:<4}: {label:<8} [{kind}] {why}")
    return lines


def main() -> int:
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
