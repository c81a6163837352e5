"""Seed statistics: what a config's metric is across training seeds, and whether two configs differ.

Per config: n, mean, sample standard deviation (ddof=1) and a 95% confidence interval of the mean from
Student's t distribution (n - 1 degrees of freedom), clipped to [0, 1] for accuracies. With one seed there is no spread to estimate, so
`std` and `ci95` are None, never a made-up interval. Two configs are compared with Welch's t-test (two
samples, unequal variances): seeds do not pair configs (different models start from different weights
whatever the seed), so a paired test would assume a link that is not there. scipy does the statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05  # level of the "indistinguishable from the best" test


@dataclass(frozen=True)
class Estimate:
    n: int
    mean: float
    std: Optional[float]  # None with fewer than 2 values
    ci95: Optional[tuple]  # (low, high) of the mean; None with fewer than 2 values

    def as_dict(self) -> dict:
        low, high = self.ci95 if self.ci95 else (None, None)
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci95": [low, high] if self.ci95 else None}


def estimate(values: Sequence[float], fraction: bool = False) -> Estimate:
    """n, mean, std and the 95% t-interval of the mean. `fraction`: the values are fractions (accuracies),
    so the interval is clipped to [0, 1] (a t-interval over few seeds can reach past 100%)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        raise ValueError("no values to estimate from")
    mean = float(v.mean())
    if len(v) < 2:
        return Estimate(len(v), mean, None, None)
    std = float(v.std(ddof=1))
    if std == 0:
        return Estimate(len(v), mean, 0.0, (mean, mean))
    from scipy import stats

    low, high = stats.t.interval(CONFIDENCE, df=len(v) - 1, loc=mean, scale=std / math.sqrt(len(v)))
    if fraction:
        low, high = max(0.0, low), min(1.0, high)
    return Estimate(len(v), mean, std, (float(low), float(high)))


def welch_p(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Two-sided p-value of Welch's t-test that `a` and `b` have the same mean; None with < 2 values in either."""
    if len(a) < 2 or len(b) < 2:
        return None
    import warnings

    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical samples: scipy warns, p is still usable
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    if math.isnan(p):  # no spread in either sample: equal means or certainly different
        return 1.0 if float(np.mean(a)) == float(np.mean(b)) else 0.0
    return p


def indistinguishable(p: Optional[float]) -> Optional[bool]:
    return None if p is None else p >= ALPHA
