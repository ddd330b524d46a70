"""Backend names, availability reporting, resolution and the fallback chain."""

from __future__ import annotations

import importlib
import os
import types
import warnings

import pytest
import torch

import fused_rnn
from fused_rnn import backends, functional
from fused_rnn.ops import common


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


def test_on_a_device_its_backend_cannot_use_a_module_raises_and_functional_falls_back(
        monkeypatch):
    """The contrast the README states: a module's backend is a setting the user chose, so a
    device it cannot run on is an error; a functional op hands the call down the chain, with
    the one-time warning, and computes the reference's values."""
    def module(name):
        return types.SimpleNamespace(unavailable_reason=lambda device: f"{name} needs a GPU",
                                     unsupported_reason=None)

    monkeypatch.setattr(backends, "_kernel_module", module)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.raises(RuntimeError, match="'triton' is unavailable: triton needs a GPU"):
        fused_rnn.GRU(4, 8, backend="triton")(torch.randn(5, 3, 4))
    torch.manual_seed(0)
    args = (torch.randn(5, 3, 4), torch.randn(3, 8), None, torch.randn(24, 4),
            torch.randn(24, 8))
    with pytest.warns(RuntimeWarning, match="'triton' cannot take this call .triton needs a GPU"):
        y, h, _ = functional.rnn_layer("GRU", *args, backend="triton")
    y_ref, h_ref, _ = functional.rnn_layer("GRU", *args, backend="reference")
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


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


def test_fallback_warning_points_at_the_callers_line_and_raises_under_an_error_filter(monkeypatch):
    """The warning names the line that called the module (not fused_rnn's internals), and
    under an "error" filter every such call raises, not only the first, and counts no
    fallback (it did not run)."""
    fake = types.SimpleNamespace(unavailable_reason=lambda device: None,
                                 unsupported_reason=lambda kind, **config: "a test reason")
    monkeypatch.setattr(backends, "_kernel_module", lambda name: fake)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_fallbacks", {})
    lstm = fused_rnn.LSTM(4, 6, backend="triton")
    x = torch.randn(3, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(RuntimeWarning, match="a test reason"):
                lstm(x)
    assert backends.fallback_counts() == {}
    with pytest.warns(RuntimeWarning, match="a test reason") as record:
        lstm(x)
    assert record[0].filename == __file__
    assert sum(backends.fallback_counts().values()) == 1


def test_a_warning_from_inside_a_context_manager_points_at_the_caller():
    import contextlib

    from fused_rnn.ops.common import warn_at_caller

    @contextlib.contextmanager
    def noticing():
        warn_at_caller("a notice")
        yield

    with pytest.warns(RuntimeWarning, match="a notice") as record, noticing():
        pass
    assert record[0].filename == __file__


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_functional_layer_on_meta_infers_shapes_without_a_fallback(monkeypatch, name):
    """No kernel runs on meta tensors, on any machine: the reference infers the shapes, and
    that is not a fallback (no warning, nothing counted)."""
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_fallbacks", {})
    m = {"device": "meta"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, h, _ = functional.rnn_layer("GRU", torch.randn(5, 3, 4, **m), torch.zeros(3, 8, **m),
                                       None, torch.randn(24, 4, **m), torch.randn(24, 8, **m),
                                       backend=name)
    assert (y.shape, h.shape, y.device.type) == ((5, 3, 8), (3, 8), "meta")
    assert not backends.fallback_counts()


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


@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("sizes", [(0, 6), (4, 0)], ids=["input0", "hidden0"])
def test_kernels_hand_zero_sizes_to_the_reference(name, sizes):
    """torch.nn's cells may have input_size or hidden_size 0; no kernel launches for that."""
    module = importlib.import_module(f"fused_rnn.ops.{name}")
    reason = module.unsupported_reason(
        "cell", mode="LSTM", device=torch.device("cuda", 0), dtype=torch.float32,
        input_size=sizes[0], hidden_size=sizes[1], proj_size=0, has_lengths=False)
    assert reason and "size of 0" in reason


@pytest.mark.parametrize("cooperative", [1, 0])
def test_cuda_refuses_a_device_without_cooperative_launches(monkeypatch, cooperative):
    """The persistent kernels' grid barrier needs cooperative launches; a device without them
    (cudaDevAttrCooperativeLaunch 0) is a fallback with that reason, not the binding's error at
    the launch. The step path needs none, so FUSED_RNN_CUDA_PATH=step takes the device."""
    from fused_rnn.ops import cuda as cuda_backend
    from fused_rnn.ops.cuda import _ext

    monkeypatch.setattr(_ext, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(_ext, "extension", lambda: types.SimpleNamespace(
        device_info=lambda index: (132, 232448, 9, 0, cooperative)))

    def reason():
        return cuda_backend.unsupported_reason(
            "layer", mode="GRU", device=torch.device("cuda", 1), dtype=torch.float16,
            input_size=8, hidden_size=64, proj_size=0, has_lengths=False)

    got = reason()
    if cooperative:
        assert got is None
    else:
        assert "device 1 does not support cooperative launches" in got
        assert "FUSED_RNN_CUDA_PATH=step" in got
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "step")
    assert reason() is None


# --------------------------------------------------------------------------- auto rules
def _fake_kernel(calls, unsupported=lambda config: None, available=True):
    """A stand-in kernel backend that computes with the reference and counts its calls."""
    from fused_rnn.ops import reference

    def rnn_layer(*args, **kwargs):
        calls.append(args[0])
        return reference.rnn_layer(*args, **kwargs)

    return types.SimpleNamespace(
        unavailable_reason=lambda device: None if available else "not here",
        unsupported_reason=lambda kind, **config: unsupported(config),
        rnn_layer=rnn_layer,
    )


def _cpu_rule(**kw):
    args = dict(backend="triton", modes=frozenset({"LSTM"}), dtypes=frozenset({torch.float32}),
                hidden=(8, 64), batch=(1, 16), evidence="a test", device_type="cpu")
    return backends.AutoRule(**{**args, **kw})


def test_auto_rules_pick_a_kernel_backend_only_where_they_match(monkeypatch):
    calls = []
    monkeypatch.setattr(backends, "_kernel_module", lambda name: _fake_kernel(calls))
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(),))
    torch.manual_seed(0)

    def run(cls=fused_rnn.LSTM, H=16, B=3, dtype=torch.float32, **kw):
        calls.clear()
        m = cls(4, H, backend="auto", **kw).to(dtype)
        ref = getattr(torch.nn, cls.__name__)(4, H, **kw).to(dtype)
        ref.load_state_dict(m.state_dict())
        x = torch.randn(5, B, 4, dtype=dtype)
        torch.testing.assert_close(m(x)[0], ref(x)[0])
        return bool(calls)

    assert run(), "inside the rule: the kernel backend"
    assert not run(H=65) and not run(B=17) and not run(cls=fused_rnn.GRU)
    assert not run(num_layers=2) and not run(bidirectional=True)
    assert not run(dtype=torch.float64)
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(layers=(1, 2), bidirectional=True),))
    assert run(num_layers=2, bidirectional=True)
    # the sequence lengths the rule was measured on (x has 5 steps; packed: its longest)
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(steps=(6, 64)),))
    assert not run()
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(steps=(5, 5)),))
    assert run() and run(batch_first=True) is False  # batch_first: 5 rows of 3 steps
    # the ranges hold their ends: those are the measured shapes the backend won on
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(),))
    assert run(H=8) and run(H=64) and run(B=1) and run(B=16)
    assert not run(H=7)
    # a rule measured on bidirectional stacks also takes one-directional ones, not the reverse
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(bidirectional=True),))
    assert run() and run(bidirectional=True)
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(layers=(2, 2)),))
    assert not run() and run(num_layers=2)


