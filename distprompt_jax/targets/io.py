"""Target sets: next-token distributions [N, V] for one vocabulary, with per-target metadata."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

SUM_TOLERANCE = 1e-3


class TargetError(ValueError):
    """Targets that are not probability distributions over the model's vocabulary."""


def entropy_nats(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, float64, 0 log 0 = 0."""
    p = np.asarray(probs, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def validate_probs(probs, vocab_size: int | None = None, *, normalize: bool = False) -> np.ndarray:
    """Checked float32 [N, V] probabilities; raises TargetError listing offending rows and why.

    Rows must be finite, non-negative and sum to 1 within 1e-3; `normalize=True` rescales rows that are
    finite, non-negative and have positive mass instead of refusing them for their sum.
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
    probs = probs.astype(np.float64)
    problems = {}
    for reason, bad in (
        ("not finite", ~np.all(np.isfinite(probs), axis=1)),
        ("negative entries", np.any(probs < 0, axis=1)),
    ):
        for row in np.flatnonzero(bad):
            problems.setdefault(int(row), reason)
    sums = np.where(np.all(np.isfinite(probs), axis=1), probs.sum(axis=1), np.nan)
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
    return (probs / sums[:, None]).astype(np.float32)


@dataclasses.dataclass
class TargetSet:
    """Probabilities [N, V] float32 and a DataFrame of per-target metadata (one row per target, in order)."""

    probs: np.ndarray
    metadata: pd.DataFrame

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
