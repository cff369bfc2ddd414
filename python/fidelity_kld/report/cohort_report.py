"""The cohort report's content: a CohortReport turned into document blocks."""

from __future__ import annotations

import math

from ..stats.cohort import CohortReport
from ..stats.correlation import Correlation, format_p
from ..stats.decompose import COMPOSITE
from ..stats.zone import NULL_ALPHA as NULL_ALPHA_REPORT
from .document import Bullets, Heading, Image, Para, Table

FIGURE_CAPTIONS = {
    "scatter": "Primary fidelity variant against the composite score; the band is the silent zone",
    "sensitivity": "Zone correlation against the zone threshold, with the range-restriction null",
    "null_holdout": "Zone rho: observed, under the range-restriction null, and across hold-out splits",
    "volume_direction": "Flip volume and net direction against the primary fidelity variant",
    "pareto": "p99.9 KLD against model size, with the Pareto front",
    "direction": "Zone rho of each direction-aware candidate against the composite [95% paired bootstrap CI], "
                 "and on half B of the hold-out; more negative ranks the zone better",
}


def _num(v: float, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, fmt)


def column_format(values) -> str:
    """One format for a column of fidelity values, so its numbers share a precision: fixed
    decimals giving the smallest nonzero magnitude 3 significant digits when the column spans
    under three decades (at most 6 decimals), scientific with 3 significant digits otherwise."""
    mags = [abs(v) for v in values if v is not None and math.isfinite(v) and v != 0]
    if not mags:
        return ".3f"
    lo, hi = min(mags), max(mags)
    decimals = max(0, 2 - math.floor(math.log10(lo)))
    if hi / lo >= 1000 or decimals > 6:
        return ".2e"
    return f".{decimals}f"


def _fixed(v: float, fmt: str) -> str:
    if v is None or math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, fmt)


def _pct(v: float, signed: bool = True) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v * 100:+.2f}%" if signed else f"{v * 100:.1f}%"


def _ci(lo: float, hi: float, fmt: str = "+.2f") -> str:
    """' [lo, hi]', or nothing when there is no interval (no bootstrap requested)."""
    if lo is None or math.isnan(lo) or math.isnan(hi):
        return ""
    return f" [{lo:{fmt}}, {hi:{fmt}}]"


def _rho(c: Correlation) -> str:
    """'-0.72 [-0.88, -0.45]' or the reason there is no number."""
    if not c.ok:
        return "undefined" if c.status == "constant" else c.status
    ci = f" [{c.ci_low:+.2f}, {c.ci_high:+.2f}]" if not math.isnan(c.ci_low) else ""
    return f"{c.rho:+.2f}{ci}"


def _p(c: Correlation) -> str:
    return format_p(c.p) if c.ok else "-"


def _range(mid, lo, hi, fmt="+.2f") -> str:
    if mid is None or math.isnan(mid):
        return "-"
    return f"{mid:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _models(n: int) -> str:
    return f"{n} model" if n == 1 else f"{n} models"