def test_an_auto_rule_over_fp32_and_16_bits_holds_its_tf32_setting_to_fp32():
    """A rule's tf32 setting says which cuDNN fp32 it beat; its 16-bit dtypes do not depend on
    it."""
    rule = _cpu_rule(dtypes=frozenset({torch.float32, torch.bfloat16}), tf32=True)
    args = ("cpu", "LSTM")
    assert rule.matches(*args, torch.bfloat16, 16, 3, 1, False, tf32=False)
    assert rule.matches(*args, torch.float32, 16, 3, 1, False, tf32=True)
    assert not rule.matches(*args, torch.float32, 16, 3, 1, False, tf32=False)


def test_auto_takes_the_next_rule_where_one_backend_cannot(monkeypatch):
    """Rules are tried in order: one whose backend is unavailable, or refuses a layer of the
    stack, gives way to the next that matches."""
    H = 16
    config = dict(mode="LSTM", dtype=torch.float32, hidden_size=H, proj_size=0, batch=3,
                  num_layers=1, bidirectional=False, input_size=4, has_lengths=False)
    rules = (_cpu_rule(backend="cuda"), _cpu_rule(backend="triton"))
    monkeypatch.setattr(backends, "AUTO_RULES", rules)
    for first in (dict(available=False), dict(unsupported=lambda cfg: "no")):
        monkeypatch.setattr(backends, "_kernel_module", lambda name, f=first: _fake_kernel(
            [], **(f if name == "cuda" else {})))
        assert backends.resolve_stack("auto", torch.device("cpu"), **config) == "triton", first
    monkeypatch.setattr(backends, "_kernel_module", lambda name: _fake_kernel([]))
    assert backends.resolve_stack("auto", torch.device("cpu"), **config) == "cuda"


def test_each_fallback_reason_is_said_once(monkeypatch):
    """One warning a process per (backend, reason): a second reason for the same backend is
    said too."""
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        said = [backends._warn_once("triton", reason, "reference")
                for reason in ("reason A", "reason A", "reason B", "reason B")]
    assert said == [True, False, True, False]
    assert [("reason A" in str(w.message), "reason B" in str(w.message)) for w in caught] == [
        (True, False), (False, True)]


def test_auto_rules_see_the_autocast_dtype(monkeypatch):
    calls = []
    monkeypatch.setattr(backends, "_kernel_module", lambda name: _fake_kernel(calls))
    lstm = fused_rnn.LSTM(4, 16, backend="auto")
    x = torch.randn(5, 3, 4)
    for dtypes, expect in (({torch.float32}, False), ({torch.bfloat16}, True)):
        monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(dtypes=frozenset(dtypes)),))
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lstm(x)[0]
        assert y.dtype == torch.bfloat16 and bool(calls) == expect


