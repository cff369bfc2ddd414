"""Open any supported dump by content, and check that two dumps can be compared."""

from __future__ import annotations

import glob as _glob
import os
import re

import numpy as np

from . import arrow, llama, npy, safetensors
from ._util import file_size, read_prefix
from .base import DumpError, LogitSource
from .shards import ShardedSource

READERS = {
    "llama": llama.LlamaSource,
    "npy": npy.NpySource,
    "safetensors": safetensors.SafetensorsSource,
    "arrow": arrow.ArrowSource,
    "parquet": arrow.ParquetSource,
}
MAGICS = (
    (llama.MAGIC, "llama"),
    (npy.MAGIC, "npy"),
    (arrow.ARROW_MAGIC, "arrow"),
    (arrow.PARQUET_MAGIC, "parquet"),
)
EXTENSIONS = {
    ".kld": "llama",
    ".npy": "npy",
    ".safetensors": "safetensors",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".parquet": "parquet",
}
FORMATS = tuple(READERS)


def detect_format(path: str) -> str:
    """The format of one file, from its first bytes (the extension only when they say
    nothing, so that e.g. a .kld file with a bad magic gets the llama reader's message)."""
    file_size(path)
    head = read_prefix(path, 16)
    for magic, fmt in MAGICS:
        if head.startswith(magic) or (len(head) < len(magic) and magic.startswith(head)):
            return fmt
    if safetensors.looks_like(head):
        return "safetensors"
    if head[:4] == b"\xff\xff\xff\xff":
        raise DumpError(f"{path}: Arrow IPC stream format; write the random-access file format "
                        "(pyarrow.ipc.new_file) instead")
    ext = os.path.splitext(path)[1].lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    raise DumpError(f"{path}: unrecognised format (starts with {head[:8]!r}); expected a llama.cpp "
                    "--kl-divergence-base file, .npy, safetensors, Arrow IPC or Parquet")


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[") and not os.path.exists(path)


def _natural_key(name: str) -> list:
    """Numbers compare as numbers: shard_2 before shard_10 (zero-padded names sort as before)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _check_members(path: str, files: list[str]) -> None:
    """A DumpError for a file that is not a shard like the others: one without a dump
    extension among shards that have one (a `.tmp` or `.part` left by a writer, a README)."""
    known = [os.path.splitext(f)[1].lower() in EXTENSIONS for f in files]
    if any(known) and not all(known):
        odd = files[known.index(False)]
        raise DumpError(f"{path}: {os.path.basename(odd)} is not a logit dump like the other shards "
                        f"(extension {os.path.splitext(odd)[1] or 'none'!r}); move it out or select "
                        "the shards with a glob")


def _duplicate(path: str, numbers: list[int], names: list[str], what: str) -> None:
    seen: dict[int, str] = {}
    for k, name in zip(numbers, names):
        if k in seen:
            raise DumpError(f"{path}: {what} {k} appears twice ({seen[k]} and {name})")
        seen[k] = name


def _check_numbering(path: str, files: list[str]) -> None:
    """A DumpError when numbered shard names show one is missing or doubled: NNNNN-of-MMMMM
    names that do not cover 1..M (or 0..M-1) once each or disagree on M, or names that differ
    only in a number with a gap or a repeat."""
    names = [os.path.basename(f) for f in files]
    of = [re.search(r"(\d+)-of-(\d+)", n) for n in names]
    if all(of):
        totals = sorted({int(m.group(2)) for m in of})
        if len(totals) > 1:
            raise DumpError(f"{path}: shard names disagree on the shard count "
                            f"({', '.join(str(t) for t in totals)})")
        total = totals[0]
        _duplicate(path, [int(m.group(1)) for m in of], names, "shard")
        have = {int(m.group(1)) for m in of}
        want = set(range(total)) if 0 in have else set(range(1, total + 1))
        missing = sorted(want - have)
        if missing:
            raise DumpError(f"{path}: shard {missing[0]} of {total} is missing "
                            f"({len(have & want)} of {total} shards present)")
        extra = sorted(have - want)
        if extra:
            raise DumpError(f"{path}: shard {extra[0]} is outside {min(want)}..{max(want)}, though "
                            f"the names say {total} shards")
        return
    parts = [re.fullmatch(r"(.*?)(\d+)(\D*)", n) for n in names]
    if len(files) < 2 or not all(parts) or len({(m.group(1), m.group(3)) for m in parts}) != 1:
        return
    numbers = [int(m.group(2)) for m in parts]  # in natural order: ascending
    _duplicate(path, numbers, names, "shard number")
    for a, b, name_a, name_b in zip(numbers, numbers[1:], names, names[1:]):
        if b > a + 1:
            raise DumpError(f"{path}: shard numbering jumps from {name_a} to {name_b}: "
                            f"a shard is missing")


def shard_paths(path: str) -> list[str]:
    """The files of a directory or a glob, sorted by name (numbers by value), companions
    and hidden files (temporary outputs) excluded. Refuses numbered shards with a gap or a
    repeat, and files that are not dumps among files that are."""
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if not n.startswith(".")), key=_natural_key)
        files = [os.path.join(path, n) for n in names]
        files = [f for f in files if not os.path.isdir(f)]
    else:
        files = sorted((f for f in _glob.glob(path) if not os.path.isdir(f)), key=_natural_key)
    files = [f for f in files if not npy.is_sibling(f)]
    if not files:
        raise DumpError(f"{path}: no files {'in directory' if os.path.isdir(path) else 'match'}")
    _check_members(path, files)
    _check_numbering(path, files)
    return files


def open_source(path: str | os.PathLike, *, dtype: str | None = None) -> LogitSource:
    """Open a logit dump: a llama.cpp --kl-divergence-base file, .npy, safetensors, Arrow
    IPC or Parquet file, or a directory / glob of shards of one of them (read in sorted
    order). dtype: declare uint16 storage as 'bfloat16' (otherwise read from the file).
    Raises DumpError (a ValueError) naming the file for anything unreadable."""
    path = os.fspath(path)
    if os.path.isdir(path) or _is_glob(path):
        shards = [_open_file(f, dtype) for f in shard_paths(path)]
        return ShardedSource(path, shards)
    return _open_file(path, dtype)


def _open_file(path: str, dtype: str | None) -> LogitSource:
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16", "llama_u16"):
        raise DumpError(f"{path}: unknown dtype {dtype!r}")
    return READERS[detect_format(path)](path, dtype=dtype)


def check_compatible(ref: LogitSource, q: LogitSource) -> None:
    """Raise DumpError naming both files unless ref and q can be compared row by row:
    same vocabulary, same token count, and (when both carry them) the same token ids and the
    same prompt boundaries (prompt ids may be numbered differently; where each prompt starts
    must agree)."""
    both = f"{ref.path} (ref) and {q.path} (q)"
    if ref.vocab != q.vocab:
        raise DumpError(f"{both}: vocabulary mismatch ({ref.vocab} vs {q.vocab} entries)")
    if ref.n_tokens != q.n_tokens:
        raise DumpError(f"{both}: token count mismatch ({ref.n_tokens} vs {q.n_tokens} tokens)")
    if ref.labels is not None and q.labels is not None:
        diff = np.flatnonzero(ref.labels != q.labels)
        if diff.size:
            i = int(diff[0])
            raise DumpError(
                f"{both}: token ids differ, first at token {i} ({int(ref.labels[i])} vs "
                f"{int(q.labels[i])}; {diff.size} of {ref.n_tokens} differ)"
            )
    if ref.prompt_ids is not None and q.prompt_ids is not None and ref.n_tokens > 1:
        starts_ref = ref.prompt_ids[1:] != ref.prompt_ids[:-1]
        starts_q = q.prompt_ids[1:] != q.prompt_ids[:-1]
        diff = np.flatnonzero(starts_ref != starts_q)
        if diff.size:
            i = int(diff[0]) + 1
            which = "ref" if starts_ref[i - 1] else "q"
            raise DumpError(
                f"{both}: prompt boundaries differ, first at token {i} (a new prompt starts there "
                f"in {which} only; {diff.size} boundaries differ)"
            )


def example_paths() -> tuple[str, str]:
    """The bundled example pair (`compare --example`): a llama.cpp reference file and the
    Q4_K_M quantization's file, one 256-token chunk each (127 scored tokens, vocab 8000)."""
    from importlib.resources import files

    root = files("fidelity_kld") / "data" / "example"
    return str(root / "base.kld"), str(root / "q4_k_m.kld")
