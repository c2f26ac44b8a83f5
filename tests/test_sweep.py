"""Experiments end to end through the command line, on a tiny model: results, report, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import build_tiny_hf_model

from distprompt_jax.bounds import BoundConfig
from distprompt_jax.results import PromptResults

CONFIG = """
from ml_collections import ConfigDict
from distprompt_jax.experiment import bound_defaults, hard_defaults, soft_defaults

def get_config():
    c = ConfigDict()
    c.model = {model!r}
    c.dtype = "float32"
    c.seed = 0
    c.targets = ConfigDict()
    c.targets.vanilla = ConfigDict(dict(kind="vanilla", n=7, entropy_min=0.0, entropy_max=-1.0))
    c.methods = ("soft",)
    c.soft = soft_defaults()
    c.soft.max_steps = {max_steps}
    c.soft.patience = 1000
    c.soft.prompt_len = 3
    c.soft.slots = 4
    c.soft.segment_steps = 5
    c.soft.restarts = 1  # one attempt per target: the kill points below count finished targets
    c.hard = hard_defaults()
    c.bound = bound_defaults()
    c.checkpoint_every = 1
    c.tensorboard = False
    return c
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Writes a config for a tiny model; returns a function running `distprompt` on it."""
    root = tmp_path_factory.mktemp("sweep")
    build_tiny_hf_model("llama").save_pretrained(root / "model")

    def config(max_steps: int = 20) -> Path:
        path = root / f"config_{max_steps}.py"
        path.write_text(CONFIG.format(model=str(root / "model"), max_steps=max_steps))
        return path

    return config


def distprompt(*args, **popen):
    command = [sys.executable, "-m", "distprompt_jax.main", *map(str, args)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def finished(experiment, tmp_path_factory) -> Path:
    """The workdir of one finished run of the default config; tests that change it work on a copy."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    code, _, err = finish(distprompt(f"--config={experiment()}", f"--workdir={workdir}"))
    assert code == 0, err[-3000:]
    return workdir


def test_run_writes_results_prompts_logs_and_report(experiment, finished, tmp_path):
    workdir = shutil.copytree(finished, tmp_path / "run")
    results = pd.read_parquet(workdir / "results.parquet")
    assert len(results) == 7
    for column in ("target_id", "kind", "target_entropy", "method", "model", "prompt_len", "kl", "steps", "recipe"):
        assert column in results.columns, column
    assert (results.method == "soft").all() and (results.steps == 20).all()
    with np.load(workdir / "prompts" / "soft.npz") as prompts:
        assert prompts["prompt"].shape == (7, 3, 64)
        np.testing.assert_array_equal(prompts["target_id"], results.target_id)
    # The targets' own seed, steps, learning rate ... join under `target_`; the method's keep their names.
    assert {"target_seed", "target_max_steps", "target_learning_rate", "learning_rate"} <= set(results.columns)
    assert "seed" not in results.columns and "max_steps" not in results.columns
    # A sweep's method output is a PromptResults' files: it loads, with its KL history.
    loaded = PromptResults.load(workdir, "soft")
    assert loaded.method == "soft" and loaded.arrays["kl_path"].shape == (7, 4)  # 20 steps, every 5
    np.testing.assert_array_equal(loaded.columns["kl"], results.kl)
    np.testing.assert_array_equal(loaded.arrays["kl_path"][:, -1], results.kl)
    run = json.loads((workdir / "run.json").read_text())
    assert run["config"]["soft"]["max_steps"] == 20 and run["versions"]["jax"]
    log = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert log and {"method", "segment", "steps", "mean_best", "active", "target_steps", "slot_steps"} <= set(log[0])
    assert (workdir / "figures" / "kl_vs_entropy.png").stat().st_size > 10_000
    assert (workdir / "figures" / "kl_vs_entropy.svg").is_file()
    assert "mean KL" in (workdir / "report.md").read_text()

    # Finished: a rerun does nothing and says so.
    code, _, err = finish(distprompt(f"--config={experiment()}", f"--workdir={workdir}"))
    assert code == 0 and "already holds the finished run" in err
    # A different config refuses to mix into this workdir.
    code, _, err = finish(distprompt(f"--config={experiment()}", f"--workdir={workdir}", "--config.soft.max_steps=30"))
    assert code != 0 and "different config" in err and "soft.max_steps" in err


