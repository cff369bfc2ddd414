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
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": _core.active_simd_level(),
            "python": platform.python_version(), "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d"), "commit": commit}


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
