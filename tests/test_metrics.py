"""TensorBoard metrics: real event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distprompt_jax.metrics import SegmentMetrics, segment_scalars


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_scalars_are_written_as_tensorboard_events(tmp_path):
    with SegmentMetrics(tmp_path / "soft") as metrics:
        for step in range(3):
            metrics.write(step, {"kl/mean": 1.0 / (step + 1), "targets/active": np.int64(8 - step)})
    assert list((tmp_path / "soft").glob("events.out.tfevents.*"))
    found = read_scalars(tmp_path / "soft")
    assert found["targets/active"] == [(0, 8.0), (1, 7.0), (2, 6.0)]
    assert [step for step, _ in found["kl/mean"]] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in found["kl/mean"]], [1.0, 0.5, 1 / 3], rtol=1e-7)  # float32 events


def test_a_resumed_run_adds_to_the_same_folder(tmp_path):
    with SegmentMetrics(tmp_path) as metrics:
        metrics.write(0, {"kl/mean": 2.0})
    with SegmentMetrics(tmp_path) as metrics:
        metrics.write(1, {"kl/mean": 1.0})
    assert read_scalars(tmp_path)["kl/mean"] == [(0, 2.0), (1, 1.0)]


def test_bad_steps_and_values_are_refused_by_name(tmp_path):
    with SegmentMetrics(tmp_path) as metrics:
        for step in (-1, 1.5, True):
            with pytest.raises(ValueError, match="step must be a non-negative integer"):
                metrics.write(step, {"kl/mean": 1.0})
        with pytest.raises(ValueError, match="scalar 'kl/mean' must be a number"):
            metrics.write(0, {"kl/mean": "low"})


def test_segment_scalars():
    from distprompt_jax.solve import SegmentInfo

    info = SegmentInfo(segment=3, steps=10, active=5, finished=7, n_targets=20, slots=8, mean_best=1.5,
                       median_best=1.25, target_steps=300, slot_steps=400, seconds=2.0)
    assert segment_scalars(info) == {
        "kl/mean_best": 1.5, "kl/median_best": 1.25, "targets/active": 5.0, "targets/finished": 7.0,
        "targets/slots": 8.0,
        "speed/useful_target_steps_per_second": 150.0, "speed/computed_target_steps_per_second": 200.0,
    }
    assert np.isnan(segment_scalars(dataclasses.replace(info, seconds=0.0))["speed/useful_target_steps_per_second"])
