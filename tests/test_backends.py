"""Backend names, availability reporting, resolution and the fallback chain."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import fused_rnn
from fused_rnn import backends, functional


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError) as e:
        fused_rnn.LSTM(4, 6, backend="cudnn")
    for name in backends.BACKENDS:
        assert repr(name) in str(e.value)
    with pytest.raises(ValueError):
        fused_rnn.GRUCell(4, 6, backend=None)
    with pytest.raises(ValueError):
        functional.rnn_layer("GRU", torch.zeros(1, 1, 2), torch.zeros(1, 3), None,
                             torch.zeros(9, 2), torch.zeros(9, 3), backend="fast")


def test_always_available():
    avail = fused_rnn.available_backends()
    for name in ("auto", "reference", "torch"):
        assert name in avail
    report = fused_rnn.backend_report()
    assert set(report) == set(backends.BACKENDS)
    for name, state in report.items():
        assert (state == "available") == (name in avail)
        assert state  # a reason is never empty


def test_unavailable_backend_raises_with_reason(monkeypatch):
    fake = types.SimpleNamespace(unavailable_reason=lambda device: "it needs a GPU; install X to get it")
    monkeypatch.setattr(backends, "_kernel_module", lambda name: fake)
    lstm = fused_rnn.LSTM(4, 6, backend="cuda")
    with pytest.raises(RuntimeError, match="'cuda' is unavailable: it needs a GPU; install X"):
        lstm(torch.randn(3, 2, 4))
    assert "cuda" not in fused_rnn.available_backends()


def test_missing_backend_module_is_reported(monkeypatch):
    def boom(name):
        raise ImportError(f"No module named 'fused_rnn.ops.{name}'")

    monkeypatch.setattr(backends, "_kernel_module", boom)
    reason = backends.unavailable_reason("triton")
    assert reason and "could not be imported" in reason


def test_auto_resolves_to_pytorch_kernels_in_eager():
    assert backends.resolve_stack("auto", torch.device("cpu")) == "torch"
    assert backends.resolve_stack("reference", torch.device("cpu")) == "reference"


def test_fallback_warns_once_and_uses_reference(monkeypatch):
    calls = []

    def unsupported(kind, **config):
        calls.append(config)
        return f"H={config['hidden_size']} is too large for the test kernel"

    fake = types.SimpleNamespace(unavailable_reason=lambda device: None, unsupported_reason=unsupported)
    monkeypatch.setattr(backends, "_kernel_module", lambda name: fake)
    monkeypatch.setattr(backends, "_warned", set())
    lstm = fused_rnn.LSTM(4, 6, backend="triton")
    ref = fused_rnn.LSTM(4, 6, backend="reference")
    ref.load_state_dict(lstm.state_dict())
    x = torch.randn(3, 2, 4)
    with pytest.warns(RuntimeWarning, match="too large.*falling back to 'reference'"):
        y = lstm(x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lstm(x)  # the same reason warns only once
    torch.testing.assert_close(y, ref(x)[0], atol=0, rtol=0)
    assert calls and calls[0]["mode"] == "LSTM" and calls[0]["hidden_size"] == 6
    assert calls[0]["dtype"] == torch.float32 and calls[0]["has_lengths"] is False


def test_cuda_falls_back_through_triton(monkeypatch):
    seen = []

    def module(name):
        seen.append(name)
        return types.SimpleNamespace(
            unavailable_reason=lambda device: f"no {name} here", unsupported_reason=None)

    monkeypatch.setattr(backends, "_kernel_module", module)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning):
        impl = backends.kernel_impl("cuda", "layer", mode="GRU", device=torch.device("cpu"))
    assert impl.__name__ == "fused_rnn.ops.reference"
    assert seen == ["cuda", "triton"]


def test_auto_under_compile_traces_reference_on_cpu_only(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert backends.resolve_stack("auto", torch.device("cpu")) == "reference"
    # inductor keeps cuDNN's RNN as an extern kernel, so a GPU stays on it
    assert backends.resolve_stack("auto", torch.device("cuda")) == "torch"
