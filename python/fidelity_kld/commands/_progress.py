"""Progress on stderr for `compare` and `convert`: on a terminal, one self-overwriting bar
with rate and ETA; otherwise (CI logs, pipes) a plain line every `interval` seconds and one at
the end, so logs show the run advancing without a flood of carriage returns."""

from __future__ import annotations

import sys
import time

BAR_WIDTH = 24
PLAIN_INTERVAL_S = 10.0


def _eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressReporter:
    """Call with a fidelity_kld.stream.Progress after each chunk.

    tty: draw a bar (default: whether `stream` is a terminal); interval: seconds between
    plain lines when not a terminal; clock: time source (tests pass a fake one)."""

    def __init__(self, enabled: bool = True, *, what: str = "tokens", stream=None,
                 tty: bool | None = None, interval: float = PLAIN_INTERVAL_S, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval, self.clock, self.what = interval, clock, what
        self.last = None
        self.shown = 0  # length of the bar on the terminal's current line (0: none)

    def __call__(self, p) -> None:
        if not self.enabled:
            return
        now = self.clock()
        done = p.tokens_done >= p.tokens_total
        gap = 0.2 if self.tty else self.interval
        if self.last is not None and now - self.last < gap and not done:
            return
        if self.last is None and not self.tty and not done:
            self.last = now  # the first plain line comes after one interval
            return
        self.last = now
        line = self.line(p)
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done else ""))
            self.shown = 0 if done else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Blank the bar's line (terminal only), so that other output (compare --running's
        lines) starts on a clean line; the next call draws the bar again."""
        if self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown, self.last = 0, None  # redrawn at the next call, however soon

    def line(self, p) -> str:
        frac = p.tokens_done / max(p.tokens_total, 1)
        rate = p.tokens_done / p.seconds if p.seconds > 0 else 0.0
        gbs = p.bytes_read / p.seconds / 1e9 if p.seconds > 0 else 0.0
        eta = (p.tokens_total - p.tokens_done) / rate if rate > 0 else 0.0
        text = (f"{p.tokens_done}/{p.tokens_total} {self.what} ({100 * frac:5.1f}%)  "
                f"{rate:,.0f} tok/s  {gbs:.2f} GB/s  "
                + (f"elapsed {_eta(p.seconds)}" if p.tokens_done >= p.tokens_total
                   else f"ETA {_eta(eta)}"))
        if self.tty:
            filled = int(BAR_WIDTH * frac)
            return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] " + text + " "
        return "progress: " + text