def kill_at_checkpoint(process, workdir: Path, method: str, segment: int) -> int:
    """SIGKILL `process` once its pool checkpoint of `segment` (or later) is complete; the log lines so far."""
    checkpoints = workdir / "checkpoints" / method / "p0"
    deadline = time.time() + 300
    while time.time() < deadline and not any(
        p.name.isdigit() and int(p.name) >= segment for p in (checkpoints.iterdir() if checkpoints.is_dir() else ())
    ):
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return len((workdir / "log.jsonl").read_text().splitlines())


def test_sigkill_then_rerun_equals_an_uninterrupted_run(experiment, tmp_path):
    config = experiment(max_steps=60)
    code, _, err = finish(distprompt(f"--config={config}", f"--workdir={tmp_path / 'straight'}"))
    assert code == 0, err[-3000:]

    killed = tmp_path / "killed"
    # 7 targets in 4 slots, 60 steps in segments of 5: the first four finish at segment 12 and their slots
    # take the last three. Kill once a checkpoint after that refill is complete.
    logged_before_kill = kill_at_checkpoint(
        distprompt(f"--config={config}", f"--workdir={killed}", start_new_session=True), killed, "soft", 14)
    assert not (killed / "results.parquet").exists()

    code, _, err = finish(distprompt(f"--config={config}", f"--workdir={killed}"))
    assert code == 0, err[-3000:]
    # The pool went on from its checkpoint rather than from the start.
    after = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()[logged_before_kill:]]
    assert after[0]["segment"] > 14 and after[0]["finished"] >= 4
    straight = pd.read_parquet(tmp_path / "straight" / "results.parquet")
    resumed = pd.read_parquet(killed / "results.parquet")
    pd.testing.assert_frame_equal(straight, resumed)
    with np.load(tmp_path / "straight" / "prompts" / "soft.npz") as a, np.load(killed / "prompts" / "soft.npz") as b:
        np.testing.assert_array_equal(a["prompt"], b["prompt"])


def test_a_bound_run_killed_mid_pool_resumes_to_the_same_results(experiment, tmp_path):
    config = experiment()
    args = ["--config.methods=('bound',)", "--config.targets.vanilla.n=12", "--config.bound.slots=4",
            "--config.bound.segment_steps=2"]
    code, _, err = finish(distprompt(f"--config={config}", f"--workdir={tmp_path / 'straight'}", *args))
    assert code == 0, err[-3000:]
    killed = tmp_path / "killed"
    logged_before_kill = kill_at_checkpoint(
        distprompt(f"--config={config}", f"--workdir={killed}", *args, start_new_session=True), killed, "bound", 3)
    code, _, err = finish(distprompt(f"--config={config}", f"--workdir={killed}", *args))
    assert code == 0, err[-3000:]
    after = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()[logged_before_kill:]]
    assert after[0]["segment"] > 3
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "straight" / "results.parquet"),
                                  pd.read_parquet(killed / "results.parquet"))


