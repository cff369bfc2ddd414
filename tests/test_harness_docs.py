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


def _spm_llama(tmp_path) -> str:
    """A tiny random Llama with the project's real SentencePiece tokenizer (no pad token, as
    Llama tokenizers ship): tests/data/tiny_llama_spm's config and tokenizer files, weights
    made here."""
    import shutil

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    src = Path(__file__).parent / "data" / "tiny_llama_spm"
    model_dir = tmp_path / "spm_llama"
    shutil.copytree(src, model_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig.from_pretrained(model_dir)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    return str(model_dir)


def test_transformers_example_with_a_llama_sentencepiece_tokenizer(tmp_path, monkeypatch, capsys):
    """The README's recipe as printed, on a Llama tokenizer that has no pad token (it failed
    with 'Asking to pad but the tokenizer does not have a padding token')."""
    model = _spm_llama(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model).pad_token is None  # the case the recipe must handle
    monkeypatch.chdir(tmp_path)
    ns = run("transformers", MODEL=model)
    tok = ns["tok"]
    ids = [tok(t)["input_ids"] for t in ns["texts"]]
    assert ns["acc"].n_tokens == sum(len(i) - 1 for i in ids)  # padding excluded
    assert ns["acc"].summary().kld.mean > 0


@pytest.mark.skipif(not Path("/work/shared/fixtures/tiny-llama").is_dir(),
                    reason="the shared fixture model is not on this machine")
def test_transformers_example_on_the_fixture_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")  # the hf extra's, not the test extra's
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    monkeypatch.chdir(tmp_path)
    ns = run("transformers", MODEL="/work/shared/fixtures/tiny-llama")
    assert ns["acc"].summary().kld.mean > 0


def test_hf_extra_installs_what_llama_tokenizers_need():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    names = {re.split(r"[<>=!\[ ]", e, maxsplit=1)[0] for e in extra}
    assert {"transformers", "torch", "sentencepiece", "protobuf"} <= names


def test_harness_doc_says_lm_eval_needs_accelerate_and_the_loglikelihood_shape():
    text = (ROOT / "docs" / "harness.md").read_text(encoding="utf-8")
    assert "accelerate" in text and "[len(requests), 2]" in text


def test_lm_eval_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    model = str(FIXTURE / "tiny_llama")
    ns = run("lm_eval", REF_SAMPLES=str(FIXTURE / "ref"), REF_MODEL=model, QUANT_MODEL=model)
    assert ns["result"].summary().kld.max < 1e-9  # the same model twice
    ll = ns["ll"]
    assert ll.shape == (len(ns["requests"]), 2)  # what docs/harness.md says
    np.testing.assert_allclose(ll[:, 0], ll[:, 1], atol=1e-5)  # the same model in both columns
    import pyarrow.parquet as pq

    t = pq.read_table("q4_per_prompt.parquet")
    assert t.column_names[:3] == ["model", "task", "prompt_id"] and "kld_mean" in t.column_names
