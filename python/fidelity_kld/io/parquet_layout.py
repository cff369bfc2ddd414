"""What pyarrow trusts in a Parquet file before it reads a row, read and checked here first:
the footer's column chunks and every page header under the ones we read.

pyarrow 26 has two ways for one damaged byte to do harm that its reader cannot report:

* ``RowGroupMetaData.column(i)`` lets the C++ exception of a column chunk whose metadata it
  cannot build escape (size statistics of the wrong length, too few chunks), and the
  process aborts: exit 134, no file named. Its reader raises OSError for the same chunk.
* Its buffered reader allocates and zero-fills whatever size a page header claims before
  it finds the column chunk shorter: 1.4 GB resident for a 1.4 KB file.

So the footer is decoded here, and each page header of the chunks we read is checked to lie
inside its chunk, before pyarrow reads a page. The format is parquet-format's parquet.thrift
in the Thrift compact protocol (https://github.com/apache/parquet-format,
https://github.com/apache/thrift/blob/master/doc/specs/thrift-compact-protocol.md), read as
the C++ readers pyarrow uses read it (_SPECS: a list by its field's element type, an i32 from
a varint's low 32 bits, Thrift's depth and size limits), so that a damaged byte is read
here as pyarrow will read it. Field ids kept:

    FileMetaData   3 num_rows i64, 4 row_groups list<RowGroup>
    RowGroup       1 columns list<ColumnChunk>, 3 num_rows i64
    ColumnChunk    1 file_path string, 3 meta_data ColumnMetaData
    ColumnMetaData 3 path_in_schema list<string>, 5 num_values i64,
                   7 total_compressed_size i64, 9 data_page_offset i64,
                   11 dictionary_page_offset i64
    PageHeader     1 type i32, 2 uncompressed_page_size i32, 3 compressed_page_size i32,
                   5 data_page_header / 7 dictionary_page_header /
                   8 data_page_header_v2 (1 num_values i32)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .base import DumpError

# compact protocol types
_STOP, _TRUE, _FALSE, _I8, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT, _UUID = range(14)
_INTS = (_I16, _I32, _I64)
_MAX_DEPTH = 64
# PageHeader.type
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
# pyarrow refuses a page header larger than this, and Thrift strings and containers larger
# than these (its ReaderProperties' defaults)
MAX_PAGE_HEADER = 16 << 20
THRIFT_STRING_LIMIT = 100_000_000
THRIFT_CONTAINER_LIMIT = 1_000_000


class _Short(Exception):
    """The bytes ended inside a structure (a page header read in a prefix: read more)."""


class _Bad(Exception):
    """Bytes that are not a Thrift compact struct."""


class _Compact:
    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = buf, pos

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise _Short
        self.pos += 1
        return self.buf[self.pos - 1]

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 63:
                raise _Bad("a varint longer than 10 bytes")

    def int(self, t: int = _I64) -> int:
        """A zigzag varint; an i16 or i32 keeps the varint's low 32 bits and is then cast to
        its width, as Thrift's C++ readVarint32 does (pyarrow reads with it)."""
        n = self.varint()
        if t != _I64:
            n &= 0xFFFF_FFFF
        v = (n >> 1) ^ -(n & 1)
        return ((v + 0x8000) & 0xFFFF) - 0x8000 if t == _I16 else v

    def size(self, limit: int = THRIFT_STRING_LIMIT) -> int:
        """A length or element count: Thrift reads it as an int32, refuses it negative, and
        pyarrow refuses it above its limits."""
        n = self.varint() & 0xFFFF_FFFF
        if n >= 1 << 31:
            raise _Bad("a negative size")
        if n > limit:
            raise _Bad(f"a size of {n}, above pyarrow's Thrift limit of {limit}")
        return n

    def binary(self) -> bytes:
        n = self.size()
        if self.pos + n > len(self.buf):
            raise _Short
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def fields(self):
        """(field id, type) of each field of a struct; the caller reads or skips the value."""
        last = 0
        while True:
            b = self.byte()
            t = b & 0x0F
            if t == _STOP:
                return
            last = ((last + (b >> 4) + 0x8000) & 0xFFFF) - 0x8000 if b >> 4 else self.int(_I16)
            yield last, t

    def list_header(self) -> tuple[int, int]:
        b = self.byte()
        n = b >> 4
        if n == 15:
            n = self.size(THRIFT_CONTAINER_LIMIT)
        if n > len(self.buf) - self.pos and b & 0x0F != _STOP:  # a byte per element at least
            raise _Short
        return n, b & 0x0F

    def skip(self, t: int, depth: int = 0, element: bool = False) -> None:
        if depth > _MAX_DEPTH:
            raise _Bad("structures nested too deeply")
        if t == _STOP:  # as Thrift's skip: a list of these holds nothing
            return
        if t in (_TRUE, _FALSE):
            if element:  # a bool in a list is a byte; in a struct the type holds it
                self.byte()
        elif t == _I8:
            self.byte()
        elif t in _INTS:
            self.varint()
        elif t == _DOUBLE:
            if self.pos + 8 > len(self.buf):
                raise _Short
            self.pos += 8
        elif t == _BINARY:
            self.binary()
        elif t == _UUID:
            if self.pos + 16 > len(self.buf):
                raise _Short
            self.pos += 16
        elif t in (_LIST, _SET):
            n, et = self.list_header()
            for _ in range(n if et != _STOP else 0):
                self.skip(et, depth + 1, True)
        elif t == _MAP:
            n = self.size(THRIFT_CONTAINER_LIMIT)
            if n:
                kv = self.byte()
                if kv == _STOP:  # as Thrift's skip: entries of these hold nothing
                    return
                if n > len(self.buf) - self.pos:  # a byte per entry at least
                    raise _Short
                for _ in range(n):
                    self.skip(kv >> 4, depth + 1, True)
                    self.skip(kv & 0x0F, depth + 1, True)
        elif t == _STRUCT:
            for _, ft in self.fields():
                self.skip(ft, depth + 1)
        else:
            raise _Bad(f"unknown Thrift type {t}")

    def value(self, want, depth: int):
        """A value of the type `want` names (see _SPECS), as Thrift's generated readers read
        it: a list's elements as the field's type, whatever type its header names."""
        if depth > _MAX_DEPTH:
            raise _Bad("structures nested too deeply")
        if isinstance(want, str):
            return self.struct(want, depth)
        if isinstance(want, tuple):
            n, _ = self.list_header()
            if n > len(self.buf) - self.pos:
                raise _Short
            return [self.value(want[1], depth + 1) for _ in range(n)]
        return self.binary() if want == _BINARY else self.int(want)

    def struct(self, name: str, depth: int = 0) -> dict:
        """{field id: value} of the fields _SPECS[name] lists; a field of another id or of
        another type is skipped (as Thrift's generated readers do)."""
        spec, out = _SPECS.get(name, {}), {}
        for fid, t in self.fields():
            want = spec.get(fid)
            if want is None or _wire(want) != t:
                self.skip(t, depth + 1)
            else:
                out[fid] = self.value(want, depth + 1)
        return out


