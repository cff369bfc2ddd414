"""Accumulator: batches, masks, prompt ids, per-prompt tables, merging."""

import numpy as np
import pytest

import fidelity_kld as fk
from fidelity_kld import reference
from fidelity_kld.stats.per_prompt import per_prompt


def batch(rng, b=3, t=5, v=97):
    a = (rng.standard_normal((b, t, v)) * 3).astype(np.float32)
    q = (a + 0.3 * rng.standard_normal((b, t, v))).astype(np.float32)
    y = rng.integers(0, v, (b, t))
    return a, q, y


def test_batched_masked_input_equals_flat_selection():
    rng = np.random.default_rng(0)
    a, q, y = batch(rng)
    mask = np.ones((3, 5), bool)
    mask[0, 3:] = False  # padding
    mask[2, :1] = False
    acc = fk.Accumulator()
    acc.add(a, q, y, mask=mask, prompt_ids=np.array([10, 11, 12]))
    st = acc.token_stats()
    keep = mask.reshape(-1)
    want = reference.logit_stats(a.reshape(15, 97)[keep], q.reshape(15, 97)[keep], y.reshape(15)[keep])
    assert st.n_tokens == keep.sum()
    np.testing.assert_allclose(st.kld, want["kld"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(st.labels, y.reshape(15)[keep])
    table = acc.per_prompt()
    np.testing.assert_array_equal(table["prompt_id"], [10, 11, 12])
    np.testing.assert_array_equal(table["n_tokens"], [3, 5, 4])


def test_per_prompt_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    n, v = 300, 64
    a = (rng.standard_normal((n, v)) * 2).astype(np.float32)
    q = (a + 0.5 * rng.standard_normal((n, v))).astype(np.float32)
    q[7, 3] = np.nan  # an invalid token inside a prompt
    pid = rng.integers(0, 17, n)
    st = fk.compare(a, q, rng.integers(0, v, n))
    table = per_prompt(st, pid)
    for i, p in enumerate(table["prompt_id"]):
        sel = (pid == p) & ~np.isnan(st.kld)
        assert table["n_tokens"][i] == (pid == p).sum()
        assert table["n_invalid"][i] == ((pid == p) & np.isnan(st.kld)).sum()
        assert table["kld_mean"][i] == pytest.approx(st.kld[sel].mean())
        assert table["kld_max"][i] == st.kld[sel].max()
        assert table["kld_p99"][i] == pytest.approx(np.percentile(st.kld[sel], 99))
        assert table["top1_agree"][i] == pytest.approx((st.top1_ref[sel] == st.top1_q[sel]).mean())
        assert table["nll_q_mean"][i] == pytest.approx(st.nll_q[sel].mean())


def test_merge_keeps_prompt_ids_and_order():
    rng = np.random.default_rng(2)
    a, q, y = batch(rng, b=4)
    whole = fk.Accumulator()
    whole.add(a, q, y, prompt_ids=[0, 1, 2, 3])
    left, right = fk.Accumulator(), fk.Accumulator()
    left.add(a[:2], q[:2], y[:2], prompt_ids=[0, 1])
    right.add(a[2:], q[2:], y[2:], prompt_ids=[2, 3])
    merged = left.merge(right)
    assert merged.summary() == whole.summary()
    for key, val in whole.per_prompt().items():
        np.testing.assert_array_equal(merged.per_prompt()[key], val)


def test_per_prompt_needs_ids():
    rng = np.random.default_rng(3)
    a, q, y = batch(rng)
    acc = fk.Accumulator()
    acc.add(a, q, y)
    with pytest.raises(ValueError, match="prompt_ids"):
        acc.per_prompt()
    with pytest.raises(ValueError, match="mask has"):
        acc.add(a, q, y, mask=np.ones(4, bool))


def test_torch_batches():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    a, q, y = batch(rng)
    mask = np.ones((3, 5), bool)
    mask[1, 4] = False
    acc_np, acc_t = fk.Accumulator(), fk.Accumulator()
    acc_np.add(a, q, y, mask=mask)
    acc_t.add(torch.from_numpy(a), torch.from_numpy(q), torch.from_numpy(y), mask=torch.from_numpy(mask))
    assert acc_t.summary() == acc_np.summary()


def test_labelled_and_unlabelled_batches_do_not_mix():
    """A batch without labels after one with them would drop PPL for every token."""
    rng = np.random.default_rng(4)
    a, q, y = batch(rng)
    acc = fk.Accumulator()
    acc.add(a, q, y)
    with pytest.raises(ValueError, match="this batch lacks labels, the batches before did"):
        acc.add(a, q)
    assert acc.n_tokens == 15 and acc.summary().has_labels  # the refused batch left no trace
    bare = fk.Accumulator()
    bare.add(a, q)
    with pytest.raises(ValueError, match="this batch has labels, the batches before did not"):
        bare.add(a, q, y)
    with pytest.raises(ValueError, match="the other accumulator's batches lacks labels"):
        acc.merge(bare)


def test_llama_parity_and_exact_accumulators_do_not_merge():
    rng = np.random.default_rng(5)
    a, q, y = batch(rng)
    exact, parity = fk.Accumulator(), fk.Accumulator(llama_parity=True)
    exact.add(a, q, y)
    with pytest.raises(ValueError, match="cannot merge a llama-parity accumulator"):
        exact.merge(parity)
    with pytest.raises(ValueError, match="cannot merge a llama-parity accumulator"):
        parity.merge(exact)
    assert exact.merge(fk.Accumulator()).n_tokens == 15


def test_batched_input_with_list_labels():
    rng = np.random.default_rng(6)
    a, q, y = batch(rng)
    acc = fk.Accumulator()
    st = acc.add(a, q, y.tolist(), mask=(y % 3 > 0).tolist())
    keep = (y % 3 > 0).reshape(-1)
    want = reference.logit_stats(a.reshape(15, 97)[keep], q.reshape(15, 97)[keep], y.reshape(15)[keep])
    np.testing.assert_allclose(st.nll_q, want["nll_q"], rtol=1e-5, atol=1e-6)


def test_compare_many_takes_an_iterator():
    rng = np.random.default_rng(7)
    a, q, _ = batch(rng)
    a, q = a.reshape(15, 97), q.reshape(15, 97)
    got = fk.compare_many(a, iter([q, q[::-1]]))
    assert len(got) == 2
    np.testing.assert_array_equal(got[1].kld, fk.compare(a, q[::-1]).kld)
