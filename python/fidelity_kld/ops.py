"""Per-token statistics of a reference against a quantized model: input normalisation and
backend choice. The arithmetic lives in the compiled core (fidelity_kld._core).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

from . import _core

LOGIT_DTYPES = ("float32", "float16", "bfloat16", "llama_u16", "float64")
# numpy storage of each logical dtype (bfloat16 and llama.cpp rows cross numpy as uint16)
_STORAGE_KIND = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": np.dtype(np.uint16), "llama_u16": np.dtype(np.uint16),
                 "float64": np.dtype(np.float64)}
MAX_THREADS = 2**31 - 1  # the core's int
# The optional outputs (issue 16; definitions in reference.py) by the group name that asks for
# them in compare(..., extra=...); "all" asks for every group ("label" only with labels).
EXTRA_GROUPS = {
    "top2": ("logp_top1_ref", "logp_top1_q", "logp_top2_ref", "logp_top2_q"),
    "label": ("rank_ref_y", "rank_q_y", "margin_ref", "margin_q"),
    "tvd": ("tvd",),
    "jsd": ("jsd",),
}
_INT_OUTPUTS = ("top1_ref", "top1_q", "rank_ref_y", "rank_q_y")

# what compare does with corrupt llama.cpp rows (io.llama.corrupt_row_mask): raise, count them
# as invalid tokens, or use them as they are (for callers that screen them per file: the CLI)
BAD_ROWS = ("refuse", "invalid", "keep")


@dataclass(frozen=True)
class Logits:
    """A logit matrix with its logical dtype, for storage numpy cannot name.

    data: [tokens, vocab] float32/float16/float64, or uint16 holding bfloat16 bit patterns, or
    for ``llama_u16`` the raw rows of a llama.cpp --kl-divergence-base file ([tokens, words]
    uint16: scale and min as two float32, then ``vocab`` codes, then padding). A numpy array,
    or on the GPU path a tensor; float64 is shifted per row and rounded to float32 by compare.
    """

    data: np.ndarray
    dtype: str
    vocab: int

    def __post_init__(self):
        if self.dtype not in LOGIT_DTYPES:
            raise ValueError(f"unknown logit dtype {self.dtype!r}; expected one of {LOGIT_DTYPES}")
        shape = getattr(self.data, "shape", None)
        if shape is None or not hasattr(self.data, "dtype"):
            raise ValueError(f"Logits data must be an array ([tokens, vocab]), not {type(self.data).__name__}")
        if len(shape) != 2:
            raise ValueError(f"Logits data must be 2-D [tokens, vocab], got shape {tuple(shape)}")
        width = 4 + self.vocab if self.dtype == "llama_u16" else self.vocab
        if (shape[1] < width) if self.dtype == "llama_u16" else (shape[1] != width):
            raise ValueError(f"Logits: {shape[1]} columns for {self.dtype} rows of vocabulary {self.vocab}")
        if isinstance(self.data, np.ndarray) and self.data.dtype.newbyteorder("=") != _STORAGE_KIND[self.dtype]:
            raise ValueError(f"Logits: {self.dtype} logits cannot be stored as {self.data.dtype}")

    @property
    def n_tokens(self) -> int:
        return int(self.data.shape[0])

    def rows(self, start: int, stop: int) -> "Logits":
        return Logits(self.data[start:stop], self.dtype, self.vocab)


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics, all in nats, each an array of length n_tokens.

    kld: KL(P_ref || P_q); kld_reverse: KL(P_q || P_ref); lse_*: log-sum-exp of the logits;
    entropy_ref: entropy of P_ref; top1_*: argmax (lowest index on ties, -1 when invalid);
    with labels: nll_* = lse - logit[label], p_*_y = exp(-nll). kld_llama: llama.cpp's
    windowed KLD (llama parity mode only). Invalid tokens (NaN/+inf input) hold NaN.
    Optional (compare's ``extra``; None when not asked for), as reference.py defines them:
    logp_top1_*/logp_top2_*: log-probs of the largest and second largest logit (a tie for the
    top gives top2 == top1); tvd: total variation distance; jsd: Jensen-Shannon divergence;
    rank_*_y: entries strictly above the label's logit (int32, -1 when invalid); margin_*: the
    label's logit minus the best other one (+inf when no other entry is finite).
    """

    kld: np.ndarray
    kld_reverse: np.ndarray
    lse_ref: np.ndarray
    lse_q: np.ndarray
    entropy_ref: np.ndarray
    top1_ref: np.ndarray
    top1_q: np.ndarray
    labels: np.ndarray | None = None
    nll_ref: np.ndarray | None = None
    nll_q: np.ndarray | None = None
    p_ref_y: np.ndarray | None = None
    p_q_y: np.ndarray | None = None
    kld_llama: np.ndarray | None = None
    logp_top1_ref: np.ndarray | None = None
    logp_top1_q: np.ndarray | None = None
    logp_top2_ref: np.ndarray | None = None
    logp_top2_q: np.ndarray | None = None
    tvd: np.ndarray | None = None
    jsd: np.ndarray | None = None
    rank_ref_y: np.ndarray | None = None
    rank_q_y: np.ndarray | None = None
    margin_ref: np.ndarray | None = None
    margin_q: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.kld.shape[0])

    @property
    def valid(self) -> np.ndarray:
        """Tokens whose inputs were usable (no NaN/+inf, at least one finite logit)."""
        return ~np.isnan(self.kld)

    @property
    def top1_agree(self) -> np.ndarray:
        return (self.top1_ref == self.top1_q) & (self.top1_ref >= 0)

    @property
    def delta_p(self) -> np.ndarray | None:
        """p_q(y) - p_ref(y), llama.cpp's Δp (None without labels)."""
        return None if self.p_q_y is None else self.p_q_y - self.p_ref_y

    def invalidated(self, rows: np.ndarray) -> "TokenStats":
        """A copy with the tokens in `rows` (a bool mask) marked invalid, as the core marks
        tokens it cannot use: NaN statistics, top-1 -1."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and f.name != "labels":
                v = v.copy()
                v[rows] = -1 if v.dtype.kind == "i" else np.nan
            out[f.name] = v
        return TokenStats(**out)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def concat(parts: list["TokenStats"]) -> "TokenStats":
        if not parts:
            raise ValueError("no TokenStats to concatenate")
        out = {}
        for f in fields(TokenStats):
            vals = [getattr(p, f.name) for p in parts]
            out[f.name] = None if any(v is None for v in vals) else np.concatenate(vals)
        return TokenStats(**out)


def _torch_to_logits(x: Any, dtype: str | None, name: str) -> Logits:
    import torch  # only reached when a torch tensor was passed

    if x.device.type != "cpu":
        raise ValueError(
            f"tensor is on {x.device}; use device='cuda' for GPU tensors or move it to the CPU"
        )
    x = x.detach()
    if x.dtype == torch.bfloat16:
        if dtype not in (None, "bfloat16"):
            raise ValueError(f"{name}: dtype={dtype!r} contradicts the tensor's dtype torch.bfloat16")
        arr = x.contiguous().view(torch.int16).numpy().view(np.uint16)
        return Logits(arr, "bfloat16", arr.shape[-1])
    if x.dtype not in (torch.float32, torch.float16, torch.float64):
        raise ValueError(f"{name}: unsupported logit dtype {x.dtype} (expected a floating-point tensor)")
    return as_logits(x.numpy(), dtype, name=name)


def as_logits(x: Any, dtype: str | None = None, *, name: str = "logits") -> Logits:
    """Normalise numpy arrays, torch tensors, DLPack objects and Logits to a Logits.

    Accepted: float32, float16, float64 (and longer floats, computed through float64), uint16
    declared ``dtype='bfloat16'``. Integers, bools, complex, objects and times are refused (a
    silent cast would turn 1e300 into inf or token ids into logits); a ``dtype`` that
    contradicts the array is refused."""
    if isinstance(x, Logits):
        if dtype is not None and dtype != x.dtype:
            raise ValueError(f"{name}: dtype={dtype!r} contradicts the Logits' dtype {x.dtype!r}")
        return x
    if type(x).__module__.startswith("torch"):
        return _torch_to_logits(x, dtype, name)
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
        x = np.from_dlpack(x)
    try:
        arr = np.asarray(x)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{name} must be a [tokens, vocab] array: {e}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [tokens, vocab], got shape {arr.shape}")
    if dtype == "llama_u16":
        raise ValueError(f"{name}: llama_u16 rows need their vocabulary: pass Logits(data, 'llama_u16', vocab)")
    if dtype is not None and dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name}: unknown dtype {dtype!r}; expected one of {LOGIT_DTYPES[:3]}")
    if dtype == "bfloat16":
        if arr.dtype != np.uint16:
            raise ValueError(f"{name}: bfloat16 logits must be given as uint16 bit patterns, got {arr.dtype}")
        return Logits(arr, dtype, arr.shape[1])
    if arr.dtype == np.uint16:
        raise ValueError(f"{name} is uint16: say dtype='bfloat16' if it holds bfloat16 bit patterns")
    if arr.dtype.kind != "f":
        raise ValueError(f"{name}: unsupported logit dtype {arr.dtype} (expected float32, float16, "
                         "float64, or uint16 bfloat16 bit patterns)")
    if arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    if dtype is not None and dtype != str(arr.dtype):
        raise ValueError(f"{name}: dtype={dtype!r} contradicts the array's dtype {arr.dtype}")
    return Logits(arr, str(arr.dtype), arr.shape[1])


def _shifted_float32(lg: Logits) -> tuple[Logits, np.ndarray | None]:
    """float64 logits as float32 for the core, each row shifted by its largest finite logit in
    float64 first, so that a large common offset (1e4, 1e300) costs no precision: the shifted
    logits near the top, which carry the probability, round with relative error 2^-24.
    Returns (float32 Logits, per-row shift to add back to the log-sum-exps) or (lg, None)."""
    if lg.dtype != "float64":
        return lg, None
    x = lg.data
    with np.errstate(invalid="ignore", over="ignore"):
        # A row whose maximum is NaN, +inf or -inf (all -inf) is invalid whatever the shift:
        # it is passed on unshifted and the core marks it so.
        top = np.max(x, axis=1, initial=-np.inf)
        shift = np.where(np.isfinite(top), top, 0.0)
        y = (x - shift[:, None]).astype(np.float32)
    return Logits(y, "float32", lg.vocab), shift


def _threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise ValueError(f"threads must be an integer, not {threads!r}")
    if not 0 <= int(threads) <= MAX_THREADS:
        raise ValueError(f"threads must be between 0 (all cores) and {MAX_THREADS}, got {int(threads)}")
    return int(threads)


def _require_gpu() -> None:
    """device='cuda' without a usable GPU: say so in one line, not torch's traceback."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # Triton's CPU interpreter
        return
    try:
        import torch
    except ImportError:
        raise ValueError("device='cuda' needs torch (with CUDA); use device='cpu'") from None
    if not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA GPU is available (torch.cuda.is_available() is "
                         "False); use device='cpu'")


