"""Drop-in modules against torch.nn: outputs and every gradient, over the configuration grid."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from helpers import (
    CELLS,
    STEP_CELLS,
    assert_close_list,
    check_non_finite_like_torch_nn,
    make_packed,
    make_pair,
    nn_under_cpu_autocast,
    non_finite_params,
    outputs_of,
    seq_lengths,
)
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn
from fused_rnn import functional

# dtype, atol, rtol — fp32 tolerances cover summation-order differences over T steps and
# two layers; fp64 must agree to rounding.
DTYPES = [
    pytest.param(torch.float64, 1e-10, 1e-8, id="fp64"),
    pytest.param(torch.float32, 2e-5, 1e-4, id="fp32"),
]

FORMS = ["hx", "nohx", "unbatched", "packed_sorted", "packed_unsorted"]


def _configs():
    for cell, layers, bidir, bf, bias, form in itertools.product(
        CELLS, (1, 2), (False, True), (False, True), (True, False), FORMS
    ):
        projs = (0, 3) if cell == "lstm" else (0,)
        for proj in projs:
            cid = f"{cell}-L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-{'bias' if bias else 'nobias'}-P{proj}-{form}"
            yield pytest.param(cell, layers, bidir, bf, bias, proj, form, id=cid)


def run_both(cell, layers, bidir, batch_first, bias, proj, form, dtype, backend, B=3, T=5, I=4, H=6, seed=0):
    """Run torch.nn and ours on identical inputs; return (outputs, grads) for each."""
    kwargs = dict(num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=bidir)
    if proj:
        kwargs["proj_size"] = proj
    ref, ours = make_pair(cell, I, H, backend=backend, seed=seed, **kwargs, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    D = 2 if bidir else 1
    P = proj or H
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g, dtype=dtype)
    h0 = torch.randn(layers * D, B, P, generator=g, dtype=dtype)
    c0 = torch.randn(layers * D, B, H, generator=g, dtype=dtype)
    lengths = seq_lengths(B, T, g) if form.startswith("packed") else None

    def run(module):
        xi = x.clone().requires_grad_()
        hi = h0.clone().requires_grad_()
        ci = c0.clone().requires_grad_()
        leaves = [xi]
        if form == "unbatched":
            xin = xi[0] if batch_first else xi[:, 0]
            hin = (hi[:, 0], ci[:, 0]) if cell == "lstm" else hi[:, 0]
        elif form.startswith("packed"):
            xin = make_packed(xi, lengths, batch_first, enforce_sorted=form == "packed_sorted")
            hin = (hi, ci) if cell == "lstm" else hi
            if form == "packed_sorted":
                # enforce_sorted=True means the caller already sorted the batch (and hx).
                order = torch.argsort(lengths, descending=True, stable=True)
                hin = tuple(h[:, order] for h in hin) if cell == "lstm" else hin[:, order]
        else:
            xin = xi
            hin = (hi, ci) if cell == "lstm" else hi
        if form == "nohx":
            out = module(xin)
        else:
            out = module(xin, hin)
            leaves += [hi, ci] if cell == "lstm" else [hi]
        outs = outputs_of(out)
        gen = torch.Generator().manual_seed(seed + 2)
        cots = [torch.randn(o.shape, generator=gen, dtype=dtype) for o in outs]
        torch.autograd.backward(outs, cots)
        grads = [t.grad for t in leaves] + [p.grad for p in module.parameters()]
        return outs, grads, out

    return run(ref), run(ours)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("cell,layers,bidir,batch_first,bias,proj,form", list(_configs()))
def test_reference_backend_matches_torch_nn(cell, layers, bidir, batch_first, bias, proj, form, dtype, atol, rtol):
    (o_ref, g_ref, raw_ref), (o_ours, g_ours, raw_ours) = run_both(
        cell, layers, bidir, batch_first, bias, proj, form, dtype, "reference"
    )
    assert_close_list(o_ours, o_ref, atol, rtol, "outputs")
    assert_close_list(g_ours, g_ref, atol, rtol, "grads")
    if isinstance(raw_ref[0], PackedSequence):
        for a, b in zip(raw_ours[0][1:], raw_ref[0][1:]):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("cell,layers,bidir,batch_first,bias,proj,form", [
    c for c in _configs() if c.values[1] == 2 or c.values[6] in ("unbatched", "packed_unsorted")
])
def test_auto_backend_matches_torch_nn(cell, layers, bidir, batch_first, bias, proj, form):
    (o_ref, g_ref, _), (o_ours, g_ours, _) = run_both(
        cell, layers, bidir, batch_first, bias, proj, form, torch.float32, "auto"
    )
    assert_close_list(o_ours, o_ref, 1e-6, 1e-5, "outputs")
    assert_close_list(g_ours, g_ref, 1e-6, 1e-5, "grads")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("B,T,H", [(3, 1, 37), (1, 4, 37), (3, 7, 5)], ids=lambda v: str(v))
def test_odd_sizes(cell, B, T, H, backend):
    kwargs = {"proj_size": 11} if cell == "lstm" and H == 37 else {}
    ref, ours = make_pair(cell, 13, H, 2, backend=backend, dtype=torch.float64, **kwargs)
    x = torch.randn(T, B, 13, dtype=torch.float64)
    assert_close_list(outputs_of(ours(x)), outputs_of(ref(x)), 1e-10, 1e-8, "outputs")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell,case,proj,packed", non_finite_params())
def test_non_finite_values_go_where_torch_nn_puts_them(cell, case, proj, packed, backend):
    """The reference ran rows past their length on their carried state and discarded the
    result: with an inf in that state, the zero gradient of the discarded branch made NaN
    where torch.nn, which skips those rows, has none."""
    check_non_finite_like_torch_nn(cell, backend, "cpu", case, proj, packed)


@pytest.mark.parametrize("cell", list(CELLS))
def test_non_contiguous_inputs(cell):
    ref, ours = make_pair(cell, 4, 6, 2, backend="reference", dtype=torch.float64, batch_first=True)
    big = torch.randn(5, 3, 2, 9, dtype=torch.float64)
    x = big[:, :, 1, 1:9:2].transpose(0, 1)  # (B=3, T=5, I=4), neither dim contiguous
    assert not x.is_contiguous()
    hbig = torch.randn(3, 2, 2, 6, dtype=torch.float64)
    h0 = hbig[..., 0, :].transpose(0, 1)  # (2, 3, 6), non-contiguous
    c0 = hbig[..., 1, :].transpose(0, 1)
    assert not h0.is_contiguous()
    hx_ours = (h0, c0) if cell == "lstm" else h0
    hx_ref = tuple(h.contiguous() for h in hx_ours) if cell == "lstm" else h0.contiguous()
    got = outputs_of(ours(x, hx_ours))
    want = outputs_of(ref(x.contiguous(), hx_ref))
    assert_close_list(got, want, 1e-10, 1e-8, "outputs")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", list(STEP_CELLS))
@pytest.mark.parametrize("form", ["hx", "nohx", "unbatched"])
def test_cells_match_torch_nn(cell, bias, form, dtype, atol, rtol, backend):
    ref, ours = make_pair(cell, 5, 7, bias=bias, backend=backend, dtype=dtype, step=True)
    g = torch.Generator().manual_seed(3)
    B = 3
    x = torch.randn(B, 5, generator=g, dtype=dtype)
    h = torch.randn(B, 7, generator=g, dtype=dtype)
    c = torch.randn(B, 7, generator=g, dtype=dtype)

    def run(m):
        xi, hi, ci = (t.clone().requires_grad_() for t in (x, h, c))
        if form == "unbatched":
            args = (xi[0], (hi[0], ci[0]) if cell == "lstm" else hi[0])
        elif form == "nohx":
            args = (xi,)
        else:
            args = (xi, (hi, ci) if cell == "lstm" else hi)
        out = m(*args)
        outs = list(out) if isinstance(out, tuple) else [out]
        gen = torch.Generator().manual_seed(4)
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen, dtype=dtype) for o in outs])
        leaves = [xi] if form == "nohx" else ([xi, hi, ci] if cell == "lstm" else [xi, hi])
        return outs, [t.grad for t in leaves] + [p.grad for p in m.parameters()]

    o_ref, g_ref = run(ref)
    o_ours, g_ours = run(ours)
    assert_close_list(o_ours, o_ref, atol, rtol, "outputs")
    assert_close_list(g_ours, g_ref, atol, rtol, "grads")


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("cell", list(CELLS) + [f"{c}_cell" for c in STEP_CELLS])
def test_a_torch_nn_pickle_unpickles_as_ours(cell):
    """A whole-model checkpoint of torch.nn modules loaded with the classes remapped to ours
    (the usual way to swap implementations in a pickled model) runs as nn did."""
    import io
    import pickle

    is_cell = cell.endswith("_cell")
    key = cell[: -len("_cell")] if is_cell else cell
    nn_cls, our_cls, extra = (STEP_CELLS if is_cell else CELLS)[key]
    ref = nn_cls(3, 5, **extra) if is_cell else nn_cls(3, 5, 2, **extra)

    class Remap(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("torch.nn.modules.rnn"):
                return our_cls
            return super().find_class(module, name)

    if not is_cell:  # as pickled by torch < 1.8, which had no proj_size
        del ref.__dict__["proj_size"]
    ours = Remap(io.BytesIO(pickle.dumps(ref))).load()
    if not is_cell:
        ref.proj_size = 0
    assert type(ours) is our_cls and ours.backend == "auto"
    assert ours.mode == our_cls(3, 5, **extra).mode  # RNN_RELU for a relu RNNCell
    x = torch.randn(2, 3) if is_cell else torch.randn(4, 2, 3)
    assert_close_list(outputs_of(ours(x)), outputs_of(ref(x)), 0, 0, "outputs")
    # nn.RNNBase's own list of its weights, hidden by our property, kept the first weights
    # alive after load_state_dict(assign=True) replaced them (whole-model pickles doubled).
    assert "_flat_weights" not in vars(ours)


@pytest.mark.parametrize("cell", list(CELLS))
def test_a_layer_moves_with_a_weight_deleted_for_now(cell):
    """AWD-LSTM's weight dropout deletes weight_hh_l0, keeps a raw copy, and sets the weight
    again in each forward; the model is moved (.cuda(), .double()) in between. nn.RNNBase
    takes that; flatten_parameters (which .to() calls) raised a TypeError here."""
    nn_cls, our_cls, extra = CELLS[cell]
    for cls in (nn_cls, our_cls):
        m = cls(3, 5, **extra)
        raw = m._parameters.pop("weight_hh_l0")
        m.register_parameter("weight_hh_l0_raw", raw)
        m.double()
        m.flatten_parameters()
        m._init_flat_weights()
        assert all(r is None or r() is not None for r in m._flat_weight_refs)
        m.weight_hh_l0 = torch.nn.functional.dropout(m.weight_hh_l0_raw, 0.5)
        y = outputs_of(m(torch.randn(4, 2, 3, dtype=torch.float64)))[0]
        assert y.dtype == torch.float64, cls


@pytest.mark.parametrize("cell", list(CELLS) + ["lstm_proj"])
def test_parameters_init_and_state_dict_both_ways(cell):
    kw = {"proj_size": 4} if cell == "lstm_proj" else {}
    cell = "lstm" if cell == "lstm_proj" else cell
    nn_cls, our_cls, extra = CELLS[cell]
    args = (5, 7, 2)
    torch.manual_seed(123)
    ref = nn_cls(*args, **extra, bidirectional=True, **kw)
    torch.manual_seed(123)
    ours = our_cls(*args, **extra, bidirectional=True, **kw)
    # Same names, shapes, order and (same seed) values: identical initialisation.
    ref_params = list(ref.named_parameters())
    our_params = list(ours.named_parameters())
    assert [n for n, _ in our_params] == [n for n, _ in ref_params]
    for (_, a), (_, b) in zip(our_params, ref_params):
        assert torch.equal(a, b)
    assert list(ours.state_dict()) == list(ref.state_dict())

    # Moving weights nn -> ours and ours -> nn gives identical outputs.
    ours2 = our_cls(*args, **extra, bidirectional=True, **kw, backend="reference")
    ours2.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in ours2.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref2 = nn_cls(*args, **extra, bidirectional=True, **kw)
    ref2.load_state_dict(ours2.state_dict())
    x = torch.randn(4, 2, 5)
    assert_close_list(outputs_of(ours2(x)), outputs_of(ref2(x)), 1e-6, 1e-5, "outputs")
    before = [p.data_ptr() for p in ours2.parameters()]
    ours2.flatten_parameters()  # on the CPU a no-op, as torch.nn's
    assert [p.data_ptr() for p in ours2.parameters()] == before
    assert [len(w) for w in ours2.all_weights] == [len(w) for w in ref2.all_weights]


@pytest.mark.parametrize("cell,kw", [
    ("lstm", {"proj_size": 3, "num_layers": 2, "bidirectional": True}),
    ("gru", {"bias": False, "batch_first": True}),
    ("rnn_relu", {"num_layers": 3}),
], ids=["lstm_proj", "gru_nobias", "rnn_relu"])
def test_flatten_parameters_asks_cudnn_for_nn_rnnbase_layout(monkeypatch, cell, kw):
    """Where cuDNN takes the weights (a GPU), they are laid out in one buffer as nn.RNNBase
    lays them, on construction and after ``.to()``: the same call with the same arguments.
    On the CPU the eligibility check is forced and the call recorded."""
    import torch.backends.cudnn.rnn as cudnn_rnn

    from fused_rnn import modules

    calls = []
    monkeypatch.setattr(modules, "_cudnn_can_flatten", lambda weights: True)
    monkeypatch.setattr(torch, "_use_cudnn_rnn_flatten_weight", lambda: True)
    monkeypatch.setattr(torch, "_cudnn_rnn_flatten_weight", lambda *a: calls.append(a))
    # The CPU build has no cuDNN enum; what matters is that the module's mode goes through it.
    monkeypatch.setattr(cudnn_rnn, "get_cudnn_mode", lambda mode: ("cudnn mode of", mode))
    nn_cls, our_cls, extra = CELLS[cell]
    ours = our_cls(5, 6, **extra, **kw)
    ours.double()
    assert len(calls) == 2
    ref = nn_cls(5, 6, **extra, **kw)
    for call in calls:
        weights, *args = call
        assert [w.shape for w in weights] == [w.shape for w in ref._flat_weights]
        num_weights = (4 if ref.bias else 2) + (1 if ref.proj_size > 0 else 0)  # nn's formula
        assert args == [num_weights, ref.input_size, cudnn_rnn.get_cudnn_mode(ref.mode),
                        ref.hidden_size, ref.proj_size, ref.num_layers, ref.batch_first,
                        bool(ref.bidirectional)]
    # The second call got the module's new (fp64) parameters themselves, in order.
    assert all(a is b for a, b in zip(calls[1][0], ours.parameters()))
    assert all(w.dtype == torch.float64 for w in calls[1][0])


def test_flatten_parameters_leaves_a_parametrized_module_alone(monkeypatch):
    """A parametrized weight is computed at every call: there is nothing to keep in a
    buffer, and flattening would run the parametrization (and draw its random numbers)."""
    from torch.nn.utils import parametrize

    from fused_rnn import modules

    calls = []
    monkeypatch.setattr(modules, "_cudnn_can_flatten", lambda weights: True)
    monkeypatch.setattr(torch, "_use_cudnn_rnn_flatten_weight", lambda: True)
    monkeypatch.setattr(torch, "_cudnn_rnn_flatten_weight", lambda *a: calls.append(a))
    import torch.backends.cudnn.rnn as cudnn_rnn

    monkeypatch.setattr(cudnn_rnn, "get_cudnn_mode", lambda mode: mode)
    lstm = fused_rnn.LSTM(3, 4)
    assert len(calls) == 1  # the stand-in works: a plain module is flattened
    scale = _ScaleOnEachCall()
    parametrize.register_parametrization(lstm, "weight_hh_l0", scale)
    scale.calls = 0
    lstm.double()
    assert len(calls) == 1 and scale.calls == 0 and lstm._cudnn_order is None


def test_cudnn_flattening_is_refused_off_the_gpu():
    from fused_rnn.modules import _cudnn_can_flatten

    assert not _cudnn_can_flatten([torch.zeros(2), torch.zeros(3)])
    assert not _cudnn_can_flatten([])


def test_weights_copied_into_one_buffer_are_views_in_its_order_with_gradients():
    """_in_one_buffer: casts of the weights laid out in the given order from the start of one
    new buffer (with room after them), whose gradients reach each weight as one cast per
    weight would give them."""
    from fused_rnn.modules import _BUFFER_SLACK, _buffer_order, _in_one_buffer

    g = torch.Generator().manual_seed(0)
    shapes = [(12, 5), (12, 3), (12,), (12,), (3, 3)]
    weights = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    order = [1, 0, 4, 3, 2]
    views = _in_one_buffer(weights, order, torch.bfloat16)
    assert _buffer_order(views) == order
    assert views[0].untyped_storage().nbytes() == 2 * (sum(w.numel() for w in weights)
                                                       + _BUFFER_SLACK)
    cots = [torch.randn(s, generator=g) for s in shapes]
    sum((v.float() * c).sum() for v, c in zip(views, cots)).backward()
    got = [w.grad.clone() for w in weights]
    for w in weights:
        w.grad = None
    sum((w.to(torch.bfloat16).float() * c).sum() for w, c in zip(weights, cots)).backward()
    for i, (v, w, a) in enumerate(zip(views, weights, got)):
        assert v.dtype == torch.bfloat16 and torch.equal(v, w.to(torch.bfloat16)), i
        assert torch.equal(a, w.grad), i
    # weights that do not tile one buffer from its start have no order
    assert _buffer_order(weights) is None
    assert _buffer_order(views[1:]) is None  # the first lies at offset 0, outside the list


def _fake_cudnn_flatten(calls):
    """Stands in for torch._cudnn_rnn_flatten_weight on the CPU: lays the weights out in one
    buffer, each layer and direction's matrices after its biases (an order unlike the list's,
    so that the order is seen to be followed), with a few elements to spare at the end."""
    def flatten(weights, per_dir, *args):
        calls.append(per_dir)
        order = [g + j for g in range(0, len(weights), per_dir)
                 for j in sorted(range(per_dir), key=lambda j: weights[g + j].dim())]
        buf = torch.zeros(sum(w.numel() for w in weights) + 7, dtype=weights[0].dtype)
        offset = 0
        for i in order:
            w = weights[i]
            buf[offset:offset + w.numel()] = w.reshape(-1)
            w.set_(buf.untyped_storage(), offset, w.shape)
            offset += w.numel()
        return buf
    return flatten


@pytest.mark.parametrize("case", ["autocast", "layer-a-call", "layer-a-call-autocast",
                                  "bf16-autocast", "bf16-layer-a-call-autocast"])
def test_torch_backend_hands_cudnn_weights_in_one_buffer(monkeypatch, case):
    """Where the parameters were laid out in cuDNN's buffer (a GPU; here a stand-in), the torch
    backend keeps what it hands cuDNN in that layout: under autocast, the casts in one new
    buffer; a stack run one layer a call (dropout between layers in training), each layer at
    the start of a buffer, layer 0 in the module's own when no cast is needed. Otherwise
    cuDNN copies them at every call and warns. A module already in the autocast dtype (bf16-*)
    needs no cast, so its own buffer is handed on. Outputs and gradients are those of the
    same module without the layout, bit for bit."""
    from fused_rnn import modules
    from fused_rnn.modules import _buffer_order

    calls = []
    monkeypatch.setattr(modules, "_cudnn_can_flatten", lambda weights: True)
    monkeypatch.setattr(torch, "_use_cudnn_rnn_flatten_weight", lambda: True)
    monkeypatch.setattr(torch, "_cudnn_rnn_flatten_weight", _fake_cudnn_flatten(calls))
    import torch.backends.cudnn.rnn as cudnn_rnn
    monkeypatch.setattr(cudnn_rnn, "get_cudnn_mode", lambda mode: mode)
    layer_a_call = case.startswith("layer-a-call")
    monkeypatch.setattr(modules, "_dropout_outside_torch_rng", lambda *a: layer_a_call)
    kw = {"num_layers": 2, "bidirectional": True, "proj_size": 3,
          "dropout": 0.5 if layer_a_call else 0}
    torch.manual_seed(0)
    ours = fused_rnn.LSTM(4, 6, **kw, backend="torch")
    assert calls == [5] and ours._cudnn_order is not None
    plain = fused_rnn.LSTM(4, 6, **kw, backend="torch")
    plain.load_state_dict(ours.state_dict())
    in_bf16 = case.startswith("bf16")
    if in_bf16:
        ours, plain = ours.bfloat16(), plain.bfloat16()  # flattened again
        assert calls == [5] * 4 and ours._cudnn_order is not None
    plain._cudnn_order = None  # the per-weight path
    buffer = ours.weight_ih_l0.untyped_storage().data_ptr()

    handed = []
    real_lstm = torch._VF.lstm
    monkeypatch.setattr(torch._VF, "lstm", lambda x, hx, w, *a: handed.append(w) or
                        real_lstm(x, hx, w, *a))
    x = torch.randn(5, 2, 4)
    autocast = case.endswith("autocast")
    results = []
    for module in (ours, plain):
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = outputs_of(module(x))
        sum(o.float().sum() for o in out).backward()
        results.append((out, [p.grad for p in module.parameters()]))
    for a, b in zip(*(outs + grads for outs, grads in results)):
        assert torch.equal(a, b)

    calls_of_ours = handed[:len(handed) // 2]
    assert len(calls_of_ours) == (2 if layer_a_call else 1)
    for n, w in enumerate(calls_of_ours):
        assert _buffer_order(w) is not None, f"call {n}: not one buffer from its start"
        assert all(t.dtype == (torch.bfloat16 if autocast else torch.float32) for t in w)
        own = w[0].untyped_storage().data_ptr() == buffer
        assert own == (n == 0 and (in_bf16 or not autocast)), n


@pytest.mark.gpu
@pytest.mark.parametrize("cell", list(CELLS) + ["lstm_proj"])
def test_torch_backend_gives_cudnn_one_weight_buffer(cell):
    """On a GPU the parameters live in one buffer, as nn's do, so cuDNN neither copies them at
    every call nor warns; results and gradients are nn's; ``.half()`` lays them out again."""
    import warnings

    kw = {"proj_size": 4} if cell == "lstm_proj" else {}
    cell = "lstm" if cell == "lstm_proj" else cell
    ref, ours = make_pair(cell, 5, 8, num_layers=2, bidirectional=True, backend="torch", **kw)
    ref, ours = ref.cuda(), ours.cuda()
    for dtype in (torch.float32, torch.float16):
        ref, ours = ref.to(dtype), ours.to(dtype)
        assert len({p.untyped_storage().data_ptr() for p in ours.parameters()}) == 1
        x = torch.randn(7, 3, 5, device="cuda", dtype=dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = outputs_of(ours(x))
        assert not [w for w in caught if "contiguous chunk" in str(w.message)], caught
        want = outputs_of(ref(x))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        sum(t.float().sum() for t in got).backward()
        sum(t.float().sum() for t in want).backward()
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=name)
        ours.zero_grad(), ref.zero_grad()


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["autocast-fp16", "autocast-bf16", "layer-a-call",
                                  "layer-a-call-autocast-fp16", "half-module-autocast-fp16"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_proj"])
def test_torch_backend_keeps_cudnn_from_copying_weights(cell, case):
    """On a GPU, under autocast and with the stack run one layer a call (dropout between
    layers in training), cuDNN gets its weights in one buffer laid out as its own: no
    "contiguous chunk" warning, and the results of the per-weight path (where cuDNN copies
    them), bit for bit, with its gradients."""
    import copy
    import warnings

    kw = {"proj_size": 4} if cell == "lstm_proj" else {}
    _, our_cls, extra = CELLS["lstm" if cell == "lstm_proj" else cell]
    dropout = 0.5 if case.startswith("layer-a-call") else 0.0
    torch.manual_seed(0)
    ours = our_cls(5, 8, **extra, **kw, num_layers=2, bidirectional=True, dropout=dropout,
                   backend="torch").cuda()
    if case.startswith("half-module"):  # already in the autocast dtype: no cast, no copy
        ours = ours.half()
    assert ours._cudnn_order is not None
    plain = copy.deepcopy(ours)  # parameters cloned one by one: not one buffer
    plain._cudnn_order = None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(case.rsplit("-", 1)[-1])
    x = torch.randn(7, 3, 5, device="cuda")
    results = []
    for module in (ours, plain):
        torch.manual_seed(1)  # the same dropout masks
        with warnings.catch_warnings(record=True) as caught, torch.autocast(
                "cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            warnings.simplefilter("always")
            out = outputs_of(module(x))
        if module is ours:
            assert not [w for w in caught if "contiguous chunk" in str(w.message)], caught
        sum(o.float().sum() for o in out).backward()
        results.append((out, [p.grad for p in module.parameters()]))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    for (name, _), a, b in zip(ours.named_parameters(), results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("cell", list(STEP_CELLS))
def test_cell_parameters_match(cell):
    nn_cls, our_cls, extra = STEP_CELLS[cell]
    for bias in (True, False):
        torch.manual_seed(7)
        ref = nn_cls(5, 6, bias=bias, **extra)
        torch.manual_seed(7)
        ours = our_cls(5, 6, bias=bias, **extra)
        assert list(ours.state_dict()) == list(ref.state_dict())
        for (n1, a), (n2, b) in zip(ours.named_parameters(), ref.named_parameters()):
            assert n1 == n2 and torch.equal(a, b)
        assert ours.bias_ih is None if not bias else ours.bias_ih.shape == ref.bias_ih.shape


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell", list(CELLS) + ["lstm_proj"])
def test_meta_device_forward_and_deferred_init(cell, backend):
    """Shape inference on the meta device, and deferred initialisation (build on meta,
    ``to_empty``, ``reset_parameters``), as with torch.nn."""
    kw = {"proj_size": 3} if cell == "lstm_proj" else {}
    nn_cls, our_cls, extra = CELLS["lstm" if cell == "lstm_proj" else cell]
    for form in ({}, {"bidirectional": True, "batch_first": True}):
        ref = nn_cls(4, 6, 2, **extra, **kw, **form, device="meta")
        ours = our_cls(4, 6, 2, **extra, **kw, **form, device="meta", backend=backend)
        for shape in ((5, 3, 4), (5, 4)):
            x = torch.randn(*shape, device="meta")
            want = outputs_of(ref(x))
            got = outputs_of(ours(x))
            assert [t.shape for t in got] == [t.shape for t in want]
            assert all(t.device.type == "meta" for t in got)
    with torch.device("meta"):
        ours = our_cls(4, 6, 2, **extra, **kw, backend=backend)
    ours = ours.to_empty(device="cpu")
    ours.reset_parameters()
    ref = nn_cls(4, 6, 2, **extra, **kw)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 4)
    assert_close_list(outputs_of(ours(x)), outputs_of(ref(x)), 1e-6, 1e-5, "outputs")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_meta_device_forward_on_kernel_backends(cell, backend):
    """Meta tensors carry shapes only: every backend infers them (through the reference math),
    whether or not its kernels can run here, with no fallback warning. It used to raise that
    the backend is unavailable on meta."""
    nn_cls, our_cls, extra = CELLS[cell]
    ref = nn_cls(4, 6, 2, **extra, device="meta")
    ours = our_cls(4, 6, 2, **extra, device="meta", backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shape in ((5, 3, 4), (5, 4)):
            x = torch.randn(*shape, device="meta")
            got, want = outputs_of(ours(x)), outputs_of(ref(x))
            assert [t.shape for t in got] == [t.shape for t in want]
            assert all(t.device.type == "meta" for t in got)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("cell", list(STEP_CELLS))
def test_cell_meta_device_forward(cell, backend):
    nn_cls, our_cls, extra = STEP_CELLS[cell]
    ref = nn_cls(4, 6, **extra, device="meta")
    ours = our_cls(4, 6, **extra, device="meta", backend=backend)
    for shape in ((3, 4), (4,)):
        x = torch.randn(*shape, device="meta")
        want, got = ref(x), ours(x)
        want = list(want) if isinstance(want, tuple) else [want]
        got = list(got) if isinstance(got, tuple) else [got]
        assert [t.shape for t in got] == [t.shape for t in want]


# ----------------------------------------------------------------------------- inference mode
@pytest.mark.parametrize("backend", ["reference", "torch", "auto", "triton"])
@pytest.mark.parametrize("step", [False, True], ids=["layer", "cell"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_inference_mode_forward_then_training(cell, step, backend):
    """Under ``torch.inference_mode`` (evaluation, sampling) every backend gives torch.nn's
    outputs, inference tensors as torch.nn's are; the same module then trains with torch.nn's
    gradients (nothing made in inference mode, a cached weight say, leaks into autograd). An
    inference tensor fed to it then raises PyTorch's error, as torch.nn does."""
    kw = {} if step else {"num_layers": 2, "bidirectional": True}
    ref, ours = make_pair(cell, 3, 4, backend=backend, step=step, **kw)
    g = torch.Generator().manual_seed(2)
    x = torch.randn((2, 3) if step else (3, 2, 3), generator=g)

    def outputs(out):
        return [out] if isinstance(out, torch.Tensor) else outputs_of(out) if not step \
            else list(out)

    with torch.inference_mode():
        got, want = outputs(ours(x)), outputs(ref(x))
    assert_close_list(got, want, 2e-5, 1e-4, f"{cell} {backend} inference_mode")
    assert [t.is_inference() for t in got] == [t.is_inference() for t in want] == [True] * len(want)

    grads = []
    for m in (ours, ref):
        outs = outputs(m(x))
        sum(t.square().sum() for t in outs).backward()
        grads.append([p.grad for p in m.parameters()])
    assert_close_list(*grads, 2e-5, 1e-4, f"{cell} {backend} gradients after inference_mode")
    with torch.inference_mode():
        x_inference = x.clone()
    for m in (ours, ref):  # fed to a module that trains: PyTorch's own error, as torch.nn
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            outputs(m(x_inference))


def _outcome(method, *args):
    """What a call gives: its result, or the type of the error it raises."""
    try:
        return method(*args)
    except (RuntimeError, ValueError, TypeError) as e:
        return type(e)


@pytest.mark.parametrize("cell", list(CELLS) + ["lstm_proj"])
def test_rnnbase_public_helpers_match_torch_nn(cell):
    """check_input, get_expected_hidden_size (and _cell_size), check_hidden_size,
    check_forward_args and permute_hidden: what subclasses of nn.LSTM/GRU/RNN call."""
    kw = {"proj_size": 3} if cell == "lstm_proj" else {}
    nn_cls, our_cls, extra = CELLS["lstm" if cell == "lstm_proj" else cell]
    lstm = nn_cls is torch.nn.LSTM
    P = 3 if kw else 6
    for form in ({}, {"batch_first": True, "bidirectional": True}):
        ref = nn_cls(4, 6, 2, **extra, **kw, **form)
        ours = our_cls(4, 6, 2, **extra, **kw, **form)
        L = 4 if form else 2
        x = torch.randn(3, 5, 4)
        B = 3 if form else 5
        cases = [(x, None), (torch.randn(7, 4), torch.tensor([3, 2, 2])),
                 (torch.randn(3, 5, 7), None), (torch.randn(3, 4), None), (x.double(), None)]
        for inp, bs in cases:
            assert _outcome(ours.check_input, inp, bs) == _outcome(ref.check_input, inp, bs)
            if inp.dim() >= 2 and inp.dtype == torch.float32 and inp.size(-1) == 4:
                assert ours.get_expected_hidden_size(inp, bs) == ref.get_expected_hidden_size(inp, bs)
                if lstm:
                    assert ours.get_expected_cell_size(inp, bs) == ref.get_expected_cell_size(inp, bs)
        for h in (torch.zeros(L, B, P), torch.zeros(L, B, P + 1)):
            hidden = (h, torch.zeros(L, B, 6)) if lstm else h
            args = (x, hidden, None)
            assert _outcome(ours.check_forward_args, *args) == _outcome(ref.check_forward_args, *args)
            args = (h, (L, B, P))
            assert _outcome(ours.check_hidden_size, *args) == _outcome(ref.check_hidden_size, *args)
        if lstm:  # the cell state's size is checked too
            args = (x, (torch.zeros(L, B, P), torch.zeros(L, B, 7)), None)
            assert _outcome(ref.check_forward_args, *args) is RuntimeError
            assert _outcome(ours.check_forward_args, *args) is RuntimeError
        h = torch.randn(L, 5, P)
        hidden = (h, torch.randn(L, 5, 6)) if lstm else h
        for perm in (None, torch.tensor([2, 0, 1, 4, 3])):
            a, b = ours.permute_hidden(hidden, perm), ref.permute_hidden(hidden, perm)
            for u, v in zip(a if lstm else (a,), b if lstm else (b,)):
                assert torch.equal(u, v)


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_between_layers_training_only(cell, backend):
    ref, ours = make_pair(cell, 4, 6, 3, dropout=1.0, backend=backend, dtype=torch.float64)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    # eval: no dropout at all, same as nn
    ref.eval(), ours.eval()
    assert_close_list(outputs_of(ours(x)), outputs_of(ref(x)), 1e-10, 1e-8, "eval")
    # train with p=1: layers 2 and 3 see zeros, the last layer's output is not dropped;
    # deterministic, so it must equal nn exactly and differ from eval.
    ref.train(), ours.train()
    got, want = outputs_of(ours(x)), outputs_of(ref(x))
    assert_close_list(got, want, 1e-10, 1e-8, "train")
    assert got[0].abs().sum() > 0  # the last layer's output was not dropped
    ours.eval()
    assert not torch.allclose(outputs_of(ours(x))[0], got[0])


def test_dropout_randomness_in_training():
    lstm = fused_rnn.LSTM(4, 6, 2, dropout=0.5, backend="reference").train()
    x = torch.randn(5, 2, 4)
    torch.manual_seed(0)
    a = lstm(x)[0]
    torch.manual_seed(0)
    b = lstm(x)[0]
    c = lstm(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_draws_torch_nns_masks(cell, backend):
    """Dropout between layers at p=0.5 on a padded (unpacked) batch, in training: from the same
    seed, torch.nn's masks and scale (outputs and input gradients equal) and the generator
    left where nn leaves it. (test_dropout_between_layers_training_only takes p=1, which any
    mask and any scale pass.)"""
    ref, ours = make_pair(cell, 3, 4, 3, dropout=0.5, bidirectional=True, backend=backend)
    ref.train(), ours.train()
    x = torch.randn(5, 3, 3)
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        outs = outputs_of(m(xi))
        nxt = torch.rand(3)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        results.append((outs, xi.grad, nxt))
    (want, want_dx, want_next), (got, got_dx, got_next) = results
    assert_close_list(got, want, 1e-6, 1e-5, "outputs")
    torch.testing.assert_close(got_dx, want_dx, atol=1e-6, rtol=1e-5)
    assert torch.equal(got_next, want_next)
    assert not torch.allclose(got[0], outputs_of(ours.eval()(x))[0])  # dropout was on


@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_dropout_draws_torch_nns_masks(cell):
    """Per-layer backends drop out a packed input's steps as torch.nn drops its packed data:
    same seed, same masks, and the generator left where nn leaves it."""
    ref, ours = make_pair(cell, 3, 4, 3, dropout=0.5, bidirectional=True, backend="reference")
    x = torch.randn(5, 3, 3)
    packed = pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=False)
    results = []
    for m in (ref, ours):
        torch.manual_seed(1)
        out, state = m(packed)
        results.append((outputs_of((out.data, state)), torch.rand(3)))
    (want, want_next), (got, got_next) = results
    assert_close_list(got, want, 1e-6, 1e-5, "outputs")
    assert torch.equal(got_next, want_next)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_cpu_autocast_follows_torch_nn(cell, backend):
    """Under autocast every cell computes in the autocast dtype, as nn.LSTM does on the CPU (on
    the CPU nn.GRU ignores autocast and stays fp32, and on CUDA torch.nn's cuDNN RNNs run fp16
    whatever the autocast dtype — we copy neither). Values agree with torch.nn to bf16
    rounding."""
    ref, ours = make_pair(cell, 4, 6, 2, backend=backend)
    x = torch.randn(5, 3, 4)
    want = outputs_of(nn_under_cpu_autocast(ref, x))  # or nn.LSTM's bf16 copy, where it fails
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_of(ours(x))
    if cell == "lstm":
        assert [t.dtype for t in want] == [torch.bfloat16] * 3
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    # and exactly what the same module computes on bf16 data and weights outside autocast
    ours16 = copy.deepcopy(ours).bfloat16()
    assert_close_list(got, outputs_of(ours16(x.bfloat16())), 0, 0, "autocast vs bf16")


@pytest.mark.parametrize("cell,backend,refused", [
    ("lstm", "nn", True), ("lstm", "auto", True), ("lstm", "reference", False),
    ("gru", "nn", False), ("gru", "auto", False), ("gru", "reference", False)])
def test_an_output_changed_in_place_is_refused_where_the_backward_reads_it(
        cell, backend, refused):
    """As the README says: autograd's version check refuses an in-place change to an output the
    backward saved (nn.LSTM's on the CPU, and auto's, which is aten's), and the reference
    saves none, so there the change cannot reach a gradient (tests/triton: triton's)."""
    ref, ours = make_pair(cell, 4, 5, 1, backend="auto" if backend == "nn" else backend)
    m = ref if backend == "nn" else ours
    y, _ = m(torch.randn(3, 2, 4))
    y.mul_(2)
    if refused:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    else:
        y.sum().backward()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_cpu_autocast_packed_lstm_computes_in_the_autocast_dtype(backend):
    """An LSTM given a PackedSequence follows autocast like every other call (torch.nn's stays
    fp32 on the CPU there, as the README says): bf16 out, the values of its bf16 copy."""
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, ours = make_pair("lstm", 4, 6, 2, backend=backend)
    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 2, 4])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ref(packed)[0].data.dtype == torch.float32  # torch 2.13: no CPU rule for it
        out, state = ours(packed)
    got = outputs_of((out.data, state))
    assert [t.dtype for t in got] == [torch.bfloat16] * 3
    ours16 = copy.deepcopy(ours).bfloat16()
    out16, state16 = ours16(pack_padded_sequence(x.bfloat16(), lengths, enforce_sorted=False))
    assert_close_list(got, outputs_of((out16.data, state16)), 0, 0, "autocast vs bf16")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell", list(STEP_CELLS))
def test_cpu_autocast_cells_compute_in_the_autocast_dtype(cell, backend):
    """The single-step cells follow autocast as the stacks do (torch.nn's LSTMCell and GRUCell
    stay fp32 on the CPU, where autocast has no rule for them): bf16 out, and the values of
    the same cell run on bf16 inputs."""
    _, cls, extra = STEP_CELLS[cell]
    torch.manual_seed(0)
    m = cls(3, 4, backend=backend, **extra)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    hx = (h, torch.randn(2, 4)) if cell == "lstm" else h
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _cell_outputs(m(x, hx))
    m16 = cls(3, 4, backend=backend, dtype=torch.bfloat16, **extra)
    m16.load_state_dict(m.state_dict())
    hx16 = tuple(t.bfloat16() for t in hx) if cell == "lstm" else hx.bfloat16()
    want = _cell_outputs(m16(x.bfloat16(), hx16))
    assert [t.dtype for t in got] == [torch.bfloat16] * len(got)
    assert_close_list(got, want, 0, 0, "autocast vs bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", list(STEP_CELLS))
def test_auto_cells_are_torch_nns_kernels_bit_for_bit(cell, dtype):
    """``auto``'s cells run PyTorch's own cell kernels: the same bits as torch.nn's cells in
    every dtype (the reference math differs from them by bf16 rounding)."""
    nn_cls, cls, extra = STEP_CELLS[cell]
    torch.manual_seed(0)
    ref = nn_cls(7, 33, dtype=dtype, **extra)
    ours = cls(7, 33, dtype=dtype, **extra)
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(5, 7, dtype=dtype), torch.randn(5, 33, dtype=dtype)
    hx = (h, torch.randn(5, 33, dtype=dtype)) if cell == "lstm" else h
    assert_close_list(_cell_outputs(ours(x, hx)), _cell_outputs(ref(x, hx)), 0, 0, "cells")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cell", list(STEP_CELLS))
def test_a_plain_cell_call_skips_the_slow_checks_and_gives_their_results(monkeypatch, cell,
                                                                         dtype):
    """The generation loop's call (a batch, one dtype and device, the state as tensors or
    None) takes the cells' quick checks; every other call takes ``_checked_step``. Both give
    the same bits, here for calls that differ only in how the state is given."""
    _, cls, extra = STEP_CELLS[cell]
    torch.manual_seed(0)
    m = cls(5, 9, dtype=dtype, **extra)
    x, h, c = (torch.randn(3, n, dtype=dtype) for n in (5, 9, 9))
    plain = (h, c) if cell == "lstm" else h
    checked = []
    real = type(m)._checked_step
    monkeypatch.setattr(type(m), "_checked_step",
                        lambda self, *a: checked.append(1) or real(self, *a))
    want = _cell_outputs(m(x, plain))
    assert_close_list(_cell_outputs(m(x, None)), _cell_outputs(m(x, (0 * h, 0 * c) if
                      cell == "lstm" else 0 * h)), 0, 0, "hx=None vs zeros")
    assert checked == []
    # A list for the LSTM's state, and one row unbatched: the checked path, same results.
    if cell == "lstm":
        assert_close_list(_cell_outputs(m(x, [h, c])), want, 0, 0, "list hx")
    row = _cell_outputs(m(x[1], (h[1], c[1]) if cell == "lstm" else h[1]))
    assert_close_list([t.unsqueeze(0) for t in row],
                      _cell_outputs(m(x[1:2], tuple(t[1:2] for t in plain) if cell == "lstm"
                                      else h[1:2])), 0, 0, "unbatched")
    assert len(checked) == (2 if cell == "lstm" else 1)


@pytest.mark.parametrize("cell", list(STEP_CELLS))
def test_another_devices_autocast_lets_mixed_dtypes_through_in_the_inputs_dtype(cell):
    """An autocast region on another device type (CUDA's, here around a CPU cell) lets a
    bf16 state pass the dtype checks but casts nothing on this device: the checked path runs
    the math in the input's dtype (torch.nn's cells fail on the mixed matmul)."""
    _, cls, extra = STEP_CELLS[cell]
    torch.manual_seed(0)
    m = cls(3, 4, **extra)
    x, h = torch.randn(2, 3), torch.randn(2, 4).bfloat16()
    state = (h, h) if cell == "lstm" else h
    want = _cell_outputs(m(x, (h.float(), h.float()) if cell == "lstm" else h.float()))
    was = torch.is_autocast_enabled("cuda")
    try:
        torch.set_autocast_enabled("cuda", True)
        got = _cell_outputs(m(x, state))
    finally:
        torch.set_autocast_enabled("cuda", was)
    assert [t.dtype for t in got] == [torch.float32] * len(got)
    assert_close_list(got, want, 0, 0, "mixed dtypes under another device's autocast")


@pytest.mark.parametrize("cell", list(STEP_CELLS))
def test_a_cell_checks_the_state_before_it_reads_a_weight(cell):
    """torch.nn's order: a state of the wrong rank is named before a weight is read, so a
    parametrization that fails (or a deleted weight) does not hide it; a state of the right
    rank lets the weight's own error through."""
    from torch.nn.utils import parametrize

    class Fails(torch.nn.Module):
        armed = False

        def forward(self, w):
            if self.armed:
                raise ValueError("the parametrization failed")
            return w

    _, cls, extra = STEP_CELLS[cell]
    m = cls(4, 5, **extra)
    fails = Fails()
    parametrize.register_parametrization(m, "weight_hh", fails)
    fails.armed = True
    x, h = torch.randn(3, 4), torch.randn(3, 5)
    for bad_rank in (True, False):
        state = h[None] if bad_rank else h
        hx = (state, h if bad_rank else state) if cell == "lstm" else state
        match = "to be 1D or 2D" if bad_rank else "the parametrization failed"
        with pytest.raises(ValueError, match=match):
            m(x, hx)


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps"])
def test_the_autocast_dtype_is_read_for_every_device_type(device_type):
    """``torch._C._is_any_autocast_enabled`` (the quick "no autocast" answer) does not read
    MPS's state: an MPS region must still cast (set here without an MPS device)."""
    device = torch.device(device_type)
    was = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    assert functional._autocast_dtype(device) is None
    try:
        torch.set_autocast_enabled(device_type, True)
        torch.set_autocast_dtype(device_type, torch.float16)
        assert functional._autocast_dtype(device) is torch.float16
        assert functional.compute_dtype(device, torch.float32) is torch.float16
        other = torch.device("cpu" if device_type != "cpu" else "cuda")
        assert functional._autocast_dtype(other) is None
    finally:
        torch.set_autocast_enabled(device_type, was[0])
        torch.set_autocast_dtype(device_type, was[1])


def _cell_outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_stack_dropout_one_layer_a_call_matches_the_whole_stack(monkeypatch, cell, packed):
    """On a GPU, cuDNN draws a stack's between-layer dropout from its own state, which torch's
    RNG state does not hold (an exact --resume would repeat nothing); such a stack then runs
    one cuDNN call a layer with F.dropout between. aten's CPU kernel draws its dropout from
    torch's generator the same way, so forced on the CPU the per-layer path must give the
    whole-stack results bit for bit: same masks, outputs, states and gradients."""
    from fused_rnn import modules

    _, cls, kw = CELLS[cell]
    torch.manual_seed(0)
    rnn = cls(4, 6, num_layers=3, dropout=0.5, bidirectional=True, batch_first=True,
              backend="torch", **kw)
    x = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 2, 4])

    def run():
        torch.manual_seed(7)
        rnn.zero_grad()
        inp = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False) \
            if packed else x
        out, state = rnn(inp)
        outs = [out.data if packed else out] + list(state if cell == "lstm" else [state])
        sum((o * (i + 1)).sin().sum() for i, o in enumerate(outs)).backward()
        return [o.detach() for o in outs] + [p.grad.clone() for p in rnn.parameters()]

    real = modules._dropout_outside_torch_rng
    assert real(torch.device("cuda"), 0.5, True, 3)
    assert not real(torch.device("cuda"), 0.5, False, 3)  # eval: no dropout
    assert not real(torch.device("cuda"), 0.5, True, 1)  # one layer: no dropout between
    assert not real(torch.device("cpu"), 0.5, True, 3)  # aten: torch's generator already
    whole = run()
    calls, drawn = [], []
    monkeypatch.setattr(modules, "_dropout_outside_torch_rng",
                        lambda *a: calls.append(a) or True)
    dropout = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda t, *a, **k: drawn.append(t.shape) or dropout(t, *a, **k))
    per_layer = run()
    assert calls, "the per-layer path ran"
    # Each mask is drawn on the time-major tensor, as aten's stack draws it (batch_first or
    # not): torch 2.6 fills a transposed view's mask in another order than its memory's.
    assert drawn == [torch.Size([11, 12]) if packed else torch.Size([5, 3, 12])] * 2, drawn
    for i, (a, b) in enumerate(zip(per_layer, whole, strict=True)):
        assert torch.equal(a, b), f"tensor {i} differs"


