"""`compare --direction`: the direction metrics in the text, JSON, per-token and per-prompt
outputs, against the per-token loop of _direction_checks (and the float64 oracle)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from _direction_checks import expected
from fidelity_kld import reference
from fidelity_kld.cli import cli

SCALAR_KEYS = ("dnll_mean", "dnll_harm", "dnll_help", "margin_harm", "tvd_mean", "jsd_mean",
               "kld_confident")
RATE_KEYS = ("flip_harm", "flip_help", "flip_net", "top5_lost", "top5_gained", "top5_net")
OPTIONAL_COLUMNS = ("logp_top1_ref", "logp_top1_q", "logp_top2_ref", "logp_top2_q", "tvd", "jsd",
                    "rank_ref_y", "rank_q_y", "margin_ref", "margin_q")


def columns(path, model=None) -> dict[str, np.ndarray]:
    """A Parquet table as numpy columns, the rows of one model when given."""
    table = pq.read_table(path)
    cols = {name: table.column(name).to_numpy() for name in table.column_names if name != "model"}
    if model is None:
        return cols
    keep = np.array(table.column("model").to_pylist()) == model
    return {name: col[keep] for name, col in cols.items()}


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture
def dumps(tmp_path):
    """Reference, two quants, labels and prompt ids as .npy files (float32 logits)."""
    rng = np.random.default_rng(160)
    n, v = 120, 40
    a = (rng.standard_normal((n, v)) * rng.uniform(0.3, 4.0, (n, 1))).astype(np.float32)
    qs = [(a + s * rng.standard_normal((n, v))).astype(np.float32) for s in (0.3, 0.8)]
    y = np.where(rng.random(n) < 0.5, a.argmax(axis=1), rng.integers(0, v, n))
    ids = np.repeat(np.arange(6), 20)
    paths = {"ref": tmp_path / "ref.npy", "q1": tmp_path / "q1.npy", "q2": tmp_path / "q2.npy",
             "labels": tmp_path / "y.npy", "ids": tmp_path / "ids.npy"}
    for key, arr in zip(paths, (a, *qs, y, ids)):
        np.save(paths[key], arr)
    return paths, a, qs, y, ids


def test_json_per_token_and_per_prompt_match_the_definitions(dumps, tmp_path):
    paths, a, qs, y, ids = dumps
    tok, pp = tmp_path / "t.parquet", tmp_path / "p.parquet"
    doc = json.loads(run("compare", paths["ref"], paths["q1"], paths["q2"], "--labels",
                         paths["labels"], "--prompt-ids", paths["ids"], "--direction", "-q",
                         "--format", "json", "--per-token", tok, "--per-prompt", pp).output)
    for model, q in zip(doc["models"], qs):
        got, want = model["summary"]["direction"], expected(a, q, y)
        for k in SCALAR_KEYS:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-7), k
        for k in RATE_KEYS:  # counts of exact comparisons on the same float32 logits
            assert got[k] == pytest.approx(want[k], abs=1e-12), k
        assert [b["n"] for b in got["kld_by_conf"]] == [n for n, _, _ in want["buckets"]]
        assert got["kld_ref_right"]["n"] == len(want["right"])
        # the optional per-token columns are the oracle's
        rows = columns(tok, model["name"])
        oracle = reference.logit_stats(a, q, y)
        for name in OPTIONAL_COLUMNS:
            col = rows[name]
            if name.startswith("rank"):
                np.testing.assert_array_equal(col, oracle[name], err_msg=name)
            else:
                np.testing.assert_allclose(col, oracle[name], rtol=1e-5, atol=1e-6, err_msg=name)
        # per-prompt means of the scalars
        table = columns(pp, model["name"])
        assert len(table["prompt_id"]) == 6
        for i, pid in enumerate(table["prompt_id"]):
            sel = ids == pid
            one = expected(a[sel], q[sel], y[sel])
            for k in ("dnll_harm", "flip_net", "top5_lost", "tvd_mean", "margin_harm"):
                assert table[k][i] == pytest.approx(one[k], rel=1e-4, abs=1e-7), (k, pid)


def test_text_has_a_direction_block_per_model_and_compact_columns(dumps):
    paths, a, qs, y, _ = dumps
    args = ("compare", paths["ref"], paths["q1"], paths["q2"], "--labels", paths["labels"],
            "--direction", "-q")
    text = run(*args).output
    doc = json.loads(run(*args, "--format", "json").output)
    assert text.count("====== Direction statistics") == 2
    blocks = text.split("====== Direction statistics")[1:]
    for block, model in zip(blocks, doc["models"]):
        d = model["summary"]["direction"]
        flips = next(line for line in block.splitlines() if line.startswith("Flips base right"))
        assert f"{100 * d['flip_harm']:.3f} ±" in flips
        tvd = next(line for line in block.splitlines() if line.startswith("Mean TVD"))
        assert f"{d['tvd_mean']:.6f} ±" in tvd
        assert "base top-1 ≠ label" in block and "p_base(top1) in [0.9, 1]" in block
    table = text.split("Compact table")[1]
    assert "net flips %" in table and "mean TVD" in table
    q1_row = next(line for line in table.splitlines() if line.startswith("q1 "))
    assert f"{doc['models'][0]['summary']['direction']['tvd_mean']:.6f}" in q1_row


def test_without_direction_the_outputs_are_unchanged(dumps, tmp_path):
    paths, *_ = dumps
    tok, pp = tmp_path / "t.parquet", tmp_path / "p.parquet"
    args = ("compare", paths["ref"], paths["q1"], paths["q2"], "--labels", paths["labels"],
            "--prompt-ids", paths["ids"], "-q")
    text = run(*args).output
    assert "Direction" not in text and "net flips" not in text
    doc = json.loads(run(*args, "--format", "json", "--per-token", tok, "--per-prompt", pp).output)
    assert all(m["summary"]["direction"] is None for m in doc["models"])
    assert not set(OPTIONAL_COLUMNS) & set(pq.read_table(tok).column_names)
    assert "tvd_mean" not in pq.read_table(pp).column_names


def test_without_labels_the_label_metrics_are_absent(dumps):
    paths, a, qs, _, _ = dumps
    r = run("compare", paths["ref"], paths["q1"], "--direction", "-q")
    assert "Label-aware metrics (Δnll, flips, top 5, margins): n/a, no labels" in r.output
    assert "Flips base right" not in r.output and "Mean TVD" in r.output
    assert "base top-1 = label" not in r.output
    doc = json.loads(run("compare", paths["ref"], paths["q1"], "--direction", "-q",
                         "--format", "json").output)
    d = doc["models"][0]["summary"]["direction"]
    assert d["flip_harm"] is None and d["kld_ref_right"] is None
    assert d["jsd_mean"] == pytest.approx(expected(a, qs[0])["jsd_mean"], rel=1e-4)


def test_llama_fixture_direction_agrees_with_its_per_token_table(llama_base_path, llama_q4_path,
                                                                 tmp_path):
    """llama.cpp definitions: the split uses kld_llama, the summary's KLD; checked against the
    per-token table's columns."""
    tok = tmp_path / "t.parquet"
    doc = json.loads(run("compare", llama_base_path, llama_q4_path, "--direction", "-q",
                         "--format", "json", "--per-token", tok).output)
    s = doc["models"][0]["summary"]
    d = s["direction"]
    t = columns(tok)
    kld = t["kld_llama"]
    assert d["llama_compat"] and d["dnll_mean"] == s["ln_ppl_ratio"]
    assert d["n_valid"] == s["n_valid"] == len(kld)
    confident = np.exp(t["logp_top1_ref"]) >= 0.5
    assert d["kld_confident"] == pytest.approx(kld[confident].mean(), rel=1e-12)
    right = t["top1_ref"] == t["label"]
    assert d["kld_ref_right"]["n"] == right.sum()
    assert d["kld_ref_wrong"]["kld_share"] == pytest.approx(kld[~right].sum() / kld.sum())
    assert sum(b["token_share"] * b["kld_mean"] for b in d["kld_by_conf"]) == pytest.approx(
        s["kld"]["mean"], rel=1e-9)
    flips = (t["top1_ref"] == t["label"]) & (t["top1_q"] != t["label"])
    assert d["flip_harm"] == pytest.approx(flips.mean())
    lost = (t["rank_ref_y"] < 5) & (t["rank_q_y"] >= 5)
    assert d["top5_lost"] == pytest.approx(lost.mean())


def test_direction_refuses_top_k_dumps(dumps, tmp_path):
    paths, *_ = dumps
    for key in ("ref", "q1"):
        run("convert", paths[key], tmp_path / f"{key}.topk.parquet", "--top-k", "8", "--quiet")
    r = CliRunner().invoke(cli, ["compare", str(tmp_path / "ref.topk.parquet"),
                                 str(tmp_path / "q1.topk.parquet"), "--direction", "-q"])
    assert r.exit_code == 2 and "--direction needs full logit dumps" in r.output


def test_sort_by_net_flips_and_tvd(dumps):
    paths, *_ = dumps
    args = ("compare", paths["ref"], paths["q2"], paths["q1"], "--labels", paths["labels"],
            "--direction", "--brief", "-q")
    for key in ("tvd", "flip_net"):
        table = run(*args, "--sort", key).output.split("Compact table")[1].splitlines()[3:5]
        # q1 has a quarter of q2's noise: less TVD and fewer net flips, so it comes first
        assert [row.split()[0] for row in table] == ["q1", "q2"], key
    r = CliRunner().invoke(cli, [str(a) for a in args if a != "--direction"] + ["--sort", "tvd"])
    assert r.exit_code == 2 and "--sort tvd needs --direction" in r.output
