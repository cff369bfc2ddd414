// Exercises the C++ core under AddressSanitizer and UndefinedBehaviorSanitizer.
//
// Build and run (the FK_SANITIZE option adds -fsanitize=address,undefined to the core and
// builds this driver; nothing else changes):
//
//   cmake -S . -B /tmp/fk_asan -DCMAKE_BUILD_TYPE=Debug -DFK_SANITIZE=ON
//   cmake --build /tmp/fk_asan -j2 --target sanitize_driver
//   /tmp/fk_asan/csrc/tests/sanitize_driver
//   /tmp/fk_asan/csrc/tests/sanitize_driver --self-test   # must die with an ASan report
//
// Every input buffer is allocated to the exact byte (no slack after the last row), so a
// read past a row, a tail or the matrix is reported. Covered: every dtype pair (float32,
// float16, bfloat16, llama_u16 on either side), every SIMD level this CPU runs, vocabularies
// around each vector width (1, 7, 15, 16, 17, 31, 33, 1271), padded row strides, -inf masks,
// NaN/+inf and all -inf rows, huge finite values, labels, llama parity, 1 and 3 threads,
// zero rows, the parameter checks, and (in every case with labels) the optional outputs.
// The driver also checks the results: invalid rows are NaN with top1 -1; valid rows agree
// across SIMD levels and, for float32, with a float64 reference computed here. Exit status 0 only if every check passed and nothing was reported.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "fidelity_kld/logit_stats.h"

namespace {

using fk::DType;
using fk::SimdLevel;

int g_failures = 0;
long g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    if (g_failures <= 20) std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

uint16_t float_to_half(float f) {  // round to nearest even; overflow to inf; NaN kept
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (abs < 0x38800000u) {  // subnormal half or zero
    const float a = std::fabs(f) * 16777216.0f;  // / 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a)));
  }
  const uint32_t mant = abs & 0x7fffffu;
  uint32_t h = ((abs >> 23) - 112u) << 10 | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// One matrix in a given storage, in a buffer of exactly (rows-1)*stride + row_bytes bytes.
struct Matrix {
  std::unique_ptr<uint8_t[]> bytes;
  int64_t stride = 0;
  std::vector<float> values;  // what the core should decode, [rows * vocab]
};

int64_t row_bytes(DType d, int64_t vocab) {
  if (d == DType::LLAMA_U16) return 8 + 2 * (2 * ((vocab + 1) / 2));
  return fk::dtype_size(d) * vocab;
}

// --self-test: buffers this many bytes short, so ASan must report a read past the end.
int64_t g_short_by = 0;

Matrix make_matrix(const std::vector<float>& logits, int64_t rows, int64_t vocab, DType d,
                   int64_t pad_bytes) {
  Matrix m;
  const int64_t rb = row_bytes(d, vocab);
  m.stride = rb + pad_bytes;
  const int64_t total = rows == 0 ? 0 : (rows - 1) * m.stride + rb;
  m.bytes.reset(new uint8_t[total > 0 ? total : 1]);
  std::memset(m.bytes.get(), 0xA5, total > 0 ? total : 1);
  m.values.resize(rows * vocab);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = m.bytes.get() + r * m.stride;
    const float* x = logits.data() + r * vocab;
    if (d == DType::LLAMA_U16) {
      // llama.cpp's encoding of finite rows (docs/formats.md); rows with -inf/NaN get any codes.
      float mx = -std::numeric_limits<float>::infinity(), mn = std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < vocab; ++i) {
        if (std::isfinite(x[i])) {
          mx = std::max(mx, x[i]);
          mn = std::min(mn, x[i]);
        }
      }
      if (!std::isfinite(mx)) mx = mn = 0.0f;
      const float m_lo = std::max(mn, mx - 16.0f);
      double s = 0;
      for (int64_t i = 0; i < vocab; ++i)
        if (std::isfinite(x[i])) s += std::exp(static_cast<double>(x[i]) - mx);
      const float lse = static_cast<float>(std::log(s > 0 ? s : 1.0));
      const float scale = (mx - m_lo) / 65535.0f;
      const float min_log_prob = m_lo - mx - lse;
      std::memcpy(row, &scale, 4);
      std::memcpy(row + 4, &min_log_prob, 4);
      for (int64_t i = 0; i < vocab; ++i) {
        float code = 0.0f;
        if (scale > 0 && std::isfinite(x[i]) && x[i] > m_lo)
          code = std::nearbyint((x[i] - m_lo) * (1.0f / scale));
        code = std::min(std::max(code, 0.0f), 65535.0f);
        const uint16_t u = static_cast<uint16_t>(code);
        std::memcpy(row + 8 + 2 * i, &u, 2);
        m.values[r * vocab + i] = scale * static_cast<float>(u) + min_log_prob;
      }
      if (vocab % 2) std::memset(row + 8 + 2 * vocab, 0, 2);
    } else {
      for (int64_t i = 0; i < vocab; ++i) {
        if (d == DType::F32) {
          std::memcpy(row + 4 * i, &x[i], 4);
          m.values[r * vocab + i] = x[i];
        } else {
          const uint16_t u = d == DType::F16 ? float_to_half(x[i]) : float_to_bf16(x[i]);
          std::memcpy(row + 2 * i, &u, 2);
          m.values[r * vocab + i] = d == DType::F16 ? fk::half_to_float(u) : fk::bf16_to_float(u);
        }
      }
    }
  }
  if (g_short_by) {  // keep the data, hand the core a buffer that ends early
    std::unique_ptr<uint8_t[]> cut(new uint8_t[total - g_short_by]);
    std::memcpy(cut.get(), m.bytes.get(), total - g_short_by);
    m.bytes = std::move(cut);
  }
  return m;
}

