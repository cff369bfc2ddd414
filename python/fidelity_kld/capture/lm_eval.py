"""lm-evaluation-harness: per-prompt fidelity on the exact requests an lm-eval run scored,
keyed by the harness's own (task, doc_id), so the cohort analysis lines it up with the
per-sample outcomes of `--log_samples`.

The recipe (docs/harness.md has it in full):

1. Run lm-eval on the reference and on each quantized model with `--log_samples`
   (its samples_<task>_<date>.jsonl files are the outcomes: stats.outcomes reads them).
2. Read the requests back from the reference run's samples (`read_requests`), run both
   models over them (`harness_fidelity`, through capture.hf) and write the per-prompt
   table (`HarnessFidelity.write_per_prompt`): Parquet with task, prompt_id (= doc_id),
   kld_mean, ... - what a cohort manifest's `per_prompt` takes.

No lm_eval import: the samples file is the interface. Requests are tokenized the way
lm-eval's HFLM does it (`_encode_pair`: trailing spaces of the context move to the
continuation; the continuation's tokens are the whole string's tokens after the context's;
an empty context is replaced by the BOS, else EOS, token), so with score="continuation"
the reference's summed log-probabilities equal the `resps` lm-eval logged for it
(`HarnessFidelity.loglikelihoods`; tests check this against a real lm-eval run).

What is scored for each request kind:
- loglikelihood (multiple choice, ...): context + each choice; "continuation" scores the
  choice's tokens, "all" every token after the first (a shared context once per choice).
- generate_until: context + the generation logged in `resps` (take the samples of the
  reference run, so both models are teacher-forced on the reference's answer). The text is
  re-tokenized, which may split it differently from the tokens the model generated.
- loglikelihood_rolling (perplexity tasks): the whole text after a BOS/EOS prefix, as one
  sequence (no windowing: documents longer than the model's context are the caller's job).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..stats.per_prompt import COLUMNS, per_prompt
from ..stats.summary import Accumulator, Summary

SCORE_MODES = ("continuation", "all")


@dataclass(frozen=True)
class Request:
    """One model call an lm-eval sample made: (context, continuation) text."""

    task: str
    doc_id: Any
    index: int  # position among the doc's requests (gen_args_<index>)
    kind: str  # 'loglikelihood', 'generate_until' or 'loglikelihood_rolling'
    context: str
    continuation: str
    logged: Any = None  # resps[index] as logged (loglikelihood: [logprob, is_greedy])


@dataclass(frozen=True)
class TokenizedRequest:
    request: Request
    context_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]

    @property
    def tokens(self) -> list[int]:
        return [*self.context_ids, *self.continuation_ids]


def _task_from_name(path: Path) -> str | None:
    from ..stats.outcomes import LM_EVAL_SAMPLES

    m = LM_EVAL_SAMPLES.match(path.name)
    return m["task"] if m else None


def _lines(path: Path):
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {lineno}: not JSON ({e.msg})") from None


def _arguments(args, where: str) -> list[list]:
    """lm-eval's logged `arguments`: {"gen_args_0": {"arg_0": ..., "arg_1": ...}, ...}
    (0.4.3 and later) or [[arg_0, arg_1], ...] (earlier)."""
    if isinstance(args, dict):
        out = []
        for i in range(len(args)):
            one = args.get(f"gen_args_{i}")
            if not isinstance(one, dict):
                raise ValueError(f"{where}: arguments lack gen_args_{i}")
            out.append([one[f"arg_{j}"] for j in range(len(one))])
        return out
    if isinstance(args, list):
        return [list(a) if isinstance(a, (list, tuple)) else [a] for a in args]
    raise ValueError(f"{where}: cannot read arguments of type {type(args).__name__}")


def read_requests(path, *, task: str | None = None) -> list[Request]:
    """The requests of an lm-eval `--log_samples` file (samples_<task>_<date>.jsonl[.gz]),
    or of every samples file in a directory. One Request per (doc, gen_args_i); a doc
    logged once per filter (gsm8k's strict-match and flexible-extract) is read once."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _task_from_name(p))
        if not files:
            raise ValueError(f"{path}: no samples_<task>_<date>.jsonl files here")
        return [r for p in files for r in read_requests(p)]
    task = task or _task_from_name(path)
    if task is None:
        raise ValueError(f"{path}: not named samples_<task>_<date>.jsonl; give the task")
    out: list[Request] = []
    seen: dict[str, list] = {}
    for lineno, rec in _lines(path):
        where = f"{path}: line {lineno}"
        if not isinstance(rec, dict) or "doc_id" not in rec or "arguments" not in rec:
            raise ValueError(f"{where}: no doc_id/arguments (is this an lm-eval samples file?)")
        args = _arguments(rec["arguments"], where)
        key = json.dumps(rec["doc_id"])
        if key in seen:
            if seen[key] != args:
                raise ValueError(f"{where}: doc_id {rec['doc_id']} logged twice with different arguments")
            continue
        seen[key] = args
        resps = rec.get("resps") or []
        for i, a in enumerate(args):
            logged = resps[i] if i < len(resps) else None
            if len(a) == 1:
                kind, context, cont = "loglikelihood_rolling", "", a[0]
            elif isinstance(a[1], dict):
                kind, context = "generate_until", a[0]
                gen = logged[0] if isinstance(logged, list) and logged else logged
                if not isinstance(gen, str):
                    raise ValueError(f"{where}: generate_until request {i} has no logged generation")
                cont = gen
            else:
                kind, context, cont = "loglikelihood", a[0], a[1]
            if not isinstance(context, str) or not isinstance(cont, str):
                raise ValueError(f"{where}: request {i} is not (context, continuation) text")
            out.append(Request(task, rec["doc_id"], i, kind, context, cont,
                               logged[0] if kind == "loglikelihood" and isinstance(logged, list)
                               and logged and isinstance(logged[0], list) else logged))
    return out


class Encoder:
    """lm-eval HFLM's tokenization of (context, continuation) pairs for a causal LM.

    tokenizer: a transformers tokenizer, or any callable text -> list of ids (then give
    prefix_token_id). add_bos_token: HFLM's model_args add_bos_token (None: the tokenizer's
    default special tokens). prefix_token_id: what replaces an empty context (default the
    tokenizer's BOS, else EOS).
    """

    def __init__(self, tokenizer, *, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        if prefix_token_id is None:
            prefix_token_id = getattr(tokenizer, "bos_token_id", None)
            if prefix_token_id is None:
                prefix_token_id = getattr(tokenizer, "eos_token_id", None)
        self.prefix_token_id = prefix_token_id
        self._bos_text = None
        if prefix_token_id is not None and hasattr(tokenizer, "decode"):
            self._bos_text = tokenizer.decode(prefix_token_id)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if not hasattr(self.tokenizer, "encode"):
            return list(self.tokenizer(text))
        kwargs = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and self._bos_text and text.startswith(self._bos_text):
            kwargs["add_special_tokens"] = False
        return list(self.tokenizer.encode(text, **kwargs))

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if self.prefix_token_id is None:
                raise ValueError("an empty context needs a prefix token (BOS/EOS); give prefix_token_id")
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


def tokenize_requests(requests: Sequence[Request], tokenizer, **encoder_kwargs) -> list[TokenizedRequest]:
    enc = tokenizer if isinstance(tokenizer, Encoder) else Encoder(tokenizer, **encoder_kwargs)
    out = []
    for r in requests:
        ctx, cont = enc.pair(r.context, r.continuation)
        if not cont:
            raise ValueError(f"{r.task} doc {r.doc_id} request {r.index}: the continuation has no tokens")
        out.append(TokenizedRequest(r, tuple(ctx), tuple(cont)))
    return out


@dataclass
class HarnessFidelity:
    """Per-token fidelity over lm-eval requests; `request_index[i]` says which request the
    accumulator's token i belongs to."""

    requests: list[TokenizedRequest]
    accumulator: Accumulator
    request_index: np.ndarray
    score: str = "continuation"

    def summary(self, task: str | None = None) -> Summary:
        """The llama.cpp-style summary over every scored token (or one task's)."""
        from ..stats.summary import summarize

        st = self.accumulator.token_stats()
        if task is None:
            return summarize(st)
        tasks = np.array([r.request.task for r in self.requests], dtype=object)
        sel = tasks[self.request_index] == task
        from dataclasses import fields, replace

        return summarize(replace(st, **{f.name: getattr(st, f.name)[sel] for f in fields(st)
                                        if getattr(st, f.name) is not None}))

    def loglikelihoods(self) -> np.ndarray:
        """[requests, 2]: summed log-probability of each request's scored tokens under the
        reference and the quantized model (lm-eval's loglikelihood with score='continuation')."""
        st = self.accumulator.token_stats()
        out = np.zeros((len(self.requests), 2))
        np.add.at(out[:, 0], self.request_index, -st.nll_ref)
        np.add.at(out[:, 1], self.request_index, -st.nll_q)
        return out

    def per_prompt(self) -> dict[str, np.ndarray]:
        """One row per (task, doc_id): task, prompt_id (the doc_id) and the columns of
        stats.per_prompt (kld_mean, kld_max, kld_p99, top1_agree, ...) over the doc's
        scored tokens, every request of the doc together."""
        keys: dict[tuple[str, str], int] = {}
        doc_of_request = np.empty(len(self.requests), np.int64)
        for i, r in enumerate(self.requests):
            k = (r.request.task, json.dumps(r.request.doc_id))
            doc_of_request[i] = keys.setdefault(k, len(keys))
        docs = [(t, json.loads(d)) for t, d in keys]
        table = per_prompt(self.accumulator.token_stats(), doc_of_request[self.request_index])
        rows = table.pop("prompt_id")
        ids = [docs[int(i)][1] for i in rows]
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            ids = np.array(ids, dtype=np.int64)
        else:
            ids = np.array([str(i) for i in ids], dtype=object)
        return {"task": np.array([docs[int(i)][0] for i in rows], dtype=object),
                "prompt_id": ids, **table}

    def write_per_prompt(self, path, *, model: str | None = None) -> str:
        """Write per_prompt() as Parquet (a cohort manifest's `per_prompt` file); with
        `model`, a leading model column as `fidelity-kld compare --per-prompt` writes."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .._atomic import atomic_output

        cols = self.per_prompt()
        table = {}
        if model is not None:
            table["model"] = pa.array([model] * len(cols["task"]))
        table["task"] = pa.array(list(cols["task"]), pa.string())
        pid = cols["prompt_id"]
        table["prompt_id"] = pa.array(pid) if pid.dtype != object else pa.array(list(pid), pa.string())
        for c in COLUMNS[1:]:
            table[c] = pa.array(cols[c])
        path = os.fspath(path)
        with atomic_output(path) as tmp:
            pq.write_table(pa.table(table), tmp)
        return path


def harness_fidelity(ref_model, q_model, tokenizer, requests: Sequence[Request], *,
                     score: str = "continuation", batch_size: int = 8,
                     add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                     pad_token_id: int | None = None, device: str = "auto",
                     ref_dump=None, q_dump=None,
                     progress: Callable[[int, int], None] | None = None) -> HarnessFidelity:
    """Run the reference and quantized models over lm-eval requests (capture.hf) and
    collect per-token fidelity on the scored tokens (see the module docstring for `score`).
    ref_dump / q_dump: also write the scored logits (prompt ids = request index)."""
    from . import hf

    if score not in SCORE_MODES:
        raise ValueError(f"score must be one of {SCORE_MODES}, not {score!r}")
    toks = tokenize_requests(requests, tokenizer, add_bos_token=add_bos_token,
                             prefix_token_id=prefix_token_id)
    if not toks:
        raise ValueError("no requests")
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None) or 0
    # longest first, as lm-eval does: similar lengths share a batch, less padding
    order = sorted(range(len(toks)), key=lambda i: -len(toks[i].tokens))
    seqs = [toks[i].tokens for i in order]
    first = [len(toks[i].context_ids) if score == "continuation" else 1 for i in order]
    index_parts: list[np.ndarray] = []
    done = [0]

    def record(ref_rows, q_rows, labels, pids):
        index_parts.append(np.asarray(pids, np.int64))
        done[0] += 1
        if progress is not None:
            progress(min(done[0] * batch_size, len(seqs)), len(seqs))

    batches = hf.token_batches(seqs, batch_size=batch_size, prompt_ids=order,
                               pad_token_id=int(pad_token_id), score_from=first)
    acc = hf.compare_models(ref_model, q_model, batches, device=device, on_batch=record,
                            ref_dump=ref_dump, q_dump=q_dump)
    return HarnessFidelity(toks, acc, np.concatenate(index_parts), score)