def test_auto_rules_never_fall_back_to_the_reference(monkeypatch):
    """A rule applies only where its backend is available and takes every layer of the stack;
    otherwise auto runs PyTorch's kernels, silently (no fallback warning, no reference)."""
    monkeypatch.setattr(backends, "_warned", set())
    H = 16
    for fake, stack in (
        (lambda c: _fake_kernel(c, available=False), {}),
        (lambda c: _fake_kernel(c, unsupported=lambda cfg: "no" if cfg["proj_size"] else None),
         dict(proj_size=8)),
        # the second layer of a bidirectional stack takes 2H inputs
        (lambda c: _fake_kernel(c, unsupported=lambda cfg: "no" if cfg["input_size"] == 2 * H
                                else None), dict(num_layers=2, bidirectional=True)),
        # ... and of a projected stack, proj_size inputs
        (lambda c: _fake_kernel(c, unsupported=lambda cfg: "no" if cfg["input_size"] == 8
                                else None), dict(num_layers=2, proj_size=8)),
    ):
        calls = []
        monkeypatch.setattr(backends, "_kernel_module", lambda name, f=fake, c=calls: f(c))
        monkeypatch.setattr(backends, "AUTO_RULES",
                            (_cpu_rule(layers=(1, 2), bidirectional=True, projection=True),))
        config = dict(mode="LSTM", dtype=torch.float32, hidden_size=H, proj_size=0, batch=3,
                      num_layers=1, bidirectional=False, input_size=4, has_lengths=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = backends.resolve_stack("auto", torch.device("cpu"), **{**config, **stack})
        assert got == "torch" and calls == [], stack
    # the same stacks without the obstacle take the rule's backend
    monkeypatch.setattr(backends, "_kernel_module", lambda name: _fake_kernel([]))
    assert backends.resolve_stack("auto", torch.device("cpu"), **{**config, **stack}) == "triton"


def test_an_auto_rule_takes_projections_and_lengths_only_where_it_says():
    """The bench times one layer without a projection or lengths, so a rule took LSTMs with
    proj_size and packed calls it never measured (a helper found it); they are opt-in now."""
    calls = []
    fake = _fake_kernel(calls)
    config = dict(mode="LSTM", dtype=torch.float32, hidden_size=16, proj_size=0, batch=3,
                  num_layers=1, bidirectional=False, input_size=4, has_lengths=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "_kernel_module", lambda name: fake)
        for rule, proj, lengths, want in (
                (_cpu_rule(), 0, False, "triton"), (_cpu_rule(), 8, False, "torch"),
                (_cpu_rule(), 0, True, "torch"), (_cpu_rule(projection=True), 8, False, "triton"),
                (_cpu_rule(lengths=True), 0, True, "triton")):
            mp.setattr(backends, "AUTO_RULES", (rule,))
            got = backends.resolve_stack("auto", torch.device("cpu"),
                                         **{**config, "proj_size": proj, "has_lengths": lengths})
            assert got == want, (rule, proj, lengths)


def test_auto_rule_needs_a_kernel_backend_and_evidence():
    with pytest.raises(ValueError, match="kernel backend"):
        _cpu_rule(backend="torch")
    with pytest.raises(ValueError, match="evidence"):
        _cpu_rule(evidence="")
    with pytest.raises(ValueError, match="modes"):
        _cpu_rule(modes=frozenset({"lstm"}))  # the op's names: LSTM, GRU, RNN_TANH, RNN_RELU
    with pytest.raises(ValueError, match="dtypes"):
        _cpu_rule(dtypes=frozenset({torch.float64}))
    with pytest.raises(ValueError, match="hidden range"):
        _cpu_rule(hidden=(64, 8))
    with pytest.raises(ValueError, match="batch range"):
        _cpu_rule(batch=(0, 8))
    # a TF32 setting says something of float32 only (mutation audit: its check could go)
    with pytest.raises(ValueError, match="tf32"):
        _cpu_rule(dtypes=frozenset({torch.bfloat16}), tf32=True)


def test_a_rule_holds_on_the_compute_capability_it_was_measured_on_only():
    """A rule from an sm_90 table matches an sm_90 device, not an sm_80 one (the mutation
    audit found nothing failing when the capability was ignored)."""
    rule = _cpu_rule(capability=(9, 0))
    args = ("cpu", "LSTM", torch.float32, 32, 1, False, True)
    assert rule.matches_stack(*args, (9, 0))
    assert not rule.matches_stack(*args, (8, 0))
    assert _cpu_rule().matches_stack(*args, (8, 0))  # no capability: any


@pytest.mark.parametrize("call", ["rnn_layer", "rnn_cell", "rnn"])
def test_the_functional_ops_refuse_an_unknown_backend_name(call):
    """A misspelled backend ("tritn") would otherwise run the reference: any name not a
    kernel backend's means the reference at this level."""
    from fused_rnn import functional

    x, h, w_ih, w_hh = torch.randn(3, 2, 4), torch.zeros(2, 5), torch.randn(15, 4), torch.randn(15, 5)
    with pytest.raises(ValueError, match="unknown backend 'tritn'"):
        if call == "rnn_layer":
            functional.rnn_layer("GRU", x, h, None, w_ih, w_hh, backend="tritn")
        elif call == "rnn_cell":
            functional.rnn_cell("GRU", x[0], h, None, w_ih, w_hh, backend="tritn")
        else:
            functional.rnn("GRU", x, h[None], None, [(w_ih, w_hh, None, None, None)],
                           num_layers=1, bidirectional=False, backend="tritn")


def test_a_functional_layer_on_triton_runs_the_triton_op():
    """The reference is exact, so every accuracy test passes if backend="triton" quietly ran
    it instead (mutation audit): the graph must hold the Triton op."""
    from fused_rnn import functional

    x = torch.randn(3, 2, 4)
    w_ih = torch.randn(20, 4, requires_grad=True)
    y, _, _ = functional.rnn_layer("LSTM", x, torch.zeros(2, 5), torch.zeros(2, 5), w_ih,
                                   torch.randn(20, 5), backend="triton")
    assert "triton_layer" in type(y.grad_fn).__name__, type(y.grad_fn).__name__


def test_a_kernel_backend_under_forward_mode_ad_gives_the_references_tangent():
    """Forward-mode AD has no rule in the kernels' ops: inside dual_level the functional
    layer on triton hands over to the reference, whose tangent comes back (without the hand-
    over, the mutation audit saw a tangent of None and no error)."""
    import torch.autograd.forward_ad as fwAD

    from fused_rnn import functional

    torch.manual_seed(0)
    x, t = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    args = (torch.zeros(2, 5), torch.zeros(2, 5), torch.randn(20, 3), torch.randn(20, 5))
    tangents = {}
    for backend in ("reference", "triton"):
        with fwAD.dual_level(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hand-over's warning
            y, _, _ = functional.rnn_layer("LSTM", fwAD.make_dual(x, t), *args, backend=backend)
            tangents[backend] = fwAD.unpack_dual(y).tangent
    assert tangents["triton"] is not None
    assert tangents["reference"].abs().max() > 0
    torch.testing.assert_close(tangents["triton"], tangents["reference"])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_module_on_a_kernel_backend_infers_shapes_on_meta(backend):
    """Meta tensors carry shapes only: a module on any backend answers with torch.nn's shapes
    there, whether or not its kernels can run on this machine (the functional path was
    tested; the module's was not)."""
    m = fused_rnn.LSTM(4, 8, 2, device="meta", backend=backend)
    y, (h, c) = m(torch.randn(5, 3, 4, device="meta"))
    assert y.device.type == "meta"
    assert (tuple(y.shape), tuple(h.shape), tuple(c.shape)) == ((5, 3, 8), (2, 3, 8), (2, 3, 8))


def _auto_rules_tool():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return __import__("auto_rules")
    finally:
        sys.path.pop(0)


_MODE_NAMES = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}
_DTYPE_NAMES = {torch.float32: ("fp32", "fp32-strict"), torch.bfloat16: ("bf16",),
                torch.float16: ("fp16",)}


def evidence_problems(rule, table: str, root) -> list[str]:
    """Why a committed rule is not what ``benchmarks/auto_rules.py`` proposes from the table it
    cites (its .csv beside the .md), or []: the table must be one the tool takes for the
    rule's backend (one clean run whose GPU tests passed; for triton, whose CUDA tests passed:
    the Triton suite's line is not in the table) and a rule it proposes must cover this one's
    cells, dtypes, TF32 setting and ranges, on the table's GPU. ``table``: "auto", "paths"
    or "stage-copy"."""
    import csv

    tool = _auto_rules_tool()
    evidence = root / rule.evidence
    if not (rule.evidence.startswith("benchmarks/results/") and evidence.is_file()):
        return [f"no results file {rule.evidence}"]
    data = evidence.with_suffix(".csv")
    if not data.is_file():
        return [f"no table {data.name} beside {evidence.name}"]
    with open(data, newline="") as f:
        rows = list(csv.DictReader(f))
    backend = getattr(rule, "backend", "cuda")
    why = tool.refusal(rows, "cuda" if backend == "triton" else backend)
    if why:
        return [f"{data.name} is refused: {why}"]
    capability = tuple(int(v) for v in rows[0]["capability"].split("."))
    problems = []
    if rule.capability != capability:
        problems.append(f"capability {rule.capability}, measured on {capability}")
    if table == "auto":
        proposed, _ = tool.propose(rows, backend, 1.05)
    elif table == "paths":
        proposed, _ = tool.propose_paths(rows, 1.05)
    else:
        proposed, _ = tool.propose_stage_copy(rows, 1.05)
    for mode in rule.modes:
        for dtype in rule.dtypes:
            covers = [p for p in proposed if p["cell"] == _MODE_NAMES[mode]
                      and p["dtype"] in _DTYPE_NAMES[dtype]
                      and (dtype != torch.float32 or p["tf32"] == rule.tf32)
                      and all(p[k][0] <= getattr(rule, k)[0] and getattr(rule, k)[1] <= p[k][1]
                              for k in ("hidden", "batch", "steps"))]
            if not covers:
                problems.append(f"{data.name} proposes no rule covering {mode} {dtype} "
                                f"hidden {rule.hidden}, batch {rule.batch}, steps {rule.steps}"
                                f"{'' if dtype != torch.float32 else f', tf32 {rule.tf32}'}")
    return problems


def test_committed_auto_rules_are_what_their_evidence_proposes():
    """auto chooses a kernel backend only from a committed GPU run (DESIGN.md): every rule is
    covered by a rule benchmarks/auto_rules.py proposes from the table it cites, a table the
    tool takes (its GPU tests passed). Before, a file that merely existed with rows of the
    backend did, the H200 table whose GPU tests failed among them."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for rule in backends.AUTO_RULES:
        assert rule.device_type == "cuda", rule
        assert evidence_problems(rule, "auto", root) == [], rule


@pytest.mark.parametrize("table", ["PATH_RULES", "STAGE_COPY_RULES"])
def test_committed_cuda_rules_are_what_their_evidence_proposes(table):
    """The CUDA backend changes its own defaults (the per-step path: PATH_RULES; the tagged
    exchange: STAGE_COPY_RULES) only from a committed GPU run, as auto: every rule is covered
    by what auto_rules.py --paths or --stage-copy proposes from the table it cites."""
    from pathlib import Path

    from fused_rnn.ops.cuda import ops

    root = Path(__file__).resolve().parents[1]
    mode = {"PATH_RULES": "paths", "STAGE_COPY_RULES": "stage-copy"}[table]
    for rule in getattr(ops, table):
        assert evidence_problems(rule, mode, root) == [], rule


def test_the_evidence_check_refuses_what_the_tool_would_not_propose(tmp_path):
    """evidence_problems itself, while the committed lists are empty: the H200 table (its GPU
    tests failed) backs no rule; a table of one clean run backs what the tool proposes from
    it, and nothing wider, slower-measured, or on another GPU."""
    from pathlib import Path

    import test_bench_gpu

    root = Path(__file__).resolve().parents[1]
    h200 = "benchmarks/results/2026-12-04-NVIDIA-H200.md"
    rule = backends.AutoRule(backend="cuda", modes=frozenset({"LSTM"}),
                             dtypes=frozenset({torch.bfloat16}), hidden=(256, 1024),
                             batch=(8, 256), steps=(64, 1024), capability=(9, 0), evidence=h200)
    (problem,) = evidence_problems(rule, "auto", root)
    assert "is refused: the CUDA GPU tests did not pass" in problem
    bench_gpu = test_bench_gpu._import("bench_gpu")
    every = dict.fromkeys(bench_gpu.SHAPES, 3.0)
    test_bench_gpu._gpu_table(tmp_path, {("LSTM", "bf16"): every,
                                         ("GRU", "bf16"): {**every, "S4": 0.9}})
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    for f in tmp_path.glob("2026-12-01-NVIDIA-H200.*"):
        f.rename(results / f.name)
    cited = dict(rule.__dict__, evidence="benchmarks/results/2026-12-01-NVIDIA-H200.md")
    assert evidence_problems(backends.AutoRule(**cited), "auto", tmp_path) == []
    for change, said in ((dict(hidden=(256, 2048)), "proposes no rule covering"),
                         (dict(modes=frozenset({"GRU"})), "proposes no rule covering"),
                         (dict(capability=(8, 0)), "capability (8, 0), measured on (9, 0)")):
        problems = evidence_problems(backends.AutoRule(**{**cited, **change}), "auto", tmp_path)
        assert any(said in p for p in problems), (change, problems)


def test_auto_rules_under_torch_compile_fullgraph(monkeypatch):
    """The rule lookup runs eagerly while dynamo traces (it probes the machine), so a stack
    that a rule sends to a kernel backend still compiles as one graph."""
    calls = []
    fake = _fake_kernel(calls)  # made outside the traced code
    monkeypatch.setattr(backends, "_kernel_module", lambda name: fake)
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(),))
    torch._dynamo.reset()
    lstm = fused_rnn.LSTM(4, 16, backend="auto")
    x = torch.randn(5, 3, 4)
    compiled = torch.compile(lstm, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x)[0], lstm(x)[0])
    assert calls == ["LSTM", "LSTM"], "traced once through the rule's backend, then eager"
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_compiled_auto_rules_follow_the_batch_and_the_length(monkeypatch, dynamic):
    """The rule lookup was one constant-result function given the batch and the length: with
    dynamic shapes those are symbolic, which broke the graph (an error under fullgraph), and
    a call outside the rule then failed inside torch_kernels_reason with a TypeError. They are
    compared in traced code now, so the graph is guarded on the rule's ranges."""
    calls = []
    fake = _fake_kernel(calls)
    monkeypatch.setattr(backends, "_kernel_module", lambda name: fake)
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(steps=(5, 64)),))
    torch._dynamo.reset()
    try:
        lstm = fused_rnn.LSTM(4, 16, backend="auto")
        compiled = torch.compile(lstm, fullgraph=True, backend="eager", dynamic=dynamic)
        for B, T, inside in ((3, 5, True), (40, 5, False), (4, 6, True), (3, 200, False),
                             (16, 64, True), (17, 64, False)):
            x = torch.randn(T, B, 4)
            want = lstm(x)[0]
            calls.clear()
            torch.testing.assert_close(compiled(x)[0], want)
            assert bool(calls) == inside, (B, T)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11),
                    reason="before torch 2.11 dynamo reads cuDNN's TF32 setting once, when it "
                           "traces (README: torch and Triton versions)")
