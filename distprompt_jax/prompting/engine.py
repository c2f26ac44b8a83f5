"""What every method (soft, hard, bound, ...) shares on top of the solver driver: the contract of a method,
where the weights live, how many slots a pool gets, and turning the driver's reports into PromptResults.

A `Method` is a configured computation over targets: it names its problem (what one target's optimization
is), the driver options (slots, segment length, attempts, seed — host-side choices, never traced), the
per-target inputs it builds from the target probabilities, and how its reports become result columns.
`run_method` runs it over a target set (this process's share in a multi-host run) — the one path that
`soft_prompt`, `hard_prompt`, `unembedding_bound` and the experiment sweep all take.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np

from distprompt_jax import parallel
from distprompt_jax.lm import LanguageModel
from distprompt_jax.prompting.context import TEMPLATES
from distprompt_jax.results import PromptResults
from distprompt_jax.solve import (
    Driver,
    DriverOptions,
    PoolCheckpoint,
    Problem,
    SegmentInfo,
    lower_segment,
    with_floors,
)
from distprompt_jax.targets import as_target_set, entropy_nats

# Slot counts by platform when a config leaves them to us: deterministic, so a rerun (or a resume) on the
# same hardware computes the same batches. A CPU is compute-bound near its peak from ~64 targets at once
# (BENCHMARKS.md); accelerators want large batches.
DEFAULT_SLOTS = {"cpu": 64, "accelerator": 1024}

# Output entropies that agree this closely (relative) over targets of different entropies are one distribution.
COLLAPSE_TOLERANCE = 1e-6

_STRUCTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_structure(lm: LanguageModel):
    """lm without its weights, one object per model: problems hold it (and are compared by it), take the
    parameters as an argument, and never keep them (closed-over weights are folded into the program)."""
    if lm not in _STRUCTURES:
        _STRUCTURES[lm] = dataclasses.replace(lm, params=None)
    return _STRUCTURES[lm]


def default_slots(platform: str | None = None, table: dict | None = None) -> int:
    platform = platform or jax.default_backend()
    return (table or DEFAULT_SLOTS)["cpu" if platform == "cpu" else "accelerator"]


class Method(Protocol):
    """A configured method: see the module docstring."""

    name: str
    config: object  # the method's config dataclass (slots, segment_steps, seed, ... among its fields)
    slot_defaults: dict  # slots by platform ("cpu" / "accelerator") when the config leaves them to us

    def problem(self) -> Problem: ...

    def options(self, slots: int) -> DriverOptions: ...

    def inputs(self, probs: np.ndarray, rows: slice) -> dict[str, np.ndarray]:
        """Per-target inputs of the targets `rows` of the whole set (whose probabilities are `probs`)."""

    def columns(self, reports: dict[str, np.ndarray]) -> tuple[dict, dict]: ...

    # Optional: `finished(rows, reports)`, told of targets as they finish (see Driver.run's on_finished).


def check_shared_fields(config, lm, inits: tuple[str, ...], at_least_one: tuple[str, ...]) -> None:
    """The checks both prompt configs share; a ValueError names the config class and the field."""

    def fail(message):
        raise ValueError(f"{type(config).__name__}: {message}")

    check_finite_floats(config)
    if config.prompt_len < 1:
        fail(f"prompt_len must be at least 1, got {config.prompt_len}")
    if config.template not in TEMPLATES:
        fail(f"template must be one of {TEMPLATES}, got {config.template!r}")
    if config.template == "chat" and (lm.tokenizer is None or not getattr(lm.tokenizer, "chat_template", None)):
        fail(f"template='chat', but {lm.name} has no chat template (its tokenizer has none)")
    if config.init not in inits:
        fail(f"init must be one of {inits}, got {config.init!r}")
    if (config.init == "text") != (config.init_text is not None):
        fail("init_text is given exactly when init='text'")
    for name in at_least_one:
        if getattr(config, name) < 1:
            fail(f"{name} must be at least 1, got {getattr(config, name)}")
    check_slots(config)
    if config.min_delta < 0:
        fail(f"min_delta must be non-negative, got {config.min_delta}")
    if config.floor_tolerance < 0:
        fail(f"floor_tolerance must be non-negative, got {config.floor_tolerance}")
    if config.top_k > lm.vocab_size:
        fail(f"top_k={config.top_k} exceeds the vocabulary ({lm.vocab_size})")


def check_finite_floats(config) -> None:
    """Every float field of a config dataclass is finite (inf or nan would run and report nonsense)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not np.isfinite(value):
            raise ValueError(f"{type(config).__name__}: {field.name} must be finite, got {value}")


def check_slots(config) -> None:
    refill_at = config.refill_at
    if refill_at is not None and refill_at < 1:
        raise ValueError(f"{type(config).__name__}: refill_at must be a positive integer or None, got {refill_at!r}")
    slots = config.slots
    if slots is None or slots == "auto":
        return
    if isinstance(slots, str) or slots < 1:
        raise ValueError(f"{type(config).__name__}: slots must be a positive integer, 'auto' or None, got {slots!r}")


def place_params(lm: LanguageModel, mesh, shard: bool):
    """The weights on the mesh: replicated, or split over the devices for models too large for one."""
    if shard:
        return parallel.sharded_params(lm.params, mesh)
    return jax.device_put(lm.params, parallel.replicated(mesh))


