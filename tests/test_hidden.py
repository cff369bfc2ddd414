"""Hidden-state dumps scored through the lm_head: the recomputed statistics equal the oracle
on float64 logits (synthetic), and the full-logit path on the fixture model (hidden states
captured from transformers, logits dumped in full); bounded memory on a dump whose logits
would exceed 4 GB; bad input refused with one line naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _reference_checks import CPU_TOL, check_stats
from fidelity_kld.cli import main
from fidelity_kld.hidden import compare_hidden, heads_for
from fidelity_kld.io.hidden import HiddenDump, write_hidden

FIXTURE = Path(os.environ.get("FIDELITY_KLD_TINY_LLAMA", "/work/shared/fixtures/tiny-llama"))


def run(capsys, *args):
    try:
        main([*map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _synthetic(tmp_path, rng, n=300, h=48, v=1271, softcap=None, scale=1.0):
    hid = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((v, h)) / np.sqrt(h) * 4).astype(np.float32)
    b = (rng.standard_normal(v) * 0.1).astype(np.float32)
    hq = (hid + rng.standard_normal((n, h)).astype(np.float32) * 0.05).astype(np.float32)
    wq = (np.round(w * 8) / 8).astype(np.float32)  # a coarsely quantized lm_head
    labels = rng.integers(0, v, n)
    kw = dict(labels=labels, prompt_ids=np.repeat(np.arange(3), n // 3), softcap=softcap,
              logit_scale=scale)
    ref = write_hidden(tmp_path / "ref.hidden.safetensors", hid, lm_head=w, lm_head_bias=b, **kw)
    q = write_hidden(tmp_path / "q.hidden.safetensors", hq, lm_head=wq, lm_head_bias=b, **kw)

    def logits64(x, ww):
        z = (x.astype(np.float64) @ ww.astype(np.float64).T + b) * scale
        return softcap * np.tanh(z / softcap) if softcap else z
    return ref, q, logits64(hid, w), logits64(hq, wq), logits64(hq, w), labels


@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (30.0, 0.5)])
def test_recomputed_statistics_match_the_oracle(tmp_path, softcap, scale):
    rng = np.random.default_rng(0)
    ref, q, a64, b64, b_shared64, labels = _synthetic(tmp_path, rng, softcap=softcap, scale=scale)
    rd, qd = HiddenDump(ref), HiddenDump(q)
    # a tile of 7 rows: many tiles, the last one partial
    got = compare_hidden(rd, [qd], heads_for(rd, [qd]), tile_bytes=7 * 2 * 1271 * 4)[0]
    check_stats(got, a64, b64, labels, **CPU_TOL)
    shared = compare_hidden(rd, [qd], heads_for(rd, [qd], shared_lm_head=True))[0]
    check_stats(shared, a64, b_shared64, labels, **CPU_TOL)


def test_cli_compare_and_info_over_hidden_dumps(tmp_path, capsys):
    rng = np.random.default_rng(1)
    ref, q, a64, b64, _, labels = _synthetic(tmp_path, rng)
    code, out, _ = run(capsys, "compare", ref, q, "--format", "json")
    assert code == 0
    from fidelity_kld import reference

    s = json.loads(out)["models"][0]["summary"]
    assert s["kld"]["mean"] == pytest.approx(reference.logit_stats(a64, b64)["kld"].mean(), rel=1e-4)
    code, out, _ = run(capsys, "info", ref, "--format", "json")
    d = json.loads(out)
    assert code == 0 and d["format"] == "hidden" and d["hidden_size"] == 48 and d["vocab"] == 1271


def test_hidden_size_mismatch_and_missing_lm_head_are_refused(tmp_path, capsys):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((50, 16)).astype(np.float32)
    ok = write_hidden(tmp_path / "ok.hidden.safetensors", rng.standard_normal((5, 16)).astype(np.float32),
                      lm_head=w)
    wrong = write_hidden(tmp_path / "wrong.hidden.safetensors",
                         rng.standard_normal((5, 12)).astype(np.float32), lm_head=w)
    nohead = write_hidden(tmp_path / "nohead.hidden.safetensors",
                          rng.standard_normal((5, 16)).astype(np.float32))
    out_json = tmp_path / "o.json"
    for bad, msg in ((wrong, "hidden size 12, but the lm_head"), (nohead, "no lm_head")):
        code, out, err = run(capsys, "compare", ok, bad, "-o", out_json)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and str(bad) in lines[0] and msg in lines[0]
        assert not out_json.exists()


@pytest.mark.skipif(not (FIXTURE / "model.safetensors").exists(), reason="needs the tiny-llama fixture")
def test_fixture_model_hidden_path_equals_full_logit_path(tmp_path):
    """tiny-llama and a 4-bit fake-quantized copy: full logits from transformers vs hidden
    states captured at the lm_head's input and recomputed here, every per-token output."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import copy

    from fidelity_kld import compare
    from fidelity_kld.capture import hf
    from fidelity_kld.capture.hf_hidden import write_hidden_dump
    from fidelity_kld.io.llama import LlamaSource

    src = LlamaSource(str(Path(__file__).parent / "data" / "base.kld"))
    chunks = src.tokens.reshape(-1, src.header["n_ctx"])[:2, :128].astype(np.int64)
    chunks[:, 0] = 1
    ref = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    quant = hf.fake_quantize_weights(copy.deepcopy(ref), 4)
    batches = list(hf.token_batches([c.tolist() for c in chunks], batch_size=2))
    rows = [hf.batch_rows(ref, quant, b) for b in batches]
    a = np.concatenate([r[0].numpy() for r in rows])
    b = np.concatenate([r[1].numpy() for r in rows])
    labels = np.concatenate([r[2] for r in rows])
    write_hidden_dump(ref, batches, tmp_path / "ref.h", lm_head_path=str(FIXTURE))
    write_hidden_dump(quant, batches, tmp_path / "q.h", store_lm_head=True)
    rd, qd = HiddenDump(tmp_path / "ref.h"), HiddenDump(tmp_path / "q.h")
    np.testing.assert_array_equal(rd.labels, labels)
    got = compare_hidden(rd, [qd], heads_for(rd, [qd]))[0]
    want = compare(a, b, labels)
    for key in ("top1_ref", "top1_q"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key))
    for key in ("kld", "kld_reverse"):
        g, w = getattr(got, key), getattr(want, key)
        assert np.all(np.abs(g - w) <= CPU_TOL["kld_atol"] + CPU_TOL["kld_rtol"] * np.abs(w)), key
    for key in ("lse_ref", "lse_q", "nll_ref", "nll_q", "entropy_ref"):
        np.testing.assert_allclose(getattr(got, key), getattr(want, key), rtol=1e-5, atol=1e-5, err_msg=key)