def headline(r: CohortReport) -> list[str]:
    """The few sentences a reader needs: does the primary variant track the benchmark,
    over the cohort and inside the zone, and what the checks say."""
    v = r.variant(r.primary)
    th = f"{r.zone_threshold * 100:g}%"
    out = []
    if v.full.ok:
        tracks = v.full.p < 0.05
        verb = "tracks" if tracks else "does not track"
        out.append(f"Over the full cohort, {v.name} {verb} the composite score "
                   f"(Spearman rho = {v.full.rho:+.2f}, p = {format_p(v.full.p)}, n = {v.full.n}).")
    else:
        out.append(f"Over the full cohort, the correlation of {v.name} with the composite is "
                   f"{v.full.status}: {v.full.note}.")
    zn = _models(len(r.zone_models))
    if v.zone.ok:
        holds = v.zone.p < 0.05 and (not v.full.ok or (v.zone.rho > 0) == (v.full.rho > 0))
        out.append(f"Inside the {th} silent zone ({zn}) it "
                   f"{'still tracks it' if holds else 'does not'} (rho = {v.zone.rho:+.2f}"
                   f"{_ci(v.zone.ci_low, v.zone.ci_high)}, p = {format_p(v.zone.p)}).")
    else:
        out.append(f"Inside the {th} silent zone ({zn}) the correlation is {v.zone.status}: "
                   f"{v.zone.note}.")
    if v.null.status == "ok":
        out.append(f"If the full-cohort relation held inside the zone, restriction of range and "
                   f"benchmark noise would give rho = {v.null.median:+.2f} [{v.null.low:+.2f}, "
                   f"{v.null.high:+.2f}]; the observed rho is {v.null.verdict} (p = {format_p(v.null.p)}).")
        out.append(null_power_sentence(v.null))
    h = v.holdout
    if h.status == "ok":
        out.append(f"With the zone chosen on half the prompts and rho measured on the other half "
                   f"({h.reps} splits), zone rho has median {h.rho_median:+.2f} "
                   f"(95% of splits in [{h.rho_low:+.2f}, {h.rho_high:+.2f}]).")
    vol, dirn = v.volume[0], v.direction[0]
    if vol.zone.ok and dirn.zone.ok:
        out.append(f"In the zone, {v.name} correlates with the volume of benchmark flips "
                   f"(rho = {vol.zone.rho:+.2f}, p = {format_p(vol.zone.p)}) and with their net "
                   f"direction at rho = {dirn.zone.rho:+.2f} (p = {format_p(dirn.zone.p)}).")
    fails = [f for f in r.failure if f.status == "ok"]
    if fails:
        gm = sorted(f.gm_ratio for f in fails)
        au = sorted(f.auroc for f in fails)
        span = (lambda v: f"{v[0]:.2f}" if len(v) == 1 else f"{v[0]:.2f} to {v[-1]:.2f}")
        out.append(f"Per prompt, failed prompts have {span(gm)} times the KLD of passed ones "
                   f"(geometric means); AUROC {span(au)} over {_models(len(fails))}.")
        own = [f for f in fails if not math.isnan(f.flip_auroc)]
        if own:
            fa = sorted(f.flip_auroc for f in own)
            fg = sorted(f.flip_gm_ratio for f in own if not math.isnan(f.flip_gm_ratio))
            ratio = f"broken prompts have {span(fg)} times the KLD of kept ones; " if fg else ""
            out.append(f"Over the prompts the reference passes (the quantization's own failures), "
                       f"{ratio}AUROC {span(fa)}.")
    if r.direction is not None and r.direction.status == "ok":
        out.append(f"Direction-aware metrics (docs/direction.md): {r.direction.verdict}")
    ro = r.routing
    if ro is not None and ro.status == "ok":
        out.append(f"Routing each disagreement prompt to the lowest-KLD model scores "
                   f"{ro.accuracy * 100:.1f}%{_ci(ro.accuracy_low * 100, ro.accuracy_high * 100, '.1f')} "
                   f"against {ro.chance * 100:.1f}% by chance and {ro.oracle * 100:.1f}% for the oracle "
                   f"({ro.n_disagree} prompts, {len(ro.models)} models).")
        single = routing_single_pick(ro)
        if single:
            out.append(single)
    return out


DOMINANT_PICK = 0.9


def routing_single_pick(ro) -> str:
    """A sentence when routing picked one model on every disagreement prompt (or on nearly
    every one, 90% or more): then the routed score is that model's own, and its gain over
    chance measures the model, not routing."""
    if not ro.picked:
        return ""
    top, n_top = max(ro.picked.items(), key=lambda kv: kv[1])
    if n_top < DOMINANT_PICK * ro.n_disagree:
        return ""
    where = ("on every disagreement prompt" if n_top == ro.n_disagree
             else f"on {n_top} of the {ro.n_disagree} disagreement prompts")
    same = "is" if n_top == ro.n_disagree else "is nearly"
    return (f"Lowest KLD picked {top} {where}: 'routed' {same} {top}'s own score "
            f"({ro.accuracy * 100:.1f}%; the best single model, {ro.best_single_model}, scores "
            f"{ro.best_single * 100:.1f}%), so the {ro.gain * 100:+.1f} points over chance are {top}'s, "
            "not routing's.")


