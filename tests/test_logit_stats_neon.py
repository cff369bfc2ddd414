"""The aarch64 NEON path, built here with Debian's cross compiler (g++-aarch64-linux-gnu) from
the project's own CMakeLists.txt and run under qemu-user (qemu-user-static): its outputs
against the float64 oracle (reference.py) on random and adversarial rows for every input dtype
and for logit_stats_multi, NEON against scalar, and bitwise the same on 1, 2 and 3 threads.
Speed under emulation means nothing; only results are checked. Skips without the tools."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fidelity_kld import reference

from _reference_checks import (CPU_TOL, check_stats, huge_logit_rows, llama_rows, make_pair,
                               masked_and_invalid_rows, random_logprobs)

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
SYSROOT = "/usr/aarch64-linux-gnu"  # the cross toolchain's libc and libstdc++
CMAKE = shutil.which("cmake")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CXX and QEMU and CMAKE and os.path.isdir(SYSROOT)),
                       reason="needs aarch64-linux-gnu-g++, qemu-aarch64(-static) and cmake"),
]

FIELDS = ["kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref", "top1_ref", "top1_q",
          "nll_ref", "nll_q", "p_ref_y", "p_q_y", "kld_llama"]
EXTRA_FIELDS = ["logp_top1_ref", "logp_top1_q", "logp_top2_ref", "logp_top2_q", "tvd", "jsd",
                "rank_ref_y", "rank_q_y", "margin_ref", "margin_q"]
THREADS = (1, 2, 3)  # the driver's order
LEVELS = ["scalar", "neon"]


def _run(cmd, **kw):
    """subprocess.run that shows the command's stderr when it fails."""
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd[0]} exited {out.returncode}:\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def drivers(tmp_path_factory) -> Path:
    """csrc/tests' drivers cross-compiled for aarch64 (Release, the shipped flags)."""
    build = tmp_path_factory.mktemp("aarch64-build")
    _run([CMAKE, "-S", ROOT, "-B", build, "-DCMAKE_SYSTEM_NAME=Linux",
          "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_CXX_COMPILER={CXX}",
          "-DCMAKE_BUILD_TYPE=Release", "-DFK_TEST_DRIVERS=ON"])
    _run([CMAKE, "--build", build, "-j2", "--target", "logit_stats_driver", "sanitize_driver"])
    return build / "csrc" / "tests"


def qemu(drivers: Path, name: str, *args, simd: str | None = None, check=True, extra=False):
    env = {k: v for k, v in os.environ.items() if k not in ("FIDELITY_KLD_SIMD", "FK_DRIVER_EXTRA")}
    if extra:
        env["FK_DRIVER_EXTRA"] = "1"
    if simd is not None:
        env["FIDELITY_KLD_SIMD"] = simd
    cmd = [QEMU, "-L", SYSROOT, drivers / name, *args]
    if check:
        return _run(cmd, env=env)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)


def run_driver(drivers, tmp_path, ref_raw, ref_dtype, q_raws, q_dtype, vocab, labels=None,
               llama=False, extra=False):
    """Every output of the driver: [level, threads, (single, multi), model, field, row]."""
    n = ref_raw.shape[0]
    paths = []
    for k, raw in enumerate([ref_raw, *q_raws]):
        paths.append(tmp_path / f"m{k}.bin")
        np.ascontiguousarray(raw).tofile(paths[-1])
    lab = "-"
    if labels is not None:
        lab = tmp_path / "labels.bin"
        np.asarray(labels, dtype="<i8").tofile(lab)
    out = tmp_path / "out.bin"
    qemu(drivers, "logit_stats_driver", out, n, vocab, lab, int(llama), paths[0], ref_dtype,
         q_dtype, *paths[1:], extra=extra)
    got = np.fromfile(out, dtype="<f8")
    fields = len(FIELDS) + (len(EXTRA_FIELDS) if extra else 0)
    return got.reshape(len(LEVELS), len(THREADS), 2, len(q_raws), fields, n)


def as_dict(arr) -> dict:
    d = {name: arr[k] for k, name in enumerate(FIELDS)}
    d["top1_ref"] = d["top1_ref"].astype(np.int32)
    d["top1_q"] = d["top1_q"].astype(np.int32)
    return d


