"""Build a real (small) cohort from the fixture model: round-to-nearest quantizations of its
weights, two tasks with per-prompt pass/fail outcomes, and calibration-set fidelity.

    python scripts/make_fixture_cohort.py [--model ../shared/fixtures/tiny-llama]
                                          [--out tests/data/fixture_cohort]
    fidelity-kld cohort tests/data/fixture_cohort/manifest.toml

The model is the fixture's 7.5M-parameter Llama (HF safetensors) trained on Python source;
its eval.txt is split in two: the first 40% of its tokens is the calibration text the
fidelity summaries are measured on (12 windows of 256 tokens, `fidelity_kld.compare` of each
variant against the float32 reference), the last 50% holds the tasks' prompts, so no task
prompt is calibration text. Two tasks, each prompt scored pass/fail from one teacher-forced
pass over 16 windows of 256 tokens:

- tokacc5: at every 5th position after the first 32 of a window, is the next token among
  the model's 5 most likely? (one prompt per position)
- linecomp: at every line start after the first 32 tokens of a window, given the line's
  first 2 tokens, does greedy decoding complete the next up to 2 tokens of the line
  exactly? Greedy decoding reproduces a given continuation exactly when the argmax under
  teacher forcing equals each of its tokens, so one forward pass decides it.

Per-prompt fidelity (for failure prediction and routing) is the mean KLD over the positions a
prompt is scored on. Each model's summary also carries, under "direction", the direction-aware
candidates of issue 16 (docs/direction.md) on the calibration text with its own next tokens
as labels (`compare(..., extra="all")` and stats.direction), and the model's entry carries "calibration_windows": every candidate's per-window
sum and token count, so an analysis can resample the calibration windows (metric = sum of
the drawn windows' sums / sum of their counts). Variants: round-to-nearest (symmetric or asymmetric, per group of input
columns or per output channel) at 2 to 8 bits of every linear layer's weights, some also
quantizing lm_head and the embeddings, and float16 / bfloat16 casts of the weights (one also
running in bfloat16). Deterministic: no random draws. Needs torch, transformers and
sentencepiece; about 3 minutes of CPU time on 2 cores (13 minutes wall on the shared
development VM, Intel Xeon, 2 cores, while other jobs ran).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import time
from pathlib import Path

import numpy as np

WINDOW = 256
CAL_WINDOWS = 12
TASK_WINDOWS = 16
CONTEXT = 32          # positions before this in a window are context only
TOKACC_STRIDE = 5
TOP_K = 5
LINE_HEAD = 2         # tokens of the line given in the prompt
LINE_TAIL = 2         # tokens to complete (fewer when the line ends first)
NEWLINE_PIECE = "<0x0A>"
# docs/direction.md's candidates, in its order (kld_mean is the baseline)
DIRECTION_METRICS = ("kld_mean", "dnll_mean", "dnll_harm", "flip_harm", "flip_net", "top5_net",
                     "margin_harm", "tvd_mean", "jsd_mean", "kld_confident")

# (name, bits, group (0: per output channel), symmetric, also lm_head and embeddings)
RTN = [
    ("w8g128s", 8, 128, True, False), ("w8pcs", 8, 0, True, False), ("w8g128s+he", 8, 128, True, True),
    ("w6g128s", 6, 128, True, False), ("w6g128a", 6, 128, False, False), ("w6pca", 6, 0, False, False),
    ("w5g64s", 5, 64, True, False), ("w5g64a", 5, 64, False, False), ("w5pcs", 5, 0, True, False),
    ("w4g32s", 4, 32, True, False), ("w4g32a", 4, 32, False, False), ("w4g128s", 4, 128, True, False),
    ("w4g128a", 4, 128, False, False), ("w4pcs", 4, 0, True, False), ("w4pca", 4, 0, False, False),
    ("w4g32a+he", 4, 32, False, True), ("w4g128s+he", 4, 128, True, True),
    ("w3g32a", 3, 32, False, False), ("w3g64s", 3, 64, True, False), ("w3g128a", 3, 128, False, False),
    ("w3pcs", 3, 0, True, False), ("w3g64a+he", 3, 64, False, True),
    ("w2g16a", 2, 16, False, False), ("w2g32a", 2, 32, False, False), ("w2g64a", 2, 64, False, False),
    ("w2g64s", 2, 64, True, False), ("w2g128s", 2, 128, True, False), ("w2pcs", 2, 0, True, False),
    ("w2g32a+he", 2, 32, False, True), ("w3pca+he", 3, 0, False, True),
]
CASTS = [("fp16", "float16", False), ("bf16", "bfloat16", False), ("bf16-act", "bfloat16", True)]


def rtn(w, bits: int, group: int, symmetric: bool):
    """Round-to-nearest fake quantization of a [out, in] weight, per group of `group` input
    columns (0: one group per output row), returned dequantized in float32."""
    import torch

    out_f, in_f = w.shape
    g = in_f if group == 0 else group
    x = w.float().reshape(out_f, in_f // g, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
        q = torch.clamp(torch.round(x / scale), -qmax - 1, qmax)
        deq = q * scale
    else:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
        deq = (q - zero) * scale
    return deq.reshape(out_f, in_f)


def bits_per_weight(bits: int, group: int, symmetric: bool, in_f: int) -> float:
    """Storage per weight: the code, an fp16 scale per group and, asymmetric, a zero point."""
    g = in_f if group == 0 else group
    return bits + 16 / g + (0 if symmetric else bits / g)


_LOADED = {}


def load(model_dir: Path):
    """A fresh float32 copy of the model (read from disk once)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    if model_dir not in _LOADED:
        _LOADED[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return copy.deepcopy(_LOADED[model_dir])


def variant_models(model_dir: Path):
    """(name, model, bpw, size in GB) for every variant; each model built fresh from disk."""
    import torch

    for name, bits, group, sym, head in RTN:
        m = load(model_dir)
        n_weights, n_bits = 0, 0.0
        for mod_name, mod in m.named_modules():
            is_head = mod_name.endswith("lm_head")
            if isinstance(mod, torch.nn.Linear) and (head or not is_head):
                w = mod.weight.data
                mod.weight.data = rtn(w, bits, group, sym)
                n_weights += w.numel()
                n_bits += w.numel() * bits_per_weight(bits, group, sym, w.shape[1])
            elif isinstance(mod, torch.nn.Embedding) and head:
                w = mod.weight.data
                mod.weight.data = rtn(w, bits, group, sym)
                n_weights += w.numel()
                n_bits += w.numel() * bits_per_weight(bits, group, sym, w.shape[1])
        total = sum(p.numel() for p in m.parameters())
        size_bits = n_bits + (total - n_weights) * 16  # the rest kept in 16 bits
        yield name, m, size_bits / total, size_bits / 8 / 1e9
    for name, dtype, compute in CASTS:
        m = load(model_dir)
        dt = getattr(torch, dtype)
        if compute:
            m = m.to(dt)
        else:
            for p in m.parameters():
                p.data = p.data.to(dt).float()
        total = sum(p.numel() for p in m.parameters())
        yield name, m, 16.0, total * 2 / 1e9


def logits_of(model, windows: np.ndarray) -> np.ndarray:
    """float32 [windows * WINDOW, vocab] logits, teacher-forced."""
    import torch

    with torch.no_grad():
        out = []
        for chunk in np.array_split(windows, max(1, len(windows) // 4)):
            out.append(model(torch.from_numpy(chunk).long()).logits.float().numpy())
    return np.concatenate(out).reshape(-1, out[0].shape[-1])


def windows_from(tokens: np.ndarray, start: int, n: int) -> np.ndarray:
    """n consecutive windows of WINDOW + 1 tokens (inputs and their next tokens)."""
    need = n * WINDOW + 1
    seg = tokens[start:start + need]
    if seg.size < need:
        raise SystemExit(f"eval text too short: need {need} tokens from {start}, have {seg.size}")
    return np.stack([seg[i * WINDOW:(i + 1) * WINDOW + 1] for i in range(n)])


def task_prompts(inputs: np.ndarray, newline: int):
    """{task: [(prompt_id, positions scored, their target tokens)]}: positions index the
    flattened [windows * WINDOW] logits; the target of position j is the token after it."""
    tok, line = [], []
    for w, row in enumerate(inputs):
        x, y = row[:-1], row[1:]
        for j in range(CONTEXT, WINDOW, TOKACC_STRIDE):
            tok.append((f"w{w}p{j}", [w * WINDOW + j], [int(y[j])]))
        for j in range(CONTEXT, WINDOW):
            if x[j - 1] != newline or x[j] == newline:
                continue  # a line starts at j (and is not empty)
            head_end = j + LINE_HEAD - 1  # the last given token of the line
            pos = []
            for k in range(head_end, min(head_end + LINE_TAIL, WINDOW)):
                if x[k] == newline and k > head_end - 1:
                    break  # the line ended within the given part
                pos.append(k)
                if y[k] == newline:
                    break  # completing the newline ends the line
            if len(pos) < 2 or any(x[k] == newline for k in range(j, head_end + 1)):
                continue
            line.append((f"w{w}l{j}", [w * WINDOW + k for k in pos], [int(y[k]) for k in pos]))
    return {"tokacc5": tok, "linecomp": line}


def score(logits: np.ndarray, prompts) -> dict[str, dict[str, int]]:
    out = {}
    for task, items in prompts.items():
        s = {}
        for pid, pos, tgt in items:
            rows = logits[pos]
            if task == "tokacc5":
                top = np.argpartition(-rows[0], TOP_K)[:TOP_K]
                s[pid] = int(tgt[0] in top)
            else:
                s[pid] = int(np.all(rows.argmax(axis=1) == np.array(tgt)))
        out[task] = s
    return out


def direction_summary(ts) -> tuple[dict, dict]:
    """(the candidates over the whole calibration text, from stats.direction's
    summarize_direction; their per-window sums and token counts, from its per-token
    direction_values): the window sums over the counts give back the whole-text figures."""
    from fidelity_kld.stats.direction import direction_values, summarize_direction

    per_token = direction_values(ts) | {"kld_mean": np.where(ts.valid, ts.kld, np.nan)}
    whole = summarize_direction(ts) | {"kld_mean": float(np.mean(ts.kld[ts.valid]))}
    windows = {}
    for name in DIRECTION_METRICS:
        v = per_token[name].reshape(-1, WINDOW)
        counted = ~np.isnan(v)
        windows[name] = {"sum": [float(x) for x in np.where(counted, v, 0.0).sum(axis=1)],
                         "n": [int(x) for x in counted.sum(axis=1)]}
    return {name: whole[name] for name in DIRECTION_METRICS}, {"tokens": WINDOW, "metrics": windows}


def per_prompt_kld(kld: np.ndarray, prompts) -> list[tuple[str, str, float]]:
    return [(task, pid, float(np.mean(kld[pos]))) for task, items in prompts.items() for pid, pos, _ in items]


def write_gz_csv(path: Path, header, rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    # mtime 0: the same data gives the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        fh.write(buf.getvalue().encode())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="../shared/fixtures/tiny-llama", type=Path)
    ap.add_argument("--out", default="tests/data/fixture_cohort", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import sentencepiece as spm
    import torch

    import fidelity_kld as fk

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sp = spm.SentencePieceProcessor(model_file=str(args.model / "tokenizer.model"))
    tokens = np.array(sp.encode((args.model / "eval.txt").read_text(encoding="utf-8")), np.int64)
    newline = sp.piece_to_id(NEWLINE_PIECE)
    cal = windows_from(tokens, 0, CAL_WINDOWS)
    assert cal.size < 0.4 * tokens.size
    task = windows_from(tokens, tokens.size // 2, TASK_WINDOWS)
    prompts = task_prompts(task, newline)
    cal_labels = cal[:, 1:].reshape(-1)

    ref = load(args.model)
    ref_cal, ref_task = logits_of(ref, cal[:, :-1]), logits_of(ref, task[:, :-1])
    outcomes = [("reference", t, pid, v) for t, s in score(ref_task, prompts).items() for pid, v in s.items()]
    del ref

    out = args.out
    (out / "per_prompt").mkdir(parents=True, exist_ok=True)
    summaries, entries = [], []
    for name, model, bpw, size_gb in variant_models(args.model):
        q_cal, q_task = logits_of(model, cal[:, :-1]), logits_of(model, task[:, :-1])
        del model
        ts = fk.compare(ref_cal, q_cal, cal_labels, extra="all")
        summary = fk.summarize(ts)
        direction, cal_windows = direction_summary(ts)
        summaries.append({"name": name, "summary": summary.to_dict() | {"direction": direction},
                          "calibration_windows": cal_windows})
        outcomes += [(name, t, pid, v) for t, s in score(q_task, prompts).items() for pid, v in s.items()]
        kld = fk.compare(ref_task, q_task).kld
        write_gz_csv(out / "per_prompt" / f"{name}.csv.gz", ("task", "prompt_id", "kld_mean"),
                     [(t, pid, f"{v:.6g}") for t, pid, v in per_prompt_kld(kld, prompts)])
        entries.append((name, bpw, size_gb))
        print(f"{name:>12}: KLD {summary.kld.mean:.3g}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    with open(out / "summary.json", "w", encoding="utf-8") as fh:
        json.dump({"fidelity_kld_version": fk.__version__, "reference": {"path": "tiny-llama (float32)"},
                   "calibration": f"eval.txt tokens 0-{cal.size}: {CAL_WINDOWS} windows of {WINDOW}",
                   "direction_source": "fidelity_kld.compare(extra='all'), stats.direction",
                   "models": summaries}, fh, indent=1)
    write_gz_csv(out / "outcomes.csv.gz", ("model", "task", "prompt_id", "score"), outcomes)
    lines = ["# A real cohort from the fixture model: round-to-nearest quantizations of the",
             "# tiny-llama fixture, two tasks with per-prompt pass/fail outcomes, calibration-set",
             "# fidelity. Generated by scripts/make_fixture_cohort.py (deterministic); see its",
             "# docstring for what each task and variant is.",
             'name = "tiny-llama RTN quants (fixture)"',
             'fidelity = "summary.json"', 'outcomes = "outcomes.csv.gz"',
             f"weights = {{ linecomp = {len(prompts['linecomp'])}, tokacc5 = {len(prompts['tokacc5'])} }}"
             "  # by task size", "",
             "# docs/direction.md's hold-out: prompts grouped by task window (w<W>...), alternate windows",
             "direction_groups = '^w(\\d+)'", "",
             "[reference]", 'name = "reference"', ""]
    for name, bpw, size_gb in entries:
        lines += ["[[models]]", f'name = "{name}"', f"bpw = {bpw:.3f}", f"size_gb = {size_gb:.6f}",
                  f'per_prompt = "per_prompt/{name}.csv.gz"', ""]
    (out / "manifest.toml").write_text("\n".join(lines), encoding="utf-8")
    print(f"{len(entries)} variants, tasks: " + ", ".join(f"{t} {len(v)} prompts" for t, v in prompts.items())
          + f"; written to {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
