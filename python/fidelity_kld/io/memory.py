"""In-memory arrays as a LogitSource (for tests, and to write arrays with `convert`)."""

from __future__ import annotations


from ..ops import Logits, as_logits
from ._util import check_ids
from .base import LogitSource


class ArraySource(LogitSource):
    """A [tokens, vocab] array (numpy float32/float16, uint16 bfloat16 bits with
    dtype='bfloat16', or Logits) with optional labels and prompt ids."""

    def __init__(self, logits, *, dtype: str | None = None, labels=None, prompt_ids=None,
                 path: str = "<array>"):
        lg = as_logits(logits, dtype)
        n = lg.n_tokens
        super().__init__(
            path=path, format="array", n_tokens=n, vocab=lg.vocab, dtype=lg.dtype,
            labels=None if labels is None else check_ids(path, labels, n, "labels"),
            prompt_ids=None if prompt_ids is None else check_ids(path, prompt_ids, n, "prompt_ids"),
            header={},
        )
        self._logits = lg

    def files(self) -> list[str]:
        return []

    def read(self, start: int, stop: int) -> Logits:
        start, stop = self._check_range(start, stop)
        return self._logits.rows(start, stop)
