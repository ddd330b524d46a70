"""``fused-rnn bench`` (fused_rnn.bench): its checks and its report.

The bench's runs through the CLI live in test_cli.py; these reuse its in-process ``run``,
its tiny text and bench flags, and read the CSV the same way.
"""

from __future__ import annotations

import pytest
import torch
from test_cli import BENCH_TINY, _bench_rows, run

import fused_rnn
from fused_rnn import bench

pytestmark = pytest.mark.usefixtures("one_thread")  # as in test_cli.py


def test_bench_flags_a_validation_loss_off_by_more_than_the_tolerance(capsys, tmp_path,
                                                                      text_file, monkeypatch):
    """The loss check on its own: the reference backend's first steps agree with torch.nn's,
    only its validation loss is 0.01 nats off (fp32's tolerance is 2e-3)."""
    real = bench.evaluate

    def off_for_the_reference_backend(model, *a, **k):
        total, count = real(model, *a, **k)
        if isinstance(model.rnn, fused_rnn.LSTM) and model.rnn.backend == "reference":
            total += 0.01 * count
        return total, count

    monkeypatch.setattr(bench, "evaluate", off_for_the_reference_backend)
    rc, stdout, err = run(capsys, *BENCH_TINY, "--text", text_file, "--out", tmp_path,
                          "--backends", "reference,torch", "--precisions", "fp32")
    assert rc == 1 and "disagree" in err, stdout + err
    rows = _bench_rows(tmp_path)
    assert rows[("fp32", "fused_rnn:reference")]["check"] == "MISMATCH (loss Δ > 0.002)"
    assert rows[("fp32", "fused_rnn:torch")]["check"] == "ok"


def test_amp_bf16_loss_is_held_to_torch_nns_fp32_row_on_cuda():
    """On CUDA torch.nn's amp-bf16 RNN computes in fp16 with no loss scaling (seen training
    to 3.52 where every other row reached 2.73): an amp-bf16 row's loss is checked against
    torch.nn's fp32 row there, its speed against torch.nn's amp-bf16 row; on the CPU, against
    its own precision's row. On CUDA with no usable fp32 row (the CLI refuses amp-bf16 without
    fp32 there; the fp32 row may have failed) the loss has no baseline: held to the fp16-trained
    row, every correct row was a MISMATCH."""
    def rows(with_fp32=True):
        made = [{"impl": impl, "precision": p, "error": "", "val_loss": loss,
                 "tokens_per_s": tps}
                for impl, p, loss, tps in [("torch.nn", "fp32", 2.7263, 100.0),
                                           ("torch.nn", "amp-bf16", 3.5250, 200.0),
                                           ("fused_rnn:x", "amp-bf16", 2.7266, 400.0)]
                if with_fp32 or p != "fp32"]
        return made, made[-1]

    results, ours = rows()
    assert bench._check(results, torch.device("cuda"))
    assert ours["check"] == "ok" and ours["delta"] == pytest.approx(3e-4)
    assert ours["speedup"] == 2.0
    results, ours = rows()
    assert not bench._check(results, torch.device("cpu"))
    assert ours["check"] == "MISMATCH (loss Δ > 0.06)"
    assert ours["delta"] == pytest.approx(2.7266 - 3.5250)
    results, ours = rows(with_fp32=False)
    assert bench._check(results, torch.device("cuda"))
    assert ours["check"] == "no baseline" and ours["delta"] is None
    results, ours = rows()
    results[0]["error"] = "RuntimeError: out of memory"  # torch.nn's fp32 row failed
    assert not bench._check(results, torch.device("cuda"))  # (that row's ERROR)
    assert results[0]["check"] == "ERROR" and ours["check"] == "no baseline"


def test_bench_refuses_amp_bf16_without_fp32_on_cuda(capsys, tmp_path, text_file, monkeypatch):
    """Its loss baseline there is torch.nn's fp32 row: asked for alone, it is refused before
    any work, saying why."""
    monkeypatch.setattr(bench, "_device", lambda name: torch.device("cuda"))
    rc, _, err = run(capsys, *BENCH_TINY, "--text", text_file, "--out", tmp_path,
                     "--precisions", "amp-bf16")
    assert rc == 2 and "--precisions amp-bf16 on CUDA needs fp32 too" in err, err
    assert not list(tmp_path.glob("*.csv"))


