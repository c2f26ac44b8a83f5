"""Resumable experiments: build the targets, run each method over them in chunks, write the results.

Everything a run produces lives in its workdir:

    config.json            the run's config; a workdir refuses a different one
    targets/               the target set, built once (resuming never regenerates it)
    chunks/<method>/       one finished chunk each: <start>.npz (its table's columns and its prompts)
    checkpoints/<method>/  the unfinished chunk's optimizer state (orbax), every `checkpoint_every` segments:
                           <chunk start>/<version>, the previous version deleted once the next is complete
    log.jsonl              one line per segment: method, chunk, restart, steps, mean KL, targets still active
    results.parquet        one row per (target, method), written when every chunk is done
    prompts/<method>.npz   the prompts of every target, in target order
    run.json               config, package versions, git commit, devices

A killed run (SIGKILL at any moment) rerun with the same command resumes from the last checkpoint: chunk
results and checkpoints are written to a temporary name and renamed into place, and a checkpoint's previous
version goes only once the next is complete, so a kill never leaves a half-written file in use. Chunks are
deterministic given the seed, so the final results equal an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
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
from distprompt_jax.prompting.engine import concat_chunks
from distprompt_jax.prompting.soft import SoftEngine
from distprompt_jax.results import PromptResults
from distprompt_jax.targets import validate_probs
from distprompt_jax.targets.io import METADATA_FILE, PROBS_FILE

METHODS = ("soft", "hard", "bound", "bound_norm")


class WorkdirError(ValueError):
    """The workdir belongs to another run."""


def run(config, workdir: str | os.PathLike) -> pd.DataFrame | None:
    """Run (or resume, or confirm finished) the experiment `config` in `workdir`.

    Multi-host (after `jax.distributed.initialize`): every process runs the same command on a workdir
    they share; process 0 writes the config, targets and final results, each process optimizes its own
    contiguous share of the targets, and only process 0 returns the results table.
    """
    workdir = Path(workdir)
    leader = jax.process_index() == 0
    results_path = workdir / "results.parquet"
    if leader:
        _claim_workdir(config, workdir)
    _sync("workdir claimed")
    if results_path.is_file():
        if leader:
            print(f"distprompt: {workdir} already holds the finished run; nothing to do", file=sys.stderr)
        return pd.read_parquet(results_path) if leader else None

    from distprompt_jax import load_model

    lm = load_model(config.model, dtype=config.dtype)
    if leader:
        _ensure_targets(config, lm, workdir)
        _write_run_info(config, workdir)
    _sync("targets written")
    metadata, share, probs = _load_share(workdir / "targets", lm.vocab_size)
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} in config.methods; available: {METHODS}")
    tables = []
    for method in config.methods:
        for label, engine_factory in _engine_runs(config, method, lm, len(probs)):
            tables.append(_run_engine(config, engine_factory, label, lm, metadata, share, probs, workdir))
    if not leader:
        return None
    results = pd.concat(tables, ignore_index=True)
    results.insert(results.columns.get_loc("method") + 1, "model", lm.name)
    _atomic_write(results_path, lambda path: results.to_parquet(path, index=False))
    return results


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def _ensure_targets(config, lm, workdir: Path):
    path = workdir / "targets"
    if path.is_dir():
        return
    staging = workdir / "targets.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    build_targets(config, lm).save(staging)
    staging.rename(path)


def _load_share(path: Path, vocab_size: int) -> tuple[pd.DataFrame, slice, np.ndarray]:
    """All targets' metadata, and this process's share of the probabilities (only those rows are read)."""
    metadata = pd.read_parquet(path / METADATA_FILE)
    share = parallel.process_slice(len(metadata))
    probs = validate_probs(np.load(path / PROBS_FILE, mmap_mode="r")[share], vocab_size)
    return metadata, share, probs


def _engine_runs(config, method: str, lm, n_targets: int) -> list[tuple[str, object]]:
    """(label, engine factory) of each run of `method`: one, or one per entry of `config.prompt_lengths`
    for the prompt engines. Bounds run as engines too (one segment each) so everything resumes alike."""
    if method in ("bound", "bound_norm"):
        from distprompt_jax.experiment import bound_config

        bound = bound_config(config)
        return [(method, lambda: _FunctionEngine(method, lm, bound))]
    if method == "soft":
        base, engine_class = soft_config(config), SoftEngine
    else:
        from distprompt_jax.experiment import hard_config
        from distprompt_jax.prompting.hard import HardEngine

        base, engine_class = hard_config(config), HardEngine
    lengths = tuple(config.get("prompt_lengths", ()))
    if not lengths:
        return [(method, lambda: engine_class(lm, base, n_targets=n_targets))]
    return [
        (f"{method}-L{length}",
         lambda length=length: engine_class(lm, dataclasses.replace(base, prompt_len=length), n_targets=n_targets))
        for length in lengths
    ]


class _FunctionEngine:
    """The bound computations behind the engine interface: a chunk is one call (no mid-chunk state)."""

    def __init__(self, method: str, lm, config):
        from distprompt_jax import bounds

        self.method, self.lm, self.config = method, lm, config
        self.function = bounds.unembedding_bound if method == "bound" else bounds.norm_bound_estimate
        self.chunk_size = config.chunk_size

    def start(self, probs: np.ndarray, first_index: int) -> _FunctionRun:
        result = self.function(self.lm, probs, self.config, take_share=False)  # probs: this process's rows
        return _FunctionRun(first_index, len(probs), result.columns, result.arrays)

    def advance(self, run):
        raise AssertionError("a bound chunk finishes when it starts")

    def results(self, run) -> tuple[dict, dict]:
        return run.columns, run.arrays

    def assemble(self, chunks, metadata) -> PromptResults:
        columns, arrays = concat_chunks(chunks)
        return PromptResults(method=self.method, columns=columns, arrays=arrays, metadata=metadata)


@dataclasses.dataclass
class _FunctionRun:
    first_index: int
    n_rows: int
    columns: dict
    arrays: dict
    finished: bool = True


def _run_engine(
    config, engine_factory, label: str, lm, metadata: pd.DataFrame, share: slice, probs: np.ndarray,
    workdir: Path,
) -> pd.DataFrame | None:
    chunk_dir = workdir / "chunks" / label
    checkpoint_dir = (workdir / "checkpoints" / label).absolute()
    chunk_dir.mkdir(parents=True, exist_ok=True)
    engine = engine_factory()
    # Files are named by the global index of the chunk's first target.
    bounds = [(share.start + a, share.start + b) for a, b in parallel.chunk_bounds(len(probs), engine.chunk_size)]
    done = {start for start, _ in bounds if _chunk_file(chunk_dir, start).is_file()}
    progress = tqdm(
        total=len(probs), initial=sum(stop - start for start, stop in bounds if start in done),
        desc=label, unit="target", disable=jax.process_index() != 0,
    )
    checkpointer = _process_local_checkpointer()
    for start, stop in bounds:
        if start in done:
            continue
        rows = probs[start - share.start : stop - share.start]
        checkpoint = checkpoint_dir / f"{start:08d}"
        chunk = _resume_or_start(engine, checkpointer, checkpoint, rows, start)
        segments = 0
        while not chunk.finished:
            chunk = engine.advance(chunk)
            segments += 1
            line = _log(workdir, label, start, chunk)
            # A chunk can take minutes: the bar moves per chunk, its postfix per segment.
            progress.set_postfix(chunk=start, step=line["steps"], mean_kl=f"{line['mean_best_kl']:.3f}",
                                 active=line["active"])
            if segments % config.checkpoint_every == 0 and not chunk.finished:
                _save_chunk(checkpointer, checkpoint, chunk)
        columns, arrays = engine.results(chunk)
        _atomic_write(_chunk_file(chunk_dir, start), lambda path: np.savez(
            path, **columns, **{f"array:{k}": v for k, v in arrays.items()}
        ))
        shutil.rmtree(checkpoint, ignore_errors=True)
        progress.update(stop - start)
    progress.close()
    _sync(f"{label} chunks written")
    if jax.process_index() != 0:
        return None
    result = engine.assemble(_read_chunks(chunk_dir, len(metadata)), metadata)
    table = result.to_pandas()
    table["method"] = label
    prompts = workdir / "prompts"
    prompts.mkdir(exist_ok=True)
    _atomic_write(prompts / f"{label}.npz", lambda path: np.savez(
        path, target_id=metadata.target_id.to_numpy(), **result.arrays
    ))
    return table


def _chunk_file(chunk_dir: Path, start: int) -> Path:
    return chunk_dir / f"{start:08d}.npz"


def _read_chunks(chunk_dir: Path, n_targets: int) -> list[tuple[dict, dict]]:
    """Every process's finished chunks in target order, checked to cover each target exactly once."""
    chunks, expected_start = [], 0
    for path in sorted(chunk_dir.glob("*.npz"), key=lambda p: int(p.stem)):
        if int(path.stem) != expected_start:
            raise RuntimeError(f"{chunk_dir}: chunk {path.name} does not start at target {expected_start}")
        with np.load(path) as saved:
            columns = {k: saved[k] for k in saved.files if not k.startswith("array:")}
            arrays = {k.removeprefix("array:"): saved[k] for k in saved.files if k.startswith("array:")}
        chunks.append((columns, arrays))
        expected_start += len(columns["kl"])
    if expected_start != n_targets:
        raise RuntimeError(f"{chunk_dir}: chunks cover {expected_start} of {n_targets} targets")
    return chunks


