"""GPT-2: learned absolute positions, LayerNorm, biases everywhere, GELU MLP, tied unembedding.

HF stores GPT-2's projections as Conv1D, already [in, out], with q/k/v fused in `c_attn`.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from distprompt_jax.checkpoints import gguf_mapping
from distprompt_jax.checkpoints.gguf_mapping import (
    GGUFMetadata,
    TensorSpec,
    TensorTable,
)
from distprompt_jax.models import hf_config
from distprompt_jax.models.config import ModelConfig
from distprompt_jax.models.family import Family, GGUFArchitecture, register
from distprompt_jax.models.layers import MLP, Attention, LayerNorm

MODEL_TYPES = ("gpt2",)
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, stack: int | None = None):
        self.attn_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        self.attn = Attention(cfg, norm_offset=0.0, dtype=dtype, stack=stack)
        self.mlp_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, stack=stack)
        self.mlp = MLP(cfg, dtype=dtype, stack=stack)

    def __call__(self, x, *, inv_freq, window, past=None):
        attn, kv = self.attn(self.attn_norm(x), inv_freq=inv_freq, window=window, past=past)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), kv


def final_norm(cfg: ModelConfig, dtype) -> nnx.Module:
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)


def config_from_hf(raw: dict) -> ModelConfig:
    cfg = hf_config.HFConfig(raw)
    cfg.require("model_type")
    act = cfg.expect("activation_function", *_ACTIVATIONS)
    cfg.expect("scale_attn_weights", True)
    cfg.expect("scale_attn_by_inverse_layer_idx", False)
    # Only changes where attention is upcast; float32 params compute the same.
    cfg.ignore("reorder_and_upcast_attn")
    d_model = cfg.require("n_embd")
    n_heads = cfg.require("n_head")
    result = ModelConfig(
        family="gpt2",
        vocab_size=cfg.require("vocab_size"),
        d_model=d_model,
        n_layers=cfg.require("n_layer"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        d_ff=cfg.get("n_inner", 4 * d_model),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        activation=_ACTIVATIONS[act],
        tie_embeddings=cfg.get("tie_word_embeddings", True),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        max_positions=cfg.require("n_positions"),
        bos_token_id=cfg.get("bos_token_id", None),
        eos_token_id=hf_config.first_id(cfg.get("eos_token_id", None)),
    )
    cfg.check_all_read()
    return result


def params_from_hf(cfg: ModelConfig, tensors: hf_config.TensorSource) -> dict:
    # The original OpenAI-converted checkpoints lack the `transformer.` prefix.
    prefix = "transformer." if tensors.has("transformer.wte.weight") else ""
    layer = prefix + "h.{i}."
    n = cfg.n_layers

    def norm(name: str) -> dict:
        return {"scale": tensors.stacked(layer + name + ".weight", n),
                "bias": tensors.stacked(layer + name + ".bias", n)}

    fused = tensors.stacked_linear(layer + "attn.c_attn", n, transpose=False)
    q_kernel, k_kernel, v_kernel = np.split(fused["kernel"], 3, axis=-1)
    q_bias, k_bias, v_bias = np.split(fused["bias"], 3, axis=-1)
    params = {
        "embed": {"embedding": tensors.take(prefix + "wte.weight")},
        "pos_embed": {"embedding": tensors.take(prefix + "wpe.weight")},
        "layers": {
            "attn_norm": norm("ln_1"),
            "attn": {
                "q": {"kernel": q_kernel, "bias": q_bias},
                "k": {"kernel": k_kernel, "bias": k_bias},
                "v": {"kernel": v_kernel, "bias": v_bias},
                "o": tensors.stacked_linear(layer + "attn.c_proj", n, transpose=False),
            },
            "mlp_norm": norm("ln_2"),
            "mlp": {
                "fc": tensors.stacked_linear(layer + "mlp.c_fc", n, transpose=False),
                "proj": tensors.stacked_linear(layer + "mlp.c_proj", n, transpose=False),
            },
        },
        "final_norm": {
            "scale": tensors.take(prefix + "ln_f.weight"),
            "bias": tensors.take(prefix + "ln_f.bias"),
        },
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = tensors.linear("lm_head")
    return params


# --- GGUF: llama.cpp's `gpt2` architecture -----------------------------------------------------------


def _gguf_config(meta: GGUFMetadata, gguf_tensors: TensorTable) -> dict:
    n_embd = int(meta.require("embedding_length"))
    n_head = int(meta.require("attention.head_count"))
    meta.expect("attention.head_count_kv", (n_head,), "GPT-2 has no grouped-query attention")
    return {
        "n_embd": n_embd,
        "n_layer": int(meta.require("block_count")),
        "n_head": n_head,
        "n_positions": int(meta.require("context_length")),
        "n_inner": int(meta.get("feed_forward_length", 4 * n_embd)),
        "layer_norm_epsilon": gguf_mapping.float32(meta.require("attention.layer_norm_epsilon")),
        # llama.cpp's GELU is the tanh approximation, which HF's GPT-2 calls gelu_new.
        "activation_function": "gelu_new",
    }


def _gguf_tensors(c: dict) -> list[TensorSpec]:
    d, ff, vocab = c["n_embd"], c["n_inner"], c["vocab_size"]
    specs = [
        TensorSpec("token_embd.weight", "transformer.wte.weight", (vocab, d)),
        TensorSpec("position_embd.weight", "transformer.wpe.weight", (c["n_positions"], d)),
        TensorSpec("output_norm.weight", "transformer.ln_f.weight", (d,)),
        TensorSpec("output_norm.bias", "transformer.ln_f.bias", (d,)),
    ]
    if not c["tie_word_embeddings"]:
        specs.append(TensorSpec("output.weight", "lm_head.weight", (vocab, d)))
    for i in range(c["n_layer"]):
        blk, layer = f"blk.{i}", f"transformer.h.{i}"
        # HF's c_attn is fused like llama.cpp's attn_qkv: q, k, v stacked along the output features.
        # llama.cpp stores every matrix [out, in]; HF's Conv1D holds [in, out].
        conv1d = [("attn_qkv", "attn.c_attn", d, 3 * d), ("attn_output", "attn.c_proj", d, d),
                  ("ffn_up", "mlp.c_fc", d, ff), ("ffn_down", "mlp.c_proj", ff, d)]
        for leaf, hf_leaf, n_in, n_out in conv1d:
            specs += [
                TensorSpec(f"{blk}.{leaf}.weight", f"{layer}.{hf_leaf}.weight", (n_in, n_out),
                           gguf_mapping.transpose, transposed=True),
                TensorSpec(f"{blk}.{leaf}.bias", f"{layer}.{hf_leaf}.bias", (n_out,)),
            ]
        for leaf, hf_leaf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            specs += [
                TensorSpec(f"{blk}.{leaf}.weight", f"{layer}.{hf_leaf}.weight", (d,)),
                TensorSpec(f"{blk}.{leaf}.bias", f"{layer}.{hf_leaf}.bias", (d,)),
            ]
    return specs


FAMILY = register(Family(
    name="gpt2",
    model_types=MODEL_TYPES,
    block=Block,
    final_norm=final_norm,
    config_from_hf=config_from_hf,
    params_from_hf=params_from_hf,
    gguf=(GGUFArchitecture("gpt2", "gpt2", "GPT2LMHeadModel", _gguf_config, _gguf_tensors),),
))
