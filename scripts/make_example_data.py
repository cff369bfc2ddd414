#!/usr/bin/env python3
"""Build the example data that `fidelity-kld compare --example` uses.

Writes python/fidelity_kld/data/example/base.kld and q4_k_m.kld: the first chunk of the
llama.cpp fixtures base.kld and Q4_K_M.kld (tiny-llama, vocabulary 8000, -c 256; see
shared/fixtures/README.md), i.e. valid --kl-divergence-base files with n_chunk rewritten to 1,
the token table cut to n_ctx tokens and the rows cut to the first chunk's 127 (~2 MB each).

    python scripts/make_example_data.py                      # reads /work/shared/fixtures/llamacpp
    python scripts/make_example_data.py path/to/llamacpp     # or another directory with both files
    python scripts/make_example_data.py --chunks 2 --out DIR

Only the standard library and numpy are used; the input files are validated against
docs/formats.md's size formula before anything is written.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

DEFAULT_SOURCE = "/work/shared/fixtures/llamacpp"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "python", "fidelity_kld", "data", "example")
PAIRS = (("base.kld", "base.kld"), ("Q4_K_M.kld", "q4_k_m.kld"))


def first_chunks(src: str, dst: str, chunks: int) -> int:
    """Copy the first `chunks` chunks of llama.cpp file `src` to `dst`; returns bytes written."""
    size = os.path.getsize(src)
    with open(src, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:8] != b"_logits_":
            sys.exit(f"{src}: not a llama.cpp --kl-divergence-base file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<iii", head[8:])
        rows = n_ctx - 1 - n_ctx // 2
        row_bytes = 2 * (2 * ((n_vocab + 1) // 2) + 4)
        if size != 20 + 4 * n_ctx * n_chunk + row_bytes * rows * n_chunk:
            sys.exit(f"{src}: size {size} does not match its header ({n_ctx}, {n_vocab}, {n_chunk})")
        if not 1 <= chunks <= n_chunk:
            sys.exit(f"{src}: has {n_chunk} chunks, asked for {chunks}")
        tokens = f.read(4 * n_ctx * n_chunk)[: 4 * n_ctx * chunks]
        body = f.read(row_bytes * rows * chunks)
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, chunks) + tokens + body)
    os.replace(tmp, dst)
    return os.path.getsize(dst)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", default=DEFAULT_SOURCE,
                    help=f"directory holding base.kld and Q4_K_M.kld (default {DEFAULT_SOURCE})")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: the package's data/example)")
    ap.add_argument("--chunks", type=int, default=1, help="chunks to keep (default 1)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for src_name, dst_name in PAIRS:
        src, dst = os.path.join(args.source, src_name), os.path.join(args.out, dst_name)
        print(f"{dst}: {first_chunks(src, dst, args.chunks)} bytes (from {src})")


if __name__ == "__main__":
    main()
