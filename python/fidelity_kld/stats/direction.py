"""Direction-aware and distribution-level summaries of per-token statistics (issue 16).

KLD measures how much the quantized model's distribution moved, not whether the move hurt:
these metrics ask, against the label (the token that came next), whether a change made the
quant worse or better, and split the KLD by where the reference itself was unsure.
Definitions (docs/definitions.md, "Direction metrics"), over the valid tokens:

  dnll_mean    mean(nll_q - nll_ref) = ln(PPL(q)/PPL(ref)) (the summary's ln_ppl_ratio)
  dnll_harm    mean max(0, nll_q - nll_ref);  dnll_help: mean max(0, nll_ref - nll_q)
               (tokens whose label is impossible for both models, both nll +inf, are left
               out of the three, as the summary leaves them out of the PPL)
  flip_harm    rate of tokens with top1_ref == label and top1_q != label (the reference was
               right, the quant is wrong); flip_help the reverse; flip_net = harm - help
  top5_lost    rate of rank_ref_y < 5 <= rank_q_y (the label left the top 5); top5_gained
               the reverse; top5_net = lost - gained
  margin_harm  mean max(0, margin_ref - margin_q) over tokens with both margins finite
  tvd_mean, jsd_mean   mean total variation distance, Jensen-Shannon divergence
  kld_confident        mean KLD over tokens with p_ref_top1 = exp(logp_top1_ref) >= 0.5
  kld_by_conf  tokens bucketed by p_ref_top1 (CONF_EDGES; the last bucket is closed):
               n, token_share (n / valid tokens), kld_mean, kld_share (the bucket's KLD sum /
               all tokens' KLD sum: where the mean KLD comes from)
  kld_ref_right / kld_ref_wrong   the same over tokens whose reference top-1 is / is not the
               label
Every scalar comes with its standard error (key + "_se": sample std / sqrt(n) of the
per-token values; for a rate sqrt(p(1-p)/(n-1)), as the summary's same-top SE). Larger is more
damage for every scalar except dnll_help, flip_help and top5_gained. A key is None when the
outputs it needs are absent (no labels, or compare(..., extra=...) did not ask for them), NaN
when they are present but no token qualifies. A kld_share is NaN when the total KLD is not
finite and positive (an infinite KLD makes every share inf/inf).

The KLD is the one the summary uses: llama.cpp's windowed KLD when the stats carry it
(llama_compat), else the full-vocabulary KL(P_ref || P_q).
"""

from __future__ import annotations

import math

import numpy as np

from ..ops import TokenStats

# the optional TokenStats outputs (compare's extra=...) the direction metrics read
DIRECTION_OUTPUTS = ("logp_top1_ref", "logp_top1_q", "logp_top2_ref", "logp_top2_q", "tvd",
                     "jsd", "rank_ref_y", "rank_q_y", "margin_ref", "margin_q")
# bucket edges of the reference's top-1 probability for kld_by_conf
CONF_EDGES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
CONFIDENT = 0.5  # p_ref_top1 at and above which kld_confident counts a token
TOP_K = 5        # top5_lost / top5_gained: membership of the label in each model's top 5
# the scalar candidates, in print order; each is a mean of per-token values (direction_values)
SCALARS = ("dnll_mean", "dnll_harm", "dnll_help", "flip_harm", "flip_help", "flip_net",
           "top5_lost", "top5_gained", "top5_net", "margin_harm", "tvd_mean", "jsd_mean",
           "kld_confident")
# the scalars where larger means the quant helped, not hurt
HELPFUL = ("dnll_help", "flip_help", "top5_gained")


def _output(ts: TokenStats, name: str) -> np.ndarray | None:
    """An optional output, or None when absent (also before TokenStats had the field)."""
    return getattr(ts, name, None)


def has_direction_outputs(ts: TokenStats) -> bool:
    """Whether the stats carry any of the optional outputs (compare was asked for extra)."""
    return any(_output(ts, name) is not None for name in DIRECTION_OUTPUTS)


def summary_kld(ts: TokenStats, llama_compat: bool | None = None) -> np.ndarray:
    """The per-token KLD the summary uses (llama.cpp's windowed one when present by default)."""
    if llama_compat is None:
        llama_compat = ts.kld_llama is not None
    if llama_compat and ts.kld_llama is None:
        raise ValueError("llama_compat needs stats computed with llama_parity=True")
    return ts.kld_llama if llama_compat else ts.kld


