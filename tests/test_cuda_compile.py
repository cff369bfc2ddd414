"""The CUDA sources compile with nvcc and the Triton kernel compiles for sm_90 (so a broken
kernel cannot land unnoticed on a machine without a GPU), and the CUDA kernel's per-thread
arithmetic, run on the CPU, meets the float64 reference.

No GPU is needed: csrc/cuda/row_math.cuh holds the kernel's arithmetic as __host__ __device__
code. A small host driver (below) walks every simulated thread of a 256-thread CTA through the
kernel's own traversal (fold_thread_range: head, aligned steps, tail), merges the threads as the
block reduction does, merges vocabulary splits as the merge kernel does and finishes each row
with the kernel's float64 formulas. What only a GPU runs (16-byte loads, warp shuffles, shared
memory, the launch) is covered by tests/test_gpu.py. The nvcc tests skip when nvcc is not on
PATH; the Triton compile runs in a subprocess (without TRITON_INTERPRET, which another test
module sets) with Triton's own ptxas and skips when triton is missing.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fidelity_kld import reference

from _reference_checks import (  # noqa: E402
    GPU_TOL, check_stats, huge_logit_rows, llama_rows, make_pair, random_logprobs)

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

# sm_80 (A100) and sm_90 (H100/H200): what the CMake build ships; nvcc 12 and 13 accept both.
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
KLD_ATOL, KLD_RTOL = GPU_TOL["kld_atol"], GPU_TOL["kld_rtol"]


def check(got, ref64, q64, labels=None, *, llama_parity=False, q_logprobs=False):
    check_stats(got, ref64, q64, labels, llama_parity=llama_parity, q_logprobs=q_logprobs,
                **GPU_TOL)


F32, F16, BF16, LLAMA = 0, 1, 2, 3  # fk::DType codes
NAMES = ["float32", "float16", "bfloat16", "llama_u16"]


def nvcc(*args, cwd=None):
    proc = subprocess.run([NVCC, *args], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, f"nvcc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@needs_nvcc
def test_cuda_sources_compile(tmp_path):
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources, "no CUDA sources in csrc/cuda"
    for src in sources:
        proc = nvcc("-std=c++17", "-O3", "--threads", "2", *ARCH_FLAGS, "-I", str(ROOT / "csrc" / "include"),
                    "-Xcompiler", "-Wall,-Wno-unknown-pragmas", "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")))
        assert "warning" not in (proc.stderr + proc.stdout).lower(), proc.stderr
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


TRITON_COMPILE = r"""
import sys
sys.path.insert(0, sys.argv[1])
try:
    import triton
    from sass_report import compile_sm90, load_triton_kernels
except ImportError as exc:
    print("triton compile API unavailable:", exc); sys.exit(3)
ks = load_triton_kernels()

def build(kernel, dt_a, dt_b, consts, num_warps):
    try:
        return compile_sm90(kernel, dt_a, dt_b, consts, num_warps)
    except TypeError as exc:
        print("triton compile API changed:", exc); sys.exit(3)

# (ref, q, llama ref, llama q, parity, labels, split, block, warps, stages): the launcher's
# defaults for 16-bit and float32 logits, llama rows, the split variant and a tiny block.
CASES = [("*bf16", "*bf16", 0, 0, 0, 1, 0, 2048, 4, 2), ("*fp32", "*fp16", 0, 0, 0, 0, 1, 2048, 4, 2),
         ("*i16", "*fp32", 1, 0, 1, 1, 0, 4096, 16, 3), ("*i16", "*i16", 1, 1, 1, 1, 1, 16, 4, 1)]
# issue 16's optional outputs: (top2, rank, state) per case above, in order
EXTRA = [(0, 0, 0), (1, 0, 1), (1, 1, 0), (0, 1, 1)]
count = 0
for (dt_a, dt_b, la, lb, parity, labels, split, block, warps, stages), (top2, rank, state) in zip(CASES, EXTRA):
    base = dict(A_LLAMA=bool(la), B_LLAMA=bool(lb), PARITY=bool(parity), HAS_LABELS=bool(labels),
                SPLIT=bool(split), BLOCK_V=block, FUSED=True, NUM_STAGES=stages)
    for opt in ((False, False, False), (bool(top2), bool(rank and labels), bool(state))):
        consts = dict(base, TOP2=opt[0], RANK=opt[1], STATE=opt[2])
        build(ks._logit_stats_kernel, dt_a, dt_b, consts, warps)
        count += 1
