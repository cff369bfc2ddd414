"""DumpWriter: appending rows of unknown total to .npy / safetensors dumps that the
project's readers, numpy and the safetensors library all read back unchanged."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fidelity_kld.capture.dump import DumpWriter
from fidelity_kld.io import open_source
from fidelity_kld.io._util import bf16_to_f32, f32_to_bf16


def chunks(rng, sizes=(3, 1, 5), v=37):
    out = []
    for i, n in enumerate(sizes):
        x = (rng.standard_normal((n, v)) * 4).astype(np.float32)
        out.append((x, rng.integers(0, v, n), np.full(n, 10 + i)))
    return out


@pytest.mark.parametrize("ext", [".npy", ".safetensors"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_through_the_project_reader(tmp_path, ext, dtype):
    rng = np.random.default_rng(0)
    parts = chunks(rng)
    path = tmp_path / f"dump{ext}"
    with DumpWriter(path, dtype=dtype) as w:
        for x, y, p in parts:
            w.write(x, y, p)
    assert w.n_tokens == 9
    x = np.concatenate([c[0] for c in parts])
    want = {"float32": x, "float16": x.astype(np.float16),
            "bfloat16": f32_to_bf16(x)}[dtype]
    with open_source(str(path)) as src:
        assert (src.n_tokens, src.vocab, src.dtype) == (9, 37, dtype)
        np.testing.assert_array_equal(np.asarray(src.read(0, 9).data), want)
        np.testing.assert_array_equal(src.labels, np.concatenate([c[1] for c in parts]))
        np.testing.assert_array_equal(src.prompt_ids, np.repeat([10, 11, 12], [3, 1, 5]))
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_npy_reads_with_numpy_and_safetensors_with_its_library(tmp_path):
    rng = np.random.default_rng(1)
    parts = chunks(rng)
    x = np.concatenate([c[0] for c in parts])
    for ext in (".npy", ".safetensors"):
        with DumpWriter(tmp_path / f"d{ext}") as w:
            for c in parts:
                w.write(*c)
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), x)
    np.testing.assert_array_equal(np.load(tmp_path / "d.labels.npy"), np.concatenate([c[1] for c in parts]))
    st = pytest.importorskip("safetensors.numpy")
    got = st.load_file(str(tmp_path / "d.safetensors"))
    np.testing.assert_array_equal(got["logits"], x)
    np.testing.assert_array_equal(got["prompt_ids"], np.repeat([10, 11, 12], [3, 1, 5]))


def test_torch_bfloat16_rows_are_stored_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.randn(6, 19, generator=torch.Generator().manual_seed(0)).bfloat16()
    with DumpWriter(tmp_path / "b.safetensors", dtype="bfloat16") as w:
        w.write(x[:2])
        w.write(x[2:])
    with open_source(str(tmp_path / "b.safetensors")) as src:
        bits = np.asarray(src.read(0, 6).data)
    np.testing.assert_array_equal(bf16_to_f32(bits), x.float().numpy())
    assert src.labels is None and src.prompt_ids is None


def test_error_inside_with_leaves_nothing_and_keeps_an_older_file(tmp_path):
    path = tmp_path / "d.npy"
    with DumpWriter(path) as w:
        w.write(np.ones((2, 4), np.float32), [1, 2])
    before = np.load(path)
    with pytest.raises(RuntimeError):
        with DumpWriter(path) as w:
            w.write(np.zeros((3, 4), np.float32), [0, 0, 0])
            raise RuntimeError("model crashed")
    np.testing.assert_array_equal(np.load(path), before)
    assert sorted(os.listdir(tmp_path)) == ["d.labels.npy", "d.npy"]


def test_replacing_a_dump_without_labels_removes_the_stale_companion(tmp_path):
    path = tmp_path / "d.npy"
    with DumpWriter(path, dtype="bfloat16") as w:
        w.write(np.ones((2, 4), np.float32), [1, 2], [0, 0])
    assert os.path.exists(tmp_path / "d.npy.json")
    with DumpWriter(path) as w:
        w.write(np.ones((3, 4), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["d.npy"]
    with open_source(str(path)) as src:
        assert src.labels is None and src.dtype == "float32" and src.n_tokens == 3


def test_inconsistent_writes_are_refused(tmp_path):
    w = DumpWriter(tmp_path / "d.safetensors")
    w.write(np.ones((2, 4), np.float32), [1, 2])
    with pytest.raises(ValueError, match="labels given for some writes"):
        w.write(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="rows have 5 logits"):
        w.write(np.ones((2, 5), np.float32), [1, 2])
    with pytest.raises(ValueError, match="3 entries for 2 rows"):
        w.write(np.ones((2, 4), np.float32), [1, 2, 3])
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="no rows"):
        DumpWriter(tmp_path / "e.npy").close()
    with pytest.raises(ValueError, match="cannot tell the format"):
        DumpWriter(tmp_path / "e.bin")
    with pytest.raises(Exception, match="overflows float16"):
        with DumpWriter(tmp_path / "f.npy", dtype="float16") as w:
            w.write(np.full((1, 3), 1e6, np.float32))
    assert os.listdir(tmp_path) == []
