"""Target sets: next-token distributions [N, V] for one vocabulary, with per-target metadata.

On disk a TargetSet is a directory: `probs.npy` (float32 [N, V]), `metadata.parquet` (one row per target)
and, when some requests produced no acceptable target, `failures.parquet`. List columns (outlier ids,
context token ids) and text of any characters round-trip exactly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd

SUM_TOLERANCE = 1e-3
PROBS_FILE = "probs.npy"
METADATA_FILE = "metadata.parquet"
FAILURES_FILE = "failures.parquet"


class TargetError(ValueError):
    """Targets that are not probability distributions over the model's vocabulary."""


def entropy_nats(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, float64, 0 log 0 = 0."""
    p = np.asarray(probs, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 0.0 - np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def validate_probs(probs, vocab_size: int | None = None, *, normalize: bool = False) -> np.ndarray:
    """Checked float32 [N, V] probabilities; raises TargetError listing offending rows and why.

    Rows must be finite, non-negative and sum to 1 within 1e-3; they are returned as given (cast to
    float32). `normalize=True` instead rescales rows that are finite, non-negative and have positive mass
    to sum to 1, whatever their sum.
    """
    probs = np.asarray(probs)
    if probs.ndim == 1:
        probs = probs[None]
    if probs.ndim != 2:
        raise TargetError(f"targets must be [N, V] (or one [V] row); got shape {probs.shape}")
    if vocab_size is not None and probs.shape[1] != vocab_size:
        raise TargetError(f"targets have {probs.shape[1]} columns, but the model's vocabulary has {vocab_size}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise TargetError(f"targets must be floating point probabilities, got dtype {probs.dtype}")
    if probs.shape[0] == 0:
        raise TargetError("there are no targets (0 rows)")
    wide = probs.astype(np.float64)
    problems = {}
    for reason, bad in (
        ("not finite", ~np.all(np.isfinite(wide), axis=1)),
        ("negative entries", np.any(wide < 0, axis=1)),
    ):
        for row in np.flatnonzero(bad):
            problems.setdefault(int(row), reason)
    sums = np.where(np.all(np.isfinite(wide), axis=1), wide.sum(axis=1), np.nan)
    if normalize:
        for row in np.flatnonzero(~(sums > 0)):
            problems.setdefault(int(row), "no positive mass to normalize")
    else:
        for row in np.flatnonzero(np.abs(sums - 1) > SUM_TOLERANCE):
            problems.setdefault(int(row), f"sums to {sums[row]:.6g}, not 1 (pass normalize=True to rescale)")
    if problems:
        listed = "; ".join(f"row {row}: {why}" for row, why in sorted(problems.items())[:20])
        more = f" (and {len(problems) - 20} more rows)" if len(problems) > 20 else ""
        raise TargetError(f"{len(problems)} invalid target rows: {listed}{more}")
    return (wide / sums[:, None]).astype(np.float32) if normalize else probs.astype(np.float32)


@dataclasses.dataclass
class TargetSet:
    """Probabilities [N, V] float32 and a DataFrame of per-target metadata (one row per target, in order).

    `failures`: requests that produced no acceptable target (e.g. outlier targets rejected after every
    retry), one metadata row each — kept apart so that every row of `probs` is a usable target.
    """

    probs: np.ndarray
    metadata: pd.DataFrame
    failures: pd.DataFrame | None = None

    def __post_init__(self):
        if len(self.metadata) != len(self.probs):
            raise TargetError(f"{len(self.metadata)} metadata rows for {len(self.probs)} targets")
        for column in ("target_id", "kind", "target_entropy"):
            if column not in self.metadata.columns:
                raise TargetError(f"target metadata lacks the column {column!r}")

    def __len__(self) -> int:
        return len(self.probs)

    @property
    def vocab_size(self) -> int:
        return self.probs.shape[1]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set to directory `path` (created if needed; files of an earlier save are replaced)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / PROBS_FILE, np.asarray(self.probs, np.float32))
        self.metadata.to_parquet(path / METADATA_FILE, index=False)
        failures = path / FAILURES_FILE
        if self.failures is not None and len(self.failures):
            self.failures.to_parquet(failures, index=False)
        elif failures.exists():
            failures.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, vocab_size: int | None = None, *, normalize: bool = False) -> TargetSet:
        """Read a directory written by `save`; the probabilities are validated (see `validate_probs`)."""
        path = Path(path)
        for name in (PROBS_FILE, METADATA_FILE):
            if not (path / name).is_file():
                raise TargetError(f"{path} is not a saved TargetSet: {name} is missing")
        probs = validate_probs(np.load(path / PROBS_FILE), vocab_size, normalize=normalize)
        failures = path / FAILURES_FILE
        return cls(
            probs=probs,
            metadata=_read_table(path / METADATA_FILE),
            failures=_read_table(failures) if failures.exists() else None,
        )


def _read_table(path: Path) -> pd.DataFrame:
    """A parquet table with list columns back as Python lists (pyarrow reads them as numpy arrays)."""
    table = pd.read_parquet(path)
    for column in table.columns:
        if table[column].dtype == object:
            table[column] = [v.tolist() if isinstance(v, np.ndarray) else v for v in table[column]]
    return table


def load_targets(path: str | os.PathLike, vocab_size: int, *, normalize: bool = False) -> TargetSet:
    """Targets from a file: a `.npy` array [N, V], a `.npz` holding one array (or one named `probs`), or a
    directory written by `TargetSet.save`. Validated against the model's vocabulary size."""
    path = Path(path)
    if path.is_dir():
        return TargetSet.load(path, vocab_size, normalize=normalize)
    if not path.is_file():
        raise FileNotFoundError(f"no targets at {path}")
    if path.suffix == ".npy":
        probs = np.load(path, allow_pickle=False)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.keys())
            if "probs" in names:
                probs = archive["probs"]
            elif len(names) == 1:
                probs = archive[names[0]]
            else:
                raise TargetError(f"{path} holds arrays {names}; name the targets 'probs'")
    else:
        raise TargetError(f"{path}: targets must be a .npy or .npz file or a saved TargetSet directory")
    return as_target_set(probs, vocab_size, normalize=normalize)


def as_target_set(targets, vocab_size: int | None = None, *, normalize: bool = False) -> TargetSet:
    """A TargetSet from a TargetSet or an array of probabilities, validated against `vocab_size`."""
    if isinstance(targets, TargetSet):
        probs = validate_probs(targets.probs, vocab_size, normalize=normalize)
        return dataclasses.replace(targets, probs=probs)
    probs = validate_probs(targets, vocab_size, normalize=normalize)
    metadata = pd.DataFrame({
        "target_id": np.arange(len(probs)),
        "kind": "user",
        "target_entropy": entropy_nats(probs),
    })
    return TargetSet(probs=probs, metadata=metadata)
