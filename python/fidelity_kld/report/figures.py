"""The cohort report's figures (PNG, matplotlib imported here and only here)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..stats.cohort import CohortReport
from ..stats.decompose import COMPOSITE

ZONE_COLOR = "#2a9d8f"
OUT_COLOR = "#6c757d"
REF_COLOR = "#e76f51"


def _legend_below(ax, ncol=2):
    """Legends go under the axes: inside they hide the points, wherever those fall."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, fontsize=7.5, frameon=False)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def make_figures(r: CohortReport, out_dir) -> dict[str, str]:
    """Write every figure the cohort supports into out_dir; {name: file name}."""
    plt = _plt()
    out_dir = Path(out_dir)
    made = {}
    for name, fn in (("scatter", _scatter), ("sensitivity", _sensitivity), ("null_holdout", _null_holdout),
                     ("volume_direction", _volume_direction), ("pareto", _pareto),
                     ("direction", _direction)):
        fig = fn(r, plt)
        if fig is None:
            continue
        fname = f"{name}.png"
        fig.savefig(out_dir / fname, dpi=130, bbox_inches="tight")
        plt.close(fig)
        made[name] = fname
    return made


def _xy(r: CohortReport, variant: str):
    x = np.array([m.fidelity.get(variant, math.nan) for m in r.models])
    y = np.array([m.composite for m in r.models])
    zone = np.array([m.in_zone for m in r.models])
    return x, y, zone


def _log_ok(x) -> bool:
    f = x[np.isfinite(x)]
    return f.size > 1 and np.all(f > 0) and f.max() / f.min() > 20


def _scatter(r: CohortReport, plt):
    x, y, zone = _xy(r, r.primary)
    v = r.variant(r.primary)
    ref = r.reference.composite
    fig, ax = plt.subplots(figsize=(7.5, 5))
    lo, hi = ref * (1 - r.zone_threshold), ref * (1 + r.zone_threshold)
    ax.axhspan(lo, hi, color=ZONE_COLOR, alpha=0.12, lw=0,
               label=f"silent zone (within {r.zone_threshold * 100:g}% of reference)")
    ax.axhline(ref, color=REF_COLOR, lw=1, ls="--", label=f"reference ({r.reference.name})")
    ok = np.isfinite(x)
    ax.scatter(x[ok & ~zone], y[ok & ~zone], color=OUT_COLOR, s=28, zorder=3, label="outside the zone")
    ax.scatter(x[ok & zone], y[ok & zone], color=ZONE_COLOR, s=32, zorder=3, label="in the zone")
    if _log_ok(x):
        ax.set_xscale("log")
    ax.set_xlabel(f"{r.primary} ({v.description})")
    ax.set_ylabel("composite score")
    text = [f"full cohort: {_rho_text(v.full)}", f"silent zone: {_rho_text(v.zone)}"]
    if v.null.status == "ok":
        text.append(f"range-restriction null for the zone: {v.null.median:+.2f} "
                    f"[{v.null.low:+.2f}, {v.null.high:+.2f}], p = {v.null.p:.2g}")
    ax.set_title(f"{r.name}: {r.primary} vs benchmark\n" + "\n".join(text), fontsize=9, loc="left")
    unlabelled = place_labels(fig, ax, x[ok], y[ok], [m.name for m, good in zip(r.models, ok) if good])
    _legend_below(ax)
    if unlabelled:
        _unlabelled_note(fig, ax, unlabelled)
    return fig


def _unlabelled_note(fig, ax, names):
    """The models whose labels found no free spot, listed under the legend."""
    text = "not labelled (no room): " + ", ".join(names)
    import textwrap

    ax.annotate("\n".join(textwrap.wrap(text, 120)), xy=(0.0, -0.30), xycoords="axes fraction",
                fontsize=6.5, va="top", color="#444")


# label offsets (points) tried in order around a point: right, left, above, below, diagonals,
# then the same further out
_OFFSETS = [(dx * k, dy * k) for k in (1, 2, 3) for dx, dy in
            ((4, -3), (-4, -3), (0, 5), (0, -11), (4, 4), (-4, 4), (4, -10), (-4, -10))]


