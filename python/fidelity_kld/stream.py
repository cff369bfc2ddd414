"""Stream one reference dump against several quantized dumps in bounded memory.

Data path: LogitSource.read_into (a view of a memory map where the format allows, else rows
decoded or assembled into one of two reused buffers per source) -> the compiled core, chunk
by chunk; each reference chunk is read once and compared with every model. A background
thread maps in the next chunk (io.base.populate) while the core works on the current one,
and pages already used are dropped from the process (io.base.release: MADV_DONTNEED; they
stay in the page cache), so resident memory does not grow with file size. A file cut short
mid-run is an error naming it: from populate, or from the core's SIGBUS guard (exit 1).
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np

from .io.base import DumpError, LogitSource, release
from .ops import Logits, TokenStats, compare, compare_many

DEFAULT_CHUNK_BYTES = 128 << 20
# Formats whose reads decode (CPU work in pyarrow, which releases the GIL) rather than map
DECODED_FORMATS = frozenset({"parquet"})


class _Buffers:
    """Two byte buffers per source, used in turn: the chunk the core compares sits in one
    while the reading thread fills the other, so memory is two chunks whatever the input
    size. Only readers that decode (Parquet) or assemble a chunk (one spanning record
    batches) write them; pages never written cost nothing."""

    def __init__(self, sources: Sequence[LogitSource], rows: int):
        self._sets = [[np.empty(rows * src.bytes_per_token, np.uint8) for src in sources]
                      for _ in range(2)]
        self._next = 0

    def take(self) -> list[np.ndarray]:
        bufs = self._sets[self._next]
        self._next ^= 1
        return bufs


@contextlib.contextmanager
def _decoders(sources: Sequence[LogitSource]):
    """A thread per source when more than one decodes (two Parquet dumps decode at once, up
    to 2x on two idle cores), else None: mapped sources read in the reading thread."""
    if sum(src.format in DECODED_FORMATS for src in sources) < 2:
        yield None
        return
    with ThreadPoolExecutor(max_workers=len(sources), thread_name_prefix="fidelity-kld-decode") as pool:
        yield pool


def chunk_bounds(sources: Sequence[LogitSource], rows: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk: `rows` rows, cut short where a source's stored piece ends
    (LogitSource.piece_end: a shard boundary), so that a chunk of mapped shards is a view of
    one shard's map whose pages the stream drops after use, never a copy assembled in a
    buffer (written buffers stay resident: two chunks' more memory)."""
    n = sources[0].n_tokens
    bounds, start = [], 0
    while start < n:
        ends = (src.piece_end(start) for src in sources)
        stop = min([start + rows, n, *(e for e in ends if e > start)])
        bounds.append((start, stop))
        start = stop
    return bounds


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
    extra: Sequence[str] | str = (),
) -> list[TokenStats]:
    """Per-token statistics of every quantized source against the reference.

    labels: token ids per row; default: the reference's, else the first model's.
    llama_parity: apply llama.cpp's definitions (default: when the reference is a llama.cpp
    file). compare_fn compares one model's chunk; compare_many_fn, when given, all models' at
    once (the default compare_fn comes with ops.compare_many). extra: optional output groups
    (ops.compare's), passed on to compare_fn / compare_many_fn only when not empty, so a
    function without the parameter still serves the default outputs. Corrupt llama.cpp rows
    are not screened here (bad_rows='keep'): the caller checks each file (io.llama.check_rows,
    as the CLI does). Returns one TokenStats per model, in order.
    """
    extra_kw = {"extra": extra} if extra else {}
    if compare_fn is compare:  # llama.cpp rows: callers screen each file (io.llama.check_rows)
        compare_fn = partial(compare, bad_rows="keep")
        compare_many_fn = compare_many_fn or partial(compare_many, bad_rows="keep")
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

    sources = (ref, *quants)
    buffers = _Buffers(sources, min(rows, n))

    bounds = chunk_bounds(sources, rows)

    def fetch(k: int, done: list[Logits]) -> list[Logits]:
        for lg in done:  # dropping used pages costs about as much as mapping new ones
            release(lg.data)
        start, stop = bounds[k]
        bufs = buffers.take()
        if decoders is None:
            return [src.read_into(start, stop, buf) for src, buf in zip(sources, bufs)]
        # sources that decode (Parquet) read at once, a thread each
        futures = [decoders.submit(src.read_into, start, stop, buf) for src, buf in zip(sources, bufs)]
        return [f.result() for f in futures]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fidelity-kld-read") as pool, \
            _decoders(sources) as decoders:
        pending = pool.submit(fetch, 0, [])
        previous: list[Logits] = []  # the chunk compared last: its pages can go now
        for k, (start, stop) in enumerate(bounds):
            chunk = pending.result()
            # Not `chunk`: the core has yet to read it (and its buffers: the other set is used)
            pending = pool.submit(fetch, k + 1, previous) if stop < n else None
            ref_chunk, q_chunks = chunk[0], chunk[1:]
            y = None if labels is None else labels[start:stop]
            if compare_many_fn is not None and len(q_chunks) > 1:  # the reference read once
                results = compare_many_fn(ref_chunk, q_chunks, y, threads=threads,
                                          llama_parity=llama_parity, **extra_kw)
            else:
                results = [compare_fn(ref_chunk, q_chunk, y, threads=threads,
                                      llama_parity=llama_parity, **extra_kw)
                           for q_chunk in q_chunks]
            for i, st in enumerate(results):
                parts[i].append(st)
            bytes_read += sum(lg.data.nbytes for lg in chunk)
            if pending is None:
                for lg in (*previous, *chunk):
                    release(lg.data)
            previous = chunk
            del chunk, ref_chunk, q_chunks
            if progress is not None:
                progress(Progress(stop, n, bytes_read, time.perf_counter() - t0))
    return [TokenStats.concat(p) for p in parts]


