"""Shape-only models: their shipped configs give the published parameter counts, through the strict HF path."""

from __future__ import annotations

import math

import huggingface_hub
import jax
import pytest

from distprompt_jax import load_model
from distprompt_jax.checkpoints import cache, hub
from distprompt_jax.checkpoints.hf_safetensors import CheckpointError
from distprompt_jax.models import published

# Published sizes as their authors round them: (total, non-embedding) parameters, None where not published.
# Llama: the Hugging Face model pages' counts of the safetensors (1.24B, 3.21B, 8.03B, 70.6B; Llama 3.2's card
# truncates the first to 1.23B). Qwen: the model cards ("Number of
# Parameters" / "(Non-Embedding)"; Qwen2.5-7B's total as its model page counts it, 7.62B: the card truncates to
# 7.61B); Qwen2.5-72B's card says 70.0B non-embedding, which its own config does not
# give (70.2B), so only its total is held. Gemma 3: the technical report's Table 1 (non-embedding parameters
# of the text tower; the totals of 4B/12B/27B count the 417M vision encoder this package does not build).
PUBLISHED = {
    "llama-3.2-1b": ("1.24e9", None),
    "llama-3.2-3b": ("3.21e9", None),
    "llama-3.1-8b": ("8.03e9", None),
    "llama-3.1-70b": ("70.6e9", None),
    "qwen2.5-7b": ("7.62e9", "6.53e9"),
    "qwen2.5-72b": ("72.7e9", None),
    "qwen3-8b": ("8.2e9", "6.95e9"),
    "qwen3-32b": ("32.8e9", "31.2e9"),
    "gemma-3-1b": ("1.0e9", "698e6"),
    "gemma-3-4b": (None, "3209e6"),
    "gemma-3-12b": (None, "10759e6"),
    "gemma-3-27b": (None, "25600e6"),
}

# Exact counts: the bfloat16 checkpoints' model.safetensors.index.json total_size (16,060,522,496 and
# 141,107,412,992 bytes), halved. A rounded figure would miss a layer width off by a few units.
EXACT = {"llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496}


def _half_unit(published_figure: str) -> float:
    """Half a unit in the last digit the figure states: 8.03e9 -> 5e6."""
    mantissa, exponent = published_figure.split("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** (int(exponent) - decimals)


def _counts(lm) -> tuple[int, int]:
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(lm.params))
    embedding = math.prod(lm.params["embed"]["embedding"].shape)
    head = math.prod(lm.params["lm_head"]["kernel"].shape) if "lm_head" in lm.params else 0
    return total, total - embedding - head


def test_every_shipped_model_is_held_to_a_published_size():
    assert sorted(PUBLISHED) == published.names()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_sizes(name):
    lm = published.abstract_model(name, "bfloat16")
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(lm.params))  # nothing allocated
    total, non_embedding = _counts(lm)
    want_total, want_non_embedding = PUBLISHED[name]
    if want_total is not None:
        assert abs(total - float(want_total)) <= _half_unit(want_total), (name, total)
    if name in EXACT:
        assert total == EXACT[name]
    if want_non_embedding is not None:
        assert abs(non_embedding - float(want_non_embedding)) <= _half_unit(want_non_embedding), (name, non_embedding)


def test_architecture_details_the_counts_cannot_see():
    llama = published.abstract_model("Llama-3.1-8B").config  # any letter case
    assert (llama.n_heads, llama.n_kv_heads, llama.head_dim, llama.tie_embeddings) == (32, 8, 128, False)
    assert llama.rope[0].rope_type == "llama3" and llama.rope[0].factor == 8.0 and llama.rope[0].theta == 500000.0
    assert published.abstract_model("llama-3.2-1b").config.tie_embeddings
    qwen3 = published.abstract_model("qwen3-32b").config
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 128 and qwen3.n_heads * 128 != qwen3.d_model
    assert published.abstract_model("qwen2.5-7b").config.qkv_bias
    gemma = published.abstract_model("gemma-3-27b").config
    assert gemma.sliding_window == ((1024,) * 5 + (None,)) * 10 + (1024, 1024)  # 5 local : 1 global, 62 layers
    assert gemma.attention_scale == 168**-0.5 and gemma.vocab_size == 262208
    assert {r.theta for r in gemma.rope} == {10000.0, 1000000.0}
    assert {(r.rope_type, r.factor) for r in gemma.rope} == {("default", 1.0), ("linear", 8.0)}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_run_of_a_shape_only_name_says_it_needs_the_weights(offline_hub):
    with pytest.raises(hub.HubError, match="'llama-3.1-8b' is a shape-only model .* a run needs its weights, from "
                                           "the Hugging Face hub id 'meta-llama/Llama-3.1-8B'"):
        load_model("llama-3.1-8b")
    with pytest.raises(CheckpointError, match="'gemma-3-4b' is a shape-only model .* multimodal"):
        load_model("gemma-3-4b")


def test_an_unknown_name_lists_the_shape_only_models(offline_hub):
    with pytest.raises(FileNotFoundError, match="shape-only model .*llama-3.1-70b.*qwen3-8b"):
        load_model("llama-9")
    with pytest.raises(KeyError, match="known: gemma-3-12b"):
        published.abstract_model("llama-9")