def test_bench_validates_val_chunks_chunks_and_reports_speedup_over_torch_nn(capsys, tmp_path,
                                                                             text_file,
                                                                             monkeypatch):
    """--val-chunks 2 evaluates 2 chunks of B x bptt tokens (not the whole validation text);
    speedup_vs_torch_nn is a row's tokens/s over torch.nn's (the CSV holds both exactly)."""
    counts = []
    real = bench.evaluate

    def counting(*a, **k):
        total, count = real(*a, **k)
        counts.append(count)
        return total, count

    monkeypatch.setattr(bench, "evaluate", counting)
    rc, _, err = run(capsys, *BENCH_TINY, "--text", text_file, "--out", tmp_path,
                     "--backends", "torch", "--precisions", "fp32")
    assert rc == 0, err
    assert counts and all(c == 2 * 4 * 8 for c in counts), counts
    rows = _bench_rows(tmp_path)
    base = float(rows[("fp32", "torch.nn")]["tokens_per_s"])
    for row in rows.values():
        assert float(row["speedup_vs_torch_nn"]) == float(row["tokens_per_s"]) / base, row


def test_first_steps_logits_error_is_the_worst_steps():
    """Logits off by half at one step of eight: the error is 0.5 (to fp32 rounding of the
    product), not the mean over steps."""
    ref = torch.randn(8, 4, 10)
    got = ref.clone()
    got[5] *= 1.5
    grads = {"w": torch.ones(3)}
    err, grad_err, name = bench._first_steps_error((got, grads), (ref, grads))
    assert err == pytest.approx(0.5, rel=1e-6) and grad_err == 0 and name == ""


def test_bench_refuses_a_named_backend_this_machine_cannot_run(capsys, tmp_path, text_file):
    rc, _, err = run(capsys, *BENCH_TINY, "--text", text_file, "--out", tmp_path,
                     "--backends", "reference,cuda", "--precisions", "fp32")
    assert rc == 2 and "--backends cuda: unavailable here (" in err, err
    assert not list(tmp_path.glob("*.csv")), "refused before any row ran"


@pytest.mark.parametrize("where", ["build", "first steps"])
def test_a_row_that_cannot_be_built_or_probed_is_an_error_and_the_rest_run(capsys, tmp_path,
                                                                          text_file,
                                                                          monkeypatch, where):
    """A backend whose model fails to build, or whose first-steps probe raises, gets its
    error in its row (check ERROR, exit 1); torch.nn's row and the others still run."""
    real_build, real_probe = bench._build_model, bench._first_steps

    def build(cfg, vocab_size, torch_nn, backend):
        if where == "build" and not torch_nn and backend == "reference":
            raise RuntimeError("no kernel for this shape")
        return real_build(cfg, vocab_size, torch_nn, backend)

    def probe(model, *a):
        rnn = model.rnn
        if where == "first steps" and isinstance(rnn, fused_rnn.LSTM) and rnn.backend == "reference":
            raise RuntimeError("no kernel for this shape")
        return real_probe(model, *a)

    monkeypatch.setattr(bench, "_build_model", build)
    monkeypatch.setattr(bench, "_first_steps", probe)
    rc, stdout, err = run(capsys, *BENCH_TINY, "--text", text_file, "--out", tmp_path,
                          "--backends", "reference,torch", "--precisions", "fp32")
    assert rc == 1, stdout + err
    rows = _bench_rows(tmp_path)
    bad = rows[("fp32", "fused_rnn:reference")]
    assert bad["check"] == "ERROR" and bad["error"] == "RuntimeError: no kernel for this shape"
    assert not bad["tokens_per_s"], "an errored row is not timed"
    for key in (("fp32", "torch.nn"), ("fp32", "fused_rnn:torch")):
        assert rows[key]["check"] == "ok" and not rows[key]["error"], rows[key]


# --------------------------------------------------------------------------- bench_cpu.py
def _bench_cpu():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_cpu
    finally:
        sys.path.pop(0)
    return bench_cpu


