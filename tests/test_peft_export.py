"""Found soft prompts and prefixes written as PEFT adapters, loaded by PEFT itself on the transformers model."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from conftest import FAMILIES, kl_rows

from distprompt_jax import PrefixPromptConfig, SoftPromptConfig, load_model, prefix_prompt, soft_prompt
from distprompt_jax.models.kv_cache import KVCache


def targets_for(lm, n: int = 2) -> np.ndarray:
    return np.random.RandomState(0).dirichlet(np.full(lm.vocab_size, 0.3), size=n)


def peft_logits(path, adapter) -> np.ndarray:
    """The next-token logits [V] of the transformers model in `path` with the PEFT adapter in `adapter`, after the
    input ids its distprompt.json names."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    input_ids = json.loads((adapter / "distprompt.json").read_text())["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.as_tensor([input_ids], dtype=torch.long)).logits[0, -1].numpy()


def our_logits(lm, result, row: int) -> np.ndarray:
    """Our logits [V] for the found prompt in `row`, from the returned arrays and the fixed suffix."""
    suffix = np.asarray(result.run_info["suffix_ids"], np.int32)
    if result.method == "prefix":
        cache = KVCache(result.arrays["keys"][row], result.arrays["values"][row])
        return np.asarray(lm.logits(lm.params, lm.embed(lm.params, suffix), cache))
    x = np.concatenate([result.arrays["prompt"][row], np.asarray(lm.embed(lm.params, suffix))])
    return np.asarray(lm.logits(lm.params, x))


def check_round_trip(lm, path, targets, result, directory):
    """The adapter of result's target 1, loaded by PEFT, gives our distribution, whose KL the search reported."""
    adapter = result.save_peft(directory, target_ids=1)
    assert adapter == [directory]
    theirs, ours = peft_logits(path, directory), our_logits(lm, result, 1)
    assert kl_rows(theirs[None], ours[None]).max() <= 1e-5
    log_q = np.asarray(jax.nn.log_softmax(theirs.astype(np.float64)))
    np.testing.assert_allclose(np.sum(targets[1] * (np.log(targets[1]) - log_q)), result.columns["kl"][1], rtol=1e-4)


@pytest.fixture(scope="module")
def found(tiny_hf_dir):
    """family -> (model, its directory, 3 targets, a soft prompt and a prefix found for them): searched once per
    family for the tests below (each search is a compile of its own)."""
    @functools.cache
    def get(family: str):
        _, path = tiny_hf_dir(family)
        lm = load_model(path)
        targets = targets_for(lm, 3)
        # 4 virtual tokens, 3 layers: an exported array with the two axes swapped has the wrong shape.
        short = dict(prompt_len=4, max_steps=3, slots=4)
        # A soft prompt alone (PEFT reads after its virtual tokens) and a prefix read by BOS (the default).
        soft = soft_prompt(lm, targets, SoftPromptConfig(**short), with_bound=False)
        prefix = prefix_prompt(lm, targets, PrefixPromptConfig(**short), with_bound=False)
        return lm, path, targets, soft, prefix

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_found_prompts_and_prefixes_load_in_peft_and_give_our_distribution(family, found, tmp_path):
    lm, path, targets, soft, prefix = found(family)
    check_round_trip(lm, path, targets, soft, tmp_path / "soft")
    check_round_trip(lm, path, targets, prefix, tmp_path / "prefix")


def test_fixed_suffixes_are_the_input_and_a_reparameterized_prefix_exports_its_keys_and_values(tiny_hf_dir, tmp_path):
    _, path = tiny_hf_dir("gemma3")  # windows shorter than the prefix, and the embedding scale
    lm = load_model(path)
    targets = targets_for(lm)
    soft = soft_prompt(lm, targets, SoftPromptConfig(prompt_len=3, max_steps=3, slots=2, suffix=(5, 1)),
                       with_bound=False)
    check_round_trip(lm, path, targets, soft, tmp_path / "soft")
    prefix = prefix_prompt(lm, targets, PrefixPromptConfig(prompt_len=4, max_steps=3, slots=2, reparam_hidden=8,
                                                           suffix=(7, 1)), with_bound=False)
    check_round_trip(lm, path, targets, prefix, tmp_path / "prefix")


