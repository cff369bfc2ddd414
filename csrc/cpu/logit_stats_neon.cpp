// Row loop for the neon path (aarch64 only; NEON is baseline there, no target flags).
#include "simd_ops_neon.h"
#include "row_kernel.h"

namespace fk::detail {

void logit_stats_rows_neon(const LogitStatsParams& p, int64_t begin, int64_t end) {
  run_rows<NeonOps>(p, begin, end);
}

void logit_stats_rows_multi_neon(const LogitStatsParams* ps, int m, int64_t begin, int64_t end) {
  run_rows_multi<NeonOps>(ps, m, begin, end);
}

}  // namespace fk::detail
