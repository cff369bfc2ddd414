"""`fidelity-kld compare REF QUANT...`: stream dumps through the core, print llama.cpp-style
statistics per model, optionally write JSON, per-token and per-prompt Parquet."""

from __future__ import annotations

import json
import os
import signal
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

import click
import numpy as np

from .. import __version__
from ..cli import InputError, Terminated
from .._atomic import atomic_output
from . import _format
from ._progress import ProgressReporter
from ._running import LiveRunning

EXAMPLE_FILES = ("base.kld", "q4_k_m.kld")
EXAMPLE_NOTE = ("Example data shipped in the package: llama.cpp --kl-divergence-base files of one "
                "256-token chunk (127 scored tokens, vocabulary 8000) of the project's tiny-llama "
                "test model and its Q4_K_M quantization. The README's figures are over all 6 "
                "chunks (762 tokens) of tests/data/base.kld and Q4_K_M.kld, so they differ.")


def _read_ids(path: str, what: str) -> np.ndarray:
    from ..io import DumpError
    from ..io.ids import read_ids_file

    try:
        return read_ids_file(path, what)
    except DumpError as e:
        raise InputError(str(e)) from None


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
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text",
              show_default=True, help="What to print on stdout (markdown: the tables only).")
@click.option("--name", "names_given", multiple=True,
              help="Label of each QUANT in the output, in order (default: file stems).")
@click.option("--sort", type=click.Choice(list(_format.COMPACT_COLUMNS)), default="given",
              show_default=True, help="Order of the compact table's rows (best first).")
@click.option("--paired", is_flag=True,
              help="Paired comparison of each model against the baseline on the same tokens: "
                   "difference of mean KLD, same top and ln PPL ratio with paired SE and "
                   "bootstrap CI, and whether the data can tell them apart.")
@click.option("--baseline", default=None,
              help="The model (--name or file stem) the others are paired against "
                   "(default: the first QUANT).")
@click.option("--top-tokens", type=click.IntRange(min=0), default=0,
              help="List the N most divergent tokens (largest KLD) of each model.")
@click.option("--top-prompts", type=click.IntRange(min=0), default=0,
              help="List the N prompts with the largest mean KLD, with their worst token.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True),
              help="SentencePiece .model file or Hugging Face tokenizer directory: show token "
                   "text and context in the listings.")
@click.option("--brief", is_flag=True,
              help="Text: leave out each model's full statistics (the tables, listings and "
                   "--direction sections only).")
@click.option("--direction", is_flag=True,
              help="Direction-aware metrics (docs/definitions.md): whether the quant's changes "
                   "hurt or help against the labels (harmful/helpful parts of Δnll, top-1 "
                   "flips, top-5 changes, margin loss), TVD and JSD, and the KLD split by the "
                   "reference's confidence and correctness. Asks the core for its optional "
                   "outputs (extra passes over each row); adds a Direction section to the "
                   "text, a direction object to each JSON summary, and columns to --per-token "
                   "and --per-prompt.")
@click.option("--running", is_flag=True,
              help="Print llama.cpp-style running estimates after each prompt (chunk).")
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
              help="llama: llama.cpp's (default when REF is a llama.cpp file, or its conversion); "
                   "exact: the full-vocabulary definitions (docs/definitions.md).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--bad-rows", type=click.Choice(["refuse", "invalid"]), default="refuse",
              show_default=True, help="Corrupt llama.cpp rows: refuse the file, or count them "
                                      "as invalid tokens (against a top-k dump they are "
                                      "always refused).")
@click.option("--override-labels", is_flag=True,
              help="Use --labels even where the dumps carry different labels.")
@click.option("--gap-threshold", type=float, default=0.01, show_default=True,
              help="Top-k dumps: count tokens whose KLD bounds are further apart (nats).")
@click.option("--shared-lm-head", is_flag=True,
              help="Hidden-state dumps: score every model through the reference's lm_head.")
@click.option("--lm-head", "lm_head", type=click.Path(exists=True),
              help="Hidden-state dumps: the reference's lm_head (model dir or safetensors).")
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="Compute on a Ray cluster (auto: the one this machine belongs to); the dumps "
                   "must be at the same paths on every node. --threads: cores per task.")
