"""Several dumps of one format read in order as one source (a directory or a glob)."""

from __future__ import annotations

import numpy as np

from ..ops import Logits
from .base import DumpError, LogitSource


class ShardedSource(LogitSource):
    """Shards concatenated along tokens. All must share format, vocabulary and dtype; labels
    and prompt ids are kept only if every shard has them (a mix is an error). Prompt ids are
    concatenated as stored (give each shard its own ids if prompts must stay distinct), except
    llama.cpp files' chunk numbers, which continue from one shard to the next.
    read() returns a view when the rows lie in one shard, a copy when they span shards."""

    def __init__(self, path: str, shards: list[LogitSource]):
        if not shards:
            raise DumpError(f"{path}: no shards")
        first = shards[0]
        for s in shards[1:]:
            if s.format != first.format:
                raise DumpError(f"{s.path}: shard is {s.format}, but {first.path} is {first.format}")
            if s.vocab != first.vocab:
                raise DumpError(f"{s.path}: shard has vocabulary {s.vocab}, but {first.path} has {first.vocab}")
            if s.dtype != first.dtype:
                raise DumpError(f"{s.path}: shard dtype is {s.dtype}, but {first.path} is {first.dtype}")
            for attr, what in (("labels", "labels"), ("prompt_ids", "prompt ids")):
                if (getattr(s, attr) is None) != (getattr(first, attr) is None):
                    have, lack = (first, s) if getattr(first, attr) is not None else (s, first)
                    raise DumpError(f"{lack.path}: shard has no {what}, but {have.path} has")
        labels = None if first.labels is None else np.concatenate([s.labels for s in shards])
        prompt_ids = None
        if first.prompt_ids is not None:
            if first.format == "llama":
                # llama.cpp files number their chunks from 0: continue the numbering across
                # shards so chunks of different shards stay different prompts
                ids, offset = [], 0
                for s in shards:
                    ids.append(s.prompt_ids + offset)
                    offset += int(s.prompt_ids.max()) + 1 if s.prompt_ids.size else 0
                prompt_ids = np.concatenate(ids)
            else:
                prompt_ids = np.concatenate([s.prompt_ids for s in shards])
        counts = [s.n_tokens for s in shards]
        super().__init__(
            path=path, format=first.format, n_tokens=sum(counts), vocab=first.vocab, dtype=first.dtype,
            labels=labels, prompt_ids=prompt_ids,
            header={"shards": [{"path": s.path, "n_tokens": s.n_tokens} for s in shards],
                    "first_shard": first.header},
        )
        self.shards = shards
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def bytes_per_token(self) -> int:
        return self.shards[0].bytes_per_token

    def files(self) -> list[str]:
        return [f for s in self.shards for f in s.files()]

    def read(self, start: int, stop: int) -> Logits:
        start, stop = self._check_range(start, stop)
        if start == stop:
            return Logits(self.shards[0].read(0, 0).data, self.dtype, self.vocab)
        i = max(0, int(np.searchsorted(self._starts, start, side="right") - 1))
        parts, row = [], start
        while True:
            s0 = int(self._starts[i])
            s1 = int(self._starts[i + 1])
            take = min(stop, s1)
            parts.append(self.shards[i].read(row - s0, take - s0).data)
            row = take
            if row >= stop:
                break
            i += 1
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return Logits(data, self.dtype, self.vocab)

    def close(self) -> None:
        for s in self.shards:
            s.close()
