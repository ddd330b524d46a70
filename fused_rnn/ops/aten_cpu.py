"""aten's oneDNN LSTM layer on the CPU as registered ops, for the ``torch`` backend under
``torch.compile``.

In eager mode the ``torch`` backend hands the whole stack to ``torch._VF.lstm``, which on the
CPU runs each layer and direction through ``aten::mkldnn_rnn_layer`` (oneDNN) and its
backward. ``torch.compile`` cannot keep that: PyTorch's decomposition unrolls a layer whose
input requires grad into per-step ops, and inductor fails on the ``mkldnn_rnn_layer`` the other
layers keep when their weights require grad (even at static shapes in fp32), and with dynamic
shapes, autocast or dropout (torch 2.13). Unrolled per-step math is slow here: the traced
reference took 1.78x eager's time (fwd+bwd, 2 layers at 32x64x256 on 2 cores), these ops 1.05x
(``benchmarks/results/2026-11-28-cpu-compile.md``). Wrapped as
custom ops, the same two aten kernels stay one opaque node each in the compiled graph, with
the sequence length symbolic:

======================================== =======================================================
``fused_rnn::aten_lstm_layer``            one layer, one direction: (y, h_n, c_n, workspace;
                                         the workspace only when training)
``fused_rnn::aten_lstm_layer_backward``   its gradients, from the forward's workspace
======================================== =======================================================

The results are eager ``nn.LSTM``'s on the CPU, bit for bit (same kernels, same arguments).
Used for LSTM layers without projection or lengths, in fp32 or bf16, where PyTorch has oneDNN
enabled; :func:`unsupported_reason` says why not otherwise, and the caller then uses the
reference math (which inductor compiles well for GRU and RNN layers).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_rnn.ops.common import (
    check_rnn_args,
    check_saved_args,
    needs_grad,
    refuse_double_backward,
    register_autocast,
    register_autocast_off,
)

_MODE_LSTM = 2  # oneDNN's (ideep's) rnn_kind for LSTM, as aten passes it


@torch.compiler.assume_constant_result
def _onednn_enabled() -> bool:
    return torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()


@torch.compiler.assume_constant_result
def _onednn_bf16() -> bool:
    """Whether oneDNN computes bf16 on this CPU: aten's own test (``mkldnn_bf16_device_check``)
    of whether nn.LSTM hands it bf16. Without (an x86 CPU with neither AVX-512 nor AVX2-VNNI-2,
    such as AMD's Zen 3), eager nn.LSTM runs bf16 through its native per-step math (which the
    reference matches to bf16 rounding), and oneDNN's bf16 LSTM fails to create its
    primitive."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def unsupported_reason(mode: str, x: Tensor, w_hr: Tensor | None,
                       lengths: Tensor | None, h0: Tensor | None = None,
                       c0: Tensor | None = None, w_ih: Tensor | None = None,
                       w_hh: Tensor | None = None, b_ih: Tensor | None = None,
                       b_hh: Tensor | None = None) -> str | None:
    """Why these ops cannot run a layer (None when they can). The layer's other tensors, where
    given, are checked too: oneDNN's kernel takes one dtype for all of them, both biases or
    neither, and no size of 0 (it divides by the batch: SIGFPE), where the reference math
    takes all of these (compiled, a layer the ops did take would differ from eager)."""
    if mode != "LSTM":
        return f"{mode} is not an LSTM"
    if x.device.type != "cpu":
        return f"the input is on {x.device.type}, not the CPU"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN's LSTM takes fp32 and bf16, not {x.dtype}"
    if w_hr is not None:
        return "oneDNN's LSTM has no projection (proj_size)"
    if lengths is not None:
        return "packed sequences (lengths) are not supported"
    others = {"h0": h0, "c0": c0, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
    mixed = [f"{name} {t.dtype}" for name, t in others.items()
             if t is not None and t.dtype != x.dtype]
    if mixed:
        return f"oneDNN's LSTM takes one dtype: x is {x.dtype}, {', '.join(mixed)}"
    if (b_ih is None) != (b_hh is None) and (w_ih is not None or w_hh is not None):
        return "oneDNN's LSTM takes both biases or neither"
    if x.numel() == 0 or (w_hh is not None and w_hh.numel() == 0):
        return "a size of 0 (steps, batch, input or hidden): oneDNN's LSTM cannot take it"
    if not _onednn_enabled():
        return "PyTorch's oneDNN (mkldnn) backend is unavailable or disabled"
    if x.dtype == torch.bfloat16 and not _onednn_bf16():
        return ("oneDNN has no bf16 on this CPU (eager nn.LSTM runs its native bf16 math "
                "here; the reference runs instead, within bf16 rounding of it)")
    if not _workspace_fits_graph() and needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        return ("torch < 2.10 under torch.compile: the training kernel's workspace has a "
                "data-dependent size, which such a torch's fullgraph=True refuses unless "
                "torch._dynamo.config.capture_dynamic_output_shape_ops is True")
    return None


# From torch 2.10, fullgraph=True lets a graph hold an op whose output size depends on the
# data (the training workspace's); before, only capture_dynamic_output_shape_ops=True does,
# and fullgraph=True without it fails at the op. So there a compiled layer that trains runs
# the reference math instead, unless that setting is on.
_FULLGRAPH_HOLDS_DYNAMIC_SIZES = torch.torch_version.TorchVersion(torch.__version__) >= (2, 10)


def _workspace_fits_graph() -> bool:
    """Whether the training kernel's workspace (data-dependent size) may be made here: in
    eager mode, or compiled on torch >= 2.10 or with capture_dynamic_output_shape_ops."""
    return (_FULLGRAPH_HOLDS_DYNAMIC_SIZES or not torch.compiler.is_compiling()
            or torch._dynamo.config.capture_dynamic_output_shape_ops)


def _checked(where: str, x, h0, c0, w_ih, w_hh, b_ih, b_hh) -> None:
    """What the kernel needs of a direct call of the ops (fused_rnn.functional checks the
    same before it chooses them): the layer's shapes, one dtype, both biases or neither, no
    size of 0. oneDNN itself checks none of it: a bias too short was read past its end, and an
    h0 of another batch corrupted the heap."""
    check_rnn_args("LSTM", x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    why = unsupported_reason("LSTM", x, None, None, h0, c0, w_ih, w_hh, b_ih, b_hh)
    if why is not None:
        raise RuntimeError(f"fused_rnn::{where}: {why}")


def _biases(w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    if b_ih is None:  # has_biases=False: the kernel ignores them, but takes tensors
        z = w_ih.new_zeros(w_ih.shape[0])
        return z, z
    return b_ih, b_hh


@torch.library.custom_op("fused_rnn::aten_lstm_layer", mutates_args=(), device_types="cpu")
def aten_lstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    reverse: bool,
    train: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y (T, B, H), h_n (B, H), c_n (B, H), workspace (uint8, kernel-defined size; empty
    unless ``train``, which the backward needs))."""
    _checked("aten_lstm_layer", x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    bi, bh = _biases(w_ih, b_ih, b_hh)
    # The kernel writes the workspace its backward needs only with grad mode on; a custom op
    # runs below autograd with it off, and nothing here requires grad, so no graph is built.
    with torch.set_grad_enabled(train):
        y, h, c, ws = torch.ops.aten.mkldnn_rnn_layer.default(
            x.contiguous(), w_ih, w_hh, bi, bh, h0.contiguous(), c0.contiguous(), reverse, [],
            _MODE_LSTM, w_hh.shape[1], 1, b_ih is not None, False, False, train,
        )
    if ws is None:  # inference: no workspace (a custom op returns tensors only)
        ws = x.new_empty((0,), dtype=torch.uint8)
    return y.contiguous(), h.contiguous(), c.contiguous(), ws


@aten_lstm_layer.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train):
    # oneDNN decides the workspace's size
    n = torch.library.get_ctx().new_dynamic_size() if train else 0
    return (
        x.new_empty((x.shape[0], x.shape[1], w_hh.shape[1])),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        x.new_empty((n,), dtype=torch.uint8),
    )


@torch.library.custom_op(
    "fused_rnn::aten_lstm_layer_backward", mutates_args=(), device_types="cpu"
)
def aten_lstm_layer_backward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    reverse: bool,
    y: Tensor,
    h_n: Tensor,
    c_n: Tensor,
    workspace: Tensor,
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh), each in its input's dtype; the bias
    gradients are empty without biases. The workspace must be the forward's: its size is
    oneDNN's own, so only its kind is checked."""
    _checked("aten_lstm_layer_backward", x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    check_saved_args("fused_rnn::aten_lstm_layer_backward", x, {
        "y": (y, (T, B, H), x.dtype), "h_n": (h_n, (B, H), x.dtype),
        "c_n": (c_n, (B, H), x.dtype), "dy": (dy, (T, B, H), x.dtype),
        "dh_n": (dh_n, (B, H), x.dtype), "dc_n": (dc_n, (B, H), x.dtype)})
    if workspace.dtype != torch.uint8 or workspace.dim() != 1 or workspace.numel() == 0:
        raise RuntimeError("fused_rnn::aten_lstm_layer_backward: workspace must be the "
                           "forward's (uint8, 1-D, from a call with train=True)")
    bi, bh = _biases(w_ih, b_ih, b_hh)
    dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0 = torch.ops.aten.mkldnn_rnn_layer_backward.default(
        x.contiguous(), w_ih, w_hh, bi, bh, h0.contiguous(), c0.contiguous(), y, h_n, c_n,
        dy, dh_n, dc_n, reverse, _MODE_LSTM, w_hh.shape[1], 1, b_ih is not None, True, False,
        [], False, workspace,
    )
    # The kernel returns fp32 gradients for bf16 inputs (as aten's autograd formula casts).
    if b_ih is None:
        db_ih, db_hh = x.new_empty((0,)), x.new_empty((0,))
    else:
        db_ih, db_hh = db_ih.to(b_ih.dtype), db_hh.to(b_hh.dtype)
    grads = (dx.to(x.dtype), dh0.to(h0.dtype), dc0.to(c0.dtype), dw_ih.to(w_ih.dtype),
             dw_hh.to(w_hh.dtype), db_ih, db_hh)
    return tuple(g.contiguous() for g in grads)


@aten_lstm_layer_backward.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, y, h_n, c_n, workspace, dy, dh_n, dc_n):
    def grad(t):  # contiguous, like the kernel's, whatever the input's strides
        return x.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return tuple(grad(t) for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh))


def _setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train = inputs
    y, h_n, c_n, workspace = output
    ctx.mark_non_differentiable(workspace)
    ctx.reverse, ctx.has_bias, ctx.train = reverse, b_ih is not None, train
    biases = (b_ih, b_hh) if ctx.has_bias else ()
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, *biases, y, h_n, c_n, workspace)


