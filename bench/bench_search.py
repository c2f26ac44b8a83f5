"""How close the soft-prompt search gets to what the certificate proves possible: the gap to the bound.

    python bench/bench_search.py [--model smollm2-135m] [--vanilla 96] [--outlier 32] [--model_targets 32]
                                 [--recipes old,peer,default] [--spread] [--out bench_search_out]

The suite: `--vanilla` vanilla targets with entropies evenly over 0..ln|V|, `--outlier` outlier targets
(k = 10) over the same range, `--model_targets` of the model's own next-token distributions after sampled
contexts (seed 0 throughout). The certified `unembedding_bound` of every target is computed once (cached in
the output folder). Each recipe then runs soft prompts on the whole suite; per target its
`gap_to_bound` = KL − bound. Recipes:

    old      the default before the search-quality work: Adam 0.1 constant, σ-scaled init, patience 50
    peer     the public reproduction's recipe: L = 5, N(0, 1) init, Adam 0.1, patience 20
    default  SoftPromptConfig() as it is now, given the bound as each target's floor (as experiments do)

`--variants '{"name": {overrides}}'` adds recipes: variants of the default (given the floors too).

Each recipe has the same budget of at most 500 steps per attempt; the target·steps every attempt used, and
the slot·steps the pool computed, are reported. Per
recipe, kind and entropy band: the median, 90th and 95th percentile and max gap, targets with a gap > 1 nat,
mean KL; and wall time. `--spread` reruns the default (or `--spread_recipe`) with 3 seeds × 2 slot counts and
reports, per band, the largest spread (max − min) of a target's KL across those runs, and the part due to the
slot count alone; each of its runs is saved (`spread_<recipe>_seed<s>_slots<n>.csv`) and read back by a rerun.
Everything goes to `--out`: per-target tables (`<recipe>.csv`, open in pandas) and `summary.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

RECIPES = {
    "old": dict(learning_rate=0.1, schedule="constant", warmup=0.0, restarts=1, restart_above=None),
    "peer": dict(prompt_len=5, init="normal", learning_rate=0.1, schedule="constant", warmup=0.0, patience=20,
                 restarts=1, restart_above=None),
    "default": dict(),
}
BANDS = (0.0, 3.0, 6.0, 9.0, np.inf)  # entropy bands, nats (the report's)
SPREAD_SLOTS = (16, 64)  # the two pool sizes --spread compares (64: the CPU default)


def build_suite(lm, n_vanilla: int, n_outlier: int, n_model: int) -> tuple[np.ndarray, pd.DataFrame]:
    from distprompt_jax.targets import model_targets, outlier_targets, vanilla_targets

    vocab = lm.vocab_size
    parts = []
    if n_vanilla:
        parts.append(vanilla_targets(vocab, np.linspace(0, np.log(vocab), n_vanilla), seed=0, progress=False))
    if n_outlier:
        parts.append(outlier_targets(vocab, np.linspace(0, np.log(vocab), n_outlier), k=10, seed=0, progress=False))
    if n_model:
        parts.append(model_targets(lm, n_model, seed=0, progress=False))
    probs = np.concatenate([part.probs for part in parts])
    kinds = np.concatenate([np.full(len(part), part.metadata["kind"].iloc[0]) for part in parts])
    entropy = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), axis=1)
    return probs, pd.DataFrame({"target_id": np.arange(len(probs)), "kind": kinds, "entropy": entropy})


def certified_bounds(lm, probs: np.ndarray, cache: Path) -> np.ndarray:
    from distprompt_jax import unembedding_bound

    if cache.is_file():
        with np.load(cache) as saved:
            if saved["probs_sum"].shape == (len(probs),) and np.allclose(saved["probs_sum"], probs.sum(1)):
                return saved["kl_bound"]
    kl_bound = unembedding_bound(lm, probs).columns["kl"]
    np.savez(cache, kl_bound=kl_bound, probs_sum=probs.sum(1))
    return kl_bound


def run_recipe(lm, probs: np.ndarray, kl_bound: np.ndarray, overrides: dict, *, use_floor: bool, seed: int = 0,
               slots: int | None = None) -> tuple[pd.DataFrame, float]:
    from distprompt_jax import SoftPromptConfig
    from distprompt_jax.prompting.engine import run_method
    from distprompt_jax.prompting.soft import SoftMethod

    config = dataclasses.replace(SoftPromptConfig(**overrides), seed=seed, slots=slots)
    segments = []
    start = time.perf_counter()
    result = run_method(SoftMethod(lm, config), lm, probs, floors=kl_bound if use_floor else None, progress=False,
                        on_segment=segments.append)
    seconds = time.perf_counter() - start
    table = pd.DataFrame({"kl": result.columns["kl"], "steps": result.columns["steps"],
                          "kl_bound": kl_bound, "gap_to_bound": result.columns["kl"] - kl_bound})
    # Every attempt's steps (the `steps` column holds the best attempt's), and what the pool computed.
    return table, seconds, segments[-1].target_steps, segments[-1].slot_steps


def band_of(entropy: np.ndarray) -> np.ndarray:
    edges = BANDS
    labels = [f"{lo:g}–{hi:g}" if np.isfinite(hi) else f"≥{lo:g}" for lo, hi in zip(edges[:-1], edges[1:])]
    return np.asarray(labels)[np.clip(np.searchsorted(edges, entropy, side="right") - 1, 0, len(labels) - 1)]


def gap_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, band) and overall: n, median / p90 / p95 / max gap, count > 1 nat, mean KL."""
    def stats(rows: pd.DataFrame) -> dict:
        gap = rows.gap_to_bound.to_numpy(np.float64)
        gap = gap[np.isfinite(gap)]
        return dict(n=len(rows), median=np.median(gap), p90=np.percentile(gap, 90), p95=np.percentile(gap, 95),
                    max=gap.max(), over_1=int((gap > 1).sum()), mean_kl=rows.kl.mean())

    rows = [dict(kind=kind, band=band, **stats(group)) for (kind, band), group in table.groupby(["kind", "band"])]
    rows += [dict(kind="all", band=band, **stats(group)) for band, group in table.groupby("band")]
    rows.append(dict(kind="all", band="all", **stats(table)))
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    def cells(row):
        return " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row)

    return header + "\n".join(f"| {cells(row)} |" for row in frame.itertuples(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--vanilla", type=int, default=96)
    parser.add_argument("--outlier", type=int, default=32)
    parser.add_argument("--model_targets", type=int, default=32)
    parser.add_argument("--recipes", default="old,peer,default")
    parser.add_argument("--max_steps", type=int, default=500, help="the step budget per target (the default's)")
    parser.add_argument("--variants", default="{}",
                        help='JSON {name: overrides} of further recipes to measure beside --recipes, each a variant '
                             'of the default given the floors, e.g. \'{"L20": {"prompt_len": 20}}\'')
    parser.add_argument("--spread", action="store_true", help="a recipe over 3 seeds × 2 slot counts")
    parser.add_argument("--spread_recipe", default="default",
                        help="the recipe --spread reruns; 'best': the measured one with the lowest median gap")
    parser.add_argument("--out", default="bench_search_out")
    args = parser.parse_args()

    from distprompt_jax import load_model

    # Names are checked before the model loads and any recipe runs (they may take hours).
    unknown = sorted(set(filter(None, args.recipes.split(","))) - set(RECIPES))
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; known: {sorted(RECIPES)} (variants go in --variants)")
    recipes = {name: RECIPES[name] for name in filter(None, args.recipes.split(","))} | json.loads(args.variants)
    if args.spread and args.spread_recipe == "best" and not recipes:
        raise SystemExit("--spread_recipe best picks among the recipes this run measures, and it measures none")
    if args.spread and args.spread_recipe != "best" and args.spread_recipe not in recipes | RECIPES:
        raise SystemExit(f"--spread_recipe {args.spread_recipe!r} is neither a recipe {sorted(RECIPES)} nor among "
                         "--variants")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    probs, suite = build_suite(lm, args.vanilla, args.outlier, args.model_targets)
    suite["band"] = band_of(suite.entropy.to_numpy())
    start = time.perf_counter()
    kl_bound = certified_bounds(lm, probs, out / f"bounds_{lm.name}.npz")
    bound_seconds = time.perf_counter() - start
    lines = [f"# bench_search: {lm.name}, {len(probs)} targets ({args.vanilla} vanilla, {args.outlier} outlier, "
             f"{args.model_targets} model), {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs", "",
             f"Certified bound: {bound_seconds:.0f} s (0 when cached); certified {np.isfinite(kl_bound).sum()}.", ""]
    overall = []
    for name, overrides in recipes.items():
        table, seconds, target_steps, slot_steps = run_recipe(
            lm, probs, kl_bound, {"max_steps": args.max_steps} | overrides, use_floor=name not in ("old", "peer"))
        table = pd.concat([suite, table], axis=1)
        table.to_csv(out / f"{name}.csv", index=False)
        summary = gap_summary(table)
        total = summary[(summary.kind == "all") & (summary.band == "all")].iloc[0]
        overall.append(dict(recipe=name, seconds=seconds, target_steps=target_steps, slot_steps=slot_steps,
                            median_gap=total["median"], p95_gap=total.p95, max_gap=total["max"],
                            over_1=int(total.over_1), share_within_1=float((table.gap_to_bound <= 1).mean()),
                            mean_kl=total.mean_kl))
        lines += [f"## {name}: {seconds:.0f} s, {target_steps} target·steps ({slot_steps} computed by the pool)",
                  "", markdown(summary), ""]
        print(f"{name}: {seconds:.0f} s, median gap {total['median']:.3f}, max {total['max']:.2f}", flush=True)
        write_summary(out, lines, overall)  # after every recipe: a run stopped early keeps what it measured
    if args.spread:
        name = args.spread_recipe
        if name == "best":
            name = min(overall, key=lambda row: row["median_gap"])["recipe"]
        overrides = {"max_steps": args.max_steps} | (recipes | RECIPES)[name]
        kl = {}  # (seed, slots) -> per-target KL; each run is saved, so a stopped --spread resumes
        signature = json.dumps(overrides, sort_keys=True)
        # the seeds at the default pool first: the seed moves KLs most, so a run stopped early has that part
        for slots in SPREAD_SLOTS[::-1]:
            for seed in (0, 1, 2):
                path = out / f"spread_{name}_seed{seed}_slots{slots}.csv"
                saved = saved_run(path, signature, kl_bound)
                if saved is None:
                    saved = run_recipe(lm, probs, kl_bound, overrides, use_floor=name not in ("old", "peer"),
                                       seed=seed, slots=slots)[0].assign(overrides=signature)
                    saved.to_csv(path.with_suffix(".tmp"), index=False)
                    path.with_suffix(".tmp").rename(path)
                kl[seed, slots] = saved.kl.to_numpy()
        spread = pd.DataFrame({
            "band": suite.band,
            "spread": np.ptp(np.stack(list(kl.values())), axis=0),
            # the part due to the batch shape alone: same seed, the two slot counts
            "slot_count_spread": np.max([np.abs(kl[seed, SPREAD_SLOTS[0]] - kl[seed, SPREAD_SLOTS[1]])
                                         for seed in (0, 1, 2)], axis=0)})
        per_band = spread.groupby("band").agg(n=("spread", "size"), median=("spread", "median"),
                                              max=("spread", "max"), slot_count_max=("slot_count_spread", "max"))
        lines += [f"## Spread of {name} over 3 seeds × 2 slot counts {SPREAD_SLOTS}", "",
                  "max − min of a target's KL over the 6 runs; slot_count_max: the largest change between the two "
                  "slot counts at the same seed.", "",
                  markdown(per_band.reset_index()), "", f"Max over the suite: {spread.spread.max():.3f} nats.", ""]
    print(write_summary(out, lines, overall))


def saved_run(path: Path, signature: str, kl_bound: np.ndarray) -> pd.DataFrame | None:
    """A --spread run saved at `path`, if it ran the same recipe (`signature`) on the same suite (the same
    per-target bounds); else None (it is run again)."""
    if not path.is_file():
        return None
    saved = pd.read_csv(path)
    same = ("overrides" in saved and (saved.overrides == signature).all() and len(saved) == len(kl_bound)
            and np.allclose(saved.kl_bound, kl_bound, equal_nan=True))
    return saved if same else None


def write_summary(out: Path, lines: list[str], overall: list[dict]) -> str:
    overall_table = [markdown(pd.DataFrame(overall)), ""] if overall else []  # none with --recipes "" --spread
    text = "\n".join(lines[:4] + overall_table + lines[4:])
    (out / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
