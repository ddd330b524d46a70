"""The ``torch`` backend's per-layer LSTM op on the CPU (fused_rnn/ops/aten_cpu.py): aten's
oneDNN kernels as registered ops, used under torch.compile, where they must give eager
nn.LSTM's results bit for bit and keep the sequence length symbolic."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import fused_rnn
from fused_rnn import backends
from fused_rnn.ops import aten_cpu, reference

pytestmark = pytest.mark.skipif(
    aten_cpu.unsupported_reason("LSTM", torch.zeros(1), None, None) is not None,
    reason="PyTorch's oneDNN backend is unavailable or disabled here",
)


# oneDNN has no bf16 on an x86 CPU without AVX-512 or AVX2-VNNI-2 (AMD's Zen 3, say): there
# eager nn.LSTM runs bf16 through its native math, the op is refused (the reference runs), and
# nn.LSTM fails under CPU autocast (oneDNN's primitive is not created).
_NO_ONEDNN_BF16 = aten_cpu.unsupported_reason("LSTM", torch.zeros(1, dtype=torch.bfloat16),
                                              None, None)


def _needs_onednn(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and _NO_ONEDNN_BF16:
        pytest.skip(f"{_NO_ONEDNN_BF16}: oneDNN's bf16 kernel cannot run here "
                    "(test_without_onednn_bf16_the_reference_runs checks what runs instead)")


@contextlib.contextmanager
def _op_kept_in_fullgraph():
    """Before torch 2.10, fullgraph=True keeps the training op (its workspace's size is
    data-dependent) only with capture_dynamic_output_shape_ops, and without it a compiled
    layer that trains runs the reference math (aten_cpu._FULLGRAPH_HOLDS_DYNAMIC_SIZES)."""
    if aten_cpu._FULLGRAPH_HOLDS_DYNAMIC_SIZES:
        yield
        return
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        yield


def _layer_inputs(T, B, I, H, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.5):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()

    return [r(T, B, I), r(B, H), r(B, H), r(4 * H, I), r(4 * H, H),
            r(4 * H) if bias else None, r(4 * H) if bias else None]


def _run(layer, inputs, reverse, cot):
    y, h, c = layer("LSTM", *inputs, None, None, reverse)
    loss = sum((o.float() * g).sum() for o, g in zip((y, h, c), cot))
    present = [t for t in inputs if t is not None]
    return [y, h, c], list(torch.autograd.grad(loss, present))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_layer_is_eager_nn_lstm_bit_for_bit(dtype, bias, reverse):
    """Same kernels, same arguments: eager nn.LSTM's direction (forward, or the reverse one of
    a bidirectional LSTM) gives the same bits, outputs and every gradient."""
    _needs_onednn(dtype)
    T, B, I, H = 6, 3, 5, 7
    inputs = _layer_inputs(T, B, I, H, dtype, bias)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(T, B, H, generator=g), torch.randn(B, H, generator=g),
           torch.randn(B, H, generator=g)]
    outs, grads = _run(aten_cpu.rnn_layer, inputs, reverse, cot)

    nn_lstm = torch.nn.LSTM(I, H, bias=bias, bidirectional=reverse).to(dtype)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs
    suffix = "_reverse" if reverse else ""
    d = 1 if reverse else 0
    with torch.no_grad():
        for name, t in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih),
                        ("bias_hh", b_hh)):
            if t is not None:
                getattr(nn_lstm, f"{name}_l0{suffix}").copy_(t)
    hx = torch.zeros(2 if reverse else 1, B, H, dtype=dtype)
    cx = torch.zeros_like(hx)
    hx[d], cx[d] = h0.detach(), c0.detach()
    hx.requires_grad_(), cx.requires_grad_()
    xr = x.detach().requires_grad_()
    y, (h_n, c_n) = nn_lstm(xr, (hx, cx))
    y = y[..., d * H:(d + 1) * H]
    loss = sum((o.float() * g).sum() for o, g in zip((y, h_n[d], c_n[d]), cot))
    loss.backward()
    params = [getattr(nn_lstm, f"{n}_l0{suffix}") for n in ("weight_ih", "weight_hh")]
    if bias:
        params += [getattr(nn_lstm, f"{n}_l0{suffix}") for n in ("bias_ih", "bias_hh")]
    want_outs = [y, h_n[d], c_n[d]]
    want_grads = [xr.grad, hx.grad[d], cx.grad[d]] + [p.grad for p in params]
    for a, b in zip(outs + grads, want_outs + want_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)

    # And against the reference math: the same function, to rounding.
    r_outs, r_grads = _run(reference.rnn_layer, inputs, reverse, cot)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    for a, b in zip(outs + grads, r_outs + r_grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_unsupported_reasons():
    x = torch.zeros(2, 1, 3)
    assert aten_cpu.unsupported_reason("LSTM", x, None, None) is None
    assert "GRU" in aten_cpu.unsupported_reason("GRU", x, None, None)
    assert "float64" in aten_cpu.unsupported_reason("LSTM", x.double(), None, None)
    assert "projection" in aten_cpu.unsupported_reason("LSTM", x, torch.zeros(2, 4), None)
    assert "lengths" in aten_cpu.unsupported_reason("LSTM", x, None, torch.tensor([2]))
    assert "meta" in aten_cpu.unsupported_reason("LSTM", x.to("meta"), None, None)


@pytest.mark.parametrize("test_utils", ["test_schema", "test_autograd_registration",
                                        "test_faketensor"])
def test_opcheck(test_utils):
    """opcheck's aot_dispatch tests compare every output of two runs, and the workspace's
    bytes are the kernel's scratch (not all written, different each run); its size is only
    known at run time. The compiled tests below check that path on the real outputs.

    The backward skips test_schema: aten's backward kernel writes scratch into the workspace
    it is given (so does eager nn.LSTM's). Declaring it mutated would copy it (tens of MB per
    layer) on every backward; instead test_backward_twice_gives_the_same_gradients shows the
    writes do not change what a second backward computes."""
    inputs = _layer_inputs(4, 3, 5, 6, torch.float32)
    for train in (True, False):
        torch.library.opcheck(torch.ops.fused_rnn.aten_lstm_layer.default,
                              (*inputs, False, train), test_utils=test_utils)
    if test_utils == "test_schema":
        return
    with torch.no_grad():
        y, h, c, ws = aten_cpu.aten_lstm_layer(*inputs, False, True)
    detached = [t.detach() for t in inputs]
    torch.library.opcheck(
        torch.ops.fused_rnn.aten_lstm_layer_backward.default,
        (*detached, False, y, h, c, ws, torch.randn_like(y), torch.randn_like(h),
         torch.randn_like(c)),
        test_utils=test_utils,
    )


def test_backward_twice_gives_the_same_gradients():
    """retain_graph: the second backward reads the workspace the first one wrote scratch into."""
    inputs = _layer_inputs(5, 3, 4, 6, torch.float32)
    y, h, c = aten_cpu.rnn_layer("LSTM", *inputs)
    g = [torch.randn_like(t) for t in (y, h, c)]
    first = torch.autograd.grad((y, h, c), inputs, g, retain_graph=True)
    second = torch.autograd.grad((y, h, c), inputs, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_torch_runs_per_layer_under_compile_on_the_cpu_only(monkeypatch):
    cpu = torch.device("cpu")
    assert not backends.torch_runs_per_layer(cpu)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert backends.resolve_stack("auto", cpu) == "torch"
    assert backends.torch_runs_per_layer(cpu)
    # inductor keeps cuDNN's RNN as an extern kernel, so on a GPU the stack stays whole
    assert backends.resolve_stack("auto", torch.device("cuda")) == "torch"
    assert not backends.torch_runs_per_layer(torch.device("cuda"))


def _loss_and_grads(fn, model, x, state):
    model.zero_grad()
    x = x.detach().requires_grad_()
    y, (h, c) = fn(x, state)
    loss = (y * 1.5).sin().sum() + (h * 2).cos().sum() + (c * 3).sin().sum()
    loss.backward()
    return [y, h, c, x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.no_nan_fill
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compiled_module_is_eager_nn_lstm_bit_for_bit(backend):
    """torch.compile(fullgraph=True) of a 2-layer bidirectional batch-first LSTM runs each
    layer through the op: eager nn.LSTM's bits, outputs and gradients."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
    ours = fused_rnn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True,
                          backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 5)
    state = (torch.randn(4, 3, 7), torch.randn(4, 3, 7))
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    with _op_kept_in_fullgraph():
        got = _loss_and_grads(compiled, ours, x, state)
    want = _loss_and_grads(ref, ref, x, state)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _two_layer_pair_compiled():
    """nn.LSTM(4, 6, 2), ours with its weights, and ours compiled (fullgraph, dynamic)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 6, num_layers=2)
    ours = fused_rnn.LSTM(4, 6, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    torch._dynamo.reset()
    return ref, ours, torch.compile(ours, fullgraph=True, dynamic=True)


@pytest.mark.no_nan_fill
def test_compiled_dynamic_sequence_length_and_dropout():
    """What inductor's own lowering of aten's CPU LSTM fails on (torch 2.13): a symbolic
    sequence length and dropout between layers (and autocast: the next test)."""
    ref, ours, compiled = _two_layer_pair_compiled()
    for T in (3, 8):
        x = torch.randn(T, 2, 4)
        state = (torch.zeros(2, 2, 6), torch.zeros(2, 2, 6))
        with _op_kept_in_fullgraph():
            got = _loss_and_grads(compiled, ours, x, state)
        for a, b in zip(got, _loss_and_grads(ref, ref, x, state)):
            assert torch.equal(a, b)

    # Dropout in training: nn.LSTM's masks and scale from the same seed (inductor's random
    # ops falling back to eager's draws), and different from eval.
    ref_dropped = torch.nn.LSTM(4, 6, num_layers=2, dropout=0.5).train()
    dropped = fused_rnn.LSTM(4, 6, num_layers=2, dropout=0.5).train()
    dropped.load_state_dict(ref_dropped.state_dict())
    x = torch.randn(5, 2, 4)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True), _op_kept_in_fullgraph():
        compiled_dropped = torch.compile(dropped, fullgraph=True)
        torch.manual_seed(3)
        y, _ = compiled_dropped(x)
    torch.manual_seed(3)
    assert torch.equal(y, ref_dropped(x)[0])
    assert not torch.equal(y, ref_dropped.eval()(x)[0])
    y.sum().backward()
    assert all(p.grad is not None for p in dropped.parameters())


@pytest.mark.no_nan_fill
def test_compiled_under_autocast_is_eager_nn_lstms_bits():
    """The third thing inductor's lowering fails on. Under autocast the op gets bf16: eager
    nn.LSTM's bits where oneDNN takes bf16."""
    _needs_onednn(torch.bfloat16)
    ref, _, compiled = _two_layer_pair_compiled()
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), _op_kept_in_fullgraph():
        got, want = compiled(x), ref(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    torch._dynamo.reset()


@pytest.mark.no_nan_fill
def test_without_onednn_bf16_the_reference_runs(monkeypatch):
    """Where oneDNN has no bf16 (as aten's own check says; forced here on any CPU), a bf16 layer
    is refused by the op with that reason, and a compiled bf16 LSTM, under autocast or on bf16
    weights, runs the reference math instead: no op in the graph, and eager's values (PyTorch's
    own bf16 LSTM) within bf16 rounding, where the op would fail to create oneDNN's primitive
    (as nn.LSTM does under autocast there)."""
    monkeypatch.setattr(aten_cpu, "_onednn_bf16", lambda: False)
    why = aten_cpu.unsupported_reason("LSTM", torch.zeros(1, dtype=torch.bfloat16), None, None)
    assert why is not None and "no bf16 on this CPU" in why
    assert aten_cpu.unsupported_reason("LSTM", torch.zeros(1), None, None) is None  # fp32 is
    inputs = [t.detach() for t in _layer_inputs(4, 2, 3, 5, torch.bfloat16)]
    with pytest.raises(RuntimeError, match="no bf16 on this CPU"):
        aten_cpu.aten_lstm_layer(*inputs, False, False)
    torch.manual_seed(0)
    ours = fused_rnn.LSTM(4, 6, num_layers=2)
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    x = torch.randn(5, 2, 4)
    for autocast in (True, False):
        model = ours if autocast else ours.bfloat16()
        xin = x if autocast else x.bfloat16()
        torch._dynamo.reset()
        targets.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = torch.utils._pytree.tree_leaves(
                torch.compile(model, backend=record, fullgraph=True)(xin))
            want = torch.utils._pytree.tree_leaves(model(xin))  # eager: PyTorch's kernel
        assert targets and not any("aten_lstm_layer" in t for t in targets), targets
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype == torch.bfloat16
            # two bf16 computations (fp32 sums rounded once; aten's, rounded per op): to
            # bf16's epsilon at the outputs' scale (measured: 6e-4 apart at most)
            torch.testing.assert_close(a, b, atol=2**-8, rtol=1.6e-2)
    torch._dynamo.reset()


def test_the_op_under_autocast_casts_its_inputs_and_runs_with_autocast_off():
    """The op had no autocast rule: torch's CPU autocast cast inside it, at oneDNN's op, so it
    returned bf16 where its fake kernel said fp32, and a compiled call returned another dtype
    than the eager one. It now casts its inputs as the kernel backends' ops do: the bits of the
    call on bf16 inputs, eager and compiled alike."""
    _needs_onednn(torch.bfloat16)
    inputs = [t.detach() for t in _layer_inputs(4, 2, 3, 5, torch.float32)]
    want = aten_cpu.aten_lstm_layer(*(t.bfloat16() for t in inputs), False, False)[:3]
    compiled = torch.compile(torch.ops.fused_rnn.aten_lstm_layer, fullgraph=True,
                             backend="aot_eager")
    torch._dynamo.reset()
    try:
        for call in (aten_cpu.aten_lstm_layer, compiled):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = call(*inputs, False, False)[:3]
            for a, b in zip(got, want):
                assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    finally:
        torch._dynamo.reset()


@pytest.mark.no_nan_fill
def test_a_compiled_bidirectional_layer_under_autocast_is_eager_nn_lstms_bits():
    """Each direction's layer call cast x to the autocast dtype itself, so x's gradient summed
    the two directions' in fp32, where nn.LSTM casts x once and sums them in bf16: x.grad
    differed in the last bits. The stack casts once now (fused_rnn.functional.rnn). (Under
    inductor, which skips intermediate bf16 roundings unless
    torch._inductor.config.emulate_precision_casts, that sum can still round otherwise.)"""
    _needs_onednn(torch.bfloat16)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 6, bidirectional=True)
    ours = fused_rnn.LSTM(4, 6, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    torch._dynamo.reset()
    try:
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        x = torch.randn(5, 3, 4)
        state = (torch.randn(2, 3, 6), torch.randn(2, 3, 6))
        with torch.autocast("cpu", dtype=torch.bfloat16), _op_kept_in_fullgraph():
            got = _loss_and_grads(compiled, ours, x, state)
            want = _loss_and_grads(ref, ref, x, state)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and torch.equal(a, b), i
    finally:
        torch._dynamo.reset()


@pytest.mark.no_nan_fill
def test_compiled_inference_is_eager_nn_lstm_bit_for_bit():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 6, 2).eval()
    ours = fused_rnn.LSTM(4, 6, 2).eval()
    ours.load_state_dict(ref.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, dynamic=True)
    for T in (3, 7):
        x = torch.randn(T, 2, 4)
        with torch.no_grad():
            got, want = compiled(x), ref(x)
        for a, b in zip(torch.utils._pytree.tree_leaves(got),
                        torch.utils._pytree.tree_leaves(want)):
            assert torch.equal(a, b)


