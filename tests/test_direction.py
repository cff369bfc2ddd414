"""summarize_direction against a per-token Python loop over the logits (scipy for the
divergences), on TokenStats built from the float64 oracle's outputs."""

import math
from dataclasses import fields, replace

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax

import fidelity_kld as fk
from fidelity_kld import reference
from fidelity_kld.ops import TokenStats
from fidelity_kld.stats.direction import SCALARS, summarize_direction

EDGES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def oracle_stats(a, b, y=None) -> TokenStats:
    """TokenStats holding reference.logit_stats' outputs (every optional output included)."""
    out = reference.logit_stats(a, b, y)
    names = {f.name for f in fields(TokenStats)}
    kw = {k: v for k, v in out.items() if k in names}
    for k in ("top1_ref", "top1_q", "rank_ref_y", "rank_q_y"):
        if k in kw:
            kw[k] = kw[k].astype(np.int32)
    return TokenStats(labels=None if y is None else np.asarray(y, np.int64), **kw)


def row_facts(ra, rb, label):
    """Everything the metrics need about one token, from its two logit rows; None if invalid."""
    for r in (ra, rb):
        if np.isnan(r).any() or np.isposinf(r).any() or not np.isfinite(r).any():
            return None
    p, q = softmax(ra), softmax(rb)
    f = {"kld": float(np.sum(rel_entr(p, q))), "tvd": 0.5 * float(np.sum(np.abs(p - q))),
         "jsd": float(jensenshannon(p, q)) ** 2, "p_top1": float(p.max())}
    if label is None:
        return f
    for side, r, pr in (("ref", ra, p), ("q", rb, q)):
        top1 = next(i for i in range(r.size) if r[i] == r.max())  # first index of the max
        others = [r[i] for i in range(r.size) if i != label]
        f[f"right_{side}"] = top1 == label
        f[f"rank_{side}"] = sum(1 for v in r if v > r[label])
        f[f"margin_{side}"] = r[label] - max(others) if others else math.inf
        f[f"nll_{side}"] = -math.log(pr[label]) if pr[label] > 0 else math.inf
    return f


