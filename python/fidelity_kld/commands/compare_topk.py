"""`fidelity-kld compare` when a side is a top-k dump: bounds on the KLD (never a truncated
sum presented as one), top-1 agreement, and the label terms where both sides carry them."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import click
import numpy as np

from .. import __version__
from .._atomic import atomic_output
from ..cli import InputError
from ._format import _pct, num, pm


def format_topk_summary(s: dict) -> str:
    """The bounds summary in the main summary's layout: a blank line before each section,
    numbers with at least three significant digits, a value and its error with one number
    of decimals (commands._format)."""
    lo, up, gap = s["kld_lower"], s["kld_upper"], s["gap"]
    lp = lo["percentiles"]
    lines = []
    if s.get("has_labels"):
        lines += [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {pm(s['ppl_q'], s['ppl_q_se'])}",
            f"Mean PPL(base)                : {pm(s['ppl_ref'], s['ppl_ref_se'])}",
            f"Mean ln(PPL(Q)/PPL(base))     : {pm(s['ln_ppl_ratio'], s['ln_ppl_ratio_se'])}",
            f"Mean PPL(Q)/PPL(base)         : {pm(s['ppl_ratio'], s['ppl_ratio_se'])}",
            "",
        ]
    n_unb = up["n_unbounded"]
    upper_line = (f"Mean    KLD upper bound: {num(up['mean'], width=10)}" if n_unb == 0 else
                  f"Mean    KLD upper bound:        inf ({n_unb} of {s['n_tokens']} tokens unbounded: "
                  "the quant's dump gives no floor under its unseen probabilities)")
    lines += [
        "====== KL divergence bounds (top-k dump: the full KLD lies between them) ======",
        f"Mean    KLD lower bound: {pm(lo['mean'], lo['se'])}",
        upper_line,
        f"Maximum KLD lower bound: {num(lo['max'], width=10)}",
        f"99.9%   KLD lower bound: {num(lp['99.9'], width=10)}",
        f"99.0%   KLD lower bound: {num(lp['99'], width=10)}",
        f"95.0%   KLD lower bound: {num(lp['95'], width=10)}",
        f"Median  KLD lower bound: {num(lo['median'], width=10)}",
        f" 5.0%   KLD lower bound: {num(lp['5'], width=10)}",
        f"Tokens with upper - lower > {gap['threshold']:g} nats: {gap['n_above_threshold']} of {s['n_tokens']}",
        "",
        "====== Token probability statistics ======",
    ]
    if s.get("has_labels"):
        d = s["delta_p"]
        lines += [f"Mean    Δp: {pm(_pct(d['mean']), _pct(d['se']), 3, 6)} %",
                  f"RMS Δp    : {pm(_pct(s['rms_delta_p']), _pct(s['rms_delta_p_se']), 3, 6)} %"]
    lines.append(f"Same top p: {pm(_pct(s['same_top']), _pct(s['same_top_se']), 3, 6)} %")
    return "\n".join(lines)


def _describe(side, path) -> dict:
    from ..io.topk import TopKIndex, TopKLogprobs

    if isinstance(side, (TopKLogprobs, TopKIndex)):
        floor = side.has_floor if isinstance(side, TopKIndex) else side.floor_logprob is not None
        return {"path": os.fspath(path), "format": "topk", "k": side.k, "n_tokens": side.n_rows,
                "vocab": side.vocab, "floor": floor}
    return {"path": os.fspath(path), "format": side.format, "n_tokens": side.n_tokens,
            "vocab": side.vocab, "dtype": side.dtype}


# compare's options this path does not have: each needs exact per-token KLDs (the listings,
# the paired differences, the running lines) or the full summary (the compact table)
UNSUPPORTED = {"paired": "--paired/--baseline", "top_tokens": "--top-tokens",
               "top_prompts": "--top-prompts", "running": "--running"}


def run_topk_compare(ref, quants, *, fmt, output, per_token, per_prompt, gap_threshold,
                     dtype_override, labels_path=None, view=None, bad_rows="refuse",
                     ray_address=None, ray_tasks=None, quiet=False):
    """compare's path when REF or a QUANT is a top-k dump (with ray_address: the bounds
    computed by Ray tasks, fidelity_kld.distributed.compare_topk_sides). view: compare's output
    options; models are labelled by its names, and options this path lacks are refused, not
    ignored. Corrupt rows of a llama.cpp file on the full side are refused, as compare refuses
    them; --bad-rows invalid cannot apply (the bounds have no invalid tokens) and is refused
    when a side holds llama.cpp rows."""
    if view is not None:
        given = [flag for key, flag in UNSUPPORTED.items() if view.get(key)]
        if view.get("sort", "given") != "given":
            given.append("--sort")
        if fmt == "markdown":
            given.append("--format markdown")
        if given:
            raise click.UsageError(f"{', '.join(given)}: not available when a side is a top-k "
                                   "dump (its KLD is known only as bounds)")
    from ..stats.summary import json_ready
    from ..stats.topk_bounds import summarize_topk
    from ..topk_compare import check_pair, compare_topk, has_llama_rows, open_side
    from .compare import _model_names

    if per_prompt or labels_path:
        raise InputError(f"{ref}: --per-prompt and --labels are not supported with top-k dumps")
    with ExitStack() as stack:
        try:
            sides = []
            for p in (ref, *quants):
                s = open_side(p, dtype_override, index=bool(ray_address))
                if hasattr(s, "close"):
                    stack.callback(s.close)
                sides.append(s)
            llama = next((p for p, s in zip((ref, *quants), sides) if has_llama_rows(s)), None)
            if bad_rows == "invalid" and llama is not None:
                raise InputError(f"{llama}: --bad-rows invalid does not apply to a comparison "
                                 "with a top-k dump (its KLD bounds count no invalid tokens); "
                                 "corrupt llama.cpp rows are refused")
            vocabs = [check_pair(sides[0], q, ref, qp) for q, qp in zip(sides[1:], quants)]
            if ray_address:
                from .. import distributed

                results = distributed.compare_topk_sides(
                    sides, [ref, *quants], vocabs, tasks=ray_tasks, address=ray_address,
                    progress=None if quiet else distributed.ProgressPrinter())
            else:
                results = [compare_topk(sides[0], q, vocab=v) for q, v in zip(sides[1:], vocabs)]
        except ValueError as e:  # DumpError included
            raise InputError(str(e)) from None
        names = view["names"] if view is not None else _model_names(quants)
        summaries = [json_ready(summarize_topk(st, gap_threshold=gap_threshold)) for st in results]
        doc = {"fidelity_kld_version": __version__, "kind": "topk_bounds",
               "reference": _describe(sides[0], ref),
               "models": [{"name": n, **_describe(s, p), "summary": sm}
                          for n, p, s, sm in zip(names, quants, sides[1:], summaries)]}
        prompt_ids = _prompt_ids(sides)
        with ExitStack() as outputs:
            if output:
                Path(outputs.enter_context(atomic_output(output))).write_text(
                    json.dumps(doc, indent=2) + "\n")
            if per_token:
                _write_per_token(outputs.enter_context(atomic_output(per_token)), names, results,
                                 prompt_ids)
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    for name, s in zip(names, summaries):
        click.echo(f"### {name} vs {Path(ref).name}  ({s['n_tokens']} tokens, KLD bounded from top-k)")
        click.echo(format_topk_summary(s))
        click.echo("")


def _prompt_ids(sides):
    from ..topk_compare import TOPK

    for s in sides:
        pid = s.prompt_id if isinstance(s, TOPK) else s.prompt_ids
        if pid is not None:
            return pid
    return None


def _write_per_token(tmp, names, results, prompt_ids):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for name, st in zip(names, results):
        n = st.n_tokens
        nan = np.full(n, np.nan)
        pid = prompt_ids if prompt_ids is not None else np.full(n, -1, np.int64)
        tables.append(pa.table({
            "model": pa.array([name] * n),
            "token_index": np.arange(n, dtype=np.int64),
            "prompt_id": pa.array(list(pid)) if getattr(pid, "dtype", None) == object else pid,
            "label": st.labels if st.labels is not None else np.full(n, -1, np.int64),
            "kld_lower": st.kld_lower, "kld_upper": st.kld_upper,
            "top1_ref": st.top1_ref, "top1_q": st.top1_q, "top1_agree": st.top1_agree,
            "nll_ref": st.nll_ref if st.nll_ref is not None else nan,
            "nll_q": st.nll_q if st.nll_q is not None else nan,
            "delta_p": st.delta_p if st.delta_p is not None else nan,
        }))
    pq.write_table(pa.concat_tables(tables), tmp)
