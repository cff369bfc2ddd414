"""Fused logit statistics on the CPU: the core (1 and all threads) against a blocked float32
numpy baseline and a read-bandwidth roofline, all measured in this process.

    python benchmarks/bench_logit_stats.py [--n 2048] [--vocab 32000 128256 152064]
        [--dtype float32 float16 bfloat16] [--threads 1 2] [--simd auto|scalar|avx2|avx512|neon]
        [--other-core OLD/_core.so] [--extra top2 label tvd jsd all] [--json out.json]

--other-core loads a second build of the compiled core (say, the previous commit's, built
with `cmake -S OLD -B OLD/build -DSKBUILD=ON ...`) into the same process and times it on the
same inputs, its runs alternating with this build's, so that both see the same machine load:
the `x other` column is this build's rate over that one's.

--extra also times the call with each optional output group on (issue 16; compare's
`extra=`), alternating with the same call with them off, every call with labels (the
"label" group needs them): the `cost` lines are each group's time over the off call's.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import time

import numpy as np

from fidelity_kld import _core, bench
from fidelity_kld.ops import _new_extra, extra_outputs


def load_core(path: str):
    """Another build of the compiled module, under its own name (its init symbol is _core's)."""
    loader = importlib.machinery.ExtensionFileLoader("fk_other._core", path)
    spec = importlib.util.spec_from_file_location("fk_other._core", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def outputs(n: int) -> dict:
    f = lambda: np.empty(n, np.float64)  # noqa: E731
    return {"kld": f(), "kld_reverse": f(), "lse_ref": f(), "lse_q": f(), "entropy_ref": f(),
            "top1_ref": np.empty(n, np.int32), "top1_q": np.empty(n, np.int32)}


def measure_pair(fns, repeats: int) -> list[bench.Timing]:
    """Medians of the callables' times, run in turn (one warm-up each) so load hits all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [bench.Timing.of(ts) for ts in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--vocab", type=int, nargs="+", default=list(bench.REAL_VOCABS))
    ap.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 and all cores)")
    ap.add_argument("--simd", default="auto", help="SIMD path of both builds (default: the best)")
    ap.add_argument("--other-core", help="path of another build's _core*.so, timed alongside")
    ap.add_argument("--baseline-rows", type=int, default=128,
                    help="rows the (slow) numpy baseline runs on; its rate is per byte")
    ap.add_argument("--extra", nargs="+", default=[],
                    help="optional output groups to time, each against the call without them")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    cores = os.cpu_count() or 1
    threads_list = sorted(set(args.threads or {1, cores}))
    info = bench.machine()
    simd = _core.active_simd_level() if args.simd == "auto" else args.simd
    other = load_core(args.other_core) if args.other_core else None
    print(f"# {info['cpu']}, {cores} cores, simd={simd}, commit {info['commit']}, {info['date']}"
          + (f"; other core: {args.other_core}" if other else ""))
    roof = {t: bench.read_roofline(1 << 30, t) for t in threads_list}
    print("# read roofline: " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in roof.items()))
    rng = np.random.default_rng(0)
    rows, base, ratios, costs = [], {}, [], []
    for dtype in args.dtype:
        for v in args.vocab:
            a, b = bench.random_logits(rng, args.n, v, dtype)
            nbytes = a.nbytes + b.nbytes
            out = outputs(args.n)
            for threads in threads_list:
                fns = [lambda: _core.logit_stats(a, dtype, b, dtype, v, threads=threads,
                                                 simd=args.simd, **out)]
                if other:
                    fns.append(lambda: other.logit_stats(a, dtype, b, dtype, v, threads=threads,
                                                         simd=args.simd, **out))
                if args.extra:  # off with labels, then each group on, all alternating
                    y = rng.integers(0, v, args.n)
                    extras = {g: _new_extra(args.n, extra_outputs(g, True)) for g in args.extra}
                    out_y = {**out, **{k: np.empty(args.n) for k in ("nll_ref", "nll_q", "p_ref_y", "p_q_y")}}
                    fns.append(lambda: _core.logit_stats(a, dtype, b, dtype, v, labels=y, threads=threads,
                                                         simd=args.simd, **out_y))
                    fns += [lambda e=e: _core.logit_stats(a, dtype, b, dtype, v, labels=y, threads=threads,
                                                          simd=args.simd, **out_y, extra=e)
                            for e in extras.values()]
                timings = measure_pair(fns, args.repeats)
                if args.extra:
                    off = timings[-1 - len(args.extra)]
                    rows.append(bench.row("logit_stats", f"{simd}+labels", dtype,
                                          args.n, v, threads, off, nbytes))
                    for g, t in zip(args.extra, timings[-len(args.extra):]):
                        rows.append(bench.row("logit_stats", f"{simd}+labels+{g}",
                                              dtype, args.n, v, threads, t, nbytes))
                        costs.append((dtype, v, threads, g, t.median_s / off.median_s))
                r = bench.row("logit_stats", f"fidelity_kld/{simd}", dtype, args.n, v, threads,
                              timings[0], nbytes, roofline_pct=100 * nbytes / timings[0].median_s / 1e9 / roof[threads])
                rows.append(r)
                if other:
                    o = bench.row("logit_stats", f"other/{simd}", dtype, args.n, v, threads,
                                  timings[1], nbytes)
                    rows.append(o)
                    ratios.append((dtype, v, threads, r.gb_per_s / o.gb_per_s))
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
            del a, b
    print(bench.format_table(rows, roofline=roof[threads_list[-1]], baseline=base))
    print("# %roof is against the last thread count's roofline; per thread count:")
    for r in rows:
        if "roofline_pct" in r.extra:
            print(f"#   {r.dtype:<9}V={r.vocab:<7} {r.threads} thread(s): {r.extra['roofline_pct']:.0f}% of "
                  f"{roof[r.threads]:.1f} GB/s")
    for dtype, v, threads, x in ratios:
        print(f"# this build / other: {dtype:<9}V={v:<7} {threads} thread(s): {x:.2f}x")
    for dtype, v, threads, g, x in costs:
        print(f"# cost of extra={g!r}: {dtype:<9}V={v:<7} {threads} thread(s): {x:.2f}x the time "
              "of the same call without it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "simd": simd, "other_core": args.other_core,
                       "roofline_gb_s": roof, "rows": [r.as_dict() for r in rows],
                       "ratio_vs_other": [{"dtype": d, "vocab": v, "threads": t, "ratio": x}
                                          for d, v, t, x in ratios],
                       "extra_cost": [{"dtype": d, "vocab": v, "threads": t, "group": g,
                                       "time_ratio": x} for d, v, t, g, x in costs]},
                      f, indent=2)


if __name__ == "__main__":
    main()
