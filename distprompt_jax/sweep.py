"""Resumable experiments: build the targets, run each method over them on the solver driver, write results.

Everything a run produces lives in its workdir:

    config.json            the run's config; a workdir refuses a different one
    .lock                  held (flock) by the run working in the workdir; a second run is refused
    targets/               the target set, built once (resuming never regenerates it)
    slots/<method>.p<k>.json  the pool size process k uses for a method (recorded once: a resume reuses it)
    checkpoints/<method>/p<k>/  process k's pool (orbax CheckpointManager), every `checkpoint_every` segments
    done/<method>/<first target>.npz  a process's finished results for a method (its columns and arrays)
    tensorboard/<method>/  with config.tensorboard: the same per segment as TensorBoard events
    log.jsonl              one line per segment: method, segment, steps, active, finished, mean/median best KL,
                           useful and computed target·steps, seconds
    results.parquet        one row per (target, method), written when every method is done; with the bound
                           run, every row also carries kl_bound and gap_to_bound (results.with_bound_columns)
    prompts/<method>.npz   the prompts of every target, in target order, and (`RUN_INFO`) the engine's name and
                           run_info: `load_prompts` reads them back as PromptResults that `save_peft` exports
    run.json               config, package versions, git commit, devices

A killed run (SIGKILL at any moment) rerun with the same command resumes from the last checkpoint: files
are written under a temporary name and renamed into place, orbax finalizes a checkpoint only when it is
complete, and the job order and pool size are fixed by the config, so the final results equal an
uninterrupted run's. A corrupt results file or checkpoint is reported by name and recomputed from the last
good state. The temporaries of an interrupted write are removed when the next run starts; log.jsonl gets
each segment once, however often the run was resumed.

A workdir may be shared (a pod's workers, several people): nothing is ever written through a symbolic link in
it (`files.py`): a link where the run writes is refused, naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
import warnings
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from absl import logging

from distprompt_jax import parallel
from distprompt_jax.experiment import (
    BOUND_METHODS,
    bound_config,
    final_norm_config,
    hard_config,
    prefix_config,
    run_order,
    soft_config,
    validate,
)
from distprompt_jax.files import (
    LinkedPathError,
    append_line,
    atomic_write,
    named_os_error,
    open_no_follow,
    real_dir,
    remove_stale_temporaries,
)
from distprompt_jax.metrics import segment_scalars
from distprompt_jax.prompting.engine import Method, run_method
from distprompt_jax.results import RUN_INFO, PromptResults, with_bound_columns
from distprompt_jax.solve import PoolCheckpoint, SegmentInfo
from distprompt_jax.targets import validate_probs
from distprompt_jax.targets.io import METADATA_FILE, PROBS_FILE


class WorkdirError(ValueError):
    """The workdir belongs to another run, or another run is working in it."""


def run(config, workdir: str | os.PathLike) -> pd.DataFrame | None:
    """Run (or resume, or confirm finished) the experiment `config` in `workdir`.

    Multi-host (after `jax.distributed.initialize`): every process runs the same command on a workdir
    they share; process 0 writes the config, targets and final results, each process optimizes its own
    contiguous share of the targets, and only process 0 returns the results table.
    """
    validate(config)  # before anything is written: a corrected command must not meet a half-claimed workdir
    workdir = Path(workdir)
    leader = jax.process_index() == 0
    results_path = workdir / "results.parquet"
    workdir.mkdir(parents=True, exist_ok=True)
    with _exclusive(workdir):
        if leader:
            _claim_workdir(config, workdir)
        _sync("workdir claimed")
        _remove_leftovers(workdir)
        if results_path.is_file():
            if leader:
                logging.info("distprompt: %s already holds the finished run; nothing to do", workdir)
            return pd.read_parquet(results_path) if leader else None

        from distprompt_jax import load_model

        lm = load_model(config.model, dtype=config.dtype)
        validate(config, lm)
        if leader:
            _ensure_targets(config, lm, workdir)
            _write_run_info(config, workdir)
        _sync("targets written")
        metadata, share, probs = _load_share(workdir / "targets", lm.vocab_size)
        tables, floors = [], None
        for method in run_order(config.methods):
            for label, method_factory in _method_runs(config, method, lm):
                tables.append(_run_method(config, label, method_factory, lm, metadata, share, probs, workdir,
                                          floors=None if method in BOUND_METHODS else floors))
            if method == "bound":
                # This process's certified bounds: the floor each of its targets' prompt searches aims at.
                with np.load(workdir / "done" / "bound" / f"{share.start:08d}.npz") as saved:
                    floors = saved["kl"]
        if not leader:
            return None
        results = with_bound_columns(pd.concat(tables, ignore_index=True))
        results.insert(results.columns.get_loc("method") + 1, "model", lm.name)
        atomic_write(results_path, lambda file: results.to_parquet(file, index=False))
        return results


@contextlib.contextmanager
def _exclusive(workdir: Path):
    """Hold the workdir's lock (one per process of a multi-host run) for the whole run; a second run on
    the same workdir is refused, naming the holder."""
    path = workdir / (".lock" if jax.process_count() == 1 else f".lock-p{jax.process_index()}")
    # Never through a link: the lock is truncated below, and a link could make that someone else's file.
    with os.fdopen(open_no_follow(path, os.O_RDWR | os.O_CREAT), "r+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "another process"
            raise WorkdirError(f"{workdir} is in use by {holder}; wait for it to finish or stop it") from None
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _claim_workdir(config, workdir: Path):
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
        atomic_write(config_path, lambda file: file.write(json.dumps(wanted, indent=2, sort_keys=True).encode()))


def _remove_leftovers(workdir: Path) -> None:
    """The temporaries of this host's writes that a kill or a full disk interrupted (each folder a run
    writes files into; checkpoints clean their own)."""
    folders = [workdir, workdir / "prompts", workdir / "slots"]
    folders += [path for path in (workdir / "done").glob("*") if path.is_dir() and not path.is_symlink()]
    for folder in folders:
        remove_stale_temporaries(folder)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in set(a) | set(b):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _diff_keys(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(prefix + key)
    return keys


def _ensure_targets(config, lm, workdir: Path):
    from distprompt_jax.experiment import build_targets

    path = workdir / "targets"
    if path.is_dir():
        return
    staging = workdir / "targets.tmp"
    if staging.is_symlink():
        raise LinkedPathError(staging)
    shutil.rmtree(staging, ignore_errors=True)
    targets = build_targets(config, lm)
    staging.mkdir()  # afresh: nothing placed at that name meanwhile is written into
    try:
        targets.save(staging)
    except OSError as err:  # a full disk: numpy's and pyarrow's errors carry no path
        shutil.rmtree(staging, ignore_errors=True)
        raise named_os_error(err, staging) from err
    staging.rename(path)


def _load_share(path: Path, vocab_size: int) -> tuple[pd.DataFrame, slice, np.ndarray]:
    """All targets' metadata, and this process's share of the probabilities (only those rows are read)."""
    from distprompt_jax.targets.io import read_npy

    for name in (METADATA_FILE, PROBS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} is missing: the workdir's targets are incomplete (deleted or moved?). Put it back, "
                f"or delete {path} to build the targets anew (the run's checkpoints and results then no longer "
                "match them: start over in a new workdir)")
    metadata = pd.read_parquet(path / METADATA_FILE)
    share = parallel.process_slice(len(metadata))
    probs = validate_probs(read_npy(path / PROBS_FILE, mmap_mode="r")[share], vocab_size)
    return metadata, share, probs


def _method_runs(config, method: str, lm) -> list[tuple[str, object]]:
    """(label, method factory) of each run of `method`: one, or one per entry of `config.prompt_lengths`
    for the prompt methods (not the final-norm rung: its one vector has no length)."""
    if method in ("bound", "bound_norm"):
        from distprompt_jax.bounds import BoundMethod, NormMethod

        method_class = BoundMethod if method == "bound" else NormMethod
        return [(method, lambda: method_class(lm, bound_config(config)))]
    if method == "final_norm":
        from distprompt_jax.prompting.soft import SoftMethod

        return [(method, lambda: SoftMethod(lm, final_norm_config(config, lm.n_layers)))]
    if method == "soft":
        from distprompt_jax.prompting.soft import SoftMethod

        base, method_class = soft_config(config), SoftMethod
    elif method == "prefix":
        from distprompt_jax.prompting.prefix import PrefixMethod

        base, method_class = prefix_config(config), PrefixMethod
    else:
        from distprompt_jax.prompting.hard import HardMethod

        base, method_class = hard_config(config), HardMethod
    lengths = tuple(config.get("prompt_lengths") or ())
    if not lengths:
        return [(method, lambda: method_class(lm, base))]
    return [
        (f"{method}-L{length}", lambda length=length: method_class(lm, dataclasses.replace(base, prompt_len=length)))
        for length in lengths
    ]


def _run_method(
    config, label: str, method_factory, lm, metadata: pd.DataFrame, share: slice, probs: np.ndarray, workdir: Path,
    floors: np.ndarray | None = None,
) -> pd.DataFrame | None:
    me = jax.process_index()
    done_dir = real_dir(workdir / "done" / label, workdir)
    done = done_dir / f"{share.start:08d}.npz"
    if not _readable(done):
        method: Method = method_factory()
        checkpoint_dir = workdir / "checkpoints" / label / f"p{me}"
        slots = _recorded_slots(workdir, label, me)
        checkpoint = PoolCheckpoint(real_dir(checkpoint_dir, workdir))
        logged = _logged_segments(workdir, label, me)
        with contextlib.ExitStack() as stack:
            metrics = None
            if config.get("tensorboard", False) and me == 0:
                from distprompt_jax.metrics import SegmentMetrics

                metrics = stack.enter_context(SegmentMetrics(real_dir(workdir / "tensorboard" / label, workdir)))

            def on_segment(info: SegmentInfo):
                if info.segment in logged:  # logged before a resume: the resumed pool computes it again
                    return
                _log(workdir, label, info)
                if metrics is not None:
                    metrics.write(info.segment, segment_scalars(info))

            result = run_method(
                method, lm, probs, take_share=False, first_index=share.start, checkpoint=checkpoint, slots=slots,
                on_segment=on_segment, progress=me == 0, checkpoint_every=config.checkpoint_every,
                on_slots=lambda n: _record_slots(workdir, label, me, n), floors=floors,
            )
        checkpoint.close()
        info = method.run_info() if hasattr(method, "run_info") else {}
        recorded = json.dumps({"engine": method.name, "run_info": info})
        atomic_write(done, lambda file: np.savez(
            file, **result.columns, **{f"array:{k}": v for k, v in result.arrays.items()}, **{RUN_INFO: recorded}
        ))
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        for folder in (checkpoint_dir.parent, checkpoint_dir.parent.parent):  # empty once every process is done
            with contextlib.suppress(OSError):
                folder.rmdir()
    _sync(f"{label} done")
    if me != 0:
        return None
    columns, arrays, recorded = _read_done(done_dir, len(metadata))
    result = PromptResults(method=label, columns=columns, arrays=arrays, metadata=metadata)
    table = result.to_pandas()
    prompts = real_dir(workdir / "prompts", workdir)
    atomic_write(prompts / f"{label}.npz", lambda file: np.savez(
        file, target_id=metadata.target_id.to_numpy(), **result.arrays, **{RUN_INFO: recorded}
    ))
    return table


def _readable(path: Path) -> bool:
    """Whether a finished-results file is there and whole; a damaged one is named, removed and recomputed."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as saved:
            for name in saved.files:
                saved[name]
        return True
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"{path} is damaged ({err}); recomputing it from the last good checkpoint")
        path.unlink()
        return False


