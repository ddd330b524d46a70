"""A small CUDA-backend workload for compute-sanitizer (memcheck, racecheck, synccheck).

Runs forward and backward of every cell, in fp32 (FMA and TF32 tiles) and bf16, with packed
lengths and both directions, on shapes that exercise batch padding, a ragged last block and
several batch chunks; then checks the results against the reference so the run is a test too.
Exit status 0 only if every case matches.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python benchmarks/sanitize_cuda.py [--full] [--cases N] [--time-budget SECONDS]

(No caching allocator, so an out-of-bounds access cannot land inside another tensor's block.)
With FRNN_NO_CLUSTERS=1 (gpu_check.sh sets it when a cluster-mode GPU test failed or hung) the
cluster case is left out, with FUSED_RNN_CUDA_K_PARTS=1 (set when a K-parts test did) the
forced K-parts case, with FRNN_NO_TAGGED=1 (a tagged-exchange test) the tagged case, and with
FRNN_NO_MMA=1 (an mma.sync test) the mma case: a mode that hangs would otherwise eat the tool's
whole step. A case that raises (a kernel fault, reported at the next CUDA call) is named, and
the cases after it are counted as not run: the CUDA context may be gone.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # --time-budget counts from here: importing torch is part of the run

import os
import sys
from unittest import mock

import torch

from fused_rnn.ops import cuda as cuda_backend
from fused_rnn.ops import reference
from fused_rnn.ops.reference import GATES, MODES

# (T, B, I, H): B=70 (padded to 96) takes two batch chunks or three batch groups; H=37 leaves a
# ragged block.
DEVICE = "cuda"  # tests/cuda/test_cuda_emulation.py dry-runs this script on the CPU
SHAPES = [(3, 70, 5, 37), (2, 1, 3, 16)]
DTYPES = [(torch.float32, False, 1e-4), (torch.float32, True, 2e-2), (torch.bfloat16, False, 6e-2)]


def case(mode, T, B, I, H, dtype, tf32, tol, reverse, gen) -> str | None:
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:  # a caller in the same process (the dry-run test) keeps its own setting
        return _case(mode, T, B, I, H, dtype, tf32, tol, reverse, gen)
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def _case(mode, T, B, I, H, dtype, tf32, tol, reverse, gen) -> str | None:
    G = GATES[mode]
    dev = DEVICE

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dev, dtype).requires_grad_()

    x, h0 = r(T, B, I), r(B, H, s=0.5)
    c0 = r(B, H, s=0.5) if mode == "LSTM" else None
    w_ih, w_hh = r(G * H, I, s=H**-0.5), r(G * H, H, s=H**-0.5)
    b_ih, b_hh = r(G * H, s=0.3), r(G * H, s=0.3)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    args = [x, h0, c0, w_ih, w_hh, b_ih, b_hh]
    cots = None
    results = []
    # The reference runs on CPU copies: under compute-sanitizer only the CUDA backend's kernels
    # (and its few GEMMs) run on the GPU, which keeps the instrumented run short.
    for fn, where in ((cuda_backend.rnn_layer, dev), (reference.rnn_layer, "cpu")):
        ls = [None if t is None else t.detach().to(where).requires_grad_() for t in args]
        y, h, c = fn(mode, *ls, None, lengths.to(where), reverse)
        outs = [o for o in (y, h, c) if o is not None]
        if cots is None:
            cots = [torch.randn(o.shape, generator=gen).to(dtype) for o in outs]
        grads = torch.autograd.grad(outs, [t for t in ls if t is not None],
                                    [g.to(where) for g in cots])
        results.append([o.detach().float().cpu() for o in outs] + [g.float().cpu() for g in grads])
        if where == "cuda":
            torch.cuda.synchronize()  # surface asynchronous kernel errors here
    for i, (a, b) in enumerate(zip(*results)):
        err = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if not torch.isfinite(a).all() or err > tol:
            return f"{mode} T{T}-B{B}-H{H} {dtype} tf32={tf32} rev={reverse}: tensor {i} err {err:.3g}"
    return None


# (environment, H instead of the shape's): the fourth runs K parts in teams of 4 (plan.h), which
# needs an even number of unit slices: H=64 gives 8 to 64 blocks on an H100, whatever the cell;
# the fifth runs the batch groups as thread-block clusters (sm_90; elsewhere the grid plan); the
# sixth multiplies the TF32 tiles with mma.sync and ldmatrix (TF32 cases only: it changes nothing
# else), there so that racecheck's first 10 cases include it; the last exchanges h and the
# dgates as tagged words with no step barrier (bf16 cases only: fp32 runs it as registers).
PARTITIONS = (
    ({"FUSED_RNN_CUDA_MAX_GROUPS": "8", "FUSED_RNN_CUDA_STAGE_K": "auto"}, None),
    ({"FUSED_RNN_CUDA_MAX_GROUPS": "1", "FUSED_RNN_CUDA_STAGE_K": "16"}, None),
    ({"FUSED_RNN_CUDA_MAX_GROUPS": "1", "FUSED_RNN_CUDA_STAGE_K": "0"}, None),
    ({"FUSED_RNN_CUDA_MAX_GROUPS": "1", "FUSED_RNN_CUDA_STAGE_K": "16",
      "FUSED_RNN_CUDA_K_PARTS": "4"}, 64),
    ({"FUSED_RNN_CUDA_MAX_GROUPS": "8", "FUSED_RNN_CUDA_CLUSTER": "8"}, None),
    ({"FUSED_RNN_CUDA_MAX_GROUPS": "8", "FUSED_RNN_CUDA_FRAG_LOADS": "mma"}, None),
    ({"FUSED_RNN_CUDA_MAX_GROUPS": "8", "FUSED_RNN_CUDA_STAGE_COPY": "tagged"}, None),
)
# Partitions of the persistent kernel: it runs them whatever the path rules (ops.PATH_RULES)
# would choose for the case.
for _env, _ in PARTITIONS:
    _env["FUSED_RNN_CUDA_PATH"] = "persistent"
CLUSTER_KEYS = ("FUSED_RNN_CUDA_CLUSTER", "FUSED_RNN_CUDA_TEAM_CLUSTERS")


def partitions() -> tuple[list, list[str]]:
    """PARTITIONS less those this run's environment rules out, and why each was left out."""
    keep, left_out = [], []
    no_clusters = os.environ.get("FRNN_NO_CLUSTERS") == "1"
    no_parts = os.environ.get("FUSED_RNN_CUDA_K_PARTS") == "1"
    no_tagged = os.environ.get("FRNN_NO_TAGGED") == "1"
    no_mma = os.environ.get("FRNN_NO_MMA") == "1"
    for env, h in PARTITIONS:
        if no_clusters and any(k in env for k in CLUSTER_KEYS):
            left_out.append(f"{env} (FRNN_NO_CLUSTERS=1)")
        elif no_tagged and env.get("FUSED_RNN_CUDA_STAGE_COPY") == "tagged":
            left_out.append(f"{env} (FRNN_NO_TAGGED=1)")
        elif no_mma and env.get("FUSED_RNN_CUDA_FRAG_LOADS") == "mma":
            left_out.append(f"{env} (FRNN_NO_MMA=1)")
        elif no_parts and env.get("FUSED_RNN_CUDA_K_PARTS", "1") != "1":
            left_out.append(f"{env} (FUSED_RNN_CUDA_K_PARTS=1)")
        else:
            keep.append((env, h))
    return keep, left_out


