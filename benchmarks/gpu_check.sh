#!/usr/bin/env bash
# The GPU check, as one call on a machine with a CUDA GPU (torch, triton, nvcc, cmake, ninja,
# scikit-build-core and pybind11 installed; no network needed). Under 5 minutes on an H100:
#   1. builds the CUDA extension in place (editable install, sm_90 only to save time; set
#      FK_CUDA_ARCHS to change it),
#   2. runs tests/test_gpu.py (CUDA extension and Triton on GPU tensors), then, in its own
#      process, tests/test_triton_logit_stats.py (the Triton interpreter on CPU tensors; it skips
#      itself on Triton versions whose interpreter cannot run with the installed numpy),
#   3. runs benchmarks/bench_gpu.py with a short measurement budget,
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
  step build 120 $PY -m pip install --no-build-isolation --no-deps -e . \
    -Ccmake.define.FIDELITY_KLD_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCHS" \
    -Cbuild-dir=build/gpu-check
fi
$PY -c "import fidelity_kld._core as c; print('has_cuda', c.has_cuda, 'simd', c.simd_level); assert c.has_cuda" \
  || STATUS[build]="${STATUS[build]} (no CUDA in _core)"

step test_gpu 100 $PY -m pytest -q --maxfail=20 -p no:cacheprovider -m gpu tests/test_gpu.py -rs
step test_triton 40 env TRITON_INTERPRET=1 $PY -m pytest -q -p no:cacheprovider tests/test_triton_logit_stats.py -rs
step bench 130 $PY benchmarks/bench_gpu.py --budget 0.25 --sweep --json "$OUTDIR/bench_gpu.json"

echo
echo "=== gpu_check summary ($(( $(date +%s) - START ))s in all)"
for s in build test_gpu test_triton bench; do
  printf '  %-14s %s\n' "$s" "${STATUS[$s]:-not run}"
done
grep -h -E "passed|failed|error" "$OUTDIR/test_gpu.log" "$OUTDIR/test_triton.log" 2>/dev/null | tail -2 | sed 's/^/  /'
sed -n '/^# summary/,$p' "$OUTDIR/bench.log" 2>/dev/null
