"""Gemma 3 text decoders (gemma3_text): the 270M and 1B checkpoints, and the text tower's math generally.

Differences from Llama: embeddings scaled by sqrt(d_model); RMSNorm multipliers are (1 + w); q/k
RMSNorm per head; norms both before and after attention and MLP ("sandwich"); GeGLU MLP with tanh
GELU; layers alternate sliding-window (local RoPE base) and global attention (global RoPE base).
"""

from __future__ import annotations

import math

from flax import nnx

from distprompt_jax.checkpoints import gguf_mapping
from distprompt_jax.checkpoints.gguf_mapping import (
    GatedDecoderLayout,
    GGUFMetadata,
    TensorSpec,
    TensorTable,
)
from distprompt_jax.models import hf_config
from distprompt_jax.models.config import ModelConfig, RopeSpec, UnsupportedConfigError
from distprompt_jax.models.family import Family, GGUFArchitecture, register
from distprompt_jax.models.layers import Attention, GatedMLP, RMSNorm

MODEL_TYPES = ("gemma3_text",)
_MULTIMODAL_REFUSAL = (
    "multimodal Gemma 3 checkpoints (model_type 'gemma3') are not supported; use a text-only "
    "gemma3_text checkpoint such as gemma-3-270m or gemma-3-1b"
)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, stack: int | None = None):
        norm = dict(eps=cfg.norm_eps, offset=1.0, dtype=dtype, stack=stack)
        self.attn_norm = RMSNorm(cfg.d_model, **norm)
        self.attn = Attention(cfg, norm_offset=1.0, dtype=dtype, stack=stack)
        self.post_attn_norm = RMSNorm(cfg.d_model, **norm)
        self.mlp_norm = RMSNorm(cfg.d_model, **norm)
        self.mlp = GatedMLP(cfg, dtype=dtype, stack=stack)
        self.post_mlp_norm = RMSNorm(cfg.d_model, **norm)

    def __call__(self, x, *, inv_freq, window, past=None):
        attn, kv = self.attn(self.attn_norm(x), inv_freq=inv_freq, window=window, past=past)
        x = x + self.post_attn_norm(attn)
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x))), kv


def final_norm(cfg: ModelConfig, dtype) -> nnx.Module:
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps, offset=1.0, dtype=dtype)


def _layer_types(cfg: hf_config.HFConfig, n_layers: int) -> list[str]:
    layer_types = cfg.get("layer_types", None)
    if layer_types is None:
        # transformers v4 configs give the period of the pattern instead: every k-th layer is global.
        period = cfg.get("sliding_window_pattern", None) or cfg.get("_sliding_window_pattern", 6)
        layer_types = [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)
        ]
    cfg.ignore("sliding_window_pattern", "_sliding_window_pattern")
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown or len(layer_types) != n_layers:
        raise UnsupportedConfigError(f"unsupported layer_types {layer_types!r}")
    return list(layer_types)


def config_from_hf(raw: dict) -> ModelConfig:
    cfg = hf_config.HFConfig(raw)
    cfg.require("model_type")  # gemma3_text; the multimodal 'gemma3' is refused at registration
    cfg.expect("hidden_activation", "gelu_pytorch_tanh")
    cfg.expect("use_bidirectional_attention", False)
    # Gemma's head_dim is not hidden/heads (HF's default is 256), so the config must state it.
    sizes = {**hf_config.decoder_sizes(cfg), "head_dim": cfg.require("head_dim")}
    layer_types = _layer_types(cfg, sizes["n_layers"])
    window = cfg.require("sliding_window")
    if cfg.raw.get("rope_parameters") is not None:
        local_rope = hf_config.rope_spec(cfg, "sliding_attention")
        global_rope = hf_config.rope_spec(cfg, "full_attention")
    else:  # transformers v4: a separate local base, and rope_scaling applies to global layers only
        local_rope = RopeSpec(theta=float(cfg.get("rope_local_base_freq", 10000.0)))
        global_rope = hf_config.rope_spec(cfg)
    attention_bias = cfg.get("attention_bias", False)
    result = ModelConfig(
        family="gemma3",
        **sizes,
        activation="gelu_tanh",
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        qkv_bias=attention_bias,
        out_bias=attention_bias,
        qk_norm=True,
        query_scale=cfg.require("query_pre_attn_scalar") ** -0.5,
        attn_logit_softcap=cfg.get("attn_logit_softcapping", None),
        final_logit_softcap=cfg.get("final_logit_softcapping", None),
        embed_scale=math.sqrt(sizes["d_model"]),
        rope=tuple(local_rope if t == "sliding_attention" else global_rope for t in layer_types),
        sliding_window=tuple(window if t == "sliding_attention" else None for t in layer_types),
        max_positions=cfg.get("max_position_embeddings", 32768),
    )
    cfg.check_all_read()
    return result


