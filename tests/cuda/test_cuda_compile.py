"""CUDA backend checks that need no GPU (they run in CI).

* every ``.cu`` compiles with ``nvcc -c`` for sm_80 and sm_90 (each file once per arch, in
  parallel; nothing cached across runs), with warnings as errors, no register spills, and
  no load through the non-coherent path (ld.global.nc) in the PTX;
* the kernel sources include only CUDA headers (and each other); torch lives in binding.cpp only;
* binding.cpp passes ``g++ -fsyntax-only`` against torch's headers from the CPU wheel;
* ``csrc/plan.h`` compiled by g++ gives the same plans as its Python mirror;
* ``import fused_rnn`` works and ``unavailable_reason`` explains itself without a GPU, and the
  loader's obstacles (no nvcc, CUDA version mismatch, empty TORCH_CUDA_ARCH_LIST) read clearly.

Tests that need a missing tool are skipped with the reason (``pytest -ra`` prints it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fused_rnn.ops.cuda import _ext
from fused_rnn.ops.cuda import plan as P

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
MICROBENCH_FLAGS = ["-O3", "-std=c++17", "-arch=sm_90"]
ARCHS = ("80", "90")
CUDA_HEADERS = {
    "cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h", "mma.h", "cooperative_groups.h",
}
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").is_file()
    else None
)
GXX = shutil.which("g++")


def _cuda_include() -> Path | None:
    """CUDA's include directory (nvcc may be a wrapper script, so try the usual homes too)."""
    if NVCC is None:
        return None
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             Path(NVCC).resolve().parents[1], "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


def test_sources_present():
    assert CU_FILES, "no .cu files in csrc/"
    assert {f.name for f in CSRC.glob("*.cpp")} == {"binding.cpp"}, "one C++ binding file"
    assert {f.name for f in CU_FILES} | {"binding.cpp"} == set(_ext.SOURCES)
    assert {f.name for f in CSRC.glob("*.h")} | {f.name for f in CSRC.glob("*.cuh")} == set(
        _ext.HEADERS
    )


_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)


@pytest.mark.parametrize(
    "path", sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h")),
    ids=lambda p: p.name,
)
def test_kernel_sources_include_only_cuda_headers(path):
    """.cu/.cuh/.h: CUDA headers or other csrc headers (which obey the same rule) only."""
    for kind, name in _INCLUDE.findall(path.read_text()):
        if kind == '"':
            assert (CSRC / name).is_file() and Path(name).suffix in (".h", ".cuh"), name
        else:
            assert name in CUDA_HEADERS, f"{path.name} includes <{name}>, not a CUDA header"


