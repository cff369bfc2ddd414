// The per-thread arithmetic of the CUDA kernel (logit_stats.cu), written as __host__ __device__
// code so that tests/test_cuda_compile.py can run it on the CPU: a host driver walks each
// simulated thread of a CTA through exactly the traversal the kernel uses (fold_thread_range),
// merges the threads as block_merge does (merge_block_states), and finishes each row with the
// same float64 formulas (finish_stats). Only the 16-byte loads, the warp shuffles and the shared
// memory of the kernel itself need a GPU (tests/test_gpu.py).
//
// Numerics (see the header of logit_stats.cu and csrc/cpu/row_kernel.h): per side an integer
// shift k = ceil(max * log2 e), t = fma(x, log2e, -k), e = 2^t, d = t_ref - t_q; float32 sums per
// step of 8 elements, float64 running sums, exact rescaling by powers of two when k rises.
// Beyond |max * log2 e| = 2^23 the shift is a pair hi + lo (shift_of), so that the rounding of
// max * log2 e itself never reaches t.
//
// Issue 16's optional outputs: fold_extra (second largest values, label counts; kExtra),
// finish_stats' log-probs and margins, and the distance pass (dist_thread_range, finish_dist).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fidelity_kld/dtype.h"

#define FK_HD __host__ __device__ __forceinline__

namespace fk {
namespace cuda_detail {

constexpr float kLog2eF = 1.44269504088896340736f;
constexpr double kLn2Eff = 1.0 / static_cast<double>(kLog2eF);
// Shift of a side that has seen no finite entry yet: finite (differences stay finite) and at or
// below any real ceil(max * log2 e); its sums are 0, so every term it scales is 0.
constexpr float kKFloor = -3.40282346638528859812e38f;  // the most negative float32
// From |max * log2 e| = 2^23 on float32 holds only integers, and the rounding of max * log2 e
// (up to half an ulp: 2^16 at 1e12) would be left in t.
constexpr float kBigShift = 8388608.0f;
constexpr float kLlamaWindow = -16.0f;
constexpr int kVec = 8;    // elements per thread per step
constexpr int kPart = 18;  // float64 words of split state per (row, split)
constexpr int kState = 4;  // float64 words per row for the distance pass: K_ref, K_q, S_ref, S_q
constexpr int kThreads = 256;  // threads per CTA (one CTA per row or per (row, split))

template <DType D>
struct Storage {
  static constexpr int kSize = D == DType::F32 ? 4 : 2;         // bytes per element
  static constexpr int kHeader = D == DType::LLAMA_U16 ? 8 : 0;  // bytes before element 0
  static constexpr int kStepBytes = kVec * kSize;               // 16 or 32
  static constexpr int kWords = kStepBytes / 4;
};

// Steps each thread loads before folding the first: 4 (64 bytes per side) for 16-bit inputs,
// 3 when a side is float16 (with 4, its decode spilled 24 bytes under the 128-register
// cap of two CTAs per SM), 2 (2 x 32 bytes) when a side is float32.
template <DType DA, DType DB>
__host__ __device__ constexpr int unroll_steps() {
  if (Storage<DA>::kSize != 2 || Storage<DB>::kSize != 2) return 2;
  return (DA == DType::F16 || DB == DType::F16) ? 3 : 4;
}

// Columns per split, a whole number of steps so each split's body stays aligned like the row's;
// returns the number of splits that are actually non-empty.
FK_HD int split_columns(int64_t vocab, int splits, int64_t* cols) {
  int64_t c = (vocab + splits - 1) / splits;
  c = (c + kVec - 1) / kVec * kVec;
  *cols = c;
  return static_cast<int>((vocab + c - 1) / c);
}

struct Decode {
  float scale;
  float offset;
};

FK_HD bool is_nan(float x) { return x != x; }
FK_HD bool is_nan(double x) { return x != x; }

FK_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// ----------------------------------------------------------------------------------------------
// loads
// ----------------------------------------------------------------------------------------------

FK_HD uint32_t load_u16(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p)));
#else
  uint16_t u;
  std::memcpy(&u, p, 2);
  return u;
#endif
}

template <DType D>
FK_HD Decode read_decode(const uint8_t* row) {
  Decode dec{1.0f, 0.0f};
  if constexpr (D == DType::LLAMA_U16) {
    // Two 16-bit halves each: the row base is only guaranteed 2-byte aligned.
    dec.scale = bits_to_float(load_u16(row) | (load_u16(row + 2) << 16));
    dec.offset = bits_to_float(load_u16(row + 4) | (load_u16(row + 6) << 16));
  }
  return dec;
}

