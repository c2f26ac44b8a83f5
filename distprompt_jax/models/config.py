"""The architecture of a causal LM as plain, hashable data.

One `ModelConfig` describes every family we implement; the family modules translate a checkpoint's own
config (HF `config.json`, GGUF metadata) into it and refuse anything they do not implement.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedConfigError(ValueError):
    """A checkpoint's config asks for something this package does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer, in the HF `rope_parameters` vocabulary."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2], float32, computed as transformers does."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        inv_freq = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv_freq, self)
        return inv_freq


def _llama3_inv_freq(inv_freq: np.ndarray, rope: RopeSpec) -> np.ndarray:
    low_freq_wavelen = rope.original_max_positions / rope.low_freq_factor
    high_freq_wavelen = rope.original_max_positions / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass depends on. Per-layer fields are tuples of length `n_layers`."""

    family: str  # a registered family's name (models.family); the decoder refuses any other
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float
    activation: str
    tie_embeddings: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Multiplier on q·k; HF uses head_dim**-0.5 (Gemma 3: query_pre_attn_scalar**-0.5).
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Multiplier on token embeddings (Gemma: sqrt(d_model)), applied in the parameter dtype as HF does.
    embed_scale: float = 1.0
    # Rotary embedding per layer; empty for learned absolute positions (GPT-2).
    rope: tuple[RopeSpec, ...] = ()
    # Causal window per layer (None: full causal attention).
    sliding_window: tuple[int | None, ...] = ()
    max_positions: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise UnsupportedConfigError(f"unsupported activation {self.activation!r}; supported: {ACTIVATIONS}")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.rope and len(self.rope) != self.n_layers:
            raise ValueError(f"rope has {len(self.rope)} entries for {self.n_layers} layers")
        if self.sliding_window and len(self.sliding_window) != self.n_layers:
            raise ValueError(f"sliding_window has {len(self.sliding_window)} entries for {self.n_layers} layers")
        for spec in self.rope:
            if spec.rope_type not in ROPE_TYPES:
                raise UnsupportedConfigError(f"unsupported rope type {spec.rope_type!r}; supported: {ROPE_TYPES}")

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    def layer_windows(self) -> np.ndarray:
        """Window per layer as int32, a window longer than any prompt where attention is fully causal."""
        no_window = np.iinfo(np.int32).max
        windows = self.sliding_window or (None,) * self.n_layers
        return np.array([no_window if w is None else w for w in windows], dtype=np.int32)

    def layer_inv_freqs(self) -> np.ndarray:
        """RoPE inverse frequencies per layer, [n_layers, head_dim // 2] float32."""
        return np.stack([spec.inv_freq(self.head_dim) for spec in self.rope])
