"""Token ids given on the command line (--labels, --prompt-ids): read, and checked against the
ids the dumps carry.

A file is a 1-D integer .npy, or text with one integer per line. Anything else is refused
rather than guessed at: a 2-D array or a two-column text file would otherwise be flattened
into ids that belong to no token.
"""

from __future__ import annotations

import warnings

import numpy as np

from ._util import file_size
from .base import DumpError, LogitSource
from .npy import MAGIC, load_ids


def read_ids_file(path: str, what: str) -> np.ndarray:
    """[n] int64 ids from a .npy or a text file; DumpError naming the file otherwise."""
    file_size(path)
    with open(path, "rb") as f:
        is_npy = f.read(len(MAGIC)) == MAGIC
    if is_npy or path.endswith(".npy"):
        ids = load_ids(path, what)
    else:
        ids = _read_text(path, what)
    if ids.dtype.kind not in "iu":
        raise DumpError(f"{path}: {what} must be integers, got {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _read_text(path: str, what: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (and returns nothing) on empty input
            ids = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except UserWarning:
        raise DumpError(f"{path}: no {what} in the file (expected one integer per line)") from None
    except (OSError, ValueError, OverflowError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DumpError(f"{path}: cannot read {what} ({problem}; expected one integer per line)") from None
    if ids.shape[1] != 1:
        raise DumpError(f"{path}: {what} must be one integer per line, found {ids.shape[1]} "
                        "columns")
    return ids[:, 0]


def check_given_labels(path: str, labels: np.ndarray, sources: list[LogitSource],
                       override: bool = False) -> None:
    """Labels from `path` must agree with any the dumps carry, unless `override` says that
    the given ones are meant to replace them."""
    if override:
        return
    for src in sources:
        if src.labels is None or src.labels.shape != labels.shape:
            continue
        diff = np.flatnonzero(src.labels != labels)
        if diff.size:
            i = int(diff[0])
            raise DumpError(
                f"{path}: labels differ from those in {src.path}, first at token {i} "
                f"({int(labels[i])} vs {int(src.labels[i])}; {diff.size} of {labels.size} differ); "
                "pass --override-labels to use the given ones")
