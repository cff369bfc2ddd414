"""The silent zone: quantized models whose composite score is within a pre-specified relative
threshold of the reference's, and the checks that say what a correlation inside it means.

- zone_mask: |composite_q / composite_ref - 1| <= threshold, fixed before any fidelity
  number is looked at.
- holdout: choose the zone on a random half of every task's prompts, measure the
  correlation on the other half; repeated, vectorised over repetitions.
- range_restriction_null: the rho the zone would show if the full-cohort relation held
  inside it, given the zone's narrower range and the benchmark's own sampling noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression

from .cohort_data import Cohort
from .correlation import MIN_MODELS, Correlation, masked_rank_corr, rank_corr

# Comparisons with the threshold forgive rounding in the composite (0.686 / 0.7 - 1 is
# -0.020000000000000018, and 2% must include it).
_EPS = 1e-12
NULL_ALPHA = 0.05
NO_ANCHOR_NOTE = ("no reference value for this variant: the fit has no anchor at the reference, "
                  "so the null is flat near it and cannot reject")


def relative_change(composite: np.ndarray) -> np.ndarray:
    """(composite_q - composite_ref) / composite_ref along the last axis; column 0 is the
    reference. NaN where the reference scores 0."""
    comp = np.asarray(composite, float)
    ref = comp[..., :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 0, (comp[..., 1:] - ref) / np.where(ref > 0, ref, 1.0), np.nan)


def zone_mask(rel: np.ndarray, threshold: float) -> np.ndarray:
    return np.abs(rel) <= threshold + _EPS


# ---------------------------------------------------------------------------- hold-out

@dataclass(frozen=True)
class Holdout:
    """The zone drawn from a random half of every task's prompts, the correlation measured
    on the other half, `reps` times. rho_* summarise the reps whose zone had at least 4
    models (insufficient_fraction had fewer); full_rho_* is the full cohort on the same
    measurement halves, for comparison."""

    variant: str
    reps: int
    status: str
    zone_size_median: float = math.nan
    zone_size_low: float = math.nan
    zone_size_high: float = math.nan
    insufficient_fraction: float = math.nan
    undefined_fraction: float = math.nan
    rho_median: float = math.nan
    rho_low: float = math.nan
    rho_high: float = math.nan
    full_rho_median: float = math.nan
    full_rho_low: float = math.nan
    full_rho_high: float = math.nan
    note: str = ""


def split_half_composites(cohort: Cohort, reps: int, rng: np.random.Generator):
    """(composite on half A, composite on half B), each (reps, 1 + N): every task's prompts
    are split in half independently in each repetition."""
    w = cohort.norm_weights()
    comp_a = np.zeros((reps, cohort.n_models + 1))
    comp_b = np.zeros_like(comp_a)
    for wt, t in zip(w, cohort.tasks):
        s = cohort.scores[t]
        p = s.shape[1]
        half = p // 2
        order = np.argsort(rng.random((reps, p)), axis=1)
        in_a = np.zeros((reps, p), bool)
        np.put_along_axis(in_a, order[:, :half], True, axis=1)
        comp_a += wt * (in_a @ s.T) / half
        comp_b += wt * (~in_a @ s.T) / (p - half)
    return comp_a, comp_b


def holdout(cohort: Cohort, variant_values: dict[str, np.ndarray], threshold: float,
            reps: int, rng: np.random.Generator) -> tuple[dict[str, Holdout], dict[str, np.ndarray]]:
    """Hold-out summaries per variant, and each variant's per-repetition zone rho (NaN
    where that repetition's zone had no defined rho)."""
    if reps <= 0:
        return {name: Holdout(name, 0, "skipped", note="no repetitions requested")
                for name in variant_values}, {}
    small = [t for t in cohort.tasks if cohort.scores[t].shape[1] < 2]
    if small:
        return {name: Holdout(name, reps, "unavailable", note=f"task {small[0]!r} has fewer than 2 prompts")
                for name in variant_values}, {}
    comp_a, comp_b = split_half_composites(cohort, reps, rng)
    zone_a = zone_mask(relative_change(comp_a), threshold)
    y = comp_b[:, 1:]
    out, draws = {}, {}
    for name, x in variant_values.items():
        rho, n = masked_rank_corr(x[None, :], y, zone_a)
        draws[name] = rho
        full, _ = masked_rank_corr(x[None, :], y, np.ones_like(zone_a))
        sufficient = n >= MIN_MODELS
        defined = rho[np.isfinite(rho)]
        kw = dict(zone_size_median=float(np.median(n)),
                  zone_size_low=float(np.percentile(n, 2.5)),
                  zone_size_high=float(np.percentile(n, 97.5)),
                  insufficient_fraction=float(1 - sufficient.mean()),
                  undefined_fraction=float((sufficient & ~np.isfinite(rho)).mean()))
        if np.isfinite(full).any():
            f = full[np.isfinite(full)]
            kw.update(full_rho_median=float(np.median(f)), full_rho_low=float(np.percentile(f, 2.5)),
                      full_rho_high=float(np.percentile(f, 97.5)))
        if defined.size:
            kw.update(rho_median=float(np.median(defined)), rho_low=float(np.percentile(defined, 2.5)),
                      rho_high=float(np.percentile(defined, 97.5)))
            out[name] = Holdout(name, reps, "ok", **kw)
        else:
            out[name] = Holdout(name, reps, "insufficient",
                                note="no repetition gave a zone of 4 or more models with a defined rho", **kw)
    return out, draws


