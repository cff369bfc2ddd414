"""Peak resident memory of `fidelity-kld compare` on two large float16 .npy dumps.

Writes two dumps of --gb GB each (default 8: 2 x 8 GB), runs the CLI on them under
/usr/bin/time -v, prints the peak RSS (and wall time, tokens/s, GB/s of input read) and
deletes the dumps. The issue's bound: under 1 GB of peak RSS for 2 x 8 GB.

    python benchmarks/bench_memory.py                    # 2 x 8 GB in /tmp
    python benchmarks/bench_memory.py --gb 1 --dir /dev/shm

The dumps are a random block rolled along the vocabulary (cheap to write, not constant),
vocabulary 128256 (Llama 3). The page cache is not dropped: what does not fit in RAM is read
from disk. The result is printed as one JSON line too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_npy(path: Path, n: int, vocab: int, seed: int) -> None:
    block = np.random.default_rng(seed).normal(0, 2, size=(64, vocab)).astype(np.float16)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f2", "fortran_order": False, "shape": (n, vocab)})
        for start in range(0, n, 64):
            f.write(np.roll(block, start * 7, axis=1)[: min(64, n - start)].tobytes())


def cli_command() -> list[str]:
    exe = shutil.which("fidelity-kld") or str(Path(sys.executable).with_name("fidelity-kld"))
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "fidelity_kld"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=8.0, help="size of each dump in GB (1e9 bytes)")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dir", default="/tmp", help="where to write the dumps")
    p.add_argument("--keep", action="store_true", help="do not delete the dumps afterwards")
    args = p.parse_args()

    n = int(args.gb * 1e9) // (2 * args.vocab)
    work = Path(args.dir) / f"fk_bench_memory_{os.getpid()}"
    work.mkdir(parents=True)
    ref, q = work / "ref.npy", work / "q.npy"
    try:
        t0 = time.monotonic()
        write_npy(ref, n, args.vocab, 0)
        write_npy(q, n, args.vocab, 1)
        size = ref.stat().st_size + q.stat().st_size
        print(f"wrote 2 x {ref.stat().st_size / 1e9:.2f} GB ({n} tokens x {args.vocab} float16) "
              f"in {time.monotonic() - t0:.0f} s", flush=True)
        cmd = ["/usr/bin/time", "-v", *cli_command(), "compare", str(ref), str(q), "-q",
               "--format", "json"]
        print("$ " + " ".join(cmd), flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIDELITY_KLD_")}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", r.stderr).group(1)
        seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
        summary = json.loads(r.stdout)["models"][0]["summary"]
        assert summary["n_tokens"] == n, summary["n_tokens"]
        result = {
            "input_bytes": size,
            "tokens": n,
            "vocab": args.vocab,
            "peak_rss_mib": peak_kb / 1024,
            "wall_s": seconds,
            "tokens_per_s": n / seconds,
            "input_gb_per_s": size / seconds / 1e9,
            "mean_kld": summary["kld"]["mean"],
        }
        print(f"peak RSS {peak_kb / 1024:.0f} MiB for 2 x {size / 2e9:.1f} GB of input "
              f"({'under' if peak_kb < 1024 * 1024 else 'OVER'} 1 GiB); "
              f"{seconds:.1f} s wall, {n / seconds:,.0f} tokens/s, {size / seconds / 1e9:.2f} GB/s")
        print(json.dumps(result))
        return 0 if peak_kb < 1024 * 1024 else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
