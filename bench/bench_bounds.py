"""Benchmark of the expressivity certificate (`distprompt_jax.bounds.unembedding_bound`).

    python bench/bench_bounds.py [--model smollm2-135m] [--n 64] [--sigmas 1,2,4,6] [--scipy 4] [--norm 16]
                                 [--slots 16] [--max_steps 500]

Targets are vanilla-like: p = softmax(z), z ~ N(0, σ²) over the full vocabulary, σ cycling over `--sigmas`
(σ = 1 is near-uniform, σ = 6 puts most mass on a few tokens). Reports, for one call on all targets: wall
time and targets/s of a first (compilation included) and a second call, the host's share of the time
(float64 certificate and Newton refinement), the float32 L-BFGS steps, the float64 Newton steps, the
certified gap primal − bound (median / max), and how many rows were certified. With `--norm K`, the
norm-constrained estimate on the first K targets (its time, gap and how far above the bound it lies).
Then, in the same run, a float64 scipy solve (Newton-CG with exact Hessian-vector products) of the same
problem for `--scipy` targets: time per target and the ratio to ours, and the agreement of the values
(ours must satisfy bound ≤ scipy optimum ≤ primal up to scipy's own accuracy).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def make_targets(vocab: int, n: int, sigmas: list[float], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigma = np.asarray(sigmas, np.float64)[np.arange(n) % len(sigmas)]
    z = rng.standard_normal((n, vocab)) * sigma[:, None]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32), sigma


def scipy_bound(w: np.ndarray, b: np.ndarray, p: np.ndarray, h0: np.ndarray) -> tuple[float, float, int]:
    """inf_h Σ p log(p / softmax(W h + b)) by scipy Newton-CG in float64 (value, seconds, iterations)."""
    from scipy.optimize import minimize

    p = p.astype(np.float64)
    mass = p.sum()
    p_bar = p / mass
    positive = p_bar > 0
    neg_entropy = float(np.sum(p_bar[positive] * np.log(p_bar[positive])))

    def softmax(h):
        z = w @ h + b
        top = z.max()
        e = np.exp(z - top)
        return z, top + np.log(e.sum()), e / e.sum()

    def fun(h):
        z, lse, q = softmax(h)
        return lse - p_bar @ z, w.T @ (q - p_bar)

    def hessp(h, v):
        _, _, q = softmax(h)
        wv = w @ v
        return w.T @ (q * (wv - q @ wv))

    start = time.perf_counter()
    result = minimize(fun, h0, jac=True, hessp=hessp, method="Newton-CG", options={"xtol": 1e-12, "maxiter": 200})
    seconds = time.perf_counter() - start
    kl = mass * (neg_entropy + result.fun) + mass * np.log(mass)
    return float(kl), seconds, int(result.nit)


def bound_run(lm, probs: np.ndarray, config, on_slots=None):
    """(the results, the host's certificate seconds summed over its threads): what `unembedding_bound` does,
    keeping the method to read its host time; `on_slots` is told the pool's size."""
    from distprompt_jax.bounds import BoundMethod
    from distprompt_jax.prompting.engine import run_method

    method = BoundMethod(lm, config)
    return run_method(method, lm, probs, on_finished=method.finished, on_slots=on_slots), method.host_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--sigmas", default="1,2,4,6")
    parser.add_argument("--scipy", type=int, default=4, help="targets also solved by scipy in float64")
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--slots", type=int, default=None, help="solver slots (BoundConfig.slots)")
    parser.add_argument("--norm", type=int, default=0, help="targets for the norm-constrained estimate")
    args = parser.parse_args()

    import jax

    from distprompt_jax import load_model
    from distprompt_jax.bounds import BoundConfig, norm_bound_estimate
    from distprompt_jax.results import PromptResults

    lm = load_model(args.model)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    probs, sigma = make_targets(lm.vocab_size, args.n, sigmas)
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("slots", args.slots)) if v is not None}
    config = BoundConfig(**overrides)
    load = os.getloadavg()
    start, cpu = time.perf_counter(), time.process_time()
    result, first_host = bound_run(lm, probs, config)
    seconds, first_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    _, warm_host = bound_run(lm, probs, config)
    warm, warm_cpu = time.perf_counter() - start, time.process_time() - cpu
    table = result.to_pandas()
    table["sigma"] = sigma
    print(f"model {lm.name}: V={lm.vocab_size}, d={lm.d_model}; {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"config: {config}")
    print(f"\n{args.n} targets: first call {seconds:.1f} s wall, {first_cpu:.1f} CPU-s ({args.n / seconds:.2f} "
          f"targets/s, compilation included; host certificate {first_host:.1f} s summed over threads); second "
          f"call {warm:.1f} s wall, {warm_cpu:.1f} CPU-s ({args.n / warm:.2f} targets/s; host certificate "
          f"{warm_host:.1f} s summed over threads, overlapping the solver's next segment)\n")
    print("| σ | entropy (nats) | L-BFGS steps (median / max) | Newton steps (median / max) | certified | "
          "bound (median) | gap median | gap max |")
    print("|---|---|---|---|---|---|---|---|")
    for s, rows in table.groupby("sigma"):
        print(f"| {s:g} | {rows.target_entropy.median():.2f} | {rows.steps.median():.0f} / {rows.steps.max()} | "
              f"{rows.refine_steps.median():.0f} / {rows.refine_steps.max()} | {rows.certified.sum()}/{len(rows)} | "
              f"{rows.kl.median():.4f} | {rows.gap.median():.1e} | {rows.gap.max():.1e} |")
    print(f"| all | | {table.steps.median():.0f} / {table.steps.max()} | {table.refine_steps.median():.0f} / "
          f"{table.refine_steps.max()} | {table.certified.sum()}/{len(table)} | {table.kl.median():.4f} | "
          f"{table.gap.median():.1e} | {table.gap.max():.1e} |")

    if args.scipy:
        w32, b32 = lm.unembedding(lm.params)
        w = np.asarray(w32, np.float64)
        b = np.asarray(b32, np.float64)
        picks = [int(np.flatnonzero(sigma == s)[0]) for s in sigmas][: args.scipy]
        picks += [i for i in range(args.n) if i not in picks][: args.scipy - len(picks)]
        print("\nfloat64 scipy reference (Newton-CG, exact Hessian-vector products, from h = 0):\n")
        print("| target | σ | scipy KL | ours: bound | ours: primal | bound ≤ scipy | scipy − bound | "
              "scipy s | scipy iters |")
        print("|---|---|---|---|---|---|---|---|---|")
        scipy_seconds = []
        for i in picks:
            value, secs, iters = scipy_bound(w, b, probs[i], np.zeros(lm.d_model))
            scipy_seconds.append(secs)
            row = table.iloc[i]
            print(f"| {i} | {sigma[i]:g} | {value:.9f} | {row.kl:.9f} | {row.primal:.9f} | "
                  f"{bool(row.kl <= value + 1e-9)} | {value - row.kl:.1e} | {secs:.1f} | {iters} |")
        per_target = warm / args.n
        print(f"\nscipy: {np.mean(scipy_seconds):.1f} s/target vs ours {per_target:.2f} s/target "
              f"(ratio {np.mean(scipy_seconds) / per_target:.1f}x; ours batched, with the certificate)")

    if args.norm:
        k = min(args.norm, args.n)
        start = time.perf_counter()
        subset = PromptResults(
            method="bound", columns={c: v[:k] for c, v in result.columns.items()},
            arrays={a: v[:k] for a, v in result.arrays.items()}, metadata=result.metadata.iloc[:k],
        )
        norm = norm_bound_estimate(lm, probs[:k], config, unconstrained=subset).to_pandas()
        norm_seconds = time.perf_counter() - start
        norm["sigma"] = sigma[:k]
        norm["above_bound"] = norm.lower.to_numpy() - table.kl.to_numpy()[:k]
        print(f"\nnorm-constrained estimate, {k} targets, {config.restarts} restarts: {norm_seconds:.1f} s\n")
        print("| σ | bound | norm: lower (median) | norm: estimate (median) | gap max | certified | on boundary |")
        print("|---|---|---|---|---|---|---|")
        for s, rows in norm.groupby("sigma"):
            bound_kl = table.kl.to_numpy()[:k][sigma[:k] == s]
            print(f"| {s:g} | {np.median(bound_kl):.4f} | {rows.lower.median():.4f} | {rows.kl.median():.4f} | "
                  f"{rows.gap.max():.1e} | {rows.certified.sum()}/{len(rows)} | {rows.on_boundary.sum()}/{len(rows)} |")


if __name__ == "__main__":
    main()
