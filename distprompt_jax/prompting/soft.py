"""Soft prompts: free vectors in the input-embedding space, optimized for many targets at once.

Every target has its own optimizer state and its own early stopping: `SoftProblem` is one target's
optimization, and the solver driver (distprompt_jax.solve) runs a pool of them, refilling the slots of
targets that finished. Restarts are further attempts of the same target; the best is kept.

Instead of input embeddings, a single vector can act on the residual stream of the last position entering
layer k (added or replacing), or on the output of the final norm — to locate where expressivity is lost.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distprompt_jax.bounds import BoundConfig
from distprompt_jax.field_types import check_field_types
from distprompt_jax.lm import LanguageModel
from distprompt_jax.prompting import context as context_lib
from distprompt_jax.prompting.context_bank import ContextBank
from distprompt_jax.prompting.engine import check_shared_fields, model_structure
from distprompt_jax.prompting.gradient import (
    GradientMethod,
    GradientState,
    Recipe,
    check_recipe_fields,
    prepare_target,
    run_gradient_method,
)
from distprompt_jax.prompting.objective import distribution_report, kl_from_logits
from distprompt_jax.results import PromptResults
from distprompt_jax.tokens import ordinary_token_mask

INITS = ("embedding_std", "normal", "vocab", "text", "bank")
INTERVENTION_MODES = ("add", "replace")


@dataclasses.dataclass(frozen=True)
class SoftPromptConfig:
    """Defaults are ours where the paper is silent (see paper-notes): L=10, σ-scaled init, Adam 0.1475σ with a
    10% warmup and cosine decay, ≤500 steps, patience 50, up to 3 attempts for targets still more than 1 nat
    above their floor (the certified bound), best KL reported. Measured against the first default (Adam 0.1,
    constant) and the public reproduction's recipe in BENCHMARKS.md ("Search quality")."""

    prompt_len: int = 10
    init: str = "embedding_std"  # N(0, σ²), σ = std of the embedding matrix | "normal" N(0,1) | "vocab" | "text"
    #                               | "bank": the first attempt starts at the embeddings of the context bank's
    #                               nearest context (prompting.context_bank), further attempts as embedding_std
    init_text: str | None = None  # with init="text": its tokens (exactly prompt_len of them) start the prompt
    bank_size: int = 512  # with init="bank": contexts of prompt_len tokens the model samples (seeded by `seed`)
    prefix: str | tuple[int, ...] = ""  # fixed tokens before the prompt: text, or token ids
    suffix: str | tuple[int, ...] = ""  # fixed tokens after the prompt
    bos: bool = False  # put the model's BOS token first
    template: str = "none"  # "chat": the prompt is the user turn of the model's chat template (see context.py)
    # Adam's step, in the units of the vectors it moves. None: LEARNING_RATE_PER_STD × σ (σ the std of the
    # model's embedding matrix, as the init): 0.02 on SmolLM2, where the recipe was tuned, 0.152 on Gemma-3-270M
    # (σ = 1.03), where an absolute 0.02 doubled the median gap to the bound (BENCHMARKS.md).
    learning_rate: float | None = None
    schedule: str = "cosine"  # "cosine" / "linear" decay to 0 over max_steps, or "constant"
    warmup: float = 0.1  # the learning rate rises linearly from 0 over this fraction of max_steps
    clip_norm: float | None = None  # clip each target's gradient to this L2 norm
    max_steps: int = 500
    patience: int = 50  # stop a target after this many steps without improving by more than min_delta
    min_delta: float = 0.0
    restarts: int = 3  # attempts per target at most, each from its own init; the best is kept (one with
    #                    init="text": every attempt would start from the same prompt and repeat the run)
    # A further attempt runs only for a target still more than this above its floor (None: every attempt
    # runs). Without a bound the floor is 0: every target above this KL is restarted.
    restart_above: float | None = 1.0
    # A target stops once its KL is within this of its floor: the certified bound when the run has one
    # (experiments, `with_bound=True`), else 0.
    floor_tolerance: float = 1e-3
    seed: int = 0
    slots: int | str | None = None  # targets optimized at once; None: 64 on a CPU, 1024 on an accelerator;
    #                                 "auto": sized from XLA's memory analysis to half the free memory
    segment_steps: int = 10  # steps per compiled call: finished targets' slots are refilled between calls
    refill_at: int | None = None  # end a segment early once this many slots are free (None: slots // 16, ≥ 1)
    intervention_layer: int | str | None = None  # None: input embeddings; k: residual entering layer k; "final_norm"
    intervention_mode: str = "add"
    top_k: int = 10  # for the top-k overlap figure
    shard_params: bool = False  # split the weights over the devices (models too large for one device)

    def __post_init__(self):
        check_field_types(self)

    def validate(self, lm: LanguageModel) -> None:
        def fail(message):
            raise ValueError(f"SoftPromptConfig: {message}")

        check_shared_fields(
            self, lm, INITS, at_least_one=("max_steps", "patience", "restarts", "segment_steps", "top_k", "bank_size"),
        )
        check_recipe_fields(self)
        if self.intervention_mode not in INTERVENTION_MODES:
            fail(f"intervention_mode must be one of {INTERVENTION_MODES}, got {self.intervention_mode!r}")
        layer = self.intervention_layer
        if layer is not None and layer != "final_norm" and not (
            isinstance(layer, int) and 0 <= layer <= lm.n_layers
        ):
            fail(f"intervention_layer must be None, 'final_norm' or an int in [0, {lm.n_layers}], got {layer!r}")
        if self.init == "bank" and layer is not None:
            fail("init='bank' starts input prompts from a context's tokens; an intervention has no tokens to start "
                 "from (use another init)")


