#!/usr/bin/env bash
# One command for a lent GPU (about 7 minutes at most): GPU tests, benchmarks, compute-sanitizer,
# phase timings, short table last.
#
#   FRNN_COMMIT=<hash> benchmarks/gpu_check.sh [--backends LIST] [--budget SECONDS] [--dry-run]
#                    (default cuda,triton,cuda-tagged,cuda-pipelined,cuda-mma,cuda-step,cuda-persistent,cuda-tb1,cuda-pb1,
#                     cuda-p1,cuda-cl16,cuda-cl16ds,cuda-cl8,cuda-tc,cuda-b32,cuda-g1,cuda-direct,cuda-nopipe,
#                     cuda-regcopy,cuda-gemm32,cuda-genfrag;
#                     the first backend is timed with cuDNN over every configuration before
#                     the others start, then the other backends with cuda-step and
#                     cuda-persistent, then the other variants; cuda-tagged = no step barrier in
#                     the 16-bit layers (h and the dgates as words tagged with their step, which
#                     the stage copy polls; fp32 and plans with K parts as cuda-regcopy);
#                     cuda-pipelined = the pipelined copy on the rows where a stage copy rule
#                     (ops.STAGE_COPY_RULES) sends plain cuda to the tagged one (none yet: no
#                     rows);
#                     cuda-mma = the TF32 tiles through mma.sync and
#                     ldmatrix (fp32 rows only); cuda-step = the per-step path (a cuBLAS
#                     GEMM and a launch of the cell a step, no W_hh on chip);
#                     cuda-persistent = the persistent kernel on the rows where a path rule
#                     (ops.PATH_RULES) sends plain cuda to the per-step path (none yet: no
#                     rows);
#                     cuda-tb1 = cuda multiplying one tile a warp
#                     at a time
#                     (no register blocking), cuda-pb1 = cuda finishing one point a thread at
#                     a time (no batches of points in the epilogue), cuda-p1 = cuda without K parts, cuda-cl16/cuda-cl8 = batch groups as
#                     thread-block clusters of at most 16/8 blocks where one fits (sm_90),
#                     cuda-cl16ds = cuda-cl16 exchanging through distributed shared memory
#                     where that fits, cuda-tc = K-parts
#                     teams as clusters (sm_90), cuda-b32 = on at
#                     most 32 blocks where they fit, cuda-g1 = without batch
#                     groups, cuda-direct = without X staging, cuda-nopipe = one stage buffer,
#                     cuda-regcopy = staging through registers, cuda-gemm32 = the 16-bit
#                     layers' time-parallel GEMMs on operands promoted to fp32 (TF32), as in
#                     the first H200 runs, cuda-genfrag = the WMMA fragments loaded through
#                     generic addresses only, as in the first H200 runs: variants timed last,
#                     in this order)
# FRNN_COMMIT: the commit being run (the lent machine gets the working tree without .git, so the
# caller evaluates `git rev-parse HEAD` where it has git and writes the literal hash into the
# command); the bench records it, and FRNN_GPU_TESTS (exported here: one line on the CUDA GPU
# test step) with it.
#
# In order of value, each step only if time is left before the deadline (--budget seconds from
# the start, default 420: with the machine's start (1-2 min) that leaves a task's 15 minutes of
# device time room for a second, fresh machine (it starts only with 4 min left) to confirm a
# fix):
# 1. with cuda in --backends: benchmarks/gpu_check_cuda.sh --part tests builds the extension
#    once (at most 180 s) and runs tests/cuda's GPU tests but the slow ones (at most 150 s,
#    60 s a test with pytest-timeout). If the build failed, cuda and its variants leave the
#    bench and every later CUDA step is skipped. If a K-parts test failed or hung, the steps
#    below run with K parts off (FUSED_RNN_CUDA_K_PARTS=1), so the table still times kernels
#    that passed; if a cluster-mode test did, the cluster variants leave the bench and
#    FRNN_NO_CLUSTERS=1 keeps the later steps off clusters; if a tagged-exchange test did,
#    cuda-tagged leaves the bench and FRNN_NO_TAGGED=1 the phase timings;
# 2. bench_gpu.py: S1-S6 (then the one-step shapes G1-G3) x LSTM/GRU x fp32/bf16/fp16, fwd and
#    fwd+bwd, against cuDNN in the same process; writes benchmarks/results/<date>-<gpu>.md and
#    .csv (time-budgeted, so the script always finishes; its output also goes to bench.log in
#    cuda_logs.tar.gz);
# 3. with cuda: compute-sanitizer memcheck (at most 90 s), then the kernels' phase timings
#    (profile_cuda.py, at most 75 s) and the layer's time by kind of kernel (time_split.py,
#    at most 40 s);
# 4. the main job's benchmark (fused-rnn bench: char-LM truncated-BPTT training against
#    torch.nn; fails if a backend's validation loss disagrees; only with 65 s left);
# 5. with cuda: compute-sanitizer racecheck and synccheck on a small case (at most 60 s each),
#    then the step primitives (microbench.cu);
# 6. the slow CUDA GPU tests (torch.compile, DDP, AMP training), then the other gpu-marked
#    tests (pytest -m gpu);
# 7. the rest of the Triton test suite on the GPU (compiled kernels, no interpreter), at most
#    90 s; each Triton kernel variant compiles once, which is most of its run time;
# 8. the benchmark's short fwd+bwd table again, last.
# With a budget of 420 s, steps 1-2 take about 300 s; what follows runs as far as time allows.
# It needs no install: it runs this checkout (PYTHONPATH) under $PYTHON (default python3), so on a
# machine that cannot reach a package index (the lent GPU) the whole command is just
# `benchmarks/gpu_check.sh`; `pip install -e .` there fails, since its build isolation fetches
# setuptools.
# With $OUT set (the lent-device machine returns only what is under it), this run's result files
# and the CUDA step logs (with this script's whole output, gpu_check.log) are copied there after
# every step, so a command killed at its limit still returns what it measured.
# Exits non-zero if any step failed or was skipped for time; a failed step does not stop the rest.
# --dry-run runs the same steps on the CPU (Triton interpreter, tiny shapes, results in /tmp):
# it checks the script, not the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
# The whole output also goes to gpu_check.log in the CUDA logs directory, which every collection
# tars into $OUT/cuda_logs.tar.gz: the device returns only the last 12,000 characters of a
# command's output. (The script runs itself under tee; the variable marks the inner run.)
if [[ -z "${FRNN_GPU_CHECK_LOGS:-}" ]]; then
  CUDA_LOGS="$(mktemp -d -t fused_rnn_cuda.XXXXXX)"
  FRNN_GPU_CHECK_LOGS="$CUDA_LOGS" bash benchmarks/gpu_check.sh "$@" 2>&1 \
    | tee "$CUDA_LOGS/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
