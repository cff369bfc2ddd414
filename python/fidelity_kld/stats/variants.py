"""Fidelity variants: the numbers a cohort analysis can rank models by.

Each built-in variant is read from the summary `fidelity-kld compare` writes (its
Summary.to_dict()), except prompt_kld_mean, which averages the per-prompt Parquet. Every
variant is oriented as a distance from the reference where the summary allows; its value
for the reference against itself (`reference_value`) anchors the range-restriction null.
Manifests add their own variants (KLD on another corpus, at another context length...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


def summary_number(value) -> float:
    """A number from Summary.to_dict() JSON: None is NaN, "inf"/"-inf" are infinities."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        if value in ("inf", "Infinity", "+inf"):
            return math.inf
        if value in ("-inf", "-Infinity"):
            return -math.inf
        if value.lower() == "nan":
            return math.nan
        return float(value)
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _get(*keys) -> Callable[[dict], float]:
    def read(summary: dict) -> float:
        node = summary
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return math.nan
            node = node[k]
        return summary_number(node)
    return read


def _top1_disagree(summary: dict) -> float:
    return 1.0 - _get("same_top")(summary)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    description: str
    read: Callable[[dict], float] | None  # None: not from the summary
    reference_value: float = 0.0


BUILTIN_VARIANTS = (
    VariantSpec("kld_mean", "mean KL(P_ref || P_q) per token, nats", _get("kld", "mean")),
    VariantSpec("kld_median", "median per-token KLD, nats", _get("kld", "median")),
    VariantSpec("kld_p90", "90th percentile of per-token KLD, nats", _get("kld", "percentiles", "90")),
    VariantSpec("kld_p99", "99th percentile of per-token KLD, nats", _get("kld", "percentiles", "99")),
    VariantSpec("kld_p99.9", "99.9th percentile of per-token KLD, nats", _get("kld", "percentiles", "99.9")),
    VariantSpec("prompt_kld_mean", "mean over prompts of per-prompt mean KLD, nats", None),
    VariantSpec("ppl_ratio", "PPL(q) / PPL(ref)", _get("ppl_ratio"), 1.0),
    VariantSpec("ln_ppl_ratio", "ln(PPL(q) / PPL(ref))", _get("ln_ppl_ratio")),
    VariantSpec("ppl_diff", "PPL(q) - PPL(ref)", _get("ppl_diff")),
    VariantSpec("top1_disagree", "fraction of tokens whose top-1 differs from the reference's", _top1_disagree),
    VariantSpec("rms_delta_p", "RMS of p_q(y) - p_ref(y)", _get("rms_delta_p")),
    VariantSpec("kld_reverse_mean", "mean KL(P_q || P_ref) per token, nats", _get("kld_reverse", "mean")),
)
BUILTIN_NAMES = tuple(v.name for v in BUILTIN_VARIANTS)


# A manifest's own column whose name says what it measures gets that measure's value for
# the reference against itself unless the manifest gives one: without it the
# range-restriction null has no anchor at the reference. Checked in order.
_IDENTITY_BY_NAME = (
    ("ppl_ratio", 1.0),         # PPL(q) / PPL(ref) of the reference against itself
    ("kld", 0.0), ("kl_div", 0.0), ("divergence", 0.0), ("ln_ppl", 0.0), ("ppl_diff", 0.0),
    ("top1_disagree", 0.0), ("delta_p", 0.0),
)


def identity_value(name: str) -> float:
    """The reference-against-itself value a column's name declares (0 for a KLD or other
    divergence, 1 for a PPL ratio), or NaN when the name says nothing."""
    low = name.lower()
    for key, value in _IDENTITY_BY_NAME:
        if key in low:
            return value
    return math.nan


def describe(name: str) -> str:
    for v in BUILTIN_VARIANTS:
        if v.name == name:
            return v.description
    return "given in the manifest"


def from_summary(summary: dict) -> dict[str, float]:
    """Every built-in variant a Summary dict provides (NaN where it lacks one)."""
    return {v.name: v.read(summary) for v in BUILTIN_VARIANTS if v.read is not None}
