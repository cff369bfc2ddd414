"""`fidelity-kld cohort`: formats, report directory, example, errors and exit codes."""

import json
import shutil
from pathlib import Path

import pytest

from fidelity_kld.cli import main

DATA = Path(__file__).parent / "data" / "cohort"
FAST = ["--bootstrap", "100", "--holdout-reps", "10"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cohort", *argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_example_tells_the_story(capsys):
    code, out, err = run(["--example", *FAST], capsys)
    assert code == 0, err
    assert "Over the full cohort, kld_mean tracks the composite score" in out
    assert "Inside the 2% silent zone (" in out and "it does not" in out
    assert "Routing each disagreement prompt" in out


def test_json_has_every_number(capsys):
    code, out, _ = run([str(DATA / "manifest.toml"), "--format", "json", *FAST], capsys)
    d = json.loads(out)
    assert code == 0 and d["reference"]["name"] == "bf16"
    kld = next(v for v in d["variants"] if v["name"] == "kld_mean")
    assert kld["full"]["rho"] == pytest.approx(-0.9) and kld["zone"]["status"] == "insufficient"
    assert [s["threshold"] for s in d["sensitivity"]] == [0.005, 0.01, 0.02, 0.03, 0.05]
    assert d["options"]["n_bootstrap"] == 100 and d["options"]["holdout_reps"] == 10


def test_flags_reach_the_analysis(capsys):
    code, out, _ = run([str(DATA / "manifest.csv"), "--format", "json", "--zone-threshold", "0.07",
                        "--thresholds", "0.07,0.3", "--seed", "3", "--primary", "kld_p99",
                        "--routing", "q8,q4", "--fail-below", "1", *FAST], capsys)
    d = json.loads(out)
    assert d["zone_models"] == ["q8", "q6"] and d["primary"] == "kld_p99"
    assert [s["threshold"] for s in d["sensitivity"]] == [0.07, 0.3]
    assert d["routing"]["models"] == ["q8", "q4"] and d["options"]["seed"] == 3
    assert d["options"]["fail_below"] == 1.0


def test_markdown_and_output_file(tmp_path, capsys):
    out_file = tmp_path / "sub" / "cohort.md"
    code, out, _ = run([str(DATA / "manifest.json"), "--format", "markdown", "-o", str(out_file), *FAST], capsys)
    assert code == 0 and out == ""
    text = out_file.read_text()
    assert text.startswith("# Cohort analysis: tiny test cohort")
    assert "| variant |" in text
    assert [p.name for p in out_file.parent.iterdir()] == ["cohort.md"]  # no temp file left


def test_report_directory(tmp_path, capsys):
    d = tmp_path / "report"
    code, _, err = run([str(DATA / "manifest.toml"), "--report", str(d), *FAST], capsys)
    assert code == 0 and "report written to" in err
    assert {p.name for p in d.iterdir()} == {"report.md", "report.html", "cohort.json", "figures"}
    assert json.loads((d / "cohort.json").read_text())["name"] == "tiny test cohort"


def test_report_refuses_a_directory_that_is_not_a_report(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    code, _, err = run([str(DATA / "manifest.toml"), "--report", str(d), *FAST], capsys)
    assert code == 1 and "is not a cohort report" in err
    assert (d / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("argv", [[], ["--example", str(DATA / "manifest.toml")]])
def test_manifest_or_example_exactly_one(argv, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and "MANIFEST or --example" in err


def test_bad_data_is_exit_1_with_one_line_naming_the_file(tmp_path, capsys):
    d = tmp_path / "cohort"
    shutil.copytree(DATA, d)
    p = d / "livecodebench" / "q6_codegeneration_eval_all.json"
    p.write_text(p.read_text().replace('"pass@1": 0.5', '"pass@1": 5', 1))
    code, out, err = run([str(d / "manifest.toml"), *FAST], capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert str(p) in err and "outside [0, 1]" in err


def test_missing_manifest_is_exit_1(tmp_path, capsys):
    code, _, err = run([str(tmp_path / "nope.toml")], capsys)
    assert code == 1 and "no such manifest" in err


def test_mismatched_prompts_fail_then_intersect_recovers(tmp_path, capsys):
    d = tmp_path / "cohort"
    shutil.copytree(DATA, d)
    p = d / "lm_eval" / "q4" / "samples_gsm8k_2024-05-01T12-00-00.123456.jsonl"
    lines = [json.loads(x) for x in p.read_text().splitlines() if json.loads(x)["doc_id"] != 2]
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, _, err = run([str(d / "manifest.toml"), *FAST], capsys)
    assert code == 1 and "q4 lacks 1 prompt(s) the reference has (2)" in err
    code, out, _ = run([str(d / "manifest.toml"), "--intersect", "--format", "json", *FAST], capsys)
    assert code == 0 and json.loads(out)["options"]["intersect"] is True
