"""Target sets: next-token distributions [N, V] for one vocabulary, with per-target metadata.

On disk a TargetSet is a directory: `probs.npy` (float32 [N, V]), `metadata.parquet` (one row per target)
and, when some requests produced no acceptable target, `failures.parquet`. List columns (outlier ids,
context token ids) and text of any characters round-trip exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import entr

SUM_TOLERANCE = 1e-3
PROBS_FILE = "probs.npy"
METADATA_FILE = "metadata.parquet"
FAILURES_FILE = "failures.parquet"


class TargetError(ValueError):
    """Targets that are not probability distributions over the model's vocabulary."""


def entropy_nats(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, in float64 whatever the input's dtype; 0 log 0 = 0 (scipy's `entr`)."""
    return entr(np.asarray(probs, np.float64)).sum(axis=-1)


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
    """The array in a .npy file, read without ever unpickling (`mmap_mode` as for `np.load`).

    Raises TargetError naming the file when it is not a .npy array (e.g. a pickle), holds Python objects, or
    is shorter than its header says (truncated: a copy or a write that did not finish).
    """
    path = Path(path)
    with open(path, "rb") as file:
        try:
            version = np.lib.format.read_magic(file)
        except ValueError:
            raise TargetError(f"{path} is not a .npy array file (no numpy header); targets are read from .npy / "
                              ".npz arrays only, and pickled data is never loaded") from None
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is not None:  # format 3.0 (utf-8 field names) is left to numpy's own checks
            shape, _, dtype = read_header(file)
            if dtype.hasobject:
                raise TargetError(f"{path} holds Python objects (dtype {dtype}), which would need unpickling: "
                                  "save the probabilities as a float array")
            expected = file.tell() + math.prod(shape) * dtype.itemsize
            size = os.fstat(file.fileno()).st_size
            if size < expected:
                raise TargetError(f"{path} is truncated: its header announces a {dtype} array of shape {shape} "
                                  f"({expected} bytes with the header), but the file has {size} bytes")
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a .npz archive, never unpickled; TargetError naming the file if it is not one."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise TargetError(f"{path} is not a .npz archive (not a zip file); pickled data is never loaded")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise TargetError(f"{path} is not a readable .npz archive of arrays: {err}") from None


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
        probs = validate_probs(read_npy(path / PROBS_FILE), vocab_size, normalize=normalize)
        failures = path / FAILURES_FILE
        return cls(
            probs=probs,
            metadata=read_table(path / METADATA_FILE),
            failures=read_table(failures) if failures.exists() else None,
        )


def read_table(path: Path) -> pd.DataFrame:
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
        probs = read_npy(path)
    elif path.suffix == ".npz":
        arrays = read_npz(path)
        if "probs" in arrays:
            probs = arrays["probs"]
        elif len(arrays) == 1:
            (probs,) = arrays.values()
        else:
            raise TargetError(f"{path} holds arrays {sorted(arrays)}; name the targets 'probs'")
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
