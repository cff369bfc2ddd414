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
