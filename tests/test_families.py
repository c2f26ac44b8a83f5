"""Model families are registered by their own modules, and everything else finds them there."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import FAMILIES

from distprompt_jax import load_model
from distprompt_jax.checkpoints.gguf import supported_architectures
from distprompt_jax.models import (
    UnsupportedConfigError,
    config_from_hf,
    families,
    get_family,
    supported_model_types,
)
from distprompt_jax.models.family import (
    family_for_model_type,
    gguf_architectures,
    register,
)

# The final norm each family's checkpoints describe: (kind, offset).
EXPECTED_NORMS = {
    "llama": ("rms", 0.0), "qwen2": ("rms", 0.0), "qwen3": ("rms", 0.0), "gemma3": ("rms", 1.0), "gpt2": ("layer", 0.0),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_parameters_state_what_the_final_norm_computes(family, tiny_hf_dir):
    lm = load_model(tiny_hf_dir(family)[1])
    spec = lm.final_norm_parameters(lm.params)
    assert (spec.kind, spec.offset) == EXPECTED_NORMS[family]
    assert spec.eps == lm.config.norm_eps and spec.scale.shape == spec.bias.shape == (lm.d_model,)
    # The formula the spec states, in float64, against the model's own final norm.
    h = np.random.RandomState(0).standard_normal((5, lm.d_model)) * 3 + 1
    centred = h - h.mean(-1, keepdims=True) if spec.kind == "layer" else h
    normalized = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + spec.eps)
    stated = np.asarray(spec.bias, np.float64) + (spec.offset + np.asarray(spec.scale, np.float64)) * normalized
    np.testing.assert_allclose(stated, lm.final_norm(lm.params, h.astype(np.float32)), atol=1e-5, rtol=1e-5)
    # a pytree, so it can be read inside jit
    assert jax.jit(lm.final_norm_parameters)(lm.params).kind == spec.kind


def test_every_model_type_and_gguf_architecture_has_one_family():
    assert [f.name for f in families()] == ["gemma3", "gpt2", "llama"]
    assert supported_model_types() == ["gemma3_text", "gpt2", "llama", "qwen2", "qwen3"]
    assert supported_architectures() == ("gemma3", "gpt2", "llama", "qwen2", "qwen3")
    for name, arch in gguf_architectures().items():
        assert arch.model_type in family_for_model_type(arch.model_type).model_types, name
    assert get_family("gemma3").block.__module__ == "distprompt_jax.models.gemma3"


def test_unsupported_model_types_and_families_are_refused_by_name():
    with pytest.raises(UnsupportedConfigError, match="multimodal Gemma 3 .* use a text-only gemma3_text"):
        config_from_hf({"model_type": "gemma3"})
    with pytest.raises(UnsupportedConfigError, match=r"model_type 'mamba'; supported: \['gemma3_text'"):
        config_from_hf({"model_type": "mamba"})
    with pytest.raises(UnsupportedConfigError, match="unknown model family 'mamba'"):
        get_family("mamba")


def test_a_family_cannot_claim_what_another_registered():
    llama = get_family("llama")
    with pytest.raises(ValueError, match="'llama' is already registered"):
        register(llama)
    with pytest.raises(ValueError, match=r"claims \['qwen2'\]"):
        register(dataclasses.replace(llama, name="other", model_types=("qwen2",), gguf=()))
    with pytest.raises(ValueError, match=r"claims \['qwen3'\]"):  # a GGUF architecture name
        register(dataclasses.replace(llama, name="other", model_types=("other",), gguf=llama.gguf[2:]))
    assert [f.name for f in families()] == ["gemma3", "gpt2", "llama"]  # refusals register nothing


def test_a_family_registered_in_its_own_module_is_found_by_every_reader(tmp_path):
    """One home: a new family, defined in one place, reaches config_from_hf, the decoder and the GGUF reader."""
    script = textwrap.dedent(
        """
        import dataclasses, json, sys
        import jax, jax.numpy as jnp
        from distprompt_jax.checkpoints.gguf import supported_architectures
        from distprompt_jax.lm import abstract_language_model
        from distprompt_jax.models import config_from_hf, llama
        from distprompt_jax.models.family import Family, GGUFArchitecture, register

        def toy_config(raw):  # Llama's math under a family name of its own
            return dataclasses.replace(llama.config_from_hf({**raw, "model_type": "llama"}), family="toy")

        register(Family(
            name="toy", model_types=("toy_lm",), block=llama.Block, final_norm=llama.final_norm,
            config_from_hf=toy_config, params_from_hf=llama.params_from_hf,
            gguf=(GGUFArchitecture("toy", "toy_lm", "ToyForCausalLM", lambda meta, t: {}, lambda c: []),),
        ))
        cfg = config_from_hf(json.loads(sys.argv[1]))
        lm = abstract_language_model(cfg)
        out = jax.eval_shape(lm.logits, lm.params, jax.ShapeDtypeStruct((3, cfg.d_model), jnp.float32))
        print(json.dumps({"family": cfg.family, "logits": list(out.shape), "gguf": "toy" in supported_architectures(),
                          "norm": jax.eval_shape(lm.final_norm_parameters, lm.params).kind}))
        """
    )
    raw = {"model_type": "toy_lm", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e4}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(raw)], capture_output=True, text=True,
                            env=os.environ.copy(), check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"family": "toy", "logits": [50], "gguf": True, "norm": "rms"}