def null_power_sentence(n) -> str:
    """What the range-restriction null could detect: its power against a zone with no
    relation, and its simulated zones, so a reader knows when "within" means little."""
    sizes = _range(n.zone_size_median, n.zone_size_low, n.zone_size_high, ".0f")
    text = (f"Against a zone of the same size with no relation at all, this null rejects in "
            f"{n.power * 100:.0f}% of cases (its power); its simulated zones held {sizes} models and "
            f"{n.kept_fraction * 100:.0f}% of its draws had a defined rho.")
    if n.note:
        text += f" Note: {n.note}."
    return text


POWER_ENOUGH = 0.8


def verdict(r: CohortReport) -> list[str]:
    """The practitioner's answer, conditional on the data: does the primary variant rank
    near-lossless candidates here, can the data tell, and what to do next."""
    v = r.variant(r.primary)
    name, nz = v.name, len(r.zone_models)
    zone_list = f" ({', '.join(r.zone_models)})" if 0 < nz <= 8 else ""
    if not v.full.ok or v.full.p >= 0.05:
        return [f"{name} does not track the benchmark even over the whole cohort here: do not use it to "
                "choose among these models; benchmark them directly."]
    if not v.zone.ok:
        return [f"{name} tracks the benchmark over the whole cohort, but the zone holds {_models(v.zone.n)} "
                f"with a usable correlation ({v.zone.status}): use {name} to discard models outside the zone "
                f"and benchmark the {_models(nz)} inside it{zone_list} directly."]
    same_sign = (v.zone.rho > 0) == (v.full.rho > 0)
    if v.zone.p < 0.05 and same_sign:
        return [f"Yes: {name} ranks the near-lossless candidates here (zone rho {v.zone.rho:+.2f}, "
                f"p = {format_p(v.zone.p)}, {_models(v.zone.n)}). Trust it to order the zone's candidates and "
                "confirm only the final pick on the benchmark."]
    n = v.null
    if n.status != "ok":
        return [f"{name} tracks the benchmark over the whole cohort; inside the zone its rho is "
                f"{v.zone.rho:+.2f} (p = {format_p(v.zone.p)}) and the range-restriction null is {n.status}"
                f"{': ' + n.note if n.note else ''}, so the data cannot say whether it still ranks "
                f"there: benchmark the zone's {_models(nz)}{zone_list} directly."]
    if n.p < NULL_ALPHA_REPORT:
        return [f"No: inside the zone {name} does not rank the near-lossless candidates (rho {v.zone.rho:+.2f}, "
                f"weaker than restriction of range predicts, null p = {format_p(n.p)}). Use {name} only to "
                f"discard models outside the zone; benchmark the {_models(nz)} inside it{zone_list} directly."]
    if n.power < POWER_ENOUGH:
        return [f"The data cannot tell: the zone rho ({v.zone.rho:+.2f}) is within what restriction of range "
                f"predicts, but this null would catch a zone with no relation only {n.power * 100:.0f}% of the "
                f"time. Neither trust nor dismiss {name} inside the zone: benchmark its {_models(nz)}{zone_list} "
                "directly, with more prompts if they must be told apart."]
    return [f"Probably: the zone rho ({v.zone.rho:+.2f}) is within what restriction of range and benchmark noise "
            f"predict, and the null would have caught a zone with no relation {n.power * 100:.0f}% of the time. "
            f"{name} is consistent with ranking the zone as well as this benchmark can measure; the zone's models "
            "differ by less than the benchmark resolves, so choose among them on size or speed, or benchmark "
            "with more prompts to separate them."]


