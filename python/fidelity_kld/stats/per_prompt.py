"""Per-prompt aggregation of per-token statistics (what the cohort analyses consume)."""

from __future__ import annotations

import numpy as np

from ..ops import TokenStats
from .direction import direction_values, has_direction_outputs

COLUMNS = ("prompt_id", "n_tokens", "n_invalid", "kld_mean", "kld_max", "kld_p99",
           "top1_agree", "nll_ref_mean", "nll_q_mean")


def per_prompt(stats: TokenStats, prompt_ids: np.ndarray) -> dict[str, np.ndarray]:
    """One row per prompt, sorted by prompt id.

    kld_mean / kld_max / kld_p99 (numpy 'linear' percentile) over the prompt's valid tokens;
    top1_agree: fraction of valid tokens whose argmax agrees; nll_*_mean when labels exist.
    Invalid tokens are excluded and counted in n_invalid.
    When the stats carry the optional outputs (compare's extra=...), the table also has one
    column per direction scalar they allow (stats.direction.SCALARS: dnll_mean, flip_harm,
    tvd_mean, ...), that scalar's mean over the prompt's tokens (NaN when none counts).
    """
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.shape != (stats.n_tokens,):
        raise ValueError(f"prompt_ids has {prompt_ids.size} entries for {stats.n_tokens} tokens")
    ids, inverse = np.unique(prompt_ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(ids) + 1))
    valid = stats.valid[order]
    kld = stats.kld[order]
    agree = stats.top1_agree[order]
    nll_ref = None if stats.nll_ref is None else stats.nll_ref[order]
    nll_q = None if stats.nll_q is None else stats.nll_q[order]
    out = {c: np.full(len(ids), np.nan) for c in COLUMNS[3:]}
    direction = {}
    if has_direction_outputs(stats):
        direction = {k: v[order] for k, v in direction_values(stats).items() if v is not None}
        out.update({k: np.full(len(ids), np.nan) for k in direction})
    n_tokens = np.diff(bounds)
    n_invalid = np.zeros(len(ids), dtype=np.int64)
    for i in range(len(ids)):
        sl = slice(bounds[i], bounds[i + 1])
        ok = valid[sl]
        n_invalid[i] = int((~ok).sum())
        k = kld[sl][ok]
        if k.size == 0:
            continue
        out["kld_mean"][i] = k.mean()
        out["kld_max"][i] = k.max()
        out["kld_p99"][i] = np.percentile(k, 99)
        out["top1_agree"][i] = agree[sl][ok].mean()
        if nll_ref is not None:
            out["nll_ref_mean"][i] = nll_ref[sl][ok].mean()
            out["nll_q_mean"][i] = nll_q[sl][ok].mean()
        for name, values in direction.items():
            x = values[sl]
            x = x[~np.isnan(x)]
            if x.size:
                out[name][i] = x.mean()
    return {"prompt_id": ids, "n_tokens": n_tokens, "n_invalid": n_invalid, **out}
