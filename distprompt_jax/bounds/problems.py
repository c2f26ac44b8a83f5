"""The float32 solves behind the certificate, as Problems for the solver driver (distprompt_jax.solve).

The primal problem. Every prompt's next-token logits are z = W h + b with h = final_norm(last hidden
state) ∈ R^d and (W [V, d], b [V]) the unembedding, so for a target p (p̄ = p / m, m its stored mass)

    KL(p̄ ‖ softmax(W h + b)) = −H(p̄) + f(h),   f(h) = lse(W h + b) − p̄ᵀ(W h + b),

f convex with ∇f(h) = Wᵀ(q − p̄), q = softmax(W h + b). `BoundProblem` minimizes Σ p log(p / q) over h
by L-BFGS from zeros or a least-squares fit (`init`); the host then certifies the point it reaches
(certificate.py). `NormProblem` minimizes the same KL over the pre-norm u of the final norm, through the
model's own `final_norm` and `unembed` (geometry.py says what that image is and bounds it from below).

W and b are read from the weights the driver passes in (`lm.unembedding(params)`: a view, no copy), so
a problem holds only what enters tracing — the model's structure and the solver's settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distprompt_jax import parallel
from distprompt_jax.bounds import lbfgs
from distprompt_jax.bounds.host import one_blas_thread
from distprompt_jax.prompting.engine import model_structure
from distprompt_jax.prompting.objective import kl_from_logits, safe_log
from distprompt_jax.solve import Progress

INITS = ("auto", "zeros", "lstsq")


class BoundTarget(NamedTuple):
    p: jax.Array  # [V] float32, the stored row
    log_p: jax.Array  # safe_log(p), once per target
    h0: jax.Array | None  # [d] the least-squares start (None with init="zeros")


@dataclasses.dataclass(frozen=True)
class BoundProblem:
    """min over h of Σ p log(p / softmax(W h + b)) for one target, by float32 L-BFGS.

    Inputs per target: `p` [V], and `h0` [d] (the least-squares fit, `LeastSquaresInit`) unless
    init="zeros"; init="auto" starts from whichever of 0 and h0 has the lower KL.
    """

    lm: Any  # the model's structure, without weights (engine.model_structure)
    init_kind: str  # config.init
    max_steps: int
    tolerance: float
    memory: int

    @classmethod
    def build(cls, lm, config) -> BoundProblem:
        return cls(lm=model_structure(lm), init_kind=config.init, max_steps=config.max_steps,
                   tolerance=config.tolerance, memory=config.memory)

    def value_and_grad(self, params, target: BoundTarget):
        w, b = self.lm.unembedding(params)
        return jax.value_and_grad(lambda h: kl_from_logits(target.p, w @ h + b, target.log_p))

    def prepare(self, inputs) -> BoundTarget:
        p = inputs["p"]
        return BoundTarget(p, safe_log(p), inputs.get("h0"))

    def init(self, params, target: BoundTarget, index, attempt, key) -> lbfgs.SolverState:
        value_and_grad = self.value_and_grad(params, target)
        w, _ = self.lm.unembedding(params)
        zeros = jnp.zeros(w.shape[1], jnp.float32)
        if self.init_kind == "zeros":
            x0 = zeros
        elif self.init_kind == "lstsq":
            x0 = target.h0
        else:
            x0 = jnp.where(value_and_grad(target.h0)[0] < value_and_grad(zeros)[0], target.h0, zeros)
        return lbfgs.start(value_and_grad, x0, self.memory)

    def step(self, params, target: BoundTarget, state: lbfgs.SolverState) -> lbfgs.SolverState:
        return lbfgs.advance(state, self.value_and_grad(params, target), tolerance=self.tolerance,
                             max_steps=self.max_steps)

    def report(self, params, target: BoundTarget, state: lbfgs.SolverState) -> dict:
        return {"h": state.lbfgs.x, "steps": state.progress.steps}


class NormTarget(NamedTuple):
    p: jax.Array
    log_p: jax.Array
    u0: jax.Array  # [d] the first attempt's start (pre-norm)


class NormState(NamedTuple):
    """An L-BFGS solve (`lbfgs.SolverState`'s fields) and the attempt it is, for the report."""

    progress: Progress
    lbfgs: lbfgs.LBFGSState
    attempt: jax.Array


@dataclasses.dataclass(frozen=True)
class NormProblem:
    """min over the pre-norm u of Σ p log(p / softmax(unembed(final_norm(u)))), by float32 L-BFGS.

    Inputs per row: `p` [V] and `u0` [d]. Attempt 0 starts at u0, a further attempt (a restart) at an N(0, I)
    draw of its key.
    """

    lm: Any
    max_steps: int
    tolerance: float
    memory: int

    @classmethod
    def build(cls, lm, config) -> NormProblem:
        return cls(lm=model_structure(lm), max_steps=config.norm_steps, tolerance=config.tolerance,
                   memory=config.memory)

    def value_and_grad(self, params, target: NormTarget):
        def value(u):
            return kl_from_logits(target.p, self.lm.unembed(params, self.lm.final_norm(params, u)), target.log_p)

        return jax.value_and_grad(value)

    def prepare(self, inputs) -> NormTarget:
        p = inputs["p"]
        return NormTarget(p, safe_log(p), inputs["u0"])

    def init(self, params, target: NormTarget, index, attempt, key) -> NormState:
        u0 = jnp.where(attempt == 0, target.u0, jax.random.normal(key, target.u0.shape, target.u0.dtype))
        solver = lbfgs.start(self.value_and_grad(params, target), u0, self.memory)
        return NormState(solver.progress, solver.lbfgs, jnp.asarray(attempt, jnp.int32))

    def step(self, params, target: NormTarget, state: NormState) -> NormState:
        solver = lbfgs.advance(lbfgs.SolverState(state.progress, state.lbfgs), self.value_and_grad(params, target),
                               tolerance=self.tolerance, max_steps=self.max_steps)
        return NormState(solver.progress, solver.lbfgs, state.attempt)

    def report(self, params, target: NormTarget, state: NormState) -> dict:
        u = state.lbfgs.x
        # The model's own norm output, to check the host's float64 description of the norm against.
        return {"u": u, "f": state.lbfgs.f, "steps": state.progress.steps, "attempt": state.attempt,
                "x_model": self.lm.final_norm(params, u).astype(jnp.float32)}


class LeastSquaresInit:
    """h = argmin ‖W h + b + c·1 − log p‖ over (h, c), per target: a start near the optimum for dense p.

    The pseudo-inverse of G = [W 1]ᵀ[W 1] is computed once (float64, on the host) and applied to each
    target's moments on the device, in blocks of a fixed shape (a row's result then never depends on the
    other rows of its block, so a target gets the same start in any run). Zero entries of p are taken
    as 10 nats below the row's smallest positive log p.

    The fits are the problems' per-target input `h0` ([d] each), computed once before the run: the
    pseudo-inverse as a per-target input would be (d+1)² floats (1.3 MiB per SmolLM2 target, in every slot
    and the host's copy of the inputs), and recomputing it inside `init` would redo WᵀW (16 GFLOP for
    SmolLM2) at every refill. Measured on SmolLM2 (2-core CPU, loaded): building this 1.2-1.5 s (WᵀW on
    the device ~1 s, the pseudo-inverse 0.2-0.3 s), fitting 64 targets 0.2 s — once per call, as before.
    """

    BLOCK = 32

    def __init__(self, w, b):
        """From the unembedding (W [V, d], b [V]) float32."""
        gram = np.zeros((w.shape[1] + 1,) * 2)
        gram[:-1, :-1] = np.asarray(_gram(w), np.float64)
        gram[:-1, -1] = gram[-1, :-1] = np.asarray(jnp.sum(w, axis=0), np.float64)
        gram[-1, -1] = w.shape[0]
        self.w, self.b = w, b
        with one_blas_thread:
            pinv = np.linalg.pinv(gram, rcond=1e-7, hermitian=True)
        self.pinv = jnp.asarray(pinv.astype(np.float32))

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        """float32 [N, d] for targets [N, V]."""
        probs = np.asarray(probs, np.float32)
        blocks = []
        for start, stop in parallel.chunk_bounds(len(probs), self.BLOCK):
            block = parallel.pad_rows(probs[start:stop], self.BLOCK)
            blocks.append(np.asarray(_lstsq_h(block, self.w, self.b, self.pinv))[: stop - start])
        return np.concatenate(blocks) if blocks else np.zeros((0, self.w.shape[1]), np.float32)


@jax.jit
def _gram(w):
    return w.T @ w


@jax.jit
def _lstsq_h(p, w, b, pinv):
    positive = p > 0
    log_p = jnp.log(jnp.where(positive, p, 1.0))
    floor = jnp.min(jnp.where(positive, log_p, jnp.inf), axis=-1, keepdims=True) - 10.0
    target = jnp.where(positive, log_p, jnp.minimum(floor, -10.0)) - b
    moments = jnp.concatenate([target @ w, jnp.sum(target, axis=-1, keepdims=True)], axis=-1)
    return (moments @ pinv.T)[:, :-1]
