"""Paired comparison of two methods over the same slides."""

from __future__ import annotations

import numpy as np
from scipy import stats


def wilcoxon_p(a, b) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired per-slide scores `a` vs `b`.

    NaN when there are fewer than two pairs or every pair is tied: there is nothing to test.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.shape} vs {b.shape}")
    diff = a - b
    if diff.size < 2 or np.all(diff == 0):
        return float("nan")
    return float(stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)
