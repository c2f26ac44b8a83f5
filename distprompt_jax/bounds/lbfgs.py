"""A float32 L-BFGS for one target, one trial point per step, as per-target state for the solver driver.

One step evaluates exactly one trial point, so a pool of targets advances in lockstep under vmap (no inner
line-search loop whose length differs between targets): a rejected trial shrinks the step for the next
call. `optax.lbfgs` with its zoom line search under vmap took 278 s for 50 steps × 16 targets here, this
~12 s (BUILD.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distprompt_jax.solve import Progress

MAX_FAILS = 30  # rejected trials in a row before a target stops
PATIENCE = 100  # steps without progress before a target stops


class LBFGSState(NamedTuple):
    """One target's L-BFGS state."""

    x: jax.Array
    f: jax.Array
    g: jax.Array
    s_hist: jax.Array  # [m, d], newest first
    y_hist: jax.Array
    rho: jax.Array  # [m]
    count: jax.Array  # pairs stored
    direction: jax.Array
    alpha: jax.Array  # step length being tried
    fails: jax.Array  # consecutive rejected trials
    best_grad: jax.Array  # smallest gradient norm seen
    mark: jax.Array  # f when progress was last recorded
    last_step: jax.Array  # length of the last accepted step
    stale: jax.Array  # steps since the last progress (f down by 1e-6 relative, or best_grad down by 1%)


class SolverState(NamedTuple):
    """What the driver holds per target: its progress (best = the current f) and the L-BFGS state."""

    progress: Progress
    lbfgs: LBFGSState


def start(value_and_grad: Callable, x0, memory: int) -> SolverState:
    """The state at x0; a target whose gradient is exactly zero there is done before its first step."""
    f, g = value_and_grad(x0)
    lbfgs = _init(x0, f, g, memory)
    return SolverState(Progress(jnp.int32(0), f.astype(jnp.float32), ~(lbfgs.best_grad <= 0)), lbfgs)


def advance(state: SolverState, value_and_grad: Callable, *, tolerance: float, max_steps: int) -> SolverState:
    """One step; the target stops at gradient norm ≤ `tolerance`, when stalled, or after `max_steps`."""
    lbfgs, stop = _step(state.lbfgs, value_and_grad, tolerance)
    steps = state.progress.steps + 1
    return SolverState(Progress(steps, lbfgs.f.astype(jnp.float32), ~stop & (steps < max_steps)), lbfgs)


def _two_loop(g, s_hist, y_hist, rho, count):
    """−H g for the L-BFGS inverse-Hessian approximation H (identity scaled by 1/max(‖g‖, 1) when empty)."""
    m = s_hist.shape[0]
    valid = jnp.arange(m) < count

    def first(q, i):
        a = jnp.where(valid[i], rho[i] * jnp.vdot(s_hist[i], q), 0.0)
        return q - a * y_hist[i], a

    q, a = jax.lax.scan(first, g, jnp.arange(m))
    yy = jnp.vdot(y_hist[0], y_hist[0])
    gamma = jnp.where(count > 0, jnp.vdot(s_hist[0], y_hist[0]) / jnp.where(yy > 0, yy, 1.0),
                      1.0 / jnp.maximum(jnp.linalg.norm(g), 1.0))

    def second(r, i):
        beta = jnp.where(valid[i], rho[i] * jnp.vdot(y_hist[i], r), 0.0)
        return r + jnp.where(valid[i], a[i] - beta, 0.0) * s_hist[i], None

    r, _ = jax.lax.scan(second, gamma * q, jnp.arange(m)[::-1])
    return -r


def _init(x, f, g, memory: int) -> LBFGSState:
    hist = jnp.zeros((memory,) + x.shape, x.dtype)
    rho = jnp.zeros((memory,), x.dtype)
    direction = _two_loop(g, hist, hist, rho, jnp.int32(0))
    zero = jnp.int32(0)
    one = jnp.ones((), x.dtype)
    return LBFGSState(x, f, g, hist, hist, rho, zero, direction, one, zero, jnp.linalg.norm(g), f, one, zero)


