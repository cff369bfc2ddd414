"""The fused kernel against the float64 reference, on every SIMD path this CPU has."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fidelity_kld as fk
from fidelity_kld import _core, reference

from _reference_checks import (CPU_TOL, check_stats, huge_logit_rows, llama_rows, make_pair,
                               masked_and_invalid_rows, random_logprobs)

AVAILABLE = _core.available_simd_levels()  # e.g. scalar, avx2, avx512 on x86-64; scalar, neon on aarch64
DTYPES = ["float32", "float16", "bfloat16"]

KLD_ATOL, KLD_RTOL = CPU_TOL["kld_atol"], CPU_TOL["kld_rtol"]


def check_against_reference(got, ref64, q64, labels=None):
    check_stats(got, ref64, q64, labels, **CPU_TOL)


def encode(x32: np.ndarray, dtype: str):
    """(what the kernel gets, the float64 values it represents)."""
    if dtype == "float32":
        return x32, x32.astype(np.float64)
    if dtype == "float16":
        h = x32.astype(np.float16)
        return h, h.astype(np.float64)
    u = reference.float32_to_bf16(x32)
    return fk.Logits(u, "bfloat16", x32.shape[1]), reference.bf16_to_float32(u).astype(np.float64)






SHAPES = [(1, 1), (3, 7), (1000, 7), (3, 1271), (1000, 1271), (3, 32000), (1, 152064), (3, 152064)]
# The CPU kernel takes a row pair larger than 256 KB a vocabulary tile of 1024 entries at a
# time (csrc/cpu/row_kernel.h): 67 whole tiles and a short last one with a scalar tail, a
# 274 KB pair in float16 or bfloat16.
TILE = 1024
TILED_V = 67 * TILE + 37


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", SHAPES)
def test_matches_reference(simd, dtype, n, v):
    rng = np.random.default_rng([n, v, DTYPES.index(dtype)])
    a32, b32 = make_pair(rng, n, v, scale=float(rng.choice([2.0, 5.0, 10.0])))
    a, a64 = encode(a32, dtype)
    b, b64 = encode(b32, dtype)
    labels = rng.integers(0, v, n)
    got = fk.compare(a, b, labels, simd=simd)
    check_against_reference(got, a64, b64, labels)


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("noise", [1e-4, 1e-3, 1e-2])
@pytest.mark.parametrize("v", [8000, 32000, 152064])
def test_near_identical_rows(simd, noise, v):
    """KLD ~ 1e-8..1e-4, where sum p*(a-b) - lse_a + lse_b in float32 cancels badly (rows
    taken whole at V = 8000 and 32000, in 149 vocabulary tiles at 152064)."""
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((64 if v < 100000 else 16, v)) * 8 + 20).astype(np.float32)  # lse ~ 60
    b = (a + rng.standard_normal(a.shape).astype(np.float32) * noise).astype(np.float32)
    got = fk.compare(a, b, simd=simd)
    want = reference.logit_stats(a, b)
    err = np.abs(got.kld - want["kld"])
    assert np.all(err <= KLD_ATOL + KLD_RTOL * want["kld"])
    # and well below the bar for the smallest divergences
    assert np.max(err) < 2e-7


@pytest.mark.parametrize("simd", AVAILABLE)
def test_shifted_rows_have_zero_kld(simd):
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((16, 1271)) * 4).astype(np.float32)
    got = fk.compare(a, a + np.float32(3.0), simd=simd)
    assert np.all(np.abs(got.kld) < 1e-6)


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_self_kld_is_zero(simd, dtype):
    rng = np.random.default_rng(11)
    a, _ = encode((rng.standard_normal((50, 4099)) * 6).astype(np.float32), dtype)
    got = fk.compare(a, a, simd=simd)
    assert np.all(np.abs(got.kld) <= 1e-7)
    assert np.all(np.abs(got.kld_reverse) <= 1e-7)
    assert np.all(got.kld >= -1e-6)
    np.testing.assert_array_equal(got.lse_ref, got.lse_q)


@pytest.mark.parametrize("simd", AVAILABLE)
def test_kld_nonnegative_within_rounding(simd):
    rng = np.random.default_rng(5)
    a, b = make_pair(rng, 500, 513, noise=1e-3)
    got = fk.compare(a, b, simd=simd)
    assert np.all(got.kld >= -1e-6) and np.all(got.kld_reverse >= -1e-6)


@pytest.mark.parametrize("simd", AVAILABLE)
def test_probabilities_sum_to_one(simd):
    """Summing p(y) over every label y of one row gives 1 (exercises lse and the label path)."""
    rng = np.random.default_rng(2)
    v = 1271
    row = (rng.standard_normal(v) * 5).astype(np.float32)
    a = np.repeat(row[None, :], v, axis=0)
    b = np.repeat((row + 0.5 * rng.standard_normal(v)).astype(np.float32)[None, :], v, axis=0)
    got = fk.compare(a, b, np.arange(v), simd=simd)
    assert abs(got.p_ref_y.sum() - 1.0) < 1e-6
    assert abs(got.p_q_y.sum() - 1.0) < 1e-6


@pytest.mark.parametrize("simd", AVAILABLE)
def test_ties_go_to_lowest_index(simd):
    v = 100
    a = np.zeros((4, v), dtype=np.float32)
    a[0, [17, 40, 99]] = 5.0
    a[1, [0, 1]] = 2.0
    a[2, :] = 1.0  # constant row: argmax 0
    a[3, [63, 64, 95]] = 7.0  # across a SIMD-vector boundary and in the tail
    got = fk.compare(a, a[::-1].copy(), simd=simd)
    np.testing.assert_array_equal(got.top1_ref, [17, 0, 0, 63])
    np.testing.assert_array_equal(got.top1_q, [63, 0, 0, 17])


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("v", [1000, TILED_V])
def test_masked_vocab_and_invalid_rows(simd, v):
    """(With v = TILED_V the masked spans cover whole tiles: the first tiles all -inf on one
    side or both, a masked tile between fast ones, the max in the last tile.)"""
    a, b = masked_and_invalid_rows(v)
    got = fk.compare(a, b, np.random.default_rng(9).integers(0, v, a.shape[0]), simd=simd)
    for threads in (1, 3):  # rows taken whole and tiled alike on every thread count
        again = fk.compare(a, b, got.labels, simd=simd, threads=threads)
        np.testing.assert_array_equal(again.kld, got.kld)
    check_against_reference(got, a.astype(np.float64), b.astype(np.float64), got.labels)
    assert np.isfinite(got.kld[0]) and np.isinf(got.kld_reverse[0])
    assert np.isposinf(got.kld[1]) and np.isfinite(got.kld_reverse[1])
    assert np.isfinite(got.kld[2]) and np.isfinite(got.kld_reverse[2])
    assert np.all(np.isnan(got.kld[3:6])) and np.all(got.top1_ref[3:6] == -1)
    assert not got.valid[3:6].any() and got.valid[[0, 1, 2, 6, 7]].all()
    assert abs(got.entropy_ref[6] - np.log(v)) < 1e-6


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("v", [3000, TILED_V])
def test_huge_logits(simd, v):
    """Finite rows up to 1e37 stay finite and exact (the shift's rounding must not reach 2^t)."""
    a, b = huge_logit_rows(v)
    got = fk.compare(a, b, simd=simd)
    check_against_reference(got, a.astype(np.float64), b.astype(np.float64))


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_maxima_growing_across_tiles(simd, dtype):
    """Rows whose running max grows from tile to tile, the sums so far carried to each new
    shift: by a few nats, by 800 nats (the earlier tiles' weights underflow to 0), only on one
    side, in the scalar tail; a max tied across tiles (top-1 is the first); a masked tile
    after a jump; labels in early tiles (their probability rescaled)."""
    rng = np.random.default_rng([TILE, DTYPES.index(dtype)])
    n, v = 10, TILED_V
    a32 = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    b32 = (a32 + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    starts = np.arange(0, v, TILE)
    for k, lo in enumerate(starts[:9]):
        a32[0, lo + 5] = 4.0 * k + 10  # both sides grow in every tile
        b32[0, lo + 9] = 4.0 * k + 11
        a32[1, lo + 3] = 4.0 * k + 10  # the reference grows, the model's max stays in tile 0
    b32[1, 100] = 40.0
    a32[2, :4 * TILE] -= 800.0  # the last tiles 800 nats above the first ones
    b32[2, :4 * TILE] -= 790.0
    a32[3, -1] = 30.0  # the max in the scalar tail
    b32[3, -2] = 30.0
    a32[4, [3, 2 * TILE + 3, 4 * TILE]] = 25.0  # a tie across tiles
    b32[4, [4 * TILE + 7, TILE + 1]] = 25.0
    a32[5, 3 * TILE:] += 20.0  # a jump, then a masked tile on both sides
    b32[5, 3 * TILE:] += 20.0
    a32[5, 4 * TILE: 5 * TILE] = -np.inf
    b32[5, 4 * TILE: 5 * TILE] = -np.inf
    big = 1e6 if dtype != "float16" else 0.0  # (beyond float16's range)
    a32[6, 2 * TILE:] += big  # past 2^20 from tile 2 on: the masked path's convention
    b32[6, 2 * TILE:] += big
    a32[7, :TILE] -= big  # the other way: a first tile past -2^20, later ones normal
    b32[7, :TILE] -= big
    a32[8, :TILE] -= 800.0  # q masked where p's weight, once the max has grown, is 0 even
    b32[8, 10:20] = -np.inf  # in float64: an infinite first tile's term must vanish, not NaN
    a, a64 = encode(a32, dtype)
    b, b64 = encode(b32, dtype)
    labels = rng.integers(0, TILE, n)  # in the first tile
    got = fk.compare(a, b, labels, simd=simd)
    check_against_reference(got, a64, b64, labels)
    assert got.top1_ref[4] == 3 and got.top1_q[4] == TILE + 1
    assert np.isfinite(got.kld[8])


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("q_kind", ["bfloat16", "llama_u16"])
@pytest.mark.parametrize("v", [3001, TILED_V])
def test_llama_parity_mode(simd, q_kind, v):
    """A llama.cpp reference in parity mode: nll_ref = -logprob(y) as stored, kld_llama over
    logprob > -16; a llama.cpp quant file's rows are log-probs used as they are."""
    rng = np.random.default_rng(17)
    n = 7
    raw, ref64 = llama_rows(random_logprobs(rng, n, v), 2.0**-10, -60.0)
    noisy = (ref64 + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    if q_kind == "llama_u16":
        q_raw, q64 = llama_rows(np.minimum(noisy.astype(np.float64), 0.0), 2.0**-10, -60.0)
        q = fk.Logits(q_raw, "llama_u16", v)
    else:
        q, q64 = encode(noisy, q_kind)
    labels = rng.integers(0, v, n)
    # scale 2^-10 spans a wider window than llama.cpp writes (the corrupt-row screen would
    # refuse it): the core's decode arithmetic is what is tested here
    got = fk.compare(fk.Logits(raw, "llama_u16", v), q, labels, llama_parity=True, simd=simd,
                     bad_rows="keep")
    check_stats(got, ref64, q64, labels, llama_parity=True, q_logprobs=q_kind == "llama_u16",
                **CPU_TOL)


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("v", [32000, TILED_V])
def test_bitwise_identical_across_thread_counts(simd, v):
    rng = np.random.default_rng(4)
    a, b = make_pair(rng, 97, v)
    a, b = a.astype(np.float16), b.astype(np.float16)
    y = rng.integers(0, v, 97)
    base = fk.compare(a, b, y, threads=1, simd=simd).as_dict()
    for threads in (2, 3, 8):
        other = fk.compare(a, b, y, threads=threads, simd=simd).as_dict()
        for key, val in base.items():
            np.testing.assert_array_equal(other[key], val, err_msg=f"{key} threads={threads}")


@pytest.mark.parametrize("simd", AVAILABLE)
def test_strided_and_mixed_dtype_inputs(simd):
    rng = np.random.default_rng(6)
    wide = (rng.standard_normal((20, 1300)) * 4).astype(np.float32)
    a = wide[::2, :1271]  # row stride 2*1300 elements, rows narrower than the buffer
    b_full = (wide + 0.3 * rng.standard_normal(wide.shape)).astype(np.float32)
    b_u16 = reference.float32_to_bf16(b_full[::2, :1271])
    got = fk.compare(a, fk.Logits(b_u16, "bfloat16", 1271), simd=simd)
    check_against_reference(got, a.astype(np.float64), reference.bf16_to_float32(b_u16).astype(np.float64))


def test_negative_stride_and_other_float_types_are_normalised():
    rng = np.random.default_rng(8)
    a = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    b = (a + 0.1).astype(np.float64)[::-1]  # float64, reversed rows
    got = fk.compare(a[::-1], b)
    check_against_reference(got, a[::-1].astype(np.float64), b)


def test_input_errors():
    a = np.zeros((3, 10), np.float32)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fk.compare(a, np.zeros((3, 11), np.float32))
    with pytest.raises(ValueError, match="token count mismatch"):
        fk.compare(a, np.zeros((4, 10), np.float32))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fk.compare(a, a, [0, 10, 1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fk.compare(a, a, [0, -1, 1])
    with pytest.raises(ValueError, match="labels has 2 entries"):
        fk.compare(a, a, [0, 1])
    with pytest.raises(ValueError, match="uint16"):
        fk.compare(a.view(np.uint16)[:, :10], a)
    with pytest.raises(ValueError, match="must be"):
        fk.compare(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32))


def test_empty_input():
    got = fk.compare(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32))
    assert got.n_tokens == 0


def test_torch_and_dlpack_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    a, b = make_pair(rng, 5, 777)
    want = fk.compare(a, b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_array_equal(fk.compare(ta, tb).kld, want.kld)
    got_bf16 = fk.compare(ta.bfloat16(), tb.bfloat16())
    a16 = reference.bf16_to_float32(reference.float32_to_bf16(a)).astype(np.float64)
    b16 = reference.bf16_to_float32(reference.float32_to_bf16(b)).astype(np.float64)
    check_against_reference(got_bf16, a16, b16)

    class OnlyDlpack:
        def __init__(self, arr):
            self._arr = arr

        def __dlpack__(self, **kw):
            return self._arr.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self._arr.__dlpack_device__()

    np.testing.assert_array_equal(fk.compare(OnlyDlpack(a), OnlyDlpack(b)).kld, want.kld)


def test_env_var_forces_lower_simd_level():
    code = "from fidelity_kld import _core; print(_core.simd_level, _core.active_simd_level())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FIDELITY_KLD_SIMD": "scalar"}, check=True)
    assert out.stdout.split() == ["scalar", "scalar"]


def test_available_levels_end_at_the_active_one():
    assert AVAILABLE[0] == "scalar" and AVAILABLE[-1] == _core.active_simd_level()
    assert AVAILABLE in (["scalar"], ["scalar", "avx2"], ["scalar", "avx2", "avx512"],
                         ["scalar", "neon"])


def test_simd_level_not_here_is_refused():
    """A level above this CPU's, or of another architecture (neon on x86-64, avx2 on aarch64)."""
    missing = [s for s in ("avx2", "avx512", "neon") if s not in AVAILABLE]
    for simd in missing:
        with pytest.raises(ValueError, match="not available"):
            fk.compare(np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32), simd=simd)
    with pytest.raises(ValueError, match="simd must be"):
        fk.compare(np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32), simd="sse2")


