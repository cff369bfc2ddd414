// A fixed workload for instruction counts of the CPU core, which do not depend on the load of
// a shared machine (wall-clock figures do): run it under callgrind and divide the
// instructions by the pairs.
//
//   cmake -S . -B /tmp/fk_core -DCMAKE_BUILD_TYPE=Release && cmake --build /tmp/fk_core -j2
//   g++ -O2 -std=c++17 -Icsrc/include benchmarks/icount_logit_stats.cpp \
//       /tmp/fk_core/libfidelity_kld_core.a -lpthread -o /tmp/icount
//   valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out /tmp/icount avx2 float16 16 152064
//   callgrind_annotate /tmp/cg.out | head -30
//
// Arguments: simd level (scalar, avx2, avx512; valgrind has no AVX-512), dtype (float32,
// float16, bfloat16), rows, vocab, and optionally a comma-separated list of the optional
// output groups to compute (issue 16: top2, label, tvd, jsd; label also passes labels). The
// inputs are a seeded normal(0, 3) reference and the
// same plus normal(0, 0.3) noise, like benchmarks/bench_logit_stats.py; the program prints
// the pairs and a checksum of the KLDs.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fidelity_kld/logit_stats.h"

namespace {

uint16_t to_half(float f) {  // finite, normal range only (the inputs here are)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, abs = x & 0x7fffffffu;
  if (abs < 0x38800000u) return static_cast<uint16_t>(sign);
  uint32_t h = ((abs >> 23) - 112u) << 10 | ((abs & 0x7fffffu) >> 13);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

uint16_t to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

std::vector<uint8_t> store(const std::vector<float>& x, fk::DType d) {
  std::vector<uint8_t> out(x.size() * fk::dtype_size(d));
  for (size_t i = 0; i < x.size(); ++i) {
    if (d == fk::DType::F32) {
      std::memcpy(out.data() + 4 * i, &x[i], 4);
    } else {
      const uint16_t u = d == fk::DType::F16 ? to_half(x[i]) : to_bf16(x[i]);
      std::memcpy(out.data() + 2 * i, &u, 2);
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 && argc != 6) {
    std::fprintf(stderr,
                 "usage: %s scalar|avx2|avx512 float32|float16|bfloat16 ROWS VOCAB "
                 "[top2,label,tvd,jsd]\n",
                 argv[0]);
    return 2;
  }
  const std::string groups = argc == 6 ? std::string(",") + argv[5] + "," : "";
  const auto wants = [&](const char* g) { return groups.find(std::string(",") + g + ",") != std::string::npos; };
  const std::string level_name = argv[1], dtype_name = argv[2];
  const fk::SimdLevel level = level_name == "avx512" ? fk::SimdLevel::AVX512
                              : level_name == "avx2" ? fk::SimdLevel::AVX2
                              : level_name == "neon" ? fk::SimdLevel::NEON
                                                     : fk::SimdLevel::SCALAR;
  const fk::DType dtype = dtype_name == "float32"   ? fk::DType::F32
                          : dtype_name == "float16" ? fk::DType::F16
                                                    : fk::DType::BF16;
  const int64_t rows = std::stoll(argv[3]), vocab = std::stoll(argv[4]);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> a(rows * vocab), b(rows * vocab);
  for (int64_t i = 0; i < rows * vocab; ++i) {
    a[i] = 3.0f * normal(rng);
    b[i] = a[i] + 0.3f * normal(rng);
  }
  const std::vector<uint8_t> sa = store(a, dtype), sb = store(b, dtype);
  std::vector<double> kld(rows), kld_rev(rows), lse_a(rows), lse_b(rows), ent(rows);
  std::vector<int32_t> top_a(rows), top_b(rows);
  fk::LogitStatsParams p;
  p.ref = sa.data();
  p.q = sb.data();
  p.ref_dtype = p.q_dtype = dtype;
  p.ref_row_stride = p.q_row_stride = vocab * fk::dtype_size(dtype);
  p.n_rows = rows;
  p.vocab = vocab;
  p.kld = kld.data();
  p.kld_reverse = kld_rev.data();
  p.lse_ref = lse_a.data();
  p.lse_q = lse_b.data();
  p.entropy_ref = ent.data();
  p.top1_ref = top_a.data();
  p.top1_q = top_b.data();
  std::vector<double> top1_a(rows), top1_b(rows), top2_a(rows), top2_b(rows), tvd(rows),
      jsd(rows), margin_a(rows), margin_b(rows), nll_a(rows), nll_b(rows), py_a(rows), py_b(rows);
  std::vector<int32_t> rank_a(rows), rank_b(rows);
  std::vector<int64_t> labels(rows);
  for (int64_t r = 0; r < rows; ++r) labels[r] = (r * 7919) % vocab;
  if (wants("top2")) {
    p.logp_top1_ref = top1_a.data();
    p.logp_top1_q = top1_b.data();
    p.logp_top2_ref = top2_a.data();
    p.logp_top2_q = top2_b.data();
  }
  if (wants("label")) {
    p.labels = labels.data();
    p.nll_ref = nll_a.data();
    p.nll_q = nll_b.data();
    p.p_ref_y = py_a.data();
    p.p_q_y = py_b.data();
    p.rank_ref_y = rank_a.data();
    p.rank_q_y = rank_b.data();
    p.margin_ref = margin_a.data();
    p.margin_q = margin_b.data();
  }
  if (wants("tvd")) p.tvd = tvd.data();
  if (wants("jsd")) p.jsd = jsd.data();
  p.threads = 1;
  fk::logit_stats(p, level);
  double sum = 0;
  for (double k : kld) sum += k;
  std::printf("%s %s: %lld pairs, sum of KLD %.12g\n", fk::simd_level_name(level), dtype_name.c_str(),
              static_cast<long long>(rows * vocab), sum);
  return 0;
}
