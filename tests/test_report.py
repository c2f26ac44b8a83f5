"""The report from a small results file: figures, paired tests, prompt-length table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from distprompt_jax import report


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
                rows.append(dict(target_id=offset + i, method=method, model="m", recipe=recipe, kind=recipe,
                                 target_entropy=entropy[i], kl=kl, pair_target_id=-1 if pair < 0 else i,
                                 prompt_len=2 if method == "soft-L2" else 10, steps=100))
    return pd.DataFrame(rows)


def test_report_writes_figures_and_statistics(tmp_path):
    results = small_results()
    results.to_parquet(tmp_path / "results.parquet")
    path = report.write_report(tmp_path)
    text = path.read_text()
    for figure in ("kl_vs_entropy", "paired_outlier_vs_vanilla_soft", "kl_vs_prompt_length"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 5_000, figure
        assert (tmp_path / "figures" / f"{figure}.svg").is_file()
        assert f"figures/{figure}.png" in text
    # The paired test in the report is the Wilcoxon test on the paired KLs.
    soft = results[results.method == "soft"]
    expected = wilcoxon(soft.kl[soft.recipe == "outlier"].to_numpy(), soft.kl[soft.recipe == "vanilla"].to_numpy())
    assert f"p = {expected.pvalue:.3g}" in text
    found = report.paired_comparison(results, "soft", "vanilla")
    assert found["paired_with"] == "outlier" and found["n"] == 12 and found["wins"] <= 12
    assert "| 2 | 24 |" in text and "| 10 | 24 |" in text


def test_report_shows_the_bound_band(tmp_path):
    results = small_results()
    soft = results[results.method == "soft"]
    bound = soft.assign(method="bound", kl=soft.kl - 0.3, primal=soft.kl - 0.3, certified=True, prompt_len=0)
    pd.concat([soft, bound], ignore_index=True).to_parquet(tmp_path / "results.parquet")
    text = report.write_report(tmp_path).read_text()
    assert (tmp_path / "figures" / "bound_band.png").stat().st_size > 5_000
    assert "| soft | 24 | 24 |" in text and "0.3000 |" in text


def test_report_compares_soft_and_hard(tmp_path):
    results = small_results()
    soft = results[results.method == "soft"]
    hard = soft.assign(method="hard", kl=soft.kl + np.linspace(0.1, 0.5, len(soft)))
    pd.concat([soft, hard], ignore_index=True).to_parquet(tmp_path / "results.parquet")
    text = report.write_report(tmp_path).read_text()
    assert (tmp_path / "figures" / "soft_vs_hard.png").stat().st_size > 5_000
    expected = wilcoxon(hard.kl.to_numpy(), soft.kl.to_numpy())
    assert "hard is higher on 24 of 24" in text and f"p = {expected.pvalue:.3g}" in text


def test_bootstrap_interval_covers_the_mean():
    values = np.random.default_rng(1).standard_normal(200) + 3
    low, high = report.bootstrap_ci(values)
    assert low < values.mean() < high and high - low < 0.6


def test_report_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the experiment"):
        report.write_report(tmp_path)


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
