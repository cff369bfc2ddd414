// Row loop for the scalar path. Compiled with this path's target flags only (CMakeLists.txt).
#include "row_kernel.h"

namespace fk::detail {

void logit_stats_rows_scalar(const LogitStatsParams& p, int64_t begin, int64_t end) {
  run_rows<ScalarOps>(p, begin, end);
}

void logit_stats_rows_multi_scalar(const LogitStatsParams* ps, int m, int64_t begin, int64_t end) {
  run_rows_multi<ScalarOps>(ps, m, begin, end);
}

}  // namespace fk::detail
