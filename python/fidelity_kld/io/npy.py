"""`.npy` logit dumps, memory-mapped.

The file holds one C-order [tokens, vocab] matrix of float32 or float16. numpy has no
bfloat16, so bfloat16 logits are stored as uint16 bit patterns and declared either by
``open_source(path, dtype='bfloat16')`` or by a JSON sidecar named after the whole file,
``<name>.npy.json`` holding ``{"dtype": "bfloat16"}`` (the one convention; ``<stem>.json``
is not read, it is too easily some other file).

Optional companions, found by stem (``logits.npy`` -> ``logits.labels.npy``,
``logits.prompt_ids.npy``): 1-D integer arrays of length tokens. The writer produces the
same files, and removes stale companions of a file it replaces.
"""

from __future__ import annotations

import json
import math
import os
import tokenize

import numpy as np

from ._util import STORAGE, AtomicFiles, check_ids, file_size, load_json, logical_dtype
from .base import DumpError, MappedSource

MAGIC = b"\x93NUMPY"
SIBLING_SUFFIXES = (".labels.npy", ".prompt_ids.npy", ".llama_scale_min.npy", ".npy.json")


def siblings(path: str) -> dict[str, str]:
    """Companion file names of a .npy dump: labels, prompt_ids, sidecar."""
    stem = path[:-4] if path.endswith(".npy") else path
    return {
        "labels": stem + ".labels.npy",
        "prompt_ids": stem + ".prompt_ids.npy",
        # [tokens, 2] float32 (scale, min_log_prob) of the llama.cpp rows the file was
        # decoded from (io.conversion)
        "row_headers": stem + ".llama_scale_min.npy",
        "sidecar": path + ".json",
    }


def is_sibling(name: str) -> bool:
    return name.endswith(SIBLING_SUFFIXES)