# ---------------------------------------------------------------- range-restriction null

@dataclass(frozen=True)
class RangeNull:
    """What rho the zone would show if the full-cohort relation held inside it.

    The relation is a monotone fit of composite on the variant (isotonic regression in the
    full-cohort rho's direction, joined by straight lines; see monotone_fit),
    fitted to the models outside the zone plus the reference itself (the variant's value
    for the reference against itself, its own composite). Leaving the zone's own points out
    keeps the null from being fitted to the very scores it is compared with: a scrambled
    zone would otherwise flatten the fit and "explain" itself. Each draw puts every model
    on the fitted curve, adds its composite deviation under one bootstrap resample of the
    prompts (shared across models and the reference, as the prompts are), selects the
    zone again from those simulated scores (selection on the benchmark is part of what
    narrows the zone) and ranks within it. The fit is itself made from noisy scores, so each
    draw first refits it on the fitted values plus another resample's deviations (a
    parametric bootstrap of the fit), with that resample's deviations taken relative to its
    own reference so the fit keeps its pairing with the reference; models that flipped
    fewer prompts than the curve says they lose get the missing flip-count noise
    (_flip_floor_noise). Draws whose zone has fewer than 4 models are dropped (kept_fraction
    says how many were kept; zone_size_* give the simulated zones' sizes).

    p is the fraction of draws whose rho is as weak as the observed zone rho or weaker (in
    the full-cohort direction), with the usual +1 correction; p < 0.05 says the zone rho is
    weaker than restriction of range and benchmark noise predict. power is the share of
    zones of the observed size with no relation at all (a random order) whose rho would be
    rejected (past `critical`, the null's 5% point): low power means "within" says little.
    In simulated cohorts (scripts/simulate_range_null.py, three designs, 100 cohorts each)
    p fell below 0.05 in 2-5% of those where the relation held, and in 91-97% of those whose
    zone was scrambled against KLD (the unpaired null before: 0-3% and 74-95%); see
    docs/cohort.md.
    """

    status: str
    draws: int = 0
    median: float = math.nan
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    observed: float = math.nan
    fit_points: int = 0
    verdict: str = ""
    note: str = ""
    power: float = math.nan
    critical: float = math.nan
    zone_size_median: float = math.nan
    zone_size_low: float = math.nan
    zone_size_high: float = math.nan
    kept_fraction: float = math.nan


def effective_prompts(cohort: Cohort) -> float:
    """1 / sum_t (w_t^2 / P_t) with normalised weights: the number of prompts whose plain
    mean is as noisy as the weighted composite."""
    w = cohort.norm_weights()
    return float(1.0 / sum(wt * wt / cohort.scores[t].shape[1] for wt, t in zip(w, cohort.tasks)))


