// The row kernel, written once over a vector-ops struct S (simd_ops.h) and instantiated in
// one translation unit per instruction set.
//
// Per row, two passes over the pair, whole when the pair is at most 256 KB (it stays in L2;
// the next row is prefetched during the second pass), else one vocabulary tile of 1024
// entries at a time (both passes on a tile while it is in L1; see "Vocabulary tiles"):
//   1. max and min of each side (the max is the softmax shift; the min says whether the fast
//      path is safe: no -inf, no overflow of x*log2(e) - shift).
//   2. with t = x*log2(e) - shift in float32 lanes (exact at the max up to the rounding c of
//      the shift, which is corrected in double), e = 2^t and d = t_ref - t_q:
//        S_ref = sum e_ref, S_q = sum e_q, T_rq = sum e_ref*d, T_qr = sum e_q*d,
//        H = sum e_ref*t_ref.
//      Lane sums are flushed to float64 every kFlushEvery vectors, so no float32 lane ever adds
//      more than 16 terms: the error of S is that of float64 plus a few float32 roundings.
// Finished in float64:
//   KL(P||Q) = ln2*T_rq/S_ref + log(S_q/S_ref)   (each term small when P ~ Q: no cancellation
//   between large lse values), KL(Q||P) = -ln2*T_qr/S_q + log(S_ref/S_q),
//   lse = max + log(S) - ln2*c, entropy = log(S_ref) - ln2*H/S_ref.
// Optional outputs (issue 16), in an instantiation of their own (rows<true>, chosen once per
// call), so the default path's code is what it was:
//   in pass 1, per side and lane: the second largest entry as a multiset (m2 = max(m2,
//      min(x, m1)) before m1 takes x; lanes merged at the end) and, with labels, how many
//      entries exceed the label's value (its rank); top2 and the label's margin follow.
//   3. tvd/jsd only: p_i = 2^((x_i - max)*log2e) * 2^c/S_ref (and q_i likewise), summed as
//      |p - q| and, for jsd, s*g(r) with s = p + q, r = |p - q|/s, g(r) = (1+r)ln(1+r) +
//      (1-r)ln(1-r) (JSD = sum s*g/4): a series in r^2 where r is small (no cancellation for
//      near-identical rows), the logs where it is not.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fidelity_kld/logit_stats.h"
#include "simd_ops.h"

namespace fk {
namespace {

constexpr float kLog2eF = 1.44269504088896340736f;
// 1/float(log2 e) rather than ln 2: t*kLn2Eff recovers x - max exactly as the kernel saw it.
constexpr double kLn2Eff = 1.0 / static_cast<double>(kLog2eF);
constexpr int kFlushEvery = 16;
// Below this many nats under the max, an entry's weight is 0 in float32 anyway.
constexpr float kMaskedFloor = -200.0f;
constexpr float kLlamaWindow = -16.0f;  // llama.cpp sums KLD over decoded log-probs > -16
// A row whose max - min is at most this many nats has every t = x*log2e - shift in
// [-116, 1): 2^t needs no clamp (S::exp2_in_range), with bitwise the same result.
constexpr float kNarrowRange = 80.0f;
// JSD's g(r): the series sum_k r^(2k) / (k (2k - 1)) up to k = 6 for r <= this (truncation
// below 1e-9 relative), the logs above it (where they cancel by at most a factor of 5).
constexpr float kJsdSeriesMax = 0.25f;

// Prefetches [p, p + bytes) into L2, one hint per 64-byte line.
template <class S>
inline void prefetch_lines(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) S::prefetch(p + off);
}

struct RowInput {
  const uint8_t* values;
  RowDecode dec;
};

template <class S, DType D>
inline RowInput row_input(const uint8_t* base, int64_t stride, int64_t r) {
  const uint8_t* row = base + r * stride;
  return RowInput{row + dtype_row_header(D), read_row_header<D>(row)};
}

struct MaxMin {
  float max;
  float min;
};

// Entries [lo, hi) of a row for pass 2, and how many entries of the rows it prefetches into
// L2 meanwhile (next_len from each next pointer: the next tile, or the next row's first).
struct Span {
  int64_t lo, hi, next_len;
};

// Index of the first entry equal to the row's max m. Four vectors at a time: their lane-wise
// max holds m somewhere only if one of them does (rows with a NaN never get here: finish
// flags them first), and only that block is searched vector by vector.
template <class S, DType D>
inline int32_t first_index_of(const RowInput& in, int64_t vocab, float m) {
  constexpr int64_t kStep = 4 * S::W;
  const int64_t block_end = vocab - vocab % kStep;
  const int64_t vec_end = vocab - vocab % S::W;
  int64_t i = 0;
  for (; i < block_end; i += kStep) {
    const auto load = [&](int64_t k) { return S::template load<D>(in.values, i + k * S::W, in.dec); };
    if (S::first_eq(S::max(S::max(load(0), load(1)), S::max(load(2), load(3))), m) >= 0) break;
  }
  for (; i < vec_end; i += S::W) {
    const int lane = S::first_eq(S::template load<D>(in.values, i, in.dec), m);
    if (lane >= 0) return static_cast<int32_t>(i + lane);
  }
  for (; i < vocab; ++i)
    if (load_scalar<D>(in.values, i, in.dec) == m) return static_cast<int32_t>(i);
  return -1;
}

template <class S, DType DA, DType DB>
struct RowKernel {
  using V = typename S::V;

  struct Sums {
    double s_ref = 0, s_q = 0, t_rq = 0, t_qr = 0, h = 0, w_t = 0, w_s = 0;
  };

  // Pass 1's optional part (issue 16), per side: the second largest entry as a multiset and
  // how many entries exceed the label's value.
  struct Top {
    float second = -std::numeric_limits<float>::infinity();
    int64_t n_gt = 0;
  };

  // Lane state of one chain of pass 1's optional part: m2 is the lane's second largest as a
  // multiset (the smaller of x and the lane max before x), n_gt its count above the label.
  template <bool kSecond, bool kRank>
  struct TopLanes {
    V m2 = S::set1(-std::numeric_limits<float>::infinity());
    typename S::I n_gt = S::count_zero();
    // Before the max takes x (m1: the lane max so far).
    void step(V x, V m1, V label) {
      if constexpr (kSecond) m2 = S::max(S::min(x, m1), m2);
      if constexpr (kRank) n_gt = S::count_gt(x, label, n_gt);
    }
    // Both chains' lanes (lane maxima m1, m1b) into one side's Top, before the scalar tail.
    Top reduce(V m1, const TopLanes& b, V m1b) const {
      Top t;
      if constexpr (kSecond) {
        alignas(64) float hi[S::W], lo[S::W];
        S::store(hi, S::max(m1, m1b));
        S::store(lo, S::max(S::min(m1, m1b), S::max(m2, b.m2)));
        float top = -std::numeric_limits<float>::infinity();
        for (int l = 0; l < S::W; ++l) {
          t.second = std::max(t.second, std::max(std::min(top, hi[l]), lo[l]));
          top = std::max(top, hi[l]);
        }
      }
      if constexpr (kRank) t.n_gt = S::hsum_count(n_gt) + S::hsum_count(b.n_gt);
      return t;
    }
  };