def expected(a, b, y=None):
    """The metrics by their definitions, one token at a time."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    facts = [row_facts(a[i], b[i], None if y is None else int(y[i])) for i in range(a.shape[0])]
    ok = [f for f in facts if f is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    total = sum(f["kld"] for f in ok)
    out = {"tvd_mean": mean([f["tvd"] for f in ok]), "jsd_mean": mean([f["jsd"] for f in ok]),
           "kld_confident": mean([f["kld"] for f in ok if f["p_top1"] >= 0.5])}
    buckets = []
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        inside = [f["kld"] for f in ok if lo <= f["p_top1"] < hi or (hi == 1.0 and f["p_top1"] >= lo)]
        buckets.append((len(inside), mean(inside), sum(inside) / total if inside else 0.0))
    out["buckets"] = buckets
    if y is None:
        return out
    d = [f["nll_q"] - f["nll_ref"] for f in ok if not (math.isinf(f["nll_q"]) and math.isinf(f["nll_ref"]))]
    harm = [f["right_ref"] and not f["right_q"] for f in ok]
    helped = [f["right_q"] and not f["right_ref"] for f in ok]
    lost = [f["rank_ref"] < 5 <= f["rank_q"] for f in ok]
    gained = [f["rank_q"] < 5 <= f["rank_ref"] for f in ok]
    margins = [max(0.0, f["margin_ref"] - f["margin_q"]) for f in ok
               if math.isfinite(f["margin_ref"]) and math.isfinite(f["margin_q"])]
    out.update(
        dnll_mean=mean(d), dnll_harm=mean([max(0.0, x) for x in d]),
        dnll_help=mean([max(0.0, -x) for x in d]),
        flip_harm=mean(harm), flip_help=mean(helped), flip_net=mean(harm) - mean(helped),
        top5_lost=mean(lost), top5_gained=mean(gained), top5_net=mean(lost) - mean(gained),
        margin_harm=mean(margins),
        right=[f["kld"] for f in ok if f["right_ref"]],
        wrong=[f["kld"] for f in ok if not f["right_ref"]])
    return out


def random_case(rng, n=400, v=40, noise=0.6):
    a = rng.standard_normal((n, v)) * rng.uniform(0.3, 4.0, (n, 1))  # confident and unsure rows
    b = a + noise * rng.standard_normal((n, v))
    y = np.where(rng.random(n) < 0.5, a.argmax(axis=1), rng.integers(0, v, n))
    return a, b, y


def adversarial_rows(v=12):
    """Ties, masked labels, one-entry rows and invalid rows, each with its label."""
    rows = []
    tie = np.linspace(-1, 1, v)
    tie[3] = tie[7] = 5.0             # label 7 tied with the max at index 3: top1 3, rank 0
    rows.append((tie, tie + 0.01 * np.arange(v), 7))
    rows.append((tie, tie[::-1].copy(), 7))
    only = np.full(v, -np.inf)
    only[5] = 1.0                     # the label is the only finite entry: margin +inf
    rows.append((only, only.copy(), 5))
    masked = np.linspace(0, 2, v)
    masked[2] = -np.inf               # label impossible for both: excluded from dnll and margins
    rows.append((masked, masked + 0.1, 2))
    nan_row = np.linspace(0, 1, v)
    nan_row[4] = np.nan               # invalid token
    rows.append((nan_row, np.linspace(0, 1, v), 1))
    rows.append((np.linspace(0, 1, v), np.full(v, np.inf), 0))
    flip = np.linspace(0, 3, v)       # reference right at index v-1, the quant wrong
    rows.append((flip, flip[::-1].copy(), v - 1))
    rows.append((flip[::-1].copy(), flip, v - 1))
    return [np.array([r[i] for r in rows]) for i in range(3)]


def check(got, want, has_labels=True):
    keys = ["tvd_mean", "jsd_mean", "kld_confident"]
    if has_labels:
        keys += ["dnll_mean", "dnll_harm", "dnll_help", "flip_harm", "flip_help", "flip_net",
                 "top5_lost", "top5_gained", "top5_net", "margin_harm"]
    for k in keys:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12, nan_ok=True), k
    for b, (n, m, share) in zip(got["kld_by_conf"], want["buckets"]):
        assert b["n"] == n
        assert b["kld_mean"] == pytest.approx(m, rel=1e-9, abs=1e-12, nan_ok=True)
        assert b["kld_share"] == pytest.approx(share, rel=1e-9, abs=1e-12)
    assert [(b["lo"], b["hi"]) for b in got["kld_by_conf"]] == list(zip(EDGES[:-1], EDGES[1:]))
    if has_labels:
        total = sum(want["right"]) + sum(want["wrong"])
        for key, ks in (("kld_ref_right", want["right"]), ("kld_ref_wrong", want["wrong"])):
            assert got[key]["n"] == len(ks)
            assert got[key]["kld_mean"] == pytest.approx(np.mean(ks) if ks else math.nan, nan_ok=True)
            assert got[key]["kld_share"] == pytest.approx(sum(ks) / total)


def test_random_rows_match_the_definitions():
    rng = np.random.default_rng(16)
    a, b, y = random_case(rng)
    got = summarize_direction(oracle_stats(a, b, y))
    want = expected(a, b, y)
    check(got, want)
    assert got["n_valid"] == 400 and got["has_labels"] and not got["llama_compat"]
    # the random case must exercise every metric, else the comparison proves little
    assert 0 < got["flip_harm"] and 0 < got["flip_help"] and 0 < got["top5_lost"]
    assert all(bk["n"] > 0 for bk in got["kld_by_conf"])
    assert sum(bk["kld_share"] for bk in got["kld_by_conf"]) == pytest.approx(1.0)
    assert got["dnll_harm"] - got["dnll_help"] == pytest.approx(got["dnll_mean"])


def test_adversarial_rows_match_the_definitions():
    a, b, y = adversarial_rows()
    ts = oracle_stats(a, b, y)
    assert ts.top1_ref[0] == 3 and ts.rank_ref_y[0] == 0  # the tie case is what it claims
    got = summarize_direction(ts)
    want = expected(a, b, y)
    check(got, want)
    assert got["n_valid"] == 6
    assert got["n_dnll_mean"] == 5 and got["n_margin_harm"] == 4


def test_mixed_random_and_adversarial_rows():
    rng = np.random.default_rng(3)
    a, b, y = random_case(rng, n=60, v=12)
    c, d, z = adversarial_rows(12)
    a, b, y = np.vstack([a, c]), np.vstack([b, d]), np.concatenate([y, z])
    check(summarize_direction(oracle_stats(a, b, y)), expected(a, b, y))


def test_tie_with_the_label_is_a_miss_for_flips_but_top_rank():
    """Label tied with the max at a later index: top-1 (lowest index) is not the label, so the
    reference is 'wrong' for flips, but the label's rank is 0: in the top 5."""
    v = 8
    a = np.linspace(0, 1, v)
    a[1] = a[6] = 3.0
    b = np.linspace(0, 1, v)
    b[6] = 3.0                          # the quant puts the label alone on top
    got = summarize_direction(oracle_stats(a[None], b[None], [6]))
    assert got["flip_help"] == 1.0 and got["flip_harm"] == 0.0
    assert got["top5_lost"] == 0.0 and got["top5_gained"] == 0.0
    assert got["margin_harm"] == 0.0    # margin_ref 0 (tied), margin_q > 0: no damage
    assert got["kld_ref_wrong"]["n"] == 1 and got["kld_ref_right"]["n"] == 0


