// CUDA kernel for the fused per-token logit statistics: the GPU twin of csrc/cpu/row_kernel.h and
// of kernels/logit_stats.py, with the same outputs, the same -inf/NaN/tie rules and the same
// float64 finish.
//
// Design (the bf16 4096 x 152064 target is about 90% of an H100's HBM read bandwidth, so the
// kernel must stay memory-bound: every input byte read once, a handful of instructions per
// element, no synchronisation inside the vocabulary loop):
//
// - One CTA of 256 threads per row (grid.x = row). Each thread walks the row in steps of 8
//   elements, consecutive threads on consecutive steps, so a warp reads 256 (16-bit) or 512
//   (float32) contiguous bytes per side per step with 16-byte loads (__ldcs: the logits are read
//   once, keep them out of the way in L2). Several steps are loaded before the first is used
//   (kUnroll), which with 2-3 resident CTAs per SM keeps enough bytes in flight for HBM.
// - Each thread keeps its own online state: an integer shift per side, k = ceil(max * log2 e)
//   (float32; beyond |max| ~ 5.8e6 a pair hi + lo, see shift_of in row_math.cuh), so the row
//   max lands at t = fma(x, log2e, -k) in (-1, 0]; the element terms are
//   e = 2^t, d = t_ref - t_q and per step (8 elements) S_ref, S_q, T_rq = sum e_ref d,
//   T_qr = sum e_q d, H = sum e_ref t_ref in float32, then added to float64 running sums. When a
//   step raises a thread's max the running sums are rescaled once for that step (exact powers
//   of two plus exact shift terms, see rescale()), never per element. No block-wide max is
//   needed until the end of the row.
// - At the end the CTA agrees on the largest shifts (one block max), each thread moves its
//   float64 sums onto them, and one block reduction (warp shuffles, then shared memory) sums
//   them; the argmax reduction keeps the largest value and, on ties, the lowest index.
// - The step body first runs unmasked (plain FMAs). Only a step holding -inf (masked
//   vocabulary) turns a sum into NaN through 0 * inf; that step is recomputed from registers
//   with the masked formulas (a term with e = 0 contributes 0). Real NaN inputs make S NaN,
//   which marks the row invalid, as +inf (an infinite shift) and rows without a finite entry do.
// - Few rows, huge vocabularies: grid.y splits each row into vocab_splits ranges; each CTA
//   writes its merged state to a small float64 workspace (cudaMallocAsync on the caller's
//   stream) and a second tiny kernel merges a row's splits in vocabulary order and finishes it.
// - Finish in float64 (log/exp from CUDA's double-precision math library):
//   KL(P||Q) = ln2 T_rq / S_ref + log(S_q / S_ref), KL(Q||P) = -ln2 T_qr / S_q + log(S_ref / S_q),
//   lse = ln2 k + log S, entropy = log S_ref - ln2 H / S_ref, with ln2 = 1/float32(log2 e).
// - Loads whose rows are not 16-byte aligned (odd vocabularies, llama_u16 rows whose 8-byte
//   header shifts the codes) use the widest access the row's alignment allows (16/8/4/2 bytes),
//   chosen once per row; head and tail elements are folded in by one thread each.
// - Built without --use_fast_math: nothing is relaxed but exp2, which is one ex2.approx.ftz
//   (2 ulp; results below 2^-126 flush to 0, as on the CPU and in Triton).
//
// - Optional outputs (issue 16; reference.py defines them), computed only when their pointers
//   are set: top-2 log-probs, label ranks and margins ride in the rows kernel's kExtra
//   instantiation (per step the second largest value per side and the count of entries above
//   the label's value, merged like the argmax; the kernel without them is the one before);
//   TVD and JSD take a distance kernel over (row, split) after the statistics pass has written
//   each row's shifts and sums to a stream-ordered workspace: a third read of the rows.
//
// Inputs: float32, float16, bfloat16, llama_u16 (a float32 scale and minimum, then uint16 codes
// decoded as fma(code, scale, min), like the CPU's SIMD paths) on either side.
//
// The per-thread arithmetic lives in row_math.cuh as __host__ __device__ code, so that the exact
// traversal and merge run on the CPU in tests/test_cuda_compile.py; this file holds what needs
// the GPU: the kernels, the block reduction and the launch.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "fidelity_kld/logit_stats_cuda.h"
#include "row_math.cuh"

