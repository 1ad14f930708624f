"""Installs the `engine` package.

Compiled kernels (csrc/) are added through `extensions()`: it returns the extension modules to build against
the torch that is already installed (so install with --no-build-isolation, as the README does).
"""
import importlib.util
import os
import sys

import setuptools
from setuptools import find_packages, setup


def check_build_tools() -> None:
    """--no-build-isolation builds with this environment's setuptools: an editable wheel needs setuptools >= 70.1
    or the wheel package (an older one fails with "invalid command 'bdist_wheel'", which does not say why)."""
    version = tuple(int(x) for x in setuptools.__version__.split(".")[:2] if x.isdigit())
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        sys.exit(f"engine: building needs setuptools>=70.1 or the wheel package (this environment has setuptools "
                 f"{setuptools.__version__} and no wheel): pip install -U setuptools wheel")


def extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for csrc/: the CPU kernels always, the CUDA kernels when torch has CUDA and the CUDA
    toolkit (CUDA_HOME) is there. Sources and flags come from engine/ext.py's `build_spec`, which its JIT path uses
    too; it is loaded by path so that building does not import the package."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print("engine: torch is not installed, so the fused kernels are not built; install torch first and use "
              "pip install --no-build-isolation")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("engine_ext_build", os.path.join(here, "engine", "ext.py"))
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    modules = [cpp_extension.CppExtension("engine._fused_cpu", **ext.build_spec("cpu", root="csrc"))]
    cuda_home = cpp_extension.CUDA_HOME if ext.torch.version.cuda else None
    if cuda_home and not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        print(f"engine: CUDA_HOME={cuda_home} has no include/cuda_runtime.h, so the CUDA kernels are not built (they "
              "JIT-build on first use if they can); set CUDA_HOME to the toolkit's root, e.g. /usr/local/cuda")
        cuda_home = None
    if cuda_home:
        if not ext.torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # torch reads the architectures off the visible GPUs and fails with an IndexError when there are none
            # (a build node, a docker build): compile for A100 and H100/H200, plus PTX that newer GPUs can JIT.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
            print("engine: no GPU visible, so the CUDA kernels are built for TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX; set "
                  "TORCH_CUDA_ARCH_LIST to choose others")
        modules.append(cpp_extension.CUDAExtension("engine._fused_cuda", **ext.build_spec("cuda", root="csrc")))
    return modules, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


check_build_tools()
ext_modules, cmdclass = extensions()

setup(
    name="engine",
    version="0.1.0",
    description="A Megatron-style model-parallel training engine for LLaMA-family models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["engine", "engine.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "pybind11", "ninja", "tqdm",
                      "tomli; python_version < '3.11'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "transformers", "safetensors", "tokenizers", "matplotlib",
                 "tensorboard", "pyarrow", "zstandard"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "hf": ["transformers", "tokenizers"],
        "parquet": ["pyarrow"],
        "zstd": ["zstandard"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
