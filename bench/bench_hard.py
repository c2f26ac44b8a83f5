"""Hard-prompt engine benchmark on smollm2-135m (L = 10), against PyTorch measured in the same run.

    python bench/bench_hard.py [--targets 64] [--candidates 128] [--torch-targets 2] [--paired 3]
                               [--quality 32] [--hotflip-iterations 4] [--gcg-iterations 2]

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
    """Vanilla targets across entropies; if that module is not importable yet, softmax of N(0, σ²) logits."""
    entropies = np.linspace(0.0, np.log(vocab), n)
    try:
        try:
            from distprompt_jax.targets import vanilla_targets
        except ImportError:
            from distprompt_jax.targets.vanilla import vanilla_targets
        targets = vanilla_targets(vocab, entropies, seed=0, progress=False)
        return targets.probs, targets.metadata["entropy"].to_numpy(), "vanilla targets (Adam, lr 0.1)"
    except ImportError:
        scales = np.geomspace(0.25, 16, n)
        probs = np.concatenate([random_targets(1, vocab, seed=i, scale=s) for i, s in enumerate(scales)])
        from distprompt_jax.targets import entropy_nats

        return probs, entropy_nats(probs), "softmax of N(0, σ²) logits, σ from 0.25 to 16 (vanilla_targets missing)"


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


def quality(lm, probs: np.ndarray, mode: str, iterations: int):
    """Best KL [T, iterations] and seconds per iteration, one compiled segment per iteration."""
    from distprompt_jax.prompting.engine import run_method
    from distprompt_jax.prompting.hard import HardMethod, HardPromptConfig

    config = HardPromptConfig(mode=mode, max_steps=iterations, segment_steps=1, slots=len(probs))
    elapsed = []
    result = run_method(HardMethod(lm, config), lm, probs, on_segment=lambda info: elapsed.append(info.seconds))
    seconds = np.diff([0.0, *elapsed]).tolist()
    return result.columns, result.arrays["kl_path"], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=128)
    parser.add_argument("--torch-targets", type=int, default=2, help="targets the PyTorch loop is timed on")
    parser.add_argument("--paired", type=int, default=3, help="alternating rounds, ours vs PyTorch (0 to skip)")
    parser.add_argument("--quality", type=int, default=32, help="targets for KL vs iterations (0 to skip)")
    parser.add_argument("--hotflip-iterations", type=int, default=4)
    parser.add_argument("--gcg-iterations", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from distprompt_jax import load_model
    from distprompt_jax.checkpoints import registry
    from distprompt_jax.prompting.hard import candidate_mask

    torch.set_num_threads(os.cpu_count())
    print(f"# {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}\n")
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
              "nats; defaults (L = 10, k = 64, B = 128, init ' the' × 10)\n")
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
