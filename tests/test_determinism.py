"""Determinism: on each SIMD path, per-token outputs are bitwise the same whatever the thread
count and from run to run (in-process and in a fresh process), and summaries of chunked
streaming are bitwise the summary of one call over the whole arrays. Across SIMD paths the
results agree to float32 rounding only (checked with a tolerance, not bitwise)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fidelity_kld as fk
from fidelity_kld import _core
from fidelity_kld.cli import main
from fidelity_kld.io import ArraySource
from fidelity_kld.ops import Logits
from fidelity_kld.stream import compare_sources

# Row 4 has KL = +inf (q masks an entry P gives mass): numpy's std and percentile then
# compute inf - inf on the way (stats/summary.py); the float16 case overflows row 9 on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in subtract"),
              pytest.mark.filterwarnings("ignore:overflow encountered in cast")]

SIMD_LEVELS = tuple(_core.available_simd_levels())  # those that run on this machine
THREADS = (1, 2, 3, 8)
N, V = 96, 8191  # odd vocabulary: a scalar tail on every path; 96 rows split unevenly


def bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def llama_rows(x: np.ndarray) -> np.ndarray:
    """llama.cpp's uint16 rows (docs/formats.md's writer, vectorised) for float32 logits."""
    n, v = x.shape
    mx = x.max(axis=1, keepdims=True)
    m = np.maximum(x.min(axis=1, keepdims=True), mx - np.float32(16))
    lse = np.log(np.exp((x - mx).astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
    scale = ((mx - m) / np.float32(65535)).astype(np.float32)
    rows = np.zeros((n, 2 * ((v + 1) // 2) + 4), dtype=np.uint16)
    head = np.concatenate([scale, (m - mx - lse).astype(np.float32)], axis=1)
    rows[:, :4] = np.ascontiguousarray(head).view(np.uint16)
    codes = np.where(x > m, np.rint((x - m) * (np.float32(1) / scale)), 0)
    rows[:, 4 : 4 + v] = np.clip(codes, 0, 65535).astype(np.uint16)
    return rows


def inputs(seed=0):
    """Reference and quantized logits with the awkward rows: -inf masks, a NaN row (invalid),
    an all -inf row, argmax ties, a constant row, a row with a huge max, near-identical rows."""
    rng = np.random.default_rng(seed)
    a = (rng.normal(size=(N, V)) * 3).astype(np.float32)
    b = (a + rng.normal(scale=0.2, size=a.shape)).astype(np.float32)
    a[3, ::7] = -np.inf
    b[3, ::7] = -np.inf
    b[4, 11] = -np.inf
    b[5, V - 1] = np.nan
    a[6, :] = -np.inf
    a[7, [5, 900, V - 2]] = a[7].max() + 1  # ties: lowest index wins
    a[8, :] = 1.5
    a[9, :] += np.float32(1e12)
    b[10] = a[10] + np.float32(1e-4)
    labels = rng.integers(0, V, size=N)
    return a, b, labels


CASES = ("float32", "float16", "bfloat16", "llama")


def case_inputs(case):
    a, b, labels = inputs()
    if case == "float32":
        return dict(ref=a, q=b, labels=labels)
    if case == "float16":
        return dict(ref=a.astype(np.float16), q=b.astype(np.float16), labels=labels)
    if case == "bfloat16":
        return dict(ref=bf16(a), q=bf16(b), labels=labels, ref_dtype="bfloat16", q_dtype="bfloat16")
    finite = np.isfinite(a).all(axis=1) & (np.ptp(a, axis=1) > 0) & (np.abs(a).max(axis=1) < 1e6)
    a = np.where(finite[:, None], a, 0).astype(np.float32)  # llama.cpp files hold finite rows
    a[~finite] = np.random.default_rng(1).normal(size=(int((~finite).sum()), V))
    return dict(ref=Logits(llama_rows(a), "llama_u16", V), q=b, labels=labels, llama_parity=True)


def digest(st) -> dict[str, bytes]:
    return {k: np.ascontiguousarray(v).tobytes() for k, v in st.as_dict().items()}


def canonical(summary) -> str:
    """A summary as text with every float in hex: equal text <=> bitwise-equal numbers."""
    def conv(x):
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (float, np.floating)):
            return float(x).hex()
        return x
    return json.dumps(conv(dataclasses.asdict(summary)), sort_keys=True)


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("case", CASES)
def test_per_token_bitwise_equal_across_thread_counts_and_runs(simd, case):
    kw = case_inputs(case)
    ref, q, labels = kw.pop("ref"), kw.pop("q"), kw.pop("labels")
    first = fk.compare(ref, q, labels, threads=1, simd=simd, **kw)
    want = digest(first)
    assert 0 < int(first.valid.sum()) < N  # the invalid rows are in the data
    for threads in THREADS:
        for _ in range(2):
            got = digest(fk.compare(ref, q, labels, threads=threads, simd=simd, **kw))
            assert got.keys() == want.keys()
            for k in want:
                assert got[k] == want[k], f"{k} differs with {threads} threads on {simd}"


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("case", CASES)
def test_summary_of_chunked_streaming_is_bitwise_the_single_call(simd, case):
    kw = case_inputs(case)
    ref, q, labels = kw.pop("ref"), kw.pop("q"), kw.pop("labels")
    whole = fk.compare(ref, q, labels, simd=simd, **kw)
    want = canonical(fk.summarize(whole))
    ref_src = (_LogitsSource(ref) if isinstance(ref, Logits)
               else ArraySource(ref, dtype=kw.get("ref_dtype")))
    q_src = ArraySource(q, dtype=kw.get("q_dtype"))
    row_bytes = ref_src.bytes_per_token + q_src.bytes_per_token
    compare_fn = functools.partial(fk.compare, simd=simd)
    for rows_per_chunk in (1, 7, 32, N - 1, N):
        [st] = compare_sources(ref_src, [q_src], labels=labels, threads=3,
                               llama_parity=kw.get("llama_parity", False),
                               chunk_bytes=rows_per_chunk * row_bytes, compare_fn=compare_fn)
        assert digest(st) == digest(whole), rows_per_chunk
        assert canonical(fk.summarize(st)) == want, rows_per_chunk
    # the accumulator, fed in uneven batches, gives the same summary too
    acc = fk.Accumulator(threads=2, llama_parity=kw.get("llama_parity", False))
    for lo, hi in ((0, 5), (5, 50), (50, N)):
        acc.add(_rows(ref, lo, hi), _rows(q, lo, hi), labels[lo:hi], simd=simd,
                **{k: v for k, v in kw.items() if k.endswith("_dtype")})
    assert canonical(acc.summary()) == want


def _rows(x, lo, hi):
    return x.rows(lo, hi) if isinstance(x, Logits) else x[lo:hi]


class _LogitsSource(ArraySource):
    """An ArraySource over llama_u16 rows (ArraySource takes plain arrays)."""

    def __init__(self, lg: Logits):
        super().__init__(lg)

    @property
    def bytes_per_token(self) -> int:
        return int(self._logits.data.shape[1]) * 2


def test_cli_summary_is_the_single_call_summary(tmp_path, capsys):
    """The CLI streams files in 128 MB chunks through a reader thread; its JSON summary is
    bitwise the summary of one compare() over the arrays (JSON floats round-trip exactly)."""
    a, b, labels = inputs()
    np.save(tmp_path / "ref.npy", a)
    np.save(tmp_path / "q.npy", b)
    np.save(tmp_path / "labels.npy", labels)
    want = fk.summarize(fk.compare(a, b, labels)).to_dict()
    for threads in ("1", "3"):
        try:
            main(["compare", str(tmp_path / "ref.npy"), str(tmp_path / "q.npy"), "--labels",
                  str(tmp_path / "labels.npy"), "--format", "json", "-q", "--threads", threads])
        except SystemExit as e:
            assert e.code == 0
        out, err = capsys.readouterr()
        got = json.loads(out)["models"][0]["summary"]
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


_CHILD = """
import hashlib, sys, numpy as np, fidelity_kld as fk
sys.path.insert(0, {tests!r})
from test_determinism import inputs
a, b, labels = inputs()
for simd in {levels!r}:
    st = fk.compare(a, b, labels, simd=simd, threads=int(sys.argv[1]))
    h = hashlib.sha256()
    for k, v in sorted(st.as_dict().items()):
        h.update(k.encode()); h.update(np.ascontiguousarray(v).tobytes())
    print(simd, h.hexdigest())
