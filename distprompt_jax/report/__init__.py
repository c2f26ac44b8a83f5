"""Figures, statistics and a report page from a run's results.parquet.

    python -m distprompt_jax.report --workdir=DIR      (or `distprompt-report --workdir=DIR`)

Writes DIR/report.md and DIR/figures/*.png and *.svg, each figure with the statistics under it — but never
over files the package did not write (see `page`).

    statistics   binned means with honest intervals, paired tests with FDR correction, the bound gap table,
                 the expressivity ladder (gaps between rungs, rung inversions)
    figures      the plots
    page         report.md, where it may be written, and the command line
"""

from distprompt_jax.report.figures import plot_bound_band, plot_ladder
from distprompt_jax.report.page import (
    ReportError,
    ReportLocationWarning,
    build_report,
    prompt_length_table,
    read_results,
    run,
    write_report,
)
from distprompt_jax.report.statistics import (
    LADDER,
    LARGE_RUNG_GAP,
    MIN_N_BOOTSTRAP,
    MIN_N_INTERVAL,
    RUNG_INVERSION_TOLERANCE,
    Interval,
    adjust_p_values,
    binned_summary,
    choose_bins,
    inversion_counts,
    kl_gap_table,
    ladder_rungs,
    ladder_table,
    mean_interval,
    method_comparison,
    paired_comparison,
    rung_gap_table,
    rung_gaps,
    rung_inversions,
)

__all__ = [
    "LADDER", "LARGE_RUNG_GAP", "MIN_N_BOOTSTRAP", "MIN_N_INTERVAL", "RUNG_INVERSION_TOLERANCE", "Interval",
    "ReportError", "ReportLocationWarning", "adjust_p_values", "binned_summary", "build_report", "choose_bins",
    "inversion_counts", "kl_gap_table", "ladder_rungs", "ladder_table", "mean_interval", "method_comparison",
    "paired_comparison", "plot_bound_band", "plot_ladder", "prompt_length_table", "read_results", "rung_gap_table",
    "rung_gaps", "rung_inversions", "run", "write_report",
]
