"""io/parquet_layout: the footer's column chunks and the page headers under them, read by
hand, against pyarrow's own reading of the same files (an independent implementation):
every chunk's offsets, sizes and value counts equal pyarrow's, and the pages tile the chunk
exactly; a damaged page or footer is refused naming the file, the row group and the column."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from fidelity_kld.io import DumpError, open_source  # noqa: E402
from fidelity_kld.io import parquet_layout as pl  # noqa: E402

ROWS, VOCAB = 40, 97


def _table(kind: str, nullable: bool = False, ids: bool = True):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((ROWS, VOCAB)).astype(np.float16 if kind == "fp16" else np.float32)
    x[5] = 0  # a constant row: compresses well, dictionary-encodes to one value
    item = pa.field("item", pa.from_numpy_dtype(x.dtype), nullable=nullable)
    values = pa.array(x.reshape(-1))
    if kind == "list":
        offsets = pa.array(np.arange(0, (ROWS + 1) * VOCAB, VOCAB, dtype=np.int32))
        logits = pa.ListArray.from_arrays(offsets, values, type=pa.list_(item))
    else:
        logits = pa.FixedSizeListArray.from_arrays(values, type=pa.list_(item, VOCAB))
    cols = {"logits": logits}
    if ids:
        cols["label"] = pa.array(rng.integers(0, VOCAB, ROWS), pa.int64())
        cols["prompt_id"] = pa.array(np.repeat(np.arange(4), ROWS // 4), pa.int32())
    return pa.table(cols)


WRITERS = {  # name: (table kind, nullable, write_table options)
    "plain fp16": ("fp16", False, dict(compression="none", use_dictionary=False, write_statistics=False)),
    "snappy dictionary": ("fp32", False, dict(compression="snappy")),
    "zstd small pages": ("fp16", True, dict(compression="zstd", data_page_size=512)),
    "gzip pages v2": ("fp32", True, dict(compression="gzip", data_page_version="2.0")),
    "lz4 row groups of 7": ("fp16", False, dict(compression="lz4", row_group_size=7)),
    "page index, checksums": ("fp32", False, dict(write_page_index=True, write_page_checksum=True,
                                                  data_page_size=1024)),
    "byte stream split": ("fp32", False, dict(use_dictionary=False, use_byte_stream_split=True,
                                              data_page_size=700, row_group_size=13)),
    "list column, v2, small pages": ("list", True, dict(data_page_version="2.0", data_page_size=300,
                                                         row_group_size=16)),
}


def _leaves(md) -> dict[int, str]:
    return {i: md.schema.column(i).path for i in range(md.num_columns)}


@pytest.mark.parametrize("name", WRITERS)
def test_chunks_and_pages_as_pyarrow_reads_them(tmp_path, name):
    kind, nullable, opts = WRITERS[name]
    path = tmp_path / "t.parquet"
    pq.write_table(_table(kind, nullable), path, **opts)
    md = pq.ParquetFile(path).metadata
    groups = pl.check_layout(str(path), _leaves(md))
    assert len(groups) == md.num_row_groups
    n_pages = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for g, chunks in enumerate(groups):
            assert [c.column for c in chunks] == list(_leaves(md).values())
            for i, c in enumerate(chunks):
                ref = md.row_group(g).column(i)
                start = ref.dictionary_page_offset if ref.has_dictionary_page else ref.data_page_offset
                assert (c.row_group, c.start, c.length, c.num_values, c.num_rows) == (
                    g, start, ref.total_compressed_size, ref.num_values, md.row_group(g).num_rows)
                pages = pl.check_pages(str(path), fd, c)
                n_pages += len(pages) if c.column.startswith("logits") else 0
                # the pages tile the chunk: each starts where the last one ended
                assert pages[0][0] == c.start
                if ref.has_dictionary_page:
                    assert pages[0][1] == 2 and pages[1][0] == ref.data_page_offset
                # the last page ends at the chunk's end: its header plus its claimed bytes
                last_pos, _, last_size = pages[-1]
                header = os.pread(fd, 4096, last_pos)
                r = pl._Compact(header)
                r.struct("PageHeader")
                assert last_pos + r.pos + last_size == c.start + c.length
    finally:
        os.close(fd)
    if opts.get("data_page_size", 1 << 20) < 2000:  # many pages per logits chunk were walked
        assert n_pages > len(groups)
    with open_source(path) as src:  # and the reader opens it and reads every row
        assert src.read(0, ROWS).data.shape == (ROWS, VOCAB)


def _file_with_pages(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(_table("fp32", ids=False), path, compression="none", use_dictionary=False,
                   write_statistics=False, data_page_size=2048)
    md = pq.ParquetFile(path).metadata
    [[chunk]] = pl.check_layout(str(path), _leaves(md))
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = pl.check_pages(str(path), fd, chunk)
    finally:
        os.close(fd)
    return path, pages


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _set_compressed_size(path, page_pos: int, size: int, field: int = 3) -> None:
    """Rewrite compressed_page_size (field 3; uncompressed_page_size is field 2) of the page
    header at page_pos. The header may grow a few bytes, shifting what follows: the walk
    meets this page first."""
    data = bytearray(open(path, "rb").read())
    r = pl._Compact(bytes(data), page_pos)
    for fid, t in r.fields():
        at = r.pos
        r.skip(t)
        if fid == field:
            data[at : r.pos] = _varint((size << 1) ^ (size >> 63))
            break
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("page, claim, needle", [
    (1, 1434277087, "claims 1434277087 bytes, its column chunk has"),
    (0, 1 << 30, "claims 1073741824 bytes"),
    (-1, 100000, "claims 100000 bytes"),
])
def test_page_claiming_more_than_its_chunk_is_refused(tmp_path, page, claim, needle):
    path, pages = _file_with_pages(tmp_path)
    assert len(pages) > 3
    pos = pages[page][0]
    _set_compressed_size(path, pos, claim)
    with pytest.raises(DumpError) as e:
        open_source(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: row group 0, column logits.list.element: the page at byte {pos} ")
    assert needle in msg and "(a damaged page header)" in msg


def test_page_claiming_more_decoded_bytes_than_its_values_take_is_refused(tmp_path):
    """uncompressed_page_size: pyarrow allocates it before decompressing. A float32 page of
    n values takes at most n x (5 + 4) bytes + 64 KB (index or value, levels)."""
    path, pages = _file_with_pages(tmp_path)
    pos = pages[2][0]
    _set_compressed_size(path, pos, 2**31 - 1, field=2)
    with pytest.raises(DumpError) as e:
        open_source(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: row group 0, column logits.list.element: the page at byte {pos} "
                          "claims 2147483647 bytes decoded, more than its "), msg


def test_topk_dumps_are_checked_too(tmp_path):
    """read_topk, read_topk_rows and read_topk_index check the layout first: a top-k dump
    whose page claims 1 GB is refused naming the file, before pyarrow allocates it."""
    from fidelity_kld.io.topk import from_logits, read_topk, read_topk_index, read_topk_rows, write_topk

    rng = np.random.default_rng(5)
    path = tmp_path / "t.topk.parquet"
    write_topk(from_logits(rng.standard_normal((50, 30)), 4, rng.integers(0, 30, 50),
                           np.arange(50) // 10, vocab=30), path)
    md = pq.ParquetFile(path).metadata
    label = next(i for i in range(md.num_columns) if md.schema.column(i).path == "label")
    [chunks] = pl.check_layout(str(path), {label: "label"})
    _set_compressed_size(path, chunks[0].start, 1 << 30)
    for read in (lambda: read_topk(path), lambda: read_topk_rows(path, 0, 10),
                 lambda: read_topk_index(path)):
        with pytest.raises(DumpError, match=f"^{path}: row group 0, column label: the page at "
                                            f"byte {chunks[0].start} claims 1073741824 bytes"):
            read()


def test_page_claiming_fewer_bytes_is_refused(tmp_path):
    """The next header is then read from inside the page's data: refused by the walk or by
    pyarrow, naming the file either way."""
    path, pages = _file_with_pages(tmp_path)
    _set_compressed_size(path, pages[1][0], pages[1][2] - 16)
    with pytest.raises(DumpError, match=f"^{path}: "):
        with open_source(path) as src:
            src.read(0, src.n_tokens)


def test_damaged_footers_are_refused(tmp_path):
    path, _ = _file_with_pages(tmp_path)
    data = open(path, "rb").read()
    (length,) = struct.unpack("<I", data[-8:-4])
    footer = data[-8 - length : -8]
    # the footer cut short in the middle: pyarrow may refuse it first; either way, by name
    for cut in (1, length // 2):
        bad = tmp_path / f"cut{cut}.parquet"
        bad.write_bytes(data[: -8 - length] + footer[:-cut] + struct.pack("<I", length - cut) + b"PAR1")
        with pytest.raises(DumpError, match=f"^{bad}: "):
            open_source(bad)
    # a footer length longer than the file
    bad = tmp_path / "long.parquet"
    bad.write_bytes(data[:-8] + struct.pack("<I", len(data)) + b"PAR1")
    with pytest.raises(DumpError, match=f"^{bad}: "):
        open_source(bad)


def _footer_rewrite(tmp_path, name, old: bytes, new: bytes):
    data = open(tmp_path / "p.parquet", "rb").read()
    (length,) = struct.unpack("<I", data[-8:-4])
    footer = data[-8 - length : -8]
    assert footer.count(old) == 1, footer.count(old)
    footer = footer.replace(old, new)
    bad = tmp_path / name
    bad.write_bytes(data[: -8 - length] + footer + struct.pack("<I", len(footer)) + b"PAR1")
    return bad


def test_chunk_in_another_file_and_wrong_path_are_refused(tmp_path):
    path, _ = _file_with_pages(tmp_path)
    data = open(path, "rb").read()
    (length,) = struct.unpack("<I", data[-8:-4])
    # ColumnChunk.file_path set (pyarrow's own metadata API, as for a _metadata file)
    md = pq.ParquetFile(path).metadata
    md.set_file_path("x.p")
    sink = pa.BufferOutputStream()
    md.write_metadata_file(sink)
    footer = sink.getvalue().to_pybytes()[4:]  # "PAR1" + footer + length + "PAR1"
    bad = tmp_path / "fp.parquet"
    bad.write_bytes(data[: -8 - length] + footer)
    assert pq.ParquetFile(bad).metadata.row_group(0).column(0).file_path == "x.p"
    with pytest.raises(DumpError, match="is stored in another file \\('x.p'\\)"):
        open_source(bad)
    # a path_in_schema that is not the schema's column: "element" -> "elemenX"
    footer = data[-8 - length : -8]
    at = footer.rindex(b"\x07element")  # the chunk's path; the schema's name comes first
    assert at > footer.index(b"\x07element")
    bad = tmp_path / "path.parquet"
    bad.write_bytes(data[: -8 - length] + footer[:at] + b"\x07elemenX" + footer[at + 8 :] + data[-8:])
    with pytest.raises(DumpError, match="its chunk is for column 'logits.list.elemenX'"):
        open_source(bad)


def test_thrift_integers_as_thrift_reads_them():
    """i32 fields keep a varint's low 32 bits (Thrift's C++ readVarint32), then zigzag;
    sizes are int32 and refused negative; a varint of more than 10 bytes is refused."""
    for value in (0, 1, -1, 2**31 - 1, -(2**31), 12345, -98765):
        zz = (value << 1) ^ (value >> 63)
        assert pl._Compact(_varint(zz)).int(pl._I32) == value
        assert pl._Compact(_varint(zz)).int(pl._I64) == value
    # a 64-bit varint read as i32: its low 32 bits, as Thrift does
    big = (1434277087 << 1) | (7 << 40)
    assert pl._Compact(_varint(big)).int(pl._I32) == 1434277087
    assert pl._Compact(_varint(2**64 - 1)).int(pl._I64) == -(2**63)
    with pytest.raises(pl._Bad):
        pl._Compact(b"\xff" * 10 + b"\x01").varint()
    with pytest.raises(pl._Bad):
        pl._Compact(_varint(2**31)).size()
    with pytest.raises(pl._Short):
        pl._Compact(b"\x80\x80").varint()


def test_lists_are_read_as_their_fields_type_whatever_the_header_says():
    """As Thrift's generated readers do: ColumnMetaData.path_in_schema (field 3, a list of
    strings) whose list header names another element type is still read as strings; an
    unknown field's list of type 0 holds nothing."""
    # struct ColumnMetaData: field 3 list (header 0x39), 2 elements of declared type 5 (i32)
    # but read as binaries; then field 5 (delta 2, i64: 0x26) = 7 (zigzag 14); stop
    body = b"\x39" + b"\x25" + b"\x02ab" + b"\x01c" + b"\x26\x0e" + b"\x00"
    assert pl._Compact(body).struct("ColumnMetaData") == {3: [b"ab", b"c"], 5: 7}
    # an unknown field (id 30, list, header with delta 0: 0x09 then i16 zigzag 60) whose
    # list claims 5 elements of type 0: skipped without reading them; then field 5 again
    body = b"\x09\x3c" + b"\x50" + b"\x16\x0e" + b"\x00"
    r = pl._Compact(body)
    assert r.struct("ColumnMetaData") == {}  # ids are relative to 30 after it: 31 is unknown
    assert r.pos == len(body)


