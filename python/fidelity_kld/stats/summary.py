"""llama.cpp-compatible summaries of per-token statistics, and a streaming accumulator.

Definitions follow `llama-perplexity --kl-divergence` (see docs/definitions.md) so users can check us
against it, with one deliberate difference: every variance is computed from centred values
(two-pass, float64) rather than llama.cpp's raw-moment sum2/N - mean^2, which loses digits
when the mean is large next to the spread. The standard errors are the same quantities.

Invalid tokens (NaN/+inf inputs) are excluded and counted; +inf KLDs are kept (they make the
mean +inf, as they should) and counted. Tokens whose label has probability 0 under both models
(its logit -inf on both sides: both nll +inf, their difference undefined) are counted in
n_label_inf and left out of the label statistics (PPL, ratios, correlation, Δp).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..ops import TokenStats, compare
from .direction import DIRECTION_OUTPUTS, has_direction_outputs, summarize_direction

KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1)
DELTA_P_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 25.0, 10.0, 5.0, 1.0, 0.1)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); SE is NaN below 2 values."""
    n = x.size
    if n == 0:
        return math.nan, math.nan
    mean = float(np.mean(x))
    if n < 2 or not np.isfinite(mean):
        return mean, math.nan
    return mean, float(np.std(x, ddof=1) / math.sqrt(n))


def _percentiles_numpy(x: np.ndarray, ps) -> dict[str, float]:
    """numpy's default 'linear' percentiles, except that interpolating between two +inf
    order statistics gives +inf (numpy computes inf - inf = NaN there)."""
    if x.size == 0:
        return {f"{p:g}": math.nan for p in ps}
    s = np.sort(x)
    out = {}
    for p in ps:
        pos = p / 100.0 * (s.size - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, s.size - 1)
        if s[lo] == s[hi] or pos == lo:
            out[f"{p:g}"] = float(s[lo])
        elif np.isinf(s[hi]) or np.isinf(s[lo]):  # any weight on an infinite end
            out[f"{p:g}"] = float(s[hi] if np.isinf(s[hi]) else s[lo])
        else:
            with np.errstate(invalid="ignore"):
                out[f"{p:g}"] = float(np.percentile(s[lo:hi + 1], 100.0 * (pos - lo), method="linear"))
    return out


def _percentiles_llama(sorted32: np.ndarray, ps) -> dict[str, float]:
    """llama.cpp's percentile: p = f*(N-1) in float32, linear between order statistics."""
    n = sorted32.size
    out = {}
    for pct in ps:
        if n == 0:
            out[f"{pct:g}"] = math.nan
            continue
        f = np.float32(pct / 100.0)
        pos = np.float32(f * np.float32(n - 1))
        ip = int(np.floor(pos))
        w = np.float32(pos - np.float32(ip))
        lo = sorted32[ip]
        hi = sorted32[min(ip + 1, n - 1)]
        out[f"{pct:g}"] = float(np.float32((np.float32(1) - w) * lo + w * hi))
    return out


