"""Finding, building and loading the compiled CUDA extension.

Two ways to get it:

* ahead of time: ``FUSED_RNN_BUILD_CUDA=1 pip install --no-build-isolation -e .`` builds
  ``fused_rnn._cuda_ext`` (setup.py; torch must already be installed, hence no isolation);
* otherwise just in time, on the first use of the CUDA backend on a GPU machine:
  ``torch.utils.cpp_extension.load`` compiles ``csrc/`` with ninja into a build directory that
  is specific to the torch version, its CUDA version, the Python version and the target
  architectures, so a cache is never reused across them. One build serves every shape (shapes
  are runtime arguments). torch's loader holds a file lock (baton) in the build directory, so
  two processes starting at once build it once. ``FUSED_RNN_CUDA_BUILD_DIR`` overrides the
  directory (default ``~/.cache/fused_rnn/cuda_ext/<versions>``); ``FUSED_RNN_CUDA_VERBOSE=1``
  shows the compiler output.

Nothing here raises at import: every obstacle (CPU-only torch, no GPU, no nvcc, no host C++
compiler, mismatched CUDA versions, an empty ``TORCH_CUDA_ARCH_LIST``, a failed build) becomes a
sentence returned by :func:`unavailable_reason`, and :func:`extension` raises it as a
``RuntimeError``.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

SOURCES = ("binding.cpp", "rnn_forward.cu", "rnn_backward.cu")
HEADERS = ("plan.h", "fused_rnn.h", "rnn_common.cuh")
PREBUILT = "fused_rnn._cuda_ext"
JIT_NAME = "fused_rnn_cuda_ext"
NVCC_FLAGS = ("-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo")
CXX_FLAGS = ("-O3", "-std=c++20")
BUILD_HINT = (
    "build it ahead of time with `FUSED_RNN_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
    "or install a CUDA toolkit matching torch so it can be built on first use"
)

_lock = threading.Lock()
_ext: ModuleType | None = None
_failure: str | None = None  # why loading failed (cached: a failed build is not retried)


def sources_dir() -> Path | None:
    """The directory holding ``csrc/`` sources: the repository's top-level ``csrc/`` (checkout,
    editable install) or ``fused_rnn/csrc/`` (a wheel; setup.py copies the sources there)."""
    pkg = Path(__file__).resolve().parents[2]  # .../fused_rnn
    for cand in (pkg.parent / "csrc", pkg / "csrc"):
        if all((cand / f).is_file() for f in SOURCES + HEADERS):
            return cand
    return None


def _arch_tag() -> str:
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        return "arch" + re.sub(r"[^0-9A-Za-z.+]+", "_", arch)
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "sm" + "_".join(f"{a}{b}" for a, b in caps)


def build_dir() -> Path:
    """Per torch/CUDA/Python/architecture build directory for the JIT build."""
    override = os.environ.get("FUSED_RNN_CUDA_BUILD_DIR")
    if override:
        return Path(override)
    tag = (
        f"torch{torch.__version__}-cu{torch.version.cuda}-"
        f"py{sys.version_info[0]}{sys.version_info[1]}-{_arch_tag()}"
    )
    tag = re.sub(r"[^0-9A-Za-z.+_-]+", "_", tag)
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "fused_rnn" / "cuda_ext" / tag


def _nvcc_version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _find_nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home:
        cand = Path(home) / "bin" / "nvcc"
        if cand.is_file():
            return str(cand)
    return shutil.which("nvcc")


def _find_cxx() -> str | None:
    """The host C++ compiler torch's JIT build runs (``$CXX``, default ``c++``), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def jit_obstacle() -> str | None:
    """Why a JIT build cannot even start here, or None."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch is not None and not arch.strip():
        return (
            "TORCH_CUDA_ARCH_LIST is set but empty, so there is no architecture to compile for; "
            "unset it (to target the visible GPUs) or set it, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0'"
        )
    if sources_dir() is None:
        return f"the CUDA sources ({', '.join(SOURCES)}) were not found next to the package"
    nvcc = _find_nvcc()
    if nvcc is None:
        return f"nvcc was not found (set CUDA_HOME or put nvcc on PATH), so the extension cannot be JIT-built; {BUILD_HINT}"
    ver = _nvcc_version(nvcc)
    torch_cuda = torch.version.cuda
    if ver is not None and torch_cuda is not None:
        t_major = int(torch_cuda.split(".")[0])
        if ver[0] != t_major:
            return (
                f"nvcc {ver[0]}.{ver[1]} ({nvcc}) does not match the CUDA {torch_cuda} this torch "
                f"was built with (the major versions must agree); {BUILD_HINT}"
            )
    if _find_cxx() is None:
        return (
            f"no host C++ compiler: {os.environ.get('CXX', 'c++')!r} (from $CXX, default c++) is "
            f"not on PATH, and both the binding and nvcc need one; install g++ or set CXX; "
            f"{BUILD_HINT}"
        )
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return f"ninja is not installed (pip install ninja), so the extension cannot be JIT-built; {BUILD_HINT}"
    return None


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    src = sources_dir()
    assert src is not None
    bdir = build_dir()
    bdir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=JIT_NAME,
        sources=[str(src / f) for f in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        build_directory=str(bdir),
        verbose=os.environ.get("FUSED_RNN_CUDA_VERBOSE", "0") == "1",
    )


def _platform_obstacle(device: torch.device | None) -> str | None:
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); the "
            "CUDA backend needs a CUDA build of torch and an NVIDIA GPU"
        )
    if device is not None and device.type != "cuda":
        return f"the CUDA kernels run on CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    index = 0 if device is None or device.index is None else device.index
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (
            f"GPU {index} has compute capability {major}.{minor}; the kernels need 8.0 or newer "
            "(bf16 tensor cores, cooperative launch as used here)"
        )
    return None


def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(PREBUILT), None
    except ImportError:
        pass
    obstacle = jit_obstacle()
    if obstacle is not None:
        return None, obstacle
    try:
        return _jit_build(), None
    except Exception as e:  # noqa: BLE001 -- a failed build becomes a reason, not a crash
        lines = str(e).strip().splitlines()
        tail = "\n".join(lines[-15:])
        return None, (
            f"the JIT build of the CUDA extension in {build_dir()} failed "
            f"(FUSED_RNN_CUDA_VERBOSE=1 shows the compiler output):\n{tail}"
        )


def unavailable_reason(device: torch.device | None) -> str | None:
    """None when the CUDA kernels can run on ``device`` (None: on this machine), else why not.

    On a GPU machine the first call loads the prebuilt extension or JIT-builds it (minutes the
    first time, cached afterwards)."""
    global _ext, _failure
    obstacle = _platform_obstacle(device)
    if obstacle is not None:
        return obstacle
    with _lock:
        if _ext is None and _failure is None:
            _ext, _failure = _load()
    return _failure


def extension() -> ModuleType:
    """The loaded extension; ``RuntimeError`` with the reason and how to fix it otherwise."""
    reason = unavailable_reason(None)
    if reason is not None:
        raise RuntimeError(f"fused_rnn CUDA backend is unavailable: {reason}")
    assert _ext is not None
    return _ext
