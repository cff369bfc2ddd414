"""Hugging Face transformers: capture a causal LM's final hidden states (the input of its
lm_head, i.e. after the last norm) at the scored positions, into a hidden-state dump
(fidelity_kld.io.hidden) that `fidelity-kld compare` scores through the lm_head.

    from fidelity_kld.capture import hf, hf_hidden
    hf_hidden.write_hidden_dump(model, hf.token_batches(seqs), "ref.hidden.safetensors",
                                lm_head_path="/models/ref")   # or store_lm_head=True

A forward pre-hook on model.get_output_embeddings() records its input; the positions kept
are those capture.hf scores (same rule, same labels and prompt ids), so a hidden-state dump
and a full-logit dump of one run hold the same rows in the same order.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..io.hidden import write_hidden
from .hf import _get, model_logits, scored_positions, select_rows


def hidden_rows(model, batch):
    """(hidden [N, H] float32 numpy, labels [N], prompt_ids [N] or None) for one batch."""
    import torch

    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embeddings (lm_head) to hook")
    seen = []
    handle = head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        input_ids = torch.as_tensor(_get(batch, "input_ids"))
        mask = _get(batch, "attention_mask")
        model_logits(model, input_ids, mask)
    finally:
        handle.remove()
    if len(seen) != 1 or seen[0].shape[:2] != input_ids.shape:
        raise ValueError("the lm_head did not see one [batch, seq, hidden] input: "
                         "cannot capture hidden states from this model")
    keep, targets = scored_positions(input_ids, mask, _get(batch, "labels"))
    rows = select_rows(seen[0], keep).float().cpu().numpy()
    flat = keep.numpy().reshape(-1)
    labels = targets.numpy().reshape(-1)[flat].astype(np.int64)
    pids = _get(batch, "prompt_ids")
    if pids is not None:
        pids = np.asarray(pids.cpu() if hasattr(pids, "cpu") else pids)
        b, t = input_ids.shape
        pids = (np.repeat(pids, t - 1) if pids.shape == (b,) else pids[:, 1:]).reshape(-1)[flat]
    return rows, labels, pids


def write_hidden_dump(model, batches: Iterable, path, *, lm_head_path: str | None = None,
                      store_lm_head: bool = False) -> str:
    """Run `model` over `batches` (capture.hf's batch dicts) and write its final hidden
    states at the scored positions to `path`, with labels and prompt ids. The lm_head is
    stored in the dump (store_lm_head) or named by lm_head_path (the model's directory);
    the config's logit_scale / final_logit_softcapping are recorded."""
    parts = [hidden_rows(model, b) for b in batches]
    hidden = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    pids = None if any(p[2] is None for p in parts) else np.concatenate([p[2] for p in parts])
    head = model.get_output_embeddings()
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    weight = bias = None
    if store_lm_head:
        weight = head.weight.detach().float().cpu().numpy()
        if getattr(head, "bias", None) is not None:
            bias = head.bias.detach().float().cpu().numpy()
    elif lm_head_path is None:
        raise ValueError("give lm_head_path (the model's directory) or store_lm_head=True")
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return write_hidden(path, hidden, labels=labels, prompt_ids=pids, lm_head=weight,
                        lm_head_bias=bias, lm_head_path=lm_head_path,
                        logit_scale=float(getattr(cfg, "logit_scale", None) or 1.0),
                        softcap=getattr(cfg, "final_logit_softcapping", None),
                        lm_head_tensor="model.embed_tokens.weight" if tied else "lm_head.weight")
