"""SIGINT, SIGTERM and SIGHUP during a long `fidelity-kld compare` or `convert` (a real
subprocess): the process exits promptly with 128 + the signal's number, prints nothing on
stdout, and leaves neither an output file nor a temporary file; an output that existed
before the run is left as it was. A run killed with SIGKILL leaves its temporary, which the
next run writing into that directory removes. An input cut short mid-run is an error naming
it (exit 1), not a SIGBUS.

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
        self.proc.send_signal(signum)
        return self.wait()

    def wait(self):
        """(exit code, stdout, seconds it took to exit) once the child ends."""
        t0 = time.monotonic()
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


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
SIGNAL_IDS = [s.name for s in SIGNALS]


def exit_code(signum) -> int:
    return 128 + int(signum)


@pytest.mark.parametrize("signum", SIGNALS, ids=SIGNAL_IDS)
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
    assert rc == exit_code(signum), child.err[-300:]
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


@pytest.mark.parametrize("signum", SIGNALS, ids=SIGNAL_IDS)
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
    assert rc == exit_code(signum) and elapsed < PROMPT_BOUND_S and stdout == b""
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


# convert with the writer slowed down after its first block, so that the signal arrives
# while the output exists only as a (growing) temporary file.
SLOW_CONVERT = """
import sys, time
from fidelity_kld.io import npy
_write = npy.NpyWriter.write
def write(self, block):
    _write(self, block)
    sys.stderr.write("WROTE ONE BLOCK\\n"); sys.stderr.flush()
    time.sleep(60)
npy.NpyWriter.write = write
from fidelity_kld.cli import main
sys.argv[0] = "fidelity-kld"
main()
"""


def start_slow_convert(dumps, out_dir):
    argv = [sys.executable, "-c", SLOW_CONVERT, "convert", str(dumps / "small_ref.npy"),
            str(out_dir / "c.npy")]
    child = Child(argv, cwd=out_dir)
    child.read_until(lambda err: b"WROTE ONE BLOCK" in err)
    temporaries = [n for n in listing(out_dir) if n.endswith(".tmp")]
    assert len(temporaries) == 1 and os.path.getsize(out_dir / temporaries[0]) > 0, listing(out_dir)
    return child, temporaries[0]


@pytest.mark.parametrize("signum", SIGNALS, ids=SIGNAL_IDS)
def test_signal_during_convert_removes_its_temporary(dumps, tmp_path, signum):
    child, _ = start_slow_convert(dumps, tmp_path)
    rc, stdout, elapsed = child.signal_and_wait(signum)
    assert rc == exit_code(signum) and elapsed < PROMPT_BOUND_S, child.err[-300:]
    assert b"Traceback" not in child.err
    assert listing(tmp_path) == []


def test_temporary_of_a_killed_run_is_removed_by_the_next(dumps, tmp_path):
    child, leftover = start_slow_convert(dumps, tmp_path)
    rc, _, _ = child.signal_and_wait(signal.SIGKILL)
    assert rc == -signal.SIGKILL and listing(tmp_path) == [leftover]
    # the name says which process wrote it; one of a live process must stay
    live = f".other.npy.fidelity-kld-{os.getpid()}-abcd1234.tmp"
    (tmp_path / live).write_bytes(b"in progress")
    r = subprocess.run([sys.executable, "-m", "fidelity_kld", "convert", str(dumps / "small_q.npy"),
                        str(tmp_path / "d.npy")], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert listing(tmp_path) == sorted([live, "d.npy"])


def test_input_cut_short_mid_run_is_an_error_naming_it(dumps, tmp_path):
    """Truncated by another process while compare reads it: exit 1, the file named, no
    output (today's readers would take a SIGBUS from a memory map: exit 135, no message)."""
    victim = tmp_path / "q_copy.npy"
    write_npy(victim, N_TOKENS, VOCAB, 1)
    out = tmp_path / "out"
    out.mkdir()
    argv = [sys.executable, "-m", "fidelity_kld", "compare", str(dumps / "ref.npy"),
            *[str(dumps / "q.npy")] * (N_QUANT - 1), str(victim), "-o", str(out / "s.json")]
    child = Child(argv, cwd=tmp_path)
    child.read_until(mid_run)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 4)
    rc, out_text, _ = child.wait()
    err = child.err.decode(errors="replace")
    assert rc == 1, err[-500:]
    assert f"{victim}: the file changed while it was read" in err, err[-500:]
    assert "Traceback" not in err and out_text == b""
    assert listing(out) == []


# A view the stream has mapped in, its file cut short before the core reads it: the page
# faults with SIGBUS, which the core's guard turns into a message and exit 1.
READ_AFTER_CUT = """
import sys, numpy as np
from fidelity_kld.io import open_source
src = open_source(sys.argv[1])
view = src.read_into(0, src.n_tokens, None).data
with open(sys.argv[1], "r+b") as f:
    f.truncate(4096)
print(float(np.asarray(view, dtype=np.float32).sum()))
"""


@pytest.mark.parametrize("ext", [".npy", ".arrow"])
def test_mapped_page_of_a_file_cut_short_is_exit_1_naming_it(tmp_path, ext):
    import numpy as np

    from fidelity_kld.io import ArraySource, convert

    path = tmp_path / f"d{ext}"
    convert(ArraySource(np.ones((64, 4096), np.float32)), path)
    r = subprocess.run([sys.executable, "-c", READ_AFTER_CUT, str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-500:])
    assert r.stderr.strip() == f"Error: {path}: the file changed while it was read (it was cut short)"
    assert r.stdout == ""
