"""GPU benchmark: fused_rnn kernel backends against cuDNN (torch.nn), in one process.

One layer, input size = hidden size, ``batch_first``, shapes S1-S6 of ``ANCHORS.md``, LSTM and
GRU, fp32 / bf16 / fp16. For every row: forward ("fwd", a training forward: parameters require
grad) and forward+backward ("fwd+bwd", ``y.backward(g)`` with a random cotangent), median time
from ``triton.testing.do_bench`` (warm-up first, L2 flushed between runs), for cuDNN and each
backend named in ``--backends``. Ratios are cuDNN time / ours (> 1: we are faster), against
cuDNN in the same dtype and against cuDNN fp16 (cuDNN's fastest mode). ``max|dy|`` is the
largest difference between our output and cuDNN's on the timed inputs (a guard against timing
something wrong). fp32 runs with TF32 as ``torch.backends.cudnn.allow_tf32`` says (default on,
as in ANCHORS.md); the header records it. ``fp32-strict`` runs fp32 with it off, for cuDNN and
for us alike (our plain-fp32 FMA kernels; ANCHORS.md has cuDNN's figures for S1-S3).

Writes ``<out-dir>/<date>-<gpu>.md`` (versions, commit, table) and a ``.csv`` next to it.

    python benchmarks/bench_gpu.py --backends triton,cuda [--modes LSTM,GRU] [--shapes S1,S3]
    python benchmarks/bench_gpu.py --dry-run   # CPU, Triton interpreter, tiny shapes

``--dry-run`` exercises everything but the GPU: argument parsing, module set-up, timing loop,
table and CSV writing, on tiny shapes with the Triton interpreter and aten's CPU RNN standing in
for cuDNN. Its numbers mean nothing. ``--time-budget`` stops starting new rows after that many
seconds (the remaining rows are listed as skipped), so the GPU script always finishes. Rows
are timed in rounds over all configurations: cuDNN with the first backend named, then the other
backends, then the variants; so name first the backend whose table matters most.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

SHAPES = {  # name: (B, T, H), from ANCHORS.md
    "S1": (16, 1024, 768),
    "S2": (64, 100, 512),
    "S3": (64, 128, 1024),
    "S4": (256, 128, 1024),
    "S5": (8, 256, 256),
    "S6": (128, 64, 256),
}
DRY_SHAPES = {"D1": (3, 4, 16), "D2": (2, 3, 37), "D3": (40, 2, 16)}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
               "fp32-strict": "float32"}  # fp32 with cudnn.allow_tf32 off (cuDNN's and ours)
COLUMNS = ["cell", "shape", "BxTxH", "dtype", "backend", "pass", "ms", "us_per_step",
           "x_cudnn_same_dtype", "x_cudnn_fp16", "peak_MiB", "max_abs_dy", "note"]


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
                        "(cp.async, no overlap), cuda-regcopy cuda staging through registers "
                        "(FUSED_RNN_CUDA_K_PARTS=1, FUSED_RNN_CUDA_CLUSTER=16|8, "
                        "FUSED_RNN_CUDA_CLUSTER_EXCHANGE=dsmem, "
                        "FUSED_RNN_CUDA_TEAM_CLUSTERS=on, "
                        "FUSED_RNN_CUDA_MAX_BLOCKS=32, "
                        "FUSED_RNN_CUDA_MAX_GROUPS=1, FUSED_RNN_CUDA_STAGE_K=0, "
                        "FUSED_RNN_CUDA_STAGE_COPY=async|registers)")
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
    args = p.parse_args(argv)
    args.backends = _split(args.backends, ("triton", "cuda", *VARIANTS, "reference"), "backend")
    args.modes = _split(args.modes, ("LSTM", "GRU"), "mode")
    args.dtypes = _split(args.dtypes, tuple(DTYPE_NAMES), "dtype")
    args.passes = _split(args.passes, ("fwd", "fwd+bwd"), "pass")
    table = DRY_SHAPES if args.dry_run else SHAPES
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
    return items


# --------------------------------------------------------------------------- timing
class Timer:
    """Median milliseconds of ``fn()``: triton's do_bench on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str, warmup_ms: float, rep_ms: float):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                                 return_mode="median"))
        fn()  # warm-up (compiles / interprets once)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)


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
            "cuda-regcopy": ("cuda", {"FUSED_RNN_CUDA_STAGE_COPY": "registers"})}


def _cuda_plans(mode, shape, dtype_name) -> list | None:
    """The forward and backward launch plans the cuda backend takes for this row under the
    current environment (plan.py, the mirror of plan.h), from this GPU's SM count and opt-in
    shared memory; None without a GPU or those properties."""
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
                            getattr(props, "major", 0) >= 9, ops.cluster_exchange_dsmem())[1]
            for bw in (False, True)]


