// The aarch64 NEON vector operations the row kernel (row_kernel.h) is written in: four float32
// lanes, the same algorithm as Avx2Ops (simd_ops.h): the magic-number round for 2^t, the same
// degree-5 polynomial, FMA where the AVX2 path has it. NEON (and FMA, fp16 conversion) is
// baseline on aarch64: the translation unit needs no target flags, so this header is only
// included by csrc/cpu/logit_stats_neon.cpp, which CMakeLists.txt builds on aarch64 alone.
#pragma once
#include <arm_neon.h>

#include <cstdint>
#include <limits>

#include "simd_ops.h"

namespace fk {
namespace {

struct NeonOps {
  using V = float32x4_t;
  static constexpr int W = 4;
  static const char* name() { return "neon"; }

  static V set1(float x) { return vdupq_n_f32(x); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
  static V sub(V a, V b) { return vsubq_f32(a, b); }
  static V fmadd(V a, V b, V c) { return vfmaq_f32(c, a, b); }  // a*b + c, one rounding
  // max/min that ignore a NaN in `x` (FMAXNM/FMINNM keep the number; pass 2 catches NaN).
  static V max(V x, V acc) { return vmaxnmq_f32(x, acc); }
  static V min(V x, V acc) { return vminnmq_f32(x, acc); }
  // max(lo, t) that keeps NaN (FMAX returns NaN if either operand is NaN).
  static V clamp_below(V t, float lo) { return vmaxq_f32(vdupq_n_f32(lo), t); }

  // 2^t for t <= ~0: exact 0 below 2^-126, NaN for NaN (as Avx2Ops::exp2).
  static V exp2(V t) { return exp2_in_range(vmaxq_f32(vdupq_n_f32(-127.0f), t)); }
  // exp2 without the clamp, bitwise the same for t in [-127, 1) (or NaN). The round to an
  // integer is the magic-number add (kExp2Magic); the sum's low bits, shifted left by 23,
  // are 2^n's exponent field (n = -127 gives 0 bits: the product is exactly 0).
  static constexpr bool kExp2Clamps = true;
  static V exp2_in_range(V t) {
    const V k = vaddq_f32(t, vdupq_n_f32(kExp2Magic));
    const V n = vsubq_f32(k, vdupq_n_f32(kExp2Magic));
    const V f = vsubq_f32(t, n);
    V p = vdupq_n_f32(kExp2C5);
    p = vfmaq_f32(vdupq_n_f32(kExp2C4), p, f);
    p = vfmaq_f32(vdupq_n_f32(kExp2C3), p, f);
    p = vfmaq_f32(vdupq_n_f32(kExp2C2), p, f);
    p = vfmaq_f32(vdupq_n_f32(kExp2C1), p, f);
    p = vfmaq_f32(vdupq_n_f32(kExp2C0), p, f);
    const uint32x4_t scale = vshlq_n_u32(vreinterpretq_u32_f32(k), 23);
    return vmulq_f32(p, vreinterpretq_f32_u32(scale));
  }
  // e != 0 (or NaN) ? e * d : 0
  static V mul_nonzero(V e, V d) {
    return vreinterpretq_f32_u32(
        vbicq_u32(vreinterpretq_u32_f32(vmulq_f32(e, d)), vceqzq_f32(e)));
  }
  // x > c ? v : 0 (0 for NaN x)
  static V select_gt(V x, float c, V v) {
    return vreinterpretq_f32_u32(
        vandq_u32(vcgtq_f32(x, vdupq_n_f32(c)), vreinterpretq_u32_f32(v)));
  }
  static float hmax(V v) { return vmaxnmvq_f32(v); }
  static float hmin(V v) { return vminnmvq_f32(v); }

  // For the optional outputs (issue 16). A compare's all-ones lanes are -1: subtracting them
  // counts (uint32 lanes: at most vocab / 4 each).
  using I = uint32x4_t;
  static I count_zero() { return vdupq_n_u32(0); }
  static I count_gt(V x, V m, I acc) { return vsubq_u32(acc, vcgtq_f32(x, m)); }
  static int64_t hsum_count(I c) { return static_cast<int64_t>(vaddlvq_u32(c)); }
  static void store(float* out, V v) { vst1q_f32(out, v); }
  static V mul(V a, V b) { return vmulq_f32(a, b); }
  static V div(V a, V b) { return vdivq_f32(a, b); }
  static V abs(V a) { return vabsq_f32(a); }
  // Natural log of positive normal floats, as Avx2Ops::log: exponent and mantissa from the
  // bits, the mantissa brought into [sqrt(1/2), sqrt(2)), then the atanh series (kLogC*).
  static V log(V x) {
    const uint32x4_t bits = vreinterpretq_u32_f32(x);
    int32x4_t e = vsubq_s32(vreinterpretq_s32_u32(vshrq_n_u32(bits, 23)), vdupq_n_s32(127));
    V m = vreinterpretq_f32_u32(
        vorrq_u32(vandq_u32(bits, vdupq_n_u32(0x007fffffu)), vdupq_n_u32(0x3f800000u)));
    const uint32x4_t big = vcgtq_f32(m, vdupq_n_f32(kSqrt2F));
    m = vbslq_f32(big, vmulq_f32(m, vdupq_n_f32(0.5f)), m);
    e = vsubq_s32(e, vreinterpretq_s32_u32(big));
    const V one = vdupq_n_f32(1.0f);
    const V s = vdivq_f32(vsubq_f32(m, one), vaddq_f32(m, one));
    const V s2 = vmulq_f32(s, s);
    V p = vfmaq_f32(vdupq_n_f32(kLogC7), vdupq_n_f32(kLogC9), s2);
    p = vfmaq_f32(vdupq_n_f32(kLogC5), p, s2);
    p = vfmaq_f32(vdupq_n_f32(kLogC3), p, s2);
    p = vfmaq_f32(one, p, s2);
    const V log_m = vmulq_f32(vaddq_f32(s, s), p);
    return vfmaq_f32(log_m, vcvtq_f32_s32(e), vdupq_n_f32(kLn2F));
  }
  static bool any_gt(V v, float c) { return vmaxvq_u32(vcgtq_f32(v, vdupq_n_f32(c))) != 0; }
  static V blend_gt(V x, float c, V a, V b) {  // x > c ? a : b
    return vbslq_f32(vcgtq_f32(x, vdupq_n_f32(c)), a, b);
  }

  template <DType D>
  static V load(const uint8_t* values, int64_t i, const RowDecode& dec) {
    if constexpr (D == DType::F32) {
      return vld1q_f32(reinterpret_cast<const float*>(values) + i);
    } else {
      // vld1 of uint8 then a reinterpret: no alignment assumed beyond a byte.
      const uint16x4_t h = vreinterpret_u16_u8(vld1_u8(values + 2 * i));
      if constexpr (D == DType::F16) return vcvt_f32_f16(vreinterpret_f16_u16(h));
      if constexpr (D == DType::BF16) return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
      if constexpr (D == DType::LLAMA_U16)
        return vfmaq_f32(vdupq_n_f32(dec.offset), vcvtq_f32_u32(vmovl_u16(h)),
                         vdupq_n_f32(dec.scale));
    }
  }
  // Index of the first lane equal to m, or -1: the compare narrowed to 16 bits a lane.
  static int first_eq(V v, float m) {
    const uint16x4_t eq = vmovn_u32(vceqq_f32(v, vdupq_n_f32(m)));
    const uint64_t bits = vget_lane_u64(vreinterpret_u64_u16(eq), 0);
    return bits ? __builtin_ctzll(bits) / 16 : -1;
  }
  static void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }

  struct DAcc {
    float64x2_t lo = vdupq_n_f64(0.0);
    float64x2_t hi = vdupq_n_f64(0.0);
  };
  static void flush(DAcc& acc, V& v) {
    acc.lo = vaddq_f64(acc.lo, vcvt_f64_f32(vget_low_f32(v)));
    acc.hi = vaddq_f64(acc.hi, vcvt_high_f64_f32(v));
    v = vdupq_n_f32(0.0f);
  }
  static double hsum(const DAcc& acc) {
    return (vgetq_lane_f64(acc.lo, 0) + vgetq_lane_f64(acc.lo, 1)) +
           (vgetq_lane_f64(acc.hi, 0) + vgetq_lane_f64(acc.hi, 1));
  }
};

}  // namespace
}  // namespace fk