CUDA_LOGS="$FRNN_GPU_CHECK_LOGS"
unset FRNN_GPU_CHECK_LOGS   # not for the steps: a script they start tees its own output
mkdir -p "$CUDA_LOGS"

BACKENDS=cuda,triton,cuda-tagged,cuda-pipelined,cuda-mma,cuda-step,cuda-persistent,cuda-tb1,cuda-pb1,cuda-p1,cuda-cl16,cuda-cl16ds,cuda-cl8,cuda-tc,cuda-b32,cuda-g1,cuda-direct,cuda-nopipe,cuda-regcopy,cuda-gemm32,cuda-genfrag
BUDGET=420
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
HAS_CUDA=0
[[ ",$BACKENDS," == *",cuda,"* && $DRY == 0 ]] && HAS_CUDA=1
CUDA_OK=0   # the extension built and loaded (gpu_check_cuda.sh --part tests)
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--dry-run --shapes D1 --dtypes fp32,bf16)
  SUITE_ARGS=(-k "B3-T1-H37 and fp32")
else
  unset TRITON_INTERPRET            # compiled kernels, not the CPU interpreter
  BENCH_ARGS=()
  SUITE_ARGS=()
fi
if [[ "${FRNN_NO_CLUSTERS:-0}" == 1 ]]; then
  BACKENDS=$(frnn_without_clusters "$BACKENDS")
