"""The top-k log-prob dump: per scored position the k largest log-probs and their token ids,
the mass left outside them, the floor under it, and the label's own log-prob.

One format for every writer (full logits via `fidelity-kld convert --top-k`, transformers
capture, vLLM and llama-cpp-python records) and one reader, `read_topk`, which validates
what the bounds in fidelity_kld.stats.topk_bounds rely on.

Parquet, one row per scored position (the convention of every dump: row j predicts token
j+1 of its prompt):

| column | type | meaning |
|---|---|---|
| prompt_id | int64 or string | the prompt the row belongs to |
| position | int64 | the row's position in its prompt |
| label | int64 | the token the row predicts |
| label_logprob | float32 | log p(label); NaN when not known |
| label_rank | int64 | 1-based rank of the label; -1 when not known |
| topk_ids | fixed_size_list<int64>[k] | token ids by decreasing log-prob; -1 pads rows with fewer |
| topk_logprobs | fixed_size_list<float32>[k] | their log-probs (<= 0, non-increasing); -inf pads |
| tail_mass | float64 (optional) | 1 - sum of the row's top-k probabilities, computed from the full row |
| floor_logprob | float32 (optional) | a lower bound on every log-prob of the row (the row's minimum, rounded down); NaN unknown |

Schema metadata `fidelity_kld.topk` = JSON {"k": k, "version": 2, "vocab": V or null,
"source": "..."}. Version 1 (capture.vllm before this module) lacks the two optional
columns and vocab: the tail mass is then derived as 1 - sum(exp(topk_logprobs)) and the
floor is unknown, so the upper KLD bound against such a dump is +inf (see topk_bounds).

Why tail_mass is stored when it can be derived: 1 - sum of float32 probabilities loses
everything below ~1e-7, and for near-certain rows that is the whole tail; the writer forms
it in float64 from the full row. Why floor_logprob: without a floor on the quantized
model's unseen probabilities the KLD has no finite upper bound (an unseen q_i can be
arbitrarily close to 0 where p_i is not).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import numpy as np

from .arrow import _first_line
from ._util import load_json
from .base import DumpError
from .parquet_layout import check_columns

META_KEY = b"fidelity_kld.topk"
FORMAT_VERSION = 2
LOGPROB_SLACK = 1e-6  # a log-prob above this is an error; up to it, float rounding of log(1)
TAIL_SLACK = 1e-4  # derived 1 - sum(top-k) may dip this far below 0 by float32 rounding


@dataclass(frozen=True)
class TopKLogprobs:
    """Top-k log-probs per scored position (records in order, positions ascending).

    prompt_id [N]; position [N] (row j predicts token j+1 of its prompt); label [N] (that
    token); label_logprob [N] (NaN if not given); label_rank [N] (1-based, -1 unknown);
    token_ids [N, k] (-1 where fewer than k were given); logprobs [N, k] float32 (-inf there),
    in decreasing order. stored_tail_mass [N] float64 or None (then derived);
    floor_logprob [N] float32 or None (unknown); vocab: V or None (unknown).
    """

    prompt_id: np.ndarray
    position: np.ndarray
    label: np.ndarray
    label_logprob: np.ndarray
    label_rank: np.ndarray
    token_ids: np.ndarray
    logprobs: np.ndarray
    stored_tail_mass: np.ndarray | None = None
    floor_logprob: np.ndarray | None = None
    vocab: int | None = None

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[1])

    @property
    def n_rows(self) -> int:
        return int(self.label.shape[0])

    def tail_mass(self) -> np.ndarray:
        """The mass outside the top k per row (float64): the stored column when present,
        else 1 - sum of the top-k probabilities (can be a hair below 0 by rounding of
        near-certain rows)."""
        if self.stored_tail_mass is not None:
            return np.asarray(self.stored_tail_mass, dtype=np.float64)
        with np.errstate(under="ignore"):
            return 1.0 - np.exp(self.logprobs.astype(np.float64)).sum(axis=1)

    def rows(self, start: int, stop: int) -> "TopKLogprobs":
        def cut(a):
            return None if a is None else a[start:stop]
        return replace(self, prompt_id=self.prompt_id[start:stop], position=self.position[start:stop],
                       label=self.label[start:stop], label_logprob=self.label_logprob[start:stop],
                       label_rank=self.label_rank[start:stop], token_ids=self.token_ids[start:stop],
                       logprobs=self.logprobs[start:stop], stored_tail_mass=cut(self.stored_tail_mass),
                       floor_logprob=cut(self.floor_logprob))

    @staticmethod
    def concat(parts: list["TopKLogprobs"]) -> "TopKLogprobs":
        first = parts[0]

        def cat(name):
            vals = [getattr(p, name) for p in parts]
            return None if any(v is None for v in vals) else np.concatenate(vals)
        return TopKLogprobs(**{n: cat(n) for n in ("prompt_id", "position", "label", "label_logprob",
                                                   "label_rank", "token_ids", "logprobs",
                                                   "stored_tail_mass", "floor_logprob")},
                            vocab=first.vocab)


# ---------------------------------------------------------------------------------------
# From full logits

def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (-inf entries stay -inf)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        shifted = x - m
        return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def _round_down_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 never above the input (a floor must stay a floor once stored)."""
    y = np.asarray(x, dtype=np.float64).astype(np.float32)
    up = y.astype(np.float64) > x
    return np.where(up, np.nextafter(y, np.float32(-np.inf)), y)


