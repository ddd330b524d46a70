# Sourced by gpu_check.sh and gpu_check_cuda.sh: one deadline for the whole GPU check, and
# collection of what it produced. A lent device runs one command for at most 10 minutes and
# returns only the files under $OUT, so the scripts stop starting steps near the deadline and
# copy their results to $OUT after every step (a command killed at its limit loses nothing).
#
# FRNN_DEADLINE: epoch seconds after which no step starts (set once, by the outermost script);
# FRNN_STAMP: a file created at the start, so result files newer than it are this run's.
# PYTHON: the interpreter every step runs (default python3: on the lent GPU machine that is the
# one that holds PyTorch, and a bare `python` may not exist).
# FRNN_NO_CLUSTERS=1 (exported by gpu_check.sh when a cluster-mode GPU test failed or hung):
# the later steps leave the cluster configurations out (gpu_check_cuda.sh's phase variants,
# sanitize_cuda.py's cluster case, profile_cuda.py's cluster variants), saying so.

PYTHON="${PYTHON:-python3}"

# The slow integration tests of tests/cuda/test_cuda_gpu.py (torch.compile, DDP, AMP training):
# deselected from the first GPU-test step (-k "not (...)"), run after the bench (-k "...").
FRNN_SLOW_TESTS="compile or ddp or amp or training"

# Seconds left before the deadline.
frnn_left() { echo $(( ${FRNN_DEADLINE:-99999999999} - $(date +%s) )); }

# The timeout for a step that wants WANT seconds: WANT, or what is left less 5 s; 0 when that
# is under MIN (default 20) seconds, i.e. with under MIN + 5 s left (the step is then skipped).
frnn_limit() {
  local left=$(( $(frnn_left) - 5 )) min="${2:-20}"
  if (( left < min )); then echo 0; elif (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

# The --time-budget for a script run as a step that wants WANT seconds: its timeout less MARGIN
# (half the timeout when that is short), so the script stops starting work and still writes its
# report before the timeout kills it.
frnn_inner_budget() {
  local limit
  limit=$(frnn_limit "$1")
  echo $(( limit > 2 * $2 ? limit - $2 : limit / 2 ))
}

# Copies this run's files under benchmarks/results (not a half-written *.tmp) and a tarball of
# LOG_DIR (if given) to $OUT. The tarball is made elsewhere and moved in, so a command killed
# while it is written still returns the previous one.
frnn_collect() {
  [[ -n "${OUT:-}" && -d "${OUT:-}" && -n "${FRNN_STAMP:-}" && -e "${FRNN_STAMP:-}" ]] || return 0
  # $OUT takes 8 files: the tables go there, and every results file into the logs' tarball
  # too, where the plot and the split table go alone (a full run writes 7 results files).
  local f
  while IFS= read -r f; do
    case "$f" in
      *.png | *-split.md) ;;
      *) cp "$f" "$OUT"/ ;;
    esac
    if [[ -n "${1:-}" && -d "$1" ]]; then mkdir -p "$1/results" && cp "$f" "$1/results/"; fi
  done < <(find benchmarks/results -type f -newer "$FRNN_STAMP" ! -name '*.tmp' ! -name '.*')
  if [[ -n "${1:-}" && -d "$1" && -n "$(ls -A "$1")" ]]; then
    local tmp
    tmp="$(mktemp -t fused_rnn_cuda_logs.XXXXXX)" || return 0
    tar -czf "$tmp" -C "$1" . 2>/dev/null; chmod 644 "$tmp"
    mv -f "$tmp" "$OUT/cuda_logs.tar.gz" 2>/dev/null || rm -f "$tmp"
  fi
  return 0
}

# The flags that give every test of a pytest run at most SECONDS (pytest-timeout, thread method:
# a test stuck in a CUDA call gets its stacks dumped and the run ends at once, instead of the
# step's timeout killing it silently); nothing where pytest-timeout is not installed.
frnn_pytest_timeout() {
  if "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1; then
    echo "--timeout=$1 --timeout-method=thread"
  fi
}

# True when LOG_DIR/cuda_build.log (gpu_check_cuda.sh's build step) says the extension loaded.
frnn_build_ok() {
  [[ -f "$1/cuda_build.log" ]] && grep -q '^CUDA backend: available on' "$1/cuda_build.log"
}

# True when LOG_DIR holds a build log without that line: the build ran and failed (no log: it
# did not run here, e.g. gpu_check_cuda.sh --part extra on its own).
frnn_build_failed() {
  [[ -f "$1/cuda_build.log" ]] && ! frnn_build_ok "$1"
}