def _slots_file(workdir: Path, label: str, process: int) -> Path:
    return workdir / "slots" / f"{label}.p{process}.json"


def _recorded_slots(workdir: Path, label: str, process: int) -> int | None:
    path = _slots_file(workdir, label, process)
    return json.loads(path.read_text())["slots"] if path.is_file() else None


def _record_slots(workdir: Path, label: str, process: int, slots: int):
    path = _slots_file(workdir, label, process)
    real_dir(path.parent, workdir)
    if not path.is_file():
        atomic_write(path, lambda file: file.write(json.dumps({"slots": slots}).encode()))


def _read_done(done_dir: Path, n_targets: int) -> tuple[dict, dict, str]:
    """Every process's finished results in target order, checked to cover each target exactly once:
    (columns, arrays, the first process's `RUN_INFO` JSON; every process records the same)."""
    parts, expected_start = [], 0
    files = [p for p in done_dir.glob("*.npz") if p.stem.isdigit()]  # not the temporaries of a killed write
    for path in sorted(files, key=lambda p: int(p.stem)):
        if int(path.stem) != expected_start:
            raise RuntimeError(f"{done_dir}: {path.name} does not start at target {expected_start}")
        with np.load(path) as saved:
            columns = {k: saved[k] for k in saved.files if not k.startswith("array:") and k != RUN_INFO}
            arrays = {k.removeprefix("array:"): saved[k] for k in saved.files if k.startswith("array:")}
            # A file finished by an earlier version records nothing: its prompts cannot be exported.
            recorded = (str(saved[RUN_INFO]) if RUN_INFO in saved.files
                        else json.dumps({"engine": None, "run_info": {}}))
        parts.append((columns, arrays, recorded))
        expected_start += len(columns["kl"])
    if expected_start != n_targets:
        raise RuntimeError(f"{done_dir}: results cover {expected_start} of {n_targets} targets")
    columns = {k: np.concatenate([c[k] for c, _, _ in parts]) for k in parts[0][0]}
    arrays = {k: np.concatenate([a[k] for _, a, _ in parts]) for k in parts[0][1]}
    return columns, arrays, parts[0][2]


