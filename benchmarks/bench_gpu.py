"""GPU benchmark: fused_rnn kernel backends against cuDNN (torch.nn), in one process.

One layer, input size = hidden size, ``batch_first``, shapes S1-S6 of ``ANCHORS.md`` and the
one-step shapes G1-G3 (``STEP_SHAPES``: a cell's cost), LSTM and GRU, fp32 / bf16 / fp16. For
every row: forward ("fwd", a training forward: parameters require grad) and forward+backward
("fwd+bwd", ``y.backward(g)`` with a random cotangent), median time from
``triton.testing.do_bench`` (warm-up first, L2 flushed between runs, at least 5 runs), for cuDNN
and each backend named in ``--backends``. Ratios are cuDNN time / ours (> 1: we are
faster), against cuDNN in the same dtype and against cuDNN fp16 (cuDNN's fastest mode).
fp32 runs with TF32 as ``torch.backends.cudnn.allow_tf32`` says (default on, as in ANCHORS.md);
the header records it. ``fp32-strict`` runs fp32 with it off, for cuDNN and for us alike (our
plain-fp32 FMA kernels; ANCHORS.md has cuDNN's figures for S1-S3).

Before a row is timed, one forward+backward (x, h0 and c0 requiring grad, synchronized) is
compared with cuDNN's on the same inputs and weights, with gradients flowing in through y,
h_n and c_n: ``check`` is "ok" when y, h_n, c_n, dx, dh0, dc0 (LSTM), dW_hh, dW_ih and the
bias gradients are all finite and within ``TOLERANCE`` of cuDNN's by relative norm error
(``max rel err``, the largest of them), each batch row and time step too (``SLICED``, a looser
bound), else "FAIL: " and which; ``max abs Δy`` is the largest
difference in y. The timed passes call ``model(x)`` with no initial state, so the check also
wants that forward's y bit for bit equal to one with an explicit zero state (the state the
module makes for itself). A row whose build, check pass or timing raises says why in its note
and the run goes on. A row that takes the CUDA context with it (a kernel fault is sticky:
every later CUDA call of the process fails, cuDNN's too) costs that row only: the process
replaces itself with a fresh one that carries on with the rows left (``continue_fresh``).

Writes ``<out-dir>/<date>-<gpu>.md`` (versions, commit, ``FUSED_RNN_*`` settings, the CUDA GPU
tests' summary from ``$FRNN_GPU_TESTS``, table) and a ``.csv`` next to it, both rewritten after
every backend's rows, so a run killed at its limit (or hung in a kernel) leaves what it
measured. ``$FRNN_COMMIT``, where set, names the commit (a lent GPU gets the tree without
``.git``).

    python benchmarks/bench_gpu.py --backends triton,cuda [--modes LSTM,GRU] [--shapes S1,S3]
    python benchmarks/bench_gpu.py --dry-run   # CPU, Triton interpreter, tiny shapes

``--dry-run`` exercises everything but the GPU: argument parsing, module set-up, timing loop,
table and CSV writing, on tiny shapes with the Triton interpreter and aten's CPU RNN standing in
for cuDNN. Its numbers mean nothing. ``--time-budget`` stops starting new rows after that many
seconds (the rest are listed as skipped, and written to the CSV as "skipped: time"), so the GPU
script always finishes. Rows are timed in rounds over all configurations: cuDNN with the first
backend named, then the other backends and the CUDA backend's paths (``cuda-step``,
``cuda-persistent``), then the other variants; so name first the backend whose table matters
most. Within a round, configurations go by need (``PRIORITY``), the one-step shapes last.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NoReturn
from unittest import mock

SHAPES = {  # name: (B, T, H), from ANCHORS.md
    "S1": (16, 1024, 768),
    "S2": (64, 100, 512),
    "S3": (64, 128, 1024),
    "S4": (256, 128, 1024),
    "S5": (8, 256, 256),
    "S6": (128, 64, 256),
}
# One step a call (T = 1): a cell's sizes, in sampling (B = 1: ANCHORS.md's generation step at
# H 1024, and the main job's H 256) and in a training loop over cells (ANCHORS.md's LSTMCell
# loop, B 64 H 512). A cell call on the CUDA backend is a one-step layer call
# (ops/cuda/__init__.py rnn_cell), so these rows time both of its paths for cells. The baseline
# is still cuDNN's layer at T = 1 (nn.LSTM/nn.GRU), not nn.LSTMCell's kernels: the ratios are
# not against a loop over torch's cells. They are timed after the suite's rows of the backends'
# rounds, by the backends, cuda-step and cuda-persistent (the other variants tune the persistent
# kernel's chunk loop; schedule), and no AutoRule comes from them (auto_rules.py).
STEP_SHAPES = {"G1": (1, 1, 1024), "G2": (1, 1, 256), "G3": (64, 1, 512)}
DRY_SHAPES = {"D1": (3, 4, 16), "D2": (2, 3, 37), "D3": (40, 2, 16), "D4": (2, 1, 16)}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
               "fp32-strict": "float32"}  # fp32 with cudnn.allow_tf32 off (cuDNN's and ours)
COLUMNS = ["cell", "shape", "BxTxH", "dtype", "backend", "pass", "ms", "us_per_step", "reps",
           "x_cudnn_same_dtype", "x_cudnn_fp16", "peak_MiB", "max_abs_dy", "max_rel_err", "check",
           "note"]
HEAD = ["cell", "shape", "B×T×H", "dtype", "backend", "pass", "ms", "µs/step", "reps",
        "× cuDNN same dtype", "× cuDNN fp16", "peak MiB", "max abs Δy", "max rel err vs cuDNN",
        "check", "note"]  # the .md's names for COLUMNS (no "|" in them: it splits a cell)
# The order configurations are timed in, within each round: first the (cell, dtype)s the
# speed targets decide, each over all its shapes (S1-S6; the one-step shapes follow in a pass
# of their own, schedule), so a cut for time leaves whole (cell, dtype)s (auto_rules.py needs
# every shape): LSTM fp32/bf16, then LSTM fp16 (cuDNN's fp16 LSTM
# is the baseline of the LSTM bf16/fp16 target, ANCHORS.md: without it those rows have no
# x_cudnn_fp16), then GRU in every dtype; then fp32-strict.
PRIORITY = [("LSTM", "fp32"), ("LSTM", "bf16"), ("LSTM", "fp16"), ("GRU", "fp32"),
            ("GRU", "bf16"), ("GRU", "fp16"), ("LSTM", "fp32-strict"), ("GRU", "fp32-strict")]
# The largest relative norm error ||ours - cuDNN|| / ||cuDNN|| of any probe tensor (y, h_n,
# c_n, dx, dh0, dc0, dW_hh, dW_ih, db_hh, db_ih) that passes the check. These catch wrong
# kernels (a missed step, a race, a wrong index: errors of order 1, or NaN), not rounding: two
# correct implementations differ far less (fp32 ~1e-6, TF32 ~1e-3, bf16 ~1e-2). fp32 rows use
# the strict bound when TF32 is off.
TOLERANCE = {"fp32-strict": 1e-3, "fp32": 2e-2, "fp16": 2e-2, "bf16": 1e-1}
MIN_REPS = 5  # do_bench runs per row at least (S1 fp32 cuDNN, ~48 ms, would get 3 in 150 ms)
# do_bench's measuring time for a one-step row (at most --rep-ms): a call there takes ~0.03-0.2
# ms (ANCHORS.md: cuDNN's generation step 0.14 ms), so 50 ms still times a few hundred runs,
# and the 36 one-step rows of a backend cost ~4 s less of the bench's budget than at 150 ms.
ONE_STEP_REP_MS = 50.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="triton",
                   help="comma-separated fused_rnn backends to time against cuDNN (triton,cuda); "
                        "variants: cuda-p1 is cuda without K parts, cuda-cl16 and cuda-cl8 cuda "
                        "with each batch group as a thread-block cluster of at most 16 or 8 "
                        "blocks where one fits (sm_90), cuda-cl16ds cuda-cl16 exchanging through "
                        "distributed shared memory where that fits, cuda-tc cuda with K-parts "
                        "teams as clusters (sm_90), "
                        "cuda-b32 cuda on at most 32 "
                        "blocks where they fit, cuda-g1 cuda without batch groups, cuda-direct "
                        "cuda without X staging, cuda-nopipe cuda with one stage buffer "
                        "(cp.async, no overlap), cuda-regcopy cuda staging through registers, "
                        "cuda-tagged cuda with no step barrier in 16 bits (h and the dgates as "
                        "words tagged with their step, polled by the stage copy; as "
                        "cuda-regcopy elsewhere), cuda-pipelined cuda with the pipelined "
                        "copy wherever its stage copy rules would take the tagged one, "
                        "cuda-tb1 cuda multiplying one tile a warp at a time, cuda-pb1 cuda "
                        "finishing one point a thread at a time, cuda-gemm32 cuda with the "
                        "time-parallel GEMMs of 16-bit layers on operands promoted to fp32, "
                        "cuda-genfrag cuda loading its WMMA fragments through generic "
                        "addresses only, cuda-mma cuda multiplying its TF32 tiles with "
                        "mma.sync and ldmatrix, cuda-step cuda's per-step path (a cuBLAS "
                        "GEMM and a launch of the cell a step, no W_hh on chip), "
                        "cuda-persistent cuda's persistent kernel wherever its path rules "
                        "would take the per-step one; every variant but cuda-step runs the "
                        "persistent kernel "
                        "(FUSED_RNN_CUDA_K_PARTS=1, FUSED_RNN_CUDA_CLUSTER=16|8, "
                        "FUSED_RNN_CUDA_CLUSTER_EXCHANGE=dsmem, "
                        "FUSED_RNN_CUDA_TEAM_CLUSTERS=on, "
                        "FUSED_RNN_CUDA_MAX_BLOCKS=32, "
                        "FUSED_RNN_CUDA_MAX_GROUPS=1, FUSED_RNN_CUDA_STAGE_K=0, "
                        "FUSED_RNN_CUDA_STAGE_COPY=async|registers|tagged|pipelined, "
                        "FUSED_RNN_CUDA_TILE_BLOCK=1, FUSED_RNN_CUDA_POINT_BATCH=1, "
                        "FUSED_RNN_CUDA_GEMMS=fp32, FUSED_RNN_CUDA_FRAG_LOADS=generic|mma, "
                        "FUSED_RNN_CUDA_PATH=step|persistent)")
    p.add_argument("--modes", default="LSTM,GRU", help="comma-separated: LSTM,GRU")
    p.add_argument("--dtypes", default="fp32,bf16,fp16",
                   help="comma-separated: fp32,bf16,fp16,fp32-strict (fp32 without TF32, for "
                        "cuDNN and ours: the plain-fp32 FMA kernels)")
    p.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma-separated: fwd,fwd+bwd")
    p.add_argument("--warmup-ms", type=float, default=30.0, help="do_bench warm-up time")
    p.add_argument("--rep-ms", type=float, default=150.0, help="do_bench measuring time")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds after which no new row is started (the rest are listed as skipped)")
    p.add_argument("--out-dir", default=None,
                   help="where the .md and .csv go (default benchmarks/results, dry run: a temp dir)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU + Triton interpreter at tiny shapes: checks the script, not speed")
    p.add_argument("--resume-rows", default=None, help=argparse.SUPPRESS)  # continue_fresh
    args = p.parse_args(argv)
    args.backends = _split(args.backends, ("triton", "cuda", *VARIANTS, "reference"), "backend")
    args.modes = _split(args.modes, ("LSTM", "GRU"), "mode")
    args.dtypes = _split(args.dtypes, tuple(DTYPE_NAMES), "dtype")
    args.passes = _split(args.passes, ("fwd", "fwd+bwd"), "pass")
    table = DRY_SHAPES if args.dry_run else {**SHAPES, **STEP_SHAPES}
    args.shapes = _split(args.shapes, tuple(table), "shape") if args.shapes else list(table)
    args.shape_table = table
    if args.out_dir is None:
        args.out_dir = (Path(os.environ.get("TMPDIR", "/tmp")) / "fused_rnn_bench_dryrun"
                        if args.dry_run else Path(__file__).resolve().parent / "results")
    args.out_dir = Path(args.out_dir)
    return args


def _split(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {what}(s) {bad or value!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))  # each once: a repeat would time (and write) it twice


# --------------------------------------------------------------------------- timing
class Timer:
    """(median milliseconds of ``fn()``, runs timed): triton's do_bench on a GPU, perf_counter on
    the CPU."""

    def __init__(self, device: str, warmup_ms: float, rep_ms: float):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms

    def __call__(self, fn, rep_ms: float | None = None) -> tuple[float, int | None]:
        """rep_ms: this row's measuring time, if shorter than the timer's."""
        if self.device == "cuda":
            import torch
            import triton.testing

            # do_bench runs fn for rep ms by its own estimate, so a slow row would get fewer
            # than MIN_REPS runs: one call timed here (after an untimed one, which takes any
            # first-call cost) sets rep to cover them, with room for its estimate's L2 flush.
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            base = self.rep_ms if rep_ms is None else min(rep_ms, self.rep_ms)
            rep = max(base, (MIN_REPS + 2) * start.elapsed_time(end))
            try:
                times = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=rep,
                                                return_mode="all")
            except AssertionError:  # a Triton without return_mode="all" (asserted before any run)
                return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=rep,
                                                     return_mode="median")), None
            return float(statistics.median(times)), len(times)
        fn()  # warm-up (compiles / interprets once)
        times = []
        for _ in range(MIN_REPS):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times), len(times)


def peak_mib(fn, device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# --------------------------------------------------------------------------- one configuration
def build(mode: str, B: int, T: int, H: int, dtype, device: str, backend: str | None):
    """A one-layer module (torch.nn when backend is None) with fixed weights and inputs."""
    import torch

    import fused_rnn

    torch.manual_seed(0)
    nn_cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}[mode]
    ref = nn_cls(H, H, batch_first=True)
    if backend is None:
        model = ref.to(device, dtype)
        model.flatten_parameters()
    else:
        model = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU}[mode](H, H, batch_first=True, backend=backend)
        model.load_state_dict(ref.state_dict())
        model = model.to(device, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H, generator=g).to(device, dtype)
    cot = torch.randn(B, T, H, generator=g).to(device, dtype)
    return model, x, cot


def passes(model, x, cot):
    def fwd():
        return model(x)[0]

    def fwd_bwd():
        model(x)[0].backward(cot)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def probe(model, mode: str, x, cot, device: str, backward: bool = True) -> dict:
    """One forward+backward with the cotangent, x, h0 (and c0) requiring grad: y, h_n, c_n, dx,
    dh0, dc0, dW_hh, dW_ih, db_hh and db_ih (on the device), for the check against cuDNN. It
    synchronizes, so that an error the device raises late (or a backward that fails) stops this
    row here, not in do_bench. ``backward=False``: the forward's y, h_n and c_n only."""
    import torch

    B, _, H = x.shape
    g = torch.Generator().manual_seed(2)  # the same h0 and c0 on both sides, never zeros
    x = x.detach().clone().requires_grad_()
    h0 = (0.5 * torch.randn(1, B, H, generator=g)).to(device, x.dtype).requires_grad_()
    c0 = (0.5 * torch.randn(1, B, H, generator=g)).to(device, x.dtype).requires_grad_() \
        if mode == "LSTM" else None
    model.zero_grad(set_to_none=True)
    y, state = model(x, h0 if c0 is None else (h0, c0))
    h_n, c_n = state if c0 is not None else (state, None)
    if not backward:
        if device == "cuda":
            torch.cuda.synchronize()
        got = {"y": y, "h_n": h_n, **({} if c0 is None else {"c_n": c_n})}
        return {k: t.detach().clone() for k, t in got.items()}
    # Gradients flow in through h_n and c_n too, as in truncated BPTT (the next chunk's).
    outs = [t for t in (y, h_n, c_n) if t is not None]
    cots = [cot] + [(0.5 * torch.randn(t.shape, generator=g)).to(device, t.dtype)
                    for t in outs[1:]]
    torch.autograd.backward(outs, cots)
    if device == "cuda":
        torch.cuda.synchronize()
    got = {"y": y, "h_n": h_n, **({} if c0 is None else {"c_n": c_n}),
           "dx": x.grad, "dh0": h0.grad, **({} if c0 is None else {"dc0": c0.grad}),
           "dW_hh": model.weight_hh_l0.grad, "dW_ih": model.weight_ih_l0.grad,
           "db_hh": model.bias_hh_l0.grad, "db_ih": model.bias_ih_l0.grad}
    # On the device: compare() runs there (fp64 norms of a 134 MB dx at S4 take the host's
    # cores ~0.2 s each; the device, microseconds). cuDNN's are kept on the host, below.
    got = {k: None if t is None else t.detach().clone() for k, t in got.items()}
    model.zero_grad(set_to_none=True)
    return got


