"""Paired comparison of two quantizations scored against the same reference on the same tokens.

For each per-token quantity x (KLD, top-1 agreement, nll_q - nll_ref), the difference of the
two models' means is the mean of the per-token differences x_A - x_B over tokens valid for
both. Pairing removes the token-to-token variation the two models share (hard tokens are hard
for both), so the paired standard error is far smaller than the two unpaired SEs combined.
The confidence interval is a paired bootstrap (scipy.stats.bootstrap with paired=True:
token indices are resampled, each draw keeping A's and B's values of a token together).

Tokens of one prompt are not independent, so with long prompts both the SE and the CI are
somewhat optimistic; the verdict says when the interval excludes zero, nothing stronger.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

from ..ops import TokenStats
from .summary import json_ready

# the per-token quantities compared (per_token_values says what each is)
QUANTITIES = ("kld", "same_top", "ln_ppl_ratio")


@dataclass(frozen=True)
class PairedDifference:
    """mean(x_A) - mean(x_B) on the tokens valid for both, with its paired SE and bootstrap CI."""

    quantity: str
    mean_a: float
    mean_b: float
    diff: float
    se: float
    ci_low: float
    ci_high: float
    confidence: float
    n_tokens: int

    @property
    def distinguishable(self) -> bool:
        """The confidence interval excludes zero."""
        return bool(self.ci_low > 0 or self.ci_high < 0)


@dataclass(frozen=True)
class PairedComparison:
    name_a: str
    name_b: str
    differences: tuple[PairedDifference, ...]

    def get(self, quantity: str) -> PairedDifference | None:
        return next((d for d in self.differences if d.quantity == quantity), None)

    def to_dict(self) -> dict:
        return json_ready({"a": self.name_a, "b": self.name_b,
                           "differences": [dict(asdict(d), distinguishable=d.distinguishable)
                                           for d in self.differences]})


def per_token_values(st: TokenStats, quantity: str) -> np.ndarray | None:
    """The per-token values whose mean is the summary's statistic (None without labels).
    KLD under the definitions the summary uses (llama.cpp's when the stats carry them)."""
    if quantity == "kld":
        return st.kld_llama if st.kld_llama is not None else st.kld
    if quantity == "same_top":
        return np.where(st.valid, st.top1_agree.astype(np.float64), np.nan)
    if quantity == "ln_ppl_ratio":
        return None if st.nll_q is None else st.nll_q - st.nll_ref
    raise ValueError(f"unknown quantity {quantity!r}; expected one of {QUANTITIES}")


def paired_difference(x_a: np.ndarray, x_b: np.ndarray, quantity: str = "", *,
                      confidence: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0) -> PairedDifference:
    """Paired difference of means of two per-token arrays over the same tokens (NaN entries,
    invalid tokens, are dropped from both)."""
    x_a, x_b = np.asarray(x_a, np.float64), np.asarray(x_b, np.float64)
    if x_a.shape != x_b.shape:
        raise ValueError(f"paired arrays differ in length ({x_a.size} vs {x_b.size} tokens)")
    keep = ~(np.isnan(x_a) | np.isnan(x_b))
    a, b = x_a[keep], x_b[keep]
    n = a.size
    if n == 0:
        return PairedDifference(quantity, math.nan, math.nan, math.nan, math.nan, math.nan,
                                math.nan, confidence, 0)
    d = a - b
    diff = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    lo = hi = math.nan
    if n > 1 and np.isfinite(d).all() and d.std() > 0:
        res = sps.bootstrap((a, b), lambda u, v, axis=-1: np.mean(u - v, axis=axis), paired=True,
                            vectorized=True, confidence_level=confidence,
                            n_resamples=n_resamples, method="percentile",
                            random_state=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    elif n > 1 and np.isfinite(d).all():  # identical differences everywhere: no spread
        lo = hi = diff
    return PairedDifference(quantity, float(a.mean()), float(b.mean()), diff, se, lo, hi,
                            confidence, n)


def compare_paired(name_a: str, st_a: TokenStats, name_b: str, st_b: TokenStats, *,
                   confidence: float = 0.95, n_resamples: int = 2000,
                   seed: int = 0) -> PairedComparison:
    """A minus B for each quantity the two TokenStats support."""
    if st_a.n_tokens != st_b.n_tokens:
        raise ValueError(f"{name_a} and {name_b} were scored on different tokens "
                         f"({st_a.n_tokens} vs {st_b.n_tokens})")
    out = []
    for q in QUANTITIES:
        xa, xb = per_token_values(st_a, q), per_token_values(st_b, q)
        if xa is None or xb is None:
            continue
        out.append(paired_difference(xa, xb, q, confidence=confidence,
                                     n_resamples=n_resamples, seed=seed))
    return PairedComparison(name_a, name_b, tuple(out))


def top_divergent(st: TokenStats, n: int) -> np.ndarray:
    """Indices of the n valid tokens with the largest KLD (under the summary's definitions),
    largest first; ties keep token order."""
    kld = per_token_values(st, "kld")
    idx = np.flatnonzero(~np.isnan(kld))
    order = np.argsort(-kld[idx], kind="stable")
    return idx[order[:n]]


def worst_prompts(st: TokenStats, prompt_ids: np.ndarray, n: int) -> list[tuple[int, float, int]]:
    """The n prompts with the largest mean KLD: (prompt id, mean KLD, index of its worst token)."""
    kld = per_token_values(st, "kld")
    valid = ~np.isnan(kld)
    ids = np.asarray(prompt_ids)[valid]
    vals = kld[valid]
    where = np.flatnonzero(valid)
    uniq, inv = np.unique(ids, return_inverse=True)
    means = np.bincount(inv, weights=vals) / np.bincount(inv)
    out = []
    for k in np.argsort(-means, kind="stable")[:n]:
        members = np.flatnonzero(inv == k)
        worst = members[int(np.argmax(vals[members]))]
        out.append((int(uniq[k]), float(means[k]), int(where[worst])))
    return out
