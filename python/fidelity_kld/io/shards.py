"""Several dumps of one format read in order as one source (a directory or a glob)."""

from __future__ import annotations

import numpy as np

from ..ops import Logits
from .base import DumpError, LogitSource, release, row_buffer


class ShardedSource(LogitSource):
    """Shards concatenated along tokens. All must share format, vocabulary and dtype; labels
    and prompt ids are kept only if every shard has them (a mix is an error). Prompt ids are
    concatenated as stored (give each shard its own ids if prompts must stay distinct), except
    llama.cpp files' chunk numbers, which continue from one shard to the next.
    A read that spans shards fills one buffer part by part (read_into); the stream cuts its
    chunks at shard boundaries (piece_end) so that it reads views of one shard at a time."""

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

    def piece_end(self, row: int) -> int:
        """The first shard start after `row` (n_tokens in the last shard)."""
        i = int(np.searchsorted(self._starts, row, side="right"))
        return int(self._starts[min(i, len(self._starts) - 1)])

    def read(self, start: int, stop: int) -> Logits:
        return self.read_into(start, stop, None)

    def read_into(self, start: int, stop: int, out: np.ndarray | None) -> Logits:
        """Rows [start, stop): a chunk inside one shard is that shard's read_into; one that
        spans shards is assembled part by part in `out` (a fresh array when out is None),
        never as a concatenation of the parts."""
        start, stop = self._check_range(start, stop)
        if start == stop:
            return self.shards[0].read_into(0, 0, out)
        i = max(0, int(np.searchsorted(self._starts, start, side="right") - 1))
        if stop <= self._starts[i + 1]:
            s0 = int(self._starts[i])
            return self.shards[i].read_into(start - s0, stop - s0, out)
        block, row = None, start
        while row < stop:
            s0, s1 = int(self._starts[i]), int(self._starts[i + 1])
            take = min(stop, s1)
            if take > row:
                block = self._read_part(i, row - s0, take - s0, out, block, row - start, stop - start)
            row = take
            i += 1
        return Logits(block, self.dtype, self.vocab)

    def _read_part(self, i: int, a: int, b: int, out, block, at: int, total: int) -> np.ndarray:
        """Shard i's rows [a, b) placed at row `at` of the [total, ...] block being built."""
        shard = self.shards[i]
        if block is None:  # the first part sets the row layout (llama rows have padding)
            probe = shard.read_into(a, a, None).data
            block = row_buffer(out, total, probe.shape[1:], probe.dtype)
        target = block[at : at + b - a]
        flat = target.reshape(-1).view(np.uint8)
        got = shard.read_into(a, b, flat).data
        if got.shape[1:] != block.shape[1:] or got.dtype != block.dtype:
            raise DumpError(f"{shard.path}: rows are {got.dtype} x {got.shape[1:]}, "
                            f"other shards' {block.dtype} x {block.shape[1:]}")
        if not np.shares_memory(got, target):  # a view of a map, or a reader's own array
            target[...] = got
            release(got)  # the copy is what the core reads: the shard's pages can go
        return block

    def close(self) -> None:
        for s in self.shards:
            s.close()