def zero_state_differs(model, mode: str, x) -> bool:
    """Whether ``model(x)``, the call the passes time (no h0), gives another y than the same
    call with an explicit zero h0 (and c0): the check above runs with a random state, so this
    ties the timed path to the checked one."""
    import torch

    B, _, H = x.shape
    # With gradients on, as the timed passes run (under no_grad the kernels take their
    # inference path, which saves nothing for backward).
    zero = torch.zeros(1, B, H, device=x.device, dtype=x.dtype)
    implicit = model(x)[0].detach()
    explicit = model(x, (zero, zero.clone()) if mode == "LSTM" else zero)[0].detach()
    model.zero_grad(set_to_none=True)
    return not torch.equal(implicit, explicit)


def tolerance(dtype_name: str) -> float:
    """TOLERANCE for this row: fp32 without TF32 (fp32-strict, or TF32 turned off) is strict."""
    import torch

    strict = dtype_name == "fp32" and not torch.backends.cudnn.allow_tf32
    return TOLERANCE["fp32-strict" if strict else dtype_name]


# Each tensor is also checked slice by slice along its batch rows and time steps (which
# dimensions, by name: y and dx are (B, T, H), the states (1, B, H)): a wrong row or a missed
# step among many moves the whole tensor's error by little. Slices get SLICE_FACTOR times the
# bound (rounding differs more in a small slice, and grows along the sequence), at most 0.5;
# a wrong slice is off by order 1. A slice's norm counts at least SLICE_FLOOR times the
# average slice norm, so that vanishing ones (a gradient that died out) are not divided by ~0.
SLICED = {"y": (0, 1), "dx": (0, 1), "h_n": (1,), "c_n": (1,), "dh0": (1,), "dc0": (1,)}
# The weight and bias gradients are sums over every step, so they have no slice to check: one
# step's share missing moves dW by 2-11% at S5 (T=256), inside bf16's bound. They are checked
# again on a probe of the first SHORT_T steps, where one step is a quarter of the sum.
SHORT_T = 4
WEIGHT_GRADS = ("dW_hh", "dW_ih", "db_hh", "db_ih")
SLICE_FACTOR, SLICE_CAP, SLICE_FLOOR = 4.0, 0.5, 0.01


