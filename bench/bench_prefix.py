"""Prefix tuning against soft prompts on the same targets at an equal step budget.

    python bench/bench_prefix.py [--model smollm2-135m] [--n 64] [--max_steps 500] [--restarts 3] [--slots 64]
                                 [--reparam_hidden 512] [--out bench_prefix_out]
                                 [--methods soft,prefix,prefix_reparam,final_norm,bound_norm]
                                 [--variants '{"name": {PrefixPromptConfig overrides}}']

Targets: `--n` vanilla targets with entropies evenly over 0..ln|V| (seed 0). Their certified
`unembedding_bound` is computed once (cached in `--out`) and given to every method as each target's floor,
as experiments do. Methods, each with the same budget (at most `--max_steps` steps per attempt, at most
`--restarts` attempts, the rest of each config at its default):

    soft            SoftPromptConfig(prompt_len=10): 10 vectors, read after the last of them
    soft_bos        the same, read at a BOS token after them (the prefix's reading position)
    prefix          PrefixPromptConfig(prompt_len=10): keys and values of 10 positions, read at BOS
    prefix_reparam  the same through Li & Liang's MLP with `--reparam_hidden` units
    final_norm      the experiments' final-norm rung: one vector replacing the final norm's input after BOS
    bound_norm      the experiments' norm-constrained estimate (L-BFGS steps; its restarts are BoundConfig's)

`--variants` adds prefixes with other settings (e.g. '{"lr0.05": {"learning_rate": 0.05}}'), same budget.

Per method and entropy band ([0, 3), [3, 6), [6, 9), ≥ 9 nats, the report's): n, mean and median KL, median
gap to the bound; and per method the useful target·steps (steps of running targets, every attempt), the
wall time, target·steps/s over it and after the first segment (which is mostly compiling) — all methods in
one process, one after the other, so their speeds compare.
Everything goes to `--out`: `<method>.csv` per target, `<method>.json` its speed and what it was run with (model,
targets, config), and `summary.md`.
A method whose files are there for the same model, targets and config is read back, not run again: a long
benchmark survives being stopped, and may be spread over several sessions (its speeds then come from
different processes; `summary.md` gives each method's date).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

PROMPT_LEN = 10
BANDS = (0.0, 3.0, 6.0, 9.0, np.inf)
METHODS = ("soft", "soft_bos", "prefix", "prefix_reparam", "final_norm", "bound_norm")


def method_of(lm, name: str, budget: dict, reparam_hidden: int, variants: dict):
    from ml_collections import ConfigDict

    from distprompt_jax.bounds import NormMethod
    from distprompt_jax.experiment import final_norm_config, final_norm_defaults
    from distprompt_jax.prompting.prefix import PrefixMethod, PrefixPromptConfig
    from distprompt_jax.prompting.soft import SoftMethod, SoftPromptConfig

    if name == "soft":
        return SoftMethod(lm, SoftPromptConfig(prompt_len=PROMPT_LEN, **budget))
    if name == "soft_bos":
        return SoftMethod(lm, SoftPromptConfig(prompt_len=PROMPT_LEN, suffix=(lm.config.bos_token_id,), **budget))
    if name == "prefix":
        return PrefixMethod(lm, PrefixPromptConfig(prompt_len=PROMPT_LEN, **budget))
    if name in variants:
        return PrefixMethod(lm, PrefixPromptConfig(**{"prompt_len": PROMPT_LEN, **budget, **variants[name]}))
    if name == "prefix_reparam":
        return PrefixMethod(lm, PrefixPromptConfig(prompt_len=PROMPT_LEN, reparam_hidden=reparam_hidden, **budget))
    if name == "final_norm":
        section = final_norm_defaults()
        section.update(budget)
        return SoftMethod(lm, final_norm_config(ConfigDict(dict(final_norm=section)), lm.n_layers))
    if name == "bound_norm":
        return NormMethod(lm)
    raise ValueError(f"unknown method {name!r}; known: {METHODS}")


def certified_bounds(lm, probs: np.ndarray, cache: Path) -> np.ndarray:
    from distprompt_jax import unembedding_bound

    if cache.is_file():
        with np.load(cache) as saved:
            if saved["probs_sum"].shape == (len(probs),) and np.allclose(saved["probs_sum"], probs.sum(1)):
                return saved["kl_bound"]
    kl_bound = unembedding_bound(lm, probs).columns["kl"]
    np.savez(cache, kl_bound=kl_bound, probs_sum=probs.sum(1))
    return kl_bound


def run(method, lm, probs: np.ndarray, kl_bound: np.ndarray) -> tuple[pd.DataFrame, dict]:
    from distprompt_jax.prompting.engine import run_method

    segments = []
    start = time.perf_counter()
    result = run_method(method, lm, probs, floors=kl_bound, progress=False, on_segment=segments.append)
    seconds = time.perf_counter() - start
    table = pd.DataFrame({"kl": result.columns["kl"], "steps": result.columns["steps"], "kl_bound": kl_bound,
                          "gap_to_bound": result.columns["kl"] - kl_bound})
    first, last = segments[0], segments[-1]
    # Steady speed: after the first segment, whose time is mostly compiling.
    steady = (last.target_steps - first.target_steps) / max(last.seconds - first.seconds, 1e-9)
    speed = dict(seconds=seconds, target_steps=last.target_steps, slot_steps=last.slot_steps,
                 target_steps_per_s=last.target_steps / seconds, steady_target_steps_per_s=steady)
    return table, speed


def saved_run(out: Path, name: str, signature: dict) -> tuple[pd.DataFrame, dict] | None:
    """The table and speed of `name` saved in `out` by a run with this signature, else None."""
    table_file, meta_file = out / f"{name}.csv", out / f"{name}.json"
    if not (table_file.is_file() and meta_file.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("signature") != signature:
        return None
    return pd.read_csv(table_file, index_col="target_id"), meta["speed"]


def band_of(entropy: np.ndarray) -> np.ndarray:
    labels = [f"{lo:g}–{hi:g}" if np.isfinite(hi) else f"≥{lo:g}" for lo, hi in zip(BANDS[:-1], BANDS[1:])]
    return np.asarray(labels)[np.clip(np.searchsorted(BANDS, entropy, side="right") - 1, 0, len(labels) - 1)]


def band_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for name, table in tables.items():
        for band, group in list(table.groupby("band", sort=False)) + [("all", table)]:
            rows.append(dict(method=name, band=band, n=len(group), mean_kl=group.kl.mean(),
                             median_kl=group.kl.median(), median_gap=group.gap_to_bound.median(),
                             mean_bound=group.kl_bound.mean()))
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    def cells(row):
        return " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row)

    return header + "\n".join(f"| {cells(row)} |" for row in frame.itertuples(index=False))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--slots", type=int, default=None)
    parser.add_argument("--reparam_hidden", type=int, default=512)
    parser.add_argument("--methods", default="soft,prefix,prefix_reparam")
    parser.add_argument("--out", default="bench_prefix_out")
    parser.add_argument("--variants", default="{}", help="JSON: name -> PrefixPromptConfig overrides")
    args = parser.parse_args()

    import jax

    from distprompt_jax import load_model
    from distprompt_jax.targets import vanilla_targets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    probs = vanilla_targets(lm.vocab_size, np.linspace(0, np.log(lm.vocab_size), args.n), seed=0,
                            progress=False).probs
    entropy = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), axis=1)
    kl_bound = certified_bounds(lm, probs, out / f"bound_n{args.n}.npz")
    budget = dict(max_steps=args.max_steps, restarts=args.restarts, slots=args.slots)
    variants = json.loads(args.variants)
    tables, speeds = {}, {}
    for name in [m for m in args.methods.split(",") if m] + list(variants):
        method = method_of(lm, name, budget, args.reparam_hidden, variants)
        # What the method's numbers depend on: a saved run with the same is read back instead of run again.
        signature = dict(model=lm.name, n=args.n, probs_sum=float(probs.sum()), config=repr(method.config))
        saved = saved_run(out, name, signature)
        if saved is None:
            table, speed = run(method, lm, probs, kl_bound)
            table.insert(0, "entropy", entropy)
            table["band"] = band_of(entropy)
            speed["date"] = time.strftime("%Y-%m-%d %H:%M")
            table.to_csv(out / f"{name}.csv", index_label="target_id")
            # The json last and whole (written aside, then renamed): a run stopped at any point leaves either
            # no json, and the method runs again, or a complete one beside a complete table.
            partial = out / f"{name}.json.partial"
            partial.write_text(json.dumps(dict(signature=signature, speed=speed), indent=1))
            partial.replace(out / f"{name}.json")
        else:
            table, speed = saved
            print(f"{name}: read back from {out} (run {speed['date']})", flush=True)
        tables[name], speeds[name] = table, speed
        print(f"{name}: mean KL {table.kl.mean():.4f}, median {table.kl.median():.4f}, "
              f"{speed['steady_target_steps_per_s']:.1f} target·steps/s", flush=True)
    speed_table = pd.DataFrame([dict(method=name, **speed) for name, speed in speeds.items()])
    lines = [
        f"# Prefix vs soft: {lm.name}, {args.n} vanilla targets, ≤ {args.max_steps} steps × ≤ {args.restarts} attempts",
        "", f"{platform.node()}, {jax.devices()[0].platform} × {len(jax.devices())}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; slots {args.slots or 'default'}; prefix_reparam hidden "
        f"{args.reparam_hidden}", "",
        "## KL per entropy band", "", markdown(band_summary(tables)), "",
        "## Speed (in turn, in one process where the dates are of one run)", "",
        markdown(speed_table),
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
