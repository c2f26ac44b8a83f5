"""Hard prompts: real vocabulary tokens, found by gradient-guided coordinate search for many targets at once.

Each iteration, for every target: one `value_and_grad` of KL(p‖q) with respect to the prompt's input
embeddings scores every token w at every position i by the linearized change of the loss when w replaces
the current token, (e_w − e_i)·∇_{e_i} (HotFlip / universal triggers, Wallace et al. 2019). The k lowest
scores per position are the candidates. Candidate swaps are then evaluated exactly — one forward each, KL
needs no sampling — and the best is kept if it beats the current prompt.

- mode "hotflip" (the paper's method): the k candidates of one position per iteration, cycling through the
  positions (or the k best (position, token) pairs over all positions), with an optional beam of prompts.
- mode "gcg" (Zou et al. 2023): B single-position swaps sampled uniformly from the per-position top-k.

The search is a pure function of (target, its index in the set, config): targets of a chunk run side by side under
vmap inside one compiled `while_loop` segment, their candidate forwards batched in blocks, and the chunk's
target axis sharded over the devices, exactly as the soft engine does.

Which tokens may appear: special tokens never (the tokenizer's special and added-special tokens, and the
model's BOS/EOS ids); optionally only ASCII, printable or not-whitespace-only tokens, and only tokens that
survive decode → encode on their own. Whether a whole prompt survives decode → encode depends on its
neighbours (BPE merges across token boundaries), which cannot be checked inside the compiled search, so
it is checked afterwards and reported per target (`round_trips`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from distprompt_jax import parallel
from distprompt_jax.prompting import context as context_lib
from distprompt_jax.prompting.engine import (
    ChunkEngine, ChunkRun, check_shared_fields, compiled_problem, without_params,
)
from distprompt_jax.prompting.objective import distribution_report, kl_from_logits
from distprompt_jax.results import PromptResults
from distprompt_jax.targets import as_target_set
from distprompt_jax.tokens import ordinary_token_mask

MODES = ("hotflip", "gcg")
POSITIONS = ("cycle", "best")
INITS = ("repeat", "random", "text")
DEFAULT_INIT_TEXT = " the"  # the repeated common token of init="repeat", where the tokenizer has it as one token


@dataclasses.dataclass(frozen=True)
class HardPromptConfig:
    """Defaults are ours where the paper is silent (see paper-notes): L = 10, k = 64, B = 128, 200
    iterations, init a repeated common token, special tokens excluded, best KL reported."""

    prompt_len: int = 10
    mode: str = "hotflip"  # "hotflip" | "gcg"
    k: int = 64  # candidates per position: the k tokens with the lowest gradient score
    num_swaps: int = 128  # gcg: B swaps sampled from the per-position top-k each iteration
    positions: str = "cycle"  # hotflip: "cycle" (position t mod L at iteration t) | "best" (k best pairs overall)
    beam_width: int = 1  # prompts kept per target; each proposes its own candidates
    max_steps: int = 200  # iterations
    patience: int = 50  # stop a target after this many iterations without improving by more than min_delta
    min_delta: float = 0.0
    init: str = "repeat"  # one token repeated L times | "random" tokens (seeded, per target) | "text"
    init_token: int | str | None = None  # with init="repeat": an id or a one-token text; None: " the" (see docs)
    init_text: str | None = None  # with init="text": its tokens (exactly prompt_len of them) start the search
    prefix: str | tuple[int, ...] = ""  # fixed tokens before the prompt: text, or token ids
    suffix: str | tuple[int, ...] = ""  # fixed tokens after the prompt
    bos: bool = False  # put the model's BOS token first
    ascii_only: bool = False  # candidates: tokens whose text is ASCII
    printable_only: bool = False  # candidates: no control characters (but space, tab, newline), no partial UTF-8
    no_whitespace_only: bool = False  # candidates: tokens with some non-whitespace text
    round_trip_tokens: bool = False  # candidates: tokens whose text encodes back to that one token
    seed: int = 0
    chunk_size: int | None = None  # targets per compiled chunk; None sizes it to the available memory
    candidate_block: int | None = 32  # candidate forwards per target per compiled block; None: all at once
    segment_steps: int = 5  # iterations per compiled call (progress granularity)
    top_k: int = 10  # for the top-k overlap figure
    shard_params: bool = False  # split the weights over the devices (models too large for one device)

    def validate(self, lm) -> None:
        def fail(message):
            raise ValueError(f"HardPromptConfig: {message}")

        check_shared_fields(
            self, lm, INITS,
            at_least_one=("k", "num_swaps", "beam_width", "max_steps", "patience", "segment_steps", "top_k"),
            positive_or_none=("chunk_size", "candidate_block"),
        )
        if self.mode not in MODES:
            fail(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.positions not in POSITIONS:
            fail(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.mode != "hotflip" and self.positions != "cycle":
            fail(f"positions={self.positions!r} applies to mode='hotflip' only")
        if self.init_token is not None and self.init != "repeat":
            fail("init_token applies to init='repeat' only")
        if self.k > lm.vocab_size:
            fail(f"k={self.k} exceeds the vocabulary ({lm.vocab_size})")
        if self.mode == "hotflip" and self.positions == "cycle" and self.patience < self.prompt_len:
            fail(
                f"patience={self.patience} is less than prompt_len={self.prompt_len}: cycling hotflip revisits a "
                "position every prompt_len iterations, so a target would stop before every position was tried"
            )
        if lm.tokenizer is None:
            for name in ("ascii_only", "printable_only", "no_whitespace_only", "round_trip_tokens"):
                if getattr(self, name):
                    fail(f"{name} needs the model's tokenizer, and {lm.name} was loaded without one")
            if isinstance(self.init_token, str):
                fail(f"init_token={self.init_token!r} is text, and {lm.name} was loaded without a tokenizer")


# -- Which tokens may appear -------------------------------------------------------------------------------


def candidate_mask(lm, config: HardPromptConfig | None = None) -> np.ndarray:
    """bool [V]: the tokens the search may place in a prompt under `config`'s filters."""
    config = config or HardPromptConfig()
    allowed = ordinary_token_mask(lm)
    tokenizer = lm.tokenizer
    if tokenizer is None:
        return allowed
    known = min(lm.vocab_size, len(tokenizer))
    filters = (config.ascii_only, config.printable_only, config.no_whitespace_only, config.round_trip_tokens)
    if not any(filters):
        return allowed
    texts = tokenizer.batch_decode([[i] for i in range(known)])
    keep = np.ones(known, bool)
    if config.ascii_only:
        keep &= np.array([t.isascii() for t in texts])
    if config.printable_only:
        keep &= np.array([_printable(t) for t in texts])
    if config.no_whitespace_only:
        keep &= np.array([bool(t.strip()) for t in texts])
    if config.round_trip_tokens:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        keep &= np.array([list(e) == [i] for i, e in enumerate(encoded)])
    allowed[:known] &= keep
    return allowed


