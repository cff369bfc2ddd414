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

LEVELS = ("scalar", "avx2", "avx512")
SIMD_LEVELS = LEVELS[: LEVELS.index(_core.active_simd_level()) + 1]
V = 37  # two 16-wide vectors and a 5-entry scalar tail on every SIMD path


def logits(n=24, v=V, seed=0):
    return (np.random.default_rng(seed).normal(size=(n, v)) * 3).astype(np.float32)


def pair(n=24, v=V, seed=0):
    a = logits(n, v, seed)
    b = (a + np.random.default_rng(seed + 1).normal(scale=0.3, size=a.shape)).astype(np.float32)
    return a, b


def llama_file(n_ctx=8, n_vocab=7, n_chunk=2, tokens=None, seed=0) -> bytes:
    """A llama.cpp --kl-divergence-base file per docs/formats.md (random codes)."""
    rng = np.random.default_rng(seed)
    if tokens is None:
        tokens = rng.integers(0, n_vocab, size=n_ctx * n_chunk)
    rows_per_chunk = n_ctx - 1 - n_ctx // 2
    words = 2 * ((n_vocab + 1) // 2) + 4
    rows = rng.integers(0, 65536, size=(rows_per_chunk * n_chunk, words)).astype("<u2")
    rows[:, :4] = np.frombuffer(struct.pack("<ff", 16 / 65535, -20.0), dtype="<u2")
    rows[:, 4 + n_vocab :] = 0
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
    assert_cli_error(result, outdir, lab, "cannot read labels")
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
    "npy float64": ("q.npy", lambda b: npy_bytes(b.astype(np.float64)), "unsupported logits dtype float64"),
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
    with pytest.raises(ValueError, match="unsupported dtype complex64"):
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
