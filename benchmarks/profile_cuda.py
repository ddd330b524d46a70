"""Where the CUDA kernels' time goes, per step: phase timings (fused_rnn/ops/cuda/profile.py).

For each cell, shape and dtype: one warm-up forward+backward, then one recorded. Every launch
reports microseconds per step for the X stage copies, the recurrent matmul, the epilogue and
the grid sync (mean over blocks; ``sync min`` is the last-arriving block's wait, about the
barrier's own cost, so sync - sync min is waiting for slower blocks), the K parts' second
grid sync where the plan has parts, plus the W load and the kernel's wall time, and each
launch's plan. Together with bench_gpu.py's totals this says what bounds a step: the L2 read of
the exchange (copy), the tensor cores (mma), the cell math (epilogue) or the barrier.

    python benchmarks/profile_cuda.py [--modes LSTM,GRU] [--dtypes fp32,bf16] [--shapes S1,S3]
        [--variants cuda-cl8,cuda-cl16 --variant-shapes S5,S6]   # also under those settings
    python benchmarks/profile_cuda.py --sim   # the kernels on cudasim (CPU), tiny shapes

Writes ``<out-dir>/<date>-<gpu>-phases.md`` and prints the table. The file is rewritten (a
temporary file, then a rename) before and after each configuration, so a run killed at its
caller's timeout -- or stuck in a kernel -- still leaves the rows it measured and names the
configuration it was on. ``--sim`` checks the script: its clock counts clock reads, not time,
so its numbers mean nothing. With FRNN_NO_CLUSTERS=1 (gpu_check.sh sets it when a cluster-mode
GPU test failed or hung) the cluster variants are left out, and the table says so.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # --time-budget counts from here: the imports are part of the run

import argparse
import datetime as dt
import os
import re
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import (
    CLUSTER_MARKS,
    DRY_SHAPES,
    DTYPE_NAMES,
    SHAPES,
    VARIANTS,
    _cuda_plans,
    _moot,
    _stage_copy_tagged,
    environment,
)

COLUMNS = ("cell", "shape", "dtype", "pass", "blocks", "plan", "copy", "mma", "mma own",
           "epilogue", "epi own", "sync", "sync min", "parts", "load", "kernel", "GHz", "run")


# The variants that set the persistent kernel up differently, whose phases these are: not
# cuda-step (no phases), nor cuda-persistent (here plain cuda's own settings).
PHASED = tuple(v for v, (_, env) in VARIANTS.items() if v != "cuda-persistent"
               and env["FUSED_RNN_CUDA_PATH"] != "step")


def table_parser(description: str, dtypes: str) -> argparse.ArgumentParser:
    """The options every table script here takes: --modes, --dtypes, --shapes, --sim,
    --time-budget, --out-dir (finish_args checks and completes them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--modes", default="LSTM,GRU")
    p.add_argument("--dtypes", default=dtypes)
    p.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
    p.add_argument("--sim", action="store_true", help="cudasim on the CPU, tiny shapes")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds after which no new configuration is started (the rest are "
                        "listed as skipped and the exit status is 1), so that a caller's "
                        "timeout never costs the table")
    p.add_argument("--out-dir", default=None,
                   help="default benchmarks/results (--sim: a temp dir)")
    return p


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace,
                more=()) -> argparse.Namespace:
    """table_parser's options as lists and paths, each name checked (and ``more``: (what,
    given, allowed) triples of the script's own); an unknown one is the parser's error."""
    args.table = DRY_SHAPES if args.sim else SHAPES
    args.modes = args.modes.split(",")
    args.dtypes = args.dtypes.split(",")
    args.shapes = args.shapes.split(",") if args.shapes else list(args.table)
    for name, got, allowed in (("mode", args.modes, ("LSTM", "GRU")),
                               ("dtype", args.dtypes, tuple(DTYPE_NAMES)),
                               ("shape", args.shapes, tuple(args.table)), *more):
        bad = [g for g in got if g not in allowed]
        if bad:
            p.error(f"unknown {name}(s) {bad}; choose from {', '.join(allowed)}")
    if args.out_dir is None:
        args.out_dir = (Path("/tmp/fused_rnn_profile_sim") if args.sim
                        else ROOT / "benchmarks" / "results")
    args.out_dir = Path(args.out_dir)
    return args


