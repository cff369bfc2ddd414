"""Append logit rows, whose total is not known in advance, to a `.npy` or safetensors dump.

The files are the ones fidelity_kld.io reads (and `fidelity-kld compare` takes): a `.npy`
matrix with `<stem>.labels.npy` / `<stem>.prompt_ids.npy` companions and a
`<name>.npy.json` {"dtype": "bfloat16"} sidecar for bfloat16; or a safetensors file with
`logits`, `labels` and `prompt_ids` tensors. numpy and the safetensors library read them
too. For Arrow IPC or Parquet, write one of these and `fidelity-kld convert` it.

Rows go straight into the destination's temporary file (one pass, no second copy): the
header is written with room to spare and rewritten with the final row count on close.
Everything appears at the destination only when close() succeeds; abort(), or an exception
inside a `with` block, removes the temporary files.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from ..io._util import RAW_DTYPES, STORAGE, AtomicFiles
from ..io.base import DumpError
from ..io.conversion import cast_block
from ..io.npy import siblings
from ..io.safetensors import LOGICAL_TO_ST
from ..ops import as_logits

FORMATS = {".npy": "npy", ".safetensors": "safetensors"}
_U63 = 2**63 - 1  # the largest count a header can hold; sizes the space reserved for it


def logits_to_numpy(x, out_dtype: str) -> np.ndarray:
    """[tokens, vocab] logits (numpy, torch on any device, DLPack, Logits) as a numpy array
    in the storage of `out_dtype` (uint16 bit patterns for bfloat16)."""
    if type(x).__module__.startswith("torch"):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
    lg = as_logits(x)
    return np.ascontiguousarray(cast_block(lg, out_dtype), dtype=STORAGE[out_dtype])


def _ids(x, n: int, what: str) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x).reshape(-1)
    if a.size != n:
        raise ValueError(f"{what} has {a.size} entries for {n} rows")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got {a.dtype}")
    return a.astype(np.int64)


class DumpWriter:
    """Streams [tokens, vocab] logit rows (with optional labels and prompt ids) into `path`.

    path: ends in .npy or .safetensors (or say `format`). dtype: how the logits are stored,
    'float32' (default), 'float16' (finite values that overflow are refused) or 'bfloat16'
    (rounded to nearest even; exact for bfloat16 input). Labels: the token each row predicts.
    Either every write() gives labels (prompt ids) or none does.

        with DumpWriter("ref.safetensors") as w:
            for rows, labels, prompt_ids in ...:
                w.write(rows, labels, prompt_ids)
    """

    def __init__(self, path: str | os.PathLike, *, dtype: str = "float32", format: str | None = None):
        self.path = os.fspath(path)
        if dtype not in RAW_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(RAW_DTYPES)}, not {dtype!r}")
        if format is None:
            ext = os.path.splitext(self.path)[1].lower()
            if ext not in FORMATS:
                raise ValueError(f"{self.path}: cannot tell the format from {ext or '(no extension)'!r}; "
                                 "use .npy or .safetensors, or say format=")
            format = FORMATS[ext]
        if format not in FORMATS.values():
            raise ValueError(f"format must be 'npy' or 'safetensors', not {format!r}")
        if os.path.isdir(self.path):
            raise DumpError(f"{self.path}: is a directory; give an output file name")
        self.format, self.dtype = format, dtype
        self.vocab: int | None = None
        self.n_tokens = 0
        self._files = AtomicFiles()
        self._f = None
        self._header_len = 0
        self._labels: list[np.ndarray] | None = None
        self._prompt_ids: list[np.ndarray] | None = None
        self._closed = False

    # ------------------------------------------------------------------ writing
    def write(self, logits, labels=None, prompt_ids=None) -> None:
        """Append rows. logits: [tokens, vocab] or [vocab]; labels, prompt_ids: [tokens] ints."""
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        rows = logits_to_numpy(logits, self.dtype)
        n, v = rows.shape
        if self._f is None:
            if v == 0:
                raise ValueError("logits have an empty vocabulary")
            self.vocab = v
            self._labels = [] if labels is not None else None
            self._prompt_ids = [] if prompt_ids is not None else None
            self._open()
        if v != self.vocab:
            raise ValueError(f"{self.path}: rows have {v} logits, earlier rows had {self.vocab}")
        for what, given, store in (("labels", labels, self._labels), ("prompt_ids", prompt_ids, self._prompt_ids)):
            if (given is None) != (store is None):
                raise ValueError(f"{self.path}: {what} given for some writes and not others")
            if given is not None:
                store.append(_ids(given, n, what))
        self._f.write(rows.data)
        self.n_tokens += n

    def _open(self) -> None:
        tmp = self._files.new(self.path)  # registered first: moved into place last
        self._f = open(tmp, "wb")
        self._f.write(self._header(_U63))
        self._header_len = self._f.tell()

    def _header(self, n: int) -> bytes:
        """The bytes before the logit data, for n rows; the same length for every n."""
        if self.format == "npy":
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {
                "descr": np.lib.format.dtype_to_descr(STORAGE[self.dtype]),
                "fortran_order": False, "shape": (n, self.vocab)})
            return buf.getvalue()
        tensors, offset = {}, 0
        nbytes = n * self.vocab * STORAGE[self.dtype].itemsize
        tensors["logits"] = {"dtype": LOGICAL_TO_ST[self.dtype], "shape": [n, self.vocab],
                             "data_offsets": [0, nbytes]}
        offset = nbytes
        for name, parts in (("labels", self._labels), ("prompt_ids", self._prompt_ids)):
            if parts is not None:
                tensors[name] = {"dtype": "I64", "shape": [n], "data_offsets": [offset, offset + 8 * n]}
                offset += 8 * n
        tensors["__metadata__"] = {"format": "fidelity_kld.logits"}
        blob = json.dumps(tensors, separators=(",", ":")).encode("utf-8")
        if n == _U63:  # the reservation: room for the longest numbers, 8-byte aligned data
            blob += b" " * (-(len(blob) + 8) % 8)
        return len(blob).to_bytes(8, "little") + blob

    def _final_header(self) -> bytes:
        head = self._header(self.n_tokens)
        if self.format == "safetensors":  # pad the JSON with spaces to the reserved length
            blob = head[8:] + b" " * (self._header_len - len(head))
            head = len(blob).to_bytes(8, "little") + blob
        if len(head) != self._header_len:
            raise AssertionError(f"header is {len(head)} bytes, {self._header_len} were reserved")
        return head

    # ------------------------------------------------------------------ finishing
    def close(self) -> str:
        """Finish the files and move them into place; returns the path."""
        if self._closed:
            return self.path
        try:
            if self._f is None or self.n_tokens == 0:
                raise ValueError(f"{self.path}: no rows were written; a dump needs at least one")
            labels = None if self._labels is None else np.concatenate(self._labels)
            prompt_ids = None if self._prompt_ids is None else np.concatenate(self._prompt_ids)
            stale = []
            if self.format == "safetensors":
                for arr in (labels, prompt_ids):
                    if arr is not None:
                        self._f.write(np.ascontiguousarray(arr, dtype="<i8").data)
            else:
                sib = siblings(self.path)
                for key, arr in (("labels", labels), ("prompt_ids", prompt_ids)):
                    if arr is None:
                        stale.append(sib[key])
                    else:
                        with open(self._files.new(sib[key]), "wb") as f:
                            np.save(f, arr)
                if self.dtype == "bfloat16":
                    with open(self._files.new(sib["sidecar"]), "w", encoding="utf-8") as f:
                        json.dump({"dtype": "bfloat16"}, f)
                else:
                    stale.append(sib["sidecar"])
            self._f.seek(0)
            self._f.write(self._final_header())
            self._f.close()
            self._files.commit()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        for p in stale:  # companions of an older dump at this path would describe the wrong rows
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        return self.path

    def abort(self) -> None:
        """Remove everything written so far; the destination is left as it was."""
        if self._f is not None and not self._f.closed:
            self._f.close()
        self._files.abort()
        self._closed = True

    def __enter__(self) -> "DumpWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
