"""Peak resident memory of `fidelity-kld compare` does not grow with the input: 2 x 100 MB
and 2 x 400 MB float16 dumps give about the same peak (the 2 x 8 GB figure is
benchmarks/bench_memory.py's).

The peak is VmHWM from /proc/self/status, read by the CLI process itself when it exits.
Not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's RSS when it forked (the
kernel carries the forked address space's high-water mark over exec), so under a large
pytest process every run would read the same figure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from _reference_checks import write_npy

VOCAB = 32000  # float16: 64,000 bytes a row
MB = 1 << 20


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


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # a GB of dumps: do not leave it to pytest


def test_peak_rss_does_not_grow_with_input_size(workdir):
    peaks = {}
    for label, mb_per_dump in (("small", 100), ("large", 400)):
        n = mb_per_dump * MB // (2 * VOCAB)
        ref, q = workdir / f"{label}_ref.npy", workdir / f"{label}_q.npy"
        write_npy(ref, n, VOCAB, 0)
        write_npy(q, n, VOCAB, 1)
        peaks[label] = peak_rss_bytes(["compare", str(ref), str(q), "-q", "--format", "json"])
        os.unlink(ref)
        os.unlink(q)
    small, large = peaks["small"] / MB, peaks["large"] / MB
    print(f"peak RSS: 2 x 100 MB -> {small:.0f} MiB, 2 x 400 MB -> {large:.0f} MiB")
    # Were pages kept, the large run would hold ~600 MB more than the small one. The small
    # run fits in the two chunks (128 MB each) the pipeline holds; allow that and some noise.
    assert large - small < 150, (small, large)
    assert large < 600, (small, large)
