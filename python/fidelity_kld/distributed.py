"""Compare dumps on a Ray cluster: the token axis cut into ranges, one Ray task per range.

    from fidelity_kld import distributed
    results = distributed.compare("ref/", ["q4/", "q5/"], address="auto")  # list[TokenStats]

Every worker reads the dumps itself from storage all nodes mount (the same paths): a task
gets only the names of the files and the rows it covers, opens them, streams its rows
through stream.compare_sources (the reference read once for all models) and returns the
per-token arrays of its range. The logits never cross the object store; the driver
receives 44 + 44 x models bytes per token with labels (float64/int32 per-token arrays, the
reference's half sent once per range; 8 more per model with llama.cpp's windowed KLD) and concatenates the ranges in token order. Each
row's result does not depend on which rows share a call (tests/test_determinism.py), so
every array, and so every summary, percentile and per-prompt table computed from them, is
bitwise what one machine computes, provided every worker runs the same SIMD path (a mix
of AVX-512 and AVX2 nodes agrees to float32 rounding only: a warning says so).

Why plain Ray tasks and not Ray Data: the unit of work is the same rows of N+1 files read
in lockstep, from formats Ray Data has no reader for (llama.cpp files, shard directories);
Ray Data would move the logits themselves through the object store to align the files and
cut blocks where it likes. Tasks with max_retries give the retries, ray.wait the order-free
collection, and nothing else is needed.

Ranges: about `tasks` of equal size, cut only where a prompt starts (a prompt is never
split across tasks), and also at every shard boundary that is a prompt start (so a task
reads views of one file per dump where the layout allows). Ray is imported only here.

The other kinds of dump go the same way, one task per range, with the cuts where the
single-machine path's results do not depend on them:
- top-k dumps (compare_topk_sides): the driver reads a top-k Parquet file's metadata,
  labels and prompt ids only (io.topk.TopKIndex); each task reads its rows (the row groups
  that hold them), validates them as read_topk would, reads its rows of any full dump, and
  returns the bounds (56 bytes per token and model). With a full side, the cuts are on
  topk_compare's block grid (DENSE_ELEMENTS // V rows): a row's upper bound with a top-k
  reference against a full quant depends on the other rows of its block.
- hidden-state dumps (compare_hidden_dumps): each task loads the lm_heads itself, scores
  its rows tile by tile and returns the same per-token arrays as for logits; the cuts are
  on the tile grid, so each matrix product has the rows it has on one machine.
A float32 conversion of a llama.cpp file (io.conversion.llama_rows) is read back as its
llama.cpp rows by the workers as by the driver, so it is compared under the same definitions.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np

from .io.base import DumpError, LogitSource
from .io.shards import ShardedSource
from .ops import Logits, TokenStats
from .stream import DEFAULT_CHUNK_BYTES

DEFAULT_TASK_BYTES = 1 << 30  # per task, all dumps together: ~0.2 s of one core's work
MAX_RETRIES = 3
# Per-token arrays computed from the reference alone: the same bits for every model (the
# core computes them once per row in compare_many), so a task sends them once.
REFERENCE_FIELDS = ("labels", "lse_ref", "entropy_ref", "top1_ref", "nll_ref", "p_ref_y",
                    "logp_top1_ref", "logp_top2_ref", "rank_ref_y", "margin_ref")


class DistributedError(ValueError):
    """The run could not be done on the cluster (no Ray, no cluster, unsuitable input)."""


class RangeFailed(DistributedError):
    """A token range failed for good (the error was not retriable, or every attempt's
    worker died): the message names the range and its files. Nothing was returned."""


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one file, with what the driver read in its header (a worker
    checks it: a file that differs there is not on shared storage)."""

    path: str
    start: int
    stop: int
    n_tokens: int
    vocab: int
    dtype: str

    def describe(self) -> str:
        return f"{self.path} rows [{self.start}, {self.stop})"


