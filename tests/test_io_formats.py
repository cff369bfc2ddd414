"""Round trips through every writer/reader pair, and each raw format's error messages."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fidelity_kld.io import ArraySource, DumpError, convert, open_source

FORMATS = ("npy", "safetensors", "arrow", "parquet")
EXT = {"npy": ".npy", "safetensors": ".safetensors", "arrow": ".arrow", "parquet": ".parquet"}


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits by comparing the two neighbouring bfloat16 values in float64
    (ties to the even one): a different algorithm from the package's bit trick."""
    out = np.empty(x.shape, dtype=np.uint16)
    for idx, v in np.ndenumerate(x.astype(np.float32)):
        bits = int(np.float32(v).view(np.uint32))
        if np.isnan(v):
            out[idx] = (bits >> 16) | 0x40
            continue
        if np.isinf(v):
            out[idx] = bits >> 16
            continue
        sign, lo = (bits >> 16) & 0x8000, (bits >> 16) & 0x7FFF  # magnitude truncated
        f_lo = float(np.uint32(lo << 16).view(np.float32))
        ulp = 2.0 ** (max((lo >> 7) & 0xFF, 1) - 127 - 7)
        d_lo, d_hi = abs(float(v)) - f_lo, f_lo + ulp - abs(float(v))  # exact in float64
        up = d_hi < d_lo or (d_lo == d_hi and lo % 2 == 1)
        out[idx] = sign | (lo + up)  # lo + 1 past the largest finite value is inf, as IEEE says
    return out


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def random_logits(n=37, v=129, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 4, size=(n, v)).astype(np.float32)
    x[3, 5] = -np.inf  # masked token
    x[4, :] = 2.5  # constant row
    x[5, 7] = np.float32(1e4)
    return x


def storage(x32, dtype):
    if dtype == "float32":
        return x32
    if dtype == "float16":
        return x32.astype(np.float16)
    return bf16_reference(x32)


def read_all(src, step):
    return np.concatenate([lg.data for _, lg in src.chunks(step)])


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize
    u = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    np.testing.assert_array_equal(a.view(u), b.view(u))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("with_ids", [True, False])
def test_roundtrip(tmp_path, fmt, dtype, with_ids):
    x32 = random_logits()
    stored = storage(x32, dtype)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 129, size=37) if with_ids else None
    prompts = np.repeat(np.arange(5), [8, 8, 8, 8, 5]) if with_ids else None
    src = ArraySource(stored, dtype=dtype, labels=labels, prompt_ids=prompts)
    out = tmp_path / f"dump{EXT[fmt]}"
    assert convert(src, out, rows_per_chunk=10) == fmt  # several batches / row groups
    back = open_source(out)
    assert (back.format, back.n_tokens, back.vocab, back.dtype) == (fmt, 37, 129, dtype)
    same_bits(read_all(back, 7), stored)  # chunk boundaries straddle the written ones
    same_bits(back.read(9, 31).data, stored[9:31])
    same_bits(back.read(0, 1).data, stored[:1])  # rewinding (Parquet re-seeks)
    if with_ids:
        np.testing.assert_array_equal(back.labels, labels)
        np.testing.assert_array_equal(back.prompt_ids, prompts)
    else:
        assert back.labels is None and back.prompt_ids is None
    back.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "arrow"])
