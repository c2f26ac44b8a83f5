"""The solver driver on a small problem of its own (gradient descent on per-target quadratics): refilling,
attempts, determinism, checkpoint/restore, and the accounting the benchmarks read."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distprompt_jax import parallel
from distprompt_jax.solve import Driver, DriverOptions, PoolCheckpoint, Progress, compiled


class QuadraticState(NamedTuple):
    progress: Progress
    x: jax.Array
    start: jax.Array
    attempt: jax.Array


@dataclasses.dataclass(frozen=True)
class Quadratic:
    """Minimize |x − c|² from a random start by gradient steps of size `rate`; a target stops once its
    value is below `tolerance` or after its own step limit (an input), so targets stop at different steps."""

    rate: float = 0.1
    tolerance: float = 1e-4

    def prepare(self, inputs):
        return inputs["center"], inputs["limit"]

    def init(self, params, target, index, attempt, key):
        x = jax.random.normal(key, (3,)) * 4.0
        return QuadraticState(Progress.start(), x, x, attempt)

    def step(self, params, target, s):
        center, limit = target
        value = jnp.sum((s.x - center) ** 2) * params["scale"]
        steps = s.progress.steps + 1
        best = jnp.minimum(s.progress.best, value)
        active = (value > self.tolerance) & (steps < limit)
        return s._replace(progress=Progress(steps, best, active), x=s.x - self.rate * 2 * (s.x - center))

    def report(self, params, target, s):
        return {"best": s.progress.best, "steps": s.progress.steps, "start": s.start, "x": s.x, "attempt": s.attempt}


class TrailState(NamedTuple):
    progress: Progress
    x: jax.Array
    start: jax.Array
    attempt: jax.Array
    trail: jax.Array


@dataclasses.dataclass(frozen=True)
class QuadraticWithTrail(Quadratic):
    """The same search with one more state field: another version of the problem, as a checkpoint sees it."""

    def init(self, params, target, index, attempt, key):
        return TrailState(*super().init(params, target, index, attempt, key), trail=jnp.zeros(2))


def inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"center": rng.normal(size=(n, 3)).astype(np.float32),
            "limit": rng.integers(3, 60, size=n).astype(np.int32)}


PARAMS = {"scale": jnp.float32(1.0)}


def run(n=11, slots=4, devices=None, checkpoint=None, on_segment=None, floors=None, problem=Quadratic(), **options):
    mesh = parallel.local_mesh(devices)
    driver = Driver(problem, jax.device_put(PARAMS, parallel.replicated(mesh)),
                    DriverOptions(slots=slots, progress=False, **options), mesh)
    return driver, driver.run(inputs(n), checkpoint=checkpoint, on_segment=on_segment, floors=floors)


def test_every_target_runs_to_its_own_end_and_refilling_wastes_little():
    driver, out = run(n=11, slots=4, segment_steps=5)
    limits = inputs(11)["limit"]
    assert np.all(out["steps"] <= limits) and np.all(out["steps"] >= 1)
    # Computed slot-steps are the useful ones plus at most one segment's rounding per target.
    assert driver.stats.target_steps == out["steps"].sum()
    assert driver.stats.slot_steps - driver.stats.target_steps <= 11 * 5 + 4 * 5


def test_a_segment_ends_early_to_refill_freed_slots():
    fixed, _ = run(n=11, slots=4, segment_steps=20, refill_at=5)  # never early: slots + 1
    early, out = run(n=11, slots=4, segment_steps=20, refill_at=1)
    assert early.stats.target_steps == fixed.stats.target_steps == out["steps"].sum()
    def waste(d):
        return d.stats.slot_steps - d.stats.target_steps

    assert waste(early) < waste(fixed)
    # Refilling at each finish leaves idle only the tail, once no target is left to take a slot.
    assert waste(early) <= 3 * int(inputs(11)["limit"].max())


def test_results_do_not_depend_on_slots_or_devices_for_an_exact_problem():
    _, a = run(slots=4)
    _, b = run(slots=8, devices=jax.devices()[:1])
    _, again = run(slots=4)
    chex.assert_trees_all_close(a, b, rtol=1e-6)
    chex.assert_trees_all_equal(a, again)


def test_attempts_keep_each_targets_best_and_differ_in_their_start():
    _, once = run(attempts=1)
    _, thrice = run(attempts=3)
    assert np.all(thrice["best"] <= once["best"])
    # Attempt 0 is the same in both runs: where the best attempt was the first, the start is the same.
    same = thrice["best"] == once["best"]
    np.testing.assert_array_equal(thrice["start"][same], once["start"][same])
    assert not np.all(same)


def test_further_attempts_run_only_for_targets_above_their_floor():
    n = 11
    at_floor = np.arange(n) % 2 == 0  # a floor above any objective: every best is at it
    driver, out = run(n, attempts=3, retry_above=0.0, floors=np.where(at_floor, 1e6, -1.0))
    once_driver, once = run(n, attempts=1)
    _, thrice = run(n, attempts=3)
    for name in out:
        np.testing.assert_array_equal(out[name][at_floor], once[name][at_floor])
        np.testing.assert_array_equal(out[name][~at_floor], thrice[name][~at_floor])
    assert driver.stats.target_steps > once_driver.stats.target_steps
    assert np.any(thrice["attempt"][~at_floor] > 0)  # the attempt a state started as reaches its report


def test_floors_must_match_the_targets():
    with pytest.raises(ValueError, match="floors has shape"):
        run(5, floors=np.zeros(4))


def test_no_targets():
    _, out = run(n=0)
    assert out["best"].shape == (0,)


def test_options_are_checked():
    with pytest.raises(ValueError, match="slots must be a positive integer"):
        run(slots=0)


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_results(tmp_path):
    # Two attempts: the checkpoint holds retries queued as first attempts ended.
    _, straight = run(n=13, slots=4, segment_steps=3, attempts=2)
    checkpoint = PoolCheckpoint(tmp_path / "pool")
    stopped_at = []

    def stop_once_some_finished(info):  # mid-run: some targets done and their slots refilled
        if info.finished > 0 and info.segment % 2 == 0:
            stopped_at.append(info.segment)
            raise Interrupt

    with pytest.raises(Interrupt):
        run(n=13, slots=4, segment_steps=3, checkpoint=checkpoint, on_segment=stop_once_some_finished,
            checkpoint_every=2, attempts=2)
    assert checkpoint.latest() == stopped_at[0]
    told = []
    driver, resumed = run(n=13, slots=4, segment_steps=3, checkpoint=PoolCheckpoint(tmp_path / "pool"),
                          on_segment=lambda info: told.append(info.segment), checkpoint_every=2, attempts=2)
    assert told[0] == stopped_at[0] + 1  # went on from the checkpoint
    chex.assert_trees_all_equal(straight, resumed)


def interrupted_at(segment: int, directory) -> PoolCheckpoint:
    """A pool of 13 targets in 4 slots, checkpointed every 2 segments and stopped after `segment`."""
    checkpoint = PoolCheckpoint(directory)

    def stop(info):
        if info.segment == segment:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(n=13, slots=4, segment_steps=3, checkpoint=checkpoint, on_segment=stop, checkpoint_every=2)
    return checkpoint


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path):
    checkpoint = interrupted_at(4, tmp_path / "pool")
    assert sorted(checkpoint.manager.all_steps()) == [2, 4]  # the newest two are kept
    for file in (tmp_path / "pool" / "4").rglob("*"):
        if file.is_file() and file.stat().st_size > 0:
            file.write_bytes(b"\0" * 7)
    told = []
    _, straight = run(n=13, slots=4, segment_steps=3)
    with pytest.warns(UserWarning, match="is damaged"):
        _, resumed = run(n=13, slots=4, segment_steps=3, checkpoint=PoolCheckpoint(tmp_path / "pool"),
                         on_segment=lambda info: told.append(info.segment), checkpoint_every=2)
    assert told[0] == 3
    chex.assert_trees_all_equal(straight, resumed)


def test_a_compacted_tail_computes_only_the_running_slots_and_gives_the_same_results():
    sizes = []
    plain, full = run(n=20, slots=16, segment_steps=5, attempts=2, compact_tail=False)
    # On by default on CPU devices (as here).
    compacted, out = run(n=20, slots=16, segment_steps=5, attempts=2,
                         on_segment=lambda info: sizes.append((info.slots, info.active)))
    # Halved (over the 4 test devices: 16 -> 8 -> 4) only once at most half the slots run, never grown.
    assert sizes[0][0] == 16 and sizes[-1][0] == 4 and sizes == sorted(sizes, key=lambda s: -s[0])
    assert all(active <= size for size, active in sizes)
    assert compacted.stats.target_steps == plain.stats.target_steps
    assert compacted.stats.slot_steps < plain.stats.slot_steps
    chex.assert_trees_all_close(out, full, rtol=1e-6)  # an exact problem: moving a state changes nothing


def test_a_run_interrupted_after_compacting_resumes_to_the_same_results(tmp_path):
    options = dict(n=20, slots=16, segment_steps=3, attempts=2, compact_tail=True, checkpoint_every=1)
    _, straight = run(**options)
    checkpoint = PoolCheckpoint(tmp_path / "pool")

    def stop_once_compacted(info):
        if info.slots < 16:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(**options, checkpoint=checkpoint, on_segment=stop_once_compacted)
    sizes = []
    _, resumed = run(**options, checkpoint=PoolCheckpoint(tmp_path / "pool"),
                     on_segment=lambda info: sizes.append(info.slots))
    assert sizes[0] < 16  # the restored pool is the compacted one
    chex.assert_trees_all_equal(straight, resumed)


def test_a_checkpoint_of_another_pool_is_refused(tmp_path):
    interrupted_at(2, tmp_path / "pool")
    with pytest.raises(ValueError, match="another run"):
        run(n=13, slots=8, segment_steps=3, checkpoint=PoolCheckpoint(tmp_path / "pool"))


def test_a_checkpoint_of_another_state_layout_is_refused_and_kept(tmp_path):
    steps = interrupted_at(2, tmp_path / "pool").manager.all_steps()
    with pytest.raises(ValueError, match=r"another layout \(differing: \['\.trail \(2,\) float32'\]"):
        run(n=13, slots=4, segment_steps=3, checkpoint=PoolCheckpoint(tmp_path / "pool"), problem=QuadraticWithTrail())
    assert PoolCheckpoint(tmp_path / "pool").manager.all_steps() == steps  # not taken for damage


def test_equal_problems_share_their_compiled_functions():
    assert compiled(Quadratic()) is compiled(Quadratic())
    assert compiled(Quadratic(rate=0.2)) is not compiled(Quadratic())


def test_on_finished_hears_of_every_target_once_with_its_best_report():
    heard = []
    mesh = parallel.local_mesh()
    driver = Driver(Quadratic(), jax.device_put(PARAMS, parallel.replicated(mesh)),
                    DriverOptions(slots=4, segment_steps=4, progress=False), mesh)
    out = driver.run(inputs(9), on_finished=lambda rows, reports: heard.extend(zip(rows, reports["best"])))
    assert sorted(r for r, _ in heard) == list(range(9))
    for row, best in heard:
        assert best == out["best"][row]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root, as on the development machines and CI); skipped where it cannot mount."""
    import subprocess

    path = tmp_path / "small"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield path
    subprocess.run(["umount", str(path)], capture_output=True)


