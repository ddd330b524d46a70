#!/usr/bin/env bash
# CUDA backend check on a GPU machine, in two parts so that gpu_check.sh can benchmark in between:
#   tests: build the extension, run its GPU tests;
#   extra: compute-sanitizer (memcheck, racecheck, synccheck) on a small workload, then phase
#          timings (benchmarks/profile_cuda.py), then the step primitives alone
#          (benchmarks/microbench.cu).
#
#   benchmarks/gpu_check_cuda.sh [--part tests|extra|all] [LOG_DIR]   # logs to LOG_DIR
#
# Exit status is non-zero if any step fails or is skipped for time; every step that fits still
# runs so one GPU session reports everything. Steps share gpu_check.sh's deadline
# (benchmarks/gpu_common.sh) and copy their logs to $OUT after each step. Not timed on a GPU
# yet; the JIT build (first run only; FUSED_RNN_CUDA_BUILD_DIR moves its cache) and the three
# sanitizer runs dominate.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh
PART=all
if [[ "${1:-}" == "--part" ]]; then PART="$2"; shift 2; fi
[[ "$PART" == tests || "$PART" == extra || "$PART" == all ]] || {
  echo "usage: $0 [--part tests|extra|all] [LOG_DIR]" >&2; exit 2; }
LOG_DIR="${1:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
status=0
step() {  # step NAME SECONDS CMD...: run with a timeout (clamped to the deadline), log, report
  local name="$1" want="$2"; shift 2
  local limit t0=$SECONDS
  limit=$(frnn_limit "$want")
  if [[ "$limit" == 0 ]]; then
    echo "cuda: $name SKIPPED (the time budget is spent)"
    status=1
    return
  fi
  if timeout -k 10 "$limit" "$@" >"$LOG_DIR/cuda_$name.log" 2>&1; then
    echo "cuda: $name ok ($((SECONDS - t0)) s)"
  else
    echo "cuda: $name FAILED ($((SECONDS - t0)) s, limit $limit s); last lines of $LOG_DIR/cuda_$name.log:"
    tail -n 30 "$LOG_DIR/cuda_$name.log"
    status=1
  fi
  frnn_collect "$LOG_DIR"
}

# Every step has a timeout: a persistent kernel that deadlocked (a grid that was not co-resident)
# must not eat the whole GPU session. A step that ignores the TERM is killed 10 s later.
if [[ "$PART" != extra ]]; then
  # 1. Build (or load the ahead-of-time build) once, so later steps do not race to build it.
  step build 420 "$PYTHON" -c "
import torch
from fused_rnn.ops import cuda
r = cuda.unavailable_reason(torch.device('cuda'))
print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('CUDA backend:', r or 'available on ' + torch.cuda.get_device_name())
raise SystemExit(r is not None)
"
  # 2. The GPU tests (the no-GPU checks -- tests/cuda/test_cuda_compile.py and the CPU
  #    emulation -- run in CI and need no GPU time).
  step gpu_tests 300 "$PYTHON" -m pytest tests/cuda/test_cuda_gpu.py -q -ra -p no:cacheprovider
fi
if [[ "$PART" != tests ]]; then
  # 3. compute-sanitizer on a small case (a clean run is part of the issue's bar, so it comes
  #    before the diagnostics); no caching allocator so out-of-bounds accesses cannot
  #    land inside another tensor's block.
  SAN="$(command -v compute-sanitizer || true)"
  for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
              "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    [[ -n "$SAN" ]] || { [[ -x "$cand" ]] && SAN="$cand"; }
  done
  if [[ -n "$SAN" ]]; then
    # Instrument only our kernels (rnn_forward_kernel / rnn_backward_kernel) where this
    # compute-sanitizer can filter by kernel name: torch's own kernels need no checking here.
    FILTER=()
    if "$SAN" --help 2>/dev/null | grep -q -- '--kernel-name'; then
      FILTER=(--kernel-name kns=rnn_)
    fi
    # Each tool's script stops starting cases 20 s before its step's timeout, so a slow tool
    # (racecheck) still reports which cases it checked.
    for tool in memcheck racecheck synccheck; do
      step "sanitizer_$tool" 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SAN" --tool "$tool" "${FILTER[@]}" --error-exitcode 1 "$PYTHON" \
        benchmarks/sanitize_cuda.py --time-budget "$(frnn_inner_budget 240 20)"
      # The device docs (KINDS.md) saw compute-sanitizer refuse the GPU under the gVisor
      # runtime: then no tool can run here, and it says nothing about our kernels.
      if grep -q "Device not supported" "$LOG_DIR/cuda_sanitizer_$tool.log" 2>/dev/null; then
        echo "cuda: compute-sanitizer cannot use this machine's GPU (\"Device not supported\":" \
             "the gVisor runtime, see the device docs); the other tools are skipped, and a" \
             "clean sanitizer run still needs another machine"
        break
      fi
    done
  else
    echo "cuda: compute-sanitizer not found (it ships with the CUDA toolkit); sanitizer steps FAILED"
    status=1
  fi
  # 4. Phase timings (where a step's time goes) on S1-S6, LSTM and GRU, fp32 and bf16, then
  #    with clusters on S1, S5 and S6: batch groups as clusters of 8 (cuda-cl8, S5/S6: its sync
  #    min column is the cluster barrier's own cost, which nothing has measured yet), the same
  #    with 16 exchanging through distributed shared memory (cuda-cl16ds, S5/S6: its copy
  #    column is 0, the mirror is local) and K-parts teams as clusters (cuda-tc, S1: its parts
  #    column); the table goes to
  #    benchmarks/results/<date>-<gpu>-phases.md and is printed here.
  #    It stops starting configurations 20 s before its timeout, so it always writes the table.
  step phases 150 "$PYTHON" benchmarks/profile_cuda.py --dtypes fp32,bf16 \
    --variants cuda-cl8,cuda-cl16ds,cuda-tc --variant-shapes S1,S5,S6 \
    --time-budget "$(frnn_inner_budget 150 20)"
  grep '^| ' "$LOG_DIR/cuda_phases.log" 2>/dev/null || true
  # 5. The step primitives alone (benchmarks/microbench.cu, ~15 s with its build): grid.sync,
  #    cluster.sync at 2-16 blocks, and an exchange of 4-192 KB per block through L2 or through
  #    distributed shared memory, each checked for wrong words first. Its table goes to the
  #    logs (microbench.md) and is printed here; it prices the leads in NOTES.md.
  NVCC="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
  MB_BIN="${TMPDIR:-/tmp}/fused_rnn_microbench"
  step microbench 60 bash -c "'$NVCC' -O3 -std=c++17 -arch=sm_90 -o '$MB_BIN' \
    benchmarks/microbench.cu && '$MB_BIN' '$LOG_DIR/microbench.md'"
  grep '^| ' "$LOG_DIR/cuda_microbench.log" 2>/dev/null || true
fi
echo "cuda: logs in $LOG_DIR"
exit $status
