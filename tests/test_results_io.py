"""The edges of the API's results: the KL history of gradient searches, target metadata joined under
`target_`, saving and loading a result, and the progress bar."""

from __future__ import annotations

import dataclasses

import chex
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from distprompt_jax import SoftPromptConfig, soft_prompt
from distprompt_jax.prompting.gradient import Recipe
from distprompt_jax.results import PromptResults
from distprompt_jax.solve import driver
from distprompt_jax.targets import TargetSet


class KLHistoryTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_the_history_holds_the_best_kl_every_record_every_steps(self):
        """5 steps recorded every 2: the best after steps 2 and 4, then (the target stopped) its last best."""
        recipe = Recipe(learning_rate=0.1, schedule="constant", warmup_steps=0, clip_norm=None, max_steps=5,
                        patience=100, min_delta=0.0, floor_tolerance=0.0, record_every=2)

        def loss(v):
            return jnp.sum((v - 3.0) ** 2)

        step = self.variant(lambda s: recipe.step(s, loss, jnp.float32(-1.0)))
        state, bests = recipe.start(jnp.zeros(2)), []
        while bool(state.progress.active):
            state = step(state)
            bests.append(float(state.progress.best))
        assert len(bests) == 5 and bests[4] < bests[3] < bests[1]
        history = recipe.history(state)
        np.testing.assert_array_equal(history["kl_path"], np.float32([bests[1], bests[3], bests[4]]))
        assert history["kl_path"][-1] == history["kl"]


@pytest.fixture(scope="module")
def soft_run(peaked_lm):
    """A soft-prompt run on targets whose metadata says how they were made (as vanilla targets' does), the
    progress bar's postfixes recorded."""
    lm = peaked_lm("llama")
    probs = np.random.RandomState(0).dirichlet(np.full(lm.vocab_size, 0.3), size=4)
    metadata = pd.DataFrame({
        "target_id": np.arange(4), "kind": "vanilla", "target_entropy": np.linspace(1, 4, 4),
        "entropy": np.linspace(1, 4, 4) + 1e-5, "seed": np.arange(4) + 7, "steps": 1000, "max_steps": 1000,
        "learning_rate": 0.1, "optimizer": "adam", "outlier_ids": [[1, 2], [3], [], [5, 6]],
    })
    postfixes = []

    class RecordingBar:
        def __init__(self, *args, disable=False, **kwargs):
            self.disable = disable

        def update(self, n):
            pass

        def set_postfix(self, ordered_dict=None, **kwargs):
            if not self.disable:
                postfixes.append(dict(ordered_dict or {}, **kwargs))

        def close(self):
            pass

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver, "tqdm", RecordingBar)
        config = SoftPromptConfig(prompt_len=3, max_steps=25, segment_steps=10, slots=4, restarts=1, patience=100)
        result = soft_prompt(lm, TargetSet(probs, metadata), config, with_bound=False)
        seen = len(postfixes)
        soft_prompt(lm, TargetSet(probs, metadata), config, with_bound=False, progress=False)
        assert len(postfixes) == seen, "progress=False showed a bar"
    return result, postfixes


def test_soft_prompts_keep_a_kl_history(soft_run):
    result, _ = soft_run
    path = result.arrays["kl_path"]
    assert path.shape == (4, 3)  # ⌈25 / 10⌉
    np.testing.assert_array_equal(path[:, -1], result.columns["kl"])
    assert np.all(np.diff(path, axis=1) <= 0)


def test_target_metadata_joins_under_a_prefix_and_nothing_is_dropped(soft_run):
    result, _ = soft_run
    table = result.to_pandas()
    for name in ("target_id", "kind", "target_entropy", "learning_rate", "steps", "entropy", "kl"):
        assert name in table.columns, name
    assert "seed" not in table.columns and "max_steps" not in table.columns
    assert (table.steps <= 25).all() and (table.target_steps == 1000).all() and (table.target_max_steps == 1000).all()
    np.testing.assert_array_equal(table.target_seed, np.arange(4) + 7)
    assert (table.target_learning_rate == 0.1).all() and (table.learning_rate != 0.1).all()
    np.testing.assert_array_equal(table.target_entropy_reached, result.metadata.entropy)
    assert table.target_outlier_ids.tolist() == result.metadata.outlier_ids.tolist()
    joined = len(table.columns) - 2 - len(result.columns)  # target_id, method, the method's columns
    assert joined == len(result.metadata.columns) - 1  # every metadata column but target_id, once


def test_a_saved_result_loads_back_equal(soft_run, tmp_path):
    result, _ = soft_run
    path = result.save(tmp_path / "run")
    assert path.name == "results.parquet" and (tmp_path / "run" / "prompts" / "soft.npz").is_file()
    loaded = PromptResults.load(tmp_path / "run")
    assert loaded.method == result.method and loaded.run_info == result.run_info
    assert list(loaded.columns) == list(result.columns)
    for name, values in result.columns.items():
        assert loaded.columns[name].dtype == np.asarray(values).dtype, name
        np.testing.assert_array_equal(loaded.columns[name], values, err_msg=name)
    chex.assert_trees_all_close(loaded.arrays, result.arrays, rtol=0, atol=0)
    pd.testing.assert_frame_equal(loaded.metadata, result.metadata)
    with pytest.raises(FileExistsError, match="results.parquet exists"):
        result.save(tmp_path / "run")
    result.save(tmp_path / "run", overwrite=True)
    with pytest.raises(FileNotFoundError, match="holds no results of 'hard'"):
        PromptResults.load(tmp_path / "run", "hard")
    other = dataclasses.replace(result, method="prefix")
    both = pd.concat([result.to_pandas(), other.to_pandas()])
    both.to_parquet(tmp_path / "run" / "results.parquet")
    with pytest.raises(ValueError, match=r"holds the methods \['soft', 'prefix'\]: name the one to load"):
        PromptResults.load(tmp_path / "run")


def test_the_progress_bar_never_shows_nan(soft_run):
    _, postfixes = soft_run
    assert postfixes and all("nan" not in str(value) for postfix in postfixes for value in postfix.values())
    assert "mean_done" in postfixes[-1] and "mean_best" not in postfixes[-1]  # at the end, nothing runs
    empty = driver.SegmentInfo(segment=1, steps=10, active=3, finished=0, n_targets=3, slots=4, mean_best=np.nan,
                               median_best=np.nan, target_steps=30, slot_steps=40, seconds=1.0)
    assert driver.progress_postfix(empty, np.array([])) == {"active": 3}
    assert driver.progress_postfix(empty, np.array([1.0, np.inf, 2.0])) == {"active": 3, "mean_done": "1.5"}
