"""Leaderboard statistics from tidy rows: intervals, verdicts, normalisation, rank stability."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from patchbench.bench.results import (
    ground_truth_check,
    leaderboard_tables,
    operator_agreement,
    render_markdown,
    summarise,
    wide_leaderboard,
)
from patchbench.metrics.stats import bootstrap_ci


def _scores(shifts: dict[str, float], n: int = 30, operators=("mean", "drop"), seed: int = 0,
            metric: str = "srg") -> pd.DataFrame:
    """Per-image rows: each method's score = a shared per-image value + its shift + noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    rows = []
    for op in operators:
        for method, shift in shifts.items():
            noise = rng.normal(scale=0.05, size=n)
            rows += [{"model": "m", "dataset": "d", "method": method, "operator": op, "metric": metric,
                      "sample_id": i, "value": base[i] + shift + noise[i]} for i in range(n)]
    return pd.DataFrame(rows)


def test_cells_hold_the_mean_and_the_bootstrap_interval_of_their_rows():
    scores = _scores({"a": 0.5, "b": 0.0})
    out = summarise(scores, n_boot=500, seed=3)
    cell = out[(out.method == "a") & (out.operator == "drop")].iloc[0]
    values = scores[(scores.method == "a") & (scores.operator == "drop")].value.to_numpy()
    assert cell["mean"] == pytest.approx(values.mean(), abs=1e-12) and cell.n == 30
    assert (cell.ci_low, cell.ci_high) == pytest.approx(bootstrap_ci(values, 0.95, 500, 3), abs=1e-12)


def test_verdicts_separate_real_differences_from_noise():
    # a is best; b differs from it by noise only; c is clearly worse on every image
    scores = _scores({"a": 0.30, "b": 0.29, "c": 0.0, "random": -0.5}, operators=("mean",))
    out = summarise(scores, control="random").set_index("method")
    assert out.loc["a", "verdict"] == "best" and np.isnan(out.loc["a", "p_vs_best"])
    assert out.loc["b", "verdict"] == "tie" and out.loc["b", "p_vs_best"] >= 0.05
    assert out.loc["c", "verdict"] == "worse" and out.loc["random", "verdict"] == "worse"
    # Holm: each adjusted p-value is at least the raw Wilcoxon p-value of that pair
    a = scores[scores.method == "a"].value.to_numpy()
    raw = stats.wilcoxon(a, scores[scores.method == "c"].value.to_numpy()).pvalue
    assert out.loc["c", "p_vs_best"] >= raw
    # normalised: random 0, best 1, linear in between
    mean = out["mean"]
    assert out.loc["random", "normalised"] == pytest.approx(0)
    assert out.loc["a", "normalised"] == pytest.approx(1)
    want = (mean["c"] - mean["random"]) / (mean["a"] - mean["random"])
    assert out.loc["c", "normalised"] == pytest.approx(want)


def test_lower_is_better_metrics_pick_the_lowest_mean_as_best():
    scores = _scores({"a": 0.3, "b": 0.0}, operators=("mean",), metric="deletion_prob_auc")
    out = summarise(scores).set_index("method")
    assert out.loc["b", "verdict"] == "best" and out.loc["a", "verdict"] == "worse"


def test_markdown_marks_best_bold_and_ties():
    scores = _scores({"a": 0.30, "b": 0.29, "c": 0.0}, operators=("mean",))
    md = render_markdown(summarise(scores))
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "**" in lines["a"] and lines["b"].split(" | ")[1].endswith("≈")
    assert "**" not in lines["c"] and "≈" not in lines["c"] and "SRG ↑" in md and "[" in md


