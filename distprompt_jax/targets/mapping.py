"""Moving a next-token distribution from one tokenizer's vocabulary onto another's, through token strings.

The mapping (ours): every source token id goes to at most one target id, fixed once per tokenizer pair.
  1. Special tokens of the source (BOS, EOS, pad, and every added token marked special) and ids beyond
     the source tokenizer map nowhere: their mass is dropped and counted as unmapped.
  2. A source token is decoded on its own (`decode([id])`, special tokens kept, no clean-up). A string
     that is empty or holds U+FFFD (a piece of a multi-byte UTF-8 character, as byte-level and
     byte-fallback tokens decode alone) maps nowhere.
  3. If some target token decodes to exactly that string, the source token maps to it (the lowest such id
     when several do).
  4. Otherwise the string is tokenized by the target tokenizer (no special tokens added) and the source
     token maps to the first resulting token, so " international" may land on " intern". Strings the
     target cannot tokenize, or that start with a special token, map nowhere.
Mapping a distribution adds each source token's probability to its target id; `mapped_mass` is the share
that found a target, and the result is renormalized over it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distprompt_jax.targets.io import TargetError
from distprompt_jax.tokens import tokenizer_special_ids

UNMAPPED = -1


@dataclasses.dataclass(frozen=True)
class TokenMapping:
    """Source id -> target id (or UNMAPPED) as `table` [V_source] int64; `exact` marks rule-3 matches."""

    table: np.ndarray
    target_vocab_size: int
    exact: np.ndarray

    @property
    def source_vocab_size(self) -> int:
        return len(self.table)


def token_strings(tokenizer, vocab_size: int) -> list[str | None]:
    """Each id's string, decoded alone; None for ids the tokenizer does not have."""
    known = min(vocab_size, len(tokenizer))
    strings = tokenizer.batch_decode(
        [[i] for i in range(known)], skip_special_tokens=False, clean_up_tokenization_spaces=False,
    )
    return strings + [None] * (vocab_size - known)


def build_token_mapping(source_tokenizer, target_tokenizer, source_vocab_size: int,
                        target_vocab_size: int) -> TokenMapping:
    """The mapping described in this module's docstring, for one pair of tokenizers and vocabulary sizes."""
    source_special = tokenizer_special_ids(source_tokenizer)
    target_special = tokenizer_special_ids(target_tokenizer)
    exact_ids: dict[str, int] = {}
    for i, text in enumerate(token_strings(target_tokenizer, target_vocab_size)):
        if text and i not in target_special:
            exact_ids.setdefault(text, i)

    table = np.full(source_vocab_size, UNMAPPED, np.int64)
    exact = np.zeros(source_vocab_size, bool)
    to_tokenize: dict[int, str] = {}
    for i, text in enumerate(token_strings(source_tokenizer, source_vocab_size)):
        if i in source_special or not text or "\ufffd" in text:
            continue
        if text in exact_ids:
            table[i], exact[i] = exact_ids[text], True
        else:
            to_tokenize[i] = text
    if to_tokenize:
        encoded = target_tokenizer(list(to_tokenize.values()), add_special_tokens=False)["input_ids"]
        for i, ids in zip(to_tokenize, encoded):
            if ids and ids[0] not in target_special and ids[0] < target_vocab_size:
                table[i] = ids[0]
    return TokenMapping(table=table, target_vocab_size=target_vocab_size, exact=exact)


def map_distribution(probs_src, mapping: TokenMapping) -> tuple[np.ndarray, np.ndarray]:
    """Source distributions [N, V_source] -> (target distributions [N, V_target] float32, mapped_mass [N]).

    Sums in float64. Raises TargetError naming the rows of which no mass maps at all.
    """
    probs_src = np.asarray(probs_src, np.float64)
    if probs_src.ndim != 2 or probs_src.shape[1] != mapping.source_vocab_size:
        raise TargetError(
            f"source distributions must be [N, {mapping.source_vocab_size}]; got shape {probs_src.shape}"
        )
    mapped_sources = np.flatnonzero(mapping.table != UNMAPPED)
    # Group source columns by target id and add each group with one reduceat.
    order = mapped_sources[np.argsort(mapping.table[mapped_sources], kind="stable")]
    targets = mapping.table[order]
    starts = np.flatnonzero(np.r_[True, targets[1:] != targets[:-1]])
    out = np.zeros((len(probs_src), mapping.target_vocab_size))
    if len(order):
        out[:, targets[starts]] = np.add.reduceat(probs_src[:, order], starts, axis=1)
    mapped_mass = out.sum(axis=1)
    empty = np.flatnonzero(~(mapped_mass > 0))
    if len(empty):
        raise TargetError(f"no probability mass maps onto the target vocabulary for rows {empty[:20].tolist()}")
    return (out / mapped_mass[:, None]).astype(np.float32), mapped_mass