def check_all(got, ref64, q64s, labels=None, llama=False, q_logprobs=False):
    """Bitwise across threads and single/multi; each level against the oracle; NEON ~ scalar."""
    bits = got.view(np.uint64)
    for t in range(1, len(THREADS)):
        assert np.array_equal(bits[:, t], bits[:, 0]), f"{THREADS[t]} threads differ from 1"
    assert np.array_equal(bits[:, :, 1], bits[:, :, 0]), "logit_stats_multi differs from logit_stats"
    for lv, level in enumerate(LEVELS):
        for j, q64 in enumerate(q64s):
            out = as_dict(got[lv, 0, 0, j])
            try:
                check_stats(out, ref64, q64, labels, llama_parity=llama, q_logprobs=q_logprobs,
                            **CPU_TOL)
            except AssertionError as e:
                raise AssertionError(f"{level}, model {j}: {e}") from None
    neon, scalar = got[1, 0, 0], got[0, 0, 0]
    valid = ~np.isnan(scalar[:, 0])
    np.testing.assert_array_equal(np.isnan(neon[:, 0]), ~valid)
    np.testing.assert_array_equal(neon[:, 5:7], scalar[:, 5:7])  # top1
    finite = valid & np.isfinite(scalar[:, 0]) & np.isfinite(scalar[:, 1])
    for k in (0, 1, 4):  # kld, kld_reverse, entropy
        g, w = neon[:, k][finite], scalar[:, k][finite]
        assert np.all(np.abs(g - w) <= 2e-6 + 2e-4 * np.abs(w)), FIELDS[k]


def encode(x32: np.ndarray, dtype: str):
    """(raw rows the driver reads, the float64 values they decode to)."""
    if dtype == "float32":
        return x32, x32.astype(np.float64)
    if dtype == "float16":
        h = x32.astype(np.float16)
        return h, h.astype(np.float64)
    u = reference.float32_to_bf16(x32)
    return u, reference.bf16_to_float32(u).astype(np.float64)