def place_labels(fig, ax, xs, ys, names, fontsize=6.5) -> list[str]:
    """Label each point where its text overlaps no other label, no other point and stays in
    the axes, trying offsets around it in turn; returns the names that found no such spot
    (the caller lists them). Points are placed left to right in display coordinates, so a
    dense cluster labels what it can and says which it could not."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    axbox = ax.get_window_extent(renderer)
    r = 3.5 * fig.dpi / 72  # a marker's radius in pixels
    marks = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in pts]
    placed, missing = [], []
    for i in np.argsort(pts[:, 0], kind="stable"):
        done = False
        for dx, dy in _OFFSETS:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            # a label moved away from its point gets a thin leader line back to it
            far = max(abs(dx), abs(dy)) > 5
            t = ax.annotate(names[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                            fontsize=fontsize, color="#333", ha=ha, va="bottom",
                            arrowprops=dict(arrowstyle="-", lw=0.4, color="#999", shrinkA=0, shrinkB=3)
                            if far else None)
            # the text's own box (an Annotation's extent would include its leader line)
            t.update_positions(renderer)
            bb = Text.get_window_extent(t, renderer).expanded(1.05, 1.1)
            clash = (not axbox.contains(bb.x0, bb.y0) or not axbox.contains(bb.x1, bb.y1)
                     or any(bb.overlaps(o) for o in placed)
                     or any(bb.overlaps(m) for j, m in enumerate(marks) if j != i))
            if clash:
                t.remove()
                continue
            placed.append(bb)
            done = True
            break
        if not done:
            missing.append(names[i])
    return missing


def _rho_text(c) -> str:
    if not c.ok:
        return f"{c.status} (n = {c.n})"
    ci = "" if math.isnan(c.ci_low) else f" [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"
    return f"rho = {c.rho:+.2f}{ci}, p = {c.p:.2g}, n = {c.n}"


def _sensitivity(r: CohortReport, plt):
    pts = r.sensitivity
    th = np.array([s.threshold * 100 for s in pts])
    cs = [s.correlations[r.primary] for s in pts]
    rho = np.array([c.rho if c.ok else np.nan for c in cs])
    lo = np.array([c.ci_low if c.ok else np.nan for c in cs])
    hi = np.array([c.ci_high if c.ok else np.nan for c in cs])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    nl = np.array([s.null.low if s.null.status == "ok" else np.nan for s in pts])
    nh = np.array([s.null.high if s.null.status == "ok" else np.nan for s in pts])
    nm = np.array([s.null.median if s.null.status == "ok" else np.nan for s in pts])
    if np.isfinite(nm).any():
        ax.fill_between(th, nl, nh, color="#adb5bd", alpha=0.35, lw=0, label="range-restriction null (95%)")
        ax.plot(th, nm, color="#6c757d", lw=1, ls=":")
    ok = np.isfinite(rho)
    ax.errorbar(th[ok], rho[ok], yerr=[rho[ok] - lo[ok], hi[ok] - rho[ok]], fmt="o-", color=ZONE_COLOR,
                capsize=3, label=f"zone rho ({r.primary} vs composite), 95% CI")
    full = r.variant(r.primary).full
    if full.ok:
        ax.axhline(full.rho, color=REF_COLOR, lw=1, ls="--", label=f"full cohort rho = {full.rho:+.2f}")
    ax.axhline(0, color="#999", lw=0.6)
    ax.axvline(r.zone_threshold * 100, color="#333", lw=0.6, ls="--")
    for t, s, c in zip(th, pts, cs):
        label = f"n={s.zone_size}" + ("" if c.ok else f"\n{'undefined' if c.status == 'constant' else 'insufficient'}")
        ax.annotate(label, (t, 1.0), fontsize=7, ha="center", va="top", color="#444")
        if not c.ok:
            ax.plot([t], [0], marker="x", color="#999", ms=7)
    pad = 0.06 * (th.max() - th.min()) if th.size > 1 else 0.5
    ax.set_xlim(th.min() - pad, th.max() + pad)
    ax.set_ylim(-1.05, 1.12)
    ax.set_xlabel("zone threshold (% relative to the reference composite)")
    ax.set_ylabel("Spearman rho")
    ax.set_title("Sensitivity of the zone correlation to the threshold")
    _legend_below(ax)
    return fig


def _null_holdout(r: CohortReport, plt):
    null = np.asarray(r.null_draws, float)
    hold = np.asarray(r.holdout_draws, float)
    hold = hold[np.isfinite(hold)]
    if null.size == 0 and hold.size == 0:
        return None
    v = r.variant(r.primary)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bins = np.linspace(-1, 1, 41)
    if null.size:
        ax.hist(null, bins=bins, color="#adb5bd", alpha=0.7, density=True,
                label=f"null: full-cohort relation held in the zone ({null.size} draws)")
    if hold.size:
        ax.hist(hold, bins=bins, color=ZONE_COLOR, alpha=0.55, density=True,
                label=f"hold-out zone rho ({hold.size} splits)")
    if v.zone.ok:
        ax.axvline(v.zone.rho, color=REF_COLOR, lw=2, label=f"observed zone rho = {v.zone.rho:+.2f}")
    if v.full.ok:
        ax.axvline(v.full.rho, color="#333", lw=1, ls="--", label=f"full cohort rho = {v.full.rho:+.2f}")
    ax.set_xlabel(f"Spearman rho in the zone ({r.primary} vs composite)")
    ax.set_ylabel("density")
    ax.set_title("Does the zone rho differ from what restriction of range predicts?")
    _legend_below(ax)
    return fig


def _volume_direction(r: CohortReport, plt):
    x, _, zone = _xy(r, r.primary)
    by = {f.model: f for f in r.flips if f.task == COMPOSITE}
    vol = np.array([by[m.name].volume for m in r.models])
    dirn = np.array([by[m.name].direction for m in r.models])
    v = r.variant(r.primary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    ok = np.isfinite(x)
    for ax, y, name, tc in ((axes[0], vol, "volume (all flips / prompts)", v.volume[0]),
                            (axes[1], dirn, "direction (net change / prompts)", v.direction[0])):
        ax.scatter(x[ok & ~zone], y[ok & ~zone] * 100, color=OUT_COLOR, s=24, label="outside the zone")
        ax.scatter(x[ok & zone], y[ok & zone] * 100, color=ZONE_COLOR, s=28, label="in the zone")
        if _log_ok(x):
            ax.set_xscale("log")
        ax.set_xlabel(r.primary)
        ax.set_ylabel(f"{name}, %")
        ax.set_title(f"full cohort: {_short(tc.full)}\nsilent zone: {_short(tc.zone)}", fontsize=8.5, loc="left")
    axes[1].axhline(0, color="#999", lw=0.6)
    fig.suptitle("What the fidelity metric measures: volume of disagreement, or its direction?", fontsize=10)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=7.5,
               frameon=False)
    return fig


def _short(c) -> str:
    return f"rho = {c.rho:+.2f} (p = {c.p:.2g})" if c.ok else c.status


def _pareto(r: CohortReport, plt):
    size = np.array([m.size_gb for m in r.models])
    name = "kld_p99.9" if any(v.name == "kld_p99.9" for v in r.variants) else r.primary
    x = np.array([m.fidelity.get(name, math.nan) for m in r.models])
    ok = np.isfinite(size) & np.isfinite(x)
    if ok.sum() < 2:
        return None
    zone = np.array([m.in_zone for m in r.models])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(size[ok & ~zone], x[ok & ~zone], color=OUT_COLOR, s=26, label="outside the zone")
    ax.scatter(size[ok & zone], x[ok & zone], color=ZONE_COLOR, s=30, label="in the zone")
    # the front: no other model is both smaller and closer to the reference
    idx = np.where(ok)[0]
    order = idx[np.lexsort((x[idx], size[idx]))]
    front, best = [], math.inf
    for i in order:
        if x[i] < best:
            front.append(i)
            best = x[i]
    ax.step(size[front], x[front], where="post", color=REF_COLOR, lw=1.2, label="Pareto front")
    if _log_ok(x):
        ax.set_yscale("log")
    ax.set_xlabel("model size (GB)")
    ax.set_ylabel(f"{name} ({r.variant(name).description})")
    ax.set_title(f"Size against {name}")
    unlabelled = place_labels(fig, ax, size[ok], x[ok], [m.name for m, good in zip(r.models, ok) if good])
    _legend_below(ax, ncol=3)
    if unlabelled:
        _unlabelled_note(fig, ax, unlabelled)
    return fig


def _direction(r: CohortReport, plt):
    """Zone rho of every direction-aware candidate with its paired-bootstrap CI, over all
    prompts and on half B of the hold-out; kld_mean's zone rho as a reference line."""
    d = r.direction
    if d is None or not d.metrics:
        return None
    ms = d.metrics
    y = np.arange(len(ms))[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(ms) + 1.6))

    def bars(attr, offset, color, label):
        mid = np.array([getattr(m, attr[0]) for m in ms])
        lo = np.array([getattr(m, attr[1]) for m in ms])
        hi = np.array([getattr(m, attr[2]) for m in ms])
        ok = np.isfinite(mid) & np.isfinite(lo)
        ax.errorbar(mid[ok], y[ok] + offset, xerr=[mid[ok] - lo[ok], hi[ok] - mid[ok]], fmt="o", ms=4,
                    color=color, capsize=2, lw=1.2, label=label)

    bars(("zone_rho", "zone_low", "zone_high"), 0.12, ZONE_COLOR, "zone rho, all prompts [95% CI]")
    bars(("half_b_rho", "half_b_low", "half_b_high"), -0.12, OUT_COLOR,
         "zone rho on half B (half A's zone) [95% CI]")
    base = next((m for m in ms if m.name == "kld_mean"), None)
    if base is not None and math.isfinite(base.zone_rho):
        ax.axvline(base.zone_rho, color=REF_COLOR, lw=1, ls="--", label=f"kld_mean zone rho = {base.zone_rho:+.2f}")
    ax.axvline(0, color="#333", lw=0.6)
    ax.set_yticks(y)
    ax.set_yticklabels([m.name + (" (selected on A)" if m.name == d.selected else "") for m in ms], fontsize=8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman rho against the composite in the zone (more negative ranks better)")
    ax.set_title("Do direction-aware metrics rank the silent zone better than KLD?")
    _legend_below(ax, ncol=1)
    return fig