def test_rank_beyond_five_counts_as_lost():
    v = 10
    a = np.arange(v, dtype=float)       # label 9: rank 0 under ref
    b = np.arange(v, dtype=float)[::-1].copy()  # rank 9 under q
    got = summarize_direction(oracle_stats(a[None], b[None], [9]))
    assert (got["top5_lost"], got["top5_gained"], got["top5_net"]) == (1.0, 0.0, 1.0)
    assert got["flip_harm"] == 1.0 and got["flip_net"] == 1.0
    assert got["margin_harm"] == pytest.approx(1.0 - (0.0 - 9.0))
    assert got["dnll_help"] == 0.0 and got["dnll_harm"] > 0


def test_label_impossible_for_q_only_makes_dnll_infinite():
    a = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    b = a.copy()
    b[0, 0] = -np.inf
    got = summarize_direction(oracle_stats(a, b, [0, 1]))
    assert math.isinf(got["dnll_mean"]) and math.isinf(got["dnll_harm"])
    assert got["dnll_help"] == 0.0
    assert math.isinf(got["kld_confident"])  # token 0: p_top1 = 0.67, KLD +inf (q_0 = 0)
    assert got["n_margin_harm"] == 1   # margin_q is -inf on token 0


def test_no_labels_leaves_label_metrics_none():
    rng = np.random.default_rng(5)
    a, b, _ = random_case(rng, n=50, v=20)
    got = summarize_direction(oracle_stats(a, b))
    for k in ("dnll_mean", "flip_harm", "top5_lost", "margin_harm", "kld_ref_right", "kld_ref_wrong"):
        assert got[k] is None, k
    assert not got["has_labels"]
    check(got, expected(a, b), has_labels=False)


def test_all_invalid_gives_nan_not_errors():
    a = np.full((4, 6), np.nan)
    got = summarize_direction(oracle_stats(a, a, [0, 1, 2, 3]))
    assert got["n_valid"] == 0
    for k in SCALARS:
        assert math.isnan(got[k]), k
        assert got[f"n_{k}"] == 0
    assert all(bk["n"] == 0 and math.isnan(bk["kld_mean"]) for bk in got["kld_by_conf"])
    assert got["kld_ref_right"]["n"] == 0 and math.isnan(got["kld_ref_right"]["token_share"])


def test_empty_buckets_and_zero_kld():
    """Confident identical rows: every token in the top bucket, KLD 0 (shares undefined)."""
    a = np.tile(np.array([10.0, 0.0, 0.0, 0.0]), (5, 1))
    got = summarize_direction(oracle_stats(a, a.copy(), [0] * 5))
    by = got["kld_by_conf"]
    assert [bk["n"] for bk in by] == [0, 0, 0, 0, 5]
    assert all(math.isnan(bk["kld_mean"]) for bk in by[:4]) and by[4]["kld_mean"] == 0.0
    assert all(math.isnan(bk["kld_share"]) for bk in by)  # 0/0: no KLD to apportion
    assert got["kld_confident"] == 0.0 and got["flip_harm"] == 0.0 and got["margin_harm"] == 0.0


def test_without_optional_outputs_only_label_metrics():
    """Stats from compare without extra: the metrics that need only labels and top-1."""
    rng = np.random.default_rng(7)
    a, b, y = random_case(rng, n=200, v=30)
    st = fk.compare(a.astype(np.float32), b.astype(np.float32), y)
    got = summarize_direction(st)
    want = expected(a.astype(np.float32), b.astype(np.float32), y)
    for k in ("dnll_mean", "dnll_harm", "dnll_help", "flip_harm", "flip_help", "flip_net"):
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    for k in ("top5_lost", "margin_harm", "tvd_mean", "jsd_mean", "kld_confident", "kld_by_conf"):
        assert got[k] is None, k
    assert got["kld_ref_right"]["n"] == len(want["right"])
    assert got["dnll_mean"] == fk.summarize(st).ln_ppl_ratio


def test_standard_errors_and_llama_kld():
    rng = np.random.default_rng(9)
    a, b, y = random_case(rng, n=300, v=25)
    ts = oracle_stats(a, b, y)
    got = summarize_direction(ts)
    harm = ((ts.top1_ref == y) & (ts.top1_q != y)).mean()
    assert got["flip_harm_se"] == pytest.approx(math.sqrt(harm * (1 - harm) / 299))
    assert got["tvd_mean_se"] == pytest.approx(np.std(ts.tvd, ddof=1) / math.sqrt(300))
    llama = summarize_direction(replace(ts, kld_llama=3 * ts.kld))
    assert llama["llama_compat"]
    assert llama["kld_confident"] == pytest.approx(3 * got["kld_confident"])
    assert llama["kld_by_conf"][2]["kld_mean"] == pytest.approx(3 * got["kld_by_conf"][2]["kld_mean"])
    assert summarize_direction(replace(ts, kld_llama=3 * ts.kld), llama_compat=False) == got
