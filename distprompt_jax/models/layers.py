"""Building blocks shared by the model families, as Flax NNX modules.

Every parameter is created with a leading `stack` axis when the module belongs to the layer stack: the
decoder scans over that axis (one compiled layer body instead of n_layers copies). Values are placeholders
(zeros/ones): real values always come from a checkpoint, so no module needs an RNG.

Numerics follow the HF transformers implementations, including where they upcast to float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from distprompt_jax.models.config import ModelConfig


def _param(stack: int | None, shape: tuple[int, ...], dtype, fill: float = 0.0) -> nnx.Param:
    full_shape = shape if stack is None else (stack, *shape)
    return nnx.Param(jnp.full(full_shape, fill, dtype))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, stack: int | None = None):
        self.kernel = _param(stack, (d_in, d_out), dtype)
        self.bias = _param(stack, (d_out,), dtype) if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


@struct.dataclass
class NormSpec:
    """What a norm computes, stated publicly: `bias + (offset + scale) * n(x)` over the last axis, where
    n(x) = x / sqrt(mean(x^2) + eps) for kind "rms" and (x - mean(x)) / sqrt(var(x) + eps) for "layer".

    scale, bias: [d] parameter arrays as stored (bias is zeros for an RMSNorm); kind, eps and offset are
    static. A pytree, so it can be read inside jit too.
    """

    scale: jax.Array
    bias: jax.Array
    kind: str = struct.field(pytree_node=False)  # "rms" | "layer"
    eps: float = struct.field(pytree_node=False)
    offset: float = struct.field(pytree_node=False)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed in float32.

    `offset=1` is Gemma's convention (multiplier 1 + w, applied before casting back); `offset=0` is
    Llama's (w times the normalized input cast back to the input dtype).
    """

    def __init__(self, dim: int, *, eps: float, offset: float, dtype, stack: int | None = None):
        self.scale = _param(stack, (dim,), dtype, fill=1.0 - offset)
        self.eps = eps
        self.offset = offset

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...] * normed.astype(x.dtype)

    def spec(self) -> NormSpec:
        scale = self.scale[...]
        return NormSpec(scale, jnp.zeros_like(scale), kind="rms", eps=self.eps, offset=self.offset)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, stack: int | None = None):
        self.scale = _param(stack, (dim,), dtype, fill=1.0)
        self.bias = _param(stack, (dim,), dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)

    def spec(self) -> NormSpec:
        return NormSpec(self.scale[...], self.bias[...], kind="layer", eps=self.eps, offset=0.0)


def activation(name: str, x):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.relu(x)


def apply_rope(x, inv_freq, start: int = 0):
    """Rotate [L, heads, head_dim] at positions start..start+L-1, HF's rotate-half layout; cos/sin in float32."""
    positions = start + jnp.arange(x.shape[0], dtype=jnp.float32)
    angles = positions[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def causal_attention(q, k, v, *, scale: float, window, softcap: float | None, query_start: int = 0):
    """Grouped-query causal attention of one sequence.

    q [L, H, hd] at positions query_start..query_start+L-1, k/v [T, Kv, hd] at positions 0..T-1 -> [L, H * hd].
    Each query sees the keys at or before its position; `window` (a traced int) limits it to the `window`
    most recent ones, itself included, as transformers' sliding-window mask does.
    """
    length, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    q = q.reshape(length, n_kv, n_heads // n_kv, head_dim)
    scores = jnp.einsum("qkgd,tkd->kgqt", q, k) * jnp.asarray(scale, q.dtype)
    scores = scores.astype(jnp.float32)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    query_pos = query_start + jnp.arange(length)[:, None]
    key_pos = jnp.arange(k.shape[0])[None, :]
    allowed = (key_pos <= query_pos) & (query_pos - key_pos < window)
    scores = jnp.where(allowed, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("kgqt,tkd->qkgd", weights, v)
    return out.reshape(length, n_heads * head_dim)


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with rotary positions (when inv_freq is given)."""

    def __init__(self, cfg: ModelConfig, *, norm_offset: float, dtype, stack: int | None = None):
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q = Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias, dtype=dtype, stack=stack)
        self.k = Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias, dtype=dtype, stack=stack)
        self.v = Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias, dtype=dtype, stack=stack)
        self.o = Linear(q_dim, cfg.d_model, bias=cfg.out_bias, dtype=dtype, stack=stack)
        if cfg.qk_norm:
            norm = dict(eps=cfg.norm_eps, offset=norm_offset, dtype=dtype, stack=stack)
            self.q_norm = RMSNorm(cfg.head_dim, **norm)
            self.k_norm = RMSNorm(cfg.head_dim, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def __call__(self, x, *, inv_freq, window, past=None):
        """Attention of x [L, d] at positions P..P+L-1 over `past` = (keys, values) [P, Kv, hd] of positions
        0..P-1 (None: P = 0) and over x's own positions, causally.

        Returns (output [L, d], (keys, values) [L, Kv, hd] of x's positions, keys after the rotation).
        """
        cfg = self.cfg
        length = x.shape[0]
        start = 0 if past is None else past[0].shape[0]
        q = self.q(x).reshape(length, cfg.n_heads, cfg.head_dim)
        k = self.k(x).reshape(length, cfg.n_kv_heads, cfg.head_dim)
        v = self.v(x).reshape(length, cfg.n_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if inv_freq is not None:
            q, k = apply_rope(q, inv_freq, start), apply_rope(k, inv_freq, start)
        keys, values = k, v
        if past is not None:
            # A cache given in another dtype (a float32 one optimized beside bfloat16 weights) joins in ours.
            keys = jnp.concatenate([past[0].astype(k.dtype), k])
            values = jnp.concatenate([past[1].astype(v.dtype), v])
        out = causal_attention(
            q, keys, values, scale=cfg.attention_scale, window=window, softcap=cfg.attn_logit_softcap,
            query_start=start,
        )
        return self.o(out), (k, v)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)) — SwiGLU for Llama/Qwen, GeGLU for Gemma."""

    def __init__(self, cfg: ModelConfig, *, dtype, stack: int | None = None):
        bias = cfg.mlp_bias
        self.gate = Linear(cfg.d_model, cfg.d_ff, bias=bias, dtype=dtype, stack=stack)
        self.up = Linear(cfg.d_model, cfg.d_ff, bias=bias, dtype=dtype, stack=stack)
        self.down = Linear(cfg.d_ff, cfg.d_model, bias=bias, dtype=dtype, stack=stack)
        self.act = cfg.activation

    def __call__(self, x):
        return self.down(activation(self.act, self.gate(x)) * self.up(x))


class MLP(nnx.Module):
    """proj(act(fc(x))) — GPT-2."""

    def __init__(self, cfg: ModelConfig, *, dtype, stack: int | None = None):
        self.fc = Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias, dtype=dtype, stack=stack)
        self.proj = Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias, dtype=dtype, stack=stack)
        self.act = cfg.activation

    def __call__(self, x):
        return self.proj(activation(self.act, self.fc(x)))
