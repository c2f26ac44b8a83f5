"""The contract between a per-target optimization and the driver that runs many of them at once.

A `Problem` describes ONE target's optimization as pure functions; the driver vmaps them over a pool of
slots, freezes finished slots, refills them with waiting targets, shards the slots over devices, and
checkpoints the pool. Every problem's state carries a `Progress` (steps run, best objective, still
active) so the driver can stop, refill, log and compare attempts without knowing the problem.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


class Progress(NamedTuple):
    """What every per-target state carries (one target; the driver adds the slot axis)."""

    steps: jax.Array  # int32: steps run
    best: jax.Array  # float32: the best objective value found (lower is better)
    active: jax.Array  # bool: still running

    @classmethod
    def start(cls, best=jnp.inf) -> Progress:
        return cls(jnp.int32(0), jnp.asarray(best, jnp.float32), jnp.asarray(True))


@runtime_checkable
class Problem(Protocol):
    """One configured per-target optimization. Implementations are frozen, hashable dataclasses whose
    fields are exactly what enters tracing: two equal problems compile to the same program.

    Per-target functions (the driver maps them over slots):
      prepare(inputs) -> target            device-side per-target data from the inputs the caller gives
                                           (e.g. p -> (p, log p)) and the driver's `inputs["floor"]` (a
                                           proven lower bound on the objective, 0 when none is known);
                                           called once when a target takes a slot
      init(params, target, index, attempt, key) -> state
                                           the start of one attempt; `index` is the target's index in the
                                           whole target set, `attempt` counts from 0 (a problem may start
                                           later attempts differently), `key` is folded from (seed,
                                           attempt, index)
      step(params, target, state) -> state one step; sets `state.progress.active` False when it is done
      report(params, target, state) -> dict[str, array]
                                           the per-target results of a finished attempt
    The state is a pytree with a `progress: Progress` field.
    """

    def prepare(self, inputs: dict) -> Any: ...

    def init(self, params, target, index, attempt, key) -> Any: ...

    def step(self, params, target, state) -> Any: ...

    def report(self, params, target, state) -> dict: ...


def blown_up(variable) -> jax.Array:
    """Whether a search's variable (a pytree of float arrays) left the numbers a model computes with: an entry
    not finite, or so large that the sum of squares along its last axis overflows float32 — there a norm is
    inf, a normalization returns 0 and the output no longer depends on the variable (a learning rate of 1e30
    took soft prompts to 1e29 and every target's output to exactly uniform, at a finite KL). A search that
    got there has diverged, whatever KL it still reports."""

    def leaf(x):
        limit = np.sqrt(np.finfo(np.float32).max / max(1, x.shape[-1] if x.ndim else 1))
        return ~jnp.all(jnp.abs(x) < limit)  # nan compares False: counted as blown up

    return jnp.any(jnp.stack([leaf(x) for x in jax.tree.leaves(variable)]))


def select(mask, new, old):
    """Per-slot choice between two pytrees whose leaves share the leading slot axis of `mask`."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (jnp.ndim(a) - 1)), a, b)

    return jax.tree.map(pick, new, old)


class Patience(NamedTuple):
    """Early stopping on a minimized value: best so far, steps since it improved by more than min_delta."""

    since_improve: jax.Array

    @classmethod
    def start(cls) -> Patience:
        return cls(jnp.int32(0))


def track(progress: Progress, patience: Patience, value, *, min_delta: float, max_steps: int,
          patience_steps: int) -> tuple[Progress, Patience, jax.Array]:
    """Progress and patience after one step that evaluated `value` (at the state before the step).

    Returns (progress, patience, better): `better` says the value is a new best (strictly lower), which the
    caller uses to keep the best point. A non-finite value is never a new best.
    """
    better = jnp.isfinite(value) & (value < progress.best)
    improved = better & (value < progress.best - min_delta)
    since = jnp.where(improved, 0, patience.since_improve + 1)
    steps = progress.steps + 1
    active = (since < patience_steps) & (steps < max_steps)
    best = jnp.where(better, value, progress.best).astype(jnp.float32)
    return Progress(steps, best, active), Patience(since), better
