"""``benchmarks/microbench.cu`` on the CPU: its kernels and host code built against cudasim
(``sim/``) and run with ``--check-only``, so the program that prices the NOTES leads on the first
GPU call has already run here, in several thread orders, and its word-for-word check is shown to
catch a missing barrier or wait, a single-buffered exchange, a short mbarrier count, or a tagged
exchange that reads words before their tag says so or rewrites them before they are read. Built with
ThreadSanitizer, its clean passes report no race, and the two single-buffered exchanges no thread
order can show are named as races."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import simulate

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "benchmarks" / "microbench.cu"
SIM = ROOT / "tests" / "cuda" / "sim"
GXX = shutil.which("g++")
FLAGS = ["-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
         f"-I{SIM / 'include'}", f"-I{SIM}"]

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not on PATH (needed for cudasim)")

# 5 sizes through the grid, with the barrier and tagged, 5 (global) + 4 (DSMEM) + 4 (DSMEM with
# mbarriers; two 192 KB buffers do not fit) per cluster size 4, 8 and 16 on a 16-SM simulated
# device.
EXCHANGE_ROWS = 2 * 5 + 3 * (5 + 4 + 4)


@pytest.fixture(scope="module")
def runtime_obj(tmp_path_factory):
    """cudasim's runtime, compiled once for every program of this module."""
    obj = tmp_path_factory.mktemp("cudasim") / "runtime.o"
    subprocess.run([GXX, *FLAGS, "-c", str(SIM / "runtime.cpp"), "-o", str(obj)], check=True,
                   capture_output=True, text=True)
    return obj


def _build(source: Path, runtime: Path, out: Path) -> Path:
    subprocess.run([GXX, *FLAGS, "-x", "c++", str(source), "-x", "none", str(runtime), "-o",
                    str(out), "-lpthread"], check=True, capture_output=True, text=True)
    return out


