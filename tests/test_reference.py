"""The reference ops on their own: fp64 gradcheck, low-precision contract, lengths, reverse."""

from __future__ import annotations

import pytest
import torch

from fused_rnn.ops import reference
from fused_rnn.ops.reference import GATES, MODES


def _layer_inputs(mode, B=2, T=3, I=3, H=4, P=0, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode] * H
    Pe = P or H

    def r(*s):
        return (0.5 * torch.randn(*s, generator=g, dtype=dtype)).requires_grad_()

    return dict(
        x=r(T, B, I),
        h0=r(B, Pe),
        c0=r(B, H) if mode == "LSTM" else None,
        w_ih=r(G, I),
        w_hh=r(G, Pe),
        b_ih=r(G) if bias else None,
        b_hh=r(G) if bias else None,
        w_hr=r(P, H) if P else None,
    )


def _variants():
    for mode in MODES:
        for P in ((0, 2) if mode == "LSTM" else (0,)):
            for bias in (True, False):
                for reverse in (False, True):
                    for lengths in (None, (3, 1)):
                        yield pytest.param(
                            mode, P, bias, reverse, lengths,
                            id=f"{mode}-P{P}-{'bias' if bias else 'nobias'}-{'rev' if reverse else 'fwd'}-{'len' if lengths else 'full'}",
                        )


@pytest.mark.parametrize("mode,P,bias,reverse,lengths", list(_variants()))
def test_rnn_layer_gradcheck_fp64(mode, P, bias, reverse, lengths):
    inp = _layer_inputs(mode, P=P, bias=bias)
    names = [k for k, v in inp.items() if v is not None]
    lens = None if lengths is None else torch.tensor(lengths)

    def f(*tensors):
        kw = dict(inp)
        kw.update(zip(names, tensors))
        y, h, c = reference.rnn_layer(mode, **kw, lengths=lens, reverse=reverse)
        return (y, h) if c is None else (y, h, c)

    assert torch.autograd.gradcheck(f, tuple(inp[n] for n in names))


@pytest.mark.parametrize("mode,P,lengths", [
    pytest.param(mode, P, lengths, id=f"{mode}-P{P}-{'len' if lengths else 'full'}")
    for mode in MODES for P in ((0, 2) if mode == "LSTM" else (0,)) for lengths in (None, (3, 1))
])
def test_rnn_layer_gradgradcheck_fp64(mode, P, lengths):
    """The reference is plain differentiable PyTorch, so double backward works; it is what
    the kernel backends' refusal of double backward sends users to."""
    inp = _layer_inputs(mode, P=P)
    names = [k for k, v in inp.items() if v is not None]
    lens = None if lengths is None else torch.tensor(lengths)

    def f(*tensors):
        kw = dict(inp)
        kw.update(zip(names, tensors))
        y, h, c = reference.rnn_layer(mode, **kw, lengths=lens)
        return (y, h) if c is None else (y, h, c)

    assert torch.autograd.gradgradcheck(f, tuple(inp[n] for n in names))


