"""Hidden-state dumps scored through the lm_head on the CPU: tokens/s of the full path
(fidelity_kld.hidden.compare_hidden: float32 BLAS product into bounded tiles, then the fused
core) against the BLAS product alone on the same tiles, in the same run; and, with --peak,
the peak RSS of the path on a dump whose full logits would exceed 4 GB.

    python benchmarks/bench_hidden.py                       # H = 4096, V = 152064
    python benchmarks/bench_hidden.py --peak                # H = 64, V = 152064, 7000 tokens

Synthetic weights and hidden states (normal, scaled so logits have a realistic spread); the
reference and the quant share the lm_head (two products per token either way). Medians of
--repeats runs, the two measurements interleaved. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_dumps(directory: str, n: int, h: int, v: int, seed: int = 0):
    from fidelity_kld.io.hidden import write_hidden

    rng = np.random.default_rng(seed)
    w = np.empty((v, h), np.float32)
    for s in range(0, v, 8192):  # in blocks: a float64 temporary of V x H would be 5 GB
        w[s:s + 8192] = rng.standard_normal((min(8192, v - s), h), dtype=np.float32) * (3 / np.sqrt(h))
    hid = rng.standard_normal((n, h), dtype=np.float32)
    ref = write_hidden(os.path.join(directory, "ref.hidden.safetensors"), hid, lm_head=w)
    q = write_hidden(os.path.join(directory, "q.hidden.safetensors"),
                     hid + rng.standard_normal((n, h), dtype=np.float32) * 0.05, lm_head=w)
    return ref, q


def speed(args) -> dict:
    from fidelity_kld.hidden import TILE_BYTES, apply_head, compare_hidden, heads_for
    from fidelity_kld.io.hidden import HiddenDump

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ref_path, q_path = make_dumps(tmp, args.tokens, args.hidden, args.vocab)
        ref, q = HiddenDump(ref_path), HiddenDump(q_path)
        heads = heads_for(ref, [q])
        rows = max(1, TILE_BYTES // (2 * args.vocab * 4))
        tile = np.empty((rows, args.vocab), np.float32)
        compare_hidden(ref, [q], heads)  # warm-up: pages of the dumps and the weights
        full, blas = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            compare_hidden(ref, [q], heads)
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for start in range(0, ref.n_tokens, rows):
                stop = min(start + rows, ref.n_tokens)
                for d, head in ((ref, heads[0]), (q, heads[1])):
                    apply_head(d.rows(start, stop), head, tile[:stop - start])
            blas.append(time.perf_counter() - t0)
    t_full, t_blas = float(np.median(full)), float(np.median(blas))
    flops = 2 * 2 * args.tokens * args.hidden * args.vocab
    return {"case": "speed", "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
            "tile_rows": rows, "repeats": args.repeats,
            "full_path_s": t_full, "blas_only_s": t_blas,
            "full_path_tokens_per_s": args.tokens / t_full, "blas_only_tokens_per_s": args.tokens / t_blas,
            "blas_gflops": flops / t_blas / 1e9, "full_over_blas_rate": t_blas / t_full}


PEAK = """
import sys, time
from fidelity_kld.hidden import compare_hidden, heads_for
from fidelity_kld.io.hidden import HiddenDump
r, q = HiddenDump(sys.argv[1]), HiddenDump(sys.argv[2])
t0 = time.perf_counter()
st = compare_hidden(r, [q], heads_for(r, [q]))[0]
dt = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(int(hwm.split()[1]) * 1024, dt, float(st.kld.mean()))
"""


def peak(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ref_path, q_path = make_dumps(tmp, args.tokens, args.hidden, args.vocab)
        out = subprocess.run([sys.executable, "-c", PEAK, ref_path, q_path], check=True,
                             capture_output=True, text=True).stdout.split()
    rss, seconds = int(out[0]), float(out[1])
    return {"case": "peak", "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
            "logits_per_dump_bytes": args.tokens * args.vocab * 4, "peak_rss_bytes": rss,
            "seconds": seconds, "tokens_per_s": args.tokens / seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peak", action="store_true", help="peak-RSS case instead of the speed case")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args()
    if args.peak:
        args.tokens = args.tokens or 7000
        args.hidden = args.hidden or 64
        res = peak(args)
        print(f"{res['tokens']} tokens x V {res['vocab']} (H {res['hidden']}): logits would be "
              f"{res['logits_per_dump_bytes'] / 1e9:.2f} GB per dump; peak RSS "
              f"{res['peak_rss_bytes'] / 2**20:.0f} MiB; {res['tokens_per_s']:.0f} tokens/s")
    else:
        args.tokens = args.tokens or 256
        args.hidden = args.hidden or 4096
        res = speed(args)
        print(f"H {res['hidden']}, V {res['vocab']}, {res['tokens']} tokens, 2 models: full path "
              f"{res['full_path_tokens_per_s']:.1f} tokens/s, BLAS product alone "
              f"{res['blas_only_tokens_per_s']:.1f} tokens/s ({res['blas_gflops']:.0f} GFLOP/s); "
              f"full path at {100 * res['full_over_blas_rate']:.0f}% of the product's rate")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
