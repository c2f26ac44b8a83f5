"""Useful throughput of the solver driver's refilling pool, against the chunked engine it replaced, and the
time to a rerun's first step with and without the persistent compilation cache.

    python bench/bench_solve.py [--model smollm2-135m] [--n 64] [--slots 32] [--patience 5 --min_delta 0.05]
                                [--before 3cb019e] [--cache]

Throughput: soft prompts for `n` vanilla targets over entropy 0..ln|V| with the given early stopping, so
targets stop at different steps. "Useful" target·steps are steps of targets still running; "computed" are
slots × steps of the compiled segments. The whole-run useful rate is useful target·steps per second over
the run; the all-active rate is measured on a pool of `slots` targets that all run 40 steps, before and after
the run (their mean is the reference). The run splits into the fill (segments while targets wait for a slot) and
the drain (once none waits, slots empty and the tail is compacted into smaller pools). Each measured run
follows a warm-up run of the same problem in the same process (nothing compiles while it is timed).
`--before REV` runs the chunked engine of that git revision on the same targets (chunk size = slots, its
default segment of 25 steps) in a subprocess, timed the same way.

Cache: a fresh process compiles and runs one segment of the same problem; timed without the persistent
cache, then with an empty cache (it writes), then again (it reads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The driver's runs use the chunked engine's recipe by default ("before": Adam 0.1 constant, one attempt), so that
# only the driver differs between the two; "default" measures today's recipe (warmup, cosine, bound-driven
# restarts, which lengthen the tail).
RECIPES = {"before": dict(learning_rate=0.1, schedule="constant", warmup=0.0, restarts=1, restart_above=None),
           "default": {}}

BEFORE = """
import json, sys, time
import numpy as np
from distprompt_jax import load_model, soft_prompt, SoftPromptConfig
args = json.loads(sys.argv[1])
lm = load_model(args["model"])
probs = np.load(args["targets"])
config = SoftPromptConfig(max_steps=args["max_steps"], patience=args["patience"], min_delta=args["min_delta"],
                          chunk_size=args["slots"])
soft_prompt(lm, probs[: args["slots"] + 1], config)  # warm-up: compiles
start = time.perf_counter()
result = soft_prompt(lm, probs, config)
seconds = time.perf_counter() - start
steps = result.columns["steps"]
# A chunk computes every one of its slots until its slowest target stops (its while_loop then exits).
computed = sum(args["slots"] * int(steps[i : i + args["slots"]].max()) for i in range(0, len(steps), args["slots"]))
print(json.dumps({"seconds": seconds, "target_steps": int(steps.sum()), "slot_steps": computed,
                  "mean_kl": float(result.columns["kl"].mean())}))
"""

FIRST_STEP = """
import json, sys, time
start = time.perf_counter()
import numpy as np
from distprompt_jax import compilation_cache, load_model
from distprompt_jax.prompting.engine import run_method
from distprompt_jax.prompting.soft import SoftMethod, SoftPromptConfig
args = json.loads(sys.argv[1])
if args["cache"]:
    compilation_cache.enable(args["cache"])
