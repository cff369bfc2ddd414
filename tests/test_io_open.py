"""open_source's format detection, check_compatible, the bundled example data, and atomic
output of convert."""

from __future__ import annotations

import os
import struct

import numpy as np
import pyarrow as pa
import pytest

import fidelity_kld.io.conversion as convert_mod
from fidelity_kld.io import (
    ArraySource,
    DumpError,
    check_compatible,
    convert,
    detect_format,
    example_paths,
    open_source,
)


def logits(n=12, v=17, seed=0):
    return np.random.default_rng(seed).normal(size=(n, v)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "arrow", "parquet"])
def test_detection_by_content_not_name(tmp_path, fmt):
    ext = {"npy": ".npy", "safetensors": ".safetensors", "arrow": ".arrow", "parquet": ".parquet"}[fmt]
    p = tmp_path / f"a{ext}"
    convert(ArraySource(logits()), p)
    q = tmp_path / "renamed.bin"
    os.rename(p, q)
    assert detect_format(str(q)) == fmt
    assert open_source(q).format == fmt


def test_llama_detected_by_magic(llama_base_path):
    assert detect_format(str(llama_base_path)) == "llama"


@pytest.mark.parametrize(
    "content, name, match",
    [
        (b"", "x.kld", "empty file (0 bytes)"),
        (b"", "x.npy", "empty file (0 bytes)"),
        (b"hello world, not a dump", "x.txt", "unrecognised format"),
        (b"hello world, not a dump", "x.kld", "bad magic"),
        (b"hello world, not a dump", "x.npy", "bad magic"),
        (b"\xff\xff\xff\xff\x10\x00\x00\x00", "x.arrow", "Arrow IPC stream format"),
        (b"PAR1garbage", "x", "unreadable Parquet file"),
        (b"ARROW1\x00\x00garbage", "x", "unreadable Arrow IPC file"),
    ],
)
def test_unreadable_files_named_in_one_line(tmp_path, content, name, match):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DumpError) as e:
        open_source(p)
    msg = str(e.value)
    assert msg.startswith(str(p) + ":") and "\n" not in msg and match in msg, msg


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(DumpError, match="nope.npy: no such file"):
        open_source(tmp_path / "nope.npy")
    (tmp_path / "d").mkdir()
    with pytest.raises(DumpError, match="no files in directory"):
        open_source(tmp_path / "d")
    with pytest.raises(DumpError, match="no files match"):
        open_source(str(tmp_path / "*.npy"))


def test_arrow_stream_format_is_named(tmp_path):
    t = pa.table({"logits": pa.array([[1.0]], type=pa.list_(pa.float32(), 1))})
    p = tmp_path / "s.arrows"
    with pa.ipc.new_stream(str(p), t.schema) as w:
        w.write_table(t)
    with pytest.raises(DumpError, match="stream format"):
        open_source(p)


# --- check_compatible -----------------------------------------------------------------


def _names_both(e):
    msg = str(e.value)
    assert "ref.npy" in msg and "q.npy" in msg and "\n" not in msg, msg
    return msg


def test_compatible_pairs_pass(llama_base_path, llama_q4_path, tmp_path):
    check_compatible(open_source(llama_base_path), open_source(llama_q4_path))
    # a llama file and its conversion are comparable too
    convert(open_source(llama_q4_path), tmp_path / "q.safetensors")
    check_compatible(open_source(llama_base_path), open_source(tmp_path / "q.safetensors"))


def test_vocab_token_count_and_token_id_mismatch(tmp_path):
    y = np.arange(12) % 17
    convert(ArraySource(logits(), labels=y, path="r"), tmp_path / "ref.npy")
    ref = open_source(tmp_path / "ref.npy")

    convert(ArraySource(logits(v=18), labels=y), tmp_path / "q.npy")
    with pytest.raises(DumpError) as e:
        check_compatible(ref, open_source(tmp_path / "q.npy"))
    assert "vocabulary mismatch (17 vs 18 entries)" in _names_both(e)

    convert(ArraySource(logits(n=11), labels=y[:11]), tmp_path / "q.npy")
    with pytest.raises(DumpError) as e:
        check_compatible(ref, open_source(tmp_path / "q.npy"))
    assert "token count mismatch (12 vs 11 tokens)" in _names_both(e)

    y2 = y.copy()
    y2[7], y2[9] = 0, 1
    convert(ArraySource(logits(), labels=y2), tmp_path / "q.npy")
    with pytest.raises(DumpError) as e:
        check_compatible(ref, open_source(tmp_path / "q.npy"))
    assert "token ids differ, first at token 7 (7 vs 0; 2 of 12 differ)" in _names_both(e)

    # without labels on one side there is nothing to compare
    convert(ArraySource(logits()), tmp_path / "q.npy")  # also removes the stale q.labels.npy
    assert open_source(tmp_path / "q.npy").labels is None
    check_compatible(ref, open_source(tmp_path / "q.npy"))


