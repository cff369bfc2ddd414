"""`fidelity-kld info FILE`: what a logit dump holds, read from its headers (no logits decoded)."""

from __future__ import annotations

import json
import os

import click

from ..cli import InputError

FORMAT_NAMES = {
    "llama": "llama.cpp --kl-divergence-base",
    "npy": "NumPy .npy",
    "safetensors": "safetensors",
    "arrow": "Arrow IPC file",
    "parquet": "Parquet",
}


def describe(src) -> dict:
    """A JSON-ready description of an open LogitSource."""
    from ..io.conversion import values_of

    files = src.files()
    size = sum(os.path.getsize(f) for f in files)
    shape = [src.n_tokens, src.header["row_words"]] if src.dtype == "llama_u16" else [src.n_tokens, src.vocab]
    out = {
        "path": src.path,
        "format": src.format,
        "format_name": FORMAT_NAMES.get(src.format, src.format),
        "tokens": src.n_tokens,
        "vocab": src.vocab,
        "dtype": src.dtype,
        "stored_shape": shape,
        "size_bytes": size,
        "files": files,
        "values": values_of(src),
        "labels": src.labels is not None,
        "prompt_ids": src.prompt_ids is not None,
        "prompts": int(len(set(src.prompt_ids.tolist()))) if src.prompt_ids is not None else None,
        "header": src.header,
    }
    if "shards" in src.header:
        out["shards"] = len(src.header["shards"])
    return out


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _text(d: dict) -> str:
    dtype = d["dtype"]
    if dtype == "llama_u16":
        dtype += " (16-bit log-prob codes, per-row scale and minimum)"
    lines = [
        f"path:        {d['path']}",
        f"format:      {d['format_name']}" + (f" ({d['shards']} shards)" if "shards" in d else ""),
        f"tokens:      {d['tokens']}",
        f"vocab:       {d['vocab']}",
        f"dtype:       {dtype}",
        f"shape:       {' x '.join(str(s) for s in d['stored_shape'])} (stored)",
        f"size:        {d['size_bytes']} bytes ({_human(d['size_bytes'])}) in {len(d['files'])} file(s)",
        f"values:      " + ("log-probabilities (llama.cpp's, not renormalised)"
                            if d["values"] == "log_probs" else "logits"),
        f"labels:      {'yes' if d['labels'] else 'no'}",
        f"prompt ids:  " + (f"yes ({d['prompts']} prompts)" if d["prompt_ids"] else "no"),
        "header:",
    ]
    for k, v in d["header"].items():
        if v is None:  # e.g. a .npy file without a dtype sidecar: nothing to show
            continue
        if k == "shards":
            lines.append(f"  shards:")
            lines += [f"    {s['path']}: {s['n_tokens']} tokens" for s in v]
        elif isinstance(v, (dict, list)):
            lines.append(f"  {k}: {json.dumps(v, default=str)}")
        else:
            lines.append(f"  {k}: {v}")
    return "\n".join(lines)


@click.command("info")
@click.argument("path")
@click.option("--format", "out_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
@click.option("--dtype", type=click.Choice(["bfloat16"]), default=None,
              help="Declare uint16 logits as bfloat16 bit patterns.")
def command(path: str, out_format: str, dtype: str | None) -> None:
    """Describe the logit dump PATH (a file, a directory of shards or a quoted glob):
    format, shape, dtype, token count, size on disk, header fields, labels and prompt ids."""
    from ..io import DumpError, open_source

    small = _describe_smaller_dump(path)  # top-k and hidden-state dumps
    if small is not None:
        click.echo(json.dumps(small, indent=2, default=str) if out_format == "json" else
                   "\n".join(f"{k + ':':<16} {v}" for k, v in small.items()))
        return
    try:
        with open_source(path, dtype=dtype) as src:
            d = describe(src)
    except DumpError as e:
        raise InputError(str(e)) from None
    if out_format == "json":
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        click.echo(_text(d))


def _describe_smaller_dump(path: str) -> dict | None:
    """The description of a top-k or hidden-state dump; None for a full logit dump."""
    from ..io import DumpError
    from ..io.hidden import describe_hidden, is_hidden_file
    from ..io.topk import describe_topk, is_topk_file

    try:
        if is_topk_file(path):
            return describe_topk(path)
        if is_hidden_file(path):
            return describe_hidden(path)
    except DumpError as e:
        raise InputError(str(e)) from None
    return None
