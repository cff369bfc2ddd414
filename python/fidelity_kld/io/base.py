"""The reader interface every logit-dump format implements.

A LogitSource is opened once, validated eagerly (so a corrupt file fails before any work
starts, with an error naming the file), then streamed in row chunks that feed the compiled
core directly (zero-copy views of a memory map where the format allows).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..ops import Logits


class DumpError(ValueError):
    """A logit dump is malformed or does not match its partner. The message names the file."""


@dataclass
class LogitSource:
    """One logit dump (or a set of shards read in order).

    n_tokens, vocab: the matrix shape; dtype: 'float32' | 'float16' | 'bfloat16' | 'llama_u16';
    labels / prompt_ids: [n_tokens] int64 or None (small; read eagerly);
    header: format-specific fields for `fidelity-kld info`.
    """

    path: str
    format: str
    n_tokens: int
    vocab: int
    dtype: str
    labels: np.ndarray | None = None
    prompt_ids: np.ndarray | None = None
    header: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A label outside the vocabulary would otherwise surface mid-run from the core,
        # without the file's name.
        if self.labels is not None and self.labels.size:
            bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.vocab))
            if bad.size:
                i = int(bad[0])
                raise DumpError(f"{self.path}: label {int(self.labels[i])} at token {i} is outside "
                                f"the vocabulary [0, {self.vocab}) ({bad.size} such labels)")

    @property
    def bytes_per_token(self) -> int:
        return self.vocab * {"float64": 8, "float32": 4}.get(self.dtype, 2)

    def read(self, start: int, stop: int) -> Logits:
        """Rows [start, stop) as Logits (a view where possible)."""
        raise NotImplementedError

    def files(self) -> list[str]:
        """Every file this source reads (for sizes on disk); shards and sidecars included."""
        return [self.path]

    def piece_end(self, row: int) -> int:
        """The end of the stored piece holding `row`: the next shard boundary of a directory,
        n_tokens for one file. Reads that stay inside a piece need no assembling."""
        return self.n_tokens

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"{self.path}: rows [{start}, {stop}) outside [0, {self.n_tokens})")
        return start, stop

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, format={self.format!r}, "
                f"n_tokens={self.n_tokens}, vocab={self.vocab}, dtype={self.dtype!r}, "
                f"labels={self.labels is not None}, prompt_ids={self.prompt_ids is not None})")

    def read_into(self, start: int, stop: int, out: np.ndarray | None) -> Logits:
        """Rows [start, stop), stored into the byte buffer `out` where the reader can
        (stream.py passes buffers it reuses, so memory stays bounded); readers that
        cannot return read()'s result, which the caller must then not expect in out."""
        return self.read(start, stop)

    def chunks(self, rows_per_chunk: int) -> Iterator[tuple[int, Logits]]:
        for start in range(0, self.n_tokens, rows_per_chunk):
            stop = min(start + rows_per_chunk, self.n_tokens)
            yield start, self.read(start, stop)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FileRows:
    """A file read with pread into a caller's buffer: the process never maps it, so the
    pages read do not stay resident, and a file cut short while it is read is a DumpError
    naming it, not a SIGBUS. Rows of `row_bytes` start at byte `offset` (readers whose rows
    lie in several runs pass their own byte positions to read_at)."""

    def __init__(self, path: str, offset: int = 0, row_bytes: int = 0):
        self.path, self.offset, self.row_bytes = path, int(offset), int(row_bytes)
        self._fd: int | None = None
        self._size: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise DumpError(f"{self.path}: cannot read ({e.strerror})") from None
            self._size = os.fstat(self._fd).st_size
            with contextlib.suppress(AttributeError, OSError):  # read-ahead for a stream
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self._fd

    def read_rows(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) into the contiguous array `out` ((stop - start) rows)."""
        self.read_at(self.offset + start * self.row_bytes, out)

    def read_at(self, begin: int, out: np.ndarray) -> None:
        """out.nbytes bytes from byte `begin` into the contiguous array `out`."""
        fd = self.check_size()
        view = memoryview(out.reshape(-1).view(np.uint8))
        need = view.nbytes
        done = 0
        while done < need:  # one preadv moves at most ~2 GB on Linux
            try:
                got = os.preadv(fd, [view[done:]], begin + done)
            except OSError as e:
                raise DumpError(f"{self.path}: read failed at byte {begin + done} ({e.strerror})") from None
            if got == 0:
                self._changed(f"it ends at byte {begin + done}; {begin + need} bytes were expected")
            done += got

    def check_size(self) -> int:
        """DumpError if the file's size changed since it was first read; its descriptor."""
        fd = self._open()
        size = os.fstat(fd).st_size
        if size != self._size:
            self._changed(f"it is now {size} bytes, was {self._size}")
        return fd

    def _changed(self, what: str) -> None:
        raise DumpError(f"{self.path}: the file changed while it was read ({what})")

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def row_buffer(out: np.ndarray | None, n_rows: int, row_shape: tuple, dtype) -> np.ndarray:
    """[n_rows, *row_shape] of dtype on the front of the byte buffer `out` (a fresh array
    when out is None)."""
    dtype = np.dtype(dtype)
    if out is None:
        return np.empty((n_rows, *row_shape), dtype)
    nbytes = n_rows * int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    if out.nbytes < nbytes:
        raise ValueError(f"buffer of {out.nbytes} bytes too small for {nbytes}")
    return out.reshape(-1).view(np.uint8)[:nbytes].view(dtype).reshape(n_rows, *row_shape)


