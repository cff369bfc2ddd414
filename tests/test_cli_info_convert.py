"""`fidelity-kld info` and `fidelity-kld convert` end to end: output, exit codes 0/1/2,
and no output left behind on error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from fidelity_kld.cli import cli
from fidelity_kld.io import open_source
from fidelity_kld.io.llama import decode_rows


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_info_text(llama_base_path):
    r = run("info", llama_base_path)
    assert r.exit_code == 0, r.output
    out = r.output
    for needle in ("llama.cpp --kl-divergence-base", "tokens:      762", "vocab:       8000",
                   "llama_u16", "762 x 8004", "12204260 bytes", "labels:      yes",
                   "prompt ids:  yes (6 prompts)", "n_ctx: 256", "n_chunk: 6"):
        assert needle in out, (needle, out)


def test_info_json(llama_q4_path):
    r = run("info", llama_q4_path, "--format", "json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert (d["format"], d["tokens"], d["vocab"], d["dtype"]) == ("llama", 762, 8000, "llama_u16")
    assert d["size_bytes"] == 12_204_260 and d["labels"] and d["prompt_ids"] and d["prompts"] == 6
    assert d["header"]["n_ctx"] == 256 and d["header"]["rows_per_chunk"] == 127


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "arrow", "parquet"])
def test_convert_then_info(tmp_path, llama_base_path, fmt):
    out = tmp_path / f"b.{fmt}"
    r = run("convert", llama_base_path, out, "--dtype", "float16")
    assert r.exit_code == 0, r.output
    assert f"wrote {out} ({fmt}, 762 tokens x 8000 float16" in r.output
    d = json.loads(run("info", out, "--format", "json").output)
    assert (d["format"], d["tokens"], d["vocab"], d["dtype"]) == (fmt, 762, 8000, "float16")
    assert d["labels"] and d["prompt_ids"]
    src, ref = open_source(out), open_source(llama_base_path)
    np.testing.assert_array_equal(src.read(700, 762).data,
                                  decode_rows(ref.read(700, 762).data, 8000).astype(np.float16))


def test_convert_to_overrides_extension(tmp_path, llama_base_path):
    out = tmp_path / "b.dat"
    r = run("convert", llama_base_path, out, "--to", "parquet")
    assert r.exit_code == 0, r.output
    assert open_source(out).format == "parquet"


def test_convert_bf16_npy_writes_sidecar_and_info_reads_it(tmp_path, llama_base_path):
    out = tmp_path / "b.npy"
    assert run("convert", llama_base_path, out, "--dtype", "bfloat16").exit_code == 0
    sidecar = json.loads((tmp_path / "b.npy.json").read_text())
    assert sidecar["dtype"] == "bfloat16" and sidecar["fidelity_kld.values"] == "log_probs"
    d = json.loads(run("info", out, "--format", "json").output)
    assert d["dtype"] == "bfloat16" and len(d["files"]) == 4


def test_info_declared_bfloat16(tmp_path):
    np.save(tmp_path / "u.npy", np.zeros((3, 5), np.uint16))
    r = run("info", tmp_path / "u.npy")
    assert r.exit_code == 1 and "uint16" in r.output
    assert run("info", tmp_path / "u.npy", "--dtype", "bfloat16").exit_code == 0


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty file (0 bytes)"),
        (b"_logits_\x00\x01", "truncated in the header"),
        (b"garbage bytes!", "bad magic"),
    ],
)
def test_bad_input_exit_1_and_no_output(tmp_path, content, match):
    bad = tmp_path / "bad.kld"
    bad.write_bytes(content)
    r = run("info", bad)
    assert r.exit_code == 1 and match in r.output and str(bad) in r.output
    out = tmp_path / "o.parquet"
    r = run("convert", bad, out)
    assert r.exit_code == 1 and match in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.kld"]


def test_truncated_fixture_convert_leaves_nothing(tmp_path, llama_base_path):
    bad = tmp_path / "cut.kld"
    bad.write_bytes(llama_base_path.read_bytes()[:-100])
    r = run("convert", bad, tmp_path / "o.safetensors")
    assert r.exit_code == 1 and "truncated in the log-prob rows" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.kld"]


def test_convert_unknown_extension_is_input_error(tmp_path, llama_base_path):
    r = run("convert", llama_base_path, tmp_path / "o.txt")
    assert r.exit_code == 1 and "cannot tell the output format" in r.output
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2(tmp_path, llama_base_path):
    assert run("info").exit_code == 2
    assert run("info", llama_base_path, "--format", "yaml").exit_code == 2
    assert run("convert", llama_base_path, tmp_path / "o.npy", "--to", "csv").exit_code == 2
    assert run("convert", llama_base_path, tmp_path / "o.npy", "--dtype", "int8").exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_real_entry_point_one_line_error(tmp_path):
    missing = tmp_path / "missing.kld"
    p = subprocess.run([sys.executable, "-m", "fidelity_kld", "info", str(missing)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"Error: {missing}: no such file"]
    assert "Traceback" not in p.stderr and p.stdout == ""
