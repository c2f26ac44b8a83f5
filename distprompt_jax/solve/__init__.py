"""The batched solver core: many independent per-target problems in one compiled pool (see driver.py)."""

from distprompt_jax.solve.checkpoint import PoolCheckpoint
from distprompt_jax.solve.driver import Driver, DriverOptions, RunStats, SegmentInfo, compiled, with_floors
from distprompt_jax.solve.problem import Patience, Problem, Progress, blown_up, select, track

__all__ = [
    "Driver", "DriverOptions", "Patience", "PoolCheckpoint", "Problem", "Progress", "RunStats", "SegmentInfo",
    "blown_up", "compiled", "select", "track", "with_floors",
]
