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
    for method, rows in results.groupby("method", sort=True):
        bins = binned_means(rows, "target_entropy", "kl", n_bins)
        ax.scatter(rows.target_entropy, rows.kl, s=8, alpha=0.35)
        color = ax.collections[-1].get_facecolor()[0]
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


def write_report(workdir) -> Path:
    """Figures and report.md for the run in `workdir`; returns the report's path."""
    workdir = Path(workdir)
    results_path = workdir / "results.parquet"
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} does not exist: run the experiment (to the end) first")
    results = pd.read_parquet(results_path)
    bins = plot_kl_vs_entropy(results, workdir / "figures" / "kl_vs_entropy")
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
    path = workdir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


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
