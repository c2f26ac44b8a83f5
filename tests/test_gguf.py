"""distprompt_jax.checkpoints.gguf: a GGUF file read back as the equivalent HF checkpoint.

Tiny random HF models of every supported family are written as GGUF by `gguf_writer` (llama.cpp's
conventions, re-done independently of the reader) and read back; transformers' own GGUF loader serves
as an independent second opinion on the conventions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
from conftest import kl_rows, torch_last_logits
from gguf_writer import tiny_byte_level_bpe, write_gguf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distprompt_jax import load_model
from distprompt_jax.checkpoints.cache import CACHE_ENV
from distprompt_jax.checkpoints.gguf import GGUFError, gguf_architecture, read_gguf

TINY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
    # head_dim != hidden/heads, stated as attention.key_length. (128 because transformers' GGUF loader
    # ignores that key for qwen3 and falls back to Qwen3Config's default head_dim, 128.)
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=128, tie_word_embeddings=False),
    # 7 layers, so that layer 5 is the one full-attention layer of Gemma 3's 5:1 pattern.
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                        tie_word_embeddings=True),
    # transformers' GGUF loader reads neither n_positions nor n_inner from the file, so both stay at
    # GPT2Config's defaults (1024, 4 * n_embd) for the comparison with it to be possible.
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=True),
}
FAMILIES = list(TINY_CONFIGS)
COMMON_CONFIG = dict(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Which fixtures ask for a BOS token, so that both tokenizer post-processors get tested.
ADDS_BOS = {"llama": True, "qwen2": False, "qwen3": False, "gemma3_text": True, "gpt2": False}
TEXTS = ["The capital of France is", "Hello, world! 123 4567", "  two spaces,\ttab\nnewline",
         "caf\u00e9 <|eos|> \u65e5\u672c"]


@pytest.fixture(scope="module")
def bpe():
    return tiny_byte_level_bpe()


def tiny_checkpoint(family: str, vocab_size: int):
    """A HF config and a random state dict for it (norms random too, so Gemma's `1 + w` is visible)."""
    extra = {} if family == "gpt2" else COMMON_CONFIG
    config = AutoConfig.for_model(family, vocab_size=vocab_size, **extra, **TINY_CONFIGS[family])
    shapes = {name: value.shape for name, value in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    return config, {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def write_fixture(directory: Path, family: str, bpe, qtype: str = "F32", **writer_options):
    config, state_dict = tiny_checkpoint(family, bpe.get_vocab_size())
    path = directory / f"tiny-{family}-{qtype}.gguf"
    write_gguf(path, state_dict, config, bpe, qtype, add_bos_token=ADDS_BOS[family], **writer_options)
    return path, config, state_dict


def expected_tensors(config, state_dict) -> dict[str, np.ndarray]:
    """The state dict `read_gguf` should give: numpy, without the tied `lm_head.weight`."""
    return {
        name: value.numpy()
        for name, value in state_dict.items()
        if not (name == "lm_head.weight" and config.tie_word_embeddings)
    }


def size_keys(family: str) -> list[str]:
    if family == "gpt2":
        return ["vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "layer_norm_epsilon"]
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters"]
    if family == "gemma3_text":
        keys += ["sliding_window", "layer_types", "query_pre_attn_scalar"]
    return keys


# --- Round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_gives_the_hf_state_dict_and_config(tmp_path, bpe, family):
    path, config, state_dict = write_fixture(tmp_path, family, bpe)
    hf_config, tensors, _ = read_gguf(path)

    expected = expected_tensors(config, state_dict)
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == np.float32 and tensors[name].shape == value.shape, name
        # exact but for Gemma's norms, which went through float32 `(w + 1) - 1`
        np.testing.assert_allclose(tensors[name], value, rtol=0, atol=1e-6, err_msg=name)

    wanted = config.to_dict()
    if family == "qwen2":  # Qwen2Config has no head_dim; its attention falls back to hidden/heads
        wanted["head_dim"] = config.hidden_size // config.num_attention_heads
    assert hf_config["model_type"] == config.model_type
    assert {key: hf_config[key] for key in size_keys(family)} == {key: wanted[key] for key in size_keys(family)}
    assert hf_config["tie_word_embeddings"] == config.tie_word_embeddings
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (1, 2, 0)
    if family == "gpt2":
        assert hf_config["n_inner"] == 4 * config.n_embd
    json.dumps(hf_config)  # plain Python values, ready for a config.json


@pytest.mark.parametrize("family", FAMILIES)
def test_config_builds_a_transformers_model_with_exactly_these_tensors(tmp_path, bpe, family):
    path, _, _ = write_fixture(tmp_path, family, bpe)
    hf_config, tensors, _ = read_gguf(path)

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    assert type(model).__name__ == hf_config["architectures"][0]
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    if hf_config["tie_word_embeddings"]:
        shapes.pop("lm_head.weight")
    assert shapes == {name: value.shape for name, value in tensors.items()}


@pytest.mark.parametrize("qtype, tolerance", [("Q8_0", 0.01), ("Q4_0", 0.15)])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_weights_dequantize_close_to_the_originals(tmp_path, bpe, family, qtype, tolerance):
    path, config, state_dict = write_fixture(tmp_path, family, bpe, qtype)
    _, tensors, _ = read_gguf(path)
    for name, value in expected_tensors(config, state_dict).items():
        # error relative to the largest weight; a scrambled block or row order would be far off
        error = np.abs(tensors[name] - value).max() / np.abs(value).max()
        assert error <= tolerance, (name, error)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_matches_the_original_and_adds_bos_as_the_file_says(tmp_path, bpe, family):
    path, _, _ = write_fixture(tmp_path, family, bpe)
    _, _, tokenizer = read_gguf(path)

    bos = [1] if ADDS_BOS[family] else []
    for text in TEXTS:
        assert tokenizer(text).input_ids == bos + bpe.encode(text).ids, text
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text.replace("<|eos|>", "")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    # transformers' builder would add GPT-2's default <|endoftext|> past the vocabulary; it is dropped
    assert len(tokenizer) == bpe.get_vocab_size()

    # what distprompt_jax.loading does with it: save it beside the converted weights, load it back
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert [reloaded(text).input_ids for text in TEXTS] == [tokenizer(text).input_ids for text in TEXTS]


# --- Against transformers' own GGUF loader --------------------------------------------------------------
# transformers' loader supports all five families (its legacy `modeling_gguf_pytorch_utils` path); the
# model loading imports torch, which is why `read_gguf` does not use it.


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_tensors_tokens_and_logits_as_transformers_gguf_loader(tmp_path, bpe, family, qtype, monkeypatch):
    path, _, _ = write_fixture(tmp_path, family, bpe, qtype)
    hf_config, tensors, tokenizer = read_gguf(path)

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference_tensors = reference.state_dict()
    if hf_config["tie_word_embeddings"]:
        reference_tensors.pop("lm_head.weight")
    assert set(reference_tensors) == set(tensors)
    for name, value in reference_tensors.items():
        np.testing.assert_allclose(tensors[name], value.numpy(), rtol=0, atol=1e-6, err_msg=name)

    reference_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids, text

    # End to end: load_model's conversion cache and our model against transformers' model of the same file.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    lm = load_model(path)
    ids = np.random.RandomState(0).randint(0, lm.vocab_size, size=(3, 9))
    ours = np.asarray(jax.vmap(lm.logits, in_axes=(None, 0))(lm.params, lm.embed(lm.params, ids)))
    ref = torch_last_logits(reference, ids)
    assert kl_rows(ref, ours).max() <= 1e-6
    np.testing.assert_array_equal(ref.argmax(-1), ours.argmax(-1))


# --- Errors -----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b'{"model_type": "llama"}' + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("cut_to", [lambda size: size // 2, lambda size: 200], ids=["in-half", "in-the-metadata"])
def test_truncated_file(tmp_path, bpe, cut_to):
    path, _, _ = write_fixture(tmp_path, "llama", bpe)
    data = path.read_bytes()
    path.write_bytes(data[: cut_to(len(data))])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(path)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    assert gguf_architecture(path) == "mamba"
    supported = "gemma3, gpt2, llama, qwen2, qwen3"
    with pytest.raises(GGUFError, match=rf"unsupported GGUF architecture 'mamba'; supported: {supported}"):
        read_gguf(path)


def test_shape_mismatch_names_the_tensor(tmp_path, bpe):
    config, state_dict = tiny_checkpoint("qwen2", bpe.get_vocab_size())
    state_dict["model.layers.0.mlp.up_proj.weight"] = state_dict["model.layers.0.mlp.up_proj.weight"][:96]
    path = tmp_path / "bad.gguf"
    write_gguf(path, state_dict, config, bpe)
    with pytest.raises(GGUFError, match=r"shape mismatch for tensor blk\.0\.ffn_up\.weight.*\[96, 64\].*\[128, 64\]"):
        read_gguf(path)


def test_missing_tensor_is_named(tmp_path, bpe):
    config, state_dict = tiny_checkpoint("llama", bpe.get_vocab_size())
    del state_dict["model.layers.1.mlp.down_proj.weight"]
    path = tmp_path / "bad.gguf"
    write_gguf(path, state_dict, config, bpe)
    with pytest.raises(GGUFError, match=r"missing.*blk\.1\.ffn_down\.weight"):
        read_gguf(path)


@pytest.mark.parametrize(
    "family, tensor, message",
    [
        ("llama", "blk.0.ffn_gate_inp.weight", r"no place in the HF model: blk\.0\.ffn_gate_inp\.weight"),
        ("llama", "blk.2.attn_q.weight", r"no place in the HF model: blk\.2\.attn_q\.weight"),  # past the last layer
        ("llama", "rope_freqs.weight", r"rope_freqs\.weight \(llama3-style rope scaling\)"),
    ],
)
def test_leftover_tensors_are_refused_by_name(tmp_path, bpe, family, tensor, message):
    path, _, _ = write_fixture(tmp_path, family, bpe, extra_tensors={tensor: np.ones((64, 64))})
    with pytest.raises(GGUFError, match=message):
        read_gguf(path)


@pytest.mark.parametrize(
    "family, key, value",
    [
        ("llama", "llama.rope.scaling.type", "yarn"),
        ("llama", "llama.rope.scaling.type", "linear"),
        ("llama", "llama.rope.dimension_count", 8),  # partial rotary
        ("qwen2", "qwen2.expert_count", 8),
        ("qwen3", "qwen3.attention.value_length", 64),
        ("gemma3_text", "gemma3.attn_logit_softcapping", 50.0),
        ("gemma3_text", "gemma3.final_logit_softcapping", 30.0),
        ("gpt2", "gpt2.attention.head_count_kv", 2),
    ],
)
def test_metadata_that_changes_the_math_is_refused_by_name(tmp_path, bpe, family, key, value):
    path, _, _ = write_fixture(tmp_path, family, bpe, extra_metadata={key: value})
    with pytest.raises(GGUFError, match=f"unsupported GGUF metadata.*{re.escape(key)}"):
        read_gguf(path)


def test_metadata_stating_the_defaults_is_accepted(tmp_path, bpe):
    neutral = {"llama.rope.scaling.type": "none", "llama.expert_count": 0, "llama.rope.dimension_count": 16}
    path, _, _ = write_fixture(tmp_path, "llama", bpe, extra_metadata=neutral)
    assert read_gguf(path)[0]["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


# --- Without torch ------------------------------------------------------------------------------------


def test_read_gguf_works_without_torch(tmp_path, bpe):
    path, _, _ = write_fixture(tmp_path, "gemma3_text", bpe, "Q8_0")
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from distprompt_jax.checkpoints.gguf import read_gguf
        hf_config, tensors, tokenizer = read_gguf({str(path)!r})
        print(json.dumps({{
            "model_type": hf_config["model_type"],
            "tensors": len(tensors),
            "ids": tokenizer("The capital of France is").input_ids,
            "torch_blocked": sys.modules["torch"] is None,
        }}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model_type"] == "gemma3_text" and report["torch_blocked"]
    assert report["tensors"] == len(read_gguf(path)[1])
    assert report["ids"] == [1] + bpe.encode("The capital of France is").ids