def test_a_second_run_on_a_busy_workdir_is_refused(experiment, tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 12345 on testhost since then")
        lock.flush()
        code, _, err = finish(distprompt(f"--config={experiment()}", f"--workdir={tmp_path}"))
    assert code != 0 and "in use by pid 12345 on testhost" in err
    assert not (tmp_path / "targets").exists()


def test_leftovers_and_damaged_results_are_handled(experiment, finished, tmp_path):
    tmp_path = shutil.copytree(finished, tmp_path / "run")
    expected = pd.read_parquet(tmp_path / "results.parquet")
    done = tmp_path / "done" / "soft" / "00000000.npz"
    assert json.loads((tmp_path / "slots" / "soft.p0.json").read_text()) == {"slots": 4}
    # What a kill during a write leaves, and a results file cut short: the rerun ignores the first, names
    # and recomputes the second, and ends where an untouched run ends.
    (tmp_path / "done" / "soft" / ".00000000.npz.tmp-999.npz").write_bytes(b"partial")
    done.write_bytes(done.read_bytes()[:100])
    (tmp_path / "results.parquet").unlink()
    code, _, err = finish(distprompt(f"--config={experiment()}", f"--workdir={tmp_path}"))
    assert code == 0, err[-3000:]
    assert "00000000.npz is damaged" in err
    pd.testing.assert_frame_equal(expected, pd.read_parquet(tmp_path / "results.parquet"))


def test_config_errors_are_named(experiment, tmp_path):
    code, _, err = finish(distprompt(f"--config={experiment()}", f"--workdir={tmp_path}", "--config.soft.bogus=1"))
    assert code != 0 and "bogus" in err
    code, _, err = finish(distprompt(f"--config={experiment()}", f"--workdir={tmp_path / 'b'}",
                                     "--config.soft.max_steps=many"))
    assert code != 0 and "max_steps" in err
    # A refused config claims nothing: the corrected command then runs in the same workdir.
    code, _, err = finish(distprompt(f"--config={experiment()}", f"--workdir={tmp_path / 'b'}",
                                     "--config.soft.learning_rate=inf"))
    assert code != 0 and "learning_rate" in err and "finite" in err
    assert not (tmp_path / "b" / "config.json").exists()
    code, _, err = finish(distprompt(f"--config={experiment()}", f"--workdir={tmp_path / 'c'}",
                                     "--config.targets.vanilla.kind=weird"))
    assert code != 0 and "known kinds" in err
    code, _, err = finish(distprompt(f"--config={experiment()}"))
    assert code != 0 and "--workdir is required" in err


def test_two_processes_split_the_targets_and_match_one(experiment, tmp_path):
    """Multi-host on one machine: two processes on loopback, gloo collectives, a shared workdir."""
    import socket

    config = experiment()
    # Bounds as well as soft prompts: each process runs a pool over its share.
    methods = ("--config.methods=('soft','bound')", "--config.bound.slots=4")
    code, _, err = finish(distprompt(f"--config={config}", f"--workdir={tmp_path / 'one'}", *methods))
    assert code == 0, err[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Each worker writes to a file: with pipes, one worker blocked on a full pipe would stall the other
    # at their next barrier while we wait on the first.
    logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "distprompt_jax.main", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}", f"--config={config}", f"--workdir={tmp_path / 'two'}", *methods],
            stdout=logs[i], stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        for i in range(2)
    ]
    try:
        for worker, log in zip(workers, logs):
            code = worker.wait(timeout=600)
            log.seek(0)
            assert code == 0, log.read()[-3000:]
    finally:  # a hung worker must not outlive the test
        for worker, log in zip(workers, logs):
            worker.kill()
            log.close()
    # 7 targets: process 0 takes targets 0-3, process 1 targets 4-6.
    for method in ("soft", "bound"):
        done = sorted(p.name for p in (tmp_path / "two" / "done" / method).glob("*.npz"))
        assert done == ["00000000.npz", "00000004.npz"], method
    one = pd.read_parquet(tmp_path / "one" / "results.parquet")
    two = pd.read_parquet(tmp_path / "two" / "results.parquet")
    # Another split puts a target beside other targets in the pool and in the certificate's batches: results
    # agree to float32 rounding (README), not bit for bit. KLs, certified bounds and every other column to
    # assert_frame_equal's rtol 1e-5; the certificate's residual ‖Wᵀ(p̄ − q)‖ is the gradient norm at which the
    # solver stopped, a rounding-level diagnostic (measured 4.2e-7 against 4.6e-7 for one target), so to the
    # solver's stopping tolerance: a split that moved the bound's point would exceed it.
    diagnostics = {"residual": BoundConfig().tolerance}
    pd.testing.assert_frame_equal(one.drop(columns=list(diagnostics)), two.drop(columns=list(diagnostics)))
    for column, tolerance in diagnostics.items():
        np.testing.assert_allclose(two[column], one[column], rtol=0, atol=tolerance, err_msg=column)