def test_inference_keeps_no_workspace_and_each_kind_is_eager_nn_lstms():
    """oneDNN's inference and training kernels can differ by an ulp (fp32 on an AVX2 CPU; on a
    Sapphire Rapids Xeon they agree). Eager nn.LSTM runs the training kernel whenever grad mode
    is on, whether or not anything requires grad, so rnn_layer does too, and each kind matches
    nn.LSTM in its grad mode."""
    inputs = _layer_inputs(4, 3, 5, 6, torch.float32)
    with torch.no_grad():
        y, h, c, ws = aten_cpu.aten_lstm_layer(*inputs, False, False)
    y_t, h_t, c_t, ws_t = aten_cpu.aten_lstm_layer(*inputs, False, True)
    assert ws.numel() == 0 and ws_t.numel() > 0
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (t.detach() for t in inputs)
    nn_lstm = torch.nn.LSTM(5, 6).requires_grad_(False)
    for p, t in zip(nn_lstm.parameters(), (w_ih, w_hh, b_ih, b_hh), strict=True):
        p.copy_(t)
    state = (h0[None], c0[None])
    with torch.no_grad():
        want = nn_lstm(x, state)
    want_t = nn_lstm(x, state)  # grad mode on, nothing requiring grad: the training kernel
    for got, (yw, (hw, cw)) in (((y, h, c), want), ((y_t, h_t, c_t), want_t)):
        for a, b in zip(got, (yw, hw[0], cw[0]), strict=True):
            assert torch.equal(a, b)
    for grad_mode, kind in ((False, want), (True, want_t)):  # rnn_layer's choice of kernel
        with torch.set_grad_enabled(grad_mode):
            y_r = aten_cpu.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh, b_ih, b_hh)[0]
        assert torch.equal(y_r, kind[0])
    with pytest.raises(RuntimeError, match="train=False"):
        out = aten_cpu.aten_lstm_layer(*inputs, False, False)
        out[0].sum().backward()


