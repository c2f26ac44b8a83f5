"""The report's figures. Each draws every target as a point and the statistics computed in `statistics`
over them; each writes `<stem>.png` and `<stem>.svg` and returns both paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from distprompt_jax.report.statistics import (
    LADDER,
    LINE_BINS,
    MIN_N_INTERVAL,
    MIN_N_LINE,
    binned_summary,
    kl_gap_table,
)

# One marker per rung of the ladder, so the series stay apart where their lines overlap (and in gray print).
RUNG_MARKERS = dict(zip(LADDER, ("s", "o", "^", "D", "x", "_")))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem) -> list[Path]:
    """`fig` as `stem`.png and `stem`.svg (a .png/.svg/.pdf suffix on `stem` is replaced); closes it."""
    plt = _pyplot()
    base = Path(stem)
    base = base.with_suffix("") if base.suffix in (".png", ".svg", ".pdf") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".svg"):
        path = base.with_name(base.name + suffix)
        fig.savefig(path)
        written.append(path)
    plt.close(fig)
    return written


def _binned_line(ax, rows: pd.DataFrame, bins: pd.DataFrame, color: str, label: str):
    ax.scatter(rows.target_entropy, rows.kl, s=8, alpha=0.35, color=color)
    if bins.empty:  # no finite KL at all (every target's search diverged): nothing to join
        return
    ax.plot(bins.x_mean, bins["mean"], color=color, marker="o", markersize=3, label=label)
    # Bins below MIN_N_INTERVAL targets have NaN bounds: no band is drawn there.
    ax.fill_between(bins.x_mean, bins.ci_low, bins.ci_high, color=color, alpha=0.2, linewidth=0)


def plot_kl_vs_entropy(results: pd.DataFrame, bins: dict[str, pd.DataFrame], stem) -> list[Path]:
    """KL against target entropy per method: the targets, and per method its `binned_summary` (`bins`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    for i, (method, rows) in enumerate(results.groupby("method", sort=True)):
        _binned_line(ax, rows, bins[method], f"C{i}", f"{method}: bin means, {_interval_label()}")
    ax.set_xlabel("target entropy (nats)")
    ax.set_ylabel("KL(p ‖ q) reached (nats)")
    ax.set_title(f"{results.model.iloc[0]}: how close prompts get, by target entropy")
    if ax.get_legend_handles_labels()[0]:  # none where every search diverged
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem)


def _interval_label() -> str:
    return f"95% CI where n ≥ {MIN_N_INTERVAL}"


