"""Cohort loading and analysis on tiny cohorts whose numbers can be checked on paper, and
against scipy on the same arrays."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fidelity_kld.stats.cohort import AnalysisOptions, analyze, analyze_cohort
from fidelity_kld.stats.cohort_data import Cohort
from fidelity_kld.stats.decompose import flip_arrays
from fidelity_kld.stats.manifest import ManifestError, load_manifest, manifest_from_dict
from fidelity_kld.stats.zone import relative_change, zone_mask

DATA = Path(__file__).parent / "data" / "cohort"
FAST = dict(n_bootstrap=200, holdout_reps=20)

# the tiny cohort of tests/data/cohort (see regenerate.py there), by hand:
#   gsm8k (strict-match)  bf16 4/6  q8 4/6  q6 4/6  q4 3/6  q3 2/6  q2 1/6
#   livecodebench         bf16 5/8  q8 5/8  q6 6/8  q4 4/8  q3 3/8  q2 1/8
#   humaneval+            bf16 3/4  q8 3/4  q6 3/4  q4 2/4  q3 1/4  q2 1/4
COMPOSITE = {m: (g / 6 + l / 8 + h / 4) / 3 for m, g, l, h in
             [("bf16", 4, 5, 3), ("q8", 4, 5, 3), ("q6", 4, 6, 3), ("q4", 3, 4, 2), ("q3", 2, 3, 1), ("q2", 1, 1, 1)]}


@pytest.fixture(scope="module")
def tiny():
    return load_manifest(DATA / "manifest.toml").cohort


def test_tiny_cohort_loads_every_harness(tiny):
    assert tiny.reference == "bf16" and tiny.models == ("q8", "q6", "q4", "q3", "q2")
    assert tiny.tasks == ("gsm8k", "livecodebench", "humaneval+")
    assert tiny.prompt_ids["gsm8k"] == tuple("012345")
    comp = tiny.composite()
    assert comp == pytest.approx([COMPOSITE[m] for m in ("bf16", "q8", "q6", "q4", "q3", "q2")])
    assert tiny.variants["kld_mean"] == pytest.approx([0.001, 0.004, 0.02, 0.08, 0.3])  # q4 via fidelity_name
    assert math.isinf(tiny.variants["kld_reverse_mean"][-1])  # "inf" in the JSON
    assert np.isnan(tiny.variants["ppl_ratio"][-1])  # null in the JSON (no labels)
    q4 = dict(zip(tiny.prompt_ids["livecodebench"], tiny.per_prompt_kld["livecodebench"][2]))
    assert q4 == pytest.approx({"abc301_a": 0.08, "abc301_b": 0.02, "1873_A": 0.02, "2891": 0.02})
    assert tiny.size_gb[0] == 8.5


@pytest.mark.parametrize("name", ["manifest.json", "manifest.csv"])
def test_json_and_csv_manifests_give_the_same_cohort(tiny, name):
    other = load_manifest(DATA / name).cohort
    assert other.models == tiny.models and other.tasks == tiny.tasks
    for t in tiny.tasks:
        assert np.array_equal(other.scores[t], tiny.scores[t])
    for v in tiny.variants:
        np.testing.assert_array_equal(other.variants[v], tiny.variants[v])


def test_tiny_cohort_by_hand(tiny):
    r = analyze_cohort(tiny, AnalysisOptions(zone_threshold=0.07, **FAST))
    rel = {m.name: m.relative_change for m in r.models}
    assert rel["q8"] == pytest.approx(0.0)
    assert rel["q6"] == pytest.approx(COMPOSITE["q6"] / COMPOSITE["bf16"] - 1)  # +6.1%: inside 7%
    assert r.zone_models == ("q8", "q6")
    v = r.variant("kld_mean")
    # ranks: kld 1..5, composite 4 5 3 2 1 -> sum d^2 = 38, rho = 1 - 6*38/(5*24) = -0.9
    assert v.full.rho == pytest.approx(-0.9)
    # exact p for 5 models: 5 of the 120 orderings reach rho <= -0.9 (sum d^2 = 40 once, 38
    # four times), twice that tail: 1/12
    assert v.full.p == pytest.approx(1 / 12)
    assert v.zone.status == "insufficient" and v.zone.n == 2
    assert v.null.status == "insufficient"
    # ppl_ratio lacks q2: four models left
    assert r.variant("ppl_ratio").full.n == 4
    by = {(f.model, f.task): f for f in r.flips}
    q6 = by[("q6", "gsm8k")]
    assert (q6.correct_to_wrong, q6.wrong_to_correct, q6.volume, q6.direction) == (1, 1, 2 / 6, 0)
    q6 = by[("q6", "livecodebench")]  # problem 1873_A: 0 -> 0.5
    assert (q6.correct_to_wrong, q6.wrong_to_correct) == (0, 0.5)
    q8 = by[("q8", "humaneval+")]
    assert (q8.correct_to_wrong, q8.wrong_to_correct, q8.volume, q8.direction) == (1, 1, 0.5, 0)
    comp = by[("q6", "composite")]
    assert comp.volume == pytest.approx((2 / 6 + 0.5 / 4 + 0) / 3)
    assert comp.direction == pytest.approx(COMPOSITE["q6"] - COMPOSITE["bf16"])


def _cohort(kld, scores, extra=None, tasks=("t",), **kw):
    """A one-task cohort: scores[0] is the reference's per-prompt row."""
    scores = np.asarray(scores, float)
    return Cohort("ref", tuple(f"m{i}" for i in range(len(kld))), tasks,
                  {tasks[0]: tuple(str(i) for i in range(scores.shape[1]))}, {tasks[0]: scores},
                  {"kld_mean": np.asarray(kld, float), **(extra or {})}, **kw)