# The plan notes' marks for FwdParams::cluster (fused_rnn.h ClusterMode): none, batch groups as
# clusters, K-parts teams as clusters, batch groups as clusters exchanging through DSMEM.
CLUSTER_MARKS = ("", " cl", " tc", " ds")


def _plan_note(plans) -> str:
    """'plan fwd b128 g1 p4 k224, bwd b128 g1 p8 k304': blocks, batch groups, K parts, stage K
    columns, and ' cl' where the groups run as clusters (' tc': the K-parts teams; ' ds':
    groups as clusters exchanging through distributed shared memory)."""
    return "plan " + ", ".join(f"{d} b{p.blocks} g{p.groups} p{p.parts} k{p.stage_k}"
                               f"{CLUSTER_MARKS[p.cluster]}"
                               for d, p in zip(("fwd", "bwd"), plans))


def _variant_is_moot(backend, mode, shape, dtype_name, device) -> bool:
    """True when a variant would run exactly cuda's plans: cuda-g1 at B_pad = 32 (one batch
    group either way); on a GPU, cuda-p1, cuda-b32 and cuda-cl* where their setting leaves both
    of cuda's launch plans as they are (plan.py: no K parts; H already on at most 32 blocks, or
    a cap that H's W_hh does not fit under rising back to them; no batch group fitting in a
    cluster of that size; no K parts to make teams of); cuda-cl16ds where neither launch would
    exchange through distributed shared memory (it would only repeat cuda-cl16)."""
    if backend == "cuda-g1":
        return shape[0] <= 32
    if backend not in ("cuda-p1", "cuda-b32", "cuda-cl8", "cuda-cl16", "cuda-cl16ds", "cuda-tc") \
            or device != "cuda":
        return False
    plans = _cuda_plans(mode, shape, dtype_name)
    with mock.patch.dict(os.environ, VARIANTS[backend][1]):
        varied = _cuda_plans(mode, shape, dtype_name)
    if backend == "cuda-cl16ds":
        return varied is not None and all(p.cluster != 3 for p in varied)
    return plans is not None and plans == varied


def measure(args, timer, device, mode, shape, dtype_name, backend) -> list[dict]:
    """Rows for one (mode, shape, dtype, backend); backend None = cuDNN (torch.nn)."""
    if dtype_name == "fp32-strict":
        import torch

        prev = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            return _measure(args, timer, device, mode, shape, dtype_name, backend)
        finally:
            torch.backends.cudnn.allow_tf32 = prev
    return _measure(args, timer, device, mode, shape, dtype_name, backend)


def _measure(args, timer, device, mode, shape, dtype_name, backend) -> list[dict]:
    if backend in VARIANTS:
        real, env = VARIANTS[backend]
        with mock.patch.dict(os.environ, env):  # restored afterwards
            rows = _measure(args, timer, device, mode, shape, dtype_name, real)
        for r in rows:
            r["backend"] = backend
        return rows
    import torch

    B, T, H = args.shape_table[shape]
    dtype = getattr(torch, DTYPE_NAMES[dtype_name])
    import fused_rnn.backends

    name = backend or ("cudnn" if device == "cuda" else "torch.nn (cpu)")
    base = dict(cell=mode, shape=shape, BxTxH=f"{B}x{T}x{H}", dtype=dtype_name, backend=name)
    try:
        model, x, cot = build(mode, B, T, H, dtype, device, backend)
        # Fallback warnings are once per reason per process; forget the earlier ones so that
        # this probe sees its own (a fallen-back row must never be timed under our name).
        fused_rnn.backends._warned.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = model(x)[0]
        fell_back = [str(w.message) for w in caught if "falling back" in str(w.message)]
        if fell_back:  # never time the reference under our name
            return [dict(base, **{"pass": p, "note": fell_back[0]}) for p in args.passes]
    except Exception as e:  # a backend that cannot run here: say why, keep going
        return [dict(base, **{"pass": p, "note": f"{type(e).__name__}: {e}"[:200]}) for p in args.passes]
    rows = []
    fns = passes(model, x, cot)
    plans = _cuda_plans(mode, (B, T, H), dtype_name) if backend == "cuda" and device == "cuda" \
        else None
    for p in args.passes:
        ms = timer(fns[p])
        rows.append(dict(base, **{"pass": p, "ms": ms, "us_per_step": 1e3 * ms / T,
                                  "peak_MiB": peak_mib(fns[p], device), "_y": y.detach()}))
        if plans is not None:
            rows[-1]["note"] = _plan_note(plans)
    return rows


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
        if same is not None and r is not same and "_y" in r and "_y" in same:
            r["max_abs_dy"] = (r["_y"].float() - same["_y"].float()).abs().max().item()


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
        env["cuda"] = torch.version.cuda
        env["cudnn"] = str(torch.backends.cudnn.version())
    else:
        env["gpu"] = "none (dry run on the CPU, Triton interpreter)"
    env["tf32"] = f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        env["commit"] = commit + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown (no git)"
    env["command"] = "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    return env