def test_a_compiled_auto_rule_for_tf32_follows_the_setting(monkeypatch, fp32_precision_restored):
    """The rule lookup read cuDNN's TF32 setting inside a constant-result function, where
    dynamo sets no guard: a graph traced while an fp32 rule for TF32 matched kept the kernel
    backend after TF32 was turned off. The setting is read in traced code now."""
    calls = []
    fake = _fake_kernel(calls)
    monkeypatch.setattr(backends, "_kernel_module", lambda name: fake)
    monkeypatch.setattr(backends, "AUTO_RULES", (_cpu_rule(tf32=True),))
    torch._dynamo.reset()
    try:
        lstm = fused_rnn.LSTM(4, 16, backend="auto")
        compiled = torch.compile(lstm, fullgraph=True, backend="eager")
        x = torch.randn(5, 3, 4)
        for setting, inside in (("tf32", True), ("ieee", False), ("tf32", True)):
            common.cudnn_rnn_setting().fp32_precision = setting
            calls.clear()
            compiled(x)
            assert bool(calls) == inside, setting
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- the TF32 rule
@pytest.mark.parametrize("rnn,conv,cudnn_all,want", [
    ("ieee", "tf32", "none", False),  # conv and RNN differ: the legacy flag raises
    ("tf32", "ieee", "none", True),
    ("none", "tf32", "tf32", True),   # "none" inherits cuDNN's setting
    ("none", "none", "none", False),  # what torch.backends.cudnn.allow_tf32 = False sets
])
def test_tf32_follows_cudnn_rnn_precision(fp32_precision_restored, rnn, conv, cudnn_all, want):
    """TF32 for fp32 exactly where cuDNN's RNNs may use it. With the per-operator settings of
    torch >= 2.9 that is ``torch.backends.cudnn.rnn.fp32_precision``; the legacy
    ``torch.backends.cudnn.allow_tf32`` raises once conv and RNN differ, so reading it would
    break every kernel call of a user who set them apart."""
    from fused_rnn.ops.common import cudnn_rnn_tf32

    torch.backends.cudnn.fp32_precision = cudnn_all
    torch.backends.cudnn.conv.fp32_precision = conv
    common.cudnn_rnn_setting().fp32_precision = rnn  # torch.backends.cudnn.rnn from 2.11
    assert cudnn_rnn_tf32() is want
    if rnn != conv and "none" not in (rnn, conv):
        with pytest.raises(RuntimeError, match="different TF32 flags"):
            torch.backends.cudnn.allow_tf32  # noqa: B018 (the read is what raises)


