"""The hard-prompt engine on tiny models (peaked, as in test_soft.py), a tiny attached tokenizer, and smollm2."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pandas as pd
import pytest

from distprompt_jax import SoftPromptConfig, load_model, soft_prompt
from distprompt_jax.prompting import hard
from distprompt_jax.prompting.hard import (
    HardProblem,
    HardPromptConfig,
    _init_token,
    candidate_mask,
    project_soft_prompts,
    projection_loss,
    round_trips,
    token_prompt_kl,
)
from distprompt_jax.prompting.objective import safe_log
from distprompt_jax.results import PromptResults
from distprompt_jax.tokens import special_token_ids

SPECIAL = (1, 2)  # the tiny models' BOS and EOS
# These tests are of the search itself, without the certified bound as its floor (the bound beside prompts is
# tested with soft prompts and in test_bounds).
hard_prompt = functools.partial(hard.hard_prompt, with_bound=False)


def targets_of(lm, prompts) -> np.ndarray:
    """The model's own next-token distributions after the given token prompts [N, L]: reachable exactly."""
    logits = jax.vmap(lm.logits, in_axes=(None, 0))(lm.params, lm.embed(lm.params, np.asarray(prompts)))
    return np.asarray(jax.nn.softmax(logits), np.float64)


def random_targets(n: int, vocab: int, scale: float = 3.0, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, vocab)) * scale
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def known_prompts(lm, n: int, length: int, seed: int = 0) -> np.ndarray:
    allowed = np.flatnonzero(candidate_mask(lm))
    return np.random.default_rng(seed).choice(allowed, size=(n, length))


# Configs shared between tests, so each compiles once (the search is cached per model and config).
EXHAUSTIVE = HardPromptConfig(prompt_len=2, k=297, max_steps=20, slots=4)  # every allowed token but the current
GCG = HardPromptConfig(prompt_len=2, mode="gcg", init="random", k=32, num_swaps=64, max_steps=25, patience=10,
                       slots=4)


@pytest.mark.parametrize("config", [
    EXHAUSTIVE,
    HardPromptConfig(prompt_len=2, positions="best", beam_width=4, k=128, max_steps=20, slots=4),
    GCG,
], ids=["hotflip-exhaustive", "hotflip-best-beam", "gcg"])
def test_known_token_prompts_are_recovered(peaked_lm, config):
    lm = peaked_lm("llama")
    prompts = known_prompts(lm, 4, 2)
    targets = targets_of(lm, prompts)
    result = hard_prompt(lm, targets, config)
    table = result.to_pandas()
    assert list(table.columns[:3]) == ["target_id", "method", "kl"]
    assert (table.method == "hard").all() and (table.prompt_len == 2).all()
    assert table.kl.max() <= 1e-3, (table.kl.tolist(), result.arrays["token_ids"].tolist(), prompts.tolist())
    ids, path = result.arrays["token_ids"], result.arrays["kl_path"]
    assert ids.shape == (4, 2) and path.shape == (4, config.max_steps)
    # The best-KL path only goes down, ends at the reported KL, and starts no higher than the initial prompt.
    assert np.all(np.diff(path, axis=1) <= 0)
    np.testing.assert_array_equal(path[:, -1], result.columns["kl"])
    assert np.all(path[:, 0] <= result.columns["initial_kl"])
    assert np.all((result.columns["best_step"] >= 1) & (result.columns["best_step"] <= result.columns["steps"]))
    # The reported KL is the KL of the returned tokens.
    np.testing.assert_allclose(token_prompt_kl(lm, targets, ids, config), result.columns["kl"], atol=2e-5)
    if config.mode == "hotflip":  # deterministic: stops once a whole cycle of positions changed nothing
        assert np.all(result.columns["steps"] < config.max_steps)


def test_special_tokens_are_never_candidates(peaked_lm):
    lm = peaked_lm("llama")
    assert special_token_ids(lm) == set(SPECIAL)
    assert not candidate_mask(lm)[list(SPECIAL)].any()
    # Targets that special tokens produce exactly: an exhaustive search is drawn to them, but may not use them.
    targets = targets_of(lm, [[1, 2], [2, 2], [1, 1], [5, 2]])
    result = hard_prompt(lm, targets, EXHAUSTIVE)
    assert not np.isin(result.arrays["token_ids"], SPECIAL).any()
    assert np.all(result.columns["kl"] > 0)


