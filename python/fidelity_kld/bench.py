"""The one benchmark runner: warm-up, repeated runs, median and spread, baselines and a
roofline measured in the same process. Used by `fidelity-kld bench` and benchmarks/*.py.

Numbers are for benchmarks only; tests never time anything.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from . import _core
from .reference import float32_to_bf16

REAL_VOCABS = (32000, 128256, 152064)
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @staticmethod
    def of(times: list[float]) -> "Timing":
        return Timing(statistics.median(times), min(times), max(times), len(times))


def measure(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5,
            min_seconds: float = 0.0) -> Timing:
    """Median of `repeats` timed calls after `warmup` untimed ones (more repeats until
    min_seconds of timed work have passed)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing.of(times)


def read_roofline(nbytes: int, threads: int, repeats: int = 5) -> float:
    """Memory read bandwidth (GB/s): OR-reduce of a fresh buffer larger than the caches,
    split over `threads` numpy reductions (numpy releases the GIL)."""
    buf = np.random.default_rng(0).integers(0, 2**63, nbytes // 8, dtype=np.uint64)
    parts = np.array_split(buf, threads)
    with ThreadPoolExecutor(threads) as ex:
        t = measure(lambda: list(ex.map(np.bitwise_or.reduce, parts)), repeats=repeats)
    return buf.nbytes / t.median_s / 1e9


def random_logits(rng, n: int, v: int, dtype: str, *, scale: float = 3.0, noise: float = 0.3):
    """A fresh (ref, q) pair in the given storage (bfloat16 as uint16 bit patterns)."""
    a = rng.standard_normal((n, v), dtype=np.float32)
    a *= scale
    b = rng.standard_normal((n, v), dtype=np.float32)
    b *= noise
    b += a
    if dtype == "float32":
        return a, b
    if dtype == "float16":
        return a.astype(np.float16), b.astype(np.float16)
    return float32_to_bf16(a), float32_to_bf16(b)


def numpy_logit_stats(a: np.ndarray, b: np.ndarray, block: int = 64):
    """Plain-numpy baseline: blocked float32 log-softmax of both sides, KLD and argmax."""
    n = a.shape[0]
    kld = np.empty(n, np.float32)
    agree = np.empty(n, bool)
    for i in range(0, n, block):
        x = a[i:i + block].astype(np.float32)
        y = b[i:i + block].astype(np.float32)
        x -= x.max(axis=1, keepdims=True)
        y -= y.max(axis=1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
        y -= np.log(np.exp(y).sum(axis=1, keepdims=True))
        kld[i:i + block] = (np.exp(x) * (x - y)).sum(axis=1)
        agree[i:i + block] = x.argmax(axis=1) == y.argmax(axis=1)
    return kld, agree


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = source_commit()
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": _core.active_simd_level(),
            "python": platform.python_version(), "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d"), "commit": commit}


def source_commit(here: str | None = None) -> str:
    """The git commit of the source checkout this package (directory `here`) runs from; for
    an installed package (no checkout of its own: git would name whatever repository
    encloses the install) the version, said as such."""
    from . import __version__

    here = here or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
                             capture_output=True, text=True, cwd=here, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    if len(out) == 2 and os.path.realpath(os.path.join(out[0], "python", "fidelity_kld")) == os.path.realpath(here):
        return out[1]
    return f"none (installed fidelity-kld {__version__}, not a git checkout)"


@dataclass
class Row:
    case: str
    impl: str
    dtype: str
    n: int
    vocab: int
    threads: int
    ms: float
    tokens_per_s: float
    gb_per_s: float
    spread_ms: tuple[float, float] = (0.0, 0.0)
    extra: dict = field(default_factory=dict)

    def as_dict(self):
        return asdict(self)


def row(case, impl, dtype, n, v, threads, t: Timing, nbytes: int, **extra) -> Row:
    return Row(case, impl, dtype, n, v, threads, 1e3 * t.median_s, n / t.median_s,
               nbytes / t.median_s / 1e9, (1e3 * t.min_s, 1e3 * t.max_s), extra)


def format_table(rows: list[Row], roofline: float | None = None, baseline: dict | None = None) -> str:
    head = f"{'case':<14}{'impl':<22}{'dtype':<9}{'N':>6}{'V':>8}{'thr':>4}{'ms':>10}{'tok/s':>11}{'GB/s':>8}"
    if roofline:
        head += f"{'%roof':>7}"
    if baseline:
        head += f"{'x base':>8}"
    out = [head]
    for r in rows:
        line = (f"{r.case:<14}{r.impl:<22}{r.dtype:<9}{r.n:>6}{r.vocab:>8}{r.threads:>4}"
                f"{r.ms:>10.2f}{r.tokens_per_s:>11,.0f}{r.gb_per_s:>8.2f}")
        if roofline:
            line += f"{100 * r.gb_per_s / roofline:>6.0f}%"
        if baseline:
            b = baseline.get((r.case, r.dtype, r.vocab))
            line += f"{r.gb_per_s / b:>7.1f}x" if b else f"{'':>8}"
        out.append(line)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# The suite behind `fidelity-kld bench`.

