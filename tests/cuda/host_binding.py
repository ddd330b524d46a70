"""``csrc/binding.cpp`` itself on the CPU: the extension's C++ entry points compiled against
torch's CPU headers and cudasim's CUDA headers, linked to the cudasim library of the kernels
(``simulate.build``), and called with CPU tensors.

``simulate.Simulator`` stands in for the extension with a mirror of the binding: its tensor
checks, allocations and plan in Python and ``sim/sim_api.cpp``. ``HostBinding`` runs the
binding's own code instead: its checks and messages, its allocations (the exchange buffer, the
K parts' partial sums), the params it fills, its per-step GEMMs (``step_mm``) and its error
handling, around the same kernels. What changes for the host build is in
``sim/host/binding_host.cpp`` (two renames) and ``sim/host/c10/cuda`` (the device guard and
current stream); the binding's text is included unchanged.

Every allocation torch makes on the CPU during a call of the binding is filled with junk
(c10's ``caffe2_cpu_allocator_do_junk_fill``: NaN for fp32, NaN or -0.47 for bf16), as
``tests/conftest.py`` fills ``torch.empty`` with NaN around the mirror: an output or buffer the
binding and its kernels forget to write cannot pass by luck.

The module is built once per source hash into ``$FUSED_RNN_SIM_BUILD_DIR`` (about 25 s), beside
the cudasim library it links to, and shares that library's state (configuration, counters)
with the ``Simulator`` that loaded it: ``HostBinding`` configures the simulated device through
one before every call.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import inspect
import itertools
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import simulate
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_rnn.ops.common import gemm_fp32_precision

HOST = simulate.SIM / "host"
MODULE = "fused_rnn_host_binding"
# The binding's sanitizer flags per cudasim build (simulate.SANITIZERS): under "address" the
# binding's own accesses are checked too; under "thread" only the kernels are instrumented.
_SANITIZE = {"": [], "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                                 "-fno-omit-frame-pointer"], "thread": []}
_lock = threading.Lock()
_modules: dict[tuple[str, str], ModuleType] = {}


def _python_include() -> Path:
    return Path(sysconfig.get_paths()["include"])


def unavailable_reason() -> str | None:
    """Why the binding cannot be built here, or None."""
    reason = simulate.unavailable_reason()
    if reason:
        return reason
    from torch.utils.cpp_extension import include_paths

    if not any((Path(p) / "torch" / "extension.h").is_file() for p in include_paths()):
        return "torch/extension.h is not in this torch install"
    if not (_python_include() / "Python.h").is_file():
        return f"Python.h is not in {_python_include()} (the Python headers)"
    return None


def _sources(csrc: Path) -> list[Path]:
    return [csrc / "binding.cpp", csrc / "fused_rnn.h", csrc / "plan.h",
            *sorted(p for p in HOST.rglob("*") if p.is_file())]


def build(sanitize: str = "", csrc: Path = simulate.CSRC) -> Path:
    """Compile (if not cached) and return the module's path; ``sanitize`` and ``csrc`` as for
    ``simulate.build``, whose library the module links to."""
    from torch.utils.cpp_extension import include_paths, library_paths

    lib = simulate.build(sanitize, csrc)
    flags = ["-std=c++20", "-O1", "-fPIC", "-Wall", "-Wextra", "-Werror",
             "-Wno-unknown-pragmas", *_SANITIZE[sanitize], f"-I{HOST}",
             f"-I{simulate.SIM / 'include'}", f"-I{simulate.SIM}", f"-I{csrc}"]
    for inc in [*include_paths(), str(_python_include())]:
        flags += ["-isystem", inc]
    flags += [f"-DTORCH_EXTENSION_NAME={MODULE}",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    torch_lib = library_paths()[0]
    link = [f"-L{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10", "-ltorch_python",
            f"-Wl,-rpath,{torch_lib}", str(lib)]
    h = hashlib.sha256("\0".join([*flags, *link, torch.__version__, sys.version]).encode())
    for src in _sources(csrc):
        h.update(str(src.relative_to(src.parents[1])).encode() + b"\0" + src.read_bytes())
    out = lib.parent.parent / f"binding-{h.hexdigest()[:16]}" / f"{MODULE}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
    try:
        tmp = work / out.name
        subprocess.run([simulate.GXX, *flags, "-shared", str(HOST / "binding_host.cpp"), "-o",
                        str(tmp), *link], check=True, capture_output=True,
                       env=simulate._compiler_env())
        os.replace(tmp, out)  # atomic: concurrent builders both succeed
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"host binding build failed:\n{e.stderr.decode(errors='replace')}") \
            from e
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    return out


def load(sanitize: str = "", csrc: Path = simulate.CSRC) -> ModuleType:
    """The built module (once per process and build). Its cudasim library must be the one a
    ``Simulator`` of the same ``sanitize`` and ``csrc`` loads, which HostBinding makes sure of."""
    key = (sanitize, str(csrc))
    with _lock:
        if key not in _modules:
            path = build(sanitize, csrc)
            spec = importlib.util.spec_from_file_location(MODULE, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _modules[key] = module
        return _modules[key]


_junk_flag: ctypes.c_bool | None = None
# A new current stream for each call (HostBinding._call): a launch on the legacy stream, or on
# a stream an earlier call saw, counts as off it. Nothing dereferences these names.
_streams = itertools.count(0x5_7000, 0x100)
# The caller's current device during each call: not the one its tensors are on (the simulated
# device 0), as for a model on cuda:0 called while cuda:1 is current. The binding's device guard
# makes 0 current for its launches; a launch or device query outside it fails.
OTHER_DEVICE = 1


def _junk_fill() -> ctypes.c_bool:
    """c10's switch that fills each new CPU allocation with a junk pattern (0x7fedbeef)."""
    global _junk_flag
    if _junk_flag is None:
        from torch.utils.cpp_extension import library_paths

        c10 = ctypes.CDLL(str(Path(library_paths()[0]) / "libc10.so"))  # torch's, loaded
        _junk_flag = ctypes.c_bool.in_dll(c10, "FLAGS_caffe2_cpu_allocator_do_junk_fill")
    return _junk_flag


