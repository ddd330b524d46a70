"""benchmarks/bench_gpu.py --dry-run: the GPU benchmark script itself, on the CPU (Triton
interpreter, aten's RNN standing in for cuDNN). Checks the rows, variants and report files, not
speed."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _run(tmp_path, *extra, env=None):
    # The dry run sees only the FRNN_* and FUSED_RNN_* settings a test gives it.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FRNN_", "FUSED_RNN_"))}
    env = {**base, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry-run", "--modes", "GRU",
         "--dtypes", "fp32", "--passes", "fwd", "--out-dir", str(tmp_path), *extra],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return _read(tmp_path)


def _read(out_dir):
    (md,) = sorted(out_dir.glob("*-cpu-dryrun.md"))
    (path,) = sorted(out_dir.glob("*-cpu-dryrun.csv"))
    with open(path, newline="") as f:
        return md.read_text(), list(csv.DictReader(f))


def _md_table(text):
    """The .md table as lists of cells, split where a "|" is not escaped."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in text.splitlines() if line.startswith("|")]


def test_dry_run_rows_variants_and_report(tmp_path):
    text, rows = _run(tmp_path, "--shapes", "D1,D3", "--backends", "triton,cuda,cuda-g1")
    got = {(r["shape"], r["backend"]) for r in rows}
    # cuda-g1 (cuda without batch groups) only where the batch spans two 32-row tiles (D3: B=40)
    assert got == {("D1", "torch.nn (cpu)"), ("D1", "triton"), ("D1", "cuda"),
                   ("D3", "torch.nn (cpu)"), ("D3", "triton"), ("D3", "cuda"),
                   ("D3", "cuda-g1")}
    by = {(r["shape"], r["backend"]): r for r in rows}
    for shape in ("D1", "D3"):
        assert float(by[shape, "triton"]["ms"]) > 0
        assert float(by[shape, "triton"]["x_cudnn_same_dtype"]) > 0
        assert float(by[shape, "triton"]["max_abs_dy"]) < 1e-4  # same math as the stand-in
        # checked against the stand-in (fwd+bwd with h0), timed MIN_REPS times
        assert by[shape, "triton"]["check"] == "ok"
        assert float(by[shape, "triton"]["max_rel_err"]) < 1e-5
        assert by[shape, "triton"]["reps"] == "5"
        assert by[shape, "torch.nn (cpu)"]["check"] == "reference"
        # no GPU here: the CUDA rows say why instead of timing anything
        assert by[shape, "cuda"]["ms"] == "" and "unavailable" in by[shape, "cuda"]["note"]
    assert "unavailable" in by["D3", "cuda-g1"]["note"]
    assert "**Dry run**" in text and "| GRU | D3 |" in text
    table = _md_table(text)  # a cell per column in every row, the delimiter row included
    assert len(table) == 2 + len(rows) and all(len(r) == len(table[0]) for r in table), table[:2]


def test_under_the_gpu_script_each_save_reaches_out(tmp_path):
    """The lent machine returns only what is under $OUT, and its own limit may kill the bench
    before the script's budget does: under the GPU script ($OUT and $FRNN_STAMP set) every save
    copies both files there too, whole (no temporary file left). Elsewhere $OUT is left alone."""
    out, stamp = tmp_path / "out", tmp_path / "stamp"
    out.mkdir()
    stamp.touch()
    report = tmp_path / "report"
    _, rows = _run(report, "--shapes", "D1", "--backends", "reference",
                   env={"OUT": str(out), "FRNN_STAMP": str(stamp)})
    assert len(rows) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in report.iterdir())
    for p in report.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    again = tmp_path / "again"
    other = tmp_path / "other"
    other.mkdir()
    _run(again, "--shapes", "D1", "--backends", "reference", env={"OUT": str(other)})
    assert list(other.iterdir()) == []


def test_time_budget_skips_rows_but_writes_the_report(tmp_path):
    """Skipped configurations are listed in the .md and written to the CSV as "skipped: time"
    (auto_rules.py must see that a shape was not measured), in the order they would have run:
    by need (PRIORITY), each (cell, dtype) over all its shapes, the first round first."""
    text, rows = _run(tmp_path, "--shapes", "D1,D3", "--backends", "cuda,cuda-g1",
                      "--modes", "LSTM,GRU", "--dtypes", "fp16,fp32-strict,bf16,fp32",
                      "--time-budget", "0")
    assert "Skipped after the time budget (0 s): LSTM-D1-fp32, LSTM-D3-fp32, " in text
    assert all(r["note"] == "skipped: time" and r["ms"] == "" and r["check"] == ""
               for r in rows)
    first = [(r["cell"], r["dtype"], r["shape"]) for r in rows if r["backend"] == "cuda"]
    assert first == [(c, d, s) for c, d in (("LSTM", "fp32"), ("LSTM", "bf16"), ("LSTM", "fp16"),
                                            ("GRU", "fp32"), ("GRU", "bf16"), ("GRU", "fp16"),
                                            ("LSTM", "fp32-strict"), ("GRU", "fp32-strict"))
                     for s in ("D1", "D3")]
    # cuDNN and the first backend over every configuration, then the variant (D3 only: B=40)
    labels = [r["backend"] for r in rows]
    assert labels[:4] == ["torch.nn (cpu)", "cuda"] * 2
    assert labels.index("cuda-g1") == 2 * len(first)
    assert {r["shape"] for r in rows if r["backend"] == "cuda-g1"} == {"D3"}
    # the .md lists them once, not as table rows
    assert _md_table(text)[2:] == []


def test_one_step_shapes_come_after_the_suite_without_the_chunk_loop_variants(tmp_path):
    """A one-step shape (D4 here, G1-G3 on a GPU) is timed after every longer shape of the
    backends' rounds, whatever order --shapes names them in, and before the variants that tune
    the persistent kernel, which time no one-step shape: the backends, cuda-step and
    cuda-persistent (where a rule sends cuda to the per-step path) do."""
    bench_gpu = _import("bench_gpu")
    assert bench_gpu.STEP_SHAPES and all(T == 1 for _, T, _ in bench_gpu.STEP_SHAPES.values())
    assert not set(bench_gpu.STEP_SHAPES) & set(bench_gpu.SHAPES)
    assert bench_gpu.parse_args([]).shapes == [*bench_gpu.SHAPES, *bench_gpu.STEP_SHAPES]
    _, rows = _run(tmp_path, "--shapes", "D4,D3", "--backends", "cuda,cuda-step,cuda-p1",
                   "--modes", "LSTM,GRU", "--dtypes", "bf16,fp32", "--time-budget", "0")
    order = [(r["backend"], r["cell"], r["dtype"], r["shape"]) for r in rows
             if r["backend"] != "torch.nn (cpu)"]
    first = [(c, d) for c, d in bench_gpu.PRIORITY if d in ("bf16", "fp32")]
    # cuda-step chooses a path: its round comes before the tuning variants' (cuda-p1), over the
    # suite and then over the one-step shapes
    assert order == [(b, c, d, s) for s in ("D3", "D4") for b in ("cuda", "cuda-step")
                     for c, d in first] + [("cuda-p1", c, d, "D3") for c, d in first], order
    assert all(bench_gpu.timed_here(b, (1, 1, 1024)) for b in (None, "cuda", "triton",
                                                                "cuda-step", "cuda-persistent"))
    assert not any(bench_gpu.timed_here(b, (1, 1, 1024)) for b in bench_gpu.VARIANTS
                   if b not in ("cuda-step", "cuda-persistent"))
    assert all(bench_gpu.timed_here(b, (1, 2, 1024)) for b in bench_gpu.VARIANTS)


def test_one_step_rows_are_timed_for_less_time():
    """A one-step row (~0.1 ms a call on a GPU) asks the timer for ONE_STEP_REP_MS of runs,
    a row of more steps for the timer's own --rep-ms."""
    bench_gpu = _import("bench_gpu")
    args = bench_gpu.parse_args(["--dry-run", "--backends", "reference", "--modes", "GRU",
                                 "--dtypes", "fp32", "--passes", "fwd,fwd+bwd"])
    asked = []

    def timer(fn, rep_ms=None):
        fn()
        asked.append(rep_ms)
        return 1.0, 5

    for shape in ("D4", "D1"):
        rows = bench_gpu.measure(args, timer, "cpu", "GRU", shape, "fp32", "reference", {})
        assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"] and all(r["ms"] for r in rows)
    assert asked == [bench_gpu.ONE_STEP_REP_MS] * 2 + [None] * 2


def test_rounds_put_cudnn_and_the_first_backend_first():
    """Under a time budget the first backend named (cuda in gpu_check.sh) gets its whole table
    against cuDNN before any other backend or variant starts, and the CUDA backend's paths
    theirs before the tuning variants start."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    assert bench_gpu.rounds(["cuda", "triton", "cuda-p1", "cuda-g1"]) == [
        [None, "cuda"], ["triton"], ["cuda-p1", "cuda-g1"]]
    assert bench_gpu.rounds(["triton"]) == [[None, "triton"]]
    assert bench_gpu.rounds(["cuda-g1", "cuda"]) == [[None, "cuda"], ["cuda-g1"]]
    # the per-step path (and the persistent kernel where a rule would leave it) before any
    # variant that tunes the persistent kernel: PATH_RULES come from those rows
    assert bench_gpu.rounds(["cuda", "cuda-mma", "cuda-step", "triton", "cuda-persistent"]) == [
        [None, "cuda"], ["triton", "cuda-step", "cuda-persistent"], ["cuda-mma"]]
    # the stage copies (STAGE_COPY_RULES come from them) in a round of their own, timed before
    # the one-step shapes and the tuning variants: in the tuning round, behind every variant's
    # fp32 rows, the tagged exchange's 16-bit rows got no time under the bench's budget (a
    # helper's estimate from the H200 run's times: ~124 s of 140 gone when that round began)
    notes = "cuda,cuda-step,cuda-persistent,cuda-tagged,cuda-pipelined,cuda-mma,cuda-tb1"
    assert bench_gpu.rounds(notes.split(",")) == [
        [None, "cuda"], ["cuda-step", "cuda-persistent"], ["cuda-tagged", "cuda-pipelined"],
        ["cuda-mma", "cuda-tb1"]]
    args = bench_gpu.parse_args(["--backends", notes, "--shapes", "S1,G1", "--modes", "LSTM",
                                 "--dtypes", "bf16"])
    assert [(r, [c[1] for c in configs]) for r, configs in bench_gpu.schedule(args)] == [
        ([None, "cuda"], ["S1"]), (["cuda-step", "cuda-persistent"], ["S1"]),
        (["cuda-tagged", "cuda-pipelined"], ["S1"]), ([None, "cuda"], ["G1"]),
        (["cuda-step", "cuda-persistent"], ["G1"]), (["cuda-mma", "cuda-tb1"], ["S1"])]


def test_strict_fp32_rows_compare_like_with_like(tmp_path):
    """fp32-strict (TF32 off for cuDNN and ours) is its own dtype: its ratio is against the
    stand-in in fp32-strict, and the setting is restored afterwards (the header still says on)."""
    text, rows = _run(tmp_path, "--shapes", "D1", "--backends", "triton",
                      "--dtypes", "fp32-strict,fp32")
    by = {(r["dtype"], r["backend"]): r for r in rows}
    assert set(by) == {(d, b) for d in ("fp32", "fp32-strict")
                       for b in ("torch.nn (cpu)", "triton")}
    assert float(by["fp32-strict", "triton"]["x_cudnn_same_dtype"]) > 0
    assert float(by["fp32-strict", "triton"]["max_abs_dy"]) < 1e-4
    assert "cudnn.allow_tf32=True" in text


def _gpu_check(tmp_path, *args):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OUT": str(out), "TMPDIR": str(tmp_path)}  # its logs' mktemp -d stays
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --dry-run
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", *args],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every step, in order, and a clean exit."""
    rc, log = _gpu_check(tmp_path)
    assert rc == 0 and log.rstrip().endswith("status 0"), log[-3000:]
    steps = [line.split(" (")[0] for line in log.splitlines()
             if line.startswith("=== ") and not line.startswith("=== ==")]
    assert steps == ["=== environment", "=== benchmarks", "=== main-job bench",
                     "=== gpu-marked tests", "=== Triton test suite", "=== fwd+bwd summary"], steps
    assert "fused_rnn:reference" in log and "main-job bench SKIPPED" not in log
    # It runs this checkout, installed or not (a lent GPU machine cannot pip install -e .).
    assert f"fused_rnn from {ROOT / 'fused_rnn' / '__init__.py'}" in log, log[:3000]


def test_gpu_check_stops_starting_steps_at_its_budget(tmp_path):
    """With the budget spent, later steps are skipped, said so, and the exit status is 1."""
    rc, log = _gpu_check(tmp_path, "--budget", "0")
    assert rc == 1 and "SKIPPED (the time budget is spent)" in log, log[-3000:]
    assert "benchmarks SKIPPED" in log and "Triton test suite SKIPPED" in log
    assert "main-job bench SKIPPED" in log


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_a_timed_path_unlike_the_checked_one_fails_the_check(monkeypatch, mode):
    """The rows are timed as ``model(x)`` (no initial state) and checked with a random one: a
    module whose stateless call does not start from zeros must fail its row's check."""
    import torch

    import fused_rnn

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    base = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU}[mode]

    class StartsFromHalves(base):
        def forward(self, x, hx=None):
            if hx is None:
                h = torch.full((1, x.shape[0], self.hidden_size), 0.5, dtype=x.dtype)
                hx = (h, h.clone()) if mode == "LSTM" else h
            return super().forward(x, hx)

    args = bench_gpu.parse_args(["--dry-run", "--backends", "reference", "--modes", mode,
                                 "--dtypes", "fp32", "--passes", "fwd"])
    def timer(fn, rep_ms=None):
        fn()
        return 1.0, 5

    checks = {}
    for name, cls in (("plain", base), ("broken", StartsFromHalves)):
        def build(mode_, B, T, H, dtype, device, backend, cls=cls):
            torch.manual_seed(0)
            model = cls(H, H, batch_first=True, backend=backend)
            g = torch.Generator().manual_seed(1)
            return model, torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)

        monkeypatch.setattr(bench_gpu, "build", build)
        (row,) = bench_gpu.measure(args, timer, "cpu", mode, "D1", "fp32", "reference", {})
        checks[name] = row["check"]
        assert row["ms"] == 1.0
    assert checks == {"plain": "no cuDNN reference",
                      "broken": "FAIL: y without h0 is not y with a zero h0"}