fi
[[ "${FRNN_NO_TAGGED:-0}" == 1 ]] && BACKENDS=$(frnn_without_tagged "$BACKENDS")
status=0
step() { echo; echo "=== $* ($(date +%T), $(frnn_left) s left)"; }
# run_for NAME SECONDS [--min SECONDS] CMD...: CMD under a timeout clamped to the deadline, or
# skipped when that timeout would be under --min seconds (default 20; frnn_limit).
run_for() {
  local name="$1" want="$2" min=20 limit
  shift 2
  if [[ "${1:-}" == --min ]]; then min="$2"; shift 2; fi
  limit=$(frnn_limit "$want" "$min")
  if [[ "$limit" == 0 ]]; then echo "$name SKIPPED (the time budget is spent)"; status=1; return; fi
  timeout -k 10 "$limit" "$@" || status=1
}

step "environment"
[[ $DRY == 1 ]] || timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1
timeout 60 "$PYTHON" -c "import torch, triton, fused_rnn; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None); print('fused_rnn from', fused_rnn.__file__)" || status=1
if [[ -n "${FRNN_COMMIT:-}" ]]; then
  echo "commit $FRNN_COMMIT (FRNN_COMMIT)"
elif ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "FRNN_COMMIT is not set and this checkout has no git: the tables cannot name the commit" \
       "(put FRNN_COMMIT=<hash> in the command)"
fi

FRNN_GPU_TESTS="not run (no cuda in --backends)"
[[ $DRY == 1 ]] && FRNN_GPU_TESTS="not run (dry run)"
PYTEST_IGNORE=()
if [[ $HAS_CUDA == 1 ]]; then
  step "CUDA backend: build, GPU tests"
  benchmarks/gpu_check_cuda.sh --part tests "$CUDA_LOGS" || status=1
  PYTEST_IGNORE=(--ignore=tests/cuda)   # run by gpu_check_cuda.sh
  if frnn_build_ok "$CUDA_LOGS"; then
    CUDA_OK=1
    FRNN_GPU_TESTS=$(frnn_tests_summary "$CUDA_LOGS/cuda_gpu_tests.log")
    FRNN_CUDA_HUNG=0
    frnn_apply_test_results "$CUDA_LOGS/cuda_gpu_tests.log"
    [[ "${FRNN_NO_CLUSTERS:-0}" == 1 ]] && BACKENDS=$(frnn_without_clusters "$BACKENDS")
    [[ "${FRNN_NO_TAGGED:-0}" == 1 ]] && BACKENDS=$(frnn_without_tagged "$BACKENDS")
    [[ "${FRNN_NO_MMA:-0}" == 1 ]] && BACKENDS=$(frnn_without "$BACKENDS" cuda-mma)
    [[ "${FRNN_NO_STEP:-0}" == 1 ]] && BACKENDS=$(frnn_without "$BACKENDS" cuda-step)
    if [[ $FRNN_CUDA_HUNG == 1 ]]; then
      BACKENDS=$(frnn_without_cuda "$BACKENDS")
      CUDA_OK=0
      status=1
    fi
  else
    # Every later process would try the build again (or wait on its lock): leave cuda out,
    # and out of the later pytest steps' header (tests/conftest.py).
    BACKENDS=$(frnn_without_cuda "$BACKENDS")
    export FRNN_SKIP_CUDA_PROBE=1
    FRNN_GPU_TESTS="not run (the CUDA build failed)"
    echo "cuda: the build did not succeed (no \"CUDA backend: available on\" in cuda_build.log): the bench" \
         "leaves out cuda and its variants, and compute-sanitizer, the phase timings, the" \
         "microbench and the slow CUDA tests are skipped"
    status=1
  fi
fi
if [[ $HAS_CUDA == 1 && -z "$BACKENDS" ]]; then
  # cuda and its variants all left out: the run still times cuDNN, against Triton.
  BACKENDS=triton
  echo "cuda is out of the bench: it times cuDNN against triton instead"
fi
export FRNN_GPU_TESTS
echo "GPU tests: $FRNN_GPU_TESTS"
frnn_collect "$CUDA_LOGS"

step "benchmarks (backends: ${BACKENDS:-none})"
limit=$(frnn_limit 210)
if [[ "$limit" == 0 ]]; then
  echo "benchmarks SKIPPED (the time budget is spent)"; status=1
elif [[ -z "$BACKENDS" ]]; then
  echo "benchmarks SKIPPED (no backend left to time)"; status=1
else
  # bench_gpu.py stops starting rows after --time-budget; the timeout is the backstop.
  [[ $DRY == 1 ]] || BENCH_ARGS+=(--time-budget "$(frnn_inner_budget 210 70)")
  timeout -k 10 "$limit" "$PYTHON" benchmarks/bench_gpu.py --backends "$BACKENDS" \
    ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} 2>&1 | tee "$CUDA_LOGS/bench.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
