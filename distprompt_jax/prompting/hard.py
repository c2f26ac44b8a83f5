"""Hard prompts: real vocabulary tokens, found by gradient-guided coordinate search for many targets at once.

Each iteration, for every target: one `value_and_grad` of KL(p‖q) with respect to the prompt's input
embeddings scores every token w at every position i by the linearized change of the loss when w replaces
the current token, (e_w − e_i)·∇_{e_i} (HotFlip / universal triggers, Wallace et al. 2019). The k lowest
scores per position are the candidates. Candidate swaps are then evaluated exactly — one forward each, KL
needs no sampling — and the best is kept if it beats the current prompt.

- mode "hotflip" (the paper's method): the k candidates of one position per iteration, cycling through the
  positions (or the k best (position, token) pairs over all positions), with an optional beam of prompts.
- mode "gcg" (Zou et al. 2023): B swaps sampled uniformly from the per-position top-k, each changing
  `n_replace` distinct positions (nanoGCG's n_replace; 1 in the paper).

A candidate equals its prompt before its (first) swapped position i, so by default it is computed from i on,
after the prompt's keys/values (`reuse_prefix`), which the iteration's gradient pass returns beside the loss (the
fixed prefix's are computed once per iteration for all targets, from the weights alone). Split points are
static shapes: candidates sorted by i run in blocks, each block from its smallest i through a `lax.switch` over
the L split points, all targets' blocks sorted together into L calls (or each target's alone: `reuse_rounds`).
Under the driver's vmap a switch would run every branch, so the evaluation sees the whole batch of targets
(`_over_targets`). Cycling hotflip saves half the prompt on average; measured in BENCHMARKS.md.

The search is a pure function of (target, its index in the set, config): `HardProblem` is one target's
search, and the solver driver (distprompt_jax.solve) runs a pool of them side by side under vmap, their
candidate forwards batched in blocks, refilling the slots of targets that stopped — as for soft prompts.

Which tokens may appear: special tokens never (the tokenizer's special and added-special tokens, and the
model's BOS/EOS ids); optionally only ASCII, printable or not-whitespace-only tokens, and only tokens that
survive decode → encode on their own. Whether a whole prompt survives decode → encode depends on its
neighbours (BPE merges across token boundaries), which cannot be checked inside the compiled search, so
it is checked afterwards and reported per target (`round_trips`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import PartitionSpec

from distprompt_jax import parallel
from distprompt_jax.bounds import BoundConfig
from distprompt_jax.field_types import check_field_types
from distprompt_jax.lm import LanguageModel
from distprompt_jax.models.kv_cache import KVCache
from distprompt_jax.prompting import context as context_lib
from distprompt_jax.prompting.context_bank import ContextBank
from distprompt_jax.prompting.engine import check_shared_fields, model_structure, run_method
from distprompt_jax.prompting.objective import distribution_report, kl_from_logits, safe_log
from distprompt_jax.prompting.sandwich import run_with_bound
from distprompt_jax.results import PromptResults
from distprompt_jax.solve import DriverOptions, Patience, Progress
from distprompt_jax.targets import as_target_set
from distprompt_jax.tokens import ordinary_token_mask

MODES = ("hotflip", "gcg")
POSITIONS = ("cycle", "best")
REUSE_ROUNDS = ("target", "pool")
# With round_trip_prompts, twice the candidates are proposed and the first that survive decode → encode are
# evaluated (a byte-level BPE loses a few in ten single swaps to merges with their neighbours).
ROUND_TRIP_OVERSAMPLE = 2
INITS = ("repeat", "random", "text", "bank", "sample")
DEFAULT_INIT_TEXT = " the"  # the repeated common token of init="repeat", where the tokenizer has it as one token


@dataclasses.dataclass(frozen=True)
class HardPromptConfig:
    """Defaults are ours where the paper is silent (see paper-notes): L = 10, k = 64, B = 128, 200
    iterations, init the best of 64 prompts drawn from the target (BENCHMARKS.md: −19% mean KL against a
    repeated common token at the default budget on 32 targets over entropy), special tokens excluded, best KL
    reported."""

    prompt_len: int = 10
    mode: str = "hotflip"  # "hotflip" | "gcg"
    k: int = 64  # candidates per position: the k tokens with the lowest gradient score
    num_swaps: int = 128  # gcg: B swaps sampled from the per-position top-k each iteration
    n_replace: int = 1  # gcg: positions each swap changes (distinct, each a token from its top-k), as nanoGCG's
    positions: str = "cycle"  # hotflip: "cycle" (position t mod L at iteration t) | "best" (k best pairs overall)
    # hotflip: each time the prompt stood still for a whole period of positions (a local optimum of its k
    # candidates), the candidates move to the next k ranks of the gradient score (ranks k…2k−1, then 2k…3k−1, …)
    # up to this many times before the target stops; a new prompt returns to the top k. 0: stop at the first
    # stand-still. GCG draws new swaps every iteration and takes 0.
    widen: int = 0
    # hotflip: each time the search is stuck for good (a stand-still after its last window), `kick_size`
    # random positions of the best prompt are re-drawn from the target (as init="sample" draws) and the search
    # goes on from there, up to this many times before the target stops (iterated local search: the unused
    # budget explores near the best basin found, where `restarts` start over). The best prompt is kept.
    kicks: int = 0
    kick_size: int = 3
    beam_width: int = 1  # prompts kept per target; each proposes its own candidates
    max_steps: int = 200  # iterations
    # stop a target after this many iterations without improving by more than min_delta (counted afresh when
    # its candidates widen: a new window is a new search)
    patience: int = 50
    min_delta: float = 0.0
    # A target stops once its KL is within this of its floor: the certified bound when the run has one
    # (experiments, `with_bound=True`), else 0.
    floor_tolerance: float = 1e-3
    init: str = "sample"  # "repeat": one token L times | "random" tokens (seeded, per target) | "text" | "bank": the
    #                       tokens of the context bank's nearest context (prompting.context_bank) whose tokens are
    #                       all allowed candidates | "sample": the best of `init_samples` prompts of tokens drawn
    #                       from the target itself (restricted to allowed tokens; see BUILD.md)
    bank_size: int = 512  # with init="bank": contexts of prompt_len tokens the model samples (seeded by `seed`)
    init_samples: int = 64  # with init="sample": prompts drawn per target (costs one hotflip iteration at 64)
    restarts: int = 1  # attempts per target at most; the best is kept. Further attempts start from prompts drawn
    #                    from the target (as init="sample", each attempt its own draws), whatever `init` is
    # A further attempt runs only for a target still more than this above its floor (None: every attempt runs).
    restart_above: float | None = 1.0
    init_token: int | str | None = None  # with init="repeat": an id or a one-token text; None: " the" (see docs)
    init_text: str | None = None  # with init="text": its tokens (exactly prompt_len of them) start the search
    prefix: str | tuple[int, ...] = ""  # fixed tokens before the prompt: text, or token ids
    suffix: str | tuple[int, ...] = ""  # fixed tokens after the prompt
    bos: bool = False  # put the model's BOS token first
    template: str = "none"  # "chat": the prompt is the user turn of the model's chat template (see context.py)
    ascii_only: bool = False  # candidates: tokens whose text is ASCII
    printable_only: bool = False  # candidates: no control characters (but space, tab, newline), no partial UTF-8
    no_whitespace_only: bool = False  # candidates: tokens with some non-whitespace text
    round_trip_tokens: bool = False  # candidates: tokens whose text encodes back to that one token
    # candidates: prompts whose decoded text encodes back to exactly them, checked on the host for every
    # candidate during the search (nanoGCG's filter_ids), so every prompt the search keeps round-trips; an
    # initial prompt that does not counts as KL +inf (the first valid candidate replaces it)
    round_trip_prompts: bool = False
    seed: int = 0
    slots: int | str | None = None  # targets searched at once; None: 32 on a CPU, 1024 on an accelerator;
    #                                 "auto": sized from XLA's memory analysis to half the free memory
    candidate_block: int | None = 32  # candidate forwards per target per compiled block; None: all at once
    # Candidates reuse the keys/values of what they share with the current prompt (the fixed prefix, and the
    # positions before their first swapped one) instead of recomputing them; False: every candidate is
    # computed whole (the path before the cache, for comparison). Not with shard_params, where no device
    # holds the whole model: that runs the whole-candidate path.
    reuse_prefix: bool = True
    # How candidates after a shared prefix are batched: "pool": the blocks of all targets on a device together,
    # sorted by start, in L rounds, each from its smallest start (larger calls: faster on CPUs and accelerators
    # alike, BENCHMARKS.md; a target's KLs then round differently in different company); "target": each
    # target's blocks alone (its results never depend on the other targets, at ~25% less speed on a CPU).
    reuse_rounds: str = "pool"
    segment_steps: int = 5  # iterations per compiled call: finished targets' slots are refilled between calls
    refill_at: int | None = None  # end a segment early once this many slots are free (None: slots // 16, ≥ 1)
    top_k: int = 10  # for the top-k overlap figure
    shard_params: bool = False  # split the weights over the devices (models too large for one device)

    def __post_init__(self):
        check_field_types(self)

    def validate(self, lm: LanguageModel) -> None:
        def fail(message):
            raise ValueError(f"HardPromptConfig: {message}")

        check_shared_fields(
            self, lm, INITS,
            at_least_one=("k", "num_swaps", "beam_width", "max_steps", "patience", "segment_steps", "top_k",
                          "bank_size", "init_samples", "restarts"),
        )
        if self.candidate_block is not None and self.candidate_block < 1:
            fail(f"candidate_block must be positive or None, got {self.candidate_block}")
        if self.mode not in MODES:
            fail(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reuse_rounds not in REUSE_ROUNDS:
            fail(f"reuse_rounds must be one of {REUSE_ROUNDS}, got {self.reuse_rounds!r}")
        if self.positions not in POSITIONS:
            fail(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if not 1 <= self.n_replace <= self.prompt_len:
            fail(f"n_replace must be between 1 and prompt_len={self.prompt_len}, got {self.n_replace}")
        if self.n_replace > 1 and self.mode != "gcg":
            fail("n_replace > 1 applies to mode='gcg' only")
        if self.widen < 0:
            fail(f"widen must be a non-negative integer, got {self.widen!r}")
        if self.widen and self.mode != "hotflip":
            fail("widen applies to mode='hotflip' only (GCG draws new swaps every iteration)")
        if self.kicks < 0:
            fail(f"kicks must be a non-negative integer, got {self.kicks!r}")
        if self.kicks and self.mode != "hotflip":
            fail("kicks applies to mode='hotflip' only (GCG draws new swaps every iteration)")
        if self.kicks and not 1 <= self.kick_size <= self.prompt_len:
            fail(f"kick_size must be between 1 and prompt_len={self.prompt_len}, got {self.kick_size}")
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
            for name in ("ascii_only", "printable_only", "no_whitespace_only", "round_trip_tokens",
                         "round_trip_prompts"):
                if getattr(self, name):
                    fail(f"{name} needs the model's tokenizer, and {lm.name} was loaded without one")
            if isinstance(self.init_token, str):
                fail(f"init_token={self.init_token!r} is text, and {lm.name} was loaded without a tokenizer")


# -- Which tokens may appear -------------------------------------------------------------------------------


def candidate_mask(lm: LanguageModel, config: HardPromptConfig | None = None) -> np.ndarray:
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


class HardState(NamedTuple):
    """One target's search state."""

    progress: Progress  # iterations run, best KL, active
    patience: Patience
    ids: jax.Array  # [W, L] the beam, best first
    best_ids: jax.Array  # [L]
    best_step: jax.Array  # iterations run when the best was found (0: the initial prompt)
    initial_kl: jax.Array
    path: jax.Array  # [max_steps] best KL after each iteration
    since_change: jax.Array  # iterations in a row that left the beam as it was
    window: jax.Array  # which k ranks of the gradient score the candidates are (0: the top k; see `widen`)
    kicks: jax.Array  # kicks given so far (see `kicks`)
    key: jax.Array  # uint32 key data of the search's random stream (gcg): plain data, as checkpoints want


