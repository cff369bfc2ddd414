"""The Triton kernel (kernels/logit_stats.py) against the float64 reference, on the CPU through
Triton's interpreter (TRITON_INTERPRET=1) with CPU torch tensors.

Small shapes (the interpreter runs numpy per block); small blocks and forced vocabulary splits
so that multi-block rescaling, all-masked blocks, block-boundary ties and the split merge run
here. The same kernel on a real GPU is covered by tests/test_gpu.py.
"""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fidelity_kld import reference

from _reference_checks import (  # noqa: E402
    GPU_TOL, check_stats, huge_logit_rows, llama_rows, make_pair, masked_and_invalid_rows,
    random_logprobs)

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
# Triton picks the interpreter when it is imported (its own @jit library functions) and checks
# TRITON_INTERPRET again while kernels run, so the variable is set before the import and stays
# set. Where a GPU is present, tests/test_gpu.py runs the same kernel compiled, and the
# interpreter runs only on request (TRITON_INTERPRET=1 in the environment).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if "triton" in sys.modules and not _INTERPRET:
    pytest.skip("triton was imported before this module could select its interpreter; run this "
                "file in its own process (TRITON_INTERPRET must be set before triton is imported)",
                allow_module_level=True)
if torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("a CUDA GPU is present: tests/test_gpu.py runs the Triton kernel on it "
                "(TRITON_INTERPRET=1 runs these interpreter tests too)", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: E402,F401

# GPU accuracy bar (issue 8): kld within 2e-6 absolute + 2e-4 relative of the float64 reference
# on the same (upcast) values.
KLD_ATOL, KLD_RTOL = GPU_TOL["kld_atol"], GPU_TOL["kld_rtol"]


def check(got, ref64, q64, labels=None, *, llama_parity=False, q_logprobs=False):
    check_stats(got, ref64, q64, labels, llama_parity=llama_parity, q_logprobs=q_logprobs,
                **GPU_TOL)


def _load_kernels():
    """A fresh copy of kernels/logit_stats.py, decorated for the interpreter (another copy may
    sit under the package name)."""
    path = Path(__file__).resolve().parents[1] / "kernels" / "logit_stats.py"
    if not path.is_file():
        spec = importlib.util.find_spec("fidelity_kld.kernels.logit_stats")
        if spec is None or spec.origin is None:
            pytest.skip("kernels/logit_stats.py not found")
        path = Path(spec.origin)
    spec = importlib.util.spec_from_file_location("_fk_triton_logit_stats_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interpreter_runs_loops() -> bool:
    """Older Triton interpreters (3.6 seen) pass scalars as 1-element arrays, which numpy >= 2.4
    refuses to turn into the int a runtime-bounded range() needs: every looping kernel fails."""
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, n):
        acc = 0
        for i in range(0, n):
            acc += i
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        probe[(1,)](out, 4)
    except Exception:  # noqa: BLE001 - any failure means this interpreter cannot run the kernel
        return False
    return int(out[0]) == 6


if not _interpreter_runs_loops():
    pytest.skip("this Triton's interpreter cannot run runtime-bounded loops with this numpy "
                "(fixed in newer Triton); the GPU path is tested in tests/test_gpu.py",
                allow_module_level=True)
ks = _load_kernels()


def run(ref, q, labels=None, **kw):
    """Kernel outputs as float64/int numpy arrays (interpreter warnings from masked lanes off)."""
    with np.errstate(all="ignore"):
        out = ks.logit_stats(ref, q, labels, **kw)
    return {k: v.numpy() for k, v in out.items()}


def encode(x32: np.ndarray, dtype: str):
    """(torch tensor the kernel gets, float64 values it represents)."""
    t = torch.from_numpy(np.ascontiguousarray(x32))
    if dtype == "float32":
        return t, x32.astype(np.float64)
    t = t.to(getattr(torch, dtype))
    return t, t.float().numpy().astype(np.float64)






# (n, v, block_v, splits): None = the launcher's choice.
CASES = [
    (1, 1, None, None),
    (3, 7, None, None),
    (3, 7, 16, 1),
    (5, 1271, None, None),
    (5, 1271, 128, 1),  # 10 blocks, a masked tail
    (4, 1271, 128, 3),  # split: 4 + 4 + 2 blocks, merged
    (2, 4099, None, None),
    (2, 4099, 512, 4),
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n,v,block_v,splits", CASES)
def test_matches_reference(dtype, n, v, block_v, splits):
    rng = np.random.default_rng([n, v, block_v or 0, splits or 0, len(dtype)])
    a32, b32 = make_pair(rng, n, v, scale=float(rng.choice([2.0, 5.0, 10.0])))
    a, a64 = encode(a32, dtype)
    b, b64 = encode(b32, dtype)
    labels = rng.integers(0, v, n)
    got = run(a, b, torch.from_numpy(labels), block_v=block_v, splits=splits)
    check(got, a64, b64, labels)


@pytest.mark.parametrize("noise", [1e-4, 1e-3, 1e-2])
def test_near_identical_rows(noise):
    """KLD ~ 1e-8..1e-4 with lse ~ 60: sum p*(a-b) - lse_a + lse_b would cancel in float32."""
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((6, 2000)) * 8 + 20).astype(np.float32)
    b = (a + rng.standard_normal(a.shape).astype(np.float32) * noise).astype(np.float32)
    got = run(torch.from_numpy(a), torch.from_numpy(b), block_v=256)
    want = reference.logit_stats(a, b)
    err = np.abs(got["kld"] - want["kld"])
    assert np.all(err <= KLD_ATOL + KLD_RTOL * want["kld"]), err.max()
    assert np.max(err) < 2e-7  # well inside the bar even for the smallest divergences


def test_self_and_shifted_kld_are_zero():
    rng = np.random.default_rng(11)
    a = (rng.standard_normal((6, 1000)) * 6).astype(np.float32)
    for dtype in ("float32", "bfloat16"):
        t, _ = encode(a, dtype)
        got = run(t, t, block_v=128)
        assert np.all(np.abs(got["kld"]) <= 1e-7) and np.all(np.abs(got["kld_reverse"]) <= 1e-7)
        np.testing.assert_array_equal(got["lse_ref"], got["lse_q"])
    got = run(torch.from_numpy(a), torch.from_numpy(a + np.float32(3.0)), block_v=128)
    assert np.all(np.abs(got["kld"]) < 1e-6) and np.all(np.abs(got["kld_reverse"]) < 1e-6)


def test_probabilities_sum_to_one():
    rng = np.random.default_rng(2)
    v = 300
    row = (rng.standard_normal(v) * 5).astype(np.float32)
    a = np.repeat(row[None, :], v, axis=0)
    b = np.repeat((row + 0.5 * rng.standard_normal(v)).astype(np.float32)[None, :], v, axis=0)
    got = run(torch.from_numpy(a), torch.from_numpy(b), torch.arange(v), block_v=64)
    assert abs(got["p_ref_y"].sum() - 1.0) < 1e-6
    assert abs(got["p_q_y"].sum() - 1.0) < 1e-6


@pytest.mark.parametrize("block_v,splits", [(None, None), (32, 1), (32, 3)])
def test_ties_go_to_lowest_index(block_v, splits):
    v = 100
    a = np.zeros((5, v), dtype=np.float32)
    a[0, [17, 40, 99]] = 5.0
    a[1, [0, 1]] = 2.0
    a[2, :] = 1.0  # constant row: argmax 0
    a[3, [63, 64, 95]] = 7.0  # across a block boundary (and a split boundary with splits=3)
    a[4, [31, 32, 96]] = 3.0
    got = run(torch.from_numpy(a), torch.from_numpy(a[::-1].copy()), block_v=block_v, splits=splits)
    np.testing.assert_array_equal(got["top1_ref"], [17, 0, 0, 63, 31])
    np.testing.assert_array_equal(got["top1_q"], [31, 63, 0, 0, 17])


@pytest.mark.parametrize("block_v,splits", [(64, 1), (64, 4), (None, None)])
def test_masked_vocab_and_invalid_rows(block_v, splits):
    """-inf filling whole blocks, at the start of a row and on either side; NaN, +inf and
    all -inf rows are invalid; constant and huge-magnitude rows stay exact."""
    v = 1000
    a, b = masked_and_invalid_rows(v)
    labels = np.random.default_rng(9).integers(0, v, a.shape[0])
    labels[0] = 150  # a label on a masked reference entry: nll_ref = +inf, p_ref_y = 0
    got = run(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(labels),
              block_v=block_v, splits=splits)
    check(got, a.astype(np.float64), b.astype(np.float64), labels)
    assert np.isfinite(got["kld"][0]) and np.isposinf(got["kld_reverse"][0])
    assert np.isposinf(got["nll_ref"][0]) and got["p_ref_y"][0] == 0.0
    assert np.isposinf(got["kld"][1]) and np.isfinite(got["kld_reverse"][1])
    assert np.isfinite(got["kld"][2]) and np.isfinite(got["kld_reverse"][2])
    assert np.all(np.isnan(got["kld"][3:6])) and np.all(got["top1_ref"][3:6] == -1)
    assert np.isfinite(got["kld"][8]) and np.isposinf(got["kld"][9])
    assert abs(got["entropy_ref"][6] - np.log(v)) < 1e-6


@pytest.mark.parametrize("block_v,splits", [(128, 1), (128, 3), (None, None)])
def test_huge_logits(block_v, splits):
    """Finite rows up to 1e37: the shift's own rounding (2^16 at 1e12) must not reach 2^t."""
    a, b = huge_logit_rows(600)
    got = run(torch.from_numpy(a), torch.from_numpy(b), block_v=block_v, splits=splits)
    check(got, a.astype(np.float64), b.astype(np.float64))


def test_ascending_rows_rescale_every_block():
    """The max rises in every block (a rescale per block) and falls by hundreds of nats."""
    v = 2048
    base = np.linspace(-400.0, 30.0, v, dtype=np.float32)
    rng = np.random.default_rng(12)
    a = np.stack([base, base[::-1].copy(), base * 0.1])
    b = (a + rng.standard_normal(a.shape).astype(np.float32) * 0.5).astype(np.float32)
    for splits in (1, 4):
        got = run(torch.from_numpy(a), torch.from_numpy(b), block_v=128, splits=splits)
        check(got, a.astype(np.float64), b.astype(np.float64))


def test_strided_and_mixed_dtype_inputs():
    rng = np.random.default_rng(6)
    wide = (rng.standard_normal((20, 1300)) * 4).astype(np.float32)
    a = torch.from_numpy(wide)[::2, :1271]  # row stride 2 * 1300 elements
    b_full = torch.from_numpy((wide + 0.3 * rng.standard_normal(wide.shape)).astype(np.float32))
    b = b_full.to(torch.bfloat16)[::2, :1271]
    assert a.stride(0) == 2600 and b.stride(0) == 2600
    got = run(a, b, block_v=256)
    check(got, a.numpy().astype(np.float64), b.float().numpy().astype(np.float64))


def llama_tensor(logprobs, scale=2.0**-10, offset=-60.0):
    raw, decoded = llama_rows(logprobs, scale, offset)
    return torch.from_numpy(raw.view(np.int16)), decoded


@pytest.mark.parametrize("splits", [1, 3])
def test_llama_parity(splits):
    """llama_u16 reference rows: nll_ref = -logprob(y) as stored, kld_llama over logprob > -16."""
    rng = np.random.default_rng(13)
    n, v = 6, 801
    ref, ref64 = llama_tensor(random_logprobs(rng, n, v))
    q32 = (ref64 + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    labels = rng.integers(0, v, n)
    got = run(ref, torch.from_numpy(q32), torch.from_numpy(labels), ref_dtype="llama_u16",
              vocab=v, llama_parity=True, block_v=128, splits=splits)
    check(got, ref64, q32.astype(np.float64), labels, llama_parity=True)
    # both sides as llama rows, without parity: ordinary renormalised statistics
    q_rows, q64 = llama_tensor(q32.astype(np.float64))
    got = run(ref, q_rows, torch.from_numpy(labels), ref_dtype="llama_u16", q_dtype="llama_u16",
              vocab=v, block_v=128, splits=splits)
    check(got, ref64, q64, labels)
    # both sides as llama rows in parity mode: q's rows are log-probs, used as they are
    q_rows, q64 = llama_tensor(np.minimum(q32.astype(np.float64), 0.0))
    got = run(ref, q_rows, torch.from_numpy(labels), ref_dtype="llama_u16", q_dtype="llama_u16",
              vocab=v, llama_parity=True, block_v=128, splits=splits)
    check(got, ref64, q64, labels, llama_parity=True, q_logprobs=True)


def test_llama_rows_with_arbitrary_scale():
    """A real file's scale is arbitrary: decoded values then round in float32, as on the CPU."""
    rng = np.random.default_rng(14)
    n, v = 3, 500
    logp = -np.abs(rng.standard_normal((n, v)) * 6) - 0.1
    ref, ref64 = llama_tensor(logp, float(np.float32(0.0007123)), float(np.float32(-41.37)))
    q32 = (ref64 + 0.2 * rng.standard_normal((n, v))).astype(np.float32)
    got = run(ref, torch.from_numpy(q32), ref_dtype="llama_u16", vocab=v, llama_parity=True, block_v=64)
    check(got, ref64, q32.astype(np.float64), llama_parity=True)


def test_default_config_splits_only_few_rows():
    assert ks.default_config(4096, 152064, 2, 132)[3] == 1
    block_v, _, _, splits = ks.default_config(8, 152064, 2, 132)
    assert splits > 1 and splits * 4 * block_v <= 152064
    assert ks.default_config(8, 1271, 4, 132)[3] == 1


@pytest.mark.parametrize("num_stages,num_warps", [(1, 4), (3, 16)])
def test_launch_options_do_not_change_results(num_stages, num_warps):
    rng = np.random.default_rng(16)
    a, b = make_pair(rng, 3, 900)
    got = run(torch.from_numpy(a), torch.from_numpy(b), block_v=128, num_stages=num_stages,
              num_warps=num_warps)
    check(got, a.astype(np.float64), b.astype(np.float64))


@pytest.mark.parametrize("splits", [1, 3])
def test_fused_reductions(splits):
    """The GPU's default: one multi-operand tl.reduce per block (the interpreter otherwise runs
    one tl.sum / tl.max each), here with masked entries, ties and labels."""
    rng = np.random.default_rng(17)
    a, b = make_pair(rng, 4, 700)
    a[1, 100:400] = -np.inf
    b[2, 50:60] = -np.inf
    a[3, [10, 650]] = 40.0  # a tie across blocks
    labels = rng.integers(0, 700, 4)
    with np.errstate(all="ignore"):
        got = run(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(labels), block_v=128,
                  splits=splits, fused_reduce=True)
    check(got, a.astype(np.float64), b.astype(np.float64), labels)
    assert got["top1_ref"][3] == 10


def test_input_errors():
    a = torch.zeros((3, 10))
    with pytest.raises(ValueError, match="llama_parity"):
        ks.logit_stats(a, a, llama_parity=True)
    with pytest.raises(ValueError, match="columns"):
        ks.logit_stats(a, torch.zeros((3, 11)))
    with pytest.raises(ValueError, match="tokens"):
        ks.logit_stats(a, torch.zeros((4, 10)))
    with pytest.raises(ValueError, match="vocab="):
        ks.logit_stats(a.to(torch.int16), a, ref_dtype="llama_u16")
    with pytest.raises(ValueError, match="labels"):
        ks.logit_stats(a, a, torch.zeros(2, dtype=torch.int64))
    assert ks.logit_stats(torch.zeros((0, 5)), torch.zeros((0, 5)))["kld"].shape == (0,)


def test_compare_gpu_plumbing_on_the_interpreter():
    """fidelity_kld.gpu.compare_gpu (backend='triton') returns the numpy TokenStats of ops.compare
    and checks labels; under the interpreter it runs on CPU tensors."""
    from fidelity_kld import gpu

    if "Interpreted" not in type(gpu.triton_kernels()._logit_stats_kernel).__name__:
        pytest.skip("fidelity_kld.kernels was loaded for a GPU earlier in this process")
    rng = np.random.default_rng(15)
    a, b = make_pair(rng, 4, 300)
    y = rng.integers(0, 300, 4)
    with np.errstate(all="ignore"):
        got = gpu.compare_gpu(torch.from_numpy(a), torch.from_numpy(b).to(torch.bfloat16), y,
                              backend="triton", vocab_splits=2)
    b64 = torch.from_numpy(b).to(torch.bfloat16).float().numpy().astype(np.float64)
    check(got.as_dict(), a.astype(np.float64), b64, y)
    np.testing.assert_array_equal(got.labels, y)
    assert got.top1_agree.dtype == bool
    for labels in ([0, 300, 1, 2], torch.tensor([0, 300, 1, 2])):  # host list, then a tensor
        with pytest.raises(ValueError, match="label 300 at token 1 is outside the vocabulary"):
            gpu.compare_gpu(torch.from_numpy(a), torch.from_numpy(b), labels, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        gpu.compare_gpu(torch.from_numpy(a), torch.from_numpy(b), backend="opencl")


def test_pinned_stager_bookkeeping_on_the_interpreter(monkeypatch):
    """`compare --device cuda`'s PinnedStager run on the CPU: torch.cuda's streams, events and
    pinned memory replaced by synchronous stand-ins, the kernel by the interpreter. The
    overlap itself needs a GPU (tests/test_gpu.py); this pins the bookkeeping: two pinned
    slots reused over many sub-chunks and chunks, results and labels in token order, llama.cpp
    rows on both sides in parity mode."""
    import contextlib

    from fidelity_kld import Logits, gpu
    from fidelity_kld.io import ArraySource
    from fidelity_kld.stream import compare_sources

    if "Interpreted" not in type(gpu.triton_kernels()._logit_stats_kernel).__name__:
        pytest.skip("fidelity_kld.kernels was loaded for a GPU earlier in this process")

    class Stream:
        cuda_stream = 0

        def wait_stream(self, other):
            pass

        def wait_event(self, event):
            pass

        def synchronize(self):
            pass

    class Event:
        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    real_empty = torch.empty
    allocations = []

    def empty(*args, pin_memory=False, **kw):
        if pin_memory:
            allocations.append(args)
        return real_empty(*args, **kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    monkeypatch.setattr(torch, "empty", empty)

    rng = np.random.default_rng(21)
    n, v = 37, 301
    ref_raw, ref64 = llama_rows(random_logprobs(rng, n, v), 2.0**-10, -60.0)
    qs = [llama_rows(np.minimum(ref64 + s * rng.standard_normal((n, v)), 0.0), 2.0**-10, -60.0)
          for s in (0.3, 0.1)]
    labels = rng.integers(0, v, n)
    row_bytes = 2 * ref_raw.shape[1]
    ref = ArraySource(Logits(ref_raw, "llama_u16", v), path="ref")
    sources = [ArraySource(Logits(raw, "llama_u16", v), path=f"q{j}") for j, (raw, _) in enumerate(qs)]
    for models in (1, 2):  # one model (compare), then two (compare_many: the reference staged once)
        allocations.clear()
        stager = gpu.PinnedStager(sub_chunk_bytes=5 * (1 + models) * row_bytes, backend="triton",
                                  device="cpu")
        # 12 rows of every side a chunk (4 chunks, the last short), 5 rows a sub-chunk
        with np.errstate(all="ignore"):  # the interpreter's numpy sees the -inf blocks' 0 * inf
            got = compare_sources(ref, sources[:models], labels=labels,
                                  chunk_bytes=12 * (1 + models) * row_bytes, llama_parity=True,
                                  compare_fn=stager.compare, compare_many_fn=stager.compare_many)
        assert len(got) == models
        for st, (_, q64) in zip(got, qs):
            check(st.as_dict(), ref64, q64, labels, llama_parity=True, q_logprobs=True)
            np.testing.assert_array_equal(st.labels, labels)
        assert len(allocations) == 2 * (1 + models)  # two slots per side, reused throughout


# --- issue 16's optional outputs (extra=...) --------------------------------------------------

from test_direction_outputs import EXTRA_NAMES, check_extra, special_rows  # noqa: E402


@pytest.mark.parametrize("dtype,v,block_v,splits,with_labels", [
    ("float32", 7, None, None, True), ("bfloat16", 7, None, None, False),
    ("float16", 301, 64, 1, True), ("float32", 301, 64, 1, False),
    ("bfloat16", 301, 64, 3, True), ("float16", 301, 64, 3, False)])
def test_extra_outputs_match_reference(dtype, v, block_v, splits, with_labels):
    """Ties for the max, the label tied or alone on top or masked, one finite entry, uniform
    and invalid rows (special_rows), odd V, several blocks and a split merge."""
    rng = np.random.default_rng([v, len(dtype), with_labels])
    a32, b32, y = special_rows(rng, v)
    a, a64 = encode(a32, dtype)
    b, b64 = encode(b32, dtype)
    labels = y if with_labels else None
    got = run(a, b, None if labels is None else torch.from_numpy(labels), block_v=block_v,
              splits=splits, extra="all")
    check(got, a64, b64, labels)
    check_extra(got, reference.logit_stats(a64, b64, labels), with_labels)


@pytest.mark.parametrize("splits", [1, 3])
def test_extra_outputs_fused_reductions(splits):
    """The GPU's multi-operand reductions (a custom top-2 combine, the label counts beside it,
    the distance sums), here on the interpreter: ties across blocks, masked entries."""
    rng = np.random.default_rng(18)
    a, b = make_pair(rng, 4, 200)
    a[1, 40:150] = -np.inf
    a[3, [10, 190]] = 40.0  # the max tied across blocks: top2 == top1
    b[2, 50:60] = -np.inf
    labels = np.array([5, 7, 55, 190])
    got = run(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(labels), block_v=64,
              splits=splits, fused_reduce=True, extra="all")
    check_extra(got, reference.logit_stats(a, b, labels), True)
    assert got["logp_top2_ref"][3] == got["logp_top1_ref"][3] and got["margin_ref"][3] == 0.0


def test_extra_outputs_leave_the_default_outputs_bitwise_unchanged():
    rng = np.random.default_rng(19)
    a32, b32, y = (x[:12] for x in special_rows(rng, 301))  # ties, masks, invalid rows
    a, b = torch.from_numpy(a32).to(torch.bfloat16), torch.from_numpy(b32).to(torch.bfloat16)
    for splits in (1, 3):
        plain = run(a, b, torch.from_numpy(y), block_v=64, splits=splits)
        full = run(a, b, torch.from_numpy(y), block_v=64, splits=splits, extra="all")
        assert set(full) == set(plain) | set(EXTRA_NAMES)
        for key, val in plain.items():
            np.testing.assert_array_equal(full[key], val, err_msg=key)
    tvd_only = run(a, b, block_v=64, extra=["tvd"])
    assert "tvd" in tvd_only and "jsd" not in tvd_only and "logp_top1_ref" not in tvd_only


@pytest.mark.parametrize("noise", [1e-5, 1e-3])
def test_extra_distances_of_near_identical_rows(noise):
    """TVD ~ noise and JSD ~ noise^2: the series branch of JSD, no cancellation."""
    rng = np.random.default_rng(11)
    a = (rng.standard_normal((4, 2000)) * 4 + 10).astype(np.float32)
    b = (a + noise * rng.standard_normal(a.shape)).astype(np.float32)
    got = run(torch.from_numpy(a), torch.from_numpy(b), block_v=512, extra=("tvd", "jsd"))
    want = reference.logit_stats(a, b)
    check_extra(got, want, False, groups=("tvd", "jsd"))
    assert np.max(np.abs(got["tvd"] - want["tvd"])) < 1e-7 + 1e-3 * want["tvd"].max()
    assert np.max(np.abs(got["jsd"] - want["jsd"])) < 2e-13 + 1e-3 * want["jsd"].max()


def test_extra_distances_of_disjoint_and_far_apart_rows():
    """The log branch of JSD up to z = 1: disjoint supports give JSD = ln 2 and TVD = 1."""
    v = 300
    a = np.full((3, v), -np.inf, np.float32)
    b = np.full((3, v), -np.inf, np.float32)
    a[0, :150], b[0, 150:] = 0.0, 0.0
    rng = np.random.default_rng(5)
    a[1], b[1] = rng.standard_normal(v) * 8, rng.standard_normal(v) * 8
    a[2], b[2] = 0.0, np.linspace(-30, 0, v)
    got = run(torch.from_numpy(a), torch.from_numpy(b), block_v=64, extra="all")
    check_extra(got, reference.logit_stats(a, b), False)
    assert abs(got["tvd"][0] - 1.0) < 1e-6 and abs(got["jsd"][0] - np.log(2)) < 1e-6


@pytest.mark.parametrize("splits", [1, 3])
def test_extra_outputs_huge_logits(splits):
    """Rows up to 1e37 (shifts with a low part): log-probs and distances stay exact. The
    oracle's log-probs are taken from its shift-free log-softmax here: its max - lse loses the
    log S of rows beyond ~1e17 (a uniform row at 1e30 has log p = -log V, not 0)."""
    a, b = huge_logit_rows(400)
    got = run(torch.from_numpy(a), torch.from_numpy(b), block_v=128, splits=splits, extra="all")
    want = reference.logit_stats(a.astype(np.float64), b.astype(np.float64))
    valid = ~np.isnan(want["kld"])
    for side, x in (("ref", a), ("q", b)):
        _, logp = reference._log_softmax(np.where(valid[:, None], x.astype(np.float64), 0.0))
        want[f"logp_top1_{side}"] = np.where(valid, logp.max(axis=1), np.nan)
        want[f"logp_top2_{side}"] = np.where(valid, reference._top2(logp), np.nan)
    check_extra(got, want, False)


@pytest.mark.parametrize("q_kind", ["float32", "llama_u16"])
def test_extra_outputs_in_llama_parity_mode(q_kind):
    """In llama parity mode too the optional outputs use each row's own renormalisation."""
    rng = np.random.default_rng(20)
    n, v = 5, 401
    ref, ref64 = llama_tensor(random_logprobs(rng, n, v))
    noisy = (ref64 + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    if q_kind == "llama_u16":
        q, q64 = llama_tensor(np.minimum(noisy.astype(np.float64), 0.0))
    else:
        q, q64 = torch.from_numpy(noisy), noisy.astype(np.float64)
    labels = rng.integers(0, v, n)
    for splits in (1, 2):
        got = run(ref, q, torch.from_numpy(labels), ref_dtype="llama_u16", q_dtype=q_kind,
                  vocab=v, llama_parity=True, block_v=128, splits=splits, extra="all")
        want = reference.logit_stats(ref64, q64, labels, llama_parity=True,
                                     q_logprobs=q_kind == "llama_u16")
        check_extra(got, want, True)


def test_compare_gpu_extra_on_the_interpreter():
    """compare_gpu(extra=...) fills the TokenStats fields of the groups asked for, and the
    group errors are ops.compare's."""
    from fidelity_kld import gpu

    if "Interpreted" not in type(gpu.triton_kernels()._logit_stats_kernel).__name__:
        pytest.skip("fidelity_kld.kernels was loaded for a GPU earlier in this process")
    rng = np.random.default_rng(22)
    a, b = make_pair(rng, 4, 200)
    y = rng.integers(0, 200, 4)
    with np.errstate(all="ignore"):
        got = gpu.compare_gpu(torch.from_numpy(a), torch.from_numpy(b), y, backend="triton",
                              extra=("label", "jsd"))
        check_extra(got, reference.logit_stats(a, b, y), True, groups=("label", "jsd"))
        assert got.rank_ref_y.dtype == np.int32 and got.tvd is None and got.logp_top1_q is None
        with pytest.raises(ValueError, match="needs labels"):
            gpu.compare_gpu(torch.from_numpy(a), torch.from_numpy(b), backend="triton",
                            extra="label")
        with pytest.raises(ValueError, match="'top3'"):
            gpu.compare_gpu(torch.from_numpy(a), torch.from_numpy(b), backend="triton",
                            extra="top3")


def test_allocate_outputs_completes_the_groups_out_names():
    """An output of a group passed in ``out`` asks for its whole group (a kernel writes every
    output of a group); the label group still needs labels."""
    from fidelity_kld import gpu

    mine = torch.zeros(3, dtype=torch.float64)
    res = gpu.allocate_outputs(3, torch.device("cpu"), False, False, {"logp_top2_q": mine}, ["tvd"])
    assert res["logp_top2_q"] is mine
    assert {"logp_top1_ref", "logp_top1_q", "logp_top2_ref", "tvd"} <= set(res)
    assert "jsd" not in res and "rank_ref_y" not in res
    with pytest.raises(ValueError, match="needs labels"):
        gpu.allocate_outputs(3, torch.device("cpu"), False, False,
                             {"rank_q_y": torch.zeros(3, dtype=torch.int32)})
    with pytest.raises(ValueError, match="rank_ref_y"):
        gpu.allocate_outputs(3, torch.device("cpu"), True, False,
                             {"rank_ref_y": torch.zeros(3, dtype=torch.float64)})
