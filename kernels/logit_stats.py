"""Triton kernels for the fused per-token logit statistics: the GPU twin of csrc/cpu/row_kernel.h.

For each token row, with a = ref[row, :], b = q[row, :], p = softmax(a), q = softmax(b), in nats:
kld = KL(P_ref || P_q), kld_reverse = KL(P_q || P_ref), lse_ref, lse_q, entropy_ref, top1_ref,
top1_q (lowest index wins ties), with labels y: nll_ref, nll_q, p_ref_y, p_q_y, and in llama
parity mode kld_llama (llama.cpp's KLD over decoded reference log-probs > -16). Same -inf/NaN
rules as the CPU core: -inf is masked vocabulary; NaN or +inf anywhere in a row, or a row with
no finite entry, makes the token invalid (NaN outputs, top1 -1); KLD is +inf where p has mass
and q has none.

Design (one pass over each input, never materialising probabilities):

- Online over vocabulary blocks of BLOCK_V entries, rescaled once per block, never per element.
  Each block takes its max with one block reduction; the running shift k of each side is an
  *integer* k = ceil(max * log2(e)) (float32), so
    t = fma(x, log2e, -k)  (one float32 rounding; the row max lands in (-1, 0]),
    e = 2^t, d = t_ref - t_q.
  Beyond |max log2e| = 2^23 (logits above about 5.8e6) float32 integers are too coarse for k:
  it becomes a pair hi + lo and t = fma(x, log2e, -hi) - lo (_shift_of), in a uniform branch
  that ordinary rows never take, so rows whose max lies within +-2.3e38 (where max * log2e is
  still a float32) stay exact. Moving the shift
  from k to k' multiplies every running sum by 2^(k - k'), an exact power
  of two built from the exponent bits. Sums that carry d or t also pick up an exact shift term:
    T_rq' = 2^-da (T_rq + (db - da) S_ref),  T_qr' = 2^-db (T_qr + (db - da) S_q),
    H'    = 2^-da (H - da S_ref).
  A rescale is a uniform scalar branch taken only when a block raises a max.
- Per block, S_ref, S_q, T_rq = sum e_ref d, T_qr = sum e_q d, H = sum e_ref t_ref are summed in
  float32 (one multi-operand tree reduction, so each term meets a few dozen roundings at most)
  and added to float64 running sums. The row is finished in float64 exactly as the CPU core:
    KL(P||Q) = ln2 T_rq / S_ref + log(S_q / S_ref),  KL(Q||P) = -ln2 T_qr / S_q + log(S_ref / S_q),
    lse = ln2 k + log S,  entropy = log S_ref - ln2 H / S_ref,
  where ln2 is 1/float32(log2 e) so that it undoes the float32 log2(e) exactly. Each term is
  small when P ~ Q, so near-identical rows do not cancel between two large lse values.
  log and exp in float64 are written out here (exponent bits plus a short series): the GPU's
  float32 approximations never touch the finish, and nothing depends on libdevice.
- The block body first runs without any masking (plain products). Only where a block holds -inf
  (masked vocabulary, or the padded tail) does 0 * inf turn a block sum into NaN; that block is
  then recomputed from the registers it already holds with the masked formulas (a term with
  e = 0 contributes 0). Real NaN inputs also make S NaN, which marks the row invalid.
- top-1: a block's first index of its max is looked for only when that max beats the running
  best (strictly, so earlier blocks win ties): a rare uniform branch, not per-element work.
- Launch (default_config): blocks of 2048 entries over 4 warps, 16 entries per thread and
  side, and the next block's loads in flight while this one is reduced (tl.range num_stages=2).
  Each block pays a fixed cost for its two cross-warp reductions (about 200 instructions per
  thread and 9 barriers, read off the sm_90 SASS); 16 entries per thread spread it to about 30
  instructions per entry pair on the common path, against about 46 with 8 (the earlier 4096 x
  16 warps), while an H100 at 2.7 TB/s of bf16 leaves about 44 per pair
  (benchmarks/sass_report.py). 168 registers (194 for
  float32), no spills: 2-3 programs per SM, whose barriers interleave. Block size, warps,
  stages and the fused reductions are launcher options that benchmarks/bench_gpu.py --sweep
  times; no H100 timing has chosen between them yet.
- Split-vocabulary variant for few rows and huge vocabularies: a 2-D grid (row, split) writes
  each split's running state (shifts, float64 sums, best value and index, invalid flag) to a
  small float64 workspace; a second tiny kernel merges the splits of a row in order with the
  same exact rescaling and finishes it.
- Inputs are float32, float16 or bfloat16 (converted to float32 in registers), or llama.cpp's
  --kl-divergence-base rows (llama_u16: a float32 scale and minimum, then uint16 codes; passed as
  an int16 tensor and decoded as fma(code, scale, min) like the CPU's SIMD paths). Rows may have
  any row stride; elements must be contiguous within a row.

- Optional outputs (issue 16, definitions in fidelity_kld.reference), each behind a constexpr
  switch so that without them the kernel compiles to the same SASS as before (checked with
  benchmarks/sass_report.py --sass-dir: only a parameter's constant-bank offset moves):
  TOP2 (logp_top1/top2) and RANK (the label's rank and margin) carry the row's second largest
  value per side (a multiset: a tied max is its own second) and the count of entries above the
  label's value through the same blocks, one multi-operand reduction with the block max (a
  custom top-2 combine); log p = ln2 (fma64(v, log2e, -K)) - log S avoids v - lse's
  cancellation in huge rows; the margin is the label's value minus the row max when anything
  beats it, else minus the second largest. STATE writes each row's float64 shifts and sums for
  the distance pass, a kernel of its own (TVD, JSD) that reads the row pair once more, only
  when asked: p = 2^t / S with t as the statistics pass made it, sum |p - q| and
  sum (p + q) h((p - q)/(p + q)) with h a series for |z| < 1/4 (no cancellation for p ~ q)
  and two hardware log2s above (HW_LOG; the interpreter uses tl.log2).

Numerical contract (tests/test_triton_logit_stats.py and tests/test_gpu.py, against the float64
reference in fidelity_kld.reference): kld within 2e-6 absolute + 2e-4 relative, lse within
1e-6 relative, top1 exact; log-probs within 1e-6 + 1e-5 relative, tvd and jsd within 1e-6 +
1e-4 relative, ranks and margins exact (tests/test_direction_outputs.check_extra).
"""

from __future__ import annotations

import os

import numpy as np
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Constants the kernels read must be tl.constexpr globals.
LOG2E = tl.constexpr(1.4426950408889634)
# 1/float32(log2 e): t * LN2_EFF recovers x - shift exactly as the kernel saw it (row_kernel.h).
LN2_EFF = tl.constexpr(1.0 / float(np.float32(1.4426950408889634)))
LN2_HI = tl.constexpr(6.93147180369123816490e-01)  # fdlibm's split of ln 2 for exact n * ln2
LN2_LO = tl.constexpr(1.90821492927058770002e-10)
INV_LN2 = tl.constexpr(1.4426950408889634)
SQRT2 = tl.constexpr(1.4142135623730951)
# Shift of a side that has seen no finite entry yet: finite, so differences stay finite, and at
# or below any real ceil(max * log2 e) (the most negative float32); its sums are 0, so every
# term it scales is 0.
K_FLOOR = tl.constexpr(-3.4028234663852886e38)
# From |max * log2 e| = 2^23 on, float32 holds only integers there, and the rounding of
# max * log2 e itself (up to half an ulp: 2^16 at 1e12) would be left in t: the shift becomes
# hi + lo (see _shift_of).
BIG_SHIFT = tl.constexpr(8388608.0)
LLAMA_WINDOW = tl.constexpr(-16.0)
BIG_INDEX = tl.constexpr(2147483647)
N_PART = tl.constexpr(16)  # float64 words of split state per (row, split)
N_PART_SECOND = tl.constexpr(20)  # ... with the second largest values and the label ranks
N_STATE = tl.constexpr(4)  # float64 words per row handed to the distance pass: K_ref, K_q, S_ref, S_q
# float32(log2 e) as a float64: fma(x, LOG2E_F32, -K) in float64 is t exactly as the kernel's
# float32 fma makes it, before its rounding.
LOG2E_F32 = tl.constexpr(float(np.float32(1.4426950408889634)))
LN2_F32 = tl.constexpr(0.6931471805599453)