def test_the_persistent_variant_runs_only_where_a_path_rule_sends_cuda_elsewhere(monkeypatch):
    """cuda-persistent (FUSED_RNN_CUDA_PATH=persistent) is timed only on rows that plain cuda
    runs on the per-step path by a PathRule; every other variant but cuda-step pins the
    persistent kernel, whatever the rules say for plain cuda."""
    import torch

    bench_gpu = _import("bench_gpu")
    from fused_rnn.ops.cuda import ops

    monkeypatch.delenv("FUSED_RNN_CUDA_PATH", raising=False)
    S3, S4 = bench_gpu.SHAPES["S3"], bench_gpu.SHAPES["S4"]
    monkeypatch.setattr(ops, "PATH_RULES", ())
    assert all(bench_gpu._variant_is_moot("cuda-persistent", mode, S, dt, dev)
               for mode in ("LSTM", "GRU") for S in (S3, S4) for dt in ("fp32", "bf16")
               for dev in ("cpu", "cuda"))
    rule = ops.PathRule(modes=frozenset({"LSTM"}), dtypes=frozenset({torch.bfloat16}),
                        batch=(128, 512), hidden=(1024, 1024), steps=(64, 256),
                        capability=(9, 0), evidence="a test")
    monkeypatch.setattr(ops, "PATH_RULES", (rule,))
    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    assert not bench_gpu._variant_is_moot("cuda-persistent", "LSTM", S4, "bf16", "cuda")
    assert bench_gpu._variant_is_moot("cuda-persistent", "LSTM", S3, "bf16", "cuda")
    assert bench_gpu._variant_is_moot("cuda-persistent", "GRU", S4, "bf16", "cuda")
    assert bench_gpu._variant_is_moot("cuda-persistent", "LSTM", (256, 1024, 1024), "bf16",
                                      "cuda")  # T = 1024: a chunk longer than the rule's
    pinned = {name: env.get("FUSED_RNN_CUDA_PATH") for name, (_, env) in bench_gpu.VARIANTS.items()}
    assert pinned.pop("cuda-step") == "step"
    assert set(pinned.values()) == {"persistent"}, pinned