def from_logits(logits: np.ndarray, k: int, labels=None, prompt_ids=None, *,
                positions=None, vocab: int | None = None) -> TopKLogprobs:
    """The top-k dump of full logit rows ([N, V] float array, any float dtype): ids by
    decreasing log-prob (lowest id first on ties), tail mass and floor from the full row in
    float64, label log-prob and rank when labels are given."""
    lp = _log_softmax64(logits)
    n, v = lp.shape
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, {v}], got {k}")
    # k largest, ties to the lowest id: argpartition for the candidates, then an exact sort
    part = np.argpartition(-lp, k - 1, axis=1)[:, :k] if k < v else np.tile(np.arange(v), (n, 1))
    vals = np.take_along_axis(lp, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    # a value equal to the k-th may have been left out with a lower id: fix ties exactly
    if k < v:
        kth = np.take_along_axis(lp, ids[:, -1:], axis=1)
        tied = (lp == kth).sum(axis=1) > (np.take_along_axis(lp, ids, axis=1) == kth).sum(axis=1)
        for r in np.flatnonzero(tied):
            ids[r] = np.lexsort((np.arange(v), -lp[r]))[:k]
    top = np.take_along_axis(lp, ids, axis=1)
    mask = np.ones_like(lp, dtype=bool)
    np.put_along_axis(mask, ids, False, axis=1)
    with np.errstate(under="ignore"):
        tail = np.where(mask, np.exp(lp), 0.0).sum(axis=1)
    floor = lp.min(axis=1)
    if labels is not None:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        ly = lp[np.arange(n), y]
        label_lp = ly.astype(np.float32)
        label_rank = (lp > ly[:, None]).sum(axis=1) + 1
    else:
        y = np.full(n, -1, np.int64)
        label_lp = np.full(n, np.nan, np.float32)
        label_rank = np.full(n, -1, np.int64)
    return TopKLogprobs(
        prompt_id=np.zeros(n, np.int64) if prompt_ids is None else np.asarray(prompt_ids).reshape(-1),
        position=np.arange(n, dtype=np.int64) if positions is None else np.asarray(positions, np.int64),
        label=y, label_logprob=label_lp, label_rank=label_rank.astype(np.int64),
        token_ids=ids.astype(np.int64), logprobs=top.astype(np.float32),
        stored_tail_mass=tail, floor_logprob=_round_down_f32(floor), vocab=int(vocab or v))


# ---------------------------------------------------------------------------------------
# Parquet

def _table(topk: TopKLogprobs, source: str | None):
    import pyarrow as pa

    k = topk.k
    pid = topk.prompt_id
    cols = {
        "prompt_id": pa.array(pid, pa.int64()) if pid.dtype != object else pa.array(list(pid), pa.string()),
        "position": pa.array(topk.position, pa.int64()),
        "label": pa.array(topk.label, pa.int64()),
        "label_logprob": pa.array(topk.label_logprob, pa.float32()),
        "label_rank": pa.array(topk.label_rank, pa.int64()),
        "topk_ids": pa.FixedSizeListArray.from_arrays(pa.array(topk.token_ids.reshape(-1), pa.int64()), k),
        "topk_logprobs": pa.FixedSizeListArray.from_arrays(
            pa.array(topk.logprobs.reshape(-1), pa.float32()), k),
    }
    if topk.stored_tail_mass is not None:
        cols["tail_mass"] = pa.array(topk.stored_tail_mass, pa.float64())
    if topk.floor_logprob is not None:
        cols["floor_logprob"] = pa.array(topk.floor_logprob, pa.float32())
    meta = {META_KEY: json.dumps({"k": k, "version": FORMAT_VERSION, "vocab": topk.vocab,
                                  "source": source}).encode()}
    return pa.table(cols).replace_schema_metadata(meta)


def write_topk(topk: TopKLogprobs, path, *, source: str | None = None) -> str:
    """Parquet, in the layout of the module docstring; the file appears only when complete."""
    import pyarrow.parquet as pq

    from .._atomic import atomic_output

    path = os.fspath(path)
    with atomic_output(path) as tmp:
        pq.write_table(_table(topk, source), tmp)
    return path


class TopKWriter:
    """Append TopKLogprobs chunks to one Parquet file (a row group each) at `tmp`, the
    temporary name the caller renames; for dumps too large to hold at once."""

    def __init__(self, tmp: str, *, source: str | None = None):
        self.tmp, self.source, self._writer = tmp, source, None

    def write(self, topk: TopKLogprobs) -> None:
        import pyarrow.parquet as pq

        table = _table(topk, self.source)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def is_topk_file(path: str) -> bool:
    """A Parquet file carrying the top-k metadata, or a .jsonl of vLLM records."""
    path = os.fspath(path)
    if path.endswith(".jsonl"):
        return True
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        if f.read(4) != b"PAR1":
            return False
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # not readable as Parquet: the ordinary readers give the error
        return False
    return META_KEY in meta


def read_topk(path, *, k: int | None = None, validate: bool = True) -> TopKLogprobs:
    """A top-k dump: Parquet written by write_topk (version 1 or 2), or vLLM-shaped JSONL
    (.jsonl). Validated (check_topk) unless validate=False; errors name the file."""
    path = os.fspath(path)
    if path.endswith(".jsonl"):
        from ..capture.vllm import read_vllm_jsonl

        t = read_vllm_jsonl(path, k=k)
    else:
        t = _read_parquet(path)
    if validate:
        check_topk(t, path)
    return t


def read_topk_rows(path, start: int, stop: int, n_rows: int | None = None) -> TopKLogprobs:
    """Rows [start, stop) (start < stop) of a top-k dump, not validated (check_topk with
    first_row=start does that): of a Parquet file only the row groups holding them are
    read. n_rows: the rows the file had when opened elsewhere (DumpError if it differs)."""
    path = os.fspath(path)
    if path.endswith(".jsonl"):
        t = read_topk(path, validate=False)
        if n_rows is not None and t.n_rows != n_rows:
            raise DumpError(f"{path}: {t.n_rows} rows, not the {n_rows} read before: "
                            "is it the same file on shared storage?")
        return t.rows(start, stop)
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
        firsts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        if stop > firsts[-1] or (n_rows is not None and firsts[-1] != n_rows):
            raise DumpError(f"{path}: {int(firsts[-1])} rows, not the {n_rows or stop} read "
                            "before: is it the same file on shared storage?")
        groups = [g for g in range(len(sizes)) if firsts[g] < stop and firsts[g + 1] > start]
        check_columns(path, f.metadata, row_groups=set(groups))  # the pages this task reads
        table = f.read_row_groups(groups)
    except DumpError:
        raise
    except Exception as e:
        raise DumpError(f"{path}: not readable as Parquet ({_first_line(e)})") from None
    first = int(firsts[groups[0]])
    return _from_table(path, table).rows(start - first, stop - first)


@dataclass(frozen=True)
class TopKIndex:
    """A top-k Parquet dump as the driver of a distributed run reads it: its metadata and
    the label and prompt-id columns, not the top-k columns (fidelity_kld.distributed's
    tasks read and validate their own rows of those), so the driver never holds them."""

    path: str
    k: int
    n_rows: int
    vocab: int | None
    has_floor: bool
    label: np.ndarray
    prompt_id: np.ndarray


def read_topk_index(path) -> TopKIndex:
    """The TopKIndex of a top-k Parquet file; DumpError naming it for a bad layout, no rows,
    or a label outside its vocabulary (what check_topk says of the whole file)."""
    import pyarrow.parquet as pq

    path = os.fspath(path)
    try:
        f = pq.ParquetFile(path)
        info, names = _layout(path, f.schema_arrow)
        check_columns(path, f.metadata, {"label", "prompt_id"})
        table = f.read(columns=["label", "prompt_id"])
    except DumpError:
        raise
    except Exception as e:
        raise DumpError(f"{path}: not readable as Parquet ({_first_line(e)})") from None
    label = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    pid = table.column("prompt_id").to_numpy(zero_copy_only=False)
    vocab = None if info.get("vocab") is None else int(info["vocab"])
    if label.size == 0:
        raise DumpError(f"{path}: the top-k dump has no rows")
    if vocab is not None and ((label < -1) | (label >= vocab)).any():
        r = int(np.flatnonzero((label < -1) | (label >= vocab))[0])
        raise DumpError(f"{path}: row {r}: label {int(label[r])} is outside the vocabulary [0, {vocab})")
    return TopKIndex(path, int(info["k"]), int(label.size), vocab, "floor_logprob" in names, label,
                     pid.astype(np.int64) if pid.dtype.kind in "iu" else pid.astype(object))


def _read_parquet(path: str) -> TopKLogprobs:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        check_columns(path, f.metadata)
        table = f.read()
    except DumpError:
        raise
    except Exception as e:
        raise DumpError(f"{path}: not readable as Parquet ({_first_line(e)})") from None
    return _from_table(path, table)


def _layout(path: str, schema) -> tuple[dict, set]:
    """(the top-k metadata, the column names) of a top-k table's schema, checked."""
    meta = schema.metadata or {}
    if META_KEY not in meta:
        raise DumpError(f"{path}: not a fidelity-kld top-k table (no {META_KEY.decode()} metadata)")
    try:
        names = set(schema.names)
    except UnicodeDecodeError:  # flatbuffer strings are not checked for UTF-8 on read
        raise DumpError(f"{path}: a column name is not valid UTF-8") from None
    missing = {"prompt_id", "position", "label", "label_logprob", "label_rank", "topk_ids",
               "topk_logprobs"} - names
    if missing:
        raise DumpError(f"{path}: top-k table lacks column(s) {', '.join(sorted(missing))}")
    twice = sorted(n for n in names if schema.names.count(n) > 1)
    if twice:
        raise DumpError(f"{path}: {len(twice)} column name(s) used twice: {', '.join(twice)}")
    info = load_json(path, meta[META_KEY], f"{META_KEY.decode()} metadata")
    if not isinstance(info, dict):
        raise DumpError(f"{path}: the {META_KEY.decode()} metadata is not a JSON object")
    for key, least in (("k", 1), ("vocab", 1)):
        v = info.get(key)
        if (key == "k" or v is not None) and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise DumpError(f"{path}: the {META_KEY.decode()} metadata's {key} is {v!r}, "
                            "not a positive integer")
    return info, names


def _from_table(path: str, table) -> TopKLogprobs:
    import pyarrow as pa

    info, names = _layout(path, table.schema)
    width, n = info["k"], table.num_rows

    def read(name, convert):
        try:
            out = convert(table.column(name))
        except (pa.ArrowException, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise DumpError(f"{path}: top-k column {name!r} is {table.schema.field(name).type}, "
                            f"unreadable as this column ({_first_line(e)})") from None
        if out.shape[0] != n:
            raise DumpError(f"{path}: top-k column {name!r} holds {out.shape[0]} rows, not {n}")
        return out

    def matrix(name, dtype):
        def convert(col):
            col = col.combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                if col.type.list_size != width:
                    raise ValueError(f"lists of {col.type.list_size}, not k = {width}")
            elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                lens = np.diff(col.offsets.to_numpy())
                if col.null_count or (lens != width).any():  # each row its k entries
                    r = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False) | (lens != width))[0])
                    raise ValueError(f"row {r} holds {int(lens[r])} entries, not k = {width}")
            else:
                raise TypeError("not a list column")
            flat = col.flatten().to_numpy(zero_copy_only=False)
            if flat.size != n * width:
                raise ValueError(f"{flat.size} values for {n} rows of k = {width}")
            return np.asarray(flat, dtype=dtype).reshape(n, width)
        return read(name, convert)

    def column(name, dtype):
        return read(name, lambda col: col.to_numpy(zero_copy_only=False).astype(dtype))

    pid = read("prompt_id", lambda col: col.to_numpy(zero_copy_only=False))
    vocab = info.get("vocab")
    return TopKLogprobs(
        prompt_id=pid.astype(np.int64) if pid.dtype.kind in "iu" else pid.astype(object),
        position=column("position", np.int64),
        label=column("label", np.int64),
        label_logprob=column("label_logprob", np.float32),
        label_rank=column("label_rank", np.int64),
        token_ids=matrix("topk_ids", np.int64),
        logprobs=matrix("topk_logprobs", np.float32),
        stored_tail_mass=column("tail_mass", np.float64) if "tail_mass" in names else None,
        floor_logprob=column("floor_logprob", np.float32) if "floor_logprob" in names else None,
        vocab=None if vocab is None else int(vocab))


