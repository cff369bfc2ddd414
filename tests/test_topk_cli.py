"""`fidelity-kld convert --top-k`, `compare` with top-k dumps on either side, `info`, and bad
top-k input: one line naming the file, exit 1, no output. Data: tests/data's llama.cpp files
(real tiny-llama log-probs); the truth is reference.py on the decoded full rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fidelity_kld import reference
from fidelity_kld.cli import main
from fidelity_kld.io import open_source
from fidelity_kld.io.conversion import cast_block

DATA = Path(__file__).parent / "data"


def run(capsys, *args):
    try:
        main([*map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _full(path):
    with open_source(str(path)) as s:
        return cast_block(s.read(0, s.n_tokens), "float32"), s.labels


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("topk")
    for name in ("base", "Q4_K_M"):
        assert main(["convert", str(DATA / f"{name}.kld"), str(d / f"{name}.topk.parquet"),
                     "--top-k", "8"]) in (None, 0)
        assert main(["convert", str(DATA / f"{name}.kld"), str(d / f"{name}.npy")]) in (None, 0)
    return d


@pytest.mark.parametrize("ref,q", [("base.topk.parquet", "Q4_K_M.topk.parquet"),
                                   ("base.npy", "Q4_K_M.topk.parquet"),
                                   ("base.topk.parquet", "Q4_K_M.npy")])
def test_compare_brackets_the_full_kld_per_token(dumps, tmp_path, capsys, ref, q):
    per_token = tmp_path / "t.parquet"
    code, out, _ = run(capsys, "compare", dumps / ref, dumps / q, "--format", "json",
                       "--per-token", per_token)
    assert code == 0
    doc = json.loads(out)
    assert doc["kind"] == "topk_bounds"
    a, labels = _full(DATA / "base.kld")
    b, _ = _full(DATA / "Q4_K_M.kld")
    want = reference.logit_stats(a, b, labels)
    t = pq.read_table(per_token).to_pydict()
    lower, upper = np.array(t["kld_lower"]), np.array(t["kld_upper"])
    true = want["kld"]
    assert (lower <= true + 1e-5 * (1 + true)).all() and (upper >= true - 1e-5 * (1 + true)).all()
    np.testing.assert_array_equal(t["top1_ref"], want["top1_ref"])
    np.testing.assert_array_equal(t["top1_q"], want["top1_q"])
    np.testing.assert_allclose(t["nll_q"], want["nll_q"], rtol=1e-5)
    s = doc["models"][0]["summary"]
    assert s["kld_lower"]["mean"] == pytest.approx(lower.mean())
    assert s["kld_lower"]["mean"] <= true.mean() <= s["kld_upper"]["mean"]
    assert "KLD" not in json.dumps({k: v for k, v in s.items() if k not in ("kld_lower", "kld_upper")})


def test_text_report_names_bounds_never_a_plain_kld(dumps, capsys):
    code, out, _ = run(capsys, "compare", dumps / "base.topk.parquet", dumps / "Q4_K_M.topk.parquet")
    assert code == 0
    assert "KLD lower bound" in out and "KLD upper bound" in out
    assert "Mean    KLD:" not in out


def test_info_describes_a_top_k_dump(dumps, capsys):
    code, out, _ = run(capsys, "info", dumps / "base.topk.parquet", "--format", "json")
    d = json.loads(out)
    assert code == 0 and d["k"] == 8 and d["vocab"] == 8000 and d["tokens"] == 762 and d["floor"]


def _corrupt(src, dst, what):
    table = pq.read_table(src)
    ids = np.array(table.column("topk_ids").to_pylist())
    lps = np.array(table.column("topk_logprobs").to_pylist(), dtype=np.float32)
    tail = table.column("tail_mass").to_numpy().copy()
    if what == "id":
        ids[5, 2] = 9000
    elif what == "dup":
        ids[5, 2] = ids[5, 1]
    elif what == "positive":
        lps[5, 0] = 0.25
    elif what == "unsorted":
        lps[5, [1, 2]] = lps[5, [2, 1]]
    elif what == "tail":
        tail[5] = 1.5
    k = ids.shape[1]
    cols = {n: table.column(n) for n in table.column_names}
    cols["topk_ids"] = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int64()), k)
    cols["topk_logprobs"] = pa.FixedSizeListArray.from_arrays(pa.array(lps.reshape(-1), pa.float32()), k)
    cols["tail_mass"] = pa.array(tail)
    pq.write_table(pa.table(cols).replace_schema_metadata(table.schema.metadata), dst)


@pytest.mark.parametrize("what", ["id", "dup", "positive", "unsorted", "tail"])
def test_bad_top_k_dump_is_one_line_exit_1_no_output(dumps, tmp_path, capsys, what):
    bad = tmp_path / "bad.topk.parquet"
    _corrupt(dumps / "Q4_K_M.topk.parquet", bad, what)
    out_json = tmp_path / "o.json"
    code, out, err = run(capsys, "compare", dumps / "base.topk.parquet", bad, "-o", out_json)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "row 5" in lines[0]
    assert not out_json.exists() and not list(tmp_path.glob(".o.json*"))


def test_mismatched_rows_are_refused(dumps, tmp_path, capsys):
    t = pq.read_table(dumps / "Q4_K_M.topk.parquet")
    short = tmp_path / "short.topk.parquet"
    pq.write_table(t.slice(0, 100), short)
    code, _, err = run(capsys, "compare", dumps / "base.topk.parquet", short)
    assert code == 1 and str(short) in err and "100 rows" in err


def test_convert_top_k_refuses_k_above_the_vocabulary(tmp_path, capsys):
    dst = tmp_path / "x.topk.parquet"
    code, _, err = run(capsys, "convert", DATA / "base.kld", dst, "--top-k", "9000")
    assert code == 1 and "--top-k must be in [1, 8000]" in err and not dst.exists()


def test_convert_refuses_a_top_k_dump_as_input(dumps, tmp_path, capsys):
    dst = tmp_path / "x.npy"
    code, _, err = run(capsys, "convert", dumps / "base.topk.parquet", dst)
    assert code == 1 and "a top-k dump" in err and str(dumps / "base.topk.parquet") in err
    assert not dst.exists()