  // One scalar tail entry x into a side's Top, before its max takes x.
  template <bool kSecond, bool kRank>
  static void top_tail(Top& t, float x, float max, float label) {
    if constexpr (kSecond) t.second = std::max(t.second, std::min(x, max));
    if constexpr (kRank) t.n_gt += x > label;
  }

  // Two vectors a step, each into its own max and min (the max/min chains' latency, not the
  // loads, would set the pace); max and min are exact, so the split changes no result.
  // kSecond/kRank (the optional outputs) also fill top_a/top_b, with the labels' values.
  template <bool kSecond = false, bool kRank = false>
  static void pass1(const RowInput& a, const RowInput& b, int64_t vocab, MaxMin& ma,
                    MaxMin& mb, Top* top_a = nullptr, Top* top_b = nullptr, float label_a = 0,
                    float label_b = 0) {
    const float inf = std::numeric_limits<float>::infinity();
    V mxa = S::set1(-inf), mna = S::set1(inf), mxb = S::set1(-inf), mnb = S::set1(inf);
    V mxa2 = mxa, mna2 = mna, mxb2 = mxb, mnb2 = mnb;
    constexpr bool kTop = kSecond || kRank;
    [[maybe_unused]] TopLanes<kSecond, kRank> la, la2, lb, lb2;
    [[maybe_unused]] const V label_av = S::set1(label_a), label_bv = S::set1(label_b);
    const int64_t pair_end = vocab - vocab % (2 * S::W);
    const int64_t vec_end = vocab - vocab % S::W;
    int64_t i = 0;
    for (; i < pair_end; i += 2 * S::W) {
      const V x = S::template load<DA>(a.values, i, a.dec);
      const V y = S::template load<DB>(b.values, i, b.dec);
      const V x2 = S::template load<DA>(a.values, i + S::W, a.dec);
      const V y2 = S::template load<DB>(b.values, i + S::W, b.dec);
      if constexpr (kTop) {
        la.step(x, mxa, label_av);
        lb.step(y, mxb, label_bv);
        la2.step(x2, mxa2, label_av);
        lb2.step(y2, mxb2, label_bv);
      }
      mxa = S::max(x, mxa);
      mna = S::min(x, mna);
      mxb = S::max(y, mxb);
      mnb = S::min(y, mnb);
      mxa2 = S::max(x2, mxa2);
      mna2 = S::min(x2, mna2);
      mxb2 = S::max(y2, mxb2);
      mnb2 = S::min(y2, mnb2);
    }
    for (; i < vec_end; i += S::W) {
      const V x = S::template load<DA>(a.values, i, a.dec);
      const V y = S::template load<DB>(b.values, i, b.dec);
      if constexpr (kTop) {
        la.step(x, mxa, label_av);
        lb.step(y, mxb, label_bv);
      }
      mxa = S::max(x, mxa);
      mna = S::min(x, mna);
      mxb = S::max(y, mxb);
      mnb = S::min(y, mnb);
    }
    ma = {S::hmax(S::max(mxa2, mxa)), S::hmin(S::min(mna2, mna))};
    mb = {S::hmax(S::max(mxb2, mxb)), S::hmin(S::min(mnb2, mnb))};
    if constexpr (kTop) {
      *top_a = la.reduce(mxa, la2, mxa2);
      *top_b = lb.reduce(mxb, lb2, mxb2);
    }
    for (; i < vocab; ++i) {
      const float x = load_scalar<DA>(a.values, i, a.dec);
      const float y = load_scalar<DB>(b.values, i, b.dec);
      if constexpr (kTop) {
        top_tail<kSecond, kRank>(*top_a, x, ma.max, label_a);
        top_tail<kSecond, kRank>(*top_b, y, mb.max, label_b);
      }
      if (x > ma.max) ma.max = x;
      if (x < ma.min) ma.min = x;
      if (y > mb.max) mb.max = y;
      if (y < mb.min) mb.min = y;
    }
  }

  // One side's max and min (pass 1 for the reference when several models share it); the
  // same values pass1 gives, which reduces both sides in one loop (and the same Top).
  template <DType D, bool kSecond = false, bool kRank = false>
  static MaxMin maxmin(const RowInput& a, int64_t vocab, Top* top = nullptr, float label = 0) {
    Scan<D, kSecond, kRank> scan;  // the whole row as one tile
    scan.set_label(label);
    const float min = scan.tile(a, 0, vocab, true);
    if constexpr (kSecond || kRank) *top = scan.top;
    return {scan.max, min};
  }