struct Outputs {
  explicit Outputs(int64_t n)
      : kld(n), kld_reverse(n), lse_ref(n), lse_q(n), entropy_ref(n), nll_ref(n), nll_q(n),
        p_ref_y(n), p_q_y(n), kld_llama(n), top1_ref(n), top1_q(n), extra_f(8 * n),
        extra_i(2 * n) {}
  std::vector<double> kld, kld_reverse, lse_ref, lse_q, entropy_ref, nll_ref, nll_q, p_ref_y,
      p_q_y, kld_llama;
  std::vector<int32_t> top1_ref, top1_q;
  std::vector<double> extra_f;  // the optional outputs (issue 16), asked for with labels
  std::vector<int32_t> extra_i;
  void attach(fk::LogitStatsParams& p, bool labels, bool llama) {
    p.kld = kld.data();
    p.kld_reverse = kld_reverse.data();
    p.lse_ref = lse_ref.data();
    p.lse_q = lse_q.data();
    p.entropy_ref = entropy_ref.data();
    p.top1_ref = top1_ref.data();
    p.top1_q = top1_q.data();
    if (labels) {
      p.nll_ref = nll_ref.data();
      p.nll_q = nll_q.data();
      p.p_ref_y = p_ref_y.data();
      p.p_q_y = p_q_y.data();
      const int64_t n = static_cast<int64_t>(kld.size());
      double* f = extra_f.data();
      p.logp_top1_ref = f, p.logp_top1_q = f + n, p.logp_top2_ref = f + 2 * n;
      p.logp_top2_q = f + 3 * n, p.tvd = f + 4 * n, p.jsd = f + 5 * n;
      p.margin_ref = f + 6 * n, p.margin_q = f + 7 * n;
      p.rank_ref_y = extra_i.data(), p.rank_q_y = extra_i.data() + n;
    }
    if (llama) p.kld_llama = kld_llama.data();
  }
};

