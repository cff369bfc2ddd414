"""A converted llama.cpp file keeps what its values are (issue 18, point 1): `convert` writes
float32 log-probs with metadata saying so and each row's scale and minimum, and `compare`
reads it back as the llama.cpp rows, so both paths give the same statistics."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fidelity_kld.cli import cli
from fidelity_kld.io import DumpError, convert, open_source
from fidelity_kld.io.conversion import llama_rows, values_of
from fidelity_kld.io.llama import decode_rows

FORMATS = ["safetensors", "npy", "arrow", "parquet"]


def compare_json(tmp_path, *paths) -> dict:
    out = tmp_path / "s.json"
    r = CliRunner().invoke(cli, ["compare", *map(str, paths), "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


@pytest.mark.parametrize("fmt", FORMATS)
def test_compare_gives_the_same_statistics_on_the_converted_quant(tmp_path, llama_base_path,
                                                                  llama_q4_path, fmt):
    q = tmp_path / f"q4.{fmt}"
    r = CliRunner().invoke(cli, ["convert", str(llama_q4_path), str(q), "-q"])
    assert r.exit_code == 0, r.output
    direct = compare_json(tmp_path, llama_base_path, llama_q4_path)["models"][0]["summary"]
    converted = compare_json(tmp_path, llama_base_path, q)["models"][0]["summary"]
    assert f"{direct['kld']['mean']:.6f}" == "0.002663"  # llama.cpp printed 0.002663
    assert converted == direct  # every statistic, bit for bit (it was 0.002743 before)


def test_both_sides_converted(tmp_path, llama_base_path, llama_q4_path):
    convert(open_source(llama_base_path), tmp_path / "base.safetensors")
    convert(open_source(llama_q4_path), tmp_path / "q4.npy")
    direct = compare_json(tmp_path, llama_base_path, llama_q4_path)["models"][0]["summary"]
    both = compare_json(tmp_path, tmp_path / "base.safetensors", tmp_path / "q4.npy")
    assert both["models"][0]["summary"] == direct
    assert both["models"][0]["summary"]["llama_compat"]


def test_the_metadata_says_what_the_values_are(tmp_path, llama_q4_path):
    """Read with the file formats' own readers, not ours."""
    convert(open_source(llama_q4_path), tmp_path / "q.safetensors")
    n = struct.unpack("<Q", (tmp_path / "q.safetensors").read_bytes()[:8])[0]
    header = json.loads((tmp_path / "q.safetensors").read_bytes()[8:8 + n])
    assert header["__metadata__"]["fidelity_kld.values"] == "log_probs"
    assert "llama.cpp" in header["__metadata__"]["fidelity_kld.decoding"]
    assert header["llama_scale_min"]["shape"] == [762, 2]

    convert(open_source(llama_q4_path), tmp_path / "q.parquet")
    meta = pq.read_schema(tmp_path / "q.parquet").metadata
    assert meta[b"fidelity_kld.values"] == b"log_probs"

    convert(open_source(llama_q4_path), tmp_path / "q.npy")
    assert json.loads((tmp_path / "q.npy.json").read_text())["fidelity_kld.values"] == "log_probs"
    raw = np.load(tmp_path / "q.npy")  # plain float32 log-probs for any other tool
    src = open_source(llama_q4_path)
    np.testing.assert_array_equal(raw, decode_rows(src.read(0, src.n_tokens).data, src.vocab))


def test_restored_rows_are_the_original_rows(tmp_path, llama_q4_path):
    convert(open_source(llama_q4_path), tmp_path / "q.arrow")
    orig = open_source(llama_q4_path)
    back = llama_rows(open_source(tmp_path / "q.arrow"))
    assert back.dtype == "llama_u16" and values_of(back) == "log_probs"
    a, b = orig.read(100, 300).data, back.read(100, 300).data
    np.testing.assert_array_equal(a[:, :4 + orig.vocab], b[:, :4 + orig.vocab])


def test_a_second_conversion_keeps_it(tmp_path, llama_base_path, llama_q4_path):
    convert(open_source(llama_q4_path), tmp_path / "a.parquet")
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "a.parquet"), str(tmp_path / "b.safetensors"), "-q"])
    assert r.exit_code == 0 and "llama.cpp log-probs" in r.output, r.output
    direct = compare_json(tmp_path, llama_base_path, llama_q4_path)["models"][0]["summary"]
    assert compare_json(tmp_path, llama_base_path, tmp_path / "b.safetensors")["models"][0]["summary"] == direct


def test_float16_conversion_says_it_cannot_be_restored(tmp_path, llama_base_path, llama_q4_path):
    convert(open_source(llama_q4_path), tmp_path / "q.safetensors", dtype="float16")
    src = open_source(tmp_path / "q.safetensors")
    assert values_of(src) == "log_probs" and llama_rows(src) is src
    r = CliRunner().invoke(cli, ["compare", str(llama_base_path), str(tmp_path / "q.safetensors"), "-q",
                                 "--format", "json"])
    assert r.exit_code == 0
    assert "compared as logits (renormalised)" in r.stderr


def test_edited_values_are_refused(tmp_path, llama_base_path, llama_q4_path):
    convert(open_source(llama_q4_path), tmp_path / "q.npy")
    x = np.load(tmp_path / "q.npy")
    x[5, 7] += 0.01  # no longer on the row's grid
    np.save(tmp_path / "q.npy", x)
    r = CliRunner().invoke(cli, ["compare", str(llama_base_path), str(tmp_path / "q.npy"), "-q"])
    assert r.exit_code == 1
    assert "q.npy" in r.output and "token 5" in r.output and "Traceback" not in r.output


def test_raw_float32_dumps_are_untouched(tmp_path):
    from fidelity_kld.io import ArraySource

    x = np.random.default_rng(0).standard_normal((10, 7)).astype(np.float32)
    convert(ArraySource(x), tmp_path / "x.safetensors")
    src = open_source(tmp_path / "x.safetensors")
    assert values_of(src) == "logits" and llama_rows(src) is src
    with pytest.raises(DumpError):
        convert(ArraySource(x), tmp_path / "x.txt")
