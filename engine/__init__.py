"""engine: a Megatron-style model-parallel training engine for LLaMA-family models."""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(ckpt_dir: str, device: str = "cpu", dtype=None):
    """The full (unsharded) model from a checkpoint directory (or one of its step_* directories), whatever
    layout saved it, in eval mode on `device` with parameters of `dtype` [torch.float32]; `model(input_ids)`
    returns logits [batch, seq, vocab]."""
    from engine.training.checkpoint import load_full_model
    return load_full_model(ckpt_dir, device, dtype)


__all__ = ["load_model", "__version__"]
