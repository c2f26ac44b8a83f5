"""LM-generated targets (same model and across tokenizers) and the token-string mapping between vocabularies."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import TINY_VOCAB

from distprompt_jax import load_model
from distprompt_jax.targets import (
    TargetError,
    TargetSet,
    build_token_mapping,
    cross_model_targets,
    map_distribution,
    model_targets,
)
from distprompt_jax.targets.mapping import UNMAPPED

SPECIALS = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}  # the tiny configs' pad, BOS and EOS ids


def word_tokenizer(words: list[str]):
    """A whitespace-split word-level tokenizer: the special tokens above, then `words` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIALS, **{w: len(SPECIALS) + i for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


WORDS = [f"w{i}" for i in range(TINY_VOCAB - len(SPECIALS))]


@pytest.fixture(scope="module")
def tiny_lm(tiny_hf_dir):
    return load_model(tiny_hf_dir("llama")[1], tokenizer=word_tokenizer(WORDS))


_REFERENCES = {}


def reference(lm, context_ids, temperature=1.0):
    """softmax(lm.logits(embed(context)) / T) straight from the model interface (jitted: eager is slow)."""
    if id(lm) not in _REFERENCES:
        _REFERENCES[id(lm)] = (lm, jax.jit(lambda params, ids: lm.logits(params, lm.embed(params, ids))))
    logits = _REFERENCES[id(lm)][1](lm.params, np.asarray(context_ids, np.int32))
    return np.asarray(jax.nn.softmax(logits / temperature))


# --- same model -------------------------------------------------------------------------------------


def test_sampled_targets_are_the_models_next_token_distribution_on_their_context(tiny_lm):
    targets = model_targets(tiny_lm, 5, seed=4, context_len=5, positions=(2, 5), target_temperature=2.0,
                            progress=False)
    meta = targets.metadata
    assert targets.probs.shape == (5, TINY_VOCAB) and set(meta.kind) == {"model"}
    assert list(meta.context_index) == [0, 0, 1, 1, 2] and list(meta.position) == [2, 5, 2, 5, 2]
    assert list(meta.seed) == [4, 4, 5, 5, 6]
    for row, context in enumerate(meta.context_ids):
        assert context[0] == SPECIALS["<bos>"] and len(context) == 1 + meta.position[row]
        assert not set(context[1:]) & set(SPECIALS.values())  # special tokens are never sampled
        np.testing.assert_allclose(targets.probs[row], reference(tiny_lm, context, 2.0), rtol=0, atol=2e-6)
        assert meta.context_text[row] == tiny_lm.tokenizer.decode(context)
    # The two targets of a context share it: the shorter context is a prefix of the longer one.
    assert meta.context_ids[1][:3] == meta.context_ids[0]
    np.testing.assert_allclose(meta.entropy, meta.target_entropy)
    assert (meta.target_temperature == 2.0).all() and (meta.sampling_temperature == 1.0).all()
    assert (meta.source_model == tiny_lm.name).all()


def test_sampling_is_seeded_and_chunking_does_not_change_contexts(tiny_lm):
    first = model_targets(tiny_lm, 6, seed=1, context_len=5, progress=False)
    chunked = model_targets(tiny_lm, 6, seed=1, context_len=5, slots=4, progress=False)
    shifted = model_targets(tiny_lm, 4, seed=3, context_len=5, progress=False)
    assert first.metadata.context_ids.tolist() == chunked.metadata.context_ids.tolist()
    np.testing.assert_allclose(first.probs, chunked.probs, rtol=0, atol=2e-6)
    assert shifted.metadata.context_ids.tolist() == first.metadata.context_ids.tolist()[2:]
    other = model_targets(tiny_lm, 6, seed=100, context_len=5, progress=False)
    assert other.metadata.context_ids.tolist() != first.metadata.context_ids.tolist()
    colder = model_targets(tiny_lm, 6, seed=1, context_len=5, temperature=0.05, progress=False)
    assert colder.metadata.context_ids.tolist() != first.metadata.context_ids.tolist()


def test_seed_text_starts_every_context(tiny_lm):
    targets = model_targets(tiny_lm, 3, seed_text="w5 w6 w7", context_len=3, progress=False)  # 6 tokens
    for context in targets.metadata.context_ids:
        assert context[:3] == [9, 10, 11] and len(context) == 6
        np.testing.assert_allclose(targets.probs[targets.metadata.context_ids.tolist().index(context)],
                                   reference(tiny_lm, context), rtol=0, atol=2e-6)


def test_contexts_from_a_file(tiny_lm, tmp_path):
    lines = ["w1 w2 w3", "", "w10", "w4 w4 w4 w4 w4 w9", "w7 w8"]
    path = tmp_path / "contexts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    targets = model_targets(tiny_lm, 3, contexts_file=path, progress=False)
    meta = targets.metadata
    assert meta.context_text.tolist() == ["w1 w2 w3", "w10", "w4 w4 w4 w4 w4 w9"]  # blank lines skipped
    for row, context in enumerate(meta.context_ids):
        assert context == tiny_lm.encode(meta.context_text[row]).tolist()
        np.testing.assert_allclose(targets.probs[row], reference(tiny_lm, context), rtol=0, atol=2e-6)
    assert meta.seed.isna().all() and (meta.context_source == str(path)).all()
    with pytest.raises(ValueError, match="4 non-blank lines"):
        model_targets(tiny_lm, 5, contexts_file=path, progress=False)
    with pytest.raises(ValueError, match="each line is one context"):
        model_targets(tiny_lm, 2, contexts_file=path, positions=(1,), progress=False)
    with pytest.raises(FileNotFoundError):
        model_targets(tiny_lm, 1, contexts_file=tmp_path / "missing.txt", progress=False)


def test_contexts_inside_the_chat_template(tiny_lm, tmp_path):
    tokenizer = word_tokenizer(WORDS)
    tokenizer.chat_template = (
        "{% for m in messages %}w20 {{ m['content'] }} w21{% endfor %}{% if add_generation_prompt %} w22{% endif %}"
    )
    lm = dataclasses.replace(tiny_lm, tokenizer=tokenizer)
    def w(*names):
        return [int(lm.encode(n, add_special_tokens=False)[0]) for n in names]

    path = tmp_path / "contexts.txt"
    path.write_text("w1 w2\nw3\n", encoding="utf-8")
    from_file = model_targets(lm, 2, contexts_file=path, template="chat", progress=False)
    assert from_file.metadata.context_ids.tolist() == [w("w20", "w1", "w2", "w21", "w22"), w("w20", "w3", "w21", "w22")]
    sampled = model_targets(lm, 2, seed=3, context_len=3, template="chat", progress=False)
    for targets in (from_file, sampled):
        assert (targets.metadata.template == "chat").all()
        for row, context in enumerate(targets.metadata.context_ids):
            assert context[:1] == w("w20") and context[-2:] == w("w21", "w22")
            np.testing.assert_allclose(targets.probs[row], reference(lm, context), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="has no chat template"):
        model_targets(tiny_lm, 1, template="chat", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be"), (dict(temperature=0.0), "temperature"),
    (dict(target_temperature=-1), "target_temperature"),
    (dict(positions=(0, 6)), "positions"), (dict(positions=()), "positions"), (dict(context_len=0), "context_len"),
    (dict(slots=0), "slots"),
])
def test_model_targets_refuse_bad_options(tiny_lm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_targets(tiny_lm, **{"n": 2, "context_len": 5, **kwargs}, progress=False)


def test_model_targets_without_a_tokenizer(tiny_lm):
    lm = dataclasses.replace(tiny_lm, tokenizer=None)
    targets = model_targets(lm, 2, context_len=5, progress=False)
    assert targets.metadata.context_text.isna().all() and len(targets.metadata.context_ids[0]) == 6
    with pytest.raises(ValueError, match="without a tokenizer"):
        model_targets(lm, 1, seed_text="w1", progress=False)


# --- the token mapping on a hand-built pair of tokenizers -------------------------------------------


def bpe_tokenizer():
    """A BPE tokenizer written out by hand: characters, merges building "hello", "world" and "lo", and a
    token "ca" that no merge produces (so only an exact string match can reach it)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "h", "e", "l", "o", "w", "r", "d", "c", "a", "t", "he", "ll", "hell", "hello",
              "wo", "wor", "worl", "world", "lo", "ca", "<s>"]
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("w", "o"), ("wo", "r"), ("wor", "l"),
              ("worl", "d"), ("l", "o")]
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>")


def source_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "hello", "world", "helloworld", "cat", "zzz", "ca", "lo", "\ufffd"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def test_mapping_of_a_hand_built_pair_is_the_documented_one():
    # Source id 11 lies beyond the source tokenizer (a padded model vocabulary).
    mapping = build_token_mapping(source_tokenizer(), bpe_tokenizer(), 12, 22)
    #                 <pad> <s> </s> hello world helloworld cat zzz  ca  lo  \ufffd  (none)
    expected_table = [-1, -1, -1, 14, 18, 14, 8, -1, 20, 19, -1, -1]
    expected_exact = [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    np.testing.assert_array_equal(mapping.table, expected_table)
    np.testing.assert_array_equal(mapping.exact, np.array(expected_exact, bool))
    assert mapping.table[0] == UNMAPPED and mapping.target_vocab_size == 22

    source = np.array([[0.05, 0.05, 0.05, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05],
                       [0, 0, 0, 0, 0, 0, 0, 0.5, 0, 0.25, 0, 0.25]])
    probs, mapped = map_distribution(source, mapping)
    np.testing.assert_allclose(mapped, [0.65, 0.25])
    expected = np.zeros((2, 22))
    expected[0, [14, 18, 8, 20, 19]] = np.array([0.3, 0.1, 0.1, 0.1, 0.05]) / 0.65
    expected[1, 19] = 1.0
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)
    assert probs.dtype == np.float32

    with pytest.raises(TargetError, match=r"rows \[0\]"):
        map_distribution(np.eye(12)[[0]], mapping)  # all mass on <pad>: nothing maps
    with pytest.raises(TargetError, match=r"\[N, 12\]"):
        map_distribution(np.ones((1, 11)) / 11, mapping)


def test_cross_model_targets_between_tiny_models_with_permuted_vocabularies(tiny_hf_dir):
    # Same words, different ids: every word maps exactly onto its twin; special tokens map nowhere.
    permutation = np.random.default_rng(0).permutation(len(WORDS))
    source = load_model(tiny_hf_dir("gemma3")[1], tokenizer=word_tokenizer(WORDS))
    target = load_model(tiny_hf_dir("llama")[1], tokenizer=word_tokenizer([WORDS[i] for i in permutation]))
    targets = cross_model_targets(source, target, 3, seed=2, context_len=5, progress=False)
    meta = targets.metadata
    assert set(meta.kind) == {"cross_model"} and (meta.source_model == source.name).all()

    twin = np.empty(len(WORDS), int)
    twin[permutation] = np.arange(len(WORDS))
    for row, context in enumerate(meta.context_ids):
        p_source = reference(source, context).astype(np.float64)
        words = p_source[len(SPECIALS):]
        assert np.isclose(meta.mapped_mass[row], words.sum(), rtol=1e-6)
        expected = np.zeros(TINY_VOCAB)
        expected[len(SPECIALS) + twin] = words / words.sum()
        np.testing.assert_allclose(targets.probs[row], expected, rtol=0, atol=2e-6)
    unrelated = build_token_mapping(source_tokenizer(), bpe_tokenizer(), 12, 22)
    with pytest.raises(ValueError, match="mapping is 12 -> 22"):
        cross_model_targets(source, target, 1, mapping=unrelated)


def test_generated_targets_round_trip_through_files(tiny_lm, tmp_path):
    targets = model_targets(tiny_lm, 3, seed_text="w1", context_len=5, progress=False)
    loaded = TargetSet.load(targets.save(tmp_path / "t"), TINY_VOCAB)
    np.testing.assert_array_equal(loaded.probs, targets.probs)
    assert loaded.metadata.equals(targets.metadata)


# --- real models ------------------------------------------------------------------------------------


@pytest.mark.real_weights
def test_gemma_targets_mapped_onto_smollm2():
    source, lm = load_model("gemma3-270m"), load_model("smollm2-135m")
    mapping = build_token_mapping(source.tokenizer, lm.tokenizer, source.vocab_size, lm.vocab_size)
    for word in (" the", " Paris", "ing", "\n"):
        (source_id,) = source.tokenizer(word, add_special_tokens=False)["input_ids"]
        (target_id,) = lm.tokenizer(word, add_special_tokens=False)["input_ids"]
        assert mapping.table[source_id] == target_id and mapping.exact[source_id]
    targets = cross_model_targets(source, lm, 2, mapping=mapping, seed_text="The capital of France is",
                                  context_len=4, progress=False)
    assert targets.probs.shape == (2, lm.vocab_size) and (targets.metadata.mapped_mass > 0.9).all()
    own = model_targets(lm, 1, seed_text="The capital of France is", context_len=2, progress=False)
    np.testing.assert_allclose(own.probs[0], reference(lm, own.metadata.context_ids[0]), rtol=0, atol=1e-5)
