"""The report from a small results file: figures, honest intervals, corrected paired tests, and never over the
user's own files."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.stats import false_discovery_control, wilcoxon

from distprompt_jax import report
from distprompt_jax.report import statistics


def small_results() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 12
    entropy = np.linspace(0, 10, n)
    rows = []
    for method in ("soft", "soft-L2", "soft-L10"):
        for recipe, offset, pair in (("outlier", 0, -1), ("vanilla", n, 0)):
            for i in range(n):
                kl = 0.5 + 0.1 * rng.standard_normal() + (0.3 if recipe == "vanilla" else 0.0)
                kl += 0.2 if method == "soft-L2" else 0.0
                rows.append({"target_id": offset + i, "method": method, "model": "m", "recipe": recipe,
                             "kind": recipe, "target_entropy": entropy[i], "kl": kl,
                             "pair_target_id": -1 if pair < 0 else i, "prompt_len": 2 if method == "soft-L2" else 10,
                             "steps": 100})
    return pd.DataFrame(rows)


def test_report_writes_figures_and_statistics(tmp_path):
    results = small_results()
    results.to_parquet(tmp_path / "results.parquet")
    path = report.write_report(tmp_path)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    for figure in ("kl_vs_entropy", "paired_outlier_vs_vanilla_soft", "kl_vs_prompt_length"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 5_000, figure
        assert (tmp_path / "figures" / f"{figure}.svg").is_file()
        assert f"figures/{figure}.png" in text
    # The paired tests in the report are Wilcoxon tests on the paired KLs, one per method, and their p values
    # are adjusted together.
    raw = []
    for method in ("soft", "soft-L10", "soft-L2"):
        rows = results[results.method == method]
        raw.append(wilcoxon(rows.kl[rows.recipe == "outlier"].to_numpy(),
                            rows.kl[rows.recipe == "vanilla"].to_numpy()).pvalue)
        assert f"p = {raw[-1]:.3g}" in text
    for p_adj in false_discovery_control(raw):
        assert f"adjusted over the 3 tests of this report: p_adj = {p_adj:.3g}" in text
    found = report.paired_comparison(results, "soft", "vanilla")
    assert found["paired_with"] == "outlier" and found["n"] == 12 and found["wins"] <= 12
    assert "| 2 | 24 |" in text and "| 10 | 24 |" in text
    # 24 targets per method, two at each entropy (pairs): two entropy bins of 12, t intervals, n shown.
    assert text.count("| soft | ") == 3  # two bins and the summary row
    assert "| soft | 0.00–4.55 | 12 |" in text and "| soft | 5.45–10.00 | 12 |" in text and "(t) |" in text
    assert "Student t where 10 ≤ n < 30" in text and "none where n < 10" in text


def with_bound(results: pd.DataFrame, gaps) -> pd.DataFrame:
    """The soft rows of `results` and, as an older sweep wrote it, a certified bound `gaps` below each found KL
    (a NaN gap: that target's bound is uncertified)."""
    soft = results[results.method == "soft"].reset_index(drop=True)
    gaps = np.asarray(gaps, np.float64)
    bound_kl = soft.kl.to_numpy() - gaps
    bound = soft.assign(method="bound", kl=bound_kl, primal=soft.kl - np.nan_to_num(gaps, nan=0.5),
                        certified=np.isfinite(gaps), prompt_len=0)
    return pd.concat([soft, bound], ignore_index=True)


def with_gap_columns(results: pd.DataFrame) -> pd.DataFrame:
    """`results` as the sweep writes them now: kl_bound and gap_to_bound on every row."""
    bound = results[results.method == "bound"].set_index("target_id").kl
    kl_bound = results.target_id.map(bound).to_numpy()
    return results.assign(kl_bound=kl_bound, gap_to_bound=results.kl - kl_bound)


def first_figure(text: str) -> str:
    return text[text.index("](figures/") + len("](figures/"):].split(")")[0]


def test_report_opens_with_found_kl_against_the_bound(tmp_path):
    gaps = np.r_[0.05, 0.3, 0.7, 2.0, np.nan, np.linspace(0.01, 0.09, 19)]  # 24 soft targets
    with_gap_columns(with_bound(small_results(), gaps)).to_parquet(tmp_path / "results.parquet")
    text = report.write_report(tmp_path).read_text()
    assert first_figure(text) == "found_vs_bound.png"
    assert (tmp_path / "figures" / "found_vs_bound.png").stat().st_size > 5_000
    assert (tmp_path / "figures" / "found_vs_bound.svg").is_file()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings[:5] == ["# Report: m, 24 targets", "## Found KL against the certified bound",
                            "### Targets by gap to the bound", "### Largest gaps", "## KL against target entropy"]
    finite = gaps[np.isfinite(gaps)]
    # 19 small gaps and the 0.05: 20 of 24 targets may speak for the model.
    assert "Targets with a gap ≤ 0.1: soft 20 of 24 (83%)" in text
    assert (f"| soft | 24 | 20 | 1 | 1 | 1 | 1 | {np.median(finite):.4f} | {np.percentile(finite, 90):.4f} |"
            in text)
    assert "| soft | outlier | 12 | " in text and "| soft | 0–3 | " in text
    worst = [line for line in text.split("### Largest gaps")[1].split("##")[0].splitlines()
             if line.startswith("| soft |")]
    assert len(worst) == 10 and [float(line.split("|")[-2]) for line in worst[:3]] == [2.0, 0.7, 0.3]
    assert "Warning" not in text


def test_the_found_vs_bound_lines_follow_an_inverted_u_of_24_targets(tmp_path, monkeypatch):
    """Over 24 targets the bound rises and falls with entropy; its line must too, not join two bins."""
    entropy = np.linspace(0, 10.8, 24)
    bound = 3.7 * np.sin(np.pi * entropy / 10.8)
    gaps = pd.DataFrame({"target_id": np.arange(24), "method": "soft", "target_entropy": entropy,
                         "kl": bound + 0.4, "kl_bound": bound})
    drawn = []
    monkeypatch.setattr(report.figures, "save_figure", lambda fig, stem: drawn.append(fig) or [])
    report.figures.plot_found_vs_bound(gaps, tmp_path / "f")
    lines = {line.get_label(): line.get_ydata() for line in drawn[0].axes[0].get_lines()}
    import matplotlib.pyplot as plt
    plt.close(drawn[0])  # save_figure, which closes it, was replaced
    floor, found = lines["certified bound (floor)"], lines["soft: found KL"]
    assert len(floor) == len(found) == 8  # 8 bins of 3 targets
    top = int(np.argmax(floor))
    assert 0 < top < 7 and floor[0] < 0.5 * floor[top] and floor[-1] < 0.5 * floor[top]
    np.testing.assert_allclose(found - floor, 0.4, rtol=1e-9)


def test_old_results_without_gap_columns_get_the_same_report(tmp_path):
    old = with_bound(small_results(), np.linspace(0.0, 1.5, 24))
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old.to_parquet(tmp_path / "old" / "results.parquet")
    with_gap_columns(old).to_parquet(tmp_path / "new" / "results.parquet")
    text = report.write_report(tmp_path / "old").read_text()
    assert first_figure(text) == "found_vs_bound.png" and "### Targets by gap to the bound" in text
    assert text == report.write_report(tmp_path / "new").read_text()


def test_a_found_kl_below_the_proven_floor_is_flagged(tmp_path):
    with_bound(small_results(), np.r_[-0.01, np.full(23, 0.2)]).to_parquet(tmp_path / "results.parquet")
    text = report.write_report(tmp_path).read_text()
    assert "**Warning:** on 1 (target, method) pair(s) the found KL lies more than 0.001 nats below" in text
    assert "(soft 0)" in text


def test_a_run_without_a_bound_has_no_gap_sections(tmp_path):
    small_results().to_parquet(tmp_path / "results.parquet")
    text = report.write_report(tmp_path).read_text()
    assert first_figure(text) == "kl_vs_entropy.png"
    assert "gap" not in text.lower() and "certified" not in text
    assert not (tmp_path / "figures" / "found_vs_bound.png").exists()
    # A sweep that writes the gap columns but ran no bound: all NaN, still no gap sections.
    results = small_results().assign(kl_bound=np.nan, gap_to_bound=np.nan)
    results.to_parquet(tmp_path / "results.parquet")
    assert "gap" not in report.write_report(tmp_path).read_text().lower()


def test_gaps_are_counted_once_each_in_their_class():
    gap = [0.05, 0.3, 0.7, 2.0, np.nan, 0.1, 0.5, 1.0, np.inf, -0.2]
    assert list(statistics.gap_class(gap)) == ["≤ 0.1", "0.1–0.5", "0.5–1", "> 1", "no gap", "≤ 0.1", "0.1–0.5",
                                               "0.5–1", "> 1", "≤ 0.1"]
    gaps = pd.DataFrame({"method": ["soft"] * 5 + ["hard"] * 5, "kind": ["vanilla", "outlier"] * 5,
                         "gap_to_bound": gap})
    table = statistics.gap_counts(gaps, ["method"]).set_index("method")
    assert list(table.columns) == ["targets", "≤ 0.1", "0.1–0.5", "0.5–1", "> 1", "no gap", "median_gap", "p90_gap"]
    assert table.loc["soft", ["targets", "≤ 0.1", "0.1–0.5", "0.5–1", "> 1", "no gap"]].tolist() == [5, 1, 1, 1, 1, 1]
    assert table.loc["hard", ["≤ 0.1", "0.1–0.5", "0.5–1", "> 1", "no gap"]].tolist() == [2, 1, 1, 1, 0]
    assert table.loc["soft", "median_gap"] == pytest.approx(0.5)  # of 0.05, 0.3, 0.7, 2.0
    assert table.loc["soft", "p90_gap"] == pytest.approx(np.percentile([0.05, 0.3, 0.7, 2.0], 90))
    by_kind = statistics.gap_counts(gaps, ["method", "kind"])
    assert by_kind[["method", "kind"]].values.tolist() == [["hard", "outlier"], ["hard", "vanilla"],
                                                           ["soft", "outlier"], ["soft", "vanilla"]]
    assert by_kind.targets.sum() == 10 and (by_kind[statistics.gap_classes()].sum(axis=1) == by_kind.targets).all()


def test_entropy_bands_are_fixed_and_ordered():
    entropy = [-1e-9, 0.0, 2.99, 3.0, 8.99, 9.0, 11.9]
    assert list(statistics.entropy_band(entropy)) == ["0–3", "0–3", "0–3", "3–6", "6–9", "≥ 9", "≥ 9"]
    gaps = pd.DataFrame({"method": "soft", "gap_to_bound": 0.2,
                         "entropy_band": statistics.entropy_band([10.0, 1.0, 4.0, 7.0, 1.5])})
    table = statistics.gap_counts(gaps, ["method", "entropy_band"])
    assert table.entropy_band.tolist() == ["0–3", "3–6", "6–9", "≥ 9"] and table.targets.tolist() == [2, 1, 1, 1]


def test_worst_targets_are_the_largest_gaps_in_order():
    rng = np.random.default_rng(2)
    gap = rng.exponential(size=30)
    gap[[3, 7]] = np.nan
    gaps = pd.DataFrame({"target_id": np.tile(np.arange(15), 2), "method": ["soft"] * 15 + ["hard"] * 15,
                         "gap_to_bound": gap})
    worst = statistics.worst_targets(gaps, per_method=10)
    assert worst.method.tolist() == ["hard"] * 10 + ["soft"] * 10
    for method, rows in worst.groupby("method"):
        everything = gaps[gaps.method == method].gap_to_bound.dropna().sort_values(ascending=False)
        assert rows.gap_to_bound.tolist() == everything.head(10).tolist()
    assert statistics.worst_targets(gaps, per_method=20).groupby("method").size().to_dict() == {"hard": 15,
                                                                                               "soft": 13}


def test_report_compares_soft_and_hard(tmp_path):
    results = small_results()
    soft = results[results.method == "soft"]
    hard = soft.assign(method="hard", kl=soft.kl + np.linspace(0.1, 0.5, len(soft)))
    pd.concat([soft, hard], ignore_index=True).to_parquet(tmp_path / "results.parquet")
    text = report.write_report(tmp_path).read_text()
    assert (tmp_path / "figures" / "soft_vs_hard.png").stat().st_size > 5_000
    expected = wilcoxon(hard.kl.to_numpy(), soft.kl.to_numpy())
    assert "hard is higher on 24 of 24" in text and f"p = {expected.pvalue:.3g}" in text


def test_intervals_only_where_n_allows_and_by_the_stated_method():
    rng = np.random.default_rng(1)
    few = rng.exponential(size=report.MIN_N_INTERVAL - 1)
    assert report.mean_interval(few).method == "none" and np.isnan(report.mean_interval(few).low)
    some = rng.exponential(size=20)
    found = report.mean_interval(some)
    expected = stats.t.interval(0.95, len(some) - 1, loc=some.mean(), scale=stats.sem(some))
    assert found.method == "t" and np.allclose((found.low, found.high), expected, rtol=1e-12)
    many = rng.exponential(size=200)
    found = report.mean_interval(many, seed=3)
    expected = stats.bootstrap((many,), np.mean, method="BCa", rng=np.random.default_rng(3)).confidence_interval
    assert found.method == "BCa" and (found.low, found.high) == (expected.low, expected.high)
    assert found.low < many.mean() < found.high and found.high - found.low < 0.4
    flat = report.mean_interval(np.full(40, 2.5))
    assert (flat.low, flat.high) == (2.5, 2.5)
    assert report.mean_interval(np.r_[some, np.nan, np.inf]) == report.mean_interval(some)


def test_bins_hold_enough_targets_for_an_interval():
    rng = np.random.default_rng(0)
    for n in (3, 9, 10, 24, 64, 1000):
        x = rng.uniform(0, 10, n)
        bins = report.choose_bins(x)
        counts = np.bincount(bins)
        assert counts.sum() == n and len(counts) <= 8
        assert len(counts) == 1 or counts.min() >= report.MIN_N_INTERVAL, (n, counts)
        # Bins are consecutive in x.
        order = np.argsort(x)
        assert (np.diff(bins[order]) >= 0).all()
    assert len(np.bincount(report.choose_bins(rng.uniform(size=1000)))) == 8
    # Equal x values (paired recipes share entropies) are never split.
    x = np.repeat(np.arange(6.0), 7)
    bins = report.choose_bins(x)
    assert all(len(set(bins[x == v])) == 1 for v in np.unique(x))
    assert list(report.choose_bins([np.nan, 1.0, 2.0])) == [-1, 0, 0]


def test_binned_summary_states_n_and_gives_no_interval_below_the_minimum():
    x = np.linspace(0, 10, 24)
    y = np.sin(x) + 2
    y[5] = np.nan  # not finite: left out
    table = report.binned_summary(x, y)
    assert table.n.tolist() == [12, 11] and table.n.sum() == 23
    assert (table.interval == "t").all() and (table.ci_low < table["mean"]).all()
    first = np.delete(y[:13], 5)
    assert np.isclose(table["mean"][0], first.mean()) and np.isclose(table["median"][0], np.median(first))
    assert (table.x_low[0], table.x_high[0]) == (x[0], x[12])
    small = report.binned_summary(x[:3], y[:3])
    assert small.n.tolist() == [3] and small.interval.tolist() == ["none"] and small.ci_low.isna().all()
    assert len(report.binned_summary(x, y, min_per_bin=1)) == 8


def test_p_values_are_adjusted_together():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(report.adjust_p_values(p), false_discovery_control(p))
    assert report.adjust_p_values([]).shape == (0,)


def test_report_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the experiment"):
        report.write_report(tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    (b"\x00garbage\xff" * 100, "is not a readable parquet results file"),
    ("missing_column", r"lacks the column\(s\) \['kl'\]"),
    ("no_rows", "has no rows"),
])
def test_bad_results_files_are_named_and_explained(tmp_path, content, message):
    path = tmp_path / "results.parquet"
    if content == "missing_column":
        small_results().drop(columns="kl").to_parquet(path)
    elif content == "no_rows":
        small_results().iloc[:0].to_parquet(path)
    else:
        path.write_bytes(content)
    with pytest.raises(report.ReportError, match=message) as error:
        report.write_report(tmp_path)
    assert str(path) in str(error.value)
    assert not (tmp_path / "report.md").exists()
    result = subprocess.run([sys.executable, "-m", "distprompt_jax.report", f"--workdir={tmp_path}"],
                            capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
    assert result.returncode != 0 and str(path) in result.stderr and "Traceback" not in result.stderr


def test_the_users_report_and_figures_are_never_overwritten(tmp_path):
    small_results().to_parquet(tmp_path / "results.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", report.ReportLocationWarning)
        assert report.write_report(tmp_path) == tmp_path / "report.md"
        ours = (tmp_path / "report.md").read_text()
        assert report.write_report(tmp_path) == tmp_path / "report.md"  # its own files: rewritten silently
    assert (tmp_path / "report.md").read_text() == ours

    (tmp_path / "report.md").write_text(ours + "\nmy notes\n")  # edited by the user: now theirs
    with pytest.warns(report.ReportLocationWarning, match="distprompt-report.md"):
        path = report.write_report(tmp_path)
    assert path == tmp_path / "distprompt-report.md"
    assert (tmp_path / "report.md").read_text().endswith("my notes\n")
    assert "distprompt-figures/kl_vs_entropy.png" in path.read_text()
    assert (tmp_path / "distprompt-figures" / "kl_vs_entropy.png").is_file()
    with pytest.warns(report.ReportLocationWarning):
        assert report.write_report(tmp_path) == path  # and again: the second location is its own

    user = tmp_path / "user"
    user.mkdir()
    small_results().to_parquet(user / "results.parquet")
    (user / "figures").mkdir()
    (user / "figures" / "kl_vs_entropy.png").write_bytes(b"my figure")
    (user / "distprompt-report.md").write_text("also mine")
    with pytest.raises(report.ReportError, match="holds files distprompt did not write"):
        report.write_report(user)
    assert (user / "figures" / "kl_vs_entropy.png").read_bytes() == b"my figure"
    assert (user / "distprompt-report.md").read_text() == "also mine" and not (user / "report.md").exists()


def test_figures_of_an_earlier_report_that_are_no_longer_drawn_are_removed(tmp_path):
    results = small_results()
    soft = results[results.method == "soft"]
    hard = soft.assign(method="hard", kl=soft.kl + 0.1)
    pd.concat([soft, hard], ignore_index=True).to_parquet(tmp_path / "results.parquet")
    report.write_report(tmp_path)
    assert (tmp_path / "figures" / "soft_vs_hard.png").is_file()
    (tmp_path / "figures" / "notes.txt").write_text("mine")
    soft.to_parquet(tmp_path / "results.parquet")
    with pytest.warns(report.ReportLocationWarning):  # figures/notes.txt is the user's
        report.write_report(tmp_path)
    (tmp_path / "figures" / "notes.txt").unlink()
    report.write_report(tmp_path)
    assert not (tmp_path / "figures" / "soft_vs_hard.png").exists()
    assert (tmp_path / "figures" / "kl_vs_entropy.png").is_file()


def test_gap_table_and_band_figure(tmp_path):
    bound = pd.DataFrame({
        "target_id": [0, 1, 2], "method": "bound", "kl": [0.1, np.nan, 0.0], "primal": [0.1, 0.5, 0.0],
        "gap": [1e-8, 0.4, 0.0], "certified": [True, False, True], "target_entropy": [1.0, 2.0, 3.0],
        "kind": "vanilla",
    })
    norm = pd.DataFrame({"target_id": [0, 1, 2], "method": "bound_norm", "kl": [0.2, 0.6, 0.1]})
    found = pd.DataFrame({"target_id": [0, 1, 2, 0, 1, 2], "method": ["soft"] * 3 + ["hard"] * 3,
                          "kl": [0.3, 0.7, 0.1, 0.9, 1.0, 0.5]})
    table = report.kl_gap_table(found, pd.concat([bound, norm]))
    assert len(table) == 6
    soft = table[table.method == "soft"].set_index("target_id")
    np.testing.assert_allclose(soft.gap_to_bound, [0.2, np.nan, 0.1])
    np.testing.assert_allclose(soft.gap_to_norm_bound, [0.1, 0.1, 0.0], atol=1e-12)
    np.testing.assert_allclose(soft.target_entropy, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="no bound for target_id"):
        report.kl_gap_table(pd.DataFrame({"target_id": [7], "method": ["soft"], "kl": [1.0]}), bound)
    with pytest.raises(ValueError, match="no rows with method 'bound'"):
        report.kl_gap_table(found, norm)
    paths = report.plot_bound_band(found, bound, tmp_path / "band.png")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)


