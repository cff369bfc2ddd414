"""Peak resident memory and speed of `fidelity-kld compare` on two large dumps, per format.

For each format (npy, safetensors, llama.cpp .kld, Arrow IPC, Parquet) and each as a
directory of shards, writes a reference and a quantized dump of --gb GB each (float16, or
llama.cpp's 16-bit rows), runs the CLI on them under /usr/bin/time -v, prints the peak RSS,
the wall time and GB/s of input (wall clock, the CLI's start included) and the CPU seconds
(user + system, every thread) per GB of input (less sensitive to a loaded machine than the
wall clock), deletes the dumps and goes on to the next format: one format's files on disk
at a time. A shard directory holds
--shards links to one shard file per side (the same bytes under several names: what the
process holds is measured as for distinct files, for a fraction of the writing).

    python benchmarks/bench_memory.py                       # 2 x 4 GB of every format in /tmp
    python benchmarks/bench_memory.py --gb 8 --formats npy  # the older 2 x 8 GB .npy figure
    python benchmarks/bench_memory.py --gb 1 --dir /dev/shm --json out.json

The dumps are a random block rolled along the rows (cheap to write, not constant),
vocabulary 128256 (Llama 3). The page cache is not dropped: what does not fit in RAM is read
from disk. The issue's bound: every format's peak within 1.5x of the .npy figure of the same
run. The results are printed as a table and as one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FORMATS = ("npy", "safetensors", "llama", "arrow", "parquet")
EXT = {"npy": ".npy", "safetensors": ".safetensors", "llama": ".kld", "arrow": ".arrow",
       "parquet": ".parquet"}
BLOCK = 64


def rolled_block(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, size=(BLOCK, vocab)).astype(np.float16)


class Synthetic:
    """A LogitSource of n rows made of a rolled random block, for `convert` to write in any
    format without a .npy in between."""

    def __new__(cls, n: int, vocab: int, seed: int):
        from fidelity_kld.io.base import LogitSource
        from fidelity_kld.ops import Logits

        block = rolled_block(vocab, seed)

        class _Source(LogitSource):
            def read(self, start, stop):
                rows = np.arange(start, stop) % BLOCK
                return Logits(np.roll(block, start, axis=1)[rows], "float16", vocab)

        return _Source(path=f"<synthetic {seed}>", format="array", n_tokens=n, vocab=vocab,
                       dtype="float16")


def write_npy(path: Path, n: int, vocab: int, seed: int) -> None:
    block = rolled_block(vocab, seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f2", "fortran_order": False, "shape": (n, vocab)})
        for start in range(0, n, BLOCK):
            f.write(np.roll(block, start * 7, axis=1)[: min(BLOCK, n - start)].tobytes())


def write_llama(path: Path, n_rows: int, vocab: int, seed: int) -> None:
    """A llama.cpp --kl-divergence-base file of about n_rows rows, each a valid quantized
    log-softmax; the same token ids in every file (compare refuses different texts)."""
    n_ctx = 512
    per_chunk = n_ctx - 1 - n_ctx // 2
    n_chunk = max(1, n_rows // per_chunk)
    z = np.random.default_rng(seed).normal(0, 2, size=(BLOCK, vocab))
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    lo = logp.min(axis=1, keepdims=True)
    scale = -lo / 65535
    words = 2 * ((vocab + 1) // 2) + 4
    block = np.zeros((BLOCK, words), np.uint16)
    block[:, :4] = np.concatenate([scale, lo], axis=1).astype("<f4").view("<u2")
    block[:, 4:4 + vocab] = np.round((logp - lo) / scale).astype(np.uint16)
    tokens = np.random.default_rng(0).integers(0, vocab, size=n_ctx * n_chunk)
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<iii", n_ctx, vocab, n_chunk))
        f.write(tokens.astype("<i4").tobytes())
        total = per_chunk * n_chunk
        for start in range(0, total, BLOCK):
            f.write(np.roll(block, start, axis=0)[: min(BLOCK, total - start)].tobytes())


def write_dump(path: Path, fmt: str, n: int, vocab: int, seed: int) -> None:
    if fmt == "npy":
        write_npy(path, n, vocab, seed)
    elif fmt == "llama":
        write_llama(path, n, vocab, seed)
    else:
        from fidelity_kld.io import convert

        convert(Synthetic(n, vocab, seed), path)


def write_side(work: Path, side: str, fmt: str, n: int, vocab: int, seed: int, shards: int) -> Path:
    if not shards:
        path = work / f"{side}{EXT[fmt]}"
        write_dump(path, fmt, n, vocab, seed)
        return path
    one = work / f"{side}-shard{EXT[fmt]}"
    write_dump(one, fmt, n // shards, vocab, seed)
    d = work / side
    d.mkdir()
    for i in range(shards):
        os.link(one, d / f"shard-{i + 1:05d}-of-{shards:05d}{EXT[fmt]}")
    one.unlink()
    return d


def cli_command() -> list[str]:
    exe = shutil.which("fidelity-kld") or str(Path(sys.executable).with_name("fidelity-kld"))
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "fidelity_kld"]


def disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir())
    return path.stat().st_size


def run_case(work: Path, fmt: str, shards: int, args) -> dict:
    n = int(args.gb * 1e9) // (2 * args.vocab)
    t0 = time.monotonic()
    ref = write_side(work, "ref", fmt, n, args.vocab, 0, shards)
    q = write_side(work, "q", fmt, n, args.vocab, 1, shards)
    size = disk_bytes(ref) + disk_bytes(q)
    written = time.monotonic() - t0
    cmd = ["/usr/bin/time", "-v", *cli_command(), "compare", str(ref), str(q), "-q", "--format", "json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIDELITY_KLD_")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{fmt}: compare failed:\n{r.stderr[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", r.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    cpu = sum(float(re.search(rf"{what} time \(seconds\): ([\d.]+)", r.stderr).group(1))
              for what in ("User", "System"))
    summary = json.loads(r.stdout)["models"][0]["summary"]
    return {"format": fmt, "shards": shards, "input_bytes": size, "tokens": summary["n_tokens"],
            "vocab": args.vocab, "peak_rss_mib": peak_kb / 1024, "wall_s": seconds,
            "input_gb_per_s": size / seconds / 1e9, "cpu_s": cpu,
            "cpu_s_per_gb": cpu / (size / 1e9), "write_s": written}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=4.0, help="size of each dump in GB (1e9 bytes)")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, from " + ", ".join(FORMATS))
    p.add_argument("--shards", type=int, default=8, help="shards per side in the directory cases (0: none)")
    p.add_argument("--dir", default="/tmp", help="where to write the dumps")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()

    cases = [(f, s) for f in args.formats.split(",") for s in ((0, args.shards) if args.shards else (0,))]
    results = []
    print(f"{'format':<22} {'input GB':>9} {'peak RSS MiB':>13} {'wall s':>7} {'GB/s':>6} "
          f"{'CPU s/GB':>9}", flush=True)
    for fmt, shards in cases:
        work = Path(args.dir) / f"fk_bench_memory_{os.getpid()}"
        work.mkdir(parents=True)
        try:
            res = run_case(work, fmt, shards, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # one format's files on disk at a time
        results.append(res)
        name = fmt + (f", {shards} shards" if shards else "")
        print(f"{name:<22} {res['input_bytes'] / 1e9:9.2f} {res['peak_rss_mib']:13.0f} "
              f"{res['wall_s']:7.1f} {res['input_gb_per_s']:6.2f} {res['cpu_s_per_gb']:9.3f}", flush=True)
        print(json.dumps(res), flush=True)
    base = next((r["peak_rss_mib"] for r in results if r["format"] == "npy" and not r["shards"]), None)
    if base:
        worst = max(r["peak_rss_mib"] / base for r in results)
        print(f"largest peak / .npy peak: {worst:.2f}x (bound 1.5x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
