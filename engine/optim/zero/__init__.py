"""ZeRO over data parallelism, in four pieces: the flat layout (layout.py), gradient synchronisation (grads.py),
parameter gathering (gather.py) and the optimizer that composes them (optimizer.py)."""
from engine.optim.zero.optimizer import ZeroOptimizer, default_units

__all__ = ["ZeroOptimizer", "default_units"]