# --- the expressivity ladder -----------------------------------------------------------------------------


def ladder_results(kls: dict[str, list[float]], kinds=None, entropies=None) -> pd.DataFrame:
    """Result rows of the rungs in `kls` (method -> KL per target), as the sweep writes them."""
    n = len(next(iter(kls.values())))
    kinds = kinds or ["vanilla"] * n
    entropies = entropies if entropies is not None else np.linspace(0.5, 10.0, n)
    rows = [{"target_id": i, "method": method, "model": "m", "kind": kinds[i], "target_entropy": entropies[i],
             "kl": kl, "primal": kl, "certified": np.isfinite(kl)}
            for method, values in kls.items() for i, kl in enumerate(values)]
    return pd.DataFrame(rows)


def test_the_ladder_table_puts_the_rungs_in_ladder_order():
    results = ladder_results({"bound": [0.1, np.nan], "soft-L2": [9.0, 9.0], "prefix": [0.5, 0.6],
                              "hard": [2.0, 3.0], "soft": [1.0, 1.5]})
    assert statistics.ladder_rungs(results) == ["hard", "soft", "prefix", "bound"]
    table = statistics.ladder_table(results)
    assert list(table.columns) == ["target_id", "hard", "soft", "prefix", "bound", "kind", "target_entropy"]
    np.testing.assert_array_equal(table.soft, [1.0, 1.5])
    assert np.isnan(table.bound[1])
    with pytest.raises(ValueError, match="several rows for one"):
        statistics.ladder_table(pd.concat([results, results.head(1)]))


