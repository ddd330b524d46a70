#!/usr/bin/env bash
# CUDA backend check on a GPU machine, in parts so that gpu_check.sh can benchmark in between
# and run the most valuable checks first:
#   build:      build (or load) the extension once, so later steps do not race to build it;
#   gpu_tests:  tests/cuda/test_cuda_gpu.py without the slow integration tests;
#   memcheck, racecheck, synccheck: compute-sanitizer on a small workload (sanitize_cuda.py);
#   phases:     phase timings (benchmarks/profile_cuda.py), then the layer's time kernel by kernel
#               (benchmarks/time_split.py);
#   microbench: the step primitives alone (benchmarks/microbench.cu);
#   slow_tests: test_cuda_gpu.py's slow integration tests (torch.compile, DDP, AMP training);
#   ncu:        Nsight Compute on the persistent kernels of LSTM fp32 at S1, S4, S3 (not in
#               gpu_check.sh's order: a second, short call, `--part build,ncu`, about 2 min).
#
#   benchmarks/gpu_check_cuda.sh [--part PART[,PART...]] [LOG_DIR]   # logs to LOG_DIR
#
# PART is one of the above, or tests (build,gpu_tests), extra (memcheck,racecheck,synccheck,
# phases,microbench) or all (every part, the default); parts run in the order above.
# Exit status is non-zero if any step fails or is skipped for time; every step that fits still
# runs so one GPU session reports everything. Steps share gpu_check.sh's deadline
# (benchmarks/gpu_common.sh) and copy their logs to $OUT after each step. Every step has a
# timeout: a persistent kernel that deadlocked (a grid that was not co-resident) must not eat the
# whole GPU session; a step that ignores the TERM is killed 10 s later.
# After a failed build (LOG_DIR/cuda_build.log without "CUDA backend: available on"), or a GPU
# test of the default path that hung or crashed, the steps that load the extension are skipped. After failed or hung cluster-mode GPU tests, or with
# FRNN_NO_CLUSTERS=1, sanitize_cuda.py leaves its cluster case out.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_common.sh
# This checkout, as gpu_check.sh runs it (which has named it already): a lent GPU machine has
# no install of it.
[[ ":${PYTHONPATH:-}:" == *":$PWD:"* ]] || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PART=all
if [[ "${1:-}" == "--part" ]]; then PART="${2:-}"; shift 2; fi
KNOWN=build,gpu_tests,memcheck,racecheck,synccheck,phases,microbench,slow_tests,ncu
case "$PART" in
  tests) STEPS=build,gpu_tests ;;
  extra) STEPS=memcheck,racecheck,synccheck,phases,microbench ;;
  all) STEPS=$KNOWN ;;
  *) STEPS=$PART ;;
