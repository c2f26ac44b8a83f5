"""The float64 certificate: a proven lower bound on min over h of Σ p log(p / softmax(W h + b)).

Notation as in problems.py: p̄ = p / m for the stored row p of mass m, f(h) = lse(W h + b) − p̄ᵀ(W h + b),
KL(p̄ ‖ softmax(W h + b)) = −H(p̄) + f(h); every value reported is of Σ p log(p / q) = m · KL(p̄ ‖ q) + m log m.

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
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
from scipy.linalg import solve_triangular
from scipy.special import entr

U = 2.0**-53  # unit roundoff of IEEE double


def gamma(n: float) -> float:
    """Higham's γ_n = n u / (1 − n u): the relative error bound of an n-term sum or dot product."""
    return n * U / (1.0 - n * U)


@dataclasses.dataclass(frozen=True)
class Unembedding:
    """W, b in float64 (exact copies of the float32 values) and per-row norms rounded up."""

    w: np.ndarray  # [V, d]
    b: np.ndarray  # [V]
    row_norm: np.ndarray  # ‖w_v‖₂, an upper bound
    a_norm: np.ndarray  # ‖(w_v, 1)‖₂, an upper bound
    w_max: float  # max_v ‖w_v‖₂

    @classmethod
    def build(cls, w, b) -> Unembedding:
        w = np.asarray(w, np.float64)
        b = np.asarray(b, np.float64)
        sq = np.einsum("vd,vd->v", w, w) * (1 + 2 * gamma(w.shape[1] + 2))
        return cls(w=w, b=b, row_norm=np.sqrt(sq) * (1 + U), a_norm=np.sqrt(sq + 1) * (1 + 2 * U),
                   w_max=float(np.sqrt(sq.max()) * (1 + U)))

    @property
    def vocab_size(self) -> int:
        return self.w.shape[0]

    @property
    def d(self) -> int:
        return self.w.shape[1]


class Point(NamedTuple):
    """One target at one h, evaluated in float64, with rigorous error bounds on the exact values."""

    primal: float  # Σ p (log p − log q), the stored-p KL (approximately; exact within primal_err)
    primal_err: float
    mass: float  # Σ p
    q: np.ndarray  # softmax(W h + b) (computed)
    rho: float  # |log q̂_v − log q_v| ≤ rho for every v (q exact softmax of the exact logits)
    r: np.ndarray  # Wᵀ(p̄ − q) (computed)
    r_err: float  # ‖r̂ − r‖₂ ≤ r_err
    r_norm_up: float  # ‖r‖₂ ≤ r_norm_up


def evaluate(unemb: Unembedding, p: np.ndarray, h: np.ndarray) -> Point:
    """One target at one point."""
    return _evaluate_batch(unemb, np.asarray(p)[None], np.asarray(h, np.float64)[None])[0]


BLOCK_ROWS = 8  # targets per matrix product in `evaluate_rows`


def evaluate_rows(unemb: Unembedding, p: np.ndarray, h: np.ndarray, rows: np.ndarray) -> list[Point]:
    """Targets p [B, V] at points h [B, d], W read once per block of BLOCK_ROWS targets (a matrix product:
    a quarter of the time of B matrix-vector products on SmolLM2).

    A product's rows are computed independently of each other's values, but how BLAS rounds a row can
    depend on its position in the block and the block's shape. So every block has BLOCK_ROWS rows (padded
    with copies) and a target always sits at position `rows % BLOCK_ROWS` (`rows`: the targets' indices):
    its point is bitwise the same whichever targets are evaluated beside it, so a resumed run certifies
    exactly as an uninterrupted one.
    """
    blocks: list[dict[int, int]] = []  # position -> index into p
    for i, position in enumerate(np.asarray(rows) % BLOCK_ROWS):
        block = next((block for block in blocks if position not in block), None)
        if block is None:
            block = {}
            blocks.append(block)
        block[int(position)] = i
    points: list[Point | None] = [None] * len(p)
    for block in blocks:
        filler = next(iter(block.values()))
        members = [block.get(position, filler) for position in range(BLOCK_ROWS)]
        evaluated = _evaluate_batch(unemb, np.asarray(p)[members], np.asarray(h, np.float64)[members])
        for position, i in block.items():
            points[i] = evaluated[position]
    return points


