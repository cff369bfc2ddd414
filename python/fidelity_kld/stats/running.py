"""Running estimates after each prompt (llama.cpp's per-chunk lines of
`llama-perplexity --kl-divergence`): every statistic over the tokens seen so far, with its
standard error, so convergence on a long run is visible."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..ops import TokenStats
from .paired import per_token_values
from .summary import _mean_se


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


def running_lines(st: TokenStats, prompt_ids: np.ndarray | None) -> list[RunningLine]:
    """One RunningLine per prompt boundary (one in all without prompt ids)."""
    kld = per_token_values(st, "kld")
    agree = st.top1_agree.astype(np.float64)
    valid = ~np.isnan(kld)
    out = []
    for k, end in enumerate(prompt_ends(prompt_ids, st.n_tokens), start=1):
        v = valid[:end]
        m_kld, se_kld = _mean_se(kld[:end][v])
        p = float(agree[:end][v].mean()) if v.any() else math.nan
        n_v = int(v.sum())
        se_p = math.sqrt(p * (1 - p) / (n_v - 1)) if n_v > 1 else math.nan
        ppl = ppl_se = lnr = lnr_se = rms = rms_se = math.nan
        if st.nll_q is not None:
            nll_q = st.nll_q[:end][v]
            a, sa = _mean_se(nll_q)
            lnr, lnr_se = _mean_se(nll_q - st.nll_ref[:end][v])
            ppl = math.exp(a) if np.isfinite(a) else math.nan
            ppl_se = ppl * sa
            dp2 = (st.p_q_y[:end][v] - st.p_ref_y[:end][v]) ** 2
            m2, se2 = _mean_se(dp2)
            rms = math.sqrt(m2) if np.isfinite(m2) else math.nan
            rms_se = 0.5 / rms * se2 if rms > 0 else math.nan
        out.append(RunningLine(k, int(end), ppl, ppl_se, lnr, lnr_se, m_kld, se_kld, rms, rms_se,
                               p, se_p))
    return out