  // Pass 2 for G models against one reference row: the reference's terms (t_ref, e_ref,
  // S_ref, H, W_s) once, each model's (t_q, e_q, d, S_q, T_rq, T_qr, W_t) in its own lanes,
  // in the same order whatever G is, so a model's sums are bitwise those of G = 1.
  // kMasked: t = (x - max)*log2e (two roundings, no shift residual); otherwise
  // t = fma(x, log2e, -shift), which is off by the residual c of the shift.
  // kNarrow (not with kMasked): every t is in S::exp2_in_range's range (narrow).
  template <bool kMasked, bool kLlama, bool kNarrow, int G>
  static void pass2(const RowInput& a, const RowInput* b, const Span& span, float shift_a,
                    const float* shift_b, float max_a, const float* max_b, const uint8_t* next_a,
                    const uint8_t* const* next_b, Sums* out) {
    const V log2e = S::set1(kLog2eF), neg_sa = S::set1(-shift_a), max_av = S::set1(max_a),
            zero = S::set1(0);
    V neg_sb[G], max_bv[G];
    V s_ref = zero, h = zero, w_s = zero, s_q[G], t_rq[G], t_qr[G], w_t[G];
    typename S::DAcc d_s_ref, d_h, d_w_s, d_s_q[G], d_t_rq[G], d_t_qr[G], d_w_t[G];
    for (int j = 0; j < G; ++j) {
      neg_sb[j] = S::set1(-shift_b[j]);
      max_bv[j] = S::set1(max_b[j]);
      s_q[j] = t_rq[j] = t_qr[j] = w_t[j] = zero;
    }
    const auto flush_all = [&] {
      S::flush(d_s_ref, s_ref);
      S::flush(d_h, h);
      if constexpr (kLlama) S::flush(d_w_s, w_s);
      for (int j = 0; j < G; ++j) {
        S::flush(d_s_q[j], s_q[j]);
        S::flush(d_t_rq[j], t_rq[j]);
        S::flush(d_t_qr[j], t_qr[j]);
        if constexpr (kLlama) S::flush(d_w_t[j], w_t[j]);
      }
    };
    // One vector of entries [i, i + W) into the float32 lane sums.
    const auto step = [&](int64_t i) {
      const V x = S::template load<DA>(a.values, i, a.dec);
      const V ta = kMasked ? S::fmadd(S::sub(x, max_av), log2e, zero) : S::fmadd(x, log2e, neg_sa);
      const V ta_c = kMasked ? S::clamp_below(ta, kMaskedFloor) : ta;
      const V ea = kNarrow ? S::exp2_in_range(ta_c) : S::exp2(ta_c);
      s_ref = S::add(s_ref, ea);
      h = S::fmadd(ea, ta_c, h);
      if constexpr (kLlama) w_s = S::add(w_s, S::select_gt(x, kLlamaWindow, ea));
      for (int j = 0; j < G; ++j) {
        const V y = S::template load<DB>(b[j].values, i, b[j].dec);
        const V tb = kMasked ? S::fmadd(S::sub(y, max_bv[j]), log2e, zero)
                             : S::fmadd(y, log2e, neg_sb[j]);
        const V d = S::sub(ta, tb);
        if constexpr (kMasked) {
          const V eb = S::exp2(S::clamp_below(tb, kMaskedFloor));
          s_q[j] = S::add(s_q[j], eb);
          const V ea_d = S::mul_nonzero(ea, d);
          t_rq[j] = S::add(t_rq[j], ea_d);
          t_qr[j] = S::add(t_qr[j], S::mul_nonzero(eb, d));
          if constexpr (kLlama) w_t[j] = S::add(w_t[j], S::select_gt(x, kLlamaWindow, ea_d));
        } else {
          const V eb = kNarrow ? S::exp2_in_range(tb) : S::exp2(tb);
          s_q[j] = S::add(s_q[j], eb);
          t_rq[j] = S::fmadd(ea, d, t_rq[j]);
          t_qr[j] = S::fmadd(eb, d, t_qr[j]);
          if constexpr (kLlama)
            w_t[j] = S::add(w_t[j], S::select_gt(x, kLlamaWindow, S::fmadd(ea, d, zero)));
        }
      }
    };
    // Blocks of kFlushEvery vectors: the loop body is the arithmetic alone (no counter, no
    // branch to the flush, no per-vector prefetch); the next row's lines for the block are
    // prefetched once per cache line, before the block.
    constexpr int64_t kBlock = int64_t{kFlushEvery} * S::W;
    const int64_t n = span.hi - span.lo;
    const int64_t vec_end = span.lo + (n - n % S::W);
    const int64_t block_end = span.lo + (n - n % kBlock);
    int64_t i = span.lo;
    for (; i < block_end; i += kBlock) {
      const int64_t at = i - span.lo;
      if (next_a && at < span.next_len) {
        prefetch_lines<S>(next_a + at * dtype_size(DA), kBlock * dtype_size(DA));
        for (int j = 0; j < G; ++j) prefetch_lines<S>(next_b[j] + at * dtype_size(DB), kBlock * dtype_size(DB));
      }
      for (int64_t k = 0; k < kBlock; k += S::W) step(i + k);
      flush_all();
    }
    for (; i < vec_end; i += S::W) step(i);
    flush_all();
    for (int j = 0; j < G; ++j) {
      out[j] = Sums{};
      out[j].s_ref = S::hsum(d_s_ref);
      out[j].h = S::hsum(d_h);
      out[j].s_q = S::hsum(d_s_q[j]);
      out[j].t_rq = S::hsum(d_t_rq[j]);
      out[j].t_qr = S::hsum(d_t_qr[j]);
      if constexpr (kLlama) {
        out[j].w_s = S::hsum(d_w_s);
        out[j].w_t = S::hsum(d_w_t[j]);
      }
    }
    // Tail: scalar, straight into float64, same formulas.
    for (; i < span.hi; ++i) {
      const float x = load_scalar<DA>(a.values, i, a.dec);
      const float ta = kMasked ? (x - max_a) * kLog2eF : std::fma(x, kLog2eF, -shift_a);
      const float ta_c = ta < kMaskedFloor ? kMaskedFloor : ta;
      // float exp2, so weights below 2^-149 are exactly 0 as in the vector loop.
      const double ea = std::exp2(ta_c);
      for (int j = 0; j < G; ++j) {
        const float y = load_scalar<DB>(b[j].values, i, b[j].dec);
        const float tb = kMasked ? (y - max_b[j]) * kLog2eF : std::fma(y, kLog2eF, -shift_b[j]);
        const float d = ta - tb;
        const float tb_c = tb < kMaskedFloor ? kMaskedFloor : tb;
        const double eb = std::exp2(tb_c);
        Sums& o = out[j];
        o.s_ref += ea;
        o.s_q += eb;
        const double ea_d = ea != 0.0 ? ea * d : 0.0;
        o.t_rq += ea_d;
        o.t_qr += eb != 0.0 ? eb * d : 0.0;
        o.h += ea * ta_c;
        if (kLlama && x > kLlamaWindow) {
          o.w_t += ea_d;
          o.w_s += ea;
        }
      }
    }
  }

  static void write_invalid(const LogitStatsParams& p, int64_t r) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    p.kld[r] = p.kld_reverse[r] = p.lse_ref[r] = p.lse_q[r] = p.entropy_ref[r] = nan;
    p.top1_ref[r] = p.top1_q[r] = -1;
    if (p.labels) p.nll_ref[r] = p.nll_q[r] = p.p_ref_y[r] = p.p_q_y[r] = nan;
    if (p.kld_llama) p.kld_llama[r] = nan;
  }

  // Fast path: every t finite and far from overflow. Otherwise the masked variant zeroes
  // 0 * inf terms (p_i = 0 where the other side is -inf). It also takes rows whose max is
  // so large that the shift's residual c (up to half an ulp of max*log2e) is not small:
  // 2^c overflows from |max| ~ 1e10 and would make a finite row NaN.
  static bool needs_mask(const MaxMin& ma, const MaxMin& mb) {
    constexpr float kMaxRange = 1e30f;
    constexpr float kMaxShifted = 1048576.0f;  // 2^20: |c| <= 2^-4
    return !(std::isfinite(ma.min) && std::isfinite(mb.min) && ma.max - ma.min < kMaxRange &&
             mb.max - mb.min < kMaxRange && std::fabs(ma.max) < kMaxShifted &&
             std::fabs(mb.max) < kMaxShifted);
  }

  static bool narrow(const MaxMin& m) { return m.max - m.min <= kNarrowRange; }

