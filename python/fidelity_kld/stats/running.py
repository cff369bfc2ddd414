"""Running estimates after each prompt (llama.cpp's per-chunk lines of
`llama-perplexity --kl-divergence`): every statistic over the tokens seen so far, with its
standard error, so convergence on a long run is visible."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..ops import TokenStats
from .paired import per_token_values


@dataclass(frozen=True)
class RunningLine:
    """Statistics over tokens [0, n_tokens) after prompt number `prompt` (1-based), as
    llama.cpp prints them: PPL(Q), ln(PPL(Q)/PPL(base)), mean KLD, RMS Δp (fraction) and
    same-top rate (fraction), each with its standard error; NaN without labels."""

    prompt: int
    n_tokens: int
    ppl_q: float
    ppl_q_se: float
    ln_ppl_ratio: float
    ln_ppl_ratio_se: float
    kld: float
    kld_se: float
    rms_delta_p: float
    rms_delta_p_se: float
    same_top: float
    same_top_se: float


def prompt_ends(prompt_ids: np.ndarray | None, n: int) -> np.ndarray:
    """Token counts at the end of each prompt (where the id changes); [n] without ids."""
    if prompt_ids is None or n == 0:
        return np.array([n], dtype=np.int64)
    ids = np.asarray(prompt_ids)
    return np.append(np.flatnonzero(ids[1:] != ids[:-1]) + 1, n).astype(np.int64)


def _prefix_mean_se(x: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of x[:end] for each end: per-segment counts, means and centred
    sums of squares (float64), merged segment by segment (Chan et al.), so the whole run costs
    one pass over x rather than one per prompt."""
    x = np.asarray(x, np.float64)
    starts = np.concatenate([[0], ends[:-1]])
    means, ses = np.full(ends.size, math.nan), np.full(ends.size, math.nan)
    n_tot, mean_tot, m2_tot = 0, 0.0, 0.0
    for k, (a, b) in enumerate(zip(starts, ends)):
        seg = x[a:b]
        seg = seg[~np.isnan(seg)]
        if seg.size:
            m = float(seg.mean())
            m2 = float(((seg - m) ** 2).sum())
            n_new = n_tot + seg.size
            delta = m - mean_tot
            mean_tot += delta * seg.size / n_new
            m2_tot += m2 + delta * delta * n_tot * seg.size / n_new
            n_tot = n_new
        if n_tot:
            means[k] = mean_tot
            ses[k] = math.sqrt(m2_tot / (n_tot - 1) / n_tot) if n_tot > 1 else math.nan
    return means, ses


def running_lines(st: TokenStats, prompt_ids: np.ndarray | None) -> list[RunningLine]:
    """One RunningLine per prompt boundary (one in all without prompt ids), over the valid
    tokens so far (invalid ones, NaN, are left out as the summary leaves them out)."""
    ends = prompt_ends(prompt_ids, st.n_tokens)
    kld = per_token_values(st, "kld")
    valid = ~np.isnan(kld)
    m_kld, se_kld = _prefix_mean_se(kld, ends)
    agree = np.where(valid, st.top1_agree.astype(np.float64), np.nan)
    p, _ = _prefix_mean_se(agree, ends)
    n_valid = np.cumsum(valid)[ends - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        se_p = np.sqrt(p * (1 - p) / (n_valid - 1))
    nan = np.full(ends.size, math.nan)
    ppl = ppl_se = lnr = lnr_se = rms = rms_se = nan
    if st.nll_q is not None:
        keep = lambda x: np.where(valid, x, np.nan)  # noqa: E731
        a, sa = _prefix_mean_se(keep(st.nll_q), ends)
        lnr, lnr_se = _prefix_mean_se(keep(st.nll_q - st.nll_ref), ends)
        m2, se2 = _prefix_mean_se(keep((st.p_q_y - st.p_ref_y) ** 2), ends)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            ppl = np.exp(a)
            ppl_se = ppl * sa
            rms = np.sqrt(m2)
            rms_se = np.where(rms > 0, 0.5 / rms * se2, math.nan)
    return [RunningLine(k + 1, int(ends[k]), float(ppl[k]), float(ppl_se[k]), float(lnr[k]),
                        float(lnr_se[k]), float(m_kld[k]), float(se_kld[k]), float(rms[k]),
                        float(rms_se[k]), float(p[k]), float(se_p[k]))
            for k in range(ends.size)]
