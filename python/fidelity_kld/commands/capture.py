"""`fidelity-kld capture MODEL --text eval.txt --ctx 512 --out ref.safetensors`: run a
Hugging Face causal LM over a text file in llama-perplexity-style chunks and write its
next-token logits (with labels and prompt ids) to a dump for `fidelity-kld compare`
(fidelity_kld.capture.hf; needs the hf extra). With `--top-k K --out ref.topk.parquet` the
dump holds each position's K largest log-probs instead (fidelity_kld.io.topk)."""

from __future__ import annotations

import click

from ..cli import InputError


@click.command("capture")
@click.argument("model")
@click.option("--text", "text_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The evaluation text (UTF-8).")
@click.option("--ctx", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per chunk (llama-perplexity's -c).")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Use only the first N chunks (default: every full chunk).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The dump to write: .safetensors or .npy; with --top-k, .parquet.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=None,
              help="Write a top-k log-prob dump (Parquet: the K largest log-probs and ids per "
                   "position, the tail mass, a floor and the label's log-prob, from the full "
                   "rows in float64) instead of full logits (docs/formats.md).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="The dtype the model's weights are loaded and run in.")
@click.option("--fake-quant", "fake_quant", type=click.IntRange(2, 16), default=None,
              help="Round every nn.Linear weight to this many bits first (per-channel symmetric "
                   "round-to-nearest: a stand-in quantization, capture.hf.fake_quantize_weights).")
@click.option("--dump-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="How full logits are stored (not with --top-k).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device for the model.")
@click.pass_context
def command(ctx_, model, text_path, ctx, chunks, out_path, top_k, dtype, fake_quant, dump_dtype,
            batch_size, device):
    """Write MODEL's logits over --text to --out. MODEL: a Hugging Face hub id or local
    directory. Run it twice, for the reference and for the quantized model (or once more with
    --dtype / --fake-quant), with the same --text and --ctx, then `fidelity-kld compare`
    (full and top-k dumps may be mixed: a top-k side gives the KLD as bounds)."""
    _check_out(ctx_, out_path, top_k)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise InputError(f"capture needs torch and transformers (pip install 'fidelity-kld[hf]'): {e}") from None
    from ..capture import hf

    try:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{text_path}: cannot read the text ({e})") from None
    try:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device)
    except (OSError, ValueError) as e:
        raise InputError(f"{model}: cannot load the model ({str(e).splitlines()[0]})") from None
    lm.eval()
    if fake_quant is not None:
        hf.fake_quantize_weights(lm, fake_quant)
    vocab = getattr(lm.config, "vocab_size", None)
    if top_k is not None and vocab is not None and top_k > vocab:
        raise InputError(f"{model}: --top-k {top_k} is more than the vocabulary's {vocab} tokens")
    pieces = hf.text_chunks(tok, text, ctx, max_chunks=chunks)
    if not pieces:
        raise InputError(f"{text_path}: shorter than one chunk of {ctx} tokens")
    try:
        rows = hf.capture_logits(lm, pieces, out_path, batch_size=batch_size, dump_dtype=dump_dtype,
                                 top_k=top_k, source=f"capture {model}")
    except ValueError as e:  # DumpError included: the output path
        raise InputError(f"{out_path}: {e}" if out_path not in str(e) else str(e)) from None
    what = f"{dtype}" + (f", weights fake-quantized to {fake_quant} bits" if fake_quant else "")
    form = f", top {top_k} log-probs a token" if top_k is not None else ""
    click.echo(f"wrote {out_path}: {rows} tokens ({len(pieces)} chunks of {ctx}{form}) from "
               f"{model} ({what})")


def _check_out(ctx_, out_path: str, top_k: int | None) -> None:
    """Before any model is loaded: the output name fits the dump asked for."""
    suffix = out_path.lower().rsplit(".", 1)[-1] if "." in out_path else ""
    if top_k is not None:
        if suffix != "parquet":
            raise click.UsageError(f"--top-k writes a Parquet top-k dump: give --out a .parquet "
                                   f"name, not {out_path}")
        if ctx_.get_parameter_source("dump_dtype") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError("--dump-dtype is for full logits; a top-k dump stores "
                                   "float32 log-probs")
    elif suffix not in ("safetensors", "npy"):
        raise click.UsageError(f"--out {out_path}: give a .safetensors or .npy name (or "
                               "--top-k K with a .parquet name)")
