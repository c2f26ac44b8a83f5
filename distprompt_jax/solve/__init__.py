"""The batched solver core: many independent per-target problems in one compiled pool (see driver.py)."""

from distprompt_jax.solve.checkpoint import PoolCheckpoint
from distprompt_jax.solve.driver import (
    Driver,
    DriverOptions,
    RunStats,
    SegmentInfo,
    abstract_pool,
    compiled,
    lower_refill,
    lower_segment,
    lower_step,
    with_floors,
)
from distprompt_jax.solve.problem import Patience, Problem, Progress, blown_up, select, track

__all__ = [
    "Driver", "DriverOptions", "Patience", "PoolCheckpoint", "Problem", "Progress", "RunStats", "SegmentInfo",
    "abstract_pool", "blown_up", "compiled", "lower_refill", "lower_segment", "lower_step", "select", "track",
    "with_floors",
]
