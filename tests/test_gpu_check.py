"""The orchestration of the one GPU call (benchmarks/gpu_check.sh, gpu_check_cuda.sh,
gpu_common.sh, sanitize_cuda.py, profile_cuda.py), checked without a GPU: pytest -v logs of
hung tests, a failed build, FRNN_NO_CLUSTERS, and tables written while a run is under way.

The end-to-end tests run gpu_check.sh for real with a stand-in for ``$PYTHON`` (and for
nvidia-smi, compute-sanitizer and nvcc) that logs every command it is given, so the order of the
steps and what each one is passed can be read back; each takes a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMON = ROOT / "benchmarks" / "gpu_common.sh"
ID = "tests/cuda/test_cuda_gpu.py::"


def _common(tmp_path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'source "{COMMON}" && {script}'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)


def _hung_log(tmp_path, test_id: str, timeout_plugin: bool) -> Path:
    """A real pytest -v log of a run whose test `test_id` hangs and is ended: by
    pytest-timeout's thread method where ``timeout_plugin`` (its banner written as the plugin
    writes it, then the process exits), else by a SIGTERM like a step's timeout (no summary
    either way)."""
    return _pytest_log(
        tmp_path,
        "import os, signal, sys, pytest\n"
        "@pytest.mark.parametrize('s', ['T5-B3-I7-H37', 'T16-B16-I32-H256-parts4'])\n"
        "def test_matches_reference(s): pass\n"
        f"@pytest.mark.parametrize('setting', ['{test_id}'])\n"
        "def test_cluster_mode_launches_clusters(request, setting):\n"
        f"    if {timeout_plugin}:\n"
        "        request.config.pluginmanager.getplugin('capturemanager')"
        ".suspend_global_capture(in_=True)\n"
        "        sys.stderr.write('+' * 35 + ' Timeout ' + '+' * 35 + '\\n')\n"
        "        sys.stderr.flush()\n"
        "        os._exit(1)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n")


def _pytest_log(tmp_path, source: str) -> Path:
    """The pytest -v -ra log of ``source`` run as tests/cuda/test_cuda_gpu.py under tmp_path."""
    tests = tmp_path / "tests" / "cuda"
    tests.mkdir(parents=True, exist_ok=True)
    (tests / "test_cuda_gpu.py").write_text(source)
    log = tmp_path / "cuda_gpu_tests.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "pytest", "tests/cuda/test_cuda_gpu.py", "-v", "-ra",
                        "-p", "no:cacheprovider"], cwd=tmp_path, stdout=f,
                       stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                       timeout=120, check=False)
    return log


@pytest.mark.parametrize("timeout_plugin", [True, False], ids=["pytest-timeout", "killed"])
def test_a_hung_cluster_test_is_found_in_the_v_log(tmp_path, timeout_plugin):
    """A hang leaves no FAILED line (no summary at all): the test that started last without a
    result counts as failed, so the cluster configurations are dropped, not timed."""
    log = _hung_log(tmp_path, "groups8", timeout_plugin)
    hung = f"{ID}test_cluster_mode_launches_clusters[groups8]"
    assert "FAILED" not in log.read_text() and hung in log.read_text()
    r = _common(tmp_path, f'frnn_unfinished_test "{log}"')
    assert r.returncode == 0 and r.stdout.strip() == hung, (r, log.read_text())
    r = _common(tmp_path, f'frnn_cluster_failed "{log}" && ! frnn_parts_failed "{log}" && '
                          f'frnn_tests_summary "{log}"')
    assert r.returncode == 0, (r, log.read_text())
    want = "timed out: " if timeout_plugin else "crashed in: "
    assert r.stdout.strip() == f"{want}{hung} (after 2 passed, 0 failed)", r.stdout
    # a run cut off by its step's limit while tests still finished is not a failure of the test
    # that was running (gpu_check_cuda.sh appends this line when the log was not idle)
    with open(log, "a") as f:
        f.write("\ngpu_check: cut off while still making progress (output 2 s before ...)\n")
    r = _common(tmp_path, f'frnn_cluster_failed "{log}"; echo "rc=$?"; frnn_tests_summary "{log}"')
    assert r.stdout.splitlines()[0] == "rc=1", r
    assert r.stdout.splitlines()[1].startswith("cut off at the step's time limit (2 passed"), r


def test_failed_results_in_the_v_lines_count_without_a_summary(tmp_path):
    """-v result lines (FAILED/ERROR) count even when the run died before its -ra summary; a
    complete run's summary is the one line the bench gets."""
    log = tmp_path / "log"
    log.write_text(f"{ID}test_a[x-parts4] FAILED  [ 10%]\n{ID}test_b PASSED  [ 20%]\n"
                   f"{ID}test_c[cluster8] ERROR  [ 30%]\n{ID}test_d PASSED  [ 40%]\n")
    r = _common(tmp_path, f'frnn_parts_failed "{log}" && frnn_cluster_failed "{log}" && '
                          f'! frnn_unfinished_test "{log}" && frnn_tests_summary "{log}"')
    assert r.returncode == 0, r
    assert r.stdout.strip() == ("no pytest summary (2 passed, 2 failed); failed: test_a[x-parts4], "
                                "test_c[cluster8]"), r.stdout
    done = tmp_path / "done"
    done.write_text(f"{ID}test_b PASSED  [100%]\n\n"
                    "=========== 800 passed, 7 deselected in 81.20s (0:01:21) ============\n")
    r = _common(tmp_path, f'! frnn_bad_tests "{done}" | grep -q . && frnn_tests_summary "{done}" '
                          f'&& frnn_tests_summary "{tmp_path}/missing"')
    assert r.stdout.splitlines() == ["800 passed, 7 deselected in 81.20s (0:01:21)", "not run"], r


_FAULT = ("RuntimeError('CUDA error: an illegal memory access was encountered\\nCUDA kernel "
          "errors might be asynchronously reported\\nCompile with `TORCH_USE_CUDA_DSA` to enable "
          "device-side assertions.')")
_FAULT_WORDS = "CUDA error: unspecified launch failure (a message the test printed)"
_NOT_STICKY = _FAULT.replace("an illegal memory access was encountered",
                             "too many resources requested for launch")