def test_the_tagged_and_pipelined_variants_run_where_their_copy_differs_from_cuda(monkeypatch):
    """cuda-tagged (FUSED_RNN_CUDA_STAGE_COPY=tagged) is timed on the 16-bit rows where a launch
    of cuda's can take the tagged exchange and no StageCopyRule sends cuda there already;
    cuda-pipelined only on the rows such a rule does. The plan note marks each launch that runs
    the tagged exchange (' tg'). Against a stand-in for an H100's device properties."""
    import types

    import torch

    bench_gpu = _import("bench_gpu")
    from fused_rnn.ops.cuda import ops

    props = types.SimpleNamespace(multi_processor_count=132,
                                  shared_memory_per_block_optin=227 * 1024, major=9)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    for key in ("FUSED_RNN_CUDA_STAGE_COPY", "FUSED_RNN_CUDA_MAX_GROUPS",
                "FUSED_RNN_CUDA_STAGE_K", "FUSED_RNN_CUDA_K_PARTS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(ops, "STAGE_COPY_RULES", ())
    shapes = bench_gpu.SHAPES

    def moot(variant, mode, name, dt, dev="cuda"):
        return bench_gpu._variant_is_moot(variant, mode, shapes[name], dt, dev)

    # no rules: every 16-bit row has a forward launch that takes the tagged exchange (plan.py),
    # fp32 none; the pipelined variant would repeat plain cuda everywhere
    assert not any(moot("cuda-tagged", m, n, dt) for m in ("LSTM", "GRU") for n in shapes
                   for dt in ("bf16", "fp16"))
    assert all(moot("cuda-tagged", m, n, dt) for m in ("LSTM", "GRU") for n in shapes
               for dt in ("fp32", "fp32-strict"))
    assert all(moot("cuda-pipelined", m, n, dt, dev) for m in ("LSTM", "GRU") for n in shapes
               for dt in ("fp32", "bf16") for dev in ("cpu", "cuda"))
    # a plan with K parts cannot take it (S4's LSTM backward); the note says which launch did
    s4 = bench_gpu._cuda_plans("LSTM", shapes["S4"], "bf16")
    assert [p.parts > 1 for p in s4] == [False, True]
    assert bench_gpu._plan_note(s4, tagged=True).split(", ")[0].endswith(" tg")
    assert not bench_gpu._plan_note(s4, tagged=True).endswith(" tg")
    assert " tg" not in bench_gpu._plan_note(s4)
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", "0")  # unstaged: no launch can take it
    assert moot("cuda-tagged", "GRU", "S5", "bf16")
    assert not moot("cuda-tagged", "GRU", "S5", "bf16", "cpu")  # no plans to tell by: it runs
    monkeypatch.delenv("FUSED_RNN_CUDA_STAGE_K")
    # a rule sends plain cuda's LSTM bf16 rows at S5 and S6 to the tagged exchange: there
    # cuda-pipelined times the default copy, and cuda-tagged would repeat plain cuda
    rule = ops.StageCopyRule(modes=frozenset({"LSTM"}), dtypes=frozenset({torch.bfloat16}),
                             batch=(8, 128), hidden=(256, 256), steps=(64, 256),
                             capability=(9, 0), evidence="a test")
    assert [shapes["S5"], shapes["S6"]] == [(8, 256, 256), (128, 64, 256)]  # (B, T, H)
    monkeypatch.setattr(ops, "STAGE_COPY_RULES", (rule,))
    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    for name in shapes:
        ruled = rule.matches("LSTM", torch.bfloat16, *shapes[name][::2], shapes[name][1], (9, 0),
                             False)
        assert moot("cuda-pipelined", "LSTM", name, "bf16") == (not ruled), name
        assert moot("cuda-tagged", "LSTM", name, "bf16") == ruled, name
        assert moot("cuda-pipelined", "LSTM", name, "fp16") and moot("cuda-pipelined", "GRU",
                                                                      name, "bf16")
    assert {n for n in shapes if not moot("cuda-pipelined", "LSTM", n, "bf16")} == {"S5", "S6"}
    assert bench_gpu.VARIANTS["cuda-pipelined"][1]["FUSED_RNN_CUDA_STAGE_COPY"] == "pipelined"


def test_k_parts_variant_runs_only_where_cuda_has_parts(monkeypatch):
    """cuda-p1 (cuda with FUSED_RNN_CUDA_K_PARTS=1) is timed only where one of cuda's launches
    has K parts by the plan; here against a stand-in for an H100's device properties."""
    import types

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    props = types.SimpleNamespace(multi_processor_count=132,
                                  shared_memory_per_block_optin=227 * 1024, major=9)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # fp32 rows: TF32 as in torch
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.delenv("FUSED_RNN_CUDA_MAX_GROUPS", raising=False)
    monkeypatch.delenv("FUSED_RNN_CUDA_STAGE_K", raising=False)
    moot = {(mode, name, dt): bench_gpu._variant_is_moot("cuda-p1", mode, bench_gpu.SHAPES[name],
                                                          dt, "cuda")
            for mode in ("LSTM", "GRU") for name in ("S4", "S5", "S6")
            for dt in ("fp32", "bf16")}
    assert not moot["LSTM", "S4", "fp32"] and not moot["GRU", "S4", "fp32"]
    assert all(moot[mode, name, dt] for mode in ("LSTM", "GRU") for name in ("S5", "S6")
               for dt in ("fp32", "bf16"))
    assert not bench_gpu._variant_is_moot("cuda-p1", "LSTM", (256, 1, 1024), "fp32", "cpu")
    assert bench_gpu._variant_is_moot("cuda-g1", "LSTM", (16, 1, 768), "bf16", "cpu")
    # cuda-gemm32 changes only the 16-bit layers' GEMMs
    assert [bench_gpu._variant_is_moot("cuda-gemm32", "GRU", bench_gpu.SHAPES["S3"], dt, "cuda")
            for dt in ("fp32", "bf16", "fp16")] == [True, False, False]
    # cuda-genfrag changes how tensor-core launches with X in shared memory load fragments: every
    # benchmark row stages X (S4 forward GRU too, since groups give way to the stage), on
    # the FMA path (fp32 without TF32) nothing does, and without staging nothing does either
    assert not any(bench_gpu._variant_is_moot("cuda-genfrag", mode, bench_gpu.SHAPES[name], dt,
                                              "cuda")
                   for mode in ("LSTM", "GRU") for name in bench_gpu.SHAPES
                   for dt in ("fp32", "bf16", "fp16"))
    assert bench_gpu._variant_is_moot("cuda-genfrag", "LSTM", bench_gpu.SHAPES["S3"],
                                      "fp32-strict", "cuda")
    # cuda-mma changes only TF32 launches with X in shared memory: every fp32 row, no 16-bit
    # one, not fp32 without TF32 (the FMA path)
    assert [bench_gpu._variant_is_moot("cuda-mma", mode, bench_gpu.SHAPES[name], dt, "cuda")
            for mode in ("LSTM", "GRU") for name in bench_gpu.SHAPES
            for dt in ("fp32", "bf16", "fp16", "fp32-strict")] == [False, True, True, True] * (
                2 * len(bench_gpu.SHAPES))
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", "0")
    assert bench_gpu._variant_is_moot("cuda-genfrag", "GRU", bench_gpu.SHAPES["S3"], "bf16",
                                      "cuda")
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER", "16")
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER_EXCHANGE", "dsmem")
    assert not bench_gpu._variant_is_moot("cuda-genfrag", "GRU", bench_gpu.SHAPES["S5"], "bf16",
                                          "cuda")
    for key in ("FUSED_RNN_CUDA_STAGE_K", "FUSED_RNN_CUDA_CLUSTER",
                "FUSED_RNN_CUDA_CLUSTER_EXCHANGE"):
        monkeypatch.delenv(key)
    # cuda's rows name their plans: batch groups, K parts and stage K columns per direction
    plans = bench_gpu._cuda_plans("LSTM", bench_gpu.SHAPES["S4"], "fp32")
    assert bench_gpu._plan_note(plans) == "plan fwd b128 g1 p4 k224, bwd b128 g1 p8 k304"
    # cuda-b32 (at most 32 blocks where H's W_hh fits in them) runs where that changes a plan:
    # not GRU at S5 (already 32 blocks of the 8-unit granule), yes LSTM there (128 blocks of 2
    # units); at S4 in bf16 LSTM's slices do not fit in 32 blocks, so the cap rises to 43.
    assert bench_gpu._variant_is_moot("cuda-b32", "GRU", bench_gpu.SHAPES["S5"], "bf16", "cuda")
    assert not bench_gpu._variant_is_moot("cuda-b32", "LSTM", bench_gpu.SHAPES["S5"], "bf16",
                                          "cuda")
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_BLOCKS", "32")
    assert bench_gpu._plan_note(bench_gpu._cuda_plans("LSTM", bench_gpu.SHAPES["S4"], "bf16")) \
        == "plan fwd b43 g1 p1 k0, bwd b43 g1 p1 k192"
    monkeypatch.delenv("FUSED_RNN_CUDA_MAX_BLOCKS")
    # cuda-cl8 (batch groups as clusters of at most 8 blocks) runs where a group fits in one:
    # S5 and S6, not S3's H=1024; the note marks clustered launches. cuda-tc (K-parts teams as
    # clusters) runs where a launch has parts: S4, not S5.
    assert not bench_gpu._variant_is_moot("cuda-cl8", "LSTM", bench_gpu.SHAPES["S6"], "bf16",
                                          "cuda")
    assert bench_gpu._variant_is_moot("cuda-cl8", "LSTM", bench_gpu.SHAPES["S3"], "bf16", "cuda")
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER", "8")
    assert bench_gpu._plan_note(bench_gpu._cuda_plans("LSTM", bench_gpu.SHAPES["S6"], "bf16")) \
        == "plan fwd b32 g4 p1 k256 cl, bwd b32 g4 p1 k1024 cl"
    monkeypatch.delenv("FUSED_RNN_CUDA_CLUSTER")
    # cuda-cl16ds (cuda-cl16 exchanging through distributed shared memory) runs where a launch
    # would: S5 in 16-bit, both directions ("ds"); not S3 (no cluster); in fp32 (TF32) at S5
    # only the forward, as the backward's mirrors do not fit next to its W_hh slice.
    assert not bench_gpu._variant_is_moot("cuda-cl16ds", "LSTM", bench_gpu.SHAPES["S5"], "bf16",
                                          "cuda")
    assert bench_gpu._variant_is_moot("cuda-cl16ds", "LSTM", bench_gpu.SHAPES["S3"], "bf16",
                                      "cuda")
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER", "16")
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER_EXCHANGE", "dsmem")
    assert bench_gpu._plan_note(bench_gpu._cuda_plans("LSTM", bench_gpu.SHAPES["S5"], "bf16")) \
        == "plan fwd b16 g1 p1 k0 ds, bwd b16 g1 p1 k0 ds"
    assert bench_gpu._plan_note(bench_gpu._cuda_plans("LSTM", bench_gpu.SHAPES["S5"], "fp32")) \
        == "plan fwd b16 g1 p1 k0 ds, bwd b16 g1 p1 k1024 cl"
    monkeypatch.delenv("FUSED_RNN_CUDA_CLUSTER")
    monkeypatch.delenv("FUSED_RNN_CUDA_CLUSTER_EXCHANGE")
    assert not bench_gpu._variant_is_moot("cuda-tc", "LSTM", bench_gpu.SHAPES["S4"], "fp32", "cuda")
    assert bench_gpu._variant_is_moot("cuda-tc", "LSTM", bench_gpu.SHAPES["S5"], "fp32", "cuda")
    monkeypatch.setenv("FUSED_RNN_CUDA_TEAM_CLUSTERS", "on")
    assert bench_gpu._plan_note(bench_gpu._cuda_plans("LSTM", bench_gpu.SHAPES["S4"], "fp32")) \
        == "plan fwd b128 g1 p4 k224 tc, bwd b128 g1 p8 k304 tc"
    monkeypatch.delenv("FUSED_RNN_CUDA_TEAM_CLUSTERS")
    # cuda-tb1 (one tile a warp at a time) runs where a launch blocks its tiles: S3's backward
    # and S4 in 16 bits and TF32 (GRU's S3 in TF32 too, since its plans stage X: one batch
    # group and 4 or 8 K parts, 24 tiles a chunk forward); not S1, S2, S5, S6 (fewer tiles than
    # warps), nor plain fp32 (the FMA path never blocks), nor where FUSED_RNN_CUDA_TILE_BLOCK=1
    # already.
    monkeypatch.delenv("FUSED_RNN_CUDA_TILE_BLOCK", raising=False)
    tb1 = {(mode, name, dt): bench_gpu._variant_is_moot("cuda-tb1", mode, bench_gpu.SHAPES[name],
                                                         dt, "cuda")
           for mode in ("LSTM", "GRU") for name in bench_gpu.SHAPES
           for dt in ("fp32", "bf16", "fp16")}
    assert {key for key, moot in tb1.items() if not moot} == {
        (mode, name, dt) for mode in ("LSTM", "GRU") for name in ("S3", "S4")
        for dt in ("fp32", "bf16", "fp16")}
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert bench_gpu._variant_is_moot("cuda-tb1", "LSTM", bench_gpu.SHAPES["S4"], "fp32", "cuda")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setenv("FUSED_RNN_CUDA_TILE_BLOCK", "1")
    assert bench_gpu._variant_is_moot("cuda-tb1", "LSTM", bench_gpu.SHAPES["S4"], "bf16", "cuda")
    monkeypatch.delenv("FUSED_RNN_CUDA_TILE_BLOCK")
    assert not bench_gpu._variant_is_moot("cuda-tb1", "LSTM", bench_gpu.SHAPES["S4"], "bf16",
                                          "cpu")
    # cuda-pb1 (one point a thread at a time) runs where a launch batches its points: S3 and
    # S4, where a thread has two or more points a step; not fp16 (batches of 1), nor where
    # FUSED_RNN_CUDA_POINT_BATCH=1 already. fp32 without TF32 batches too (2 points).
    monkeypatch.delenv("FUSED_RNN_CUDA_POINT_BATCH", raising=False)
    pb1 = {(mode, name, dt): bench_gpu._variant_is_moot("cuda-pb1", mode, bench_gpu.SHAPES[name],
                                                         dt, "cuda")
           for mode in ("LSTM", "GRU") for name in bench_gpu.SHAPES
           for dt in ("fp32", "bf16", "fp16", "fp32-strict")}
    assert {key for key, moot in pb1.items() if not moot} == {
        (mode, name, dt) for mode in ("LSTM", "GRU") for name in ("S3", "S4")
        for dt in ("fp32", "bf16", "fp32-strict")}
    monkeypatch.setenv("FUSED_RNN_CUDA_POINT_BATCH", "1")
    assert bench_gpu._variant_is_moot("cuda-pb1", "LSTM", bench_gpu.SHAPES["S4"], "bf16", "cuda")
    monkeypatch.delenv("FUSED_RNN_CUDA_POINT_BATCH")
    # and so do profile_cuda.py's phase rows, per direction
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profile_cuda
    finally:
        sys.path.pop(0)
    row = profile_cuda._row("LSTM", "S4", "fp32", {"direction": "backward", "blocks": 128}, plans)
    assert row[profile_cuda.COLUMNS.index("plan")] == "g1 p8 k304"
    # a tagged run marks the launches that take the exchange (S4's LSTM forward, not its
    # backward with K parts)
    s4 = bench_gpu._cuda_plans("LSTM", bench_gpu.SHAPES["S4"], "bf16")
    plan = [profile_cuda._row("LSTM", "S4", "bf16", {"direction": d, "blocks": 128}, s4,
                              tagged=True)[profile_cuda.COLUMNS.index("plan")]
            for d in ("forward", "backward")]
    assert plan[0].endswith(" tg") and not plan[1].endswith(" tg"), plan


def test_gpu_check_turns_k_parts_off_when_their_gpu_tests_fail(tmp_path):
    """gpu_common.sh frnn_parts_failed: a failed test id with "parts" in pytest's -ra summary,
    and nothing else, makes gpu_check.sh time the rest without K parts."""
    logs = {
        "parts": "FAILED tests/cuda/test_cuda_gpu.py::test_matches_reference[LSTM-bf16-"
                 "T16-B16-I32-H256-parts4-dense-fwd] - AssertionError\n",
        "other": "FAILED tests/cuda/test_cuda_gpu.py::test_opcheck[GRU] - AssertionError\n"
                 "PASSED tests/cuda/test_cuda_gpu.py::test_x[parts4]\n",
        "clean": "520 passed in 80.0s\n",
    }
    got = {}
    for name, text in logs.items():
        (tmp_path / name).write_text(text)
        cmd = f'source "{ROOT}/benchmarks/gpu_common.sh" && frnn_parts_failed "{tmp_path / name}"'
        r = subprocess.run(["bash", "-c", cmd], check=False)
        got[name] = r.returncode == 0
    cmd = f'source "{ROOT}/benchmarks/gpu_common.sh" && frnn_parts_failed "{tmp_path / "none"}"'
    missing = subprocess.run(["bash", "-c", cmd], check=False)
    assert got == {"parts": True, "other": False, "clean": False} and missing.returncode != 0
    # and a failed cluster-mode test drops the cluster variants from the bench
    (tmp_path / "cluster").write_text(
        "FAILED tests/cuda/test_cuda_gpu.py::test_cluster_mode_launches_clusters[16] - assert\n")
    script = (f'source "{ROOT}/benchmarks/gpu_common.sh" && '
              f'frnn_cluster_failed "{tmp_path / "cluster"}" && '
              f'! frnn_cluster_failed "{tmp_path / "parts"}" && '
              'frnn_without_clusters cuda,triton,cuda-p1,cuda-cl16,cuda-cl16ds,cuda-cl8,cuda-tc,'
              'cuda-b32')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "cuda,triton,cuda-p1,cuda-b32", r


def _gpu_table(tmp_path, cases, gpu_tests="520 passed, 4 skipped in 80.0s", overrides="none"):
    """A GPU table as bench_gpu.py writes it (write_report), from cases: {(cell, dtype): {shape:
    cuda's ratio to cuDNN, (ratio, check), None = no cuda row, "skipped" = skipped for time,
    "absent" = no row at all, "fwd failed" = 3x fwd+bwd but the forward's timing raised}}, every
    shape of S1-S6 given, and of the one-step shapes those given; a cuda-p1 variant wins 9x
    everywhere (it must not count)."""
    import argparse

    bench_gpu = _import("bench_gpu")
    env = dict(bench_gpu.environment("cpu", None), gpu="NVIDIA H200", gpu_tests=gpu_tests,
               overrides=overrides, commit="0123abc", tf32="cudnn.allow_tf32=True",
               capability="9.0")
    rows = []
    for (cell, dtype), by_shape in cases.items():
        for shape, (B, T, H) in {**bench_gpu.SHAPES, **bench_gpu.STEP_SHAPES}.items():
            if shape in bench_gpu.STEP_SHAPES and shape not in by_shape:
                continue
            v = by_shape[shape]
            if v == "absent":
                continue
            base = dict(cell=cell, shape=shape, BxTxH=f"{B}x{T}x{H}", dtype=dtype)
            for p in ("fwd", "fwd+bwd"):
                rows.append(dict(base, backend="cudnn", ms=1.0, check="reference", **{"pass": p}))
                if v == "skipped":
                    rows.append(dict(base, backend="cuda", note="skipped: time", _skipped=True,
                                     **{"pass": p}))
                elif v == "fwd failed" and p == "fwd":
                    rows.append(dict(base, backend="cuda", check="ok", **{"pass": p},
                                     note="RuntimeError: CUDA error: unspecified launch failure"))
                elif v is not None:
                    ratio, check = v if isinstance(v, tuple) else (3.0 if v == "fwd failed"
                                                                   else v, "ok")
                    rows.append(dict(base, backend="cuda", ms=1.0 / ratio, check=check,
                                     max_rel_err=1e-3, **{"pass": p}))
                rows.append(dict(base, backend="cuda-p1", ms=1.0 / 9, check="ok", **{"pass": p}))
    bench_gpu.add_ratios(rows)
    paths = (tmp_path / "2026-12-01-NVIDIA-H200.md", tmp_path / "2026-12-01-NVIDIA-H200.csv")
    bench_gpu.write_report(rows, env, argparse.Namespace(out_dir=tmp_path, dry_run=False,
                                                         time_budget=float("inf")), [], paths)
    return paths[1]


def test_auto_rules_from_a_gpu_table(tmp_path, capsys):
    """benchmarks/auto_rules.py: a rule per (cell, dtype) only where the backend beat cuDNN by
    the margin on every shape S1-S6, each timed and checked against cuDNN, spanning those
    shapes; the printed code builds valid AutoRules; everything else is listed with the rows
    that stopped it."""
    import torch

    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    from fused_rnn.backends import AutoRule

    every = dict.fromkeys(bench_gpu.SHAPES, 3.0)
    path = _gpu_table(tmp_path, {
        ("LSTM", "bf16"): {**every, "G1": 0.2},  # a one-step row neither stops nor widens it
        ("LSTM", "fp32"): {**every, "S4": 0.9},
        ("GRU", "fp16"): {**every, "S6": None},
        ("GRU", "bf16"): {**every, "S2": 1.02},
        # fast but wrong, and a shape cut for time
        ("GRU", "fp32"): {**every, "S3": (3.0, "FAIL: dx 0.5 > 0.02"), "S5": "skipped"},
        ("LSTM", "fp16"): {**every, "S5": "absent", "S1": "fwd failed"},  # a shape missing
    })
    assert auto_rules.main([str(path)]) == 0
    out = capsys.readouterr().out
    ns = {"AutoRule": AutoRule, "torch": torch}
    exec(out, ns)  # noqa: S102 - the printed rules are valid code that builds AutoRules
    (rule,) = ns["AUTO_RULES"]
    assert rule.backend == "cuda" and rule.modes == {"LSTM"} and rule.dtypes == {torch.bfloat16}
    assert rule.hidden == (256, 1024) and rule.batch == (8, 256) and rule.capability == (9, 0)
    assert rule.steps == (64, 1024)
    args = ("cuda", "LSTM", torch.bfloat16, 512, 64, 1, False, True)
    assert rule.matches(*args, (9, 0)) and not rule.matches(*args, (8, 0))
    assert rule.matches(*args, (9, 0), 64) and not rule.matches(*args, (9, 0), 8)
    assert rule.evidence == "benchmarks/results/2026-12-01-NVIDIA-H200.md"
    assert "LSTM fp32: no rule; S4: 0.90x cuDNN" in out
    assert "GRU fp16: no rule; S6: no cuda row" in out
    assert "GRU bf16: no rule; S2: 1.02x cuDNN (< 1.05)" in out
    assert ("GRU fp32: no rule; S3: check FAIL: dx 0.5 > 0.02; S5: not timed (skipped: time)"
            in out)
    assert ("LSTM fp16: no rule; S1: fwd not timed (RuntimeError: CUDA error: unspecified "
            "launch failure); S5: not in the table") in out
    # a dry run's table is refused: its times mean nothing
    dry = tmp_path / "dry.csv"
    dry.write_text("gpu,cell\n\"none (dry run on the CPU, Triton interpreter)\",LSTM\n")
    assert auto_rules.main([str(dry)]) == 2


@pytest.mark.parametrize("gpu_tests, overrides, backend, refused", [
    ("not run", "none", "cuda", "did not pass"),
    ("3 failed, 517 passed in 80.0s", "none", "cuda", "did not pass"),
    ("517 passed, 2 errors in 80.0s", "none", "cuda", "did not pass"),
    ("no tests ran in 0.5s", "none", "cuda", "did not pass"),
    ("4 skipped in 0.5s", "none", "cuda", "did not pass"),
    # most tests skipped: the kernels a rule would choose were not tested
    ("1 passed, 856 skipped in 9.0s", "none", "cuda", "more than 10% were skipped"),
    ("90 passed, 11 skipped in 9.0s", "none", "cuda", "did not pass"),
    ("90 passed, 10 skipped in 9.0s", "none", "cuda", None),
    # gpu_check.sh's other one-line results (gpu_common.sh frnn_tests_summary)
    ("805 passed, 6 deselected in 80.1s; failed: test_a[parts4]", "none", "cuda", "did not pass"),
    ("timed out: test_b (after 300 passed, 0 failed)", "none", "cuda", "did not pass"),
    ("not run (the CUDA build failed)", "none", "cuda", "did not pass"),
    ("805 passed, 1 rerun in 80.1s", "none", "cuda", "did not pass"),
    ("520 passed, 2 xfailed, 4 skipped, 6 deselected, 1 warning in 80.0s", "none", "cuda", None),
    ("805 passed, 6 deselected in 80.12s (0:01:20)", "none", "cuda", None),
    # K parts forced off for the whole run after a failed test: not what auto would run
    ("519 passed in 80.0s", "FUSED_RNN_CUDA_K_PARTS=1", "cuda", "FUSED_RNN_CUDA_K_PARTS=1"),
    ("519 passed in 80.0s", "FUSED_RNN_CUDA_K_PARTS=1", "triton", None),
    ("519 passed in 80.0s", "FUSED_RNN_CUDA_BUILD_DIR=/tmp/ext", "cuda", None),
])
def test_auto_rules_refuse_untested_or_overridden_tables(tmp_path, capsys, gpu_tests, overrides,
                                                         backend, refused):
    """No rule at all from a table whose CUDA GPU tests did not pass (or did not run), or for
    a backend whose rows all ran under a FUSED_RNN_<BACKEND>_* setting; the reason is printed."""
    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    path = _gpu_table(tmp_path, {("LSTM", "bf16"): dict.fromkeys(bench_gpu.SHAPES, 3.0)},
                      gpu_tests=gpu_tests, overrides=overrides)
    triton = ["--triton-tests", "40 passed in 30.0s"] if backend == "triton" else []
    rc = auto_rules.main([str(path), "--backend", backend, *triton])
    out = capsys.readouterr().out
    if refused:
        assert rc == 2 and "AutoRule(" not in out and refused in out, out
    else:
        assert rc == 0 and ("AutoRule(" in out) == (backend == "cuda"), out
    # a table from before these columns cannot show its tests passed
    old = tmp_path / "old.csv"
    old.write_text("gpu,cell,shape,commit,capability\nNVIDIA H200,LSTM,S1,0123abc,9.0\n")
    assert auto_rules.main([str(old)]) == 2
    assert "no gpu_tests column" in capsys.readouterr().out


@pytest.mark.parametrize("edit", ["repeat-failed", "mixed-commit", "mixed-gpu", "mixed-tf32",
                                  "mixed-tests", "mixed-overrides"])
def test_auto_rules_refuse_a_table_with_repeated_rows_or_from_several_runs(tmp_path, capsys,
                                                                           edit):
    """Rows are looked up by backend, cell, dtype, shape and pass, and the table-wide facts
    (commit, GPU, TF32, GPU tests, overrides) were read off the first row only: a repeated row
    (a backend named twice in --backends) hid a failed one before it, and a table merged from
    several runs passed on its first row's facts. Both are refused now, in every mode."""
    import csv

    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    path = _gpu_table(tmp_path, {("LSTM", "bf16"): dict.fromkeys(bench_gpu.SHAPES, 3.0)})
    assert auto_rules.main([str(path)]) == 0 and "AutoRule(" in capsys.readouterr().out
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    if edit == "repeat-failed":
        i = next(i for i, r in enumerate(rows) if r["backend"] == "cuda"
                 and r["pass"] == "fwd+bwd" and r["shape"] == "S3")
        rows.insert(i, {**rows[i], "check": "FAIL: dx 0.5 > 0.1"})
        said = "rows repeat (the first: cuda LSTM bf16 S3 fwd+bwd)"
    else:
        col, value = {"mixed-commit": ("commit", "0123abc (+ uncommitted changes)"),
                      "mixed-gpu": ("gpu", "NVIDIA A100-SXM4-80GB"),
                      "mixed-tf32": ("tf32", "cudnn.allow_tf32=False"),
                      "mixed-tests": ("gpu_tests", "5 failed, 840 passed in 76.1s"),
                      "mixed-overrides": ("overrides", "FUSED_RNN_CUDA_K_PARTS=1")}[edit]
        last[col] = value
        said = f"its rows disagree on {col}"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for mode in ([], ["--paths"], ["--stage-copy"]):
        assert auto_rules.main([str(path), *mode]) == 2, mode
        out = capsys.readouterr().out
        assert said in out and "Rule(" not in out, out


@pytest.mark.parametrize("margin", ["1", "1.0", "0.3", "nan", "-2"])
def test_auto_rules_take_only_a_margin_above_one(tmp_path, capsys, margin):
    """--margin 0.3 proposed a rule for a backend three times slower than cuDNN, and 1 counted
    ties as wins."""
    auto_rules = _import("auto_rules")
    with pytest.raises(SystemExit) as e:
        auto_rules.main([str(tmp_path / "t.csv"), "--margin", margin])
    assert e.value.code == 2 and "must be above 1" in capsys.readouterr().err


def test_the_bench_times_a_backend_or_shape_named_twice_once():
    bench_gpu = _import("bench_gpu")
    assert bench_gpu._split("cuda,triton,cuda", ("cuda", "triton"), "backend") == ["cuda",
                                                                                     "triton"]


@pytest.mark.parametrize("commit", ["unknown (no git)", "0123abc (+ uncommitted changes)", ""])
def test_auto_rules_refuse_a_table_of_an_unknown_or_dirty_commit(tmp_path, capsys, commit):
    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    path = _gpu_table(tmp_path, {("LSTM", "bf16"): dict.fromkeys(bench_gpu.SHAPES, 3.0)})
    text = path.read_text().replace("0123abc", commit)
    path.write_text(text)
    assert auto_rules.main([str(path)]) == 2
    assert "the table's commit is" in capsys.readouterr().out


def test_auto_rules_for_triton_need_the_triton_tests(tmp_path, capsys):
    """The table records the CUDA GPU tests; gpu_check.sh runs the Triton suite on the GPU
    after the bench, and a triton rule needs that suite's summary, passed."""
    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    every = dict.fromkeys(bench_gpu.SHAPES, 3.0)
    path = _gpu_table(tmp_path, {("LSTM", "bf16"): every}, gpu_tests="not run (no cuda)")
    text = path.read_text().replace(",cuda,", ",triton,")
    path.write_text(text)
    assert auto_rules.main([str(path), "--backend", "triton"]) == 2
    assert "--triton-tests" in capsys.readouterr().out
    assert auto_rules.main([str(path), "--backend", "triton", "--triton-tests",
                            "2 failed, 38 passed in 30.0s"]) == 2
    assert "Triton GPU tests did not pass" in capsys.readouterr().out
    assert auto_rules.main([str(path), "--backend", "triton", "--triton-tests",
                            "40 passed in 30.0s"]) == 0
    assert "AutoRule(backend='triton'" in capsys.readouterr().out


def test_auto_rules_need_the_forward_to_win_and_say_which_tf32(tmp_path, capsys):
    """A rule also sends inference (forward-only) calls to the backend: a forward slower than
    cuDNN stops it. fp32 rules hold with TF32 on ("fp32" rows of a TF32 run) or off
    ("fp32-strict" rows), and auto matches them only in that setting."""
    import torch

    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    from fused_rnn.backends import AutoRule

    every = dict.fromkeys(bench_gpu.SHAPES, 3.0)
    path = _gpu_table(tmp_path, {("LSTM", "fp32"): every, ("LSTM", "fp32-strict"): every,
                                 ("GRU", "bf16"): every})
    import csv

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    for r in rows:  # GRU bf16's forward at S3: 0.5x cuDNN (its fwd+bwd still 3x)
        if (r["cell"], r["dtype"], r["shape"], r["backend"], r["pass"]) == (
                "GRU", "bf16", "S3", "cuda", "fwd"):
            r["x_cudnn_same_dtype"] = "0.5"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    assert auto_rules.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "GRU bf16: no rule; S3: fwd 0.50x cuDNN (< 1.05)" in out
    ns = {"AutoRule": AutoRule, "torch": torch}
    exec(out, ns)  # noqa: S102 -- the printed rules are the code under test
    strict, tf32 = sorted(ns["AUTO_RULES"], key=lambda r: r.tf32)
    assert strict.dtypes == tf32.dtypes == {torch.float32}
    assert (strict.tf32, tf32.tf32) == (False, True)
    args = ("cuda", "LSTM", torch.float32, 512, 64, 1, False)
    assert tf32.matches(*args, True, (9, 0)) and not tf32.matches(*args, False, (9, 0))
    assert strict.matches(*args, False, (9, 0)) and not strict.matches(*args, True, (9, 0))
    assert AutoRule("cuda", frozenset({"GRU"}), frozenset({torch.bfloat16}), (1, 9), (1, 9),
                    "x").matches("cuda", "GRU", torch.bfloat16, 5, 5, 1, False, False)
    with pytest.raises(ValueError, match="tf32"):
        AutoRule("cuda", frozenset({"GRU"}), frozenset({torch.bfloat16}), (1, 9), (1, 9), "x",
                 tf32=True)


def _rewrite_table(path, edit):
    """Rewrites the CSV at path as the rows edit(rows) returns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(edit(rows))


def _edit_table(path, edit):
    """Rewrites the CSV at path with edit(row) applied to every row (in place)."""
    def each(rows):
        for r in rows:
            edit(r)
        return rows

    _rewrite_table(path, each)


def test_auto_rules_stop_at_any_unchecked_or_slow_row_of_either_pass(tmp_path, capsys):
    """A forward that failed its check or won by less than the margin, a fwd+bwd row whose
    check is not "ok" (no cuDNN reference) or whose ratio is NaN, or a cuDNN row without a
    time stops the rule."""
    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    every = dict.fromkeys(bench_gpu.SHAPES, 3.0)
    cases = [("LSTM", "bf16"), ("LSTM", "fp16"), ("GRU", "bf16"), ("GRU", "fp16"),
             ("GRU", "fp32"), ("LSTM", "fp32")]
    path = _gpu_table(tmp_path, dict.fromkeys(cases, every))

    def edit(r):
        where = (r["cell"], r["dtype"], r["shape"], r["backend"], r["pass"])
        if where == ("LSTM", "fp32", "S3", "cuda", "fwd+bwd"):
            r["x_cudnn_same_dtype"] = "nan"  # not a win (nan < margin is False)
        elif where == ("LSTM", "bf16", "S2", "cuda", "fwd"):
            r["check"] = "FAIL: y 0.5 > 0.1"
        elif where == ("LSTM", "fp16", "S4", "cuda", "fwd"):
            r["x_cudnn_same_dtype"] = "1.02"  # faster than cuDNN, within the margin
        elif where == ("GRU", "bf16", "S6", "cuda", "fwd+bwd"):
            r["check"] = "no cuDNN reference"
        elif where == ("GRU", "fp16", "S1", "cudnn", "fwd+bwd"):
            r["ms"], r["note"] = "", "RuntimeError: out of memory"
    _edit_table(path, edit)
    assert auto_rules.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "AutoRule(" in out and "{'GRU'}), dtypes=frozenset({torch.float32})" in out, out
    assert out.count("AutoRule(") == 1, out
    assert "LSTM bf16: no rule; S2: fwd check FAIL: y 0.5 > 0.1" in out
    assert "LSTM fp16: no rule; S4: fwd 1.02x cuDNN (< 1.05)" in out
    assert "GRU bf16: no rule; S6: check no cuDNN reference" in out
    assert "GRU fp16: no rule; S1: no cuDNN time (RuntimeError: out of memory)" in out
    assert "LSTM fp32: no rule; S3: nanx cuDNN (< 1.05)" in out


def test_auto_rules_stop_at_a_cudnn_row_not_finite_or_a_row_timed_too_few_times(tmp_path,
                                                                                capsys):
    """A win over a cuDNN row whose own outputs were not finite, or over a row of either side
    timed fewer than MIN_REPS times ("only N runs timed"), is not evidence for a rule, in
    either pass. MIN_REPS runs, or a count the timer could not give (older Triton), are."""
    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    every = dict.fromkeys(bench_gpu.SHAPES, 3.0)
    cases = [("LSTM", "bf16"), ("LSTM", "fp16"), ("GRU", "bf16"), ("GRU", "fp16"),
             ("GRU", "fp32"), ("RNN", "fp32")]
    path = _gpu_table(tmp_path, dict.fromkeys(cases, every))
    few = str(bench_gpu.MIN_REPS - 1)

    def edit(r):
        where = (r["cell"], r["dtype"], r["shape"], r["backend"], r["pass"])
        if where == ("LSTM", "bf16", "S3", "cudnn", "fwd+bwd"):
            r["check"] = "FAIL: y not finite"
        elif where in {("LSTM", "fp16", "S5", "cuda", "fwd+bwd"),
                       ("GRU", "bf16", "S2", "cudnn", "fwd")}:
            r["reps"] = few
        elif where == ("GRU", "fp16", "S4", "cudnn", "fwd"):
            r["check"] = "FAIL: h_n not finite"
        elif (r["cell"], r["dtype"]) == ("GRU", "fp32"):
            r["reps"] = str(bench_gpu.MIN_REPS)
        # RNN fp32: no reps at all, as a Triton without return_mode="all" leaves them
    _edit_table(path, edit)
    assert auto_rules.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("AutoRule(") == 2, out
    assert "{'GRU'}), dtypes=frozenset({torch.float32})" in out, out
    assert "{'RNN'}), dtypes=frozenset({torch.float32})" in out, out
    assert "LSTM bf16: no rule; S3: cuDNN's check FAIL: y not finite" in out, out
    assert f"LSTM fp16: no rule; S5: ours timed {few} times (< 5)" in out, out
    assert f"GRU bf16: no rule; S2: fwd cuDNN's timed {few} times (< 5)" in out, out
    assert "GRU fp16: no rule; S4: fwd cuDNN's check FAIL: h_n not finite" in out, out


def test_a_row_timed_fewer_than_min_reps_times_says_so(monkeypatch):
    """bench_gpu's timer asks for MIN_REPS runs; where it got fewer, the row's note says how
    many (auto_rules.py reads the count). None (a Triton that cannot say) gets no note."""
    import torch

    bench_gpu = _import("bench_gpu")
    args = bench_gpu.parse_args(["--dry-run", "--backends", "reference", "--modes", "GRU",
                                 "--dtypes", "fp32", "--passes", "fwd"])
    notes = {}
    for reps in (bench_gpu.MIN_REPS - 1, bench_gpu.MIN_REPS, None):
        def timer(fn, rep_ms=None, reps=reps):
            fn()
            return 2.0, reps

        torch.manual_seed(0)
        (row,) = bench_gpu.measure(args, timer, "cpu", "GRU", "D1", "fp32", "reference", {})
        assert row["ms"] == 2.0 and row["reps"] == reps
        notes[reps] = row.get("note")
    assert notes == {bench_gpu.MIN_REPS - 1: f"only {bench_gpu.MIN_REPS - 1} runs timed",
                     bench_gpu.MIN_REPS: None, None: None}


def test_auto_rules_need_a_forward_row_for_every_shape(tmp_path, capsys):
    """A table from a bench run without the forward pass (--passes fwd+bwd) cannot show that
    forward-only calls are faster, and a rule sends those too: no rule from it."""
    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    path = _gpu_table(tmp_path, {("GRU", "bf16"): dict.fromkeys(bench_gpu.SHAPES, 3.0)})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r for r in rows if (r["shape"], r["backend"], r["pass"])
                         != ("S5", "cuda", "fwd"))
    assert auto_rules.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "AutoRule(" not in out, out
    assert "GRU bf16: no rule; S5: no fwd row" in out, out


def test_auto_rules_take_tf32_and_capability_from_the_table(tmp_path, capsys):
    """An fp32 rule of a table run with TF32 off says tf32=False; a table without a compute
    capability is refused (a rule holds on the kind of GPU it was measured on)."""
    import torch

    auto_rules = _import("auto_rules")
    bench_gpu = _import("bench_gpu")
    from fused_rnn.backends import AutoRule

    path = _gpu_table(tmp_path, {("LSTM", "fp32"): dict.fromkeys(bench_gpu.SHAPES, 3.0)})
    _edit_table(path, lambda r: r.update(tf32="cudnn.allow_tf32=False", capability="8.6"))
    assert auto_rules.main([str(path)]) == 0
    ns = {"AutoRule": AutoRule, "torch": torch}
    exec(capsys.readouterr().out, ns)  # noqa: S102 -- the printed rules are the code under test
    (rule,) = ns["AUTO_RULES"]
    assert rule.tf32 is False and rule.capability == (8, 6)
    _edit_table(path, lambda r: r.update(capability=""))
    assert auto_rules.main([str(path)]) == 2
    assert "no compute capability" in capsys.readouterr().out
    # a dry run's table, however complete otherwise, is refused
    _edit_table(path, lambda r: r.update(capability="9.0", gpu="none (dry run on the CPU)"))
    assert auto_rules.main([str(path)]) == 2
    assert "a dry run on the CPU" in capsys.readouterr().out


def test_header_records_overrides_gpu_tests_and_commit(tmp_path):
    """The FUSED_RNN_* settings of the run, gpu_check.sh's GPU-test summary ($FRNN_GPU_TESTS)
    and $FRNN_COMMIT (the device gets no .git) go into the .md header and every CSV row."""
    text, rows = _run(tmp_path, "--shapes", "D1", "--backends", "reference", env={
        "FUSED_RNN_CUDA_K_PARTS": "1", "FRNN_GPU_TESTS": "520 passed, 4 skipped in 80.0s\n",
        "FRNN_COMMIT": "4522454 (+ uncommitted changes)"})
    assert "- overrides: FUSED_RNN_CUDA_K_PARTS=1\n" in text
    assert "- gpu_tests: 520 passed, 4 skipped in 80.0s\n" in text
    assert "- commit: 4522454 (+ uncommitted changes)\n" in text
    assert rows and all(r["overrides"] == "FUSED_RNN_CUDA_K_PARTS=1" and
                        r["gpu_tests"] == "520 passed, 4 skipped in 80.0s" and
                        r["commit"] == "4522454 (+ uncommitted changes)" for r in rows)
    text, rows = _run(tmp_path, "--shapes", "D1", "--backends", "reference")
    assert "- overrides: none\n" in text and "- gpu_tests: not run\n" in text
    assert rows[0]["commit"] != "4522454 (+ uncommitted changes)"


# --------------------------------------------------------------------------- in-process runs
def _main(monkeypatch, tmp_path, *extra):
    """bench_gpu.main --dry-run on the reference backend, in this process (so a test can
    break a piece of it), under GRU fp32 on D1 unless extra says otherwise."""
    bench_gpu = _import("bench_gpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main sets it; put back after the test
    for k in list(os.environ):
        if k.startswith(("FRNN_", "FUSED_RNN_")):
            monkeypatch.delenv(k)
    rc = bench_gpu.main(["--dry-run", "--backends", "reference", "--modes", "GRU", "--dtypes",
                         "fp32", "--shapes", "D1", "--out-dir", str(tmp_path), *extra])
    text, rows = _read(tmp_path)
    # 1 exactly when some row failed its check against cuDNN
    assert rc == int(any(r["check"].startswith("FAIL") for r in rows)), (rc, rows)
    return text, rows


class _Exec(Exception):
    """os.execv, stood in for: the command the bench would have replaced itself with."""


def test_a_lost_cuda_context_costs_its_row_and_the_rest_run_in_a_fresh_process(
        monkeypatch, tmp_path):
    """A kernel fault is sticky: every later CUDA call of the process fails, cuDNN's too. After
    the row that took the context, the bench replaces itself (os.execv) with a fresh process
    that carries on from the report's rows: the faulting row keeps its note, no row is timed
    twice, none is lost, and rows of ours whose cuDNN rows the first process timed are still
    checked (the fresh process takes cuDNN's tensors again, without a row)."""
    bench_gpu = _import("bench_gpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for k in list(os.environ):
        if k.startswith(("FRNN_", "FUSED_RNN_")):
            monkeypatch.delenv(k)
    calls, lost = [], []
    real_measure = bench_gpu.measure

    def measure(args, timer, device, mode, shape, dtype_name, backend, refs, timed=True):
        calls.append((shape, backend, timed))
        return real_measure(args, timer, device, mode, shape, dtype_name, backend, refs, timed)

    def context_lost(device):  # the reference backend's D1 row faults, once
        fault = calls[-1][:2] == ("D1", "reference") and not any(lost)
        lost.append(fault)
        return fault

    def execv(path, cmd):
        raise _Exec(cmd)

    monkeypatch.setattr(bench_gpu, "measure", measure)
    monkeypatch.setattr(bench_gpu, "_context_lost", context_lost)
    monkeypatch.setattr(bench_gpu.os, "execv", execv)
    argv = ["--dry-run", "--backends", "reference,triton", "--modes", "GRU", "--dtypes", "fp32",
            "--shapes", "D1,D3", "--passes", "fwd", "--out-dir", str(tmp_path)]
    with pytest.raises(_Exec) as e:
        bench_gpu.main(argv)
    cmd = e.value.args[0]
    assert cmd[1] == str(ROOT / "benchmarks" / "bench_gpu.py") and cmd[-2] == "--resume-rows"
    assert cmd[2:-2] == argv
    assert calls == [("D1", None, True), ("D1", "reference", True)]
    _, rows = _read(tmp_path)  # the report holds the faulting row before the process goes
    assert [(r["shape"], r["backend"]) for r in rows] == [("D1", "torch.nn (cpu)"),
                                                          ("D1", "reference")]
    calls.clear()
    assert bench_gpu.main(cmd[2:]) == 0
    assert not Path(cmd[-1]).exists(), "the state file is left behind"
    assert calls == [("D3", None, True), ("D3", "reference", True),  # round 1's rest
                     ("D1", None, False), ("D1", "triton", True),  # cuDNN's tensors again
                     ("D3", "triton", True)]
    text, rows = _read(tmp_path)
    got = [(r["shape"], r["backend"]) for r in rows]
    assert sorted(got) == sorted({(s, b) for s in ("D1", "D3")
                                  for b in ("torch.nn (cpu)", "reference", "triton")}), got
    by = {(r["shape"], r["backend"]): r for r in rows}
    assert "took the CUDA context with it" in by["D1", "reference"]["note"]
    for shape in ("D1", "D3"):
        assert by[shape, "triton"]["check"] == "ok", by[shape, "triton"]
        assert float(by[shape, "triton"]["x_cudnn_same_dtype"]) > 0
    assert text.count("| GRU | D1 |") == 3 and text.count("| GRU | D3 |") == 3
    # the fresh process's own fault: its faulting row is not timed again by the next one
    calls.clear()
    monkeypatch.setattr(bench_gpu, "_context_lost",
                        lambda device: calls[-1][:2] == ("D3", "triton"))
    with pytest.raises(_Exec) as e:
        bench_gpu.main(argv)
    calls.clear()
    assert bench_gpu.main(e.value.args[0][2:]) == 0
    assert calls == []  # only its last row faulted: nothing was left


def _hook_backward(monkeypatch, backward):
    """bench_gpu.build, with the fused model's output passing its gradient through
    backward(grad, n): n counts the backward calls since the model was built."""
    import torch

    bench_gpu = _import("bench_gpu")
    real = getattr(bench_gpu.build, "__wrapped__", bench_gpu.build)  # not an earlier hook's

    def build(mode, B, T, H, dtype, device, backend):
        model, x, cot = real(mode, B, T, H, dtype, device, backend)
        if backend is None:
            return model, x, cot
        calls = []

        class Hook(torch.autograd.Function):
            @staticmethod
            def forward(ctx, y):
                return y.clone()

            @staticmethod
            def backward(ctx, g):
                calls.append(1)
                return backward(g, len(calls))

        inner = model.forward
        def forward(x, hx=None):
            y, state = inner(x, hx)
            return Hook.apply(y), state

        model.forward = forward
        return model, x, cot

    build.__wrapped__ = real
    monkeypatch.setattr(bench_gpu, "build", build)
    return bench_gpu


ERROR = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
         "asynchronously reported | so the stack trace below might be incorrect.")


def test_a_failing_backward_is_a_note_and_the_run_goes_on(monkeypatch, tmp_path):
    """A backward that raises (in the check's fwd+bwd, or later while timed) is one line in its
    row's note; the other rows, shapes and backends are still timed and written, and the .md
    table keeps one cell per column."""
    def fail(g, n):
        raise RuntimeError(ERROR)

    _hook_backward(monkeypatch, fail)
    text, rows = _main(monkeypatch, tmp_path, "--shapes", "D1,D3", "--passes", "fwd,fwd+bwd")
    by = {(r["shape"], r["backend"], r["pass"]): r for r in rows}
    assert len(by) == 8
    for shape in ("D1", "D3"):
        for p in ("fwd", "fwd+bwd"):
            assert float(by[shape, "torch.nn (cpu)", p]["ms"]) > 0
            ours = by[shape, "reference", p]
            assert ours["ms"] == "" and ours["check"] == ""
            assert ours["note"].startswith("RuntimeError: CUDA error: an illegal memory access "
                                           "was encountered CUDA kernel errors"), ours["note"]
    table = _md_table(text)
    assert len(table) == 2 + 8 and all(len(r) == len(table[0]) for r in table), table
    assert "max abs Δy" in table[0] and "reported \\| so the" in text

    # the check's pass works, the timed fwd+bwd then fails: the forward is still timed
    def fail_later(g, n):
        if n > 1:
            raise RuntimeError(ERROR)
        return g

    _hook_backward(monkeypatch, fail_later)
    text, rows = _main(monkeypatch, tmp_path, "--shapes", "D1,D3", "--passes", "fwd,fwd+bwd")
    by = {(r["shape"], r["backend"], r["pass"]): r for r in rows}
    for shape in ("D1", "D3"):
        assert by[shape, "reference", "fwd"]["check"] == "ok"
        assert float(by[shape, "reference", "fwd"]["ms"]) > 0
        assert by[shape, "reference", "fwd+bwd"]["ms"] == ""
        assert "illegal memory access" in by[shape, "reference", "fwd+bwd"]["note"]


def _wrap_fused_forward(monkeypatch, wrap):
    """bench_gpu.build with the fused model's forward replaced by ``wrap(forward, model)``."""
    bench_gpu = _import("bench_gpu")
    real = bench_gpu.build

    def build(mode, B, T, H, dtype, device, backend):
        model, x, cot = real(mode, B, T, H, dtype, device, backend)
        if backend is not None:
            model.forward = wrap(model.forward, model)
        return model, x, cot

    monkeypatch.setattr(bench_gpu, "build", build)
    return bench_gpu


def test_one_steps_share_of_a_weight_gradient_missing_fails_the_check(monkeypatch, tmp_path):
    """dW_hh short of one step's share (1/T of it here, as if one step's term were lost): at
    T=64 that is inside the whole-tensor bound, on the extra probe of the first 4 steps a
    quarter of it."""
    def wrap(inner, model):
        steps = []

        def forward(x, hx=None):
            steps.append(x.shape[1])
            return inner(x, hx)

        model.weight_hh_l0.register_hook(lambda g: g * (1 - 1 / steps[-1]))
        return forward

    bench_gpu = _wrap_fused_forward(monkeypatch, wrap)
    monkeypatch.setitem(bench_gpu.DRY_SHAPES, "D9", (2, 64, 8))
    _, rows = _main(monkeypatch, tmp_path, "--shapes", "D9", "--passes", "fwd")
    (ours,) = [r for r in rows if r["backend"] == "reference"]
    assert ours["check"].startswith("FAIL: first 4 steps: dW_hh "), ours["check"]
    assert "dW_ih" not in ours["check"] and float(ours["ms"]) > 0


def test_a_kernel_wrong_after_its_first_call_fails_the_check(monkeypatch, tmp_path):
    """The check against cuDNN runs before the timing, on the first call; a kernel right then
    and wrong on later calls (state left over from an earlier launch) fails it too: each pass
    is checked again after its timed calls."""
    import torch

    def wrap(inner, model):
        calls = []

        def forward(x, hx=None):
            y, state = inner(x, hx)
            calls.append(1)
            return (y if len(calls) == 1 else y * torch.tensor(2.0, dtype=y.dtype)), state

        return forward

    _wrap_fused_forward(monkeypatch, wrap)
    _, rows = _main(monkeypatch, tmp_path, "--passes", "fwd,fwd+bwd")
    ours = [r for r in rows if r["backend"] == "reference"]
    assert len(ours) == 2 and all(float(r["ms"]) > 0 for r in ours), ours
    for r in ours:
        assert r["check"].startswith("FAIL: after timing, y "), r["check"]


@pytest.mark.parametrize("backward, failed", [
    (lambda g, n: 2 * g, ("FAIL: dx 0.99 > 0.02, dh0 1 > 0.02, dW_hh 1 > 0.02, "
                          "dW_ih 0.97 > 0.02, db_hh 0.95 > 0.02, db_ih 0.88 > 0.02")),
    (lambda g, n: g * float("nan"), ("FAIL: dx not finite, dh0 not finite, dW_hh not finite, "
                                     "dW_ih not finite, db_hh not finite, db_ih not finite")),
])
def test_wrong_or_nan_gradients_fail_the_check(monkeypatch, tmp_path, backward, failed):
    """A backward that is fast but wrong (here: twice the gradient that comes in through y,
    or NaN) fails the check against cuDNN's gradients, though its y matches; the row is still
    timed. (The gradient that comes in through h_n is not doubled: errors just under 1.)"""
    _hook_backward(monkeypatch, backward)
    text, rows = _main(monkeypatch, tmp_path, "--passes", "fwd,fwd+bwd")
    ours = [r for r in rows if r["backend"] == "reference"]
    assert len(ours) == 2 and all(r["check"] == failed for r in ours), ours
    assert all(float(r["max_abs_dy"]) < 1e-5 and float(r["ms"]) > 0 for r in ours)
    assert float(ours[0]["max_rel_err"]) == pytest.approx(float("inf") if "finite" in failed
                                                          else 1.0, rel=0.02)
    assert f"| {failed} |" in text


def test_a_row_that_falls_back_while_timed_fails_its_check(monkeypatch, tmp_path):
    """The check's pass ran the kernels, a timed call fell back (a backend refusing after
    its first call): the row must not pass as ours."""
    from fused_rnn import backends

    real = backends.kernel_impl
    calls = []
    monkeypatch.setattr(backends, "_fallbacks", {})  # restored after the test

    def flaky(name, kind, **config):
        calls.append(name)
        if name == "reference" and len(calls) > 2:
            backends._fallbacks[("triton", "a test", "reference")] = len(calls)
        return real(name, kind, **config)

    monkeypatch.setattr(backends, "kernel_impl", flaky)
    _, rows = _main(monkeypatch, tmp_path, "--passes", "fwd,fwd+bwd")
    ours = [r for r in rows if r["backend"] == "reference"]
    assert ours and all(r["check"] == "FAIL: a timed call fell back to another backend"
                        for r in ours), ours


@pytest.mark.parametrize("where", ["batch row", "time step", "h_n"])
def test_one_wrong_row_or_step_fails_the_check(monkeypatch, where):
    """A wrong batch row or a missed time step among many moves the whole tensor's relative
    error by little (under bf16's 0.1 at S4's 256 rows); the slice check catches it, and
    cuDNN-like rounding noise passes."""
    import torch

    bench_gpu = _import("bench_gpu")
    g = torch.Generator().manual_seed(0)
    ref = {"y": torch.randn(256, 128, 16, generator=g),
           "h_n": torch.randn(1, 256, 16, generator=g)}
    noisy = {k: v * (1 + 0.01 * torch.randn(v.shape, generator=g)) for k, v in ref.items()}
    assert bench_gpu.compare(noisy, ref, 0.1)[2] == "ok"
    bad = {k: v.clone() for k, v in noisy.items()}
    if where == "batch row":
        bad["y"][7] = 0
    elif where == "time step":
        bad["y"][:, -1] = 0
    else:
        bad["h_n"][0, 3] = 0
    _, err, check = bench_gpu.compare(bad, ref, 0.1)
    assert err < 0.1, err  # the whole tensor passes
    name = "h_n" if where == "h_n" else "y"
    what = "batch row" if where != "time step" else "time step"
    assert check.startswith(f"FAIL: {name} ") and check.endswith(f"> 0.4 in a {what}"), check


def test_the_table_is_written_after_every_backend(monkeypatch, tmp_path, capsys):
    """A run killed in our backend's second configuration (a kernel that hangs until the GPU
    step's timeout) leaves the rows before it, ratios included, and cuDNN's row of that same
    configuration, in both files; a failure computing the ratios still writes the times."""
    bench_gpu = _import("bench_gpu")
    real = bench_gpu.measure

    def measure(args, timer, device, mode, shape, dtype_name, backend, refs):
        if shape == "D3" and backend == "reference":
            raise KeyboardInterrupt  # as the step's timeout would stop it
        return real(args, timer, device, mode, shape, dtype_name, backend, refs)

    monkeypatch.setattr(bench_gpu, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        _main(monkeypatch, tmp_path, "--shapes", "D1,D3")
    text, rows = _read(tmp_path)
    assert [(r["shape"], r["backend"], r["pass"]) for r in rows] == [
        (s, b, p) for s, b in (("D1", "torch.nn (cpu)"), ("D1", "reference"),
                               ("D3", "torch.nn (cpu)")) for p in ("fwd", "fwd+bwd")]
    assert float(rows[3]["x_cudnn_same_dtype"]) > 0 and "| GRU | D3 |" in text
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(bench_gpu, "measure", real)

    def broken(rows):
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(bench_gpu, "add_ratios", broken)
    text, rows = _main(monkeypatch, tmp_path, "--shapes", "D1,D3")
    assert len(rows) == 8 and all(float(r["ms"]) > 0 and r["x_cudnn_same_dtype"] == ""
                                  for r in rows)
    assert "ratios not computed: RuntimeError: CUDA error" in capsys.readouterr().out


def test_ratios_are_cudnn_over_ours_in_the_same_pass():
    """x_cudnn_* = cuDNN ms / ours (> 1: we are faster), against cuDNN's row of the same pass
    in the same dtype and in fp16; none where cuDNN has no such row."""
    bench_gpu = _import("bench_gpu")
    base = {"cell": "LSTM", "shape": "S1"}
    rows = [dict(base, backend="cudnn", dtype="fp32", ms=2.0, **{"pass": "fwd"}),
            dict(base, backend="cudnn", dtype="fp32", ms=6.0, **{"pass": "fwd+bwd"}),
            dict(base, backend="cudnn", dtype="fp16", ms=1.0, **{"pass": "fwd"}),
            dict(base, backend="cudnn", dtype="fp16", ms=4.0, note="x", **{"pass": "fwd+bwd"}),
            dict(base, backend="cuda", dtype="fp32", ms=1.0, **{"pass": "fwd"}),
            dict(base, backend="cuda", dtype="fp32", ms=12.0, **{"pass": "fwd+bwd"}),
            dict(base, backend="cuda", dtype="bf16", ms=0.5, **{"pass": "fwd"})]
    bench_gpu.add_ratios(rows)
    got = [(r["x_cudnn_same_dtype"], r["x_cudnn_fp16"]) for r in rows[4:]]
    assert got == [(2.0, 1.0), (0.5, 4.0 / 12.0), (None, 2.0)], got
    # fp32-strict (TF32 off on both sides) against cuDNN's fp32-strict row, not its fp32 one
    strict = [dict(base, backend="cudnn", dtype="fp32", ms=3.0, **{"pass": "fwd"}),
              dict(base, backend="cudnn", dtype="fp32-strict", ms=8.0, **{"pass": "fwd"}),
              dict(base, backend="cuda", dtype="fp32-strict", ms=2.0, **{"pass": "fwd"})]
    bench_gpu.add_ratios(strict)
    assert strict[2]["x_cudnn_same_dtype"] == 4.0


def test_a_gpu_run_with_rows_not_measured_or_not_checked_does_not_pass():
    """On a GPU, main exits 1 for rows that started and have no time (a build or timing that
    raised, a probe that fell back) and for rows of ours timed but not checked, as for a failed
    check; rows skipped for time, and a dry run on the CPU, are not judged."""
    bench_gpu = _import("bench_gpu")
    base = {"cell": "GRU", "shape": "S2", "dtype": "bf16", "pass": "fwd"}
    passed = [dict(base, backend="cudnn", ms=2.0, check="reference"),
              dict(base, backend="cuda", ms=1.0, check="ok"),
              dict(base, backend="triton", note="skipped: time", _skipped=True)]
    assert bench_gpu.not_passed(passed, "cuda") == []
    crashed = dict(base, backend="triton", note="RuntimeError: CUDA error: illegal address")
    fell_back = dict(base, backend="cuda", note="cuda: falling back to triton: H too large")
    unchecked = dict(base, backend="triton", ms=1.5, check="no cuDNN reference")
    cudnn_failed = dict(base, backend="cudnn", note="RuntimeError: cuDNN error")
    for row in (crashed, fell_back, unchecked, cudnn_failed):
        got = bench_gpu.not_passed([*passed, row], "cuda")
        assert len(got) == 1 and got[0].startswith(f"{row['backend']} GRU S2 bf16 fwd ("), got
        assert bench_gpu.not_passed([*passed, row], "cpu") == []


def test_fp32_strict_runs_with_tf32_off_and_the_strict_bound(monkeypatch):
    """fp32-strict rows run with cudnn.allow_tf32 off (restored afterwards) and are checked
    within TOLERANCE["fp32-strict"]; fp32 rows with TF32 on get the looser fp32 bound."""
    import torch

    bench_gpu = _import("bench_gpu")
    seen = []
    monkeypatch.setattr(bench_gpu, "_measure", lambda *a: seen.append(
        (a[5], torch.backends.cudnn.allow_tf32, bench_gpu.tolerance(a[5]))) or [])
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    for dtype_name in ("fp32-strict", "fp32", "bf16"):
        bench_gpu.measure(None, None, "cpu", "LSTM", "S1", dtype_name, "cuda", {})
    assert seen == [("fp32-strict", False, 1e-3), ("fp32", True, 2e-2), ("bf16", True, 1e-1)]
    assert torch.backends.cudnn.allow_tf32 is True
    torch.backends.cudnn.allow_tf32 = False  # TF32 turned off for the whole run: strict fp32
    assert bench_gpu.tolerance("fp32") == 1e-3 and bench_gpu.tolerance("fp16") == 2e-2


def test_gpu_header_names_capability_tf32_and_a_dirty_commit(monkeypatch):
    """On a GPU the header records the compute capability (auto_rules.py keys its rules on it)
    and TF32 as set; without $FRNN_COMMIT, git's HEAD, marked when the tree has changes."""
    import subprocess as sp

    import torch

    bench_gpu = _import("bench_gpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.delenv("FRNN_COMMIT", raising=False)
    answers = {"rev-parse": "0123abc\n", "status": " M fused_rnn/backends.py\n"}
    monkeypatch.setattr(bench_gpu.subprocess, "run", lambda cmd, **kw: sp.CompletedProcess(
        cmd, 0, stdout=answers[cmd[1]], stderr=""))
    env = bench_gpu.environment("cuda", None)
    assert env["gpu"] == "NVIDIA H200" and env["capability"] == "9.0"
    assert env["tf32"] == "cudnn.allow_tf32=False"
    assert env["commit"] == "0123abc (+ uncommitted changes)"
    answers["status"] = ""
    assert bench_gpu.commit() == "0123abc"


def test_the_shapes_are_those_of_the_anchors():
    """S1-S6 (B, T, H) as ANCHORS.md names them: the rules' ranges and the notes' plans are
    read off these."""
    bench_gpu = _import("bench_gpu")
    assert bench_gpu.SHAPES == {"S1": (16, 1024, 768), "S2": (64, 100, 512),
                                "S3": (64, 128, 1024), "S4": (256, 128, 1024),
                                "S5": (8, 256, 256), "S6": (128, 64, 256)}


def test_compare_checks_dx_rows_shapes_and_vanishing_slices():
    """compare(): a wrong batch row of dx fails as y's would; a tensor of another shape than
    cuDNN's fails; max abs Δy is y's; a row whose reference is small (but above the floor) is
    measured against itself, not against the average row; the whole tensor has its own bound."""
    import torch

    bench_gpu = _import("bench_gpu")
    g = torch.Generator().manual_seed(0)
    ref = {"y": torch.randn(64, 8, 16, generator=g), "dx": torch.randn(64, 8, 16, generator=g)}
    bad = {k: v.clone() for k, v in ref.items()}
    bad["dx"][5] = 0
    bad["y"][0, 0, 0] += 0.25
    dy, err, check = bench_gpu.compare(bad, ref, 0.2)
    assert check == "FAIL: dx 1 > 0.5 in a batch row", check
    assert dy == pytest.approx(0.25) and err < 0.2
    assert bench_gpu.compare({"y": ref["y"][:, :4]}, ref, 0.2)[2] == \
        "FAIL: cuDNN's y missing or not finite"
    small = {"y": ref["y"].clone()}
    small["y"][3] *= 0.1  # a row at a tenth of the others' norm
    off = {"y": small["y"].clone()}
    off["y"][3] *= 1.6  # 60% off in that row: 6% of an average row
    assert bench_gpu.compare(off, small, 0.1)[2] == "FAIL: y 0.6 > 0.4 in a batch row"
    # evenly off by 1.5x the bound: every slice passes its looser one, the whole tensor not
    assert bench_gpu.compare({"y": ref["y"] * 1.15}, {"y": ref["y"]}, 0.1)[2] == \
        "FAIL: y 0.15 > 0.1"


def test_a_probe_that_falls_back_is_never_timed_as_ours(monkeypatch, tmp_path):
    """A backend that hands the check's call to another (a fallback warning, once a process
    per reason) is not timed under its name, in every row, not only the first to warn."""
    from fused_rnn import backends

    bench_gpu = _import("bench_gpu")
    real = bench_gpu.build
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_fallbacks", {})

    def build(mode, B, T, H, dtype, device, backend):
        model, x, cot = real(mode, B, T, H, dtype, device, backend)
        if backend is not None:
            inner = model.forward

            def forward(x, hx=None):
                backends._warn_once("reference", "a test's reason", "torch")
                return inner(x, hx)

            model.forward = forward
        return model, x, cot

    monkeypatch.setattr(bench_gpu, "build", build)
    _, rows = _main(monkeypatch, tmp_path, "--shapes", "D1,D3")
    ours = [r for r in rows if r["backend"] == "reference"]
    assert len(ours) == 4 and all(r["ms"] == "" and "falling back to 'torch'" in r["note"]
                                  for r in ours), ours


def test_slow_rows_are_timed_at_least_five_times(monkeypatch):
    """do_bench repeats for rep ms by its own estimate; a 48 ms row (S1 fp32 cuDNN) would get
    3 runs in 150 ms. The timer raises rep so that it gets MIN_REPS (here against a stand-in
    for do_bench that counts as it does, its L2 flush included, and for CUDA events)."""
    import torch
    import triton.testing

    bench_gpu = _import("bench_gpu")

    per_call = [48.0]  # ms of fn

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def elapsed_time(self, end):
            return per_call[0]

    def do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "all"
        estimate = per_call[0] + 0.1  # the L2 flush is inside do_bench's estimate
        n = max(1, int(rep / estimate))
        # one slow outlier and one fast one: the row's time is the median, not an extreme
        return [3 * per_call[0], *[per_call[0]] * (n - 2), per_call[0] / 3][:n]

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    ms, reps = bench_gpu.Timer("cuda", 30.0, 150.0)(lambda: None)
    assert ms == 48.0 and bench_gpu.MIN_REPS <= reps <= bench_gpu.MIN_REPS + 2
    per_call[0] = 0.4
    assert bench_gpu.Timer("cuda", 30.0, 150.0)(lambda: None)[1] == 300  # rep as asked
    # a one-step row's shorter measuring time, never longer than the timer's own
    assert bench_gpu.Timer("cuda", 30.0, 150.0)(lambda: None, rep_ms=50.0)[1] == 100
    assert bench_gpu.Timer("cuda", 30.0, 150.0)(lambda: None, rep_ms=500.0)[1] == 300
    assert bench_gpu.Timer("cuda", 30.0, 20.0)(lambda: None, rep_ms=50.0)[1] == 40


def test_inner_budget_leaves_time_to_write_the_report():
    """gpu_common.sh frnn_inner_budget WANT MARGIN: the --time-budget a script gets inside its
    step's timeout: the timeout less MARGIN, half of a short one, 0 when the step is skipped."""
    def budget(left, want, margin):
        cmd = (f'source "{ROOT}/benchmarks/gpu_common.sh" && '
               f'FRNN_DEADLINE=$(( $(date +%s) + {left} )) && frnn_inner_budget {want} {margin}')
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True)
        return int(r.stdout)

    assert budget(1000, 210, 70) == 140  # the step's own limit, less the margin
    assert budget(105, 210, 70) in (49, 50)  # clamped to the deadline less 5 s: half of it
    assert budget(10, 210, 70) == 0  # fewer than 20 s left: the step is skipped


def test_sanitizer_that_refuses_the_device_is_named_and_skipped(tmp_path):
    """Under gVisor compute-sanitizer answers "Device not supported" (the device docs): the
    script says so once and skips the other tools instead of failing each in turn."""
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "========= Error: Device not supported"\nexit 1\n')
    fake.chmod(0o755)
    logs = tmp_path / "logs"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}  # the script's start stamp (mktemp)
    # the sanitizer parts alone: the rest of "extra" (phases, microbench) would build and
    # start the microbench here, half a minute that checks nothing of this
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check_cuda.sh"), "--part",
                        "memcheck,racecheck,synccheck", str(logs)], capture_output=True,
                       text=True, env=env, timeout=300, check=False)
    assert r.returncode != 0
    assert "compute-sanitizer cannot use this machine's GPU" in r.stdout
    assert (logs / "cuda_sanitizer_memcheck.log").is_file()
    assert not (logs / "cuda_sanitizer_racecheck.log").exists()
    assert not (logs / "cuda_sanitizer_synccheck.log").exists()


