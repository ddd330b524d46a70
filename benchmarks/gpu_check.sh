#!/usr/bin/env bash
# One command for a lent GPU (about 8 minutes at most): GPU tests, benchmarks, compute-sanitizer,
# phase timings, short table last.
#
#   benchmarks/gpu_check.sh [--backends LIST] [--budget SECONDS] [--dry-run]
#                    (default cuda,triton,cuda-p1,cuda-cl16,cuda-cl16ds,cuda-cl8,cuda-tc,
#                     cuda-b32,cuda-g1,cuda-direct,cuda-nopipe,cuda-regcopy; the first backend
#                     is timed with cuDNN over every configuration before the others start;
#                     cuda-p1 = cuda without K parts, cuda-cl16/cuda-cl8 = batch groups as
#                     thread-block clusters of at most 16/8 blocks where one fits (sm_90),
#                     cuda-cl16ds = cuda-cl16 exchanging through distributed shared memory
#                     where that fits, cuda-tc = K-parts
#                     teams as clusters (sm_90), cuda-b32 = on at
#                     most 32 blocks where they fit, cuda-g1 = without batch
#                     groups, cuda-direct = without X staging, cuda-nopipe = one stage buffer,
#                     cuda-regcopy = staging through registers: variants timed last, in this
#                     order)
#
# In order of value, each step only if time is left before the deadline (--budget seconds from
# the start, default 480: DESIGN.md's ~8 minutes, so that a task's 15 minutes of device time
# also hold the machine's start and, after a fix, a second, shorter run to confirm it):
# 1. with cuda in --backends: benchmarks/gpu_check_cuda.sh --part tests builds the extension
#    once and runs tests/cuda's GPU tests; if a K-parts test fails, the steps below run with
#    K parts off (FUSED_RNN_CUDA_K_PARTS=1), so the table still times kernels that passed; if
#    a cluster-mode test fails, the cluster variants are left out of the bench;
# 2. bench_gpu.py: S1-S6 x LSTM/GRU x fp32/bf16/fp16, fwd and fwd+bwd, against cuDNN in the
#    same process; writes benchmarks/results/<date>-<gpu>.md and .csv (time-budgeted, so the
#    script always finishes);
# 3. with cuda: gpu_check_cuda.sh --part extra: compute-sanitizer (memcheck, racecheck,
#    synccheck), then the kernels' phase timings (profile_cuda.py);
# 4. the main job's benchmark (fused-rnn bench: char-LM truncated-BPTT training against
#    torch.nn, fp32/bf16/AMP; fails if a backend's validation loss disagrees);
# 5. the other gpu-marked tests (pytest -m gpu);
# 6. the rest of the Triton test suite on the GPU (compiled kernels, no interpreter) with the
#    time left; each Triton kernel variant compiles once, which is most of its run time;
# 7. the benchmark's short fwd+bwd table again, last.
# It needs no install: it runs this checkout (PYTHONPATH) under $PYTHON (default python3), so on a
# machine that cannot reach a package index (the lent GPU) the whole command is just
# `benchmarks/gpu_check.sh`; `pip install -e .` there fails, since its build isolation fetches
# setuptools.
# With $OUT set (the lent-device machine returns only what is under it), this run's result files
# and the CUDA step logs are copied there after every step, so a command killed at its limit
# still returns what it measured.
# Exits non-zero if any step failed or was skipped for time; a failed step does not stop the rest.
# --dry-run runs the same steps on the CPU (Triton interpreter, tiny shapes, results in /tmp):
# it checks the script, not the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

BACKENDS=cuda,triton,cuda-p1,cuda-cl16,cuda-cl16ds,cuda-cl8,cuda-tc,cuda-b32,cuda-g1,cuda-direct,cuda-nopipe,cuda-regcopy
BUDGET=480
DRY=0
USAGE="usage: $0 [--backends LIST] [--budget SECONDS] [--dry-run]"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --backends) BACKENDS="$2"; shift 2 ;;
    --backends=*) BACKENDS="${1#*=}"; shift ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --budget=*) BUDGET="${1#*=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
done

source benchmarks/gpu_common.sh
export FRNN_DEADLINE=$(( $(date +%s) + BUDGET ))
export FRNN_STAMP="$(mktemp -t fused_rnn_gpu_check_start.XXXXXX)"  # results newer are this run's
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$(mktemp -t fused_rnn_gpu_check.XXXXXX)"
CUDA_LOGS="$(mktemp -d -t fused_rnn_cuda.XXXXXX)"
HAS_CUDA=0
[[ ",$BACKENDS," == *",cuda,"* && $DRY == 0 ]] && HAS_CUDA=1
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--dry-run --shapes D1 --dtypes fp32,bf16)
  SUITE_ARGS=(-k "B3-T1-H37 and fp32")
else
  unset TRITON_INTERPRET            # compiled kernels, not the CPU interpreter
  BENCH_ARGS=()
  SUITE_ARGS=()