@pytest.mark.parametrize("errors,parts,cluster,surfaced", [
    # a fault in a per-step test: the K-parts and cluster failures after it are its echo
    ([("step", _FAULT), ("parts4", _FAULT), ("cluster8", _FAULT)], 1, 1, "step"),
    # a wrong K-parts result, then a cluster test's fault: both blamed, nothing after
    ([("parts4", "AssertionError('tensor 3 differs')"), ("cluster8", _FAULT),
      ("opcheck-parts2", _FAULT)], 0, 0, "cluster8"),
    ([("parts4", "AssertionError('tensor 3 differs')"), ("cluster8", _FAULT)], 0, 0, "cluster8"),
    # an error that leaves the context usable (torch's trailer names device-side assertions)
    ([("step", _NOT_STICKY), ("cluster8", "AssertionError('x')")], 1, 0, None),
    # the fault in a fixture: pytest prints ERRORS before FAILURES, but the K-parts failure
    # ran first and is blamed; the one after the fault is not
    ([("parts4", "AssertionError('tensor 3 differs')"), ("setup-cluster8", _FAULT),
      ("opcheck-parts2", _FAULT)], 0, 0, "setup-cluster8"),
    ([("setup-step", _FAULT), ("parts4", _FAULT), ("cluster8", _FAULT)], 1, 1, "setup-step"),
    # a fault's words in a test's captured output, not in its error: not a fault
    ([("print-step", "AssertionError('x')"), ("parts4", "AssertionError('y')")], 0, 1, None),
])
def test_after_a_sticky_cuda_fault_the_failures_that_follow_are_not_blamed(
        tmp_path, errors, parts, cluster, surfaced):
    """A kernel fault (an illegal address) leaves the CUDA context unusable, and every later
    test of the run fails with it: those are not blamed, so a fault in a per-step test does
    not turn K parts and clusters off for a bench whose kernels passed. The failures up to the
    fault are, in the run's order (a fault in a fixture is in pytest's ERRORS section, printed
    before FAILURES). Real pytest -v -ra logs (the -ra lines cut the message off: the FAILURES
    section's error lines say what failed). Keys: "setup-" raises in the test's fixture,
    "print-" prints a fault's words before it raises."""
    ids = ", ".join(repr(k) for k, _ in [("ok", None), *errors])
    raises = "".join(f"    if s == {k!r}:\n        raise {e}\n" for k, e in errors
                     if not k.startswith("setup-"))
    setup = "".join(f"    if s == {k!r}:\n        raise {e}\n" for k, e in errors
                    if k.startswith("setup-"))
    log = _pytest_log(tmp_path, f"import pytest\n@pytest.fixture\ndef f(s):\n{setup}    pass\n"
                                f"@pytest.mark.parametrize('s', [{ids}])\n"
                                f"def test_matches_reference(s, f):\n"
                                f"    if s.startswith('print-'):\n"
                                f"        print({_FAULT_WORDS!r})\n{raises}")
    if any(k.startswith("setup-") for k, _ in errors):
        text = log.read_text()
        assert text.index("= ERRORS =") < text.index("= FAILURES ="), text
    script = (f"set -uo pipefail; source {COMMON}; frnn_parts_failed {log}; echo $?; "
              f"frnn_cluster_failed {log}; echo $?; frnn_tests_summary {log}")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert lines[:2] == [str(parts), str(cluster)], (r.stdout + r.stderr, log.read_text())
    if surfaced is None:
        assert "CUDA fault" not in lines[2], lines[2]
    else:
        assert lines[2].endswith(f"; a CUDA fault surfaced in test_matches_reference[{surfaced}]: "
                                 "the failures after it follow from it"), lines[2]


def test_every_sticky_cuda_error_is_recognised(tmp_path):
    """Each of CUDA's sticky errors (FRNN_STICKY_CUDA_ERRORS, read from the script) marks the
    test whose error lines show it, in pytest's FAILURES layout; one not in the list does not."""
    text = COMMON.read_text()
    alternatives = text.split("FRNN_STICKY_CUDA_ERRORS='", 1)[1].split("'", 1)[0].split("|")
    assert len(alternatives) >= 9 and "illegal memory access" in alternatives
    names = [f"test_t[{i}]" for i in range(len(alternatives))] + ["test_t[other]"]
    log = ["=" * 20 + " FAILURES " + "=" * 20]
    for name, words in zip(names, [*alternatives, "too many resources requested for launch"]):
        log += [f"_____ {name} _____", "    def test_t(s):", f"E   RuntimeError: CUDA error: {words}"]
    log += ["=" * 20 + " short test summary info " + "=" * 20]
    (tmp_path / "t.log").write_text("\n".join(log) + "\n")
    r = _common(tmp_path, "frnn_failure_sections t.log")
    assert r.stdout.splitlines() == [f"{n} sticky" for n in names[:-1]] + [names[-1]], r


def test_a_warning_in_a_passing_run_is_not_a_test_left_running(tmp_path):
    """pytest's warnings summary heads each entry with the test's id on a line of its own. It
    was read as the last test started and never finished: a run where every test passed
    became "crashed in", and cuda left the bench."""
    log = _pytest_log(tmp_path, "import warnings, pytest\n"
                                "def test_a(): pass\n"
                                "@pytest.mark.parametrize('k', ['parts4', 'cluster8'])\n"
                                "def test_b(k): warnings.warn(f'deprecated {k}', UserWarning)\n")
    assert "warnings summary" in log.read_text()
    r = _common(tmp_path, f'! frnn_unfinished_test "{log}" && ! frnn_parts_failed "{log}" && '
                          f'! frnn_cluster_failed "{log}" && frnn_tests_summary "{log}"')
    assert r.returncode == 0, (r, log.read_text())
    assert r.stdout.startswith("3 passed, 2 warnings in "), r.stdout


def test_a_skipped_last_test_is_not_a_test_left_running(tmp_path):
    """A run whose last test was skipped (its -v line says SKIPPED) finished: the summary is
    pytest's, and no test counts as hung or crashed; an ERROR counts as a failure."""
    log = _pytest_log(tmp_path, "import pytest\n"
                                "def test_a(): pass\n"
                                "@pytest.mark.skip(reason='needs two GPUs')\n"
                                "def test_b(): pass\n")
    r = _common(tmp_path, f'! frnn_unfinished_test "{log}" && frnn_tests_summary "{log}"')
    assert r.returncode == 0, (r, log.read_text())
    assert r.stdout.startswith("1 passed, 1 skipped in "), r.stdout
    # a K-parts test that errored (in its setup, say) counts as failed, like a FAILED one
    (tmp_path / "errored.log").write_text(
        f"ERROR {ID}test_matches_reference[LSTM-bf16-T16-parts4] - RuntimeError: CUDA error\n"
        "1 passed, 1 error in 2.00s\n")
    r = _common(tmp_path, 'frnn_parts_failed errored.log && frnn_tests_summary errored.log')
    assert r.returncode == 0 and r.stdout.strip().endswith(
        "; failed: test_matches_reference[LSTM-bf16-T16-parts4]"), r


def test_a_failed_or_hung_tagged_test_drops_only_cuda_tagged(tmp_path):
    """A failed tagged-exchange test (FUSED_RNN_CUDA_STAGE_COPY=tagged) takes cuda-tagged out
    of the bench and, with FRNN_NO_TAGGED=1, out of the phase timings, and pins the pipelined
    copy (no stage copy rule may then send plain cuda to it); it turns neither K parts nor
    clusters off. A hung one does the same, and leaves the other cuda rows in: it does not
    count as a hang of the default path."""
    failed = tmp_path / "failed.log"
    failed.write_text(f"{ID}test_a PASSED  [ 10%]\n"
                      f"{ID}test_matches_reference[lengths-rev-GRU-bf16-T5-B3-I7-H37-tagged] "
                      "FAILED  [ 20%]\n")
    hung = tmp_path / "hung.log"
    hung.write_text(f"{ID}test_a PASSED  [ 10%]\n"
                    f"{ID}test_tagged_exchange_gives_the_barriers_bits[LSTM-bf16] \n")
    for log in (failed, hung):
        r = _common(tmp_path, f'frnn_tagged_failed "{log}" && ! frnn_parts_failed "{log}" && '
                              f'! frnn_cluster_failed "{log}" && FRNN_CUDA_HUNG=0 && '
                              f'frnn_apply_test_results "{log}" && '
                              'echo "hung=$FRNN_CUDA_HUNG no_tagged=$FRNN_NO_TAGGED" '
                              '"copy=$FUSED_RNN_CUDA_STAGE_COPY"')
        assert r.returncode == 0, (log.name, r)
        assert r.stdout.splitlines()[-1] == "hung=0 no_tagged=1 copy=pipelined", (
            log.name, r.stdout)
    r = _common(tmp_path, "frnn_without_tagged cuda,triton,cuda-tagged,cuda-mma")
    assert r.stdout.strip() == "cuda,triton,cuda-mma", r
    ok = tmp_path / "ok.log"
    ok.write_text(f"{ID}test_matches_reference[dense-fwd-LSTM-bf16-T5-B3-I7-H37-tagged] "
                  "PASSED  [100%]\n")
    assert _common(tmp_path, f'frnn_tagged_failed "{ok}"').returncode == 1


