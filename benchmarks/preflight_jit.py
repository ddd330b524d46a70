"""Pre-flight for a lent GPU, on a machine without one: build the real CUDA extension against a
CUDA build of torch and check that it takes the calls the Python side makes.

CI has a CPU-only torch, so it checks binding.cpp's syntax only. With the GPU machines' own torch
(a CUDA build; see the device tool's KINDS.md) installed here, this script:

1. JIT-builds the extension exactly as first use on a GPU would (``_ext._jit_build``), for
   ``TORCH_CUDA_ARCH_LIST`` (default 9.0: with no GPU there is no architecture to detect);
2. runs ``ops.py``'s forward and backward for every cell, with and without the phase-timing
   buffer, and on the per-step path (``forward_steps``, ``backward_steps``), against the
   compiled module on CPU tensors: each call must get through pybind11's argument conversion
   and stop at the binding's own device check, so a mismatch between the arguments ``ops.py``
   passes and the binding's signature shows up here, not on the GPU;
3. compares the compiled ``plan_info`` with the Python mirror (``plan.py``) over a sweep.

    CUDA_HOME=/usr/local/cuda python benchmarks/preflight_jit.py

Exit status 0 when all three hold. Takes about 20 s on 2 cores (the build).
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import torch

from fused_rnn.ops.cuda import _ext, ops, profile
from fused_rnn.ops.cuda import plan as P
from fused_rnn.ops.reference import GATES, MODES

DEVICE_CHECK = "inputs must be CUDA tensors"


def check_calls(ext) -> list[str]:
    """ops.py's forward and backward, on both paths (``ops.cuda_path_setting``), against the
    compiled binding, on CPU tensors."""
    problems = []
    real = _ext.extension
    _ext.extension = lambda: ext
    try:
        g = torch.Generator().manual_seed(0)
        T, B, I, H = 3, 2, 5, 8
        for mode in MODES:
            G = GATES[mode]

            def r(*shape):
                return torch.randn(*shape, generator=g)

            c0 = r(B, H) if mode == "LSTM" else None
            common = (mode, r(T, B, I), r(B, H), c0, r(G * H, I), r(G * H, H), r(G * H),
                      r(G * H), torch.tensor([T, T - 1]))
            calls = {
                "forward": lambda common=common: ops._layer_forward_impl(*common, False, True,
                                                                         True),
                # what the forward saves: gates and aux as ops.saved_shapes says (RNN: no aux)
                "backward": lambda common=common, mode=mode: ops._layer_backward_impl(
                    *common, True, True, r(T, B, H),
                    *(r(*shape) for shape in ops.saved_shapes(mode, T, B, H, True)),
                    r(T, B, H), None, None),
            }
            for (name, call), path in itertools.product(calls.items(), ops.PATHS):
                os.environ["FUSED_RNN_CUDA_PATH"] = path
                # phase timing: the persistent kernels only
                for timed in (False, True) if path == "persistent" else (False,):
                    label = f"{mode} {name} {path}{' (phase timing)' if timed else ''}"
                    try:
                        if timed:
                            with profile.recording():
                                call()
                        else:
                            call()
                        problems.append(f"{label}: ran on CPU tensors (expected the device check)")
                    except RuntimeError as e:
                        if DEVICE_CHECK not in str(e):
                            problems.append(f"{label}: {str(e).splitlines()[0][:200]}")
                    except TypeError as e:  # pybind11: the arguments do not fit the signature
                        problems.append(f"{label}: {e}")
    finally:
        _ext.extension = real
        os.environ.pop("FUSED_RNN_CUDA_PATH", None)
    return problems


def check_plans(ext) -> tuple[int, list[str]]:
    """The compiled plan arithmetic (plan.h) against plan.py."""
    problems, n = [], 0
    for cell in range(4):
        for math in range(3):
            for h in (1, 37, 60, 256, 768, 1000, 1024):
                for bw in (False, True):
                    for groups, rows, stage_k, parts in ((1, 0, 0, 1), (2, 32, 64, 2),
                                                         (4, 64, 1024, 4), (1, 64, 304, 8)):
                        got = tuple(ext.plan_info(cell, math, h, bw, 132, groups, rows, stage_k,
                                                  parts))
                        want = P.make_plan(cell, math, h, bw, 132, groups, rows, stage_k,
                                           parts).as_tuple()
                        n += 1
                        if got != want:
                            problems.append(f"plan cell={cell} math={math} H={h} bw={bw} "
                                            f"g={groups} parts={parts}: {got} != {want}")
    return n, problems


def main() -> int:
    if torch.version.cuda is None:
        print(f"preflight_jit: torch {torch.__version__} is a CPU-only build; install the GPU "
              "machines' CUDA build of torch to pre-flight the extension")
        return 2
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    obstacle = _ext.jit_obstacle()
    if obstacle is not None:
        print(f"preflight_jit: cannot build: {obstacle}")
        return 1
    bdir, why = _ext._ready_build_dir()
    if bdir is None:
        print(f"preflight_jit: cannot build: {why}")
        return 1
    t0 = time.monotonic()
    ext = _ext._jit_build(bdir)
    print(f"build: ok in {time.monotonic() - t0:.0f} s, torch {torch.__version__}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}: {ext.__file__}")
    problems = check_calls(ext)
    print(f"calls: {'ok' if not problems else 'FAILED'} (forward and backward of "
          f"{', '.join(MODES)}, persistent with and without phase timing, and by steps)")
    n, plan_problems = check_plans(ext)
    print(f"plans: {n - len(plan_problems)}/{n} equal to plan.py")
    for p in problems + plan_problems:
        print("  ", p)
    return 1 if problems or plan_problems else 0


if __name__ == "__main__":
    sys.exit(main())
