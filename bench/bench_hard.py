"""Hard-prompt engine benchmark on smollm2-135m, against PyTorch measured in the same run.

    python bench/bench_hard.py [--targets 64] [--candidates 128] [--torch-targets 2] [--paired 3]
                               [--quality 32] [--hotflip-iterations 4] [--gcg-iterations 2]
    python bench/bench_hard.py --reuse [--lengths 10 20] [--reuse-reps 3] [--reuse-cycles 1] [--reuse-rounds pool]
                               [--reuse-modes hotflip gcg] [--gradient-targets 0]
                               [--iteration-targets 64] [--iterations 3]
    python bench/bench_hard.py --strategies hotflip,gcg,gcg_n2,soft_hotflip [--strategy-targets 32 | --entropies
                               0.5,1,3 | --own-targets 16] [--seed 0] [--budget 12800] [--soft-steps 300]
                               [--out results.csv]
    python bench/bench_hard.py --readme-example

1. Candidate evaluations per second: the engine's batched candidate evaluation (every target's candidate
   prompts through `vmap` over targets of the per-target `lax.map` in blocks of `candidate_block`, KL of
   each, one compiled call for targets × candidates) against an HF PyTorch loop over targets, each
   target's candidates batched as one [candidates, 10] `input_ids` forward under `no_grad`
   (`logits_to_keep=1`: the last position only, as ours). The loop's rate does not depend on the number
   of targets, so it is timed on `--torch-targets` of them. Both KL values are compared on one target.
   On a shared machine the load drifts between those two timings, so both are also timed alternately
   (`--paired` rounds, each ours then PyTorch on the same `--torch-targets` targets; medians).
2. KL reached vs iterations, both modes at their defaults (hotflip k = 64, one position per iteration;
   GCG B = 128 swaps from the top-64), on `--quality` vanilla targets with entropies spread from 0 to
   ln|V|, run one iteration per compiled segment so each iteration is timed (the first includes compiling).
3. `--reuse`: candidates computed from their swapped position on after the prompt's cached keys/values
   (`reuse_prefix=True`, the default) against candidates computed whole, at each of `--lengths`:
   a. the search's own candidate evaluation (`HardProblem.beam_candidate_kl`, vmapped over targets as the
      driver does; the cached path is given each prompt's keys/values, which the search's gradient pass
      computes for both paths), hotflip k = 64 with target t swapping position t mod L (`--reuse-cycles` × L targets:
      every split point equally often, the average over a cycle of positions) and GCG B = 128 swaps at
      uniform positions; whole and cached timed alternately `--reuse-reps` times, medians; the largest KL
      difference between the paths is printed;
   b. whole search iterations (gradient, top-k, candidates) for `--iteration-targets` targets, both
      modes, `--iterations` iterations of one compiled segment each; the median of the iterations after
      the first (which compiles). Cycling hotflip's iteration t swaps position t − 1, so the few
      iterations timed see the early, least-cached positions: a conservative ratio.
   c. `--gradient-targets N`: the gradient pass of N targets' prompts with the prompt's keys/values as its
      auxiliary output (what the cached path takes from it) and without, alternately `--reuse-reps` times.
4. `--strategies`: search variants at an equal budget of candidate evaluations per target (`--budget`;
   12,800 = the default 200 hotflip iterations of k = 64), each run to its whole budget (patience off), on
   `--strategy-targets` vanilla targets spread over entropy, with the certified `unembedding_bound` beside
   each KL: mean / median KL and gap to the bound per entropy band after a quarter, half and all of the
   budget, targets left at their initial prompt, and wall time. See STRATEGIES for what each name runs; a
   soft warm start (`--soft-steps`, one attempt, no bound) is charged 3 candidate evaluations per soft step it
   ran (a value_and_grad of the prompt). The name `soft` runs `soft_prompt`'s defaults on the same targets:
   the floor a hard prompt of the same length is held to (hard ≥ soft up to search error).
   `--own-targets N` runs the same on N of the model's own next-token distributions after 10-token texts it
   sampled after its BOS, every prompt after BOS too: a text of KL 0 exists for each, so the KL a search ends
   at is the search's shortfall alone (on vanilla targets it is the search's and the token set's together).
5. `--readme-example`: README.md's hard-prompt example as written (4 vanilla targets, h = 1, 3, 6, 9, the
   defaults, the certified bound beside): its wall time, and each target's KL, bound and prompt.

Everything here is compute-bound on a CPU: one candidate forward is ~2.2 GFLOP, so 64 × 128 candidates
are ~18 TFLOP, and one iteration on 32 targets is ~2,100 (hotflip) or ~4,200 (GCG) forwards' worth. The
defaults keep the run near ten minutes on an idle 2-core machine; a full 200-iteration search is for an
accelerator (or patience).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

MODEL = "smollm2-135m"
PROMPT_LEN = 10


def random_targets(n: int, vocab: int, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    logits = np.random.default_rng(seed).standard_normal((n, vocab)) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def quality_targets(vocab: int, n: int):
    """Vanilla targets with entropies spread evenly from 0 to ln|V| (seed 0)."""
    from distprompt_jax.targets import vanilla_targets

    targets = vanilla_targets(vocab, np.linspace(0.0, np.log(vocab), n), seed=0, progress=False)
    return targets.probs, targets.metadata["entropy"].to_numpy(), "vanilla targets (Adam, lr 0.1)"


def compiled_evaluation(lm, probs: np.ndarray, candidates: np.ndarray):
    """(compile seconds, a callable returning KL [T, C]) of the engine's batched candidate evaluation."""
    from distprompt_jax.prompting.hard import HardProblem, HardPromptConfig
    from distprompt_jax.prompting.objective import safe_log

    problem = HardProblem.build(lm, HardPromptConfig(prompt_len=candidates.shape[-1]))

    def evaluate(params, p, candidates):
        table = lm.embedding_matrix(params)
        return jax.vmap(lambda p_i, c: problem.candidate_kl(params, table, p_i, safe_log(p_i), c))(p, candidates)

    p, candidates = jnp.asarray(probs), jnp.asarray(candidates)
    start = time.perf_counter()
    compiled = jax.jit(evaluate).lower(lm.params, p, candidates).compile()
    return time.perf_counter() - start, lambda: np.asarray(jax.block_until_ready(compiled(lm.params, p, candidates)))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def torch_loop(hf, probs: np.ndarray, candidates: np.ndarray):
    """(seconds, KL [T, C]): one target at a time, its candidates batched, no grad."""
    import torch

    def one(p, ids):
        p = torch.as_tensor(p)
        log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
        log_q = torch.log_softmax(hf(input_ids=torch.as_tensor(ids), logits_to_keep=1).logits[:, -1].float(), -1)
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(log_q)).sum(-1).numpy()

    with torch.no_grad():
        one(probs[0], candidates[0])  # warm-up, same shapes
        return timed(lambda: np.stack([one(p, ids) for p, ids in zip(probs, candidates)]))