"""


def test_bitwise_equal_in_a_fresh_process():
    a, b, labels = inputs()
    lines = []
    for simd in SIMD_LEVELS:
        st = fk.compare(a, b, labels, simd=simd, threads=2)
        h = hashlib.sha256()
        for k, v in sorted(st.as_dict().items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
        lines.append(f"{simd} {h.hexdigest()}")
    code = _CHILD.format(tests=str(Path(__file__).parent), levels=SIMD_LEVELS)
    r = subprocess.run([sys.executable, "-c", code, "8"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == lines


@pytest.mark.skipif(len(SIMD_LEVELS) < 2, reason="one SIMD path on this CPU")
@pytest.mark.parametrize("case", CASES)
def test_simd_paths_agree_to_float32_rounding_not_bitwise(case):
    """Paths differ in vector width and FMA use, so sums round differently: documented as
    'may differ in the last bits'. The same tokens are invalid on every path."""
    kw = case_inputs(case)
    ref, q, labels = kw.pop("ref"), kw.pop("q"), kw.pop("labels")
    base = fk.compare(ref, q, labels, simd="scalar", **kw)
    for simd in SIMD_LEVELS[1:]:
        st = fk.compare(ref, q, labels, simd=simd, **kw)
        np.testing.assert_array_equal(st.valid, base.valid)
        for name in ("kld", "kld_reverse", "entropy_ref", "nll_ref", "nll_q", "kld_llama"):
            x, y = getattr(st, name), getattr(base, name)
            if x is None:
                continue
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-6, err_msg=f"{name} {simd}")
        np.testing.assert_allclose(st.lse_ref, base.lse_ref, rtol=1e-9, atol=1e-6)
        assert (st.top1_q == base.top1_q).mean() > 0.98  # near-ties may flip in the last bit