fi
status=0
step() { echo; echo "=== $* ($(date +%T), $(frnn_left) s left)"; }
# run_for NAME SECONDS CMD...: CMD under a timeout clamped to the deadline, or skipped.
run_for() {
  local name="$1" limit
  limit=$(frnn_limit "$2"); shift 2
  if [[ "$limit" == 0 ]]; then echo "$name SKIPPED (the time budget is spent)"; status=1; return; fi
  timeout -k 10 "$limit" "$@" || status=1
}

step "environment"
[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1
"$PYTHON" -c "import torch, triton, fused_rnn; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None); print('fused_rnn from', fused_rnn.__file__)" || status=1

PYTEST_IGNORE=()
if [[ $HAS_CUDA == 1 ]]; then
  step "CUDA backend: build, GPU tests"
  benchmarks/gpu_check_cuda.sh --part tests "$CUDA_LOGS" || status=1
  PYTEST_IGNORE=(--ignore=tests/cuda)   # run by gpu_check_cuda.sh
  if frnn_parts_failed "$CUDA_LOGS/cuda_gpu_tests.log"; then
    echo "cuda: K parts FAILED GPU tests; everything below runs with FUSED_RNN_CUDA_K_PARTS=1"
    export FUSED_RNN_CUDA_K_PARTS=1
  fi
  if frnn_cluster_failed "$CUDA_LOGS/cuda_gpu_tests.log"; then
    BACKENDS=$(frnn_without_clusters "$BACKENDS")
    echo "cuda: cluster mode FAILED GPU tests; the bench leaves out its variants: $BACKENDS"
  fi
fi

step "benchmarks (backends: $BACKENDS)"
limit=$(frnn_limit 210)
if [[ "$limit" == 0 ]]; then
  echo "benchmarks SKIPPED (the time budget is spent)"; status=1
else
  # bench_gpu.py stops starting rows after --time-budget; the timeout is the backstop.
  [[ $DRY == 1 ]] || BENCH_ARGS+=(--time-budget "$(frnn_inner_budget 210 70)")
  timeout -k 10 "$limit" "$PYTHON" benchmarks/bench_gpu.py --backends "$BACKENDS" "${BENCH_ARGS[@]}" 2>&1 | tee "$LOG"
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
frnn_collect "$CUDA_LOGS"

if [[ $HAS_CUDA == 1 ]]; then
  step "CUDA backend: compute-sanitizer, phase timings"
  benchmarks/gpu_check_cuda.sh --part extra "$CUDA_LOGS" || status=1
fi

# The main job end to end: the char-LM's truncated-BPTT training on torch.nn (cuDNN) and on
# each backend named (variants aside), same data and seed; it exits 1 if a backend's validation
# loss after the same steps disagrees with torch.nn's (fused_rnn/cli.py BENCH_TOLERANCE).
step "main-job bench (fused-rnn bench)"
PRIMARY="$(tr ',' '\n' <<<"$BACKENDS" | grep -v '^cuda-' | paste -sd, -)"
if [[ $DRY == 1 ]]; then
  CHARLM_ARGS=(--device cpu --backends reference --precisions fp32 --hidden-size 16
               --batch-size 4 --bptt 8 --steps 3 --warmup 1 --val-chunks 2 --threads 1
               --out "${TMPDIR:-/tmp}/fused_rnn_charlm_dryrun")
else
  # Only the backends that can run here (a failed CUDA build must not cost Triton's rows; the
  # CLI refuses an unavailable backend it is asked for).
  PRIMARY="$("$PYTHON" -c "import sys, fused_rnn; ok = fused_rnn.available_backends('cuda'); print(','.join(b for b in sys.argv[1].split(',') if b in ok))" "$PRIMARY")"
  CHARLM_ARGS=(--device cuda --backends "${PRIMARY:-torch}")
fi
run_for "main-job bench" 90 "$PYTHON" -m fused_rnn.cli bench "${CHARLM_ARGS[@]}" 2>&1
frnn_collect "$CUDA_LOGS"

step "gpu-marked tests"
run_for "gpu-marked tests" 120 "$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider -rs --durations=5 "${PYTEST_IGNORE[@]}"
frnn_collect "$CUDA_LOGS"

step "Triton test suite"
run_for "Triton test suite" 90 "$PYTHON" -m pytest tests/triton -q -p no:cacheprovider -x -m "not gpu" --durations=5 "${SUITE_ARGS[@]}"

step "fwd+bwd summary (from the benchmark; full table in the .md it wrote)"
sed -n '/^wrote /p; /^cell  shape/,$p' "$LOG"
rm -f "$LOG"
frnn_collect "$CUDA_LOGS"
[[ -n "${OUT:-}" && -d "${OUT:-}" ]] && echo "in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -f "$FRNN_STAMP"
echo "status $status"
exit $status
