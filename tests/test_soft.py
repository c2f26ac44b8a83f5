"""The soft-prompt engine on tiny models whose outputs are peaked enough to be interesting."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from distprompt_jax import SoftPromptConfig, load_model, soft_prompt
from distprompt_jax.targets import TargetError


def self_generated_targets(lm, n: int, length: int, seed: int = 0) -> np.ndarray:
    """The model's own next-token distributions after random token prompts: reachable exactly."""
    ids = np.random.RandomState(seed).randint(0, lm.vocab_size, size=(n, length))
    logits = jax.vmap(lm.logits, in_axes=(None, 0))(lm.params, lm.embed(lm.params, ids))
    return np.asarray(jax.nn.softmax(logits), np.float64)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_self_generated_targets_are_reached(peaked_lm, family):
    lm = peaked_lm(family)
    targets = self_generated_targets(lm, 4, length=5)
    # A constant rate keeps improving to the end, as reaching KL < 1e-3 on these tiny models needs (the
    # default's cosine decay stops near 4e-3 here; the real-model tests check the default recipe).
    config = SoftPromptConfig(prompt_len=5, max_steps=400, slots=4, learning_rate=0.1, schedule="constant",
                              warmup=0.0)
    result = soft_prompt(lm, targets, config)
    table = result.to_pandas()
    assert list(table.columns[:3]) == ["target_id", "method", "kl"]
    assert (table.method == "soft").all() and (table.prompt_len == 5).all()
    assert table.kl.max() < 1e-3, table.kl.tolist()
    assert result.arrays["prompt"].shape == (4, 5, lm.d_model)
    assert result.arrays["nearest_tokens"].shape == (4, 5)


def test_reported_kl_is_the_kl_of_the_returned_prompt(peaked_lm):
    lm = peaked_lm("gemma3")
    targets = self_generated_targets(lm, 3, length=4, seed=1)
    result = soft_prompt(lm, targets, SoftPromptConfig(prompt_len=4, max_steps=30, slots=4))
    logits = jax.vmap(lm.logits, in_axes=(None, 0))(lm.params, result.arrays["prompt"])
    np.testing.assert_allclose(result.columns["kl"], kl_of(targets, logits), atol=2e-5)
    assert np.all(result.columns["kl"] <= result.columns["final_kl"])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_prompts_run_after_the_fixed_prefixs_cache_as_inside_the_whole_input(peaked_lm, family):
    """The fixed tokens before the prompt are computed once for all targets and each prompt runs after their
    keys and values (rotary offsets, learned positions, sliding windows): the KL reported for the returned
    prompt must be that of the whole input — BOS, prefix, prompt, suffix — run from scratch."""
    lm = peaked_lm(family)
    targets = self_generated_targets(lm, 3, length=4, seed=2)
    prefix, suffix = (5, 9, 11), (7, 3)
    config = SoftPromptConfig(prompt_len=4, max_steps=30, slots=4, prefix=prefix, suffix=suffix, bos=True)
    result = soft_prompt(lm, targets, config, with_bound=False)
    before = lm.embed(lm.params, np.asarray((lm.config.bos_token_id, *prefix)))
    after = lm.embed(lm.params, np.asarray(suffix))
    whole = [np.concatenate([before, prompt, after]) for prompt in result.arrays["prompt"]]
    logits = jax.vmap(lm.logits, in_axes=(None, 0))(lm.params, np.stack(whole))
    np.testing.assert_allclose(result.columns["kl"], kl_of(targets, logits), atol=2e-5)


def kl_of(targets: np.ndarray, logits) -> np.ndarray:
    """KL(p ‖ softmax(logits)) per row, in float64."""
    log_q = np.asarray(jax.nn.log_softmax(logits), np.float64)
    return np.sum(np.where(targets > 0, targets * (np.log(np.where(targets > 0, targets, 1)) - log_q), 0), -1)


def test_best_kl_never_increases_with_more_steps(peaked_lm):
    lm = peaked_lm("llama")
    targets = self_generated_targets(lm, 4, length=3, seed=2)
    best = [
        soft_prompt(lm, targets, SoftPromptConfig(prompt_len=3, max_steps=steps, patience=1000, slots=4,
                                                  schedule="constant", warmup=0.0))
        .columns["kl"]
        for steps in (1, 10, 40)
    ]
    assert np.all(best[1] <= best[0]) and np.all(best[2] <= best[1])
    assert np.all(best[2] < best[0])