# The id of the test that LOG (pytest -v) shows started but never finished, when that is a
# failure of that test: pytest-timeout ended it ("+++ Timeout +++" on its line), the process
# died in it (a crash), or the step's timeout found the log idle (a hang; gpu_check_cuda.sh
# notes which). Prints nothing and returns 1 when every started test has a result, when the
# step's time limit only cut off a run that was still making progress, or without a log.
frnn_unfinished_test() {
  [[ -f "$1" ]] || return 1
  local last
  # Test lines only until pytest's closing sections: the warnings summary heads each entry
  # with a test id on a line of its own, which is not a test left running.
  last=$(awk '/^=+ (warnings summary|short test summary info|FAILURES|ERRORS|PASSES) =+$/ {exit}
              {print}' "$1" | grep -aE '^tests/[^ ]*::[^ ]+' | tail -n 1)
  [[ -n "$last" ]] || return 1
  if [[ "$last" =~ ^[^\ ]+\ +(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ]]; then return 1; fi
  grep -q '^gpu_check: cut off while still making progress' "$1" && return 1
  echo "${last%% *}"
}

# The ids of LOG's failed, errored and unfinished tests (-ra summary and -v result lines), one a
# line.
frnn_bad_tests() {
  [[ -f "$1" ]] || return 0
  {
    grep -aoE '^(FAILED|ERROR) [^ ]+::[^ ]+' "$1" | sed -E 's/^[A-Z]+ //'
    grep -aoE '^tests/[^ ]*::[^ ]+ +(FAILED|ERROR)' "$1" | sed -E 's/ +[A-Z]+$//'
    frnn_unfinished_test "$1" || true  # 1 when no test hung: not a failure of this list
  } | sort -u
}

# What CUDA says of a kernel fault that leaves the process's context unusable (cudaGetErrorString
# of the sticky errors): every later test of that pytest run then fails with it, whatever it
# tests. Looked for in the error lines ("E   ...") of pytest's FAILURES and ERRORS sections only:
# torch ends every CUDA error with a hint about "device-side assertions", whatever the error.
FRNN_STICKY_CUDA_ERRORS='illegal memory access|unspecified launch failure|misaligned address|illegal instruction|device-side assert triggered|hardware stack error|invalid program counter|launch timed out|not supported on global/shared address space'

# The tests of LOG's FAILURES and ERRORS sections, in the run's order, by their short names
# (test_fn[params]), each followed by " sticky" where its error lines show such a fault. pytest
# prints ERRORS (setup and teardown) before FAILURES, so the order is the -v result lines';
# tests those lines do not name (a -q log) follow in the sections' order.
frnn_failure_sections() {
  [[ -f "$1" ]] || return 0
  awk -v pat="$FRNN_STICKY_CUDA_ERRORS" '
    function flush() {
      if (name != "") {
        if (!(name in seen)) { order[++n] = name; seen[name] = 1 }
        if (sticky) st[name] = 1
      }
      name = ""
    }
    function emit(t) { print t (t in st ? " sticky" : ""); done[t] = 1 }
    NR == FNR && /^=+ (FAILURES|ERRORS) =+$/ { flush(); insec = 1; next }
    NR == FNR && /^=+ .* =+$/ { flush(); insec = 0; next }
    NR == FNR && insec && /^_+ .+ _+$/ {
      flush(); name = $0; sub(/^_+ /, "", name); sub(/ _+$/, "", name)
      sub(/^ERROR at (setup|teardown) of /, "", name); sticky = 0; next
    }
    NR == FNR && insec && /^E / && $0 ~ pat { sticky = 1 }
    NR == FNR { next }
    FNR == 1 { flush() }
    /^tests\/[^ ]*::[^ ]+ +(FAILED|ERROR)/ {
      t = $1; sub(/^[^:]*::/, "", t); gsub(/::/, ".", t)
      if ((t in seen) && !(t in done)) emit(t)
    }
    END { flush(); for (i = 1; i <= n; i++) if (!(order[i] in done)) emit(order[i]) }' "$1" "$1"
}

# The tests LOG's failures are blamed on: all of frnn_bad_tests, but after a sticky fault only
# the failures up to the first test that showed it (by short name): the tests after it met a
# broken context, and a fault in, say, a per-step test must not turn K parts and the cluster
# configurations off for the bench. (A fault is reported at the next synchronising call, so it
# can surface one test late; that test is then the one blamed.) A run that died before its
# summary has no sections: every bad test counts.
frnn_blamed_tests() {
  local sections
  sections=$(frnn_failure_sections "$1")
  if ! grep -q ' sticky$' <<<"$sections"; then
    frnn_bad_tests "$1"
    return 0
  fi
  awk '{ s = ($0 ~ / sticky$/); sub(/ sticky$/, ""); print; if (s) exit }' <<<"$sections"
}

# True when LOG blames a failed, crashed or hung test (frnn_blamed_tests) whose id matches the
# extended regular expression RE.
frnn_blamed_match() {
  [[ -f "$1" ]] || return 1
  # The list is taken whole first: under pipefail a producer's status, or the SIGPIPE grep -q
  # can give it by exiting early, would decide the pipeline instead of grep.
  local bad
  bad=$(frnn_blamed_tests "$1")
  grep -qE "$2" <<<"$bad"
}

# A K-parts test (an id with "parts"): gpu_check.sh then times the rest with
# FUSED_RNN_CUDA_K_PARTS=1, so that one GPU session still yields a valid table for the kernels
# that passed.
frnn_parts_failed() { frnn_blamed_match "$1" 'parts'; }

# A cluster test (an id with "cluster"): gpu_check.sh then drops the cluster variants
# (cuda-cl16, cuda-cl16ds, cuda-cl8, cuda-tc) from the bench rather than time a mode that gave
# wrong results, and exports FRNN_NO_CLUSTERS=1.
frnn_cluster_failed() { frnn_blamed_match "$1" 'cluster'; }

# A test of the tagged exchange (an id with "tagged", FUSED_RNN_CUDA_STAGE_COPY=tagged):
# gpu_check.sh then drops cuda-tagged from the bench and, with FRNN_NO_TAGGED=1, from the phase
# timings, rather than time an exchange that gave wrong results or hung; and it pins
# FUSED_RNN_CUDA_STAGE_COPY=pipelined, so that no stage copy rule (ops.STAGE_COPY_RULES) sends
# plain cuda rows to it either.
frnn_tagged_failed() { frnn_blamed_match "$1" 'tagged'; }

# A test of the TF32 mma.sync tiles (a "-mma" parameter: FUSED_RNN_CUDA_FRAG_LOADS=mma, which
# only the cuda-mma variant runs): gpu_check.sh drops cuda-mma and pins
# FUSED_RNN_CUDA_FRAG_LOADS=shared, the default.
frnn_mma_failed() { frnn_blamed_match "$1" '[[-]mma[]-]'; }

# A test of the per-step path (a "step" parameter: FUSED_RNN_CUDA_PATH=step, which only
# cuda-step runs while no path rule sends cuda there): gpu_check.sh drops cuda-step and pins
# FUSED_RNN_CUDA_PATH=persistent.
frnn_step_failed() { frnn_blamed_match "$1" '[[-]step[]-]'; }

# The tests whose hang is no hang of the default path: those of a variant above, and the
# binding's refusals, whose calls run in child processes (a crash there is the child's; its
# cuda-gdb backtrace can keep the log silent for a minute).
frnn_variant_test() {
  [[ "$1" == *parts* || "$1" == *cluster* || "$1" == *tagged* ||
     "$1" == *test_binding_refuses_what_its_kernels_cannot_take* ]] ||
    grep -qE '[[-](mma|step)[]-]' <<<"$1"
}

# One line on a GPU-test run from its log LOG (pytest -v -ra): pytest's summary ("805 passed,
# 6 deselected in 80.1s", plus the first failed ids), "timed out: <id> (...)" when a test hung,
# "crashed in: <id> (...)" when one crashed the run, "cut off at the step's time limit (...)",
# or "not run" without a log.
frnn_tests_summary() {
  if [[ ! -f "$1" ]]; then echo "not run"; return 0; fi
  local line bad n passed failed hung
  line=$(grep -aE '^(=+ )?([0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)|no tests ran).* in [0-9.]+s' "$1" \
         | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  passed=$(grep -acE '^tests/[^ ]*::[^ ]+ +PASSED' "$1")
  failed=$(grep -acE '^tests/[^ ]*::[^ ]+ +(FAILED|ERROR)' "$1")
  if hung=$(frnn_unfinished_test "$1"); then
    if grep -q '+ Timeout +' "$1"; then line="timed out: $hung"
    elif grep -q '^gpu_check: no output for' "$1"; then line="timed out: $hung (hung)"
    else line="crashed in: $hung"; fi
    line="$line (after $passed passed, $failed failed)"
  elif [[ -z "$line" ]]; then
    if grep -q '^gpu_check: cut off while still making progress' "$1"; then
      line="cut off at the step's time limit ($passed passed, $failed failed so far)"
    else
      line="no pytest summary ($passed passed, $failed failed)"
    fi
  fi
  bad=$(frnn_bad_tests "$1" | grep -vxF "${hung:-}" | sed 's/^.*:://')
  if [[ -n "$bad" ]]; then
    n=$(wc -l <<<"$bad")
    line="$line; failed: $(head -n 3 <<<"$bad" | paste -sd, - | sed 's/,/, /g')"
    (( n > 3 )) && line="$line (+$(( n - 3 )) more)"
  fi
  local sticky
  sticky=$(frnn_failure_sections "$1")
  sticky=$(sed -n 's/ sticky$//p' <<<"$sticky")
  if [[ -n "$sticky" ]]; then
    line="$line; a CUDA fault surfaced in $(head -n 1 <<<"$sticky"): the failures after it"
    line="$line follow from it"
  fi
  echo "$line"
}

# LIST (comma-separated backends) without the cluster variants.
frnn_without_clusters() {
  local out=() all b
  IFS=, read -ra all <<< "$1"
  for b in "${all[@]}"; do [[ "$b" == cuda-cl* || "$b" == cuda-tc ]] || out+=("$b"); done
  (IFS=,; echo "${out[*]}")
}

# LIST without the backends named after it: after their GPU tests failed.
frnn_without() {
  local out=() all b list=$1
  shift
  IFS=, read -ra all <<< "$list"
  for b in "${all[@]}"; do [[ " $* " == *" $b "* ]] || out+=("$b"); done
  (IFS=,; echo "${out[*]}")
}

# LIST without cuda-tagged: after its GPU tests failed (frnn_tagged_failed).
frnn_without_tagged() {
  local out=() all b
  IFS=, read -ra all <<< "$1"
  for b in "${all[@]}"; do [[ "$b" == cuda-tagged ]] || out+=("$b"); done
  (IFS=,; echo "${out[*]}")
}

# LIST without cuda and its variants (cuda-*): after a failed build.
frnn_without_cuda() {
  local out=() all b
  IFS=, read -ra all <<< "$1"
  for b in "${all[@]}"; do [[ "$b" == cuda || "$b" == cuda-* ]] || out+=("$b"); done
  (IFS=,; echo "${out[*]}")
}

# After the GPU tests (their log LOG): K parts off (FUSED_RNN_CUDA_K_PARTS=1) if a K-parts test
# failed or hung, FRNN_NO_CLUSTERS=1 if a cluster test did, FRNN_NO_TAGGED=1 and
# FUSED_RNN_CUDA_STAGE_COPY=pipelined if a tagged-exchange test did; says so. Run in the calling shell
# (not a subshell), so the exports reach the later steps.
frnn_apply_test_results() {
  if frnn_parts_failed "$1"; then
    echo "cuda: K parts FAILED GPU tests; everything below runs with FUSED_RNN_CUDA_K_PARTS=1"
    export FUSED_RNN_CUDA_K_PARTS=1
  fi
  if frnn_cluster_failed "$1"; then
    echo "cuda: cluster mode FAILED GPU tests; the steps below leave the cluster configurations" \
         "out (FRNN_NO_CLUSTERS=1)"
    export FRNN_NO_CLUSTERS=1
  fi
  if frnn_tagged_failed "$1"; then
    echo "cuda: the tagged exchange FAILED GPU tests; the steps below leave cuda-tagged out" \
         "(FRNN_NO_TAGGED=1) and run FUSED_RNN_CUDA_STAGE_COPY=pipelined"
    export FRNN_NO_TAGGED=1 FUSED_RNN_CUDA_STAGE_COPY=pipelined
  fi
  if frnn_mma_failed "$1"; then
    echo "cuda: the mma.sync tiles FAILED GPU tests; the bench leaves cuda-mma out" \
         "(FRNN_NO_MMA=1) and everything below runs FUSED_RNN_CUDA_FRAG_LOADS=shared"
    export FRNN_NO_MMA=1 FUSED_RNN_CUDA_FRAG_LOADS=shared
  fi
  if frnn_step_failed "$1"; then
    echo "cuda: the per-step path FAILED GPU tests; the bench leaves cuda-step out" \
         "(FRNN_NO_STEP=1) and everything below runs FUSED_RNN_CUDA_PATH=persistent"
    export FRNN_NO_STEP=1 FUSED_RNN_CUDA_PATH=persistent
  fi
  # A hang in a test of none of these (the default path, say) would hang the bench's cuda rows
  # too, and every row after them: FRNN_CUDA_HUNG=1 tells gpu_check.sh to leave cuda out, and
  # gpu_check_cuda.sh, run alone, to skip its later steps that load the extension.
  local hung
  if hung=$(frnn_unfinished_test "$1") && ! frnn_variant_test "$hung"; then
    echo "cuda: $hung hung or crashed; the bench leaves out cuda and its variants, and the" \
         "later CUDA steps are skipped"
    FRNN_CUDA_HUNG=1
  fi
}