def test_eager_functional_stays_on_the_reference():
    """Outside torch.compile the op is not used at the layer level: eager calls keep the
    differentiable reference (double backward works, as with eager nn.LSTM), and modules hand
    whole stacks to aten."""
    from fused_rnn import functional

    inputs = _layer_inputs(3, 2, 4, 5, torch.float32)
    y, _, _ = functional.rnn_layer("LSTM", *inputs, backend="torch")
    assert "aten_lstm_layer" not in type(y.grad_fn).__name__
    (gx,) = torch.autograd.grad(y.pow(2).sum(), inputs[0], create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), inputs[0])
    assert torch.isfinite(ggx).all()


def test_double_backward_is_refused_clearly():
    inputs = _layer_inputs(3, 2, 4, 5, torch.float32)
    y, _, _ = aten_cpu.rnn_layer("LSTM", *inputs)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), inputs[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward.*'torch'"):
        torch.autograd.grad(gx.sum(), inputs[0])


def test_without_fullgraph_the_layer_op_breaks_the_graph_as_documented():
    """The workspace's size is oneDNN's (data-dependent for the compiler): a plain compile
    breaks the graph at the op, with eager's results; capturing dynamic output shapes (which
    fullgraph=True does, from torch 2.10) keeps it in. Before torch 2.10, without that
    setting, the layer runs the reference math instead (fullgraph=True would fail at the op):
    no break, results within rounding. The README says so; this pins it."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    lstm = fused_rnn.LSTM(4, 6)
    x = torch.randn(5, 2, 4)
    want = lstm(x)[0]
    holds = aten_cpu._FULLGRAPH_HOLDS_DYNAMIC_SIZES
    for capture, breaks in [(False, 1 if holds else 0), (True, 0)]:
        # torch's own patch, which restores by setting. Once (CI at d564500) a later
        # torch.export on the same worker found this entry hidden ("... does not exist"),
        # which only a delete of it does; the cause was not found (NOTES, sixteenth session).
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture):
            torch._dynamo.reset()
            counters.clear()
            got = torch.compile(lstm, backend="eager")(x)[0]
        if capture or holds:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want)
        reasons = [r for r in counters["graph_break"] if "aten_lstm_layer" in r]
        assert len(reasons) == breaks, dict(counters["graph_break"])
    torch._dynamo.reset()



@pytest.mark.no_nan_fill
@pytest.mark.parametrize("capture", [False, True])
def test_before_torch_2_10_a_training_layer_compiles_without_the_op(monkeypatch, capture):
    """Before torch 2.10, fullgraph=True refuses the training op's data-dependent workspace
    unless capture_dynamic_output_shape_ops is on (on torch 2.6 it failed at the op). There,
    as this torch is made to look, a compiled layer that trains runs the reference math
    (within rounding of eager); with the setting on, the op (eager's bits). Inference always
    takes the op: its workspace is empty."""
    monkeypatch.setattr(aten_cpu, "_FULLGRAPH_HOLDS_DYNAMIC_SIZES", False)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 6)
    ours = fused_rnn.LSTM(4, 6)
    ours.load_state_dict(ref.state_dict())
    x, state = torch.randn(5, 2, 4), (torch.randn(1, 2, 6), torch.randn(1, 2, 6))
    targets = []

    calls = []  # each aten_lstm_layer node's train flag

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        calls.extend(n.args[-1] for n in gm.graph.nodes
                     if n.op == "call_function" and "aten_lstm_layer" in str(n.target))
        return gm

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture):
        compiled = torch.compile(ours, backend=record, fullgraph=True)
        got = _loss_and_grads(compiled, ours, x, state)
        assert any("aten_lstm_layer" in t for t in targets) == capture, targets
        want = _loss_and_grads(ref, ref, x, state)
        for a, b in zip(got, want, strict=True):
            if capture:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b)
        targets.clear()
        with torch.no_grad():
            y = compiled(x, state)[0]
            assert torch.equal(y, ref(x, state)[0])  # each in inference (test above)
        assert any("aten_lstm_layer" in t for t in targets), targets
        # Grad mode on, nothing requiring grad: eager runs the training kernel, but without the
        # setting its workspace cannot be held, and nothing needs it: the inference kernel.
        calls.clear()
        frozen = copy.deepcopy(ours).requires_grad_(False)
        torch._dynamo.reset()
        torch.compile(frozen, backend=record, fullgraph=True)(x, state)
        assert calls == [capture], calls  # the op's train flag: eager's where it can be
    torch._dynamo.reset()
