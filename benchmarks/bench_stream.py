"""End-to-end streaming: `fidelity-kld compare` on .npy dumps in the page cache, against
the in-memory kernel rate measured in the same run, with the CLI's peak RSS; in process, the
readers' path against the one before the truncation guards (MappedViews) and against
copying every chunk with pread (PreadCopies).

    python benchmarks/bench_stream.py --dir /tmp/fk_stream --gb 4 [--vocab 152064] [--models 4]
        [--json out.json]

Writes two fp16 dumps of --gb GB each (once; reused if present), reads them once so they sit
in the page cache, then times `fidelity-kld compare REF Q -q -o summary.json` under
/usr/bin/time -v (peak RSS) and the in-memory kernel on 2 GB of the same data. With --models K
(K > 1) it writes K quantized dumps and times compare_sources on all of them in process: the
CLI's path (compare_many: the reference's work done once per group of models) against one
compare call per model.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import subprocess
import sys
import time

import numpy as np

import fidelity_kld as fk
from fidelity_kld import bench


def write_dump(path: str, n: int, v: int, seed: int, base: str | None = None) -> None:
    """Written sequentially with write(), as dump producers do (np.save, torch.save,
    llama.cpp's fwrite): the page cache then holds large folios, which map in far cheaper
    than the 4 KB pages a file written through a memory map gets."""
    if os.path.exists(path) and os.path.getsize(path) > n * v * 2:
        return
    rng = np.random.default_rng(seed)
    ref = np.load(base, mmap_mode="r") if base else None
    step = 512
    with open(path + ".tmp", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                "fortran_order": False, "shape": (n, v)})
        for i in range(0, n, step):
            j = min(i + step, n)
            x = rng.standard_normal((j - i, v), dtype=np.float32)
            if ref is None:
                x *= 3
            else:
                x *= 0.3
                x += ref[i:j]
            f.write(x.astype(np.float16).tobytes())
    os.replace(path + ".tmp", path)


class MappedViews:
    """The readers' path before the SIGBUS guard and size checks, for comparison: views of a
    memory map, the next chunk's pages mapped in ahead (MADV_POPULATE_READ, as the prefetch
    thread did) and the pages of the chunk before last dropped (MADV_DONTNEED)."""

    def __init__(self, path: str):
        from fidelity_kld.io import open_source

        with open_source(path) as src:
            self.n_tokens, self.vocab, self.dtype = src.n_tokens, src.vocab, src.dtype
            self.bytes_per_token, self.labels, self.prompt_ids = src.bytes_per_token, None, None
            self.path = path
        self._data = np.load(path, mmap_mode="r")
        self._mm = self._data._mmap
        self._offset = self._data.offset
        self._views: list[tuple[int, int]] = []

    def _advise(self, advice: int, start: int, stop: int, inner: bool) -> None:
        row = self.bytes_per_token
        a, b = self._offset + start * row, self._offset + stop * row
        page = mmap.PAGESIZE
        a = a + (-a) % page if inner else a - a % page
        b = b - b % page if inner else b
        if b > a:
            self._mm.madvise(advice, a, b - a)

    def read_into(self, start: int, stop: int, out):
        if len(self._views) == 2:
            self._advise(mmap.MADV_DONTNEED, *self._views.pop(0), inner=True)
        self._advise(22, start, stop, inner=False)  # MADV_POPULATE_READ (Linux >= 5.14)
        self._views.append((start, stop))
        return fk.Logits(self._data[start:stop], self.dtype, self.vocab)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._data = self._mm = None


class PreadCopies(MappedViews):
    """The alternative not taken: every chunk copied out of the page cache with pread into
    the stream's reused buffer (no map, so no SIGBUS and no page tables, but one copy)."""

    def __init__(self, path: str):
        super().__init__(path)
        from fidelity_kld.io.base import FileRows

        self._rows = FileRows(path, self._offset, self.bytes_per_token)
        self._row_dtype = self._data.dtype

    def read_into(self, start: int, stop: int, out):
        block = out[: (stop - start) * self.bytes_per_token].view(self._row_dtype).reshape(stop - start, -1)
        self._rows.read_rows(start, stop, block)
        return fk.Logits(block, self.dtype, self.vocab)

    def __exit__(self, *exc):
        self._rows.close()
        super().__exit__(*exc)


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/fk_stream")
    ap.add_argument("--gb", type=float, default=4.0, help="size of each dump")
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", type=int, default=1, help="also time K models against one reference")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    v = args.vocab
    n = int(args.gb * 1e9 / (2 * v))
    ref_path = os.path.join(args.dir, f"ref_{n}x{v}.npy")
    q_path = os.path.join(args.dir, f"q_{n}x{v}.npy")
    write_dump(ref_path, n, v, 0)
    write_dump(q_path, n, v, 1, base=ref_path)
    info = bench.machine()
    print(f"# {info['cpu']}, {info['cores']} cores, simd={info['simd']}, commit {info['commit']}, {info['date']}")
    total = os.path.getsize(ref_path) + os.path.getsize(q_path)

    # in-memory kernel on the same data (first 2 GB of the pair, copied into RAM)
    m = min(n, int(1e9 / (2 * v)))
    a = np.array(np.load(ref_path, mmap_mode="r")[:m])
    b = np.array(np.load(q_path, mmap_mode="r")[:m])
    t = bench.measure(lambda: fk.compare(a, b), repeats=args.repeats)
    mem_gbs = (a.nbytes + b.nbytes) / t.median_s / 1e9
    del a, b

    times, rss = [], []
    for _ in range(args.repeats):
        warm(ref_path)
        warm(q_path)
        out = os.path.join(args.dir, "summary.json")
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "fidelity_kld", "compare",
               ref_path, q_path, "-q", "-o", out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        rss.append(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)))
    # the CLI's fixed cost (interpreter, imports, opening files, summary, JSON), measured
    # the same way on a 64-token pair, is subtracted from the wall time
    small = [os.path.join(args.dir, f"small_{k}.npy") for k in ("ref", "q")]
    for p, src in zip(small, (ref_path, q_path)):
        np.save(p, np.load(src, mmap_mode="r")[:64])
    fixed = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fidelity_kld", "compare", *small, "-q", "-o",
                        os.path.join(args.dir, "small.json")], check=True, capture_output=True)
        fixed.append(time.perf_counter() - t0)
    startup = float(np.median(fixed))
    # and the streaming engine in this process, no CLI around it
    from fidelity_kld.io import open_source
    from fidelity_kld.stream import compare_sources

    def in_process():
        with open_source(ref_path) as r, open_source(q_path) as q:
            compare_sources(r, [q])

    def in_process_with(kind):
        def run():
            with kind(ref_path) as r, kind(q_path) as q:
                compare_sources(r, [q])
        return run

    warm(ref_path)
    warm(q_path)
    stream_gbs = total / bench.measure(in_process, repeats=args.repeats).median_s / 1e9
    mapped_gbs = total / bench.measure(in_process_with(MappedViews), repeats=args.repeats).median_s / 1e9
    pread_gbs = total / bench.measure(in_process_with(PreadCopies), repeats=args.repeats).median_s / 1e9
    wall = float(np.median(times))
    e2e = total / (wall - startup) / 1e9
    res = {
        "machine": info, "dump_bytes_each": total // 2, "tokens": n, "vocab": v, "dtype": "float16",
        "in_memory_gb_s": mem_gbs, "stream_in_process_gb_s": stream_gbs,
        "stream_previous_path_gb_s": mapped_gbs, "stream_pread_gb_s": pread_gbs, "cli_wall_s": wall,
        "cli_fixed_cost_s": startup, "cli_gb_s": e2e, "cli_wall_gb_s": total / wall / 1e9,
        "ratio": e2e / mem_gbs, "peak_rss_mb": max(rss) / 1024,
    }
    print(f"in-memory kernel         : {mem_gbs:6.2f} GB/s")
    print(f"compare_sources, in proc : {stream_gbs:6.2f} GB/s  ({100 * stream_gbs / mem_gbs:.0f}% of in-memory)")
    print(f"  previous path (views)  : {mapped_gbs:6.2f} GB/s  ({100 * mapped_gbs / mem_gbs:.0f}% of in-memory; "
          f"today's is {100 * stream_gbs / mapped_gbs:.0f}% of it)")
    print(f"  pread copies instead   : {pread_gbs:6.2f} GB/s  ({100 * pread_gbs / mem_gbs:.0f}% of in-memory)")
    print(f"CLI, page cache          : {e2e:6.2f} GB/s  ({100 * e2e / mem_gbs:.0f}% of in-memory; "
          f"wall {wall:.2f} s for {total / 1e9:.1f} GB less a fixed {startup:.2f} s measured on 64 tokens; "
          f"{total / wall / 1e9:.2f} GB/s including it)")
    print(f"CLI peak RSS             : {max(rss) / 1024:.0f} MB")
    if args.models > 1:
        res.update(multi_model(args, ref_path, n, v))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