def test_hard_is_no_better_than_soft_and_seeding_from_soft(peaked_lm):
    lm = peaked_lm("llama")
    targets = random_targets(4, lm.vocab_size)
    soft = soft_prompt(lm, targets, SoftPromptConfig(prompt_len=2, max_steps=300, slots=4))
    config = EXHAUSTIVE
    hard = hard_prompt(lm, targets, config)
    # Every hard prompt is also a soft prompt, so the soft optimum bounds the hard one from below.
    assert np.all(hard.columns["kl"] >= soft.columns["kl"] - 1e-3), (hard.columns["kl"], soft.columns["kl"])

    seeds = project_soft_prompts(lm, soft)
    assert seeds.shape == (4, 2) and not np.isin(seeds, SPECIAL).any()
    loss = projection_loss(lm, targets, soft, config)
    assert list(loss.columns) == ["target_id", "soft_kl", "projected_kl", "projection_loss"]
    np.testing.assert_allclose(loss.projection_loss, loss.projected_kl - loss.soft_kl)
    assert np.all(loss.projection_loss > -1e-4)
    seeded = hard_prompt(lm, targets, config, init_ids=seeds)
    np.testing.assert_allclose(seeded.columns["initial_kl"], loss.projected_kl, atol=2e-5)
    assert np.all(seeded.columns["kl"] <= seeded.columns["initial_kl"])


def test_deterministic_for_a_seed_and_independent_of_devices_and_chunks(peaked_lm):
    assert len(jax.devices()) == 4
    lm = peaked_lm("llama")
    targets = random_targets(4, lm.vocab_size, seed=1)
    # Random init and random swaps; each target's candidates batched alone, so its results do not depend on
    # its neighbours (the default "pool" rounds batch targets together: float32 rounding then differs).
    config = dataclasses.replace(GCG, reuse_rounds="target")
    four = hard_prompt(lm, targets, config)
    again = hard_prompt(lm, targets, config)
    # One device, and a chunk of 8 (half of it padding) instead of 4: one compilation checks both.
    other = hard_prompt(lm, targets, dataclasses.replace(config, slots=8), devices=jax.devices()[:1])
    np.testing.assert_array_equal(four.arrays["token_ids"], again.arrays["token_ids"])
    np.testing.assert_array_equal(four.arrays["kl_path"], again.arrays["kl_path"])
    np.testing.assert_array_equal(four.arrays["token_ids"], other.arrays["token_ids"])
    np.testing.assert_allclose(four.arrays["kl_path"], other.arrays["kl_path"], rtol=1e-5, atol=1e-6)
    other_seed = hard_prompt(lm, targets, dataclasses.replace(config, seed=1))
    assert not np.array_equal(four.arrays["kl_path"], other_seed.arrays["kl_path"])
    assert np.all(four.columns["kl"] < four.columns["initial_kl"])


