"""A multi-model per-prompt Parquet (what `compare --per-prompt` writes for several quants)
is filtered to each manifest entry's model."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fidelity_kld.stats.manifest import ManifestError, _read_per_prompt


def test_multi_model_file_is_filtered(tmp_path):
    p = tmp_path / "pp.parquet"
    pq.write_table(pa.table({"model": ["a", "a", "b", "b"], "prompt_id": [1, 2, 1, 2],
                             "kld_mean": [0.1, 0.2, 0.3, 0.4]}), p)
    ids, kld, _ = _read_per_prompt(p, "b")
    assert len(ids) == 2 and np.allclose(kld, [0.3, 0.4])
    with pytest.raises(ManifestError, match="no rows for model 'c'"):
        _read_per_prompt(p, "c")


def test_single_model_file_under_another_name_is_accepted(tmp_path):
    p = tmp_path / "pp.parquet"
    pq.write_table(pa.table({"model": ["q4"] * 2, "prompt_id": [1, 2], "kld_mean": [0.1, 0.2]}), p)
    ids, kld, _ = _read_per_prompt(p, "Q4_K_M")
    assert np.allclose(kld, [0.1, 0.2])