def read_header(path: str, size: int) -> tuple[tuple, np.dtype, bool, int, tuple[int, int]]:
    """(shape, dtype, fortran_order, data_offset, version) of a .npy file, validated."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            # numpy reads (allocates) as many header bytes as the length field claims, up to
            # 4 GB for versions 2 and 3, before checking it: check the claim against the file.
            if version in ((1, 0), (2, 0), (3, 0)):
                width = 2 if version == (1, 0) else 4
                claimed = int.from_bytes(f.read(width), "little")
                if 8 + width + claimed > size:
                    raise DumpError(f"{path}: truncated in the .npy header (header length says "
                                    f"{claimed} bytes, file has {size})")
                f.seek(8)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise DumpError(f"{path}: unsupported .npy version {version}")
            offset = f.tell()
    except DumpError:
        raise
    except OSError as e:
        raise DumpError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, SyntaxError, EOFError, tokenize.TokenError, RecursionError,
            MemoryError, TypeError) as e:
        # (numpy tokenizes the header: an unterminated bracket raises TokenError; it parses
        # it with ast.literal_eval: deep nesting raises RecursionError or MemoryError, and
        # it sorts the dict's keys: a bytes key beside str ones raises TypeError)
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        if size < 10 or "EOF" in problem or "truncat" in problem.lower():
            raise DumpError(f"{path}: truncated in the .npy header ({size} bytes)") from None
        raise DumpError(f"{path}: bad .npy header ({problem})") from None
    _check_shape(path, shape, dtype)
    return shape, dtype, fortran, offset, version


def _check_shape(path: str, shape: tuple, dtype: np.dtype) -> None:
    """Sizes numpy would take on trust: a negative dimension (np.load raises OverflowError or
    makes a nonsense array) or one whose byte count no file and no ssize_t can hold."""
    if any(d < 0 for d in shape):
        raise DumpError(f"{path}: .npy header has a negative dimension in shape {tuple(shape)}")
    if math.prod(shape) * max(dtype.itemsize, 1) >= 2**63 or any(d >= 2**63 for d in shape):
        raise DumpError(f"{path}: .npy header shape {tuple(shape)} claims 2^63 bytes or more")


class NpySource(MappedSource):
    """A memory-mapped .npy matrix (reads: see MappedSource)."""

    def __init__(self, path: str, *, dtype: str | None = None):
        size = file_size(path)
        with open(path, "rb") as f:
            if f.read(6) != MAGIC:
                raise DumpError(f"{path}: bad magic (expected {MAGIC!r}): not a .npy file")
        shape, storage, fortran, offset, version = read_header(path, size)
        if storage.hasobject:
            raise DumpError(f"{path}: object arrays are not logit dumps")
        if len(shape) != 2:
            raise DumpError(f"{path}: shape {tuple(shape)} is not 2-D [tokens, vocab]")
        n, v = int(shape[0]), int(shape[1])
        if n <= 0 or v <= 0:
            raise DumpError(f"{path}: shape {tuple(shape)} holds no logits")
        if fortran:
            raise DumpError(f"{path}: Fortran-order (column-major) array; rows must be contiguous "
                            "(save np.ascontiguousarray(x))")
        sib = siblings(path)
        sidecar = None
        if os.path.exists(sib["sidecar"]):
            sidecar = _read_sidecar(sib["sidecar"])
        declared = dtype if dtype is not None else (sidecar or {}).get("dtype")
        logical = logical_dtype(path, storage, declared)
        if storage.byteorder == ">":
            raise DumpError(f"{path}: big-endian {storage} data is not supported")
        need = offset + n * v * storage.itemsize
        if size < need:
            raise DumpError(f"{path}: truncated: header says {n}x{v} {storage} ({need} bytes in all), file has {size}")
        if size > need:
            raise DumpError(f"{path}: {size - need} extra bytes after the {n}x{v} {storage} data")
        labels = _read_ids(sib["labels"], n, "labels")
        prompt_ids = _read_ids(sib["prompt_ids"], n, "prompt_ids")
        super().__init__(
            path=path, format="npy", n_tokens=n, vocab=v, dtype=logical,
            labels=labels, prompt_ids=prompt_ids,
            header={"npy_version": f"{version[0]}.{version[1]}", "storage_dtype": str(storage),
                    "data_offset": offset, "shape": [n, v],
                    "sidecar": sib["sidecar"] if sidecar is not None else None},
        )
        self._companions = [p for k, p in sib.items() if os.path.exists(p) and
                            (k != "sidecar" or sidecar is not None)]
        self._data = np.memmap(path, dtype=STORAGE[logical], mode="r", offset=offset, shape=(n, v))

    def files(self) -> list[str]:
        return [self.path, *self._companions]



def _read_sidecar(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)  # {"dtype": "bfloat16"}: anything longer is not a sidecar
    except OSError as e:
        raise DumpError(f"{path}: unreadable dtype sidecar ({e.strerror})") from None
    meta = load_json(path, raw, "dtype sidecar")
    if not isinstance(meta, dict) or meta.get("dtype") not in ("bfloat16", "float16", "float32"):
        raise DumpError(f"{path}: dtype sidecar must be {{\"dtype\": \"bfloat16\"}}")
    return meta


def _read_ids(path: str, n: int, what: str) -> np.ndarray | None:
    if not os.path.exists(path):
        return None
    return check_ids(path, load_ids(path, what), n, what)


def load_ids(path: str, what: str) -> np.ndarray:
    """A 1-D integer .npy companion (labels, prompt ids), its header checked before np.load."""
    size = file_size(path)
    # np.load allocates what the header claims before reading: check the claim first.
    shape, storage, _, offset, _ = read_header(path, size)
    need = offset + math.prod(shape) * storage.itemsize
    if size < need:
        raise DumpError(f"{path}: truncated {what}: header says {tuple(shape)} {storage} "
                        f"({need} bytes in all), file has {size}")
    if len(shape) != 1:
        raise DumpError(f"{path}: {what} must be 1-D, got shape {tuple(shape)}")
    if storage.kind not in "iu":
        raise DumpError(f"{path}: {what} must be integers, got {storage}")
    try:
        ids = np.load(path, mmap_mode=None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DumpError(f"{path}: unreadable {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return ids


class NpyWriter:
    """Streams a [n_tokens, vocab] matrix into `path` (plus companions), atomically."""

    def __init__(self, path: str, files: AtomicFiles, *, n_tokens: int, vocab: int, dtype: str,
                 labels: np.ndarray | None, prompt_ids: np.ndarray | None,
                 metadata: dict | None = None, row_headers: bool = False):
        self.path, self.vocab, self.dtype = path, vocab, dtype
        self._expected = n_tokens
        self._written = 0
        self._files = files
        self._tmp = files.new(path)
        sib = siblings(path)
        # the matrix was registered first, so commit() moves it into place last; stale
        # companions (which would now describe the wrong matrix) are removed after commit
        self._stale = []
        for key, arr in (("labels", labels), ("prompt_ids", prompt_ids)):
            if arr is None:
                self._stale.append(sib[key])
            else:
                with open(files.new(sib[key]), "wb") as f:
                    np.save(f, np.asarray(arr, dtype=np.int64))
        self._row_headers = [] if row_headers else None
        self._row_header_path = files.new(sib["row_headers"]) if row_headers else None
        if not row_headers:
            self._stale.append(sib["row_headers"])
        if dtype == "bfloat16" or metadata:
            with open(files.new(sib["sidecar"]), "w", encoding="utf-8") as f:
                json.dump({"dtype": dtype, **(metadata or {})}, f)
        else:
            self._stale.append(sib["sidecar"])
        self._f = open(self._tmp, "wb")
        np.lib.format.write_array_header_1_0(
            self._f, {"descr": np.lib.format.dtype_to_descr(STORAGE[dtype]),
                      "fortran_order": False, "shape": (n_tokens, vocab)})

    def write(self, block: np.ndarray, row_header: np.ndarray | None = None) -> None:
        self._f.write(np.ascontiguousarray(block, dtype=STORAGE[self.dtype]).data)
        self._written += block.shape[0]
        if self._row_headers is not None:
            self._row_headers.append(np.asarray(row_header, dtype="<f4"))

    def finish(self) -> None:
        self._f.close()
        if self._written != self._expected:
            raise DumpError(f"{self.path}: wrote {self._written} rows, expected {self._expected}")
        if self._row_headers is not None:
            with open(self._row_header_path, "wb") as f:
                np.save(f, np.concatenate(self._row_headers).reshape(-1, 2))

    def after_commit(self) -> None:
        for p in self._stale:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

