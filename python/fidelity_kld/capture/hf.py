"""Hugging Face transformers: run a reference and a quantized (or lower-precision) causal
LM over the same token batches and feed an Accumulator, batch by batch, without keeping
logits; optionally also write both models' logits to dumps for `fidelity-kld compare`.

    from fidelity_kld.capture import hf
    acc = hf.compare_models(ref_model, quant_model, hf.token_batches(sequences, batch_size=8))
    print(acc.summary().kld.mean)

Conventions (the same as every dump): the logits at position t are the model's next-token
distribution after tokens 0..t, and their label is the token at t+1. A batch's positions
are scored when the context token and the target token are both real (attention_mask 1)
and the target is not -100 in the batch's `labels` (the transformers loss convention, so a
batch built for training can be passed as it is). Left padding works: position ids are
derived from the attention mask, as generate() does.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..stats.summary import Accumulator
from .dump import DumpWriter

IGNORE_INDEX = -100  # transformers' "no loss here" label


def token_batches(sequences: Sequence[Sequence[int]], *, batch_size: int = 8,
                  prompt_ids: Sequence[int] | None = None, pad_token_id: int = 0,
                  padding_side: str = "right", score_from: Sequence[int] | None = None
                  ) -> Iterator[dict[str, Any]]:
    """Pad token sequences into batches of dicts (input_ids, attention_mask, prompt_ids,
    and labels when `score_from` is given) that compare_models() takes.

    prompt_ids: one per sequence (default 0, 1, 2, ...). score_from[i]: the first token of
    sequence i that is scored as a label (earlier tokens are context only).
    """
    import torch

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    ids = list(range(len(sequences))) if prompt_ids is None else list(prompt_ids)
    if len(ids) != len(sequences):
        raise ValueError(f"{len(ids)} prompt ids for {len(sequences)} sequences")
    if score_from is not None and len(score_from) != len(sequences):
        raise ValueError(f"{len(score_from)} score_from entries for {len(sequences)} sequences")
    for start in range(0, len(sequences), batch_size):
        seqs = [list(s) for s in sequences[start:start + batch_size]]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(seqs):
            off = width - len(s) if padding_side == "left" else 0
            input_ids[row, off:off + len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, off:off + len(s)] = 1
            if score_from is not None:
                first = int(score_from[start + row])
                labels[row, off + first:off + len(s)] = input_ids[row, off + first:off + len(s)]
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "prompt_ids": torch.tensor(ids[start:start + batch_size], dtype=torch.long)}
        if score_from is not None:
            batch["labels"] = labels
        yield batch


def model_logits(model, input_ids, attention_mask=None):
    """[B, T, V] logits of a causal LM, on the model's device, without autograd. With
    padding, position ids count real tokens only (what generate() passes)."""
    import torch

    device = _model_device(model)
    input_ids = torch.as_tensor(input_ids).to(device)
    kwargs = {}
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).to(device)
        kwargs["attention_mask"] = attention_mask
        if not bool(attention_mask.all()) and _accepts(model, "position_ids"):
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False, **kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


def scored_positions(input_ids, attention_mask=None, labels=None):
    """(keep [B, T-1] bool, targets [B, T-1]) for logits[:, :-1] (CPU tensors)."""
    import torch

    input_ids = torch.as_tensor(input_ids).cpu()
    targets = (input_ids if labels is None else torch.as_tensor(labels).cpu())[:, 1:]
    keep = targets != IGNORE_INDEX
    if attention_mask is not None:
        real = torch.as_tensor(attention_mask).cpu().bool()
        keep &= real[:, :-1] & real[:, 1:]
    return keep, targets


def select_rows(logits, keep):
    """logits[:, :-1] at the kept positions, as [N, V] (index_select: no device sync)."""
    import torch

    b, t, v = logits.shape
    idx = torch.from_numpy(np.flatnonzero(keep.numpy().reshape(-1))).to(logits.device)
    return logits[:, :-1].reshape(b * (t - 1), v).index_select(0, idx)


def compare_models(ref_model, q_model, batches: Iterable, *, accumulator: Accumulator | None = None,
                   ref_dump: DumpWriter | str | None = None, q_dump: DumpWriter | str | None = None,
                   dump_dtype: str = "float32", device: str = "auto",
                   on_batch=None, ref_topk_dump=None, q_topk_dump=None, k: int = 64) -> Accumulator:
    """Run both models over each batch and add their next-token logits to an Accumulator.

    batches: dicts (or mappings) with input_ids [B, T] and optionally attention_mask [B, T],
    labels [B, T] (-100 = not scored; default: input_ids) and prompt_ids [B] (or [B, T]).
    The models may sit on different devices; the quantized model's logits are moved to the
    reference's device. device: where the statistics are computed ('auto': the GPU when the
    logits are CUDA tensors, via fidelity_kld.gpu; 'cpu' copies them to the host first).
    ref_dump / q_dump: a path or DumpWriter to also store each model's scored logits (with
    labels and prompt ids) in `dump_dtype`; paths are closed here, writers left open.
    on_batch(ref_rows, q_rows, labels, prompt_ids): called with each batch's scored rows.
    ref_topk_dump / q_topk_dump: paths for top-k log-prob dumps (fidelity_kld.io.topk) of
    each model with `k` entries per row, written beside (or instead of) the full dumps.
    Returns the accumulator (a new one unless given).
    """
    acc = accumulator if accumulator is not None else Accumulator()
    owned = []
    dumps = []
    for d in (ref_dump, q_dump):
        if isinstance(d, (str, bytes)) or hasattr(d, "__fspath__"):
            d = DumpWriter(d, dtype=dump_dtype)
            owned.append(d)
        dumps.append(d)
    for d in (ref_topk_dump, q_topk_dump):
        if d is not None:
            from ..io.topk import TopKDumpWriter

            d = TopKDumpWriter(d, k)
            owned.append(d)
        dumps.append(d)
    try:
        for batch in batches:
            ref_rows, q_rows, labels, pids = batch_rows(ref_model, q_model, batch)
            if ref_rows.shape[0] == 0:
                continue
            if device == "cpu":
                ref_rows, q_rows = ref_rows.cpu(), q_rows.cpu()
            acc.add(ref_rows, q_rows, labels, prompt_ids=pids, device=device)
            for d, rows in zip(dumps, (ref_rows, q_rows, ref_rows, q_rows)):
                if d is not None:
                    d.write(rows, labels, pids)
            if on_batch is not None:
                on_batch(ref_rows, q_rows, labels, pids)
        for d in owned:
            d.close()
    except BaseException:
        for d in owned:
            d.abort()
        raise
    return acc


def batch_rows(ref_model, q_model, batch):
    """(ref_rows [N, V], q_rows [N, V] on ref_rows' device, labels [N] int64 numpy,
    prompt_ids [N] numpy or None) for one batch: both models' scored next-token logits."""
    import torch

    input_ids = torch.as_tensor(_get(batch, "input_ids"))
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    mask = _get(batch, "attention_mask")
    keep, targets = scored_positions(input_ids, mask, _get(batch, "labels"))
    ref_rows = select_rows(model_logits(ref_model, input_ids, mask), keep)
    q_rows = select_rows(model_logits(q_model, input_ids, mask), keep).to(ref_rows.device)
    if ref_rows.shape[-1] != q_rows.shape[-1]:
        raise ValueError(f"vocabulary mismatch: reference logits have {ref_rows.shape[-1]} "
                         f"entries, quantized {q_rows.shape[-1]}")
    flat_keep = keep.numpy().reshape(-1)
    labels = targets.numpy().reshape(-1)[flat_keep].astype(np.int64)
    pids = _get(batch, "prompt_ids")
    if pids is not None:
        pids = np.asarray(pids.cpu() if hasattr(pids, "cpu") else pids)
        b, t = input_ids.shape
        if pids.shape == (b,):
            pids = np.repeat(pids, t - 1)
        elif pids.shape == (b, t):
            pids = pids[:, 1:]  # the target token's prompt
        else:
            raise ValueError(f"prompt_ids must be [batch] or [batch, seq], got shape {pids.shape}")
        pids = pids.reshape(-1)[flat_keep]
    return ref_rows, q_rows, labels, pids


