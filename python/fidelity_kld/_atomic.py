"""Write-then-rename, so an interrupted run never leaves a file that looks complete.

Every temporary output is created beside its destination under one recognisable name,
``.<destination>.fidelity-kld-<pid>-<random>.tmp`` (a directory for reports), and removed
when the run fails or is interrupted: the CLI turns SIGINT, SIGTERM and SIGHUP alike into an
exception (handle_signals) so the usual cleanup runs. A run killed outright (SIGKILL, power
loss) cannot clean up; the next run that writes into the same directory removes the
temporaries whose process is gone (remove_stale).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

TAG = "fidelity-kld"
_STALE = re.compile(rf"^\..+\.{TAG}-(\d+)-[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?$")
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) turned into an exception, so outputs are cleaned
    up as for Ctrl-C; the CLI exits with 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_terminated(signum, frame):
    # Once: further signals are ignored while the cleanup this exception starts runs
    # (SIGKILL still ends a cleanup that hangs; the next run removes what it left).
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def handle_signals():
    """SIGINT, SIGTERM and SIGHUP raise Terminated in the main thread inside the block
    (elsewhere a no-op: Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(directory: str | os.PathLike) -> list[str]:
    """Remove the temporaries in `directory` left by fidelity-kld runs whose process no
    longer exists; returns their paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _STALE.match(name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
    return removed


def _prefix(final: str | os.PathLike) -> str:
    return f".{Path(final).name}.{TAG}-{os.getpid()}-"


def make_temp(final: str | os.PathLike, suffix: str = ".tmp") -> str:
    """Create an empty temporary file beside `final` (stale ones removed first); its path.
    Mode 0600 (mkstemp's): give it the usual mode before it is renamed."""
    directory = os.path.dirname(os.path.abspath(final))
    remove_stale(directory)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(final), suffix=suffix, dir=directory)
    os.close(fd)
    return tmp


def make_temp_dir(final: str | os.PathLike) -> str:
    """Create an empty temporary directory beside `final` (stale temporaries removed first)."""
    directory = os.path.dirname(os.path.abspath(final))
    remove_stale(directory)
    return tempfile.mkdtemp(prefix=_prefix(final), suffix=".tmp", dir=directory)


def default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds,
    remove it on any error (KeyboardInterrupt and Terminated included)."""
    dest = Path(path)
    directory = dest.parent if str(dest.parent) else Path(".")
    if not directory.is_dir():
        raise OSError(f"{dest}: directory {directory} does not exist")
    tmp = make_temp(dest, suffix or ".tmp")
    os.chmod(tmp, default_mode())  # mkstemp makes 0600; give the output a normal file's mode
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