frnn_collect "$CUDA_LOGS"

if [[ $CUDA_OK == 1 ]]; then
  step "CUDA backend: compute-sanitizer memcheck, phase timings"
  benchmarks/gpu_check_cuda.sh --part memcheck,phases "$CUDA_LOGS" || status=1
fi

# The main job end to end: the char-LM's truncated-BPTT training on torch.nn (cuDNN) and on
# each backend named (variants aside), same data and seed; it exits 1 if a backend's validation
# loss after the same steps disagrees with torch.nn's (fused_rnn/bench.py BENCH_TOLERANCE). It
# rewrites its table after each precision (a timeout keeps those done, marked INCOMPLETE), and
# a row whose fault takes the CUDA context with it costs only that row: the bench trains the
# rows not done yet in a fresh process. It starts only with 65 s left (a 60 s timeout).
step "main-job bench (fused-rnn bench)"
PRIMARY="$(tr ',' '\n' <<<"$BACKENDS" | grep -v '^cuda-' | paste -sd, -)"
if [[ $DRY == 1 ]]; then
  CHARLM_ARGS=(--device cpu --backends reference --precisions fp32 --hidden-size 16
               --batch-size 4 --bptt 8 --steps 3 --warmup 1 --val-chunks 2 --threads 1
               --out "${TMPDIR:-/tmp}/fused_rnn_charlm_dryrun")
else
  # Only the backends that can run here (a failed CUDA build must not cost Triton's rows; the
  # CLI refuses an unavailable backend it is asked for). Only those named are probed (cuda is
  # not, after a failed build), under a timeout: a load can wait on a build's lock.
  if [[ "$(frnn_limit 90 60)" == 0 ]]; then
    PRIMARY=torch  # the bench is skipped for time below: no probe to wait for either
  elif ! PRIMARY="$(timeout 45 "$PYTHON" -c "import sys; from fused_rnn.backends import unavailable_reason as why; print(','.join(b for b in sys.argv[1].split(',') if b and why(b, 'cuda') is None))" "$PRIMARY")"; then
    PRIMARY=$(frnn_without_cuda "$(tr ',' '\n' <<<"$BACKENDS" | grep -v '^cuda-' | paste -sd, -)")
    echo "main-job bench: the backend probe failed or timed out; running ${PRIMARY:-torch} only"
  fi
  CHARLM_ARGS=(--device cuda --backends "${PRIMARY:-torch}")
fi
run_for "main-job bench" 90 --min 60 "$PYTHON" -m fused_rnn.cli bench "${CHARLM_ARGS[@]}" 2>&1
frnn_collect "$CUDA_LOGS"

if [[ $CUDA_OK == 1 ]]; then
  step "CUDA backend: compute-sanitizer racecheck, synccheck; microbench"
  benchmarks/gpu_check_cuda.sh --part racecheck,synccheck,microbench "$CUDA_LOGS" || status=1
fi

step "gpu-marked tests"
if [[ $CUDA_OK == 1 ]]; then
  benchmarks/gpu_check_cuda.sh --part slow_tests "$CUDA_LOGS" || status=1
fi
run_for "gpu-marked tests" 120 "$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider -rs --durations=5 \
  $(frnn_pytest_timeout 100) ${PYTEST_IGNORE[@]+"${PYTEST_IGNORE[@]}"}
frnn_collect "$CUDA_LOGS"

step "Triton test suite"
run_for "Triton test suite" 90 "$PYTHON" -m pytest tests/triton -q -p no:cacheprovider -x -m "not gpu" --durations=5 \
  ${SUITE_ARGS[@]+"${SUITE_ARGS[@]}"}

step "fwd+bwd summary (from the benchmark; full table in the .md it wrote)"
[[ -f "$CUDA_LOGS/bench.log" ]] && sed -n '/^wrote /p; /^cell  shape/,$p' "$CUDA_LOGS/bench.log"
echo "GPU tests: $FRNN_GPU_TESTS"
frnn_collect "$CUDA_LOGS"
[[ -n "${OUT:-}" && -d "${OUT:-}" ]] && echo "in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -f "$FRNN_STAMP"
echo "status $status"
exit $status