namespace fk {
namespace {

using namespace cuda_detail;

constexpr int kWarps = kThreads / 32;

#define FK_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    const cudaError_t fk_err_ = (expr);                                                  \
    FK_RUNTIME_CHECK(fk_err_ == cudaSuccess,                                             \
                     "CUDA error in " #expr ": " << cudaGetErrorString(fk_err_));        \
  } while (0)

// ----------------------------------------------------------------------------------------------
// block reductions (every thread gets the result)
// ----------------------------------------------------------------------------------------------

struct Shared {
  double sums[7][kWarps];
  double shifts[2][kWarps];
  float best[2][kWarps];
  int index[2][kWarps];
  float second[2][kWarps];  // kExtra only
  int count[2][kWarps];
};

// The block's state, reduced from every thread's `s`; returned in every thread. kExtra: also
// the second largest values (multiset: a max that two threads share is also the second) and
// the label counts.
template <bool kExtra>
__device__ State block_merge(State s, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // 1. The block's shifts (exact float64 sums of each thread's hi + lo).
  double ka = shift64(s.ka, s.la), kb = shift64(s.kb, s.lb);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ka = fmax(ka, __shfl_xor_sync(0xffffffffu, ka, o));
    kb = fmax(kb, __shfl_xor_sync(0xffffffffu, kb, o));
  }
  if (lane == 0) {
    sh.shifts[0][warp] = ka;
    sh.shifts[1][warp] = kb;
  }
  __syncthreads();
  ka = sh.shifts[0][0];
  kb = sh.shifts[1][0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    ka = fmax(ka, sh.shifts[0][w]);
    kb = fmax(kb, sh.shifts[1][w]);
  }
  // 2. Every thread's sums against them, then one sum and one argmax per side.
  rescale(s, ka, kb);
  double v[7] = {s.sa, s.sb, s.trq, s.tqr, s.h, s.wt, s.ws};
  float ba = s.best_a, bb = s.best_b, sa2 = s.sec_a, sb2 = s.sec_b;
  int ia = s.ia, ib = s.ib, ca = s.cnt_a, cb = s.cnt_b;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int k = 0; k < 7; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    const float oba = __shfl_xor_sync(0xffffffffu, ba, o), obb = __shfl_xor_sync(0xffffffffu, bb, o);
    const int oia = __shfl_xor_sync(0xffffffffu, ia, o), oib = __shfl_xor_sync(0xffffffffu, ib, o);
    if constexpr (kExtra) {
      sa2 = fmaxf(fmaxf(sa2, __shfl_xor_sync(0xffffffffu, sa2, o)), fminf(ba, oba));
      sb2 = fmaxf(fmaxf(sb2, __shfl_xor_sync(0xffffffffu, sb2, o)), fminf(bb, obb));
      ca += __shfl_xor_sync(0xffffffffu, ca, o);
      cb += __shfl_xor_sync(0xffffffffu, cb, o);
    }
    if (better(oba, oia, ba, ia)) {
      ba = oba;
      ia = oia;
    }
    if (better(obb, oib, bb, ib)) {
      bb = obb;
      ib = oib;
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < 7; ++k) sh.sums[k][warp] = v[k];
    sh.best[0][warp] = ba;
    sh.best[1][warp] = bb;
    sh.index[0][warp] = ia;
    sh.index[1][warp] = ib;
    if constexpr (kExtra) {
      sh.second[0][warp] = sa2;
      sh.second[1][warp] = sb2;
      sh.count[0][warp] = ca;
      sh.count[1][warp] = cb;
    }
  }
  const bool bad = __syncthreads_or(s.bad);  // also the barrier for the stores above
  // The block's state in the split workspace's encoding (write_part), then decoded.
  double words[kPart] = {ka, kb};
#pragma unroll
  for (int k = 0; k < 7; ++k) {
    double sum = sh.sums[k][0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += sh.sums[k][w];
    words[2 + k] = sum;
  }
  float best[2] = {sh.best[0][0], sh.best[1][0]};
  int index[2] = {sh.index[0][0], sh.index[1][0]};
#pragma unroll
  for (int side = 0; side < 2; ++side) {
    if constexpr (kExtra) {
      float second = sh.second[side][0];
      int count = sh.count[side][0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        second = fmaxf(fmaxf(second, sh.second[side][w]), fminf(best[side], sh.best[side][w]));
        best[side] = fmaxf(best[side], sh.best[side][w]);
        count += sh.count[side][w];
      }
      words[14 + side] = second;
      words[16 + side] = count;
      best[side] = sh.best[side][0];
    }
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      if (better(sh.best[side][w], sh.index[side][w], best[side], index[side])) {
        best[side] = sh.best[side][w];
        index[side] = sh.index[side][w];
      }
    }
    words[9 + side] = best[side];
    words[11 + side] = index[side];
  }
  words[13] = bad ? 1.0 : 0.0;
  return read_part(words);
}