def slice_error(d, b, dim: int) -> float:
    """The largest relative norm error of the slices of ``d`` (ours - cuDNN's) and ``b``
    (cuDNN's) along ``dim``."""
    n = b.shape[dim]
    dn = d.transpose(0, dim).reshape(n, -1).norm(dim=1)
    bn = b.transpose(0, dim).reshape(n, -1).norm(dim=1)
    floor = SLICE_FLOOR * b.norm() / math.sqrt(n)
    if floor == 0:
        return 0.0 if dn.max().item() == 0 else math.inf
    return (dn / bn.clamp_min(floor)).max().item()


def compare(got: dict, ref: dict | None, tol: float) -> tuple[float | None, float | None, str]:
    """(max abs Δy, largest relative norm error, check) of probe tensors against cuDNN's
    (``ref``; None: cuDNN's own row, checked for finite values only), in fp64: each tensor as
    a whole within ``tol``, and its batch rows and time steps (SLICED) within
    SLICE_FACTOR * ``tol`` (at most SLICE_CAP)."""
    import torch

    dy, worst, fails = None, 0.0, []
    for name, a in got.items():
        if a is None:
            fails.append(f"{name} missing")
            continue
        if not torch.isfinite(a).all():  # NaN or inf never passes
            fails.append(f"{name} not finite")
            worst = math.inf
            continue
        if ref is None:
            continue
        b = ref.get(name)
        if b is None or b.shape != a.shape or not torch.isfinite(b).all():
            fails.append(f"cuDNN's {name} missing or not finite")
            continue
        b = b.to(a.device, torch.float64)
        d = a.double() - b
        diff, ref_norm = d.norm().item(), b.norm().item()
        err = diff / ref_norm if ref_norm > 0 else (0.0 if diff == 0 else math.inf)
        worst = max(worst, err)
        if name == "y":
            dy = d.abs().max().item()
        if not err <= tol:
            fails.append(f"{name} {err:.2g} > {tol:g}")
            continue
        slice_tol = min(SLICE_FACTOR * tol, SLICE_CAP)
        for dim in SLICED.get(name, ()):
            serr = slice_error(d, b, dim)
            if not serr <= slice_tol:
                what = "batch row" if dim == SLICED[name][0] else "time step"
                fails.append(f"{name} {serr:.2g} > {slice_tol:g} in a {what}")
                break
    return dy, (worst if ref is not None else None), ("FAIL: " + ", ".join(fails) if fails
                                                      else "ok" if ref is not None else "reference")


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An error as one line (a JIT build failure or a CUDA error spans many)."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:limit]


