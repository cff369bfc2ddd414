"""Issue 16's optional outputs of the fused CPU core (compare/compare_many ``extra=``) against
the float64 oracle (reference.py), on every SIMD path this CPU has."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

import fidelity_kld as fk
from fidelity_kld import _core, reference
from fidelity_kld.ops import EXTRA_GROUPS, TokenStats

from _reference_checks import CPU_TOL, check_stats, llama_rows, random_logprobs

LEVELS = ["scalar", "avx2", "avx512"]
AVAILABLE = LEVELS[: LEVELS.index(_core.active_simd_level()) + 1]
DTYPES = ["float32", "float16", "bfloat16"]
EXTRA_NAMES = [n for names in EXTRA_GROUPS.values() for n in names]
# |got - want| <= atol + rtol * |want|; log-probs carry lse's error (float32 sums of 2^t)
LOGP_ATOL, LOGP_RTOL = 1e-6, 1e-5
DIST_ATOL, DIST_RTOL = CPU_TOL["kld_atol"], CPU_TOL["kld_rtol"]
TILED_V = 67 * 1024 + 37  # rows the CPU kernel takes in vocabulary tiles (test_logit_stats.py)


def encode(x32: np.ndarray, dtype: str):
    """(what the kernel gets, the float64 values it represents)."""
    if dtype == "float32":
        return x32, x32.astype(np.float64)
    if dtype == "float16":
        h = x32.astype(np.float16)
        return h, h.astype(np.float64)
    u = reference.float32_to_bf16(x32)
    return fk.Logits(u, "bfloat16", x32.shape[1]), reference.bf16_to_float32(u).astype(np.float64)


def special_rows(rng, v: int):
    """float32 (ref, q, labels) rows covering the rules of the optional outputs: ties for the
    max (top2 == top1), the label tied with the max at a later index, the label alone on top,
    masked -inf entries (the label among them), one finite entry, a uniform row, invalid rows
    (NaN, +inf, no finite entry) on either side, and plain random rows."""
    n = 24
    a = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    b = (a + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    y = rng.integers(0, v, n)
    last = v - 1
    if v >= 3:
        a[0, [1, last]] = a[0].max() + 2  # duplicate maxima: top2 == top1, margin 0 for them
        b[0, [0, last]] = b[0].max() + 2
        y[0] = last
        a[1, 0] = b[1, 0] = 9.0          # the label tied with the max at a later index
        a[1, last] = b[1, last] = 9.0
        y[1] = last
        a[2, :] = -np.inf                # the label masked, two finite entries
        a[2, [0, 1]] = [1.0, 0.5]
        b[2, ::2] = -np.inf
        b[2, 1] = 3.0
        y[2] = last if last % 2 == 0 else 2
        a[3, y[3]] = a[3].max() + 5       # the label alone on top
    a[4, :] = -np.inf                    # one finite entry: top2 = -inf, margin +inf
    a[4, y[4]] = 2.0
    b[4, :] = -np.inf
    b[4, 0] = 1.0
    a[5, :] = 1.5                        # uniform
    a[6, 0] = np.nan                     # invalid rows
    b[7, last] = np.inf
    a[8, :] = -np.inf
    b[9, :] = -np.inf
    b[10, :] = np.nan
    if v >= 2:
        a[11, 1:] = -np.inf              # a single finite entry on one side only
        y[11] = 0
    return a, b, y


def check_extra(got, want: dict, with_labels: bool, groups=tuple(EXTRA_GROUPS)):
    """The optional outputs of `groups` ("label" only with labels) of a backend (TokenStats
    or dict) against the oracle's; the others must be absent."""
    if hasattr(got, "as_dict"):
        got = got.as_dict()
    valid = ~np.isnan(want["kld"])
    names = [n for g in groups if with_labels or g != "label" for n in EXTRA_GROUPS[g]]
    for key in names:
        g, w = got[key], want[key]
        if key.startswith("rank"):
            assert g.dtype == np.int32
            np.testing.assert_array_equal(g, w, err_msg=key)  # -1 on invalid rows
            continue
        assert np.all(np.isnan(g[~valid])), key
        g, w = g[valid], w[valid]
        if key.startswith("margin"):  # a difference of two input values: exact
            np.testing.assert_array_equal(g, w, err_msg=key)
            continue
        np.testing.assert_array_equal(np.isfinite(g), np.isfinite(w), err_msg=key)
        np.testing.assert_array_equal(g[~np.isfinite(w)], w[~np.isfinite(w)], err_msg=key)
        f = np.isfinite(w)
        atol, rtol = (LOGP_ATOL, LOGP_RTOL) if key.startswith("logp") else (DIST_ATOL, DIST_RTOL)
        err = np.abs(g[f] - w[f])
        tol = atol + rtol * np.abs(w[f])
        assert np.all(err <= tol), f"{key}: worst excess {np.max(err - tol)} (max err {err.max()})"
    for key in EXTRA_NAMES:
        if key not in names:
            assert got.get(key) is None, key


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 2, 7, 37, 1271, TILED_V])
@pytest.mark.parametrize("with_labels", [True, False])
def test_compare_extra_matches_reference(simd, dtype, v, with_labels):
    rng = np.random.default_rng([v, DTYPES.index(dtype), with_labels])
    a32, b32, y = special_rows(rng, v)
    a, a64 = encode(a32, dtype)
    b, b64 = encode(b32, dtype)
    labels = y if with_labels else None
    got = fk.compare(a, b, labels, simd=simd, extra="all")
    want = reference.logit_stats(a64, b64, labels)
    check_stats(got, a64, b64, labels, **CPU_TOL)
    check_extra(got, want, with_labels)


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [37, 1271])
def test_ties_in_every_lane_and_chain(simd, dtype, v):
    """Small-integer logits (ties everywhere) and rows whose max occurs exactly twice, at
    random positions: the same lane, the other chain, the scalar tail; labels anywhere."""
    rng = np.random.default_rng([v, DTYPES.index(dtype), 3])
    n = 64
    a32 = rng.integers(-4, 4, (n, v)).astype(np.float32)
    b32 = rng.integers(-4, 4, (n, v)).astype(np.float32)
    for r in range(n // 2, n):  # exactly two maxima, and a unique second on the other side
        a32[r] = rng.standard_normal(v).astype(np.float32)
        a32[r, rng.choice(v, 2, replace=False)] = 10.0
        b32[r] = rng.standard_normal(v).astype(np.float32)
        b32[r, rng.integers(0, v)] = 10.0
    y = rng.integers(0, v, n)
    y[n // 2::2] = np.argmax(a32[n // 2::2] == 10.0, axis=1)  # the label on a tied max
    a, a64 = encode(a32, dtype)
    b, b64 = encode(b32, dtype)
    got = fk.compare(a, b, y, simd=simd, extra="all")
    check_extra(got, reference.logit_stats(a64, b64, y), with_labels=True)
    for st in fk.compare_many(a, [b, a, b, b, a], y, simd=simd, extra=["top2", "label"]):
        np.testing.assert_array_equal(st.rank_ref_y, got.rank_ref_y)
        np.testing.assert_array_equal(st.logp_top2_ref, got.logp_top2_ref)


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("v", [1271, TILED_V])
def test_compare_many_extra_matches_reference_and_compare(simd, dtype, m, with_labels, v):
    """Groups of 4, 2 and 1 models, masked and invalid rows among them: each model's optional
    outputs match the oracle and are bitwise those compare gives it alone."""
    rng = np.random.default_rng([m, DTYPES.index(dtype), with_labels, 16])
    a32, b32, y = special_rows(rng, v)
    labels = y if with_labels else None
    a, a64 = encode(a32, dtype)
    qs, q64s = [], []
    for j in range(m):
        q32 = b32 if j == 0 else (a32 + (0.1 + 0.2 * j) * rng.standard_normal(a32.shape)).astype(np.float32)
        q, q64 = encode(q32, dtype)
        qs.append(q)
        q64s.append(q64)
    many = fk.compare_many(a, qs, labels, simd=simd, extra="all")
    for j, (st, q, q64) in enumerate(zip(many, qs, q64s)):
        check_extra(st, reference.logit_stats(a64, q64, labels), with_labels)
        alone = fk.compare(a, q, labels, simd=simd, extra="all").as_dict()
        for key, val in st.as_dict().items():
            np.testing.assert_array_equal(val, alone[key], err_msg=f"model {j} {key}")


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("v", [7, 1271, 32000])
def test_outputs_off_are_bitwise_unchanged(simd, v):
    """Asking for the optional outputs leaves every default output bitwise as it was."""
    rng = np.random.default_rng(v)
    a32, b32, y = special_rows(rng, v)
    a, b = a32.astype(np.float16), b32.astype(np.float16)
    plain = fk.compare(a, b, y, simd=simd).as_dict()
    full = fk.compare(a, b, y, simd=simd, extra="all").as_dict()
    assert set(full) == set(plain) | set(EXTRA_NAMES)
    for key, val in plain.items():
        np.testing.assert_array_equal(full[key], val, err_msg=key)
    many_plain = fk.compare_many(a, [b, a, b], y, simd=simd)
    many_full = fk.compare_many(a, [b, a, b], y, simd=simd, extra=("top2", "tvd"))
    for p, f in zip(many_plain, many_full):
        for key, val in p.as_dict().items():
            np.testing.assert_array_equal(f.as_dict()[key], val, err_msg=key)


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("noise", [1e-5, 1e-3])
def test_near_identical_rows(simd, noise):
    """TVD ~ noise and JSD ~ noise^2: the series branch of JSD, no cancellation."""
    rng = np.random.default_rng(11)
    a = (rng.standard_normal((16, 32000)) * 4 + 10).astype(np.float32)
    b = (a + noise * rng.standard_normal(a.shape)).astype(np.float32)
    got = fk.compare(a, b, simd=simd, extra=("tvd", "jsd"))
    want = reference.logit_stats(a, b)
    check_extra(got, want, with_labels=False, groups=("tvd", "jsd"))
    # far inside the bar (measured: 5e-8 and 1e-13 at noise 1e-5); the float32 rounding of
    # t = (x - max)*log2e, up to 1e-6 relative per entry, is the limit for the smallest TVDs
    assert np.max(np.abs(got.tvd - want["tvd"])) < 1e-7 + 1e-3 * want["tvd"].max()
    assert np.max(np.abs(got.jsd - want["jsd"])) < 2e-13 + 1e-3 * want["jsd"].max()


@pytest.mark.parametrize("simd", AVAILABLE)
def test_disjoint_and_far_apart_rows(simd):
    """The log branch of JSD up to r = 1: disjoint supports give JSD = ln 2 and TVD = 1."""
    v = 1000
    a = np.full((3, v), -np.inf, np.float32)
    b = np.full((3, v), -np.inf, np.float32)
    a[0, :500], b[0, 500:] = 0.0, 0.0  # disjoint
    rng = np.random.default_rng(5)
    a[1], b[1] = rng.standard_normal(v) * 8, rng.standard_normal(v) * 8  # unrelated, peaked
    a[2], b[2] = 0.0, np.linspace(-30, 0, v)
    got = fk.compare(a, b, simd=simd, extra="all")
    check_extra(got, reference.logit_stats(a, b), with_labels=False)
    assert abs(got.tvd[0] - 1.0) < 1e-6 and abs(got.jsd[0] - np.log(2)) < 1e-6


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("q_kind", ["bfloat16", "llama_u16"])
def test_llama_parity_renormalises(simd, q_kind):
    """In llama parity mode too the optional outputs use each row's own renormalisation."""
    rng = np.random.default_rng(17)
    n, v = 7, 3001
    raw, ref64 = llama_rows(random_logprobs(rng, n, v), 2.0**-10, -60.0)
    noisy = (ref64 + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    if q_kind == "llama_u16":
        q_raw, q64 = llama_rows(np.minimum(noisy.astype(np.float64), 0.0), 2.0**-10, -60.0)
        q = fk.Logits(q_raw, "llama_u16", v)
    else:
        q, q64 = encode(noisy, q_kind)
    labels = rng.integers(0, v, n)
    # scale 2^-10 spans a wider window than llama.cpp writes (the corrupt-row screen would
    # refuse it): the core's arithmetic is what is tested here
    got = fk.compare(fk.Logits(raw, "llama_u16", v), q, labels, llama_parity=True, simd=simd,
                     extra="all", bad_rows="keep")
    want = reference.logit_stats(ref64, q64, labels, llama_parity=True,
                                 q_logprobs=q_kind == "llama_u16")
    check_extra(got, want, with_labels=True)


@pytest.mark.parametrize("simd", AVAILABLE)
def test_bitwise_identical_across_thread_counts(simd):
    rng = np.random.default_rng(4)
    a = (rng.standard_normal((40, 32000)) * 3).astype(np.float16)
    b = (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float16)
    y = rng.integers(0, 32000, 40)
    base = fk.compare(a, b, y, threads=1, simd=simd, extra="all").as_dict()
    for threads in (2, 5):
        other = fk.compare(a, b, y, threads=threads, simd=simd, extra="all").as_dict()
        for key, val in base.items():
            np.testing.assert_array_equal(other[key], val, err_msg=f"{key} threads={threads}")


def test_float64_inputs_are_not_unshifted():
    """float64 rows are shifted per row before the core; log-probs, margins, TVD and JSD are
    shift-free and come out as the oracle's on the original values."""
    rng = np.random.default_rng(21)
    a = rng.standard_normal((9, 500)) * 3 + 1e4
    b = a + 0.2 * rng.standard_normal(a.shape)
    y = rng.integers(0, 500, 9)
    got = fk.compare(a, b, y, extra="all")
    want = reference.logit_stats(a, b, y)
    for key in ("logp_top1_ref", "logp_top2_q", "tvd", "jsd", "margin_ref", "margin_q"):
        np.testing.assert_allclose(getattr(got, key), want[key], rtol=1e-4, atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(got.rank_ref_y, want["rank_ref_y"])


def test_group_selection_and_errors():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 50)).astype(np.float32)
    b = (a + 0.1).astype(np.float32)
    y = np.array([0, 1, 2])
    st = fk.compare(a, b, extra=["tvd"])
    assert st.tvd is not None and st.jsd is None and st.logp_top1_ref is None
    st = fk.compare(a, b, extra="all")  # no labels: every group but "label"
    assert st.jsd is not None and st.logp_top2_q is not None and st.rank_ref_y is None
    st = fk.compare(a, b, y, extra=("label",))
    assert st.rank_q_y.dtype == np.int32 and st.margin_q is not None and st.tvd is None
    with pytest.raises(ValueError, match="'top3'"):
        fk.compare(a, b, y, extra=["top3"])
    with pytest.raises(ValueError, match="needs labels"):
        fk.compare(a, b, extra=["label"])
    with pytest.raises(ValueError, match="needs labels"):
        fk.compare_many(a, [b, b], extra="label")
    with pytest.raises(ValueError, match="'TVD'"):
        fk.compare_many(a, [b], extra="TVD")


def test_token_stats_carry_the_new_fields():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 40)).astype(np.float32)
    b = (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32)
    y = rng.integers(0, 40, 6)
    st = fk.compare(a, b, y, extra="all")
    both = TokenStats.concat([st, st])
    assert both.rank_ref_y.shape == (12,) and both.jsd.shape == (12,)
    np.testing.assert_array_equal(both.margin_q[6:], st.margin_q)
    bad = st.invalidated(np.arange(6) == 2)
    assert bad.rank_q_y[2] == -1 and np.isnan(bad.tvd[2]) and np.isnan(bad.logp_top2_ref[2])
    assert bad.rank_q_y[3] == st.rank_q_y[3]
    assert set(EXTRA_NAMES) <= set(st.as_dict())
    mixed = TokenStats.concat([st, fk.compare(a, b, y)])  # a part without them: None
    assert mixed.tvd is None and mixed.kld.shape == (12,)