PLAN = "plan fwd b128 g1 p1 k768{}, bwd b128 g1 p8 k384"  # a note as _plan_note writes it


def _cuda_table_with(tmp_path, cases, rows_for, **table):
    """A GPU table (_gpu_table's, ``table`` its options) whose cuda rows (3x cuDNN) carry a
    plan note without tagged launches, as the persistent kernel's do; cases {(cell, dtype):
    {shape: a speedup, or (that, a check), or None}}: each cuda row of a shape with a value is
    replaced by the rows rows_for(row, speedup, check) returns."""
    cuda = {key: dict.fromkeys(by_shape, 3.0) for key, by_shape in cases.items()}
    path = _gpu_table(tmp_path, cuda, **table)

    def edit(rows):
        out = []
        for r in rows:
            v = None
            if r["backend"] == "cuda":
                r["note"] = PLAN.format("")
                v = cases[(r["cell"], r["dtype"])][r["shape"]]
            if v is None:
                out.append(r)
                continue
            speedup, check = v if isinstance(v, tuple) else (v, "ok")
            out += rows_for(r, speedup, check)
        return out

    _rewrite_table(path, edit)
    return path


def _path_table(tmp_path, cases, **table):
    """A GPU table (_cuda_table_with's) with cuda-step rows: cases {(cell, dtype): {shape: how
    many times faster than the persistent kernel the per-step path is (fwd and fwd+bwd), or
    (that, the step row's check), None = no cuda-step row}}."""
    return _cuda_table_with(tmp_path, cases, lambda r, speedup, check: [
        r, dict(r, backend="cuda-step", ms=float(r["ms"]) / speedup, check=check,
                note="path step")], **table)


