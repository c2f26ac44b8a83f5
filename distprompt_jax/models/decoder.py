"""The decoder every family shares: embeddings, a scanned stack of family blocks, final norm, unembedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distprompt_jax.models import gemma3, gpt2, llama
from distprompt_jax.models.config import ModelConfig
from distprompt_jax.models.layers import Linear

FAMILY_MODULES = {"llama": llama, "gemma3": gemma3, "gpt2": gpt2}


class DecoderLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32):
        family = FAMILY_MODULES[cfg.family]
        self.cfg = cfg
        self.dtype = dtype
        self.embed = _Embedding(cfg.vocab_size, cfg.d_model, dtype)
        self.pos_embed = None if cfg.rope else _Embedding(cfg.max_positions, cfg.d_model, dtype)
        self.layers = family.Block(cfg, dtype=dtype, stack=cfg.n_layers)
        self.final_norm = family.final_norm(cfg, dtype)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False, dtype=dtype)

    def embed_tokens(self, ids):
        table = self.embed.embedding[...]
        return jnp.take(table, ids, axis=0) * jnp.asarray(self.cfg.embed_scale, table.dtype)

    def input_stream(self, x):
        """The residual stream entering layer 0 for input embeddings x [L, d]."""
        x = x.astype(self.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed.embedding[: x.shape[0]]
        return x

    def run_layers(self, h, start: int, stop: int):
        """Apply layers [start, stop) to a residual stream h [L, d]."""
        if start == stop:
            return h
        block_def, stacked = nnx.split(self.layers)
        stacked = jax.tree.map(lambda a: a[start:stop], stacked)
        windows = jnp.asarray(self.cfg.layer_windows()[start:stop])
        inv_freqs = jnp.asarray(self.cfg.layer_inv_freqs()[start:stop]) if self.cfg.rope else None

        def layer(h, per_layer):
            state, window, inv_freq = per_layer
            return nnx.merge(block_def, state)(h, inv_freq=inv_freq, window=window), None

        h, _ = jax.lax.scan(layer, h, (stacked, windows, inv_freqs))
        return h

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

    def logits(self, x):
        return self.logits_from_layer(self.input_stream(x), 0)


class _Embedding(nnx.Module):
    def __init__(self, n: int, d: int, dtype):
        self.embedding = nnx.Param(jnp.zeros((n, d), dtype))