def main(start: float | None = None) -> int:
    """start: time.monotonic() the --time-budget counts from (default: now)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true",
                    help="every shape/dtype/direction (default: a quick subset, ~1/6)")
    ap.add_argument("--time-budget", type=float, default=float("inf"),
                    help="seconds after which no new case starts; the rest are counted as not "
                         "checked and the exit status is 1 (a caller's timeout then still gets "
                         "the summary)")
    ap.add_argument("--cases", type=int, default=None, metavar="N",
                    help="stop after N cases (a small set for the slow tools, racecheck and "
                         "synccheck: the first N, one cell in every partition first)")
    args = ap.parse_args()
    full = args.full
    start = time.monotonic() if start is None else start
    parts, left_out = partitions()
    for why in left_out:
        print(f"left out: the case {why}", flush=True)
    reason = cuda_backend.unavailable_reason(torch.device(DEVICE))
    if reason is not None:
        print(f"CUDA backend unavailable: {reason}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    todo = []  # (mode, T, B, I, H, dtype, tf32, tol, reverse, env)
    for mode in MODES:
        for T, B, I, H in SHAPES if full else SHAPES[:1]:
            # The quick subset: the TF32 (fp32's default on a GPU) and bf16 tiles. RNN_RELU
            # touches the same memory as RNN_TANH, and in TF32 its unbounded activations let
            # ReLU masks flip beyond the bound (0.037 in the emulation): strict fp32 there.
            quick = DTYPES[::2] if mode == "RNN_RELU" else DTYPES[1:]
            for dtype, tf32, tol in DTYPES if full else quick:
                for reverse in (False, True) if full else (mode in ("GRU", "RNN_RELU"),):
                    # partitions (plan.h): B=70 as 3 batch groups with X staged whole, as 2
                    # chunks per block staged 16 K-columns at a time, unstaged, in K parts, and
                    # as 3 clusters
                    for env, h in parts:
                        if env.get("FUSED_RNN_CUDA_FRAG_LOADS") == "mma" and not (
                                dtype == torch.float32 and tf32):
                            continue
                        if (env.get("FUSED_RNN_CUDA_STAGE_COPY") == "tagged"
                                and dtype == torch.float32):
                            continue
                        todo.append((mode, T, B, I, h or H, dtype, tf32, tol, reverse, env))
    if args.cases is not None:
        # the first case of every partition first (the tagged one's is a bf16 case, past the
        # first cell's), then the rest in order; the first N of those
        firsts = {}
        for c in todo:
            firsts.setdefault(id(c[-1]), c)
        todo = [*firsts.values(), *(c for c in todo if firsts[id(c[-1])] is not c)]
        todo = todo[:max(args.cases, 0)]
    failures = []
    n = unchecked = 0
    stop = None  # why the cases left were not run, where one raised
    for mode, T, B, I, H, dtype, tf32, tol, reverse, env in todo:
        if time.monotonic() - start > args.time_budget:
            unchecked += 1
            continue
        what = f"{mode} H={H} {str(dtype)[6:]} tf32={tf32} rev={reverse} {env}"
        try:
            with mock.patch.dict(os.environ, env):  # restored afterwards
                why = case(mode, T, B, I, H, dtype, tf32, tol, reverse, gen)
        except Exception as e:  # a kernel fault surfaces as the next CUDA call's error
            n += 1
            failures.append(f"case {n} ({what}) raised {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}")
            unchecked, stop = len(todo) - n, "a case raised"
            print(f"case {n}: {what}: RAISED; the CUDA context may be lost, so the "
                  f"{unchecked} cases left are not run", flush=True)
            break
        n += 1
        if why:
            failures.append(f"{why} ({env})")
        # progress, so a run stopped by its caller shows how far it got
        print(f"case {n}: {what}: {'FAIL' if why else 'ok'} "
              f"({time.monotonic() - start:.0f} s)", flush=True)
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    print(f"sanitize_cuda: {n - len(failures)}/{n} cases match the reference"
          + (f"; {unchecked} not checked ({stop or f'time budget {args.time_budget:.0f} s'})"
             if unchecked else "")
          + (f"; {len(left_out)} partition(s) left out" if left_out else ""))
    return 1 if failures or unchecked else 0


if __name__ == "__main__":
    sys.exit(main(start=_T0))