def test_path_rules_from_a_gpu_table(tmp_path, capsys):
    """auto_rules.py --paths: a PathRule per (cell, dtype) spanning the batch and hidden sizes
    where the per-step path beat the persistent kernel by the margin, forward and fwd+bwd,
    checked; none where a shape inside that span did not; the printed code builds PathRules
    that send exactly those sizes to the per-step path."""
    import torch

    auto_rules = _import("auto_rules")
    from fused_rnn.ops.cuda.ops import PathRule

    slow = dict(S1=0.5, S2=0.8, S3=1.3, S4=3.0, S5=0.4, S6=0.9)  # wins at S3, S4 (H 1024)
    path = _path_table(tmp_path, {
        ("LSTM", "bf16"): slow,
        ("LSTM", "fp32"): {**slow, "S3": 1.02},  # S4 alone: B 256, H 1024
        ("GRU", "bf16"): {**slow, "S6": 1.2},  # S3, S4, S6 span S2 (B 64, H 512): it lost
        ("GRU", "fp16"): {**slow, "S4": (3.0, "FAIL: dx 0.5 > 0.02")},  # S3 alone
        ("GRU", "fp32"): {**slow, "S2": 1.2, "S3": None},  # S3 lies between S2 and S4, untimed
        ("LSTM", "fp16"): dict.fromkeys(slow, 0.5),
    })
    assert auto_rules.main([str(path), "--paths"]) == 0
    out = capsys.readouterr().out
    ns = {"PathRule": PathRule, "torch": torch}
    exec(out, ns)  # noqa: S102 - the printed rules are valid code that builds PathRules
    rules = {(next(iter(r.modes)), next(iter(r.dtypes))): r for r in ns["PATH_RULES"]}
    assert set(rules) == {("LSTM", torch.bfloat16), ("LSTM", torch.float32),
                          ("GRU", torch.float16)}
    bf16, fp32, gru = (rules[k] for k in (("LSTM", torch.bfloat16), ("LSTM", torch.float32),
                                          ("GRU", torch.float16)))
    assert (bf16.batch, bf16.hidden, bf16.tf32) == ((64, 256), (1024, 1024), None)
    assert bf16.steps == (128, 128)  # S3 and S4's chunks: no rule for cells (T = 1)
    assert (fp32.batch, fp32.hidden, fp32.tf32) == ((256, 256), (1024, 1024), True)
    assert (gru.batch, gru.hidden) == ((64, 64), (1024, 1024))
    assert bf16.capability == (9, 0)
    assert bf16.evidence == "benchmarks/results/2026-12-01-NVIDIA-H200.md"
    assert "# fwd+bwd 1.30-3.00x the persistent kernel in bf16 on S3, S4 (fwd too)" in out
    assert bf16.matches("LSTM", torch.bfloat16, 128, 1024, 128, (9, 0), True)
    assert not bf16.matches("LSTM", torch.bfloat16, 128, 768, 128, (9, 0), True)
    assert not bf16.matches("LSTM", torch.bfloat16, 128, 1024, 1, (9, 0), True)
    assert not bf16.matches("LSTM", torch.bfloat16, 128, 1024, 128, (8, 0), True)
    assert not fp32.matches("LSTM", torch.float32, 256, 1024, 128, (9, 0), False)  # TF32 off
    assert ("# GRU bf16: no rule; the per-step path won on S3, S4, S6, but not on S2 (fwd "
            "0.80x the persistent kernel (< 1.05); fwd+bwd 0.80x the persistent kernel "
            "(< 1.05))") in out
    assert ("GRU fp32: no rule; the per-step path won on S2, S4, but not on S3 (fwd no cuda-step "
            "row; fwd+bwd no cuda-step row)") in out
    assert "# LSTM fp16: no rule; the per-step path won on no shape" in out