@dataclass(frozen=True)
class TokenRange:
    """Tokens [start, stop) of the comparison: the pieces of the reference and of each model
    that hold them."""

    index: int
    start: int
    stop: int
    ref: tuple[Piece, ...]
    quants: tuple[tuple[Piece, ...], ...]

    def describe(self, max_models: int = 2) -> str:
        files = [p.describe() for p in self.ref]
        for pieces in self.quants[:max_models]:
            files += [p.describe() for p in pieces]
        more = len(self.quants) - max_models
        tail = f" and {more} more models' dumps" if more > 0 else ""
        return f"tokens [{self.start}, {self.stop}) ({', '.join(files)}{tail})"


@dataclass
class ClusterProgress:
    """What a progress callback receives: whole ranges done so far, bytes of dumps they read,
    and the task slots (workers) the live nodes offer."""

    tokens_done: int
    tokens_total: int
    bytes_read: int
    seconds: float
    tasks_done: int
    tasks_total: int
    workers: int
    nodes: int


class ProgressPrinter:
    """Progress on stderr: a self-overwriting line on a terminal, else a plain line every
    `interval` seconds (and a last one at the end), for logs."""

    def __init__(self, stream=None, interval: float | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = (0.2 if self.tty else 10.0) if interval is None else interval
        self.last = -math.inf

    def __call__(self, p: ClusterProgress) -> None:
        now = time.monotonic()
        finished = p.tokens_done >= p.tokens_total
        if now - self.last < self.interval and not finished:
            return
        self.last = now
        gbs = p.bytes_read / p.seconds / 1e9 if p.seconds > 0 else 0.0
        pct = 100.0 * p.tokens_done / max(p.tokens_total, 1)
        line = (f"{p.tokens_done}/{p.tokens_total} tokens ({pct:5.1f}%)  {gbs:6.2f} GB/s  "
                f"{p.tasks_done}/{p.tasks_total} tasks  {p.workers} workers on {p.nodes} nodes")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if finished else " "))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# --- planning: token ranges and the file pieces behind them (driver side, no Ray) --------

def _files(src: LogitSource) -> list[tuple[LogitSource, int]]:
    """(file-level source, its first token) for each file a source reads rows from."""
    if isinstance(src, ShardedSource):
        starts = np.concatenate([[0], np.cumsum([s.n_tokens for s in src.shards])])
        return [(s, int(a)) for s, a in zip(src.shards, starts)]
    if src.format == "array":
        raise DistributedError(f"{src.path}: in-memory arrays cannot be read by Ray workers; "
                               "write them to a file on shared storage first")
    return [(src, 0)]


def _pieces(files: list[tuple[LogitSource, int]], start: int, stop: int) -> tuple[Piece, ...]:
    out = []
    for f, first in files:
        a, b = max(start, first), min(stop, first + f.n_tokens)
        if a < b:
            # absolute: a worker's working directory is not the driver's
            out.append(Piece(os.path.abspath(f.path), a - first, b - first, f.n_tokens, f.vocab,
                             f.dtype))
    return tuple(out)


def prompt_starts(prompt_ids: np.ndarray | None, n: int) -> np.ndarray | None:
    """Token indices where a prompt begins (0 included); None without prompt ids."""
    if prompt_ids is None:
        return None
    ids = np.asarray(prompt_ids).reshape(-1)
    return np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1]).astype(np.int64)


def cut_points(n: int, tasks: int, starts: np.ndarray | None, forced: Sequence[int] = ()) -> list[int]:
    """Boundaries [0, c1, ..., n] of about `tasks` equal ranges of n tokens, each cut moved
    to the nearest prompt start (starts; any token when None), plus the forced cuts that are
    prompt starts (shard boundaries)."""
    ideal = np.linspace(0, n, max(1, tasks) + 1)[1:-1]
    if starts is None:
        cuts = set(np.rint(ideal).astype(np.int64).tolist()) | set(forced)
    else:
        i = np.clip(np.searchsorted(starts, ideal), 1, len(starts) - 1) if len(starts) > 1 else None
        cuts = set()
        if i is not None:
            lo, hi = starts[i - 1], starts[i]
            cuts = set(np.where(ideal - lo <= hi - ideal, lo, hi).tolist())
        start_set = set(starts.tolist())
        cuts |= {c for c in forced if c in start_set}
    return [0, *sorted(c for c in cuts if 0 < c < n), n]