# ---------------------------------------------------------------------------------------------
# float64 helpers (exact powers of two, log, exp)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pow2_neg(delta):
    """2^-delta for an integer-valued float64 delta >= 0, exact; 0 below 2^-1022."""
    delta = tl.where(delta == delta, delta, 0.0)
    e = tl.minimum(tl.maximum(delta, 0.0), 1023.0).to(tl.int64)
    return ((1023 - e) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _log_f64(x):
    """Natural log of a positive, finite, normal float64, to about 1e-16 relative."""
    bits = x.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)
    big = m > SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    # log m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.1716: 11 odd terms reach 1e-17.
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    poly = 1.0 / 21.0
    poly = poly * s2 + 1.0 / 19.0
    poly = poly * s2 + 1.0 / 17.0
    poly = poly * s2 + 1.0 / 15.0
    poly = poly * s2 + 1.0 / 13.0
    poly = poly * s2 + 1.0 / 11.0
    poly = poly * s2 + 1.0 / 9.0
    poly = poly * s2 + 1.0 / 7.0
    poly = poly * s2 + 1.0 / 5.0
    poly = poly * s2 + 1.0 / 3.0
    poly = poly * s2 + 1.0
    ef = e.to(tl.float64)
    return ef * LN2_HI + (ef * LN2_LO + 2.0 * s * poly)


@triton.jit
def _exp_f64(z):
    """e^z in float64 to about 1e-16 relative; 0 below 2^-1022, +inf above 709, NaN kept."""
    zc = tl.minimum(tl.maximum(z, -746.0), 709.0)
    v = zc * INV_LN2 + 0.5
    n = v.to(tl.int64)  # truncates toward zero: make it a floor
    n = tl.where(v < n.to(tl.float64), n - 1, n)
    nf = n.to(tl.float64)
    r = (zc - nf * LN2_HI) - nf * LN2_LO  # |r| <= 0.35: 14 Taylor terms reach 1e-17
    poly = 1.0 / 6227020800.0
    poly = poly * r + 1.0 / 479001600.0
    poly = poly * r + 1.0 / 39916800.0
    poly = poly * r + 1.0 / 3628800.0
    poly = poly * r + 1.0 / 362880.0
    poly = poly * r + 1.0 / 40320.0
    poly = poly * r + 1.0 / 5040.0
    poly = poly * r + 1.0 / 720.0
    poly = poly * r + 1.0 / 120.0
    poly = poly * r + 1.0 / 24.0
    poly = poly * r + 1.0 / 6.0
    poly = poly * r + 0.5
    poly = poly * r + 1.0
    poly = poly * r + 1.0
    nc = tl.minimum(tl.maximum(n, -1022), 1023)
    scale = ((nc + 1023) << 52).to(tl.float64, bitcast=True)
    out = tl.where(n < -1022, 0.0, poly * scale)
    out = tl.where(z > 709.0, float("inf"), out)
    return tl.where(z == z, out, z)


# ---------------------------------------------------------------------------------------------
# loads
# ---------------------------------------------------------------------------------------------


@triton.jit
def _llama_header(row_ptr):
    """(scale, min) of a llama_u16 row: two little-endian float32 in its first four int16 words."""
    w0 = tl.load(row_ptr).to(tl.int32) & 0xFFFF
    w1 = tl.load(row_ptr + 1).to(tl.int32) & 0xFFFF
    w2 = tl.load(row_ptr + 2).to(tl.int32) & 0xFFFF
    w3 = tl.load(row_ptr + 3).to(tl.int32) & 0xFFFF
    scale = (w0 | (w1 << 16)).to(tl.float32, bitcast=True)
    offset = (w2 | (w3 << 16)).to(tl.float32, bitcast=True)
    return scale, offset


@triton.jit
def _load_block(vals_ptr, offs, mask, scale, offset, LLAMA: tl.constexpr, MASKED: tl.constexpr):
    """float32 values at offs (-inf where mask is off); llama_u16 codes decoded."""
    if LLAMA:
        if MASKED:
            u = tl.load(vals_ptr + offs, mask=mask, other=0)
        else:
            u = tl.load(vals_ptr + offs)
        x = tl.fma((u.to(tl.int32) & 0xFFFF).to(tl.float32), scale, offset)
        if MASKED:
            x = tl.where(mask, x, float("-inf"))
    else:
        if MASKED:
            x = tl.load(vals_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        else:
            x = tl.load(vals_ptr + offs).to(tl.float32)
    return x


@triton.jit
def _load_one(vals_ptr, idx, scale, offset, LLAMA: tl.constexpr):
    if LLAMA:
        u = tl.load(vals_ptr + idx).to(tl.int32) & 0xFFFF
        x = tl.fma(u.to(tl.float32), scale, offset)
    else:
        x = tl.load(vals_ptr + idx).to(tl.float32)
    return x


# ---------------------------------------------------------------------------------------------
# the running state: shifts ka, kb; float64 sums; best value and first index per side; bad flag
# ---------------------------------------------------------------------------------------------


@triton.jit
def _add5(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4


@triton.jit
def _max2(a0, a1, b0, b1):
    return tl.maximum(a0, b0), tl.maximum(a1, b1)


# FUSED: one multi-operand tree reduction (one round of shared memory and barriers on a GPU);
# otherwise one tl.sum / tl.max each, which the Triton interpreter runs as a single numpy call
# (its generic reduction calls the combine function element by element).


@triton.jit
def _block_max2(x, y, FUSED: tl.constexpr):
    if FUSED:
        mx, my = tl.reduce((x, y), 0, _max2)
    else:
        mx = tl.max(x, 0)
        my = tl.max(y, 0)
    return mx, my


@triton.jit
def _top2(a1, a2, b1, b2):
    """The two largest values (as a multiset) of two (largest, second largest) pairs."""
    return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))


@triton.jit
def _top2_2(a1, a2, b1, b2, c1, c2, d1, d2):
    x1, x2 = _top2(a1, a2, c1, c2)
    y1, y2 = _top2(b1, b2, d1, d2)
    return x1, x2, y1, y2


@triton.jit
def _top2_2_count2(a1, a2, b1, b2, ca, cb, c1, c2, d1, d2, ea, eb):
    x1, x2 = _top2(a1, a2, c1, c2)
    y1, y2 = _top2(b1, b2, d1, d2)
    return x1, x2, y1, y2, ca + ea, cb + eb


@triton.jit
def _second_of(x, mx):
    """The second largest value of x as a multiset (mx when the max mx is tied), one tl.max and
    one tl.sum: what the interpreter runs instead of a custom combine."""
    ties = tl.sum((x == mx).to(tl.int32), 0)
    below = tl.max(tl.where(x < mx, x, float("-inf")), 0)
    return tl.where(ties > 1, mx, below)


