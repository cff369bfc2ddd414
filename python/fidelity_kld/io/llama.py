"""llama.cpp `--kl-divergence-base` files (layout: docs/formats.md).

    offset 0   char[8]  magic "_logits_"
           8   int32    n_ctx      12 int32 n_vocab      16 int32 n_chunk
          20   int32    tokens[n_chunk * n_ctx]
           .   uint16   rows[n_chunk * R][nv]   R = n_ctx - 1 - n_ctx//2,  nv = 2*((n_vocab+1)//2) + 4

Each row is 4 header words (float32 scale, float32 min_log_prob) then n_vocab uint16 codes
(and one padding word when n_vocab is odd). read() hands these rows to the compiled core
undecoded (dtype 'llama_u16'); decode_rows() is the numpy decode used by `convert`.
Row k of chunk c scores the token tokens[c*n_ctx + n_ctx//2 + 1 + k]: that is its label.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops import Logits
from ._util import file_size, read_prefix
from .base import DumpError, MappedSource

MAGIC = b"_logits_"
HEADER_BYTES = 20


def row_words(n_vocab: int) -> int:
    """uint16 words per stored row: 4 header words, the codes, padding to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def layout(n_ctx: int, n_vocab: int, n_chunk: int) -> dict:
    first = n_ctx // 2
    rows_per_chunk = n_ctx - 1 - first
    nv = row_words(n_vocab)
    tokens_end = HEADER_BYTES + 4 * n_ctx * n_chunk
    return {
        "first": first,
        "rows_per_chunk": rows_per_chunk,
        "row_words": nv,
        "row_bytes": 2 * nv,
        "tokens_offset": HEADER_BYTES,
        "rows_offset": tokens_end,
        "file_bytes": tokens_end + 2 * nv * rows_per_chunk * n_chunk,
    }


class LlamaSource(MappedSource):
    """A llama.cpp --kl-divergence-base file, memory-mapped.

    read() returns Logits(data=[rows, nv] uint16 view of the map, dtype='llama_u16',
    vocab=n_vocab). labels: each row's target token; prompt_ids: each row's chunk index.
    header: n_ctx, n_vocab, n_chunk, first, rows_per_chunk, row_words, row_bytes,
    tokens_offset, rows_offset, file_bytes. tokens: the stored token table (int32).
    """

    def __init__(self, path: str, *, dtype: str | None = None):
        if dtype not in (None, "llama_u16"):
            raise DumpError(f"{path}: a llama.cpp file holds 16-bit log-prob codes, not {dtype}")
        size = file_size(path)
        head = read_prefix(path, HEADER_BYTES)
        if len(head) >= len(MAGIC) and head[: len(MAGIC)] != MAGIC:
            raise DumpError(f"{path}: bad magic {head[:8]!r} (expected {MAGIC!r}): not a llama.cpp --kl-divergence-base file")
        if len(head) < HEADER_BYTES:
            if head[: len(MAGIC)] != MAGIC[: len(head)]:
                raise DumpError(f"{path}: bad magic {head!r} (expected {MAGIC!r})")
            raise DumpError(f"{path}: truncated in the header ({size} of {HEADER_BYTES} bytes)")
        n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, dtype="<i4", count=3, offset=8))
        fields = f"n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk}"
        if n_ctx <= 0 or n_vocab <= 0 or n_chunk <= 0:
            raise DumpError(f"{path}: header sizes must be positive ({fields})")
        lay = layout(n_ctx, n_vocab, n_chunk)
        if lay["rows_per_chunk"] <= 0:
            raise DumpError(f"{path}: n_ctx={n_ctx} leaves no scored rows per chunk")
        # Python integers: no overflow, and nothing is allocated before these checks pass.
        if size < lay["rows_offset"]:
            raise DumpError(
                f"{path}: truncated in the token table: header ({fields}) puts "
                f"{n_ctx * n_chunk} tokens in bytes {HEADER_BYTES}..{lay['rows_offset']}, file has {size} bytes"
            )
        n_rows = lay["rows_per_chunk"] * n_chunk
        if size < lay["file_bytes"]:
            whole = (size - lay["rows_offset"]) // lay["row_bytes"]
            where = "the last row" if whole == n_rows - 1 else f"row {whole} of {n_rows}"
            raise DumpError(
                f"{path}: truncated in the log-prob rows at {where}: header ({fields}) needs "
                f"{lay['file_bytes']} bytes, file has {size}"
            )
        if size > lay["file_bytes"]:
            raise DumpError(
                f"{path}: {size - lay['file_bytes']} extra bytes after the last row: header "
                f"({fields}) implies {lay['file_bytes']} bytes, file has {size}"
            )
        tokens = np.fromfile(path, dtype="<i4", count=n_ctx * n_chunk, offset=HEADER_BYTES)
        if tokens.shape[0] != n_ctx * n_chunk:  # the file changed under us
            raise DumpError(f"{path}: short read in the token table")
        bad = np.flatnonzero((tokens < 0) | (tokens >= n_vocab))
        if bad.size:
            i = int(bad[0])
            raise DumpError(f"{path}: token table entry {i} is {int(tokens[i])}, outside [0, {n_vocab})")
        first, r = lay["first"], lay["rows_per_chunk"]
        labels = tokens.reshape(n_chunk, n_ctx)[:, first + 1 : first + 1 + r].reshape(-1).astype(np.int64)
        prompt_ids = np.repeat(np.arange(n_chunk, dtype=np.int64), r)
        super().__init__(
            path=path, format="llama", n_tokens=n_rows, vocab=n_vocab, dtype="llama_u16",
            labels=labels, prompt_ids=prompt_ids,
            header={"n_ctx": n_ctx, "n_vocab": n_vocab, "n_chunk": n_chunk, **lay},
        )
        self.tokens = tokens
        self._data = np.memmap(path, dtype="<u2", mode="r", offset=lay["rows_offset"],
                               shape=(n_rows, lay["row_words"]))

    @property
    def bytes_per_token(self) -> int:
        return int(self.header["row_bytes"])



