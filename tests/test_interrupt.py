"""SIGINT and SIGTERM during a long `fidelity-kld compare` (a real subprocess): the process
exits promptly, non-zero, prints nothing on stdout, and leaves neither an output file nor a
temporary file; an output that existed before the run is left as it was.

The run is made long without much data: one ~150 MB reference against the same ~150 MB
quantized dump named 24 times (every reference chunk is compared with each). stderr is a
pseudo-terminal so that the progress line is printed; the signal is sent only once it shows
0 < tokens done < tokens total, i.e. while the child is mid-run."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from _reference_checks import write_npy

N_TOKENS, VOCAB = 2400, 32000  # float16: 153.6 MB per dump
N_QUANT = 24
PROMPT_BOUND_S = 5.0  # generous for a loaded CI machine; measured ~0.03-0.1 s here
PROGRESS = re.compile(rb"(\d+)/(\d+) tokens")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupt")
    write_npy(d / "ref.npy", N_TOKENS, VOCAB, 0)
    write_npy(d / "q.npy", N_TOKENS, VOCAB, 1)
    write_npy(d / "small_ref.npy", 200, VOCAB, 2)
    write_npy(d / "small_q.npy", 200, VOCAB, 3)
    yield d
    shutil.rmtree(d, ignore_errors=True)  # ~330 MB: do not leave it to pytest's retention


class Child:
    """A CLI process with stderr on a pseudo-terminal, read as it comes."""

    def __init__(self, argv, cwd):
        master, slave = pty.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIDELITY_KLD_")}
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        self.master = master
        self.err = b""

    def read_until(self, predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not predicate(self.err):
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, (
                f"child ended or stalled (rc {self.proc.poll()}): {self.err[-500:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                self.err += os.read(self.master, 65536)

    def signal_and_wait(self, signum):
        t0 = time.monotonic()
        self.proc.send_signal(signum)
        out = self.proc.stdout.read()  # EOF when the child exits
        rc = self.proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
        try:
            while select.select([self.master], [], [], 0.05)[0]:
                chunk = os.read(self.master, 65536)
                if not chunk:
                    break
                self.err += chunk
        except OSError:  # EIO: the child closed its side
            pass
        os.close(self.master)
        return rc, out, elapsed


def mid_run(err: bytes) -> bool:
    done = [(int(a), int(b)) for a, b in PROGRESS.findall(err)]
    return len(done) >= 2 and 0 < done[-1][0] < done[-1][1]


def listing(d):
    return sorted(os.listdir(d))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_computation(dumps, tmp_path, signum):
    out = tmp_path / "out"
    out.mkdir()
    (out / "s.json").write_text("previous run\n")
    argv = [sys.executable, "-m", "fidelity_kld", "compare", str(dumps / "ref.npy"),
            *[str(dumps / "q.npy")] * N_QUANT, "-o", str(out / "s.json"),
            "--per-token", str(out / "t.parquet"), "--format", "json"]
    child = Child(argv, cwd=tmp_path)
    child.read_until(mid_run)
    done, total = (int(x) for x in PROGRESS.findall(child.err)[-1])
    rc, stdout, elapsed = child.signal_and_wait(signum)
    print(f"{signal.Signals(signum).name} at {done}/{total} tokens: exited in {elapsed:.3f} s")
    assert rc == (130 if signum == signal.SIGINT else 143), child.err[-300:]
    assert elapsed < PROMPT_BOUND_S
    assert stdout == b""
    assert b"Traceback" not in child.err and child.err.rstrip().endswith(b"Aborted."), child.err[-300:]
    assert listing(out) == ["s.json"] and (out / "s.json").read_text() == "previous run\n"
    assert listing(tmp_path) == ["out"]


# Runs the CLI with ParquetWriter.write_table slowed down after its first table, so the
# signal arrives while the outputs exist only under their temporary names.
SLOW_WRITER = """
import sys, time
import pyarrow.parquet as pq
_write = pq.ParquetWriter.write_table
def write_table(self, *a, **k):
    _write(self, *a, **k)
    sys.stderr.write("WROTE ONE TABLE\\n"); sys.stderr.flush()
    time.sleep(60)
pq.ParquetWriter.write_table = write_table
from fidelity_kld.cli import main
sys.argv[0] = "fidelity-kld"
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_writing_outputs(dumps, tmp_path, signum):
    out = tmp_path / "out"
    out.mkdir()
    (out / "s.json").write_text("previous run\n")
    argv = [sys.executable, "-c", SLOW_WRITER, "compare", str(dumps / "small_ref.npy"),
            str(dumps / "small_q.npy"), str(dumps / "small_q.npy"), "-q",
            "-o", str(out / "s.json"), "--per-token", str(out / "t.parquet")]
    child = Child(argv, cwd=tmp_path)
    child.read_until(lambda err: b"WROTE ONE TABLE" in err)
    temporaries = [n for n in listing(out) if n.endswith(".tmp")]
    # both outputs are pending: the JSON summary is not moved into place before the Parquet
    assert len(temporaries) == 2 and (out / "s.json").read_text() == "previous run\n", listing(out)
    rc, stdout, elapsed = child.signal_and_wait(signum)
    print(f"{signal.Signals(signum).name} while writing: exited in {elapsed:.3f} s")
    assert rc == (130 if signum == signal.SIGINT else 143) and elapsed < PROMPT_BOUND_S and stdout == b""
    assert listing(out) == ["s.json"] and (out / "s.json").read_text() == "previous run\n"


def test_uninterrupted_control_run_writes_everything(dumps, tmp_path):
    """The same small run without a signal completes and writes both files (so the checks
    above are not passing because nothing would ever be written)."""
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "fidelity_kld", "compare",
                        str(dumps / "small_ref.npy"), str(dumps / "small_q.npy"), "-q",
                        "-o", str(out / "s.json"), "--per-token", str(out / "t.parquet")],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert listing(out) == ["s.json", "t.parquet"]