def _copy_table(tmp_path, cases, ruled=()):
    """A GPU table (_cuda_table_with's) with cuda-tagged rows: cases {(cell, dtype): {shape:
    how many times faster than the pipelined copy the tagged exchange is (fwd and fwd+bwd), or
    (that, the tagged row's check), None = no cuda-tagged row}}; the tagged rows' notes mark
    the forward launch ' tg'. At the shapes in ``ruled`` the table is as bench_gpu.py writes it
    once a rule sends plain cuda to the tagged exchange there: the cuda rows are the tagged
    ones and cuda-pipelined rows time the pipelined copy."""
    def rows_for(r, speedup, check):
        tagged = dict(r, backend="cuda-tagged", ms=float(r["ms"]) / speedup, check=check,
                      note=PLAN.format(" tg"))
        if r["shape"] in ruled:
            return [dict(tagged, backend="cuda"), dict(r, backend="cuda-pipelined")]
        return [r, tagged]

    return _cuda_table_with(tmp_path, cases, rows_for)


def _stage_copy_rules(auto_rules, path, capsys):
    """(rules, printed output) of auto_rules.py --stage-copy on the table at path."""
    import torch

    from fused_rnn.ops.cuda.ops import StageCopyRule

    assert auto_rules.main([str(path), "--stage-copy"]) == 0
    out = capsys.readouterr().out
    ns = {"StageCopyRule": StageCopyRule, "torch": torch}
    exec(out, ns)  # noqa: S102 - the printed rules are valid code that builds StageCopyRules
    return ns["STAGE_COPY_RULES"], out