def tiny_tokenizer(size: int):
    """A word-level tokenizer over `size` ids (fewer than the tiny model's 300) with tokens each filter catches."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<sep>", "the", "é", "\x07", " ", "\t\n", "x.y", "\ufffd"]
    words += [f"w{i}" for i in range(len(words), size)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken("<sep>", special=True)])  # special, but not in all_special_ids
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_filters_round_trips_and_text_with_a_tokenizer(peaked_lm):
    lm = dataclasses.replace(peaked_lm("llama"), tokenizer=tiny_tokenizer(296))
    # ids 0-3 special, 296-299 beyond the tokenizer; 5 é, 6 \x07, 7 " ", 8 "\t\n", 9 x.y, 10 U+FFFD
    assert special_token_ids(lm) == {0, 1, 2, 3}

    def excluded(**filters):
        return set(np.flatnonzero(~candidate_mask(lm, HardPromptConfig(**filters))).tolist())

    base = {0, 1, 2, 3, 296, 297, 298, 299}
    assert excluded() == base
    assert excluded(ascii_only=True) == base | {5, 10}
    assert excluded(printable_only=True) == base | {6, 10}
    assert excluded(no_whitespace_only=True) == base | {7, 8}
    assert excluded(round_trip_tokens=True) == base | {7, 8, 9}
    # Soft prompts' init="vocab" draws from the same ordinary tokens (640 draws: a slip would show).
    vocab_init = soft_prompt(lm, np.full((64, lm.vocab_size), 1 / lm.vocab_size),
                             SoftPromptConfig(init="vocab", max_steps=1, slots=64))
    assert not np.isin(vocab_init.arrays["nearest_tokens"], sorted(base)).any()

    np.testing.assert_array_equal(round_trips(lm.tokenizer, [[11, 12], [11, 9], [4, 7]]), [True, False, False])
    config = HardPromptConfig(
        prompt_len=3, init="repeat", k=8, max_steps=3, slots=4, ascii_only=True, printable_only=True,
        no_whitespace_only=True, round_trip_tokens=True,
    )
    targets = targets_of(lm, [[5, 9, 10], [20, 30, 40]])
    result = hard_prompt(lm, targets, config)
    ids = result.arrays["token_ids"]
    assert not np.isin(ids, sorted(excluded(**{f: True for f in (
        "ascii_only", "printable_only", "no_whitespace_only", "round_trip_tokens")}))).any()
    assert list(result.columns["text"]) == [lm.tokenizer.decode(row) for row in ids.tolist()]
    np.testing.assert_array_equal(result.columns["round_trips"], round_trips(lm.tokenizer, ids))
    assert result.columns["round_trips"].dtype == bool
    # init="repeat" repeats " the" where that is one token.
    the = [[4, 4, 4]] * 2
    np.testing.assert_allclose(result.columns["initial_kl"], token_prompt_kl(lm, targets, the, config), atol=2e-5)
    with pytest.raises(ValueError, match=r"init_ids has tokens the search may not use .*\[5, 9\]"):
        hard_prompt(lm, targets, config, init_ids=[5, 9, 11])


def test_bad_configs_and_inputs_are_named(peaked_lm):
    lm = peaked_lm("gpt2")
    targets = targets_of(lm, [[5, 6], [7, 8]])
    for fields, message in [
        ({"k": 301}, r"k=301 exceeds the vocabulary \(300\)"),
        ({"k": 299}, "k=299 exceeds the 298 tokens allowed as candidates"),
        ({"prompt_len": 0}, "prompt_len must be at least 1"),
        ({"mode": "beam"}, "mode must be one of"),
        ({"mode": "gcg", "positions": "best"}, "applies to mode='hotflip' only"),
        ({"prompt_len": 10, "patience": 5}, "patience=5 is less than prompt_len=10"),
        ({"num_swaps": 0}, "num_swaps must be at least 1"),
        ({"mode": "gcg", "n_replace": 11}, "n_replace must be between 1 and prompt_len=10"),
        ({"n_replace": 2}, "n_replace > 1 applies to mode='gcg' only"),
        ({"reuse_rounds": "slot"}, "reuse_rounds must be one of"),
        ({"round_trip_prompts": True}, "round_trip_prompts needs the model's tokenizer"),
        ({"ascii_only": True}, "ascii_only needs the model's tokenizer"),
        ({"init": "text"}, "init_text is given exactly when init='text'"),
        ({"init": "repeat", "init_token": 1}, r"init_token has tokens the search may not use .*\[1\]"),
        ({"init_token": 1}, "init_token applies to init='repeat' only"),
    ]:
        with pytest.raises(ValueError, match=message):
            hard_prompt(lm, targets, HardPromptConfig(**fields))
    with pytest.raises(ValueError, match=r"init_ids must be \[2, 10\]"):
        hard_prompt(lm, targets, HardPromptConfig(slots=4), init_ids=np.zeros((2, 3), int))
    not_soft = PromptResults("hard", {}, {"token_ids": np.zeros((2, 3), int)}, pd.DataFrame({"target_id": [0, 1]}))
    with pytest.raises(ValueError, match="project_soft_prompts needs soft-prompt results"):
        project_soft_prompts(lm, not_soft)


@pytest.mark.real_weights
def test_smollm2_tokens_specials_filters_and_round_trips():
    """The tokenizer-facing parts on a real byte-level BPE vocabulary (the search itself: tiny models, bench/)."""
    lm = load_model("smollm2-135m")
    special = special_token_ids(lm)
    assert set(range(17)) <= special  # 3 listed special ids, and 14 more added tokens marked special
    plain = candidate_mask(lm)
    assert plain.sum() == lm.vocab_size - len(special)
    config = HardPromptConfig(ascii_only=True, printable_only=True, no_whitespace_only=True, round_trip_tokens=True)
    strict = candidate_mask(lm, config)
    assert not (strict & ~plain).any() and 47_000 < strict.sum() < 48_500
    texts = lm.tokenizer.batch_decode([[i] for i in np.flatnonzero(strict)])
    assert all(t.isascii() and t.isprintable() and t.strip() for t in texts if "\n" not in t and "\t" not in t)
    # init="repeat" repeats " the" unless told another token.
    the = lm.encode(" the", add_special_tokens=False)
    assert _init_token(lm, HardPromptConfig(init="repeat"), plain) == the[0]
    # "Hel" + "lo" decodes to "Hello", which is one other token: that prompt does not round-trip.
    hel_lo = [*lm.encode("Hel", False), *lm.encode("lo", False)]
    hello_world = lm.encode("Hello world", False).tolist()
    np.testing.assert_array_equal(round_trips(lm.tokenizer, [hel_lo, hello_world, [the[0]] * 2]), [False, True, True])


def test_prompts_inside_the_chat_template(peaked_lm):
    # The template's own text around the user's message, and the start of the assistant's turn, become fixed
    # tokens: the same search as with those tokens given as prefix and suffix by hand.
    tokenizer = tiny_tokenizer(296)
    tokenizer.chat_template = (
        "{% for m in messages %}w20 {{ m['content'] }} w21{% endfor %}{% if add_generation_prompt %} w22{% endif %}"
    )
    lm = dataclasses.replace(peaked_lm("llama"), tokenizer=tokenizer)
    targets = random_targets(2, lm.vocab_size, seed=4)
    base = dict(prompt_len=2, k=16, max_steps=4, slots=2)
    chat = hard_prompt(lm, targets, HardPromptConfig(**base, template="chat", prefix="w30"))
    by_hand = hard_prompt(lm, targets, HardPromptConfig(**base, prefix=(20, 30), suffix=(21, 22)))
    np.testing.assert_array_equal(chat.arrays["token_ids"], by_hand.arrays["token_ids"])
    np.testing.assert_array_equal(chat.columns["kl"], by_hand.columns["kl"])
    assert (chat.columns["template"] == "chat").all() and (by_hand.columns["template"] == "none").all()
    soft = soft_prompt(lm, targets, SoftPromptConfig(prompt_len=2, max_steps=2, slots=2, template="chat"))
    assert (soft.to_pandas().template == "chat").all()
    with pytest.raises(ValueError, match="has no chat template"):
        hard_prompt(peaked_lm("llama"), targets, HardPromptConfig(**base, template="chat"))
    with pytest.raises(ValueError, match="template must be one of"):
        soft_prompt(lm, targets, SoftPromptConfig(template="chatml"))


@pytest.mark.parametrize("config", [
    HardPromptConfig(prompt_len=5, k=24, max_steps=10, slots=4, beam_width=2, prefix=(7, 8), suffix=(9,), bos=True,
                     reuse_rounds="target"),
    HardPromptConfig(prompt_len=5, mode="gcg", init="random", k=16, num_swaps=40, max_steps=8, slots=4,
                     candidate_block=16, prefix=(7,), reuse_rounds="pool"),
], ids=["hotflip-beam-context-target", "gcg-prefix-pool"])
def test_reusing_the_shared_prefix_takes_the_same_path(peaked_lm, config):
    """Candidates computed from their first swapped position on, after the prompt's cached keys/values (and the
    fixed prefix's), take the search down exactly the path of candidates computed whole (same seed), whether
    each target's blocks run alone or all targets' together. That a target's path does not depend on the device
    count is test_deterministic_...'s, with the cache on."""
    lm = peaked_lm("qwen3")
    targets = random_targets(6, lm.vocab_size, seed=2)
    cached = hard_prompt(lm, targets, config)
    whole = hard_prompt(lm, targets, dataclasses.replace(config, reuse_prefix=False))
    np.testing.assert_array_equal(cached.arrays["token_ids"], whole.arrays["token_ids"])
    np.testing.assert_array_equal(cached.columns["steps"], whole.columns["steps"])
    np.testing.assert_allclose(cached.arrays["kl_path"], whole.arrays["kl_path"], rtol=1e-5, atol=1e-6)
    assert np.all(cached.columns["kl"] < cached.columns["initial_kl"])


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])  # sliding windows; learned positions
def test_candidates_after_the_shared_prefix_have_their_whole_kl(peaked_lm, family):
    lm = peaked_lm(family)
    config = HardPromptConfig(prompt_len=6, candidate_block=8, prefix=(7, 8), suffix=(9, 10))
    problem = HardProblem.build(lm, config)
    rng = np.random.default_rng(3)
    p = jax.numpy.asarray(random_targets(3, lm.vocab_size, seed=3), jax.numpy.float32)
    ids = rng.integers(3, lm.vocab_size, (3, 6))
    # Candidates equal to their prompt before a random start, anything from it on (20: the last block is padded).
    starts = rng.integers(0, 6, (3, 20))
    candidates = np.where(np.arange(6) >= starts[..., None], rng.integers(3, lm.vocab_size, (3, 20, 6)), ids[:, None])

    @jax.jit
    def kl(params, p, ids, candidates, starts):
        table, log_p, fixed = lm.embedding_matrix(params), safe_log(p), problem.context.prefix_cache(params, lm)
        whole = jax.vmap(problem.candidate_kl, in_axes=(None, None, 0, 0, 0))(params, table, p, log_p, candidates)
        prompts = problem.prompt_cache(params, table, fixed, ids)
        by_target, pooled = (problem.prompts_candidate_kl(params, table, fixed, p, log_p, prompts, candidates,
                                                          starts, round_units) for round_units in (1, 3))
        return whole, by_target, pooled

    whole, by_target, pooled = kl(lm.params, p, ids, candidates, starts)
    np.testing.assert_allclose(by_target, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled, whole, rtol=1e-5, atol=1e-6)


