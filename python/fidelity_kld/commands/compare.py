"""`fidelity-kld compare REF QUANT...`: stream dumps through the core, print llama.cpp-style
statistics per model, optionally write JSON, per-token and per-prompt Parquet."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

import click
import numpy as np

from .. import __version__
from ..cli import InputError, Terminated
from .._atomic import atomic_output

EXAMPLE_FILES = ("base.kld", "q4_k_m.kld")


def _fmt_pm(value: float, se: float, width: int = 10, prec: int = 6) -> str:
    return f"{value:{width}.{prec}f} ± {se:{width}.{prec}f}"


def format_summary(s: dict) -> str:
    """llama-perplexity --kl-divergence's final statistics, same names and order (with the
    95% KLD line newer versions print, without the duplicated 99% line), then our extras."""
    g = _getter(s)
    lines = []
    if s.get("has_labels"):
        lines += [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {_fmt_pm(g('ppl_q'), g('ppl_q_se'))}",
            f"Mean PPL(base)                : {_fmt_pm(g('ppl_ref'), g('ppl_ref_se'))}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * g('cor_nll'):6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {_fmt_pm(g('ln_ppl_ratio'), g('ln_ppl_ratio_se'))}",
            f"Mean PPL(Q)/PPL(base)         : {_fmt_pm(g('ppl_ratio'), g('ppl_ratio_se'))}",
            f"Mean PPL(Q)-PPL(base)         : {_fmt_pm(g('ppl_diff'), g('ppl_diff_se'))}",
        ]
    k = _getter(s["kld"])
    kp = _getter(s["kld"]["percentiles"])
    lines += [
        "====== KL divergence statistics ======",
        f"Mean    KLD: {_fmt_pm(k('mean'), k('se'))}",
        f"Maximum KLD: {k('max'):10.6f}",
        f"99.9%   KLD: {kp('99.9'):10.6f}",
        f"99.0%   KLD: {kp('99'):10.6f}",
        f"95.0%   KLD: {kp('95'):10.6f}",
        f"Median  KLD: {k('median'):10.6f}",
        f"10.0%   KLD: {kp('10'):10.6f}",
        f" 5.0%   KLD: {kp('5'):10.6f}",
        f" 1.0%   KLD: {kp('1'):10.6f}",
        f"Minimum KLD: {k('min'):10.6f}",
    ]
    lines.append("====== Token probability statistics ======")
    if s.get("has_labels"):
        d = _getter(s["delta_p"])
        dp = _getter(s["delta_p"]["percentiles"])
        lines += [
            f"Mean    Δp: {100 * d('mean'):6.3f} ± {100 * d('se'):5.3f} %",
            f"Maximum Δp: {100 * d('max'):6.3f}%",
        ]
        for key, label in (("99.9", "99.9%"), ("99", "99.0%"), ("95", "95.0%"), ("90", "90.0%"),
                           ("75", "75.0%")):
            lines.append(f"{label:<8}Δp: {100 * dp(key):6.3f}%")
        lines.append(f"Median  Δp: {100 * d('median'):6.3f}%")
        for key, label in (("25", "25.0%"), ("10", "10.0%"), ("5", " 5.0%"), ("1", " 1.0%"),
                           ("0.1", " 0.1%")):
            lines.append(f"{label:<8}Δp: {100 * dp(key):6.3f}%")
        lines += [
            f"Minimum Δp: {100 * d('min'):6.3f}%",
            f"RMS Δp    : {100 * g('rms_delta_p'):6.3f} ± {100 * g('rms_delta_p_se'):5.3f} %",
        ]
    lines.append(f"Same top p: {100 * g('same_top'):6.3f} ± {100 * g('same_top_se'):5.3f} %")
    r = _getter(s["kld_reverse"])
    lines += [
        "====== fidelity-kld extras ======",
        f"Mean reverse KLD KL(Q||base): {_fmt_pm(r('mean'), r('se'))}",
        f"Mean entropy of base        : {g('entropy_ref_mean'):10.6f}",
        f"Tokens: {s['n_tokens']} ({s['n_invalid']} invalid, excluded; "
        f"{s['n_kld_inf']} with infinite KLD)",
    ]
    if s.get("llama_compat"):
        lines.append("Definitions: llama.cpp's (KLD over base log-probs > -16, float32 percentiles)")
    return "\n".join(lines)


def _getter(d: dict):
    def get(key):
        v = d.get(key)
        if v is None:
            return math.nan
        if isinstance(v, str):
            return float(v)
        return v
    return get


class _ProgressLine:
    """One self-overwriting stderr line: tokens, tokens/s, GB/s."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.last = 0.0

    def __call__(self, p) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.2 and p.tokens_done < p.tokens_total:
            return
        self.last = now
        rate = p.tokens_done / p.seconds if p.seconds > 0 else 0.0
        gbs = p.bytes_read / p.seconds / 1e9 if p.seconds > 0 else 0.0
        pct = 100.0 * p.tokens_done / max(p.tokens_total, 1)
        sys.stderr.write(f"\r{p.tokens_done}/{p.tokens_total} tokens ({pct:5.1f}%)  "
                         f"{rate:,.0f} tok/s  {gbs:6.2f} GB/s ")
        if p.tokens_done >= p.tokens_total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _read_ids(path: str, what: str) -> np.ndarray:
    from ..io import DumpError
    from ..io.npy import read_header

    try:
        if path.endswith(".npy"):
            # header checked against the file size, then mapped, not loaded: np.load would
            # allocate whatever sizes the header claims
            read_header(path, os.path.getsize(path))
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            arr = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except DumpError as e:
        raise InputError(f"{e} (reading {what})") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read {what}: {e}") from None
    arr = np.asarray(arr).reshape(-1)
    if arr.dtype.kind not in "iu":
        raise InputError(f"{path}: {what} must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _term_handler(signum, frame):
    raise Terminated


@click.command("compare")
@click.argument("ref", required=False, type=click.Path(dir_okay=True))
@click.argument("quants", nargs=-1, type=click.Path(dir_okay=True))
@click.option("--example", is_flag=True, help="Run on the example data shipped in the package.")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False),
              help="Token ids (.npy or one integer per line) if the dumps carry none.")
