"""Cohort analysis: can a cheap fidelity metric stand in for benchmarks, and where does it
stop working? (The analyses of "Displacement Is Not Direction", 2026, made reusable.)

    from fidelity_kld.stats.cohort import analyze
    report = analyze("cohort.toml")              # or a Cohort built from arrays
    print(report.variant("kld_mean").zone.describe())

analyze() mirrors `fidelity-kld cohort`: scores and relative degradation per task and
composite; Spearman/Kendall correlation of every fidelity variant with the composite and
each task, over the full cohort and inside the pre-specified silent zone, with bootstrap
CIs over models; a sensitivity sweep over zone thresholds; a hold-out zone; a
range-restriction null; volume vs direction of the benchmark changes; per-prompt failure
prediction; routing by per-prompt KLD. Every random draw comes from the seed, so the same
inputs and options give the same report.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from . import variants as variant_defs
from .cohort_data import Cohort
from .correlation import Correlation, correlate, keyed_rng
from .decompose import COMPOSITE, Flips, flip_arrays, flips
from .direction_cohort import DEFAULT_DRAWS as DIRECTION_DRAWS
from .direction_cohort import DEFAULT_SEED as DIRECTION_SEED
from .direction_cohort import DirectionComparison, compare_direction
from .failure import FailurePrediction, failure_prediction
from .routing import Routing, route
from .summary import json_ready
from .zone import (Holdout, RangeNull, effective_prompts, holdout, prompt_bootstrap_deviations,
                   range_restriction_null, relative_change, zone_mask)

__all__ = ["AnalysisOptions", "Cohort", "CohortReport", "ModelResult", "SweepPoint", "TargetCorrelation",
           "VariantResult", "analyze", "analyze_cohort"]

DEFAULT_THRESHOLD = 0.02
DEFAULT_THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.05)
DEFAULT_SEED = 0
DEFAULT_BOOTSTRAP = 1000
DEFAULT_HOLDOUT_REPS = 200
DEFAULT_PRIMARY = "kld_mean"


@dataclass(frozen=True)
class AnalysisOptions:
    """zone_threshold: relative composite distance from the reference that defines the
    silent zone, fixed before fidelity is looked at. thresholds: the sensitivity sweep.
    n_bootstrap: resamples for every bootstrap CI and null draws. holdout_reps: hold-out
    repetitions. primary: the variant the summary leads with (default kld_mean).
    fail_below: a per-prompt score under this is a failure. routing: the models to route
    among (default: the silent zone's models with per-prompt KLD, or all of them when the
    zone has fewer than 2). pool_flips: the composite volume and direction count every
    prompt of every task once instead of weighting the tasks' rates (the composite score
    and the zone keep the weights). direction_groups, direction_draws, direction_seed: the
    direction-aware comparison of docs/direction.md (stats.direction_cohort), run when the
    fidelity summaries carry its candidates: the regular expression naming a prompt's
    group for the hold-out split (default: each prompt its own group), its bootstrap draws
    and its seed (the protocol's 2000 and 20261203)."""

    zone_threshold: float = DEFAULT_THRESHOLD
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    seed: int = DEFAULT_SEED
    n_bootstrap: int = DEFAULT_BOOTSTRAP
    holdout_reps: int = DEFAULT_HOLDOUT_REPS
    primary: str | None = None
    fail_below: float = 0.5
    routing: tuple[str, ...] | None = None
    intersect: bool = False
    pool_flips: bool = False
    direction_groups: str | None = None
    direction_draws: int = DIRECTION_DRAWS
    direction_seed: int = DIRECTION_SEED

    def __post_init__(self):
        if not (0 < self.zone_threshold < 1):
            raise ValueError(f"zone threshold must be in (0, 1), got {self.zone_threshold}")
        ths = tuple(float(t) for t in self.thresholds)
        if any(not (0 < t < 1) for t in ths):
            raise ValueError("sweep thresholds must be in (0, 1)")
        object.__setattr__(self, "thresholds", tuple(sorted(set(ths) | {float(self.zone_threshold)})))
        if self.n_bootstrap < 0 or self.holdout_reps < 0:
            raise ValueError("bootstrap and hold-out counts must be >= 0")
        if not (0 < self.fail_below <= 1):
            raise ValueError("fail_below must be in (0, 1]")
        if self.routing is not None:
            object.__setattr__(self, "routing", tuple(self.routing))
        if self.direction_draws < 0:
            raise ValueError("direction draws must be >= 0")
        if self.direction_groups is not None:
            try:
                re.compile(self.direction_groups)
            except re.error as e:
                raise ValueError(f"direction groups {self.direction_groups!r}: not a regular expression ({e})") from None


@dataclass(frozen=True)
class ModelResult:
    """Scores of one model: per task, composite, relative change vs the reference."""

    name: str
    task_scores: dict[str, float]
    composite: float
    relative_change: float
    in_zone: bool
    size_gb: float = math.nan
    bpw: float = math.nan
    fidelity: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetCorrelation:
    """One variant against one target ("composite" or a task), full cohort and zone."""

    target: str
    full: Correlation
    zone: Correlation


@dataclass(frozen=True)
class VariantResult:
    name: str
    description: str
    n_models: int
    reference_value: float
    full: Correlation
    zone: Correlation
    null: RangeNull
    holdout: Holdout
    tasks: tuple[TargetCorrelation, ...]
    volume: tuple[TargetCorrelation, ...]      # composite first, then each task
    direction: tuple[TargetCorrelation, ...]


@dataclass(frozen=True)
class SweepPoint:
    """The zone at one threshold: its models and every variant's correlation there; the
    range-restriction null for the primary variant."""

    threshold: float
    zone_size: int
    zone_models: tuple[str, ...]
    correlations: dict[str, Correlation]
    null: RangeNull


@dataclass(frozen=True)
class CohortReport:
    name: str
    reference: ModelResult
    models: tuple[ModelResult, ...]
    tasks: tuple[str, ...]
    weights: dict[str, float]
    options: AnalysisOptions
    primary: str
    zone_models: tuple[str, ...]
    variants: tuple[VariantResult, ...]
    sensitivity: tuple[SweepPoint, ...]
    flips: tuple[Flips, ...]
    failure: tuple[FailurePrediction, ...]
    routing: Routing | None
    notes: tuple[str, ...] = ()
    # the primary variant's hold-out and null rho draws, for figures
    holdout_draws: tuple[float, ...] = field(default=(), repr=False)
    null_draws: tuple[float, ...] = field(default=(), repr=False)
    # issue 16's direction-aware candidates against kld_mean, when the summaries carry them
    direction: DirectionComparison | None = None

    @property
    def zone_threshold(self) -> float:
        return self.options.zone_threshold

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r} (have: {', '.join(v.name for v in self.variants)})")

    def to_dict(self) -> dict:
        """Every number, JSON-ready: NaN is None, infinities the strings "inf"/"-inf"."""
        from .. import __version__

        d = asdict(self)
        d["zone_threshold"] = self.zone_threshold
        return json_ready({"fidelity_kld_version": __version__, **d})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def analyze(manifest, **options) -> CohortReport:
    """Run every analysis on a cohort.

    manifest: a manifest path (TOML, JSON or CSV), a parsed manifest dict (paths relative
    to the working directory) or a Cohort. options: the AnalysisOptions fields
    (zone_threshold, thresholds, seed, n_bootstrap, holdout_reps, primary, fail_below,
    routing, intersect, pool_flips, direction_groups, direction_draws, direction_seed); None means the manifest's value or the default.
    """
    from .manifest import load_manifest, manifest_from_dict

    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(AnalysisOptions)}
    if unknown:
        raise TypeError(f"unknown option {sorted(unknown)[0]!r}")
    intersect = bool(given.get("intersect", False))
    if isinstance(manifest, Cohort):
        cohort, defaults = manifest, {}
    elif isinstance(manifest, dict):
        loaded = manifest_from_dict(manifest, intersect=intersect)
        cohort, defaults = loaded.cohort, loaded.options
    else:
        loaded = load_manifest(Path(manifest), intersect=intersect)
        cohort, defaults = loaded.cohort, loaded.options
    return analyze_cohort(cohort, AnalysisOptions(**{**defaults, **given}))


