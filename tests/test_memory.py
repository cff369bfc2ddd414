"""Peak resident memory of `fidelity-kld compare` does not grow with the input, in every
format: 2 x 80 MB and 2 x 320 MB float16 .npy dumps give about the same peak, and two
~160 MB dumps of every other format (safetensors, llama.cpp, Arrow IPC, Parquet, and a
directory of shards of each) peak within 1.5x of the .npy figure measured in the same run
(the 2 x 4 GB and 2 x 8 GB figures are benchmarks/bench_memory.py's).

The peak is VmHWM from /proc/self/status, read by the CLI process itself when it exits.
Not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's RSS when it forked (the
kernel carries the forked address space's high-water mark over exec), so under a large
pytest process every run would read the same figure."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from _reference_checks import write_npy
from fidelity_kld.io import convert, open_source

VOCAB = 32000  # float16: 64,000 bytes a row
MB = 1 << 20
FORMAT_DUMP_MB = 160  # each of the two dumps per format: holding them would add 320 MB
EXT = {"npy": ".npy", "safetensors": ".safetensors", "arrow": ".arrow", "parquet": ".parquet",
       "llama": ".kld"}
SHARD_ROWS = (700, 1100, 500, 900)  # uneven: chunks span shards


# The console script's entry point, run in a process that reports its own peak at exit.
CLI_REPORTING_PEAK = """
import atexit, sys
def report():
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    sys.stderr.write("PEAK_KB " + hwm.split()[1] + "\\n")
atexit.register(report)
from fidelity_kld.cli import main
sys.argv[0] = "fidelity-kld"
main()
"""


def peak_rss_bytes(args) -> int:
    """Peak RSS of `fidelity-kld ARGS` (which must succeed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIDELITY_KLD_")}
    r = subprocess.run([sys.executable, "-c", CLI_REPORTING_PEAK, *args], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(re.search(r"PEAK_KB (\d+)", r.stderr).group(1)) * 1024


def compare_peak(ref, q) -> int:
    return peak_rss_bytes(["compare", str(ref), str(q), "-q", "--format", "json"])


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # a GB of dumps: do not leave it to pytest


def test_peak_rss_does_not_grow_with_input_size(workdir):
    peaks = {}
    for label, mb_per_dump in (("small", 80), ("large", 320)):
        n = mb_per_dump * MB // (2 * VOCAB)
        ref, q = workdir / f"{label}_ref.npy", workdir / f"{label}_q.npy"
        write_npy(ref, n, VOCAB, 0)
        write_npy(q, n, VOCAB, 1)
        peaks[label] = compare_peak(ref, q)
        os.unlink(ref)
        os.unlink(q)
    small, large = peaks["small"] / MB, peaks["large"] / MB
    print(f"peak RSS: 2 x 80 MB -> {small:.0f} MiB, 2 x 320 MB -> {large:.0f} MiB")
    # Were pages kept, the large run would hold ~480 MB more than the small one. The small
    # run fits in the two chunks (128 MB each) the pipeline holds; allow that and some noise.
    assert large - small < 150, (small, large)
    assert large < 600, (small, large)


def write_llama(path, n_rows: int, vocab: int, seed: int) -> None:
    """A llama.cpp --kl-divergence-base file (FORMATS.md section 1) of about n_rows rows,
    every row a valid quantized log-softmax (a rolled block, cheap to write)."""
    n_ctx = 512
    first = n_ctx // 2
    per_chunk = n_ctx - 1 - first
    n_chunk = max(1, n_rows // per_chunk)
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, size=(64, vocab))
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    lo = logp.min(axis=1, keepdims=True)
    scale = (-lo) / 65535
    words = 2 * ((vocab + 1) // 2) + 4
    block = np.zeros((64, words), np.uint16)
    block[:, :4] = np.concatenate([scale, lo], axis=1).astype("<f4").view("<u2")
    block[:, 4:4 + vocab] = np.round((logp - lo) / scale).astype(np.uint16)
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<iii", n_ctx, vocab, n_chunk))
        # the same token ids in every file (compare refuses dumps of different texts)
        tokens = np.random.default_rng(0).integers(0, vocab, size=n_ctx * n_chunk)
        f.write(tokens.astype("<i4").tobytes())
        total = per_chunk * n_chunk
        for start in range(0, total, 64):
            f.write(np.roll(block, start, axis=0)[: min(64, total - start)].tobytes())


def write_dump(path, fmt: str, n_rows: int, seed: int) -> None:
    """A float16 dump of n_rows x VOCAB in fmt (the other formats converted from a .npy)."""
    if fmt == "llama":
        write_llama(path, n_rows, VOCAB, seed)
        return
    npy = path.with_name(path.name + ".src.npy") if fmt != "npy" else path
    write_npy(npy, n_rows, VOCAB, seed)
    if fmt != "npy":
        with open_source(npy) as src:
            convert(src, path)
        os.unlink(npy)


def write_pair(directory, fmt: str, sharded: bool) -> tuple:
    """(ref, q): two dumps of FORMAT_DUMP_MB each, or two directories of uneven shards."""
    n = FORMAT_DUMP_MB * MB // (2 * VOCAB)
    paths = []
    for side, seed in (("ref", 0), ("q", 1)):
        if not sharded:
            p = directory / f"{side}{EXT[fmt]}"
            write_dump(p, fmt, n, seed)
        else:
            p = directory / side
            p.mkdir()
            sizes = np.round(np.array(SHARD_ROWS) * n / sum(SHARD_ROWS)).astype(int)
            for i, rows in enumerate(sizes):
                write_dump(p / f"shard-{i + 1:05d}-of-{len(sizes):05d}{EXT[fmt]}", fmt, int(rows), seed + 10 * i)
        paths.append(p)
    return tuple(paths)


@pytest.fixture(scope="module")
def npy_peak(tmp_path_factory):
    d = tmp_path_factory.mktemp("npy_peak")
    ref, q = write_pair(d, "npy", sharded=False)
    peak = compare_peak(ref, q)
    shutil.rmtree(d, ignore_errors=True)
    print(f"2 x {FORMAT_DUMP_MB} MB .npy: {peak / MB:.0f} MiB")
    return peak


CASES = [(fmt, False) for fmt in ("safetensors", "llama", "arrow", "parquet")] + \
        [(fmt, True) for fmt in ("npy", "safetensors", "llama", "arrow", "parquet")]


@pytest.mark.parametrize("fmt, sharded", CASES,
                         ids=[f"{f}{'-shards' if s else ''}" for f, s in CASES])
def test_every_format_peaks_like_npy(workdir, npy_peak, fmt, sharded):
    ref, q = write_pair(workdir, fmt, sharded)
    peak = compare_peak(ref, q)
    print(f"2 x {FORMAT_DUMP_MB} MB {fmt}{' shards' if sharded else ''}: {peak / MB:.0f} MiB "
          f"(.npy {npy_peak / MB:.0f} MiB)")
    # Holding the dumps (their pages, a decoded copy, or Parquet's row-group cache) would add
    # up to 320 MB to a peak of ~300 MB.
    assert peak < 1.5 * npy_peak, (peak / MB, npy_peak / MB)