def test_multi_token_swaps_place_only_allowed_tokens(peaked_lm):
    lm = dataclasses.replace(peaked_lm("llama"), tokenizer=tiny_tokenizer(296))
    filters = dict(ascii_only=True, printable_only=True, no_whitespace_only=True, round_trip_tokens=True)
    config = HardPromptConfig(prompt_len=5, mode="gcg", n_replace=3, k=200, num_swaps=64, **filters)
    problem = HardProblem.build(lm, config)
    allowed = candidate_mask(lm, config)
    rng = np.random.default_rng(5)
    ids = rng.choice(np.flatnonzero(allowed), (2, 5))  # a beam of two
    # Gradients that favour the banned tokens most: the top-200 of some positions reach into them.
    table = np.asarray(lm.embedding_matrix(lm.params), np.float32)
    g = -np.where(allowed, 0.1, 1.0)[None, None, :] @ table + rng.normal(size=(2, 5, lm.d_model))

    candidates, starts, valid = jax.jit(problem._candidates, static_argnums=())(
        jax.numpy.asarray(table), jax.numpy.asarray(allowed), jax.numpy.asarray(g, jax.numpy.float32), ids, 0, 0,
        jax.random.key(0))  # step 0, the top window
    candidates, starts, valid = map(np.asarray, (candidates, starts, valid))
    assert candidates.shape == (2, 64, 5) and valid.all()
    assert allowed[candidates].all()
    changed = candidates != ids[:, None, :]
    np.testing.assert_array_equal(changed.sum(-1), 3)  # three distinct positions, each a new token
    np.testing.assert_array_equal(starts, changed.argmax(-1))  # equal to the prompt before its start

    targets = targets_of(lm, [[5, 9, 10, 6, 1], [20, 30, 40, 50, 2]])  # reachable only with banned tokens
    result = hard_prompt(lm, targets, dataclasses.replace(config, k=32, max_steps=4, slots=2))
    assert allowed[result.arrays["token_ids"]].all()
    assert np.all(result.columns["kl"] < result.columns["initial_kl"])


