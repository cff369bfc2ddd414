"""One check for every command that writes: no output may be the same file as an input (a
dump, its shards, its companion labels / prompt ids / dtype sidecar, a --labels file, a
manifest) or as another output. It runs before anything is read, so a refused command has
touched nothing.

Same file: os.path.samefile when both exist (hard links, symlinks, ./x vs x), else the same
real path (two outputs that do not exist yet).
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from .base import DumpError


def input_files(path: str | os.PathLike) -> list[str]:
    """The files a dump path reads: the file or the shards of a directory / glob, and each
    .npy file's companions that exist."""
    from .npy import siblings
    from .open import _is_glob, shard_paths

    path = os.fspath(path)
    files = shard_paths(path) if os.path.isdir(path) or _is_glob(path) else [path]
    out = []
    for f in files:
        out.append(f)
        if f.endswith(".npy"):
            out += [p for p in siblings(f).values() if os.path.exists(p)]
    return out


def written_files(path: str, npy_companions: bool = False) -> list[str]:
    """What writing `path` creates or replaces: the file, and for a .npy dump its companions."""
    from .npy import siblings

    return [path, *siblings(path).values()] if npy_companions else [path]


def same_file(a: str, b: str) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def inside(path: str, directory: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def check_outputs(outputs: Mapping[str, Iterable[str] | str | None],
                  inputs: Iterable[str | os.PathLike], *,
                  directories: Mapping[str, str | None] | None = None) -> None:
    """DumpError naming the output unless every output is a file of its own.

    outputs: option name (e.g. '--output') -> the path it writes, or the list of paths it
    writes (None: not given). inputs: dump paths (expanded to shards and companions) and
    plain input files. directories: option name -> a directory the command replaces as a
    whole (`cohort --report`): no input and no other output may lie inside it."""
    inputs = [os.fspath(p) for p in inputs if p is not None]
    for flag, directory in (directories or {}).items():
        if directory is None:
            continue
        for path in [*inputs, *(p for p in outputs.values() if isinstance(p, (str, os.PathLike)))]:
            if inside(os.fspath(path), directory):
                raise DumpError(f"{directory}: {flag} replaces this directory, which holds {path}")
    written = []
    for flag, paths in outputs.items():
        if paths is None:
            continue
        for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            written.append((flag, os.fspath(p)))
    if not written:
        return
    read = [f for path in inputs for f in input_files(path)]
    for flag, out in written:
        for f in read:
            if same_file(out, f):
                raise DumpError(f"{out}: {flag} would overwrite the input {f}")
    for i, (flag_a, a) in enumerate(written):
        for flag_b, b in written[i + 1:]:
            if same_file(a, b):
                both = flag_a if flag_a == flag_b else f"{flag_a} and {flag_b}"
                raise DumpError(f"{a}: written by both {both}: one output would overwrite the other")
