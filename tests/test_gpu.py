"""The GPU backends (the CUDA extension and the Triton kernel) on real CUDA tensors, against the
float64 reference. Skipped without a CUDA GPU; benchmarks/gpu_check.sh runs them.

The reference runs on the host on the values the GPU saw (upcast), so each case stays small
enough for float64 numpy: the large vocabularies come with few rows.
"""

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from fidelity_kld import _core, reference  # noqa: E402

from _reference_checks import (  # noqa: E402
    GPU_TOL, check_stats, huge_logit_rows, llama_rows, make_pair, masked_and_invalid_rows,
    random_logprobs)

# GPU accuracy bar (issue 8): kld within 2e-6 absolute + 2e-4 relative.
KLD_ATOL, KLD_RTOL = GPU_TOL["kld_atol"], GPU_TOL["kld_rtol"]


def check(got, ref64, q64, labels=None, *, llama_parity=False, q_logprobs=False):
    check_stats(got, ref64, q64, labels, llama_parity=llama_parity, q_logprobs=q_logprobs,
                **GPU_TOL)


DTYPES = ["float32", "float16", "bfloat16"]


def backends():
    out = [pytest.param("cuda", marks=pytest.mark.skipif(not _core.has_cuda, reason="_core built without CUDA"))]
    # find_spec, not import: importing triton here (at collection) would fix its mode before
    # tests/test_triton_logit_stats.py can ask for the interpreter.
    if importlib.util.find_spec("triton") is not None:
        out.append("triton")
    else:
        out.append(pytest.param("triton", marks=pytest.mark.skip(reason="triton not installed")))
    return out


BACKENDS = backends()


def gpu():
    from fidelity_kld import gpu as module

    return module


def run(ref, q, labels=None, *, backend, poison=True, **kw):
    """Outputs as numpy, after checking that every output element was written."""
    n = ref.shape[0]
    out = None
    if poison:
        out = {k: torch.full((n,), 12345.0, dtype=torch.float64, device="cuda")
               for k in ("kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref")}
        out.update({k: torch.full((n,), 12345, dtype=torch.int32, device="cuda") for k in ("top1_ref", "top1_q")})
        if labels is not None:
            out.update({k: torch.full((n,), 12345.0, dtype=torch.float64, device="cuda")
                        for k in ("nll_ref", "nll_q", "p_ref_y", "p_q_y")})
        if kw.get("llama_parity"):
            out["kld_llama"] = torch.full((n,), 12345.0, dtype=torch.float64, device="cuda")
    res = gpu().compare_gpu_tensors(ref, q, labels, backend=backend, out=out, **kw)
    torch.cuda.synchronize()
    host = {k: v.cpu().numpy() for k, v in res.items()}
    for k, v in host.items():
        assert not np.any(v == 12345), f"{k} not written everywhere"
    return host


def encode(x32: np.ndarray, dtype: str):
    t = torch.from_numpy(np.ascontiguousarray(x32)).cuda()
    if dtype != "float32":
        t = t.to(getattr(torch, dtype))
    return t, t.float().cpu().numpy().astype(np.float64)






