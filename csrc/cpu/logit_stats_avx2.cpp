// Row loop for the avx2 path. Compiled with this path's target flags only (CMakeLists.txt).
#include "row_kernel.h"

namespace fk::detail {

void logit_stats_rows_avx2(const LogitStatsParams& p, int64_t begin, int64_t end) {
  run_rows<Avx2Ops>(p, begin, end);
}

void logit_stats_rows_multi_avx2(const LogitStatsParams* ps, int m, int64_t begin, int64_t end) {
  run_rows_multi<Avx2Ops>(ps, m, begin, end);
}

}  // namespace fk::detail