def soft_prompt(
    lm: LanguageModel, targets, config: SoftPromptConfig | None = None, *, devices=None,
    with_bound: bool | BoundConfig = True, progress: bool = True,
) -> PromptResults:
    """Optimize a soft prompt (or intervention vector) for each target.

    Args:
      lm: a LanguageModel.
      targets: a TargetSet or an [N, V] array of probabilities over lm's vocabulary.
      config: SoftPromptConfig (defaults as documented there).
      devices: devices to shard the slots over (default: this process's devices). In a multi-host run
        each process optimizes its own contiguous share of the targets (`parallel.process_slice`) and
        returns results for those only.
      with_bound: True (the default of every prompt method, or a BoundConfig) runs the certified
        `unembedding_bound` first: each target stops once within `config.floor_tolerance` of it, restarts go
        only to targets more than `config.restart_above` above it, and the results gain `kl_bound` and
        `gap_to_bound`, without which a found KL cannot be told from the search's shortfall. False: no bound
        (the floor is 0), for the search alone.
      progress: show progress bars (tqdm). Status lines (a model being fetched or converted) go through absl
        logging at INFO (`absl.logging.set_verbosity(absl.logging.INFO)` shows them).
    Returns:
      PromptResults with method "soft"; `.arrays["prompt"]` holds the best variables,
      `.arrays["nearest_tokens"]` each soft vector's nearest vocabulary token (input prompts only) and
      `.arrays["kl_path"]` [N, ⌈max_steps / segment_steps⌉] the best KL after every `segment_steps` steps.
      `.save_peft(directory, target_ids)` writes PEFT PROMPT_TUNING adapters of input prompts; `.save(dir)`
      the results in an experiment's files.
    """
    return run_gradient_method(SoftMethod(lm, config or SoftPromptConfig()), lm, targets, with_bound, devices=devices,
                               progress=progress)


@dataclasses.dataclass(frozen=True)
class SoftProblem:
    """One target's soft-prompt optimization. Its fields are what enters tracing (the run-level fields of
    the config — seed, slots, segment_steps, restarts, shard_params — do not: the driver takes them)."""

    lm: Any  # the model's structure, without weights (engine.model_structure)
    prompt_len: int
    init_kind: str  # config.init
    intervention_layer: int | str | None
    intervention_mode: str
    recipe: Recipe
    top_k: int
    context: context_lib.FixedContext
    init_ids: tuple[int, ...] | None
    # Functions of the model and the fields above, so not compared.
    embed_std: float = dataclasses.field(compare=False)
    candidate_ids: np.ndarray = dataclasses.field(compare=False, repr=False)

    @classmethod
    def build(cls, lm: LanguageModel, config: SoftPromptConfig, embed_std: float | None = None) -> SoftProblem:
        """The problem of `config` on `lm`. `embed_std`: the std of lm's embedding matrix, measured from its
        weights when None; a plan without weights passes a stand-in (a constant of the program, not a shape)."""
        context = context_lib.FixedContext.build(lm, config.prefix, config.suffix, config.bos, config.template)
        if config.intervention_layer is not None and context.is_empty:
            raise ValueError("an intervention needs fixed input tokens: set prefix (and/or bos=True)")
        init_ids = None
        if config.init == "text":
            init_ids = tuple(int(i) for i in lm.encode(config.init_text, add_special_tokens=False))
            if len(init_ids) != config.prompt_len:
                raise ValueError(
                    f"init_text is {len(init_ids)} tokens, but prompt_len is {config.prompt_len}: make them equal"
                )
        if embed_std is None:
            embed_std = _embedding_std(lm)  # a pass over the whole embedding matrix: once
        return cls(
            lm=model_structure(lm), prompt_len=config.prompt_len, init_kind=config.init,
            intervention_layer=config.intervention_layer, intervention_mode=config.intervention_mode,
            recipe=Recipe.from_config(
                config, default_learning_rate(embed_std) if config.learning_rate is None else None),
            top_k=config.top_k, context=context, init_ids=init_ids, embed_std=embed_std,
            candidate_ids=np.flatnonzero(ordinary_token_mask(lm)),
        )

    @property
    def intervening(self) -> bool:
        return self.intervention_layer is not None

    def variable_shape(self) -> tuple[int, ...]:
        d = self.lm.d_model
        return (d,) if self.intervening else (self.prompt_len, d)

    def logits(self, params, v):
        lm = self.lm
        if not self.intervening:  # the fixed prefix computed once for all targets, each prompt after it
            return self.context.logits_after(params, lm, self.context.prefix_cache(params, lm), v)
        x = self.context.around(params, lm, None)
        if self.intervention_layer == "final_norm":
            h = lm.final_norm(params, lm.run_layers(params, lm.input_stream(params, x))[-1])
            return lm.unembed(params, v if self.intervention_mode == "replace" else h + v)
        k = self.intervention_layer
        h = lm.run_layers(params, lm.input_stream(params, x), 0, k)
        last = v.astype(h.dtype) if self.intervention_mode == "replace" else h[-1] + v.astype(h.dtype)
        return lm.logits_from_layer(params, h.at[-1].set(last), k)

    def optimizer(self) -> optax.GradientTransformation:
        return self.recipe.optimizer()

    # -- the Problem contract (one target) -----------------------------------------------------------------

    def prepare(self, inputs):
        # (p, log p, floor, the bank's start tokens [L] with init="bank", else None)
        return (*prepare_target(inputs), inputs.get("init_ids"))

    def init(self, params, target, index, attempt, key) -> GradientState:
        scale = self.embed_std if self.init_kind in ("embedding_std", "bank") else 1.0
        v = scale * jax.random.normal(key, self.variable_shape(), jnp.float32)
        if self.init_kind == "text":
            v = self.lm.embed(params, jnp.asarray(self.init_ids)).astype(jnp.float32)
        elif self.init_kind == "bank":  # the nearest context first; a further attempt explores from noise
            v = jnp.where(attempt == 0, self.lm.embed(params, target[3]).astype(jnp.float32), v)
        elif self.init_kind == "vocab":
            ids = jax.random.choice(key, jnp.asarray(self.candidate_ids), self.variable_shape()[:-1])
            v = self.lm.embed(params, ids).astype(jnp.float32)
        return self.recipe.start(v)

    def step(self, params, target, s: GradientState) -> GradientState:
        p, log_p, floor, _ = target
        return self.recipe.step(s, lambda v: kl_from_logits(p, self.logits(params, v), log_p), floor)

    def report(self, params, target, s: GradientState) -> dict:
        p = target[0]
        figures = distribution_report(p, self.logits(params, s.best_v), self.top_k)
        del figures["kl"]  # the tracked best KL is the same value, measured when it was reached
        out = dict(**self.recipe.history(s), **figures, prompt=s.best_v)
        if not self.intervening:
            out["nearest_tokens"] = nearest_tokens(self.lm, params, s.best_v)
        return out


