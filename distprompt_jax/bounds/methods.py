"""The bound and the norm-constrained estimate as methods on the solver driver (prompting.engine.Method).

The device runs the float32 L-BFGS problems (problems.py) in the driver's refilled pool; the host
certifies each finished target in float64 (certificate.py, geometry.py) on a thread pool — for the bound
as the driver reports targets finished, so the certificate of one segment's targets overlaps the next
segment on the device.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from distprompt_jax import parallel
from distprompt_jax.bounds.certificate import Unembedding, certify_and_refine, evaluate_rows
from distprompt_jax.bounds.geometry import NormImage, certify_norm
from distprompt_jax.bounds.host import HostJobs
from distprompt_jax.bounds.problems import INITS, BoundProblem, LeastSquaresInit, NormProblem
from distprompt_jax.field_types import check_field_types
from distprompt_jax.prompting.engine import check_slots, run_method
from distprompt_jax.results import PromptResults
from distprompt_jax.solve import DriverOptions
from distprompt_jax.targets import as_target_set

CERTIFICATES = ("dual", "trivial", "frank_wolfe", "unconstrained", "none")

# Slots by platform. On a CPU the float32 solve and the host's certificate share the cores; 64 slots keep
# the device busy while the host certifies the previous segment's targets (BENCHMARKS.md).
BOUND_SLOTS = {"cpu": 64, "accelerator": 256}


@dataclasses.dataclass(frozen=True)
class BoundConfig:
    """Settings of the unembedding bound and the norm-constrained estimate (defaults are ours)."""

    max_steps: int = 500  # float32 L-BFGS iterations per target (unconstrained problem)
    tolerance: float = 1e-6  # stop a target when the float32 gradient norm is below this
    memory: int = 10  # L-BFGS history pairs
    init: str = "auto"  # "zeros" | "lstsq" (least-squares fit of W h + b + c to log p) | "auto": the better
    # float64 Newton steps on the host where the certificate is not yet tight (a row stops once it is; a
    # long-tailed Gemma-3-270M target took 50, BENCHMARKS.md)
    refine_steps: int = 100
    support: int = 2048  # tokens (the most probable under q) the certificate's repair may move mass on
    gap_tolerance: float = 1e-6  # refine until the certified gap (primal − bound) is below this, in nats
    max_gap: float = 1e-3  # rows whose certified gap exceeds this are reported uncertified (kl NaN)
    restarts: int = 4  # norm-constrained estimate: restarts (the first from the unconstrained solution)
    norm_steps: int = 500  # norm-constrained estimate: L-BFGS iterations per restart
    seed: int = 0  # random restarts of the norm-constrained estimate
    slots: int | str | None = None  # targets solved at once; None: 64 on a CPU, 256 on an accelerator;
    #                                 "auto": sized from XLA's memory analysis to half the free memory
    segment_steps: int = 50  # most iterations per compiled call (progress and checkpoint granularity)
    refill_at: int | None = None  # end a segment early once this many slots are free (None: slots // 16, ≥ 1)
    host_threads: int | None = None  # threads certifying targets on the host (None: min(8, CPU count))
    shard_params: bool = False  # split the weights over the devices (models too large for one device)

    def __post_init__(self):
        check_field_types(self)

    def validate(self, lm=None) -> None:
        """Check the fields (and, given the model, that the bound applies to it and `support` is enough)."""

        def fail(message):
            raise ValueError(f"BoundConfig: {message}")

        for name in ("max_steps", "memory", "support", "restarts", "norm_steps", "segment_steps"):
            value = getattr(self, name)
            if value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.refine_steps < 0:
            fail(f"refine_steps must be a non-negative integer, got {self.refine_steps!r}")
        if self.init not in INITS:
            fail(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("tolerance", "gap_tolerance", "max_gap"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                fail(f"{name} must be a positive finite number, got {value!r}")
        if self.host_threads is not None and self.host_threads < 1:
            fail(f"host_threads must be a positive integer or None, got {self.host_threads!r}")
        if self.gap_tolerance > self.max_gap:
            fail(f"gap_tolerance ({self.gap_tolerance}) must not exceed max_gap ({self.max_gap})")
        check_slots(self)
        if lm is None:
            return
        cap = getattr(lm.config, "final_logit_softcap", None)
        if cap is not None:
            raise ValueError(
                f"{lm.name} has final_logit_softcap={cap}: its logits c·tanh((W h + b)/c) are not affine in h, "
                "so neither the convex unembedding bound nor its certificate applies"
            )
        if min(self.support, lm.vocab_size) < min(lm.d_model + 1, lm.vocab_size):
            fail(f"support={self.support} is below d_model + 1 = {lm.d_model + 1}: the certificate's Gram "
                 "matrix would be singular")


def unembedding_bound(
    lm, targets, config: BoundConfig | None = None, *, devices=None, take_share: bool = True, progress: bool = True,
) -> PromptResults:
    """Certified lower bound on the KL any prompt of `lm` can reach, for each target.

    Args:
      lm: a LanguageModel.
      targets: a TargetSet or an [N, V] array of probabilities over lm's vocabulary.
      config: BoundConfig (defaults as documented there).
      devices: devices to shard the slots over (default: this process's devices). In a multi-host run
        each process bounds its own contiguous share of the targets and returns results for those.
      take_share: False when `targets` already are this process's share (as in a sweep).
      progress: show a progress bar (tqdm) while targets are solved.
    Returns:
      PromptResults with method "bound". Columns: `kl` the certified lower bound (NaN where uncertified),
      `primal` the KL at the solver's h (an upper bound on the infimum), `gap` = primal − the best proven
      bound, `certified`, `certificate` ("dual" | "trivial" | "none"), `residual` ‖Wᵀ(p̄ − q)‖, `h_norm`,
      `steps` (float32 L-BFGS), `refine_steps` (float64 Newton), `prompt_len` = 0. Arrays: `h` [N, d]
      float64, the final-normed hidden vector the primal value belongs to.
    """
    method = BoundMethod(lm, config)
    return run_method(method, lm, targets, devices=devices, take_share=take_share, on_finished=method.finished,
                      progress=progress)


def norm_bound_estimate(
    lm, targets, config: BoundConfig | None = None, *, devices=None, take_share: bool = True,
    unconstrained: PromptResults | None = None, progress: bool = True,
) -> PromptResults:
    """Best KL over h restricted to the final norm's image (an estimate), with a Frank–Wolfe lower bound.

    Args:
      lm, targets, config, devices, take_share, progress: as for `unembedding_bound`.
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
    target_set = as_target_set(targets, lm.vocab_size)
    start_h = prior_lower = None
    if unconstrained is not None:
        share = parallel.process_slice(len(target_set)) if take_share else slice(None)
        ids = target_set.metadata["target_id"].to_numpy()[share]
        if unconstrained.method != "bound" or "h" not in unconstrained.arrays:
            raise ValueError("`unconstrained` must be the PromptResults of unembedding_bound")
        if len(unconstrained) != len(ids) or not np.array_equal(unconstrained.metadata["target_id"].to_numpy(), ids):
            raise ValueError("`unconstrained` results are for other targets (target_id differs)")
        start_h = np.asarray(unconstrained.arrays["h"], np.float32)
        prior_lower = (np.asarray(unconstrained.columns["primal"], np.float64)
                       - np.asarray(unconstrained.columns["gap"], np.float64))
    method = NormMethod(lm, config, start_h=start_h, prior_lower=prior_lower)
    return run_method(method, lm, target_set, devices=devices, take_share=take_share, progress=progress)


class BoundMethod:
    """The certified unembedding bound as a method (engine.Method): what `unembedding_bound` and the sweep run.

    A method runs one target set at a time: `inputs(probs, rows)` starts a run (the host keeps the rows to
    certify), `finished(rows, reports)` certifies targets on host threads as the driver reports them done
    (while the device runs the next segment), and `columns(reports)` waits for those certificates and
    computes any the driver did not report (so it is complete on its own).
    """

    name = "bound"
    slot_defaults = BOUND_SLOTS

    def __init__(self, lm, config: BoundConfig | None = None):
        config = config or BoundConfig()
        config.validate(lm)
        self.lm, self.config = lm, config
        self._problem = BoundProblem.build(lm, config)
        w, b = lm.unembedding(lm.params)
        self._unembedding = Unembedding.build(np.asarray(w), np.asarray(b))
        self._lstsq = LeastSquaresInit(w, b) if config.init != "zeros" else None
        self._run: HostJobs | None = None
        self.host_seconds = 0.0  # the last run's certificate time, summed over host threads

    def problem(self) -> BoundProblem:
        return self._problem

    def options(self, slots: int) -> DriverOptions:
        c = self.config
        # A full pool to the end: a compacted tail would change the float32 rounding of the last targets' solves,
        # and a certificate's residuals would then depend on how the targets were split over processes.
        return DriverOptions(slots=slots, segment_steps=c.segment_steps, refill_at=c.refill_at, seed=c.seed,
                             compact_tail=False, desc="unembedding bound")

    def inputs(self, probs: np.ndarray, rows: slice) -> dict[str, np.ndarray]:
        probs = np.asarray(probs, np.float32)
        if self._run is not None:
            self._run.close()  # a run that never reached `columns` (interrupted)
        c = self.config

        def evaluate(rows: np.ndarray, h: np.ndarray) -> list:
            return evaluate_rows(self._unembedding, probs[rows], h, rows)

        def certify(row: int, h: np.ndarray, point) -> dict:
            return certify_and_refine(self._unembedding, probs[row], h, support=c.support, refine_steps=c.refine_steps,
                                      gap_tolerance=c.gap_tolerance, max_gap=c.max_gap, point=point)

        self._run = HostJobs(certify, c.host_threads, prepare=evaluate)
        inputs = {"p": probs}
        if self._lstsq is not None:
            inputs["h0"] = self._lstsq(probs)
        return inputs

    def finished(self, rows: np.ndarray, reports: dict[str, np.ndarray]) -> None:
        self._running().submit(rows, reports["h"])

    def columns(self, reports: dict[str, np.ndarray]) -> tuple[dict, dict]:
        run, self._run = self._running(), None
        rows = run.results(reports["h"])
        self.host_seconds = run.seconds
        names = ("kl", "primal", "gap", "certified", "certificate", "residual", "h_norm")
        columns = {name: np.asarray([row[name] for row in rows]) for name in names}
        columns["steps"] = reports["steps"]
        columns["refine_steps"] = np.asarray([row["refine_steps"] for row in rows], np.int32)
        columns["prompt_len"] = np.zeros(len(rows), np.int32)
        h = np.stack([row["h"] for row in rows]) if rows else np.zeros((0, self.lm.d_model))
        return columns, {"h": h}

    def _running(self) -> HostJobs:
        if self._run is None:
            raise RuntimeError("BoundMethod: no run in progress (`inputs` starts one)")
        return self._run


class NormMethod:
    """The norm-constrained estimate as a method (engine.Method): what `norm_bound_estimate` runs.

    Restarts are the driver's attempts: the first starts from the preimage of the unconstrained h (`start_h`,
    else the least-squares fit), the others from N(0, I) draws of their (seed, attempt, target index) keys; the
    driver keeps each target's best (the first of equals), and `columns` bounds it from below.
    """

    name = "bound_norm"
    slot_defaults = BOUND_SLOTS

    def __init__(self, lm, config: BoundConfig | None = None, *, start_h: np.ndarray | None = None,
                 prior_lower: np.ndarray | None = None):
        """`start_h` [N, d]: the unconstrained solutions of the targets this method will run on; `prior_lower`
        [N]: lower bounds already proven for them (the unconstrained bound holds here too)."""
        config = config or BoundConfig()
        config.validate(lm)
        self.lm, self.config = lm, config
        self.start_h, self.prior_lower = start_h, prior_lower
        self._problem = NormProblem.build(lm, config)
        self._geometry = NormImage.build(lm)
        w, b = lm.unembedding(lm.params)
        self._unembedding = Unembedding.build(np.asarray(w), np.asarray(b))
        self._lstsq = LeastSquaresInit(w, b) if start_h is None else None
        self._probs: np.ndarray | None = None

    def problem(self) -> NormProblem:
        return self._problem

    def options(self, slots: int) -> DriverOptions:
        c = self.config
        return DriverOptions(slots=slots, segment_steps=c.segment_steps, refill_at=c.refill_at, seed=c.seed,
                             attempts=c.restarts, compact_tail=False, desc="norm-constrained bound")  # as BoundMethod

    def inputs(self, probs: np.ndarray, rows: slice) -> dict[str, np.ndarray]:
        probs = np.asarray(probs, np.float32)
        if self.start_h is not None and len(self.start_h) != len(probs):
            raise ValueError(f"NormMethod: start_h has {len(self.start_h)} rows for {len(probs)} targets")
        h0 = self.start_h if self.start_h is not None else self._lstsq(probs)
        self._probs = probs
        return {"p": probs, "u0": self._geometry.preimage(np.asarray(h0, np.float64)).astype(np.float32)}

    def columns(self, reports: dict[str, np.ndarray]) -> tuple[dict, dict]:
        probs, n = self._probs, len(self._probs)
        u = reports["u"]
        x = self._geometry.output(u.astype(np.float64))
        for i in range(n):
            self._geometry.check(x[i], reports["x_model"][i])
        run = HostJobs(lambda i, x_i, _: certify_norm(self._unembedding, self._geometry, probs[i], x_i),
                       self.config.host_threads)
        certified = run.results(x)
        if self.prior_lower is not None:
            for i, row in enumerate(certified):
                if self.prior_lower[i] > row["lower"]:
                    row["lower"], row["certificate"] = float(self.prior_lower[i]), "unconstrained"
        primal = np.asarray([row["primal"] for row in certified], np.float64)
        lower = np.asarray([row["lower"] for row in certified], np.float64)
        columns = {
            "kl": primal, "primal": primal, "lower": lower, "gap": primal - lower,
            "certified": primal - lower <= self.config.max_gap,
            "certificate": np.asarray([row["certificate"] for row in certified]),
            "on_boundary": np.asarray([row["on_boundary"] for row in certified], bool),
            "best_restart": reports["attempt"].astype(np.int32), "steps": reports["steps"],
            "prompt_len": np.zeros(n, np.int32),
        }
        return columns, {"u": u, "x": x}