def _rows(ref, n_correct):
    """Rows scoring n_correct of len(ref) prompts (by dropping the reference's last successes)."""
    out = [np.asarray(ref, float)]
    for k in n_correct:
        row = np.zeros(len(ref))
        row[:k] = 1
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize("zone_size", [0, 1, 2, 3])
def test_zones_of_zero_to_three_models_are_insufficient(zone_size):
    ref = np.ones(100)
    # zone_size models score 100 (inside 2%), the rest 90 or less
    n_correct = [100] * zone_size + [90, 85, 80, 75, 70]
    c = _cohort(np.linspace(0.01, 0.5, len(n_correct)), _rows(ref, n_correct))
    r = analyze_cohort(c, AnalysisOptions(**FAST))
    v = r.variant("kld_mean")
    assert len(r.zone_models) == zone_size
    assert v.zone.status == "insufficient" and v.zone.n == zone_size and np.isnan(v.zone.rho)
    assert v.null.status == "insufficient"
    assert v.full.ok


def test_zone_of_four_gets_a_number_and_ties_match_scipy():
    ref = np.ones(200)
    n_correct = [200, 199, 199, 197, 180, 170, 150]  # two zone models tie
    kld = [0.001, 0.002, 0.003, 0.004, 0.1, 0.2, 0.4]
    c = _cohort(kld, _rows(ref, n_correct))
    v = analyze_cohort(c, AnalysisOptions(**FAST)).variant("kld_mean")
    assert v.zone.n == 4
    comp = np.array(n_correct[:4]) / 200
    assert v.zone.rho == pytest.approx(stats.spearmanr(kld[:4], comp).statistic)
    assert v.zone.tau == pytest.approx(stats.kendalltau(kld[:4], comp).statistic)


def test_constant_fidelity_in_the_zone_says_rho_is_undefined():
    ref = np.ones(100)
    n_correct = [100, 99, 100, 99, 80, 70]
    c = _cohort([0.01, 0.01, 0.01, 0.01, 0.2, 0.3], _rows(ref, n_correct))
    v = analyze_cohort(c, AnalysisOptions(**FAST)).variant("kld_mean")
    assert v.zone.status == "constant" and "kld_mean is constant" in v.zone.note
    assert v.full.ok


def test_nan_fidelity_entries_shrink_that_variant_only():
    ref = np.ones(100)
    n_correct = [100, 99, 100, 99, 99, 80, 70]
    extra = {"kld_other": np.array([0.01, np.nan, 0.03, np.nan, 0.05, 0.2, 0.3])}
    c = _cohort([0.01, 0.02, 0.03, 0.04, 0.05, 0.2, 0.3], _rows(ref, n_correct), extra)
    r = analyze_cohort(c, AnalysisOptions(**FAST))
    assert r.variant("kld_mean").zone.n == 5
    assert r.variant("kld_other").zone.n == 3 and r.variant("kld_other").zone.status == "insufficient"
    assert r.variant("kld_other").full.n == 5


