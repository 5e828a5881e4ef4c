#!/usr/bin/env bash
# The GPU check for one device lease: build the extension, then one part or both, in priority order,
# each step with its own time limit (a step that would start past the budget is skipped and
# reported). Logs and JSON results go to $OUT (default ./gpu-check-out).
#
#   op       (issue 3, the default; about 6 minutes on an H200) the CUDA op and capture tests,
#            bench_op, bench_capture, compute-sanitizer memcheck and racecheck; last, capture against
#            the reference in each model family of tests/test_families.py
#   extract  (issue 5; about 2.5 minutes) extraction's CUDA pipeline against captures, models split
#            over devices, bench_extract on GPT-2-small (all layers; one: forward-bound, with one and
#            with 8 batches a shard, and from text through a tokenizer; 64 batches to RAM: the steady state)
#   all      both, in one call (about 7 minutes on an H200: 347 s measured with bench_capture cut at
#            120 s, 3 of its 4 models done)
#   tests    the correctness steps of both, no benchmarks or sanitizers (about 2.5 minutes): the
#            re-check after a fix
#   profile  overlap with the side-stream op capped at a few thread blocks (bench_capture
#            --overlap-grid-caps, GPT-2-small size) and captures with the op's staged kernel
#            (--staged); where the op's time goes: scripts/profile_op.py's
#            output subsets against their own copy ceilings (also in op and all), then Nsight Compute
#            on one call per shape and dtype (ncu_op.csv); about 4 minutes, not measured yet
#   lease    one call for a whole 15-minute device lease (9.5 minutes at most), in order of value:
#            the CUDA tests, bench_op, the subset timing, bench_capture on GPT-2-small with the
#            experimental rows (overlap capped at 33 and 132 blocks, the staged kernel), the
#            sanitizers, extraction's tests and benchmarks (all layers; one layer: forward-bound, also
#            with 8 batches a shard and from text; 64 batches to RAM: the steady state), the family
#            tests, bench_capture on the XL size (bfloat16), ncu, then the XL size in float32 (the rest
#            took 6 minutes in the third lease), the host side of extraction alone (--host-only) and
#            the input reader (bench_inputs);
#            whatever the budget cannot reach is reported as skipped, and the JSON rows come back as
#            one archive, results-json.tar.gz (a device call returns 8 files)
#
#   bash scripts/gpu_check.sh [op|extract|all|tests|profile|lease]  # on a machine with a CUDA GPU, torch and nvcc
#   RESIDTAP_GPU_CHECK_ARCH_TEST=1 ...           # op: also build for another architecture, check the error
#
# The CUDA test steps also run the CPU op's tests (test_op.py, test_build.py; about 15 s there): that
# machine builds with its own compiler (CXX=/opt/gcc/bin/g++, libstdc++ linked in statically), which
# once made every error message with a number in it a segfault, on the CPU op as well.
#
# No install needed: the package runs from src/ (PYTHONPATH); the machine's torch, transformers,
# pytest and safetensors are used as they are. bench_capture's nnsight and TransformerLens rows need
# wheels the machine lacks: fetch them here with scripts/baseline_wheels.sh and carry ".whl".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RESIDTAP_BUILD_DIR="${RESIDTAP_BUILD_DIR:-$PWD/.build-gpu}" MAX_JOBS="${MAX_JOBS:-16}"
PART="${1:-op}"
case "$PART" in
    op) budget=360 ;;
    extract) budget=200 ;;
    all) budget=560 ;;
    tests) budget=300 ;;
    profile) budget=400 ;;
    lease) budget=570 ;;
    *) echo "gpu_check.sh: expected op, extract, all, tests, profile or lease, got '$PART'" >&2; exit 2 ;;
esac
LOG="$OUT/gpu_check-$PART.log"
START=$SECONDS
FAILED=()
SKIPPED=()

DEADLINE="${RESIDTAP_GPU_CHECK_DEADLINE:-$budget}"  # seconds for the whole script