def test_stream_reads_are_views_of_the_map_and_reads_are_copies(tmp_path, fmt):
    """read_into (the stream's path) hands out views of a memory map (zero-copy); read()
    returns copies, which do not depend on the file afterwards."""
    out = tmp_path / f"d{EXT[fmt]}"
    x = random_logits()
    convert(ArraySource(x), out)
    src = open_source(out)
    a, b = src.read_into(2, 9, None).data, src.read_into(4, 6, None).data
    assert not a.flags.owndata and np.shares_memory(a, b)
    np.testing.assert_array_equal(a, x[2:9])
    c = src.read(3, 5).data
    assert c.flags.owndata
    src.close()
    out.write_bytes(b"")  # the file cut to nothing: the copy is intact
    np.testing.assert_array_equal(c, x[3:5])


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "arrow"])
def test_file_cut_short_after_open_is_an_error_naming_it(tmp_path, fmt):
    out = tmp_path / f"d{EXT[fmt]}"
    convert(ArraySource(random_logits(n=64, v=1024)), out)
    src = open_source(out)
    src.read(0, 4)
    src.read_into(0, 4, None)
    with open(out, "r+b") as f:
        f.truncate(out.stat().st_size // 2)
    for read in (src.read, lambda a, b: src.read_into(a, b, None)):
        with pytest.raises(DumpError, match="changed while it was read") as e:
            read(40, 60)
        assert str(e.value).startswith(str(out))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
def test_llama_to_raw_is_the_formats_md_decode(tmp_path, llama_base_path, fmt, out_dtype):
    src = open_source(llama_base_path)
    out = tmp_path / f"b{EXT[fmt]}"
    convert(src, out, dtype=out_dtype, rows_per_chunk=300)
    back = open_source(out)
    raw = np.frombuffer(llama_base_path.read_bytes(), dtype="<u2", offset=20 + 4 * 256 * 6).reshape(762, 8004)
    head = np.frombuffer(raw[:, :4].tobytes(), dtype="<f4").reshape(762, 2)
    want = raw[:, 4:].astype(np.float32) * head[:, :1] + head[:, 1:]
    assert want.dtype == np.float32
    rows = [0, 127, 400, 761]
    got = back.read(0, 762).data[rows]
    if out_dtype == "float32":
        same_bits(got, want[rows])
    elif out_dtype == "float16":
        same_bits(got, want[rows].astype(np.float16))
    else:
        same_bits(got, bf16_reference(want[rows]))
    np.testing.assert_array_equal(back.labels, src.labels)
    np.testing.assert_array_equal(back.prompt_ids, src.prompt_ids)


def test_float32_to_float16_and_bfloat16_casts(tmp_path):
    x = random_logits()
    convert(ArraySource(x), tmp_path / "h.npy", dtype="float16")
    same_bits(open_source(tmp_path / "h.npy").read(0, 37).data, x.astype(np.float16))
    convert(ArraySource(x), tmp_path / "b.safetensors", dtype="bfloat16")
    same_bits(open_source(tmp_path / "b.safetensors").read(0, 37).data, bf16_reference(x))
    # and back up: bfloat16 -> float32 is exact
    convert(open_source(tmp_path / "b.safetensors"), tmp_path / "f.arrow", dtype="float32")
    same_bits(open_source(tmp_path / "f.arrow").read(0, 37).data, bf16_to_f32(bf16_reference(x)))


def test_bf16_reference_rounding_cases():
    vals = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, np.inf, -np.inf,
                     3.4028235e38, np.nan], dtype=np.float32)
    got = bf16_reference(vals)
    assert list(got[:4]) == [0x3F80, 0x3F80, 0x3F82, 0x3F81]  # ties to even, else nearest
    assert got[5] == 0x7F80 and got[6] == 0xFF80 and got[7] == 0x7F80
    from fidelity_kld.io._util import f32_to_bf16

    same_bits(f32_to_bf16(vals), got)


def test_float16_overflow_is_refused_and_leaves_nothing(tmp_path):
    x = random_logits()
    x[20, 3] = 1e6
    with pytest.raises(DumpError, match=r"value 1e\+06 at token 20, entry 3 overflows float16"):
        convert(ArraySource(x), tmp_path / "h.parquet", dtype="float16", rows_per_chunk=8)
    assert list(tmp_path.iterdir()) == []


# --- .npy ----------------------------------------------------------------------------


def _err(path, match, **kw):
    with pytest.raises(DumpError) as e:
        open_source(path, **kw)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg and match in msg, msg
    return msg


def test_npy_bfloat16_declared_by_argument_or_sidecar(tmp_path):
    bits = bf16_reference(random_logits())
    p = tmp_path / "x.npy"
    np.save(p, bits)
    _err(p, "uint16")
    assert open_source(p, dtype="bfloat16").dtype == "bfloat16"
    (tmp_path / "x.npy.json").write_text(json.dumps({"dtype": "bfloat16"}))
    src = open_source(p)
    assert src.dtype == "bfloat16" and str(tmp_path / "x.npy.json") in src.files()
    (tmp_path / "x.npy.json").write_text("{not json")
    with pytest.raises(DumpError, match="x.npy.json: bad dtype sidecar"):
        open_source(p)