def test_round_trip_filter_keeps_only_prompts_that_round_trip(peaked_lm):
    lm = dataclasses.replace(peaked_lm("llama"), tokenizer=tiny_tokenizer(296))
    # Targets the model gives after prompts holding tokens that do not survive decode → encode ("x.y", " ",
    # "\t\n", U+FFFD): an unfiltered search is drawn to them.
    prompts = [[9, 7, 9], [8, 9, 8], [10, 9, 7], [7, 8, 9]]
    targets = targets_of(lm, prompts)
    assert not round_trips(lm.tokenizer, prompts).any()
    config = HardPromptConfig(prompt_len=3, k=64, max_steps=12, slots=4)
    free = hard_prompt(lm, targets, config)
    assert not free.columns["round_trips"].all()
    # From an initial prompt that fails ("x.y the the"), counted as KL +inf: the search leaves it for the first
    # candidate that passes (cycling hotflip swaps the first position first), and keeps only prompts that pass.
    start = np.tile([9, 4, 4], (4, 1))
    kept = hard_prompt(lm, targets, dataclasses.replace(config, round_trip_prompts=True), init_ids=start)
    assert kept.columns["round_trips"].all()
    assert np.isfinite(kept.columns["kl"]).all() and np.all(kept.columns["best_step"] >= 1)


