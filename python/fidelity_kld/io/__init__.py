"""Readers and writers for logit dumps. `open_source(path)` picks the reader by content.

    from fidelity_kld.io import open_source, check_compatible
    with open_source("base.kld") as ref, open_source("q4.parquet") as q:
        check_compatible(ref, q)
        for start, lg in ref.chunks(4096): ...   # Logits: copies (pread) for files; the
                                                 # stream (stream.py) reads views via read_into

Formats: llama.cpp --kl-divergence-base (io.llama), .npy (io.npy), safetensors
(io.safetensors), Arrow IPC and Parquet (io.arrow), directories/globs of shards (io.shards).
"""

from .base import DumpError, LogitSource
from .conversion import convert
from .memory import ArraySource
from .open import FORMATS, check_compatible, detect_format, example_paths, open_source

__all__ = [
    "ArraySource",
    "DumpError",
    "FORMATS",
    "LogitSource",
    "check_compatible",
    "convert",
    "detect_format",
    "example_paths",
    "open_source",
]
