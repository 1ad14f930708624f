from .llama import PRESETS, Llama, ModelConfig, preset

__all__ = ["Llama", "ModelConfig", "PRESETS", "preset"]
