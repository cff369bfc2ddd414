"""Streaming conversion between dump formats (for `fidelity-kld convert`).

Rows are read, cast and written chunk by chunk (about 64 MB of output per chunk), into
temporary files in the destination directory that replace the destination only once
everything is written; on any error (or KeyboardInterrupt) the temporary files are removed.
A llama.cpp file is decoded to float32 log-probabilities (docs/formats.md's decode) and its
labels and prompt ids (chunk indices) are written alongside. The output says what its values
are in its metadata (VALUES_KEY = "log_probs", DECODING_KEY: the llama.cpp decoding) and, in
float32, keeps each row's (scale, min_log_prob) pair, so that `llama_rows(source)` can give
`compare` the exact llama.cpp rows back: a converted file is compared under the same
definitions, with the same results, as the file it came from.
"""

from __future__ import annotations

import os

import numpy as np

from ..ops import Logits
from ._util import RAW_DTYPES, STORAGE, AtomicFiles, f32_to_bf16, to_float32
from .arrow import ArrowWriter, ParquetWriter
from .base import DumpError, LogitSource
from .llama import decode_rows
from .npy import NpyWriter
from .open import EXTENSIONS
from .paths import check_outputs, written_files
from .safetensors import ROW_HEADER_NAME, SafetensorsWriter

WRITERS = {
    "npy": NpyWriter,
    "safetensors": SafetensorsWriter,
    "arrow": ArrowWriter,
    "parquet": ParquetWriter,
}
# The readers' extensions, for the formats there is a writer for (not llama.cpp's .kld).
OUTPUT_EXTENSIONS = {ext: fmt for ext, fmt in EXTENSIONS.items() if fmt in WRITERS}
CHUNK_BYTES = 64 << 20
VALUES_KEY = "fidelity_kld.values"
DECODING_KEY = "fidelity_kld.decoding"
LLAMA_DECODING = ("llama.cpp --kl-divergence-base: log p = scale*u + min_log_prob in float32, "
                  "not renormalised; per-row (scale, min_log_prob) in llama_scale_min")
LLAMA_DECODING_LOSSY = ("llama.cpp --kl-divergence-base log-probs, not renormalised, rounded to "
                        "{dtype}: the llama.cpp rows cannot be restored")


def output_format(path: str, to: str | None = None) -> str:
    """The format to write: `to` if given, else from the extension of `path`."""
    if to is not None:
        if to not in WRITERS:
            raise DumpError(f"{path}: cannot write format {to!r} (choose from {', '.join(WRITERS)})")
        return to
    ext = os.path.splitext(path)[1].lower()
    if ext not in OUTPUT_EXTENSIONS:
        raise DumpError(f"{path}: cannot tell the output format from the extension {ext or '(none)'!r}; "
                        f"use .npy, .safetensors, .arrow or .parquet, or say --to")
    return OUTPUT_EXTENSIONS[ext]


def cast_block(lg: Logits, out_dtype: str, row0: int = 0, path: str = "") -> np.ndarray:
    """Logits -> [rows, vocab] array in the storage of `out_dtype` (uint16 for bfloat16).
    Same dtype: the stored values unchanged. float16 output refuses finite values that
    would overflow to inf (they would silently change every statistic)."""
    if lg.dtype == out_dtype:
        return lg.data
    x = decode_rows(lg.data, lg.vocab) if lg.dtype == "llama_u16" else to_float32(lg.data, lg.dtype)
    if out_dtype == "float32":
        return x
    if out_dtype == "bfloat16":
        return f32_to_bf16(x)
    with np.errstate(over="ignore"):
        y = x.astype(np.float16)
    over = np.isinf(y) & np.isfinite(x)
    if over.any():
        r, c = (int(v[0]) for v in np.nonzero(over))
        raise DumpError(f"{path}: value {x[r, c]:g} at token {row0 + r}, entry {c} overflows float16")
    return y


