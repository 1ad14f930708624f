"""The kernel paths that the kernel and optimizer tests hold against torch: the compiled kernels and the torch
fallback, on CPU and, where a GPU is visible, on CUDA (tests/test_kernels.py, tests/test_fused_adamw.py)."""
import pytest
import torch

from engine import ext

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible (CUDA runtime tests)")
PATHS = [pytest.param((device, kind), id=f"{device}-{kind}", marks=[NO_GPU] if device == "cuda" else [])
         for device in ("cpu", "cuda") for kind in ("compiled", "fallback")]


def resolve(param) -> tuple[str, object]:
    """(device, ops) of a PATHS entry; the compiled path is skipped, with the loader's reason, where it is absent
    (test_kernels.py::test_compiled_kernels_in_use fails then)."""
    device, kind = param
    if kind == "fallback":
        return device, ext.TorchOps()
    path = ext.LOADER.path(device)
    if path.kind == "fallback":
        pytest.skip(f"no compiled {device} kernels: {path.why}")
    return device, path.ops