def test_plan_header_is_plain_cpp():
    """plan.h has no includes at all: g++, nvcc and the binding share it."""
    assert not _INCLUDE.findall((CSRC / "plan.h").read_text())


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compile every (file, arch) once, two at a time (CI has 2 cores)."""
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): cannot compile-check the .cu files")
    out = tmp_path_factory.mktemp("nvcc")

    def compile_one(job):
        f, arch = job
        keep = out / f"keep_{f.stem}_sm{arch}"  # nvcc's intermediates, one folder per job
        keep.mkdir()
        cmd = [
            NVCC, "-c", "-std=c++20", "-O3", "--expt-relaxed-constexpr",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Werror", "all-warnings",
            "-Xptxas", "-v",  # per-kernel registers and spills, for test_kernels_do_not_spill
            "-keep", "-keep-dir", str(keep),  # the .ptx, for test_no_noncoherent_loads
            f"-I{CSRC}", str(f), "-o", str(out / f"{f.stem}_sm{arch}.o"),
        ]
        r = subprocess.run(cmd, capture_output=True, check=False, text=True, timeout=600)
        ptx = keep / f"{f.stem}.ptx"
        return job, r.returncode, r.stdout + r.stderr, ptx.read_text() if ptx.is_file() else None

    jobs = [(f, a) for f in CU_FILES for a in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return {(f.name, a): (rc, log, ptx) for (f, a), rc, log, ptx in pool.map(compile_one, jobs)}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("name", [f.name for f in CU_FILES])
def test_nvcc_compiles(nvcc_results, name, arch):
    rc, log, _ = nvcc_results[(name, arch)]
    assert rc == 0, f"nvcc failed for {name} sm_{arch}:\n{log[-4000:]}"


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("name", [f.name for f in CU_FILES])
def test_kernels_do_not_spill(nvcc_results, name, arch):
    """ptxas -v: no kernel spills registers to local memory (a spill in the per-step loop
    would put a memory round trip on the sequential path). Every instantiation is listed."""
    rc, log, _ = nvcc_results[(name, arch)]
    assert rc == 0, f"nvcc failed for {name} sm_{arch}"
    kernels, steps = 0, 0
    current = None
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = m.group(1)
            if "_step_kernel" in current:  # the per-step path's launches (fused_rnn.h StepArgs)
                steps += 1
            else:
                kernels += 1
        elif (m := _PTXAS_SPILL.search(line)) and current is not None:
            assert m.groups() == ("0", "0", "0"), f"{current} sm_{arch}: {line.strip()}"
            current = None
    assert kernels == PERSISTENT, (
        f"expected 4 cells x (4 (type, math) + 2 tagged) kernels, ptxas listed {kernels}")
    assert steps == 12, f"expected 4 cells x 3 types of step kernels, ptxas listed {steps}"


_PTXAS_USED = re.compile(r"Used \d+ registers(.*)$")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("name", [f.name for f in CU_FILES])
def test_kernels_have_no_static_shared_memory(nvcc_results, name, arch):
    """ptxas -v reports "N bytes smem" for static shared memory: there is none, so the launch
    code may give the dynamic array the device's whole opt-in limit (rnn_common.cuh:
    allow_optin_smem), which would be refused if a static array took part of it."""
    rc, log, _ = nvcc_results[(name, arch)]
    assert rc == 0, f"nvcc failed for {name} sm_{arch}"
    current, kernels = None, 0
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = m.group(1)
        elif (m := _PTXAS_USED.search(line)) and current is not None:
            kernels += 1
            assert "bytes smem" not in m.group(1), f"{current} sm_{arch}: {line.strip()}"
            current = None
    assert kernels == KERNELS, f"expected {KERNELS} kernels (persistent and step), got {kernels}"


_PTX_ENTRY = re.compile(r"^\.visible \.entry (\w+)\(", re.MULTILINE)
# Per .cu file: 4 cells x 4 (storage, math) persistent kernels, and for the 16-bit ones the
# tagged exchange's (4 cells x 2: the Tagged template flag, fused_rnn.h tagged_exchange), and
# 4 cells x 3 storage types of the per-step path's kernels (fused_rnn.h StepArgs).
PERSISTENT = 16 + 8
KERNELS = PERSISTENT + 12


def _persistent_bodies(ptx: str) -> list[str]:
    """The PTX of each persistent kernel (its name first), checking that the file holds every
    kernel: the step kernels, whose names say so, are left out."""
    bodies = re.split(r"^\.visible \.entry ", ptx, flags=re.MULTILINE)[1:]
    assert len(bodies) == KERNELS, len(bodies)
    persistent = [b for b in bodies if "_step_kernel" not in b[:b.index("(")]]
    assert len(persistent) == PERSISTENT, len(persistent)
    return persistent


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("name", [f.name for f in CU_FILES])
def test_no_noncoherent_loads(nvcc_results, name, arch):
    """No kernel reads global memory through the non-coherent path (``ld.global.nc``, what
    ``__ldg`` or a ``const __restrict__`` pointer can turn into). That path may serve stale
    data for memory written during the kernel, and h, dgates, the K-part partial sums and the
    team buffers are written by other blocks every step and read after a grid or cluster
    barrier. cudasim runs threads one at a time with one coherent memory, so only the PTX can
    show this. (Inputs written before the launch, the weights and x W_ih^T, could legally take
    ``.nc``; the test allows none, so a future ``__ldg`` has to be argued for here.)"""
    rc, _, ptx = nvcc_results[(name, arch)]
    assert rc == 0, f"nvcc failed for {name} sm_{arch}"
    assert ptx is not None, "nvcc -keep left no .ptx"
    entries = _PTX_ENTRY.findall(ptx)
    assert len(entries) == KERNELS, f"expected {KERNELS} kernels in the PTX, found {len(entries)}"
    assert ptx.count("ld.global") > 100, "the PTX has (almost) no global loads: wrong file?"
    bad = _noncoherent_loads(ptx)
    assert not bad, f"{name} sm_{arch}: {len(bad)} non-coherent loads, e.g. {bad[:3]}"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("name", [f.name for f in CU_FILES])
def test_w_slice_copy_keeps_its_loads_in_flight(nvcc_results, name, arch):
    """Each kernel's first work after zeroing the W region (its first ``bar.sync``) is the W
    slice copy (rnn_common.cuh copy_w_slice): kWLoadBatch = 16 global loads issued before the
    first shared store, so 16 round trips overlap per thread. Copied one element at a time,
    each store waiting for its load, the copy took 120-190 us a launch at S3 and S4 in run 2."""
    rc, _, ptx = nvcc_results[(name, arch)]
    assert rc == 0 and ptx is not None, f"nvcc failed for {name} sm_{arch}"
    for body in _persistent_bodies(ptx):
        lines = body[body.index("bar.sync"):].splitlines()[1:]
        first_store = next(i for i, line in enumerate(lines) if "st.shared" in line)
        loads = sum("ld.global" in line for line in lines[:first_store])
        assert loads >= 16, f"{body[:body.index('(')]}: {loads} loads before the first store"


# The .shared forms each WMMA kernel must hold (rnn_common.cuh frag_load), by the kernel's math
# and storage type in its mangled name: A and B operands, the accumulator's load and store.
_SHARED_FRAGMENT_FORMS = {
    "13__nv_bfloat16": ("wmma.load.a.sync.aligned.row.m8n32k16.shared.bf16",
                        "wmma.load.b.sync.aligned.col.m8n32k16.shared.bf16",
                        "wmma.load.c.sync.aligned.row.m8n32k16.shared.f32",
                        "wmma.store.d.sync.aligned.row.m8n32k16.shared.f32"),
    "6__half": ("wmma.load.a.sync.aligned.row.m8n32k16.shared.f16",
                "wmma.load.b.sync.aligned.col.m8n32k16.shared.f16",
                "wmma.load.c.sync.aligned.row.m8n32k16.shared.f32",
                "wmma.store.d.sync.aligned.row.m8n32k16.shared.f32"),
    "fLNS_4MathE1": ("wmma.load.a.sync.aligned.row.m16n16k8.shared.tf32",
                     "wmma.load.b.sync.aligned.col.m16n16k8.shared.tf32",
                     "wmma.load.c.sync.aligned.row.m16n16k8.shared.f32",
                     "wmma.store.d.sync.aligned.row.m16n16k8.shared.f32")}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("name", [f.name for f in CU_FILES])
def test_wmma_kernels_load_fragments_from_shared_memory(nvcc_results, name, arch):
    """Every tensor-core kernel holds the .shared forms of its WMMA loads and stores (which ptxas
    turns into ldmatrix and LDS/STS) next to the generic ones (X read from L2 unstaged, and
    FUSED_RNN_CUDA_FRAG_LOADS=generic), and the FMA kernels none: WMMA's own load_matrix_sync
    compiles to the generic forms only, one generic load per register. The tagged exchange's
    kernels (template flag ``Tagged``, mangled ``Lb1E``) always stage X, so every operand of
    theirs is in shared memory, the generic setting's too: the compiler sees that in some of
    them and gives those loads the .shared forms as well, so they need no generic form."""
    rc, _, ptx = nvcc_results[(name, arch)]
    assert rc == 0 and ptx is not None, f"nvcc failed for {name} sm_{arch}"
    seen = 0
    for body in _persistent_bodies(ptx):
        kernel = body[:body.index("(")]
        shared = {line.split()[0] for line in body.splitlines()
                  if line.strip().startswith("wmma.") and ".shared." in line}
        generic = [line for line in body.splitlines()
                   if line.strip().startswith("wmma.load") and ".shared." not in line]
        forms = [f for key, f in _SHARED_FRAGMENT_FORMS.items() if key in kernel]
        if "MathE2" in kernel:  # the FMA path: no WMMA at all
            assert not shared and not generic, kernel
            continue
        assert len(forms) == 1, kernel
        seen += 1
        assert shared == set(forms[0]), f"{kernel}: {sorted(shared)}"
        if "Lb1E" not in kernel:
            assert generic, f"{kernel}: no generic form left for X in global memory"
    assert seen == 12 + 8, seen


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("name", [f.name for f in CU_FILES])
def test_step_kernels_hold_nothing_on_chip_and_wait_for_nobody(nvcc_results, name, arch):
    """The per-step path's kernels (one thread a point, fused_rnn.h StepArgs) use no shared
    memory and no barrier: a point reads and writes only its own (batch row, unit), and stream
    order separates the steps. A barrier or shared array there would mean a point depends on
    another thread of its launch."""
    rc, _, ptx = nvcc_results[(name, arch)]
    assert rc == 0 and ptx is not None, f"nvcc failed for {name} sm_{arch}"
    bodies = re.split(r"^\.visible \.entry ", ptx, flags=re.MULTILINE)[1:]
    steps = [b for b in bodies if "_step_kernel" in b[:b.index("(")]]
    assert len(steps) == 12, len(steps)
    for body in steps:
        kernel = body[:body.index("(")]
        for word in (".shared", "bar.sync", "barrier", "wmma.", "mma.sync"):
            assert word not in body, f"{kernel}: {word}"


def _noncoherent_loads(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if "ld.global.nc" in line]


def test_noncoherent_load_check_catches_ldg(tmp_path):
    """The check above can fail: the forward reading h_{t-1} (written by other blocks at the
    previous step) through ``__ldg`` puts ld.global.nc into the PTX."""
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): cannot compile-check the .cu files")
    mutant = tmp_path / "csrc"
    shutil.copytree(CSRC, mutant)
    common = mutant / "rnn_common.cuh"  # ExchangeStep::get, the forward's read of h_{t-1}
    text = common.read_text()
    site = "    return in[at(b, k)];"
    assert text.count(site) == 1, "the mutant's target line moved"
    common.write_text(text.replace(site, "    return __ldg(&in[at(b, k)]);"))
    src = mutant / "rnn_forward.cu"
    # NVVM without its optimizations (-Xcicc -O0): __ldg is ld.global.nc at any level, and the
    # file compiles in seconds instead of most of a minute of CI's two cores
    cmd = [NVCC, "-ptx", "-std=c++20", "-O3", "-Xcicc", "-O0", "--expt-relaxed-constexpr",
           "-arch=sm_90", f"-I{mutant}", str(src), "-o", str(tmp_path / "m.ptx")]
    r = subprocess.run(cmd, capture_output=True, check=False, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _noncoherent_loads((tmp_path / "m.ptx").read_text())


def test_microbench_builds_for_sm90(tmp_path):
    """benchmarks/microbench.cu (the step primitives, timed by gpu_check_cuda.sh) builds into a
    program, warning-free, with the command the GPU script uses."""
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): cannot compile-check the microbench")
    src = CSRC.parent / "benchmarks" / "microbench.cu"
    cmd = [NVCC, *MICROBENCH_FLAGS, "-Werror", "all-warnings", str(src), "-o", str(tmp_path / "mb")]
    r = subprocess.run(cmd, capture_output=True, check=False, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    script = (CSRC.parent / "benchmarks" / "gpu_check_cuda.sh").read_text()
    assert " ".join(MICROBENCH_FLAGS) in script, "gpu_check_cuda.sh builds it with other flags"


@pytest.mark.slow
def test_binding_syntax_against_torch_headers(tmp_path):
    """g++ -fsyntax-only of binding.cpp with torch's (CPU wheel) and CUDA's headers."""
    if GXX is None:
        pytest.skip("g++ not found: cannot syntax-check csrc/binding.cpp")
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("CUDA headers not found (no nvcc): cannot syntax-check csrc/binding.cpp")
    from torch.utils.cpp_extension import include_paths

    incs = include_paths()
    if not any((Path(i) / "torch" / "extension.h").is_file() for i in incs):
        pytest.skip("torch/extension.h is not in this torch install")
    # The CPU wheel lacks the one generated c10/cuda header; an equivalent stub stands in.
    stub = tmp_path / "stub"
    macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [GXX, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror"]
    for inc in [*incs, str(stub), str(cuda_inc), sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", inc]
    cmd += [f"-I{CSRC}", "-DTORCH_EXTENSION_NAME=fused_rnn_cuda_ext", str(CSRC / "binding.cpp")]
    r = subprocess.run(cmd, capture_output=True, check=False, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


_PLAN_HARNESS = r"""
#include "plan.h"
#include <cstdio>
using namespace fused_rnn;
int main() {
  const int hs[] = {1, 5, 37, 64, 100, 256, 512, 768, 1000, 1024, 1300, 1740, 2048, 3000};
  const int sms[] = {1, 3, 4, 108, 132};
  const int groups[] = {1, 2, 3};
  const int stages[][2] = {{0, 0}, {32, 64}, {64, 1024}};
  const int parts[] = {1, 2, 4};
  for (int c = 0; c < 4; ++c) for (int m = 0; m < 3; ++m) for (int h : hs) for (int s : sms)
    for (int bw = 0; bw < 2; ++bw) for (int g : groups) for (const auto& st : stages)
    for (int pt : parts) {
      if (g > s || pt > s) continue;
      const Plan p = make_plan(static_cast<Cell>(c), static_cast<Math>(m), h, bw, s, g, st[0],
                               st[1], pt);
      std::printf("%d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d "
                  "%d %d %d %d\n",
                  c, m, h, s, bw, g, st[0], st[1], pt, p.units, p.blocks, p.m_rows, p.m_pad, p.k,
                  p.k_pad, p.ldw, p.slots, p.slot_floats, p.w_bytes, p.smem_bytes, p.groups,
                  p.group_blocks, p.stage_rows, p.stage_k, p.stage_ld, p.parts, p.k_part,
                  p.part_ld, static_cast<int>(step_bytes(p, static_cast<Math>(m), 64)));
    }
  const int caps[] = {0, 16, 1 << 30};
  const int bpads2[] = {32, 96, 256};
  const int kparts[] = {0, 1, 4};
  for (int c = 0; c < 4; ++c) for (int h : hs) for (int bw = 0; bw < 2; ++bw)
    for (int is16 = 0; is16 < 2; ++is16) for (int bp : bpads2) for (int cap : caps)
    for (int kp : kparts) {
      const Selection sel = select_plan(static_cast<Cell>(c), is16, true, h, bw, 132, 227 * 1024,
                                        bp, 8, cap, kp);
      std::printf("S %d %d %d %d %d %d %d %d %d %d %d %d %d\n", c, h, bw, is16, bp, cap, kp,
                  static_cast<int>(sel.math), sel.plan.groups, sel.plan.stage_rows,
                  sel.plan.stage_k, sel.plan.smem_bytes, sel.plan.parts);
    }
  // small grids: K parts' empty-last-part guard and staging narrower than K_MIN_STAGE_K
  const int small_hs[] = {1, 5, 37, 64};
  const int small_kparts[] = {0, 2, 4};
  const int small_grids[][2] = {{2, 227 * 1024}, {8, 99 * 1024}};
  for (int c = 0; c < 4; ++c) for (int h : small_hs) for (int bw = 0; bw < 2; ++bw)
    for (int is16 = 0; is16 < 2; ++is16) for (int bp : bpads2) for (int kp : small_kparts)
    for (const auto& sg : small_grids) {
      const Selection sel = select_plan(static_cast<Cell>(c), is16, true, h, bw, sg[0], sg[1],
                                        bp, 8, 1 << 30, kp);
      std::printf("Q %d %d %d %d %d %d %d %d %d %d %d %d %d %d\n", c, h, bw, is16, bp, kp,
                  sg[0], sg[1], static_cast<int>(sel.math), sel.plan.groups, sel.plan.stage_k,
                  sel.plan.smem_bytes, sel.plan.parts, sel.plan.k_part);
    }
  const int hs3[] = {5, 256, 768, 1024, 1740, 3000};
  const int blockcaps[] = {0, 1, 32, 100};
  const int bpads3[] = {32, 256};
  const int cmaxes[] = {8, 16};
  for (int c = 0; c < 4; ++c) for (int h : hs3) for (int bw = 0; bw < 2; ++bw)
    for (int is16 = 0; is16 < 2; ++is16) for (int bp : bpads3) for (int bc : blockcaps) {
      const Selection sel = select_plan_capped(static_cast<Cell>(c), is16, true, h, bw, 132,
                                               227 * 1024, bp, 8, 1 << 30, 0, bc);
      std::printf("C %d %d %d %d %d %d %d %d %d %d %d %d %d\n", c, h, bw, is16, bp, bc,
                  static_cast<int>(sel.math), sel.plan.blocks, sel.plan.units, sel.plan.groups,
                  sel.plan.parts, sel.plan.stage_k, sel.plan.smem_bytes);
    }
  for (int c = 0; c < 4; ++c) for (int h : hs3) for (int bw = 0; bw < 2; ++bw)
    for (int is16 = 0; is16 < 2; ++is16) for (int bp : bpads3) for (int cm : cmaxes) {
      const ClusterSelection cs = select_plan_clustered(
          static_cast<Cell>(c), is16, true, h, bw, 132, 227 * 1024, bp, 8, 1 << 30, 0, cm);
      std::printf("L %d %d %d %d %d %d %d %d %d %d %d %d %d %d\n", c, h, bw, is16, bp, cm,
                  static_cast<int>(cs.found), static_cast<int>(cs.sel.math), cs.sel.plan.blocks,
                  cs.sel.plan.groups, cs.sel.plan.group_blocks, cs.sel.plan.parts,
                  cs.sel.plan.stage_k, cs.sel.plan.smem_bytes);
    }
  // choose_launch: every setting at once (caps, clusters, teams, with and without sm_90)
  const int launch_knobs[][6] = {{0, 0, 0, 1, 1, 0}, {0, 32, 0, 0, 1, 0}, {0, 0, 8, 0, 1, 0},
                                 {0, 0, 0, 1, 0, 0}, {4, 0, 16, 1, 1, 0}, {0, 0, 8, 1, 0, 0},
                                 {0, 0, 8, 0, 1, 1}, {0, 0, 16, 0, 1, 1}, {4, 32, 16, 1, 0, 1}};
  for (int c = 0; c < 4; ++c) for (int h : hs3) for (int bw = 0; bw < 2; ++bw)
    for (int bp : bpads3) for (const auto& kn : launch_knobs) {
      const LaunchChoice lc = choose_launch(static_cast<Cell>(c), true, true, h, bw, 132,
                                            227 * 1024, bp, 8, 1 << 30, kn[0], kn[1], kn[2],
                                            kn[3] != 0, kn[4] != 0, kn[5] != 0);
      std::printf("X %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d\n", c, h, bw, bp, kn[0],
                  kn[1], kn[2], kn[3], kn[4], kn[5], static_cast<int>(lc.sel.math),
                  lc.sel.plan.blocks, lc.sel.plan.groups, lc.sel.plan.parts,
                  lc.sel.plan.stage_k, lc.sel.plan.smem_bytes, lc.cluster);
    }
  // Batches whose DSMEM mirrors pass 2^31 bytes: the byte counts are 64-bit and saturate, so
  // none wraps into a size that seems to fit (a mirror of 2147450880 bytes, doubled, once did).
  const int huge_bpads[] = {522240, 4177920, 2147483616};
  const int group_caps[] = {1, 8};
  for (int c = 0; c < 4; ++c) for (int bw = 0; bw < 2; ++bw) for (int is16 = 0; is16 < 2; ++is16)
    for (int bp : huge_bpads) for (int mg : group_caps) for (int cm : cmaxes) {
      const LaunchChoice lc = choose_launch(static_cast<Cell>(c), is16, true, 256, bw, 132,
                                            227 * 1024, bp, mg, 1 << 30, 1, 0, cm, false, true,
                                            true);
      std::printf("D %d %d %d %d %d %d %d %d %d %d\n", c, bw, is16, bp, mg, cm,
                  static_cast<int>(lc.sel.math), lc.sel.plan.groups, lc.sel.plan.smem_bytes,
                  lc.cluster);
    }
  const int bpads[] = {32, 64, 96, 128, 256};
  for (int c = 0; c < 4; ++c) for (int m = 0; m < 3; ++m) for (int h : hs) for (int bp : bpads)
    for (int bw = 0; bw < 2; ++bw) {
      std::printf("G %d %d %d %d %d %d\n", c, m, h, bp, bw,
                  choose_groups(static_cast<Cell>(c), static_cast<Math>(m), h, bw, 132,
                                227 * 1024, bp, 8));
      for (int kp : kparts)
        std::printf("P %d %d %d %d %d %d %d\n", c, m, h, bp, bw, kp,
                    choose_parts(static_cast<Cell>(c), static_cast<Math>(m), h, bw, 132,
                                 227 * 1024, bp, 1, kp));
    }
  for (int m = 0; m < 3; ++m) for (int mfr = 1; mfr <= 24; ++mfr) for (int nfr = 1; nfr <= 4; ++nfr)
    for (int mt = 1; mt <= 4; mt *= 2) {
      const TileBlock tb = tile_block(static_cast<Math>(m), mfr, nfr, mt);
      std::printf("B %d %d %d %d %d %d\n", m, mfr, nfr, mt, tb.bm, tb.bn);
    }
  for (int c = 0; c < 4; ++c) for (int h : hs) for (int bw = 0; bw < 2; ++bw)
    for (int tf = 0; tf < 2; ++tf)
      std::printf("M %d %d %d %d %d\n", c, h, bw, tf,
                  static_cast<int>(choose_math(false, tf, static_cast<Cell>(c), h, bw, 132,
                                               227 * 1024)));
  return 0;
}
"""


def _torch_check_messages(source: str) -> list[tuple[int, list[str]]]:
    """(line, message arguments) of every TORCH_CHECK in C++ ``source``: the arguments after
    the condition, split at top-level commas (string literals and nested calls kept whole)."""
    calls = []
    for m in re.finditer(r"\bTORCH_CHECK\(", source):
        depth, i, args, start, in_str = 1, m.end(), [], m.end(), False
        while depth:
            c = source[i]
            if in_str:
                in_str = not (c == '"' and source[i - 1] != "\\")
            elif c == '"':
                in_str = True
            elif c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == "," and depth == 1:
                args.append(source[start:i])
                start = i + 1
            i += 1
        args.append(source[start:i - 1])
        calls.append((source.count("\n", 0, m.start()) + 1,
                      [" ".join(a.replace("\\\n", " ").split()) for a in args[1:]]))
    return calls


# What a TORCH_CHECK message in binding.cpp may stream besides string literals and num()/dims():
# strings, dtypes (their names) and devices (printed by libc10 itself).
STREAMABLE = {"name", "why", "dev", "dtype", "st", "t.device()", "t.scalar_type()",
              "xproj.device()", "dy.device()", "#expr", "cudaGetErrorName(err_)",
              "cudaGetErrorString(err_)", 'backward ? "backward" : "forward"'}


def test_binding_streams_no_number_into_an_error_message():
    """Every number in binding.cpp's error messages goes through ``num``/``dims``
    (std::to_string): on the lent H200 each refusal that streamed an integer into TORCH_CHECK
    crashed in the library's own copy of std::ostream::_M_insert<long> instead of raising."""
    calls = _torch_check_messages((CSRC / "binding.cpp").read_text())
    assert len(calls) > 30
    bad = []
    for line, args in calls:
        for arg in args:
            if (re.fullmatch(r'("([^"\\]|\\.)*"\s*)+', arg) or arg in STREAMABLE
                    or re.fullmatch(r"(num|dims)\(.*\)", arg)
                    or arg.startswith("err_ == cudaErrorCooperativeLaunchTooLarge")):
                continue
            bad.append(f"binding.cpp:{line}: {arg}")
    assert not bad, "stream numbers through num()/dims():\n" + "\n".join(bad)


