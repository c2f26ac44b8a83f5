"""Which vocabulary ids are special (control) tokens, and which are ordinary text."""

from __future__ import annotations

import numpy as np


def tokenizer_special_ids(tokenizer) -> set[int]:
    """The tokenizer's named special tokens and every added token it flags special.

    e.g. SmolLM2 names 3 special ids but flags 17 added tokens special (<repo_name>, <file_sep>, ...).
    """
    ids = {int(i) for i in tokenizer.all_special_ids}
    ids.update(int(i) for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


def special_token_ids(lm) -> set[int]:
    """The model's BOS/EOS and its tokenizer's special tokens."""
    special = {i for i in (lm.config.bos_token_id, lm.config.eos_token_id) if i is not None}
    if lm.tokenizer is not None:
        special |= tokenizer_special_ids(lm.tokenizer)
    return special


def ordinary_token_mask(lm) -> np.ndarray:
    """bool [V]: ids that are not special and that the tokenizer knows (embedding rows past it are padding)."""
    ordinary = np.ones(lm.vocab_size, bool)
    ordinary[[i for i in special_token_ids(lm) if 0 <= i < lm.vocab_size]] = False
    if lm.tokenizer is not None:
        ordinary[min(lm.vocab_size, len(lm.tokenizer)):] = False
    return ordinary