def test_stage_copy_rules_from_a_gpu_table(tmp_path, capsys):
    """auto_rules.py --stage-copy: a StageCopyRule per 16-bit (cell, dtype) spanning the sizes
    where the tagged exchange beat the pipelined copy by the margin, forward and fwd+bwd,
    checked; none where a shape inside that span did not; none for fp32 (the tagged exchange
    holds 16-bit values). The same rules come from the table a run writes once they are in:
    cuda rows that ran the tagged exchange against cuda-pipelined rows."""
    import torch

    auto_rules = _import("auto_rules")
    lose = dict(S1=0.9, S2=0.9, S3=0.95, S4=0.7, S5=1.3, S6=1.2)  # wins at S5, S6 (H 256)
    cases = {
        ("LSTM", "bf16"): lose,
        ("GRU", "bf16"): {**lose, "S2": 1.25},  # S2, S5, S6: H 256-512, B 8-128, T 64-256
        ("GRU", "fp16"): {**lose, "S6": (1.3, "FAIL: dx 0.5 > 0.02")},  # S5 alone
        ("LSTM", "fp16"): dict.fromkeys(lose, 0.9),
        ("LSTM", "fp32"): dict.fromkeys(lose, 2.0),  # not the tagged exchange's: no rule
    }
    rules, out = _stage_copy_rules(auto_rules, _copy_table(tmp_path, cases), capsys)
    got = {(next(iter(r.modes)), next(iter(r.dtypes))): (r.batch, r.hidden, r.steps)
           for r in rules}
    assert got == {("LSTM", torch.bfloat16): ((8, 128), (256, 256), (64, 256)),
                   ("GRU", torch.bfloat16): ((8, 128), (256, 512), (64, 256)),
                   ("GRU", torch.float16): ((8, 8), (256, 256), (256, 256))}, out
    lstm = rules[[next(iter(r.modes)) for r in rules].index("LSTM")]
    assert lstm.capability == (9, 0) and lstm.tf32 is None
    assert lstm.evidence == "benchmarks/results/2026-12-01-NVIDIA-H200.md"
    assert "# fwd+bwd 1.20-1.30x the pipelined copy in bf16 on S5, S6 (fwd too)" in out
    assert "# LSTM fp16: no rule; the tagged exchange won on no shape (S1: fwd 0.90x the " \
           "pipelined copy (< 1.05)" in out
    assert "fp32" not in out.split("STAGE_COPY_RULES")[1], out
    # the same table once those rules are in: S5 and S6's cuda rows ran the tagged exchange,
    # their cuda-pipelined rows the pipelined copy
    again, _ = _stage_copy_rules(auto_rules, _copy_table(tmp_path, cases, ruled=("S5", "S6")),
                                 capsys)
    assert [(r.modes, r.dtypes, r.batch, r.hidden, r.steps) for r in again] == [
        (r.modes, r.dtypes, r.batch, r.hidden, r.steps) for r in rules]