def test_env_var_of_another_architecture_is_refused():
    other = "avx2" if _core.active_simd_level() == "neon" else "neon"
    code = "from fidelity_kld import _core"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FIDELITY_KLD_SIMD": other})
    assert out.returncode != 0 and "another architecture" in out.stderr


def _multi_cases(rng, n, v):
    """A reference and seven models of mixed kinds: plain, masked entries, a NaN row, huge
    magnitudes, an identical copy, and two of other dtypes."""
    a, _ = make_pair(rng, n, v)
    a[2, : v // 3] = -np.inf  # the reference masked on one row: every model takes the masked path
    models = []
    for j in range(5):
        b = (a + rng.standard_normal((n, v)).astype(np.float32) * 0.1 * (j + 1)).astype(np.float32)
        b[2] = np.where(np.isinf(a[2]), -np.inf, b[2])
        models.append(b)
    models[1][4, 7] = np.nan  # an invalid row for one model only
    models[2][5, 100:200] = -np.inf  # q masked where p has mass: KLD +inf on that row
    models[3][6] *= 1e7  # a huge row for one model
    models[4] = a.copy()  # identical to the reference
    models[0][3, : v // 2] = -np.inf  # one model's first half masked (tiled: its first tiles)
    return a, models


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("v", [1271, TILED_V])
def test_compare_many_is_compare_bitwise(simd, m, v):
    """Each model's results from compare_many are bitwise those of compare alone, for every
    group size (groups of 4, 2, 1), masked and invalid rows, and models of other dtypes."""
    rng = np.random.default_rng([m, ("scalar", "avx2", "avx512", "neon").index(simd)])
    n = 9
    a, models = _multi_cases(rng, n, v)
    qs = models + [encode(models[0], "float16")[0], encode(models[1], "bfloat16")[0]]
    qs = qs[:m]
    labels = rng.integers(0, v, n)
    many = fk.compare_many(a, qs, labels, simd=simd)
    assert len(many) == m
    for q, got in zip(qs, many):
        want = fk.compare(a, q, labels, simd=simd)
        for key, w in want.as_dict().items():
            np.testing.assert_array_equal(got.as_dict()[key], w, err_msg=key)
    # and, independently, the first model against the float64 oracle
    check_against_reference(many[0], a.astype(np.float64), models[0].astype(np.float64), labels)


@pytest.mark.parametrize("simd", AVAILABLE)
@pytest.mark.parametrize("v", [2001, TILED_V])
def test_compare_many_llama_parity(simd, v):
    rng = np.random.default_rng(23)
    n = 6
    raw, ref64 = llama_rows(random_logprobs(rng, n, v), 2.0**-10, -60.0)
    ref = fk.Logits(raw, "llama_u16", v)
    qs = []
    for j in range(5):
        q_raw, _ = llama_rows(np.minimum(ref64 + 0.2 * (j + 1) * rng.standard_normal((n, v)), 0.0),
                              2.0**-10, -60.0)
        qs.append(fk.Logits(q_raw, "llama_u16", v))
    labels = rng.integers(0, v, n)
    many = fk.compare_many(ref, qs, labels, llama_parity=True, simd=simd, bad_rows="keep")
    for q, got in zip(qs, many):  # (rows of scale 2^-10: see test_llama_parity_mode)
        want = fk.compare(ref, q, labels, llama_parity=True, simd=simd, bad_rows="keep")
        for key, w in want.as_dict().items():
            np.testing.assert_array_equal(got.as_dict()[key], w, err_msg=key)


def test_compare_many_errors():
    a = np.zeros((3, 10), np.float32)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fk.compare_many(a, [a, np.zeros((3, 11), np.float32)])
    with pytest.raises(ValueError, match="token count mismatch"):
        fk.compare_many(a, [np.zeros((2, 10), np.float32)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fk.compare_many(a, [a, a], [0, 1, 10])
    assert fk.compare_many(a, []) == []