def test_rung_inversions_are_counted_per_pair_and_listed_largest_first():
    tolerance = statistics.RUNG_INVERSION_TOLERANCE
    # target 0: prefix is 0.2 above soft and 0.1 above hard: prefix's search failed against both.
    # target 1: soft is 0.04 above hard (within the tolerance) and final_norm 0.06 above prefix: one inversion.
    # target 2: in order; target 3: bound_norm missing (not compared against it), soft 0.3 above hard.
    results = ladder_results({
        "hard": [1.1, 1.00, 2.0, 1.0],
        "soft": [1.0, 1.04, 1.5, 1.3],
        "prefix": [1.2, 0.50, 1.0, 0.9],
        "final_norm": [0.9, 0.56, 0.8, 0.8],
        "bound_norm": [0.8, 0.40, 0.7, np.nan],
    })
    table = statistics.ladder_table(results)
    found = statistics.rung_inversions(table)
    assert found[["target_id", "smaller", "larger"]].values.tolist() == [
        [3, "hard", "soft"], [0, "hard", "prefix"], [0, "soft", "prefix"], [1, "prefix", "final_norm"]]
    np.testing.assert_allclose(found.excess, [0.3, 0.1, 0.2, 0.06])
    assert (found.excess > tolerance).all()
    np.testing.assert_allclose(found.kl_larger - found.kl_smaller, found.excess)
    counts = statistics.inversion_counts(table).set_index(["smaller", "larger"])
    assert len(counts) == 10  # every pair of the five rungs
    assert counts.loc[("hard", "soft")].tolist()[:2] == [4, 1]
    assert counts.loc[("soft", "prefix")].tolist()[:2] == [4, 1]
    assert counts.loc[("final_norm", "bound_norm")].tolist()[:2] == [3, 0]
    assert counts.inversions.sum() == len(found) == 4
    assert np.isnan(counts.loc[("prefix", "bound_norm"), "max_excess"])
    # A looser tolerance forgives the small ones.
    assert statistics.rung_inversions(table, tolerance=0.15).excess.tolist() == pytest.approx([0.3, 0.2])