def test_huge_counts_of_empty_elements_are_not_walked():
    """A map or list that claims a million entries of a type that holds no bytes (Thrift's
    skip reads nothing for them): skipped at once, not looped over (a fuzzer's timeout); one
    more than pyarrow's container limit is refused, as pyarrow refuses it."""
    huge = _varint(pl.THRIFT_CONTAINER_LIMIT)
    for body in (b"\x1b" + huge + b"\x00" + b"\x00",  # field 1, a map of (STOP, STOP)
                 b"\x19\xf0" + huge + b"\x00"):  # field 1, a list of 2^31 - 1 STOPs
        r = pl._Compact(body)
        try:
            r.struct("DataPageHeaderV2")
        except (pl._Short, pl._Bad):
            pass  # refusing the bytes is fine too; looping is not
    with pytest.raises(pl._Bad, match="above pyarrow's Thrift limit"):
        pl._Compact(b"\x1b" + _varint(pl.THRIFT_CONTAINER_LIMIT + 1) + b"\x00\x00").struct("PageHeader")
    # a map whose entries take bytes, claiming more than remain: refused, not looped
    with pytest.raises(pl._Short):
        pl._Compact(b"\x1b" + huge + b"\x55" + b"\x00").struct("DataPageHeaderV2")


@pytest.mark.parametrize("depth", [10, 200])
def test_nesting_is_bounded(depth):
    body = b"\x1c" * depth + b"\x00" * (depth + 1)  # field 1 a struct, `depth` deep
    r = pl._Compact(body)
    if depth > pl._MAX_DEPTH:
        with pytest.raises(pl._Bad, match="nested too deeply"):
            r.struct("FileMetaData")
    else:
        assert r.struct("FileMetaData") == {}