def test_bench_cpu_times_both_writes_its_csv_and_gates_on_the_ratio(tmp_path, capsys,
                                                                     monkeypatch):
    """benchmarks/bench_cpu.py (README's CPU benchmark) at a tiny size: one row per cell,
    each checked against torch.nn before it is timed, and --max-ratio failing the run."""
    import csv

    bench_cpu = _bench_cpu()
    checked = []
    real_check = bench_cpu.check_same
    monkeypatch.setattr(bench_cpu, "check_same",
                        lambda ours, *a: checked.append(type(ours).__name__) or real_check(ours, *a))
    tiny = ["--reps", "2", "--B", "2", "--T", "3", "--H", "8", "--layers", "2"]
    assert bench_cpu.main([*tiny, "--csv", str(tmp_path / "t.csv")]) == 0
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == ["lstm", "gru"]
    for r in rows:
        assert float(r["ours_ms"]) > 0 and float(r["nn_ms"]) > 0 and float(r["ratio"]) > 0
    assert "| lstm | 2×3×8, 2 | auto |" in capsys.readouterr().out
    assert checked == ["LSTM", "GRU"]
    assert bench_cpu.main([*tiny, "--max-ratio", "0"]) == 1
    assert "FAIL: a ratio exceeds 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_cpu.main([*tiny[:-2], "--layers", "0"])
    assert "--layers: must be at least 1, not 0" in capsys.readouterr().err
    # a backend it cannot run is a usage error, not a traceback after the header
    for backend, why in (("nonsense", "'nonsense' is not one of auto, reference"),
                         ("cuda", "--backend cuda: unavailable on the CPU (")):
        with pytest.raises(SystemExit) as e:
            bench_cpu.main([*tiny, "--backend", backend])
        assert e.value.code == 2 and why in capsys.readouterr().err, backend


def test_bench_cpu_refuses_to_time_a_model_that_computes_otherwise():
    bench_cpu = _bench_cpu()
    torch.manual_seed(0)
    ref = torch.nn.GRU(4, 5)
    same = fused_rnn.GRU(4, 5, backend="reference")
    same.load_state_dict(ref.state_dict())
    x, h, cot = torch.randn(3, 2, 4), torch.randn(1, 2, 5), torch.randn(3, 2, 5)
    bench_cpu.check_same(same, ref, x, h, cot)  # the same weights: passes
    with torch.no_grad():
        same.bias_hh_l0[0] += 1e-2  # y moves by about 1e-3: past the tolerance
    with pytest.raises(SystemExit, match="y differs from torch.nn's"):
        bench_cpu.check_same(same, ref, x, h, cot)
    with torch.no_grad():
        same.bias_hh_l0[0] -= 1e-2
    bench_cpu.check_same(same, ref, x, h, cot)
    same.weight_hh_l0.register_hook(lambda g: g * 1.01)  # the same y, another gradient
    with pytest.raises(SystemExit, match="grad weight_hh_l0 differs from torch.nn's"):
        bench_cpu.check_same(same, ref, x, h, cot)


# --------------------------------------------------------------------------- a helper's audit
def test_a_late_reported_fault_of_torch_nns_probe_is_torch_nns(capsys, tmp_path, text_file,
                                                                monkeypatch):
    """A CUDA fault is reported at a later call. torch.nn's first-steps probe did not wait for
    the device, so a fault of cuDNN's surfaced at the next row's first call, and each fresh
    process blamed the next fused row in turn. The probe ends with a sync now: the fault is
    torch.nn's, and no fused row is blamed (no fresh process is started)."""
    real_sync, real_probe, pending = bench._sync, bench._first_steps, []

    def probe(model, *a):
        got = real_probe(model, *a)
        pending.append("fault")  # queued on the device: reported at the next sync
        return got

    def sync(device):
        if pending:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_sync(device)

    monkeypatch.setattr(bench, "_first_steps", probe)
    monkeypatch.setattr(bench, "_sync", sync)
    monkeypatch.setattr(bench, "_context_lost", lambda device: bool(pending))
    monkeypatch.setattr(bench, "_bench_in_fresh_process",
                        lambda *a: pytest.fail("a fresh process was started"))
    rc, stdout, err = run(capsys, *BENCH_TINY, "--text", text_file, "--backends", "torch",
                          "--precisions", "fp32", "--out", tmp_path)
    rows = _bench_rows(tmp_path)
    assert rc == 1 and len(rows) == 2, stdout + err
    assert all("torch.nn's first-steps probe took the CUDA context" in r["error"]
               for r in rows.values()), rows


def test_rows_left_unchecked_by_a_failed_torch_nn_probe_do_not_pass(capsys, tmp_path, text_file,
                                                                    monkeypatch):
    """torch.nn's first-steps probe failing (not a device fault) dropped the check silently:
    a row with a fault only that check catches came out 'ok' with exit 0. Its rows are
    UNCHECKED now, and the run exits 1."""
    real = bench._first_steps

    def probe(model, *a):
        if isinstance(model.rnn, fused_rnn.LSTM):  # ours
            return real(model, *a)
        raise RuntimeError("the probe broke")  # torch.nn's

    monkeypatch.setattr(bench, "_first_steps", probe)
    rc, stdout, err = run(capsys, *BENCH_TINY, "--text", text_file, "--backends", "torch",
                          "--precisions", "fp32", "--out", tmp_path)
    assert rc == 1, stdout + err
    rows = _bench_rows(tmp_path)
    assert rows[("fp32", "torch.nn")]["check"] == "ok"
    assert rows[("fp32", "fused_rnn:torch")]["check"] == (
        "UNCHECKED (first steps not checked (torch.nn's probe failed: RuntimeError: the probe "
        "broke))")