def test_rung_gaps_are_between_neighbouring_rungs_per_kind_and_band():
    kinds = ["vanilla", "vanilla", "vanilla", "model"]
    results = ladder_results({"soft": [3.0, 2.0, 1.0, 0.5], "final_norm": [1.0, 1.5, 0.9, 0.5],
                              "bound": [0.5, np.nan, 0.8, 0.5]}, kinds=kinds, entropies=[1.0, 2.0, 4.0, 4.5])
    table = statistics.ladder_table(results)
    gaps = statistics.rung_gaps(table)
    # prefix did not run: soft's next rung is final_norm.
    assert sorted(set(zip(gaps.upper, gaps.lower))) == [("final_norm", "bound"), ("soft", "final_norm")]
    summary = statistics.rung_gap_table(table)
    rows = {(r.upper, r.lower, r.kind, str(r.entropy_band)): r for r in summary.itertuples()}
    soft_low = rows[("soft", "final_norm", "vanilla", "0–3")]
    assert soft_low.targets == 2 and soft_low.median_gap == 1.25 and soft_low.large == 1 and soft_low.is_large
    assert rows[("soft", "final_norm", "vanilla", "3–6")].median_gap == pytest.approx(0.1)
    assert not rows[("soft", "final_norm", "model", "3–6")].is_large
    # The uncertified bound of target 1 leaves it out of final_norm → bound.
    assert rows[("final_norm", "bound", "vanilla", "0–3")].targets == 1
    assert list(summary.upper[:3]) == ["soft"] * 3  # pairs in ladder order