def _process_local_checkpointer() -> ocp.StandardCheckpointer:
    """Each process checkpoints its own chunks on its own: no barrier with the other processes.

    Orbax names the coordination-service keys a save signals through by a per-process counter, so two
    processes saving around the same time share keys, and one can wait on a key the other already
    consumed until orbax's 5-minute timeout. Orbax's own per-process mode (CheckpointManager's
    enable_per_process_directory_creation) gives each process its own key prefix; so do we.
    """
    me = jax.process_index()
    if jax.process_count() > 1:
        from orbax.checkpoint._src.futures import future

        future.AwaitableSignalsContract.awaitable_signals_contract_prefix = f"awaitable_signals_contract_p{me}"
    local = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process{me}"
    )
    return ocp.StandardCheckpointer(multiprocessing_options=local)


def _resume_or_start(engine, checkpointer, path: Path, probs: np.ndarray, start: int):
    fresh = engine.start(probs, first_index=start)
    versions = _checkpoint_versions(path)
    if not versions:
        return fresh
    latest = path / f"{versions[-1]:08d}"
    scalars = json.loads((latest / "distprompt_chunk.json").read_text())
    # Saved arrays restore into the structure of a fresh run's state (a soft run's best shares it).
    template = {name: jax.tree.map(np.asarray, fresh.state) for name in scalars.pop("arrays")}
    restored = checkpointer.restore(latest / "state", template)
    return engine.resume(probs, dataclasses.replace(fresh, **restored, **scalars))


