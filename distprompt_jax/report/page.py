"""report.md and its figures for a run's results.parquet, written only over files this package wrote.

What the package wrote is listed, with each file's sha256, in `MANIFEST` in the workdir. A report.md or a
figures/ file that is not listed there (or was edited since) is the user's: the report then goes to
distprompt-report.md and distprompt-figures/ instead, with a warning, and if those are taken too nothing is
written (ReportError names the files).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from distprompt_jax.files import atomic_write, os_error_message, real_dir
from distprompt_jax.report import figures
from distprompt_jax.report.statistics import (
    BELOW_BOUND_TOLERANCE,
    BOOTSTRAP_RESAMPLES,
    ENTROPY_BAND_EDGES,
    GAP_EDGES,
    LARGE_RUNG_GAP,
    LEVEL,
    LINE_BINS,
    MAX_BINS,
    MIN_N_BOOTSTRAP,
    MIN_N_INTERVAL,
    MIN_N_LINE,
    NO_GAP,
    RUNG_INVERSION_TOLERANCE,
    SMALL_GAP,
    WORST_PER_METHOD,
    adjust_p_values,
    binned_summary,
    entropy_band,
    gap_classes,
    gap_counts,
    gap_rows,
    interior_norm_estimates,
    inversion_counts,
    ladder_rungs,
    ladder_table,
    mean_interval,
    method_comparison,
    paired_comparison,
    rung_gap_table,
    rung_inversions,
    worst_targets,
)

RESULTS_FILE = "results.parquet"
REQUIRED_COLUMNS = ("target_id", "method", "model", "target_entropy", "kl")
MANIFEST = ".distprompt-report.json"
# The methods whose runs per prompt length (labelled <method>-L<length>) get a section: (its heading, the
# figure's axis, the figure's name).
LENGTH_METHODS = {
    "soft": ("prompt length", "soft prompt length", "kl_vs_prompt_length"),
    "prefix": ("prefix length", "prefix length", "kl_vs_prefix_length"),
}
# What a diverged row's KL says nothing about: left out of the page (`set_aside_diverged`).
DIVERGED_COLUMNS = ("kl", "gap_to_bound", "gap_to_norm_bound")
# Rung inversions listed one by one on the page, at most (all are counted).
MAX_LISTED_INVERSIONS = 30
# (report file, figures folder), in order of preference.
LOCATIONS = (("report.md", "figures"), ("distprompt-report.md", "distprompt-figures"))


class ReportError(ValueError):
    """A results file the report cannot read, or no place to write the report without overwriting."""


class ReportLocationWarning(UserWarning):
    """The report went to its second location because the first holds the user's files."""