def quality(lm, probs: np.ndarray, mode: str, iterations: int, **fields):
    """Best KL [T, iterations] and seconds per iteration, one compiled segment per iteration."""
    from distprompt_jax.prompting.engine import run_method
    from distprompt_jax.prompting.hard import HardMethod, HardPromptConfig

    config = HardPromptConfig(mode=mode, max_steps=iterations, segment_steps=1, slots=len(probs), **fields)
    elapsed = []
    result = run_method(HardMethod(lm, config), lm, probs, on_segment=lambda info: elapsed.append(info.seconds),
                        progress=False)
    seconds = np.diff([0.0, *elapsed]).tolist()
    return result.columns, result.arrays["kl_path"], seconds


def reuse_evaluation(lm, length: int, mode: str, n_targets: int, reps: int, rounds: str = "pool", seed: int = 0):
    """(whole, cached) candidate evaluations/s of the search's own evaluation and the largest |KL difference|."""
    from distprompt_jax.prompting.hard import HardProblem, HardPromptConfig, candidate_mask
    from distprompt_jax.prompting.objective import safe_log

    rng = np.random.default_rng(seed)
    allowed = np.flatnonzero(candidate_mask(lm))
    per_target = 64 if mode == "hotflip" else 128
    probs = jnp.asarray(random_targets(n_targets, lm.vocab_size, seed=seed))
    ids = rng.choice(allowed, (n_targets, length)).astype(np.int32)
    if mode == "hotflip":  # target t swaps position t mod L, as cycling hotflip's iteration t does
        starts = np.repeat((np.arange(n_targets) % length)[:, None], per_target, axis=1)
    else:
        starts = rng.integers(0, length, (n_targets, per_target))
    swapped = rng.choice(allowed, (n_targets, per_target))
    candidates = np.where(np.arange(length) == starts[..., None], swapped[..., None], ids[:, None]).astype(np.int32)
    args = [jnp.asarray(a) for a in (ids, candidates, starts.astype(np.int32))]

    def compiled(reuse: bool):
        config = HardPromptConfig(prompt_len=length, mode=mode, reuse_prefix=reuse, reuse_rounds=rounds)
        problem = HardProblem.build(lm, config)

        def fixed_cache(params):
            return lm.embedding_matrix(params), problem.context.prefix_cache(params, lm)

        # The search takes each prompt's keys/values from its gradient pass (which both paths run), so the
        # cached evaluation is given them, computed beforehand.
        @jax.jit
        def prompt_caches(params, ids):
            table, fixed = fixed_cache(params)
            return problem.prompt_cache(params, table, fixed, ids) if reuse else None

        def evaluate(params, p, caches, candidates, starts):
            table, fixed = fixed_cache(params)

            def one(p, cache, candidates, starts):  # one target, a beam of one
                cache = jax.tree.map(lambda a: a[None], cache)
                return problem.beam_candidate_kl(params, table, fixed, p, safe_log(p), cache, candidates[None],
                                                 starts[None])[0]

            return jax.vmap(one)(p, caches, candidates, starts)

        inputs = (probs, prompt_caches(lm.params, args[0]), *args[1:])
        run = jax.jit(evaluate).lower(lm.params, *inputs).compile()
        return lambda: np.asarray(jax.block_until_ready(run(lm.params, *inputs)))

    whole, cached = compiled(False), compiled(True)
    difference = np.abs(whole() - cached()).max()  # also the warm-up
    rounds = [(timed(whole)[0], timed(cached)[0]) for _ in range(reps)]  # alternately: the load drifts
    whole_s, cached_s = (float(np.median(r)) for r in zip(*rounds))
    return candidates[..., 0].size / whole_s, candidates[..., 0].size / cached_s, difference