def decode_rows(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Decode stored rows to log-probabilities, docs/formats.md's reader arithmetic in float32:
    log p[i] = scale * u[i] + min_log_prob. rows: [n, nv] uint16; returns [n, n_vocab] float32.
    For `convert` and tests; compare() hands the raw rows to the core."""
    rows = np.asarray(rows, dtype=np.uint16)
    if rows.ndim != 2 or rows.shape[1] < 4 + n_vocab:
        raise ValueError(f"llama rows must be [n, >= {4 + n_vocab}] uint16, got {rows.shape}")
    head = np.ascontiguousarray(rows[:, :4]).view("<f4")  # [n, 2]: scale, min_log_prob
    scale, min_log_prob = head[:, 0:1], head[:, 1:2]
    return rows[:, 4 : 4 + n_vocab].astype(np.float32) * scale + min_log_prob


# ----------------------------------------------------------------------------- corrupt rows
#
# A row llama.cpp wrote has scale = (M - m)/65535 in [0, 16/65535] (0 when every logit is
# equal), min_log_prob = m - M - L <= 0, and decodes to log-probabilities whose log-sum-exp
# is 0 up to the code rounding (|error| <= scale/2 = 1.2e-4 nats) plus the mass of the tokens
# clamped to the window's floor (each decodes to at most e^-16 more than it had): so
# |lse| <= log(1 + V e^-16) + 1.2e-4. LSE_MARGIN leaves 8x headroom over the rounding term
# (the fixtures tests/data/base.kld and Q4_K_M.kld, V = 8000, peak at 7.2e-4 against a
# tolerance of 1.9e-3). A zeroed row decodes to log p = 0 for every token: lse = ln V.

LSE_MARGIN = 1e-3
# The widest window a row can span: 16 nats, plus float32 rounding of M - (M - 16) for logits
# up to 2^24; twice 16/65535 is a scale no llama.cpp run writes.
MAX_SCALE = 32.0 / 65535
BAD_ROW_MODES = ("refuse", "invalid")


def lse_tolerance(n_vocab: int) -> float:
    """How far from 0 the log-sum-exp of a decoded row written by llama.cpp can be."""
    return math.log1p(n_vocab * math.exp(-16.0)) + LSE_MARGIN


def corrupt_row_mask(rows: np.ndarray, lse: np.ndarray, n_vocab: int) -> np.ndarray:
    """Rows no llama.cpp run writes: scale negative, above MAX_SCALE or not finite,
    min_log_prob positive or not finite, or a decoded distribution whose log-sum-exp (`lse`,
    as the core computed it) is further than lse_tolerance from 0. A NaN lse says nothing:
    the core gives one for every statistic of a token the other side made invalid.
    rows: [n, >= 4] uint16; returns [n] bool."""
    scale, min_log_prob = _row_header(rows)
    with np.errstate(invalid="ignore"):
        return (~((scale >= 0) & (scale <= MAX_SCALE)) | ~(min_log_prob <= 0)
                | ~np.isfinite(min_log_prob) | (np.abs(lse) > lse_tolerance(n_vocab)))


def _row_header(rows: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(scale, min_log_prob) of every row. Read a block of rows at a time and drop the block's
    pages afterwards (io.base.release): touching a mapped row maps its neighbours in too
    (fault-around), so a pass over the whole file would otherwise leave it resident."""
    from .base import release

    head = np.empty((rows.shape[0], 4), "<u2")
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        head[start : start + block] = part[:, :4]
        release(part)
    head = head.view("<f4")
    return head[:, 0], head[:, 1]


def _why(rows: np.ndarray, i: int, lse: float, n_vocab: int) -> str:
    scale, min_log_prob = (float(v[0]) for v in _row_header(rows[i : i + 1]))
    if not 0 <= scale <= MAX_SCALE:
        return f"scale {scale:g}, outside [0, 32/65535]"
    if not (math.isfinite(min_log_prob) and min_log_prob <= 0):
        return f"min_log_prob {min_log_prob:g} > 0" if min_log_prob > 0 else f"min_log_prob {min_log_prob:g}"
    return (f"its log-probabilities sum to exp({lse:.4g}), not 1 (tolerance "
            f"{lse_tolerance(n_vocab):.2g} nats)")


def _llama_files(src) -> list[tuple]:
    """(LlamaSource, first row, stop) of each llama.cpp file of a source, in token order:
    itself, the shards of a directory, or the rows of a file another source is a window on
    (row_window(): (the source under it, first row, stop), as distributed's ranges are); []
    if any part is not a llama.cpp file."""
    out = []
    for part in getattr(src, "shards", [src]):
        window = part.row_window() if hasattr(part, "row_window") else (part, 0, part.n_tokens)
        if not isinstance(window[0], LlamaSource):
            return []
        out.append(window)
    return out


def _row_blocks(x, name: str) -> list[tuple[str, np.ndarray, int, int]]:
    """(name, rows, n_vocab, number of rows[0] in its file) of each block of llama.cpp rows
    in x, in token order: one per file of a llama.cpp source (or directory of them, or
    window on one), one for llama_u16 Logits given to the API (called `name`; a GPU
    tensor's four header words are copied to the host, all the check reads); [] for
    anything else."""
    if isinstance(x, Logits):
        if x.dtype != "llama_u16":
            return []
        rows = x.data
        if type(rows).__module__.startswith("torch"):
            rows = rows[:, :4].contiguous().cpu().numpy().view(np.uint16)  # int16 on torch
        return [(name, rows, x.vocab, 0)]
    blocks = []
    for f, first, stop in _llama_files(x):
        if f._data is None:
            raise DumpError(f"{f.path}: source is closed")
        blocks.append((f.path, f._data[first:stop], f.vocab, first))
    return blocks


def screen_rows(x, lse: np.ndarray, name: str = "") -> np.ndarray | None:
    """[n_tokens] bool mask of corrupt rows of llama.cpp rows x (a source or llama_u16
    Logits, see _row_blocks), None when it has none or holds no llama.cpp rows. `lse`: the
    core's log-sum-exp of its rows."""
    blocks = _row_blocks(x, name)
    if not blocks:
        return None
    masks, start = [], 0
    for _, rows, n_vocab, _ in blocks:
        n = rows.shape[0]
        masks.append(corrupt_row_mask(rows, lse[start : start + n], n_vocab))
        start += n
    mask = np.concatenate(masks)
    return mask if mask.any() else None


def refuse_corrupt_rows(x, mask: np.ndarray, lse: np.ndarray, name: str = "",
                        instead: str | None = "--bad-rows invalid") -> None:
    """DumpError (a ValueError) naming the file (the shard), or `name` for Logits, and its
    first corrupt row; `instead`: the option that counts such rows as invalid (None: none)."""
    first, start = int(np.flatnonzero(mask)[0]), 0
    hint = f"; {instead} counts them as invalid tokens instead" if instead else ""
    for where, rows, n_vocab, row0 in _row_blocks(x, name):
        if first < start + rows.shape[0]:
            row = first - start
            raise DumpError(
                f"{where}: row {row0 + row} is corrupt ({_why(rows, row, float(lse[first]), n_vocab)}; "
                f"{int(mask.sum())} of {mask.size} rows are corrupt){hint}")
        start += rows.shape[0]


def check_rows(ref, quants, results: list, mode: str = "refuse", *,
               names: tuple[str, list[str]] | None = None,
               instead: str = "--bad-rows invalid") -> list:
    """Per-token results of llama.cpp rows (sources, or llama_u16 Logits given to the API
    under `names`: (the reference's, the models')), with corrupt rows (corrupt_row_mask)
    refused (mode 'refuse': DumpError naming the file and the first bad row) or counted as
    invalid tokens (mode 'invalid': a bad reference row invalidates that token for every
    model)."""
    if mode not in BAD_ROW_MODES:
        raise ValueError(f"bad-rows mode must be one of {BAD_ROW_MODES}, not {mode!r}")
    if not results:
        return results
    ref_name, q_names = names if names is not None else ("", [""] * len(quants))
    bad_ref = screen_rows(ref, results[0].lse_ref, ref_name)
    bad_q = [screen_rows(q, st.lse_q, nm) for q, st, nm in zip(quants, results, q_names)]
    if mode == "refuse":
        for src, mask, lse, nm in ((ref, bad_ref, results[0].lse_ref, ref_name),
                                   *((q, m, st.lse_q, nm) for q, m, st, nm
                                     in zip(quants, bad_q, results, q_names))):
            if mask is not None:
                refuse_corrupt_rows(src, mask, lse, nm, instead)
        return results
    out = []
    for st, mask in zip(results, bad_q):
        both = [m for m in (bad_ref, mask) if m is not None]
        out.append(st.invalidated(np.logical_or.reduce(both)) if both else st)
    return out