// The raw bytes of one step (kBytes = 16 or 32) at p, with the widest access `align` allows.
template <int kBytes>
FK_HD void load_raw(const uint8_t* p, int align, uint32_t (&w)[kBytes / 4]) {
#ifdef __CUDA_ARCH__
  if (align >= 16) {
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p) + k);
      w[4 * k] = v.x;
      w[4 * k + 1] = v.y;
      w[4 * k + 2] = v.z;
      w[4 * k + 3] = v.w;
    }
  } else if (align >= 8) {
#pragma unroll
    for (int k = 0; k < kBytes / 8; ++k) {
      const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p) + k);
      w[2 * k] = v.x;
      w[2 * k + 1] = v.y;
    }
  } else if (align >= 4) {
#pragma unroll
    for (int k = 0; k < kBytes / 4; ++k)
      w[k] = __ldcs(reinterpret_cast<const unsigned int*>(p) + k);
  } else {
#pragma unroll
    for (int k = 0; k < kBytes / 4; ++k) w[k] = load_u16(p + 4 * k) | (load_u16(p + 4 * k + 2) << 16);
  }
#else
  (void)align;
  std::memcpy(w, p, kBytes);
#endif
}

template <DType D>
FK_HD void decode_step(const uint32_t (&w)[Storage<D>::kWords], const Decode& dec,
                       float (&x)[kVec]) {
  if constexpr (D == DType::F32) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = bits_to_float(w[j]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec / 2; ++k) {
      const uint32_t lo = w[k] & 0xffffu, hi = w[k] >> 16;
      if constexpr (D == DType::F16) {
        x[2 * k] = __half2float(__ushort_as_half(static_cast<unsigned short>(lo)));
        x[2 * k + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(hi)));
      } else if constexpr (D == DType::BF16) {
        x[2 * k] = bits_to_float(lo << 16);
        x[2 * k + 1] = bits_to_float(hi << 16);
      } else {  // LLAMA_U16: fma(code, scale, min), as the CPU's SIMD paths
        x[2 * k] = fmaf(static_cast<float>(lo), dec.scale, dec.offset);
        x[2 * k + 1] = fmaf(static_cast<float>(hi), dec.scale, dec.offset);
      }
    }
  }
}

template <DType D>
FK_HD float load_one(const uint8_t* vals, int64_t i, const Decode& dec) {
  const uint8_t* p = vals + i * Storage<D>::kSize;
  if constexpr (D == DType::F32) {
#ifdef __CUDA_ARCH__
    return __ldg(reinterpret_cast<const float*>(p));
#else
    float f;
    std::memcpy(&f, p, 4);
    return f;
#endif
  }
  const uint32_t u = load_u16(p);
  if constexpr (D == DType::F16) return __half2float(__ushort_as_half(static_cast<unsigned short>(u)));
  if constexpr (D == DType::BF16) return bits_to_float(u << 16);
  return fmaf(static_cast<float>(u), dec.scale, dec.offset);
}

// Largest power of two <= 16 dividing the address.
FK_HD int alignment_of(const uint8_t* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return (a & 15u) == 0 ? 16 : (a & 7u) == 0 ? 8 : (a & 3u) == 0 ? 4 : 2;
}

// ----------------------------------------------------------------------------------------------
// the running state
// ----------------------------------------------------------------------------------------------

struct State {
  float ka, kb;  // integer shifts (log2 units): ka + la, kb + lb
  float la, lb;  // their low parts, 0 unless |max| > ~5.8e6 (shift_of)
  double sa, sb, trq, tqr, h, wt, ws;
  float best_a, best_b;
  int ia, ib;  // first index of best (INT_MAX: none yet)
  bool bad;
  // Optional outputs (kExtra): second largest value per side (as a multiset), the count of
  // entries strictly above the label's values ya, yb (+inf without labels: counts stay 0).
  float sec_a, sec_b, ya, yb;
  int cnt_a, cnt_b;
};

FK_HD void init_state(State& s) {
  s.ka = s.kb = kKFloor;
  s.la = s.lb = 0.0f;
  s.sa = s.sb = s.trq = s.tqr = s.h = s.wt = s.ws = 0.0;
  s.best_a = s.best_b = -INFINITY;
  s.ia = s.ib = INT_MAX;
  s.bad = false;
  s.sec_a = s.sec_b = -INFINITY;
  s.ya = s.yb = INFINITY;
  s.cnt_a = s.cnt_b = 0;
}

// 2^-delta for an integer-valued delta >= 0, exact; 0 below 2^-1022 (and for NaN).
FK_HD double pow2_neg(double delta) {
  if (!(delta <= 1022.0)) return 0.0;
  return ldexp(1.0, -static_cast<int>(delta));
}