def _printable(text: str) -> bool:
    # U+FFFD is what a byte-level token holding part of a UTF-8 character decodes to on its own.
    return "\ufffd" not in text and all(c.isprintable() or c in " \t\n" for c in text)


def round_trips(tokenizer, token_ids) -> np.ndarray:
    """bool [N]: whether each prompt's decoded text encodes back to exactly its ids (no special tokens added)."""
    token_ids = np.asarray(token_ids)
    texts = tokenizer.batch_decode(token_ids.tolist())
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([list(e) == row.tolist() for e, row in zip(encoded, token_ids)], bool)


# -- The search --------------------------------------------------------------------------------------------


class _State(NamedTuple):
    """Per-target search state; every leaf has the target axis first."""

    ids: jax.Array  # [W, L] the beam, best first
    best_ids: jax.Array  # [L]
    best_kl: jax.Array
    best_step: jax.Array  # iterations run when the best was found (0: the initial prompt)
    initial_kl: jax.Array
    path: jax.Array  # [max_steps] best KL after each iteration
    steps: jax.Array  # iterations run
    since_improve: jax.Array
    since_change: jax.Array  # iterations in a row that left the beam as it was
    active: jax.Array
    key: jax.Array  # uint32 key data, from the seed and the target's index in the whole target set


@dataclasses.dataclass(frozen=True)
class _Search:
    """One configured search: how tokens enter the model, which may, where it starts, how it moves."""

    lm: Any
    config: HardPromptConfig
    context: context_lib.FixedContext
    allowed: np.ndarray  # bool [V]
    start_ids: np.ndarray | None  # [L] the initial prompt of init="repeat" / "text"

    @classmethod
    def build(cls, lm, config: HardPromptConfig) -> _Search:
        context = context_lib.FixedContext.build(lm, config.prefix, config.suffix, config.bos)
        allowed = candidate_mask(lm, config)
        n_allowed = int(allowed.sum())
        if config.k > n_allowed:
            raise ValueError(
                f"HardPromptConfig: k={config.k} exceeds the {n_allowed} tokens allowed as candidates"
            )
        start_ids = None
        if config.init == "text":
            start_ids = lm.encode(config.init_text, add_special_tokens=False)
            if len(start_ids) != config.prompt_len:
                raise ValueError(
                    f"init_text is {len(start_ids)} tokens, but prompt_len is {config.prompt_len}: make them equal"
                )
            _check_allowed(start_ids[None], allowed, "init_text")
        elif config.init == "repeat":
            token = _init_token(lm, config, allowed)
            start_ids = np.full(config.prompt_len, token, np.int32)
        return cls(lm=without_params(lm), config=config, context=context, allowed=allowed, start_ids=start_ids)

    @property
    def prompt_len(self) -> int:
        return self.config.prompt_len

    def logits(self, params, x):
        """Next-token logits of prompt embeddings x [L, d] inside the fixed context."""
        return self.lm.logits(params, self.context.around(params, self.lm, x))

    def initial_ids(self, seed: int, first_index: int, n: int, given=None):
        """Initial prompts [n, L] of targets first_index .. first_index + n - 1."""
        cfg = self.config
        if given is not None:
            return jnp.asarray(given, jnp.int32)
        if cfg.init == "random":
            tokens = jnp.asarray(np.flatnonzero(self.allowed), jnp.int32)
            keys = _target_keys(seed, 0, first_index, n)
            return jax.vmap(lambda k: jax.random.choice(k, tokens, (cfg.prompt_len,)))(keys)
        return jnp.broadcast_to(jnp.asarray(self.start_ids, jnp.int32), (n, cfg.prompt_len))

    def init_state(self, ids, initial_kl, seed: int, first_index: int) -> _State:
        cfg = self.config
        n = ids.shape[0]
        zeros = jnp.zeros((n,), jnp.int32)
        return _State(
            ids=jnp.broadcast_to(ids[:, None, :], (n, cfg.beam_width, cfg.prompt_len)),
            best_ids=ids,
            best_kl=initial_kl,
            best_step=zeros,
            initial_kl=initial_kl,
            path=jnp.zeros((n, cfg.max_steps), jnp.float32),
            steps=zeros,
            since_improve=zeros,
            since_change=zeros,
            active=jnp.ones((n,), bool),
            # Data, not a constant of the compiled search: another seed needs no recompilation.
            key=jax.random.key_data(_target_keys(seed, 1, first_index, n)),
        )

    # One iteration for one target.

    def _propose(self, table32, allowed, g, ids, step, key):
        """Candidate swaps of each beam member: (positions, tokens, valid), each [W, C].

        A token's score at position i is (e_w − e_i)·g_i, the first-order change of the loss; candidates
        are the lowest scores among allowed tokens other than the current one. A candidate whose score
        is +inf (fewer allowed tokens than k) is marked invalid.
        """
        cfg = self.config
        L, V = cfg.prompt_len, self.lm.vocab_size

        def scores(g_pos, current):  # [..., d], [...] -> [..., V]
            s = g_pos @ table32.T - jnp.sum(table32[current] * g_pos, axis=-1)[..., None]
            s = jnp.where(allowed, s, jnp.inf)
            return jnp.where(jnp.arange(V) == current[..., None], jnp.inf, s)

        if cfg.mode == "hotflip" and cfg.positions == "cycle":
            position = step % L
            neg, tokens = jax.lax.top_k(-scores(g[:, position], ids[:, position]), cfg.k)  # [W, k]
            return jnp.full(tokens.shape, position), tokens, jnp.isfinite(neg)
        neg, tokens = jax.lax.top_k(-scores(g, ids), cfg.k)  # [W, L, k]
        if cfg.mode == "hotflip":  # the k best (position, token) pairs: they lie among the per-position top-k
            best_neg, flat = jax.lax.top_k(neg.reshape(-1, L * cfg.k), cfg.k)
            return flat // cfg.k, jnp.take_along_axis(tokens.reshape(-1, L * cfg.k), flat, axis=1), jnp.isfinite(best_neg)
        shape = (ids.shape[0], cfg.num_swaps)
        key_position, key_rank = jax.random.split(key)
        position = jax.random.randint(key_position, shape, 0, L)
        rank = jax.random.randint(key_rank, shape, 0, cfg.k)
        member = jnp.arange(shape[0])[:, None]
        return position, tokens[member, position, rank], jnp.isfinite(neg[member, position, rank])

    def _candidate_kl(self, params, table, p, log_p, candidates):
        """Exact KL of each candidate prompt [M, L] -> [M], evaluated `candidate_block` at a time."""

        def kl(ids):
            return kl_from_logits(p, self.logits(params, table[ids]), log_p)

        block = self.config.candidate_block
        if block is None or block >= len(candidates):
            return jax.vmap(kl)(candidates)
        return jax.lax.map(kl, candidates, batch_size=block)

    def _iterate_one(self, params, table, table32, allowed, p, log_p, ids, step, key_data):
        """One iteration for one target: its new beam [W, L] (best first), the beam's KL [W], and whether
        the new best is a candidate (not a prompt already in the beam)."""
        cfg = self.config

        def loss(x):
            return kl_from_logits(p, self.logits(params, x), log_p)

        current_kl, g = jax.vmap(jax.value_and_grad(loss))(table32[ids])  # [W], [W, L, d]
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
        positions, tokens, valid = self._propose(table32, allowed, g, ids, step, key)
        candidates = jnp.where(
            jnp.arange(cfg.prompt_len) == positions[..., None], tokens[..., None], ids[:, None, :]
        ).reshape(-1, cfg.prompt_len)  # [W * C, L]
        candidate_kl = jnp.where(
            valid.reshape(-1), self._candidate_kl(params, table, p, log_p, candidates), jnp.inf
        )
        # The current beam comes first, so on ties it stays (and a beam that cannot improve does not move).
        pool = jnp.concatenate([ids, candidates])
        pool_kl = jnp.concatenate([current_kl, candidate_kl])
        if cfg.beam_width == 1:
            keep = jnp.argmin(pool_kl)[None]
        else:
            same = jnp.all(pool[:, None, :] == pool[None, :, :], axis=-1)
            duplicate = jnp.any(same & jnp.tri(len(pool), k=-1, dtype=bool), axis=1)
            keep = jnp.argsort(jnp.where(duplicate, jnp.inf, pool_kl), stable=True)[: cfg.beam_width]
        return pool[keep], pool_kl[keep], keep[0] >= cfg.beam_width

    def run_segment(self, params, p, log_p, state: _State, num_steps: int) -> _State:
        """Up to num_steps iterations for every still-active target."""
        cfg = self.config
        table = self.lm.embedding_matrix(params)
        table32 = table.astype(jnp.float32)
        allowed = jnp.asarray(self.allowed)
        iterate = jax.vmap(
            lambda p_i, lp_i, ids, step, key: self._iterate_one(
                params, table, table32, allowed, p_i, lp_i, ids, step, key
            )
        )
        # A deterministic search whose beam stood still for a whole period of positions is stuck for good.
        period = {"cycle": cfg.prompt_len, "best": 1}[cfg.positions] if cfg.mode == "hotflip" else None

        def step(carry):
            i, s = carry
            ids, beam_kl, found = iterate(p, log_p, s.ids, s.steps, s.key)
            running = s.active
            new_kl = beam_kl[:, 0]
            # Only a new prompt can improve: the gradient pass's KL of a known prompt may differ from the
            # candidate pass's in the last float32 bits, which is no progress.
            better = running & found & (new_kl < s.best_kl)
            improved = better & (new_kl < s.best_kl - cfg.min_delta)
            changed = running & jnp.any(ids != s.ids, axis=(1, 2))
            since_improve = jnp.where(improved, 0, s.since_improve + running)
            since_change = jnp.where(changed, 0, s.since_change + running)
            best_kl = jnp.where(better, new_kl, s.best_kl)
            steps = s.steps + running
            stuck = since_change >= period if period is not None else jnp.zeros_like(running)
            record = running[:, None] & (jnp.arange(cfg.max_steps) == s.steps[:, None])
            return i + 1, _State(
                ids=_select(running, ids, s.ids),
                best_ids=_select(better, ids[:, 0], s.best_ids),
                best_kl=best_kl,
                best_step=jnp.where(better, steps, s.best_step),
                initial_kl=s.initial_kl,
                path=jnp.where(record, best_kl[:, None], s.path),
                steps=steps,
                since_improve=since_improve,
                since_change=since_change,
                active=running & (steps < cfg.max_steps) & (since_improve < cfg.patience) & ~stuck,
                key=s.key,
            )

        def more(carry):
            i, s = carry
            return (i < num_steps) & jnp.any(s.active)

        _, state = jax.lax.while_loop(more, step, (jnp.int32(0), state))
        return state

    def report(self, params, p, ids) -> dict:
        """KL and the figures reported beside it for each target's token prompt: p [T, V], ids [T, L]."""
        table = self.lm.embedding_matrix(params)
        logits = jax.vmap(lambda ids_i: self.logits(params, table[ids_i]))(ids)
        return jax.vmap(lambda p_i, z: distribution_report(p_i, z, self.config.top_k))(p, logits)

    def auto_chunk_size(self, params, mesh, n_targets: int) -> int:
        sharding = parallel.target_sharding(mesh)

        def lower(size: int):
            p = jax.ShapeDtypeStruct((size, self.lm.vocab_size), jnp.float32, sharding=sharding)
            ids = jnp.zeros((size, self.config.prompt_len), jnp.int32)
            state = jax.eval_shape(lambda: self.init_state(ids, jnp.zeros((size,), jnp.float32), 0, 0))
            state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)
            return jax.jit(self.run_segment, static_argnames="num_steps").lower(params, p, p, state, num_steps=1)

        fixed = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))
        return parallel.auto_chunk_size(lower, n_targets=n_targets, n_devices=mesh.size, fixed_bytes=fixed)