def _embedding_std(lm: LanguageModel) -> float:
    return float(jnp.std(lm.embedding_matrix(lm.params)))


# SmolLM2-135M's embedding std, 0.1355782: the default recipe's Adam 0.02 was tuned there, and a step means as
# much on another model when it is the same fraction of that model's σ (float32 keeps SmolLM2's at 0.02 exactly).
LEARNING_RATE_PER_STD = 0.02 / 0.1355782


def default_learning_rate(embed_std: float) -> float:
    """The soft prompts' default Adam step for a model whose embedding matrix has std `embed_std`."""
    return LEARNING_RATE_PER_STD * embed_std


def nearest_tokens(lm: LanguageModel, params, vectors):
    """The vocabulary token whose input embedding is nearest (L2) to each vector: [..., d] -> [...] int32."""
    table = lm.embedding_matrix(params).astype(jnp.float32)
    flat = vectors.reshape(-1, vectors.shape[-1]).astype(jnp.float32)
    distances = jnp.sum(table**2, axis=-1)[None, :] - 2 * flat @ table.T
    return jnp.argmin(distances, axis=-1).astype(jnp.int32).reshape(vectors.shape[:-1])


ARRAY_RESULTS = ("prompt", "nearest_tokens")


class SoftMethod(GradientMethod):
    """Soft prompts as a method (engine.Method): what `soft_prompt` and the sweep run."""

    name = "soft"
    desc = "soft prompts"

    def __init__(self, lm: LanguageModel, config: SoftPromptConfig):
        config.validate(lm)
        self.lm, self.config = lm, config
        self._problem = SoftProblem.build(lm, config)
        self._bank = None

    def inputs(self, probs: np.ndarray, rows: slice) -> dict[str, np.ndarray]:
        inputs = super().inputs(probs, rows)
        if self.config.init == "bank":
            if self._bank is None:  # built once per method, on first use, inside the prompt's fixed tokens
                self._bank = ContextBank.sample(self.lm, self.config.bank_size, self.config.prompt_len,
                                                seed=self.config.seed, context=self._problem.context)
            nearest, _ = self._bank.nearest(probs)
            inputs["init_ids"] = self._bank.ids[nearest]
        return inputs

    def columns(self, reports: dict[str, np.ndarray]) -> tuple[dict, dict]:
        columns, arrays = self.split_reports(reports, ARRAY_RESULTS,
                                             0 if self._problem.intervening else self.config.prompt_len)
        if "nearest_tokens" in arrays and self.lm.tokenizer is not None:
            columns["nearest_text"] = np.array(self.lm.tokenizer.batch_decode(arrays["nearest_tokens"].tolist()))
        return columns, arrays
