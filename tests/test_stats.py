"""The statistics against slow, obviously correct references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from patchbench.metrics.stats import bootstrap_ci, holm, normalise, paired_test, rank_agreement


def test_bootstrap_equals_a_plain_loop_over_the_same_draws():
    values = np.random.default_rng(1).normal(size=25)
    rng = np.random.default_rng(7)
    means = [values[rng.integers(0, 25, size=25)].mean() for _ in range(500)]
    expected = tuple(np.quantile(means, [0.025, 0.975]))
    assert bootstrap_ci(values, n_boot=500, seed=7) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(300):
        low, high = bootstrap_ci(rng.normal(loc=2.0, size=40), n_boot=1000, seed=trial)
        hits += low <= 2.0 <= high
    assert 0.90 <= hits / 300 <= 0.98  # the percentile bootstrap runs a little narrow at n = 40


def test_bootstrap_of_too_few_values_is_undefined():
    assert all(np.isnan(bootstrap_ci(np.array([1.0]))))


def _exact_wilcoxon(a, b):
    """All 2^n sign assignments of the ranked differences: the exact two-sided p-value."""
    d = np.asarray(a) - np.asarray(b)
    d = d[d != 0]
    ranks = np.argsort(np.argsort(np.abs(d))) + 1.0  # no ties in the test data
    t_plus = ranks[d > 0].sum()
    sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in
                     itertools.product([0, 1], repeat=len(d))])
    return min(1.0, 2 * min((sums <= t_plus).mean(), (sums >= t_plus).mean()))


@pytest.mark.parametrize("seed", range(4))
def test_paired_test_equals_the_exact_distribution(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=10)
    b = a + rng.normal(loc=0.4 * seed, size=10)
    assert paired_test(a, b) == pytest.approx(_exact_wilcoxon(a, b), rel=1e-9)


@pytest.mark.parametrize("n, seed", [(6, 3), (9, 0), (12, 0), (13, 0)])
def test_paired_test_with_ties_and_zeros_equals_scipys_permutation_test(n, seed):
    from scipy import stats

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, size=n) / 4  # coarse scores: tied differences and zeros
    b = rng.integers(0, 4, size=n) / 4
    d = a - b
    assert np.any(d == 0) and len(np.unique(np.abs(d[d != 0]))) < np.count_nonzero(d)
    expected = stats.wilcoxon(a, b, zero_method="wilcox").pvalue  # scipy's slow exact path
    assert paired_test(a, b) == pytest.approx(expected, rel=1e-12)


def test_paired_test_sees_a_real_shift_and_no_difference():
    rng = np.random.default_rng(3)
    a = rng.normal(size=60)
    assert paired_test(a, a + 0.5 + 0.1 * rng.normal(size=60)) < 1e-6
    assert paired_test(a, a) == 1.0
    with pytest.raises(ValueError, match="same images"):
        paired_test(a, a[:5])


def _slow_tau(x, y):
    pairs = list(itertools.combinations(range(len(x)), 2))
    s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs)
    return s / len(pairs)


def test_rank_agreement_equals_counting_pairs():
    rng = np.random.default_rng(5)
    names = [f"m{i}" for i in range(7)]
    x, y = rng.normal(size=7), rng.normal(size=7)
    got = rank_agreement(dict(zip(names, x)), dict(zip(names, y)))
    assert got == pytest.approx(_slow_tau(x, y), abs=1e-12)
    assert rank_agreement(dict(zip(names, x)), dict(zip(names, 3 * x + 1))) == pytest.approx(1.0)
    assert rank_agreement(dict(zip(names, x)), dict(zip(names, -x))) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="different methods"):
        rank_agreement({"a": 1.0, "b": 2.0}, {"a": 1.0, "c": 2.0})


def test_normalise_puts_random_at_0_and_best_at_1():
    assert normalise(0.3, random=0.3, best=0.9) == 0.0
    assert normalise(0.9, random=0.3, best=0.9) == 1.0
    assert normalise(0.6, random=0.3, best=0.9) == pytest.approx(0.5)
    assert normalise(0.1, random=0.5, best=0.1) == 1.0  # lower-is-better scores too
    assert np.isnan(normalise(0.2, random=0.2, best=0.2))


def test_holm_matches_the_step_down_procedure_by_hand():
    raw = np.array([0.04, 0.001, 0.03, 0.2, 0.012])
    m = len(raw)
    order = sorted(range(m), key=lambda i: raw[i])
    expected = np.empty(m)
    running = 0.0
    for k, i in enumerate(order):  # k-th smallest is multiplied by m - k, never decreasing
        running = max(running, min(1.0, (m - k) * raw[i]))
        expected[i] = running
    got = holm(raw)
    assert got == pytest.approx(expected, abs=1e-15)
    assert got.tolist() == pytest.approx([0.09, 0.005, 0.09, 0.2, 0.048])
    assert (got >= raw).all() and holm(np.array([])).shape == (0,)
