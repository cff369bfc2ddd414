"""Helpers shared by the readers and writers: file checks, dtype conversions, atomic output."""

from __future__ import annotations

import json
import os

import numpy as np

from .._atomic import default_mode, make_temp
from .base import DumpError

# storage numpy dtype of each logical logit dtype (bfloat16 crosses numpy as uint16 bits)
STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
           "float64": np.dtype("<f8")}
# the dtypes dumps are written in (float64 is read, and computed accurately, not written)
RAW_DTYPES = ("float32", "float16", "bfloat16")


def file_size(path: str) -> int:
    """Size of a regular file; DumpError naming it if it is missing, not a file or empty."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DumpError(f"{path}: no such file") from None
    except OSError as e:
        raise DumpError(f"{path}: cannot read ({e.strerror})") from None
    if os.path.isdir(path):
        raise DumpError(f"{path}: is a directory")
    if st.st_size == 0:
        raise DumpError(f"{path}: empty file (0 bytes)")
    return st.st_size


def read_prefix(path: str, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise DumpError(f"{path}: cannot read ({e.strerror})") from None


def logical_dtype(path: str, storage: np.dtype, declared: str | None, what: str = "logits") -> str:
    """The logical dtype of stored logits: float32/float16 as stored, uint16 only when declared
    bfloat16 (numpy and Arrow have no bfloat16)."""
    storage = np.dtype(storage)
    if storage.kind == "f" and storage.itemsize in (2, 4, 8):
        name = {2: "float16", 4: "float32", 8: "float64"}[storage.itemsize]
        if declared not in (None, name):
            raise DumpError(f"{path}: {what} are stored as {name}, not {declared}")
        return name
    if storage.kind == "u" and storage.itemsize == 2:
        if declared == "bfloat16":
            return "bfloat16"
        raise DumpError(
            f"{path}: {what} are uint16; declare bfloat16 bit patterns (dtype='bfloat16', "
            "a sidecar or schema metadata) or store float32/float16"
        )
    raise DumpError(f"{path}: unsupported {what} dtype {storage} (expected float32, float16, "
                    "bfloat16 or float64)")


def check_ids(path: str, ids: np.ndarray, n_tokens: int, what: str) -> np.ndarray:
    """Validate a label / prompt-id vector and return it as int64."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise DumpError(f"{path}: {what} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.shape[0] != n_tokens:
        raise DumpError(f"{path}: {what} has {ids.shape[0]} entries for {n_tokens} tokens")
    if ids.dtype.kind not in "iu":
        raise DumpError(f"{path}: {what} must be integers, got {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)  # keep sign, force quiet
    return rounded


def load_json(path: str, text: str | bytes, what: str):
    """json.loads that refuses duplicate keys (the last would silently win) and turns deep
    nesting (RecursionError) into a DumpError naming the file."""
    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise DumpError(f"{path}: duplicate key {key!r} in the {what}")
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise DumpError(f"{path}: {what} is nested too deeply to be one") from None
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, DumpError):
            raise
        raise DumpError(f"{path}: bad {what} ({e})") from None


def to_float32(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return bf16_to_f32(data)
    return np.asarray(data, dtype=np.float32)


class AtomicFiles:
    """Output files written under temporary names in their destination directory, moved into
    place together by commit() (the first file registered last, so it appears only when its
    companions already have) or removed by abort()."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, str]] = []

    def new(self, final: str) -> str:
        final = os.path.abspath(final)
        directory = os.path.dirname(final)
        if not os.path.isdir(directory):
            raise DumpError(f"{final}: directory {directory} does not exist")
        tmp = make_temp(final)
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> None:
        mode = default_mode()
        for tmp, final in reversed(self._pending):
            os.chmod(tmp, mode)  # mkstemp makes 0600 files; give the usual permissions
            os.replace(tmp, final)
        self._pending.clear()

    def abort(self) -> None:
        for tmp, _ in self._pending:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._pending.clear()

