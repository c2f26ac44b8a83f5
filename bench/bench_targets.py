"""Targets benchmark: N vanilla targets over |V| tokens with entropies spread evenly over [0, ln|V|].

    python bench/bench_targets.py [--n 1024] [--vocab 49152] [--repeats 3] [--slots N]

One warm-up call on a few targets compiles the solver's programs first (its time is printed apart). Then the full
request is timed `--repeats` times (once if a run takes over 60 s) and the median reported, with
targets/s, the optimizer steps per target, how many targets Adam brought within tolerance on its own,
the worst |H − h| of the returned float32 rows, and the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

from distprompt_jax.targets import vanilla_targets
from distprompt_jax.targets.batching import default_slots

SLOW_RUN_S = 60.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slots", type=int, default=None, help="rows optimized at once (default: the platform's)")
    args = parser.parse_args()

    entropies = np.linspace(0.0, np.log(args.vocab), args.n)
    slots = args.slots or default_slots(args.vocab)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()}; "
          f"|V| = {args.vocab}, N = {args.n}, slots {slots}")

    # Twice the pool size, so that refilling the pool is compiled too.
    warm = entropies[np.linspace(0, args.n - 1, 2 * slots).astype(int)]
    start = time.perf_counter()
    vanilla_targets(args.vocab, warm, slots=args.slots, progress=False)
    print(f"warm-up (compile + {len(warm)} targets): {time.perf_counter() - start:.1f} s")

    times, loads = [], [os.getloadavg()[0]]
    for _ in range(args.repeats):
        start = time.perf_counter()
        targets = vanilla_targets(args.vocab, entropies, slots=args.slots, progress=False)
        times.append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
        if times[-1] > SLOW_RUN_S:
            break

    meta = targets.metadata
    steps = meta.steps.to_numpy()
    error = np.abs(meta.entropy.to_numpy() - entropies).max()
    wall = statistics.median(times)
    print(f"runs: {', '.join(f'{t:.1f}' for t in times)} s; 1-min load average {min(loads):.1f}..{max(loads):.1f}")
    print("| |V| | N | slots | wall (s) | targets/s | steps median | steps max | steps total "
          "| Adam within 1e-4 | max abs(H − h) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.vocab} | {args.n} | {slots} | {wall:.1f} | {args.n / wall:.1f} | {np.median(steps):.0f} "
          f"| {steps.max()} | {steps.sum()} | {meta.optimizer_matched.mean():.1%} | {error:.1e} |")


if __name__ == "__main__":
    main()
