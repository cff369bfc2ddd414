"""The bad-input matrix of issue 7, end to end: every malformed dump or mismatched pair gives
one line naming the file and the problem, exit 1 from the CLI (a DumpError / ValueError from
the API), and no output file or temporary file behind it. Legal oddities (NaN/+inf tokens,
-inf masks, V = 1, non-contiguous arrays) give the right numbers and are counted, never
averaged in silently.

The CLI runs in-process through fidelity_kld.cli.main (the console script's entry point, with
its exception handling and exit codes); a few cases also run as a real subprocess."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fidelity_kld as fk
from fidelity_kld import _core
from fidelity_kld.cli import main
from fidelity_kld.io import ArraySource, DumpError, check_compatible, convert, open_source
from fidelity_kld.reference import logit_stats as reference_stats
from fidelity_kld.stream import compare_sources

SIMD_LEVELS = tuple(_core.available_simd_levels())  # those that run on this machine
V = 37  # two 16-wide vectors and a 5-entry scalar tail on every SIMD path


def logits(n=24, v=V, seed=0):
    return (np.random.default_rng(seed).normal(size=(n, v)) * 3).astype(np.float32)


def pair(n=24, v=V, seed=0):
    a = logits(n, v, seed)
    b = (a + np.random.default_rng(seed + 1).normal(scale=0.3, size=a.shape)).astype(np.float32)
    return a, b


def llama_rows(logits: np.ndarray) -> np.ndarray:
    """llama.cpp's row encoding of float logits (docs/formats.md, in float64 here):
    [n, words] uint16, scale and min_log_prob first."""
    n, v = logits.shape
    top = logits.max(axis=1, keepdims=True)
    floor = np.maximum(logits.min(axis=1, keepdims=True), top - 16)
    lse = np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    scale = ((top - floor) / 65535).astype(np.float32)
    rows = np.zeros((n, 2 * ((v + 1) // 2) + 4), "<u2")
    rows[:, :4] = np.concatenate([scale, (floor - top - lse).astype(np.float32)], axis=1).view("<u2")
    rows[:, 4 : 4 + v] = np.clip(np.rint(np.clip(logits - floor, 0, None) / scale), 0, 65535)
    return rows


def llama_file(n_ctx=8, n_vocab=7, n_chunk=2, tokens=None, seed=0) -> bytes:
    """A llama.cpp --kl-divergence-base file per docs/formats.md (random logits,
    encoded as llama.cpp encodes them)."""
    rng = np.random.default_rng(seed)
    if tokens is None:
        tokens = rng.integers(0, n_vocab, size=n_ctx * n_chunk)
    rows_per_chunk = n_ctx - 1 - n_ctx // 2
    rows = llama_rows(rng.normal(size=(rows_per_chunk * n_chunk, n_vocab)) * 3)
    head = b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, n_chunk)
    return head + np.asarray(tokens, dtype="<i4").tobytes() + rows.tobytes()


# n_ctx=8, vocab 7, 2 chunks: header 0..20, token table 20..84, six 24-byte rows 84..228
LLAMA_SIZE = 228


@pytest.fixture
def outdir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _keep_sigterm():
    # `compare` installs a SIGTERM handler; do not leave it in the test process.
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of fidelity_kld.cli.main(args)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def compare_with_outputs(capsys, outdir, ref, *quants, extra=()):
    return run_cli(capsys, "compare", ref, *quants, "-q", "-o", outdir / "s.json",
                   "--per-token", outdir / "t.parquet", *extra)


def assert_cli_error(result, outdir, path, *needles):
    """Exit 1, one line on stderr naming `path` and the problem, nothing in outdir."""
    code, out, err = result
    assert code == 1, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and str(path) in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert out == ""
    assert sorted(os.listdir(outdir)) == [], "output or temporary files left behind"


def assert_dump_error(fn, path, *needles):
    with pytest.raises(DumpError) as e:
        fn()
    msg = str(e.value)
    assert msg.startswith(str(path)) and ": " in msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def open_and_check(ref, q):
    with open_source(ref) as r, open_source(q) as s:
        check_compatible(r, s)


# ---------------------------------------------------------------- NaN, +inf, -inf, all -inf


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("side", ["ref", "q"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("col", [3, V - 2])  # inside a vector / in the scalar tail
def test_nan_and_posinf_tokens_are_invalid_and_only_those(simd, side, value, col):
    a, b = pair()
    bad = {"ref": a, "q": b}[side]
    bad[5, col] = value
    bad[17, 0] = value
    st = fk.compare(a, b, np.arange(24) % V, simd=simd)
    invalid = np.zeros(24, bool)
    invalid[[5, 17]] = True
    np.testing.assert_array_equal(st.valid, ~invalid)
    for name in ("kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref", "nll_ref", "nll_q"):
        assert np.isnan(getattr(st, name)[invalid]).all(), name
        assert np.isfinite(getattr(st, name)[~invalid]).all(), name
    assert (st.top1_ref[invalid] == -1).all() and (st.top1_q[invalid] == -1).all()
    clean = fk.compare(a[~invalid], b[~invalid], (np.arange(24) % V)[~invalid], simd=simd)
    np.testing.assert_array_equal(st.kld[~invalid], clean.kld)
    s = fk.summarize(st)
    assert (s.n_tokens, s.n_valid, s.n_invalid) == (24, 22, 2)
    assert s.kld.mean == fk.summarize(clean).kld.mean  # excluded, not averaged in


def test_nan_tokens_counted_and_reported_by_the_cli(tmp_path, outdir, capsys):
    a, b = pair()
    b[2, 4] = np.nan
    b[9, V - 1] = np.inf
    a[11, :] = -np.inf  # all -inf: no finite logit, an invalid token
    np.save(tmp_path / "ref.npy", a)
    np.save(tmp_path / "q.npy", b)
    code, out, err = compare_with_outputs(capsys, outdir, tmp_path / "ref.npy", tmp_path / "q.npy",
                                          extra=("--format", "json"))
    assert code == 0, err
    assert err.count("\n") == 1 and "warning:" in err and "q.npy" in err and "3 of 24 tokens" in err
    doc = json.loads(out)
    s = doc["models"][0]["summary"]
    assert (s["n_tokens"], s["n_valid"], s["n_invalid"]) == (24, 21, 3)
    keep = np.ones(24, bool)
    keep[[2, 9, 11]] = False
    assert s["kld"]["mean"] == float(np.mean(fk.compare(a[keep], b[keep]).kld))
    assert json.loads((outdir / "s.json").read_text())["models"][0]["summary"]["n_invalid"] == 3
    per_token = pq.read_table(outdir / "t.parquet")
    kld = per_token.column("kld").to_numpy()
    assert np.isnan(kld[~keep]).all() and np.isfinite(kld[keep]).all()
    # the text report says so too
    code, out, _ = run_cli(capsys, "compare", tmp_path / "ref.npy", tmp_path / "q.npy", "-q")
    assert code == 0 and "Tokens: 24 (3 invalid, excluded; 0 with infinite KLD)" in out


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # percentiles of +inf
@pytest.mark.parametrize("simd", SIMD_LEVELS)
def test_neg_inf_masks_are_legal(simd):
    a, b = pair()
    masked = [0, 5, 20, V - 1]  # vector body and tail
    a[:, masked] = -np.inf
    b[:, masked] = -np.inf
    keep = np.setdiff1d(np.arange(V), masked)
    st = fk.compare(a, b, keep[np.arange(24) % keep.size], simd=simd)
    assert st.valid.all()
    ref = reference_stats(a[:, keep].astype(np.float64), b[:, keep].astype(np.float64))
    for name in ("kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref"):
        np.testing.assert_allclose(getattr(st, name), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(st.top1_ref, keep[ref["top1_ref"]])
    # -inf on the q side only, where P has mass: KL(P||Q) = +inf, counted, not invalid
    b2 = b.copy()
    b2[3, keep[0]] = -np.inf
    st2 = fk.compare(a, b2, simd=simd)
    assert st2.valid.all() and st2.kld[3] == np.inf and np.isfinite(np.delete(st2.kld, 3)).all()
    s = fk.summarize(st2)
    assert s.n_kld_inf == 1 and s.n_invalid == 0 and s.kld.mean == np.inf


def test_neg_inf_masks_through_the_cli(tmp_path, outdir, capsys):
    a, b = pair()
    a[:, [1, 30]] = -np.inf
    b[:, [1, 30]] = -np.inf
    np.save(tmp_path / "ref.npy", a)
    np.save(tmp_path / "q.npy", b.astype(np.float16))
    code, out, err = compare_with_outputs(capsys, outdir, tmp_path / "ref.npy", tmp_path / "q.npy",
                                          extra=("--format", "json"))
    assert code == 0 and err == "", err
    s = json.loads(out)["models"][0]["summary"]
    assert s["n_invalid"] == 0 and s["n_kld_inf"] == 0 and math.isfinite(s["kld"]["mean"])


@pytest.mark.parametrize("simd", SIMD_LEVELS)
def test_all_neg_inf_row_is_an_invalid_token(simd):
    a, b = pair()
    b[7, :] = -np.inf
    a[8, :] = -np.inf
    st = fk.compare(a, b, simd=simd)
    assert list(np.flatnonzero(~st.valid)) == [7, 8]
    assert (st.top1_q[[7, 8]] == -1).all()
    assert fk.summarize(st).n_invalid == 2


# ---------------------------------------------------------------- mismatched pairs


@pytest.mark.parametrize("case", ["vocab", "tokens"])
def test_vocab_and_token_count_mismatch(tmp_path, outdir, capsys, case):
    a, b = pair()
    b = b[:, :-1] if case == "vocab" else b[:-1]
    what = {"vocab": "vocabulary mismatch (37 vs 36 entries)",
            "tokens": "token count mismatch (24 vs 23 tokens)"}[case]
    np.save(tmp_path / "ref.npy", a)
    np.save(tmp_path / "q.npy", b)
    ref, q = tmp_path / "ref.npy", tmp_path / "q.npy"
    assert_cli_error(compare_with_outputs(capsys, outdir, ref, q), outdir, ref, str(q), what)
    assert_dump_error(lambda: open_and_check(ref, q), ref, str(q), what)
    with pytest.raises(ValueError, match=case.replace("tokens", "token count").replace("vocab", "vocabulary")):
        fk.compare(a, b)


@pytest.mark.parametrize("where", ["npy companion", "safetensors tensor", "parquet column", "--labels"])
@pytest.mark.parametrize("bad", [V, -1])
def test_label_out_of_range(tmp_path, outdir, capsys, where, bad):
    a, b = pair()
    labels = np.arange(24) % V
    labels[6] = bad
    ref = tmp_path / "ref.npy"
    np.save(ref, a)
    extra = ()
    if where == "npy companion":
        q = tmp_path / "q.npy"
        np.save(q, b)
        np.save(tmp_path / "q.labels.npy", labels)
        named = q
    elif where == "safetensors tensor":
        q = tmp_path / "q.safetensors"
        named = q
    elif where == "parquet column":
        q = tmp_path / "q.parquet"
        named = q
    else:
        q = tmp_path / "q.npy"
        np.save(q, b)
        np.save(tmp_path / "labels.npy", labels)
        extra = ("--labels", tmp_path / "labels.npy")
        named = tmp_path / "labels.npy"
    if q.suffix in (".safetensors", ".parquet"):
        t = pa.table({"logits": pa.FixedSizeListArray.from_arrays(pa.array(b.reshape(-1)), V),
                      "label": pa.array(labels)})
        if q.suffix == ".parquet":
            pq.write_table(t, q)
        else:
            q.write_bytes(safetensors_bytes({"logits": b, "labels": labels}))
    result = compare_with_outputs(capsys, outdir, ref, q, extra=extra)
    assert_cli_error(result, outdir, named, "outside the vocabulary [0, 37)")
    if where != "--labels":
        assert_dump_error(lambda: open_source(q), q, f"label {bad} at token 6")
    with pytest.raises(ValueError, match=f"label {bad} at token 6 is outside the vocabulary"):
        fk.compare(a, b, labels)


def test_float_labels_are_refused_not_truncated():
    a, b = pair()
    with pytest.raises(ValueError, match="labels must be integer token ids, got float64"):
        fk.compare(a, b, np.arange(24) + 0.5)
    with pytest.raises(ValueError, match="labels has 3 entries for 24 tokens"):
        fk.compare(a, b, [1, 2, 3])


def test_llama_files_with_different_token_ids(tmp_path, outdir, capsys):
    tokens = np.random.default_rng(5).integers(0, 7, size=16)
    (tmp_path / "base.kld").write_bytes(llama_file(tokens=tokens, seed=1))
    other = tokens.copy()
    other[8 + 5] = (other[8 + 5] + 1) % 7  # chunk 1, position 5: the label of that chunk's row 0
    (tmp_path / "q.kld").write_bytes(llama_file(tokens=other, seed=2))
    ref, q = tmp_path / "base.kld", tmp_path / "q.kld"
    what = "token ids differ, first at token 3"
    assert_cli_error(compare_with_outputs(capsys, outdir, ref, q), outdir, ref, str(q), what)
    assert_dump_error(lambda: open_and_check(ref, q), ref, what)
    # same tokens: a valid pair (the control that makes the failure above meaningful)
    (tmp_path / "q.kld").write_bytes(llama_file(tokens=tokens, seed=2))
    code, _, err = compare_with_outputs(capsys, outdir, ref, q)
    assert code == 0, err
    assert sorted(os.listdir(outdir)) == ["s.json", "t.parquet"]


# ---------------------------------------------------------------- broken files


def safetensors_bytes(tensors: dict) -> bytes:
    codes = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64",
             np.dtype("int32"): "I32"}
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": codes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + b"".join(blobs)


def npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# (format, boundary) -> (bytes transform, expected words in the message)
TRUNCATIONS = {
    ("llama", "in the magic"): (5, "truncated in the header"),
    ("llama", "in the header"): (14, "truncated in the header"),
    ("llama", "at the token table"): (20, "truncated in the token table"),
    ("llama", "in the token table"): (50, "truncated in the token table"),
    ("llama", "at the first row"): (84, "truncated in the log-prob rows at row 0 of 6"),
    ("llama", "mid-row"): (84 + 24 * 2 + 11, "at row 2 of 6"),
    ("llama", "in the last row"): (LLAMA_SIZE - 2, "at the last row"),
    ("npy", "in the magic"): (4, "bad magic"),
    ("npy", "in the header"): (40, "truncated in the .npy header"),
    ("npy", "at the data"): (128, "truncated: header says 24x37 float32"),
    ("npy", "mid-row"): (128 + 4 * V * 3 + 9, "truncated: header says 24x37 float32"),
    ("npy", "in the last row"): (-1, "truncated: header says 24x37 float32"),
    ("safetensors", "in the length"): (6, "truncated in the header length (6 of 8 bytes)"),
    ("safetensors", "in the JSON header"): (30, "truncated in the JSON header"),
    ("safetensors", "mid-row"): (-V * 4 * 5 - 3, "truncated: tensor 'logits' ends at byte"),
    ("safetensors", "in the last row"): (-1, "truncated: tensor 'logits' ends at byte"),
    ("arrow", "in the footer"): (-5, "unreadable Arrow IPC file"),
    ("arrow", "mid-data"): (0.5, "unreadable Arrow IPC file"),
    ("parquet", "in the footer"): (-3, "unreadable Parquet file"),
    ("parquet", "mid-data"): (0.5, "unreadable Parquet file"),
}


def make_dump(tmp_path, fmt, x, name="q"):
    path = tmp_path / f"{name}.{'kld' if fmt == 'llama' else fmt}"
    if fmt == "llama":
        path.write_bytes(llama_file())
    else:
        convert(ArraySource(x), path)
    return path


@pytest.mark.parametrize("fmt, where", list(TRUNCATIONS))
def test_truncated_at_every_structural_boundary(tmp_path, outdir, capsys, fmt, where):
    a, b = pair()
    cut, needle = TRUNCATIONS[(fmt, where)]
    q = make_dump(tmp_path, fmt, b)
    raw = q.read_bytes()
    if fmt == "llama":
        assert len(raw) == LLAMA_SIZE
        ref = tmp_path / "ref.kld"
        ref.write_bytes(raw)
    else:
        ref = tmp_path / "ref.npy"
        np.save(ref, a)
    n = int(len(raw) * cut) if isinstance(cut, float) else cut
    q.write_bytes(raw[:n])
    assert 0 < len(q.read_bytes()) < len(raw)
    assert_cli_error(compare_with_outputs(capsys, outdir, ref, q), outdir, q, needle)
    assert_dump_error(lambda: open_source(q), q, needle)


@pytest.mark.parametrize("fmt", ["llama", "npy", "arrow", "parquet"])
def test_bad_magic(tmp_path, outdir, capsys, fmt):
    a, b = pair()
    q = make_dump(tmp_path, fmt, b)
    raw = bytearray(q.read_bytes())
    # _logits_ -> _Logits_, \x93NUMPY -> \x93nUMPY; Arrow and Parquet readers go by the magic
    # that ends the file (a bad leading one alone is tolerated: the data are intact)
    raw[1 if fmt in ("llama", "npy") else -2] ^= 0x20
    q.write_bytes(bytes(raw))
    ref = tmp_path / "ref.npy"
    np.save(ref, a)
    needle = {"llama": "bad magic", "npy": "bad magic", "arrow": "unreadable Arrow IPC file",
              "parquet": "unreadable Parquet file"}[fmt]
    assert_cli_error(compare_with_outputs(capsys, outdir, ref, q), outdir, q, needle)
    assert_dump_error(lambda: open_source(q), q, needle)


def _npy_claiming(shape, dtype, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape})
    return buf.getvalue() + payload


HUGE_CLAIMS = {
    "llama n_chunk": ("q.kld", lambda b: llama_file()[:8] + struct.pack("<iii", 8, 7, 2**31 - 1)
                      + llama_file()[20:], "truncated in the token table"),
    "llama n_vocab": ("q.kld", lambda b: llama_file()[:8] + struct.pack("<iii", 8, 2**31 - 1, 2)
                      + llama_file()[20:], "truncated in the log-prob rows"),
    "npy shape": ("q.npy", lambda b: _npy_claiming((10**12, V), "<f4", b.tobytes()),
                  "truncated: header says 1000000000000x37"),
    "npy labels companion": ("q.labels.npy", lambda b: _npy_claiming((10**10,), "<i8", b"\0" * 64),
                             "truncated labels: header says (10000000000,)"),
    "safetensors offsets": ("q.safetensors", lambda b: _st_claiming(b, 10**12),
                            "truncated: tensor 'logits' ends at byte"),
    "safetensors header length": ("q.safetensors",
                                  lambda b: (2**40).to_bytes(8, "little") + b"{" + b" " * 100,
                                  "header length 1099511627776 is implausible"),
}


def _st_claiming(b, n):
    raw = bytearray(safetensors_bytes({"logits": b}))
    head = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    head["logits"]["shape"] = [n, V]
    head["logits"]["data_offsets"] = [0, n * V * 4]
    blob = json.dumps(head).encode()
    return len(blob).to_bytes(8, "little") + blob + b.tobytes()


@pytest.mark.parametrize("case", list(HUGE_CLAIMS))
def test_header_claiming_more_than_the_file_holds(tmp_path, outdir, capsys, case):
    """...fails before allocating what the header claims (traced by tracemalloc: numpy
    reports its buffers there)."""
    a, b = pair()
    name, make, needle = HUGE_CLAIMS[case]
    ref = tmp_path / "ref.npy"
    np.save(ref, a)
    path = tmp_path / name
    path.write_bytes(make(b))
    q = tmp_path / "q.npy" if name == "q.labels.npy" else path
    if name == "q.labels.npy":
        np.save(q, b)
    tracemalloc.start()
    try:
        msg = assert_dump_error(lambda: open_source(q), path, needle)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated while refusing: {msg}"
    assert_cli_error(compare_with_outputs(capsys, outdir, ref, q), outdir, path, needle)


def test_cli_labels_file_claiming_a_huge_size(tmp_path, outdir, capsys):
    a, b = pair()
    np.save(tmp_path / "ref.npy", a)
    np.save(tmp_path / "q.npy", b)
    lab = tmp_path / "labels.npy"
    lab.write_bytes(_npy_claiming((10**10,), "<i8", b"\0" * 64))
    tracemalloc.start()
    try:
        result = compare_with_outputs(capsys, outdir, tmp_path / "ref.npy", tmp_path / "q.npy",
                                      extra=("--labels", lab))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_cli_error(result, outdir, lab, "truncated labels: header says (10000000000,)")
    assert peak < 8 << 20


@pytest.mark.parametrize("side", ["ref", "q"])
@pytest.mark.parametrize("ext", [".kld", ".npy", ".safetensors", ".parquet"])
def test_zero_byte_file(tmp_path, outdir, capsys, side, ext):
    a, b = pair()
    paths = {"ref": tmp_path / f"ref{ext}", "q": tmp_path / f"q{ext}"}
    make_dump(tmp_path, "llama" if ext == ".kld" else ext[1:], a, "ref")
    make_dump(tmp_path, "llama" if ext == ".kld" else ext[1:], b, "q")
    paths[side].write_bytes(b"")
    result = compare_with_outputs(capsys, outdir, paths["ref"], paths["q"])
    assert_cli_error(result, outdir, paths[side], "empty file (0 bytes)")
    assert_dump_error(lambda: open_source(paths[side]), paths[side], "empty file (0 bytes)")


WRONG_DTYPES = {
    "npy int32": ("q.npy", lambda b: npy_bytes(b.astype(np.int32)), "unsupported logits dtype int32"),
    "npy int64": ("q.npy", lambda b: npy_bytes(b.astype(np.int64)), "unsupported logits dtype int64"),
    "npy complex64": ("q.npy", lambda b: npy_bytes(b.astype(np.complex64)), "unsupported logits dtype complex64"),
    "npy uint16 undeclared": ("q.npy", lambda b: npy_bytes(b.view(np.uint16)[:, :V]), "declare bfloat16"),
    "npy big-endian": ("q.npy", lambda b: npy_bytes(b.astype(">f4")), "big-endian"),
    "npy object": ("q.npy", lambda b: npy_bytes(np.array([[1, "x"]], dtype=object)),
                   "object arrays are not logit dumps"),
    "safetensors I32": ("q.safetensors", lambda b: safetensors_bytes({"logits": b.astype(np.int32)}),
                        "unsupported logits dtype int32"),
    "parquet int64": ("q.parquet", None, "unsupported logits dtype int64"),
}


@pytest.mark.parametrize("case", list(WRONG_DTYPES))
def test_wrong_dtype(tmp_path, outdir, capsys, case):
    a, b = pair()
    name, make, needle = WRONG_DTYPES[case]
    ref = tmp_path / "ref.npy"
    np.save(ref, a)
    q = tmp_path / name
    if make is None:
        pq.write_table(pa.table({"logits": pa.FixedSizeListArray.from_arrays(
            pa.array(b.astype(np.int64).reshape(-1)), V)}), q)
    else:
        q.write_bytes(make(b))
    assert_cli_error(compare_with_outputs(capsys, outdir, ref, q), outdir, q, needle)
    assert_dump_error(lambda: open_source(q), q, needle)


def test_wrong_dtype_through_the_api():
    a, b = pair()
    with pytest.raises(ValueError, match="unsupported logit dtype complex64"):
        fk.compare(a.astype(np.complex64), b)
    with pytest.raises(ValueError, match="uint16: say dtype='bfloat16'"):
        fk.compare(a.view(np.uint16)[:, :V], b)
    with pytest.raises(ValueError, match="bfloat16 logits must be given as uint16"):
        fk.compare(a, b, ref_dtype="bfloat16")


# ---------------------------------------------------------------- layouts and shapes


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("layout", ["reversed rows", "reversed columns", "every other row",
                                    "fortran order", "column slice", "transposed view"])
def test_non_contiguous_and_negative_stride_arrays(simd, layout):
    base_a, base_b = pair(48, 2 * V)
    view = {
        "reversed rows": lambda x: x[::-1, :V],
        "reversed columns": lambda x: x[:24, ::-1][:, :V],
        "every other row": lambda x: x[::2, :V],
        "fortran order": lambda x: np.asfortranarray(x[:24, :V]),
        "column slice": lambda x: x[:24, 5 : 5 + V],
        "transposed view": lambda x: np.ascontiguousarray(x[:24, :V].T).T,
    }[layout]
    a, b = view(base_a), view(base_b)
    assert not (a.flags.c_contiguous and b.flags.c_contiguous)
    labels = np.arange(a.shape[0]) % V
    got = fk.compare(a, b, labels, simd=simd)
    want = fk.compare(np.ascontiguousarray(a), np.ascontiguousarray(b), labels, simd=simd)
    for name, arr in want.as_dict().items():
        np.testing.assert_array_equal(getattr(got, name), arr, err_msg=name)


def test_fortran_order_npy_file_is_refused(tmp_path, outdir, capsys):
    a, b = pair()
    np.save(tmp_path / "ref.npy", a)
    q = tmp_path / "q.npy"
    np.save(q, np.asfortranarray(b))
    assert_cli_error(compare_with_outputs(capsys, outdir, tmp_path / "ref.npy", q), outdir, q,
                     "Fortran-order")


def test_zero_tokens(tmp_path, outdir, capsys):
    a, b = pair()
    ref, q = tmp_path / "ref.npy", tmp_path / "q.npy"
    np.save(ref, a[:0])
    np.save(q, b[:0])
    assert_cli_error(compare_with_outputs(capsys, outdir, ref, q), outdir, ref, "holds no logits")
    assert_dump_error(lambda: open_source(ref), ref, "shape (0, 37) holds no logits")
    p = tmp_path / "z.safetensors"
    p.write_bytes(safetensors_bytes({"logits": b[:0]}))
    assert_dump_error(lambda: open_source(p), p, "holds no logits")
    with pytest.raises(DumpError, match="<array>: the dump holds no tokens"):
        compare_sources(ArraySource(a[:0]), [ArraySource(b[:0])])
    # the array API: an empty result, and a summary that says so with NaN, not 0
    st = fk.compare(a[:0], b[:0])
    assert st.n_tokens == 0 and st.kld.shape == (0,)
    s = fk.summarize(st)
    assert s.n_tokens == 0 and math.isnan(s.kld.mean) and math.isnan(s.same_top)


def test_empty_vocabulary_through_the_api():
    with pytest.raises(ValueError, match="empty vocabulary"):
        fk.compare(np.zeros((3, 0), np.float32), np.zeros((3, 0), np.float32))


@pytest.mark.parametrize("simd", SIMD_LEVELS)
def test_vocabulary_of_one(tmp_path, outdir, capsys, simd):
    a, b = pair(v=1)
    st = fk.compare(a, b, np.zeros(24, np.int64), simd=simd)
    assert st.valid.all()
    # every distribution over one entry is the same: KLD, entropy and nll are 0 up to float32
    # rounding of 2^c (the shift residual), probabilities 1, the top token 0
    for name in ("kld", "kld_reverse", "entropy_ref", "nll_ref", "nll_q"):
        assert np.abs(getattr(st, name)).max() < 1e-6, name
    np.testing.assert_allclose(st.lse_ref, a[:, 0], rtol=1e-6)
    assert (st.top1_ref == 0).all() and (st.top1_q == 0).all()
    np.testing.assert_allclose(st.p_q_y, 1.0, rtol=1e-6)
    if simd != SIMD_LEVELS[-1]:
        return
    np.save(tmp_path / "ref.npy", a)
    np.save(tmp_path / "q.npy", b)
    code, out, err = compare_with_outputs(capsys, outdir, tmp_path / "ref.npy", tmp_path / "q.npy",
                                          extra=("--format", "json"))
    assert code == 0, err
    s = json.loads(out)["models"][0]["summary"]
    assert s["n_valid"] == 24 and s["same_top"] == 1.0 and abs(s["kld"]["mean"]) < 1e-6


# ---------------------------------------------------------------- shards


def _write_shards(directory, x, names):
    directory.mkdir()
    bounds = np.linspace(0, x.shape[0], len(names) + 1).astype(int)
    for name, lo, hi in zip(names, bounds, bounds[1:]):
        np.save(directory / name, x[lo:hi])


@pytest.mark.parametrize("style", ["numbered", "n-of-m"])
def test_directory_with_a_missing_shard(tmp_path, outdir, capsys, style):
    a, b = pair(n=60)
    names = ([f"part_{i}.npy" for i in range(12)] if style == "numbered"
             else [f"logits-{i:05d}-of-00012.npy" for i in range(1, 13)])
    _write_shards(tmp_path / "ref", a, names)
    _write_shards(tmp_path / "q", b, names)
    ref, q = tmp_path / "ref", tmp_path / "q"
    code, _, err = compare_with_outputs(capsys, outdir, ref, q)  # complete: fine
    assert code == 0, err
    for f in os.listdir(outdir):
        os.unlink(outdir / f)
    os.unlink(q / names[7])
    needle = ("shard numbering jumps from part_6.npy to part_8.npy" if style == "numbered"
              else "shard 8 of 12 is missing")
    assert_cli_error(compare_with_outputs(capsys, outdir, ref, q), outdir, q, needle)
    assert_dump_error(lambda: open_source(q), q, needle)
    # a glob over the same files says the same
    assert_dump_error(lambda: open_source(str(q / "*.npy")), str(q / "*.npy"), needle)


def test_shard_missing_at_the_end_is_a_token_count_mismatch(tmp_path, outdir, capsys):
    a, b = pair(n=60)
    names = [f"part_{i}.npy" for i in range(4)]
    _write_shards(tmp_path / "ref", a, names)
    _write_shards(tmp_path / "q", b, names)
    os.unlink(tmp_path / "q" / names[-1])
    assert_cli_error(compare_with_outputs(capsys, outdir, tmp_path / "ref", tmp_path / "q"),
                     outdir, tmp_path / "ref", "token count mismatch (60 vs 45 tokens)")


def test_unpadded_shard_numbers_are_read_in_numeric_order(tmp_path):
    a, b = pair(n=60)
    _write_shards(tmp_path / "q", b, [f"part_{i}.npy" for i in range(12)])  # part_10 < part_2 as text
    np.save(tmp_path / "ref.npy", a)
    [got] = compare_sources(open_source(tmp_path / "ref.npy"), [open_source(tmp_path / "q")])
    want = fk.compare(a, b)
    np.testing.assert_array_equal(got.kld, want.kld)


# ---------------------------------------------------------------- real processes


@pytest.mark.parametrize("case", ["vocab", "truncated", "missing file"])
def test_subprocess_exit_code_and_one_line(tmp_path, case):
    a, b = pair()
    ref, q = tmp_path / "ref.npy", tmp_path / "q.npy"
    np.save(ref, a)
    np.save(q, b[:, :-1] if case == "vocab" else b)
    if case == "truncated":
        q.write_bytes(q.read_bytes()[:-7])
    if case == "missing file":
        q = tmp_path / "nope.npy"
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, "-m", "fidelity_kld", "compare", str(ref), str(q), "-q",
                        "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert r.stdout == "" and r.stderr.count("\n") == 1 and str(q) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (ref, tmp_path / "q.npy"))


@pytest.mark.parametrize("simd", SIMD_LEVELS)
@pytest.mark.parametrize("offset", [1e4, 1e9, 1e12, 1e30])
def test_huge_finite_logits_are_valid_tokens(simd, offset):
    """Finite rows whose max is far from 0 (float32 or bfloat16 dumps can hold 3e38) are
    valid tokens with the shift-invariant answers, not NaN."""
    a, b = pair()
    a = a + np.float32(offset)
    b = b + np.float32(offset)
    a[0, :] = np.float32(offset)  # all equal: uniform
    a[1, 4] = b[1, 4] = np.float32(3e38)  # one huge entry: one-hot on both sides
    st = fk.compare(a, b, np.arange(24) % V, simd=simd)
    assert st.valid.all()
    # the float64 oracle is exact on max-subtracted rows (the subtraction is exact here)
    ma, mb = a.max(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    ref = reference_stats(a.astype(np.float64) - ma, b.astype(np.float64) - mb)
    for name in ("kld", "kld_reverse", "entropy_ref"):
        np.testing.assert_allclose(getattr(st, name), ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(st.lse_ref, ma[:, 0] + ref["lse_ref"], rtol=1e-6)
    np.testing.assert_array_equal(st.top1_ref, ref["top1_ref"])
    assert abs(st.entropy_ref[0] - math.log(V)) < 1e-6 and st.top1_q[1] == 4


# ---------------------------------------------------------------- issue 12: one table
#
# Each case builds its inputs in tmp_path and returns what to run:
#   ("cli", args, path)  the CLI exits 1 with one line naming `path`, and no file in tmp_path
#                        changed or appeared (outputs aimed at inputs included);
#   ("api", fn)          fn() raises ValueError (DumpError included) in one line;
#   ("dump", path[, named])  open_source(path) raises a one-line DumpError naming the file
#                        (or the companion `named`).
# Every case also carries the words its message must contain.

DATA = os.path.join(os.path.dirname(__file__), "data")
LLAMA_ROWS_AT = 20 + 4 * 256 * 6  # tests/data/*.kld: n_ctx 256, 6 chunks, vocab 8000
LLAMA_ROW_BYTES = 16008


def _npy_pair(tmp_path, labels=False):
    a, b = pair()
    ref, q = tmp_path / "ref.npy", tmp_path / "q.npy"
    np.save(ref, a)
    np.save(q, b)
    if labels:
        np.save(tmp_path / "ref.labels.npy", np.arange(24) % V)
    return ref, q


def _corrupt_llama(tmp_path, name, damage, source="Q4_K_M.kld"):
    """A copy of a fixture with `damage(raw, row_offset)` applied."""
    raw = bytearray(open(os.path.join(DATA, source), "rb").read())
    damage(raw, lambda r: LLAMA_ROWS_AT + r * LLAMA_ROW_BYTES)
    path = tmp_path / name
    path.write_bytes(bytes(raw))
    return path


def _zero_rows(first, count):
    def damage(raw, at):
        raw[at(first) : at(first + count)] = bytes(count * LLAMA_ROW_BYTES)
    return damage


def _set_float(row, word, value):
    def damage(raw, at):
        raw[at(row) + 4 * word : at(row) + 4 * word + 4] = struct.pack("<f", value)
    return damage


def _llama_cli(tmp_path, damage, *, side="q"):
    base = tmp_path / "base.kld"
    if side == "q":
        base.write_bytes(open(os.path.join(DATA, "base.kld"), "rb").read())
        q = _corrupt_llama(tmp_path, "q.kld", damage)
        return ("cli", ["compare", base, q, "-q"], q)
    bad = _corrupt_llama(tmp_path, "base.kld", damage, source="base.kld")
    q = tmp_path / "q.kld"
    q.write_bytes(open(os.path.join(DATA, "Q4_K_M.kld"), "rb").read())
    return ("cli", ["compare", bad, q, "-q"], bad)


def _llama_shard_dir(tmp_path):
    for side, source in (("ref", "base.kld"), ("q", "Q4_K_M.kld")):
        (tmp_path / side).mkdir()
        (tmp_path / side / "part_0.kld").write_bytes(open(os.path.join(DATA, source), "rb").read())
    _corrupt_llama(tmp_path / "q", "part_1.kld", _zero_rows(3, 1))
    (tmp_path / "ref" / "part_1.kld").write_bytes(open(os.path.join(DATA, "base.kld"), "rb").read())
    return ("cli", ["compare", tmp_path / "ref", tmp_path / "q", "-q"], tmp_path / "q" / "part_1.kld")


def _npy_header_only(path, shape, descr="<i8"):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    path.write_bytes(buf.getvalue() + b"\0" * 64)
    return path


def _companion(tmp_path, name, shape):
    ref, q = _npy_pair(tmp_path)
    _npy_header_only(tmp_path / name, shape)
    return ("dump", q if name.startswith("q.") else ref, tmp_path / name)


def _labels_cli(tmp_path, write, *extra):
    ref, q = _npy_pair(tmp_path, labels="carry" in extra)
    lab = write(tmp_path)
    return ("cli", ["compare", ref, q, "-q", "--labels", lab, *[e for e in extra if e != "carry"]], lab)


def _raw_safetensors(tmp_path, header: str, body: bytes):
    p = tmp_path / "q.safetensors"
    blob = header.encode()
    p.write_bytes(len(blob).to_bytes(8, "little") + blob + body)
    return ("dump", p)


def _api(fn):
    return ("api", fn)


def _accumulate(**kw):
    a, b = pair()
    return lambda: fk.Accumulator().add(a.reshape(4, 6, V), b.reshape(4, 6, V), **kw)


def _raw_npy_header(path, header: str):
    """A version 1.0 .npy file with this header text (padded as numpy pads) and 24 int64s."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + bytes(24 * 8))
    return path


