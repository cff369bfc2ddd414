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

from .cohort_data import Cohort

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


def flip_arrays(cohort: Cohort) -> dict[str, dict[str, np.ndarray]]:
    """{task or "composite": {"correct_to_wrong", "wrong_to_correct", "volume",
    "direction", "n_prompts"}}, each an (N,) array."""
    out = {}
    w = cohort.norm_weights()
    n = cohort.n_models
    comp = {k: np.zeros(n) for k in ("c2w", "w2c", "volume", "direction")}
    for wt, t in zip(w, cohort.tasks):
        s = cohort.scores[t]
        d = s[1:] - s[:1]
        c2w = np.clip(-d, 0, None).sum(axis=1)
        w2c = np.clip(d, 0, None).sum(axis=1)
        p = s.shape[1]
        # direction from the net count, not from two rates: models with equal net change must
        # tie exactly, or the rank correlations would break the tie on rounding
        task = dict(correct_to_wrong=c2w, wrong_to_correct=w2c, volume=(c2w + w2c) / p,
                    direction=(w2c - c2w) / p, n_prompts=np.full(n, p))
        out[t] = task
        comp["c2w"] += wt * c2w / p
        comp["w2c"] += wt * w2c / p
        comp["volume"] += wt * task["volume"]
        comp["direction"] += wt * task["direction"]
    p_all = sum(cohort.scores[t].shape[1] for t in cohort.tasks)
    out[COMPOSITE] = dict(correct_to_wrong=comp["c2w"] * p_all, wrong_to_correct=comp["w2c"] * p_all,
                          volume=comp["volume"], direction=comp["direction"], n_prompts=np.full(n, p_all))
    return out


def flips(cohort: Cohort) -> tuple[Flips, ...]:
    arrays = flip_arrays(cohort)
    rows = []
    for i, m in enumerate(cohort.models):
        for scope in (COMPOSITE, *cohort.tasks):
            a = arrays[scope]
            rows.append(Flips(m, scope, int(a["n_prompts"][i]), float(a["correct_to_wrong"][i]),
                              float(a["wrong_to_correct"][i]), float(a["volume"][i]),
                              float(a["direction"][i])))
    return tuple(rows)