def _run(exe: Path, tmp: Path, order: str, early: bool = False):
    env = {**os.environ, "CUDASIM_SMS": "16", "CUDASIM_ORDER": order,
           "CUDASIM_CP_ASYNC_EARLY": "1" if early else "0"}
    table = tmp / f"table-{order}-{int(early)}.md"
    r = subprocess.run([str(exe), "--check-only", str(table)], env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    return r, table


@pytest.fixture(scope="module")
def clean_exe(tmp_path_factory, runtime_obj):
    return _build(SOURCE, runtime_obj, tmp_path_factory.mktemp("microbench") / "microbench")


@pytest.mark.parametrize("order,early", [("ascending", False), ("descending", True),
                                         ("shuffle", False)])
def test_checked_passes_on_cudasim(clean_exe, tmp_path, order, early):
    r, table = _run(clean_exe, tmp_path, order, early)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| primitive")]
    rows = [[c.strip() for c in row] for row in rows]
    exchanges = [row for row in rows if row[0].startswith("exchange")]
    assert len(exchanges) == EXCHANGE_ROWS, table.read_text()
    assert all(row[4] == "0" for row in exchanges), table.read_text()
    assert not any("not launchable" in row[5] for row in rows), table.read_text()
    assert {row[0] for row in rows} >= {"grid.sync", "cluster.sync c=16", "exchange grid-tagged",
                                        "exchange dsmem c=16", "exchange cluster-global c=4",
                                        "exchange dsmem-mbarrier c=16"}
    # the instruction-fetch passes ran (one pass each, untimed), 8 to 256 KB of code
    fetches = [(row[0], row[5]) for row in rows if row[0].startswith("fetch ")]
    assert fetches == [(f"fetch {kb} KB", warps) for kb in (8, 16, 32, 64, 128, 256)
                       for warps in ("1 warp/SM", "8 warps/SM")], table.read_text()


def test_clusters_larger_than_the_device_are_not_launchable(clean_exe, tmp_path):
    """On 4 SMs clusters of 8 and 16 do not fit: their rows say so, and the others still run
    (before, the cluster count min(occupancy, sms / c) came to 0, and a launch of 0 blocks
    ended the whole program)."""
    env = {**os.environ, "CUDASIM_SMS": "4", "CUDASIM_ORDER": "ascending"}
    table = tmp_path / "table.md"
    r = subprocess.run([str(clean_exe), "--check-only", str(table)], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| primitive")]
    big = [row for row in rows if row[0].endswith(("c=8", "c=16"))]
    assert big and all(row[1] == "0" and row[5] == "not launchable" for row in big), rows
    exchanges = [r for r in rows if r[0].startswith("exchange") and r[0].endswith("c=4")]
    assert [r[4] for r in exchanges] == ["0"] * 13, rows


MISMATCH = "mismatched words"  # the program's own check
# (site, replacement, what must be reported)
MUTANTS = {
    # The DSMEM step's barrier: a block checks its buffer before its peers have written it, and
    # a block that ran ahead exits while its peers still store into it, which cudasim reports
    # first (at the launch's end, before the host reads the mismatch count).
    "dsmem-no-barrier": ("    cluster.sync();\n    if (salt) check_buffer(local",
                         "    if (salt) check_buffer(local", "after the block exited"),
    # One DSMEM buffer: a fast block writes step s+1 while a peer still checks step s.
    "dsmem-one-buffer": ("uint4* local = bufs + (size_t)(s & 1) * n16;", "uint4* local = bufs;",
                         MISMATCH),
    # The grid exchange without its grid.sync: a block copies shares not yet written.
    "grid-no-sync": ("      cg::this_grid().sync();\n", "", MISMATCH),
    # An mbarrier that expects one 16-byte chunk too few: its phase completes before the step's
    # last chunk lands (or, in another order, a later phase never completes).
    "mbarrier-short-expect": ("mbar_arrive_expect_tx(&bars[b], n16 * 16);",
                              "mbar_arrive_expect_tx(&bars[b], (n16 - 1) * 16);", MISMATCH),
    # No wait for the step to land: besides reading early, thread 0 arrives on a barrier whose
    # phase two steps back has not completed, which cudasim refuses (undefined on a GPU).
    "mbarrier-no-wait": ("    mbar_wait_parity(&bars[b], (s >> 1) & 1);\n", "",
                         "more arrivals than its count in one phase"),
    # The tagged exchange, reading each chunk once whatever its tags say: words not yet written.
    "tagged-no-poll": ("        while (!has_tag(v[k], tag)) {", "        if (false) {", MISMATCH),
    # One tagged buffer: a block that has read step s writes its step s + 1 share over words a
    # slower block has yet to read (cudasim wakes a polling reader as late as it can), which
    # then waits for step s's tag forever.
    "tagged-one-buffer": ("    uint4* buf = exchange + (size_t)(s & 1) * n16;",
                          "    uint4* buf = exchange;", "a deadlock"),
    # Readers that wait for step 0's tag at every step: step 1's words, stored under their own
    # step's tag, never carry it.
    "tagged-fixed-tag": ("    const uint32_t tag = step_tag(s);",
                         "    const uint32_t tag = step_tag(0);", "a deadlock"),
}
# Not mutants here: the global exchanges and the mbarrier exchange with one buffer. Each step
# ends at a block barrier before the next step's writes, and cudasim releases a block barrier
# only when no thread can run, so every block has read before any writes again: no thread order
# shows those races. ThreadSanitizer does (TSAN_MUTANTS below).


@pytest.mark.parametrize("name", list(MUTANTS))
def test_the_check_catches_a_broken_exchange(tmp_path, runtime_obj, name):
    old, new, expect = MUTANTS[name]
    text = SOURCE.read_text()
    assert text.count(old) == 1, f"mutant {name}: its site is gone from microbench.cu"
    mutant = tmp_path / "microbench.cu"
    mutant.write_text(text.replace(old, new))
    exe = _build(mutant, runtime_obj, tmp_path / "microbench")
    results = [_run(exe, tmp_path, order)[0] for order in ("ascending", "descending")]
    assert any(r.returncode == 1 and expect in r.stderr for r in results), (
        f"mutant {name} went unnoticed: " + " / ".join(r.stdout[-300:] for r in results))


# ---------------------------------------------------------------- under ThreadSanitizer
# The program with -fsanitize=thread, cudasim's runtime with CUDASIM_TSAN (every simulated
# thread a TSan fiber ordered only by barriers and mbarrier phases; sim/runtime.cpp). On 4 SMs:
# a launch of 16 blocks of 256 threads would pass TSan's 8128 live threads, and 4 SMs run every
# kind of exchange (clusters of 4) in a fifth of the time 12 take.
needs_tsan = pytest.mark.skipif(simulate.sanitizer_missing("thread") is not None,
                                reason=str(simulate.sanitizer_missing("thread")))
TSAN_FLAGS = [f for f in FLAGS if f != "-O2"] + ["-O1", "-g"]


@pytest.fixture(scope="module")
def tsan_runtime_obj(tmp_path_factory):
    obj = tmp_path_factory.mktemp("cudasim-tsan") / "runtime.o"
    subprocess.run([GXX, *TSAN_FLAGS, "-DCUDASIM_TSAN=1", "-c", str(SIM / "runtime.cpp"), "-o",
                    str(obj)], check=True, capture_output=True, text=True)
    return obj


def _run_tsan(source: Path, runtime: Path, tmp: Path):
    exe = tmp / "microbench-tsan"
    subprocess.run([GXX, *TSAN_FLAGS, "-fsanitize=thread", "-x", "c++", str(source), "-x", "none",
                    str(runtime), "-o", str(exe), "-lpthread"], check=True, capture_output=True,
                   text=True)
    env = {**os.environ, "CUDASIM_SMS": "4", "CUDASIM_ORDER": "ascending",
           "TSAN_OPTIONS": simulate.TSAN_OPTIONS}
    table = tmp / "table-tsan.md"
    r = subprocess.run([str(exe), "--check-only", str(table)], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    return r, table


@pytest.mark.slow
@needs_tsan
def test_checked_passes_under_thread_sanitizer(tmp_path, tsan_runtime_obj):
    r, table = _run_tsan(SOURCE, tsan_runtime_obj, tmp_path)
    assert r.returncode == 0 and "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    text = table.read_text()
    for kind in ("exchange grid", "exchange grid-tagged", "exchange cluster-global c=4",
                 "exchange dsmem c=4", "exchange dsmem-mbarrier c=4"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {kind} |")]
        assert len(rows) >= 4 and all(row.split("|")[5].strip() == "0" for row in rows), text


TSAN_MUTANTS = {
    # The grid exchange with one buffer: a block writes step s + 1's share while a slower block
    # still copies step s's.
    "global-one-buffer": ("    uint4* buf = exchange + ((size_t)group * 2 + (s & 1)) * n16;",
                          "    uint4* buf = exchange + (size_t)group * 2 * n16;"),
    # The mbarrier exchange with one buffer: a peer's st.async of step s + 1 lands while this
    # block still checks step s.
    "mbarrier-one-buffer": ("    uint4* local = bufs + (size_t)b * n16;",
                            "    uint4* local = bufs;"),
}


@needs_tsan
@pytest.mark.parametrize("name", list(TSAN_MUTANTS))
def test_thread_sanitizer_names_races_no_thread_order_shows(tmp_path, runtime_obj,
                                                            tsan_runtime_obj, name):
    old, new = TSAN_MUTANTS[name]
    text = SOURCE.read_text()
    assert text.count(old) == 1, f"mutant {name}: its site is gone from microbench.cu"
    mutant = tmp_path / "microbench.cu"
    mutant.write_text(text.replace(old, new))
    # the program's own check passes it in cudasim's thread orders ...
    exe = _build(mutant, runtime_obj, tmp_path / "plain")
    for order in ("ascending", "descending"):
        r, _ = _run(exe, tmp_path, order)
        assert r.returncode == 0, f"{order} shows it now: make it a MUTANTS entry\n{r.stderr}"
    # ... ThreadSanitizer names it, with the mutant's line
    r, _ = _run_tsan(mutant, tsan_runtime_obj, tmp_path)
    assert r.returncode == simulate.TSAN_EXIT_CODE, r.stderr[-4000:]
    assert "WARNING: ThreadSanitizer: data race" in r.stderr, r.stderr[-4000:]
    assert f"{mutant}:" in r.stderr, r.stderr[-4000:]
