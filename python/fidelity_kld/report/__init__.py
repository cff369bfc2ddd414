"""Cohort reports: plain text, Markdown, HTML and PNG figures from a CohortReport.

    from fidelity_kld.report import render, write_report
    print(render(report, "markdown"))
    write_report(report, "out/")     # report.md, report.html, cohort.json, figures/*.png
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .._atomic import make_temp_dir
from . import cohort_report, document

FORMATS = ("text", "json", "markdown")
MARKER = "cohort.json"  # a directory holding this is a report we may replace


def render(report, fmt: str = "text") -> str:
    if fmt == "json":
        return report.to_json() + "\n"
    if fmt == "markdown":
        return document.to_markdown(cohort_report.blocks(report))
    if fmt == "text":
        return document.to_text(cohort_report.blocks(report, detail=False))
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def write_report(report, out_dir, *, figures: bool = True) -> Path:
    """Write report.md, report.html, cohort.json and figures/ into out_dir.

    Everything is written into a fresh directory beside out_dir and renamed into place at
    the end, so an interrupted run leaves no half-written report. An existing out_dir is
    replaced only when it is empty or a previous report (it holds cohort.json)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
            raise ValueError(f"{out_dir}: exists and is not a cohort report; choose another directory")
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(out_dir))
    try:
        made = {}
        if figures:
            (tmp / "figures").mkdir()
            from .figures import make_figures

            made = {k: f"figures/{v}" for k, v in make_figures(report, tmp / "figures").items()}
        blocks = cohort_report.blocks(report, made)
        (tmp / "report.md").write_text(document.to_markdown(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(document.to_html(blocks, f"Cohort analysis: {report.name}"),
                                         encoding="utf-8")
        (tmp / MARKER).write_text(report.to_json() + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = Path(make_temp_dir(parent / f"{out_dir.name}.old"))
            os.rename(out_dir, old / "report")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
