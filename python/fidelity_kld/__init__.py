"""fidelity-kld: fast, correct fidelity metrics between a reference LLM and its quantizations.

    import fidelity_kld as fk
    stats = fk.compare(ref_logits, quant_logits, labels)   # per-token arrays (TokenStats)
    many = fk.compare_many(ref_logits, [q4, q5, q8])        # the reference's work done once
    summary = fk.summarize(stats)                           # llama.cpp-style statistics
    rich = fk.compare(ref_logits, quant_logits, labels, extra="all")
    fk.summarize_direction(rich)                            # did the changes hurt or help?
"""

from importlib.metadata import PackageNotFoundError, version

from ._core import has_cuda, simd_level
from .ops import Logits, TokenStats, compare, compare_many
from .stats.direction import summarize_direction
from .stats.summary import Accumulator, Summary, summarize

try:
    __version__ = version("fidelity-kld")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "Accumulator",
    "Logits",
    "Summary",
    "TokenStats",
    "compare",
    "compare_many",
    "has_cuda",
    "simd_level",
    "summarize",
    "summarize_direction",
    "__version__",
]
