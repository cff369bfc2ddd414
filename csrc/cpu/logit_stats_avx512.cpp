// Row loop for the avx512 path. Compiled with this path's target flags only (CMakeLists.txt).
#include "row_kernel.h"

namespace fk::detail {

void logit_stats_rows_avx512(const LogitStatsParams& p, int64_t begin, int64_t end) {
  run_rows<Avx512Ops>(p, begin, end);
}

void logit_stats_rows_multi_avx512(const LogitStatsParams* ps, int m, int64_t begin, int64_t end) {
  run_rows_multi<Avx512Ops>(ps, m, begin, end);
}

}  // namespace fk::detail
