"""Fixed tokens around an optimized prompt, optionally inside the model's chat template.

With `template="chat"` the prompt (with any fixed prefix/suffix) is the user turn of the tokenizer's own
chat template and the next-token distribution is read where the assistant's reply begins: the template is
rendered (`apply_chat_template`, generation prompt added) around a marker, and the text before and after the
marker, tokenized on its own, becomes fixed tokens around the user's part.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from distprompt_jax.models.kv_cache import KVCache

TEMPLATES = ("none", "chat")
# Stands for the user's part while the chat template is rendered; templates copy message content verbatim.
_MARKER = "<<distprompt-user-turn>>"


@dataclasses.dataclass(frozen=True)
class FixedContext:
    """Token ids placed before and after the optimized part of the input."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]

    @classmethod
    def build(cls, lm, prefix: str | tuple[int, ...], suffix: str | tuple[int, ...], bos: bool,
              template: str = "none") -> FixedContext:
        prefix_ids, suffix_ids = _ids(lm, prefix, "prefix"), _ids(lm, suffix, "suffix")
        if template == "chat":
            before, after = chat_turn_ids(lm)
            prefix_ids, suffix_ids = before + prefix_ids, suffix_ids + after
        elif template != "none":
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if bos:
            if lm.config.bos_token_id is None:
                raise ValueError(f"bos=True, but {lm.name} has no BOS token")
            prefix_ids = (lm.config.bos_token_id, *prefix_ids)
        return cls(prefix_ids, suffix_ids)

    @property
    def is_empty(self) -> bool:
        return not self.prefix_ids and not self.suffix_ids

    def prefix_cache(self, params, lm) -> KVCache | None:
        """The keys and values of the fixed tokens before the optimized part (None when there are none).

        They depend on the weights alone: an engine computes them once per step for all of its targets (under
        the driver's vmap over slots they stay unbatched) and runs each target's prompt after them, where a
        whole input would recompute them, forward and backward, for every target.
        """
        if not self.prefix_ids:
            return None
        return lm.prefix_cache(params, lm.embed(params, jnp.asarray(self.prefix_ids)))

    def logits_after(self, params, lm, cache: KVCache | None, x):
        """Next-token logits of embeddings x [..., n, d] followed by the fixed suffix, after the cached positions
        (`prefix_cache`, or a cache extending it): with `prefix_cache` the logits of `around(x)`, up to rounding."""
        return lm.logits(params, self._with_suffix(params, lm, x), cache=cache)

    def logits_and_cache_after(self, params, lm, cache: KVCache | None, x) -> tuple[jax.Array, KVCache]:
        """`logits_after` and the keys/values of x's n positions (the suffix's left out), from one pass: with
        `prefix_cache`, `lm.extend_cache(params, prefix_cache, x)` less the prefix's part, up to rounding."""
        n = x.shape[-2]
        logits, own = lm.logits_and_cache(params, self._with_suffix(params, lm, x), cache=cache)
        return logits, KVCache(own.keys[..., :n, :, :], own.values[..., :n, :, :])

    def _with_suffix(self, params, lm, x):
        x = x.astype(lm.dtype)
        if self.suffix_ids:
            suffix = lm.embed(params, jnp.asarray(self.suffix_ids))
            x = jnp.concatenate([x, jnp.broadcast_to(suffix, x.shape[:-2] + suffix.shape)], -2)
        return x

    def around(self, params, lm, middle):
        """Input embeddings [len(prefix) + L + len(suffix), d] with `middle` ([L, d] or None) in between."""
        parts = []
        if self.prefix_ids:
            parts.append(lm.embed(params, jnp.asarray(self.prefix_ids)))
        if middle is not None:
            parts.append(middle.astype(lm.dtype))
        if self.suffix_ids:
            parts.append(lm.embed(params, jnp.asarray(self.suffix_ids)))
        return jnp.concatenate(parts, axis=0)


def _ids(lm, tokens: str | tuple[int, ...], what: str) -> tuple[int, ...]:
    if isinstance(tokens, str):
        return tuple(int(i) for i in lm.encode(tokens, add_special_tokens=False)) if tokens else ()
    ids = tuple(int(i) for i in tokens)
    bad = [i for i in ids if not 0 <= i < lm.vocab_size]
    if bad:
        raise ValueError(f"{what} token ids {bad} are outside the vocabulary [0, {lm.vocab_size})")
    return ids


def chat_turn_ids(lm) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids before, ids after) the user's content in the model's chat template, up to where the assistant's
    reply starts."""
    tokenizer = lm.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"template='chat', but {lm.name} has no chat template (its tokenizer has none)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(_MARKER) != 1:
        raise ValueError(f"{lm.name}'s chat template does not place the user's message verbatim once")
    before, after = text.split(_MARKER)

    def encode(part):
        return tuple(int(i) for i in lm.encode(part, add_special_tokens=False)) if part else ()

    return encode(before), encode(after)
