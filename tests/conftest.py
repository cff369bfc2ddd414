"""Shared test fixtures. tests/data holds the llama.cpp fixtures copied from
shared/fixtures/llamacpp (tiny-llama, -c 256 --chunks 6, vocabulary 8000)."""

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def llama_base_path() -> Path:
    """llama.cpp --kl-divergence-base file of the float32 model (the reference)."""
    return DATA / "base.kld"


@pytest.fixture(scope="session")
def llama_q4_path() -> Path:
    """The same file written from the Q4_K_M quantization."""
    return DATA / "Q4_K_M.kld"
