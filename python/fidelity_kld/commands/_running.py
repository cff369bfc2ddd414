"""`compare --running`: llama.cpp's per-chunk running estimates printed on stdout while the
run goes on, for one model or several.

The stream compares every model on the same rows at once, so all models complete each
prompt (a llama.cpp chunk) in the same call; the compare functions are wrapped to see each
chunk's per-token results, and the lines of the prompts it completed are printed right
away. One model: llama.cpp's layout (header, line, blank line per chunk). Several: one
header per chunk, then one line per model, labelled at the end with its name, so the
columns stay where llama.cpp puts them. A progress bar on a terminal is cleared before the
lines are printed (the next progress call redraws it), so the two do not share a line.
"""

from __future__ import annotations

import click

from . import _format


def format_running_block(names: list[str], lines: list) -> str:
    """One prompt's running lines of several models: llama.cpp's header with a `model`
    column at the end, then each model's line followed by its name."""
    body = [_format.format_running_line(x) for x in lines]
    width = max(len(_format.RUNNING_HEADER), *(len(b) for b in body))
    head = _format.RUNNING_HEADER.ljust(width) + "  model"
    return "\n".join([head, *(f"{b.ljust(width)}  {n}" for b, n in zip(body, names))])


class LiveRunning:
    """Prints each completed prompt's running lines for every model as the stream goes.

    names: the models' labels, in order; ref_name: the reference's file name (titles);
    progress: the ProgressReporter on stderr, whose bar is cleared before lines are
    printed; echo: where lines go (default: click.echo on stdout, which flushes each line,
    so a pipe's reader sees them as they come)."""

    def __init__(self, names: list[str], ref_name: str, prompt_ids, n_tokens: int, *,
                 progress=None, echo=click.echo):
        from ..stats.running import RunningEstimates

        self.names, self.ref_name, self.progress, self.echo = list(names), ref_name, progress, echo
        self.estimates = [RunningEstimates(prompt_ids, n_tokens) for _ in self.names]
        self.started = False

    def wrap(self, compare_fn, compare_many_fn=None):
        """(compare_fn, compare_many_fn) for fidelity_kld.stream.compare_sources that print
        the running lines of what each call completes. With several models the stream is
        given a compare_many_fn (built from compare_fn if there is none), so that one call
        holds every model's chunk."""
        if len(self.names) == 1:
            def compare_one(*args, **kwargs):
                st = compare_fn(*args, **kwargs)
                self.report([st])
                return st
            return compare_one, compare_many_fn
        many = compare_many_fn or (lambda ref, qs, y, **kw: [compare_fn(ref, q, y, **kw) for q in qs])

        def compare_all(*args, **kwargs):
            results = many(*args, **kwargs)
            self.report(results)
            return results
        return compare_fn, compare_all

    def report(self, results) -> None:
        """Feed one chunk's TokenStats (one per model) and print the prompts it completed."""
        per_model = [est.add(st) for est, st in zip(self.estimates, results)]
        n_done = min(len(x) for x in per_model)  # the same for all: they share the rows
        if not n_done:
            return
        if self.progress is not None:
            self.progress.clear()
        if not self.started:
            self.echo(self._title())
            self.started = True
        for i in range(n_done):
            lines = [x[i] for x in per_model]
            text = (_format.format_running(lines) if len(self.names) == 1
                    else format_running_block(self.names, lines))
            self.echo(text + "\n")

    def _title(self) -> str:
        if len(self.names) == 1:
            return f"### {self.names[0]} vs {self.ref_name}  (running estimates)"
        return f"### running estimates vs {self.ref_name}: {', '.join(self.names)}"