def blocks(r: CohortReport, figures: dict[str, str] | None = None, *, detail: bool = True) -> list:
    """The report's blocks; detail=False (the terminal summary) leaves out the per-task,
    all-variant sweep and per-model flip tables, which the Markdown/HTML report and the
    JSON keep."""
    figures = figures or {}
    th = f"{r.zone_threshold * 100:g}%"
    out = [Heading(1, f"Cohort analysis: {r.name}")]
    tasks_desc = ", ".join(f"{t} ({_prompts(r, t)} prompts, weight {r.weights[t]:.2f})" for t in r.tasks)
    out.append(Para(f"{len(r.models)} quantized models against {r.reference.name}; tasks: {tasks_desc}. "
                    f"Silent zone: composite within {th} (relative) of the reference, fixed before "
                    f"fidelity was looked at: {_models(len(r.zone_models))}"
                    + (f" ({', '.join(r.zone_models)})." if r.zone_models else ".")))
    out += [Heading(2, "Summary"), Bullets(tuple(headline(r)))]
    if "scatter" in figures:
        out.append(Image(figures["scatter"], FIGURE_CAPTIONS["scatter"]))

    out.append(Heading(2, "Scores"))
    out.append(_scores_table(r))

    out.append(Heading(2, "Correlation with the composite score"))
    out.append(Para("Spearman rho [95% bootstrap CI over models], p; Kendall tau. Full cohort and "
                    f"the {th} silent zone. Null: the zone rho expected if the full-cohort relation "
                    "held inside the zone (median [95%]), and the share of null draws as weak as "
                    "observed (p); power: the share of zones of the same size with no relation at all "
                    "that the null would reject; the simulated zones' sizes and the share of draws "
                    "with a defined rho."))
    out.append(_variants_table(r))
    out.append(_null_table(r))
    if detail and len(r.tasks) > 1:
        out.append(Heading(3, "Per task"))
        out.append(_task_table(r))

    out.append(Heading(2, "Sensitivity to the zone threshold"))
    out.append(_sweep_table(r))
    if detail:
        out.append(_sweep_all_table(r))
    if "sensitivity" in figures:
        out.append(Image(figures["sensitivity"], FIGURE_CAPTIONS["sensitivity"]))

    out.append(Heading(2, "Hold-out zone"))
    out.append(Para("The zone is chosen on a random half of every task's prompts and the correlation "
                    "measured on the other half; repeated. Summaries over the splits whose zone had "
                    "at least 4 models."))
    out.append(_holdout_table(r))
    if "null_holdout" in figures:
        out.append(Image(figures["null_holdout"], FIGURE_CAPTIONS["null_holdout"]))

    out.append(Heading(2, "Volume vs direction"))
    out.append(Para("Per prompt against the reference: correct-to-wrong and wrong-to-correct flips "
                    "(for fractional scores, the negative and positive parts of the change). "
                    "Volume = all flips / prompts; direction = net change / prompts. A metric that "
                    "measures how much a model moved, not which way, tracks volume and not direction."))
    out.append(_voldir_table(r, detail))
    if detail:
        out.append(_flips_table(r))
    if "volume_direction" in figures:
        out.append(Image(figures["volume_direction"], FIGURE_CAPTIONS["volume_direction"]))

    if r.direction is not None:
        out += direction_blocks(r, figures)

    if r.failure:
        out.append(Heading(2, "Per-prompt failure prediction"))
        f0 = r.failure[0]
        out.append(Para(f"Per-prompt mean KLD on failed vs passed prompts (score < "
                        f"{r.options.fail_below:g} fails), tasks: {', '.join(f0.tasks)}. GM ratio: "
                        "geometric-mean KLD of failed over passed prompts [95% bootstrap CI]; AUROC of "
                        "KLD as a failure score (Mann-Whitney, one-sided p). The same over the prompts "
                        "the reference passed only (the quantization's own failures): GM ratio of the "
                        "prompts the model broke over the ones it kept, and AUROC."))
        out.append(_failure_table(r))
    if r.routing is not None:
        out.append(Heading(2, "Routing by per-prompt KLD"))
        out += _routing_blocks(r)
    if "pareto" in figures:
        out.append(Heading(2, "Size vs tail fidelity"))
        out.append(Image(figures["pareto"], FIGURE_CAPTIONS["pareto"]))
    o = r.options
    out.append(Heading(2, "Settings and notes"))
    items = [f"zone threshold {o.zone_threshold:g}; sweep {', '.join(f'{t:g}' for t in o.thresholds)}; "
             f"seed {o.seed}; {o.n_bootstrap} bootstrap resamples and null draws; "
             f"{o.holdout_reps} hold-out splits" + ("; prompt sets intersected" if o.intersect else "")]
    items += list(r.notes)
    out.append(Bullets(tuple(items)))
    out.append(Heading(2, "Verdict"))
    out += [Para(t) for t in verdict(r)]
    return out


