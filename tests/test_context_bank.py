"""The context bank: contexts' next-token distributions read inside the prompt's fixed tokens, and lookup by KL."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_targets_generated import WORDS, word_tokenizer

from distprompt_jax import load_model
from distprompt_jax.prompting.context import FixedContext
from distprompt_jax.prompting.context_bank import ContextBank, windows_of_text


@pytest.fixture(scope="module")
def lm(tiny_hf_dir):
    return load_model(tiny_hf_dir("llama")[1], tokenizer=word_tokenizer(WORDS))


def model_distribution(lm, context: FixedContext, ids) -> np.ndarray:
    """The next-token distribution of a soft prompt equal to ids' embeddings inside `context`, straight
    from the model interface: what a search started from that context sees at step 0."""
    x = context.around(lm.params, lm, lm.embed(lm.params, np.asarray(ids, np.int32)))
    return np.asarray(jax.nn.softmax(jax.jit(lm.logits)(lm.params, x)))


def test_a_target_made_from_a_context_finds_that_context(lm):
    context = FixedContext.build(lm, "", "w7 w8", bos=True)
    bank = ContextBank.sample(lm, 12, 4, seed=3, context=context, progress=False)
    assert bank.ids.shape == (12, 4) and bank.log_probs.shape == (12, lm.vocab_size)
    assert len({tuple(row) for row in bank.ids}) == 12  # distinct samples
    targets = np.stack([model_distribution(lm, context, bank.ids[i]) for i in (7, 2)])
    index, kl = bank.nearest(targets, chunk=1)
    np.testing.assert_array_equal(index, [7, 2])
    np.testing.assert_allclose(kl, 0.0, atol=1e-5)
    # Every other context is farther, by the KL the table gives.
    table = bank.kl(targets)
    assert np.all(np.delete(table[0], 7) > kl[0] + 1e-3)
    # Among given rows only (an index into the whole bank): without context 7, the next nearest of the rest.
    rows = np.delete(np.arange(12), 7)
    index, kl = bank.nearest(targets, rows=rows)
    # The same KL summed in other chunks differs by float32 rounding (4.8e-7 measured: rel 1.7e-4 at this KL).
    assert index[0] == rows[np.argmin(table[0, rows])] and kl[0] == pytest.approx(table[0, rows].min(), abs=1e-5)
    assert index[1] == 2


def test_the_bank_is_read_inside_the_fixed_tokens(lm):
    ids = np.array([[5, 6, 7], [9, 10, 11]])
    plain = ContextBank.from_ids(lm, ids, progress=False)
    framed_context = FixedContext.build(lm, "w1", "w2", bos=True)
    framed = ContextBank.from_ids(lm, ids, context=framed_context, progress=False)
    for i, row in enumerate(ids):
        np.testing.assert_allclose(np.exp(plain.log_probs[i]), model_distribution(lm, FixedContext((), ()), row),
                                   atol=1e-6)
        np.testing.assert_allclose(np.exp(framed.log_probs[i]), model_distribution(lm, framed_context, row),
                                   atol=1e-6)
    assert not np.allclose(plain.log_probs, framed.log_probs)


def test_windows_of_a_text_and_a_saved_bank(lm, tmp_path):
    text = " ".join(f"w{i}" for i in range(10, 21))  # 11 tokens
    windows = windows_of_text(lm, text, 4, stride=3)
    np.testing.assert_array_equal(windows[:, 0], lm.encode(text, add_special_tokens=False)[[0, 3, 6]])
    assert windows.shape == (3, 4)
    bank = ContextBank.from_ids(lm, windows, context=FixedContext.build(lm, "", "", bos=True), progress=False)
    bank.save(tmp_path / "bank.npz")
    again = ContextBank.load(tmp_path / "bank.npz")
    np.testing.assert_array_equal(again.ids, bank.ids)
    np.testing.assert_array_equal(again.log_probs, bank.log_probs)
    assert again.context == bank.context


def test_bad_input_is_named(lm):
    with pytest.raises(ValueError, match="token ids in"):
        ContextBank.from_ids(lm, [[1, lm.vocab_size]], progress=False)
    with pytest.raises(ValueError, match=r"integer array \[M, L\]"):
        ContextBank.from_ids(lm, [1, 2, 3], progress=False)
    bank = ContextBank.from_ids(lm, [[5, 6]], progress=False)
    with pytest.raises(ValueError, match="over the bank's vocabulary"):
        bank.nearest(np.ones((2, 7)) / 7)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows_of_text(lm, "w1 w2", 3)
