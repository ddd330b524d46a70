"""Run the CUDA kernels of ``csrc/``, unchanged, on the CPU (``tests/cuda/sim``: cudasim).

``Simulator`` has the binding's functions (``forward``, ``backward``, ``device_info``) with the
same arguments, allocations and results, so it stands in for the compiled extension under the
real Python glue (``fused_rnn.ops.cuda``). Unlike ``emulate.py``, which re-implements the
kernels' arithmetic in torch, this compiles ``rnn_forward.cu`` and ``rnn_backward.cu`` with g++
against small stand-ins for the CUDA headers and runs every CUDA thread of a launch (see
``sim/include/cudasim.h`` for what is modelled and checked). What it cannot see: the real
tensor-core fragment layouts and accumulation, CUDA's expf/tanhf (glibc's run here), the memory
model of a GPU beyond its barriers (the scheduler runs one thread at a time; the ThreadSanitizer
build checks that every conflicting pair of accesses is ordered by a barrier), performance.

The library is built once per source hash into ``$FUSED_RNN_SIM_BUILD_DIR`` (default: a folder
under the system temp dir). ``sanitize="address"`` builds it with AddressSanitizer and UBSan,
``sanitize="thread"`` with its kernels under ThreadSanitizer (``sim/runtime.cpp``: CUDASIM_TSAN);
either only works in a process started with ``LD_PRELOAD`` of the sanitizer's runtime (see
:func:`sanitizer_env`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fused_rnn.ops.common import gemm_fp32_precision
from fused_rnn.ops.cuda.profile import PROF_SLOTS

ROOT = Path(__file__).resolve().parents[2]
SIM = Path(__file__).resolve().parent / "sim"
CSRC = ROOT / "csrc"
GXX = shutil.which("g++")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ORDERS = {"ascending": 0, "descending": 1, "shuffle": 2}
PLAN_FIELDS = ("math", "units", "blocks", "m_rows", "m_pad", "k", "k_pad", "ldw", "slots",
               "slot_floats", "w_bytes", "smem_bytes", "groups", "group_blocks", "stage_rows",
               "stage_k", "stage_ld", "parts", "k_part", "part_ld", "cluster")
# What a persistent launch's params held (sim_api.cpp sim_last_launch), and its number.
LAUNCH_FIELDS = (*PLAN_FIELDS, "stage_copy", "tile_block", "point_batch", "frag_loads")
BATCH_PAD = 32  # plan.h kBatchPad
STAGE_COPIES = {"registers": 0, "async": 1, "pipelined": 2, "tagged": 3}  # fused_rnn.h StageCopy
STAGE_REGISTERS, STAGE_TAGGED = STAGE_COPIES["registers"], STAGE_COPIES["tagged"]
FIRST_TAG = 1 << 16  # fused_rnn.h kFirstTag

_FLAGS = ["-std=c++20", "-g", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
          f"-I{SIM / 'include'}", f"-I{SIM}"]
# The flags of each build. Under "thread" only the kernels' units are instrumented (_TSAN_UNITS):
# the runtime's bookkeeping is shared by every simulated thread by design, and it announces the
# kernels' synchronization and copies to TSan itself.
SANITIZERS = {
    "": ["-O2"],
    "address": ["-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined"],
    "thread": ["-O1", "-fno-omit-frame-pointer", "-DCUDASIM_TSAN=1"],
}
_TSAN_UNITS = ("kernels.cpp",)
_KERNEL_UNITS = ("kernels.cpp",)
_UNITS = [("kernels.cpp", []), ("kernels.cpp", ["-DFRNN_SIM_BACKWARD"]), ("runtime.cpp", []),
          ("sim_api.cpp", [])]
_lock = threading.Lock()
_libs: dict[tuple[str, str, bool, bool], ctypes.CDLL] = {}


def unavailable_reason() -> str | None:
    return None if GXX else "g++ is not on PATH (needed to compile the kernels for cudasim)"


def _sources(csrc: Path) -> list[Path]:
    # (not sim/host: the host build of the binding, host_binding.py, which links to this)
    return sorted(SIM.glob("*.h")) + sorted((SIM / "include").glob("*.h")) + sorted(
        SIM.glob("*.cpp")) + sorted(csrc.glob("*.cu*")) + [csrc / "plan.h", csrc / "fused_rnn.h"]


def _compiler_env() -> dict[str, str]:
    """The environment for g++: without a sanitizer preloaded (a process started with
    sanitizer_env() that builds a library must not run the compiler under it)."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def _compile_unit(flags: list[str], i: int, csrc: Path, objs: Path, work: Path,
                  sanitize: str = "", quick: bool = False) -> Path:
    """One translation unit's object, from the cache when the same source was compiled before.

    The key is the preprocessed text with the kernel directory's path taken out, so a mutant
    copy of csrc/ (test_cuda_sim.py) recompiles only the units its change reaches; the others
    come from the clean build (their file names in messages and debug info are the clean
    copy's).
    """
    src, extra = _UNITS[i]
    if sanitize == "thread" and src in _TSAN_UNITS:
        extra = [*extra, "-fsanitize=thread"]
    if quick and src in _KERNEL_UNITS:
        extra = [*extra, "-O0"]  # after the build's own -O: the last one counts
    cmd = [GXX, *flags, *extra, str(SIM / src)]
    pre = subprocess.run([*cmd, "-E"], check=True, capture_output=True,
                         env=_compiler_env()).stdout
    h = hashlib.sha256(" ".join(cmd).replace(str(csrc), "<csrc>").encode() + b"\0")
    h.update(pre.replace(str(csrc).encode(), b"<csrc>"))
    obj = objs / f"{h.hexdigest()[:24]}.o"
    if not obj.is_file():
        tmp = work / f"{i}.o"
        subprocess.run([*cmd, "-c", "-o", str(tmp)], check=True, capture_output=True,
                       env=_compiler_env())
        objs.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, obj)  # atomic: concurrent builders both succeed
    return obj


