// Vector operations the row kernel is written in, one struct per instruction set.
// Each ISA translation unit includes this header with its own target flags; only the structs
// those flags allow are defined there. Everything lives in an anonymous namespace so no
// inline function compiled for AVX-512 can be picked by the linker for another path.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "fidelity_kld/dtype.h"

namespace fk {
namespace {

// 2^f on [-0.5, 0.5], degree-5 relative-error minimax fit (max rel. error 7.5e-8 in exact
// arithmetic, about 2 ulp when evaluated in float32 with FMA).
constexpr float kExp2C0 = 1.0000001192092896f;
constexpr float kExp2C1 = 0.6931469440460205f;
constexpr float kExp2C2 = 0.24022120237350464f;
constexpr float kExp2C3 = 0.05550713092088699f;
constexpr float kExp2C4 = 0.009675540961325169f;
constexpr float kExp2C5 = 0.001327647129073739f;

// 1.5 * 2^23 + 127: for t in [-127, 1), t + kExp2Magic rounds t to the nearest integer n (the
// float's spacing there is 1) and holds n + 127 in its low mantissa bits; shifted left by 23
// they are the exponent field of 2^n (the magic's own bits shift out of the 32-bit lane).
constexpr float kExp2Magic = 12583039.0f;

// log(m) on [sqrt(1/2), sqrt(2)) as 2*atanh(s), s = (m - 1)/(m + 1), |s| <= 0.1716: the series
// to s^9 (relative error 2e-9 in exact arithmetic). For the optional JSD pass only.
constexpr float kLogC3 = 1.0f / 3.0f;
constexpr float kLogC5 = 1.0f / 5.0f;
constexpr float kLogC7 = 1.0f / 7.0f;
constexpr float kLogC9 = 1.0f / 9.0f;
constexpr float kLn2F = 0.693147180559945309f;
constexpr float kSqrt2F = 1.41421356237309505f;

// ------------------------------------------------------------------------------------------
struct ScalarOps {
  using V = float;
  static constexpr int W = 1;
  static const char* name() { return "scalar"; }

  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V fmadd(V a, V b, V c) { return std::fma(a, b, c); }
  // max/min that ignore a NaN in `x` (pass 2 is where NaN is caught).
  static V max(V x, V acc) { return x > acc ? x : acc; }
  static V min(V x, V acc) { return x < acc ? x : acc; }
  // max(lo, t) that keeps NaN.
  static V clamp_below(V t, float lo) { return t < lo ? lo : t; }
  // 2^t, 0 below 2^-126 like the vector paths (and the GPU kernels): no subnormal terms.
  static V exp2(V t) { return t < -126.0f ? 0.0f : std::exp2(t); }
  static constexpr bool kExp2Clamps = false;  // exp2_in_range would save nothing
  static V exp2_in_range(V t) { return exp2(t); }
  // e != 0 (or NaN) ? e * d : 0
  static V mul_nonzero(V e, V d) { return e != 0.0f ? e * d : 0.0f; }
  // x > c ? v : 0
  static V select_gt(V x, float c, V v) { return x > c ? v : 0.0f; }
  static float hmax(V v) { return v; }
  static float hmin(V v) { return v; }

  // For the optional outputs (issue 16): lane counts, lanes to memory, and the JSD pass.
  using I = int64_t;
  static I count_zero() { return 0; }
  static I count_gt(V x, V m, I acc) { return acc + (x > m); }
  static int64_t hsum_count(I c) { return c; }
  static void store(float* out, V v) { *out = v; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V abs(V a) { return std::fabs(a); }
  static V log(V x) { return std::log(x); }  // x > 0
  static bool any_gt(V v, float c) { return v > c; }
  static V blend_gt(V x, float c, V a, V b) { return x > c ? a : b; }  // x > c ? a : b

  template <DType D>
  static V load(const uint8_t* values, int64_t i, const RowDecode& dec) {
    return load_scalar<D>(values, i, dec);
  }
  // Index of the first lane equal to m, or -1.
  static int first_eq(V v, float m) { return v == m ? 0 : -1; }
  static void prefetch(const void*) {}

  struct DAcc {
    double s = 0.0;
  };
  static void flush(DAcc& acc, V& v) {
    acc.s += static_cast<double>(v);
    v = 0.0f;
  }
  static double hsum(const DAcc& acc) { return acc.s; }
};

// ------------------------------------------------------------------------------------------
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Avx2Ops {
  using V = __m256;
  static constexpr int W = 8;
  static const char* name() { return "avx2"; }

  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V x, V acc) { return _mm256_max_ps(x, acc); }  // NaN in x: acc kept
  static V min(V x, V acc) { return _mm256_min_ps(x, acc); }
  static V clamp_below(V t, float lo) { return _mm256_max_ps(_mm256_set1_ps(lo), t); }  // NaN t kept

