"""Bad arguments and inputs raise what torch.nn raises (same type), with a clear message."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import CELLS, STEP_CELLS
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn

# (cell, constructor args, constructor kwargs)
BAD_CONSTRUCTORS = [
    ("lstm", (4, 6), {"dropout": 1.5}),
    ("lstm", (4, 6), {"dropout": True}),
    ("gru", (4, 6), {"dropout": -0.1}),
    ("lstm", (4, 6), {"num_layers": 0}),
    ("gru", (4, 0), {}),
    ("rnn_tanh", (0, 6), {}),
    ("lstm", (4, 6.5), {}),
    ("lstm", (4.0, 6), {}),
    ("lstm", (4, 6), {"bias": "yes"}),
    ("lstm", (4, 6), {"batch_first": 1}),
    ("lstm", (4, 6), {"proj_size": -1}),
    ("lstm", (4, 6), {"proj_size": 6}),
    ("gru", (4, 6), {"proj_size": 2}),
    ("rnn_tanh", (4, 6), {"proj_size": 2}),
    ("gru", (4, 6), {"proj_size": 0}),  # refused by keyword even when 0, as by torch.nn
    ("lstm", (4, 6), {"num_layers": 2.0}),
    ("gru", (4, 6), {"num_layers": None}),
    ("lstm", (4, 6), {"num_layers": 0.0}),  # torch.nn: ValueError by its value, before the type
    ("rnn_tanh", (4, 6), {"num_layers": -1.0}),
    ("lstm", (4, 6), {"num_layers": 2.0, "proj_size": -1}),  # the projection's ValueError first
    ("lstm", (4, 6), {"dropout": None}),  # torch.nn: float(dropout) first, a TypeError
    ("gru", (4, 6), {"dropout": "0.5"}),  # a string float() reads: the range check's ValueError
    ("lstm", (4, 6), {"proj_size": 1.0}),
    ("lstm", (4, 6), {"proj_size": True}),  # torch.nn: TypeError at the weight
    ("lstm", (4, 6), {"proj_size": -1.0}),  # ValueError before it
    ("lstm", (4, 6), {"proj_size": 6.0}),
    ("lstm", (4, 6), {"proj_size": "2"}),
    ("lstm", (4, 6), {"proj_size": None}),
    ("gru", (4, 6), {"hidden": 6}),
    ("rnn_tanh", (4, 6), {"hidden": 6}),
    ("gru", (4, 6, 1, True, False, 0.0, False, 0, "cpu", None, "extra"), {}),
    # torch.nn refuses these at the first call; a truthy "False" made ours two-way, silently
    ("lstm", (4, 6), {"bidirectional": "False"}),
    ("gru", (4, 6), {"bidirectional": 1}),
    ("rnn_tanh", (4, 6), {"bidirectional": None}),
    ("gru", (4, 6), {"num_layers": True}),  # operator.index(True) is 1
]

# Cells take what torch.nn's take (any integer size, zero too); these fail there and here.
BAD_CELL_CONSTRUCTORS = [
    ("lstm", (-1, 6), {}),
    ("gru", (4, -2), {}),
    ("rnn_tanh", (4, 6.0), {}),
    ("lstm", (None, 6), {}),
]


@pytest.mark.parametrize("step,cell,args,kwargs",
                         [(False, *c) for c in BAD_CONSTRUCTORS]
                         + [(True, *c) for c in BAD_CELL_CONSTRUCTORS], ids=lambda v: repr(v))
def test_bad_constructor_args(step, cell, args, kwargs):
    """Refused as torch.nn refuses them. An older torch.nn (2.6) takes some (a size of 0, a
    bias or batch_first that is not a bool); ours refuses those as newer ones do."""
    nn_cls, our_cls, extra = (STEP_CELLS if step else CELLS)[cell]
    try:
        nn_cls(*args, **extra, **kwargs)
    except Exception as e:
        want = type(e)
    else:
        want = (TypeError, ValueError)
    with pytest.raises(want) as got:
        our_cls(*args, **extra, **kwargs)
    assert str(got.value), "error message must not be empty"


@pytest.mark.parametrize("cls", [fused_rnn.LSTMCell, fused_rnn.GRUCell, fused_rnn.RNNCell])
def test_a_negative_cell_size_names_the_argument(cls):
    """torch.nn fails inside torch.empty ("negative dimension -6: [-6, 4]"); the cells say
    which size is wrong, with the same exception type."""
    with pytest.raises(RuntimeError, match="input_size must be at least zero, got -1"):
        cls(-1, 4)
    with pytest.raises(RuntimeError, match="hidden_size must be at least zero, got -2"):
        cls(3, -2)


@pytest.mark.parametrize("cls", [fused_rnn.LSTM, fused_rnn.GRUCell])
def test_a_bad_backend_is_refused_where_it_is_assigned(cls):
    """``m.backend = "bogus"`` used to be accepted and fail at the next call (under
    torch.compile(fullgraph=True) as dynamo's "Observed exception")."""
    m = cls(2, 3, backend="reference")
    with pytest.raises(ValueError, match="unknown backend 'bogus'; valid backends are"):
        m.backend = "bogus"
    assert m.backend == "reference"
    m.backend = "auto"
    assert m.backend == "auto"


def test_bad_nonlinearity():
    for cls in (torch.nn.RNN, fused_rnn.RNN):
        with pytest.raises(ValueError, match="nonlinearity"):
            cls(4, 6, nonlinearity="sigmoid")
    # torch.nn.RNNCell only fails at its first forward (RuntimeError); ours fails at once.
    with pytest.raises(RuntimeError, match="nonlinearity"):
        torch.nn.RNNCell(4, 6, nonlinearity="sigmoid")(torch.randn(2, 4))
    with pytest.raises(ValueError, match="nonlinearity"):
        fused_rnn.RNNCell(4, 6, nonlinearity="sigmoid")


def test_dropout_single_layer_warns():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        fused_rnn.LSTM(4, 6, dropout=0.5)


def _h(cell, L, B, H, dtype=torch.float32, c_shape=None):
    h = torch.zeros(L, B, H, dtype=dtype)
    if cell == "lstm":
        return (h, torch.zeros(*(c_shape or (L, B, H)), dtype=dtype))
    return h


def _bad_forward_cases():
    for cell in CELLS:
        yield cell, "4d-input", lambda c: (torch.randn(2, 3, 4, 1),)
        yield cell, "1d-input", lambda c: (torch.randn(4),)
        yield cell, "wrong-input-size", lambda c: (torch.randn(5, 3, 5),)
        yield cell, "dtype-mismatch", lambda c: (torch.randn(5, 3, 4, dtype=torch.float64),)
        yield cell, "hx-wrong-batch", lambda c: (torch.randn(5, 3, 4), _h(c, 1, 2, 6))
        yield cell, "hx-wrong-hidden", lambda c: (torch.randn(5, 3, 4), _h(c, 1, 3, 7))
        yield cell, "hx-wrong-layers", lambda c: (torch.randn(5, 3, 4), _h(c, 2, 3, 6))
        yield cell, "hx-2d-for-batched", lambda c: (
            torch.randn(5, 3, 4), (torch.zeros(3, 6), torch.zeros(3, 6)) if c == "lstm" else torch.zeros(3, 6))
        yield cell, "hx-3d-for-unbatched", lambda c: (torch.randn(5, 4), _h(c, 1, 1, 6))
        yield cell, "hx-dtype-mismatch", lambda c: (torch.randn(5, 3, 4), _h(c, 1, 3, 6, dtype=torch.float64))
    yield "lstm", "cx-wrong-shape", lambda c: (torch.randn(5, 3, 4), _h(c, 1, 3, 6, c_shape=(1, 3, 5)))
    for cell in CELLS:
        yield cell, "no-steps", lambda c: (torch.randn(0, 3, 4),)
        yield cell, "no-steps-unbatched", lambda c: (torch.randn(0, 4),)
    yield "lstm", "hx-three-tensors", lambda c: (torch.randn(5, 3, 4), (*_h(c, 1, 3, 6), torch.zeros(1, 3, 6)))
    # "meta" stands in for a second device on the CPU
    for cell in CELLS:
        yield cell, "hx-on-another-device", lambda c: (
            torch.randn(5, 3, 4), (torch.zeros(1, 3, 6, device="meta"), torch.zeros(1, 3, 6))
            if c == "lstm" else torch.zeros(1, 3, 6, device="meta"))
    yield "lstm", "cx-on-another-device", lambda c: (
        torch.randn(5, 3, 4), (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6, device="meta")))
    yield "lstm", "hx-one-stacked-tensor", lambda c: (torch.randn(5, 3, 4), torch.stack(_h(c, 1, 3, 6)))
    # h_0 and c_0 stacked in one 3-D tensor: torch.nn reads hx[0] and hx[1] first
    yield "lstm", "hx-stacked-3d-for-batched", lambda c: (torch.randn(5, 3, 4), torch.zeros(2, 3, 6))
    yield "lstm", "hx-stacked-2d-for-unbatched", lambda c: (torch.randn(5, 4), torch.zeros(2, 6))