def test_early_stopped_targets_stop_changing(peaked_lm):
    lm = peaked_lm("gemma3")
    targets = self_generated_targets(lm, 8, length=3, seed=3)

    def run(max_steps):
        # A constant rate, no warmup: the runs then take the same steps whatever max_steps is.
        return soft_prompt(lm, targets, SoftPromptConfig(
            prompt_len=3, max_steps=max_steps, patience=3, min_delta=1e-2, slots=8, segment_steps=4,
            schedule="constant", warmup=0.0, restarts=1,
        ))

    short, long = run(40), run(200)
    stopped = short.columns["steps"] < 40
    assert stopped.any()
    np.testing.assert_array_equal(short.columns["steps"][stopped], long.columns["steps"][stopped])
    np.testing.assert_array_equal(short.arrays["prompt"][stopped], long.arrays["prompt"][stopped])


def test_restarts_never_make_a_result_worse(peaked_lm):
    lm = peaked_lm("llama")
    targets = self_generated_targets(lm, 4, length=3, seed=4)
    config = SoftPromptConfig(prompt_len=3, max_steps=15, slots=4, restarts=1, restart_above=None)
    once = soft_prompt(lm, targets, config).columns["kl"]
    thrice = soft_prompt(lm, targets, SoftPromptConfig(**{**config.__dict__, "restarts": 3})).columns["kl"]
    assert np.all(thrice <= once)


def test_with_bound_the_found_kl_sits_above_the_certified_floor_and_stops_near_it(peaked_lm):
    lm = peaked_lm("llama")
    reachable = self_generated_targets(lm, 2, length=3, seed=6)  # bound ≈ 0, and reachable
    spread = np.random.RandomState(0).dirichlet(np.full(lm.vocab_size, 0.3), size=2)  # bound well above 0
    config = SoftPromptConfig(prompt_len=3, max_steps=300, patience=300, slots=4, floor_tolerance=1e-2)
    result = soft_prompt(lm, np.concatenate([reachable, spread]), config, with_bound=True)
    kl, kl_bound, gap = (result.columns[name] for name in ("kl", "kl_bound", "gap_to_bound"))
    assert np.all(np.isfinite(kl_bound)) and np.all(kl_bound[2:] > 0.1)
    np.testing.assert_allclose(gap, kl - kl_bound)
    assert np.all(gap >= -1e-6)  # no prompt beats the certificate
    # The reachable targets stop as soon as they are within floor_tolerance of their floor.
    assert np.all(gap[:2] <= 1e-2) and np.all(result.columns["steps"][:2] < 300)


def test_restarts_above_the_floor_run_only_for_targets_that_need_them(peaked_lm):
    from distprompt_jax.prompting.engine import run_method
    from distprompt_jax.prompting.soft import SoftMethod

    lm = peaked_lm("llama")
    targets = self_generated_targets(lm, 4, length=3, seed=7)
    config = SoftPromptConfig(prompt_len=3, max_steps=15, slots=4, restarts=3, restart_above=0.0)
    floors = np.array([1e3, 1e3, -1.0, -1.0])  # the first two are at their floor at once
    result = run_method(SoftMethod(lm, config), lm, targets, floors=floors)
    assert np.all(result.columns["steps"][:2] == 1)  # stopped at the floor after one step, never restarted
    once = soft_prompt(lm, targets, SoftPromptConfig(**{**config.__dict__, "restarts": 1, "restart_above": None}))
    thrice = soft_prompt(lm, targets, SoftPromptConfig(**{**config.__dict__, "restart_above": None}))
    np.testing.assert_array_equal(result.columns["kl"][2:], thrice.columns["kl"][2:])
    assert np.all(thrice.columns["kl"] <= once.columns["kl"])


