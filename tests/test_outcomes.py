"""Outcome readers, on files in each harness's real layout (tests/data/cohort/) and on small
variants written here."""

import gzip
import json
from pathlib import Path

import pytest

from fidelity_kld.stats.outcomes import (OutcomeError, detect_format, prompt_key, read_evalplus,
                                         read_lm_eval, read_livecodebench, read_outcomes, read_table,
                                         read_table_models)

DATA = Path(__file__).parent / "data" / "cohort"
GSM_Q6 = DATA / "lm_eval" / "q6" / "samples_gsm8k_2024-05-01T12-00-00.123456.jsonl"


def test_lm_eval_multi_filter_needs_an_explicit_choice():
    with pytest.raises(OutcomeError, match="2 filters .*flexible-extract, strict-match.*choose one"):
        read_lm_eval(GSM_Q6)


def test_lm_eval_filter_choice_decides_the_scores():
    strict = read_lm_eval(GSM_Q6, filter="strict-match").tasks["gsm8k"]
    flexible = read_lm_eval(GSM_Q6, filter={"gsm8k": "flexible-extract"}).tasks["gsm8k"]
    assert strict == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0, "4": 1.0, "5": 0.0}
    assert flexible == {**strict, "5": 1.0}


def test_lm_eval_unknown_filter_lists_what_is_there():
    with pytest.raises(OutcomeError, match="no filter 'none'.*flexible-extract, strict-match"):
        read_lm_eval(GSM_Q6, filter="none")


def test_lm_eval_directory_reads_every_task_file():
    out = read_outcomes(DATA / "lm_eval" / "q2", filter="strict-match")
    assert list(out.tasks) == ["gsm8k"]
    assert sum(out.tasks["gsm8k"].values()) == 1


