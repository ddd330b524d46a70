"""Propose ``AUTO_RULES`` (fused_rnn/backends.py) from a GPU benchmark table.

Reads the CSV that ``bench_gpu.py`` wrote on a GPU and prints, as Python, the rules under which
``backend="auto"`` would take a kernel backend: one rule per (cell, dtype) where the backend was
faster than cuDNN in the same dtype, fwd+bwd and fwd alike (a rule sends inference calls too),
by at least ``--margin`` on **every** shape S1-S6 (all must be in the table, timed at least
``MIN_REPS`` times on both sides, and pass the check against cuDNN, whose own outputs must be
finite). fp32 rules say whether they hold with TF32 on (``fp32`` rows of a table
run with it, the default) or off (``fp32-strict`` rows), and every rule holds only on GPUs of
the table's compute capability and for the sequence lengths the shapes span. The rule's hidden, batch and
steps ranges span those shapes (so it also covers the sizes between them, one layer, unidirectional:
what the table measured). A (cell, dtype) with any slower, missing, skipped, failed or unchecked
row gets no rule, and the script says which rows stopped it. The whole table is refused (exit
2, no rules) when it is a dry run, when its commit is not a clean, known one, when the
backend's GPU tests are not shown passed (for cuda the table's ``gpu_tests``, gpu_check.sh's
summary of the CUDA GPU tests; for triton the Triton suite's summary line, given with
``--triton-tests``), or when the run set ``FUSED_RNN_<BACKEND>_*`` for the backend (its rows
then timed other kernels than ``auto`` would run). Paste the output into
``fused_rnn/backends.py`` only after the backend's GPU tests have passed at the table's commit
(DESIGN.md); the evidence each rule cites is the table's ``.md``, which ``tests/test_backends.py``
requires to be committed.

    python benchmarks/auto_rules.py benchmarks/results/<date>-<gpu>.csv [--backend cuda]
    python benchmarks/auto_rules.py <csv> --backend triton --triton-tests "<summary line>"

Rows of variants (``cuda-p1``, ...) are not used: a rule is for what ``auto`` runs by default.
Nor are the one-step rows (G1-G3): the cell modules under ``auto`` run PyTorch's cell kernels,
and a rule's steps range spans S1-S6's chunks (64 to 1024 steps).

``--paths`` proposes the CUDA backend's ``PATH_RULES`` (fused_rnn/ops/cuda/ops.py) instead:
where ``FUSED_RNN_CUDA_PATH=auto`` (the default) runs a layer on the per-step path. It
compares the ``cuda-step`` rows with the persistent kernel's (row by row: the
``cuda-persistent`` row where the table has one, else the ``cuda`` row, whose note must show a
launch plan) and gives one rule per (cell, dtype) and group of shapes (S1-S6, and the one-step
shapes G1-G3 apart: a cell's call, where the persistent launch loads W_hh for one step): the
batch, hidden and steps ranges spanning the group's shapes where the per-step path was faster
by the margin, forward and fwd+bwd, every check passed on both sides; and no rule for the group
where a shape of it inside those ranges did not show that (slower, missing, unchecked). The
table's refusals are the cuda backend's.

    python benchmarks/auto_rules.py <csv> --paths

``--stage-copy`` proposes the CUDA backend's ``STAGE_COPY_RULES`` (fused_rnn/ops/cuda/ops.py):
where ``FUSED_RNN_CUDA_STAGE_COPY=auto`` (the default) runs the tagged exchange. It compares,
row by row over S1-S6, the tagged exchange's row (``cuda-tagged``; where a rule sent plain
``cuda`` to it already, the ``cuda`` row) with the pipelined copy's (``cuda-pipelined`` where
the table has one, else ``cuda``), as ``--paths`` does: one rule per (cell, dtype), its ranges
spanning the shapes where the tagged exchange won forward and fwd+bwd by the margin, none where
a shape inside them did not. A row counts only where its note shows the launch plans, with a
``tg`` launch on the tagged side and none on the other (bench_gpu.py _plan_note).

    python benchmarks/auto_rules.py <csv> --stage-copy
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import MIN_REPS, SHAPES, STEP_SHAPES

DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16",
          "fp32-strict": "torch.float32"}
BASELINE = "cudnn"
# Settings that do not change what a kernel computes or how fast (where the build goes, how
# loud it is); any other FUSED_RNN_<BACKEND>_* in the table's overrides refuses its rules.
HARMLESS = {"FUSED_RNN_CUDA_BUILD_DIR", "FUSED_RNN_CUDA_VERBOSE"}


# A clean pytest summary and nothing else: "805 passed, 6 deselected in 80.12s" (pytest adds
# " (0:01:20)" past a minute). Anything more (gpu_check.sh appends "; failed: <ids>", or says
# "timed out: ...", "crashed in: ...", "not run (...)") or any other count (failed, errors,
# rerun) is not a pass.
CLEAN = re.compile(r"(\d+ (passed|skipped|deselected|xfailed|xpassed|warnings?), )*"
                   r"\d+ (passed|skipped|deselected|xfailed|xpassed|warnings?) in [0-9.]+s"
                   r"( \(\d+:\d\d:\d\d\))?")


# What one run writes alike in every row (bench_gpu.py's environment columns).
RUN_COLUMNS = ("gpu", "capability", "commit", "gpu_tests", "overrides", "tf32", "torch", "cuda",
               "cudnn", "triton")


def _row_key(r: dict) -> tuple:
    return (r.get("backend"), r.get("cell"), r.get("dtype"), r.get("shape"), r.get("pass"))


# At most this share of the tests run may be skipped. On the H200 (twenty-fifth session) 12 of
# 857 skipped (1.4%), each for a reason a GPU does not change; a run that skips more did not
# test the kernels a rule would choose (a GPU the tests do not recognize, a missing extension).
MAX_SKIPPED = 0.1


def tests_passed(summary: str) -> bool:
    """Whether gpu_check.sh's one-line GPU-test summary shows the tests run and passed, with
    at most MAX_SKIPPED of them skipped."""
    summary = summary.strip()
    if not CLEAN.fullmatch(summary):
        return False
    counts = {what: int(n) for n, what in re.findall(r"(\d+) (passed|skipped)", summary)}
    passed, skipped = counts.get("passed", 0), counts.get("skipped", 0)
    return passed > 0 and skipped <= MAX_SKIPPED * (passed + skipped)


def refusal(rows: list[dict], backend: str, triton_tests: str | None = None) -> str | None:
    """Why no rule at all may come from this table for ``backend``, or None.

    The table records the CUDA GPU tests (``gpu_tests``); gpu_check.sh runs the Triton suite
    on the GPU after the bench, so for triton its summary line is given (``triton_tests``)."""
    if not rows:
        return "the table has no rows"
    # One run's table: what is read off its first row below holds for every row, and no row
    # repeats (rows are looked up by backend, cell, dtype, shape and pass: a repeat would
    # hide the other, a failed one included).
    for col in RUN_COLUMNS:
        values = sorted({str(r.get(col)) for r in rows})
        if len(values) > 1:
            return (f"its rows disagree on {col} ({'; '.join(values)[:160]}): a table merged "
                    "from several runs; give one run's table")
    counts = Counter(_row_key(r) for r in rows)
    repeated = [k for k, n in counts.items() if n > 1]
    if repeated:
        return (f"{len(repeated)} rows repeat (the first: {' '.join(map(str, repeated[0]))}): a "
                "backend or shape named twice, or tables merged; a repeat could hide a failed "
                "row")
    env = rows[0]
    if "none (dry run" in env.get("gpu", ""):
        return "a dry run on the CPU: its times mean nothing"
    if not re.fullmatch(r"\d+\.\d+", (env.get("capability") or "").strip()):
        return ("no compute capability in the table: a rule holds on the kind of GPU it was "
                "measured on")
    commit = (env.get("commit") or "").strip()
    if not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        return (f"the table's commit is {commit!r}: a rule needs the commit the run measured, "
                "clean (FRNN_COMMIT of a committed tree)")
    if backend == "triton":
        if triton_tests is None:
            return ("the table records the CUDA GPU tests only: give the summary line of the "
                    "Triton suite gpu_check.sh ran on the GPU with --triton-tests")
        if not tests_passed(triton_tests):
            return (f"the Triton GPU tests did not pass (or more than {MAX_SKIPPED:.0%} were "
                    f"skipped): {triton_tests!r}")
    else:
        tests = env.get("gpu_tests")
        if tests is None:
            return ("no gpu_tests column: written by a bench_gpu.py that did not record the "
                    "GPU tests")
        if not tests_passed(tests):
            return (f"the CUDA GPU tests did not pass (or more than {MAX_SKIPPED:.0%} were "
                    f"skipped): gpu_tests = {tests!r}")
    prefix = f"FUSED_RNN_{backend.upper()}_"
    forced = [kv for kv in (env.get("overrides") or "").split()
              if kv.startswith(prefix) and kv.split("=")[0] not in HARMLESS]
    if forced:
        return (f"the run set {' '.join(forced)} for every {backend} row, so they timed other "
                f"kernels than backend={backend!r} runs by default")
    return None


def _tf32(rows: list[dict], dtype: str) -> bool | None:
    """The rule's tf32 for rows of ``dtype``: "fp32" rows ran with TF32 as the header says,
    "fp32-strict" rows without; None for 16-bit dtypes."""
    if dtype == "fp32-strict":
        return False
    if dtype == "fp32":
        return "allow_tf32=True" in (rows[0].get("tf32") or "")
    return None


def _doubts(r: dict, base: dict, what: str) -> list[str]:
    """Why a timed, checked row of ours and its cuDNN row (same cell, dtype, shape and pass)
    are not evidence, beyond the ratio: cuDNN's own check (its outputs finite) not passed, or
    either side timed fewer than MIN_REPS times (bench_gpu.py notes "only N runs timed")."""
    why = []
    if base.get("check") != "reference":
        why.append(f"{what}cuDNN's check {(base.get('check') or 'not run')[:80]}")
    for side, row in (("ours", r), ("cuDNN's", base)):
        reps = str(row.get("reps") or "").strip()
        if reps.isdigit() and int(reps) < MIN_REPS:
            why.append(f"{what}{side} timed {reps} times (< {MIN_REPS})")
    return why


def propose(rows: list[dict], backend: str, margin: float) -> tuple[list[dict], list[str]]:
    """(rules, reasons): rules as dicts (cell, dtype, tf32, hidden, batch, steps, ratios,
    shapes) and, for every (cell, dtype) without one, why not."""
    ours: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    cudnn: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    other_passes: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    other_cudnn: dict[tuple[str, str, str, str], dict] = {}
    for r in rows:
        if r.get("dtype") not in DTYPES:
            continue
        key = (r["cell"], r["dtype"])
        if r.get("pass") != "fwd+bwd":
            if r["backend"] == backend:  # a forward that failed while timed stops it too
                other_passes[(*key, r["shape"])].append(r)
            elif r["backend"] == BASELINE:
                other_cudnn[(*key, r["shape"], r["pass"])] = r
        elif r["backend"] == BASELINE:
            cudnn[key][r["shape"]] = r
        elif r["backend"] == backend:
            ours[key][r["shape"]] = r
    rules, reasons = [], []
    for key in sorted(set(cudnn) | set(ours)):
        cell, dtype = key
        stops = []
        for shape in SHAPES:  # every shape, measured and checked on both sides
            base, r = cudnn[key].get(shape), ours[key].get(shape)
            ratio = (r or {}).get("x_cudnn_same_dtype") or ""
            if base is None and r is None:
                stops.append(f"{shape}: not in the table")
            elif r is None:
                stops.append(f"{shape}: no {backend} row")
            elif base is None or not base.get("ms"):
                why = (base or {}).get("note") or "no row"
                stops.append(f"{shape}: no cuDNN time ({why[:80]})")
            elif not r.get("ms") or not ratio:
                stops.append(f"{shape}: not timed ({(r.get('note') or 'no ratio')[:80]})")
            elif r.get("check") != "ok":
                stops.append(f"{shape}: check {(r.get('check') or 'not run')[:80]}")
            elif not float(ratio) >= margin:  # (a NaN ratio is no win either)
                stops.append(f"{shape}: {float(ratio):.2f}x cuDNN (< {margin:g})")
            elif _doubts(r, base, ""):
                stops += [f"{shape}: {why}" for why in _doubts(r, base, "")]
            else:  # fwd+bwd won: the same configuration's forward must win too (a rule
                # also sends inference calls, forward only, to the backend)
                if not any(o["pass"] == "fwd" for o in other_passes[(cell, dtype, shape)]):
                    stops.append(f"{shape}: no fwd row (a rule also sends forward-only calls)")
                for o in other_passes[(cell, dtype, shape)]:
                    o_ratio = o.get("x_cudnn_same_dtype") or ""
                    if not o.get("ms") or not o_ratio:
                        stops.append(f"{shape}: {o['pass']} not timed "
                                     f"({(o.get('note') or '')[:80]})")
                    elif o.get("check") != "ok":
                        stops.append(f"{shape}: {o['pass']} check "
                                     f"{(o.get('check') or 'not run')[:80]}")
                    elif not float(o_ratio) >= margin:
                        stops.append(f"{shape}: {o['pass']} {float(o_ratio):.2f}x cuDNN "
                                     f"(< {margin:g})")
                    else:
                        o_base = other_cudnn.get((cell, dtype, shape, o["pass"]), {})
                        stops += [f"{shape}: {why}" for why in _doubts(o, o_base, f"{o['pass']} ")]
        if stops:
            reasons.append(f"{cell} {dtype}: no rule; " + "; ".join(stops))
            continue
        got = [ours[key][s] for s in SHAPES]
        dims = [tuple(int(v) for v in r["BxTxH"].split("x")) for r in got]
        ratios = [float(r["x_cudnn_same_dtype"]) for r in got]
        rules.append(dict(cell=cell, dtype=dtype, tf32=_tf32(rows, dtype),
                          hidden=(min(d[2] for d in dims), max(d[2] for d in dims)),
                          batch=(min(d[0] for d in dims), max(d[0] for d in dims)),
                          steps=(min(d[1] for d in dims), max(d[1] for d in dims)),
                          ratios=(min(ratios), max(ratios)), shapes=list(SHAPES)))
    return rules, reasons


# The CUDA backend's own rule tables (--paths, --stage-copy): (name, class, what a rule's
# ratios are against).
TABLES = {"paths": ("PATH_RULES", "PathRule", "the persistent kernel"),
          "stage-copy": ("STAGE_COPY_RULES", "StageCopyRule", "the pipelined copy")}


def as_python(rules: list[dict], backend: str | None, evidence: str, capability: str,
              table: str = "paths") -> str:
    """The rules as code to paste: AUTO_RULES for ``backend``, or (None) the CUDA backend's
    ``table`` (TABLES)."""
    major, minor = (int(v) for v in capability.split("."))
    if backend is None:
        (name, cls, against), head = TABLES[table], ""
    else:
        name, cls, head, against = "AUTO_RULES", "AutoRule", f"backend={backend!r}, ", "cuDNN"
    lines = [f"{name}: tuple[{cls}, ...] = ("]
    for r in rules:
        tf32 = "" if r.get("tf32") is None else f" tf32={r['tf32']},"
        sizes = (f"batch={r['batch']}, hidden={r['hidden']}, steps={r['steps']}," if backend is None
                 else f"hidden={r['hidden']}, batch={r['batch']}, steps={r['steps']},")
        lines += [
            (f"    # fwd+bwd {r['ratios'][0]:.2f}-{r['ratios'][1]:.2f}x {against} in "
             f"{r['dtype']} on {', '.join(r['shapes'])} (fwd too)"),
            (f"    {cls}({head}modes=frozenset({{{r['cell']!r}}}), "
             f"dtypes=frozenset({{{DTYPES[r['dtype']]}}}),"),
            f"             {sizes}{tf32}",
            f"             capability=({major}, {minor}),",
            f"             evidence={evidence!r}),",
        ]
    lines.append(")")
    return "\n".join(lines)


STEP, PERSISTENT = "cuda-step", "cuda-persistent"
TAGGED, PIPELINED = "cuda-tagged", "cuda-pipelined"


def _persistent_row(by: dict, key: tuple) -> tuple[str, dict | None]:
    """(backend, row): the persistent kernel's row for key (cell, dtype, shape, pass): the
    cuda-persistent row where there is one (bench_gpu.py times it only on rows a path rule
    sends plain cuda elsewhere), else the cuda row."""
    if (PERSISTENT, *key) in by:
        return PERSISTENT, by[(PERSISTENT, *key)]
    return "cuda", by.get(("cuda", *key))


def _pipelined_row(by: dict, key: tuple) -> tuple[str, dict | None]:
    """(backend, row): the pipelined copy's row for key: the cuda-pipelined row where there is
    one (bench_gpu.py times it only on rows a stage copy rule sends plain cuda to the tagged
    exchange), else the cuda row."""
    if (PIPELINED, *key) in by:
        return PIPELINED, by[(PIPELINED, *key)]
    return "cuda", by.get(("cuda", *key))


def _tagged_row(by: dict, key: tuple) -> tuple[str, dict | None]:
    """(backend, row): the tagged exchange's row for key: the cuda-tagged row, or where a
    cuda-pipelined row stands in for plain cuda (a rule sent cuda to the tagged exchange, so
    cuda-tagged was not timed), the cuda row."""
    if (TAGGED, *key) in by:
        return TAGGED, by[(TAGGED, *key)]
    if (PIPELINED, *key) in by:
        return "cuda", by.get(("cuda", *key))
    return TAGGED, None


def _plan_launches(row: dict) -> list[str] | None:
    """The launches of a row's plan note ('plan fwd b128 g1 p1 k768 tg, bwd ...'), or None
    where the note shows no persistent launch plan."""
    note = row.get("note") or ""
    if not note.startswith("plan "):
        return None
    return note.split(";")[0][len("plan "):].split(", ")


def _verdict(new: tuple[str, dict | None], old: tuple[str, dict | None], margin: float,
             against: str, plans: tuple[str, ...] = ("cuda",), tags: bool = False):
    """(ratio, None) where the row ``new`` (backend, row) beat the row ``old`` (old ms / new
    ms >= margin), else (ratio or None, why not). The rows of the backends in ``plans`` must
    show a persistent launch plan; ``tags``: the new row a tagged launch (' tg') and the old
    one none."""
    (new_b, new_r), (old_b, old_r) = new, old
    if new_r is None or old_r is None:
        return None, f"no {new_b if new_r is None else old_b} row"
    for side, r in ((new_b, new_r), (old_b, old_r)):
        if side in plans and _plan_launches(r) is None:
            return None, (f"the {side} row shows no persistent launch plan "
                          f"({(r.get('note') or 'no note')[:80]})")
    if tags:
        if not any(p.endswith(" tg") for p in _plan_launches(new_r)):
            return None, f"the {new_b} row shows no tagged launch ({new_r.get('note', '')[:80]})"
        if any(p.endswith(" tg") for p in _plan_launches(old_r)):
            return None, (f"the {old_b} row ran the tagged exchange too "
                          f"({old_r.get('note', '')[:80]})")
    for side, r in ((new_b, new_r), (old_b, old_r)):
        if not r.get("ms"):
            return None, f"{side} not timed ({(r.get('note') or '')[:80]})"
        if r.get("check") != "ok":
            return None, f"{side} check {(r.get('check') or 'not run')[:80]}"
        reps = str(r.get("reps") or "").strip()
        if reps.isdigit() and int(reps) < MIN_REPS:
            return None, f"{side} timed {reps} times (< {MIN_REPS})"
    ratio = float(old_r["ms"]) / float(new_r["ms"])
    if not ratio >= margin:
        return ratio, f"{ratio:.2f}x {against} (< {margin:g})"
    return ratio, None


def _path_verdict(by: dict, key: tuple, margin: float):
    """_verdict for --paths: the per-step row against the persistent kernel's."""
    return _verdict((STEP, by.get((STEP, *key))), _persistent_row(by, key), margin,
                    "the persistent kernel")


