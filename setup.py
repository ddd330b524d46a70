"""Packaging for fused_rnn.

``pip install -e .`` is pure Python: it needs no GPU and no nvcc. The CUDA extension is built
ahead of time only when asked (see the README); otherwise it is JIT-built on first use.

Building the CUDA extension ahead of time (torch must already be installed, hence no build
isolation, so the environment needs setuptools, wheel and ninja too; TORCH_CUDA_ARCH_LIST
picks the architectures, e.g. "8.0;9.0")::

    pip install setuptools wheel ninja
    FUSED_RNN_BUILD_CUDA=1 pip install --no-build-isolation -e .

This compiles csrc/ into ``fused_rnn._cuda_ext``. Without the flag nothing here imports torch.
"""

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"  # top-level, next to this file (paths relative, as setuptools wants)
RUFF_VERSION = "0.17.6"  # the linter tests/test_lint.py runs (the "test" extra installs it)


class BuildPyWithCsrc(build_py):
    """Copy csrc/'s sources (buildinfo.SOURCES and HEADERS, what the JIT build compiles and
    hashes) into the built package as fused_rnn/csrc/, where an installed (non-editable)
    package finds them to JIT-build the CUDA extension (fused_rnn/ops/cuda/_ext.py). Editable
    installs read the top-level csrc/ directly."""

    def run(self):
        super().run()
        src = ROOT / CSRC
        if self.dry_run or not src.is_dir():
            return
        info = _buildinfo()
        dst = Path(self.build_lib) / "fused_rnn" / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for name in (*info.SOURCES, *info.HEADERS):
            shutil.copy2(src / name, dst / name)


def _buildinfo():
    """fused_rnn/ops/cuda/buildinfo.py, loaded by path (the package cannot be imported yet)."""
    import importlib.util

    path = ROOT / "fused_rnn" / "ops" / "cuda" / "buildinfo.py"
    spec = importlib.util.spec_from_file_location("fused_rnn_buildinfo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_extension():
    """(ext_modules, cmdclass) for the ahead-of-time CUDA build, or nothing without the flag."""
    flag = os.environ.get("FUSED_RNN_BUILD_CUDA", "0")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FUSED_RNN_BUILD_CUDA={flag!r}: 1 builds the CUDA extension ahead of "
                         "time, 0 (or empty, or unset) does not")
    if flag != "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:  # pip's build isolation hides the environment's torch
        raise SystemExit(
            f"FUSED_RNN_BUILD_CUDA=1 builds against the installed torch, which this build "
            f"cannot import ({e}): install torch first and build without isolation, "
            "FUSED_RNN_BUILD_CUDA=1 pip install --no-build-isolation -e .") from None

    if torch.version.cuda is None:
        raise SystemExit(f"FUSED_RNN_BUILD_CUDA=1: torch {torch.__version__} is a CPU-only "
                         "build, and the CUDA extension builds against a CUDA build of torch")
    info = _buildinfo()
    arch = info.arch_list_setting(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if arch is not None:  # the kernels need sm_80+, and nvcc fails the build on older entries
        if not arch.strip():
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST={arch!r} holds only blanks, which torch's "
                             "build cannot read: unset it or set it, e.g. '8.0;9.0'")
        kept, dropped = info.filter_arch_list(arch)
        if not kept:
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST={arch!r}: the CUDA kernels need 8.0 or newer")
    else:  # torch builds for the visible GPUs
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        if not any(c >= info.MIN_ARCH for c in caps):
            raise SystemExit(
                "FUSED_RNN_BUILD_CUDA=1 with TORCH_CUDA_ARCH_LIST unset (or empty, or native) "
                "builds for the visible "
                f"GPUs, and none is sm_80 or newer ({len(caps)} visible): set the list, e.g. "
                "TORCH_CUDA_ARCH_LIST='8.0;9.0'")
        joined, dropped = info.visible_arch_list(caps, info.newest_arch(torch.cuda.get_arch_list()))
        kept = joined.split(";") if joined else []
    if dropped:
        print(f"fused_rnn: building for {';'.join(kept)}, not {', '.join(dropped)} (< 8.0)")
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(kept)
    sources = [f"{CSRC}/{name}" for name in info.SOURCES]  # the JIT build's, which it hashes
    ext = CUDAExtension(
        "fused_rnn._cuda_ext",
        sources=sources,
        include_dirs=[str(ROOT / CSRC)],
        # Same flags as the JIT build (fused_rnn/ops/cuda/_ext.py).
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20", f"-DFRNN_SOURCE_HASH={info.source_hash(ROOT / CSRC)}"],
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


EXT_MODULES, EXT_CMDCLASS = cuda_extension()

setup(
    name="fused_rnn",
    version="0.1.0",
    description="LSTM, GRU and Elman RNN layers on fused Triton/CUDA kernels, drop-in for torch.nn",
    # The README is the project page: what an index shows and `pip show -v` prints.
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fused_rnn", "fused_rnn.*"]),
    package_data={"fused_rnn": ["csrc/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "train": ["matplotlib"],
        # Triton 3.2 to 3.9 pass tests/triton: CI and README command 1 pin 3.6.0, what the lent
        # GPU machines run, whose CPU interpreter needs numpy < 2.4 (DESIGN.md); torch 2.6's
        # CUDA wheels require 3.2.0, 2.9's 3.5.0, 2.13's 3.7.1, 2.14's 3.8.0 and 2.15's 3.9.0,
        # so a narrower pin would make pip replace a GPU machine's torch. 3.9.0's compiler aborts on the persistent
        # LSTM backward, and spills 88 bytes in one step forward variant: the backend avoids
        # both there (ops/triton/launch.py, benchmarks/NOTES.md). Later releases: unchecked.
        # ruff: pinned, since its default rule set (ruff.toml) changes between releases.
        "test": ["pytest", "pytest-xdist", "expecttest", "matplotlib", "triton>=3.2,<3.10",
                 "numpy<2.4", "onnx", "onnxscript", "onnxruntime", f"ruff=={RUFF_VERSION}"],
    },
    entry_points={"console_scripts": ["fused-rnn=fused_rnn.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass={"build_py": BuildPyWithCsrc, **EXT_CMDCLASS},
)
