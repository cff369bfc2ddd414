"""Do direction-aware fidelity metrics rank the silent zone better than KLD? (issue 16)

The protocol is docs/direction.md's, pre-registered before any zone figure of a new metric
was seen; this module computes it for any cohort whose fidelity summaries carry the
candidates (each model's summary["direction"], as scripts/make_fixture_cohort.py writes
them; the layout is in docs/cohort.md):

- every candidate's zone Spearman rho against the composite (scipy.stats.spearmanr), with a
  95% percentile CI and the CI of its difference from kld_mean's rho from a **paired**
  bootstrap: each draw resamples the task prompts (stratified per task) and, where the
  summaries give per-window sums (an entry's "calibration_windows"), the calibration windows
  jointly; one resample serves every model and every metric, so the difference keeps its
  pairing. The zone's membership is held fixed (a pre-specified selection, not an estimate).
- the hold-out: the prompts split into two halves by a deterministic grouping (a regular
  expression on the prompt id, e.g. a task window; groups in sorted order alternately A and
  B); the zone and the best-ranking candidate (most negative zone rho) chosen on half A; the
  chosen metric against kld_mean on half B over half A's zone, with the paired bootstrap.
- the verdict: "better than KLD" only when the chosen metric is not kld_mean, its half-B
  zone rho is more negative than kld_mean's and the paired 95% CI of the difference lies
  entirely below 0.

Every candidate is oriented larger = more damage, so a metric that ranks the zone has a
negative rho against the composite.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from .cohort_data import Cohort
from .correlation import MIN_MODELS, keyed_rng, rank_corr
from .zone import relative_change, zone_mask

BASELINE = "kld_mean"
# docs/direction.md's candidates, in its order; the baseline first
CANDIDATES = ("kld_mean", "dnll_mean", "dnll_harm", "flip_harm", "flip_net", "top5_net", "margin_harm",
              "tvd_mean", "jsd_mean", "kld_confident")
DESCRIPTIONS = {
    "kld_mean": "mean KL(P_ref || P_q), the baseline",
    "dnll_mean": "mean nll_q - nll_ref (ln PPL ratio)",
    "dnll_harm": "mean max(0, nll_q - nll_ref)",
    "flip_harm": "rate: ref top-1 right, q top-1 wrong",
    "flip_net": "flip_harm - flip_help",
    "top5_net": "label left the top-5 - label joined it",
    "margin_harm": "mean max(0, margin_ref - margin_q)",
    "tvd_mean": "mean total variation distance",
    "jsd_mean": "mean Jensen-Shannon divergence",
    "kld_confident": "mean KLD where p_ref(top-1) >= 0.5",
}
DEFAULT_DRAWS = 2000
DEFAULT_SEED = 20261203
CONFIDENCE = 0.95
# Composite scores are weighted sums of per-task rates; rounded to this many decimals before
# ranking, so models with equal weighted results tie in every bootstrap draw as they do in the
# exact composite (stats.cohort_data.weighted_rates).
_TIE_DECIMALS = 12


@dataclass(frozen=True)
class DirectionData:
    """The candidates of N models: values[name] (N,) over the whole calibration text;
    window_sums/window_counts[name] (N, W) per calibration window where the summaries give
    them (a metric is the drawn windows' sum over their count)."""

    values: dict[str, np.ndarray]
    window_sums: dict[str, np.ndarray] = field(default_factory=dict)
    window_counts: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def has_windows(self) -> bool:
        return bool(self.window_sums)


@dataclass(frozen=True)
class MetricComparison:
    """One candidate: zone rho [CI] over all prompts, its difference from kld_mean's [paired
    CI], the hold-out's half-A rho (half A's zone and composite) and half-B rho (half A's
    zone, half B's composite) [CI], with half B's difference from kld_mean [paired CI]; the
    full-cohort rho for context."""

    name: str
    description: str
    full_rho: float
    zone_rho: float
    zone_low: float
    zone_high: float
    delta: float
    delta_low: float
    delta_high: float
    half_a_rho: float
    half_b_rho: float
    half_b_low: float
    half_b_high: float
    half_b_delta: float
    half_b_delta_low: float
    half_b_delta_high: float


@dataclass(frozen=True)
class DirectionComparison:
    status: str                    # "ok", or why there is no comparison
    zone_models: tuple[str, ...] = ()
    half_a_zone: tuple[str, ...] = ()
    half_prompts: dict[str, tuple[int, int]] = field(default_factory=dict)  # task: (half A, half B)
    groups: str = ""               # the grouping rule of the split
    draws: int = 0
    seed: int = 0
    windows_resampled: bool = False
    metrics: tuple[MetricComparison, ...] = ()
    selected: str = ""
    better: bool = False
    verdict: str = ""
    notes: tuple[str, ...] = ()

    def metric(self, name: str) -> MetricComparison:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"no candidate {name!r} (have: {', '.join(m.name for m in self.metrics)})")


