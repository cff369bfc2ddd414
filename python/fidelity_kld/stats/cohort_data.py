"""The arrays a cohort analysis works on: N quantized models against one reference.

Built by stats.manifest from files, or directly (tests, notebooks) from arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .variants import BUILTIN_VARIANTS


@dataclass(frozen=True, eq=False)
class Cohort:
    """One reference and N quantized models, aligned on a common prompt set per task.

    scores[task]: (1 + N, P_task) per-prompt scores in [0, 1]; row 0 is the reference.
    variants[name]: (N,) fidelity values, NaN where a model lacks one; larger = further
        from the reference for the built-ins.
    variant_reference[name]: the variant's value for the reference against itself, where
        known (0 for distances, 1 for the PPL ratio).
    per_prompt_kld[task]: (N, P_task) per-prompt mean KLD on that task's prompts, NaN where
        missing; tasks without any are absent.
    weights[task]: composite weight (normalised when used).
    direction: the direction-aware candidates per model (stats.direction_cohort), or None.
    """

    reference: str
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    prompt_ids: dict[str, tuple[str, ...]]
    scores: dict[str, np.ndarray]
    variants: dict[str, np.ndarray]
    variant_reference: dict[str, float] = field(default_factory=dict)
    per_prompt_kld: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    size_gb: np.ndarray | None = None
    bpw: np.ndarray | None = None
    name: str = "cohort"
    notes: tuple[str, ...] = ()
    direction: object = None  # stats.direction_cohort.DirectionData: issue 16's candidates, or None

    def __post_init__(self):
        n = len(self.models)
        if n == 0:
            raise ValueError("a cohort needs at least one quantized model")
        if len(set(self.models) | {self.reference}) != n + 1:
            raise ValueError("model names must be unique and differ from the reference's")
        if not self.tasks:
            raise ValueError("a cohort needs at least one task with outcomes")
        scores = {}
        for t in self.tasks:
            if t not in self.scores or t not in self.prompt_ids:
                raise ValueError(f"task {t!r}: no scores or prompt ids")
            s = np.asarray(self.scores[t], float)
            if s.ndim != 2 or s.shape[0] != n + 1 or s.shape[1] != len(self.prompt_ids[t]):
                raise ValueError(f"task {t!r}: scores must be (1 + {n}, {len(self.prompt_ids[t])})")
            if s.shape[1] == 0:
                raise ValueError(f"task {t!r}: no prompts")
            if not np.all((s >= 0) & (s <= 1)):
                raise ValueError(f"task {t!r}: scores must lie in [0, 1] (no NaN)")
            scores[t] = s
        variants = {}
        for name, v in self.variants.items():
            v = np.asarray(v, float)
            if v.shape != (n,):
                raise ValueError(f"variant {name!r}: expected {n} values, got shape {v.shape}")
            variants[name] = v
        kld = {}
        for t, k in self.per_prompt_kld.items():
            k = np.asarray(k, float)
            if t not in scores or k.shape != (n, scores[t].shape[1]):
                raise ValueError(f"per-prompt KLD for task {t!r} must be ({n}, prompts)")
            kld[t] = k
        weights = {t: float(self.weights.get(t, 1.0)) for t in self.tasks}
        for t, w in weights.items():
            if not (np.isfinite(w) and w >= 0):
                raise ValueError(f"task {t!r}: weight must be a finite number >= 0")
        if sum(weights.values()) <= 0:
            raise ValueError("task weights sum to zero")
        ref_values = {spec.name: spec.reference_value for spec in BUILTIN_VARIANTS}
        ref_values.update(self.variant_reference)
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "prompt_ids", {t: tuple(self.prompt_ids[t]) for t in self.tasks})
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "variants", variants)
        object.__setattr__(self, "per_prompt_kld", kld)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "variant_reference", ref_values)
        for attr in ("size_gb", "bpw"):
            v = getattr(self, attr)
            v = np.full(n, np.nan) if v is None else np.asarray(v, float)
            if v.shape != (n,):
                raise ValueError(f"{attr}: expected {n} values")
            object.__setattr__(self, attr, v)

    @property
    def n_models(self) -> int:
        return len(self.models)

    def norm_weights(self) -> np.ndarray:
        w = np.array([self.weights[t] for t in self.tasks], float)
        return w / w.sum()

    def task_scores(self) -> np.ndarray:
        """(1 + N, T) mean score per model and task."""
        return np.stack([self.scores[t].mean(axis=1) for t in self.tasks], axis=1)

    def composite(self) -> np.ndarray:
        """(1 + N,) weighted mean of task scores; element 0 is the reference. Computed in
        exact rational arithmetic and rounded once, so models whose weighted scores are
        equal tie exactly whatever the weights (see weighted_rates)."""
        return weighted_rates([exact_row_sums(self.scores[t]) for t in self.tasks],
                              [self.scores[t].shape[1] for t in self.tasks],
                              [self.weights[t] for t in self.tasks])


def exact_row_sums(values: np.ndarray) -> list[Fraction]:
    """The exact sum of each row of a float array, as Fractions. Every float is a binary
    fraction, so summing the distinct values times their counts in rational arithmetic has
    no rounding at all; rows of 0/1 scores take a fast integer path."""
    values = np.asarray(values, float)
    if np.all(values == np.round(values)) and np.abs(values).max(initial=0) < 2 ** 52 / max(values.shape[-1], 1):
        return [Fraction(int(v)) for v in values.sum(axis=-1)]  # integer sums are exact in float64
    out = []
    for row in values:
        uniq, counts = np.unique(row, return_counts=True)
        out.append(sum((Fraction(float(v)) * int(c) for v, c in zip(uniq, counts)), Fraction(0)))
    return out


def weighted_rates(totals: list[list[Fraction]], n_prompts: list[int], weights: list[float]) -> np.ndarray:
    """sum_t w_t * totals[t][i] / n_prompts[t] / sum_t w_t per model i, in exact rationals
    rounded once to float. A weighted sum of per-task rates in floats rounds each term, so
    two models losing (5, 4) and (4, 5) prompts of tasks of 560 and 800 prompts weighted by
    size come out 1 ulp apart (-0.0066176470588235285 and -0.00661764705882353), and a rank
    correlation then breaks a tie that is not there."""
    w = [Fraction(float(x)) for x in weights]
    total_w = sum(w, Fraction(0))
    n_rows = len(totals[0])
    return np.array([float(sum((wt * tot[i] / p for wt, tot, p in zip(w, totals, n_prompts)), Fraction(0))
                           / total_w) for i in range(n_rows)])