def test_npy_siblings(tmp_path):
    x = random_logits()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x.labels.npy", np.arange(37, dtype=np.int32))
    np.save(tmp_path / "x.prompt_ids.npy", np.zeros(37, dtype=np.int64))
    src = open_source(tmp_path / "x.npy")
    np.testing.assert_array_equal(src.labels, np.arange(37))
    assert src.labels.dtype == np.int64 and src.prompt_ids is not None
    np.save(tmp_path / "x.labels.npy", np.arange(36))
    with pytest.raises(DumpError, match=r"x\.labels\.npy: labels has 36 entries for 37 tokens"):
        open_source(tmp_path / "x.npy")
    np.save(tmp_path / "x.labels.npy", np.zeros(37, dtype=np.float32))
    with pytest.raises(DumpError, match="labels must be integers"):
        open_source(tmp_path / "x.npy")


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros(5, np.float32), "is not 2-D"),
        (np.zeros((2, 3, 4), np.float32), "is not 2-D"),
        (np.zeros((3, 4), np.int64), "unsupported logits dtype int64"),
        (np.zeros((0, 4), np.float32), "holds no logits"),
        (np.asfortranarray(np.ones((3, 4), np.float32)), "Fortran-order"),
    ],
)
def test_npy_bad_arrays(tmp_path, arr, match):
    p = tmp_path / "x.npy"
    np.save(p, arr)
    _err(p, match)


def test_npy_truncated_and_extended(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, random_logits())
    raw = p.read_bytes()
    p.write_bytes(raw[:-3])
    _err(p, "truncated")
    p.write_bytes(raw[:40])  # inside the header
    _err(p, "header")
    p.write_bytes(raw + b"\0" * 4)
    _err(p, "4 extra bytes")
    p.write_bytes(b"\x93NUMPX" + raw[6:])
    _err(p, "bad magic")


# --- safetensors ---------------------------------------------------------------------


def write_st(path, tensors: dict, header_extra=None, raw_header=None, pad=b""):
    header, blobs, off = {}, [], 0
    for name, (dt, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header.update(header_extra or {})
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs) + pad)


def test_safetensors_foreign_file_with_token_ids(tmp_path):
    x = random_logits()
    p = tmp_path / "x.safetensors"
    write_st(p, {"token_ids": ("I32", np.arange(37, dtype=np.int32)), "logits": ("F32", x)},
             header_extra={"__metadata__": {"model": "m"}})
    src = open_source(p)
    same_bits(src.read(0, 37).data, x)
    np.testing.assert_array_equal(src.labels, np.arange(37))
    assert src.header["metadata"] == {"model": "m"}


@pytest.mark.parametrize(
    "case, match",
    [
        ("header_len_past_end", "truncated in the JSON header"),
        ("offsets_past_end", "truncated: tensor 'logits' ends at byte"),
        ("offsets_inconsistent", "needs 18944 bytes, data_offsets span"),
        ("no_logits", "no 'logits' tensor (has: scores)"),
        ("three_d", "is not 2-D"),
        ("i64", "unsupported logits dtype"),
        ("bad_json", "bad safetensors JSON header"),
        ("labels_float", "tensor 'labels' must be integer"),
        ("labels_short", "tensor 'labels' has 36 entries for 37 tokens"),
    ],
)
def test_safetensors_errors(tmp_path, case, match):
    x = random_logits()
    p = tmp_path / "x.safetensors"
    if case == "header_len_past_end":
        write_st(p, {"logits": ("F32", x)})
        raw = bytearray(p.read_bytes())
        raw[:8] = struct.pack("<Q", len(raw))
        p.write_bytes(bytes(raw))
    elif case == "offsets_past_end":
        write_st(p, {"logits": ("F32", x)})
        p.write_bytes(p.read_bytes()[:-100])
    elif case == "offsets_inconsistent":
        h = json.dumps({"logits": {"dtype": "F32", "shape": [37, 128], "data_offsets": [0, x.nbytes]}}).encode()
        write_st(p, {"logits": ("F32", x)}, raw_header=h)
    elif case == "no_logits":
        write_st(p, {"scores": ("F32", x)})
    elif case == "three_d":
        write_st(p, {"logits": ("F32", x.reshape(1, 37, 129))})
    elif case == "i64":
        write_st(p, {"logits": ("I64", x.astype(np.int64))})
    elif case == "bad_json":
        write_st(p, {"logits": ("F32", x)}, raw_header=b"{nope" + b" " * 20)
    elif case == "labels_float":
        write_st(p, {"logits": ("F32", x), "labels": ("F32", np.zeros(37, np.float32))})
    elif case == "labels_short":
        write_st(p, {"logits": ("F32", x), "labels": ("I64", np.zeros(36, np.int64))})
    _err(p, match)


