"""The Triton backend against the reference math, torch.nn and PyTorch 2's op machinery.

Without a GPU every kernel runs under Triton's CPU interpreter (``conftest.py`` here sets
TRITON_INTERPRET=1 before the kernels are defined), so shapes are tiny. With a GPU the same
tests run the compiled kernels on it, and the ``gpu``-marked ones add larger shapes.

Low-precision accuracy rule (FlashAttention's): against an fp64 reference, the kernel's error
may be at most twice the error of the reference math run in the same dtype, plus a small
``eps`` (scaled by the size of the values), given next to the dtype below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import training_checks
from helpers import (
    check_non_finite_like_torch_nn,
    check_padding_is_ignored,
    non_finite_params,
    record_gemm_precision,
)
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn.ops import common, reference
from fused_rnn.ops import triton as tr
from fused_rnn.ops.triton import launch, ops

# Triton 3.6's interpreter converts arrays to scalars the way numpy 2.x deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
G = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
MODES = list(G)

# (dtype, eps): eps is a fraction of max|exact value|: a few tenths of an ulp in bf16/fp16,
# about 17 ulps in fp32.
DTYPES = [
    pytest.param(torch.float32, 2e-6, id="fp32"),
    pytest.param(torch.float16, 1e-4, id="fp16"),
    pytest.param(torch.bfloat16, 1e-3, id="bf16"),
]
PATHS = ["persistent", "step"]


@pytest.fixture(autouse=True)
def _exact_fp32_on_gpu():
    """TF32 off, so that fp32 on a GPU is held to fp32 accuracy (it is on by default)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# --------------------------------------------------------------------------- helpers
def make_inputs(mode, B, T, I, H, proj=0, bias=True, seed=0):
    """fp32 inputs shaped as reference.rnn_layer takes them (weights like nn's init)."""
    g = torch.Generator().manual_seed(seed)
    P = proj or H
    s = H**-0.5

    def u(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1) * s

    return dict(
        x=torch.randn(T, B, I, generator=g),
        h0=torch.randn(B, P, generator=g) * 0.5,
        c0=torch.randn(B, H, generator=g) * 0.5 if mode == "LSTM" else None,
        w_ih=u(G[mode] * H, I),
        w_hh=u(G[mode] * H, P),
        b_ih=u(G[mode] * H) if bias else None,
        b_hh=u(G[mode] * H) if bias else None,
        w_hr=u(P, H) if proj else None,
    )


def _leaves(inputs, dtype):
    return {k: None if v is None else v.to(DEVICE, dtype).requires_grad_() for k, v in inputs.items()}


def outputs_and_grads(fn, inputs, dtype, cotangents):
    """Run ``fn(**leaves)`` in ``dtype``; return outputs then d(sum <out, cot>)/d(each input)."""
    leaves = _leaves(inputs, dtype)
    outs = [o for o in fn(**leaves) if o is not None]
    cots = [c.to(DEVICE, dtype) for c in cotangents[: len(outs)]]
    params = [v for v in leaves.values() if v is not None]
    # Empty outputs (T=0) carry no gradient; the reference does not even connect them.
    pairs = [(o, c) for o, c in zip(outs, cots) if o.numel()]
    grads = torch.autograd.grad([o for o, _ in pairs], params, [c for _, c in pairs],
                                allow_unused=True, materialize_grads=True)
    names = [f"output {i}" for i in range(len(outs))]
    names += [f"grad of {k}" for k, v in leaves.items() if v is not None]
    return names, [t.detach().double().cpu() for t in (*outs, *grads)]