def reuse_section(lm, args):
    if args.reuse_cycles:
        reuse_evaluation_table(lm, args)
    if args.iteration_targets:
        reuse_iteration_table(lm, args)
    if args.gradient_targets:
        gradient_pass_table(lm, args)


def gradient_pass_table(lm, args):
    """Section 3c: the search's gradient pass (value_and_grad of each target's prompt KL) with the prompt's keys/
    values as its auxiliary output (`lm.logits_and_cache`, what the cached path reuses) and without."""
    from distprompt_jax.prompting.hard import candidate_mask
    from distprompt_jax.prompting.objective import kl_from_logits, safe_log

    n = args.gradient_targets
    print(f"\n## The gradient pass with and without the prompt's cache, {n} targets (median of {args.reuse_reps}, "
          "alternating)\n")
    print("| L | without (s) | with the cache (s) | ratio |")
    print("|---:|---:|---:|---:|")
    allowed = np.flatnonzero(candidate_mask(lm))
    probs = jnp.asarray(random_targets(n, lm.vocab_size, seed=2))
    for length in args.lengths:
        ids = jnp.asarray(np.random.default_rng(2).choice(allowed, (n, length)).astype(np.int32))

        def compiled(with_cache: bool):
            def loss(params, p, x):
                if with_cache:
                    logits, cache = lm.logits_and_cache(params, x)
                    return kl_from_logits(p, logits, safe_log(p)), cache
                return kl_from_logits(p, lm.logits(params, x), safe_log(p)), None

            def gradient_pass(params, p, ids):
                x = lm.embedding_matrix(params)[ids]
                return jax.vmap(jax.value_and_grad(loss, argnums=2, has_aux=True), in_axes=(None, 0, 0))(params, p, x)

            run = jax.jit(gradient_pass).lower(lm.params, probs, ids).compile()
            return lambda: jax.block_until_ready(run(lm.params, probs, ids))

        without, with_cache = compiled(False), compiled(True)
        without(), with_cache()
        rounds = [(timed(without)[0], timed(with_cache)[0]) for _ in range(args.reuse_reps)]
        without_s, with_s = (float(np.median(r)) for r in zip(*rounds))
        print(f"| {length} | {without_s:.3f} | {with_s:.3f} | {with_s / without_s:.3f} |", flush=True)


