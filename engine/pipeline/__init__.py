"""Pipeline parallelism: schedules as data, the executor, point-to-point communication."""
from .pipeline import Pipeline

__all__ = ["Pipeline"]
