"""LM-generated targets: next-token distributions a model produces on real contexts.

Contexts are either sampled from a model (seeded) or read from a text file. Sampling has no KV cache: a
context lives in a fixed-length token buffer and each step runs the whole buffer through the model,
reading the logits at the last filled position — causal attention makes the unfilled tail irrelevant,
and one compiled program serves every step and every context. The targets of a context are then read off
one more forward pass at the chosen positions. Both are per-row functions run on the solver driver
(`batching.map_rows`), which batches the rows and splits them over the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from distprompt_jax.lm import abstract_language_model
from distprompt_jax.prompting.context import TEMPLATES, chat_turn_ids
from distprompt_jax.targets.batching import map_rows
from distprompt_jax.targets.controlled import target_seeds
from distprompt_jax.targets.io import TargetError, TargetSet, entropy_nats
from distprompt_jax.targets.mapping import TokenMapping, build_token_mapping, map_distribution
from distprompt_jax.tokens import ordinary_token_mask

# Contexts computed at once when not given: a forward pass holds [slots, L, d] activations and [slots, V]
# logits, small next to the model for short contexts.
DEFAULT_CONTEXT_SLOTS = 32


@functools.lru_cache(maxsize=16)
def _architecture(config, dtype_name: str):
    """A parameterless stand-in for every model of this config and dtype: what the row functions below
    hold, so models that share an architecture share compiled code (and the compile cache holds no
    weights)."""
    return abstract_language_model(config, dtype_name)


def _forward_of(lm):
    return _architecture(lm.config, jnp.dtype(lm.dtype).name)


def _next_token_logits(lm, params, ids, position):
    """Logits [V] of the token after `position` of the token buffer ids [L]."""
    h = lm.run_layers(params, lm.input_stream(params, lm.embed(params, ids)), 0, lm.n_layers)
    return lm.unembed(params, lm.final_norm(params, h[position]))


@dataclasses.dataclass(frozen=True)
class _SampledContext:
    """Row function: fill a buffer row["ids"] [L] from position shared["start"] on, token t drawn from
    softmax(logits / shared["temperature"]) over the tokens not shared["banned"] [V], with key
    fold_in(key(row["seed"]), t)."""

    lm: Any  # the architecture (_forward_of)

    def __call__(self, shared, row):
        key = jax.random.key(row["seed"])

        def step(t, ids):
            logits = jnp.where(shared["banned"], -jnp.inf, _next_token_logits(self.lm, shared["lm"], ids, t - 1))
            token = jax.random.categorical(jax.random.fold_in(key, t), logits / shared["temperature"])
            return ids.at[t].set(token.astype(ids.dtype))

        return {"ids": jax.lax.fori_loop(shared["start"], row["ids"].shape[0], step, row["ids"])}


@dataclasses.dataclass(frozen=True)
class _NextTokenDistribution:
    """Row function: softmax(logits / shared["temperature"]) [V] of the token after position row["read_at"]
    of the buffer row["ids"]."""

    lm: Any  # the architecture (_forward_of)

    def __call__(self, shared, row):
        logits = _next_token_logits(self.lm, shared["lm"], row["ids"], row["read_at"])
        return {"probs": jax.nn.softmax(logits / shared["temperature"])}


def _check_positive(name: str, value) -> float:
    if not (isinstance(value, (int, float, np.integer, np.floating)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _generate(lm, n, seed, *, context_len, temperature, target_temperature, seed_text, contexts_file,
              positions, slots, params, progress, template="none"):
    """Contexts and their next-token distributions: (probs float32 [n, V], metadata columns).

    With template="chat" each context is the user turn of lm's chat template and the target is read where
    the assistant's reply starts (sampling starts after the template's opening)."""
    n = _check_count("n", n)
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    chat = chat_turn_ids(lm) if template == "chat" else None
    slots = DEFAULT_CONTEXT_SLOTS if slots is None else _check_count("slots", slots)
    temperature = _check_positive("temperature", temperature)
    target_temperature = _check_positive("target_temperature", target_temperature)
    params = lm.params if params is None else params
    if contexts_file is not None:
        if seed_text is not None or positions is not None:
            raise ValueError("seed_text and positions apply to sampled contexts; with contexts_file each "
                             "line is one context, its target the next token after the whole line")
        contexts, columns = _file_contexts(lm, n, contexts_file, chat)
        buffers, read_at = _right_padded(contexts)  # one target per line, after its last token
    else:
        context_len = _check_count("context_len", context_len)
        positions = (context_len,) if positions is None else tuple(positions)
        if not positions or any(
            not isinstance(p, (int, np.integer)) or not 0 <= p <= context_len for p in positions
        ):
            raise ValueError(f"positions must be generated-token counts in [0, context_len={context_len}], "
                             f"got {positions!r}")
        prefix = _prefix(lm, seed_text) if chat is None else np.concatenate([
            np.asarray(chat[0], np.int32),
            lm.encode(seed_text, add_special_tokens=False) if seed_text is not None else np.zeros(0, np.int32),
        ]).astype(np.int32)
        n_contexts = -(-n // len(positions))
        seeds = target_seeds(seed, n_contexts)
        buffers = _sampled_buffers(lm, params, prefix, seeds, context_len, temperature, slots, progress)
        # Context c contributes targets after prefix + p generated tokens, p in positions, in that order.
        context_of = np.repeat(np.arange(n_contexts), len(positions))[:n]
        lengths = len(prefix) + np.tile(np.asarray(positions), n_contexts)[:n]
        contexts = [buffers[c, :length] for c, length in zip(context_of, lengths)]
        if chat is None:
            buffers, read_at = buffers[context_of], (lengths - 1).astype(np.int32)
        else:  # the assistant's turn opens after the sampled user text
            contexts = [np.concatenate([c, np.asarray(chat[1], np.int32)]) for c in contexts]
            buffers, read_at = _right_padded(contexts)
        columns = {"seed": seeds[context_of], "context_index": context_of, "position": lengths - len(prefix)}

    probs = _distributions(lm, params, buffers, read_at, target_temperature, slots, progress,
                           desc=f"{lm.name} next-token targets")
    columns.update({
        "context_ids": [c.tolist() for c in contexts],
        "context_text": [_decode(lm, c) for c in contexts],
        "sampling_temperature": temperature if contexts_file is None else np.nan,
        "target_temperature": target_temperature,
        "context_source": "sampled" if contexts_file is None else str(contexts_file),
        "template": template,
    })
    return probs, columns


def _prefix(lm, seed_text) -> np.ndarray:
    if seed_text is not None:
        prefix = lm.encode(seed_text)
        if not len(prefix):
            raise ValueError(f"seed_text {seed_text!r} encodes to no tokens")
        return prefix
    if lm.config.bos_token_id is None:
        raise ValueError(f"{lm.name} has no BOS token to start sampling from; pass seed_text")
    return np.array([lm.config.bos_token_id], np.int32)


def _sampled_buffers(lm, params, prefix, seeds, context_len, temperature, slots, progress) -> np.ndarray:
    """Token buffers [n_contexts, len(prefix) + context_len]: prefix, then sampled tokens.

    Special tokens (BOS, EOS, pad, markers such as Gemma's <start_of_image>) are never sampled: contexts
    are text, and an EOS mid-context would end the document the model thinks it is continuing. Nor are
    embedding rows past the tokenizer's vocabulary (padding).
    """
    buffers = np.zeros((len(seeds), len(prefix) + context_len), np.int32)
    buffers[:, : len(prefix)] = prefix
    shared = {"lm": params, "temperature": np.float32(temperature), "start": np.int32(len(prefix)),
              "banned": ~ordinary_token_mask(lm)}
    return map_rows(
        _SampledContext(_forward_of(lm)), {"ids": buffers, "seed": seeds.astype(np.uint32)}, shared=shared,
        slots=slots, desc=f"sampling {lm.name} contexts", progress=progress,
    )["ids"]


def _right_padded(contexts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Token buffers [n, longest] right-padded (causal attention ignores the tail), and where each ends."""
    ends = np.array([len(c) for c in contexts])
    buffers = np.zeros((len(contexts), ends.max()), np.int32)
    for row, context in enumerate(contexts):
        buffers[row, : len(context)] = context
    return buffers, (ends - 1).astype(np.int32)


def _file_contexts(lm, n: int, path, chat=None) -> tuple[list[np.ndarray], dict]:
    """The first n non-blank lines of a UTF-8 text file, encoded as the model's tokenizer does (or, with
    `chat` = (ids before, ids after), as the user turn of its chat template)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"contexts file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < n:
        raise ValueError(f"{path} has {len(lines)} non-blank lines (contexts) but {n} targets were asked for")
    if chat is None:
        contexts = [lm.encode(line) for line in lines[:n]]
    else:
        contexts = [np.asarray([*chat[0], *lm.encode(line, add_special_tokens=False), *chat[1]], np.int32)
                    for line in lines[:n]]
    empty = [i for i, c in enumerate(contexts) if not len(c)]
    if empty:
        raise ValueError(f"lines {empty[:10]} of {path} encode to no tokens")
    return contexts, {"seed": pd.array([None] * n, dtype="Int64"), "context_index": np.arange(n),
                      "position": np.array([len(c) for c in contexts])}


def _decode(lm, ids) -> str | None:
    return None if lm.tokenizer is None else lm.tokenizer.decode(list(ids), skip_special_tokens=False)


def model_targets(
    lm, n: int, seed=0, *, context_len: int = 16, temperature: float = 1.0, target_temperature: float = 1.0,
    seed_text: str | None = None, contexts_file: str | os.PathLike | None = None,
    positions=None, slots: int | None = None, params=None, progress: bool = True, template: str = "none",
) -> TargetSet:
    """n targets: lm's own next-token distributions on contexts it sampled, or on lines of a text file.

    Args:
      lm: the LanguageModel to be prompted (and the one that samples).
      n: number of targets.
      seed: context c is sampled with key(seed + c) (or from a sequence of per-context seeds).
      context_len: tokens sampled per context, after the prefix (BOS, or `seed_text` encoded as the model
        does, BOS included where it adds one). Special tokens (BOS, EOS, pad, markers) are never sampled.
      temperature: sampling temperature of the contexts.
      target_temperature: the target is softmax(logits / target_temperature) — above 1 spreads entropies up.
      contexts_file: a UTF-8 text file; each non-blank line is one context (no sampling), in file order.
      positions: for sampled contexts, after how many sampled tokens targets are read (default: the end,
        (context_len,)); several positions give several targets per context, context-major.
      slots: contexts computed at once (default 32), split over this process's devices.
      params: parameters to use instead of lm.params (e.g. sharded or bfloat16 copies).
      template: "chat" makes each context the user turn of lm's chat template, the target read where the
        assistant's reply starts (as prompts with template="chat" are); recorded in the metadata.
    Returns:
      TargetSet of kind "model", target i = softmax(lm.logits(params, lm.embed(params, context_ids[i])) /
      target_temperature). Metadata: target_id, kind, target_entropy (= entropy: the one it has), entropy,
      source_model, seed (per context; missing for file contexts), context_index, position (tokens sampled
      before the target; for a file line, its token count), context_ids (list), context_text (decoded with
      special tokens; None without a tokenizer), sampling_temperature, target_temperature, context_source
      ("sampled" or the file's path).
    """
    probs, columns = _generate(
        lm, n, seed, context_len=context_len, temperature=temperature, target_temperature=target_temperature,
        seed_text=seed_text, contexts_file=contexts_file, positions=positions, slots=slots,
        params=params, progress=progress, template=template,
    )
    return _target_set(probs, "model", lm.name, columns)


def sample_contexts(lm, n: int, length: int, seed=0, *, temperature: float = 1.0, slots: int | None = None,
                    params=None, progress: bool = True) -> np.ndarray:
    """Token ids [n, length]: n texts of `length` tokens sampled from lm after its BOS (context c with the
    seed of `model_targets`' context c; special tokens never sampled), the BOS itself not included."""
    n, length = _check_count("n", n), _check_count("length", length)
    prefix = _prefix(lm, None)
    buffers = _sampled_buffers(
        lm, lm.params if params is None else params, prefix, target_seeds(seed, n), length,
        _check_positive("temperature", temperature), DEFAULT_CONTEXT_SLOTS if slots is None else slots, progress)
    return buffers[:, len(prefix):]


def next_token_probs(lm, contexts, *, temperature: float = 1.0, slots: int | None = None, params=None,
                     progress: bool = True) -> np.ndarray:
    """float32 [n, V]: softmax(logits / temperature) of the token after each context (token id sequences of
    any lengths, read after their last token)."""
    contexts = [np.asarray(c, np.int32) for c in contexts]
    if not contexts or any(len(c) == 0 for c in contexts):
        raise ValueError("next_token_probs needs at least one context, each of at least one token")
    buffers, read_at = _right_padded(contexts)
    return _distributions(lm, lm.params if params is None else params, buffers, read_at,
                          _check_positive("temperature", temperature),
                          DEFAULT_CONTEXT_SLOTS if slots is None else _check_count("slots", slots), progress,
                          desc=f"{lm.name} next-token distributions")


def _distributions(lm, params, buffers, read_at, temperature, slots, progress, desc) -> np.ndarray:
    """float32 [n, V]: the next-token distribution after position read_at[i] of buffers[i]."""
    return map_rows(
        _NextTokenDistribution(_forward_of(lm)), {"ids": buffers, "read_at": read_at},
        shared={"lm": params, "temperature": np.float32(temperature)}, slots=slots, desc=desc, progress=progress,
    )["probs"]


def cross_model_targets(
    source_lm, lm, n: int, seed=0, *, mapping: TokenMapping | None = None, context_len: int = 16,
    temperature: float = 1.0, target_temperature: float = 1.0, seed_text: str | None = None,
    contexts_file: str | os.PathLike | None = None, positions=None, slots: int | None = None,
    source_params=None, progress: bool = True, template: str = "none",
) -> TargetSet:
    """n targets over lm's vocabulary: source_lm's next-token distributions, mapped through token strings.

    Contexts are sampled from (or read for) source_lm exactly as in `model_targets`; each distribution is
    moved onto lm's vocabulary by `targets.mapping` (build it once with `build_token_mapping` and pass it
    as `mapping` to reuse it) and renormalized. Metadata as for `model_targets` (context ids are the
    source's), kind "cross_model", plus `mapped_mass`: the share of the source's probability that found a
    target token, before renormalizing.
    """
    for model, role in ((source_lm, "source_lm"), (lm, "lm")):
        if model.tokenizer is None:
            raise ValueError(f"{role} {model.name!r} has no tokenizer; cross-tokenizer mapping needs both")
    if mapping is None:
        mapping = build_token_mapping(source_lm.tokenizer, lm.tokenizer, source_lm.vocab_size, lm.vocab_size)
    elif (mapping.source_vocab_size, mapping.target_vocab_size) != (source_lm.vocab_size, lm.vocab_size):
        raise ValueError(
            f"mapping is {mapping.source_vocab_size} -> {mapping.target_vocab_size} tokens, but the models "
            f"have {source_lm.vocab_size} -> {lm.vocab_size}"
        )
    source_probs, columns = _generate(
        source_lm, n, seed, context_len=context_len, temperature=temperature,
        target_temperature=target_temperature, seed_text=seed_text, contexts_file=contexts_file,
        positions=positions, slots=slots, params=source_params, progress=progress, template=template,
    )
    probs, mapped_mass = map_distribution(source_probs, mapping)
    columns["mapped_mass"] = mapped_mass
    return _target_set(probs, "cross_model", source_lm.name, columns)


def _target_set(probs: np.ndarray, kind: str, source_model: str, columns: dict) -> TargetSet:
    entropy = entropy_nats(probs)
    metadata = pd.DataFrame({
        "target_id": np.arange(len(probs)),
        "kind": kind,
        "target_entropy": entropy,
        "entropy": entropy,
        "source_model": source_model,
        **columns,
    })
    if not np.all(np.isfinite(probs)):
        raise TargetError(f"the model produced non-finite probabilities for targets "
                          f"{np.flatnonzero(~np.isfinite(probs).all(axis=1))[:10].tolist()}")
    return TargetSet(probs=probs, metadata=metadata)
