"""Fixed tokens around an optimized prompt."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class FixedContext:
    """Token ids placed before and after the optimized part of the input."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]

    @classmethod
    def build(cls, lm, prefix: str | tuple[int, ...], suffix: str | tuple[int, ...], bos: bool) -> FixedContext:
        prefix_ids = _ids(lm, prefix, "prefix")
        if bos:
            if lm.config.bos_token_id is None:
                raise ValueError(f"bos=True, but {lm.name} has no BOS token")
            prefix_ids = (lm.config.bos_token_id, *prefix_ids)
        return cls(prefix_ids, _ids(lm, suffix, "suffix"))

    @property
    def is_empty(self) -> bool:
        return not self.prefix_ids and not self.suffix_ids

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