@click.option("--prompt-ids", "prompt_ids_path", type=click.Path(exists=True, dir_okay=False),
              help="Prompt id of each token (.npy or text), for per-prompt output.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="What to print on stdout.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write the JSON summary (every number) to this file.")
@click.option("--per-token", type=click.Path(dir_okay=False),
              help="Write per-token statistics of every model to this Parquet file.")
@click.option("--per-prompt", type=click.Path(dir_okay=False),
              help="Write per-prompt statistics (needs prompt ids) to this Parquet file.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: all cores).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to compute.")
@click.option("--dtype", "dtype_override", type=click.Choice(["bfloat16"]), default=None,
              help="Declare uint16 .npy dumps as bfloat16.")
@click.option("--definitions", type=click.Choice(["auto", "llama", "exact"]), default="auto",
              show_default=True,
              help="llama: llama.cpp's (default when REF is a llama.cpp file); exact: DESIGN.md's "
                   "full-vocabulary definitions.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line on stderr.")
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="Compute on a Ray cluster (auto: the one this machine belongs to); the dumps "
                   "must be at the same paths on every node. --threads: cores per task.")
@click.option("--ray-tasks", type=click.IntRange(min=1), default=None,
              help="With --ray: about this many token ranges (default: 2 per worker).")
def command(ref, quants, example, labels_path, prompt_ids_path, fmt, output, per_token,
            per_prompt, threads, device, dtype_override, definitions, quiet, ray_address,
            ray_tasks):
    """Compare a reference dump REF with one or more quantized dumps QUANT.

    Dumps: llama.cpp --kl-divergence-base files, .npy, safetensors, Arrow IPC, Parquet, or
    a directory of shards. Prints llama.cpp-style statistics for each model.
    """
    if example:
        if ref or quants:
            raise click.UsageError("--example takes no REF/QUANT arguments")
        base = resources.files("fidelity_kld") / "data" / "example"
        ref, quants = str(base / EXAMPLE_FILES[0]), (str(base / EXAMPLE_FILES[1]),)
    if not ref or not quants:
        raise click.UsageError("give REF and at least one QUANT (or --example)")
    if ray_tasks and not ray_address:
        raise click.UsageError("--ray-tasks needs --ray")
    previous = signal.signal(signal.SIGTERM, _term_handler)
    try:
        _run(ref, quants, labels_path, prompt_ids_path, fmt, output, per_token, per_prompt,
             threads, device, dtype_override, definitions, quiet, ray_address, ray_tasks)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(ref, quants, labels_path, prompt_ids_path, fmt, output, per_token, per_prompt,
         threads, device, dtype_override, definitions, quiet, ray_address=None, ray_tasks=None):
    from ..io import check_compatible, open_source
    from ..stats.per_prompt import per_prompt as per_prompt_table
    from ..stats.summary import summarize
    from ..stream import compare_sources

    with ExitStack() as stack:
        try:
            ref_src = stack.enter_context(open_source(ref, dtype=dtype_override))
            q_srcs = [stack.enter_context(open_source(q, dtype=dtype_override)) for q in quants]
            for q in q_srcs:
                check_compatible(ref_src, q)
        except ValueError as e:  # DumpError included
            raise InputError(str(e)) from None
        labels = _read_ids(labels_path, "labels") if labels_path else None
        if labels is not None:
            if labels.size != ref_src.n_tokens:
                raise InputError(f"{labels_path}: {labels.size} labels for {ref_src.n_tokens} tokens in {ref}")
            if labels.size and (labels.min() < 0 or labels.max() >= ref_src.vocab):
                raise InputError(f"{labels_path}: label outside the vocabulary [0, {ref_src.vocab})")
        prompt_ids = _read_ids(prompt_ids_path, "prompt ids") if prompt_ids_path else ref_src.prompt_ids
        if prompt_ids is None:
            prompt_ids = next((q.prompt_ids for q in q_srcs if q.prompt_ids is not None), None)
        if prompt_ids is not None and prompt_ids.size != ref_src.n_tokens:
            raise InputError(f"{prompt_ids_path or ref}: {prompt_ids.size} prompt ids for {ref_src.n_tokens} tokens")
        if per_prompt and prompt_ids is None:
            raise InputError(f"{ref}: --per-prompt needs prompt ids (the dumps carry none; use --prompt-ids)")
        parity = {"auto": None, "llama": True, "exact": False}[definitions]
        if parity and ref_src.dtype != "llama_u16":
            raise InputError(f"{ref}: --definitions llama needs a llama.cpp reference file")
        show = not quiet and sys.stderr.isatty()
        try:
            if ray_address:  # the same per-token arrays, computed by Ray tasks
                from .. import distributed
                results = distributed.compare_sources(
                    ref_src, q_srcs, labels=labels, prompt_ids=prompt_ids, threads=threads,
                    llama_parity=parity, tasks=ray_tasks, device=device, address=ray_address,
                    progress=None if quiet else distributed.ProgressPrinter())
            else:
                compare_fn, compare_many_fn = _compare_fns(device)
                results = compare_sources(ref_src, q_srcs, labels=labels, threads=threads,
                                          llama_parity=parity, progress=_ProgressLine(show),
                                          compare_fn=compare_fn, compare_many_fn=compare_many_fn)
        except ValueError as e:
            raise InputError(str(e)) from None
        names = _model_names(quants)
        summaries = [summarize(st).to_dict() for st in results]
        for qpath, s in zip(quants, summaries):  # excluded, never averaged in unannounced
            if s["n_invalid"]:
                click.echo(f"warning: {qpath} vs {ref}: {s['n_invalid']} of {s['n_tokens']} tokens "
                           "have NaN or +inf logits, or no finite logit; excluded from every "
                           "statistic", err=True)
        doc = {
            "fidelity_kld_version": __version__,
            "reference": {"path": os.fspath(ref), "format": ref_src.format,
                          "n_tokens": ref_src.n_tokens, "vocab": ref_src.vocab,
                          "dtype": ref_src.dtype},
            "models": [{"name": n, "path": os.fspath(p), "format": src.format, "dtype": src.dtype,
                        "summary": s}
                       for n, p, src, s in zip(names, quants, q_srcs, summaries)],
        }
        # Every output is written under a temporary name first; they are moved into place
        # together when all are complete, so an error or interrupt leaves none of them.
        with ExitStack() as outputs:
            if output:
                Path(outputs.enter_context(atomic_output(output))).write_text(
                    json.dumps(doc, indent=2) + "\n")
            if per_token:
                _write_per_token(outputs.enter_context(atomic_output(per_token)), names,
                                 results, prompt_ids)
            if per_prompt:
                _write_per_prompt(outputs.enter_context(atomic_output(per_prompt)), names,
                                  results, prompt_ids, per_prompt_table)
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2))
    else:
        for name, s in zip(names, summaries):
            click.echo(f"### {name} vs {Path(ref).name}  ({s['n_tokens']} tokens)")
            click.echo(format_summary(s))
            click.echo("")


