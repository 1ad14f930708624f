"""Tensor, sequence and data parallelism: topology, communication mappings, TP layers, vocab-parallel
cross-entropy, named RNG streams and activation recomputation."""
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, RowParallelLinear, TPContext, VocabParallelEmbedding
from .parallelize import parallelize, reduce_sequence_parallel_grads
from .random import RNGTracker
from .topology import Topology

__all__ = ["ColumnParallelLinear", "RNGTracker", "RowParallelLinear", "TPContext", "Topology",
           "VocabParallelEmbedding", "parallelize", "reduce_sequence_parallel_grads", "vocab_parallel_cross_entropy"]
