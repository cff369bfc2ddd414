"""Plain float64 numpy oracle for every per-token output of the fused kernel.

Slow and memory-hungry on purpose: it materialises probabilities and is written to be read,
not to be fast. Every backend test and every benchmark baseline compares against it.
Conventions (docs/definitions.md): nats; KL(P_ref || P_q); argmax ties go to the lowest index; a row
with NaN or +inf on either side, or with no finite entry, is invalid (NaN outputs, top1 and
ranks -1); -inf entries are masked vocabulary (probability 0, contributing 0 to every sum).

The optional outputs of the fused core (issue 16), defined here once for every backend:
  logp_top1_ref/q  max_i a_i - lse (log-prob of the top token; p_top1 = exp of it)
  logp_top2_ref/q  the second largest value of the row (as a multiset: a tied maximum makes it
                   equal to logp_top1) minus lse; -inf when the row has one finite entry
  tvd              total variation distance, 1/2 sum |p_i - q_i| = 1 - sum min(p_i, q_i)
  jsd              Jensen-Shannon divergence, 1/2 KL(P||M) + 1/2 KL(Q||M), M = (P + Q)/2, nats
  with labels y:
  rank_ref_y/q_y   the number of entries strictly greater than the label's value (0: the label
                   is a top token, possibly tied; the label is in the top-k iff rank < k)
  margin_ref/q     the label's value minus the largest value at any other index (lse cancels):
                   > 0 iff the label alone is the top token, +inf when no other entry is finite
All of them use the row's own renormalisation (also in llama_parity mode, where only nll_ref,
p_ref_y and kld_llama take the decoded log-probs as they are).
"""

from __future__ import annotations

import numpy as np

LLAMA_WINDOW = -16.0


def _log_softmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise (lse, log p) in float64; -inf entries stay -inf.

    log p is (x - max) - log S, not x - lse: next to a huge max (1e12 and up) lse has lost the
    few nats that log S carries, and x - lse would make every near-max entry log p = 0."""
    m = np.max(x, axis=1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        shifted = x - m_safe
        log_s = np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
        lse = m_safe + log_s
    return lse[:, 0], shifted - log_s


def _xlogy_terms(w: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """w * diff with 0 where w == 0 (0 * inf = 0 for masked entries)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(w > 0, w * diff, 0.0)


def invalid_rows(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Rows with NaN or +inf, or with no finite entry, on either side."""
    bad = np.zeros(ref.shape[0], dtype=bool)
    for x in (ref, q):
        bad |= np.isnan(x).any(axis=1) | np.isposinf(x).any(axis=1)
        bad |= ~np.isfinite(x).any(axis=1)
    return bad


def logit_stats(ref, q, labels=None, *, llama_parity: bool = False,
                q_logprobs: bool = False) -> dict[str, np.ndarray]:
    """Every per-token statistic of ref vs q, in float64.

    ref, q: [N, V] arrays of logits (any real dtype; upcast to float64 here).
    labels: optional [N] ints, the token each row predicts.
    llama_parity: ref rows are llama.cpp's decoded log-probs: nll_ref = -ref[y] (no
    renormalisation) and kld_llama = sum over ref > -16 of exp(ref) * (ref - log q).
    q_logprobs (with llama_parity): q rows are a llama.cpp file's decoded log-probs too, and
    like llama.cpp they are used as they are: log q = q in kld_llama and nll_q = -q[y]. Every
    other statistic renormalises both sides.
    """
    if q_logprobs and not llama_parity:
        raise ValueError("q_logprobs applies to llama_parity mode only")
    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"ref and q must be 2-D and equal in shape, got {a.shape} and {b.shape}")
    n, v = a.shape
    bad = invalid_rows(a, b)
    a_ok = np.where(bad[:, None], 0.0, a)
    b_ok = np.where(bad[:, None], 0.0, b)
    lse_a, logp = _log_softmax(a_ok)
    lse_b, logq = _log_softmax(b_ok)
    p = np.exp(logp)
    qq = np.exp(logq)
    with np.errstate(invalid="ignore"):
        kld = _xlogy_terms(p, logp - logq).sum(axis=1)
        kld_rev = _xlogy_terms(qq, logq - logp).sum(axis=1)
        entropy = -_xlogy_terms(p, logp).sum(axis=1)
    out = {
        "kld": kld,
        "kld_reverse": kld_rev,
        "lse_ref": lse_a,
        "lse_q": lse_b,
        "entropy_ref": entropy,
        "top1_ref": np.argmax(a_ok, axis=1).astype(np.int64),
        "top1_q": np.argmax(b_ok, axis=1).astype(np.int64),
    }
    if labels is not None:
        y = np.asarray(labels, dtype=np.int64)
        rows = np.arange(n)
        nll_ref = -a_ok[rows, y] if llama_parity else lse_a - a_ok[rows, y]
        nll_q = -b_ok[rows, y] if q_logprobs else lse_b - b_ok[rows, y]
        out.update(nll_ref=nll_ref, nll_q=nll_q, p_ref_y=np.exp(-nll_ref), p_q_y=np.exp(-nll_q))
    if llama_parity:
        w = np.where(a_ok > LLAMA_WINDOW, np.exp(a_ok), 0.0)
        with np.errstate(invalid="ignore"):
            out["kld_llama"] = _xlogy_terms(w, a_ok - (b_ok if q_logprobs else logq)).sum(axis=1)
    out.update(_direction_stats(a_ok, b_ok, logp, logq, p, qq,
                                None if labels is None else np.asarray(labels, dtype=np.int64)))
    for key, val in out.items():
        if key.startswith(("top1", "rank")):
            val[bad] = -1
        else:
            val[bad] = np.nan
    return out


def _top2(x: np.ndarray) -> np.ndarray:
    """Second largest value of each row, as a multiset (-inf for V == 1)."""
    if x.shape[1] < 2:
        return np.full(x.shape[0], -np.inf)
    return np.partition(x, x.shape[1] - 2, axis=1)[:, -2]


def _direction_stats(a, b, logp, logq, p, q, y) -> dict[str, np.ndarray]:
    """The optional outputs (module docstring) of valid-masked float64 rows a, b."""
    with np.errstate(invalid="ignore", over="ignore"):
        m = 0.5 * (p + q)
        log_m = np.log(m, where=m > 0, out=np.full_like(m, -np.inf))
        jsd = 0.5 * (_xlogy_terms(p, logp - log_m).sum(axis=1)
                     + _xlogy_terms(q, logq - log_m).sum(axis=1))
        out = {
            # from log p, not x - lse: next to a huge max, lse has lost log S (_log_softmax)
            "logp_top1_ref": logp.max(axis=1),
            "logp_top1_q": logq.max(axis=1),
            "logp_top2_ref": _top2(logp),
            "logp_top2_q": _top2(logq),
            "tvd": 0.5 * np.abs(p - q).sum(axis=1),
            "jsd": jsd,
        }
    if y is not None:
        rows = np.arange(a.shape[0])
        for side, x in (("ref", a), ("q", b)):
            xy = x[rows, y]
            others = x.copy()
            others[rows, y] = -np.inf
            with np.errstate(invalid="ignore"):
                out[f"rank_{side}_y"] = (x > xy[:, None]).sum(axis=1).astype(np.int64)
                out[f"margin_{side}"] = xy - others.max(axis=1)
    return out


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32: the upper half of the float32 word."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out
