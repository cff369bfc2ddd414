"""llama-cpp-python capture against a stand-in Llama object with the attributes the adapter
uses (reset, eval in n_batch pieces, scores [n_ctx, V], n_tokens, n_vocab(), n_ctx(),
context_params.logits_all); llama_cpp itself is not needed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fidelity_kld import reference
from fidelity_kld.capture import llama_cpp
from fidelity_kld.io import open_source


class FakeLlama:
    """Logits at position j depend on tokens[0..j] only (a causal toy model), written into
    a preallocated scores matrix batch by batch as llama-cpp-python does."""

    def __init__(self, vocab=29, n_ctx=40, n_batch=7, logits_all=True, noise=0.0, seed=0):
        self._vocab, self._n_ctx, self.n_batch = vocab, n_ctx, n_batch
        self.context_params = SimpleNamespace(logits_all=logits_all)
        self.scores = np.full((n_ctx if logits_all else n_batch, vocab), np.nan, np.float32)
        self.n_tokens = 0
        self._prefix: list[int] = []
        self._noise, self._seed = noise, seed

    def n_vocab(self):
        return self._vocab

    def n_ctx(self):
        return self._n_ctx

    def reset(self):
        self.n_tokens = 0
        self._prefix = []

    def eval(self, tokens):
        for i in range(0, len(tokens), self.n_batch):
            for t in tokens[i:i + self.n_batch]:
                self._prefix.append(int(t))
                self.scores[self.n_tokens] = self.true_logits(self._prefix)
                self.n_tokens += 1

    def true_logits(self, prefix):
        rng = np.random.default_rng([self._seed, *prefix])
        base = np.random.default_rng(list(prefix)).standard_normal(self._vocab) * 3
        return (base + self._noise * rng.standard_normal(self._vocab)).astype(np.float32)


SEQS = [[1, 5, 9, 2, 7, 7, 3, 0, 4, 11, 12, 13, 14, 15, 16], [3, 1, 4, 1, 5, 9], [8, 8]]


@pytest.mark.parametrize("ext", [".npy", ".safetensors"])
def test_dump_holds_every_position_with_next_token_labels(tmp_path, ext):
    llm = FakeLlama()
    path = tmp_path / f"ref{ext}"
    n = llama_cpp.write_dump(llm, SEQS, path, prompt_ids=[40, 41, 42])
    assert n == sum(len(s) - 1 for s in SEQS)
    with open_source(str(path)) as src:
        data = np.asarray(src.read(0, src.n_tokens).data)
        labels, pids = src.labels, src.prompt_ids
    want = np.concatenate([[llm.true_logits(s[:j + 1]) for j in range(len(s) - 1)] for s in SEQS])
    np.testing.assert_array_equal(data, want)
    np.testing.assert_array_equal(labels, np.concatenate([s[1:] for s in SEQS]))
    np.testing.assert_array_equal(pids, np.repeat([40, 41, 42], [len(s) - 1 for s in SEQS]))


def test_first_skips_short_context_rows_like_llama_perplexity(tmp_path):
    llm = FakeLlama()
    rows, labels = llama_cpp.scored_rows(llm, SEQS[0], first=7)
    np.testing.assert_array_equal(labels, SEQS[0][8:])
    np.testing.assert_array_equal(rows[0], llm.true_logits(SEQS[0][:8]))
    with pytest.raises(ValueError, match="no scored rows"):
        llama_cpp.scored_rows(llm, SEQS[2], first=1)


def test_compare_two_models_matches_the_oracle():
    ref, q = FakeLlama(), FakeLlama(noise=0.3, seed=5)
    acc = llama_cpp.compare_models(ref, q, SEQS)
    a = np.concatenate([llama_cpp.scored_rows(ref, s)[0] for s in SEQS])
    b = np.concatenate([llama_cpp.scored_rows(q, s)[0] for s in SEQS])
    y = np.concatenate([s[1:] for s in SEQS])
    want = reference.logit_stats(a, b, y)
    st = acc.token_stats()
    np.testing.assert_allclose(st.kld, want["kld"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(st.nll_q, want["nll_q"], rtol=1e-5, atol=1e-5)
    assert st.kld.min() > 0
    np.testing.assert_array_equal(acc.per_prompt()["n_tokens"], [14, 5, 1])


def test_refuses_a_model_without_logits_all_and_too_long_sequences(tmp_path):
    with pytest.raises(ValueError, match="logits_all=True"):
        llama_cpp.sequence_logits(FakeLlama(logits_all=False), SEQS[0])
    with pytest.raises(ValueError, match="exceeds the context"):
        llama_cpp.sequence_logits(FakeLlama(n_ctx=10), SEQS[0])
    with pytest.raises(ValueError, match="exceeds the context"):
        llama_cpp.write_dump(FakeLlama(n_ctx=10), SEQS, tmp_path / "x.npy")
    assert list(tmp_path.iterdir()) == []
