"""Entropy-controlled and outlier targets, the target set type, its files and its validation."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from distprompt_jax.parallel import local_mesh
from distprompt_jax.solve import Driver, DriverOptions, Problem
from distprompt_jax.targets import (
    TargetError,
    TargetSet,
    as_target_set,
    entropy_grid,
    entropy_nats,
    load_targets,
    max_entropy_at_mass,
    outlier_mass_bound,
    outlier_targets,
    validate_probs,
    vanilla_targets,
)
from distprompt_jax.targets.batching import RowProblem, default_slots, map_rows, slot_count
from distprompt_jax.targets.entropy import EntropyProblem, EntropySettings

TOL = 1e-4
# Most tests share one vocabulary and outlier count, so the compiled solver is reused between them.
VOCAB = 200
K = 5


def achieved_entropy(probs):
    """Entropy of the returned float32 rows, computed here in float64 (independently of the package)."""
    p = np.asarray(probs, np.float64)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=1)


# --- vanilla targets --------------------------------------------------------------------------------


def test_vanilla_grid_hits_every_entropy_and_both_ends_exactly():
    vocab = VOCAB
    grid = entropy_grid(vocab, step=0.5)
    assert grid[0] == 0 and grid[-1] == np.log(vocab) and np.all(np.diff(grid) > 0)
    targets = vanilla_targets(vocab, grid, seed=3, progress=False)

    assert targets.probs.shape == (len(grid), vocab) and targets.probs.dtype == np.float32
    np.testing.assert_array_less(np.abs(achieved_entropy(targets.probs) - grid), TOL)
    one_hot, uniform = targets.probs[0], targets.probs[-1]
    assert one_hot.max() == 1.0 and np.count_nonzero(one_hot) == 1
    assert np.all(uniform == np.float32(1 / vocab))
    meta = targets.metadata
    assert list(meta.target_id) == list(range(len(grid)))
    assert set(meta.kind) == {"vanilla"}
    np.testing.assert_array_equal(meta.target_entropy, grid)
    np.testing.assert_allclose(meta.entropy, achieved_entropy(targets.probs), atol=1e-12)
    assert list(meta.seed) == list(range(3, 3 + len(grid)))
    assert meta.steps.iloc[0] == meta.steps.iloc[-1] == 0 and (meta.steps.iloc[1:-1] > 0).all()
    assert (meta.optimizer == "adam").all() and (meta.learning_rate == 0.1).all()
    # Rows that Adam matched needed only a float-rounding-sized temperature correction.
    matched = meta.optimizer_matched.to_numpy() & (meta.steps > 0).to_numpy()
    np.testing.assert_allclose(meta.temperature[matched], 1.0, atol=1e-3)


def test_vanilla_near_the_ends_and_with_a_step_limit_still_exact():
    """h near 0 or ln|V| is where Adam crawls; the temperature step must finish those rows exactly."""
    vocab = VOCAB
    top = np.log(vocab)
    h = np.array([1e-5, 1e-3, 0.01, 0.05, 2.0, top - 0.01, top - 1e-3, top - 1e-5])
    targets = vanilla_targets(vocab, h, max_steps=20, progress=False)
    np.testing.assert_array_less(np.abs(achieved_entropy(targets.probs) - h), TOL)
    assert (targets.metadata.steps <= 20).all()
    assert not targets.metadata.optimizer_matched.all()  # the limit stopped some rows before the tolerance


def test_vanilla_full_size_vocabulary():
    vocab = 49152
    h = np.array([3.0, 10.5])
    targets = vanilla_targets(vocab, h, seed=11, progress=False)
    np.testing.assert_array_less(np.abs(achieved_entropy(targets.probs) - h), TOL)
    assert targets.metadata.optimizer_matched.all()


def test_vanilla_depends_only_on_seed_and_entropy():
    vocab = VOCAB
    h = np.linspace(0.2, 5.0, 9)
    seeds = np.arange(100, 109)
    by3 = vanilla_targets(vocab, h, seeds, slots=3, progress=False)
    by8 = vanilla_targets(vocab, h, seeds, slots=8, progress=False)
    reversed_ = vanilla_targets(vocab, h[::-1], seeds[::-1], slots=8, progress=False)
    one_device = vanilla_targets(vocab, h, seeds, slots=4, devices=jax.devices()[:1], progress=False)
    again = vanilla_targets(vocab, h, seeds, slots=3, progress=False)

    np.testing.assert_array_equal(again.probs, by3.probs)  # bitwise for the same slot count
    # Other slot counts compile reductions over different shapes: equal up to float32 rounding.
    for other, order in ((by8, slice(None)), (reversed_, slice(None, None, -1)), (one_device, slice(None))):
        np.testing.assert_allclose(other.probs[order], by3.probs, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(other.metadata.seed.to_numpy()[order], seeds)
    # A target asked for on its own is the same target.
    alone = vanilla_targets(vocab, h[4:5], seed=int(seeds[4]), progress=False)
    np.testing.assert_allclose(alone.probs[0], by3.probs[4], rtol=0, atol=1e-5)
    # Different seeds give different targets.
    assert np.abs(vanilla_targets(vocab, h, seed=0, slots=8, progress=False).probs - by3.probs).max() > 1e-2


def test_vanilla_optimizer_and_learning_rate_are_options_and_recorded():
    h = np.array([1.0, 3.0])
    targets = vanilla_targets(VOCAB, h, optimizer="sgd", learning_rate=20.0, max_steps=300, progress=False)
    np.testing.assert_array_less(np.abs(achieved_entropy(targets.probs) - h), TOL)
    assert (targets.metadata.optimizer == "sgd").all() and (targets.metadata.learning_rate == 20.0).all()
    assert (targets.metadata.max_steps == 300).all()
    adam = vanilla_targets(VOCAB, h, progress=False)
    assert np.abs(adam.probs - targets.probs).max() > 1e-3  # the optimizer shapes the target


@pytest.mark.parametrize("bad, message", [
    ([-0.1], "outside"), ([np.log(VOCAB) + 1e-3], "outside"), ([np.nan], "outside"), ([], "non-empty"),
])
def test_vanilla_refuses_entropies_outside_the_range(bad, message):
    with pytest.raises(ValueError, match=message):
        vanilla_targets(VOCAB, bad, progress=False)


def test_vanilla_refuses_bad_options():
    with pytest.raises(ValueError, match="vocab_size"):
        vanilla_targets(1, [0.0], progress=False)
    with pytest.raises(ValueError, match="not an optax optimizer"):
        vanilla_targets(50, [1.0], optimizer="no_such_optimizer", progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        vanilla_targets(50, [1.0], learning_rate=0.0, progress=False)
    with pytest.raises(ValueError, match="seeds must lie"):
        vanilla_targets(50, [1.0], seed=-1, progress=False)
    with pytest.raises(ValueError, match="sequence of 2"):
        vanilla_targets(50, [1.0, 2.0], seed=[1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="slots"):
        vanilla_targets(50, [1.0], slots=0, progress=False)


# --- generation on the solver driver ---------------------------------------------------------------


def test_default_slots_follow_the_platform_and_small_requests_take_powers_of_two():
    assert default_slots(49152, "cpu") == 16 and default_slots(49152, "gpu") == 1024
    assert default_slots(50, "cpu") == 1024 and default_slots(10**7, "cpu") == 8  # the cap and the floor
    assert slot_count(100, 16, 4) == 16 and slot_count(5, 16, 1) == 8 and slot_count(3, 16, 4) == 4
    assert slot_count(1, 16, 1) == 1 and slot_count(6, 3, 4) == 4  # rounded up to the devices


def test_entropy_rows_depend_on_their_request_not_on_the_drivers_seed():
    problem = EntropyProblem(vocab_size=VOCAB)
    assert isinstance(problem, Problem)
    settings = EntropySettings.of(learning_rate=0.1, alpha=1.0, beta=0.0, tolerance=TOL)
    h = np.linspace(0.5, 5.0, 7)
    inputs = {"h": h.astype(np.float32), "seed": np.arange(7, dtype=np.uint32),
              "attempt": np.zeros(7, np.uint32), "step_limit": np.full(7, 1000, np.int32)}
    # 7 requests in 4 slots: three of them start in slots that others left.
    runs = [Driver(problem, settings, DriverOptions(slots=4, seed=seed, progress=False), local_mesh()).run(inputs)
            for seed in (0, 99)]
    # Several optimizer steps per driver step (what solve_requests runs): a row that stops part-way stays
    # as it stopped, so the same rows come out.
    batched = EntropyProblem(vocab_size=VOCAB, optimizer_steps=7)
    runs.append(Driver(batched, settings, DriverOptions(slots=4, segment_steps=2, progress=False), local_mesh())
                .run(inputs))
    for run in runs[1:]:
        for name in ("z", "steps", "entropy"):
            np.testing.assert_array_equal(run[name], runs[0][name])
    assert (runs[0]["steps"] > 0).all() and (runs[0]["steps"] < 1000).all()
    np.testing.assert_array_less(np.abs(runs[0]["entropy"] - h), TOL)  # each stopped at the tolerance


def affine(shared, row):
    return {"y": row["x"] * shared["scale"] + jnp.sum(row["v"]), "x": row["x"]}


def test_map_rows_computes_every_row_once_and_in_order():
    rng = np.random.default_rng(0)
    inputs = {"x": rng.normal(size=11).astype(np.float32), "v": rng.normal(size=(11, 3)).astype(np.float32)}
    expected = inputs["x"] * 2 + inputs["v"].sum(axis=1)
    for devices in (None, jax.devices()[:1]):
        out = map_rows(affine, inputs, shared={"scale": np.float32(2)}, slots=4, devices=devices, progress=False)
        np.testing.assert_allclose(out["y"], expected, rtol=1e-6)
        np.testing.assert_array_equal(out["x"], inputs["x"])
    # One step per row: 11 rows fill 4 slots three times, each row computed once.
    shared = {"scale": np.float32(2)}
    driver = Driver(RowProblem.of(affine, shared, inputs), shared, DriverOptions(slots=4, progress=False), local_mesh())
    driver.run(inputs)
    assert driver.stats.target_steps == 11


# --- outlier targets --------------------------------------------------------------------------------


def simplex_grid(vocab: int, steps: int) -> np.ndarray:
    """Every distribution over `vocab` tokens with probabilities in multiples of 1/steps."""
    free = np.indices((steps + 1,) * (vocab - 1)).reshape(vocab - 1, -1).T
    free = free[free.sum(axis=1) <= steps]
    return np.column_stack([free, steps - free.sum(axis=1)]) / steps


@pytest.mark.parametrize("vocab, k, steps, atol", [(4, 2, 120, 0.01), (5, 1, 40, 0.03)])
def test_outlier_bound_matches_brute_force(vocab, k, steps, atol):
    grid = simplex_grid(vocab, steps)
    entropy = entropy_nats(grid)
    mass = grid[:, :k].sum(axis=1)
    hs = np.linspace(0.05, np.log(vocab) - 0.01, 12)
    # Brute force: the most mass on k tokens among grid distributions with entropy at least h (lowering
    # entropy at fixed mass is always possible, so this is the most mass at entropy exactly h).
    brute = np.array([mass[entropy >= h].max() for h in hs])
    bound = outlier_mass_bound(hs, k, vocab)
    np.testing.assert_allclose(bound, brute, atol=atol)
    assert np.all(bound >= brute - 1e-12)  # a bound: no grid point beats it
    np.testing.assert_allclose(max_entropy_at_mass(bound[hs > np.log(k)], k, vocab), hs[hs > np.log(k)], atol=1e-9)
    assert outlier_mass_bound(np.log(k) - 0.01, k, vocab) == 1.0
    assert np.isclose(outlier_mass_bound(np.log(vocab), k, vocab), k / vocab)


def test_outlier_targets_are_accepted_at_the_bound():
    vocab, k = VOCAB, K
    h = np.concatenate([[0.0], np.linspace(0.3, np.log(vocab) - 0.05, 10), [np.log(vocab)]])
    targets = outlier_targets(vocab, h, k, seed=7, progress=False)
    meta = targets.metadata

    assert len(targets) == len(h) and targets.failures is None and meta.accepted.all()
    np.testing.assert_array_less(np.abs(achieved_entropy(targets.probs) - h), TOL)
    ids = np.array(meta.outlier_ids.tolist())
    assert ids.shape == (len(h), k) and all(len(set(row)) == k for row in ids)
    mass = np.take_along_axis(targets.probs.astype(np.float64), ids, axis=1).sum(axis=1)
    np.testing.assert_allclose(meta.outlier_mass, mass, atol=1e-12)
    np.testing.assert_allclose(meta.mass_bound, outlier_mass_bound(h, k, vocab))
    assert np.all(mass >= meta.mass_bound - meta.delta)
    assert (meta.delta == 0.05).all() and (meta.k == k).all() and (meta.beta == 100.0).all()
    assert targets.probs[0, ids[0, 0]] == 1.0  # h = 0: one-hot on an outlier token
    assert len({tuple(row) for row in ids}) == len(h)  # outliers drawn per target


def test_outlier_failures_are_reported_apart_never_returned():
    vocab, k = VOCAB, K
    h = np.array([1.0, 2.5, 3.5])
    with pytest.warns(UserWarning, match="rejected after 2 attempts"):
        # delta = 0 and two optimizer steps: no target can reach the bound itself.
        targets = outlier_targets(vocab, h, k, delta=0.0, max_steps=2, max_retries=1, progress=False)
    assert len(targets) == 0 and targets.probs.shape == (0, vocab)
    failures = targets.failures
    assert list(failures.target_id) == [0, 1, 2] and not failures.accepted.any()
    assert (failures.attempt == 1).all()
    assert np.all(failures.outlier_mass < failures.mass_bound)


def test_outlier_targets_mixed_acceptance_keep_request_ids():
    vocab, k = VOCAB, K
    h = np.array([0.0, 2.5, np.log(vocab)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        targets = outlier_targets(vocab, h, k, delta=0.0, max_steps=2, max_retries=0, progress=False)
    # The exact one-hot holds all the mass; the mid-entropy request fails; the uniform end sits at its bound
    # up to float32 rounding, so with delta = 0 it may go either way — but never both ways.
    assert 0 in set(targets.metadata.target_id) and 1 in set(targets.failures.target_id)
    assert set(targets.metadata.target_id) | set(targets.failures.target_id) == {0, 1, 2}
    assert not set(targets.metadata.target_id) & set(targets.failures.target_id)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k"), (dict(k=50), "k"), (dict(k=2.5), "k"), (dict(delta=1.0), "delta"),
    (dict(max_retries=-1), "max_retries"), (dict(alpha=0.0), "alpha"),
])
def test_outlier_targets_refuse_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        outlier_targets(50, [1.0], **{"k": K, **kwargs}, progress=False)


# --- the target set: files and validation -----------------------------------------------------------


def test_save_and_load_round_trip_exactly(tmp_path):
    vocab = VOCAB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # delta = 0 with two steps: the mid-entropy request fails, the one-hot is accepted.
        outliers = outlier_targets(vocab, [0.0, 2.5], K, delta=0.0, max_steps=2, max_retries=0, progress=False)
    assert len(outliers) == 1 and len(outliers.failures) == 1
    text = ["ünïcödé \u2014 日本語\n\ttabs", "", 'quotes " \' \\ and \x00 nul']
    generated = TargetSet(
        probs=np.full((3, vocab), 1 / vocab, np.float32),
        metadata=pd.DataFrame({
            "target_id": [0, 1, 2], "kind": "model", "target_entropy": [np.log(vocab)] * 3,
            "context_ids": [[1, 2, 3], [], [59]], "context_text": text,
            "seed": pd.array([1, None, 3], dtype="Int64"), "mapped_mass": [1.0, np.nan, 0.5],
        }),
    )
    vanilla = vanilla_targets(vocab, [0.0, 1.0, np.log(vocab)], progress=False)
    for original in (vanilla, outliers, generated):
        path = original.save(tmp_path / original.metadata.kind[0])
        loaded = TargetSet.load(path, vocab)
        np.testing.assert_array_equal(loaded.probs, original.probs)
        assert loaded.probs.dtype == np.float32
        pd.testing.assert_frame_equal(loaded.metadata, original.metadata)
        if original.failures is None:
            assert loaded.failures is None
        else:
            pd.testing.assert_frame_equal(loaded.failures, original.failures)
    assert TargetSet.load(tmp_path / "model").metadata.context_text.tolist() == text


def test_save_over_an_earlier_save_drops_stale_failures(tmp_path):
    probs = np.eye(4, dtype=np.float32)
    meta = pd.DataFrame({"target_id": range(4), "kind": "user", "target_entropy": 0.0})
    TargetSet(probs, meta, failures=meta.iloc[:1]).save(tmp_path)
    TargetSet(probs, meta).save(tmp_path)
    assert TargetSet.load(tmp_path).failures is None


def test_validation_lists_offending_rows_and_why():
    good = np.full((6, 10), 0.1)
    bad = good.copy()
    bad[1, 0] = np.nan
    bad[2, 3] = np.inf
    bad[3, 0] = -0.1
    bad[3, 1] = 0.3
    bad[4] *= 1.01
    with pytest.raises(TargetError) as error:
        validate_probs(bad, 10)
    message = str(error.value)
    assert "4 invalid target rows" in message
    for row, why in ((1, "not finite"), (2, "not finite"), (3, "negative"), (4, "sums to 1.01")):
        assert f"row {row}: {why}" in message
    assert "row 0" not in message and "row 5" not in message

    with pytest.raises(TargetError, match="9 columns, but the model's vocabulary has 10"):
        validate_probs(np.full((2, 9), 1 / 9), 10)
    with pytest.raises(TargetError, match="shape"):
        validate_probs(np.full((2, 2, 5), 0.2))
    with pytest.raises(TargetError, match="floating point"):
        validate_probs(np.eye(3, dtype=int))
    with pytest.raises(TargetError, match="no targets"):
        validate_probs(np.zeros((0, 10)), 10)


def test_validation_keeps_rows_as_given_and_normalizes_only_when_asked():
    rows = np.array([[0.2, 0.3, 0.5000004], [0.5, 0.5, 0.0]], np.float32)
    np.testing.assert_array_equal(validate_probs(rows, 3), rows)
    scaled = np.array([[2.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    with pytest.raises(TargetError, match="normalize=True"):
        validate_probs(scaled, 3)
    np.testing.assert_allclose(validate_probs(scaled, 3, normalize=True), [[0.5, 0.25, 0.25], [0, 0, 1]])
    with pytest.raises(TargetError, match="row 1: no positive mass"):
        validate_probs(np.array([[1.0, 0.0], [0.0, 0.0]]), 2, normalize=True)
    with pytest.raises(TargetError, match="row 0: negative"):
        validate_probs(np.array([[2.0, -1.0]]), 2, normalize=True)
    single = as_target_set(np.array([0.25, 0.75]), 2)
    assert single.metadata.kind[0] == "user"
    assert np.isclose(single.metadata.target_entropy[0], entropy_nats([0.25, 0.75]))


def test_load_targets_from_user_files(tmp_path):
    probs = np.random.default_rng(0).dirichlet(np.ones(8), size=5).astype(np.float32)
    np.save(tmp_path / "t.npy", probs)
    np.savez(tmp_path / "single.npz", anything=probs)
    np.savez(tmp_path / "named.npz", probs=probs, other=np.zeros(3))
    np.savez(tmp_path / "ambiguous.npz", a=probs, b=probs)
    for name in ("t.npy", "single.npz", "named.npz"):
        loaded = load_targets(tmp_path / name, 8)
        np.testing.assert_array_equal(loaded.probs, probs)
        assert list(loaded.metadata.target_id) == list(range(5))
    as_target_set(probs, 8).save(tmp_path / "saved")
    np.testing.assert_array_equal(load_targets(tmp_path / "saved", 8).probs, probs)

    with pytest.raises(TargetError, match="name the targets 'probs'"):
        load_targets(tmp_path / "ambiguous.npz", 8)
    with pytest.raises(TargetError, match="vocabulary has 9"):
        load_targets(tmp_path / "t.npy", 9)
    np.save(tmp_path / "unnormalized.npy", probs * 2)
    with pytest.raises(TargetError, match="sums to 2"):
        load_targets(tmp_path / "unnormalized.npy", 8)
    renormalized = load_targets(tmp_path / "unnormalized.npy", 8, normalize=True)
    np.testing.assert_allclose(renormalized.probs, probs, rtol=1e-6)
    (tmp_path / "t.txt").write_text("0.5 0.5")
    with pytest.raises(TargetError, match=".npy or .npz"):
        load_targets(tmp_path / "t.txt", 2)
    with pytest.raises(FileNotFoundError):
        load_targets(tmp_path / "missing.npy", 8)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TargetError, match="probs.npy is missing"):
        load_targets(tmp_path / "empty_dir", 8)
    broken = probs.copy()
    broken[2, 0] = -1
    np.save(tmp_path / "saved" / "probs.npy", broken)
    with pytest.raises(TargetError, match="row 2: negative"):
        TargetSet.load(tmp_path / "saved", 8)


def test_files_that_are_not_plain_arrays_are_refused_by_name_and_never_unpickled(tmp_path):
    import pickle

    class Sentinel:
        def __reduce__(self):  # would create a file when unpickled
            return (open, (str(tmp_path / "unpickled"), "w"))

    cases = {
        "pickle.npy": pickle.dumps([Sentinel()]), "pickle.npz": pickle.dumps([Sentinel()]),
        "text.npy": b"0.5 0.5\n", "empty.npy": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", probs=np.array([{"a": 1}, None], dtype=object))
    for name, message in [("pickle.npy", "is not a .npy array file"), ("text.npy", "is not a .npy array file"),
                          ("empty.npy", "is not a .npy array file"), ("pickle.npz", "is not a .npz archive"),
                          ("objects.npy", "holds Python objects"), ("objects.npz", "not a readable .npz")]:
        with pytest.raises(TargetError, match=message) as error:
            load_targets(tmp_path / name, 2)
        assert str(tmp_path / name) in str(error.value)
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_a_truncated_probs_file_is_named_and_called_truncated(tmp_path, mmap_mode):
    from distprompt_jax.targets.io import read_npy

    path = as_target_set(np.full((4, 8), 1 / 8, np.float32), 8).save(tmp_path / "targets")
    probs = path / "probs.npy"
    np.testing.assert_array_equal(read_npy(probs, mmap_mode), np.full((4, 8), 1 / 8, np.float32))
    probs.write_bytes(probs.read_bytes()[:-10])
    truncated = rf"{probs} is truncated: .* shape \(4, 8\) \(\d+ bytes .*\), but the file has"
    with pytest.raises(TargetError, match=truncated):
        read_npy(probs, mmap_mode)
    with pytest.raises(TargetError, match="is truncated"):
        TargetSet.load(path, 8)


def test_entropy_is_float64_and_matches_the_direct_formula():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5000, 0.05), size=6).astype(np.float32)
    probs[0, :2500] = 0.0  # exact zeros: 0 log 0 = 0
    wide = probs.astype(np.float64)
    direct = np.array([-np.sum(row[row > 0] * np.log(row[row > 0])) for row in wide])
    found = entropy_nats(probs)
    assert found.dtype == np.float64
    np.testing.assert_allclose(found, direct, rtol=1e-13)
    np.testing.assert_allclose(entropy_nats(np.full(49152, 1 / 49152)), np.log(49152), rtol=1e-14)
    assert entropy_nats(np.eye(3)).tolist() == [0.0, 0.0, 0.0]
