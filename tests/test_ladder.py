"""The expressivity ladder end to end on tiny models: configs/ladder.py shrunk, every rung on the same targets of
every kind, the report's ladder, the final-norm rung's reachable set and resume, and found prompts exported to
PEFT from the experiment's workdir."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from conftest import build_tiny_hf_model
from ml_collections import ConfigDict
from test_targets_generated import WORDS, word_tokenizer

from distprompt_jax import experiment, sweep
from distprompt_jax.prompting import peft_export

ROOT = Path(__file__).parent.parent
N_TARGETS = 10  # 4 vanilla, 2 outlier, 2 model, 2 cross_model
READ_AFTER = (7,)  # a word of the tiny tokenizer (the shipped "\n" is no token of a whitespace-split one)
RUNGS = ("hard", "soft", "prefix", "final_norm", "bound_norm", "bound")


def shipped_ladder() -> ConfigDict:
    spec = importlib.util.spec_from_file_location("ladder", ROOT / "configs" / "ladder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(), module.PROMPT_RUNGS


def tiny_ladder(model: Path, source: Path) -> ConfigDict:
    """configs/ladder.py with its structure kept (recipes, methods, shared reading token) and its sizes shrunk."""
    config, prompt_rungs = shipped_ladder()
    config.model = str(model)
    config.targets.vanilla.n = 4
    config.targets.outlier.update(n=2, k=3, entropy_max=5.0)
    config.targets.model.n = 2
    config.targets.gemma.update(source=str(source), n=2)
    for rung in prompt_rungs:
        config[rung].suffix = READ_AFTER
        config[rung].slots = 4
    for rung in ("hard", "soft", "prefix"):
        config[rung].prompt_len = 3
    for rung in ("soft", "prefix", "final_norm"):
        config[rung].update(max_steps=20, restarts=1)
    config.hard.update(max_steps=3, k=8, patience=3)
    config.bound.update(slots=4, restarts=2, norm_steps=50)
    return config


@pytest.fixture(scope="module")
def ladder_run(tmp_path_factory):
    """A finished run of the shrunk ladder: (its workdir, results)."""
    root = tmp_path_factory.mktemp("ladder")
    # Same words, different ids: the cross-tokenizer targets map word for word.
    permutation = np.random.default_rng(0).permutation(len(WORDS))
    for family, name, words in (("llama", "model", WORDS), ("gemma3", "source", [WORDS[i] for i in permutation])):
        build_tiny_hf_model(family).save_pretrained(root / name)
        word_tokenizer(words).save_pretrained(root / name)
    config = tiny_ladder(root / "model", root / "source")
    workdir = root / "run"
    results = sweep.run(config, workdir)
    return workdir, results


def test_every_rung_runs_on_the_same_targets_of_every_kind(ladder_run):
    workdir, results = ladder_run
    assert results.method.value_counts().to_dict() == {rung: N_TARGETS for rung in RUNGS}
    assert set(results.kind) == {"vanilla", "outlier", "model", "cross_model"}
    kl = results.pivot(index="target_id", columns="method", values="kl")
    # The certificate is below every rung, whatever the searches found.
    for rung in RUNGS[:-1]:
        assert (kl[rung] >= kl.bound - 1e-6).all(), rung
    # The final-norm rung reaches only final-norm outputs: never below bound_norm's rigorous lower bound of them.
    lower = results[results.method == "bound_norm"].set_index("target_id").lower
    assert (kl.final_norm >= lower - 1e-5).all()
    rung = results[results.method == "final_norm"]
    assert (rung.prompt_len == 0).all() and rung.kl_bound.notna().all()
    with np.load(workdir / "prompts" / "final_norm.npz") as prompts:
        assert prompts["prompt"].shape == (N_TARGETS, 64)  # one vector per target, d_model of the tiny llama
    from distprompt_jax import report

    text = report.write_report(workdir).read_text()
    assert "## The expressivity ladder" in text and "### Rung inversions" in text
    assert (workdir / "figures" / "ladder.png").stat().st_size > 5_000
    for upper, lower in itertools.pairwise(RUNGS):
        assert f"| {upper} → {lower} | " in text, (upper, lower)


def test_the_final_norm_rung_is_any_final_norm_output(tiny_hf_dir):
    """Its logits are unembed(final_norm(u)) of the free vector u, whatever the fixed tokens: the set bound_norm
    searches (not any vector into the unembedding, the bound's)."""
    from distprompt_jax import load_model
    from distprompt_jax.prompting.soft import SoftMethod

    lm = load_model(tiny_hf_dir("gemma3")[1])
    config = experiment.base_config(str(tiny_hf_dir("gemma3")[1]))
    problems = []
    for suffix in ((5,), (9, 4)):
        config.final_norm.suffix = suffix
        problems.append(SoftMethod(lm, experiment.final_norm_config(config, lm.n_layers)).problem())
    u = 3.0 * jax.random.normal(jax.random.key(0), (lm.d_model,))
    expected = lm.unembed(lm.params, lm.final_norm(lm.params, u))
    for problem in problems:
        np.testing.assert_allclose(problem.logits(lm.params, u), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, lm.unembed(lm.params, u), atol=1e-3)  # the norm is not skipped


def test_found_prompts_export_to_peft_from_the_workdir(ladder_run, tmp_path):
    workdir, results = ladder_run
    soft = sweep.load_prompts(workdir, "soft")
    assert soft.method == "soft" and len(soft) == N_TARGETS
    assert soft.run_info["suffix_ids"] == list(READ_AFTER) and soft.run_info["prefix_ids"] == []
    rows = results[results.method == "soft"].set_index("target_id")
    np.testing.assert_array_equal(soft.columns["kl"], rows.kl.to_numpy())
    paths = soft.save_peft(tmp_path / "soft")
    assert [p.name for p in paths] == [f"target_{i}" for i in range(N_TARGETS)]
    config = json.loads((paths[3] / peft_export.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 3
    assert (config["token_dim"], config["num_layers"]) == (64, 3)
    usage = json.loads((paths[3] / peft_export.INFO_FILE).read_text())
    assert usage["kl"] == pytest.approx(rows.kl[3]) and usage["kl_bound"] == pytest.approx(rows.kl_bound[3])
    assert usage["input_ids"] == list(READ_AFTER) and usage["target_id"] == 3
    from safetensors.numpy import load_file

    with np.load(workdir / "prompts" / "soft.npz") as saved:
        np.testing.assert_array_equal(load_file(paths[3] / peft_export.ADAPTER_WEIGHTS)["prompt_embeddings"],
                                      saved["prompt"][3])

    prefix = sweep.load_prompts(workdir, "prefix")
    (path,) = prefix.save_peft(tmp_path / "prefix", target_ids=2)
    config = json.loads((path / peft_export.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    assert config["token_dim"] == 2 * 16  # the tiny llama's kv heads × head_dim
    # What PEFT cannot express is refused by name, as for results in memory.
    with pytest.raises(ValueError, match="intervention vector"):
        sweep.load_prompts(workdir, "final_norm").save_peft(tmp_path / "final_norm")
    with pytest.raises(ValueError, match="hard prompts are tokens"):
        sweep.load_prompts(workdir, "hard").save_peft(tmp_path / "hard")
    with pytest.raises(FileNotFoundError, match="prefix-L4"):
        sweep.load_prompts(workdir, "prefix-L4")


FINAL_NORM_CONFIG = """
from ml_collections import ConfigDict
from distprompt_jax.experiment import base_config

def get_config():
    c = base_config({model!r})
    c.targets.vanilla = ConfigDict(dict(kind="vanilla", n=7, entropy_min=0.0, entropy_max=-1.0))
    c.methods = ("bound", "final_norm")
    c.bound.slots = 4
    c.final_norm.max_steps = 60
    c.final_norm.patience = 1000
    c.final_norm.slots = 4
    c.final_norm.segment_steps = 5
    c.final_norm.restarts = 1  # one attempt per target: the kill point below counts finished targets
    c.final_norm.floor_tolerance = 0.0  # every target runs its 60 steps
    c.checkpoint_every = 1
    return c
"""


def test_a_final_norm_run_killed_mid_pool_resumes_to_the_results_of_an_uninterrupted_one(tmp_path):
    from test_sweep import distprompt, finish, kill_at_checkpoint

    build_tiny_hf_model("qwen2").save_pretrained(tmp_path / "model")
    config = tmp_path / "config.py"
    config.write_text(FINAL_NORM_CONFIG.format(model=str(tmp_path / "model")))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    code, _, err = finish(distprompt(f"--config={config}", f"--workdir={straight}"))
    assert code == 0, err[-3000:]
    results = pd.read_parquet(straight / "results.parquet")
    rows = results[results.method == "final_norm"]
    assert len(rows) == 7 and (rows.steps == 60).all() and (rows.gap_to_bound >= -1e-6).all()

    # 7 targets in 4 slots, 60 steps in segments of 5: the first four finish at segment 12 and their slots take
    # the last three. Kill once a checkpoint after that refill is complete, then rerun.
    kill_at_checkpoint(distprompt(f"--config={config}", f"--workdir={killed}", start_new_session=True),
                       killed, "final_norm", 14)
    assert not (killed / "results.parquet").exists()
    code, _, err = finish(distprompt(f"--config={config}", f"--workdir={killed}"))
    assert code == 0, err[-3000:]
    pd.testing.assert_frame_equal(results, pd.read_parquet(killed / "results.parquet"))
    with np.load(straight / "prompts" / "final_norm.npz") as a, np.load(killed / "prompts" / "final_norm.npz") as b:
        np.testing.assert_array_equal(a["prompt"], b["prompt"])
        assert str(a[sweep.RUN_INFO]) == str(b[sweep.RUN_INFO])
    info = sweep.load_prompts(killed, "final_norm").run_info
    assert info["config"]["intervention_layer"] == 3 and info["config"]["intervention_mode"] == "replace"