def test_four_devices_give_the_same_results_as_one_and_chunking_does_not_matter(peaked_lm):
    assert len(jax.devices()) == 4
    lm = peaked_lm("gemma3")
    targets = self_generated_targets(lm, 6, length=3, seed=5)
    config = SoftPromptConfig(prompt_len=3, max_steps=20, slots=8)
    four = soft_prompt(lm, targets, config)
    one = soft_prompt(lm, targets, config, devices=jax.devices()[:1])
    small_chunks = soft_prompt(lm, targets, SoftPromptConfig(**{**config.__dict__, "slots": 4}))
    sharded_weights = soft_prompt(lm, targets, SoftPromptConfig(**{**config.__dict__, "shard_params": True}))
    for other in (one, small_chunks, sharded_weights):
        np.testing.assert_allclose(four.columns["kl"], other.columns["kl"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(four.arrays["prompt"], other.arrays["prompt"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer, mode", [(0, "replace"), (2, "add"), ("final_norm", "replace")])
def test_interventions_reach_self_generated_targets(peaked_lm, layer, mode):
    lm = peaked_lm("llama")
    targets = self_generated_targets(lm, 2, length=1, seed=6)
    config = SoftPromptConfig(  # a constant rate, as in test_self_generated_targets_are_reached
        intervention_layer=layer, intervention_mode=mode, prefix=(5,), max_steps=300, slots=4,
        learning_rate=0.1, schedule="constant", warmup=0.0,
    )
    result = soft_prompt(lm, targets, config)
    assert result.arrays["prompt"].shape == (2, lm.d_model)
    assert (result.columns["prompt_len"] == 0).all()
    assert result.columns["kl"].max() < 1e-3


def test_inits(peaked_lm):
    lm = peaked_lm("gemma3")
    targets = self_generated_targets(lm, 2, length=3)
    table = np.asarray(lm.embedding_matrix(lm.params))
    vocab = soft_prompt(lm, targets, SoftPromptConfig(prompt_len=3, init="vocab", max_steps=1, slots=4))
    # Before any step the prompt is made of vocabulary embeddings.
    rows = vocab.arrays["prompt"].reshape(-1, lm.d_model)
    assert all(np.any(np.all(np.isclose(table, row, atol=1e-6), axis=1)) for row in rows)
    std = soft_prompt(lm, targets, SoftPromptConfig(prompt_len=3, max_steps=1, slots=4, restarts=1))
    assert np.std(std.arrays["prompt"]) == pytest.approx(np.std(table), rel=0.3)


def test_bank_init_starts_each_target_at_its_nearest_context(peaked_lm):
    from distprompt_jax.prompting.context import FixedContext
    from distprompt_jax.prompting.context_bank import ContextBank

    lm = peaked_lm("llama")
    bank = ContextBank.sample(lm, 16, 3, seed=5, context=FixedContext((lm.config.bos_token_id,), ()), progress=False)
    targets = np.exp(bank.log_probs[[3, 9]].astype(np.float64))
    targets /= targets.sum(1, keepdims=True)
    config = SoftPromptConfig(prompt_len=3, init="bank", bank_size=16, seed=5, bos=True, max_steps=1, restarts=1)
    table = soft_prompt(lm, targets, config, with_bound=False).to_pandas()
    # The same bank (same seed, size and fixed tokens): each target starts at its own context, KL 0.
    np.testing.assert_allclose(table.initial_kl, 0.0, atol=1e-5)
    noise = soft_prompt(lm, targets, dataclasses.replace(config, init="embedding_std"), with_bound=False)
    assert np.all(noise.to_pandas().initial_kl > 0.1)
    with pytest.raises(ValueError, match="init='bank' starts input prompts"):
        soft_prompt(lm, targets, SoftPromptConfig(init="bank", intervention_layer=1, prefix="w1"))


def test_bad_targets_and_configs_are_named(peaked_lm):
    lm = peaked_lm("gpt2")
    good = self_generated_targets(lm, 3, length=2)
    with pytest.raises(TargetError, match="301 columns, but the model's vocabulary has 300"):
        soft_prompt(lm, np.full((2, 301), 1 / 301))
    bad = good.copy()
    bad[1, 0] = np.nan
    with pytest.raises(TargetError, match="row 1: not finite"):
        soft_prompt(lm, bad)
    for field, value, message in [
        ("prompt_len", 0, "prompt_len must be at least 1"),
        ("init", "zeros", "init must be one of"),
        ("intervention_layer", 7, r"intervention_layer must be None, 'final_norm' or an int in \[0, 3\]"),
        ("learning_rate", -1.0, "learning_rate must be positive"),
        ("warmup", 1.0, r"warmup must be a fraction of max_steps in \[0, 1\)"),
        ("restart_above", -0.5, "restart_above must be non-negative"),
        ("floor_tolerance", -1e-3, "floor_tolerance must be non-negative"),
    ]:
        with pytest.raises(ValueError, match=message):
            soft_prompt(lm, good, SoftPromptConfig(**{field: value}))
    with pytest.raises(TypeError, match="with_bound must be True, False or a BoundConfig"):
        soft_prompt(lm, good, with_bound="yes")
    with pytest.raises(ValueError, match="intervention needs fixed input tokens"):
        soft_prompt(lm, good, SoftPromptConfig(intervention_layer=1))


def test_targets_do_not_influence_each_other(peaked_lm):
    # Per-target optimizer state and clipping: a target's result is the same alone or beside another
    # whose gradients are far larger.
    lm = peaked_lm("llama")
    targets = self_generated_targets(lm, 2, length=3, seed=7)
    one_hot = np.zeros((1, lm.vocab_size))
    one_hot[0, 17] = 1.0
    config = SoftPromptConfig(prompt_len=3, max_steps=10, slots=4, clip_norm=0.5)
    alone = soft_prompt(lm, targets[:1], config)
    beside = soft_prompt(lm, np.concatenate([targets[:1], one_hot]), config)
    np.testing.assert_allclose(alone.arrays["prompt"][0], beside.arrays["prompt"][0], rtol=1e-5, atol=1e-6)


def test_bfloat16_model(tiny_hf_dir):
    lm = load_model(tiny_hf_dir("qwen3")[1], dtype="bfloat16")
    targets = np.full((2, lm.vocab_size), 1.0 / lm.vocab_size)
    targets[:, :5] += 0.1
    targets /= targets.sum(-1, keepdims=True)
    result = soft_prompt(lm, targets, SoftPromptConfig(prompt_len=3, max_steps=20, slots="auto"))  # sized from memory
    assert result.arrays["prompt"].dtype == np.float32
    assert np.all(np.isfinite(result.columns["kl"]))
    assert np.all(result.columns["kl"] < result.columns["initial_kl"])


def test_a_diverging_target_is_flagged_and_keeps_its_best_finite_point(peaked_lm):
    lm = peaked_lm("llama")
    targets = self_generated_targets(lm, 2, length=3, seed=8)
    # An Adam step of ~3e38 takes the prompt past where its squares overflow (solve.blown_up): the target stops
    # there, before the RMSNorm's NaN makes the KL non-finite one step later.
    config = SoftPromptConfig(prompt_len=3, learning_rate=3e38, warmup=0.0, max_steps=30, slots=2, restarts=1)
    result = soft_prompt(lm, targets, config)
    table = result.to_pandas()
    assert table.diverged.all(), table[["kl", "final_kl", "steps"]]
    assert np.isfinite(table.kl).all() and (table.kl <= table.initial_kl).all()
    assert (table.steps == 1).all() and (table.best_step == 0).all()
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        soft_prompt(lm, targets, SoftPromptConfig(learning_rate=float("inf")))


def test_warmup_starts_the_learning_rate_at_zero_and_reaches_it_after_the_warmup(peaked_lm):
    from distprompt_jax.prompting.soft import SoftProblem

    lm = peaked_lm("llama")
    config = SoftPromptConfig(learning_rate=0.02, warmup=0.2, schedule="cosine", max_steps=20)
    optimizer = SoftProblem.build(lm, config).optimizer()
    v = np.zeros(3, np.float32)
    state = optimizer.init(v)
    sizes = []
    for _ in range(6):
        updates, state = optimizer.update(np.ones(3, np.float32), state, v)
        sizes.append(float(np.abs(updates).max()))
    # Adam's first steps move by the learning rate itself (sign-like), so the sizes are the schedule.
    np.testing.assert_allclose(sizes[:5], [0.0, 0.005, 0.01, 0.015, 0.02], rtol=1e-4, atol=1e-7)
    assert sizes[5] < 0.02  # cosine decay after the warmup


def test_the_default_learning_rate_is_relative_to_the_embeddings_scale(peaked_lm):
    from distprompt_jax import PrefixPromptConfig
    from distprompt_jax.prompting.soft import LEARNING_RATE_PER_STD, SoftProblem

    lm = peaked_lm("llama")
    sigma = float(np.std(np.asarray(lm.embedding_matrix(lm.params), np.float64)))
    assert SoftProblem.build(lm, SoftPromptConfig()).recipe.learning_rate == pytest.approx(
        LEARNING_RATE_PER_STD * sigma, rel=1e-5)
    assert SoftProblem.build(lm, SoftPromptConfig(learning_rate=0.05)).recipe.learning_rate == 0.05
    targets = self_generated_targets(lm, 1, length=3, seed=5)
    # Results say which step ran.
    ran = soft_prompt(lm, targets, SoftPromptConfig(prompt_len=3, max_steps=2, slots=1)).columns["learning_rate"]
    np.testing.assert_allclose(ran, LEARNING_RATE_PER_STD * sigma, rtol=1e-5)
    with pytest.raises(TypeError, match="PrefixPromptConfig: learning_rate must be a number, got None"):
        PrefixPromptConfig(learning_rate=None)