def _copy_verdict(by: dict, key: tuple, margin: float):
    """_verdict for --stage-copy: the tagged exchange's row against the pipelined copy's, both
    persistent launches."""
    return _verdict(_tagged_row(by, key), _pipelined_row(by, key), margin, "the pipelined copy",
                    plans=("cuda", TAGGED, PIPELINED), tags=True)


# The shapes --paths reads, in groups that each give their own rule: the suite's chunks, and
# one-step calls (a cell), where the persistent launch loads W_hh for a single step. A loss in
# one group does not stop the other's rule, nor does a rule span from one group into the other.
PATH_GROUPS = (("", SHAPES), (" one step", STEP_SHAPES))
# --stage-copy reads the chunks only: the variants that tune the persistent kernel, cuda-tagged
# among them, time no one-step shape (bench_gpu.timed_here).
COPY_GROUPS = (("", SHAPES),)


def propose_paths(rows: list[dict], margin: float) -> tuple[list[dict], list[str]]:
    """(rules, reasons) for the CUDA backend's PATH_RULES: rules as dicts (cell, dtype, tf32,
    batch, hidden, steps, ratios, shapes) and, for every (cell, dtype) and group of shapes
    (PATH_GROUPS) with cuda-step rows and no rule, why not."""
    return _propose(rows, margin, (STEP, PERSISTENT, "cuda"), (STEP,), PATH_GROUPS,
                    _path_verdict, "the per-step path")