def _contiguous_rows(lg: Logits) -> Logits:
    d = lg.data
    ok = d.shape[0] <= 1 or (d.strides[1] == d.itemsize and d.strides[0] > 0)
    if d.shape[1] == 1 and d.shape[0] > 1:
        ok = d.strides[0] > 0
    return lg if ok else Logits(np.ascontiguousarray(d), lg.dtype, lg.vocab)


def _on_cuda(x: Any) -> bool:
    """A CUDA torch tensor, a __cuda_array_interface__ object (CuPy, Numba), or Logits of one."""
    x = x.data if isinstance(x, Logits) else x
    if type(x).__module__.startswith("torch"):
        return bool(getattr(x, "is_cuda", False))
    return hasattr(x, "__cuda_array_interface__")


def default_threads() -> int:
    env = os.environ.get("FIDELITY_KLD_THREADS")
    if not env:
        return 0
    try:
        value = int(env)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_THREADS:
        raise ValueError(f"FIDELITY_KLD_THREADS={env!r}: expected a thread count (0 = all cores)")
    return value


def compare(
    ref: Any,
    q: Any,
    labels: Any = None,
    *,
    threads: int | None = None,
    ref_dtype: str | None = None,
    q_dtype: str | None = None,
    llama_parity: bool = False,
    simd: str = "auto",
    device: str = "auto",
    backend: str = "auto",
    extra: Sequence[str] | str = (),
    bad_rows: str = "refuse",
) -> TokenStats:
    """Per-token statistics of ``ref`` (the reference) against ``q`` (the quantized model).

    ref, q: [tokens, vocab] logits: numpy float32/float16 arrays, uint16 bfloat16 bit
    patterns with ``*_dtype='bfloat16'``, torch CPU tensors, DLPack objects, or Logits.
    labels: optional [tokens] token ids (the token each row predicts): adds nll, p(y).
    threads: worker threads (default: all cores). Results do not depend on it.
    device: 'cpu', 'cuda' (CUDA extension, else Triton; fidelity_kld.gpu), or 'auto': the
    GPU when the inputs are CUDA tensors already, else the CPU core. backend (GPU only):
    'auto' (the CUDA extension when built, else Triton), 'cuda' or 'triton'.
    extra: optional outputs by group (EXTRA_GROUPS): "top2", "label" (needs labels), "tvd",
    "jsd", or "all"; a group costs extra passes over each row only when asked for.
    bad_rows: llama.cpp rows (Logits 'llama_u16') no llama.cpp run writes (a negative, zero
    or non-finite scale, min_log_prob > 0, a decoded distribution that does not sum to 1:
    io.llama.corrupt_row_mask, the CLI's check) are 'refuse'd (ValueError naming the first),
    counted as 'invalid' tokens, or used as they are ('keep').
    Returns a TokenStats (see its docstring for definitions; KLD is KL(P_ref || P_q) in nats).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    _check_bad_rows(bad_rows)
    if device == "cuda" or (device == "auto" and (_on_cuda(ref) or _on_cuda(q))):
        _require_gpu()
        from .gpu import compare_gpu  # torch and triton are imported only on this path

        # extra only when asked for: a GPU entry without the parameter still serves the rest
        gpu_kw = {"extra": extra} if extra else {}
        st = compare_gpu(ref, q, labels, llama_parity=llama_parity, ref_dtype=ref_dtype,
                         q_dtype=q_dtype, backend=backend, **gpu_kw)
        return _screen_llama(ref, [q], [st], bad_rows, ["q"])[0]
    a = as_logits(ref, ref_dtype, name="ref")
    b = as_logits(q, q_dtype, name="q")
    _check_pair(a, b)
    y = _labels(labels, a.n_tokens)
    names = extra_outputs(extra, y is not None)
    n_threads = _threads(threads)
    (a, shift_a), (b, shift_b) = _shifted_float32(a), _shifted_float32(b)
    a, b = _contiguous_rows(a), _contiguous_rows(b)
    out = _new_outputs(a.n_tokens, y is not None, llama_parity)
    more = _new_extra(a.n_tokens, names)
    _core.logit_stats(
        a.data, a.dtype, b.data, b.dtype, a.vocab,
        labels=y, llama_parity=llama_parity, threads=n_threads, simd=simd,
        **out, extra=more,
    )
    out.update(more)  # log-probs, margins, tvd and jsd are shift-free: lse and logits move together
    _unshift(out, "lse_ref", shift_a)
    _unshift(out, "lse_q", shift_b)
    return _screen_llama(a, [b], [TokenStats(labels=y, **out)], bad_rows, ["q"])[0]


def compare_many(
    ref: Any,
    qs: Sequence[Any],
    labels: Any = None,
    *,
    threads: int | None = None,
    ref_dtype: str | None = None,
    q_dtype: str | None = None,
    llama_parity: bool = False,
    simd: str = "auto",
    extra: Sequence[str] | str = (),
    bad_rows: str = "refuse",
) -> list[TokenStats]:
    """``[compare(ref, q, labels, ...) for q in qs]`` on the CPU, with the reference's half of
    the work done once: models of the same dtype go through the core together, up to four at a
    time, reading each reference row once and computing its softmax terms once. Each model's
    TokenStats is bitwise what compare gives it alone. CUDA tensors go to compare's GPU path,
    one model at a time. bad_rows: as for compare (a corrupt reference row is refused, or
    invalidates its token for every model).
    """
    qs = list(qs)  # an iterator would be used up by the CUDA check below
    _check_bad_rows(bad_rows)
    if _on_cuda(ref) or any(_on_cuda(q) for q in qs):
        return [compare(ref, q, labels, threads=threads, ref_dtype=ref_dtype, q_dtype=q_dtype,
                        llama_parity=llama_parity, simd=simd, extra=extra,
                        bad_rows=bad_rows) for q in qs]
    a = as_logits(ref, ref_dtype, name="ref")
    bs = [as_logits(q, q_dtype, name=f"q[{j}]") for j, q in enumerate(qs)]
    for b in bs:
        _check_pair(a, b)
    y = _labels(labels, a.n_tokens)
    names = extra_outputs(extra, y is not None)
    n_threads = _threads(threads)
    a, shift_a = _shifted_float32(a)
    a = _contiguous_rows(a)
    shifted = [_shifted_float32(b) for b in bs]
    bs = [_contiguous_rows(b) for b, _ in shifted]
    outs = [{**_new_outputs(a.n_tokens, y is not None, llama_parity),
             **_new_extra(a.n_tokens, names)} for _ in bs]
    by_dtype: dict[str, list[int]] = {}
    for j, b in enumerate(bs):
        by_dtype.setdefault(b.dtype, []).append(j)
    for dtype, idx in by_dtype.items():
        _core.logit_stats_multi(
            a.data, a.dtype, [bs[j].data for j in idx], dtype, a.vocab,
            labels=y, llama_parity=llama_parity, threads=n_threads, simd=simd,
            outs=[outs[j] for j in idx],
        )
    for out, (_, shift_b) in zip(outs, shifted):
        _unshift(out, "lse_ref", shift_a)
        _unshift(out, "lse_q", shift_b)
    return _screen_llama(a, bs, [TokenStats(labels=y, **out) for out in outs], bad_rows,
                         [f"q[{j}]" for j in range(len(bs))])


def _check_bad_rows(bad_rows: str) -> None:
    if bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, not {bad_rows!r}")


def _screen_llama(ref: Any, qs: list, results: list[TokenStats], bad_rows: str,
                  q_names: list[str]) -> list[TokenStats]:
    """results with corrupt llama.cpp rows of ref / qs (llama_u16 Logits) refused or counted
    as invalid: the CLI's check (io.llama.check_rows), a row named by its argument ('ref',
    q_names) and its index."""
    if bad_rows == "keep" or not any(isinstance(x, Logits) and x.dtype == "llama_u16"
                                     for x in (ref, *qs)):
        return results
    from .io.llama import check_rows

    return check_rows(ref, qs, results, bad_rows, names=("ref", q_names),
                      instead="bad_rows='invalid'")


def _unshift(out: dict, name: str, shift: np.ndarray | None) -> None:
    """The log-sum-exp of the original float64 logits: that of the shifted ones plus the shift."""
    if shift is not None:
        out[name] += shift


def _check_pair(a: Logits, b: Logits) -> None:
    if a.vocab != b.vocab:
        raise ValueError(f"vocabulary mismatch: ref has {a.vocab} entries, q has {b.vocab}")
    if a.n_tokens != b.n_tokens:
        raise ValueError(f"token count mismatch: ref has {a.n_tokens} tokens, q has {b.n_tokens}")
    if a.vocab < 1:
        raise ValueError("empty vocabulary: ref and q have 0 logits per token")


def _labels(labels: Any, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.ndim > 1:
        raise ValueError(f"labels must be 1-D [tokens], got shape {lab.shape}")
    lab = lab.reshape(-1)
    if lab.size and lab.dtype.kind not in "iu":  # a cast would truncate 3.7 to 3 silently
        raise ValueError(f"labels must be integer token ids, got {lab.dtype}")
    y = np.ascontiguousarray(lab, dtype=np.int64)
    if y.shape[0] != n:
        raise ValueError(f"labels has {y.shape[0]} entries for {n} tokens")
    return y


def extra_outputs(extra: Sequence[str] | str, has_labels: bool) -> tuple[str, ...]:
    """The optional output names the groups in ``extra`` ask for (EXTRA_GROUPS; "all": every
    group, "label" only when there are labels). Unknown names, and "label" without labels,
    are a ValueError."""
    groups = (extra,) if isinstance(extra, str) else tuple(extra)
    names: list[str] = []
    for group in groups:
        if group == "all":
            wanted = [g for g in EXTRA_GROUPS if has_labels or g != "label"]
        elif group in EXTRA_GROUPS:
            if group == "label" and not has_labels:
                raise ValueError('extra output group "label" (label ranks and margins) needs labels')
            wanted = [group]
        else:
            raise ValueError(f"unknown extra output group {group!r}; expected one of "
                             f"{', '.join(map(repr, (*EXTRA_GROUPS, 'all')))}")
        names += [n for g in wanted for n in EXTRA_GROUPS[g] if n not in names]
    return tuple(names)


def _new_extra(n: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: np.empty(n, dtype=np.int32 if name in _INT_OUTPUTS else np.float64)
            for name in names}


def _new_outputs(n: int, has_labels: bool, llama_parity: bool) -> dict[str, np.ndarray | None]:
    out: dict[str, np.ndarray | None] = {
        name: np.empty(n, dtype=np.float64)
        for name in ("kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref")
    }
    out["top1_ref"] = np.empty(n, dtype=np.int32)
    out["top1_q"] = np.empty(n, dtype=np.int32)
    for name in ("nll_ref", "nll_q", "p_ref_y", "p_q_y"):
        out[name] = np.empty(n, dtype=np.float64) if has_labels else None
    out["kld_llama"] = np.empty(n, dtype=np.float64) if llama_parity else None
    return out
