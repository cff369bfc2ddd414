"""Per-prompt failure prediction: does a prompt's KLD say whether the model fails it?

For each model, over the prompts that have both an outcome and a per-prompt KLD: the
geometric-mean ratio of per-prompt KLD on failed vs passed prompts (exp of the difference
of mean log KLDs; a bootstrap CI resamples each group), and the AUROC of per-prompt KLD as
a failure score (Mann-Whitney U / (n_failed n_passed); ties count half; p one-sided, failed
prompts having the higher KLD). The flip AUROC asks the sharper question, among prompts the
reference passed only: does KLD single out the ones quantization broke?

A prompt fails when its score is below `fail_below` (0.5: a wrong answer, or a pass@1
under one half). Per-prompt KLDs at or below zero (identical outputs) are floored at
KLD_FLOOR before the logs, and counted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .cohort_data import Cohort
from .correlation import keyed_rng

KLD_FLOOR = 1e-12
MIN_GROUP = 2


@dataclass(frozen=True)
class FailurePrediction:
    model: str
    tasks: tuple[str, ...]
    status: str
    n_prompts: int = 0
    n_failed: int = 0
    n_passed: int = 0
    gm_ratio: float = math.nan
    gm_ratio_low: float = math.nan
    gm_ratio_high: float = math.nan
    auroc: float = math.nan
    auroc_p: float = math.nan
    n_floored: int = 0
    flip_n: int = 0
    flip_n_broken: int = 0
    flip_auroc: float = math.nan
    flip_auroc_p: float = math.nan
    flip_gm_ratio: float = math.nan
    note: str = ""


def _mean_log_diff(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _auroc(failed, passed) -> tuple[float, float]:
    if failed.size == 0 or passed.size == 0:
        return math.nan, math.nan
    res = stats.mannwhitneyu(failed, passed, alternative="greater")
    return float(res.statistic) / (failed.size * passed.size), float(res.pvalue)


def failure_prediction(cohort: Cohort, *, fail_below: float = 0.5, n_bootstrap: int = 1000,
                       seed: int = 0) -> tuple[FailurePrediction, ...]:
    tasks = tuple(t for t in cohort.tasks if t in cohort.per_prompt_kld)
    if not tasks:
        return ()
    out = []
    for i, m in enumerate(cohort.models):
        kld = np.concatenate([cohort.per_prompt_kld[t][i] for t in tasks])
        score = np.concatenate([cohort.scores[t][i + 1] for t in tasks])
        ref = np.concatenate([cohort.scores[t][0] for t in tasks])
        have = np.isfinite(kld)
        if not have.any():
            out.append(FailurePrediction(m, tasks, "unavailable", note="no per-prompt KLD"))
            continue
        kld, score, ref = kld[have], score[have], ref[have]
        failed = score < fail_below
        n_floored = int(np.sum(kld <= KLD_FLOOR))
        logk = np.log(np.maximum(kld, KLD_FLOOR))
        n_f, n_p = int(failed.sum()), int((~failed).sum())
        kw = dict(n_prompts=int(kld.size), n_failed=n_f, n_passed=n_p, n_floored=n_floored)
        ref_passed = ref >= fail_below
        broken = failed[ref_passed]
        kw.update(flip_n=int(ref_passed.sum()), flip_n_broken=int(broken.sum()))
        # the quantization's own failures: among the prompts the reference passes, does KLD
        # single out the ones the model broke?
        kb, kk = kld[ref_passed][broken], kld[ref_passed][~broken]
        kw["flip_auroc"], kw["flip_auroc_p"] = _auroc(kb, kk)
        if kb.size >= MIN_GROUP and kk.size >= MIN_GROUP:
            lb, lk = logk[ref_passed][broken], logk[ref_passed][~broken]
            kw["flip_gm_ratio"] = float(np.exp(_mean_log_diff(lb, lk)))
        if n_f < MIN_GROUP or n_p < MIN_GROUP:
            out.append(FailurePrediction(m, tasks, "insufficient",
                                         note=f"{n_f} failed and {n_p} passed prompts; need {MIN_GROUP} of each",
                                         **kw))
            continue
        lf, lp = logk[failed], logk[~failed]
        kw["gm_ratio"] = float(np.exp(_mean_log_diff(lf, lp)))
        if n_bootstrap > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", stats.DegenerateDataWarning)
                res = stats.bootstrap((lf, lp), _mean_log_diff, vectorized=True, n_resamples=n_bootstrap,
                                      method="percentile",
                                      rng=keyed_rng(seed, "failure", m))
            kw["gm_ratio_low"] = float(np.exp(res.confidence_interval.low))
            kw["gm_ratio_high"] = float(np.exp(res.confidence_interval.high))
        kw["auroc"], kw["auroc_p"] = _auroc(kld[failed], kld[~failed])
        out.append(FailurePrediction(m, tasks, "ok", **kw))
    return tuple(out)