def propose_stage_copy(rows: list[dict], margin: float) -> tuple[list[dict], list[str]]:
    """(rules, reasons) for the CUDA backend's STAGE_COPY_RULES, as propose_paths: the
    tagged exchange against the pipelined copy, 16-bit rows only."""
    rows = [r for r in rows if r.get("dtype") in ("bf16", "fp16")]
    return _propose(rows, margin, (TAGGED, PIPELINED, "cuda"), (TAGGED, PIPELINED), COPY_GROUPS,
                    _copy_verdict, "the tagged exchange")


def _propose(rows, margin, backends, drivers, groups, verdict, what):
    """(rules, reasons): one rule per (cell, dtype) with rows of a ``drivers`` backend and
    group of shapes (_group_rule), the rows of ``backends`` read."""
    by: dict[tuple, dict] = {}
    for r in rows:
        if r.get("dtype") in DTYPES and r.get("backend") in backends:
            by[(r["backend"], r["cell"], r["dtype"], r["shape"], r.get("pass"))] = r
    rules, reasons = [], []
    for cell, dtype in sorted({(k[1], k[2]) for k in by if k[0] in drivers}):
        for group, shapes in groups:
            if any((d, cell, dtype, s, p) in by for d in drivers for s in shapes
                   for p in ("fwd", "fwd+bwd")):
                _group_rule(by, cell, dtype, group, shapes, margin, verdict, what, rules,
                            reasons)
    for r in rules:
        r["tf32"] = _tf32(rows, r["dtype"])
    return rules, reasons


