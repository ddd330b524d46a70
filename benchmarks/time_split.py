"""Where a whole layer's forward+backward goes, kernel by kernel: ours (backend="cuda") and
torch.nn's (cuDNN), each profiled once with torch.profiler after a warm-up.

The recurrent kernels are one part of a layer's time. The rest is the time-parallel work around
them: the input projection for all steps, dx, dW_ih and dW_hh (cuBLAS GEMMs: fp32 or TF32 for
fp32 layers, fused_rnn/ops/common.py gemms_use_tf32; on 16-bit operands with fp32 results for
16-bit layers since run 2, fused_rnn/ops/cuda/ops.py _mm), the bias sums, the dtype
conversions and copies. Run 2 on the H200 left about a quarter of LSTM S3 bf16's fwd+bwd (1.5
of 5.8 ms) and a fifth of S4's outside the recurrent kernels, by subtraction (bench total less
the phase table's kernel times, which were taken with the phase clock on). This table measures
it. Per configuration and backend: the wall time of one fwd+bwd (CUDA events, median of 3
unprofiled runs), the GPU time of the kernels of one profiled run by category (CATEGORIES;
``recurrent`` is ours, the rest is everything else either backend launches), the time no kernel
ran (wall less the kernels, as far as they do not overlap: launch gaps, host work), and the
three kernels that took the most time.

    python benchmarks/time_split.py [--modes LSTM,GRU] [--dtypes fp32,bf16] [--shapes S3,S4]
    python benchmarks/time_split.py --sim   # the script on cudasim (CPU), tiny shapes

Writes ``<out-dir>/<date>-<gpu>-split.md`` (rewritten after each configuration, as
profile_cuda.py does) and prints it. ``--sim`` checks the script: without a GPU the profiler
sees CPU ops, not kernels, so its numbers mean nothing.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # --time-budget counts from here: the imports are part of the run

import argparse
import os
import re
import statistics
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import DTYPE_NAMES, environment
from profile_cuda import (
    _write,
    begin,
    finish,
    finish_args,
    table_lines,
    table_parser,
    table_path,
)

# (category, pattern on the kernel's name), first match wins. Ours first: our kernels' names
# hold "rnn", as cuDNN's do. GEMM names differ by library and GPU (cuBLAS sm90_xmma_*,
# nvjet_*, cutlass_*, *gemm*); cuDNN's RNN kernels hold RNN, LSTM, GRU or elemWise.
CATEGORIES = (
    ("recurrent", re.compile(r"rnn_(forward|backward)(_step)?_kernel")),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|wgmma", re.IGNORECASE)),
    ("cudnn rnn", re.compile(r"rnn|lstm|gru|elemwise|persist", re.IGNORECASE)),
    ("reduce", re.compile(r"reduce", re.IGNORECASE)),
    ("elementwise", re.compile(r"copy|elementwise|catarray|cat_|fill|memcpy|memset|transpose",
                               re.IGNORECASE)),
)
COLUMNS = ("cell", "shape", "dtype", "backend", "wall ms", *[c for c, _ in CATEGORIES], "other",
           "no kernel", "top kernels (ms, launches)")


def classify(name: str) -> str:
    """The category of a kernel (or, under --sim, CPU op) name."""
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def split(events) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """({category: ms}, [(name, ms, count)] by time, most first) of profiler events.

    ``events``: (name, microseconds) pairs of device activity (kernels, copies, sets), or
    under --sim of the CPU ops that have no child ops."""
    by_cat: dict[str, float] = {c: 0.0 for c, _ in CATEGORIES} | {"other": 0.0}
    by_name: dict[str, list[float]] = {}
    for name, us in events:
        by_cat[classify(name)] += us / 1e3
        by_name.setdefault(name, []).append(us / 1e3)
    top = sorted(((n, sum(v), len(v)) for n, v in by_name.items()), key=lambda t: -t[1])
    return by_cat, top


def _device_events(prof, device: str) -> list[tuple[str, float]]:
    from torch.autograd import DeviceType

    if device == "cuda":
        events = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                  if e.device_type == DeviceType.CUDA]
        if not events:  # a split of nothing would read as "all host time"
            raise RuntimeError("the profiler recorded no GPU activity (CUPTI unavailable?)")
        return events
    # --sim: no device activity; the leaf CPU ops instead (their own time).
    return [(e.name, e.self_cpu_time_total) for e in prof.events()
            if e.device_type == DeviceType.CPU and not e.cpu_children]


def measure(mode: str, B: int, T: int, H: int, dtype_name: str, backend: str,
            device: str) -> dict:
    """One configuration on one backend ("cuda": ours on the persistent kernel,
    FUSED_RNN_CUDA_PATH=persistent, whatever the path rules say; "cuda-step": ours on the
    per-step path, FUSED_RNN_CUDA_PATH=step; "cudnn": torch.nn): wall ms and the split."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import fused_rnn

    path = {"cuda": "persistent", "cuda-step": "step"}.get(backend)
    if path is not None and os.environ.get("FUSED_RNN_CUDA_PATH") != path:
        with mock.patch.dict(os.environ, {"FUSED_RNN_CUDA_PATH": path}):
            return measure(mode, B, T, H, dtype_name, backend, device)
    backend = "cuda" if path is not None else backend  # the fused_rnn backend
    dtype = getattr(torch, DTYPE_NAMES[dtype_name])
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = dtype_name != "fp32-strict"
    try:
        torch.manual_seed(0)
        if backend == "cudnn":
            model = getattr(torch.nn, mode)(H, H, batch_first=True).to(device, dtype)
        else:
            model = getattr(fused_rnn, mode)(H, H, batch_first=True, backend=backend)
            model = model.to(device, dtype)
        x = torch.randn(B, T, H, device=device, dtype=dtype, requires_grad=True)
        cot = torch.randn(B, T, H, device=device, dtype=dtype)

        def run():
            model.zero_grad(set_to_none=True)
            x.grad = None
            model(x)[0].backward(cot)

        run()  # warm-up (and the extension's load)
        walls = []
        for _ in range(3):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                walls.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                run()
                walls.append((time.perf_counter() - t0) * 1e3)
        activities = [ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            run()
            if device == "cuda":
                torch.cuda.synchronize()
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    by_cat, top = split(_device_events(prof, device))
    return {"wall": statistics.median(walls), "split": by_cat, "top": top}


def _row(mode, shape, dtype_name, backend, m: dict) -> list[str]:
    busy = sum(m["split"].values())
    top = "; ".join(f"{n[:48]} {ms:.3f} ({k})" for n, ms, k in m["top"][:3])
    return [mode, shape, dtype_name, backend, f"{m['wall']:.3f}",
            *[f"{m['split'][c]:.3f}" for c, _ in CATEGORIES], f"{m['split']['other']:.3f}",
            f"{max(m['wall'] - busy, 0.0):.3f}", top.replace("|", "/")]


def _render(args, env: dict, rows, failed, skipped, running=None) -> str:
    lines = [f"# Where a layer's fwd+bwd goes, {env['gpu']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", ("One layer (input size = hidden size, batch_first), forward then backward "
                   "from a random cotangent on y. wall ms: CUDA events, median of 3 unprofiled "
                   "runs; then the GPU time of one profiled run's kernels by category (ms): "
                   "recurrent (ours: rnn_forward_kernel, rnn_backward_kernel, and the "
                   "per-step path's rnn_*_step_kernel), gemm (cuBLAS, "
                   "CUTLASS: the time-parallel GEMMs, and cuDNN's per-step ones), cudnn rnn "
                   "(cuDNN's RNN kernels), reduce (the bias sums), elementwise (conversions, "
                   "copies, fills, cat, torch's pointwise math), other; no kernel: wall less the kernels' sum (launch gaps and "
                   "host work; kernels that overlap make it smaller). backend cuda: ours; "
                   "cuda-step: ours on the per-step path (its per-step GEMMs count as gemm); "
                   "cudnn: torch.nn."), ""]
    if args.sim:
        lines += [("**cudasim**: the profiler saw CPU ops, not kernels; these numbers mean "
                   "nothing."), ""]
    if running is not None:
        what, done, total = running
        lines += [(f"**Incomplete**: {done} of {total} configurations done; this file was "
                   f"written before {what} started and the run did not finish."), ""]
    lines += table_lines(COLUMNS, rows, failed, skipped, args.time_budget)
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = table_parser(__doc__.split("\n\n")[0], "fp32,bf16")
    p.add_argument("--backends", default="cuda,cudnn",
                   help="cuda (ours), cuda-step (ours on the per-step path) and/or cudnn "
                        "(torch.nn); --sim: ours only")
    args = p.parse_args(argv)
    args.backends = args.backends.split(",")
    args = finish_args(p, args, (("backend", args.backends, ("cuda", "cuda-step", "cudnn")),))
    if args.sim:
        args.backends = [b for b in args.backends if b != "cudnn"]
        if not args.backends:
            p.error("--sim runs ours only (cudnn needs a GPU): give cuda or cuda-step too")
    return args


def main(argv=None, start: float | None = None) -> int:
    """start: time.monotonic() the --time-budget counts from (default: now)."""
    args, start, device = begin(parse_args, argv, start)
    if device is None:
        return 1
    configs = [(mode, shape, dtype_name, backend) for mode in args.modes
               for shape in args.shapes for dtype_name in args.dtypes
               for backend in args.backends]
    env_info = environment(device, argparse.Namespace())
    path = table_path(args, env_info, "split")
    rows, failed, skipped = [], [], []
    for i, (mode, shape, dtype_name, backend) in enumerate(configs):
        what = f"{mode}-{shape}-{dtype_name}-{backend}"
        if time.monotonic() - start > args.time_budget:
            skipped.append(what)
            continue
        _write(path, _render(args, env_info, rows, failed, skipped,
                             running=(what, i, len(configs))))
        B, T, H = args.table[shape]
        try:
            m = measure(mode, B, T, H, dtype_name, backend, device)
            rows.append(_row(mode, f"{shape} {B}x{T}x{H}", dtype_name, backend, m))
        except Exception as e:  # one failure must not cost the rest
            failed.append(f"{what}: {type(e).__name__}: {e}"[:300])
    return finish(path, _render(args, env_info, rows, failed, skipped),
                  ok=bool(rows) and not failed and not skipped)


if __name__ == "__main__":
    sys.exit(main(start=_T0))