def _two_columns(tmp_path, name, twice):
    """An Arrow IPC or Parquet dump (by name's extension) with two columns named `twice`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    logits = pa.FixedSizeListArray.from_arrays(pa.array(pair()[0].reshape(-1)), V)
    cols = {"logits": logits, "label": pa.array(np.arange(24) % V)}
    arrays = [cols["logits"], cols["label"], cols[twice]]
    table = pa.Table.from_arrays(arrays, names=["logits", "label", twice])
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(table, path)
    else:
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)
    return path


def _copy_data(tmp_path, name):
    out = tmp_path / os.path.basename(name)
    out.write_bytes(open(os.path.join(DATA, name), "rb").read())
    return out


def _topk_cli(tmp_path, damage, *args):
    """`compare base.kld q.topk.parquet ARGS`: a llama.cpp reference (damaged by `damage`)
    against a top-k dump of Q4_K_M.kld."""
    top = tmp_path / "q.topk.parquet"
    assert main(["convert", os.path.join(DATA, "Q4_K_M.kld"), str(top), "--top-k", "4"]) in (None, 0)
    if damage is None:
        base = tmp_path / "base.kld"
        base.write_bytes(open(os.path.join(DATA, "base.kld"), "rb").read())
    else:
        base = _corrupt_llama(tmp_path, "base.kld", damage, source="base.kld")
    return ("cli", ["compare", base, top, "-q", *args], base)


def _cohort_cli(tmp_path, *args, path=None):
    """`cohort m.toml ARGS` on a manifest naming a summary, per-prompt files, an lm-eval
    output directory and an outcomes table (placeholders: the outputs are checked first)."""
    for name in ("summary.json", "pp/q4.parquet", "lm/results.json", "tables/q4.csv"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("not read")
    (tmp_path / "m.toml").write_text(
        'fidelity = "summary.json"\n[reference]\nname = "BF16"\noutcomes = ["lm"]\n'
        '[[models]]\nname = "Q4"\nper_prompt = { gsm8k = "pp/q4.parquet" }\n'
        'outcomes = [{ path = "tables/q4.csv", format = "table" }]\n')
    return ("cli", ["cohort", tmp_path / "m.toml", *args], path or args[-1])


def _llama_logits(damage=None, row=0, seed=0):
    """pair()'s sides as llama.cpp rows (Logits 'llama_u16'); damage(rows, row) alters one."""
    out = []
    for x in pair(seed=seed):
        rows = llama_rows(x.astype(np.float64))
        out.append(rows)
    if damage is not None:
        damage(out[1], row)
    return [fk.Logits(r, "llama_u16", V) for r in out]


