"""Entropy-controlled targets from (h, seed) requests: what vanilla and outlier targets share.

A request's result depends only on its seed, attempt number, h and the options: its initial logits come
from `fold_in(key(seed), attempt)` and its optimization is a row of its own (see entropy.py), so neither
the slot count (the number of rows optimized together) nor its position among the requests changes it
(beyond float32 rounding: batched reductions round differently per shape).

The two ends are exact and skip the optimizer: h within END_SLACK of 0 gives a one-hot (at the argmax
of the seed's logits — the τ → 0 limit — or, with outliers, on the first outlier token), h within
END_SLACK of ln|V| the uniform distribution (τ → ∞). Their recorded temperature is 0 and inf.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distprompt_jax import parallel
from distprompt_jax.field_types import check_field_types
from distprompt_jax.solve import Driver, DriverOptions
from distprompt_jax.targets.batching import default_slots, slot_count
from distprompt_jax.targets.entropy import (
    EntropyProblem,
    EntropySettings,
    make_optimizer,
    match_entropy_by_temperature,
)
from distprompt_jax.targets.io import entropy_nats

END_SLACK = 1e-6
# Optimizer steps per compiled segment; between segments, stopped rows are finished and their slots refilled.
SEGMENT_STEPS = 25
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """How stage 1 runs (entropy.py); recorded in each target's metadata."""

    optimizer: str = "adam"
    learning_rate: float = 0.1
    tolerance: float = 1e-4
    max_steps: int = 1000
    # Vanilla rows stop once |H − h| ≤ tolerance; outlier rows run all max_steps (see entropy.py).
    stop_at_tolerance: bool = True

    def __post_init__(self):
        check_field_types(self)

    def validate(self) -> None:
        make_optimizer(self.optimizer, self.learning_rate)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1) nats, got {self.tolerance}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be non-negative, got {self.max_steps}")

    def metadata(self) -> dict:
        return {"optimizer": self.optimizer, "learning_rate": self.learning_rate, "tolerance": self.tolerance,
                "max_steps": self.max_steps}


