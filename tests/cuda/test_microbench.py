"""``benchmarks/microbench.cu`` on the CPU: its kernels and host code built against cudasim
(``sim/``) and run with ``--check-only``, so the program that prices the NOTES leads on the first
GPU call has already run here, in several thread orders, and its word-for-word check is shown to
catch a missing barrier or wait, a single-buffered exchange or a short mbarrier count."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "benchmarks" / "microbench.cu"
SIM = ROOT / "tests" / "cuda" / "sim"
GXX = shutil.which("g++")
FLAGS = ["-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
         f"-I{SIM / 'include'}", f"-I{SIM}"]

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not on PATH (needed for cudasim)")

# 5 sizes through the grid, 5 (global) + 4 (DSMEM) + 4 (DSMEM with mbarriers; two 192 KB buffers
# do not fit) per cluster size 4, 8 and 16 on a 16-SM simulated device.
EXCHANGE_ROWS = 5 + 3 * (5 + 4 + 4)


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
    assert {row[0] for row in rows} >= {"grid.sync", "cluster.sync c=16",
                                        "exchange dsmem c=16", "exchange cluster-global c=4",
                                        "exchange dsmem-mbarrier c=16"}


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
}
# Not mutants here: the global exchanges and the mbarrier exchange with one buffer. Each step
# ends at a block barrier before the next step's writes, and cudasim releases a block barrier
# only when no thread can run, so every block has read before any writes again; those races
# need a GPU to show.


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