def _row_float(word, value):
    def damage(rows, row):
        rows[row, 2 * word : 2 * word + 2] = np.array([value], "<f4").view("<u2")
    return damage


def _row_zeroed(rows, row):
    rows[row] = 0


def _on_the_cpu_only(fn):
    """fn run as on a machine without a GPU: TRITON_INTERPRET (which other tests in the same
    process may have set) would make ops take Triton's CPU interpreter for the GPU."""
    if torch_cuda_available():
        pytest.skip("a CUDA GPU is present")

    def without_interpreter():
        saved = os.environ.pop("TRITON_INTERPRET", None)
        try:
            return fn()
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
    return without_interpreter


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _deep(n=100_000):
    return "[" * n + "]" * n


ISSUE12 = {
    # 3: outputs never overwrite an input, a companion, a shard or each other
    "--output is the reference": (lambda t: ("cli", ["compare", *_npy_pair(t), "-q", "-o", t / "ref.npy"],
                                             t / "ref.npy"), "--output would overwrite the input"),
    "--per-token is a labels companion": (
        lambda t: ("cli", ["compare", *_npy_pair(t, labels=True), "-q", "--per-token", t / "ref.labels.npy"],
                   t / "ref.labels.npy"), "--per-token would overwrite the input"),
    "--output is a hard link to the reference": (
        lambda t: (os.link(_npy_pair(t)[0], t / "link.json"),
                   ("cli", ["compare", t / "ref.npy", t / "q.npy", "-q", "-o", t / "link.json"],
                    t / "link.json"))[1], "would overwrite the input"),
    "--output and --per-token are one new file": (
        lambda t: ("cli", ["compare", *_npy_pair(t), "-q", "-o", t / "x", "--per-token", t / "./x"],
                   t / "x"), "written by both --output and --per-token"),
    "--per-prompt is the --labels file": (
        lambda t: (np.save(t / "lab.npy", np.arange(24) % V),
                   ("cli", ["compare", *_npy_pair(t), "-q", "--labels", t / "lab.npy",
                            "--per-prompt", t / "lab.npy"], t / "lab.npy"))[1],
        "--per-prompt would overwrite the input"),
    "--output is a shard of a directory": (
        lambda t: (_write_shards(t / "q", pair()[1], ["part_0.npy", "part_1.npy"]),
                   np.save(t / "ref.npy", pair()[0]),
                   ("cli", ["compare", t / "ref.npy", t / "q", "-q", "-o", t / "q" / "part_1.npy"],
                    t / "q" / "part_1.npy"))[-1], "--output would overwrite the input"),
    "convert OUT is a companion of IN": (
        lambda t: (np.save(t / "x.prompt_ids.npy", np.zeros(24, np.int64)),
                   ("cli", ["convert", _npy_pair(t)[0].rename(t / "x.npy") or t / "x.npy",
                            t / "x.prompt_ids.npy"], t / "x.prompt_ids.npy"))[1],
        "OUT would overwrite the input"),
    "cohort --output is the manifest": (
        lambda t: ((t / "m.toml").write_text("not read"),
                   ("cli", ["cohort", t / "m.toml", "-o", t / "m.toml"], t / "m.toml"))[1],
        "--output would overwrite the input"),
    "cohort --report replaces the manifest's directory": (
        lambda t: ((t / "rep").mkdir(), (t / "rep" / "m.toml").write_text("not read"),
                   ("cli", ["cohort", t / "rep" / "m.toml", "--report", t / "rep"], t / "rep"))[2],
        "--report replaces this directory"),
    "cohort --output is a per-prompt file the manifest names": (
        lambda t: _cohort_cli(t, "-o", t / "pp" / "q4.parquet"), "--output would overwrite the input"),
    "cohort --output is a file of an outcome directory": (
        lambda t: _cohort_cli(t, "-o", t / "lm" / "results.json"), "--output would overwrite the input"),
    "cohort --output is the fidelity summary": (
        lambda t: _cohort_cli(t, "-o", t / "summary.json"), "--output would overwrite the input"),
    "cohort --report replaces a directory holding an outcomes table": (
        lambda t: _cohort_cli(t, "--report", t / "tables", path=t / "tables"),
        "--report replaces this directory, which holds"),
    # 4: corrupt llama.cpp rows are refused, naming the file and the first bad row
    "llama rows zeroed (q)": (lambda t: _llama_cli(t, _zero_rows(100, 50)),
                              "row 100 is corrupt (its log-probabilities sum to exp(8.987)"),
    "llama row zeroed (reference)": (lambda t: _llama_cli(t, _zero_rows(40, 1), side="ref"),
                                     "row 40 is corrupt"),
    "llama scale 1e30": (lambda t: _llama_cli(t, _set_float(7, 0, 1e30)),
                         "row 7 is corrupt (scale 1e+30, outside [0, 32/65535]"),
    "llama negative scale": (lambda t: _llama_cli(t, _set_float(5, 0, -1e-4)), "row 5 is corrupt (scale -0.0001"),
    "llama NaN scale": (lambda t: _llama_cli(t, _set_float(9, 0, float("nan"))), "row 9 is corrupt (scale nan"),
    "llama min_log_prob > 0": (lambda t: _llama_cli(t, _set_float(3, 1, 0.5)),
                               "row 3 is corrupt (min_log_prob 0.5 > 0"),
    "llama corrupt row in a shard directory": (_llama_shard_dir, "row 3 is corrupt"),
    # 4, in the API: the CLI's check on llama_u16 Logits, the argument and row named
    "compare on a zeroed llama.cpp reference row": (
        lambda t: _api(lambda: fk.compare(_llama_logits(_row_zeroed, 4)[1], _llama_logits()[1])),
        "ref: row 4 is corrupt (its log-probabilities sum to exp(3.611)"),
    "compare on a llama.cpp row with a negative scale": (
        lambda t: _api(lambda: fk.compare(*_llama_logits(_row_float(0, -1e-4), 5), llama_parity=True)),
        "q: row 5 is corrupt (scale -0.0001"),
    "compare_many on a llama.cpp row with min_log_prob > 0": (
        lambda t: _api(lambda: fk.compare_many(_llama_logits()[0], [_llama_logits()[1],
                                                                    _llama_logits(_row_float(1, 0.5), 3)[1]])),
        "q[1]: row 3 is corrupt (min_log_prob 0.5 > 0"),
    "Accumulator.add on a llama.cpp row with scale 1e30": (
        lambda t: _api(lambda: fk.Accumulator(llama_parity=True).add(*_llama_logits(_row_float(0, 1e30), 7))),
        "q: row 7 is corrupt (scale 1e+30, outside [0, 32/65535]; 1 of 24 rows are corrupt); "
        "bad_rows='invalid'"),
    # 4, with a top-k dump on the other side: the same check on the full llama.cpp side
    "top-k compare, corrupt llama.cpp row on the full side": (
        lambda t: _topk_cli(t, _zero_rows(40, 1)), "base.kld: row 40 is corrupt (its log-probabilities"),
    "top-k compare, --bad-rows invalid with a llama.cpp side": (
        lambda t: _topk_cli(t, None, "--bad-rows", "invalid"),
        "--bad-rows invalid does not apply to a comparison with a top-k dump"),
    # found by benchmarks/fuzz_atheris.py: a Parquet schema whose fixed list size (1879048197)
    # the stored values cannot fill; read() would have sized its buffer on that word (15 GB)
    "Parquet list size far above the stored values": (
        lambda t: ("dump", _copy_data(t, "fuzz_list_size_claim.parquet")),
        "the logits column stores 30 values, too few for 6 rows of 1879048197"),
    # found by benchmarks/fuzz_atheris.py: a page header holding a map of 2^31 entries that
    # hold no bytes (the layout check looped over them; pyarrow refuses a map that large)
    "Parquet page header with a map of nothing": (
        lambda t: ("dump", _copy_data(t, "fuzz/parquet-page-header-empty-map.parquet")),
        "row group 0, column label: damaged page header at byte 223 (a size of 2088662393"),
    # 6 rows of 5 whose footer (FileMetaData and RowGroup num_rows, one varint byte each)
    # claims 60: the stored-value count refuses it
    "Parquet row count far above the stored values": (
        lambda t: ("dump", _copy_data(t, "parquet_row_count_claim.parquet")),
        "the logits column stores 30 values, too few for 60 rows of 5"),
    # found by benchmarks/fuzz_atheris.py: two columns of one name (pyarrow's
    # Schema.field(name) raised KeyError, a traceback)
    "Arrow IPC file with two 'logits' columns": (
        lambda t: ("dump", _two_columns(t, "d.arrow", "logits")), "2 columns are named 'logits'"),
    "Parquet file with two 'logits' columns": (
        lambda t: ("dump", _two_columns(t, "d.parquet", "logits")), "2 columns are named 'logits'"),
    "Parquet file with two 'label' columns": (
        lambda t: ("dump", _two_columns(t, "d.parquet", "label")), "2 columns are named 'label'"),
    # found by benchmarks/fuzz_atheris.py: numpy sorts the header's keys (TypeError)
    "prompt ids companion whose .npy header mixes bytes and str keys": (
        lambda t: (_raw_npy_header(t / "ref.prompt_ids.npy",
                                   "{b'x': 1, 'descr': '<i8', 'fortran_order': False, 'shape': (24,), }"),
                   ("dump", _npy_pair(t)[0], t / "ref.prompt_ids.npy"))[1],
        "bad .npy header"),
    # 7: companion .npy headers with impossible sizes, refused before np.load
    "labels companion with a negative dimension": (lambda t: _companion(t, "q.labels.npy", (-1,)),
                                                   "negative dimension in shape (-1,)"),
    "labels companion with a 2^63 dimension": (lambda t: _companion(t, "q.labels.npy", (2**63,)),
                                               "claims 2^63 bytes or more"),
    "prompt ids companion with a negative dimension": (
        lambda t: _companion(t, "ref.prompt_ids.npy", (-5,)), "negative dimension"),
    "--labels with a negative dimension": (
        lambda t: _labels_cli(t, lambda d: _npy_header_only(d / "lab.npy", (-24,))), "negative dimension"),
    "--labels with a 2^64 dimension": (
        lambda t: _labels_cli(t, lambda d: _npy_header_only(d / "lab.npy", (2**64,))), "2^63 bytes or more"),
    # 11: one dtype policy
    "int64 logits": (lambda t: _api(lambda: fk.compare(pair()[0].astype(np.int64), pair()[1])),
                     "ref: unsupported logit dtype int64"),
    "uint64 logits": (lambda t: _api(lambda: fk.compare(pair()[0], pair()[1].astype(np.uint64))),
                      "q: unsupported logit dtype uint64"),
    "bool logits": (lambda t: _api(lambda: fk.compare(pair()[0] > 0, pair()[1])), "unsupported logit dtype bool"),
    "timedelta logits": (lambda t: _api(lambda: fk.compare(pair()[0].astype("m8[s]"), pair()[1])),
                         "unsupported logit dtype timedelta64[s]"),
    "object logits": (lambda t: _api(lambda: fk.compare(pair()[0].astype(object), pair()[1])),
                      "unsupported logit dtype object"),
    "ref_dtype contradicting the array": (
        lambda t: _api(lambda: fk.compare(*pair(), ref_dtype="float16")),
        "ref: dtype='float16' contradicts the array's dtype float32"),
    "Logits with float32 data declared float16": (
        lambda t: _api(lambda: fk.Logits(pair()[0], "float16", V)), "float16 logits cannot be stored as float32"),
    "torch int64 tensor": (lambda t: _api(lambda: fk.compare(
        pytest.importorskip("torch").zeros(2, V, dtype=pytest.importorskip("torch").int64), pair(2)[1])),
        "ref: unsupported logit dtype torch.int64"),
    "torch bfloat16 tensor declared float16": (lambda t: _api(lambda: fk.compare(
        pytest.importorskip("torch").zeros(2, V).bfloat16(), pair(2)[1], ref_dtype="float16")),
        "ref: dtype='float16' contradicts the tensor's dtype torch.bfloat16"),
    "compare_many with int logits": (
        lambda t: _api(lambda: fk.compare_many(pair()[0], [pair()[1], pair()[1].astype(np.int32)])),
        "q[1]: unsupported logit dtype int32"),
    # 12: clean errors, not tracebacks
    "--threads 3000000000": (lambda t: ("cli", ["compare", *_npy_pair(t), "-q", "--threads", 3000000000],
                                        "threads"), "threads must be between 0 (all cores) and"),
    "deeply nested safetensors header": (
        lambda t: _raw_safetensors(t, '{"__metadata__": ' + _deep() + "}", b""), "nested too deeply"),
    "deeply nested dtype sidecar": (
        lambda t: ((t / "q.npy.json").write_text('{"dtype": ' + _deep() + "}"), ("dump", _npy_pair(t)[1]))[1],
        "q.npy.json: dtype sidecar is nested too deeply"),
    "Logits on a 1-D array": (lambda t: _api(lambda: fk.Logits(np.zeros(V, np.float32), "float32", V)),
                              "Logits data must be 2-D [tokens, vocab], got shape (37,)"),
    "Logits on a nested list": (lambda t: _api(lambda: fk.Logits([[0.0] * V], "float32", V)),
                                "Logits data must be an array"),
    "compare on a ragged nested list": (lambda t: _api(lambda: fk.compare([[0.0, 1.0], [2.0]], [[0.0, 1.0]])),
                                        "ref must be a [tokens, vocab] array"),
    "Accumulator.add 3-D batch, list labels of the wrong length": (
        lambda t: _api(_accumulate(labels=list(range(23)))), "labels has 23 entries for a [4, 6] batch"),
    "Accumulator.add labels and mask of different lengths": (
        lambda t: _api(lambda: fk.Accumulator().add(*pair(), np.zeros(20, np.int64),
                                                    mask=np.arange(24) % 5 > 0)),
        "labels has 20 entries, mask 24"),
    # without torch (a fresh install) the line says torch is missing, with CPU torch that no
    # GPU is there; both end with the way out
    "device='cuda' without a GPU": (lambda t: _api(_on_the_cpu_only(lambda: fk.compare(*pair(), device="cuda"))),
                                    "; use device='cpu'"),
    "empty --labels text file": (
        lambda t: _labels_cli(t, lambda d: (d / "lab.txt").write_text("# no labels here\n\n") and d / "lab.txt"),
        "no labels in the file"),
    # 13: refuse, do not guess
    "2-D --labels array": (lambda t: _labels_cli(t, lambda d: (np.save(d / "lab.npy", (np.arange(24) % V).reshape(4, 6)),
                                                               d / "lab.npy")[1]),
                           "labels must be 1-D, got shape (4, 6)"),
    "two-column --labels text": (
        lambda t: _labels_cli(t, lambda d: (d / "lab.txt").write_text("".join(f"{i % V} 0\n" for i in range(24)))
                              and d / "lab.txt"), "one integer per line, found 2 columns"),
    "--labels disagreeing with the dumps' labels": (
        lambda t: _labels_cli(t, lambda d: (np.save(d / "lab.npy", (np.arange(24) + 1) % V), d / "lab.npy")[1],
                              "carry"), "labels differ from those in"),
    "safetensors duplicate key": (
        lambda t: _raw_safetensors(
            t, '{"logits": %s, "logits": %s}' % (
                json.dumps({"dtype": "F32", "shape": [1, V], "data_offsets": [0, 4 * V]}),
                json.dumps({"dtype": "F32", "shape": [24, V], "data_offsets": [0, 24 * V * 4]})),
            pair()[1].tobytes()), "duplicate key 'logits'"),
    "safetensors overlapping tensors": (
        lambda t: _raw_safetensors(
            t, json.dumps({"logits": {"dtype": "F32", "shape": [24, V], "data_offsets": [0, 24 * V * 4]},
                           "labels": {"dtype": "I64", "shape": [24], "data_offsets": [8, 8 + 24 * 8]}}),
            pair()[1].tobytes()), "tensors 'logits' and 'labels' overlap"),
}