def test_relative_change_and_zone_edge():
    comp = np.array([0.7, 0.686, 0.714, 0.6859, 0.7])
    rel = relative_change(comp)
    assert rel == pytest.approx([-0.02, 0.02, -0.020143, 0.0], abs=1e-6)
    assert zone_mask(rel, 0.02).tolist() == [True, True, False, True]  # 2% exactly is inside


def test_weights_change_the_composite():
    s = {"a": np.array([[1, 1], [1, 0]], float), "b": np.array([[1, 0], [1, 0]], float)}
    ids = {"a": ("0", "1"), "b": ("0", "1")}
    c = Cohort("ref", ("q",), ("a", "b"), ids, s, {"kld_mean": np.array([0.1])}, weights={"a": 3, "b": 1})
    assert c.composite() == pytest.approx([(3 * 1 + 0.5) / 4, (3 * 0.5 + 0.5) / 4])
    flips = flip_arrays(c)["composite"]
    assert flips["volume"][0] == pytest.approx(3 / 4 * 0.5)


def _copy_tiny(tmp_path):
    d = tmp_path / "cohort"
    shutil.copytree(DATA, d)
    return d


def test_mismatched_prompt_sets_are_an_error_listing_them_unless_intersect(tmp_path):
    d = _copy_tiny(tmp_path)
    p = d / "lm_eval" / "q3" / "samples_gsm8k_2024-05-01T12-00-00.123456.jsonl"
    lines = [json.loads(x) for x in p.read_text().splitlines()]
    lines = [x for x in lines if x["doc_id"] != 4]
    lines.append({**lines[0], "doc_id": 99})
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ManifestError) as e:
        load_manifest(d / "manifest.toml")
    msg = str(e.value)
    assert "task 'gsm8k': q3 lacks 1 prompt(s) the reference has (4)" in msg
    assert "has 1 the reference lacks (99)" in msg and "--intersect" in msg
    c = load_manifest(d / "manifest.toml", intersect=True).cohort
    assert c.prompt_ids["gsm8k"] == ("0", "1", "2", "3", "5")
    assert any("2 of 7 prompts dropped" in n for n in c.notes)


def test_a_task_missing_for_one_model(tmp_path):
    d = _copy_tiny(tmp_path)
    (d / "evalplus" / "q8" / "humaneval_eval_results.json").unlink()
    text = (d / "manifest.toml").read_text().replace(', "evalplus/q8/humaneval_eval_results.json"', "")
    (d / "manifest.toml").write_text(text)
    with pytest.raises(ManifestError, match="task 'humaneval\\+' has no outcomes for q8"):
        load_manifest(d / "manifest.toml")
    c = load_manifest(d / "manifest.toml", intersect=True).cohort
    assert c.tasks == ("gsm8k", "livecodebench")


@pytest.mark.parametrize("patch, match", [
    ({"models": []}, "at least one quantized model"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"weights": {"mmlu": 1}}, "weights: no task 'mmlu'"),
    ({"filters": {}}, "2 filters"),
])
def test_manifest_errors_are_one_clear_line(patch, match):
    data = json.loads((DATA / "manifest.json").read_text())
    data.update(patch)
    with pytest.raises(ManifestError, match=match):
        manifest_from_dict(data, base_dir=DATA, source="m.json")


def test_fidelity_name_must_exist_in_the_summary():
    data = json.loads((DATA / "manifest.json").read_text())
    data["models"][2]["fidelity_name"] = "q4_K_M"
    with pytest.raises(ManifestError, match="no model named 'q4_K_M' \\(models here: q8, q6, q4.gguf"):
        manifest_from_dict(data, base_dir=DATA, source="m.json")


