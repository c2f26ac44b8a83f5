"""Figures, statistics and a report page from a run's results.parquet.

    python -m distprompt_jax.report --workdir=DIR      (or `distprompt-report --workdir=DIR`)

Writes DIR/report.md and DIR/figures/*.png and *.svg, each figure with the statistics under it — but never
over files the package did not write (see `page`).

    statistics   binned means with honest intervals, paired tests with FDR correction, the bound gap table
    figures      the plots
    page         report.md, where it may be written, and the command line
"""

from distprompt_jax.report.figures import plot_bound_band
from distprompt_jax.report.page import (
    ReportError, ReportLocationWarning, build_report, prompt_length_table, read_results, run, write_report,
)
from distprompt_jax.report.statistics import (
    MIN_N_BOOTSTRAP, MIN_N_INTERVAL, Interval, adjust_p_values, binned_summary, choose_bins, kl_gap_table,
    mean_interval, method_comparison, paired_comparison,
)

__all__ = [
    "MIN_N_BOOTSTRAP", "MIN_N_INTERVAL", "Interval", "ReportError", "ReportLocationWarning", "adjust_p_values",
    "binned_summary", "build_report", "choose_bins", "kl_gap_table", "mean_interval", "method_comparison",
    "paired_comparison", "plot_bound_band", "prompt_length_table", "read_results", "run", "write_report",
]