# Backend variants: (fused_rnn backend, environment while it builds and runs).
VARIANTS = {"cuda-p1": ("cuda", {"FUSED_RNN_CUDA_K_PARTS": "1"}),
            "cuda-cl16": ("cuda", {"FUSED_RNN_CUDA_CLUSTER": "16"}),
            "cuda-cl16ds": ("cuda", {"FUSED_RNN_CUDA_CLUSTER": "16",
                                     "FUSED_RNN_CUDA_CLUSTER_EXCHANGE": "dsmem"}),
            "cuda-cl8": ("cuda", {"FUSED_RNN_CUDA_CLUSTER": "8"}),
            "cuda-tc": ("cuda", {"FUSED_RNN_CUDA_TEAM_CLUSTERS": "on"}),
            "cuda-b32": ("cuda", {"FUSED_RNN_CUDA_MAX_BLOCKS": "32"}),
            "cuda-g1": ("cuda", {"FUSED_RNN_CUDA_MAX_GROUPS": "1"}),
            "cuda-direct": ("cuda", {"FUSED_RNN_CUDA_STAGE_K": "0"}),
            "cuda-nopipe": ("cuda", {"FUSED_RNN_CUDA_STAGE_COPY": "async"}),
            "cuda-regcopy": ("cuda", {"FUSED_RNN_CUDA_STAGE_COPY": "registers"}),
            "cuda-tagged": ("cuda", {"FUSED_RNN_CUDA_STAGE_COPY": "tagged"}),
            "cuda-pipelined": ("cuda", {"FUSED_RNN_CUDA_STAGE_COPY": "pipelined"}),
            "cuda-tb1": ("cuda", {"FUSED_RNN_CUDA_TILE_BLOCK": "1"}),
            "cuda-pb1": ("cuda", {"FUSED_RNN_CUDA_POINT_BATCH": "1"}),
            "cuda-gemm32": ("cuda", {"FUSED_RNN_CUDA_GEMMS": "fp32"}),
            "cuda-genfrag": ("cuda", {"FUSED_RNN_CUDA_FRAG_LOADS": "generic"}),
            "cuda-mma": ("cuda", {"FUSED_RNN_CUDA_FRAG_LOADS": "mma"}),
            "cuda-step": ("cuda", {"FUSED_RNN_CUDA_PATH": "step"}),
            "cuda-persistent": ("cuda", {"FUSED_RNN_CUDA_PATH": "persistent"})}
# The variants that choose the CUDA backend's path (ops.cuda_path) rather than tune the
# persistent kernel: timed with the backends (rounds) and at the one-step shapes (timed_here).
PATH_VARIANTS = ("cuda-step", "cuda-persistent")
# The CUDA backend's stage copies: what STAGE_COPY_RULES come from (auto_rules.py --stage-copy).
COPY_VARIANTS = ("cuda-tagged", "cuda-pipelined")
# Every variant but cuda-step sets the persistent kernel up differently, so it runs that kernel
# on every row it times, whatever the CUDA backend's path rules (ops.PATH_RULES) choose for plain cuda.
for _, _env in VARIANTS.values():
    _env.setdefault("FUSED_RNN_CUDA_PATH", "persistent")


def _cuda_plans(mode, shape, dtype_name) -> list | None:
    """The forward and backward launch plans the cuda backend takes for this row under the
    current environment (plan.py, the mirror of plan.h), from this GPU's SM count and opt-in
    shared memory; None without a GPU or those properties."""
    launches = _cuda_launches(mode, shape, dtype_name)
    return None if launches is None else [p for _, p in launches]


