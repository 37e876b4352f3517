#!/usr/bin/env bash
# The GPU check in one call: bench/gpu_smoke.py (build, op agreement, CUDA graphs, post-processing, online
# FPS; at most 7 minutes on a fresh H200, every phase under its own limit; see its docstring), with what a
# bare GPU machine needs around it. The exit status is gpu_smoke's: 0 only when every phase passed.
#
#   OUT=/tmp/gpu_out bash bench/gpu_check.sh [gpu_smoke options, e.g. --archs vit-s --no-compile]
#
# Longer checks, one per call, each under LIMIT seconds (default 540), exit status their own:
#   OUT=... bash bench/gpu_check.sh --extra tests     # every gpu-marked test (pytest -m gpu, compiled Triton)
#   OUT=... bash bench/gpu_check.sh --extra kernels   # kernel micro-benchmarks (bench/bench_kernels.py)
#   OUT=... bash bench/gpu_check.sh --extra post      # post-processing timings (bench/bench_postprocess.py)
#   OUT=... bash bench/gpu_check.sh --extra profile   # the profiler, ViT-L 640x640
# Wheels in .whl/ (a newer transformers, PyAV) are installed into a private folder first when present.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export VIDEOMT_FAST_EXT_CACHE="${VIDEOMT_FAST_EXT_CACHE:-/tmp/videomt_fast_ext}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >"$OUT/wheels.log" 2>&1; then
    echo "gpu_check: installing the wheels in .whl/ failed (see $OUT/wheels.log)" >&2
    exit 3
  fi
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

if [ "${1:-}" = "--extra" ]; then
  LIMIT="${LIMIT:-540}"
  export VIDEOMT_FAST_RESULTS_DIR="$OUT"  # what the extras write comes back with $OUT
  export MAX_JOBS="${MAX_JOBS:-16}"  # (the smoke builds in the background on half the cores)
  case "${2:-}" in
    tests)
      timeout "$LIMIT" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" --timeout 240 \
        --junitxml "$OUT/junit.xml" -rfE ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" ;;
    kernels)
      timeout "$LIMIT" "$PY" -m bench.bench_kernels --rep 40 --warmup 10 --out "$OUT/kernels.json" 2>&1 \
        | tee "$OUT/kernels.log" ;;
    post)
      timeout "$LIMIT" "$PY" bench/bench_postprocess.py 2>&1 | tee "$OUT/post.log" ;;
    profile)
      timeout "$LIMIT" "$PY" -m videomt_fast profile --arch "${PROFILE_ARCH:-vit-l}" --size 640x640 \
        --json "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log" ;;
    *)
      echo "gpu_check: --extra takes tests, kernels, post or profile, got '${2:-}'" >&2
      exit 2 ;;
  esac
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "gpu_check: --extra ${2} hit its limit of ${LIMIT} s" >&2
  exit "$rc"
fi

exec "$PY" bench/gpu_smoke.py --out "$OUT" "$@"
