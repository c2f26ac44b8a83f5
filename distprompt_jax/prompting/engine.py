"""What the soft and hard engines share: where the weights live, chunk sizing, the chunk being run, the
compile cache, and turning finished chunks into one result.

An engine advances a chunk of targets segment by segment; a chunk run (a dataclass of arrays and ints)
can be checkpointed between segments and resumed with the same result. Subclasses name their problem
class (how the prompt enters the model, its init, one compiled segment, the report of a finished prompt).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import ClassVar

import jax
import numpy as np

from distprompt_jax import parallel
from distprompt_jax.prompting.objective import safe_log
from distprompt_jax.results import PromptResults

# lm -> {normalized config: (problem, jitted run_segment, jitted report)}. Compiling a segment is most of a
# small run's time (tens of seconds on a real model), so calls with the same model and config share it.
# Weak keys: problems never hold the parameters (see `without_params`), so a model its user drops is freed.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILED_PER_MODEL = 8


def without_params(lm):
    """lm without its weights: problems take the parameters as an argument and must not keep them."""
    return dataclasses.replace(lm, params=None)


def compiled_problem(lm, config, problem_class):
    """(problem, jitted run_segment, jitted report) of `problem_class.build(lm, config)`, cached."""
    # Fields that do not change the traced program (shapes, shardings and num_steps are jit's own keys; the
    # seed enters as data), so a cached problem must never read them: the engine passes them in.
    key = dataclasses.replace(config, seed=0, chunk_size=None, segment_steps=1, shard_params=False)
    entries = _COMPILED.setdefault(lm, {})
    if key not in entries:
        if len(entries) >= _COMPILED_PER_MODEL:
            entries.pop(next(iter(entries)))
        problem = problem_class.build(lm, key)
        entries[key] = (problem, jax.jit(problem.run_segment, static_argnames="num_steps"), jax.jit(problem.report))
    return entries[key]


def check_shared_fields(config, lm, inits: tuple[str, ...], at_least_one: tuple[str, ...],
                        positive_or_none: tuple[str, ...]) -> None:
    """The checks both prompt configs share; a ValueError names the config class and the field."""

    def fail(message):
        raise ValueError(f"{type(config).__name__}: {message}")

    if config.prompt_len < 1:
        fail(f"prompt_len must be at least 1, got {config.prompt_len}")
    if config.init not in inits:
        fail(f"init must be one of {inits}, got {config.init!r}")
    if (config.init == "text") != (config.init_text is not None):
        fail("init_text is given exactly when init='text'")
    for name in at_least_one:
        if getattr(config, name) < 1:
            fail(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in positive_or_none:
        if getattr(config, name) is not None and getattr(config, name) < 1:
            fail(f"{name} must be positive or None, got {getattr(config, name)}")
    if config.min_delta < 0:
        fail(f"min_delta must be non-negative, got {config.min_delta}")
    if config.top_k > lm.vocab_size:
        fail(f"top_k={config.top_k} exceeds the vocabulary ({lm.vocab_size})")


def concat_chunks(chunks: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """The (columns, arrays) of consecutive chunks joined along the target axis."""
    columns = {k: np.concatenate([c[k] for c, _ in chunks]) for k in chunks[0][0]}
    arrays = {k: np.concatenate([a[k] for _, a in chunks]) for k in chunks[0][1]}
    return columns, arrays


@dataclasses.dataclass
class ChunkRun:
    """Where one chunk's optimization stands; `ARRAY_FIELDS` hold per-target arrays, the rest are ints."""

    ARRAY_FIELDS: ClassVar[tuple[str, ...]] = ("state",)

    first_index: int  # index of the chunk's first target in the whole target set
    n_rows: int  # real targets; the rest of the chunk is padding
    state: tuple
    finished: bool = False


class ChunkEngine:
    """A configured optimization over chunks of targets (subclasses: SoftEngine, HardEngine).

    Subclasses define `start(probs, first_index) -> run`, `advance(run) -> run` (one segment; sets
    `finished`), and `_chunk_results(run, p) -> (columns, arrays)` over the padded chunk.
    """

    method: ClassVar[str]
    problem_class: ClassVar[type]  # with build(lm, config), run_segment, report, auto_chunk_size, prompt_len

    def __init__(self, lm, config, *, n_targets: int, devices=None):
        config.validate(lm)
        self.lm, self.config = lm, config
        self.mesh = parallel.local_mesh(devices)
        if config.shard_params:
            self.params = parallel.sharded_params(lm.params, self.mesh)
        else:
            self.params = jax.device_put(lm.params, parallel.replicated(self.mesh))
        self.problem, self._run_segment, self._report = compiled_problem(lm, config, self.problem_class)
        size = config.chunk_size or self.problem.auto_chunk_size(self.params, self.mesh, n_targets)
        self.chunk_size = parallel.round_up(size, self.mesh.size)
        self._chunk_targets: tuple[int, jax.Array, jax.Array] | None = None

    def _sharded(self, tree):
        return jax.device_put(tree, parallel.target_sharding(self.mesh))

    def _set_targets(self, probs: np.ndarray, first_index: int):
        p = self._sharded(parallel.pad_rows(probs, self.chunk_size))
        self._chunk_targets = (first_index, p, safe_log(p))

    def _targets(self, first_index: int) -> tuple[jax.Array, jax.Array]:
        """(p, log p) of the chunk starting at `first_index`, padded and sharded."""
        if self._chunk_targets is None or self._chunk_targets[0] != first_index:
            raise ValueError("the engine got a chunk other than the one last started or resumed")
        _, p, log_p = self._chunk_targets
        return p, log_p

    def resume(self, probs: np.ndarray, run):
        """Continue a checkpointed run on the same targets."""
        self._set_targets(probs, run.first_index)
        arrays = {name: getattr(run, name) for name in run.ARRAY_FIELDS if getattr(run, name) is not None}
        return dataclasses.replace(run, **{name: self._sharded(tree) for name, tree in arrays.items()})

    def _segment(self, run):
        """`run.state` advanced by one compiled segment."""
        p, log_p = self._targets(run.first_index)
        return self._run_segment(self.params, p, log_p, run.state, num_steps=self.config.segment_steps)

    def results(self, run) -> tuple[dict, dict]:
        """(columns, arrays) of a finished chunk's real targets."""
        if not run.finished:
            raise ValueError("results() of a chunk that has not finished")
        p, _ = self._targets(run.first_index)
        columns, arrays = self._chunk_results(run, p)
        keep = run.n_rows  # drop the padding rows
        return (
            {k: np.asarray(v)[:keep] for k, v in columns.items()},
            {k: np.asarray(v)[:keep] for k, v in arrays.items()},
        )

    def assemble(self, chunks: list[tuple[dict, dict]], metadata) -> PromptResults:
        """One result from the finished chunks of a target set, in order."""
        columns, arrays = concat_chunks(chunks)
        columns["prompt_len"] = np.full(len(metadata), self.problem.prompt_len)
        if self.lm.tokenizer is not None:
            columns |= self._text_columns(self.lm.tokenizer, arrays)
        return PromptResults(method=self.method, columns=columns, arrays=arrays, metadata=metadata)

    def _text_columns(self, tokenizer, arrays: dict) -> dict:
        return {}