def plot_recipes(results: pd.DataFrame, method: str, recipes: list[str], stem) -> list[Path]:
    """KL vs entropy for several target recipes under one method (binned means with their intervals)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    for i, recipe in enumerate(recipes):
        rows = results[(results.method == method) & (results.recipe == recipe)]
        bins = binned_summary(rows.target_entropy, rows.kl)
        _binned_line(ax, rows, bins, f"C{i}", f"{recipe} targets ({_interval_label()})")
    ax.set_xlabel("target entropy (nats)")
    ax.set_ylabel(f"KL(p ‖ q) reached, {method} (nats)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_prompt_length(table: pd.DataFrame, stem, xlabel: str = "soft prompt length") -> list[Path]:
    """Mean KL against prompt length from `table` (prompt_len, mean, ci_low, ci_high); no error bar where the
    interval is missing."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=150)
    below = np.nan_to_num(table["mean"] - table.ci_low)
    above = np.nan_to_num(table.ci_high - table["mean"])
    ax.errorbar(table.prompt_len, table["mean"], yerr=[below, above], marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xticks(table.prompt_len, [str(v) for v in table.prompt_len])
    ax.set_xlabel(f"{xlabel} L")
    ax.set_ylabel("mean KL(p ‖ q) (nats)")
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_soft_vs_hard(results: pd.DataFrame, stem) -> list[Path]:
    """Per target: the hard prompt's KL against the soft prompt's."""
    plt = _pyplot()
    pairs = results[results.method.isin(["soft", "hard"])].pivot(index="target_id", columns="method", values="kl")
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=150)
    ax.scatter(pairs.soft, pairs.hard, s=10, alpha=0.6)
    top = float(np.nanmax(pairs.to_numpy()))
    ax.plot([0, top], [0, top], color="black", linewidth=0.8, label="equal KL")
    ax.set_xlabel("soft prompt KL (nats)")
    ax.set_ylabel("hard prompt KL (nats)")
    ax.legend(frameon=False)
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_found_vs_bound(gaps: pd.DataFrame, stem) -> list[Path]:
    """Found KL and the certified bound against target entropy, from a `gap_rows` table (method, target_id,
    target_entropy, kl, kl_bound, optionally kl_bound_norm).

    Per method: every target's found KL (a point) and, over the targets with both a finite found KL and a
    certified bound, the bin means of each (`binned_summary` bins), the band between them shaded: what that
    search did not find. In black each target's certified bound (a dash) and its bin means: the floor no prompt
    goes below. Gray crosses: the norm-constrained estimate, where it ran (not certified).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    for i, (method, rows) in enumerate(gaps.groupby("method", sort=True)):
        color = f"C{i}"
        ax.scatter(rows.target_entropy, rows.kl, s=8, alpha=0.35, color=color)
        both = rows[np.isfinite(rows.kl) & np.isfinite(rows.kl_bound)]
        # Both from the same targets, so the same bins: the band is the mean gap of each bin.
        found = binned_summary(both.target_entropy, both.kl, LINE_BINS, MIN_N_LINE)
        floor = binned_summary(both.target_entropy, both.kl_bound, LINE_BINS, MIN_N_LINE)
        ax.plot(found.x_mean, found["mean"], color=color, marker="o", markersize=3, label=f"{method}: found KL")
        ax.fill_between(found.x_mean, floor["mean"], found["mean"], color=color, alpha=0.15, linewidth=0)
    targets = gaps.drop_duplicates("target_id")
    if "kl_bound_norm" in targets.columns:
        ax.scatter(targets.target_entropy, targets.kl_bound_norm, s=12, marker="x", linewidth=0.7, color="gray",
                   label="norm-constrained estimate")
    ax.scatter(targets.target_entropy, targets.kl_bound, s=40, marker="_", linewidth=0.8, color="black", zorder=3)
    floor = binned_summary(targets.target_entropy, targets.kl_bound, LINE_BINS, MIN_N_LINE)
    ax.plot(floor.x_mean, floor["mean"], color="black", linewidth=1.2, label="certified bound (floor)")
    ax.set_xlabel("target entropy (nats)")
    ax.set_ylabel("KL(p ‖ q) (nats)")
    ax.set_title("KL prompts reached, above the certified bound")
    lowest = np.nanmin(targets.kl_bound.to_numpy(np.float64)) if targets.kl_bound.notna().any() else 0.0
    ax.set_ylim(bottom=min(0.0, float(lowest)))
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_bound_band(found_df: pd.DataFrame, bound_df: pd.DataFrame, path) -> list[Path]:
    """`plot_found_vs_bound` from soft/hard results (`found_df`) and `unembedding_bound`'s (`bound_df`, with
    `norm_bound_estimate`'s rows if it ran), joined by `kl_gap_table`; needs target_entropy in either table."""
    table = kl_gap_table(found_df, bound_df)
    if "target_entropy" not in table.columns:
        raise ValueError("neither table has a target_entropy column")
    return plot_found_vs_bound(table.rename(columns={"kl_found": "kl"}), path)


def plot_ladder(table: pd.DataFrame, stem) -> list[Path]:
    """KL against target entropy per rung of the expressivity ladder, from a `ladder_table` (target_entropy and one
    KL column per rung): every target a marker, bin means joined by a line, the rungs in ladder order (smallest
    set first). The certified bound, where it ran, is the black floor; bound_norm, where it ran, gray."""
    plt = _pyplot()
    rungs = [rung for rung in LADDER if rung in table.columns]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=150)
    prompt_rungs = [rung for rung in rungs if rung not in ("bound", "bound_norm")]
    colors = {rung: f"C{i}" for i, rung in enumerate(prompt_rungs)} | {"bound_norm": "gray", "bound": "black"}
    for rung in rungs:
        kl = table[rung]
        bins = binned_summary(table.target_entropy, kl, LINE_BINS, MIN_N_LINE)
        floor = rung == "bound"
        ax.scatter(table.target_entropy, kl, s=30 if floor else 10, marker=RUNG_MARKERS[rung],
                   alpha=0.8 if floor else 0.4, color=colors[rung], linewidth=0.8)
        label = "certified bound (floor)" if floor else f"{rung}: bin means"
        ax.plot(bins.x_mean, bins["mean"], color=colors[rung], linewidth=1.6 if floor else 1.0,
                marker=RUNG_MARKERS[rung], markersize=4, label=label)
    if "bound" in rungs and table["bound"].notna().any():
        ax.set_ylim(bottom=min(0.0, float(np.nanmin(table["bound"].to_numpy(np.float64)))))
    ax.set_xlabel("target entropy (nats)")
    ax.set_ylabel("KL(p ‖ q) reached (nats)")
    ax.set_title("The expressivity ladder: KL per rung above the certified floor")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem)