@triton.jit
def _block_top2(x, y, ya, yb, RANK: tl.constexpr, FUSED: tl.constexpr):
    """A block's (max, second largest) per side and, with RANK, how many entries per side lie
    strictly above the label's value (ya, yb); one multi-operand reduction when FUSED."""
    if FUSED:
        lo = tl.full(x.shape, float("-inf"), tl.float32)
        if RANK:
            mx, sx, my, sy, ca, cb = tl.reduce(
                (x, lo, y, lo, (x > ya).to(tl.int32), (y > yb).to(tl.int32)), 0, _top2_2_count2)
        else:
            mx, sx, my, sy = tl.reduce((x, lo, y, lo), 0, _top2_2)
            ca = 0
            cb = 0
    else:
        mx = tl.max(x, 0)
        my = tl.max(y, 0)
        sx = _second_of(x, mx)
        sy = _second_of(y, my)
        if RANK:
            ca = tl.sum((x > ya).to(tl.int32), 0)
            cb = tl.sum((y > yb).to(tl.int32), 0)
        else:
            ca = 0
            cb = 0
    return mx, sx, my, sy, ca, cb


@triton.jit
def _block_sum5(a, b, c, d, e, FUSED: tl.constexpr):
    if FUSED:
        sa, sb, sc, sd, se = tl.reduce((a, b, c, d, e), 0, _add5)
    else:
        sa = tl.sum(a, 0)
        sb = tl.sum(b, 0)
        sc = tl.sum(c, 0)
        sd = tl.sum(d, 0)
        se = tl.sum(e, 0)
    return sa, sb, sc, sd, se


@triton.jit
def _shift_of(m):
    """The integer shift (hi, lo) for a block max m: t = fma(x, log2e, -hi) - lo puts m at
    t in (-1, 0]. Below 2^23, hi = ceil(m log2e) and lo = 0. Above, hi = fl(m log2e) (an
    integer there) and lo = ceil of its exact rounding error (one fma), so rows whose max lies
    within +-2.3e38 keep t exact near their max instead of overflowing 2^t."""
    p = m * LOG2E
    big = (tl.abs(p) >= BIG_SHIFT) & (tl.abs(p) < float("inf"))
    hi = tl.where(big, p, tl.math.ceil(p))
    lo = tl.where(big, tl.math.ceil(tl.fma(m, LOG2E, -p)), 0.0)
    return hi, lo


@triton.jit
def _shift64(hi, lo):
    """hi + lo in float64: exact (both integers, lo below hi's last bit, 48 bits in all)."""
    return hi.to(tl.float64) + lo.to(tl.float64)


@triton.jit
def _raises(hi, lo, k_hi, k_lo):
    """(hi, lo) > (k_hi, k_lo) as shifts; comparing hi first is exact (|lo| <= ulp(hi)/2)."""
    return (hi > k_hi) | ((hi == k_hi) & (lo > k_lo))


@triton.jit
def _zero_sums():
    """Empty float64 sums S_ref, S_q, T_rq, T_qr, H, W_t, W_s."""
    z = tl.zeros((), tl.float64)
    return z, z, z, z, z, z, z


@triton.jit
def _rescale(ka, kb, na, nb, sa, sb, trq, tqr, h, wt, ws):
    """The float64 sums, re-expressed against the larger float64 shifts (na, nb) >= (ka, kb)."""
    da = na - ka
    db = nb - kb
    fa = _pow2_neg(da)
    fb = _pow2_neg(db)
    diff = db - da
    # A factor of 0 drops what lies 2^1022 below the new max; "where" keeps 0 * inf out.
    trq = tl.where(fa == 0.0, 0.0, fa * (trq + diff * sa))
    tqr = tl.where(fb == 0.0, 0.0, fb * (tqr + diff * sb))
    h = tl.where(fa == 0.0, 0.0, fa * (h - da * sa))
    wt = tl.where(fa == 0.0, 0.0, fa * (wt + diff * ws))
    ws = fa * ws
    sa = tl.where(sa != sa, sa, fa * sa)
    sb = tl.where(sb != sb, sb, fb * sb)
    return sa, sb, trq, tqr, h, wt, ws


@triton.jit
def _block(x, y, offs, ka, la, kb, lb, sa, sb, trq, tqr, h, wt, ws, best_a, ia, best_b, ib, bad,
           sec_a, sec_b, ya, yb, cnt_a, cnt_b, PARITY: tl.constexpr, FUSED: tl.constexpr,
           SECOND: tl.constexpr, RANK: tl.constexpr):
    """Fold one vocabulary block (x: ref, y: q, float32, -inf padded) into the running state.
    SECOND: also the second largest value per side (sec_a, sec_b); RANK: also the count of
    entries above the label's values ya, yb (cnt_a, cnt_b). Both off: the kernel of before."""
    if SECOND:
        mx_a, s_a, mx_b, s_b, c_a, c_b = _block_top2(x, y, ya, yb, RANK, FUSED)
        # the row's second largest so far: the block's, or the smaller of the two maxima
        sec_a = tl.maximum(sec_a, tl.maximum(tl.minimum(best_a, mx_a), s_a))
        sec_b = tl.maximum(sec_b, tl.maximum(tl.minimum(best_b, mx_b), s_b))
        cnt_a += c_a
        cnt_b += c_b
    else:
        mx_a, mx_b = _block_max2(x, y, FUSED)
    if mx_a > best_a:  # strictly: an earlier block keeps a tie
        ia = tl.min(tl.where(x == mx_a, offs, BIG_INDEX), 0)
        best_a = mx_a
    if mx_b > best_b:
        ib = tl.min(tl.where(y == mx_b, offs, BIG_INDEX), 0)
        best_b = mx_b
    ca, cla = _shift_of(mx_a)
    cb, clb = _shift_of(mx_b)
    up_a = _raises(ca, cla, ka, la)
    up_b = _raises(cb, clb, kb, lb)
    if up_a | up_b:
        na = tl.where(up_a, ca, ka)
        nla = tl.where(up_a, cla, la)
        nb = tl.where(up_b, cb, kb)
        nlb = tl.where(up_b, clb, lb)
        sa, sb, trq, tqr, h, wt, ws = _rescale(
            _shift64(ka, la), _shift64(kb, lb), _shift64(na, nla), _shift64(nb, nlb),
            sa, sb, trq, tqr, h, wt, ws)
        ka = na
        la = nla
        kb = nb
        lb = nlb
    if (la != 0.0) | (lb != 0.0):  # rows beyond |max| ~ 5.8e6 only: a uniform branch
        ta = tl.fma(x, LOG2E, -ka) - la
        tb = tl.fma(y, LOG2E, -kb) - lb
    else:
        ta = tl.fma(x, LOG2E, -ka)
        tb = tl.fma(y, LOG2E, -kb)
    ea = tl.exp2(ta)
    eb = tl.exp2(tb)
    d = ta - tb
    if PARITY:
        pa = ea > 0.0
        eda = tl.where(pa, ea * d, 0.0)
        win = x > LLAMA_WINDOW
        b_sa, b_sb, b_rq, b_qr, b_h = _block_sum5(
            ea, eb, eda, tl.where(eb > 0.0, eb * d, 0.0), tl.where(pa, ea * ta, 0.0), FUSED)
        wt += tl.sum(tl.where(win, eda, 0.0), 0).to(tl.float64)
        ws += tl.sum(tl.where(win, ea, 0.0), 0).to(tl.float64)
    else:
        b_sa, b_sb, b_rq, b_qr, b_h = _block_sum5(ea, eb, ea * d, eb * d, ea * ta, FUSED)
        if (b_rq != b_rq) | (b_qr != b_qr) | (b_h != b_h):
            # -inf in this block: 0 * inf made NaN. Redo it with e = 0 terms contributing 0.
            pa = ea > 0.0
            pb = eb > 0.0
            b_sa, b_sb, b_rq, b_qr, b_h = _block_sum5(
                ea, eb, tl.where(pa, ea * d, 0.0), tl.where(pb, eb * d, 0.0),
                tl.where(pa, ea * ta, 0.0), FUSED)
    bad = bad | (b_sa != b_sa) | (b_sb != b_sb)
    sa += b_sa.to(tl.float64)
    sb += b_sb.to(tl.float64)
    trq += b_rq.to(tl.float64)
    tqr += b_qr.to(tl.float64)
    h += b_h.to(tl.float64)
    return (ka, la, kb, lb, sa, sb, trq, tqr, h, wt, ws, best_a, ia, best_b, ib, bad,
            sec_a, sec_b, cnt_a, cnt_b)


