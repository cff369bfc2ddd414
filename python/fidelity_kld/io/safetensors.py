"""safetensors logit dumps, memory-mapped, parsed here (no safetensors dependency).

Layout: u64 little-endian header length N, N bytes of JSON (possibly space-padded),
then the data buffer; each tensor's ``data_offsets`` [begin, end) are relative to the
buffer start (byte 8 + N). Tensors read: ``logits`` (F32, F16, BF16; 2-D [tokens, vocab]),
optional ``labels`` (or ``token_ids``) and ``prompt_ids`` (1-D I32/I64, length tokens).
"""

from __future__ import annotations

import json
import math

import numpy as np

from ._util import STORAGE, AtomicFiles, check_ids, file_size, load_json, logical_dtype, read_prefix
from .base import DumpError, MappedSource

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit too

DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"), "U16": np.dtype("<u2"),
    "I8": np.dtype("i1"), "U8": np.dtype("u1"), "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
}
LOGICAL_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
LABEL_NAMES = ("labels", "token_ids")
# [tokens, 2] float32 (scale, min_log_prob) of the llama.cpp rows a file was decoded from
# (io.conversion writes and reads it)
ROW_HEADER_NAME = "llama_scale_min"


def looks_like(prefix: bytes) -> bool:
    """A safetensors file starts with a u64 length and then '{'."""
    if len(prefix) < 9:
        return False
    n = int.from_bytes(prefix[:8], "little")
    return 2 <= n <= MAX_HEADER and prefix[8:9] == b"{"