def test_the_report_draws_the_ladder_and_names_the_inversions(tmp_path):
    n = 12
    rng = np.random.default_rng(1)
    bound = rng.uniform(0.0, 1.0, n)
    kls = {"bound": bound, "bound_norm": bound + 0.1, "final_norm": bound + 0.2, "prefix": bound + 0.5,
           "soft": bound + 1.0, "hard": bound + 2.0}
    kls["prefix"][3] = kls["soft"][3] + 0.4  # prefix's search failed on target 3
    results = ladder_results({k: list(v) for k, v in kls.items()})
    results.to_parquet(tmp_path / "results.parquet")
    text = report.write_report(tmp_path).read_text()
    assert "## The expressivity ladder" in text and "figures/ladder.png" in text
    assert (tmp_path / "figures" / "ladder.png").stat().st_size > 5_000
    assert "**1 rung inversion(s) on 1 target(s)**" in text and "Searches that failed: prefix on 1 target(s)" in text
    assert "| soft | prefix | 12 | 1 | 0.4000 |" in text
    assert "| soft | prefix | 3 | vanilla |" in text
    # Three targets in the first entropy band: hard is 1 nat above soft (large, in bold), final_norm 0.1 above
    # bound_norm (not).
    assert "| hard → soft | vanilla | 0–3 | 3 | **1.0000** | 1.0000 | 3 |" in text
    assert "| final_norm → bound_norm | vanilla | 0–3 | 3 | 0.1000 | 0.1000 | 0 |" in text
    assert "inside the final norm's image" not in text  # these rows say nothing of where bound_norm's point is
    # bound_norm's point off the surface on two targets: said, with the count of targets where it is known.
    with_boundary = ladder_results({k: list(v) for k, v in kls.items()})
    norm_rows = with_boundary.method == "bound_norm"
    with_boundary.loc[norm_rows, "on_boundary"] = [i not in (4, 7) for i in range(n)]
    with_boundary.to_parquet(tmp_path / "results.parquet")
    assert ("bound_norm's best point lies inside the final norm's image, not on its surface, on 2 of 12 targets"
            in report.write_report(tmp_path).read_text())
    # In order everywhere: no inversion, said in words.
    kls["prefix"][3] = bound[3] + 0.5
    ladder_results({k: list(v) for k, v in kls.items()}).to_parquet(tmp_path / "results.parquet")
    text = report.write_report(tmp_path).read_text()
    assert "**No rung inversions**" in text and "(15 pairs)" in text
    # One search beside the bound: the bound section is its ladder, no second one.
    ladder_results({"soft": list(kls["soft"]), "bound": list(bound)}).to_parquet(tmp_path / "results.parquet")
    assert "expressivity ladder" not in report.write_report(tmp_path).read_text()