def models_of(rng, a32):
    """Five models of one reference (a group of four, then one): near, far, masked entries,
    a NaN row, and an exact copy."""
    n, v = a32.shape
    near = a32 + rng.standard_normal(a32.shape).astype(np.float32) * 0.05
    far = a32 + rng.standard_normal(a32.shape).astype(np.float32) * 1.0
    masked = near.copy()
    masked[1, : v // 3] = -np.inf  # p has mass where q has none: +inf KLD
    nan = far.copy()
    nan[2, v // 2] = np.nan
    return [near.astype(np.float32), far.astype(np.float32), masked, nan, a32.copy()]


def test_simd_level_is_neon(drivers):
    out = qemu(drivers, "logit_stats_driver", "--levels").stdout.split("\n")
    assert out[0].split() == ["scalar", "neon"] and out[1] == "neon"
    out = qemu(drivers, "logit_stats_driver", "--levels", simd="scalar").stdout.split("\n")
    assert out[0].split() == ["scalar"] and out[1] == "scalar"
    out = qemu(drivers, "logit_stats_driver", "--levels", simd="neon").stdout.split("\n")
    assert out[0].split() == ["scalar", "neon"] and out[1] == "neon"
    for other in ("avx2", "avx512"):
        bad = qemu(drivers, "logit_stats_driver", "--levels", simd=other, check=False)
        assert bad.returncode == 1 and "another architecture" in bad.stderr


def test_core_self_checks(drivers):
    """sanitize_driver's checks (every dtype pair, vocabularies around the vector width, padded
    strides, masks, invalid rows, huge values, labels, llama parity, multi == single, float64
    reference for float32), here without sanitizers, on scalar and neon."""
    out = qemu(drivers, "sanitize_driver")
    assert "0 failed, SIMD levels up to neon" in out.stdout


@pytest.mark.parametrize("ref_dtype,q_dtype", [("float32", "float32"), ("float16", "float16"),
                                               ("bfloat16", "bfloat16"), ("float16", "float32")])
def test_random_rows_every_dtype(drivers, tmp_path, ref_dtype, q_dtype):
    rng = np.random.default_rng([3, len(ref_dtype), len(q_dtype)])
    n, v = 48, 4099  # odd: a scalar tail; 48 rows split over 3 threads
    a32, _ = make_pair(rng, n, v, scale=5.0)
    a32[5, [11, 700, 4098]] = a32[5].max() + 1  # tie for the max: lowest index wins
    a32[6, :] = -np.inf
    a32[6, 3000] = 1.5  # one finite entry
    a_raw, a64 = encode(a32, ref_dtype)
    qs = [encode(b, q_dtype) for b in models_of(rng, a32)]
    labels = rng.integers(0, v, n)
    got = run_driver(drivers, tmp_path, a_raw, ref_dtype, [q for q, _ in qs], q_dtype, v, labels)
    check_all(got, a64, [q64 for _, q64 in qs], labels)


def test_masked_invalid_and_huge_rows(drivers, tmp_path):
    for k, (a, b) in enumerate([masked_and_invalid_rows(1001), huge_logit_rows(3001)]):
        d = tmp_path / str(k)
        d.mkdir()
        got = run_driver(drivers, d, a, "float32", [b, a.copy()], "float32", a.shape[1])
        check_all(got, a.astype(np.float64), [b.astype(np.float64), a.astype(np.float64)])


def test_near_identical_rows(drivers, tmp_path):
    """KLD ~ 1e-8..1e-4 at lse ~ 60 (cancellation if done naively), each noise level a model."""
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((12, 32000)) * 8 + 20).astype(np.float32)
    qs = [(a + rng.standard_normal(a.shape).astype(np.float32) * s).astype(np.float32)
          for s in (1e-4, 1e-3, 1e-2)]
    got = run_driver(drivers, tmp_path, a, "float32", qs, "float32", a.shape[1])
    check_all(got, a.astype(np.float64), [q.astype(np.float64) for q in qs])
    for j, q in enumerate(qs):
        want = reference.logit_stats(a, q)["kld"]
        assert np.max(np.abs(got[1, 0, 0, j, 0] - want)) < 2e-7


@pytest.mark.parametrize("v", [1, 3, 37])
def test_tiny_vocabularies(drivers, tmp_path, v):
    """Vocabularies with no full vector, or one and a tail, with -inf entries."""
    rng = np.random.default_rng(v)
    a = (rng.standard_normal((9, v)) * 3).astype(np.float32)
    b = (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32)
    if v > 1:
        a[0, 0] = b[0, 0] = -np.inf
        b[1, v - 1] = -np.inf
    labels = rng.integers(0, v, 9)
    got = run_driver(drivers, tmp_path, a, "float32", [b], "float32", v, labels)
    check_all(got, a.astype(np.float64), [b.astype(np.float64)], labels)


@pytest.mark.parametrize("q_kind", ["float32", "llama_u16"])
def test_llama_parity(drivers, tmp_path, q_kind):
    rng = np.random.default_rng(17)
    n, v = 40, 3001
    raw, ref64 = llama_rows(random_logprobs(rng, n, v), 2.0**-10, -60.0)
    raw = raw[:, : 4 + v]  # the driver's rows have no padding word
    qs, q64s = [], []
    for j in range(5):
        noisy = ref64 + 0.2 * (j + 1) * rng.standard_normal((n, v))
        if q_kind == "llama_u16":
            q_raw, q64 = llama_rows(np.minimum(noisy, 0.0), 2.0**-10, -60.0)
            qs.append(q_raw[:, : 4 + v])
        else:
            q32 = noisy.astype(np.float32)
            qs.append(q32)
            q64 = q32.astype(np.float64)
        q64s.append(q64)
    labels = rng.integers(0, v, n)
    got = run_driver(drivers, tmp_path, raw, "llama_u16", qs, q_kind, v, labels, llama=True)
    check_all(got, ref64, q64s, labels, llama=True, q_logprobs=q_kind == "llama_u16")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_optional_outputs(drivers, tmp_path, dtype, with_labels):
    """Issue 16's optional outputs on the NEON path (its count, max-below, log and blend ops):
    against the oracle, bitwise across threads and single/multi."""
    from test_direction_outputs import check_extra, special_rows
    rng = np.random.default_rng([len(dtype), with_labels])
    v = 1271
    a32, b32, y = special_rows(rng, v)
    labels = y if with_labels else None
    a_raw, a64 = encode(a32, dtype)
    b_raw, b64 = encode(b32, dtype)
    got = run_driver(drivers, tmp_path, a_raw, dtype, [b_raw, a_raw.copy()], dtype, v, labels,
                     extra=True)
    check_all(got[:, :, :, :, : len(FIELDS)], a64, [b64, a64], labels)
    bits = got.view(np.uint64)
    for t in range(1, len(THREADS)):
        assert np.array_equal(bits[:, t], bits[:, 0])
    assert np.array_equal(bits[:, :, 1], bits[:, :, 0])
    for lv, level in enumerate(LEVELS):
        for j, q64 in enumerate([b64, a64]):
            out = {name: got[lv, 0, 0, j, len(FIELDS) + k] for k, name in enumerate(EXTRA_FIELDS)}
            for key in ("rank_ref_y", "rank_q_y"):
                out[key] = out[key].astype(np.int32)
            if not with_labels:
                for key in ("rank_ref_y", "rank_q_y", "margin_ref", "margin_q"):
                    del out[key]
            want = reference.logit_stats(a64, q64, labels)
            try:
                check_extra(out, want, with_labels)
            except AssertionError as e:
                raise AssertionError(f"{level}, model {j}: {e}") from None
