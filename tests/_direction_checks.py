"""The direction metrics by their definitions, one token at a time from the logit rows (scipy
for the divergences), and TokenStats built from the float64 oracle: the independent side of
test_direction.py and test_compare_direction.py."""

import math
from dataclasses import fields

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax

from fidelity_kld import reference
from fidelity_kld.ops import TokenStats

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