def _broken_weight_cases():
    """A module whose weights PyTorch's kernels refuse (torch.nn's types; the reference
    backend ran them before)."""
    def no_bias(m):
        del m._parameters["bias_ih_l0"]
        m.bias_ih_l0 = None

    def fp64_weight(m):
        m.weight_hh_l0 = torch.nn.Parameter(m.weight_hh_l0.detach().double())

    for cell in CELLS:
        yield cell, "bias-none", no_bias
        yield cell, "one-fp64-weight", fp64_weight


@pytest.mark.parametrize("cell,case,breaks", list(_broken_weight_cases()),
                         ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_broken_weights_are_refused(cell, case, breaks, backend):
    nn_cls, our_cls, extra = CELLS[cell]
    ref, ours = nn_cls(4, 6, **extra), our_cls(4, 6, **extra, backend=backend)
    breaks(ref)
    breaks(ours)
    x = torch.randn(5, 3, 4)
    with pytest.raises(Exception) as want:
        ref(x)
    with pytest.raises(want.type, match="_l0"):
        ours(x)


@pytest.mark.parametrize("cell", list(CELLS))
def test_a_deleted_weight_is_named(cell):
    """torch.nn keeps running on a deleted weight (its list of weights still holds it); ours
    reads the attributes at each call and names the missing one, rather than the
    ``_flat_weights`` that nn.Module.__getattr__ would blame for the property's
    AttributeError."""
    _, our_cls, extra = CELLS[cell]
    m = our_cls(4, 6, **extra)
    del m.bias_ih_l0
    with pytest.raises(TypeError, match="weight bias_ih_l0 is missing"):
        m(torch.randn(5, 3, 4))


# (name, constructor kwargs, weight, its wrong shape as a function of G*H). torch.nn does not
# check these: aten's CPU LSTM reads and writes past the weights (garbage gradients, heap
# corruption), its GRU/RNN fail in a GEMM or broadcast a bias.
WRONG_WEIGHT_SHAPES = [
    ("hh-wider", {}, "weight_hh_l0", lambda g: (g, 7)),
    ("hh-narrower", {}, "weight_hh_l0", lambda g: (g, 5)),
    ("ih-fewer-rows", {}, "weight_ih_l0", lambda g: (g - 1, 4)),
    ("bias-one", {}, "bias_hh_l0", lambda g: (1,)),
    ("bias-2d", {}, "bias_ih_l0", lambda g: (1, g)),
    ("layer1-reverse", {"num_layers": 2, "bidirectional": True}, "weight_ih_l1_reverse",
     lambda g: (g, 6)),
]


@pytest.mark.parametrize("name,kwargs,weight,shape", WRONG_WEIGHT_SHAPES,
                         ids=[c[0] for c in WRONG_WEIGHT_SHAPES])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("backend", ["reference", "auto", "torch"])
def test_weights_of_the_wrong_shape_are_refused(name, kwargs, weight, shape, cell, backend):
    _, our_cls, extra = CELLS[cell]
    m = our_cls(4, 6, **extra, **kwargs, backend=backend)
    m._parameters[weight].data = torch.randn(shape(getattr(m, weight).shape[0]))
    with pytest.raises(RuntimeError, match=rf"weight {weight} has shape .* expected"):
        m(torch.randn(5, 3, 4))


WRONG_CELL_WEIGHTS = [("hh-wider", "weight_hh", lambda g: (g, 7)),
                      ("ih-fewer-rows", "weight_ih", lambda g: (g - 1, 5)),
                      ("bias-one", "bias_hh", lambda g: (1,)),
                      ("bias-2d", "bias_ih", lambda g: (1, g))]


@pytest.mark.parametrize("name,weight,shape", WRONG_CELL_WEIGHTS,
                         ids=[c[0] for c in WRONG_CELL_WEIGHTS])
@pytest.mark.parametrize("cell", list(STEP_CELLS))
@pytest.mark.parametrize("backend", ["reference", "auto", "torch", "triton"])
def test_cell_weights_of_the_wrong_shape_are_refused(name, weight, shape, cell, backend):
    """The cell modules make functional.rnn_cell's checks themselves and skip its own: a
    weight swapped for one of another shape is still refused before any kernel runs."""
    _, our_cls, extra = STEP_CELLS[cell]
    m = our_cls(5, 6, **extra, backend=backend)
    m._parameters[weight].data = torch.randn(shape(getattr(m, weight).shape[0]))
    with pytest.raises(RuntimeError, match=rf"weight {weight} has shape .* expected"):
        m(torch.randn(3, 5), None)


@pytest.mark.parametrize("x_shape,h_shape,H", [((3,), (1, 1), 1), ((3,), (1, 4), 4),
                                                ((3,), (2, 4), 4), ((2, 3), (4,), 4)],
                         ids=["x1d-h2d-H1", "x1d-h2d", "x1d-h2d-B2", "x2d-h1d"])
@pytest.mark.parametrize("cell", list(STEP_CELLS))
@pytest.mark.parametrize("backend", ["reference", "auto", "torch", "triton"])
def test_cell_input_and_hidden_of_different_dims_are_refused(cell, backend, x_shape, h_shape, H):
    """Batched input with an unbatched state or the reverse. torch.nn's cells raise the
    RuntimeError of a size mismatch of the state they unsqueezed ("hidden0 has inconsistent
    hidden_size: got 1, expected 4"), and nn.LSTMCell of hidden size 1 crashes the process (a
    segfault in aten's lstm_cell on x (I,) and h (1, 1), torch 2.13 CPU), so it is not run
    here. Ours says what is wrong, in the words of torch.nn's layers."""
    _, our_cls, extra = STEP_CELLS[cell]
    m = our_cls(3, H, **extra, backend=backend)
    h = torch.randn(h_shape)
    kind = "batched 2-D" if len(x_shape) == 2 else "unbatched 1-D"
    with pytest.raises(RuntimeError, match=rf"for {kind} input, hx.* should also be "
                                           rf"{len(x_shape)}-D but got \(?{len(h_shape)}-D"):
        m(torch.randn(x_shape), (h, h) if cell == "lstm" else h)


def test_cell_of_integer_weights_says_input_must_be_floating():
    m = fused_rnn.GRUCell(5, 6)
    for name, p in list(m.named_parameters()):
        setattr(m, name, torch.nn.Parameter(p.detach().long(), requires_grad=False))
    with pytest.raises(TypeError, match="input must be floating point, got torch.int64"):
        m(torch.ones(3, 5, dtype=torch.long))


def test_weights_are_checked_against_the_sizes_as_they_are_now():
    """nn lets a user change input_size and swap in weights of the new size; the check follows
    the settings at the call, not those the module was built with."""
    ref, ours = torch.nn.LSTM(3, 4), fused_rnn.LSTM(3, 4)
    ours.load_state_dict(ref.state_dict())
    w = torch.randn(16, 5)
    for m in (ref, ours):
        m.input_size = 5
        m.weight_ih_l0 = torch.nn.Parameter(w.clone())
    x = torch.randn(2, 1, 5)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])