def test_every_shipped_config_loads():
    import importlib.util

    from distprompt_jax.experiment import TARGET_KINDS, bound_config, hard_config, recipe_order, soft_config

    configs = sorted(Path(__file__).parent.parent.glob("configs/*.py"))
    assert {p.stem for p in configs} >= {
        "quickstart", "entropy_sweep", "outliers", "lm_targets", "cross_tokenizer", "prompt_length"
    }
    for path in configs:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        soft_config(config), hard_config(config), bound_config(config)
        recipe_order(config.targets)
        assert all(recipe.kind in TARGET_KINDS for recipe in config.targets.values()), path


def test_paired_recipes_share_entropies(tiny_hf_dir):
    from ml_collections import ConfigDict

    from distprompt_jax import load_model
    from distprompt_jax.experiment import build_targets

    lm = load_model(tiny_hf_dir("llama")[1])
    config = ConfigDict(dict(seed=0, targets=dict(
        outlier=dict(kind="outlier", n=4, k=3, entropy_min=2.0, entropy_max=4.0),
        vanilla=dict(kind="vanilla", entropies_from="outlier", seed_offset=100),
    )))
    targets = build_targets(config, lm)
    table = targets.metadata
    assert list(table.target_id) == list(range(len(table)))
    outlier, vanilla = table[table.recipe == "outlier"], table[table.recipe == "vanilla"]
    assert len(vanilla) == len(outlier) > 0
    np.testing.assert_allclose(vanilla.entropy.to_numpy(), outlier.entropy.to_numpy(), atol=2e-4)
    np.testing.assert_array_equal(vanilla.pair_target_id, outlier.target_id)
    assert (outlier.pair_target_id == -1).all()


def test_hard_prompts_and_bounds_in_one_run(experiment, tmp_path):
    config = experiment()
    overrides = [
        "--config.methods=('soft','hard','bound')", "--config.hard.max_steps=4", "--config.hard.prompt_len=3",
        "--config.hard.k=8", "--config.hard.slots=4", "--config.hard.segment_steps=2",
        "--config.bound.slots=4", "--config.tensorboard=True",
    ]
    code, _, err = finish(distprompt(f"--config={config}", f"--workdir={tmp_path}", *overrides))
    assert code == 0, err[-3000:]
    results = pd.read_parquet(tmp_path / "results.parquet")
    kl = results.pivot(index="target_id", columns="method", values="kl")
    assert list(kl.columns) == ["bound", "hard", "soft"] and len(kl) == 7
    # The certificate bounds what any prompt reaches.
    assert (kl.bound <= kl.soft + 1e-6).all() and (kl.bound <= kl.hard + 1e-6).all()
    # Every row carries its target's bound and its gap to it.
    for method in ("soft", "hard"):
        rows = results[results.method == method].set_index("target_id").sort_index()
        np.testing.assert_array_equal(rows.kl_bound, kl.bound)
        np.testing.assert_allclose(rows.gap_to_bound, rows.kl - kl.bound)
    with np.load(tmp_path / "prompts" / "hard.npz") as hard:
        assert hard["token_ids"].shape == (7, 3)
    # TensorBoard events per method, read back with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for method in ("soft", "hard", "bound"):
        events = EventAccumulator(str(tmp_path / "tensorboard" / method))
        events.Reload()
        assert {"kl/mean_best", "targets/active", "speed/useful_target_steps_per_second"} <= set(
            events.Tags()["scalars"]), method
