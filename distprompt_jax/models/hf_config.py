"""Reading HF checkpoints strictly: every config attribute is either understood or refused by name,
and every tensor is either used or reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from distprompt_jax.models.config import RopeSpec, UnsupportedConfigError

# Attributes that never change a causal LM's forward pass at inference. Every other attribute must be read
# by the family module, which refuses values it does not implement; one nobody reads fails the load by name.
_NO_EFFECT_ON_INFERENCE = frozenset({
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "hidden_dropout", "dropout", "embd_pdrop", "resid_pdrop",
    "attn_pdrop", "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class", "id2label", "label2id",
    "task_specific_params", "n_ctx", "add_cross_attention", "chunk_size_feed_forward", "problem_type",
    "is_decoder", "is_encoder_decoder", "cross_attention_hidden_size", "tie_encoder_decoder",
    "cache_implementation", "generation_config", "_attn_implementation", "_attn_implementation_autoset",
})


class HFConfig:
    """A raw `config.json` dict that remembers which attributes the family module has looked at."""

    def __init__(self, raw: Mapping[str, Any]):
        self.raw = dict(raw)
        self._read = set(_NO_EFFECT_ON_INFERENCE)

    def require(self, key: str):
        if self.raw.get(key) is None:
            raise UnsupportedConfigError(f"config.json has no {key!r}, which this model family needs")
        self._read.add(key)
        return self.raw[key]

    def get(self, key: str, default):
        self._read.add(key)
        value = self.raw.get(key)
        return default if value is None else value

    def expect(self, key: str, *allowed):
        """The attribute, absent or None, must take one of the values this package implements."""
        value = self.get(key, allowed[0])
        if value not in allowed:
            raise UnsupportedConfigError(
                f"unsupported config attribute {key}={value!r}; this package implements {key} in {allowed}"
            )
        return value

    def ignore(self, *keys: str):
        self._read.update(keys)

    def check_all_read(self):
        unknown = sorted(set(self.raw) - self._read)
        if unknown:
            raise UnsupportedConfigError(
                f"unsupported config attribute(s) {unknown} for model_type {self.raw.get('model_type')!r}: "
                "this package does not implement them, and refuses rather than compute something else"
            )


def rope_spec(cfg: HFConfig, layer_type: str | None = None, legacy_theta_key: str = "rope_theta") -> RopeSpec:
    """RoPE of a layer type from transformers-v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = cfg.get("rope_parameters", None)
    if params is not None:
        if layer_type is not None and layer_type in params:
            params = params[layer_type]
        scaling = dict(params)
        theta = scaling.pop("rope_theta", None)
    else:
        theta = cfg.get(legacy_theta_key, None)
        scaling = dict(cfg.get("rope_scaling", None) or {})
    if theta is None:
        raise UnsupportedConfigError(f"config has no RoPE base (rope_parameters.rope_theta or {legacy_theta_key})")
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if scaling.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedConfigError("unsupported config attribute partial_rotary_factor != 1")
    spec_fields = {
        "factor": "factor",
        "low_freq_factor": "low_freq_factor",
        "high_freq_factor": "high_freq_factor",
        "original_max_position_embeddings": "original_max_positions",
    }
    kwargs = {spec_fields[k]: scaling.pop(k) for k in list(scaling) if k in spec_fields}
    required = {"default": (), "linear": ("factor",), "llama3": tuple(spec_fields.values())}
    if rope_type not in required:
        raise UnsupportedConfigError(
            f"unsupported config attribute rope_type={rope_type!r}; implemented: {sorted(required)}"
        )
    missing = [k for k in required[rope_type] if k not in kwargs]
    if missing:
        raise UnsupportedConfigError(f"rope type {rope_type!r} needs {missing}, absent from the config")
    if rope_type == "default":
        kwargs.pop("factor", None)
    if scaling:
        raise UnsupportedConfigError(f"unsupported RoPE parameters {sorted(scaling)} for rope type {rope_type!r}")
    return RopeSpec(theta=float(theta), rope_type=rope_type, **kwargs)


def decoder_sizes(cfg: HFConfig) -> dict:
    """The ModelConfig fields that Llama-style configs (Llama, Qwen, Gemma) name alike."""
    d_model = cfg.require("hidden_size")
    n_heads = cfg.require("num_attention_heads")
    return dict(
        vocab_size=cfg.require("vocab_size"),
        d_model=d_model,
        n_layers=cfg.require("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads", n_heads),
        head_dim=cfg.get("head_dim", d_model // n_heads),
        d_ff=cfg.require("intermediate_size"),
        norm_eps=cfg.require("rms_norm_eps"),
        bos_token_id=cfg.get("bos_token_id", None),
        eos_token_id=first_id(cfg.get("eos_token_id", None)),
    )


def first_id(token_id):
    """eos_token_id may be a list in HF configs; the first one is the canonical end token."""
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id


class TensorSource:
    """HF-named float32 tensors, handed out in our layout; remembers what was used."""

    def __init__(self, tensors: Mapping[str, np.ndarray], ignored: tuple[str, ...] = ()):
        self._tensors = tensors
        self._used: set[str] = set()
        self._ignored = ignored

    def take(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        self._used.add(name)
        return np.asarray(self._tensors[name])

    def has(self, name: str) -> bool:
        return name in self._tensors

    def linear(self, prefix: str, *, transpose: bool = True) -> dict:
        """A torch Linear [out, in] as our {'kernel': [in, out], 'bias'?}."""
        weight = self.take(prefix + ".weight")
        out = {"kernel": weight.T if transpose else weight}
        if self.has(prefix + ".bias"):
            out["bias"] = self.take(prefix + ".bias")
        return out

    def stacked(self, template: str, n_layers: int) -> np.ndarray:
        return np.stack([self.take(template.format(i=i)) for i in range(n_layers)])

    def stacked_linear(self, template: str, n_layers: int, *, transpose: bool = True) -> dict:
        layers = [self.linear(template.format(i=i), transpose=transpose) for i in range(n_layers)]
        return {key: np.stack([layer[key] for layer in layers]) for key in layers[0]}

    def attention_and_gated_mlp(self, n_layers: int, qk_norm: bool) -> tuple[dict, dict]:
        """Stacked `self_attn.{q,k,v,o}_proj` (+ q/k norms) and `mlp.{gate,up,down}_proj` of Llama-style layers."""
        layer = "model.layers.{i}."
        attn = {name: self.stacked_linear(layer + f"self_attn.{name}_proj", n_layers) for name in "qkvo"}
        if qk_norm:
            for name in ("q_norm", "k_norm"):
                attn[name] = {"scale": self.stacked(layer + f"self_attn.{name}.weight", n_layers)}
        mlp = {name: self.stacked_linear(layer + f"mlp.{name}_proj", n_layers) for name in ("gate", "up", "down")}
        return attn, mlp

    def unused(self) -> list[str]:
        return sorted(
            name for name in self._tensors
            if name not in self._used and not any(name.endswith(suffix) for suffix in self._ignored)
        )