@click.option("--ray-tasks", type=click.IntRange(min=1), default=None,
              help="With --ray: about this many token ranges (default: 2 per worker).")
def command(ref, quants, example, labels_path, prompt_ids_path, fmt, names_given, sort, paired,
            baseline, top_tokens, top_prompts, tokenizer_path, brief, direction, running, output,
            per_token,
            per_prompt, threads, device, dtype_override, definitions, quiet, bad_rows,
            override_labels, gap_threshold, shared_lm_head, lm_head, ray_address, ray_tasks):
    """Compare a reference dump REF with one or more quantized dumps QUANT.

    Dumps: llama.cpp --kl-divergence-base files, .npy, safetensors, Arrow IPC, Parquet, or
    a directory of shards (docs/formats.md). Prints llama.cpp-style statistics for each
    model, then (several models) one compact table; definitions: docs/definitions.md.
    """
    if example:
        if ref or quants:
            raise click.UsageError("--example takes no REF/QUANT arguments")
        base = resources.files("fidelity_kld") / "data" / "example"
        ref, quants = str(base / EXAMPLE_FILES[0]), (str(base / EXAMPLE_FILES[1]),)
        if fmt != "json":
            click.echo(EXAMPLE_NOTE + "\n")
    if not ref or not quants:
        raise click.UsageError("give REF and at least one QUANT (or --example)")
    if names_given and len(names_given) != len(quants):
        raise click.UsageError(f"--name given {len(names_given)} times for {len(quants)} models")
    if paired and len(quants) < 2:
        raise click.UsageError("--paired needs at least two QUANT models")
    if sort in _format.DIRECTION_SORT_KEYS and not direction:
        raise click.UsageError(f"--sort {sort} needs --direction")
    if names_given and len(set(names_given)) != len(names_given):
        raise click.UsageError("--name labels must be distinct")
    names = list(names_given) if names_given else _model_names(quants)
    if baseline is not None and baseline not in names:
        raise click.UsageError(f"--baseline {baseline!r} is none of the models ({', '.join(names)})")
    view = dict(fmt=fmt, names=names, sort=sort, paired=paired or baseline is not None,
                baseline=baseline or names[0], top_tokens=top_tokens, top_prompts=top_prompts,
                tokenizer_path=tokenizer_path, running=running, brief=brief, direction=direction)
    from ..io import DumpError
    from ..io.paths import check_outputs

    try:  # before anything is read, whatever kind of dump
        check_outputs({"--output": output, "--per-token": per_token, "--per-prompt": per_prompt},
                      [ref, *quants, labels_path, prompt_ids_path])
    except DumpError as e:
        raise InputError(str(e)) from None
    from ..io.hidden import is_hidden_file
    from ..topk_compare import is_topk

    if ray_tasks and not ray_address:
        raise click.UsageError("--ray-tasks needs --ray")
    ray = dict(ray_address=ray_address, ray_tasks=ray_tasks, quiet=quiet)
    if direction and (is_hidden_file(ref) or any(is_hidden_file(q) for q in quants)
                      or is_topk(ref) or any(is_topk(q) for q in quants)):
        raise click.UsageError("--direction needs full logit dumps (not hidden-state or top-k dumps)")
    if is_hidden_file(ref) or any(is_hidden_file(q) for q in quants):  # logits from h @ W.T
        from .compare_hidden import run_hidden_compare

        return run_hidden_compare(ref, quants, fmt=fmt, output=output, per_token=per_token,
                                  per_prompt=per_prompt, threads=threads, device=device,
                                  shared_lm_head=shared_lm_head, lm_head=lm_head, view=view,
                                  **ray)
    if is_topk(ref) or any(is_topk(q) for q in quants):  # bounds, not the exact core
        from .compare_topk import run_topk_compare

        return run_topk_compare(ref, quants, fmt=fmt, output=output, per_token=per_token,
                                per_prompt=per_prompt, gap_threshold=gap_threshold,
                                dtype_override=dtype_override, labels_path=labels_path,
                                view=view, bad_rows=bad_rows, **ray)
    previous = signal.signal(signal.SIGTERM, _term_handler)
    try:
        _run(ref, quants, labels_path, prompt_ids_path, output, per_token, per_prompt,
             threads, device, dtype_override, definitions, quiet, view, bad_rows,
             override_labels, ray_address, ray_tasks)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(ref, quants, labels_path, prompt_ids_path, output, per_token, per_prompt,
         threads, device, dtype_override, definitions, quiet, view, bad_rows, override_labels,
         ray_address=None, ray_tasks=None):
    from ..io import DumpError, check_compatible, open_source
    from ..io.conversion import llama_rows
    from ..io.ids import check_given_labels
    from ..io.llama import check_rows
    from ..stats.per_prompt import per_prompt as per_prompt_table
    from ..stats.summary import summarize
    from ..stream import compare_sources

    with ExitStack() as stack:
        try:
            # llama_rows: a float32 conversion of a llama.cpp file is read back as the llama.cpp
            # rows it came from, so it is compared under the same definitions as the original
            ref_src = stack.enter_context(llama_rows(open_source(ref, dtype=dtype_override)))
            q_srcs = [stack.enter_context(llama_rows(open_source(q, dtype=dtype_override)))
                      for q in quants]
            for q in q_srcs:
                check_compatible(ref_src, q)
            for src in (ref_src, *q_srcs):
                _warn_unrestored(src)
        except ValueError as e:  # DumpError included
            raise InputError(str(e)) from None
        labels = _read_ids(labels_path, "labels") if labels_path else None
        if labels is not None:
            if labels.size != ref_src.n_tokens:
                raise InputError(f"{labels_path}: {labels.size} labels for {ref_src.n_tokens} tokens in {ref}")
            if labels.size and (labels.min() < 0 or labels.max() >= ref_src.vocab):
                raise InputError(f"{labels_path}: label outside the vocabulary [0, {ref_src.vocab})")
            try:
                check_given_labels(labels_path, labels, [ref_src, *q_srcs], override_labels)
            except DumpError as e:
                raise InputError(str(e)) from None
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
        compare_fn, compare_many_fn = _compare_fns(device) if not ray_address else (None, None)
        extra = "all" if view["direction"] else ()  # "all": the label group only with labels
        reporter, live = ProgressReporter(not quiet), None
        if view["running"] and view["fmt"] == "text" and not ray_address:
            # running lines printed as the prompts complete, as llama.cpp does (_running.py)
            live = LiveRunning(view["names"], Path(ref).name, prompt_ids, ref_src.n_tokens,
                               progress=reporter)
            compare_fn, compare_many_fn = live.wrap(compare_fn, compare_many_fn)
        try:
            if ray_address:  # the same per-token arrays, computed by Ray tasks
                from .. import distributed
                results = distributed.compare_sources(
                    ref_src, q_srcs, labels=labels, prompt_ids=prompt_ids, threads=threads,
                    llama_parity=parity, tasks=ray_tasks, device=device, address=ray_address,
                    progress=None if quiet else distributed.ProgressPrinter(), extra=extra)
            else:
                results = compare_sources(ref_src, q_srcs, labels=labels, threads=threads,
                                          llama_parity=parity, progress=reporter,
                                          compare_fn=compare_fn, compare_many_fn=compare_many_fn,
                                          extra=extra)
            results = check_rows(ref_src, q_srcs, results, bad_rows)
        except ValueError as e:
            raise InputError(str(e)) from None
        names = view["names"]
        summaries = [summarize(st).to_dict() for st in results]
        for qpath, s in zip(quants, summaries):  # excluded, never averaged in unannounced
            if s["n_invalid"]:
                click.echo(f"warning: {qpath} vs {ref}: {s['n_invalid']} of {s['n_tokens']} tokens "
                           "have NaN or +inf logits, or no finite logit; excluded from every "
                           "statistic", err=True)
        extras = _analyses(names, results, prompt_ids, view)
        if live is not None:
            extras["running_live"] = True
        doc = {
            "fidelity_kld_version": __version__,
            "reference": {"path": os.fspath(ref), "format": ref_src.format,
                          "n_tokens": ref_src.n_tokens, "vocab": ref_src.vocab,
                          "dtype": ref_src.dtype},
            "models": [{"name": n, "path": os.fspath(p), "format": src.format, "dtype": src.dtype,
                        "summary": s}
                       for n, p, src, s in zip(names, quants, q_srcs, summaries)],
            **extras["json"],
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
    _print(ref, names, summaries, results, doc, extras, view)


def _analyses(names, results, prompt_ids, view) -> dict:
    """Paired comparisons, running lines and top-token listings asked for (from stats/)."""
    from ..stats.paired import compare_paired
    from ..stats.running import running_lines

    out = {"json": {}, "paired": None, "running": None, "top": None, "prompts": None,
           "running_live": False}
    if view["paired"]:
        base = names.index(view["baseline"])
        out["paired"] = {names[j]: compare_paired(names[j], results[j], names[base], results[base])
                         for j in range(len(names)) if j != base}
        out["json"]["paired"] = {"baseline": names[base],
                                 "comparisons": [pc.to_dict() for pc in out["paired"].values()]}
    if view["running"]:
        from dataclasses import asdict

        out["running"] = [running_lines(st, prompt_ids) for st in results]
        out["json"]["running"] = {n: [asdict(x) for x in lines]
                                  for n, lines in zip(names, out["running"])}
    if view["top_tokens"] or view["top_prompts"]:
        from ._tokens import load_tokenizer, top_prompt_rows, top_token_rows

        tok = load_tokenizer(view["tokenizer_path"]) if view["tokenizer_path"] else None
        if view["top_tokens"]:
            out["top"] = [top_token_rows(st, prompt_ids, view["top_tokens"], tok) for st in results]
            out["json"]["top_tokens"] = dict(zip(names, out["top"]))
        if view["top_prompts"]:
            if prompt_ids is None:
                raise InputError("--top-prompts needs prompt ids (the dumps carry none; use --prompt-ids)")
            out["prompts"] = [top_prompt_rows(st, prompt_ids, view["top_prompts"], tok)
                              for st in results]
            out["json"]["top_prompts"] = dict(zip(names, out["prompts"]))
    return out


def _print(ref, names, summaries, results, doc, extras, view) -> None:
    fmt = view["fmt"]
    if fmt == "json":
        from ..stats.summary import json_ready

        click.echo(json.dumps(json_ready(doc), indent=2))
        return
    blocks = []
    if fmt == "text" and (not view["brief"] or view["direction"]):
        for i, (name, s) in enumerate(zip(names, summaries)):
            text = f"### {name} vs {Path(ref).name}  ({s['n_tokens']} tokens)\n"
            if not view["brief"]:
                if extras["running"] is not None and not extras["running_live"]:
                    text += _format.format_running(extras["running"][i]) + "\n\n"
                text += _format.format_summary(s) + "\n\n"
            if s.get("direction") is not None:  # asked for: kept under --brief too
                text += _format.format_direction(s["direction"])
            blocks.append(text.rstrip("\n"))
    if len(names) > 1 or fmt == "markdown" or view["brief"]:
        head = f"Compact table: {len(names)} model(s) vs {Path(ref).name}"
        table = _format.compact_table(names, summaries, sort=view["sort"], paired=extras["paired"],
                                      baseline=view["baseline"], fmt=fmt)
        blocks.append(f"**{head}**\n\n{table}" if fmt == "markdown" else f"{head}\n{table}")
    for pc in (extras["paired"] or {}).values():
        blocks.append(_format.format_paired(pc, fmt))
    for name, rows in zip(names, extras["top"] or ()):
        blocks.append(_format.format_top_tokens(name, rows, fmt))
    for name, rows in zip(names, extras["prompts"] or ()):
        blocks.append(_format.format_top_tokens(
            name, rows, fmt, title=f"Prompts with the largest mean KLD (and their worst token): {name}"))
    click.echo("\n\n".join(blocks) + "\n")


def _warn_unrestored(src) -> None:
    """A conversion of a llama.cpp file that cannot be read back as its rows (float16 or
    bfloat16) holds log-probs that are compared as logits, i.e. renormalised: say so."""
    from ..io.conversion import values_of

    if src.dtype != "llama_u16" and values_of(src) == "log_probs":
        click.echo(f"warning: {src.path} holds llama.cpp log-probs rounded to {src.dtype}; they "
                   "are compared as logits (renormalised), not under llama.cpp's definitions "
                   "(convert to float32 to keep them)", err=True)


def _model_names(paths) -> list[str]:
    """File stems, else file names, else paths, whichever are distinct; the same file given
    twice gets #2, #3, ... so that every model has its own label."""
    names = [Path(p).name for p in paths]
    stems = [Path(p).stem if Path(p).suffix else Path(p).name for p in paths]
    for candidate in (stems, names):
        if len(set(candidate)) == len(candidate):
            return candidate
    out, seen = [], {}
    for p in map(str, paths):
        seen[p] = seen.get(p, 0) + 1
        out.append(p if seen[p] == 1 else f"{p}#{seen[p]}")
    return out


def _compare_fns(device: str):
    """(compare one model's chunk, compare all models' chunks): the CPU core, or for
    --device cuda the GPU with host chunks staged through pinned buffers
    (fidelity_kld.gpu.PinnedStager; the reference staged once for all models)."""
    from functools import partial

    from ..ops import compare, compare_many

    if device != "cuda":  # 'auto': file chunks are on the host, so the CPU core
        # corrupt llama.cpp rows are screened per file after the stream (check_rows)
        return partial(compare, bad_rows="keep"), partial(compare_many, bad_rows="keep")
    try:
        from ..gpu import PinnedStager
        stager = PinnedStager()
    except (ImportError, RuntimeError) as e:
        raise InputError(f"--device cuda: GPU support is not available ({e})") from None
    return stager.compare, stager.compare_many


PER_TOKEN_DOC = ("one row per (model, token); kld: full-vocabulary KL(P_ref||P_q) in nats; "
                 "kld_llama (llama.cpp definitions only): llama.cpp's windowed KLD; "
                 "fidelity_kld.summary_kld names the column the printed summary used; "
                 "with --direction also logp_top1/2_ref/q, rank_ref_y/q_y, margin_ref/q, tvd, "
                 "jsd; docs/formats.md lists every column")


def _write_per_token(tmp, names, results, prompt_ids):
    """Every per-token output the API has (TokenStats), per model, the optional ones when
    computed (--direction); the schema metadata says which KLD column the summary used and
    under which definitions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..stats.direction import DIRECTION_OUTPUTS

    writer = None
    try:
        for name, st in zip(names, results):
            n = st.n_tokens
            nan = np.full(n, np.nan)
            cols = {
                "model": pa.array([name] * n).dictionary_encode(),
                "token_index": np.arange(n, dtype=np.int64),
                "prompt_id": prompt_ids if prompt_ids is not None else np.full(n, -1, np.int64),
                "label": st.labels if st.labels is not None else np.full(n, -1, np.int64),
                "kld": st.kld,
                "kld_reverse": st.kld_reverse,
                "entropy_ref": st.entropy_ref,
                "lse_ref": st.lse_ref,
                "lse_q": st.lse_q,
                "top1_ref": st.top1_ref,
                "top1_q": st.top1_q,
                "top1_agree": st.top1_agree,
                "nll_ref": st.nll_ref if st.nll_ref is not None else nan,
                "nll_q": st.nll_q if st.nll_q is not None else nan,
                "p_ref_y": st.p_ref_y if st.p_ref_y is not None else nan,
                "p_q_y": st.p_q_y if st.p_q_y is not None else nan,
                "delta_p": st.delta_p if st.delta_p is not None else nan,
            }
            if st.kld_llama is not None:
                cols["kld_llama"] = st.kld_llama
            for name in DIRECTION_OUTPUTS:  # compare --direction's optional outputs
                if getattr(st, name, None) is not None:
                    cols[name] = getattr(st, name)
            llama = st.kld_llama is not None
            table = pa.table(cols).replace_schema_metadata({
                "fidelity_kld.summary_kld": "kld_llama" if llama else "kld",
                "fidelity_kld.definitions": "llama" if llama else "exact",
                "fidelity_kld.columns": PER_TOKEN_DOC,
            })
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
