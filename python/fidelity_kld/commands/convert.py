"""`fidelity-kld convert IN OUT`: rewrite a logit dump in another format, streaming."""

from __future__ import annotations

import os

import click

from ..cli import InputError


@click.command("convert")
@click.argument("src", metavar="IN")
@click.argument("dst", metavar="OUT")
@click.option("--to", "to", type=click.Choice(["npy", "safetensors", "arrow", "parquet"]), default=None,
              help="Output format (default: from OUT's extension).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Logit dtype to write (default: the input's; float32 for llama.cpp files).")
@click.option("--input-dtype", type=click.Choice(["bfloat16"]), default=None,
              help="Declare uint16 input logits as bfloat16 bit patterns.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=None,
              help="Write a top-k log-prob dump (Parquet) with this k instead of full logits.")
def command(src: str, dst: str, to: str | None, dtype: str | None, input_dtype: str | None,
            top_k: int | None) -> None:
    """Convert the logit dump IN (file, directory of shards or quoted glob) to OUT.

    A llama.cpp --kl-divergence-base file is decoded to float32 log-probabilities; labels
    and prompt ids are written alongside. OUT appears only when complete."""
    from ..io import DumpError, convert, open_source

    from ..io.hidden import is_hidden_file
    from ..io.topk import is_topk_file

    if is_topk_file(src) or is_hidden_file(src):  # nothing to rebuild full logits from
        raise InputError(f"{src}: a {'top-k' if is_topk_file(src) else 'hidden-state'} dump; "
                         "convert reads full logit dumps (compare reads this one directly)")
    if top_k is not None:  # a smaller dump: fidelity_kld.io.topk
        return _convert_topk(src, dst, top_k, input_dtype)
    try:
        with open_source(src, dtype=input_dtype) as source:
            fmt = convert(source, dst, to=to, dtype=dtype)
            n, v = source.n_tokens, source.vocab
            out_dtype = dtype or ("float32" if source.dtype == "llama_u16" else source.dtype)
    except DumpError as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise InputError(f"{e.filename or dst}: {e.strerror or e}") from None
    click.echo(f"wrote {dst} ({fmt}, {n} tokens x {v} {out_dtype}, {os.path.getsize(dst)} bytes)")


def _convert_topk(src: str, dst: str, k: int, input_dtype: str | None) -> None:
    from ..io import DumpError, open_source
    from ..io.topk import convert_to_topk

    try:
        with open_source(src, dtype=input_dtype) as source:
            n = convert_to_topk(source, dst, k)
            v = source.vocab
    except DumpError as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise InputError(f"{e.filename or dst}: {e.strerror or e}") from None
    click.echo(f"wrote {dst} (top-k log-probs, {n} tokens, k = {k} of {v}, "
               f"{os.path.getsize(dst)} bytes)")