  // pass2 for G models with finite maxima; masked only with G = 1.
  // ma/mb: the maxima for the shift and the minima of the entries of span (narrow).
  template <int G>
  static void run_pass2(bool llama, bool masked, const RowInput& a, const RowInput* b,
                        const Span& span, const MaxMin& ma, const MaxMin* mb,
                        const uint8_t* next_a, const uint8_t* const* next_b, Sums* out) {
    float shift_b[G], max_b[G];
    bool in_range = S::kExp2Clamps && !masked && narrow(ma);
    for (int j = 0; j < G; ++j) {
      shift_b[j] = mb[j].max * kLog2eF;
      max_b[j] = mb[j].max;
      in_range = in_range && narrow(mb[j]);
    }
    const float shift_a = ma.max * kLog2eF;
    if constexpr (G == 1) {
      if (masked) {
        if (llama)
          pass2<true, true, false, 1>(a, b, span, shift_a, shift_b, ma.max, max_b, next_a,
                                      next_b, out);
        else
          pass2<true, false, false, 1>(a, b, span, shift_a, shift_b, ma.max, max_b, next_a,
                                       next_b, out);
        return;
      }
    }
    const auto run = [&](auto llama_tag, auto narrow_tag) {
      pass2<false, decltype(llama_tag)::value, decltype(narrow_tag)::value, G>(
          a, b, span, shift_a, shift_b, ma.max, max_b, next_a, next_b, out);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (in_range) {
      if constexpr (S::kExp2Clamps) {
        if (llama) run(Yes{}, Yes{});
        else run(No{}, Yes{});
        return;
      }
    }
    if (llama) run(Yes{}, No{});
    else run(No{}, No{});
  }

  template <bool kExtra>
  static void row_untiled(const LogitStatsParams& p, int64_t r, int64_t r_end) {
    const auto* base_a = static_cast<const uint8_t*>(p.ref);
    const auto* base_b = static_cast<const uint8_t*>(p.q);
    const RowInput a = row_input<S, DA>(base_a, p.ref_row_stride, r);
    const RowInput b = row_input<S, DB>(base_b, p.q_row_stride, r);
    const bool has_next = r + 1 < r_end;
    const uint8_t* next_a =
        has_next ? base_a + (r + 1) * p.ref_row_stride + dtype_row_header(DA) : nullptr;
    const uint8_t* next_b =
        has_next ? base_b + (r + 1) * p.q_row_stride + dtype_row_header(DB) : nullptr;

    MaxMin ma, mb;
    [[maybe_unused]] Top top_a, top_b;
    if constexpr (kExtra) {
      const float label_a = label_value<DA>(p, a, r), label_b = label_value<DB>(p, b, r);
      with_top_flags(p, [&](auto second, auto rank) {
        pass1<decltype(second)::value, decltype(rank)::value>(a, b, p.vocab, ma, mb, &top_a,
                                                              &top_b, label_a, label_b);
      });
    } else {
      pass1(a, b, p.vocab, ma, mb);
    }
    if (!std::isfinite(ma.max) || !std::isfinite(mb.max)) {  // +inf, all -inf, or all NaN
      write_invalid(p, r);
      if constexpr (kExtra) write_invalid_extra(p, r);
      return;
    }
    const bool masked = needs_mask(ma, mb);
    Sums s;
    run_pass2<1>(p.llama_parity, masked, a, &b, Span{0, p.vocab, p.vocab}, ma, &mb, next_a,
                 &next_b, &s);
    finish(p, r, a, b, ma, mb, masked, s);
    if constexpr (kExtra) extras(p, r, a, b, ma, mb, masked, s, top_a, top_b);
  }

  // Several models against one reference (the same ref, labels and mode in every params):
  // the reference's pass 1 and its pass-2 terms are computed once for up to kGroup models at
  // a time. Each model's outputs are bitwise those of row(): the same max and min, the same
  // pass-2 operations in the same order, the same finish. Models whose row needs the masked
  // path (and every model, when the reference's does) go through it one at a time.
  static constexpr int kGroup = 4;

  template <bool kExtra>
  static void row_multi_untiled(const LogitStatsParams* ps, int m, int64_t r, int64_t r_end) {
    const LogitStatsParams& p0 = ps[0];
    const auto* base_a = static_cast<const uint8_t*>(p0.ref);
    const RowInput a = row_input<S, DA>(base_a, p0.ref_row_stride, r);
    const bool has_next = r + 1 < r_end;
    const uint8_t* next_a =
        has_next ? base_a + (r + 1) * p0.ref_row_stride + dtype_row_header(DA) : nullptr;
    [[maybe_unused]] Top top_a;
    const MaxMin ma = side_maxmin<DA, kExtra>(p0, a, r, top_a);
    if (!std::isfinite(ma.max)) {  // the reference row is invalid: so is every model's
      for (int j = 0; j < m; ++j) {
        write_invalid(ps[j], r);
        if constexpr (kExtra) write_invalid_extra(ps[j], r);
      }
      return;
    }
    int idx[kGroup];
    RowInput b[kGroup];
    MaxMin mb[kGroup];
    [[maybe_unused]] Top top_b[kGroup];
    const uint8_t* next_b[kGroup];
    int g = 0;
    const auto flush_group = [&](int count) {
      Sums s[kGroup];
      const bool llama = p0.llama_parity;
      const Span span{0, p0.vocab, p0.vocab};
      for (int i = 0; i < count;) {  // groups of 4, then 2, then 1
        const int k = count - i >= 4 ? 4 : (count - i >= 2 ? 2 : 1);
        if (k == 4)
          run_pass2<4>(llama, false, a, b + i, span, ma, mb + i, next_a, next_b + i, s + i);
        else if (k == 2)
          run_pass2<2>(llama, false, a, b + i, span, ma, mb + i, next_a, next_b + i, s + i);
        else
          run_pass2<1>(llama, false, a, b + i, span, ma, mb + i, next_a, next_b + i, s + i);
        i += k;
      }
      for (int j = 0; j < count; ++j) {
        finish(ps[idx[j]], r, a, b[j], ma, mb[j], false, s[j]);
        if constexpr (kExtra) extras(ps[idx[j]], r, a, b[j], ma, mb[j], false, s[j], top_a, top_b[j]);
      }
    };
    for (int j = 0; j < m; ++j) {
      const LogitStatsParams& p = ps[j];
      const auto* base_b = static_cast<const uint8_t*>(p.q);
      const RowInput bj = row_input<S, DB>(base_b, p.q_row_stride, r);
      const uint8_t* nb =
          has_next ? base_b + (r + 1) * p.q_row_stride + dtype_row_header(DB) : nullptr;
      [[maybe_unused]] Top top_bj;
      const MaxMin mbj = side_maxmin<DB, kExtra>(p, bj, r, top_bj);
      if (!std::isfinite(mbj.max)) {
        write_invalid(p, r);
        if constexpr (kExtra) write_invalid_extra(p, r);
        continue;
      }
      if (needs_mask(ma, mbj)) {
        Sums s;
        run_pass2<1>(p.llama_parity, true, a, &bj, Span{0, p.vocab, p.vocab}, ma, &mbj, next_a,
                     &nb, &s);
        finish(p, r, a, bj, ma, mbj, true, s);
        if constexpr (kExtra) extras(p, r, a, bj, ma, mbj, true, s, top_a, top_bj);
        continue;
      }
      idx[g] = j;
      b[g] = bj;
      mb[g] = mbj;
      if constexpr (kExtra) top_b[g] = top_bj;
      next_b[g] = nb;
      if (++g == kGroup) {
        flush_group(g);
        g = 0;
      }
    }
    if (g) flush_group(g);
  }


  // ---- Vocabulary tiles (issue 17) ------------------------------------------------------
  //
  // A row pair larger than kWholePairBytes is taken a tile of kTile entries at a time: pass
  // 1 then pass 2 on each tile while it is in L1, instead of pass 1 over the whole row and
  // pass 2 over it again, from L3 or memory once the rows are larger than L2 (a float16 pair
  // at V = 152064 is 608 KB, more than Zen 3's 512 KB L2; a float32 pair with the next row
  // prefetched is 2.4 MB). Measured (benchmarks/RESULTS.md, issue 17): at V = 152064 on the
  // AVX2 path 1.13x (float16) and 1.8x (float32) the rate of the untiled rows; tiles of 1024
  // beat 2048, 4096, 8192 and 16384 there (a float32 pair's tile is 8 KB, five rows of
  // compare_many's group 20 KB: L1 on any x86 or Arm core). Each tile's pass 2 uses the running maxima (over the tiles so far) as its shift
  // and decides the masked/fast path from them and the tile's own minima; the float64 sums so
  // far are carried to the new shift when a maximum grows (Acc). Pass 1's results (maxima,
  // second largest, ranks) are exact, so they are those of the untiled row. A reference or
  // model whose running max is not finite after some tile (+inf, or all -inf so far) takes
  // the untiled path for that pair: the result depends on the row alone, never on threads or
  // on the other models of compare_many.
  static constexpr int64_t kTile = 1024;
  // A pair of rows at most this large is taken whole: it stays in any L2 between its passes,
  // and tiles would only add their overhead (5% at V = 32000 in float16 with tiles of 8192).
  // Decided per pair, so a model's path is the same in compare and compare_many.
  static constexpr int64_t kWholePairBytes = 256 << 10;
  static bool tiles(int64_t vocab) {
    return vocab > kTile && vocab * (dtype_size(DA) + dtype_size(DB)) > kWholePairBytes;
  }

  // Pass 1 of one side, tile by tile: lane maxima (and the optional part) carried across
  // tiles, minima per tile.
  template <DType D, bool kSecond, bool kRank>
  struct Scan {
    static constexpr bool kTop = kSecond || kRank;
    V mx = S::set1(-std::numeric_limits<float>::infinity()), mx2 = mx;
    [[maybe_unused]] TopLanes<kSecond, kRank> l, l2;
    V label_v = S::set1(0.0f);
    float label = 0.0f;
    float max = -std::numeric_limits<float>::infinity();  // over the tiles so far
    Top top;                                               // after the last tile

    void set_label(float y) {
      label = y;
      label_v = S::set1(y);
    }

    // Entries [lo, hi); hi - lo is a multiple of 2W except in the last tile, which also
    // reduces Top and takes the scalar tail. Returns the tile's min; max becomes the running max.
    float tile(const RowInput& in, int64_t lo, int64_t hi, bool last) {
      const float inf = std::numeric_limits<float>::infinity();
      V mn = S::set1(inf), mn2 = mn;
      const int64_t n = hi - lo;
      const int64_t pair_end = lo + (n - n % (2 * S::W));
      const int64_t vec_end = lo + (n - n % S::W);
      int64_t i = lo;
      for (; i < pair_end; i += 2 * S::W) {
        const V x = S::template load<D>(in.values, i, in.dec);
        const V x2 = S::template load<D>(in.values, i + S::W, in.dec);
        if constexpr (kTop) {
          l.step(x, mx, label_v);
          l2.step(x2, mx2, label_v);
        }
        mx = S::max(x, mx);
        mn = S::min(x, mn);
        mx2 = S::max(x2, mx2);
        mn2 = S::min(x2, mn2);
      }
      for (; i < vec_end; i += S::W) {
        const V x = S::template load<D>(in.values, i, in.dec);
        if constexpr (kTop) l.step(x, mx, label_v);
        mx = S::max(x, mx);
        mn = S::min(x, mn);
      }
      float tile_min = S::hmin(S::min(mn2, mn));
      max = S::hmax(S::max(mx2, mx));
      if (last) {
        if constexpr (kTop) top = l.reduce(mx, l2, mx2);
        for (; i < hi; ++i) {
          const float x = load_scalar<D>(in.values, i, in.dec);
          if constexpr (kTop) top_tail<kSecond, kRank>(top, x, max, label);
          if (x > max) max = x;
          if (x < tile_min) tile_min = x;
        }
      }
      return tile_min;
    }
  };

  // What t = x*log2e - o subtracts on a side with max m: float(m*log2e) on the fast path,
  // m*log2e exactly (a float product is exact in double) on the masked one, t = (x - m)*log2e.
  static double offset(float m, bool masked) {
    return masked ? static_cast<double>(m) * static_cast<double>(kLog2eF)
                  : static_cast<double>(m * kLog2eF);
  }

  // f*v, except that a weight factor of 0 (a max grown by more than ~744 nats since) drops
  // an infinite term as pass 2 drops entries whose weight is 0; a NaN stays NaN.
  static double scaled(double f, double v) { return f == 0.0 && !std::isnan(v) ? 0.0 : f * v; }

  // One pair's float64 sums over the tiles so far, in the convention (offsets o_a, o_b and
  // masked or not) of the last tile.
  struct Acc {
    Sums s;
    double o_a = 0, o_b = 0;
    bool masked = false, any = false;

    void add(const Sums& t, bool t_masked, float max_a, float max_b) {
      const double oa = offset(max_a, t_masked), ob = offset(max_b, t_masked);
      if (!any) {
        s = t;
      } else {
        if (oa != o_a || ob != o_b) rescale(oa - o_a, ob - o_b);
        s.s_ref += t.s_ref;
        s.s_q += t.s_q;
        s.t_rq += t.t_rq;
        s.t_qr += t.t_qr;
        s.h += t.h;
        s.w_t += t.w_t;
        s.w_s += t.w_s;
      }
      o_a = oa;
      o_b = ob;
      masked = t_masked;
      any = true;
    }

    // To offsets larger by da, db: every t_ref drops by da, t_q by db, d = t_ref - t_q by
    // da - db, each e_ref is scaled by 2^-da and e_q by 2^-db.
    void rescale(double da, double db) {
      const double fa = std::exp2(-da), fb = std::exp2(-db), dd = da - db;
      s.h = scaled(fa, s.h - da * s.s_ref);
      s.t_rq = scaled(fa, s.t_rq - dd * s.s_ref);
      s.w_t = scaled(fa, s.w_t - dd * s.w_s);
      s.t_qr = scaled(fb, s.t_qr - dd * s.s_q);
      s.s_ref = scaled(fa, s.s_ref);
      s.w_s = scaled(fa, s.w_s);
      s.s_q = scaled(fb, s.s_q);
    }
  };

  template <DType D>
  static int32_t first_index_from(const RowInput& in, int64_t vocab, float m, int64_t from) {
    if (from == 0) return first_index_of<S, D>(in, vocab, m);
    const RowInput rest{in.values + from * dtype_size(D), in.dec};
    const int32_t i = first_index_of<S, D>(rest, vocab - from, m);
    return i < 0 ? -1 : static_cast<int32_t>(i + from);
  }

  // Row r of count (1..kGroup) models ps[idx[0..count)] against their shared reference, tile
  // by tile. Returns false, having written nothing, when the reference's running max is not
  // finite after some tile; otherwise writes every model's outputs but those whose own running
  // max was not finite (untiled[j] set: the caller takes them untiled). prefetch_next: the
  // last tile prefetches row r + 1's first tile of the reference and these models.
  template <bool kExtra, bool kSecond, bool kRank>
  static bool tiled(const LogitStatsParams* ps, const int* idx, int count, int64_t r,
                    bool prefetch_next, bool* untiled) {
    const LogitStatsParams& p0 = ps[idx[0]];
    const int64_t vocab = p0.vocab;
    const bool llama = p0.llama_parity;
    const auto* base_a = static_cast<const uint8_t*>(p0.ref);
    const RowInput a = row_input<S, DA>(base_a, p0.ref_row_stride, r);
    const uint8_t* next_row_a =
        prefetch_next ? base_a + (r + 1) * p0.ref_row_stride + dtype_row_header(DA) : nullptr;
    RowInput b[kGroup];
    const uint8_t* next_row_b[kGroup];
    Scan<DA, kSecond, kRank> sa;
    Scan<DB, kSecond, kRank> sb[kGroup];
    Acc acc[kGroup];
    int64_t from_a = 0, from_b[kGroup] = {};
    if constexpr (kExtra) sa.set_label(label_value<DA>(p0, a, r));
    for (int j = 0; j < count; ++j) {
      const LogitStatsParams& p = ps[idx[j]];
      const auto* base_b = static_cast<const uint8_t*>(p.q);
      b[j] = row_input<S, DB>(base_b, p.q_row_stride, r);
      next_row_b[j] =
          prefetch_next ? base_b + (r + 1) * p.q_row_stride + dtype_row_header(DB) : nullptr;
      if constexpr (kExtra) sb[j].set_label(label_value<DB>(p, b[j], r));
      untiled[j] = false;
    }
    for (int64_t lo = 0; lo < vocab; lo += kTile) {
      const int64_t hi = std::min(lo + kTile, vocab);
      const bool last = hi == vocab;
      // While pass 2 works on this tile: the next tile of these rows, or the next row's first.
      const Span span{lo, hi, last ? std::min(kTile, vocab) : std::min(kTile, vocab - hi)};
      const uint8_t* next_a = last ? next_row_a : a.values + hi * dtype_size(DA);
      const uint8_t* next_b[kGroup];
      const float max_a_before = sa.max;
      const float min_a = sa.tile(a, lo, hi, last);
      if (!std::isfinite(sa.max)) return false;
      if (sa.max > max_a_before) from_a = lo;
      const MaxMin mat{sa.max, min_a};  // the running max, the tile's min
      int fast[kGroup];
      RowInput fb[kGroup];
      MaxMin fm[kGroup];
      const uint8_t* fnext[kGroup];
      int n_fast = 0;
      for (int j = 0; j < count; ++j) {
        if (untiled[j]) continue;
        next_b[j] = last ? next_row_b[j] : b[j].values + hi * dtype_size(DB);
        const float max_b_before = sb[j].max;
        const float min_b = sb[j].tile(b[j], lo, hi, last);
        if (!std::isfinite(sb[j].max)) {
          untiled[j] = true;
          continue;
        }
        if (sb[j].max > max_b_before) from_b[j] = lo;
        const MaxMin mbt{sb[j].max, min_b};
        if (needs_mask(mat, mbt)) {
          Sums t;
          run_pass2<1>(llama, true, a, &b[j], span, mat, &mbt, next_a, &next_b[j], &t);
          acc[j].add(t, true, sa.max, sb[j].max);
          continue;
        }
        fast[n_fast] = j;
        fb[n_fast] = b[j];
        fm[n_fast] = mbt;
        fnext[n_fast] = next_b[j];
        ++n_fast;
      }
      Sums t[kGroup];
      for (int i = 0; i < n_fast;) {  // groups of 4, then 2, then 1
        const int k = n_fast - i >= 4 ? 4 : (n_fast - i >= 2 ? 2 : 1);
        if (k == 4)
          run_pass2<4>(llama, false, a, fb + i, span, mat, fm + i, next_a, fnext + i, t + i);
        else if (k == 2)
          run_pass2<2>(llama, false, a, fb + i, span, mat, fm + i, next_a, fnext + i, t + i);
        else
          run_pass2<1>(llama, false, a, fb + i, span, mat, fm + i, next_a, fnext + i, t + i);
        i += k;
      }
      for (int k = 0; k < n_fast; ++k) acc[fast[k]].add(t[k], false, sa.max, fm[k].max);
    }
    const MaxMin ma{sa.max, 0.0f};
    for (int j = 0; j < count; ++j) {
      if (untiled[j]) continue;
      const LogitStatsParams& p = ps[idx[j]];
      const MaxMin mb{sb[j].max, 0.0f};
      finish(p, r, a, b[j], ma, mb, acc[j].masked, acc[j].s, from_a, from_b[j]);
      if constexpr (kExtra) extras(p, r, a, b[j], ma, mb, acc[j].masked, acc[j].s, sa.top, sb[j].top);
    }
    return true;
  }

  template <bool kExtra>
  static bool tiled_group(const LogitStatsParams* ps, const int* idx, int count, int64_t r,
                          bool prefetch_next, bool* untiled) {
    if constexpr (!kExtra) {
      return tiled<false, false, false>(ps, idx, count, r, prefetch_next, untiled);
    } else {
      bool ok = false;
      with_top_flags(ps[idx[0]], [&](auto second, auto rank) {
        ok = tiled<true, decltype(second)::value, decltype(rank)::value>(ps, idx, count, r,
                                                                         prefetch_next, untiled);
      });
      return ok;
    }
  }

  template <bool kExtra>
  static void row(const LogitStatsParams& p, int64_t r, int64_t r_end) {
    if (tiles(p.vocab)) {
      const int idx = 0;
      bool untiled = false;
      if (tiled_group<kExtra>(&p, &idx, 1, r, r + 1 < r_end, &untiled) && !untiled) return;
    }
    row_untiled<kExtra>(p, r, r_end);
  }

  // compare_many's row: each model's outputs are bitwise those of row() (the same tiles, the
  // same decisions per tile, pass 2's sums independent of the group).
  template <bool kExtra>
  static void row_multi(const LogitStatsParams* ps, int m, int64_t r, int64_t r_end) {
    if (!tiles(ps[0].vocab)) return row_multi_untiled<kExtra>(ps, m, r, r_end);
    for (int g0 = 0; g0 < m; g0 += kGroup) {
      const int count = std::min(kGroup, m - g0);
      int idx[kGroup];
      bool untiled[kGroup];
      for (int j = 0; j < count; ++j) idx[j] = g0 + j;
      // The reference's scan is the same in every group: only the first can refuse it.
      if (!tiled_group<kExtra>(ps, idx, count, r, r + 1 < r_end && g0 + count == m, untiled))
        return row_multi_untiled<kExtra>(ps, m, r, r_end);
      for (int j = 0; j < count; ++j)
        if (untiled[j]) row_untiled<kExtra>(ps[idx[j]], r, r_end);
    }
  }

  template <bool kExtra>
  static void rows_multi(const LogitStatsParams* ps, int m, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_multi<kExtra>(ps, m, r, end);
  }

  // One model's outputs for row r from its sums (float64).
  // from_a/from_b: where the search for the first max may start (no earlier entry is the max).
  static void finish(const LogitStatsParams& p, int64_t r, const RowInput& a, const RowInput& b,
                     const MaxMin& ma, const MaxMin& mb, bool masked, const Sums& s,
                     int64_t from_a = 0, int64_t from_b = 0) {
    const int64_t vocab = p.vocab;
    const float shift_a = ma.max * kLog2eF;
    const float shift_b = mb.max * kLog2eF;
    // Exact rounding residual of the shift: t_i = (x_i - max)*log2e + c (0 when masked).
    const float c_a = masked ? 0.0f : std::fma(ma.max, kLog2eF, -shift_a);
    const float c_b = masked ? 0.0f : std::fma(mb.max, kLog2eF, -shift_b);
    const bool llama = p.llama_parity;
    // llama parity with a llama.cpp file on the q side too: its rows are log-probs already.
    const bool kQLogProbs = llama && DB == DType::LLAMA_U16;
    if (std::isnan(s.s_ref) || std::isnan(s.s_q) || std::isnan(s.t_rq) || std::isnan(s.t_qr) ||
        std::isnan(s.h)) {  // a NaN somewhere in the row
      write_invalid(p, r);
      return;
    }
    const double log_s_ref = std::log(s.s_ref);
    const double log_s_q = std::log(s.s_q);
    const double lse_a = static_cast<double>(ma.max) + log_s_ref - kLn2Eff * c_a;
    const double lse_b = static_cast<double>(mb.max) + log_s_q - kLn2Eff * c_b;
    p.lse_ref[r] = lse_a;
    p.lse_q[r] = lse_b;
    p.kld[r] = kLn2Eff * s.t_rq / s.s_ref + (log_s_q - log_s_ref);
    p.kld_reverse[r] = -kLn2Eff * s.t_qr / s.s_q + (log_s_ref - log_s_q);
    p.entropy_ref[r] = log_s_ref - kLn2Eff * s.h / s.s_ref;
    p.top1_ref[r] = first_index_from<DA>(a, vocab, ma.max, from_a);
    p.top1_q[r] = first_index_from<DB>(b, vocab, mb.max, from_b);
    if (p.labels) {
      const int64_t y = p.labels[r];
      const double ay = load_scalar<DA>(a.values, y, a.dec);
      const double by = load_scalar<DB>(b.values, y, b.dec);
      // In llama parity mode the reference row already holds log-probs (not renormalised).
      const double nll_a = llama ? -ay : lse_a - ay;
      const double nll_b = kQLogProbs ? -by : lse_b - by;
      p.nll_ref[r] = nll_a;
      p.nll_q[r] = nll_b;
      p.p_ref_y[r] = std::exp(-nll_a);
      p.p_q_y[r] = std::exp(-nll_b);
    }
    if (llama) {
      // p_i(llama) = exp(x_i) = exp(lse_a) * e_i / S_ref; log p_i - log q_i =
      // lse_a + ln2*d_i - log S_ref + log S_q.
      // When q is a llama.cpp file too, its decoded values are log q as they are (as llama.cpp
      // uses the quant's exactly normalised log-probs): log q_i = ln2*t_q - log S_q + lse_q.
      const double q_offset = kQLogProbs ? lse_b : 0.0;
      p.kld_llama[r] = std::exp(lse_a) / s.s_ref *
                       (kLn2Eff * s.w_t + (lse_a - log_s_ref + log_s_q - q_offset) * s.w_s);
    }
  }

  template <bool kExtra>
  static void rows(const LogitStatsParams& p, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row<kExtra>(p, r, end);
  }

  // ---- Optional outputs (issue 16) --------------------------------------------------------

  // One side's optional outputs.
  struct SideOut {
    double* logp_top1;
    double* logp_top2;
    int32_t* rank;
    double* margin;
  };
  static SideOut ref_side(const LogitStatsParams& p) {
    return {p.logp_top1_ref, p.logp_top2_ref, p.rank_ref_y, p.margin_ref};
  }
  static SideOut q_side(const LogitStatsParams& p) {
    return {p.logp_top1_q, p.logp_top2_q, p.rank_q_y, p.margin_q};
  }

  // The label's value on one side (0 without labels: no rank is counted then).
  template <DType D>
  static float label_value(const LogitStatsParams& p, const RowInput& in, int64_t r) {
    return p.labels ? load_scalar<D>(in.values, p.labels[r], in.dec) : 0.0f;
  }

  // Calls f(bool_constant kSecond, bool_constant kRank) with what p's optional outputs need
  // of pass 1: the second largest entries (top2, margins) and the labels' ranks.
  template <class F>
  static void with_top_flags(const LogitStatsParams& p, const F& f) {
    const bool second = p.logp_top2_ref || p.logp_top2_q || p.margin_ref || p.margin_q;
    const bool rank = p.rank_ref_y || p.rank_q_y;
    using Yes = std::true_type;
    using No = std::false_type;
    if (second && rank) f(Yes{}, Yes{});
    else if (second) f(Yes{}, No{});
    else if (rank) f(No{}, Yes{});
    else f(No{}, No{});
  }

  // maxmin, with the optional part (into top) when kExtra.
  template <DType D, bool kExtra>
  static MaxMin side_maxmin(const LogitStatsParams& p, const RowInput& in, int64_t r, Top& top) {
    if constexpr (!kExtra) {
      return maxmin<D>(in, p.vocab);
    } else {
      MaxMin m;
      const float label = label_value<D>(p, in, r);
      with_top_flags(p, [&](auto second, auto rank) {
        m = maxmin<D, decltype(second)::value, decltype(rank)::value>(in, p.vocab, &top, label);
      });
      return m;
    }
  }

  // One side's logp_top1/top2 (lse: that side's renormalising log-sum-exp), rank and margin.
  template <DType D>
  static void write_side(const SideOut& out, const Top& t, const RowInput& in, float max,
                         double lse, const int64_t* labels, int64_t r) {
    if (out.logp_top1) out.logp_top1[r] = static_cast<double>(max) - lse;
    if (out.logp_top2) out.logp_top2[r] = static_cast<double>(t.second) - lse;
    if (out.rank) out.rank[r] = static_cast<int32_t>(t.n_gt);
    if (out.margin) {
      const float label = load_scalar<D>(in.values, labels[r], in.dec);
      // The best other entry: the max, or the second largest (== max on a tie) if the label
      // holds the max.
      const float other = label == max ? t.second : max;
      out.margin[r] = static_cast<double>(label) - static_cast<double>(other);
    }
  }

  // g(r) = (1+r)ln(1+r) + (1-r)ln(1-r) for r in [0, 1] (JSD = sum (p+q)/4 * g), lane-wise.
  static V jsd_g(V r) {
    const V r2 = S::mul(r, r);
    V poly = S::fmadd(S::set1(1.0f / 66.0f), r2, S::set1(1.0f / 45.0f));
    poly = S::fmadd(poly, r2, S::set1(1.0f / 28.0f));
    poly = S::fmadd(poly, r2, S::set1(1.0f / 15.0f));
    poly = S::fmadd(poly, r2, S::set1(1.0f / 6.0f));
    poly = S::fmadd(poly, r2, S::set1(1.0f));
    const V series = S::mul(poly, r2);
    if (!S::any_gt(r, kJsdSeriesMax)) return series;
    const V one = S::set1(1.0f);
    const V up = S::add(one, r), down = S::sub(one, r);
    // down == 0 (one side has no mass): 0 * log(smallest normal) = 0.
    const V log_down = S::log(S::max(down, S::set1(std::numeric_limits<float>::min())));
    const V direct = S::fmadd(up, S::log(up), S::mul(down, log_down));
    return S::blend_gt(r, kJsdSeriesMax, direct, series);
  }

  static double jsd_g_scalar(double r) {
    if (r <= kJsdSeriesMax) {
      const double r2 = r * r;
      return r2 * (1 + r2 * (1.0 / 6 + r2 * (1.0 / 15 + r2 * (1.0 / 28 + r2 * (1.0 / 45 + r2 / 66)))));
    }
    return (1 + r) * std::log1p(r) + (r < 1 ? (1 - r) * std::log1p(-r) : 0.0);
  }

  // Pass 3: sum |p - q| and (kJsd) sum (p + q) g(r), with p_i = 2^((a_i - max_a)*log2e) *
  // scale_a, q_i likewise; float32 lanes flushed to float64 like pass 2.
  template <bool kJsd>
  static void dist_pass(const RowInput& a, const RowInput& b, int64_t vocab, float max_a,
                        float max_b, float scale_a, float scale_b, double& abs_sum,
                        double& jsd_sum) {
    const V log2e = S::set1(kLog2eF), zero = S::set1(0.0f), max_av = S::set1(max_a),
            max_bv = S::set1(max_b), scale_av = S::set1(scale_a), scale_bv = S::set1(scale_b),
            tiny = S::set1(std::numeric_limits<float>::min());
    V abs_v = zero, jsd_v = zero;
    typename S::DAcc d_abs, d_jsd;
    const auto step = [&](int64_t i) {
      const V x = S::template load<DA>(a.values, i, a.dec);
      const V y = S::template load<DB>(b.values, i, b.dec);
      const V ta = S::clamp_below(S::fmadd(S::sub(x, max_av), log2e, zero), kMaskedFloor);
      const V tb = S::clamp_below(S::fmadd(S::sub(y, max_bv), log2e, zero), kMaskedFloor);
      const V p = S::mul(S::exp2(ta), scale_av);
      const V q = S::mul(S::exp2(tb), scale_bv);
      const V diff = S::abs(S::sub(p, q));
      abs_v = S::add(abs_v, diff);
      if constexpr (kJsd) {
        const V sum = S::add(p, q);
        jsd_v = S::fmadd(sum, jsd_g(S::div(diff, S::max(sum, tiny))), jsd_v);
      }
    };
    constexpr int64_t kBlock = int64_t{kFlushEvery} * S::W;
    const int64_t vec_end = vocab - vocab % S::W;
    const int64_t block_end = vocab - vocab % kBlock;
    int64_t i = 0;
    for (; i < block_end; i += kBlock) {
      for (int64_t k = 0; k < kBlock; k += S::W) step(i + k);
      S::flush(d_abs, abs_v);
      if constexpr (kJsd) S::flush(d_jsd, jsd_v);
    }
    for (; i < vec_end; i += S::W) step(i);
    S::flush(d_abs, abs_v);
    abs_sum = S::hsum(d_abs);
    if constexpr (kJsd) {
      S::flush(d_jsd, jsd_v);
      jsd_sum = S::hsum(d_jsd);
    }
    for (; i < vocab; ++i) {  // tail in float64, float exp2 as in the vector loop
      const float ta = (load_scalar<DA>(a.values, i, a.dec) - max_a) * kLog2eF;
      const float tb = (load_scalar<DB>(b.values, i, b.dec) - max_b) * kLog2eF;
      const double p = static_cast<double>(std::exp2(ta < kMaskedFloor ? kMaskedFloor : ta)) * scale_a;
      const double q = static_cast<double>(std::exp2(tb < kMaskedFloor ? kMaskedFloor : tb)) * scale_b;
      const double diff = std::fabs(p - q);
      abs_sum += diff;
      if (kJsd && p + q > 0) jsd_sum += (p + q) * jsd_g_scalar(diff / (p + q));
    }
  }

  static void write_invalid_extra(const LogitStatsParams& p, int64_t r) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (double* out : {p.logp_top1_ref, p.logp_top1_q, p.logp_top2_ref, p.logp_top2_q, p.tvd,
                        p.jsd, p.margin_ref, p.margin_q})
      if (out) out[r] = nan;
    if (p.rank_ref_y) p.rank_ref_y[r] = -1;
    if (p.rank_q_y) p.rank_q_y[r] = -1;
  }

