// CUDA entry of the fused per-token logit statistics (same outputs and rules as logit_stats.h).
//
// Every pointer in the params (ref, q, labels, outputs) is a *device* pointer on one CUDA device;
// row strides are in bytes, elements contiguous within a row. The work is queued on
// `cuda_stream` (a cudaStream_t; nullptr is the legacy default stream) and the call returns
// without synchronising: read the outputs after the stream has finished. No torch, no Python:
// callers take the pointers from DLPack, __cuda_array_interface__ or data_ptr().
//
// Labels cannot be range-checked on the host without a copy and a sync: the caller checks them
// (fidelity_kld.gpu does); the kernel clamps an out-of-range label instead of reading outside
// the row. `threads` in the params is ignored.
//
// Throws std::invalid_argument (bad params) or std::runtime_error (a CUDA error).
#pragma once

#include "fidelity_kld/logit_stats.h"

namespace fk {

void logit_stats_cuda(const LogitStatsParams& p, void* cuda_stream);

// vocab_splits: 0 picks by the heuristic (split the vocabulary across CTAs only when the rows
// alone cannot fill the GPU); 1 = one CTA per row; k > 1 = k CTAs per row plus a merge kernel.
void logit_stats_cuda(const LogitStatsParams& p, void* cuda_stream, int vocab_splits);

}  // namespace fk
