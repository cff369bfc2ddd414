"""`fidelity-kld capture MODEL --text eval.txt --ctx 512 --out ref.safetensors`: run a
Hugging Face causal LM over a text file in llama-perplexity-style chunks and write its
next-token logits (with labels and prompt ids) to a dump for `fidelity-kld compare`
(fidelity_kld.capture.hf; needs the hf extra)."""

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
              help="The dump to write: .safetensors or .npy.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="The dtype the model's weights are loaded and run in.")
@click.option("--fake-quant", "fake_quant", type=click.IntRange(2, 16), default=None,
              help="Round every nn.Linear weight to this many bits first (per-channel symmetric "
                   "round-to-nearest: a stand-in quantization, capture.hf.fake_quantize_weights).")
@click.option("--dump-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="How the logits are stored.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device for the model.")
def command(model, text_path, ctx, chunks, out_path, dtype, fake_quant, dump_dtype, batch_size,
            device):
    """Write MODEL's logits over --text to --out. MODEL: a Hugging Face hub id or local
    directory. Run it twice, for the reference and for the quantized model (or once more with
    --dtype / --fake-quant), with the same --text and --ctx, then `fidelity-kld compare`."""
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
    pieces = hf.text_chunks(tok, text, ctx, max_chunks=chunks)
    if not pieces:
        raise InputError(f"{text_path}: shorter than one chunk of {ctx} tokens")
    try:
        rows = hf.capture_logits(lm, pieces, out_path, batch_size=batch_size, dump_dtype=dump_dtype)
    except ValueError as e:  # DumpError included: the output path
        raise InputError(str(e)) from None
    what = f"{dtype}" + (f", weights fake-quantized to {fake_quant} bits" if fake_quant else "")
    click.echo(f"wrote {out_path}: {rows} tokens ({len(pieces)} chunks of {ctx}) from {model} ({what})")
