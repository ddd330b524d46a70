# Sourced by gpu_check.sh and gpu_check_cuda.sh: one deadline for the whole GPU check, and
# collection of what it produced. A lent device runs one command for at most 10 minutes and
# returns only the files under $OUT, so the scripts stop starting steps near the deadline and
# copy their results to $OUT after every step (a command killed at its limit loses nothing).
#
# FRNN_DEADLINE: epoch seconds after which no step starts (set once, by the outermost script);
# FRNN_STAMP: a file created at the start, so result files newer than it are this run's.
# PYTHON: the interpreter every step runs (default python3: on the lent GPU machine that is the
# one that holds PyTorch, and a bare `python` may not exist).

PYTHON="${PYTHON:-python3}"

# Seconds left before the deadline.
frnn_left() { echo $(( ${FRNN_DEADLINE:-99999999999} - $(date +%s) )); }

# The timeout for a step that wants WANT seconds: WANT, or what is left less 5 s; 0 when fewer
# than 20 s are left (the step is then skipped).
frnn_limit() {
  local left=$(( $(frnn_left) - 5 ))
  if (( left < 20 )); then echo 0; elif (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

# The --time-budget for a script run as a step that wants WANT seconds: its timeout less MARGIN
# (half the timeout when that is short), so the script stops starting work and still writes its
# report before the timeout kills it.
frnn_inner_budget() {
  local limit
  limit=$(frnn_limit "$1")
  echo $(( limit > 2 * $2 ? limit - $2 : limit / 2 ))
}

# Copies this run's files under benchmarks/results and a tarball of LOG_DIR (if given) to $OUT.
frnn_collect() {
  [[ -n "${OUT:-}" && -d "${OUT:-}" && -n "${FRNN_STAMP:-}" && -e "${FRNN_STAMP:-}" ]] || return 0
  find benchmarks/results -type f -newer "$FRNN_STAMP" -exec cp {} "$OUT"/ \;
  if [[ -n "${1:-}" && -d "$1" && -n "$(ls -A "$1")" ]]; then
    tar -czf "$OUT/cuda_logs.tar.gz" -C "$1" . 2>/dev/null
  fi
  return 0
}

# True when the pytest log LOG (-ra) reports a failed K-parts test (a test id with "parts"):
# gpu_check.sh then times the rest with FUSED_RNN_CUDA_K_PARTS=1, so that one GPU session still
# yields a valid table for the kernels that passed.
frnn_parts_failed() {
  [[ -f "$1" ]] && grep -qE '^FAILED [^ ]*parts' "$1"
}

# True when LOG reports a failed cluster test (a test id with "cluster"): gpu_check.sh then
# drops the cluster variants (cuda-cl16, cuda-cl16ds, cuda-cl8, cuda-tc) from the bench rather than time a
# mode that gave wrong results.
frnn_cluster_failed() {
  [[ -f "$1" ]] && grep -qE '^FAILED [^ ]*cluster' "$1"
}

# LIST (comma-separated backends) without the cluster variants.
frnn_without_clusters() {
  local out=() all b
  IFS=, read -ra all <<< "$1"
  for b in "${all[@]}"; do [[ "$b" == cuda-cl* || "$b" == cuda-tc ]] || out+=("$b"); done
  (IFS=,; echo "${out[*]}")
}
