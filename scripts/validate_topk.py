"""Validate the top-k KLD bounds on a real model: the fixture tiny-llama (HF safetensors) and
round-to-nearest fake-quantized copies of it (capture.hf.fake_quantize_weights).

For k in {1, 4, 16, 64, 256}: dump size against the full float32 dump, mean lower / upper /
true KLD, the share of tokens whose lower bound is within 10% of the truth, bracket
violations (lower > true or upper < true beyond float32 storage rounding), and whether the
variants ranked by mean lower bound are ranked as by the full KLD. The truth is
reference.py's float64 KLD on the full logits. Prints a Markdown table.

    python scripts/validate_topk.py [--model /work/shared/fixtures/tiny-llama] [--tokens tests/data/base.kld]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import numpy as np

KS = (1, 4, 16, 64, 256)
BITS = (8, 6, 5, 4, 3)
TOL = 1e-5  # float32 storage of log-probs (see stats.topk_bounds)


def capture(model_dir: str, tokens_file: str):
    """Full logits of the reference and its fake-quantized variants over the evaluation
    tokens of a llama.cpp file (tests/data/base.kld: eval.txt's first 6 x 256 tokens as
    llama-perplexity tokenized them, BOS at each chunk's start), every position scored."""
    import torch
    from transformers import AutoModelForCausalLM

    from fidelity_kld.capture import hf
    from fidelity_kld.io.llama import LlamaSource

    src = LlamaSource(tokens_file)
    n_ctx = src.header["n_ctx"]
    chunks = src.tokens.reshape(-1, n_ctx).astype(np.int64)
    chunks[:, 0] = 1  # BOS, as llama-perplexity evaluates each chunk
    seqs = [c.tolist() for c in chunks]
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    variants = {f"rtn{b}": hf.fake_quantize_weights(copy.deepcopy(ref), b) for b in BITS}
    out = {"ref": [], **{n: [] for n in variants}}
    labels = []
    for batch in hf.token_batches(seqs, batch_size=4):
        keep, targets = hf.scored_positions(batch["input_ids"], batch["attention_mask"])
        labels.append(targets.numpy()[keep.numpy()].astype(np.int64))
        for name, model in (("ref", ref), *variants.items()):
            rows = hf.select_rows(hf.model_logits(model, batch["input_ids"], batch["attention_mask"]), keep)
            out[name].append(rows.numpy())
    return {n: np.concatenate(v) for n, v in out.items()}, np.concatenate(labels)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("FIDELITY_KLD_TINY_LLAMA",
                                                      "/work/shared/fixtures/tiny-llama"))
    ap.add_argument("--tokens", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "..", "tests", "data", "base.kld"))
    args = ap.parse_args()

    from fidelity_kld import reference
    from fidelity_kld.io.topk import from_logits, write_topk
    from fidelity_kld.stats.topk_bounds import full_logprobs, token_bounds

    logits, labels = capture(args.model, args.tokens)
    ref = logits.pop("ref")
    n, v = ref.shape
    full_bytes = ref.nbytes  # float32 [n, V]
    true = {name: reference.logit_stats(ref, q, labels)["kld"] for name, q in logits.items()}
    true_rank = sorted(true, key=lambda m: true[m].mean())
    print(f"tiny-llama, {n} tokens, V = {v}; variants: {', '.join(logits)} "
          f"(mean full KLD {', '.join(f'{true[m].mean():.4f}' for m in logits)})\n")
    print("| k | top-k dump / full float32 | pairing | variant | mean lower | mean upper | mean true "
          "| lower within 10% of true | bracket violations | rank by lower = rank by true |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k in KS:
            tr = from_logits(ref, k, labels)
            size = os.path.getsize(write_topk(tr, os.path.join(tmp, "ref.parquet")))
            for pairing in ("top-k vs top-k", "full ref vs top-k q"):
                means, lines = {}, []
                for name, q in logits.items():
                    tq = from_logits(q, k, labels)
                    a = tr if pairing.startswith("top-k") else full_logprobs(ref)
                    st = token_bounds(a, tq, vocab=v, labels=labels)
                    t = true[name]
                    slack = TOL * (1 + t)
                    viol = int(((st.kld_lower > t + slack) | (st.kld_upper < t - slack)).sum())
                    within = float(np.mean(st.kld_lower >= 0.9 * t))
                    means[name] = st.kld_lower.mean()
                    lines.append(f"| {k} | {size / full_bytes:.4f} ({size / 1e6:.3f} / {full_bytes / 1e6:.1f} MB) "
                                 f"| {pairing} | {name} | {st.kld_lower.mean():.5f} "
                                 f"| {st.kld_upper.mean():.4f} | {t.mean():.5f} | {100 * within:.1f}% "
                                 f"| {viol} / {n} |")
                same = sorted(means, key=means.get) == true_rank
                for line in lines:
                    print(line + f" {'yes' if same else 'no'} |")

if __name__ == "__main__":
    main()
