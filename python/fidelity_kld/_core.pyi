"""Type stub for the compiled core (private: use fidelity_kld.compare)."""

import numpy as np
from numpy.typing import NDArray

simd_level: str
"""SIMD path chosen at import: 'avx512', 'avx2' or 'scalar' on x86-64, 'neon' or 'scalar' on
aarch64 (FIDELITY_KLD_SIMD lowers it)."""
has_cuda: bool
"""Whether this build contains the CUDA kernels (logit_stats_cuda)."""

def sigbus_guard(address: int, length: int, message: str) -> int: ...
def sigbus_unguard(slot: int) -> None: ...
def active_simd_level() -> str:
    """SIMD path logit_stats uses now (reads FIDELITY_KLD_SIMD on every call)."""
def available_simd_levels() -> list[str]:
    """SIMD paths that run here, lowest first, up to active_simd_level()."""

def logit_stats(
    ref: np.ndarray,
    ref_dtype: str,
    q: np.ndarray,
    q_dtype: str,
    vocab: int,
    *,
    labels: NDArray[np.int64] | None = None,
    llama_parity: bool = False,
    threads: int = 0,
    simd: str = "auto",
    kld: NDArray[np.float64],
    kld_reverse: NDArray[np.float64],
    lse_ref: NDArray[np.float64],
    lse_q: NDArray[np.float64],
    entropy_ref: NDArray[np.float64],
    top1_ref: NDArray[np.int32],
    top1_q: NDArray[np.int32],
    nll_ref: NDArray[np.float64] | None = None,
    nll_q: NDArray[np.float64] | None = None,
    p_ref_y: NDArray[np.float64] | None = None,
    p_q_y: NDArray[np.float64] | None = None,
    kld_llama: NDArray[np.float64] | None = None,
    extra: dict[str, np.ndarray] = ...,
) -> None:
    """Fill per-token statistics of ref vs q ([tokens, vocab] rows; dtype names float32,
    float16, bfloat16 (uint16 storage), llama_u16 (raw llama.cpp rows)) into the outputs.
    extra: optional outputs to compute, by name (logp_top1_ref, logp_top1_q, logp_top2_ref,
    logp_top2_q, tvd, jsd: float64; rank_ref_y, rank_q_y: int32; margin_ref, margin_q:
    float64; the rank and margin outputs need labels)."""

def logit_stats_multi(
    ref: np.ndarray,
    ref_dtype: str,
    qs: list[np.ndarray],
    q_dtype: str,
    vocab: int,
    *,
    labels: NDArray[np.int64] | None = None,
    llama_parity: bool = False,
    threads: int = 0,
    simd: str = "auto",
    outs: list[dict[str, np.ndarray | None]],
) -> None:
    """logit_stats for several models (all of q_dtype) against one reference, each into its own
    dict of output arrays (the keyword names of logit_stats); each model's results are bitwise
    those of logit_stats."""

def logit_stats_cuda(
    ref: int,
    ref_dtype: str,
    ref_row_stride: int,
    q: int,
    q_dtype: str,
    q_row_stride: int,
    n_rows: int,
    vocab: int,
    *,
    labels: int = 0,
    llama_parity: bool = False,
    kld: int,
    kld_reverse: int,
    lse_ref: int,
    lse_q: int,
    entropy_ref: int,
    top1_ref: int,
    top1_q: int,
    nll_ref: int = 0,
    nll_q: int = 0,
    p_ref_y: int = 0,
    p_q_y: int = 0,
    kld_llama: int = 0,
    stream: int = 0,
    vocab_splits: int = 0,
    logp_top1_ref: int = 0,
    logp_top1_q: int = 0,
    logp_top2_ref: int = 0,
    logp_top2_q: int = 0,
    tvd: int = 0,
    jsd: int = 0,
    rank_ref_y: int = 0,
    rank_q_y: int = 0,
    margin_ref: int = 0,
    margin_q: int = 0,
) -> None:
    """CUDA builds only: the same statistics from raw device pointers (ints) on `stream`; the
    optional outputs (issue 16) are computed where their pointer is not 0."""