def test_lstm_projection_weight_of_the_wrong_shape_is_refused():
    m = fused_rnn.LSTM(4, 6, proj_size=3)
    m.weight_hr_l0.data = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"weight_hr_l0 has shape \(3, 5\), expected \(3, 6\)"):
        m(torch.randn(5, 3, 4))


@pytest.mark.parametrize("hx,kind,said", [
    ("one", IndexError, "two tensors, got 1"), ("none", IndexError, "two tensors, got 0"),
])
def test_lstm_hx_of_the_wrong_length_says_so(hx, kind, said):
    """torch.nn fails on a 0- or 1-tuple with an IndexError from indexing it; ours says what
    is wrong, as the RuntimeError nn gives a 3-tuple ("lstm expects two hidden states")."""
    h = torch.zeros(1, 3, 6)
    given = (h,) if hx == "one" else ()
    with pytest.raises(kind):
        torch.nn.LSTM(4, 6)(torch.randn(5, 3, 4), given)
    with pytest.raises(RuntimeError, match=said):
        fused_rnn.LSTM(4, 6)(torch.randn(5, 3, 4), given)


@pytest.mark.parametrize("stacked", [False, True], ids=["tuple", "stacked"])
def test_unbatched_lstm_hx_of_three_tensors_is_refused(stacked):
    """An unbatched torch.nn.LSTM takes (h, c, anything), or three stacked in one tensor, and
    drops the third; ours refuses it, as torch.nn does for batched input."""
    h = torch.zeros(1, 4)
    hx = torch.stack([h, h, h]) if stacked else (h, h, h)
    torch.nn.LSTM(3, 4)(torch.randn(5, 3), hx)  # accepted there
    with pytest.raises(RuntimeError, match=r"hx must be a tuple \(h_0, c_0\) of two tensors, got 3"):
        fused_rnn.LSTM(3, 4)(torch.randn(5, 3), hx)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_unbatched_lstm_takes_h_and_c_stacked_in_one_tensor(backend):
    """torch.nn.LSTM reads hx[0] and hx[1]: with an unbatched input, h_0 and c_0 stacked in one
    (2, L, H) tensor are taken, and so they are here, with the same results and gradients."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 5, 2)
    ours = fused_rnn.LSTM(3, 5, 2, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3)
    hc = torch.randn(2, 2, 5, requires_grad=True)
    want = ref(x, hc)
    got = ours(x, hc)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(a, b)
    (g_want,) = torch.autograd.grad(want[0].sum(), hc)
    (g_got,) = torch.autograd.grad(got[0].sum(), hc)
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("fault", ["width", "state-rows", "state-layers", "state-size"])
@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_packed_input_is_checked_as_unpacked_input_is(cell, fault, backend):
    """torch.nn checks less of packed input (torch 2.13): nn.LSTM's forward skips
    check_forward_args for it, so it accepts an input of the wrong width or a state of the
    wrong layer count (and with h of 3 layers and c of 2 on a bidirectional layer, segfaults);
    GRU and RNN reorder the state by the sort before checking it, so a state with more rows
    than the batch passes (some rows picked). Ours refuses each in torch.nn's unpacked words;
    torch.nn is not run here."""
    _, our_cls, extra = CELLS[cell]
    m = our_cls(3, 4, **extra, bidirectional=True, backend=backend)
    x = torch.randn(5, 2, 5 if fault == "width" else 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=False)
    shape = {"width": (2, 2, 4), "state-rows": (2, 4, 4), "state-layers": (3, 2, 4),
             "state-size": (2, 2, 5)}[fault]
    h = torch.randn(shape)
    said = "input.size(-1) must be equal to input_size" if fault == "width" else "Expected hidden"
    with pytest.raises(RuntimeError, match=re.escape(said)):
        m(packed, (h, torch.randn(2, 2, 4)) if cell == "lstm" else h)


def test_a_lone_h0_for_a_batched_multilayer_lstm_gets_torch_nns_message():
    """A common mistake: h_0 alone for a 3-layer LSTM. torch.nn reads hx[0] and hx[1] of the
    (3, B, H) tensor and says they should be 3-D; ours took its 3 rows as 3 tensors ("got
    3"), a message that changed with the layer count."""
    x, h = torch.randn(5, 2, 4), torch.zeros(3, 2, 6)
    said = "For batched 3-D input, hx and cx should also be 3-D but got (2-D, 2-D) tensors"
    for m in (torch.nn.LSTM(4, 6, 3), fused_rnn.LSTM(4, 6, 3, backend="reference")):
        with pytest.raises(RuntimeError, match=re.escape(said)):
            m(x, h)


@pytest.mark.parametrize("fault,said", [
    ("short", "batch_sizes sum to 4 rows, but its data has 5"),
    ("int32", "batch_sizes must be a 1-D int64 CPU tensor, got a 1-D torch.int32 one"),
    ("increasing", "batch_sizes must be positive and non-increasing"),
    ("zero", "batch_sizes must be positive and non-increasing"),
])
@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_a_malformed_packed_sequence_is_refused_by_its_batch_sizes(fault, said, backend):
    """PackedSequence's constructor takes any batch_sizes. A short one made the fused backends
    drop rows silently (torch.nn's LSTM fails on a view's shape, its GRU takes it), an int32
    one was named 'lengths'. Each is refused up front, naming batch_sizes."""
    from torch.nn.utils.rnn import PackedSequence

    data, bs = torch.randn(5, 3), {"short": [2, 2], "int32": [2, 2, 1], "increasing": [2, 3],
                                   "zero": [3, 2, 0]}[fault]
    bs = torch.tensor(bs, dtype=torch.int32 if fault == "int32" else torch.int64)
    packed = PackedSequence(data, bs)
    for cls in (fused_rnn.LSTM, fused_rnn.GRU):
        with pytest.raises(RuntimeError, match=re.escape(said)):
            cls(3, 4, backend=backend)(packed)


def test_dropout_set_after_construction_is_checked_where_it_applies():
    """torch.nn reads dropout only in training with more than one layer, and refuses one
    outside [0, 1] there with a RuntimeError; ours refused it everywhere, with a ValueError."""
    x = torch.randn(3, 2, 4)
    for layers, training in ((1, True), (2, False), (2, True)):
        for cls, kw in ((torch.nn.GRU, {}), (fused_rnn.GRU, {"backend": "reference"})):
            m = cls(4, 5, layers, **kw).train(training)
            m.dropout = 2.0
            if layers == 2 and training:
                with pytest.raises(RuntimeError,
                                   match="dropout probability has to be between 0 and 1, but got 2"):
                    m(x)
            else:
                m(x)


@pytest.mark.parametrize("attr,value", [("num_layers", 2), ("bidirectional", True)])
def test_settings_that_size_the_weights_changed_later_are_a_runtime_error(attr, value):
    """torch.nn fails on them with a RuntimeError from its kernel ("Expected more weights");
    ours gave the functional layer's ValueError, which named no setting."""
    x = torch.randn(3, 2, 4)
    nn_m, ours = torch.nn.LSTM(4, 5), fused_rnn.LSTM(4, 5, backend="reference")
    for m in (nn_m, ours):
        setattr(m, attr, value)
    with pytest.raises(RuntimeError):
        nn_m(x)
    with pytest.raises(RuntimeError, match=f"{attr}={value}.* build a new module to change them"):
        ours(x)


def test_an_input_unlike_the_first_weight_is_named_before_the_weights_disagree():
    """torch.nn compares the input with the first weight before anything else: a first weight
    made fp64 with fp32 input is its ValueError ("input dtype ... does not match weight
    dtype"), not ours about the weights' dtypes disagreeing."""
    x = torch.randn(3, 2, 4)
    for m in (torch.nn.LSTM(4, 5), fused_rnn.LSTM(4, 5, backend="reference")):
        m.weight_ih_l0.data = m.weight_ih_l0.data.double()
        with pytest.raises(ValueError, match="does not match weight dtype"):
            m(x)


def test_gru_hx_tuple_says_so():
    """torch.nn.GRU fails on a tuple hx with an AttributeError ('tuple' has no 'dim')."""
    h = torch.zeros(1, 3, 6)
    with pytest.raises(AttributeError):
        torch.nn.GRU(4, 6)(torch.randn(5, 3, 4), (h,))
    with pytest.raises(TypeError, match="hx must be a tensor"):
        fused_rnn.GRU(4, 6)(torch.randn(5, 3, 4), (h,))


# Where torch.nn's message comes from deep inside aten, ours says what is wrong in the module's
# terms instead (the exception type stays nn's): an LSTM or LSTMCell hx that is not a pair (nn:
# "lstm_cell expects two hidden states", or the binding's "argument 'hx' (position 2)" and
# "lstm() received an invalid combination of arguments"), and an hx whose dtype
# differs from the input's (nn on the CPU: "get_mkldnn_dtype: unsupported data type").
OWN_MESSAGES = {"hx-empty", "hx-one", "hx-three", "hx-tensor", "hx-stacked", "hx-dtype-mismatch",
                "hx-three-tensors", "hx-one-stacked-tensor"}


# Messages an older torch.nn words otherwise; ours are the newer torch's (2.13's), which say
# more. On such a torch, ours must still be the newer wording.
OLDER_WORDINGS = {
    # torch 2.6
    "dtype-mismatch": (r"input must have the type torch\.\w+, got type torch\.\w+",
                       (r"RNN input dtype \(torch\.\w+\) does not match weight dtype "
                        r"\(torch\.\w+\)\. Convert input: .*")),
}


def _assert_same_message(got, want, case):
    """Our error is torch.nn's, word for word, except in the cases above, where it must still
    say something."""
    if case in OWN_MESSAGES:
        assert str(got) and str(got) != str(want)
    elif case in OLDER_WORDINGS and re.fullmatch(OLDER_WORDINGS[case][0], str(want)):
        assert re.fullmatch(OLDER_WORDINGS[case][1], str(got)), str(got)
    else:
        assert str(got) == str(want)


@pytest.mark.parametrize("cell,case,make", list(_bad_forward_cases()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_forward_inputs(cell, case, make, backend):
    nn_cls, our_cls, extra = CELLS[cell]
    torch.manual_seed(0)
    ref = nn_cls(4, 6, **extra)
    ours = our_cls(4, 6, **extra, backend=backend)
    args = make(cell)
    with pytest.raises(Exception) as want:
        ref(*args)
    with pytest.raises(want.type) as got:
        ours(*args)
    _assert_same_message(got.value, want.value, case)


def _bad_cell_cases():
    for cell in STEP_CELLS:
        lstm = cell == "lstm"

        def hx(B, H, dtype=torch.float32, lstm=lstm):
            h = torch.zeros(B, H, dtype=dtype)
            return (h, h) if lstm else h

        yield cell, "3d-input", lambda hx=hx: (torch.randn(2, 3, 5),)
        yield cell, "wrong-input-size", lambda hx=hx: (torch.randn(2, 4),)
        yield cell, "hx-batch-mismatch", lambda hx=hx: (torch.randn(2, 5), hx(3, 6))
        yield cell, "hx-hidden-mismatch", lambda hx=hx: (torch.randn(2, 5), hx(2, 7))
        yield cell, "hx-3d", lambda hx=hx, lstm=lstm: (
            torch.randn(2, 5), (torch.zeros(1, 2, 6),) * 2 if lstm else torch.zeros(1, 2, 6))
        if lstm:
            h = torch.zeros(2, 6)
            yield cell, "hx-empty", lambda h=h: (torch.randn(2, 5), ())
            yield cell, "hx-one", lambda h=h: (torch.randn(2, 5), (h,))
            yield cell, "hx-three", lambda h=h: (torch.randn(2, 5), (h, h, h))
            yield cell, "hx-tensor", lambda h=h: (torch.randn(2, 5), h)
            yield cell, "hx-stacked", lambda h=h: (torch.randn(2, 5), torch.stack([h, h]))


@pytest.mark.parametrize("cell,case,make", list(_bad_cell_cases()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_cell_inputs(cell, case, make, backend):
    nn_cls, our_cls, extra = STEP_CELLS[cell]
    ref = nn_cls(5, 6, **extra)
    ours = our_cls(5, 6, **extra, backend=backend)
    args = make()
    with pytest.raises(Exception) as want:
        ref(*args)
    with pytest.raises(want.type) as got:
        ours(*args)
    _assert_same_message(got.value, want.value, case)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("cell", list(STEP_CELLS))
def test_cell_with_weights_of_two_dtypes_is_refused(cell, backend):
    nn_cls, our_cls, extra = STEP_CELLS[cell]
    ref, ours = nn_cls(5, 6, **extra), our_cls(5, 6, **extra, backend=backend)
    for m in (ref, ours):
        m.weight_hh = torch.nn.Parameter(m.weight_hh.detach().double())
    with pytest.raises(Exception) as want:
        ref(torch.randn(2, 5))
    with pytest.raises(want.type, match="weight_hh"):
        ours(torch.randn(2, 5))


def test_module_on_other_device_is_rejected():
    lstm = fused_rnn.LSTM(4, 6, backend="reference", device="meta")
    with pytest.raises(RuntimeError, match="same device"):
        lstm(torch.randn(5, 3, 4))


# ------------------------------------------------------------------ devices, dtypes, hx kinds
# "meta" stands in for a second device on the CPU: each check below comes before any kernel.
@pytest.mark.parametrize("weight", ["weight_hh_l0", "bias_ih_l0", "weight_ih_l1"])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_weight_on_another_device_is_refused(weight, cell, backend):
    """torch.nn compares each weight with the input ("not at the same device"); ours names the
    weight and compares it with the first."""
    nn_cls, our_cls, extra = CELLS[cell]
    ref, ours = nn_cls(4, 6, 2, **extra), our_cls(4, 6, 2, **extra, backend=backend)
    for m in (ref, ours):
        setattr(m, weight, torch.nn.Parameter(getattr(m, weight).detach().to("meta")))
    x = torch.randn(5, 3, 4)
    with pytest.raises(Exception) as want:
        ref(x)
    with pytest.raises(want.type, match=rf"weight {weight} is on meta but weight_ih_l0 is on cpu"):
        ours(x)


def _cell_device_and_dtype_cases():
    """(cell, case, what to move to meta, the call's arguments, what ours says). torch.nn fails
    in aten on each ("not on the expected device", "mat1 and mat2 must have the same dtype")."""
    x, h = torch.randn(2, 5), torch.zeros(2, 6)
    for cell in STEP_CELLS:
        lstm = cell == "lstm"

        def hx(first, lstm=lstm):
            return (first, h) if lstm else first

        for bias in ("bias_ih", "bias_hh"):
            yield cell, f"{bias}-on-meta", bias, (x,), f"{bias} is on meta but weight_ih is on cpu"
        yield cell, "input-fp64", None, (x.double(),), (
            r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)")
        yield cell, "input-on-meta", None, (x.to("meta"),), (
            "input is on meta but the parameters are on cpu")
        yield cell, "parameters-on-meta", "all", (x,), "input is on cpu but the parameters are on meta"
        yield cell, "hx-on-meta", None, (x, hx(h.to("meta"))), "hidden0 is on meta, input on cpu"
        yield cell, "hx-fp64", None, (x, hx(h.double())), (
            r"hidden0 dtype \(torch.float64\) does not match input dtype \(torch.float32\)")
        if lstm:
            yield cell, "cx-on-meta", None, (x, (h, h.to("meta"))), "hidden1 is on meta, input on cpu"


@pytest.mark.parametrize("cell,case,moved,args,said", list(_cell_device_and_dtype_cases()),
                         ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_cell_inputs_and_weights_on_another_device_or_dtype(cell, case, moved, args, said,
                                                             backend):
    """torch.nn's exception type, with what is where said in the cell's terms."""
    nn_cls, our_cls, extra = STEP_CELLS[cell]
    ref, ours = nn_cls(5, 6, **extra), our_cls(5, 6, **extra, backend=backend)
    for m in (ref, ours):
        if moved == "all":
            m.to("meta")
        elif moved:
            setattr(m, moved, torch.nn.Parameter(getattr(m, moved).detach().to("meta")))
    with pytest.raises(Exception) as want:
        ref(*args)
    with pytest.raises(want.type, match=f"{type(ours).__name__}: {said}"):
        ours(*args)


@pytest.mark.parametrize("hx", ["none", "list"])
def test_lstm_hx_of_non_tensors_says_so(hx):
    """torch.nn fails on ``(h, None)`` with an AttributeError ('NoneType' has no 'dim'); ours
    says what is wrong, as the TypeError for an hx that is not a tuple."""
    h = torch.zeros(1, 3, 6)
    given = (h, None if hx == "none" else h.tolist())
    with pytest.raises(AttributeError):
        torch.nn.LSTM(4, 6)(torch.randn(5, 3, 4), given)
    kind = "NoneType" if hx == "none" else "list"
    with pytest.raises(TypeError, match=rf"two tensors, got \(Tensor, {kind}\)"):
        fused_rnn.LSTM(4, 6, backend="reference")(torch.randn(5, 3, 4), given)


@pytest.mark.parametrize("cell,hx", [("lstm", "none-in-pair"), ("lstm", "list"), ("gru", "list"),
                                     ("rnn_relu", "str")])
def test_cell_hx_of_non_tensors_says_so(cell, hx):
    """torch.nn's cells fail with an AttributeError (no 'dim'); ours with a TypeError."""
    nn_cls, our_cls, extra = STEP_CELLS[cell]
    h = torch.zeros(2, 6)
    given = {"none-in-pair": (h, None), "list": h.tolist(), "str": "h"}[hx]
    if cell == "lstm" and hx != "none-in-pair":
        given = (h, given)
    with pytest.raises(AttributeError):
        nn_cls(5, 6, **extra)(torch.randn(2, 5), given)
    said = "two tensors" if cell == "lstm" else "a tensor"
    with pytest.raises(TypeError, match=f"{our_cls.__name__}: hx must be {said}"):
        our_cls(5, 6, **extra, backend="reference")(torch.randn(2, 5), given)


@pytest.mark.parametrize("cell", ["gru", "rnn_tanh"])
def test_a_positional_proj_size_is_refused_by_gru_and_rnn(cell):
    """torch.nn builds a GRU/RNN given proj_size positionally (eighth for GRU, ninth for RNN)
    and fails at its first call ("Expected hidden size (1, 3, 2)"); ours refuses it at once,
    as nn does by keyword. A positional 0 is taken by both."""
    nn_cls, our_cls, _ = CELLS[cell]
    head = (4, 6, 1) + (("tanh",) if cell == "rnn_tanh" else ())
    args = head + (True, False, 0.0, False, 2)
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        nn_cls(*args)(torch.randn(5, 3, 4))
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        our_cls(*args)
    assert our_cls(*args[:-1], 0).proj_size == 0


def test_repr_shows_dropout_and_a_cells_bias_and_nonlinearity():
    """As torch.nn's: a layer's dropout, a cell's bias=False and nonlinearity=relu."""
    for make in (lambda m: m.LSTM(4, 6, 2, dropout=0.25),
                 lambda m: m.RNNCell(4, 6, bias=False, nonlinearity="relu"),
                 lambda m: m.GRUCell(4, 6, bias=False)):
        assert repr(make(fused_rnn)) == repr(make(torch.nn))
    assert "dropout=0.25" in repr(fused_rnn.GRU(4, 6, 2, dropout=0.25))
    assert "bias=False, nonlinearity=relu" in repr(fused_rnn.RNNCell(4, 6, False, "relu"))


@pytest.mark.parametrize("cls", [fused_rnn.GRU, fused_rnn.LSTMCell])
def test_torchscript_is_refused_clearly(cls):
    """torch.jit.script would otherwise fail deep in its frontend with a message about
    getattr; say what works instead."""
    with pytest.raises(RuntimeError, match=r"TorchScript.*torch\.compile or torch\.export"):
        torch.jit.script(torch.nn.Sequential(cls(4, 6)))
    # A user's subclass: the torch.nn class to script is its fused_rnn base's (torch.nn has
    # no class of the subclass's name, which the message named).
    sub = type("MyRecurrent", (cls,), {})
    with pytest.raises(RuntimeError, match=rf"^MyRecurrent \(a fused_rnn\.{cls.__name__}\) ") as e:
        torch.jit.script(sub(4, 6))
    # The advice works where it is given: a scripted torch.nn cell runs with our state_dict.
    # A scripted torch.nn layer has no forward on torch 2.13, so for a layer none is given.
    advised = f"script a torch.nn.{cls.__name__} with" in str(e.value)
    assert advised == cls.__name__.endswith("Cell"), e.value
    if advised:
        scripted = torch.jit.script(getattr(torch.nn, cls.__name__)(4, 6))
        scripted.load_state_dict(cls(4, 6).state_dict())
        scripted(torch.randn(2, 4))


# ------------------------------------------------------------------ the functional API
def _layer_args(mode="LSTM", T=3, B=3, I=4, H=8):
    G = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[mode]
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(T, B, I, generator=g), h0=torch.randn(B, H, generator=g),
                c0=torch.randn(B, H, generator=g) if mode == "LSTM" else None,
                w_ih=torch.randn(G * H, I, generator=g), w_hh=torch.randn(G * H, H, generator=g),
                b_ih=torch.randn(G * H, generator=g), b_hh=torch.randn(G * H, generator=g))


# (name, mode, change to the arguments, exception): each would have the Triton kernels read
# or write out of bounds, or return a wrong answer; every backend refuses it first.
BAD_LAYER_ARGS = [
    ("h0-short-batch", "GRU", lambda a: {"h0": a["h0"][:2]}, RuntimeError),
    ("h0-1d", "GRU", lambda a: {"h0": a["h0"][0]}, RuntimeError),
    ("c0-one-row", "LSTM", lambda a: {"c0": a["c0"][:1]}, RuntimeError),
    ("c0-missing", "LSTM", lambda a: {"c0": None}, ValueError),
    ("c0-for-gru", "GRU", lambda a: {"c0": a["h0"]}, ValueError),
    ("w_hh-columns", "RNN_TANH", lambda a: {"w_hh": a["w_hh"][:, :6]}, RuntimeError),
    ("w_hh-rows", "LSTM", lambda a: {"w_hh": torch.randn(33, 8)}, RuntimeError),
    ("b_hh-short", "LSTM", lambda a: {"b_hh": a["b_hh"][:31]}, RuntimeError),
    ("b_hh-scalar", "GRU", lambda a: {"b_hh": a["b_hh"][:1]}, RuntimeError),
    ("lengths-short", "GRU", lambda a: {"lengths": torch.tensor([3, 2])}, RuntimeError),
    ("lengths-float", "GRU", lambda a: {"lengths": torch.tensor([3.0, 2.0, 1.0])}, TypeError),
    ("w_hr-for-gru", "GRU", lambda a: {"w_hr": torch.randn(8, 8)}, ValueError),
    ("w_hr-transposed", "LSTM", lambda a: {"w_hh": torch.randn(32, 4),
                                           "h0": torch.randn(3, 4), "w_hr": torch.randn(8, 4)},
     RuntimeError),
    ("w_hh-on-meta", "GRU", lambda a: {"w_hh": a["w_hh"].to("meta")}, RuntimeError),
    ("x-integer", "GRU", lambda a: {"x": a["x"].long()}, TypeError),
    ("x-2d", "GRU", lambda a: {"x": a["x"][0]}, RuntimeError),
    # without a projection w_hh is (G*H, H), even where h0 agrees with other columns
    ("w_hh-and-h0-columns", "LSTM", lambda a: {"w_hh": a["w_hh"][:, :6], "h0": a["h0"][:, :6]},
     RuntimeError),
    ("b_ih-list", "GRU", lambda a: {"b_ih": a["b_ih"].tolist()}, TypeError),
    ("lengths-list", "GRU", lambda a: {"lengths": [3, 2, 1]}, TypeError),
    ("x-list", "GRU", lambda a: {"x": a["x"].tolist()}, TypeError),
    ("w_hh-array", "LSTM", lambda a: {"w_hh": a["w_hh"].numpy()}, TypeError),
]


@pytest.mark.parametrize("name,mode,change,exc", BAD_LAYER_ARGS, ids=[c[0] for c in BAD_LAYER_ARGS])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_functional_layer_refuses_arguments_of_the_wrong_shape(name, mode, change, exc, backend,
                                                               monkeypatch):
    from fused_rnn import backends, functional

    if backends.unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(f"backend {backend}: {backends.unavailable_reason(backend, torch.device('cpu'))}")
    launched = []
    if backend == "triton":
        from fused_rnn.ops.triton import launch

        real = launch.layer_forward
        monkeypatch.setattr(launch, "layer_forward", lambda *a, **k: launched.append(1) or real(*a, **k))
    a = _layer_args(mode)
    a.update(change(a))
    lengths, w_hr = a.pop("lengths", None), a.pop("w_hr", None)
    with pytest.raises(exc, match="rnn_layer"):
        functional.rnn_layer(mode, a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                             a["b_hh"], w_hr, lengths=lengths, backend=backend)
    assert not launched


def test_functional_cell_and_stack_refuse_arguments_of_the_wrong_shape():
    from fused_rnn import functional

    a = _layer_args("LSTM")
    with pytest.raises(RuntimeError, match="rnn_cell: c0 must have shape"):
        functional.rnn_cell("LSTM", a["x"][0], a["h0"], a["c0"][:1], a["w_ih"], a["w_hh"])
    with pytest.raises(RuntimeError, match="rnn_cell: h0 must have shape"):
        functional.rnn_cell("GRU", a["x"][0, :2], a["h0"], None, a["w_ih"][:24], a["w_hh"][:24])
    w = [(a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], None)]
    for kw, said in [({"num_layers": 0}, "num_layers"), ({"dropout": -0.5}, "dropout"),
                     ({"hx": a["h0"][None].repeat(2, 1, 1)}, "hx must be"),
                     ({"weights": w * 2}, "weight tuples")]:  # one layer, two tuples
        args = {"num_layers": 1, "bidirectional": False, "hx": a["h0"][None], "weights": w,
                **kw}
        hx, weights = args.pop("hx"), args.pop("weights")
        with pytest.raises((ValueError, RuntimeError), match=said):
            functional.rnn("LSTM", a["x"], hx, a["c0"][None], weights, backend="reference",
                           **args)


def test_functional_refuses_an_unknown_mode():
    """Before anything else (a bad backend name too); the kernels' ops check it again (here
    the CUDA op's fake, on meta tensors)."""
    import fused_rnn.ops.cuda.ops  # noqa: F401 (registers the op)
    from fused_rnn import functional

    a = _layer_args("GRU")
    with pytest.raises(ValueError, match=r"unknown mode 'LSTMP'; expected one of \('LSTM'"):
        functional.rnn_layer("LSTMP", a["x"], a["h0"], None, a["w_ih"], a["w_hh"],
                             backend="bogus")
    with pytest.raises(ValueError, match="unknown mode 'gru'"):
        functional.rnn_cell("gru", a["x"][0], a["h0"], None, a["w_ih"], a["w_hh"])
    m = {k: (None if v is None else v.to("meta")) for k, v in a.items()}
    with pytest.raises(ValueError, match=r"unknown mode 'LSTMP'; expected one of \('LSTM'"):
        torch.ops.fused_rnn.cuda_layer("LSTMP", m["x"], m["h0"], None, m["w_ih"], m["w_hh"],
                                       m["b_ih"], m["b_hh"], None, False, False, False)


def test_cuda_layer_op_checks_its_arguments_too():
    """The CUDA op (its fake here, on meta tensors) refuses what the kernels would index out of
    bounds, before the binding's own checks."""
    import fused_rnn.ops.cuda.ops  # noqa: F401 (registers the op)

    a = {k: (None if v is None else v.to("meta")) for k, v in _layer_args("LSTM").items()}
    op = torch.ops.fused_rnn.cuda_layer
    op("LSTM", a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], None,
       False, False, False)  # the right shapes pass
    with pytest.raises(RuntimeError, match="c0 must have shape"):
        op("LSTM", a["x"], a["h0"], a["c0"][:1], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
           None, False, False, False)


# ------------------------------------------------- the functional API and the registered ops
def _lstm_args(T=3, B=2, I=4, H=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(dtype)

    return r(T, B, I), r(B, H), r(B, H), r(4 * H, I), r(4 * H, H), r(4 * H), r(4 * H)


def _compiled_layer(*args, **kwargs):
    import fused_rnn.functional as Fr

    torch._dynamo.reset()
    try:
        return torch.compile(lambda *a: Fr.rnn_layer("LSTM", *a, **kwargs),
                             backend="aot_eager")(*args)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("case", ["b_hh only", "b_ih only", "T=0", "B=0", "H=0",
                                  "bf16 weights", "fp64 h0"])
def test_compiled_functional_layer_is_eager_where_onednn_cannot_take_it(case):
    """Compiled on the CPU, fused_rnn.functional.rnn_layer on auto runs aten's oneDNN LSTM as
    one op (ops/aten_cpu.py), which takes one dtype, both biases or neither, and no size of 0;
    elsewhere it runs the reference math, as eager does. Before, a lone b_hh was dropped (a
    wrong answer), a lone b_ih hit an internal assert, T=0 returned garbage states, a size of 0
    killed the process (SIGFPE), and mixed dtypes gave oneDNN's opaque errors."""
    import fused_rnn.functional as Fr

    T, B, H = {"T=0": (0, 2, 5), "B=0": (3, 0, 5), "H=0": (3, 2, 0)}.get(case, (3, 2, 5))
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _lstm_args(T=T, B=B, H=H)
    if case == "b_hh only":
        b_ih = None
    elif case == "b_ih only":
        b_hh = None
    elif case == "bf16 weights":
        w_ih, w_hh = w_ih.bfloat16(), w_hh.bfloat16()
    elif case == "fp64 h0":
        h0 = h0.double()
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    want = Fr.rnn_layer("LSTM", *args, backend="auto")
    got = _compiled_layer(*args, backend="auto")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if case == "T=0":
        assert torch.equal(got[1], h0) and torch.equal(got[2], c0)


def test_the_onednn_ops_refuse_what_their_kernel_cannot_take():
    """fused_rnn::aten_lstm_layer and its backward, called directly: oneDNN checks nothing
    (a short bias was read past its end, an h0 of another batch corrupted the heap), so the
    ops check the layer's shapes, dtypes and biases, and the backward its saved tensors."""
    from fused_rnn.ops import aten_cpu

    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _lstm_args()
    bad = {
        "short bias": ((x, h0, c0, w_ih, w_hh, b_ih[:3], b_hh[:3]), "b_ih must have shape"),
        "narrow w_ih": ((x, h0, c0, w_ih[:, :2], w_hh, b_ih, b_hh), "w_ih must have shape"),
        "h0 batch": ((x, h0[:1], c0, w_ih, w_hh, b_ih, b_hh), "h0 must have shape"),
        "one bias": ((x, h0, c0, w_ih, w_hh, None, b_hh), "both biases or neither"),
        "dtypes": ((x, h0, c0, w_ih.bfloat16(), w_hh, b_ih, b_hh), "takes one dtype"),
        "empty": ((x[:0], h0, c0, w_ih, w_hh, b_ih, b_hh), "a size of 0"),
    }
    for name, (args, said) in bad.items():
        with pytest.raises(RuntimeError, match=said):
            aten_cpu.aten_lstm_layer(*args, False, True)
            pytest.fail(f"{name}: accepted")
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    y, h_n, c_n, ws = aten_cpu.aten_lstm_layer(*args, False, True)
    dy, dh, dc = torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n)
    good = aten_cpu.aten_lstm_layer_backward(*args, False, y, h_n, c_n, ws, dy, dh, dc)
    assert [tuple(g.shape) for g in good[:5]] == [tuple(t.shape) for t in args[:5]]
    for saved, said in (((y, h_n, c_n, ws, dy[:1], dh, dc), "dy must have shape"),
                        ((y, h_n, c_n, ws, dy, dh[:1], dc), "dh_n must have shape"),
                        ((y[:, :1], h_n, c_n, ws, dy, dh, dc), "y must have shape"),
                        ((y, h_n, c_n, ws, dy.double(), dh, dc), "dy must be torch.float32"),
                        ((y, h_n, c_n, ws[:0], dy, dh, dc), "workspace must be the forward")):
        with pytest.raises(RuntimeError, match=said):
            aten_cpu.aten_lstm_layer_backward(*args, False, *saved)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_the_triton_backward_ops_refuse_saved_tensors_of_another_shape(mode):
    """fused_rnn::triton_layer_backward and triton_cell_backward, called directly, check the
    forward's outputs and the incoming gradients against the layer's sizes before any kernel
    runs: an undersized dy was read out of bounds (dx off by 2e20), and a short dh1 corrupted
    the heap. (The checks run before the launch, so no Triton kernel runs here.)"""
    from fused_rnn.ops.triton import ops

    T, B, I, H = 3, 2, 4, 5
    G = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[mode]
    lstm = mode == "LSTM"
    x, h0, w_ih, w_hh = torch.randn(T, B, I), torch.randn(B, H), torch.randn(G * H, I), \
        torch.randn(G * H, H)
    c0 = torch.randn(B, H) if lstm else None
    y, gates = torch.randn(T, B, H), torch.randn(T, B, G * H)
    state = torch.randn(T, B, H) if mode != "RNN_TANH" else torch.zeros(0)
    dy, dh, dc = torch.randn(T, B, H), torch.randn(B, H), (torch.randn(B, H) if lstm else None)

    def layer(**kw):
        a = {**dict(y=y, gates=gates, state=state, dy=dy, dh_n=dh, dc_n=dc), **kw}
        return ops.triton_layer_backward(mode, x, h0, c0, w_ih, w_hh, None, None, None, None,
                                         False, a["y"], a["gates"], a["state"], a["dy"],
                                         a["dh_n"], a["dc_n"], "auto")

    for kw, said in (({"dy": dy[:1]}, "dy must have shape"),
                     ({"dh_n": dh[:1]}, "dh_n must have shape"),
                     ({"y": y[:2]}, "y must have shape"),
                     ({"gates": gates[:, :1]}, "gates must have shape"),
                     ({"gates": gates.double()}, "gates must be torch.float32"),
                     ({"gates": torch.zeros(0)}, "the forward did not save its gates")):
        with pytest.raises(RuntimeError, match=said):
            layer(**kw)
    # A complex incoming gradient lost its imaginary part (dh_n, dc_n) or failed inside Triton.
    for name in ("dy", "dh_n"):
        with pytest.raises(TypeError, match=f"{name} is complex"):
            layer(**{name: {"dy": dy, "dh_n": dh}[name] + 1j})
    if mode != "RNN_TANH":
        with pytest.raises(RuntimeError, match="state must have shape"):
            layer(state=state[:1])
    if lstm:
        with pytest.raises(RuntimeError, match="dc_n must have shape"):
            layer(dc_n=dc[:1])
    with pytest.raises(RuntimeError, match="dh1 must have shape"):
        ops.triton_cell_backward(mode, x[0], h0, c0, w_ih, w_hh, None, None, y[0], gates[:1],
                                 state[:1] if state.numel() else state, dh[:1, :1], dc)


def test_lengths_of_a_dtype_torch_cannot_compare_are_refused_first():
    """uint16/32/64 lengths passed the check and failed inside the backward (torch cannot
    promote them), the reference's as well; bool was refused already. int8 and uint8 run."""
    import fused_rnn.functional as Fr

    x, h0, c0, w_ih, w_hh, _, _ = _lstm_args()
    for dtype in [torch.bool] + [getattr(torch, n) for n in ("uint16", "uint32", "uint64")
                                 if hasattr(torch, n)]:
        lengths = torch.tensor([3, 1]).to(dtype)
        with pytest.raises(TypeError, match=f"lengths must be an integer tensor of int8 to "
                                            f"int64 or uint8, got {dtype}"):
            Fr.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh, lengths=lengths)
    want = Fr.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh, lengths=torch.tensor([3, 1]))
    for dtype in (torch.int8, torch.uint8):
        got = Fr.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh, lengths=torch.tensor([3, 1]).to(dtype))
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_complex_state_or_weight_with_real_input_is_refused():
    """The math runs in x's dtype: a complex h0 with a real x lost its imaginary part, with
    torch's warning once a process, then silently (torch._VF's cells refuse the mix)."""
    import fused_rnn.functional as Fr

    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _lstm_args()
    for i, name in ((1, "h0"), (4, "w_hh"), (6, "b_hh")):
        args = [x, h0, c0, w_ih, w_hh, b_ih, b_hh]
        args[i] = args[i] + 3j
        with pytest.raises(TypeError, match=f"{name} is complex"):
            Fr.rnn_layer("LSTM", *args, backend="reference")
    with pytest.raises(TypeError, match="h0 is complex"):
        Fr.rnn_cell("GRU", x[0], h0 + 1j, None, torch.randn(15, 4), torch.randn(15, 5))
    y, _, _ = Fr.rnn_layer("LSTM", x + 0j, h0 + 1j, c0 + 0j, w_ih + 0j, w_hh + 0j,
                           backend="reference")
    assert y.is_complex()  # complex throughout still computes in complex arithmetic


