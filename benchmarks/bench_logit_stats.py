"""Fused logit statistics on the CPU: the core (1 and all threads) against a blocked float32
numpy baseline and a read-bandwidth roofline, all measured in this process.

    python benchmarks/bench_logit_stats.py [--n 2048] [--vocab 32000 128256 152064]
        [--dtype float32 float16 bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import fidelity_kld as fk
from fidelity_kld import bench


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--vocab", type=int, nargs="+", default=list(bench.REAL_VOCABS))
    ap.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"])
    ap.add_argument("--baseline-rows", type=int, default=128,
                    help="rows the (slow) numpy baseline runs on; its rate is per byte")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    cores = os.cpu_count() or 1
    info = bench.machine()
    print(f"# {info['cpu']}, {cores} cores, simd={info['simd']}, commit {info['commit']}, {info['date']}")
    roof = {t: bench.read_roofline(1 << 30, t) for t in sorted({1, cores})}
    print("# read roofline: " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in roof.items()))
    rng = np.random.default_rng(0)
    rows, base = [], {}
    for dtype in args.dtype:
        for v in args.vocab:
            a, b = bench.random_logits(rng, args.n, v, dtype)
            nbytes = a.nbytes + b.nbytes
            ref = fk.Logits(a, dtype, v)
            q = fk.Logits(b, dtype, v)
            for threads in sorted({1, cores}):
                t = bench.measure(lambda: fk.compare(ref, q, threads=threads), repeats=args.repeats)
                rows.append(bench.row("logit_stats", f"fidelity_kld/{info['simd']}", dtype,
                                      args.n, v, threads, t, nbytes))
            m = args.baseline_rows
            if dtype == "bfloat16":
                from fidelity_kld.reference import bf16_to_float32
                sub_a, sub_b = bf16_to_float32(a[:m]), bf16_to_float32(b[:m])
            else:
                sub_a, sub_b = a[:m], b[:m]
            t = bench.measure(lambda: bench.numpy_logit_stats(sub_a, sub_b), repeats=3)
            r = bench.row("logit_stats", "numpy-f32-blocked", dtype, m, v, 1, t,
                          a[:m].nbytes + b[:m].nbytes)
            rows.append(r)
            base[("logit_stats", dtype, v)] = r.gb_per_s
            del a, b, ref, q
    print(bench.format_table(rows, roofline=roof[cores], baseline=base))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "roofline_gb_s": roof, "rows": [r.as_dict() for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
