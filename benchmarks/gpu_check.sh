#!/usr/bin/env bash
# The GPU check, as one call on a machine with a CUDA GPU (torch, triton, nvcc, cmake, ninja,
# scikit-build-core and pybind11 installed; no network needed). Under 5 minutes on an H100:
#   1. builds the CUDA extension in place (editable install, sm_90 only to save time; set
#      FK_CUDA_ARCHS to change it),
#   2. runs tests/test_gpu.py (CUDA extension and Triton on GPU tensors; the Triton interpreter
#      tests run in CI, not here),
#   3. runs benchmarks/bench_gpu.py with a short measurement budget (and --extra: the cost of
#      each optional output group of issue 16 on the headline case),
#   4. profiles one launch of each kernel on the headline case with Nsight Compute (speed of
#      light, occupancy, warp stalls: what limits it), when ncu is installed,
# and prints a short table last. Logs and the JSON results go to $OUT (or benchmarks/out).
#
#   bash benchmarks/gpu_check.sh       # PYTHON=python3 by default; FK_SKIP_BUILD=1 reuses a build
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-benchmarks/out}
ARCHS=${FK_CUDA_ARCHS:-90-real}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
START=$(date +%s)
declare -A STATUS

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to $OUTDIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  STATUS[$name]="rc=$rc $(( $(date +%s) - t0 ))s"
  return "$rc"
}

echo "=== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
$PY -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1

if [ "${FK_SKIP_BUILD:-0}" = 1 ]; then  # the extension is already built and installed
  STATUS[build]="skipped (FK_SKIP_BUILD=1)"
else
  step build 90 $PY -m pip install --no-build-isolation --no-deps -e . \
    -Ccmake.define.FIDELITY_KLD_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCHS" \
    -Cbuild-dir=build/gpu-check
fi
$PY -c "import fidelity_kld._core as c; print('has_cuda', c.has_cuda, 'simd', c.simd_level); assert c.has_cuda" \
  || STATUS[build]="${STATUS[build]} (no CUDA in _core)"

step test_gpu 80 $PY -m pytest -q --maxfail=20 -p no:cacheprovider -m gpu tests/test_gpu.py -rs
step bench 120 $PY benchmarks/bench_gpu.py --budget 0.25 --sweep --json "$OUTDIR/bench_gpu.json"
# issue 16: the cost of each optional output group on the headline case (bf16 4096 x 152064)
step bench_extra 120 $PY benchmarks/bench_gpu.py --dtype bfloat16 --shape 4096x152064 --baselines none \
  --extra --budget 0.25 --json "$OUTDIR/bench_gpu_extra.json"
step bench_hidden 60 $PY benchmarks/bench_gpu.py --hidden --budget 0.25 --json "$OUTDIR/bench_gpu_hidden.json"
if command -v ncu > /dev/null; then
  # One launch of each kernel (bf16, 4096 x 152064): the first matching launch is profiled, the
  # rest of the run is the ordinary benchmark at a tiny budget.
  profile() {
    for k in logit_stats_rows_kernel _logit_stats_kernel; do  # CUDA, then Triton
      ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        -k "regex:$k" -c 1 $PY benchmarks/bench_gpu.py --dtype bfloat16 --shape 4096x152064 \
        --baselines none --budget 0.01 || return
    done
  }
  export PY
  export -f profile  # timeout runs programs, not shell functions
  step profile 60 bash -c profile
else
  STATUS[profile]="skipped (no ncu)"
fi

echo
echo "=== gpu_check summary ($(( $(date +%s) - START ))s in all)"
for s in build test_gpu bench bench_extra bench_hidden profile; do
  printf '  %-14s %s\n' "$s" "${STATUS[$s]:-not run}"
done
grep -h -E "passed|failed|error" "$OUTDIR/test_gpu.log" 2>/dev/null | tail -1 | sed 's/^/  /'
grep -E "^  [a-zA-Z_]*logit_stats|Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Waves Per SM" \
  "$OUTDIR/profile.log" 2>/dev/null | sed 's/^ */  /'
sed -n '/^# summary/,$p' "$OUTDIR/bench.log" 2>/dev/null
sed -n '/^# summary/,$p' "$OUTDIR/bench_extra.log" 2>/dev/null
