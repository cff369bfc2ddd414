"""Per-call Python overhead of the streaming API on batches small enough that the kernel's
own time is negligible (target: under 50 µs of Python per call).

Each case is timed call by call (perf_counter around one call, many calls, median). The
floor is the compiled core called directly with preallocated outputs on the same rows;
"python µs" is a case's median minus the floor's median for the same number of tokens,
i.e. what ops.py / stats/summary.py add on top of the C++ call.

    python benchmarks/bench_api_overhead.py [--calls 3000] [--vocab 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import fidelity_kld as fk
from fidelity_kld import _core, bench

SHAPES = ((1, 1), (1, 32), (8, 32))  # (batch, seq) -> batch*seq tokens


def per_call_us(fn, calls: int, warmup: int = 200) -> tuple[float, float]:
    """(median, 10th percentile) of single-call times in µs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e6 * statistics.median(times), 1e6 * times[len(times) // 10]


def core_floor(a: np.ndarray, b: np.ndarray, y: np.ndarray | None, threads: int):
    """The compiled core on preallocated outputs: what any Python front end must pay."""
    n = a.shape[0]
    out = {k: np.empty(n) for k in ("kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref")}
    out["top1_ref"] = np.empty(n, np.int32)
    out["top1_q"] = np.empty(n, np.int32)
    for k in ("nll_ref", "nll_q", "p_ref_y", "p_q_y"):
        out[k] = np.empty(n) if y is not None else None
    out["kld_llama"] = None

    def call():
        _core.logit_stats(a, "float32", b, "float32", a.shape[1], labels=y, llama_parity=False,
                          threads=threads, simd="auto", **out)
    return call


def cases(batch: int, seq: int, vocab: int, rng, torch):
    n = batch * seq
    a3 = rng.standard_normal((batch, seq, vocab)).astype(np.float32)
    b3 = (a3 + 0.1 * rng.standard_normal(a3.shape)).astype(np.float32)
    y2 = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), bool)
    mask[:, seq - seq // 4:] = False if seq > 1 else True  # right padding on longer batches
    pids = np.arange(batch)
    a, b, y = a3.reshape(n, vocab), b3.reshape(n, vocab), y2.reshape(n).astype(np.int64)
    acc = fk.Accumulator()
    out = [
        ("core floor (labels)", core_floor(a, b, y, 0)),
        ("compare(numpy, labels)", lambda: fk.compare(a, b, y)),
        ("compare(numpy)", lambda: fk.compare(a, b)),
        ("Accumulator.add(numpy [N,V], labels)", lambda: acc.add(a, b, y)),
        ("Accumulator.add(numpy [B,T,V], labels, mask, prompt_ids)",
         lambda: acc.add(a3, b3, y2, mask=mask, prompt_ids=pids)),
    ]
    if torch is not None:
        ta3, tb3 = torch.from_numpy(a3), torch.from_numpy(b3)
        ty2, tmask, tpids = torch.from_numpy(y2), torch.from_numpy(mask), torch.from_numpy(pids)
        ha3, hb3 = ta3.bfloat16(), tb3.bfloat16()
        out += [
            ("Accumulator.add(torch f32 [B,T,V], labels, mask, prompt_ids)",
             lambda: acc.add(ta3, tb3, ty2, mask=tmask, prompt_ids=tpids)),
            ("Accumulator.add(torch bf16 [B,T,V], labels, mask, prompt_ids)",
             lambda: acc.add(ha3, hb3, ty2, mask=tmask, prompt_ids=tpids)),
            ("compare(torch f32 [N,V], labels)",
             lambda: fk.compare(ta3.reshape(n, vocab), tb3.reshape(n, vocab), ty2.reshape(n))),
        ]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        torch = None
    if args.no_torch:
        torch = None
    info = bench.machine()
    print(f"# {info['cpu']}, {info['cores']} cores, simd={info['simd']}, commit {info['commit']}, "
          f"{info['date']}, python {info['python']}, numpy {info['numpy']}"
          + (f", torch {torch.__version__}" if torch is not None else ""))
    print(f"# vocab {args.vocab}, {args.calls} timed calls per case, median per call")
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'shape':>10}  {'case':<62} {'median µs':>10} {'p10 µs':>8} {'python µs':>10}")
    for batch, seq in SHAPES:
        floor = None
        for name, fn in cases(batch, seq, args.vocab, rng, torch):
            med, p10 = per_call_us(fn, args.calls)
            if floor is None:
                floor = med
            over = med - floor
            rows.append({"batch": batch, "seq": seq, "tokens": batch * seq, "vocab": args.vocab,
                         "case": name, "median_us": med, "p10_us": p10,
                         "python_overhead_us": over})
            print(f"{f'{batch}x{seq}':>10}  {name:<62} {med:10.1f} {p10:8.1f} "
                  f"{'' if name.startswith('core') else f'{over:10.1f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