def check_against_fp64(fn_ours, fn_ref, inputs, dtype, eps, cotangents):
    """The accuracy rule of this file, for every output and every gradient."""
    names, ours = outputs_and_grads(fn_ours, inputs, dtype, cotangents)
    _, ref = outputs_and_grads(fn_ref, inputs, dtype, cotangents)
    # fp64 oracle on the same (rounded) inputs and cotangents.
    rounded = {k: None if v is None else v.to(dtype).double() for k, v in inputs.items()}
    _, exact = outputs_and_grads(fn_ref, rounded, torch.float64, [c.to(dtype) for c in cotangents])
    assert len(ours) == len(ref) == len(exact)
    for name, o, r, e in zip(names, ours, ref, exact):
        assert o.shape == e.shape, f"{name}: shape {tuple(o.shape)} vs {tuple(e.shape)}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        if e.numel() == 0:
            continue
        err, ref_err = (o - e).abs().max().item(), (r - e).abs().max().item()
        bound = 2 * ref_err + eps * max(1.0, e.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (reference's own: {ref_err:.3g})"


def layer_fns(mode, lengths=None, reverse=False, path="auto"):
    lens = None if lengths is None else lengths.to(DEVICE)

    def ours_y(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        y, h, c, _, _ = ops.triton_layer(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens,
                                         reverse, True, path)
        return y, h, (c if mode == "LSTM" else None)

    def ref_y(**kw):
        return reference.rnn_layer(mode, **kw, lengths=lens, reverse=reverse)

    return ours_y, ref_y


def layer_cotangents(mode, B, T, H, P, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, B, P, generator=g), torch.randn(B, P, generator=g), torch.randn(B, H, generator=g)]


def shape_id(B, T, H, extra=""):
    return f"B{B}-T{T}-H{H}{extra}"


# --------------------------------------------------------------------------- layer vs reference
@pytest.mark.parametrize("dtype,eps", DTYPES)
@pytest.mark.parametrize("B,T,I,H", [pytest.param(3, 5, 4, 37, id=shape_id(3, 5, 37)),
                                     pytest.param(3, 1, 4, 37, id=shape_id(3, 1, 37))])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_layer_matches_reference(mode, path, B, T, I, H, dtype, eps):
    inputs = make_inputs(mode, B, T, I, H)
    ours, ref = layer_fns(mode, path=path)
    check_against_fp64(ours, ref, inputs, dtype, eps, layer_cotangents(mode, B, T, H, H))


@pytest.mark.parametrize("dtype,eps", [DTYPES[0], DTYPES[2]])
@pytest.mark.parametrize("lengths,reverse", [
    pytest.param(True, False, id="lengths"),
    pytest.param(True, True, id="lengths-reverse"),
    pytest.param(False, True, id="reverse"),
])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_lengths_and_reverse(mode, path, lengths, reverse, dtype, eps):
    B, T, I, H = 4, 6, 3, 19
    lens = torch.tensor([6, 1, 4, 3]) if lengths else None  # unsorted, a full and a 1-step row
    inputs = make_inputs(mode, B, T, I, H, seed=2)
    ours, ref = layer_fns(mode, lens, reverse, path)
    check_against_fp64(ours, ref, inputs, dtype, eps, layer_cotangents(mode, B, T, H, H))


@pytest.mark.parametrize("dtype,eps", DTYPES)
@pytest.mark.parametrize("lengths,reverse", [pytest.param(False, False, id="plain"),
                                             pytest.param(True, True, id="lengths-reverse")])
@pytest.mark.parametrize("path", PATHS)
def test_lstm_projection(path, lengths, reverse, dtype, eps):
    B, T, I, H, P = 3, 5, 4, 21, 6
    lens = torch.tensor([2, 5, 4]) if lengths else None
    inputs = make_inputs("LSTM", B, T, I, H, proj=P, seed=3)
    ours, ref = layer_fns("LSTM", lens, reverse, path)
    check_against_fp64(ours, ref, inputs, dtype, eps, layer_cotangents("LSTM", B, T, H, P))


@pytest.mark.parametrize("mode,path,B,T,H", [
    # several batch tiles (16 rows each) in the persistent kernel
    pytest.param("LSTM", "persistent", 17, 3, 20, id="LSTM-persistent-" + shape_id(17, 3, 20)),
    pytest.param("GRU", "persistent", 17, 3, 20, id="GRU-persistent-" + shape_id(17, 3, 20)),
    # several batch tiles (32), hidden tiles (32) and K blocks (64) in the step kernels
    pytest.param("LSTM", "step", 33, 2, 80, id="LSTM-step-" + shape_id(33, 2, 80)),
    pytest.param("GRU", "step", 33, 2, 80, id="GRU-step-" + shape_id(33, 2, 80)),
    pytest.param("RNN_TANH", "step", 33, 2, 80, id="RNN_TANH-step-" + shape_id(33, 2, 80)),
])
def test_multi_tile_shapes(mode, path, B, T, H):
    lens = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(0))
    inputs = make_inputs(mode, B, T, 3, H, seed=4)
    ours, ref = layer_fns(mode, lens, True, path)
    check_against_fp64(ours, ref, inputs, torch.float32, 2e-6, layer_cotangents(mode, B, T, H, H))


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_an_output_changed_in_place_is_refused(cls):
    """The Triton layers' backward reads y (as cuDNN's does): an in-place change to it before
    backward is autograd's error, not a wrong gradient (the README's list of which backend
    refuses what)."""
    m = getattr(fused_rnn, cls)(4, 5, backend="triton")
    y, _ = m(torch.randn(3, 2, 4))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_no_bias_and_empty_sequence(mode, path):
    for T in (0, 2):
        inputs = make_inputs(mode, 3, T, 4, 9, bias=False, seed=5)
        ours, ref = layer_fns(mode, path=path)
        check_against_fp64(ours, ref, inputs, torch.float32, 2e-6, layer_cotangents(mode, 3, T, 9, 9))


def test_path_choice():
    assert launch.choose_path("LSTM", 64, 0) == "persistent"
    assert launch.choose_path("LSTM", 65, 0) == "step"
    assert launch.choose_path("RNN_TANH", 128, 0) == "persistent"
    assert launch.choose_path("LSTM", 1024, 0) == "step"
    assert launch.choose_path("LSTM", 1024, 0, "persistent") == "persistent"
    with pytest.raises(ValueError, match="unknown path"):
        launch.choose_path("LSTM", 8, 0, "fastest")


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_inputs(path):
    """Inputs sliced out of larger buffers give the same results as contiguous copies."""
    mode, B, T, I, H = "LSTM", 3, 4, 5, 10
    base = make_inputs(mode, B, T, I, H, seed=6)
    big_x = torch.randn(T, 2 * B, I + 2)
    big_x[:, ::2, 1:-1] = base["x"]
    big_w = torch.randn(H * 8, 4 * H)  # w_hh as a transposed view
    big_w[: H, :] = base["w_hh"].t()
    strided = dict(base, x=big_x[:, ::2, 1:-1], w_hh=big_w[:H, :].t())
    assert not strided["x"].is_contiguous() and not strided["w_hh"].is_contiguous()
    dev = {k: None if v is None else v.to(DEVICE) for k, v in strided.items()}
    y1, h1, c1, _, _ = ops.triton_layer(mode, *dev.values(), None, False, False, path)
    dev = {k: None if v is None else v.contiguous().to(DEVICE) for k, v in strided.items()}
    y2, h2, c2, _, _ = ops.triton_layer(mode, *dev.values(), None, False, False, path)
    for a, b in ((y1, y2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_strided_incoming_gradients(path):
    """The gradients of h_n and c_n may arrive strided (the gradient of ``h_n.t()`` is a
    transposed view): the backward kernels update those carries in place, row-major, so they
    must get a row-major copy, not a clone that keeps the strides. Same gradients, bit for bit,
    as for contiguous copies of the same cotangents."""
    mode, B, T, I, H = "LSTM", 3, 4, 5, 6
    inputs = make_inputs(mode, B, T, I, H, seed=7)
    dy, dh, dc = layer_cotangents(mode, B, T, H, H, seed=8)
    strided = [dy, dh.t().contiguous().t(), dc.t().contiguous().t()]
    assert not strided[1].is_contiguous() and not strided[2].is_contiguous()
    ours, _ = layer_fns(mode, path=path)
    _, got = outputs_and_grads(ours, inputs, torch.float32, strided)
    _, want = outputs_and_grads(ours, inputs, torch.float32, [dy, dh, dc])
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, i=i: f"tensor {i}: {m}")


def test_per_operator_tf32_settings_are_read_not_refused(fp32_precision_restored, monkeypatch):
    """A user of torch's per-operator precision API (cuDNN conv and RNN set apart, which makes
    the legacy ``cudnn.allow_tf32`` getter raise) can still train on the Triton backend; the
    launcher's TF32 switch for its GEMMs leaves the matmul setting as it found it."""
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    common.cudnn_rnn_setting().fp32_precision = "ieee"
    matmul_before = torch.backends.cuda.matmul.fp32_precision
    inputs = make_inputs("GRU", 3, 4, 5, 6, seed=9)
    ours, ref = layer_fns("GRU")
    _, got = outputs_and_grads(ours, inputs, torch.float32, layer_cotangents("GRU", 3, 4, 6, 6))
    _, want = outputs_and_grads(ref, inputs, torch.float32, layer_cotangents("GRU", 3, 4, 6, 6))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert torch.backends.cuda.matmul.fp32_precision == matmul_before
    # The kernels' dot precision follows the RNN setting, not conv's (compiled kernels: the
    # interpreter always takes "ieee").
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    assert launch._fp32_dot_precision() == "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    common.cudnn_rnn_setting().fp32_precision = "tf32"
    assert launch._fp32_dot_precision() == "tf32"


def _storage_ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|a - b| elementwise in units in the last place of ``dtype`` at the larger magnitude."""
    mantissa = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    mag = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(dtype).smallest_normal)
    return (a - b).abs() / torch.exp2(torch.floor(torch.log2(mag)) - mantissa)


@pytest.mark.skipif(DEVICE == "cuda", reason="in the interpreter a tl.dot and a torch matmul both "
                    "sum in fp32 on the CPU; compiled, the kernels' tensor-core sums differ more")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode,proj", [("LSTM", 3), ("LSTM", 0), ("RNN_TANH", 0)],
                         ids=["LSTM-proj", "LSTM", "RNN_TANH"])
def test_step_backward_rounds_dgates_as_the_persistent_kernel_does(mode, proj, dtype):
    """In 16-bit both backward paths round each step's dgates to the storage dtype before they
    go back through W_hh: in the kernels, and in the step path's torch products (every step's
    with a projection, the last step's dh_0 without one). What is left between them is the
    order of two fp32 sums (the interpreter's tl.dot is numpy's, the step path's product is
    torch's, and which kernels those run depends on the CPU), which can flip the 16-bit rounding
    of an element: on a Sapphire Rapids Xeon one element of one case parts by one storage ulp,
    on the machine that wrote this test none did. Unrounded, the paths part by 3 to 8 ulps in
    12 to 41 elements of every case. (GRU's two paths add the n gate's hh part in different
    orders, and part by fp32 rounding throughout.)"""
    B, T, I, H = 3, 4, 4, 16
    inputs = make_inputs(mode, B, T, I, H, proj=proj)
    cots = layer_cotangents(mode, B, T, H, proj or H)
    got = {}
    for path in ("persistent", "step"):
        ours, _ = layer_fns(mode, path=path)
        names, got[path] = outputs_and_grads(ours, inputs, dtype, cots)
    differing = 0
    for name, a, b in zip(names, got["persistent"], got["step"], strict=True):
        ulps = _storage_ulps(a, b, dtype)
        assert ulps.max() <= 1, f"{name}: {ulps.max().item():.3g} ulps apart"
        differing += int((a != b).sum())
    assert differing <= 2, f"{differing} elements differ between the paths"


@pytest.mark.parametrize("path", ["persistent", "step"])
@pytest.mark.parametrize("dt,rnn,want", [("fp32", "ieee", "ieee"), ("fp32", "tf32", "tf32"),
                                          ("bf16", "ieee", "tf32")])
def test_torch_gemms_use_tf32_like_cudnn(monkeypatch, fp32_precision_restored, path, dt, rnn,
                                         want):
    """The launcher's cuBLAS GEMMs (projection, dx, dW_ih, dW_hh, and the step path's last
    dh_0 product) run on TF32 where cuDNN's RNN would for fp32 and always for 16-bit data,
    whatever torch's matmul setting (common.gemms_use_tf32), which is left as it was."""
    common.cudnn_rnn_setting().fp32_precision = rnn
    torch.backends.cuda.matmul.fp32_precision = "ieee" if want == "tf32" else "tf32"
    before = torch.backends.cuda.matmul.fp32_precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
    inputs = make_inputs("GRU", 2, 3, 4, 8, seed=3)
    ours, _ = layer_fns("GRU", path=path)
    seen = record_gemm_precision(monkeypatch)
    outputs_and_grads(ours, inputs, dtype, layer_cotangents("GRU", 2, 3, 8, 8))
    # projection, dx, dW_ih, dW_hh in two (GRU's n rows come from dghn); the step path's dh_0
    assert len(seen) == (6 if path == "step" else 5), seen
    assert set(seen) == {want}
    assert torch.backends.cuda.matmul.fp32_precision == before


@pytest.mark.parametrize("path", ["persistent", "step"])
def test_16_bit_layers_use_tf32_only_on_16_bit_values(monkeypatch, fp32_precision_restored,
                                                      path):
    """For 16-bit data the launcher's GEMMs run on TF32 because their operands hold 16-bit
    values, which TF32 holds exactly. A GEMM of fp32 values (the projection's dW_hr: dh and
    m = o * tanh(c) are fp32) follows cuDNN's RNN setting instead, as the fp32 products of the
    projection do, so with it off none of them runs on TF32."""
    common.cudnn_rnn_setting().fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    seen = []

    def exact16(t):
        return bool((t.to(torch.bfloat16).float() == t).all())

    def wrap(fn):
        def recorded(a, b, *args, **kwargs):
            if a.dtype == torch.float32:
                seen.append((common.gemm_fp32_precision(), exact16(a) and exact16(b),
                             tuple(a.shape), tuple(b.shape)))
            return fn(a, b, *args, **kwargs)

        return recorded

    monkeypatch.setattr(torch.nn.functional, "linear", wrap(torch.nn.functional.linear))
    monkeypatch.setattr(torch.Tensor, "__matmul__", wrap(torch.Tensor.__matmul__))
    monkeypatch.setattr(torch, "mm", wrap(torch.mm))
    ours, _ = layer_fns("LSTM", path=path)
    outputs_and_grads(ours, make_inputs("LSTM", 2, 3, 4, 6, proj=3, seed=5), torch.bfloat16,
                      layer_cotangents("LSTM", 2, 3, 6, 3))
    assert any(p == "tf32" for p, *_ in seen) and any(p == "ieee" for p, *_ in seen), seen
    assert not [g for g in seen if g[0] == "tf32" and not g[1]], seen


@pytest.mark.parametrize("path", ["persistent", "step"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_16_bit_gemms_of_backward_take_the_rounded_dgates(monkeypatch, mode, path):
    """The contract (reference._Linear16): in 16-bit storage the dgates are rounded to the dtype
    before any use, so the launcher hands dx, dW_ih and dW_hh (GRU's in two) 16-bit operands
    (common.mm_f32: 16-bit tensor cores on a GPU), never the kernels' fp32 dgates."""
    seen = []

    def recording(a, b, cd, **kw):
        seen.append((a.dtype, b.dtype, cd))
        return common.mm_f32(a, b, cd, **kw)

    monkeypatch.setattr(launch, "mm_f32", recording)
    ours, _ = layer_fns(mode, path=path)
    outputs_and_grads(ours, make_inputs(mode, 2, 3, 4, 8, seed=3), torch.bfloat16,
                      layer_cotangents(mode, 2, 3, 8, 8))
    bf16 = (torch.bfloat16, torch.bfloat16, torch.float32)
    assert seen == [bf16] * (4 if mode == "GRU" else 3), seen


def _persistent_case_on_the_step_path(mode, B, T, I, H, seed):
    """fp32 inputs and cotangents of a layer "auto" sends to the persistent kernels, and the
    step path's outputs and gradients for them."""
    assert launch.choose_path(mode, H, 0) == "persistent"
    inputs = make_inputs(mode, B, T, I, H, seed=seed)
    cots = layer_cotangents(mode, B, T, H, H, seed=seed + 1)
    step, _ = layer_fns(mode, path="step")
    _, want = outputs_and_grads(step, inputs, torch.float32, cots)
    return inputs, cots, want


def test_persistent_kernels_the_device_cannot_hold_fall_back_to_steps(monkeypatch):
    """Triton refuses a kernel at its first launch when the device has too little shared memory
    for it (an sm_86/89 GPU: 99 KB per block; LSTM H=64 fp32 backward needs 143 KB). Where
    "auto" chose the persistent kernels, the step kernels then run, with the step path's
    results bit for bit and one warning; a path asked for by name raises."""
    from triton.runtime.errors import OutOfResources

    class Refused:
        def __getitem__(self, grid):
            def launch_(*args, **kwargs):
                raise OutOfResources(146 * 1024, 99 * 1024, "shared memory")
            return launch_

    mode = "LSTM"
    inputs, cots, want = _persistent_case_on_the_step_path(mode, 3, 4, 5, 8, seed=11)
    auto, _ = layer_fns(mode, path="auto")
    # an sm_86 GPU holds LSTM H=64 fp32's persistent forward (80 KB), not its backward (143 KB):
    # the step backward then takes what the persistent forward saved
    monkeypatch.setattr(launch.kernels, "_persistent_bwd_kernel", Refused())
    monkeypatch.setattr(launch, "_refused", set())
    with pytest.warns(RuntimeWarning, match="cannot run the persistent backward kernel"):
        _, mixed = outputs_and_grads(auto, inputs, torch.float32, cots)
    for a, b in zip(mixed, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(launch.kernels, "_persistent_fwd_kernel", Refused())
    monkeypatch.setattr(launch, "_refused", set())
    with pytest.warns(RuntimeWarning, match="cannot run the persistent (forward|backward) kernel"):
        _, got = outputs_and_grads(auto, inputs, torch.float32, cots)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # said once
        outputs_and_grads(auto, inputs, torch.float32, cots)
    forced, _ = layer_fns(mode, path="persistent")
    with pytest.raises(OutOfResources):
        outputs_and_grads(forced, inputs, torch.float32, cots)


@pytest.mark.parametrize("version,want", [((3, 8), False), ((3, 9), True), ((4, 0), True)])
def test_backward_known_to_abort_the_compiler_is_named(monkeypatch, version, want):
    """Triton 3.9.0's LLVM aborts compiling one variant (launch.backward_aborts_compiler): the
    persistent LSTM backward, fp32 IEEE dots, no projection, BLOCK_H 64. Only that one."""
    monkeypatch.setattr(launch, "_triton_version", lambda: version)
    monkeypatch.setattr(launch, "_llvm_compiles", lambda: True)
    f32 = torch.float32
    assert launch.backward_aborts_compiler("LSTM", f32, "ieee", 64, False) is want
    assert launch.backward_aborts_compiler("LSTM", f32, "ieee", 33, False) is want
    assert not launch.backward_aborts_compiler("LSTM", f32, "ieee", 32, False)  # BLOCK_H 32
    assert not launch.backward_aborts_compiler("LSTM", f32, "tf32", 64, False)
    assert not launch.backward_aborts_compiler("LSTM", f32, "ieee", 64, True)  # projection
    assert not launch.backward_aborts_compiler("LSTM", torch.bfloat16, "ieee", 64, False)
    assert not launch.backward_aborts_compiler("GRU", f32, "ieee", 64, False)
    monkeypatch.setattr(launch, "_llvm_compiles", lambda: False)  # the interpreter: no LLVM
    assert not launch.backward_aborts_compiler("LSTM", f32, "ieee", 64, False)


@pytest.mark.parametrize("version,want", [((3, 8), 32), ((3, 9), 16), ((4, 0), 16)])
def test_step_forward_takes_slices_of_16_where_the_compiler_spills(monkeypatch, version, want):
    """Triton 3.9.0 spills 88 bytes a thread compiling one step forward variant with K slices
    of 32 (launch.step_fwd_block_k): LSTM, fp32 on TF32, lengths, 32-row batch tiles. Only
    that one takes 16; a K under 32 keeps its own power of two."""
    monkeypatch.setattr(launch, "_triton_version", lambda: version)
    f32 = torch.float32
    assert launch.step_fwd_block_k("LSTM", f32, "tf32", True, 32, 1024) == want
    assert launch.step_fwd_block_k("LSTM", f32, "tf32", True, 32, 37) == want
    assert launch.step_fwd_block_k("LSTM", f32, "tf32", True, 32, 9) == 16
    assert launch.step_fwd_block_k("LSTM", f32, "tf32", False, 32, 1024) == 32  # no lengths
    assert launch.step_fwd_block_k("LSTM", f32, "tf32", True, 16, 1024) == 32  # 16-row tiles
    assert launch.step_fwd_block_k("LSTM", f32, "ieee", True, 32, 1024) == 32
    assert launch.step_fwd_block_k("LSTM", torch.bfloat16, "tf32", True, 32, 1024) == 32
    assert launch.step_fwd_block_k("GRU", f32, "tf32", True, 32, 1024) == 32


def test_step_forward_launches_the_slices_it_chose(monkeypatch):
    """The launcher passes step_fwd_block_k's answer to the kernel, and slices of 16 give the
    sums of slices of 32 in another order: the same outputs to fp32 rounding."""
    real = launch.kernels._step_fwd_kernel
    seen = []

    class Recorded:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append(kwargs["BLOCK_K"])
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(launch.kernels, "_step_fwd_kernel", Recorded())
    monkeypatch.setattr(launch, "interpreting", lambda: True)  # it asks the kernel's type
    B, T, I, H = 33, 2, 3, 40  # 33 rows: 32-row batch tiles
    inputs = {k: None if v is None else v.to(DEVICE)
              for k, v in make_inputs("LSTM", B, T, I, H, seed=3).items()}
    lens = (torch.arange(B) % T + 1).to(DEVICE)
    outs = {}
    for version in ((3, 8), (3, 9)):
        monkeypatch.setattr(launch, "_triton_version", lambda v=version: v)
        # TF32 as on a GPU (the interpreter's dots are fp32 whatever they are told).
        monkeypatch.setattr(launch, "_fp32_dot_precision", lambda: "tf32")
        outs[version] = ops.triton_layer("LSTM", *inputs.values(), lens, False, False,
                                         "step")[:3]
    assert seen == [32] * T + [16] * T
    for a, b in zip(outs[(3, 8)], outs[(3, 9)], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_triton_version_parsing(monkeypatch):
    for text, want in [("3.6.0", (3, 6)), ("3.9.0+git1a2b", (3, 9)), ("3.10.1", (3, 10)),
                       ("4.0.0rc1", (4, 0)), ("3.9", (3, 9))]:
        monkeypatch.setattr(launch.triton, "__version__", text)
        assert launch._triton_version() == want, text


def test_backward_that_would_abort_the_compiler_takes_the_step_path(monkeypatch):
    """Where the installed Triton would abort on the persistent backward, "auto" runs the step
    backward on what the persistent forward saved (no persistent backward launch), with the
    step path's gradients; that path asked for by name raises a clear error instead of letting
    the compiler take the process down."""

    class Refused:
        def __getitem__(self, grid):
            raise AssertionError("the persistent backward kernel was launched")

    mode = "LSTM"
    inputs, cots, want = _persistent_case_on_the_step_path(mode, 2, 2, 3, 40, seed=5)
    monkeypatch.setattr(launch, "_triton_version", lambda: (3, 9))
    monkeypatch.setattr(launch, "_llvm_compiles", lambda: True)  # as if compiled for a GPU
    monkeypatch.setattr(launch.kernels, "_persistent_bwd_kernel", Refused())
    auto, _ = layer_fns(mode, path="auto")
    _, got = outputs_and_grads(auto, inputs, torch.float32, cots)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    forced, _ = layer_fns(mode, path="persistent")
    with pytest.raises(RuntimeError, match=r"aborts the process compiling the persistent LSTM"):
        outputs_and_grads(forced, inputs, torch.float32, cots)


def test_inference_saves_nothing_and_matches_training_outputs():
    inputs = {k: None if v is None else v.to(DEVICE) for k, v in make_inputs("GRU", 3, 4, 4, 8).items()}
    train = ops.triton_layer("GRU", *inputs.values(), None, False, True, "auto")
    with torch.no_grad():
        y, h_n, _ = tr.rnn_layer("GRU", *inputs.values())
    infer = ops.triton_layer("GRU", *inputs.values(), None, False, False, "auto")
    assert infer[3].numel() == 0 and infer[4].numel() == 0 and train[3].numel() > 0
    for a, b in ((y, train[0]), (h_n, train[1]), (infer[0], train[0])):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------- the fused step (cells)
@pytest.mark.parametrize("dtype,eps", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode", MODES)
def test_cell_matches_reference(mode, bias, dtype, eps):
    B, I, H = 3, 4, 37
    inputs = make_inputs(mode, B, 1, I, H, bias=bias, seed=7)
    cell_inputs = dict(x=inputs["x"][0], h=inputs["h0"], c=inputs["c0"], w_ih=inputs["w_ih"],
                       w_hh=inputs["w_hh"], b_ih=inputs["b_ih"], b_hh=inputs["b_hh"])

    def ours(**kw):
        return tr.rnn_cell(mode, **kw)

    def ref(**kw):
        return reference.rnn_cell(mode, **kw)

    g = torch.Generator().manual_seed(8)
    check_against_fp64(ours, ref, cell_inputs, dtype, eps, [torch.randn(B, H, generator=g) for _ in range(2)])


@pytest.mark.parametrize("mode", ["RNN_TANH", "GRU", "LSTM"])
def test_tanh_keeps_its_relative_accuracy_near_zero(mode):
    """tanh was 2*sigmoid(2x)-1: right to 1e-7 absolute, but 6% off relative for inputs near
    1e-5 (and 100% near 1e-8), so small activations lost their digits against torch.nn."""
    G = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[mode]
    B, I, H = 2, 3, 5
    g = torch.Generator().manual_seed(3)
    for scale in (1e-2, 1e-5, 1e-8):
        args = {"x": torch.randn(B, I, generator=g) * scale, "h": torch.zeros(B, H),
                "c": torch.randn(B, H, generator=g) * scale if mode == "LSTM" else None,
                "w_ih": torch.randn(G * H, I, generator=g),
                "w_hh": torch.randn(G * H, H, generator=g)}
        args = {k: None if v is None else v.to(DEVICE) for k, v in args.items()}
        h, c = tr.rnn_cell(mode, **args)
        h64, c64 = reference.rnn_cell(mode, **{k: None if v is None else v.double()
                                               for k, v in args.items()})
        torch.testing.assert_close(h.double(), h64, rtol=2e-5, atol=0, msg=f"{mode} {scale}")
        if mode == "LSTM":
            torch.testing.assert_close(c.double(), c64, rtol=2e-5, atol=0)


def test_tanh_is_within_a_few_ulps_and_keeps_its_gradient_near_saturation():
    """tanh above |x| = 0.25 was 2*sigmoid(2x)-1: up to 10 ulps off at fp32, and near
    saturation 1 - tanh^2 (the backward's) came out 0 from |x| = 8.3 (true: 2.2e-7, torch's
    within 10%) and 9x torch's error at 6. An RNN_TANH cell with W_ih = I and no W_hh computes
    tanh(x) exactly as the kernel's tanh, and its backward the kernel's 1 - tanh^2."""
    from fused_rnn.ops.triton import launch

    H = 64
    x = torch.cat([torch.linspace(-10, 10, H * H).reshape(H, H),
                   torch.linspace(0.25, 1.0, H * H).reshape(H, H),  # exp's error amplified
                   torch.tensor([6.0, -6.0, 8.365, -8.365]).repeat(H // 4)[None]])
    x = x.to(DEVICE).requires_grad_()
    args = {"h": torch.zeros(x.shape[0], H, device=DEVICE), "c": None,
            "w_ih": torch.eye(H, device=DEVICE), "w_hh": torch.zeros(H, H, device=DEVICE)}
    h, _ = tr.rnn_cell("RNN_TANH", x=x, **args)
    want = torch.tanh(x.detach().double())
    ulp = torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(want.abs()
                                                                           .clamp_min(1e-30)))
    ulps = ((h.detach().double() - want).abs() / ulp).max().item()
    # numpy's exp under the interpreter (this grid: 3.6 now, 5.7 before); a GPU's tl.exp is
    # ex2.approx, a little less exact (not yet measured)
    assert ulps <= (4.5 if launch.interpreting() else 8.0), ulps
    (grad,) = torch.autograd.grad(h.sum(), x)
    true = 1 - want ** 2
    rel = ((grad.double() - true).abs() / true)[-1]  # the row of +-6 and +-8.365
    assert rel[0::4].max() < 2e-3 and rel[2::4].max() < 0.2, rel[:4]


# --------------------------------------------------------------------------- modules vs torch.nn
def _module_pair(nn_cls, our_cls, *args, **kw):
    torch.manual_seed(0)
    ref = nn_cls(*args, **kw).to(DEVICE)
    ours = our_cls(*args, **kw, backend="triton").to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _flat(out):
    y, hidden = out
    ys = [y.data if hasattr(y, "batch_sizes") else y]
    return ys + (list(hidden) if isinstance(hidden, tuple) else [hidden])


def _compare_modules(ref, ours, inputs_fn, cell=False):
    """Outputs, and gradients w.r.t. inputs, states and parameters, from random cotangents."""
    results = []
    for m in (ref, ours):
        args = inputs_fn()
        out = m(*args)
        if cell:
            outs = list(out) if isinstance(out, tuple) else [out]
        else:
            outs = _flat(out)
        g = torch.Generator().manual_seed(9)
        loss = sum((o * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [a for a in _tensors(args) if a.requires_grad] + list(m.parameters()))
        results.append([o.detach() for o in outs] + list(grads))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, tuple):
            yield from _tensors(a)
        elif hasattr(a, "batch_sizes"):
            yield a.data


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE).requires_grad_()


def test_module_lstm_packed_bidirectional_two_layers_projection():
    ref, ours = _module_pair(torch.nn.LSTM, fused_rnn.LSTM, 5, 8, 2, bidirectional=True, proj_size=3)
    lengths = torch.tensor([2, 5, 4])

    def inputs():
        x = _rand(5, 3, 5)
        return (pack_padded_sequence(x, lengths, enforce_sorted=False), (_rand(4, 3, 3, seed=1), _rand(4, 3, 8, seed=2)))

    _compare_modules(ref, ours, inputs)


def test_module_gru_bidirectional_batch_first():
    ref, ours = _module_pair(torch.nn.GRU, fused_rnn.GRU, 4, 7, bidirectional=True, batch_first=True)
    _compare_modules(ref, ours, lambda: (_rand(3, 5, 4), _rand(2, 3, 7, seed=1)))


def test_module_rnn_relu_two_layers_unbatched():
    ref, ours = _module_pair(torch.nn.RNN, fused_rnn.RNN, 4, 6, 2, nonlinearity="relu")
    _compare_modules(ref, ours, lambda: (_rand(5, 4), _rand(2, 6, seed=1)))


@pytest.mark.parametrize("nn_cls,our_cls", [
    (torch.nn.LSTMCell, fused_rnn.LSTMCell), (torch.nn.GRUCell, fused_rnn.GRUCell),
    (torch.nn.RNNCell, fused_rnn.RNNCell)], ids=["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_modules(nn_cls, our_cls):
    ref, ours = _module_pair(nn_cls, our_cls, 4, 9)
    if nn_cls is torch.nn.LSTMCell:
        _compare_modules(ref, ours, lambda: (_rand(3, 4), (_rand(3, 9, seed=1), _rand(3, 9, seed=2))), cell=True)
    else:
        _compare_modules(ref, ours, lambda: (_rand(3, 4), _rand(3, 9, seed=1)), cell=True)


def test_fp64_falls_back_to_reference_with_a_warning(monkeypatch):
    from fused_rnn import backends

    monkeypatch.setattr(backends, "_warned", set())
    lstm = fused_rnn.LSTM(3, 5, backend="triton", dtype=torch.float64).to(DEVICE)
    ref = fused_rnn.LSTM(3, 5, backend="reference", dtype=torch.float64).to(DEVICE)
    ref.load_state_dict(lstm.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="float64.*falling back to 'reference'"):
        y = lstm(x)[0]
    torch.testing.assert_close(y, ref(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("transform", ["jvp", "grad", "forward_ad"])
@pytest.mark.parametrize("cls", ["GRU", "GRUCell"])
def test_torch_func_transforms_run_the_reference(monkeypatch, transform, cls):
    """The fused ops have a backward formula only: under torch.func.jvp torch gave them a zero
    tangent without an error, and func.grad failed inside torch. Inside a transform the call
    falls back to the reference, with the reason, and the result is nn's."""
    from fused_rnn import backends

    monkeypatch.setattr(backends, "_warned", set())
    torch.manual_seed(0)
    ours = getattr(fused_rnn, cls)(3, 4, backend="triton").to(DEVICE)
    nn_mod = getattr(torch.nn, cls)(3, 4).to(DEVICE)
    nn_mod.load_state_dict(ours.state_dict())
    x = torch.randn(*((5, 2, 3) if cls == "GRU" else (2, 3)), device=DEVICE)
    v = torch.randn_like(x)

    def f(m):
        return lambda inp: (m(inp)[0] if cls == "GRU" else m(inp))

    def run(m, x, v):
        if transform == "jvp":
            return torch.func.jvp(f(m), (x,), (v,))[1]
        if transform == "forward_ad":  # dual tensors, outside torch.func
            fwad = torch.autograd.forward_ad
            with fwad.dual_level():
                return fwad.unpack_dual(f(m)(fwad.make_dual(x, v))).tangent
        return torch.func.grad(lambda inp: f(m)(inp).square().sum())(x)

    said = "dual_level" if transform == "forward_ad" else "torch.func transform"
    with pytest.warns(RuntimeWarning, match=f"{said}.*falling back to 'reference'"):
        got = run(ours, x, v)
    # torch.nn's side on the CPU: on CUDA its cuDNN GRU and fused GRU cell have no
    # forward-mode formula (jvp and dual tensors raise there).
    want = run(nn_mod.cpu(), x.cpu(), v.cpu())
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- availability
def test_available_here():
    assert tr.unavailable_reason(None) is None
    assert tr.unavailable_reason(torch.device(DEVICE)) is None
    assert "triton" in fused_rnn.available_backends(DEVICE)
    if launch.interpreting():
        assert tr.unavailable_reason(torch.device("cpu")) is None
    else:
        assert "TRITON_INTERPRET=1" in tr.unavailable_reason(torch.device("cpu"))
    assert "not on mps" in tr.unavailable_reason(torch.device("mps"))


def test_unsupported_reasons():
    cfg = dict(mode="LSTM", device=torch.device(DEVICE), input_size=4, hidden_size=8,
               proj_size=0, has_lengths=False)
    assert tr.unsupported_reason("layer", dtype=torch.float64, **cfg) is not None
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert tr.unsupported_reason("layer", dtype=dt, **cfg) is None
        assert tr.unsupported_reason("cell", dtype=dt, **cfg) is None


def _run_python(code: str, env_drop=("TRITON_INTERPRET",)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, check=False,
                          text=True, env=env, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cpu_without_interpreter_says_how_to_get_it():
    code = ("import torch\nfrom fused_rnn.ops import triton as tr\n"
            "print(tr.unavailable_reason(torch.device('cpu')))\nprint(tr.unavailable_reason(None))")
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and all("TRITON_INTERPRET=1" in line for line in lines), res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter")
def test_interpreter_works_when_triton_was_imported_first():
    """A whole test run imports triton (inductor) before this directory's conftest sets
    TRITON_INTERPRET; only our kernels must be defined after it."""
    code = ("import triton, triton.language, os\nos.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch\nfrom fused_rnn.ops import reference, triton as tr\n"
            "x, h, c, w1, w2 = torch.randn(2, 3, 4), torch.randn(3, 8), torch.randn(3, 8), "
            "torch.randn(32, 4), torch.randn(32, 8)\n"
            "y = tr.rnn_layer('LSTM', x, h, c, w1, w2)[0]\n"
            "print((y - reference.rnn_layer('LSTM', x, h, c, w1, w2)[0]).abs().max().item())")
    res = _run_python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip()) < 1e-5, res.stdout


def test_missing_triton_is_a_reason_not_an_import_error():
    code = ("import sys; sys.modules['triton'] = None\nimport torch, fused_rnn\n"
            "from fused_rnn.ops import triton as tr\nprint(tr.unavailable_reason(None))\n"
            "try:\n    fused_rnn.GRU(3, 4, backend='triton')(torch.randn(2, 1, 3))\n"
            "except RuntimeError as e:\n    print('raised:', e)\n")
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert "pip install triton" in res.stdout and "raised: fused_rnn backend 'triton' is unavailable" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels under the interpreter")
def test_first_calls_from_several_threads_find_the_kernels_loaded():
    """Serving threads making their first Triton calls together, in a fresh process: a thread
    that looked while another was still importing the kernel module found it half-made in
    sys.modules (AttributeError: ... has no attribute 'interpreting'). The check ran for every
    device, so the race was there on a GPU too; this test runs it under the interpreter."""
    code = (
        "import sys, threading, time, torch, fused_rnn\n"
        "m = fused_rnn.GRU(3, 4, backend='triton').eval()\n"
        "assert 'fused_rnn.ops.triton.launch' not in sys.modules\n"
        "x, res = torch.randn(2, 2, 3), {}\n"
        "def serve(i):\n"
        "    time.sleep(0.003 * i)\n"
        "    try:\n"
        "        with torch.no_grad():\n"
        "            res[i] = m(x)[0]\n"
        "    except Exception as e:\n"
        "        res[i] = f'{type(e).__name__}: {e}'\n"
        "ts = [threading.Thread(target=serve, args=(i,)) for i in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "bad = [r for r in res.values() if not isinstance(r, torch.Tensor)]\n"
        "print(len(res), bad or all(torch.equal(r, res[0]) for r in res.values()))\n"
    )
    res = _run_python(code, env_drop=())
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "4 True", res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels under the interpreter")
def test_interpreted_calls_from_several_threads_at_once():
    """Triton's interpreter patches triton.language process-wide while a kernel runs; four
    threads sharing a module broke each other's kernels ("Did you forget to add @triton.jit
    ?"). Launches take turns under the interpreter, and every thread gets its own answer."""
    import threading

    torch.manual_seed(0)
    m = fused_rnn.GRU(3, 4, backend="triton").eval()
    xs = [torch.randn(2, 40, 3) for _ in range(4)]  # B=40: two batch tiles in the step grid
    with torch.no_grad():
        want = [m(x)[0] for x in xs]
    got = {}

    def work(i):
        try:
            with torch.no_grad():
                got[i] = [torch.equal(m(xs[i])[0], want[i]) for _ in range(2)]
        except Exception as e:
            got[i] = f"{type(e).__name__}: {e}"

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads change often, as on a busy machine
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(switch)
    assert got == {i: [True, True] for i in range(4)}, got


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other tests compile for real")
def test_every_launched_variant_compiles_for_sm90(tmp_path):
    """The real Triton compiler (to cubin, bundled ptxas) on what the interpreter only ran:
    every variant fits the shared memory of a block and spills at most a few registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    res = subprocess.run([sys.executable, "-m", "fused_rnn.ops.triton.compile_check", "--quick"],
                         capture_output=True, check=False, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "compiled 172 kernel variants for sm_90" in res.stdout, res.stdout[-2000:]


# --------------------------------------------------------------------------- torch.library
@pytest.mark.parametrize("device", [DEVICE, "meta"])
@pytest.mark.parametrize("op", ["layer", "cell"])
def test_ops_refuse_a_dtype_the_kernels_do_not_take(op, device):
    """Called directly with float64, the op used to return float64 computed in fp32 (and
    gradcheck failed); its kernel and its fake now refuse it."""
    d = {"device": device, "dtype": torch.float64}
    h, c, w_ih, w_hh = (torch.randn(2, 3, **d), torch.randn(2, 3, **d), torch.randn(12, 2, **d),
                        torch.randn(12, 3, **d))
    with pytest.raises(TypeError, match=f"fused_rnn::triton_{op} takes float32, float16 and "
                                        f"bfloat16 inputs, not torch.float64"):
        if op == "layer":
            ops.triton_layer("LSTM", torch.randn(3, 2, 2, **d), h, c, w_ih, w_hh, None, None,
                             None, None, False, False, "auto")
        else:
            ops.triton_cell("LSTM", torch.randn(2, 2, **d), h, c, w_ih, w_hh, None, None, False)


def _transposed_layout(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, dims 0 and 1 in memory swapped (a batch_first input's view, say)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t


def _layer_args(mode, proj=0, lengths=False, reverse=False, path="auto", bias=True, grad=True,
                strided=False):
    B, T, I, H = 2, 3, 4, 8
    inp = make_inputs(mode, B, T, I, H, proj=proj, bias=bias, seed=10)
    layout = _transposed_layout if strided else (lambda t: t)
    inp = {k: None if v is None else layout(v.to(DEVICE)).requires_grad_(grad)
           for k, v in inp.items()}
    lens = torch.tensor([3, 1], device=DEVICE) if lengths else None
    return (mode, *inp.values(), lens, reverse, True, path)


OPCHECK_LAYERS = [
    pytest.param(dict(mode="LSTM", proj=3, lengths=True, reverse=True, path="persistent"), id="LSTM-proj-lengths-reverse-persistent"),
    pytest.param(dict(mode="LSTM", proj=3, lengths=True, path="step"), id="LSTM-proj-lengths-step"),
    pytest.param(dict(mode="GRU", lengths=True, path="step"), id="GRU-lengths-step"),
    pytest.param(dict(mode="RNN_TANH", bias=False, path="persistent"), id="RNN_TANH-nobias-persistent"),
    pytest.param(dict(mode="RNN_RELU", reverse=True, path="step"), id="RNN_RELU-reverse-step"),
]


@pytest.mark.parametrize("cfg", OPCHECK_LAYERS)
def test_opcheck_layer(cfg):
    torch.library.opcheck(torch.ops.fused_rnn.triton_layer.default, _layer_args(**cfg))


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("cfg", [OPCHECK_LAYERS[0], OPCHECK_LAYERS[2]])
def test_opcheck_layer_backward(cfg, strided):
    """Strided: every input in a transposed layout (a batch_first model's x is one). The
    gradients come back contiguous from the kernels and from the fake alike, which Inductor
    checks (a fake that copied x's strides failed compiled batch_first models)."""
    args = _layer_args(**cfg, grad=False, strided=strided)
    assert not strided or not args[1].is_contiguous()
    mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, reverse, _, path = args
    y, h_n, c_n, gates, state = ops.triton_layer(*args)
    g = torch.Generator().manual_seed(11)
    dy, dh = (torch.randn(t.shape, generator=g).to(DEVICE) for t in (y, h_n))
    dc = torch.randn(c_n.shape, generator=g).to(DEVICE) if mode == "LSTM" else None
    torch.library.opcheck(
        torch.ops.fused_rnn.triton_layer_backward.default,
        (mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, reverse, y, gates, state, dy, dh, dc, path),
    )


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_opcheck_cell_and_backward(mode, strided):
    _, x, h0, c0, w_ih, w_hh, b_ih, b_hh, _, _, _, _, _ = _layer_args(mode, strided=strided)
    args = (mode, x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, True)
    torch.library.opcheck(torch.ops.fused_rnn.triton_cell.default, args)
    # save=False (inference): nothing saved, as the fake kernel says (a cell that saved anyway
    # passed every other test)
    no_save = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1])
    no_save = (*no_save, False)
    torch.library.opcheck(torch.ops.fused_rnn.triton_cell.default, no_save)
    _, _, gates0, state0 = ops.triton_cell(*no_save)
    assert gates0.numel() == 0 and state0.numel() == 0
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    h1, c1, gates, state = ops.triton_cell(*plain)
    dc = torch.randn_like(c1) if mode == "LSTM" else None
    torch.library.opcheck(torch.ops.fused_rnn.triton_cell_backward.default,
                          (*plain[:8], h1, gates, state, torch.randn_like(h1), dc))


def test_weights_past_int32_offsets_are_refused_by_the_ops_and_fall_back():
    """The kernels' weight offsets are int32: W_hh is (4H, P), so an LSTM projecting wider
    than its cells (P > H, which fused_rnn.functional takes) counts too, and the registered ops
    called directly checked nothing. Zero-stride weights: nothing large is allocated."""
    H, P, I, B, T = 8192, 65600, 3, 2, 2
    assert tr.unsupported_reason("layer", mode="LSTM", device=torch.device(DEVICE),
                                 dtype=torch.bfloat16, input_size=I, hidden_size=H,
                                 proj_size=0, has_lengths=False) is None
    reason = tr.unsupported_reason("layer", mode="LSTM", device=torch.device(DEVICE),
                                   dtype=torch.bfloat16, input_size=I, hidden_size=H,
                                   proj_size=P, has_lengths=False)
    assert reason is not None and "int32 weight offsets" in reason

    def big(*shape):
        return torch.zeros((1,) * len(shape), dtype=torch.bfloat16, device=DEVICE).expand(*shape)

    x, w_ih = big(T, B, I), big(4 * H, I)
    with pytest.raises(RuntimeError, match="triton_layer: .*int32 weight offsets"):
        ops.triton_layer("LSTM", x, big(B, P), big(B, H), w_ih, big(4 * H, P), None, None,
                         big(P, H), None, False, False, "auto")
    H = 23200  # no projection: W_hh alone has 2**31 elements
    with pytest.raises(RuntimeError, match="triton_cell: LSTM with hidden_size 23200 is too "
                                           "large for the kernels' int32 weight offsets"):
        ops.triton_cell("LSTM", x[0], big(B, H), big(B, H), big(4 * H, I), big(4 * H, H), None,
                        None, False)


@pytest.mark.parametrize("mode,I,H", [("LSTM", 2**21, 256), ("GRU", 3, 25000),
                                      ("RNN_TANH", 3, 30000)])
def test_int32_offsets_count_the_weights_the_kernels_index(mode, I, H):
    """W_ih only meets torch's GEMM, and GRU and RNN have 3 and 1 gates, not 4: these layers'
    largest kernel offsets (W_hh's G*H*H elements: 2.6e5, 1.9e9, 9.0e8) fit int32, and were
    refused. The first hidden size whose W_hh reaches 2**31 elements is refused."""
    import math

    kw = dict(mode=mode, device=torch.device(DEVICE), dtype=torch.bfloat16, input_size=I,
              proj_size=0, has_lengths=False)
    assert tr.unsupported_reason("layer", hidden_size=H, **kw) is None
    G = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[mode]
    first = math.isqrt((2**31 - 1) // G) + 1
    assert G * first**2 >= 2**31 > G * (first - 1) ** 2
    assert tr.unsupported_reason("layer", hidden_size=first - 1, **kw) is None
    assert "int32 weight offsets" in tr.unsupported_reason("layer", hidden_size=first, **kw)


@pytest.mark.parametrize("path", ["persistent", "step"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_the_backward_ops_take_saved_activations_in_any_layout(mode, path):
    """The backward kernels index gates and state row-major: a caller's strided copies (the
    ops called directly) gave wrong gradients, and expanded ones read past their storage.
    They are copied row-major now: the same bits as the forward's own."""
    args = _layer_args(mode, path=path, grad=False)
    mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, reverse, _, path = args
    y, _, _, gates, state = ops.triton_layer(*args)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)

    def grads(g, st):
        return ops.triton_layer_backward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens,
                                         reverse, y, g, st, dy, None, None, path)

    want = grads(gates, state)
    first = gates[:1].clone()
    for g, st, label in ((_transposed_layout(gates), _transposed_layout(state), "transposed"),
                         (first.expand_as(gates), state, "expanded")):
        assert not g.is_contiguous()
        base = want if label == "transposed" else grads(g.contiguous(), st)
        for i, (a, b) in enumerate(zip(grads(g, st), base)):
            assert torch.equal(a, b), (label, i)
    h1, _, cg, cs = ops.triton_cell(mode, x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, True)
    wide = torch.cat([cg, torch.full_like(cg, 7.0)], -1)  # gates as a column slice
    cwant, cgot = (ops.triton_cell_backward(mode, x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, h1, g,
                                            cs, torch.ones_like(h1), None)
                   for g in (cg, wide[..., : cg.shape[-1]]))
    for i, (a, b) in enumerate(zip(cgot, cwant)):
        assert torch.equal(a, b), ("cell", i)


@pytest.mark.parametrize("cls,shape", [(fused_rnn.LSTM, (3, 2, 4)), (fused_rnn.GRUCell, (2, 4))],
                         ids=["layer", "cell"])
def test_double_backward_is_refused_clearly(cls, shape):
    """create_graph=True still gives first-order gradients; differentiating them again raises
    our message (not PyTorch's "no autograd formula" for an internal op)."""
    torch.manual_seed(0)
    m = cls(4, 5, backend="triton").to(DEVICE)
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    out = m(x)
    y = out[0] if isinstance(out, tuple) else out
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    ref = cls(4, 5, backend="reference").to(DEVICE)
    ref.load_state_dict(m.state_dict())
    out_ref = ref(x)
    y_ref = out_ref[0] if isinstance(out_ref, tuple) else out_ref
    (gx_ref,) = torch.autograd.grad(y_ref.pow(2).sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="double backward.*'triton'.*backend=\"reference\""):
        torch.autograd.grad(gx.pow(2).sum(), x)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_computes_in_the_autocast_dtype(autocast_dtype):
    args = _layer_args("LSTM", grad=False)
    with torch.autocast(DEVICE, dtype=autocast_dtype):
        y, h_n, c_n, _, _ = ops.triton_layer(*args)
    assert y.dtype == h_n.dtype == c_n.dtype == autocast_dtype
    cast = tuple(a.to(autocast_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    y2, h2, c2, _, _ = ops.triton_layer(*cast)
    for a, b in ((y, y2), (h_n, h2), (c_n, c2)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fused_rnn.LSTM(4, 8, 2, batch_first=True, backend="triton")
        self.gru = fused_rnn.GRU(8, 6, bidirectional=True, batch_first=True, backend="triton")
        self.cell = fused_rnn.GRUCell(12, 5, backend="triton")

    def forward(self, x, state):
        y, state = self.lstm(x, state)
        z, _ = self.gru(y)
        return self.cell(z[:, -1]), state


@pytest.mark.no_nan_fill  # dynamo would trace the conftest's torch.empty wrapper
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _TinyModel().to(DEVICE)
    # x needs its gradient: the batch_first layer's input is then a transposed view whose
    # gradient Inductor checks against the fake's strides.
    x = torch.randn(3, 5, 4, device=DEVICE, requires_grad=True)
    state = (torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE))

    def run(fn):
        model.zero_grad()
        x.grad = None
        out, (h, c) = fn(x, state)
        (out.sin().sum() + (h * 2).cos().sum() + c.square().sum()).backward()
        return ([out.detach(), h.detach(), c.detach(), x.grad.clone()]
                + [p.grad.clone() for p in model.parameters()])

    torch._dynamo.reset()
    with warnings.catch_warnings():
        # No silent fallback to the reference: our warnings, which all start "fused_rnn", are
        # errors. Only ours: dynamo itself warns on Python 3.13.0 that its guards run slower.
        warnings.filterwarnings("error", "fused_rnn", RuntimeWarning)
        compiled = run(torch.compile(model, fullgraph=True))
    for a, b in zip(compiled, run(model)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)



@pytest.mark.no_nan_fill  # export traces like dynamo: not through the conftest's torch.empty
def test_export_with_a_dynamic_sequence_length(tmp_path):
    """torch.export keeps the registered ops in the graph, so T can stay symbolic (torch.nn's
    own LSTM specializes it); the program saved and loaded runs another T like eager."""
    from torch.export import Dim

    torch.manual_seed(0)
    model = _TinyModel().to(DEVICE).eval()
    x = torch.randn(3, 5, 4, device=DEVICE)
    state = (torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE))
    T = Dim("T", min=2, max=256)
    with warnings.catch_warnings():
        # No silent fallback to the reference: our warnings, which all start "fused_rnn", are
        # errors. Only ours: dynamo itself warns on Python 3.13.0 that its guards run slower.
        warnings.filterwarnings("error", "fused_rnn", RuntimeWarning)
        ep = torch.export.export(model, (x, state), dynamic_shapes=({1: T}, (None, None)))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"fused_rnn.triton_layer.default", "fused_rnn.triton_cell.default"} <= targets
    torch.export.save(ep, tmp_path / "tiny.pt2")
    loaded = torch.export.load(tmp_path / "tiny.pt2").module()
    x9 = torch.randn(3, 9, 4, device=DEVICE)
    with torch.no_grad():
        want = model(x9, state)
        got = loaded(x9, state)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # In a fresh process that only imported fused_rnn: the ops used to be registered at the
    # backend's first use, so the load failed to resolve fused_rnn::triton_layer.
    torch.save((x9, state), tmp_path / "inputs.pt")
    code = (f"import torch, fused_rnn\n"
            f"x, state = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
            f"with torch.no_grad():\n"
            f"    out = torch.export.load({str(tmp_path / 'tiny.pt2')!r}).module()(x, state)\n"
            f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n")
    res = _run_python(code, env_drop=())
    assert res.returncode == 0, res.stderr[-3000:]
    fresh = torch.load(tmp_path / "out.pt")
    for a, b in zip(torch.utils._pytree.tree_leaves(fresh), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    if DEVICE == "cpu":  # where the kernels cannot run, the op says why (not triton's driver error)
        res = _run_python(code)
        assert res.returncode != 0
        assert "fused_rnn backend 'triton' is unavailable: Triton kernels need a CUDA GPU" in res.stderr


def test_a_program_exported_without_gradients_says_how_to_get_one_that_trains():
    """Exported under no_grad, the op records save=False (an inference program saves no
    gates); its backward then named a function an exported program's user cannot call."""
    m = fused_rnn.GRU(3, 4, backend="triton").to(DEVICE)
    x = torch.randn(4, 2, 3, device=DEVICE)
    with torch.no_grad():
        inference = torch.export.export(m, (x,)).module()
    with pytest.raises(RuntimeError, match="under torch.no_grad.. keeps that choice: export it "
                                           "with gradients enabled to train it"):
        inference(x)[0].sum().backward()
    torch.export.export(m, (x,)).module()(x)[0].sum().backward()  # with gradients: it trains


# --------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_gpu_kernels_are_compiled_not_interpreted():
    assert not launch.interpreting()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,eps", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gpu_larger_shapes(mode, path, dtype, eps):
    B, T, I, H = 64, 16, 64, (64 if path == "persistent" else 256)
    lens = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(0))
    inputs = make_inputs(mode, B, T, I, H, seed=12)
    ours, ref = layer_fns(mode, lens, False, path)
    check_against_fp64(ours, ref, inputs, dtype, eps, layer_cotangents(mode, B, T, H, H))


@pytest.mark.gpu
def test_gpu_tf32_follows_cudnn_flag():
    """fp32 with allow_tf32: TF32-sized error (larger than fp32's), still tracking the reference."""
    torch.backends.cudnn.allow_tf32 = True
    B, T, I, H = 32, 8, 64, 256
    inputs = {k: None if v is None else v.to(DEVICE) for k, v in make_inputs("LSTM", B, T, I, H).items()}
    y_tf32 = ops.triton_layer("LSTM", *inputs.values(), None, False, False, "step")[0]
    torch.backends.cudnn.allow_tf32 = False
    y_ieee = ops.triton_layer("LSTM", *inputs.values(), None, False, False, "step")[0]
    exact = reference.rnn_layer("LSTM", *(None if v is None else v.double() for v in inputs.values()))[0]
    err_ieee, err_tf32 = ((y - exact).abs().max().item() for y in (y_ieee, y_tf32))
    assert err_ieee < 1e-5 and err_tf32 < 5e-3 and err_tf32 > err_ieee


def _layer_step(mode, path, inputs, lens, gy):
    """Forward and the weight/input gradients of one layer: what a training step runs."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (inputs[k] for k in
                                         ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"))
    y, h, _c, _, _ = ops.triton_layer(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lens, False,
                                     True, path)
    params = [t for t in (x, h0, w_ih, w_hh, b_ih, b_hh) if t is not None]
    return (y, h, *torch.autograd.grad(y, params, gy))


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gpu_two_runs_are_bitwise_identical(mode, path):
    """No atomics or run-to-run reductions: the same call twice gives the same bits."""
    B, T, I, H = 16, 12, 32, (64 if path == "persistent" else 96)
    inputs = _leaves(make_inputs(mode, B, T, I, H, seed=5), torch.bfloat16)
    lens = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    gy = torch.randn(T, B, H, device=DEVICE, dtype=torch.bfloat16)
    first = _layer_step(mode, path, inputs, lens, gy)
    second = _layer_step(mode, path, inputs, lens, gy)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two runs"


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_gpu_tensors_off_the_current_device(path):
    """Triton launches on the current device; the launchers make the tensors' device current,
    so a layer on cuda:1 while cuda:0 is current gives cuda:0's results, bit for bit."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two GPUs; this machine has {torch.cuda.device_count()}")
    B, T, I, H = 4, 5, 8, 16
    inputs = make_inputs("LSTM", B, T, I, H, seed=10)
    results = []
    for dev in ("cuda:0", "cuda:1"):
        args = [None if v is None else v.to(dev) for v in inputs.values()]
        with torch.cuda.device(0):
            y, h, c, gates, state = ops.triton_layer("LSTM", *args, None, False, True, path)
            grads = ops.triton_layer_backward(
                "LSTM", *args, None, False, y, gates, state, torch.ones_like(y), None, None,
                path)
        results.append([t.cpu() for t in (y, h, c, *grads) if t.numel()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.no_nan_fill
@pytest.mark.parametrize("path", PATHS)
def test_gpu_cuda_graph_capture_and_replay(path):
    """Forward and backward captured in one CUDA graph and replayed on new inputs give the
    eager results bit for bit (nothing in the launch path syncs with the host)."""
    mode, B, T, I, H = "LSTM", 8, 10, 24, (64 if path == "persistent" else 80)
    inputs = _leaves(make_inputs(mode, B, T, I, H, seed=6), torch.bfloat16)
    lens = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    gy = torch.randn(T, B, H, device=DEVICE, dtype=torch.bfloat16)
    static = dict(inputs)
    static["x"] = inputs["x"].detach().clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (kernel compiles, allocator)
        for _ in range(2):
            _layer_step(mode, path, static, lens, gy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _layer_step(mode, path, static, lens, gy)
    new_x = torch.randn_like(static["x"])
    with torch.no_grad():
        static["x"].copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    eager = _layer_step(mode, path, static, lens, gy)
    for i, (a, b) in enumerate(zip(captured, eager)):
        assert torch.equal(a, b), f"output {i} differs between graph replay and eager"


# --------------------------------------------------------------------------- training loops
# The shared bodies are in tests/training_checks.py. Under the interpreter one cell (slow
# there); on a GPU both.
TRAIN_CELLS = ["LSTM"] if launch.interpreting() else ["LSTM", "GRU"]


def _takes_every_layer(cell, dtype=torch.float32):
    """The Triton kernels take both layers of the checks' stack (so nothing falls back)."""
    for input_size in (training_checks.I, training_checks.H):
        assert tr.unsupported_reason(
            "layer", mode=cell, device=torch.device(DEVICE), dtype=dtype, input_size=input_size,
            hidden_size=training_checks.H, proj_size=0, has_lengths=False) is None


@pytest.mark.parametrize("cell", TRAIN_CELLS)
def test_ddp_training_matches_one_process(cell, tmp_path):
    _takes_every_layer(cell)
    training_checks.check_ddp_matches_one_process(cell, "triton", DEVICE, tmp_path)


@pytest.mark.parametrize("cell", TRAIN_CELLS)
def test_amp_training_tracks_torch_nn(cell):
    _takes_every_layer(cell, training_checks.amp_dtype(DEVICE))
    training_checks.check_amp_tracks_torch_nn(cell, "triton", DEVICE)


@pytest.mark.no_nan_fill
@pytest.mark.parametrize("cell", TRAIN_CELLS)
def test_compiled_training_matches_eager(cell):
    """On a GPU with mode="reduce-overhead": the compiled model's CUDA graphs replay the
    kernels."""
    _takes_every_layer(cell)
    torch._dynamo.reset()
    training_checks.check_compiled_training_matches_eager(cell, "triton", DEVICE)


@pytest.mark.no_nan_fill
@pytest.mark.parametrize("cell", TRAIN_CELLS)
def test_compiled_ddp_training_matches_eager(cell, tmp_path):
    """torch.compile of the DDP-wrapped model: the ops stay opaque nodes between the graph
    pieces dynamo's DDP optimizer cuts at the gradient buckets. After the CUDA-graph test, so
    that on a GPU, where gpu_check's slow-tests step has a fixed time, it takes what is left."""
    _takes_every_layer(cell)
    torch._dynamo.reset()
    training_checks.check_ddp_matches_one_process(cell, "triton", DEVICE, tmp_path, compiled=True)
    torch._dynamo.reset()


def test_a_fallback_under_torch_compile_fullgraph_warns_once_and_compiles(monkeypatch):
    """dynamo cannot trace warnings.warn: the fallback's warning failed every fullgraph
    compile of a configuration the kernels refuse (fp64 here). It is given while tracing."""
    from fused_rnn import backends

    monkeypatch.setattr(backends, "_warned", set())
    m = fused_rnn.GRU(2, 3, backend="triton").double().to(DEVICE)
    ref = fused_rnn.GRU(2, 3, backend="reference").double().to(DEVICE)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 2, 2, dtype=torch.float64, device=DEVICE)
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="float64.*falling back to 'reference'"):
        y = torch.compile(m, fullgraph=True, backend="eager")(x)[0]
    torch.testing.assert_close(y, ref(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell,case,proj,packed", non_finite_params())
def test_non_finite_values_go_where_torch_nn_puts_them(cell, case, proj, packed, path,
                                                       monkeypatch):
    """One inf in h0 used to turn a whole batch row NaN from the next step on (the persistent
    kernel: H < 16 pads the tile, inf * 0 = NaN in the padded lanes, then NaN * 0 in every
    unit); relu(NaN) was 0 on a GPU (tl.maximum) and its gradient 0 (torch passes it); a
    packed row's inf state put 0 * inf = NaN into dW_hh through its padding steps."""
    if path == "step":  # what the modules choose for layers too big to hold on chip
        monkeypatch.setattr(launch, "PERSISTENT_MAX_W_ELEMS", 0)
    check_non_finite_like_torch_nn(cell, "triton", DEVICE, case, proj, packed)


@pytest.mark.parametrize("mode", ["LSTM", "LSTM-proj", "GRU"])
def test_functional_layers_never_read_x_past_the_lengths(mode):
    """inf or NaN in x's padding reached dW_ih as 0 * NaN through the time-parallel GEMM."""
    check_padding_is_ignored("triton", DEVICE, mode.split("-")[0], proj=mode.endswith("proj"))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_cell_state_reset_in_place_trains_like_torch_nn(cell):
    """h' reset in place between two steps (h[done] = 0, as RL and document-boundary loops
    do): the cell op saved h' for a backward that never reads it, so autograd refused
    ("modified by an inplace operation") where torch.nn's LSTM and GRU cells give the
    gradients. (torch.nn's RNNCell refuses: its tanh and relu save their result.)"""
    from helpers import make_pair

    ref, ours = make_pair(cell, 3, 4, backend="triton", step=True)
    ref, ours = ref.to(DEVICE), ours.to(DEVICE)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, generator=g).to(DEVICE) for _ in range(2)]
    coef = torch.randn(2, 4, generator=g).to(DEVICE)

    def run(m):
        state = m(xs[0])
        h = state[0] if cell == "lstm" else state
        loss = (h * coef).sum()  # saves coef, not h: only the cell op could object
        h[0] = 0  # in place, on the op's own output
        state = m(xs[1], (h, state[1]) if cell == "lstm" else h)
        loss = loss + (state[0] if cell == "lstm" else state).sum()
        return torch.autograd.grad(loss, list(m.parameters()))

    for a, e in zip(run(ours), run(ref), strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_relu_cell_passes_a_nan_like_torch_nn():
    """The single-step kernel's relu (RNNCell): relu(NaN) is NaN and its gradient passes
    through, as in torch."""
    torch.manual_seed(0)
    ref = torch.nn.RNNCell(3, 4, nonlinearity="relu").to(DEVICE)
    ours = fused_rnn.RNNCell(3, 4, nonlinearity="relu", backend="triton").to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    got, want = [], []
    for module, out in ((ref, want), (ours, got)):
        x = torch.tensor([[float("nan"), 0.5, -0.5], [0.1, 0.2, 0.3]], device=DEVICE,
                         requires_grad=True)
        h = torch.zeros(2, 4, device=DEVICE, requires_grad=True)
        y = module(x, h)
        y.sum().backward()
        out += [y.detach(), x.grad, h.grad, *[p.grad for p in module.parameters()]]
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5, equal_nan=True)


def test_jit_trace_records_an_op_that_can_train():
    """torch.jit.trace records the op's save flag as a constant. Traced without gradients (or
    in check_trace's second run) it used to bake in "no saved gates", so the trace differed
    between runs and the traced module could not be trained."""
    f = fused_rnn.GRU(3, 4, backend="triton").to(DEVICE)
    x = torch.randn(3, 2, 3, device=DEVICE)
    with torch.no_grad():
        traced = torch.jit.trace(f, (x,))  # check_trace on: both runs must record one graph
    y, _ = traced(x)
    y.square().sum().backward()
    want = [p.grad.clone() for p in f.parameters()]
    f.zero_grad()
    f(x)[0].square().sum().backward()
    for a, b in zip(want, [p.grad for p in f.parameters()]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------- found by mutation testing
def test_unsupported_reasons_for_projection_kind_and_int32_offsets():
    """A projection on a non-LSTM mode, an unknown kind, and a W_hh whose offsets would pass
    int32 (G*H*max(H, P) >= 2**31) are refused with a reason; the input size does not count
    (W_ih only meets torch's GEMM)."""
    def reason(kind="layer", mode="LSTM", I=4, H=8, P=0):
        return tr.unsupported_reason(kind, mode=mode, device=torch.device(DEVICE),
                                     dtype=torch.float32, input_size=I, hidden_size=H,
                                     proj_size=P, has_lengths=False)

    assert reason(P=4) is None
    for mode in ("GRU", "RNN_TANH", "RNN_RELU"):
        assert "proj_size" in reason(mode=mode, P=4)
    assert "unknown kind" in reason(kind="stack")
    # a projection wider than the cells: 4 * 2**14 * 2**15 == 2**31 exactly is refused, one
    # less projected unit is not; the same input size is no concern
    assert "int32" in reason(P=2**15, H=2**14)
    assert reason(P=2**15 - 1, H=2**14) is None
    assert reason(I=2**15, H=2**14) is None
    # the recurrent side alone: 4 * 23171**2 >= 2**31 > 4 * 23170**2
    assert "int32" in reason(I=1, H=23171)
    assert reason(I=1, H=23170) is None


def test_path_choice_counts_the_projection_and_its_padding():
    """The persistent budget holds W_hr too, and a projection narrower than 32 is padded to 32
    (BLOCK_P): LSTM H=64 with P=64 no longer fits (20480 > 16384 elements), nor H=128 with
    P=16 (padded: 20480); H=64 with P=32 does (10240)."""
    assert launch._persistent_block_p(8, True) == 32
    assert launch._persistent_block_p(8, False) == 16
    assert launch.choose_path("LSTM", 64, 32) == "persistent"
    assert launch.choose_path("LSTM", 64, 64) == "step"
    assert launch.choose_path("LSTM", 128, 16) == "step"


def test_backward_op_returns_each_gradient_in_its_inputs_dtype():
    """Called directly (as a compiled graph does, with no autograd engine to cast), the
    backward op returns every gradient in its input's dtype, bf16 here, not the kernels' fp32."""
    args = list(_layer_args("LSTM", proj=3, grad=False))
    for i in range(1, 9):
        args[i] = args[i].to(torch.bfloat16)
    mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens, reverse, _, path = args
    y, h_n, c_n, gates, state = ops.triton_layer(*args)
    grads = ops.triton_layer_backward(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lens,
                                      reverse, y, gates, state, torch.ones_like(y),
                                      torch.ones_like(h_n), torch.ones_like(c_n), path)
    for g, t in zip(grads, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), strict=True):
        assert g.dtype == torch.bfloat16 and g.shape == t.shape
        assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("only", ["b_ih", "b_hh", "c0", "w_hr"])
def test_one_trainable_input_is_enough_to_save_for_backward(only):
    """rnn_layer and rnn_cell save the gates when any one input needs a gradient, a bias (or
    c0, or W_hr) alone included, and then give that input the reference's gradient."""
    inputs = make_inputs("LSTM", 2, 3, 4, 5, proj=3 if only == "w_hr" else 0, seed=13)
    dev = {k: None if v is None else v.to(DEVICE) for k, v in inputs.items()}
    leaf = dev[only].requires_grad_()
    cell = {"x": dev["x"][0], "h": dev["h0"], "c": dev["c0"], "w_ih": dev["w_ih"],
            "w_hh": dev["w_hh"], "b_ih": dev["b_ih"], "b_hh": dev["b_hh"]}
    grads = []
    for impl in (tr, reference):
        losses = [impl.rnn_layer("LSTM", **dev)[0].square().sum()]
        if only != "w_hr":
            losses.append(sum(t.square().sum() for t in impl.rnn_cell("LSTM", **cell)))
        grads.append([torch.autograd.grad(loss, leaf)[0] for loss in losses])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("path,other", [("auto", "_step"), ("persistent", "_step"),
                                        ("step", "_persistent")])
def test_forward_and_backward_run_only_their_paths_kernels(monkeypatch, path, other):
    """A layer that fits on chip (LSTM H=8) runs the persistent kernels both ways under "auto"
    and "persistent", and "step" runs only the per-step kernels: none of the other path's
    kernels is launched, in the forward or in the backward."""
    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError(f"{path!r} launched a {other} kernel")

    interpreting = launch.interpreting()  # it asks the kernel objects replaced below
    monkeypatch.setattr(launch, "interpreting", lambda: interpreting)
    for kernel in ("fwd", "bwd"):
        monkeypatch.setattr(launch.kernels, f"{other}_{kernel}_kernel", Forbidden())
    inputs = make_inputs("LSTM", 2, 3, 4, 8, seed=14)
    ours, _ = layer_fns("LSTM", path=path)
    outputs_and_grads(ours, inputs, torch.float32, layer_cotangents("LSTM", 2, 3, 8, 8))
