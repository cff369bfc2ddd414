"""Directories and globs of shards read as one source, in file-name order."""

from __future__ import annotations

import numpy as np
import pytest

from fidelity_kld.io import ArraySource, DumpError, convert, open_source
from fidelity_kld.io.shards import ShardedSource

EXT = {"npy": ".npy", "safetensors": ".safetensors", "arrow": ".arrow", "parquet": ".parquet"}


def make_shards(directory, fmt, sizes=(5, 9, 4), vocab=11, names=("b", "a", "c"), labels=True):
    """Shards written under `names`; returns the matrix and labels in sorted-name order."""
    rng = np.random.default_rng(3)
    parts = {}
    for name, n in zip(names, sizes):
        x = rng.normal(size=(n, vocab)).astype(np.float32)
        y = rng.integers(0, vocab, size=n) if labels else None
        convert(ArraySource(x, labels=y, prompt_ids=np.full(n, ord(name[0]))), directory / f"{name}{EXT[fmt]}")
        parts[name] = (x, y)
    order = sorted(parts)
    x = np.concatenate([parts[k][0] for k in order])
    y = np.concatenate([parts[k][1] for k in order]) if labels else None
    return x, y


@pytest.mark.parametrize("fmt", list(EXT))
def test_directory_in_name_order(tmp_path, fmt):
    x, y = make_shards(tmp_path, fmt)
    src = open_source(tmp_path)
    assert isinstance(src, ShardedSource)
    assert (src.n_tokens, src.vocab, src.dtype, src.format) == (18, 11, "float32", fmt)
    assert [s.path.rsplit("/", 1)[1] for s in src.shards] == [f"{n}{EXT[fmt]}" for n in "abc"]
    np.testing.assert_array_equal(src.read(0, 18).data, x)
    np.testing.assert_array_equal(np.concatenate([lg.data for _, lg in src.chunks(4)]), x)
    np.testing.assert_array_equal(src.read(8, 15).data, x[8:15])  # spans all three shards
    np.testing.assert_array_equal(src.read(18, 18).data.shape, (0, 11))
    np.testing.assert_array_equal(src.labels, y)
    np.testing.assert_array_equal(src.prompt_ids, np.repeat([97, 98, 99], [9, 5, 4]))
    assert len(src.files()) >= 3


def test_glob(tmp_path):
    x, _ = make_shards(tmp_path, "safetensors")
    convert(ArraySource(np.zeros((2, 11), np.float32)), tmp_path / "other.npy")
    src = open_source(str(tmp_path / "*.safetensors"))
    assert src.n_tokens == 18
    np.testing.assert_array_equal(src.read(0, 18).data, x)


def test_llama_shards(tmp_path, llama_base_path):
    raw = llama_base_path.read_bytes()
    (tmp_path / "0.kld").write_bytes(raw)
    (tmp_path / "1.kld").write_bytes(raw)
    src = open_source(tmp_path)
    assert (src.n_tokens, src.dtype) == (1524, "llama_u16")
    one = open_source(llama_base_path)
    np.testing.assert_array_equal(src.read(760, 764).data, np.concatenate([one.read(760, 762).data, one.read(0, 2).data]))
    assert src.bytes_per_token == 16008


