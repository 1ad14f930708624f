"""Tokenizers, datasets, the global-batch sampler and batch-size ramp-up."""
