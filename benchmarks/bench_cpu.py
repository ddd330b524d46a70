"""CPU benchmark: fused_rnn (backend "auto") against torch.nn, fwd+bwd, in one process.

2-layer LSTM and GRU, B=32, T=64, input = hidden = 256, fp32. Runs come in pairs (ours, nn;
nn, ours; ...) so that machine noise hits both alike; the reported figure is the median of the
per-pair ratios ours/nn (target: <= 1.1). With ``--compile`` ours runs under
``torch.compile(fullgraph=True)`` (torch.nn stays eager: its RNNs graph-break).

    python benchmarks/bench_cpu.py [--reps 15] [--compile] [--csv out.csv]

Before timing, each cell's output and parameter gradients must match torch.nn's (relative norm
error 1e-4), or the script stops: a ratio is only worth reading when both compute the same.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time

import torch

import fused_rnn


def fwd_bwd_time(model, x, h, cot) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    y, _ = model(x, h)
    y.backward(cot)
    return time.perf_counter() - t0


def check_same(ours, ref, x, h, cot, tol: float = 1e-4) -> None:
    """A ratio means something only if both compute the same: y and every parameter's
    gradient within ``tol`` of torch.nn's by relative norm error, or SystemExit."""
    ys = []
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)
        y, _ = m(x, h)
        y.backward(cot)
        ys.append(y.detach())
    pairs = [("y", *ys)] + [(f"grad {n}", p.grad, q.grad) for (n, p), q in
                            zip(ours.named_parameters(), ref.parameters(), strict=True)]
    for name, a, b in pairs:
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if a is not None else None
        if err is None or not err <= tol:
            raise SystemExit(f"bench_cpu: {name} differs from torch.nn's (relative error "
                             f"{err}, tolerance {tol:g}): not timed")


def bench(cell: str, B: int, T: int, H: int, layers: int, reps: int, backend: str,
          compile_ours: bool = False) -> dict:
    nn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    our_cls = {"lstm": fused_rnn.LSTM, "gru": fused_rnn.GRU}[cell]
    torch.manual_seed(0)
    ref = nn_cls(H, H, layers, batch_first=True)
    ours = our_cls(H, H, layers, batch_first=True, backend=backend)
    ours.load_state_dict(ref.state_dict())
    if compile_ours:
        torch._dynamo.reset()
        ours = torch.compile(ours, fullgraph=True)
    x = torch.randn(B, T, H)
    h0 = torch.randn(layers, B, H)
    h = (h0, torch.randn(layers, B, H)) if cell == "lstm" else h0
    cot = torch.randn(B, T, H)
    for _ in range(3):  # warm-up both
        fwd_bwd_time(ours, x, h, cot)
        fwd_bwd_time(ref, x, h, cot)
    check_same(ours, ref, x, h, cot)
    ours_t, ref_t, ratios = [], [], []
    for i in range(reps):
        # alternate which goes first so neither always runs on a warmer cache
        if i % 2 == 0:
            a = fwd_bwd_time(ours, x, h, cot)
            b = fwd_bwd_time(ref, x, h, cot)
        else:
            b = fwd_bwd_time(ref, x, h, cot)
            a = fwd_bwd_time(ours, x, h, cot)
        ours_t.append(a)
        ref_t.append(b)
        ratios.append(a / b)
    return {
        "cell": cell, "B": B, "T": T, "H": H, "layers": layers,
        "backend": backend + (", compiled" if compile_ours else ""),
        "ours_ms": 1e3 * statistics.median(ours_t), "nn_ms": 1e3 * statistics.median(ref_t),
        "ratio": statistics.median(ratios),
    }


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=_positive, default=15)
    p.add_argument("--backend", default="auto")
    p.add_argument("--B", type=_positive, default=32)
    p.add_argument("--T", type=_positive, default=64)
    p.add_argument("--H", type=_positive, default=256)
    p.add_argument("--layers", type=_positive, default=2)
    p.add_argument("--compile", action="store_true",
                   help="ours under torch.compile(fullgraph=True); torch.nn eager")
    p.add_argument("--csv", default=None)
    p.add_argument("--max-ratio", type=float, default=None, help="exit 1 if any ratio exceeds this")
    a = p.parse_args(argv)
    if a.backend not in fused_rnn.BACKENDS:
        p.error(f"--backend: {a.backend!r} is not one of {', '.join(fused_rnn.BACKENDS)}")
    why = fused_rnn.backends.unavailable_reason(a.backend, "cpu")
    if why is not None:
        p.error(f"--backend {a.backend}: unavailable on the CPU ({why})")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    rows = [bench(c, a.B, a.T, a.H, a.layers, a.reps, a.backend, a.compile) for c in ("lstm", "gru")]
    print("| cell | B×T×H, layers | backend | ours ms | torch.nn ms | ratio ours/nn (median) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cell']} | {r['B']}×{r['T']}×{r['H']}, {r['layers']} | {r['backend']} | "
              f"{r['ours_ms']:.2f} | {r['nn_ms']:.2f} | {r['ratio']:.3f} |")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if a.max_ratio is not None and any(r["ratio"] > a.max_ratio for r in rows):
        print(f"FAIL: a ratio exceeds {a.max_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