@triton.jit
def _load_fold(a_vals, b_vals, offs, end, a_scale, a_off, b_scale, b_off,
               ka, la, kb, lb, sa, sb, trq, tqr, h, wt, ws, best_a, ia, best_b, ib, bad,
               sec_a, sec_b, ya, yb, cnt_a, cnt_b,
               A_LLAMA: tl.constexpr, B_LLAMA: tl.constexpr, PARITY: tl.constexpr,
               FUSED: tl.constexpr, MASKED: tl.constexpr, SECOND: tl.constexpr,
               RANK: tl.constexpr):
    """Load the block at offs (masked at end when MASKED) on both sides and fold it in."""
    mask = offs < end
    x = _load_block(a_vals, offs, mask, a_scale, a_off, A_LLAMA, MASKED)
    y = _load_block(b_vals, offs, mask, b_scale, b_off, B_LLAMA, MASKED)
    return _block(x, y, offs, ka, la, kb, lb, sa, sb, trq, tqr, h, wt, ws, best_a, ia, best_b,
                  ib, bad, sec_a, sec_b, ya, yb, cnt_a, cnt_b, PARITY, FUSED, SECOND, RANK)


@triton.jit
def _finish(row, ka, kb, sa, sb, trq, tqr, h, wt, ws, ia, ib, bad,
            a_vals, b_vals, a_scale, a_off, b_scale, b_off, labels_ptr, vocab,
            kld_ptr, kld_rev_ptr, lse_ref_ptr, lse_q_ptr, entropy_ptr, top1_ref_ptr, top1_q_ptr,
            nll_ref_ptr, nll_q_ptr, p_ref_y_ptr, p_q_y_ptr, kld_llama_ptr,
            best_a, best_b, sec_a, sec_b, cnt_a, cnt_b,
            top1_lp_ref_ptr, top1_lp_q_ptr, top2_lp_ref_ptr, top2_lp_q_ptr,
            rank_ref_ptr, rank_q_ptr, margin_ref_ptr, margin_q_ptr, state_ptr,
            A_LLAMA: tl.constexpr, B_LLAMA: tl.constexpr, PARITY: tl.constexpr,
            HAS_LABELS: tl.constexpr, TOP2: tl.constexpr, RANK: tl.constexpr,
            STATE: tl.constexpr):
    """Write one row's outputs from its merged state (float64 shifts ka, kb), in float64.
    TOP2, RANK (with labels), STATE: the optional outputs (_finish_extra)."""
    valid = ((bad == 0) & (sa > 0.0) & (sb > 0.0) & (sa < float("inf")) & (sb < float("inf"))
             & (ka < float("inf")) & (kb < float("inf")))
    sa_s = tl.where(valid, sa, 1.0)
    sb_s = tl.where(valid, sb, 1.0)
    log_sa = _log_f64(sa_s)
    log_sb = _log_f64(sb_s)
    lse_a = LN2_EFF * tl.where(valid, ka, 0.0) + log_sa
    lse_b = LN2_EFF * tl.where(valid, kb, 0.0) + log_sb
    nan = float("nan")
    tl.store(kld_ptr + row, tl.where(valid, LN2_EFF * trq / sa_s + (log_sb - log_sa), nan))
    tl.store(kld_rev_ptr + row, tl.where(valid, -LN2_EFF * tqr / sb_s + (log_sa - log_sb), nan))
    tl.store(lse_ref_ptr + row, tl.where(valid, lse_a, nan))
    tl.store(lse_q_ptr + row, tl.where(valid, lse_b, nan))
    tl.store(entropy_ptr + row, tl.where(valid, log_sa - LN2_EFF * h / sa_s, nan))
    tl.store(top1_ref_ptr + row, tl.where(valid, ia, -1))
    tl.store(top1_q_ptr + row, tl.where(valid, ib, -1))
    if HAS_LABELS:
        ay, by = _label_values(labels_ptr, row, vocab, a_vals, b_vals, a_scale, a_off, b_scale,
                               b_off, A_LLAMA, B_LLAMA)
        ay = ay.to(tl.float64)
        by = by.to(tl.float64)
        if PARITY:  # the reference row already holds log-probs: not renormalised
            nll_a = -ay
        else:
            nll_a = lse_a - ay
        if PARITY and B_LLAMA:  # so does a llama.cpp quant file's row (as llama.cpp uses it)
            nll_b = -by
        else:
            nll_b = lse_b - by
        tl.store(nll_ref_ptr + row, tl.where(valid, nll_a, nan))
        tl.store(nll_q_ptr + row, tl.where(valid, nll_b, nan))
        tl.store(p_ref_y_ptr + row, tl.where(valid, _exp_f64(-nll_a), nan))
        tl.store(p_q_y_ptr + row, tl.where(valid, _exp_f64(-nll_b), nan))
        if RANK:
            _finish_label(row, valid, ay, by, best_a, best_b, sec_a, sec_b, cnt_a, cnt_b,
                          rank_ref_ptr, rank_q_ptr, margin_ref_ptr, margin_q_ptr)
    if TOP2:
        # log p of a value v: LN2_EFF (v log2e - K) - log S, the float64 fma exact where the
        # float32 one rounds (v - lse would cancel two huge numbers in rows near 1e37)
        tl.store(top1_lp_ref_ptr + row, tl.where(valid, _logp_of(best_a, ka, log_sa), nan))
        tl.store(top1_lp_q_ptr + row, tl.where(valid, _logp_of(best_b, kb, log_sb), nan))
        tl.store(top2_lp_ref_ptr + row, tl.where(valid, _logp_of(sec_a, ka, log_sa), nan))
        tl.store(top2_lp_q_ptr + row, tl.where(valid, _logp_of(sec_b, kb, log_sb), nan))
    if STATE:  # for the distance pass: the shifts and sums that normalise p and q (NaN: invalid)
        tl.store(state_ptr + row * N_STATE, ka)
        tl.store(state_ptr + row * N_STATE + 1, kb)
        tl.store(state_ptr + row * N_STATE + 2, tl.where(valid, sa, nan))
        tl.store(state_ptr + row * N_STATE + 3, tl.where(valid, sb, nan))
    if PARITY:
        # p_i(llama) = exp(x_i) = exp(lse_a) e_i / S_ref; log p_i - log q_i = ln2 d_i + ln2 k_a
        # + log S_q (see row_kernel.h), less lse_q when q's rows are log-probs as they are.
        q_offset = LN2_EFF * ka + log_sb
        if B_LLAMA:
            q_offset -= lse_b
        kl = _exp_f64(lse_a) / sa_s * (LN2_EFF * wt + q_offset * ws)
        tl.store(kld_llama_ptr + row, tl.where(valid, kl, nan))


@triton.jit
def _label_values(labels_ptr, row, vocab, a_vals, b_vals, a_scale, a_off, b_scale, b_off,
                  A_LLAMA: tl.constexpr, B_LLAMA: tl.constexpr):
    """The label's float32 values on both sides (the label clamped: the launcher checked it)."""
    y = tl.load(labels_ptr + row)
    y = tl.minimum(tl.maximum(y, 0), vocab - 1)
    return (_load_one(a_vals, y, a_scale, a_off, A_LLAMA),
            _load_one(b_vals, y, b_scale, b_off, B_LLAMA))