# ---------------------------------------------------------------------------- the halves

def _sort_key(groups: list[str]):
    """Sorted numerically when every group is an integer, else as text."""
    if all(re.fullmatch(r"[+-]?\d+", g) for g in groups):
        return lambda g: (int(g), g)
    return lambda g: (0, g)


def split_halves(prompt_ids: dict[str, tuple[str, ...]], pattern: str | None) -> dict[str, np.ndarray]:
    """{task: bool array, True for half A}. pattern: a regular expression whose first group
    (or whole match) names a prompt's group (e.g. '^w(\\d+)': its task window); without one
    every prompt is its own group. A task's groups, in sorted order, go alternately to A and
    B, so the split is deterministic and a group's prompts stay together."""
    rx = re.compile(pattern) if pattern else None
    out = {}
    for task, ids in prompt_ids.items():
        if rx is None:
            keys = list(ids)
        else:
            keys = []
            for pid in ids:
                m = rx.search(pid)
                if m is None:
                    raise ValueError(f"direction groups {pattern!r}: task {task!r} prompt id {pid!r} does not match")
                keys.append(m.group(1) if rx.groups else m.group(0))
        order = sorted(set(keys), key=_sort_key(sorted(set(keys))))
        half_a = {g for i, g in enumerate(order) if i % 2 == 0}
        out[task] = np.array([k in half_a for k in keys], bool)
    return out


# ---------------------------------------------------------------------------- bootstrap