// The rows every case holds: ordinary, -inf masks (vector body and tail), NaN, +inf, all
// -inf, constant, argmax tie, a huge finite max, near-identical pair.
std::vector<float> make_logits(int64_t rows, int64_t vocab, uint32_t seed, bool q_side,
                               const std::vector<float>* ref) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(rows * vocab);
  for (auto& v : x) v = normal(rng);
  if (q_side && ref)
    for (int64_t i = 0; i < rows * vocab; ++i) x[i] = (*ref)[i] + 0.1f * normal(rng);
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x.data() + r * vocab;
    switch (r % 10) {
      case 1:  // -inf masks, same entries on both sides
        for (int64_t i = 0; i < vocab; i += 3) row[i] = -inf;
        if (vocab > 1) row[vocab - 1] = -inf;
        if (vocab > 1) row[1] = 2.0f;  // keep a finite entry
        break;
      case 2:
        if (q_side) row[vocab / 2] = std::numeric_limits<float>::quiet_NaN();
        break;
      case 3:
        if (!q_side) row[vocab - 1] = inf;
        break;
      case 4:
        if (q_side) for (int64_t i = 0; i < vocab; ++i) row[i] = -inf;
        break;
      case 5:
        for (int64_t i = 0; i < vocab; ++i) row[i] = 1.25f;
        break;
      case 6:
        row[0] = row[vocab - 1] = 40.0f;
        break;
      case 7:
        for (int64_t i = 0; i < vocab; ++i) row[i] += 1e12f;
        break;
      case 8:
        if (q_side && vocab > 2) row[2] = -inf;  // q masks what P gives mass: KL = +inf
        break;
      default:
        break;
    }
  }
  return x;
}

bool row_invalid(const std::vector<float>& v, int64_t r, int64_t vocab) {
  bool any_finite = false;
  for (int64_t i = 0; i < vocab; ++i) {
    const float x = v[r * vocab + i];
    if (std::isnan(x) || x == std::numeric_limits<float>::infinity()) return true;
    if (std::isfinite(x)) any_finite = true;
  }
  return !any_finite;
}

// float64 KL(P||Q) and log-sum-exp of the decoded values (-inf entries masked).
void reference_row(const float* a, const float* b, int64_t vocab, double& kld, double& lse_a) {
  double ma = -INFINITY, mb = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) {
    ma = std::max(ma, static_cast<double>(a[i]));
    mb = std::max(mb, static_cast<double>(b[i]));
  }
  double sa = 0, sb = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    sa += std::exp(a[i] - ma);
    sb += std::exp(b[i] - mb);
  }
  const double la = std::log(sa), lb = std::log(sb);
  kld = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    const double lpa = a[i] - ma - la, lpb = b[i] - mb - lb;
    const double pa = std::exp(lpa);
    if (pa > 0) kld += pa * (lpa - lpb);
  }
  lse_a = ma + la;
}

std::vector<SimdLevel> levels() { return fk::available_simd_levels(); }

bool close(double x, double y, double rtol, double atol) {
  if (std::isnan(x) || std::isnan(y)) return std::isnan(x) && std::isnan(y);
  if (std::isinf(x) || std::isinf(y)) return x == y;
  return std::fabs(x - y) <= atol + rtol * std::fabs(y);
}

