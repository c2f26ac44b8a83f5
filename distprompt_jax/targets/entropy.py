"""Logits whose softmax has a chosen entropy: an optimizer run in compiled loops, then an exact finish.

Stage 1 (`EntropySolver`, float32, jit): each row's logits start at N(0, 1) and follow an optax optimizer
(Adam, lr 0.1 by default) on α(H(softmax z) − h)² − β·(mass on the row's outlier ids). A pool of rows
advances together in one `lax.while_loop`; each row is frozen as soon as it stops: at |H − h| ≤ tolerance
(entropy-only rows) or at its step limit (rows with an outlier reward, whose optimum lies off the entropy
constraint, run their full budget and rely on stage 2). A frozen row never changes again,
so a row's result does not depend on which other rows share the pool — which lets the driver swap
finished rows for new ones between segments and keep every slot busy.

Stage 2 (`match_entropy_by_temperature`, float64, numpy): the stage-1 logits z are rescaled to z/τ with τ
solved so H(softmax(z/τ)) = h to 1e-10. Stage 1's float32 entropy is only accurate to ~1e-5 on a 50k
vocabulary, so its own tolerance check cannot promise what the returned probabilities achieve; and near
the ends of [0, ln|V|] (h ≲ 0.1, h ≳ ln|V| − 0.01) Adam from N(0, 1) logits crawls, as the gradient of
(H − h)² vanishes against its second-moment memory. For rows that stage 1 matched, τ differs from 1 by
~1e-4; for the rest, stopped by their step limit, stage 2 finishes the job. τ is recorded per target.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Bracket for u = ln(1/τ): e^±30 scales any logits to (numerically) uniform resp. one-hot.
_LOG_INV_TEMPERATURE_BRACKET = 30.0
# Stage 2 aims far inside any tolerance, so only the float32 rounding of the result remains (~1e-7).
_TEMPERATURE_PRECISION = 1e-10
_MAX_TEMPERATURE_ITERATIONS = 200


def make_optimizer(name: str, learning_rate) -> optax.GradientTransformation:
    """An optax optimizer by its function name ("adam", "sgd", "lion", ...); learning_rate may be traced."""
    factory = getattr(optax, name, None) if name.isidentifier() and not name.startswith("_") else None
    optimizer = factory(learning_rate) if callable(factory) else None
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer {name!r} is not an optax optimizer name (e.g. 'adam', 'sgd', 'lion')")
    return optimizer


def _loss_grad(z, h, outlier_ids, alpha, beta):
    """The gradient of α(H − h)² − β·M for one row of logits [V], with H and M.

    dH/dz = −p (log p + H) and dM/dz = p (1[outlier] − M). Written so that XLA reads z in three passes
    and materializes nothing of size V: the max; Σe and Σe·(z − max) together (with e = exp(z − max),
    H = log Σe − Σe·(z − max)/Σe); then the gradient, recomputing p inside the optimizer's own
    elementwise update. The loop is memory-bound, and this form runs 1.7x faster than one that stores
    p and log p (measured).
    """
    shifted = z - jnp.max(z)
    e = jnp.exp(shifted)
    total = jnp.sum(e)
    entropy = jnp.log(total) - jnp.sum(e * shifted) / total
    log_p = shifted - jnp.log(total)
    p = jnp.exp(log_p)
    mass = jnp.sum(p[outlier_ids])
    grad = p * (-2 * alpha * (entropy - h) * (log_p + entropy) + beta * mass)
    grad = grad.at[outlier_ids].add(-beta * p[outlier_ids])
    return grad, entropy, mass


@dataclasses.dataclass(frozen=True)
class EntropySolver:
    """Stage 1 over a pool of rows. Hashable: its methods are jitted with the solver as a static argument;
    what only scales numbers (`settings`: learning_rate, alpha, beta, tolerance) is traced, so changing it
    compiles nothing.

    A pool is a dict of per-row arrays (rows first): logits `z`, optimizer state, the row's target `h`,
    `outlier_ids` [k], `step_limit`, and its progress (`steps`, `done`, last `entropy` and `mass`).
    A row stops at its step limit, and earlier once |H − h| ≤ tolerance if stop_at_tolerance.
    """

    vocab_size: int
    n_outliers: int = 0
    optimizer: str = "adam"
    stop_at_tolerance: bool = True

    @functools.partial(jax.jit, static_argnums=0)
    def start(self, seeds, attempts, entropies, step_limit, settings):
        """A fresh pool: row i starts from key fold_in(key(seeds[i]), attempts[i]) (uint32 arrays [B])."""

        def initial(seed, attempt):
            logits_key, outliers_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), attempt))
            z = jax.random.normal(logits_key, (self.vocab_size,), jnp.float32)
            # k distinct tokens uniformly at random: the top k of V uniform draws (no full permutation).
            _, ids = jax.lax.top_k(jax.random.uniform(outliers_key, (self.vocab_size,)), self.n_outliers)
            return z, ids.astype(jnp.int32)

        z, ids = jax.vmap(initial)(seeds, attempts)
        n = len(seeds)
        return {
            "z": z,
            "opt_state": jax.vmap(make_optimizer(self.optimizer, settings["learning_rate"]).init)(z),
            "h": entropies.astype(jnp.float32),
            "outlier_ids": ids,
            "step_limit": step_limit.astype(jnp.int32),
            "steps": jnp.zeros((n,), jnp.int32),
            "done": jnp.zeros((n,), bool),
            "entropy": jnp.zeros((n,), jnp.float32),
            "mass": jnp.zeros((n,), jnp.float32),
        }

    @functools.partial(jax.jit, static_argnums=0)
    def refill(self, pool, replace, seeds, attempts, entropies, step_limit, settings):
        """The pool with the rows where `replace` [B] is true restarted for new requests."""
        fresh = self.start(seeds, attempts, entropies, step_limit, settings)
        return jax.tree.map(lambda new, old: _where_rows(replace, new, old), fresh, pool)

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def advance(self, pool, settings, num_steps: int):
        """Run at most num_steps iterations, or until every row has stopped."""
        opt = make_optimizer(self.optimizer, settings["learning_rate"])
        loss_grad = jax.vmap(functools.partial(_loss_grad, alpha=settings["alpha"], beta=settings["beta"]))

        def running(carry):
            i, pool = carry
            return (i < num_steps) & jnp.any(~pool["done"])

        def step(carry):
            i, pool = carry
            grad, entropy, mass = loss_grad(pool["z"], pool["h"], pool["outlier_ids"])
            done = pool["done"] | (pool["steps"] >= pool["step_limit"])
            if self.stop_at_tolerance:
                done |= jnp.abs(entropy - pool["h"]) <= settings["tolerance"]
            updates, opt_state = jax.vmap(opt.update)(grad, pool["opt_state"], pool["z"])
            # A done row keeps its logits, entropy and mass. Its optimizer state runs on unused (a done
            # row is only ever restarted by `refill`), which spares a select over the moments per step.
            was_done = pool["done"]
            return i + 1, {
                **pool,
                "z": _where_rows(done, pool["z"], pool["z"] + updates),
                "opt_state": opt_state,
                "steps": pool["steps"] + (~done).astype(jnp.int32),
                "done": done,
                "entropy": jnp.where(was_done, pool["entropy"], entropy),
                "mass": jnp.where(was_done, pool["mass"], mass),
            }

        return jax.lax.while_loop(running, step, (0, pool))[1]


def _where_rows(rows, a, b):
    """a where rows [B] is true, else b, for arrays with rows first."""
    return jnp.where(rows.reshape(rows.shape + (1,) * (a.ndim - 1)), a, b)


def _softmax_stats(z: np.ndarray, log_inv_temperature: np.ndarray):
    """float64 softmax(z·e^u) per row, its entropy, and dH/du = −β² Var_p(z) (β = e^u)."""
    beta = np.exp(log_inv_temperature)[:, None]
    a = beta * z
    a -= a.max(axis=1, keepdims=True)
    e = np.exp(a)
    total = e.sum(axis=1)
    p = e / total[:, None]
    entropy = np.log(total) - np.einsum("ij,ij->i", p, a)
    mean = np.einsum("ij,ij->i", p, z)
    variance = np.maximum(np.einsum("ij,ij->i", p, z * z) - mean**2, 0.0)
    return p, entropy, -(beta[:, 0] ** 2) * variance


def match_entropy_by_temperature(logits, entropies):
    """Stage 2: float64 probabilities softmax(z/τ) [B, V] with entropy h per row, and τ [B].

    Safeguarded Newton on u = ln(1/τ) (H falls monotonically in u for non-constant logits), bisecting
    whenever a Newton step leaves the bracket. Rows whose h the bracket cannot reach (tied maxima below
    h = ln(ties), or constant logits) come back at the nearest end; callers check the achieved entropy.
    """
    z = np.asarray(logits, np.float64)
    h = np.asarray(entropies, np.float64)
    u = np.zeros(len(z))
    lo = np.full(len(z), -_LOG_INV_TEMPERATURE_BRACKET)
    hi = np.full(len(z), _LOG_INV_TEMPERATURE_BRACKET)
    probs = np.empty_like(z)
    temperature = np.empty(len(z))
    active = np.arange(len(z))
    for _ in range(_MAX_TEMPERATURE_ITERATIONS):
        p, entropy, slope = _softmax_stats(z[active], u[active])
        probs[active] = p
        temperature[active] = np.exp(-u[active])
        error = entropy - h[active]
        unfinished = np.abs(error) > _TEMPERATURE_PRECISION
        active, error, slope = active[unfinished], error[unfinished], slope[unfinished]
        if not len(active):
            break
        # H above h: the root lies at larger u (cooler); below it, at smaller u.
        lo[active] = np.where(error > 0, u[active], lo[active])
        hi[active] = np.where(error < 0, u[active], hi[active])
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = u[active] - error / slope
        inside = np.isfinite(newton) & (newton > lo[active]) & (newton < hi[active])
        u[active] = np.where(inside, newton, 0.5 * (lo[active] + hi[active]))
    return probs, temperature