def read_results(path) -> pd.DataFrame:
    """A results table, or an error that names the file and says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the experiment (to the end) first")
    try:
        results = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 -- pyarrow raises its own types for garbage, truncation and bad metadata
        raise ReportError(f"{path} is not a readable parquet results file ({type(err).__name__}: {err}); "
                          "rerun the experiment in a new workdir, or restore the file") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise ReportError(f"{path} lacks the column(s) {missing} a report needs (it has {list(results.columns)})")
    if results.empty:
        raise ReportError(f"{path} has no rows: there is nothing to report")
    return results


def write_report(workdir) -> Path:
    """Figures and report.md for the run in `workdir`; returns the report's path (see the module docstring
    for where it goes when report.md or figures/ hold files the package did not write)."""
    workdir = Path(workdir)
    results = read_results(workdir / RESULTS_FILE)
    manifest = _read_manifest(workdir)
    report_name, figures_name = _choose_location(workdir, manifest)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=workdir))
    try:
        lines = build_report(results, staging / figures_name, figures_name)
        (staging / report_name).write_text("\n".join(lines) + "\n")
        written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        # Figures of an earlier report in this location that this one did not redraw: removed if still ours.
        stale = [name for name in manifest if name.startswith(f"{figures_name}/") and name not in written]
        for name in stale:
            if _owned(workdir, name, manifest):
                (workdir / name).unlink()
            manifest.pop(name)
        for name in written:
            real_dir((workdir / name).parent, workdir)
            os.replace(staging / name, workdir / name)
            manifest[name] = _sha256(workdir / name)
        _write_manifest(workdir, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return workdir / report_name


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest(workdir: Path) -> dict[str, str]:
    try:
        files = json.loads((workdir / MANIFEST).read_text())["files"]
        return {str(k): str(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # none, or unreadable: then nothing counts as ours, which only ever protects files


def _write_manifest(workdir: Path, manifest: dict[str, str]) -> None:
    text = json.dumps({"files": dict(sorted(manifest.items()))}, indent=1)
    atomic_write(workdir / MANIFEST, lambda file: file.write(text.encode()))


def _owned(workdir: Path, name: str, manifest: dict[str, str]) -> bool:
    """Whether `name` (relative to workdir) is a file this package wrote and nobody changed since."""
    path = workdir / name
    return name in manifest and path.is_file() and _sha256(path) == manifest[name]


def _foreign_files(workdir: Path, report_name: str, figures_name: str, manifest: dict[str, str]) -> list[Path]:
    """Files at a report location that the package did not write (or that were changed since)."""
    foreign = []
    report = workdir / report_name
    if report.is_symlink() or (report.exists() and not _owned(workdir, report_name, manifest)):
        foreign.append(report)
    folder = workdir / figures_name
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):  # never written through a link
        foreign.append(folder)
    elif folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if not path.is_dir() and not _owned(workdir, path.relative_to(workdir).as_posix(), manifest):
                foreign.append(path)
    return foreign


def _choose_location(workdir: Path, manifest: dict[str, str]) -> tuple[str, str]:
    taken = []
    for report_name, figures_name in LOCATIONS:
        foreign = _foreign_files(workdir, report_name, figures_name, manifest)
        if not foreign:
            if taken:
                warnings.warn(
                    f"{', '.join(map(str, taken[0][:5]))} were not written by distprompt (or were edited): left as "
                    f"they are; the report goes to {workdir / report_name} and {workdir / figures_name}/ instead",
                    ReportLocationWarning, stacklevel=3,
                )
            return report_name, figures_name
        taken.append(foreign)
    listed = ", ".join(str(p) for group in taken for p in group[:5])
    raise ReportError(f"every report location in {workdir} holds files distprompt did not write ({listed}); "
                      "move them away to write the report")


# -- the page ---------------------------------------------------------------------------------------------


def _interval_text(row) -> str:
    if row.interval == "none":
        return f"— (n < {MIN_N_INTERVAL})"
    return f"{row.ci_low:.4f}–{row.ci_high:.4f} ({row.interval})"


def intervals_explained() -> str:
    return (
        f"Intervals are {LEVEL:.0%} confidence intervals of the mean: BCa bootstrap ({BOOTSTRAP_RESAMPLES} "
        f"resamples) where n ≥ {MIN_N_BOOTSTRAP}, Student t where {MIN_N_INTERVAL} ≤ n < {MIN_N_BOOTSTRAP}, "
        f"and none where n < {MIN_N_INTERVAL} (too few targets for an interval to mean anything)."
    )


def build_report(results: pd.DataFrame, figures_dir: Path, figures_name: str) -> list[str]:
    """The report's lines; figures are written to `figures_dir`, which the page links as `figures_name`/.
    Where a bound ran the page opens with the found KL against it, else with the KL against target entropy."""
    lines = [f"# Report: {results.model.iloc[0]}, {results.target_id.nunique()} targets"]
    results, warning = set_aside_diverged(results)
    lines += warning
    gaps = gap_rows(results)
    if gaps is not None:
        lines += _bound_section(gaps, figures_dir, figures_name)
    # With one search beside the bound, the section above already is its ladder.
    if len([rung for rung in ladder_rungs(results) if rung != "bound"]) >= 2:
        lines += _ladder_section(results, figures_dir, figures_name)
    lines += _entropy_section(results, figures_dir, figures_name)
    lines += _tests_section(results, figures_dir, figures_name)
    for method in LENGTH_METHODS:
        if results.method.str.match(rf"{method}-L\d+$").any():
            lines += _prompt_length_section(results, method, figures_dir, figures_name)
    return lines


def set_aside_diverged(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """`results` with the KL (and gaps) of every diverged row made NaN, so that no statistic or figure counts a
    search that blew up as a finding, and the page's warning about them (no lines when none diverged)."""
    if "diverged" not in results.columns:
        return results, []
    diverged = results["diverged"].eq(True).to_numpy()
    if not diverged.any():
        return results, []
    out = results.copy()
    for column in DIVERGED_COLUMNS:
        if column in out.columns:
            out.loc[diverged, column] = np.nan
    counts = ", ".join(f"{method}: {int(rows.diverged.eq(True).sum())} of {len(rows)}"
                       for method, rows in results.groupby("method") if rows.diverged.eq(True).any())
    return out, ["", f"**Warning: searches diverged** ({counts} targets): the optimizer blew up (a KL or prompt no "
                     "longer finite, prompts beyond what the model's norms can take, or one output for every "
                     "target). These rows are no findings: their KL is left out of every statistic and figure "
                     "below. Rerun with a lower learning rate."]