// The integer shift for a step max m, as hi + lo: t = fma(x, log2e, -hi) - lo puts m at
// t in (-1, 0]. Below 2^23, hi = ceil(m log2e), lo = 0; above, hi = fl(m log2e) (an integer
// there) and lo = ceil of its exact rounding error, one fma. Rows whose max lies within
// +-2.3e38 (beyond, m log2e overflows) keep t exact near their max.
FK_HD void shift_of(float m, float& hi, float& lo) {
  hi = ceilf(m * kLog2eF);
  lo = 0.0f;
  if (fabsf(hi) >= kBigShift && fabsf(hi) < INFINITY) lo = ceilf(fmaf(m, kLog2eF, -hi));
}

// hi + lo exactly (both integers, lo below hi's last bit: 48 bits in all).
FK_HD double shift64(float hi, float lo) { return static_cast<double>(hi) + lo; }

// The float32 pair of an exact float64 shift K = hi + lo (the rounding of K and its remainder,
// which fits in 24 bits for every K that shift_of makes).
FK_HD void split_shift(double k, float& hi, float& lo) {
  hi = static_cast<float>(k);
  lo = (k < INFINITY && k > -INFINITY) ? static_cast<float>(k - hi) : 0.0f;
}

// (hi, lo) > (k_hi, k_lo) as shifts; comparing hi first is exact (|lo| <= ulp(hi) / 2).
FK_HD bool raises(float hi, float lo, float k_hi, float k_lo) {
  return hi > k_hi || (hi == k_hi && lo > k_lo);
}

// Re-express the float64 sums against the larger shifts (na, nb) >= (ka + la, kb + lb):
//   S' = 2^-da S,  T_rq' = 2^-da (T_rq + (db - da) S_ref),  T_qr' = 2^-db (T_qr + (db - da) S_q),
//   H' = 2^-da (H - da S_ref),  and W_t, W_s (llama window) like T_rq and S_ref.
// A factor 0 drops what lies 2^1022 below the new max; the guards keep 0 * inf out.
FK_HD void rescale(State& s, double na, double nb) {
  const double da = na - shift64(s.ka, s.la), db = nb - shift64(s.kb, s.lb);
  const double fa = pow2_neg(da), fb = pow2_neg(db), diff = db - da;
  s.trq = fa == 0.0 ? 0.0 : fa * (s.trq + diff * s.sa);
  s.tqr = fb == 0.0 ? 0.0 : fb * (s.tqr + diff * s.sb);
  s.h = fa == 0.0 ? 0.0 : fa * (s.h - da * s.sa);
  s.wt = fa == 0.0 ? 0.0 : fa * (s.wt + diff * s.ws);
  s.ws = fa * s.ws;
  s.sa = is_nan(s.sa) ? s.sa : fa * s.sa;
  s.sb = is_nan(s.sb) ? s.sb : fb * s.sb;
}

// 2^t with results below 2^-126 flushed to 0, as the CPU core's exp2 and Triton's tl.exp2 do
// (those terms lie more than 87 nats under the row max). On the GPU one MUFU.EX2
// (ex2.approx.ftz, 2 ulp like exp2f); exp2f's own path for subnormal results costs four more
// instructions per call, about 8 per entry pair (benchmarks/sass_report.py).
FK_HD float exp2_f32(float t) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
#else
  return t < -126.0f ? 0.0f : std::exp2(t);
#endif
}

// The sums of one step against the current shifts; kLow: a shift has a low part (huge rows).
template <bool kParity, bool kLow>
FK_HD void fold_terms(State& s, const float (&x)[kVec], const float (&y)[kVec]) {
  float ta[kVec], tb[kVec], ea[kVec], eb[kVec];
  float ps_a = 0.f, ps_b = 0.f, p_rq = 0.f, p_qr = 0.f, p_h = 0.f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    ta[j] = fmaf(x[j], kLog2eF, -s.ka);
    tb[j] = fmaf(y[j], kLog2eF, -s.kb);
    if constexpr (kLow) {
      ta[j] -= s.la;
      tb[j] -= s.lb;
    }
    ea[j] = exp2_f32(ta[j]);
    eb[j] = exp2_f32(tb[j]);
    const float d = ta[j] - tb[j];
    ps_a += ea[j];
    ps_b += eb[j];
    p_rq = fmaf(ea[j], d, p_rq);
    p_qr = fmaf(eb[j], d, p_qr);
    p_h = fmaf(ea[j], ta[j], p_h);
  }
  if (is_nan(p_rq) || is_nan(p_qr) || is_nan(p_h)) {
    // -inf in this step: 0 * inf made NaN. Redo it with e = 0 terms contributing 0.
    p_rq = p_qr = p_h = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float d = ta[j] - tb[j];
      if (ea[j] > 0.f) {
        p_rq = fmaf(ea[j], d, p_rq);
        p_h = fmaf(ea[j], ta[j], p_h);
      }
      if (eb[j] > 0.f) p_qr = fmaf(eb[j], d, p_qr);
    }
  }
  if constexpr (kParity) {
    float p_wt = 0.f, p_ws = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (x[j] > kLlamaWindow && ea[j] > 0.f) {
        p_wt = fmaf(ea[j], ta[j] - tb[j], p_wt);
        p_ws += ea[j];
      }
    }
    s.wt += p_wt;
    s.ws += p_ws;
  }
  s.bad |= is_nan(ps_a) || is_nan(ps_b);
  s.sa += ps_a;
  s.sb += ps_b;
  s.trq += p_rq;
  s.tqr += p_qr;
  s.h += p_h;
}

