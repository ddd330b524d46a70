#!/usr/bin/env bash
# One command for a lent GPU (~8 minutes on an H100): GPU tests, benchmarks, short table last.
#
#   benchmarks/gpu_check.sh [--backends triton,cuda,cuda-g1,cuda-direct,cuda-nopipe,cuda-regcopy] [--dry-run]
#                    (default: all six; cuda-g1 = cuda without batch groups, cuda-direct =
#                     cuda without X staging, cuda-nopipe = one stage buffer, cuda-regcopy =
#                     staging through registers: variants timed after the main rows)
#
# 0. with cuda in --backends: benchmarks/gpu_check_cuda.sh builds the extension once, runs
#    tests/cuda's GPU tests, the kernels' phase timings (profile_cuda.py) and compute-sanitizer
#    (memcheck, racecheck, synccheck);
# 1. the other gpu-marked tests (pytest -m gpu): correctness first, quickly;
# 2. bench_gpu.py: S1-S6 x LSTM/GRU x fp32/bf16/fp16, fwd and fwd+bwd, against cuDNN in the
#    same process; writes benchmarks/results/<date>-<gpu>.md and .csv (time-budgeted, so the
#    script always finishes);
# 3. the rest of the Triton test suite on the GPU (compiled kernels, no interpreter) with the
#    time left; each Triton kernel variant compiles once, which is most of its run time;
# 4. the benchmark's short fwd+bwd table again, last; with $OUT set (the lent-device machine),
#    this run's result files and the CUDA step logs are copied there.
# Exits non-zero if any step failed; every step runs regardless, so one failure costs no data.
# --dry-run runs the same steps on the CPU (Triton interpreter, tiny shapes, results in /tmp):
# it checks the script, not the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

BACKENDS=triton,cuda,cuda-g1,cuda-direct,cuda-nopipe,cuda-regcopy
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --backends) BACKENDS="$2"; shift 2 ;;
    --backends=*) BACKENDS="${1#*=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    *) echo "usage: $0 [--backends triton,cuda,cuda-g1,cuda-direct,cuda-nopipe,cuda-regcopy] [--dry-run]" >&2; exit 2 ;;
  esac
done

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$(mktemp -t fused_rnn_gpu_check.XXXXXX)"
STAMP="$(mktemp -t fused_rnn_gpu_check_start.XXXXXX)"   # results newer than this are this run's
CUDA_LOGS=""
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--dry-run --shapes D1 --dtypes fp32,bf16)
  SUITE_ARGS=(-k "B3-T1-H37 and fp32")
else
  unset TRITON_INTERPRET            # compiled kernels, not the CPU interpreter
  BENCH_ARGS=(--time-budget 180)
  SUITE_ARGS=()
fi
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" || status=1

PYTEST_IGNORE=()
if [[ ",$BACKENDS," == *",cuda,"* && $DRY == 0 ]]; then
  step "CUDA backend: build, GPU tests, compute-sanitizer"
  CUDA_LOGS="$(mktemp -d -t fused_rnn_cuda.XXXXXX)"
  benchmarks/gpu_check_cuda.sh "$CUDA_LOGS" || status=1
  PYTEST_IGNORE=(--ignore=tests/cuda)   # just run by gpu_check_cuda.sh
fi

step "gpu-marked tests"
timeout 120 python -m pytest tests -m gpu -q -p no:cacheprovider -rs --durations=5 "${PYTEST_IGNORE[@]}" || status=1

step "benchmarks (backends: $BACKENDS)"
timeout 250 python benchmarks/bench_gpu.py --backends "$BACKENDS" "${BENCH_ARGS[@]}" 2>&1 | tee "$LOG"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1

step "Triton test suite"
timeout 90 python -m pytest tests/triton -q -p no:cacheprovider -x -m "not gpu" --durations=5 "${SUITE_ARGS[@]}" || status=1

step "fwd+bwd summary (from the benchmark; full table in the .md it wrote)"
sed -n '/^wrote /p; /^cell  shape/,$p' "$LOG"
rm -f "$LOG"
# On the lent-device machine only what is written under $OUT comes back: the result tables of
# this run (benchmarks/results files newer than the start) and the CUDA step logs.
if [[ -n "${OUT:-}" && -d "${OUT:-}" && $DRY == 0 ]]; then
  find benchmarks/results -type f -newer "$STAMP" -exec cp {} "$OUT"/ \;
  [[ -n "$CUDA_LOGS" ]] && tar -czf "$OUT/cuda_logs.tar.gz" -C "$CUDA_LOGS" . 2>/dev/null
  echo "copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
rm -f "$STAMP"
echo "status $status"
exit $status