def test_a_full_disk_is_named_in_one_message(small_disk, capfd):
    checkpoint = PoolCheckpoint(small_disk / "pool")
    incompressible = np.random.default_rng(0).random(2_000_000).astype(np.float32)  # 8 MB
    with pytest.raises(OSError, match="no space left on the disk of .*pool.*rerun the same command"):
        checkpoint.save(1, {"a": incompressible}, {})
    assert "Traceback" not in capfd.readouterr().err


def test_a_ctrl_c_during_a_save_takes_effect_once_the_save_is_complete(tmp_path, monkeypatch):
    """Interrupted mid-save, orbax's writer threads failed at the interpreter's exit with tracebacks under the
    run's own message; the interrupt now waits for the save (the Ctrl-C test in test_faults hit this by chance)."""
    import os
    import signal

    checkpoint = PoolCheckpoint(tmp_path / "pool")
    save = checkpoint.manager.save

    def save_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C, delivered while orbax writes
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint.manager, "save", save_interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(3, {"x": np.arange(4.0)}, {"note": "interrupted"})
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    restored, meta = checkpoint.restore(lambda meta: {"x": np.zeros(4)})
    np.testing.assert_array_equal(restored["x"], np.arange(4.0))
    assert checkpoint.latest() == 3 and meta == {"note": "interrupted"}
