"""Arrow IPC (file format) and Parquet logit dumps: one row per token.

Columns: ``logits`` = fixed_size_list<float32|float16>[vocab] or list<...> with every row of
length vocab; optional labels in ``label`` / ``labels`` / ``token_id`` / ``token_ids`` and
prompt ids in ``prompt_id`` / ``prompt_ids`` (integers, no nulls). bfloat16 logits are stored
as uint16 bit patterns with the schema metadata {"fidelity_kld.dtype": "bfloat16"} (or
declared with ``open_source(path, dtype='bfloat16')``).

Arrow IPC files are memory-mapped to validate them and locate each record batch's rows; the
stream then reads views of a whole-file map of our own (pages populated ahead, released
after use, guarded against the file being cut short, as for .npy), and read() copies with
pread. Compressed batches are decoded instead. Parquet is decoded batch by batch from the row group
holding the first row asked for; sequential reads continue one iterator, so memory stays at
about one read's worth whatever the file size. Before pyarrow reads a Parquet page, the
footer's column chunks and the page headers under the columns read are checked
(io/parquet_layout.py): pyarrow allocates what a page header claims, and aborts the process
on column metadata it cannot build. Like every reader here, a source is meant to
be read from one thread at a time (a prefetch thread is fine; concurrent reads are not).
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..ops import Logits
from . import parquet_layout
from ._util import STORAGE, AtomicFiles, check_ids, file_size, logical_dtype
from .base import DumpError, FileRows, LogitSource, guard_map, populate, release, row_buffer, unguard_map

LABEL_COLUMNS = ("label", "labels", "token_id", "token_ids")
PROMPT_COLUMNS = ("prompt_id", "prompt_ids")
DTYPE_KEY = b"fidelity_kld.dtype"
ROW_HEADER_COLUMN = "llama_scale_min"
ARROW_MAGIC = b"ARROW1"
PARQUET_MAGIC = b"PAR1"
# Parquet is decoded in batches of about this size (copied into the caller's buffer): the
# reader holds a batch and the pages under it, not the row group (which a writer may have
# made a GB or more). pyarrow's list decoding holds several times the batch while it works
# (levels, offsets, the builder's growth): at 2 x 224 MB fp16 a 2 MB batch peaked 27 MiB
# above a 512 KB one; smaller gains little and costs time per batch (benchmarks/RESULTS.md)
TARGET_BATCH_BYTES = 512 << 10


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _pa():
    import pyarrow as pa  # lazily: only Arrow/Parquet users pay the import

    return pa


def _inspect_schema(path: str, schema, dtype: str | None) -> dict:
    """Column names, list kind, value storage dtype, logical dtype and (if fixed) vocab."""
    pa = _pa()
    try:
        names = schema.names
    except UnicodeDecodeError:  # flatbuffer strings are not checked for UTF-8 on read
        raise DumpError(f"{path}: a column name is not valid UTF-8") from None
    if "logits" not in names:
        raise DumpError(f"{path}: no 'logits' column (has: {', '.join(names) or 'none'})")
    for col in ("logits", *LABEL_COLUMNS, *PROMPT_COLUMNS):  # which one would be meant?
        if names.count(col) > 1:
            raise DumpError(f"{path}: {names.count(col)} columns are named {col!r}")
    t = schema.field("logits").type
    if pa.types.is_fixed_size_list(t):
        vocab = t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        vocab = None
    else:
        raise DumpError(f"{path}: 'logits' column is {t}, expected a (fixed-size) list of float32/float16")
    vt = t.value_type
    storage = {pa.float32(): np.dtype("<f4"), pa.float16(): np.dtype("<f2"),
               pa.uint16(): np.dtype("<u2")}.get(vt)
    if storage is None:
        raise DumpError(f"{path}: unsupported logits dtype {vt} (expected float32, float16 or bfloat16 as uint16)")
    meta = schema.metadata or {}
    declared = dtype if dtype is not None else (meta[DTYPE_KEY].decode() if DTYPE_KEY in meta else None)
    logical = logical_dtype(path, storage, declared)
    if vocab is not None and vocab <= 0:
        raise DumpError(f"{path}: 'logits' lists have size {vocab}")
    label = next((c for c in LABEL_COLUMNS if c in names), None)
    prompt = next((c for c in PROMPT_COLUMNS if c in names), None)
    for col in (label, prompt):
        if col is not None and not pa.types.is_integer(schema.field(col).type):
            raise DumpError(f"{path}: column {col!r} must be integer, got {schema.field(col).type}")
    return {"vocab": vocab, "dtype": logical, "label": label, "prompt": prompt,
            "logits_type": str(t)}


def _block(path: str, arr, vocab: int, dtype: str, row0: int) -> np.ndarray:
    """A logits list array (one batch) as a [rows, vocab] numpy array, zero-copy if possible."""
    pa = _pa()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DumpError(f"{path}: logits row {row0 + i} is null")
    if not pa.types.is_fixed_size_list(arr.type):
        offs = arr.offsets.to_numpy()
        lens = np.diff(offs)
        bad = np.flatnonzero(lens != vocab)
        if bad.size:
            i = int(bad[0])
            raise DumpError(f"{path}: logits row {row0 + i} has {int(lens[i])} values, expected {vocab}")
    values = arr.flatten()
    if values.null_count:
        raise DumpError(f"{path}: null logit values in rows {row0}..{row0 + len(arr) - 1}")
    out = values.to_numpy(zero_copy_only=False)
    if out.size != len(arr) * vocab:
        raise DumpError(f"{path}: logits rows {row0}..{row0 + len(arr) - 1} hold {out.size} values, "
                        f"expected {len(arr)} x {vocab}")
    return out.view(STORAGE[dtype]).reshape(len(arr), vocab)


def _ids(path: str, column, n: int, name: str) -> np.ndarray:
    if column.null_count:
        raise DumpError(f"{path}: column {name!r} has {column.null_count} nulls")
    # a copy: a view would keep reading the memory map (and fault if the file is cut short)
    return check_ids(path, np.array(column.to_numpy(), copy=True), n, name)


@contextlib.contextmanager
def _arrow_errors(path: str, what: str):
    """pyarrow's own exceptions (any kind: a damaged file raises NotImplemented and Type
    errors too) as a DumpError naming the file."""
    pa = _pa()
    try:
        yield
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise DumpError(f"{path}: {what} ({_first_line(e)})") from None


class ArrowSource(LogitSource):
    """An Arrow IPC file (random-access 'file' format), memory-mapped."""

    def __init__(self, path: str, *, dtype: str | None = None):
        with _arrow_errors(path, "unreadable Arrow IPC file"):
            self._open(path, dtype)

    def _open(self, path: str, dtype: str | None) -> None:
        pa = _pa()
        size = file_size(path)
        try:
            self._mm = pa.memory_map(path, "r")
            self._mm.seek(0)
            base = self._mm.read_buffer(1).address  # the map's first byte (zero-copy)
            self._reader = pa.ipc.open_file(self._mm)
        except (pa.ArrowException, OSError) as e:
            raise DumpError(f"{path}: unreadable Arrow IPC file ({_first_line(e)})") from None
        info = _inspect_schema(path, self._reader.schema, dtype)
        counts, labels, prompts, spans = [], [], [], []
        vocab = info["vocab"]
        row0 = 0
        for i in range(self._reader.num_record_batches):
            try:
                batch = self._reader.get_batch(i)
                # The IPC reader checks buffer bounds only; a damaged length or list size
                # would otherwise give views past the data.
                batch.validate(full=True)
            except (pa.ArrowException, OSError) as e:
                raise DumpError(f"{path}: record batch {i} unreadable ({_first_line(e)})") from None
            col = batch.column("logits")
            if vocab is None and len(col):
                vocab = len(col[0].values) if col[0].is_valid else 0
            span = None
            if len(col):
                block = _block(path, col, vocab, info["dtype"], row0)  # validates nulls and lengths
                span = _file_position(block, base, size)
                del block
            spans.append(span)
            counts.append(batch.num_rows)
            if info["label"]:
                labels.append(batch.column(info["label"]))
            if info["prompt"]:
                prompts.append(batch.column(info["prompt"]))
            row0 += batch.num_rows
        n = row0
        if n == 0 or not vocab:
            raise DumpError(f"{path}: holds no logits ({n} rows)")
        lab = _ids(path, pa.chunked_array(labels, type=self._reader.schema.field(info["label"]).type), n, info["label"]) if info["label"] else None
        pro = _ids(path, pa.chunked_array(prompts, type=self._reader.schema.field(info["prompt"]).type), n, info["prompt"]) if info["prompt"] else None
        super().__init__(
            path=path, format="arrow", n_tokens=n, vocab=vocab, dtype=info["dtype"],
            labels=lab, prompt_ids=pro,
            header={"record_batches": len(counts), "logits_type": info["logits_type"],
                    "label_column": info["label"], "prompt_column": info["prompt"],
                    "schema_metadata": _meta(self._reader.schema)},
        )
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # file position of each batch's logits rows, None where a batch's buffers are not in
        # the file as stored (compressed): those are decoded, the others read with pread
        self._spans = spans
        self._file = FileRows(path)
        self._map: np.ndarray | None = None  # the whole file, mapped at the first read_into
        self._guard: int | None = None
        self._cache: tuple[int, np.ndarray] | None = None

    def _batch_block(self, i: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != i:
            col = self._reader.get_batch(i).column("logits")
            self._cache = (i, _block(self.path, col, self.vocab, self.dtype, int(self._starts[i])))
        return self._cache[1]

    def read(self, start: int, stop: int) -> Logits:
        """Rows [start, stop) as a copy (pread where the batch is stored uncompressed)."""
        return self._assemble(start, stop, None, mapped=False)

    def read_into(self, start: int, stop: int, out: np.ndarray | None) -> Logits:
        """A view of the map when the rows lie in one uncompressed batch, else assembled in
        `out` (stream.py's path; see MappedSource.read_into)."""
        start, stop = self._check_range(start, stop)
        i = self._batch_of(start)
        if self._spans[i] is not None and stop <= self._starts[i + 1]:
            return Logits(self._view(i, start, stop), self.dtype, self.vocab)
        return self._assemble(start, stop, out, mapped=True)

    def _batch_of(self, row: int) -> int:
        if self._reader is None:
            raise DumpError(f"{self.path}: source is closed")
        return int(np.searchsorted(self._starts, row, side="right") - 1)

    def _view(self, i: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of batch i as a populated, guarded view of the whole-file map."""
        self._file.check_size()
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            self._guard = guard_map(self.path, self._map._mmap)
        row_bytes = self.vocab * STORAGE[self.dtype].itemsize
        begin = self._spans[i] + (start - int(self._starts[i])) * row_bytes
        view = self._map[begin : begin + (stop - start) * row_bytes].view(STORAGE[self.dtype])
        view = view.reshape(stop - start, self.vocab)
        populate(self.path, view)
        return view

    def _assemble(self, start: int, stop: int, out, mapped: bool) -> Logits:
        start, stop = self._check_range(start, stop)
        i = self._batch_of(start)
        storage = STORAGE[self.dtype]
        block = row_buffer(out, stop - start, (self.vocab,), storage)
        row = start
        while row < stop:
            b0, b1 = int(self._starts[i]), int(self._starts[i + 1])
            take = min(stop, b1)
            if take > row:
                target = block[row - start : take - start]
                if self._spans[i] is None:
                    target[...] = self._batch_block(i)[row - b0 : take - b0]
                elif mapped:
                    part = self._view(i, row, take)
                    target[...] = part
                    release(part)
                else:
                    self._file.read_at(self._spans[i] + (row - b0) * self.vocab * storage.itemsize, target)
            row = take
            i += 1
        return Logits(block, self.dtype, self.vocab)

    def close(self) -> None:
        # Arrays already handed out keep their buffers (and the mapping) alive.
        self._reader = None
        self._cache = None
        unguard_map(getattr(self, "_guard", None))
        self._guard = None
        self._map = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
        if getattr(self, "_mm", None) is not None:
            self._mm.close()
            self._mm = None


def _file_position(block: np.ndarray, base: int, size: int) -> int | None:
    """The file offset of a zero-copy view of a memory-mapped file (None for a copy)."""
    addr = block.ctypes.data
    if block.flags.c_contiguous and base <= addr and addr + block.nbytes <= base + size:
        return addr - base
    return None


class ParquetSource(LogitSource):
    """A Parquet file, decoded batch by batch (see the module docstring)."""

    def __init__(self, path: str, *, dtype: str | None = None):
        with _arrow_errors(path, "unreadable Parquet file"):
            self._open(path, dtype)

    def _open(self, path: str, dtype: str | None) -> None:
        pa = _pa()
        import pyarrow.parquet as pq

        file_size(path)
        try:
            # metadata and id columns; the logits are read by _logits_reader
            self._pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        except (pa.ArrowException, OSError) as e:
            raise DumpError(f"{path}: unreadable Parquet file ({_first_line(e)})") from None
        schema = self._pf.schema_arrow
        info = _inspect_schema(path, schema, dtype)
        md = self._pf.metadata
        n = md.num_rows
        counts = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        if n <= 0:
            raise DumpError(f"{path}: holds no logits (0 rows)")
        if sum(counts) != n:
            raise DumpError(f"{path}: metadata says {n} rows, its row groups hold {sum(counts)}")
        # the footer's chunks and their page headers, checked before pyarrow reads a page
        groups = parquet_layout.check_columns(path, md, {"logits", info["label"], info["prompt"],
                                                         ROW_HEADER_COLUMN})
        vocab = info["vocab"]
        try:
            if vocab is None:  # a plain list column: the first row sets the vocabulary
                first = next(self._pf.iter_batches(batch_size=1, columns=["logits"]), None)
                if first is None or first.num_rows == 0:
                    raise DumpError(f"{path}: no rows to read, though the metadata says {n}")
                vocab = len(first.column(0)[0].values) if first.column(0)[0].is_valid else 0
                if not vocab:
                    raise DumpError(f"{path}: logits row 0 is null or empty")
            stored = sum(c.num_values for chunks in groups for c in chunks if c.column.split(".")[0] == "logits")
            if stored < (n - 1) * vocab:
                # each row holds vocab values, a null row one (refused when decoded, as is a
                # short row): refused here before a read allocates rows x vocab on that word
                raise DumpError(f"{path}: the logits column stores {stored} values, too few for {n} "
                                f"rows of {vocab} (a damaged list size or row count)")
            lab = self._read_ids(path, info["label"], n) if info["label"] else None
            pro = self._read_ids(path, info["prompt"], n) if info["prompt"] else None
        except (pa.ArrowException, OSError) as e:
            raise DumpError(f"{path}: unreadable Parquet data ({_first_line(e)})") from None
        super().__init__(
            path=path, format="parquet", n_tokens=n, vocab=vocab, dtype=info["dtype"],
            labels=lab, prompt_ids=pro,
            header={"row_groups": md.num_row_groups, "logits_type": info["logits_type"],
                    "label_column": info["label"], "prompt_column": info["prompt"],
                    "created_by": md.created_by, "schema_metadata": _meta(schema)},
        )
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._iter = None
        self._reader = None
        self._logits_leaves = _leaves(md, "logits")
        self._pos = -1  # absolute row of the next row self._buf/_iter will yield
        self._buf: np.ndarray | None = None

    def _read_ids(self, path: str, col: str, n: int) -> np.ndarray:
        return _ids(path, self._pf.read(columns=[col]).column(0), n, col)

    def _seek(self, start: int, rows: int) -> None:
        g = int(np.searchsorted(self._starts, start, side="right") - 1)
        batch = max(1, min(rows, TARGET_BATCH_BYTES // max(1, self.bytes_per_token)))
        pa = _pa()
        try:
            if self._reader is None:
                self._reader = _logits_reader(self.path, self._pf.metadata)
            self._iter = self._reader.iter_batches(batch, list(range(g, len(self._starts) - 1)),
                                                   self._logits_leaves, use_threads=False)
        except (pa.ArrowException, OSError) as e:
            raise DumpError(f"{self.path}: unreadable Parquet file ({_first_line(e)})") from None
        self._pos = int(self._starts[g])
        self._buf = None
        while self._pos < start:  # skip inside the row group, one batch at a time
            block = self._next_block()
            skip = min(start - self._pos, block.shape[0])
            self._buf = block[skip:]
            self._pos += skip
            if self._buf.shape[0]:
                break

    def _next_block(self) -> np.ndarray:
        pa = _pa()
        try:
            batch = next(self._iter)
        except StopIteration:
            raise DumpError(f"{self.path}: data ended at row {self._pos}, metadata says {self.n_tokens}") from None
        except (pa.ArrowException, OSError) as e:
            raise DumpError(f"{self.path}: unreadable Parquet data near row {self._pos} ({_first_line(e)})") from None
        return _block(self.path, batch.column(0), self.vocab, self.dtype, self._pos)

    def read(self, start: int, stop: int) -> Logits:
        return self.read_into(start, stop, None)

    def read_into(self, start: int, stop: int, out: np.ndarray | None) -> Logits:
        start, stop = self._check_range(start, stop)
        if self._pf is None:
            raise DumpError(f"{self.path}: source is closed")
        block = row_buffer(out, stop - start, (self.vocab,), STORAGE[self.dtype])
        if start == stop:
            return Logits(block, self.dtype, self.vocab)
        if self._iter is None or start != self._pos:
            self._seek(start, stop - start)
        row = 0
        while row < block.shape[0]:
            if self._buf is None or self._buf.shape[0] == 0:
                self._buf = self._next_block()
            take = min(block.shape[0] - row, self._buf.shape[0])
            block[row : row + take] = self._buf[:take]
            self._buf = self._buf[take:]
            self._pos += take
            row += take
        if self._pos == self.n_tokens:  # read to the end (a finished shard): free the reader
            self._close_reader()
            self._pos = -1
        return Logits(block, self.dtype, self.vocab)

    def _close_reader(self) -> None:
        self._iter = self._buf = None
        if getattr(self, "_reader", None) is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        self._close_reader()
        if getattr(self, "_pf", None) is not None:
            self._pf.close()
            self._pf = None


def _logits_reader(path: str, metadata):
    """A Parquet reader for the logits batches, allocating from the system allocator:
    pyarrow's default pool (mimalloc) keeps the pages of freed batches (compare on 2 x 224
    MB fp16 peaked at 381 MiB with it, 365 MiB without). pre_buffer=False: with it, each
    seek (iter_batches) fetches and caches every row group from there to the end of the
    file, the whole file in memory. metadata: the file's footer, already read (not parsed
    again)."""
    pa = _pa()
    import pyarrow.parquet as pq

    reader = pq.ParquetReader(memory_pool=pa.system_memory_pool())
    reader.open(path, metadata=metadata, buffer_size=1 << 20, pre_buffer=False)
    return reader


def _leaves(md, column: str) -> list[int]:
    return [i for i in range(md.num_columns) if md.schema.column(i).path.split(".")[0] == column]


def _meta(schema) -> dict:
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (schema.metadata or {}).items()
            if not k.startswith(b"ARROW:")}


class _TableWriter:
    """Shared by the IPC and Parquet writers: batches of (logits, label, prompt_id)."""

    def __init__(self, path: str, files: AtomicFiles, *, n_tokens: int, vocab: int, dtype: str,
                 labels: np.ndarray | None, prompt_ids: np.ndarray | None,
                 metadata: dict | None = None, row_headers: bool = False):
        pa = _pa()
        self._row_headers = row_headers
        self.path, self.vocab, self.dtype = path, vocab, dtype
        self._expected, self._written = n_tokens, 0
        self._labels, self._prompts = labels, prompt_ids
        value_type = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}[dtype]
        # non-nullable values: Parquet then stores no definition level per logit, and
        # decoding a list of 128k float16 costs a third less (benchmarks/RESULTS.md)
        item = pa.field("item", value_type, nullable=False)
        fields = [pa.field("logits", pa.list_(item, vocab), nullable=False)]
        if labels is not None:
            fields.append(pa.field("label", pa.int64(), nullable=False))
        if prompt_ids is not None:
            fields.append(pa.field("prompt_id", pa.int64(), nullable=False))
        if row_headers:  # (scale, min_log_prob) of the llama.cpp row each row was decoded from
            fields.append(pa.field(ROW_HEADER_COLUMN, pa.list_(pa.float32(), 2), nullable=False))
        meta = {DTYPE_KEY: dtype.encode(), **{k.encode(): str(v).encode() for k, v in (metadata or {}).items()}}
        self.schema = pa.schema(fields, metadata=meta)
        self._tmp = files.new(path)
        self._open(self._tmp)

    def _batch(self, block: np.ndarray, row_header: np.ndarray | None = None):
        pa = _pa()
        r0, r1 = self._written, self._written + block.shape[0]
        flat = np.ascontiguousarray(block, dtype=STORAGE[self.dtype]).reshape(-1)
        cols = [pa.FixedSizeListArray.from_arrays(pa.array(flat), type=self.schema.field("logits").type)]
        if self._labels is not None:
            cols.append(pa.array(self._labels[r0:r1], type=pa.int64()))
        if self._prompts is not None:
            cols.append(pa.array(self._prompts[r0:r1], type=pa.int64()))
        if self._row_headers:
            flat_header = pa.array(np.ascontiguousarray(row_header, dtype="<f4").reshape(-1))
            cols.append(pa.FixedSizeListArray.from_arrays(flat_header, 2))
        self._written = r1
        return pa.RecordBatch.from_arrays(cols, schema=self.schema)

    def finish(self) -> None:
        self._close_writer()
        if self._written != self._expected:
            raise DumpError(f"{self.path}: wrote {self._written} rows, expected {self._expected}")

    def after_commit(self) -> None:
        pass


class ArrowWriter(_TableWriter):
    """Arrow IPC file format, one record batch per write()."""

    def _open(self, tmp: str) -> None:
        pa = _pa()
        self._sink = pa.OSFile(tmp, "wb")
        self._w = pa.ipc.new_file(self._sink, self.schema)

    def write(self, block: np.ndarray, row_header: np.ndarray | None = None) -> None:
        self._w.write_batch(self._batch(block, row_header))

    def _close_writer(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None
        self._sink.close()

    def close(self) -> None:
        if not self._sink.closed:
            self._sink.close()


class ParquetWriter(_TableWriter):
    """Parquet, one row group per write() (convert sizes writes to ~64 MB)."""

    def _open(self, tmp: str) -> None:
        import pyarrow.parquet as pq

        # Dictionary encoding and statistics are useless on logits and cost time.
        self._w = pq.ParquetWriter(tmp, self.schema, use_dictionary=False, write_statistics=False)

    def write(self, block: np.ndarray, row_header: np.ndarray | None = None) -> None:
        self._w.write_batch(self._batch(block, row_header), row_group_size=block.shape[0])

    def _close_writer(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def close(self) -> None:
        self._close_writer()
