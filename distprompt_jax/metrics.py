"""Scalars a researcher can watch while a sweep runs, as TensorBoard event files (optional).

    metrics = SegmentMetrics(workdir / "tensorboard" / "soft")     # one folder per method: one TensorBoard run
    metrics.write(info.segment, segment_scalars(info))    # info: a solve.SegmentInfo
    metrics.close()
    # then: tensorboard --logdir <workdir>/tensorboard

Written with tensorboardX (numpy and protobuf only; no TensorFlow): `pip install distprompt_jax[tensorboard]`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Mapping

import numpy as np

INSTALL = "pip install 'distprompt_jax[tensorboard]'"


def available() -> bool:
    """Whether tensorboardX can be imported (checked before a run claims its workdir)."""
    return importlib.util.find_spec("tensorboardX") is not None


class SegmentMetrics:
    """A TensorBoard event-file writer for per-segment scalars in `logdir` (created if needed).

    Writing to a folder that already holds event files adds a new file beside them (a resumed run); give
    steps that continue the earlier ones. Usable as a context manager.
    """

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 30):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            raise ImportError(f"TensorBoard metrics need tensorboardX: {INSTALL}") from err
        self.logdir = os.fspath(logdir)
        # tensorboardX names files by the second and host alone: a writer opened in the same second (a quick
        # resume) would replace the earlier file. Nanoseconds keep them apart and in the order written.
        self._writer = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs,
                                     filename_suffix=f".{time.time_ns()}.{os.getpid()}")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record each `name: value` of `scalars` at `step` (an int ≥ 0; names may group with '/')."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        for name, value in scalars.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"scalar names must be non-empty strings, got {name!r}")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"scalar {name!r} must be a number, got {value!r}") from None
            self._writer.add_scalar(name, value, global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> SegmentMetrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def segment_scalars(info) -> dict[str, float]:
    """The scalars of one segment of a pool (a `solve.SegmentInfo`): the running targets' best KL so far,
    how many run and have finished, the pool's size (smaller once a tail is compacted), and useful vs
    computed target·steps per second (their ratio is the share of the pool's work that went to targets
    still running)."""
    seconds = info.seconds
    return {
        "kl/mean_best": info.mean_best,
        "kl/median_best": info.median_best,
        "targets/active": float(info.active),
        "targets/finished": float(info.finished),
        "targets/slots": float(info.slots),
        "speed/useful_target_steps_per_second": info.target_steps / seconds if seconds > 0 else math.nan,
        "speed/computed_target_steps_per_second": info.slot_steps / seconds if seconds > 0 else math.nan,
    }