def resolve_slots(method: Method, params, mesh, example_inputs: dict, n_targets: int) -> int:
    """The pool size: the config's number, the platform default (None), or sized from XLA's memory analysis
    of the compiled segment ("auto"). Never more than the targets (rounded up to the devices): more slots
    would only compute idle ones."""
    slots = method.config.slots
    if slots == "auto":
        slots = auto_slots(method.problem(), params, mesh, example_inputs, n_targets)
    elif slots is None:
        slots = default_slots(table=method.slot_defaults)
    # A target's next attempt starts only when its previous one ends, so at most n_targets jobs run at once.
    return parallel.round_up(max(1, min(int(slots), n_targets)), mesh.size)


def auto_slots(problem: Problem, params, mesh, example_inputs: dict, n_targets: int) -> int:
    """The largest pool whose compiled segment fits half the free device memory (XLA's memory analysis)."""
    sharding = parallel.target_sharding(mesh)
    example = {name: jax.ShapeDtypeStruct(np.shape(v)[1:], np.asarray(v).dtype) for name, v in example_inputs.items()}

    def lower(size: int):
        return lower_segment(problem, params, example, size, sharding)

    fixed = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))
    return parallel.auto_chunk_size(lower, n_targets=n_targets, n_devices=mesh.size, fixed_bytes=fixed)


def run_method(
    method: Method, lm, targets, *, devices=None, take_share: bool = True, first_index: int = 0,
    checkpoint: PoolCheckpoint | None = None, checkpoint_every: int | None = None, slots: int | None = None,
    on_segment: Callable[[SegmentInfo], None] | None = None,
    on_finished: Callable[[np.ndarray, dict], None] | None = None,
    on_slots: Callable[[int], None] | None = None, progress: bool = True, floors: np.ndarray | None = None,
) -> PromptResults:
    """Run `method` over `targets` (a TargetSet or [N, V] probabilities) and return its PromptResults.

    Multi-host: each process runs its own contiguous share; with `take_share=False` the targets already
    are this process's rows, the first of them at `first_index` in the whole set. `slots` overrides the
    method's own pool size (a resumed run passes the count it recorded through `on_slots`). `checkpoint`,
    `on_segment`, `on_finished`, `floors` (one per target this process runs: its share): see `Driver.run`.
    """
    target_set = as_target_set(targets, lm.vocab_size)
    share = parallel.process_slice(len(target_set)) if take_share else slice(0, len(target_set))
    probs = target_set.probs[share]
    mesh = parallel.local_mesh(devices)
    params = place_params(lm, mesh, getattr(method.config, "shard_params", False))
    inputs = method.inputs(probs, share if take_share else slice(first_index, first_index + len(probs)))
    if slots is None:
        example, _ = with_floors({k: v[:1] for k, v in inputs.items()}, None)
        slots = resolve_slots(method, params, mesh, example, max(1, len(probs)))
    if on_slots is not None:
        on_slots(slots)
    options = dataclasses.replace(method.options(slots), progress=progress and len(probs) > 1)
    if checkpoint_every is not None:
        options = dataclasses.replace(options, checkpoint_every=checkpoint_every)
    driver = Driver(method.problem(), params, options, mesh)
    # A method with host work per finished target (the bound's certificates) does it while the device runs on.
    on_finished = on_finished or getattr(method, "finished", None)
    reports = driver.run(inputs, first_index=share.start if take_share else first_index, checkpoint=checkpoint,
                         on_segment=on_segment, on_finished=on_finished, floors=floors)
    columns, arrays = method.columns(reports)
    if "entropy" in columns:  # a prompt method: its outputs' entropies are reported
        columns = with_diverged_flag(method.name, columns, entropy_nats(probs))
    metadata = target_set.metadata.iloc[share].reset_index(drop=True)
    return PromptResults(method=method.name, columns=columns, arrays=arrays, metadata=metadata)


def collapsed_outputs(output_entropy: np.ndarray, target_entropy: np.ndarray) -> bool:
    """Whether a method's output was one distribution for every target: at least two targets of different
    entropies, and output entropies all equal to float32 precision. A search that blew up (prompts beyond what
    the model's norms can take) gives the same output, typically the uniform one, whatever the target."""
    output_entropy = np.asarray(output_entropy, np.float64)
    if len(output_entropy) < 2 or np.ptp(target_entropy) <= 1e-3:
        return False
    return bool(np.ptp(output_entropy) <= COLLAPSE_TOLERANCE * max(1.0, np.abs(output_entropy).max()))


def with_diverged_flag(name: str, columns: dict, target_entropy: np.ndarray) -> dict:
    """`columns` with a `diverged` column: the method's own (a search that blew up), else all False, and set
    for every target when the outputs collapsed (`collapsed_outputs`). Diverged targets are warned about:
    their rows are no findings (the report leaves them out of its statistics)."""
    n = len(columns["entropy"])
    diverged = np.asarray(columns.get("diverged", np.zeros(n, bool)), bool)
    if collapsed_outputs(columns["entropy"], target_entropy):
        warnings.warn(f"{name}: the output is the same distribution for all {n} targets (entropy "
                      f"{float(columns['entropy'][0]):.6f}): the search diverged, every target is marked diverged; "
                      "lower the learning rate")
        diverged = np.ones(n, bool)
    elif diverged.any():
        warnings.warn(f"{name}: {int(diverged.sum())} of {n} targets diverged (the KL or the prompt blew up) and are "
                      "marked diverged; lower the learning rate")
    return {**columns, "diverged": diverged}
