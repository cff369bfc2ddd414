"""The llama.cpp --kl-divergence-base reader, checked against an independent parse written
here from docs/formats.md (struct + np.frombuffer), and against broken files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fidelity_kld.io import DumpError, open_source
from fidelity_kld.io.llama import LlamaSource, decode_rows

FIXTURE_SIZE = 12_204_260


def parse_independently(path):
    """docs/formats.md, written without the package."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack("<iii", raw[8:20])
    tokens = np.frombuffer(raw, dtype="<i4", count=n_ctx * n_chunk, offset=20)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    first = n_ctx // 2
    r = n_ctx - 1 - first
    rows = np.frombuffer(raw, dtype="<u2", offset=20 + 4 * n_ctx * n_chunk).reshape(n_chunk * r, nv)
    return n_ctx, n_vocab, n_chunk, tokens, rows


def decode_row_independently(row_words, n_vocab):
    scale, min_log_prob = struct.unpack("<ff", row_words[:4].tobytes())
    u = row_words[4 : 4 + n_vocab].astype(np.float32)
    return np.float32(scale) * u + np.float32(min_log_prob)


def encode_llama(logits, tokens, n_ctx):
    """Write a --kl-divergence-base file from float32 logits, per docs/formats.md's writer
    (logits: [n_chunk * R, V]). Used for small synthetic files with odd vocabularies."""
    n_rows, v = logits.shape
    first = n_ctx // 2
    r = n_ctx - 1 - first
    n_chunk = n_rows // r
    nv = 2 * ((v + 1) // 2) + 4
    out = bytearray(b"_logits_" + struct.pack("<iii", n_ctx, v, n_chunk))
    out += np.asarray(tokens, dtype="<i4").tobytes()
    for row in logits.astype(np.float32):
        big, m0 = row.max(), row.min()
        m = max(m0, big - np.float32(16))
        lse = np.float32(np.log(np.exp((row - big).astype(np.float64)).sum()))
        min_log_prob = np.float32(m - big - lse)
        scale = np.float32((big - m) / np.float32(65535))
        words = np.zeros(nv, dtype="<u2")
        words[:4] = np.frombuffer(struct.pack("<ff", scale, min_log_prob), dtype="<u2")
        if scale > 0:
            inv = np.float32(1) / scale
            words[4 : 4 + v] = np.where(row > m, np.rint((row - m) * inv), 0).astype(np.uint16)
        out += words.tobytes()
    return bytes(out)


@pytest.fixture
def small_llama(tmp_path):
    """n_ctx=8 (3 rows per chunk), odd vocabulary 7 (one padding word), 2 chunks."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(6, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=16)
    path = tmp_path / "small.kld"
    path.write_bytes(encode_llama(logits, tokens, 8))
    return path, logits, tokens


def test_fixture_header_and_size(llama_base_path):
    src = open_source(llama_base_path)
    assert isinstance(src, LlamaSource)
    assert (src.header["n_ctx"], src.header["n_vocab"], src.header["n_chunk"]) == (256, 8000, 6)
    assert src.header["file_bytes"] == FIXTURE_SIZE == llama_base_path.stat().st_size
    assert (src.n_tokens, src.vocab, src.dtype, src.format) == (762, 8000, "llama_u16", "llama")
    assert src.header["rows_per_chunk"] == 127 and src.header["row_words"] == 8004
    assert src.bytes_per_token == 16008


def test_fixture_labels_rows_and_decode(llama_base_path):
    n_ctx, n_vocab, n_chunk, tokens, rows = parse_independently(llama_base_path)
    src = open_source(llama_base_path)
    assert src.labels[0] == tokens[129]
    want_labels = np.concatenate([tokens[c * n_ctx + 129 : c * n_ctx + 256] for c in range(n_chunk)])
    np.testing.assert_array_equal(src.labels, want_labels)
    np.testing.assert_array_equal(src.prompt_ids, np.repeat(np.arange(6), 127))
    np.testing.assert_array_equal(src.tokens, tokens)

    lg = src.read(0, src.n_tokens)
    assert lg.dtype == "llama_u16" and lg.vocab == 8000
    assert lg.data.dtype == np.uint16 and lg.data.shape == (762, 8004)
    assert lg.data.flags.owndata  # read into memory, not a view of the map (stream.py)
    np.testing.assert_array_equal(lg.data, rows)
    np.testing.assert_array_equal(src.read(126, 129).data, rows[126:129])

    decoded = decode_rows(lg.data, n_vocab)
    for i in (0, 126, 127, 500, 761):
        np.testing.assert_array_equal(decoded[i], decode_row_independently(rows[i], n_vocab))
    # decoded rows are log-probabilities: they (nearly) normalise
    assert np.allclose(np.log(np.exp(decoded.astype(np.float64)).sum(1)), 0, atol=2e-3)


def test_quant_fixture_shares_tokens(llama_base_path, llama_q4_path):
    a, b = open_source(llama_base_path), open_source(llama_q4_path)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.read(0, 5).data, b.read(0, 5).data)


def test_small_odd_vocab_roundtrip(small_llama):
    path, logits, tokens = small_llama
    src = open_source(path)
    assert (src.n_tokens, src.vocab, src.header["row_words"]) == (6, 7, 12)
    # row k of chunk c targets tokens[c*8 + 4 + 1 + k]
    np.testing.assert_array_equal(src.labels, np.concatenate([tokens[5:8], tokens[13:16]]))
    np.testing.assert_array_equal(src.prompt_ids, [0, 0, 0, 1, 1, 1])
    got = decode_rows(src.read(0, 6).data, 7)
    want = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
    np.testing.assert_allclose(got, want, atol=2e-4)  # the 16-bit grid: scale/2 <= 1.3e-4


def test_read_range_checked(small_llama):
    src = open_source(small_llama[0])
    assert src.read(6, 6).data.shape == (0, 12)
    with pytest.raises(IndexError):
        src.read(0, 7)
    with pytest.raises(IndexError):
        src.read(4, 3)


def _one_line_error(path, match):
    with pytest.raises(DumpError) as e:
        open_source(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert match in msg, msg
    return msg


# small file: header 20, tokens 20..84, rows of 24 bytes at 84..228 (6 rows)
@pytest.mark.parametrize(
    "cut, match",
    [
        (0, "empty file"),
        (5, "truncated in the header"),
        (8, "truncated in the header"),
        (19, "truncated in the header"),
        (20, "truncated in the token table"),
        (50, "truncated in the token table"),
        (83, "truncated in the token table"),
        (84, "truncated in the log-prob rows at row 0 of 6"),
        (84 + 30, "truncated in the log-prob rows at row 1 of 6"),
        (228 - 24, "truncated in the log-prob rows at the last row"),
        (228 - 1, "truncated in the log-prob rows at the last row"),
    ],
)
def test_truncated_at_every_boundary(small_llama, cut, match):
    path = small_llama[0]
    raw = path.read_bytes()
    assert len(raw) == 228
    path.write_bytes(raw[:cut])
    _one_line_error(path, match)


def test_fixture_truncated_and_extended(llama_base_path, tmp_path):
    raw = llama_base_path.read_bytes()
    p = tmp_path / "cut.kld"
    p.write_bytes(raw[:-1])
    msg = _one_line_error(p, "truncated in the log-prob rows at the last row")
    assert "12204260" in msg and "12204259" in msg
    p.write_bytes(raw + b"\0\0")
    _one_line_error(p, "2 extra bytes after the last row")


def test_bad_magic(small_llama):
    path = small_llama[0]
    raw = bytearray(path.read_bytes())
    raw[:8] = b"_logitz_"
    path.write_bytes(bytes(raw))
    _one_line_error(path, "bad magic")


@pytest.mark.parametrize(
    "fields, match",
    [
        ((8, 7, 3), "truncated in the log-prob rows"),       # one chunk more than stored
        ((8, 7, 2**31 - 1), "truncated in the token table"),  # absurd: must not allocate
        ((8, 2**31 - 1, 2), "truncated in the log-prob rows"),
        ((2**31 - 1, 7, 2), "truncated in the token table"),
        ((8, 7, 1), "extra bytes"),                           # claims less than it holds
        ((8, 0, 2), "must be positive"),
        ((-8, 7, 2), "must be positive"),
        ((2, 7, 2), "no scored rows"),
    ],
)
def test_header_inconsistent_with_file(small_llama, fields, match):
    path = small_llama[0]
    raw = bytearray(path.read_bytes())
    raw[8:20] = struct.pack("<iii", *fields)
    path.write_bytes(bytes(raw))
    _one_line_error(path, match)


def test_token_out_of_vocabulary(small_llama):
    path = small_llama[0]
    raw = bytearray(path.read_bytes())
    raw[20 + 4 * 3 : 20 + 4 * 4] = struct.pack("<i", 7)
    path.write_bytes(bytes(raw))
    _one_line_error(path, "token table entry 3 is 7")


def test_dtype_argument_rejected(small_llama):
    with pytest.raises(DumpError, match="16-bit log-prob codes"):
        open_source(small_llama[0], dtype="float16")
