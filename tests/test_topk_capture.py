"""Top-k dumps written by the capture adapters (llama-cpp-python stand-in, transformers,
vLLM records): the exact top k of the models' logits (numpy/scipy on the full rows), and
bounds that bracket the exact KLD of the same run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy.special import log_softmax

from fidelity_kld import reference
from fidelity_kld.io.topk import read_topk
from fidelity_kld.stats.topk_bounds import full_logprobs, token_bounds

from test_capture_llama_cpp import SEQS, FakeLlama


def test_llama_cpp_top_k_dump_is_the_exact_top_k(tmp_path):
    from fidelity_kld.capture import llama_cpp

    llm = FakeLlama(vocab=29)
    n = llama_cpp.write_topk_dump(llm, SEQS, tmp_path / "r.topk.parquet", 5, prompt_ids=[4, 5, 6])
    t = read_topk(tmp_path / "r.topk.parquet")
    rows = np.concatenate([[llm.true_logits(s[:j + 1]) for j in range(len(s) - 1)] for s in SEQS])
    lp = log_softmax(rows.astype(np.float64), axis=1)
    top = np.argsort(-lp, axis=1, kind="stable")[:, :5]
    assert n == t.n_rows == rows.shape[0] and t.vocab == 29
    np.testing.assert_array_equal(t.token_ids, top)
    np.testing.assert_allclose(t.logprobs, np.take_along_axis(lp, top, axis=1), rtol=1e-6)
    tail = np.exp(lp).sum(axis=1) - np.exp(np.take_along_axis(lp, top, axis=1)).sum(axis=1)
    np.testing.assert_allclose(t.tail_mass(), tail, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(t.label, np.concatenate([s[1:] for s in SEQS]))
    np.testing.assert_array_equal(t.prompt_id, np.repeat([4, 5, 6], [len(s) - 1 for s in SEQS]))


def test_hf_compare_models_writes_top_k_dumps_that_bracket_its_kld(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fidelity_kld.capture import hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64, initializer_range=0.1)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    quant = hf.fake_quantize_weights(copy.deepcopy(ref), 4)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (12, 20, 7)]
    acc = hf.compare_models(ref, quant, hf.token_batches(seqs, batch_size=2),
                            ref_topk_dump=tmp_path / "r.parquet", q_topk_dump=tmp_path / "q.parquet", k=8)
    st = acc.token_stats()
    tr, tq = read_topk(tmp_path / "r.parquet"), read_topk(tmp_path / "q.parquet")
    assert tr.n_rows == tq.n_rows == st.n_tokens and tr.k == 8
    b = token_bounds(tr, tq, vocab=96)
    np.testing.assert_array_equal(b.top1_ref, st.top1_ref)
    np.testing.assert_array_equal(b.top1_q, st.top1_q)
    assert (b.kld_lower <= st.kld + 1e-5).all() and (b.kld_upper >= st.kld - 1e-5).all()
    np.testing.assert_allclose(b.nll_q, st.nll_q, rtol=1e-5, atol=1e-6)


def test_vllm_records_give_an_exact_lower_bound_and_an_unbounded_upper(tmp_path):
    from fidelity_kld.capture import vllm

    from test_capture_vllm import fake_output

    rng = np.random.default_rng(4)
    out, lp = fake_output(rng, 30, 40, 6)  # the quant's log-probs, vLLM-shaped
    t = vllm.normalize([vllm.output_record(out, 0, k=6)])
    ref_logits = (lp[:-1].astype(np.float64) + rng.standard_normal((29, 40)) * 0.3)
    st = token_bounds(full_logprobs(ref_logits), t, vocab=40, labels=t.label)
    true = reference.logit_stats(ref_logits, lp[:-1])["kld"]
    assert (st.kld_lower <= true + 1e-5).all() and (st.kld_lower > 0).all()
    assert np.isinf(st.kld_upper).all()  # vLLM gives no floor under the unseen probabilities