def _wire(want) -> int:
    return _STRUCT if isinstance(want, str) else _LIST if isinstance(want, tuple) else want


# parquet.thrift's structs down to the fields read here, with every list field of every
# struct on the way (so that a list is read as Thrift reads it, by the field's element type);
# a struct not named has no list fields, and is skipped field by field as Thrift reads it
_SPECS = {
    "FileMetaData": {1: _I32, 2: (_LIST, "SchemaElement"), 3: _I64, 4: (_LIST, "RowGroup"),
                     5: (_LIST, "KeyValue"), 6: _BINARY, 7: (_LIST, "ColumnOrder"),
                     8: "EncryptionAlgorithm", 9: _BINARY},
    "RowGroup": {1: (_LIST, "ColumnChunk"), 2: _I64, 3: _I64, 4: (_LIST, "SortingColumn"),
                 5: _I64, 6: _I64, 7: _I16},
    "ColumnChunk": {1: _BINARY, 2: _I64, 3: "ColumnMetaData", 4: _I64, 5: _I32, 6: _I64,
                    7: _I32, 8: "ColumnCryptoMetaData", 9: _BINARY},
    "ColumnMetaData": {1: _I32, 2: (_LIST, _I32), 3: (_LIST, _BINARY), 4: _I32, 5: _I64,
                       6: _I64, 7: _I64, 8: (_LIST, "KeyValue"), 9: _I64, 10: _I64, 11: _I64,
                       12: "Statistics", 13: (_LIST, "PageEncodingStats"), 14: _I64, 15: _I32,
                       16: "SizeStatistics", 17: "GeospatialStatistics"},
    "SizeStatistics": {1: _I64, 2: (_LIST, _I64), 3: (_LIST, _I64)},
    "GeospatialStatistics": {1: "BoundingBox", 2: (_LIST, _I32)},
    "ColumnCryptoMetaData": {1: "EncryptionWithFooterKey", 2: "EncryptionWithColumnKey"},
    "EncryptionWithColumnKey": {1: (_LIST, _BINARY), 2: _BINARY},
    "PageHeader": {1: _I32, 2: _I32, 3: _I32, 4: _I32, 5: "DataPageHeader", 6: "IndexPageHeader",
                   7: "DictionaryPageHeader", 8: "DataPageHeaderV2"},
    "DataPageHeader": {1: _I32},
    "DataPageHeaderV2": {1: _I32},
    "DictionaryPageHeader": {1: _I32},
}
# bytes a value can take in a page, by physical type (a dictionary index or a run header
# may take up to 5); BYTE_ARRAY has no bound
_WIDTH = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8}
_PAGE_SLACK = 1 << 16