def direction_blocks(r: CohortReport, figures: dict[str, str]) -> list:
    """docs/direction.md's comparison: every direction-aware candidate beside kld_mean, the
    hold-out's selection and the verdict."""
    d = r.direction
    out = [Heading(2, "Direction-aware metrics against KLD")]
    if d.status != "ok" and not d.metrics:
        out.append(Para(f"No comparison ({d.status}): {'; '.join(d.notes)}."))
        return out
    windows = ("jointly with the calibration windows" if d.windows_resampled
               else "with the calibration metrics held fixed (their own sampling noise ignored)")
    halves = ", ".join(f"{t} {a} + {b}" for t, (a, b) in d.half_prompts.items())
    out.append(Para(
        "Candidates measured on the calibration text (larger = more damage; a metric that ranks the zone has "
        f"rho near -1). Zone rho: Spearman against the composite over the {_models(len(d.zone_models))} of the "
        f"zone [95% CI]; Δ vs kld_mean: rho - kld_mean's rho [95% CI], both from a paired bootstrap "
        f"({d.draws} draws, seed {d.seed}) resampling the task prompts per task {windows}, one resample for "
        f"every metric. Hold-out: prompts split by {d.groups} into halves A and B ({halves} prompts); the zone "
        f"({_models(len(d.half_a_zone))}) and the best candidate chosen on half A, rho measured on half B "
        "over half A's zone. The full-cohort rho is for context."))
    out.append(direction_table(d))
    if "direction" in figures:
        out.append(Image(figures["direction"], FIGURE_CAPTIONS["direction"]))
    if d.selected:
        out.append(Para(f"Selected on half A: {d.selected}. {d.verdict}"))
    for note in d.notes:
        out.append(Para(f"Note: {note}."))
    return out


def direction_table(d) -> Table:
    """metric, zone rho [CI], Δrho vs kld_mean [paired CI], half-A rho, half-B rho [CI],
    half-B Δ [paired CI], full-cohort rho."""
    rows = []
    for m in d.metrics:
        mark = " *" if m.name == d.selected else ""
        rows.append((m.name + mark, _range(m.zone_rho, m.zone_low, m.zone_high),
                     "-" if m.name == "kld_mean" else _range(m.delta, m.delta_low, m.delta_high),
                     _num(m.half_a_rho, "+.2f"), _range(m.half_b_rho, m.half_b_low, m.half_b_high),
                     "-" if m.name == "kld_mean" else _range(m.half_b_delta, m.half_b_delta_low,
                                                             m.half_b_delta_high),
                     _num(m.full_rho, "+.2f")))
    return Table(("metric", "zone rho [95% CI]", "Δ vs kld_mean [paired CI]", "half-A rho",
                  "half-B rho [95% CI]", "half-B Δ [paired CI]", "full rho"), tuple(rows), "lrrrrrr")


def _prompts(r: CohortReport, task: str) -> int:
    for f in r.flips:
        if f.task == task:
            return f.n_prompts
    return 0


def _scores_table(r: CohortReport) -> Table:
    has_size = any(not math.isnan(m.size_gb) for m in r.models)
    has_bpw = any(not math.isnan(m.bpw) for m in r.models)
    header = ["model"] + (["bpw"] if has_bpw else []) + (["size GB"] if has_size else [])
    header += list(r.tasks) + ["composite", "change", "zone", r.primary]
    rows = []
    fid_fmt = column_format([m.fidelity.get(r.primary, math.nan) for m in (r.reference, *r.models)])
    size_fmt = column_format([m.size_gb for m in r.models])
    for m, is_ref in ((r.reference, True), *((m, False) for m in r.models)):
        row = [m.name + (" (reference)" if is_ref else "")]
        if has_bpw:
            row.append(_num(m.bpw, ".2f") if not is_ref else "")
        if has_size:
            row.append(_fixed(m.size_gb, size_fmt) if not is_ref else "")
        row += [_num(m.task_scores[t]) for t in r.tasks]
        row += [_num(m.composite), "" if is_ref else _pct(m.relative_change),
                "" if is_ref else ("yes" if m.in_zone else ""), _fixed(m.fidelity.get(r.primary, math.nan), fid_fmt)]
        rows.append(tuple(row))
    return Table(tuple(header), tuple(rows))


def _variants_table(r: CohortReport) -> Table:
    rows = []
    for v in r.variants:
        rows.append((v.name, str(v.full.n), _rho(v.full), _p(v.full), _num(v.full.tau, "+.2f"),
                     str(v.zone.n), _rho(v.zone), _p(v.zone), _num(v.zone.tau, "+.2f")))
    return Table(("variant", "n", "full rho [CI]", "p", "tau", "zone n", "zone rho [CI]", "p", "tau"),
                 tuple(rows))


