"""Hidden-state dumps: the final hidden states (after the model's last norm, i.e. the input of
its lm_head) per scored position, H numbers a token instead of V, scored by recomputing the
logits through the lm_head (fidelity_kld.hidden).

Layout: one safetensors file (parsed by io.safetensors.read_header, no dependency):

| tensor | dtype | shape | meaning |
|---|---|---|---|
| hidden_states | F32, F16 or BF16 | [N, H] | final hidden states, row j predicting token j+1 |
| labels | I64 | [N] | the token each row predicts (optional) |
| prompt_ids | I64 | [N] | each row's prompt (optional) |
| lm_head.weight | F32, F16 or BF16 | [V, H] | optional: the lm_head stored once with the dump |
| lm_head.bias | F32 | [V] | optional |

`__metadata__` holds "fidelity_kld.hidden" = JSON {"version": 1, "logit_scale": s,
"final_logit_softcapping": c or null, "lm_head": path or null, "lm_head_tensor": name}:
logits = softcap(s * (h @ W.T + b)) with softcap(x) = c * tanh(x / c) when c is set
(Gemma 2's final_logit_softcapping; Cohere's logit_scale). "lm_head" names the model's own
safetensors (a file, or a directory holding model.safetensors or a sharded index),
relative to the dump's directory unless absolute, used when the dump stores no weight;
lm_head_tensor is the weight's name there ("lm_head.weight"; "model.embed_tokens.weight"
for tied embeddings). Another engine can write the same layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ._util import bf16_to_f32
from .base import DumpError
from .safetensors import DTYPES, read_header

META_KEY = "fidelity_kld.hidden"
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
ST_OF = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}


@dataclass(frozen=True)
class LmHead:
    """weight [V, H] float32, bias [V] float32 or None, logit_scale, softcap (None: none)."""

    weight: np.ndarray
    bias: np.ndarray | None = None
    logit_scale: float = 1.0
    softcap: float | None = None
    source: str = ""

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.weight.shape[1])


def _tensor(path: str, tensors: dict, data_start: int, name: str) -> np.ndarray:
    t = tensors[name]
    if t["dtype"] not in DTYPES:
        raise DumpError(f"{path}: tensor {name!r} has unsupported dtype {t['dtype']}")
    begin, end = t["data_offsets"]
    if end == begin:
        return np.zeros(t["shape"], DTYPES[t["dtype"]])
    return np.memmap(path, dtype=DTYPES[t["dtype"]], mode="r", offset=data_start + begin,
                     shape=tuple(t["shape"]))


def _as_float32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    return bf16_to_f32(np.asarray(arr)) if st_dtype == "BF16" else np.asarray(arr, dtype=np.float32)


def is_hidden_file(path) -> bool:
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    from ._util import read_prefix
    from .safetensors import looks_like

    if not looks_like(read_prefix(path, 16)):
        return False
    try:
        tensors, meta, _, _ = read_header(path)
    except DumpError:
        return False
    return "hidden_states" in tensors or META_KEY in meta


class HiddenDump:
    """An open hidden-state dump: hidden [N, H] (memory-mapped, storage dtype), labels,
    prompt_ids, and the metadata; lm_head() loads the head it names or stores."""

    def __init__(self, path):
        self.path = path = os.fspath(path)
        tensors, meta, start, _ = read_header(path)
        if "hidden_states" not in tensors:
            raise DumpError(f"{path}: no hidden_states tensor: not a hidden-state dump")
        h = tensors["hidden_states"]
        if h["dtype"] not in FLOAT_TYPES or len(h["shape"]) != 2:
            raise DumpError(f"{path}: hidden_states must be a 2-D F32/F16/BF16 tensor, got "
                            f"{h['dtype']} {h['shape']}")
        self.st_dtype = h["dtype"]
        self.dtype = FLOAT_TYPES[h["dtype"]]
        self.hidden = _tensor(path, tensors, start, "hidden_states")
        self.n_tokens, self.hidden_size = (int(d) for d in h["shape"])
        try:
            self.meta = json.loads(meta.get(META_KEY, "{}"))
        except ValueError as e:
            raise DumpError(f"{path}: bad {META_KEY} metadata ({e})") from None
        self.labels = self._ids(tensors, start, "labels")
        self.prompt_ids = self._ids(tensors, start, "prompt_ids")
        self._tensors, self._start = tensors, start
        self.vocab = int(tensors["lm_head.weight"]["shape"][0]) if "lm_head.weight" in tensors else None

    def _ids(self, tensors, start, name):
        if name not in tensors:
            return None
        arr = np.asarray(_tensor(self.path, tensors, start, name)).reshape(-1).astype(np.int64)
        if arr.size != self.n_tokens:
            raise DumpError(f"{self.path}: {arr.size} {name} for {self.n_tokens} hidden-state rows")
        return arr

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 [n, H]."""
        return _as_float32(self.hidden[start:stop], self.st_dtype)

    def lm_head(self, override: str | None = None) -> LmHead:
        """The lm_head: `override` (a model file/directory), else the dump's own tensor,
        else the model its metadata names. DumpError naming the dump when none is found or
        its hidden size differs from the dump's."""
        scale = float(self.meta.get("logit_scale") or 1.0)
        cap = self.meta.get("final_logit_softcapping")
        name = self.meta.get("lm_head_tensor") or "lm_head.weight"
        if override is None and "lm_head.weight" in self._tensors:
            t = self._tensors
            w = _as_float32(_tensor(self.path, t, self._start, "lm_head.weight"), t["lm_head.weight"]["dtype"])
            b = (_as_float32(_tensor(self.path, t, self._start, "lm_head.bias"), t["lm_head.bias"]["dtype"])
                 if "lm_head.bias" in t else None)
            head = LmHead(np.ascontiguousarray(w), b, scale, cap, self.path)
        else:
            where = override or self.meta.get("lm_head")
            if not where:
                raise DumpError(f"{self.path}: no lm_head: the dump stores none and names no model "
                                "(give --lm-head MODEL)")
            if override is None and not os.path.isabs(where):
                where = os.path.join(os.path.dirname(os.path.abspath(self.path)), where)
            w, b = load_lm_head(where, name, dump=self.path)
            head = LmHead(w, b, scale, cap, where)
        if head.hidden != self.hidden_size:
            raise DumpError(f"{self.path}: hidden size {self.hidden_size}, but the lm_head "
                            f"({head.source}) has {head.hidden}")
        return head