@triton.jit
def _logp_of(v, k, log_s):
    """log p of the float32 value v (as float64) in a row with float64 shift k and sum S."""
    return LN2_EFF * tl.fma(v, LOG2E_F32, -k) - log_s


@triton.jit
def _finish_label(row, valid, ay, by, best_a, best_b, sec_a, sec_b, cnt_a, cnt_b,
                  rank_ref_ptr, rank_q_ptr, margin_ref_ptr, margin_q_ptr):
    """The label's rank (entries strictly above it) and margin over the best other entry: the
    row max when something beats the label, else (the label is a max) the second largest."""
    tl.store(rank_ref_ptr + row, tl.where(valid, cnt_a, -1))
    tl.store(rank_q_ptr + row, tl.where(valid, cnt_b, -1))
    other_a = tl.where(cnt_a > 0, best_a, sec_a)
    other_b = tl.where(cnt_b > 0, best_b, sec_b)
    tl.store(margin_ref_ptr + row, tl.where(valid, ay - other_a, float("nan")))
    tl.store(margin_q_ptr + row, tl.where(valid, by - other_b, float("nan")))


@triton.jit
def _row_pointers(a_ptr, b_ptr, row, stride_a, stride_b, A_LLAMA: tl.constexpr,
                  B_LLAMA: tl.constexpr):
    a_row = a_ptr + row * stride_a
    b_row = b_ptr + row * stride_b
    if A_LLAMA:
        a_scale, a_off = _llama_header(a_row)
        a_vals = a_row + 4
    else:
        a_scale = 1.0
        a_off = 0.0
        a_vals = a_row
    if B_LLAMA:
        b_scale, b_off = _llama_header(b_row)
        b_vals = b_row + 4
    else:
        b_scale = 1.0
        b_off = 0.0
        b_vals = b_row
    return a_vals, b_vals, a_scale, a_off, b_scale, b_off


