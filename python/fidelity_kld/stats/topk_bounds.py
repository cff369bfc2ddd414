r"""Bounds on KL(P_ref || P_q) when one side or both are known only by their top k.

Design (also in README, "Smaller dumps")
----------------------------------------
Per position, P = the reference's next-token distribution, Q = the quant's, over V ids. A
top-k side tells, for its set S of k ids, the exact log-probs; its tail mass r = 1 - sum_S;
its cap c = the k-th largest probability (every id outside S has probability <= c, since S
holds the k largest); and, where the writer saw the full row, a floor f <= every
probability of the row (`floor_logprob`). A full side tells everything.

Write C for the ids whose probability is known on *both* sides (S_P ∩ S_Q; S_Q when P is
full; S_P when Q is full) and R = V \ C for the rest. Then exactly

    KL(P||Q) = sum_{i in C} p_i log(p_i/q_i)  +  sum_{i in R} p_i log(p_i/q_i).      (1)

The first sum is known; only the second is not.

Lower bound. Merge R into one bucket. P(R) = 1 - sum_C p_i and Q(R) = 1 - sum_C q_i are
known (P(R) = r_P + the P-mass of S_P \ S_Q, likewise for Q, formed that way so near-1 sums
do not cancel). The coarse-grained pair (p_C, P(R)), (q_C, Q(R)) are two distributions over
|C| + 1 categories, and

    lower = sum_C p_i log(p_i/q_i) + P(R) log(P(R)/Q(R))  <=  KL(P||Q)

by the data-processing inequality (merging categories never increases a KL divergence;
equivalently the log-sum inequality on R). It is >= 0 (a KL divergence itself). An id in
S_P but not in S_Q must go to R on *both* sides: its q is unknown (only <= c_Q), so it
cannot be a category of its own with a value. The truncated sum over the top k alone
(without the bucket) is not a bound of anything and can be negative; it is never reported.

Finer lower bound (the reported one is the larger of the two). Keep the ids of R whose p is
known (A = S_P \ S_Q; all of R when P is full) as cells of their own and merge only the
rest (M). Their q_i are unknown, but any admissible Q has q_i <= c_Q and
sum_A q_i + Q(M) = Q(R); so min over those q of the KL of this finer coarse-graining is
still <= KL(P||Q) (the true q is one of them, and merging never increases KL). The
minimum is explicit (convex, KKT): q_i = min(c_Q, kappa p_i), Q(M) = kappa P(M), kappa
fixed by the total ("water-filling"). Without the cap it is the one-bucket bound (log-sum
inequality); it is larger exactly when a high-probability reference id lies outside the
quant's top k, where the cap forbids q from following p. Dropping the other constraints
(q_i >= f_Q, Q(M) >= Q-known mass in M) only enlarges the feasible set, so the minimum
stays a lower bound. With Q full and P top-k the same holds with the roles swapped: the
unknown p_i over R are <= c_P and sum to r_P, and min sum p_i log(p_i/q_i) is at
p_i = min(c_P, kappa q_i).

Upper bound. Bound each term of the second sum of (1). For i in R, p_i <= pbar_i with
pbar_i = p_i where known, else c_P; and q_i >= qlow_i with qlow_i = q_i where known, else
f_Q. So p_i log(p_i/q_i) <= p_i log(pbar_i/qlow_i) (for p_i = 0 both are 0). Where p_i is
known this is p_i log(p_i/qlow_i). Where it is not (ids outside S_P; only their total r_P
and the cap c_P are known) the right side is linear in the unknown p_i, so its maximum over
{0 <= p_i <= c_P, sum p_i = r_P} fills the ids with the largest coefficient log(c_P/qlow_i)
first, c_P each, until r_P is used up. Ids unseen on both sides all share the largest
coefficient log(c_P/f_Q) (f_Q <= any known q), and there are V - |S_P ∪ S_Q| of them, so
they fill first; what is left (only when V is small) goes to the Q-known ids with the
smallest q. Hence

    upper = sum_C p_i log(p_i/q_i) + sum_{i in R, p known} p_i log(p_i/qlow_i)
            + greedy fill of r_P over the ids of R whose p is unknown.

Assumptions for a finite upper bound: wherever q_i is unknown and p_i may be positive, a
floor f_Q > 0 is needed. Without it (vLLM's log-probs carry none) an unseen q_i may be as
close to 0 as it likes and the KL is unbounded: upper = +inf, reported as such. With Q full
no floor is needed (every q_i is known; the greedy fill sorts the actual q of R), and with P
full nothing about P is unknown. A masked quant entry (q_i = 0, floor -inf) where p may
be positive gives +inf too, as the full KLD would.

Storage effects: the stored log-probs are float32 (about 6e-8 relative), so a bound can
miss the full-precision KL by that much when it is tight (k near V); tests allow for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..io.topk import TopKLogprobs
from .summary import Distribution, KLD_PERCENTILES, _label_stats

MATCH_ELEMENTS = 1 << 22  # rows x k x k booleans per id-matching block
DENSE_ELEMENTS = 1 << 22  # rows x V per dense block (full side)


@dataclass(frozen=True)
class TopKSide:
    """One model's known part for a block of rows, in float64.

    ids [n, m] (-1 absent), logp [n, m] (-inf absent), tail [n] (mass outside ids, >= 0),
    cap [n] (the largest probability an id outside `ids` can have), log_floor [n] (a lower
    bound on every log-prob of the row; -inf when unknown)."""

    ids: np.ndarray
    logp: np.ndarray
    tail: np.ndarray
    cap: np.ndarray
    log_floor: np.ndarray

    @staticmethod
    def of(t: TopKLogprobs) -> "TopKSide":
        ids = np.asarray(t.token_ids, dtype=np.int64)
        logp = np.where(ids >= 0, t.logprobs.astype(np.float64), -np.inf)
        logp = np.minimum(logp, 0.0)  # float rounding of log(1) (validated to <= 1e-6)
        tail = np.clip(t.tail_mass(), 0.0, 1.0)
        with np.errstate(under="ignore"):
            cap = np.exp(np.min(logp, axis=1, initial=0.0, where=ids >= 0))
        floor = (np.full(ids.shape[0], -np.inf) if t.floor_logprob is None
                 else np.where(np.isnan(t.floor_logprob), -np.inf, t.floor_logprob.astype(np.float64)))
        return TopKSide(ids, logp, tail, cap, floor)


def _mass_term(p, logp, logq):
    """p * (logp - logq), 0 where p == 0 (whatever logq), +inf where p > 0 and logq = -inf."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(p > 0, p * (logp - logq), 0.0)


