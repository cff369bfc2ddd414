"""`compare` over top-k and hidden-state dumps keeps issue 18's promises (points 6, 7 and
10-12) where they apply: models labelled by --name, at least three significant digits for
every statistic and its error, a blank line before each section; hidden-state dumps (full
per-token results) get the compact table, the paired comparison and the listings, checked
against reference.py on the same logits; top-k dumps refuse the options that need exact
per-token KLDs instead of ignoring them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats as sps

from fidelity_kld import reference
from fidelity_kld.cli import cli
from fidelity_kld.io import ArraySource, convert
from fidelity_kld.io.hidden import write_hidden
from fidelity_kld.io.topk import from_logits, write_topk

PM = re.compile(r"(-?\d+\.\d+) ± +(-?\d+\.\d+)")


def run(*args, code=0):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r.output


def sig_digits(s: str) -> int:
    return len(s.lstrip("-").replace(".", "").lstrip("0"))


@pytest.fixture(scope="module")
def near(tmp_path_factory):
    """A reference and a quant 2e-3 of noise away (KLD ~1e-6), full and top-k."""
    d = tmp_path_factory.mktemp("paths")
    rng = np.random.default_rng(5)
    n, v = 400, 200
    ref = rng.standard_normal((n, v)).astype(np.float32) * 2
    q = ref + 2e-3 * rng.standard_normal((n, v)).astype(np.float32)
    labels, prompts = rng.integers(0, v, n), np.repeat(np.arange(4), n // 4)
    for name, x in (("ref", ref), ("q", q)):
        convert(ArraySource(x, labels=labels, prompt_ids=prompts), d / f"{name}.safetensors")
        write_topk(from_logits(x, 32, labels, prompts), d / f"{name}.topk.parquet")
    return d


def test_top_k_output_has_names_three_digits_and_blank_lines(near):
    out = run("compare", near / "ref.topk.parquet", near / "q.safetensors", near / "q.topk.parquet",
              "--name", "full-q", "--name", "topk-q", "-q")
    assert "### full-q vs ref.topk.parquet" in out and "### topk-q vs ref.topk.parquet" in out
    pairs = PM.findall(out)
    assert len(pairs) >= 2 * 7
    for value, se in pairs:
        assert sig_digits(value) >= 3 and sig_digits(se) >= 3, (value, se)
    lines = out.splitlines()
    heads = [i for i, x in enumerate(lines) if x.startswith("====== ") and
             not x.startswith("====== Perplexity")]
    assert heads and all(lines[i - 1] == "" for i in heads)


@pytest.mark.parametrize("option", [["--paired"], ["--top-tokens", "2"], ["--running"],
                                    ["--sort", "kld"], ["--format", "markdown"]])
def test_top_k_refuses_what_needs_exact_klds(near, option):
    out = run("compare", near / "ref.topk.parquet", near / "q.safetensors", near / "q.safetensors",
              *option, "-q", code=2)
    assert option[0] in out and "top-k" in out


@pytest.fixture(scope="module")
def hidden(tmp_path_factory):
    d = tmp_path_factory.mktemp("hidden")
    rng = np.random.default_rng(9)
    n, h, v = 240, 24, 301
    hid = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((v, h)) / np.sqrt(h) * 4).astype(np.float32)
    labels, prompts = rng.integers(0, v, n), np.repeat(np.arange(4), n // 4)
    logits = {}
    for name, noise in (("ref", 0.0), ("qa", 0.02), ("qb", 0.06)):
        x = (hid + noise * rng.standard_normal((n, h))).astype(np.float32)
        write_hidden(d / f"{name}.hidden.safetensors", x, lm_head=w, labels=labels, prompt_ids=prompts)
        logits[name] = x.astype(np.float64) @ w.astype(np.float64).T
    return d, logits, labels


def test_hidden_dumps_get_the_compact_table_paired_and_listings(hidden):
    d, logits, labels = hidden
    args = ["compare", d / "ref.hidden.safetensors", d / "qa.hidden.safetensors",
            d / "qb.hidden.safetensors", "--name", "A", "--name", "B", "--paired",
            "--top-tokens", "2", "-q"]
    text = run(*args)
    assert "### A vs ref.hidden.safetensors" in text and "Compact table: 2 model(s)" in text
    assert "Paired comparison on the same tokens: B vs A" in text
    assert "Most divergent tokens: A" in text and "Most divergent tokens: B" in text
    doc = json.loads(run(*args, "--format", "json"))
    assert [m["name"] for m in doc["models"]] == ["A", "B"]
    kld = {n: reference.logit_stats(logits["ref"], logits[q], labels)["kld"]
           for n, q in (("A", "qa"), ("B", "qb"))}
    diff = kld["B"] - kld["A"]
    pk = next(x for x in doc["paired"]["comparisons"][0]["differences"] if x["quantity"] == "kld")
    assert pk["diff"] == pytest.approx(diff.mean(), rel=1e-3)
    assert pk["se"] == pytest.approx(sps.sem(diff), rel=1e-2)
    top = doc["top_tokens"]["B"]
    assert [r["token"] for r in top] == list(np.argsort(-kld["B"], kind="stable")[:2])
