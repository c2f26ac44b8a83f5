"""Figures and a report page from a run's results.parquet.

    python -m distprompt_jax.report --workdir=DIR      (or `distprompt-report --workdir=DIR`)

Writes DIR/figures/*.png and *.svg and DIR/report.md, each figure with the statistics under it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

BOOTSTRAP_SAMPLES = 2000


def bootstrap_ci(values: np.ndarray, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(BOOTSTRAP_SAMPLES, len(values))).mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def binned_means(table: pd.DataFrame, x: str, y: str, n_bins: int) -> pd.DataFrame:
    """Mean of y and its 95% bootstrap CI in equal-width bins of x."""
    edges = np.linspace(table[x].min(), table[x].max(), n_bins + 1)
    which = np.clip(np.digitize(table[x], edges[1:-1]), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        values = table[y].to_numpy()[which == b]
        if len(values) == 0:
            continue
        low, high = bootstrap_ci(values, seed=b)
        rows.append({"bin_low": edges[b], "bin_high": edges[b + 1], "center": (edges[b] + edges[b + 1]) / 2,
                     "n": len(values), "mean": values.mean(), "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def plot_kl_vs_entropy(results: pd.DataFrame, stem: Path, n_bins: int = 8) -> pd.DataFrame:
    """KL against target entropy per method: binned means with 95% bootstrap CIs over the raw points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    summaries = []
    for i, (method, rows) in enumerate(results.groupby("method", sort=True)):
        bins = binned_means(rows, "target_entropy", "kl", n_bins)
        color = f"C{i}"
        ax.scatter(rows.target_entropy, rows.kl, s=8, alpha=0.35, color=color)
        ax.plot(bins.center, bins["mean"], color=color, label=f"{method} (binned mean, 95% CI)")
        ax.fill_between(bins.center, bins.ci_low, bins.ci_high, color=color, alpha=0.2, linewidth=0)
        summaries.append(bins.assign(method=method))
    ax.set_xlabel("target entropy (nats)")
    ax.set_ylabel("KL(p ‖ q) reached (nats)")
    ax.set_title(f"{results.model.iloc[0]}: how close prompts get, by target entropy")
    ax.legend(frameon=False)
    fig.tight_layout()
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".svg"):
        fig.savefig(stem.with_suffix(suffix))
    plt.close(fig)
    return pd.concat(summaries, ignore_index=True)


def paired_comparison(results: pd.DataFrame, method: str, recipe: str) -> dict | None:
    """KL of `recipe`'s targets against the targets they were paired with (equal entropy), one method.

    Wilcoxon signed-rank test on the paired differences (two-sided).
    """
    from scipy.stats import wilcoxon

    rows = results[(results.method == method)]
    paired = rows[(rows.recipe == recipe) & (rows.pair_target_id >= 0)]
    if len(paired) < 2:
        return None
    by_id = rows.set_index("target_id")
    partner = by_id.loc[paired.pair_target_id.to_numpy()]
    mine, theirs = paired.kl.to_numpy(np.float64), partner.kl.to_numpy(np.float64)
    test = wilcoxon(theirs, mine)
    return {
        "method": method, "recipe": recipe, "paired_with": partner.recipe.iloc[0], "n": len(paired),
        "median_kl": float(np.median(mine)), "median_kl_paired": float(np.median(theirs)),
        "median_difference": float(np.median(theirs - mine)), "wins": int(np.sum(theirs > mine)),
        "wilcoxon_statistic": float(test.statistic), "p_value": float(test.pvalue),
    }


