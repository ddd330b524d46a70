"""The Triton backend's registered ops: ``torch.library`` custom ops with fake (meta) kernels,
autograd formulas and autocast rules, so ``torch.compile(fullgraph=True)`` and
``torch.export`` see one opaque node per layer/direction and ``torch.library.opcheck`` passes.

==================================== =========================================================
``fused_rnn::triton_layer``           one layer, one direction, a whole chunk (forward)
``fused_rnn::triton_layer_backward``  its gradients (called by the autograd formula)
``fused_rnn::triton_cell``            one fused step (the *Cell modules, generation)
``fused_rnn::triton_cell_backward``   its gradients
==================================== =========================================================

Absent optional inputs are ``Tensor?`` (None); absent outputs (c_n of a GRU, gradients of
absent inputs, saved tensors of an inference call) are empty tensors, because custom ops
cannot return None. :mod:`fused_rnn.ops.triton` turns them back into None.

The forward ops return the tensors backward needs (``gates``, ``state``) as extra outputs
marked non-differentiable: a custom op's autograd can only save its inputs and outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_rnn.ops.common import (
    check_rnn_args,
    check_saved_args,
    grad_like,
    refuse_double_backward,
    refuse_unsaved,
    register_autocast,
    register_autocast_off,
)
from fused_rnn.ops.reference import GATES
from fused_rnn.ops.triton import _SUPPORTED_DTYPES, offsets_reason

_OPT = (Tensor, type(None))


def _check_kernel_args(op: str, mode: str, x: Tensor, w_hh: Tensor,
                       w_hr: Tensor | None) -> None:
    """What the kernels take beyond check_rnn_args, which the modules and
    fused_rnn.functional check first (they fall back instead): x's dtype, and weights that
    int32 offsets reach."""
    # The kernels compute in fp32 with storage in x's dtype: an fp64 call would come back fp64
    # computed in fp32.
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fused_rnn::{op} takes float32, float16 and bfloat16 inputs, not "
                        f"{x.dtype} (the modules and fused_rnn.functional run other dtypes on "
                        f"the reference)")
    H = w_hh.shape[0] // GATES[mode]
    reason = offsets_reason(mode, H, 0 if w_hr is None else w_hh.shape[1])
    if reason is not None:
        raise RuntimeError(f"fused_rnn::{op}: {reason}")


def _launch(device: torch.device):
    """The launchers, imported at the first call: this module is imported with ``fused_rnn``
    (so that a saved program calling these ops loads in a fresh process) on machines without
    triton too, and ``@triton.jit`` reads TRITON_INTERPRET when the kernels are defined. A
    call the kernels cannot run raises the backend's "unavailable" error."""
    from fused_rnn.ops import triton as backend

    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"fused_rnn backend 'triton' is unavailable: {reason}")
    from fused_rnn.ops.triton import launch

    return launch


