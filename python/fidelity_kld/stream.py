"""Stream one reference dump against several quantized dumps in bounded memory.

Data path: LogitSource.read (a view of a memory map where the format allows) -> the compiled
core, chunk by chunk; each reference chunk is read once and compared with every model. A
background thread maps in the next chunk (MADV_POPULATE_READ, or touching one byte per page)
while the core works on the current one, and pages already used are dropped from the process
(MADV_DONTNEED; they stay in the page cache) so resident memory does not grow with file size.
"""

from __future__ import annotations

import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .io.base import DumpError, LogitSource
from .ops import Logits, TokenStats, compare, compare_many

DEFAULT_CHUNK_BYTES = 128 << 20
_MADV_POPULATE_READ = 22  # Linux >= 5.14; not yet named in Python's mmap module
_PAGE = mmap.PAGESIZE


def _backing_mmap(arr: np.ndarray) -> mmap.mmap | None:
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def _madvise(arr: np.ndarray, advice: int) -> bool:
    """madvise the pages under a contiguous view of a memory map; False if not applicable."""
    mm = _backing_mmap(arr)
    if mm is None or arr.size == 0 or not arr.flags.c_contiguous:
        return False
    try:
        start = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError, BufferError):
        return False
    offset = arr.ctypes.data - start
    begin = offset - offset % _PAGE
    end = offset + arr.nbytes
    if advice == mmap.MADV_DONTNEED:  # only whole pages inside the view
        begin = offset + (-offset) % _PAGE
        end -= end % _PAGE
    if end <= begin:
        return True
    try:
        mm.madvise(advice, begin, end - begin)
        return True
    except (OSError, ValueError):
        return False


def _populate(lg: Logits) -> Logits:
    data = lg.data
    if not _madvise(data, _MADV_POPULATE_READ) and _backing_mmap(data) is not None:
        flat = data.reshape(-1).view(np.uint8) if data.flags.c_contiguous else None
        if flat is not None:
            int(flat[::_PAGE].max(initial=0))  # touch one byte per page
    return lg


def _release(lg: Logits) -> None:
    _madvise(lg.data, mmap.MADV_DONTNEED)


@dataclass
class Progress:
    """What a progress callback receives after each chunk."""

    tokens_done: int
    tokens_total: int
    bytes_read: int
    seconds: float


def compare_sources(
    ref: LogitSource,
    quants: Sequence[LogitSource],
    *,
    labels: np.ndarray | None = None,
    threads: int | None = None,
    llama_parity: bool | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[Progress], None] | None = None,
    compare_fn: Callable[..., TokenStats] = compare,
    compare_many_fn: Callable[..., list[TokenStats]] | None = None,
) -> list[TokenStats]:
    """Per-token statistics of every quantized source against the reference.

    labels: token ids per row; default: the reference's, else the first model's.
    llama_parity: apply llama.cpp's definitions (default: when the reference is a llama.cpp
    file). compare_fn compares one model's chunk; compare_many_fn, when given, all models' at
    once (the default compare_fn comes with ops.compare_many). Returns one TokenStats per
    model, in order.
    """
    if compare_many_fn is None and compare_fn is compare:
        compare_many_fn = compare_many
    if llama_parity is None:
        llama_parity = ref.dtype == "llama_u16"
    if labels is None:
        labels = ref.labels if ref.labels is not None else next(
            (q.labels for q in quants if q.labels is not None), None)
    if ref.n_tokens == 0:
        raise DumpError(f"{ref.path}: the dump holds no tokens")
    row_bytes = ref.bytes_per_token + sum(q.bytes_per_token for q in quants)
    rows = max(1, chunk_bytes // max(row_bytes, 1))
    n = ref.n_tokens
    parts: list[list[TokenStats]] = [[] for _ in quants]
    t0 = time.perf_counter()
    bytes_read = 0

    def fetch(start: int, done: list[Logits]) -> list[Logits]:
        for lg in done:  # dropping used pages costs about as much as mapping new ones
            _release(lg)
        stop = min(start + rows, n)
        return [_populate(src.read(start, stop)) for src in (ref, *quants)]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fidelity-kld-read") as pool:
        pending = pool.submit(fetch, 0, [])
        previous: list[Logits] = []  # the chunk compared last: its pages can go now
        for start in range(0, n, rows):
            chunk = pending.result()
            stop = min(start + rows, n)
            # Not `chunk`: the core has yet to read it, and would fault its pages back in.
            pending = pool.submit(fetch, stop, previous) if stop < n else None
            ref_chunk, q_chunks = chunk[0], chunk[1:]
            y = None if labels is None else labels[start:stop]
            if compare_many_fn is not None and len(q_chunks) > 1:  # the reference read once
                results = compare_many_fn(ref_chunk, q_chunks, y, threads=threads,
                                          llama_parity=llama_parity)
            else:
                results = [compare_fn(ref_chunk, q_chunk, y, threads=threads,
                                      llama_parity=llama_parity) for q_chunk in q_chunks]
            for i, st in enumerate(results):
                parts[i].append(st)
            bytes_read += sum(lg.data.nbytes for lg in chunk)
            if pending is None:
                for lg in (*previous, *chunk):
                    _release(lg)
            previous = chunk
            del chunk, ref_chunk, q_chunks
            if progress is not None:
                progress(Progress(stop, n, bytes_read, time.perf_counter() - t0))
    return [TokenStats.concat(p) for p in parts]