def test_oracle_tvd_jsd_agree_with_scipy():
    """The oracle's own definitions against scipy (JSD = jensenshannon^2 in nats) and the
    acceptance-rate form of TVD (1 - sum min(p, q))."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 300)) * 3
    b = a + rng.standard_normal(a.shape)
    a[0, :100] = -np.inf
    want = reference.logit_stats(a, b)
    p = np.exp(a - want["lse_ref"][:, None])
    q = np.exp(b - want["lse_q"][:, None])
    np.testing.assert_allclose(want["jsd"], jensenshannon(p, q, axis=1) ** 2, rtol=1e-10)
    np.testing.assert_allclose(want["tvd"], 1 - np.minimum(p, q).sum(axis=1), rtol=1e-10, atol=1e-14)


def test_streaming_and_distributed_paths_pass_extra_through(tmp_path):
    """stream.compare_sources (the CLI's path, chunk by chunk) and a distributed task's
    compare_range give the optional outputs bitwise as compare_many does in one call."""
    from fidelity_kld import distributed
    from fidelity_kld.io import open_source
    from fidelity_kld.stream import compare_sources

    rng = np.random.default_rng(12)
    n, v = 60, 1271
    ref = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    qs = [(ref + s * rng.standard_normal((n, v))).astype(np.float32) for s in (0.1, 0.3)]
    y = rng.integers(0, v, n)
    for name, x in (("ref", ref), ("q1", qs[0]), ("q2", qs[1])):
        np.save(tmp_path / f"{name}.npy", x)
    want = fk.compare_many(ref, qs, y, extra="all")
    paths = [tmp_path / f"{name}.npy" for name in ("ref", "q1", "q2")]
    srcs = [open_source(p) for p in paths]
    try:
        streamed = compare_sources(srcs[0], srcs[1:], labels=y, chunk_bytes=40 * 3 * v * 4,
                                   extra="all")
        ranges = distributed.plan(srcs[0], srcs[1:], tasks=3, prompt_ids=None)
        packed = [distributed.compare_range(r, y[r.start:r.stop], threads=1, llama_parity=False,
                                            chunk_bytes=1 << 20, device="cpu", extra="all")
                  for r in ranges]
    finally:
        for src in srcs:
            src.close()
    assert len(ranges) > 1
    for got in (streamed, distributed._unpack(packed, 2)):
        for st, w in zip(got, want):
            for key, val in w.as_dict().items():
                np.testing.assert_array_equal(getattr(st, key), val, err_msg=key)
