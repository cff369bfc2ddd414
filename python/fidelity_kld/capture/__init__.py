"""Capture adapters: run models, or read what an inference engine produced, and feed
fidelity-kld without storing logits (or store them in the project's dump formats).

One module per framework; each imports its framework inside functions only, so importing
fidelity_kld (or this package) never imports torch, transformers, llama_cpp, vllm or lm_eval.

    fidelity_kld.capture.hf         transformers: two models over the same token batches
    fidelity_kld.capture.llama_cpp  llama-cpp-python: full logits (logits_all=True)
    fidelity_kld.capture.vllm       vLLM prompt_logprobs (top-k only): a top-k table
    fidelity_kld.capture.lm_eval    lm-evaluation-harness --log_samples: per-prompt
                                    fidelity keyed by doc_id for the cohort analysis
    fidelity_kld.capture.dump       DumpWriter: append logit rows to .npy / safetensors
"""
