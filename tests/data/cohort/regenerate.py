"""Regenerate the tiny test cohort in this directory (run from anywhere; deterministic).

A reference (bf16) and five quants (q8, q6, q4, q3, q2) with outcomes in each harness's
real layout, small enough to check by hand (tests/test_cohort.py does):

    lm_eval/<model>/samples_gsm8k_<date>.jsonl   lm-evaluation-harness --log_samples, two
                                                 filters (strict-match, flexible-extract)
    livecodebench/<model>_codegeneration_eval_all.json   LiveCodeBench, 2 samples/problem
    evalplus/<model>/humaneval_eval_results.json         EvalPlus, 1 sample/task
    summary.json                                 `fidelity-kld compare --output` shape
    per_prompt/<model>.parquet                   `compare --per-prompt` columns (livecodebench)
    manifest.toml, manifest.json, manifest.csv   the same cohort three ways
    readers/                                     extra files for the reader tests

strict-match per doc (gsm8k, 6 docs); flexible-extract is the same except doc 5 = 1 for all:
    bf16 111100  q8 111100  q6 111010  q4 110100  q3 101000  q2 010000
livecodebench pass@1 (4 problems, graded_list of 2):
    bf16 [1, .5, 0, 1]  q8 same  q6 [1, .5, .5, 1]  q4 [.5, .5, 0, 1]  q3 [.5, 0, 0, 1]  q2 [0, 0, 0, .5]
humaneval+ (base and plus pass), 4 tasks:
    bf16 1110  q8 1101  q6 1110  q4 1100  q3 1000  q2 1000
kld_mean: q8 0.001, q6 0.004, q4 0.02, q3 0.08, q2 0.3
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
MODELS = ["bf16", "q8", "q6", "q4", "q3", "q2"]
GSM = {"bf16": "111100", "q8": "111100", "q6": "111010", "q4": "110100", "q3": "101000", "q2": "010000"}
LCB_IDS = ["abc301_a", "abc301_b", "1873_A", "2891"]
LCB = {"bf16": [[1, 1], [1, 0], [0, 0], [1, 1]], "q8": [[1, 1], [1, 0], [0, 0], [1, 1]],
       "q6": [[1, 1], [0, 1], [1, 0], [1, 1]], "q4": [[1, 0], [0, 1], [0, 0], [1, 1]],
       "q3": [[0, 1], [0, 0], [0, 0], [1, 1]], "q2": [[0, 0], [0, 0], [0, 0], [1, 0]]}
HE = {"bf16": "1110", "q8": "1101", "q6": "1110", "q4": "1100", "q3": "1000", "q2": "1000"}
KLD = {"q8": 0.001, "q6": 0.004, "q4": 0.02, "q3": 0.08, "q2": 0.3}
DATE = "2024-05-01T12-00-00.123456"


def lm_eval_line(doc_id, flt, score):
    answer = str(doc_id * 7)
    return {"doc_id": doc_id, "doc": {"question": f"question {doc_id}", "answer": f"... #### {answer}"},
            "target": answer,
            "arguments": {"gen_args_0": {"arg_0": f"Question: question {doc_id}\nAnswer:",
                                         "arg_1": {"until": ["Question:"], "do_sample": False}}},
            "resps": [[f"The answer is {answer if score else 0}."]],
            "filtered_resps": [answer if score else "[invalid]"], "filter": flt,
            "metrics": ["exact_match"], "doc_hash": f"{doc_id:064x}", "prompt_hash": f"{doc_id + 1:064x}",
            "target_hash": f"{doc_id + 2:064x}", "exact_match": float(score)}


def summary(k, *, labels=True, reverse_inf=False):
    pct = {"99.9": 40 * k, "99": 12 * k, "95": 4 * k, "90": 2.2 * k, "10": 0.02 * k, "5": 0.01 * k,
           "1": 0.001 * k, "0.1": 0.0}
    s = {"n_tokens": 4096, "n_valid": 4096, "n_invalid": 0, "n_kld_inf": 0, "llama_compat": False,
         "kld": {"mean": k, "se": k / 50, "median": k / 4, "min": 0.0, "max": 90 * k, "percentiles": pct},
         "kld_reverse": {"mean": "inf" if reverse_inf else 1.05 * k, "se": None, "median": k / 4, "min": 0.0,
                         "max": "inf" if reverse_inf else 95 * k, "percentiles": pct},
         "entropy_ref_mean": 1.9, "same_top": 1 - 0.4 * k ** 0.5, "same_top_se": 0.001, "has_labels": labels}
    if labels:
        s.update(ppl_ref=6.0, ppl_ref_se=0.1, ppl_q=6.0 * (1 + k / 2), ppl_q_se=0.1, cor_nll=0.99,
                 ln_ppl_ratio=k / 2, ln_ppl_ratio_se=0.001, ppl_ratio=1 + k / 2, ppl_ratio_se=0.001,
                 ppl_diff=3.0 * k, ppl_diff_se=0.01, rms_delta_p=0.1 * k ** 0.5, rms_delta_p_se=0.001)
    else:
        s.update(ppl_ref=None, ppl_q=None, ln_ppl_ratio=None, ppl_ratio=None, ppl_diff=None, rms_delta_p=None)
    return s


def main():
    for m in MODELS:
        d = HERE / "lm_eval" / m
        d.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, c in enumerate(GSM[m]):
            lines.append(lm_eval_line(i, "strict-match", int(c)))
            lines.append(lm_eval_line(i, "flexible-extract", 1 if i == 5 else int(c)))
        (d / f"samples_gsm8k_{DATE}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

        probs = []
        for qid, graded in zip(LCB_IDS, LCB[m]):
            p = {"question_title": f"problem {qid}", "question_content": "...", "platform": "atcoder",
                 "question_id": qid, "contest_id": qid.split("_")[0], "contest_date": "2024-05-01T00:00:00",
                 "starter_code": "", "difficulty": "easy", "output_list": ["..."] * 2, "code_list": ["..."] * 2,
                 "graded_list": [bool(g) for g in graded], "pass@1": sum(graded) / len(graded),
                 "metadata": ["{}"] * 2}
            if m == "q3":
                del p["pass@1"]  # older files: the reader falls back to graded_list
            probs.append(p)
        (HERE / "livecodebench").mkdir(exist_ok=True)
        (HERE / "livecodebench" / f"{m}_codegeneration_eval_all.json").write_text(json.dumps(probs, indent=1))

        ev = {}
        for i, c in enumerate(HE[m]):
            tid = f"HumanEval/{i}"
            base = "pass" if (c == "1" or i == 3) else "fail"  # task 3: base passes, plus decides
            plus = "pass" if c == "1" else "fail"
            ev[tid] = [{"task_id": tid, "solution": "def f(): ...", "base_status": base, "plus_status": plus,
                        "base_fail_tests": [], "plus_fail_tests": []}]
        d = HERE / "evalplus" / m
        d.mkdir(parents=True, exist_ok=True)
        (d / "humaneval_eval_results.json").write_text(json.dumps(
            {"date": "2024-05-01 12:00", "hash": "0123456789abcdef", "eval": ev}, indent=1))

    doc = {"fidelity_kld_version": "0.1.0", "reference": {"path": "bf16.gguf", "n_tokens": 4096},
           "models": [{"name": f"{m}.gguf" if m == "q4" else m, "path": f"{m}.gguf",
                       "summary": summary(KLD[m], labels=(m != "q2"), reverse_inf=(m == "q2"))}
                      for m in MODELS[1:]]}
    (HERE / "summary.json").write_text(json.dumps(doc, indent=1))

    (HERE / "per_prompt").mkdir(exist_ok=True)
    bumps = {"q8": [1, 2, 1, 1], "q6": [1, 3, 2, 1], "q4": [4, 1, 1, 1], "q3": [3, 5, 1, 1], "q2": [5, 4, 3, 1]}
    for m in MODELS[1:]:
        kld = [KLD[m] * b for b in bumps[m]]
        pq.write_table(pa.table({"prompt_id": LCB_IDS, "n_tokens": pa.array([300, 500, 400, 200], pa.int64()),
                                 "kld_mean": kld, "kld_max": [10 * v for v in kld],
                                 "kld_p99": [5 * v for v in kld], "top1_agree": [0.99, 0.98, 0.97, 0.99],
                                 "nll_ref_mean": [0.5] * 4, "nll_q_mean": [0.5 + v for v in kld]}),
                       HERE / "per_prompt" / f"{m}.parquet")

    outs = lambda m: [f"lm_eval/{m}", f"livecodebench/{m}_codegeneration_eval_all.json",  # noqa: E731
                      f"evalplus/{m}/humaneval_eval_results.json"]
    toml = ['name = "tiny test cohort"', 'fidelity = "summary.json"', 'filters = { gsm8k = "strict-match" }',
            "", "[reference]", 'name = "bf16"', f"outcomes = {json.dumps(outs('bf16'))}"]
    for i, m in enumerate(MODELS[1:]):
        toml += ["", "[[models]]", f'name = "{m}"', f"bpw = {[8.5, 6.56, 4.89, 3.91, 2.96][i]}",
                 f"size_gb = {[8.5, 6.6, 4.9, 3.9, 3.0][i]}", f"outcomes = {json.dumps(outs(m))}",
                 f'per_prompt = "per_prompt/{m}.parquet"']
        if m == "q4":
            toml.append('fidelity_name = "q4.gguf"')
    (HERE / "manifest.toml").write_text("\n".join(toml) + "\n")
    js = {"name": "tiny test cohort", "fidelity": "summary.json", "filters": {"gsm8k": "strict-match"},
          "reference": {"name": "bf16", "outcomes": outs("bf16")},
          "models": [{"name": m, "bpw": [8.5, 6.56, 4.89, 3.91, 2.96][i], "size_gb": [8.5, 6.6, 4.9, 3.9, 3.0][i],
                      "outcomes": outs(m), "per_prompt": f"per_prompt/{m}.parquet",
                      **({"fidelity_name": "q4.gguf"} if m == "q4" else {})}
                     for i, m in enumerate(MODELS[1:])]}
    (HERE / "manifest.json").write_text(json.dumps(js, indent=1) + "\n")
    rows = ["name,role,fidelity,fidelity_name,outcomes,filter,per_prompt,bpw,size_gb"]
    rows.append("bf16,reference,,," + ";".join(outs("bf16")) + ",strict-match,,,")
    for i, m in enumerate(MODELS[1:]):
        rows.append(f"{m},quant,summary.json,{'q4.gguf' if m == 'q4' else ''},{';'.join(outs(m))},strict-match,"
                    f"per_prompt/{m}.parquet,{[8.5, 6.56, 4.89, 3.91, 2.96][i]},{[8.5, 6.6, 4.9, 3.9, 3.0][i]}")
    (HERE / "manifest.csv").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