def _checkpoint_versions(path: Path) -> list[int]:
    """The complete checkpoints of a chunk, oldest first (an unfinished one is still named `<n>.tmp`)."""
    return sorted(int(p.name) for p in path.glob("*") if p.name.isdigit()) if path.is_dir() else []


def _save_chunk(checkpointer, path: Path, chunk):
    """A new checkpoint version beside the last one, which is deleted only once the new one is complete:
    a kill at any moment leaves at least one complete checkpoint."""
    versions = _checkpoint_versions(path)
    version = versions[-1] + 1 if versions else 0
    for stale in path.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = path / f"{version:08d}.tmp"
    staging.mkdir(parents=True)
    fields = {f.name: getattr(chunk, f.name) for f in dataclasses.fields(chunk)}
    # Per-target arrays go to orbax, the ints beside them to JSON.
    arrays = {k: jax.tree.map(np.asarray, v) for k, v in fields.items() if k in chunk.ARRAY_FIELDS and v is not None}
    scalars = {k: v for k, v in fields.items() if k not in chunk.ARRAY_FIELDS and k != "first_index"}
    checkpointer.save(staging / "state", arrays)
    checkpointer.wait_until_finished()
    (staging / "distprompt_chunk.json").write_text(json.dumps({**scalars, "arrays": sorted(arrays)}))
    staging.rename(path / f"{version:08d}")
    for old in versions:
        shutil.rmtree(path / f"{old:08d}", ignore_errors=True)


def _log(workdir: Path, method: str, start: int, chunk) -> dict:
    state = chunk.state
    rows = slice(0, chunk.n_rows)
    line = {
        "time": time.time(), "method": method, "chunk": start, "restart": getattr(chunk, "restart", 0),
        "steps": int(np.max(np.asarray(state.steps)[rows])),
        "mean_best_kl": float(np.mean(np.asarray(state.best_kl)[rows])),
        "active": int(np.sum(np.asarray(state.active)[rows])),
    }
    with open(workdir / "log.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


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
