"""The TF32 mma path's register layouts (``csrc/warp_mma.cuh``, rnn_common.cuh ``MmaTf32Ops``).

``tests/cuda/warp_mma_check.cu`` multiplies small integers (exact in TF32) through ldmatrix,
mma.sync and the kernels' own tile loops and compares them with a plain matmul. Here it runs on
cudasim, whose ldmatrix and mma.sync are warp collectives in the PTX ISA's layouts; it is shown
to fail where the kernels' lane arithmetic or cudasim's model of the instructions is wrong; it
compiles with nvcc; and on a GPU (``gpu`` mark) it runs there, which checks cudasim's model
against the hardware. cudasim's rules for warp collectives (every lane reaches the same one) are
checked with two small broken kernels, and its refusal of a .shared fragment outside shared
memory with a third."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_cuda_compile import NVCC
from test_microbench import FLAGS, GXX, SIM

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CHECK = Path(__file__).with_name("warp_mma_check.cu")
CHECKS = ("ldmatrix", "mma", "tiles")

needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not on PATH (needed for cudasim)")


def _build(tmp: Path, source: Path, csrc: Path = CSRC, sim: Path = SIM) -> Path:
    """The program against cudasim (its runtime from `sim`, the kernels' headers from `csrc`)."""
    flags = [f if not f.startswith("-I") else f.replace(str(SIM), str(sim)) for f in FLAGS]
    exe = tmp / "check"
    subprocess.run([GXX, *flags, f"-I{csrc}", "-x", "c++", str(source), "-x", "none",
                    str(sim / "runtime.cpp"), "-o", str(exe), "-lpthread"], check=True,
                   capture_output=True, text=True)
    return exe


def _run(exe: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, check=False)


def _lines(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines() if line.strip()}


@needs_gxx
def test_the_layouts_hold_on_cudasim(tmp_path):
    r = _run(_build(tmp_path, CHECK))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _lines(r.stdout)
    assert set(lines) == set(CHECKS), r.stdout
    assert all(" ok (" in line for line in lines.values()), r.stdout


def _mutant_tree(tmp: Path, root: Path, rel: str, old: str, new: str) -> Path:
    """A copy of `root` with `old` replaced once by `new` in file `rel`."""
    copy = tmp / root.name
    shutil.copytree(root, copy)
    path = copy / rel
    text = path.read_text()
    assert text.count(old) == 1, (rel, old)
    path.write_text(text.replace(old, new))
    return copy


# (where: "csrc" or "sim", file, old, new, the check that must fail)
MUTANTS = {
    # The kernels: A's four 8 x 4 matrices in the other order (a1 <-> a2).
    "a-matrix-order": ("csrc", "rnn_common.cuh",
                       "(i + (j & 1) * 8) * 8 + ((j >> 1) ^ (i >> 2)) * 4",
                       "(i + (j >> 1) * 8) * 8 + ((j & 1) ^ (i >> 2)) * 4", "tiles"),
    # The kernels: A read without the swizzle the W slice is stored with, and the swizzle
    # applied to the wrong rows when the slice is stored.
    "a-unswizzled": ("csrc", "rnn_common.cuh", "((j >> 1) ^ (i >> 2)) * 4", "(j >> 1) * 4",
                     "tiles"),
    "w-swizzle-rows": ("csrc", "rnn_common.cuh", "(swizzle ? r & 4 : 0)",
                       "(swizzle ? (r >> 1) & 4 : 0)",
                       "tiles"),
    # The kernels: B's matrices with k and the column half swapped (b1 of columns 0-7 <->
    # b0 of columns 8-15).
    "b-matrix-order": ("csrc", "rnn_common.cuh",
                       "(i + (j >> 1) * 8) * ldx + kk * 8 + (j & 1) * 4",
                       "(i + (j & 1) * 8) * ldx + kk * 8 + (j >> 1) * 4", "tiles"),
    # The kernels: the accumulator's columns as if a lane held 2 consecutive rows.
    "c-columns": ("csrc", "rnn_common.cuh",
                  "return (size_t)(g + (q >> 1) * 8) * ld + h * 8 + 2 * t + (q & 1);",
                  "return (size_t)(g + (q & 1) * 8) * ld + h * 8 + 2 * t + (q >> 1);",
                  "tiles"),
    # cudasim's mma.sync: a1 and a2 swapped in its model of the A fragment.
    "sim-mma-a": ("sim", "include/cudasim.h",
                  "A[gl + 8][tl] = f(all[l].a[1]);\n    A[gl][tl + 4] = f(all[l].a[2]);",
                  "A[gl + 8][tl] = f(all[l].a[2]);\n    A[gl][tl + 4] = f(all[l].a[1]);", "mma"),
    # cudasim's ldmatrix: lane 4g + t given row t, word g.
    "sim-ldmatrix": ("sim", "include/cudasim.h", "r[j] = all[8 * j + lane / 4].row[lane % 4];",
                     "r[j] = all[8 * j + lane % 4].row[lane / 4 % 4];", "ldmatrix"),
}


@needs_gxx
@pytest.mark.parametrize("name", list(MUTANTS))
def test_a_wrong_layout_fails_the_check(tmp_path, name):
    where, rel, old, new, fails = MUTANTS[name]
    if where == "csrc":
        exe = _build(tmp_path, CHECK, csrc=_mutant_tree(tmp_path, CSRC, rel, old, new))
    else:
        exe = _build(tmp_path, CHECK, sim=_mutant_tree(tmp_path, SIM, rel, old, new))
    r = _run(exe)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = _lines(r.stdout)
    assert "FAIL" in lines[fails], r.stdout


_MISUSE = r"""
#include <cstdio>
#include "rnn_common.cuh"
namespace d = fused_rnn::detail;
__global__ void kernel(float* out) {
  const unsigned lane = threadIdx.x % 32;
  const float* row = reinterpret_cast<const float*>(d::dynamic_smem()) + (lane % 16) * 4;
  unsigned r[2] = {0, 0};
  unsigned (&r1)[1] = reinterpret_cast<unsigned (&)[1]>(r);
  if (MISUSE == 0 && lane < 16) {
    d::ldmatrix<1>(r1, row);
  } else if (MISUSE == 1) {
    if (lane < 16) d::ldmatrix<1>(r1, row);
    else d::ldmatrix<2>(r, row);
  }
  out[threadIdx.x] = static_cast<float>(r[0]);
}
int main() {
  float* out = nullptr;
  cudaMalloc(&out, 64 * sizeof(float));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1);
  cfg.blockDim = dim3(64);
  cfg.dynamicSmemBytes = 1024;
  cudaLaunchKernelEx(&cfg, kernel, out);
  const cudaError_t e = cudaDeviceSynchronize();
  std::printf("%s\n", e == cudaSuccess ? "success" : cudaGetErrorString(e));
  return 0;
}
"""


@needs_gxx
@pytest.mark.parametrize("misuse,message", [
    (0, "waits in ldmatrix.x1, which not every lane of its warp reaches: a deadlock on a GPU"),
    (1, "lanes in two different warp collectives at once (ldmatrix.x1 and ldmatrix.x2)")])
def test_cudasim_refuses_a_collective_not_every_lane_reaches(tmp_path, misuse, message):
    """On a GPU a .sync.aligned instruction that some lanes skip, or two different ones, hangs or
    is undefined; cudasim fails the launch with the reason."""
    src = tmp_path / "misuse.cu"
    src.write_text(f"#define MISUSE {misuse}\n" + _MISUSE)
    r = _run(_build(tmp_path, src))
    assert r.returncode == 0, r.stdout + r.stderr
    assert message in r.stdout, r.stdout


_CONFLICTS = r"""
#include <cstdio>
#include "rnn_common.cuh"
namespace d = fused_rnn::detail;
__global__ void kernel(int stride) {
  // Lane l's row (of matrix l / 8, row l % 8) is 16 bytes at l % 8 * stride, plus 512 bytes a
  // matrix past the first.
  const unsigned lane = threadIdx.x % 32;
  unsigned r[4];
  d::ldmatrix<4>(r, d::dynamic_smem() + lane / 8 * 512 + lane % 8 * stride);
}
int main() {
  for (int stride : {16, 32, 64, 128, 144, 0, 48}) {
    const long long before = cudasim::ldmatrix_count(true);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(1);
    cfg.blockDim = dim3(32);
    cfg.dynamicSmemBytes = 4096;
    cudaLaunchKernelEx(&cfg, kernel, stride);
    if (cudaDeviceSynchronize() != cudaSuccess) return 1;
    std::printf("%d %lld\n", stride, cudasim::ldmatrix_count(true) - before);
  }
  return 0;
}
"""


@needs_gxx
def test_cudasim_counts_the_bank_conflicts_of_ldmatrix(tmp_path):
    """cudasim's wavefront count (cudasim.h ldmatrix_wavefronts, which test_cuda_sim.py holds the
    mma path's loads to): a matrix's 8 rows of 16 bytes take one pass unless distinct rows share
    a 16-byte bank group. Rows 16 or 144 bytes apart: 1 pass a matrix; 32: 2; 64: 4; 128: 8
    (every row in one group); one address for all 8 rows: 1 (a broadcast); 48 bytes (3 groups
    apart, odd): 1. Four matrices an ldmatrix.x4."""
    src = tmp_path / "conflicts.cu"
    src.write_text(_CONFLICTS)
    r = _run(_build(tmp_path, src))
    assert r.returncode == 0, r.stdout + r.stderr
    got = dict(line.split() for line in r.stdout.splitlines())
    want = {16: 1, 32: 2, 64: 4, 128: 8, 144: 1, 0: 1, 48: 1}
    assert {int(k): int(v) for k, v in got.items()} == {k: 4 * v for k, v in want.items()}


_SHARED_FORMS = r"""
#include <cstdio>
#include "rnn_common.cuh"
namespace d = fused_rnn::detail;
namespace wmma = nvcuda::wmma;
constexpr int kSmem = 4096;  // bytes: 2048 bf16, 1024 floats
// One fragment through a .shared form (rnn_common.cuh frag_load / acc_load / acc_store), its
// first element `at` elements into the block's shared memory.
__global__ void kernel(int form, int at) {
  auto* h = reinterpret_cast<__nv_bfloat16*>(d::dynamic_smem()) + at;
  auto* f = reinterpret_cast<float*>(d::dynamic_smem()) + at;
  wmma::fragment<wmma::matrix_a, 8, 32, 16, __nv_bfloat16, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 8, 32, 16, __nv_bfloat16, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 8, 32, 16, float> c;
  wmma::fill_fragment(c, 0.0f);
  if (form == 0) d::frag_load<true>(a, h, 16);
  if (form == 1) d::frag_load<true>(b, h, 16);
  if (form == 2) d::acc_load<true>(c, f, 40);
  if (form == 3) d::acc_store<true>(f, c, 40);
}
int main() {
  // (form, at): each form's last element at the end of shared memory, one element further,
  // and one element before its start. A: 8 x 16 row-major, ld 16 (128 elements spanned); B:
  // 16 x 32 column-major, ld 16 (a column of 16 a stride: 512); C: 8 x 32 row-major, ld 40
  // (312 floats).
  const int cases[][2] = {{0, 1920}, {0, 1921}, {0, -1}, {1, 1536}, {1, 1537}, {1, -1},
                          {2, 712}, {2, 713}, {2, -1}, {3, 712}, {3, 713}, {3, -1}};
  for (const auto& k : cases) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(1);
    cfg.blockDim = dim3(32);
    cfg.dynamicSmemBytes = kSmem;
    cudaLaunchKernelEx(&cfg, kernel, k[0], k[1]);
    const cudaError_t e = cudaDeviceSynchronize();
    std::printf("%d %d %s\n", k[0], k[1], e == cudaSuccess ? "ok" : cudaGetErrorString(e));
  }
  return 0;
}
"""


@needs_gxx
def test_cudasim_refuses_a_shared_fragment_outside_shared_memory(tmp_path):
    """The .shared forms of wmma.load and wmma.store (rnn_common.cuh frag_load) read or write
    other shared memory on a GPU where an element lies outside the block's; cudasim fails the
    launch instead. A fragment whose last element is the last of shared memory passes; one
    element further, or one before the start, fails, for a row-major and a column-major operand
    and an accumulator's load and store (cudasim checks each fragment's span, its first and
    last element: their order differs by layout)."""
    src = tmp_path / "shared_forms.cu"
    src.write_text(_SHARED_FORMS)
    r = _run(_build(tmp_path, src))
    assert r.returncode == 0, r.stdout + r.stderr
    got = {tuple(map(int, line.split()[:2])): line.split(maxsplit=2)[2]
           for line in r.stdout.splitlines()}
    what = ["wmma.load .shared", "wmma.load .shared", "wmma.load.c .shared",
            "wmma.store.d .shared"]
    bytes_ = [256, 1024, 1248, 1248]
    fits = {0: 1920, 1: 1536, 2: 712, 3: 712}
    assert len(got) == 12, r.stdout
    for (form, at), line in got.items():
        if at == fits[form]:
            assert line == "ok", (form, at, line)
        else:
            assert line.startswith(f"{what[form]}: the {bytes_[form]} bytes at "), (form, at, line)
            assert "are not all in this block's dynamic shared memory (4096 bytes at" in line, line


@pytest.mark.parametrize("arch", ["80", "90"])
def test_the_check_compiles_for_the_gpus(tmp_path, arch):
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): cannot compile-check warp_mma_check.cu")
    cmd = [NVCC, "-std=c++20", f"-arch=sm_{arch}", "-Werror", "all-warnings", f"-I{CSRC}",
           str(CHECK), "-o", str(tmp_path / "check")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_layouts_hold_on_this_gpu(tmp_path):
    """The same program on the GPU: where cudasim's model of ldmatrix or mma.sync differs from
    the hardware, or the kernels' lane arithmetic only agrees with the model, this fails."""
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME): cannot build warp_mma_check.cu")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip(f"mma.sync TF32 needs sm_80, this GPU is sm_{major}{minor}")
    exe = tmp_path / "check"
    subprocess.run([NVCC, "-std=c++20", f"-arch=sm_{major}{minor}", f"-I{CSRC}", str(CHECK),
                    "-o", str(exe)], check=True, capture_output=True, text=True, timeout=600)
    r = _run(exe)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(_lines(r.stdout)) == set(CHECKS), r.stdout