def _entropy_section(results: pd.DataFrame, figures_dir: Path, figures_name: str) -> list[str]:
    bins = {method: binned_summary(rows.target_entropy, rows.kl) for method, rows in results.groupby("method")}
    figures.plot_kl_vs_entropy(results, bins, figures_dir / "kl_vs_entropy")
    lines = [
        "", "## KL against target entropy", "",
        f"![KL vs target entropy]({figures_name}/kl_vs_entropy.png)",
        "",
        "KL(p‖q) reached per target against the target's entropy. Per method the targets are grouped into at "
        f"most {MAX_BINS} entropy bins of at least {MIN_N_INTERVAL} targets each (consecutive by entropy, so "
        "small runs get fewer bins; the range column gives each bin's lowest and highest target entropy); "
        "lines join the bin means. " + intervals_explained(),
        "",
        f"| method | entropy range (nats) | n | mean KL | median KL | {LEVEL:.0%} CI of the mean |",
        "|---|---|---:|---:|---:|---|",
    ]
    for method, table in bins.items():
        for row in table.itertuples():
            lines.append(f"| {method} | {row.x_low:.2f}–{row.x_high:.2f} | {row.n} | {row.mean:.4f} | "
                         f"{row.median:.4f} | {_interval_text(row)} |")
    lines += ["", "| method | targets | finite KL | mean KL | median KL |", "|---|---:|---:|---:|---:|"]
    for method, rows in results.groupby("method"):
        kl = rows.kl.to_numpy(np.float64)
        finite = kl[np.isfinite(kl)]
        mean, median = (f"{finite.mean():.4f}", f"{np.median(finite):.4f}") if len(finite) else ("—", "—")
        lines.append(f"| {method} | {len(rows)} | {len(finite)} | {mean} | {median} |")
    if not np.isfinite(results.kl.to_numpy(np.float64)).all():
        lines += ["", ("Targets without a finite KL (a run that diverged, or a bound left uncertified) are counted "
                       "in `targets` but left out of every statistic.")]
    return lines