def _where(mask: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x as float64 where mask holds, NaN elsewhere (NaN = the token does not count)."""
    return np.where(mask, np.asarray(x, dtype=np.float64), np.nan)


def direction_values(ts: TokenStats, *, llama_compat: bool | None = None
                     ) -> dict[str, np.ndarray | None]:
    """Per-token values of every scalar in SCALARS (float64, length n_tokens): each scalar is
    the mean of its array over the non-NaN entries; NaN marks a token that does not count for
    that scalar (invalid, or outside its token set). None where the outputs are absent."""
    valid = ts.valid
    kld = summary_kld(ts, llama_compat)
    out: dict[str, np.ndarray | None] = dict.fromkeys(SCALARS)
    if ts.nll_ref is not None and ts.labels is not None:
        with np.errstate(invalid="ignore"):
            d = _where(valid, ts.nll_q - ts.nll_ref)  # NaN where both are +inf
        out["dnll_mean"] = d
        out["dnll_harm"] = np.maximum(d, 0.0)  # NaN stays NaN
        out["dnll_help"] = np.maximum(-d, 0.0)
        y = np.asarray(ts.labels)
        ref_right, q_right = ts.top1_ref == y, ts.top1_q == y
        harm, helped = ref_right & ~q_right, q_right & ~ref_right
        out["flip_harm"] = _where(valid, harm)
        out["flip_help"] = _where(valid, helped)
        out["flip_net"] = _where(valid, harm.astype(np.float64) - helped)
    rank_ref, rank_q = _output(ts, "rank_ref_y"), _output(ts, "rank_q_y")
    if rank_ref is not None and rank_q is not None:
        lost = (rank_ref < TOP_K) & (rank_q >= TOP_K)
        gained = (rank_q < TOP_K) & (rank_ref >= TOP_K)
        out["top5_lost"] = _where(valid, lost)
        out["top5_gained"] = _where(valid, gained)
        out["top5_net"] = _where(valid, lost.astype(np.float64) - gained)
    m_ref, m_q = _output(ts, "margin_ref"), _output(ts, "margin_q")
    if m_ref is not None and m_q is not None:
        both = valid & np.isfinite(m_ref) & np.isfinite(m_q)
        with np.errstate(invalid="ignore"):
            out["margin_harm"] = _where(both, np.maximum(m_ref - m_q, 0.0))
    for name in ("tvd", "jsd"):
        x = _output(ts, name)
        if x is not None:
            out[f"{name}_mean"] = _where(valid, x)
    p_top1 = _p_ref_top1(ts)
    if p_top1 is not None:
        out["kld_confident"] = _where(valid & (p_top1 >= CONFIDENT), kld)
    return out


def _p_ref_top1(ts: TokenStats) -> np.ndarray | None:
    logp = _output(ts, "logp_top1_ref")
    if logp is None:
        return None
    with np.errstate(invalid="ignore"):
        return np.exp(logp)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean of the non-NaN entries and its standard error (NaN below 1 and 2 values)."""
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    mean = float(np.mean(x))
    if x.size < 2 or not np.isfinite(mean):
        return mean, math.nan
    return mean, float(np.std(x, ddof=1) / math.sqrt(x.size))


def _group(kld: np.ndarray, mask: np.ndarray, n_valid: int, total: float) -> dict:
    """n, token share, mean KLD and share of the total KLD of the tokens in mask."""
    k = kld[mask]
    n = int(k.size)
    share_ok = math.isfinite(total) and total > 0
    return {
        "n": n,
        "token_share": n / n_valid if n_valid else math.nan,
        "kld_mean": float(np.mean(k)) if n else math.nan,
        "kld_share": (float(np.sum(k)) / total if n else 0.0) if share_ok else math.nan,
    }


def _kld_splits(ts: TokenStats, kld: np.ndarray) -> dict:
    """kld_by_conf, kld_ref_right and kld_ref_wrong (None where their inputs are absent)."""
    valid = ts.valid
    n_valid = int(valid.sum())
    k = kld[valid]
    total = float(np.sum(k)) if n_valid else math.nan
    out: dict = {"kld_by_conf": None, "kld_ref_right": None, "kld_ref_wrong": None}
    p_top1 = _p_ref_top1(ts)
    if p_top1 is not None:
        p = p_top1[valid]
        buckets = []
        for i, (lo, hi) in enumerate(zip(CONF_EDGES[:-1], CONF_EDGES[1:])):
            # the last bucket takes p >= 0.9, also a p_top1 that rounding put a hair above 1
            mask = (p >= lo) & (p < hi) if i < len(CONF_EDGES) - 2 else p >= lo
            buckets.append({"lo": lo, "hi": hi, **_group(k, mask, n_valid, total)})
        out["kld_by_conf"] = buckets
    if ts.labels is not None:
        right = (ts.top1_ref == np.asarray(ts.labels))[valid]
        out["kld_ref_right"] = _group(k, right, n_valid, total)
        out["kld_ref_wrong"] = _group(k, ~right, n_valid, total)
    return out


def summarize_direction(ts: TokenStats, *, llama_compat: bool | None = None) -> dict:
    """The direction metrics of the module docstring over the valid tokens of ts.

    Returns a dict: n_valid, has_labels, llama_compat (which KLD), each scalar in SCALARS with
    its "_se" and the number of tokens it averaged ("n_" + name), kld_by_conf (a list of
    buckets), kld_ref_right and kld_ref_wrong. Keys of absent outputs hold None.
    """
    if llama_compat is None:
        llama_compat = ts.kld_llama is not None
    kld = summary_kld(ts, llama_compat)
    out: dict = {"n_valid": int(ts.valid.sum()), "has_labels": ts.labels is not None,
                 "llama_compat": bool(llama_compat)}
    for name, values in direction_values(ts, llama_compat=llama_compat).items():
        if values is None:
            out[name] = out[f"{name}_se"] = out[f"n_{name}"] = None
        else:
            out[name], out[f"{name}_se"] = _mean_se(values)
            out[f"n_{name}"] = int(np.count_nonzero(~np.isnan(values)))
    out.update(_kld_splits(ts, kld))
    return out
