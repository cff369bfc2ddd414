"""Report rendering: one document model, three renderers, PNG figures, atomic writes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fidelity_kld.report import render, write_report
from fidelity_kld.report.document import Bullets, Heading, Image, Para, Table, to_html, to_markdown, to_text
from fidelity_kld.stats.cohort import AnalysisOptions, analyze, analyze_cohort
from fidelity_kld.stats.cohort_data import Cohort

DATA = Path(__file__).parent / "data" / "cohort"
FAST = dict(n_bootstrap=100, holdout_reps=20)
BLOCKS = [Heading(1, "T"), Para("a < b"), Bullets(("x", "y")),
          Table(("name", "value"), (("k|1", "0.5"), ("long name", "12.25"))), Image("f.png", "cap")]


def test_text_table_is_aligned():
    text = to_text(BLOCKS)
    lines = [ln for ln in text.splitlines() if "0.5" in ln or "12.25" in ln]
    assert lines[0].index("0.5") + 3 == lines[1].index("12.25") + 5  # right-aligned numbers
    assert "T\n=" in text and "  - x" in text and "[figure: f.png]" in text


def test_markdown_escapes_pipes_and_aligns_columns():
    md = to_markdown(BLOCKS)
    assert "| k\\|1 | 0.5 |" in md and "|:---|---:|" in md and "![cap](f.png)" in md


def test_html_escapes():
    html = to_html(BLOCKS, "a & b")
    assert "<title>a &amp; b</title>" in html and "<p>a &lt; b</p>" in html
    assert '<td class="r">12.25</td>' in html and '<img src="f.png"' in html


@pytest.fixture(scope="module")
def example_report():
    return analyze(DATA.parents[2] / "python" / "fidelity_kld" / "data" / "example_cohort" / "manifest.toml", **FAST)


def test_write_report_makes_every_figure_and_links_them(tmp_path, example_report):
    out = write_report(example_report, tmp_path / "r")
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == ["null_holdout.png", "pareto.png", "scatter.png", "sensitivity.png", "volume_direction.png"]
    for f in figs:
        data = (out / "figures" / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"figures/{f}" in (out / "report.md").read_text()
        assert f'src="figures/{f}"' in (out / "report.html").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary directories left


def test_pareto_needs_sizes(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.vstack([np.ones(50), (rng.random((6, 50)) < 0.97)]).astype(float)
    c = Cohort("ref", tuple("abcdef"), ("t",), {"t": tuple(map(str, range(50)))}, {"t": rows},
               {"kld_mean": np.geomspace(0.001, 0.1, 6)})
    out = write_report(analyze_cohort(c, AnalysisOptions(**FAST)), tmp_path / "r")
    assert "pareto.png" not in {p.name for p in (out / "figures").iterdir()}


def test_rewriting_a_report_replaces_it(tmp_path, example_report):
    d = tmp_path / "r"
    write_report(example_report, d, figures=False)
    (d / "stale.txt").write_text("old")
    write_report(example_report, d, figures=False)
    assert not (d / "stale.txt").exists() and (d / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_failure_midway_leaves_nothing_behind(tmp_path, example_report, monkeypatch):
    import fidelity_kld.report.figures as figures

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "make_figures", boom)
    with pytest.raises(RuntimeError):
        write_report(example_report, tmp_path / "r")
    assert list(tmp_path.iterdir()) == []
    # and an existing report survives a failed rewrite
    monkeypatch.undo()
    write_report(example_report, tmp_path / "r")
    before = (tmp_path / "r" / "report.md").read_text()
    monkeypatch.setattr(figures, "make_figures", boom)
    with pytest.raises(RuntimeError):
        write_report(example_report, tmp_path / "r")
    assert (tmp_path / "r" / "report.md").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["r"]


def test_report_refuses_a_file(tmp_path, example_report):
    (tmp_path / "r").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_report(example_report, tmp_path / "r")


def test_text_render_does_not_import_matplotlib():
    code = ("import sys\nfrom fidelity_kld.stats.cohort import analyze\nfrom fidelity_kld.report import render\n"
            f"r = analyze({str(DATA / 'manifest.toml')!r}, n_bootstrap=50, holdout_reps=5)\n"
            "render(r, 'text'); render(r, 'markdown'); render(r, 'json')\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_text_summary_is_shorter_than_the_markdown_report(example_report):
    text, md = render(example_report, "text"), render(example_report, "markdown")
    assert "Per task" not in text and "### Per task" in md
    assert len(text) < len(md)
    with pytest.raises(ValueError, match="unknown format"):
        render(example_report, "yaml")


def test_without_bootstrap_or_holdout_nothing_prints_nan(tmp_path):
    r = analyze(DATA / "manifest.toml", zone_threshold=0.07, n_bootstrap=0, holdout_reps=0)
    for fmt in ("text", "markdown"):
        assert "nan" not in render(r, fmt).lower()
    assert r.variant("kld_mean").holdout.status == "skipped" and r.variant("kld_mean").null.status in (
        "skipped", "insufficient")
    write_report(r, tmp_path / "r")
    assert (tmp_path / "r" / "figures" / "scatter.png").exists()