// The second largest value of one step as a multiset (its max tied: the max).
FK_HD float step_second(const float (&x)[kVec]) {
  float m1 = x[0], m2 = -INFINITY;
#pragma unroll
  for (int j = 1; j < kVec; ++j) {
    m2 = fmaxf(m2, fminf(m1, x[j]));
    m1 = fmaxf(m1, x[j]);
  }
  return m2;
}

// kExtra: the second largest values and the label counts of one step (mx: its maxima), before
// best_a/best_b move: the row's second largest is the step's, or the smaller of the two maxima.
FK_HD void fold_extra(State& s, const float (&x)[kVec], const float (&y)[kVec], float mx_a,
                      float mx_b) {
  s.sec_a = fmaxf(s.sec_a, fmaxf(fminf(s.best_a, mx_a), step_second(x)));
  s.sec_b = fmaxf(s.sec_b, fmaxf(fminf(s.best_b, mx_b), step_second(y)));
  int ca = 0, cb = 0;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    ca += x[j] > s.ya;
    cb += y[j] > s.yb;
  }
  s.cnt_a += ca;
  s.cnt_b += cb;
}

// Fold one step of kVec elements (x: ref, y: q; -inf where absent) starting at index i0.
// kExtra: also the optional outputs' second largest values and label counts.
template <bool kParity, bool kExtra>
FK_HD void fold_step(State& s, const float (&x)[kVec], const float (&y)[kVec], int64_t i0) {
  float mx_a = x[0], mx_b = y[0];
#pragma unroll
  for (int j = 1; j < kVec; ++j) {
    mx_a = fmaxf(mx_a, x[j]);
    mx_b = fmaxf(mx_b, y[j]);
  }
  if constexpr (kExtra) fold_extra(s, x, y, mx_a, mx_b);
  if (mx_a > s.best_a) {  // strictly: an earlier step keeps a tie
    int j = 0;
    while (j < kVec - 1 && !(x[j] == mx_a)) ++j;
    s.best_a = mx_a;
    s.ia = static_cast<int>(i0 + j);
  }
  if (mx_b > s.best_b) {
    int j = 0;
    while (j < kVec - 1 && !(y[j] == mx_b)) ++j;
    s.best_b = mx_b;
    s.ib = static_cast<int>(i0 + j);
  }
  float ca, la, cb, lb;
  shift_of(mx_a, ca, la);
  shift_of(mx_b, cb, lb);
  const bool up_a = raises(ca, la, s.ka, s.la), up_b = raises(cb, lb, s.kb, s.lb);
  if (up_a || up_b) {
    if (!up_a) ca = s.ka, la = s.la;
    if (!up_b) cb = s.kb, lb = s.lb;
    rescale(s, shift64(ca, la), shift64(cb, lb));
    s.ka = ca;
    s.la = la;
    s.kb = cb;
    s.lb = lb;
  }
  if (s.la != 0.f || s.lb != 0.f)
    fold_terms<kParity, true>(s, x, y);
  else
    fold_terms<kParity, false>(s, x, y);
}

// Elements [lo, hi) (fewer than kVec) through scalar loads, padded with -inf.
template <DType DA, DType DB, bool kParity, bool kExtra>
FK_HD void fold_partial(State& s, const uint8_t* a_vals, const uint8_t* b_vals, const Decode& da,
                        const Decode& db, int64_t lo, int64_t hi) {
  float x[kVec], y[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const bool in = lo + j < hi;
    x[j] = in ? load_one<DA>(a_vals, lo + j, da) : -INFINITY;
    y[j] = in ? load_one<DB>(b_vals, lo + j, db) : -INFINITY;
  }
  fold_step<kParity, kExtra>(s, x, y, lo);
}