def _bucket_term(a, b):
    """a log(a/b) for masses a, b >= 0 (0 log 0/b = 0; a > 0 = b gives +inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _mass_term(a, np.log(a), np.log(b))


def _exp(x):
    with np.errstate(under="ignore"):
        return np.exp(x)


def _greedy_fill(mass, cap, coef_sorted, n_valid, overflow_coef):
    """max sum_j w_j coef_j over 0 <= w_j <= cap, sum_j w_j = mass, where the first
    n_valid [n] columns of coef_sorted [n, m] are the candidate ids in decreasing order of
    coefficient: fill each to cap until mass is used up. Mass beyond n_valid * cap cannot
    exist for a true top-k (it is rounding, or inconsistent input); it is given
    overflow_coef [n], chosen by the caller to keep the result a bound."""
    m = coef_sorted.shape[1]
    j = np.arange(m)[None, :]
    w = np.clip(mass[:, None] - j * cap[:, None], 0.0, cap[:, None])
    w = np.where(j < n_valid[:, None], w, 0.0)
    left = np.maximum(mass - w.sum(axis=1), 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        filled = np.where(w > 0, w * coef_sorted, 0.0).sum(axis=1)
        return filled + np.where(left > 0, left * overflow_coef, 0.0)


def _water_fill(w, cap, total, free):
    """Solve x_j = min(cap, kappa * w_j) (w [n, m] >= 0 sorted in decreasing order, cap [n])
    with sum_j x_j + kappa * free = total (free [n] >= 0: an uncapped weight). Returns
    (x [n, m], kappa [n], ok [n]); ok is False where no solution exists (the capped entries
    cannot hold the total and nothing uncapped is left), and there x, kappa are meaningless.

    This is the KKT point of min sum_j w_j log(w_j / x_j) + free log(free / (kappa free)) over
    0 <= x_j <= cap with the total fixed (the optimum is proportional to w below the cap), a
    convex problem, so the point is its exact minimum."""
    n, m = w.shape
    tail = np.concatenate([np.cumsum(w[:, ::-1], axis=1)[:, ::-1], np.zeros((n, 1))], axis=1)
    j = np.arange(m + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        room = total[:, None] - j * cap[:, None]  # what is left for the uncapped entries
        kappa = room / (tail + free[:, None])
        w_next = np.concatenate([w, np.zeros((n, 1))], axis=1)
        fits = (room >= 0) & (kappa * w_next <= cap[:, None] * (1 + 1e-12)) & np.isfinite(kappa)
        # where nothing is uncapped (tail + free == 0) the capped entries must hold it all
        fits |= (room >= -1e-15 * np.abs(total[:, None])) & (tail + free[:, None] == 0) & (j <= m)
    ok = fits.any(axis=1)
    k = np.argmax(fits, axis=1)
    kap = np.take_along_axis(kappa, k[:, None], axis=1)[:, 0]
    kap = np.where(np.isfinite(kap), kap, 0.0)
    x = np.where(np.arange(m)[None, :] < k[:, None], cap[:, None], kap[:, None] * w)
    return x, kap, ok


def _refined_lower_known_p(p_sorted, logp_sorted, cap_q, q_total, p_free):
    """min over the unknown q of sum_i p_i log(p_i / q_i) + p_free log(p_free / q_free), where
    the p_i (sorted decreasing) are known, each q_i <= cap_q, and sum q_i + q_free = q_total:
    the KL of a finer coarse-graining than the one bucket, minimised over every q the dump
    allows, hence still <= the full KL; +inf where q_total cannot be placed."""
    x, kappa, ok = _water_fill(p_sorted, cap_q, q_total, p_free)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = _mass_term(p_sorted, logp_sorted, np.log(x)).sum(axis=1)
        free = _mass_term(p_free, np.log(p_free), np.log(kappa * p_free))
    return np.where(ok, terms + free, -np.inf)


def _match(p_ids, q_ids):
    """For each P entry, the index of the Q entry with the same id (-1 if none)."""
    eq = (p_ids[:, :, None] == q_ids[:, None, :]) & (p_ids[:, :, None] >= 0)
    hit = eq.any(axis=2)
    return np.where(hit, np.argmax(eq, axis=2), -1)


def bounds_topk_topk(P: TopKSide, Q: TopKSide, vocab: int | None):
    """(lower, upper) per row when both sides are top-k (vocab None: unknown, treated as
    unlimited room for unseen ids, which only loosens the upper bound)."""
    j = _match(P.ids, Q.ids)
    in_c_p = j >= 0
    logq_at = np.where(in_c_p, np.take_along_axis(Q.logp, np.maximum(j, 0), axis=1), -np.inf)
    p = _exp(P.logp)
    q = _exp(Q.logp)
    exact_c = _mass_term(np.where(in_c_p, p, 0.0), P.logp, logq_at).sum(axis=1)
    in_c_q = np.zeros(Q.ids.shape, dtype=bool)
    rows = np.nonzero(in_c_p)
    in_c_q[rows[0], j[rows]] = True
    in_a = (P.ids >= 0) & ~in_c_p  # p known, q unknown
    in_b = (Q.ids >= 0) & ~in_c_q  # q known, p unknown
    p_rest = P.tail + np.where(in_a, p, 0.0).sum(axis=1)
    q_rest = Q.tail + np.where(in_b, q, 0.0).sum(axis=1)
    lower = exact_c + _bucket_term(p_rest, q_rest)
    # finer: P's ids outside Q's top k as cells of their own (q_i <= Q's cap), the rest merged
    order = np.argsort(-np.where(in_a, p, -1.0), axis=1, kind="stable")
    p_a = np.take_along_axis(np.where(in_a, p, 0.0), order, axis=1)
    logp_a = np.take_along_axis(np.where(in_a, P.logp, -np.inf), order, axis=1)
    finer = exact_c + _refined_lower_known_p(p_a, logp_a, Q.cap, q_rest, P.tail)
    lower = np.maximum(np.maximum(lower, finer), 0.0)

    known_a = _mass_term(np.where(in_a, p, 0.0), P.logp, Q.log_floor[:, None]).sum(axis=1)
    log_cap = np.log(np.maximum(P.cap, np.finfo(np.float64).tiny))
    n_union = (P.ids >= 0).sum(axis=1) + in_b.sum(axis=1)
    n_unseen = np.full(P.tail.shape, np.inf) if vocab is None else np.maximum(vocab - n_union, 0)
    with np.errstate(invalid="ignore"):  # inf * 0 where the cap is 0: no room at all
        room = np.where(P.cap > 0, n_unseen * P.cap, 0.0)
    to_unseen = np.minimum(P.tail, room)
    unseen = _mass_term(to_unseen, log_cap, Q.log_floor)
    # the rest over the q-known ids of B, smallest q (largest coefficient) first
    logq_b = np.sort(np.where(in_b, Q.logp, np.inf), axis=1)
    with np.errstate(invalid="ignore"):
        coef_b = log_cap[:, None] - logq_b
    rest = _greedy_fill(P.tail - to_unseen, P.cap, coef_b, in_b.sum(axis=1), log_cap - Q.log_floor)
    upper = exact_c + known_a + unseen + rest
    return lower, np.maximum(upper, lower)


def bounds_full_topk(logp_ref: np.ndarray, Q: TopKSide):
    """(lower, upper) per row: reference full ([n, V] float64 log-probs), quant top-k."""
    present = Q.ids >= 0
    logp_at = np.where(present, np.take_along_axis(logp_ref, np.maximum(Q.ids, 0), axis=1), -np.inf)
    exact_c = _mass_term(_exp(logp_at), logp_at, Q.logp).sum(axis=1)
    outside = np.ones(logp_ref.shape, dtype=bool)
    r, c = np.nonzero(present)
    outside[r, Q.ids[r, c]] = False
    p = _exp(logp_ref)
    p_rest = np.where(outside, p, 0.0).sum(axis=1)
    lower = exact_c + _bucket_term(p_rest, Q.tail)
    # finer: every id outside Q's top k as its own cell, q_i <= Q's cap (water-filling)
    p_out = -np.sort(-np.where(outside, p, 0.0), axis=1)
    with np.errstate(divide="ignore"):
        finer = exact_c + _refined_lower_known_p(p_out, np.log(p_out), Q.cap, Q.tail,
                                                 np.zeros_like(Q.tail))
    lower = np.maximum(np.maximum(lower, finer), 0.0)
    with np.errstate(invalid="ignore"):
        negent_rest = np.where(outside & (p > 0), p * logp_ref, 0.0).sum(axis=1)
        floor_part = np.where(p_rest > 0, -p_rest * Q.log_floor, 0.0)
    upper = exact_c + negent_rest + floor_part
    return lower, np.maximum(upper, lower)


def bounds_topk_full(P: TopKSide, logq: np.ndarray):
    """(lower, upper) per row: reference top-k, quant full ([n, V] float64 log-probs)."""
    present = P.ids >= 0
    logq_at = np.where(present, np.take_along_axis(logq, np.maximum(P.ids, 0), axis=1), -np.inf)
    exact_c = _mass_term(_exp(P.logp), P.logp, logq_at).sum(axis=1)
    outside = np.ones(logq.shape, dtype=bool)
    r, c = np.nonzero(present)
    outside[r, P.ids[r, c]] = False
    q_rest = np.where(outside, _exp(logq), 0.0).sum(axis=1)
    lower = exact_c + _bucket_term(P.tail, q_rest)
    # finer: every id outside P's top k as its own cell with p_i <= P's cap: the p that
    # minimises sum p_i log(p_i / q_i) with sum p_i = r_P is min(cap, kappa q_i)
    q_out = -np.sort(-np.where(outside, _exp(logq), 0.0), axis=1)
    x, _, ok = _water_fill(q_out, P.cap, P.tail, np.zeros_like(P.tail))
    with np.errstate(divide="ignore", invalid="ignore"):
        finer = exact_c + _mass_term(x, np.log(x), np.log(q_out)).sum(axis=1)
    lower = np.maximum(np.maximum(lower, np.where(ok, finer, -np.inf)), 0.0)
    log_cap = np.log(np.maximum(P.cap, np.finfo(np.float64).tiny))
    n_fill = int(np.max(np.ceil(np.divide(P.tail, P.cap, out=np.zeros_like(P.tail),
                                          where=P.cap > 0)))) + 1
    n_fill = min(max(n_fill, 1), logq.shape[1])
    masked = np.where(outside, logq, np.inf)
    if n_fill < logq.shape[1]:
        masked = np.partition(masked, n_fill - 1, axis=1)[:, :n_fill]
    smallest = np.sort(masked, axis=1)
    with np.errstate(invalid="ignore"):
        coef = log_cap[:, None] - smallest
    n_valid = np.minimum(outside.sum(axis=1), n_fill)
    # overflow: only rounding when every id is known; the best coefficient keeps it a bound
    overflow = np.where(n_valid > 0, coef[:, 0], 0.0)
    upper = exact_c + _greedy_fill(P.tail, P.cap, coef, n_valid, overflow)
    return lower, np.maximum(upper, lower)


@dataclass(frozen=True)
class TopKTokenStats:
    """Per-token results of a comparison where a side is a top-k dump, in nats.

    kld_lower <= KL(P_ref || P_q) <= kld_upper (upper +inf when it cannot be bounded);
    top1_*: the top id of each side (exact for k >= 1); with label log-probs on both sides:
    nll_* and delta_p = p_q(y) - p_ref(y) (NaN where a side lacks it)."""

    kld_lower: np.ndarray
    kld_upper: np.ndarray
    top1_ref: np.ndarray
    top1_q: np.ndarray
    labels: np.ndarray | None = None
    nll_ref: np.ndarray | None = None
    nll_q: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.kld_lower.shape[0])

    @property
    def top1_agree(self) -> np.ndarray:
        return self.top1_ref == self.top1_q

    @property
    def delta_p(self) -> np.ndarray | None:
        return None if self.nll_q is None else np.exp(-self.nll_q) - np.exp(-self.nll_ref)

    @property
    def gap(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.kld_upper - self.kld_lower

    @staticmethod
    def concat(parts: list["TopKTokenStats"]) -> "TopKTokenStats":
        def cat(name):
            vals = [getattr(p, name) for p in parts]
            return None if any(v is None for v in vals) else np.concatenate(vals)
        return TopKTokenStats(*(cat(n) for n in ("kld_lower", "kld_upper", "top1_ref", "top1_q",
                                                 "labels", "nll_ref", "nll_q")))


def full_logprobs(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (the full side of a mixed comparison)."""
    from ..io.topk import _log_softmax64

    return _log_softmax64(logits)


