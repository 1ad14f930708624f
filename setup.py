"""Installs the `engine` package.

Compiled kernels (csrc/) are added through `extensions()`: it returns the extension modules to build against
the torch that is already installed (so install with --no-build-isolation, as the README does).
"""
from setuptools import find_packages, setup


def extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for csrc/. No compiled kernels yet: the pure-PyTorch paths are used."""
    return [], {}


ext_modules, cmdclass = extensions()

setup(
    name="engine",
    version="0.1.0",
    description="A Megatron-style model-parallel training engine for LLaMA-family models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["engine", "engine.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "pybind11", "ninja", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "transformers", "safetensors", "tokenizers", "matplotlib"],
        "plot": ["matplotlib"],
        "hf": ["transformers", "tokenizers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