def test_rank_agreement_between_operators():
    same = pd.concat([_scores({"a": 1.0, "b": 0.5, "c": 0.0}, operators=("mean",)),
                      _scores({"a": 1.0, "b": 0.5, "c": 0.0}, operators=("drop",), seed=1)])
    reversed_ = pd.concat([_scores({"a": 1.0, "b": 0.5, "c": 0.0}, operators=("mean",)),
                           _scores({"a": 0.0, "b": 0.5, "c": 1.0}, operators=("drop",), seed=1)])
    assert operator_agreement(summarise(same)).tau.item() == pytest.approx(1.0)
    agreement = operator_agreement(summarise(reversed_))
    assert agreement.tau.item() == pytest.approx(-1.0) and agreement.operators.item() == "mean vs drop"


def test_ground_truth_check_flags_a_metric_that_cannot_tell_the_mask_from_random():
    scores = _scores({"random": 0.0}, operators=("mean",))
    good = _scores({"ground-truth mask": 0.5}, operators=("mean",))
    blind = _scores({"ground-truth mask": 0.0}, operators=("mean",), seed=5)
    wrong_way = _scores({"ground-truth mask": -0.5}, operators=("mean",))
    assert ground_truth_check(good, scores, "random").verdict.tolist() == ["pass"]
    assert ground_truth_check(blind, scores, "random").verdict.tolist() == ["flag"]
    assert ground_truth_check(wrong_way, scores, "random").verdict.tolist() == ["flag"]
    assert ground_truth_check(good, scores, None).empty  # no chance control, no check
    flagged = ground_truth_check(blind, scores, "random")
    tables = leaderboard_tables(summarise(scores), flagged=flagged)
    assert "SRG ↑ [p] ⚠" in tables[0].header


def test_localisation_scores_get_their_own_table_and_rows():
    faith = _scores({"a": 0.3, "b": 0.0}, operators=("mean",))
    loc = _scores({"a": 0.3, "b": 0.0}, operators=("-",), metric="auroc")
    summary = summarise(pd.concat([faith, loc]))
    titles = [t.title for t in leaderboard_tables(summary)]
    assert titles == ["d · m · operator `mean`", "d · m · ground-truth localisation"]
    wide = wide_leaderboard(summary)
    assert wide[wide.operator == "-"].auroc.notna().all()
    assert wide[wide.operator == "mean"].srg.notna().all()
    assert {"srg_ci_low", "srg_ci_high", "srg_verdict", "auroc_verdict"} <= set(wide.columns)


def test_an_amortised_method_shows_its_setup_and_break_even():
    scores = _scores({"a": 0.3, "b": 0.2, "c": 0.1}, operators=("mean", "drop"))
    timing = pd.DataFrame([  # a: trained per operator (setup), b and c: per image
        {"dataset": "d", "method": "a", "operator": "mean", "ms_per_image": 2.0, "setup_seconds": 90.0,
         "images": 30},
        {"dataset": "d", "method": "a", "operator": "drop", "ms_per_image": 3.0, "setup_seconds": 60.0,
         "images": 30},
        {"dataset": "d", "method": "b", "operator": "", "ms_per_image": 50.0, "setup_seconds": np.nan,
         "images": 30},
        {"dataset": "d", "method": "c", "operator": "", "ms_per_image": 1.0, "setup_seconds": np.nan,
         "images": 30}])
    tables = {t.title.split("`")[1]: t for t in leaderboard_tables(summarise(scores), timing)}
    mean = tables["mean"]
    assert mean.header[-3:] == ["ms/img", "setup s", "amortised ms/img"]
    row = {r[0].value: r for r in mean.rows}
    assert [c.value for c in row["a"][-3:]] == [2.0, 90.0, 2.0 + 1000 * 90 / 30]
    assert [c.value for c in row["b"][-3:]] == [50.0, None, 50.0]
    # 90 s of setup saves 48 ms per image against b: paid back after ceil(90000 / 48) images
    assert "b after 1,875 images" in mean.notes[-1] and " c after" not in mean.notes[-1]
    assert [c.value for c in {r[0].value: r for r in tables["drop"].rows}["a"][-3:]] == [3.0, 60.0, 2003.0]
