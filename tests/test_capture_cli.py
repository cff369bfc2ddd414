"""`fidelity-kld capture MODEL --text ... --ctx ... --out ...` (issue 18, point 15) on the
tiny local model of tests/data/lm_eval: the dump holds the model's own logits (checked
against a plain transformers forward pass), the text's next tokens as labels and the chunk
numbers as prompt ids; --fake-quant and --dtype variants compare against it; --top-k writes
the top-k form (fidelity_kld.io.topk) of the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fidelity_kld.cli import cli
from fidelity_kld.io import open_source

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODEL = Path(__file__).parent / "data" / "lm_eval" / "tiny_llama"
TEXT = ("The quick brown fox jumps over the lazy dog. " * 12)


def capture(tmp_path, out, *extra):
    (tmp_path / "eval.txt").write_text(TEXT, encoding="utf-8")
    r = CliRunner().invoke(cli, ["capture", str(MODEL), "--text", str(tmp_path / "eval.txt"),
                                 "--ctx", "64", "--out", str(tmp_path / out), *extra])
    assert r.exit_code == 0, r.output
    return r


def test_capture_writes_the_models_logits_labels_and_chunks(tmp_path):
    r = capture(tmp_path, "ref.safetensors", "--chunks", "3", "--batch-size", "2")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    chunks = [ids[c * 64:(c + 1) * 64] for c in range(3)]
    if tok.bos_token_id is not None:
        for c in chunks:
            c[0] = tok.bos_token_id
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor(chunks)).logits[:, :-1].reshape(-1, model.config.vocab_size)
    with open_source(tmp_path / "ref.safetensors") as src:
        assert src.n_tokens == 3 * 63 and "189 tokens (3 chunks of 64)" in r.output
        np.testing.assert_allclose(src.read(0, src.n_tokens).data, want.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(src.labels, np.array([c[1:] for c in chunks]).reshape(-1))
        np.testing.assert_array_equal(src.prompt_ids, np.repeat(np.arange(3), 63))


def test_variants_compare_against_the_reference(tmp_path):
    capture(tmp_path, "ref.safetensors", "--chunks", "2")
    capture(tmp_path, "q4.safetensors", "--chunks", "2", "--fake-quant", "4")
    capture(tmp_path, "q8.npy", "--chunks", "2", "--fake-quant", "8", "--dump-dtype", "float16")
    r = CliRunner().invoke(cli, ["compare", str(tmp_path / "ref.safetensors"),
                                 str(tmp_path / "q4.safetensors"), str(tmp_path / "q8.npy"),
                                 "--format", "json", "-q"])
    assert r.exit_code == 0, r.output
    kld = [m["summary"]["kld"]["mean"] for m in json.loads(r.output)["models"]]
    assert kld[0] > kld[1] > 0  # 4-bit weights drift further than 8-bit ones


def test_top_k_capture_is_the_full_captures_top_k_and_compare_takes_it(tmp_path):
    """--top-k: the K largest log-probs of the same model's full rows (numpy/scipy on the
    full capture), the tail mass, a floor, the labels; compare reads it as a reference or
    a quant, with KLD bounds around the full dumps' KLD and the same label statistics."""
    from scipy.special import log_softmax

    from fidelity_kld.io.topk import read_topk

    k = 16
    capture(tmp_path, "ref.safetensors", "--chunks", "2")
    r = capture(tmp_path, "ref.topk.parquet", "--chunks", "2", "--top-k", str(k))
    assert "126 tokens (2 chunks of 64, top 16 log-probs a token)" in r.output
    capture(tmp_path, "q4.safetensors", "--chunks", "2", "--fake-quant", "4")
    capture(tmp_path, "q4.topk.parquet", "--chunks", "2", "--fake-quant", "4", "--top-k", str(k))
    t = read_topk(tmp_path / "ref.topk.parquet")
    with open_source(tmp_path / "ref.safetensors") as src:
        lp = log_softmax(src.read(0, src.n_tokens).data.astype(np.float64), axis=1)
        labels, pids = src.labels, src.prompt_ids
    top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    assert t.n_rows == lp.shape[0] == 126 and t.k == k and t.vocab == lp.shape[1]
    np.testing.assert_array_equal(t.token_ids, top)
    np.testing.assert_allclose(t.logprobs, np.take_along_axis(lp, top, axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t.tail_mass(), 1 - np.exp(np.take_along_axis(lp, top, axis=1)).sum(axis=1),
                               rtol=1e-6, atol=1e-9)
    assert (t.floor_logprob <= lp.min(axis=1) + 1e-6).all()
    np.testing.assert_array_equal(t.label, labels)
    np.testing.assert_array_equal(t.prompt_id, pids)
    np.testing.assert_allclose(t.label_logprob, lp[np.arange(lp.shape[0]), labels], rtol=1e-6, atol=1e-6)

    def compare(ref, q):
        r = CliRunner().invoke(cli, ["compare", str(tmp_path / ref), str(tmp_path / q),
                                     "--format", "json", "-q"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["models"][0]["summary"]

    full = compare("ref.safetensors", "q4.safetensors")
    for ref, q in (("ref.topk.parquet", "q4.safetensors"), ("ref.topk.parquet", "q4.topk.parquet"),
                   ("ref.safetensors", "q4.topk.parquet")):
        b = compare(ref, q)
        assert b["kld_lower"]["mean"] <= full["kld"]["mean"] <= b["kld_upper"]["mean"], (ref, q)
        assert b["same_top"] == full["same_top"]
        assert abs(b["ln_ppl_ratio"] - full["ln_ppl_ratio"]) < 1e-5


def test_top_k_capture_refuses_what_it_cannot_write(tmp_path):
    (tmp_path / "eval.txt").write_text(TEXT, encoding="utf-8")
    base = ["capture", str(MODEL), "--text", str(tmp_path / "eval.txt"), "--ctx", "64"]
    for extra, code, message in (
            (["--out", str(tmp_path / "x.safetensors"), "--top-k", "8"], 2, "give --out a .parquet"),
            (["--out", str(tmp_path / "x.parquet"), "--top-k", "8", "--dump-dtype", "float16"], 2,
             "--dump-dtype is for full logits"),
            (["--out", str(tmp_path / "x.parquet")], 2, "give a .safetensors or .npy name"),
            (["--out", str(tmp_path / "x.parquet"), "--top-k", "129"], 1,
             "--top-k 129 is more than the vocabulary's 128 tokens")):
        r = CliRunner().invoke(cli, base + extra)
        assert r.exit_code == code and message in r.output, (extra, r.output)
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".x.*"))


def test_capture_errors_are_one_line(tmp_path):
    (tmp_path / "short.txt").write_text("abc", encoding="utf-8")
    r = CliRunner().invoke(cli, ["capture", str(MODEL), "--text", str(tmp_path / "short.txt"),
                                 "--ctx", "64", "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "shorter than one chunk of 64 tokens" in r.output
    assert not (tmp_path / "x.safetensors").exists()
    r = CliRunner().invoke(cli, ["capture", str(tmp_path / "no_model"), "--text",
                                 str(tmp_path / "short.txt"), "--out", str(tmp_path / "x.npy")])
    assert r.exit_code == 1 and "no_model" in r.output


FIXTURE_MODEL = Path("/work/shared/fixtures/tiny-llama")


@pytest.mark.skipif(not FIXTURE_MODEL.is_dir(), reason="the shared fixture model is not on this machine")
def test_the_variant_ordering_the_readme_states(tmp_path):
    """README: on the fixture model, int4 > bf16 (weights and activations) > int8 > bf16
    weights only (here on 2 of the README's 6 chunks)."""
    from fidelity_kld.capture import hf
    from fidelity_kld.stream import compare_sources

    tok = transformers.AutoTokenizer.from_pretrained(FIXTURE_MODEL)
    text = (FIXTURE_MODEL / "eval.txt").read_text(encoding="utf-8")
    chunks = hf.text_chunks(tok, text, 256, max_chunks=2)

    def load(dtype=torch.float32):
        return transformers.AutoModelForCausalLM.from_pretrained(FIXTURE_MODEL, dtype=dtype).eval()

    variants = {
        "ref": load(),
        "bf16_weights": load().to(torch.bfloat16).to(torch.float32),
        "int8": hf.fake_quantize_weights(load(), 8),
        "bf16": load(torch.bfloat16),
        "int4": hf.fake_quantize_weights(load(), 4),
    }
    for name, model in variants.items():
        hf.capture_logits(model, chunks, tmp_path / f"{name}.safetensors")
    srcs = [open_source(tmp_path / f"{n}.safetensors") for n in variants]
    kld = [float(np.mean(st.kld)) for st in compare_sources(srcs[0], srcs[1:])]
    assert kld[0] < kld[1] < kld[2] < kld[3]  # bf16 weights < int8 < bf16 < int4