def test_where_dynamo_cannot_trace_the_precision_a_graph_reads_it_once(fp32_precision_restored,
                                                                       monkeypatch):
    """torch 2.9 and 2.10 refuse to trace ``cudnn.rnn.fp32_precision`` (fullgraph=True failed
    at every kernel backend). There (as this torch is made to look) the compiled graph reads
    it once, at trace time: it compiles, and keeps that precision until recompiled; eager
    code reads the setting as it is."""
    from fused_rnn.ops import common

    monkeypatch.setattr(common, "_PRECISION_UNTRACEABLE", True)
    common.cudnn_rnn_setting().fp32_precision = "tf32"

    def f(x):
        return x + (1 if common.cudnn_rnn_tf32() else 2)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert compiled(torch.zeros(1)).item() == 1
    common.cudnn_rnn_setting().fp32_precision = "ieee"
    assert common.cudnn_rnn_tf32() is False
    assert compiled(torch.zeros(1)).item() == 1, "no guard: the traced value stays"
    torch._dynamo.reset()
    assert compiled(torch.zeros(1)).item() == 2
    torch._dynamo.reset()


def test_tf32_rule_reads_the_legacy_flag(monkeypatch):
    """On a torch without per-operator precision, the legacy flag decides."""
    from fused_rnn.ops import common

    legacy = types.SimpleNamespace(allow_tf32=False)
    monkeypatch.setattr(common.torch.backends, "cudnn", legacy)
    assert common.cudnn_rnn_tf32() is False
    legacy.allow_tf32 = True
    assert common.cudnn_rnn_tf32() is True



def test_the_rnn_setting_is_read_where_its_submodule_shadows_it(monkeypatch):
    """torch 2.9 and 2.10 keep ``cudnn.rnn.fp32_precision`` on the class of
    torch.backends.cudnn, and importing the submodule ``torch.backends.cudnn.rnn``
    (nn.RNNBase.flatten_parameters does on a GPU) shadows it on the instance. The setting is
    read from the class, as cuDNN reads it; a value written onto the submodule is not it."""
    setting = types.SimpleNamespace(fp32_precision="tf32")
    shaped_like_2_9 = type("CudnnModule", (types.ModuleType,), {"rnn": setting})
    cudnn = shaped_like_2_9("torch.backends.cudnn")
    cudnn.rnn = types.ModuleType("torch.backends.cudnn.rnn")  # what the import leaves
    cudnn.allow_tf32 = False  # the legacy read, which the shadow used to fall back to
    monkeypatch.setattr(common.torch.backends, "cudnn", cudnn)
    assert common.cudnn_rnn_setting() is setting
    assert common.cudnn_rnn_tf32() is True
    cudnn.rnn.fp32_precision = "ieee"  # lands on the submodule: cuDNN still uses TF32
    assert common.cudnn_rnn_tf32() is True
    setting.fp32_precision = "ieee"
    assert common.cudnn_rnn_tf32() is False


def test_the_rnn_setting_survives_importing_cudnns_rnn_submodule(fp32_precision_restored):
    """On this torch, after ``import torch.backends.cudnn.rnn`` (conftest imports it at the
    start): TF32 follows torch's own RNN setting, also with conv set apart (where the legacy
    flag raises). torch 2.9 read no setting there and raised."""
    import torch.backends.cudnn.rnn

    torch._C._set_fp32_precision_setter("cuda", "conv", "tf32")
    for rnn, want in (("ieee", False), ("tf32", True), ("ieee", False)):
        torch._C._set_fp32_precision_setter("cuda", "rnn", rnn)
        assert common.cudnn_rnn_tf32() is want, rnn
        assert common.cudnn_rnn_setting().fp32_precision == rnn

def test_tf32_gemm_windows_of_two_threads_do_not_interleave(fp32_precision_restored):
    """Autograd runs backward on one thread per GPU: two layers' TF32 windows (one wanting
    TF32, one strict fp32) must each see only their own setting throughout, and leave the
    process on the setting it had before."""
    import threading
    import time

    from fused_rnn.ops.common import tf32_gemms

    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "ieee"
    seen = {True: [], False: []}
    inside = threading.Event()

    def window(enabled):
        with tf32_gemms(enabled):
            inside.set()
            for _ in range(5):
                seen[enabled].append(matmul.fp32_precision)
                time.sleep(0.01)

    first = threading.Thread(target=window, args=(True,))
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=window, args=(False,))
    second.start()
    first.join(5)
    second.join(5)
    assert seen == {True: ["tf32"] * 5, False: ["ieee"] * 5}
    assert matmul.fp32_precision == "ieee"


@pytest.mark.parametrize("before", ["ieee", "tf32"])
def test_a_tf32_window_restores_the_setting_it_found(fp32_precision_restored, before):
    """On leaving, normally or by an exception, the process gets back the setting it had."""
    from fused_rnn.ops.common import tf32_gemms

    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = before
    for enabled in (True, False):
        with tf32_gemms(enabled):
            assert matmul.fp32_precision == ("tf32" if enabled else "ieee")
        assert matmul.fp32_precision == before
        with pytest.raises(KeyError), tf32_gemms(enabled):
            raise KeyError
        assert matmul.fp32_precision == before