def build(sanitize: str = "", csrc: Path = CSRC, ucontext: bool = False,
          quick: bool = False) -> Path:
    """Compile (if not cached) and return the shared library's path. ``sanitize``: "",
    "address" or "thread" (see the module docstring); ``csrc``: the kernel sources (another
    directory lets tests run deliberately broken copies); ``ucontext``: switch fibers with
    swapcontext, the runtime's portable path (runtime.cpp), not its x86-64 one; ``quick``:
    the kernels' units compiled without optimization (-O0; the runtime keeps its own level).
    The optimizer is most of a build, which a mutant copy of csrc/ run on a few tiny shapes
    need not pay for. The results are the same bits: nothing reorders across the runtime's
    calls, and no flag here lets g++ contract or reassociate floating point."""
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be one of {sorted(SANITIZERS)}, not {sanitize!r}")
    flags = _FLAGS + [f"-I{csrc}"] + SANITIZERS[sanitize]
    flags += ["-DCUDASIM_UCONTEXT"] if ucontext else []
    h = hashlib.sha256(" ".join(flags).encode() + (b" quick" if quick else b""))
    for src in _sources(csrc):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    root = Path(os.environ.get("FUSED_RNN_SIM_BUILD_DIR", Path(tempfile.gettempdir()) / "fused_rnn_sim"))
    out = root / h.hexdigest()[:16]
    lib = out / "libcudasim.so"
    if lib.is_file():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            objs = list(pool.map(
                lambda i: _compile_unit(flags, i, csrc, root / "objects", work, sanitize,
                                        quick),
                range(len(_UNITS))))
        tmp = work / "libcudasim.so"
        link = ["-fsanitize=thread"] if sanitize == "thread" else []
        subprocess.run([GXX, *flags, *link, "-shared", *map(str, objs), "-o", str(tmp),
                        "-lpthread"], check=True, capture_output=True, env=_compiler_env())
        out.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, lib)  # atomic: concurrent builders both succeed
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"cudasim build failed:\n{e.stderr.decode(errors='replace')}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


# ThreadSanitizer's options for every run: the first report ends the process with this code.
TSAN_OPTIONS = "halt_on_error=1:exitcode=66:history_size=4"
TSAN_EXIT_CODE = 66


