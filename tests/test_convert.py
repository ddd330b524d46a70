"""fused_rnn.convert: torch.nn's RNN modules swapped for ours in a model, and back."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn.convert import from_torch_nn, to_torch_nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, dropout=0.25)
        self.inner = nn.Sequential(nn.GRU(6, 5, batch_first=True), nn.RNN(5, 4, nonlinearity="relu",
                                                                          bias=False))
        self.cells = nn.ModuleList([nn.LSTMCell(4, 3), nn.GRUCell(4, 3),
                                    nn.RNNCell(4, 3, nonlinearity="relu")])

    def forward(self, x):
        y, _ = self.lstm(x)
        z, _ = self.inner[0](y.transpose(0, 1))
        z, _ = self.inner[1](z)
        outs = [z.sum()]
        for cell in self.cells:
            out = cell(x[0])
            outs.append((out[0] if isinstance(out, tuple) else out).sum())
        return torch.stack(outs)


KINDS = ["lstm", "inner.0", "inner.1", "cells.0", "cells.1", "cells.2"]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_from_torch_nn_swaps_every_rnn_and_keeps_its_parameters(backend):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(5, 2, 4)
    want = model(x)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert from_torch_nn(model, backend=backend) is model
    for name in KINDS:
        m = model.get_submodule(name)
        assert type(m).__module__ == "fused_rnn.modules" and m.backend == backend, name
        assert not m.training
    assert model.inner[1].nonlinearity == "relu" and model.cells[2].nonlinearity == "relu"
    assert model.lstm.proj_size == 3 and model.lstm.dropout == 0.25 and model.inner[0].batch_first
    assert model.inner[1].bias is False
    assert all(p is params[n] for n, p in model.named_parameters())  # the same objects
    assert list(dict(model.named_parameters())) == list(params)
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-5)
    model(x).sum().backward()
    before = model.lstm.weight_hh_l0.detach().clone()
    opt.step()  # the optimizer built before the swap trains the swapped modules
    assert not torch.equal(model.lstm.weight_hh_l0, before)


def test_to_torch_nn_reverses_it_and_quantize_dynamic_then_finds_the_lstm():
    torch.manual_seed(0)
    model = from_torch_nn(Net().eval())
    x = torch.randn(5, 2, 4)
    want = model(x)
    assert to_torch_nn(model) is model
    for name in KINDS:
        assert type(model.get_submodule(name)).__module__ == "torch.nn.modules.rnn", name
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-5)
    q = torch.ao.quantization.quantize_dynamic(nn.Sequential(to_torch_nn(fused_rnn.LSTM(4, 6))),
                                               {nn.LSTM}, dtype=torch.qint8)
    assert "quantized" in type(q[0]).__module__


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_without_bias_swap_both_ways(kind):
    """A bias=False cell holds None in its bias slots; the swap's reordering dropped them, and
    the first call then failed on the missing attribute."""
    torch.manual_seed(0)
    old = getattr(nn, kind)(4, 3, bias=False)
    x = torch.randn(2, 4)
    want = old(x)
    ours = from_torch_nn(old)
    assert ours.bias_ih is None and ours.bias_hh is None
    assert list(ours._parameters) == list(old._parameters)
    back = to_torch_nn(ours)
    assert back.bias_ih is None and list(back._parameters) == list(old._parameters)
    for m in (ours, back):
        got = m(x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_a_swap_leaves_a_users_child_module_in_its_own_mode():
    """The new module takes the old one's training mode; a child module the user hung on it
    keeps its own (train() would have set it too)."""
    lstm = nn.LSTM(3, 4).train()
    lstm.norm = nn.LayerNorm(4).eval()
    ours = from_torch_nn(lstm)
    assert ours.training and not ours.norm.training
    lstm = nn.LSTM(3, 4).eval()
    lstm.norm = nn.LayerNorm(4).train()
    ours = from_torch_nn(lstm)
    assert not ours.training and ours.norm.training


def test_a_module_itself_is_returned_converted():
    lstm = nn.LSTM(3, 4)
    ours = from_torch_nn(lstm)
    assert isinstance(ours, fused_rnn.LSTM) and ours.weight_ih_l0 is lstm.weight_ih_l0
    back = to_torch_nn(ours)
    assert type(back) is nn.LSTM and back.weight_ih_l0 is lstm.weight_ih_l0
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(back(x)[0], lstm(x)[0], atol=0, rtol=0)


def test_subclasses_stay_and_hooked_or_parametrized_modules_are_refused():
    class MyLSTM(nn.LSTM):
        pass

    model = nn.Sequential(MyLSTM(3, 4))
    assert type(from_torch_nn(model)[0]) is MyLSTM
    hooked = nn.Sequential(nn.GRU(3, 4))
    hooked[0].register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"cannot swap 0 \(GRU\): it has _forward_hooks"):
        from_torch_nn(hooked)
    param = nn.Sequential(nn.Linear(2, 2), nn.LSTM(3, 4))
    torch.nn.utils.parametrizations.weight_norm(param[1], "weight_hh_l0")
    with pytest.raises(ValueError, match="parametrizations"):
        from_torch_nn(param)
    with pytest.raises(ValueError, match="unknown backend"):
        from_torch_nn(nn.LSTM(3, 4), backend="fast")
    extra = nn.LSTM(3, 4)  # a parameter ours would not have: refused, not dropped
    extra.register_parameter("scale", nn.Parameter(torch.ones(4)))
    with pytest.raises(ValueError, match="parameters"):
        from_torch_nn(nn.Sequential(extra))
    with pytest.raises(TypeError, match="nn.Module"):
        to_torch_nn(object())


def test_a_module_in_two_places_becomes_one_module_in_both():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.GRU(3, 3)
            self.dec = self.enc
            self.other = nn.Sequential(self.enc)

    model = from_torch_nn(Tied())
    assert isinstance(model.enc, fused_rnn.GRU) and model.dec is model.enc
    assert model.other[0] is model.enc
    to_torch_nn(model)
    assert type(model.enc) is nn.GRU and model.dec is model.enc and model.other[0] is model.enc


def test_buffers_attributes_and_warnings_come_along_as_they_were():
    rnn = nn.LSTM(3, 4, dropout=0.3)  # warns here, once
    rnn.register_buffer("scratch", torch.zeros(2), persistent=False)
    rnn.register_buffer("count", torch.ones(1))
    rnn.tag = "encoder"
    model = nn.Sequential(rnn)
    saved = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_torch_nn(model)
    assert isinstance(model[0], fused_rnn.LSTM) and model[0].tag == "encoder"
    assert list(model.state_dict()) == list(saved)  # scratch stays out of it
    model.load_state_dict(saved)
    assert not hasattr(to_torch_nn(fused_rnn.LSTMCell(2, 3)), "mode")


def test_the_module_inside_a_torch_compile_wrapper_is_refused():
    compiled = torch.compile(nn.GRU(3, 4))
    with pytest.raises(ValueError, match="swap before compiling"):
        from_torch_nn(compiled)
    parent = torch.compile(nn.Sequential(nn.GRU(3, 4)))  # a compiled parent is fine
    from_torch_nn(parent)
    assert isinstance(parent._orig_mod[0], fused_rnn.GRU)


@pytest.mark.parametrize("direction", ["from", "to"])
def test_a_layer_keeps_the_function_its_mode_computes(direction):
    """An RNN layer computes by the mode it was built with; a later change of .nonlinearity
    does nothing there. The swap took the attribute, so it changed the function."""
    torch.manual_seed(0)
    old = nn.RNN(3, 4) if direction == "from" else fused_rnn.RNN(3, 4)
    old.nonlinearity = "relu"  # still computes tanh
    x = torch.randn(4, 2, 3)
    want = old(x)[0]
    model = nn.Sequential(old)
    (from_torch_nn if direction == "from" else to_torch_nn)(model)
    assert type(model[0]) is not type(old)
    torch.testing.assert_close(model[0](x)[0], want, atol=1e-6, rtol=1e-5)


def test_tied_weights_children_and_parameter_order_come_along():
    """A layer whose reverse direction shares the forward one's W_hh was refused with "its
    parameters are not LSTM's" (named_parameters drops a tied name); a module a user hung on
    the layer (a dropout it calls) was dropped; and the parameters came in the standard order
    where the old module's was another (weight_norm removed re-registers a weight last), so an
    optimizer state_dict saved by position would load onto other parameters."""
    m = nn.LSTM(3, 5, bidirectional=True)
    m.weight_hh_l0_reverse = m.weight_hh_l0
    m.drop = nn.Dropout(0.5)
    m = nn.utils.remove_weight_norm(nn.utils.weight_norm(m, "weight_ih_l0"), "weight_ih_l0")
    order = [n for n, _ in m.named_parameters(remove_duplicate=False)]
    assert order[-1] == "weight_ih_l0"
    ours = from_torch_nn(nn.Sequential(m))[0]
    assert type(ours) is fused_rnn.LSTM and ours.drop is m.drop
    assert ours.weight_hh_l0_reverse is ours.weight_hh_l0 is m.weight_hh_l0
    assert [n for n, _ in ours.named_parameters(remove_duplicate=False)] == order
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(ours(x)[0], m(x)[0])
    back = to_torch_nn(nn.Sequential(ours))[0]
    assert type(back) is nn.LSTM and back.drop is m.drop
    assert [n for n, _ in back.named_parameters(remove_duplicate=False)] == order
    clash = nn.GRU(3, 5)
    clash.add_module("backend", nn.Identity())
    with pytest.raises(ValueError, match="child module 'backend' has the name of GRU's"):
        from_torch_nn(clash)
