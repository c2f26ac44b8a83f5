"""Gradient search on a per-target continuous variable: what soft prompts and prefixes share.

A `Recipe` is the optimizer (Adam, an optional global-norm clip, a learning-rate schedule with linear
warmup), per-target early stopping, and the floor a target stops at; `GradientState` is one target's search
over any pytree of float32 arrays (a soft prompt [L, d], a prefix's keys and values, an MLP that makes
them). `GradientMethod` is the part of an engine.Method the gradient engines share: slots, attempts and
restarts, and the targets as inputs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distprompt_jax.prompting.engine import DEFAULT_SLOTS
from distprompt_jax.prompting.objective import safe_log
from distprompt_jax.prompting.sandwich import run_with_bound
from distprompt_jax.results import PromptResults
from distprompt_jax.solve import DriverOptions, Patience, Progress, blown_up, track

SCHEDULES = ("constant", "cosine", "linear")


def check_recipe_fields(config) -> None:
    """The optimizer fields' checks (schedule, learning_rate, warmup, restart_above, clip_norm) for any config
    with them; a ValueError names the config class and the field. A config whose learning_rate may be None
    (its type says so) resolves it to a default of its own."""

    def fail(message):
        raise ValueError(f"{type(config).__name__}: {message}")

    if config.schedule not in SCHEDULES:
        fail(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    if config.learning_rate is not None and not config.learning_rate > 0:
        fail(f"learning_rate must be positive, got {config.learning_rate}")
    if not 0 <= config.warmup < 1:
        fail(f"warmup must be a fraction of max_steps in [0, 1), got {config.warmup}")
    if config.restart_above is not None and config.restart_above < 0:
        fail(f"restart_above must be non-negative or None, got {config.restart_above}")
    if config.clip_norm is not None and not config.clip_norm > 0:
        fail(f"clip_norm must be positive or None, got {config.clip_norm}")


class GradientState(NamedTuple):
    """One target's optimization state."""

    progress: Progress  # steps, best KL, active
    patience: Patience
    v: Any  # the variable being optimized: a float32 array or pytree of them
    opt_state: Any
    best_v: Any
    best_step: jax.Array
    initial_kl: jax.Array  # KL of the initial variable
    final_kl: jax.Array  # KL at the last step the target was still running
    diverged: jax.Array  # the KL or the variable blew up (solve.blown_up; the target stopped, its best point kept)
    kl_path: jax.Array  # [Recipe.path_length] the best KL after every `record_every` steps (inf until reached)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one target's variable is optimized: every field enters tracing."""

    learning_rate: float
    schedule: str
    warmup_steps: int
    clip_norm: float | None
    max_steps: int
    patience: int
    min_delta: float
    floor_tolerance: float
    record_every: int  # steps between the entries of the KL history (the config's segment_steps)

    @classmethod
    def from_config(cls, config, learning_rate: float | None = None) -> Recipe:
        """The recipe of `config`; `learning_rate` in place of config.learning_rate when given."""
        return cls(
            learning_rate=config.learning_rate if learning_rate is None else learning_rate, schedule=config.schedule,
            warmup_steps=int(round(config.warmup * config.max_steps)), clip_norm=config.clip_norm,
            max_steps=config.max_steps, patience=config.patience, min_delta=config.min_delta,
            floor_tolerance=config.floor_tolerance, record_every=config.segment_steps,
        )

    @property
    def path_length(self) -> int:
        """Entries of the KL history: one per `record_every` steps of the most a target runs."""
        return -(-self.max_steps // self.record_every)

    def optimizer(self) -> optax.GradientTransformation:
        rate, warmup = self.learning_rate, self.warmup_steps
        decay = {
            "constant": optax.constant_schedule(rate),
            "cosine": optax.cosine_decay_schedule(rate, max(1, self.max_steps - warmup)),
            "linear": optax.linear_schedule(rate, 0.0, max(1, self.max_steps - warmup)),
        }[self.schedule]
        if warmup:
            decay = optax.join_schedules([optax.linear_schedule(0.0, rate, warmup), decay], [warmup])
        steps = [optax.clip_by_global_norm(self.clip_norm)] if self.clip_norm else []
        return optax.chain(*steps, optax.adam(decay))

    def start(self, v) -> GradientState:
        """The state of an attempt that starts at `v`."""
        inf = jnp.float32(jnp.inf)
        return GradientState(
            progress=Progress.start(), patience=Patience.start(), v=v, opt_state=self.optimizer().init(v),
            best_v=v, best_step=jnp.int32(0), initial_kl=inf, final_kl=inf, diverged=jnp.asarray(False),
            kl_path=jnp.full((self.path_length,), inf),
        )

    def step(self, s: GradientState, loss: Callable[[Any], jax.Array], floor) -> GradientState:
        """One optimizer step on `loss(v)` (the KL); the target stops at its floor (+ floor_tolerance), on
        patience or max_steps, or diverged: the KL no longer finite, or the step took the variable where the
        model's norms overflow (`solve.blown_up`)."""
        kl, grad = jax.value_and_grad(loss)(s.v)
        updates, opt_state = self.optimizer().update(grad, s.opt_state, s.v)
        progress, patience, better = track(s.progress, s.patience, kl, min_delta=self.min_delta,
                                           max_steps=self.max_steps, patience_steps=self.patience)
        v = optax.apply_updates(s.v, updates)
        diverged = ~jnp.isfinite(kl) | blown_up(v)
        at_floor = progress.best <= floor + self.floor_tolerance
        return GradientState(
            progress=progress._replace(active=progress.active & ~diverged & ~at_floor),
            patience=patience,
            v=v,
            opt_state=opt_state,
            best_v=jax.tree.map(lambda now, best: jnp.where(better, now, best), s.v, s.best_v),
            best_step=jnp.where(better, s.progress.steps, s.best_step),
            initial_kl=jnp.where(s.progress.steps == 0, kl, s.initial_kl),
            final_kl=kl,
            diverged=diverged,
            kl_path=self._recorded(s.kl_path, progress),
        )

    def _recorded(self, path: jax.Array, progress) -> jax.Array:
        """The KL history with the best KL entered where this step completes `record_every` steps."""
        due = progress.steps % self.record_every == 0
        entry = jnp.where(due, progress.steps // self.record_every - 1, self.path_length)  # out of range: none
        return path.at[entry].set(progress.best, mode="drop")

    def history(self, s: GradientState) -> dict:
        """The per-target figures every gradient engine reports about its search, and its KL history
        `kl_path`: entry i is the best KL after (i + 1) · record_every steps, or after the last step where the
        target stopped before that."""
        reached = (jnp.arange(self.path_length) + 1) * self.record_every <= s.progress.steps
        return dict(kl=s.progress.best, initial_kl=s.initial_kl, final_kl=s.final_kl, best_step=s.best_step,
                    steps=s.progress.steps, diverged=s.diverged,
                    kl_path=jnp.where(reached, s.kl_path, s.progress.best))


def prepare_target(inputs):
    """(p, log p, floor): one target's device-side data (Problem.prepare)."""
    p = inputs["p"]
    return p, safe_log(p), inputs["floor"]


class GradientMethod:
    """What the gradient engines' methods (engine.Method) share; a subclass sets `name`, `desc` and builds
    `self.lm`, `self.config`, `self._problem`, and gives `columns`."""

    slot_defaults = DEFAULT_SLOTS
    desc = "targets"

    def problem(self):
        return self._problem

    def options(self, slots: int) -> DriverOptions:
        c = self.config
        # init="text": every attempt would start from the same point and repeat the same run.
        attempts = 1 if c.init == "text" else c.restarts
        return DriverOptions(slots=slots, segment_steps=c.segment_steps, refill_at=c.refill_at, attempts=attempts,
                             retry_above=c.restart_above, seed=c.seed, desc=self.desc)

    def inputs(self, probs: np.ndarray, rows: slice) -> dict[str, np.ndarray]:
        return {"p": np.asarray(probs, np.float32)}

    def split_reports(self, reports: dict[str, np.ndarray], array_results: tuple[str, ...],
                      prompt_len: int) -> tuple[dict, dict]:
        """(columns, arrays) of the driver's reports: `kl` first (the figure every table is read for), then the
        other scalars, the config's template and `prompt_len`, and the learning rate the search ran with (a
        config's default may be resolved from the model); `array_results` (prompts, keys) and the KL history
        `kl_path` as arrays."""
        array_results = (*array_results, "kl_path")
        columns = {"kl": reports["kl"]} | {k: v for k, v in reports.items() if k not in array_results}
        n = len(columns["kl"])
        columns["template"] = np.full(n, self.config.template)
        columns["prompt_len"] = np.full(n, prompt_len)
        columns["learning_rate"] = np.full(n, self._problem.recipe.learning_rate)
        return columns, {k: v for k, v in reports.items() if k in array_results}

    def run_info(self) -> dict:
        """What a result needs beside its rows to be used elsewhere (`PromptResults.save_peft`): the model
        and its attention shape, and the fixed tokens around the optimized part."""
        cfg, context = self.lm.config, self._problem.context
        return {
            "model": self.lm.name, "family": cfg.family, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "d_model": cfg.d_model,
            "prefix_ids": list(context.prefix_ids), "suffix_ids": list(context.suffix_ids),
            # As JSON reads it back (tuples as lists), so that a saved and loaded result is equal.
            "config": json.loads(json.dumps(dataclasses.asdict(self.config))),
        }


def run_gradient_method(method: GradientMethod, lm, targets, with_bound, *, devices=None,
                        progress: bool = True) -> PromptResults:
    """`method` over `targets` with the certified bound as floor (sandwich.run_with_bound), its results
    carrying the method's `run_info`."""
    result = run_with_bound(method, lm, targets, with_bound, devices=devices, progress=progress)
    result.run_info = method.run_info()
    return result