@triton.jit
def _split_columns(split, cols_per_split, vocab, SPLIT: tl.constexpr, BLOCK_V: tl.constexpr):
    """The columns [begin, end) a program covers (the whole row unless SPLIT), and full_end:
    where its last whole block of BLOCK_V ends (the masked tail starts there)."""
    if SPLIT:
        begin = split * cols_per_split
        end = tl.minimum(begin + cols_per_split, vocab)
    else:
        begin = 0
        end = vocab
    full_end = begin + ((end - begin) // BLOCK_V) * BLOCK_V
    return begin, end, full_end


@triton.jit
def _logit_stats_kernel(
    a_ptr, b_ptr, stride_a, stride_b, vocab, cols_per_split, labels_ptr,
    kld_ptr, kld_rev_ptr, lse_ref_ptr, lse_q_ptr, entropy_ptr, top1_ref_ptr, top1_q_ptr,
    nll_ref_ptr, nll_q_ptr, p_ref_y_ptr, p_q_y_ptr, kld_llama_ptr,
    top1_lp_ref_ptr, top1_lp_q_ptr, top2_lp_ref_ptr, top2_lp_q_ptr,
    rank_ref_ptr, rank_q_ptr, margin_ref_ptr, margin_q_ptr, state_ptr, part_ptr,
    A_LLAMA: tl.constexpr, B_LLAMA: tl.constexpr, PARITY: tl.constexpr,
    HAS_LABELS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_V: tl.constexpr,
    FUSED: tl.constexpr, NUM_STAGES: tl.constexpr, TOP2: tl.constexpr, RANK: tl.constexpr,
    STATE: tl.constexpr,
):
    """One program per (row, split). SPLIT=False: the whole row, outputs written here.
    Optional outputs: TOP2 (top-1/top-2 log-probs), RANK (the label's ranks and margins; needs
    labels), STATE (the row's shifts and sums for _logit_stats_dist_kernel)."""
    SECOND: tl.constexpr = TOP2 or RANK
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    a_vals, b_vals, a_scale, a_off, b_scale, b_off = _row_pointers(
        a_ptr, b_ptr, row, stride_a, stride_b, A_LLAMA, B_LLAMA)
    begin, end, full_end = _split_columns(split, cols_per_split, vocab, SPLIT, BLOCK_V)

    ka = tl.full((), K_FLOOR, tl.float32)
    kb = tl.full((), K_FLOOR, tl.float32)
    la = tl.zeros((), tl.float32)
    lb = tl.zeros((), tl.float32)
    sa, sb, trq, tqr, h, wt, ws = _zero_sums()
    best_a = tl.full((), float("-inf"), tl.float32)
    best_b = tl.full((), float("-inf"), tl.float32)
    ia = tl.full((), -1, tl.int32)
    ib = tl.full((), -1, tl.int32)
    bad = tl.zeros((), tl.int1)
    sec_a = tl.full((), float("-inf"), tl.float32)
    sec_b = tl.full((), float("-inf"), tl.float32)
    cnt_a = tl.zeros((), tl.int32)
    cnt_b = tl.zeros((), tl.int32)
    if RANK:  # the label's values, which the rank counts compare every entry with
        ya, yb = _label_values(labels_ptr, row, vocab, a_vals, b_vals, a_scale, a_off, b_scale,
                               b_off, A_LLAMA, B_LLAMA)
    else:
        ya = tl.zeros((), tl.float32)
        yb = tl.zeros((), tl.float32)
    cols = tl.arange(0, BLOCK_V)
    # Whole blocks without masks, then the tail with them (MASKED is a compile-time switch).
    for start in tl.range(begin, full_end, BLOCK_V, num_stages=NUM_STAGES):
        (ka, la, kb, lb, sa, sb, trq, tqr, h, wt, ws, best_a, ia, best_b, ib, bad,
         sec_a, sec_b, cnt_a, cnt_b) = _load_fold(
            a_vals, b_vals, start + cols, end, a_scale, a_off, b_scale, b_off,
            ka, la, kb, lb, sa, sb, trq, tqr, h, wt, ws, best_a, ia, best_b, ib, bad,
            sec_a, sec_b, ya, yb, cnt_a, cnt_b, A_LLAMA, B_LLAMA, PARITY, FUSED, False,
            SECOND, RANK)
    if full_end < end:
        (ka, la, kb, lb, sa, sb, trq, tqr, h, wt, ws, best_a, ia, best_b, ib, bad,
         sec_a, sec_b, cnt_a, cnt_b) = _load_fold(
            a_vals, b_vals, full_end + cols, end, a_scale, a_off, b_scale, b_off,
            ka, la, kb, lb, sa, sb, trq, tqr, h, wt, ws, best_a, ia, best_b, ib, bad,
            sec_a, sec_b, ya, yb, cnt_a, cnt_b, A_LLAMA, B_LLAMA, PARITY, FUSED, True,
            SECOND, RANK)

    if SPLIT:
        if SECOND:
            p = part_ptr + (row * tl.num_programs(1) + split) * N_PART_SECOND
            tl.store(p + 14, sec_a.to(tl.float64))
            tl.store(p + 15, sec_b.to(tl.float64))
            tl.store(p + 16, cnt_a.to(tl.float64))
            tl.store(p + 17, cnt_b.to(tl.float64))
        else:
            p = part_ptr + (row * tl.num_programs(1) + split) * N_PART
        tl.store(p + 0, _shift64(ka, la))
        tl.store(p + 1, _shift64(kb, lb))
        tl.store(p + 2, sa)
        tl.store(p + 3, sb)
        tl.store(p + 4, trq)
        tl.store(p + 5, tqr)
        tl.store(p + 6, h)
        tl.store(p + 7, wt)
        tl.store(p + 8, ws)
        tl.store(p + 9, best_a.to(tl.float64))
        tl.store(p + 10, best_b.to(tl.float64))
        tl.store(p + 11, ia.to(tl.float64))
        tl.store(p + 12, ib.to(tl.float64))
        tl.store(p + 13, bad.to(tl.float64))
    else:
        _finish(row, _shift64(ka, la), _shift64(kb, lb), sa, sb, trq, tqr, h, wt, ws, ia, ib, bad,
                a_vals, b_vals, a_scale, a_off, b_scale, b_off, labels_ptr, vocab,
                kld_ptr, kld_rev_ptr, lse_ref_ptr, lse_q_ptr, entropy_ptr, top1_ref_ptr,
                top1_q_ptr, nll_ref_ptr, nll_q_ptr, p_ref_y_ptr, p_q_y_ptr, kld_llama_ptr,
                best_a.to(tl.float64), best_b.to(tl.float64), sec_a.to(tl.float64),
                sec_b.to(tl.float64), cnt_a, cnt_b,
                top1_lp_ref_ptr, top1_lp_q_ptr, top2_lp_ref_ptr, top2_lp_q_ptr,
                rank_ref_ptr, rank_q_ptr, margin_ref_ptr, margin_q_ptr, state_ptr,
                A_LLAMA, B_LLAMA, PARITY, HAS_LABELS, TOP2, RANK, STATE)


@triton.jit
def _logit_stats_merge_kernel(
    a_ptr, b_ptr, stride_a, stride_b, vocab, n_splits, labels_ptr,
    kld_ptr, kld_rev_ptr, lse_ref_ptr, lse_q_ptr, entropy_ptr, top1_ref_ptr, top1_q_ptr,
    nll_ref_ptr, nll_q_ptr, p_ref_y_ptr, p_q_y_ptr, kld_llama_ptr,
    top1_lp_ref_ptr, top1_lp_q_ptr, top2_lp_ref_ptr, top2_lp_q_ptr,
    rank_ref_ptr, rank_q_ptr, margin_ref_ptr, margin_q_ptr, state_ptr, part_ptr,
    A_LLAMA: tl.constexpr, B_LLAMA: tl.constexpr, PARITY: tl.constexpr,
    HAS_LABELS: tl.constexpr, TOP2: tl.constexpr, RANK: tl.constexpr, STATE: tl.constexpr,
):
    """Second pass of the split variant: merge a row's splits in vocabulary order, finish it."""
    SECOND: tl.constexpr = TOP2 or RANK
    row = tl.program_id(0).to(tl.int64)
    a_vals, b_vals, a_scale, a_off, b_scale, b_off = _row_pointers(
        a_ptr, b_ptr, row, stride_a, stride_b, A_LLAMA, B_LLAMA)
    ka = tl.full((), K_FLOOR, tl.float64)
    kb = tl.full((), K_FLOOR, tl.float64)
    sa, sb, trq, tqr, h, wt, ws = _zero_sums()
    best_a = tl.full((), float("-inf"), tl.float64)
    best_b = tl.full((), float("-inf"), tl.float64)
    ia = tl.full((), -1, tl.int32)
    ib = tl.full((), -1, tl.int32)
    bad = tl.zeros((), tl.int1)
    sec_a = tl.full((), float("-inf"), tl.float64)
    sec_b = tl.full((), float("-inf"), tl.float64)
    cnt_a = tl.zeros((), tl.int32)
    cnt_b = tl.zeros((), tl.int32)
    for s in range(0, n_splits):
        if SECOND:
            p = part_ptr + (row * n_splits + s) * N_PART_SECOND
        else:
            p = part_ptr + (row * n_splits + s) * N_PART
        ka_s = tl.load(p + 0)
        kb_s = tl.load(p + 1)
        na = tl.maximum(ka, ka_s)
        nb = tl.maximum(kb, kb_s)
        sa, sb, trq, tqr, h, wt, ws = _rescale(ka, kb, na, nb, sa, sb, trq, tqr, h, wt, ws)
        sa_s, sb_s, trq_s, tqr_s, h_s, wt_s, ws_s = _rescale(
            ka_s, kb_s, na, nb, tl.load(p + 2), tl.load(p + 3), tl.load(p + 4), tl.load(p + 5),
            tl.load(p + 6), tl.load(p + 7), tl.load(p + 8))
        ka = na
        kb = nb
        sa += sa_s
        sb += sb_s
        trq += trq_s
        tqr += tqr_s
        h += h_s
        wt += wt_s
        ws += ws_s
        bv_a = tl.load(p + 9)
        bv_b = tl.load(p + 10)
        if SECOND:
            sec_a = tl.maximum(sec_a, tl.maximum(tl.minimum(best_a, bv_a), tl.load(p + 14)))
            sec_b = tl.maximum(sec_b, tl.maximum(tl.minimum(best_b, bv_b), tl.load(p + 15)))
            cnt_a += tl.load(p + 16).to(tl.int32)
            cnt_b += tl.load(p + 17).to(tl.int32)
        if bv_a > best_a:  # splits come in vocabulary order: strict keeps the lowest index
            best_a = bv_a
            ia = tl.load(p + 11).to(tl.int32)
        if bv_b > best_b:
            best_b = bv_b
            ib = tl.load(p + 12).to(tl.int32)
        bad = bad | (tl.load(p + 13) != 0.0)
    _finish(row, ka, kb, sa, sb, trq, tqr, h, wt, ws, ia, ib, bad,
            a_vals, b_vals, a_scale, a_off, b_scale, b_off, labels_ptr, vocab,
            kld_ptr, kld_rev_ptr, lse_ref_ptr, lse_q_ptr, entropy_ptr, top1_ref_ptr,
            top1_q_ptr, nll_ref_ptr, nll_q_ptr, p_ref_y_ptr, p_q_y_ptr, kld_llama_ptr,
            best_a, best_b, sec_a, sec_b, cnt_a, cnt_b,
            top1_lp_ref_ptr, top1_lp_q_ptr, top2_lp_ref_ptr, top2_lp_q_ptr,
            rank_ref_ptr, rank_q_ptr, margin_ref_ptr, margin_q_ptr, state_ptr,
            A_LLAMA, B_LLAMA, PARITY, HAS_LABELS, TOP2, RANK, STATE)


# ---------------------------------------------------------------------------------------------
# the distance pass (tvd, jsd): a third read of each row pair, only when asked for
# ---------------------------------------------------------------------------------------------


@triton.jit
def _log2_f32(x, HW_LOG: tl.constexpr):
    """log2 in float32: HW_LOG, one hardware lg2.approx (about 2^-22 absolute; compiled
    kernels only), else tl.log2 (a libm-like polynomial of about 20 instructions)."""
    if HW_LOG:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _jsd_h(z, HW_LOG: tl.constexpr):
    """h(z) = (1+z) log(1+z) + (1-z) log(1-z) for |z| <= 1 (float32): p log(p/m) + q log(q/m)
    = m h(z) with m = (p+q)/2, z = (p-q)/(p+q). Below |z| = 1/4 its series in w = z^2,
    sum_k w^k / (k (2k-1)) (six terms: 1e-8 relative), all terms positive, so no cancellation
    when p ~ q; above, two hardware log2s (about 2^-22 absolute each, against h >= 0.06)."""
    a = tl.abs(z)
    w = a * a
    poly = 1.0 / 66.0
    poly = poly * w + 1.0 / 45.0
    poly = poly * w + 1.0 / 28.0
    poly = poly * w + 1.0 / 15.0
    poly = poly * w + 1.0 / 6.0
    poly = poly * w + 1.0
    direct = LN2_F32 * ((1.0 + a) * _log2_f32(1.0 + a, HW_LOG)
                        + tl.where(a < 1.0, (1.0 - a) * _log2_f32(1.0 - a, HW_LOG), 0.0))
    return tl.where(a < 0.25, w * poly, direct)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _split_shift(k):
    """The float32 pair (hi, lo) of an exact float64 shift k = hi + lo (what _shift_of made)."""
    hi = k.to(tl.float32)
    lo = tl.where((k < float("inf")) & (k > float("-inf")), (k - hi.to(tl.float64)).to(tl.float32),
                  0.0)
    return hi, lo


@triton.jit
def _dist_block(x, y, ka, la, kb, lb, ra, rb, JSD: tl.constexpr, FUSED: tl.constexpr,
                HW_LOG: tl.constexpr):
    """A block's sum |p - q| and (with JSD) sum (p + q) h(z), float32: p = 2^t_ref / S_ref with
    t exactly as the statistics pass made it, 1/S rounded to float32 once per row."""
    if (la != 0.0) | (lb != 0.0):  # rows beyond |max| ~ 5.8e6 only: a uniform branch
        ta = tl.fma(x, LOG2E, -ka) - la
        tb = tl.fma(y, LOG2E, -kb) - lb
    else:
        ta = tl.fma(x, LOG2E, -ka)
        tb = tl.fma(y, LOG2E, -kb)
    p = tl.exp2(ta) * ra
    q = tl.exp2(tb) * rb
    diff = p - q
    if JSD:
        s = p + q
        # 2-ulp division: z's own error is 1e-7 relative, like p's and q's
        js = tl.where(s > 0.0, s * _jsd_h(tl.fdiv(diff, s, ieee_rounding=False), HW_LOG), 0.0)
        if FUSED:
            tv_sum, js_sum = tl.reduce((tl.abs(diff), js), 0, _add2)
        else:
            tv_sum = tl.sum(tl.abs(diff), 0)
            js_sum = tl.sum(js, 0)
    else:
        tv_sum = tl.sum(tl.abs(diff), 0)
        js_sum = 0.0
    return tv_sum, js_sum


@triton.jit
def _finish_dist(row, tv, js, s_a, s_b, tvd_ptr, jsd_ptr, TVD: tl.constexpr, JSD: tl.constexpr):
    """tvd = 1/2 sum |p - q|, jsd = 1/4 sum (p + q) h(z); NaN where the row is invalid."""
    valid = (s_a == s_a) & (s_b == s_b)
    if TVD:
        tl.store(tvd_ptr + row, tl.where(valid, 0.5 * tv, float("nan")))
    if JSD:
        tl.store(jsd_ptr + row, tl.where(valid, 0.25 * js, float("nan")))


@triton.jit
def _logit_stats_dist_kernel(
    a_ptr, b_ptr, stride_a, stride_b, vocab, cols_per_split, state_ptr, tvd_ptr, jsd_ptr,
    part_ptr, A_LLAMA: tl.constexpr, B_LLAMA: tl.constexpr, TVD: tl.constexpr,
    JSD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_V: tl.constexpr, FUSED: tl.constexpr,
    NUM_STAGES: tl.constexpr, HW_LOG: tl.constexpr,
):
    """One program per (row, split), after the statistics pass has written each row's shifts
    and sums to state_ptr (STATE): TVD and JSD from the normalised p and q. SPLIT: each split's
    two float64 sums to part_ptr for _logit_stats_dist_merge_kernel."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    a_vals, b_vals, a_scale, a_off, b_scale, b_off = _row_pointers(
        a_ptr, b_ptr, row, stride_a, stride_b, A_LLAMA, B_LLAMA)
    begin, end, full_end = _split_columns(split, cols_per_split, vocab, SPLIT, BLOCK_V)
    ka, la = _split_shift(tl.load(state_ptr + row * N_STATE))
    kb, lb = _split_shift(tl.load(state_ptr + row * N_STATE + 1))
    s_a = tl.load(state_ptr + row * N_STATE + 2)
    s_b = tl.load(state_ptr + row * N_STATE + 3)
    ra = (1.0 / s_a).to(tl.float32)
    rb = (1.0 / s_b).to(tl.float32)
    tv = tl.zeros((), tl.float64)
    js = tl.zeros((), tl.float64)
    cols = tl.arange(0, BLOCK_V)
    for start in tl.range(begin, full_end, BLOCK_V, num_stages=NUM_STAGES):
        offs = start + cols
        x = _load_block(a_vals, offs, offs < end, a_scale, a_off, A_LLAMA, False)
        y = _load_block(b_vals, offs, offs < end, b_scale, b_off, B_LLAMA, False)
        b_tv, b_js = _dist_block(x, y, ka, la, kb, lb, ra, rb, JSD, FUSED, HW_LOG)
        tv += b_tv.to(tl.float64)
        js += b_js.to(tl.float64)
    if full_end < end:
        offs = full_end + cols
        x = _load_block(a_vals, offs, offs < end, a_scale, a_off, A_LLAMA, True)
        y = _load_block(b_vals, offs, offs < end, b_scale, b_off, B_LLAMA, True)
        b_tv, b_js = _dist_block(x, y, ka, la, kb, lb, ra, rb, JSD, FUSED, HW_LOG)
        tv += b_tv.to(tl.float64)
        js += b_js.to(tl.float64)
    if SPLIT:
        p = part_ptr + (row * tl.num_programs(1) + split) * 2
        tl.store(p, tv)
        tl.store(p + 1, js)
    else:
        _finish_dist(row, tv, js, s_a, s_b, tvd_ptr, jsd_ptr, TVD, JSD)


@triton.jit
def _logit_stats_dist_merge_kernel(state_ptr, n_splits, tvd_ptr, jsd_ptr, part_ptr,
                                   TVD: tl.constexpr, JSD: tl.constexpr):
    """The split distance pass's sums of a row, added in vocabulary order, and finished."""
    row = tl.program_id(0).to(tl.int64)
    tv = tl.zeros((), tl.float64)
    js = tl.zeros((), tl.float64)
    for s in range(0, n_splits):
        tv += tl.load(part_ptr + (row * n_splits + s) * 2)
        js += tl.load(part_ptr + (row * n_splits + s) * 2 + 1)
    _finish_dist(row, tv, js, tl.load(state_ptr + row * N_STATE + 2),
                 tl.load(state_ptr + row * N_STATE + 3), tvd_ptr, jsd_ptr, TVD, JSD)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------



def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _num_sms(device) -> int:
    import torch

    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(n_rows: int, vocab: int, itemsize: int, num_sms: int) -> tuple[int, int, int, int]:
    """(block_v, num_warps, num_stages, splits) for a problem.

    16 entries per thread and side in every block (see the module docstring: the per-block
    reductions cost about as much as 8 entries' arithmetic): blocks of up to 2048 entries over
    up to 4 warps, the next block's loads pipelined behind this one (num_stages=2). A
    vocabulary split only when the rows alone cannot fill about two waves of the chip. Chosen
    from instruction and register counts of the sm_90 build, not yet from H100 timings:
    benchmarks/bench_gpu.py --sweep times the alternatives. itemsize does not change the choice
    (float32 blocks carry twice the bytes, with twice the time per pair to spend).
    """
    del itemsize
    block_v = min(2048, triton.next_power_of_2(max(vocab, 16)))
    num_warps = max(1, min(4, block_v // 512))
    num_stages = 2 if block_v >= 1024 else 1
    splits = 1
    if n_rows < 2 * num_sms:
        want = -(-2 * num_sms // max(n_rows, 1))
        splits = max(1, min(want, vocab // (4 * block_v)))
    return block_v, num_warps, num_stages, splits


def logit_stats(
    ref,
    q,
    labels=None,
    *,
    vocab: int | None = None,
    ref_dtype: str | None = None,
    q_dtype: str | None = None,
    llama_parity: bool = False,
    out: dict | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    splits: int | None = None,
    fused_reduce: bool | None = None,
    extra=(),
) -> dict:
    """Per-token statistics of ``ref`` against ``q`` as torch tensors on their device.

    ref, q: torch tensors [tokens, vocab] of float32/float16/bfloat16 (row stride free, elements
    contiguous), or with ``*_dtype='llama_u16'`` int16/uint16 [tokens, words] llama.cpp rows
    (then ``vocab`` is required). labels: optional int64 [tokens] on the same device, each in
    [0, vocab) (the caller checks the range; out-of-range labels are clamped, never read out of
    bounds). Returns {name: tensor}: float64 kld (KL(P_ref || P_q), nats), kld_reverse, lse_ref,
    lse_q, entropy_ref; int32 top1_ref, top1_q; with labels float64 nll_ref, nll_q, p_ref_y,
    p_q_y; with llama_parity float64 kld_llama. extra: the optional output groups
    (fidelity_kld.ops.EXTRA_GROUPS: "top2", "label" with labels, "tvd", "jsd", "all"), as
    reference.py defines them: float64 logp_top1_*/logp_top2_*, margin_*, tvd, jsd, int32
    rank_*_y. ``out`` may supply any of these tensors.
    block_v / num_warps / num_stages / splits / fused_reduce override the launch heuristic
    (tests and benchmarks).
    """
    import torch

    a_llama = ref_dtype == "llama_u16"
    b_llama = q_dtype == "llama_u16"
    if llama_parity and not a_llama:
        raise ValueError("llama_parity needs a llama_u16 reference")
    for name, x, is_llama in (("ref", ref, a_llama), ("q", q, b_llama)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [tokens, vocab], got {x.dim()}-D")
        if is_llama:
            if x.dtype not in (torch.int16, torch.uint16):
                raise ValueError(f"{name}: llama_u16 rows must be an int16/uint16 tensor, got {x.dtype}")
        elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: unsupported dtype {x.dtype}")
    if (a_llama or b_llama) and vocab is None:
        raise ValueError("llama_u16 rows need vocab=")
    v = int(vocab) if vocab is not None else int(ref.shape[1])
    for name, x, is_llama in (("ref", ref, a_llama), ("q", q, b_llama)):
        need = v + 4 if is_llama else v
        if (x.shape[1] < need) if is_llama else (x.shape[1] != need):
            raise ValueError(f"{name} has {x.shape[1]} columns, expected {need} for vocab {v}")
    if ref.shape[0] != q.shape[0]:
        raise ValueError(f"ref has {ref.shape[0]} tokens but q has {q.shape[0]}")
    if v < 1:
        raise ValueError("vocab must be >= 1")
    if ref.device != q.device:
        raise ValueError(f"ref is on {ref.device} but q is on {q.device}")
    n = int(ref.shape[0])
    device = ref.device

    def rows_ok(x):
        return x.stride(1) == 1 or x.shape[1] == 1 or x.shape[0] == 0

    ref = ref if rows_ok(ref) else ref.contiguous()
    q = q if rows_ok(q) else q.contiguous()
    if a_llama and ref.dtype == torch.uint16:
        ref = ref.view(torch.int16)
    if b_llama and q.dtype == torch.uint16:
        q = q.view(torch.int16)

    if labels is not None:
        labels = labels.reshape(-1).to(device=device, dtype=torch.int64).contiguous()
        if labels.shape[0] != n:
            raise ValueError(f"labels has {labels.shape[0]} entries for {n} tokens")
    from fidelity_kld.gpu import allocate_outputs  # the wheel ships this module inside fidelity_kld

    out = allocate_outputs(n, device, labels is not None, llama_parity, out, extra)
    if n == 0:
        return out

    itemsize = 2 if a_llama else ref.element_size()
    bv, nw, nst, ns = default_config(n, v, max(itemsize, q.element_size()), _num_sms(device))
    block_v = int(block_v or bv)
    num_warps = int(num_warps or nw)
    num_stages = int(num_stages or nst)
    splits = int(splits or ns)
    cols_per_split = -(-v // splits)
    cols_per_split = -(-cols_per_split // block_v) * block_v  # whole blocks per split
    splits = -(-v // cols_per_split)
    fused = (not _interpreting()) if fused_reduce is None else bool(fused_reduce)

    dummy_f = out["kld"]
    dummy_i = out["top1_ref"]
    top2 = "logp_top1_ref" in out
    rank = "rank_ref_y" in out
    tvd, jsd = "tvd" in out, "jsd" in out
    state = (torch.empty((n, N_STATE.value), dtype=torch.float64, device=device)
             if tvd or jsd else dummy_f)
    ptrs = [
        out["kld"], out["kld_reverse"], out["lse_ref"], out["lse_q"], out["entropy_ref"],
        out["top1_ref"], out["top1_q"],
        *(out.get(name, dummy_f) for name in ("nll_ref", "nll_q", "p_ref_y", "p_q_y", "kld_llama",
                                               "logp_top1_ref", "logp_top1_q", "logp_top2_ref",
                                               "logp_top2_q")),
        out.get("rank_ref_y", dummy_i), out.get("rank_q_y", dummy_i),
        out.get("margin_ref", dummy_f), out.get("margin_q", dummy_f), state,
    ]
    labels_arg = labels if labels is not None else out["top1_ref"]
    flags = dict(A_LLAMA=a_llama, B_LLAMA=b_llama, PARITY=bool(llama_parity),
                 HAS_LABELS=labels is not None, TOP2=top2, RANK=rank, STATE=tvd or jsd)
    launch = dict(BLOCK_V=block_v, FUSED=fused, NUM_STAGES=num_stages, num_warps=num_warps)
    stride_a, stride_b = ref.stride(0), q.stride(0)
    with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
        if splits == 1:
            _logit_stats_kernel[(n, 1)](
                ref, q, stride_a, stride_b, v, v, labels_arg, *ptrs, dummy_f, SPLIT=False,
                **launch, **flags)
        else:
            words = (N_PART_SECOND if top2 or rank else N_PART).value
            part = torch.empty((n, splits, words), dtype=torch.float64, device=device)
            _logit_stats_kernel[(n, splits)](
                ref, q, stride_a, stride_b, v, cols_per_split, labels_arg, *ptrs, part,
                SPLIT=True, **launch, **flags)
            _logit_stats_merge_kernel[(n,)](
                ref, q, stride_a, stride_b, v, splits, labels_arg, *ptrs, part,
                num_warps=1, **flags)
        if tvd or jsd:  # the third pass, once every row's lse is known
            _distances(ref, q, v, cols_per_split, splits, state, out.get("tvd", dummy_f),
                       out.get("jsd", dummy_f), a_llama, b_llama, tvd, jsd, launch)
    return out


def _distances(ref, q, vocab, cols_per_split, splits, state, tvd_out, jsd_out, a_llama, b_llama,
               tvd, jsd, launch):
    """Queue the distance pass (tvd, jsd) over the rows, split like the statistics pass."""
    import torch

    n = int(ref.shape[0])
    flags = dict(A_LLAMA=a_llama, B_LLAMA=b_llama, TVD=tvd, JSD=jsd, HW_LOG=not _interpreting())
    args = (ref, q, ref.stride(0), q.stride(0), vocab)
    if splits == 1:
        _logit_stats_dist_kernel[(n, 1)](*args, vocab, state, tvd_out, jsd_out, state,
                                         SPLIT=False, **launch, **flags)
        return
    part = torch.empty((n, splits, 2), dtype=torch.float64, device=ref.device)
    _logit_stats_dist_kernel[(n, splits)](*args, cols_per_split, state, tvd_out, jsd_out, part,
                                          SPLIT=True, **launch, **flags)
    _logit_stats_dist_merge_kernel[(n,)](state, splits, tvd_out, jsd_out, part, TVD=tvd, JSD=jsd,
                                         num_warps=1)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
