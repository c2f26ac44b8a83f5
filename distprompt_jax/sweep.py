"""Resumable experiments: build the targets, run each method over them in chunks, write the results.

Everything a run produces lives in its workdir:

    config.json            the run's config; a workdir refuses a different one
    targets/               the target set, built once (resuming never regenerates it)
    chunks/<method>/       one finished chunk each: <start>.parquet (table) + <start>.npz (prompts)
    checkpoints/<method>/  the unfinished chunk's optimizer state (orbax), every `checkpoint_every` segments
    log.jsonl              one line per segment: method, chunk, restart, steps, mean KL, targets still active
    results.parquet        one row per (target, method), written when every chunk is done
    prompts/<method>.npz   the prompts of every target, in target order
    run.json               config, package versions, git commit, devices

A killed run (SIGKILL at any moment) rerun with the same command resumes from the last checkpoint: chunk
results and checkpoints are written to a temporary name and renamed into place, so a kill leaves either
the old file or the new one. Chunks are deterministic given the seed, so the final results equal an
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
from tqdm.auto import tqdm

from distprompt_jax import parallel
from distprompt_jax.experiment import build_targets, soft_config
from distprompt_jax.prompting.soft import ChunkRun, SoftEngine
from distprompt_jax.targets import TargetSet

METHODS = ("soft",)


class WorkdirError(ValueError):
    """The workdir belongs to another run."""


def run(config, workdir: str | os.PathLike) -> pd.DataFrame:
    """Run (or resume, or confirm finished) the experiment `config` in `workdir`; returns results.parquet."""
    workdir = Path(workdir)
    results_path = workdir / "results.parquet"
    _claim_workdir(config, workdir)
    if results_path.is_file():
        print(f"distprompt: {workdir} already holds the finished run; nothing to do", file=sys.stderr)
        return pd.read_parquet(results_path)

    from distprompt_jax import load_model

    lm = load_model(config.model, dtype=config.dtype)
    targets = _targets(config, lm, workdir)
    _write_run_info(config, workdir)
    tables = []
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in config.methods; available: {METHODS}")
        tables.append(_run_soft(config, lm, targets, workdir))
    results = pd.concat(tables, ignore_index=True)
    results.insert(results.columns.get_loc("method") + 1, "model", lm.name)
    _atomic_write(results_path, lambda path: results.to_parquet(path, index=False))
    return results


def _claim_workdir(config, workdir: Path):
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.json"
    wanted = json.loads(config.to_json())
    if config_path.is_file():
        held = json.loads(config_path.read_text())
        if held != wanted:
            changed = sorted(_diff_keys(held, wanted))
            raise WorkdirError(
                f"{workdir} holds a run with a different config (differs in {changed}); "
                "use a new --workdir, or delete this one to start over"
            )
    else:
        _atomic_write(config_path, lambda path: Path(path).write_text(json.dumps(wanted, indent=2, sort_keys=True)))


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in set(a) | set(b):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _diff_keys(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(prefix + key)
    return keys


def _targets(config, lm, workdir: Path) -> TargetSet:
    path = workdir / "targets"
    if path.is_dir():
        return TargetSet.load(path)
    targets = build_targets(config, lm)
    staging = workdir / "targets.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    targets.save(staging)
    staging.rename(path)
    return targets


def _run_soft(config, lm, targets: TargetSet, workdir: Path) -> pd.DataFrame:
    soft = soft_config(config)
    share = parallel.process_slice(len(targets))
    probs = targets.probs[share]
    metadata = targets.metadata.iloc[share].reset_index(drop=True)
    engine = SoftEngine(lm, soft, n_targets=len(probs))
    chunk_dir = workdir / "chunks" / "soft"
    checkpoint_dir = (workdir / "checkpoints" / "soft").absolute()
    chunk_dir.mkdir(parents=True, exist_ok=True)
    bounds = parallel.chunk_bounds(len(probs), engine.chunk_size)
    done = {start for start, _ in bounds if (chunk_dir / f"{start:08d}.npz").is_file()}
    progress = tqdm(
        total=len(probs), initial=sum(stop - start for start, stop in bounds if start in done),
        desc="soft prompts", unit="target", disable=jax.process_index() != 0,
    )
    checkpointer = ocp.StandardCheckpointer()
    for start, stop in bounds:
        if start in done:
            continue
        chunk = _resume_or_start(engine, checkpointer, checkpoint_dir / f"{start:08d}", probs[start:stop], start)
        segments = 0
        while not chunk.finished:
            chunk = engine.advance(chunk)
            segments += 1
            _log(workdir, "soft", start, chunk)
            if segments % config.checkpoint_every == 0 and not chunk.finished:
                _save_chunk(checkpointer, checkpoint_dir / f"{start:08d}", chunk)
        columns, arrays = engine.results(chunk)
        _atomic_write(chunk_dir / f"{start:08d}.npz", lambda path: np.savez(path, **columns, **{
            f"array:{k}": v for k, v in arrays.items()
        }))
        shutil.rmtree(checkpoint_dir / f"{start:08d}", ignore_errors=True)
        progress.update(stop - start)
    progress.close()

    chunks = []
    for start, _ in bounds:
        with np.load(chunk_dir / f"{start:08d}.npz") as saved:
            chunks.append((
                {k: saved[k] for k in saved.files if not k.startswith("array:")},
                {k.removeprefix("array:"): saved[k] for k in saved.files if k.startswith("array:")},
            ))
    result = engine.assemble(chunks, metadata)
    prompts = workdir / "prompts"
    prompts.mkdir(exist_ok=True)
    _atomic_write(prompts / "soft.npz", lambda path: np.savez(path, target_id=metadata.target_id.to_numpy(), **result.arrays))
    table = result.to_pandas()
    return table


def _resume_or_start(engine: SoftEngine, checkpointer, path: Path, probs: np.ndarray, start: int) -> ChunkRun:
    fresh = engine.start(probs, first_index=start)
    if not path.is_dir():
        return fresh
    # The saved leaves restore into the structure of a fresh chunk (best: the same structure as state).
    saved_meta = json.loads((path / "distprompt_chunk.json").read_text())
    template = {"state": fresh.state, "best": fresh.state if saved_meta["has_best"] else None}
    restored = checkpointer.restore(path / "state", jax.tree.map(np.asarray, template))
    run = ChunkRun(start, len(probs), saved_meta["restart"], restored["state"], restored["best"])
    return engine.resume(probs, run)


def _save_chunk(checkpointer, path: Path, chunk: ChunkRun):
    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tree = {"state": chunk.state, "best": chunk.best}
    checkpointer.save(staging / "state", jax.tree.map(np.asarray, tree))
    checkpointer.wait_until_finished()
    (staging / "distprompt_chunk.json").write_text(json.dumps({"restart": chunk.restart, "has_best": chunk.best is not None}))
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)


def _log(workdir: Path, method: str, start: int, chunk: ChunkRun):
    state = chunk.state
    rows = slice(0, chunk.n_rows)
    line = {
        "time": time.time(), "method": method, "chunk": start, "restart": chunk.restart,
        "steps": int(np.max(np.asarray(state.steps)[rows])),
        "mean_best_kl": float(np.mean(np.asarray(state.best_kl)[rows])),
        "active": int(np.sum(np.asarray(state.active)[rows])),
    }
    with open(workdir / "log.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def _write_run_info(config, workdir: Path):
    packages = ["distprompt_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"]
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "config": json.loads(config.to_json()),
        "versions": versions,
        "git_commit": _git_commit(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write(workdir / "run.json", lambda path: Path(path).write_text(json.dumps(info, indent=2)))


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _atomic_write(path: Path, write):
    """Write through a temporary name and rename, so a kill leaves the old file or the new, never half."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    write(temporary)
    os.replace(temporary, path)