template <DType DA, DType DB>
FK_HD void load_pair(const uint8_t* a_vals, const uint8_t* b_vals, int64_t i, int align_a,
                     int align_b, const Decode& da, const Decode& db, float (&x)[kVec],
                     float (&y)[kVec]) {
  uint32_t wa[Storage<DA>::kWords], wb[Storage<DB>::kWords];
  load_raw<Storage<DA>::kStepBytes>(a_vals + i * Storage<DA>::kSize, align_a, wa);
  load_raw<Storage<DB>::kStepBytes>(b_vals + i * Storage<DB>::kSize, align_b, wb);
  decode_step<DA>(wa, da, x);
  decode_step<DB>(wb, db, y);
}

// How a CTA covers columns [begin, end) of a row: `head` elements folded in by thread 0, then
// n_steps aligned steps of kVec, then the tail (< kVec elements) by the last thread.
struct Traversal {
  int head, align_a, align_b;
  int64_t body, n_steps, tail;
};

template <DType DA, DType DB>
FK_HD Traversal plan_traversal(const uint8_t* a_vals, const uint8_t* b_vals, int64_t begin,
                               int64_t end) {
  // The first index (within kVec of begin) from which both sides load as widely as possible.
  Traversal t{0, 2, 2, 0, 0, 0};
  int best = 0;
  for (int h = 0; h < kVec; ++h) {
    const int al_a = alignment_of(a_vals + (begin + h) * Storage<DA>::kSize);
    const int al_b = alignment_of(b_vals + (begin + h) * Storage<DB>::kSize);
    const int score = al_a < al_b ? al_a : al_b;
    if (score > best) {
      best = score;
      t.head = h;
      t.align_a = al_a;
      t.align_b = al_b;
    }
  }
  if (begin + t.head > end) t.head = static_cast<int>(end - begin);
  t.body = begin + t.head;
  t.n_steps = (end - t.body) / kVec;
  t.tail = t.body + t.n_steps * kVec;
  return t;
}

