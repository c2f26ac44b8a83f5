"""The numbers a report states: binned means with intervals only where n supports one, paired tests with a
multiple-comparison correction, and each found KL beside the certified bound.

Honesty rules, each a named constant:
  - bins are chosen so that each holds at least `MIN_N_INTERVAL` targets (quantile bins: at most `MAX_BINS`,
    fewer for small runs; tied x values stay in one bin), and every table shows n per bin;
  - a mean gets no interval from fewer than `MIN_N_INTERVAL` values; a Student t interval from up to
    `MIN_N_BOOTSTRAP` - 1 values; a BCa bootstrap interval (scipy.stats.bootstrap) from `MIN_N_BOOTSTRAP` on.
    With ~3 values a percentile bootstrap "95% CI" is little more than [min, max].
  - paired tests are Wilcoxon signed-rank (two-sided), and the p values of all tests in one report are
    adjusted together (Benjamini-Hochberg, scipy.stats.false_discovery_control) and shown beside the raw p.
  - a gap to the certified bound (found KL − bound) is counted in fixed classes (`GAP_EDGES`), and only a gap of
    at most `SMALL_GAP` lets a number speak for the model rather than for the search.
  - the expressivity ladder (`LADDER`): the rungs' reachable sets nest, so a smaller set's rung below a larger
    set's by more than `RUNG_INVERSION_TOLERANCE` is counted as the larger set's search failing (an inversion),
    never as a finding; a gap between neighbouring rungs is "large" above `LARGE_RUNG_GAP`.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
MAX_BINS = 8
MIN_N_INTERVAL = 10  # fewer values: the mean is shown without an interval
MIN_N_BOOTSTRAP = 30  # from here on BCa bootstrap; below it (and from MIN_N_INTERVAL) Student t
# A line of bin means drawn without intervals (found vs bound, the ladder) follows the curve in finer bins: with
# bins of MIN_N_INTERVAL, 24 targets over an inverted U would be two points joined by a straight line.
LINE_BINS = 12
MIN_N_LINE = 3
BOOTSTRAP_RESAMPLES = 9999

BOUND_METHODS = ("bound", "bound_norm")  # rows that are bounds, not prompts
GAP_EDGES = (0.1, 0.5, 1.0)  # nats: a gap is counted as ≤ 0.1, in (0.1, 0.5], in (0.5, 1] or > 1
SMALL_GAP = GAP_EDGES[0]  # at most this far above the proven floor, the found KL speaks for the model
BELOW_BOUND_TOLERANCE = 1e-3  # nats: a found KL further below a proven floor is an error (float32 rounding is far less)
NO_GAP = "no gap"  # the bound is uncertified (or did not run for the target), or the found KL is NaN
# Fixed (not quantile) entropy bands, so that every method and every run is counted in the same bands.
ENTROPY_BAND_EDGES = (3.0, 6.0, 9.0)  # nats: [0, 3), [3, 6), [6, 9), ≥ 9
WORST_PER_METHOD = 10
# The expressivity ladder, smallest reachable set first: hard tokens ⊂ input-embedding soft prompts ⊂ prefix keys
# and values ⊂ any final-norm output (the final_norm rung, and bound_norm's search of the same set) ⊂ any hidden
# vector (the certified bound). Per target, up to search error, KL falls (or stays) down the ladder.
LADDER = ("hard", "soft", "prefix", "final_norm", "bound_norm", "bound")
# nats: a smaller set's rung this much below a larger set's on a target is an inversion: the larger set can reach
# whatever the smaller reaches, so its search failed there. Above float noise and the searches' own stopping
# tolerances (floor_tolerance 1e-3), below the gaps the ladder is read for.
RUNG_INVERSION_TOLERANCE = 0.05
LARGE_RUNG_GAP = 0.5  # nats: a median gap to the next rung above this is where the larger set pays off


@dataclasses.dataclass(frozen=True)
class Interval:
    """A confidence interval of a mean; `method` is "BCa", "t" or "none" (too few values: NaN bounds)."""

    low: float
    high: float
    method: str


def mean_interval(values, level: float = LEVEL, seed: int = 0) -> Interval:
    """Interval of the mean of the finite `values`, by the rule in the module docstring."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    n = len(values)
    if n < MIN_N_INTERVAL:
        return Interval(float("nan"), float("nan"), "none")
    mean = float(values.mean())
    if np.ptp(values) == 0:  # no spread: every resample and the t interval collapse onto the mean
        return Interval(mean, mean, "t")
    if n >= MIN_N_BOOTSTRAP:
        found = stats.bootstrap((values,), np.mean, confidence_level=level, method="BCa",
                                n_resamples=BOOTSTRAP_RESAMPLES, rng=np.random.default_rng(seed))
        low, high = found.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return Interval(float(low), float(high), "BCa")
    low, high = stats.t.interval(level, n - 1, loc=mean, scale=stats.sem(values))
    return Interval(float(low), float(high), "t")