def value_width(column) -> int | None:
    """Bytes one value of a pyarrow ColumnDescriptor takes at most (None: unbounded)."""
    if column.physical_type == "FIXED_LEN_BYTE_ARRAY":
        return max(int(column.length), 1)
    return _WIDTH.get(column.physical_type)


@dataclass(frozen=True)
class Chunk:
    """One column chunk: where its pages lie and how many values they hold; width: the most
    bytes a value takes (value_width), None when unbounded."""
    row_group: int
    column: str
    start: int
    length: int
    num_values: int
    num_rows: int
    width: int | None = None


def _pread(fd: int, n: int, pos: int) -> bytes:
    return os.pread(fd, n, pos)


def footer_chunks(path: str, fd: int, size: int, leaves: dict[int, str],
                  widths: dict[int, int | None] | None = None) -> list[list[Chunk]]:
    """The column chunks of the leaves {schema leaf index: dotted path} in each row group
    (widths: value_width of each leaf, for check_pages),
    from the footer's bytes; DumpError naming the file if the footer cannot hold them (a
    row group with too few chunks, a chunk in another file, a chunk outside the file, a
    path that is not the schema's)."""
    tail = _pread(fd, 8, size - 8)
    (length,) = struct.unpack("<I", tail[:4])
    if tail[4:] != b"PAR1" or length > size - 12:
        raise DumpError(f"{path}: damaged Parquet footer (length {length}, file {size} bytes)")
    try:
        meta = _Compact(_pread(fd, length, size - 8 - length)).struct("FileMetaData")
    except (_Short, _Bad) as e:
        raise DumpError(f"{path}: damaged Parquet footer ({e or 'it ends inside a field'})") from None
    data_end = size - 8 - length
    out = []
    for g, rg in enumerate(meta.get(4, [])):
        columns = rg.get(1, [])
        chunks = []
        for i, name in leaves.items():
            where = f"row group {g}, column {name}"
            if i >= len(columns):
                raise DumpError(f"{path}: row group {g} has {len(columns)} column chunks, "
                                f"too few for column {name}")
            cc = columns[i]
            if cc.get(1):
                raise DumpError(f"{path}: {where} is stored in another file "
                                f"({cc[1].decode(errors='replace')!r}), which is not supported")
            m = cc.get(3)
            if m is None or not {5, 7, 9} <= m.keys():
                raise DumpError(f"{path}: {where} has no column metadata (encrypted or damaged)")
            stored = ".".join(part.decode(errors="replace") for part in m.get(3, []))
            if stored != name:
                raise DumpError(f"{path}: {where}: its chunk is for column {stored!r}")
            start = m[9]  # as pyarrow: a dictionary page before the data pages starts the chunk
            if 0 < m.get(11, 0) < start:
                start = m[11]
            if start < 4 or m[7] < 0 or start + m[7] > data_end:
                raise DumpError(f"{path}: {where} claims bytes {start}..{start + m[7]}, outside "
                                f"the {data_end} bytes before the footer")
            if m[5] < 0:
                raise DumpError(f"{path}: {where} claims {m[5]} values")
            chunks.append(Chunk(g, name, start, m[7], m[5], rg.get(3, -1), (widths or {}).get(i)))
        out.append(chunks)
    return out


