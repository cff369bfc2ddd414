"""Score hidden-state dumps (fidelity_kld.io.hidden) through their lm_heads: logits are
recomputed in tiles of T tokens x the whole vocabulary (the fused core needs whole rows to
form each row's log-sum-exp once), T chosen so that all models' tiles together stay under
`tile_bytes`, and each tile goes straight to the fused core (ops.compare_many), so at most
one tile of logits per model is ever held: peak memory is the lm_heads plus
(1 + models) * T * V * 4 bytes, whatever the number of tokens.

CPU: the product is numpy's matmul (its BLAS: OpenBLAS sgemm in the wheels) in float32,
written into one preallocated tile per model. --device cuda: torch's matmul on the GPU
and the GPU core (Triton / CUDA extension) on the resulting CUDA tensors.

Each side uses its own lm_head (a quantized lm_head is part of what is measured) unless
shared_lm_head: then the reference's head scores every model's hidden states.
"""

from __future__ import annotations

import numpy as np

from .io.base import DumpError
from .io.hidden import HiddenDump, LmHead
from .ops import TokenStats, compare_many

TILE_BYTES = 256 << 20


def apply_head(h: np.ndarray, head: LmHead, out: np.ndarray) -> np.ndarray:
    """out[:] = softcap(scale * (h @ W.T + b)) in float32 (h [T, H], out [T, V])."""
    np.matmul(h, head.weight.T, out=out)
    if head.bias is not None:
        out += head.bias
    if head.logit_scale != 1.0:
        out *= np.float32(head.logit_scale)
    if head.softcap:
        cap = np.float32(head.softcap)
        out /= cap
        np.tanh(out, out=out)
        out *= cap
    return out


def _labels(ref: HiddenDump, qs: list[HiddenDump]):
    labels = ref.labels
    for q in qs:
        if q.n_tokens != ref.n_tokens:
            raise DumpError(f"{q.path}: {q.n_tokens} hidden-state rows, but {ref.path} has {ref.n_tokens}")
        if labels is not None and q.labels is not None and not np.array_equal(labels, q.labels):
            i = int(np.flatnonzero(labels != q.labels)[0])
            raise DumpError(f"{q.path}: label {int(q.labels[i])} at row {i}, but {ref.path} has "
                            f"{int(labels[i])}: the dumps do not score the same tokens")
        if labels is None:
            labels = q.labels
    return labels


def heads_for(ref: HiddenDump, qs: list[HiddenDump], *, shared_lm_head: bool = False,
              lm_head: str | None = None, q_lm_heads: list[str | None] | None = None) -> list[LmHead]:
    """[reference head, head of each quant]: each dump's own (or the model given), or the
    reference's for all with shared_lm_head. DumpError if a vocabulary differs."""
    ref_head = ref.lm_head(lm_head)
    q_lm_heads = q_lm_heads or [None] * len(qs)
    heads = [ref_head]
    for q, where in zip(qs, q_lm_heads):
        if shared_lm_head:
            if q.hidden_size != ref_head.hidden:
                raise DumpError(f"{q.path}: hidden size {q.hidden_size}, but the reference's lm_head "
                                f"({ref_head.source}) has {ref_head.hidden}")
            heads.append(ref_head)
        else:
            heads.append(q.lm_head(where))
        if heads[-1].vocab != ref_head.vocab:
            raise DumpError(f"{q.path}: vocabulary {heads[-1].vocab}, but {ref.path}'s lm_head has {ref_head.vocab}")
    return heads


def compare_hidden(ref: HiddenDump, qs: list[HiddenDump], heads: list[LmHead], *,
                   tile_bytes: int = TILE_BYTES, threads: int | None = None,
                   device: str = "cpu", progress=None, start: int = 0,
                   stop: int | None = None) -> list[TokenStats]:
    """Per-token statistics (ops.TokenStats, KL(P_ref || P_q) in nats) of each quant's
    hidden states against the reference's, recomputed through `heads` tile by tile.
    start, stop: only rows [start, stop), in tiles from `start` (a distributed run puts
    start on the tile grid, so that each tile holds the rows it holds in a whole run)."""
    labels = _labels(ref, qs)
    vocab = heads[0].vocab
    rows = max(1, int(tile_bytes) // ((1 + len(qs)) * vocab * 4))
    stop = ref.n_tokens if stop is None else stop
    if device == "cuda":
        return _compare_hidden_cuda(ref, qs, heads, labels, rows, start, stop)
    tiles = [np.empty((rows, vocab), np.float32) for _ in heads]
    parts: list[list[TokenStats]] = [[] for _ in qs]
    for first in range(start, stop, rows):
        last = min(first + rows, stop)
        n = last - first
        ref_logits = apply_head(ref.rows(first, last), heads[0], tiles[0][:n])
        q_logits = [apply_head(q.rows(first, last), head, tile[:n])
                    for q, head, tile in zip(qs, heads[1:], tiles[1:])]
        y = None if labels is None else labels[first:last]
        for acc, st in zip(parts, compare_many(ref_logits, q_logits, y, threads=threads)):
            acc.append(st)
        if progress is not None:
            progress(last, ref.n_tokens)
    return [TokenStats.concat(p) for p in parts]


def _compare_hidden_cuda(ref, qs, heads, labels, rows, start, stop):
    import torch

    from .ops import compare

    dev = torch.device("cuda")
    on_gpu = {}
    for h in heads:
        if id(h) not in on_gpu:
            on_gpu[id(h)] = (torch.from_numpy(h.weight).to(dev),
                             None if h.bias is None else torch.from_numpy(h.bias).to(dev))

    def logits(dump, head, start, stop):
        w, b = on_gpu[id(head)]
        x = torch.from_numpy(dump.rows(start, stop)).to(dev, non_blocking=True) @ w.T
        if b is not None:
            x += b
        if head.logit_scale != 1.0:
            x *= head.logit_scale
        if head.softcap:
            x = head.softcap * torch.tanh(x / head.softcap)
        return x

    parts: list[list[TokenStats]] = [[] for _ in qs]
    for first in range(start, stop, rows):
        last = min(first + rows, stop)
        a = logits(ref, heads[0], first, last)
        y = None if labels is None else labels[first:last]
        for j, (q, head) in enumerate(zip(qs, heads[1:])):
            parts[j].append(compare(a, logits(q, head, first, last), y, device="cuda"))
    return [TokenStats.concat(p) for p in parts]