def _snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


@pytest.mark.parametrize("case", list(ISSUE12))
def test_refused_cleanly(tmp_path, capsys, case):
    build, needle = ISSUE12[case]
    work = tmp_path / "in"
    work.mkdir()
    what = build(work)
    if what[0] == "cli":
        _, args, path = what
        before = _snapshot(work)
        code, out, err = run_cli(capsys, *args)
        assert code == 1, (code, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0], err
        assert needle in lines[0], (needle, lines[0])
        assert _snapshot(work) == before, "an input changed or an output appeared"
    elif what[0] == "api":
        with pytest.raises(ValueError) as e:
            what[1]()
        assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)
    else:
        assert_dump_error(lambda: open_source(what[1]), what[-1], needle)


# ---------------------------------------------------------------- issue 12: what is accepted


def test_fixture_rows_are_within_the_corrupt_row_tolerance():
    """Real llama.cpp rows decode to log-sum-exps near 0: the tolerance leaves room (and a
    zeroed row, ln 8000 = 9.0, is far outside)."""
    from fidelity_kld.io.llama import lse_tolerance

    for name in ("base.kld", "Q4_K_M.kld"):
        with open_source(os.path.join(DATA, name)) as src:
            st = fk.compare(src.read(0, src.n_tokens), src.read(0, src.n_tokens), llama_parity=True)
            worst = float(np.abs(st.lse_ref).max())
            assert 1e-4 < worst < lse_tolerance(src.vocab) / 2, (name, worst)
            assert math.log(src.vocab) > 1000 * lse_tolerance(src.vocab)