# ---------------------------------------------------------------------------------------
# Validation: what the bounds assume, checked once, with the first offending row named

def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])


def check_topk(t: TopKLogprobs, path: str, first_row: int = 0) -> None:
    """DumpError naming `path` and the first bad row unless: ids are -1 (padding, only after
    the real entries) or in [0, vocab); no id repeats within a row; log-probs are <= 0 and
    non-increasing (-inf on padding); the tail mass is within [0, 1]; the floor is at most
    the row's smallest top-k log-prob. first_row: the file row of t's first (for rows
    read with read_topk_rows), so that the error names the row of the file."""
    ids, lps = t.token_ids, t.logprobs
    n = t.n_rows
    if n == 0:
        raise DumpError(f"{path}: the top-k dump has no rows")
    present = ids >= 0
    if (ids < -1).any():
        raise DumpError(f"{path}: row {first_row + _first(ids < -1)}: token id {int(ids[ids < -1][0])} is negative")
    if t.vocab is not None and (ids >= t.vocab).any():
        bad = ids >= t.vocab
        raise DumpError(f"{path}: row {first_row + _first(bad)}: token id {int(ids[bad][0])} is outside the "
                        f"vocabulary [0, {t.vocab})")
    if (present[:, 1:] & ~present[:, :-1]).any():
        raise DumpError(f"{path}: row {first_row + _first(present[:, 1:] & ~present[:, :-1])}: a token id follows "
                        "-1 padding")
    if not present[:, 0].all():
        raise DumpError(f"{path}: row {first_row + _first(~present[:, :1])}: no top-k entries")
    srt = np.sort(np.where(present, ids, -1 - np.arange(t.k)), axis=1)
    dup = srt[:, 1:] == srt[:, :-1]
    if dup.any():
        r = _first(dup)
        raise DumpError(f"{path}: row {first_row + r}: token id {int(srt[r, 1:][dup[r]][0])} appears twice")
    if np.isnan(lps[present]).any() or (lps[present] > LOGPROB_SLACK).any():
        bad = present & (np.isnan(lps) | (lps > LOGPROB_SLACK))
        raise DumpError(f"{path}: row {first_row + _first(bad)}: log-prob {float(lps[bad][0])} is not <= 0")
    if (~present & (lps != -np.inf)).any():
        raise DumpError(f"{path}: row {first_row + _first(~present & (lps != -np.inf))}: padding (-1 id) must "
                        "carry log-prob -inf")
    with np.errstate(invalid="ignore"):
        rising = lps[:, 1:] > lps[:, :-1]
    if rising.any():
        raise DumpError(f"{path}: row {first_row + _first(rising)}: top-k log-probs are not in decreasing order")
    tail = t.tail_mass()
    stored = t.stored_tail_mass is not None
    low = tail < (0.0 if stored else -TAIL_SLACK)
    if np.isnan(tail).any() or low.any() or (tail > 1.0).any():
        bad = np.isnan(tail) | low | (tail > 1.0)
        r = int(np.flatnonzero(bad)[0])
        what = "tail mass" if stored else "1 - sum of the top-k probabilities"
        raise DumpError(f"{path}: row {first_row + r}: {what} {tail[r]:.6g} is outside [0, 1]")
    if t.floor_logprob is not None:
        f = t.floor_logprob
        with np.errstate(invalid="ignore"):
            above = f > np.min(lps, axis=1, initial=0.0, where=present)
        if above.any():
            r = int(np.flatnonzero(above)[0])
            raise DumpError(f"{path}: row {first_row + r}: floor_logprob {float(f[r]):g} is above the row's "
                            "smallest top-k log-prob")
    if t.vocab is not None:
        lab = t.label
        bad = (lab < -1) | (lab >= t.vocab)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise DumpError(f"{path}: row {first_row + r}: label {int(lab[r])} is outside the vocabulary [0, {t.vocab})")


