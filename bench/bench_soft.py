"""Soft-prompt engine benchmark on smollm2-135m (L = 10), against PyTorch measured in the same run.

    python bench/bench_soft.py [--sizes 1,8,64,256] [--steps 5] [--memory 256,1024,4096] [--quality 64]
    python bench/bench_soft.py --fixed-prefix 64

1. Throughput, target·steps/s: our compiled segment (`jit(vmap(value_and_grad(KL)))` + per-target Adam
   inside a `while_loop`, every target active) against HF PyTorch with `inputs_embeds` + torch Adam,
   (a) one target at a time, as the public reproduction does, and (b) the whole batch at once.
2. MFU: model FLOPs of a step (counted from the architecture: XLA's cost analysis counts a scanned
   layer once) over its time, divided by this machine's dense float32 matmul peak, measured here.
3. Peak memory (max RSS of a fresh process) of `soft_prompt` on N targets with the automatic chunk size.
4. Quality per compute: the default recipe against the peer recipe (N(0,1) init, Adam 0.1, L = 5,
   patience 20) at the same step budget, on vanilla targets across entropies.
5. `--fixed-prefix N`: only this section. N targets' steps inside SmolLM2's chat template (fixed tokens before
   and after the prompt) with the fixed prefix's keys and values computed once per step for all targets, as the
   engine runs, against the same problem with the prefix recomputed in every target's input (the engine before
   2026-12-02), alternating, median of `--repeats`; and the largest |ΔKL| between the two at the same prompts.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

MODEL = "smollm2-135m"


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_targets(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).standard_normal((n, vocab)) * 2
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def step_flops(config, prompt_len: int) -> float:
    """FLOPs of one value_and_grad step for one target, gradients to the prompt only.

    Forward: every projection on every position, attention scores and mixing, the unembedding of the
    last position. Backward to the inputs: one matmul per projection (no weight gradients), two per
    attention product.
    """
    n, d, hd = prompt_len, config.d_model, config.head_dim
    q_dim, kv_dim = config.n_heads * hd, config.n_kv_heads * hd
    mlp = 3 if config.family != "gpt2" else 2
    linear = 2 * n * d * (2 * q_dim + 2 * kv_dim + mlp * config.d_ff)
    attention = 2 * 2 * n * n * q_dim
    forward_linear = config.n_layers * linear + 2 * d * config.vocab_size
    forward_attention = config.n_layers * attention
    return 2 * forward_linear + 3 * forward_attention


def jax_segment(lm, n: int, steps: int, problem=None):
    """A callable running `steps` optimizer steps for n targets (one compiled segment of the driver's pool) of
    `problem` (default: the soft-prompt problem of the default config)."""
    from distprompt_jax.prompting.soft import SoftProblem, SoftPromptConfig
    from distprompt_jax.solve import compiled

    functions = compiled(problem or SoftProblem.build(lm, SoftPromptConfig(max_steps=10**6, patience=10**6)))
    # floor 0: no target stops at a bound, so every step of the timed segments runs
    inputs = {"p": jnp.asarray(random_targets(n, lm.vocab_size), jnp.float32), "floor": jnp.zeros(n, jnp.float32)}
    index = jnp.arange(n, dtype=jnp.int32)
    targets, states = functions.start(lm.params, inputs, np.uint32(0), index, jnp.zeros(n, jnp.int32),
                                      jnp.ones(n, bool))
    pool = [states]  # the segment takes its states over (donated), so each call continues from the last

    def run():
        pool[0], _ = functions.segment(lm.params, targets, pool[0], np.int32(n + 1), num_steps=steps)
        jax.block_until_ready(pool[0])

    return run


def fixed_prefix_rates(lm, n: int, steps: int, repeats: int):
    """Section 5: target·steps/s inside the chat template, the fixed prefix cached (the engine) and recomputed in
    every input (a subclass restoring the old `logits`), alternating; and max |ΔKL| at the same prompts."""
    import dataclasses

    from distprompt_jax.prompting.soft import SoftProblem, SoftPromptConfig

    class WholeInput(SoftProblem):
        def logits(self, params, v):  # the prefix's positions in every target's input, forward and backward
            return self.lm.logits(params, self.context.around(params, self.lm, v))

    cached = SoftProblem.build(lm, SoftPromptConfig(template="chat", max_steps=10**6, patience=10**6))
    whole = WholeInput(**{f.name: getattr(cached, f.name) for f in dataclasses.fields(cached)})
    context = cached.context
    print(f"chat template: {len(context.prefix_ids)} fixed tokens before the prompt of {cached.prompt_len}, "
          f"{len(context.suffix_ids)} after")
    runs = {"cached": jax_segment(lm, n, steps, cached), "whole": jax_segment(lm, n, steps, whole)}
    times = {name: [] for name in runs}
    for run in runs.values():
        run()  # compile
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rates = {name: n * steps / statistics.median(t) for name, t in times.items()}
    prompts = cached.embed_std * jax.random.normal(jax.random.key(0), (n, cached.prompt_len, lm.d_model))
    kl = jax.jit(jax.vmap(lambda problem, v, p: problem_kl(problem, lm.params, v, p), in_axes=(None, 0, 0)),
                 static_argnums=0)
    p = jnp.asarray(random_targets(n, lm.vocab_size), jnp.float32)
    delta = float(jnp.max(jnp.abs(kl(cached, prompts, p) - kl(whole, prompts, p))))
    return rates, delta


def problem_kl(problem, params, v, p):
    from distprompt_jax.prompting.objective import kl_from_logits, safe_log

    return kl_from_logits(p, problem.logits(params, v), safe_log(p))


def frozen_hf_model(dtype: str = "float32", device: str = "cpu"):
    """The same GGUF as `load_model(MODEL)` in HF PyTorch, in `dtype` on `device`, weights frozen (the gradient
    goes to the prompt only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distprompt_jax.checkpoints import registry

    gguf = registry.fetch(MODEL)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    hf = hf.to(device).eval()
    for param in hf.parameters():
        param.requires_grad_(False)
    return hf


def torch_steps(hf, targets: np.ndarray, steps: int, embed_std: float):
    """Adam on inputs_embeds for a batch of targets (a batch of one: the per-target loop), on hf's device and in
    its dtype."""
    import torch

    p = torch.as_tensor(targets, device=hf.device)
    log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))

    def run():
        x = embed_std * torch.randn(len(targets), 10, hf.config.hidden_size, device=hf.device, dtype=hf.dtype)
        x.requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            log_q = torch.log_softmax(hf(inputs_embeds=x).logits[:, -1].float(), dim=-1)
            loss = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum()
            loss.backward()
            optimizer.step()
        if x.is_cuda:  # CUDA runs asynchronously: the timer must wait for the last step
            torch.cuda.synchronize()

    return run