def _backward(ctx, dy, dh_n, dc_n, _dworkspace):
    if not ctx.train:
        raise RuntimeError(
            "fused_rnn::aten_lstm_layer was called with train=False (inference) and cannot be "
            "differentiated; call fused_rnn.ops.aten_cpu.rnn_layer, which sets it when needed"
        )
    saved = list(ctx.saved_tensors)
    x, h0, c0, w_ih, w_hh = saved[:5]
    b_ih, b_hh = saved[5:7] if ctx.has_bias else (None, None)
    y, h_n, c_n, workspace = saved[-4:]
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(h_n) if dh_n is None else dh_n
    dc_n = torch.zeros_like(c_n) if dc_n is None else dc_n
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = aten_lstm_layer_backward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, ctx.reverse, y, h_n, c_n, workspace, dy, dh_n, dc_n
    )
    if not ctx.has_bias:
        db_ih = db_hh = None
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None


aten_lstm_layer.register_autograd(_backward, setup_context=_setup)
refuse_double_backward(aten_lstm_layer_backward, "torch")
# As the kernel backends' ops: under autocast the inputs are cast to its dtype and the kernel
# runs with autocast off (torch's CPU autocast would otherwise cast inside, at oneDNN's op, and
# return that dtype where the fake kernel says x's), and the backward runs as it is.
register_autocast(aten_lstm_layer, "cpu")
register_autocast_off(aten_lstm_layer_backward, "cpu")


def rnn_layer(mode, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None,
              reverse=False):
    """:func:`fused_rnn.ops.reference.rnn_layer`'s signature; only where
    :func:`unsupported_reason` is None.

    The kernel runs as training (it keeps the workspace the backward needs) wherever grad mode
    is on, whether or not anything requires grad: eager nn.LSTM's rule. oneDNN's inference and
    training kernels need not give the same bits (on an AVX2 CPU fp32 outputs part by an ulp),
    so another rule would leave eager's bits there. (Compiled before torch 2.10, where the
    workspace cannot be held and nothing needs it, the inference kernel runs, as it did.)"""
    train = torch.is_grad_enabled() and (
        _workspace_fits_graph() or needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh))
    y, h_n, c_n, _ = aten_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train)
    return y, h_n, c_n
