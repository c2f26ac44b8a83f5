"""The expressivity certificate: a lower bound on the KL that any prompt can reach, with a proof attached.

Every prompt's next-token logits are z = W h + b with h = final_norm(last hidden state) ∈ R^d, where
(W [V, d], b [V]) is the unembedding (b = 0 where the model has none). So for a target p

    LB(p) = inf over h ∈ R^d of KL(p ‖ softmax(W h + b))

lies below the KL of every soft or hard prompt. `unembedding_bound` computes it with a proof that the
reported value really is below LB, and `norm_bound_estimate` the same problem with h restricted to what the
final norm can output. Write p̄ = p / m for the stored row p of mass m (float32 rows sum to 1 only to ~1e-7);
every value reported is of Σ p log(p / q), the figure the prompt engines report, which equals
m · KL(p̄ ‖ q) + m log m.

The primal problem
------------------
KL(p̄ ‖ softmax z) = −H(p̄) + f(h) with f(h) = lse(W h + b) − p̄ᵀ(W h + b), lse the log-sum-exp. f is
convex (lse of an affine map minus a linear one) with ∇f(h) = Wᵀ(q − p̄), q = softmax(W h + b). A batched
L-BFGS in float32 (JAX; `chunk_size` slots sharded over the local devices, refilled with queued targets
every `segment_steps` iterations as targets finish) minimizes it; the host certifies each finished target
in float64 while the next segment runs, with float64 Newton steps where the certificate is not yet tight.

The certificate (weak duality with an exactly feasible dual point that is proved to exist)
----------------------------------------------------------------------------------------
Gibbs' variational formula lse(z) = max over q ∈ Δ of qᵀz + H(q) gives, for every q' ∈ Δ and every h,
f(h) ≥ H(q') + (q' − p̄)ᵀ(W h + b). If Wᵀq' = Wᵀp̄ the h-term vanishes, so

    inf_h f ≥ D(q') := H(q') + (q' − p̄)ᵀ b        (the bias enters only here),

with equality at the optimum, where q* = softmax(W h* + b) matches the moments Wᵀq* = Wᵀp̄. A solver's
q = softmax(W h₀ + b) is never exactly feasible: its residual r = Wᵀ(p̄ − q) = −∇f(h₀) is small, not zero.
We repair q without ever building the repaired point. Let S be the `support` most probable tokens under
q, a_v = (w_v, 1) ∈ R^{d+1}, G = Σ_{v∈S} q_v a_v a_vᵀ (positive definite: λ = λ_min(G) > 0), and ŷ any
vector (in practice ≈ G⁻¹(r, 0), which is also the Newton step; see below). With res = (r, 0) − G ŷ put

    δ_v = q_v a_vᵀ (ŷ + G⁻¹ res) for v ∈ S,  δ_v = 0 elsewhere.

Then Σ δ_v a_v = G ŷ + res = (r, 0), i.e. Wᵀδ = r and 1ᵀδ = 0, so q' = q + δ has Wᵀq' = Wᵀp̄ and sums to
1 exactly. With t_v = a_vᵀŷ and M the matrix of columns √q_v a_v (so G = M Mᵀ):
    ν² := Σ_S δ_v² / q_v = ‖Mᵀŷ + MᵀG⁻¹res‖² ≤ (√(Σ_S q_v t_v²) + ‖res‖/√λ)²,
    |δ_v| / q_v ≤ θ := max_S [ |t_v| + min(‖a_v‖ ‖res‖ / λ, ‖res‖ / √(λ q_v)) ].
If θ < 1, q' ≥ (1 − θ) q ≥ 0 is in the simplex. Taylor's formula with integral remainder for the entropy
along q → q' (whose entries stay ≥ (1 − θ) q_v) gives H(q') ≥ H(q) − Σ δ_v log q_v − ν² / (2(1 − θ)), and
log q_v = z_v − lse(z) with Σ δ_v = 0 turns Σ δ_v log q_v into δᵀ(W h₀ + b) = rᵀh₀ + δᵀb. Substituting,
the δᵀb terms cancel and H(q) + (q − p̄)ᵀb − rᵀh₀ = f(h₀), so

    D(q') ≥ f(h₀) − C,   C = ν² / (2(1 − θ)),   hence   KL(h₀) − C ≤ LB ≤ KL(h₀)

(for the stored row: KL_m(h₀) − m C ≤ LB_m ≤ KL_m(h₀)). C is the rigorous suboptimality ("gap") of the
primal point: second order in the residual (≈ rᵀH_S⁻¹r / 2, half the squared Newton decrement with the
Hessian restricted to S), so a converged float32 solve certifies to ~1e-8 nats. The a-priori bound
KL(p̄ ‖ q) ≥ 0 (m log m for the stored row, "trivial") always holds too; the larger is reported.

When G is near-singular (q concentrated on fewer than ~d tokens) the floating-point error of r, not the
solver, can push θ ≥ 1; the tokens with q_v above 1e-5, 1e-8, 1e-11 are then tried as S (larger q_v,
smaller λ). If none certifies, only the trivial bound remains.

Boundary cases. If p has zeros, or p is a one-hot whose token is a vertex of the logit polytope, the
infimum may not be attained: the iterates' norm grows, q concentrates, λ → 0 and the dual certificate
degrades. Such a row is certified by the trivial bound when the primal gets within `max_gap` of it (a
vertex one-hot: the infimum is 0); rows whose gap stays above `max_gap` are marked uncertified (`kl` NaN;
`primal − gap` remains a valid, loose bound).

Rigour in floating point
------------------------
The certificate is evaluated in float64 (numpy, host CPU). h₀ is an exact float64 vector and W, b, p are
exact float32 values, so the certified quantity is the exact real one; every computed input to the bound
(z, log q, q, r, KL(h₀), G, λ_min, t_v, res) is replaced by a rigorous bound on its exact value: the
standard a-priori bounds of IEEE double arithmetic (Higham, Accuracy and Stability, ch. 3: sums and dot
products of n terms err by at most γ_n = n u / (1 − n u) times the sum of absolute terms, u = 2⁻⁵³),
exp and log taken to be accurate to 4 ulp, and the symmetric eigensolver's backward error bounded by
16 (d + 1) u ‖G‖; each error term is doubled to cover rounding in evaluating the bounds themselves.
These terms are ~1e-11 nats for V = 49152, far below the gaps of a float32 solve. The certificate costs
O(V d + |S| d² + d³) per target on the host (support |S| = 2048 by default).

Norm-constrained problem (`method = bound_norm`)
------------------------------------------------
What the final norm can output is a smaller set than R^d: RMSNorm gives g ⊙ u / √(mean(u²) + ε) and
LayerNorm g ⊙ (u − ū) / √(var(u) + ε) + β. With ε > 0 these images are the open (centred, for LayerNorm)
ellipsoids {c + g ⊙ y : ‖y‖ < √d (, 1ᵀy = 0)}: convex. We optimize over the pre-norm u through the model's
own `final_norm` and `unembed` (restarts: one from the unconstrained solution, the others random; the best
is reported as an estimate, an upper bound on the norm-constrained infimum), and certify from below with
the Frank–Wolfe gap of the convex problem on the ellipsoid's closure E: for any x₀, by convexity of f,
inf_E f ≥ f(x₀) + rᵀx₀ − σ_E(r) with r = Wᵀ(p̄ − q(x₀)) and σ_E(r) = rᵀc + √d ‖Π(g ⊙ r)‖ the support
function (Π projects out the mean for LayerNorm, the identity for RMSNorm). Real prompts' normed states
lie (numerically) on the surface ‖y‖ = √d; whether the estimate does is reported (`on_boundary`).

Scope. The bounds are for the model's arithmetic taken exactly with its float32 weights: with bfloat16
weights the normed state and the logits are rounded, which the bound does not model. Models with a final
logit softcap (z = c tanh(W h / c)) are refused: neither bound holds for them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from distprompt_jax import parallel
from distprompt_jax.prompting.objective import kl_from_logits
from distprompt_jax.results import PromptResults
from distprompt_jax.targets import as_target_set

INITS = ("auto", "zeros", "lstsq")
CERTIFICATES = ("dual", "trivial", "frank_wolfe", "unconstrained", "none")


@dataclasses.dataclass(frozen=True)
class BoundConfig:
    """Settings of the unembedding bound and the norm-constrained estimate (defaults are ours)."""

    max_steps: int = 500  # float32 L-BFGS iterations per target (unconstrained problem)
    tolerance: float = 1e-6  # stop a target when the float32 gradient norm is below this
    memory: int = 10  # L-BFGS history pairs
    init: str = "auto"  # "zeros" | "lstsq" (least-squares fit of W h + b + c to log p) | "auto": the better
    refine_steps: int = 20  # float64 Newton steps on the host where the certificate is not yet tight
    support: int = 2048  # tokens (the most probable under q) the certificate's repair may move mass on
    gap_tolerance: float = 1e-6  # refine until the certified gap (primal − bound) is below this, in nats
    max_gap: float = 1e-3  # rows whose certified gap exceeds this are reported uncertified (kl NaN)
    restarts: int = 4  # norm-constrained estimate: restarts (the first from the unconstrained solution)
    norm_steps: int = 500  # norm-constrained estimate: L-BFGS iterations per restart
    seed: int = 0  # random restarts of the norm-constrained estimate
    chunk_size: int = 64  # solver slots (targets at once; rounded up to a multiple of the device count)
    segment_steps: int = 50  # iterations between refills of the slots whose targets finished
    host_threads: int | None = None  # threads certifying targets on the host (None: min(8, CPU count))

    def validate(self) -> None:
        def fail(message):
            raise ValueError(f"BoundConfig: {message}")

        for name in ("max_steps", "memory", "support", "restarts", "norm_steps", "chunk_size", "segment_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.refine_steps, (int, np.integer)) or self.refine_steps < 0:
            fail(f"refine_steps must be a non-negative integer, got {self.refine_steps!r}")
        if self.init not in INITS:
            fail(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("tolerance", "gap_tolerance", "max_gap"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                fail(f"{name} must be a positive finite number, got {value!r}")
        if self.host_threads is not None and (not isinstance(self.host_threads, (int, np.integer))
                                              or self.host_threads < 1):
            fail(f"host_threads must be a positive integer or None, got {self.host_threads!r}")
        if self.gap_tolerance > self.max_gap:
            fail(f"gap_tolerance ({self.gap_tolerance}) must not exceed max_gap ({self.max_gap})")


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def unembedding_bound(
    lm, targets, config: BoundConfig | None = None, *, devices=None, take_share: bool = True
) -> PromptResults:
    """Certified lower bound on the KL any prompt of `lm` can reach, for each target.

    Args:
      lm: a LanguageModel.
      targets: a TargetSet or an [N, V] array of probabilities over lm's vocabulary.
      config: BoundConfig (defaults as documented there).
      devices: devices to shard the target axis over (default: this process's devices). In a multi-host
        run each process bounds its own contiguous share of the targets and returns results for those.
      take_share: False when `targets` already are this process's share (as in a sweep).
    Returns:
      PromptResults with method "bound". Columns: `kl` the certified lower bound (NaN where uncertified),
      `primal` the KL at the solver's h (an upper bound on the infimum), `gap` = primal − the best proven
      bound, `certified`, `certificate` ("dual" | "trivial" | "none"), `residual` ‖Wᵀ(p̄ − q)‖, `h_norm`,
      `steps` (float32 L-BFGS), `refine_steps` (float64 Newton), `prompt_len` = 0. Arrays: `h` [N, d]
      float64, the final-normed hidden vector the primal value belongs to.
    """
    config = config or BoundConfig()
    config.validate()
    _refuse_softcap(lm)
    if min(config.support, lm.vocab_size) < min(lm.d_model + 1, lm.vocab_size):
        raise ValueError(
            f"BoundConfig: support={config.support} is below d_model + 1 = {lm.d_model + 1}: the certificate's "
            "Gram matrix would be singular"
        )
    target_set = as_target_set(targets, lm.vocab_size)
    share = parallel.process_slice(len(target_set)) if take_share else slice(None)
    probs = target_set.probs[share]
    metadata = target_set.metadata.iloc[share].reset_index(drop=True)
    mesh = parallel.local_mesh(devices)

    w32, b32 = lm.unembedding(lm.params)
    unemb = _Unembedding.build(np.asarray(w32), np.asarray(b32))
    w_dev = jax.device_put(w32, parallel.replicated(mesh))
    b_dev = jax.device_put(b32, parallel.replicated(mesh))
    lstsq = _lstsq_map(w_dev, b_dev, mesh) if config.init != "zeros" else None
    rows: list[dict | None] = [None] * len(probs)
    progress = tqdm(total=len(probs), desc="unembedding bound", unit="target", disable=len(probs) <= config.chunk_size)

    def certify_finished(finished):
        if not finished:
            return
        ids = np.array([t for t, _, _ in finished])
        points = _evaluate_batch(unemb, probs[ids], np.stack([x for _, x, _ in finished]))

        def certify_one(item):
            (target, x, steps), point = item
            rows[target] = _certify_and_refine(unemb, probs[target], x, config, point) | {"steps": steps}

        list(executor.map(certify_one, zip(finished, points)))
        progress.update(len(finished))

    with _host_threads(config) as executor:
        _solve_pool(w_dev, b_dev, lstsq, probs, config, mesh, certify_finished)
    progress.close()

    columns = _stack_columns(rows, ("kl", "primal", "gap", "certified", "certificate", "residual", "h_norm",
                                    "steps", "refine_steps"), len(probs))
    columns["prompt_len"] = np.zeros(len(probs), np.int32)
    h = np.stack([row["h"] for row in rows]) if rows else np.zeros((0, lm.d_model))
    return PromptResults(method="bound", columns=columns, arrays={"h": h}, metadata=metadata)


def _solve_pool(w, b, lstsq, probs, config: BoundConfig, mesh, on_finished) -> None:
    """The float32 solve as a pool of `chunk_size` slots (continuous batching): every `segment_steps`
    iterations, finished targets leave and queued ones take their slots, so a chunk never idles on its
    slowest target. The slots are sharded over the mesh; one compiled segment serves every refill.
    `on_finished([(target, h float64, steps), ...])` runs on the host while the next segment computes.
    """
    n = len(probs)
    slots = parallel.round_up(min(config.chunk_size, max(n, 1)), mesh.size)
    sharding = parallel.target_sharding(mesh)
    owner = np.full(slots, -1)  # the target in each slot (-1: free)
    pool = np.repeat(probs[:1], slots, axis=0)
    queued = 0
    state = p_dev = None

    def refill():
        nonlocal queued, state, p_dev
        free = np.flatnonzero(owner < 0)[: n - queued]
        if len(free) == 0:
            return
        owner[free] = np.arange(queued, queued + len(free))
        pool[free] = probs[queued : queued + len(free)]
        queued += len(free)
        fresh = np.zeros(slots, bool)
        fresh[free] = True
        p_dev = jax.device_put(pool, sharding)
        x0 = _initial_h(p_dev, w, b, lstsq, config.init)
        if state is None:
            state = _start(w, b, p_dev, x0, memory=config.memory)
        else:
            state = _refill(w, b, p_dev, x0, state, jax.device_put(fresh, sharding), memory=config.memory)
        state = state._replace(done=state.done | jax.device_put(owner < 0, sharding))  # empty slots idle

    def advance():
        nonlocal state
        state = _advance(w, b, p_dev, state, num_steps=config.segment_steps, max_steps=config.max_steps,
                         tolerance=config.tolerance)

    if n == 0:
        return
    refill()
    advance()
    while True:
        done = np.asarray(state.done)
        leaving = np.flatnonzero(done & (owner >= 0))
        finished = []
        if len(leaving):
            x = np.asarray(state.x, np.float64)[leaving]
            steps = np.asarray(state.steps)[leaving]
            finished = [(int(owner[s]), x[i], int(steps[i])) for i, s in enumerate(leaving)]
            owner[leaving] = -1
        refill()
        running = bool((owner >= 0).any())
        if running:
            advance()  # dispatched asynchronously: the host certifies while it runs
        on_finished(finished)
        if not running:
            return


def norm_bound_estimate(
    lm, targets, config: BoundConfig | None = None, *, devices=None, take_share: bool = True,
    unconstrained: PromptResults | None = None,
) -> PromptResults:
    """Best KL over h restricted to the final norm's image (an estimate), with a Frank–Wolfe lower bound.

    Args:
      lm, targets, config, devices, take_share: as for `unembedding_bound`.
      unconstrained: optional `unembedding_bound` results on the same targets: its `h` starts the first
        restart and its certified bound (also valid here) joins the lower bound.
    Returns:
      PromptResults with method "bound_norm". Columns: `kl` the best value found (an estimate: an upper
      bound on the norm-constrained infimum), `primal` (the same), `lower` a rigorous lower bound on that
      infimum, `gap` = kl − lower, `certified` (gap ≤ max_gap), `certificate` ("frank_wolfe" |
      "unconstrained" | "trivial"), `on_boundary` (the normed vector is on the ellipsoid's surface, as real
      prompts' are), `best_restart`, `steps`, `prompt_len` = 0. Arrays: `u` [N, d] (pre-norm, float32)
      and `x` [N, d] (its final-norm output, float64).
    """
    config = config or BoundConfig()
    config.validate()
    _refuse_softcap(lm)
    target_set = as_target_set(targets, lm.vocab_size)
    share = parallel.process_slice(len(target_set)) if take_share else slice(None)
    probs = target_set.probs[share]
    metadata = target_set.metadata.iloc[share].reset_index(drop=True)
    start_h = None
    if unconstrained is not None:
        if unconstrained.method != "bound" or "h" not in unconstrained.arrays:
            raise ValueError("`unconstrained` must be the PromptResults of unembedding_bound")
        if len(unconstrained) != len(probs) or not np.array_equal(
            unconstrained.metadata["target_id"].to_numpy(), metadata["target_id"].to_numpy()
        ):
            raise ValueError("`unconstrained` results are for other targets (target_id differs)")
        start_h = np.asarray(unconstrained.arrays["h"], np.float32)
        prior_lower = np.asarray(unconstrained.columns["primal"], np.float64) - np.asarray(
            unconstrained.columns["gap"], np.float64
        )
    mesh = parallel.local_mesh(devices)
    params = jax.device_put(lm.params, parallel.replicated(mesh))
    geometry = _NormImage.build(lm)
    w32, b32 = lm.unembedding(lm.params)
    unemb = _Unembedding.build(np.asarray(w32), np.asarray(b32))
    if start_h is None:
        replicated = parallel.replicated(mesh)
        lstsq = _lstsq_map(jax.device_put(w32, replicated), jax.device_put(b32, replicated), mesh)

    chunk_size = parallel.round_up(min(config.chunk_size, max(len(probs), 1)), mesh.size)
    sharding = parallel.target_sharding(mesh)
    key = jax.random.key(config.seed)
    final_norm = jax.jit(jax.vmap(lm.final_norm, in_axes=(None, 0)))
    rows, us = [], []
    progress = tqdm(total=len(probs) * config.restarts, desc="norm-constrained bound", unit="target",
                    disable=len(probs) * config.restarts < 2 * chunk_size)
    for start, stop in parallel.chunk_bounds(len(probs), chunk_size):
        n = stop - start
        p = jax.device_put(parallel.pad_rows(probs[start:stop], chunk_size), sharding)
        if start_h is not None:
            h0 = parallel.pad_rows(start_h[start:stop], chunk_size)
        else:
            h0 = np.asarray(_initial_h(p, None, None, lstsq, "lstsq"))
        best_u = best_f = best_steps = best_restart = None
        for restart in range(config.restarts):
            if restart == 0:
                u0 = geometry.preimage(np.asarray(h0, np.float64)).astype(np.float32)
            else:
                # A target's init depends on its index in the set, not on how the set was chunked.
                restart_key = jax.random.fold_in(key, restart)
                keys = jax.vmap(lambda i, k=restart_key: jax.random.fold_in(k, i))(start + jnp.arange(chunk_size))
                u0 = jax.vmap(lambda k: jax.random.normal(k, (lm.d_model,), jnp.float32))(keys)
            state = _solve_norm(
                lm, params, p, jax.device_put(jnp.asarray(u0), sharding), max_steps=config.norm_steps,
                tolerance=config.tolerance, memory=config.memory,
            )
            f = np.asarray(state.f)
            u = np.asarray(state.x)
            steps = np.asarray(state.steps)
            if best_u is None:
                best_u, best_f, best_steps, best_restart = u, f, steps, np.zeros(chunk_size, np.int32)
            else:
                better = f < best_f
                best_u = np.where(better[:, None], u, best_u)
                best_f = np.where(better, f, best_f)
                best_steps = np.where(better, steps, best_steps)
                best_restart = np.where(better, restart, best_restart)
            progress.update(n)
        x_model = np.asarray(final_norm(params, jnp.asarray(best_u)))
        xs = geometry.output(best_u[:n].astype(np.float64))
        for i in range(n):
            geometry.check(xs[i], x_model[i])
        with _host_threads(config) as executor:
            certified = list(executor.map(
                lambda p, x: _certify_norm(unemb, geometry, p, x, config), probs[start:stop], xs
            ))
        for i, row in enumerate(certified):
            x = xs[i]
            if start_h is not None and prior_lower[start + i] > row["lower"]:
                row["lower"] = float(prior_lower[start + i])
                row["certificate"] = "unconstrained"
            row["gap"] = row["primal"] - row["lower"]
            row["certified"] = bool(row["gap"] <= config.max_gap)
            row.update(kl=row["primal"], best_restart=int(best_restart[i]), steps=int(best_steps[i]), x=x)
            rows.append(row)
            us.append(best_u[i])
    progress.close()
    columns = _stack_columns(rows, ("kl", "primal", "lower", "gap", "certified", "certificate", "on_boundary",
                                    "best_restart", "steps"), len(probs))
    columns["prompt_len"] = np.zeros(len(probs), np.int32)
    d = lm.d_model
    arrays = {
        "u": np.stack(us) if us else np.zeros((0, d), np.float32),
        "x": np.stack([row["x"] for row in rows]) if rows else np.zeros((0, d)),
    }
    return PromptResults(method="bound_norm", columns=columns, arrays=arrays, metadata=metadata)


def _stack_columns(rows: list[dict], names, n: int) -> dict[str, np.ndarray]:
    if not rows:
        return {name: np.zeros(n) for name in names}
    return {name: np.asarray([row[name] for row in rows]) for name in names}


@contextlib.contextmanager
def _host_threads(config: BoundConfig):
    """A thread pool for the per-target host work, with BLAS limited to one thread per call.

    numpy's OpenBLAS spins its threads while it waits; on a busy or oversubscribed CPU (XLA's own threads
    run the next segment meanwhile) two-thread calls on (d+1)² matrices ran 10-100× slower than one-thread
    calls here. Parallelism comes from certifying several targets at once instead.
    """
    workers = config.host_threads or min(8, os.cpu_count() or 1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without threadpoolctl BLAS keeps its own threads
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(limits=1, user_api="blas")
    with limits, concurrent.futures.ThreadPoolExecutor(max_workers=workers) as executor:
        yield executor


def _refuse_softcap(lm) -> None:
    cap = getattr(lm.config, "final_logit_softcap", None)
    if cap is not None:
        raise ValueError(
            f"{lm.name} has final_logit_softcap={cap}: its logits c·tanh((W h + b)/c) are not affine in h, "
            "so neither the convex unembedding bound nor its certificate applies"
        )


# --------------------------------------------------------------------------------------------------------
# Float64 certificates (host, numpy)
# --------------------------------------------------------------------------------------------------------

_U = 2.0**-53  # unit roundoff of IEEE double


def _gamma(n: float) -> float:
    """Higham's γ_n = n u / (1 − n u): the relative error bound of an n-term sum or dot product."""
    return n * _U / (1.0 - n * _U)


@dataclasses.dataclass(frozen=True)
class _Unembedding:
    """W, b in float64 (exact copies of the float32 values) and per-row norms rounded up."""

    w: np.ndarray  # [V, d]
    b: np.ndarray  # [V]
    row_norm: np.ndarray  # ‖w_v‖₂, an upper bound
    a_norm: np.ndarray  # ‖(w_v, 1)‖₂, an upper bound
    w_max: float  # max_v ‖w_v‖₂

    @classmethod
    def build(cls, w, b) -> _Unembedding:
        w = np.asarray(w, np.float64)
        b = np.asarray(b, np.float64)
        sq = np.einsum("vd,vd->v", w, w) * (1 + 2 * _gamma(w.shape[1] + 2))
        return cls(w=w, b=b, row_norm=np.sqrt(sq) * (1 + _U), a_norm=np.sqrt(sq + 1) * (1 + 2 * _U),
                   w_max=float(np.sqrt(sq.max()) * (1 + _U)))

    @property
    def vocab_size(self) -> int:
        return self.w.shape[0]

    @property
    def d(self) -> int:
        return self.w.shape[1]


class _Point(NamedTuple):
    """One target at one h, evaluated in float64, with rigorous error bounds on the exact values."""

    primal: float  # Σ p (log p − log q), the stored-p KL (approximately; exact within primal_err)
    primal_err: float
    mass: float  # Σ p
    q: np.ndarray  # softmax(W h + b) (computed)
    rho: float  # |log q̂_v − log q_v| ≤ rho for every v (q exact softmax of the exact logits)
    r: np.ndarray  # Wᵀ(p̄ − q) (computed)
    r_err: float  # ‖r̂ − r‖₂ ≤ r_err
    r_norm_up: float  # ‖r‖₂ ≤ r_norm_up


def _evaluate(unemb: _Unembedding, p: np.ndarray, h: np.ndarray) -> _Point:
    return _evaluate_batch(unemb, np.asarray(p)[None], np.asarray(h, np.float64)[None])[0]


def _evaluate_batch(unemb: _Unembedding, p: np.ndarray, h: np.ndarray) -> list[_Point]:
    """Targets p [B, V] at points h [B, d], in float64 (matrix products, so W is read once for all B).

    Error bounds (each doubled): logits |ẑ − z| ≤ γ_{d+1}(‖w_v‖‖h‖ + |b_v|); log q̂ (from exp, a sum of V
    positive terms, a division) within rho of the exact log-softmax; the KL within primal_err; r = Wᵀ(p̄ − q)
    within r_err in 2-norm (sums of V terms: γ_V Σ_v |x_v| ‖w_v‖).
    """
    w, b = unemb.w, unemb.b
    vocab, d = w.shape
    p = np.asarray(p, np.float64)
    h = np.asarray(h, np.float64)
    z = h @ w.T + b
    h_norm = np.linalg.norm(h, axis=1) * (1 + _gamma(d))
    eps_z = 2 * _gamma(d + 1) * (unemb.w_max * h_norm + float(np.abs(b).max()))
    t = z - z.max(axis=1, keepdims=True)
    e = np.exp(t)
    s = e.sum(axis=1, keepdims=True)
    log_s = np.log(s)
    log_q = t - log_s
    q = e / s
    rho = 2 * (2 * eps_z + _gamma(vocab + 16) + 3 * _U * (-t.min(axis=1)) + 6 * _U * np.abs(log_s[:, 0]))
    positive = p > 0
    log_p = np.log(np.where(positive, p, 1.0))
    terms = np.where(positive, p * (log_p - log_q), 0.0)
    primal = terms.sum(axis=1)
    mass = p.sum(axis=1)
    primal_err = 2 * (mass * rho + _gamma(vocab + 4) * np.abs(terms).sum(axis=1)
                      + 4 * _U * np.sum(p * np.abs(log_p), axis=1))
    p_bar = p / mass[:, None]
    r = (p_bar - q) @ w
    grow = np.expm1(rho) * np.exp(rho)
    weight = (p_bar + q) @ unemb.row_norm
    r_err = 2 * (2 * _gamma(vocab + 2) + grow + _U) * weight * (1 + 4 * _U)
    r_norm_up = np.linalg.norm(r, axis=1) * (1 + _gamma(d + 1)) + r_err
    return [
        _Point(float(primal[i]), float(primal_err[i]), float(mass[i]), q[i], float(rho[i]), r[i], float(r_err[i]),
               float(r_norm_up[i]))
        for i in range(len(p))
    ]


LEVELS = (1e-5, 1e-8, 1e-11)  # smaller supports tried when the full one does not certify: q_v above these


class _System(NamedTuple):
    """The certificate's support S at one point: the most probable tokens, their rows, Gram matrices."""

    chosen: np.ndarray  # token ids, most probable first
    q_s: np.ndarray
    a_s: np.ndarray  # rows (w_v, 1)
    cuts: list  # prefix lengths: the LEVELS supports, then all of S
    grams: list  # G of each prefix
    y: np.ndarray | None  # ≈ G⁻¹ (r, 0) for all of S (None if G is singular)

    @property
    def direction(self):
        """The Newton step: ŷ[:d] solves H_S Δh = r, H_S the Hessian restricted to S (a Schur complement)."""
        return None if self.y is None else self.y[:-1]

    @property
    def mass(self) -> float:
        return float(self.q_s.sum())


def _system(unemb: _Unembedding, point: _Point, support: int) -> _System:
    vocab, d = unemb.w.shape
    k = min(support, vocab)
    q = point.q
    chosen = np.argpartition(-q, k - 1)[:k] if k < vocab else np.arange(vocab)
    chosen = chosen[np.argsort(-q[chosen], kind="stable")]
    q_s = q[chosen]
    a_s = np.concatenate([unemb.w[chosen], np.ones((k, 1))], axis=1)
    cuts = sorted({int(np.count_nonzero(q_s >= level)) for level in LEVELS} - {k})
    cuts = [n for n in cuts if n >= d + 1] + [k]
    blocks, begin = [], 0
    for n in cuts:  # the Gram of each slice of the sorted support; prefix sums give each level's G
        blocks.append((a_s[begin:n] * q_s[begin:n, None]).T @ a_s[begin:n])
        begin = n
    grams = list(np.cumsum(blocks, axis=0))
    y = _solve_gram(grams[-1], np.concatenate([point.r, [0.0]]), q_s, unemb.a_norm[chosen])
    return _System(chosen, q_s, a_s, cuts, grams, y)


def _solve_gram(gram, rhs, q_s, a_norm):
    """G⁻¹ rhs by Cholesky (with a 1e-13 relative ridge), or None when G is numerically singular."""
    trace = float(q_s @ np.square(a_norm))
    try:
        chol = np.linalg.cholesky(gram + 1e-13 * trace * np.eye(len(gram)))
    except np.linalg.LinAlgError:
        return None
    y = _cho_solve(chol, rhs)
    return y if np.all(np.isfinite(y)) else None


def _dual_bound(unemb: _Unembedding, point: _Point, system: _System) -> float:
    """The repaired-dual bound of the module docstring (−inf where it fails).

    S is the whole support first; if that does not certify (θ ≥ 1 or λ ≤ 0), the tokens with q_v above
    each of LEVELS are tried in turn (a smaller S has a smaller λ but larger q_v, which can keep θ < 1
    when floating-point error dominates the residual).
    """
    if system.y is None:
        return -math.inf
    best = _level_bound(unemb, point, system.a_s, system.q_s, system.grams[-1], system.y, system.chosen)
    rhs = np.concatenate([point.r, [0.0]])
    for n, gram in zip(reversed(system.cuts[:-1]), reversed(system.grams[:-1])):
        if math.isfinite(best):
            break
        y = _solve_gram(gram, rhs, system.q_s[:n], unemb.a_norm[system.chosen[:n]])
        if y is not None:
            best = _level_bound(unemb, point, system.a_s[:n], system.q_s[:n], gram, y, system.chosen[:n])
    return best


def _level_bound(unemb, point: _Point, a_s, q_s, gram, y, chosen) -> float:
    """The certified lower bound for support S = `chosen` (rows a_s, weights q_s), given any vector ŷ.

    Every computed quantity is replaced by a bound on the exact one (see "Rigour in floating point").
    """
    k, width = a_s.shape
    d = width - 1
    rho = point.rho
    a_norm = unemb.a_norm[chosen]
    trace = float(q_s @ np.square(a_norm)) * (1 + _gamma(k + 2))
    y_norm = float(np.linalg.norm(y)) * (1 + _gamma(d + 1))
    t = a_s @ y  # t_v = a_vᵀ ŷ
    t_up = np.abs(t) + 2 * _gamma(d + 1) * a_norm * y_norm
    quad_up = math.exp(rho) * float(q_s @ np.square(t_up)) * (1 + _gamma(k + 3))
    rhs = np.concatenate([point.r, [0.0]])
    res = rhs - gram @ y  # (r, 0) − G ŷ, G the exact Gram at the exact q
    gram_err = (math.expm1(rho) + _gamma(k + 2) + _gamma(d + 1)) * trace
    res_up = (float(np.linalg.norm(res)) * (1 + _gamma(d + 2)) + point.r_err + 2 * gram_err * y_norm) * (1 + 4 * _U)
    lam_hat = float(np.linalg.eigvalsh(gram)[0])
    lam_lo = math.exp(-rho) * (lam_hat - 2 * (_gamma(k + 2) + 16 * (d + 1) * _U) * trace)
    if not lam_lo > 0:
        return -math.inf
    nu = (math.sqrt(quad_up) + res_up / math.sqrt(lam_lo)) * (1 + 4 * _U)
    # |δ_v| / q_v ≤ |t_v| + |a_vᵀ G⁻¹ res|, and |a_vᵀ G⁻¹ res| ≤ min(‖a_v‖ ‖res‖/λ, ‖res‖/√(λ q_v)).
    q_lo = q_s * math.exp(-rho) * (1 - 2 * _U)
    correction = np.minimum(a_norm * res_up / lam_lo, res_up / np.sqrt(lam_lo * np.maximum(q_lo, 1e-300)))
    theta = float(np.max(t_up + correction)) * (1 + 4 * _U)
    if not theta < 1:
        return -math.inf
    gap = nu * nu / (2 * (1 - theta)) * (1 + 8 * _U)
    lower = point.primal - point.primal_err - point.mass * (1 + _gamma(len(point.q))) * gap
    return lower - 8 * _U * (abs(point.primal) + gap)


def _cho_solve(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    from scipy.linalg import solve_triangular

    return solve_triangular(chol.T, solve_triangular(chol, rhs, lower=True), lower=False)


def _trivial_bound(point: _Point) -> float:
    """The a-priori bound: KL(p̄ ‖ q) ≥ 0, i.e. m log m for the stored row (0 when p sums to exactly 1)."""
    m = point.mass
    return m * math.log(m) - 2 * _gamma(len(point.q) + 4) * m


def _best_bound(point: _Point, dual: float) -> tuple[float, str]:
    """The larger of the dual bound and the a-priori one, and which one it is."""
    trivial = _trivial_bound(point)
    return (dual, "dual") if dual > trivial else (trivial, "trivial")


def _primal_only(unemb: _Unembedding, p: np.ndarray, h: np.ndarray) -> float:
    """Σ p (log p − log q) at h, without the error bounds (for line searches)."""
    z = unemb.w @ h + unemb.b
    top = z.max()
    log_q = z - (top + math.log(np.exp(z - top).sum()))
    positive = p > 0
    return float(np.sum(p[positive] * (np.log(p[positive]) - log_q[positive])))


def _certify_and_refine(unemb: _Unembedding, p: np.ndarray, h: np.ndarray, config: BoundConfig,
                        point: _Point | None = None) -> dict:
    """Certify the solver's point; while the gap is above gap_tolerance, take damped float64 Newton steps
    with the Hessian restricted to the certificate's support (whose Gram matrix the step reuses).

    The rigorous certificate (an eigenvalue problem per support) is computed only where it can succeed:
    its gap is at least about half the Newton decrement rᵀΔh, which every step gives for free.
    """
    h = np.asarray(h, np.float64)
    p64 = np.asarray(p, np.float64)
    point = _evaluate(unemb, p64, h) if point is None else point
    refine = 0
    goal = config.gap_tolerance
    while True:
        system = _system(unemb, point, config.support)
        decrement = math.inf if system.y is None else float(point.r @ system.direction)
        last = system.y is None or refine >= config.refine_steps
        if last or decrement <= 2.5 * goal:
            bound, kind = _best_bound(point, _dual_bound(unemb, point, system))
            gap = point.primal - bound
            if last or gap <= goal or decrement < 1e-3 * goal:
                break  # done, out of steps, or Newton has converged to the certificate's numerical floor
        # H_S ⪯ H (S misses the tail's share of the curvature): first try the step scaled by S's mass.
        step, accepted = min(1.0, max(system.mass, 1e-3)), False
        for _ in range(30):
            candidate = h + step * system.direction
            if _primal_only(unemb, p64, candidate) <= point.primal:
                trial = _evaluate(unemb, p64, candidate)
                if trial.primal < point.primal or trial.r_norm_up < point.r_norm_up:
                    accepted = True
                    break
            step *= 0.5
        if not accepted:
            bound, kind = _best_bound(point, _dual_bound(unemb, point, system))
            gap = point.primal - bound
            break
        h, point = candidate, trial
        refine += 1
    certified = gap <= config.max_gap
    return {
        "kl": bound if certified else math.nan,
        "primal": point.primal,
        "gap": gap,
        "certified": bool(certified),
        "certificate": kind if certified else "none",
        "residual": float(np.linalg.norm(point.r)),
        "h_norm": float(np.linalg.norm(h)),
        "refine_steps": refine,
        "h": h,
    }


def certify(W, b, p, h, *, support: int = 2048) -> dict:
    """Certify one primal point in float64: {primal, lower, gap, certificate, residual}.

    W [V, d], b [V] (float32 values), p [V] the target row, h [d] any hidden vector (e.g. a soft prompt's
    final-normed state). `lower` is a rigorous lower bound on inf over h of Σ p log(p / softmax(W h + b)),
    `primal` that sum at h, gap = primal − lower: how far h is, provably at most, from the best possible.
    """
    unemb = _Unembedding.build(W, b)
    point = _evaluate(unemb, np.asarray(p, np.float64), np.asarray(h, np.float64))
    lower, kind = _best_bound(point, _dual_bound(unemb, point, _system(unemb, point, support)))
    return {
        "primal": point.primal, "lower": lower, "gap": point.primal - lower, "certificate": kind,
        "residual": float(np.linalg.norm(point.r)),
    }


def repair_distribution(W, b, p, h, *, support: int = 2048) -> np.ndarray:
    """The repaired dual point q' = q + δ of the module docstring, built explicitly in float64.

    For inspection and tests only: the certificate never builds it (it proves q' exists, exactly feasible);
    this float64 construction is feasible to rounding (Wᵀq' = Wᵀp̄ and Σ q' = 1 to ~1e-12).
    """
    unemb = _Unembedding.build(W, b)
    point = _evaluate(unemb, np.asarray(p), np.asarray(h, np.float64))
    vocab = unemb.vocab_size
    k = min(support, vocab)
    chosen = np.argpartition(-point.q, k - 1)[:k] if k < vocab else np.arange(vocab)
    a_s = np.concatenate([unemb.w[chosen], np.ones((k, 1))], axis=1)
    gram = (a_s * point.q[chosen][:, None]).T @ a_s
    rhs = np.concatenate([point.r, [0.0]])
    y = np.linalg.solve(gram, rhs)
    y = y + np.linalg.solve(gram, rhs - gram @ y)  # one step of iterative refinement
    repaired = point.q.copy()
    repaired[chosen] += point.q[chosen] * (a_s @ y)
    return repaired


def dual_value(W, b, p, q) -> float:
    """D(q) = H(q) + (q − p̄)ᵀb − H(p̄) in float64, mapped to the stored-p convention (m D + m log m).

    For a q in the simplex with Wᵀq = Wᵀp̄ this is a lower bound on the KL any prompt can reach.
    """
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    b = np.asarray(b, np.float64)
    mass = p.sum()
    p_bar = p / mass
    entropy = lambda x: -float(np.sum(np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)))
    value = entropy(q) + float((q - p_bar) @ b) - entropy(p_bar)
    return mass * value + mass * math.log(mass)


# --------------------------------------------------------------------------------------------------------
# Norm-constrained problem: the final norm's image and its Frank–Wolfe certificate
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _NormImage:
    """The closure of the final norm's image: {c + g ⊙ y : ‖y‖ ≤ √d, and 1ᵀy = 0 if centred}."""

    kind: str  # "rms" | "layer"
    scale: np.ndarray  # g, float64
    center: np.ndarray  # c (LayerNorm bias; zero for RMSNorm)
    eps: float

    @classmethod
    def build(cls, lm) -> _NormImage:
        cfg = lm.config
        norm = lm.params.get("final_norm") if isinstance(lm.params, dict) else None
        if norm is None or "scale" not in norm:
            raise ValueError(f"{lm.name}: no final norm scale found; the norm image is unknown")
        scale = np.asarray(norm["scale"], np.float64)
        d = scale.shape[0]
        if cfg.family == "llama":
            return cls("rms", scale, np.zeros(d), float(cfg.norm_eps))
        if cfg.family == "gemma3":
            return cls("rms", 1.0 + scale, np.zeros(d), float(cfg.norm_eps))
        if cfg.family == "gpt2":
            return cls("layer", scale, np.asarray(norm["bias"], np.float64), float(cfg.norm_eps))
        raise ValueError(f"the final norm of family {cfg.family!r} is not described in bounds.py")

    @property
    def d(self) -> int:
        return self.scale.shape[0]

    def output(self, u: np.ndarray) -> np.ndarray:
        """The norm's output for pre-norm u, in float64."""
        u = np.asarray(u, np.float64)
        if self.kind == "layer":
            u = u - u.mean(axis=-1, keepdims=True)
        y = u / np.sqrt(np.mean(u * u, axis=-1, keepdims=True) + self.eps)
        return self.center + self.scale * y

    def preimage(self, h: np.ndarray) -> np.ndarray:
        """A pre-norm u whose output is h when h is inside the image, its radial projection otherwise."""
        safe = np.where(self.scale != 0, self.scale, 1.0)
        y = np.where(self.scale != 0, (np.asarray(h, np.float64) - self.center) / safe, 0.0)
        if self.kind == "layer":
            y = y - y.mean(axis=-1, keepdims=True)
        ms = np.mean(y * y, axis=-1, keepdims=True)
        inside = ms < 1 - 1e-6
        factor = np.where(inside, np.sqrt(self.eps / np.maximum(1 - ms, 1e-12)), 1.0)
        u = y * factor
        tiny = np.sqrt(np.mean(u * u, axis=-1, keepdims=True)) < 1e-12
        return np.where(tiny, 1.0, u)  # h at the centre: any u whose output is near it

    def check(self, x: np.ndarray, x_model: np.ndarray) -> None:
        """Refuse if the model's final norm disagrees with this description of it."""
        err = float(np.max(np.abs(x - x_model)))
        if not err <= 1e-3 * (1 + float(np.max(np.abs(x)))):
            raise RuntimeError(f"the model's final norm differs from the {self.kind} norm image by {err:.3g}")

    def support_function(self, r: np.ndarray) -> tuple[float, float]:
        """(σ_E(r) = max over x ∈ E of rᵀx, and a bound on its rounding error)."""
        v = self.scale * r
        if self.kind == "layer":
            v = v - v.mean()
        radius = math.sqrt(self.d)
        value = float(r @ self.center) + radius * float(np.linalg.norm(v))
        terms = float(np.abs(r) @ np.abs(self.center)) + radius * float(np.abs(self.scale * r).sum())
        err = 4 * _gamma(self.d + 4) * terms
        return value, err

    def on_boundary(self, x: np.ndarray) -> bool:
        safe = np.where(self.scale != 0, self.scale, 1.0)
        y = np.where(self.scale != 0, (x - self.center) / safe, 0.0)
        return bool(np.linalg.norm(y) >= (1 - 1e-3) * math.sqrt(self.d))


def _certify_norm(unemb: _Unembedding, geometry: _NormImage, p: np.ndarray, x: np.ndarray, config) -> dict:
    """Primal at x (in the image) and the Frank–Wolfe lower bound over the image's closure."""
    point = _evaluate(unemb, p, x)
    sigma, sigma_err = geometry.support_function(point.r)
    inner = float(point.r @ x)
    x_scale = float(np.linalg.norm(x)) + float(np.linalg.norm(geometry.center)) + math.sqrt(geometry.d) * float(
        np.abs(geometry.scale).max()
    )
    fw_gap = sigma - inner + sigma_err + 2 * _gamma(geometry.d + 1) * float(np.abs(point.r) @ np.abs(x))
    fw_gap += 2 * point.r_err * x_scale
    fw_gap = max(fw_gap, 0.0) * (1 + 8 * _U)
    lower = point.primal - point.primal_err - point.mass * (1 + _gamma(len(p))) * fw_gap
    kind = "frank_wolfe"
    if not lower > _trivial_bound(point):
        lower, kind = _trivial_bound(point), "trivial"
    return {"primal": point.primal, "lower": lower, "certificate": kind, "on_boundary": geometry.on_boundary(x)}


# --------------------------------------------------------------------------------------------------------
# Float32 batched L-BFGS (JAX)
# --------------------------------------------------------------------------------------------------------


class _LBFGS(NamedTuple):
    """One target's L-BFGS state (the batch axis is added by vmap)."""

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
    steps: jax.Array
    done: jax.Array


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


def _lbfgs_init(x, f, g, memory: int) -> _LBFGS:
    hist = jnp.zeros((memory,) + x.shape, x.dtype)
    rho = jnp.zeros((memory,), x.dtype)
    direction = _two_loop(g, hist, hist, rho, jnp.int32(0))
    zero = jnp.int32(0)
    grad = jnp.linalg.norm(g)
    one = jnp.ones((), x.dtype)
    return _LBFGS(x, f, g, hist, hist, rho, zero, direction, one, zero, grad, f, one, zero, zero, grad <= 0)


def _lbfgs_step(
    state: _LBFGS, value_and_grad, tolerance: float, max_steps: int, max_fails: int = 30, patience: int = 100
) -> _LBFGS:
    """One trial point per call (batch-friendly): accept it and update the history, or shrink the step.

    Acceptance: Armijo, or — robust to float32 noise in f near the optimum — the trial still descends
    (gᵀd ≤ 0 there) and f has not risen beyond its noise (1e-6 relative). After 10 rejections in a row
    the history is dropped (a unit-length gradient step follows); after `max_fails` the target stops. It
    also stops when the gradient norm is below `tolerance`, nothing has progressed for `patience` steps, or
    after `max_steps` steps.
    """
    s = state
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
    done = (grad <= tolerance) | (fails >= max_fails) | (stale >= patience) | (s.steps + 1 >= max_steps)
    return _LBFGS(x, f, g, s_hist, y_hist, rho, count, direction, alpha, fails, best_grad, mark, last_step, stale,
                  s.steps + 1, done)


def _lbfgs_start(value_and_grad: Callable, x0, per_target: tuple, memory: int) -> _LBFGS:
    """Batched L-BFGS states at x0 [B, ...]; `value_and_grad(x, *per_target_i)` is for one target."""
    f0, g0 = jax.vmap(value_and_grad)(x0, *per_target)
    return jax.vmap(lambda x, f, g: _lbfgs_init(x, f, g, memory))(x0, f0, g0)


def _lbfgs_run(value_and_grad: Callable, state: _LBFGS, per_target: tuple, *, num_steps: int, max_steps: int,
               tolerance: float) -> _LBFGS:
    """Up to `num_steps` L-BFGS iterations of every target still running (finished ones are frozen)."""

    def one(s, *args):
        return _lbfgs_step(s, lambda x: value_and_grad(x, *args), tolerance, max_steps)

    def body(carry):
        i, s = carry
        new = jax.vmap(one)(s, *per_target)
        frozen = s.done
        s = jax.tree.map(lambda n, o: jnp.where(frozen.reshape(frozen.shape + (1,) * (n.ndim - 1)), o, n), new, s)
        return i + 1, s

    def more(carry):
        i, s = carry
        return (i < num_steps) & jnp.any(~s.done)

    return jax.lax.while_loop(more, body, (jnp.int32(0), state))[1]


def _minimize(value_and_grad: Callable, x0, per_target: tuple, *, max_steps: int, tolerance: float, memory: int):
    """Batched L-BFGS from x0 [B, ...] to convergence (or max_steps) for every target."""
    state = _lbfgs_start(value_and_grad, x0, per_target, memory)
    return _lbfgs_run(value_and_grad, state, per_target, num_steps=max_steps, max_steps=max_steps,
                      tolerance=tolerance)


@jax.jit
def _log_p_floor(p):
    """log p, with zero entries set 10 nats below the row's smallest positive log p (a finite stand-in)."""
    positive = p > 0
    log_p = jnp.log(jnp.where(positive, p, 1.0))
    floor = jnp.min(jnp.where(positive, log_p, jnp.inf), axis=-1, keepdims=True) - 10.0
    return jnp.where(positive, log_p, jnp.minimum(floor, -10.0))


@jax.jit
def _gram(w):
    return w.T @ w


def _lstsq_map(w, b, mesh):
    """(w, b, G⁺) for the least-squares init h = argmin ‖W h + b + c·1 − log p‖ (G = [W 1]ᵀ[W 1], pinv in f64)."""
    vocab = w.shape[0]
    col = jnp.sum(w, axis=0)
    gram = np.zeros((w.shape[1] + 1,) * 2)
    gram[:-1, :-1] = np.asarray(_gram(w), np.float64)
    gram[:-1, -1] = gram[-1, :-1] = np.asarray(col, np.float64)
    gram[-1, -1] = vocab
    pinv = np.linalg.pinv(gram, rcond=1e-7, hermitian=True).astype(np.float32)
    return w, b, jax.device_put(pinv, parallel.replicated(mesh))


@jax.jit
def _lstsq_h(p, w, b, pinv):
    target = _log_p_floor(p) - b
    moments = jnp.concatenate([target @ w, jnp.sum(target, axis=-1, keepdims=True)], axis=-1)
    return (moments @ pinv.T)[:, :-1]


@jax.jit
def _pick_init(p, w, b, h_a, h_b):
    value = jax.vmap(lambda p_i, h: kl_from_logits(p_i, w @ h + b))
    better = value(p, h_b) < value(p, h_a)
    return jnp.where(better[:, None], h_b, h_a)


def _initial_h(p, w, b, lstsq, init: str):
    zeros = jnp.zeros((p.shape[0], (lstsq[0] if lstsq is not None else w).shape[1]), jnp.float32)
    if init == "zeros":
        return jax.device_put(zeros, p.sharding)
    h = _lstsq_h(p, *lstsq)
    if init == "lstsq":
        return h
    return _pick_init(p, w, b, jax.device_put(zeros, p.sharding), h)


def _unconstrained_value_and_grad(w, b):
    def value(h, p):
        return kl_from_logits(p, w @ h + b)

    return jax.value_and_grad(value)


@functools.partial(jax.jit, static_argnames=("memory",))
def _start(w, b, p, x0, *, memory):
    return _lbfgs_start(_unconstrained_value_and_grad(w, b), x0, (p,), memory)


@functools.partial(jax.jit, static_argnames=("memory",))
def _refill(w, b, p, x0, state, fresh, *, memory):
    """Slots where `fresh` is set get a new target: a new L-BFGS state at x0; the others keep theirs."""
    new = _lbfgs_start(_unconstrained_value_and_grad(w, b), x0, (p,), memory)
    return jax.tree.map(lambda n, o: jnp.where(fresh.reshape(fresh.shape + (1,) * (n.ndim - 1)), n, o), new, state)


@functools.partial(jax.jit, static_argnames=("num_steps", "max_steps", "tolerance"))
def _advance(w, b, p, state, *, num_steps, max_steps, tolerance):
    return _lbfgs_run(_unconstrained_value_and_grad(w, b), state, (p,), num_steps=num_steps, max_steps=max_steps,
                      tolerance=tolerance)


@functools.partial(jax.jit, static_argnames=("lm", "max_steps", "tolerance", "memory"))
def _solve_norm(lm, params, p, u0, *, max_steps, tolerance, memory):
    def value(u, p_i):
        return kl_from_logits(p_i, lm.unembed(params, lm.final_norm(params, u)))

    return _minimize(jax.value_and_grad(value), u0, (p,), max_steps=max_steps, tolerance=tolerance, memory=memory)