  // 2^t for t <= ~0: exact 0 below 2^-126, NaN for NaN.
  static V exp2(V t) { return exp2_in_range(_mm256_max_ps(_mm256_set1_ps(-127.0f), t)); }
  // exp2 without the clamp, bitwise the same for t in [-127, 1) (or NaN): the row kernel uses
  // it when every t of the row is known to be in range (kExp2Clamps: it saves an instruction).
  // The round to an integer is the magic-number add (kExp2Magic); the same sum's low bits,
  // shifted, are 2^n's exponent field: no round, no convert, no integer add, and bitwise the
  // results of round + convert (both round to nearest even).
  static constexpr bool kExp2Clamps = true;
  static V exp2_in_range(V t) {
    const V k = _mm256_add_ps(t, _mm256_set1_ps(kExp2Magic));
    const V n = _mm256_sub_ps(k, _mm256_set1_ps(kExp2Magic));
    const V f = _mm256_sub_ps(t, n);
    V p = _mm256_set1_ps(kExp2C5);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C0));
    // n = -127 encodes as exponent bits 0: the product is exactly 0.
    const __m256i scale = _mm256_slli_epi32(_mm256_castps_si256(k), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
  }
  static V mul_nonzero(V e, V d) {
    const V nz = _mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_NEQ_UQ);
    return _mm256_and_ps(nz, _mm256_mul_ps(e, d));
  }
  static V select_gt(V x, float c, V v) {
    return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(c), _CMP_GT_OQ), v);
  }
  static float hmax(V v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hmin(V v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }

  // For the optional outputs (issue 16). A compare's all-ones lanes are -1: subtracting them
  // counts (int32 lanes: at most vocab / 8 each).
  using I = __m256i;
  static I count_zero() { return _mm256_setzero_si256(); }
  static I count_gt(V x, V m, I acc) {
    return _mm256_sub_epi32(acc, _mm256_castps_si256(_mm256_cmp_ps(x, m, _CMP_GT_OQ)));
  }
  static int64_t hsum_count(I c) {
    alignas(32) int32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), c);
    int64_t sum = 0;
    for (int32_t x : t) sum += x;
    return sum;
  }
  static void store(float* out, V v) { _mm256_storeu_ps(out, v); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  // Natural log of positive normal floats: exponent and mantissa from the bits, the mantissa
  // brought into [sqrt(1/2), sqrt(2)), then the atanh series (kLogC*).
  static V log(V x) {
    const __m256i bits = _mm256_castps_si256(x);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
    V m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                              _mm256_set1_epi32(0x3f800000)));
    const V big = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrt2F), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
    e = _mm256_sub_epi32(e, _mm256_castps_si256(big));
    const V one = _mm256_set1_ps(1.0f);
    const V s = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
    const V s2 = _mm256_mul_ps(s, s);
    V p = _mm256_fmadd_ps(_mm256_set1_ps(kLogC9), s2, _mm256_set1_ps(kLogC7));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(kLogC5));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(kLogC3));
    p = _mm256_fmadd_ps(p, s2, one);
    const V log_m = _mm256_mul_ps(_mm256_add_ps(s, s), p);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(e), _mm256_set1_ps(kLn2F), log_m);
  }
  static bool any_gt(V v, float c) {
    return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(c), _CMP_GT_OQ)) != 0;
  }
  static V blend_gt(V x, float c, V a, V b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_set1_ps(c), _CMP_GT_OQ));
  }

  template <DType D>
  static V load(const uint8_t* values, int64_t i, const RowDecode& dec) {
    if constexpr (D == DType::F32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(values) + i);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values + 2 * i));
      if constexpr (D == DType::F16) return _mm256_cvtph_ps(h);
      if constexpr (D == DType::BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      if constexpr (D == DType::LLAMA_U16)
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(h)),
                               _mm256_set1_ps(dec.scale), _mm256_set1_ps(dec.offset));
    }
  }
  static int first_eq(V v, float m) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(m), _CMP_EQ_OQ));
    return mask ? __builtin_ctz(static_cast<unsigned>(mask)) : -1;
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

  struct DAcc {
    __m256d lo = _mm256_setzero_pd();
    __m256d hi = _mm256_setzero_pd();
  };
  static void flush(DAcc& acc, V& v) {
    acc.lo = _mm256_add_pd(acc.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    acc.hi = _mm256_add_pd(acc.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    v = _mm256_setzero_ps();
  }
  static double hsum(const DAcc& acc) {
    alignas(32) double t[4];
    _mm256_store_pd(t, _mm256_add_pd(acc.lo, acc.hi));
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
};
#endif

// ------------------------------------------------------------------------------------------
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
struct Avx512Ops {
  using V = __m512;
  static constexpr int W = 16;
  static const char* name() { return "avx512"; }

  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V max(V x, V acc) { return _mm512_max_ps(x, acc); }
  static V min(V x, V acc) { return _mm512_min_ps(x, acc); }
  static V clamp_below(V t, float lo) { return _mm512_max_ps(_mm512_set1_ps(lo), t); }

  // 2^t: scalef does the exponent (exact 0 on underflow, NaN stays NaN).
  static V exp2(V t) {
    const V n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(t, n);
    V p = _mm512_set1_ps(kExp2C5);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C0));
    return _mm512_scalef_ps(p, n);
  }
  static constexpr bool kExp2Clamps = false;
  static V exp2_in_range(V t) { return exp2(t); }
  static V mul_nonzero(V e, V d) {
    const __mmask16 nz = _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    return _mm512_maskz_mul_ps(nz, e, d);
  }
  static V select_gt(V x, float c, V v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(c), _CMP_GT_OQ), v);
  }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static float hmin(V v) { return _mm512_reduce_min_ps(v); }

  // For the optional outputs (issue 16): counts in int32 lanes (at most vocab / 16 each).
  using I = __m512i;
  static I count_zero() { return _mm512_setzero_si512(); }
  static I count_gt(V x, V m, I acc) {
    return _mm512_mask_sub_epi32(acc, _mm512_cmp_ps_mask(x, m, _CMP_GT_OQ), acc,
                                 _mm512_set1_epi32(-1));
  }
  static int64_t hsum_count(I c) { return _mm512_reduce_add_epi32(c); }
  static void store(float* out, V v) { _mm512_storeu_ps(out, v); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  // Natural log of positive normal floats: getexp/getmant, the mantissa brought into
  // [sqrt(1/2), sqrt(2)), then the atanh series (kLogC*).
  static V log(V x) {
    V e = _mm512_getexp_ps(x);
    V m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
    const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrt2F), _CMP_GT_OQ);
    const V one = _mm512_set1_ps(1.0f);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, one);
    const V s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
    const V s2 = _mm512_mul_ps(s, s);
    V p = _mm512_fmadd_ps(_mm512_set1_ps(kLogC9), s2, _mm512_set1_ps(kLogC7));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(kLogC5));
    p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(kLogC3));
    p = _mm512_fmadd_ps(p, s2, one);
    const V log_m = _mm512_mul_ps(_mm512_add_ps(s, s), p);
    return _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2F), log_m);
  }
  static bool any_gt(V v, float c) {
    return _mm512_cmp_ps_mask(v, _mm512_set1_ps(c), _CMP_GT_OQ) != 0;
  }
  static V blend_gt(V x, float c, V a, V b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(c), _CMP_GT_OQ), b, a);
  }

  template <DType D>
  static V load(const uint8_t* values, int64_t i, const RowDecode& dec) {
    if constexpr (D == DType::F32) {
      return _mm512_loadu_ps(reinterpret_cast<const float*>(values) + i);
    } else {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 2 * i));
      if constexpr (D == DType::F16) return _mm512_cvtph_ps(h);
      if constexpr (D == DType::BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      if constexpr (D == DType::LLAMA_U16)
        return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(h)),
                               _mm512_set1_ps(dec.scale), _mm512_set1_ps(dec.offset));
    }
  }
  static int first_eq(V v, float m) {
    const __mmask16 mask = _mm512_cmp_ps_mask(v, _mm512_set1_ps(m), _CMP_EQ_OQ);
    return mask ? __builtin_ctz(static_cast<unsigned>(mask)) : -1;
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

  struct DAcc {
    __m512d lo = _mm512_setzero_pd();
    __m512d hi = _mm512_setzero_pd();
  };
  static void flush(DAcc& acc, V& v) {
    acc.lo = _mm512_add_pd(acc.lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    acc.hi = _mm512_add_pd(
        acc.hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    v = _mm512_setzero_ps();
  }
  static double hsum(const DAcc& acc) {
    alignas(64) double t[8];
    _mm512_store_pd(t, _mm512_add_pd(acc.lo, acc.hi));
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  }
};
#endif

}  // namespace
}  // namespace fk
