"""The vocabulary a model family uses to say how llama.cpp's GGUF form of it maps back to transformers.

A family module registers, per GGUF architecture it reads (`models.family.GGUFArchitecture`), a config
builder -- GGUF metadata to the HF `config.json` fields particular to it -- and a tensor list -- which GGUF
tensor becomes which HF tensor, and how llama.cpp's converter changed it on the way. `checkpoints.gguf`
reads the file and applies them. Nothing here touches a file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class GGUFError(ValueError):
    """A GGUF file that cannot be read, or cannot be turned into an equivalent HF checkpoint."""


@dataclass
class GGUFMetadata:
    """A file's metadata; remembers which `{architecture}.*` keys the config builder has looked at,
    so that any it has not -- keys that may change the math -- can be refused by name."""

    path: Path
    architecture: str
    values: dict[str, Any]
    _read: set[str] = field(default_factory=set)

    def require(self, key: str):
        """`{architecture}.{key}`, which the file must state."""
        name = f"{self.architecture}.{key}"
        if name not in self.values:
            raise GGUFError(f"{self.path}: the GGUF metadata has no {name}")
        self._read.add(name)
        return self.values[name]

    def get(self, key: str, default=None):
        """`{architecture}.{key}`, or `default` when the file does not state it."""
        name = f"{self.architecture}.{key}"
        self._read.add(name)
        return self.values.get(name, default)

    def expect(self, key: str, allowed: tuple, why: str):
        """`{architecture}.{key}` must be absent or one of `allowed` (what HF's model computes)."""
        value = self.get(key)
        if value is not None and value not in allowed:
            raise GGUFError(f"{self.path}: unsupported GGUF metadata {self.architecture}.{key}={value!r}: {why}")

    def other(self, key: str, default=None):
        """A key outside the architecture's namespace (`general.*`, `tokenizer.*`, ...)."""
        return self.values.get(key, default)

    def check_all_read(self):
        prefix = f"{self.architecture}."
        unread = sorted(key for key in self.values if key.startswith(prefix) and key not in self._read)
        if unread:
            stated = ", ".join(f"{key}={self.values[key]!r}" for key in unread)
            raise GGUFError(
                f"{self.path}: unsupported GGUF metadata {stated}; this reader does not map it to the HF "
                "model, and refuses rather than produce a model that computes something else"
            )


# A GGUF file's tensor table: name -> the `gguf` package's tensor record (only names are looked at here).
TensorTable = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------------
# Metadata helpers the config builders share


def float32(value) -> float:
    """A float GGUF stored in 32 bits, as the shortest decimal that rounds to it: the value the HF
    config most likely said (1e-06 rather than 9.999999974752427e-07)."""
    return float(str(np.float32(value)))


def attention_sizes(meta: GGUFMetadata) -> dict:
    """Head counts and head_dim, refusing a rotary embedding over part of the head or a value width
    different from the key width (HF's models have one head_dim for both)."""
    hidden_size = int(meta.require("embedding_length"))
    n_heads = int(meta.require("attention.head_count"))
    head_dim = int(meta.get("attention.key_length", hidden_size // n_heads))
    meta.expect("attention.value_length", (head_dim,), f"a value head width other than head_dim={head_dim}")
    meta.expect("rope.dimension_count", (head_dim,), f"partial rotary embedding (head_dim={head_dim})")
    return {
        "hidden_size": hidden_size,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
    }


def refuse_rope_scaling_and_experts(meta: GGUFMetadata):
    meta.expect("rope.scaling.type", ("none",), "rope scaling is not mapped to HF rope_parameters")
    meta.expect("expert_count", (0,), "mixture-of-experts is not supported")
    meta.expect("expert_used_count", (0,), "mixture-of-experts is not supported")


def has_bias(gguf_tensors: TensorTable, leaf: str) -> bool:
    """Whether any block of the file has a `{leaf}.bias` tensor (e.g. leaf 'attn_q')."""
    return any(name.startswith("blk.") and name.endswith(f".{leaf}.bias") for name in gguf_tensors)


# ---------------------------------------------------------------------------------------------------
# Tensors: where each HF tensor lives in the GGUF, and how llama.cpp changed it


def identity(array: np.ndarray) -> np.ndarray:
    return array


def transpose(array: np.ndarray) -> np.ndarray:
    return array.T


def subtract_one(array: np.ndarray) -> np.ndarray:
    """Undo llama.cpp's `1 + w` for a Gemma RMSNorm multiplier."""
    return array - np.float32(1.0)


def unpermute_rows(n_heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Undo llama.cpp's per-head row order for q/k (weights and biases) of `llama` files.

    HF rotates the two halves of each head together, llama.cpp adjacent pairs; its converter reorders
    each head's rows from `[2, head_dim/2]` to `[head_dim/2, 2]`, and this reorders them back.
    """

    def unpermute(array: np.ndarray) -> np.ndarray:
        rows, rest = array.shape[0], array.shape[1:]
        per_head = array.reshape(n_heads, rows // n_heads // 2, 2, *rest)
        return per_head.swapaxes(1, 2).reshape(array.shape)

    return unpermute


@dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: its GGUF name, its HF name and shape, and the inverse of llama.cpp's change to it."""

    gguf_name: str
    hf_name: str
    hf_shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray] = identity
    transposed: bool = False  # stored `[out, in]` for a HF Conv1D's `[in, out]`

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.hf_shape[::-1] if self.transposed else self.hf_shape


@dataclass(frozen=True)
class GatedDecoderLayout:
    """What differs between the Llama-style decoders (Llama, Qwen, Gemma) in their GGUF tensor lists."""

    norm: Callable[[np.ndarray], np.ndarray] = identity  # applied to every RMSNorm multiplier
    q_order: Callable[[np.ndarray], np.ndarray] = identity
    k_order: Callable[[np.ndarray], np.ndarray] = identity
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


def gated_decoder_tensors(
    c: dict, layout: GatedDecoderLayout, layer_norms: Callable[[str, str], list[TensorSpec]]
) -> list[TensorSpec]:
    """Embedding, final norm, output, and per layer the attention and gated MLP of a Llama-style decoder
    described by HF config `c`; `layer_norms(blk, layer)` adds each layer's own norms (GGUF prefix
    `blk.{i}`, HF prefix `model.layers.{i}`)."""
    hidden, ff, vocab, head_dim = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q_rows, kv_rows = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    specs = [
        TensorSpec("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden)),
        TensorSpec("output_norm.weight", "model.norm.weight", (hidden,), layout.norm),
    ]
    if not c["tie_word_embeddings"]:
        specs.append(TensorSpec("output.weight", "lm_head.weight", (vocab, hidden)))
    for i in range(c["num_hidden_layers"]):
        blk, layer = f"blk.{i}", f"model.layers.{i}"
        attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
        specs += [
            TensorSpec(f"{blk}.attn_q.weight", f"{attn}.q_proj.weight", (q_rows, hidden), layout.q_order),
            TensorSpec(f"{blk}.attn_k.weight", f"{attn}.k_proj.weight", (kv_rows, hidden), layout.k_order),
            TensorSpec(f"{blk}.attn_v.weight", f"{attn}.v_proj.weight", (kv_rows, hidden)),
            TensorSpec(f"{blk}.attn_output.weight", f"{attn}.o_proj.weight", (hidden, q_rows)),
            TensorSpec(f"{blk}.ffn_gate.weight", f"{mlp}.gate_proj.weight", (ff, hidden)),
            TensorSpec(f"{blk}.ffn_up.weight", f"{mlp}.up_proj.weight", (ff, hidden)),
            TensorSpec(f"{blk}.ffn_down.weight", f"{mlp}.down_proj.weight", (hidden, ff)),
        ]
        if layout.qkv_bias:
            specs += [
                TensorSpec(f"{blk}.attn_q.bias", f"{attn}.q_proj.bias", (q_rows,), layout.q_order),
                TensorSpec(f"{blk}.attn_k.bias", f"{attn}.k_proj.bias", (kv_rows,), layout.k_order),
                TensorSpec(f"{blk}.attn_v.bias", f"{attn}.v_proj.bias", (kv_rows,)),
            ]
        if layout.out_bias:
            specs.append(TensorSpec(f"{blk}.attn_output.bias", f"{attn}.o_proj.bias", (hidden,)))
        if layout.mlp_bias:
            specs += [
                TensorSpec(f"{blk}.ffn_gate.bias", f"{mlp}.gate_proj.bias", (ff,)),
                TensorSpec(f"{blk}.ffn_up.bias", f"{mlp}.up_proj.bias", (ff,)),
                TensorSpec(f"{blk}.ffn_down.bias", f"{mlp}.down_proj.bias", (hidden,)),
            ]
        if layout.qk_norm:
            specs += [
                TensorSpec(f"{blk}.attn_q_norm.weight", f"{attn}.q_norm.weight", (head_dim,), layout.norm),
                TensorSpec(f"{blk}.attn_k_norm.weight", f"{attn}.k_norm.weight", (head_dim,), layout.norm),
            ]
        specs += layer_norms(blk, layer)
    return specs
