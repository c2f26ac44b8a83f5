"""The expressivity certificate: a lower bound on the KL that any prompt can reach, with a proof attached.

Every prompt's next-token logits are z = W h + b with h = final_norm(last hidden state) ∈ R^d, where
(W [V, d], b [V]) is the unembedding (b = 0 where the model has none). So for a target p

    LB(p) = inf over h ∈ R^d of KL(p ‖ softmax(W h + b))

lies below the KL of every soft or hard prompt. `unembedding_bound` computes it with a proof that the
reported value really is below LB, and `norm_bound_estimate` the same problem with h restricted to what the
final norm can output. Write p̄ = p / m for the stored row p of mass m (float32 rows sum to 1 only to ~1e-7);
every value reported is of Σ p log(p / q), the figure the prompt engines report, which equals
m · KL(p̄ ‖ q) + m log m.

By concern:
  problems.py     the float32 solves (L-BFGS over h, or over the final norm's input) as solver Problems
  lbfgs.py        the one-trial-point-per-step L-BFGS those problems step
  certificate.py  the float64 dual certificate of the unconstrained bound (and its Newton refinement)
  geometry.py     the final norm's image and the Frank–Wolfe lower bound over it
  host.py         the host's thread pool for that float64 work (BLAS kept to one thread)
  methods.py      BoundConfig, the two methods on the solver driver, and the functions users call

Scope. The bounds are for the model's arithmetic taken exactly with its float32 weights: with bfloat16
weights the normed state and the logits are rounded, which the bound does not model. Models with a final
logit softcap (z = c tanh(W h / c)) are refused: neither bound holds for them.
"""

from distprompt_jax.bounds.certificate import certify, dual_value, repair_distribution
from distprompt_jax.bounds.methods import (
    BOUND_SLOTS,
    CERTIFICATES,
    BoundConfig,
    BoundMethod,
    NormMethod,
    norm_bound_estimate,
    unembedding_bound,
)
from distprompt_jax.bounds.problems import INITS, BoundProblem, NormProblem

__all__ = [
    "BOUND_SLOTS", "CERTIFICATES", "INITS", "BoundConfig", "BoundMethod", "BoundProblem", "NormMethod",
    "NormProblem", "certify", "dual_value", "norm_bound_estimate", "repair_distribution", "unembedding_bound",
]
