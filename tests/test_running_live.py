"""`compare --running` prints each prompt's running lines while the run goes on, for one
model or several (issue 18, point 13). "While" is checked by order, not by time: the stream
is cut into chunks smaller than a prompt and the progress callback, called after each chunk,
writes a marker into the same output, so a line printed after the run would follow the last
marker. Values are checked against reference.py (float64) over each prefix of tokens."""

from __future__ import annotations

import functools
import io
import math
import re

import click
import numpy as np
import pytest
from click.testing import CliRunner

from fidelity_kld import reference, stream
from fidelity_kld.cli import cli
from fidelity_kld.commands import _progress, compare as compare_cmd
from fidelity_kld.commands._running import LiveRunning
from fidelity_kld.io import ArraySource, convert, open_source

N, V, PROMPT = 300, 50, 50  # 6 prompts of 50 tokens
ROWS_PER_CHUNK = 20  # stream chunks: prompts end inside chunks 3, 5, 8, ...
LINE = re.compile(r"^\s*(\d+)\s+(-?[\d.]+) ± +[\d.]+\s+(-?[\d.]+) ± +[\d.]+\s+(-?[\d.]+) ± +[\d.]+"
                  r"\s+[\d.]+ ± +[\d.]+ %\s+([\d.]+) ± +[\d.]+ %(?:\s+(\S+))?$")


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("running")
    rng = np.random.default_rng(18)
    ref = rng.standard_normal((N, V)).astype(np.float32) * 2
    labels = rng.integers(0, V, N)
    prompts = np.repeat(np.arange(N // PROMPT), PROMPT)
    arrays = {"ref": ref}
    for name, scale in (("qa", 0.1), ("qb", 0.3)):
        arrays[name] = ref + scale * rng.standard_normal((N, V)).astype(np.float32)
    for name, x in arrays.items():
        convert(ArraySource(x, labels=labels, prompt_ids=prompts), d / f"{name}.safetensors")
    return d, arrays, labels


class MarkingReporter(_progress.ProgressReporter):
    """Writes '@progress N' on stdout after each stream chunk: the order of output shows
    what was printed before the run ended."""

    def __call__(self, p) -> None:
        click.echo(f"@progress {p.tokens_done}")


@pytest.fixture
def small_chunks(monkeypatch):
    def split(ref, quants, **kw):
        row = ref.bytes_per_token + sum(q.bytes_per_token for q in quants)
        return original(ref, quants, chunk_bytes=ROWS_PER_CHUNK * row, **kw)

    original = stream.compare_sources
    monkeypatch.setattr(stream, "compare_sources", split)
    monkeypatch.setattr(compare_cmd, "ProgressReporter", MarkingReporter)


def run_compare(dumps, models, *extra):
    d = dumps[0]
    args = ["compare", str(d / "ref.safetensors"), *(str(d / f"{m}.safetensors") for m in models),
            "--running", *extra]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return r.stdout


def prefix_kld(dumps, model, end):
    _, arrays, labels = dumps
    st = reference.logit_stats(arrays["ref"][:end], arrays[model][:end], labels[:end])
    return float(np.mean(st["kld"])), float(np.mean(st["top1_ref"] == st["top1_q"]))


@pytest.mark.parametrize("models", [["qa"], ["qa", "qb"]])
def test_running_lines_print_as_each_prompt_completes(dumps, small_chunks, models):
    names = ["A", "B"][:len(models)]
    out = run_compare(dumps, models, *(x for n in names for x in ("--name", n)))
    lines = out.splitlines()
    marks = {int(x.split()[1]): i for i, x in enumerate(lines) if x.startswith("@progress ")}
    assert sorted(marks) == list(range(ROWS_PER_CHUNK, N, ROWS_PER_CHUNK)) + [N]
    found = {}
    for i, x in enumerate(lines):
        m = LINE.match(x)
        if m:
            found.setdefault((int(m[1]), m[6] or names[0]), []).append((i, m))
    assert sorted(found) == sorted((c, n) for c in range(1, 7) for n in names)
    for (chunk, name), hits in found.items():
        assert len(hits) == 1, (chunk, name, "printed twice")  # live, and not again after
        i, m = hits[0]
        end = chunk * PROMPT
        done = -(-end // ROWS_PER_CHUNK) * ROWS_PER_CHUNK  # the stream chunk completing it
        before = done - ROWS_PER_CHUNK
        assert marks.get(before, -1) < i < marks[done], (chunk, name, "printed out of turn")
        kld, same = prefix_kld(dumps, models[names.index(name)], end)
        assert math.isclose(float(m[4]), kld, rel_tol=1e-3), (chunk, name)
        assert math.isclose(float(m[5]), 100 * same, abs_tol=1e-3), (chunk, name)
    summary = next(i for i, x in enumerate(lines) if "====== " in x or "Compact table" in x)
    assert marks[N] < summary
    if len(models) > 1:  # one header per chunk, naming the model column
        assert sum(1 for x in lines if x.startswith("chunk ") and x.endswith("  model")) == 6
        assert "### running estimates vs ref.safetensors: A, B" in out
    else:
        assert "### A vs ref.safetensors  (running estimates)" in out


class Terminal:
    """stdout and stderr on one terminal: '\\r' moves to column 0 and overwrites."""

    def __init__(self):
        self.raw = ""

    def write(self, s):
        self.raw += s

    def flush(self):
        pass

    def isatty(self):
        return True

    def screen(self) -> list[str]:
        rows = []
        for physical in self.raw.split("\n"):
            cells, col = [], 0
            for ch in physical:
                if ch == "\r":
                    col = 0
                    continue
                if col < len(cells):
                    cells[col] = ch
                else:
                    cells.append(ch)
                col += 1
            rows.append("".join(cells).rstrip())
        return rows


def test_the_progress_bar_is_cleared_before_running_lines(dumps):
    d, arrays, labels = dumps
    term = Terminal()
    clock = iter(range(1000)).__next__
    rep = _progress.ProgressReporter(stream=term, tty=True, clock=clock)
    ref, qa, qb = (open_source(d / f"{n}.safetensors") for n in ("ref", "qa", "qb"))
    live = LiveRunning(["A", "B"], "ref", ref.prompt_ids, ref.n_tokens, progress=rep,
                       echo=lambda s: term.write(s + "\n"))
    from fidelity_kld.ops import compare, compare_many

    fn, many = live.wrap(compare, compare_many)
    row = ref.bytes_per_token + qa.bytes_per_token + qb.bytes_per_token
    stream.compare_sources(ref, [qa, qb], progress=rep, compare_fn=fn, compare_many_fn=many,
                           chunk_bytes=ROWS_PER_CHUNK * row)
    screen = [x for x in term.screen() if x]
    bar = re.compile(r"^\[[#.]{24}\] \d+/300 tokens \(.*(ETA|elapsed) \d\d:\d\d$")
    assert term.raw.count("\r[") == N // ROWS_PER_CHUNK  # a bar after every chunk
    for x in screen:  # what is left on screen: bars alone on their line, lines alone on theirs
        assert bar.match(x) or not ("tokens (" in x or "ETA" in x), x
    assert screen[0] == "### running estimates vs ref: A, B"
    assert sum(1 for x in screen if LINE.match(x)) == 12
    assert bar.match(screen[-1]) and "300/300" in screen[-1]  # the final bar, drawn again


def test_a_plain_pipe_sees_the_lines_as_they_come(dumps):
    """click.echo flushes each line, so a reader of a pipe (not only a terminal) gets the
    lines of prompt 1 before the run goes on: here the stream's next progress call finds
    them already flushed to the underlying byte stream."""
    d = dumps[0]
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8")  # block-buffered, as a pipe's stdout is
    seen = []
    ref, qa, qb = (open_source(d / f"{n}.safetensors") for n in ("ref", "qa", "qb"))
    live = LiveRunning(["A", "B"], "ref", ref.prompt_ids, ref.n_tokens,
                       echo=functools.partial(click.echo, file=out))
    from fidelity_kld.ops import compare, compare_many

    fn, many = live.wrap(compare, compare_many)
    row = ref.bytes_per_token + qa.bytes_per_token + qb.bytes_per_token
    stream.compare_sources(ref, [qa, qb], compare_fn=fn, compare_many_fn=many,
                           chunk_bytes=ROWS_PER_CHUNK * row,
                           progress=lambda p: seen.append((p.tokens_done, raw.getvalue().decode())))
    first = next(text for done, text in seen if done >= PROMPT)
    assert re.search(r"^\s+1\s.*\sA$", first, re.M) and re.search(r"^\s+1\s.*\sB$", first, re.M)
    assert not re.search(r"^\s+2\s", first, re.M)