def reuse_evaluation_table(lm, args):
    rounds = args.reuse_rounds
    print(f"\n## Reusing the shared prefix ({rounds} rounds): candidate evaluations/s, whole vs cached (median of "
          f"{args.reuse_reps}, alternating)\n")
    print("| L | mode | targets × candidates | whole | cached | speed-up | max |ΔKL| |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for length in args.lengths:
        for mode in args.reuse_modes:
            n = args.reuse_cycles * length
            whole, cached, difference = reuse_evaluation(lm, length, mode, n, args.reuse_reps, args.reuse_rounds)
            per_target = 64 if mode == "hotflip" else 128
            print(f"| {length} | {mode} | {n} × {per_target} | {whole:.1f} | {cached:.1f} | {cached / whole:.2f}× | "
                  f"{difference:.1e} |", flush=True)


def reuse_iteration_table(lm, args):
    probs = random_targets(args.iteration_targets, lm.vocab_size, seed=1)
    print(f"\n## Whole iterations, {args.iteration_targets} targets (median of iterations 2..{args.iterations})\n")
    print("| L | mode | whole s/it | cached s/it | speed-up | cached it/s | cached candidate evals/s | same path |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for length in args.lengths:
        for mode in args.iteration_modes:
            runs = [quality(lm, probs, mode, args.iterations, prompt_len=length, reuse_prefix=reuse)
                    for reuse in (False, True)]
            whole_s, cached_s = (float(np.median(r[2][1:])) for r in runs)
            same = np.array_equal(runs[0][1], runs[1][1]) or bool(np.allclose(runs[0][1], runs[1][1], rtol=1e-5))
            per_target = 64 if mode == "hotflip" else 128
            print(f"| {length} | {mode} | {whole_s:.1f} | {cached_s:.1f} | {whole_s / cached_s:.2f}× | "
                  f"{1 / cached_s:.3f} | {len(probs) * per_target / cached_s:.1f} | {same} |", flush=True)


# name -> (HardPromptConfig fields, candidate evaluations per iteration, whether a soft prompt starts it)
# Every entry names its init: the names mean what they meant when BENCHMARKS.md measured them, whatever the
# default is now ("repeat" is " the" × 10, the default until 2026-12-01).
STRATEGIES = {
    "hotflip": (dict(init="repeat"), 64, 0),  # k = 64 at one position per iteration, cycling
    "hotflip_best": (dict(init="repeat", positions="best"), 64, 0),
    "hotflip_beam4": (dict(init="repeat", beam_width=4, k=16), 64, 0),
    "gcg": (dict(init="repeat", mode="gcg"), 128, 0),  # B = 128 single swaps from the per-position top-64
    "gcg_n2": (dict(init="repeat", mode="gcg", n_replace=2), 128, 0),
    "gcg_n3": (dict(init="repeat", mode="gcg", n_replace=3), 128, 0),
    "gcg_beam4": (dict(init="repeat", mode="gcg", beam_width=4, num_swaps=32), 128, 0),
    "gcg_k256": (dict(init="repeat", mode="gcg", k=256), 128, 0),
    "soft_hotflip": (dict(), 64, True),  # --soft-steps soft steps (one attempt), projected, then hotflip
    "soft_gcg": (dict(mode="gcg"), 128, True),
    # the context bank's nearest model-written context (512 sampled once for all targets: not charged per target)
    "bank_hotflip": (dict(init="bank"), 64, 0),
    "bank_gcg_n2": (dict(mode="gcg", n_replace=2, init="bank"), 128, 0),
    # the best of 64 prompts drawn from the target (its 64 evaluations are charged: `spent_before`)
    "sample_hotflip": (dict(init="sample"), 64, 0),
    "sample_gcg_n2": (dict(mode="gcg", n_replace=2, init="sample"), 128, 0),
    "sample_gcg_n3": (dict(mode="gcg", n_replace=3, init="sample"), 128, 0),
    # a buffer of the 4 best prompts, 32 swaps from each (128 candidates an iteration, as above)
    "sample_gcg_n2_beam4": (dict(mode="gcg", n_replace=2, beam_width=4, num_swaps=32, init="sample"), 128, 0),
    # the budget split over 3 (5) attempts (targets within 1 nat of 0 stop), each from its own 64 draws
    "sample_hotflip_r3": (dict(init="sample", restarts=3), 64, 0),
    "sample_hotflip_r5": (dict(init="sample", restarts=5), 64, 0),
    # at each stand-still the next 64 ranks of the gradient score, up to ranks 1024 (5: 384), before stopping
    "sample_hotflip_w15": (dict(init="sample", widen=15), 64, 0),
    "sample_hotflip_w5": (dict(init="sample", widen=5), 64, 0),
    # at each stand-still 3 (2, 5) random positions of the best prompt re-drawn from the target, the search going
    # on from there until the budget ends (iterated local search)
    "sample_hotflip_kick3": (dict(init="sample", kicks=1000, kick_size=3), 64, 0),
    "sample_hotflip_kick2": (dict(init="sample", kicks=1000, kick_size=2), 64, 0),
    "sample_hotflip_kick5": (dict(init="sample", kicks=1000, kick_size=5), 64, 0),
    # the best of 1024 draws (16 hotflip iterations' evaluations) instead of 64
    "sample1024_hotflip": (dict(init="sample", init_samples=1024), 64, 0),
    "sample1024_hotflip_w15": (dict(init="sample", init_samples=1024, widen=15), 64, 0),
    # every prompt after the model's BOS token (as `--own-targets` runs them): the start a natural context has
    "sample_hotflip_bos": (dict(init="sample", bos=True), 64, 0),
    "hotflip_roundtrip": (dict(init="repeat", round_trip_prompts=True), 64, 0),
    "gcg_roundtrip": (dict(init="repeat", mode="gcg", round_trip_prompts=True), 128, 0),
}
SOFT = "soft"  # not a hard search: soft_prompt's defaults on the same targets, the floor a hard prompt is held to
BANDS = ((0.0, 3.0), (3.0, 6.0), (6.0, 9.0), (9.0, np.inf))


def run_strategy(lm, targets, name: str, budget: int, soft_steps: int, bos: bool = False):
    """(per-target DataFrame, seconds): KL after a quarter, half and all of `budget` evaluations per target
    (`bos`: every prompt, soft and hard, after the model's BOS token)."""
    import pandas as pd

    from distprompt_jax import SoftPromptConfig, soft_prompt
    from distprompt_jax.prompting.hard import HardPromptConfig, hard_prompt, project_soft_prompts

    if name == SOFT:
        start = time.perf_counter()
        result = soft_prompt(lm, targets, SoftPromptConfig(bos=bos))
        table = pd.DataFrame({"strategy": name, "entropy": targets.metadata["entropy"].to_numpy(),
                              "initial_kl": result.columns["initial_kl"], "kl": result.columns["kl"],
                              "best_step": result.columns["best_step"], "steps": result.columns["steps"],
                              "kl_quarter": np.nan, "kl_half": np.nan})
        table["evaluations"] = 3.0 * table["steps"]  # a value_and_grad of the prompt per step
        return table, time.perf_counter() - start
    fields, per_iteration, from_soft = STRATEGIES[name]
    fields = {**fields, "bos": bos or fields.get("bos", False)}
    start = time.perf_counter()
    init_ids, spent = None, np.zeros(len(targets.probs))
    if from_soft:
        soft = soft_prompt(lm, targets, SoftPromptConfig(max_steps=soft_steps, restarts=1, bos=bos))
        init_ids, spent = project_soft_prompts(lm, soft), 3.0 * soft.columns["steps"]
    chosen = HardPromptConfig(**fields)
    if chosen.init == "sample" and init_ids is None:
        spent = spent + chosen.restarts * chosen.init_samples
    iterations = int((budget - spent.max()) // (per_iteration * chosen.restarts))  # per attempt
    config = HardPromptConfig(max_steps=iterations, patience=max(iterations, PROMPT_LEN), **fields)
    result = hard_prompt(lm, targets, config, init_ids=init_ids, with_bound=False)  # the search alone, as before
    seconds = time.perf_counter() - start
    path = result.arrays["kl_path"]
    table = pd.DataFrame({"strategy": name, "entropy": targets.metadata["entropy"].to_numpy(),
                          "initial_kl": result.columns["initial_kl"], "kl": result.columns["kl"],
                          "best_step": result.columns["best_step"], "steps": result.columns["steps"],
                          "round_trips": result.columns.get("round_trips", np.nan), "spent_before": spent,
                          "text": result.columns.get("text")})
    for column, fraction in (("kl_quarter", 0.25), ("kl_half", 0.5)):
        table[column] = path[:, max(0, int(fraction * iterations) - 1)]
    table["evaluations"] = spent + per_iteration * table["steps"]  # with restarts: the best attempt's only
    return table, seconds


def strategies_section(lm, args):
    import pandas as pd

    from distprompt_jax import unembedding_bound
    from distprompt_jax.prompting.hard import HardPromptConfig, token_prompt_kl
    from distprompt_jax.targets import model_targets, vanilla_targets

    unknown = sorted(set(args.strategies.split(",")) - set(STRATEGIES) - {SOFT})
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {sorted(STRATEGIES) + [SOFT]}")
    if args.own_targets and args.entropies:
        raise SystemExit("--own-targets and --entropies choose section 4's targets two ways: give one")
    known_text = None
    if args.own_targets:
        if any(STRATEGIES[name][0].get("init") == "bank" for name in args.strategies.split(",") if name in STRATEGIES):
            # the bank samples its texts with the seeds model_targets uses: it would hold the answers
            raise SystemExit("--own-targets: the bank_* strategies' bank holds the targets' own texts (same seeds)")
        # Reachable by construction: the model's next-token distribution after a text it sampled after its BOS,
        # PROMPT_LEN tokens long; with bos=True that text is a prompt of KL 0 (checked here), so whatever KL a
        # search ends at is the search's shortfall, not the token set's.
        targets = model_targets(lm, args.own_targets, seed=args.seed, context_len=PROMPT_LEN, progress=False)
        texts = np.array(targets.metadata["context_ids"].tolist(), np.int32)[:, -PROMPT_LEN:]  # BOS first there
        known = token_prompt_kl(lm, targets, texts, HardPromptConfig(bos=True))
        if known.max() > 1e-4:
            raise SystemExit(f"--own-targets: the sampled texts reach their targets only to KL {known.max():.2e}, "
                             "not 0: the targets are not the texts' next-token distributions")
        known_text = lm.tokenizer.batch_decode(texts.tolist())
        what = f"of {lm.name}'s own next-token distributions after {PROMPT_LEN}-token texts it sampled"
        print(f"the sampled texts as prompts after BOS: KL max {known.max():.2e}", flush=True)
    else:
        entropies = (np.array([float(h) for h in args.entropies.split(",")]) if args.entropies
                     else np.linspace(0.25, np.log(lm.vocab_size) - 0.25, args.strategy_targets))
        targets = vanilla_targets(lm.vocab_size, entropies, seed=args.seed, progress=False)
        what = "vanilla targets"
    entropies = targets.metadata["entropy"].to_numpy()
    bound = unembedding_bound(lm, targets).columns["kl"]
    print(f"\n## Strategies at {args.budget} candidate evaluations per target, {len(entropies)} {what} "
          f"(h {entropies.min():.2f} … {entropies.max():.2f}, seed {args.seed}), certified bound beside\n", flush=True)
    print("| strategy | mean KL | median KL | median gap | h∈[0,3): median KL / gap | [3,6) | [6,9) | ≥9 | "
          "mean KL at ¼ budget | at ½ | never improved | seconds |")
    print("|---|" + "---:|" * 11, flush=True)
    tables = []
    for name in args.strategies.split(","):
        table, seconds = run_strategy(lm, targets, name, args.budget, args.soft_steps, bos=bool(args.own_targets))
        table["bound"], table["seconds"] = bound, seconds
        if known_text is not None:
            table["known_text"] = known_text
        tables.append(table)
        gap = table.kl - table.bound
        stuck = int(np.sum(table.best_step == 0))
        cells = [f"{table.kl.mean():.3f}", f"{table.kl.median():.3f}", f"{gap.median():.3f}"]
        for lo, hi in BANDS:
            band = (table.entropy >= lo) & (table.entropy < hi)
            cells.append(f"{table.kl[band].median():.2f} / {gap[band].median():.2f}" if band.any() else "")
        cells += [f"{table.kl_quarter.mean():.3f}", f"{table.kl_half.mean():.3f}", str(stuck), f"{seconds:.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        if args.out:
            pd.concat(tables).to_csv(args.out, index=False)


README_ENTROPIES = (1.0, 3.0, 6.0, 9.0)


def readme_example_section(lm):
    """Times README.md's hard-prompt example exactly as written there (keep the two in step)."""
    from distprompt_jax import hard_prompt
    from distprompt_jax.targets import vanilla_targets

    start = time.perf_counter()
    targets = vanilla_targets(lm.vocab_size, README_ENTROPIES, seed=0)
    result = hard_prompt(lm, targets, with_bound=True)
    seconds = time.perf_counter() - start
    table = result.to_pandas()
    print(f"\n## README hard-prompt example: {seconds:.0f} s (targets, bound and search)\n")
    print("| h | KL | bound | gap | iterations | best at | prompt |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    # the table's `entropy` is the found distribution's; the target's is in the target set's metadata
    for h, row in zip(targets.metadata["entropy"], table.itertuples()):
        print(f"| {h:.1f} | {row.kl:.3f} | {row.kl_bound:.3f} | {row.gap_to_bound:.3f} | {row.steps} | "
              f"{row.best_step} | {row.text!r} |", flush=True)


def machine_line(*extra: str) -> str:
    return ", ".join([f"# {platform.machine()}", f"{os.cpu_count()} cores",
                      f"jax {jax.__version__} ({jax.devices()[0].platform})", *extra,
                      time.strftime("%Y-%m-%d %H:%M"), f"load {os.getloadavg()[0]:.2f}"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=128)
    parser.add_argument("--torch-targets", type=int, default=2, help="targets the PyTorch loop is timed on")
    parser.add_argument("--paired", type=int, default=3, help="alternating rounds, ours vs PyTorch (0 to skip)")
    parser.add_argument("--quality", type=int, default=32, help="targets for KL vs iterations (0 to skip)")
    parser.add_argument("--hotflip-iterations", type=int, default=4)
    parser.add_argument("--gcg-iterations", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="run only section 3, whole vs cached candidates")
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--reuse-reps", type=int, default=3)
    parser.add_argument("--reuse-cycles", type=int, default=1, help="targets = cycles × L in section 3a (0 skips)")
    parser.add_argument("--reuse-rounds", default="pool", choices=["target", "pool"],
                        help="section 3a's HardPromptConfig.reuse_rounds")
    parser.add_argument("--reuse-modes", nargs="+", default=["hotflip", "gcg"], choices=["hotflip", "gcg"],
                        help="section 3a's search modes")
    parser.add_argument("--iteration-targets", type=int, default=64, help="section 3b (0 to skip)")
    parser.add_argument("--gradient-targets", type=int, default=0, help="section 3c (0 to skip)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--iteration-modes", nargs="+", default=["hotflip", "gcg"], choices=["hotflip", "gcg"],
                        help="section 3b's search modes")
    parser.add_argument("--strategies", default="", help="run only section 4: comma-separated STRATEGIES names")
    parser.add_argument("--strategy-targets", type=int, default=32, help="spread from 0.25 to ln|V| − 0.25 nats")
    parser.add_argument("--entropies", default="", help="section 4's target entropies instead (comma-separated)")
    parser.add_argument("--own-targets", type=int, default=0,
                        help="section 4 on this many of the model's own next-token distributions after texts of "
                             f"{PROMPT_LEN} tokens it sampled (reachable: KL 0), prompts after BOS")
    parser.add_argument("--budget", type=int, default=12_800, help="candidate evaluations per target")
    parser.add_argument("--seed", type=int, default=0, help="section 4's targets' seed")
    parser.add_argument("--soft-steps", type=int, default=300, help="soft steps of the soft_* warm starts")
    parser.add_argument("--out", default="", help="section 4's per-target table (CSV)")
    parser.add_argument("--readme-example", action="store_true", help="run only section 5")
    args = parser.parse_args()
    if args.readme_example:
        from distprompt_jax import load_model

        print(machine_line())
        readme_example_section(load_model(MODEL))
        return
    if args.strategies:
        from distprompt_jax import load_model

        print(machine_line())
        strategies_section(load_model(MODEL), args)
        return
    if args.reuse:
        from distprompt_jax import load_model

        print(machine_line())
        reuse_section(load_model(MODEL), args)
        return

    import torch
    from transformers import AutoModelForCausalLM

    from distprompt_jax import load_model
    from distprompt_jax.checkpoints import registry
    from distprompt_jax.prompting.hard import HardPromptConfig, candidate_mask

    torch.set_num_threads(os.cpu_count())
    print(machine_line(f"torch {torch.__version__}") + "\n")
    lm = load_model(MODEL)
    allowed = np.flatnonzero(candidate_mask(lm))
    rng = np.random.default_rng(0)
    probs = random_targets(args.targets, lm.vocab_size)
    candidates = rng.choice(allowed, size=(args.targets, args.candidates, PROMPT_LEN)).astype(np.int32)

    compile_seconds, evaluate = compiled_evaluation(lm, probs, candidates)
    seconds, kl = timed(evaluate)
    our_rate = kl.size / seconds
    print(f"distprompt_jax: {args.targets} targets × {args.candidates} candidates (L = {PROMPT_LEN}) in one "
          f"compiled call: {seconds:.1f} s (compile {compile_seconds:.1f} s)", flush=True)

    gguf = registry.fetch(MODEL)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    n = min(args.torch_targets, args.targets)
    torch_seconds, torch_kl = torch_loop(hf, probs[:n], candidates[:n])
    torch_rate = torch_kl.size / torch_seconds
    print(f"PyTorch loop: {n} targets × {args.candidates} candidates in {torch_seconds:.1f} s; "
          f"max |KL ours − KL torch| {np.abs(kl[:n] - torch_kl).max():.2e} nats\n")
    print("| candidate evaluations/s (smollm2-135m, L = 10, float32) | distprompt_jax | PyTorch loop | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| {args.targets} targets × {args.candidates} candidates | {our_rate:.1f} | {torch_rate:.1f} | "
          f"{our_rate / torch_rate:.2f}× |", flush=True)
    if args.paired:
        _, evaluate_few = compiled_evaluation(lm, probs[:n], candidates[:n])
        evaluate_few()  # warm-up
        rounds = [(timed(evaluate_few)[0], torch_loop(hf, probs[:n], candidates[:n])[0]) for _ in range(args.paired)]
        ours_few, torch_few = (n * args.candidates / np.median(s) for s in zip(*rounds))
        print(f"| {n} targets × {args.candidates} candidates, alternating, median of {args.paired} | "
              f"{ours_few:.1f} | {torch_few:.1f} | {ours_few / torch_few:.2f}× |", flush=True)
    del hf

    if args.quality:
        probs, entropies, what = quality_targets(lm.vocab_size, args.quality)
        print(f"\nKL vs iterations on {args.quality} {what}, entropies {entropies.min():.2f} … {entropies.max():.2f} "
              f"nats; defaults (L = 10, k = 64, B = 128, init {HardPromptConfig().init!r})\n")
        runs = {mode: quality(lm, probs, mode, iters)
                for mode, iters in (("hotflip", args.hotflip_iterations), ("gcg", args.gcg_iterations))}
        initial = runs["hotflip"][0]["initial_kl"]
        print("| iteration | hotflip mean KL | hotflip median | GCG mean KL | GCG median |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| 0 (init) | {initial.mean():.4f} | {np.median(initial):.4f} | {initial.mean():.4f} | "
              f"{np.median(initial):.4f} |")
        for t in range(max(args.hotflip_iterations, args.gcg_iterations)):
            cells = []
            for mode in ("hotflip", "gcg"):
                path = runs[mode][1]
                cells += [f"{path[:, t].mean():.4f}", f"{np.median(path[:, t]):.4f}"] if t < path.shape[1] else ["", ""]
            print(f"| {t + 1} | " + " | ".join(cells) + " |")
        print()
        for mode, per_target in (("hotflip", 64), ("gcg", 128)):
            columns, path, seconds = runs[mode]
            later = seconds[1:] or seconds
            rate = len(probs) * per_target / np.median(later)
            print(f"{mode}: first iteration (with compile) {seconds[0]:.1f} s, then {np.median(later):.1f} s per "
                  f"iteration = {rate:.1f} candidate evaluations/s including the gradient and top-k; targets "
                  f"improved {np.mean(columns['kl'] < initial):.0%}; mean KL {initial.mean():.4f} → "
                  f"{columns['kl'].mean():.4f}")
        for lo, hi in [(0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0001)]:
            band = (entropies >= lo * entropies.max()) & (entropies < hi * entropies.max())
            print(f"  h in [{lo * entropies.max():.1f}, {min(hi, 1) * entropies.max():.1f}]: mean KL init "
                  f"{initial[band].mean():.4f}, hotflip {runs['hotflip'][0]['kl'][band].mean():.4f}, "
                  f"GCG {runs['gcg'][0]['kl'][band].mean():.4f}")


if __name__ == "__main__":
    main()