_MADV_POPULATE_READ = 22  # Linux >= 5.14; not yet named in Python's mmap module
_PAGE = mmap.PAGESIZE


def backing_mmap(arr: np.ndarray) -> mmap.mmap | None:
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def _map_address(mm: mmap.mmap) -> int:
    return np.frombuffer(mm, dtype=np.uint8).ctypes.data


def _page_range(arr: np.ndarray, inner: bool) -> tuple[mmap.mmap, int, int] | None:
    """(map, offset, length) of the pages under a contiguous view of a map: every page it
    touches, or (inner) only the whole pages inside it."""
    mm = backing_mmap(arr)
    if mm is None or arr.size == 0 or not arr.flags.c_contiguous:
        return None
    offset = arr.ctypes.data - _map_address(mm)
    begin, end = offset - offset % _PAGE, offset + arr.nbytes
    if inner:
        begin, end = offset + (-offset) % _PAGE, end - end % _PAGE
    return (mm, begin, end - begin) if end > begin else None


def release(arr: np.ndarray) -> None:
    """Drop a used view's pages from the process (MADV_DONTNEED; they stay in the page
    cache), so resident memory does not grow with the file. A no-op for other arrays."""
    r = _page_range(arr, inner=True)
    if r is not None:
        with contextlib.suppress(OSError, ValueError):
            r[0].madvise(mmap.MADV_DONTNEED, r[1], r[2])


def populate(path: str, arr: np.ndarray) -> None:
    """Map a view's pages in now (MADV_POPULATE_READ), off the thread that computes. A page
    past the file's end (the file was cut short) is a DumpError here instead of a SIGBUS
    later; where the kernel lacks the advice, one byte per page is touched."""
    r = _page_range(arr, inner=False)
    if r is None:
        return
    try:
        r[0].madvise(_MADV_POPULATE_READ, r[1], r[2])
    except OSError as e:
        if e.errno in (errno.EFAULT, errno.EIO, errno.ENOMEM):
            raise DumpError(f"{path}: the file changed while it was read (cut short: a page "
                            "of it is gone)") from None
        flat = arr.reshape(-1).view(np.uint8)
        int(flat[::_PAGE].max(initial=0))  # a fault here is the guard's (guard_map)


def guard_map(path: str, mm: mmap.mmap) -> int:
    """Have the compiled core's SIGBUS handler turn a fault in this map (its file cut short
    after its pages were mapped in) into a one-line error naming the file and exit 1; the
    slot for unguard_map."""
    from .. import _core

    return _core.sigbus_guard(_map_address(mm), len(mm), f"Error: {path}: the file changed while "
                              "it was read (it was cut short)\n")


def unguard_map(slot: int | None) -> None:
    if slot is not None and slot >= 0:
        from .. import _core

        _core.sigbus_unguard(slot)


class MappedSource(LogitSource):
    """A source whose rows are one [n_tokens, row] array at a fixed offset of its file, set
    by the subclass's __init__ as self._data (an np.memmap). read_into (the stream's path)
    returns views of the map, its pages mapped in ahead (populate) and guarded against the
    file being cut short (guard_map); read() returns copies read with pread (FileRows), which
    outlive the source and cannot fault."""

    _data: np.ndarray | None = None
    _rows: FileRows | None = None
    _guard: int | None = None

    def _file_rows(self) -> FileRows:
        if self._data is None:
            raise DumpError(f"{self.path}: source is closed")
        if self._rows is None:
            d = self._data
            self._rows = FileRows(self.path, d.offset, d.strides[0])
        return self._rows

    def read(self, start: int, stop: int) -> Logits:
        start, stop = self._check_range(start, stop)
        rows = self._file_rows()
        block = np.empty((stop - start, *self._data.shape[1:]), self._data.dtype)
        rows.read_rows(start, stop, block)
        return Logits(block, self.dtype, self.vocab)

    def read_into(self, start: int, stop: int, out: np.ndarray | None) -> Logits:
        start, stop = self._check_range(start, stop)
        self._file_rows().check_size()
        if self._guard is None:
            self._guard = guard_map(self.path, self._data._mmap)
        view = self._data[start:stop]
        populate(self.path, view)
        return Logits(view, self.dtype, self.vocab)

    def close(self) -> None:
        unguard_map(self._guard)
        self._guard = None
        self._data = None
        if self._rows is not None:
            self._rows.close()
            self._rows = None
