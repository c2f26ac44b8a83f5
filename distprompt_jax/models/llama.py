"""Llama-style decoders: Llama 2/3, SmolLM2, TinyLlama, Mistral-free Qwen2 and Qwen3, chosen by config.

Pre-norm blocks: x + attn(rms(x)), then x + mlp(rms(x)); SwiGLU MLP; RoPE; optional q/k/v biases
(Qwen2) and per-head q/k RMSNorm (Qwen3).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from distprompt_jax.checkpoints import gguf_mapping
from distprompt_jax.checkpoints.gguf_mapping import (
    GatedDecoderLayout,
    GGUFMetadata,
    TensorSpec,
    TensorTable,
)
from distprompt_jax.models import hf_config
from distprompt_jax.models.config import ModelConfig, UnsupportedConfigError
from distprompt_jax.models.family import Family, GGUFArchitecture, register
from distprompt_jax.models.layers import Attention, GatedMLP, RMSNorm

MODEL_TYPES = ("llama", "qwen2", "qwen3")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, stack: int | None = None):
        norm = dict(eps=cfg.norm_eps, offset=0.0, dtype=dtype, stack=stack)
        self.attn_norm = RMSNorm(cfg.d_model, **norm)
        self.attn = Attention(cfg, norm_offset=0.0, dtype=dtype, stack=stack)
        self.mlp_norm = RMSNorm(cfg.d_model, **norm)
        self.mlp = GatedMLP(cfg, dtype=dtype, stack=stack)

    def __call__(self, x, *, inv_freq, window, past=None):
        attn, kv = self.attn(self.attn_norm(x), inv_freq=inv_freq, window=window, past=past)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), kv


def final_norm(cfg: ModelConfig, dtype) -> nnx.Module:
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps, offset=0.0, dtype=dtype)


def config_from_hf(raw: dict) -> ModelConfig:
    cfg = hf_config.HFConfig(raw)
    model_type = cfg.require("model_type")
    cfg.expect("hidden_act", "silu")
    cfg.expect("pretraining_tp", 1)
    if model_type in ("qwen2", "qwen3"):
        cfg.expect("use_sliding_window", False)
        cfg.ignore("max_window_layers", "sliding_window")
        layer_types = set(cfg.get("layer_types", ["full_attention"]))
        if layer_types != {"full_attention"}:
            raise UnsupportedConfigError(f"unsupported layer_types {sorted(layer_types)}: only full attention")
    attention_bias = cfg.get("attention_bias", False)
    sizes = hf_config.decoder_sizes(cfg)
    result = ModelConfig(
        family="llama",
        **sizes,
        activation="silu",
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        # Qwen2 always has q/k/v biases and no output bias; Llama/Qwen3 follow attention_bias.
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=cfg.get("mlp_bias", False),
        qk_norm=model_type == "qwen3",
        rope=(hf_config.rope_spec(cfg),) * sizes["n_layers"],
        max_positions=cfg.get("max_position_embeddings", 8192),
    )
    cfg.check_all_read()
    return result


def params_from_hf(cfg: ModelConfig, tensors: hf_config.TensorSource) -> dict:
    layer = "model.layers.{i}."
    attn, mlp = tensors.attention_and_gated_mlp(cfg.n_layers, qk_norm=cfg.qk_norm)
    params = {
        "embed": {"embedding": tensors.take("model.embed_tokens.weight")},
        "layers": {
            "attn_norm": {"scale": tensors.stacked(layer + "input_layernorm.weight", cfg.n_layers)},
            "attn": attn,
            "mlp_norm": {"scale": tensors.stacked(layer + "post_attention_layernorm.weight", cfg.n_layers)},
            "mlp": mlp,
        },
        "final_norm": {"scale": tensors.take("model.norm.weight")},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = tensors.linear("lm_head")
    return params


# --- GGUF: llama.cpp's `llama`, `qwen2` and `qwen3` architectures ------------------------------------


def _gguf_config(meta: GGUFMetadata, gguf_tensors: TensorTable) -> dict:
    gguf_mapping.refuse_rope_scaling_and_experts(meta)
    config = gguf_mapping.attention_sizes(meta) | {
        "intermediate_size": int(meta.require("feed_forward_length")),
        "num_hidden_layers": int(meta.require("block_count")),
        "max_position_embeddings": int(meta.require("context_length")),
        "rms_norm_eps": gguf_mapping.float32(meta.require("attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "rope_parameters": {
            "rope_type": "default", "rope_theta": gguf_mapping.float32(meta.get("rope.freq_base", 10000.0)),
        },
    }
    if meta.architecture == "llama":
        config["attention_bias"] = gguf_mapping.has_bias(gguf_tensors, "attn_q")
        config["mlp_bias"] = gguf_mapping.has_bias(gguf_tensors, "ffn_up")
    elif meta.architecture == "qwen3":
        config["attention_bias"] = gguf_mapping.has_bias(gguf_tensors, "attn_q")
    # qwen2 always has q/k/v biases and no flag for them.
    return config


def _gguf_tensors(c: dict) -> list[TensorSpec]:
    model_type, hidden = c["model_type"], c["hidden_size"]
    attention_bias = c.get("attention_bias", False)
    layout = GatedDecoderLayout(
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=model_type != "qwen2" and attention_bias,  # HF's flag covers o_proj too, except in Qwen2
        mlp_bias=c.get("mlp_bias", False),
        qk_norm=model_type == "qwen3",
    )
    if model_type == "llama":  # llama.cpp permutes q/k rows of `llama` files only
        layout = dataclasses.replace(
            layout,
            q_order=gguf_mapping.unpermute_rows(c["num_attention_heads"]),
            k_order=gguf_mapping.unpermute_rows(c["num_key_value_heads"]),
        )

    def layer_norms(blk: str, layer: str) -> list[TensorSpec]:
        return [
            TensorSpec(f"{blk}.attn_norm.weight", f"{layer}.input_layernorm.weight", (hidden,)),
            TensorSpec(f"{blk}.ffn_norm.weight", f"{layer}.post_attention_layernorm.weight", (hidden,)),
        ]

    return gguf_mapping.gated_decoder_tensors(c, layout, layer_norms)


FAMILY = register(Family(
    name="llama",
    model_types=MODEL_TYPES,
    block=Block,
    final_norm=final_norm,
    config_from_hf=config_from_hf,
    params_from_hf=params_from_hf,
    gguf=(
        GGUFArchitecture("llama", "llama", "LlamaForCausalLM", _gguf_config, _gguf_tensors),
        GGUFArchitecture("qwen2", "qwen2", "Qwen2ForCausalLM", _gguf_config, _gguf_tensors),
        GGUFArchitecture("qwen3", "qwen3", "Qwen3ForCausalLM", _gguf_config, _gguf_tensors),
    ),
))
