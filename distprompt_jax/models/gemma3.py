"""Gemma 3 text decoders (gemma3_text): the 270M and 1B checkpoints, and the text tower's math generally.

Differences from Llama: embeddings scaled by sqrt(d_model); RMSNorm multipliers are (1 + w); q/k
RMSNorm per head; norms both before and after attention and MLP ("sandwich"); GeGLU MLP with tanh
GELU; layers alternate sliding-window (local RoPE base) and global attention (global RoPE base).
"""

from __future__ import annotations

import math

from flax import nnx

from distprompt_jax.models import hf_config
from distprompt_jax.models.config import ModelConfig, RopeSpec, UnsupportedConfigError
from distprompt_jax.models.layers import Attention, GatedMLP, RMSNorm

MODEL_TYPES = ("gemma3_text",)


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
    if cfg.require("model_type") == "gemma3":
        raise UnsupportedConfigError(
            "multimodal Gemma 3 checkpoints (model_type 'gemma3') are not supported; use a text-only "
            "gemma3_text checkpoint such as gemma-3-270m or gemma-3-1b"
        )
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
