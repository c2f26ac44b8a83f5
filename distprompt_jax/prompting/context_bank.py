"""A context bank: natural token contexts and the next-token distribution the model gives after each, kept as
a table that targets are looked up in by KL.

A search can start a target from the bank's context whose distribution is nearest to it — that context's
tokens as a hard prompt's start, their embeddings as a soft prompt's — instead of from noise. The bank's
distributions are read inside the same fixed tokens (BOS, prefix, suffix, chat template) that the prompt will
sit in, so the start's KL is exactly the bank's KL for that target.

Contexts come from the model itself (`ContextBank.sample`: texts it writes after its BOS) or from any token
windows (`ContextBank.from_ids`, e.g. `windows_of_text`). The table holds log-probabilities [M, V] in float32:
M = 512 contexts of a 49k vocabulary take 100 MB.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distprompt_jax.prompting.context import FixedContext
from distprompt_jax.targets.generated import next_token_probs, sample_contexts

NO_CONTEXT = FixedContext((), ())
# log q below this is read as this: a float32 softmax underflows to 0 only for tokens far below any target's
# support, and the KL stays finite (and very large) for a target that puts mass there.
_LOG_FLOOR = float(np.log(np.finfo(np.float32).tiny))


@dataclasses.dataclass(frozen=True, eq=False)
class ContextBank:
    """ids [M, L]: each context's tokens (the part a prompt of length L replaces); log_probs [M, V]: log of
    the model's next-token distribution after them, inside `context`."""

    ids: np.ndarray
    log_probs: np.ndarray
    context: FixedContext = NO_CONTEXT

    def __post_init__(self):
        if self.ids.ndim != 2 or self.log_probs.ndim != 2 or len(self.ids) != len(self.log_probs):
            raise ValueError(f"a context bank needs ids [M, L] and log_probs [M, V] of the same M; got "
                             f"{self.ids.shape} and {self.log_probs.shape}")

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @classmethod
    def from_ids(cls, lm, ids, *, context: FixedContext = NO_CONTEXT, slots: int | None = None,
                 progress: bool = True) -> ContextBank:
        """The bank of given token contexts ids [M, L] (each read inside `context`'s fixed tokens)."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or not len(ids) or not ids.shape[1] or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"context ids must be a non-empty integer array [M, L], got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= lm.vocab_size:
            raise ValueError(f"context ids must be token ids in [0, {lm.vocab_size}) of {lm.name}")
        ids = ids.astype(np.int32)
        around = [np.concatenate([context.prefix_ids, row, context.suffix_ids]).astype(np.int32) for row in ids]
        probs = next_token_probs(lm, around, slots=slots, progress=progress)
        return cls(ids, np.maximum(np.log(probs), _LOG_FLOOR).astype(np.float32), context)

    @classmethod
    def sample(cls, lm, n: int = 512, length: int = 10, *, seed: int = 0, temperature: float = 1.0,
               context: FixedContext = NO_CONTEXT, slots: int | None = None, progress: bool = True) -> ContextBank:
        """A bank of n texts of `length` tokens that lm writes after its BOS (seeded; special tokens never
        sampled), their distributions read inside `context`."""
        ids = sample_contexts(lm, n, length, seed, temperature=temperature, slots=slots, progress=progress)
        return cls.from_ids(lm, ids, context=context, slots=slots, progress=progress)

    def kl(self, probs: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """KL(p‖q_c) [N, M'] of every target row of probs [N, V] against the bank's contexts (`rows`, or all)."""
        probs = np.asarray(probs, np.float32)
        if probs.ndim != 2 or probs.shape[1] != self.log_probs.shape[1]:
            raise ValueError(f"targets must be probabilities [N, {self.log_probs.shape[1]}] over the bank's "
                             f"vocabulary, got shape {probs.shape}")
        log_q = self.log_probs if rows is None else self.log_probs[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            neg_entropy = np.sum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1, dtype=np.float64)
        return neg_entropy[:, None] - (probs @ log_q.T).astype(np.float64)

    def nearest(self, probs: np.ndarray, *, rows: np.ndarray | None = None,
                chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(index [N], KL [N]): for each target, the context whose distribution is nearest in KL(p‖q_c), among
        the bank's `rows` (indices; default all), as an index into the whole bank."""
        probs = np.asarray(probs, np.float32)
        index, kl = np.zeros(len(probs), np.int64), np.zeros(len(probs), np.float64)
        for start in range(0, len(probs), chunk):
            table = self.kl(probs[start:start + chunk], rows)
            best = np.argmin(table, axis=1)
            index[start:start + chunk] = best if rows is None else np.asarray(rows)[best]
            kl[start:start + chunk] = table[np.arange(len(table)), best]
        return index, kl

    def save(self, path) -> None:
        np.savez(path, ids=self.ids, log_probs=self.log_probs, prefix_ids=np.asarray(self.context.prefix_ids, np.int64),
                 suffix_ids=np.asarray(self.context.suffix_ids, np.int64))

    @classmethod
    def load(cls, path) -> ContextBank:
        with np.load(path) as saved:
            context = FixedContext(tuple(int(i) for i in saved["prefix_ids"]),
                                   tuple(int(i) for i in saved["suffix_ids"]))
            return cls(saved["ids"], saved["log_probs"], context)


def windows_of_text(lm, text: str, length: int, *, stride: int | None = None) -> np.ndarray:
    """Token windows [M, length] of `text` (encoded without special tokens), every `stride` tokens (default:
    `length`, no overlap): natural contexts for `ContextBank.from_ids`."""
    ids = np.asarray(lm.encode(text, add_special_tokens=False))
    stride = length if stride is None else stride
    if length < 1 or stride < 1:
        raise ValueError(f"length and stride must be positive, got {length} and {stride}")
    if len(ids) < length:
        raise ValueError(f"the text is {len(ids)} tokens, fewer than one window of {length}")
    starts = np.arange(0, len(ids) - length + 1, stride)
    return np.stack([ids[s:s + length] for s in starts]).astype(np.int32)