# --- Arrow IPC / Parquet -------------------------------------------------------------


def _write_table(path, fmt, table):
    if fmt == "arrow":
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table, max_chunksize=10)
    else:
        pq.write_table(table, str(path), row_group_size=10)


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_plain_list_column_and_metadata_bf16(tmp_path, fmt):
    x = random_logits()
    bits = bf16_reference(x)
    t = pa.table({"logits": pa.array(list(bits), type=pa.list_(pa.uint16())),
                  "token_id": pa.array(np.arange(37), type=pa.int32())})
    p = tmp_path / f"x{EXT[fmt]}"
    _write_table(p, fmt, t)
    _err(p, "uint16")
    _write_table(p, fmt, t.replace_schema_metadata({"fidelity_kld.dtype": "bfloat16"}))
    src = open_source(p)
    assert (src.dtype, src.vocab) == ("bfloat16", 129)
    same_bits(read_all(src, 6), bits)
    np.testing.assert_array_equal(src.labels, np.arange(37))


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_ragged_list_rows(tmp_path, fmt):
    rows = [np.zeros(4, np.float32)] * 20 + [np.zeros(3, np.float32)] + [np.zeros(4, np.float32)] * 5
    p = tmp_path / f"x{EXT[fmt]}"
    _write_table(p, fmt, pa.table({"logits": pa.array(rows, type=pa.list_(pa.float32()))}))
    if fmt == "arrow":  # offsets are checked when the file is opened
        _err(p, "logits row 20 has 3 values, expected 4")
    else:  # Parquet: when the row group is decoded
        src = open_source(p)
        with pytest.raises(DumpError, match=r"x\.parquet: logits row 20 has 3 values, expected 4"):
            read_all(src, 8)


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
@pytest.mark.parametrize(
    "table, match",
    [
        (pa.table({"scores": pa.array([[1.0]], type=pa.list_(pa.float32(), 1))}), "no 'logits' column (has: scores)"),
        (pa.table({"logits": pa.array([[1]], type=pa.list_(pa.int32(), 1))}), "unsupported logits dtype int32"),
        (pa.table({"logits": pa.array([1.0], type=pa.float32())}), "'logits' column is float"),
        (pa.table({"logits": pa.array([[1.0], None], type=pa.list_(pa.float32(), 1))}), "logits row 1 is null"),
        (pa.table({"logits": pa.array([[1.0]], type=pa.list_(pa.float32(), 1)),
                   "label": pa.array([None], type=pa.int64())}), "column 'label' has 1 nulls"),
        (pa.table({"logits": pa.array([[1.0]], type=pa.list_(pa.float32(), 1)),
                   "label": pa.array([0.5])}), "column 'label' must be integer"),
    ],
)
def test_table_errors(tmp_path, fmt, table, match):
    p = tmp_path / f"x{EXT[fmt]}"
    _write_table(p, fmt, table)
    if "is null" in match and fmt == "parquet":
        with pytest.raises(DumpError, match=match):
            read_all(open_source(p), 5)
    else:
        _err(p, match)


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_table_truncated(tmp_path, fmt):
    p = tmp_path / f"x{EXT[fmt]}"
    convert(ArraySource(random_logits()), p)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    _err(p, "unreadable")


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_range_checked(tmp_path, fmt):
    p = tmp_path / f"x{EXT[fmt]}"
    convert(ArraySource(random_logits()), p)
    src = open_source(p)
    assert src.read(37, 37).data.shape == (0, 129)
    with pytest.raises(IndexError):
        src.read(30, 38)


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_table_writers_declare_logit_values_non_null(tmp_path, fmt):
    """The logits' list values are declared non-nullable (the writers refuse nothing: a logit
    is never null): Parquet then stores no definition level per value, which cut its decode
    cost by a third (benchmarks/RESULTS.md); the files still read back exactly."""
    x = np.random.default_rng(4).normal(size=(5, 13)).astype(np.float16)
    path = tmp_path / f"x{EXT[fmt]}"
    convert(ArraySource(x), path)
    schema = pq.read_schema(path) if fmt == "parquet" else pa.ipc.open_file(str(path)).schema
    assert schema.field("logits").type.value_field.nullable is False
    with open_source(path) as src:
        np.testing.assert_array_equal(src.read(0, 5).data, x)