def test_every_byte_of_a_small_file_changed_is_refused_or_read(tmp_path):
    """Single-byte changes all over a small file (footer, page headers, data): a DumpError
    naming the file, or a file that opens and reads; never another exception, and never
    an abort (run in a child, so that an abort fails this test instead of ending pytest)."""
    path = tmp_path / "s.parquet"
    pq.write_table(_table("fp16").slice(0, 6), path, compression="snappy", data_page_size=256)
    script = f"""
import sys
from fidelity_kld.io import DumpError, open_source
data = open({str(path)!r}, "rb").read()
p = {str(tmp_path / "b.parquet")!r}
n = {{"refused": 0, "read": 0}}
for pos in range(4, len(data) - 8):
    for value in (0x00, 0xFF, data[pos] ^ 0x10):
        bad = bytearray(data)
        bad[pos] = value
        open(p, "wb").write(bytes(bad))
        try:
            with open_source(p) as src:
                src.read(0, src.n_tokens)
            n["read"] += 1
        except DumpError as e:
            assert str(e).startswith(p + ": ") and "\\n" not in str(e), str(e)
            n["refused"] += 1
print(n["refused"], n["read"])
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    refused, read = map(int, r.stdout.split())
    assert refused > 100 and refused + read == 3 * (len(open(path, "rb").read()) - 12)