def _group_rule(by: dict, cell: str, dtype: str, group: str, shapes: dict, margin: float,
                verdict, what: str, rules: list[dict], reasons: list[str]) -> None:
    """One (cell, dtype) over one group of shapes: appends its rule to ``rules`` (without tf32)
    or why none to ``reasons``. ``verdict(by, key, margin)`` says whether the new way (``what``)
    won at key (cell, dtype, shape, pass)."""
    wins, losses, dims = {}, {}, {}
    for shape in shapes:
        ratios, whys = {}, []
        for r in by.values():
            if (r["cell"], r["dtype"], r["shape"]) == (cell, dtype, shape) and r.get("BxTxH"):
                dims[shape] = tuple(int(v) for v in r["BxTxH"].split("x"))
        for p in ("fwd", "fwd+bwd"):
            ratios[p], why = verdict(by, (cell, dtype, shape, p), margin)
            if why:
                whys.append(f"{p} {why}")
        if whys:
            losses[shape] = "; ".join(whys)
        else:
            wins[shape] = ratios["fwd+bwd"]
    if not wins:
        reasons.append(f"{cell} {dtype}{group}: no rule; {what} won on no shape ("
                       + "; ".join(f"{s}: {why}" for s, why in losses.items()) + ")")
        return
    b, t, h = ((min(dims[s][i] for s in wins), max(dims[s][i] for s in wins))
               for i in range(3))
    inside = [s for s in shapes if s not in wins and (s not in dims or all(
        lo <= v <= hi for v, (lo, hi) in zip(dims[s], (b, t, h), strict=True)))]
    if inside:  # (a shape never measured may be anywhere: it stops the rule too)
        reasons.append(f"{cell} {dtype}{group}: no rule; {what} won on "
                       f"{', '.join(wins)}, but not on " + "; ".join(
                           f"{s} ({losses[s]})" for s in inside))
        return
    rules.append(dict(cell=cell, dtype=dtype, batch=b, hidden=h, steps=t,
                      ratios=(min(wins.values()), max(wins.values())), shapes=list(wins)))