def _tests_section(results: pd.DataFrame, figures_dir: Path, figures_name: str) -> list[str]:
    """Paired recipe comparisons and soft vs hard, with p values adjusted over all of them together."""
    tests = []  # (kind, result)
    if "pair_target_id" in results.columns and "recipe" in results.columns:
        for recipe in sorted(results.recipe[results.pair_target_id >= 0].unique()):
            for method in sorted(results.method.unique()):
                found = paired_comparison(results, method, recipe)
                if found is not None:
                    tests.append(("paired", found))
    found = method_comparison(results, "soft", "hard")
    if found is not None:
        tests.append(("methods", found))
    if not tests:
        return []
    adjusted = adjust_p_values([t["p_value"] for _, t in tests])
    correction = (f"Benjamini–Hochberg adjusted over the {len(tests)} tests of this report: p_adj = {{:.3g}}"
                  if len(tests) > 1 else "the only test of this report, so p_adj = p = {:.3g}")
    lines = []
    for (kind, test), p_adj in zip(tests, adjusted):
        excluded = (f" ({test['n_excluded']} left out: a KL not finite)" if test["n_excluded"] else "")
        if kind == "paired":
            other, recipe, method = test["paired_with"], test["recipe"], test["method"]
            stem = f"paired_{other}_vs_{recipe}_{method}"
            figures.plot_recipes(results, method, [other, recipe], figures_dir / stem)
            lines += [
                "", f"## {other} vs {recipe} targets at equal entropy ({method})", "",
                f"![{stem}]({figures_name}/{stem}.png)", "",
                f"{test['n']} pairs{excluded}. Median KL: {other} {test['median_kl_paired']:.4f}, "
                f"{recipe} {test['median_kl']:.4f}; median paired difference ({other} − {recipe}) "
                f"{test['median_difference']:.4f}; {other} has the higher KL in {test['wins']} of "
                f"{test['n']} pairs. Wilcoxon signed-rank (two-sided): W = {test['wilcoxon_statistic']:.1f}, "
                f"p = {test['p_value']:.3g}; " + correction.format(p_adj) + ".",
            ]
        else:
            figures.plot_soft_vs_hard(results, figures_dir / "soft_vs_hard")
            lines += [
                "", "## Soft vs hard prompts on the same targets", "",
                f"![soft vs hard]({figures_name}/soft_vs_hard.png)", "",
                f"{test['n']} targets{excluded}. Median KL: soft {test['median_first']:.4f}, hard "
                f"{test['median_second']:.4f}; median difference (hard − soft) {test['median_difference']:.4f}; "
                f"hard is higher on {test['second_higher']} of {test['n']}. Wilcoxon signed-rank (two-sided): "
                f"W = {test['wilcoxon_statistic']:.1f}, p = {test['p_value']:.3g}; " + correction.format(p_adj) + ".",
            ]
    return lines


def _bound_section(gaps: pd.DataFrame, figures_dir: Path, figures_name: str) -> list[str]:
    """The found KL of each prompt method against the certified unembedding bound, from `gap_rows`."""
    figures.plot_found_vs_bound(gaps, figures_dir / "found_vs_bound")
    norm = ("; gray crosses: the norm-constrained estimate (the best over restarts, not certified)"
            if "kl_bound_norm" in gaps.columns else "")
    lines = [
        "", "## Found KL against the certified bound", "",
        f"![found KL vs certified bound]({figures_name}/found_vs_bound.png)", "",
        "Per target (points) the KL(p‖q) each prompt method reached, and the certified lower bound (black dashes): "
        "no prompt of any kind or length gets below it, since it holds for every hidden vector the unembedding can "
        "be given (convex duality, float64 with rigorous error bounds)" + norm + ". Lines join bin means over the "
        "targets with both a finite found KL and a certified bound (at most "
        f"{LINE_BINS} quantile entropy bins of at least {MIN_N_LINE} targets); the shaded band between a method's "
        "line and the black one is its mean gap: "
        "what that search did not find.",
        "", *_claims_paragraph(gaps),
    ]
    lines += _below_bound_warning(gaps)
    lines += _gap_count_section(gaps)
    lines += _worst_targets_section(gaps)
    return lines


def _claims_paragraph(gaps: pd.DataFrame) -> list[str]:
    """Which targets a statement about expressivity may rest on, and how many there are per method."""
    counts = []
    for method, rows in gaps.groupby("method"):
        small = int((rows.gap_to_bound <= SMALL_GAP).sum())
        counts.append(f"{method} {small} of {len(rows)} ({small / len(rows):.0%})")
    return [(
        f"**What a gap allows us to say.** A finding about what the model can express is stated only for targets "
        f"whose gap (found KL − certified bound) is at most {SMALL_GAP:g} nats: there the lowest KL any prompt "
        f"can reach is pinned between the bound and the found KL, within {SMALL_GAP:g} nats, so the model's "
        f"limit, not the search, decides the number. Targets with a gap ≤ {SMALL_GAP:g}: {'; '.join(counts)}. "
        "A target with a larger gap says only that the search found no better prompt, not that the model cannot "
        "express the target."
    )]