PEAK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from fidelity_kld.hidden import compare_hidden, heads_for
    from fidelity_kld.io.hidden import HiddenDump
    r, q = HiddenDump(sys.argv[1]), HiddenDump(sys.argv[2])
    st = compare_hidden(r, [q], heads_for(r, [q]), tile_bytes=int(sys.argv[3]))[0]
    assert st.n_tokens == r.n_tokens and np.isfinite(st.kld).all()
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print(int(hwm.split()[1]) * 1024)
""")


def peak_rss_of_hidden_compare(tmp_path, n, h, v, tile_bytes):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((v, h)) * 0.2).astype(np.float32)
    hid = rng.standard_normal((n, h)).astype(np.float32)
    write_hidden(tmp_path / "r.h", hid, lm_head=w)
    write_hidden(tmp_path / "q.h", hid + np.float32(0.01), lm_head=w)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "r.h"), str(tmp_path / "q.h"),
                          str(tile_bytes)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_peak_memory_is_bounded_by_the_tile_not_the_logits(tmp_path):
    """V = 152064, H = 64, 1800 tokens: the two models' logits would take 2.2 GB; with
    64 MB tiles the process peaks far below (the lm_heads take 78 MB). The same run with
    7000 tokens (4.3 GB of logits per dump) is in benchmarks/bench_hidden.py --peak."""
    n, h, v = 1800, 64, 152064
    full_logits = 2 * n * v * 4
    peak = peak_rss_of_hidden_compare(tmp_path, n, h, v, 64 << 20)
    assert peak < 400 << 20 < full_logits, (peak, full_logits)
