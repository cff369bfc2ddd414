"""`fidelity-kld compare` over hidden-state dumps: logits recomputed through each model's
lm_head in bounded tiles (fidelity_kld.hidden), then the same statistics and output as for
full-logit dumps."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import click

from .. import __version__
from .._atomic import atomic_output
from ..cli import InputError


def run_hidden_compare(ref, quants, *, fmt, output, per_token, per_prompt, threads, device,
                       shared_lm_head, lm_head, view=None, ray_address=None, ray_tasks=None,
                       quiet=False):
    """compare's path for hidden-state dumps (with ray_address: scored by Ray tasks,
    fidelity_kld.distributed.compare_hidden_dumps); view: compare's output options (names,
    compact table, paired, listings, running lines), applied as for full-logit dumps. Every
    side must be a hidden-state dump (a llama.cpp file is refused here), so --bad-rows has no
    llama.cpp rows to act on, as for .npy dumps."""
    from ..hidden import compare_hidden, heads_for
    from ..io.hidden import HiddenDump, is_hidden_file
    from ..stats.per_prompt import per_prompt as per_prompt_table
    from ..stats.summary import summarize
    from .compare import _analyses, _model_names, _print, _write_per_prompt, _write_per_token

    for p in (ref, *quants):
        if not is_hidden_file(p):
            raise InputError(f"{p}: not a hidden-state dump; compare hidden-state dumps with each other")
    try:
        ref_d = HiddenDump(ref)
        q_ds = [HiddenDump(q) for q in quants]
        heads = heads_for(ref_d, q_ds, shared_lm_head=shared_lm_head, lm_head=lm_head)
        where = "cuda" if device == "cuda" else "cpu"
        if ray_address:
            from .. import distributed

            results = distributed.compare_hidden_dumps(
                ref_d, q_ds, heads, shared_lm_head=shared_lm_head, lm_head=lm_head,
                threads=threads, device=where, tasks=ray_tasks, address=ray_address,
                progress=None if quiet else distributed.ProgressPrinter())
        else:
            results = compare_hidden(ref_d, q_ds, heads, threads=threads, device=where)
    except ValueError as e:  # DumpError included
        raise InputError(str(e)) from None
    prompt_ids = ref_d.prompt_ids
    if per_prompt and prompt_ids is None:
        raise InputError(f"{ref}: --per-prompt needs prompt ids (the dump carries none)")
    if view is None:
        view = dict(fmt=fmt, names=_model_names(quants), sort="given", paired=False,
                    baseline=None, top_tokens=0, top_prompts=0, tokenizer_path=None,
                    running=False, brief=False)
    names = view["names"]
    summaries = [summarize(st).to_dict() for st in results]
    extras = _analyses(names, results, prompt_ids, view)
    doc = {
        "fidelity_kld_version": __version__,
        "reference": {"path": os.fspath(ref), "format": "hidden", "n_tokens": ref_d.n_tokens,
                      "hidden_size": ref_d.hidden_size, "vocab": heads[0].vocab,
                      "lm_head": heads[0].source},
        "models": [{"name": n, "path": os.fspath(p), "format": "hidden",
                    "lm_head": "reference's (shared)" if shared_lm_head else h.source, "summary": s}
                   for n, p, h, s in zip(names, quants, heads[1:], summaries)],
        **extras["json"],
    }
    with ExitStack() as outputs:
        if output:
            Path(outputs.enter_context(atomic_output(output))).write_text(json.dumps(doc, indent=2) + "\n")
        if per_token:
            _write_per_token(outputs.enter_context(atomic_output(per_token)), names, results, prompt_ids)
        if per_prompt:
            _write_per_prompt(outputs.enter_context(atomic_output(per_prompt)), names, results,
                              prompt_ids, per_prompt_table)
    if fmt == "text":
        head = "the reference's, shared" if shared_lm_head else "each model's own"
        click.echo(f"(logits recomputed from hidden states through the lm_head: {head})\n")
    _print(ref, names, summaries, results, doc, extras, view)