// Thread `tid` of `n_threads`: its share of [begin, end) in increasing index order (the strict
// tie rule in fold_step relies on it). kUnroll steps are loaded before the first is folded.
template <DType DA, DType DB, bool kParity, bool kExtra, int kUnroll>
FK_HD void fold_thread_range(State& s, int tid, int n_threads, const uint8_t* a_vals,
                             const uint8_t* b_vals, const Decode& da, const Decode& db,
                             int64_t begin, int64_t end, const Traversal& t) {
  if (tid == 0 && t.head > 0)
    fold_partial<DA, DB, kParity, kExtra>(s, a_vals, b_vals, da, db, begin, t.body);
  int64_t st = tid;
  for (; st + (kUnroll - 1) * static_cast<int64_t>(n_threads) < t.n_steps;
       st += kUnroll * static_cast<int64_t>(n_threads)) {
    float x[kUnroll][kVec], y[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      load_pair<DA, DB>(a_vals, b_vals, t.body + (st + u * n_threads) * kVec, t.align_a,
                        t.align_b, da, db, x[u], y[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      fold_step<kParity, kExtra>(s, x[u], y[u], t.body + (st + u * n_threads) * kVec);
  }
  for (; st < t.n_steps; st += n_threads) {
    float x[kVec], y[kVec];
    load_pair<DA, DB>(a_vals, b_vals, t.body + st * kVec, t.align_a, t.align_b, da, db, x, y);
    fold_step<kParity, kExtra>(s, x, y, t.body + st * kVec);
  }
  // The tail indices exceed every step's: folding them last keeps this thread's order.
  if (tid == n_threads - 1 && t.tail < end)
    fold_partial<DA, DB, kParity, kExtra>(s, a_vals, b_vals, da, db, t.tail, end);
}

FK_HD bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

// Add `o` into `s`, whose shifts are at least o's: o's sums moved onto them, the best value with
// the lowest index (an index of INT_MAX means none yet).
FK_HD void add_state(State& s, State o) {
  rescale(o, shift64(s.ka, s.la), shift64(s.kb, s.lb));
  s.sa += o.sa;
  s.sb += o.sb;
  s.trq += o.trq;
  s.tqr += o.tqr;
  s.h += o.h;
  s.wt += o.wt;
  s.ws += o.ws;
  s.sec_a = fmaxf(fmaxf(s.sec_a, o.sec_a), fminf(s.best_a, o.best_a));
  s.sec_b = fmaxf(fmaxf(s.sec_b, o.sec_b), fminf(s.best_b, o.best_b));
  s.cnt_a += o.cnt_a;
  s.cnt_b += o.cnt_b;
  if (better(o.best_a, o.ia, s.best_a, s.ia)) {
    s.best_a = o.best_a;
    s.ia = o.ia;
  }
  if (better(o.best_b, o.ib, s.best_b, s.ib)) {
    s.best_b = o.best_b;
    s.ib = o.ib;
  }
  s.bad |= o.bad;
}

// Merge `o` into `s`.
FK_HD void merge_state(State& s, const State& o) {
  const double na = fmax(shift64(s.ka, s.la), shift64(o.ka, o.la));
  const double nb = fmax(shift64(s.kb, s.lb), shift64(o.kb, o.lb));
  rescale(s, na, nb);
  split_shift(na, s.ka, s.la);
  split_shift(nb, s.kb, s.lb);
  add_state(s, o);
}

// What block_merge computes, for a host-side CTA: every thread's state merged. (The device adds
// in a different order: warp butterflies, then warps.)
FK_HD State merge_block_states(const State* threads, int n) {
  State out;
  init_state(out);
  for (int i = 0; i < n; ++i) merge_state(out, threads[i]);
  return out;
}

// A CTA's merged state in the split workspace (kPart float64 words) and back: what the rows
// kernel writes for one (row, split) and the merge kernel reads.
FK_HD void write_part(const State& m, double* o) {
  const double words[kPart] = {shift64(m.ka, m.la), shift64(m.kb, m.lb), m.sa, m.sb, m.trq,
                               m.tqr, m.h, m.wt, m.ws, m.best_a, m.best_b,
                               static_cast<double>(m.ia), static_cast<double>(m.ib),
                               m.bad ? 1.0 : 0.0, m.sec_a, m.sec_b,
                               static_cast<double>(m.cnt_a), static_cast<double>(m.cnt_b)};
  for (int k = 0; k < kPart; ++k) o[k] = words[k];
}

FK_HD State read_part(const double* o) {
  State s;
  split_shift(o[0], s.ka, s.la);
  split_shift(o[1], s.kb, s.lb);
  s.sa = o[2];
  s.sb = o[3];
  s.trq = o[4];
  s.tqr = o[5];
  s.h = o[6];
  s.wt = o[7];
  s.ws = o[8];
  s.best_a = static_cast<float>(o[9]);
  s.best_b = static_cast<float>(o[10]);
  s.ia = static_cast<int>(o[11]);
  s.ib = static_cast<int>(o[12]);
  s.bad = o[13] != 0.0;
  s.sec_a = static_cast<float>(o[14]);
  s.sec_b = static_cast<float>(o[15]);
  s.ya = s.yb = INFINITY;
  s.cnt_a = static_cast<int>(o[16]);
  s.cnt_b = static_cast<int>(o[17]);
  return s;
}

// ----------------------------------------------------------------------------------------------
// finishing a row, in float64
// ----------------------------------------------------------------------------------------------

struct RowOut {
  double kld, kld_reverse, lse_ref, lse_q, entropy_ref, nll_ref, nll_q, p_ref_y, p_q_y, kld_llama;
  int top1_ref, top1_q;
  // optional outputs (reference.py): valid only from a kExtra state (ranks and margins: with
  // labels); the distances come from the distance pass (finish_dist)
  double logp_top1_ref, logp_top1_q, logp_top2_ref, logp_top2_q, margin_ref, margin_q;
  int rank_ref, rank_q;
};

// log p of the float32 value v in a row with shift k (hi + lo, exact) and log S: the float64
// fma is exact where v - lse would cancel two huge numbers (rows near 1e37).
FK_HD double logp_of(float v, double k, double log_s) {
  return kLn2Eff * fma(static_cast<double>(v), static_cast<double>(kLog2eF), -k) - log_s;
}

// ay, by: the label's logits (when has_label). q_logprobs (parity mode with a llama.cpp quant
// file): q's rows are log-probs and, as in llama.cpp, used as they are for nll_q and kld_llama.
FK_HD bool row_valid(const State& s) {
  return !s.bad && s.sa > 0.0 && s.sb > 0.0 && s.sa < INFINITY && s.sb < INFINITY &&
         shift64(s.ka, s.la) < INFINITY && shift64(s.kb, s.lb) < INFINITY;
}

FK_HD RowOut finish_stats(const State& s, bool parity, bool q_logprobs, bool has_label, double ay,
                          double by) {
  RowOut o;
  const double ka = shift64(s.ka, s.la), kb = shift64(s.kb, s.lb);
  if (!row_valid(s)) {
    const double nan = NAN;
    o.kld = o.kld_reverse = o.lse_ref = o.lse_q = o.entropy_ref = nan;
    o.nll_ref = o.nll_q = o.p_ref_y = o.p_q_y = o.kld_llama = nan;
    o.logp_top1_ref = o.logp_top1_q = o.logp_top2_ref = o.logp_top2_q = nan;
    o.margin_ref = o.margin_q = nan;
    o.top1_ref = o.top1_q = o.rank_ref = o.rank_q = -1;
    return o;
  }
  const double log_sa = log(s.sa), log_sb = log(s.sb);
  const double lse_a = kLn2Eff * ka + log_sa, lse_b = kLn2Eff * kb + log_sb;
  o.lse_ref = lse_a;
  o.lse_q = lse_b;
  o.kld = kLn2Eff * s.trq / s.sa + (log_sb - log_sa);
  o.kld_reverse = -kLn2Eff * s.tqr / s.sb + (log_sa - log_sb);
  o.entropy_ref = log_sa - kLn2Eff * s.h / s.sa;
  o.top1_ref = s.ia;
  o.top1_q = s.ib;
  o.nll_ref = o.nll_q = o.p_ref_y = o.p_q_y = o.kld_llama = 0.0;
  o.logp_top1_ref = logp_of(s.best_a, ka, log_sa);
  o.logp_top1_q = logp_of(s.best_b, kb, log_sb);
  o.logp_top2_ref = logp_of(s.sec_a, ka, log_sa);
  o.logp_top2_q = logp_of(s.sec_b, kb, log_sb);
  o.rank_ref = s.cnt_a;
  o.rank_q = s.cnt_b;
  o.margin_ref = o.margin_q = 0.0;
  if (has_label) {
    // In llama parity mode the reference row already holds log-probs (not renormalised).
    o.nll_ref = parity ? -ay : lse_a - ay;
    o.nll_q = q_logprobs ? -by : lse_b - by;
    o.p_ref_y = exp(-o.nll_ref);
    o.p_q_y = exp(-o.nll_q);
    // The best other entry: the row max when something beats the label, else (the label is a
    // max) the second largest, which equals the max when it is tied.
    o.margin_ref = ay - static_cast<double>(s.cnt_a > 0 ? s.best_a : s.sec_a);
    o.margin_q = by - static_cast<double>(s.cnt_b > 0 ? s.best_b : s.sec_b);
  }
  if (parity) {
    // p_i(llama) = exp(x_i) = exp(lse_a) e_i / S_ref; log p_i - log q_i = ln2 d_i + ln2 k_a +
    // log S_q, less lse_q when q's rows are log-probs as they are.
    const double q_offset = kLn2Eff * ka + log_sb - (q_logprobs ? lse_b : 0.0);
    o.kld_llama = exp(lse_a) / s.sa * (kLn2Eff * s.wt + q_offset * s.ws);
  }
  return o;
}

// ----------------------------------------------------------------------------------------------
// the distance pass (tvd, jsd): a third read of each row pair, only when asked for
// ----------------------------------------------------------------------------------------------

// What the distance pass needs of a finished row (kState words, written by the rows or merge
// kernel): the shifts and sums that normalise p and q; S is NaN for an invalid row.
FK_HD void write_dist_state(const State& m, double* st) {
  const bool valid = row_valid(m);
  st[0] = shift64(m.ka, m.la);
  st[1] = shift64(m.kb, m.lb);
  st[2] = valid ? m.sa : NAN;
  st[3] = valid ? m.sb : NAN;
}

// p_i = 2^t_i / S_ref with t exactly as the statistics pass made it; 1/S in float32 once a row.
struct DistRow {
  float ka, la, kb, lb, ra, rb;
};

FK_HD DistRow read_dist_state(const double* st) {
  DistRow r;
  split_shift(st[0], r.ka, r.la);
  split_shift(st[1], r.kb, r.lb);
  r.ra = static_cast<float>(1.0 / st[2]);
  r.rb = static_cast<float>(1.0 / st[3]);
  return r;
}

FK_HD float log2_f32(float x) {
#ifdef __CUDA_ARCH__
  return __log2f(x);  // one MUFU.LG2, about 2^-22 absolute
#else
  return std::log2(x);
#endif
}

FK_HD float div_f32(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdividef(a, b);  // 2 ulp; b = p + q <= 2 is far from its 2^126 limit
#else
  return a / b;
#endif
}

// h(z) = (1+z) log(1+z) + (1-z) log(1-z) for |z| <= 1: p log(p/m) + q log(q/m) = m h(z) with
// m = (p+q)/2, z = (p-q)/(p+q). Below |z| = 1/4 its series in w = z^2, sum_k w^k / (k (2k-1))
// (six terms: 1e-8 relative), all positive, so no cancellation when p ~ q; above, two log2s.
FK_HD float jsd_h(float z) {
  const float a = fabsf(z), w = a * a;
  if (a < 0.25f) {
    float poly = 1.0f / 66.0f;
    poly = fmaf(poly, w, 1.0f / 45.0f);
    poly = fmaf(poly, w, 1.0f / 28.0f);
    poly = fmaf(poly, w, 1.0f / 15.0f);
    poly = fmaf(poly, w, 1.0f / 6.0f);
    poly = fmaf(poly, w, 1.0f);
    return w * poly;
  }
  const float lo = a < 1.0f ? (1.0f - a) * log2_f32(1.0f - a) : 0.0f;
  return 0.69314718055994531f * fmaf(1.0f + a, log2_f32(1.0f + a), lo);
}

struct DistSums {
  double tv, js;  // sum |p - q|, sum (p + q) h(z)
};

// One step's sums in float32, added to the float64 ones; kLow: a shift has a low part.
template <bool kJsd, bool kLow>
FK_HD void dist_terms(DistSums& d, const DistRow& r, const float (&x)[kVec],
                      const float (&y)[kVec]) {
  float tv = 0.f, js = 0.f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    float ta = fmaf(x[j], kLog2eF, -r.ka), tb = fmaf(y[j], kLog2eF, -r.kb);
    if constexpr (kLow) {
      ta -= r.la;
      tb -= r.lb;
    }
    const float p = exp2_f32(ta) * r.ra, q = exp2_f32(tb) * r.rb, diff = p - q;
    tv += fabsf(diff);
    if constexpr (kJsd) {
      const float sum = p + q;
      js += sum > 0.f ? sum * jsd_h(div_f32(diff, sum)) : 0.f;
    }
  }
  d.tv += tv;
  d.js += js;
}

template <bool kJsd>
FK_HD void dist_step(DistSums& d, const DistRow& r, const float (&x)[kVec],
                     const float (&y)[kVec]) {
  if (r.la != 0.f || r.lb != 0.f)
    dist_terms<kJsd, true>(d, r, x, y);
  else
    dist_terms<kJsd, false>(d, r, x, y);
}

// Thread `tid`'s share of [begin, end) for the distance pass: fold_thread_range's traversal.
template <DType DA, DType DB, bool kJsd, int kUnroll>
FK_HD void dist_thread_range(DistSums& d, const DistRow& r, int tid, int n_threads,
                             const uint8_t* a_vals, const uint8_t* b_vals, const Decode& da,
                             const Decode& db, int64_t begin, int64_t end, const Traversal& t) {
  const auto partial = [&](int64_t lo, int64_t hi) {
    float x[kVec], y[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const bool in = lo + j < hi;
      x[j] = in ? load_one<DA>(a_vals, lo + j, da) : -INFINITY;
      y[j] = in ? load_one<DB>(b_vals, lo + j, db) : -INFINITY;
    }
    dist_step<kJsd>(d, r, x, y);
  };
  if (tid == 0 && t.head > 0) partial(begin, t.body);
  int64_t st = tid;
  for (; st + (kUnroll - 1) * static_cast<int64_t>(n_threads) < t.n_steps;
       st += kUnroll * static_cast<int64_t>(n_threads)) {
    float x[kUnroll][kVec], y[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      load_pair<DA, DB>(a_vals, b_vals, t.body + (st + u * n_threads) * kVec, t.align_a,
                        t.align_b, da, db, x[u], y[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dist_step<kJsd>(d, r, x[u], y[u]);
  }
  for (; st < t.n_steps; st += n_threads) {
    float x[kVec], y[kVec];
    load_pair<DA, DB>(a_vals, b_vals, t.body + st * kVec, t.align_a, t.align_b, da, db, x, y);
    dist_step<kJsd>(d, r, x, y);
  }
  if (tid == n_threads - 1 && t.tail < end) partial(t.tail, end);
}

// tvd = 1/2 sum |p - q|, jsd = 1/4 sum (p + q) h(z); NaN for an invalid row (st: its state).
FK_HD void finish_dist(const DistSums& d, const double* st, double& tvd, double& jsd) {
  const bool valid = !is_nan(st[2]) && !is_nan(st[3]);
  tvd = valid ? 0.5 * d.tv : NAN;
  jsd = valid ? 0.25 * d.js : NAN;
}

}  // namespace cuda_detail
}  // namespace fk
