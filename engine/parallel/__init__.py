"""Tensor, sequence and data parallelism: topology, communication mappings, TP layers, vocab-parallel
cross-entropy, named RNG streams and activation recomputation."""
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, RowParallelLinear, TPContext, VocabParallelEmbedding
from .random import RNGTracker
from .topology import Topology

__all__ = ["ColumnParallelLinear", "RNGTracker", "RowParallelLinear", "TPContext", "Topology",
           "VocabParallelEmbedding", "vocab_parallel_cross_entropy"]
