"""The keys and values of a prompt's first positions at every layer: what later positions attend to.

A `KVCache` is a plain pytree (a NamedTuple of two arrays), so it can be an input of a jitted function, be
vmapped over, and be optimized directly (prefix tuning treats its arrays as free parameters).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    """Per-layer keys and values of positions 0..P-1.

    keys, values: [..., n_layers, P, n_kv_heads, head_dim], in the parameter dtype (leading axes: a batch
    of caches). Keys are stored *after* the rotary embedding, at their absolute positions 0..P-1, as
    transformers' `past_key_values` holds them, so a cache converts to and from that layout by a transpose
    (`hf_layout`, `from_hf_layout`). Every layer holds all P positions, sliding-window layers included: the
    window is applied when later positions attend (transformers keeps only the last `window - 1` of them).
    P is part of the arrays' shape, hence static: each prefix length compiles its own program.
    """

    keys: jax.Array
    values: jax.Array

    @property
    def length(self) -> int:
        """P, the number of cached positions."""
        return self.keys.shape[-3]

    def concatenate(self, later: KVCache) -> KVCache:
        """The cache of these positions followed by `later`'s (which must continue at position P)."""
        return KVCache(
            jnp.concatenate([self.keys, later.keys.astype(self.keys.dtype)], axis=-3),
            jnp.concatenate([self.values, later.values.astype(self.values.dtype)], axis=-3),
        )

    def hf_layout(self) -> tuple[jax.Array, jax.Array]:
        """(keys, values) as [..., n_layers, n_kv_heads, P, head_dim]: transformers' per-layer
        `past_key_values` layout ([batch, heads, positions, head_dim]) stacked over layers."""
        return jnp.swapaxes(self.keys, -3, -2), jnp.swapaxes(self.values, -3, -2)

    @classmethod
    def from_hf_layout(cls, keys, values) -> KVCache:
        """The inverse of `hf_layout`: keys/values [..., n_layers, n_kv_heads, P, head_dim]."""
        return cls(jnp.swapaxes(jnp.asarray(keys), -3, -2), jnp.swapaxes(jnp.asarray(values), -3, -2))
