"""The examples of README.md's "Using fidelity-kld from your harness" and docs/harness.md
are run here exactly as written: each ```python block after a `<!-- test: NAME -->` line.
The transformers and lm-eval examples get the tiny local model of tests/data/lm_eval for
MODEL / REF_MODEL; the GPU example runs on the CPU without a GPU."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
DOCS = (ROOT / "README.md", ROOT / "docs" / "harness.md")
FIXTURE = Path(__file__).parent / "data" / "lm_eval"
BLOCK = re.compile(r"<!-- test: (\w+) -->\n```python\n(.*?)```", re.S)


def examples() -> dict[str, str]:
    found: dict[str, str] = {}
    for doc in DOCS:
        found.update(BLOCK.findall(doc.read_text(encoding="utf-8")))
    return found


def run(name: str, **names) -> dict:
    ns = {"__name__": f"docs_harness_{name}", **names}
    exec(compile(examples()[name], f"docs:{name}", "exec"), ns)
    return ns


def test_the_tested_examples_are_all_there():
    assert sorted(examples()) == ["lm_eval", "numpy", "torch", "transformers"]


def test_numpy_example(capsys):
    ns = run("numpy")
    assert "KLD" in capsys.readouterr().out
    acc = ns["acc"]
    assert acc.n_tokens == 4 * (32 - 4)  # padding excluded
    np.testing.assert_array_equal(ns["per_prompt"]["prompt_id"], np.arange(8))
    np.testing.assert_array_equal(ns["per_prompt"]["n_tokens"], [16, 12] * 4)


def test_torch_example(capsys):
    pytest.importorskip("torch")
    ns = run("torch")
    s = ns["acc"].summary()
    assert s.n_tokens == 4 * 32 and s.kld.mean > 0 and s.has_labels


def test_transformers_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    ns = run("transformers", MODEL=str(FIXTURE / "tiny_llama"))
    acc = ns["acc"]
    lens = [len(t) for t in ns["texts"]]  # the fixture's tokenizer has one token per character
    assert acc.n_tokens == sum(n - 1 for n in lens)
    assert acc.summary().kld.mean > 0
    from fidelity_kld.io import open_source

    with open_source("q_bf16.safetensors") as src:
        assert src.n_tokens == acc.n_tokens and src.prompt_ids is not None


def test_lm_eval_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    model = str(FIXTURE / "tiny_llama")
    ns = run("lm_eval", REF_SAMPLES=str(FIXTURE / "ref"), REF_MODEL=model, QUANT_MODEL=model)
    assert ns["result"].summary().kld.max < 1e-9  # the same model twice
    import pyarrow.parquet as pq

    t = pq.read_table("q4_per_prompt.parquet")
    assert t.column_names[:3] == ["model", "task", "prompt_id"] and "kld_mean" in t.column_names