step() {  # step NAME LIMIT_S COMMAND...  (the limit shrinks to what is left before DEADLINE)
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        echo "== $name: SKIPPED, ${left}s left of the ${DEADLINE}s budget" | tee -a "$LOG"
        SKIPPED+=("$name")
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

profile_ncu() {  # profile_ncu LIMIT_S: Nsight Compute on profile_op's calls inside its NVTX range
    step profile-ncu "$1" ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats --csv --page details \
        --log-file "$OUT/ncu_op.csv" python3 scripts/profile_op.py ncu
}

bench_extract_steps() {  # bench_extract_steps LIMIT_S (of the first, all-layer run)
    # GPT-2-small bf16, 12 batches of 16 x 1024 (about 4 GB per target); RAM and disk both
    step bench-extract "$1" python3 benchmarks/bench_extract.py --models gpt2-small --batches 12 --out "$OUT"
    # one residual: few enough bytes per forward for the output to keep up (the <= 1.05x target);
    # each batch's copies queued as its forward returns and, side by side, once the next forward has
    # launched its first block, after GPT-2's in-forward sync (does that sync's read-back wait behind
    # the copy?); and each of those with transformers' packed-sequence check on the device, without
    # that sync (--mask-sync async: does the host falling behind the GPU at each sync explain the rest?)
    step bench-extract-keepup 60 python3 benchmarks/bench_extract.py --models gpt2-small --layers 6 \
        --batches 24 --marginal --copies-at return,next-forward --mask-sync model,async --out "$OUT/keepup"
    # the same with 8 batches per shard rather than one: what of that overhead is per shard (the
    # writers' and publishers' Python, which holds the GIL the forwards need) and what per batch
    step bench-extract-keepup-shards 60 python3 benchmarks/bench_extract.py --models gpt2-small --layers 6 \
        --batches 48 --shard-size 192MiB --targets ram --marginal --out "$OUT/keepup-shards"
    # the same from a JSONL corpus through a tokenizer (made on the spot): what reading and tokenizing add
    step bench-extract-keepup-text 90 python3 benchmarks/bench_extract.py --models gpt2-small --layers 6 \
        --batches 24 --text --targets ram --marginal --out "$OUT/keepup-text"
    # to RAM, 64 shards rather than 12: the steady state, not the pipeline's fill and drain
    step bench-extract-steady 60 python3 benchmarks/bench_extract.py --models gpt2-small --targets ram \
        --batches 64 --repeats 2 --out "$OUT/steady"
}

finish() {  # the summary line; exits 0 only if no step that ran failed (skipped ones are listed)
    echo "== done in $((SECONDS - START))s; failed: ${FAILED[*]:-none}; skipped: ${SKIPPED[*]:-none}" \
        | tee -a "$LOG"
    # A device call brings back at most 8 files from $OUT: the JSON rows go back as one archive.
    (cd "$OUT" && find . -name '*.json' | sort | tar -czf results-json.tar.gz -T - --remove-files) \
        2>&1 | tee -a "$LOG"
    [ ${#FAILED[@]} -eq 0 ]
    exit
}

: > "$LOG"
echo "== residtap commit ${RESIDTAP_COMMIT:-unknown}, part $PART, budget ${DEADLINE}s" | tee -a "$LOG"
step env 60 bash -c 'nvidia-smi -L; nvcc --version | tail -1; python3 -c "import torch, transformers, safetensors
print(torch.__version__, torch.version.cuda, transformers.__version__, safetensors.__version__)"
df -h /dev/shm /tmp | tail -2; free -g | head -2'
if compgen -G ".whl/*.whl" > /dev/null; then  # optional baselines' wheels (scripts/baseline_wheels.sh)
    step baseline-wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step build 150 python3 -c "
from residtap._build import load_extension
i = load_extension()
print(i)
assert i.loaded and i.with_cuda, i.error or i.cuda_skipped_because"
if [[ " ${FAILED[*]} " == *" build "* ]]; then
    echo "build failed: nothing else can run" | tee -a "$LOG"
    exit 1
fi
if [ "$PART" = lease ]; then
    step cuda-tests 180 python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_cuda.py \
        tests/test_op.py tests/test_build.py
    step bench-op 60 python3 benchmarks/bench_op.py --out "$OUT"
    step profile-time 60 python3 scripts/profile_op.py time --out "$OUT"
    step bench-capture-small 150 python3 benchmarks/bench_capture.py --models small \
        --overlap-grid-caps 33,132 --staged --out "$OUT"
    step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_op.py
    step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_op.py
    step extract-tests 90 python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_device_map.py \
        tests/test_extract.py -k "cuda or gpu or split"
    bench_extract_steps 90
    step family-tests 120 python3 -m pytest -q --maxfail=10 -p no:cacheprovider \
        tests/test_families.py::test_cuda_capture_matches_reference
    step bench-capture-xl 150 python3 benchmarks/bench_capture.py --models xl --dtypes bfloat16 \
        --out "$OUT/xl"
    profile_ncu 120
    # last, in whatever is left (the third lease ended at 354 of 570 s): the XL size in float32
    step bench-capture-xl-f32 150 python3 benchmarks/bench_capture.py --models xl --dtypes float32 \
        --out "$OUT/xl32"
    # then the host side alone, with its 'busy' row: what extraction's threads lose to the GIL there
    step bench-extract-host 60 python3 benchmarks/bench_extract.py --host-only --writers 4 --out "$OUT"
    # and the input reader on that host's cores (jsonl through a tokenizer; a dataset where installed)
    step bench-inputs 60 python3 benchmarks/bench_inputs.py --out "$OUT"
    finish
fi
if [ "$PART" = profile ]; then
    step bench-capture-caps 150 python3 benchmarks/bench_capture.py --models small \
        --overlap-grid-caps 16,33,66,132,264 --staged --out "$OUT"
    step profile-time 60 python3 scripts/profile_op.py time --out "$OUT"
    profile_ncu 180
    finish
fi
if [ "$PART" != extract ]; then  # op, all, tests
    step cuda-tests 150 python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_cuda.py \
        tests/test_op.py tests/test_build.py
fi
if [ "$PART" = op ] || [ "$PART" = all ]; then
    step bench-op 60 python3 benchmarks/bench_op.py --out "$OUT"
    step profile-time 40 python3 scripts/profile_op.py time --out "$OUT"
    step bench-capture 180 python3 benchmarks/bench_capture.py --out "$OUT"
    step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_op.py
    step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_op.py
    if [ "${RESIDTAP_GPU_CHECK_ARCH_TEST:-0}" = 1 ]; then
        step arch-error 150 env RESIDTAP_TEST_ARCH_ERROR=1 python3 -m pytest -q -p no:cacheprovider \
            tests/test_cuda.py -k missing_architecture
    fi
fi
if [ "$PART" != op ]; then  # extract, all, tests
    step extract-tests 90 python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_device_map.py \
        tests/test_extract.py -k "cuda or gpu or split"
fi
if [ "$PART" = extract ] || [ "$PART" = all ]; then
    bench_extract_steps 120
    # the host side alone (no GPU): raw write vs serial vs split vs split with extract's default
    # publisher count (twice the writers on that host's 16 cores), on the GPU host's cores
    step bench-extract-host 60 python3 benchmarks/bench_extract.py --host-only --writers 4 --out "$OUT"
    step bench-inputs 60 python3 benchmarks/bench_inputs.py --out "$OUT"
fi
if [ "$PART" != extract ]; then  # last, in whatever time is left: every model family on the GPU
    step family-tests 120 python3 -m pytest -q --maxfail=10 -p no:cacheprovider \
        tests/test_families.py::test_cuda_capture_matches_reference
fi
finish