def params_from_hf(cfg: ModelConfig, tensors: hf_config.TensorSource) -> dict:
    def norm(name: str) -> dict:
        return {"scale": tensors.stacked("model.layers.{i}." + name + ".weight", cfg.n_layers)}

    attn, mlp = tensors.attention_and_gated_mlp(cfg.n_layers, qk_norm=True)
    params = {
        "embed": {"embedding": tensors.take("model.embed_tokens.weight")},
        "layers": {
            "attn_norm": norm("input_layernorm"),
            "attn": attn,
            "post_attn_norm": norm("post_attention_layernorm"),
            "mlp_norm": norm("pre_feedforward_layernorm"),
            "mlp": mlp,
            "post_mlp_norm": norm("post_feedforward_layernorm"),
        },
        "final_norm": {"scale": tensors.take("model.norm.weight")},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = tensors.linear("lm_head")
    return params


# --- GGUF: llama.cpp's `gemma3` architecture ---------------------------------------------------------

# llama.cpp hard-codes Gemma 3's layer pattern (5 sliding-window layers, then 1 global) and the rotary
# base of its sliding-window layers; newer files may state the latter as `rope.freq_base_swa`.
_GGUF_SLIDING_WINDOW_PERIOD = 6
_GGUF_SLIDING_ROPE_THETA = 10000.0
# ... and scales Gemma 3 27B's queries by 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim). It knows
# that model by its layer count.
_GGUF_27B_LAYERS = 62


def _gguf_config(meta: GGUFMetadata, gguf_tensors: TensorTable) -> dict:
    gguf_mapping.refuse_rope_scaling_and_experts(meta)
    config = gguf_mapping.attention_sizes(meta)
    n_layers = int(meta.require("block_count"))
    sliding_theta = gguf_mapping.float32(meta.get("rope.freq_base_swa", _GGUF_SLIDING_ROPE_THETA))
    query_scalar = config["hidden_size"] // config["num_attention_heads"]
    attention_bias = gguf_mapping.has_bias(gguf_tensors, "attn_q")
    return config | {
        "intermediate_size": int(meta.require("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "max_position_embeddings": int(meta.require("context_length")),
        "rms_norm_eps": gguf_mapping.float32(meta.require("attention.layer_norm_rms_epsilon")),
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_scalar if n_layers == _GGUF_27B_LAYERS else config["head_dim"],
        "sliding_window": int(meta.require("attention.sliding_window")),
        "layer_types": [
            "full_attention" if (i + 1) % _GGUF_SLIDING_WINDOW_PERIOD == 0 else "sliding_attention"
            for i in range(n_layers)
        ],
        "rope_parameters": {
            "full_attention": {
                "rope_type": "default", "rope_theta": gguf_mapping.float32(meta.require("rope.freq_base")),
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": sliding_theta},
        },
        "attention_bias": attention_bias,
        # Stated, since a config class default is one checkpoint's value; the file would carry
        # `{arch}.attn_logit_softcapping` / `final_logit_softcapping` otherwise, which are refused.
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }


def _gguf_tensors(c: dict) -> list[TensorSpec]:
    hidden = c["hidden_size"]
    norm = gguf_mapping.subtract_one  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w
    bias = c.get("attention_bias", False)
    layout = GatedDecoderLayout(norm=norm, qkv_bias=bias, out_bias=bias, mlp_bias=c.get("mlp_bias", False),
                                qk_norm=True)

    def layer_norms(blk: str, layer: str) -> list[TensorSpec]:  # a sandwich around attention and MLP
        return [
            TensorSpec(f"{blk}.{gguf_name}.weight", f"{layer}.{hf_name}.weight", (hidden,), norm)
            for gguf_name, hf_name in [
                ("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
            ]
        ]

    return gguf_mapping.gated_decoder_tensors(c, layout, layer_norms)


FAMILY = register(Family(
    name="gemma3",
    model_types=MODEL_TYPES,
    block=Block,
    final_norm=final_norm,
    config_from_hf=config_from_hf,
    params_from_hf=params_from_hf,
    gguf=(GGUFArchitecture("gemma3", "gemma3_text", "Gemma3ForCausalLM", _gguf_config, _gguf_tensors),),
    refused_model_types={"gemma3": _MULTIMODAL_REFUSAL},
))