def _write_jsonl(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_lm_eval_older_files_without_filter_or_metrics_keys(tmp_path):
    # lm-eval before 0.4.2 wrote neither "filter" nor "metrics"; multiple-choice tasks log acc and acc_norm
    p = _write_jsonl(tmp_path / "samples_arc_easy_2023-11-02T09-10-11.000001.jsonl", [
        {"doc_id": 0, "target": 2, "resps": [[["-1.2", "False"]]], "acc": 1.0, "acc_norm": 0.0},
        {"doc_id": 1, "target": 0, "resps": [[["-0.7", "False"]]], "acc": 0.0, "acc_norm": 1.0},
    ])
    out = read_lm_eval(p)
    assert out.tasks == {"arc_easy": {"0": 1.0, "1": 0.0}}
    assert any("acc_norm" in n for n in out.notes)  # says what else it could have used
    assert read_lm_eval(p, metric="acc_norm").tasks["arc_easy"] == {"0": 0.0, "1": 1.0}


def test_lm_eval_list_valued_metric_scores_its_mean_and_metrics_key_is_honoured(tmp_path):
    p = _write_jsonl(tmp_path / "samples_ifeval_2024-06-01T00-00-00.5.jsonl", [
        {"doc_id": 3, "filter": "none", "metrics": ["prompt_level_strict_acc", "inst_level_strict_acc"],
         "prompt_level_strict_acc": False, "inst_level_strict_acc": [True, False, True, True]},
    ])
    assert read_lm_eval(p).tasks["ifeval"] == {"3": 0.0}
    assert read_lm_eval(p, metric="inst_level_strict_acc").tasks["ifeval"] == {"3": 0.75}


def test_lm_eval_gzipped_and_task_names_with_underscores(tmp_path):
    p = tmp_path / "samples_gsm8k_cot_zeroshot_2026-01-01T00-00-00.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(json.dumps({"doc_id": 0, "filter": "answer-line", "exact_match": 1.0}) + "\n")
    assert read_outcomes(p).tasks == {"gsm8k_cot_zeroshot": {"0": 1.0}}


def test_lm_eval_directory_with_two_runs_of_a_task_is_an_error(tmp_path):
    line = [{"doc_id": 0, "acc": 1.0}]
    _write_jsonl(tmp_path / "samples_piqa_2024-01-01T00-00-00.1.jsonl", line)
    _write_jsonl(tmp_path / "samples_piqa_2024-02-01T00-00-00.1.jsonl", line)
    with pytest.raises(OutcomeError, match="2 samples files for task 'piqa'"):
        read_lm_eval(tmp_path)


def test_lm_eval_duplicate_doc_and_bad_score_are_errors(tmp_path):
    p = _write_jsonl(tmp_path / "samples_x_2024-01-01T00-00-00.1.jsonl",
                     [{"doc_id": 0, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}])
    with pytest.raises(OutcomeError, match="doc_id 0 appears twice"):
        read_lm_eval(p)
    p = _write_jsonl(tmp_path / "samples_y_2024-01-01T00-00-00.1.jsonl", [{"doc_id": 0, "acc": 1.5}])
    with pytest.raises(OutcomeError, match=r"line 1.*outside \[0, 1\]"):
        read_lm_eval(p)


def test_livecodebench_pass_at_1_and_graded_list_fallback():
    q6 = read_livecodebench(DATA / "livecodebench" / "q6_codegeneration_eval_all.json")
    assert q6.tasks == {"livecodebench": {"abc301_a": 1.0, "abc301_b": 0.5, "1873_A": 0.5, "2891": 1.0}}
    # q3's file has no pass@1 keys: the fraction of graded samples that passed
    q3 = read_outcomes(DATA / "livecodebench" / "q3_codegeneration_eval_all.json")
    assert q3.tasks["livecodebench"] == {"abc301_a": 0.5, "abc301_b": 0.0, "1873_A": 0.0, "2891": 1.0}


def test_evalplus_plus_and_base_variants():
    plus = read_evalplus(DATA / "evalplus" / "bf16" / "humaneval_eval_results.json")
    assert plus.tasks == {"humaneval+": {"HumanEval/0": 1.0, "HumanEval/1": 1.0, "HumanEval/2": 1.0,
                                         "HumanEval/3": 0.0}}
    base = read_outcomes(DATA / "evalplus" / "bf16" / "humaneval_eval_results.json", evalplus="base")
    assert base.tasks["humaneval"]["HumanEval/3"] == 1.0  # base tests pass, the extra ones do not


def test_evalplus_several_samples_and_the_old_layout(tmp_path):
    p = tmp_path / "eval_results.json"
    p.write_text(json.dumps({"eval": {
        "Mbpp/2": [{"base_status": "pass", "plus_status": "pass"}, {"base_status": "pass", "plus_status": "fail"},
                   {"base_status": "fail", "plus_status": "pass"}, {"base_status": "pass", "plus_status": "pass"}],
        "Mbpp/3": {"base": ["pass", []], "plus": ["pass", []]},  # evalplus < 0.2
    }}))
    assert read_outcomes(p).tasks == {"mbpp+": {"Mbpp/2": 0.5, "Mbpp/3": 1.0}}


def test_table_csv_selects_model_and_rejects_ambiguity(tmp_path):
    p = tmp_path / "outcomes.csv"
    p.write_text("model,task,prompt_id,score\nbf16,gsm8k,1,1\nbf16,gsm8k,2,0\nq4,gsm8k,1,0\nq4,gsm8k,2,0.5\n")
    assert read_table(p, model="q4").tasks == {"gsm8k": {"1": 0.0, "2": 0.5}}
    assert set(read_table_models(p)) == {"bf16", "q4"}
    with pytest.raises(OutcomeError, match="2 models; say which"):
        read_table(p)
    with pytest.raises(OutcomeError, match="no rows for model 'q2'.*bf16, q4"):
        read_table(p, model="q2")


def test_table_jsonl_without_model_or_task_column(tmp_path):
    p = tmp_path / "scores.jsonl"
    p.write_text('{"prompt_id": 7, "score": true}\n{"prompt_id": "8", "score": 0}\n')
    with pytest.raises(OutcomeError, match="no 'task' column"):
        read_table(p)
    assert read_table(p, task="mmlu").tasks == {"mmlu": {"7": 1.0, "8": 0.0}}


@pytest.mark.parametrize("body, match", [
    ("task,prompt_id\nt,1\n", "no 'score' column"),
    ("task,prompt_id,score\nt,1,1\nt,1,0\n", "prompt 1 of task 't' appears twice"),
    ("task,prompt_id,score\nt,1,high\n", "not a number"),
    ("task,prompt_id,score\nt,1,-0.1\n", r"outside \[0, 1\]"),
    ("task,prompt_id,score\nt,1,nan\n", r"outside \[0, 1\]"),
])
def test_table_errors_name_file_and_line(tmp_path, body, match):
    p = tmp_path / "o.csv"
    p.write_text(body)
    with pytest.raises(OutcomeError, match=match) as e:
        read_table(p)
    assert str(e.value).startswith(str(p))


def test_prompt_keys_unify_ints_floats_and_strings():
    assert prompt_key(7) == prompt_key(7.0) == prompt_key(" 7 ") == "7"
    with pytest.raises(OutcomeError):
        prompt_key(True)


def test_format_detection():
    assert detect_format(GSM_Q6) == "lm-eval"
    assert detect_format(DATA / "livecodebench" / "q6_codegeneration_eval_all.json") == "livecodebench"
    assert detect_format(DATA / "evalplus" / "q6" / "humaneval_eval_results.json") == "evalplus"
    assert detect_format(Path("x.csv.gz")) == "table"
    with pytest.raises(OutcomeError, match="cannot tell"):
        detect_format(Path("results.txt"))


@pytest.mark.parametrize("name, body, match", [
    ("eval_results.json", b"\xdd\x00{}", "not UTF-8 text"),
    ("run_eval_all.json", b"[" * 100000 + b"]" * 100000, "JSON nested too deeply"),
    ("samples_arc_2026-01-01T00-00-00.jsonl.gz", b"\x1f\x8b\x08\x00broken", "damaged gzip data"),
    ("samples_arc_2026-01-01T00-00-00.jsonl", b'{"doc_id": 0, "acc": 1}\n\xff\n', "not UTF-8 text"),
    ("t.csv", b"task,prompt_id,score\narc," + b"7" * 200000 + b",1\n", "not a readable table \\(field larger"),
    ("t.csv.gz", gzip.compress(b"task,prompt_id,score\n")[:-6], "damaged gzip data"),
])
def test_unreadable_bytes_are_an_error_naming_the_file(tmp_path, name, body, match):
    """What decoding a file's text raises (found by benchmarks/fuzz_atheris.py --reader
    outcomes: UnicodeDecodeError, RecursionError, gzip and csv errors were tracebacks)."""
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(OutcomeError, match=f"^{path}: {match}"):
        read_outcomes(path)
