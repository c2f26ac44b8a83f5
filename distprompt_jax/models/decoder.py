"""The decoder every family shares: embeddings, a scanned stack of the family's blocks, final norm, unembedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distprompt_jax.models.config import ModelConfig
from distprompt_jax.models.family import get_family
from distprompt_jax.models.kv_cache import KVCache
from distprompt_jax.models.layers import Linear


class DecoderLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32):
        family = get_family(cfg.family)
        self.cfg = cfg
        self.dtype = dtype
        self.embed = _Embedding(cfg.vocab_size, cfg.d_model, dtype)
        self.pos_embed = None if cfg.rope else _Embedding(cfg.max_positions, cfg.d_model, dtype)
        self.layers = family.block(cfg, dtype=dtype, stack=cfg.n_layers)
        self.final_norm = family.final_norm(cfg, dtype)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False, dtype=dtype)

    def embed_tokens(self, ids):
        table = self.embed.embedding[...]
        return jnp.take(table, ids, axis=0) * jnp.asarray(self.cfg.embed_scale, table.dtype)

    def input_stream(self, x, start: int = 0):
        """The residual stream entering layer 0 for input embeddings x [L, d] at positions start..start+L-1."""
        x = x.astype(self.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed.embedding[start : start + x.shape[0]]
        return x

    def run_layers(self, h, start: int, stop: int):
        """Apply layers [start, stop) to a residual stream h [L, d]."""
        return self._scan_layers(h, start, stop)[0]

    def _scan_layers(self, h, start: int, stop: int, past: KVCache | None = None, collect: bool = False):
        """Layers [start, stop) on h [L, d] at positions P..P+L-1, attending to `past` (P positions; every
        layer's, so only with the whole stack). Returns (h, KVCache of h's positions if `collect`, else None)."""
        if start == stop:
            return h, None
        block_def, stacked = nnx.split(self.layers)
        stacked = jax.tree.map(lambda a: a[start:stop], stacked)
        windows = jnp.asarray(self.cfg.layer_windows()[start:stop])
        inv_freqs = jnp.asarray(self.cfg.layer_inv_freqs()[start:stop]) if self.cfg.rope else None
        past_per_layer = None if past is None else (past.keys, past.values)

        def layer(h, per_layer):
            state, window, inv_freq, past_kv = per_layer
            h, kv = nnx.merge(block_def, state)(h, inv_freq=inv_freq, window=window, past=past_kv)
            return h, kv if collect else None

        h, kvs = jax.lax.scan(layer, h, (stacked, windows, inv_freqs, past_per_layer))
        return h, None if kvs is None else KVCache(*kvs)

    def unembedding(self):
        """(W [V, d], b [V]) of the output layer, float32: logits = W @ final_norm(h) + b."""
        if self.lm_head is None:
            w = self.embed.embedding[...]
        else:
            w = self.lm_head.kernel[...].T
        return w.astype(jnp.float32), jnp.zeros((self.cfg.vocab_size,), jnp.float32)

    def unembed(self, h_normed):
        """Logits (float32) for final-normed hidden vectors [..., d]."""
        if self.lm_head is None:
            logits = h_normed @ self.embed.embedding[...].T
        else:
            logits = self.lm_head(h_normed)
        logits = logits.astype(jnp.float32)
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def logits_from_layer(self, h, start: int):
        """Next-token logits [V] from the residual stream h [L, d] entering layer `start`."""
        h = self.run_layers(h, start, self.cfg.n_layers)
        return self.unembed(self.final_norm(h[-1]))

    def logits(self, x, cache: KVCache | None = None):
        """Next-token logits [V] after x [L, d], which follows the cached positions (if any)."""
        past_length = 0 if cache is None else cache.length
        h, _ = self._scan_layers(self.input_stream(x, past_length), 0, self.cfg.n_layers, past=cache)
        return self.unembed(self.final_norm(h[-1]))

    def logits_and_keys_values(self, x, cache: KVCache | None = None) -> tuple[jax.Array, KVCache]:
        """`logits` and `keys_values` of x from one pass."""
        past_length = 0 if cache is None else cache.length
        h, kv = self._scan_layers(self.input_stream(x, past_length), 0, self.cfg.n_layers, past=cache, collect=True)
        return self.unembed(self.final_norm(h[-1])), kv

    def keys_values(self, x, cache: KVCache | None = None) -> KVCache:
        """The cache of x's positions [L], which follow the cached ones (if any)."""
        past_length = 0 if cache is None else cache.length
        _, kv = self._scan_layers(self.input_stream(x, past_length), 0, self.cfg.n_layers, past=cache, collect=True)
        return kv


class _Embedding(nnx.Module):
    def __init__(self, n: int, d: int, dtype):
        self.embedding = nnx.Param(jnp.zeros((n, d), dtype))
