"""Compile every kernel variant the launchers use, for a real GPU target, on a machine without one.

Triton can lower a kernel all the way to a cubin (``ptxas`` ships with it) without a GPU; only
loading and launching need the driver. This module installs a stand-in driver that reports a
CUDA target (sm_90 by default), stubs out loading and launching, and then runs the ordinary
launchers (:func:`~fused_rnn.ops.triton.launch.layer_forward` / ``layer_backward``) on CPU
tensors: every ``kernel[grid](...)`` compiles exactly the specialisation a GPU run would, and
launches nothing (outputs are garbage, which is fine: only compilation is checked).

Triton also compiles a variant per integer argument equal to 1 or divisible by 16. The kernels
exempt their step counts (``T``, ``t``); the persistent kernels are run with T = 1 as well as
T = 2 here, so a T = 1 variant that came back (it spilled) is compiled and judged. Sizes of 1
or multiples of 16 (B, H, the projection) are not: those variants compile on a GPU at first use.

It catches what the interpreter cannot: code the real compiler rejects (constexpr misuse,
layouts, dot shapes, types), and variants that would fail or slow down on the device: more
shared memory than a block may have, or registers spilled to local memory (the cubin's stack
frame, read with the bundled ``cuobjdump``), before a GPU is lent. It does not check that
results are right.

    python -m fused_rnn.ops.triton.compile_check [--arch 90] [--quick]

Must run in a process where TRITON_INTERPRET is not set (kernels must be JIT functions).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


def _install_fake_driver(arch: int) -> None:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver

    class _CompileOnlyDriver:
        """Just enough of triton's driver API for JITFunction.run to compile."""

        target = GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_CompileOnlyDriver())
    # Loading a cubin and launching need the real driver: make both no-ops.
    CompiledKernel._init_handles = lambda self: None
    CompiledKernel.launch_metadata = lambda self, *args, **kwargs: None
    CompiledKernel.run = staticmethod(lambda *args, **kwargs: None)
    CompiledKernel.function = None


# The largest hidden size the "auto" rule sends to the persistent kernel, per mode: their
# shared-memory footprint is the one to check against the GPU's limit.
_PERSISTENT_H = {"LSTM": 64, "GRU": 64, "RNN_TANH": 128, "RNN_RELU": 128}
# Shared memory per block (opt-in maximum), bytes: sm_80 163 KB, sm_90 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Local memory per thread (spilled registers) a variant may use. On sm_90 two fp32 persistent
# variants spill a few registers (8-16 bytes: LSTM H=64 forward, GRU H=64 backward without
# TF32); what this catches is the hundreds of bytes to kilobytes that a bad
# tile or warp layout costs (the step kernels at BLOCK_K=64 with 4 warps: up to 320 bytes;
# LSTM with a 16-wide projection: 4-13 KB).
SPILL_LIMIT = 32


def _configs(quick: bool):
    """(mode, dtype, path, H, proj, lengths, reverse, bias, B, tf32): every constexpr the
    launchers set. B=33 takes the step kernels' 32-row batch tiles; tf32=False (cuDNN's RNNs
    without TF32, as the GPU tests run) compiles fp32 dots with ieee precision."""
    import torch

    dtypes = [torch.float32, torch.bfloat16] + ([] if quick else [torch.float16])
    for mode, dtype, path in itertools.product(("LSTM", "GRU", "RNN_TANH", "RNN_RELU"), dtypes,
                                               ("persistent", "step")):
        H = _PERSISTENT_H[mode] if path == "persistent" else 37
        yield mode, dtype, path, H, 0, True, True, True, 3, True
        if mode == "LSTM":
            for proj in ((32, 16) if path == "persistent" else (5,)):
                yield mode, dtype, path, H, proj, True, False, True, 3, True
        if path == "step":
            yield mode, dtype, path, H, 0, True, True, True, 33, True
        if dtype == torch.float32:
            yield mode, dtype, path, H, 0, True, True, True, 3, False
        if not quick:
            yield mode, dtype, path, H, 0, False, False, False, 3, True  # no lengths, no bias