def test_bad_rows_invalid_counts_them_and_keeps_the_rest_exact(tmp_path, capsys):
    base = os.path.join(DATA, "base.kld")
    q = _corrupt_llama(tmp_path, "q.kld", _zero_rows(100, 50))
    code, out, err = run_cli(capsys, "compare", base, q, "-q", "--format", "json", "--bad-rows", "invalid")
    assert code == 0, err
    s = json.loads(out)["models"][0]["summary"]
    assert (s["n_tokens"], s["n_invalid"]) == (762, 50)
    with open_source(base) as r, open_source(os.path.join(DATA, "Q4_K_M.kld")) as good:
        clean = fk.compare(r.read(0, 762), good.read(0, 762), r.labels, llama_parity=True)
    keep = np.ones(762, bool)
    keep[100:150] = False
    want = fk.summarize(clean)
    got_mean = float(np.mean(clean.kld_llama[keep]))
    assert s["kld"]["mean"] == pytest.approx(got_mean, rel=1e-12)
    assert want.n_invalid == 0 and s["kld"]["mean"] != pytest.approx(want.kld.mean, rel=1e-6)


def test_api_bad_rows_invalid_and_keep():
    """compare(bad_rows='invalid') marks the corrupt rows' tokens invalid (a reference row's
    for every model) and leaves the others bitwise as they were; 'keep' uses them as stored."""
    ref, q = _llama_logits(_row_zeroed, 6)
    clean = fk.compare(ref, _llama_logits()[1], llama_parity=True)
    got = fk.compare(ref, q, llama_parity=True, bad_rows="invalid")
    assert np.flatnonzero(~got.valid).tolist() == [6]
    keep = np.arange(24) != 6
    for name in ("kld", "kld_llama", "lse_q", "top1_q"):
        np.testing.assert_array_equal(getattr(got, name)[keep], getattr(clean, name)[keep])
    assert fk.summarize(got).n_invalid == 1
    kept = fk.compare(ref, q, llama_parity=True, bad_rows="keep")
    assert kept.valid.all() and abs(kept.lse_q[6] - math.log(V)) < 1e-3  # a zeroed row: ln V
    bad_ref = _llama_logits(_row_zeroed, 2)[1]
    many = fk.compare_many(bad_ref, [q, _llama_logits()[1]], bad_rows="invalid")
    assert [np.flatnonzero(~st.valid).tolist() for st in many] == [[2, 6], [2]]
    with pytest.raises(ValueError, match="bad_rows must be one of"):
        fk.compare(ref, q, bad_rows="ignore")


