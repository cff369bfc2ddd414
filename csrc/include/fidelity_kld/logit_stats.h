// Fused per-token statistics between a reference and a quantized logit matrix.
//
// For each row (token) t, with a = ref[t, :], b = q[t, :], p = softmax(a), q = softmax(b),
// all in nats:
//   kld         = KL(P_ref || P_q) = sum_i p_i (log p_i - log q_i)
//   kld_reverse = KL(P_q || P_ref)
//   lse_ref/q   = log sum_i exp(a_i) / exp(b_i)
//   entropy_ref = -sum_i p_i log p_i
//   top1_ref/q  = argmax (lowest index wins ties)
//   with labels y: nll_ref = lse_ref - a_y, nll_q = lse_q - b_y, p_ref_y, p_q_y = exp(-nll)
//
// llama_parity (ref must be LLAMA_U16): the reference row holds llama.cpp's decoded log-probs;
// nll_ref/p_ref_y use them as they are (no renormalisation), and kld_llama is llama.cpp's
// KLD: sum over entries whose decoded ref log-prob is > -16 of exp(ref_i) (ref_i - log q_i).
// If q is LLAMA_U16 too, its decoded values are taken as log q as they are (nll_q, p_q_y and
// kld_llama), since llama.cpp uses the quant's own normalised log-probs; renormalising the
// decoded row would add the mass of the clamped floor (about 1e-4 nats for V = 8000).
//
// Optional outputs (issue 16; null pointer = not computed, and then no work is done for it),
// defined in python/fidelity_kld/reference.py's module docstring:
//   logp_top1_ref/q  max_i a_i - lse (renormalised, also in llama_parity mode)
//   logp_top2_ref/q  second largest entry of the row as a multiset (a tied maximum gives
//                    top2 == top1) minus lse; -inf when the row has one finite entry
//   tvd              1/2 sum_i |p_i - q_i|
//   jsd              1/2 KL(P||M) + 1/2 KL(Q||M), M = (P + Q)/2, nats
//   with labels y:
//   rank_ref_y/q_y   number of entries strictly greater than the label's value (0: top token)
//   margin_ref/q     a_y minus the largest entry at any other index (+inf when no other entry
//                    is finite; 0 when the label ties another maximum)
// top2, ranks and margins cost one extra compare-only pass over each side's row; tvd and jsd
// a third pass over the pair, with jsd's log only when jsd is asked for.
//
// A row with NaN or +inf (or only -inf) on either side gives NaN for every float output and
// -1 for top1 and the ranks: the token is invalid. KLD is +inf where p has mass and q has none.
#pragma once
#include <cstdint>
#include <vector>

#include "fidelity_kld/dtype.h"

namespace fk {

struct LogitStatsParams {
  // Inputs: row r of ref starts at ref + r * ref_row_stride (bytes).
  const void* ref = nullptr;
  const void* q = nullptr;
  DType ref_dtype = DType::F32;
  DType q_dtype = DType::F32;
  int64_t ref_row_stride = 0;  // bytes
  int64_t q_row_stride = 0;    // bytes
  int64_t n_rows = 0;
  int64_t vocab = 0;
  const int64_t* labels = nullptr;  // [n_rows] or null
  bool llama_parity = false;

  // Outputs, each [n_rows]. All required except the label outputs (need labels) and
  // kld_llama (needs llama_parity).
  double* kld = nullptr;
  double* kld_reverse = nullptr;
  double* lse_ref = nullptr;
  double* lse_q = nullptr;
  double* entropy_ref = nullptr;
  int32_t* top1_ref = nullptr;
  int32_t* top1_q = nullptr;
  double* nll_ref = nullptr;
  double* nll_q = nullptr;
  double* p_ref_y = nullptr;
  double* p_q_y = nullptr;
  double* kld_llama = nullptr;

  // Optional outputs, each [n_rows] or null (not computed); rank_* and margin_* need labels.
  double* logp_top1_ref = nullptr;
  double* logp_top1_q = nullptr;
  double* logp_top2_ref = nullptr;
  double* logp_top2_q = nullptr;
  double* tvd = nullptr;
  double* jsd = nullptr;
  int32_t* rank_ref_y = nullptr;
  int32_t* rank_q_y = nullptr;
  double* margin_ref = nullptr;
  double* margin_q = nullptr;