def test_a_functional_cell_on_torch_computes_in_x_dtype_as_the_reference_does():
    """fused_rnn.functional.rnn_cell on "torch"/"auto" handed torch._VF mixed dtypes: an fp64 c
    with fp32 x came back fp64 (the cell promoted it) and an fp64 h failed inside a matmul,
    where the reference, every kernel backend and rnn_layer compute in x's dtype."""
    import fused_rnn.functional as Fr

    torch.manual_seed(0)
    x, h, c = torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 5)
    for mode, g in (("LSTM", 4), ("GRU", 3)):
        w_ih, w_hh, b_hh = torch.randn(g * 5, 4), torch.randn(g * 5, 5), torch.randn(g * 5)
        cc = c.double() if mode == "LSTM" else None
        for args in ((x, h.double(), cc), (x, h, cc)):
            ref = Fr.rnn_cell(mode, *args, w_ih, w_hh, None, b_hh.double(), backend="reference")
            for backend in ("torch", "auto"):
                out = Fr.rnn_cell(mode, *args, w_ih, w_hh, None, b_hh.double(), backend=backend)
                for a, b in zip(out, ref):
                    if b is None:
                        assert a is None
                        continue
                    assert a.dtype == b.dtype == torch.float32
                    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("step", [False, True], ids=["layer", "cell"])
