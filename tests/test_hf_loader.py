"""HF directories: sharded checkpoints, bfloat16 files, v4-style configs, and broken files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import build_tiny_hf_model, kl_rows, torch_last_logits

from distprompt_jax import load_model
from distprompt_jax.checkpoints.hf_safetensors import CheckpointError
from distprompt_jax.models import config_from_hf


def _logits(lm, ids):
    import jax

    return np.asarray(jax.vmap(lm.logits, in_axes=(None, 0))(lm.params, lm.embed(lm.params, ids)))


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    model = build_tiny_hf_model("qwen3")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ids = np.arange(12).reshape(2, 6)
    assert kl_rows(torch_last_logits(model, ids), _logits(load_model(tmp_path), ids)).max() <= 1e-6


def test_bfloat16_checkpoint(tmp_path):
    import torch

    model = build_tiny_hf_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    lm = load_model(tmp_path)  # upcast to float32 on load
    expected = model.model.layers[1].mlp.up_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(lm.params["layers"]["mlp"]["up"]["kernel"][1]), expected)


def test_transformers_v4_config_means_the_same_as_v5(tiny_hf_dir):
    for family, v4_rope in [
        ("llama", {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 32}}),
        ("gemma3", {"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0}),
    ]:
        raw = json.loads((tiny_hf_dir(family)[1] / "config.json").read_text())
        v4 = {k: v for k, v in raw.items() if k != "rope_parameters"} | v4_rope
        assert config_from_hf(v4) == config_from_hf(raw), family


def test_truncated_safetensors_is_named(tiny_hf_dir, tmp_path):
    source = tiny_hf_dir("gpt2")[1]
    shutil.copy(source / "config.json", tmp_path)
    data = (source / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path)


def test_directory_without_weights(tiny_hf_dir, tmp_path):
    shutil.copy(tiny_hf_dir("gpt2")[1] / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a .gguf"):
        load_model(path)


def test_index_naming_a_missing_shard(tmp_path):
    build_tiny_hf_model("qwen3").save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shards that are missing: \\['{shard.name}'\\]"):
        load_model(tmp_path)


def test_tokenizer_asking_for_custom_code_never_runs_it(tiny_hf_dir, tmp_path, monkeypatch):
    # transformers, left to decide, asks on the terminal whether to run a directory's tokenizer code;
    # answer "y" to any question, and check that none is asked and the code never runs.
    from gguf_writer import tiny_byte_level_bpe
    from transformers import PreTrainedTokenizerFast

    model_dir, evil = tmp_path / "model", tmp_path / "tokenizer"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_hf_dir("gpt2")[1] / name, model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tiny_byte_level_bpe()).save_pretrained(evil)
    config = json.loads((evil / "tokenizer_config.json").read_text())
    config |= {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (evil / "tokenizer_config.json").write_text(json.dumps(config))
    ran = tmp_path / "custom code ran"
    (evil / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    questions = []
    monkeypatch.setattr("builtins.input", lambda prompt="": questions.append(prompt) or "y")
    with pytest.raises(CheckpointError, match="asks for custom tokenizer code .* never runs code"):
        load_model(model_dir, tokenizer=evil)
    # Beside a config.json transformers knows the standard class and loads it, still running nothing.
    for path in evil.iterdir():
        shutil.copy(path, model_dir)
    assert load_model(model_dir).tokenizer is not None
    assert not questions and not ran.exists()