void run_case(DType da, DType db, int64_t rows, int64_t vocab, int64_t pad, bool labels,
              bool llama, int threads, uint32_t seed) {
  const std::vector<float> la = make_logits(rows, vocab, seed, false, nullptr);
  const std::vector<float> lb = make_logits(rows, vocab, seed + 1, true, &la);
  const Matrix a = make_matrix(la, rows, vocab, da, pad);
  const Matrix b = make_matrix(lb, rows, vocab, db, pad ? pad + 2 : 0);
  std::vector<int64_t> y(rows);
  for (int64_t r = 0; r < rows; ++r) y[r] = (r * 7 + 3) % vocab;
  const std::string name = std::string(fk::dtype_name(da)) + "/" + fk::dtype_name(db) +
                           " rows=" + std::to_string(rows) + " vocab=" + std::to_string(vocab) +
                           " pad=" + std::to_string(pad) + (labels ? " labels" : "") +
                           (llama ? " llama" : "") + " threads=" + std::to_string(threads);
  std::vector<Outputs> results;
  const auto lv = levels();
  for (SimdLevel level : lv) {
    Outputs out(rows);
    fk::LogitStatsParams p;
    p.ref = a.bytes.get();
    p.q = b.bytes.get();
    p.ref_dtype = da;
    p.q_dtype = db;
    p.ref_row_stride = a.stride;
    p.q_row_stride = b.stride;
    p.n_rows = rows;
    p.vocab = vocab;
    p.labels = labels ? y.data() : nullptr;
    p.llama_parity = llama;
    p.threads = threads;
    out.attach(p, labels, llama);
    fk::logit_stats(p, level);
    // The same model as five through logit_stats_multi (a group of 4, then 1): each bitwise
    // the single call's outputs.
    std::vector<Outputs> multi(5, Outputs(rows));
    std::vector<fk::LogitStatsParams> ps(5, p);
    for (int j = 0; j < 5; ++j) multi[j].attach(ps[j], labels, llama);
    fk::logit_stats_multi(ps.data(), 5, level);
    for (const Outputs& o : multi) {
      const auto same = [&](const auto& x, const auto& y) {
        return std::memcmp(x.data(), y.data(), x.size() * sizeof(x[0])) == 0;
      };
      const bool labels_same = !labels || (same(o.nll_q, out.nll_q) && same(o.p_q_y, out.p_q_y));
      check(same(o.kld, out.kld) && same(o.kld_reverse, out.kld_reverse) &&
                same(o.lse_ref, out.lse_ref) && same(o.lse_q, out.lse_q) &&
                same(o.entropy_ref, out.entropy_ref) && same(o.top1_ref, out.top1_ref) &&
                same(o.top1_q, out.top1_q) && labels_same &&
                (!llama || same(o.kld_llama, out.kld_llama)),
            std::string("logit_stats_multi differs from logit_stats at ") +
                fk::simd_level_name(level) + " [" + name + "]");
    }
    results.push_back(std::move(out));
  }
  const std::string sl = " [" + name + "]";
  for (int64_t r = 0; r < rows; ++r) {
    const bool invalid = row_invalid(a.values, r, vocab) || row_invalid(b.values, r, vocab);
    for (size_t k = 0; k < results.size(); ++k) {
      const Outputs& o = results[k];
      const std::string where = " row " + std::to_string(r) + " " +
                                fk::simd_level_name(lv[k]) + sl;
      if (invalid) {
        check(std::isnan(o.kld[r]) && std::isnan(o.lse_ref[r]) && o.top1_ref[r] == -1 &&
                  o.top1_q[r] == -1,
              "invalid row not flagged" + where);
        continue;
      }
      check(!std::isnan(o.kld[r]) && o.top1_ref[r] >= 0 && o.top1_ref[r] < vocab &&
                o.top1_q[r] >= 0 && o.top1_q[r] < vocab,
            "valid row flagged invalid" + where);
      check(o.kld[r] > -1e-5 && o.entropy_ref[r] > -1e-5, "negative KLD or entropy" + where);
      const Outputs& s = results[0];
      check(close(o.kld[r], s.kld[r], 1e-4, 1e-5) && close(o.lse_ref[r], s.lse_ref[r], 1e-6, 1e-5) &&
                close(o.entropy_ref[r], s.entropy_ref[r], 1e-4, 1e-5),
            "SIMD level disagrees with scalar" + where);
      if (labels) check(close(o.nll_q[r], s.nll_q[r], 1e-4, 1e-5), "nll_q disagrees" + where);
      if (llama) check(close(o.kld_llama[r], s.kld_llama[r], 1e-4, 1e-5), "kld_llama disagrees" + where);
      if (da == DType::F32 && db == DType::F32) {
        double kld, lse;
        reference_row(a.values.data() + r * vocab, b.values.data() + r * vocab, vocab, kld, lse);
        check(close(o.kld[r], kld, 1e-4, 1e-5), "KLD differs from the float64 reference" + where);
        check(close(o.lse_ref[r], lse, 1e-6, 1e-4), "lse differs from the float64 reference" + where);
      }
    }
  }
}

template <class Fn>
void expect_throw(Fn&& fn, const char* what) {
  bool threw = false;
  try {
    fn();
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, std::string("no std::invalid_argument for ") + what);
}