def test_bank_init_starts_each_target_at_its_nearest_context(peaked_lm):
    """(That only contexts of allowed tokens are looked up is `ContextBank.nearest(rows=...)`'s, in
    test_context_bank: this tokenizer-less model has no filters to refuse a sampled token.)"""
    from distprompt_jax.prompting.context import FixedContext
    from distprompt_jax.prompting.context_bank import ContextBank

    lm = peaked_lm("llama")
    config = HardPromptConfig(prompt_len=3, init="bank", bank_size=16, seed=5, bos=True, k=8, max_steps=1, slots=4)
    # The bank the search samples (same seed, size and fixed tokens): targets made from two of its contexts.
    bank = ContextBank.sample(lm, 16, 3, seed=5, context=FixedContext((lm.config.bos_token_id,), ()), progress=False)
    targets = np.exp(bank.log_probs[[3, 9]].astype(np.float64))
    targets /= targets.sum(1, keepdims=True)
    result = hard_prompt(lm, targets, config)
    np.testing.assert_allclose(result.columns["initial_kl"], 0.0, atol=1e-5)
    np.testing.assert_array_equal(result.arrays["token_ids"], bank.ids[[3, 9]])
    with pytest.raises(ValueError, match="bank_size must be at least 1"):
        hard_prompt(lm, targets, dataclasses.replace(config, bank_size=0))


def test_sample_init_and_restarts_start_at_the_best_prompt_drawn_from_the_target(peaked_lm):
    lm = peaked_lm("llama")
    config = HardPromptConfig(prompt_len=2, init="sample", init_samples=64, k=8, max_steps=1, slots=4)
    # Mass on two tokens: 64 draws of two tokens cover all four prompts (a miss has probability ~1e-7).
    pairs = [(20, 21), (40, 41)]
    targets = np.zeros((3, lm.vocab_size))
    for row, pair in enumerate(pairs):
        targets[row, list(pair)] = 0.5
    targets[2, lm.config.bos_token_id] = 1.0  # no mass on an allowed token: drawn uniformly from them
    best = []
    for row, (a, b) in enumerate(pairs):
        prompts = np.array([[a, a], [a, b], [b, a], [b, b]])
        best.append(token_prompt_kl(lm, np.repeat(targets[row : row + 1], 4, axis=0), prompts, config).min())
    result = hard_prompt(lm, targets, config)
    np.testing.assert_allclose(result.columns["initial_kl"][:2], best, atol=2e-5)
    assert np.isfinite(result.columns["initial_kl"][2])
    # From the default init, one iteration changes one position; a restart starts from the target's draws.
    once = dataclasses.replace(config, init="repeat", restart_above=None)
    first = hard_prompt(lm, targets[:2], once)
    restarted = hard_prompt(lm, targets[:2], dataclasses.replace(once, restarts=2))
    # The best attempt is kept: no worse than the first, nor than the second's start (the best draw), which
    # beats the first attempt on some target.
    assert np.any(first.columns["kl"] > np.array(best) + 1e-3)
    assert np.all(restarted.columns["kl"] <= np.minimum(first.columns["kl"], best) + 2e-5)
    # Targets within restart_above of their floor (0 here) get no further attempt.
    unneeded = hard_prompt(lm, targets[:2], dataclasses.replace(once, restarts=2, restart_above=1e6))
    np.testing.assert_array_equal(unneeded.columns["kl"], first.columns["kl"])
    with pytest.raises(ValueError, match="init_samples must be at least 1"):
        hard_prompt(lm, targets, dataclasses.replace(config, init_samples=0))


