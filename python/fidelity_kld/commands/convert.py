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
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def command(src: str, dst: str, to: str | None, dtype: str | None, input_dtype: str | None,
            top_k: int | None, quiet: bool) -> None:
    """Convert the logit dump IN (file, directory of shards or quoted glob) to OUT.

    A llama.cpp --kl-divergence-base file is decoded to float32 log-probabilities; its
    metadata says so, keeps each row's llama.cpp scale and minimum, and `compare` reads it
    back under llama.cpp's definitions (docs/formats.md). Labels and prompt ids are written
    alongside. OUT appears only when complete."""
    from ..io import DumpError, convert, open_source
    from ..io.conversion import llama_rows, output_format, values_of
    from ..io.paths import check_outputs, written_files
    from ._progress import ProgressReporter

    from ..io.hidden import is_hidden_file
    from ..io.topk import is_topk_file

    if is_topk_file(src) or is_hidden_file(src):  # nothing to rebuild full logits from
        raise InputError(f"{src}: a {'top-k' if is_topk_file(src) else 'hidden-state'} dump; "
                         "convert reads full logit dumps (compare reads this one directly)")
    if top_k is not None:  # a smaller dump: fidelity_kld.io.topk
        return _convert_topk(src, dst, top_k, input_dtype)
    try:
        check_outputs({"OUT": written_files(dst, output_format(dst, to) == "npy")}, [src])
        with open_source(src, dtype=input_dtype) as opened, llama_rows(opened) as source:
            fmt = convert(source, dst, to=to, dtype=dtype, progress=ProgressReporter(not quiet))
            n, v = source.n_tokens, source.vocab
            out_dtype = dtype or ("float32" if source.dtype == "llama_u16" else source.dtype)
            values = values_of(source)
    except DumpError as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise InputError(f"{e.filename or dst}: {e.strerror or e}") from None
    what = " llama.cpp log-probs" if values == "log_probs" else ""
    click.echo(f"wrote {dst} ({fmt}, {n} tokens x {v} {out_dtype}{what}, {os.path.getsize(dst)} bytes)")


def _convert_topk(src: str, dst: str, k: int, input_dtype: str | None) -> None:
    from ..io import DumpError, open_source
    from ..io.paths import check_outputs
    from ..io.topk import convert_to_topk

    try:
        check_outputs({"OUT": dst}, [src])
        with open_source(src, dtype=input_dtype) as source:
            n = convert_to_topk(source, dst, k)
            v = source.vocab
    except DumpError as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise InputError(f"{e.filename or dst}: {e.strerror or e}") from None
    click.echo(f"wrote {dst} (top-k log-probs, {n} tokens, k = {k} of {v}, "
               f"{os.path.getsize(dst)} bytes)")
