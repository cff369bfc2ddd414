"""`fidelity-kld compare base.kld Q4_K_M.kld` reproduces what llama.cpp printed (issue 3's bar).

The fixtures were written by llama-perplexity itself (tests/data, copied from
shared/fixtures/llamacpp). llama.cpp compared the quant's float logits with the 16-bit base
file; we compare two 16-bit files, so small differences remain (README: llama.cpp compatibility).
"""

import json
import re
from pathlib import Path

import pytest

from fidelity_kld.cli import main

DATA = Path(__file__).parent / "data"


def parse_llama_stats(text: str) -> dict[str, float]:
    """The final statistics block of llama-perplexity --kl-divergence output."""
    out = {}
    num = r"(-?[0-9.]+)"
    patterns = {
        "ppl_q": rf"Mean PPL\(Q\)\s*:\s*{num}",
        "ppl_ref": rf"Mean PPL\(base\)\s*:\s*{num}",
        "ln_ppl_ratio": rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{num}",
        "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{num}",
        "kld_mean": rf"Mean\s+KLD:\s*{num}",
        "kld_max": rf"Maximum KLD:\s*{num}",
        "kld_99.9": rf"99\.9%\s+KLD:\s*{num}",
        "kld_99": rf"99\.0%\s+KLD:\s*{num}",
        "kld_median": rf"Median\s+KLD:\s*{num}",
        "kld_10": rf"10\.0%\s+KLD:\s*{num}",
        "kld_5": rf" 5\.0%\s+KLD:\s*{num}",
        "kld_1": rf" 1\.0%\s+KLD:\s*{num}",
        "kld_min": rf"Minimum KLD:\s*{num}",
        "rms_dp": rf"RMS Δp\s*:\s*{num}",
        "same_top": rf"Same top p:\s*{num}",
        "dp_mean": rf"Mean\s+Δp:\s*{num}",
    }
    for key, pat in patterns.items():
        m = re.search(pat, text)
        assert m, f"no {key} line in llama.cpp output"
        out[key] = float(m.group(1))
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "summary.json"
    rc = _run(["compare", str(DATA / "base.kld"), str(DATA / "Q4_K_M.kld"), "-o", str(out), "-q"])
    assert rc == 0
    doc = json.loads(out.read_text())
    return doc["models"][0]["summary"]


def _run(args):
    try:
        main(args)
    except SystemExit as e:
        return e.code or 0
    return 0


def close(got, want, rel, abs_):
    return abs(got - want) <= max(rel * abs(want), abs_)


def test_matches_llama_cpp_printed_statistics(ours):
    assert_matches_llama_printout(ours)


def assert_matches_llama_printout(s):
    """A compare summary of base.kld vs Q4_K_M.kld against what llama.cpp printed (issue 3's bar;
    tests/test_gpu.py holds the GPU path to it too)."""
    want = parse_llama_stats((DATA / "Q4_K_M.stats.txt").read_text())
    assert s["llama_compat"] is True and s["n_tokens"] == 762
    # mean KLD within 1% or 2e-6
    assert close(s["kld"]["mean"], want["kld_mean"], 0.01, 2e-6)
    # median and percentiles within 5% or 1e-5
    for key, got in (("kld_median", s["kld"]["median"]), ("kld_99.9", s["kld"]["percentiles"]["99.9"]),
                     ("kld_99", s["kld"]["percentiles"]["99"]), ("kld_10", s["kld"]["percentiles"]["10"]),
                     ("kld_5", s["kld"]["percentiles"]["5"]), ("kld_1", s["kld"]["percentiles"]["1"]),
                     ("kld_max", s["kld"]["max"]), ("kld_min", s["kld"]["min"])):
        assert close(got, want[key], 0.05, 1e-5), key
    # same-top within 0.1 percentage points
    assert abs(100 * s["same_top"] - want["same_top"]) <= 0.1
    # PPLs and their ratio within 1e-4 relative
    for key, got in (("ppl_q", s["ppl_q"]), ("ppl_ref", s["ppl_ref"]), ("ppl_ratio", s["ppl_ratio"])):
        assert close(got, want[key], 1e-4, 0), key
    # RMS Δp within 3%
    assert close(100 * s["rms_delta_p"], want["rms_dp"], 0.03, 0)


def test_base_against_itself(tmp_path):
    """Two identical files: the decoded distribution against itself is exactly 0 KLD and 100%
    same top. llama.cpp's own base-vs-base run is tiny but not 0 (its model logits against the
    16-bit file), and our answer must be at or below it."""
    out = tmp_path / "s.json"
    assert _run(["compare", str(DATA / "base.kld"), str(DATA / "base.kld"), "-o", str(out), "-q"]) == 0
    s = json.loads(out.read_text())["models"][0]["summary"]
    llama = parse_llama_stats((DATA / "base_vs_base.stats.txt").read_text())
    assert abs(s["kld"]["mean"]) < 1e-9 and abs(s["kld"]["max"]) < 1e-9
    assert s["same_top"] == 1.0 and abs(s["ppl_ratio"] - 1.0) < 1e-12
    # llama.cpp's per-token values spread over +-5e-5 around 0 from the 16-bit storage
    assert llama["kld_max"] > 1e-5 and llama["kld_min"] < -1e-5


def test_text_output_has_llama_lines_in_order(capsys):
    rc = _run(["compare", str(DATA / "base.kld"), str(DATA / "Q4_K_M.kld"), "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    order = ["Mean PPL(Q)", "Mean PPL(base)", "Cor(ln(PPL(Q)), ln(PPL(base)))",
             "Mean ln(PPL(Q)/PPL(base))", "Mean PPL(Q)/PPL(base)", "Mean PPL(Q)-PPL(base)",
             "Mean    KLD", "Maximum KLD", "99.9%   KLD", "99.0%   KLD", "95.0%   KLD",
             "Median  KLD", "10.0%   KLD", " 5.0%   KLD", " 1.0%   KLD", "Minimum KLD",
             "Mean    Δp", "Maximum Δp", "Median  Δp", "Minimum Δp", "RMS Δp", "Same top p"]
    positions = [text.index(line) for line in order]
    assert positions == sorted(positions)
    assert text.count("99.0%   KLD") == 1  # llama.cpp's duplicated line is not repeated