def _null_table(r: CohortReport) -> Table:
    rows = []
    for v in r.variants:
        n = v.null
        if n.status == "ok":
            rows.append((v.name, _range(n.median, n.low, n.high), format_p(n.p), f"{n.power * 100:.0f}%",
                         _range(n.zone_size_median, n.zone_size_low, n.zone_size_high, ".0f"),
                         f"{n.kept_fraction * 100:.0f}%", n.verdict + ("; no anchor at the reference"
                                                                       if n.note else "")))
        else:
            rows.append((v.name, "-", "-", "-", "-", "-", f"{n.status}: {n.note}" if n.note else n.status))
    return Table(("variant", "null zone rho", "null p", "power", "simulated zone n", "draws kept",
                  "observed zone rho is"), tuple(rows), "lrrrrrl")


def _task_table(r: CohortReport) -> Table:
    header = ["variant"] + [f"{t}: full" for t in r.tasks] + [f"{t}: zone" for t in r.tasks]
    rows = []
    for v in r.variants:
        by = {tc.target: tc for tc in v.tasks}
        rows.append(tuple([v.name] + [_rho_p(by[t].full) for t in r.tasks]
                          + [_rho_p(by[t].zone) for t in r.tasks]))
    return Table(tuple(header), tuple(rows))


def _rho_p(c: Correlation) -> str:
    if not c.ok:
        return "undefined" if c.status == "constant" else c.status
    return f"{c.rho:+.2f} (p {format_p(c.p)})"


def _sweep_table(r: CohortReport) -> Table:
    rows = []
    for s in r.sensitivity:
        c = s.correlations[r.primary]
        n = s.null
        rows.append((f"{s.threshold * 100:g}%" + (" *" if s.threshold == r.zone_threshold else ""),
                     str(s.zone_size), _rho(c), _p(c),
                     _range(n.median, n.low, n.high) if n.status == "ok" else "-",
                     format_p(n.p) if n.status == "ok" else "-"))
    return Table(("threshold", "zone n", f"{r.primary} rho [CI]", "p", "null zone rho", "null p"), tuple(rows))


def _sweep_all_table(r: CohortReport) -> Table:
    header = ["variant"] + [f"{s.threshold * 100:g}% (n={s.zone_size})" for s in r.sensitivity]
    rows = []
    for v in r.variants:
        rows.append(tuple([v.name] + [_short(s.correlations[v.name]) for s in r.sensitivity]))
    return Table(tuple(header), tuple(rows))


def _short(c: Correlation) -> str:
    if not c.ok:
        return "undef." if c.status == "constant" else "insuff."
    return f"{c.rho:+.2f}" + ("*" if c.p < 0.05 else "")


def _holdout_table(r: CohortReport) -> Table:
    rows = []
    for v in r.variants:
        h = v.holdout
        if h.status in ("skipped", "unavailable"):
            rows.append((v.name, f"{h.status}: {h.note}", "", "", ""))
            continue
        rows.append((v.name, _range(h.zone_size_median, h.zone_size_low, h.zone_size_high, ".0f"),
                     _pct(h.insufficient_fraction, signed=False),
                     _range(h.rho_median, h.rho_low, h.rho_high),
                     _range(h.full_rho_median, h.full_rho_low, h.full_rho_high)))
    return Table(("variant", "zone n [95%]", "splits insufficient", "zone rho [95% of splits]",
                  "full rho [95% of splits]"), tuple(rows))


def _voldir_table(r: CohortReport, detail: bool = True) -> Table:
    """Volume and direction rhos: the composite (or pooled) figure, then each task's, for
    every variant (detail) or the primary one only (the terminal summary)."""
    scope0 = "all prompts (pooled)" if r.options.pool_flips else "composite"
    rows = []
    for v in r.variants:
        rows.append((v.name, scope0, _rho_p(v.volume[0].full), _rho_p(v.volume[0].zone),
                     _rho_p(v.direction[0].full), _rho_p(v.direction[0].zone)))
        if len(r.tasks) > 1 and (detail or v.name == r.primary):
            for vol, d in zip(v.volume[1:], v.direction[1:]):
                rows.append(("", vol.target.split("/", 1)[1], _rho_p(vol.full), _rho_p(vol.zone),
                             _rho_p(d.full), _rho_p(d.zone)))
    return Table(("variant", "scope", "volume: full", "volume: zone", "direction: full", "direction: zone"),
                 tuple(rows))