# cuBLAS's 16-bit GEMM with an fp32 result (aten::mm.dtype_out, torch >= 2.8), which binding.cpp
# step_mm asks for on the per-step path: torch has it for CUDA only, so on the CPU the binding
# would always take its promote fallback. A CPU kernel stands in for it, registered once a
# process (HostBinding's sixteen_bit_gemm), with the checks torch's CUDA kernel makes: both
# operands of one dtype, out_dtype that dtype or fp32 for 16-bit operands, and the out tensor of
# out_dtype. It forms the same exact products and sums them in fp32, as cuBLAS does (in an order
# of its own): the promoted operands' GEMM, the mirror's.
_gemm_lib = None
GEMM_CALLS: list[tuple[torch.dtype, torch.dtype]] = []  # (operand dtype, out_dtype) a call


def _mm_dtype_out(self, mat2, out_dtype, *, out):
    if self.dtype != mat2.dtype:
        raise RuntimeError(f"cuBLAS stand-in: operands of two dtypes, {self.dtype} and "
                           f"{mat2.dtype}")
    if out_dtype != self.dtype and not (
            out_dtype == torch.float32 and self.dtype in (torch.float16, torch.bfloat16)):
        raise RuntimeError(f"cuBLAS stand-in: out_dtype {out_dtype} for {self.dtype} operands "
                           "(their own dtype, or float32 for 16-bit ones)")
    if out.dtype != out_dtype:
        raise RuntimeError(f"cuBLAS stand-in: an out tensor of {out.dtype} for out_dtype "
                           f"{out_dtype}")
    GEMM_CALLS.append((self.dtype, out_dtype))
    if out_dtype == torch.float32:
        return torch.mm(self.float(), mat2.float(), out=out)
    return out.copy_(torch.mm(self.float(), mat2.float()))


def install_sixteen_bit_gemm() -> bool:
    """Give this process's CPU an aten::mm.dtype_out (the stand-in above), where torch has the
    overload and no CPU kernel of its own for it; True where the CPU then has one."""
    global _gemm_lib
    if not hasattr(torch.ops.aten.mm, "dtype_out"):
        return False  # torch < 2.8: binding.cpp promotes without asking
    with _lock:
        if _gemm_lib is None and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "aten::mm.dtype_out", "CPU"):
            _gemm_lib = torch.library.Library("aten", "IMPL")
            _gemm_lib.impl("mm.dtype_out", _mm_dtype_out, "CPU")
    return True


def install_oom_gemm(binding: HostBinding) -> None:
    """Make this process's aten::mm.dtype_out on the CPU fail as the CUDA caching allocator does
    when memory runs out (c10::OutOfMemoryError), through the host build's test hook
    (``sim/host/binding_host.cpp``). For a child process: it replaces the GEMM for good."""
    ctypes.CDLL(binding.ext.__file__).fused_rnn_host_install_oom_gemm()


class _StepGemms(TorchDispatchMode):
    """Records, at each fp32 GEMM (aten::mm.out) the binding's per-step loop makes (step_mm),
    the precision torch's fp32 GEMMs were set to then (common.gemm_fp32_precision): what cuBLAS
    would run it in on a GPU. The CPU has no TF32, so only this shows the setting; the mirror
    records the same (Simulator.step_gemm_precisions)."""

    def __init__(self, record: list[str]):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.out:
            self.record.append(gemm_fp32_precision())
        return func(*args, **(kwargs or {}))