def _package_locks():
    """Every lock held in a module global of fused_rnn, by "module.name"."""
    import importlib
    import pkgutil

    from fused_rnn.ops.common import ForkSafeLock

    locks = {}
    for info in pkgutil.walk_packages(fused_rnn.__path__, "fused_rnn."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        for name, value in vars(module).items():
            if isinstance(value, ForkSafeLock) or "lock" in type(value).__name__.lower():
                locks[f"{info.name}.{name}"] = value
    return locks


def test_every_lock_of_the_package_is_renewed_in_a_forked_child():
    """A plain threading.Lock in a module global would be copied into a forked child (a
    DataLoader worker) held, if another thread of the parent held it, and the child would wait
    forever (the CUDA loader's lock, held across a JIT build of minutes, was one)."""
    from fused_rnn.ops.common import ForkSafeLock

    locks = _package_locks()
    assert {"fused_rnn.ops.common._tf32_lock", "fused_rnn.ops.cuda._ext._lock",
            "fused_rnn.backends._warned_lock",
            "fused_rnn.ops.cuda.profile._active_lock"} <= set(locks)
    plain = sorted(name for name, lock in locks.items() if not isinstance(lock, ForkSafeLock))
    assert plain == [], f"module-level locks a forked child would inherit held: {plain}"


def _exit_code_of_a_forked(child) -> int | None:
    """The exit code of a child process forked to run ``child``; None where it hung (killed
    after 30 s)."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        return None
    return proc.exitcode


def _fork_while_another_thread_is_inside(block, child) -> int | None:
    """The exit code of a child forked (running ``child``) while another thread is inside
    ``block()``, a context manager; None where the child hung."""
    import threading

    held, release = threading.Event(), threading.Event()

    def hold():
        with block():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        return _exit_code_of_a_forked(child)
    finally:
        release.set()
        holder.join(5)


@pytest.mark.parametrize("name", ["fused_rnn.ops.common._tf32_lock",
                                  "fused_rnn.ops.cuda._ext._lock",
                                  "fused_rnn.backends._warned_lock"])
def test_a_child_forked_while_another_thread_holds_a_lock_can_take_it(name):
    """fork() copies a lock in the state another thread left it: held, by a thread the child
    does not have. The child gets a fresh lock instead of waiting forever."""
    import importlib

    module, attr = name.rsplit(".", 1)
    module = importlib.import_module(module)

    def child():
        with getattr(module, attr):
            pass

    code = _fork_while_another_thread_is_inside(lambda: getattr(module, attr), child)
    assert code == 0, f"the forked child hung on {name}"


@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_a_thread_that_forks_inside_a_lock_leaves_it_in_the_child(kind):
    """The child of a fork made inside the block leaves the block there: it releases the lock
    it entered (its copy), not the fresh one the fork put in its place, and can take that
    one afterwards."""
    import threading

    from fused_rnn.ops.common import ForkSafeLock

    lock = ForkSafeLock(getattr(threading, kind))
    pid = None
    try:
        with lock:
            pid = os.fork()
        if pid == 0:
            with lock:
                pass
            os._exit(0)
    except BaseException:
        if pid == 0:
            os._exit(1)
        raise
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child could not leave the block"
    with lock:  # and the parent's is free
        pass


def test_a_child_forked_inside_another_threads_tf32_window_can_open_its_own(
        fp32_precision_restored):
    """A child forked while another thread is inside a TF32 window: that thread is not in the
    child, so its window would never close. The child starts on the setting from before the
    window, and opens windows of its own."""
    from fused_rnn.ops import common

    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "tf32"

    def child():
        if matmul.fp32_precision != "tf32":
            os._exit(2)  # left on the other thread's window
        with common.tf32_gemms(False):
            if matmul.fp32_precision != "ieee":
                os._exit(3)
        os._exit(0 if matmul.fp32_precision == "tf32" else 4)

    code = _fork_while_another_thread_is_inside(lambda: common.tf32_gemms(False), child)
    assert code == 0, f"the forked child: exit code {code} (None: hung)"
    assert matmul.fp32_precision == "tf32"


def test_a_child_forked_inside_another_threads_nested_windows_gets_the_first_setting(
        fp32_precision_restored):
    """Nested windows on another thread at the fork (TF32 on, then off again inside): the
    child starts on the setting from before the outer one, with no window left open."""
    import contextlib

    from fused_rnn.ops import common

    # Nested windows must work first: a thread stuck in them here would hold the lock for
    # every later test of this process.
    assert _nested_windows_in_a_child() == 0, "nested windows fail: see the test of them"
    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "ieee"

    @contextlib.contextmanager
    def nested():
        with common.tf32_gemms(True), common.tf32_gemms(False):
            yield

    def child():
        os._exit(0 if matmul.fp32_precision == "ieee" and common._open_windows == [] else 2)

    code = _fork_while_another_thread_is_inside(nested, child)
    assert code == 0, f"the forked child: exit code {code} (None: hung)"
    assert matmul.fp32_precision == "ieee" and common._open_windows == []


def test_a_thread_that_forks_inside_its_own_window_closes_it_in_the_child(
        fp32_precision_restored):
    """The window is the forking thread's own: the child closes it where the block ends, as
    the parent does, and is left on the setting from before."""
    from fused_rnn.ops import common

    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "ieee"
    pid = None
    try:
        with common.tf32_gemms(True):
            pid = os.fork()
            if pid == 0 and (matmul.fp32_precision != "tf32" or len(common._open_windows) != 1):
                os._exit(2)
        if pid == 0:
            os._exit(0 if matmul.fp32_precision == "ieee" and common._open_windows == [] else 3)
    except BaseException:
        if pid == 0:
            os._exit(1)
        raise
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert matmul.fp32_precision == "ieee" and common._open_windows == []


def _nested_windows_in_a_child() -> int | None:
    """The exit code of a forked child that opens a TF32 window inside another on one thread,
    checks each setting, and then has another thread take the lock (and a re-entered
    ``ForkSafeLock(RLock)``): 0, 2 for a wrong setting, 3 for a lock left held, None where it
    hung on its own lock. In a child, so that a lock left held fails one test, not every later
    one."""
    import threading

    from fused_rnn.ops import common

    def child():
        matmul = torch.backends.cuda.matmul
        if getattr(matmul, "fp32_precision", None) is None:  # torch < 2.9
            matmul.allow_tf32 = False
        else:
            matmul.fp32_precision = "ieee"
        now = common.gemm_fp32_precision
        seen = []
        with common.tf32_gemms(True):
            seen.append(now())
            with common.tf32_gemms(False):
                seen.append(now())
            seen.append(now())
        seen.append(now())
        if seen != ["tf32", "ieee", "tf32", "ieee"]:
            os._exit(2)
        lock = common.ForkSafeLock(threading.RLock)
        with lock, lock:
            pass
        for held in (common._tf32_lock, lock):
            taken = []

            def take(h=held, taken=taken):
                taken.append(h._lock.acquire(timeout=5))
                if taken[-1]:
                    h._lock.release()

            t = threading.Thread(target=take)
            t.start()
            t.join(10)
            if taken != [True]:
                os._exit(3)
        os._exit(0)

    return _exit_code_of_a_forked(child)


def test_nested_windows_restore_in_order_and_free_the_lock():
    """A window inside another (one thread) sets and restores in order, without waiting on its
    own lock; afterwards another thread takes the lock at once. So does a re-entered RLock."""
    code = _nested_windows_in_a_child()
    assert code == 0, f"exit code {code}: 2 wrong settings, 3 a lock left held, None hung"


def test_threads_falling_back_at_once_warn_once(monkeypatch):
    """Eight threads hit the same fallback for the first time together, with a warning handler
    that takes a while (a logging handler, say): the warning is shown once, not eight times."""
    import threading
    import time

    fake = types.SimpleNamespace(unavailable_reason=lambda device: None,
                                 unsupported_reason=lambda kind, **config: "a threaded reason")
    monkeypatch.setattr(backends, "_kernel_module", lambda name: fake)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_fallbacks", {})
    shown = []

    def slow_show(message, *args, **kwargs):
        time.sleep(0.01)
        shown.append(str(message))

    monkeypatch.setattr(warnings, "showwarning", slow_show)
    lstm = fused_rnn.LSTM(4, 6, backend="triton")
    x = torch.randn(3, 2, 4)
    go = threading.Barrier(8)
    errors = []

    def call():
        try:
            go.wait(5)
            with torch.no_grad():
                lstm(x)
        except Exception as e:
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = slow_show
        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []
    assert len([m for m in shown if "a threaded reason" in m]) == 1, shown


# ------------------------------------------------------------ torch.func on auto
_MODULES = {"LSTM": (fused_rnn.LSTM, torch.nn.LSTM), "GRU": (fused_rnn.GRU, torch.nn.GRU),
            "RNN": (fused_rnn.RNN, torch.nn.RNN), "LSTMCell": (fused_rnn.LSTMCell, torch.nn.LSTMCell),
            "GRUCell": (fused_rnn.GRUCell, torch.nn.GRUCell),
            "RNNCell": (fused_rnn.RNNCell, torch.nn.RNNCell)}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _transform(name, f, x):
    from torch.func import grad, jacfwd, jvp, vmap

    batch_dim = 0 if x.dim() == 2 else 1  # a cell's batch is dim 0, a layer's dim 1 (time-major)
    if name == "vmap":
        return vmap(f, in_dims=batch_dim, out_dims=batch_dim)(x)
    if name == "vmap(grad)":  # per-sample gradients
        return vmap(grad(lambda x: f(x).pow(2).sum()), in_dims=batch_dim, out_dims=batch_dim)(x)
    if name == "jvp":
        return jvp(f, (x,), (torch.ones_like(x),))[1]
    if name == "jacfwd":
        return jacfwd(f)(x)
    if name == "dual_level":
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            return fwAD.unpack_dual(f(fwAD.make_dual(x, torch.ones_like(x)))).tangent
    raise AssertionError(name)


@pytest.mark.parametrize("transform", ["vmap", "vmap(grad)", "jvp", "jacfwd", "dual_level"])
@pytest.mark.parametrize("kind", list(_MODULES))
def test_auto_runs_the_reference_where_pytorch_kernels_fail(kind, transform):
    """Inside vmap and forward-mode AD PyTorch's RNN kernels fail (torch.nn's modules with
    them: no batching rule, no forward-mode rule for oneDNN's LSTM, a shape error in its GRU/RNN
    cells under vmap(grad)); ``auto`` runs the reference there, to the reference's results,
    and ``torch`` still runs PyTorch's kernels as asked."""
    ours_cls, _ = _MODULES[kind]
    torch.manual_seed(0)
    ours = ours_cls(3, 4)
    ref = ours_cls(3, 4, backend="reference")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3) if kind.endswith("Cell") else torch.randn(2, 2, 3)
    got = _transform(transform, lambda x: _first(ours(x)), x)
    want = _transform(transform, lambda x: _first(ref(x)), x)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transform", ["vmap", "vmap(grad)", "jvp", "jacfwd", "dual_level"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_functional_cell_on_auto_runs_the_reference_where_pytorch_kernels_fail(mode, transform):
    """``fused_rnn.functional.rnn_cell`` on ``auto`` decides as the cell modules do: inside vmap
    and forward-mode AD the reference, where torch._VF's cells fail (it called them there,
    whatever the transform: per-sample gradients of a functional cell failed)."""
    from fused_rnn import functional

    G = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[mode]
    torch.manual_seed(0)
    w_ih, w_hh, b_ih, b_hh = (torch.randn(*s) for s in ((G * 4, 3), (G * 4, 4), (G * 4,), (G * 4,)))
    h, c = torch.randn(2, 4), (torch.randn(2, 4) if mode == "LSTM" else None)

    def cell(backend):
        return lambda x: functional.rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh,
                                             backend=backend)[0]

    def run(f):
        from torch.func import grad, vmap

        xs = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1))
        if transform == "vmap":  # an ensemble of inputs, as per-sample work does
            return vmap(f)(xs)
        if transform == "vmap(grad)":  # per-sample gradients
            return vmap(grad(lambda x: f(x).pow(2).sum()))(xs)
        return _transform(transform, f, xs[0])

    got, want = run(cell("auto")), run(cell("reference"))
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("transform", ["vmap", "vmap(grad)", "jvp", "jacfwd", "dual_level"])
@pytest.mark.parametrize("kind", list(_MODULES))
def test_the_reference_runs_transforms_in_16_bits(kind, transform, dtype):
    """In 16 bits the reference rounds as a kernel does through two autograd.Functions, which
    had no vmap rule and no jvp: ``auto`` (and ``reference``) failed inside every transform
    in bf16 and fp16, where fp32 worked. Each now gives the fp32 result, to 16-bit accuracy."""
    ours_cls, _ = _MODULES[kind]
    torch.manual_seed(0)
    wide = ours_cls(3, 4)
    ours = ours_cls(3, 4).to(dtype)
    ours.load_state_dict(wide.state_dict())
    x = torch.randn(2, 3) if kind.endswith("Cell") else torch.randn(2, 2, 3)
    got = _transform(transform, lambda x: _first(ours(x)), x.to(dtype))
    want = _transform(transform, lambda x: _first(wide(x)), x)
    assert got.dtype == dtype and want.abs().max() > 0
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("kind,transform,error", [
    ("LSTM", "vmap", "Batching rule not implemented"),
    ("GRU", "vmap(grad)", "doesn't match the broadcast shape"),
    ("GRUCell", "vmap(grad)", "doesn't match the broadcast shape"),
    ("LSTM", "jvp", "forward AD"),
])
def test_torch_backend_and_torch_nn_fail_alike(kind, transform, error):
    ours_cls, nn_cls = _MODULES[kind]
    x = torch.randn(2, 3) if kind.endswith("Cell") else torch.randn(2, 2, 3)
    for module in (nn_cls(3, 4), ours_cls(3, 4, backend="torch")):
        with pytest.raises(RuntimeError, match=error):
            _transform(transform, lambda x, m=module: _first(m(x)), x)