@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_functional_states_and_weights_of_another_dtype_run_in_x_dtype(mode, backend, step):
    """The modules keep one dtype; fused_rnn.functional takes each tensor as given, and a bf16
    x with fp32 states and weights gave a bf16 ulp's difference between backends."""
    from helpers import check_mixed_dtypes_run_in_x_dtype

    check_mixed_dtypes_run_in_x_dtype(backend, mode, step=step)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("mode", ["LSTM", "LSTM-proj", "GRU", "RNN_RELU"])
def test_functional_layers_never_read_x_past_the_lengths(mode, backend):
    """inf or NaN in x's padding (a caller's own padded batch) made every weight gradient NaN."""
    from helpers import check_padding_is_ignored

    check_padding_is_ignored(backend, "cpu", mode.split("-")[0], proj=mode.endswith("proj"))


def test_the_functional_stack_names_a_wrong_weight_tuple_or_a_missing_state():
    """fused_rnn.functional.rnn: four-tensor weight tuples failed with a bare "not enough values
    to unpack", and hx=None with "'NoneType' object is not subscriptable"."""
    import fused_rnn.functional as Fr

    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _lstm_args()
    with pytest.raises(ValueError, match=r"weights\[0\] must be \(w_ih, w_hh, b_ih, b_hh, w_hr\)"):
        Fr.rnn("LSTM", x, h0[None], c0[None], [(w_ih, w_hh, b_ih, b_hh)], num_layers=1,
               bidirectional=False)
    with pytest.raises(TypeError, match="hx must be a tensor"):
        Fr.rnn("LSTM", x, None, c0[None], [(w_ih, w_hh, b_ih, b_hh, None)], num_layers=1,
               bidirectional=False)
    y, h, c = Fr.rnn("LSTM", x, h0[None], c0[None], [(w_ih, w_hh, b_ih, b_hh, None)],
                     num_layers=1, bidirectional=False)
    assert y.shape == (3, 2, 5) and h.shape == c.shape == (1, 2, 5)