class HostBinding:
    """Stands in for the compiled extension, like ``simulate.Simulator``, with binding.cpp's own
    entry points (``forward``, ``backward``, ``forward_steps``, ``backward_steps``,
    ``plan_info``, ``device_info``, ``kernel_image``, ``cluster_launches``).

    The keyword arguments are ``Simulator``'s (the simulated device, thread order, sanitizer,
    csrc), and ``sixteen_bit_gemm``: install the CPU's stand-in for cuBLAS's 16-bit GEMM with
    an fp32 result (``install_sixteen_bit_gemm``; for the whole process), so that the per-step
    path runs as on a GPU, not its promote fallback. Its ``launches`` records each call in the Simulator's form, a persistent one with
    the plan and settings its kernel was launched with (read off the params binding.cpp
    filled, ``Simulator.last_launch``); a call the binding refuses is not recorded. Counters
    (``mma_count`` and the others) are the shared library's, so they count the binding's
    launches. Each call gets a current stream of its own (c10's ``getCurrentCUDAStream`` in the
    host build); a launch that names any other stream fails the call with an AssertionError.
    Each call is made with another device current (``OTHER_DEVICE``), which the binding's device
    guard must switch from for its launches, and back to after.
    """

    def __init__(self, *, sixteen_bit_gemm: bool = True, **kwargs):
        if sixteen_bit_gemm:
            install_sixteen_bit_gemm()
        self.sim = simulate.Simulator(**kwargs)
        self.ext = load(kwargs.get("sanitize", ""), Path(kwargs.get("csrc", simulate.CSRC)))
        self.launches = self.sim.launches
        self.step_gemm_precisions: list[str] = []  # as Simulator's, from this binding's GEMMs

    def __getattr__(self, name):
        # the simulated device's counters and settings (mma_count, sms, release_stacks, ...)
        return getattr(self.sim, name)

    def _call(self, name: str, *args, **kwargs):
        """binding.cpp's ``name`` on the configured device, its allocations junk-filled, with a
        current stream of its own that every launch it makes must name."""
        self.sim._configure()
        flag = _junk_fill()
        before, flag.value = flag.value, True
        stream = next(_streams)
        self.sim.set_current_stream(stream)
        off = self.sim.stream_launches()[1]
        self.sim.set_current_device(OTHER_DEVICE)
        try:
            return getattr(self.ext, name)(*args, **kwargs)
        finally:
            device = self.sim.current_device()
            self.sim.set_current_device(0)
            self.sim.set_current_stream(0)
            flag.value = before
            strays = self.sim.stream_launches()[1] - off
            assert strays == 0, (
                f"binding.cpp's {name} made {strays} launch(es) on a stream other than c10's "
                f"current one (0x{stream:x})")
            assert device == OTHER_DEVICE, (
                f"binding.cpp's {name} left device {device} current, not the caller's")

    def _bound(self, name: str, args, kwargs) -> dict:
        sig = inspect.signature(getattr(simulate.Simulator, name))
        bound = sig.bind(self.sim, *args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    def _persistent(self, direction: str, args, kwargs):
        """forward or backward, recorded with what the kernel was launched with."""
        before = self.sim.last_launch()
        out = self._call(direction, *args, **kwargs)
        number, launched = self.sim.last_launch()
        assert before is None or number > before[0], "the binding returned without a launch"
        mode = self._bound(direction, args, kwargs)["mode"]
        self.launches.append((direction, int(mode), launched))
        return out

    def forward(self, *args, **kwargs):
        return self._persistent("forward", args, kwargs)

    def backward(self, *args, **kwargs):
        return self._persistent("backward", args, kwargs)

    def _steps(self, name: str, data: str, args, kwargs):
        """forward_steps or backward_steps; for fp32 data (the argument ``data``), each step
        GEMM's precision recorded as the mirror does (16-bit data's GEMMs, or their fallback's
        promoted ones, are not recorded there either)."""
        try:
            fp32 = self._bound(name, args, kwargs)[data].dtype == torch.float32
        except (TypeError, AttributeError):  # a call the binding refuses itself
            fp32 = False
        if not fp32:
            return self._call(name, *args, **kwargs)
        with _StepGemms(self.step_gemm_precisions):
            return self._call(name, *args, **kwargs)

    def forward_steps(self, *args, **kwargs):
        out = self._steps("forward_steps", "h0", args, kwargs)
        a = self._bound("forward_steps", args, kwargs)
        self.launches.append(("forward_steps", int(a["mode"]), {"steps": a["xproj"].shape[0]}))
        return out

    def backward_steps(self, *args, **kwargs):
        out = self._steps("backward_steps", "w_hh", args, kwargs)
        a = self._bound("backward_steps", args, kwargs)
        self.launches.append(("backward_steps", int(a["mode"]), {"steps": a["dy"].shape[0]}))
        return out

    def plan_info(self, *args, **kwargs):
        return self._call("plan_info", *args, **kwargs)

    def device_info(self, index: int):
        return self._call("device_info", index)

    def kernel_image(self, index: int):
        return self._call("kernel_image", index)

    def cluster_launches(self) -> int:
        return self.ext.cluster_launches()