def test_backward_mode_transforms_keep_pytorch_kernels():
    """grad and jacrev work with PyTorch's kernels: ``auto`` keeps them, torch.nn's bits."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    nn_lstm = torch.nn.LSTM(3, 4, 2)
    ours = fused_rnn.LSTM(3, 4, 2)
    ours.load_state_dict(nn_lstm.state_dict())
    x = torch.randn(5, 2, 3)
    params = {k: p.detach() for k, p in ours.named_parameters()}
    got = grad(lambda p: functional_call(ours, p, (x,))[0].sin().sum())(params)
    want = grad(lambda p: functional_call(nn_lstm, p, (x,))[0].sin().sum())(params)
    for k in params:
        assert torch.equal(got[k], want[k]), k


def test_torch_kernels_reason_names_the_transform():
    from torch.func import grad, jvp, vmap

    seen = {}

    def probe(key):
        def f(x):
            seen[key] = backends.torch_kernels_reason()
            return x.sum()
        return f

    assert backends.torch_kernels_reason() is None
    vmap(probe("vmap"))(torch.ones(2, 2))
    vmap(grad(probe("vmap(grad)")))(torch.ones(2, 2))
    grad(probe("grad"))(torch.ones(2))
    jvp(probe("jvp"), (torch.ones(2),), (torch.ones(2),))
    assert "vmap" in seen["vmap"] and "vmap" in seen["vmap(grad)"]
    assert "forward-mode" in seen["jvp"] and seen["grad"] is None


def test_a_refused_16_bit_gemm_is_promoted_with_one_warning(monkeypatch):
    """Where torch.mm(..., out_dtype=) raises (common.mm_f32: a cuBLAS layout it does not take, on
    some torch), that GEMM runs on promoted operands, the same products, and the first refusal is
    said once, with torch's message."""
    monkeypatch.setattr(common, "sixteen_bit_gemm", lambda a, b: True)
    monkeypatch.setattr(common, "mm_refused", None)
    calls = []

    def refusing_mm(*args, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(torch, "mm", refusing_mm)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g).bfloat16(), torch.randn(5, 3, generator=g).bfloat16()
    with pytest.warns(RuntimeWarning, match="refused .*CUBLAS_STATUS_NOT_SUPPORTED"):
        got = common.mm_f32(a, b, torch.float32)
    assert torch.equal(got, a.float() @ b.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(common.mm_f32(a, b, torch.float32), got)
    assert calls == [torch.float32, torch.float32]


def test_mm_f32_without_sixteen_bit_never_asks_for_out_dtype(monkeypatch):
    """``sixteen_bit=False`` (FUSED_RNN_CUDA_GEMMS=fp32) promotes even where the 16-bit GEMM
    could run."""
    monkeypatch.setattr(common, "sixteen_bit_gemm", lambda a, b: True)
    monkeypatch.setattr(torch, "mm", lambda *a, **k: pytest.fail("torch.mm was called"))
    a, b = torch.ones(2, 3, dtype=torch.float16), torch.ones(3, 4, dtype=torch.float16)
    assert torch.equal(common.mm_f32(a, b, torch.float32, sixteen_bit=False),
                       torch.full((2, 4), 3.0))


def test_cuda_path_rules_route_each_call_by_every_range(monkeypatch):
    """ops.cuda_path under FUSED_RNN_CUDA_PATH=auto: ``step`` where any rule of PATH_RULES
    matches (ends of its ranges included: they are measured shapes), else ``persistent``; a set
    path wins over the rules. No extension needed: the device's capability is given."""
    from fused_rnn.ops.cuda import ops

    def rule(mode, dtype, batch, hidden, **kw):
        return ops.PathRule(modes=frozenset({mode}), dtypes=frozenset({dtype}), batch=batch,
                            hidden=hidden, steps=kw.pop("steps", (64, 1024)),
                            capability=(9, 0), evidence="a test", **kw)

    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(ops, "PATH_RULES", (
        rule("GRU", torch.bfloat16, (64, 256), (1024, 1024)),
        rule("LSTM", torch.float32, (128, 256), (512, 1024), tf32=True)))
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "auto")
    cpu = torch.device("cpu")

    def path(mode="LSTM", dtype=torch.float32, B=256, H=1024, T=128, tf32=True):
        return ops.cuda_path(mode, dtype, B, H, T, cpu, tf32)

    assert path() == "step" and path(B=128, H=512, T=64) == "step" and path(T=1024) == "step"
    assert path(B=127) == path(H=511) == path(B=257) == path(T=63) == "persistent"
    assert path(tf32=False) == "persistent"  # measured against TF32 cuDNN
    assert path("GRU", torch.bfloat16, B=64) == path("GRU", torch.bfloat16) == "step"
    assert path("GRU", torch.bfloat16, H=512) == path("GRU") == "persistent"
    assert path("RNN_TANH") == path(dtype=torch.bfloat16) == "persistent"
    monkeypatch.setattr(ops, "_capability", lambda device: (8, 0))
    assert path() == "persistent"
    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "persistent")
    assert path() == "persistent"
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "step")
    assert path(B=1) == "step"


