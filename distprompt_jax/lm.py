"""A loaded language model: a parameter pytree plus pure functions that take it as an argument.

Parameters are never closed over: `jax.jit(lm.logits)(lm.params, x)` keeps them as inputs (closing over
weights inside jit makes XLA constant-fold them: ~10x compile time and ~5x memory, measured).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distprompt_jax.models import DecoderLM, ModelConfig, NormSpec
from distprompt_jax.models.kv_cache import KVCache

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModel:
    """A frozen causal LM. Every method is pure in `params` and safe under jit, vmap and grad."""

    name: str
    config: ModelConfig
    params: Any
    tokenizer: Any
    dtype: Any
    _graphdef: Any = dataclasses.field(repr=False)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def _module(self, params) -> DecoderLM:
        return nnx.merge(self._graphdef, params)

    def embed(self, params, ids):
        """Input embeddings of token ids: int [..., L] -> [..., L, d], including any embedding scale."""
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        return self._module(params).embed_tokens(ids)

    def logits(self, params, x, cache: KVCache | None = None):
        """Next-token logits after the last position: embeddings [L, d] -> float32 [V].

        With a `cache` of P positions (from `prefix_cache` or `extend_cache`, or a free pytree of that shape
        being optimized), x holds positions P..P+L-1 and attends to the cached positions and to itself,
        causally: `logits(params, x[i:], prefix_cache(params, x[:i]))` equals `logits(params, x)` up to
        float rounding, and gradients flow to the cache's arrays as to x.

        Leading batch axes ([..., L, d] -> [..., V]) are mapped over; for many prompts in one compiled
        call use `jax.jit(jax.vmap(lm.logits, in_axes=(None, 0)))`. A cache has either no leading axes
        (one prefix shared by every prompt: `in_axes=(None, 0, None)`) or the same ones as x.
        """
        self._check_embeddings(x, past=cache)
        if cache is None:
            return _map_leading(lambda xi: self._module(params).logits(xi), x, 2)
        return _map_with_cache(lambda xi, ci: self._module(params).logits(xi, ci), x, cache)

    def logits_and_cache(self, params, x, cache: KVCache | None = None) -> tuple[jax.Array, KVCache]:
        """`logits(params, x, cache)` and the keys/values of x's own positions (`prefix_cache(params, x)`, or
        with a `cache` the part `extend_cache` adds to it), from one forward pass: a search that takes the
        gradient of a prompt's loss gets the prompt's cache, for evaluating its continuations, at no extra
        pass. Under `jax.value_and_grad(..., has_aux=True)` the cache is the auxiliary output. Leading axes
        pair as in `logits`.
        """
        self._check_embeddings(x, past=cache)
        if cache is None:
            return _map_leading(lambda xi: self._module(params).logits_and_keys_values(xi), x, 2)
        return _map_with_cache(lambda xi, ci: self._module(params).logits_and_keys_values(xi, ci), x, cache)

    def prefix_cache(self, params, x_prefix) -> KVCache:
        """The keys and values of a prefix of input embeddings x_prefix [P, d] (P >= 0) at every layer.

        Returns a KVCache with keys/values [n_layers, P, n_kv_heads, head_dim] in the parameter dtype,
        keys rotated at positions 0..P-1 (transformers' past_key_values, transposed: see KVCache).
        Leading batch axes are mapped over ([..., P, d] -> [..., n_layers, P, n_kv_heads, head_dim]).
        """
        self._check_embeddings(x_prefix, min_length=0)
        return _map_leading(lambda xi: self._module(params).keys_values(xi), x_prefix, 2)

    def extend_cache(self, params, cache: KVCache, x) -> KVCache:
        """The cache of the cached positions followed by x [L, d]: `prefix_cache` of the whole prefix, up to
        rounding, without recomputing the cached part (L >= 0). Leading axes pair as in `logits`."""
        self._check_embeddings(x, min_length=0, past=cache)
        new = _map_with_cache(lambda xi, ci: self._module(params).keys_values(xi, ci), x, cache)
        if jnp.ndim(cache.keys) < jnp.ndim(new.keys):  # one cache extended by a batch of continuations
            cache = jax.tree.map(lambda a: jnp.broadcast_to(a, new.keys.shape[:-3] + a.shape[-3:]), cache)
        return cache.concatenate(new)

    def input_stream(self, params, x):
        """The residual stream entering layer 0 for embeddings x [L, d] (adds learned positions, if any)."""
        self._check_embeddings(x)
        return _map_leading(lambda xi: self._module(params).input_stream(xi), x, 2)

    def run_layers(self, params, h, start: int = 0, stop: int | None = None):
        """Apply layers [start, stop) to a residual stream [L, d] (for interventions between layers)."""
        stop = self.n_layers if stop is None else stop
        if not 0 <= start <= stop <= self.n_layers:
            raise ValueError(f"layer range [{start}, {stop}) is outside [0, {self.n_layers}]")
        self._check_embeddings(h)
        return _map_leading(lambda hi: self._module(params).run_layers(hi, start, stop), h, 2)

    def logits_from_layer(self, params, h, start: int):
        """Next-token logits [V] from the residual stream h [L, d] entering layer `start` (n_layers: none left)."""
        if not 0 <= start <= self.n_layers:
            raise ValueError(f"start layer {start} is outside [0, {self.n_layers}]")
        self._check_embeddings(h)
        return _map_leading(lambda hi: self._module(params).logits_from_layer(hi, start), h, 2)

    def final_norm(self, params, h):
        """The final norm applied to hidden vectors [..., d]."""
        return self._module(params).final_norm(h)

    def final_norm_parameters(self, params) -> NormSpec:
        """What the final norm computes, as data: `bias + (offset + scale) * n(h)` with n the RMS or
        layer normalization of kind `kind` and epsilon `eps` (see NormSpec); scale/bias [d] as stored."""
        return self._module(params).final_norm.spec()

    def unembed(self, params, h_normed):
        """Float32 logits [..., V] of final-normed hidden vectors [..., d] (with any logit softcap)."""
        return self._module(params).unembed(h_normed)

    def unembedding(self, params):
        """(W [V, d], b [V]) float32 with logits = W @ final_norm(h) + b (b is zero where the model has none)."""
        return self._module(params).unembedding()

    def embedding_matrix(self, params):
        """Every token's input embedding [V, d], as `embed` returns it (embedding scale included)."""
        return self.embed(params, jnp.arange(self.vocab_size))

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Token ids of `text` as the model's tokenizer gives them (BOS added where the model expects it)."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} was loaded without a tokenizer")
        return np.asarray(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"], np.int32)

    def _check_embeddings(self, x, *, min_length: int = 1, past: KVCache | None = None):
        shape = jnp.shape(x)
        if len(shape) < 2:
            raise ValueError(f"prompt embeddings must be [..., L, d] with L >= {min_length}; got shape {tuple(shape)}")
        if shape[-1] != self.d_model:
            raise ValueError(
                f"prompt embeddings have width {shape[-1]}, but {self.name} has d_model {self.d_model}"
            )
        if shape[-2] < min_length:
            raise ValueError(f"prompt embeddings are empty: L must be at least {min_length}")
        past_length = 0
        if past is not None:
            self._check_cache(past, shape[:-2])
            past_length = past.length
        if not self.config.rope and past_length + shape[-2] > self.config.max_positions:
            raise ValueError(
                f"prompt of {past_length + shape[-2]} positions exceeds {self.name}'s {self.config.max_positions}"
            )

    def _check_cache(self, cache, batch_shape: tuple[int, ...]):
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (from prefix_cache), got {type(cache).__name__}")
        cfg = self.config
        want = (cfg.n_layers, cache.length, cfg.n_kv_heads, cfg.head_dim)
        keys, values = jnp.shape(cache.keys), jnp.shape(cache.values)
        if len(keys) < 4 or keys[-4:] != want or values != keys:
            raise ValueError(
                f"cache keys {keys} / values {values} do not fit {self.name}: each must be "
                f"[..., n_layers={cfg.n_layers}, P, n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}]"
            )
        if keys[:-4] not in ((), batch_shape):
            raise ValueError(
                f"cache leading axes {keys[:-4]} must be none (one prefix for every prompt) or the prompts' "
                f"{batch_shape}; vmap explicitly for other pairings"
            )


def _map_leading(fn, x, core_ndim: int):
    """Apply fn to the trailing `core_ndim` axes, vmapping over any leading ones."""
    for _ in range(jnp.ndim(x) - core_ndim):
        fn = jax.vmap(fn)
    return fn(x)


def _map_with_cache(fn, x, cache: KVCache):
    """fn(x [L, d], cache) mapped over x's leading axes, and over the cache's when it has them too."""
    cache_axes = 0 if jnp.ndim(cache.keys) > 4 else None
    for _ in range(jnp.ndim(x) - 2):
        fn = jax.vmap(fn, in_axes=(0, cache_axes))
    return fn(x, cache)


def build_language_model(name: str, config: ModelConfig, params_np: dict, tokenizer, dtype: str = "float32"):
    """Place float32 numpy params on the default device in `dtype` and wrap them."""
    skeleton = abstract_language_model(config, dtype, name)
    params = jax.tree.map(lambda a: jnp.asarray(a, skeleton.dtype), params_np)
    return dataclasses.replace(skeleton, params=params, tokenizer=tokenizer)


def abstract_language_model(config: ModelConfig, dtype: str = "float32", name: str = "abstract") -> LanguageModel:
    """A LanguageModel whose params are ShapeDtypeStructs: for `jax.eval_shape` on any size, no memory used."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = nnx.eval_shape(lambda: DecoderLM(config, dtype=DTYPES[dtype]))
    graphdef, state = nnx.split(model)
    return LanguageModel(
        name=name, config=config, params=nnx.to_pure_dict(state), tokenizer=None, dtype=DTYPES[dtype],
        _graphdef=graphdef,
    )