// ----------------------------------------------------------------------------------------------
// kernels
// ----------------------------------------------------------------------------------------------

template <DType D>
__device__ __forceinline__ void row_start(const void* base, int64_t stride, int64_t r,
                                          const uint8_t*& vals, Decode& dec) {
  const uint8_t* row = static_cast<const uint8_t*>(base) + r * stride;
  dec = read_decode<D>(row);
  vals = row + Storage<D>::kHeader;
}

// The label's values (clamped: the caller checked the range).
template <DType DA, DType DB>
__device__ void label_values(const LogitStatsParams& p, int64_t r, const uint8_t* a_vals,
                             const uint8_t* b_vals, const Decode& da, const Decode& db,
                             float& ay, float& by) {
  int64_t y = p.labels[r];
  y = y < 0 ? 0 : (y >= p.vocab ? p.vocab - 1 : y);
  ay = load_one<DA>(a_vals, y, da);
  by = load_one<DB>(b_vals, y, db);
}

template <typename T>
__device__ __forceinline__ void store_if(T* out, int64_t r, T v) {
  if (out) out[r] = v;
}

// Every output of row r from its merged state; `state`: the distance pass's words, or null.
template <DType DA, DType DB, bool kParity>
__device__ void finish_row(const LogitStatsParams& p, int64_t r, const State& s,
                           const uint8_t* a_vals, const uint8_t* b_vals, const Decode& da,
                           const Decode& db, double* state) {
  double ay = 0.0, by = 0.0;
  if (p.labels) {
    int64_t y = p.labels[r];
    y = y < 0 ? 0 : (y >= p.vocab ? p.vocab - 1 : y);  // the caller checked the range
    ay = load_one<DA>(a_vals, y, da);
    by = load_one<DB>(b_vals, y, db);
  }
  const RowOut o =
      finish_stats(s, kParity, kParity && DB == DType::LLAMA_U16, p.labels != nullptr, ay, by);
  p.kld[r] = o.kld;
  p.kld_reverse[r] = o.kld_reverse;
  p.lse_ref[r] = o.lse_ref;
  p.lse_q[r] = o.lse_q;
  p.entropy_ref[r] = o.entropy_ref;
  p.top1_ref[r] = o.top1_ref;
  p.top1_q[r] = o.top1_q;
  if (p.labels) {
    p.nll_ref[r] = o.nll_ref;
    p.nll_q[r] = o.nll_q;
    p.p_ref_y[r] = o.p_ref_y;
    p.p_q_y[r] = o.p_q_y;
  }
  if (kParity) p.kld_llama[r] = o.kld_llama;
  store_if(p.logp_top1_ref, r, o.logp_top1_ref);
  store_if(p.logp_top1_q, r, o.logp_top1_q);
  store_if(p.logp_top2_ref, r, o.logp_top2_ref);
  store_if(p.logp_top2_q, r, o.logp_top2_q);
  store_if(p.rank_ref_y, r, static_cast<int32_t>(o.rank_ref));
  store_if(p.rank_q_y, r, static_cast<int32_t>(o.rank_q));
  store_if(p.margin_ref, r, o.margin_ref);
  store_if(p.margin_q, r, o.margin_q);
  if (state) write_dist_state(s, state + r * kState);
}