def _evaluate_batch(unemb: Unembedding, p: np.ndarray, h: np.ndarray) -> list[Point]:
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
    h_norm = np.linalg.norm(h, axis=1) * (1 + gamma(d))
    eps_z = 2 * gamma(d + 1) * (unemb.w_max * h_norm + float(np.abs(b).max()))
    t = z - z.max(axis=1, keepdims=True)
    e = np.exp(t)
    s = e.sum(axis=1, keepdims=True)
    log_s = np.log(s)
    log_q = t - log_s
    q = e / s
    rho = 2 * (2 * eps_z + gamma(vocab + 16) + 3 * U * (-t.min(axis=1)) + 6 * U * np.abs(log_s[:, 0]))
    positive = p > 0
    log_p = np.log(np.where(positive, p, 1.0))
    terms = np.where(positive, p * (log_p - log_q), 0.0)
    primal = terms.sum(axis=1)
    mass = p.sum(axis=1)
    primal_err = 2 * (mass * rho + gamma(vocab + 4) * np.abs(terms).sum(axis=1)
                      + 4 * U * np.sum(p * np.abs(log_p), axis=1))
    p_bar = p / mass[:, None]
    r = (p_bar - q) @ w
    grow = np.expm1(rho) * np.exp(rho)
    weight = (p_bar + q) @ unemb.row_norm
    r_err = 2 * (2 * gamma(vocab + 2) + grow + U) * weight * (1 + 4 * U)
    r_norm_up = np.linalg.norm(r, axis=1) * (1 + gamma(d + 1)) + r_err
    return [
        Point(float(primal[i]), float(primal_err[i]), float(mass[i]), q[i], float(rho[i]), r[i], float(r_err[i]),
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


def _system(unemb: Unembedding, point: Point, support: int) -> _System:
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


def _dual_bound(unemb: Unembedding, point: Point, system: _System) -> float:
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


def _level_bound(unemb, point: Point, a_s, q_s, gram, y, chosen) -> float:
    """The certified lower bound for support S = `chosen` (rows a_s, weights q_s), given any vector ŷ.

    Every computed quantity is replaced by a bound on the exact one (see "Rigour in floating point").
    """
    k, width = a_s.shape
    d = width - 1
    rho = point.rho
    a_norm = unemb.a_norm[chosen]
    trace = float(q_s @ np.square(a_norm)) * (1 + gamma(k + 2))
    y_norm = float(np.linalg.norm(y)) * (1 + gamma(d + 1))
    t = a_s @ y  # t_v = a_vᵀ ŷ
    t_up = np.abs(t) + 2 * gamma(d + 1) * a_norm * y_norm
    quad_up = math.exp(rho) * float(q_s @ np.square(t_up)) * (1 + gamma(k + 3))
    rhs = np.concatenate([point.r, [0.0]])
    res = rhs - gram @ y  # (r, 0) − G ŷ, G the exact Gram at the exact q
    gram_err = (math.expm1(rho) + gamma(k + 2) + gamma(d + 1)) * trace
    res_up = (float(np.linalg.norm(res)) * (1 + gamma(d + 2)) + point.r_err + 2 * gram_err * y_norm) * (1 + 4 * U)
    lam_hat = float(np.linalg.eigvalsh(gram)[0])
    lam_lo = math.exp(-rho) * (lam_hat - 2 * (gamma(k + 2) + 16 * (d + 1) * U) * trace)
    if not lam_lo > 0:
        return -math.inf
    nu = (math.sqrt(quad_up) + res_up / math.sqrt(lam_lo)) * (1 + 4 * U)
    # |δ_v| / q_v ≤ |t_v| + |a_vᵀ G⁻¹ res|, and |a_vᵀ G⁻¹ res| ≤ min(‖a_v‖ ‖res‖/λ, ‖res‖/√(λ q_v)).
    q_lo = q_s * math.exp(-rho) * (1 - 2 * U)
    correction = np.minimum(a_norm * res_up / lam_lo, res_up / np.sqrt(lam_lo * np.maximum(q_lo, 1e-300)))
    theta = float(np.max(t_up + correction)) * (1 + 4 * U)
    if not theta < 1:
        return -math.inf
    gap = nu * nu / (2 * (1 - theta)) * (1 + 8 * U)
    lower = point.primal - point.primal_err - point.mass * (1 + gamma(len(point.q))) * gap
    return lower - 8 * U * (abs(point.primal) + gap)


def _cho_solve(chol: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    return solve_triangular(chol.T, solve_triangular(chol, rhs, lower=True), lower=False)


def trivial_bound(point: Point) -> float:
    """The a-priori bound: KL(p̄ ‖ q) ≥ 0, i.e. m log m for the stored row (0 when p sums to exactly 1)."""
    m = point.mass
    return m * math.log(m) - 2 * gamma(len(point.q) + 4) * m


def _best_bound(point: Point, dual: float) -> tuple[float, str]:
    """The larger of the dual bound and the a-priori one, and which one it is."""
    trivial = trivial_bound(point)
    return (dual, "dual") if dual > trivial else (trivial, "trivial")


def _primal_only(unemb: Unembedding, p: np.ndarray, h: np.ndarray) -> float:
    """Σ p (log p − log q) at h, without the error bounds (for line searches)."""
    z = unemb.w @ h + unemb.b
    top = z.max()
    log_q = z - (top + math.log(np.exp(z - top).sum()))
    positive = p > 0
    return float(np.sum(p[positive] * (np.log(p[positive]) - log_q[positive])))


def certify_and_refine(unemb: Unembedding, p: np.ndarray, h: np.ndarray, *, support: int, refine_steps: int,
                       gap_tolerance: float, max_gap: float, point: Point | None = None) -> dict:
    """Certify the solver's point h; while the gap is above `gap_tolerance`, take up to `refine_steps`
    damped float64 Newton steps with the Hessian restricted to the certificate's support (whose Gram
    matrix the step reuses). A row whose final gap exceeds `max_gap` is reported uncertified (kl NaN).

    The rigorous certificate (an eigenvalue problem per support) is computed only where it can succeed:
    its gap is at least about half the Newton decrement rᵀΔh, which every step gives for free. `point`:
    the evaluation at h, if already computed (`evaluate_rows`).
    """
    h = np.asarray(h, np.float64)
    p64 = np.asarray(p, np.float64)
    point = evaluate(unemb, p64, h) if point is None else point
    refine = 0
    goal = gap_tolerance
    while True:
        system = _system(unemb, point, support)
        decrement = math.inf if system.y is None else float(point.r @ system.direction)
        last = system.y is None or refine >= refine_steps
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
                trial = evaluate(unemb, p64, candidate)
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
    certified = gap <= max_gap
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
    unemb = Unembedding.build(W, b)
    point = evaluate(unemb, np.asarray(p, np.float64), np.asarray(h, np.float64))
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
    unemb = Unembedding.build(W, b)
    point = evaluate(unemb, np.asarray(p), np.asarray(h, np.float64))
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
    value = float(entr(q).sum()) + float((q - p_bar) @ b) - float(entr(p_bar).sum())  # entr: 0 log 0 = 0
    return mass * value + mass * math.log(mass)
