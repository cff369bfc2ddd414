"""lm-evaluation-harness recipe: per-prompt fidelity keyed by doc_id lines up with the
--log_samples outcomes in a cohort manifest.

tests/data/lm_eval holds a tiny random Llama (float32, character tokenizer) and the
samples files that lm-eval 0.4.13 itself wrote for it and for its int4 fake-quantized copy
on two local tasks (multiple choice and generate_until). `python tests/test_harness_lm_eval.py`
regenerates them (needs lm_eval, transformers, accelerate; no network).
"""

from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fidelity_kld.capture import lm_eval as cap

DATA = Path(__file__).parent / "data" / "lm_eval"
MODEL = DATA / "tiny_llama"
DOCS = [
    {"question": "What is 2+2?", "choices": ["3", "4", "5"], "answer": 1},
    {"question": "Color of the sky?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "Opposite of up?", "choices": ["left", "down", "in"], "answer": 1},
    {"question": "First letter?", "choices": ["b", "z", "a"], "answer": 2},
    {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": 1},
    {"question": "3 times 3?", "choices": ["9", "6", "33"], "answer": 0},
    {"question": "Frozen water?", "choices": ["steam", "ice", "fog"], "answer": 1},
    {"question": "A cat says?", "choices": ["woof", "moo", "meow"], "answer": 2},
]
TASKS = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""",
}


def samples(run: str, task: str) -> Path:
    (path,) = sorted((DATA / run).glob(f"samples_{task}_*.jsonl"))
    return path


def load_models():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fidelity_kld.capture.hf import fake_quantize_weights

    ref = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    q = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    fake_quantize_weights(q, 4)
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    return ref, q, tok


# ---------------------------------------------------------------- reading samples files

def test_read_requests_in_lm_eval_layout():
    mc = cap.read_requests(samples("ref", "tiny_mc"))
    assert len(mc) == 3 * len(DOCS)
    assert {r.task for r in mc} == {"tiny_mc"}
    assert {r.kind for r in mc} == {"loglikelihood"}
    first = [r for r in mc if r.doc_id == 0]
    assert [r.continuation for r in first] == [" 3", " 4", " 5"]
    assert first[0].context == "Q: What is 2+2?\nA:"
    gen = cap.read_requests(samples("ref", "tiny_gen"))
    assert len(gen) == len(DOCS) and {r.kind for r in gen} == {"generate_until"}
    raw = [json.loads(line) for line in samples("ref", "tiny_gen").read_text().splitlines()]
    assert [r.continuation for r in gen] == [rec["resps"][0][0] for rec in raw]
    both = cap.read_requests(DATA / "ref")  # a directory: every task
    assert len(both) == len(mc) + len(gen)


def test_read_requests_older_layout_and_repeated_filters(tmp_path):
    """lm-eval < 0.4.3 logged arguments as lists; gsm8k-like tasks log each doc once per
    filter. Both read the same requests; a doc whose filters disagree is an error."""
    recs = [
        {"doc_id": 0, "arguments": [["ctx a", " x"], ["ctx a", " y"]], "resps": [[[-1.5, False]], [[-2.0, True]]],
         "filter": "none", "acc": 1.0},
        {"doc_id": 1, "arguments": [["Q?", {"until": ["\n"]}]], "resps": [["gen one"]], "filter": "strict-match"},
        {"doc_id": 1, "arguments": [["Q?", {"until": ["\n"]}]], "resps": [["gen one"]], "filter": "flexible-extract"},
        {"doc_id": 2, "arguments": [["The whole document."]], "resps": [[-40.0]], "filter": "none"},
    ]
    p = tmp_path / "samples_mixed_2025-01-01T00-00-00.000000.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    reqs = cap.read_requests(p)
    assert [(r.doc_id, r.index, r.kind) for r in reqs] == [
        (0, 0, "loglikelihood"), (0, 1, "loglikelihood"), (1, 0, "generate_until"),
        (2, 0, "loglikelihood_rolling")]
    assert reqs[0].logged == [-1.5, False] and reqs[2].continuation == "gen one"
    assert reqs[3].context == "" and reqs[3].continuation == "The whole document."
    recs[2]["arguments"] = [["Q changed?", {"until": ["\n"]}]]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(ValueError, match="different arguments"):
        cap.read_requests(p)


def test_encoder_moves_trailing_space_and_prefixes_empty_context():
    vocab = {c: i for i, c in enumerate(" abcdefghijklmnopqrstuvwxyz", start=2)}

    def tokenize(text):
        return [vocab[c] for c in text]

    enc = cap.Encoder(tokenize, prefix_token_id=0)
    assert enc.pair("ab ", "c") == ([vocab["a"], vocab["b"]], [vocab[" "], vocab["c"]])
    assert enc.pair("", "ab") == ([0], [vocab["a"], vocab["b"]])


# ---------------------------------------------------------------- against a real lm-eval run

def test_reference_and_quant_loglikelihoods_equal_what_lm_eval_logged():
    """Tokenization, alignment and nll: our summed log-probs of each request's continuation
    equal lm-eval's own logged loglikelihoods, for the reference run and the int4 run."""
    ref, q, tok = load_models()
    reqs = cap.read_requests(samples("ref", "tiny_mc"))
    res = cap.harness_fidelity(ref, q, tok, reqs, batch_size=4)
    ll = res.loglikelihoods()
    logged_ref = np.array([float(r.logged[0]) for r in reqs])
    q_reqs = cap.read_requests(samples("q4", "tiny_mc"))
    assert [(r.doc_id, r.index, r.continuation) for r in q_reqs] == [(r.doc_id, r.index, r.continuation) for r in reqs]
    logged_q = np.array([float(r.logged[0]) for r in q_reqs])
    np.testing.assert_allclose(ll[:, 0], logged_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ll[:, 1], logged_q, rtol=1e-5, atol=1e-4)
    assert not np.allclose(logged_ref, logged_q, atol=1e-3)  # the quant really differs


def test_per_prompt_table_lines_up_with_outcomes_in_a_cohort_manifest(tmp_path):
    """The recipe end to end: per-prompt Parquet keyed by (task, doc_id) + the two runs'
    samples directories -> the cohort manifest aligns per-prompt KLD with the outcomes."""
    from fidelity_kld.stats.manifest import manifest_from_dict
    from fidelity_kld.stats.outcomes import read_lm_eval

    ref, q, tok = load_models()
    reqs = cap.read_requests(DATA / "ref")
    res = cap.harness_fidelity(ref, q, tok, reqs, batch_size=4)
    pp = tmp_path / "q4.parquet"
    res.write_per_prompt(pp, model="q4")
    table = res.per_prompt()
    assert sorted(set(table["task"])) == ["tiny_gen", "tiny_mc"]
    assert len(table["task"]) == 2 * len(DOCS)
    assert np.all(table["kld_mean"] > 0) and np.all(np.isfinite(table["kld_mean"]))

    # each doc's kld_mean is the mean over its requests' scored tokens (independent regroup)
    st = res.accumulator.token_stats()
    for task, doc, kld in zip(table["task"], table["prompt_id"], table["kld_mean"]):
        sel = [i for i, r in enumerate(res.requests) if r.request.task == task and r.request.doc_id == doc]
        tok_sel = np.isin(res.request_index, sel)
        n_cont = sum(len(res.requests[i].continuation_ids) for i in sel)
        assert tok_sel.sum() == n_cont
        assert kld == pytest.approx(st.kld[tok_sel].mean(), rel=1e-12)

    manifest = {
        "name": "tiny",
        "reference": {"name": "F32", "outcomes": [str(DATA / "ref")]},
        "models": [{"name": "Q4", "outcomes": [str(DATA / "q4")], "per_prompt": str(pp)}],
    }
    cohort = manifest_from_dict(manifest, base_dir=tmp_path).cohort
    for task in ("tiny_mc", "tiny_gen"):
        outcomes = read_lm_eval(samples("q4", task)).tasks[task]
        assert set(cohort.prompt_ids[task]) == set(outcomes)
        want = {str(d): k for t, d, k in zip(table["task"], table["prompt_id"], table["kld_mean"]) if t == task}
        got = cohort.per_prompt_kld[task][0]
        np.testing.assert_allclose(got, [want[p] for p in cohort.prompt_ids[task]], rtol=1e-6)
        np.testing.assert_array_equal(cohort.scores[task][1], [outcomes[p] for p in cohort.prompt_ids[task]])


def test_score_all_counts_every_token_after_the_first():
    ref, q, tok = load_models()
    reqs = cap.read_requests(samples("ref", "tiny_gen"))
    res = cap.harness_fidelity(ref, q, tok, reqs, score="all", batch_size=3)
    counts = np.bincount(res.request_index, minlength=len(reqs))
    np.testing.assert_array_equal(counts, [len(r.tokens) - 1 for r in res.requests])
    assert res.summary(task="tiny_gen").n_tokens == counts.sum()


# ---------------------------------------------------------------- a live lm-eval run

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FIDELITY_KLD_LIVE_LM_EVAL") != "1",
                    reason="runs lm-eval itself (~15-20 s): set FIDELITY_KLD_LIVE_LM_EVAL=1")
def test_live_lm_eval_run_matches_the_recipe(tmp_path):
    """Runs lm-eval itself on the fixture model and checks its fresh samples file against
    the recipe, so a changed lm-eval layout shows up here (needs lm_eval, accelerate)."""
    pytest.importorskip("lm_eval")
    out = run_lm_eval(MODEL, tmp_path, ["tiny_mc"])
    ref, _, tok = load_models()
    reqs = cap.read_requests(next(out.glob("**/samples_tiny_mc_*.jsonl")))
    res = cap.harness_fidelity(ref, ref, tok, reqs, batch_size=4)
    np.testing.assert_allclose(res.loglikelihoods()[:, 0], [float(r.logged[0]) for r in reqs],
                               rtol=1e-5, atol=1e-4)
    assert res.summary().kld.max < 1e-9  # a model against itself


# ---------------------------------------------------------------- fixture generation

def write_tasks(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, text in TASKS.items():
        (directory / f"{name}.yaml").write_text(text.format(data=data))
    return directory


def run_lm_eval(model_dir: Path, workdir: Path, tasks) -> Path:
    tasks_dir = write_tasks(workdir / "tasks")
    out = workdir / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf",
                    "--model_args", f"pretrained={model_dir},dtype=float32",
                    "--tasks", ",".join(tasks), "--include_path", str(tasks_dir),
                    "--device", "cpu", "--batch_size", "4", "--log_samples",
                    "--output_path", str(out)], check=True, env=env, cwd=workdir,
                   stdout=subprocess.DEVNULL)
    return out


def build_tiny_model(directory: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "<pad>": 3}
    for c in " \n" + string.ascii_letters + string.digits + string.punctuation:
        vocab[c] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)


def regenerate() -> None:
    import transformers

    from fidelity_kld.capture.hf import fake_quantize_weights

    shutil.rmtree(DATA, ignore_errors=True)
    build_tiny_model(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        q_dir = tmp / "q4_model"
        q = transformers.AutoModelForCausalLM.from_pretrained(MODEL)
        fake_quantize_weights(q, 4)
        q.save_pretrained(q_dir)
        transformers.AutoTokenizer.from_pretrained(MODEL).save_pretrained(q_dir)
        for run, model_dir in (("ref", MODEL), ("q4", q_dir)):
            out = run_lm_eval(model_dir, tmp / run, list(TASKS))
            (DATA / run).mkdir(parents=True)
            for f in out.glob("**/samples_*.jsonl"):
                shutil.copy(f, DATA / run / f.name)
    print(f"wrote {DATA}")


if __name__ == "__main__":
    regenerate()