@pytest.mark.parametrize("mode", MODES)
def test_rnn_cell_gradcheck_fp64(mode):
    inp = _layer_inputs(mode)
    x, h, c = inp["x"][0].detach().requires_grad_(), inp["h0"], inp["c0"]
    args = [x, h] + ([c] if c is not None else []) + [inp["w_ih"], inp["w_hh"], inp["b_ih"], inp["b_hh"]]

    def f(*t):
        if c is None:
            out = reference.rnn_cell(mode, t[0], t[1], None, *t[2:])
        else:
            out = reference.rnn_cell(mode, *t)
        return tuple(o for o in out if o is not None)

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("mode", MODES)
def test_layer_equals_repeated_cell(mode):
    inp = {k: (None if v is None else v.detach()) for k, v in _layer_inputs(mode, T=4).items()}
    y, h, c = reference.rnn_layer(mode, **inp)
    hh, cc = inp["h0"], inp["c0"]
    for t in range(4):
        hh, cc = reference.rnn_cell(mode, inp["x"][t], hh, cc, inp["w_ih"], inp["w_hh"], inp["b_ih"], inp["b_hh"])
        torch.testing.assert_close(y[t], hh, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, hh, atol=1e-12, rtol=0)
    assert (c is None) == (mode != "LSTM")
    if c is not None:
        torch.testing.assert_close(c, cc, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_lengths_hold_state_and_zero_outputs(mode):
    inp = {k: (None if v is None else v.detach()) for k, v in _layer_inputs(mode, B=3, T=5).items()}
    lengths = torch.tensor([5, 2, 1])
    y, h, c = reference.rnn_layer(mode, **inp, lengths=lengths)
    for b, L in enumerate(lengths.tolist()):
        one = {k: (None if v is None else (v[:L, b:b + 1] if k == "x" else v[b:b + 1] if k in ("h0", "c0") else v)) for k, v in inp.items()}
        yb, hb, cb = reference.rnn_layer(mode, **one)
        torch.testing.assert_close(y[:L, b:b + 1], yb, atol=1e-12, rtol=0)
        assert torch.all(y[L:, b] == 0)
        torch.testing.assert_close(h[b:b + 1], hb, atol=1e-12, rtol=0)
        if c is not None:
            torch.testing.assert_close(c[b:b + 1], cb, atol=1e-12, rtol=0)
    # reverse: each row starts at its own last step
    yr, hr, cr = reference.rnn_layer(mode, **inp, lengths=lengths, reverse=True)
    for b, L in enumerate(lengths.tolist()):
        one = {k: (None if v is None else (v[:L, b:b + 1].flip(0) if k == "x" else v[b:b + 1] if k in ("h0", "c0") else v)) for k, v in inp.items()}
        yb, hb, cb = reference.rnn_layer(mode, **one)
        torch.testing.assert_close(yr[:L, b:b + 1], yb.flip(0), atol=1e-12, rtol=0)
        assert torch.all(yr[L:, b] == 0)
        torch.testing.assert_close(hr[b:b + 1], hb, atol=1e-12, rtol=0)
        if cr is not None:
            torch.testing.assert_close(cr[b:b + 1], cb, atol=1e-12, rtol=0)


# Low precision: the reference's error against fp64 stays within the error of PyTorch's own
# computation done in that dtype (plus a small floor), and outputs keep the input dtype.
@pytest.mark.parametrize("dtype,factor,floor", [
    pytest.param(torch.float16, 2.0, 1e-4, id="fp16"),
    pytest.param(torch.bfloat16, 2.0, 8e-4, id="bf16"),
])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_contract(mode, dtype, factor, floor):
    inp = {k: (None if v is None else v.detach()) for k, v in _layer_inputs(mode, B=4, T=6, I=8, H=16).items()}
    low = {k: (None if v is None else v.to(dtype)) for k, v in inp.items()}
    # ground truth: fp64 math on the same (rounded) low-precision inputs
    exact = reference.rnn_layer(mode, **{k: (None if v is None else v.double()) for k, v in low.items()})
    got = reference.rnn_layer(mode, **low)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    # PyTorch's own computation entirely in the low dtype, step by step
    naive_h = low["h0"]
    naive_c = low["c0"]
    for t in range(6):
        gx = torch.nn.functional.linear(low["x"][t], low["w_ih"], low["b_ih"])
        gh = torch.nn.functional.linear(naive_h, low["w_hh"], low["b_hh"])
        naive_h, naive_c = reference.cell_update(mode, gx, gh, naive_h, naive_c)
    err_ours = (got[1].double() - exact[1]).abs().max().item()
    err_torch = (naive_h.double() - exact[1]).abs().max().item()
    assert err_ours <= factor * err_torch + floor, (err_ours, err_torch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_is_fp32_math_rounded_once_a_step(mode, dtype):
    """The contract itself, exactly: in bf16/fp16 each step is the fp32 computation on the
    stored (rounded) values, and only h (the output) is rounded to the dtype, after each step;
    the LSTM cell state stays fp32 between steps. The error bound above cannot tell this from
    computing in the low dtype, or from an h kept in fp32 between steps."""
    inp = {k: (None if v is None else v.detach().to(dtype))
           for k, v in _layer_inputs(mode, B=3, T=6, I=5, H=8).items()}
    y, h_n, c_n = reference.rnn_layer(mode, **inp)
    f32 = {k: (None if v is None else v.float()) for k, v in inp.items()}
    h, c = f32["h0"], f32["c0"]
    for t in range(6):
        step = {**f32, "x": f32["x"][t:t + 1], "h0": h, "c0": c}
        _, h, c = reference.rnn_layer(mode, **step)
        assert torch.equal(y[t], h.to(dtype)), (mode, t)
        h = h.to(dtype).float()
    assert torch.equal(h_n, h.to(dtype))
    if mode == "LSTM":
        assert torch.equal(c_n, c.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", [False, True], ids=["layer", "cell"])
def test_low_precision_backward_rounds_the_dgates_before_any_use(mode, dtype, cell):
    """The backward half of the contract, exactly: the gradients of h W_hh^T + b_hh (dgh) and of
    x W_ih^T + b_ih (dgx) are rounded to the dtype -- they are a matmul operand wherever they
    are used, on 16-bit tensor cores -- and every gradient comes from the rounded values with
    fp32 sums. Checked on one step against the fp32 computation written out: dh0 = bf16(dgh) @
    W_hh, dW_hh = bf16(dgh)^T h0, db_hh = sum(bf16(dgh)), and the same for dx, dW_ih, db_ih
    with dgx. Where dgh cancels (api_fuzz seed 4442: an LSTMCell of size 1, four dgates summing
    to 1/100 of their size) the rounding before the sum is most of a 16-bit kernel's error in
    dh0, so the reference must make it."""
    inp = {k: (None if v is None else v.detach().to(dtype))
           for k, v in _layer_inputs(mode, B=3, T=1, I=5, H=8).items()}
    leaves = {k: (None if v is None else v.clone().requires_grad_()) for k, v in inp.items()}
    cot = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cot = cot.to(dtype)
    if cell:
        h, _ = reference.rnn_cell(mode, leaves["x"][0], leaves["h0"], leaves["c0"],
                                  leaves["w_ih"], leaves["w_hh"], leaves["b_ih"], leaves["b_hh"])
    else:
        h = reference.rnn_layer(mode, **leaves)[1]
    h.backward(cot)
    # The same step in fp32 with autograd stopped at gx and gh: their gradients are dgx, dgh.
    f32 = {k: (None if v is None else v.float()) for k, v in inp.items()}
    gh = torch.nn.functional.linear(f32["h0"], f32["w_hh"], f32["b_hh"]).requires_grad_()
    gx = torch.nn.functional.linear(f32["x"][0], f32["w_ih"], f32["b_ih"]).requires_grad_()
    h32, _ = reference.cell_update(mode, gx, gh, f32["h0"], f32["c0"])
    dgx, dgh = torch.autograd.grad(h32.to(dtype).float(), (gx, gh), cot.float())
    if mode != "RNN_RELU":  # relu' is 0 or 1: its dgates are the rounded cotangent, exact
        assert dgh.to(dtype).float().ne(dgh).any(), "the rounding must matter here"
        assert dgx.to(dtype).float().ne(dgx).any(), "the rounding must matter here"
    rdgx, rdgh = dgx.to(dtype).float(), dgh.to(dtype).float()
    # dh0 also gets the pointwise path (GRU's z * h); the matmul's share is what differs.
    direct = torch.autograd.grad(reference.cell_update(mode, gx.detach(), gh.detach(), f32["h0"]
                                                       .requires_grad_(), f32["c0"])[0]
                                 .to(dtype).float(), f32["h0"], cot.float(),
                                 allow_unused=True)[0] if mode == "GRU" else 0
    exact = {"rtol": 0, "atol": 0}
    torch.testing.assert_close(leaves["h0"].grad, (rdgh @ f32["w_hh"] + direct).to(dtype), **exact)
    torch.testing.assert_close(leaves["w_hh"].grad, (rdgh.t() @ f32["h0"]).to(dtype), **exact)
    torch.testing.assert_close(leaves["b_hh"].grad, rdgh.sum(0).to(dtype), **exact)
    torch.testing.assert_close(leaves["x"].grad[0], (rdgx @ f32["w_ih"]).to(dtype), **exact)
    torch.testing.assert_close(leaves["w_ih"].grad, (rdgx.t() @ f32["x"][0]).to(dtype), **exact)
    torch.testing.assert_close(leaves["b_ih"].grad, rdgx.sum(0).to(dtype), **exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_backward_keeps_dh_in_fp32_between_steps(dtype):
    """h is rounded to the dtype between steps, its gradient is not: the kernels add what reaches
    h_t (dy_t and the next step's recurrent share) in fp32 and go on with the sum. Two RNN tanh
    steps written out: dh1 = bf16(dg1) @ W_hh + dy0 in fp32, dh0 = bf16(dg0) @ W_hh with dg0 =
    dh1 * tanh'(a0), to the bit. (Rounding dh1 too, what ``h.to(dtype).to(fp32)`` does in
    autograd, left the reference 15% from the kernels on dx of api_fuzz seed 6522.)"""
    inp = {k: (None if v is None else v.detach().to(dtype))
           for k, v in _layer_inputs("RNN_TANH", B=3, T=2, I=5, H=8).items()}
    leaves = {k: (None if v is None else v.clone().requires_grad_()) for k, v in inp.items()}
    dy = torch.randn(2, 3, 8, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(2)).to(dtype)
    y, _, _ = reference.rnn_layer("RNN_TANH", **leaves)
    y.backward(dy)
    f = {k: (None if v is None else v.float()) for k, v in inp.items()}
    lin = torch.nn.functional.linear
    h1f = torch.tanh(lin(f["x"][0], f["w_ih"], f["b_ih"]) + lin(f["h0"], f["w_hh"], f["b_hh"]))
    h1 = h1f.to(dtype).float()
    h2f = torch.tanh(lin(f["x"][1], f["w_ih"], f["b_ih"]) + lin(h1, f["w_hh"], f["b_hh"]))
    rdg1 = (dy[1].float() * (1 - h2f * h2f)).to(dtype).float()
    dh1 = rdg1 @ f["w_hh"] + dy[0].float()
    assert dh1.to(dtype).float().ne(dh1).any(), "rounding dh1 must matter here"
    rdg0 = (dh1 * (1 - h1f * h1f)).to(dtype).float()
    torch.testing.assert_close(leaves["h0"].grad, (rdg0 @ f["w_hh"]).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(leaves["x"].grad[0], (rdg0 @ f["w_ih"]).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_empty_sequence(mode):
    """No steps: h_n (and c_n) are h0's values in new tensors, as the kernels return them, not
    the caller's h0 (an in-place change to h_n changed h0)."""
    inp = {k: (None if v is None else v.detach()) for k, v in _layer_inputs(mode, T=0).items()}
    y, h, c = reference.rnn_layer(mode, **inp)
    assert y.shape == (0, 2, 4)
    torch.testing.assert_close(h, inp["h0"])
    assert h.data_ptr() != inp["h0"].data_ptr()
    if mode == "LSTM":
        torch.testing.assert_close(c, inp["c0"])
        assert c.data_ptr() != inp["c0"].data_ptr()


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode"):
        reference.cell_update("LSTMX", torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 1), None)
