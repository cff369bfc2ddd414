"""Streaming conversion between dump formats (for `fidelity-kld convert`).

Rows are read, cast and written chunk by chunk (about 64 MB of output per chunk), into
temporary files in the destination directory that replace the destination only once
everything is written; on any error (or KeyboardInterrupt) the temporary files are removed.
A llama.cpp file is decoded to float32 log-probabilities (FORMATS.md's decode) and its
labels and prompt ids (chunk indices) are written alongside.
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
from .safetensors import SafetensorsWriter

WRITERS = {
    "npy": NpyWriter,
    "safetensors": SafetensorsWriter,
    "arrow": ArrowWriter,
    "parquet": ParquetWriter,
}
# The readers' extensions, for the formats there is a writer for (not llama.cpp's .kld).
OUTPUT_EXTENSIONS = {ext: fmt for ext, fmt in EXTENSIONS.items() if fmt in WRITERS}
CHUNK_BYTES = 64 << 20


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
            dtype: str | None = None, rows_per_chunk: int | None = None) -> str:
    """Write `src` to `out` in format `to` (default: from out's extension) with logits in
    `dtype` (default: the source's; float32 for a llama.cpp file). Returns the format."""
    out = os.fspath(out)
    if os.path.isdir(out):
        raise DumpError(f"{out}: is a directory; give an output file name")
    fmt = output_format(out, to)
    out_dtype = dtype or ("float32" if src.dtype == "llama_u16" else src.dtype)
    if out_dtype not in RAW_DTYPES:
        raise DumpError(f"{out}: cannot write dtype {out_dtype!r} (choose from {', '.join(RAW_DTYPES)})")
    check_outputs({"the output": written_files(out, fmt == "npy")}, src.files())
    if rows_per_chunk is None:
        rows_per_chunk = max(1, CHUNK_BYTES // (src.vocab * STORAGE[out_dtype].itemsize))
    files = AtomicFiles()
    writer = None
    try:
        writer = WRITERS[fmt](out, files, n_tokens=src.n_tokens, vocab=src.vocab, dtype=out_dtype,
                              labels=src.labels, prompt_ids=src.prompt_ids)
        for start, lg in src.chunks(rows_per_chunk):
            writer.write(cast_block(lg, out_dtype, start, src.path))
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
