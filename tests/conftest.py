"""Shared fixtures: tiny random-init HF models of every family, saved to temp dirs like real checkpoints."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

# Importing the package starts JAX on the CPU where libtpu is installed (the test extra, for compile-only plans)
# and no TPU chip is present (platforms.skip_absent_tpu).
from distprompt_jax import compilation_cache

# Four fake CPU devices, so sharded code paths run (and can be compared with one device) in every test.
jax.config.update("jax_num_cpu_devices", 4)

# The package's persistent compilation cache, as the command line uses it: a program one test compiles (in either
# test process, or in a CLI run in a subprocess) is read back from disk by the next test that compiles the same
# program, instead of compiled again (XLA's compiles are most of the suite's time). The same environment
# variables turn it off or move it (DISTPROMPT_JAX_COMPILATION_CACHE=off).
compilation_cache.enable()


# The longest modules first (seconds of one test process in a full run, BUILD.md "Tests and CI"). The two test
# processes take modules whole (`--dist loadfile`, setup.cfg) in collection order, so these go first: a long module
# handed out last would leave one process working alone at the end. The two real-model modules, which stream
# hundreds of MB of weights a step, go to the two processes one after the other rather than side by side (side
# by side in one full run, their searches took 1.6-1.9x as long as in the run before). Only the order depends on
# this list.
LONGEST_MODULES = (
    "test_real_searches.py", "test_hard.py", "test_real_models.py", "test_sweep.py", "test_prefix.py",
    "test_soft.py", "test_notebook.py", "test_kv_cache.py", "test_peft_export.py", "test_ladder.py", "test_bounds.py",
    "test_targets_generated.py",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)  # stable: the other modules, and the tests within a module, keep their order

TINY_VOCAB = 300


def tiny_hf_configs() -> dict:
    """Small configs that still exercise each family's peculiarities (GQA, biases, q/k norm, windows, RoPE types)."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    llama3_rope = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
    }
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=llama3_rope),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**common, head_dim=24, tie_word_embeddings=False),
        "gemma3": Gemma3TextConfig(
            **common, head_dim=16, sliding_window=3, query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        "gpt2": GPT2Config(
            vocab_size=TINY_VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        ),
    }


def build_tiny_hf_model(family: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_configs()[family], dtype=torch.float32).eval()
    # HF initializes norms to the identity; perturb them so a misplaced norm cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


FAMILIES = tuple(tiny_hf_configs())


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """family -> (HF torch model, directory it was saved to)."""
    @functools.cache
    def get(family: str):
        model = build_tiny_hf_model(family)
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        model.save_pretrained(path)
        return model, path

    return get


@pytest.fixture(scope="session")
def peaked_lm(tmp_path_factory):
    """family -> a tiny model with embeddings scaled ×10, so its next-token entropies are ~1-4 nats."""
    import torch

    from distprompt_jax import load_model

    @functools.cache
    def get(family: str):
        model = build_tiny_hf_model(family)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "embed" in name or "lm_head" in name or "wte" in name:
                    param.mul_(10)
        path = tmp_path_factory.mktemp(f"peaked-{family}")
        model.save_pretrained(path)
        return load_model(path)

    return get


def kl_rows(ref_logits, our_logits) -> np.ndarray:
    """KL(ref || ours) per row, in float64 so the comparison itself adds no noise."""
    ref = np.asarray(ref_logits, np.float64)
    ours = np.asarray(our_logits, np.float64)
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_q = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def torch_last_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits[:, -1].float().numpy()