def test_prompt_boundaries_must_agree(tmp_path):
    ids = np.repeat([0, 1, 2], 4)
    convert(ArraySource(logits(), prompt_ids=ids, path="r"), tmp_path / "ref.npy")
    ref = open_source(tmp_path / "ref.npy")
    # numbered differently, same boundaries: comparable
    convert(ArraySource(logits(), prompt_ids=ids + 100), tmp_path / "q.npy")
    check_compatible(ref, open_source(tmp_path / "q.npy"))
    # the second prompt starts one token early in q
    shifted = ids.copy()
    shifted[3] = 1
    convert(ArraySource(logits(), prompt_ids=shifted), tmp_path / "q.npy")
    with pytest.raises(DumpError) as e:
        check_compatible(ref, open_source(tmp_path / "q.npy"))
    assert "prompt boundaries differ, first at token 3 (a new prompt starts there in q only; " \
           "2 boundaries differ)" in _names_both(e)


# --- example data ---------------------------------------------------------------------


def test_example_data_is_first_chunk_of_fixtures(llama_base_path, llama_q4_path):
    base, q = example_paths()
    for example, fixture in ((base, llama_base_path), (q, llama_q4_path)):
        ex, fx = open_source(example), open_source(fixture)
        assert ex.header["n_chunk"] == 1 and ex.header["n_ctx"] == 256
        assert os.path.getsize(example) == 20 + 4 * 256 + 127 * 16008
        np.testing.assert_array_equal(ex.tokens, fx.tokens[:256])
        np.testing.assert_array_equal(ex.read(0, 127).data, fx.read(0, 127).data)
        np.testing.assert_array_equal(ex.labels, fx.labels[:127])
    check_compatible(open_source(base), open_source(q))


def test_make_example_data_script(tmp_path, llama_base_path, llama_q4_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_example_data", os.path.join(os.path.dirname(__file__), "..", "scripts", "make_example_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(llama_base_path.parent), "--out", str(tmp_path), "--chunks", "2"])
    src = open_source(tmp_path / "q4_k_m.kld")
    assert (src.header["n_chunk"], src.n_tokens) == (2, 254)
    assert (tmp_path / "base.kld").read_bytes()[20:] == llama_base_path.read_bytes()[20 : 20 + 2048] + \
        llama_base_path.read_bytes()[6164 : 6164 + 254 * 16008]
    assert struct.unpack("<i", (tmp_path / "base.kld").read_bytes()[16:20]) == (2,)


# --- convert: atomic output -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "arrow", "parquet"])
@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_convert_leaves_nothing(tmp_path, monkeypatch, fmt, exc):
    calls = {"n": 0}
    real = convert_mod.cast_block

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise exc
        return real(*a, **kw)

    monkeypatch.setattr(convert_mod, "cast_block", failing)
    out = tmp_path / ("o." + {"arrow": "arrow"}.get(fmt, fmt))
    with pytest.raises(type(exc)):
        convert(ArraySource(logits(), labels=np.zeros(12, int), dtype=None), out, to=fmt,
                dtype="bfloat16", rows_per_chunk=5)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []


def test_failed_convert_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "o.npy"
    convert(ArraySource(logits(seed=1)), out)
    before = out.read_bytes()
    monkeypatch.setattr(convert_mod, "cast_block", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        convert(ArraySource(logits(seed=2)), out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.npy"]


def test_npy_rewrite_drops_stale_companions(tmp_path):
    out = tmp_path / "o.npy"
    convert(ArraySource(logits(), labels=np.zeros(12, int), prompt_ids=np.zeros(12, int)), out, dtype="bfloat16")
    assert {p.name for p in tmp_path.iterdir()} == {"o.npy", "o.labels.npy", "o.prompt_ids.npy", "o.npy.json"}
    convert(ArraySource(logits()), out)
    assert {p.name for p in tmp_path.iterdir()} == {"o.npy"}
    assert open_source(out).labels is None


def test_convert_refuses_bad_destinations(tmp_path, llama_base_path):
    src = ArraySource(logits())
    with pytest.raises(DumpError, match="cannot tell the output format"):
        convert(src, tmp_path / "o.txt")
    with pytest.raises(DumpError, match="does not exist"):
        convert(src, tmp_path / "missing" / "o.npy")
    with pytest.raises(DumpError, match="is a directory"):
        convert(src, tmp_path)
    p = tmp_path / "i.npy"
    convert(src, p)
    with pytest.raises(DumpError, match="would overwrite the input"):
        convert(open_source(p), p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["i.npy"]