def plot_recipes(results: pd.DataFrame, method: str, recipes: list[str], stem: Path, n_bins: int = 6):
    """KL vs entropy for several target recipes under one method (binned means, 95% CIs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    for i, recipe in enumerate(recipes):
        rows = results[(results.method == method) & (results.recipe == recipe)]
        bins = binned_means(rows, "target_entropy", "kl", n_bins)
        color = f"C{i}"
        ax.scatter(rows.target_entropy, rows.kl, s=8, alpha=0.35, color=color)
        ax.plot(bins.center, bins["mean"], color=color, label=f"{recipe} targets")
        ax.fill_between(bins.center, bins.ci_low, bins.ci_high, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("target entropy (nats)")
    ax.set_ylabel(f"KL(p ‖ q) reached, {method} (nats)")
    ax.legend(frameon=False)
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(stem.with_suffix(suffix))
    plt.close(fig)


def plot_prompt_length(results: pd.DataFrame, stem: Path) -> pd.DataFrame:
    """Mean KL (95% CI) against soft-prompt length, from methods labelled soft-L<length>."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for method, group in results[results.method.str.match(r"soft-L\d+$")].groupby("method"):
        low, high = bootstrap_ci(group.kl.to_numpy())
        rows.append({"prompt_len": int(method.removeprefix("soft-L")), "n": len(group), "mean": group.kl.mean(),
                     "ci_low": low, "ci_high": high})
    table = pd.DataFrame(rows).sort_values("prompt_len")
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=150)
    ax.errorbar(table.prompt_len, table["mean"], yerr=[table["mean"] - table.ci_low, table.ci_high - table["mean"]],
                marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xticks(table.prompt_len, [str(v) for v in table.prompt_len])
    ax.set_xlabel("soft prompt length L")
    ax.set_ylabel("mean KL(p ‖ q) (nats)")
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(stem.with_suffix(suffix))
    plt.close(fig)
    return table


def kl_gap_table(found: pd.DataFrame, bound: pd.DataFrame) -> pd.DataFrame:
    """Each found KL beside the bound: one row per (target, found method), joined on `target_id`.

    `found`: `.to_pandas()` of soft/hard results (several methods may be concatenated): target_id,
    method, kl, and optionally target_entropy / kind. `bound`: `.to_pandas()` of `unembedding_bound`
    (method "bound"), optionally concatenated with `norm_bound_estimate` rows (method "bound_norm").
    Columns: target_id, method, kl_found, kl_bound (certified; NaN where uncertified), bound_primal,
    certified, gap_to_bound = kl_found − kl_bound, and with bound_norm rows kl_bound_norm (estimate),
    gap_to_norm_bound = kl_found − kl_bound_norm; then target_entropy and kind when known.
    """
    for name, table, needed in (("found", found, ("target_id", "method", "kl")),
                                ("bound", bound, ("target_id", "method", "kl"))):
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise ValueError(f"{name} table lacks column(s) {missing}")
    plain = bound[bound["method"] == "bound"]
    if plain.empty:
        raise ValueError("bound table has no rows with method 'bound' (run unembedding_bound)")
    for column in ("primal", "certified"):
        if column not in plain.columns:
            raise ValueError(f"bound table lacks column {column!r} (is it unembedding_bound's table?)")
    if plain["target_id"].duplicated().any():
        raise ValueError("bound table has several 'bound' rows for one target_id")
    found_methods = set(found["method"]) & {"bound", "bound_norm"}
    if found_methods:
        raise ValueError(f"found table contains bound rows ({sorted(found_methods)}); pass soft/hard results")
    table = found[["target_id", "method", "kl"]].rename(columns={"kl": "kl_found"})
    side = plain[["target_id", "kl", "primal", "certified"]].rename(
        columns={"kl": "kl_bound", "primal": "bound_primal"}
    )
    table = table.merge(side, on="target_id", how="left", validate="many_to_one")
    unmatched = table["kl_bound"].isna() & table["bound_primal"].isna()
    if unmatched.any():
        ids = table.loc[unmatched, "target_id"].unique()[:10].tolist()
        raise ValueError(f"no bound for target_id(s) {ids}")
    table["gap_to_bound"] = table["kl_found"] - table["kl_bound"]
    norm = bound[bound["method"] == "bound_norm"]
    if not norm.empty:
        if norm["target_id"].duplicated().any():
            raise ValueError("bound table has several 'bound_norm' rows for one target_id")
        table = table.merge(
            norm[["target_id", "kl"]].rename(columns={"kl": "kl_bound_norm"}), on="target_id", how="left"
        )
        table["gap_to_norm_bound"] = table["kl_found"] - table["kl_bound_norm"]
    for column in ("target_entropy", "kind"):
        source = found if column in found.columns else plain if column in plain.columns else None
        if source is not None:
            values = source.drop_duplicates("target_id").set_index("target_id")[column]
            table[column] = table["target_id"].map(values).to_numpy()
    return table.reset_index(drop=True)


def plot_bound_band(found_df: pd.DataFrame, bound_df: pd.DataFrame, path, n_bins: int = 8) -> list[Path]:
    """KL vs target entropy: the certified bound, each found method's KL, and the band between them.

    Writes `path` with suffixes .png and .svg (a .png/.svg/.pdf suffix given is replaced); returns both
    paths. Every target is a point (the bound a black dash); the band runs between the medians of the
    bound and of each method's found KL in `n_bins` equal-width entropy bins (per target with few targets).
    Below the bound: what the unembedding cannot express; the band: what the search did not find.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    table = kl_gap_table(found_df, bound_df)
    if "target_entropy" not in table.columns:
        raise ValueError("neither table has a target_entropy column")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=150)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (method, rows) in enumerate(table.groupby("method", sort=True)):
        color = colors[index % len(colors)]
        ax.scatter(rows["target_entropy"], rows["kl_found"], s=12, alpha=0.7, color=color,
                   label=f"found KL ({method})")
        centers, low, high = _binned_band(rows["target_entropy"], rows["kl_bound"], rows["kl_found"], n_bins)
        ax.fill_between(centers, low, high, color=color, alpha=0.2, linewidth=0)
        ax.plot(centers, high, color=color, linewidth=1)
    targets = table.drop_duplicates("target_id")
    if "kl_bound_norm" in table.columns:
        ax.scatter(targets["target_entropy"], targets["kl_bound_norm"], s=14, marker="x", linewidth=0.8,
                   color="gray", label="norm-constrained estimate")
    ax.scatter(targets["target_entropy"], targets["kl_bound"], s=60, marker="_", color="black", zorder=3,
               label="certified bound (unembedding)")
    centers, low, _ = _binned_band(targets["target_entropy"], targets["kl_bound"], targets["kl_bound"], n_bins)
    ax.plot(centers, low, color="black", linewidth=1)
    ax.set_xlabel("target entropy (nats)")
    ax.set_ylabel("KL(p ‖ q) (nats)")
    ax.set_title("Certified lower bound and the KL prompts reached")
    ax.set_ylim(bottom=min(0.0, float(np.nanmin(targets["kl_bound"])) if targets["kl_bound"].notna().any() else 0.0))
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".png", ".svg", ".pdf") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".svg"):
        out = base.with_name(base.name + suffix)
        fig.savefig(out)
        written.append(out)
    plt.close(fig)
    return written


def _binned_band(entropy, low, high, n_bins: int):
    """(bin centres, median low, median high) over equal-width entropy bins; per point with ≤ 2 n_bins points."""
    entropy, low, high = (np.asarray(a, np.float64) for a in (entropy, low, high))
    keep = np.isfinite(entropy) & np.isfinite(low) & np.isfinite(high)
    entropy, low, high = entropy[keep], low[keep], high[keep]
    order = np.argsort(entropy)
    entropy, low, high = entropy[order], low[order], high[order]
    if len(entropy) <= 2 * n_bins:
        return entropy, low, high
    edges = np.linspace(entropy[0], entropy[-1], n_bins + 1)
    index = np.clip(np.digitize(entropy, edges[1:-1]), 0, n_bins - 1)
    groups = [g for g in (np.flatnonzero(index == k) for k in range(n_bins)) if len(g)]
    return (np.array([(edges[index[g[0]]] + edges[index[g[0]] + 1]) / 2 for g in groups]),
            np.array([np.median(low[g]) for g in groups]), np.array([np.median(high[g]) for g in groups]))


def write_report(workdir) -> Path:
    """Figures and report.md for the run in `workdir`; returns the report's path."""
    workdir = Path(workdir)
    results_path = workdir / "results.parquet"
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} does not exist: run the experiment (to the end) first")
    results = pd.read_parquet(results_path)
    figures = workdir / "figures"
    bins = plot_kl_vs_entropy(results, figures / "kl_vs_entropy")
    lines = [
        f"# Report: {results.model.iloc[0]}, {results.target_id.nunique()} targets",
        "",
        "![KL vs target entropy](figures/kl_vs_entropy.png)",
        "",
        "KL(p‖q) reached per target against the target's entropy; lines are means in equal-width entropy "
        f"bins with 95% percentile-bootstrap intervals ({BOOTSTRAP_SAMPLES} resamples).",
        "",
        "| method | entropy bin (nats) | n | mean KL | 95% CI |",
        "|---|---|---:|---:|---|",
    ]
    for row in bins.itertuples():
        lines.append(f"| {row.method} | {row.bin_low:.2f}–{row.bin_high:.2f} | {row.n} | {row.mean:.4f} | "
                     f"{row.ci_low:.4f}–{row.ci_high:.4f} |")
    lines += ["", "| method | targets | mean KL | median KL |", "|---|---:|---:|---:|"]
    for method, rows in results.groupby("method"):
        lines.append(f"| {method} | {len(rows)} | {rows.kl.mean():.4f} | {rows.kl.median():.4f} |")
    lines += _paired_sections(results, figures)
    lines += _method_sections(results, figures)
    lines += _bound_section(results, figures)
    if results.method.str.match(r"soft-L\d+$").any():
        table = plot_prompt_length(results, figures / "kl_vs_prompt_length")
        lines += ["", "## KL vs prompt length", "", "![KL vs prompt length](figures/kl_vs_prompt_length.png)", "",
                  "| L | targets | mean KL | 95% CI |", "|---:|---:|---:|---|"]
        lines += [f"| {r.prompt_len} | {r.n} | {r.mean:.4f} | {r.ci_low:.4f}–{r.ci_high:.4f} |"
                  for r in table.itertuples()]
    path = workdir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def method_comparison(results: pd.DataFrame, first: str, second: str) -> dict | None:
    """KL of two methods on the same targets: Wilcoxon signed-rank test on the per-target differences."""
    from scipy.stats import wilcoxon

    a = results[results.method == first].set_index("target_id").kl
    b = results[results.method == second].set_index("target_id").kl
    common = a.index.intersection(b.index)
    if len(common) < 2:
        return None
    a, b = a.loc[common].to_numpy(np.float64), b.loc[common].to_numpy(np.float64)
    test = wilcoxon(b, a)
    return {"first": first, "second": second, "n": len(common), "median_first": float(np.median(a)),
            "median_second": float(np.median(b)), "median_difference": float(np.median(b - a)),
            "second_higher": int(np.sum(b > a)), "wilcoxon_statistic": float(test.statistic),
            "p_value": float(test.pvalue)}