def _cuda_launches(mode, shape, dtype_name) -> list | None:
    """_cuda_plans with each plan's math: [(math, plan) forward, (math, plan) backward]."""
    import torch

    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
    except (AssertionError, RuntimeError):
        return None
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if not smem:
        return None
    from fused_rnn.ops.cuda import ops
    from fused_rnn.ops.cuda import plan as P

    B, _, H = shape
    is16 = dtype_name in ("bf16", "fp16")
    tf32 = dtype_name == "fp32" and torch.backends.cudnn.allow_tf32
    b_pad = -(-B // P.K_BATCH_PAD) * P.K_BATCH_PAD
    return [P.choose_launch(P.CELLS[mode], is16, tf32, H, bw, props.multi_processor_count, smem,
                            b_pad, ops.max_groups(), ops.max_stage_k(), ops.k_parts(),
                            ops.max_blocks(), ops.cluster(), ops.team_clusters(),
                            getattr(props, "major", 0) >= 9, ops.cluster_exchange_dsmem())
            for bw in (False, True)]


# The plan notes' marks for FwdParams::cluster (fused_rnn.h ClusterMode): none, batch groups as
# clusters, K-parts teams as clusters, batch groups as clusters exchanging through DSMEM.
CLUSTER_MARKS = ("", " cl", " tc", " ds")


def _plan_note(plans, tagged: bool = False) -> str:
    """'plan fwd b128 g1 p4 k224, bwd b128 g1 p8 k304': blocks, batch groups, K parts, stage K
    columns, and ' cl' where the groups run as clusters (' tc': the K-parts teams; ' ds':
    groups as clusters exchanging through distributed shared memory). ``tagged``: the layer's
    stage copy is the tagged exchange (16-bit, ops.stage_copy), and ' tg' marks each launch
    whose plan takes it (plan.tagged_exchange; the others run the registers copy)."""
    from fused_rnn.ops.cuda import plan as P

    return "plan " + ", ".join(f"{d} b{p.blocks} g{p.groups} p{p.parts} k{p.stage_k}"
                               f"{CLUSTER_MARKS[p.cluster]}"
                               f"{' tg' if tagged and P.tagged_exchange(p, True) else ''}"
                               for d, p in zip(("fwd", "bwd"), plans))


def _stage_copy_tagged(mode, shape, dtype_name, device) -> bool:
    """Whether the cuda backend's stage copy for this row, under the current environment, is
    the tagged exchange (ops.stage_copy: the setting, or under auto a StageCopyRule)."""
    if dtype_name not in ("bf16", "fp16"):
        return False
    import torch

    from fused_rnn.ops.cuda import ops

    B, T, H = shape
    dtype = getattr(torch, DTYPE_NAMES[dtype_name])
    return ops.stage_copy(mode, dtype, B, H, T, torch.device(device)) == ops.STAGE_COPIES["tagged"]


def _variant_is_moot(backend, mode, shape, dtype_name, device) -> bool:
    """True when a variant would run exactly cuda's plans: cuda-g1 at B_pad = 32 (one batch
    group either way); on a GPU, cuda-p1, cuda-b32, cuda-cl8, cuda-cl16 and cuda-tc where their
    setting leaves both of cuda's launch plans as they are (plan.py: no K parts; H already on at
    most 32 blocks, or a cap that H's W_hh does not fit under rising back to them; no batch
    group fitting in a cluster of that size; no K parts to make teams of); cuda-cl16ds where
    neither launch would exchange through distributed shared memory (it would only repeat
    cuda-cl16); cuda-tb1 where no chunk of cuda's two launches has its tiles blocked, and cuda-pb1
    where neither launch loads its points in batches (each would time the same code);
    cuda-gemm32 on fp32 data (its GEMMs' operands are fp32 already); cuda-genfrag where neither
    launch has its X in shared memory (staged or the dsmem mirror) on tensor cores (both settings
    then load every WMMA fragment with the generic forms, or run the FMA path); cuda-mma where
    neither launch is a TF32 one with X in shared memory (the only launches it changes);
    cuda-persistent where cuda runs the persistent kernel anyway (no path rule, ops.PATH_RULES,
    sends the row to the per-step path); cuda-tagged on fp32 data, where cuda takes the tagged
    exchange anyway (a stage copy rule, ops.STAGE_COPY_RULES) and, on a GPU, where neither
    launch's plan can take it (plan.tagged_exchange: staged, no K parts, no DSMEM mirror; it
    would time cuda-regcopy's code); cuda-pipelined where cuda's stage copy is the pipelined
    one anyway (no stage copy rule sends it to the tagged exchange)."""
    if backend == "cuda-g1":
        return shape[0] <= 32
    if backend == "cuda-persistent":
        import torch

        from fused_rnn.ops.common import cudnn_rnn_tf32
        from fused_rnn.ops.cuda import ops

        dtype = getattr(torch, DTYPE_NAMES[dtype_name])
        tf32 = dtype_name != "fp32-strict" and cudnn_rnn_tf32()
        B, T, H = shape
        return ops.cuda_path(mode, dtype, B, H, T, torch.device(device), tf32) == "persistent"
    if backend == "cuda-gemm32":
        return dtype_name not in ("bf16", "fp16")
    if backend == "cuda-pipelined":
        return not _stage_copy_tagged(mode, shape, dtype_name, device)
    if backend == "cuda-tagged":
        if dtype_name not in ("bf16", "fp16") or _stage_copy_tagged(mode, shape, dtype_name,
                                                                     device):
            return True
        if device == "cuda":
            from fused_rnn.ops.cuda import plan as P

            launches = _cuda_launches(mode, shape, dtype_name)
            return launches is not None and not any(P.tagged_exchange(p, True)
                                                    for _, p in launches)
        return False
    if backend == "cuda-genfrag" and device == "cuda":
        from fused_rnn.ops.cuda import ops
        from fused_rnn.ops.cuda import plan as P

        launches = _cuda_launches(mode, shape, dtype_name)
        return launches is not None and (ops.frag_loads() == ops.FRAG_LOADS["generic"] or all(
            math == P.MATHS["fma"] or (p.stage_k == 0 and p.cluster != P.CLUSTER_GROUPS_DSMEM)
            for math, p in launches))
    if backend == "cuda-mma" and device == "cuda":
        from fused_rnn.ops.cuda import plan as P

        launches = _cuda_launches(mode, shape, dtype_name)
        return launches is not None and all(
            math != P.MATHS["tf32"] or (p.stage_k == 0 and p.cluster != P.CLUSTER_GROUPS_DSMEM)
            for math, p in launches)
    if backend == "cuda-tb1" and device == "cuda":
        from fused_rnn.ops.cuda import ops
        from fused_rnn.ops.cuda import plan as P

        launches = _cuda_launches(mode, shape, dtype_name)
        return launches is not None and all(
            P.chunk_blockings(p.m_pad, p.groups, math, shape[0], ops.tile_block()) == {(1, 1)}
            for math, p in launches)
    if backend == "cuda-pb1" and device == "cuda":
        from fused_rnn.ops.cuda import ops
        from fused_rnn.ops.cuda import plan as P

        launches = _cuda_launches(mode, shape, dtype_name)
        size = [P.point_batch_size(dtype_name in ("bf16", "fp16"), dtype_name == "fp16", math)
                for math, _ in launches or []]
        return launches is not None and (ops.point_batch() == 1 or not any(
            P.point_batches(p, shape[0], n) for (_, p), n in zip(launches, size)))
    if backend not in ("cuda-p1", "cuda-b32", "cuda-cl8", "cuda-cl16", "cuda-cl16ds", "cuda-tc") \
            or device != "cuda":
        return False
    plans = _cuda_plans(mode, shape, dtype_name)
    with mock.patch.dict(os.environ, VARIANTS[backend][1]):
        varied = _cuda_plans(mode, shape, dtype_name)
    if backend == "cuda-cl16ds":
        return varied is not None and all(p.cluster != 3 for p in varied)
    return plans is not None and plans == varied


def _moot(*args) -> bool:
    """_variant_is_moot, False where it cannot tell (the row then runs and says what failed)."""
    try:
        return _variant_is_moot(*args)
    except Exception:
        return False


def measure(args, timer, device, mode, shape, dtype_name, backend, refs,
            timed: bool = True) -> list[dict]:
    """Rows for one (mode, shape, dtype, backend); backend None = cuDNN (torch.nn), whose
    probe tensors go to ``refs`` for the other backends' checks. ``timed=False`` (cuDNN only):
    those tensors, no rows (a fresh process's, for rows of ours the process before left)."""
    if dtype_name == "fp32-strict":
        import torch

        prev = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            return _measure(args, timer, device, mode, shape, dtype_name, backend, refs, timed)
        finally:
            torch.backends.cudnn.allow_tf32 = prev
    return _measure(args, timer, device, mode, shape, dtype_name, backend, refs, timed)


def _label(backend: str | None, device: str) -> str:
    return backend or ("cudnn" if device == "cuda" else "torch.nn (cpu)")


def _measure(args, timer, device, mode, shape, dtype_name, backend, refs,
             timed: bool = True) -> list[dict]:
    assert timed or backend is None, "only cuDNN's reference is taken untimed"
    if backend in VARIANTS:
        real, env = VARIANTS[backend]
        with mock.patch.dict(os.environ, env):  # restored afterwards
            rows = _measure(args, timer, device, mode, shape, dtype_name, real, refs)
        for r in rows:
            r["backend"] = backend
        return rows
    import torch

    B, T, H = args.shape_table[shape]
    dtype = getattr(torch, DTYPE_NAMES[dtype_name])
    import fused_rnn.backends

    base = dict(cell=mode, shape=shape, BxTxH=f"{B}x{T}x{H}", dtype=dtype_name,
                backend=_label(backend, device))
    try:
        model, x, cot = build(mode, B, T, H, dtype, device, backend)
        # Fallback warnings are once per reason per process; forget the earlier ones so that
        # this probe sees its own (a fallen-back row must never be timed under our name).
        fused_rnn.backends._warned.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = probe(model, mode, x, cot, device)
            # The weight and bias gradients once more on the first SHORT_T steps, where each
            # step is a large share of the sum (see SHORT_T).
            got_short = None
            if T > SHORT_T:
                xs, cs = x[:, :SHORT_T].contiguous(), cot[:, :SHORT_T].contiguous()
                got_short = {k: t for k, t in probe(model, mode, xs, cs, device).items()
                             if k in WEIGHT_GRADS}
        fell_back = [str(w.message) for w in caught if "falling back" in str(w.message)]
        if fell_back:  # never time the reference under our name
            return [dict(base, **{"pass": p, "note": fell_back[0]}) for p in args.passes]
        key = (mode, shape, dtype_name)
        if backend is None:  # kept for the later rounds on the host, not in device memory
            refs[key] = {k: None if t is None else t.cpu() for k, t in got.items()}
            if got_short is not None:
                refs[(*key, "short")] = {k: None if t is None else t.cpu()
                                         for k, t in got_short.items()}
            dy, err, check = compare(got, None, 0.0)
            if not timed:
                return []
        elif key in refs:
            dy, err, check = compare(got, refs[key], tolerance(dtype_name))
            if got_short is not None:
                _, _, short = compare(got_short, refs[(*key, "short")], tolerance(dtype_name))
                if short != "ok":
                    short = f"first {SHORT_T} steps: {short.removeprefix('FAIL: ')}"
                    check = f"{check}, {short}" if check.startswith("FAIL") else f"FAIL: {short}"
        else:
            dy, err, check = None, None, "no cuDNN reference"
        del got, got_short
        if backend is not None and zero_state_differs(model, mode, x):
            failed = "y without h0 is not y with a zero h0"
            check = f"{check}, {failed}" if check.startswith("FAIL") else f"FAIL: {failed}"
    except Exception as e:  # a backend that cannot run here, or fails: say why, keep going
        return [dict(base, **{"pass": p, "note": _one_line(e)}) for p in args.passes]
    fns = passes(model, x, cot)
    plan = []
    if backend == "cuda" and device == "cuda":
        try:
            from fused_rnn.ops.common import cudnn_rnn_tf32
            from fused_rnn.ops.cuda import ops

            if ops.cuda_path(mode, dtype, B, H, T, torch.device(device),
                             cudnn_rnn_tf32()) == "step":
                plan = ["path step"]  # no launch plan: a GEMM and a launch a step
            else:
                plans = _cuda_plans(mode, (B, T, H), dtype_name)
                tagged = _stage_copy_tagged(mode, (B, T, H), dtype_name, device)
                plan = [_plan_note(plans, tagged)] if plans is not None else []
        except Exception as e:  # the plan mirror failing costs the note, not the row
            plan = [f"plan: {_one_line(e, 120)}"]
    rows = []
    for p in args.passes:
        row = dict(base, **{"pass": p, "max_abs_dy": dy, "max_rel_err": err, "check": check})
        notes = list(plan)
        fallbacks = fused_rnn.backends.fallback_counts()
        row_check = check
        try:
            ms, reps = timer(fns[p], rep_ms=ONE_STEP_REP_MS if T == 1 else None)
            peak = peak_mib(fns[p], device)
        except Exception as e:  # recorded; the next pass, backend and row still run
            notes.append(_one_line(e))
        else:
            row.update(ms=ms, us_per_step=1e3 * ms / T, reps=reps, peak_MiB=peak)
            if reps is not None and reps < MIN_REPS:
                notes.append(f"only {reps} runs timed")
            if backend is not None and key in refs and check == "ok":
                # The timed calls were not the checked one: a kernel right on its first launch
                # and wrong after (state left over from an earlier launch) is checked again,
                # this pass's outputs, after its timing.
                row_check = recheck(model, mode, x, cot, device, refs[key], dtype_name,
                                    backward=p != "fwd")
        if backend is not None and fused_rnn.backends.fallback_counts() != fallbacks:
            # The check's pass ran the kernels, a timed call did not: not ours that was timed.
            fell = "a timed call fell back to another backend"
            row_check = (f"{row_check}, {fell}" if row_check.startswith("FAIL")
                         else f"FAIL: {fell}")
        row["check"] = row_check
        if notes:
            row["note"] = "; ".join(notes)
        rows.append(row)
    return rows


def recheck(model, mode: str, x, cot, device: str, ref: dict, dtype_name: str,
            backward: bool) -> str:
    """The check against cuDNN's ``ref`` once more, after the timed calls: "ok", or
    "FAIL: after timing, ..." (a probe that raises says so)."""
    try:
        again = probe(model, mode, x, cot, device, backward=backward)
        _, _, check = compare(again, ref, tolerance(dtype_name))
    except Exception as e:  # any failure of the kernels is the row's
        check = f"FAIL: {_one_line(e)}"
    return check if check == "ok" else "FAIL: after timing, " + check.removeprefix("FAIL: ")


def add_ratios(rows: list[dict]) -> None:
    """x_cudnn_* = cuDNN time / this row's time, same cell, shape and pass."""
    base = {}
    for r in rows:
        if r["backend"] in ("cudnn", "torch.nn (cpu)") and "ms" in r:
            base[(r["cell"], r["shape"], r["pass"], r["dtype"])] = r
    for r in rows:
        if "ms" not in r:
            continue
        same = base.get((r["cell"], r["shape"], r["pass"], r["dtype"]))
        fp16 = base.get((r["cell"], r["shape"], r["pass"], "fp16"))
        r["x_cudnn_same_dtype"] = same["ms"] / r["ms"] if same else None
        r["x_cudnn_fp16"] = fp16["ms"] / r["ms"] if fp16 else None


# --------------------------------------------------------------------------- report
def environment(device: str, args) -> dict:
    import torch

    env = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
           "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        env["capability"] = f"{major}.{minor}"  # auto_rules.py keys its rules on it
        env["cuda"] = torch.version.cuda
        env["cudnn"] = str(torch.backends.cudnn.version())
    else:
        env["gpu"] = "none (dry run on the CPU, Triton interpreter)"
    env["tf32"] = f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
    env["commit"] = commit()
    # What auto_rules.py must see: settings that changed the kernels for the whole run (e.g.
    # gpu_check.sh's FUSED_RNN_CUDA_K_PARTS=1 after a failed K-parts test; a variant's own
    # setting is its row label), and gpu_check.sh's summary of the CUDA GPU tests.
    env["overrides"] = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                                if k.startswith("FUSED_RNN_")) or "none"
    env["gpu_tests"] = " ".join(os.environ.get("FRNN_GPU_TESTS", "").split()) or "not run"
    env["command"] = "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    return env


