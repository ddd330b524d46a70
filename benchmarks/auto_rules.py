"""Propose ``AUTO_RULES`` (fused_rnn/backends.py) from a GPU benchmark table.

Reads the CSV that ``bench_gpu.py`` wrote on a GPU and prints, as Python, the rules under which
``backend="auto"`` would take a kernel backend: one rule per (cell, dtype) where the backend was
faster than cuDNN in the same dtype, fwd+bwd, by at least ``--margin`` on **every** shape the
table has for that cell and dtype. The rule's hidden and batch ranges span those shapes (so it
also covers the sizes between them, one layer, unidirectional: what the table measured). A
(cell, dtype) with any slower, missing or failed row gets no rule, and the script says which
rows stopped it. Paste the output into ``fused_rnn/backends.py`` only after the backend's GPU
tests have passed at the table's commit (DESIGN.md); the evidence each rule cites is the table's
``.md``, which ``tests/test_backends.py`` requires to be committed.

    python benchmarks/auto_rules.py benchmarks/results/<date>-<gpu>.csv [--backend cuda]

Rows of variants (``cuda-p1``, ...) and ``fp32-strict`` (TF32 off) are not used: a rule keys on
the dtype alone, and fp32 runs with TF32 as PyTorch's default allows.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
BASELINE = "cudnn"


def propose(rows: list[dict], backend: str, margin: float) -> tuple[list[dict], list[str]]:
    """(rules, reasons): rules as dicts (cell, dtype, hidden, batch, ratios) and, for every
    (cell, dtype) without one, why not."""
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    shapes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        if r.get("pass") != "fwd+bwd" or r.get("dtype") not in DTYPES:
            continue
        key = (r["cell"], r["dtype"])
        if r["backend"] == BASELINE:
            shapes[key].add(r["shape"])
        elif r["backend"] == backend:
            by_key[key].append(r)
    rules, reasons = [], []
    for key in sorted(set(shapes) | set(by_key)):
        cell, dtype = key
        ours = {r["shape"]: r for r in by_key.get(key, [])}
        stops = []
        for shape in sorted(shapes.get(key, set()) | set(ours)):
            r = ours.get(shape)
            ratio = (r or {}).get("x_cudnn_same_dtype") or ""
            if r is None:
                stops.append(f"{shape}: no {backend} row")
            elif not ratio:
                stops.append(f"{shape}: not timed ({(r.get('note') or 'no ratio')[:80]})")
            elif float(ratio) < margin:
                stops.append(f"{shape}: {float(ratio):.2f}x cuDNN (< {margin:g})")
        if not ours or key not in shapes:
            stops.append("no cuDNN baseline" if ours else f"no {backend} rows")
        if stops:
            reasons.append(f"{cell} {dtype}: no rule; " + "; ".join(stops))
            continue
        dims = [tuple(int(v) for v in r["BxTxH"].split("x")) for r in ours.values()]
        ratios = [float(r["x_cudnn_same_dtype"]) for r in ours.values()]
        rules.append(dict(cell=cell, dtype=dtype,
                          hidden=(min(d[2] for d in dims), max(d[2] for d in dims)),
                          batch=(min(d[0] for d in dims), max(d[0] for d in dims)),
                          ratios=(min(ratios), max(ratios)), shapes=sorted(ours)))
    return rules, reasons


def as_python(rules: list[dict], backend: str, evidence: str) -> str:
    lines = ["AUTO_RULES: tuple[AutoRule, ...] = ("]
    for r in rules:
        lines += [
            f"    # fwd+bwd {r['ratios'][0]:.2f}-{r['ratios'][1]:.2f}x cuDNN in {r['dtype']} on "
            f"{', '.join(r['shapes'])}",
            f"    AutoRule(backend={backend!r}, modes=frozenset({{{r['cell']!r}}}), "
            f"dtypes=frozenset({{{DTYPES[r['dtype']]}}}),",
            f"             hidden={r['hidden']}, batch={r['batch']},",
            f"             evidence={evidence!r}),",
        ]
    lines.append(")")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="a bench_gpu.py CSV from a GPU run")
    ap.add_argument("--backend", default="cuda", choices=("cuda", "triton"))
    ap.add_argument("--margin", type=float, default=1.05,
                    help="the least cuDNN time / ours on every shape (default %(default)s: "
                         "wins within timing noise do not count)")
    args = ap.parse_args(argv)
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "none (dry run" in rows[0].get("gpu", ""):
        print(f"{args.csv} is a dry run on the CPU: its times mean nothing", file=sys.stderr)
        return 2
    md = args.csv.with_suffix(".md")
    root = Path(__file__).resolve().parent.parent
    try:
        evidence = md.resolve().relative_to(root).as_posix()
    except ValueError:
        evidence = f"benchmarks/results/{md.name}"
    rules, reasons = propose(rows, args.backend, args.margin)
    print(as_python(rules, args.backend, evidence))
    for r in reasons:
        print("#", r)
    print(f"# {len(rules)} rules from {args.csv.name}; paste them only if the {args.backend} "
          "GPU tests passed at that table's commit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
