"""Soft prompts: free vectors in the input-embedding space, optimized for many targets at once.

Every target has its own optimizer state and its own early stopping; one compiled `while_loop` advances a
whole chunk of targets for a segment of steps, freezing those that have finished. Segments (rather than
one call for all steps) let the Python loop show progress and stop as soon as every target has finished.

Instead of input embeddings, a single vector can act on the residual stream of the last position entering
layer k (added or replacing), or on the output of the final norm — to locate where expressivity is lost.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from distprompt_jax import parallel
from distprompt_jax.prompting import context as context_lib
from distprompt_jax.prompting.engine import ChunkEngine, ChunkRun, check_shared_fields, without_params
from distprompt_jax.prompting.objective import distribution_report, kl_from_logits
from distprompt_jax.results import PromptResults
from distprompt_jax.targets import as_target_set
from distprompt_jax.tokens import ordinary_token_mask

INITS = ("embedding_std", "normal", "vocab", "text")
SCHEDULES = ("constant", "cosine", "linear")
INTERVENTION_MODES = ("add", "replace")


@dataclasses.dataclass(frozen=True)
class SoftPromptConfig:
    """Defaults are ours where the paper is silent (see paper-notes): L=10, σ-scaled init, Adam 0.1, ≤500
    steps, patience 50, best KL reported."""

    prompt_len: int = 10
    init: str = "embedding_std"  # N(0, σ²), σ = std of the embedding matrix | "normal" N(0,1) | "vocab" | "text"
    init_text: str | None = None  # with init="text": its tokens (exactly prompt_len of them) start the prompt
    prefix: str | tuple[int, ...] = ""  # fixed tokens before the prompt: text, or token ids
    suffix: str | tuple[int, ...] = ""  # fixed tokens after the prompt
    bos: bool = False  # put the model's BOS token first
    learning_rate: float = 0.1
    schedule: str = "constant"  # "cosine" / "linear" decay to 0 over max_steps
    clip_norm: float | None = None  # clip each target's gradient to this L2 norm
    max_steps: int = 500
    patience: int = 50  # stop a target after this many steps without improving by more than min_delta
    min_delta: float = 0.0
    restarts: int = 1  # independent inits per target; the best is kept
    seed: int = 0
    chunk_size: int | None = None  # targets per compiled chunk; None sizes it to the available memory
    segment_steps: int = 25  # steps per compiled call (progress granularity)
    intervention_layer: int | str | None = None  # None: input embeddings; k: residual entering layer k; "final_norm"
    intervention_mode: str = "add"
    top_k: int = 10  # for the top-k overlap figure
    shard_params: bool = False  # split the weights over the devices (models too large for one device)

    def validate(self, lm) -> None:
        def fail(message):
            raise ValueError(f"SoftPromptConfig: {message}")

        check_shared_fields(
            self, lm, INITS, at_least_one=("max_steps", "patience", "restarts", "segment_steps", "top_k"),
            positive_or_none=("chunk_size",),
        )
        if self.init == "text" and self.restarts > 1:
            fail("restarts > 1 with init='text' would repeat the same run")
        if self.schedule not in SCHEDULES:
            fail(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.learning_rate > 0:
            fail(f"learning_rate must be positive, got {self.learning_rate}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            fail(f"clip_norm must be positive or None, got {self.clip_norm}")
        if self.intervention_mode not in INTERVENTION_MODES:
            fail(f"intervention_mode must be one of {INTERVENTION_MODES}, got {self.intervention_mode!r}")
        layer = self.intervention_layer
        if layer is not None and layer != "final_norm" and not (
            isinstance(layer, int) and 0 <= layer <= lm.n_layers
        ):
            fail(f"intervention_layer must be None, 'final_norm' or an int in [0, {lm.n_layers}], got {layer!r}")


class _State(NamedTuple):
    """Per-target optimization state; every leaf has the target axis first."""

    v: jax.Array  # the variable being optimized: [L, d] prompt or [d] intervention vector
    opt_state: Any
    best_kl: jax.Array
    best_v: jax.Array
    best_step: jax.Array
    initial_kl: jax.Array  # KL of the initial prompt
    final_kl: jax.Array  # KL at the last step the target was still running
    steps: jax.Array  # steps run
    since_improve: jax.Array
    active: jax.Array


def soft_prompt(lm, targets, config: SoftPromptConfig | None = None, *, devices=None) -> PromptResults:
    """Optimize a soft prompt (or intervention vector) for each target.

    Args:
      lm: a LanguageModel.
      targets: a TargetSet or an [N, V] array of probabilities over lm's vocabulary.
      config: SoftPromptConfig (defaults as documented there).
      devices: devices to shard the target axis over (default: this process's devices). In a multi-host
        run each process optimizes its own contiguous share of the targets (`parallel.process_slice`)
        and returns results for those only.
    Returns:
      PromptResults with method "soft"; `.arrays["prompt"]` holds the best variables and
      `.arrays["nearest_tokens"]` each soft vector's nearest vocabulary token (input prompts only).
    """
    config = config or SoftPromptConfig()
    target_set = as_target_set(targets, lm.vocab_size)
    share = parallel.process_slice(len(target_set))
    probs = target_set.probs[share]
    engine = SoftEngine(lm, config, n_targets=len(probs), devices=devices)
    bounds = parallel.chunk_bounds(len(probs), engine.chunk_size)
    progress = tqdm(total=len(probs), desc="soft prompts", unit="target", disable=len(bounds) < 2)
    chunks = []
    for start, stop in bounds:
        # Initializations are keyed by the global target index, so the split over processes does not matter.
        chunk = engine.start(probs[start:stop], first_index=share.start + start)
        while not chunk.finished:
            chunk = engine.advance(chunk)
        chunks.append(engine.results(chunk))
        progress.update(stop - start)
    progress.close()
    return engine.assemble(chunks, target_set.metadata.iloc[share].reset_index(drop=True))


def _keep_better(a: _State, b: _State) -> _State:
    better = b.best_kl < a.best_kl

    def pick(x, y):
        return jnp.where(better.reshape(better.shape + (1,) * (x.ndim - 1)), y, x)

    return jax.tree.map(pick, a, b)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """The pieces of one configured optimization: how the variable enters the model, init, optimizer."""

    lm: Any
    config: SoftPromptConfig
    context: context_lib.FixedContext
    embed_std: float
    candidate_ids: np.ndarray  # tokens that "vocab" init draws from
    init_ids: np.ndarray | None

    @classmethod
    def build(cls, lm, config: SoftPromptConfig) -> _Problem:
        context = context_lib.FixedContext.build(lm, config.prefix, config.suffix, config.bos)
        if config.intervention_layer is not None and context.is_empty:
            raise ValueError("an intervention needs fixed input tokens: set prefix (and/or bos=True)")
        table = lm.embedding_matrix(lm.params)
        init_ids = None
        if config.init == "text":
            init_ids = lm.encode(config.init_text, add_special_tokens=False)
            if len(init_ids) != config.prompt_len:
                raise ValueError(
                    f"init_text is {len(init_ids)} tokens, but prompt_len is {config.prompt_len}: make them equal"
                )
        return cls(
            lm=without_params(lm), config=config, context=context, embed_std=float(jnp.std(table)),
            candidate_ids=np.flatnonzero(ordinary_token_mask(lm)), init_ids=init_ids,
        )

    @property
    def intervening(self) -> bool:
        return self.config.intervention_layer is not None

    @property
    def prompt_len(self) -> int:
        return 0 if self.intervening else self.config.prompt_len

    def variable_shape(self) -> tuple[int, ...]:
        d = self.lm.d_model
        return (d,) if self.intervening else (self.config.prompt_len, d)

    def logits(self, params, v):
        lm, cfg = self.lm, self.config
        if not self.intervening:
            return lm.logits(params, self.context.around(params, lm, v))
        x = self.context.around(params, lm, None)
        if cfg.intervention_layer == "final_norm":
            h = lm.final_norm(params, lm.run_layers(params, lm.input_stream(params, x))[-1])
            return lm.unembed(params, v if cfg.intervention_mode == "replace" else h + v)
        k = cfg.intervention_layer
        h = lm.run_layers(params, lm.input_stream(params, x), 0, k)
        last = v.astype(h.dtype) if cfg.intervention_mode == "replace" else h[-1] + v.astype(h.dtype)
        return lm.logits_from_layer(params, h.at[-1].set(last), k)

    def optimizer(self) -> optax.GradientTransformation:
        cfg = self.config
        schedule = {
            "constant": optax.constant_schedule(cfg.learning_rate),
            "cosine": optax.cosine_decay_schedule(cfg.learning_rate, cfg.max_steps),
            "linear": optax.linear_schedule(cfg.learning_rate, 0.0, cfg.max_steps),
        }[cfg.schedule]
        steps = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
        return optax.chain(*steps, optax.adam(schedule))

    def init_variables(self, params, key, first_index: int, n: int):
        """Initial variables of targets first_index .. first_index + n - 1 (each from its own key)."""
        cfg = self.config
        if cfg.init == "text":
            return jnp.broadcast_to(self.lm.embed(params, self.init_ids).astype(jnp.float32), (n, *self.variable_shape()))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(n))
        if cfg.init == "vocab":
            choose = lambda k: jax.random.choice(k, jnp.asarray(self.candidate_ids), self.variable_shape()[:-1])
            return self.lm.embed(params, jax.vmap(choose)(keys)).astype(jnp.float32)
        scale = self.embed_std if cfg.init == "embedding_std" else 1.0
        return scale * jax.vmap(lambda k: jax.random.normal(k, self.variable_shape(), jnp.float32))(keys)

    def init_state(self, params, key, first_index: int, n: int) -> _State:
        v = self.init_variables(params, key, first_index, n)
        opt_state = jax.vmap(self.optimizer().init)(v)
        inf = jnp.full((n,), jnp.inf, jnp.float32)
        zeros = jnp.zeros((n,), jnp.int32)
        return _State(v, opt_state, inf, v, zeros, inf, inf, zeros, zeros, jnp.ones((n,), bool))

    def run_segment(self, params, p, log_p, state: _State, num_steps: int) -> _State:
        """Up to num_steps optimizer steps for every still-active target."""
        cfg = self.config
        tx = self.optimizer()

        def loss(v, p_i, log_p_i):
            return kl_from_logits(p_i, self.logits(params, v), log_p_i)

        value_and_grad = jax.vmap(jax.value_and_grad(loss))

        def step(carry):
            i, s = carry
            kl, grad = value_and_grad(s.v, p, log_p)
            updates, opt_state = jax.vmap(tx.update)(grad, s.opt_state, s.v)
            v = jax.vmap(optax.apply_updates)(s.v, updates)
            running = s.active

            def where(new, old):
                return _select(running, new, old)

            better = running & (kl < s.best_kl)
            improved = running & (kl < s.best_kl - cfg.min_delta)
            since_improve = jnp.where(improved, 0, s.since_improve + running)
            steps = s.steps + running
            return i + 1, _State(
                v=where(v, s.v),
                opt_state=jax.tree.map(where, opt_state, s.opt_state),
                best_kl=jnp.where(better, kl, s.best_kl),
                best_v=_select(better, s.v, s.best_v),
                best_step=jnp.where(better, s.steps, s.best_step),
                initial_kl=jnp.where(running & (s.steps == 0), kl, s.initial_kl),
                final_kl=jnp.where(running, kl, s.final_kl),
                steps=steps,
                since_improve=since_improve,
                active=running & (since_improve < cfg.patience) & (steps < cfg.max_steps),
            )

        def more(carry):
            i, s = carry
            return (i < num_steps) & jnp.any(s.active)

        _, state = jax.lax.while_loop(more, step, (jnp.int32(0), state))
        return state

    def report(self, params, p, best_v) -> dict:
        logits = jax.vmap(lambda v: self.logits(params, v))(best_v)
        figures = jax.vmap(lambda p_i, z: distribution_report(p_i, z, self.config.top_k))(p, logits)
        del figures["kl"]  # the tracked best KL is the same value, measured when it was reached
        if not self.intervening:
            figures["nearest_tokens"] = nearest_tokens(self.lm, params, best_v)
        return figures

    def auto_chunk_size(self, params, mesh, n_targets: int) -> int:
        def lower(size: int):
            p = jax.ShapeDtypeStruct((size, self.lm.vocab_size), jnp.float32, sharding=parallel.target_sharding(mesh))
            log_p = p
            state = jax.eval_shape(lambda: self.init_state(params, jax.random.key(0), 0, size))
            state = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.target_sharding(mesh)), state
            )
            return jax.jit(self.run_segment, static_argnames="num_steps").lower(params, p, log_p, state, num_steps=1)

        # What one device holds of the parameters (all of them, unless they are sharded).
        fixed = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))
        return parallel.auto_chunk_size(lower, n_targets=n_targets, n_devices=mesh.size, fixed_bytes=fixed)


def _select(mask, new, old):
    return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


def nearest_tokens(lm, params, vectors):
    """The vocabulary token whose input embedding is nearest (L2) to each vector: [..., d] -> [...] int32."""
    table = lm.embedding_matrix(params).astype(jnp.float32)
    flat = vectors.reshape(-1, vectors.shape[-1]).astype(jnp.float32)
    distances = jnp.sum(table**2, axis=-1)[None, :] - 2 * flat @ table.T
    return jnp.argmin(distances, axis=-1).astype(jnp.int32).reshape(vectors.shape[:-1])


@dataclasses.dataclass
class SoftChunkRun(ChunkRun):
    """Where one chunk's optimization stands (see ChunkRun): the current restart's state, and the best
    over the restarts before it."""

    ARRAY_FIELDS = ("state", "best")

    restart: int = 0
    best: _State | None = None


class SoftEngine(ChunkEngine):
    """A configured soft-prompt optimization, advanced chunk by chunk and segment by segment.

    `soft_prompt` drives it from start to finish; a sweep can checkpoint a `SoftChunkRun` between `advance`
    calls and resume it later with the same result.
    """

    method = "soft"
    problem_class = _Problem

    def _init_state(self, first_index: int, restart: int) -> _State:
        # Restart r always starts from the same key, whatever the number of restarts; a target's init
        # depends on its index in the set, not on how the set was chunked.
        key = jax.random.fold_in(jax.random.key(self.config.seed), restart)
        return self._sharded(self.problem.init_state(self.params, key, first_index, self.chunk_size))

    def start(self, probs: np.ndarray, first_index: int) -> SoftChunkRun:
        """Begin a chunk of targets; `first_index` is the first one's index in the whole target set."""
        self._set_targets(probs, first_index)
        return SoftChunkRun(first_index, len(probs), self._init_state(first_index, 0))

    def advance(self, run: SoftChunkRun) -> SoftChunkRun:
        """One compiled segment of steps; moves on to the next restart when every target has finished."""
        state = self._segment(run)
        if bool(jnp.any(state.active)):
            return dataclasses.replace(run, state=state)
        best = state if run.best is None else _keep_better(run.best, state)
        if run.restart + 1 == self.config.restarts:
            return dataclasses.replace(run, state=state, best=best, finished=True)
        restart = run.restart + 1
        return dataclasses.replace(run, state=self._init_state(run.first_index, restart), restart=restart, best=best)

    def _chunk_results(self, run: SoftChunkRun, p) -> tuple[dict, dict]:
        best = run.best
        figures = self._report(self.params, p, best.best_v)
        nearest = figures.pop("nearest_tokens", None)
        columns = dict(
            kl=best.best_kl, initial_kl=best.initial_kl, final_kl=best.final_kl, best_step=best.best_step,
            steps=best.steps, **figures,
        )
        return columns, {"prompt": best.best_v} | ({} if nearest is None else {"nearest_tokens": nearest})

    def _text_columns(self, tokenizer, arrays: dict) -> dict:
        if "nearest_tokens" not in arrays:
            return {}
        return {"nearest_text": np.array([tokenizer.decode(row.tolist()) for row in arrays["nearest_tokens"]])}
