#!/usr/bin/env bash
# The GPU check for one device lease (issue 3): build the extension, run the CUDA tests, both
# benchmarks and the sanitizers, in priority order, each step with its own time limit, within about
# 6 minutes on an H200 (a step that would start past the budget is skipped and reported). Logs and
# JSON results go to $OUT (default ./gpu-check-out).
#
#   bash scripts/gpu_check.sh            # on a machine with a CUDA GPU, torch and nvcc
#   RESIDTAP_GPU_CHECK_ARCH_TEST=1 ...   # also build for another architecture and check the error
#
# No install needed: the package runs from src/ (PYTHONPATH); the machine's torch, transformers,
# pytest and safetensors are used as they are.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RESIDTAP_BUILD_DIR="${RESIDTAP_BUILD_DIR:-$PWD/.build-gpu}" MAX_JOBS="${MAX_JOBS:-16}"
LOG="$OUT/gpu_check.log"
START=$SECONDS
FAILED=()

DEADLINE="${RESIDTAP_GPU_CHECK_DEADLINE:-345}"  # seconds for the whole script: a lease runs it twice

step() {  # step NAME LIMIT_S COMMAND...  (the limit shrinks to what is left before DEADLINE)
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        echo "== $name: SKIPPED, ${left}s left of the ${DEADLINE}s budget" | tee -a "$LOG"
        FAILED+=("$name(skipped)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s, at $((SECONDS - START))s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=KILL "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
}

: > "$LOG"
step env 60 bash -c 'nvidia-smi -L; nvcc --version | tail -1; python3 -c "import torch, transformers
print(torch.__version__, torch.version.cuda, transformers.__version__)"'
step build 150 python3 -c "
from residtap._build import load_extension
i = load_extension()
print(i)
assert i.loaded and i.with_cuda, i.error or i.cuda_skipped_because"
if [[ " ${FAILED[*]} " == *" build "* ]]; then
    echo "build failed: nothing else can run" | tee -a "$LOG"
    exit 1
fi
step cuda-tests 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
    tests/test_cuda_order.py tests/test_parity.py tests/test_device_map.py
step bench-op 60 python3 benchmarks/bench_op.py --out "$OUT"
step bench-capture 90 python3 benchmarks/bench_capture.py --out "$OUT"
step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_op.py
step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_op.py
if [ "${RESIDTAP_GPU_CHECK_ARCH_TEST:-0}" = 1 ]; then
    step arch-error 150 env RESIDTAP_TEST_ARCH_ERROR=1 python3 -m pytest -q -p no:cacheprovider \
        tests/test_cuda.py -k missing_architecture
fi
echo "== done in $((SECONDS - START))s; failed: ${FAILED[*]:-none}" | tee -a "$LOG"
[ ${#FAILED[@]} -eq 0 ]