SUITE_VOCABS = (32000, 128256, 152064, 262144)


def _pair_rows(v: int, dtype: str, pair_bytes: int) -> int:
    return max(8, pair_bytes // (2 * v * BYTES[dtype]))


def _torch_baselines(a, b, dtype: str, v: int, n: int, nbytes: int, quick: bool, log) -> list[Row]:
    try:
        import torch
    except ImportError:
        return []
    if dtype == "bfloat16":
        ta = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        tb = torch.from_numpy(b.view(np.int16)).view(torch.bfloat16)
    else:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def eager(x, y):
        lp = torch.log_softmax(x.float(), dim=-1)
        lq = torch.log_softmax(y.float(), dim=-1)
        kld = (lp.exp() * (lp - lq)).sum(-1)
        return kld, lp.argmax(-1) == lq.argmax(-1)

    rows = []
    with torch.inference_mode():
        t = measure(lambda: eager(ta, tb), repeats=3)
        rows.append(row("logit_stats", "torch-eager", dtype, n, v, torch.get_num_threads(), t, nbytes))
        if not quick:
            try:
                compiled = torch.compile(eager)
                log("  compiling torch baseline (first call is slow) ...")
                t = measure(lambda: compiled(ta, tb), warmup=2, repeats=3)
                rows.append(row("logit_stats", "torch-compile", dtype, n, v, torch.get_num_threads(), t, nbytes))
            except Exception as e:  # a compiler toolchain problem must not sink the suite
                log(f"  torch.compile baseline skipped: {type(e).__name__}: {e}")
    return rows


def run_suite(*, quick: bool = False, log=print, torch_baselines: bool = True,
              workdir: str | None = None, progress=None) -> dict:
    """Every CPU case of issue 6; returns {machine, roofline, rows, scaling}. log: the header
    and the final tables; progress: one short line per case as it is measured (default: log)."""
    progress = log if progress is None else progress
    import fidelity_kld as fk

    cores = os.cpu_count() or 1
    thread_counts = sorted({1, cores} | ({2} if cores >= 2 else set()))
    pair_bytes = (128 << 20) if quick else (1 << 30)
    repeats = 3 if quick else 5
    rng = np.random.default_rng(0)
    info = machine()
    log(f"# {info['cpu']}, {cores} cores, simd={info['simd']}, commit {info['commit']}, {info['date']}")
    roof = {t: read_roofline(max(pair_bytes, 256 << 20), t, repeats=3) for t in thread_counts}
    log("# read roofline: " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in roof.items()))
    rows: list[Row] = []
    baseline: dict = {}
    dtypes = ("float16", "bfloat16") if quick else ("float32", "float16", "bfloat16")
    vocabs = (32000, 152064) if quick else SUITE_VOCABS

    # 1. fused statistics, every dtype x vocabulary, all threads; numpy (+ torch) baselines
    for dtype in dtypes:
        for v in vocabs:
            n = _pair_rows(v, dtype, pair_bytes)
            first = len(rows)
            a, b = random_logits(rng, n, v, dtype)
            ref, q = fk.Logits(a, dtype, v), fk.Logits(b, dtype, v)
            nbytes = a.nbytes + b.nbytes
            t = measure(lambda: fk.compare(ref, q), repeats=repeats)
            rows.append(row("logit_stats", f"core/{info['simd']}", dtype, n, v, cores, t, nbytes))
            m = max(8, n // 16)
            sub_a = a[:m] if dtype != "bfloat16" else bf16_to_float32_view(a[:m])
            sub_b = b[:m] if dtype != "bfloat16" else bf16_to_float32_view(b[:m])
            t = measure(lambda: numpy_logit_stats(sub_a, sub_b), repeats=2)
            base = row("logit_stats", "numpy-f32-blocked", dtype, m, v, 1, t, a[:m].nbytes + b[:m].nbytes)
            rows.append(base)
            baseline[("logit_stats", dtype, v)] = base.gb_per_s
            if torch_baselines and v == 152064:
                rows.extend(_torch_baselines(a[:m * 4], b[:m * 4], dtype, v, m * 4,
                                             a[:m * 4].nbytes + b[:m * 4].nbytes, quick, progress))
            progress(f"  measured logit_stats {dtype} V={v} ({len(rows) - first} rows)")
            del a, b, ref, q

    # 1b. the optional outputs (issue 16): each group against the same call without it, with
    # labels (the "label" group needs them), V = 152064
    v = 152064
    for dtype in ("float32", "float16"):
        n = _pair_rows(v, dtype, pair_bytes)
        a, b = random_logits(rng, n, v, dtype)
        y = rng.integers(0, v, n)
        nbytes = a.nbytes + b.nbytes
        groups = ((), "all") if quick else ((), "top2", "label", "tvd", "jsd", "all")
        for group in groups:
            t = measure(lambda: fk.compare(a, b, y, extra=group), repeats=repeats)
            rows.append(row("extra_outputs", f"core/{info['simd']}+{group or 'none'}", dtype, n, v,
                            cores, t, nbytes))
        progress(f"  measured extra_outputs {dtype} V={v}")
        del a, b

    # 2. the llama.cpp uint16 decode path (fused decode + statistics)
    v = 152064
    n = _pair_rows(v, "float16", pair_bytes)
    words = 2 * ((v + 1) // 2) + 4
    codes = rng.integers(0, 65535, (n, words), dtype=np.uint16)
    header = np.zeros((n, 2), np.float32)
    header[:, 0] = 16.0 / 65535
    header[:, 1] = -20.0
    codes[:, :4] = header.view(np.uint16)
    codes2 = codes.copy()
    codes2[:, 4:] ^= rng.integers(0, 8, (n, words - 4), dtype=np.uint16)
    ref, q = fk.Logits(codes, "llama_u16", v), fk.Logits(codes2, "llama_u16", v)
    # random codes: not rows llama.cpp writes, so unscreened (the core's rate is measured)
    t = measure(lambda: fk.compare(ref, q, llama_parity=True, bad_rows="keep"), repeats=repeats)
    rows.append(row("llama_u16", f"core/{info['simd']}", "llama_u16", n, v, cores, t,
                    codes.nbytes + codes2.nbytes))
    del codes, codes2, ref, q

    # 3. one reference against 4 quantized models, from memory: compare_many (the CLI's path:
    # the reference's work done once) against four separate compare calls
    v = 152064
    n = _pair_rows(v, "float16", pair_bytes) // 2
    a, _ = random_logits(rng, n, v, "float16")
    quants = [random_logits(rng, n, v, "float16")[1] for _ in range(4)]
    nbytes = a.nbytes + sum(qq.nbytes for qq in quants)
    t = measure(lambda: fk.compare_many(a, quants), repeats=repeats)
    rows.append(row("ref_vs_4", f"compare_many/{info['simd']}", "float16", n, v, cores, t, nbytes,
                    models=4))
    t = measure(lambda: [fk.compare(a, qq) for qq in quants], repeats=repeats)
    rows.append(row("ref_vs_4", f"4 x compare/{info['simd']}", "float16", n, v, cores, t, nbytes,
                    models=4))
    del a, quants

    # 4. streaming from files in the page cache, and cold (after dropping the files' pages)
    rows.extend(_stream_cases(rng, pair_bytes, repeats, workdir, info, cores))

    # 5. per-call overhead of the streaming API on tiny batches
    a1 = rng.standard_normal((4, 32), dtype=np.float32)
    acc = fk.Accumulator(threads=1)
    t = measure(lambda: acc.add(a1, a1), warmup=10, repeats=2000 if not quick else 500)
    rows.append(row("api_overhead", "Accumulator.add", "float32", 4, 32, 1, t, a1.nbytes * 2,
                    us_per_call=1e6 * t.median_s))

    # 6. cohort analysis: 40 models x 2000 prompts
    rows.append(_cohort_case(rng, quick))

    # 7. scaling: threads, tokens and vocabulary
    scaling = _scaling(rng, quick, thread_counts, info)
    log(format_table(rows, roofline=roof[cores], baseline=baseline))
    log(format_scaling(scaling))
    return {"machine": info, "roofline_gb_s": roof, "rows": [r.as_dict() for r in rows],
            "scaling": scaling, "quick": quick}


def bf16_to_float32_view(u16: np.ndarray) -> np.ndarray:
    from .reference import bf16_to_float32

    return bf16_to_float32(u16)


def _stream_cases(rng, pair_bytes, repeats, workdir, info, cores) -> list[Row]:
    import tempfile

    from .io import open_source
    from .stream import compare_sources

    v = 152064
    n = _pair_rows(v, "float16", pair_bytes)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        paths = []
        for i, x in enumerate(random_logits(rng, n, v, "float16")):
            p = os.path.join(d, f"dump{i}.npy")
            np.save(p, x)
            paths.append(p)
        nbytes = sum(os.path.getsize(p) for p in paths)

        def run():
            srcs = [open_source(p) for p in paths]
            try:
                compare_sources(srcs[0], srcs[1:])
            finally:
                for s in srcs:
                    s.close()

        for p in paths:  # into the page cache
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
        t = measure(run, repeats=repeats)
        rows.append(row("stream_cached", "compare_sources", "float16", n, v, cores, t, nbytes))

        def drop():
            for p in paths:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

        times = []
        for _ in range(max(1, repeats // 2)):
            drop()
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        rows.append(row("stream_cold", "compare_sources", "float16", n, v, cores, Timing.of(times),
                        nbytes, note="pages dropped with posix_fadvise(DONTNEED) before each run"))
    return rows


def _cohort_case(rng, quick: bool) -> Row:
    from .stats.cohort import AnalysisOptions, analyze_cohort
    from .stats.cohort_data import Cohort

    n_models, n_prompts = 40, 2000
    skill = np.sort(rng.uniform(0.55, 0.7, n_models))[::-1]
    ref_p = rng.uniform(0, 1, n_prompts) < 0.7
    scores = np.vstack([ref_p, rng.uniform(0, 1, (n_models, n_prompts)) < skill[:, None]]).astype(float)
    kld = np.linspace(0.001, 0.3, n_models)
    cohort = Cohort(
        reference="ref", models=tuple(f"q{i}" for i in range(n_models)), tasks=("task",),
        prompt_ids={"task": tuple(str(i) for i in range(n_prompts))}, scores={"task": scores},
        variants={"kld_mean": kld, "kld_p99": kld * 5},
        per_prompt_kld={"task": kld[:, None] * rng.lognormal(0, 1, (n_models, n_prompts))},
    )
    t = measure(lambda: analyze_cohort(cohort, AnalysisOptions()), warmup=0, repeats=1 if quick else 3)
    return row("cohort", "analyze_cohort", "-", n_prompts, n_models, 1, t, 0,
               models=n_models, prompts=n_prompts)


def _scaling(rng, quick, thread_counts, info) -> dict:
    import fidelity_kld as fk

    v = 152064
    n = _pair_rows(v, "float16", (128 << 20) if quick else (512 << 20))
    a, b = random_logits(rng, n, v, "float16")
    threads = [{"threads": t, "tokens_per_s": n / measure(lambda: fk.compare(a, b, threads=t), repeats=3).median_s}
               for t in thread_counts]
    del a, b
    by_n, by_v = [], []
    for nn in ((64, 256, 1024) if quick else (64, 256, 1024, 4096)):
        a, b = random_logits(rng, nn, 32000, "float16")
        by_n.append({"n": nn, "vocab": 32000, "ms": 1e3 * measure(lambda: fk.compare(a, b), repeats=3).median_s})
    for vv in ((32000, 152064) if quick else SUITE_VOCABS):
        a, b = random_logits(rng, 256, vv, "float16")
        by_v.append({"n": 256, "vocab": vv, "ms": 1e3 * measure(lambda: fk.compare(a, b), repeats=3).median_s})
    return {"threads": threads, "by_tokens": by_n, "by_vocab": by_v}


def format_scaling(s: dict) -> str:
    lines = ["scaling (fp16): threads -> tokens/s at V=152064"]
    lines += [f"  {r['threads']:>3} threads  {r['tokens_per_s']:>10,.0f} tok/s" for r in s["threads"]]
    lines.append("tokens N -> ms at V=32000")
    lines += [f"  N={r['n']:<6} {r['ms']:>9.2f} ms" for r in s["by_tokens"]]
    lines.append("vocabulary V -> ms at N=256")
    lines += [f"  V={r['vocab']:<7} {r['ms']:>9.2f} ms" for r in s["by_vocab"]]
    return "\n".join(lines)


def plot_scaling(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["scaling"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    ax = axes[0]
    ts = [r["threads"] for r in s["threads"]]
    ax.plot(ts, [r["tokens_per_s"] for r in s["threads"]], "o-")
    ax.set(xlabel="threads", ylabel="tokens/s", title="fp16, V=152064", xticks=ts)
    ax.set_ylim(bottom=0)
    ax = axes[1]
    ax.loglog([r["n"] for r in s["by_tokens"]], [r["ms"] for r in s["by_tokens"]], "o-")
    ax.set(xlabel="tokens N", ylabel="ms", title="fp16, V=32000")
    ax = axes[2]
    ax.plot([r["vocab"] / 1000 for r in s["by_vocab"]], [r["ms"] for r in s["by_vocab"]], "o-")
    ax.set(xlabel="vocabulary V (thousands)", ylabel="ms", title="fp16, N=256")
    ax.set_ylim(bottom=0)
    m = result["machine"]
    fig.suptitle(f"fidelity-kld scaling on {m['cpu']} ({m['cores']} cores, {m['simd']}), {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