def _side_label_nll(side, labels):
    if isinstance(side, TopKLogprobs):
        return -side.label_logprob.astype(np.float64)
    return -side[np.arange(side.shape[0]), labels]


def token_bounds(ref, q, *, vocab: int | None = None, labels=None) -> TopKTokenStats:
    """Per-token bounds for one block of rows. ref, q: a TopKLogprobs or [n, V] float64
    log-probs (full_logprobs); at least one must be top-k. labels: [n] ids, needed for
    the label terms when a side is full (a top-k side carries its own label log-prob)."""
    ref_topk, q_topk = isinstance(ref, TopKLogprobs), isinstance(q, TopKLogprobs)
    if ref_topk and q_topk:
        lower, upper = _blocked(lambda s: bounds_topk_topk(TopKSide.of(ref.rows(*s)),
                                                           TopKSide.of(q.rows(*s)), vocab),
                                ref.n_rows, max(ref.k, q.k) ** 2, MATCH_ELEMENTS)
    elif ref_topk:
        lower, upper = _blocked(lambda s: bounds_topk_full(TopKSide.of(ref.rows(*s)), q[s[0]:s[1]]),
                                ref.n_rows, q.shape[1], DENSE_ELEMENTS)
    elif q_topk:
        lower, upper = _blocked(lambda s: bounds_full_topk(ref[s[0]:s[1]], TopKSide.of(q.rows(*s))),
                                q.n_rows, ref.shape[1], DENSE_ELEMENTS)
    else:
        raise ValueError("token_bounds needs a top-k side; full vs full goes through compare()")
    top1_ref = ref.token_ids[:, 0] if ref_topk else np.argmax(ref, axis=1)
    top1_q = q.token_ids[:, 0] if q_topk else np.argmax(q, axis=1)
    if labels is None:
        labels = next((t.label for t in (ref, q) if isinstance(t, TopKLogprobs)), None)
    nll_ref = nll_q = None
    if labels is not None and (labels >= 0).all():
        nll_ref, nll_q = _side_label_nll(ref, labels), _side_label_nll(q, labels)
    return TopKTokenStats(lower, upper, top1_ref.astype(np.int64), top1_q.astype(np.int64),
                          labels, nll_ref, nll_q)


