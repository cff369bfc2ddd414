#!/usr/bin/env python
"""Generate the example cohort shipped in fidelity_kld/data/example_cohort/.

    python scripts/make_example_cohort.py [--out DIR] [--seed N]

A synthetic cohort, seeded and reproducible, built to show what `fidelity-kld cohort
--example` is for. It is not measured data. It plays out the pattern the 2026 study
"Displacement Is Not Direction" reports for real GGUF cohorts:

- 20 quantizations of a fictional "Example-8B" against its BF16 reference, with
  realistic bits per weight, sizes and a hidden damage level per quant.
- Benchmark outcomes on two tasks (gsm8k: 400 prompts, livecodebench: 200), one row per
  (model, task, prompt). Each prompt the reference solved breaks with a probability that
  grows with the damage; prompts it failed get fixed at a rate that keeps the expected net
  loss at 0.3 x damage^1.5 (relative) while the number of flips (volume) grows like the
  damage's square root. So heavily damaged quants lose score steadily with their KLD, while near-lossless
  ones differ from the reference by a few percent of flipped prompts that mostly cancel:
  the benchmark cannot rank them, and KLD tracks how much they moved, not which way.
- Fidelity summaries computed by the package itself: for each quant, synthetic logits
  (2048 tokens x 1024 vocabulary, perturbed with heavy-tailed noise scaled to the quant's
  damage times a measurement-noise factor) go through fidelity_kld.compare and summarize,
  and are written in the shape `fidelity-kld compare --output` uses.
- Per-prompt fidelity for livecodebench (compare's per-prompt Parquet columns), a
  per-prompt KLD that barely depends on whether the prompt flipped.
- An extra variant given in the manifest (kld_code_ctx8k: KLD on a code corpus at 8k
  context), noisier still.

Files: manifest.toml, summary.json, outcomes.csv.gz, per_prompt/<quant>.parquet (a few
hundred KB in all).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "python" / "fidelity_kld" / "data" / "example_cohort"
# Cohorts of 20 are noisy: across seeds 1-30 the zone rho ranges from -0.8 to +0.45 (seeds 1-30
# were tried with these parameters). The default is the first seed where the example shows the
# pattern cleanly: full-cohort rho below -0.7, zone rho near 0 at every threshold, the null
# explaining it. Other seeds are as legitimate, and a useful reminder of how wide a zone's
# sampling distribution is.
SEED = 5
PARAMS_B = 8.03  # parameters, billions

# name, bits per weight, hidden damage (roughly the mean KLD in nats a quant of an 8B model shows)
QUANTS = [
    ("Q8_0", 8.50, 0.0012), ("Q6_K", 6.56, 0.0045), ("Q5_K_M", 5.68, 0.010), ("Q5_K_S", 5.52, 0.012),
    ("Q5_0", 5.54, 0.015), ("Q4_K_M", 4.89, 0.022), ("IQ4_NL", 4.68, 0.025), ("IQ4_XS", 4.46, 0.028),
    ("Q4_K_S", 4.58, 0.030), ("Q4_0", 4.55, 0.045), ("Q3_K_L", 4.27, 0.060), ("Q3_K_M", 3.91, 0.080),
    ("IQ3_M", 3.66, 0.085), ("IQ3_XS", 3.50, 0.110), ("Q3_K_S", 3.50, 0.140), ("IQ3_XXS", 3.21, 0.160),
    ("Q2_K", 3.00, 0.300), ("IQ2_M", 2.93, 0.330), ("IQ2_XS", 2.60, 0.500), ("IQ2_XXS", 2.40, 0.750),
]
TASKS = {"gsm8k": (400, 0.78), "livecodebench": (200, 0.42)}  # prompts, reference pass rate
DROP = 0.30             # relative score lost: DROP * damage**1.5 (negligible below ~0.1 nat)
VOLUME_SCALE = 0.20     # flip volume = VOLUME_SCALE * sqrt(damage)
TOKENS, VOCAB = 2048, 1024


def outcomes(rng, damage):
    """{task: (1 + N, P) pass/fail}: reference first; and {task: prompt difficulty}."""
    out, difficulties = {}, {}
    for task, (p, base) in TASKS.items():
        difficulty = rng.normal(size=p)
        difficulties[task] = difficulty
        ref = (difficulty < _ppf(base)).astype(np.int8)
        # how easily a prompt flips: the same prompts are fragile for every quant
        fragility = rng.lognormal(0.0, 0.8, size=p)
        fragility /= fragility.mean()
        rows = [ref]
        for k in damage:
            volume = VOLUME_SCALE * math.sqrt(k)
            net = DROP * k**1.5 * base               # expected net loss, absolute
            c2w = (volume + net) / 2 / base          # so that c2w*base - w2c*(1-base) = -net
            w2c = max(volume - net, 0.0) / 2 / (1 - base)
            u = rng.random(p)
            flip = np.where(ref == 1, u < np.minimum(c2w * fragility, 1), u < np.minimum(w2c * fragility, 1))
            rows.append(np.where(flip, 1 - ref, ref).astype(np.int8))
        out[task] = np.array(rows)
    return out, difficulties


def _ppf(q):
    from scipy.stats import norm

    return norm.ppf(q)


def fidelity_summaries(rng, damage):
    """Summary.to_dict() per quant, from the package's own kernel on synthetic logits."""
    import fidelity_kld as fk

    ref = rng.normal(0.0, 2.5, size=(TOKENS, VOCAB)).astype(np.float32)
    p = np.exp(ref - ref.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(VOCAB, p=row) for row in p[:, :]], dtype=np.int32)
    out = []
    for k in damage:
        measured = k * math.exp(rng.normal(0.0, 0.15))     # a metric sees the damage noisily
        # heavy-tailed per-token noise: most tokens barely move, a few move a lot
        scale = rng.lognormal(0.0, 1.0, size=(TOKENS, 1))
        noise = rng.normal(size=(TOKENS, VOCAB)) * scale
        sigma = _calibrate(ref, noise, measured)
        q = (ref + sigma * noise).astype(np.float32)
        out.append(fk.summarize(fk.compare(ref, q, labels)).to_dict())
    return out


