"""llama-cpp-python: full next-token logits of a GGUF model over token sequences, written
to the dump formats (or fed to an Accumulator against a second model).

The model must be created with every position's logits kept:

    from llama_cpp import Llama
    llm = Llama(model_path="model-F16.gguf", logits_all=True, n_ctx=4096, n_batch=512)
    tokens = llm.tokenize(text.encode(), add_bos=True)
    llama_cpp.write_dump(llm, [tokens], "ref.safetensors")

Row j of a sequence is the distribution after tokens[0..j] and its label is tokens[j+1];
`first` skips rows whose context is too short to mean much (llama-perplexity scores only
positions n_ctx/2 .. n_ctx-2 of each chunk). What is used of the Llama object: reset(),
eval(tokens), scores ([n_ctx, n_vocab] float32, rows 0..n_tokens-1 valid after eval with
logits_all), n_vocab(), n_ctx() and context_params.logits_all; llama_cpp is never imported.

llama.cpp's own files instead: `llama-perplexity -m model-F16.gguf -f text.txt -c 512
--kl-divergence-base base.kld` writes the reference's log-probs (uint16-quantized, see
docs/formats.md) and `... -m model-Q4_K_M.gguf --kl-divergence-base q4.kld` (same text, same
-c) a quant's; `fidelity-kld compare base.kld q4.kld` reads both.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..stats.summary import Accumulator
from .dump import DumpWriter


def _check(llm) -> None:
    params = getattr(llm, "context_params", None)
    if params is not None and not getattr(params, "logits_all", True):
        raise ValueError("the Llama object keeps only the last position's logits: create it with "
                         "Llama(..., logits_all=True)")


def sequence_logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """[len(tokens), n_vocab] float32 logits (a copy): row j after tokens[0..j]."""
    _check(llm)
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("an empty token sequence has no logits")
    n_ctx = int(llm.n_ctx())
    if len(tokens) > n_ctx:
        raise ValueError(f"sequence of {len(tokens)} tokens exceeds the context ({n_ctx}); "
                         "split it, or create the Llama with a larger n_ctx")
    llm.reset()
    llm.eval(tokens)
    n = int(llm.n_tokens)
    if n != len(tokens):
        raise RuntimeError(f"llama.cpp evaluated {n} tokens of {len(tokens)}")
    scores = np.asarray(llm.scores)
    if scores.shape[0] < n or scores.shape[1] != int(llm.n_vocab()):
        raise ValueError(f"llm.scores has shape {scores.shape} for {n} tokens and "
                         f"{int(llm.n_vocab())} vocabulary entries: was it created with logits_all=True?")
    return np.array(scores[:n], dtype=np.float32, copy=True)


def scored_rows(llm, tokens: Sequence[int], first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n-1-first, V], labels [n-1-first]): rows first .. n-2 and their next tokens."""
    logits = sequence_logits(llm, tokens)
    tokens = np.asarray(tokens, dtype=np.int64)
    if not 0 <= first < len(tokens) - 1:
        raise ValueError(f"first={first} leaves no scored rows in a sequence of {len(tokens)} tokens")
    return logits[first:-1], tokens[first + 1:]


def write_dump(llm, sequences: Iterable[Sequence[int]], path, *, dtype: str = "float32",
               prompt_ids: Sequence[int] | None = None, first: int = 0) -> int:
    """Write the scored rows of every sequence (labels = next tokens, prompt ids = the
    sequence's, default 0, 1, ...) to a .npy or .safetensors dump. Returns rows written."""
    with DumpWriter(path, dtype=dtype) as w:
        for i, tokens in enumerate(sequences):
            rows, labels = scored_rows(llm, tokens, first)
            pid = i if prompt_ids is None else prompt_ids[i]
            w.write(rows, labels, np.full(len(labels), pid, dtype=np.int64))
        return w.n_tokens


def write_topk_dump(llm, sequences: Iterable[Sequence[int]], path, k: int, *,
                    prompt_ids: Sequence[int] | None = None, first: int = 0) -> int:
    """Like write_dump, but a top-k log-prob dump (fidelity_kld.io.topk, with the tail mass
    and floor computed from the full rows, so the KLD upper bound is finite). Returns rows."""
    from ..io.topk import TopKDumpWriter

    w = TopKDumpWriter(path, k, source="llama-cpp-python")
    try:
        for i, tokens in enumerate(sequences):
            rows, labels = scored_rows(llm, tokens, first)
            pid = i if prompt_ids is None else prompt_ids[i]
            w.write(rows, labels, np.full(len(labels), pid, dtype=np.int64))
    except BaseException:
        w.abort()
        raise
    w.close()
    return w.n_rows


def compare_models(ref_llm, q_llm, sequences: Iterable[Sequence[int]], *,
                   accumulator: Accumulator | None = None,
                   prompt_ids: Sequence[int] | None = None, first: int = 0) -> Accumulator:
    """Both models over the same sequences, one at a time, into an Accumulator (the two
    may be one Llama object each; only one sequence's logits are held at a time)."""
    acc = accumulator if accumulator is not None else Accumulator()
    for i, tokens in enumerate(sequences):
        ref_rows, labels = scored_rows(ref_llm, tokens, first)
        q_rows, _ = scored_rows(q_llm, tokens, first)
        pid = i if prompt_ids is None else prompt_ids[i]
        acc.add(ref_rows, q_rows, labels, prompt_ids=np.full(len(labels), pid, dtype=np.int64))
    return acc