def convert(src: LogitSource, out: str | os.PathLike, *, to: str | None = None,
            dtype: str | None = None, rows_per_chunk: int | None = None,
            progress=None) -> str:
    """Write `src` to `out` in format `to` (default: from out's extension) with logits in
    `dtype` (default: the source's; float32 for a llama.cpp file). progress: called with a
    fidelity_kld.stream.Progress after each chunk. Returns the format."""
    import time

    from ..stream import Progress

    out = os.fspath(out)
    if os.path.isdir(out):
        raise DumpError(f"{out}: is a directory; give an output file name")
    fmt = output_format(out, to)
    src = llama_rows(src)  # a converted llama.cpp file converts as the llama.cpp file would
    out_dtype = dtype or ("float32" if src.dtype == "llama_u16" else src.dtype)
    if out_dtype not in RAW_DTYPES:
        raise DumpError(f"{out}: cannot write dtype {out_dtype!r} (choose from {', '.join(RAW_DTYPES)})")
    check_outputs({"the output": written_files(out, fmt == "npy")}, src.files())
    if rows_per_chunk is None:
        rows_per_chunk = max(1, CHUNK_BYTES // (src.vocab * STORAGE[out_dtype].itemsize))
    files = AtomicFiles()
    writer = None
    from_llama = src.dtype == "llama_u16"
    keep_rows = from_llama and out_dtype == "float32"
    extra = {}
    if from_llama:
        extra = dict(metadata={VALUES_KEY: "log_probs", DECODING_KEY: LLAMA_DECODING if keep_rows
                               else LLAMA_DECODING_LOSSY.format(dtype=out_dtype)},
                     row_headers=keep_rows)
    try:
        writer = WRITERS[fmt](out, files, n_tokens=src.n_tokens, vocab=src.vocab, dtype=out_dtype,
                              labels=src.labels, prompt_ids=src.prompt_ids, **extra)
        t0, bytes_read = time.perf_counter(), 0
        for start, lg in src.chunks(rows_per_chunk):
            block = cast_block(lg, out_dtype, start, src.path)
            if keep_rows:
                writer.write(block, row_header_of(lg.data))
            else:
                writer.write(block)
            bytes_read += lg.data.nbytes
            if progress is not None:
                progress(Progress(start + lg.n_tokens, src.n_tokens, bytes_read,
                                  time.perf_counter() - t0))
        writer.finish()
        files.commit()
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # the original error matters, not the cleanup's
                pass
        files.abort()
        raise
    writer.after_commit()
    return fmt


def row_header_of(rows: np.ndarray) -> np.ndarray:
    """[n, 2] float32 (scale, min_log_prob) of raw llama.cpp rows."""
    return np.ascontiguousarray(np.asarray(rows, dtype=np.uint16)[:, :4]).view("<f4")


def metadata_of(src: LogitSource) -> dict:
    """The key/value metadata a dump carries: safetensors __metadata__, Arrow/Parquet schema
    metadata, a .npy file's JSON sidecar."""
    header = src.header
    if "metadata" in header:
        return dict(header["metadata"])
    if "schema_metadata" in header:
        return dict(header["schema_metadata"])
    sidecar = header.get("sidecar")
    if sidecar:
        import json

        with open(sidecar, encoding="utf-8") as f:
            return json.load(f)
    return {}


def values_of(src: LogitSource) -> str:
    """'log_probs' for llama.cpp log-probs (a llama.cpp file or its conversion), else 'logits'."""
    if src.dtype == "llama_u16":
        return "log_probs"
    return metadata_of(src).get(VALUES_KEY, "logits")


def _read_row_headers(src: LogitSource) -> np.ndarray | None:
    """The stored [n, 2] (scale, min_log_prob) of a converted llama.cpp file, or None."""
    from .npy import siblings

    n = src.n_tokens
    if src.format == "safetensors":
        t = src.header["tensors"].get(ROW_HEADER_NAME)
        if t is None:
            return None
        if t["dtype"] != "F32" or t["shape"] != [n, 2]:
            raise DumpError(f"{src.path}: {ROW_HEADER_NAME} must be F32 [{n}, 2], got {t['dtype']} {t['shape']}")
        return np.fromfile(src.path, dtype="<f4", count=2 * n,
                           offset=src.header["data_start"] + t["data_offsets"][0]).reshape(n, 2)
    if src.format == "npy":
        path = siblings(src.path)["row_headers"]
        if not os.path.exists(path):
            return None
        arr = np.load(path, allow_pickle=False)
    elif src.format in ("arrow", "parquet"):
        from .arrow import ROW_HEADER_COLUMN

        import pyarrow.ipc as ipc
        import pyarrow.parquet as pq

        if src.format == "parquet":
            if ROW_HEADER_COLUMN not in pq.read_schema(src.path).names:
                return None
            col = pq.read_table(src.path, columns=[ROW_HEADER_COLUMN]).column(0)
        else:
            table = ipc.open_file(src.path).read_all()
            if ROW_HEADER_COLUMN not in table.column_names:
                return None
            col = table.column(ROW_HEADER_COLUMN)
        arr = np.concatenate([c.flatten().to_numpy() for c in col.chunks]) if col.num_chunks else np.zeros(0)
    else:
        return None
    arr = np.asarray(arr, dtype="<f4").reshape(-1)
    if arr.size != 2 * n:
        raise DumpError(f"{src.path}: {arr.size // 2} llama.cpp row headers for {n} tokens")
    return arr.reshape(n, 2)


class LlamaRowsSource(LogitSource):
    """A float32 conversion of a llama.cpp file read back as the llama.cpp rows it came from
    (dtype 'llama_u16'): each code is recovered as round((x - min_log_prob) / scale), and the
    row is checked to decode to exactly the stored values, so the core sees the original."""

    def __init__(self, inner: LogitSource, row_headers: np.ndarray):
        from .llama import row_words

        super().__init__(path=inner.path, format=inner.format, n_tokens=inner.n_tokens,
                         vocab=inner.vocab, dtype="llama_u16", labels=inner.labels,
                         prompt_ids=inner.prompt_ids,
                         header={**inner.header, "values": "log_probs", "restored_from": "float32",
                                 "row_words": row_words(inner.vocab)})
        self.inner, self.row_headers = inner, row_headers
        self._words = row_words(inner.vocab)

    @property
    def bytes_per_token(self) -> int:
        return self.inner.bytes_per_token

    def files(self) -> list[str]:
        return self.inner.files()

    def read(self, start: int, stop: int) -> Logits:
        start, stop = self._check_range(start, stop)
        x = np.asarray(self.inner.read(start, stop).data, dtype=np.float32)
        head = self.row_headers[start:stop]
        scale, low = head[:, 0:1], head[:, 1:2]
        rows = np.zeros((stop - start, self._words), np.uint16)
        rows[:, :4] = np.ascontiguousarray(head).view(np.uint16)
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.where(scale > 0, np.rint((x.astype(np.float64) - low) / scale), 0.0)
        if codes.size and (codes.min() < 0 or codes.max() > 65535):
            raise DumpError(f"{self.path}: values outside their stored llama.cpp row range")
        rows[:, 4:4 + self.vocab] = codes
        bad = np.flatnonzero((decode_rows(rows, self.vocab) != x).any(axis=1))
        if bad.size:
            raise DumpError(f"{self.path}: token {start + int(bad[0])} does not decode from its stored "
                            f"llama.cpp scale and minimum ({bad.size} such tokens): edited after conversion?")
        return Logits(rows, "llama_u16", self.vocab)

    def close(self) -> None:
        self.inner.close()


def llama_rows(src: LogitSource) -> LogitSource:
    """`src` as llama.cpp rows when it is a float32 conversion of a llama.cpp file (so that it
    is compared under llama.cpp's definitions, exactly as the original), else `src`."""
    if src.dtype != "float32" or values_of(src) != "log_probs":
        return src
    if getattr(src, "shards", None):
        from .shards import ShardedSource

        return ShardedSource(src.path, [llama_rows(s) for s in src.shards])
    headers = _read_row_headers(src)
    return src if headers is None else LlamaRowsSource(src, headers)