SHAPES = [(1, 1), (3, 7), (1000, 7), (3, 1271), (300, 1271), (64, 32000), (1, 152064), (3, 152064)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", SHAPES)
def test_matches_reference(backend, dtype, n, v):
    rng = np.random.default_rng([n, v, DTYPES.index(dtype)])
    a32, b32 = make_pair(rng, n, v, scale=float(rng.choice([2.0, 5.0, 10.0])))
    a, a64 = encode(a32, dtype)
    b, b64 = encode(b32, dtype)
    labels = rng.integers(0, v, n)
    got = run(a, b, torch.from_numpy(labels).cuda(), backend=backend)
    check(got, a64, b64, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [1, 2, 7])
def test_vocabulary_splits(backend, splits):
    rng = np.random.default_rng(splits)
    a32, b32 = make_pair(rng, 5, 50000, scale=4.0)
    a32[1, 30000:] = -np.inf  # whole splits without mass on the reference side
    b32[2, :20000] = -np.inf  # and on q (KLD = +inf)
    a32[3, [100, 25001, 49999]] = 40.0  # a tie across splits
    a, a64 = encode(a32, "bfloat16")
    b, b64 = encode(b32, "bfloat16")
    got = run(a, b, backend=backend, vocab_splits=splits)
    check(got, a64, b64)
    assert got["top1_ref"][3] == 100


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", [1e-4, 1e-3, 1e-2])
def test_near_identical_rows(backend, noise):
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((64, 32000)) * 8 + 20).astype(np.float32)
    b = (a + rng.standard_normal(a.shape).astype(np.float32) * noise).astype(np.float32)
    got = run(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(), backend=backend)
    want = reference.logit_stats(a, b)
    err = np.abs(got["kld"] - want["kld"])
    assert np.all(err <= KLD_ATOL + KLD_RTOL * want["kld"]), err.max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_self_kld_is_zero(backend, dtype):
    rng = np.random.default_rng(11)
    a, _ = encode((rng.standard_normal((50, 4099)) * 6).astype(np.float32), dtype)
    got = run(a, a, backend=backend)
    assert np.all(np.abs(got["kld"]) <= 1e-7) and np.all(np.abs(got["kld_reverse"]) <= 1e-7)
    np.testing.assert_array_equal(got["lse_ref"], got["lse_q"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lowest_index(backend):
    v = 100
    a = np.zeros((4, v), dtype=np.float32)
    a[0, [17, 40, 99]] = 5.0
    a[1, [0, 1]] = 2.0
    a[2, :] = 1.0
    a[3, [63, 64, 95]] = 7.0
    t = torch.from_numpy(a).cuda()
    got = run(t, t.flip(0).contiguous(), backend=backend)
    np.testing.assert_array_equal(got["top1_ref"], [17, 0, 0, 63])
    np.testing.assert_array_equal(got["top1_q"], [63, 0, 0, 17])
    # many equal maxima spread over threads and blocks of a long row
    big = np.zeros((2, 152064), dtype=np.float32)
    big[0, [70001, 9000, 151999]] = 3.0
    big[1, :] = -1.0
    tb = torch.from_numpy(big).cuda()
    got = run(tb, tb, backend=backend)
    np.testing.assert_array_equal(got["top1_ref"], [9000, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocab_and_invalid_rows(backend):
    v = 20000
    a, b = masked_and_invalid_rows(v)
    labels = np.random.default_rng(9).integers(0, v, a.shape[0])
    got = run(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(), torch.from_numpy(labels).cuda(),
              backend=backend)
    check(got, a.astype(np.float64), b.astype(np.float64), labels)
    assert np.isposinf(got["kld_reverse"][0]) and np.isposinf(got["kld"][1])
    assert np.all(np.isnan(got["kld"][3:6])) and np.all(got["top1_q"][3:6] == -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_misaligned_and_mixed_dtype_inputs(backend):
    """Row strides that are not multiples of 16 bytes (odd vocabularies), views into wider
    buffers, and float32 against bfloat16."""
    rng = np.random.default_rng(6)
    wide = torch.from_numpy((rng.standard_normal((40, 3001)) * 4).astype(np.float32)).cuda()
    a = wide[::2, 1:2999]  # offset by one element, stride 2 * 3001
    b = (wide + 0.3 * torch.randn_like(wide)).to(torch.bfloat16)[1::2, 2:3000]
    got = run(a, b, backend=backend)
    check(got, a.double().cpu().numpy(), b.double().cpu().numpy())
    odd = torch.from_numpy((rng.standard_normal((9, 1271)) * 3).astype(np.float32)).cuda()
    got = run(odd.half(), odd.to(torch.bfloat16), backend=backend)
    check(got, odd.half().double().cpu().numpy(), odd.to(torch.bfloat16).double().cpu().numpy())


def llama_tensor(logprobs, scale=2.0**-10, offset=-60.0):
    raw, decoded = llama_rows(logprobs, scale, offset)
    return torch.from_numpy(raw.view(np.int16)).cuda(), decoded


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [8000, 32001])
def test_llama_parity(backend, v):
    rng = np.random.default_rng(v)
    n = 20
    ref, ref64 = llama_tensor(random_logprobs(rng, n, v))
    q32 = (ref64 + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    labels = rng.integers(0, v, n)
    got = run(ref, torch.from_numpy(q32).cuda(), torch.from_numpy(labels).cuda(), backend=backend,
              ref_dtype="llama_u16", vocab=v, llama_parity=True)
    check(got, ref64, q32.astype(np.float64), labels, llama_parity=True)
    # A llama.cpp quant file on the q side: its rows are log-probs, used as they are.
    q_rows, q64 = llama_tensor(np.minimum(ref64 + 0.3 * rng.standard_normal((n, v)), 0.0))
    got = run(ref, q_rows, torch.from_numpy(labels).cuda(), backend=backend,
              ref_dtype="llama_u16", q_dtype="llama_u16", vocab=v, llama_parity=True)
    check(got, ref64, q64, labels, llama_parity=True, q_logprobs=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits(backend):
    """Finite rows far beyond any real model's logits (up to 1e37) stay finite and exact."""
    a, b = huge_logit_rows()
    got = run(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(), backend=backend)
    check(got, a.astype(np.float64), b.astype(np.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_gpu_matches_cpu_core_contract(backend):
    """compare_gpu returns the numpy TokenStats of fidelity_kld.compare; both meet the bar."""
    import fidelity_kld as fk

    rng = np.random.default_rng(21)
    a, b = make_pair(rng, 200, 5000)
    y = rng.integers(0, 5000, 200)
    got = gpu().compare_gpu(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(), y, backend=backend)
    assert isinstance(got, fk.TokenStats) and got.kld.dtype == np.float64 and got.top1_ref.dtype == np.int32
    check(got.as_dict(), a.astype(np.float64), b.astype(np.float64), y)
    cpu = fk.compare(a, b, y)
    np.testing.assert_array_equal(got.top1_ref, cpu.top1_ref)
    np.testing.assert_allclose(got.kld, cpu.kld, rtol=2e-4, atol=2e-6)
    # DLPack producers and host arrays are accepted too
    got2 = gpu().compare_gpu(np.asarray(a), torch.utils.dlpack.to_dlpack(torch.from_numpy(b).cuda()),
                             y, backend=backend)
    np.testing.assert_array_equal(got2.top1_q, got.top1_q)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gpu().compare_gpu(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(),
                          np.full(200, 5000), backend=backend)


def test_auto_backend_prefers_the_extension():
    if not _core.has_cuda:
        pytest.skip("_core built without CUDA")
    assert gpu()._resolve_backend("auto") == "cuda"
    assert "cuda" in gpu().available_backends()


def test_pinned_stager_streams_files_like_the_cpu(tmp_path):
    """`compare --device cuda` path: host chunks through pinned buffers, sub-chunks overlapped,
    against the CPU core on the same dumps."""
    import fidelity_kld as fk
    from fidelity_kld.gpu import PinnedStager
    from fidelity_kld.io import open_source
    from fidelity_kld.stream import compare_sources

    rng = np.random.default_rng(12)
    a, b = make_pair(rng, 300, 4099)
    c = (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32)
    for name, x in (("a", a), ("b", b), ("c", c)):
        np.save(tmp_path / f"{name}.npy", x.astype(np.float16))
    labels = rng.integers(0, 4099, 300)
    stager = PinnedStager(sub_chunk_bytes=1 << 20)  # several sub-chunks per chunk
    paths = [str(tmp_path / f"{name}.npy") for name in "abc"]
    with open_source(paths[0]) as r, open_source(paths[1]) as q1, open_source(paths[2]) as q2:
        got = compare_sources(r, [q1, q2], labels=labels, chunk_bytes=4 << 20,
                              compare_fn=stager.compare, compare_many_fn=stager.compare_many)
    for st, x in zip(got, (b, c)):
        want = fk.compare(a.astype(np.float16), x.astype(np.float16), labels)
        np.testing.assert_allclose(st.kld, want.kld, rtol=2e-4, atol=2e-6)
        np.testing.assert_array_equal(st.top1_ref, want.top1_ref)
        np.testing.assert_allclose(st.nll_q, want.nll_q, rtol=1e-5, atol=1e-6)


def test_cli_device_cuda_matches_llama_cpp(tmp_path):
    """`compare base.kld Q4_K_M.kld --device cuda`: both sides llama.cpp files, parity mode, host
    chunks through the pinned stager, against what llama.cpp printed."""
    import json

    from test_llamacpp_parity import DATA, _run, assert_matches_llama_printout

    out = tmp_path / "summary.json"
    rc = _run(["compare", str(DATA / "base.kld"), str(DATA / "Q4_K_M.kld"), "--device", "cuda",
               "-o", str(out), "-q"])
    assert rc == 0
    assert_matches_llama_printout(json.loads(out.read_text())["models"][0]["summary"])


# --- issue 16's optional outputs (extra=...) ---------------------------------------------------

from test_direction_outputs import EXTRA_NAMES, check_extra, special_rows  # noqa: E402


def run_extra(ref, q, labels=None, *, backend, extra="all", **kw):
    """run() with the optional outputs too, every one poisoned first to catch unwritten rows."""
    n = ref.shape[0]
    names = gpu().extra_outputs(extra, labels is not None)
    out = {k: torch.full((n,), 12345, dtype=torch.int32 if k.startswith("rank") else torch.float64,
                         device="cuda") for k in names}
    res = gpu().compare_gpu_tensors(ref, q, labels, backend=backend, out=out, extra=extra, **kw)
    torch.cuda.synchronize()
    host = {k: v.cpu().numpy() for k, v in res.items()}
    for k in names:
        assert not np.any(host[k] == 12345), f"{k} not written everywhere"
    return host


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,splits", [(1, 0), (7, 0), (1271, 0), (32000, 1), (32000, 5), (152064, 0)])
@pytest.mark.parametrize("with_labels", [True, False])
def test_extra_outputs_match_reference(backend, dtype, v, splits, with_labels):
    """special_rows (ties, label tied/alone/masked, one finite entry, uniform, invalid rows)."""
    rng = np.random.default_rng([v, splits, DTYPES.index(dtype), with_labels])
    a32, b32, y = special_rows(rng, v)
    a, a64 = encode(a32, dtype)
    b, b64 = encode(b32, dtype)
    labels = y if with_labels else None
    got = run_extra(a, b, None if labels is None else torch.from_numpy(labels).cuda(),
                    backend=backend, vocab_splits=splits)
    check(got, a64, b64, labels)
    check_extra(got, reference.logit_stats(a64, b64, labels), with_labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_outputs_leave_the_default_outputs_bitwise_unchanged(backend):
    rng = np.random.default_rng(25)
    a32, b32 = make_pair(rng, 300, 32000)
    a, _ = encode(a32, "bfloat16")
    b, _ = encode(b32, "bfloat16")
    y = torch.from_numpy(rng.integers(0, 32000, 300)).cuda()
    for splits in (1, 4):
        plain = run(a, b, y, backend=backend, vocab_splits=splits)
        full = run_extra(a, b, y, backend=backend, vocab_splits=splits)
        assert set(full) == set(plain) | set(EXTRA_NAMES)
        for key, val in plain.items():
            np.testing.assert_array_equal(full[key], val, err_msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", [1e-5, 1e-3])
def test_extra_distances_of_near_identical_rows(backend, noise):
    """TVD ~ noise, JSD ~ noise^2 (the series branch): the hardware exp2 (2 ulp) is the limit."""
    rng = np.random.default_rng(11)
    a = (rng.standard_normal((64, 32000)) * 4 + 10).astype(np.float32)
    b = (a + noise * rng.standard_normal(a.shape)).astype(np.float32)
    got = run_extra(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(), backend=backend,
                    extra=("tvd", "jsd"))
    want = reference.logit_stats(a, b)
    check_extra(got, want, False, groups=("tvd", "jsd"))
    assert np.max(np.abs(got["tvd"] - want["tvd"])) < 5e-7 + 1e-3 * want["tvd"].max()
    assert np.max(np.abs(got["jsd"] - want["jsd"])) < 1e-12 + 1e-2 * want["jsd"].max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_outputs_huge_logits(backend):
    """Rows up to 1e37: log-probs against the oracle's shift-free log-softmax (its max - lse
    loses log S beyond ~1e17)."""
    a, b = huge_logit_rows(3000)
    got = run_extra(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda(), backend=backend)
    want = reference.logit_stats(a.astype(np.float64), b.astype(np.float64))
    valid = ~np.isnan(want["kld"])
    for side, x in (("ref", a), ("q", b)):
        _, logp = reference._log_softmax(np.where(valid[:, None], x.astype(np.float64), 0.0))
        want[f"logp_top1_{side}"] = np.where(valid, logp.max(axis=1), np.nan)
        want[f"logp_top2_{side}"] = np.where(valid, reference._top2(logp), np.nan)
    check_extra(got, want, False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_kind", ["float32", "llama_u16"])
def test_extra_outputs_in_llama_parity_mode(backend, q_kind):
    rng = np.random.default_rng(26)
    n, v = 6, 32001
    raw, ref64 = llama_rows(random_logprobs(rng, n, v), 2.0**-10, -60.0)
    noisy = (ref64 + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    if q_kind == "llama_u16":
        q_raw, q64 = llama_rows(np.minimum(noisy.astype(np.float64), 0.0), 2.0**-10, -60.0)
        q = torch.from_numpy(q_raw.view(np.int16)).cuda()
    else:
        q, q64 = torch.from_numpy(noisy).cuda(), noisy.astype(np.float64)
    labels = rng.integers(0, v, n)
    got = run_extra(torch.from_numpy(raw.view(np.int16)).cuda(), q, torch.from_numpy(labels).cuda(),
                    backend=backend, ref_dtype="llama_u16", q_dtype=q_kind, vocab=v,
                    llama_parity=True)
    want = reference.logit_stats(ref64, q64, labels, llama_parity=True,
                                 q_logprobs=q_kind == "llama_u16")
    check_extra(got, want, True)