def _shard_error(tmp_path, match):
    with pytest.raises(DumpError) as e:
        open_source(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_shard_with_other_vocabulary(tmp_path):
    make_shards(tmp_path, "npy")
    convert(ArraySource(np.zeros((3, 12), np.float32), labels=np.zeros(3, int), prompt_ids=np.zeros(3, int)),
            tmp_path / "d.npy")
    msg = _shard_error(tmp_path, "shard has vocabulary 12, but")
    assert msg.startswith(str(tmp_path / "d.npy"))


def test_shard_with_other_dtype_format_or_labels(tmp_path):
    make_shards(tmp_path, "npy")
    convert(ArraySource(np.zeros((3, 11), np.float16), labels=np.zeros(3, int), prompt_ids=np.zeros(3, int)),
            tmp_path / "d.npy")
    assert _shard_error(tmp_path, "shard dtype is float16").startswith(str(tmp_path / "d.npy"))
    (tmp_path / "d.npy").unlink()
    for f in tmp_path.glob("d.*"):
        f.unlink()
    convert(ArraySource(np.zeros((3, 11), np.float32)), tmp_path / "d.npy")
    assert _shard_error(tmp_path, "shard has no labels").startswith(str(tmp_path / "d.npy"))
    for f in tmp_path.glob("d.*"):
        f.unlink()
    convert(ArraySource(np.zeros((3, 11), np.float32)), tmp_path / "d.parquet")
    assert _shard_error(tmp_path, "shard is parquet").startswith(str(tmp_path / "d.parquet"))


def test_corrupt_shard_named(tmp_path):
    make_shards(tmp_path, "arrow")
    (tmp_path / "zz.arrow").write_bytes(b"ARROW1\0\0junk")
    assert _shard_error(tmp_path, "unreadable").startswith(str(tmp_path / "zz.arrow"))


def test_hidden_temporary_files_ignored(tmp_path):
    x, _ = make_shards(tmp_path, "npy")
    (tmp_path / ".a.npy.123.tmp").write_bytes(b"partial")
    assert open_source(tmp_path).n_tokens == 18


def _numbered_shards(directory, names, vocab=11):
    for i, name in enumerate(names):
        convert(ArraySource(np.full((2, vocab), i, np.float32)), directory / name)


@pytest.mark.parametrize("stray", ["shard-00001-of-00003.npy.tmp", "README.txt", "notes"])
def test_file_that_is_not_a_shard_is_refused(tmp_path, stray):
    _numbered_shards(tmp_path, [f"shard-{i:05d}-of-00003.npy" for i in (1, 2, 3)])
    (tmp_path / stray).write_bytes((tmp_path / "shard-00001-of-00003.npy").read_bytes()[:100])
    msg = _shard_error(tmp_path, f"{stray} is not a logit dump like the other shards")
    assert msg.startswith(str(tmp_path))
    if stray.startswith("shard-"):
        with pytest.raises(DumpError, match="is not a logit dump"):
            open_source(str(tmp_path / "shard-*"))  # a glob that catches it likewise


@pytest.mark.parametrize("names, match", [
    (["shard-00001-of-00002.npy", "shard-1-of-2.npy", "shard-00002-of-00002.npy"],
     "shard 1 appears twice (shard-00001-of-00002.npy and shard-1-of-2.npy)"),
    (["shard-00001-of-00002.npy", "shard-00001-of-00002.safetensors", "shard-00002-of-00002.npy"],
     "shard 1 appears twice"),
    (["part1.npy", "part01.npy", "part2.npy"], "shard number 1 appears twice"),
    (["shard-00001-of-00002.npy", "shard-00002-of-00003.npy", "shard-00003-of-00003.npy"],
     "shard names disagree on the shard count (2, 3)"),
    (["shard-00001-of-00002.npy", "shard-00002-of-00002.npy", "shard-00003-of-00002.npy"],
     "shard 3 is outside 1..2"),
])
def test_repeated_or_inconsistent_shard_numbers_are_refused(tmp_path, names, match):
    _numbered_shards(tmp_path, names)
    _shard_error(tmp_path, match)


def test_consistent_numbered_shards_still_open(tmp_path):
    _numbered_shards(tmp_path, [f"shard-{i:05d}-of-00003.npy" for i in (1, 2, 3)])
    src = open_source(tmp_path)
    np.testing.assert_array_equal(src.read(0, 6).data[:, 0], [0, 0, 1, 1, 2, 2])


def test_stream_chunks_end_at_shard_boundaries(tmp_path):
    """The stream reads a directory of mapped shards one shard's view at a time: its chunks
    end at every shard boundary of either side (no chunk is assembled from two shards' pages),
    and the statistics are those of the same rows as one file."""
    from fidelity_kld import reference
    from fidelity_kld.stream import chunk_bounds, compare_sources

    (tmp_path / "ref").mkdir()
    (tmp_path / "q").mkdir()
    x, y = make_shards(tmp_path / "ref", "npy", sizes=(5, 9, 4), names=("a", "b", "c"))
    rng = np.random.default_rng(8)
    xq = (x + rng.normal(scale=0.3, size=x.shape)).astype(np.float32)
    for name, (a, b) in zip("ab", ((0, 11), (11, 18))):  # other boundaries: 11 and 18
        convert(ArraySource(xq[a:b], labels=y[a:b]), tmp_path / "q" / f"{name}.npy")
    ref, q = open_source(tmp_path / "ref"), open_source(tmp_path / "q")
    assert [ref.piece_end(r) for r in (0, 4, 5, 13, 14, 17)] == [5, 5, 14, 14, 18, 18]
    bounds = chunk_bounds((ref, q), rows=4)
    assert bounds == [(0, 4), (4, 5), (5, 9), (9, 11), (11, 14), (14, 18)]
    (st,) = compare_sources(ref, [q], chunk_bytes=4 * (ref.bytes_per_token + q.bytes_per_token))
    want = reference.logit_stats(x, xq, y)
    np.testing.assert_allclose(st.kld, want["kld"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.nll_q, want["nll_q"], rtol=1e-5, atol=1e-6)