for labels, opt in ((False, (False, False, False)), (True, (True, True, True))):
    consts = dict(A_LLAMA=False, B_LLAMA=False, PARITY=False, HAS_LABELS=labels, TOP2=opt[0],
                  RANK=opt[1], STATE=opt[2])
    build(ks._logit_stats_merge_kernel, "*bf16", "*bf16", consts, 1)
    count += 1
for dt_a, dt_b, la, lb, tvd, jsd, split, block, warps in (
        ("*bf16", "*bf16", 0, 0, 1, 1, 0, 2048, 4), ("*i16", "*fp32", 1, 0, 1, 0, 1, 16, 4)):
    consts = dict(A_LLAMA=bool(la), B_LLAMA=bool(lb), TVD=bool(tvd), JSD=bool(jsd), SPLIT=bool(split),
                  BLOCK_V=block, FUSED=True, NUM_STAGES=2, HW_LOG=True)
    build(ks._logit_stats_dist_kernel, dt_a, dt_b, consts, warps)
    count += 1
build(ks._logit_stats_dist_merge_kernel, "*bf16", "*bf16", dict(TVD=True, JSD=True), 1)
print("compiled", count + 1, "kernels with triton", triton.__version__)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_compiles_for_sm90(tmp_path):
    """The interpreter accepts code the compiler rejects (non-constexpr globals, type mismatches
    across branches): compile the real kernel for an H100 target, no GPU needed."""
    script = tmp_path / "compile_triton.py"
    script.write_text(TRITON_COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "benchmarks")],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled" in proc.stdout