def test_per_prompt_file_matching_two_tasks_is_ambiguous(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = _copy_tiny(tmp_path)
    pq.write_table(pa.table({"prompt_id": ["0", "abc301_a"], "kld_mean": [0.1, 0.2]}), d / "per_prompt" / "q8.parquet")
    with pytest.raises(ManifestError, match="match tasks 'gsm8k' and 'livecodebench'"):
        load_manifest(d / "manifest.toml")


def test_analyze_is_reproducible_and_the_seed_matters():
    a = analyze(DATA / "manifest.toml", **FAST).to_json()
    assert a == analyze(DATA / "manifest.toml", **FAST).to_json()
    b = analyze(DATA / "manifest.toml", seed=1, **FAST)
    assert b.to_json() != a
    assert b.variant("kld_mean").full.rho == pytest.approx(-0.9)  # only the random parts move


def test_json_is_strict_json_with_null_and_inf_strings():
    r = analyze(DATA / "manifest.toml", **FAST)
    text = r.to_json()
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    models = {m["name"]: m for m in d["models"]}
    assert models["q2"]["fidelity"]["kld_reverse_mean"] == "inf"
    assert models["q2"]["fidelity"]["ppl_ratio"] is None
    assert d["zone_threshold"] == 0.02 and d["options"]["n_bootstrap"] == 200
    assert {v["name"] for v in d["variants"]} >= {"kld_mean", "kld_p99.9", "prompt_kld_mean", "top1_disagree"}


def test_options_from_manifest_and_overrides(tmp_path):
    d = _copy_tiny(tmp_path)
    text = (d / "manifest.toml").read_text().replace('fidelity = "summary.json"',
                                                     'fidelity = "summary.json"\nzone_threshold = 0.07')
    (d / "manifest.toml").write_text(text)
    assert analyze(d / "manifest.toml", **FAST).zone_models == ("q8", "q6")
    assert analyze(d / "manifest.toml", zone_threshold=0.01, **FAST).zone_models == ("q8",)
    with pytest.raises(ValueError, match="no fidelity variant 'nope'"):
        analyze(d / "manifest.toml", primary="nope", **FAST)
    with pytest.raises(TypeError):
        analyze(d / "manifest.toml", bootstraps=5)


def test_per_prompt_on_a_fidelity_corpus_gives_prompt_kld_mean_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = _copy_tiny(tmp_path)
    for m in ("q8", "q6", "q4", "q3", "q2"):  # wikitext chunk ids: no benchmark prompt among them
        pq.write_table(pa.table({"prompt_id": pa.array([1000, 1001], pa.int64()),
                                 "kld_mean": [0.01, 0.03] if m == "q8" else [0.02, None]}),
                       d / "per_prompt" / f"{m}.parquet")
    c = load_manifest(d / "manifest.toml").cohort
    assert c.per_prompt_kld == {}
    assert c.variants["prompt_kld_mean"][:2] == pytest.approx([0.02, 0.02])  # NaN rows skipped
    assert any("match no benchmark prompt" in n for n in c.notes)
    r = analyze_cohort(c, AnalysisOptions(**FAST))
    assert r.failure == () and r.routing is None


def test_holdout_halves_are_disjoint_and_cover_every_prompt():
    from fidelity_kld.stats.zone import split_half_composites

    rng = np.random.default_rng(0)
    scores = (rng.random((4, 9)) < 0.5).astype(float)
    c = Cohort("ref", ("x", "y", "z"), ("a",), {"a": tuple(map(str, range(9)))}, {"a": scores},
               {"kld_mean": np.array([0.1, 0.2, 0.3])})
    comp_a, comp_b = split_half_composites(c, 50, np.random.default_rng(2))
    # half A holds 4 prompts, half B the other 5: together, every prompt once
    np.testing.assert_allclose(comp_a * 4 + comp_b * 5, np.broadcast_to(scores.sum(axis=1), comp_a.shape))
    assert not np.allclose(comp_a, comp_b)
    assert len({tuple(r) for r in comp_a}) > 5  # a fresh split each repetition


def test_routing_defaults_to_the_zone_models(tiny):
    r = analyze_cohort(tiny, AnalysisOptions(zone_threshold=0.07, **FAST))
    assert r.routing.models == ("q8", "q6")
    r = analyze_cohort(tiny, AnalysisOptions(**FAST))  # a zone of one: route among all
    assert r.routing.models == tiny.models
    assert any("fewer than 2 in the zone" in n for n in r.notes)
    r = analyze_cohort(tiny, AnalysisOptions(routing=("q2", "q3"), **FAST))
    assert r.routing.models == ("q2", "q3")
