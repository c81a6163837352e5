"""Seed statistics: what a config's metric is across training seeds, and whether a config can be told
apart from the best.

Per config: n, mean, sample standard deviation (ddof=1) and a 95% confidence interval of the mean from
Student's t distribution (n - 1 degrees of freedom), clipped to [0, 1] for accuracies. With one seed there
is no spread to estimate, so `std` and `ci95` are None, never a made-up interval.

Comparison with the best (`compare_with_best`): a two-sided t-test at the 5% level on the difference of two
configs' means, with the seed noise **pooled over configs** (`seed_noise`): every config's seeds say how
much a seed moves the metric, so three seeds per config give 2 x configs degrees of freedom instead of
Welch's ~2, and a config whose three seeds happen to spread widely is not thereby "=" to the best. When
Levene's test says the model families' seed spreads differ (p < 0.05), or cannot tell yet, each family
gets its own pooled spread (a comparison across families then uses Welch-Satterthwaite degrees of freedom). A family with no
config of two seeds yet (racing, `race`) takes a prior spread (the grid file's `seed_sd`) as known.
Welch's test on two configs alone (`welch_p`) stays for two samples with nothing to pool them with.
Seeds do not pair configs (different models start from different weights whatever the seed), so no
paired test is used. scipy does the statistics.

Racing (`race_verdict`, the grid's seeds and a confirm's): before a config's next seed starts, its finished
seeds of the earlier rounds are compared with the leader's (the best mean over those rounds) by the same
test, with a family that has no config of two seeds yet taking the prior `seed_sd` as known; a config that
test calls worse ("<") gets no more seeds, for good (F-race's rule). Only earlier rounds count, so the
verdicts do not depend on how many workers run the points or in which order a round's points end. Replayed
on the committed 3-seed grids (scripts/race_replay.py, experiments/GRID.md): the same winner and the same
"=" set as with every seed.
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


def estimate(values: Sequence[float], fraction: bool = False, nonnegative: bool = False) -> Estimate:
    """n, mean, std and the 95% t-interval of the mean. `fraction`: the values are fractions (accuracies),
    so the interval is clipped to [0, 1] (a t-interval over few seeds can reach past 100%); `nonnegative`:
    clipped at 0 (a loss: an interval over two seeds reached -0.3)."""
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
    if fraction or nonnegative:
        low = max(0.0, low)
    if fraction:
        high = min(1.0, high)
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


@dataclass(frozen=True)
class Noise:
    """The seed noise of a set of configs: a standard deviation per model family, each with its degrees of
    freedom (math.inf for the prior, taken as known)."""

    by_family: dict  # family -> (sd, df)
    pooled: bool  # one estimate pooled over every family (Levene's test found no difference)
    levene_p: Optional[float] = None  # Levene's test that the families' spreads are equal (None: not testable)
    fallback: Optional[tuple] = None  # (sd, df) of a family with no config of two seeds yet

    def of(self, family: str) -> tuple:
        """(sd, df) of a config of `family`."""
        return self.by_family.get(family, self.fallback)

    def describe(self, percent: bool = True) -> str:
        scale, unit = (100, " points") if percent else (1, "")
        fmt = lambda sd, df: f"{scale * sd:.2f}{unit} ({'prior' if math.isinf(df) else f'{df:g} df'})"  # noqa: E731
        if not self.by_family:
            return f"prior seed sd {scale * self.fallback[0]:.2f}{unit}: no model family has a config with two seeds yet"
        if self.pooled:
            text = f"seed sd pooled over all configs {fmt(*next(iter(self.by_family.values())))}"
            return text + (f" (Levene's test of the model families' spreads: p {self.levene_p:.2f})"
                           if self.levene_p is not None else "")
        parts = ", ".join(f"{f} {fmt(sd, df)}" for f, (sd, df) in sorted(self.by_family.items()))
        why = (f"Levene's test says the families' spreads differ (p {self.levene_p:.3f})" if self.levene_p is not None
               else "too few seeds to test whether the families' spreads differ")
        text = f"seed sd per model family ({why}): {parts}"
        if self.fallback:
            text += f"; a family with no config of two seeds: {fmt(*self.fallback)}"
        return text


def _pool(samples) -> tuple:
    """(pooled sd, degrees of freedom) over the samples with >= 2 values; (None, 0) when none has."""
    ss = sum(float(((np.asarray(v, float) - np.mean(v)) ** 2).sum()) for v in samples if len(v) >= 2)
    df = sum(len(v) - 1 for v in samples if len(v) >= 2)
    return (math.sqrt(ss / df), float(df)) if df else (None, 0.0)


def seed_noise(samples: dict, family: dict, prior_sd: Optional[float] = None) -> Optional[Noise]:
    """The seed noise of configs `samples` (key -> values over seeds), `family` (key -> model family).

    Each family's spread is pooled over its configs with two or more seeds. When Levene's test (median
    centred, on the residuals from each config's mean) finds no difference between the families' spreads
    (p >= 0.05), one spread pooled over all configs serves every family. A family with no config of two
    seeds yet uses the prior `prior_sd` (taken as known), else the largest spread known. None when no
    config has two seeds and there is no prior."""
    families: dict = {}
    for key, values in samples.items():
        if len(values) >= 2:
            families.setdefault(family[key], []).append(values)
    own = {f: _pool(vs) for f, vs in families.items()}
    if not own:
        return Noise({}, False, fallback=(prior_sd, math.inf)) if prior_sd else None
    if len(set(family.values())) == 1:  # one family: its pool is the pool over all configs
        return Noise(own, True)
    sd_all, df_all = _pool([v for vs in families.values() for v in vs])
    missing = set(family.values()) - set(own)  # families with no config of two seeds yet
    fallback = ((prior_sd, math.inf) if prior_sd else max(own.values())) if missing else None
    testable = [f for f, (_, df) in own.items() if df >= 2]
    if len(testable) < 2:
        return Noise(own, False, fallback=fallback)
    import warnings

    from scipy import stats

    residuals = [np.concatenate([np.asarray(v, float) - np.mean(v) for v in families[f]]) for f in testable]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-zero residuals: no spread in any family
        p = float(stats.levene(*residuals, center="median").pvalue)
    if math.isnan(p) or p >= ALPHA:
        everyone = {f: (sd_all, df_all) for f in set(family.values())}
        return Noise(everyone, True, None if math.isnan(p) else p, fallback=(sd_all, df_all))
    return Noise(own, False, p, fallback=fallback)


def difference_p(best: Sequence[float], other: Sequence[float], best_noise: tuple, other_noise: tuple) -> float:
    """Two-sided p-value that two configs' means are equal, each mean's spread from its (sd, df) noise."""
    (sd_b, df_b), (sd_o, df_o) = best_noise, other_noise
    var_b, var_o = sd_b**2 / len(best), sd_o**2 / len(other)
    diff = float(np.mean(best)) - float(np.mean(other))
    se = math.sqrt(var_b + var_o)
    if se == 0:
        return 1.0 if diff == 0 else 0.0
    from scipy import stats

    if best_noise == other_noise:  # one pool
        df = df_b
    else:  # Welch-Satterthwaite over the two pools' degrees of freedom
        denominator = (var_b**2 / df_b if math.isfinite(df_b) else 0.0) + (var_o**2 / df_o if math.isfinite(df_o) else 0.0)
        df = (var_b + var_o) ** 2 / denominator if denominator else math.inf
    t = abs(diff) / se
    return float(2 * (stats.norm.sf(t) if math.isinf(df) else stats.t.sf(t, df)))


def compare_with_best(samples: dict, best: str, noise: Noise, family: dict) -> dict:
    """key -> p-value of its difference from config `best` (None for `best` itself)."""
    return {key: None if key == best else difference_p(samples[best], values, noise.of(family[best]), noise.of(family[key]))
            for key, values in samples.items()}


def race_verdict(done: dict, family: dict, config: str, select: str, prior_sd: Optional[float],
                 name: Optional[dict] = None) -> str:
    """Why `config` gets no more seeds, or "" if it stays in the race. `done`: config -> finished values of
    `select` (one per seed); `family`: config -> model family; `name`: config -> a readable name."""
    from ..training.config import SELECT, pick_best

    if not done.get(config):
        return ""
    higher_is_better = SELECT[select]
    scored = [key for key, values in done.items() if values]
    mean = {key: sum(done[key]) / len(done[key]) for key in scored}
    leader = pick_best(scored, select, key=mean.get)
    if leader == config:
        return ""
    noise = seed_noise({k: done[k] for k in scored}, family, prior_sd)
    if noise is None:  # one seed each and no prior: nothing tells a seed's spread yet
        return ""
    p = difference_p(done[leader], done[config], noise.of(family[leader]), noise.of(family[config]))
    if indistinguishable(p):
        return ""
    name = name or {}
    gap = abs(mean[leader] - mean[config]) * (100 if select == "val_accuracy" else 1)
    unit = " points" if select == "val_accuracy" else ""
    return (f"after {len(done[config])} seed(s), {gap:.2f}{unit} {'behind' if higher_is_better else 'above'} the leader "
            f"{name.get(leader, leader)} ({len(done[leader])} seed(s)) on {select}, p {p:.4f} < {ALPHA}; "
            f"{noise.describe(percent=select == 'val_accuracy')}")