def _target_keys(seed: int, stream: int, first_index: int, n: int):
    """Keys of targets first_index .. first_index + n - 1 for one random stream (0: init, 1: search)."""
    base = jax.random.fold_in(jax.random.key(seed), stream)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(first_index + jnp.arange(n))


def _select(mask, new, old):
    return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


def _init_token(lm, config: HardPromptConfig, allowed: np.ndarray) -> int:
    """The token init="repeat" repeats: config.init_token, else " the", else the median-norm token."""
    token = config.init_token
    if isinstance(token, str):
        ids = lm.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"init_token={token!r} is {len(ids)} tokens, not one")
        token = int(ids[0])
    if token is not None:
        _check_allowed(np.array([[token]]), allowed, "init_token")
        return int(token)
    if lm.tokenizer is not None:
        ids = lm.encode(DEFAULT_INIT_TEXT, add_special_tokens=False)
        if len(ids) == 1 and allowed[ids[0]]:
            return int(ids[0])
    # No tokenizer (or no single " the"): a token of typical size, the allowed one whose embedding has the
    # median norm (not the one nearest the mean: that is where untrained rows such as padding's zeros lie).
    norms = np.linalg.norm(np.asarray(lm.embedding_matrix(lm.params), np.float32)[allowed], axis=1)
    return int(np.flatnonzero(allowed)[np.argsort(norms, kind="stable")[len(norms) // 2]])


def _check_allowed(ids: np.ndarray, allowed: np.ndarray, what: str) -> None:
    ids = np.asarray(ids)
    outside = ids[(ids < 0) | (ids >= len(allowed))]
    if outside.size:
        raise ValueError(f"{what} has token ids outside the vocabulary [0, {len(allowed)}): {sorted(set(outside.tolist()))[:10]}")
    banned = sorted(set(ids[~allowed[ids]].tolist()))
    if banned:
        raise ValueError(
            f"{what} has tokens the search may not use (special, or excluded by the filters): {banned[:10]}"
            + (f" and {len(banned) - 10} more" if len(banned) > 10 else "")
        )


# -- Driving it: chunks, segments, results -----------------------------------------------------------------


class HardEngine(ChunkEngine):
    """A configured hard-prompt search, advanced chunk by chunk and segment by segment (like SoftEngine)."""

    method = "hard"
    problem_class = _Search

    def start(self, probs: np.ndarray, first_index: int, init_ids: np.ndarray | None = None) -> ChunkRun:
        """Begin a chunk of targets; `first_index` is the first one's index in the whole target set."""
        self._set_targets(probs, first_index)
        if init_ids is not None:
            init_ids = parallel.pad_rows(np.asarray(init_ids, np.int32), self.chunk_size)
        seed = self.config.seed
        ids = self._sharded(self.problem.initial_ids(seed, first_index, self.chunk_size, init_ids))
        p, _ = self._targets(first_index)
        state = self.problem.init_state(ids, self._report(self.params, p, ids)["kl"], seed, first_index)
        return ChunkRun(first_index, len(probs), self._sharded(state))

    def advance(self, run: ChunkRun) -> ChunkRun:
        """One compiled segment of iterations."""
        state = self._segment(run)
        return dataclasses.replace(run, state=state, finished=not bool(jnp.any(state.active)))

    def _chunk_results(self, run: ChunkRun, p) -> tuple[dict, dict]:
        s = run.state
        figures = self._report(self.params, p, s.best_ids)
        del figures["kl"]  # the tracked best KL is the same value, measured when it was found
        columns = {
            "kl": s.best_kl, "initial_kl": s.initial_kl, "best_step": s.best_step, "steps": s.steps, **figures,
        }
        # After a target stopped, its best KL stays what it was.
        path = jnp.where(jnp.arange(s.path.shape[1]) < s.steps[:, None], s.path, s.best_kl[:, None])
        return columns, {"token_ids": s.best_ids, "kl_path": path}

    def _text_columns(self, tokenizer, arrays: dict) -> dict:
        return {
            "round_trips": round_trips(tokenizer, arrays["token_ids"]),
            "text": np.array(tokenizer.batch_decode(arrays["token_ids"].tolist())),
        }


def hard_prompt(
    lm, targets, config: HardPromptConfig | None = None, *, init_ids=None, devices=None
) -> PromptResults:
    """Search a hard prompt (real tokens) for each target.

    Args:
      lm: a LanguageModel.
      targets: a TargetSet or an [N, V] array of probabilities over lm's vocabulary.
      config: HardPromptConfig (defaults as documented there).
      init_ids: optional int [N, L] (or one [L] prompt for all) to start from instead of `config.init`,
        e.g. `project_soft_prompts(lm, soft_result)` to seed the search with a soft prompt's nearest
        tokens. Every token must be allowed under the config's filters.
      devices: devices to shard the target axis over (default: this process's devices). In a multi-host
        run each process searches its own contiguous share of the targets (`parallel.process_slice`) and
        returns results for those only; a target's result does not depend on the split.
    Returns:
      PromptResults with method "hard": columns kl (best), initial_kl, best_step, steps, entropy, tv,
      top{k}_overlap, prompt_len and, where the model has a tokenizer, round_trips and text; arrays
      token_ids [N, L] and kl_path [N, max_steps] (best KL after each iteration).
    """
    config = config or HardPromptConfig()
    target_set = as_target_set(targets, lm.vocab_size)
    share = parallel.process_slice(len(target_set))
    probs = target_set.probs[share]
    if init_ids is not None:  # checked before the engine sizes its chunks (which compiles a probe)
        config.validate(lm)
        allowed = compiled_problem(lm, config, _Search)[0].allowed
        init_ids = _check_init_ids(init_ids, len(target_set), config, allowed)[share]
    engine = HardEngine(lm, config, n_targets=len(probs), devices=devices)
    bounds = parallel.chunk_bounds(len(probs), engine.chunk_size)
    n_segments = -(-config.max_steps // config.segment_steps)
    progress = tqdm(
        total=len(probs) * config.max_steps, desc="hard prompts", unit="target·iteration",
        disable=len(bounds) * n_segments < 2,
    )
    chunks = []
    for start, stop in bounds:
        chunk = engine.start(
            probs[start:stop], first_index=share.start + start,
            init_ids=None if init_ids is None else init_ids[start:stop],
        )
        done = 0
        while not chunk.finished:
            chunk = engine.advance(chunk)
            steps = min(config.segment_steps, config.max_steps - done)
            progress.update((stop - start) * steps)
            done += steps
        progress.update((stop - start) * (config.max_steps - done))  # targets that all stopped early
        chunks.append(engine.results(chunk))
    progress.close()
    return engine.assemble(chunks, target_set.metadata.iloc[share].reset_index(drop=True))


def _check_init_ids(init_ids, n_targets: int, config: HardPromptConfig, allowed: np.ndarray) -> np.ndarray:
    ids = np.asarray(init_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"init_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = np.broadcast_to(ids, (n_targets, len(ids)))
    if ids.shape != (n_targets, config.prompt_len):
        raise ValueError(f"init_ids must be [{n_targets}, {config.prompt_len}] (targets, prompt_len); got {ids.shape}")
    _check_allowed(ids, allowed, "init_ids")
    return ids.astype(np.int32)


# -- Helpers: evaluating token prompts, seeding from soft prompts --------------------------------------------


def token_prompt_kl(
    lm, targets, token_ids, config: HardPromptConfig | None = None, *, chunk_size: int = 256, devices=None
) -> np.ndarray:
    """KL(p‖q) of given token prompts [N, L] (inside config's prefix/suffix/BOS), float32 [N].

    The same compiled evaluation as `hard_prompt`'s initial and final KL, sharded the same way.
    """
    config = config or HardPromptConfig()
    probs = as_target_set(targets, lm.vocab_size).probs
    token_ids = np.asarray(token_ids)
    if not np.issubdtype(token_ids.dtype, np.integer) or token_ids.ndim != 2 or len(token_ids) != len(probs):
        raise ValueError(f"token_ids must be integer [{len(probs)}, L]; got {token_ids.dtype} {token_ids.shape}")
    if token_ids.size and not (0 <= token_ids.min() and token_ids.max() < lm.vocab_size):
        raise ValueError(f"token_ids must lie in [0, {lm.vocab_size})")
    # Only the context and the model matter here; the init fields are reset so any prompt length fits.
    config = dataclasses.replace(
        config, prompt_len=token_ids.shape[1], init="repeat", init_token=None, init_text=None
    )
    _, _, report = compiled_problem(lm, config, _Search)
    mesh = parallel.local_mesh(devices)
    params = jax.device_put(lm.params, parallel.replicated(mesh))
    size = parallel.round_up(min(chunk_size, len(probs)), mesh.size)
    sharding = parallel.target_sharding(mesh)
    out = []
    for start, stop in parallel.chunk_bounds(len(probs), size):
        p = jax.device_put(parallel.pad_rows(probs[start:stop], size), sharding)
        ids = jax.device_put(parallel.pad_rows(token_ids[start:stop].astype(np.int32), size), sharding)
        out.append(np.asarray(report(params, p, ids)["kl"])[: stop - start])
    return np.concatenate(out)


def project_soft_prompts(lm, soft_result: PromptResults, config: HardPromptConfig | None = None) -> np.ndarray:
    """Each soft prompt vector's nearest (L2) token among those `config` allows: int32 [N, L].

    Unlike the soft result's `nearest_tokens` (any token), this never picks a special or filtered token,
    so the ids can seed `hard_prompt(..., init_ids=...)` directly.
    """
    prompts = soft_result.arrays.get("prompt")
    if soft_result.method != "soft" or prompts is None or np.ndim(prompts) != 3:
        raise ValueError("project_soft_prompts needs soft-prompt results with prompts [N, L, d] (not interventions)")
    allowed_ids = np.flatnonzero(candidate_mask(lm, config))
    table = jnp.asarray(lm.embedding_matrix(lm.params), jnp.float32)[allowed_ids]

    @jax.jit  # the table is an argument: closed over, XLA would fold it into the executable
    def nearest(table, vectors):
        return jnp.argmin(jnp.sum(table**2, axis=1)[None, :] - 2 * vectors @ table.T, axis=1)

    flat = np.asarray(prompts, np.float32).reshape(-1, prompts.shape[-1])
    found = np.concatenate([np.asarray(nearest(table, flat[i : i + 1024])) for i in range(0, len(flat), 1024)])
    return allowed_ids[found].astype(np.int32).reshape(prompts.shape[:2])


def projection_loss(lm, targets, soft_result: PromptResults, config: HardPromptConfig | None = None) -> pd.DataFrame:
    """How much KL projecting each soft prompt onto its nearest allowed tokens loses, before any search.

    Returns one row per target: target_id, soft_kl, projected_kl, projection_loss (= projected − soft).
    Use the same prefix/suffix/BOS in `config` as the soft search used.
    """
    ids = project_soft_prompts(lm, soft_result, config)
    config = dataclasses.replace(config or HardPromptConfig(), prompt_len=ids.shape[1])
    projected = token_prompt_kl(lm, targets, ids, config)
    soft_kl = np.asarray(soft_result.columns["kl"], np.float32)
    return pd.DataFrame({
        "target_id": soft_result.metadata["target_id"].to_numpy(),
        "soft_kl": soft_kl,
        "projected_kl": projected,
        "projection_loss": projected - soft_kl,
    })