esac
IFS=, read -ra _parts <<< "$STEPS"
[[ ${#_parts[@]} -gt 0 ]] || _parts=("")
for _p in "${_parts[@]}"; do
  [[ ",$KNOWN," == *",$_p,"* ]] || {
    echo "usage: $0 [--part tests|extra|all|PART[,PART...]] [LOG_DIR]; PART: $KNOWN" >&2; exit 2; }
done
wants() { [[ ",$STEPS," == *",$1,"* ]]; }
LOG_DIR="${1:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
# Run alone (not from gpu_check.sh, e.g. the short `--part build,ncu` call): a start stamp of its
# own, without which frnn_collect copies nothing to $OUT and only the output's tail comes back.
if [[ -z "${FRNN_STAMP:-}" || ! -e "${FRNN_STAMP:-}" ]]; then
  FRNN_STAMP="$(mktemp -t fused_rnn_gpu_check_cuda_start.XXXXXX)"
  export FRNN_STAMP
  trap 'rm -f "$FRNN_STAMP"' EXIT   # its own stamp only (gpu_check.sh removes the one it made)
fi
status=0
STEP_RC=0
# step NAME SECONDS CMD...: run with a timeout (clamped to the deadline), log to
# LOG_DIR/cuda_NAME.log, report; STEP_RC is CMD's exit status (124/137: timed out).
step() {
  local name="$1" want="$2"; shift 2
  local limit t0=$SECONDS log="$LOG_DIR/cuda_$name.log" idle
  limit=$(frnn_limit "$want")
  if [[ "$limit" == 0 ]]; then
    echo "cuda: $name SKIPPED (the time budget is spent)"
    status=1; STEP_RC=1
    return
  fi
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  STEP_RC=$?
  if [[ $STEP_RC == 0 ]]; then
    echo "cuda: $name ok ($((SECONDS - t0)) s)"
  else
    if [[ $STEP_RC == 124 || $STEP_RC == 137 ]]; then
      # How long the log had been quiet when the timeout struck: a pytest -v run writes a line
      # per test, so a long silence is a hang in the test that started last (gpu_common.sh
      # frnn_unfinished_test), a short one a run cut off while still making progress.
      idle=$(( $(date +%s) - $(stat -c %Y "$log" 2>/dev/null || date +%s) ))
      if (( idle >= 30 )); then
        echo "gpu_check: no output for $idle s when the step's timeout ($limit s) ended it" >>"$log"
      else
        echo "gpu_check: cut off while still making progress (output $idle s before the step's timeout, $limit s)" >>"$log"
      fi
    fi
    echo "cuda: $name FAILED ($((SECONDS - t0)) s, limit $limit s, exit $STEP_RC); last lines of $log:"
    tail -n 30 "$log"
    status=1
  fi
  frnn_collect "$LOG_DIR"
}
# skip_if_kernels_unusable NAME...: true (and says so) when the build failed, so NAME cannot
# load the extension, or when a GPU test of the default path hung or crashed earlier in this
# run (FRNN_CUDA_HUNG, set by frnn_apply_test_results), so NAME would run the kernels that hung.
skip_if_kernels_unusable() {
  if frnn_build_failed "$LOG_DIR"; then
    echo "cuda: $* SKIPPED (the CUDA build failed: see $LOG_DIR/cuda_build.log)"
    status=1
    return 0
  fi
  if [[ "${FRNN_CUDA_HUNG:-0}" == 1 ]]; then
    echo "cuda: $* SKIPPED (a GPU test hung or crashed: see $LOG_DIR/cuda_gpu_tests.log)"
    status=1
    return 0
  fi
  return 1
}

if wants build; then
  # A lock file that torch's loader left in the build directory when a build was killed (a
  # step's timeout, an earlier call on this machine) makes every later load wait forever. Nothing
  # else builds while this runs, so one found here is stale: the build step removes it first,
  # and it is removed again after a build that failed or was killed.
  step build 180 "$PYTHON" -c "
import torch
from fused_rnn.ops.cuda import _ext
try:
    lock = _ext.build_dir() / 'lock'
    print('build dir:', lock.parent, flush=True)
    if lock.exists():
        lock.unlink()
        print('removed a stale build lock', lock, flush=True)
except Exception as e:  # no GPU to name the directory by: the load below says why
    print('build dir: unknown (' + type(e).__name__ + ': ' + str(e) + ')', flush=True)
from fused_rnn.ops import cuda
r = cuda.unavailable_reason(torch.device('cuda'))
print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('CUDA backend:', r or 'available on ' + torch.cuda.get_device_name())
# What the build was made with, and which libstdc++ stream and locale code the library carries
# itself (on the first H200 run its own std::ostream::_M_insert<long> crashed; csrc/binding.cpp
# now streams no numbers): a finding for the notes, never a failure.
import re, shutil, subprocess
try:
    cxx = subprocess.run(['c++', '--version'], capture_output=True, text=True, timeout=10)
    print('host compiler:', (cxx.stdout.splitlines() or ['?'])[0])
    so = getattr(_ext.extension(), '__file__', None) if r is None else None
    if so and shutil.which('nm'):
        nm = subprocess.run(['nm', '-C', '--defined-only', so], capture_output=True, text=True,
                            timeout=30).stdout
        own = sorted({m.group(0) for m in re.finditer(
            r'std::(basic_ostream|num_put|codecvt|locale)[^(]*', nm)})
        print('libstdc++ stream/locale code defined in', so + ':', len(own), 'symbols',
              '; '.join(own[:8]))
except Exception as e:  # a diagnostic only
    print('host compiler / symbol check failed:', type(e).__name__, e)
raise SystemExit(r is not None)
"
  if frnn_build_failed "$LOG_DIR"; then   # it ran (not skipped for time) and failed
    bdir=$(sed -n 's/^build dir: //p' "$LOG_DIR/cuda_build.log" 2>/dev/null | head -n 1)
    if [[ ( -z "$bdir" || "$bdir" == unknown* ) && "$(frnn_limit 30 10)" != 0 ]]; then
      bdir=$(timeout "$(frnn_limit 30 10)" "$PYTHON" -c "from fused_rnn.ops.cuda import _ext; print(_ext.build_dir())" 2>/dev/null | tail -n 1)
    fi
    if [[ -n "$bdir" && -e "$bdir/lock" ]]; then
      rm -f "$bdir/lock" && echo "cuda: removed $bdir/lock, left by the build that did not finish"
    fi
    echo "cuda: the build FAILED; the steps that load the extension are skipped"
  fi
fi
if wants gpu_tests && ! skip_if_kernels_unusable gpu_tests; then
  # The GPU tests (the no-GPU checks -- tests/cuda/test_cuda_compile.py and the CPU emulation --
  # run in CI and need no GPU time). -v names each test as it starts, so a hang is found in the
  # log (gpu_common.sh frnn_unfinished_test); pytest-timeout, where installed, ends a test
  # after 60 s (and with it the run: a stuck kernel cannot be interrupted). The slow
  # integration tests wait for slow_tests, after the bench.
  step gpu_tests 150 "$PYTHON" -m pytest tests/cuda/test_cuda_gpu.py -v -ra -p no:cacheprovider \
    $(frnn_pytest_timeout 60) -k "not ($FRNN_SLOW_TESTS)"
  echo "cuda: GPU tests: $(frnn_tests_summary "$LOG_DIR/cuda_gpu_tests.log")"
  # for the parts that follow in this run (gpu_check.sh, which runs them later, does the same)
  if [[ "$STEPS" != *gpu_tests ]]; then frnn_apply_test_results "$LOG_DIR/cuda_gpu_tests.log"; fi
fi

# compute-sanitizer on a small case (a clean run is part of the issue's bar); no caching
# allocator so out-of-bounds accesses cannot land inside another tensor's block.
if wants memcheck || wants racecheck || wants synccheck; then
  SAN="$(command -v compute-sanitizer || true)"
  for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
              "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    [[ -n "$SAN" ]] || { [[ -x "$cand" ]] && SAN="$cand"; }
  done
  if skip_if_kernels_unusable compute-sanitizer; then
    :
  elif [[ -z "$SAN" ]]; then
    echo "cuda: compute-sanitizer not found (it ships with the CUDA toolkit); sanitizer steps FAILED"
    status=1
  else
    # Instrument only our kernels (rnn_forward_kernel / rnn_backward_kernel) where this
    # compute-sanitizer can filter by kernel name: torch's own kernels need no checking here.
    # Its help is read whole first: under pipefail, grep -q exiting at the first match can
    # kill the tool with SIGPIPE mid-help and so decide the test (the filter then left off).
    FILTER=()
    san_help=$("$SAN" --help 2>/dev/null || true)
    if grep -q -- '--kernel-name' <<<"$san_help"; then
      FILTER=(--kernel-name kns=rnn_)
    fi
    [[ "${FRNN_NO_CLUSTERS:-0}" == 1 ]] && \
      echo "cuda: FRNN_NO_CLUSTERS=1: compute-sanitizer leaves the cluster case out"
    # memcheck gets the quick subset for up to 90 s; racecheck and synccheck (slower per case)
    # a small case set: one cell, every partition. Each script stops starting cases 15-20 s
    # before its step's timeout, so a slow tool still reports which cases it checked.
    for tool in memcheck racecheck synccheck; do
      wants "$tool" || continue
      # The device docs (KINDS.md) saw compute-sanitizer refuse the GPU under the gVisor
      # runtime: then no tool can run here, and it says nothing about our kernels.
      if grep -ls "Device not supported" "$LOG_DIR"/cuda_sanitizer_*.log >/dev/null 2>&1; then
        echo "cuda: sanitizer_$tool SKIPPED: compute-sanitizer cannot use this machine's GPU" \
             "(\"Device not supported\" in an earlier sanitizer log)"
        continue
      fi
      if [[ $tool == memcheck ]]; then want=90 margin=20 cases=(); else want=60 margin=15 cases=(--cases 10); fi
      step "sanitizer_$tool" "$want" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SAN" --tool "$tool" ${FILTER[@]+"${FILTER[@]}"} --error-exitcode 1 "$PYTHON" \
        benchmarks/sanitize_cuda.py --time-budget "$(frnn_inner_budget "$want" "$margin")" \
        ${cases[@]+"${cases[@]}"}
      if grep -q "Device not supported" "$LOG_DIR/cuda_sanitizer_$tool.log" 2>/dev/null; then
        echo "cuda: compute-sanitizer cannot use this machine's GPU (\"Device not supported\":" \
             "the gVisor runtime, see the device docs); the other tools are skipped, and a" \
             "clean sanitizer run still needs another machine"
        break
      fi
    done
  fi
fi

# Phase timings (where a step's time goes) on S1-S6, LSTM and GRU, fp32 and bf16, then on S3
# and S4 with no step barrier in bf16 (cuda-tagged: its copy column, which now holds the wait
# for the other blocks, against the default's copy and sync; the forward only there, the
# backward has K parts), with the TF32 tiles through mma.sync (cuda-mma, fp32 rows only: its mma column against
# the default's is what mma.sync and ldmatrix buy), without
# register blocking (cuda-tb1: one tile a warp at a time, where the default blocks
# 2 or 4 tiles; its mma column against the default's is what blocking buys), and without the
# epilogue's batches of points there (cuda-pb1: its epilogue column against the default's). The
# cluster variants
# were timed on the H200 (2026-12-04-NVIDIA-H200-phases.md): profile_cuda.py --variants
# cuda-cl8,cuda-cl16ds,cuda-tc --variant-shapes S1,S5,S6 repeats that. The table goes to
# benchmarks/results/<date>-<gpu>-phases.md (rewritten after each configuration) and is printed
# here. It stops starting configurations 15 s before its timeout.
if wants phases && ! skip_if_kernels_unusable phases; then
  PHASED=cuda-tagged,cuda-mma,cuda-tb1,cuda-pb1
  # less those whose GPU tests failed
  [[ "${FRNN_NO_TAGGED:-0}" == 1 ]] && PHASED=$(frnn_without "$PHASED" cuda-tagged)
  [[ "${FRNN_NO_MMA:-0}" == 1 ]] && PHASED=$(frnn_without "$PHASED" cuda-mma)
  VARIANTS=(--variants "$PHASED" --variant-shapes S3,S4)
  step phases 75 "$PYTHON" benchmarks/profile_cuda.py --dtypes fp32,bf16 ${VARIANTS[@]+"${VARIANTS[@]}"} \
    --time-budget "$(frnn_inner_budget 75 15)"
  grep '^| ' "$LOG_DIR/cuda_phases.log" 2>/dev/null || true
  # Then the whole layer, ours and torch.nn's, kernel by kernel (benchmarks/time_split.py, a
  # few seconds): how much of a fwd+bwd the recurrent kernels are, and what the rest is (the
  # time-parallel GEMMs, conversions, sums), on S1-S6 in fp32 and bf16, and the same for the
  # per-step path (cuda-step: its GEMMs, its step kernels and the gaps between launches). Its
  # table goes to benchmarks/results/<date>-<gpu>-split.md.
  SPLIT=cuda,cuda-step,cudnn
  [[ "${FRNN_NO_STEP:-0}" == 1 ]] && SPLIT=cuda,cudnn  # its GPU tests failed
  step split 60 "$PYTHON" benchmarks/time_split.py --backends "$SPLIT" \
    --dtypes fp32,bf16 --time-budget "$(frnn_inner_budget 60 10)"
  grep '^| ' "$LOG_DIR/cuda_split.log" 2>/dev/null || true
fi

# The step primitives alone (benchmarks/microbench.cu, ~40 s with its build): grid.sync,
# cluster.sync at 2-16 blocks, an exchange of 4-192 KB per block through L2 (after grid.sync,
# or as tagged words with no barrier) or through distributed shared memory, each checked for
# wrong words first, and passes through 8-256 KB of
# straight-line code (what an instruction costs once a step's code outgrows the instruction
# caches). Its table goes to the logs (microbench.md) and is printed here; it prices the leads
# in NOTES.md.
if wants microbench; then
  NVCC="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
  MB_BIN="${TMPDIR:-/tmp}/fused_rnn_microbench"
  step microbench 75 bash -c "'$NVCC' -O3 -std=c++17 -arch=sm_90 -o '$MB_BIN' \
    benchmarks/microbench.cu && '$MB_BIN' '$LOG_DIR/microbench.md'"
  grep '^| ' "$LOG_DIR/cuda_microbench.log" 2>/dev/null || true
fi

# The slow integration tests (torch.compile, DDP, AMP training), each allowed 120 s, and the
# warp-level mma/ldmatrix layout check on this GPU (an nvcc build and one run; the "-mma" shapes
# of the GPU tests above already check that path's results).
if wants slow_tests && ! skip_if_kernels_unusable slow_tests; then
  step gpu_tests_slow 150 "$PYTHON" -m pytest tests/cuda/test_cuda_gpu.py \
    tests/cuda/test_warp_mma.py::test_the_layouts_hold_on_this_gpu -v -ra -p no:cacheprovider \
    $(frnn_pytest_timeout 120) -k "$FRNN_SLOW_TESTS or layouts_hold_on_this_gpu"
  echo "cuda: slow GPU tests: $(frnn_tests_summary "$LOG_DIR/cuda_gpu_tests_slow.log")"
fi
# Nsight Compute on the first forward and backward launch (profile_cuda.py's warm-up, no clock
# reads) of LSTM fp32 at S1 and at S4, the shapes where the first H200 run's phase timings put
# the matmul 30x and 16x off the tensor cores' rate, then at S3 (its forward: one tile a warp
# over all of K; the other shape under cuDNN): issue stalls (no_instruction: instruction fetch),
# the instructions executed (with the microbench's fetch rows: what fetching them costs), pipe
# use, shared-memory bank conflicts, occupancy. --clock-control none leaves the card's clocks
# alone. The reports go to
# LOG_DIR/cuda_ncu.log (the .md profile_cuda.py writes goes to LOG_DIR, not to the results).
if wants ncu && ! skip_if_kernels_unusable ncu; then
  NCU="$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1 || true)"
  if [[ -z "$NCU" ]]; then
    echo "cuda: ncu SKIPPED (no ncu on PATH or under /opt/nvidia/nsight-compute)"
    status=1
  else
    NCU_ARGS=(--clock-control none --target-processes all
              --kernel-name "regex:rnn_(forward|backward)_kernel" --launch-count 2
              --section SpeedOfLight --section WarpStateStats --section SchedulerStats
              --section InstructionStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis_Tables)
    step ncu 150 bash -c 'ncu=$1 py=$2 out=$3; shift 3
      for shape in S1 S4 S3; do
        echo "=== ncu: LSTM fp32 $shape"
        "$ncu" "$@" "$py" benchmarks/profile_cuda.py --modes LSTM --dtypes fp32 \
          --shapes "$shape" --out-dir "$out" || exit
      done' ncu-step "$NCU" "$PYTHON" "$LOG_DIR" "${NCU_ARGS[@]}"
  fi
fi
echo "cuda: logs in $LOG_DIR"
exit $status