def _fmt(v, digits=3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def write_report(rows: list[dict], env: dict, args, skipped: list[str]) -> tuple[Path, Path]:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"].split(" (")[0]).strip("-") or "cpu"
    stem = f"{dt.date.today().isoformat()}-{'cpu-dryrun' if args.dry_run else gpu}"
    md, csv_path = args.out_dir / f"{stem}.md", args.out_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(env) + COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**env, **{k: r.get(k, "") for k in COLUMNS}})
    lines = [f"# GPU benchmark: fused_rnn vs cuDNN ({env['date']})", ""]
    if args.dry_run:
        lines += ["**Dry run** on the CPU under the Triton interpreter at tiny shapes: checks the "
                  "script only; the numbers mean nothing.", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] + [
        "- timing: " + ("time.perf_counter median of 3 after a warm-up" if args.dry_run else
                        "triton.testing.do_bench median (warm-up, L2 flushed)")
        + "; one layer, input size = hidden size, batch_first; ratio = cuDNN ms / ours "
        "(> 1: faster)", ""]
    head = ["cell", "shape", "B×T×H", "dtype", "backend", "pass", "ms", "µs/step",
            "× cuDNN same dtype", "× cuDNN fp16", "peak MiB", "max|Δy| vs cuDNN", "note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |")
    if skipped:
        lines += ["", f"Skipped after the time budget ({args.time_budget:.0f} s): " + ", ".join(skipped)]
    md.write_text("\n".join(lines) + "\n")
    return md, csv_path


def short_table(rows: list[dict]) -> str:
    """The fwd+bwd ratios only, for the end of the GPU script's log."""
    out = ["cell  shape dtype backend     fwd+bwd ms  x cuDNN(same)  x cuDNN fp16  note"]
    for r in rows:
        if r.get("pass") == "fwd+bwd" and r["backend"] not in ("cudnn", "torch.nn (cpu)"):
            out.append(f"{r['cell']:5s} {r['shape']:5s} {r['dtype']:5s} {r['backend']:11s} "
                       f"{_fmt(r.get('ms')):>10s}  {_fmt(r.get('x_cudnn_same_dtype')):>13s}  "
                       f"{_fmt(r.get('x_cudnn_fp16')):>12s}  {r.get('note', '')[:60]}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def rounds(backends: list[str]) -> list[list]:
    """The order rows are timed in, one round over every configuration at a time: cuDNN (None)
    and the first backend named; then the other backends; then the variants (cuda-p1, ...).
    Under --time-budget a later round never costs an earlier one a configuration, so the first
    backend named gets its full table against cuDNN first."""
    primary = [b for b in backends if b not in VARIANTS]
    variants = [b for b in backends if b in VARIANTS]
    return [r for r in ([None, *primary[:1]], primary[1:], variants) if r]


def main(argv=None) -> int:
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
    env = environment(device, args)
    start = time.monotonic()
    rows, skipped = [], []
    for round_backends in rounds(args.backends):
        for mode in args.modes:
            for shape in args.shapes:
                for dtype_name in args.dtypes:
                    label = f"{mode}-{shape}-{dtype_name}"
                    todo = [b for b in round_backends
                            if not _variant_is_moot(b, mode, args.shape_table[shape], dtype_name,
                                                    device)]
                    if not todo:
                        continue  # only variants that would time the same kernels as cuda
                    if time.monotonic() - start > args.time_budget:
                        skipped.append(label + ("" if None in round_backends else
                                                f" ({','.join(todo)})"))
                        continue
                    for backend in todo:
                        t0 = time.monotonic()
                        new = measure(args, timer, device, mode, shape, dtype_name, backend)
                        rows += new
                        for r in new:
                            print(f"{label:18s} {r['backend']:14s} {r['pass']:8s} "
                                  f"{_fmt(r.get('ms')):>9s} ms  {r.get('note', '')[:80]}"
                                  f"  [{time.monotonic() - t0:.1f}s]", flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
    add_ratios(rows)
    md, csv_path = write_report(rows, env, args, skipped)
    print(f"\nwrote {md}\nwrote {csv_path}\n")
    print(short_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