def multi_model(args, ref_path: str, n: int, v: int) -> dict:
    """compare_sources on one reference and K models in the page cache: the default path
    (compare_many) against one compare call per model."""
    from fidelity_kld.io import open_source
    from fidelity_kld.stream import compare_sources

    q_paths = [os.path.join(args.dir, f"q{j}_{n}x{v}.npy") for j in range(args.models)]
    for j, path in enumerate(q_paths):
        write_dump(path, n, v, 10 + j, base=ref_path)
    total = os.path.getsize(ref_path) + sum(os.path.getsize(p) for p in q_paths)

    for p in (ref_path, *q_paths):  # 1 + K dumps that fit in RAM stay in the page cache
        warm(p)

    def run(**kw):
        srcs = [open_source(p) for p in (ref_path, *q_paths)]
        try:
            compare_sources(srcs[0], srcs[1:], **kw)
        finally:
            for src in srcs:
                src.close()

    def one_call_per_model(*a, **kw):
        return fk.compare(*a, **kw)  # not fk.compare itself, which compare_sources groups

    many = total / bench.measure(run, repeats=args.repeats).median_s / 1e9
    separate = total / bench.measure(lambda: run(compare_fn=one_call_per_model),
                                     repeats=args.repeats).median_s / 1e9
    print(f"1 reference + {args.models} models : {many:6.2f} GB/s of input with compare_many, "
          f"{separate:6.2f} GB/s with one call per model ({many / separate:.2f}x)")
    return {"models": args.models, "multi_gb_s": many, "multi_separate_gb_s": separate}


if __name__ == "__main__":
    main()
