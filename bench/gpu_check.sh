#!/usr/bin/env bash
# GPU verification in one call: environment, CUDA extension build, the GPU test suite, the kernel and
# post-processing micro-benchmarks, the side-by-side benchmark and the profiler.
#
#   OUT=/tmp/gpu_out bash bench/gpu_check.sh [phase ...]
#
# Phases (default: all but compile, in this order): env build tests kernels post bench profile eomt;
# also compile (torch.compile(transformers) vs fast, minutes per arch). One device call runs at most
# 10 minutes: give each call a few phases (e.g. "env build tests", then "kernels post bench", then
# "profile eomt compile"); DEADLINE (seconds, default 570) cuts or skips phases to fit. Only the
# gpu-marked tests run here: the CPU suite's Triton cases need TRITON_INTERPRET, which is off on a GPU.
# Every phase runs under its own time limit and its output goes to $OUT/log.txt; result JSON files are
# gathered into $OUT/results.tar.gz, the pytest report into $OUT/junit.xml. Wheels in .whl/ (a newer
# transformers, PyAV) are installed into a private folder first when present.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
JSON="${JSON_DIR:-/tmp/videomt_fast_json}"
mkdir -p "$OUT" "$JSON"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export VIDEOMT_FAST_EXT_CACHE="${VIDEOMT_FAST_EXT_CACHE:-/tmp/videomt_fast_ext}"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || echo "wheel install failed" | tee -a "$LOG"
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(env build tests kernels post bench profile eomt)
SUMMARY=()

DEADLINE="${DEADLINE:-570}"  # seconds from the start; a phase is cut to fit, or skipped under 20 s

phase() {  # phase NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 20 ]; then SUMMARY+=("$name skipped (deadline)"); echo "=== $name skipped" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  SUMMARY+=("$name rc=$rc $((SECONDS - start))s")
  echo "=== $name rc=$rc in $((SECONDS - start))s" | tee -a "$LOG"
  cp bench/results/postprocess-*.json "$JSON/" 2>/dev/null
  tar -C "$JSON" -czf "$OUT/results.tar.gz" . 2>/dev/null
}

for p in "${PHASES[@]}"; do
  case "$p" in
    env)
      phase env 60 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton, transformers; \
print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__); \
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0)); \
print(\"videomt:\", hasattr(transformers, \"VideomtForUniversalSegmentation\"))'; nvcc --version | tail -2" ;;
    build)
      phase build 300 "$PY" -c "from videomt_fast.ops import _ext; m = _ext.load(); print('extension:', m, _ext.error())
from videomt_fast import ops; import torch
for k, v in ops.backend_report(torch.device('cuda')).items(): print(f'{k:22s} {v[\"backend\"]:10s} {v[\"reason\"]}')" ;;
    tests)
      phase tests "${TEST_LIMIT:-420}" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" \
        --timeout 240 --junitxml "$OUT/junit.xml" -rfE ${PYTEST_ARGS:-} ;;
    kernels)
      phase kernels 240 "$PY" -m bench.bench_kernels --rep 40 --warmup 10 --out "$JSON/kernels.json" ;;
    post)
      phase post 180 "$PY" -m bench.bench_postprocess ;;
    bench)
      for arch in ${ARCHS:-vit-s vit-b vit-l}; do
        phase "bench-$arch" "${BENCH_LIMIT:-300}" "$PY" -m bench --arch "$arch" --out-dir "$JSON" \
          ${BENCH_ARGS:---size 640x640 --peers none --providers hf-eager-fp32,hf-sdpa-bf16,fast}
      done ;;
    compile)  # torch.compile(transformers, max-autotune) against fast: slow to build, so its own phase
      for arch in ${ARCHS:-vit-s vit-b vit-l}; do
        phase "compile-$arch" "${BENCH_LIMIT:-300}" "$PY" -m bench --arch "$arch" --out-dir "$JSON" \
          --size 640x640 --peers none --providers hf-compile,fast --mode online --mode offline ${COMPILE_ARGS:-}
      done ;;
    profile)
      phase profile 180 "$PY" -m videomt_fast profile --arch "${PROFILE_ARCH:-vit-l}" --size 640x640 \
        --json "$JSON/profile.json" ;;
    eomt)
      for arch in ${EOMT_ARCHS:-vit-s vit-b vit-l}; do
        phase "eomt-$arch" "${BENCH_LIMIT:-300}" "$PY" -m bench --model eomt --arch "$arch" --out-dir "$JSON" \
          ${EOMT_ARGS:---size 640x640 --peers none --providers hf-eager-fp32,hf-sdpa-bf16,fast}
      done ;;
    *) echo "unknown phase $p" | tee -a "$LOG" ;;
  esac
done

echo "--- summary"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
grep -E "^(FAILED|ERROR)|passed|failed" "$LOG" | tail -40
