"""Volume vs direction: how much a quantized model disagrees with the reference on the
benchmark, and which way.

Per prompt, the change d = score_q - score_ref. Correct-to-wrong is the sum of the negative
parts of d (for pass/fail scores, the number of prompts the reference solved and the model
did not), wrong-to-correct the sum of the positive parts. Over P prompts:

    volume    = (correct_to_wrong + wrong_to_correct) / P    (how much moved)
    direction = (wrong_to_correct - correct_to_wrong) / P    (the net score change)

A fidelity metric that measures the volume of disagreement, not its direction, correlates
with the first and not the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cohort_data import Cohort, exact_row_sums, weighted_rates

COMPOSITE = "composite"


@dataclass(frozen=True)
class Flips:
    """One model against the reference on one task, or the composite ("composite"): its
    counts are the task-weighted fractions of prompts times the total prompt count, so
    volume and direction are the weighted means of the tasks' and counts / n_prompts are
    the weighted flip rates."""

    model: str
    task: str
    n_prompts: int
    correct_to_wrong: float
    wrong_to_correct: float
    volume: float
    direction: float


def flip_arrays(cohort: Cohort, pool: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{task or "composite": {"correct_to_wrong", "wrong_to_correct", "volume",
    "direction", "n_prompts"}}, each an (N,) array.

    The composite combines the tasks' rates with the composite's weights, or, with pool,
    counts every prompt of every task once (volume = all flips / all prompts); pooling
    changes only this decomposition, never the composite score or the zone. Either way the
    rates are formed in exact rational arithmetic (weighted_rates), so models with equal
    weighted flips tie exactly."""
    out = {}
    n = cohort.n_models
    c2w_exact, w2c_exact, sizes = [], [], []
    for t in cohort.tasks:
        s = cohort.scores[t]
        d = s[1:] - s[:1]
        p = s.shape[1]
        c2w_t = exact_row_sums(np.clip(-d, 0, None)) if _exact_diff(s) else _pair_sums(s, negative=True)
        w2c_t = exact_row_sums(np.clip(d, 0, None)) if _exact_diff(s) else _pair_sums(s, negative=False)
        c2w_exact.append(c2w_t)
        w2c_exact.append(w2c_t)
        sizes.append(p)
        c2w = np.array([float(v) for v in c2w_t])
        w2c = np.array([float(v) for v in w2c_t])
        # direction from the exact net count, not from two rounded rates: models with equal
        # net change must tie exactly, or the rank correlations would break the tie on rounding
        out[t] = dict(correct_to_wrong=c2w, wrong_to_correct=w2c,
                      volume=np.array([float((a + b) / p) for a, b in zip(c2w_t, w2c_t)]),
                      direction=np.array([float((b - a) / p) for a, b in zip(c2w_t, w2c_t)]),
                      n_prompts=np.full(n, p))
    p_all = sum(sizes)
    weights = [1.0 * p for p in sizes] if pool else [cohort.weights[t] for t in cohort.tasks]
    both = [[a + b for a, b in zip(c, w)] for c, w in zip(c2w_exact, w2c_exact)]
    net = [[b - a for a, b in zip(c, w)] for c, w in zip(c2w_exact, w2c_exact)]
    out[COMPOSITE] = dict(correct_to_wrong=weighted_rates(c2w_exact, sizes, weights) * p_all,
                          wrong_to_correct=weighted_rates(w2c_exact, sizes, weights) * p_all,
                          volume=weighted_rates(both, sizes, weights),
                          direction=weighted_rates(net, sizes, weights), n_prompts=np.full(n, p_all))
    return out


def _exact_diff(s: np.ndarray) -> bool:
    """Whether score differences are exact in floats (integer scores: pass/fail)."""
    return bool(np.all(s == np.round(s)))


def _pair_sums(s: np.ndarray, negative: bool) -> list:
    """Exact sums of the negative (or positive) parts of score_q - score_ref per model, for
    fractional scores, in rationals over the distinct (reference, model) score pairs."""
    from fractions import Fraction

    out = []
    for row in s[1:]:
        pairs, counts = np.unique(np.stack([s[0], row]), axis=1, return_counts=True)
        total = Fraction(0)
        for (r, q), c in zip(pairs.T, counts):
            diff = Fraction(float(q)) - Fraction(float(r))
            if (diff < 0) == negative and diff != 0:
                total += abs(diff) * int(c)
        out.append(total)
    return out


def flips(cohort: Cohort, pool: bool = False) -> tuple[Flips, ...]:
    arrays = flip_arrays(cohort, pool)
    rows = []
    for i, m in enumerate(cohort.models):
        for scope in (COMPOSITE, *cohort.tasks):
            a = arrays[scope]
            rows.append(Flips(m, scope, int(a["n_prompts"][i]), float(a["correct_to_wrong"][i]),
                              float(a["wrong_to_correct"][i]), float(a["volume"][i]),
                              float(a["direction"][i])))
    return tuple(rows)