def parse_args(argv=None) -> argparse.Namespace:
    p = table_parser(__doc__.split("\n\n")[0], "fp32,bf16,fp16")
    p.add_argument("--variants", default="",
                   help="comma-separated bench_gpu.py variants (e.g. cuda-cl8) also timed, after "
                        "cuda, on --variant-shapes; their rows name them in the run column")
    p.add_argument("--variant-shapes", default=None,
                   help="comma-separated shapes for --variants (default: --shapes)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    table = DRY_SHAPES if args.sim else SHAPES
    args.variant_shapes = (args.variant_shapes.split(",") if args.variant_shapes
                           else (args.shapes.split(",") if args.shapes else list(table)))
    return finish_args(p, args, (("variant shape", args.variant_shapes, tuple(table)),
                                 ("variant", args.variants, PHASED)))


def profile_one(mode: str, B: int, T: int, H: int, dtype_name: str, device: str) -> list[dict]:
    import torch

    import fused_rnn
    from fused_rnn.ops.cuda import profile

    dtype = getattr(torch, DTYPE_NAMES[dtype_name])
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = dtype_name != "fp32-strict"
    try:
        torch.manual_seed(0)
        cls = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU}[mode]
        model = cls(H, H, batch_first=True, backend="cuda").to(device, dtype)
        x = torch.randn(B, T, H, device=device, dtype=dtype)
        cot = torch.randn(B, T, H, device=device, dtype=dtype)
        model(x)[0].backward(cot)  # warm-up
        with profile.recording() as launches:
            model(x)[0].backward(cot)
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    return [profile.summarize(launch) for launch in launches]


def _row(mode, shape, dtype_name, s: dict, plans=None, run="cuda", tagged=False) -> list[str]:
    """plans: cuda's (forward, backward) plans for this row (bench_gpu._cuda_plans), or None;
    tagged: the stage copy is the tagged exchange (bench_gpu._stage_copy_tagged), marked ' tg'
    on a launch whose plan takes it, as in the bench's notes."""
    from fused_rnn.ops.cuda import plan as P

    def us(key):
        return f"{s[key]:.2f}" if key in s else ""

    direction = {"forward": "fwd", "backward": "bwd"}[s["direction"]]
    plan = plans[direction == "bwd"] if plans else None
    plan = (f"g{plan.groups} p{plan.parts} k{plan.stage_k}{CLUSTER_MARKS[plan.cluster]}"
            f"{' tg' if tagged and P.tagged_exchange(plan, True) else ''}" if plan else "")
    return [mode, shape, dtype_name, direction, str(s["blocks"]), plan, us("copy_us"),
            us("mma_us"), us("mma_own_us"), us("epilogue_us"), us("epilogue_own_us"),
            us("sync_us"), us("sync_min_us"), us("parts_us"),
            us("load_us"), us("kernel_us"), f"{s['ghz']:.3f}" if "ghz" in s else "", run]


CLUSTER_KEYS = ("FUSED_RNN_CUDA_CLUSTER", "FUSED_RNN_CUDA_TEAM_CLUSTERS")


def _write(path: Path, text: str) -> None:
    """Replace path's content at once: a reader (or a kill) never sees half a table."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def table_lines(columns, rows, failed, skipped, budget: float) -> list[str]:
    """A markdown table of rows, then what failed and what the time budget left out."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if failed:
        lines += ["", "Failed:", *[f"- {f}" for f in failed]]
    if skipped:
        lines += ["", f"Skipped after the time budget ({budget:.0f} s): " + ", ".join(skipped)]
    return lines