lm = load_model(args["model"])
loaded = time.perf_counter()
probs = np.load(args["targets"])[: args["slots"]]
config = SoftPromptConfig(max_steps=args["segment_steps"], slots=args["slots"], segment_steps=args["segment_steps"])
run_method(SoftMethod(lm, config), lm, probs, progress=False)
print(json.dumps({"first_segment_seconds": time.perf_counter() - loaded, "total_seconds": time.perf_counter() - start}))
"""


def make_targets(vocab_size: int, n: int, path: Path) -> np.ndarray:
    from distprompt_jax.targets import vanilla_targets

    probs = vanilla_targets(vocab_size, np.linspace(0, np.log(vocab_size), n), seed=0, progress=False).probs
    np.save(path, probs)
    return probs


def measure_after(lm, probs: np.ndarray, args) -> dict:
    from distprompt_jax.prompting.engine import run_method
    from distprompt_jax.prompting.soft import SoftMethod, SoftPromptConfig

    config = SoftPromptConfig(**RECIPES[args.recipe], max_steps=args.max_steps, patience=args.patience,
                              min_delta=args.min_delta, slots=args.slots, segment_steps=args.segment_steps,
                              refill_at=args.refill_at)
    run_method(SoftMethod(lm, config), lm, probs[: args.slots + 1], progress=False)  # warm-up: compiles
    infos = []
    start = time.perf_counter()
    result = run_method(SoftMethod(lm, config), lm, probs, on_segment=infos.append, progress=False)
    seconds = time.perf_counter() - start
    last = infos[-1]
    # The drain: segments that start with no target waiting, where refilling has nothing left to give the
    # freed slots; the running targets' remaining steps are sequential, whatever the driver does.
    waiting = [info.n_targets - info.finished - info.active for info in infos]
    fill_end = next((i for i, count in enumerate(waiting) if count == 0), len(infos) - 1)
    fill = infos[fill_end]
    return {
        "seconds": seconds, "target_steps": last.target_steps, "slot_steps": last.slot_steps,
        "useful_rate": last.target_steps / seconds, "segments": len(infos),
        "mean_kl": float(result.columns["kl"].mean()),
        "fill": {"seconds": fill.seconds, "target_steps": fill.target_steps, "slot_steps": fill.slot_steps,
                 "useful_rate": fill.target_steps / fill.seconds},
        "drain": {"seconds": last.seconds - fill.seconds, "target_steps": last.target_steps - fill.target_steps,
                  "slot_steps": last.slot_steps - fill.slot_steps},
    }


def measure_all_active(lm, probs: np.ndarray, args, steps: int = 40) -> float:
    """target·steps/s of a pool whose every slot runs the whole time: `slots` targets, no early stopping,
    all stopping together after `steps` (compiled beforehand)."""
    from distprompt_jax.prompting.engine import run_method
    from distprompt_jax.prompting.soft import SoftMethod, SoftPromptConfig

    config = SoftPromptConfig(**RECIPES[args.recipe], max_steps=steps, patience=10**6, slots=args.slots,
                              segment_steps=args.segment_steps)
    run_method(SoftMethod(lm, config), lm, probs[: args.slots], progress=False)
    start = time.perf_counter()
    run_method(SoftMethod(lm, config), lm, probs[: args.slots], progress=False)
    return args.slots * steps / (time.perf_counter() - start)


def measure_spread(lm, probs: np.ndarray, args) -> dict:
    """|KL(slots) − KL(slots/2)| per target: what another batch shape does to float32 trajectories."""
    from distprompt_jax.prompting.engine import run_method
    from distprompt_jax.prompting.soft import SoftMethod, SoftPromptConfig

    kls = []
    for slots in (args.slots, args.slots // 2):
        config = SoftPromptConfig(**RECIPES[args.recipe], max_steps=args.max_steps, patience=args.patience,
                                  min_delta=args.min_delta, slots=slots, segment_steps=args.segment_steps)
        kls.append(run_method(SoftMethod(lm, config), lm, probs, progress=False).columns["kl"])
    moved = np.abs(kls[0] - kls[1])
    return {"median": float(np.median(moved)), "p90": float(np.quantile(moved, 0.9)), "max": float(moved.max()),
            "bitwise_equal": int(np.sum(moved == 0))}


def measure_before(targets_path: Path, args) -> dict:
    checkout = Path(args.before).is_dir()  # an exported tree of that revision (where there is no git history)
    worktree = Path(args.before).resolve() if checkout else Path(tempfile.mkdtemp()) / "before"
    if not checkout:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before],
                       check=True, capture_output=True)
    try:
        payload = json.dumps({"model": args.model, "targets": str(targets_path), "max_steps": args.max_steps,
                              "patience": args.patience, "min_delta": args.min_delta, "slots": args.slots})
        env = dict(os.environ, PYTHONPATH=str(worktree), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        out = subprocess.run([sys.executable, "-c", BEFORE, payload], capture_output=True, text=True, env=env,
                             cwd=worktree)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        measured = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not checkout:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
    measured["useful_rate"] = measured["target_steps"] / measured["seconds"]
    measured["useful_share_of_computed"] = measured["target_steps"] / measured["slot_steps"]
    return measured


def measure_first_step(targets_path: Path, args) -> dict:
    cache = Path(tempfile.mkdtemp()) / "jax_cache"
    times = {}
    runs = (("no cache", ""), ("empty cache (writes)", str(cache)), ("warm cache (reads)", str(cache)))
    for label, directory in runs:
        payload = json.dumps({"model": args.model, "targets": str(targets_path), "slots": args.slots,
                              "segment_steps": args.segment_steps, "cache": directory})
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        out = subprocess.run([sys.executable, "-c", FIRST_STEP, payload], capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        times[label] = json.loads(out.stdout.strip().splitlines()[-1])
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--patience", type=int, default=50)
    parser.add_argument("--min_delta", type=float, default=0.0)
    parser.add_argument("--segment_steps", type=int, default=10)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="before",
                        help="the driver's soft recipe (before: the chunked engine's, so only the driver differs)")
    parser.add_argument("--refill_at", type=int, default=None, help="slots freed that end a segment early")
    parser.add_argument("--before", default=None,
                        help="git revision (or a folder holding that revision's tree) of the chunked engine")
    parser.add_argument("--cache", action="store_true", help="also time a rerun's first segment with/without cache")
    parser.add_argument("--spread", action="store_true",
                        help="also run with half the slots and report how far each target's KL moves")
    args = parser.parse_args()

    from distprompt_jax import load_model

    lm = load_model(args.model)
    targets_path = Path(tempfile.mkdtemp()) / "targets.npy"
    probs = make_targets(lm.vocab_size, args.n, targets_path)
    # Measured before and after the run (shared machines drift over an hour): their mean is the reference.
    all_active_before = measure_all_active(lm, probs, args)
    after = measure_after(lm, probs, args)
    all_active_after = measure_all_active(lm, probs, args)
    all_active = (all_active_before + all_active_after) / 2
    report = {"args": vars(args), "all_active_rate": all_active,
              "all_active_rates": [all_active_before, all_active_after], "after": after}
    after["useful_share_of_all_active"] = after["useful_rate"] / all_active
    after["fill"]["useful_share_of_all_active"] = after["fill"]["useful_rate"] / all_active
    after["useful_share_of_computed"] = after["target_steps"] / after["slot_steps"]
    print(json.dumps(report), flush=True)  # what is measured so far, should a later part fail
    if args.before:
        report["before"] = measure_before(targets_path, args)
        report["before"]["useful_share_of_all_active"] = report["before"]["useful_rate"] / all_active
        report["speedup_wall"] = report["before"]["seconds"] / after["seconds"]
    if args.cache:
        report["first_segment"] = measure_first_step(targets_path, args)
    if args.spread:
        report["spread"] = measure_spread(lm, probs, args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