@pytest.mark.parametrize("test_id,flag,pinned", [
    ("test_matches_reference[dense-fwd-LSTM-tf32-T7-B70-I9-H24-mma]", "FRNN_NO_MMA",
     "FUSED_RNN_CUDA_FRAG_LOADS=shared"),
    ("test_matches_reference[lengths-rev-GRU-bf16-T5-B3-I7-H37-step]", "FRNN_NO_STEP",
     "FUSED_RNN_CUDA_PATH=persistent"),
    ("test_bitwise_reproducible[LSTM-bf16-step]", "FRNN_NO_STEP",
     "FUSED_RNN_CUDA_PATH=persistent"),
])
def test_a_failed_or_hung_mma_or_step_test_drops_only_its_variant(tmp_path, test_id, flag, pinned):
    """A hung test of the mma.sync tiles or of the per-step path, which only cuda-mma and
    cuda-step run, counted as a hang of the default path: every cuda row left the bench, and
    with the NOTES command's backends (all cuda) the bench itself (a helper found it). Now,
    failed or hung, such a test drops its variant and pins the default."""
    name = pinned.split("=")[0]
    for verdict in ("FAILED  [ 20%]", ""):
        log = tmp_path / "gpu.log"
        log.write_text(f"{ID}test_a PASSED  [ 10%]\n{ID}{test_id} {verdict}\n")
        r = _common(tmp_path, f'FRNN_CUDA_HUNG=0 && frnn_apply_test_results "{log}" && '
                              f'echo "hung=$FRNN_CUDA_HUNG {flag}=${{{flag}:-}} '
                              f'{name}=${{{name}:-}}"')
        assert r.returncode == 0, r
        assert r.stdout.splitlines()[-1] == f"hung=0 {flag}=1 {pinned}", (verdict, r.stdout)
    r = _common(tmp_path, "frnn_without cuda,cuda-step,cuda-mma,triton cuda-mma cuda-step")
    assert r.stdout.strip() == "cuda,triton", r


def test_a_crash_in_the_binding_refusals_is_no_hang_of_the_default_path(tmp_path):
    """That test's calls run in child processes (a crash is the child's), and a crashed child's
    cuda-gdb backtrace keeps the log silent for up to 75 s: cut off there, it counted as a hang
    and took every cuda row out of the bench."""
    log = tmp_path / "gpu.log"
    log.write_text(f"{ID}test_a PASSED  [ 10%]\n"
                   f"{ID}test_binding_refuses_what_its_kernels_cannot_take[LSTM-forward-c0-3] \n")
    r = _common(tmp_path, f'FRNN_CUDA_HUNG=0 && frnn_apply_test_results "{log}" && '
                          'echo "hung=$FRNN_CUDA_HUNG"')
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "hung=0", r


def test_with_every_cuda_backend_out_the_bench_still_times_cudnn_against_triton(tmp_path):
    """The NOTES command names cuda and its variants only: after a hang of the default path it
    left no backend, so no table at all came back, cuDNN's rows included."""
    backends = "cuda,cuda-step,cuda-tagged,cuda-mma"
    rc, log, calls, _out = _gpu_check(tmp_path, "default-hangs", backends=backends)
    assert rc == 1, log[-3000:]
    (bench,) = [c for c in calls if "bench_gpu.py" in c]
    assert "--backends triton " in bench, bench
    assert "cuda is out of the bench: it times cuDNN against triton instead" in log


def test_without_cuda_and_clusters_and_the_build_marker(tmp_path):
    r = _common(tmp_path, "frnn_without_cuda cuda,triton,cuda-p1,torch,cuda-cl8 && "
                          "frnn_without_clusters cuda,triton,cuda-cl16ds,cuda-tc,cuda-g1")
    assert r.stdout.splitlines() == ["triton,torch", "cuda,triton,cuda-g1"], r
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "cuda_build.log").write_text("torch 2.11\nCUDA backend: available on H200\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cuda_build.log").write_text("CUDA backend: the JIT build failed\n")
    r = _common(tmp_path, "frnn_build_ok ok && ! frnn_build_failed ok && ! frnn_build_ok bad && "
                          "frnn_build_failed bad && ! frnn_build_ok none && ! frnn_build_failed none")
    assert r.returncode == 0, r


# ------------------------------------------------------------------ gpu_check.sh end to end
FAKE_PYTHON = r"""#!/bin/bash
# Logs each call ("python ARGS | FRNN_GPU_TESTS=... FRNN_NO_CLUSTERS=... K_PARTS=..."), then
# plays the part the test asks for ($FAKE_MODE: build-fails, cluster-hangs,
# default-hangs, parts-fail, bench-fails).
echo "python $* | FRNN_GPU_TESTS=${FRNN_GPU_TESTS:-} FRNN_NO_CLUSTERS=${FRNN_NO_CLUSTERS:-} K_PARTS=${FUSED_RNN_CUDA_K_PARTS:-} PYTHONPATH=${PYTHONPATH:-}" >> "$FAKE_CALLS"
case "$*" in
  *"import pytest_timeout"*) exit 0 ;;
  *"_ext.build_dir()"*"unavailable_reason"*)
    echo "build dir: $FAKE_BUILD_DIR"
    if [[ $FAKE_MODE == build-fails ]]; then echo "CUDA backend: the JIT build failed"; exit 1; fi
    echo "CUDA backend: available on NVIDIA H200"; exit 0 ;;
  *"unavailable_reason as why"*) echo "${@: -1}"; exit 0 ;;
  *"-m pytest tests/cuda/test_cuda_gpu.py"*"-k not ("*)
    echo "tests/cuda/test_cuda_gpu.py::test_matches_reference[LSTM-fp32-T5] PASSED [ 1%]"
    if [[ $FAKE_MODE == cluster-hangs ]]; then
      echo "tests/cuda/test_cuda_gpu.py::test_cluster_mode_launches_clusters[groups8] +++++ Timeout +++++"
      exit 1
    fi
    if [[ $FAKE_MODE == default-hangs ]]; then
      echo "tests/cuda/test_cuda_gpu.py::test_matches_reference[GRU-bf16-T5] +++++ Timeout +++++"
      exit 1
    fi
    if [[ $FAKE_MODE == parts-fail ]]; then
      echo "tests/cuda/test_cuda_gpu.py::test_matches_reference[LSTM-bf16-T16-parts4] FAILED [ 2%]"
      echo "FAILED tests/cuda/test_cuda_gpu.py::test_matches_reference[LSTM-bf16-T16-parts4] - x"
      echo "===== 1 failed, 1 passed, 8 deselected in 1.00s ====="; exit 1
    fi
    echo "===== 1 passed, 8 deselected in 1.00s ====="; exit 0 ;;
  *benchmarks/bench_gpu.py*) echo "cell  shape  fake row"; [[ $FAKE_MODE != bench-fails ]]; exit ;;
esac
exit 0
"""


