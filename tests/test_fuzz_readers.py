"""Property-based fuzzing of every binary reader (llama.cpp files, .npy, safetensors, Arrow
IPC, Parquet), bounded to a few seconds: whatever the bytes, open_source either refuses
them with a one-line DumpError naming the file or opens a source whose every row reads and
goes through the core; it never raises anything else, never takes long, and never
allocates much more than the file holds (numpy's buffers are traced by tracemalloc).

Inputs are valid files with a few mutations (bit flips, overwritten integers, truncation,
insertion) and headers built field by field with extreme values. benchmarks/fuzz_atheris.py
runs the same check coverage-guided for hundreds of thousands of cases."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fidelity_kld as fk
from fidelity_kld.io import DumpError, open_source

FUZZ = settings(max_examples=120, deadline=2000, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_EXTRA_ALLOC = 16 << 20  # bytes allocated beyond the file's own size

INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 255, 256, 2**15, 2**16, 2**31 - 1, -(2**31), 2**32 - 1,
                    2**40, 2**53, 2**62, 2**63 - 1]


# ------------------------------------------------------------------------- seed files


def llama_seed() -> bytes:
    rng = np.random.default_rng(0)
    n_ctx, n_vocab, n_chunk = 8, 7, 2
    rows = rng.integers(0, 65536, size=(3 * n_chunk, 12)).astype("<u2")
    rows[:, :4] = np.frombuffer(struct.pack("<ff", 16 / 65535, -20.0), dtype="<u2")
    tokens = rng.integers(0, n_vocab, size=n_ctx * n_chunk).astype("<i4")
    return b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, n_chunk) + tokens.tobytes() + rows.tobytes()


def npy_seed() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).normal(size=(6, 5)).astype(np.float16))
    return buf.getvalue()


def safetensors_seed() -> bytes:
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    labels = np.arange(6, dtype=np.int64) % 5
    head = {"logits": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, x.nbytes]},
            "labels": {"dtype": "I64", "shape": [6], "data_offsets": [x.nbytes, x.nbytes + 48]},
            "__metadata__": {"format": "fidelity_kld.logits"}}
    blob = json.dumps(head).encode()
    return len(blob).to_bytes(8, "little") + blob + x.tobytes() + labels.tobytes()


def _table(fixed: bool):
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    values = pa.array(x.reshape(-1))
    logits = (pa.FixedSizeListArray.from_arrays(values, 5) if fixed
              else pa.ListArray.from_arrays(pa.array(np.arange(0, 31, 5, dtype=np.int32)), values))
    return pa.table({"logits": logits, "label": pa.array(np.arange(6) % 5),
                     "prompt_id": pa.array(np.arange(6) // 3)})


def arrow_seed(fixed: bool = True) -> bytes:
    sink = pa.BufferOutputStream()
    t = _table(fixed)
    with pa.ipc.new_file(sink, t.schema) as w:
        for batch in t.to_batches(max_chunksize=4):
            w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def parquet_seed() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(_table(False), sink, row_group_size=4, compression="snappy")
    return sink.getvalue().to_pybytes()


SEEDS = {"kld": llama_seed(), "npy": npy_seed(), "safetensors": safetensors_seed(),
         "arrow": arrow_seed(), "parquet": parquet_seed()}
ARROW_LIST_SEED = arrow_seed(fixed=False)


# ------------------------------------------------------------------------- the property


def check_reader(path, data: bytes, open_path=None) -> str:
    """Write `data` to `path`, then open_source(open_path or path) + read every row + the
    core; returns 'refused' or 'read'."""
    path.write_bytes(data)
    tracemalloc.start()
    try:
        outcome = _open_and_read(open_path or path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(data) * 4 + MAX_EXTRA_ALLOC, f"{peak} bytes allocated for a {len(data)}-byte file"
    return outcome


def _named(msg: str, path) -> bool:
    """One line naming the dump or one of its companions (x.labels.npy, x.npy.json), or for
    a directory of shards, the directory or one of its files."""
    if path.is_dir():
        return "\n" not in msg and (msg.startswith(f"{path}: ") or msg.startswith(f"{path}/"))
    stem = str(path)[: -len(path.suffix)] if path.suffix == ".npy" else str(path)
    return "\n" not in msg and (msg.startswith(f"{path}: ") or msg.startswith(stem + "."))


def _open_and_read(path) -> str:
    try:
        src = open_source(path)
    except DumpError as e:
        assert _named(str(e), path), str(e)
        return "refused"
    with src:
        assert src.n_tokens > 0 and src.vocab > 0
        if src.labels is not None:
            assert src.labels.shape == (src.n_tokens,) and src.labels.min() >= 0
            assert src.labels.max() < src.vocab
        step = max(1, src.n_tokens // 3)
        for start in range(0, src.n_tokens, step):
            stop = min(start + step, src.n_tokens)
            try:
                lg = src.read(start, stop)
            except DumpError as e:  # formats decoded lazily may find damage late
                assert _named(str(e), path), str(e)
                return "refused"
            assert lg.data.shape[0] == stop - start
            y = None if src.labels is None else src.labels[start:stop]
            # mutated llama.cpp rows are mostly corrupt: counted as invalid (the screen runs)
            st_ = fk.compare(lg, lg, y, llama_parity=src.dtype == "llama_u16", bad_rows="invalid")
            assert st_.n_tokens == stop - start
    return "read"


# ------------------------------------------------------------------------- strategies


@st.composite
def mutations(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "int32", "int64", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op in ("int32", "int64"):
            size = 4 if op == "int32" else 8
            value = draw(st.sampled_from(INTERESTING_INTS) | st.integers(-(2**63), 2**64 - 1))
            raw = (value % (1 << (8 * size))).to_bytes(size, "little")
            data[pos : pos + size] = raw
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


big_int = st.sampled_from(INTERESTING_INTS) | st.integers(-(2**64), 2**64)
int32 = st.sampled_from([v for v in INTERESTING_INTS if -(2**31) <= v < 2**31]) | st.integers(-(2**31), 2**31 - 1)


@st.composite
def llama_headers(draw) -> bytes:
    n_ctx, n_vocab, n_chunk = draw(int32), draw(int32), draw(int32)
    body = draw(st.binary(max_size=300))
    return b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, n_chunk) + body


@st.composite
def npy_headers(draw) -> bytes:
    shape = tuple(draw(st.lists(st.integers(0, 2**63 - 1) | st.sampled_from([0, 1, 5, 6]), max_size=3)))
    descr = draw(st.sampled_from(["<f4", "<f2", "<u2", ">f4", "<f8", "<i8", "|u1", "<c8", "|O", "V8"]))
    header = {"descr": descr, "fortran_order": draw(st.booleans()), "shape": shape}
    text = repr(header).encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    version = draw(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x00"]))
    length = (len(text).to_bytes(2, "little") if version == b"\x01\x00"
              else len(text).to_bytes(4, "little"))
    return b"\x93NUMPY" + version + length + text + draw(st.binary(max_size=300))


@st.composite
def safetensors_headers(draw) -> bytes:
    def tensor():
        return st.fixed_dictionaries({
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "I32", "U16", "F64", "X9"]),
            "shape": st.lists(big_int | st.integers(0, 8), max_size=3),
            "data_offsets": st.lists(big_int | st.integers(0, 300), min_size=0, max_size=3),
        })
    head = draw(st.dictionaries(st.sampled_from(["logits", "labels", "token_ids", "prompt_ids", "x"]),
                                tensor(), max_size=3))
    if draw(st.booleans()):
        head["__metadata__"] = draw(st.sampled_from([{}, {"a": "b"}, None, [], 3]))
    blob = json.dumps(head).encode()
    claimed = draw(st.sampled_from([len(blob)]) | big_int.filter(lambda v: v >= 0))
    return (claimed % 2**64).to_bytes(8, "little") + blob + draw(st.binary(max_size=300))


# ------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", list(SEEDS))
def test_seed_files_are_read(tmp_path, fmt):
    """The unmutated seeds open and read (else every mutation would be refused trivially)."""
    assert check_reader(tmp_path / f"seed.{fmt}", SEEDS[fmt]) == "read"


@pytest.mark.parametrize("fmt", list(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_files(tmp_path, fmt, data):
    blob = data.draw(mutations(SEEDS[fmt]))
    check_reader(tmp_path / f"fuzz.{fmt}", blob)


@FUZZ
@given(blob=llama_headers())
def test_llama_headers(tmp_path, blob):
    check_reader(tmp_path / "h.kld", blob)


@FUZZ
@given(blob=npy_headers())
def test_npy_headers(tmp_path, blob):
    check_reader(tmp_path / "h.npy", blob)


@FUZZ
@given(blob=npy_headers())
def test_npy_labels_companion_headers(tmp_path, blob):
    """A .labels.npy next to a valid dump goes through np.load: its header is fuzzed too."""
    (tmp_path / "d.npy").write_bytes(SEEDS["npy"])
    check_reader(tmp_path / "d.labels.npy", blob, open_path=tmp_path / "d.npy")


@FUZZ
@given(blob=safetensors_headers())
def test_safetensors_headers(tmp_path, blob):
    check_reader(tmp_path / "h.safetensors", blob)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_arrow_list_column_mutations(tmp_path, data):
    """A plain list<float> column carries an offsets buffer the reader must not trust."""
    check_reader(tmp_path / "l.arrow", data.draw(mutations(ARROW_LIST_SEED)))


# ------------------------------------------------------------------------- companions, shards


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


LABELS_SEED = _npy(np.arange(6, dtype=np.int64) % 5)


@pytest.mark.parametrize("companion", ["labels", "prompt_ids"])
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_mutated_npy_companions(tmp_path, companion, data):
    (tmp_path / "d.npy").write_bytes(SEEDS["npy"])
    check_reader(tmp_path / f"d.{companion}.npy", data.draw(mutations(LABELS_SEED)),
                 open_path=tmp_path / "d.npy")


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_mutated_dtype_sidecars(tmp_path, data):
    (tmp_path / "d.npy").write_bytes(_npy(np.zeros((6, 5), np.uint16)))
    check_reader(tmp_path / "d.npy.json", data.draw(mutations(b'{"dtype": "bfloat16"}')),
                 open_path=tmp_path / "d.npy")


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_mutated_labels_files(tmp_path, data):
    """--labels files (.npy or text) through io.ids.read_ids_file: ids or a DumpError."""
    from fidelity_kld.io.ids import read_ids_file

    seed = data.draw(st.sampled_from([LABELS_SEED, b"0\n1\n2\n3\n4\n0\n"]))
    path = tmp_path / data.draw(st.sampled_from(["lab.npy", "lab.txt"]))
    path.write_bytes(data.draw(mutations(seed)))
    try:
        ids = read_ids_file(str(path), "labels")
    except DumpError as e:
        assert _named(str(e), path), str(e)
    else:
        assert ids.ndim == 1 and ids.dtype == np.int64


SHARD_NAMES = ["part_0.npy", "part_1.npy", "part_2.npy", "part_10.npy", "part_1.npy.tmp",
               "shard-00001-of-00002.npy", "shard-00002-of-00002.npy", "shard-00002-of-00003.npy",
               "part_0.labels.npy", "part_1.labels.npy", "part_0.npy.json", ".part_3.npy",
               "part_0.kld", "notes.txt"]


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_shard_directories(tmp_path, data):
    """A directory of shards, built here: names drawn from shard, companion, temporary,
    hidden and foreign names, contents valid or mutated."""
    import shutil

    root = tmp_path / "shards"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    files = data.draw(st.lists(st.sampled_from(SHARD_NAMES), min_size=1, max_size=5, unique=True))
    for name in files:
        if name.endswith(".labels.npy"):
            blob = LABELS_SEED[:]
        elif name.endswith(".json"):
            blob = b'{"dtype": "float32"}'
        elif name.endswith(".kld"):
            blob = SEEDS["kld"]
        else:
            blob = _npy(x[: data.draw(st.integers(1, 6))])
        if data.draw(st.booleans()):
            blob = data.draw(mutations(blob))
        (root / name).write_bytes(blob)
    tracemalloc.start()
    try:
        _open_and_read(root)
    finally:
        tracemalloc.stop()