def _median_llama(sorted32: np.ndarray) -> float:
    n = sorted32.size
    if n == 0:
        return math.nan
    if n % 2 == 0:
        return float(np.float32(0.5) * (sorted32[n // 2] + sorted32[n // 2 - 1]))
    return float(sorted32[n // 2])


@dataclass(frozen=True)
class Distribution:
    """Mean (with standard error), median, extremes and percentiles of one per-token value."""

    mean: float
    se: float
    median: float
    min: float
    max: float
    percentiles: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def of(x: np.ndarray, ps, *, llama_compat: bool = False) -> "Distribution":
        mean, se = _mean_se(x)
        if x.size == 0:
            return Distribution(mean, se, math.nan, math.nan, math.nan, _percentiles_numpy(x, ps))
        if llama_compat:
            s = np.sort(x.astype(np.float32))
            return Distribution(mean, se, _median_llama(s), float(s[0]), float(s[-1]),
                                _percentiles_llama(s, ps))
        return Distribution(mean, se, float(np.median(x)), float(np.min(x)), float(np.max(x)),
                            _percentiles_numpy(x, ps))


@dataclass(frozen=True)
class Summary:
    """What llama-perplexity --kl-divergence prints, and a little more. Units: nats; Δp and
    same-top as fractions (the text report shows percent).

    ln_ppl_ratio = mean(nll_q) - mean(nll_ref) = ln(PPL(q)/PPL(ref)); its SE is the standard
    error of the mean per-token difference. cor_nll is the Pearson correlation of per-token
    nll_q and nll_ref (llama.cpp's Cor(ln(PPL(Q)), ln(PPL(base)))).
    direction: stats.direction.summarize_direction's dict when the stats carry the optional
    outputs (compare's extra=...), else None.
    """

    n_tokens: int
    n_valid: int
    n_invalid: int
    n_kld_inf: int
    llama_compat: bool
    kld: Distribution
    kld_reverse: Distribution
    entropy_ref_mean: float
    same_top: float
    same_top_se: float
    has_labels: bool = False
    n_label_inf: int = 0
    ppl_ref: float = math.nan
    ppl_ref_se: float = math.nan
    ppl_q: float = math.nan
    ppl_q_se: float = math.nan
    cor_nll: float = math.nan
    ln_ppl_ratio: float = math.nan
    ln_ppl_ratio_se: float = math.nan
    ppl_ratio: float = math.nan
    ppl_ratio_se: float = math.nan
    ppl_diff: float = math.nan
    ppl_diff_se: float = math.nan
    delta_p: Distribution | None = None
    rms_delta_p: float = math.nan
    rms_delta_p_se: float = math.nan
    direction: dict | None = None

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None, infinities the strings 'inf' / '-inf'."""
        return json_ready(asdict(self))


def json_ready(obj):
    """Plain JSON types: NaN becomes None, infinities the strings 'inf' / '-inf', numpy
    scalars and arrays Python numbers and lists, dict keys strings."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    return obj


def summarize(stats: TokenStats, *, llama_compat: bool | None = None) -> Summary:
    """Summary statistics of per-token results.

    llama_compat (default: on when stats carry llama.cpp's windowed KLD): use llama.cpp's
    windowed KLD, its float32 percentile interpolation and its median rule.
    The direction metrics (Summary.direction) are included when the stats carry the optional
    outputs of compare(..., extra=...), computed with the same KLD.
    """
    if llama_compat is None:
        llama_compat = stats.kld_llama is not None
    if llama_compat and stats.kld_llama is None:
        raise ValueError("llama_compat needs stats computed with llama_parity=True")
    valid = stats.valid
    n_valid = int(valid.sum())
    kld_all = stats.kld_llama if llama_compat else stats.kld
    kld = kld_all[valid]
    agree = stats.top1_agree[valid]
    p_same = float(agree.mean()) if n_valid else math.nan
    same_se = math.sqrt(p_same * (1 - p_same) / (n_valid - 1)) if n_valid > 1 else math.nan
    kw = dict(
        n_tokens=stats.n_tokens,
        n_valid=n_valid,
        n_invalid=stats.n_tokens - n_valid,
        n_kld_inf=int(np.isinf(kld).sum()),
        llama_compat=llama_compat,
        kld=Distribution.of(kld, KLD_PERCENTILES, llama_compat=llama_compat),
        kld_reverse=Distribution.of(stats.kld_reverse[valid], KLD_PERCENTILES),
        entropy_ref_mean=float(np.mean(stats.entropy_ref[valid])) if n_valid else math.nan,
        same_top=p_same,
        same_top_se=same_se,
    )
    if stats.nll_ref is not None:
        nll_ref, nll_q = stats.nll_ref[valid], stats.nll_q[valid]
        impossible = np.isposinf(nll_ref) & np.isposinf(nll_q)
        keep = ~impossible
        kw.update(_label_stats(nll_ref[keep], nll_q[keep], stats.delta_p[valid][keep],
                               llama_compat))
        kw["n_label_inf"] = int(impossible.sum())
    if has_direction_outputs(stats):
        kw["direction"] = summarize_direction(stats, llama_compat=llama_compat)
    return Summary(**kw)


def _label_stats(nll_ref, nll_q, delta_p, llama_compat) -> dict:
    n = nll_ref.size
    a, sa = _mean_se(nll_q)
    b, sb = _mean_se(nll_ref)
    d, sd = _mean_se(nll_q - nll_ref)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if n > 1 and np.isfinite(a) and np.isfinite(b):
            cov_means = float(np.cov(nll_q, nll_ref, ddof=1)[0, 1]) / n
            cor = float(np.corrcoef(nll_q, nll_ref)[0, 1])  # NaN when either is constant
        else:
            cov_means, cor = math.nan, math.nan
        ppl_q, ppl_ref, ratio = (float(np.exp(x)) for x in (a, b, d))
    u_q, u_ref = ppl_q * sa, ppl_ref * sb
    diff_var = u_q**2 + u_ref**2 - 2 * ppl_q * ppl_ref * cov_means
    rms = math.sqrt(float(np.mean(delta_p**2))) if n else math.nan
    _, se_sq = _mean_se(delta_p**2)
    return dict(
        has_labels=True,
        ppl_ref=ppl_ref,
        ppl_ref_se=u_ref,
        ppl_q=ppl_q,
        ppl_q_se=u_q,
        cor_nll=cor,
        ln_ppl_ratio=d,
        ln_ppl_ratio_se=sd,
        ppl_ratio=ratio,
        ppl_ratio_se=ratio * sd,
        ppl_diff=ppl_q - ppl_ref,
        ppl_diff_se=math.sqrt(diff_var) if diff_var >= 0 else math.nan,
        delta_p=Distribution.of(delta_p, DELTA_P_PERCENTILES, llama_compat=llama_compat),
        rms_delta_p=rms,
        rms_delta_p_se=0.5 / rms * se_sq if rms > 0 else math.nan,
    )


class Accumulator:
    """Feed (ref, q, labels) batch by batch; ``summary()`` and ``per_prompt()`` at any time;
    ``merge`` two.

    Batches may be [tokens, vocab] or [batch, seq, vocab] (flattened), numpy arrays, torch
    tensors or DLPack objects; ``mask`` ([batch, seq] or [tokens], true = keep) drops padding
    positions; ``prompt_ids`` may be per sequence ([batch]) or per token.

    Keeps the per-token results (about 100 bytes a token, against the hundreds of KB of
    logits each token costs to read), so percentiles are exact and the summary of chunked
    feeding is bitwise the summary of one call over the same tokens.
    """

    def __init__(self, *, threads: int | None = None, llama_parity: bool = False):
        self.threads = threads
        self.llama_parity = llama_parity
        self._parts: list[TokenStats] = []
        self._prompt_ids: list[np.ndarray | None] = []

    def add(self, ref, q, labels=None, *, mask=None, prompt_ids=None, extra=(),
            **kwargs) -> TokenStats:
        """Compare one batch and keep its per-token results. extra: compare's optional output
        groups ("top2", "label", "tvd", "jsd", "all"); with them the summary has its direction
        metrics. Every batch must ask for the same outputs (and all or none have labels)."""
        ref, q, labels, prompt_ids = _flatten_batch(ref, q, labels, mask, prompt_ids)
        if extra:  # only when asked for, as stream.compare_sources passes it
            kwargs["extra"] = extra
        stats = compare(ref, q, labels, threads=self.threads, llama_parity=self.llama_parity,
                        **kwargs)
        self.add_stats(stats, prompt_ids)
        return stats

    def add_stats(self, stats: TokenStats, prompt_ids=None) -> None:
        if prompt_ids is not None:
            prompt_ids = np.asarray(prompt_ids).reshape(-1)
            if prompt_ids.size != stats.n_tokens:
                raise ValueError(f"prompt_ids has {prompt_ids.size} entries for {stats.n_tokens} tokens")
        if self._parts:
            _check_same_kind(self._parts[0], stats, "this batch")
        self._parts.append(stats)
        self._prompt_ids.append(prompt_ids)

    def merge(self, other: "Accumulator") -> "Accumulator":
        if self.llama_parity != other.llama_parity:
            raise ValueError("cannot merge a llama-parity accumulator with one using the exact "
                             "definitions: their KLDs are different quantities")
        if self._parts and other._parts:
            _check_same_kind(self._parts[0], other._parts[0], "the other accumulator's batches")
        out = Accumulator(threads=self.threads, llama_parity=self.llama_parity)
        out._parts = self._parts + other._parts
        out._prompt_ids = self._prompt_ids + other._prompt_ids
        return out

    @property
    def n_tokens(self) -> int:
        return sum(p.n_tokens for p in self._parts)

    def token_stats(self) -> TokenStats:
        if not self._parts:
            raise ValueError("the accumulator has seen no tokens yet")
        if len(self._parts) > 1:  # keep one array per field: later calls are cheap
            ids = self._prompt_ids
            self._parts = [TokenStats.concat(self._parts)]
            self._prompt_ids = [None if any(i is None for i in ids) else np.concatenate(ids)]
        return self._parts[0]

    def summary(self) -> Summary:
        return summarize(self.token_stats())

    def per_prompt(self) -> dict[str, np.ndarray]:
        """Per-prompt table (fidelity_kld.stats.per_prompt.COLUMNS); needs prompt ids."""
        from .per_prompt import per_prompt

        stats = self.token_stats()
        if self._prompt_ids[0] is None:
            raise ValueError("per_prompt() needs prompt_ids for every batch that was added")
        if stats.kld_llama is not None:
            stats = replace(stats, kld=stats.kld_llama)
        return per_prompt(stats, self._prompt_ids[0])


def _check_same_kind(seen: TokenStats, new: TokenStats, what: str) -> None:
    """Batches with and without labels (or llama.cpp's KLD, or an optional output) cannot be
    summarised together: the summary would silently drop PPL (or switch definitions, or drop
    a direction metric) for every token."""
    checks = [("nll_ref", "labels"), ("kld_llama", "llama-parity KLDs")]
    checks += [(name, f"the optional output {name} (compare's extra=)") for name in DIRECTION_OUTPUTS]
    for field_name, meaning in checks:
        had = getattr(seen, field_name, None) is not None
        has = getattr(new, field_name, None) is not None
        if had != has:
            raise ValueError(f"{what} {'has' if has else 'lacks'} {meaning}, the batches before "
                             f"{'did not' if has else 'did'}: add every batch the same way")


def _flatten_batch(ref, q, labels, mask, prompt_ids):
    """[B, T, V] -> [B*T, V] with the mask applied; prompt ids per sequence broadcast."""
    shape = tuple(getattr(ref, "shape", ()))
    if len(shape) == 3:
        b, t, v = shape
        ref = ref.reshape(b * t, v)
        q = q.reshape(b * t, v)
        if labels is not None:
            labels = _to_numpy(labels)
            if labels.size != b * t:
                raise ValueError(f"labels has {labels.size} entries for a [{b}, {t}] batch")
            labels = labels.reshape(b * t)
        if prompt_ids is not None:
            prompt_ids = _to_numpy(prompt_ids)
            if prompt_ids.shape == (b,):
                prompt_ids = np.repeat(prompt_ids, t)
            prompt_ids = prompt_ids.reshape(b * t)
    elif prompt_ids is not None:
        prompt_ids = _to_numpy(prompt_ids).reshape(-1)
    if mask is not None:
        keep_np = _to_numpy(mask).astype(bool).reshape(-1)
        if keep_np.size != int(ref.shape[0]):
            raise ValueError(f"mask has {keep_np.size} entries for {int(ref.shape[0])} tokens")
        if not keep_np.all():  # no padding: no copy
            if type(ref).__module__.startswith("torch"):
                import torch

                # index_select with precomputed indices: torch's boolean indexing costs
                # ~50 µs on small CPU batches and synchronises on CUDA (it runs nonzero)
                idx = torch.from_numpy(np.flatnonzero(keep_np)).to(ref.device)
                ref, q = ref.index_select(0, idx), q.index_select(0, idx)
            else:
                ref, q = np.asarray(ref)[keep_np], np.asarray(q)[keep_np]
            if labels is not None:
                labels = _to_numpy(labels).reshape(-1)
                if labels.size != keep_np.size:
                    raise ValueError(f"labels has {labels.size} entries, mask {keep_np.size}")
                labels = labels[keep_np]
            if prompt_ids is not None:
                if prompt_ids.size != keep_np.size:
                    raise ValueError(f"prompt_ids has {prompt_ids.size} entries, mask {keep_np.size}")
                prompt_ids = prompt_ids[keep_np]
    if labels is not None:
        labels = _to_numpy(labels).reshape(-1)
    return ref, q, labels, prompt_ids


def _to_numpy(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