def _gpu_check(tmp_path, mode: str, backends: str = "cuda,triton,cuda-p1,cuda-cl8,cuda-tc,cuda-g1",
               extra: tuple[str, ...] = (), cuda_alone: tuple[str, ...] | None = None,
               tools: tuple[tuple[str, str], ...] = (),
               ) -> tuple[int, str, list[str], Path]:
    """gpu_check.sh with stand-ins for python, nvidia-smi, compute-sanitizer and nvcc that log
    each call; with ``cuda_alone``, gpu_check_cuda.sh run by itself with those arguments;
    ``tools``: more stand-ins, or others for these, (name, script)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("python", FAKE_PYTHON),
                       ("nvidia-smi", "#!/bin/bash\necho 'NVIDIA H200, 580, 143771 MiB'\n"),
                       ("compute-sanitizer", ("#!/bin/bash\n[[ $1 == --help ]] && exit 0\n"
                                              "echo \"compute-sanitizer $* | FRNN_NO_CLUSTERS="
                                              "${FRNN_NO_CLUSTERS:-}\" >> \"$FAKE_CALLS\"\n")),
                       ("nvcc", "#!/bin/bash\nexit 1\n"), *tools):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    (build_dir / "lock").write_text("")  # left by a killed build
    out = tmp_path / "out"
    out.mkdir()
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": str(bin_ / "python"),
           "FAKE_CALLS": str(calls), "FAKE_MODE": mode, "FAKE_BUILD_DIR": str(build_dir),
           "OUT": str(out), "CUDA_HOME": str(tmp_path / "no-cuda"), "FRNN_COMMIT": "abc123",
           "TMPDIR": str(tmp_path)}  # the script keeps its logs' directory (mktemp -d)
    for k in ("FRNN_NO_CLUSTERS", "FUSED_RNN_CUDA_K_PARTS", "FRNN_GPU_CHECK_LOGS",
              "FRNN_GPU_TESTS", "FRNN_DEADLINE", "FRNN_NO_TAGGED", "FRNN_NO_MMA", "FRNN_NO_STEP",
              "FUSED_RNN_CUDA_STAGE_COPY", "FUSED_RNN_CUDA_FRAG_LOADS", "FUSED_RNN_CUDA_PATH"):
        env.pop(k, None)
    argv = ([str(ROOT / "benchmarks" / "gpu_check.sh"), "--backends", backends, *extra]
            if cuda_alone is None else [str(ROOT / "benchmarks" / "gpu_check_cuda.sh"),
                                        *cuda_alone])
    r = subprocess.run(["bash", *argv], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    made = calls.read_text().splitlines() if calls.exists() else []
    return r.returncode, r.stdout + r.stderr, made, out


def _tar_names(out: Path) -> set[str]:
    with tarfile.open(out / "cuda_logs.tar.gz") as t:
        return {Path(n).name for n in t.getnames()}


def test_the_sanitizer_filter_survives_a_help_text_still_being_written(tmp_path):
    """compute-sanitizer's --kernel-name filter (only our kernels instrumented) is found in its
    help even where grep -q, exiting at the first match, would kill the tool with SIGPIPE
    while it still writes (pipefail then made the test false and the filter was left off)."""
    sanitizer = ("#!/bin/bash\n"
                 "if [[ $1 == --help ]]; then\n"
                 "  echo '  --kernel-name arg   filter kernels by name'\n"
                 "  sleep 0.5; for i in $(seq 2000); do echo \"  --option-$i\"; done; exit 0\n"
                 "fi\n"
                 "echo \"compute-sanitizer $*\" >> \"$FAKE_CALLS\"\n")
    _, log, calls, _ = _gpu_check(tmp_path, "ok", tools=(("compute-sanitizer", sanitizer),))
    ran = [c for c in calls if c.startswith("compute-sanitizer")]
    assert [c.split()[1] for c in ran] == ["--tool"] * 3, (ran, log[-3000:])
    assert all("--kernel-name kns=rnn_" in c for c in ran), ran


def test_a_failed_build_drops_cuda_and_its_later_steps(tmp_path):
    rc, log, calls, out = _gpu_check(tmp_path, "build-fails")
    assert rc == 1 and log.rstrip().endswith("status 1"), log[-3000:]
    assert not (tmp_path / "build" / "lock").exists(), "the stale build lock stays"
    assert "the build did not succeed" in log and "gpu_tests SKIPPED (the CUDA build failed" in log
    (bench,) = [c for c in calls if "bench_gpu.py" in c]
    assert "--backends triton " in bench, bench
    assert "FRNN_GPU_TESTS=not run (the CUDA build failed)" in bench
    # no later step loads the extension: no GPU tests, sanitizer, phases or slow tests
    for c in calls:
        assert "test_cuda_gpu.py" not in c and "sanitize_cuda" not in c, c
        assert "profile_cuda" not in c and "compute-sanitizer" not in c, c
        assert "time_split" not in c, c
    (charlm,) = [c for c in calls if "fused_rnn.cli bench" in c]
    assert "--backends triton " in charlm, charlm
    assert {"gpu_check.log", "bench.log", "cuda_build.log"} <= _tar_names(out)


def test_a_hung_cluster_test_keeps_every_later_step_off_clusters(tmp_path):
    rc, log, calls, out = _gpu_check(tmp_path, "cluster-hangs")
    assert rc == 1, log[-3000:]
    order = [i for i, c in enumerate(calls) if "-m pytest tests/cuda/test_cuda_gpu.py" in c
             or "bench_gpu.py" in c or "profile_cuda.py" in c or "fused_rnn.cli bench" in c]
    first, bench, phases, charlm, slow = (calls[i] for i in order)
    # 1. the GPU tests: -v, 60 s a test (pytest-timeout "is installed"), the slow ones deselected
    assert "-v" in first.split() and "--timeout=60 --timeout-method=thread" in first, first
    assert "-k not (compile or ddp or amp or training)" in first, first
    # 2. the bench: no cluster variants, told how the GPU tests went
    assert "--backends cuda,triton,cuda-p1,cuda-g1 " in bench, bench
    hung = "tests/cuda/test_cuda_gpu.py::test_cluster_mode_launches_clusters[groups8]"
    assert f"FRNN_GPU_TESTS=timed out: {hung} (after 1 passed, 0 failed)" in bench, bench
    # 3. later steps: FRNN_NO_CLUSTERS=1, no cluster variants in the phase timings
    assert "FRNN_NO_CLUSTERS=1" in phases and "--variants cuda-tagged,cuda-mma,cuda-tb1,cuda-pb1 " in phases, phases
    assert "cuda-cl" not in phases and "cuda-tc" not in phases, phases
    (split,) = [c for c in calls if "benchmarks/time_split.py" in c]  # right after the phases
    assert calls.index(split) == calls.index(phases) + 1, calls
    assert "--backends cuda,cuda-step,cudnn --dtypes fp32,bf16 --time-budget " in split, split
    assert "FRNN_NO_CLUSTERS=1" in charlm and "--backends cuda,triton " in charlm, charlm
    sanitizer = [c for c in calls if c.startswith("compute-sanitizer")]
    assert [c.split()[2] for c in sanitizer] == ["memcheck", "racecheck", "synccheck"], sanitizer
    assert "--cases" not in sanitizer[0] and "--cases 10" in sanitizer[1], sanitizer
    assert all(c.endswith("FRNN_NO_CLUSTERS=1") for c in sanitizer), sanitizer
    # 4. the slow tests after the bench, with a longer per-test timeout
    assert "-k compile or ddp or amp or training" in slow and "--timeout=120" in slow, slow
    assert "cluster mode FAILED GPU tests" in log
    assert {"gpu_check.log", "bench.log", "cuda_gpu_tests.log",
            "cuda_gpu_tests_slow.log"} <= _tar_names(out)
    # the bench's rows are in the log that comes back, not only in the output's tail
    assert "cell  shape  fake row" in (log.split("fwd+bwd summary")[1])


def test_a_hang_outside_parts_and_clusters_leaves_cuda_out_of_the_bench(tmp_path):
    """A GPU test of the default path that hangs would hang the bench's cuda rows, and with them
    every row after (Triton's): cuda and its variants leave the bench, and the later CUDA steps
    (which would hang the same way) are skipped."""
    rc, log, calls, _out = _gpu_check(tmp_path, "default-hangs")
    assert rc == 1, log[-3000:]
    (bench,) = [c for c in calls if "bench_gpu.py" in c]
    assert "--backends triton " in bench, bench
    assert "FRNN_GPU_TESTS=timed out: tests/cuda/test_cuda_gpu.py::test_matches_reference" in bench
    for c in calls:
        assert "sanitize_cuda" not in c and "profile_cuda" not in c, c
        assert "time_split" not in c and not c.startswith("compute-sanitizer"), c
    assert "hung or crashed; the bench leaves out cuda" in log


def test_run_alone_the_cuda_script_runs_this_checkout(tmp_path, monkeypatch):
    """gpu_check_cuda.sh by itself (NOTES' follow-up calls) set no PYTHONPATH, so its Python
    steps imported fused_rnn from wherever it was installed, or failed on the device, which
    has no install; run from gpu_check.sh the checkout is not named twice."""
    monkeypatch.delenv("PYTHONPATH", raising=False)

    def paths(calls):  # the PYTHONPATH each stand-in call saw
        return {line.rsplit("PYTHONPATH=", 1)[1] for line in calls if " K_PARTS=" in line}

    alone, whole = tmp_path / "alone", tmp_path / "whole"
    alone.mkdir()
    whole.mkdir()
    _, _, calls, _ = _gpu_check(alone, "ok", cuda_alone=("--part", "tests", str(alone / "logs")))
    assert paths(calls) == {str(ROOT)}, calls
    _, _, calls, _ = _gpu_check(whole, "ok")
    assert paths(calls) == {str(ROOT)}, calls


def test_run_alone_the_cuda_script_skips_what_would_load_kernels_that_hung(tmp_path):
    """gpu_check_cuda.sh --part all, by itself: after a GPU test of the default path hangs,
    the sanitizer, the phase timings and the slow tests (which load the same kernels) are
    skipped and said so; the microbench (its own program) still runs."""
    rc, log, calls, _ = _gpu_check(tmp_path, "default-hangs",
                                   cuda_alone=("--part", "all", str(tmp_path / "logs")))
    assert rc == 1, log[-3000:]
    assert "hung or crashed; the bench leaves out cuda" in log, log[-3000:]
    for c in calls:
        assert "sanitize_cuda" not in c and "profile_cuda" not in c, c
        assert "time_split" not in c and not c.startswith("compute-sanitizer"), c
        assert "-k compile or ddp or amp or training" not in c, c
    for name in ("compute-sanitizer", "phases", "slow_tests"):
        assert f"cuda: {name} SKIPPED (a GPU test hung or crashed" in log, (name, log[-3000:])
    assert "cuda: microbench FAILED" in log, log[-3000:]  # it ran (the stand-in nvcc fails)


@pytest.mark.parametrize("failed,parts,cluster", [
    ("test_matches_reference[LSTM-bf16-T16-parts4]", 0, 1),
    ("test_cluster_mode_launches_clusters[8]", 1, 0),
    ("test_opcheck[GRU]", 1, 1),
])
def test_failed_parts_or_cluster_tests_are_seen_under_pipefail(tmp_path, failed, parts, cluster):
    """gpu_check.sh runs with pipefail: a finished, failed test must still count (before, the
    'no test hung' status of the last helper in frnn_bad_tests made both checks false)."""
    log = tmp_path / "log"
    log.write_text(f"FAILED tests/cuda/test_cuda_gpu.py::{failed} - x\n1 failed, 1 passed in 1.00s\n")
    script = (f"set -uo pipefail; source {ROOT / 'benchmarks' / 'gpu_common.sh'}; "
              f"frnn_parts_failed {log}; echo $?; frnn_cluster_failed {log}; echo $?")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert r.stdout.split() == [str(parts), str(cluster)], r.stdout + r.stderr


def test_a_failed_k_parts_test_times_everything_after_without_k_parts(tmp_path):
    """A failed K-parts GPU test: cuda stays in the bench, but it and every later step run with
    FUSED_RNN_CUDA_K_PARTS=1, and the bench records the failure in its gpu_tests."""
    rc, log, calls, _ = _gpu_check(tmp_path, "parts-fail")
    assert rc == 1, log[-3000:]
    (bench,) = [c for c in calls if "bench_gpu.py" in c]
    assert "--backends cuda,triton,cuda-p1,cuda-cl8,cuda-tc,cuda-g1 " in bench, bench
    assert " K_PARTS=1 " in bench, bench
    assert ("FRNN_GPU_TESTS=1 failed, 1 passed, 8 deselected in 1.00s; failed: "
            "test_matches_reference[LSTM-bf16-T16-parts4] ") in bench, bench
    later = [c for c in calls if "profile_cuda" in c or "fused_rnn.cli bench" in c]
    assert len(later) == 2 and all(" K_PARTS=1 " in c for c in later), later
    assert "K parts FAILED GPU tests" in log


def test_a_failing_bench_fails_the_run(tmp_path):
    """Without cuda every step passes here and the run exits 0; a bench that exits non-zero (a
    row failed its check against cuDNN), or a step skipped for time, makes the status 1."""
    rc, log, calls, _ = _gpu_check(tmp_path, "ok", backends="triton")
    assert rc == 0 and log.rstrip().endswith("status 0"), log[-3000:]
    # the bench stops starting rows in time to write its table (its step's timeout less 70 s)
    assert any("bench_gpu.py --backends triton --time-budget " in c for c in calls), calls
    (tmp_path / "again").mkdir()
    rc, log, _, _ = _gpu_check(tmp_path / "again", "bench-fails", backends="triton")
    assert rc == 1 and log.rstrip().endswith("status 1"), log[-3000:]
    # a step skipped for time fails the run too (30 s: the bench runs, the main job's does not)
    (tmp_path / "late").mkdir()
    rc, log, calls, _ = _gpu_check(tmp_path / "late", "ok", backends="triton",
                                   extra=("--budget", "30"))
    assert rc == 1 and "main-job bench SKIPPED (the time budget is spent)" in log, log[-3000:]
    assert any("bench_gpu.py" in c for c in calls) and "benchmarks SKIPPED" not in log


def test_collect_copies_only_this_runs_finished_results(tmp_path):
    """frnn_collect: the result files written since the run started (not older ones, not a
    half-written *.tmp) and a tarball of the logs go to $OUT; every such file goes into the
    tarball too, where the plot and the split table go alone ($OUT takes 8 files, and a full
    run writes 7 results files beside the tarball)."""
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    old = results / "2026-01-01-NVIDIA-H200.md"
    old.write_text("an earlier run\n")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    stamp = tmp_path / "stamp"
    stamp.write_text("")
    os.utime(stamp, (time.time() - 60, time.time() - 60))
    for name in ("2026-12-03-NVIDIA-H200.md", "2026-12-03-NVIDIA-H200.csv.tmp",
                 "2026-12-03-NVIDIA-H200-split.md", "2026-12-03-nvidia-h200-charlm-bench.png"):
        (results / name).write_text("this run\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "bench.log").write_text("rows\n")
    out = tmp_path / "out"
    out.mkdir()
    r = _common(tmp_path, f'OUT="{out}" FRNN_STAMP="{stamp}" frnn_collect "{logs}"')
    assert r.returncode == 0, r
    assert sorted(p.name for p in out.iterdir()) == ["2026-12-03-NVIDIA-H200.md",
                                                     "cuda_logs.tar.gz"]
    assert _tar_names(out) - {""} == {"bench.log", "results", "2026-12-03-NVIDIA-H200.md",
                                      "2026-12-03-NVIDIA-H200-split.md",
                                      "2026-12-03-nvidia-h200-charlm-bench.png"}
    assert oct((out / "cuda_logs.tar.gz").stat().st_mode)[-3:] == "644"


# ------------------------------------------------------------------------ sanitize_cuda.py
def _sanitize_module(monkeypatch):
    path = ROOT / "benchmarks" / "sanitize_cuda.py"
    spec = importlib.util.spec_from_file_location("sanitize_cuda_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod.cuda_backend, "unavailable_reason", lambda device: None)
    seen = []

    def case(mode, T, B, I, H, *rest):  # records the partition each case runs under
        seen.append({k: os.environ.get(k) for k in ("FUSED_RNN_CUDA_CLUSTER",
                                                    "FUSED_RNN_CUDA_K_PARTS",
                                                    "FUSED_RNN_CUDA_FRAG_LOADS",
                                                    "FUSED_RNN_CUDA_STAGE_COPY")})

    monkeypatch.setattr(mod, "case", case)
    return mod, seen


def test_sanitizer_leaves_clusters_and_forced_k_parts_out_when_told(monkeypatch, capsys):
    monkeypatch.delenv("FRNN_NO_CLUSTERS", raising=False)
    monkeypatch.delenv("FUSED_RNN_CUDA_K_PARTS", raising=False)
    monkeypatch.delenv("FUSED_RNN_CUDA_CLUSTER", raising=False)
    monkeypatch.delenv("FRNN_NO_TAGGED", raising=False)
    mod, seen = _sanitize_module(monkeypatch)
    monkeypatch.setattr("sys.argv", ["sanitize_cuda.py"])
    assert mod.main() == 0 and len(seen) == 47
    assert sum(s["FUSED_RNN_CUDA_CLUSTER"] == "8" for s in seen) == 8
    # the mma partition in the 3 TF32 cells only (RNN_RELU's quick case is strict fp32), the
    # tagged one in the 4 bf16 cells only
    assert sum(s["FUSED_RNN_CUDA_FRAG_LOADS"] == "mma" for s in seen) == 3
    assert sum(s["FUSED_RNN_CUDA_STAGE_COPY"] == "tagged" for s in seen) == 4
    seen.clear()
    monkeypatch.setenv("FRNN_NO_CLUSTERS", "1")
    assert mod.main() == 0 and len(seen) == 39
    assert not any(s["FUSED_RNN_CUDA_CLUSTER"] for s in seen)
    out = capsys.readouterr().out
    assert "left out: the case" in out
    assert "39/39 cases match the reference; 1 partition(s) left out" in out
    seen.clear()
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", "1")  # gpu_check.sh: K parts failed their tests
    assert mod.main() == 0 and len(seen) == 31
    assert all(s["FUSED_RNN_CUDA_K_PARTS"] == "1" for s in seen)
    seen.clear()
    monkeypatch.setenv("FRNN_NO_TAGGED", "1")  # and the tagged exchange failed its tests
    assert mod.main() == 0 and len(seen) == 27
    assert not any(s["FUSED_RNN_CUDA_STAGE_COPY"] for s in seen)
    monkeypatch.delenv("FRNN_NO_TAGGED")
    # a small case set for the slow tools: the first N, one cell across the partitions
    seen.clear()
    monkeypatch.delenv("FRNN_NO_CLUSTERS")
    monkeypatch.delenv("FUSED_RNN_CUDA_K_PARTS")
    monkeypatch.setattr("sys.argv", ["sanitize_cuda.py", "--cases", "5"])
    assert mod.main() == 0 and len(seen) == 5
    assert [s["FUSED_RNN_CUDA_CLUSTER"] for s in seen] == [None] * 4 + ["8"]
    # the time budget counts from the given start (the script's: before importing torch)
    seen.clear()
    monkeypatch.setattr("sys.argv", ["sanitize_cuda.py", "--time-budget", "30"])
    assert mod.main(start=time.monotonic() - 60) == 1 and seen == []
    assert "0/0 cases match the reference; 47 not checked" in capsys.readouterr().out


def test_sanitizer_small_sets_reach_every_partition_and_honour_no_mma(monkeypatch, capsys):
    """racecheck and synccheck run --cases 10: the cases went cell by cell, so the tagged
    exchange (bf16 only, 7th in the bf16 list) was never reached. Every partition's first case
    comes first now. FRNN_NO_MMA=1 (an mma.sync test failed or hung) leaves the mma case out,
    as the other FRNN_NO_* do."""
    for k in ("FRNN_NO_CLUSTERS", "FUSED_RNN_CUDA_K_PARTS", "FRNN_NO_TAGGED", "FRNN_NO_MMA"):
        monkeypatch.delenv(k, raising=False)
    mod, seen = _sanitize_module(monkeypatch)
    monkeypatch.setattr("sys.argv", ["sanitize_cuda.py", "--cases", "10"])
    assert mod.main() == 0 and len(seen) == 10
    assert sum(s["FUSED_RNN_CUDA_STAGE_COPY"] == "tagged" for s in seen) == 1
    assert sum(s["FUSED_RNN_CUDA_FRAG_LOADS"] == "mma" for s in seen) == 1
    assert sum(s["FUSED_RNN_CUDA_CLUSTER"] == "8" for s in seen) == 1
    for cases, want in (("10", 10), (None, 44)):
        seen.clear()
        monkeypatch.setenv("FRNN_NO_MMA", "1")
        monkeypatch.setattr("sys.argv", ["sanitize_cuda.py", *(["--cases", cases] if cases else [])])
        assert mod.main() == 0 and len(seen) == want, cases
        assert not any(s["FUSED_RNN_CUDA_FRAG_LOADS"] for s in seen)
    assert "(FRNN_NO_MMA=1)" in capsys.readouterr().out


def test_sanitizer_names_a_case_that_raises_and_stops(monkeypatch, capsys):
    """A kernel fault under memcheck surfaces as the next CUDA call's RuntimeError: the script
    died with a traceback, no summary and the case unnamed. The case is named as failed, the
    rest are counted as not run (the context may be gone), and the summary still prints."""
    monkeypatch.delenv("FRNN_NO_MMA", raising=False)
    mod, seen = _sanitize_module(monkeypatch)
    recording = mod.case

    def case(*a):
        recording(*a)
        if len(seen) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(mod, "case", case)
    monkeypatch.setattr("sys.argv", ["sanitize_cuda.py"])
    assert mod.main() == 1 and len(seen) == 3
    out, err = capsys.readouterr()
    assert "case 3: LSTM H=37 float32 tf32=True rev=False" in out and "RAISED" in out, out
    assert "FAIL case 3 (LSTM H=37 float32 tf32=True rev=False" in err, err
    assert "raised RuntimeError: CUDA error: an illegal memory access was encountered" in err
    assert "sanitize_cuda: 2/3 cases match the reference; 44 not checked (a case raised)" in out


def test_sanitizer_quick_subset_and_a_failing_case(monkeypatch, capsys):
    """The quick subset: the first shape, TF32 and bf16 (RNN_RELU: strict fp32 and bf16), one
    direction per cell (reversed for GRU and RNN_RELU); a case that does not match the
    reference makes the exit status 1 and is named."""
    import torch

    monkeypatch.delenv("FRNN_NO_CLUSTERS", raising=False)
    monkeypatch.delenv("FUSED_RNN_CUDA_K_PARTS", raising=False)
    mod, _ = _sanitize_module(monkeypatch)
    runs = set()

    def case(mode, T, B, I, H, dtype, tf32, tol, reverse, gen):
        runs.add((mode, (T, B, I), dtype, tf32, reverse))
        return "wrong" if (mode, dtype, H) == ("GRU", torch.bfloat16, 64) else None

    monkeypatch.setattr(mod, "case", case)
    monkeypatch.setattr("sys.argv", ["sanitize_cuda.py"])
    assert mod.main() == 1
    captured = capsys.readouterr()
    assert "FAIL wrong ({'FUSED_RNN_CUDA_MAX_GROUPS': '1'" in captured.err
    assert "sanitize_cuda: 46/47 cases match the reference" in captured.out
    dtypes = {m: {(d, t) for mm, _, d, t, _ in runs if mm == m} for m in mod.MODES}
    assert dtypes == {m: ({(torch.float32, False), (torch.bfloat16, False)} if m == "RNN_RELU"
                          else {(torch.float32, True), (torch.bfloat16, False)})
                      for m in mod.MODES}
    assert {(m, r) for m, _, _, _, r in runs} == {(m, m in ("GRU", "RNN_RELU"))
                                                  for m in mod.MODES}
    assert {s for _, s, _, _, _ in runs} == {mod.SHAPES[0][:3]}


# ------------------------------------------------------------------------- profile_cuda.py
@pytest.fixture
def profile_cuda(monkeypatch):
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profile_cuda as mod
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mod, "environment", lambda device, args: {"gpu": "Fake GPU 1"})
    monkeypatch.setattr(mod, "_cuda_plans", lambda *a: None)
    monkeypatch.setattr(mod, "_moot", lambda *a: False)  # the plans are the fake GPU's
    return mod


def test_phase_table_is_on_disk_after_each_configuration(profile_cuda, monkeypatch, tmp_path):
    """A run killed (or stuck) in its third configuration leaves the first two's rows and names
    the one it was on."""
    calls = []

    def profile_one(mode, B, T, H, dtype_name, device):
        calls.append(os.environ.get("FUSED_RNN_CUDA_MAX_GROUPS"))
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a kill looks like from here: nothing after it runs
        return [{"direction": "forward", "blocks": 4, "mma_us": 1.0}]

    monkeypatch.setattr(profile_cuda, "profile_one", profile_one)
    monkeypatch.delenv("FUSED_RNN_CUDA_MAX_GROUPS", raising=False)
    with pytest.raises(KeyboardInterrupt):
        profile_cuda.main(["--modes", "GRU", "--shapes", "S5,S6", "--dtypes", "fp32",
                           "--variants", "cuda-g1", "--variant-shapes", "S5",
                           "--out-dir", str(tmp_path)])
    (md,) = tmp_path.glob("*-Fake-GPU-1-phases.md")
    text = md.read_text()
    assert text.count("| GRU | S") == 2, text
    assert "**Incomplete**: 2 of 3 configurations done" in text and "cuda-g1-GRU-S5-fp32" in text
    assert calls == [None, None, "1"] and not list(tmp_path.glob("*.tmp"))


def test_phase_timings_leave_cluster_variants_out_when_told(profile_cuda, monkeypatch, tmp_path):
    runs = []
    monkeypatch.setattr(profile_cuda, "profile_one", lambda *a: runs.append(
        (os.environ.get("FUSED_RNN_CUDA_CLUSTER"), os.environ.get("FUSED_RNN_CUDA_MAX_GROUPS")))
        or [{"direction": "backward", "blocks": 2}])
    monkeypatch.setenv("FRNN_NO_CLUSTERS", "1")
    monkeypatch.delenv("FUSED_RNN_CUDA_CLUSTER", raising=False)
    monkeypatch.delenv("FUSED_RNN_CUDA_MAX_GROUPS", raising=False)
    assert profile_cuda.main(["--modes", "LSTM", "--shapes", "S5", "--dtypes", "bf16",
                              "--variants", "cuda-cl8,cuda-tc,cuda-g1",
                              "--out-dir", str(tmp_path)]) == 0
    assert runs == [(None, None), (None, "1")]
    (md,) = tmp_path.glob("*-phases.md")
    text = md.read_text()
    assert "Left out (FRNN_NO_CLUSTERS=1" in text and "cuda-cl8, cuda-tc" in text
    assert "Incomplete" not in text
    # the time budget counts from the given start (the script's: before its imports)
    assert profile_cuda.main(["--modes", "LSTM", "--shapes", "S5", "--dtypes", "bf16",
                              "--time-budget", "30", "--out-dir", str(tmp_path)],
                             start=time.monotonic() - 60) == 1
    assert "Skipped after the time budget (30 s): LSTM-S5-bf16" in md.read_text()



def test_phase_timings_skip_a_variant_where_it_changes_nothing(profile_cuda, monkeypatch,
                                                                tmp_path):
    """A variant that would run cuda's own code (bench_gpu.py _variant_is_moot: cuda-mma in
    16 bits, say) is not timed again, and the table names it."""
    runs, asked = [], []
    monkeypatch.setattr(profile_cuda, "profile_one", lambda mode, B, T, H, dt, device: runs.append(
        (os.environ.get("FUSED_RNN_CUDA_FRAG_LOADS"), dt)) or [{"direction": "forward",
                                                                "blocks": 2}])

    def moot(backend, mode, shape, dtype_name, device):
        asked.append((backend, mode, shape, dtype_name, device))
        return dtype_name == "bf16"

    monkeypatch.setattr(profile_cuda, "_moot", moot)
    monkeypatch.delenv("FUSED_RNN_CUDA_FRAG_LOADS", raising=False)
    assert profile_cuda.main(["--modes", "LSTM", "--shapes", "S3", "--dtypes", "fp32,bf16",
                              "--variants", "cuda-mma", "--out-dir", str(tmp_path)]) == 0
    assert runs == [(None, "fp32"), (None, "bf16"), ("mma", "fp32")]
    assert asked == [("cuda-mma", "LSTM", (64, 128, 1024), dt, "cuda") for dt in ("fp32", "bf16")]
    (md,) = tmp_path.glob("*-phases.md")
    assert "Not timed, as they would run exactly cuda's code" in md.read_text()
    assert "cuda-mma-LSTM-S3-bf16" in md.read_text() and "Incomplete" not in md.read_text()


# ------------------------------------------------------------------------- time_split.py
@pytest.fixture
def time_split():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import time_split as mod
    finally:
        sys.path.pop(0)
    return mod


def test_time_split_sim_with_cudnn_only_is_a_usage_error(time_split, capsys):
    """--sim drops cudnn (it needs a GPU): with nothing else it wrote an empty table and exited
    1 without saying why."""
    with pytest.raises(SystemExit) as e:
        time_split.parse_args(["--sim", "--backends", "cudnn"])
    assert e.value.code == 2 and "--sim runs ours only" in capsys.readouterr().err
    assert time_split.parse_args(["--sim", "--backends", "cuda,cudnn"]).backends == ["cuda"]


def test_time_split_names_each_kernel_kind(time_split):
    """Kernel names as the profiler gives them (ours are templates; cuBLAS's differ by
    library version; cuDNN's hold RNN/LSTM/elemWise): ours first, GEMMs before cuDNN's RNN
    kernels (a cuDNN GEMM is a GEMM), torch's pointwise and copy kernels together."""
    names = {
        "void fused_rnn::rnn_forward_kernel<(fused_rnn::Cell)0, __nv_bfloat16, "
        "(fused_rnn::Math)0>(fused_rnn::FwdParams)": "recurrent",
        "void fused_rnn::rnn_backward_kernel<(fused_rnn::Cell)1, float, (fused_rnn::Math)1>"
        "(fused_rnn::BwdParams)": "recurrent",
        "void fused_rnn::detail::rnn_forward_step_kernel<(fused_rnn::Cell)0, __half>"
        "(fused_rnn::StepArgs<fused_rnn::FwdParams>)": "recurrent",
        "sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32_warpgroupsize1x1x1":
            "gemm",
        "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT": "gemm",
        "cutlass_80_tensorop_s1688gemm_128x128_32x3_nn_align4": "gemm",
        "void RNN_blockPersist_fp_LSTM<__half, __half, float, 128, true>(...)": "cudnn rnn",
        "void elemWiseRNNcell<float, float, float, (cudnnRNNMode_t)2>(...)": "cudnn rnn",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, "
        "at::native::func_wrapper_t<float, at::native::sum_functor>>>": "reduce",
        "void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda"
        "(at::TensorIteratorBase&)::{lambda()#3}>": "elementwise",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 3, "
        "128, 1>": "elementwise",
        "Memset (Device)": "elementwise",
        "Memcpy DtoD (Device -> Device)": "elementwise",
        "void some_other_kernel<int>()": "other",
    }
    assert {n: time_split.classify(n) for n in names} == names
    by_cat, top = time_split.split([("nvjet_a", 300.0), ("Memset (Device)", 5.0),
                                    ("nvjet_a", 100.0), ("void x()", 1.0),
                                    ("void fused_rnn::rnn_forward_kernel<>()", 900.0)])
    assert by_cat == {"recurrent": 0.9, "gemm": 0.4, "cudnn rnn": 0.0, "reduce": 0.0,
                      "elementwise": 0.005, "other": 0.001}
    assert [(n, k) for n, _, k in top] == [("void fused_rnn::rnn_forward_kernel<>()", 1),
                                           ("nvjet_a", 2), ("Memset (Device)", 1),
                                           ("void x()", 1)]


def test_time_split_rows_and_a_kill(time_split, monkeypatch, tmp_path):
    """One row per (cell, shape, dtype, backend), the categories and the time no kernel ran
    (wall less the kernels); the table is on disk after each configuration, naming the one a
    killed run was on."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(time_split, "environment", lambda device, args: {"gpu": "Fake GPU 1"})
    calls = []

    def measure(mode, B, T, H, dtype_name, backend, device):
        calls.append((mode, B, dtype_name, backend))
        if len(calls) == 3:
            raise KeyboardInterrupt
        by_cat, top = time_split.split([("void fused_rnn::rnn_backward_kernel<>()", 2000.0),
                                        ("nvjet_b", 500.0)])
        return {"wall": 3.0, "split": by_cat, "top": top}

    monkeypatch.setattr(time_split, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        time_split.main(["--modes", "GRU", "--shapes", "S4", "--dtypes", "bf16,fp32",
                         "--out-dir", str(tmp_path)])
    assert calls == [("GRU", 256, "bf16", "cuda"), ("GRU", 256, "bf16", "cudnn"),
                     ("GRU", 256, "fp32", "cuda")]
    (md,) = tmp_path.glob("*-Fake-GPU-1-split.md")
    text = md.read_text()
    assert "| GRU | S4 256x128x1024 | bf16 | cuda | 3.000 | 2.000 | 0.500 | 0.000 | 0.000 | " \
           "0.000 | 0.000 | 0.500 | void fused_rnn::rnn_backward_kernel<>() 2.000 (1); " \
           "nvjet_b 0.500 (1) |" in text, text
    assert text.count("| GRU | S4") == 2
    assert "**Incomplete**: 2 of 4 configurations done" in text and "GRU-S4-fp32-cuda" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_time_split_runs_on_cudasim(tmp_path):
    """The script end to end on the CPU stand-in (what a GPU run does, but the profiler sees
    CPU ops): every configuration gets a row, none fails, on both of our paths."""
    sys.path.insert(0, str(ROOT / "tests" / "cuda"))
    try:
        from simulate import unavailable_reason
    finally:
        sys.path.pop(0)
    if unavailable_reason():
        pytest.skip(f"cudasim unavailable: {unavailable_reason()}")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_split.py"), "--sim",
                        "--backends", "cuda,cuda-step,cudnn", "--shapes", "D1,D3",
                        "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (md,) = tmp_path.glob("*-cpu-sim-split.md")
    text = md.read_text()
    assert text.count(" | cuda | ") == 8 and text.count(" | cuda-step | ") == 8, text
    assert "Failed" not in text and "cudnn |" not in text, text


FAKE_NCU = "#!/bin/bash\necho \"ncu $*\" >> \"$FAKE_CALLS\"\n"


def test_the_ncu_part_profiles_s1_s4_and_s3_with_the_clocks_left_alone(tmp_path):
    """gpu_check_cuda.sh --part ncu (a short second call on a lent GPU): Nsight Compute on the
    persistent kernels' first two launches of LSTM fp32 at S1, then S4, then S3, through
    profile_cuda.py, never touching the clocks; without ncu it says so and fails."""
    rc, log, calls, out = _gpu_check(tmp_path, "ok", tools=(("ncu", FAKE_NCU),),
                                     cuda_alone=("--part", "ncu", str(tmp_path / "logs")))
    assert rc == 0, log[-3000:]
    assert "cuda_ncu.log" in _tar_names(out)  # run alone, it still returns its logs in $OUT
    ncu = [c for c in calls if c.startswith("ncu ")]
    assert len(ncu) == 3, calls
    for call, shape in zip(ncu, ("S1", "S4", "S3")):
        assert "--clock-control none" in call and "--launch-count 2" in call, call
        assert "regex:rnn_(forward|backward)_kernel" in call, call
        assert call.endswith(f"benchmarks/profile_cuda.py --modes LSTM --dtypes fp32 --shapes "
                             f"{shape} --out-dir {tmp_path / 'logs'}"), call
    assert "cuda: ncu ok" in log

    (tmp_path / "again").mkdir()
    rc, log, calls, _ = _gpu_check(tmp_path / "again", "ok",
                                   cuda_alone=("--part", "ncu", str(tmp_path / "logs2")))
    if shutil.which("ncu") is None and not list(Path("/opt/nvidia").glob("nsight-compute/*/ncu")):
        assert rc == 1 and "cuda: ncu SKIPPED (no ncu" in log, log[-3000:]