  int threads = 0;  // <= 0: all hardware threads
};

// Checks every backend shares (sizes, strides, output pointers, parity mode). Reads no
// buffer, so it also serves device pointers; each backend adds its own (the CPU checks label
// values, the GPU alignment and launch limits).
inline void check_params(const LogitStatsParams& p) {
  FK_CHECK(p.ref && p.q, "ref and q must not be null");
  FK_CHECK(p.n_rows >= 0, "n_rows must be >= 0, got " << p.n_rows);
  FK_CHECK(p.vocab >= 1, "vocab must be >= 1, got " << p.vocab);
  FK_CHECK(p.vocab <= (int64_t{1} << 31) - 1, "vocab too large: " << p.vocab);
  const int64_t min_a = dtype_row_header(p.ref_dtype) + p.vocab * dtype_size(p.ref_dtype);
  const int64_t min_b = dtype_row_header(p.q_dtype) + p.vocab * dtype_size(p.q_dtype);
  FK_CHECK(p.n_rows <= 1 || p.ref_row_stride >= min_a,
           "ref row stride " << p.ref_row_stride << " bytes is shorter than a row (" << min_a
                             << " bytes)");
  FK_CHECK(p.n_rows <= 1 || p.q_row_stride >= min_b,
           "q row stride " << p.q_row_stride << " bytes is shorter than a row (" << min_b
                           << " bytes)");
  FK_CHECK(p.kld && p.kld_reverse && p.lse_ref && p.lse_q && p.entropy_ref && p.top1_ref &&
               p.top1_q,
           "an output pointer is null");
  if (p.labels)
    FK_CHECK(p.nll_ref && p.nll_q && p.p_ref_y && p.p_q_y, "a label output pointer is null");
  FK_CHECK(p.labels || !(p.rank_ref_y || p.rank_q_y || p.margin_ref || p.margin_q),
           "label ranks and margins need labels");
  if (p.llama_parity) {
    FK_CHECK(p.ref_dtype == DType::LLAMA_U16, "llama_parity needs a llama_u16 reference");
    FK_CHECK(p.kld_llama, "kld_llama output is null");
  }
}

// Whether any optional output is asked for (the row loops then run their extra passes).
inline bool wants_extra(const LogitStatsParams& p) {
  return p.logp_top1_ref || p.logp_top1_q || p.logp_top2_ref || p.logp_top2_q || p.tvd ||
         p.jsd || p.rank_ref_y || p.rank_q_y || p.margin_ref || p.margin_q;
}

// The same optional outputs asked for (pointers null or not) in a and b.
inline bool same_extra(const LogitStatsParams& a, const LogitStatsParams& b) {
  const auto same = [](const void* x, const void* y) { return !x == !y; };
  return same(a.logp_top1_ref, b.logp_top1_ref) && same(a.logp_top1_q, b.logp_top1_q) &&
         same(a.logp_top2_ref, b.logp_top2_ref) && same(a.logp_top2_q, b.logp_top2_q) &&
         same(a.tvd, b.tvd) && same(a.jsd, b.jsd) && same(a.rank_ref_y, b.rank_ref_y) &&
         same(a.rank_q_y, b.rank_q_y) && same(a.margin_ref, b.margin_ref) &&
         same(a.margin_q, b.margin_q);
}

enum class SimdLevel : int32_t { SCALAR = 0, AVX2 = 1, AVX512 = 2, NEON = 3 };

// Highest level this CPU supports (avx512, avx2 or scalar on x86-64; neon or scalar on
// aarch64), lowered by FIDELITY_KLD_SIMD=scalar|avx2|avx512|neon. A level of another
// architecture is refused (std::invalid_argument): its numbers cannot be had here.
SimdLevel active_simd_level();
// The levels that run here, lowest first, up to active_simd_level().
std::vector<SimdLevel> available_simd_levels();
const char* simd_level_name(SimdLevel level);

// Validates params (throws std::invalid_argument) and fills the outputs.
void logit_stats(const LogitStatsParams& params);
void logit_stats(const LogitStatsParams& params, SimdLevel level);

// Several models against one reference: models[j] holds model j's q and outputs; the
// reference (pointer, dtype, row stride), n_rows, vocab, labels, llama_parity, q_dtype and the
// optional outputs asked for must be the same in all of them. Each model's outputs are bitwise those logit_stats() gives it
// alone; the reference's half of the work (its pass 1, t, 2^t and their sums) is done once per
// group of up to four models, and its rows are read once.
void logit_stats_multi(const LogitStatsParams* models, int m, SimdLevel level);

// Per-ISA row loops, one translation unit each: rows [begin, end).
namespace detail {
void logit_stats_rows_scalar(const LogitStatsParams& p, int64_t begin, int64_t end);
void logit_stats_rows_avx2(const LogitStatsParams& p, int64_t begin, int64_t end);
void logit_stats_rows_avx512(const LogitStatsParams& p, int64_t begin, int64_t end);
void logit_stats_rows_neon(const LogitStatsParams& p, int64_t begin, int64_t end);
void logit_stats_rows_multi_scalar(const LogitStatsParams* ps, int m, int64_t begin, int64_t end);
void logit_stats_rows_multi_avx2(const LogitStatsParams* ps, int m, int64_t begin, int64_t end);
void logit_stats_rows_multi_avx512(const LogitStatsParams* ps, int m, int64_t begin, int64_t end);
void logit_stats_rows_multi_neon(const LogitStatsParams* ps, int m, int64_t begin, int64_t end);
}  // namespace detail

}  // namespace fk
