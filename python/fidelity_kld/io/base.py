"""The reader interface every logit-dump format implements.

A LogitSource is opened once, validated eagerly (so a corrupt file fails before any work
starts, with an error naming the file), then streamed in row chunks that feed the compiled
core directly (zero-copy views of a memory map where the format allows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..ops import Logits


class DumpError(ValueError):
    """A logit dump is malformed or does not match its partner. The message names the file."""


@dataclass
class LogitSource:
    """One logit dump (or a set of shards read in order).

    n_tokens, vocab: the matrix shape; dtype: 'float32' | 'float16' | 'bfloat16' | 'llama_u16';
    labels / prompt_ids: [n_tokens] int64 or None (small; read eagerly);
    header: format-specific fields for `fidelity-kld info`.
    """

    path: str
    format: str
    n_tokens: int
    vocab: int
    dtype: str
    labels: np.ndarray | None = None
    prompt_ids: np.ndarray | None = None
    header: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A label outside the vocabulary would otherwise surface mid-run from the core,
        # without the file's name.
        if self.labels is not None and self.labels.size:
            bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.vocab))
            if bad.size:
                i = int(bad[0])
                raise DumpError(f"{self.path}: label {int(self.labels[i])} at token {i} is outside "
                                f"the vocabulary [0, {self.vocab}) ({bad.size} such labels)")

    @property
    def bytes_per_token(self) -> int:
        return self.vocab * {"float64": 8, "float32": 4}.get(self.dtype, 2)

    def read(self, start: int, stop: int) -> Logits:
        """Rows [start, stop) as Logits (a view where possible)."""
        raise NotImplementedError

    def files(self) -> list[str]:
        """Every file this source reads (for sizes on disk); shards and sidecars included."""
        return [self.path]

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"{self.path}: rows [{start}, {stop}) outside [0, {self.n_tokens})")
        return start, stop

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, format={self.format!r}, "
                f"n_tokens={self.n_tokens}, vocab={self.vocab}, dtype={self.dtype!r}, "
                f"labels={self.labels is not None}, prompt_ids={self.prompt_ids is not None})")

    def chunks(self, rows_per_chunk: int) -> Iterator[tuple[int, Logits]]:
        for start in range(0, self.n_tokens, rows_per_chunk):
            stop = min(start + rows_per_chunk, self.n_tokens)
            yield start, self.read(start, stop)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MappedSource(LogitSource):
    """A source whose rows are one memory-mapped [n_tokens, row] array, set by the subclass's
    __init__ as self._data: read() returns views of it, close() drops the map."""

    _data: np.ndarray | None = None

    def read(self, start: int, stop: int) -> Logits:
        start, stop = self._check_range(start, stop)
        if self._data is None:
            raise DumpError(f"{self.path}: source is closed")
        return Logits(self._data[start:stop], self.dtype, self.vocab)

    def close(self) -> None:
        self._data = None