def prompt_bootstrap_deviations(cohort: Cohort, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, 1 + N) composite deviation of every model under bootstrap resamples of each
    task's prompts; one resample is shared by all models, so their correlated noise (they
    answer the same prompts) is kept."""
    w = cohort.norm_weights()
    dev = np.zeros((draws, cohort.n_models + 1))
    for wt, t in zip(w, cohort.tasks):
        s = cohort.scores[t]
        p = s.shape[1]
        counts = rng.multinomial(p, np.full(p, 1.0 / p), size=draws).astype(float)
        dev += wt * ((counts @ s.T) / p - s.mean(axis=1))
    return dev


def monotone_fit(x: np.ndarray, y: np.ndarray, increasing: bool):
    """A monotone curve through (x, y): isotonic regression on the distinct x values, joined
    by straight lines, constant beyond them. None with fewer than 2 distinct x.

    Straight lines rather than a smooth monotone spline: a spline's end slopes overshoot
    between the reference and the nearest model outside the zone, which is exactly where
    the zone lies, and in simulation made the null too confident (p < 0.05 in 17-22% of
    cohorts where the relation did hold, against 7-10% with lines, before the null refitted
    the curve per draw; see tests/test_cohort_planted.py)."""
    fits = monotone_fits(x, np.asarray(y, float)[None, :], increasing)
    if fits is None:
        return None
    return lambda v: fits(np.atleast_1d(np.asarray(v, float)))[0].reshape(np.shape(v))


def monotone_fits(x: np.ndarray, ys: np.ndarray, increasing: bool):
    """monotone_fit for many y rows over the same x at once: a function of points v giving
    (rows, len(v)) curve values; None with fewer than 2 distinct x. One isotonic regression
    per row; the grouping and the interpolation weights are shared."""
    ux, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    if ux.size < 2:
        return None
    group = np.zeros((x.size, ux.size))
    group[np.arange(x.size), inverse] = 1.0 / counts[inverse]
    ymeans = ys @ group  # (rows, distinct x): the mean y at each distinct x
    w = counts.astype(float)
    fitted = np.stack([isotonic_regression(row, weights=w, increasing=increasing).x for row in ymeans])

    def curves(v: np.ndarray) -> np.ndarray:
        vc = np.clip(v, ux[0], ux[-1])  # constant beyond the ends, as np.interp
        j = np.clip(np.searchsorted(ux, vc, side="right") - 1, 0, ux.size - 2)
        frac = (vc - ux[j]) / (ux[j + 1] - ux[j])
        return fitted[:, j] * (1.0 - frac) + fitted[:, j + 1] * frac

    return curves


@dataclass(frozen=True)
class NullDraws:
    """The null's simulated zones: rho per draw (draws without a defined rho dropped), the
    size of every draw's simulated zone, and how many points the fit used."""

    rho: np.ndarray
    zone_sizes: np.ndarray
    fit_points: int


def _flip_floor_noise(expected_change: np.ndarray, deviations: np.ndarray,
                      effective_prompts: float | None) -> np.ndarray:
    """Extra noise for models whose observed flips are fewer than the curve says they lose.

    Paired with the reference, a model's bootstrap deviation comes from the prompts it
    flipped: one that flipped none never moves, while a model with the curve's expected
    change c flips about |c| * P prompts and moves by about sqrt(|c| / P). Without a floor a
    run of near-lossless models that happened to flip nothing lines up by fidelity in every
    draw, and the null calls a noise-level zone weaker than it is (p < 0.05 in 7-11% of
    simulated cohorts where the relation held). Raising every such model's variance to the
    curve's |c| / P overshoots the other way (0-2%: the larger of the observed and expected
    flip counts is biased up), so the floor takes their mean: the observed flips and the
    curve's flips are two estimates of the same count under the null. The noise is normal,
    drawn from a generator fixed by the deviations' shape, so the null stays reproducible.
    Sizes measured with this floor are in docs/cohort.md."""
    if not effective_prompts:
        return 0.0
    paired = deviations[:, 1:] - deviations[:, :1]
    have = paired.var(axis=0)
    want = np.abs(np.nan_to_num(expected_change)) / effective_prompts
    extra = np.sqrt(np.maximum(want - have, 0.0) / 2)
    rng = np.random.default_rng(list(deviations.shape))
    return rng.standard_normal(deviations[:, 1:].shape) * extra


def null_rho_draws(x: np.ndarray, composite: np.ndarray, zone: np.ndarray, threshold: float,
                   increasing: bool, deviations: np.ndarray,
                   reference_value: float, effective_prompts: float | None = None) -> NullDraws | None:
    """The null's zone-rho draws and simulated zone sizes; None when there are too few
    points to fit (fit_points then unknown to the caller: it is the outside models plus
    the reference, if anchored)."""
    finite = np.isfinite(x)
    outside = finite & ~zone
    fx, fy = x[outside], composite[1:][outside]
    if np.isfinite(reference_value):
        fx, fy = np.append(fx, reference_value), np.append(fy, composite[0])
    fit = monotone_fit(fx, fy, increasing)
    if fit is None:
        return None
    has_x = ~np.isnan(x)
    xs = np.where(has_x, x, 0.0)
    # The fit carries the outside models' own benchmark noise, so each draw refits it: on the
    # fitted values plus another draw's deviations (a parametric bootstrap of the fit), then
    # adds its own deviations to that curve. The observed scores that made the fit were
    # measured against the observed reference on the same prompts, so the refit's noise is
    # taken relative to that other draw's reference (other[:, j] - other[:, 0]) and the
    # reference point gets none: a refit moved by the reference's own unpaired noise would
    # shift every near-lossless model together against the simulated reference, empty or
    # overfill the simulated zone and widen the null until it cannot reject.
    other = np.roll(deviations, 1, axis=0)
    other = other - other[:, :1]
    fit_dev = other[:, 1:][:, outside]
    if np.isfinite(reference_value):
        fit_dev = np.column_stack([fit_dev, other[:, 0]])  # zeros: the anchor is the reference
    curve = np.where(has_x, monotone_fits(fx, fit(fx) + fit_dev, increasing)(xs), np.nan)
    sim = curve + deviations[:, 1:] + _flip_floor_noise(fit(xs) - composite[0], deviations,
                                                        effective_prompts)
    # the zone is re-selected in every draw, as it was on the real scores: selecting on
    # the benchmark truncates the zone's spread of scores, and the null must include that
    sim_zone = zone_mask(relative_change(np.column_stack([composite[0] + deviations[:, 0], sim])),
                         threshold) & has_x
    rho, n = masked_rank_corr(np.broadcast_to(x, sim.shape), sim, sim_zone)
    return NullDraws(rho[np.isfinite(rho)], n, int(fx.size))