void parameter_checks() {
  std::vector<float> x(4 * 5, 0.5f);
  Outputs out(4);
  fk::LogitStatsParams base;
  base.ref = base.q = x.data();
  base.ref_row_stride = base.q_row_stride = 5 * 4;
  base.n_rows = 4;
  base.vocab = 5;
  out.attach(base, true, true);
  auto p = base;
  expect_throw([&] { fk::logit_stats(p); }, "label ranks and margins without labels");
  base.rank_ref_y = base.rank_q_y = nullptr;
  base.margin_ref = base.margin_q = nullptr;
  std::vector<int64_t> y{0, 1, 2, 5};
  p = base;
  p.labels = y.data();
  expect_throw([&] { fk::logit_stats(p); }, "a label outside the vocabulary");
  p = base;
  p.vocab = 0;
  expect_throw([&] { fk::logit_stats(p); }, "vocab 0");
  p = base;
  p.ref_row_stride = 8;
  expect_throw([&] { fk::logit_stats(p); }, "a row stride shorter than a row");
  p = base;
  p.q = nullptr;
  expect_throw([&] { fk::logit_stats(p); }, "a null input");
  p = base;
  p.kld = nullptr;
  expect_throw([&] { fk::logit_stats(p); }, "a null output");
  p = base;
  p.llama_parity = true;
  expect_throw([&] { fk::logit_stats(p); }, "llama parity without a llama reference");
  p = base;
  p.n_rows = 0;  // nothing to do, nothing touched
  fk::logit_stats(p);
  std::vector<float> x2(x);
  fk::LogitStatsParams two[2] = {base, base};
  two[1].ref = x2.data();
  expect_throw([&] { fk::logit_stats_multi(two, 2, fk::SimdLevel::SCALAR); },
               "models that do not share the reference");
  two[1] = base;
  two[1].kld = nullptr;
  expect_throw([&] { fk::logit_stats_multi(two, 2, fk::SimdLevel::SCALAR); },
               "a null output of the second model");
  expect_throw([&] { fk::logit_stats_multi(two, 0, fk::SimdLevel::SCALAR); }, "no models");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--self-test") {
    // The buffers are cut after the values are written, so only the core's reads overflow.
    g_short_by = 2;
    std::printf("self-test: the last row is 2 bytes short; AddressSanitizer must report it\n");
    std::fflush(stdout);
    run_case(DType::F16, DType::F16, 3, 33, 0, false, false, 1, 7);
    std::printf("self-test FAILED: no report\n");
    return 1;
  }
  const DType dtypes[] = {DType::F32, DType::F16, DType::BF16, DType::LLAMA_U16};
  const int64_t vocabs[] = {1, 7, 15, 16, 17, 31, 33, 1271};
  uint32_t seed = 1;
  for (DType da : dtypes) {
    for (DType db : dtypes) {
      for (int64_t vocab : vocabs) {
        const bool llama = da == DType::LLAMA_U16;
        run_case(da, db, 23, vocab, 0, true, llama, 1, seed++);
        run_case(da, db, 23, vocab, 6, vocab > 1, false, 3, seed++);
      }
    }
  }
  // Enough rows and bytes for several threads with the block hand-out, and one row alone.
  run_case(DType::F16, DType::F32, 300, 4099, 0, true, false, 3, seed++);
  run_case(DType::LLAMA_U16, DType::LLAMA_U16, 300, 4099, 0, true, true, 3, seed++);
  run_case(DType::BF16, DType::BF16, 1, 33, 0, true, false, 8, seed++);
  // Rows taken in vocabulary tiles (a pair over 256 KB: 67 tiles of 1024 and a tail of 37),
  // with padded strides and several threads.
  for (DType d : {DType::F32, DType::F16, DType::LLAMA_U16}) {
    run_case(d, DType::F16, 5, 67 * 1024 + 37, 6, true, d == DType::LLAMA_U16, 3, seed++);
    run_case(DType::F32, d, 4, 67 * 1024 + 37, 0, true, false, 1, seed++);
  }
  parameter_checks();
  std::printf("sanitize_driver: %ld checks, %d failed, SIMD levels up to %s\n", g_checks,
              g_failures, fk::simd_level_name(fk::active_simd_level()));
  return g_failures == 0 ? 0 : 1;
}
