"""`fidelity-kld cohort`: can a fidelity metric stand in for the benchmark across a cohort
of quantized models, and inside the silent zone of near-lossless ones?"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import click

from .._atomic import make_temp
from ..cli import InputError

EXAMPLE = ("data", "example_cohort", "manifest.toml")


def _thresholds(ctx, param, value):
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("a comma-separated list of numbers, e.g. 0.005,0.01,0.02") from None
    if not out:
        raise click.BadParameter("at least one threshold")
    return out


def _models(ctx, param, value):
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def example_manifest() -> Path:
    return Path(str(resources.files("fidelity_kld").joinpath(*EXAMPLE)))


@click.command("cohort")
@click.argument("manifest", required=False, type=click.Path(dir_okay=False))
@click.option("--example", is_flag=True, help="Run on the example cohort shipped with the package.")
@click.option("--zone-threshold", type=float, default=None,
              help="Silent zone: composite within this relative distance of the reference (default 0.02).")
@click.option("--thresholds", callback=_thresholds, default=None,
              help="Sensitivity sweep, comma-separated (default 0.005,0.01,0.02,0.03,0.05; the zone threshold is always added).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text",
              show_default=True, help="What to print.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write the printed output to this file instead of stdout.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write a report directory: report.md, report.html, cohort.json, figures/*.png.")
@click.option("--intersect", is_flag=True,
              help="Keep the prompts every model was scored on instead of failing on differences.")
@click.option("--seed", type=int, default=None, help="Seed for every random draw (default 0).")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=0), default=None,
              help="Bootstrap resamples for CIs and null draws (default 1000).")
@click.option("--holdout-reps", type=click.IntRange(min=0), default=None,
              help="Hold-out repetitions (default 200).")
@click.option("--primary", default=None, help="The fidelity variant to lead with (default kld_mean).")
@click.option("--routing", callback=_models, default=None,
              help="Comma-separated models to route among (default: the zone's models with per-prompt KLD).")
@click.option("--fail-below", type=float, default=None,
              help="A per-prompt score below this is a failure (default 0.5).")
@click.option("--pool-flips", is_flag=True,
              help="Composite volume and direction over all prompts of all tasks, each counted once, "
                   "instead of weighting the tasks' rates (the composite score and zone keep the weights).")
@click.option("--direction-groups", default=None, metavar="REGEX",
              help="Direction-aware comparison (docs/direction.md): a regular expression whose first group "
                   "names a prompt's group for the hold-out split, e.g. '^w(\\d+)' (default: each prompt "
                   "its own group; the manifest's direction_groups).")
@click.option("--direction-draws", type=click.IntRange(min=0), default=None,
              help="Paired bootstrap draws of the direction-aware comparison (default 2000).")
@click.option("--direction-seed", type=int, default=None,
              help="Seed of the direction-aware comparison (default 20261203, the pre-registered one).")
def command(manifest, example, zone_threshold, thresholds, fmt, output, report_dir, intersect, seed,
            n_bootstrap, holdout_reps, primary, routing, fail_below, pool_flips, direction_groups,
            direction_draws, direction_seed):
    """Correlate fidelity variants with benchmark scores across a cohort of quantized models:
    full cohort and pre-specified silent zone, threshold sweep, hold-out, range-restriction
    null, volume vs direction, per-prompt failure prediction and routing; and, when the
    summaries carry issue 16's direction-aware candidates, their paired comparison with
    kld_mean (docs/direction.md).

    MANIFEST is a TOML, JSON or CSV file naming the reference, the quantized models, their
    fidelity summaries (from `fidelity-kld compare --output`) and benchmark outcomes; the
    layouts are in docs/cohort.md.
    """
    from ..report import render, write_report
    from ..stats.cohort import analyze
    from ..stats.manifest import ManifestError
    from ..stats.outcomes import OutcomeError

    if example == bool(manifest):
        raise click.UsageError("give a MANIFEST or --example (one of them)")
    path = example_manifest() if example else Path(manifest)
    _check_outputs(path, output, report_dir)
    try:
        report = analyze(path, zone_threshold=zone_threshold, thresholds=thresholds, seed=seed,
                         n_bootstrap=n_bootstrap, holdout_reps=holdout_reps, primary=primary,
                         routing=routing, fail_below=fail_below, intersect=intersect or None,
                         pool_flips=pool_flips or None, direction_groups=direction_groups,
                         direction_draws=direction_draws, direction_seed=direction_seed)
    except (ManifestError, OutcomeError) as e:
        raise InputError(str(e)) from None
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    text = render(report, fmt)
    if report_dir is not None:
        try:
            write_report(report, report_dir)
        except ValueError as e:
            raise InputError(str(e)) from None
    if output is None:
        click.echo(text, nl=False)
    else:
        _write_atomic(Path(output), text)
    if report_dir is not None:
        click.echo(f"report written to {report_dir}", err=True)


def _check_outputs(manifest: Path, output, report_dir) -> None:
    """InputError unless --output and --report leave the manifest and every file it names
    (summaries, per-prompt files, outcomes) alone: the manifest first, then what it names
    (a manifest that does not parse is an error either way)."""
    from ..io.paths import check_outputs
    from ..stats.manifest import ManifestError, manifest_inputs

    outputs, directories = {"--output": output}, {"--report": report_dir}
    try:
        check_outputs(outputs, [manifest], directories=directories)
        if output is not None or report_dir is not None:
            check_outputs(outputs, [manifest, *manifest_inputs(manifest)], directories=directories)
    except ValueError as e:  # DumpError and ManifestError included
        raise InputError(str(e)) from None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
