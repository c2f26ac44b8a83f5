"""Outlier targets: entropy h with k randomly chosen tokens holding as much mass as entropy h allows.

The bound. Among distributions with mass M on k given tokens, entropy is largest when both groups are
uniform: H_max(M) = −M ln M − (1−M) ln(1−M) + M ln k + (1−M) ln(|V|−k), which falls from ln|V| at
M = k/|V| to ln k at M = 1. So at entropy h the k tokens hold at most m(h, k, |V|), the root of
H_max(m) = h (m = 1 when h ≤ ln k). A target is accepted when its outlier mass is at least m − δ and its
entropy within tolerance of h; otherwise it is retried with the next attempt number (a new key from the
same seed) and, after max_retries retries, reported in `TargetSet.failures` — never returned as a target.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from distprompt_jax.targets.controlled import (
    SolverOptions,
    check_entropies,
    check_vocab_size,
    solve_requests,
    target_seeds,
)
from distprompt_jax.targets.io import TargetSet

_BISECTION_STEPS = 200


def max_entropy_at_mass(mass, k: int, vocab_size: int) -> np.ndarray:
    """H_max(M): the largest entropy of a distribution with mass M on k of vocab_size tokens (nats)."""
    m = np.asarray(mass, np.float64)
    rest = 1 - m
    # 0 log 0 = 0 at both ends (M = 0 or 1).
    inside = np.where(m > 0, m * (np.log(k) - np.log(np.where(m > 0, m, 1.0))), 0.0)
    outside = np.where(rest > 0, rest * (np.log(vocab_size - k) - np.log(np.where(rest > 0, rest, 1.0))), 0.0)
    return inside + outside


def outlier_mass_bound(entropies, k: int, vocab_size: int) -> np.ndarray:
    """m(h, k, |V|): the most mass k tokens can hold in a distribution of entropy h (bisection, float64)."""
    _check_k(k, vocab_size)
    h = np.asarray(entropies, np.float64)
    # H_max decreases on [k/|V|, 1]; bisect each h for H_max(m) = h.
    lo = np.full(h.shape, k / vocab_size)
    hi = np.ones(h.shape)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        above = max_entropy_at_mass(mid, k, vocab_size) > h
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    bound = 0.5 * (lo + hi)
    bound = np.where(h <= np.log(k), 1.0, bound)
    return np.where(h >= np.log(vocab_size), k / vocab_size, bound)


def _check_k(k, vocab_size: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < vocab_size:
        raise ValueError(
            f"k (the number of outlier tokens) must be an integer in [1, |V|) = [1, {vocab_size}), got {k!r}"
        )
    return int(k)


def outlier_targets(
    vocab_size: int, entropies, k: int = 10, seed=0, *, alpha: float = 1.0, beta: float = 100.0,
    delta: float = 0.05, tolerance: float = 1e-4, max_retries: int = 3, optimizer: str = "adam",
    learning_rate: float = 0.1, max_steps: int = 500, slots: int | None = None, devices=None,
    progress: bool = True,
) -> TargetSet:
    """One target per requested entropy h whose k random outlier tokens hold nearly the most mass possible.

    Logits z ~ N(0, 1) are optimized on α(H − h)² − β·(mass on the outliers) for max_steps steps, then
    rescaled by a temperature to entropy h exactly (targets/entropy.py). A target is accepted when its
    outlier mass is ≥ m(h, k, |V|) − δ (and its entropy within tolerance); otherwise it is redone with the
    next attempt number, at most max_retries times. Requests still failing are left out of the returned
    set and listed in its `failures` table (with a warning): every row of `probs` is an accepted target.

    Defaults (ours): k=10, α=1, β=100, δ=0.05, 500 Adam steps at lr 0.1, 3 retries. Only β/α matters (Adam
    ignores the loss scale). At β/α ≤ 30 the entropy term, while H is still far from h, drags outlier
    tokens down with all the others, and many low- and mid-entropy targets end below the acceptance line.
    At β/α = 100 every target of our test grids over [0, ln|V|] — |V| = 50, 500 and 49152, k from 1 to
    50 — came within 0.025 of the bound.

    Args:
      vocab_size, entropies, seed, optimizer, learning_rate, slots, devices: as for `vanilla_targets`.
      k: number of outlier tokens, 1 ≤ k < |V|, chosen at random per target (and per attempt).
      alpha, beta: weights of the entropy term and the outlier-mass reward.
      delta: accepted when outlier mass ≥ m − delta.
      tolerance: |H − h| allowed on the returned probabilities.
      max_retries: further attempts for a rejected request.
      max_steps: optimizer steps per attempt (all are run: the loss has no optimum on the constraint).
    Returns:
      TargetSet (kind "outlier"); metadata adds `attempt`, `k`, `outlier_ids` (list), `outlier_mass`,
      `mass_bound`, `delta`, `accepted` (always True here), `alpha`, `beta`. target_id is the request's
      index, so the ids of failures are the gaps.
    """
    vocab_size = check_vocab_size(vocab_size)
    k = _check_k(k, vocab_size)
    h = check_entropies(entropies, vocab_size)
    seeds = target_seeds(seed, len(h))
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, (int, np.integer)) or max_retries < 0:
        raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    if not (alpha > 0 and beta >= 0):
        raise ValueError(f"alpha must be positive and beta non-negative, got alpha={alpha}, beta={beta}")
    options = SolverOptions(optimizer=optimizer, learning_rate=learning_rate, tolerance=tolerance,
                            max_steps=max_steps, stop_at_tolerance=False)
    options.validate()
    bound = outlier_mass_bound(h, k, vocab_size)

    pending = np.arange(len(h))
    attempt = np.zeros(len(h), np.int64)
    kept: dict[str, np.ndarray] = {}
    for round_ in range(max_retries + 1):
        solved = solve_requests(
            vocab_size, h[pending], seeds[pending], np.full(len(pending), round_), options, n_outliers=k,
            alpha=alpha, beta=beta, slots=slots, devices=devices, progress=progress,
            desc=f"outlier targets (attempt {round_ + 1})",
        )
        accepted = (solved["outlier_mass"] >= bound[pending] - delta) & (
            np.abs(solved["entropy"] - h[pending]) <= tolerance
        )
        attempt[pending] = round_
        # The last attempt's result is kept for every request: accepted rows become targets, the rest
        # are overwritten by later attempts or end up as failures.
        for name, values in solved.items():
            kept.setdefault(name, np.empty((len(h),) + values.shape[1:], values.dtype))[pending] = values
        kept.setdefault("accepted", np.zeros(len(h), bool))[pending] = accepted
        pending = pending[~accepted]
        if not len(pending):
            break

    metadata = pd.DataFrame({
        "target_id": np.arange(len(h)),
        "kind": "outlier",
        "target_entropy": h,
        "entropy": kept["entropy"],
        "seed": seeds,
        "attempt": attempt,
        "k": k,
        "outlier_ids": [ids.tolist() for ids in kept["outlier_ids"]],
        "outlier_mass": kept["outlier_mass"],
        "mass_bound": bound,
        "delta": delta,
        "accepted": kept["accepted"],
        "steps": kept["steps"],
        "temperature": kept["temperature"],
        "alpha": alpha,
        "beta": beta,
        **options.metadata(),
    })
    accepted = kept["accepted"]
    failures = metadata[~accepted].reset_index(drop=True)
    if len(failures):
        warnings.warn(
            f"{len(failures)} of {len(h)} outlier targets were rejected after {max_retries + 1} attempts "
            f"(outlier mass below the bound minus delta={delta}); they are listed in .failures, not returned",
            stacklevel=2,
        )
    return TargetSet(
        probs=kept["probs"][accepted], metadata=metadata[accepted].reset_index(drop=True),
        failures=failures if len(failures) else None,
    )
