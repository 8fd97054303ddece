"""Significance for paper tables: paired tests over seeds, Holm's correction, bootstrap over validation images.

Written out here (about a hundred lines) instead of depending on scipy for three functions: the tests run on
2 to ~10 paired seeds, where exact small-sample distributions matter and are cheap to compute.

* :func:`paired_t` - two-sided paired t-test; the p-value is the regularized incomplete beta function
  ``I_{df/(df+t^2)}(df/2, 1/2)``, evaluated by its continued fraction (Lentz's method).
* :func:`wilcoxon` - two-sided Wilcoxon signed-rank test with the *exact* null distribution (zero differences
  dropped, tied magnitudes get average ranks; the distribution is counted over all 2^n sign patterns by dynamic
  programming on doubled ranks, so it stays exact with ties).
* :func:`paired_test` with ``test="auto"`` picks Wilcoxon from :data:`WILCOXON_MIN_N` pairs on and the t-test
  below: with n pairs the smallest two-sided exact Wilcoxon p is ``2 / 2^n`` (0.0625 at n = 5, 0.031 at n = 6), so
  under 6 seeds it could never reject at 0.05, whatever the data.
* :func:`holm` - Holm's step-down adjusted p-values (family-wise error over every test of a table).
* :func:`bootstrap_miou` - mIoU of resampled validation sets from per-image intersection and union counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

WILCOXON_MIN_N = 6
TESTS = ("auto", "t", "wilcoxon", "none")


@dataclass(frozen=True)
class TestResult:
    """One paired comparison: ``test`` is ``t`` or ``wilcoxon``; ``statistic`` is t or W+; ``p`` two-sided."""

    test: str
    n: int
    statistic: float
    p: float


def paired_t(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Paired t-test of ``a - b`` against 0; needs n >= 2 pairs. Identical differences give p = 0 (all equal,
    nonzero) or p = 1 (all zero): the variance is 0 and the sign is certain."""
    d = _differences(a, b)
    n = len(d)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0.0:
        return TestResult("t", n, math.copysign(math.inf, mean) if mean else 0.0, 0.0 if mean else 1.0)
    t = mean / (sd / math.sqrt(n))
    df = n - 1
    return TestResult("t", n, t, _betainc(df / 2.0, 0.5, df / (df + t * t)))


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Exact two-sided Wilcoxon signed-rank test of ``a - b``; p = 1 when every difference is 0."""
    d = [x for x in _differences(a, b) if x != 0.0]
    n = len(d)
    if n == 0:
        return TestResult("wilcoxon", 0, 0.0, 1.0)
    ranks2 = _doubled_ranks([abs(x) for x in d])  # 2 x average rank: integers even with ties
    w2 = sum(r for r, x in zip(ranks2, d) if x > 0)
    counts = [1] + [0] * sum(ranks2)  # counts[s]: sign patterns whose positive doubled ranks sum to s
    for r in ranks2:
        for s in range(len(counts) - 1, r - 1, -1):
            counts[s] += counts[s - r]
    total = 2 ** n
    lower = sum(counts[: w2 + 1]) / total
    upper = sum(counts[w2:]) / total
    return TestResult("wilcoxon", n, w2 / 2.0, min(1.0, 2.0 * min(lower, upper)))


def paired_test(a: Sequence[float], b: Sequence[float], test: str = "auto") -> TestResult:
    """``t``, ``wilcoxon``, or ``auto`` (Wilcoxon from :data:`WILCOXON_MIN_N` pairs on, else t)."""
    if test not in ("auto", "t", "wilcoxon"):
        raise ValueError(f"test must be one of auto, t, wilcoxon; got {test!r}")
    if test == "wilcoxon" or (test == "auto" and len(a) >= WILCOXON_MIN_N):
        return wilcoxon(a, b)
    return paired_t(a, b)


def holm(p: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: sorted ascending, ``p_(i) * (m - i)`` (i from 0), made
    monotone by a running maximum and capped at 1. Reject where the adjusted p is below alpha."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def bootstrap_miou(inter: np.ndarray, union: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """mIoU (percent) of each resampled validation set.

    Args:
        inter, union: [N, K] per-image intersection and union pixel counts (they add up over images to the
            dataset-level counts, so a resample's mIoU is the UniMatch metric of that resample).
        weights: [B, N] how often each image is drawn in each of B resamples (see :func:`resample_weights`).

    Returns:
        [B] float64: ``100 * mean_c (sum inter) / (sum union + 1e-10)``, as ``evaluate.ConfusionMatrix``.
    """
    i = weights @ inter  # [B, K]
    u = weights @ union
    return 100.0 * (i / (u + 1e-10)).mean(axis=1)


def resample_weights(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """[B, N] multinomial counts: B bootstrap resamples of N images drawn with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_boot).astype(np.float64)


def percentile_ci(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap ``samples`` (percentile method)."""
    tail = (1.0 - confidence) / 2.0 * 100.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return [float(x) - float(y) for x, y in zip(a, b)]


def _doubled_ranks(values: list[float]) -> list[int]:
    """2 x the 1-based rank of each value, ties sharing their average rank (so 2 x rank is an integer)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + 1) + (j + 1)  # 2 x the mean of ranks i+1 .. j+1
        i = j + 1
    return ranks


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast only below the mean
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * _beta_cf(a, b, x) / a


def _beta_cf(a: float, b: float, x: float, eps: float = 1e-15, max_iter: int = 500) -> float:
    """Continued fraction of the incomplete beta function, modified Lentz evaluation."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, max_iter + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return f
