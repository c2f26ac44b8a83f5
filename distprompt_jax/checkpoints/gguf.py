"""Reading a GGUF file (llama.cpp's format) as the equivalent Hugging Face checkpoint, without torch.

    hf_config, tensors, tokenizer = read_gguf("model.gguf")

`hf_config` is the `config.json` of the equivalent transformers (v5) model, `tensors` its state dict
(float32 numpy, HF names and layouts, `lm_head.weight` left out when tied), and `tokenizer` a
`PreTrainedTokenizerFast` rebuilt from the file's `tokenizer.ggml.*` metadata.

llama.cpp's converter changes more than names, and each change is undone here:
  * a `[out, in]` layout everywhere, so GPT-2's Conv1D weights (`[in, out]` in HF) come back transposed;
  * q/k rows of `llama` files permuted per head, for llama.cpp's interleaved rotary embedding;
  * every Gemma RMSNorm multiplier stored as `1 + w`;
  * quantized blocks, dequantized with the `gguf` package.

The reader is strict: metadata under the architecture's own namespace that it does not understand
(rope scaling, softcapping, experts, partial rotary, ...) and tensors it cannot place raise `GGUFError`
naming the key or tensor, rather than yielding a model that silently computes something else.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "gpt2")

_HF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "gpt2": "gpt2"}
_HF_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}

# llama.cpp hard-codes Gemma 3's layer pattern (5 sliding-window layers, then 1 global) and the rotary
# base of its sliding-window layers; newer files may state the latter as `rope.freq_base_swa`.
_GEMMA3_SLIDING_WINDOW_PERIOD = 6
_GEMMA3_SLIDING_ROPE_THETA = 10000.0
# ... and scales Gemma 3 27B's queries by 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim). It knows
# that model by its layer count.
_GEMMA3_27B_LAYERS = 62

_GGUF_VERSIONS = (2, 3)


class GGUFError(ValueError):
    """A GGUF file that cannot be read, or cannot be turned into an equivalent HF checkpoint."""


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], PreTrainedTokenizerFast]:
    """`(hf_config, tensors, tokenizer)` equivalent to the GGUF file at `path`. See the module docstring."""
    path = Path(path)
    architecture = gguf_architecture(path)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: unsupported GGUF architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    reader = _open_reader(path)
    metadata = _Metadata(path, architecture, _read_fields(reader))
    gguf_tensors = {tensor.name: tensor for tensor in reader.tensors}
    _refuse_unsupported_layouts(metadata, gguf_tensors)

    hf_config = _CONFIG_BUILDERS[architecture](metadata, gguf_tensors)
    metadata.check_all_read()
    tensors = _convert_tensors(path, gguf_tensors, _expected_tensors(architecture, hf_config))
    return hf_config, tensors, _build_tokenizer(metadata)


def gguf_architecture(path: str | os.PathLike) -> str:
    """The file's `general.architecture`, read from the header alone (no tensor table, no vocabulary)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, not the magic b'GGUF')")
        version, _tensor_count, kv_count = _unpack(f, "<IQQ", path)
        if version not in _GGUF_VERSIONS:
            # A big-endian file also lands here: its version reads as a huge number.
            raise GGUFError(f"{path}: GGUF version {version} is not supported (little-endian v2 and v3 are)")
        for _ in range(kv_count):
            key = _read_string(f, path)
            (value_type,) = _unpack(f, "<I", path)
            if key == "general.architecture":
                if value_type != _STRING:
                    raise GGUFError(f"{path}: general.architecture is not a string")
                return _read_string(f, path)
            _skip_value(f, value_type, path)
    raise GGUFError(f"{path}: the GGUF metadata has no general.architecture")


# ---------------------------------------------------------------------------------------------------
# The header walk behind `gguf_architecture`: GGUFReader parses every string of the vocabulary up front
# (seconds for a 262k-token one), where the architecture is the first key of any llama.cpp file.