def scrambled_zone_power(n_zone: int, critical: float, increasing: bool, rng: np.random.Generator,
                         draws: int = 4000) -> float:
    """The share of zones of n_zone models with no relation at all (fidelity in an order
    unrelated to the scores: Spearman rho of a random permutation) that the null would call
    weaker than restriction of range predicts, i.e. whose rho is as weak as `critical` or
    weaker. Low power means the data cannot tell a collapsed zone from a tracking one."""
    if n_zone < MIN_MODELS:
        return math.nan
    perms = np.argsort(rng.random((draws, n_zone)), axis=1).astype(float)
    rho = rank_corr(np.broadcast_to(np.arange(n_zone, dtype=float), perms.shape), perms)
    sign = 1.0 if increasing else -1.0
    return float(np.mean(sign * rho <= sign * critical + 1e-12))


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def range_restriction_null(x: np.ndarray, composite: np.ndarray, zone: np.ndarray, threshold: float,
                           full: Correlation, observed: Correlation, deviations: np.ndarray,
                           reference_value: float,
                           effective_prompts: float | None = None) -> tuple[RangeNull, np.ndarray]:
    """x: (N,) variant; composite: (1 + N,); zone: (N,) bool, the zone at `threshold`;
    deviations: (draws, 1 + N); effective_prompts: the composite's effective number of
    prompts (effective_prompts(cohort)), for the flip-count floor of _flip_floor_noise.
    Returns the summary and the draws."""
    none = np.empty(0)
    anchor = "" if np.isfinite(reference_value) else NO_ANCHOR_NOTE
    if not observed.ok:
        return RangeNull(observed.status, note=_join(observed.note, anchor)), none
    if not full.ok or full.rho == 0:
        return RangeNull("unavailable", note=_join("no full-cohort relation to carry into the zone", anchor)), none
    increasing = full.rho > 0
    got = null_rho_draws(x, composite, zone, threshold, increasing, deviations, reference_value,
                         effective_prompts)
    if got is None:
        n_fit = int(np.sum(np.isfinite(x) & ~zone) + np.isfinite(reference_value))
        return RangeNull("unavailable", fit_points=n_fit,
                         note=_join("fewer than 2 distinct points outside the zone to fit the relation",
                                    anchor)), none
    rho, sizes = got.rho, got.zone_sizes
    size_kw = dict(zone_size_median=float(np.median(sizes)), zone_size_low=float(np.percentile(sizes, 2.5)),
                   zone_size_high=float(np.percentile(sizes, 97.5)),
                   kept_fraction=float(rho.size / max(sizes.size, 1)))
    if rho.size == 0:
        return RangeNull("unavailable", fit_points=got.fit_points,
                         note=_join("no simulated zone had 4 or more models with a defined rho", anchor),
                         **size_kw), none
    sign = 1.0 if increasing else -1.0
    weaker = int(np.sum(sign * rho <= sign * observed.rho + 1e-12))
    p = (1 + weaker) / (1 + rho.size)
    if p < NULL_ALPHA:
        verdict = "weaker than restriction of range and benchmark noise predict"
    else:
        verdict = "within what restriction of range and benchmark noise predict"
    # the weakest rho the null still calls "within": a zone rho past it is rejected
    critical = float(np.quantile(sign * rho, NULL_ALPHA) * sign)
    power = scrambled_zone_power(observed.n, critical, increasing,
                                 np.random.default_rng([observed.n, rho.size]))
    return RangeNull("ok", int(rho.size), float(np.median(rho)), float(np.percentile(rho, 2.5)),
                     float(np.percentile(rho, 97.5)), float(p), float(observed.rho), got.fit_points, verdict,
                     anchor, power=power, critical=critical, **size_kw), rho