def sanitizer_missing(sanitize: str) -> str | None:
    """Why a ``sanitize`` build cannot run here, or None."""
    if sanitize == "thread" and platform.machine() != "x86_64":
        return "cudasim's ThreadSanitizer build is only tried on x86-64"
    lib = {"address": "libasan.so", "thread": "libtsan.so"}[sanitize]
    path = subprocess.run([GXX, f"-print-file-name={lib}"], capture_output=True, text=True,
                          check=False).stdout.strip() if GXX else ""
    return None if Path(path).is_file() else f"g++ has no {lib} (the {sanitize} sanitizer)"


def sanitizer_env(sanitize: str = "address") -> dict[str, str]:
    """Environment for a subprocess (``sys.executable`` itself: a shell script between, such as
    a pyenv shim, would start under the sanitizer too) that loads a sanitized library.

    Under "thread", the process's first race report ends it (TSAN_EXIT_CODE), and torch keeps to
    one thread: its own threads synchronize in ways TSan cannot see, and their copies would
    read as races with the kernels."""
    libs = {"address": ["libasan.so", "libstdc++.so"], "thread": ["libtsan.so"]}[sanitize]
    paths = [subprocess.run([GXX, f"-print-file-name={lib}"], capture_output=True, text=True,
                            check=True).stdout.strip() for lib in libs]
    env = dict(os.environ)
    # ASan binds its __cxa_throw interceptor to libstdc++'s when it starts; python itself does
    # not link libstdc++, so without it preloaded too the first C++ exception thrown by a
    # library loaded later (Triton 3.8's libtriton throws one while it imports) fails ASan's
    # CHECK and aborts the process.
    env["LD_PRELOAD"] = ":".join(paths)
    if sanitize == "address":
        env["ASAN_OPTIONS"] = "detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    else:
        env["TSAN_OPTIONS"] = TSAN_OPTIONS
        env["OMP_NUM_THREADS"] = "1"
    return env


def _load(sanitize: str, csrc: Path, ucontext: bool = False,
          quick: bool = False) -> ctypes.CDLL:
    key = (sanitize, str(csrc), ucontext, quick)
    with _lock:
        if key not in _libs:
            lib = ctypes.CDLL(str(build(sanitize, csrc, ucontext, quick)))
            i, u64, p, fp = ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p
            lib.sim_configure.argtypes = [i, i, i, i, u64, i, i, i]
            lib.sim_last_error.restype = ctypes.c_char_p
            lib.sim_set_cuda_error.argtypes = [i]
            lib.sim_cluster_launches.restype = ctypes.c_longlong
            lib.sim_mma_count.restype = ctypes.c_longlong
            lib.sim_point_batch_count.restype = ctypes.c_longlong
            lib.sim_mma_sync_count.restype = ctypes.c_longlong
            lib.sim_ldmatrix_count.restype = ctypes.c_longlong
            lib.sim_ldmatrix_count.argtypes = [i]
            lib.sim_frag_stores.restype = ctypes.c_longlong
            lib.sim_frag_stores.argtypes = [i]
            lib.sim_plan.argtypes = [i] * 13 + [ctypes.POINTER(ctypes.c_int)]
            lib.sim_make_plan.argtypes = [i] * 9 + [ctypes.POINTER(ctypes.c_int)]
            lib.sim_last_launch.argtypes = [ctypes.POINTER(ctypes.c_int), i]
            lib.sim_set_current_stream.argtypes = [ctypes.c_size_t]
            lib.sim_stream_launches.argtypes = [ctypes.POINTER(ctypes.c_longlong)] * 2
            lib.sim_set_current_device.argtypes = [i]
            lib.sim_forward.argtypes = [i] * 16 + [p, fp, p, fp, p, fp, p, fp, p, i, i, i, fp, fp,
                                                   i]
            lib.sim_backward.argtypes = [i] * 15 + [p] * 14 + [i, i, i, fp, i]
            lib.sim_forward_step.argtypes = [i] * 8 + [p] * 9
            lib.sim_backward_step.argtypes = [i] * 7 + [p] * 13
            _libs[key] = lib
        return _libs[key]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


