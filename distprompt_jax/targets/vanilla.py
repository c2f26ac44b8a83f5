"""Vanilla targets: random logits shaped by an optimizer until their softmax has the requested entropy."""

from __future__ import annotations

import numpy as np
import pandas as pd

from distprompt_jax.targets.controlled import (
    SolverOptions,
    check_entropies,
    check_vocab_size,
    solve_requests,
    target_seeds,
)
from distprompt_jax.targets.io import TargetError, TargetSet


def entropy_grid(vocab_size: int, step: float = 0.5) -> np.ndarray:
    """Entropies 0, step, 2·step, ... and always ln|V| itself (both ends included), in nats."""
    top = np.log(check_vocab_size(vocab_size))
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    grid = np.arange(0.0, top, step)
    return np.append(grid[grid < top - 1e-9], top)


def vanilla_targets(
    vocab_size: int, entropies, seed=0, *, optimizer: str = "adam", learning_rate: float = 0.1,
    tolerance: float = 1e-4, max_steps: int = 1000, slots: int | None = None, devices=None,
    progress: bool = True,
) -> TargetSet:
    """One target per requested entropy h: logits z ~ N(0, 1) over the vocabulary, optimized on (H − h)².

    Args:
      vocab_size: |V|.
      entropies: requested entropies in nats, each in [0, ln|V|]; 0 gives an exact one-hot, ln|V| the
        exact uniform distribution.
      seed: an int s (target i uses seed s + i) or one seed per target; a target depends only on its
        seed, its h and the options below.
      optimizer, learning_rate: any optax optimizer by name and its learning rate (Adam, 0.1).
      tolerance: |H − h| allowed, in nats, on the returned float32 probabilities.
      max_steps: optimizer steps per target at most; a target not within tolerance by then is finished
        by the exact temperature step (see targets/entropy.py; its `optimizer_matched` is False).
      slots: targets optimized at once (default `targets.batching.default_slots`: 16 of |V| = 49152 on
        a CPU, 1024 on an accelerator); a finished target's slot is refilled with the next request.
      devices: devices to split the slots over (default: this process's).
    Returns:
      TargetSet with kind "vanilla" and metadata target_id, kind, target_entropy (requested), entropy
      (achieved), seed, steps, optimizer_matched, temperature, optimizer, learning_rate, tolerance, max_steps.
    """
    vocab_size = check_vocab_size(vocab_size)
    h = check_entropies(entropies, vocab_size)
    seeds = target_seeds(seed, len(h))
    options = SolverOptions(optimizer=optimizer, learning_rate=learning_rate, tolerance=tolerance,
                            max_steps=max_steps)
    options.validate()
    solved = solve_requests(
        vocab_size, h, seeds, np.zeros(len(h), np.int64), options, slots=slots, devices=devices,
        progress=progress, desc="vanilla targets",
    )
    missed = np.flatnonzero(np.abs(solved["entropy"] - h) > tolerance)
    if len(missed):  # stage 2 reaches 1e-10 for any non-constant logits; this guards the guarantee
        raise TargetError(f"targets {missed[:10].tolist()} missed their entropy (requested "
                          f"{h[missed[:10]].tolist()}, got {solved['entropy'][missed[:10]].tolist()})")
    metadata = pd.DataFrame({
        "target_id": np.arange(len(h)),
        "kind": "vanilla",
        "target_entropy": h,
        "entropy": solved["entropy"],
        "seed": seeds,
        "steps": solved["steps"],
        "optimizer_matched": solved["optimizer_matched"],
        "temperature": solved["temperature"],
        **options.metadata(),
    })
    return TargetSet(probs=solved["probs"], metadata=metadata)