@pytest.mark.parametrize("edit,why", [
    # the tagged row's launches did not take the tagged exchange (a fallback everywhere)
    (lambda r: r["backend"] == "cuda-tagged" and r["shape"] == "S3" and
     r.update(note=PLAN.format("")), "S3 (fwd the cuda-tagged row shows no tagged launch"),
    # the row it is set against ran the tagged exchange too
    (lambda r: r["backend"] == "cuda" and r["shape"] == "S3" and r["pass"] == "fwd+bwd" and
     r.update(note=PLAN.format(" tg")), "S3 (fwd+bwd the cuda row ran the tagged exchange too"),
    # plain cuda ran the per-step path there: no persistent launch to compare
    (lambda r: r["backend"] == "cuda" and r["shape"] == "S3" and r.update(note="path step"),
     "S3 (fwd the cuda row shows no persistent launch plan (path step)"),
    # timed too few times, or not checked
    (lambda r: r["backend"] == "cuda-tagged" and r["shape"] == "S3" and r["pass"] == "fwd" and
     r.update(reps="4"), "S3 (fwd cuda-tagged timed 4 times (< 5))"),
    (lambda r: r["backend"] == "cuda" and r["shape"] == "S3" and r["pass"] == "fwd" and
     r.update(check="FAIL: y 0.3 > 0.02"), "S3 (fwd cuda check FAIL: y 0.3 > 0.02)"),
])
def test_a_stage_copy_rule_needs_tagged_launches_against_untagged_ones(tmp_path, capsys, edit,
                                                                       why):
    """A shape counts for --stage-copy only where the tagged row's plan note shows a tagged
    launch and the row it is set against shows a persistent plan with none, both checked ok
    and timed at least MIN_REPS times; a shape inside the span of the wins that does not count
    stops the rule."""
    auto_rules = _import("auto_rules")
    path = _copy_table(tmp_path, {("LSTM", "bf16"): dict(S1=1.3, S2=0.9, S3=1.3, S4=1.2, S5=0.9,
                                                         S6=0.9)})
    rules, _ = _stage_copy_rules(auto_rules, path, capsys)
    # S1, S3, S4; S3 (B 64, T 128, H 1024) lies inside the span of S1 and S4
    assert [(r.batch, r.hidden, r.steps) for r in rules] == [((16, 256), (768, 1024), (128, 1024))]
    _edit_table(path, edit)
    rules, out = _stage_copy_rules(auto_rules, path, capsys)
    assert not rules, out
    assert "LSTM bf16: no rule; the tagged exchange won on " in out and why in out, out


def test_stage_copy_rules_refuse_what_path_rules_refuse(tmp_path, capsys):
    """--stage-copy refuses the tables --paths does (GPU tests not passed, a FUSED_RNN_CUDA_*
    override for every row) and is for the CUDA backend only, never with --paths."""
    auto_rules = _import("auto_rules")
    wins = dict(S1=0.9, S2=0.9, S3=0.9, S4=0.9, S5=1.3, S6=1.3)
    for table, refused in ((dict(gpu_tests="1 failed, 519 passed in 80.0s"), "did not pass"),
                           (dict(overrides="FUSED_RNN_CUDA_STAGE_COPY=pipelined"),
                            "FUSED_RNN_CUDA_STAGE_COPY=pipelined")):
        path = _gpu_table(tmp_path, {("LSTM", "bf16"): dict.fromkeys(wins, 3.0)}, **table)
        assert auto_rules.main([str(path), "--stage-copy"]) == 2
        out = capsys.readouterr().out
        assert "StageCopyRule(" not in out and refused in out, out
    for extra in (["--backend", "triton"], ["--paths"]):
        with pytest.raises(SystemExit):
            auto_rules.main([str(path), "--stage-copy", *extra])


@pytest.mark.parametrize("edit,span", [
    # the per-step path wins S4's fwd+bwd 3x but loses its forward: S4 is no win
    (lambda r: r["backend"] == "cuda-step" and r["shape"] == "S4" and r["pass"] == "fwd" and
     r.update(ms=str(float(r["ms"]) * 3.0 / 0.8)), (64, 64)),
    # the persistent row it is set against failed its check, or was never timed
    (lambda r: r["backend"] == "cuda" and r["shape"] == "S4" and r["pass"] == "fwd" and
     r.update(check="FAIL: dx 0.5 > 0.02"), (64, 64)),
    (lambda r: r["backend"] == "cuda" and r["shape"] == "S4" and r["pass"] == "fwd+bwd" and
     r.update(ms=""), (64, 64)),
    # either row timed fewer than MIN_REPS times
    (lambda r: r["backend"] == "cuda-step" and r["shape"] == "S3" and r["pass"] == "fwd" and
     r.update(reps="4"), (256, 256)),
    (lambda r: r["backend"] == "cuda" and r["shape"] == "S3" and r["pass"] == "fwd+bwd" and
     r.update(reps="4"), (256, 256)),
    # S3, inside the span of wins at S2 (made one) and S4, has no row of either path: no rule
    (lambda r: (r["backend"] in ("cuda", "cuda-step") and r["shape"] == "S3" and
                r.update(backend="gone-" + r["backend"])) or
     (r["backend"] == "cuda-step" and r["shape"] == "S2" and
      r.update(ms=str(float(r["ms"]) / 1.5))), None),
])
def test_a_path_rule_needs_both_passes_and_both_rows_checked(tmp_path, capsys, edit, span):
    """A shape counts for --paths only where the per-step row and the persistent row it is set
    against were both checked ok, timed at least MIN_REPS times, and the per-step path won
    forward and fwd+bwd; a shape inside the span with no rows stops the rule."""
    import torch

    auto_rules = _import("auto_rules")
    from fused_rnn.ops.cuda.ops import PathRule

    path = _path_table(tmp_path, {("LSTM", "bf16"): dict(S1=0.5, S2=0.8, S3=1.3, S4=3.0,
                                                         S5=0.4, S6=0.9)})
    assert auto_rules.main([str(path), "--paths"]) == 0
    ns = {"PathRule": PathRule, "torch": torch}
    exec(capsys.readouterr().out, ns)  # noqa: S102
    assert [r.batch for r in ns["PATH_RULES"]] == [(64, 256)]  # S3 and S4, unedited
    _edit_table(path, edit)
    assert auto_rules.main([str(path), "--paths"]) == 0
    out = capsys.readouterr().out
    ns = {"PathRule": PathRule, "torch": torch}
    exec(out, ns)  # noqa: S102
    if span is None:
        assert ns["PATH_RULES"] == () or not ns["PATH_RULES"], out
        assert "but not on S3 (fwd no cuda-step row; fwd+bwd no cuda-step row)" in out, out
    else:
        assert [(r.batch, r.hidden) for r in ns["PATH_RULES"]] == [(span, (1024, 1024))], out


def test_one_step_shapes_give_path_rules_of_their_own(tmp_path, capsys):
    """The one-step shapes (G1-G3: a cell's call) are a group of their own for --paths: their
    rule spans only them (steps (1, 1)), and neither group's losses stop the other's rule."""
    import torch

    auto_rules = _import("auto_rules")
    from fused_rnn.ops.cuda.ops import PathRule

    chunks = dict(S1=0.5, S2=0.8, S3=1.3, S4=3.0, S5=0.4, S6=0.9)  # a rule at S3, S4
    path = _path_table(tmp_path, {
        ("LSTM", "bf16"): {**chunks, "G1": 4.0, "G2": 2.0, "G3": 1.5},
        ("GRU", "bf16"): {**chunks, "S6": 1.2, "G1": 2.0, "G2": 1.5, "G3": 0.7},
        ("GRU", "fp16"): {**chunks, "G1": 0.5, "G2": 0.6, "G3": (2.0, "FAIL: y 0.3 > 0.02")},
        ("LSTM", "fp32"): chunks,  # a table without one-step rows: no word on them
    })
    assert auto_rules.main([str(path), "--paths"]) == 0
    out = capsys.readouterr().out
    ns = {"PathRule": PathRule, "torch": torch}
    exec(out, ns)  # noqa: S102
    rules = [(next(iter(r.modes)), next(iter(r.dtypes)), r.steps, r.batch, r.hidden)
             for r in ns["PATH_RULES"]]
    assert rules == [("GRU", torch.bfloat16, (1, 1), (1, 1), (256, 1024)),
                     ("GRU", torch.float16, (128, 128), (64, 256), (1024, 1024)),
                     ("LSTM", torch.bfloat16, (128, 128), (64, 256), (1024, 1024)),
                     ("LSTM", torch.bfloat16, (1, 1), (1, 64), (256, 1024)),
                     ("LSTM", torch.float32, (128, 128), (64, 256), (1024, 1024))], out
    lstm_cells = ns["PATH_RULES"][3]
    assert lstm_cells.matches("LSTM", torch.bfloat16, 1, 512, 1, (9, 0), True)  # a cell
    assert not lstm_cells.matches("LSTM", torch.bfloat16, 1, 512, 2, (9, 0), True)
    assert "# fwd+bwd 1.50-4.00x the persistent kernel in bf16 on G1, G2, G3 (fwd too)" in out
    assert ("# GRU bf16: no rule; the per-step path won on S3, S4, S6, but not on S2 (fwd "
            "0.80x the persistent kernel") in out  # the chunks' rule stops; the cells' stands
    assert ("# GRU fp16 one step: no rule; the per-step path won on no shape (G1: fwd 0.50x the "
            "persistent kernel (< 1.05); fwd+bwd 0.50x the persistent kernel (< 1.05); G2: ") in out
    assert "G3: fwd cuda-step check FAIL: y 0.3 > 0.02; fwd+bwd cuda-step check FAIL" in out
    assert "LSTM fp32 one step" not in out


def test_path_rules_need_the_persistent_kernels_rows(tmp_path, capsys):
    """The per-step rows are set against the persistent kernel's: cuda-persistent rows where
    the table has them (its cuda rows may have run either path), else cuda rows with a launch
    plan in their note; a table whose tests failed, or whose run set FUSED_RNN_CUDA_PATH for
    every row, gives no path rules at all, and --paths is for the CUDA backend only."""
    auto_rules = _import("auto_rules")
    wins = dict(S1=0.5, S2=1.2, S3=1.3, S4=3.0, S5=0.4, S6=0.9)
    path = _path_table(tmp_path, {("LSTM", "bf16"): wins})
    _edit_table(path, lambda r: r.update(note="path step") if (
        r["backend"], r["shape"]) == ("cuda", "S3") else None)
    assert auto_rules.main([str(path), "--paths"]) == 0
    out = capsys.readouterr().out
    assert "PathRule(" not in out
    assert "but not on S3 (fwd the cuda row shows no persistent launch plan (path step)" in out

    # As bench_gpu.py writes a table once a rule sends S3's plain cuda rows to the per-step
    # path: a cuda-persistent row there (1.3x the step path's time), and only there (moot
    # elsewhere); the other shapes' persistent rows are still plain cuda's.
    def persistent_rows(r):
        if (r["backend"], r["shape"]) == ("cuda-p1", "S3"):
            r.update(backend="cuda-persistent", ms=str(1 / 3))
    _edit_table(path, persistent_rows)
    assert auto_rules.main([str(path), "--paths"]) == 0
    out = capsys.readouterr().out
    assert "batch=(64, 256), hidden=(512, 1024), steps=(100, 128)," in out, out
    assert "1.20-3.00x the persistent kernel in bf16 on S2, S3, S4" in out, out
    for table, refused in ((dict(gpu_tests="3 failed, 517 passed in 80.0s"), "did not pass"),
                           (dict(overrides="FUSED_RNN_CUDA_PATH=step"),
                            "FUSED_RNN_CUDA_PATH=step")):
        path = _path_table(tmp_path, {("LSTM", "bf16"): wins}, **table)
        assert auto_rules.main([str(path), "--paths"]) == 2
        out = capsys.readouterr().out
        assert "PathRule(" not in out and refused in out, out
    with pytest.raises(SystemExit):
        auto_rules.main([str(path), "--paths", "--backend", "triton"])