def _step(s: LBFGSState, value_and_grad: Callable, tolerance: float) -> tuple[LBFGSState, jax.Array]:
    """One trial point: accept it and update the history, or shrink the step. Returns (state, stop).

    Acceptance: Armijo, or — robust to float32 noise in f near the optimum — the trial still descends
    (gᵀd ≤ 0 there) and f has not risen beyond its noise (1e-6 relative). After 10 rejections in a row
    the history is dropped (a unit-length gradient step follows); after MAX_FAILS the target stops. It
    also stops when the gradient norm is below `tolerance` or nothing has progressed for PATIENCE steps.
    """
    trial = s.x + s.alpha * s.direction
    f_t, g_t = value_and_grad(trial)
    slope = jnp.vdot(s.g, s.direction)
    armijo = f_t <= s.f + 1e-4 * s.alpha * slope
    descending = (jnp.vdot(g_t, s.direction) <= 0) & (f_t <= s.f + 1e-6 * jnp.maximum(jnp.abs(s.f), 1e-3))
    ok = (armijo | descending) & jnp.isfinite(f_t) & jnp.all(jnp.isfinite(g_t))
    step_vec, grad_diff = trial - s.x, g_t - s.g
    sy = jnp.vdot(step_vec, grad_diff)
    store = ok & (sy > 1e-10 * jnp.linalg.norm(step_vec) * jnp.linalg.norm(grad_diff))

    def push(hist, new):
        return jnp.where(store, jnp.roll(hist, 1, axis=0).at[0].set(new), hist)

    s_hist, y_hist = push(s.s_hist, step_vec), push(s.y_hist, grad_diff)
    rho = jnp.where(store, jnp.roll(s.rho, 1).at[0].set(1.0 / jnp.where(store, sy, 1.0)), s.rho)
    count = jnp.where(store, jnp.minimum(s.count + 1, s.s_hist.shape[0]), s.count)
    x = jnp.where(ok, trial, s.x)
    f = jnp.where(ok, f_t, s.f)
    g = jnp.where(ok, g_t, s.g)
    fails = jnp.where(ok, 0, s.fails + 1)
    reset = fails == 10
    count = jnp.where(reset, 0, count)
    grad = jnp.linalg.norm(g)
    direction = _two_loop(g, s_hist, y_hist, rho, count)
    unit_gradient = -g / jnp.where(grad > 0, grad, 1.0)
    descent = (jnp.vdot(direction, g) < 0) & ~reset
    direction = jnp.where(descent, direction, unit_gradient)
    count = jnp.where(descent, count, 0)
    denom = 2 * (f_t - s.f - s.alpha * slope)
    interpolated = jnp.where(denom > 0, -slope * s.alpha**2 / jnp.where(denom > 0, denom, 1.0), 0.5 * s.alpha)
    shrunk = jnp.clip(interpolated, 0.1 * s.alpha, 0.5 * s.alpha)
    backtrack = ~ok & ~reset
    direction = jnp.where(backtrack, s.direction, direction)
    # A new direction is first tried at length ≤ 10 × the last accepted step (not at a huge quasi-Newton
    # step where lse is nearly linear and the curvature pairs are tiny).
    last_step = jnp.where(ok, s.alpha * jnp.linalg.norm(s.direction), s.last_step)
    first = jnp.minimum(1.0, 10 * jnp.maximum(last_step, 1e-3) / jnp.maximum(jnp.linalg.norm(direction), 1e-30))
    alpha = jnp.where(backtrack, shrunk, first).astype(s.alpha.dtype)
    # Near the optimum float32 f stalls before the gradient does, far from it (lse nearly linear) the
    # gradient stalls while f falls: progress is either.
    progressed = (grad < 0.99 * s.best_grad) | (f < s.mark - 1e-6 * jnp.maximum(jnp.abs(s.mark), 1e-3))
    best_grad = jnp.minimum(grad, s.best_grad)
    mark = jnp.where(progressed, f, s.mark)
    stale = jnp.where(progressed, 0, s.stale + 1)
    stop = (grad <= tolerance) | (fails >= MAX_FAILS) | (stale >= PATIENCE)
    state = LBFGSState(x, f, g, s_hist, y_hist, rho, count, direction, alpha, fails, best_grad, mark, last_step,
                       stale)
    return state, stop