def test_stage_copy_rules_choose_the_tagged_exchange_by_every_range(monkeypatch):
    """ops.stage_copy under FUSED_RNN_CUDA_STAGE_COPY=auto (the default): tagged where any rule
    of STAGE_COPY_RULES matches the call (ends of its ranges included), else pipelined; a set
    copy wins over the rules; a rule holds only for 16-bit layers. No extension needed: the
    device's capability is given."""
    from fused_rnn.ops.cuda import ops

    tagged, pipelined = ops.STAGE_COPIES["tagged"], ops.STAGE_COPIES["pipelined"]
    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    monkeypatch.delenv("FUSED_RNN_CUDA_STAGE_COPY", raising=False)
    cpu = torch.device("cpu")

    def copy(mode="GRU", dtype=torch.bfloat16, B=64, H=256, T=128):
        return ops.stage_copy(mode, dtype, B, H, T, cpu)

    monkeypatch.setattr(ops, "STAGE_COPY_RULES", ())
    assert ops.stage_copy_setting() == "auto" and copy() == pipelined
    monkeypatch.setattr(ops, "STAGE_COPY_RULES", (
        ops.StageCopyRule(modes=frozenset({"GRU"}), dtypes=frozenset({torch.bfloat16}),
                          batch=(8, 128), hidden=(256, 512), steps=(64, 256), capability=(9, 0),
                          evidence="a test"),))
    assert copy() == copy(B=8, H=512, T=64) == copy(B=128, T=256) == tagged
    assert copy(B=7) == copy(B=129) == copy(H=255) == copy(H=513) == pipelined
    assert copy(T=63) == copy(T=257) == copy("LSTM") == copy(dtype=torch.float16) == pipelined
    assert copy(dtype=torch.float32) == pipelined
    monkeypatch.setattr(ops, "_capability", lambda device: (8, 0))
    assert copy() == pipelined  # measured on another kind of GPU
    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    for setting in ("registers", "async", "pipelined"):
        monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_COPY", setting)
        assert copy() == ops.STAGE_COPIES[setting]
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_COPY", "tagged")
    assert copy(B=1) == tagged
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_COPY", "fast")
    with pytest.raises(ValueError, match="must be one of auto, registers, async, pipelined, "
                                         "tagged, got 'fast'"):
        copy()
    with pytest.raises(ValueError, match="a StageCopyRule's dtypes are float16 and bfloat16"):
        ops.StageCopyRule(modes=frozenset({"GRU"}), dtypes=frozenset({torch.float32}),
                          batch=(1, 2), hidden=(1, 2), steps=(1, 2), capability=(9, 0),
                          evidence="a test")
    with pytest.raises(ValueError, match="a StageCopyRule needs its evidence"):
        ops.StageCopyRule(modes=frozenset({"GRU"}), dtypes=frozenset({torch.float16}),
                          batch=(1, 2), hidden=(1, 2), steps=(1, 2), capability=(9, 0),
                          evidence="")


def test_a_recording_left_by_an_exception_is_closed():
    """profile.recording() closes when its block raises: launches after it get no profiling
    buffer (a recording left open would instrument every later launch). No extension needed:
    buffer() is plain Python."""
    from fused_rnn.ops.cuda import profile

    args = ("fwd", "LSTM", torch.float32, 4, 2, 8, torch.device("cpu"))
    with pytest.raises(KeyError), profile.recording() as launches:
        assert profile.buffer(*args) is not None and len(launches) == 1
        raise KeyError("inside")
    assert profile._active == [] and profile.buffer(*args) is None
    with profile.recording() as outer:
        with pytest.raises(KeyError), profile.recording() as inner:
            profile.buffer(*args)
            raise KeyError("inside")
        profile.buffer(*args)
    assert (len(outer), len(inner), profile._active) == (1, 1, [])
