"""Routing by per-prompt KLD: on prompts where the models disagree, answer with the model
whose per-prompt KLD is lowest. Is that better than picking at random?

For a set of models, over the prompts where every one has a per-prompt KLD and their scores
are not all equal:

- accuracy: mean score of the routed model (ties in KLD go to the first model listed);
- chance: the expected score of a uniformly random pick (the mean of the models' scores);
- oracle: the best score any of them got (1 on pass/fail disagreements);
- gain over chance, per prompt (routed - chance), with a bootstrap CI over prompts;
- how often each model was picked: routing that always picks one model is that model.

Every pair of models is also routed on its own disagreements; the pairwise accuracies are
summarised against their chance level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from scipy import stats

from .cohort_data import Cohort
from .correlation import keyed_rng


@dataclass(frozen=True)
class PairRouting:
    model_a: str
    model_b: str
    n_disagree: int
    accuracy: float
    chance: float


@dataclass(frozen=True)
class Routing:
    models: tuple[str, ...]
    status: str
    n_prompts: int = 0
    n_disagree: int = 0
    accuracy: float = math.nan
    accuracy_low: float = math.nan
    accuracy_high: float = math.nan
    chance: float = math.nan
    oracle: float = math.nan
    gain: float = math.nan
    gain_low: float = math.nan
    gain_high: float = math.nan
    best_single: float = math.nan
    best_single_model: str = ""
    # which models the lowest KLD picked on the disagreement prompts: when it is always the
    # same one, "routed" is just that model and its gain over chance says nothing of routing
    picked: dict[str, int] = field(default_factory=dict)
    n_pairs: int = 0
    pair_accuracy_median: float = math.nan
    pair_accuracy_min: float = math.nan
    pair_accuracy_max: float = math.nan
    pair_chance_mean: float = math.nan
    pairs_above_chance: float = math.nan
    pairs: tuple[PairRouting, ...] = field(default=(), repr=False)
    note: str = ""


def _bootstrap_mean_ci(x: np.ndarray, n_bootstrap: int, rng) -> tuple[float, float]:
    if n_bootstrap <= 0 or x.size < 2 or np.all(x == x[0]):
        return math.nan, math.nan
    res = stats.bootstrap((x,), np.mean, vectorized=True, n_resamples=n_bootstrap,
                          method="percentile", rng=rng)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _matrices(cohort: Cohort, idx: list[int]):
    """(k, P) KLD and score over the tasks with per-prompt KLD, keeping prompts where all k
    models have a KLD."""
    tasks = [t for t in cohort.tasks if t in cohort.per_prompt_kld]
    if not tasks:
        return None, None
    kld = np.concatenate([cohort.per_prompt_kld[t][idx] for t in tasks], axis=1)
    score = np.concatenate([cohort.scores[t][[i + 1 for i in idx]] for t in tasks], axis=1)
    keep = np.all(np.isfinite(kld), axis=0)
    return kld[:, keep], score[:, keep]


def route(cohort: Cohort, models: tuple[str, ...] | None = None, *, n_bootstrap: int = 1000,
          seed: int = 0) -> Routing | None:
    """Route among `models` (default: every model with per-prompt KLD). None when the
    cohort has no per-prompt KLD at all."""
    if not cohort.per_prompt_kld:
        return None
    if models is None:
        have = np.zeros(cohort.n_models, bool)
        for k in cohort.per_prompt_kld.values():
            have |= np.isfinite(k).any(axis=1)
        models = tuple(m for m, h in zip(cohort.models, have) if h)
    unknown = [m for m in models if m not in cohort.models]
    if unknown:
        raise ValueError(f"routing: unknown model {unknown[0]!r}")
    models = tuple(models)
    if len(models) < 2:
        return Routing(models, "insufficient", note="routing needs at least 2 models with per-prompt KLD")
    idx = [cohort.models.index(m) for m in models]
    kld, score = _matrices(cohort, idx)
    n_prompts = kld.shape[1]
    disagree = score.max(axis=0) > score.min(axis=0)
    n_dis = int(disagree.sum())
    pairs = _pairs(models, kld, score)
    kw = _pair_summary(pairs)
    if n_dis == 0:
        return Routing(models, "insufficient", n_prompts, 0, pairs=pairs, **kw,
                       note="the models never disagree on prompts with per-prompt KLD")
    k, s = kld[:, disagree], score[:, disagree]
    pick = np.argmin(k, axis=0)
    routed = s[pick, np.arange(n_dis)]
    counts = np.bincount(pick, minlength=len(models))
    picked = {models[j]: int(c) for j, c in enumerate(counts) if c}
    chance_p = s.mean(axis=0)
    per_model = s.mean(axis=1)
    best = int(np.argmax(per_model))
    acc_lo, acc_hi = _bootstrap_mean_ci(routed, n_bootstrap, keyed_rng(seed, "routing", "accuracy"))
    gain_lo, gain_hi = _bootstrap_mean_ci(routed - chance_p, n_bootstrap, keyed_rng(seed, "routing", "gain"))
    return Routing(models, "ok", n_prompts, n_dis, float(routed.mean()), acc_lo, acc_hi,
                   float(chance_p.mean()), float(s.max(axis=0).mean()),
                   float((routed - chance_p).mean()), gain_lo, gain_hi,
                   float(per_model[best]), models[best], picked, pairs=pairs, **kw)


def _pairs(models, kld, score) -> tuple[PairRouting, ...]:
    out = []
    for a, b in combinations(range(len(models)), 2):
        dis = score[a] != score[b]
        n = int(dis.sum())
        if n == 0:
            out.append(PairRouting(models[a], models[b], 0, math.nan, math.nan))
            continue
        pick_a = kld[a, dis] <= kld[b, dis]
        routed = np.where(pick_a, score[a, dis], score[b, dis])
        chance = 0.5 * (score[a, dis] + score[b, dis])
        out.append(PairRouting(models[a], models[b], n, float(routed.mean()), float(chance.mean())))
    return tuple(out)


def _pair_summary(pairs) -> dict:
    acc = np.array([p.accuracy for p in pairs if p.n_disagree > 0])
    chance = np.array([p.chance for p in pairs if p.n_disagree > 0])
    if acc.size == 0:
        return {}
    return dict(n_pairs=int(acc.size), pair_accuracy_median=float(np.median(acc)),
                pair_accuracy_min=float(acc.min()), pair_accuracy_max=float(acc.max()),
                pair_chance_mean=float(chance.mean()), pairs_above_chance=float(np.mean(acc > chance)))
