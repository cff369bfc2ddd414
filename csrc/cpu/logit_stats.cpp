// Validation, SIMD dispatch and threading for the fused logit statistics.
#include "fidelity_kld/logit_stats.h"

#include <algorithm>
#include <atomic>
#include <functional>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace fk {

namespace {

// The levels this build has for its architecture, lowest first.
const std::vector<SimdLevel>& build_levels() {
  static const std::vector<SimdLevel> levels{
      SimdLevel::SCALAR,
#ifdef FK_HAVE_AVX2
      SimdLevel::AVX2,
#endif
#ifdef FK_HAVE_AVX512
      SimdLevel::AVX512,
#endif
#ifdef FK_HAVE_NEON
      SimdLevel::NEON,
#endif
  };
  return levels;
}

bool cpu_supports(SimdLevel level) {
  switch (level) {
#if defined(__x86_64__) || defined(__i386__)
    case SimdLevel::AVX512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    case SimdLevel::AVX2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
#endif
#if defined(__aarch64__)
    case SimdLevel::NEON: return true;  // baseline on aarch64 (fp16 conversion and FMA too)
#endif
    case SimdLevel::SCALAR: return true;
    default: return false;
  }
}

// Position in build_levels() of the highest level this CPU runs.
size_t cpu_position() {
  const auto& levels = build_levels();
  size_t k = levels.size() - 1;
  while (k > 0 && !cpu_supports(levels[k])) --k;
  return k;
}

// Position in build_levels() of the FIDELITY_KLD_SIMD cap (the top one when unset).
size_t env_cap_position() {
  const auto& levels = build_levels();
  const char* env = std::getenv("FIDELITY_KLD_SIMD");
  if (!env || !*env) return levels.size() - 1;
  const std::string v(env);
  std::string names;
  for (size_t k = 0; k < levels.size(); ++k) {
    if (v == simd_level_name(levels[k])) return k;
    names += (k ? ", " : "") + std::string(simd_level_name(levels[k]));
  }
  FK_CHECK(v == "avx2" || v == "avx512" || v == "neon",
           "FIDELITY_KLD_SIMD must be scalar, avx2, avx512 or neon, not '" << v << "'");
  FK_CHECK(false, "FIDELITY_KLD_SIMD=" << v << " is a level of another architecture (this build "
                                       << "has " << names << ")");
}

using RowsFn = void (*)(const LogitStatsParams&, int64_t, int64_t);

RowsFn rows_fn(SimdLevel level) {
  switch (level) {
#ifdef FK_HAVE_AVX512
    case SimdLevel::AVX512: return detail::logit_stats_rows_avx512;
#endif
#ifdef FK_HAVE_AVX2
    case SimdLevel::AVX2: return detail::logit_stats_rows_avx2;
#endif
#ifdef FK_HAVE_NEON
    case SimdLevel::NEON: return detail::logit_stats_rows_neon;
#endif
    default: return detail::logit_stats_rows_scalar;
  }
}

void validate(const LogitStatsParams& p) {
  check_params(p);
  if (p.labels)
    for (int64_t r = 0; r < p.n_rows; ++r)
      FK_CHECK(p.labels[r] >= 0 && p.labels[r] < p.vocab,
               "label " << p.labels[r] << " at token " << r << " is outside the vocabulary [0, "
                        << p.vocab << ")");
}

}  // namespace

SimdLevel active_simd_level() {
  return build_levels()[std::min(cpu_position(), env_cap_position())];
}

std::vector<SimdLevel> available_simd_levels() {
  const auto& levels = build_levels();
  return {levels.begin(), levels.begin() + std::min(cpu_position(), env_cap_position()) + 1};
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::AVX512: return "avx512";
    case SimdLevel::AVX2: return "avx2";
    case SimdLevel::NEON: return "neon";
    default: return "scalar";
  }
}

void logit_stats(const LogitStatsParams& p) { logit_stats(p, active_simd_level()); }

namespace {

// Rows [0, n_rows) over threads: fn(begin, end) on blocks of rows. A thread is worth starting
// for about 256 KB of input (row_bytes: the input bytes of one row, every side); results do
// not depend on the split.
template <class Fn>
void parallel_rows(int64_t n_rows, int64_t row_bytes, int requested, const Fn& fn) {
  int threads = requested > 0 ? requested : static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(threads, 1);
  const int64_t useful = std::max<int64_t>(1, n_rows * row_bytes / (256 * 1024));
  threads = static_cast<int>(std::min<int64_t>({threads, n_rows, useful}));
  if (threads == 1) {
    fn(int64_t{0}, n_rows);
    return;
  }
  // Rows are handed out in small blocks from a shared counter, so a thread that the OS
  // preempts (a reader thread shares these cores) delays only its current block, not a
  // fixed share of the call. Each row's result does not depend on which thread computes it.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(
      n_rows / (4 * threads), std::max<int64_t>(1, (2 << 20) / std::max<int64_t>(row_bytes, 1))));
  std::atomic<int64_t> next{0};
  const auto worker = [&] {
    for (;;) {
      const int64_t begin = next.fetch_add(block, std::memory_order_relaxed);
      if (begin >= n_rows) return;
      fn(begin, std::min(begin + block, n_rows));
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

using MultiRowsFn = void (*)(const LogitStatsParams*, int, int64_t, int64_t);

MultiRowsFn multi_rows_fn(SimdLevel level) {
  switch (level) {
#ifdef FK_HAVE_AVX512
    case SimdLevel::AVX512: return detail::logit_stats_rows_multi_avx512;
#endif
#ifdef FK_HAVE_AVX2
    case SimdLevel::AVX2: return detail::logit_stats_rows_multi_avx2;
#endif
#ifdef FK_HAVE_NEON
    case SimdLevel::NEON: return detail::logit_stats_rows_multi_neon;
#endif
    default: return detail::logit_stats_rows_multi_scalar;
  }
}

}  // namespace

void logit_stats(const LogitStatsParams& p, SimdLevel level) {
  validate(p);
  if (p.n_rows == 0) return;
  const RowsFn fn = rows_fn(level);
  const int64_t row_bytes = p.vocab * (dtype_size(p.ref_dtype) + dtype_size(p.q_dtype));
  parallel_rows(p.n_rows, row_bytes, p.threads,
                [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

void logit_stats_multi(const LogitStatsParams* ps, int m, SimdLevel level) {
  FK_CHECK(m >= 1, "logit_stats_multi needs at least one model, got " << m);
  const LogitStatsParams& p0 = ps[0];
  for (int j = 0; j < m; ++j) {
    const LogitStatsParams& p = ps[j];
    FK_CHECK(p.ref == p0.ref && p.ref_dtype == p0.ref_dtype &&
                 p.ref_row_stride == p0.ref_row_stride && p.n_rows == p0.n_rows &&
                 p.vocab == p0.vocab && p.labels == p0.labels &&
                 p.llama_parity == p0.llama_parity && p.q_dtype == p0.q_dtype &&
                 same_extra(p, p0),
             "model " << j
                      << " does not share the reference, labels, mode, q dtype or optional "
                         "outputs of model 0");
  }
  validate(p0);
  for (int j = 1; j < m; ++j) check_params(ps[j]);  // the labels were checked with model 0
  if (p0.n_rows == 0) return;
  const MultiRowsFn fn = multi_rows_fn(level);
  const int64_t row_bytes = p0.vocab * (dtype_size(p0.ref_dtype) + m * dtype_size(p0.q_dtype));
  parallel_rows(p0.n_rows, row_bytes, p0.threads,
                [&](int64_t begin, int64_t end) { fn(ps, m, begin, end); });
}

}  // namespace fk