def test_a_precision_or_backend_named_twice_runs_once(capsys, tmp_path, text_file):
    """Repeats ran twice, and the second pass's rows were set against the first's torch.nn."""
    rc, stdout, err = run(capsys, *BENCH_TINY, "--text", text_file, "--backends", "torch,torch",
                          "--precisions", "fp32,fp32", "--out", tmp_path)
    assert rc == 0, stdout + err
    (path,) = tmp_path.glob("*.csv")
    impls = [line.split(",")[9] for line in path.read_text().splitlines()[1:]]
    assert impls == ["torch.nn", "fused_rnn:torch"], impls


@pytest.mark.parametrize("fault", ["state dropped under no_grad", "state's gradient dropped"])
def test_the_first_steps_probe_sees_the_eval_path_and_the_states_gradient(
        capsys, tmp_path, text_file, monkeypatch, fault):
    """Two faults the validation loss cannot see (measured: Δ 4e-2 under 0.06, and 5e-6):
    a forward that drops a carried state under no_grad (evaluate's path), and one that drops
    the gradient of the state it is given (what a chunk cut at a document start passes
    back). The probe compares both now."""
    real = fused_rnn.LSTM.forward

    def faulty(self, input, hx=None):
        if self.backend == "reference" and hx is not None:
            if fault.startswith("state dropped") and not torch.is_grad_enabled():
                hx = None
            elif fault.startswith("state's gradient") and torch.is_grad_enabled():
                hx = tuple(h.detach() for h in hx)
        return real(self, input, hx)

    monkeypatch.setattr(fused_rnn.LSTM, "forward", faulty)
    rc, stdout, err = run(capsys, *BENCH_TINY, "--text", text_file, "--out", tmp_path,
                          "--backends", "reference,torch", "--precisions", "fp32")
    assert rc == 1, stdout + err
    rows = _bench_rows(tmp_path)
    check = rows[("fp32", "fused_rnn:reference")]["check"]
    want = "first-steps logits" if fault.startswith("state dropped") else "grad of state["
    assert check.startswith("MISMATCH") and want in check, check
    assert rows[("fp32", "fused_rnn:torch")]["check"] == "ok"


def test_a_rows_step_time_is_the_median_of_its_timed_steps(monkeypatch):
    """An even count of timed steps (the defaults: 10 on the CPU, 30 on a GPU) took the upper
    of the two middle times."""
    import types

    run = object.__new__(bench._Run)
    run.row, run.injected, run.ac_dtype = {"impl": "x", "precision": "fp32", "error": ""}, None, None
    run.bench = types.SimpleNamespace(args=types.SimpleNamespace(val_chunks=1),
                                      batcher=lambda split: None)
    run.model, run.peak, run.fallbacks = None, 1.0, set()
    run.times, run.tokens = [0.04, 0.01, 0.03, 0.02], [100] * 4
    run.sample_speed = lambda: None
    monkeypatch.setattr(bench, "evaluate", lambda *a, **k: (2.0, 1))
    row = run.finish()
    assert row["ms_per_step"] == pytest.approx(25.0) and row["tokens_per_s"] == pytest.approx(4000)


def test_an_error_holding_a_pipe_stays_in_its_table_cell(capsys, tmp_path, text_file,
                                                         monkeypatch):
    """Error text goes into the table's check column; a '|' in it split the row."""
    import re

    real_build = bench._build_model

    def build(cfg, vocab_size, torch_nn, backend):
        if not torch_nn and backend == "reference":
            raise RuntimeError("shape (2|3) not taken")
        return real_build(cfg, vocab_size, torch_nn, backend)

    monkeypatch.setattr(bench, "_build_model", build)
    rc, _, _ = run(capsys, *BENCH_TINY, "--text", text_file, "--out", tmp_path,
                   "--backends", "reference,torch", "--precisions", "fp32")
    assert rc == 1
    table = next(tmp_path.glob("*.md")).read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| fp32 |")]
    assert len(rows) == 3 and "shape (2\\|3) not taken" in table
    assert {len(re.findall(r"(?<!\\)\|", ln)) for ln in rows} == {12}