def _method_sections(results: pd.DataFrame, figures: Path) -> list[str]:
    """Soft against hard prompts on the same targets, when a run has both."""
    found = method_comparison(results, "soft", "hard")
    if found is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = results[results.method.isin(["soft", "hard"])].pivot(index="target_id", columns="method", values="kl")
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=150)
    ax.scatter(pairs.soft, pairs.hard, s=10, alpha=0.6)
    top = float(np.nanmax(pairs.to_numpy()))
    ax.plot([0, top], [0, top], color="black", linewidth=0.8, label="equal KL")
    ax.set_xlabel("soft prompt KL (nats)")
    ax.set_ylabel("hard prompt KL (nats)")
    ax.legend(frameon=False)
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig((figures / "soft_vs_hard").with_suffix(suffix))
    plt.close(fig)
    return [
        "", "## Soft vs hard prompts on the same targets", "", "![soft vs hard](figures/soft_vs_hard.png)", "",
        f"{found['n']} targets. Median KL: soft {found['median_first']:.4f}, hard {found['median_second']:.4f}; "
        f"median difference (hard − soft) {found['median_difference']:.4f}; hard is higher on "
        f"{found['second_higher']} of {found['n']}. Wilcoxon signed-rank (two-sided): "
        f"W = {found['wilcoxon_statistic']:.1f}, p = {found['p_value']:.3g}.",
    ]