def plan(ref: LogitSource, quants: Sequence[LogitSource], *, tasks: int,
         prompt_ids: np.ndarray | None = None) -> list[TokenRange]:
    """The token ranges of a comparison (see the module docstring)."""
    n = ref.n_tokens
    ref_files = _files(ref)
    q_files = [_files(q) for q in quants]
    forced = {first for files in (ref_files, *q_files) for _, first in files}
    bounds = cut_points(n, tasks, prompt_starts(prompt_ids, n), sorted(forced))
    return [TokenRange(k, a, b, _pieces(ref_files, a, b), tuple(_pieces(f, a, b) for f in q_files))
            for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


# --- the task (worker side) ---------------------------------------------------------------

class _Rows(LogitSource):
    """Rows [start, stop) of another source, as a source of its own."""

    def __init__(self, src: LogitSource, start: int, stop: int):
        cut = (lambda a: None if a is None else a[start:stop])
        super().__init__(path=src.path, format=src.format, n_tokens=stop - start, vocab=src.vocab,
                         dtype=src.dtype, labels=cut(src.labels), prompt_ids=cut(src.prompt_ids),
                         header=src.header)
        self._src, self._first = src, start

    @property
    def bytes_per_token(self) -> int:
        return self._src.bytes_per_token

    def read(self, start: int, stop: int) -> Logits:
        start, stop = self._check_range(start, stop)
        return self._src.read(self._first + start, self._first + stop)

    def row_window(self) -> tuple[LogitSource, int, int]:
        """(the source, first row, stop): io.llama's corrupt-row screen checks these rows of
        a llama.cpp file and names them by their rows in it."""
        return self._src, self._first, self._first + self.n_tokens

    def close(self) -> None:
        self._src.close()


def _open_piece(p: Piece) -> LogitSource:
    from .io import open_source
    from .io.conversion import llama_rows

    # The driver's dtype override only ever declares uint16 storage as bfloat16.
    src = open_source(p.path, dtype="bfloat16" if p.dtype == "bfloat16" else None)
    if p.dtype == "llama_u16" and src.dtype == "float32":
        # the driver read this float32 conversion of a llama.cpp file back as its llama.cpp
        # rows (io.conversion.llama_rows): so does the worker, for the same definitions
        src = llama_rows(src)
    seen = (src.n_tokens, src.vocab, src.dtype)
    if seen != (p.n_tokens, p.vocab, p.dtype):
        src.close()
        raise DumpError(f"{p.path}: on this worker the file holds {seen[0]} tokens x {seen[1]} "
                        f"{seen[2]}, the driver read {p.n_tokens} x {p.vocab} {p.dtype}: "
                        "is it the same file on shared storage?")
    return _Rows(src, p.start, p.stop)


def _open_range(pieces: tuple[Piece, ...]) -> LogitSource:
    parts = [_open_piece(p) for p in pieces]
    return parts[0] if len(parts) == 1 else ShardedSource(pieces[0].path, parts)


def _same_bits(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def _pack(stats: list[TokenStats]) -> dict:
    """Per-token arrays of one range: the reference's fields once where every model has
    the same bits, the rest per model."""
    first = stats[0]
    shared = {f: getattr(first, f) for f in REFERENCE_FIELDS
              if getattr(first, f) is not None and all(_same_bits(getattr(s, f), getattr(first, f))
                                                       for s in stats)}
    models = [{k: v for k, v in s.as_dict().items() if k not in shared} for s in stats]
    return {"shared": shared, "models": models}


def compare_range(rng: TokenRange, labels: np.ndarray | None, *, threads: int,
                  llama_parity: bool, chunk_bytes: int, device: str,
                  compare_fn: Callable | None = None,
                  compare_many_fn: Callable | None = None,
                  extra: Sequence[str] | str = ()) -> dict:
    """One task: open the range's pieces, compare them (stream.compare_sources), pack the
    per-token arrays. Runs on a Ray worker (or anywhere: it imports no Ray)."""
    from . import _core
    from .stream import compare_sources

    t0 = time.perf_counter()
    fns = {}
    if compare_fn is not None:
        fns["compare_fn"] = compare_fn
    if compare_many_fn is not None:
        fns["compare_many_fn"] = compare_many_fn
    if device == "cuda" and not fns:
        from .gpu import PinnedStager

        stager = PinnedStager()
        fns = {"compare_fn": stager.compare, "compare_many_fn": stager.compare_many}
    opened: list[LogitSource] = []
    try:
        opened.append(_open_range(rng.ref))
        for pieces in rng.quants:
            opened.append(_open_range(pieces))
        stats = compare_sources(opened[0], opened[1:], labels=labels, threads=threads,
                                llama_parity=llama_parity, chunk_bytes=chunk_bytes, extra=extra,
                                **fns)
    finally:
        for src in opened:
            src.close()
    out = _pack(stats)
    out.update(simd=_core.active_simd_level(), seconds=time.perf_counter() - t0, pid=os.getpid())
    return out


# --- the driver ---------------------------------------------------------------------------

def _ray():
    try:
        import ray
    except ImportError:
        raise DistributedError("running on a cluster needs Ray: pip install 'fidelity-kld[ray]'") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Connect to the cluster unless this process already is; True if we did."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"cannot connect to the Ray cluster at {address!r}: {first}") from None
    return True


def _cluster(ray, cpus_per_task: int, gpus_per_task: int) -> tuple[int, int]:
    """(task slots on live nodes, live nodes)."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if gpus_per_task:
        slots = sum(int(n["Resources"].get("GPU", 0) // gpus_per_task) for n in alive)
    else:
        slots = sum(int(n["Resources"].get("CPU", 0) // cpus_per_task) for n in alive)
    return slots, len(alive)


def _failure(ray, e: BaseException, rng: TokenRange, attempts: int) -> RangeFailed:
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    if cause is not None:
        text = str(cause).strip().splitlines()
        what = text[0] if text else type(cause).__name__
    else:
        text = str(e).strip().splitlines()
        what = (f"the task failed on each of {attempts} attempts "
                f"({type(e).__name__}: {text[0] if text else 'no message'})")
    return RangeFailed(f"{rng.describe()}: {what}")


def _unpack(results: list[dict], n_models: int) -> list[TokenStats]:
    """Concatenate the ranges' arrays in token order; a field every model shares in every
    range is concatenated once and the same array given to each model."""
    cache: dict[tuple[int, ...], np.ndarray] = {}
    out = []
    for j in range(n_models):
        cols = {}
        for f in fields(TokenStats):
            parts = [r["models"][j].get(f.name, r["shared"].get(f.name)) for r in results]
            if any(p is None for p in parts):
                cols[f.name] = None
                continue
            key = (f.name, *map(id, parts))
            if key not in cache:
                cache[key] = np.concatenate(parts)
            cols[f.name] = cache[key]
        out.append(TokenStats(**cols))
    return out


def _prepare(ref: LogitSource, quants: Sequence[LogitSource], labels, prompt_ids, llama_parity):
    """compare_sources' defaults, as stream.compare_sources takes them."""
    if ref.n_tokens == 0:
        raise DumpError(f"{ref.path}: the dump holds no tokens")
    if llama_parity is None:
        llama_parity = ref.dtype == "llama_u16"
    if labels is None:
        labels = ref.labels if ref.labels is not None else next(
            (q.labels for q in quants if q.labels is not None), None)
    if prompt_ids is None:
        prompt_ids = ref.prompt_ids if ref.prompt_ids is not None else next(
            (q.prompt_ids for q in quants if q.prompt_ids is not None), None)
    return labels, prompt_ids, bool(llama_parity)


def compare_sources(
    ref: LogitSource,
    quants: Sequence[LogitSource],
    *,
    labels: np.ndarray | None = None,
    prompt_ids: np.ndarray | None = None,
    threads: int | None = None,
    llama_parity: bool | None = None,
    tasks: int | None = None,
    device: str = "cpu",
    address: str | None = "auto",
    max_retries: int = MAX_RETRIES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[ClusterProgress], None] | None = None,
    compare_fn: Callable[..., TokenStats] | None = None,
    compare_many_fn: Callable[..., list[TokenStats]] | None = None,
    extra: Sequence[str] | str = (),
) -> list[TokenStats]:
    """stream.compare_sources on a Ray cluster: the same arguments and bitwise the same
    result, for sources opened on the driver from files every worker can read.

    prompt_ids: where prompts start, for the cuts (default: the reference's, else the first
    model's). threads: CPU cores each task reserves and the core uses (default 1).
    tasks: about how many ranges (default: 2 per task slot, at least one per GiB of dumps;
    shard boundaries can add some). device: 'cpu', or 'cuda' (one GPU per task, the
    fidelity_kld.gpu path). address: the cluster (ray.init's: 'auto', 'ray://host:10001',
    'local' to start one here); ignored if this process is connected already.
    max_retries: attempts after a worker dies mid-task (a raised error is not retried).
    compare_fn / compare_many_fn, extra: as for stream.compare_sources (sent to the workers).
    A float32 conversion of a llama.cpp file opened through io.conversion.llama_rows is
    read back as llama.cpp rows on the workers too. Raises RangeFailed (naming the range
    and its files) if a range fails for good.
    """
    gpus = _gpus(device)
    labels, prompt_ids, llama_parity = _prepare(ref, quants, labels, prompt_ids, llama_parity)
    cpus = int(threads) if threads else 1
    row_bytes = ref.bytes_per_token + sum(q.bytes_per_token for q in quants)
    for src in (ref, *quants):
        _files(src)  # in-memory sources refused before connecting

    def ranges(slots: int) -> list[TokenRange]:
        n = tasks or _default_tasks(slots, ref.n_tokens * row_bytes)
        return plan(ref, quants, tasks=n, prompt_ids=prompt_ids)

    kwargs = dict(threads=cpus, llama_parity=llama_parity, chunk_bytes=chunk_bytes,
                  device="cuda" if gpus else "cpu", compare_fn=compare_fn,
                  compare_many_fn=compare_many_fn, extra=extra)
    results = run_ranges(
        compare_range, ranges, lambda r: ((None if labels is None else labels[r.start:r.stop],), kwargs),
        n_tokens=ref.n_tokens, row_bytes=row_bytes, cpus=cpus, gpus=gpus, address=address,
        max_retries=max_retries, progress=progress)
    _check_simd(results)
    return _unpack(results, len(quants))


def _gpus(device: str) -> int:
    """GPUs a task requests for `device` (cuda: one; cpu/auto: none)."""
    if device not in ("cpu", "auto", "cuda"):
        raise DistributedError(f"device must be cpu or cuda, not {device!r}")
    return 1 if device == "cuda" else 0


def _default_tasks(slots: int, total_bytes: int) -> int:
    """2 ranges per task slot (one can start while another finishes), at least one per
    DEFAULT_TASK_BYTES of input."""
    return max(2 * max(slots, 1), math.ceil(total_bytes / DEFAULT_TASK_BYTES))


def task_options(cpus: int, gpus: int, max_retries: int) -> dict:
    """The Ray options of every task: its resources, and retries only for a dead worker (an
    error the task raises, e.g. an unreadable file, fails the same way again)."""
    return dict(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False)


def run_ranges(task: Callable[..., dict], make_ranges: Callable[[int], list[TokenRange]],
               arguments: Callable[[TokenRange], tuple[tuple, dict]], *, n_tokens: int,
               row_bytes: float, cpus: int, gpus: int, address: str | None, max_retries: int,
               progress) -> list[dict]:
    """Run task(range, *args, **kwargs) as one Ray task per range, (args, kwargs) =
    arguments(range), ranges = make_ranges(task slots of the cluster); the results in
    range order. Connects (and disconnects) unless this process is connected already."""
    ray = _ray()
    started = _connect(ray, address)
    try:
        slots, _ = _cluster(ray, cpus, gpus)
        if gpus and slots == 0:
            raise DistributedError("device cuda: the Ray cluster has no GPU")
        ranges = make_ranges(slots)
        remote = ray.remote(task).options(**task_options(cpus, gpus, max_retries))
        pending = {}
        for r in ranges:
            args, kwargs = arguments(r)
            pending[remote.remote(r, *args, **kwargs)] = r
        return _collect(ray, pending, len(ranges), n_tokens, row_bytes, (cpus, gpus),
                        max_retries + 1, progress)
    finally:
        if started:
            ray.shutdown()


def _check_simd(results: list[dict]) -> None:
    simd = sorted({r["simd"] for r in results})
    if len(simd) > 1:
        warnings.warn(f"workers ran different SIMD paths ({', '.join(simd)}): results agree with "
                      "one machine's to float32 rounding, not bitwise; set FIDELITY_KLD_SIMD on "
                      "every node to one level for bitwise results", stacklevel=3)


def _collect(ray, pending: dict, n_ranges: int, n_tokens: int, row_bytes: int,
             per_task: tuple[int, int], attempts: int, progress) -> list[dict]:
    """Wait for every range, reporting progress; on a failure cancel the rest and raise."""
    done: dict[int, dict] = {}
    tokens_done = 0
    t0 = time.perf_counter()
    slots, nodes = _cluster(ray, *per_task)
    polled = time.monotonic()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                rng = pending.pop(ref)
                try:
                    done[rng.index] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise _failure(ray, e, rng, attempts) from None
                tokens_done += rng.stop - rng.start
            if time.monotonic() - polled > 2.0:
                slots, nodes = _cluster(ray, *per_task)
                polled = time.monotonic()
            if progress is not None:
                progress(ClusterProgress(tokens_done, n_tokens, int(tokens_done * row_bytes),
                                         time.perf_counter() - t0, len(done), n_ranges,
                                         slots, nodes))
    except BaseException:  # a failed range, Ctrl-C, SIGTERM: nothing more is worth computing
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return [done[k] for k in range(n_ranges)]


# --- top-k dumps (commands/compare_topk's path) -------------------------------------------

def _topk_pieces(side, path: str, start: int, stop: int) -> tuple[Piece, ...]:
    """The pieces of one side of a top-k comparison: a top-k dump (one file; dtype 'topk',
    vocab -1 when unknown) or a full dump's files."""
    from .topk_compare import TOPK

    if isinstance(side, TOPK):
        return (Piece(os.path.abspath(path), start, stop, side.n_rows,
                      -1 if side.vocab is None else side.vocab, "topk"),)
    return _pieces(_files(side), start, stop)


def _open_topk_side(pieces: tuple[Piece, ...], vocabs: list):
    """A worker's view of its rows of one side: a LogitSource to close, or the TopKLogprobs
    of its rows, validated as read_topk validates a whole file (io.topk.check_topk), and
    their ids checked against each vocabulary in vocabs (the comparisons' common ones)."""
    from .io.topk import check_topk, read_topk_rows

    if pieces[0].dtype != "topk":
        return _open_range(pieces)
    p = pieces[0]
    t = read_topk_rows(p.path, p.start, p.stop, n_rows=p.n_tokens)
    check_topk(t, p.path, first_row=p.start)
    for v in vocabs:
        if v is not None and t.token_ids.max() >= v:
            r = int(np.flatnonzero(t.token_ids.max(axis=1) >= v)[0])
            raise DumpError(f"{p.path}: row {p.start + r}: token id {int(t.token_ids[r].max())} "
                            f"is outside the vocabulary [0, {v})")
    return t


def compare_topk_range(rng: TokenRange, labels: list, *, vocabs: list, rows: list) -> dict:
    """One task of a top-k comparison: the bounds of its rows of the reference against each
    model (topk_compare.bounds_by_block, blocks of rows[j] rows from the range's start)."""
    from .topk_compare import bounds_by_block

    t0 = time.perf_counter()
    sides = []
    try:
        for j, pieces in enumerate((rng.ref, *rng.quants)):
            sides.append(_open_topk_side(pieces, vocabs if j == 0 else [vocabs[j - 1]]))
        stats = [bounds_by_block(sides[0], q, r, vocab=v, labels=y)
                 for q, r, v, y in zip(sides[1:], rows, vocabs, labels)]
    finally:
        for s in sides:
            if isinstance(s, LogitSource):
                s.close()
    return {"models": stats, "seconds": time.perf_counter() - t0, "pid": os.getpid()}


def _bytes_per_row(side, path: str) -> float:
    from .topk_compare import TOPK

    if isinstance(side, TOPK):
        return os.path.getsize(path) / max(side.n_rows, 1)
    return side.bytes_per_token


def compare_topk_sides(sides: Sequence, paths: Sequence[str], vocabs: Sequence[int | None], *,
                       tasks: int | None = None, address: str | None = "auto",
                       max_retries: int = MAX_RETRIES,
                       progress: Callable[[ClusterProgress], None] | None = None) -> list:
    """topk_compare.compare_topk(sides[0], sides[j], vocab=vocabs[j - 1]) for every model j on
    a Ray cluster, bitwise: sides as topk_compare.open_side gives them (index=True: a top-k
    Parquet file as a TopKIndex, whose rows only the tasks read and validate), read at
    `paths` by the workers. Ranges are cut at prompt starts, or where a
    side is a full dump on compare_topk's block grid (a row's bounds can depend on its
    block's other rows there). The bounds are numpy: each task takes one CPU core, and for
    bitwise results every node needs the same numpy SIMD paths. Returns TopKTokenStats."""
    from .stats.topk_bounds import TopKTokenStats
    from .topk_compare import TOPK, _labels, _n_rows, block_rows

    ref, quants = sides[0], list(sides[1:])
    n = _n_rows(ref)
    labels = [_labels(ref) if _labels(ref) is not None else _labels(q) for q in quants]
    rows = [block_rows(ref, q) for q in quants]
    grid = math.lcm(1, *[r for r in rows if r is not None])
    row_bytes = sum(_bytes_per_row(s, p) for s, p in zip(sides, paths))
    full = [s for s in sides if not isinstance(s, TOPK)]
    forced = sorted({first for s in full for _, first in _files(s)})  # shard boundaries
    if grid > 1:
        starts = np.arange(0, n, grid, dtype=np.int64)
    else:
        pids = [s.prompt_id if isinstance(s, TOPK) else s.prompt_ids for s in sides]
        starts = prompt_starts(next((p for p in pids if p is not None), None), n)

    def ranges(slots: int) -> list[TokenRange]:
        count = tasks or _default_tasks(slots, int(n * row_bytes))
        bounds = cut_points(n, count, starts, forced)
        return [TokenRange(k, a, b, _topk_pieces(ref, paths[0], a, b),
                           tuple(_topk_pieces(q, p, a, b) for q, p in zip(quants, paths[1:])))
                for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]

    kwargs = dict(vocabs=list(vocabs), rows=rows)
    results = run_ranges(
        compare_topk_range, ranges,
        lambda r: (([None if y is None else y[r.start:r.stop] for y in labels],), kwargs),
        n_tokens=n, row_bytes=row_bytes, cpus=1, gpus=0, address=address,
        max_retries=max_retries, progress=progress)
    return [TopKTokenStats.concat([r["models"][j] for r in results]) for j in range(len(quants))]


# --- hidden-state dumps (commands/compare_hidden's path) -----------------------------------

def _hidden_piece(d, start: int, stop: int) -> tuple[Piece, ...]:
    return (Piece(os.path.abspath(d.path), start, stop, d.n_tokens, d.hidden_size, d.dtype),)


def compare_hidden_range(rng: TokenRange, *, shared_lm_head: bool, lm_head: str | None,
                         tile_bytes: int, threads: int, device: str) -> dict:
    """One task of a hidden-state comparison: open the dumps and their lm_heads, score the
    range's rows tile by tile (hidden.compare_hidden), pack the per-token arrays."""
    from . import _core
    from .hidden import compare_hidden, heads_for
    from .io.hidden import HiddenDump

    t0 = time.perf_counter()
    dumps = []
    for (p,) in (rng.ref, *rng.quants):
        d = HiddenDump(p.path)
        seen = (d.n_tokens, d.hidden_size, d.dtype)
        if seen != (p.n_tokens, p.vocab, p.dtype):
            raise DumpError(f"{p.path}: on this worker the dump holds {seen[0]} x {seen[1]} "
                            f"{seen[2]} hidden states, the driver read {p.n_tokens} x {p.vocab} "
                            f"{p.dtype}: is it the same file on shared storage?")
        dumps.append(d)
    heads = heads_for(dumps[0], dumps[1:], shared_lm_head=shared_lm_head, lm_head=lm_head)
    stats = compare_hidden(dumps[0], dumps[1:], heads, tile_bytes=tile_bytes, threads=threads,
                           device=device, start=rng.start, stop=rng.stop)
    out = _pack(stats)
    out.update(simd=_core.active_simd_level(), seconds=time.perf_counter() - t0, pid=os.getpid())
    return out


def compare_hidden_dumps(ref, quants: Sequence, heads: Sequence, *, shared_lm_head: bool = False,
                         lm_head: str | None = None, tile_bytes: int | None = None,
                         threads: int | None = None, device: str = "cpu", tasks: int | None = None,
                         address: str | None = "auto", max_retries: int = MAX_RETRIES,
                         progress: Callable[[ClusterProgress], None] | None = None) -> list[TokenStats]:
    """hidden.compare_hidden(ref, quants, heads, ...) on a Ray cluster, bitwise: ref and
    quants are io.hidden.HiddenDump opened on the driver, heads what hidden.heads_for gave
    it with shared_lm_head and lm_head (each worker loads the same heads itself). Ranges
    are cut on the tile grid, so every tile holds the rows it holds on one machine (the
    matrix product of a row is not guaranteed the same bits in another tile). device:
    'cuda' gives each task one GPU and the GPU path. threads: cores per task (default 1)."""
    from .hidden import TILE_BYTES

    gpus = _gpus(device)
    tile_bytes = TILE_BYTES if tile_bytes is None else int(tile_bytes)
    n = ref.n_tokens
    if n == 0:
        raise DumpError(f"{ref.path}: the dump holds no hidden states")
    rows = max(1, tile_bytes // ((1 + len(quants)) * heads[0].vocab * 4))
    cpus = int(threads) if threads else 1
    row_bytes = sum(d.hidden_size * d.hidden.dtype.itemsize for d in (ref, *quants))

    def ranges(slots: int) -> list[TokenRange]:
        count = tasks or _default_tasks(slots, n * row_bytes)
        bounds = cut_points(n, count, np.arange(0, n, rows, dtype=np.int64))
        return [TokenRange(k, a, b, _hidden_piece(ref, a, b),
                           tuple(_hidden_piece(q, a, b) for q in quants))
                for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]

    kwargs = dict(shared_lm_head=shared_lm_head,
                  lm_head=None if lm_head is None else os.path.abspath(lm_head),
                  tile_bytes=tile_bytes, threads=cpus, device="cuda" if gpus else "cpu")
    results = run_ranges(compare_hidden_range, ranges, lambda r: ((), kwargs), n_tokens=n,
                         row_bytes=row_bytes, cpus=cpus, gpus=gpus, address=address,
                         max_retries=max_retries, progress=progress)
    _check_simd(results)
    return _unpack(results, len(quants))


def _local_path(path: str | os.PathLike) -> str:
    """A filesystem path; file:// URIs (pyarrow's) resolved. Other filesystems are refused:
    the readers memory-map files, so object stores must be mounted on every node."""
    path = os.fspath(path)
    if "://" not in path:
        return path
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
    except (ValueError, OSError) as e:
        raise DistributedError(f"{path}: {e}") from None
    if not isinstance(filesystem, fs.LocalFileSystem):
        raise DistributedError(f"{path}: only files on a filesystem every node mounts can be read "
                               f"(not {filesystem.type_name}); mount it on every node and give the path")
    return inner


def compare(ref, quants, *, dtype: str | None = None, **kwargs) -> list[TokenStats]:
    """Per-token statistics of each quantized dump against the reference, computed on a Ray
    cluster: paths (files, shard directories, globs, file:// URIs) every worker reads at the
    same place. dtype: declare uint16 .npy dumps as 'bfloat16'. Other arguments: as for
    compare_sources. Returns one TokenStats per model, bitwise the single-machine result."""
    from .io import check_compatible, open_source

    ref_src = open_source(_local_path(ref), dtype=dtype)
    q_srcs: list[LogitSource] = []
    try:
        for q in quants:
            q_srcs.append(open_source(_local_path(q), dtype=dtype))
            check_compatible(ref_src, q_srcs[-1])
        return compare_sources(ref_src, q_srcs, **kwargs)
    finally:
        for src in (ref_src, *q_srcs):
            src.close()