def analyze_cohort(cohort: Cohort, options: AnalysisOptions | None = None) -> CohortReport:
    opts = options or AnalysisOptions()
    seed = opts.seed
    notes = list(cohort.notes)
    task_scores = cohort.task_scores()
    composite = cohort.composite()
    if not composite[0] > 0:
        raise ValueError(f"the reference {cohort.reference!r} scores 0 on the composite; "
                         "relative degradation is undefined")
    rel = relative_change(composite)
    zone = zone_mask(rel, opts.zone_threshold)

    values = {}
    for name, v in cohort.variants.items():
        if np.all(np.isnan(v)):
            notes.append(f"variant {name}: no model has a value; left out")
            continue
        values[name] = v
    if not values:
        raise ValueError("no fidelity variant has any value: give fidelity summaries or variant columns")
    primary = opts.primary
    if primary is None:
        primary = DEFAULT_PRIMARY if DEFAULT_PRIMARY in values else next(iter(values))
        if primary != DEFAULT_PRIMARY:
            notes.append(f"kld_mean unavailable; leading with {primary}")
    elif primary not in values:
        raise ValueError(f"no fidelity variant {primary!r} with values (have: {', '.join(values)})")

    targets = {COMPOSITE: composite[1:]}
    targets.update({t: task_scores[1:, j] for j, t in enumerate(cohort.tasks)})
    flip = flip_arrays(cohort, opts.pool_flips)
    deviations = prompt_bootstrap_deviations(cohort, opts.n_bootstrap, keyed_rng(seed, "null", "prompts"))
    p_eff = effective_prompts(cohort)
    hold, hold_draws = holdout(cohort, values, opts.zone_threshold, opts.holdout_reps,
                               keyed_rng(seed, "holdout"))

    def full_corr(x, y, name, target, ylabel):
        return correlate(x, y, n_bootstrap=opts.n_bootstrap, rng=keyed_rng(seed, "corr", name, target, "full"),
                         labels=(name, ylabel))

    def both(x, y, name, target, ylabel):
        return TargetCorrelation(target, full_corr(x, y, name, target, ylabel),
                                 _zone_corr(x, y, zone, opts, name, target, ylabel))

    results = []
    null_primary = np.empty(0)
    for name, x in values.items():
        comp = both(x, targets[COMPOSITE], name, COMPOSITE, "the composite score")
        tasks = tuple(both(x, targets[t], name, t, f"the {t} score") for t in cohort.tasks)
        vol = tuple(both(x, flip[scope]["volume"], name, f"volume/{scope}", f"flip volume ({scope})")
                    for scope in (COMPOSITE, *cohort.tasks))
        dirn = tuple(both(x, flip[scope]["direction"], name, f"direction/{scope}", f"net change ({scope})")
                     for scope in (COMPOSITE, *cohort.tasks))
        if deviations.size:
            null, draws = range_restriction_null(x, composite, zone, opts.zone_threshold, comp.full,
                                                 comp.zone, deviations,
                                                 cohort.variant_reference.get(name, math.nan), p_eff)
        else:
            null, draws = RangeNull("skipped", note="no bootstrap draws requested"), np.empty(0)
        if name == primary:
            null_primary = draws
        results.append(VariantResult(name, variant_defs.describe(name), int(np.sum(~np.isnan(x))),
                                     cohort.variant_reference.get(name, math.nan), comp.full, comp.zone,
                                     null, hold[name], tasks, vol, dirn))

    sweep = []
    for th in opts.thresholds:
        z = zone_mask(rel, th)
        if th == opts.zone_threshold:  # the same numbers as the variants table: reuse them
            cors = {res.name: res.zone for res in results}
        else:
            cors = {name: _zone_corr(x, targets[COMPOSITE], z, opts, name, COMPOSITE, "the composite score",
                                     threshold=th)
                    for name, x in values.items()}
        full_primary = next(r.full for r in results if r.name == primary)
        if deviations.size:
            null, _ = range_restriction_null(values[primary], composite, z, th, full_primary, cors[primary],
                                             deviations, cohort.variant_reference.get(primary, math.nan),
                                             p_eff)
        else:
            null = RangeNull("skipped", note="no bootstrap draws requested")
        sweep.append(SweepPoint(th, int(z.sum()), tuple(m for m, inz in zip(cohort.models, z) if inz), cors, null))

    model_results = tuple(
        ModelResult(m, {t: float(task_scores[i + 1, j]) for j, t in enumerate(cohort.tasks)},
                    float(composite[i + 1]), float(rel[i]), bool(zone[i]), float(cohort.size_gb[i]),
                    float(cohort.bpw[i]), {name: float(values[name][i]) for name in values})
        for i, m in enumerate(cohort.models))
    reference = ModelResult(cohort.reference, {t: float(task_scores[0, j]) for j, t in enumerate(cohort.tasks)},
                            float(composite[0]), 0.0, False,
                            fidelity={name: float(cohort.variant_reference.get(name, math.nan)) for name in values})
    fail = failure_prediction(cohort, fail_below=opts.fail_below, n_bootstrap=opts.n_bootstrap, seed=seed)
    routing_set = opts.routing
    if routing_set is None and cohort.per_prompt_kld:
        # by default, route among the silent zone's models: the near-lossless quants one
        # actually chooses between (among clearly broken ones, lowest KLD just finds the
        # least broken model)
        have = np.zeros(cohort.n_models, bool)
        for k in cohort.per_prompt_kld.values():
            have |= np.isfinite(k).any(axis=1)
        zone_set = tuple(m for m, z, h in zip(cohort.models, zone, have) if z and h)
        if len(zone_set) >= 2:
            routing_set = zone_set
        else:
            notes.append("routing among every model with per-prompt KLD: fewer than 2 in the zone")
    routing = route(cohort, routing_set, n_bootstrap=opts.n_bootstrap, seed=seed)
    direction = None
    if cohort.direction is not None:
        direction = compare_direction(cohort, cohort.direction, zone_threshold=opts.zone_threshold,
                                      groups=opts.direction_groups, draws=opts.direction_draws,
                                      seed=opts.direction_seed)
    if not cohort.per_prompt_kld:
        notes.append("no per-prompt fidelity: failure prediction and routing skipped")
    return CohortReport(
        name=cohort.name, reference=reference, models=model_results, tasks=cohort.tasks,
        weights=dict(zip(cohort.tasks, (float(w) for w in cohort.norm_weights()))), options=opts,
        primary=primary, zone_models=tuple(m for m, z in zip(cohort.models, zone) if z),
        variants=tuple(results), sensitivity=tuple(sweep), flips=flips(cohort, opts.pool_flips), failure=fail, routing=routing,
        notes=tuple(notes), holdout_draws=tuple(float(v) for v in hold_draws.get(primary, ())),
        null_draws=tuple(float(v) for v in null_primary), direction=direction)


def _zone_corr(x, y, zone, opts, name, target, ylabel, threshold=None) -> Correlation:
    """Correlation over the zone's models; the rng is keyed by threshold, so the sweep's
    point at the main threshold repeats the table's numbers exactly."""
    th = opts.zone_threshold if threshold is None else threshold
    return correlate(np.where(zone, x, np.nan), y, n_bootstrap=opts.n_bootstrap,
                     rng=keyed_rng(opts.seed, "corr", name, target, f"zone{th:g}"), labels=(name, ylabel))