def _render(args, env: dict, rows, failed, skipped, left_out, running=None, moot=()) -> str:
    """The phases table; running: (what, done, total) while a configuration is under way;
    moot: the variant configurations not timed because they would run cuda's code."""
    lines = [f"# CUDA kernel phases, {env['gpu']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    legend = ("µs per step (mean over blocks) for copy, mma, epilogue, sync, sync min (the "
              "last-arriving block's wait: about the barrier's own cost) and parts (the K parts' "
              "second grid sync per step, 0 without them); mma own and epi own: thread 0's own "
              "share of mma and epilogue (its warp's MMA loops; its own points' loads and cells), "
              "without the wait for the other warps and threads; µs per launch for load (W into "
              "shared memory) and kernel (wall time); GHz: the SMs' clock over the launch "
              "(clock64 cycles over globaltimer ns: the cycle counts' conversion, and whether the "
              "GPU ran at its boost clock). plan: batch groups g, K parts p, stage K columns k "
              "(0: X read unstaged), cl where the groups run as clusters (their sync is the "
              "cluster barrier), tc where the K-parts teams do (their parts sync is), from the "
              "plan mirror on this GPU. run: cuda, or the bench variant (its environment) the row "
              "was timed under.")
    lines += ["", legend, ""]
    if args.sim:
        lines += ["**cudasim**: the clock counts clock reads; these numbers mean nothing.", ""]
    if running is not None:
        what, done, total = running
        lines += [(f"**Incomplete**: {done} of {total} configurations done; this file was written "
                   f"before {what} started and the run did not finish (killed at its caller's "
                   "timeout, or stuck in that configuration)."), ""]
    lines += table_lines(COLUMNS, rows, failed, skipped, args.time_budget)
    if left_out:
        lines += ["", "Left out (FRNN_NO_CLUSTERS=1: the cluster-mode GPU tests failed or hung): "
                  + ", ".join(left_out)]
    if moot:
        lines += ["", "Not timed, as they would run exactly cuda's code (bench_gpu.py "
                  "_variant_is_moot): " + ", ".join(moot)]
    return "\n".join(lines) + "\n"


def open_device(sim: bool) -> str | None:
    """Where a table runs: "cuda", or with ``sim`` "cpu" with cudasim installed as the
    extension (for good: the process ends with the table); None, after saying why, where that
    is not available. Shared with time_split.py."""
    import torch

    if sim:
        import pytest

        sys.path.insert(0, str(ROOT / "tests" / "cuda"))
        from cases import install_standin
        from simulate import Simulator, unavailable_reason

        if unavailable_reason():
            print(f"cudasim unavailable: {unavailable_reason()}")
            return None
        install_standin(pytest.MonkeyPatch(), Simulator(sms=4))
        return "cpu"
    if not torch.cuda.is_available():
        print("no GPU: use --sim to check the script on the CPU")
        return None
    return "cuda"


def table_path(args, env_info: dict, kind: str) -> Path:
    """``<out-dir>/<date>-<gpu>-<kind>.md`` (out-dir made if missing)."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    gpu = "cpu-sim" if args.sim else re.sub(r"[^A-Za-z0-9]+", "-", env_info["gpu"]).strip("-")
    return args.out_dir / f"{dt.date.today().isoformat()}-{gpu}-{kind}.md"


def finish(path: Path, text: str, ok: bool) -> int:
    """Writes the final table, prints it and where it went; the exit status (1 unless ok)."""
    _write(path, text)
    print(text)
    print(f"wrote {path}")
    return 0 if ok else 1


def begin(parse, argv, start: float | None):
    """A table script's (args, start, device): its options, when --time-budget counts from
    (``start``, default now) and open_device's answer (None: it said why; exit 1)."""
    args = parse(argv)
    return args, time.monotonic() if start is None else start, open_device(args.sim)


def main(argv=None, start: float | None = None) -> int:
    """start: time.monotonic() the --time-budget counts from (default: now)."""
    args, start, device = begin(parse_args, argv, start)
    if device is None:
        return 1
    rows, failed, skipped, left_out = [], [], [], []
    variants = args.variants
    if os.environ.get("FRNN_NO_CLUSTERS") == "1":
        left_out = [v for v in variants if any(k in VARIANTS[v][1] for k in CLUSTER_KEYS)]
        variants = [v for v in variants if v not in left_out]
        if left_out:
            print(f"FRNN_NO_CLUSTERS=1: leaving out the cluster variants {', '.join(left_out)}",
                  flush=True)
    # The phases are the persistent kernel's: plain cuda runs it here wherever its path rules
    # (ops.PATH_RULES) would take the per-step path.
    runs = [("cuda", {"FUSED_RNN_CUDA_PATH": "persistent"}, args.shapes)] + [
        (v, VARIANTS[v][1], args.variant_shapes) for v in variants]
    configs = [(run, env, mode, shape, dtype_name)
               for run, env, shapes in runs for mode in args.modes for shape in shapes
               for dtype_name in args.dtypes]
    # A variant where it changes nothing (cuda-mma in 16 bits, cuda-tb1 where no tile is
    # blocked, ...) would only repeat cuda's row.
    moot = [c for c in configs
            if c[0] != "cuda" and _moot(c[0], c[2], args.table[c[3]], c[4], device)]
    configs = [c for c in configs if c not in moot]
    moot = [f"{run}-{mode}-{shape}-{dtype_name}" for run, _, mode, shape, dtype_name in moot]
    env_info = environment(device, argparse.Namespace())
    path = table_path(args, env_info, "phases")
    for i, (run, env, mode, shape, dtype_name) in enumerate(configs):
        label = "" if run == "cuda" else f"{run}-"
        what = f"{label}{mode}-{shape}-{dtype_name}"
        if time.monotonic() - start > args.time_budget:
            skipped.append(what)
            continue
        _write(path, _render(args, env_info, rows, failed, skipped, left_out,
                             running=(what, i, len(configs)), moot=moot))
        B, T, H = args.table[shape]
        with mock.patch.dict(os.environ, env):  # restored afterwards
            try:
                plans = _cuda_plans(mode, (B, T, H), dtype_name) if device == "cuda" else None
                tagged = _stage_copy_tagged(mode, (B, T, H), dtype_name, device)
                for s in profile_one(mode, B, T, H, dtype_name, device):
                    rows.append(_row(mode, f"{shape} {B}x{T}x{H}", dtype_name, s, plans, run,
                                     tagged))
            except Exception as e:  # keep going: one failure must not cost the rest
                failed.append(f"{what}: {type(e).__name__}: {e}"[:300])
    return finish(path, _render(args, env_info, rows, failed, skipped, left_out, moot=moot),
                  ok=bool(rows) and not failed and not skipped)


if __name__ == "__main__":
    sys.exit(main(start=_T0))