# Hard prompts on a CPU: a candidate search is ~k forwards per iteration, compute-bound from a few dozen
# targets at once.
HARD_SLOTS = {"cpu": 32, "accelerator": 1024}


@dataclasses.dataclass(frozen=True)
class HardProblem:
    """One target's token search. Its fields are what enters tracing (seed, slots, segment_steps and
    shard_params do not: the driver takes them)."""

    lm: Any  # the model's structure, without weights (engine.model_structure)
    prompt_len: int
    mode: str
    k: int
    num_swaps: int
    n_replace: int
    positions: str
    widen: int
    kicks: int
    kick_size: int
    beam_width: int
    max_steps: int
    patience: int
    min_delta: float
    floor_tolerance: float
    candidate_block: int | None
    reuse_prefix: bool
    reuse_rounds: str
    top_k: int
    context: context_lib.FixedContext
    filters: tuple[bool, bool, bool, bool]  # ascii_only, printable_only, no_whitespace_only, round_trip_tokens
    round_trip_prompts: bool
    init_kind: str  # config.init, or "given": per-target ids (input "init_ids": the caller's, or the bank's)
    init_samples: int
    resample_restarts: bool  # restarts > 1 and an init whose start does not change with the attempt
    start_ids: tuple[int, ...] | None  # the initial prompt of init="repeat" / "text"
    allowed: np.ndarray = dataclasses.field(compare=False, repr=False)  # bool [V]: a function of lm and filters

    @classmethod
    def build(cls, lm: LanguageModel, config: HardPromptConfig, *, given_init: bool = False) -> HardProblem:
        context = context_lib.FixedContext.build(lm, config.prefix, config.suffix, config.bos, config.template)
        allowed = candidate_mask(lm, config)
        n_allowed = int(allowed.sum())
        if config.k > n_allowed:
            raise ValueError(
                f"HardPromptConfig: k={config.k} exceeds the {n_allowed} tokens allowed as candidates"
            )
        start_ids = None
        if given_init:
            pass
        elif config.init == "text":
            start_ids = lm.encode(config.init_text, add_special_tokens=False)
            if len(start_ids) != config.prompt_len:
                raise ValueError(
                    f"init_text is {len(start_ids)} tokens, but prompt_len is {config.prompt_len}: make them equal"
                )
            _check_allowed(start_ids[None], allowed, "init_text")
        elif config.init == "repeat":
            start_ids = np.full(config.prompt_len, _init_token(lm, config, allowed), np.int32)
        return cls(
            lm=model_structure(lm), prompt_len=config.prompt_len, mode=config.mode, k=config.k,
            num_swaps=config.num_swaps, n_replace=config.n_replace, positions=config.positions,
            widen=config.widen, kicks=config.kicks, kick_size=config.kick_size, beam_width=config.beam_width,
            max_steps=config.max_steps, patience=config.patience, min_delta=config.min_delta,
            floor_tolerance=config.floor_tolerance, candidate_block=config.candidate_block,
            reuse_prefix=config.reuse_prefix and not config.shard_params,
            reuse_rounds=config.reuse_rounds,
            top_k=config.top_k, context=context,
            filters=(config.ascii_only, config.printable_only, config.no_whitespace_only, config.round_trip_tokens),
            round_trip_prompts=config.round_trip_prompts,
            init_kind="given" if given_init else config.init, init_samples=config.init_samples,
            resample_restarts=config.restarts > 1 and (given_init or config.init not in ("random", "sample")),
            start_ids=None if start_ids is None else tuple(int(i) for i in start_ids), allowed=allowed,
        )

    def logits(self, params, x):
        """Next-token logits of prompt embeddings x [L, d] inside the fixed context."""
        return self.lm.logits(params, self.context.around(params, self.lm, x))

    def _propose(self, table32, allowed, g, ids, step, window, key, count: int):
        """`count` candidates of each beam member: (positions [W, count, n], tokens [W, count, n], valid
        [W, count]), a candidate placing tokens[..., r] at positions[..., r] (n = n_replace for GCG, else 1).

        A token's score at position i is (e_w − e_i)·g_i, the first-order change of the loss; candidates
        are the lowest scores among allowed tokens other than the current one (hotflip: ranks
        window·count … window·count + count − 1, see `widen`). A candidate with a score of +inf (fewer allowed
        tokens than asked for) is marked invalid.
        """
        L, V = self.prompt_len, self.lm.vocab_size

        def scores(g_pos, current):  # [..., d], [...] -> [..., V]
            s = g_pos @ table32.T - jnp.sum(table32[current] * g_pos, axis=-1)[..., None]
            s = jnp.where(allowed, s, jnp.inf)
            return jnp.where(jnp.arange(V) == current[..., None], jnp.inf, s)

        ranked = count * (self.widen + 1)  # the ranks every window is taken from

        def in_window(neg, tokens):  # [..., size] -> this window's [..., count] (the last one where the ranks end)
            size = neg.shape[-1]
            first = jnp.minimum(window * count, size - min(count, size))
            return tuple(jax.lax.dynamic_slice_in_dim(a, first, min(count, size), axis=-1) for a in (neg, tokens))

        if self.mode == "hotflip" and self.positions == "cycle":
            position = step % L
            neg, tokens = in_window(*jax.lax.top_k(-scores(g[:, position], ids[:, position]), min(ranked, V)))
            return jnp.full(tokens.shape + (1,), position), tokens[..., None], jnp.isfinite(neg)
        top = min(self.k if self.mode == "gcg" else ranked, V)
        neg, tokens = jax.lax.top_k(-scores(g, ids), top)  # [W, L, top]
        if self.mode == "hotflip":  # the best (position, token) pairs: they lie among the per-position top ones
            best_neg, flat = in_window(*jax.lax.top_k(neg.reshape(-1, L * top), min(ranked, L * top)))
            best_tokens = jnp.take_along_axis(tokens.reshape(-1, L * top), flat, axis=1)
            return (flat // top)[..., None], best_tokens[..., None], jnp.isfinite(best_neg)
        # GCG: n_replace distinct positions per candidate, each a token drawn from that position's top-k.
        shape = (ids.shape[0], count)
        key_position, key_rank = jax.random.split(key)
        position = jnp.argsort(jax.random.uniform(key_position, shape + (L,)), axis=-1)[..., : self.n_replace]
        rank = jax.random.randint(key_rank, shape + (self.n_replace,), 0, self.k)
        member = jnp.arange(shape[0])[:, None, None]
        valid = jnp.all(jnp.isfinite(neg[member, position, rank]), axis=-1)
        return position, tokens[member, position, rank], valid

    def _candidates(self, table32, allowed, g, ids, step, window, key):
        """Each beam member's candidate prompts [W, C, L], the positions before which they equal the member
        [W, C], and whether each is valid [W, C]; with `round_trip_prompts`, the first C of twice as many
        proposals whose text encodes back to them (the rest are not worth a forward)."""
        count = {"hotflip": self.k, "gcg": self.num_swaps}[self.mode]
        asked = count * (ROUND_TRIP_OVERSAMPLE if self.round_trip_prompts else 1)
        positions, tokens, valid = self._propose(table32, allowed, g, ids, step, window, key, asked)
        candidates = jnp.broadcast_to(ids[:, None, :], positions.shape[:2] + (self.prompt_len,))
        for r in range(positions.shape[-1]):
            candidates = jnp.where(jnp.arange(self.prompt_len) == positions[..., r, None], tokens[..., r, None],
                                   candidates)
        starts = jnp.min(positions, axis=-1)
        if self.round_trip_prompts:
            valid &= self._round_trips(candidates)
            # Valid candidates first, in their order of proposal (best score first for hotflip).
            first = jnp.argsort(~valid, axis=1, stable=True)[:, :count]

            def take(a):
                return jnp.take_along_axis(a, first.reshape(first.shape + (1,) * (a.ndim - 2)), axis=1)

            candidates, starts, valid = take(candidates), take(starts), take(valid)
        return candidates, starts, valid

    def _round_trips(self, prompts):
        """bool [...]: whether each prompt [..., L] survives decode → encode, checked on the host."""
        tokenizer, length = self.lm.tokenizer, self.prompt_len

        def check(prompts):
            prompts = np.asarray(prompts)
            return round_trips(tokenizer, prompts.reshape(-1, length)).reshape(prompts.shape[:-1])

        def on_host(prompts):  # [S, ..., L]: every target's on this device, one call
            return jax.pure_callback(check, jax.ShapeDtypeStruct(prompts.shape[:-1], jnp.bool_), prompts)

        return _over_targets(on_host)(prompts)

    def candidate_kl(self, params, table, p, log_p, candidates):
        """Exact KL of each candidate prompt [M, L] -> [M], each computed whole, `candidate_block` at a time."""

        def kl(ids):
            return kl_from_logits(p, self.logits(params, table[ids]), log_p)

        block = self.candidate_block
        if block is None or block >= len(candidates):
            return jax.vmap(kl)(candidates)
        return jax.lax.map(kl, candidates, batch_size=block)

    def prompt_cache(self, params, table, fixed, ids) -> KVCache:
        """The keys/values of prompts ids [N, L] after the fixed prefix (cache `fixed`): [N, n_layers, L, ...].
        A search iteration takes them from its gradient pass; this computes them on their own."""
        return self.context.logits_and_cache_after(params, self.lm, fixed, table[ids])[1]

    def prompts_candidate_kl(self, params, table, fixed, p, log_p, prompt_cache, candidates, starts,
                             round_units: int | None):
        """Exact KL of the candidates of N prompts -> [N, C]: p, log_p [N, V], prompt_cache the prompts' keys/
        values after the fixed prefix (`prompt_cache`), candidates [N, C, L], starts [N, C], where candidate c
        of prompt n equals prompt n before position starts[n, c].

        A candidate is computed only from a split point on, after its prompt's keys/values. A prompt's
        candidates, sorted by start, form blocks of `candidate_block`; the blocks of all N prompts, sorted by
        start, run in rounds of `round_units` blocks, each round from its smallest start (a `lax.switch` over
        the L split points, so each compiles its own shapes). With one block a round, a prompt's results do not
        depend on the other prompts; larger rounds batch more work per call. None: L rounds (a round per split
        point where the starts are spread evenly, so each round starts near its own blocks' starts).
        """
        n, count, length = candidates.shape
        block = min(self.candidate_block or count, count)
        n_blocks = -(-count // block)
        order = jnp.argsort(starts, axis=1, stable=True)
        # The last candidate repeated fills the last block: a harmless duplicate whose result is dropped.
        order = jnp.concatenate([order, jnp.repeat(order[:, -1:], n_blocks * block - count, axis=1)], axis=1)
        blocks = jnp.take_along_axis(candidates, order[..., None], axis=1).reshape(n * n_blocks, block, length)
        block_starts = jnp.take_along_axis(starts, order, axis=1).reshape(n * n_blocks, block)[:, 0]
        block_prompt = jnp.repeat(jnp.arange(n), n_blocks)
        round_units = round_units or -(-len(blocks) // length)
        n_rounds = -(-len(blocks) // round_units)
        rounds = jnp.argsort(block_starts, stable=True)
        rounds = jnp.concatenate([rounds, jnp.full(n_rounds * round_units - len(blocks), rounds[-1])])
        if fixed is not None:
            prompt_cache = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), fixed).concatenate(prompt_cache)
        fixed_length = len(self.context.prefix_ids)

        def from_position(split):
            def run(round_blocks):  # [round_units] blocks, every candidate equal to its prompt before `split`
                prompts = block_prompt[round_blocks]
                x = table[blocks[round_blocks][:, :, split:]]  # [round_units, block, L - split, d]
                shared = fixed_length + split
                if shared:
                    cache = KVCache(prompt_cache.keys[prompts, :, :shared], prompt_cache.values[prompts, :, :shared])
                    after = functools.partial(self.context.logits_after, params, self.lm)
                    logits = jax.vmap(after)(cache, x)
                else:
                    logits = self.context.logits_after(params, self.lm, None, x)
                kl = jax.vmap(kl_from_logits, in_axes=(None, 0, None))  # one prompt's block
                return jax.vmap(kl)(p[prompts], logits, log_p[prompts])

            return run

        branches = [from_position(split) for split in range(length)]
        round_kl = jax.lax.map(lambda r: jax.lax.switch(block_starts[r[0]], branches, r),
                               rounds.reshape(n_rounds, round_units))
        block_kl = jnp.zeros((len(blocks), block), round_kl.dtype).at[rounds].set(round_kl.reshape(-1, block))
        sorted_kl = block_kl.reshape(n, n_blocks * block)
        return jnp.zeros((n, count), sorted_kl.dtype).at[jnp.arange(n)[:, None], order].set(sorted_kl)[:, :count]

    def beam_candidate_kl(self, params, table, fixed, p, log_p, prompt_cache, candidates, starts):
        """KL of one target's beam members' candidates [W, C, L] (starts [W, C]) -> [W, C]; `prompt_cache`: the
        members' keys/values after the fixed prefix ([W, n_layers, L, ...]; None when `reuse_prefix` is off).

        Under vmap over targets (the driver's slots), the members of all targets (on each device) form the
        batch of prompts of `prompts_candidate_kl` (`_over_targets`), with rounds of one block ("target") or L
        rounds of all blocks sorted by start ("pool"), as `reuse_rounds` says.
        """
        if not self.reuse_prefix:
            flat = candidates.reshape(-1, self.prompt_len)
            return self.candidate_kl(params, table, p, log_p, flat).reshape(starts.shape)
        return _over_targets(self._targets_candidate_kl, shared=3)(params, table, fixed, p, log_p, prompt_cache,
                                                                    candidates, starts)

    def _targets_candidate_kl(self, params, table, fixed, p, log_p, prompt_cache, candidates, starts):
        """`beam_candidate_kl` of S targets at once ([S, ...] each): their W members are S × W prompts."""
        targets, width, count, length = candidates.shape
        round_units = 1 if self.reuse_rounds == "target" else None
        kl = self.prompts_candidate_kl(
            params, table, fixed, jnp.repeat(p, width, axis=0), jnp.repeat(log_p, width, axis=0),
            jax.tree.map(lambda a: a.reshape((targets * width,) + a.shape[2:]), prompt_cache),
            candidates.reshape(targets * width, count, length), starts.reshape(targets * width, count), round_units)
        return kl.reshape(starts.shape)

    def _iterate(self, params, p, log_p, ids, step, window, key):
        """One iteration: the new beam [W, L] (best first), the beam's KL [W], and whether the new best is a
        candidate (not a prompt already in the beam)."""
        table = self.lm.embedding_matrix(params)
        table32 = table.astype(jnp.float32)
        allowed = jnp.asarray(self.allowed)
        # Depends on the weights alone: under the driver's vmap it is computed once for all targets.
        fixed = self.context.prefix_cache(params, self.lm) if self.reuse_prefix else None

        def loss(x):  # with the prompt's keys/values after the fixed prefix, where the candidates reuse them
            if not self.reuse_prefix:
                return kl_from_logits(p, self.logits(params, x), log_p), None
            logits, prompt_cache = self.context.logits_and_cache_after(params, self.lm, fixed, x)
            return kl_from_logits(p, logits, log_p), prompt_cache

        # [W], [W, n_layers, L, ...], [W, L, d]
        (current_kl, prompt_cache), g = jax.vmap(jax.value_and_grad(loss, has_aux=True))(table32[ids])
        if self.round_trip_prompts:  # only an initial prompt can fail: it gives way to any candidate
            current_kl = jnp.where(self._round_trips(ids), current_kl, jnp.inf)
        candidates, starts, valid = self._candidates(table32, allowed, g, ids, step, window,
                                                     jax.random.fold_in(key, step))
        candidate_kl = self.beam_candidate_kl(params, table, fixed, p, log_p, prompt_cache, candidates, starts)
        candidate_kl = jnp.where(valid, candidate_kl, jnp.inf).reshape(-1)
        candidates = candidates.reshape(-1, self.prompt_len)
        # The current beam comes first, so on ties it stays (and a beam that cannot improve does not move).
        pool = jnp.concatenate([ids, candidates])
        pool_kl = jnp.concatenate([current_kl, candidate_kl])
        if self.beam_width == 1:
            keep = jnp.argmin(pool_kl)[None]
        else:
            same = jnp.all(pool[:, None, :] == pool[None, :, :], axis=-1)
            duplicate = jnp.any(same & jnp.tri(len(pool), k=-1, dtype=bool), axis=1)
            keep = jnp.argsort(jnp.where(duplicate, jnp.inf, pool_kl), stable=True)[: self.beam_width]
        return pool[keep], pool_kl[keep], keep[0] >= self.beam_width

    def prompt_kl(self, params, p, log_p, ids):
        """KL of one token prompt [L]."""
        return kl_from_logits(p, self.logits(params, self.lm.embed(params, ids)), log_p)

    # -- the Problem contract (one target) -----------------------------------------------------------------

    def prepare(self, inputs):
        p = inputs["p"]
        return p, safe_log(p), inputs.get("init_ids"), inputs["floor"]

    def init(self, params, target, index, attempt, key) -> HardState:
        p, log_p, given, _ = target
        key_init, key_search = jax.random.split(key)
        if self.init_kind == "given":
            ids = given
        elif self.init_kind == "random":
            ids = jax.random.choice(key_init, jnp.asarray(np.flatnonzero(self.allowed), jnp.int32), (self.prompt_len,))
        elif self.init_kind == "sample":
            ids = self._sampled_start(params, p, log_p, key_init)
        else:
            ids = jnp.asarray(self.start_ids, jnp.int32)
        # The first attempt from the init, further ones from the target's draws. Under the driver's vmap over
        # slots a branch on `attempt` would run both sides anyway, so the draws (one iteration's evaluations per
        # attempt) are computed for first attempts too, only where restarts are asked for.
        if self.resample_restarts:
            ids = jnp.where(attempt == 0, ids, self._sampled_start(params, p, log_p, key_init))
        initial_kl = self.prompt_kl(params, p, log_p, ids)
        best = jnp.where(self._round_trips(ids), initial_kl, jnp.inf) if self.round_trip_prompts else initial_kl
        return HardState(
            progress=Progress(jnp.int32(0), best, jnp.asarray(self.max_steps > 0)),
            patience=Patience.start(),
            ids=jnp.broadcast_to(ids, (self.beam_width, self.prompt_len)),
            best_ids=ids, best_step=jnp.int32(0), initial_kl=initial_kl,
            path=jnp.zeros((self.max_steps,), jnp.float32), since_change=jnp.int32(0), window=jnp.int32(0),
            kicks=jnp.int32(0), key=jax.random.key_data(key_search),
        )

    def _sampled_start(self, params, p, log_p, key):
        """The best of `init_samples` prompts whose tokens are drawn i.i.d. from p (allowed tokens only): a
        model continues a list of tokens with a mixture of them, so such a prompt already puts mass where p
        does (measured on SmolLM2: the best of 64 draws is 6.5 nats below " the" × 10 on average)."""
        samples = self._draw_tokens(p, key, (self.init_samples, self.prompt_len))
        kl = self.candidate_kl(params, self.lm.embedding_matrix(params), p, log_p, samples)
        if self.round_trip_prompts:
            kl = jnp.where(self._round_trips(samples), kl, jnp.inf)
        return samples[jnp.argmin(kl)]

    def _draw_tokens(self, p, key, shape):
        """Tokens [*shape] drawn i.i.d. from p restricted to the allowed tokens (uniformly from them where p
        has no mass there)."""
        allowed = jnp.asarray(self.allowed)
        drawable = allowed & (p > 0)
        # A target with no mass on allowed tokens draws them uniformly.
        mask = jnp.where(drawable.any(), drawable, allowed)
        weights = jnp.where(drawable.any(), p, 1.0)
        # Inverse-CDF draws: O(V + draws) memory per target (jax.random.categorical's Gumbel-max draws a
        # [draws, L, V] noise array: 126 MB per target at 64 × 10 × 49k, 8 GB for 64 slots, out of memory).
        # Over the drawable tokens only, gathered to the front, and clamped to their count: a scan's rounding
        # can never land a draw on a token outside the mask (a special or filtered one).
        vocab = mask.shape[0]
        tokens = jnp.nonzero(mask, size=vocab, fill_value=0)[0]
        count = mask.sum()
        cdf = jnp.cumsum(jnp.where(jnp.arange(vocab) < count, weights[tokens], 0.0))
        uniform = jax.random.uniform(key, shape, dtype=cdf.dtype) * cdf[-1]
        return tokens[jnp.minimum(jnp.searchsorted(cdf, uniform, side="right"), count - 1)].astype(jnp.int32)

    def _kick(self, p, ids, key):
        """`ids` [L] with `kick_size` distinct random positions re-drawn from the target."""
        key_positions, key_tokens = jax.random.split(key)
        chosen = jax.random.permutation(key_positions, self.prompt_len)[: self.kick_size]
        redrawn = jnp.zeros(self.prompt_len, bool).at[chosen].set(True)
        return jnp.where(redrawn, self._draw_tokens(p, key_tokens, (self.prompt_len,)), ids)

    def step(self, params, target, s: HardState) -> HardState:
        p, log_p, _, floor = target
        ids, beam_kl, found = self._iterate(params, p, log_p, s.ids, s.progress.steps, s.window,
                                            jax.random.wrap_key_data(s.key))
        new_kl = beam_kl[0]
        # Only a new prompt can improve: the gradient pass's KL of a known prompt may differ from the
        # candidate pass's in the last float32 bits, which is no progress.
        better = found & (new_kl < s.progress.best)
        improved = better & (new_kl < s.progress.best - self.min_delta)
        since_improve = jnp.where(improved, 0, s.patience.since_improve + 1)
        since_change = jnp.where(jnp.any(ids != s.ids), 0, s.since_change + 1)
        best = jnp.where(better, new_kl, s.progress.best)
        steps = s.progress.steps + 1
        # A deterministic search whose beam stood still for a whole period of positions is stuck for good in its
        # window of candidates: the next window is tried (`widen`), and after the last the target stops.
        period = {"cycle": self.prompt_len, "best": 1}[self.positions] if self.mode == "hotflip" else None
        stalled = since_change >= period if period is not None else jnp.asarray(False)
        widened = stalled & (s.window < self.widen)
        window = jnp.where(since_change == 0, 0, s.window + widened)
        since_change = jnp.where(widened, 0, since_change)
        since_improve = jnp.where(widened, 0, since_improve)
        stuck = stalled & ~widened
        best_ids = jnp.where(better, ids[0], s.best_ids)
        kicked = stuck & (s.kicks < self.kicks)
        if self.kicks:  # the search goes on from the best prompt with some positions re-drawn
            key = jax.random.fold_in(jax.random.wrap_key_data(s.key), steps)  # hotflip draws nothing else
            ids = jnp.where(kicked, jnp.broadcast_to(self._kick(p, best_ids, key), ids.shape), ids)
            since_change, since_improve, window = (jnp.where(kicked, 0, x) for x in (since_change, since_improve,
                                                                                      window))
        stuck = stuck & ~kicked
        at_floor = best <= floor + self.floor_tolerance
        active = (steps < self.max_steps) & (since_improve < self.patience) & ~stuck & ~at_floor
        return HardState(
            progress=Progress(steps, best, active), patience=Patience(since_improve), ids=ids,
            best_ids=best_ids, best_step=jnp.where(better, steps, s.best_step),
            initial_kl=s.initial_kl, path=s.path.at[s.progress.steps].set(best) if self.max_steps else s.path,
            since_change=since_change, window=window, kicks=s.kicks + kicked,
            key=s.key,
        )

    def report(self, params, target, s: HardState) -> dict:
        p = target[0]
        figures = distribution_report(p, self.logits(params, self.lm.embed(params, s.best_ids)), self.top_k)
        del figures["kl"]  # the tracked best KL is the same value, measured when it was found
        # After a target stopped, its best KL stays what it was.
        path = jnp.where(jnp.arange(self.max_steps) < s.progress.steps, s.path, s.progress.best)
        return dict(kl=s.progress.best, initial_kl=s.initial_kl, best_step=s.best_step, steps=s.progress.steps,
                    **figures, token_ids=s.best_ids, kl_path=path)


def _init_token(lm: LanguageModel, config: HardPromptConfig, allowed: np.ndarray) -> int:
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
        raise ValueError(
            f"{what} has token ids outside the vocabulary [0, {len(allowed)}): {sorted(set(outside.tolist()))[:10]}"
        )
    banned = sorted(set(ids[~allowed[ids]].tolist()))
    if banned:
        raise ValueError(
            f"{what} has tokens the search may not use (special, or excluded by the filters): {banned[:10]}"
            + (f" and {len(banned) - 10} more" if len(banned) > 10 else "")
        )



def _over_targets(batched, shared: int = 0):
    """A per-target function made of `batched`, which takes `shared` arguments common to all targets and then
    per-target arrays (or pytrees of them) with a leading target axis. Vmapped over targets (the driver's
    slots), it is one call of `batched` on each device's targets: the batch can be regrouped (candidates of all
    targets sorted by their split point), a `lax.switch` keeps a scalar index (vmapped, it would run every
    branch) and a host callback sees its own device's share.

    Where the targets live on a mesh with the driver's target axis (`parallel.TARGET_AXIS`), each device runs
    its own share (`shard_map`): left to the partitioner, the work would be gathered onto every device.
    """

    @jax.custom_batching.custom_vmap
    def per_target(*args):
        out = batched(*args[:shared], *jax.tree.map(lambda a: a[None], args[shared:]))
        return jax.tree.map(lambda a: a[0], out)

    @per_target.def_vmap
    def rule(axis_size, in_batched, *args):
        if any(jax.tree.leaves(in_batched[:shared])):
            raise NotImplementedError("the shared arguments are one for all targets")
        per = jax.tree.map(lambda a, mapped: a if mapped else jnp.broadcast_to(a, (axis_size,) + a.shape),
                           tuple(args[shared:]), tuple(in_batched[shared:]))
        run = batched
        mesh = jax.typeof(jax.tree.leaves(per)[0]).sharding.mesh
        devices = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(parallel.TARGET_AXIS, 1)
        if devices > 1 and axis_size % devices == 0:
            split, whole = PartitionSpec(parallel.TARGET_AXIS), PartitionSpec()
            run = jax.shard_map(batched, mesh=mesh, in_specs=(whole,) * shared + (split,) * len(per), out_specs=split)
        out = run(*args[:shared], *per)
        return out, jax.tree.map(lambda _: True, out)

    return per_target


# -- Driving it ------------------------------------------------------------------------------------------

ARRAY_RESULTS = ("token_ids", "kl_path")


class HardMethod:
    """Hard prompts as a method (engine.Method): what `hard_prompt` and the sweep run."""

    name = "hard"
    slot_defaults = HARD_SLOTS

    def __init__(self, lm: LanguageModel, config: HardPromptConfig, *, init_ids: np.ndarray | None = None):
        """`init_ids` [N, L]: the caller's initial prompts, one per target of the whole target set."""
        config.validate(lm)
        self.lm, self.config, self.init_ids = lm, config, init_ids
        self._problem = HardProblem.build(lm, config, given_init=init_ids is not None or config.init == "bank")
        if init_ids is not None:
            _check_allowed(init_ids, self._problem.allowed, "init_ids")
        self._bank = None

    def problem(self) -> HardProblem:
        return self._problem

    def options(self, slots: int) -> DriverOptions:
        c = self.config
        return DriverOptions(slots=slots, segment_steps=c.segment_steps, refill_at=c.refill_at, seed=c.seed,
                             attempts=c.restarts, retry_above=c.restart_above, desc="hard prompts")

    def inputs(self, probs: np.ndarray, rows: slice) -> dict[str, np.ndarray]:
        inputs = {"p": np.asarray(probs, np.float32)}
        if self.init_ids is not None:
            inputs["init_ids"] = self.init_ids[rows]
        elif self.config.init == "bank":
            inputs["init_ids"] = self._bank_starts(inputs["p"])
        return inputs

    def _bank_starts(self, probs: np.ndarray) -> np.ndarray:
        """Each target's nearest context in the bank among those made only of allowed tokens: [N, L] ids."""
        if self._bank is None:  # built once per method, on first use, inside the prompt's fixed tokens
            c = self.config
            self._bank = ContextBank.sample(self.lm, c.bank_size, c.prompt_len, seed=c.seed,
                                            context=self._problem.context)
            self._bank_rows = np.flatnonzero(self._problem.allowed[self._bank.ids].all(axis=1))
            if not len(self._bank_rows):
                raise ValueError(f"init='bank': none of the {c.bank_size} sampled contexts is made only of tokens "
                                 "the candidate filters allow; use another init or fewer filters")
        nearest, _ = self._bank.nearest(probs, rows=self._bank_rows)
        return self._bank.ids[nearest]

    def columns(self, reports: dict[str, np.ndarray]) -> tuple[dict, dict]:
        # kl first: the figure every table is read for.
        columns = {"kl": reports["kl"]} | {k: v for k, v in reports.items() if k not in ARRAY_RESULTS}
        columns["template"] = np.full(len(columns["kl"]), self.config.template)
        arrays = {k: v for k, v in reports.items() if k in ARRAY_RESULTS}
        columns["prompt_len"] = np.full(len(columns["kl"]), self.config.prompt_len)
        if self.lm.tokenizer is not None:
            columns["round_trips"] = round_trips(self.lm.tokenizer, arrays["token_ids"])
            columns["text"] = np.array(self.lm.tokenizer.batch_decode(arrays["token_ids"].tolist()))
        return columns, arrays


def hard_prompt(
    lm, targets, config: HardPromptConfig | None = None, *, init_ids=None, devices=None,
    with_bound: bool | BoundConfig = True, progress: bool = True,
) -> PromptResults:
    """Search a hard prompt (real tokens) for each target.

    Args:
      lm: a LanguageModel.
      targets: a TargetSet or an [N, V] array of probabilities over lm's vocabulary.
      config: HardPromptConfig (defaults as documented there).
      init_ids: optional int [N, L] (or one [L] prompt for all) to start from instead of `config.init`,
        e.g. `project_soft_prompts(lm, soft_result)` to seed the search with a soft prompt's nearest
        tokens. Every token must be allowed under the config's filters.
      devices: devices to shard the slots over (default: this process's devices). In a multi-host
        run each process searches its own contiguous share of the targets (`parallel.process_slice`) and
        returns results for those only; a target's result does not depend on the split.
      with_bound: True (the default, as for every prompt method; or a BoundConfig) runs the certified
        `unembedding_bound` first: each target stops once within `config.floor_tolerance` of it, restarts go
        only to targets more than `config.restart_above` above it, and the results gain `kl_bound` and
        `gap_to_bound`. The bound costs a fraction of a hard search (about a second per target on a 2-core
        CPU against minutes). False: no bound (the floor is 0), for the search alone.
      progress: show progress bars (tqdm).
    Returns:
      PromptResults with method "hard": columns kl (best), initial_kl, best_step, steps, entropy, tv,
      top{k}_overlap, prompt_len and, where the model has a tokenizer, round_trips and text; arrays
      token_ids [N, L] and kl_path [N, max_steps] (best KL after each iteration).
    """
    config = config or HardPromptConfig()
    target_set = as_target_set(targets, lm.vocab_size)
    if init_ids is not None:
        init_ids = _check_init_ids(init_ids, len(target_set), config)
    method = HardMethod(lm, config, init_ids=init_ids)
    return run_with_bound(method, lm, target_set, with_bound, devices=devices, progress=progress)


def _check_init_ids(init_ids, n_targets: int, config: HardPromptConfig) -> np.ndarray:
    ids = np.asarray(init_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"init_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = np.broadcast_to(ids, (n_targets, len(ids)))
    if ids.shape != (n_targets, config.prompt_len):
        raise ValueError(f"init_ids must be [{n_targets}, {config.prompt_len}] (targets, prompt_len); got {ids.shape}")
    return np.ascontiguousarray(ids, np.int32)


# -- Helpers: evaluating token prompts, seeding from soft prompts --------------------------------------------


def token_prompt_kl(
    lm, targets, token_ids, config: HardPromptConfig | None = None, *, devices=None
) -> np.ndarray:
    """KL(p‖q) of given token prompts [N, L] (inside config's prefix/suffix/BOS), float32 [N].

    The same compiled evaluation as `hard_prompt`'s initial KL: a search of zero iterations from the given
    prompts, run by the same driver.
    """
    config = config or HardPromptConfig()
    target_set = as_target_set(targets, lm.vocab_size)
    token_ids = np.asarray(token_ids)
    n = len(target_set)
    if not np.issubdtype(token_ids.dtype, np.integer) or token_ids.ndim != 2 or len(token_ids) != n:
        raise ValueError(f"token_ids must be integer [{n}, L]; got {token_ids.dtype} {token_ids.shape}")
    if token_ids.size and not (0 <= token_ids.min() and token_ids.max() < lm.vocab_size):
        raise ValueError(f"token_ids must lie in [0, {lm.vocab_size})")
    # Only the context and the model matter here: any prompt length, any token, no search.
    config = dataclasses.replace(config, prompt_len=token_ids.shape[1], init="repeat", init_token=None, init_text=None)
    method = _Evaluation(lm, config, token_ids.astype(np.int32))
    return run_method(method, lm, target_set, devices=devices, take_share=False, progress=False).columns["kl"]


class _Evaluation(HardMethod):
    """Zero search iterations from given prompts, any tokens allowed: their exact KL."""

    name = "token_prompt_kl"

    def __init__(self, lm: LanguageModel, config: HardPromptConfig, token_ids: np.ndarray):
        config.validate(lm)
        self.lm, self.config, self.init_ids = lm, config, token_ids
        self._problem = dataclasses.replace(HardProblem.build(lm, config, given_init=True), max_steps=0)

    def columns(self, reports):
        return {"kl": reports["kl"]}, {}


def project_soft_prompts(
    lm: LanguageModel, soft_result: PromptResults, config: HardPromptConfig | None = None
) -> np.ndarray:
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


def projection_loss(
    lm: LanguageModel, targets, soft_result: PromptResults, config: HardPromptConfig | None = None
) -> pd.DataFrame:
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
