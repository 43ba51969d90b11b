"""Statistics that say when a difference between methods is real (pure functions over arrays).

Bootstrap intervals per leaderboard cell, a paired test between a method and the best one
over the same images (Holm-corrected over a column), scores normalised between the
``random`` control and the best method, and rank agreement between two operators.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def bootstrap_ci(values: np.ndarray, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean.

    Args:
        values: Per-image scores ``[n]``.
        level: Coverage of the interval.
        n_boot: Resamples (with replacement, ``n`` each).
        seed: Seed of the resampling, so a table is reproducible.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for fewer than two values.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value for scores of two methods on the same images.

    Args:
        a: Scores ``[n]`` of one method.
        b: Scores ``[n]`` of the other, image for image.

    Returns:
        The p-value; 1.0 when the two agree on every image (no evidence of a difference).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a paired test needs scores on the same images: got {a.shape} and {b.shape}")
    if not np.any(a != b):
        return 1.0
    d = a - b
    if len(d) <= 13 and (np.any(d == 0) or len(np.unique(np.abs(d))) < len(d)):
        return _sign_flip_pvalue(d)
    return float(stats.wilcoxon(a, b, zero_method="wilcox").pvalue)


def _sign_flip_pvalue(d: np.ndarray) -> float:
    """The exact two-sided p-value of the signed-rank sum over all 2^n sign flips of ``d``.

    What ``scipy.stats.wilcoxon`` computes for n ≤ 13 with ties or zeros, vectorised: scipy
    runs a permutation test that evaluates the statistic once per flip in Python (about
    1.5 s per call at n = 13; a leaderboard of a small run makes dozens of calls). Zeros are
    dropped (Wilcoxon's method); flipping them would only repeat every outcome.
    """
    d = d[d != 0]
    ranks = stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    flips = (np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1  # [2^n, n]: 1 = positive
    null = flips @ ranks
    tol = abs(observed) * np.finfo(np.float64).eps * 100  # scipy's tolerance for equal sums
    p = 2 * min(np.mean(null <= observed + tol), np.mean(null >= observed - tol))
    return float(min(1.0, p))


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment: p-values for testing several hypotheses at once.

    Rejecting where the adjusted p-value is below alpha keeps the chance of any false
    rejection among them at most alpha.

    Args:
        pvalues: Raw p-values ``[m]``.

    Returns:
        Adjusted p-values ``[m]``, in the input order, each at least its raw value.
    """
    # hand-written: scipy has no Holm adjustment (only Benjamini-Hochberg), and statsmodels,
    # which has one, is not worth a dependency for six lines tested against the definition
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(stepped)  # monotone in the raw order
    return adjusted


def normalise(score: float, random: float, best: float) -> float:
    """``score`` on a scale where the ``random`` control is 0 and the best achievable is 1."""
    if best == random:
        return float("nan")
    return (score - random) / (best - random)


def rank_agreement(a: dict[str, float], b: dict[str, float]) -> float:
    """Kendall's tau between two rankings of the same methods (e.g. under two operators).

    Args:
        a: Method -> score under one operator.
        b: Method -> score under another (the same methods).

    Returns:
        Tau in [-1, 1]: 1 when both order the methods alike, -1 when reversed.
    """
    if set(a) != set(b):
        raise ValueError(f"the rankings cover different methods: {sorted(set(a) ^ set(b))}")
    names = sorted(a)
    return float(stats.kendalltau([a[n] for n in names], [b[n] for n in names]).statistic)
