"""Compare a reference with quants where a side is a top-k dump (fidelity_kld.io.topk):
per-token KLD bounds (fidelity_kld.stats.topk_bounds), top-1 agreement and label terms.
A full dump on the other side is streamed in row blocks and turned into float64 log-probs.
"""

from __future__ import annotations

import os

import numpy as np

from .io.base import DumpError
from .io.topk import TopKIndex, TopKLogprobs, is_topk_file, read_topk, read_topk_index

TOPK = (TopKLogprobs, TopKIndex)  # a top-k side, whole or as a distributed run's driver reads it
from .stats.topk_bounds import DENSE_ELEMENTS, TopKTokenStats, full_logprobs, token_bounds


def is_topk(path) -> bool:
    return is_topk_file(os.fspath(path))


def open_side(path, dtype: str | None = None, *, index: bool = False):
    """A TopKLogprobs for a top-k dump, else an open LogitSource (the caller closes it).
    index: a top-k Parquet file as a TopKIndex (for fidelity_kld.distributed, whose tasks
    read the rows)."""
    from .io import open_source

    path = os.fspath(path)
    if is_topk(path):
        return read_topk_index(path) if index and not path.endswith(".jsonl") else read_topk(path)
    return open_source(path, dtype=dtype)


def _n_rows(side) -> int:
    return side.n_rows if isinstance(side, TOPK) else side.n_tokens


def _vocab(side) -> int | None:
    return side.vocab


def _labels(side) -> np.ndarray | None:
    if isinstance(side, TOPK):
        return side.label if (side.label >= 0).all() else None
    return side.labels


def check_pair(ref, q, ref_path: str, q_path: str) -> int | None:
    """The common vocabulary (None when no side knows it); DumpError on a mismatch. (The
    token ids of a TopKIndex side are checked by the distributed tasks that read them.)"""
    if _n_rows(ref) != _n_rows(q):
        raise DumpError(f"{q_path}: {_n_rows(q)} rows, but {ref_path} has {_n_rows(ref)}")
    vr, vq = _vocab(ref), _vocab(q)
    if vr is not None and vq is not None and vr != vq:
        raise DumpError(f"{q_path}: vocabulary {vq}, but {ref_path} has {vr}")
    lr, lq = _labels(ref), _labels(q)
    if lr is not None and lq is not None and not np.array_equal(lr, lq):
        i = int(np.flatnonzero(lr != lq)[0])
        raise DumpError(f"{q_path}: label {int(lq[i])} at row {i}, but {ref_path} has {int(lr[i])}: "
                        "the dumps do not score the same tokens")
    vocab = vr if vr is not None else vq
    for side, path in ((ref, ref_path), (q, q_path)):
        if isinstance(side, TopKLogprobs) and vocab is not None and side.n_rows:
            if side.token_ids.max() >= vocab:
                raise DumpError(f"{path}: token id {int(side.token_ids.max())} is outside the "
                                f"vocabulary [0, {vocab})")
    return vocab


def _full_block(src, start: int, stop: int, lse: list | None = None) -> np.ndarray:
    """Rows [start, stop) of a full source as float64 log-probs; for llama.cpp rows, the
    log-sum-exp of the decoded rows is appended to `lse` (for the corrupt-row screen)."""
    from .io.conversion import cast_block

    block = cast_block(src.read(start, stop), "float32", start, src.path)
    if lse is not None:
        from scipy.special import logsumexp

        lse.append(logsumexp(block.astype(np.float64), axis=1))
    return full_logprobs(block)


def has_llama_rows(side) -> bool:
    return not isinstance(side, TOPK) and side.dtype == "llama_u16"


def compare_topk(ref, q, *, vocab: int | None = None, labels=None) -> TopKTokenStats:
    """Per-token bounds of ref against q; each a TopKLogprobs or an open LogitSource (at
    least one top-k). Full sources are read in blocks of about DENSE_ELEMENTS entries. A
    llama.cpp file with corrupt rows is refused (the CLI's check, io.llama.corrupt_row_mask:
    the bounds have no invalid tokens to count them as)."""
    if labels is None:
        labels = _labels(ref) if _labels(ref) is not None else _labels(q)
    return bounds_by_block(ref, q, block_rows(ref, q), vocab=vocab, labels=labels)


def block_rows(ref, q) -> int | None:
    """Rows per block of compare_topk: DENSE_ELEMENTS // V with a full side, else None
    (all rows at once). A row's bounds with the top-k reference against a full quant
    depend on the block it is computed in (the fill's width is the block's maximum), so a
    distributed run cuts its ranges on this grid."""
    full = [s for s in (ref, q) if not isinstance(s, TOPK)]
    return max(1, DENSE_ELEMENTS // full[0].vocab) if full else None


def bounds_by_block(ref, q, rows: int | None, *, vocab: int | None, labels) -> TopKTokenStats:
    """compare_topk's loop: blocks of `rows` rows (None: one block) from the first row of
    ref and q (TopKLogprobs or LogitSource), labels for them or None; a llama.cpp side's
    corrupt rows refused (rows numbered from the first row given)."""
    from .io.llama import refuse_corrupt_rows, screen_rows

    n = _n_rows(ref)
    rows = rows or max(n, 1)
    full = [s for s in (ref, q) if not isinstance(s, TopKLogprobs)]
    lse = {id(s): [] for s in full if has_llama_rows(s)}
    parts = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        sides = [s.rows(start, stop) if isinstance(s, TopKLogprobs)
                 else _full_block(s, start, stop, lse.get(id(s))) for s in (ref, q)]
        parts.append(token_bounds(*sides, vocab=vocab,
                                  labels=None if labels is None else labels[start:stop]))
    for s in full:
        if has_llama_rows(s) and n:
            side_lse = np.concatenate(lse[id(s)])
            mask = screen_rows(s, side_lse)
            if mask is not None:
                refuse_corrupt_rows(s, mask, side_lse, instead=None)
    return TopKTokenStats.concat(parts)