class _ScaleOnEachCall(torch.nn.Module):
    """A parametrization whose value changes at every evaluation (1.1×, 1.2×, ...): a module
    that computed it twice in one call would mix two weights, or check one and run another."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, w):
        self.calls += 1
        return w * (1 + 0.1 * self.calls)


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_a_parametrized_weight_is_computed_once_a_call(cell, form, backend):
    """Weight dropout (AWD-LSTM) and weight norm are parametrizations: one value per call,
    used by the checks and the kernels alike, with the gradient reaching the original."""
    from torch.nn.utils import parametrize

    ref, ours = make_pair(cell, 4, 6, num_layers=2, backend=backend)
    scales = {name: _ScaleOnEachCall() for name in ("weight_ih_l0", "weight_hh_l0")}
    for name, scale in scales.items():
        parametrize.register_parametrization(ours, name, scale)
        scale.calls = 0  # registering evaluates it once
        with torch.no_grad():
            getattr(ref, name).mul_(1.1)  # what the first evaluation gives
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, generator=g)
    lengths = torch.tensor([5, 2, 4])

    def run(module):
        inp = make_packed(x, lengths, False, enforce_sorted=False) if form == "packed" else x
        out = module(inp)
        sum(t.sum() for t in outputs_of(out)).backward()
        return outputs_of(out)

    assert_close_list(run(ours), run(ref), atol=2e-5, rtol=1e-4, what=f"{cell} {form}")
    assert {n: s.calls for n, s in scales.items()} == dict.fromkeys(scales, 1)
    for name in scales:
        original = getattr(ours.parametrizations, name).original
        torch.testing.assert_close(original.grad, 1.1 * getattr(ref, name).grad,
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell", list(STEP_CELLS))
def test_a_parametrized_cell_weight_is_computed_once_a_call(cell, backend):
    from torch.nn.utils import parametrize

    ref, ours = make_pair(cell, 4, 6, backend=backend, step=True)
    scales = {name: _ScaleOnEachCall() for name in ("weight_ih", "weight_hh")}
    for name, scale in scales.items():
        parametrize.register_parametrization(ours, name, scale)
        scale.calls = 0  # registering evaluates it once
        with torch.no_grad():
            getattr(ref, name).mul_(1.1)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    def run(module):
        out = module(x)
        return list(out) if isinstance(out, tuple) else [out]

    assert_close_list(run(ours), run(ref), atol=2e-5, rtol=1e-4, what=cell)
    assert {n: s.calls for n, s in scales.items()} == dict.fromkeys(scales, 1)


# ------------------------------------------------------------------ corners of torch.nn's API
def _grad_run(m, x):
    """Outputs of ``m(x)`` (a stack's or a cell's) and the gradients of ``x`` and of every
    parameter, from fixed random cotangents."""
    out = m(x)
    if isinstance(m, (fused_rnn.LSTMCell, torch.nn.LSTMCell)):
        outs = list(out)
    elif isinstance(out, torch.Tensor):
        outs = [out]
    else:
        outs = outputs_of(out)
    gen = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    leaves = ([x] if x.requires_grad else []) + list(m.parameters())
    grads = torch.autograd.grad(outs, leaves, cot)
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_rnn_cell_reads_its_nonlinearity_at_every_call(backend):
    """torch.nn.RNNCell reads ``.nonlinearity`` at each call: a cell built tanh and set to
    relu computes relu (and an unknown name fails at the call)."""
    ref, ours = make_pair("rnn_tanh", 4, 6, backend=backend, step=True)
    x = torch.randn(3, 4)
    for m in (ref, ours):
        m.nonlinearity = "relu"
    got, want = ours(x), ref(x)
    assert (want >= 0).all() and torch.equal(got, want)
    for m in (ref, ours):
        m.nonlinearity = "sigmoid"
        with pytest.raises(RuntimeError, match="Unknown nonlinearity: sigmoid"):
            m(x)


def test_integer_like_arguments_and_positional_order_as_torch_nn():
    """What torch.nn's constructors accept, ours accept with the same meaning: numpy and 0-d
    tensor integers, every argument positionally (GRU/RNN have ``proj_size`` before
    ``device``, RNN ``nonlinearity`` fourth), and cells of size zero."""
    np = pytest.importorskip("numpy")
    cases = [
        ("lstm", (4, 6, np.int64(2)), {}),
        ("gru", (4, 6, torch.tensor(2)), {}),
        ("lstm", (4, 6), {"proj_size": 0.0}),  # no projection, as False
        ("lstm", (4, 6), {"proj_size": False}),
        ("lstm", (4, 6), {"proj_size": np.int64(3)}),
        ("lstm", (4, 6, 1, True, False, 0.0, True, 3, "cpu", torch.float64), {}),
        ("gru", (4, 6, 2, True, True, 0.0, False, 0, "cpu", torch.float64), {}),
        ("rnn_relu", (4, 6, 2, "relu", False, False, 0.0, True, 0, "cpu", torch.float64), {}),
    ]
    for cell, args, kwargs in cases:
        nn_cls, our_cls, _ = CELLS[cell]  # nonlinearity, if any, is in args
        torch.manual_seed(0)
        ref = nn_cls(*args, **kwargs)
        ours = our_cls(*args, **kwargs)
        assert repr(ours) == repr(ref), (cell, args)
        ours.backend = "reference"  # a backend other than the default is shown
        assert repr(ours) == repr(ref)[:-1] + ", backend='reference')", (cell, args)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(5, 3, 4, dtype=ref.weight_ih_l0.dtype)
        if ref.batch_first:
            x = x.transpose(0, 1)
        assert_close_list(outputs_of(ours(x)), outputs_of(ref(x)), 1e-6, 1e-5, str(args))
    for cell in STEP_CELLS:
        nn_cls, our_cls, extra = STEP_CELLS[cell]
        for size in [(np.int64(4), np.int64(6)), (0, 6), (4, 0)]:
            torch.manual_seed(0)
            ref, ours = nn_cls(*size, **extra), our_cls(*size, **extra)
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(3, int(size[0]))
            want, got = ref(x), ours(x)
            assert_close_list(list(got) if cell == "lstm" else [got],
                              list(want) if cell == "lstm" else [want], 0, 0, f"{cell} {size}")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_weight_swapping_written_for_nn_rnnbase_works(cell, backend):
    """Weight-dropout wrappers written for nn.RNNBase (AWD-LSTM's and its descendants) take a
    weight out of ``_parameters``, set a computed tensor in its place before each call and
    call ``_update_flat_weights``/``_init_flat_weights``/``flatten_parameters``: the same
    results as torch.nn doing the same. Assigning ``_flat_weights`` itself, which would be
    silently ignored here, is refused."""
    ref, ours = make_pair(cell, 4, 6, 2, backend=backend)
    x = torch.randn(5, 3, 4)
    for m in (ref, ours):
        raw = m._parameters.pop("weight_hh_l0")
        m.register_parameter("weight_hh_l0_raw", raw)
        m.weight_hh_l0 = raw * 0.5  # a plain tensor, computed from the raw weight
        m._update_flat_weights()
        m._init_flat_weights()
        m.flatten_parameters()
        assert m._flat_weight_refs[1]() is m.weight_hh_l0
    got, want = _grad_run(ours, x), _grad_run(ref, x)
    assert_close_list(got[0], want[0], 1e-6, 1e-5, "outputs")
    assert_close_list(got[1], want[1], 1e-6, 1e-5, "grads")
    with pytest.raises(AttributeError, match="_flat_weights_names"):
        ours._flat_weights = list(ref._flat_weights)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("step", [False, True], ids=["stack", "cell"])
def test_complex_modules_match_torch_nn(cell, step, backend):
    """torch.nn computes complex RNNs (tanh and sigmoid have complex forms); so does every
    backend here (the reference computes in the complex dtype; kernels hand it over)."""
    kw = {} if step else {"num_layers": 2, "bidirectional": True}
    ref, ours = make_pair(cell, 3, 4, backend=backend, step=step, dtype=torch.complex128, **kw)
    x = torch.randn(*((2,) if step else (5, 2)), 3, dtype=torch.complex128, requires_grad=True)
    want = _grad_run(ref, x)
    got = _grad_run(ours, x)
    assert want[0][0].dtype == torch.complex128 and want[0][0].imag.abs().max() > 0.01
    assert_close_list(got[0], want[0], 1e-12, 1e-10, "outputs")
    assert_close_list(got[1], want[1], 1e-12, 1e-10, "grads")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_complex_relu_is_refused_as_by_torch_nn(backend):
    """torch.nn's clamp refuses complex numbers: a NotImplementedError (torch 2.13), a plain
    RuntimeError (torch 2.6). Ours raises the same, or NotImplementedError, its subclass."""
    ours = fused_rnn.RNN(3, 4, nonlinearity="relu", dtype=torch.complex64, backend=backend)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.RNN(3, 4, nonlinearity="relu", dtype=torch.complex64)(
            torch.randn(5, 2, 3, dtype=torch.complex64))
    with pytest.raises(type(theirs.value)):
        ours(torch.randn(5, 2, 3, dtype=torch.complex64))


def test_jit_trace_of_the_reference_time_loop_warns():
    """torch.jit.trace unrolls the reference backend's time loop: the traced module is for
    one sequence length and gives wrong results for another without an error, so tracing it
    says so. (nn.LSTM, and ``auto`` here, trace as one op with any length.)"""
    lstm = fused_rnn.LSTM(4, 6, backend="reference")
    with pytest.warns(torch.jit.TracerWarning, match="sequences of length 5 only") as seen:
        torch.jit.trace(lstm, torch.randn(5, 3, 4), check_trace=False)
    # attributed to the caller's line (it named fused_rnn/functional.py)
    assert [w.filename for w in seen if "length 5 only" in str(w.message)] == [__file__]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN", "GRUCell"])
def test_autocast_leaves_fp64_and_complex_modules_alone(cls, dtype, backend):
    """Autocast casts floating tensors other than fp64, as torch's own rule: an fp64 or
    complex module computes in its dtype inside a bf16 region (before, it was cast to bf16
    and a complex one lost its imaginary part), as torch.nn's does."""
    torch.manual_seed(0)
    m = getattr(fused_rnn, cls)(3, 4, backend=backend, dtype=dtype)
    x = torch.randn(*((5, 2, 3) if cls != "GRUCell" else (2, 3)), dtype=dtype)
    def out():
        return m(x)[0] if cls != "GRUCell" else m(x)

    want = out()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = out()
        assert functional.compute_dtype(x.device, dtype) == dtype  # what backend="auto" sees
        if cls != "GRUCell":
            assert m.stack_config(x.device, dtype, 2)["dtype"] == dtype
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_autocast_does_not_hide_an_fp64_input_to_an_fp32_module():
    m = fused_rnn.GRU(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="dtype"):
        m(torch.randn(5, 2, 3, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 and bf16 mix: autocast casts
        assert m(torch.randn(5, 2, 3, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- torch.fx
class _FxNet(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        out = self.rnn(x)
        return self.head(out[0] if isinstance(self.rnn, _STACKS) else out)


_STACKS = (fused_rnn.LSTM, fused_rnn.GRU, fused_rnn.RNN)


@pytest.mark.parametrize("cls", [fused_rnn.LSTM, fused_rnn.GRU, fused_rnn.RNN,
                                 fused_rnn.GRUCell, fused_rnn.RNNCell])
def test_fx_symbolic_trace_keeps_our_modules_as_leaves(cls):
    """torch.fx keeps nn.LSTM as a call_module node (it is in torch.nn) and traces into other
    modules, which fails on ours; fused_rnn.fx.symbolic_trace keeps ours as leaves too, and
    plain torch.fx says to use it."""
    import fused_rnn.fx

    net = _FxNet(cls(4, 6))
    x = torch.randn(3, 2, 4) if cls in _STACKS else torch.randn(2, 4)
    gm = fused_rnn.fx.symbolic_trace(net)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["rnn", "head"]
    torch.testing.assert_close(gm(x), net(x), atol=0, rtol=0)
    with pytest.raises(TypeError, match=r"fused_rnn\.fx\.symbolic_trace"):
        torch.fx.symbolic_trace(net)
    with pytest.raises(TypeError, match="cannot be the root"):
        fused_rnn.fx.symbolic_trace(net.rnn)
    if cls is fused_rnn.RNNCell:  # the tracer's error before the call's own
        net.rnn.nonlinearity = "gelu"
        with pytest.raises(TypeError, match=r"fused_rnn\.fx\.symbolic_trace"):
            torch.fx.symbolic_trace(net)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("I,H", [(2, 0), (0, 3)])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_of_size_0_backpropagate_in_every_dtype(kind, I, H, dtype):
    """torch.nn takes cells of size 0; in 16 bits the reference's backward reshaped an empty
    gradient to (-1, 0), which torch cannot, and failed. Gradients are torch.nn's (zeros of
    the parameters' shapes); a layer of input size 0 through fused_rnn.functional too."""
    torch.manual_seed(0)
    nn_cell = getattr(torch.nn, kind)(I, H).to(dtype)
    ours = getattr(fused_rnn, kind)(I, H, backend="reference").to(dtype)
    ours.load_state_dict(nn_cell.state_dict())
    x = torch.randn(4, I, dtype=dtype, requires_grad=True)
    for cell in (nn_cell, ours):
        out = cell(x)
        out = out[0] + out[1] if kind == "LSTMCell" else out
        (out.float().sum() + 1).backward()
    for (name, a), b in zip(ours.named_parameters(), nn_cell.parameters()):
        assert a.grad is not None and a.grad.shape == b.shape, name
        # in 16 bits the reference rounds where a kernel does, not where torch.nn's CPU cell does
        tol = {} if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-6)
        torch.testing.assert_close(a.grad, b.grad, msg=name, **tol)
    if I == 0:
        x = torch.randn(3, 2, 0, dtype=dtype, requires_grad=True)
        w_ih = torch.randn(3 * H, 0, dtype=dtype, requires_grad=True)
        w_hh = torch.randn(3 * H, H, dtype=dtype, requires_grad=True)
        h0 = torch.randn(2, H, dtype=dtype, requires_grad=True)
        y, _, _ = functional.rnn_layer("GRU", x, h0, None, w_ih, w_hh, backend="reference")
        y.float().sum().backward()
        assert x.grad.shape == x.shape and w_ih.grad.shape == w_ih.shape
        assert h0.grad.abs().sum() > 0


def test_a_deleted_weight_is_named_where_torch_nn_would_use_the_stale_one():
    """README: with a weight deleted (weight dropout between its steps) reading _flat_weights
    or calling the module raises a TypeError naming the weight; nn's list keeps the deleted
    tensor and its forward runs on it."""
    m = fused_rnn.GRU(3, 4)
    del m.weight_hh_l0
    for read in (lambda: m._flat_weights, lambda: m(torch.randn(2, 1, 3))):
        with pytest.raises(TypeError, match="GRU: weight weight_hh_l0 is missing"):
            read()
    nn_gru = torch.nn.GRU(3, 4)
    del nn_gru.weight_hh_l0
    nn_gru(torch.randn(2, 1, 3))  # runs, on the deleted weight
