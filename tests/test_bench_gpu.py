"""benchmarks/bench_gpu.py --dry-run: the GPU benchmark script itself, on the CPU (Triton
interpreter, aten's RNN standing in for cuDNN). Checks the rows, variants and report files, not
speed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *extra):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--dry-run", "--modes", "GRU",
         "--dtypes", "fp32", "--passes", "fwd", "--out-dir", str(tmp_path), *extra],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = sorted(tmp_path.glob("*-cpu-dryrun.md"))
    rows = list(csv.DictReader(open(sorted(tmp_path.glob("*-cpu-dryrun.csv"))[0])))
    return md[0].read_text(), rows


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
        # no GPU here: the CUDA rows say why instead of timing anything
        assert by[shape, "cuda"]["ms"] == "" and "unavailable" in by[shape, "cuda"]["note"]
    assert "unavailable" in by["D3", "cuda-g1"]["note"]
    assert "**Dry run**" in text and "| GRU | D3 |" in text


def test_time_budget_skips_rows_but_writes_the_report(tmp_path):
    text, rows = _run(tmp_path, "--shapes", "D3", "--backends", "cuda,cuda-g1",
                      "--time-budget", "0")
    assert rows == []
    assert "Skipped after the time budget (0 s): GRU-D3-fp32, GRU-D3-fp32 (cuda-g1)" in text


def test_rounds_put_cudnn_and_the_first_backend_first():
    """Under a time budget the first backend named (cuda in gpu_check.sh) gets its whole table
    against cuDNN before any other backend or variant starts."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    assert bench_gpu.rounds(["cuda", "triton", "cuda-p1", "cuda-g1"]) == [
        [None, "cuda"], ["triton"], ["cuda-p1", "cuda-g1"]]
    assert bench_gpu.rounds(["triton"]) == [[None, "triton"]]
    assert bench_gpu.rounds(["cuda-g1", "cuda"]) == [[None, "cuda"], ["cuda-g1"]]


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
    env = {**os.environ, "OUT": str(out)}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --dry-run
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", *args],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    return r.returncode, r.stdout + r.stderr


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
    # and so do profile_cuda.py's phase rows, per direction
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profile_cuda
    finally:
        sys.path.pop(0)
    row = profile_cuda._row("LSTM", "S4", "fp32", {"direction": "backward", "blocks": 128}, plans)
    assert row[profile_cuda.COLUMNS.index("plan")] == "g1 p8 k304"


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
        r = subprocess.run(["bash", "-c", f'source "{ROOT}/benchmarks/gpu_common.sh" && '
                            f'frnn_parts_failed "{tmp_path / name}"'], check=False)
        got[name] = r.returncode == 0
    missing = subprocess.run(["bash", "-c", f'source "{ROOT}/benchmarks/gpu_common.sh" && '
                              f'frnn_parts_failed "{tmp_path / "none"}"'], check=False)
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


def test_auto_rules_from_a_gpu_table(tmp_path, capsys):
    """benchmarks/auto_rules.py: a rule per (cell, dtype) only where the backend beat cuDNN by
    the margin on every shape of the table, spanning those shapes; the printed code builds
    valid AutoRules; everything else is listed with the rows that stopped it."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import auto_rules
        import bench_gpu
    finally:
        sys.path.pop(0)
    from fused_rnn.backends import AutoRule

    ratios = {  # (cell, dtype): {shape: cuda's ratio to cuDNN, None = no cuda row}
        ("LSTM", "bf16"): {s: 3.0 for s in bench_gpu.SHAPES},
        ("LSTM", "fp32"): {**{s: 2.0 for s in bench_gpu.SHAPES}, "S4": 0.9},
        ("GRU", "fp16"): {**{s: 5.0 for s in bench_gpu.SHAPES}, "S6": None},
        ("GRU", "bf16"): {**{s: 4.0 for s in bench_gpu.SHAPES}, "S2": 1.02},
    }
    rows = []
    for (cell, dtype), by_shape in ratios.items():
        for shape, (B, T, H) in bench_gpu.SHAPES.items():
            base = dict(gpu="NVIDIA H200", cell=cell, shape=shape, BxTxH=f"{B}x{T}x{H}",
                        dtype=dtype, ms="1.0")
            for p in ("fwd", "fwd+bwd"):
                rows.append(dict(base, backend="cudnn", **{"pass": p}, x_cudnn_same_dtype="1"))
                if by_shape[shape] is not None:
                    rows.append(dict(base, backend="cuda", **{"pass": p},
                                     x_cudnn_same_dtype=str(by_shape[shape])))
                # a variant that wins everywhere must not count
                rows.append(dict(base, backend="cuda-p1", **{"pass": p}, x_cudnn_same_dtype="9"))
    path = tmp_path / "2026-12-01-NVIDIA-H200.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["note"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    assert auto_rules.main([str(path)]) == 0
    out = capsys.readouterr().out
    ns = {"AutoRule": AutoRule, "torch": torch}
    exec(out, ns)  # the printed rules are valid code that builds AutoRules
    (rule,) = ns["AUTO_RULES"]
    assert rule.backend == "cuda" and rule.modes == {"LSTM"} and rule.dtypes == {torch.bfloat16}
    assert rule.hidden == (256, 1024) and rule.batch == (8, 256)
    assert rule.evidence == "benchmarks/results/2026-12-01-NVIDIA-H200.md"
    assert "LSTM fp32: no rule; S4: 0.90x cuDNN" in out
    assert "GRU fp16: no rule; S6: no cuda row" in out
    assert "GRU bf16: no rule; S2: 1.02x cuDNN (< 1.05)" in out
    # a dry run's table is refused: its times mean nothing
    dry = tmp_path / "dry.csv"
    dry.write_text("gpu,cell\n\"none (dry run on the CPU, Triton interpreter)\",LSTM\n")
    assert auto_rules.main([str(dry)]) == 2


def test_inner_budget_leaves_time_to_write_the_report():
    """gpu_common.sh frnn_inner_budget WANT MARGIN: the --time-budget a script gets inside its
    step's timeout: the timeout less MARGIN, half of a short one, 0 when the step is skipped."""
    def budget(left, want, margin):
        r = subprocess.run(["bash", "-c", f'source "{ROOT}/benchmarks/gpu_common.sh" && '
                            f'FRNN_DEADLINE=$(( $(date +%s) + {left} )) && '
                            f'frnn_inner_budget {want} {margin}'],
                           capture_output=True, text=True, check=True)
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
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check_cuda.sh"), "--part", "extra",
                        str(logs)], capture_output=True, text=True, env=env, timeout=300,
                       check=False)
    assert r.returncode != 0
    assert "compute-sanitizer cannot use this machine's GPU" in r.stdout
    assert (logs / "cuda_sanitizer_memcheck.log").is_file()
    assert not (logs / "cuda_sanitizer_racecheck.log").exists()
    assert not (logs / "cuda_sanitizer_synccheck.log").exists()