def _flips_table(r: CohortReport) -> Table:
    """Per model, composite flips as (weighted) percentages of prompts, then each task's counts."""
    zone = set(r.zone_models)
    by = {(f.model, f.task): f for f in r.flips}
    header = ["model", "correct->wrong", "wrong->correct", "volume", "direction"]
    if len(r.tasks) > 1:
        header += [f"{t} c->w / w->c" for t in r.tasks]
    rows = []
    for m in r.models:
        f = by[(m.name, COMPOSITE)]
        row = [m.name + (" (zone)" if m.name in zone else ""),
               _pct(f.correct_to_wrong / f.n_prompts, signed=False),
               _pct(f.wrong_to_correct / f.n_prompts, signed=False),
               _pct(f.volume, signed=False), _pct(f.direction)]
        if len(r.tasks) > 1:
            row += [f"{by[(m.name, t)].correct_to_wrong:g} / {by[(m.name, t)].wrong_to_correct:g}" for t in r.tasks]
        rows.append(tuple(row))
    return Table(tuple(header), tuple(rows))


def _failure_table(r: CohortReport) -> Table:
    rows = []
    for f in r.failure:
        own = (f"{_num(f.flip_gm_ratio, '.2f')} / {_num(f.flip_auroc, '.2f')} "
               f"({f.flip_n_broken}/{f.flip_n})")
        if f.status != "ok":
            rows.append((f.model, f"{f.n_failed}/{f.n_passed}", f.status, "-", "-", own))
            continue
        gm = f"{f.gm_ratio:.2f} [{f.gm_ratio_low:.2f}, {f.gm_ratio_high:.2f}]" if not math.isnan(
            f.gm_ratio_low) else f"{f.gm_ratio:.2f}"
        rows.append((f.model, f"{f.n_failed}/{f.n_passed}", gm, _num(f.auroc, ".2f"), format_p(f.auroc_p), own))
    return Table(("model", "failed/passed", "all prompts: GM ratio [CI]", "AUROC", "p",
                  "reference passed: GM ratio / AUROC (broken/passed)"), tuple(rows))


def _routing_blocks(r: CohortReport) -> list:
    ro = r.routing
    if ro.status != "ok":
        return [Para(f"Routing {ro.status}: {ro.note}")]
    out = [Para(f"Among {len(ro.models)} models ({', '.join(ro.models)}), on the {ro.n_disagree} of "
                f"{ro.n_prompts} prompts where they disagree, answer with the model whose per-prompt "
                "KLD is lowest.")]
    out.append(Table(("", "score on disagreement prompts"), (
        ("routed by lowest KLD", f"{ro.accuracy * 100:.1f}%"
                                 + _ci(ro.accuracy_low * 100, ro.accuracy_high * 100, ".1f")),
        ("chance (random pick)", f"{ro.chance * 100:.1f}%"),
        ("routed - chance", f"{ro.gain * 100:+.1f} points" + _ci(ro.gain_low * 100, ro.gain_high * 100, "+.1f")),
        ("best single model (" + ro.best_single_model + ")", f"{ro.best_single * 100:.1f}%"),
        ("oracle", f"{ro.oracle * 100:.1f}%"),
    )))
    single = routing_single_pick(ro)
    if single:
        out.append(Para(single))
    if ro.picked:
        out.append(Para("Prompts routed to each model: " + ", ".join(
            f"{m} {c}" for m, c in sorted(ro.picked.items(), key=lambda kv: -kv[1])) + "."))
    if ro.n_pairs:
        out.append(Para(f"Every pair routed on its own disagreements ({ro.n_pairs} pairs): accuracy median "
                        f"{ro.pair_accuracy_median * 100:.1f}% (range {ro.pair_accuracy_min * 100:.1f} to "
                        f"{ro.pair_accuracy_max * 100:.1f}%) against chance {ro.pair_chance_mean * 100:.1f}%; "
                        f"{ro.pairs_above_chance * 100:.0f}% of pairs beat chance."))
    return out