def _margin(text: str) -> float:
    """--margin: above 1 (a win); at or below it a tie or a loss would count as one."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 1.0:  # NaN too
        raise argparse.ArgumentTypeError(
            f"must be above 1 (a win over what it is set against), got {text}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, help="a bench_gpu.py CSV from a GPU run")
    ap.add_argument("--backend", default="cuda", choices=("cuda", "triton"))
    ap.add_argument("--triton-tests", metavar="SUMMARY",
                    help="for --backend triton: the pytest summary line of the Triton suite "
                         "that gpu_check.sh ran on the GPU (the table records the CUDA tests)")
    ap.add_argument("--margin", type=_margin, default=1.05,
                    help="the least cuDNN time / ours on every shape (--paths: the persistent "
                         "kernel's time / the per-step path's on every shape a rule spans; "
                         "--stage-copy: the pipelined copy's / the tagged exchange's) "
                         "(default %(default)s: wins within timing noise do not count)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--paths", action="store_true",
                       help="propose the CUDA backend's PATH_RULES (cuda-step against the "
                            "persistent kernel) instead of AUTO_RULES")
    which.add_argument("--stage-copy", action="store_true",
                       help="propose the CUDA backend's STAGE_COPY_RULES (cuda-tagged against "
                            "the pipelined copy) instead of AUTO_RULES")
    args = ap.parse_args(argv)
    if (args.paths or args.stage_copy) and args.backend != "cuda":
        ap.error("--paths and --stage-copy compare the CUDA backend's own settings: "
                 "no --backend triton")
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    why = refusal(rows, args.backend, args.triton_tests)
    if why:
        print(f"# {args.csv.name}: no rules for {args.backend}: {why}")
        print(f"{args.csv} refused: {why}", file=sys.stderr)
        return 2
    md = args.csv.with_suffix(".md")
    root = Path(__file__).resolve().parent.parent
    try:
        evidence = md.resolve().relative_to(root).as_posix()
    except ValueError:
        evidence = f"benchmarks/results/{md.name}"
    capability = rows[0]["capability"].strip()
    if args.paths:
        rules, reasons = propose_paths(rows, args.margin)
        print(as_python(rules, None, evidence, capability))
        what = "path rules (fused_rnn/ops/cuda/ops.py PATH_RULES)"
    elif args.stage_copy:
        rules, reasons = propose_stage_copy(rows, args.margin)
        print(as_python(rules, None, evidence, capability, table="stage-copy"))
        what = "stage copy rules (fused_rnn/ops/cuda/ops.py STAGE_COPY_RULES)"
    else:
        rules, reasons = propose(rows, args.backend, args.margin)
        print(as_python(rules, args.backend, evidence, capability))
        what = "rules"
    for r in reasons:
        print("#", r)
    print(f"# {len(rules)} {what} from {args.csv.name}; paste them only if the "
          f"{args.backend} GPU tests passed at that table's commit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