def load_prompts(workdir: str | os.PathLike, label: str) -> PromptResults:
    """The prompts a finished experiment in `workdir` found with the method `label` ("soft", "prefix",
    "final_norm", "soft-L5", ...) as PromptResults that `save_peft` takes: `PromptResults.load(workdir, label)`
    (prompts/<label>.npz's arrays and run_info, results.parquet's rows of `label`, the targets' metadata). Its
    `method` is the engine's name ("soft" for "soft-L5" and for the final-norm rung, whose intervention
    `save_peft` refuses by name).
    """
    return PromptResults.load(workdir, label)


def _log(workdir: Path, label: str, info: SegmentInfo) -> None:
    line = {"time": time.time(), "method": label, "process": jax.process_index(), **dataclasses.asdict(info)}
    append_line(workdir / "log.jsonl", json.dumps(line))


def _logged_segments(workdir: Path, label: str, process: int) -> set[int]:
    """The segments of `label`'s pool on `process` that log.jsonl already has (a resumed run computes the
    segments after its checkpoint again, and logs only those not logged before)."""
    path = workdir / "log.jsonl"
    if path.is_symlink():
        raise LinkedPathError(path)
    if not path.is_file():
        return set()
    logged = set()
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:  # a line a kill cut short
            continue
        if line.get("method") == label and line.get("process") == process:
            logged.add(line["segment"])
    return logged


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
    atomic_write(workdir / "run.json", lambda file: file.write(json.dumps(info, indent=2).encode()))


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None