  // The optional outputs of row r, after finish (which wrote lse_ref/lse_q, or NaN for a row
  // with a NaN); top_a/top_b: pass 1's optional part.
  static void extras(const LogitStatsParams& p, int64_t r, const RowInput& a, const RowInput& b,
                     const MaxMin& ma, const MaxMin& mb, bool masked, const Sums& s,
                     const Top& top_a, const Top& top_b) {
    if (std::isnan(p.lse_ref[r])) {
      write_invalid_extra(p, r);
      return;
    }
    write_side<DA>(ref_side(p), top_a, a, ma.max, p.lse_ref[r], p.labels, r);
    write_side<DB>(q_side(p), top_b, b, mb.max, p.lse_q[r], p.labels, r);
    if (!p.tvd && !p.jsd) return;
    // p_i = 2^(t_i)/S_ref with pass 2's t_i = (a_i - max)*log2e + c: 2^((a_i - max)*log2e) * 2^c/S.
    const float c_a = masked ? 0.0f : std::fma(ma.max, kLog2eF, -(ma.max * kLog2eF));
    const float c_b = masked ? 0.0f : std::fma(mb.max, kLog2eF, -(mb.max * kLog2eF));
    const float scale_a = static_cast<float>(std::exp2(static_cast<double>(c_a)) / s.s_ref);
    const float scale_b = static_cast<float>(std::exp2(static_cast<double>(c_b)) / s.s_q);
    double abs_sum = 0, jsd_sum = 0;
    if (p.jsd)
      dist_pass<true>(a, b, p.vocab, ma.max, mb.max, scale_a, scale_b, abs_sum, jsd_sum);
    else
      dist_pass<false>(a, b, p.vocab, ma.max, mb.max, scale_a, scale_b, abs_sum, jsd_sum);
    if (p.tvd) p.tvd[r] = 0.5 * abs_sum;
    if (p.jsd) p.jsd[r] = 0.25 * jsd_sum;
  }
};

template <class S>
void run_rows(const LogitStatsParams& p, int64_t begin, int64_t end) {
  dispatch_dtype(p.ref_dtype, [&](auto ta) {
    dispatch_dtype(p.q_dtype, [&](auto tb) {
      using K = RowKernel<S, decltype(ta)::value, decltype(tb)::value>;
      if (wants_extra(p)) K::template rows<true>(p, begin, end);
      else K::template rows<false>(p, begin, end);
    });
  });
}

// ps[0..m) share the reference, its dtype and the q dtype (logit_stats_multi checks).
template <class S>
void run_rows_multi(const LogitStatsParams* ps, int m, int64_t begin, int64_t end) {
  dispatch_dtype(ps[0].ref_dtype, [&](auto ta) {
    dispatch_dtype(ps[0].q_dtype, [&](auto tb) {
      using K = RowKernel<S, decltype(ta)::value, decltype(tb)::value>;
      if (wants_extra(ps[0])) K::template rows_multi<true>(ps, m, begin, end);
      else K::template rows_multi<false>(ps, m, begin, end);
    });
  });
}

}  // namespace
}  // namespace fk
