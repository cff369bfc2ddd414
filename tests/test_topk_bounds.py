"""Bounds on KL(P_ref || P_q) from top-k dumps: lower <= true <= upper on every token,
against reference.py's float64 KLD on the full logits; exact values on a hand-worked case;
+inf where nothing bounds the tail; the dump's validation."""

from __future__ import annotations

import numpy as np
import pytest

from fidelity_kld import reference
from fidelity_kld.io import DumpError
from fidelity_kld.io.topk import check_topk, from_logits, read_topk, write_topk
from fidelity_kld.stats.topk_bounds import full_logprobs, summarize_topk, token_bounds

# float32 storage of log-probs: a tight bound may overshoot the float64 truth by this much
TOL = 1e-5


def _pair(rng, n, v, scale_q):
    ref = rng.standard_normal((n, v)) * rng.uniform(0.5, 6.0, (n, 1))
    q = ref + rng.standard_normal((n, v)) * scale_q
    return ref.astype(np.float32), q.astype(np.float32)


def _check_brackets(lower, upper, true):
    assert (lower >= 0).all()
    assert (lower <= true + TOL * (1 + true)).all(), np.max(lower - true)
    assert (upper >= true - TOL * (1 + true)).all(), np.min(upper - true)


@pytest.mark.parametrize("v,k", [(7, 1), (7, 3), (1271, 1), (1271, 16), (1271, 200), (64, 64)])
@pytest.mark.parametrize("scale_q", [0.05, 1.0])
def test_bounds_bracket_the_full_kld_in_every_pairing(v, k, scale_q):
    rng = np.random.default_rng(v * 1000 + k)
    ref, q = _pair(rng, 40, v, scale_q)
    labels = rng.integers(0, v, 40)
    true = reference.logit_stats(ref, q)["kld"]
    tr, tq = from_logits(ref, k, labels), from_logits(q, k, labels)
    for a, b in ((tr, tq), (full_logprobs(ref), tq), (tr, full_logprobs(q))):
        st = token_bounds(a, b, vocab=v, labels=labels)
        _check_brackets(st.kld_lower, st.kld_upper, true)
        assert np.isfinite(st.kld_upper).all()  # the writer stored a floor
    if k == v:  # everything known: both bounds are the KLD
        st = token_bounds(tr, tq, vocab=v)
        np.testing.assert_allclose(st.kld_lower, true, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(st.kld_upper, true, rtol=1e-5, atol=1e-7)


def test_label_terms_and_top1_are_exact():
    rng = np.random.default_rng(3)
    ref, q = _pair(rng, 30, 300, 0.7)
    labels = rng.integers(0, 300, 30)
    want = reference.logit_stats(ref, q, labels)
    st = token_bounds(from_logits(ref, 4, labels), from_logits(q, 4, labels))
    np.testing.assert_array_equal(st.top1_ref, want["top1_ref"])
    np.testing.assert_array_equal(st.top1_q, want["top1_q"])
    np.testing.assert_allclose(st.nll_ref, want["nll_ref"], rtol=1e-6)
    np.testing.assert_allclose(st.nll_q, want["nll_q"], rtol=1e-6)
    s = summarize_topk(st)
    np.testing.assert_allclose(s["ppl_ratio"], np.exp(np.mean(want["nll_q"] - want["nll_ref"])), rtol=1e-6)
    assert s["same_top"] == pytest.approx(np.mean(want["top1_ref"] == want["top1_q"]))


def test_hand_worked_three_token_case():
    """V = 3, k = 1. P = (0.7, 0.2, 0.1), Q = (0.5, 0.3, 0.2), both top-1 = id 0.
    lower = 0.7 ln(0.7/0.5) + 0.3 ln(0.3/0.5); with Q's floor 0.2 and P's cap 0.7 the
    unseen P mass 0.3 goes to ids 1, 2 at coefficient ln(0.7/0.2):
    upper = 0.7 ln(0.7/0.5) + 0.3 ln(0.7/0.2)."""
    p = np.log([[0.7, 0.2, 0.1]])
    q = np.log([[0.5, 0.3, 0.2]])
    st = token_bounds(from_logits(p, 1), from_logits(q, 1), vocab=3)
    assert st.kld_lower[0] == pytest.approx(0.7 * np.log(0.7 / 0.5) + 0.3 * np.log(0.3 / 0.5), rel=1e-6)
    assert st.kld_upper[0] == pytest.approx(0.7 * np.log(0.7 / 0.5) + 0.3 * np.log(0.7 / 0.2), rel=1e-6)
    true = np.sum(np.exp(p) * (p - q))
    assert st.kld_lower[0] < true < st.kld_upper[0]


def test_ids_in_one_top_k_only_go_to_the_bucket_on_both_sides():
    """P's top-1 is id 0, Q's is id 1: no id is known on both sides, so the lower bound is
    the KL of (bucket) vs (bucket) = 0, never a term with a guessed q."""
    p = np.log([[0.6, 0.3, 0.1]])
    q = np.log([[0.3, 0.6, 0.1]])
    st = token_bounds(from_logits(p, 1), from_logits(q, 1), vocab=3)
    assert st.kld_lower[0] == pytest.approx(0.0, abs=1e-12)
    assert st.kld_upper[0] >= np.sum(np.exp(p) * (p - q))


def test_the_cap_lifts_the_lower_bound_when_the_reference_top_id_is_outside_the_quant_top_k():
    """V = 3, k = 1. P = (0.9, 0.05, 0.05), Q = (0.2, 0.5, 0.3): no id is known on both
    sides, so the one-bucket bound is 0; but q_0 <= Q's top probability 0.5, so the finer
    cells {0}, {1, 2} give min over q_0 <= 0.5 of 0.9 ln(0.9/q_0) + 0.1 ln(0.1/(1 - q_0)),
    reached at the cap: 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5)."""
    p = np.log([[0.9, 0.05, 0.05]])
    q = np.log([[0.2, 0.5, 0.3]])
    want = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
    st = token_bounds(from_logits(p, 1), from_logits(q, 1), vocab=3)
    assert st.kld_lower[0] == pytest.approx(want, rel=1e-6)
    assert st.kld_lower[0] < np.sum(np.exp(p) * (p - q))
    # reference full: each of ids 0, 1, 2 ... only id 1 is known on both sides
    st = token_bounds(full_logprobs(p), from_logits(q, 1), vocab=3)
    # q_0, q_2 <= 0.5 with q_0 + q_2 = 0.5: water-filling q proportional to p = (0.9, 0.05)
    q0, q2 = 0.5 * 0.9 / 0.95, 0.5 * 0.05 / 0.95
    want_full = 0.05 * np.log(0.05 / 0.5) + 0.9 * np.log(0.9 / q0) + 0.05 * np.log(0.05 / q2)
    assert st.kld_lower[0] == pytest.approx(want_full, rel=1e-6)


def test_no_floor_means_unbounded_unless_the_quant_is_full():
    rng = np.random.default_rng(5)
    ref, q = _pair(rng, 20, 100, 0.5)
    tr, tq = from_logits(ref, 5), from_logits(q, 5)
    from dataclasses import replace

    tq_nofloor = replace(tq, floor_logprob=None)
    assert np.isinf(token_bounds(tr, tq_nofloor).kld_upper).all()
    assert np.isinf(token_bounds(full_logprobs(ref), tq_nofloor).kld_upper).all()
    # the reference's floor is not needed
    assert np.isfinite(token_bounds(replace(tr, floor_logprob=None), full_logprobs(q)).kld_upper).all()


def test_a_masked_quant_entry_where_p_is_positive_is_unbounded():
    p = np.log([[0.5, 0.3, 0.2]])
    q = np.array([[0.0, 0.0, -np.inf]])
    st = token_bounds(from_logits(p, 1), full_logprobs(q), vocab=3)
    assert np.isinf(reference.logit_stats(p, q)["kld"][0])
    assert np.isinf(st.kld_upper[0])


def test_the_gap_shrinks_with_k():
    rng = np.random.default_rng(8)
    ref, q = _pair(rng, 50, 2000, 0.3)
    gaps = []
    for k in (1, 8, 64, 512):
        st = token_bounds(from_logits(ref, k), from_logits(q, k), vocab=2000)
        gaps.append(float(np.mean(st.kld_upper - st.kld_lower)))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < gaps[0] / 10


def test_ties_go_to_the_lowest_id():
    x = np.array([[1.0, 3.0, 3.0, 3.0, 0.0]], np.float32)
    t = from_logits(x, 2)
    np.testing.assert_array_equal(t.token_ids, [[1, 2]])


def test_parquet_roundtrip_keeps_tail_floor_and_vocab(tmp_path):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((12, 50)).astype(np.float32)
    t = from_logits(x, 6, rng.integers(0, 50, 12))
    back = read_topk(write_topk(t, tmp_path / "a.topk.parquet"))
    assert back.vocab == 50
    np.testing.assert_array_equal(back.stored_tail_mass, t.stored_tail_mass)
    np.testing.assert_array_equal(back.floor_logprob, t.floor_logprob)
    lp = full_logprobs(x)
    assert (back.floor_logprob.astype(np.float64) <= lp.min(axis=1)).all()  # rounded down


def _bad(t, **changes):
    from dataclasses import replace

    return replace(t, **changes)


@pytest.mark.parametrize("what,match", [
    ("id_range", "outside the vocabulary"),
    ("duplicate", "appears twice"),
    ("positive", "is not <= 0"),
    ("unsorted", "not in decreasing order"),
    ("tail_low", "outside \\[0, 1\\]"),
    ("tail_high", "outside \\[0, 1\\]"),
])
def test_validation_names_the_file_and_row(what, match):
    rng = np.random.default_rng(10)
    t = from_logits(rng.standard_normal((4, 30)), 3)
    ids, lps, tail = t.token_ids.copy(), t.logprobs.copy(), t.stored_tail_mass.copy()
    if what == "id_range":
        ids[2, 1] = 30
    elif what == "duplicate":
        ids[2, 1] = ids[2, 0]
    elif what == "positive":
        lps[2, 0] = 0.5
    elif what == "unsorted":
        lps[2, [0, 1]] = lps[2, [1, 0]]
    elif what == "tail_low":
        tail[2] = -0.1
    else:
        tail[2] = 1.5
    bad = _bad(t, token_ids=ids, logprobs=lps, stored_tail_mass=tail)
    with pytest.raises(DumpError, match=f"x.parquet: row 2: .*{match}"):
        check_topk(bad, "x.parquet")


@pytest.mark.parametrize("column", ["topk_ids", "topk_logprobs"])
def test_a_row_of_the_wrong_length_is_refused_even_when_the_total_fits(tmp_path, column):
    """A top-k dump written with variable lists, one row with k + 1 entries and the next with
    k - 1: the values still number rows x k, and reshaping them would have shifted an entry
    into the wrong row without a word."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(11)
    path = write_topk(from_logits(rng.standard_normal((6, 40)), 4, rng.integers(0, 40, 6)),
                      tmp_path / "a.topk.parquet")
    table = pq.read_table(path)
    col = table.column(column).combine_chunks()  # fixed-size lists as written: as lists
    offsets = np.arange(0, (len(col) + 1) * 4, 4)
    offsets[3] += 1  # row 2 gains the first entry of row 3
    moved = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), col.flatten())
    i = table.schema.get_field_index(column)
    bad = table.set_column(i, pa.field(column, moved.type), moved)
    out = tmp_path / "b.topk.parquet"
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), out)
    with pytest.raises(DumpError, match=f"b.topk.parquet: top-k column '{column}' .*row 2 holds 5 "
                                        "entries, not k = 4"):
        read_topk(out)
