"""vLLM prompt log-probs: what it gives, and a top-k table a top-k KLD estimator can read.

Limits (why this is not a full-logit capture):
- vLLM returns log-probabilities, never logits, and for prompt tokens only the top k per
  position (`SamplingParams(prompt_logprobs=k)`, k at most the engine's `max_logprobs`,
  20 by default) plus the actual prompt token's own entry when it is outside the top k.
  The tail (the other V - k tokens) is known only by its total mass, 1 - sum(top-k probs),
  so KLD can be bounded or estimated from it, not computed: fidelity-kld's exact metrics
  need full logits (capture.hf, capture.llama_cpp, or dumps).
- Position 0 has no distribution (None). Entry i (i >= 1) is the distribution of token i
  given tokens 0..i-1; here it becomes row `position` = i - 1 with `label` = token i, the
  convention of every dump (row j predicts token j+1).
- The values are the model's raw log-softmax by default; engines configured with another
  `logprobs_mode` (processed logprobs after temperature/penalties) report those instead.
  Compare a reference and a quant captured the same way.

Forms accepted and written (no vllm import anywhere):

JSONL, one line per prompt, vLLM's RequestOutput made plain (`output_record` builds it):
    {"prompt_id": 7, "prompt_token_ids": [1, 450, ...], "k": 20,
     "prompt_logprobs": [null, {"450": {"logprob": -3.2, "rank": 4, "decoded_token": " The"}, ...}, ...]}
(keys may be ints or strings; an entry may also be a bare float log-prob).

Parquet (`write_topk`): fidelity_kld.io.topk's top-k dump, the one top-k format (vLLM gives
no floor, so the upper KLD bound against a quant captured here is +inf; the lower bound and
top-1 agreement are exact). `read_topk` reads either form into a TopKLogprobs.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping

import numpy as np

from ..io.topk import META_KEY, TopKLogprobs, read_topk, write_topk  # noqa: F401 (re-exported)


def _int(value, where: str) -> int:
    """An integer from a record (an int, or a string of one: JSON object keys are strings)."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str, np.integer)):
            raise TypeError
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is {value!r}, not an integer") from None


def _entry(value, where: str) -> tuple[float, int | None]:
    """(logprob, rank) from a vllm Logprob, a dict {"logprob", "rank"}, or a bare float."""
    if isinstance(value, Mapping):
        if "logprob" not in value:
            raise ValueError(f"{where}: entry has no logprob")
        lp, rank = value["logprob"], value.get("rank")
    elif hasattr(value, "logprob"):
        lp, rank = value.logprob, getattr(value, "rank", None)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        lp, rank = value, None
    else:
        raise ValueError(f"{where}: cannot read a log-prob from {type(value).__name__}")
    if isinstance(lp, bool) or not isinstance(lp, (int, float, np.floating)):
        raise ValueError(f"{where}: log-prob {lp!r} is not a number")
    lp = float(lp)
    if math.isnan(lp) or lp > 1e-6:
        raise ValueError(f"{where}: log-prob {lp} is not <= 0")
    return lp, None if rank is None else _int(rank, f"{where}: rank")


def output_record(output, prompt_id, *, k: int | None = None) -> dict:
    """A plain JSON-able record of one vLLM RequestOutput's prompt log-probs (reads
    output.prompt_token_ids and output.prompt_logprobs; nothing vLLM-specific is imported)."""
    plps = []
    for pos in output.prompt_logprobs:
        if pos is None:
            plps.append(None)
            continue
        d = {}
        for tid, v in pos.items():
            lp, rank = _entry(v, f"prompt {prompt_id}")
            d[str(int(tid))] = {"logprob": lp, "rank": rank,
                                "decoded_token": getattr(v, "decoded_token", None)
                                if not isinstance(v, Mapping) else v.get("decoded_token")}
        plps.append(d)
    rec = {"prompt_id": prompt_id, "prompt_token_ids": [int(t) for t in output.prompt_token_ids],
           "prompt_logprobs": plps}
    if k is not None:
        rec["k"] = int(k)
    return rec


def write_jsonl(records: Iterable[Mapping], path) -> str:
    """One record (output_record's form) per line."""
    from .._atomic import atomic_output

    path = os.fspath(path)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path