def run(arch: int = 90, quick: bool = False, verbose: bool = False) -> int:
    """Compile all configurations; return the number of kernel variants compiled.

    Raises if a variant needs more shared memory than one block may have on ``arch``.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile anything")
    _install_fake_driver(arch)
    import torch

    from fused_rnn.ops.reference import GATES
    from fused_rnn.ops.triton import kernels, launch

    names = ("_step_fwd_kernel", "_step_bwd_kernel", "_persistent_fwd_kernel", "_persistent_bwd_kernel")
    labels = {}  # id(compiled kernel) -> the configuration that first compiled it
    for mode, dtype, path, H, proj, lengths, reverse, bias, B, tf32 in _configs(quick):
        if path == "persistent":  # the largest sizes "auto" sends there
            assert launch.choose_path(mode, H, proj) == path, "_PERSISTENT_H is out of date"
        torch.backends.cudnn.allow_tf32 = tf32
        I = 4
        P = proj or H
        G = GATES[mode]
        t0 = time.perf_counter()
        for T in (2, 1) if path == "persistent" else (2,):  # T = 1: no variant of its own
            x, h0 = torch.randn(T, B, I, dtype=dtype), torch.randn(B, P, dtype=dtype)
            c0 = torch.randn(B, H, dtype=dtype) if mode == "LSTM" else None
            w_ih, w_hh = torch.randn(G * H, I, dtype=dtype), torch.randn(G * H, P, dtype=dtype)
            b = torch.randn(G * H, dtype=dtype) if bias else None
            w_hr = torch.randn(P, H, dtype=dtype) if proj else None
            lens = torch.arange(B) % T + 1 if lengths else None
            for save in (False, True):
                y, _, _, gates, state = launch.layer_forward(
                    mode, x, h0, c0, w_ih, w_hh, b, b, w_hr, lens, reverse, save, path)
            # "auto" for the persistent backward is that path, except where the installed
            # Triton would abort compiling it (launch.backward_aborts_compiler): the step path.
            launch.layer_backward(mode, x, h0, c0, w_ih, w_hh, b, b, w_hr, lens, reverse, y,
                                  gates, state, torch.randn_like(y), None, None,
                                  "auto" if path == "persistent" else path)
        label = (f"{mode} {str(dtype)[6:]} {path} H={H} proj={proj} lengths={lengths} "
                 f"bias={bias} B={B} tf32={tf32}")
        if path == "persistent" and launch.backward_aborts_compiler(
                mode, dtype, launch._fp32_dot_precision(), H, bool(proj)):
            label += " (backward on the step path: this Triton aborts on the persistent one)"
        for n in names:
            for k in _compiled(getattr(kernels, n)):
                labels.setdefault(id(k), label)
        if verbose:
            print(f"{label}: {time.perf_counter() - t0:.1f}s", flush=True)
    compiled = [(n, k) for n in names for k in _compiled(getattr(kernels, n))]
    limit = SMEM_LIMIT.get(arch)
    worst = max(compiled, key=lambda nk: nk[1].metadata.shared)
    if verbose:
        print(f"largest shared memory: {worst[1].metadata.shared} bytes ({worst[0]}); "
              f"limit on sm_{arch}: {limit}")
    too_big = [(n, k.metadata.shared) for n, k in compiled if limit and k.metadata.shared > limit]
    if too_big:
        raise RuntimeError(f"kernels over the {limit}-byte shared-memory limit of sm_{arch}: {too_big}")
    stacks = [(n, labels[id(k)], _stack_bytes(k)) for n, k in compiled]
    if verbose:
        for n, label, stack in stacks:
            if stack:
                print(f"{n} ({label}): {stack} bytes of local memory per thread")
    spilled = [entry for entry in stacks if entry[2] > SPILL_LIMIT]
    if spilled:
        raise RuntimeError(f"kernels spilling more than {SPILL_LIMIT} bytes per thread to local "
                           f"memory on sm_{arch}: {spilled}")
    return len(compiled)


def _compiled(fn) -> list:
    """The kernels a ``@triton.jit`` function compiled for device 0: in its per-device caches
    (Triton >= 3.3), or its older ``cache`` (3.2)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return list(caches[0][0].values())
    return list(fn.cache[0].values())


def _stack_bytes(kernel) -> int:
    """The cubin's per-thread stack frame (bytes of local memory: register spills), from the
    ``cuobjdump`` that ships with Triton."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    stacks = [int(m) for m in re.findall(r"STACK:(\d+)", out)]
    if not stacks:
        raise RuntimeError(f"cuobjdump reported no resource usage:\n{out}")
    return max(stacks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    p.add_argument("--quick", action="store_true", help="fp32 and bf16 only, all flags on")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    n = run(args.arch, args.quick, verbose=True)
    print(f"compiled {n} kernel variants for sm_{args.arch} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
