"""Model families and the translation of HF checkpoints into them."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

# Each family module registers its Family when imported.
from distprompt_jax.models import gemma3, gpt2, llama  # noqa: F401
from distprompt_jax.models.config import ModelConfig, RopeSpec, UnsupportedConfigError
from distprompt_jax.models.decoder import DecoderLM
from distprompt_jax.models.family import (
    Family,
    families,
    family_for_model_type,
    get_family,
    supported_model_types,
)
from distprompt_jax.models.hf_config import TensorSource
from distprompt_jax.models.kv_cache import KVCache
from distprompt_jax.models.layers import NormSpec

__all__ = [
    "DecoderLM",
    "Family",
    "KVCache",
    "ModelConfig",
    "NormSpec",
    "RopeSpec",
    "UnsupportedConfigError",
    "abstract_params",
    "config_from_hf",
    "families",
    "get_family",
    "params_from_hf",
    "supported_model_types",
]

# Buffers some HF checkpoints save that are not parameters (GPT-2's causal-mask buffers, rotary caches).
_NON_PARAMETER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def config_from_hf(raw: Mapping) -> ModelConfig:
    """Our ModelConfig for a HF `config.json` dict; refuses what we do not implement, by name."""
    return family_for_model_type(raw.get("model_type")).config_from_hf(dict(raw))


def abstract_params(cfg: ModelConfig, dtype=np.float32):
    """Shapes and dtypes of the parameter pytree, without allocating it."""
    model = nnx.eval_shape(lambda: DecoderLM(cfg, dtype=dtype))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Our parameter pytree (numpy, float32) from HF-named tensors, checked against the model's shapes."""
    source = TensorSource(tensors, ignored=_NON_PARAMETER_SUFFIXES)
    try:
        params = get_family(cfg.family).params_from_hf(cfg, source)
    except KeyError as err:
        raise ValueError(f"checkpoint does not match its config: {err.args[0]}") from None
    unused = source.unused()
    if unused:
        raise ValueError(f"checkpoint has tensors this {cfg.family} config does not use: {unused[:8]}")
    _check_shapes(params, abstract_params(cfg))
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def _check_shapes(params: dict, expected: dict):
    got = {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    problems = [f"{k}: missing" for k in want.keys() - got.keys()]
    problems += [f"{k}: not a parameter of this model" for k in got.keys() - want.keys()]
    problems += [f"{k}: shape {got[k]} != expected {want[k]}" for k in want.keys() & got.keys() if got[k] != want[k]]
    if problems:
        raise ValueError("checkpoint tensors do not fit the model: " + "; ".join(sorted(problems)[:8]))