def fake_quantize_weights(model, bits: int, *, include_lm_head: bool = True):
    """Round every nn.Linear weight to `bits`-bit integers, in place: symmetric, one scale
    per output channel (max |w| / (2^(bits-1) - 1)), round to nearest, stored back in the
    weight's dtype. A stand-in for real quantizers in tests and sanity checks; embeddings,
    norms, biases and non-Linear projections (GPT-2's Conv1D) are left alone. Returns the
    model."""
    import torch

    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if not include_lm_head and name.split(".")[-1] == "lm_head":
                continue
            w = module.weight
            wf = w.float()
            scale = wf.abs().amax(dim=1, keepdim=True) / qmax
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            w.copy_((torch.clamp(torch.round(wf / scale), -qmax, qmax) * scale).to(w.dtype))
    return model


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token (Llama's, GPT-2's) its EOS token as pad token, so
    that `tokenizer(texts, padding=True)` works; padded positions are masked out of every
    statistic by the attention mask. Returns the tokenizer."""
    if getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_chunks(tokenizer, text: str, ctx: int, *, max_chunks: int | None = None) -> list[list[int]]:
    """llama-perplexity's evaluation chunks: the text tokenized once, cut into consecutive
    pieces of `ctx` tokens (a partial last piece is dropped), each starting with the BOS token
    when the tokenizer has one (llama.cpp replaces the first token the same way)."""
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2 tokens, got {ctx}")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    bos = getattr(tokenizer, "bos_token_id", None)
    chunks = []
    for c in range(n):
        chunk = ids[c * ctx:(c + 1) * ctx]
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def capture_logits(model, chunks: Sequence[Sequence[int]], out, *, batch_size: int = 4,
                   dump_dtype: str = "float32", on_batch=None, top_k: int | None = None,
                   source: str | None = None) -> int:
    """Write the model's next-token logits at every position of each chunk but the last
    (labels: the next tokens; prompt ids: chunk numbers) to the dump `out` (.npy or
    .safetensors), for a later `fidelity-kld compare`. top_k: write instead a top-k log-prob
    dump (fidelity_kld.io.topk, Parquet) of that many entries per row, formed from the full
    rows in float64; source: what its metadata names as the rows' origin. Returns the rows
    written; the file appears only when complete."""
    if top_k is not None:
        from ..io.topk import TopKDumpWriter

        dump = TopKDumpWriter(out, top_k, source=source)
    else:
        dump = DumpWriter(out, dtype=dump_dtype)
    rows = 0
    try:
        for batch in token_batches(chunks, batch_size=batch_size):
            logits = model_logits(model, batch["input_ids"], batch["attention_mask"])
            keep, targets = scored_positions(batch["input_ids"], batch["attention_mask"])
            kept = select_rows(logits, keep)
            flat_keep = keep.numpy().reshape(-1)
            labels = targets.numpy().reshape(-1)[flat_keep]
            width = batch["input_ids"].shape[1]
            pids = np.repeat(batch["prompt_ids"].numpy(), width - 1)[flat_keep]
            dump.write(kept, labels, pids)
            rows += kept.shape[0]
            if on_batch is not None:
                on_batch(rows)
    except BaseException:
        dump.abort()
        raise
    dump.close()  # no rows: an error, and nothing is left behind
    return rows


def _get(batch, key):
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return batch[key] if key in batch else None
    return getattr(batch, key, None)


def _model_device(model):
    dev = getattr(model, "device", None)
    if dev is not None:
        return dev
    return next(model.parameters()).device


def _accepts(model, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