def test_one_directory_per_target_and_the_layout_peft_reads(found, tmp_path):
    from safetensors.numpy import load_file

    _, _, _, soft, prefix = found("llama")  # grouped-query: 4 query heads, 2 key/value heads of 16
    paths = prefix.save_peft(tmp_path / "prefixes", target_ids=[2, 0])
    assert paths == [tmp_path / "prefixes" / "target_2", tmp_path / "prefixes" / "target_0"]
    config = json.loads((paths[0] / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"], config["token_dim"]) \
        == (4, 3, 2, 32)
    rows = load_file(str(paths[0] / "adapter_model.safetensors"))["prompt_embeddings"]
    assert rows.shape == (4, 3 * 2 * 32) and rows.dtype == np.float32
    # PEFT's view of a row: [n_layers * 2, n_kv_heads, head_dim], layer l's keys at 2l and values at 2l + 1
    view = rows.reshape(4, 6, 2, 16)
    np.testing.assert_array_equal(view[:, 2], prefix.arrays["keys"][2][1])
    np.testing.assert_array_equal(view[:, 5], prefix.arrays["values"][2][2])
    usage = json.loads((paths[0] / "distprompt.json").read_text())
    assert usage["target_id"] == 2 and usage["input_ids"] == [1] and usage["method"] == "prefix"
    assert usage["kl"] == pytest.approx(float(prefix.columns["kl"][2]))

    paths = soft.save_peft(tmp_path / "soft")  # every target
    assert [p.name for p in paths] == ["target_0", "target_1", "target_2"]
    config = json.loads((paths[1] / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and (config["num_virtual_tokens"], config["token_dim"]) == (4, 64)
    np.testing.assert_array_equal(load_file(str(paths[1] / "adapter_model.safetensors"))["prompt_embeddings"],
                                  soft.arrays["prompt"][1])


def test_what_peft_cannot_express_is_refused_by_name(tiny_hf_dir, tmp_path):
    lm = load_model(tiny_hf_dir("qwen2")[1])
    with_bos = soft_prompt(lm, targets_for(lm), SoftPromptConfig(prompt_len=2, bos=True, max_steps=2, slots=2),
                           with_bound=False)
    with pytest.raises(ValueError, match=r"fixed tokens before the prompt \(\[1\]: from the config's prefix, bos"):
        with_bos.save_peft(tmp_path / "a")
    # The other refusals read what a run records; variants of this result stand for those runs.
    plain = dataclasses.replace(with_bos, run_info={**with_bos.run_info, "prefix_ids": []})
    with pytest.raises(ValueError, match=r"fixed tokens before the prompt \(\[5, 6\]"):
        dataclasses.replace(plain, method="prefix", run_info={**plain.run_info, "prefix_ids": [5, 6]}).save_peft(
            tmp_path / "b")
    intervention = {**plain.run_info, "config": {**plain.run_info["config"], "intervention_layer": 1}}
    with pytest.raises(ValueError, match=r"intervention vector \(intervention_layer=1\) is not an input prompt"):
        dataclasses.replace(plain, run_info=intervention).save_peft(tmp_path / "c")
    with pytest.raises(ValueError, match="not 'hard' \\(hard prompts are tokens"):
        dataclasses.replace(plain, method="hard").save_peft(tmp_path / "d")
    with pytest.raises(ValueError, match=r"target_ids \[7\] are not in these results"):
        plain.save_peft(tmp_path / "e", target_ids=[0, 7])
    with pytest.raises(ValueError, match="carry no run_info"):
        dataclasses.replace(plain, run_info={}).save_peft(tmp_path / "f")
    assert not any(tmp_path.iterdir())  # nothing half-written
    assert plain.save_peft(tmp_path / "g", target_ids=0) == [tmp_path / "g"]