def _below_bound_warning(gaps: pd.DataFrame) -> list[str]:
    """A found KL below a proven floor is impossible: said loudly, with the targets, where it happens."""
    below = gaps[gaps.gap_to_bound < -BELOW_BOUND_TOLERANCE]
    if below.empty:
        return []
    ids = ", ".join(f"{r.method} {r.target_id}" for r in below.head(10).itertuples())
    return ["", (f"**Warning:** on {len(below)} (target, method) pair(s) the found KL lies more than "
                 f"{BELOW_BOUND_TOLERANCE:g} nats below the certified bound, which a correct bound rules out: check "
                 f"the bound and the KL evaluation of these targets ({ids}{', …' if len(below) > 10 else ''}).")]


def _gap_count_section(gaps: pd.DataFrame) -> list[str]:
    classes = gap_classes()
    lines = [
        "", "### Targets by gap to the bound", "",
        f"Targets per gap class (gap = found KL − certified bound, nats): ≤ {GAP_EDGES[0]:g}, "
        + ", ".join(f"in ({low:g}, {high:g}]" for low, high in itertools.pairwise(GAP_EDGES))
        + f", > {GAP_EDGES[-1]:g}, and {NO_GAP!r} where the bound is uncertified or the found KL not finite. "
        "Median and 90th percentile are over the finite gaps. The entropy bands are fixed, the same for every "
        f"method and every run (so runs compare band by band): {_band_text()} nats of target entropy.",
    ]
    groupings = [("method", ["method"])]
    if "kind" in gaps.columns and gaps.kind.notna().any():
        groupings.append(("kind", ["method", "kind"]))
    banded = gaps.assign(entropy_band=entropy_band(gaps.target_entropy))
    groupings.append(("entropy (nats)", ["method", "entropy_band"]))
    for header, by in groupings:
        table = gap_counts(banded, by)
        group_header = "method" if len(by) == 1 else f"method | {header}"
        lines += ["", f"| {group_header} | targets | " + " | ".join(classes) + " | median gap | 90th pct gap |",
                  "|---" * len(by) + "|---:" * (len(classes) + 3) + "|"]
        for row in table.to_dict("records"):
            cells = [str(row[c]) for c in by] + [str(row["targets"])] + [str(row[c]) for c in classes]
            cells += [_nats(row["median_gap"]), _nats(row["p90_gap"])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _band_text() -> str:
    edges = (0.0, *ENTROPY_BAND_EDGES)
    return ", ".join(f"[{low:g}, {high:g})" for low, high in itertools.pairwise(edges)) + f", ≥ {edges[-1]:g}"


def _nats(value: float) -> str:
    return "—" if np.isnan(value) else f"{value:.4f}"


def _worst_targets_section(gaps: pd.DataFrame) -> list[str]:
    worst = worst_targets(gaps)
    if worst.empty:
        return []
    kind = "kind" in worst.columns
    lines = [
        "", "### Largest gaps", "",
        (f"Per method the (up to) {WORST_PER_METHOD} targets whose found KL is farthest above the certified "
         "bound, largest first: where the search fell shortest, which says nothing about what the model can express."),
        "", "| method | target_id | " + ("kind | " if kind else "") + "entropy (nats) | KL found | certified bound "
        "| gap |", "|---|---:|" + ("---|" if kind else "") + "---:|---:|---:|---:|",
    ]
    for row in worst.itertuples():
        lines.append(f"| {row.method} | {row.target_id} | " + (f"{row.kind} | " if kind else "")
                     + f"{row.target_entropy:.2f} | {row.kl:.4f} | {row.kl_bound:.4f} | {row.gap_to_bound:.4f} |")
    return lines


def _ladder_section(results: pd.DataFrame, figures_dir: Path, figures_name: str) -> list[str]:
    """The rungs of the expressivity ladder on the same targets: KL vs entropy, where neighbouring rungs are far
    apart, and the inversions (a smaller set beating a larger one)."""
    table = ladder_table(results)
    rungs = ladder_rungs(results)
    figures.plot_ladder(table, figures_dir / "ladder")
    lines = [
        "", "## The expressivity ladder", "", f"![KL vs target entropy per rung]({figures_name}/ladder.png)", "",
        ("The rungs' reachable sets nest — hard tokens ⊂ soft prompts ⊂ prefixes (keys and values at every layer) "
         "⊂ any final-norm output ⊂ any hidden vector — so on each target, up to search error, "
         "KL(hard) ≥ KL(soft) ≥ KL(prefix) ≥ KL(final_norm) ≥ KL(bound_norm) ≥ KL(bound). final_norm is one free "
         "vector in place of the final norm's input (gradient search); bound_norm searches the same set by L-BFGS; "
         f"bound is the certified floor. Rungs in this run: {', '.join(rungs)}. Per rung every target is a marker "
         f"and the bin means (at most {LINE_BINS} quantile entropy bins of at least {MIN_N_LINE} targets) are "
         "joined by a line."),
    ]
    inside, known = interior_norm_estimates(results)
    if inside:
        lines += ["", (f"bound_norm's best point lies inside the final norm's image, not on its surface, on {inside} "
                       f"of {known} targets. Every prompt's normed state lies on the surface (its residual stream is "
                       "far larger than the norm's √ε), so there bound_norm — and the certified bound, which it then "
                       "equals — can be below what any prompt reaches, and the final_norm → bound_norm gap is not "
                       "the final-norm rung's failure.")]
    lines += _rung_gap_lines(table)
    lines += _inversion_lines(table, rungs)
    return lines


def _rung_gap_lines(table: pd.DataFrame) -> list[str]:
    gaps = rung_gap_table(table)
    if gaps.empty:
        return []
    kind = "kind" in gaps.columns
    lines = [
        "", "### Gaps between neighbouring rungs", "",
        ("Per pair of neighbouring rungs that ran (the smaller set first), target kind and fixed entropy band "
         f"({_band_text()} nats): KL(smaller set) − KL(larger set) over the targets where both are finite — its "
         f"median, 90th percentile, and how many targets exceed {LARGE_RUNG_GAP:g} nats. **Bold**: a median gap "
         f"above {LARGE_RUNG_GAP:g} nats, where the larger set reaches distributions the smaller one does not (or, "
         "if the larger is a search too, where the smaller one's search fell short). A negative gap is an "
         "inversion (below)."), "",
        ("| rungs | " + ("kind | " if kind else "") + "entropy (nats) | targets | median gap | 90th pct gap | "
         f"> {LARGE_RUNG_GAP:g} |"), "|---|" + ("---|" if kind else "") + "---|---:|---:|---:|---:|",
    ]
    for row in gaps.itertuples():
        median = f"**{row.median_gap:.4f}**" if row.is_large else f"{row.median_gap:.4f}"
        lines.append(f"| {row.upper} → {row.lower} | " + (f"{row.kind} | " if kind else "")
                     + f"{row.entropy_band} | {row.targets} | {median} | {row.p90_gap:.4f} | {row.large} |")
    return lines


def _inversion_lines(table: pd.DataFrame, rungs: list[str]) -> list[str]:
    counts = inversion_counts(table)
    inversions = rung_inversions(table)
    lines = ["", "### Rung inversions", ""]
    if inversions.empty:
        return [*lines, (
            f"**No rung inversions**: on every target and every pair of rungs ({len(counts)} pairs), the larger "
            f"set's KL is at most {RUNG_INVERSION_TOLERANCE:g} nats above the smaller set's, as the nesting requires.")]
    failed = inversions.groupby("larger", sort=False).target_id.nunique()
    failed = [f"{rung} on {failed[rung]} target(s)" for rung in rungs if rung in failed.index]
    lines.append(
        f"**{len(inversions)} rung inversion(s) on {inversions.target_id.nunique()} target(s)**: a smaller set's rung "
        f"reached a KL more than {RUNG_INVERSION_TOLERANCE:g} nats below a larger set's. The larger set reaches "
        "whatever the smaller one does, so each is the larger set's search failing, not a property of the model: "
        f"there its KL is only an upper value. Searches that failed: {'; '.join(failed)}.")
    if (inversions.larger == "bound").any():
        lines[-1] += (" An inversion against the certified bound is not a search failure: the certificate or the "
                      "KL evaluation is wrong on that target.")
    lines += ["", "| smaller set | larger set | targets compared | inversions | largest excess (nats) |",
              "|---|---|---:|---:|---:|"]
    lines += [f"| {r.smaller} | {r.larger} | {r.compared} | {r.inversions} | {_nats(r.max_excess)} |"
              for r in counts.itertuples()]
    kind = "kind" in inversions.columns
    entropy = "target_entropy" in inversions.columns
    shown = inversions.head(MAX_LISTED_INVERSIONS)
    first = f" (the first {len(shown)})" if len(shown) < len(inversions) else ""
    lines += ["", f"Inversions, per pair the largest first{first}:", "",
              "| smaller set | larger set | target_id | " + ("kind | " if kind else "")
              + ("entropy (nats) | " if entropy else "") + "KL smaller set | KL larger set | excess |",
              "|---|---|---:|" + ("---|" if kind else "") + ("---:|" if entropy else "") + "---:|---:|---:|"]
    for r in shown.itertuples():
        lines.append(f"| {r.smaller} | {r.larger} | {r.target_id} | " + (f"{r.kind} | " if kind else "")
                     + (f"{r.target_entropy:.2f} | " if entropy else "")
                     + f"{r.kl_smaller:.4f} | {r.kl_larger:.4f} | {r.excess:.4f} |")
    return lines


def prompt_length_table(results: pd.DataFrame, method: str = "soft") -> pd.DataFrame:
    """Per prompt length of `method` (runs labelled <method>-L<length>): n finite KLs, mean and its interval."""
    rows = []
    for label, group in results[results.method.str.match(rf"{method}-L\d+$")].groupby("method"):
        kl = group.kl.to_numpy(np.float64)
        kl = kl[np.isfinite(kl)]
        interval = mean_interval(kl)
        rows.append({"prompt_len": int(label.removeprefix(f"{method}-L")), "n": len(kl),
                     "mean": kl.mean() if len(kl) else np.nan, "ci_low": interval.low, "ci_high": interval.high,
                     "interval": interval.method})
    return pd.DataFrame(rows).sort_values("prompt_len", ignore_index=True)


def _prompt_length_section(results: pd.DataFrame, method: str, figures_dir: Path, figures_name: str) -> list[str]:
    table = prompt_length_table(results, method)
    what, axis, stem = LENGTH_METHODS[method]
    figures.plot_prompt_length(table, figures_dir / stem, xlabel=axis)
    lines = ["", f"## KL vs {what}", "", f"![KL vs {what}]({figures_name}/{stem}.png)",
             "", intervals_explained(), "", f"| L | targets | mean KL | {LEVEL:.0%} CI of the mean |",
             "|---:|---:|---:|---|"]
    lines += [f"| {r.prompt_len} | {r.n} | {r.mean:.4f} | {_interval_text(r)} |" for r in table.itertuples()]
    return lines


# -- command line -----------------------------------------------------------------------------------------


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report_command(flags.FLAGS.workdir)


def report_command(workdir) -> None:
    """`distprompt-report --workdir=DIR`: write the report and print its path; a problem ends the program with
    one line saying it (SystemExit)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReportLocationWarning)
            path = write_report(workdir)
        for warning in caught:
            if issubclass(warning.category, ReportLocationWarning):
                print(f"distprompt-report: {warning.message}", file=sys.stderr)
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        print(path)
    except (FileNotFoundError, ReportError) as err:
        raise SystemExit(f"distprompt-report: {err}") from None
    except OSError as err:  # a read-only workdir, a full disk: one line naming the path
        raise SystemExit(f"distprompt-report: cannot write the report: {os_error_message(err, workdir)}") from None


USAGE = """distprompt-report: (re)write the report of an experiment.

    distprompt-report --workdir=DIR

reads DIR/results.parquet and writes DIR/report.md with its figures in DIR/figures/ (distprompt-report.md and
distprompt-figures/ where those are files the package did not write).
"""


def run():
    from absl import app, flags

    from distprompt_jax.flag_help import show_in_help

    # Defined here, not at import: the experiment CLI imports this module and has its own --workdir.
    flags.DEFINE_string("workdir", None, "Run directory holding results.parquet.", required=True)
    show_in_help(USAGE, ["workdir"])
    app.run(main)