def commit() -> str:
    """$FRNN_COMMIT where set (a lent GPU gets the tree without .git), else git's HEAD."""
    pinned = os.environ.get("FRNN_COMMIT", "").strip()
    if pinned:
        return pinned
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, check=False, text=True).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"


def _fmt(v, digits=3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e-2 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _md_cell(v) -> str:
    """One table cell: a newline or an unescaped "|" in a note would break the row."""
    return " ".join(_fmt(v).split()).replace("|", "\\|")


def report_paths(env: dict, args) -> tuple[Path, Path]:
    """The .md and .csv, named once per run (the date of its start)."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"].split(" (")[0]).strip("-") or "cpu"
    stem = f"{env['date'][:10]}-{'cpu-dryrun' if args.dry_run else gpu}"
    return args.out_dir / f"{stem}.md", args.out_dir / f"{stem}.csv"


def _replace(path: Path, text: str) -> None:
    """Write to a temporary file and rename it over ``path``: a kill leaves the last whole one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(rows: list[dict], env: dict, args, skipped: list[str],
                 paths: tuple[Path, Path]) -> tuple[Path, Path]:
    md, csv_path = paths
    args.out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(env) + COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:  # skipped rows too: auto_rules.py must see what was not measured
        w.writerow({**env, **{k: r.get(k, "") for k in COLUMNS}})
    _replace(csv_path, buf.getvalue())
    lines = [f"# GPU benchmark: fused_rnn vs cuDNN ({env['date']})", ""]
    if args.dry_run:
        lines += [("**Dry run** on the CPU under the Triton interpreter at tiny shapes: checks the "
                   "script only; the numbers mean nothing."), ""]
    lines += [f"- {k}: {_md_cell(v)}" for k, v in env.items()] + [
        "- timing: " + (f"time.perf_counter median of {MIN_REPS} after a warm-up" if args.dry_run
                        else f"triton.testing.do_bench median (warm-up, L2 flushed, at least "
                             f"{MIN_REPS} runs)")
        + "; one layer, input size = hidden size, batch_first; ratio = cuDNN ms / ours "
        "(> 1: faster)",
        "- check: one fwd+bwd (x, h0, c0 requiring grad; gradients into y, h_n, c_n) against "
        "cuDNN's on the same inputs: y, h_n, c_n, dx, dh0, dc0 (LSTM), dW_hh, dW_ih, db_hh, "
        "db_ih finite and within relative norm error "
        + ", ".join(f"{v:g} ({k})" for k, v in TOLERANCE.items())
        + f" (fp32 without TF32: the fp32-strict bound), each batch row and time step of y, "
        f"dx and the states within {SLICE_FACTOR:g}x that (at most {SLICE_CAP:g}); "
        "max abs Δy: the largest |Δy|", ""]
    lines += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in rows:
        if not r.get("_skipped"):
            lines.append("| " + " | ".join(_md_cell(r.get(k)) for k in COLUMNS) + " |")
    if skipped:
        lines += ["", f"Skipped after the time budget ({args.time_budget:.0f} s): " + ", ".join(skipped)]
    _replace(md, "\n".join(lines) + "\n")
    return md, csv_path


def save(rows: list[dict], env: dict, args, skipped: list[str], paths) -> None:
    """Ratios and both files, after every backend's rows: what was measured survives a later
    hang, kill or sticky CUDA error. Under the GPU script (``$OUT`` and ``$FRNN_STAMP`` set),
    copied to ``$OUT`` as well, which is all the lent machine returns: a kill by the device's
    own limit, which may come before the script's budget, still returns the rows so far."""
    try:
        add_ratios(rows)
    except Exception as e:  # the times are still worth writing
        print(f"ratios not computed: {_one_line(e)}", flush=True)
    write_report(rows, env, args, skipped, paths)
    out = os.environ.get("OUT", "")
    if out and os.environ.get("FRNN_STAMP") and os.path.isdir(out):
        for path in paths:
            tmp = Path(out) / f".{path.name}.tmp"
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, Path(out) / path.name)
            except OSError as e:  # the script's own collection copies them later anyway
                print(f"not copied to $OUT: {_one_line(e)}", flush=True)