DRIVER = r"""
// Host emulation of csrc/cuda/logit_stats.cu (written by tests/test_cuda_compile.py): every
// simulated thread of a CTA runs the kernel's own traversal (fold_thread_range), the threads
// merge as block_merge does, splits merge as the merge kernel does, rows finish in float64.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "row_math.cuh"

using namespace fk;
using namespace fk::cuda_detail;

struct Job {
  int ref_dtype, q_dtype, has_labels, parity, splits, extra, dist;
  int64_t n, vocab, ref_stride, q_stride, ref_offset, q_offset;
};

constexpr int kOut = 22;  // values per row written to the output file

static std::vector<uint8_t> read_file(const char* path, size_t* size) {
  FILE* f = std::fopen(path, "rb");
  if (!f) { std::perror(path); std::exit(2); }
  std::fseek(f, 0, SEEK_END);
  *size = static_cast<size_t>(std::ftell(f));
  std::fseek(f, 0, SEEK_SET);
  std::vector<uint8_t> buf(*size + 64);
  if (std::fread(buf.data(), 1, *size, f) != *size) { std::perror(path); std::exit(2); }
  std::fclose(f);
  return buf;
}

// A copy at a 64-byte aligned address, so that byte offsets give the alignments the test asks for.
static uint8_t* aligned_copy(const std::vector<uint8_t>& buf, size_t size) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, size + 64) != 0) std::exit(3);
  std::memcpy(p, buf.data(), size);
  return static_cast<uint8_t*>(p);
}

// The distance pass of one row: every split's CTA, its threads in order, then the splits.
template <DType DA, DType DB>
void distances(const Job& g, const uint8_t* a_vals, const uint8_t* b_vals, const Decode& da,
               const Decode& db, int splits, int64_t cols, const double* state, double& tvd,
               double& jsd) {
  constexpr int kUnroll = unroll_steps<DA, DB>();
  const DistRow row = read_dist_state(state);
  DistSums total{0.0, 0.0};
  for (int sp = 0; sp < splits; ++sp) {
    const int64_t begin = sp * cols;
    const int64_t end = begin + cols < g.vocab ? begin + cols : g.vocab;
    const Traversal t = plan_traversal<DA, DB>(a_vals, b_vals, begin, end);
    DistSums cta{0.0, 0.0};
    for (int tid = 0; tid < kThreads; ++tid) {
      DistSums d{0.0, 0.0};
      dist_thread_range<DA, DB, true, kUnroll>(d, row, tid, kThreads, a_vals, b_vals, da, db,
                                               begin, end, t);
      cta.tv += d.tv;
      cta.js += d.js;
    }
    total.tv += cta.tv;
    total.js += cta.js;
  }
  finish_dist(total, state, tvd, jsd);
}

template <DType DA, DType DB, bool kParity, bool kExtra>
void run(const Job& g, const uint8_t* ref, const uint8_t* q, const int64_t* labels, double* out) {
  constexpr int kUnroll = unroll_steps<DA, DB>();
  int64_t cols = g.vocab;
  const int splits = g.splits > 1 ? split_columns(g.vocab, g.splits, &cols) : 1;
  std::vector<State> threads(kThreads);
  for (int64_t r = 0; r < g.n; ++r) {
    const uint8_t* a_row = ref + g.ref_offset + r * g.ref_stride;
    const uint8_t* b_row = q + g.q_offset + r * g.q_stride;
    const Decode da = read_decode<DA>(a_row), db = read_decode<DB>(b_row);
    const uint8_t* a_vals = a_row + Storage<DA>::kHeader;
    const uint8_t* b_vals = b_row + Storage<DB>::kHeader;
    State m;
    init_state(m);
    float ya = INFINITY, yb = INFINITY;  // the rows kernel's label values (kExtra)
    if (kExtra && g.has_labels) {
      int64_t y = labels[r];
      y = y < 0 ? 0 : (y >= g.vocab ? g.vocab - 1 : y);
      ya = load_one<DA>(a_vals, y, da);
      yb = load_one<DB>(b_vals, y, db);
    }
    for (int sp = 0; sp < splits; ++sp) {
      const int64_t begin = sp * cols;
      const int64_t end = begin + cols < g.vocab ? begin + cols : g.vocab;
      const Traversal t = plan_traversal<DA, DB>(a_vals, b_vals, begin, end);
      for (int tid = 0; tid < kThreads; ++tid) {
        init_state(threads[tid]);
        threads[tid].ya = ya;
        threads[tid].yb = yb;
        fold_thread_range<DA, DB, kParity, kExtra, kUnroll>(threads[tid], tid, kThreads, a_vals,
                                                            b_vals, da, db, begin, end, t);
      }
      const State blk = merge_block_states(threads.data(), kThreads);
      if (splits == 1) {
        m = blk;
      } else {  // through the workspace encoding, as the merge kernel reads it
        double part[kPart];
        write_part(blk, part);
        merge_state(m, read_part(part));
      }
    }
    double ay = 0.0, by = 0.0;
    if (g.has_labels) {
      int64_t y = labels[r];
      y = y < 0 ? 0 : (y >= g.vocab ? g.vocab - 1 : y);
      ay = load_one<DA>(a_vals, y, da);
      by = load_one<DB>(b_vals, y, db);
    }
    const RowOut o =
        finish_stats(m, kParity, kParity && DB == DType::LLAMA_U16, g.has_labels != 0, ay, by);
    double state[kState], tvd = 0.0, jsd = 0.0;
    if (g.dist) {
      write_dist_state(m, state);
      distances<DA, DB>(g, a_vals, b_vals, da, db, splits, cols, state, tvd, jsd);
    }
    const double vals[kOut] = {o.kld, o.kld_reverse, o.lse_ref, o.lse_q, o.entropy_ref,
                               static_cast<double>(o.top1_ref), static_cast<double>(o.top1_q),
                               o.nll_ref, o.nll_q, o.p_ref_y, o.p_q_y, o.kld_llama,
                               o.logp_top1_ref, o.logp_top1_q, o.logp_top2_ref, o.logp_top2_q,
                               static_cast<double>(o.rank_ref), static_cast<double>(o.rank_q),
                               o.margin_ref, o.margin_q, tvd, jsd};
    std::memcpy(out + kOut * r, vals, sizeof(vals));
  }
}

template <DType DA, DType DB, bool kParity>
void run(const Job& g, const uint8_t* ref, const uint8_t* q, const int64_t* labels, double* out) {
  if (g.extra) return run<DA, DB, kParity, true>(g, ref, q, labels, out);
  run<DA, DB, kParity, false>(g, ref, q, labels, out);
}

int main(int argc, char** argv) {
  if (argc != 18) {
    std::fprintf(stderr, "usage: ref q labels out ref_dtype q_dtype n vocab ref_stride q_stride "
                         "ref_offset q_offset has_labels parity splits extra dist\n");
    return 1;
  }
  Job g;
  g.ref_dtype = std::atoi(argv[5]);
  g.q_dtype = std::atoi(argv[6]);
  g.n = std::atoll(argv[7]);
  g.vocab = std::atoll(argv[8]);
  g.ref_stride = std::atoll(argv[9]);
  g.q_stride = std::atoll(argv[10]);
  g.ref_offset = std::atoll(argv[11]);
  g.q_offset = std::atoll(argv[12]);
  g.has_labels = std::atoi(argv[13]);
  g.parity = std::atoi(argv[14]);
  g.splits = std::atoi(argv[15]);
  g.extra = std::atoi(argv[16]);
  g.dist = std::atoi(argv[17]);
  size_t na, nb, nl;
  const auto ra = read_file(argv[1], &na), rb = read_file(argv[2], &nb), rl = read_file(argv[3], &nl);
  const uint8_t* ref = aligned_copy(ra, na);
  const uint8_t* q = aligned_copy(rb, nb);
  std::vector<int64_t> labels(g.n + 1);
  std::memcpy(labels.data(), rl.data(), nl < labels.size() * 8 ? nl : labels.size() * 8);
  std::vector<double> out(kOut * g.n + 1);
  dispatch_dtype(static_cast<DType>(g.ref_dtype), [&](auto ta) {
    constexpr DType DA = decltype(ta)::value;
    dispatch_dtype(static_cast<DType>(g.q_dtype), [&](auto tb) {
      constexpr DType DB = decltype(tb)::value;
      if constexpr (DA == DType::LLAMA_U16) {
        if (g.parity) return run<DA, DB, true>(g, ref, q, labels.data(), out.data());
      }
      run<DA, DB, false>(g, ref, q, labels.data(), out.data());
    });
  });
  FILE* f = std::fopen(argv[4], "wb");
  std::fwrite(out.data(), sizeof(double), kOut * g.n, f);
  std::fclose(f);
  return 0;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    d = tmp_path_factory.mktemp("cuda_host_emulation")
    (d / "driver.cu").write_text(DRIVER)
    nvcc("-std=c++17", "-O2", "-I", str(ROOT / "csrc" / "include"), "-I", str(CUDA_DIR),
         "driver.cu", "-o", "driver", cwd=d)
    return d


def _storage(x32: np.ndarray, dtype: int):
    """(uint8 row bytes, float64 values the kernel sees) for float32 logits."""
    if dtype == F32:
        return x32.view(np.uint8), x32.astype(np.float64)
    if dtype == F16:
        h = x32.astype(np.float16)
        return h.view(np.uint8), h.astype(np.float64)
    u = reference.float32_to_bf16(x32)
    return u.view(np.uint8), reference.bf16_to_float32(u).astype(np.float64)


def llama_bytes(logprobs, scale=2.0**-10, offset=-60.0):
    raw, decoded = llama_rows(logprobs, scale, offset)
    return raw.view(np.uint8), decoded


def emulate(driver, a_bytes, a_dtype, b_bytes, b_dtype, vocab, labels=None, *, parity=False,
            splits=1, pad_a=0, pad_b=0, offset_a=0, offset_b=0, extra=False):
    """Run the host emulation on rows given as uint8 [n, row_bytes]; rows are laid out with
    `pad` extra bytes each (the stride) after `offset` leading bytes (the alignment). extra:
    also issue 16's optional outputs (the kExtra rows kernel and the distance pass), by the
    names of fidelity_kld.ops.EXTRA_GROUPS (the label group with labels)."""
    n = a_bytes.shape[0]
    files = {}
    for name, rows, pad, off in (("ref", a_bytes, pad_a, offset_a), ("q", b_bytes, pad_b, offset_b)):
        stride = rows.shape[1] + pad
        buf = np.zeros(off + n * stride + 64, dtype=np.uint8)
        for r in range(n):
            buf[off + r * stride: off + r * stride + rows.shape[1]] = rows[r]
        path = driver / f"{name}.bin"
        buf.tofile(path)
        files[name] = (path, stride)
    lab = np.zeros(n, np.int64) if labels is None else np.asarray(labels, np.int64)
    lab.tofile(driver / "labels.bin")
    out = driver / "out.bin"
    cmd = [str(driver / "driver"), str(files["ref"][0]), str(files["q"][0]), str(driver / "labels.bin"),
           str(out), str(a_dtype), str(b_dtype), str(n), str(vocab), str(files["ref"][1]),
           str(files["q"][1]), str(offset_a), str(offset_b), str(int(labels is not None)),
           str(int(parity)), str(splits), str(int(extra)), str(int(extra))]
    subprocess.run(cmd, check=True)
    vals = np.fromfile(out, dtype=np.float64).reshape(n, 22)
    keys = ["kld", "kld_reverse", "lse_ref", "lse_q", "entropy_ref", "top1_ref", "top1_q",
            "nll_ref", "nll_q", "p_ref_y", "p_q_y", "kld_llama", "logp_top1_ref", "logp_top1_q",
            "logp_top2_ref", "logp_top2_q", "rank_ref_y", "rank_q_y", "margin_ref", "margin_q",
            "tvd", "jsd"]
    got = {k: vals[:, i] for i, k in enumerate(keys)}
    got["top1_ref"] = got["top1_ref"].astype(np.int64)
    got["top1_q"] = got["top1_q"].astype(np.int64)
    for key in keys[12:]:
        if not extra or (labels is None and key.startswith(("rank", "margin"))):
            del got[key]
        elif key.startswith("rank"):
            got[key] = got[key].astype(np.int32)
    return got






@pytest.mark.parametrize("a_dtype,b_dtype", [(F32, F32), (F16, F16), (BF16, BF16), (F32, BF16), (F16, F32)])
@pytest.mark.parametrize("n,v,splits", [(2, 1, 1), (5, 7, 1), (4, 1271, 1), (3, 4099, 3), (2, 30011, 1), (2, 30011, 5)])
def test_emulated_kernel_matches_reference(driver, a_dtype, b_dtype, n, v, splits):
    rng = np.random.default_rng([a_dtype, b_dtype, n, v, splits])
    a32, b32 = make_pair(rng, n, v, scale=float(rng.choice([2.0, 5.0, 10.0])))
    a, a64 = _storage(a32, a_dtype)
    b, b64 = _storage(b32, b_dtype)
    labels = rng.integers(0, v, n)
    got = emulate(driver, a, a_dtype, b, b_dtype, v, labels, splits=splits)
    check(got, a64, b64, labels)


@pytest.mark.parametrize("offset_a,offset_b,pad_a,pad_b", [(2, 2, 6, 6), (2, 6, 2, 10), (8, 0, 0, 8)])
def test_misaligned_rows(driver, offset_a, offset_b, pad_a, pad_b):
    """Rows at 2/4/8-byte alignments and strides that move each row's alignment: the head
    search, the narrower loads and the tails (host loads are plain copies)."""
    rng = np.random.default_rng(offset_a * 7 + offset_b)
    a32, b32 = make_pair(rng, 6, 2003)
    a, a64 = _storage(a32, BF16)
    b, b64 = _storage(b32, F16)
    got = emulate(driver, a, BF16, b, F16, 2003, pad_a=pad_a, pad_b=pad_b, offset_a=offset_a, offset_b=offset_b)
    check(got, a64, b64)


@pytest.mark.parametrize("splits", [1, 4])
def test_masked_invalid_and_tied_rows(driver, splits):
    rng = np.random.default_rng(9)
    n, v = 14, 5000
    a = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    b = (a + 0.2 * rng.standard_normal((n, v))).astype(np.float32)
    a[0, 100:3000] = -np.inf  # masked on the reference: finite KLD, infinite reverse
    b[1, 500:4000] = -np.inf  # q has no mass where p does: KLD = +inf
    a[2, ::2] = -np.inf
    b[2, ::2] = -np.inf
    a[3, 5] = np.nan
    b[4, 7] = np.inf
    a[5, :] = -np.inf
    a[6, :] = 1.0  # constant: every thread ties, argmax 0
    a[7] = a[7] * 1e3 + 1e4
    a[8, :4000] = -np.inf  # whole threads and splits see nothing
    b[8, :4000] = -np.inf
    a[9, 4990:] = 60.0  # the max arrives last: everything before rescales by 2^-80
    a[10, [3, 2050, 4999]] = 30.0  # ties across threads and splits
    b[11, :] = -1e6  # uniform at a very low level: the shift is large and negative
    a[12, :2048] = -np.inf  # the reference side starts empty in many threads
    a[13] = np.linspace(-300, 40, v, dtype=np.float32)  # the max rises in every step
    labels = rng.integers(0, v, n)
    labels[0] = 150
    got = emulate(driver, a.view(np.uint8), F32, b.view(np.uint8), F32, v, labels, splits=splits)
    check(got, a.astype(np.float64), b.astype(np.float64), labels)
    assert got["top1_ref"][6] == 0 and got["top1_ref"][10] == 3
    assert np.isposinf(got["kld_reverse"][0]) and np.isposinf(got["kld"][1])
    assert np.all(got["top1_ref"][3:6] == -1)


@pytest.mark.parametrize("noise", [1e-4, 1e-3, 1e-2])
def test_near_identical_rows(driver, noise):
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((8, 32000)) * 8 + 20).astype(np.float32)
    b = (a + rng.standard_normal(a.shape).astype(np.float32) * noise).astype(np.float32)
    got = emulate(driver, a.view(np.uint8), F32, b.view(np.uint8), F32, 32000)
    want = reference.logit_stats(a, b)
    err = np.abs(got["kld"] - want["kld"])
    assert np.all(err <= KLD_ATOL + KLD_RTOL * want["kld"]) and err.max() < 2e-7


def test_self_kld_is_zero(driver):
    rng = np.random.default_rng(11)
    a, _ = _storage((rng.standard_normal((5, 4099)) * 6).astype(np.float32), BF16)
    got = emulate(driver, a, BF16, a, BF16, 4099)
    assert np.all(np.abs(got["kld"]) <= 1e-7) and np.all(np.abs(got["kld_reverse"]) <= 1e-7)
    np.testing.assert_array_equal(got["lse_ref"], got["lse_q"])


@pytest.mark.parametrize("q_dtype,parity,splits",
                         [(F32, True, 1), (BF16, True, 3), (LLAMA, False, 1), (LLAMA, True, 3)])
def test_llama_rows(driver, q_dtype, parity, splits):
    """llama_u16 reference rows, in parity mode or not; a llama_u16 q side in parity mode is
    taken as log-probs as they are (q_logprobs)."""
    rng = np.random.default_rng(13 + q_dtype + 7 * parity)
    n, v = 5, 3001
    ref, ref64 = llama_bytes(random_logprobs(rng, n, v))  # decoded values exact in float32
    noisy = (ref64 + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    if q_dtype == LLAMA:
        q, q64 = llama_bytes(np.minimum(noisy.astype(np.float64), 0.0))
    else:
        q, q64 = _storage(noisy, q_dtype)
    labels = rng.integers(0, v, n)
    got = emulate(driver, ref, LLAMA, q, q_dtype, v, labels, parity=parity, splits=splits)
    check(got, ref64, q64, labels, llama_parity=parity, q_logprobs=parity and q_dtype == LLAMA)


@pytest.mark.parametrize("splits", [1, 3])
def test_huge_logits(driver, splits):
    """Finite rows up to 1e37: the shift's own rounding (2^16 at 1e12) must not reach 2^t."""
    a, b = huge_logit_rows()
    got = emulate(driver, a.view(np.uint8), F32, b.view(np.uint8), F32, a.shape[1], splits=splits)
    check(got, a.astype(np.float64), b.astype(np.float64))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_sass_report_finds_the_main_loops(tmp_path):
    """benchmarks/sass_report.py (static cost of both kernels' loops) finds the vocabulary loop
    and its common path: two exp2 per entry pair per side pair, no rare-path code counted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "sass.json"
    args = [sys.executable, str(ROOT / "benchmarks" / "sass_report.py"), "--triton", "2048x4x2",
            "--extra", "all", "--json", str(out)] + ([] if NVCC else ["--no-cuda"])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["kernel"]: r for r in __import__("json").loads(out.read_text())}
    names = ["triton 2048x4x2", "triton 2048x4x2 +top2,label,state", "triton dist 2048x4x2 +tvd,jsd"]
    names += ["cuda rows", "cuda rows +top2,label", "cuda dist +tvd,jsd"] if NVCC else []
    assert list(rows) == names  # the default kernels first, then issue 16's optional outputs
    for r in rows.values():
        assert r["ex2"] == 2 * r["pairs_per_trip"] and r["pairs_per_trip"] % 8 == 0, r
        assert 0 < r["common"] <= r["instructions"], r
    assert rows["triton 2048x4x2"]["pairs_per_trip"] == 16  # 2048 entries over 4 warps
    # asking for the optional outputs costs instructions in the loop, never removes any
    assert rows["triton 2048x4x2 +top2,label,state"]["common"] > rows["triton 2048x4x2"]["common"]
    if NVCC:  # bf16 both sides: 8 entries a step, 4 steps loaded ahead (unroll_steps), 64 exp2
        assert rows["cuda rows"]["pairs_per_trip"] == 32
        assert rows["cuda rows +top2,label"]["common"] > rows["cuda rows"]["common"]


# --- issue 16's optional outputs: the kExtra rows kernel and the distance pass ---------------

from test_direction_outputs import check_extra, special_rows  # noqa: E402


@pytest.mark.parametrize("a_dtype,b_dtype", [(F32, F32), (F16, BF16), (BF16, BF16)])
@pytest.mark.parametrize("v,splits", [(1, 1), (7, 1), (1271, 1), (4099, 3)])
@pytest.mark.parametrize("with_labels", [True, False])
def test_emulated_extra_outputs_match_reference(driver, a_dtype, b_dtype, v, splits, with_labels):
    """special_rows: ties for the max, the label tied, alone on top or masked, one finite
    entry, uniform and invalid rows; across threads, steps, head/tail and splits."""
    rng = np.random.default_rng([a_dtype, b_dtype, v, splits, with_labels])
    a32, b32, y = special_rows(rng, v)
    a, a64 = _storage(a32, a_dtype)
    b, b64 = _storage(b32, b_dtype)
    labels = y if with_labels else None
    got = emulate(driver, a, a_dtype, b, b_dtype, v, labels, splits=splits, extra=True)
    check(got, a64, b64, labels)
    check_extra(got, reference.logit_stats(a64, b64, labels), with_labels)


def test_emulated_extra_ties_across_threads_and_splits(driver):
    """The max tied between two threads (and two splits): top2 == top1, margin 0 at either."""
    rng = np.random.default_rng(23)
    n, v = 4, 5000
    a = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    b = (a + 0.2 * rng.standard_normal((n, v))).astype(np.float32)
    a[0, [3, 2050]] = 30.0
    a[1, [8, 4999]] = 30.0
    b[2, [0, 7]] = 30.0  # two entries of one step
    labels = np.array([2050, 8, 7, 0])
    for splits in (1, 4):
        got = emulate(driver, a.view(np.uint8), F32, b.view(np.uint8), F32, v, labels,
                      splits=splits, extra=True)
        check_extra(got, reference.logit_stats(a, b, labels), True)
        assert got["logp_top2_ref"][0] == got["logp_top1_ref"][0] and got["margin_ref"][0] == 0.0
        assert got["margin_q"][2] == 0.0 and got["rank_q_y"][2] == 0


@pytest.mark.parametrize("noise", [1e-5, 1e-3])
def test_emulated_distances_of_near_identical_rows(driver, noise):
    """TVD ~ noise and JSD ~ noise^2: the series branch of JSD, no cancellation."""
    rng = np.random.default_rng(11)
    a = (rng.standard_normal((8, 32000)) * 4 + 10).astype(np.float32)
    b = (a + noise * rng.standard_normal(a.shape)).astype(np.float32)
    got = emulate(driver, a.view(np.uint8), F32, b.view(np.uint8), F32, 32000, extra=True)
    want = reference.logit_stats(a, b)
    check_extra(got, want, False)
    assert np.max(np.abs(got["tvd"] - want["tvd"])) < 1e-7 + 1e-3 * want["tvd"].max()
    assert np.max(np.abs(got["jsd"] - want["jsd"])) < 2e-13 + 1e-3 * want["jsd"].max()


def test_emulated_distances_of_disjoint_and_far_apart_rows(driver):
    v = 1000
    a = np.full((3, v), -np.inf, np.float32)
    b = np.full((3, v), -np.inf, np.float32)
    a[0, :500], b[0, 500:] = 0.0, 0.0
    rng = np.random.default_rng(5)
    a[1], b[1] = rng.standard_normal(v) * 8, rng.standard_normal(v) * 8
    a[2], b[2] = 0.0, np.linspace(-30, 0, v)
    got = emulate(driver, a.view(np.uint8), F32, b.view(np.uint8), F32, v, extra=True)
    check_extra(got, reference.logit_stats(a, b), False)
    assert abs(got["tvd"][0] - 1.0) < 1e-6 and abs(got["jsd"][0] - np.log(2)) < 1e-6


@pytest.mark.parametrize("splits", [1, 3])
def test_emulated_extra_outputs_huge_logits(driver, splits):
    """Rows up to 1e37: log-probs against the oracle's shift-free log-softmax (its max - lse
    loses log S beyond ~1e17), distances against the oracle."""
    a, b = huge_logit_rows()
    got = emulate(driver, a.view(np.uint8), F32, b.view(np.uint8), F32, a.shape[1],
                  splits=splits, extra=True)
    want = reference.logit_stats(a.astype(np.float64), b.astype(np.float64))
    valid = ~np.isnan(want["kld"])
    for side, x in (("ref", a), ("q", b)):
        _, logp = reference._log_softmax(np.where(valid[:, None], x.astype(np.float64), 0.0))
        want[f"logp_top1_{side}"] = np.where(valid, logp.max(axis=1), np.nan)
        want[f"logp_top2_{side}"] = np.where(valid, reference._top2(logp), np.nan)
    check_extra(got, want, False)


@pytest.mark.parametrize("q_dtype,splits", [(BF16, 1), (LLAMA, 3)])
def test_emulated_extra_outputs_in_llama_parity_mode(driver, q_dtype, splits):
    """In llama parity mode too the optional outputs use each row's own renormalisation."""
    rng = np.random.default_rng(24 + q_dtype)
    n, v = 5, 3001
    ref, ref64 = llama_bytes(random_logprobs(rng, n, v))
    noisy = (ref64 + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    if q_dtype == LLAMA:
        q, q64 = llama_bytes(np.minimum(noisy.astype(np.float64), 0.0))
    else:
        q, q64 = _storage(noisy, q_dtype)
    labels = rng.integers(0, v, n)
    got = emulate(driver, ref, LLAMA, q, q_dtype, v, labels, parity=True, splits=splits,
                  extra=True)
    want = reference.logit_stats(ref64, q64, labels, llama_parity=True,
                                 q_logprobs=q_dtype == LLAMA)
    check(got, ref64, q64, labels, llama_parity=True, q_logprobs=q_dtype == LLAMA)
    check_extra(got, want, True)