def choose_bins(x, max_bins: int = MAX_BINS, min_per_bin: int = MIN_N_INTERVAL) -> np.ndarray:
    """Bin index of each value of `x` (-1 where not finite): k = min(max_bins, n // min_per_bin) (at least 1)
    consecutive ranges of the sorted values with about n / k values each (quantile bins); equal values always
    share a bin, and a bin that ties left short of `min_per_bin` joins its neighbour."""
    x = np.asarray(x, np.float64)
    bins = np.full(len(x), -1)
    finite = np.flatnonzero(np.isfinite(x))
    n = len(finite)
    if n == 0:
        return bins
    k = max(1, min(max_bins, n // max(min_per_bin, 1)))
    values, counts = np.unique(x[finite], return_counts=True)
    which = (np.cumsum(counts) - counts) * k // n  # by the rank of each distinct value's first occurrence
    while True:
        labels, first, sizes = np.unique(which, return_index=True, return_counts=True)
        sizes = np.add.reduceat(counts, first)
        short = np.flatnonzero(sizes < min_per_bin)
        if len(labels) == 1 or len(short) == 0:
            break
        i = short[0]
        which[which == labels[i]] = labels[i - 1] if i > 0 else labels[1]
    which = np.unique(which, return_inverse=True)[1]
    bins[finite] = which[np.searchsorted(values, x[finite])]
    return bins


def binned_summary(x, y, max_bins: int = MAX_BINS, min_per_bin: int = MIN_N_INTERVAL,
                   level: float = LEVEL) -> pd.DataFrame:
    """y summarized in bins of x (see `choose_bins`) over the pairs where both are finite.

    One row per bin: x_low / x_high (the range of its x values), x_mean (where to draw it), n, mean,
    median, and the mean's interval ci_low / ci_high / interval (see `mean_interval`).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    bins = choose_bins(x, max_bins, min_per_bin)
    rows = []
    for b in range(bins.max() + 1 if len(bins) else 0):
        xs, ys = x[bins == b], y[bins == b]
        interval = mean_interval(ys, level, seed=b)
        rows.append({"x_low": xs.min(), "x_high": xs.max(), "x_mean": xs.mean(), "n": len(ys), "mean": ys.mean(),
                     "median": np.median(ys), "ci_low": interval.low, "ci_high": interval.high,
                     "interval": interval.method})
    columns = ["x_low", "x_high", "x_mean", "n", "mean", "median", "ci_low", "ci_high", "interval"]
    return pd.DataFrame(rows, columns=columns)


def wilcoxon_test(first, second) -> tuple[float, float]:
    """(W, two-sided p) of the Wilcoxon signed-rank test on second − first; (0, 1) when all differences are 0."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if np.all(second == first):
        return 0.0, 1.0
    test = stats.wilcoxon(second, first)
    return float(test.statistic), float(test.pvalue)


def paired_comparison(results: pd.DataFrame, method: str, recipe: str) -> dict | None:
    """KL of `recipe`'s targets against the targets they were paired with (equal entropy), one method.

    Wilcoxon signed-rank test on the paired differences (two-sided), over the pairs whose KLs are both finite
    (`n_excluded` counts the others). None with fewer than 2 such pairs.
    """
    rows = results[results.method == method]
    paired = rows[(rows.recipe == recipe) & (rows.pair_target_id >= 0)]
    if paired.empty:
        return None
    partner = rows.set_index("target_id").loc[paired.pair_target_id.to_numpy()]
    mine, theirs = paired.kl.to_numpy(np.float64), partner.kl.to_numpy(np.float64)
    finite = np.isfinite(mine) & np.isfinite(theirs)
    if finite.sum() < 2:
        return None
    mine, theirs = mine[finite], theirs[finite]
    statistic, p_value = wilcoxon_test(mine, theirs)
    return {
        "method": method, "recipe": recipe, "paired_with": partner.recipe.iloc[0], "n": int(finite.sum()),
        "n_excluded": int((~finite).sum()), "median_kl": float(np.median(mine)),
        "median_kl_paired": float(np.median(theirs)), "median_difference": float(np.median(theirs - mine)),
        "wins": int(np.sum(theirs > mine)), "wilcoxon_statistic": statistic, "p_value": p_value,
    }


def method_comparison(results: pd.DataFrame, first: str, second: str) -> dict | None:
    """KL of two methods on the same targets: Wilcoxon signed-rank test on the per-target differences
    (targets where both KLs are finite; None with fewer than 2)."""
    a = results[results.method == first].set_index("target_id").kl
    b = results[results.method == second].set_index("target_id").kl
    common = a.index.intersection(b.index)
    a, b = a.loc[common].to_numpy(np.float64), b.loc[common].to_numpy(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    if finite.sum() < 2:
        return None
    a, b = a[finite], b[finite]
    statistic, p_value = wilcoxon_test(a, b)
    return {"first": first, "second": second, "n": int(finite.sum()), "n_excluded": int((~finite).sum()),
            "median_first": float(np.median(a)), "median_second": float(np.median(b)),
            "median_difference": float(np.median(b - a)), "second_higher": int(np.sum(b > a)),
            "wilcoxon_statistic": statistic, "p_value": p_value}


def adjust_p_values(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p values (false discovery rate) of tests reported together."""
    p_values = np.asarray(p_values, np.float64)
    return stats.false_discovery_control(p_values) if len(p_values) else p_values


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


def gap_rows(results: pd.DataFrame) -> pd.DataFrame | None:
    """One row per (target, prompt method) beside the certified bound; None when no bound ran (or only bounds).

    Columns: target_id, method, kind (if known), target_entropy, kl, kl_bound, gap_to_bound = kl − kl_bound, and
    where the norm estimate ran kl_bound_norm, gap_to_norm_bound. Results that carry kl_bound / gap_to_bound on
    their prompt rows (the sweep writes them) are taken as they are; older results get them from their bound
    rows through `kl_gap_table`.
    """
    if "bound" not in set(results["method"]):
        return None
    prompts = results[~results["method"].isin(BOUND_METHODS)]
    if prompts.empty:
        return None
    if {"kl_bound", "gap_to_bound"} <= set(results.columns):
        table = prompts
    else:
        bounds = results[results["method"].isin(BOUND_METHODS)]
        table = kl_gap_table(prompts, bounds).rename(columns={"kl_found": "kl"})
    columns = ("target_id", "method", "kind", "target_entropy", "kl", "kl_bound", "gap_to_bound", "kl_bound_norm",
               "gap_to_norm_bound")
    return table[[c for c in columns if c in table.columns]].reset_index(drop=True)


def gap_classes() -> list[str]:
    """The column names of `gap_counts`' classes, in order: ≤ 0.1, 0.1–0.5, 0.5–1, > 1, no gap."""
    middle = [f"{low:g}–{high:g}" for low, high in itertools.pairwise(GAP_EDGES)]
    return [f"≤ {GAP_EDGES[0]:g}", *middle, f"> {GAP_EDGES[-1]:g}", NO_GAP]


def gap_class(gap) -> np.ndarray:
    """The class (a `gap_classes` name) of each gap: upper edges belong to the lower class; +inf (a found KL
    that is inf) is "> 1"; NaN is "no gap"."""
    gap = np.asarray(gap, np.float64)
    index = np.searchsorted(GAP_EDGES, gap, side="left")
    return np.asarray(gap_classes(), dtype=object)[np.where(np.isnan(gap), len(GAP_EDGES) + 1, index)]


def entropy_band(entropy) -> pd.Categorical:
    """The `ENTROPY_BAND_EDGES` band of each target entropy, as ordered labels "0–3", "3–6", "6–9", "≥ 9"."""
    edges = (0.0, *ENTROPY_BAND_EDGES)
    labels = [f"{low:g}–{high:g}" for low, high in itertools.pairwise(edges)] + [f"≥ {edges[-1]:g}"]
    # -inf: an entropy a hair below 0 from rounding still lands in the first band.
    return pd.cut(np.asarray(entropy, np.float64), [-np.inf, *ENTROPY_BAND_EDGES, np.inf], right=False,
                  labels=labels)


def gap_counts(gaps: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Targets per `gap_classes` class in each group of `by` (columns of `gap_rows`' table, e.g. ["method"],
    ["method", "kind"]; categorical columns keep their order), with n ("targets"), and the median and 90th
    percentile of the finite gaps ("median_gap", "p90_gap"; NaN where none is finite)."""
    classes = gap_classes()
    rows = []
    for key, group in gaps.groupby(by, sort=True, observed=True):
        gap = group["gap_to_bound"].to_numpy(np.float64)
        found = pd.Series(gap_class(gap)).value_counts()
        finite = gap[np.isfinite(gap)]
        rows.append({**dict(zip(by, key)), "targets": len(group), **{c: int(found.get(c, 0)) for c in classes},
                     "median_gap": np.median(finite) if len(finite) else np.nan,
                     "p90_gap": np.percentile(finite, 90) if len(finite) else np.nan})
    return pd.DataFrame(rows, columns=[*by, "targets", *classes, "median_gap", "p90_gap"])


def worst_targets(gaps: pd.DataFrame, per_method: int = WORST_PER_METHOD) -> pd.DataFrame:
    """Per method the `per_method` targets with the largest gap to the bound, largest first (ties by
    target_id); targets without a gap are left out."""
    ranked = gaps[gaps["gap_to_bound"].notna()].sort_values(
        ["method", "gap_to_bound", "target_id"], ascending=[True, False, True], kind="stable")
    return ranked.groupby("method", sort=False).head(per_method).reset_index(drop=True)


def ladder_rungs(results: pd.DataFrame) -> list[str]:
    """The rungs of `LADDER` that ran (a method of `results`), smallest reachable set first."""
    present = set(results["method"])
    return [rung for rung in LADDER if rung in present]


def ladder_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per target (sorted by target_id): its KL under each rung that ran, one column per rung in ladder
    order (NaN where a rung has no finite value, as an uncertified bound), then kind and target_entropy where
    `results` has them."""
    rungs = ladder_rungs(results)
    rows = results[results["method"].isin(rungs)]
    if rows.duplicated(["target_id", "method"]).any():
        raise ValueError("several rows for one (target_id, method): a ladder compares one KL per rung and target")
    table = rows.pivot(index="target_id", columns="method", values="kl").reindex(columns=rungs).astype(np.float64)
    table.columns.name = None
    targets = results.drop_duplicates("target_id").set_index("target_id")
    for column in ("kind", "target_entropy"):
        if column in results.columns:
            table[column] = targets[column].reindex(table.index)
    return table.sort_index().reset_index()


def interior_norm_estimates(results: pd.DataFrame) -> tuple[int, int]:
    """(targets whose bound_norm solution lies inside the final norm's image, not on its surface; targets with
    a finite bound_norm and a known `on_boundary`). Every prompt's normed state lies on the surface (its
    residual stream is far larger than the norm's √ε), so on the first kind bound_norm — and the certified bound
    it then equals — can be below every prompt: the final_norm → bound_norm gap there is no search failure."""
    rows = results[results["method"] == "bound_norm"]
    if rows.empty or "on_boundary" not in rows.columns:
        return 0, 0
    known = rows[np.isfinite(rows["kl"].astype(np.float64)) & rows["on_boundary"].notna()]
    return int((~known["on_boundary"].astype(bool)).sum()), len(known)


def _target_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in ("target_id", "kind", "target_entropy") if c in table.columns]


def rung_gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Per target and each pair of neighbouring rungs of a `ladder_table` (the next larger set that ran): `upper`
    (the smaller set), `lower` (the larger), gap = KL(upper) − KL(lower), NaN where either is missing. Rows by
    pair in ladder order, then target."""
    rungs = [c for c in LADDER if c in table.columns]
    parts = []
    for upper, lower in itertools.pairwise(rungs):
        part = table[_target_columns(table)].copy()
        part.insert(1, "upper", upper)
        part.insert(2, "lower", lower)
        part["gap"] = table[upper] - table[lower]
        parts.append(part)
    columns = ["target_id", "upper", "lower", *_target_columns(table)[1:], "gap"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def rung_gap_table(table: pd.DataFrame) -> pd.DataFrame:
    """Where each rung's gap to the next is large: per neighbouring pair (in ladder order), target kind (where
    known) and `entropy_band`, the targets with a finite gap (`targets`), the median and 90th percentile gap, and
    how many exceed `LARGE_RUNG_GAP` (`large`); `is_large`: the median does."""
    gaps = rung_gaps(table)
    gaps = gaps[np.isfinite(gaps["gap"].to_numpy(np.float64))]
    pair_order = {pair: i for i, pair in enumerate(itertools.pairwise([c for c in LADDER if c in table.columns]))}
    gaps = gaps.assign(pair=[pair_order[pair] for pair in zip(gaps["upper"], gaps["lower"])],
                       entropy_band=entropy_band(gaps["target_entropy"]) if "target_entropy" in gaps else "all")
    by = ["pair", "upper", "lower", *(["kind"] if "kind" in gaps.columns else []), "entropy_band"]
    rows = []
    for key, group in gaps.groupby(by, sort=True, observed=True):
        gap = group["gap"].to_numpy(np.float64)
        median = float(np.median(gap))
        rows.append({**dict(zip(by, key)), "targets": len(gap), "median_gap": median,
                     "p90_gap": float(np.percentile(gap, 90)), "large": int(np.sum(gap > LARGE_RUNG_GAP)),
                     "is_large": median > LARGE_RUNG_GAP})
    columns = [*by[1:], "targets", "median_gap", "p90_gap", "large", "is_large"]
    return pd.DataFrame(rows, columns=["pair", *columns])[columns]


def rung_inversions(table: pd.DataFrame, tolerance: float = RUNG_INVERSION_TOLERANCE) -> pd.DataFrame:
    """Every (target, pair of rungs) of a `ladder_table` where the smaller set's rung (`smaller`) reached a KL more
    than `tolerance` below the larger set's (`larger`): the larger set's search failed there. All pairs count,
    not only neighbours (hard below prefix is prefix's failure too). Columns: target_id, smaller, larger, kind and
    target_entropy where known, kl_smaller, kl_larger, excess = kl_larger − kl_smaller; by pair in ladder order,
    then the largest excess first."""
    rungs = [c for c in LADDER if c in table.columns]
    parts = []
    for smaller, larger in itertools.combinations(rungs, 2):
        excess = table[larger] - table[smaller]
        part = table.loc[excess > tolerance, _target_columns(table)].copy()
        part.insert(1, "smaller", smaller)
        part.insert(2, "larger", larger)
        part["kl_smaller"] = table.loc[part.index, smaller]
        part["kl_larger"] = table.loc[part.index, larger]
        part["excess"] = excess[part.index]
        parts.append(part.sort_values(["excess", "target_id"], ascending=[False, True], kind="stable"))
    columns = ["target_id", "smaller", "larger", *_target_columns(table)[1:], "kl_smaller", "kl_larger", "excess"]
    found = [p for p in parts if not p.empty]
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=columns)


def inversion_counts(table: pd.DataFrame, tolerance: float = RUNG_INVERSION_TOLERANCE) -> pd.DataFrame:
    """Per pair of rungs (smaller set first, pairs in ladder order): the targets where both have a KL
    (`compared`; an infinite KL of the larger set is its search failing too), the inversions among them (see
    `rung_inversions`) and the largest excess (NaN with none)."""
    rungs = [c for c in LADDER if c in table.columns]
    inversions = rung_inversions(table, tolerance)
    rows = []
    for smaller, larger in itertools.combinations(rungs, 2):
        compared = int((table[smaller].notna() & table[larger].notna()).sum())
        mine = inversions[(inversions["smaller"] == smaller) & (inversions["larger"] == larger)]
        rows.append({"smaller": smaller, "larger": larger, "compared": compared, "inversions": len(mine),
                     "max_excess": float(mine["excess"].max()) if len(mine) else np.nan})
    return pd.DataFrame(rows, columns=["smaller", "larger", "compared", "inversions", "max_excess"])