@pytest.mark.parametrize("kw,said", [
    ({"num_layers": 1.5}, "num_layers must be an integer, got 1.5"),  # was "1.5 layers x 1 ..."
    ({"num_layers": True}, "num_layers must be an integer, got True"),  # ran as one layer
    ({"bidirectional": "False"}, "bidirectional must be a bool, got 'False'"),  # ran two-way
    ({"training": 1}, "training must be a bool, got 1"),
    ({"dropout": True}, "dropout must be a number, got True"),
])
def test_the_functional_stack_refuses_settings_of_the_wrong_type(kw, said):
    """fused_rnn.functional.rnn took a float num_layers into its weight count's message, ran
    num_layers=True as one layer and a truthy non-bool bidirectional as True."""
    import fused_rnn.functional as Fr

    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _lstm_args()
    args = {"num_layers": 1, "bidirectional": False, **kw}
    with pytest.raises(TypeError, match=re.escape(said)):
        Fr.rnn("LSTM", x, h0[None], c0[None], [(w_ih, w_hh, b_ih, b_hh, None)], **args)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_16_bit_input_or_weight_with_fp32_ones_is_refused_outside_autocast(backend):
    """Two dtypes autocast could cast to one are still two dtypes outside autocast: torch.nn's
    ValueError for a bf16 input to an fp32 module, and a bf16 weight among fp32 ones refused
    (the tests used fp64, which autocast never casts, so the mutation audit found that
    branch untested)."""
    x = torch.randn(5, 3, 4, dtype=torch.bfloat16)
    for m in (torch.nn.LSTM(4, 8), fused_rnn.LSTM(4, 8, backend=backend)):
        with pytest.raises(ValueError, match="does not match weight dtype"):
            m(x)
    m = fused_rnn.LSTM(4, 8, backend=backend)
    m.weight_hh_l0.data = m.weight_hh_l0.data.bfloat16()
    with pytest.raises(RuntimeError, match="weight_hh_l0 is torch.bfloat16 but weight_ih_l0 "
                                           "is torch.float32"):
        m(x.float())


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_fp32_input_to_an_fp64_module_is_refused_inside_autocast(backend):
    """autocast casts neither fp64 weights nor (so) the call: an fp32 input to an fp64 module
    is as refused inside a region as outside it; fp64 modules keep fp64."""
    m = fused_rnn.LSTM(4, 8, dtype=torch.float64, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            ValueError, match="does not match weight dtype"):
        m(torch.randn(5, 3, 4))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_functional_x_of_too_many_dims_is_refused_by_name(backend):
    """x of one dimension too many failed later in an unpacking (a ValueError that named
    nothing) when only too few were refused (mutation audit)."""
    import fused_rnn.functional as Fr

    h, w_ih, w_hh = torch.zeros(3, 8), torch.randn(32, 4), torch.randn(32, 8)
    with pytest.raises(RuntimeError, match=r"x must be \(T, B, I\)"):
        Fr.rnn_layer("LSTM", torch.randn(5, 2, 3, 4), h, h, w_ih, w_hh, backend=backend)
    with pytest.raises(RuntimeError, match=r"x must be \(B, I\)"):
        Fr.rnn_cell("LSTM", torch.randn(5, 3, 4), h, h, w_ih, w_hh, backend=backend)