def _composite_draws(cohort: Cohort, masks: dict[str, np.ndarray], draws: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(observed composite (1 + N,), composite under `draws` resamples (draws, 1 + N)) over
    the prompts each task's mask keeps, resampled with replacement per task."""
    w = cohort.norm_weights()
    obs = np.zeros(cohort.n_models + 1)
    boot = np.zeros((draws, cohort.n_models + 1))
    for wt, t in zip(w, cohort.tasks):
        s = cohort.scores[t][:, masks[t]]
        p = s.shape[1]
        obs += wt * s.mean(axis=1)
        counts = rng.multinomial(p, np.full(p, 1.0 / p), size=draws).astype(float)
        boot += wt * (counts @ s.T) / p
    return np.round(obs, _TIE_DECIMALS), np.round(boot, _TIE_DECIMALS)


def _metric_draws(data: DirectionData, names: tuple[str, ...], draws: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{metric: (draws, N)} under resamples of the calibration windows (one resample shared
    by every metric and model); the observed values repeated where there are no windows."""
    if not data.has_windows:
        return {k: np.broadcast_to(data.values[k], (draws, data.values[k].size)) for k in names}
    n_windows = next(iter(data.window_sums.values())).shape[1]
    c = rng.multinomial(n_windows, np.full(n_windows, 1.0 / n_windows), size=draws).astype(float)
    out = {}
    for k in names:
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = (c @ data.window_sums[k].T) / (c @ data.window_counts[k].T)
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < MIN_MODELS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def _interval(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    a = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(v, [a, 100 - a])
    return float(lo), float(hi)


@dataclass(frozen=True)
class _Ranked:
    """Observed zone rho per metric, and its bootstrap draws."""

    rho: dict[str, float]
    draws: dict[str, np.ndarray]


def _rank_in_zone(cohort: Cohort, data: DirectionData, names, zone: np.ndarray, masks, draws: int,
                  rng: np.random.Generator, composite_obs: np.ndarray | None = None) -> _Ranked:
    """Zone rho of every metric against the composite over the masked prompts (or against
    composite_obs when given, for the observed point), and its paired bootstrap draws."""
    obs, boot = _composite_draws(cohort, masks, draws, rng)
    if composite_obs is not None:
        obs = composite_obs
    mdraws = _metric_draws(data, names, draws, rng)
    y_obs, y_boot = obs[1:][zone], boot[:, 1:][:, zone]
    rho = {k: _spearman(data.values[k][zone], y_obs) for k in names}
    if zone.sum() < MIN_MODELS or draws == 0:
        return _Ranked(rho, {k: np.full(draws, np.nan) for k in names})
    return _Ranked(rho, {k: rank_corr(mdraws[k][:, zone], y_boot) for k in names})


# ---------------------------------------------------------------------------- the analysis

def compare_direction(cohort: Cohort, data: DirectionData, *, zone_threshold: float = 0.02,
                      groups: str | None = None, draws: int = DEFAULT_DRAWS,
                      seed: int = DEFAULT_SEED) -> DirectionComparison:
    """docs/direction.md's comparison of every candidate in `data` against kld_mean."""
    notes = []
    names = tuple(k for k in CANDIDATES if k in data.values)
    if BASELINE not in names:
        return DirectionComparison("unavailable", notes=("no kld_mean among the candidates",))
    usable = []
    for k in names:
        v = np.asarray(data.values[k], float)
        if v.shape != (cohort.n_models,) or not np.all(np.isfinite(v)):
            notes.append(f"{k}: not finite for every model; left out")
            continue
        if data.has_windows and k not in data.window_sums:
            notes.append(f"{k}: no per-window values; left out (the others resample the windows)")
            continue
        usable.append(k)
    names = tuple(usable)
    if BASELINE not in names:
        return DirectionComparison("unavailable", notes=tuple(notes))
    if not data.has_windows:
        notes.append("no per-calibration-window values: the metrics are held fixed in the bootstrap, "
                     "so their own sampling noise is ignored")
    composite = cohort.composite()
    zone = zone_mask(relative_change(composite), zone_threshold)
    zone_models = tuple(m for m, z in zip(cohort.models, zone) if z)
    base = dict(zone_models=zone_models, draws=draws, seed=seed, windows_resampled=data.has_windows,
                groups=groups or "each prompt its own group")
    if zone.sum() < MIN_MODELS:
        return DirectionComparison("insufficient", notes=(*notes, f"the zone holds {zone.sum()} models "
                                                          f"(at least {MIN_MODELS} needed)"), **base)
    everything = {t: np.ones(cohort.scores[t].shape[1], bool) for t in cohort.tasks}
    full = _rank_in_zone(cohort, data, names, zone, everything, draws, keyed_rng(seed, "direction", "all"),
                         composite_obs=composite)
    full_rho = {k: _spearman(data.values[k], composite[1:]) for k in names}

    halves = split_halves(cohort.prompt_ids, groups)
    half_a = halves
    half_b = {t: ~m for t, m in halves.items()}
    sizes = {t: (int(half_a[t].sum()), int(half_b[t].sum())) for t in cohort.tasks}
    if any(min(v) == 0 for v in sizes.values()):
        return DirectionComparison("unavailable", half_prompts=sizes,
                                   notes=(*notes, "a task has an empty half: give a grouping with at least "
                                          "2 groups per task"), **base)
    comp_a, _ = _composite_draws(cohort, half_a, 0, keyed_rng(seed, "direction", "A"))
    zone_a = zone_mask(relative_change(comp_a), zone_threshold)
    rho_a = {k: _spearman(data.values[k][zone_a], comp_a[1:][zone_a]) for k in names}
    hb = _rank_in_zone(cohort, data, names, zone_a, half_b, draws, keyed_rng(seed, "direction", "B"))

    rows = []
    for k in names:
        d_full = full.draws[k] - full.draws[BASELINE]
        d_b = hb.draws[k] - hb.draws[BASELINE]
        rows.append(MetricComparison(
            k, DESCRIPTIONS.get(k, "given in the summaries"), full_rho[k], full.rho[k], *_interval(full.draws[k]),
            full.rho[k] - full.rho[BASELINE], *_interval(d_full), rho_a[k], hb.rho[k], *_interval(hb.draws[k]),
            hb.rho[k] - hb.rho[BASELINE], *_interval(d_b)))
    finite_a = [(rho_a[k], i, k) for i, k in enumerate(names) if math.isfinite(rho_a[k])]
    base.update(half_a_zone=tuple(m for m, z in zip(cohort.models, zone_a) if z), half_prompts=sizes,
                metrics=tuple(rows))
    if zone_a.sum() < MIN_MODELS or not finite_a:
        return DirectionComparison("insufficient", notes=(*notes, f"half A's zone holds {zone_a.sum()} models "
                                                          "with no usable rho"), **base)
    selected = min(finite_a)[2]
    sel = next(r for r in rows if r.name == selected)
    # more negative than kld_mean's on half B, with the paired CI of the difference below 0
    better = selected != BASELINE and sel.half_b_delta < 0 and sel.half_b_delta_high < 0
    return DirectionComparison("ok", selected=selected, better=better,
                               verdict=_verdict(sel, better), notes=tuple(notes), **base)


def _verdict(sel: MetricComparison, better: bool) -> str:
    if sel.name == BASELINE:
        return ("Not shown better than KLD: on half A no candidate ranked the zone better than kld_mean "
                f"(its half-A zone rho {sel.half_a_rho:+.2f} was the most negative), so kld_mean was selected.")
    diff = (f"half-B zone rho {sel.half_b_rho:+.2f} against kld_mean's "
            f"{sel.half_b_rho - sel.half_b_delta:+.2f}, difference {sel.half_b_delta:+.2f} "
            f"[{sel.half_b_delta_low:+.2f}, {sel.half_b_delta_high:+.2f}] (paired 95% CI)")
    if better:
        return f"Better than KLD: {sel.name}, selected on half A, ranks half A's zone on half B better: {diff}."
    return f"Not shown better than KLD: {sel.name} was selected on half A; on half B its {diff}."


def direction_data_from_summaries(entries: list[dict | None]) -> DirectionData | None:
    """DirectionData from each model's fidelity entry ({"summary": {...}, and optionally
    "calibration_windows"}); None when no summary has a "direction" block. Only the
    CANDIDATES are read (the block's other keys, e.g. dnll_help, are oriented the other way
    or are not scalars); kld_mean comes from the block, else from summary.kld.mean."""
    from .variants import summary_number

    if not any(isinstance(e, dict) and isinstance((e.get("summary") or {}).get("direction"), dict)
               for e in entries):
        return None
    n = len(entries)
    values: dict[str, np.ndarray] = {}
    sums: dict[str, list] = {}
    counts: dict[str, list] = {}
    windows_everywhere = True
    for i, e in enumerate(entries):
        summary = (e or {}).get("summary") or {}
        block = dict(summary.get("direction") or {})
        if BASELINE not in block and isinstance(summary.get("kld"), dict):
            block[BASELINE] = summary["kld"].get("mean")
        for k in CANDIDATES:
            v = block.get(k)
            if v is None or isinstance(v, (dict, list)):
                continue
            values.setdefault(k, np.full(n, np.nan))[i] = summary_number(v)
        win = ((e or {}).get("calibration_windows") or {}).get("metrics")
        if not isinstance(win, dict):
            windows_everywhere = False
            continue
        for k, d in win.items():
            sums.setdefault(k, [None] * n)[i] = d.get("sum")
            counts.setdefault(k, [None] * n)[i] = d.get("n")
    ws, wc = {}, {}
    if windows_everywhere:
        for k in sums:
            rows_s, rows_c = sums[k], counts[k]
            if any(r is None for r in rows_s + rows_c) or len({len(r) for r in rows_s + rows_c}) != 1:
                continue
            ws[k] = np.array(rows_s, float)
            wc[k] = np.array(rows_c, float)
    return DirectionData({k: values[k] for k in CANDIDATES if k in values},
                         {k: ws[k] for k in CANDIDATES if k in ws}, {k: wc[k] for k in CANDIDATES if k in wc})
