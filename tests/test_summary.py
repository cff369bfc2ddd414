"""summarize() and Accumulator against numpy/scipy on the same per-token arrays."""

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

import fidelity_kld as fk
from fidelity_kld.ops import TokenStats
from fidelity_kld.stats.summary import _median_llama, _percentiles_llama


def random_stats(rng, n=2000, v=300):
    a = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    b = (a + 0.4 * rng.standard_normal((n, v))).astype(np.float32)
    y = rng.integers(0, v, n)
    return a, b, y, fk.compare(a, b, y)


def test_summary_matches_numpy_and_scipy():
    rng = np.random.default_rng(0)
    _, _, _, st = random_stats(rng)
    s = fk.summarize(st)
    assert s.n_tokens == s.n_valid == 2000 and s.n_invalid == 0
    assert s.kld.mean == pytest.approx(np.mean(st.kld), rel=1e-12)
    assert s.kld.se == pytest.approx(sps.sem(st.kld), rel=1e-9)
    assert s.kld.median == pytest.approx(np.median(st.kld), rel=1e-12)
    for p in (99.9, 99, 95, 90, 10, 5, 1, 0.1):
        assert s.kld.percentiles[f"{p:g}"] == pytest.approx(np.percentile(st.kld, p), rel=1e-12)
    agree = st.top1_ref == st.top1_q
    assert s.same_top == pytest.approx(agree.mean())
    assert s.same_top_se == pytest.approx(math.sqrt(agree.mean() * (1 - agree.mean()) / 1999))
    assert s.ppl_ref == pytest.approx(math.exp(np.mean(st.nll_ref)), rel=1e-12)
    assert s.ppl_q == pytest.approx(math.exp(np.mean(st.nll_q)), rel=1e-12)
    d = st.nll_q - st.nll_ref
    assert s.ln_ppl_ratio == pytest.approx(np.mean(d), rel=1e-9)
    assert s.ln_ppl_ratio_se == pytest.approx(sps.sem(d), rel=1e-9)
    assert s.ppl_ratio == pytest.approx(s.ppl_q / s.ppl_ref, rel=1e-9)
    assert s.cor_nll == pytest.approx(sps.pearsonr(st.nll_q, st.nll_ref).statistic, rel=1e-9)
    dp = st.p_q_y - st.p_ref_y
    assert s.delta_p.mean == pytest.approx(np.mean(dp), rel=1e-9, abs=1e-15)
    assert s.rms_delta_p == pytest.approx(np.sqrt(np.mean(dp**2)), rel=1e-12)
    # delta method: SE(sqrt(m)) = SE(m) / (2 sqrt(m))
    assert s.rms_delta_p_se == pytest.approx(sps.sem(dp**2) / (2 * s.rms_delta_p), rel=1e-9)
    # PPL difference SE: u_q^2 + u_ref^2 - 2 cov(PPL estimates) by the delta method
    cov = np.cov(st.nll_q, st.nll_ref)[0, 1] / st.n_tokens
    want = math.sqrt(s.ppl_q_se**2 + s.ppl_ref_se**2 - 2 * s.ppl_q * s.ppl_ref * cov)
    assert s.ppl_diff_se == pytest.approx(want, rel=1e-9)


def test_large_mean_small_spread_variance_is_stable():
    """Raw-moment variance (sum2/N - mean^2) loses every digit here; we must not."""
    n = 1000
    base = np.full(n, 300.0)
    jitter = np.tile([-1e-5, 1e-5], n // 2)
    st = TokenStats(kld=np.abs(jitter), kld_reverse=np.abs(jitter), lse_ref=base, lse_q=base,
                    entropy_ref=base, top1_ref=np.zeros(n, np.int32), top1_q=np.zeros(n, np.int32),
                    labels=np.zeros(n, np.int64), nll_ref=base, nll_q=base + jitter,
                    p_ref_y=np.full(n, 0.5), p_q_y=np.full(n, 0.5))
    s = fk.summarize(st)
    assert s.ppl_q_se / s.ppl_q == pytest.approx(sps.sem(base + jitter), rel=1e-6)
    assert s.ln_ppl_ratio_se == pytest.approx(sps.sem(jitter), rel=1e-6)


def test_invalid_and_infinite_tokens_are_counted_not_dropped():
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((10, 50)) * 2).astype(np.float32)
    b = a.copy()
    a[0, 3] = np.nan
    b[1, :10] = -np.inf  # q gives zero mass where p has some: KLD = inf
    s = fk.summarize(fk.compare(a, b))
    assert (s.n_tokens, s.n_valid, s.n_invalid, s.n_kld_inf) == (10, 9, 1, 1)
    assert math.isinf(s.kld.mean) and math.isinf(s.kld.max)
    # 1 of 9 tokens is +inf: the top percentiles interpolate between it and a finite value
    # (inf) or between two finite values; never NaN
    assert math.isinf(s.kld.percentiles["99.9"]) and math.isfinite(s.kld.percentiles["10"])
    both_inf = fk.summarize(fk.compare(np.vstack([a[1:2]] * 3), np.vstack([b[1:2]] * 3)))
    assert all(math.isinf(v) for v in both_inf.kld.percentiles.values())
    d = s.to_dict()
    assert d["kld"]["mean"] == "inf"
    json.dumps(d, allow_nan=False)


def test_llama_percentile_and_median_rules():
    # hand-checked: N=5 sorted [1,2,3,4,10]: 90% -> p=3.6 -> 4 + 0.6*(10-4) = 7.6
    v = np.array([1, 2, 3, 4, 10], np.float32)
    assert _percentiles_llama(v, [90.0])["90"] == pytest.approx(7.6, rel=1e-6)
    assert _percentiles_llama(v, [10.0])["10"] == pytest.approx(1.4, rel=1e-6)
    assert _median_llama(v) == 3.0
    assert _median_llama(np.array([1, 2, 3, 10], np.float32)) == 2.5


def test_accumulator_chunks_equal_one_call_bitwise():
    rng = np.random.default_rng(2)
    a, b, y, st = random_stats(rng, n=999, v=129)
    acc = fk.Accumulator()
    for lo in range(0, 999, 100):
        acc.add(a[lo:lo + 100], b[lo:lo + 100], y[lo:lo + 100])
    assert acc.summary() == fk.summarize(st)
    left, right = fk.Accumulator(), fk.Accumulator()
    left.add(a[:500], b[:500], y[:500])
    right.add(a[500:], b[500:], y[500:])
    assert left.merge(right).summary() == fk.summarize(st)
    assert left.n_tokens == 500  # merge does not mutate


def test_summary_without_labels_has_no_ppl():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((20, 30)).astype(np.float32)
    s = fk.summarize(fk.compare(a, a * 1.1))
    assert not s.has_labels and s.delta_p is None and math.isnan(s.ppl_ratio)
    assert s.to_dict()["ppl_ratio"] is None
