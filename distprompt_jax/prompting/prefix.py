"""Prefix tuning (Li & Liang 2021): free keys and values at every layer for P positions before the input.

A prefix is a KVCache of P positions (`models.kv_cache`): per layer, P keys and values for each of the
model's key/value heads (grouped-query models have fewer of them than query heads). The real tokens after
it (the fixed suffix; by default the model's BOS token) attend to it at every layer, and the next-token
distribution is read after the last of them — a prefix alone has no position that predicts anything.

Keys are stored *after* the rotary embedding, at their absolute positions (0..P-1 when no fixed tokens
precede them), exactly as a model's own cache and transformers' `past_key_values` hold them, for three
reasons: (1) a rotation is invertible, so free post-rotation keys reach exactly the keys free pre-rotation
keys would — nothing is lost; (2) the KV of a real text (`lm.prefix_cache`) is a prefix as it stands, so a
text initialization and a found prefix are one kind of object; (3) a found prefix is PEFT's PREFIX_TUNING
`past_key_values` after a reshape (`peft_export`), with no RoPE convention to translate per family.

Two parameterizations: the keys and values themselves (direct), or Li & Liang's reparameterization, a
two-layer MLP with `reparam_hidden` tanh units that maps P learned embeddings (of PEFT's width for a
prefix, n_kv_heads × head_dim) to every layer's keys and values. Ours adds the MLP's output to the initial
prefix (held fixed) and starts its output layer at zero, so both parameterizations start from the same
prefix; the output layer is divided by the hidden size, so that one Adam step changes a key or value by
about the learning rate, as a direct step does (Li & Liang's plain MLP needs rates about 1/hidden as large).
Only the optimizer's path differs.

The search is the soft engine's (prompting.gradient): Adam with warmup and a decaying schedule, per-target
early stopping, restarts above the certified floor, one pool of slots on the solver driver.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distprompt_jax.bounds import BoundConfig
from distprompt_jax.field_types import check_field_types
from distprompt_jax.lm import LanguageModel
from distprompt_jax.models.kv_cache import KVCache
from distprompt_jax.prompting import context as context_lib
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

INITS = ("vocab", "text", "normal")
# init="normal" draws each layer's keys and values at the scale of the keys and values of this many random
# vocabulary tokens (a property of the model, computed once).
SCALE_SAMPLE_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class PrefixPromptConfig:
    """Defaults: P = 10 and the soft engine's recipe (Adam 0.02, 10% warmup, cosine decay, ≤ 500 steps,
    patience 50, up to 3 attempts for targets still > 1 nat above their floor), from the KV of random tokens."""

    prompt_len: int = 10  # P, the prefix positions
    # "vocab": the keys and values of prompt_len random vocabulary tokens | "text": of init_text's tokens
    # (exactly prompt_len of them) | "normal": N(0, σ²) with σ per layer, keys and values apart, the spread
    # of the model's own keys and values (of SCALE_SAMPLE_TOKENS random tokens)
    init: str = "vocab"
    init_text: str | None = None
    reparam_hidden: int | None = None  # None: the keys and values are the parameters; k: an MLP of k tanh units
    prefix: str | tuple[int, ...] = ""  # fixed tokens before the learned positions: text, or token ids
    # The real tokens after the learned positions; the distribution is read after the last. None: the
    # model's BOS token (as a tokenizer starts the input PEFT feeds after a prefix), or with template="chat"
    # nothing beyond the template's own tokens.
    suffix: str | tuple[int, ...] | None = None
    bos: bool = False  # put the model's BOS token first, before the learned positions
    template: str = "none"  # "chat": the prefix is the start of the user turn of the chat template
    learning_rate: float = 0.02
    schedule: str = "cosine"  # "cosine" / "linear" decay to 0 over max_steps, or "constant"
    warmup: float = 0.1  # the learning rate rises linearly from 0 over this fraction of max_steps
    clip_norm: float | None = None  # clip each target's gradient to this L2 norm
    max_steps: int = 500
    patience: int = 50  # stop a target after this many steps without improving by more than min_delta
    min_delta: float = 0.0
    restarts: int = 3  # attempts per target at most, each from its own init (one with init="text")
    restart_above: float | None = 1.0  # a further attempt only for a target this far above its floor
    floor_tolerance: float = 1e-3  # a target stops once its KL is within this of its floor
    seed: int = 0
    slots: int | str | None = None  # targets optimized at once; None: 64 on a CPU, 1024 on an accelerator
    segment_steps: int = 10
    refill_at: int | None = None
    top_k: int = 10
    shard_params: bool = False

    def __post_init__(self):
        check_field_types(self)

    def validate(self, lm: LanguageModel) -> None:
        def fail(message):
            raise ValueError(f"PrefixPromptConfig: {message}")

        check_shared_fields(
            self, lm, INITS, at_least_one=("max_steps", "patience", "restarts", "segment_steps", "top_k"),
        )
        check_recipe_fields(self)
        hidden = self.reparam_hidden
        if hidden is not None and hidden < 1:
            fail(f"reparam_hidden must be a positive integer or None, got {hidden!r}")
        if self.suffix is None and self.template == "none" and lm.config.bos_token_id is None:
            fail(f"suffix=None reads the prefix with the BOS token, but {lm.name} has none: give suffix, the "
                 "tokens after the prefix")
        try:
            context = context_of(lm, self)
        except ValueError as err:
            fail(str(err))
        if not context.suffix_ids:
            fail("suffix is empty: a prefix's distribution is read at a real token after it; give suffix "
                 "(None: the BOS token)")


def context_of(lm: LanguageModel, config: PrefixPromptConfig) -> context_lib.FixedContext:
    """The fixed tokens before the learned positions and after them (see `PrefixPromptConfig.suffix`)."""
    suffix = config.suffix
    if suffix is None:
        suffix = (lm.config.bos_token_id,) if config.template == "none" else ""
    return context_lib.FixedContext.build(lm, config.prefix, suffix, config.bos, config.template)


def prefix_prompt(
    lm: LanguageModel, targets, config: PrefixPromptConfig | None = None, *, devices=None,
    with_bound: bool | BoundConfig = True, progress: bool = True,
) -> PromptResults:
    """Optimize a prefix (keys and values at every layer for P positions) for each target.

    Args:
      lm: a LanguageModel.
      targets: a TargetSet or an [N, V] array of probabilities over lm's vocabulary.
      config: PrefixPromptConfig (defaults as documented there).
      devices, with_bound, progress: as for `soft_prompt` (the certified bound runs first by default and is
        every target's floor).
    Returns:
      PromptResults with method "prefix"; `.arrays["keys"]`, `.arrays["values"]` hold each target's best
      prefix, float32 [N, n_layers, P, n_kv_heads, head_dim], keys after the rotary embedding (module
      docstring); `.arrays["kl_path"]` [N, ⌈max_steps / segment_steps⌉] the best KL after every
      `segment_steps` steps. `.save_peft(directory, target_ids)` writes PEFT PREFIX_TUNING adapters of them.
    """
    method = PrefixMethod(lm, config or PrefixPromptConfig())
    return run_gradient_method(method, lm, targets, with_bound, devices=devices, progress=progress)


class Reparam(NamedTuple):
    """Li & Liang's reparameterization of one prefix: keys and values = anchor + MLP(embedding)."""

    anchor: KVCache  # the initial prefix, float32; held fixed (no gradient reaches it)
    embedding: jax.Array  # [P, n_kv_heads * head_dim]
    w_in: jax.Array  # [n_kv_heads * head_dim, hidden]
    b_in: jax.Array  # [hidden]
    w_out: jax.Array  # [hidden, n_layers * 2 * n_kv_heads * head_dim], starts at 0
    b_out: jax.Array  # [n_layers * 2 * n_kv_heads * head_dim], starts at 0

    @classmethod
    def start(cls, anchor: KVCache, hidden: int, key) -> Reparam:
        n_layers, p, n_kv, head_dim = anchor.keys.shape
        width = n_kv * head_dim  # PEFT's token_dim for a prefix
        embed_key, in_key = jax.random.split(key)
        return cls(
            anchor=anchor, embedding=jax.random.normal(embed_key, (p, width), jnp.float32),
            # N(0, 1/width): the tanh units start in their responsive range
            w_in=jax.random.normal(in_key, (width, hidden), jnp.float32) / np.sqrt(width),
            b_in=jnp.zeros(hidden, jnp.float32),
            w_out=jnp.zeros((hidden, 2 * n_layers * width), jnp.float32),
            b_out=jnp.zeros(2 * n_layers * width, jnp.float32),
        )

    def kv(self) -> KVCache:
        anchor = jax.lax.stop_gradient(self.anchor)
        n_layers, p, n_kv, head_dim = anchor.keys.shape
        units = jnp.tanh(self.embedding @ self.w_in + self.b_in)
        flat = units @ self.w_out / self.w_out.shape[0] + self.b_out  # [P, n_layers * 2 * n_kv * head_dim]
        # PEFT's row layout: layer l's keys at 2l, its values at 2l + 1.
        delta = flat.reshape(p, n_layers, 2, n_kv, head_dim).transpose(2, 1, 0, 3, 4)
        return KVCache(anchor.keys + delta[0], anchor.values + delta[1])


@dataclasses.dataclass(frozen=True)
class PrefixProblem:
    """One target's prefix optimization. Its fields are what enters tracing."""

    lm: Any  # the model's structure, without weights (engine.model_structure)
    prompt_len: int
    init_kind: str
    reparam_hidden: int | None
    recipe: Recipe
    top_k: int
    context: context_lib.FixedContext
    init_ids: tuple[int, ...] | None
    # Functions of the model and the fields above, so not compared.
    kv_scale: np.ndarray | None = dataclasses.field(compare=False, repr=False)  # [2, n_layers], init="normal"
    candidate_ids: np.ndarray = dataclasses.field(compare=False, repr=False)

    @classmethod
    def build(cls, lm: LanguageModel, config: PrefixPromptConfig, kv_scale: np.ndarray | None = None) -> PrefixProblem:
        """The problem of `config` on `lm`. `kv_scale` [2, n_layers] (init="normal"): the spread of the model's
        keys and values, measured from its weights when None; a plan without weights passes a stand-in."""
        context = context_of(lm, config)
        init_ids = None
        if config.init == "text":
            init_ids = tuple(int(i) for i in lm.encode(config.init_text, add_special_tokens=False))
            if len(init_ids) != config.prompt_len:
                raise ValueError(
                    f"init_text is {len(init_ids)} tokens, but prompt_len is {config.prompt_len}: make them equal"
                )
        candidate_ids = np.flatnonzero(ordinary_token_mask(lm))
        problem = cls(
            lm=model_structure(lm), prompt_len=config.prompt_len, init_kind=config.init,
            reparam_hidden=config.reparam_hidden, recipe=Recipe.from_config(config), top_k=config.top_k,
            context=context, init_ids=init_ids, kv_scale=None, candidate_ids=candidate_ids,
        )
        if config.init == "normal":
            problem = dataclasses.replace(
                problem, kv_scale=problem.model_kv_scale(lm.params) if kv_scale is None else kv_scale)
        return problem

    def cache_shape(self) -> tuple[int, ...]:
        cfg = self.lm.config
        return (cfg.n_layers, self.prompt_len, cfg.n_kv_heads, cfg.head_dim)

    def text_kv(self, params, ids) -> KVCache:
        """The float32 keys and values of token ids [P] placed where the learned positions are."""
        x = self.lm.embed(params, jnp.asarray(ids))
        fixed = self.context.prefix_cache(params, self.lm)
        if fixed is None:
            kv = self.lm.prefix_cache(params, x)
        else:
            kv = self.lm.extend_cache(params, fixed, x)
            kv = KVCache(kv.keys[..., fixed.length:, :, :], kv.values[..., fixed.length:, :, :])
        return jax.tree.map(lambda a: a.astype(jnp.float32), kv)

    def model_kv_scale(self, params) -> np.ndarray:
        """[2, n_layers]: the standard deviation of the keys and of the values, per layer, of random tokens."""
        rng = np.random.default_rng(0)
        ids = rng.choice(self.candidate_ids, size=SCALE_SAMPLE_TOKENS)
        kv = self.text_kv(params, ids)
        return np.stack([np.std(np.asarray(a), axis=(1, 2, 3)) for a in kv]).astype(np.float32)

    def prefix_kv(self, v) -> KVCache:
        """The float32 learned keys and values of the variable v."""
        return v if self.reparam_hidden is None else v.kv()

    def logits(self, params, v):
        lm = self.lm
        learned = jax.tree.map(lambda a: a.astype(lm.dtype), self.prefix_kv(v))
        fixed = self.context.prefix_cache(params, self.lm)
        cache = learned if fixed is None else fixed.concatenate(learned)
        return lm.logits(params, lm.embed(params, jnp.asarray(self.context.suffix_ids)), cache)

    # -- the Problem contract (one target) -----------------------------------------------------------------

    def prepare(self, inputs):
        return prepare_target(inputs)

    def init(self, params, target, index, attempt, key) -> GradientState:
        kv_key, reparam_key = jax.random.split(key)
        if self.init_kind == "text":
            kv = self.text_kv(params, self.init_ids)
        elif self.init_kind == "vocab":
            kv = self.text_kv(params, jax.random.choice(kv_key, jnp.asarray(self.candidate_ids), (self.prompt_len,)))
        else:
            noise = jax.random.normal(kv_key, (2, *self.cache_shape()), jnp.float32)
            scale = jnp.asarray(self.kv_scale)[:, :, None, None, None]
            kv = KVCache(*(scale * noise))
        v = kv if self.reparam_hidden is None else Reparam.start(kv, self.reparam_hidden, reparam_key)
        return self.recipe.start(v)

    def step(self, params, target, s: GradientState) -> GradientState:
        p, log_p, floor = target
        return self.recipe.step(s, lambda v: kl_from_logits(p, self.logits(params, v), log_p), floor)

    def report(self, params, target, s: GradientState) -> dict:
        p, _, _ = target
        figures = distribution_report(p, self.logits(params, s.best_v), self.top_k)
        del figures["kl"]  # the tracked best KL is the same value, measured when it was reached
        kv = self.prefix_kv(s.best_v)
        return dict(**self.recipe.history(s), **figures, keys=kv.keys, values=kv.values)


ARRAY_RESULTS = ("keys", "values")


class PrefixMethod(GradientMethod):
    """Prefixes as a method (engine.Method): what `prefix_prompt` and the sweep run."""

    name = "prefix"
    desc = "prefixes"

    def __init__(self, lm: LanguageModel, config: PrefixPromptConfig):
        config.validate(lm)
        self.lm, self.config = lm, config
        self._problem = PrefixProblem.build(lm, config)

    def columns(self, reports: dict[str, np.ndarray]) -> tuple[dict, dict]:
        columns, arrays = self.split_reports(reports, ARRAY_RESULTS, self.config.prompt_len)
        columns["reparam_hidden"] = np.full(len(columns["kl"]), self.config.reparam_hidden or 0)
        return columns, arrays