# ---------------------------------------------------------------------------------------
# Full dump -> top-k dump (fidelity-kld convert --top-k)

def convert_to_topk(src, out, k: int, *, rows_per_chunk: int | None = None) -> int:
    """Stream the open LogitSource `src` into a top-k dump at `out` (Parquet, one row group
    per chunk, appearing only when complete). Returns the number of rows written."""
    from .._atomic import atomic_output
    from .conversion import cast_block

    out = os.fspath(out)
    if not 1 <= k <= src.vocab:
        raise DumpError(f"{out}: --top-k must be in [1, {src.vocab}], got {k}")
    if rows_per_chunk is None:
        rows_per_chunk = max(1, (16 << 20) // max(src.vocab, 1))
    with atomic_output(out) as tmp:
        writer = TopKWriter(tmp, source=src.path)
        try:
            for start, lg in src.chunks(rows_per_chunk):
                stop = start + lg.n_tokens
                x = cast_block(lg, "float32", start, src.path)
                labels = None if src.labels is None else src.labels[start:stop]
                pids = None if src.prompt_ids is None else src.prompt_ids[start:stop]
                writer.write(from_logits(x, k, labels, pids, positions=np.arange(start, stop),
                                         vocab=src.vocab))
        finally:
            writer.close()
    return src.n_tokens


def describe_topk(path) -> dict:
    """What `fidelity-kld info` shows for a top-k dump (read and validated)."""
    path = os.fspath(path)
    t = read_topk(path)
    n_prompts = len(set(t.prompt_id.tolist()))
    tail = t.tail_mass()
    return {
        "path": path,
        "format": "topk",
        "format_name": "fidelity-kld top-k log-probs (" + ("vLLM JSONL" if path.endswith(".jsonl")
                                                          else "Parquet") + ")",
        "tokens": t.n_rows,
        "k": t.k,
        "vocab": t.vocab,
        "size_bytes": os.path.getsize(path),
        "prompts": n_prompts,
        "labels": bool((t.label >= 0).all()),
        "label_logprobs": int(np.isfinite(t.label_logprob).sum()),
        "tail_mass": "stored" if t.stored_tail_mass is not None else "derived (1 - sum of top k)",
        "tail_mass_mean": float(np.mean(tail)),
        "floor": t.floor_logprob is not None,
        "kld_upper_bound": ("finite (floor stored)" if t.floor_logprob is not None else
                            "+inf where this is the quant (no floor under unseen probabilities)"),
    }


class TopKDumpWriter:
    """Append full-logit row blocks (numpy or torch, [rows, V]) to a top-k dump at `path`,
    which appears at close() (abort() removes it): what capture.hf writes with
    compare_models(..., ref_topk_dump=..., q_topk_dump=..., k=...)."""

    def __init__(self, path, k: int, *, source: str | None = None):
        from .._atomic import make_temp

        self.path, self.k = os.fspath(path), int(k)
        self._tmp = make_temp(self.path)  # the house's temporary name, so stale ones are removed
        self._writer = TopKWriter(self._tmp, source=source)
        self.n_rows = 0

    def write(self, rows, labels=None, prompt_ids=None) -> None:
        if hasattr(rows, "detach"):  # torch, any device
            rows = rows.detach().float().cpu().numpy()
        rows = np.asarray(rows)
        n = rows.shape[0]
        if n == 0:
            return
        self._writer.write(from_logits(rows, self.k, labels, prompt_ids,
                                       positions=np.arange(self.n_rows, self.n_rows + n)))
        self.n_rows += n

    def close(self) -> None:
        from .._atomic import default_mode

        if self.n_rows == 0:  # an empty file would not even be Parquet
            self.abort()
            raise DumpError(f"{self.path}: no rows were written; a dump needs at least one")
        self._writer.close()
        os.chmod(self._tmp, default_mode())
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
