"""Finding, building and loading the compiled CUDA extension.

Two ways to get it:

* ahead of time: ``FUSED_RNN_BUILD_CUDA=1 pip install --no-build-isolation -e .`` builds
  ``fused_rnn._cuda_ext`` (setup.py; torch must already be installed, hence no isolation);
* otherwise just in time, on the first use of the CUDA backend on a GPU machine:
  ``torch.utils.cpp_extension.load`` compiles ``csrc/`` with ninja into a build directory that
  is specific to the torch version, its CUDA version, the Python version, the target
  architectures and the sources (``buildinfo.source_hash``), so a cache is never reused across
  them. One build serves every shape (shapes are runtime arguments). Two processes starting at
  once build it once: the first holds an ``flock`` on the build directory (released by the
  kernel if the process dies), the second waits for it and loads the result; torch's own lock
  file, left behind by a builder killed mid-build, is removed under that lock instead of
  hanging every later process. ``FUSED_RNN_CUDA_BUILD_DIR`` overrides the directory (default
  ``~/.cache/fused_rnn/cuda_ext/<versions>``); ``FUSED_RNN_CUDA_VERBOSE=1`` shows the compiler
  output.

Only sm_80 and newer are built: older entries of ``TORCH_CUDA_ARCH_LIST`` are dropped with a
warning (nvcc would fail the whole build on them). A prebuilt extension from other sources than
``csrc/`` (a stale ``.so`` in an editable checkout), or against another torch release, or
that no longer loads is refused with a warning and built again;
a GPU the loaded build has no code for gets a reason (the backend is unavailable on it: a
module's call raises that reason, a ``fused_rnn.functional`` call falls back), not a failure
at launch.

Nothing here raises at import: every obstacle (CPU-only torch, no GPU, no nvcc, no host C++
compiler, mismatched CUDA versions, a blank ``TORCH_CUDA_ARCH_LIST``, a failed build) becomes a
sentence returned by :func:`unavailable_reason`, and :func:`extension` raises it as a
``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from fused_rnn.ops.common import ForkSafeLock, warn_at_caller
from fused_rnn.ops.cuda.buildinfo import (
    HEADERS,
    MIN_ARCH,
    SOURCES,
    arch_list_setting,
    filter_arch_list,
    newest_arch,
    source_hash,
    visible_arch_list,
)

PREBUILT = "fused_rnn._cuda_ext"
JIT_NAME = "fused_rnn_cuda_ext"
NVCC_FLAGS = ("-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo")
CXX_FLAGS = ("-O3", "-std=c++20")
BUILD_HINT = (
    "build it ahead of time with `FUSED_RNN_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
    "(after `pip install setuptools wheel ninja`; from a checkout or an unpacked sdist) "
    "or install a CUDA toolkit matching torch so it can be built on first use"
)

# Held across the load (a JIT build: minutes); a forked child gets a fresh one.
_lock = ForkSafeLock()
_ext: ModuleType | None = None
_failure: str | None = None  # why loading failed (cached: a failed build is not retried)
# (the settings it depends on, why no build can start with them): checked again when they change
_obstacle: tuple[tuple, str] | None = None
_images: dict[int, str | None] = {}  # device index -> why the build has no code for it


def sources_dir() -> Path | None:
    """The directory holding ``csrc/`` sources: the repository's top-level ``csrc/`` (checkout,
    editable install) or ``fused_rnn/csrc/`` (a wheel; setup.py copies the sources there)."""
    pkg = Path(__file__).resolve().parents[2]  # .../fused_rnn
    for cand in (pkg.parent / "csrc", pkg / "csrc"):
        if all((cand / f).is_file() for f in SOURCES + HEADERS):
            return cand
    return None


def _visible_caps() -> list[tuple[int, int]]:
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def build_arch_list() -> tuple[str | None, list[str]]:
    """(the ``TORCH_CUDA_ARCH_LIST`` to build with, None for torch's default; the entries left
    out as older than sm_80). Unset (or empty, or "native"), torch builds for every visible
    GPU: if one is older than sm_80, the list is set to the visible sm_80+ ones (the newest
    with PTX, as torch does)."""
    arch = arch_list_setting(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if arch is not None:
        kept, dropped = filter_arch_list(arch)
        return (";".join(kept) if dropped else arch), dropped
    return visible_arch_list(_visible_caps(), newest_arch(torch.cuda.get_arch_list()))


def _arch_tag() -> str:
    arch, _ = build_arch_list()
    if arch:
        return "arch" + re.sub(r"[^0-9A-Za-z.+]+", "_", arch)
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return "sm" + "_".join(f"{a}{b}" for a, b in caps)


def build_dir() -> Path:
    """Per torch/CUDA/Python/architecture/sources build directory for the JIT build."""
    override = os.environ.get("FUSED_RNN_CUDA_BUILD_DIR")
    if override:
        return Path(override).expanduser()
    src = sources_dir()
    tag = (
        f"torch{torch.__version__}-cu{torch.version.cuda}-"
        f"py{sys.version_info[0]}{sys.version_info[1]}-{_arch_tag()}"
        f"-{source_hash(src) if src is not None else 'nosrc'}"
    )
    tag = re.sub(r"[^0-9A-Za-z.+_-]+", "_", tag)
    cache = os.environ.get("XDG_CACHE_HOME")
    if cache and Path(cache).is_absolute():  # the XDG spec: empty or relative is ignored
        root = Path(cache)
    else:
        try:
            root = Path.home() / ".cache"
        except RuntimeError as e:  # no HOME, and no passwd entry for this uid
            raise RuntimeError(
                f"no directory for the CUDA extension's build cache ({e}); set "
                "FUSED_RNN_CUDA_BUILD_DIR (or XDG_CACHE_HOME, or HOME)") from None
    return root / "fused_rnn" / "cuda_ext" / tag


def _nvcc_version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, check=False, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _pytorch_nvcc() -> tuple[str | None, str] | None:
    """Where ``PYTORCH_NVCC`` is set (torch's JIT build then runs that command line as nvcc,
    e.g. ``ccache /usr/local/cuda/bin/nvcc``): (the nvcc it names, found, or None; the
    setting). None where it is unset or blank."""
    raw = os.environ.get("PYTORCH_NVCC", "")
    try:
        words = shlex.split(raw)
    except ValueError:  # unbalanced quotes: no program can be read from it
        return None, raw
    if not words:
        return None
    named = [w for w in words if Path(w).name.startswith("nvcc")] or words[-1:]
    return shutil.which(named[-1]), raw


def _find_nvcc() -> str | None:
    """The nvcc a JIT build would run: ``PYTORCH_NVCC``'s where set, else
    ``$CUDA_HOME/bin/nvcc``, else the one on PATH."""
    from torch.utils import cpp_extension

    override = _pytorch_nvcc()
    if override is not None:
        return override[0]
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
    arch = arch_list_setting(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if arch is not None and not arch.strip():
        return (
            f"TORCH_CUDA_ARCH_LIST={arch!r} holds only blanks, which torch's build cannot read; "
            "unset it (to target the visible GPUs) or set it, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0'"
        )
    if arch is not None and not filter_arch_list(arch)[0]:
        return (
            f"TORCH_CUDA_ARCH_LIST={arch!r} names no architecture the kernels support (they need "
            "8.0 or newer); add one, e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0'"
        )
    if sources_dir() is None:
        return f"the CUDA sources ({', '.join(SOURCES)}) were not found next to the package"
    nvcc = _find_nvcc()
    if nvcc is None and _pytorch_nvcc() is not None:
        return (f"PYTORCH_NVCC={os.environ.get('PYTORCH_NVCC')!r} names no nvcc found on PATH "
                "(torch's JIT build runs it as nvcc); fix it or unset it")
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


@contextlib.contextmanager
def _build_lock(bdir: Path):
    """One builder per build directory across processes: an ``flock`` the kernel releases when
    its holder dies. torch's loader keeps its own lock file (a "baton") in the directory and
    waits, without a timeout, for whoever holds it; a builder killed mid-build (SIGKILL, or a
    SIGTERM from a job's time limit) leaves that file behind, and every later process would
    wait forever. Under our lock no live builder can hold it, so a leftover one is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's baton alone
        yield
        return
    with open(bdir / "fused_rnn_build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            baton = bdir / "lock"
            if baton.exists():
                # Removed before the warning: a filter that makes warnings errors stops this
                # build, and the next one then finds nothing in its way.
                baton.unlink(missing_ok=True)
                warn_at_caller(
                    f"fused_rnn: removed {baton}, left by a build of the CUDA extension that "
                    "did not finish (killed?); building again"
                )
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _arch_list_for_build():
    """``TORCH_CUDA_ARCH_LIST`` as :func:`build_arch_list` says, for the build only."""
    arch, dropped = build_arch_list()
    if dropped:
        warn_at_caller(
            f"fused_rnn: building the CUDA extension for {arch} only: {', '.join(dropped)} "
            "predate the kernels' sm_80 minimum (nvcc would fail the build on them)"
        )
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def _ready_build_dir() -> tuple[Path | None, str | None]:
    """(the JIT build's directory, created, None), or (None, why it cannot be)."""
    try:
        bdir = build_dir()
        bdir.mkdir(parents=True, exist_ok=True)
        (bdir / "fused_rnn_build.lock").touch()
    except (OSError, RuntimeError) as e:
        return None, (f"the CUDA extension cannot be JIT-built: {e}. FUSED_RNN_CUDA_BUILD_DIR "
                      "moves its build directory")
    return bdir, None


def _jit_build(bdir: Path) -> ModuleType:
    from torch.utils import cpp_extension

    src = sources_dir()
    assert src is not None
    with _build_lock(bdir), _arch_list_for_build():
        return cpp_extension.load(
            name=JIT_NAME,
            sources=[str(src / f) for f in SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=[*CXX_FLAGS, f"-DFRNN_SOURCE_HASH={source_hash(src)}"],
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
    if device is None:  # the machine, not a device: any sm_80+ GPU may be the one used
        caps = _visible_caps()
        if not any(c >= MIN_ARCH for c in caps):
            seen = ", ".join(f"GPU {i}: {a}.{b}" for i, (a, b) in enumerate(caps))
            return (f"no visible GPU has compute capability 8.0 or newer ({seen}); the "
                    "kernels need it (bf16 tensor cores, cooperative launch as used here)")
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (
            f"GPU {index} has compute capability {major}.{minor}; the kernels need 8.0 or newer "
            "(bf16 tensor cores, cooperative launch as used here)"
        )
    return None


def _torch_release() -> tuple[int, ...]:
    """(major, minor, patch) of the running torch, as its C++ headers' TORCH_VERSION_* say."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__)
    return tuple(int(v) for v in m.groups()) if m else ()


def _prebuilt() -> ModuleType | None:
    """The ahead-of-time build, if it is installed, loads, was built from these sources and
    against this torch release (torch's C++ ABI is not stable across releases: a build for
    another one may import and then corrupt memory)."""
    hint = "Rebuild it (FUSED_RNN_BUILD_CUDA=1 pip install --no-build-isolation -e .) or delete it."
    try:
        mod = importlib.import_module(PREBUILT)
    except ModuleNotFoundError as e:
        if e.name == PREBUILT:  # not installed: the usual case
            return None
        warn_at_caller(f"fused_rnn: the prebuilt {PREBUILT} cannot be loaded ({e}); building "
                       f"just in time instead. {hint}")
        return None
    except ImportError as e:  # e.g. an undefined symbol: built against another torch
        warn_at_caller(f"fused_rnn: the prebuilt {PREBUILT} cannot be loaded ({e}); building "
                       f"just in time instead. {hint}")
        return None
    src = sources_dir()
    built_for, running = tuple(getattr(mod, "torch_version", ())), _torch_release()
    if built_for != running:
        shown = f"torch {'.'.join(map(str, built_for))}" if built_for else "an unknown torch"
        then = "building just in time instead" if src is not None else "it is not used"
        warn_at_caller(
            f"fused_rnn: the prebuilt {PREBUILT} ({mod.__file__}) was built against {shown}, "
            f"not this torch {torch.__version__}; {then}. {hint}")
        return None
    if src is None:  # nothing to compare with (or to build from)
        return mod
    built, want = getattr(mod, "source_hash", "unknown"), source_hash(src)
    if built != want:
        warn_at_caller(
            f"fused_rnn: the prebuilt {PREBUILT} ({mod.__file__}) was built from other sources "
            f"than {src} ({built}, not {want}); building them just in time instead. {hint}"
        )
        return None
    return mod


def _build_failure(bdir: Path, e: Exception) -> str:
    """The reason a failed build gives: its first error lines (nvcc follows each error with
    an instantiation backtrace, so the tail alone can hold none) and its last lines."""
    lines = str(e).strip().splitlines()
    tail = lines[-15:]
    first = [ln for ln in lines[:-15] if re.search(r"\berror\b", ln, re.IGNORECASE)][:5]
    shown = [*first, "..."] if first else []
    return (f"the JIT build of the CUDA extension in {bdir} failed (FUSED_RNN_CUDA_VERBOSE=1 "
            "shows the compiler output):\n" + "\n".join(shown + tail))


def _settings() -> tuple:
    """What the answers of :func:`jit_obstacle` and :func:`build_dir` depend on."""
    return tuple(os.environ.get(k) for k in (
        "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH", "PYTORCH_NVCC", "PATH", "CXX", "HOME",
        "XDG_CACHE_HOME", "FUSED_RNN_CUDA_BUILD_DIR"))


def _load() -> tuple[ModuleType | None, str | None, bool]:
    """(the extension, None, True), or (None, why not, whether that answer holds for the
    rest of the process). A failed build is not tried again; what stops one from starting (no
    nvcc, an unreadable TORCH_CUDA_ARCH_LIST, no build directory) holds until a setting
    :func:`_settings` lists changes."""
    mod = _prebuilt()
    if mod is not None:
        return mod, None, True
    obstacle = jit_obstacle()
    if obstacle is not None:
        return None, obstacle, False
    bdir, obstacle = _ready_build_dir()
    if bdir is None:
        return None, obstacle, False
    try:
        return _jit_build(bdir), None, True
    except Warning:  # a warning made an error by a filter: the caller's to see, not a failure
        raise  # to keep (nothing is cached, so the next call tries again)
    except Exception as e:  # a failed build becomes a reason, not a crash
        return None, _build_failure(bdir, e), True


def _machine_device() -> int:
    """The GPU that stands for the machine: the current one if the kernels can run there,
    else the first that can (only one is probed: a probe makes a CUDA context there)."""
    caps = _visible_caps()
    current = torch.cuda.current_device()
    if caps[current] >= MIN_ARCH:
        return current
    return next(i for i, c in enumerate(caps) if c >= MIN_ARCH)


def unavailable_reason(device: torch.device | None) -> str | None:
    """None when the CUDA kernels can run on ``device`` (None: on this machine), else why not.

    On a GPU machine the first call loads the prebuilt extension or JIT-builds it (minutes the
    first time, cached afterwards)."""
    global _ext, _failure, _obstacle
    obstacle = _platform_obstacle(device)
    if obstacle is not None:
        return obstacle
    with _lock:
        if _ext is None and _failure is None:
            settings = _settings()
            if _obstacle is not None and _obstacle[0] == settings:
                return _obstacle[1]
            mod, why, final = _load()
            if mod is not None:
                _ext, _obstacle = mod, None
            elif final:
                _failure = why
            else:
                _obstacle = settings, why
                return why
        if _failure is not None:
            return _failure
        if device is None:
            index = _machine_device()
        else:
            index = torch.cuda.current_device() if device.index is None else device.index
        if index not in _images:
            _images[index] = _image_obstacle(_ext, index)
        return _images[index]


def _image_obstacle(ext: ModuleType, index: int) -> str | None:
    """Why the loaded build has no code GPU ``index`` can run (built for other architectures),
    or None."""
    err, _, _ = ext.kernel_image(index)
    if err == 0:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (
        f"the CUDA extension ({getattr(ext, '__file__', ext.__name__)}) holds no code for GPU "
        f"{index} (compute capability {major}.{minor}; CUDA error {err}): it was built for "
        f"other architectures. Rebuild it with {major}.{minor} in TORCH_CUDA_ARCH_LIST (or "
        "unset it, to build for the visible GPUs)"
    )


def extension() -> ModuleType:
    """The loaded extension; ``RuntimeError`` with the reason and how to fix it otherwise."""
    if _ext is not None:  # loaded (whether a given GPU can run it: unavailable_reason(device))
        return _ext
    reason = unavailable_reason(None)
    if reason is not None:
        raise RuntimeError(f"fused_rnn CUDA backend is unavailable: {reason}")
    assert _ext is not None
    return _ext