def test_widening_ends_at_a_local_optimum_of_every_single_swap(peaked_lm):
    lm = peaked_lm("llama")
    targets = random_targets(4, lm.vocab_size, seed=3)
    narrow = HardPromptConfig(prompt_len=3, k=16, init="repeat", max_steps=300, patience=300, slots=4)
    # Windows of 16 ranks up to the whole vocabulary: a target that stops has tried every single swap. Patience
    # counts afresh in each window (two periods of positions here would end the search in its second window).
    wide = dataclasses.replace(narrow, widen=-(-lm.vocab_size // 16), patience=6)
    first, widened = hard_prompt(lm, targets, narrow), hard_prompt(lm, targets, wide)
    # The same search until the first stand-still; after it, only improvements.
    for row, steps in enumerate(first.columns["steps"]):
        np.testing.assert_array_equal(widened.arrays["kl_path"][row, :steps], first.arrays["kl_path"][row, :steps])
    assert np.all(widened.columns["kl"] <= first.columns["kl"])
    assert np.any(widened.columns["kl"] < first.columns["kl"] - 1e-3)
    allowed = np.flatnonzero(candidate_mask(lm))
    stopped = np.flatnonzero(widened.columns["steps"] < narrow.max_steps)
    assert len(stopped), "every widened search ran out of iterations: nothing below checks where they stop"
    for row in stopped:
        ids = widened.arrays["token_ids"][row]
        swaps = np.repeat(ids[None], 3 * len(allowed), axis=0)
        swaps[np.arange(len(swaps)), np.repeat(np.arange(3), len(allowed))] = np.tile(allowed, 3)
        kl = token_prompt_kl(lm, np.repeat(targets[row : row + 1], len(swaps), axis=0), swaps, narrow)
        assert kl.min() >= widened.columns["kl"][row] - 1e-5, row
    with pytest.raises(ValueError, match="widen applies to mode='hotflip' only"):
        hard_prompt(lm, targets, dataclasses.replace(GCG, widen=1))
    with pytest.raises(ValueError, match="widen must be a non-negative integer"):
        hard_prompt(lm, targets, dataclasses.replace(narrow, widen=-1))
    with pytest.raises(TypeError, match="HardPromptConfig: widen must be an int, got 1.5"):
        dataclasses.replace(narrow, widen=1.5)


def test_kicks_go_on_from_the_best_prompt_and_never_lose_it(peaked_lm):
    lm = peaked_lm("llama")
    targets = random_targets(4, lm.vocab_size, seed=3)
    targets[:, lm.config.bos_token_id] += 0.2  # mass on a special token: a kick must not draw it
    targets /= targets.sum(1, keepdims=True)
    plain = HardPromptConfig(prompt_len=3, k=4, init="repeat", max_steps=120, patience=120, slots=4)
    kicked_config = dataclasses.replace(plain, kicks=6, kick_size=2)
    first, kicked = hard_prompt(lm, targets, plain), hard_prompt(lm, targets, kicked_config)
    # The same search until the first stand-still (where the plain one stops); after it, the best is kept.
    assert np.all(first.columns["steps"] < plain.max_steps), "a plain search ran out of iterations: no stand-still"
    for row, steps in enumerate(first.columns["steps"]):
        np.testing.assert_array_equal(kicked.arrays["kl_path"][row, :steps], first.arrays["kl_path"][row, :steps])
        assert np.all(np.diff(kicked.arrays["kl_path"][row]) <= 0)
    assert np.all(kicked.columns["steps"] > first.columns["steps"])
    assert np.all(kicked.columns["kl"] <= first.columns["kl"])
    assert np.any(kicked.columns["kl"] < first.columns["kl"] - 1e-3)
    assert np.all(candidate_mask(lm)[kicked.arrays["token_ids"]])
    # The reported prompt is the reported KL's.
    np.testing.assert_allclose(token_prompt_kl(lm, targets, kicked.arrays["token_ids"], plain), kicked.columns["kl"],
                               atol=2e-5)
    # With one kick a search stops at its second stand-still, before the budget ends.
    few = hard_prompt(lm, targets, dataclasses.replace(kicked_config, kicks=1))
    assert np.all(few.columns["steps"] <= kicked.columns["steps"]) and np.all(few.columns["steps"] < plain.max_steps)
    with pytest.raises(ValueError, match="kicks applies to mode='hotflip' only"):
        hard_prompt(lm, targets, dataclasses.replace(GCG, kicks=1))
    for field, bad, message in (("kicks", -1, "kicks must be a non-negative integer"),
                                ("kick_size", 4, "kick_size must be between 1 and prompt_len=3")):
        with pytest.raises(ValueError, match=message):
            hard_prompt(lm, targets, dataclasses.replace(kicked_config, **{field: bad}))