def test_the_number_check_sees_a_streamed_integer():
    calls = _torch_check_messages('TORCH_CHECK(a < b, "a=", num(a), ", b=", b, "x" "y");')
    assert calls == [(1, ['"a="', "num(a)", '", b="', "b", '"x" "y"'])]


def test_plan_header_matches_python_mirror(tmp_path):
    if GXX is None:
        pytest.skip("g++ not found: cannot compile csrc/plan.h")
    src = tmp_path / "plan_harness.cpp"
    src.write_text(_PLAN_HARNESS)
    exe = tmp_path / "plan_harness"
    subprocess.run(
        [GXX, "-std=c++20", "-Wall", "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)],
        check=True, timeout=120,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    n = 0
    kinds = set()
    capped, clustered, launches, blockings = {}, {}, {}, {}
    for line in out.splitlines():
        f = line.split()
        kinds.add(f[0] if f[0].isalpha() else "plan")
        if f[0] == "M":
            c, h, bw, tf, m = map(int, f[1:])
            assert m == P.choose_math(False, bool(tf), c, h, bool(bw), 132, 227 * 1024), line
        elif f[0] == "G":
            c, m, h, bp, bw, g = map(int, f[1:])
            assert g == P.choose_groups(c, m, h, bool(bw), 132, 227 * 1024, bp, 8), line
        elif f[0] == "P":
            c, m, h, bp, bw, kp, parts = map(int, f[1:])
            assert parts == P.choose_parts(c, m, h, bool(bw), 132, 227 * 1024, bp, 1, kp), line
        elif f[0] == "S":
            c, h, bw, is16, bp, cap, kp, *rest = map(int, f[1:])
            math, p = P.select_plan(c, bool(is16), True, h, bool(bw), 132, 227 * 1024, bp, 8, cap,
                                    kp)
            want = (math, p.groups, p.stage_rows, p.stage_k, p.smem_bytes, p.parts)
            assert tuple(rest) == want, line
        elif f[0] == "Q":
            c, h, bw, is16, bp, kp, sms, smem, *rest = map(int, f[1:])
            math, p = P.select_plan(c, bool(is16), True, h, bool(bw), sms, smem, bp, 8, 1 << 30,
                                    kp)
            want = (math, p.groups, p.stage_k, p.smem_bytes, p.parts, p.k_part)
            assert tuple(rest) == want, line
        elif f[0] == "L":
            c, h, bw, is16, bp, cm, *rest = map(int, f[1:])
            found, math, p = P.select_plan_clustered(c, bool(is16), True, h, bool(bw), 132,
                                                     227 * 1024, bp, 8, 1 << 30, 0, cm)
            want = (int(found), math, p.blocks, p.groups, p.group_blocks, p.parts, p.stage_k,
                    p.smem_bytes)
            assert tuple(rest) == want, line
            clustered[(c, h, bw, is16, bp, cm)] = (found, p.groups, p.group_blocks)
        elif f[0] == "B":
            m, mfr, nfr, mt, bm, bn = map(int, f[1:])
            assert (bm, bn) == P.tile_block(m, mfr, nfr, mt), line
            blockings[(m, mfr, nfr, mt)] = (bm, bn)
        elif f[0] == "X":
            c, h, bw, bp, kp, mb, cm, tc, hc, ds, *rest = map(int, f[1:])
            math, p = P.choose_launch(c, True, True, h, bool(bw), 132, 227 * 1024, bp, 8, 1 << 30,
                                      kp, mb, cm, bool(tc), bool(hc), bool(ds))
            assert tuple(rest) == (math, p.blocks, p.groups, p.parts, p.stage_k, p.smem_bytes,
                                   p.cluster), line
            launches[(c, h, bw, bp, kp, mb, cm, tc, hc, ds)] = p.cluster
        elif f[0] == "D":
            c, bw, is16, bp, mg, cm, *rest = map(int, f[1:])
            math, p = P.choose_launch(c, bool(is16), True, 256, bool(bw), 132, 227 * 1024, bp,
                                      mg, 1 << 30, 1, 0, cm, False, True, True)
            assert tuple(rest) == (math, p.groups, p.smem_bytes, p.cluster), line
            assert p.smem_bytes <= 227 * 1024 and p.cluster != P.CLUSTER_GROUPS_DSMEM, line
        elif f[0] == "C":
            c, h, bw, is16, bp, bc, *rest = map(int, f[1:])
            math, p = P.select_plan_capped(c, bool(is16), True, h, bool(bw), 132, 227 * 1024, bp,
                                           8, 1 << 30, 0, bc)
            want = (math, p.blocks, p.units, p.groups, p.parts, p.stage_k, p.smem_bytes)
            assert tuple(rest) == want, line
            capped[(c, h, bw, is16, bp, bc)] = (p.blocks, p.smem_bytes)
        else:
            c, m, h, s, bw, g, rows, sk, pt, *rest = map(int, f)
            p = P.make_plan(c, m, h, bool(bw), s, g, rows, sk, pt)
            assert tuple(rest) == (*p.as_tuple(), P.step_bytes(p, m, 64)), line
        n += 1
    assert n > 1000 and kinds == {"plan", "S", "Q", "G", "P", "M", "C", "L", "X", "B", "D"}
    # Register blocking: never on the FMA path, past max_tiles, or below one tile a warp; the
    # S3/S4 chunks (16-bit 16 x 2 tiles, TF32 8 x 4) take 2 x 2, a chunk of 16 x 1 takes 2 x 1,
    # 2 x 4 tiles (8: one a warp) none, 1 x 16... (one W-row tile) 1 x 2 where nfr allows.
    assert all(bm * bn == 1 for (m, *_, mt), (bm, bn) in blockings.items() if m == 2 or mt == 1)
    assert all(bm * bn <= mt for (*_, mt), (bm, bn) in blockings.items())
    assert all(bm * bn == 1 for (_, mfr, nfr, _), (bm, bn) in blockings.items() if mfr * nfr < 8)
    assert blockings[(0, 16, 2, 4)] == (2, 2) and blockings[(1, 8, 4, 4)] == (2, 2)
    assert blockings[(0, 16, 2, 2)] == (2, 1) and blockings[(0, 16, 1, 4)] == (2, 1)
    assert blockings[(1, 2, 4, 4)] == (1, 1) and blockings[(1, 1, 4, 4)] == (1, 1)
    assert blockings[(0, 8, 2, 4)] == (2, 1) and blockings[(1, 3, 4, 4)] == (1, 2)
    # choose_launch: no clusters without sm_90; teams only with K parts (S4-like LSTM at H=1024,
    # B_pad 256, auto parts: the backward has them); groups where one fits
    assert not any(mode for key, mode in launches.items() if key[-2] == 0)
    assert launches[(0, 1024, 1, 256, 0, 0, 0, 1, 1, 0)] == P.CLUSTER_TEAMS
    assert launches[(0, 256, 0, 32, 0, 0, 8, 0, 1, 0)] == P.CLUSTER_GROUPS
    # dsmem: S5/S6-like LSTM (H=256, 16-bit) in both directions with clusters of 16 (and 8);
    # never without a cluster-groups launch to turn into one (S3-like H=1024 fits no cluster)
    for bw in (0, 1):
        for bp in (32, 256):
            for cm in (8, 16):
                assert launches[(0, 256, bw, bp, 0, 0, cm, 0, 1, 1)] == P.CLUSTER_GROUPS_DSMEM
    assert launches[(0, 1024, 0, 32, 0, 0, 16, 0, 1, 1)] == P.CLUSTER_NONE
    assert all(mode != P.CLUSTER_GROUPS_DSMEM for key, mode in launches.items() if not key[-1])
    # Cluster mode: LSTM bf16 at H=256 as one cluster of 8 blocks (B_pad 32) or 8 (B_pad 256);
    # LSTM's H=1024 fits in no cluster of 16; a found plan never puts more than cluster_max blocks in
    # a group.
    assert clustered[(0, 256, 0, 1, 32, 8)] == (True, 1, 8)
    assert clustered[(0, 256, 0, 1, 256, 8)] == (True, 8, 8)
    assert not any(found for (c, h, *_), (found, *_) in clustered.items() if (c, h) == (0, 1024))
    assert all(blocks <= key[-1] for key, (found, _, blocks) in clustered.items() if found)

    # The grid cap: every capped plan fits where the uncapped one does; small sizes take the
    # cap (H=5 even one block), large ones more blocks than it.
    for (*key, bc), (blocks, smem) in capped.items():
        assert smem <= 227 * 1024 or capped[(*key, 0)] == (blocks, smem), (key, bc)
    assert capped[(0, 5, 0, 1, 32, 1)][0] == 1
    assert capped[(0, 256, 1, 1, 32, 32)][0] == 32
    assert capped[(0, 256, 0, 1, 32, 0)][0] == 128
    assert capped[(0, 1024, 0, 1, 32, 32)][0] > 32



# The benchmark shapes (ANCHORS.md): name -> (B, H).
BENCH_SHAPES = {"S1": (16, 768), "S2": (64, 512), "S3": (64, 1024), "S4": (256, 1024),
                "S5": (8, 256), "S6": (128, 256)}


@pytest.mark.parametrize("gpu", ["H100", "A100"])
def test_groups_give_way_to_a_stage(gpu):
    """select_plan: batch groups never cost the X stage. On the H200 the unstaged rows were
    the slow ones (run 2: cuda-direct 1.2-1.6x slower at S3 and S4; GRU S4, whose plans took 4
    groups and no stage, 0.28x cuDNN). Every benchmark launch with the default settings, on an
    H100's and an A100's figures, stages its K part in at most K_MAX_STAGE_SLICES slices where
    some group count allows that, and otherwise has the most groups; and where the rule moves
    a plan it is the most groups that stage well. On the H100 it moves GRU S4 (4 groups
    unstaged -> 2 staged in 16 bits; TF32 2 -> 1) and GRU S3 TF32 (a stage of 144 of 1024)."""
    sms, smem = P.GPUS[gpu]
    moved = set()
    for name, (batch, hidden) in BENCH_SHAPES.items():
        batch_pad = -(-batch // P.K_BATCH_PAD) * P.K_BATCH_PAD
        for cell in ("LSTM", "GRU"):
            for is16, tf32 in ((True, False), (False, True)):
                for bw in (False, True):
                    args = (P.CELLS[cell], is16, tf32, hidden, bw, sms, smem, batch_pad, 8,
                            1 << 30, 0)
                    _, plan = P.select_plan(*args)
                    _, most = P.select_plan_groups(*args)
                    by_groups = {g: P.select_plan_groups(*args[:8], g, *args[9:])[1]
                                 for g in range(1, most.groups + 1)}
                    staged = [g for g, p in by_groups.items()
                              if p.groups == g and P.well_staged(p)]
                    if staged:
                        assert P.well_staged(plan), (name, cell, is16, bw, plan)
                        assert plan.groups == max(staged), (name, cell, is16, bw)
                    else:
                        assert plan == most, (name, cell, is16, bw)
                    assert plan.smem_bytes <= max(smem, most.smem_bytes)  # (too large: refused)
                    if plan != most:
                        moved.add((name, cell, "bf16" if is16 else "tf32",
                                   "bwd" if bw else "fwd", most.groups, plan.groups))
    if gpu == "H100":
        assert {(n, c, d, p) for n, c, d, p, _, _ in moved} == {
            ("S4", "GRU", "bf16", "fwd"), ("S4", "GRU", "bf16", "bwd"),
            ("S4", "GRU", "tf32", "fwd"), ("S4", "GRU", "tf32", "bwd"),
            ("S3", "GRU", "tf32", "fwd"), ("S3", "GRU", "tf32", "bwd")}, moved
        assert ("S4", "GRU", "bf16", "fwd", 4, 2) in moved


def _run_py(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=False, text=True, timeout=300,
        env={**os.environ, **env}, cwd=ROOT,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_import_works_and_reason_is_clear_without_gpu():
    r = _run_py(
        "import sys, fused_rnn, torch\n"
        "from fused_rnn.ops import cuda\n"
        "from fused_rnn.ops.cuda import ops, _ext\n"  # op registration needs no extension
        "print(cuda.unavailable_reason(None))\n"
        "print(fused_rnn.backend_report()['cuda'])\n"
        "assert _ext._ext is None and 'fused_rnn._cuda_ext' not in sys.modules\n"
        "assert hasattr(torch.ops.fused_rnn, 'cuda_layer')\n"
    )
    assert r.returncode == 0, r.stderr
    reason, report = r.stdout.strip().splitlines()
    assert reason == report
    assert "CUDA" in reason and ("GPU" in reason or "CPU-only" in reason), reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_extension_raises_actionable_error_without_gpu():
    with pytest.raises(RuntimeError, match="fused_rnn CUDA backend is unavailable"):
        _ext.extension()


def test_a_blank_arch_list_is_explained_and_an_empty_one_is_torchs_default(monkeypatch):
    """torch's build reads an empty TORCH_CUDA_ARCH_LIST, or "native", as unset (the visible
    GPUs); one of blanks only it cannot read."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "  ")
    why = _ext.jit_obstacle()
    assert why and "TORCH_CUDA_ARCH_LIST='  ' holds only blanks" in why
    caps = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    for value in ("", "native"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
        assert "TORCH_CUDA_ARCH_LIST" not in (_ext.jit_obstacle() or "")
        assert _ext.build_arch_list() == ("9.0+PTX", ["7.5"]), value


def test_missing_nvcc_is_explained(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_ext, "_find_nvcc", lambda: None)
    why = _ext.jit_obstacle()
    assert why and "nvcc was not found" in why and "FUSED_RNN_BUILD_CUDA=1" in why


def test_missing_host_compiler_is_explained(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_ext, "_find_nvcc", lambda: "/opt/fake/nvcc")
    monkeypatch.setattr(_ext, "_nvcc_version", lambda nvcc: None)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    why = _ext.jit_obstacle()
    assert why and "no host C++ compiler" in why and "'no-such-compiler-here'" in why
    monkeypatch.delenv("CXX")
    if shutil.which("c++"):  # this machine has one: the same checks pass it
        assert "C++ compiler" not in (_ext.jit_obstacle() or "")


def test_cuda_version_mismatch_is_explained(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_ext, "_find_nvcc", lambda: "/opt/fake/nvcc")
    monkeypatch.setattr(_ext, "_nvcc_version", lambda nvcc: (11, 8))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    why = _ext.jit_obstacle()
    assert why and "nvcc 11.8" in why and "CUDA 13.0" in why


def test_build_dir_is_per_torch_and_cuda_version(monkeypatch):
    monkeypatch.delenv("FUSED_RNN_CUDA_BUILD_DIR", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    d = _ext.build_dir().name
    assert torch.__version__ in d and "cu13.0" in d and "8.0_9.0" in d
    monkeypatch.setenv("FUSED_RNN_CUDA_BUILD_DIR", "/tmp/x")
    assert _ext.build_dir() == Path("/tmp/x")


def test_the_build_cache_is_placed_without_a_home_and_as_xdg_says(monkeypatch, tmp_path):
    """XDG_CACHE_HOME (absolute) places the cache without asking for a home directory; empty or
    relative, it is ignored (the XDG spec). With no home directory either (no HOME, a uid
    without a passwd entry, as in containers) the reason names the settings that fix it, and
    FUSED_RNN_CUDA_BUILD_DIR takes "~"."""
    monkeypatch.delenv("FUSED_RNN_CUDA_BUILD_DIR", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _ext.build_dir().parent == tmp_path / "fused_rnn" / "cuda_ext"
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        with pytest.raises(RuntimeError, match="set FUSED_RNN_CUDA_BUILD_DIR .or XDG_CACHE_HOME"):
            _ext.build_dir()
        bdir, why = _ext._ready_build_dir()
        assert bdir is None and "Could not determine home directory" in why
    monkeypatch.setattr(Path, "home", staticmethod(lambda: tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert _ext.build_dir().parent == tmp_path / "home" / ".cache" / "fused_rnn" / "cuda_ext"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FUSED_RNN_CUDA_BUILD_DIR", "~/frnn")
    assert _ext.build_dir() == tmp_path / "home" / "frnn"


def test_a_build_directory_that_is_a_file_is_named_as_such(monkeypatch, tmp_path):
    """A directory that cannot be made (here a file in the way; a read-only parent would not
    stop root, as CI runs) is named as such, not as a failed compile."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FUSED_RNN_CUDA_BUILD_DIR", str(tmp_path / "file" / "ext"))
    bdir, why = _ext._ready_build_dir()
    assert bdir is None and "FUSED_RNN_CUDA_BUILD_DIR moves its build directory" in why, why
    assert "cannot be JIT-built" in why and "failed" not in why, why


def test_an_obstacle_is_checked_again_once_a_setting_changes(monkeypatch):
    """What stops a build from starting is kept while the settings it depends on stay (a check
    runs nvcc), and checked again once one changes (the user did what the reason said); a
    failed build is kept for the process."""
    calls = []

    def load():
        calls.append(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        return None, f"obstacle {len(calls)}", False

    monkeypatch.setattr(_ext, "_platform_obstacle", lambda device: None)
    monkeypatch.setattr(_ext, "_ext", None)
    monkeypatch.setattr(_ext, "_failure", None)
    monkeypatch.setattr(_ext, "_obstacle", None)
    monkeypatch.setattr(_ext, "_load", load)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", " ")
    assert _ext.unavailable_reason(None) == "obstacle 1"
    assert _ext.unavailable_reason(None) == "obstacle 1" and len(calls) == 1
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _ext.unavailable_reason(None) == "obstacle 2"
    monkeypatch.setattr(_ext, "_load", lambda: (None, "the build failed", True))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _ext.unavailable_reason(None) == "the build failed"
    monkeypatch.setattr(_ext, "_load", lambda: pytest.fail("a failed build is not retried"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert _ext.unavailable_reason(None) == "the build failed"
    with pytest.raises(RuntimeError, match="unavailable: the build failed"):
        _ext.extension()


def _setup_cuda_extension(monkeypatch, **env):
    """setup.py's cuda_extension(), its module loaded under ``env`` (its setup() call, which
    calls cuda_extension() too, does nothing)."""
    import importlib.util

    import setuptools

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    spec = importlib.util.spec_from_file_location("fused_rnn_setup", CSRC.parent / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cuda_extension


def test_setup_refuses_a_build_flag_it_does_not_know_and_a_cpu_only_torch(monkeypatch):
    """FUSED_RNN_BUILD_CUDA=true built nothing, silently; with a CPU-only torch the build ended
    in torch's "CUDA_HOME environment variable is not set" even where it was set."""
    build = _setup_cuda_extension(monkeypatch, FUSED_RNN_BUILD_CUDA="0")
    assert build() == ([], {})
    monkeypatch.setenv("FUSED_RNN_BUILD_CUDA", "true")
    with pytest.raises(SystemExit, match="FUSED_RNN_BUILD_CUDA='true': 1 builds"):
        build()
    monkeypatch.setenv("FUSED_RNN_BUILD_CUDA", "1")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit, match="is a CPU-only build"):
        build()


def test_setup_picks_the_visible_sm80_gpus_or_asks_for_a_list(monkeypatch):
    """TORCH_CUDA_ARCH_LIST unset (or empty, or "native") builds for the visible GPUs: an sm_75
    one is left out as in the JIT build, and with none sm_80+ (a build host without a GPU)
    the list is asked for."""
    build = _setup_cuda_extension(monkeypatch, FUSED_RNN_BUILD_CUDA="0")
    monkeypatch.setenv("FUSED_RNN_BUILD_CUDA", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    caps = [(7, 5)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    with pytest.raises(SystemExit, match="none is sm_80 or newer .1 visible.: set the list"):
        build()
    caps[:] = [(7, 5), (10, 0)]  # newer than this torch's build: clamped to sm_90, as torch does
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda *a, **k: ("ext", a, k))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")
    exts, _ = build()
    assert len(exts) == 1 and os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"


def test_setup_takes_an_empty_flag_for_off_and_explains_a_missing_torch(monkeypatch):
    """FUSED_RNN_BUILD_CUDA= (empty, as CI switches a flag off) builds nothing, as 0 does;
    with the flag on under pip's build isolation torch cannot be imported, which is said in
    one line with the command that works, not a traceback; a blank TORCH_CUDA_ARCH_LIST gets
    the JIT build's reason."""
    import builtins

    build = _setup_cuda_extension(monkeypatch, FUSED_RNN_BUILD_CUDA="")
    assert build() == ([], {})
    monkeypatch.setenv("FUSED_RNN_BUILD_CUDA", "1")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real_import(name, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builtins, "__import__", no_torch)
        with pytest.raises(SystemExit, match="cannot import .No module named 'torch'.: install "
                                             "torch first and build without isolation"):
            build()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "  ")
    with pytest.raises(SystemExit, match="holds only blanks"):
        build()


def test_every_file_in_csrc_is_a_listed_source_or_header():
    """buildinfo.SOURCES and HEADERS are what the JIT build compiles and hashes, what the
    ahead-of-time build compiles and what a wheel carries: a file in csrc/ off those lists
    would be built or shipped without changing the source hash, or left out of a wheel."""
    from fused_rnn.ops.cuda.buildinfo import HEADERS, SOURCES

    assert sorted(p.name for p in CSRC.iterdir()) == sorted(SOURCES + HEADERS)


def test_the_wheel_and_sdist_carry_the_sources_and_nothing_stray(tmp_path):
    """A non-editable install JIT-builds from fused_rnn/csrc/ in the wheel: exactly the listed
    sources, hashing as the checkout's; no build output or bytecode rides along. The sdist
    holds csrc/ and the package, not a part of the test suite that cannot run alone."""
    import tarfile
    import zipfile

    from fused_rnn.ops.cuda.buildinfo import HEADERS, SOURCES, source_hash

    src = tmp_path / "src"
    for name in ("setup.py", "MANIFEST.in", "README.md"):
        src.mkdir(exist_ok=True)
        shutil.copy2(CSRC.parent / name, src / name)
    shutil.copytree(CSRC, src / "csrc")
    shutil.copytree(CSRC.parent / "fused_rnn", src / "fused_rnn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (src / "fused_rnn" / "stray.pyc").write_bytes(b"")  # bytecode never ships
    (src / "tests").mkdir()
    (src / "tests" / "test_x.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "FUSED_RNN_BUILD_CUDA"}
    for cmd in ([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                 "-q", "-w", str(tmp_path / "dist")],
                [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")]):
        r = subprocess.run(cmd, cwd=src, capture_output=True, text=True, env=env, timeout=600,
                           check=False)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "wheel")
    shipped = sorted(n.split("/")[-1] for n in names if n.startswith("fused_rnn/csrc/"))
    assert shipped == sorted(SOURCES + HEADERS)
    assert not [n for n in names if n.endswith((".so", ".pyc", ".o")) or "__pycache__" in n], names
    assert not [n for n in names if not n.startswith(("fused_rnn/", "fused_rnn-"))], names
    assert source_hash(tmp_path / "wheel" / "fused_rnn" / "csrc") == source_hash(CSRC)
    (metadata,) = (tmp_path / "wheel").glob("fused_rnn-*.dist-info/METADATA")
    meta = metadata.read_text(encoding="utf-8")
    assert "Description-Content-Type: text/markdown" in meta
    assert "## Set up and run" in meta  # the README is the long description
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        members = [m.split("/", 1)[1] for m in t.getnames() if "/" in m]
    assert {f"csrc/{n}" for n in SOURCES + HEADERS} <= set(members)
    assert {"setup.py", "README.md", "fused_rnn/__init__.py"} <= set(members)
    assert not [m for m in members if m.startswith("tests")], members


def test_sources_are_found_from_the_package():
    assert _ext.sources_dir() == CSRC


def test_preflight_script_reports_binding_mismatches(monkeypatch):
    """benchmarks/preflight_jit.py (run by hand with a CUDA build of torch, no GPU needed):
    without one it says what it needs; its call check passes a binding that stops at the
    device check and reports one whose signature does not fit ops.py's call."""
    import importlib.util
    import types

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "preflight_jit.py"
    spec = importlib.util.spec_from_file_location("preflight_jit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if torch.version.cuda is None:
        assert mod.main() == 2

    def device_check(*args, **kwargs):
        raise RuntimeError("fused_rnn CUDA backend: inputs must be CUDA tensors, got cpu")

    def too_few_parameters(mode, xproj, h0, c0, w_hh, b_hh, lengths, reverse):
        raise AssertionError("not reached")

    fits = types.SimpleNamespace(forward=device_check, backward=device_check,
                                 forward_steps=device_check, backward_steps=device_check)
    assert mod.check_calls(fits) == []
    broken = types.SimpleNamespace(**{**vars(fits), "forward": too_few_parameters})
    problems = mod.check_calls(broken)  # 4 cells, with and without phase timing
    assert len(problems) == 8 and all("forward persistent" in p for p in problems), problems
    broken = types.SimpleNamespace(**{**vars(fits), "backward_steps": too_few_parameters})
    problems = mod.check_calls(broken)  # the per-step path has no phase timing
    assert len(problems) == 4 and all("backward step" in p for p in problems), problems


def test_preflight_script_builds_in_the_loaders_build_directory(monkeypatch, tmp_path, capsys):
    """preflight_jit.main past the obstacles (a CUDA build of torch with nvcc, stood in for
    here): it builds through the loader's own steps, the build directory made ready first (an
    unwritable one is its reason), then checks the calls and plans of what was built."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "preflight_jit.py"
    spec = importlib.util.spec_from_file_location("preflight_jit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_ext, "jit_obstacle", lambda: None)
    monkeypatch.setenv("FUSED_RNN_CUDA_BUILD_DIR", str(tmp_path / "build"))
    built = []
    ext = types.SimpleNamespace(__file__=str(tmp_path / "build" / "ext.so"))
    monkeypatch.setattr(_ext, "_jit_build", lambda bdir: (built.append(bdir), ext)[1])
    monkeypatch.setattr(mod, "check_calls", lambda e: [] if e is ext else ["another ext"])
    monkeypatch.setattr(mod, "check_plans", lambda e: (3, []))
    assert mod.main() == 0, capsys.readouterr().out
    assert built == [tmp_path / "build"] and (tmp_path / "build").is_dir()
    assert "plans: 3/3 equal to plan.py" in capsys.readouterr().out
    monkeypatch.setattr(_ext, "_ready_build_dir", lambda: (None, "no room"))
    assert mod.main() == 1
    assert "cannot build: no room" in capsys.readouterr().out


# ------------------------------------------------------------------ what a build is made from
@pytest.mark.parametrize("value,kept,dropped", [
    ("7.5 8.0 8.6 9.0+PTX", ["8.0", "8.6", "9.0+PTX"], ["7.5"]),
    ("8.0;9.0a", ["8.0", "9.0a"], []),
    ("Turing;Ampere;Hopper+PTX", ["Ampere", "Hopper+PTX"], ["Turing"]),
    ("6.1;7.0", [], ["6.1", "7.0"]),
    ("Turing+PTX;Ampere", ["Ampere"], ["Turing+PTX"]),  # +PTX does not make an old arch new
    ("Volta+Tegra;9.0", ["9.0"], ["Volta+Tegra"]),  # sm_72
])
def test_arch_list_keeps_what_the_kernels_can_be_built_for(value, kept, dropped):
    from fused_rnn.ops.cuda.buildinfo import filter_arch_list

    assert filter_arch_list(value) == (kept, dropped)


def test_an_arch_list_older_than_sm80_is_filtered_or_explained(monkeypatch):
    """nvcc fails the whole build on an sm_75 entry (no TF32 WMMA, no bf16): it is left out of
    the build's list, and a list with nothing newer is explained before building."""
    monkeypatch.delenv("FUSED_RNN_CUDA_BUILD_DIR", raising=False)  # it would name the directory
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5 8.0 9.0+PTX")
    assert _ext.build_arch_list() == ("8.0;9.0+PTX", ["7.5"])
    assert "8.0_9.0+PTX" in _ext.build_dir().name
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;7.5")
    why = _ext.jit_obstacle()
    assert why and "names no architecture the kernels support" in why


def test_unset_arch_list_skips_a_visible_gpu_older_than_sm80(monkeypatch):
    """Unset, torch builds for every visible GPU; an sm_75 one beside an H100 would fail the
    build for both, so the list becomes the sm_80+ ones."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    caps = {0: (7, 5), 1: (9, 0), 2: (8, 0)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    assert _ext.build_arch_list() == ("8.0;9.0+PTX", ["7.5"])
    caps[0] = (8, 6)
    assert _ext.build_arch_list() == (None, [])  # torch's own default


def test_the_machine_check_does_not_judge_gpu0_and_a_device_check_judges_its_gpu(monkeypatch):
    """With an sm_75 GPU 0 and an H100 as GPU 1, the backend is available on GPU 1."""
    caps = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    assert _ext._platform_obstacle(None) is None
    assert _ext._platform_obstacle(torch.device("cuda", 1)) is None
    why = _ext._platform_obstacle(torch.device("cuda", 0))
    assert why and "GPU 0 has compute capability 7.5" in why
    # no sm_80+ GPU at all: the machine's answer says so before any build (nvcc would fail
    # one for sm_75 with a hundred errors)
    caps[1] = (7, 0)
    assert _ext._platform_obstacle(None) == (
        "no visible GPU has compute capability 8.0 or newer (GPU 0: 7.5, GPU 1: 7.0); the "
        "kernels need it (bf16 tensor cores, cooperative launch as used here)")


def test_a_gpu_the_build_has_no_code_for_gets_a_reason(monkeypatch):
    """A build without the device's architecture (TORCH_CUDA_ARCH_LIST="8.0" on an H100) loads,
    then every launch would fail: the binding's kernel_image probe says so first, per device,
    and the backend falls back with the reason."""
    import types

    calls = []

    def kernel_image(index):
        calls.append(index)
        return [209, 0, 0] if index == 1 else [0, 90, 90]  # cudaErrorNoKernelImageForDevice

    fake = types.SimpleNamespace(kernel_image=kernel_image, __name__="fake_ext")
    monkeypatch.setattr(_ext, "_platform_obstacle", lambda device: None)
    monkeypatch.setattr(_ext, "_ext", fake)
    monkeypatch.setattr(_ext, "_failure", None)
    monkeypatch.setattr(_ext, "_images", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (10, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _ext.unavailable_reason(None) is None  # the machine: its current GPU
    assert _ext.unavailable_reason(torch.device("cuda", 0)) is None
    why = _ext.unavailable_reason(torch.device("cuda", 1))
    assert why and "holds no code for GPU 1 (compute capability 10.0" in why
    assert "TORCH_CUDA_ARCH_LIST" in why
    assert _ext.unavailable_reason(torch.device("cuda", 1)) == why
    assert calls == [0, 1], "probed once per device"
    # with GPU 1 current, the machine's answer is GPU 1's (backend_report(), no device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _ext.unavailable_reason(None) == why
    assert _ext.extension() is fake, "a loaded extension is returned as it is"


def test_a_prebuilt_extension_from_other_sources_is_not_used(monkeypatch):
    """An ahead-of-time .so left in an editable checkout across a git pull was built from other
    csrc/: it is refused with a warning (and built again just in time); one built from these
    sources is used."""
    import types

    from fused_rnn.ops.cuda.buildinfo import source_hash

    mod = types.SimpleNamespace(source_hash="h0123456789abcdef", __file__="/x/_cuda_ext.so",
                                torch_version=_ext._torch_release())
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: mod)
    with pytest.warns(RuntimeWarning, match="built from other sources"):
        assert _ext._prebuilt() is None
    mod.source_hash = source_hash(CSRC)
    assert _ext._prebuilt() is mod


@pytest.mark.parametrize("with_sources", [True, False])
def test_a_prebuilt_extension_for_another_torch_is_not_used(monkeypatch, with_sources):
    """torch's C++ ABI changes between releases, so a .so that still imports after torch was
    upgraded may corrupt memory: a prebuilt extension for another torch release (or one that
    does not say) is refused with a warning naming both, with or without csrc/ to build from."""
    from fused_rnn.ops.cuda.buildinfo import source_hash

    running = _ext._torch_release()
    mod = types.SimpleNamespace(source_hash=source_hash(CSRC), __file__="/x/_cuda_ext.so",
                                torch_version=(running[0], running[1] + 1, 0))
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: mod)
    if not with_sources:
        monkeypatch.setattr(_ext, "sources_dir", lambda: None)
    then = "building just in time instead" if with_sources else "it is not used"
    want = (f"built against torch {running[0]}.{running[1] + 1}.0, not this torch "
            f"{torch.__version__}; {then}")
    with pytest.warns(RuntimeWarning, match=re.escape(want)):
        assert _ext._prebuilt() is None
    del mod.torch_version
    with pytest.warns(RuntimeWarning, match="built against an unknown torch"):
        assert _ext._prebuilt() is None
    mod.torch_version = running
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext._prebuilt() is mod


def test_a_prebuilt_extension_that_fails_to_load_is_reported(monkeypatch):
    """A prebuilt .so that no longer loads (an undefined symbol after a torch upgrade) is
    rebuilt just in time with a warning that says why; one that is not installed is silence."""

    def broken(name):
        raise ImportError(f"{name}: undefined symbol: _ZN3c106detail14torchCheckFail")

    monkeypatch.setattr(_ext.importlib, "import_module", broken)
    with pytest.warns(RuntimeWarning, match="cannot be loaded .*undefined symbol"):
        assert _ext._prebuilt() is None

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_ext.importlib, "import_module", missing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext._prebuilt() is None


def test_source_hash_follows_every_source_and_header(tmp_path):
    from fused_rnn.ops.cuda.buildinfo import HEADERS, SOURCES, source_hash

    shutil.copytree(CSRC, tmp_path / "csrc")
    base = source_hash(tmp_path / "csrc")
    assert base == source_hash(CSRC) and base.startswith("h") and len(base) == 17
    for name in SOURCES + HEADERS:
        f = tmp_path / "csrc" / name
        text = f.read_text()
        f.write_text(text + "\n")
        assert source_hash(tmp_path / "csrc") != base, name
        f.write_text(text)


def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    """torch's loader waits without a timeout while its lock file exists; a builder killed
    mid-build leaves it. Under fused_rnn's flock no live builder holds it, so it is removed
    (with a warning) and the build proceeds."""
    (tmp_path / "lock").write_text("")
    with pytest.warns(RuntimeWarning, match="did not finish"), _ext._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    with _ext._build_lock(tmp_path):  # nothing left behind, nothing to say
        pass


def test_a_warning_made_an_error_stops_one_build_and_is_not_kept_as_a_failure(tmp_path,
                                                                               monkeypatch):
    """Under an "error" filter the leftover lock file is still removed (the next build finds
    nothing in its way), and the loader passes the warning on rather than keeping it as the
    reason the backend is unavailable for the rest of the process."""
    (tmp_path / "lock").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="did not finish"), _ext._build_lock(tmp_path):
            pytest.fail("the build ran under an error filter")
    assert not (tmp_path / "lock").exists()

    def build(bdir):
        warnings.warn("a compiler notice", UserWarning)
        return types.ModuleType("built")

    monkeypatch.setattr(_ext, "_prebuilt", lambda: None)
    monkeypatch.setattr(_ext, "jit_obstacle", lambda: None)
    monkeypatch.setattr(_ext, "_jit_build", build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="a compiler notice"):
            _ext._load()
    with pytest.warns(UserWarning):
        mod, failure, final = _ext._load()
    assert mod.__name__ == "built" and failure is None and final


def test_the_build_lock_excludes_another_process(tmp_path):
    """A second process waits for the first builder's flock, and gets it once released."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fused_rnn.ops.cuda import _ext\n"
        "print('waiting', flush=True)\n"
        "with _ext._build_lock(Path(sys.argv[1])):\n"
        "    print(time.time(), flush=True)\n"
    )
    with _ext._build_lock(tmp_path):
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(1.0)
        assert proc.poll() is None, "the second builder did not wait"
        released = time.time()
    got = float(proc.stdout.readline())
    assert proc.wait(timeout=60) == 0 and got >= released


def test_build_dir_is_per_python_and_sources(monkeypatch, tmp_path):
    """The JIT cache key also holds the Python version and the sources' hash: an edited csrc/
    gets a fresh build directory instead of ninja's view of a stale one."""
    from fused_rnn.ops.cuda.buildinfo import source_hash

    monkeypatch.delenv("FUSED_RNN_CUDA_BUILD_DIR", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    d = _ext.build_dir().name
    assert f"py{sys.version_info[0]}{sys.version_info[1]}-" in d
    assert d.endswith(source_hash(CSRC))
    shutil.copytree(CSRC, tmp_path / "csrc")
    (tmp_path / "csrc" / "plan.h").write_text((CSRC / "plan.h").read_text() + "\n")
    monkeypatch.setattr(_ext, "sources_dir", lambda: tmp_path / "csrc")
    assert _ext.build_dir().name != d


def test_the_build_sets_the_filtered_arch_list_and_restores_it(monkeypatch):
    """During the build TORCH_CUDA_ARCH_LIST is the sm_80+ list (with a warning naming what was
    dropped); afterwards the user's value, or its absence, is back."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.0")
    with pytest.warns(RuntimeWarning, match="for 8.0 only: 7.5 predate"), \
            _ext._arch_list_for_build():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5;8.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    caps = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    with pytest.warns(RuntimeWarning, match="for 9.0\\+PTX only"), \
            _ext._arch_list_for_build():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    caps[1] = (7, 0)  # nothing sm_80+ visible: torch's default, nothing to drop
    assert _ext.build_arch_list() == (None, [])


def test_a_newer_nvcc_than_torchs_cuda_is_explained(monkeypatch):
    """The major versions must agree either way: nvcc 13 with a CUDA 12 torch is refused too;
    the same major with another minor is not."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_ext, "_find_nvcc", lambda: "/opt/fake/nvcc")
    monkeypatch.setattr(_ext, "_find_cxx", lambda: "/usr/bin/c++")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_ext, "_nvcc_version", lambda nvcc: (13, 0))
    why = _ext.jit_obstacle()
    assert why and "nvcc 13.0" in why and "CUDA 12.8" in why
    monkeypatch.setattr(_ext, "_nvcc_version", lambda nvcc: (12, 4))
    assert "does not match" not in (_ext.jit_obstacle() or "")


def test_a_prebuilt_extension_without_sources_to_compare_is_used(monkeypatch):
    """A wheel without csrc/ next to the package has nothing to build from: its prebuilt
    extension is used as it is (no source hash check)."""
    mod = types.SimpleNamespace(source_hash="h0123456789abcdef", __file__="/x/_cuda_ext.so",
                                torch_version=_ext._torch_release())
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: mod)
    monkeypatch.setattr(_ext, "sources_dir", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext._prebuilt() is mod


def test_platform_check_takes_sm80_and_newer(monkeypatch):
    """sm_80 (A100) is the minimum: 8.0 and 8.6 pass, 7.5 gets the capability reason."""
    caps = {0: (8, 0), 1: (8, 6), 2: (7, 5)}
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    assert _ext._platform_obstacle(torch.device("cuda", 0)) is None
    assert _ext._platform_obstacle(torch.device("cuda", 1)) is None
    why = _ext._platform_obstacle(torch.device("cuda", 2))
    assert why and "GPU 2 has compute capability 7.5; the kernels need 8.0" in why
    why = _ext._platform_obstacle(torch.device("cpu"))
    assert why and "not cpu" in why