// kExtra: the optional outputs' second largest values and label counts ride along.
template <DType DA, DType DB, bool kParity, bool kExtra>
__global__ void __launch_bounds__(kThreads, 2)
    logit_stats_rows_kernel(LogitStatsParams p, int64_t cols_per_split, double* part,
                            double* state) {
  constexpr int kUnroll = unroll_steps<DA, DB>();
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  const int split = blockIdx.y;
  const uint8_t *a_vals, *b_vals;
  Decode da, db;
  row_start<DA>(p.ref, p.ref_row_stride, r, a_vals, da);
  row_start<DB>(p.q, p.q_row_stride, r, b_vals, db);
  const int64_t begin = split * cols_per_split;
  const int64_t end = begin + cols_per_split < p.vocab ? begin + cols_per_split : p.vocab;
  const Traversal t = plan_traversal<DA, DB>(a_vals, b_vals, begin, end);
  State s;
  init_state(s);
  if (kExtra && p.labels) label_values<DA, DB>(p, r, a_vals, b_vals, da, db, s.ya, s.yb);
  fold_thread_range<DA, DB, kParity, kExtra, kUnroll>(s, threadIdx.x, kThreads, a_vals, b_vals,
                                                      da, db, begin, end, t);
  const State m = block_merge<kExtra>(s, sh);
  if (threadIdx.x != 0) return;
  if (part) {
    write_part(m, part + (r * gridDim.y + split) * kPart);
  } else {
    finish_row<DA, DB, kParity>(p, r, m, a_vals, b_vals, da, db, state);
  }
}

template <DType DA, DType DB, bool kParity>
__global__ void logit_stats_merge_kernel(LogitStatsParams p, const double* part, int splits,
                                         double* state) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.n_rows) return;
  State m;
  init_state(m);
  for (int k = 0; k < splits; ++k) merge_state(m, read_part(part + (r * splits + k) * kPart));
  const uint8_t *a_vals, *b_vals;
  Decode da, db;
  row_start<DA>(p.ref, p.ref_row_stride, r, a_vals, da);
  row_start<DB>(p.q, p.q_row_stride, r, b_vals, db);
  finish_row<DA, DB, kParity>(p, r, m, a_vals, b_vals, da, db, state);
}

// The distance pass (tvd, jsd) over (row, split), once the rows' states are written: the same
// traversal as the rows kernel; one block sum of two float64s. part: each split's two sums,
// for logit_stats_dist_merge_kernel; null: the outputs written here.
template <DType DA, DType DB, bool kJsd>
__global__ void __launch_bounds__(kThreads, 2)
    logit_stats_dist_kernel(LogitStatsParams p, int64_t cols_per_split, const double* state,
                            double* part) {
  constexpr int kUnroll = unroll_steps<DA, DB>();
  __shared__ double sums[2][kWarps];
  const int64_t r = blockIdx.x;
  const int split = blockIdx.y;
  const uint8_t *a_vals, *b_vals;
  Decode da, db;
  row_start<DA>(p.ref, p.ref_row_stride, r, a_vals, da);
  row_start<DB>(p.q, p.q_row_stride, r, b_vals, db);
  const int64_t begin = split * cols_per_split;
  const int64_t end = begin + cols_per_split < p.vocab ? begin + cols_per_split : p.vocab;
  const Traversal t = plan_traversal<DA, DB>(a_vals, b_vals, begin, end);
  const DistRow row = read_dist_state(state + r * kState);
  DistSums d{0.0, 0.0};
  dist_thread_range<DA, DB, kJsd, kUnroll>(d, row, threadIdx.x, kThreads, a_vals, b_vals, da, db,
                                           begin, end, t);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    d.tv += __shfl_xor_sync(0xffffffffu, d.tv, o);
    d.js += __shfl_xor_sync(0xffffffffu, d.js, o);
  }
  if (lane == 0) {
    sums[0][warp] = d.tv;
    sums[1][warp] = d.js;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  DistSums total{0.0, 0.0};
  for (int w = 0; w < kWarps; ++w) {
    total.tv += sums[0][w];
    total.js += sums[1][w];
  }
  if (part) {
    part[(r * gridDim.y + split) * 2] = total.tv;
    part[(r * gridDim.y + split) * 2 + 1] = total.js;
    return;
  }
  double tvd, jsd;
  finish_dist(total, state + r * kState, tvd, jsd);
  store_if(p.tvd, r, tvd);
  store_if(p.jsd, r, jsd);
}