def _model_files(where: str, dump: str) -> list[str]:
    if os.path.isfile(where):
        return [where]
    if os.path.isdir(where):
        single = os.path.join(where, "model.safetensors")
        if os.path.isfile(single):
            return [single]
        index = os.path.join(where, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(where, x) for x in files]
    raise DumpError(f"{dump}: lm_head source {where} is not a safetensors file or a model "
                    "directory with model.safetensors")


def load_lm_head(where: str, name: str = "lm_head.weight", *, dump: str = "") -> tuple:
    """(weight [V, H] float32, bias [V] float32 or None) from a model's safetensors. Falls
    back to the tied embedding (model.embed_tokens.weight) when lm_head.weight is absent."""
    for path in _model_files(where, dump or where):
        tensors, _, start, _ = read_header(path)
        for candidate in (name, "model.embed_tokens.weight") if name == "lm_head.weight" else (name,):
            if candidate in tensors:
                t = tensors[candidate]
                w = np.ascontiguousarray(_as_float32(_tensor(path, tensors, start, candidate), t["dtype"]))
                bias_name = candidate.rsplit(".", 1)[0] + ".bias"
                b = (_as_float32(_tensor(path, tensors, start, bias_name), tensors[bias_name]["dtype"])
                     if bias_name in tensors else None)
                return w, None if b is None else np.asarray(b, np.float32)
    raise DumpError(f"{dump or where}: no {name} tensor in {where}: missing lm_head")


def model_head_config(model_dir: str) -> dict:
    """logit_scale and final_logit_softcapping from a model directory's config.json."""
    cfg_path = os.path.join(model_dir, "config.json") if os.path.isdir(model_dir) else None
    if not cfg_path or not os.path.isfile(cfg_path):
        return {}
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    return {"logit_scale": cfg.get("logit_scale"),
            "final_logit_softcapping": cfg.get("final_logit_softcapping"),
            "lm_head_tensor": "model.embed_tokens.weight" if cfg.get("tie_word_embeddings") else "lm_head.weight"}


def write_hidden(path, hidden: np.ndarray, *, labels=None, prompt_ids=None, lm_head=None,
                 lm_head_bias=None, lm_head_path: str | None = None, logit_scale: float = 1.0,
                 softcap: float | None = None, lm_head_tensor: str = "lm_head.weight") -> str:
    """Write a hidden-state dump (the layout above); appears only when complete."""
    from .._atomic import atomic_output

    arrays = {"hidden_states": np.ascontiguousarray(hidden)}
    if labels is not None:
        arrays["labels"] = np.ascontiguousarray(labels, dtype=np.int64)
    if prompt_ids is not None:
        arrays["prompt_ids"] = np.ascontiguousarray(prompt_ids, dtype=np.int64)
    if lm_head is not None:
        arrays["lm_head.weight"] = np.ascontiguousarray(lm_head)
    if lm_head_bias is not None:
        arrays["lm_head.bias"] = np.ascontiguousarray(lm_head_bias, dtype=np.float32)
    header, offset = {}, 0
    for name, a in arrays.items():
        if a.dtype not in ST_OF:
            raise ValueError(f"{name}: cannot store dtype {a.dtype} (float32, float16, int64)")
        header[name] = {"dtype": ST_OF[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = {META_KEY: json.dumps({
        "version": 1, "logit_scale": logit_scale, "final_logit_softcapping": softcap,
        "lm_head": lm_head_path, "lm_head_tensor": lm_head_tensor})}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    path = os.fspath(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays.values():
            f.write(a.data)
    return path


def describe_hidden(path) -> dict:
    d = HiddenDump(path)
    return {
        "path": d.path, "format": "hidden",
        "format_name": "fidelity-kld hidden states (safetensors)",
        "tokens": d.n_tokens, "hidden_size": d.hidden_size, "dtype": d.dtype,
        "size_bytes": os.path.getsize(d.path),
        "labels": d.labels is not None, "prompt_ids": d.prompt_ids is not None,
        "lm_head": "stored in the dump" if d.vocab is not None else (d.meta.get("lm_head") or "none (give --lm-head)"),
        "vocab": d.vocab,
        "logit_scale": d.meta.get("logit_scale", 1.0),
        "final_logit_softcapping": d.meta.get("final_logit_softcapping"),
    }