def test_override_labels_uses_the_given_ones(tmp_path, capsys):
    ref, q = _npy_pair(tmp_path, labels=True)
    given = (np.arange(24) + 1) % V
    np.save(tmp_path / "lab.npy", given)
    code, out, err = run_cli(capsys, "compare", ref, q, "-q", "--format", "json", "--labels",
                             tmp_path / "lab.npy", "--override-labels")
    assert code == 0, err
    a, b = pair()
    want = fk.summarize(fk.compare(a, b, given))
    assert json.loads(out)["models"][0]["summary"]["ppl_ref"] == pytest.approx(want.ppl_ref, rel=1e-12)
    # equal labels need no flag
    np.save(tmp_path / "lab.npy", np.arange(24) % V)
    assert run_cli(capsys, "compare", ref, q, "-q", "--labels", tmp_path / "lab.npy")[0] == 0


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e8, 1e12])
def test_float64_logits_are_accurate(offset):
    """float64 rows are shifted by their maximum in float64 before the float32 core: a common
    offset costs nothing (a float32 cast turns +1e4 into a 20% KLD error)."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(40, 301)) * 4
    b = a + rng.normal(scale=0.3, size=a.shape)
    a[0, 5] = -np.inf
    b[0, 5] = -np.inf
    y = np.arange(40) % 301
    a, b = a + offset, b + offset
    st = fk.compare(a, b, y)
    ref = reference_stats(a - offset, b - offset, y)  # exact subtractions (Sterbenz), same rows
    assert st.valid.all()
    for name in ("kld", "kld_reverse", "entropy_ref", "nll_ref", "nll_q"):
        np.testing.assert_allclose(getattr(st, name), ref[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(st.lse_ref, ref["lse_ref"] + offset, rtol=1e-12, atol=1e-5)
    np.testing.assert_array_equal(st.top1_ref, ref["top1_ref"])
    [many] = fk.compare_many(a, [b], y)
    np.testing.assert_array_equal(many.kld, st.kld)


def test_float64_beyond_float32_range_is_a_valid_token():
    a = np.zeros((2, 5))
    a[:, 3] = 1e300  # a float32 cast makes this +inf: an invalid token
    st = fk.compare(a, np.zeros((2, 5)))
    assert st.valid.all() and (st.top1_ref == 3).all() and np.abs(st.entropy_ref).max() < 1e-12
    np.testing.assert_allclose(st.kld, math.log(5), rtol=1e-6)
    np.testing.assert_allclose(st.lse_ref, 1e300, rtol=1e-12)


def test_float64_npy_through_the_cli_equals_the_api(tmp_path, capsys):
    a, b = pair()
    a64, b64 = a.astype(np.float64) + 1e4, b.astype(np.float64) + 1e4
    np.save(tmp_path / "ref.npy", a64)
    np.save(tmp_path / "q.npy", b64)
    code, out, err = run_cli(capsys, "compare", tmp_path / "ref.npy", tmp_path / "q.npy", "-q",
                             "--format", "json")
    assert code == 0, err
    got = json.loads(out)["models"][0]["summary"]["kld"]["mean"]
    assert got == fk.summarize(fk.compare(a64, b64)).kld.mean
    assert got == pytest.approx(float(np.mean(reference_stats(a64 - 1e4, b64 - 1e4)["kld"])), rel=1e-4)


def test_label_impossible_on_both_sides_is_counted():
    a, b = pair()
    y = np.arange(24) % V
    a[4, y[4]] = b[4, y[4]] = -np.inf
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning leaks
        s = fk.summarize(fk.compare(a, b, y))
    keep = np.arange(24) != 4
    rest = fk.summarize(fk.compare(a[keep], b[keep], y[keep]))
    assert s.n_label_inf == 1 and rest.n_label_inf == 0
    for name in ("ppl_ratio", "ln_ppl_ratio", "cor_nll", "ppl_ref", "ppl_q"):
        assert math.isfinite(getattr(s, name)) and getattr(s, name) == getattr(rest, name), name
    assert s.kld.mean == fk.summarize(fk.compare(a, b)).kld.mean  # KLD keeps the token


def test_parquet_footer_pyarrow_cannot_build_is_refused_cleanly():
    """A fuzzed Parquet file (benchmarks/fuzz_atheris.py --reader parquet, one changed byte)
    whose column-chunk size statistics pyarrow cannot build ("Definition level histogram size
    mismatch"). pyarrow's reader reports it as an error; its metadata accessor aborts the
    process (SIGABRT, exit 134, no file name). Run in a child: the abort would end pytest."""
    path = os.path.join(DATA, "fuzz", "parquet-footer-abort.parquet")
    r = subprocess.run([sys.executable, "-c", "from fidelity_kld.cli import main; main()",
                        "info", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr[-300:])
    assert ("parquet-footer-abort.parquet: row group 1, column logits.list.element: the page at "
            "byte 354 claims 25 bytes, its column chunk has 14 left") in r.stderr


def test_parquet_page_size_claim_is_refused_before_it_is_allocated(tmp_path):
    """A fuzzed 1.4 KB Parquet file whose first logits page header claims 1434277087 bytes:
    pyarrow's buffered reader allocates and zero-fills that much (1.4 GB resident) before it
    finds the column chunk shorter. The layout check refuses the claim first: the child's
    peak RSS is within 256 MB of a child comparing a valid Parquet pair, far under it."""
    path = os.path.join(DATA, "fuzz", "parquet-page-size-claim.parquet")
    ok = tmp_path / "ok.parquet"
    assert main(["convert", str(_npy_pair(tmp_path)[0]), str(ok), "-q"]) in (None, 0)
    code = ("import resource, sys\nfrom fidelity_kld.cli import main\ntry:\n    main()\nfinally:\n"
            "    print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # set by other tests
    runs = [subprocess.run([sys.executable, "-c", code, "compare", "-q", p, p], capture_output=True,
                           text=True, timeout=120, env=env) for p in (str(ok), path)]
    assert runs[0].returncode == 0, runs[0].stderr[-300:]
    r = runs[1]
    assert r.returncode == 1, (r.returncode, r.stderr[-300:])
    assert ("parquet-page-size-claim.parquet: row group 0, column logits.list.element: the page "
            "at byte 103 claims 1434277087 bytes, its column chunk has 35 left") in r.stderr
    baseline_kb, maxrss_kb = (int(x.stderr.rsplit("maxrss", 1)[1]) for x in runs)
    assert maxrss_kb < baseline_kb + (256 << 10), (maxrss_kb, baseline_kb)
