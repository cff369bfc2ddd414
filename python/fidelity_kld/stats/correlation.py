"""Rank correlation across models, with bootstrap confidence intervals over models.

Spearman rho and Kendall tau come from scipy.stats. rho's p-value is exact for up to
EXACT_P_MODELS models (scipy.stats.permutation_test over every pairing: a silent zone often holds
4 to 8 models, where scipy's t-approximation is rough), the t-approximation above. The bootstrap is
scipy.stats.bootstrap over models (paired resampling of (fidelity, score) pairs), fed a
vectorised Spearman statistic (scipy.stats.rankdata along the last axis, then Pearson of
the ranks) so one call ranks every resample at once.

A correlation needs at least MIN_MODELS models with finite values on both sides; fewer is
"insufficient", and a side that is constant over them leaves rho undefined ("constant").
Neither is ever reported as a number.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_MODELS = 4
CONFIDENCE = 0.95
EXACT_P_MODELS = 8  # 8! = 40,320 pairings: about 50 ms vectorised


def keyed_rng(seed: int, *key) -> np.random.Generator:
    """A generator fixed by the seed and a name, so each analysis draws the same numbers
    whatever else ran before it."""
    tag = zlib.crc32("/".join(str(k) for k in key).encode())
    return np.random.default_rng([int(seed), tag])


def rank_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho along the last axis (average ranks for ties); NaN where a row of x or
    y is constant. Inputs must not be NaN (infinities rank last or first)."""
    rx = stats.rankdata(x, axis=-1)
    ry = stats.rankdata(y, axis=-1)
    return _pearson_last_axis(rx, ry)


def masked_rank_corr(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman rho along the last axis over the entries where mask is true (and neither x
    nor y is NaN): each row ranks only its own selected entries. Returns (rho, n) per row; rho is
    NaN where n < MIN_MODELS or a side is constant."""
    x, y, mask = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), mask)
    keep = mask & ~np.isnan(x) & ~np.isnan(y)
    rx = stats.rankdata(np.where(keep, x, np.nan), axis=-1, nan_policy="omit")
    ry = stats.rankdata(np.where(keep, y, np.nan), axis=-1, nan_policy="omit")
    n = keep.sum(axis=-1)
    rho = _pearson_last_axis(np.where(keep, rx, 0.0), np.where(keep, ry, 0.0), keep)
    return np.where(n >= MIN_MODELS, rho, np.nan), n


def _pearson_last_axis(a, b, keep=None):
    if keep is None:
        keep = np.ones(a.shape, bool)
    n = keep.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        da = np.where(keep, a - a.sum(axis=-1, keepdims=True) / n, 0.0)
        db = np.where(keep, b - b.sum(axis=-1, keepdims=True) / n, 0.0)
        saa = (da * da).sum(axis=-1)
        sbb = (db * db).sum(axis=-1)
        r = (da * db).sum(axis=-1) / np.sqrt(saa * sbb)
    # ranks are exact multiples of 0.5, so a constant row gives exactly zero spread
    r = np.where((saa > 0) & (sbb > 0), r, np.nan)
    return np.clip(r, -1.0, 1.0)


def _spearman_statistic(x, y, axis=-1):
    return rank_corr(np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1))


@dataclass(frozen=True)
class Correlation:
    """Spearman rho (and Kendall tau) between a fidelity variant and a benchmark quantity
    over n models. status: "ok", "insufficient" (n < 4) or "constant" (rho undefined);
    numbers are NaN unless status is "ok". The CI is a bootstrap percentile interval over
    models; resamples that draw a constant side are dropped and counted."""

    n: int
    status: str
    rho: float = math.nan
    p: float = math.nan
    tau: float = math.nan
    tau_p: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    n_bootstrap: int = 0
    n_degenerate: int = 0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self, digits: int = 2) -> str:
        """'rho = -0.72 [-0.88, -0.45], p = 1.2e-05, n = 28' or the reason there is none."""
        if not self.ok:
            return f"{self.status} ({self.note})"
        ci = ""
        if np.isfinite(self.ci_low):
            ci = f" [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]"
        return f"rho = {self.rho:+.{digits}f}{ci}, p = {format_p(self.p)}, n = {self.n}"


def format_p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    if p < 0.001:
        return f"{p:.1e}"
    return f"{p:.3f}"


def correlate(x, y, *, n_bootstrap: int = 1000, rng: np.random.Generator | None = None,
              labels: tuple[str, str] = ("fidelity", "score")) -> Correlation:
    """Spearman rho, p, Kendall tau, p and a bootstrap CI over the pairs where neither x nor
    y is NaN (an infinite KLD is a legitimate worst rank)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    keep = ~np.isnan(x) & ~np.isnan(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < MIN_MODELS:
        return Correlation(n, "insufficient", note=f"{n} model{'s' if n != 1 else ''}; need at least {MIN_MODELS}")
    for values, label in ((x, labels[0]), (y, labels[1])):
        if np.all(values == values[0]):
            return Correlation(n, "constant", note=f"rho undefined: {label} is constant over these {n} models")
    sp = stats.spearmanr(x, y)
    p = float(sp.pvalue)
    if n <= EXACT_P_MODELS:
        # Only y's order is permuted (n! pairings; permuting both would count each n! times
        # and fall back to random sampling); two-sided is twice the smaller tail, as scipy does.
        def stat(yy, axis=-1):
            yy = np.moveaxis(yy, axis, -1)
            return rank_corr(np.broadcast_to(x, yy.shape), yy)

        p = float(stats.permutation_test((y,), stat, permutation_type="pairings", vectorized=True,
                                         n_resamples=math.factorial(n),
                                         alternative="two-sided").pvalue)
    kt = stats.kendalltau(x, y)
    lo = hi = math.nan
    n_degenerate = 0
    if n_bootstrap > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            res = stats.bootstrap((x, y), _spearman_statistic, paired=True, vectorized=True,
                                  n_resamples=n_bootstrap, method="percentile",
                                  confidence_level=CONFIDENCE,
                                  rng=rng if rng is not None else np.random.default_rng(0))
        dist = np.asarray(res.bootstrap_distribution)
        n_degenerate = int(np.isnan(dist).sum())
        if n_degenerate == 0:
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        elif n_degenerate < dist.size:
            # scipy's percentile interval turns NaN as soon as one resample drew a constant
            # side; the interval over the defined resamples is the same computation.
            alpha = (1 - CONFIDENCE) / 2
            lo, hi = (float(v) for v in np.nanquantile(dist, [alpha, 1 - alpha]))
    return Correlation(n, "ok", float(sp.statistic), p, float(kt.statistic),
                       float(kt.pvalue), lo, hi, int(n_bootstrap), n_degenerate)
