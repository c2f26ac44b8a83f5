"""The final norm's image, and the Frank–Wolfe lower bound of the KL over it (method "bound_norm").

What the final norm can output is a smaller set than R^d: RMSNorm gives g ⊙ u / √(mean(u²) + ε) and
LayerNorm g ⊙ (u − ū) / √(var(u) + ε) + β. With ε > 0 these images are the open (centred, for LayerNorm)
ellipsoids {c + g ⊙ y : ‖y‖ < √d (, 1ᵀy = 0)}: convex. We optimize over the pre-norm u through the model's
own `final_norm` and `unembed` (restarts: one from the unconstrained solution, the others random; the best
is reported as an estimate, an upper bound on the norm-constrained infimum), and certify from below with
the Frank–Wolfe gap of the convex problem on the ellipsoid's closure E: for any x₀, by convexity of f,
inf_E f ≥ f(x₀) + rᵀx₀ − σ_E(r) with r = Wᵀ(p̄ − q(x₀)) and σ_E(r) = rᵀc + √d ‖Π(g ⊙ r)‖ the support
function (Π projects out the mean for LayerNorm, the identity for RMSNorm). Real prompts' normed states
lie (numerically) on the surface ‖y‖ = √d; whether the estimate does is reported (`on_boundary`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from distprompt_jax.bounds.certificate import U, Unembedding, evaluate, gamma, trivial_bound


@dataclasses.dataclass(frozen=True)
class NormImage:
    """The closure of the final norm's image: {c + g ⊙ y : ‖y‖ ≤ √d, and 1ᵀy = 0 if centred}."""

    kind: str  # "rms" | "layer"
    scale: np.ndarray  # g, float64
    center: np.ndarray  # c (LayerNorm bias; zero for RMSNorm)
    eps: float

    @classmethod
    def build(cls, lm) -> NormImage:
        """From the model's own description of its final norm (`LanguageModel.final_norm_parameters`)."""
        spec = lm.final_norm_parameters(lm.params)
        if spec.kind not in ("rms", "layer"):
            raise ValueError(f"{lm.name}: a final norm of kind {spec.kind!r} has no known image")
        scale = spec.offset + np.asarray(spec.scale, np.float64)  # Gemma's (1 + w): offset 1
        return cls(spec.kind, scale, np.asarray(spec.bias, np.float64), float(spec.eps))

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
        err = 4 * gamma(self.d + 4) * terms
        return value, err

    def on_boundary(self, x: np.ndarray) -> bool:
        safe = np.where(self.scale != 0, self.scale, 1.0)
        y = np.where(self.scale != 0, (x - self.center) / safe, 0.0)
        return bool(np.linalg.norm(y) >= (1 - 1e-3) * math.sqrt(self.d))


def certify_norm(unemb: Unembedding, geometry: NormImage, p: np.ndarray, x: np.ndarray) -> dict:
    """Primal at x (in the image) and the Frank–Wolfe lower bound over the image's closure."""
    point = evaluate(unemb, p, x)
    sigma, sigma_err = geometry.support_function(point.r)
    inner = float(point.r @ x)
    x_scale = float(np.linalg.norm(x)) + float(np.linalg.norm(geometry.center)) + math.sqrt(geometry.d) * float(
        np.abs(geometry.scale).max()
    )
    fw_gap = sigma - inner + sigma_err + 2 * gamma(geometry.d + 1) * float(np.abs(point.r) @ np.abs(x))
    fw_gap += 2 * point.r_err * x_scale
    fw_gap = max(fw_gap, 0.0) * (1 + 8 * U)
    lower = point.primal - point.primal_err - point.mass * (1 + gamma(len(p))) * fw_gap
    kind = "frank_wolfe"
    if not lower > trivial_bound(point):
        lower, kind = trivial_bound(point), "trivial"
    return {"primal": point.primal, "lower": lower, "certificate": kind, "on_boundary": geometry.on_boundary(x)}