def read_header(path: str) -> tuple[dict, dict, int, int]:
    """(tensors, metadata, data_start, file_size) with every tensor entry validated."""
    size = file_size(path)
    if size < 8:
        raise DumpError(f"{path}: truncated in the header length ({size} of 8 bytes)")
    n = int.from_bytes(read_prefix(path, 8), "little")
    if n > MAX_HEADER:
        raise DumpError(f"{path}: header length {n} is implausible (limit {MAX_HEADER}): not a safetensors file?")
    if 8 + n > size:
        raise DumpError(f"{path}: truncated in the JSON header: header length says {n} bytes, file has {size - 8} after it")
    raw = read_prefix(path, 8 + n)[8:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DumpError(f"{path}: bad safetensors JSON header ({e})") from None
    header = load_json(path, text, "safetensors JSON header")
    if not isinstance(header, dict):
        raise DumpError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    buffer_len = size - data_start
    tensors = {}
    for name, t in header.items():
        if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= t.keys():
            raise DumpError(f"{path}: tensor {name!r} lacks dtype/shape/data_offsets")
        dt, shape, offs = t["dtype"], t["shape"], t["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise DumpError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise DumpError(f"{path}: tensor {name!r} has bad data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end:
            raise DumpError(f"{path}: tensor {name!r} has bad data_offsets [{begin}, {end}]")
        if end > buffer_len:
            raise DumpError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size}")
        if dt in DTYPES:
            need = math.prod(shape) * DTYPES[dt].itemsize
            if end - begin != need:
                raise DumpError(f"{path}: tensor {name!r}: {dt} {shape} needs {need} bytes, data_offsets span {end - begin}")
        tensors[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [begin, end]}
    _check_no_overlap(path, tensors)
    return tensors, meta, data_start, size


def _check_no_overlap(path: str, tensors: dict) -> None:
    """Two tensors sharing bytes would read each other's data (the format forbids it)."""
    spans = sorted((t["data_offsets"][0], t["data_offsets"][1], name) for name, t in tensors.items()
                   if t["data_offsets"][1] > t["data_offsets"][0])
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise DumpError(f"{path}: tensors {name_a!r} and {name_b!r} overlap (bytes "
                            f"{begin_b}..{end_a} of the data buffer belong to both)")


class SafetensorsSource(MappedSource):
    """The `logits` tensor of a safetensors file, memory-mapped."""

    def __init__(self, path: str, *, dtype: str | None = None):
        tensors, meta, data_start, size = read_header(path)
        if "logits" not in tensors:
            raise DumpError(f"{path}: no 'logits' tensor (has: {', '.join(sorted(tensors)) or 'none'})")
        t = tensors["logits"]
        if t["dtype"] not in DTYPES:
            raise DumpError(f"{path}: unsupported logits dtype {t['dtype']} (expected F32, F16, BF16 or F64)")
        storage = DTYPES[t["dtype"]]
        declared = "bfloat16" if t["dtype"] == "BF16" and dtype is None else dtype
        if t["dtype"] == "BF16" and dtype not in (None, "bfloat16"):
            raise DumpError(f"{path}: logits are stored as bfloat16, not {dtype}")
        logical = logical_dtype(path, storage, declared)
        if len(t["shape"]) != 2:
            raise DumpError(f"{path}: logits shape {t['shape']} is not 2-D [tokens, vocab]")
        n, v = t["shape"]
        if n == 0 or v == 0:
            raise DumpError(f"{path}: logits shape {t['shape']} holds no logits")
        labels = None
        for name in LABEL_NAMES:
            if name in tensors:
                labels = self._ids(path, tensors[name], name, data_start, n)
                break
        prompt_ids = self._ids(path, tensors["prompt_ids"], "prompt_ids", data_start, n) if "prompt_ids" in tensors else None
        super().__init__(
            path=path, format="safetensors", n_tokens=n, vocab=v, dtype=logical,
            labels=labels, prompt_ids=prompt_ids,
            header={"tensors": tensors, "metadata": meta, "data_start": data_start},
        )
        self._data = np.memmap(path, dtype=STORAGE[logical], mode="r",
                               offset=data_start + t["data_offsets"][0], shape=(n, v))

    @staticmethod
    def _ids(path, t, name, data_start, n):
        dt = DTYPES.get(t["dtype"])
        if dt is None or dt.kind not in "iu":
            raise DumpError(f"{path}: tensor {name!r} must be integer (I32/I64), got {t['dtype']}")
        if len(t["shape"]) != 1:
            raise DumpError(f"{path}: tensor {name!r} must be 1-D, got shape {t['shape']}")
        count = t["shape"][0]
        if count != n:
            raise DumpError(f"{path}: tensor {name!r} has {count} entries for {n} tokens")
        ids = np.fromfile(path, dtype=dt, count=count, offset=data_start + t["data_offsets"][0])
        return check_ids(path, ids, n, name)



class SafetensorsWriter:
    """Streams logits (then labels, prompt_ids as I64, and with row_headers the [tokens, 2]
    F32 tensor ROW_HEADER_NAME) into a safetensors file; `metadata` joins __metadata__."""

    def __init__(self, path: str, files: AtomicFiles, *, n_tokens: int, vocab: int, dtype: str,
                 labels: np.ndarray | None, prompt_ids: np.ndarray | None,
                 metadata: dict | None = None, row_headers: bool = False):
        self.path, self.dtype = path, dtype
        self._expected, self._written = n_tokens, 0
        self._tail = [(k, np.ascontiguousarray(a, dtype="<i8")) for k, a in
                      (("labels", labels), ("prompt_ids", prompt_ids)) if a is not None]
        self._row_headers = [] if row_headers else None
        header, offset = {}, 0
        nbytes = n_tokens * vocab * STORAGE[dtype].itemsize
        header["logits"] = {"dtype": LOGICAL_TO_ST[dtype], "shape": [n_tokens, vocab], "data_offsets": [0, nbytes]}
        offset = nbytes
        for name, arr in self._tail:
            header[name] = {"dtype": "I64", "shape": [arr.shape[0]], "data_offsets": [offset, offset + arr.nbytes]}
            offset += arr.nbytes
        if row_headers:
            header[ROW_HEADER_NAME] = {"dtype": "F32", "shape": [n_tokens, 2],
                                       "data_offsets": [offset, offset + 8 * n_tokens]}
        header["__metadata__"] = {"format": "fidelity_kld.logits", **(metadata or {})}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # keeps the data buffer 8-byte aligned
        self._f = open(files.new(path), "wb")
        self._f.write(len(blob).to_bytes(8, "little"))
        self._f.write(blob)

    def write(self, block: np.ndarray, row_header: np.ndarray | None = None) -> None:
        self._f.write(np.ascontiguousarray(block, dtype=STORAGE[self.dtype]).data)
        self._written += block.shape[0]
        if self._row_headers is not None:
            self._row_headers.append(np.ascontiguousarray(row_header, dtype="<f4"))

    def finish(self) -> None:
        if self._written != self._expected:
            raise DumpError(f"{self.path}: wrote {self._written} rows, expected {self._expected}")
        for _, arr in self._tail:
            self._f.write(arr.data)
        for arr in self._row_headers or ():
            self._f.write(arr.data)
        self._f.close()

    def after_commit(self) -> None:
        pass

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