def _positions(rec: Mapping, where: str):
    """Yield (position, label, label_logprob, label_rank, entries sorted by decreasing
    log-prob as (logprob, token_id)) per scored position of one record."""
    tokens = rec.get("prompt_token_ids")
    plps = rec.get("prompt_logprobs")
    if not isinstance(tokens, list) or not isinstance(plps, list):
        raise ValueError(f"{where}: needs prompt_token_ids and prompt_logprobs lists")
    if len(plps) != len(tokens):
        raise ValueError(f"{where}: {len(plps)} prompt_logprobs entries for {len(tokens)} prompt tokens")
    for i in range(1, len(tokens)):
        pos = plps[i]
        if not isinstance(pos, Mapping) or not pos:
            raise ValueError(f"{where}: position {i} has no log-probs (only position 0 may be null)")
        label = _int(tokens[i], f"{where}: prompt token {i}")
        label_lp, label_rank = math.nan, -1
        entries = []
        for tid, v in pos.items():
            lp, rank = _entry(v, f"{where}: position {i}")
            tid = _int(tid, f"{where}: position {i}: a token id")
            if tid == label:
                label_lp, label_rank = lp, -1 if rank is None else rank
            entries.append((lp, tid))
        entries.sort(key=lambda e: (-e[0], e[1]))
        yield i - 1, label, label_lp, label_rank, entries


def normalize(records: Iterable[Mapping], *, k: int | None = None) -> TopKLogprobs:
    """Records (output_record's form, or anything shaped like it) -> TopKLogprobs.

    k: the prompt_logprobs vLLM was asked for (a record's own "k" wins). A position holds k
    entries, or k + 1 when the prompt token is outside the top k: that extra entry, the
    lowest, is kept only as the label's. Without k, k is the fewest entries any position
    has, which is right whenever some position's token is in its top k; pass k to be sure."""
    rows = []
    for n, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"record {n} is a {type(rec).__name__}, not an object")
        where = f"record {n} (prompt {rec.get('prompt_id', '?')})"
        if "prompt_id" not in rec:
            raise ValueError(f"{where}: no prompt_id")
        if isinstance(rec["prompt_id"], (list, dict, float)) or rec["prompt_id"] is None:
            raise ValueError(f"{where}: prompt_id must be an integer or a string")
        rk = rec.get("k", k)
        if rk is not None and (_int(rk, f"{where}: k") < 1):
            raise ValueError(f"{where}: k is {rk}, not a positive integer")
        for pos, label, lp, rank, entries in _positions(rec, where):
            rows.append((rec["prompt_id"], pos, label, lp, rank, entries, rk))
    if not rows:
        raise ValueError("no scored positions (every prompt shorter than two tokens?)")
    inferred = min(len(r[5]) for r in rows)
    width = max(inferred if r[6] is None else int(r[6]) for r in rows)
    n = len(rows)
    ids = np.full((n, width), -1, dtype=np.int64)
    lps = np.full((n, width), -np.inf, dtype=np.float32)
    for j, r in enumerate(rows):
        top = r[5][:inferred if r[6] is None else int(r[6])]
        ids[j, :len(top)] = [e[1] for e in top]
        lps[j, :len(top)] = [e[0] for e in top]
    return TopKLogprobs(
        prompt_id=_id_array([r[0] for r in rows]),
        position=np.array([r[1] for r in rows], dtype=np.int64),
        label=np.array([r[2] for r in rows], dtype=np.int64),
        label_logprob=np.array([r[3] for r in rows], dtype=np.float32),
        label_rank=np.array([r[4] for r in rows], dtype=np.int64),
        token_ids=ids, logprobs=lps)


def _id_array(ids: list) -> np.ndarray:
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        return np.array(ids, dtype=np.int64)
    return np.array([str(i) for i in ids], dtype=object)


def read_vllm_jsonl(path, *, k: int | None = None) -> TopKLogprobs:
    """The records of a JSONL file (write_jsonl's form) as TopKLogprobs; DumpError (a
    ValueError) naming the file, and the line, for anything it cannot read."""
    from ..io._util import load_json
    from ..io.base import DumpError

    path = os.fspath(path)
    records = []
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    records.append(load_json(path, line, f"record on line {lineno}"))
    except OSError as e:
        raise DumpError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return normalize(records, k=k)
    except DumpError:
        raise
    except ValueError as e:
        raise DumpError(f"{path}: {e}") from None