_STRING, _ARRAY = 8, 9
# value type -> byte width, for the fixed-size ones: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64
_FIXED_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _unpack(f: BinaryIO, fmt: str, path: Path) -> tuple:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise GGUFError(f"{path}: truncated GGUF file (the metadata ends early)")
    return struct.unpack(fmt, raw)


def _read_string(f: BinaryIO, path: Path) -> str:
    (length,) = _unpack(f, "<Q", path)
    raw = f.read(length)
    if len(raw) != length:
        raise GGUFError(f"{path}: truncated GGUF file (the metadata ends early)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGUFError(f"{path}: corrupt GGUF metadata (a key or string is not UTF-8)") from e


def _skip_value(f: BinaryIO, value_type: int, path: Path):
    if value_type in _FIXED_WIDTH:
        f.seek(_FIXED_WIDTH[value_type], os.SEEK_CUR)
    elif value_type == _STRING:
        (length,) = _unpack(f, "<Q", path)
        f.seek(length, os.SEEK_CUR)
    elif value_type == _ARRAY:
        element_type, count = _unpack(f, "<IQ", path)
        if element_type in _FIXED_WIDTH:
            f.seek(count * _FIXED_WIDTH[element_type], os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, element_type, path)
    else:
        raise GGUFError(f"{path}: corrupt GGUF metadata (unknown value type {value_type})")


# ---------------------------------------------------------------------------------------------------
# Metadata


def _open_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    # GGUFReader maps the file and slices it wherever the header points; a short or garbled file
    # surfaces as whichever numpy or parsing error that hits first.
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


def _read_fields(reader) -> dict[str, Any]:
    """Every metadata key -> its value as plain Python, minus the reader's own `GGUF.*` header entries."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@dataclass
class _Metadata:
    """The file's metadata; remembers which `{architecture}.*` keys the config builder has looked at,
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


def _refuse_unsupported_layouts(meta: _Metadata, gguf_tensors: dict):
    path = meta.path
    if int(meta.other("split.count", 1)) > 1:
        raise GGUFError(
            f"{path}: this is one part of a split GGUF (split.count={meta.other('split.count')}); merge the "
            "parts with llama.cpp's gguf-split --merge first"
        )
    if "rope_freqs.weight" in gguf_tensors:
        # Llama 3.1+ rope scaling: llama.cpp bakes it into per-frequency factors, from which HF's
        # factor / low_freq_factor / high_freq_factor / original_max_position_embeddings cannot be
        # recovered uniquely (any common rescaling of the last three gives the same factors).
        raise GGUFError(
            f"{path}: tensor rope_freqs.weight (llama3-style rope scaling) is not supported: its HF "
            "rope_parameters cannot be recovered exactly from the GGUF"
        )


# ---------------------------------------------------------------------------------------------------
# Config, one builder per architecture


def _common_config(meta: _Metadata, gguf_tensors: dict) -> dict:
    tokens = meta.other("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{meta.path}: the GGUF has no tokenizer.ggml.tokens (no vocabulary)")
    architecture = meta.architecture
    return {
        "model_type": _HF_MODEL_TYPE[architecture],
        "architectures": [_HF_ARCHITECTURE[architecture]],
        # llama.cpp pads the token list to the embedding's size, so the two agree; the shape check on
        # token_embd catches a file where they do not.
        "vocab_size": int(meta.get("vocab_size", len(tokens))),
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in gguf_tensors,
        "bos_token_id": _optional_int(meta.other("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _optional_int(meta.other("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _optional_int(meta.other("tokenizer.ggml.padding_token_id")),
    }


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _float32(value) -> float:
    """A float GGUF stored in 32 bits, as the shortest decimal that rounds to it: the value the HF
    config most likely said (1e-06 rather than 9.999999974752427e-07)."""
    return float(str(np.float32(value)))


def _attention_sizes(meta: _Metadata) -> dict:
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


def _refuse_rope_scaling_and_experts(meta: _Metadata):
    meta.expect("rope.scaling.type", ("none",), "rope scaling is not mapped to HF rope_parameters")
    meta.expect("expert_count", (0,), "mixture-of-experts is not supported")
    meta.expect("expert_used_count", (0,), "mixture-of-experts is not supported")


def _has_bias(gguf_tensors: dict, leaf: str) -> bool:
    return any(name.startswith("blk.") and name.endswith(f".{leaf}.bias") for name in gguf_tensors)


def _decoder_config(meta: _Metadata, gguf_tensors: dict) -> dict:
    """llama, qwen2, qwen3: pre-norm decoders with SwiGLU MLPs and a NeoX-style rotary embedding in HF."""
    _refuse_rope_scaling_and_experts(meta)
    config = _common_config(meta, gguf_tensors) | _attention_sizes(meta)
    config |= {
        "intermediate_size": int(meta.require("feed_forward_length")),
        "num_hidden_layers": int(meta.require("block_count")),
        "max_position_embeddings": int(meta.require("context_length")),
        "rms_norm_eps": _float32(meta.require("attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": _float32(meta.get("rope.freq_base", 10000.0))},
    }
    if meta.architecture == "llama":
        config["attention_bias"] = _has_bias(gguf_tensors, "attn_q")
        config["mlp_bias"] = _has_bias(gguf_tensors, "ffn_up")
    elif meta.architecture == "qwen3":
        config["attention_bias"] = _has_bias(gguf_tensors, "attn_q")
    # qwen2 always has q/k/v biases and no flag for them.
    return config


def _gemma3_config(meta: _Metadata, gguf_tensors: dict) -> dict:
    _refuse_rope_scaling_and_experts(meta)
    config = _common_config(meta, gguf_tensors) | _attention_sizes(meta)
    n_layers = int(meta.require("block_count"))
    sliding_theta = _float32(meta.get("rope.freq_base_swa", _GEMMA3_SLIDING_ROPE_THETA))
    query_scalar = config["hidden_size"] // config["num_attention_heads"]
    config |= {
        "intermediate_size": int(meta.require("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "max_position_embeddings": int(meta.require("context_length")),
        "rms_norm_eps": _float32(meta.require("attention.layer_norm_rms_epsilon")),
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_scalar if n_layers == _GEMMA3_27B_LAYERS else config["head_dim"],
        "sliding_window": int(meta.require("attention.sliding_window")),
        "layer_types": [
            "full_attention" if (i + 1) % _GEMMA3_SLIDING_WINDOW_PERIOD == 0 else "sliding_attention"
            for i in range(n_layers)
        ],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": _float32(meta.require("rope.freq_base"))},
            "sliding_attention": {"rope_type": "default", "rope_theta": sliding_theta},
        },
        "attention_bias": _has_bias(gguf_tensors, "attn_q"),
        # Stated, since a config class default is one checkpoint's value; the file would carry
        # `{arch}.attn_logit_softcapping` / `final_logit_softcapping` otherwise, which are refused.
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }
    return config


def _gpt2_config(meta: _Metadata, gguf_tensors: dict) -> dict:
    n_embd = int(meta.require("embedding_length"))
    n_head = int(meta.require("attention.head_count"))
    meta.expect("attention.head_count_kv", (n_head,), "GPT-2 has no grouped-query attention")
    return _common_config(meta, gguf_tensors) | {
        "n_embd": n_embd,
        "n_layer": int(meta.require("block_count")),
        "n_head": n_head,
        "n_positions": int(meta.require("context_length")),
        "n_inner": int(meta.get("feed_forward_length", 4 * n_embd)),
        "layer_norm_epsilon": _float32(meta.require("attention.layer_norm_epsilon")),
        # llama.cpp's GELU is the tanh approximation, which HF's GPT-2 calls gelu_new.
        "activation_function": "gelu_new",
    }


_CONFIG_BUILDERS: dict[str, Callable[[_Metadata, dict], dict]] = {
    "llama": _decoder_config,
    "qwen2": _decoder_config,
    "qwen3": _decoder_config,
    "gemma3": _gemma3_config,
    "gpt2": _gpt2_config,
}


# ---------------------------------------------------------------------------------------------------
# Tensors: what the config says the HF model holds, where each lives in the GGUF, and how it was changed


def _identity(array: np.ndarray) -> np.ndarray:
    return array


def _transpose(array: np.ndarray) -> np.ndarray:
    return array.T


def _subtract_one(array: np.ndarray) -> np.ndarray:
    return array - np.float32(1.0)


def _unpermute_rows(n_heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Undo llama.cpp's per-head row order for q/k (weights and biases).

    HF rotates the two halves of each head together, llama.cpp adjacent pairs; its converter reorders
    each head's rows from `[2, head_dim/2]` to `[head_dim/2, 2]`, and this reorders them back.
    """

    def unpermute(array: np.ndarray) -> np.ndarray:
        rows, rest = array.shape[0], array.shape[1:]
        per_head = array.reshape(n_heads, rows // n_heads // 2, 2, *rest)
        return per_head.swapaxes(1, 2).reshape(array.shape)

    return unpermute


@dataclass(frozen=True)
class _TensorSpec:
    gguf_name: str
    hf_name: str
    hf_shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray] = _identity
    transposed: bool = False  # stored `[out, in]` for a HF Conv1D's `[in, out]`

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.hf_shape[::-1] if self.transposed else self.hf_shape


def _expected_tensors(architecture: str, config: dict) -> list[_TensorSpec]:
    if architecture == "gpt2":
        return _gpt2_tensors(config)
    return _decoder_tensors(architecture, config)


def _decoder_tensors(architecture: str, c: dict) -> list[_TensorSpec]:
    hidden, ff, vocab, head_dim = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q_rows, kv_rows = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    gemma = architecture == "gemma3"
    norm = _subtract_one if gemma else _identity  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w
    if architecture == "llama":
        q_order, k_order = _unpermute_rows(c["num_attention_heads"]), _unpermute_rows(c["num_key_value_heads"])
    else:
        q_order = k_order = _identity
    attention_bias = architecture == "qwen2" or c.get("attention_bias", False)

    specs = [
        _TensorSpec("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden)),
        _TensorSpec("output_norm.weight", "model.norm.weight", (hidden,), norm),
    ]
    if not c["tie_word_embeddings"]:
        specs.append(_TensorSpec("output.weight", "lm_head.weight", (vocab, hidden)))
    for i in range(c["num_hidden_layers"]):
        blk, layer = f"blk.{i}", f"model.layers.{i}"
        specs += [
            _TensorSpec(f"{blk}.attn_norm.weight", f"{layer}.input_layernorm.weight", (hidden,), norm),
            _TensorSpec(f"{blk}.attn_q.weight", f"{layer}.self_attn.q_proj.weight", (q_rows, hidden), q_order),
            _TensorSpec(f"{blk}.attn_k.weight", f"{layer}.self_attn.k_proj.weight", (kv_rows, hidden), k_order),
            _TensorSpec(f"{blk}.attn_v.weight", f"{layer}.self_attn.v_proj.weight", (kv_rows, hidden)),
            _TensorSpec(f"{blk}.attn_output.weight", f"{layer}.self_attn.o_proj.weight", (hidden, q_rows)),
            _TensorSpec(f"{blk}.ffn_gate.weight", f"{layer}.mlp.gate_proj.weight", (ff, hidden)),
            _TensorSpec(f"{blk}.ffn_up.weight", f"{layer}.mlp.up_proj.weight", (ff, hidden)),
            _TensorSpec(f"{blk}.ffn_down.weight", f"{layer}.mlp.down_proj.weight", (hidden, ff)),
        ]
        if attention_bias:
            specs += [
                _TensorSpec(f"{blk}.attn_q.bias", f"{layer}.self_attn.q_proj.bias", (q_rows,), q_order),
                _TensorSpec(f"{blk}.attn_k.bias", f"{layer}.self_attn.k_proj.bias", (kv_rows,), k_order),
                _TensorSpec(f"{blk}.attn_v.bias", f"{layer}.self_attn.v_proj.bias", (kv_rows,)),
            ]
            if architecture != "qwen2":  # the HF flag covers the output projection too, except in Qwen2
                specs.append(_TensorSpec(f"{blk}.attn_output.bias", f"{layer}.self_attn.o_proj.bias", (hidden,)))
        if c.get("mlp_bias", False):
            specs += [
                _TensorSpec(f"{blk}.ffn_gate.bias", f"{layer}.mlp.gate_proj.bias", (ff,)),
                _TensorSpec(f"{blk}.ffn_up.bias", f"{layer}.mlp.up_proj.bias", (ff,)),
                _TensorSpec(f"{blk}.ffn_down.bias", f"{layer}.mlp.down_proj.bias", (hidden,)),
            ]
        if architecture in ("qwen3", "gemma3"):
            specs += [
                _TensorSpec(f"{blk}.attn_q_norm.weight", f"{layer}.self_attn.q_norm.weight", (head_dim,), norm),
                _TensorSpec(f"{blk}.attn_k_norm.weight", f"{layer}.self_attn.k_norm.weight", (head_dim,), norm),
            ]
        if gemma:  # a sandwich: norms before and after both the attention and the MLP
            specs += [
                _TensorSpec(f"{blk}.post_attention_norm.weight", f"{layer}.post_attention_layernorm.weight",
                            (hidden,), norm),
                _TensorSpec(f"{blk}.ffn_norm.weight", f"{layer}.pre_feedforward_layernorm.weight", (hidden,), norm),
                _TensorSpec(f"{blk}.post_ffw_norm.weight", f"{layer}.post_feedforward_layernorm.weight",
                            (hidden,), norm),
            ]
        else:
            specs.append(_TensorSpec(f"{blk}.ffn_norm.weight", f"{layer}.post_attention_layernorm.weight", (hidden,)))
    return specs


def _gpt2_tensors(c: dict) -> list[_TensorSpec]:
    d, ff, vocab = c["n_embd"], c["n_inner"], c["vocab_size"]
    specs = [
        _TensorSpec("token_embd.weight", "transformer.wte.weight", (vocab, d)),
        _TensorSpec("position_embd.weight", "transformer.wpe.weight", (c["n_positions"], d)),
        _TensorSpec("output_norm.weight", "transformer.ln_f.weight", (d,)),
        _TensorSpec("output_norm.bias", "transformer.ln_f.bias", (d,)),
    ]
    if not c["tie_word_embeddings"]:
        specs.append(_TensorSpec("output.weight", "lm_head.weight", (vocab, d)))
    for i in range(c["n_layer"]):
        blk, layer = f"blk.{i}", f"transformer.h.{i}"
        # HF's c_attn is fused like llama.cpp's attn_qkv: q, k, v stacked along the output features.
        conv1d = [("attn_qkv", "attn.c_attn", d, 3 * d), ("attn_output", "attn.c_proj", d, d),
                  ("ffn_up", "mlp.c_fc", d, ff), ("ffn_down", "mlp.c_proj", ff, d)]
        for leaf, hf_leaf, n_in, n_out in conv1d:
            specs += [
                _TensorSpec(f"{blk}.{leaf}.weight", f"{layer}.{hf_leaf}.weight", (n_in, n_out), _transpose, True),
                _TensorSpec(f"{blk}.{leaf}.bias", f"{layer}.{hf_leaf}.bias", (n_out,)),
            ]
        for leaf, hf_leaf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            specs += [
                _TensorSpec(f"{blk}.{leaf}.weight", f"{layer}.{hf_leaf}.weight", (d,)),
                _TensorSpec(f"{blk}.{leaf}.bias", f"{layer}.{hf_leaf}.bias", (d,)),
            ]
    return specs


def _convert_tensors(path: Path, gguf_tensors: dict, specs: list[_TensorSpec]) -> dict[str, np.ndarray]:
    expected = {spec.gguf_name: spec for spec in specs}
    unknown = sorted(set(gguf_tensors) - set(expected))
    if unknown:
        raise GGUFError(f"{path}: GGUF tensors with no place in the HF model: {', '.join(unknown)}")
    missing = sorted(set(expected) - set(gguf_tensors))
    if missing:
        raise GGUFError(f"{path}: GGUF tensors missing for the HF model: {', '.join(missing)}")
    for spec in specs:
        shape = _stored_shape(gguf_tensors[spec.gguf_name])
        if shape != spec.stored_shape:
            raise GGUFError(
                f"{path}: shape mismatch for tensor {spec.gguf_name}: the file has {list(shape)}, the config "
                f"implies {list(spec.stored_shape)} (for {spec.hf_name} {list(spec.hf_shape)})"
            )
    return {spec.hf_name: _dequantized(path, gguf_tensors[spec.gguf_name], spec) for spec in specs}


def _stored_shape(tensor) -> tuple[int, ...]:
    # ggml lists dimensions fastest-moving first; numpy (and torch) the other way round
    return tuple(int(n) for n in reversed(tensor.shape))


def _dequantized(path: Path, tensor, spec: _TensorSpec) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(
            f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize"
        ) from e
    values = values.reshape(spec.stored_shape).astype(np.float32, copy=False)
    # A copy in every case: F32 data is a view of the memory-mapped file.
    return np.array(spec.convert(values), dtype=np.float32, order="C")


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def _build_tokenizer(meta: _Metadata) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` equal to the one transformers builds from a GGUF.

    transformers' own `from_pretrained(..., gguf_file=...)` imports torch, so we feed its torch-free
    builder the same dict its GGUF reader would produce (the key names come from its mapping table).
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    tokenizer_dict = {
        name: meta.other(f"tokenizer.{key}")
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if meta.other(f"tokenizer.{key}") is not None
    }
    tokens = tokenizer_dict["tokens"]
    try:
        backend, _ = convert_gguf_tokenizer(meta.architecture, tokenizer_dict)
    except ValueError as e:
        raise GGUFError(f"{meta.path}: cannot build the tokenizer: {e}") from e
    backend = _without_tokens_beyond(backend, len(tokens))

    def token(id_key: str) -> str | None:
        token_id = meta.other(f"tokenizer.ggml.{id_key}")
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise GGUFError(f"{meta.path}: tokenizer.ggml.{id_key}={token_id} is outside the vocabulary")
        return tokens[token_id]

    # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
    add_bos_default = tokenizer_dict.get("tokenizer_type") == "llama"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        # Stating these makes the tokenizer install a TemplateProcessing post-processor that adds
        # exactly the BOS/EOS the file asks for.
        add_bos_token=bool(meta.other("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(meta.other("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.other("tokenizer.chat_template"),
    )


def _without_tokens_beyond(backend, vocab_size: int):
    """The tokenizer less any added token with an id outside the file's vocabulary.

    transformers' builder hands the vocabulary to a tokenizer class, which adds its own default special
    tokens when the vocabulary lacks them -- GPT-2's `<|endoftext|>` to a Llama 3 vocabulary, say -- with
    ids the model has no embedding for.
    """
    from tokenizers import Tokenizer

    if backend.get_vocab_size(with_added_tokens=True) <= vocab_size:
        return backend
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["id"] < vocab_size]
    return Tokenizer.from_str(json.dumps(spec))
