"""Peak resident memory of `fidelity-kld compare` does not grow with the input, in every
format: 2 x 64 MB and 2 x 224 MB float16 .npy dumps give about the same peak, and two
224 MB dumps of every other format (safetensors, llama.cpp, Arrow IPC, Parquet), and two
directories of four 224 MB shards of each, peak within 1.4x of the .npy figure measured in
the same run (the issue's bound is 1.5x) (the 2 x 4 GB and 2 x 8 GB figures are benchmarks/bench_memory.py's).

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
# Each of the two dumps per format. Holding them would add 450 MB; the pipeline's own
# buffers are ~270 MB (two 128 MB chunks), so the dumps must be well over that for a reader
# that keeps what it read but needs no buffers (a memory map) to show it.
FORMAT_DUMP_MB = 224
SMALL_DUMP_MB = 64
EXT = {"npy": ".npy", "safetensors": ".safetensors", "arrow": ".arrow", "parquet": ".parquet",
       "llama": ".kld"}
# Shards of FORMAT_DUMP_MB each: larger than a chunk, so that chunks inside a shard (views
# of its map) and chunks across two shards (assembled, in the stream's buffers before the
# fix) both occur, and both buffer sets are used (what held ~256 MiB more at 2 x 4 GB)
N_SHARDS = 4


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


def write_llama(path, n_rows: int, vocab: int, seed: int) -> None:
    """A llama.cpp --kl-divergence-base file (docs/formats.md) of about n_rows rows,
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


def link(src, dst) -> None:
    """dst as a second name of src: the same pages in the page cache, but every reader's
    own mapping or copy of them counts in its RSS (so this still shows a reader that holds
    what it read), for a quarter of the disk writes."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_pair(directory, fmt: str, sharded: bool, mb: int = FORMAT_DUMP_MB) -> tuple:
    """(ref, q): two dumps of `mb` MB each (q another name of ref: only reading is measured),
    or two directories of N_SHARDS shards of `mb` MB each (a shard is not a whole number of
    chunks: some chunks span two shards)."""
    n = mb * MB // (2 * VOCAB)
    if not sharded:
        ref, q = directory / f"ref{EXT[fmt]}", directory / f"q{EXT[fmt]}"
        write_dump(ref, fmt, n, 0)
        link(ref, q)
        return ref, q
    one = directory / f"shard{EXT[fmt]}"
    write_dump(one, fmt, n, 0)
    sides = []
    for side in ("ref", "q"):
        d = directory / side
        d.mkdir()
        for i in range(N_SHARDS):
            link(one, d / f"shard-{i + 1:05d}-of-{N_SHARDS:05d}{EXT[fmt]}")
        sides.append(d)
    one.unlink()
    return tuple(sides)


@pytest.fixture(scope="module")
def npy_peak(tmp_path_factory):
    d = tmp_path_factory.mktemp("npy_peak")
    ref, q = write_pair(d, "npy", sharded=False)
    peak = compare_peak(ref, q)
    shutil.rmtree(d, ignore_errors=True)
    print(f"2 x {FORMAT_DUMP_MB} MB .npy: {peak / MB:.0f} MiB")
    return peak


def test_npy_peak_does_not_grow_with_input_size(workdir, npy_peak):
    ref, q = write_pair(workdir, "npy", sharded=False, mb=SMALL_DUMP_MB)
    small = compare_peak(ref, q) / MB
    large = npy_peak / MB
    print(f"peak RSS: 2 x {SMALL_DUMP_MB} MB -> {small:.0f} MiB, 2 x {FORMAT_DUMP_MB} MB -> {large:.0f} MiB")
    # Were pages kept, the large run would hold ~320 MB more than the small one. The small
    # run fills one of the two chunks (128 MB each) the pipeline holds, partly (~140 MB less).
    assert large - small < 250, (small, large)
    assert large < 450, (small, large)


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
    # up to 450 MB to a peak of ~300 MB. The bound is 1.5x; 1.4x here, because
    # Parquet decoded in 2 MB batches from pyarrow's default pool sat at 1.43x (415 MiB
    # against 290) and is now at 1.26x: pyarrow's import alone is ~47 MiB of the margin.
    assert peak < 1.4 * npy_peak, (peak / MB, npy_peak / MB)