def matmul_peak_flops(config, n_targets: int, repeats: int = 10, dtype=jnp.float32) -> float:
    """The machine's dense matmul peak in `dtype` (float32 by default): the fastest run of the fastest of a few
    shapes.

    Peak is a maximum, so the best run counts, not the median; and a single square size can miss the
    fastest path of the BLAS, which then reads as MFU above 100%. The shapes: squares, and the model's own
    projections at the benchmark's largest batch of prompt positions.
    """
    rows = n_targets * 10
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (rows, config.d_model, config.d_ff),
              (rows, config.d_ff, config.d_model), (rows, config.d_model, config.d_model)]
    dot = jax.jit(lambda a, b: a @ b)
    best = 0.0
    for m, k, n in shapes:
        a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
        jax.block_until_ready(dot(a, b))
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(dot(a, b))
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def peak_rss_gb(n: int) -> float:
    code = (
        "import resource, numpy as np, sys; sys.path.insert(0, 'bench');"
        "from bench_soft import random_targets; from distprompt_jax import load_model, soft_prompt, SoftPromptConfig;"
        f"lm = load_model({MODEL!r});"
        f"soft_prompt(lm, random_targets({n}, lm.vocab_size), SoftPromptConfig(max_steps=1));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def quality(lm, n: int, budget: int):
    from distprompt_jax import SoftPromptConfig, soft_prompt
    from distprompt_jax.targets import vanilla_targets

    entropies = np.linspace(0.0, np.log(lm.vocab_size), n)
    targets = vanilla_targets(lm.vocab_size, entropies, seed=0)
    ours = soft_prompt(lm, targets, SoftPromptConfig(max_steps=budget)).columns["kl"]
    peer = soft_prompt(
        lm, targets, SoftPromptConfig(prompt_len=5, init="normal", patience=20, max_steps=budget)
    ).columns["kl"]
    return ours, peer, entropies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,8,64,256", help="target counts; the first is the per-target loop")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", default="256,1024,4096", help="target counts for peak memory ('' to skip)")
    parser.add_argument("--quality", type=int, default=64, help="targets for the recipe comparison (0 to skip)")
    parser.add_argument("--budget", type=int, default=100, help="step budget of the recipe comparison")
    parser.add_argument("--fixed-prefix", type=int, default=0, help="run only section 5 with this many targets")
    args = parser.parse_args()
    if args.fixed_prefix < 0:
        parser.error(f"--fixed-prefix is a number of targets, got {args.fixed_prefix}")
    if args.fixed_prefix:
        from distprompt_jax import load_model

        print(f"# {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform}), "
              f"{time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}\n")
        rates, delta = fixed_prefix_rates(load_model(MODEL), args.fixed_prefix, args.steps, args.repeats)
        print(f"\n| targets | steps per run | fixed prefix cached, target·steps/s | recomputed per target | speed-up |"
              f" max |ΔKL| |\n|---:|---:|---:|---:|---:|---:|\n| {args.fixed_prefix} | {args.steps} | "
              f"{rates['cached']:.1f} | {rates['whole']:.1f} | {rates['cached'] / rates['whole']:.2f}× | {delta:.1e} |")
        return

    import torch

    from distprompt_jax import load_model

    torch.set_num_threads(os.cpu_count())
    print(f"# {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, load {os.getloadavg()[0]:.2f}\n")
    lm = load_model(MODEL)
    hf = frozen_hf_model()
    embed_std = float(jnp.std(lm.embedding_matrix(lm.params)))
    sizes = [int(s) for s in args.sizes.split(",")]
    peak = matmul_peak_flops(lm.config, max(sizes))

    # The per-target loop's rate does not depend on N: it is the batch-of-one rate (the first row).
    loop_rate = None
    print(f"dense float32 matmul peak: {peak / 1e9:.1f} GFLOP/s; one step is "
          f"{step_flops(lm.config, 10) / 1e9:.2f} GFLOP per target\n")
    print("| N | distprompt_jax target·steps/s | MFU | PyTorch batched | PyTorch per-target loop | vs batched "
          "| vs loop |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n in sizes:
        ours = median_seconds(jax_segment(lm, n, args.steps), args.repeats)
        ours_rate = n * args.steps / ours
        mfu = step_flops(lm.config, 10) * ours_rate / peak
        batched = median_seconds(torch_steps(hf, random_targets(n, lm.vocab_size), args.steps, embed_std), args.repeats)
        batched_rate = n * args.steps / batched
        loop_rate = loop_rate or batched_rate
        print(f"| {n} | {ours_rate:.1f} | {mfu:.0%} | {batched_rate:.1f} | {loop_rate:.1f} | "
              f"{ours_rate / batched_rate:.2f}× | {ours_rate / loop_rate:.2f}× |", flush=True)
        rows.append((n, ours_rate))
    # Measured again after the steps: contention or clock changes in between show as a different peak.
    peak_after = matmul_peak_flops(lm.config, max(sizes))
    print(f"\nmatmul peak after the runs: {peak_after / 1e9:.1f} GFLOP/s; MFU against the higher of the two: "
          + ", ".join(f"N={n} {step_flops(lm.config, 10) * r / max(peak, peak_after):.0%}" for n, r in rows))

    if args.memory:
        print("\n| targets | peak RSS (GB), soft_prompt, automatic chunks, 1 step |\n|---:|---:|")
        for n in [int(s) for s in args.memory.split(",")]:
            print(f"| {n} | {peak_rss_gb(n):.2f} |", flush=True)

    if args.quality:
        ours, peer, entropies = quality(lm, args.quality, args.budget)
        print(f"\nrecipes at {args.budget} steps on {args.quality} vanilla targets (h from 0 to ln|V|):")
        print(f"default wins {np.mean(ours < peer):.0%}, peer wins {np.mean(peer < ours):.0%}, "
              f"ties {np.mean(ours == peer):.0%}; mean KL default {ours.mean():.4f}, peer {peer.mean():.4f}")
        for lo, hi in [(0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0001)]:
            band = (entropies >= lo * entropies.max()) & (entropies < hi * entropies.max())
            print(f"  h in [{lo * entropies.max():.1f}, {min(hi, 1) * entropies.max():.1f}]: mean KL default "
                  f"{ours[band].mean():.4f}, peer {peer[band].mean():.4f}")


if __name__ == "__main__":
    main()
