"""Our JAX models against PyTorch transformers on tiny random-init checkpoints, and the LM interface."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, TINY_VOCAB, kl_rows, torch_last_logits

from distprompt_jax import load_model
from distprompt_jax.lm import abstract_language_model
from distprompt_jax.models import UnsupportedConfigError, config_from_hf

PROMPT_LENGTHS = (1, 2, 7, 12)


def _prompts(length: int, n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed + length).randint(0, TINY_VOCAB, size=(n, length))


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_transformers(family, tiny_hf_dir):
    hf_model, path = tiny_hf_dir(family)
    lm = load_model(path)
    batched_logits = jax.jit(jax.vmap(lm.logits, in_axes=(None, 0)))
    for length in PROMPT_LENGTHS:
        ids = _prompts(length)
        ref = torch_last_logits(hf_model, ids)
        ours = np.asarray(batched_logits(lm.params, lm.embed(lm.params, ids)))
        assert ours.dtype == np.float32 and ours.shape == (len(ids), TINY_VOCAB)
        assert kl_rows(ref, ours).max() <= 1e-6, (family, length)
        np.testing.assert_array_equal(ref.argmax(-1), ours.argmax(-1))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_vmap_equals_python_loop(family, tiny_hf_dir):
    lm = load_model(tiny_hf_dir(family)[1])
    x = lm.embed(lm.params, _prompts(6, n=8))
    batched = jax.jit(jax.vmap(lm.logits, in_axes=(None, 0)))(lm.params, x)
    single = jax.jit(lm.logits)
    looped = np.stack([single(lm.params, xi) for xi in x])
    np.testing.assert_allclose(np.asarray(batched), looped, atol=1e-5, rtol=1e-5)
    # Leading batch axes are also mapped by logits itself.
    np.testing.assert_allclose(np.asarray(lm.logits(lm.params, x)), looped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_gradients_flow_to_prompt_embeddings(family, tiny_hf_dir):
    lm = load_model(tiny_hf_dir(family)[1])
    x = lm.embed(lm.params, _prompts(5, n=1))[0]
    grad = jax.grad(lambda x: jax.nn.log_softmax(lm.logits(lm.params, x))[3])(x)
    assert grad.shape == x.shape and np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_layer_split_and_unembedding_compose_to_logits(family, tiny_hf_dir):
    lm = load_model(tiny_hf_dir(family)[1])
    x = lm.embed(lm.params, _prompts(6, n=1))[0]
    full = lm.logits(lm.params, x)
    for k in range(lm.n_layers + 1):
        h = lm.run_layers(lm.params, lm.input_stream(lm.params, x), 0, k)
        np.testing.assert_allclose(lm.logits_from_layer(lm.params, h, k), full, atol=1e-5)
    h_final = lm.run_layers(lm.params, lm.input_stream(lm.params, x))
    w, b = lm.unembedding(lm.params)
    assert w.shape == (lm.vocab_size, lm.d_model) and b.shape == (lm.vocab_size,)
    np.testing.assert_allclose(w @ lm.final_norm(lm.params, h_final[-1]) + b, full, atol=1e-5)
    np.testing.assert_allclose(lm.embedding_matrix(lm.params)[7], lm.embed(lm.params, jnp.array([7]))[0])


def test_gemma_embedding_includes_scale(tiny_hf_dir):
    hf_model, path = tiny_hf_dir("gemma3")
    lm = load_model(path)
    table = hf_model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(lm.embed(lm.params, jnp.array([5])), table[[5]] * np.sqrt(64), rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bfloat16_params_stay_close_to_float32(family, tiny_hf_dir):
    path = tiny_hf_dir(family)[1]
    lm32, lm16 = load_model(path), load_model(path, dtype="bfloat16")
    assert jax.tree.leaves(lm16.params)[0].dtype == jnp.bfloat16
    x = lm32.embed(lm32.params, _prompts(8, n=4))
    z32 = lm32.logits(lm32.params, x)
    z16 = lm16.logits(lm16.params, x.astype(jnp.bfloat16))
    assert z16.dtype == jnp.float32
    # bfloat16 keeps 8 mantissa bits: the next-token distribution moves by well under 1e-2 nats.
    assert kl_rows(z32, z16).max() < 1e-2


# Published sizes of three real configs, checked without allocating them.
BIG_CONFIGS = {
    "llama-3.2-1b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "hidden_act": "silu", "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "qwen3-0.6b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 40960,
        "hidden_act": "silu", "rope_theta": 1000000.0, "attention_bias": False, "use_sliding_window": False,
    },
    "gemma-3-1b": {
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
        "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768,
    },
}


@pytest.mark.parametrize("name", BIG_CONFIGS)
def test_big_configs_by_eval_shape(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = BIG_CONFIGS[name]
    lm = abstract_language_model(config_from_hf(raw), name=name)
    n_ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(lm.params))
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw))
    n_ref = sum(p.numel() for p in reference.parameters())
    assert n_ours == n_ref
    x = jax.ShapeDtypeStruct((10, lm.d_model), jnp.float32)
    batch = jax.ShapeDtypeStruct((4, 10, lm.d_model), jnp.float32)
    out = jax.eval_shape(jax.vmap(lm.logits, in_axes=(None, 0)), lm.params, batch)
    assert out.shape == (4, lm.vocab_size) and out.dtype == jnp.float32
    assert jax.eval_shape(lm.logits, lm.params, x).shape == (lm.vocab_size,)


# --- bad input ---------------------------------------------------------------------------------------

def test_unknown_registry_name_names_the_choices():
    with pytest.raises(FileNotFoundError, match="neither a registered model.*smollm2-135m"):
        load_model("smollm3-9000b")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_config_attribute_is_named(tiny_hf_dir, tmp_path):
    _, path = tiny_hf_dir("llama")
    raw = json.loads((path / "config.json").read_text())
    for key, value, message in [
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type='yarn'"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("fancy_new_attention", True, "fancy_new_attention"),
    ]:
        with pytest.raises(UnsupportedConfigError, match=message):
            config_from_hf({**raw, key: value})
    with pytest.raises(UnsupportedConfigError, match="model_type 'mamba'"):
        config_from_hf({**raw, "model_type": "mamba"})


def test_checkpoint_that_does_not_fit_its_config(tiny_hf_dir, tmp_path):
    _, path = tiny_hf_dir("qwen2")
    raw = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "intermediate_size": 128}))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"shape \(3, 64, 96\) != expected \(3, 64, 128\)"):
        load_model(tmp_path)


def test_prompt_embeddings_of_wrong_width_or_rank(tiny_hf_dir):
    lm = load_model(tiny_hf_dir("llama")[1])
    with pytest.raises(ValueError, match="width 32, but .* d_model 64"):
        lm.logits(lm.params, jnp.zeros((5, 32)))
    with pytest.raises(ValueError, match=r"must be \[..., L, d\]"):
        lm.logits(lm.params, jnp.zeros((64,)))
    with pytest.raises(ValueError, match="empty"):
        lm.logits(lm.params, jnp.zeros((0, 64)))
    with pytest.raises(TypeError, match="must be integers"):
        lm.embed(lm.params, jnp.zeros((3,)))