def _model_names(paths) -> list[str]:
    names = [Path(p).name for p in paths]
    stems = [Path(p).stem if Path(p).suffix else Path(p).name for p in paths]
    return stems if len(set(stems)) == len(stems) else names if len(set(names)) == len(names) else [str(p) for p in paths]


def _compare_fns(device: str):
    """(compare one model's chunk, compare all models' chunks): the CPU core, or for
    --device cuda the GPU with host chunks staged through pinned buffers
    (fidelity_kld.gpu.PinnedStager; the reference staged once for all models)."""
    from ..ops import compare, compare_many

    if device != "cuda":  # 'auto': file chunks are on the host, so the CPU core
        return compare, compare_many
    try:
        from ..gpu import PinnedStager
        stager = PinnedStager()
    except (ImportError, RuntimeError) as e:
        raise InputError(f"--device cuda: GPU support is not available ({e})") from None
    return stager.compare, stager.compare_many


def _write_per_token(tmp, names, results, prompt_ids):
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for name, st in zip(names, results):
            n = st.n_tokens
            cols = {
                "model": pa.array([name] * n).dictionary_encode(),
                "token_index": np.arange(n, dtype=np.int64),
                "prompt_id": prompt_ids if prompt_ids is not None else np.full(n, -1, np.int64),
                "label": st.labels if st.labels is not None else np.full(n, -1, np.int64),
                "kld": st.kld,
                "kld_reverse": st.kld_reverse,
                "top1_ref": st.top1_ref,
                "top1_q": st.top1_q,
                "top1_agree": st.top1_agree,
                "nll_ref": st.nll_ref if st.nll_ref is not None else np.full(n, np.nan),
                "nll_q": st.nll_q if st.nll_q is not None else np.full(n, np.nan),
                "delta_p": st.delta_p if st.delta_p is not None else np.full(n, np.nan),
            }
            if st.kld_llama is not None:
                cols["kld_llama"] = st.kld_llama
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _write_per_prompt(tmp, names, results, prompt_ids, table_fn):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for name, st in zip(names, results):
        if st.kld_llama is not None:  # per-prompt KLD under the definitions the summary used
            from dataclasses import replace
            st = replace(st, kld=st.kld_llama)
        cols = table_fn(st, prompt_ids)
        n = len(cols["prompt_id"])
        tables.append(pa.table({"model": pa.array([name] * n), **cols}))
    pq.write_table(pa.concat_tables(tables), tmp)
