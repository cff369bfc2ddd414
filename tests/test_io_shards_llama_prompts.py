"""llama.cpp shards: chunk numbers (the prompt ids) continue across shards."""

import shutil
from pathlib import Path

import numpy as np

from fidelity_kld.io import open_source

DATA = Path(__file__).parent / "data"


def test_llama_shards_keep_chunks_distinct(tmp_path):
    for name in ("part-1.kld", "part-2.kld"):
        shutil.copy(DATA / "base.kld", tmp_path / name)
    single = open_source(str(DATA / "base.kld"))
    both = open_source(str(tmp_path))
    assert both.n_tokens == 2 * single.n_tokens
    np.testing.assert_array_equal(both.prompt_ids[: single.n_tokens], single.prompt_ids)
    np.testing.assert_array_equal(both.prompt_ids[single.n_tokens:], single.prompt_ids + 6)
    assert len(np.unique(both.prompt_ids)) == 12