def short_table(rows: list[dict]) -> str:
    """The fwd+bwd ratios only, for the end of the GPU script's log."""
    out = ["cell  shape dtype backend     fwd+bwd ms  x cuDNN(same)  x cuDNN fp16  check  note"]
    for r in rows:
        if r.get("pass") == "fwd+bwd" and r["backend"] not in ("cudnn", "torch.nn (cpu)") \
                and not r.get("_skipped"):
            out.append(f"{r['cell']:5s} {r['shape']:5s} {r['dtype']:5s} {r['backend']:11s} "
                       f"{_fmt(r.get('ms')):>10s}  {_fmt(r.get('x_cudnn_same_dtype')):>13s}  "
                       f"{_fmt(r.get('x_cudnn_fp16')):>12s}  {r.get('check') or '-'}  "
                       f"{r.get('note', '')[:60]}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def rounds(backends: list[str]) -> list[list]:
    """The order rows are timed in, one round over every configuration at a time: cuDNN (None)
    and the first backend named; then the other backends and the CUDA backend's paths
    (PATH_VARIANTS); then its stage copies (COPY_VARIANTS); then the other variants (cuda-p1,
    ...), which tune the persistent kernel. Under --time-budget a later round never costs an
    earlier one a configuration, so the first backend named gets its full table against cuDNN
    first, and the rows the CUDA backend's own rules come from (auto_rules.py --paths, then
    --stage-copy) go before the tuning variants'."""
    primary = [b for b in backends if b not in VARIANTS]
    paths = [b for b in backends if b in PATH_VARIANTS]
    copies = [b for b in backends if b in COPY_VARIANTS]
    tuning = [b for b in backends if b in VARIANTS and b not in PATH_VARIANTS + COPY_VARIANTS]
    return [r for r in ([None, *primary[:1]], primary[1:] + paths, copies, tuning) if r]


def configurations(args, one_step: bool = False) -> list[tuple[str, str, str]]:
    """(mode, shape, dtype) in PRIORITY order, each (mode, dtype) over all its shapes of more
    than one step, or (one_step) of one step (STEP_SHAPES)."""
    return [(mode, shape, dtype_name) for mode, dtype_name in PRIORITY
            if mode in args.modes and dtype_name in args.dtypes
            for shape in args.shapes if (args.shape_table[shape][1] == 1) == one_step]


def schedule(args) -> list[tuple[list, list[tuple[str, str, str]]]]:
    """(backends, configurations) passes in the order they are timed: each round (rounds) of
    backends and paths over the shapes of more than one step; the stage copies' round there
    (the tagged exchange, in 16 bits only: after the fp32 rows of every other variant it would
    get no time); then the one-step shapes, by every round of backends and paths (the variants
    time no one-step shape, timed_here); then the tuning variants. So the rows PATH_RULES come
    from, both groups (auto_rules.py --paths), go before any variant that tunes the persistent
    kernel, and cuDNN's one-step rows (round one) before the others need them."""
    chunks, steps = configurations(args), configurations(args, one_step=True)
    every = rounds(args.backends)
    variants = [r for r in every if all(b in VARIANTS and b not in PATH_VARIANTS for b in r)]
    copies = [r for r in variants if all(b in COPY_VARIANTS for b in r)]
    tuning = [r for r in variants if r not in copies]
    early = [r for r in every if r not in variants]
    return ([(r, chunks) for r in early + copies] + [(r, steps) for r in early]
            + [(r, chunks) for r in tuning])


def timed_here(backend, shape: tuple[int, int, int]) -> bool:
    """Whether ``backend`` (None: cuDNN) gets rows at ``shape`` (B, T, H) at all: every backend
    and variant at chunks of more than one step; at one step, the backends and PATH_VARIANTS
    (the other variants tune the persistent kernel's chunk loop)."""
    return shape[1] > 1 or backend not in VARIANTS or backend in PATH_VARIANTS


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Before triton is imported: the kernels are defined for the interpreter.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (use --dry-run to check the script on the CPU)")
        return 2
    timer = Timer(device, args.warmup_ms, args.rep_ms)
    start = time.monotonic()
    rows, skipped, refs = [], [], {}
    if args.resume_rows:  # the process before this one lost its CUDA context (continue_fresh)
        state = json.loads(Path(args.resume_rows).read_text())
        Path(args.resume_rows).unlink(missing_ok=True)
        rows, skipped, env = state["rows"], state["skipped"], state["env"]
        paths = tuple(Path(p) for p in state["paths"])
        start -= state["elapsed"]  # the budget is the whole run's
    else:
        env = environment(device, args)
        paths = report_paths(env, args)
    done = {_row_key(r) for r in rows}
    # configurations whose cuDNN rows a process before this one timed: the reference tensors
    # of ours' checks are taken again here, once, where one of ours is left to time
    retake = {key[:3] for key in done if key[3] == _label(None, device)}
    for round_backends, configs in schedule(args):
        for mode, shape, dtype_name in configs:
            B, T, H = args.shape_table[shape]
            label = f"{mode}-{shape}-{dtype_name}"
            todo = [b for b in round_backends if timed_here(b, (B, T, H))
                    and not _moot(b, mode, (B, T, H), dtype_name, device)
                    and (mode, shape, dtype_name, _label(b, device)) not in done]
            if not todo:
                continue  # only variants that would time the same kernels as cuda, or none here
            if time.monotonic() - start > args.time_budget:
                skipped.append(label + ("" if None in round_backends else f" ({','.join(todo)})"))
                rows += [dict(cell=mode, shape=shape, BxTxH=f"{B}x{T}x{H}", dtype=dtype_name,
                              backend=_label(b, device), note="skipped: time", _skipped=True,
                              **{"pass": p}) for b in todo for p in args.passes]
                continue
            if (mode, shape, dtype_name) in retake and None not in todo:
                retake.discard((mode, shape, dtype_name))
                measure(args, timer, device, mode, shape, dtype_name, None, refs, timed=False)
                if _context_lost(device):
                    new = [dict(cell=mode, shape=shape, BxTxH=f"{B}x{T}x{H}", dtype=dtype_name,
                                backend=_label(b, device), **{"pass": p},
                                note="not run: cuDNN's reference, taken again in a fresh "
                                     "process, took the CUDA context with it")
                           for b in todo for p in args.passes]
                    continue_fresh(rows + new, skipped, env, paths, start, argv)
            for backend in todo:
                t0 = time.monotonic()
                new = measure(args, timer, device, mode, shape, dtype_name, backend, refs)
                lost = _context_lost(device)  # sticky: every later CUDA call would fail too
                for r in new if lost else []:
                    r["note"] = "; ".join(filter(None, [r.get("note"), (
                        "it took the CUDA context with it: the rows after it ran in a fresh "
                        "process")]))
                rows += new
                for r in new:
                    print(f"{label:18s} {r['backend']:14s} {r['pass']:8s} "
                          f"{_fmt(r.get('ms')):>9s} ms  {r.get('check') or '-':6.40s}  "
                          f"{r.get('note', '')[:80]}  [{time.monotonic() - t0:.1f}s]", flush=True)
                save(rows, env, args, skipped, paths)  # before the next backend can hang
                if lost:
                    continue_fresh(rows, skipped, env, paths, start, argv)
            if device == "cuda":
                try:
                    torch.cuda.empty_cache()
                except Exception as e:  # a sticky CUDA error: the next rows will say so too
                    print(f"empty_cache: {_one_line(e)}", flush=True)
    save(rows, env, args, skipped, paths)
    md, csv_path = paths
    print(f"\nwrote {md}\nwrote {csv_path}\n")
    print(short_table(rows))
    failed = sorted({f"{r['backend']} {r['cell']} {r['shape']} {r['dtype']}" for r in rows
                     if str(r.get("check") or "").startswith("FAIL")})
    if failed:  # every row is still in the table; the run as a whole did not pass
        print(f"{len(failed)} configurations failed the check against cuDNN: "
              + "; ".join(failed), flush=True)
    unpassed = not_passed(rows, device)
    if unpassed:
        print(f"{len(unpassed)} rows were not measured, or ours not checked: "
              + "; ".join(unpassed), flush=True)
    return 1 if failed or unpassed else 0


def _row_key(row: dict) -> tuple[str, str, str, str]:
    return row["cell"], row["shape"], row["dtype"], row["backend"]


def _context_lost(device: str) -> bool:
    """Whether this process can no longer use the GPU: a kernel fault (an illegal address,
    say) is sticky, and every later CUDA call fails with it, cuDNN's included. The main-job
    bench's check (``fused_rnn.bench``)."""
    import torch

    from fused_rnn.bench import _context_lost as lost

    return lost(torch.device(device))


def continue_fresh(rows: list[dict], skipped: list[str], env: dict, paths, start: float,
                   argv: list[str] | None) -> NoReturn:
    """After a row took the CUDA context with it: this process is replaced by a fresh one
    (``os.execv``: the same PID, so the GPU script's timeout still holds it, and the broken
    context's memory is freed) with the same arguments, which carries on with the rows not
    yet in ``rows``, under what is left of the time budget, writing the same report. A fault
    costs its own row: that row is in ``rows``, so each fresh process gets further."""
    fd, state = tempfile.mkstemp(prefix="bench_gpu_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"rows": rows, "skipped": skipped, "env": env,
                   "paths": [str(p) for p in paths], "elapsed": time.monotonic() - start}, f,
                  default=str)
    given = list(sys.argv[1:] if argv is None else argv)
    if "--resume-rows" in given:  # this process was such a fresh one itself
        i = given.index("--resume-rows")
        del given[i:i + 2]
    cmd = [sys.executable, str(Path(__file__).resolve()), *given, "--resume-rows", state]
    print(f"the CUDA context is lost; the rest in a fresh process: {' '.join(cmd[1:])}",
          flush=True)
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    raise AssertionError("os.execv returned")  # pragma: no cover


def not_passed(rows: list[dict], device: str) -> list[str]:
    """On a GPU run, the rows that started and have no time (a build, probe or timing that
    raised, or a probe that fell back) and the rows of ours with a time but no check against
    cuDNN (its row failed): with these the run did not pass either, though no check failed.
    Rows skipped for time are listed apart (the report's "skipped"); a dry run on the CPU,
    where backends may be unavailable, is not judged."""
    if device != "cuda":
        return []
    out = []
    for r in rows:
        if r.get("_skipped"):
            continue
        check = str(r.get("check") or "")
        ours = r["backend"] not in ("cudnn", "torch.nn (cpu)")
        if "ms" not in r or (ours and check != "ok" and not check.startswith("FAIL")):
            why = r.get("note") or check or "not measured"
            out.append(f"{r['backend']} {r['cell']} {r['shape']} {r['dtype']} {r['pass']} "
                       f"({why[:80]})")
    return out


if __name__ == "__main__":
    sys.exit(main())