__global__ void logit_stats_dist_merge_kernel(LogitStatsParams p, const double* state,
                                              const double* part, int splits) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.n_rows) return;
  DistSums total{0.0, 0.0};
  for (int k = 0; k < splits; ++k) {  // in vocabulary order: the same sums on every run
    total.tv += part[(r * splits + k) * 2];
    total.js += part[(r * splits + k) * 2 + 1];
  }
  double tvd, jsd;
  finish_dist(total, state + r * kState, tvd, jsd);
  store_if(p.tvd, r, tvd);
  store_if(p.jsd, r, jsd);
}

// ----------------------------------------------------------------------------------------------
// host side
// ----------------------------------------------------------------------------------------------

void validate(const LogitStatsParams& p) {
  check_params(p);
  FK_CHECK(p.n_rows <= INT_MAX, "too many rows for one launch: " << p.n_rows);
  const auto aligned = [](const void* ptr, int64_t stride, int64_t size) {
    return reinterpret_cast<uintptr_t>(ptr) % size == 0 && stride % size == 0;
  };
  FK_CHECK(aligned(p.ref, p.ref_row_stride, dtype_size(p.ref_dtype)),
           "ref pointer and row stride must be multiples of its element size");
  FK_CHECK(aligned(p.q, p.q_row_stride, dtype_size(p.q_dtype)),
           "q pointer and row stride must be multiples of its element size");
}

int device_of(const void* ptr) {
  cudaPointerAttributes attr{};
  FK_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
  FK_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
           "logit_stats_cuda needs device memory (got a host pointer)");
  return attr.device;
}

// CTAs per row: split the vocabulary only when the rows cannot fill about two waves of the GPU,
// and never below 4096 entries per CTA (below that the merge costs more than it saves).
int pick_splits(const LogitStatsParams& p, int num_sms) {
  const int64_t want_ctas = 2 * static_cast<int64_t>(num_sms);
  if (p.n_rows >= want_ctas) return 1;
  const int64_t by_rows = (want_ctas + p.n_rows - 1) / p.n_rows;
  const int64_t by_vocab = p.vocab / 4096;
  int64_t k = by_rows < by_vocab ? by_rows : by_vocab;
  if (k > 1024) k = 1024;
  return k < 1 ? 1 : static_cast<int>(k);
}

// Queue the distance pass (tvd, jsd) after the statistics pass has written `state`.
template <DType DA, DType DB, bool kJsd>
cudaError_t launch_dist(const LogitStatsParams& p, cudaStream_t stream, int splits, int64_t cols,
                        const double* state) {
  if (splits <= 1) {
    logit_stats_dist_kernel<DA, DB, kJsd>
        <<<dim3(static_cast<unsigned>(p.n_rows), 1), kThreads, 0, stream>>>(p, p.vocab, state,
                                                                               nullptr);
    return cudaGetLastError();
  }
  double* part = nullptr;
  cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&part),
                                    static_cast<size_t>(p.n_rows) * splits * 2 * sizeof(double),
                                    stream);
  if (err != cudaSuccess) return err;
  logit_stats_dist_kernel<DA, DB, kJsd>
      <<<dim3(static_cast<unsigned>(p.n_rows), static_cast<unsigned>(splits)), kThreads, 0,
         stream>>>(p, cols, state, part);
  err = cudaGetLastError();
  if (err == cudaSuccess) {
    const int threads = 128;
    const unsigned blocks = static_cast<unsigned>((p.n_rows + threads - 1) / threads);
    logit_stats_dist_merge_kernel<<<blocks, threads, 0, stream>>>(p, state, part, splits);
    err = cudaGetLastError();
  }
  cudaFreeAsync(part, stream);
  return err;
}

