"""Rank correlation with bootstrap CIs: checked against scipy.stats on the same arrays."""

import numpy as np
import pytest
from scipy import stats

from fidelity_kld.stats.correlation import (MIN_MODELS, correlate, keyed_rng, masked_rank_corr,
                                            rank_corr)


def test_rank_corr_matches_spearmanr_row_by_row_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=(50, 9)).astype(float)  # many ties
    y = rng.normal(size=(50, 9))
    y[:, 3] = y[:, 4]
    got = rank_corr(x, y)
    for i in range(50):
        if np.all(x[i] == x[i, 0]):
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(stats.spearmanr(x[i], y[i]).statistic, abs=1e-12)


def test_rank_corr_constant_row_is_nan():
    x = np.array([[1.0, 1, 1, 1], [1, 2, 3, 4]])
    y = np.array([[1.0, 2, 3, 4], [4, 4, 4, 4]])
    assert np.all(np.isnan(rank_corr(x, y)))


def test_masked_rank_corr_ranks_only_selected_entries():
    rng = np.random.default_rng(2)
    x = rng.normal(size=12)
    x[5] = np.nan
    y = rng.normal(size=(30, 12))
    mask = rng.random((30, 12)) < 0.6
    rho, n = masked_rank_corr(x[None, :], y, mask)
    for i in range(30):
        keep = mask[i] & ~np.isnan(x)
        assert n[i] == keep.sum()
        if keep.sum() < MIN_MODELS:
            assert np.isnan(rho[i])
        else:
            assert rho[i] == pytest.approx(stats.spearmanr(x[keep], y[i, keep]).statistic, abs=1e-12)


def test_correlate_matches_scipy_including_the_bootstrap_ci():
    rng = np.random.default_rng(3)
    x = rng.normal(size=15)
    y = -x + rng.normal(scale=0.8, size=15)
    c = correlate(x, y, n_bootstrap=500, rng=np.random.default_rng(7))
    sp, kt = stats.spearmanr(x, y), stats.kendalltau(x, y)
    assert c.ok and c.n == 15
    assert (c.rho, c.p, c.tau, c.tau_p) == pytest.approx((sp.statistic, sp.pvalue, kt.statistic, kt.pvalue))
    direct = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                             vectorized=False, n_resamples=500, method="percentile",
                             rng=np.random.default_rng(7))
    assert c.n_degenerate == 0
    assert c.ci_low == pytest.approx(direct.confidence_interval.low, abs=1e-12)
    assert c.ci_high == pytest.approx(direct.confidence_interval.high, abs=1e-12)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_fewer_than_four_models_is_insufficient_not_a_number(n):
    c = correlate(np.arange(n, dtype=float), np.arange(n, dtype=float)[::-1], n_bootstrap=50)
    assert c.status == "insufficient" and c.n == n
    assert np.isnan(c.rho) and np.isnan(c.p) and np.isnan(c.ci_low)
    assert "need at least 4" in c.note


def test_nan_entries_are_dropped_and_can_make_it_insufficient():
    x = np.array([0.1, np.nan, 0.3, 0.4, np.nan])
    y = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert correlate(x, y, n_bootstrap=0).status == "insufficient"
    x = np.array([0.1, np.nan, 0.3, 0.4, 0.5, 0.6])
    y = np.array([0.9, 0.1, 0.7, 0.8, 0.5, 0.4])
    c = correlate(x, y, n_bootstrap=0)
    keep = ~np.isnan(x)
    assert c.n == 5 and c.rho == pytest.approx(stats.spearmanr(x[keep], y[keep]).statistic)


@pytest.mark.parametrize("side", ["x", "y"])
def test_constant_column_leaves_rho_undefined_and_says_so(side):
    x, y = np.array([0.1, 0.2, 0.3, 0.4, 0.5]), np.array([0.5, 0.1, 0.4, 0.2, 0.3])
    if side == "x":
        x = np.full(5, 0.2)
    else:
        y = np.full(5, 0.7)
    c = correlate(x, y, n_bootstrap=100, labels=("kld_mean", "the composite score"))
    assert c.status == "constant" and np.isnan(c.rho)
    assert "undefined" in c.note
    assert ("kld_mean" if side == "x" else "the composite score") in c.note


@pytest.mark.parametrize("n", [4, 6, 8])
def test_small_cohorts_get_the_exact_permutation_p(n):
    """Up to 8 models the p-value comes from all n! pairings (enumerated here with itertools and
    spearmanr, independently): twice the smaller tail, as scipy defines a two-sided permutation
    p, not the t-approximation, which is off by tens of percent there."""
    import itertools

    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = x + rng.normal(size=n)
    y[1] = y[0]  # a tie
    c = correlate(x, y, n_bootstrap=0)
    rhos = np.array([stats.spearmanr(x, y[list(perm)]).statistic
                     for perm in itertools.permutations(range(n))])
    obs = stats.spearmanr(x, y).statistic
    exact = min(1.0, 2 * min(np.mean(rhos >= obs - 1e-12), np.mean(rhos <= obs + 1e-12)))
    assert c.p == pytest.approx(exact, rel=1e-9)
    assert c.rho == pytest.approx(stats.spearmanr(x, y).statistic)


def test_ties_match_scipy_and_infinite_kld_ranks_last():
    x = np.array([0.01, 0.01, 0.02, 0.05, np.inf, 0.05])
    y = np.array([0.70, 0.71, 0.69, 0.60, 0.40, 0.62])
    c = correlate(x, y, n_bootstrap=0)
    assert c.n == 6
    assert c.rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert c.tau == pytest.approx(stats.kendalltau(x, y).statistic)


def test_degenerate_resamples_are_dropped_and_counted():
    # with 4 models a resample draws one model four times now and then: no rank correlation
    x, y = np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 1, 2])
    c = correlate(x, y, n_bootstrap=2000, rng=np.random.default_rng(0))
    assert c.ok and 0 < c.n_degenerate < 2000
    assert np.isfinite(c.ci_low) and -1 <= c.ci_low <= c.rho <= c.ci_high <= 1


def test_keyed_rng_depends_on_seed_and_key_only():
    a = keyed_rng(3, "corr", "kld_mean").random(3)
    assert np.array_equal(a, keyed_rng(3, "corr", "kld_mean").random(3))
    assert not np.array_equal(a, keyed_rng(4, "corr", "kld_mean").random(3))
    assert not np.array_equal(a, keyed_rng(3, "corr", "kld_p99").random(3))


def test_describe_reports_numbers_or_the_reason():
    c = correlate([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], n_bootstrap=0)
    assert c.describe().startswith("rho = -1.00")
    assert "insufficient" in correlate([1, 2], [2, 1]).describe()