def check_vocab_size(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer of at least 2, got {vocab_size!r}")
    return int(vocab_size)


def check_entropies(entropies, vocab_size: int) -> np.ndarray:
    """Requested entropies as float64 [N]; values outside [0, ln|V|] are refused by index."""
    h = np.atleast_1d(np.asarray(entropies, dtype=np.float64))
    if h.ndim != 1 or len(h) == 0:
        raise ValueError(f"entropies must be a non-empty 1-D list of nats, got shape {h.shape}")
    top = np.log(vocab_size)
    bad = np.flatnonzero(~np.isfinite(h) | (h < -END_SLACK) | (h > top + END_SLACK))
    if len(bad):
        listed = ", ".join(f"[{i}]={h[i]!r}" for i in bad[:10])
        raise ValueError(
            f"{len(bad)} requested entropies are outside [0, ln|V|] = [0, {top:.6f}] nats: {listed}"
        )
    return np.clip(h, 0.0, top)


def target_seeds(seed, n: int) -> np.ndarray:
    """Per-target seeds [n]: an int s gives s, s+1, ..., s+n-1; a sequence gives itself."""
    if np.ndim(seed) == 0:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer or a sequence of {n} integers, got {seed!r}")
        seeds = int(seed) + np.arange(n, dtype=np.int64)
    else:
        seeds = np.asarray(seed)
        if seeds.shape != (n,) or not np.issubdtype(seeds.dtype, np.integer):
            raise ValueError(f"seed must be an integer or a sequence of {n} integers, got shape {seeds.shape}")
    if seeds.min() < 0 or seeds.max() > MAX_SEED:
        raise ValueError(f"seeds must lie in [0, 2**32 - 1]; got {seeds.min()} .. {seeds.max()}")
    return seeds.astype(np.int64)


def solve_requests(
    vocab_size: int, entropies: np.ndarray, seeds: np.ndarray, attempts: np.ndarray, options: SolverOptions,
    *, n_outliers: int = 0, alpha: float = 1.0, beta: float = 0.0, slots: int | None = None,
    devices=None, progress: bool = True, desc: str = "targets",
) -> dict[str, np.ndarray]:
    """Targets for requests (h, seed, attempt): float32 probs [N, V] and per-target figures.

    Stage 1 runs on the solver driver: `slots` rows (default `batching.default_slots`) take
    `SEGMENT_STEPS` optimizer steps at a time, and the slots of rows that stopped are refilled between
    segments. Stage 2 runs on the host for the rows that stopped while the next segment computes. The
    requests nearest an end of [0, ln|V|], which take the most steps, are queued first, so the pool does
    not idle on one slow row at the end.

    Returns `probs`, `entropy` (float64, of the float32 probs returned; callers check it against the
    request), `outlier_ids` [N, k], `outlier_mass` (float64, of the returned probs), `steps`,
    `temperature` and `optimizer_matched` (stage 1 itself reached |H − h| ≤ tolerance in float32).
    """
    n = len(entropies)
    top = np.log(vocab_size)
    ends = (entropies <= END_SLACK) | (entropies >= top - END_SLACK)
    # Rows at either end take no optimizer steps: a step limit of 0 freezes them at once.
    step_limits = np.where(ends, 0, options.max_steps)
    order = np.argsort(np.minimum(entropies, top - entropies), kind="stable")
    inputs = {
        "h": entropies[order].astype(np.float32), "seed": seeds[order].astype(np.uint32),
        "attempt": attempts[order].astype(np.uint32), "step_limit": step_limits[order].astype(np.int32),
    }
    results: dict[str, np.ndarray] = {}

    def finish(rows: np.ndarray, reports: dict[str, np.ndarray]):
        requests = order[rows]
        for name, values in _finish(reports, entropies[requests], vocab_size, n_outliers, options.tolerance).items():
            results.setdefault(name, np.empty((n,) + values.shape[1:], values.dtype))[requests] = values

    # A segment is one driver step of SEGMENT_STEPS optimizer steps: see EntropyProblem.optimizer_steps.
    problem = EntropyProblem(vocab_size=vocab_size, n_outliers=n_outliers, optimizer=options.optimizer,
                             stop_at_tolerance=options.stop_at_tolerance, optimizer_steps=SEGMENT_STEPS)
    mesh = parallel.local_mesh(devices)
    size = slot_count(n, default_slots(vocab_size) if slots is None else slots, mesh.size)
    driver_options = DriverOptions(slots=size, segment_steps=1, desc=desc, progress=progress and n > size)
    settings = EntropySettings.of(options.learning_rate, alpha, beta, options.tolerance)
    Driver(problem, settings, driver_options, mesh).run(inputs, on_finished=finish)
    return results


def _finish(rows: dict, h: np.ndarray, vocab_size: int, n_outliers: int, tolerance: float) -> dict:
    """Stage 2, or the exact distribution at either end, for rows that stage 1 is done with."""
    z, ids = rows["z"], rows["outlier_ids"]
    top = np.log(vocab_size)
    one_hot, uniform = h <= END_SLACK, h >= top - END_SLACK
    inner = ~(one_hot | uniform)
    probs = np.zeros(z.shape, np.float32)
    temperature = np.where(one_hot, 0.0, np.inf)
    if inner.any():
        inner_probs, temperature[inner] = match_entropy_by_temperature(z[inner], h[inner])
        probs[inner] = inner_probs
    probs[uniform] = 1.0 / vocab_size
    hot = ids[one_hot, 0] if n_outliers else np.argmax(z[one_hot], axis=1)
    probs[np.flatnonzero(one_hot), hot] = 1.0
    return {
        "probs": probs,
        "entropy": entropy_nats(probs),
        "outlier_ids": ids,
        "outlier_mass": np.take_along_axis(probs, ids, axis=1).astype(np.float64).sum(axis=1),
        "steps": rows["steps"],
        "temperature": temperature,
        "optimizer_matched": ~inner | (np.abs(rows["entropy"].astype(np.float64) - h) <= tolerance),
    }