def _calibrate(ref, noise, target):
    """The noise scale that gives mean KLD = target (KLD grows like sigma^2 for small sigma)."""
    import fidelity_kld as fk

    sigma = math.sqrt(2 * target) / 2.5
    for _ in range(6):
        got = float(np.mean(fk.compare(ref, (ref + sigma * noise).astype(np.float32)).kld))
        sigma *= math.sqrt(target / got)
    return sigma


def per_prompt(rng, damage, lcb_scores, difficulty, prompt_ids):
    """compare's per-prompt columns for livecodebench: per-prompt KLD is the quant's KLD times a
    prompt effect shared by all quants (slightly larger on hard prompts, where the reference
    is less sure of itself), noise, and a small bump where the prompt flipped."""
    ref = lcb_scores[0]
    p = ref.size
    prompt_effect = 0.6 * (0.12 * difficulty + math.sqrt(1 - 0.12**2) * rng.normal(size=p))
    n_tokens = rng.integers(200, 1200, size=p)
    out = []
    for i, k in enumerate(damage):
        flipped = lcb_scores[i + 1] != ref
        log_kld = math.log(k) + prompt_effect + rng.normal(0.0, 0.5, size=p) + 0.12 * flipped - 0.3
        kld = np.exp(log_kld)
        out.append({
            "prompt_id": prompt_ids,
            "n_tokens": n_tokens.astype(np.int32),
            "kld_mean": kld.astype(np.float32),
            "kld_max": (kld * rng.lognormal(3.0, 0.5, size=p)).astype(np.float32),
            "top1_agree": np.clip(1 - 0.35 * np.sqrt(kld) * rng.lognormal(0, 0.2, size=p), 0, 1).astype(np.float32),
        })
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(args.seed)
    names = [q[0] for q in QUANTS]
    damage = np.array([q[2] for q in QUANTS])
    out = args.out
    (out / "per_prompt").mkdir(parents=True, exist_ok=True)

    scores, difficulty = outcomes(rng, damage)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "task", "prompt_id", "score"])
    for task, s in scores.items():
        for row, name in zip(s, ["BF16", *names]):
            for pid, v in enumerate(row):
                w.writerow([name, task, pid, int(v)])
    # mtime=0: the same seed gives byte-identical files
    with open(out / "outcomes.csv.gz", "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue().encode())

    summaries = fidelity_summaries(rng, damage)
    doc = {"fidelity_kld_version": "example", "reference": {"path": "Example-8B-BF16.gguf"},
           "models": [{"name": n, "path": f"Example-8B-{n}.gguf", "summary": s} for n, s in zip(names, summaries)]}
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")

    lcb_ids = np.arange(TASKS["livecodebench"][0], dtype=np.int64)
    for name, cols in zip(names, per_prompt(rng, damage, scores["livecodebench"],
                                                difficulty["livecodebench"], lcb_ids)):
        pq.write_table(pa.table(cols), out / "per_prompt" / f"{name}.parquet", compression="zstd")

    code_kld = damage * 1.3 * np.exp(rng.normal(0.0, 0.25, size=damage.size))
    lines = [
        "# The example cohort for `fidelity-kld cohort --example`: synthetic, generated by",
        "# scripts/make_example_cohort.py (seeded). Not measured data.",
        'name = "Example-8B GGUF quants (synthetic)"',
        'fidelity = "summary.json"',
        'outcomes = "outcomes.csv.gz"',
        "weights = { gsm8k = 1.0, livecodebench = 1.0 }",
        "",
        "[reference]",
        'name = "BF16"',
    ]
    for (name, bpw, _), ck in zip(QUANTS, code_kld):
        lines += ["", "[[models]]", f'name = "{name}"', f"bpw = {bpw}",
                  f"size_gb = {bpw * PARAMS_B / 8:.2f}",
                  f'per_prompt = {{ livecodebench = "per_prompt/{name}.parquet" }}',
                  f"variants = {{ kld_code_ctx8k = {ck:.5g} }}"]
    (out / "manifest.toml").write_text("\n".join(lines) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