class Simulator:
    """Stands in for the compiled extension; see the module docstring.

    sms: the simulated device's SM count (the plans spread H over at most that many blocks);
    order: which thread runs first between barriers ("ascending", "descending", "shuffle");
    cp_async: when a cp.async lands, "late" (when its group is waited for) or "early" (when it
    is issued): the two extremes the hardware allows;
    max_clusters: how many clusters the device holds at once (cluster mode; negative: by
    occupancy, sms / cluster size);
    ptx_version: the architecture the kernels report being compiled for (cudaFuncGetAttributes'
    ptxVersion; 80: an extension built without sm_90 code, running on the sm_90 device);
    sanitize: "", "address" or "thread": the build (see :func:`build`; the process must have
    started with :func:`sanitizer_env`);
    ucontext: the runtime built with its portable fiber switch; quick: the kernels compiled
    without optimization (both: see :func:`build`).
    """

    def __init__(self, sms: int = 4, order: str = "ascending", seed: int = 0,
                 smem_optin: int = 227 * 1024, smem_per_sm: int = 228 * 1024,
                 sanitize: str = "", csrc: Path = CSRC, cp_async: str = "late",
                 max_clusters: int = -1, ptx_version: int = 90, ucontext: bool = False,
                 quick: bool = False):
        assert cp_async in ("late", "early"), cp_async
        self.sms, self.order, self.seed, self.cp_async = sms, order, seed, cp_async
        self.smem_optin, self.smem_per_sm = smem_optin, smem_per_sm
        self.max_clusters, self.ptx_version = max_clusters, ptx_version
        self.lib = _load(sanitize, Path(csrc), ucontext, quick)
        # (direction, cell, plan with the launch's stage_copy added)
        self.launches: list[tuple[str, int, dict]] = []
        self.step_gemm_precisions: list[str] = []

    def device_info(self, index: int):
        return [self.sms, self.smem_optin, 9, 0, 1]

    def plan_info(self, cell: int, math: int, hidden: int, backward: bool, max_blocks: int,
                  groups: int = 1, stage_rows: int = 0, stage_k: int = 0, parts: int = 1):
        out = (ctypes.c_int * (len(PLAN_FIELDS) - 2))()  # Plan's fields: no math, no cluster
        if self.lib.sim_make_plan(cell, math, hidden, int(backward), max_blocks, groups,
                                  stage_rows, stage_k, parts, out):
            raise RuntimeError("cudasim: bad plan arguments")
        return list(out)

    def _configure(self) -> None:
        self.lib.sim_configure(self.sms, self.smem_optin, self.smem_per_sm, ORDERS[self.order],
                               self.seed, int(self.cp_async == "early"), self.max_clusters,
                               self.ptx_version)

    def mma_count(self) -> int:
        """wmma::mma_sync calls (one a warp) of every launch so far, in this process."""
        return int(self.lib.sim_mma_count())

    def frag_stores(self) -> tuple[int, int]:
        """(all, .shared): the accumulator stores (one a warp and tile) of every launch so far,
        in this process, and those through the .shared form (rnn_common.cuh frag_load)."""
        return int(self.lib.sim_frag_stores(0)), int(self.lib.sim_frag_stores(1))

    def point_batch_count(self) -> int:
        """Batches of points (one a thread and batch, rnn_common.cuh run_points) of every launch
        so far, in this process."""
        return int(self.lib.sim_point_batch_count())

    def mma_sync_count(self) -> int:
        """mma.sync instructions (one a warp; the TF32 mma path) of every launch so far, in this
        process."""
        return int(self.lib.sim_mma_sync_count())

    def ldmatrix_count(self) -> tuple[int, int]:
        """(matrices, wavefronts) of every ldmatrix so far, in this process: the 8 x 8 matrices
        read and the shared-memory passes they took (cudasim.h ldmatrix_wavefronts). Equal
        where no read had a bank conflict."""
        return int(self.lib.sim_ldmatrix_count(0)), int(self.lib.sim_ldmatrix_count(1))

    def last_launch(self) -> tuple[int, dict] | None:
        """(its number, what its params held: LAUNCH_FIELDS) of the last persistent launch in
        this process, or None before the first: the plan the kernel ran, whoever filled it."""
        out = (ctypes.c_int * (len(LAUNCH_FIELDS) + 1))()
        n = self.lib.sim_last_launch(out, len(out))
        if n == 0:
            return None
        assert n == len(out), (n, len(out))
        return out[-1], dict(zip(LAUNCH_FIELDS, out[:-1]))

    def set_current_stream(self, stream: int) -> None:
        """The stream c10 reports current, in this thread, to the host build of the binding
        (host_binding.py): an opaque nonzero integer names one, 0 is the legacy default stream
        (the mirror launches on it). Launches run to their end on any stream."""
        self.lib.sim_set_current_stream(stream)

    def stream_launches(self) -> tuple[int, int]:
        """(on, off): the launches so far, in this process, that named the current stream of
        the thread that made them, and those that named another."""
        on, off = ctypes.c_longlong(), ctypes.c_longlong()
        self.lib.sim_stream_launches(ctypes.byref(on), ctypes.byref(off))
        return on.value, off.value

    def current_device(self) -> int:
        """The calling thread's current device: 0, the simulated one, unless set."""
        return int(self.lib.sim_current_device())

    def set_current_device(self, device: int) -> None:
        """Make ``device`` the calling thread's current device. Any but 0 stands for another
        GPU, which holds none of the simulated memory: every launch, occupancy query and
        function attribute call fails there (cudaErrorInvalidDevice) until a device guard or
        cudaSetDevice(0) makes 0 current again."""
        self.lib.sim_set_current_device(device)

    def cluster_launches(self) -> int:
        """Launches so far (in this process) that ran as clusters, not their fallback."""
        return int(self.lib.sim_cluster_launches())

    def release_stacks(self) -> None:
        """Unmap this library's simulated-thread stacks (its next launch maps them again). A
        library keeps them, two memory mappings each, while the process lives: a process that
        loads many copies (mutants of csrc/) releases those it is done with, or it runs out of
        mappings (vm.max_map_count)."""
        if self.lib.sim_release_stacks() != 0:
            raise RuntimeError("cudasim: release_stacks during a launch")

    def plan(self, cell: int, dtype: torch.dtype, allow_tf32: bool, hidden: int,
             backward: bool, batch: int = 1, max_groups: int = 1,
             max_stage_k: int = 1 << 30, k_parts: int = 1, max_blocks: int = 0,
             cluster: int = 0, team_clusters: bool = False, dsmem: bool = False) -> dict:
        self._configure()
        out = (ctypes.c_int * len(PLAN_FIELDS))()
        b_pad = -(-batch // BATCH_PAD) * BATCH_PAD
        if self.lib.sim_plan(cell, DTYPE_CODES[dtype], int(allow_tf32), hidden, int(backward),
                             b_pad, max_groups, max_stage_k, k_parts, max_blocks, cluster,
                             int(team_clusters), int(dsmem), out):
            raise RuntimeError(f"cudasim: {self.lib.sim_last_error().decode()}")
        return dict(zip(PLAN_FIELDS, out))

    @staticmethod
    def _expect(t, name: str, dtype: torch.dtype, shape: tuple) -> None:
        """binding.cpp's check(): a raw pointer is only right for this exact layout."""
        if t is None:
            return
        assert t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"
        assert tuple(t.shape) == tuple(shape), f"{name} must have shape {shape}, got {tuple(t.shape)}"
        assert t.is_contiguous(), f"{name} must be contiguous"

    def _check(self, rc: int) -> None:
        if rc:
            raise RuntimeError(f"cudasim: {self.lib.sim_last_error().decode()}")

    def _check_forward(self, mode, xproj, h0, c0, w_hh, b_hh, b_ih, lengths):
        """binding.cpp's checked_forward: (cell, T, B, H, storage dtype)."""
        cell = int(mode)
        T, B, _ = xproj.shape
        H = h0.shape[1]
        st = h0.dtype
        G = (4, 3, 1, 1)[cell]
        for t, name, dt, shape in ((xproj, "xproj", torch.float32, (T, B, G * H)),
                                   (h0, "h0", st, (B, H)), (c0, "c0", st, (B, H)),
                                   (w_hh, "w_hh", st, (G * H, H)),
                                   (b_hh, "b_hh", torch.float32, (G * H,)),
                                   (b_ih, "b_ih", torch.float32, (G * H,)),
                                   (lengths, "lengths", torch.int32, (B,))):
            self._expect(t, name, dt, shape)
        return cell, T, B, H, st

    def _check_backward(self, mode, dy, dh_n, dc_n, w_hh, gates, aux, c0, hprev, lengths):
        """binding.cpp's checked_backward: (cell, G, T, B, H, storage dtype)."""
        cell = int(mode)
        G = (4, 3, 1, 1)[cell]
        T, B, H = dy.shape
        st = dy.dtype
        f32 = torch.float32
        for t, name, dt, shape in ((dh_n, "dh_n", f32, (B, H)), (w_hh, "w_hh", st, (G * H, H)),
                                   (gates, "gates", f32, (T, B, G * H)),
                                   (lengths, "lengths", torch.int32, (B,))):
            self._expect(t, name, dt, shape)
        if cell == 0:
            self._expect(dc_n, "dc_n", f32, (B, H))
            self._expect(c0, "c0", f32, (B, H))
        if cell in (0, 1):
            self._expect(aux, "aux", f32, (T, B, H))
        if cell == 1:
            self._expect(hprev, "hprev", st, (T, B, H))
        return cell, G, T, B, H, st

    @staticmethod
    def _forward_outputs(cell, T, B, H, st, c0, save):
        """binding.cpp's forward_outputs: (cbuf, y, aux)."""
        cbuf = c0.float().contiguous().clone() if cell == 0 else None
        y = torch.empty(T, B, H, dtype=st)
        has_aux = save and cell in (0, 1)
        aux = torch.empty((T, B, H) if has_aux else (0,), dtype=torch.float32)
        return cbuf, y, aux

    @staticmethod
    def _backward_outputs(cell, G, T, B, H, st, dh_n, dc_n):
        """binding.cpp's backward_outputs: (dh_carry, dc_carry, dgx, dghn, dh0)."""
        dh_carry = dh_n.clone()
        dc_carry = dc_n.clone() if cell == 0 else torch.empty(0)
        dgx = torch.empty(T, B, G * H, dtype=st)
        dghn = torch.empty((T, B, H) if cell == 1 else (0,), dtype=st)
        dh0 = torch.empty(B, H)
        return dh_carry, dc_carry, dgx, dghn, dh0

    # The allocations below are binding.cpp's, line for line.
    def _prof(self, prof, pl: dict):
        """binding.cpp's prof_ptr(): an int64 buffer of at least blocks x PROF_SLOTS, or None."""
        if prof is not None:
            assert prof.dtype == torch.int64 and prof.is_contiguous()
            assert prof.numel() >= pl["blocks"] * PROF_SLOTS, "prof too small for this launch"
        return _ptr(prof)

    @staticmethod
    def _launch_stage_copy(stage_copy: int, pl: dict, st: torch.dtype) -> int:
        """binding.cpp's launch_stage_copy: registers where the tagged exchange is asked for
        and fused_rnn.h tagged_exchange refuses the plan (cluster modes 2 and 3: teams, dsmem)."""
        if stage_copy == STAGE_TAGGED and not (
                st != torch.float32 and pl["stage_k"] > 0 and pl["parts"] == 1
                and pl["cluster"] not in (2, 3)):
            return STAGE_REGISTERS
        return int(stage_copy)

    @staticmethod
    def _exchange_buffer(tagged: bool, B_pad: int, k_pad: int, st: torch.dtype, first):
        """binding.cpp's exchange_buffer: zeros but `first` in buffer 0; tagged, int32 words
        with the values' bits in the low half and buffer 0 under FIRST_TAG."""
        if not tagged:
            buf = torch.zeros(2, B_pad, k_pad, dtype=st)
            if first is not None:
                buf[0, :first.shape[0], :first.shape[1]] = first
            return buf
        buf = torch.zeros(2, B_pad, k_pad, dtype=torch.int32)
        buf[0] = FIRST_TAG
        if first is not None:
            buf[0, :first.shape[0], :first.shape[1]] |= (
                first.view(torch.int16).to(torch.int32) & 0xFFFF)
        return buf

    @staticmethod
    def _exchange_values(buf, i: int, B: int, H: int, tagged: bool, st: torch.dtype):
        """binding.cpp's exchange_values: (B, H) of buffer i, a contiguous copy."""
        v = buf[i].view(torch.int16)[:B, 0:2 * H:2].view(st) if tagged else buf[i, :B, :H]
        return v.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def _part(pl: dict, B_pad: int):
        """binding.cpp's part_buffer(): the K parts' partial sums, unzeroed, or None."""
        if pl["parts"] == 1:
            return None
        return torch.empty(pl["parts"], B_pad, pl["part_ld"], dtype=torch.float32)

    def forward(self, mode, xproj, h0, c0, w_hh, b_hh, lengths, reverse, allow_tf32, save,
                max_groups, max_stage_k, prof=None, stage_copy=2, k_parts=1, max_blocks=0,
                cluster=0, team_clusters=False, dsmem=False, tile_block=4,
                point_batch=0, b_ih=None, frag_loads=0):
        cell, T, B, H, st = self._check_forward(mode, xproj, h0, c0, w_hh, b_hh, b_ih, lengths)
        pl = self.plan(cell, st, allow_tf32, H, False, B, max_groups, max_stage_k, k_parts,
                       max_blocks, cluster, team_clusters, dsmem)
        stage_copy = self._launch_stage_copy(stage_copy, pl, st)
        tagged = stage_copy == STAGE_TAGGED
        self.launches.append(("forward", cell, {**pl, "stage_copy": int(stage_copy),
                                                "tile_block": int(tile_block),
                                                "point_batch": int(point_batch),
                                                "frag_loads": int(frag_loads)}))
        B_pad = -(-B // BATCH_PAD) * BATCH_PAD
        hbuf = self._exchange_buffer(tagged, B_pad, pl["k_pad"], st, h0)
        cbuf, y, aux = self._forward_outputs(cell, T, B, H, st, c0, save)
        part = self._part(pl, B_pad)
        self._configure()
        self._check(self.lib.sim_forward(
            cell, DTYPE_CODES[st], int(allow_tf32), T, B, H, B_pad, int(reverse), int(save),
            max_groups, max_stage_k, k_parts, max_blocks, cluster, int(team_clusters),
            int(dsmem), _ptr(w_hh), _ptr(b_hh),
            _ptr(lengths),
            _ptr(xproj), _ptr(hbuf), _ptr(cbuf), _ptr(y), _ptr(aux), self._prof(prof, pl),
            int(stage_copy), int(tile_block), int(point_batch), _ptr(part), _ptr(b_ih),
            int(frag_loads)))
        h_n = self._exchange_values(hbuf, T % 2, B, H, tagged, st)
        c_n = cbuf.to(st) if cell == 0 else torch.empty(0, dtype=st)
        return [y, h_n, c_n, aux]

    def backward(self, mode, dy, dh_n, dc_n, w_hh, gates, aux, c0, hprev, lengths, reverse,
                 allow_tf32, max_groups, max_stage_k, prof=None, stage_copy=2, k_parts=1,
                 max_blocks=0, cluster=0, team_clusters=False, dsmem=False, tile_block=4,
                 point_batch=0, frag_loads=0):
        cell, G, T, B, H, st = self._check_backward(mode, dy, dh_n, dc_n, w_hh, gates, aux, c0,
                                                    hprev, lengths)
        pl = self.plan(cell, st, allow_tf32, H, True, B, max_groups, max_stage_k, k_parts,
                       max_blocks, cluster, team_clusters, dsmem)
        stage_copy = self._launch_stage_copy(stage_copy, pl, st)
        self.launches.append(("backward", cell, {**pl, "stage_copy": int(stage_copy),
                                                 "tile_block": int(tile_block),
                                                 "point_batch": int(point_batch),
                                                 "frag_loads": int(frag_loads)}))
        B_pad = -(-B // BATCH_PAD) * BATCH_PAD
        dgbuf = self._exchange_buffer(stage_copy == STAGE_TAGGED, B_pad, pl["k_pad"], st, None)
        dh_carry, dc_carry, dgx, dghn, dh0 = self._backward_outputs(cell, G, T, B, H, st, dh_n,
                                                                    dc_n)
        part = self._part(pl, B_pad)
        self._configure()
        self._check(self.lib.sim_backward(
            cell, DTYPE_CODES[st], int(allow_tf32), T, B, H, B_pad, int(reverse), max_groups,
            max_stage_k, k_parts, max_blocks, cluster, int(team_clusters), int(dsmem), _ptr(w_hh),
            _ptr(lengths), _ptr(dy), _ptr(gates), _ptr(aux) if cell in (0, 1) else None,
            _ptr(c0) if cell == 0 else None, _ptr(hprev) if cell == 1 else None, _ptr(dgbuf),
            _ptr(dh_carry), _ptr(dc_carry), _ptr(dgx), _ptr(dghn), _ptr(dh0),
            self._prof(prof, pl), int(stage_copy), int(tile_block), int(point_batch), _ptr(part),
            int(frag_loads)))
        return [dgx, dghn, dh0, dc_carry]

    # The per-step path (binding.cpp forward_steps, backward_steps): the loop of GEMMs and step
    # launches, line for line. Each step's GEMM is torch's on the CPU in fp32 (the 16-bit
    # operands promoted: exact products, fp32 sums, as cuBLAS with an fp32 result forms them).
    # The precision torch's fp32 GEMMs were set to (common.gemm_fp32_precision) at each fp32
    # step GEMM: what cuBLAS would have run them in on a GPU.
    def _step_mm(self, a, b):
        if a.dtype == torch.float32:
            self.step_gemm_precisions.append(gemm_fp32_precision())
        return a.float() @ b.float()

    def forward_steps(self, mode, xproj, h0, c0, w_hh, b_hh, lengths, reverse, save, b_ih=None):
        cell, T, B, H, st = self._check_forward(mode, xproj, h0, c0, w_hh, b_hh, b_ih, lengths)
        self.launches.append(("forward_steps", cell, {"steps": T}))
        hbuf = torch.empty(2, B, H, dtype=st)
        hbuf[0] = h0
        cbuf, y, aux = self._forward_outputs(cell, T, B, H, st, c0, save)
        wt = w_hh.t()
        self._configure()
        for s in range(T):
            rec = self._step_mm(hbuf[s % 2], wt).contiguous()
            self._check(self.lib.sim_forward_step(
                cell, DTYPE_CODES[st], T, B, H, int(reverse), int(save), s, _ptr(b_hh),
                _ptr(b_ih), _ptr(lengths), _ptr(xproj), _ptr(hbuf), _ptr(cbuf), _ptr(y),
                _ptr(aux), _ptr(rec)))
        h_n = hbuf[T % 2].clone()
        c_n = cbuf.to(st) if cell == 0 else torch.empty(0, dtype=st)
        return [y, h_n, c_n, aux]

    def backward_steps(self, mode, dy, dh_n, dc_n, w_hh, gates, aux, c0, hprev, lengths,
                       reverse):
        cell, G, T, B, H, st = self._check_backward(mode, dy, dh_n, dc_n, w_hh, gates, aux, c0,
                                                    hprev, lengths)
        self.launches.append(("backward_steps", cell, {"steps": T}))
        dgbuf = torch.zeros(2, B, G * H, dtype=st)
        dh_carry, dc_carry, dgx, dghn, dh0 = self._backward_outputs(cell, G, T, B, H, st, dh_n,
                                                                    dc_n)
        rec = torch.zeros(B, H)
        self._configure()
        for s in range(T + 1):
            if s > 0:
                rec = self._step_mm(dgbuf[s % 2], w_hh).contiguous()
            self._check(self.lib.sim_backward_step(
                cell, DTYPE_CODES[st], T, B, H, int(reverse), s, _ptr(lengths), _ptr(dy),
                _ptr(gates), _ptr(aux) if cell in (0, 1) else None,
                _ptr(c0) if cell == 0 else None, _ptr(hprev) if cell == 1 else None,
                _ptr(dgbuf), _ptr(dh_carry), _ptr(dc_carry), _ptr(dgx), _ptr(dghn), _ptr(dh0),
                _ptr(rec)))
        return [dgx, dghn, dh0, dc_carry]
