"""Sizes of one evaluation in the three dump forms: the fixture tiny-llama over the 762
positions llama-perplexity scores in tests/data/base.kld (6 chunks of 256, rows 128..254 of
each), as full logits (llama.cpp 16-bit, float32 .npy, bfloat16 safetensors), top-k
log-probs (k = 16, 64, 256) and hidden states (float32, with and without the lm_head).
Prints a Markdown table.

    python scripts/dump_sizes.py [--model /work/shared/fixtures/tiny-llama]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("FIDELITY_KLD_TINY_LLAMA",
                                                      "/work/shared/fixtures/tiny-llama"))
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--base", default=os.path.join(here, "..", "tests", "data", "base.kld"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from fidelity_kld.capture import hf
    from fidelity_kld.capture.hf_hidden import write_hidden_dump
    from fidelity_kld.io import convert, open_source
    from fidelity_kld.io.llama import LlamaSource
    from fidelity_kld.io.topk import convert_to_topk

    src = LlamaSource(args.base)
    n_ctx, first = src.header["n_ctx"], src.header["first"]
    chunks = src.tokens.reshape(-1, n_ctx).astype(np.int64)
    chunks[:, 0] = 1
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def path(name):
            return os.path.join(tmp, name)
        rows.append(("full: llama.cpp --kl-divergence-base (16-bit codes)", os.path.getsize(args.base)))
        with open_source(args.base) as s:
            convert(s, path("full.npy"), dtype="float32")
            convert(s, path("full.safetensors"), dtype="bfloat16")
            n, v = s.n_tokens, s.vocab
            for k in (16, 64, 256):
                convert_to_topk(s, path(f"k{k}.parquet"), k)
        rows.append(("full: float32 .npy", os.path.getsize(path("full.npy"))))
        rows.append(("full: bfloat16 safetensors", os.path.getsize(path("full.safetensors"))))
        for k in (16, 64, 256):
            rows.append((f"top-k log-probs, k = {k} (Parquet)", os.path.getsize(path(f"k{k}.parquet"))))
        batches = list(hf.token_batches([c.tolist() for c in chunks], batch_size=2,
                                        score_from=[first + 1] * len(chunks)))
        write_hidden_dump(model, batches, path("h.safetensors"), lm_head_path=args.model)
        write_hidden_dump(model, batches, path("hw.safetensors"), store_lm_head=True)
        rows.append(("hidden states, float32 (lm_head read from the model)", os.path.getsize(path("h.safetensors"))))
        rows.append(("hidden states, float32, lm_head stored in the dump", os.path.getsize(path("hw.safetensors"))))
    h = model.config.hidden_size
    print(f"{n} tokens, V = {v}, H = {h}\n")
    print("| form | bytes | per token | vs float32 logits |")
    print("|---|---|---|---|")
    full = rows[1][1]
    for name, size in rows:
        print(f"| {name} | {size:,} | {size / n:,.0f} | {size / full:.4f} |")


if __name__ == "__main__":
    main()
