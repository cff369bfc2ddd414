"""vLLM prompt log-probs -> top-k table. The inputs are built in vLLM's output shape (per
prompt a list over positions of {token_id: Logprob(logprob, rank, decoded_token)}, None at
position 0, the prompt token added when outside the top k) from full logits, so the
normalised table can be checked against the exact top-k of the same distributions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from fidelity_kld.capture import vllm as cap


@dataclass
class Logprob:  # vllm.sequence.Logprob's fields
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))).astype(np.float32)


def fake_output(rng, n_tokens, vocab, k):
    tokens = rng.integers(0, vocab, n_tokens)
    lp = log_softmax(rng.standard_normal((n_tokens, vocab)) * 3)
    plps = [None]
    for i in range(1, n_tokens):
        row = lp[i - 1]  # the distribution of token i given tokens 0..i-1
        order = np.argsort(-row, kind="stable")
        rank = np.empty(vocab, np.int64)
        rank[order] = np.arange(1, vocab + 1)
        entry = {int(t): Logprob(float(row[t]), int(rank[t]), f"t{t}") for t in order[:k]}
        entry.setdefault(int(tokens[i]), Logprob(float(row[tokens[i]]), int(rank[tokens[i]]), "x"))
        plps.append(entry)
    return SimpleNamespace(request_id="r", prompt_token_ids=tokens.tolist(), prompt_logprobs=plps), lp


def test_jsonl_roundtrip_gives_the_exact_top_k(tmp_path):
    rng = np.random.default_rng(0)
    k, vocab = 5, 23
    outs = [fake_output(rng, n, vocab, k) for n in (9, 2, 14)]
    records = [cap.output_record(o, pid, k=k) for (o, _), pid in zip(outs, (7, 8, 9))]
    path = cap.write_jsonl(records, tmp_path / "q.jsonl")
    first = json.loads(open(path).readline())
    assert first["prompt_logprobs"][0] is None and isinstance(first["prompt_logprobs"][1], dict)
    t = cap.read_topk(path)
    assert t.k == k and t.n_rows == 8 + 1 + 13
    np.testing.assert_array_equal(t.prompt_id, np.repeat([7, 8, 9], [8, 1, 13]))
    np.testing.assert_array_equal(t.position, np.concatenate([np.arange(n - 1) for n in (9, 2, 14)]))
    lp = np.concatenate([full[:-1] for _, full in outs])
    tokens = np.concatenate([np.asarray(o.prompt_token_ids[1:]) for o, _ in outs])
    np.testing.assert_array_equal(t.label, tokens)
    top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(t.token_ids, top)
    np.testing.assert_array_equal(t.logprobs, np.take_along_axis(lp, top, axis=1))
    np.testing.assert_array_equal(t.label_logprob, lp[np.arange(len(tokens)), tokens])
    ranks = (lp > lp[np.arange(len(tokens)), tokens][:, None]).sum(axis=1) + 1
    np.testing.assert_array_equal(t.label_rank, ranks)
    exact_tail = 1 - np.sort(np.exp(lp.astype(np.float64)), axis=1)[:, ::-1][:, :k].sum(axis=1)
    np.testing.assert_allclose(t.tail_mass(), exact_tail, atol=1e-6)
    assert (ranks > k).any() and (ranks <= k).any()  # both vLLM cases occur


def test_parquet_roundtrip_and_string_prompt_ids(tmp_path):
    rng = np.random.default_rng(1)
    outs = [fake_output(rng, n, 17, 3)[0] for n in (6, 4)]
    t = cap.normalize([cap.output_record(o, pid, k=3) for o, pid in zip(outs, ("lcb/12", "lcb/3"))])
    back = cap.read_topk(cap.write_topk(t, tmp_path / "t.parquet"))
    for f in ("position", "label", "label_logprob", "label_rank", "token_ids", "logprobs"):
        np.testing.assert_array_equal(getattr(back, f), getattr(t, f), err_msg=f)
    assert list(back.prompt_id) == ["lcb/12"] * 5 + ["lcb/3"] * 3


def test_plain_dicts_string_keys_and_inferred_k():
    """The JSON form written by hand: string token ids, bare floats or dicts, no k given."""
    rec = {"prompt_id": 1, "prompt_token_ids": [5, 2, 9],
           "prompt_logprobs": [None,
                               {"2": {"logprob": -0.5, "rank": 1}, "4": {"logprob": -1.5, "rank": 2}},
                               {"3": -0.2, "1": -2.5, "9": -6.0}]}  # 9: the label, outside the top 2
    t = cap.normalize([rec])
    assert t.k == 2
    np.testing.assert_array_equal(t.token_ids, [[2, 4], [3, 1]])
    np.testing.assert_array_equal(t.label, [2, 9])
    np.testing.assert_allclose(t.label_logprob, [-0.5, -6.0])
    np.testing.assert_array_equal(t.label_rank, [1, -1])


def test_malformed_records_are_refused():
    with pytest.raises(ValueError, match="only position 0 may be null"):
        cap.normalize([{"prompt_id": 0, "prompt_token_ids": [1, 2], "prompt_logprobs": [None, None]}])
    with pytest.raises(ValueError, match="2 prompt_logprobs entries for 3"):
        cap.normalize([{"prompt_id": 0, "prompt_token_ids": [1, 2, 3], "prompt_logprobs": [None, {"2": -1.0}]}])
    with pytest.raises(ValueError, match="not <= 0"):
        cap.normalize([{"prompt_id": 0, "prompt_token_ids": [1, 2], "prompt_logprobs": [None, {"2": 0.5}]}])
