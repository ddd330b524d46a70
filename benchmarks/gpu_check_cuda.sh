#!/usr/bin/env bash
# CUDA backend check on a GPU machine: build the extension, run its GPU tests, then
# phase timings (benchmarks/profile_cuda.py), compute-sanitizer (memcheck, racecheck, synccheck)
# on a small workload. Exit status is
# non-zero if any step fails; every step still runs so one GPU session reports everything.
#
#   benchmarks/gpu_check_cuda.sh [LOG_DIR]      # logs to LOG_DIR (default: a temp dir)
#
# Meant to be called by benchmarks/gpu_check.sh. Not timed on a GPU yet; the JIT build (first
# run only; FUSED_RNN_CUDA_BUILD_DIR moves its cache) and the three sanitizer runs dominate.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${1:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
status=0
step() {  # step NAME CMD...: run, log, report
  local name="$1"; shift
  local t0=$SECONDS
  if "$@" >"$LOG_DIR/cuda_$name.log" 2>&1; then
    echo "cuda: $name ok ($((SECONDS - t0)) s)"
  else
    echo "cuda: $name FAILED ($((SECONDS - t0)) s); last lines of $LOG_DIR/cuda_$name.log:"
    tail -n 30 "$LOG_DIR/cuda_$name.log"
    status=1
  fi
}

# Every step has a timeout: a persistent kernel that deadlocked (a grid that was not co-resident)
# must not eat the whole GPU session.
# 1. Build (or load the ahead-of-time build) once, so later steps do not race to build it.
step build timeout 420 python -c "
import torch
from fused_rnn.ops import cuda
r = cuda.unavailable_reason(torch.device('cuda'))
print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('CUDA backend:', r or 'available on ' + torch.cuda.get_device_name())
raise SystemExit(r is not None)
"
# 2. The GPU tests (the no-GPU checks -- tests/cuda/test_cuda_compile.py and the CPU emulation --
#    run in CI and need no GPU time).
step gpu_tests timeout 300 python -m pytest tests/cuda/test_cuda_gpu.py -q -ra -p no:cacheprovider
# 3. Phase timings (where a step's time goes) on S1-S6, LSTM and GRU, fp32 and bf16; the table
#    goes to benchmarks/results/<date>-<gpu>-phases.md and is printed here.
step phases timeout 150 python benchmarks/profile_cuda.py --dtypes fp32,bf16
grep '^| ' "$LOG_DIR/cuda_phases.log" || true
# 4. compute-sanitizer on a small case; no caching allocator so out-of-bounds accesses cannot
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
  for tool in memcheck racecheck synccheck; do
    step "sanitizer_$tool" timeout 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool "$tool" "${FILTER[@]}" --error-exitcode 1 python benchmarks/sanitize_cuda.py
  done
else
  echo "cuda: compute-sanitizer not found (it ships with the CUDA toolkit); sanitizer steps FAILED"
  status=1
fi
echo "cuda: logs in $LOG_DIR"
exit $status