def check_pages(path: str, fd: int, chunk: Chunk) -> list[tuple[int, int, int]]:
    """Every page header pyarrow will read in the chunk (until its data pages hold the
    chunk's values) parses, claims no more bytes than the chunk has left, and (for a column
    of bounded width) no more decoded bytes than its values can take: each value its width
    (5 for a dictionary index), plus 4 for its repetition and definition levels (an RLE run
    of one, both), plus 64 KB. pyarrow allocates the decoded size a page claims before it
    decodes. Returns (offset, page type, compressed size) of each page."""
    pos, end, seen, pages = chunk.start, chunk.start + chunk.length, 0, []
    where = f"row group {chunk.row_group}, column {chunk.column}"
    while seen < chunk.num_values and pos < end:
        want = 256
        while True:
            buf = _pread(fd, min(want, end - pos), pos)
            try:
                r = _Compact(buf)
                h = r.struct("PageHeader")
                break
            except _Short:
                if len(buf) >= min(end - pos, MAX_PAGE_HEADER):
                    raise DumpError(f"{path}: {where}: the page header at byte {pos} runs past "
                                    f"its column chunk") from None
                want *= 16
            except _Bad as e:
                raise DumpError(f"{path}: {where}: damaged page header at byte {pos} ({e})") from None
        if not {1, 2, 3} <= h.keys():
            raise DumpError(f"{path}: {where}: the page header at byte {pos} lacks its type or sizes")
        left = end - pos - r.pos
        if not 0 <= h[3] <= left or h[2] < 0:
            raise DumpError(f"{path}: {where}: the page at byte {pos} claims {h[3]} bytes, its "
                            f"column chunk has {left} left (a damaged page header)")
        values = h.get({_DATA_PAGE: 5, _DATA_PAGE_V2: 8, _DICTIONARY_PAGE: 7}.get(h[1], -1), {}).get(1)
        if h[1] in (_DATA_PAGE, _DATA_PAGE_V2, _DICTIONARY_PAGE) and (values is None or values < 0):
            raise DumpError(f"{path}: {where}: the page at byte {pos} has no value count")
        if values is not None and chunk.width is not None:
            most = values * (max(chunk.width, 5) + 4) + _PAGE_SLACK
            if h[2] > most:
                raise DumpError(f"{path}: {where}: the page at byte {pos} claims {h[2]} bytes "
                                f"decoded, more than its {values} values can take ({most}; a "
                                "damaged page header)")
        if h[1] in (_DATA_PAGE, _DATA_PAGE_V2):
            seen += values
        pages.append((pos, h[1], h[3]))
        pos += r.pos + h[3]
    if seen < chunk.num_values:
        raise DumpError(f"{path}: {where}: its pages hold {seen} values, its metadata says "
                        f"{chunk.num_values}")
    return pages


def check_layout(path: str, leaves: dict[int, str],
                 widths: dict[int, int | None] | None = None,
                 row_groups: set[int] | None = None) -> list[list[Chunk]]:
    """footer_chunks, then check_pages on every chunk (of the row groups in `row_groups`,
    the ones to be read; None: all): the chunks per row group."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise DumpError(f"{path}: cannot read ({e.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        groups = footer_chunks(path, fd, size, leaves, widths)
        for g, chunks in enumerate(groups):
            for c in chunks if row_groups is None or g in row_groups else ():
                check_pages(path, fd, c)
        return groups
    finally:
        os.close(fd)


def check_columns(path: str, metadata, top: set[str] | None = None,
                  row_groups: set[int] | None = None) -> list[list[Chunk]]:
    """check_layout on the leaves of a pyarrow FileMetaData's columns (those under the
    top-level names in `top`; None: all), with their value widths, in the row groups to be
    read (None: all); DumpError names the file if the footer read here disagrees with
    pyarrow's on the row groups."""
    schema = metadata.schema
    leaves, widths = {}, {}
    for i in range(metadata.num_columns):
        column = schema.column(i)
        if top is None or column.path.split(".")[0] in top:
            leaves[i], widths[i] = column.path, value_width(column)
    groups = check_layout(path, leaves, widths, row_groups)
    rows = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    if leaves and [c[0].num_rows for c in groups] != rows:  # the same footer, read twice
        raise DumpError(f"{path}: damaged Parquet footer (its row groups read differently)")
    return groups