def _bound_section(results: pd.DataFrame, figures: Path) -> list[str]:
    """The band between the certified unembedding bound and the KL each prompt method reached."""
    if "bound" not in set(results.method):
        return []
    bound = results[results.method.isin(["bound", "bound_norm"])]
    found = results[~results.method.isin(["bound", "bound_norm"])]
    if found.empty:
        return []
    plot_bound_band(found, bound, figures / "bound_band")
    gaps = kl_gap_table(found, bound)
    lines = [
        "", "## Found KL against the certified bound", "", "![bound band](figures/bound_band.png)", "",
        "Below the bound: what the unembedding cannot express at all; between the bound and the found KL: what "
        "the search did not find. The bound is certified (convex duality, float64 with rigorous error bounds).",
        "", "| method | targets | certified | median KL found | median bound | median gap to bound |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, rows in gaps.groupby("method"):
        lines.append(
            f"| {method} | {len(rows)} | {int(rows.certified.sum())} | {rows.kl_found.median():.4f} | "
            f"{rows.kl_bound.median():.4f} | {rows.gap_to_bound.median():.4f} |"
        )
    return lines


def _paired_sections(results: pd.DataFrame, figures: Path) -> list[str]:
    if "pair_target_id" not in results.columns:
        return []
    lines = []
    for recipe in sorted(results.recipe[results.pair_target_id >= 0].unique()):
        for method in sorted(results.method.unique()):
            found = paired_comparison(results, method, recipe)
            if found is None:
                continue
            stem = f"paired_{found['paired_with']}_vs_{recipe}_{method}"
            plot_recipes(results, method, [found["paired_with"], recipe], figures / stem)
            lines += [
                "", f"## {found['paired_with']} vs {recipe} targets at equal entropy ({method})", "",
                f"![{stem}](figures/{stem}.png)", "",
                f"{found['n']} pairs. Median KL: {found['paired_with']} {found['median_kl_paired']:.4f}, "
                f"{recipe} {found['median_kl']:.4f}; median paired difference ({found['paired_with']} − {recipe}) "
                f"{found['median_difference']:.4f}; {found['paired_with']} has the higher KL in {found['wins']} of "
                f"{found['n']} pairs. Wilcoxon signed-rank (two-sided): W = {found['wilcoxon_statistic']:.1f}, "
                f"p = {found['p_value']:.3g}.",
            ]
    return lines


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        print(write_report(flags.FLAGS.workdir))
    except FileNotFoundError as err:
        raise SystemExit(f"distprompt-report: {err}") from None


def run():
    from absl import app, flags

    # Defined here, not at import: the experiment CLI imports this module and has its own --workdir.
    flags.DEFINE_string("workdir", None, "Run directory holding results.parquet.", required=True)
    app.run(main)


if __name__ == "__main__":
    run()