# --------------------------------------------------------------------------- layer
@torch.library.custom_op("fused_rnn::triton_layer", mutates_args=())
def triton_layer(
    mode: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    save: bool,
    path: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y (T,B,P), h_n (B,P), c_n (B,H) or empty, gates (T,B,G*H) fp32, state (T,B,H) fp32)."""
    check_rnn_args(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    _check_kernel_args("triton_layer", mode, x, w_hh, w_hr)
    return _launch(x.device).layer_forward(
        mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, path
    )


def _saved_shapes(mode: str, T: int, B: int, H: int, save: bool):
    G = GATES[mode]
    gates = (T, B, G * H) if save else (0,)
    state = (T, B, H) if save and mode in ("LSTM", "GRU") else (0,)
    return gates, state


@triton_layer.register_fake
def _(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, path):
    check_rnn_args(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    _check_kernel_args("triton_layer", mode, x, w_hh, w_hr)
    T, B, _ = x.shape
    H = w_hh.shape[0] // GATES[mode]
    P = w_hh.shape[1]
    g_shape, s_shape = _saved_shapes(mode, T, B, H, save)
    return (
        x.new_empty((T, B, P)),
        x.new_empty((B, P)),
        x.new_empty((B, H) if mode == "LSTM" else (0,)),
        x.new_empty(g_shape, dtype=torch.float32),
        x.new_empty(s_shape, dtype=torch.float32),
    )


def _layer_setup(ctx, inputs, output):
    mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save, path = inputs
    y, _, _, gates, state = output
    ctx.mark_non_differentiable(gates, state)
    ctx.mode, ctx.reverse, ctx.save, ctx.path = mode, reverse, save, path
    ctx.present = tuple(t is not None for t in (c0, b_ih, b_hh, w_hr, lengths))
    ctx.save_for_backward(
        *(t for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths) if t is not None),
        y, gates, state,
    )


def _unpack(ctx, n_fixed: int):
    """Saved tensors back into (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths), None kept."""
    saved = list(ctx.saved_tensors)
    rest = saved[len(saved) - n_fixed:]
    it = iter(saved[: len(saved) - n_fixed])
    c0_p, bih_p, bhh_p, whr_p, len_p = ctx.present
    x, h0 = next(it), next(it)
    c0 = next(it) if c0_p else None
    w_ih, w_hh = next(it), next(it)
    b_ih = next(it) if bih_p else None
    b_hh = next(it) if bhh_p else None
    w_hr = next(it) if whr_p else None
    lengths = next(it) if len_p else None
    return (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths), rest


def _none_if_absent(grads, present):
    return tuple(g if p else None for g, p in zip(grads, present))


def _layer_backward(ctx, dy, dh_n, dc_n, _dgates, _dstate):
    if not ctx.save:
        refuse_unsaved("triton_layer")
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths), (y, gates, state) = _unpack(ctx, 3)
    if dc_n is None or mode_has_no_c(ctx.mode):
        dc_n = None
    grads = torch.ops.fused_rnn.triton_layer_backward(
        ctx.mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, ctx.reverse,
        y, gates, state, dy, dh_n, dc_n, ctx.path,
    )
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = grads
    c0_p, bih_p, bhh_p, whr_p, _ = ctx.present
    dc0, db_ih, db_hh, dw_hr = _none_if_absent((dc0, db_ih, db_hh, dw_hr), (c0_p, bih_p, bhh_p, whr_p))
    # One gradient per forward input: mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
    # lengths, reverse, save, path.
    return None, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, None, None, None, None


def mode_has_no_c(mode: str) -> bool:
    return mode != "LSTM"


triton_layer.register_autograd(_layer_backward, setup_context=_layer_setup)


@torch.library.custom_op("fused_rnn::triton_layer_backward", mutates_args=())
def triton_layer_backward(
    mode: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    y: Tensor,
    gates: Tensor,
    state: Tensor,
    dy: Tensor | None,
    dh_n: Tensor | None,
    dc_n: Tensor | None,
    path: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr); empty where the input is absent."""
    check_rnn_args(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    _check_kernel_args("triton_layer_backward", mode, x, w_hh, w_hr)
    T, B, _ = x.shape
    H = w_hh.shape[0] // GATES[mode]
    P = H if w_hr is None else w_hh.shape[1]
    f32 = torch.float32
    if isinstance(gates, Tensor) and gates.numel() == 0 and T * B * H:
        raise RuntimeError("fused_rnn::triton_layer_backward: the forward did not save its "
                           "gates (triton_layer with save=True)")
    check_saved_args("fused_rnn::triton_layer_backward", x, {
        "y": (y, (T, B, P), None), "gates": (gates, (T, B, GATES[mode] * H), f32),
        # the forward saves a state for LSTM and GRU only (an RNN's is empty)
        "state": (state, (T, B, H) if mode in ("LSTM", "GRU") else (0,), f32),
        "dy": (dy, (T, B, P), None),
        "dh_n": (dh_n, (B, P), None),
        # only an LSTM reads dc_n, which may come empty (no gradient)
        "dc_n": (dc_n if mode == "LSTM" and dc_n is not None and dc_n.numel() else None,
                 (B, H), None)})
    return _launch(x.device).layer_backward(
        mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
        y, gates, state, dy, dh_n, dc_n, path,
    )


@triton_layer_backward.register_fake
def _(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, y, gates, state,
      dy, dh_n, dc_n, path):
    return (
        grad_like(x, x),
        grad_like(h0, x),
        grad_like(c0 if mode == "LSTM" else None, x),
        grad_like(w_ih, x),
        grad_like(w_hh, x),
        grad_like(b_ih, x),
        grad_like(b_hh, x),
        grad_like(w_hr, x),
    )


# --------------------------------------------------------------------------- cell
@torch.library.custom_op("fused_rnn::triton_cell", mutates_args=())
def triton_cell(
    mode: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h' (B,H), c' (B,H) or empty, gates (1,B,G*H) fp32, state (1,B,H) fp32): one fused step."""
    check_rnn_args(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, step=True)
    _check_kernel_args("triton_cell", mode, x, w_hh, None)
    _, h1, c1, gates, state = _launch(x.device).layer_forward(
        mode, x[None], h, c, w_ih, w_hh, b_ih, b_hh, None, None, False, save, "step"
    )
    return h1, c1, gates, state


@triton_cell.register_fake
def _(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, save):
    check_rnn_args(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, step=True)
    _check_kernel_args("triton_cell", mode, x, w_hh, None)
    B = x.shape[0]
    H = w_hh.shape[0] // GATES[mode]
    g_shape, s_shape = _saved_shapes(mode, 1, B, H, save)
    return (
        x.new_empty((B, H)),
        x.new_empty((B, H) if mode == "LSTM" else (0,)),
        x.new_empty(g_shape, dtype=torch.float32),
        x.new_empty(s_shape, dtype=torch.float32),
    )


def _cell_setup(ctx, inputs, output):
    mode, x, h, c, w_ih, w_hh, b_ih, b_hh, save = inputs
    _, _, gates, state = output
    ctx.mark_non_differentiable(gates, state)
    ctx.mode, ctx.save = mode, save
    ctx.present = (c is not None, b_ih is not None, b_hh is not None, False, False)
    # h' is not saved: a one-step backward reads y only for the h_{t-1} of steps after the
    # first (common.previous_hidden), and there are none. Saving it made an in-place change
    # of h' (a state reset, h[done] = 0) an error that torch.nn's cells do not raise.
    ctx.save_for_backward(
        *(t for t in (x, h, c, w_ih, w_hh, b_ih, b_hh) if t is not None), gates, state
    )


def _cell_backward(ctx, dh1, dc1, _dgates, _dstate):
    if not ctx.save:
        refuse_unsaved("triton_cell")
    (x, h, c, w_ih, w_hh, b_ih, b_hh, _, _), (gates, state) = _unpack(ctx, 2)
    if mode_has_no_c(ctx.mode):
        dc1 = None
    # h stands in for h' (above): the same shape and dtype, and never read.
    dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh = torch.ops.fused_rnn.triton_cell_backward(
        ctx.mode, x, h, c, w_ih, w_hh, b_ih, b_hh, h, gates, state, dh1, dc1
    )
    c_p, bih_p, bhh_p, _, _ = ctx.present
    dc, db_ih, db_hh = _none_if_absent((dc, db_ih, db_hh), (c_p, bih_p, bhh_p))
    return None, dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, None


triton_cell.register_autograd(_cell_backward, setup_context=_cell_setup)


@torch.library.custom_op("fused_rnn::triton_cell_backward", mutates_args=())
def triton_cell_backward(
    mode: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    h1: Tensor,
    gates: Tensor,
    state: Tensor,
    dh1: Tensor | None,
    dc1: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh); empty where the input is absent."""
    check_rnn_args(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, step=True)
    _check_kernel_args("triton_cell_backward", mode, x, w_hh, None)
    B = x.shape[0]
    H = w_hh.shape[0] // GATES[mode]
    f32 = torch.float32
    if isinstance(gates, Tensor) and gates.numel() == 0 and B * H:
        raise RuntimeError("fused_rnn::triton_cell_backward: the forward did not save its "
                           "gates (triton_cell with save=True)")
    check_saved_args("fused_rnn::triton_cell_backward", x, {
        "h1": (h1, (B, H), None), "gates": (gates, (1, B, GATES[mode] * H), f32),
        "state": (state, (1, B, H) if mode in ("LSTM", "GRU") else (0,), f32),
        "dh1": (dh1, (B, H), None),
        "dc1": (dc1 if mode == "LSTM" and dc1 is not None and dc1.numel() else None,
                (B, H), None)})
    dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, _ = _launch(x.device).layer_backward(
        mode, x[None], h, c, w_ih, w_hh, b_ih, b_hh, None, None, False,
        h1[None], gates, state, None, dh1, dc1, "step",
    )
    return dx[0], dh, dc, dw_ih, dw_hh, db_ih, db_hh


@triton_cell_backward.register_fake
def _(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, h1, gates, state, dh1, dc1):
    return (
        grad_like(x, x),
        grad_like(h, x),
        grad_like(c if mode == "LSTM" else None, x),
        grad_like(w_ih, x),
        grad_like(w_hh, x),
        grad_like(b_ih, x),
        grad_like(b_hh, x),
    )


for _op in (triton_layer_backward, triton_cell_backward):
    refuse_double_backward(_op, "triton")

# --------------------------------------------------------------------------- autocast
for _op in (triton_layer, triton_cell):
    for _dev in ("cuda", "cpu"):
        register_autocast(_op, _dev)
for _op in (triton_layer_backward, triton_cell_backward):
    for _dev in ("cuda", "cpu"):
        register_autocast_off(_op, _dev)
