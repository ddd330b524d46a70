"""``fused-rnn bench`` (fused_rnn.bench): its checks and its report.

The bench's runs through the CLI live in test_cli.py; these reuse its in-process ``run``,
its tiny text and bench flags, and read the CSV the same way.
"""

from __future__ import annotations

import pytest
import torch
from test_cli import BENCH_TINY, _bench_rows, _tiny_text, run

import fused_rnn
from fused_rnn import bench

pytestmark = pytest.mark.usefixtures("one_thread")  # as in test_cli.py


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text(_tiny_text())
    return p


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