// The statistics pass (kExtra when a top-2, rank or margin output is asked for), then, for
// tvd or jsd, the distance pass; workspaces are stream-ordered allocations freed behind them.
template <DType DA, DType DB, bool kParity, bool kExtra>
void launch(const LogitStatsParams& p, cudaStream_t stream, int splits) {
  int64_t cols = p.vocab;
  if (splits > 1) splits = split_columns(p.vocab, splits, &cols);
  double* state = nullptr;
  if (p.tvd || p.jsd) {
    FK_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&state),
                                  static_cast<size_t>(p.n_rows) * kState * sizeof(double), stream));
  }
  double* part = nullptr;
  cudaError_t err = cudaSuccess;
  if (splits <= 1) {
    logit_stats_rows_kernel<DA, DB, kParity, kExtra>
        <<<dim3(static_cast<unsigned>(p.n_rows), 1), kThreads, 0, stream>>>(p, p.vocab, nullptr,
                                                                               state);
    err = cudaGetLastError();
  } else {
    const size_t bytes = static_cast<size_t>(p.n_rows) * splits * kPart * sizeof(double);
    err = cudaMallocAsync(reinterpret_cast<void**>(&part), bytes, stream);
    if (err == cudaSuccess) {
      logit_stats_rows_kernel<DA, DB, kParity, kExtra>
          <<<dim3(static_cast<unsigned>(p.n_rows), static_cast<unsigned>(splits)), kThreads, 0,
             stream>>>(p, cols, part, nullptr);
      err = cudaGetLastError();
    }
    if (err == cudaSuccess) {
      const int threads = 128;
      const unsigned blocks = static_cast<unsigned>((p.n_rows + threads - 1) / threads);
      logit_stats_merge_kernel<DA, DB, kParity>
          <<<blocks, threads, 0, stream>>>(p, part, splits, state);
      err = cudaGetLastError();
    }
    if (part) cudaFreeAsync(part, stream);  // stream-ordered: after the merge kernel has read it
  }
  if (err == cudaSuccess && state) {
    err = p.jsd ? launch_dist<DA, DB, true>(p, stream, splits, cols, state)
                : launch_dist<DA, DB, false>(p, stream, splits, cols, state);
  }
  if (state) cudaFreeAsync(state, stream);
  FK_RUNTIME_CHECK(err == cudaSuccess, "CUDA kernel launch failed: " << cudaGetErrorString(err));
}

template <DType DA, DType DB, bool kParity>
void launch(const LogitStatsParams& p, cudaStream_t stream, int splits) {
  const bool extra = p.logp_top1_ref || p.logp_top1_q || p.logp_top2_ref || p.logp_top2_q ||
                     p.rank_ref_y || p.rank_q_y || p.margin_ref || p.margin_q;
  if (extra) return launch<DA, DB, kParity, true>(p, stream, splits);
  launch<DA, DB, kParity, false>(p, stream, splits);
}

}  // namespace

void logit_stats_cuda(const LogitStatsParams& p, void* cuda_stream) {
  logit_stats_cuda(p, cuda_stream, 0);
}

void logit_stats_cuda(const LogitStatsParams& p, void* cuda_stream, int vocab_splits) {
  validate(p);
  FK_CHECK(vocab_splits >= 0 && vocab_splits <= 65535, "vocab_splits must be in [0, 65535]");
  if (p.n_rows == 0) return;
  // The pointers' device, not whatever this runtime instance holds current (the caller's
  // framework may link another copy of the CUDA runtime).
  const int device = device_of(p.ref);
  FK_CHECK(device_of(p.q) == device, "ref and q are on different devices");
  int previous = 0;
  FK_CUDA_CHECK(cudaGetDevice(&previous));
  FK_CUDA_CHECK(cudaSetDevice(device));
  struct Restore {
    int device;
    ~Restore() { cudaSetDevice(device); }
  } restore{previous};
  int num_sms = 0;
  FK_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  const int splits = vocab_splits > 0 ? vocab_splits : pick_splits(p, num_sms);
  const auto stream = static_cast<cudaStream_t>(cuda_stream);
  dispatch_dtype(p.ref_dtype, [&](auto ta) {
    constexpr DType DA = decltype(ta)::value;
    dispatch_dtype(p.q_dtype, [&](auto tb) {
      constexpr DType DB = decltype(tb)::value;
      if constexpr (DA == DType::LLAMA_U16) {
        if (p.llama_parity) return launch<DA, DB, true>(p, stream, splits);
      }
      launch<DA, DB, false>(p, stream, splits);
    });
  });
}

}  // namespace fk