def _blocked(fn, n, per_row, budget):
    rows = max(1, budget // max(per_row, 1))
    parts = [fn((s, min(s + rows, n))) for s in range(0, n, rows)]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


GAP_THRESHOLD = 0.01  # nats: a token whose bounds are further apart is counted


def summarize_topk(st: TopKTokenStats, *, gap_threshold: float = GAP_THRESHOLD) -> dict:
    """Summary of bounded results: the lower bound's distribution (mean with SE, median,
    percentiles), the upper bound's mean and how many tokens it leaves unbounded, the gap,
    top-1 agreement with its binomial SE, and the label terms where both sides carry them."""
    n = st.n_tokens
    lower, upper = st.kld_lower, st.kld_upper
    agree = st.top1_agree
    p_same = float(agree.mean()) if n else math.nan
    finite = np.isfinite(upper)
    gap = st.gap
    out = {
        "n_tokens": n,
        "kld_lower": Distribution.of(lower, KLD_PERCENTILES).__dict__,
        "kld_upper": {"mean": float(np.mean(upper)) if n else math.nan,
                      "mean_where_bounded": float(np.mean(upper[finite])) if finite.any() else math.nan,
                      "n_unbounded": int((~finite).sum()),
                      "median": float(np.median(upper)) if n else math.nan},
        "gap": {"threshold": gap_threshold,
                "n_above_threshold": int((gap > gap_threshold).sum()),
                "median": float(np.median(gap)) if n else math.nan},
        "same_top": p_same,
        "same_top_se": math.sqrt(p_same * (1 - p_same) / (n - 1)) if n > 1 else math.nan,
        "has_labels": False,
    }
    if st.nll_ref is not None:
        ok = np.isfinite(st.nll_ref) & np.isfinite(st.nll_q)
        out["n_label_tokens"] = int(ok.sum())
        if ok.any():
            ls = _label_stats(st.nll_ref[ok], st.nll_q[ok], st.delta_p[ok], False)
            ls["delta_p"] = ls["delta_p"].__dict__
            out.update(ls)
    return out
