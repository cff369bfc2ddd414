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


class _Moments:
    """Count, mean and centred sum of squares of the values seen so far (float64), merged
    one batch at a time (Chan et al.), NaN entries skipped."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        x = x[~np.isnan(x)]
        if not x.size:
            return
        m = float(x.mean())
        m2 = float(((x - m) ** 2).sum())
        n_new = self.n + x.size
        delta = m - self.mean
        self.mean += delta * x.size / n_new
        self.m2 += m2 + delta * delta * self.n * x.size / n_new
        self.n = n_new

    def mean_se(self) -> tuple[float, float]:
        if self.n == 0:
            return math.nan, math.nan
        se = math.sqrt(self.m2 / (self.n - 1) / self.n) if self.n > 1 else math.nan
        return self.mean, se


class RunningEstimates:
    """Feed per-token results in order (`add`, any chunking); get a RunningLine for each
    prompt completed so far, once: what `compare --running` prints as it goes. One pass over
    the tokens in all."""

    def __init__(self, prompt_ids: np.ndarray | None, n_tokens: int):
        self.ends = prompt_ends(prompt_ids, n_tokens)
        self.done = 0          # prompts reported
        self.seen = 0          # tokens fed
        self._pending: list[TokenStats] = []
        self._m = {k: _Moments() for k in ("kld", "agree", "nll_q", "ln_ratio", "dp2")}
        self._labels = None

    def add(self, st: TokenStats) -> list[RunningLine]:
        self._pending.append(st)
        self.seen += st.n_tokens
        out = []
        while self.done < self.ends.size and self.ends[self.done] <= self.seen:
            end = int(self.ends[self.done])
            start = int(self.ends[self.done - 1]) if self.done else 0
            self._consume(self._take(end - start))
            self.done += 1
            out.append(self._line(self.done, end))
        return out

    def _take(self, n: int) -> TokenStats:
        """The next n pending tokens (the rest stays pending)."""
        whole = TokenStats.concat(self._pending) if len(self._pending) > 1 else self._pending[0]
        head = _rows(whole, 0, n)
        self._pending = [_rows(whole, n, whole.n_tokens)] if n < whole.n_tokens else []
        return head

    def _consume(self, st: TokenStats) -> None:
        kld = per_token_values(st, "kld")
        valid = ~np.isnan(kld)
        self._m["kld"].add(kld)
        self._m["agree"].add(np.where(valid, st.top1_agree.astype(np.float64), np.nan))
        self._labels = st.nll_q is not None
        if self._labels:
            keep = lambda x: np.where(valid, x, np.nan)  # noqa: E731
            self._m["nll_q"].add(keep(st.nll_q))
            self._m["ln_ratio"].add(keep(st.nll_q - st.nll_ref))
            self._m["dp2"].add(keep((st.p_q_y - st.p_ref_y) ** 2))

    def _line(self, prompt: int, end: int) -> RunningLine:
        m_kld, se_kld = self._m["kld"].mean_se()
        p, _ = self._m["agree"].mean_se()
        n = self._m["agree"].n
        se_p = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan
        ppl = ppl_se = lnr = lnr_se = rms = rms_se = math.nan
        if self._labels:
            a, sa = self._m["nll_q"].mean_se()
            lnr, lnr_se = self._m["ln_ratio"].mean_se()
            m2, se2 = self._m["dp2"].mean_se()
            with np.errstate(over="ignore", invalid="ignore"):
                ppl = float(np.exp(a))
            ppl_se = ppl * sa
            rms = math.sqrt(m2) if m2 >= 0 else math.nan
            rms_se = 0.5 / rms * se2 if rms > 0 else math.nan
        return RunningLine(prompt, end, ppl, ppl_se, lnr, lnr_se, m_kld, se_kld, rms, rms_se, p, se_p)


def _rows(st: TokenStats, a: int, b: int) -> TokenStats:
    return TokenStats(**{k: (None if v is None else v[a:b]) for k, v in vars(st).items()})


def running_lines(st: TokenStats, prompt_ids: np.ndarray | None) -> list[RunningLine]:
    """One RunningLine per prompt boundary (one in all without prompt ids), over the valid
    tokens so far (invalid ones are left out, as the summary leaves them out)."""
    return RunningEstimates(prompt_ids, st.n_tokens).add(st)
