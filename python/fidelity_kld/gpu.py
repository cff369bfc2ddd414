"""Per-token statistics on a CUDA GPU: input normalisation and backend choice for the two GPU
backends, the CUDA extension (``_core.logit_stats_cuda``, in builds with FIDELITY_KLD_CUDA=ON)
and the Triton kernel (``fidelity_kld.kernels.logit_stats``). The arithmetic lives in those.

    stats = compare_gpu(ref_cuda, q_cuda, labels)          # numpy TokenStats, like ops.compare
    out = compare_gpu_tensors(ref_cuda, q_cuda, labels)    # {name: torch tensor} on the device

torch is imported here, lazily by callers (ops.compare(device=...), the CLI): the extension
itself never links it and takes raw device pointers plus a stream.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from .ops import _INT_OUTPUTS, EXTRA_GROUPS, Logits, TokenStats, extra_outputs

BACKENDS = ("auto", "cuda", "triton")
_FLOAT_OUTPUTS = ("kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref")
_LABEL_OUTPUTS = ("nll_ref", "nll_q", "p_ref_y", "p_q_y")


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("GPU statistics need torch: pip install 'fidelity-kld[gpu]'") from exc
    return torch


def triton_kernels():
    """The Triton kernel module (``fidelity_kld.kernels.logit_stats``).

    The wheel ships the top-level ``kernels/`` folder as ``fidelity_kld.kernels``; a source
    checkout whose editable install predates that folder gets it loaded from the tree.
    """
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("the Triton backend needs triton: pip install 'fidelity-kld[gpu]'")
    try:
        return importlib.import_module("fidelity_kld.kernels.logit_stats")
    except ModuleNotFoundError as exc:
        if exc.name not in ("fidelity_kld.kernels", "fidelity_kld.kernels.logit_stats"):
            raise
    name = "fidelity_kld.kernels.logit_stats"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[2] / "kernels" / "logit_stats.py"
    if not path.is_file():
        raise RuntimeError("fidelity_kld.kernels is missing from this installation")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def available_backends() -> list[str]:
    """GPU backends usable in this process ('cuda' needs a CUDA build of the extension)."""
    out = []
    if _core.has_cuda:
        out.append("cuda")
    if importlib.util.find_spec("triton") is not None:
        out.append("triton")
    return out


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        if _core.has_cuda:
            return "cuda"
        if importlib.util.find_spec("triton") is not None:
            return "triton"
        raise RuntimeError(
            "no GPU backend: this fidelity_kld._core was built without CUDA "
            "(-Ccmake.define.FIDELITY_KLD_CUDA=ON) and triton is not installed"
        )
    if backend == "cuda" and not _core.has_cuda:
        raise RuntimeError(
            "fidelity_kld._core was built without CUDA: rebuild with "
            "pip install -e . -Ccmake.define.FIDELITY_KLD_CUDA=ON, or use backend='triton'"
        )
    return backend


def _as_device_tensor(x: Any, dtype: str | None, device, name: str):
    """(tensor on `device`, logical dtype name). Keeps CUDA tensors in place; moves host data."""
    torch = _torch()
    if isinstance(x, Logits):
        dtype = dtype or x.dtype
        x = x.data
    if not isinstance(x, torch.Tensor):
        if type(x).__name__ == "PyCapsule":  # a raw DLPack capsule
            x = torch.utils.dlpack.from_dlpack(x)
        elif hasattr(x, "__cuda_array_interface__"):
            x = torch.as_tensor(x, device="cuda")
        elif not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
            x = torch.from_dlpack(x)
        else:
            arr = np.asarray(x)
            if arr.dtype == np.uint16:
                arr = arr.view(np.int16)  # bfloat16 or llama_u16 bit patterns
            x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.dim() == 1:
        x = x[None, :]
    if x.dim() != 2:
        raise ValueError(f"{name} must be [tokens, vocab], got shape {tuple(x.shape)}")
    if dtype == "llama_u16":
        if x.dtype not in (torch.int16, torch.uint16):
            raise ValueError(f"{name}: llama_u16 rows must be 16-bit integers, got {x.dtype}")
    elif dtype == "bfloat16" and x.dtype in (torch.int16, torch.uint16):
        x = x.view(torch.int16).view(torch.bfloat16)
    elif x.dtype in (torch.int16, torch.uint16):
        raise ValueError(f"{name} holds 16-bit integers: say dtype='bfloat16' or 'llama_u16'")
    elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        if x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name}: unsupported dtype {x.dtype}")
        x = x.float()
    logical = dtype if dtype == "llama_u16" else str(x.dtype).replace("torch.", "")
    if x.device != device:
        x = x.to(device)
    if not (x.shape[0] <= 1 or x.shape[1] == 1 or (x.stride(1) == 1 and x.stride(0) > 0)):
        x = x.contiguous()
    return x, logical


def _pick_device(ref, q, device):
    torch = _torch()
    if device is not None:
        dev = torch.device(device)
        return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev
    for x in (ref, q):
        data = x.data if isinstance(x, Logits) else x
        if isinstance(data, torch.Tensor) and data.device.type == "cuda":
            return data.device
    if _triton_interpreting():  # Triton's CPU interpreter (tests): stay on the host
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def allocate_outputs(n: int, device, has_labels: bool, llama_parity: bool,
                     out: dict | None = None, extra=()) -> dict:
    """The output tensors of n tokens on device, by name (float64, int32 for top1 and the
    ranks), taking any the caller supplies in ``out`` after checking them (both GPU backends
    use this). extra: optional output groups (ops.extra_outputs: unknown names, and "label"
    without labels, are a ValueError); a group with any tensor in ``out`` is asked for too and
    completed here, since the kernels compute (and write) whole groups."""
    torch = _torch()
    res = dict(out or {})
    groups = (extra,) if isinstance(extra, str) else tuple(extra)
    groups += tuple(g for g, names in EXTRA_GROUPS.items() if any(n in res for n in names))
    for name in extra_outputs(groups, has_labels):
        res.setdefault(name, torch.empty(
            n, dtype=torch.int32 if name in _INT_OUTPUTS else torch.float64, device=device))
    for name in _FLOAT_OUTPUTS:
        res.setdefault(name, torch.empty(n, dtype=torch.float64, device=device))
    for name in ("top1_ref", "top1_q"):
        res.setdefault(name, torch.empty(n, dtype=torch.int32, device=device))
    if has_labels:
        for name in _LABEL_OUTPUTS:
            res.setdefault(name, torch.empty(n, dtype=torch.float64, device=device))
    if llama_parity:
        res.setdefault("kld_llama", torch.empty(n, dtype=torch.float64, device=device))
    for name, t in res.items():
        want = torch.int32 if name in _INT_OUTPUTS else torch.float64
        if t.dtype != want or tuple(t.shape) != (n,) or t.device != device or not t.is_contiguous():
            raise ValueError(f"out[{name!r}] must be a contiguous {want} tensor of shape ({n},) on {device}")
    return res


def compare_gpu_tensors(
    ref: Any,
    q: Any,
    labels: Any = None,
    *,
    backend: str = "auto",
    llama_parity: bool = False,
    ref_dtype: str | None = None,
    q_dtype: str | None = None,
    vocab: int | None = None,
    device: Any = None,
    out: dict | None = None,
    vocab_splits: int = 0,
    extra=(),
) -> dict:
    """Per-token statistics of ``ref`` against ``q`` as torch tensors on the GPU.

    ref, q: [tokens, vocab] CUDA torch tensors (float32/float16/bfloat16), anything
    ``torch.from_dlpack`` or ``__cuda_array_interface__`` takes, Logits, or host arrays (copied
    to ``device``). llama.cpp rows: ``*_dtype='llama_u16'`` with ``vocab``. labels: optional
    [tokens] token ids; their range is checked, on the host for host labels, with one small
    device-to-host sync for CUDA tensors.
    Returns {name: tensor}: float64 kld (KL(P_ref || P_q), nats), kld_reverse, lse_ref, lse_q,
    entropy_ref; int32 top1_ref, top1_q (-1 for invalid tokens); with labels float64 nll_ref,
    nll_q, p_ref_y, p_q_y; with llama_parity float64 kld_llama; the optional outputs of the
    groups in ``extra`` (ops.compare's: "top2", "label" with labels, "tvd", "jsd", "all"; int32
    ranks). Work is queued on the current torch stream and not synchronised, except for the
    label check.
    vocab_splits: 0 = heuristic; 1 = one CTA/program per row; k > 1 = split each row k ways.
    """
    torch = _torch()
    which = _resolve_backend(backend)
    if vocab is None:  # Logits carry their vocabulary (needed for llama_u16 rows)
        vocab = next((x.vocab for x in (ref, q) if isinstance(x, Logits)), None)
    dev = _pick_device(ref, q, device)
    if dev.type != "cuda" and not (which == "triton" and _triton_interpreting()):
        raise ValueError(f"GPU statistics need CUDA tensors or device='cuda', got {dev}")
    a, a_dtype = _as_device_tensor(ref, ref_dtype, dev, "ref")
    b, b_dtype = _as_device_tensor(q, q_dtype, dev, "q")
    if llama_parity and a_dtype != "llama_u16":
        raise ValueError("llama_parity needs a llama_u16 reference")
    llama = "llama_u16" in (a_dtype, b_dtype)
    if llama and vocab is None:
        raise ValueError("llama_u16 rows need vocab=")
    v = int(vocab) if vocab is not None else int(a.shape[1])
    for name, x, dt in (("ref", a, a_dtype), ("q", b, b_dtype)):
        if dt == "llama_u16":
            if x.shape[1] < v + 4:
                raise ValueError(f"{name}: llama rows hold {x.shape[1]} words, need {v + 4} for vocab {v}")
        elif x.shape[1] != v:
            raise ValueError(f"vocabulary mismatch: {name} has {x.shape[1]} entries, expected {v}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"token count mismatch: ref has {a.shape[0]} tokens, q has {b.shape[0]}")
    n = int(a.shape[0])
    y = None
    if labels is not None:
        if isinstance(labels, torch.Tensor):
            y = labels.reshape(-1).to(device=dev, dtype=torch.int64).contiguous()
            bad = (y < 0) | (y >= v)
            found = y.shape[0] == n and n and bool(bad.any())  # one device-to-host sync
            bad_at = int(torch.nonzero(bad)[0, 0]) if found else None
            bad_label = int(y[bad_at]) if found else None
        else:  # host labels (files): checked on the host, so the stream never waits here
            host = np.asarray(labels).reshape(-1).astype(np.int64, copy=False)
            y = torch.from_numpy(np.ascontiguousarray(host))
            y = y.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else y.to(dev)
            bad = (host < 0) | (host >= v)
            bad_at = int(np.argmax(bad)) if host.shape[0] == n and bad.any() else None
            bad_label = int(host[bad_at]) if bad_at is not None else None
        if y.shape[0] != n:
            raise ValueError(f"labels has {y.shape[0]} entries for {n} tokens")
        if bad_at is not None:
            raise ValueError(f"label {bad_label} at token {bad_at} is outside the vocabulary [0, {v})")

    if which == "triton":
        return triton_kernels().logit_stats(
            a, b, y, vocab=v, ref_dtype=a_dtype, q_dtype=b_dtype, llama_parity=llama_parity,
            out=out, splits=vocab_splits or None, extra=extra)

    res = allocate_outputs(n, dev, y is not None, llama_parity, out, extra)
    if n == 0:
        return res
    ptr = {name: t.data_ptr() for name, t in res.items()}
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        _core.logit_stats_cuda(
            a.data_ptr(), a_dtype, a.stride(0) * a.element_size(),
            b.data_ptr(), b_dtype, b.stride(0) * b.element_size(), n, v,
            labels=y.data_ptr() if y is not None else 0, llama_parity=llama_parity,
            stream=stream, vocab_splits=int(vocab_splits), **ptr)
    return res


def compare_gpu(
    ref: Any,
    q: Any,
    labels: Any = None,
    *,
    backend: str = "auto",
    llama_parity: bool = False,
    ref_dtype: str | None = None,
    q_dtype: str | None = None,
    vocab: int | None = None,
    device: Any = None,
    vocab_splits: int = 0,
    extra=(),
) -> TokenStats:
    """Per-token statistics of ``ref`` (the reference) against ``q`` on a CUDA GPU.

    Same inputs as compare_gpu_tensors; returns a numpy TokenStats exactly like
    fidelity_kld.compare (KLD is KL(P_ref || P_q) in nats). backend: 'auto' (the CUDA extension
    when this build has it, else Triton), 'cuda' or 'triton'. extra: optional output groups,
    as in fidelity_kld.compare (the TokenStats fields of the other groups stay None).
    """
    out = compare_gpu_tensors(
        ref, q, labels, backend=backend, llama_parity=llama_parity, ref_dtype=ref_dtype,
        q_dtype=q_dtype, vocab=vocab, device=device, vocab_splits=vocab_splits, extra=extra)
    host = {name: t.cpu().numpy() for name, t in out.items()}
    y = None
    if labels is not None:
        y = np.ascontiguousarray(_host_labels(labels), dtype=np.int64)
    return TokenStats(labels=y, **host)


def _host_labels(labels):
    if type(labels).__module__.startswith("torch"):
        return labels.detach().reshape(-1).cpu().numpy()
    return np.asarray(labels).reshape(-1)


def _triton_interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class PinnedStager:
    """Host chunks (from files) to the GPU through pinned buffers, copies overlapped with
    compute: each call is cut into sub-chunks; sub-chunk i+1 is copied on a side stream
    while sub-chunk i is computed on the current stream. Two pinned slots per side are
    reused for the whole run (pageable copies run at about 6.5 GB/s on an H100 host,
    pinned ones near 54 GB/s).

    `compare` has ops.compare's call shape and `compare_many` ops.compare_many's, so
    stream.compare_sources can use them directly (the reference is staged once for all models).
    """

    def __init__(self, *, sub_chunk_bytes: int = 64 << 20, backend: str = "auto", device=None):
        torch = _torch()
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible to torch")
        self.torch = torch
        self.device = _pick_device(None, None, device)
        self.backend = backend
        self.sub_chunk_bytes = sub_chunk_bytes
        self.copy_stream = torch.cuda.Stream(self.device)
        self._pinned: dict[tuple[int, int], Any] = {}
        self._copied: dict[int, Any] = {}  # slot -> event: its pinned buffers may be refilled

    def _slot_buffer(self, slot: int, side: int, nbytes: int):
        buf = self._pinned.get((slot, side))
        if buf is None or buf.numel() < nbytes:
            buf = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)
            self._pinned[(slot, side)] = buf
        return buf[:nbytes]

    def _stage(self, lg: Logits, start: int, stop: int, slot: int, side: int):
        torch = self.torch
        rows = lg.data[start:stop]
        shape = (stop - start, *rows.shape[1:])
        nbytes = int(np.prod(shape)) * rows.dtype.itemsize
        pinned = self._slot_buffer(slot, side, nbytes)
        # One host copy, straight from the (memory-mapped) rows into pinned memory.
        np.copyto(pinned.numpy().view(rows.dtype).reshape(shape), rows)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dev.copy_(pinned, non_blocking=True)
        torch_dtype = torch.float32 if rows.dtype == np.float32 else (
            torch.float16 if rows.dtype == np.float16 else torch.int16)
        return dev.view(torch_dtype).view(shape)

    def compare(self, ref, q, labels=None, *, threads=None, llama_parity=False,
                extra=()) -> TokenStats:
        return self.compare_many(ref, [q], labels, threads=threads, llama_parity=llama_parity,
                                 extra=extra)[0]

    def compare_many(self, ref, qs, labels=None, *, threads=None, llama_parity=False,
                     extra=()) -> list[TokenStats]:
        """compare for several models: each sub-chunk of the reference is staged once, then
        compared with every model's (stream.compare_sources calls this for several models)."""
        torch = self.torch
        ref, *qs = (x if isinstance(x, Logits) else Logits(np.asarray(x), str(np.asarray(x).dtype),
                                                           np.asarray(x).shape[1]) for x in (ref, *qs))
        n = ref.n_tokens
        if n == 0 or not qs:  # nothing to stage: the CPU core's empty results, with its checks
            from .ops import compare

            return [compare(ref, q, labels, llama_parity=llama_parity, extra=extra) for q in qs]
        sides = (ref, *qs)
        row_bytes = sum(x.data[:1].nbytes for x in sides)
        sub = max(1, self.sub_chunk_bytes // max(row_bytes, 1))
        compute = torch.cuda.current_stream(self.device)
        parts: list[list[dict]] = [[] for _ in qs]
        staged = None
        starts = list(range(0, n, sub))
        for i, start in enumerate(starts + [None]):
            if start is not None:  # copy sub-chunk i while sub-chunk i-1 computes
                slot = i % 2
                if slot in self._copied:
                    self._copied[slot].synchronize()  # its pinned buffers are free again
                stop = min(start + sub, n)
                with torch.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_stream(compute)  # device memory allocated on compute
                    nxt = ([self._stage(x, start, stop, slot, side) for side, x in enumerate(sides)],
                           start, stop)
                    event = torch.cuda.Event()
                    event.record(self.copy_stream)
                    self._copied[slot] = event
            if staged is not None:
                tensors, s0, s1, ready = staged
                compute.wait_event(ready)
                for t in tensors:
                    t.record_stream(compute)
                y = None if labels is None else labels[s0:s1]
                for j, q in enumerate(qs):
                    parts[j].append(compare_gpu_tensors(
                        tensors[0], tensors[1 + j], y, backend=self.backend,
                        llama_parity=llama_parity, ref_dtype=ref.dtype, q_dtype=q.dtype,
                        vocab=ref.vocab, device=self.device, extra=extra))
            staged = None if start is None else (*nxt, event)
        compute.synchronize()
        y = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)
        return [TokenStats(labels=y, **{name: torch.cat([p[name] for p in model]).cpu().numpy()
                                        for name in model[0]})
                for model in parts]
