"""Functional RNN ops: one layer and direction over a chunk, one step, and the layer stack.

Tensors are time-major here: ``x: (T, B, input_size)``. The modules in ``fused_rnn.modules``
turn batch-first, unbatched and packed inputs into this form.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_rnn import backends
from fused_rnn.ops import aten_cpu
from fused_rnn.ops.common import autocast_available as _autocast_available
from fused_rnn.ops.common import autocast_eligible, check_rnn_args
from fused_rnn.ops.common import autocast_off as _autocast_off
from fused_rnn.ops.reference import GATES, MODES


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


_ANY_AUTOCAST_COVERS = frozenset({"cpu", "cuda"})


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    # The usual answer the quick way, where that call covers the device type: it does not
    # read MPS's (or MAIA's) autocast state (torch 2.13).
    if device.type in _ANY_AUTOCAST_COVERS and not torch._C._is_any_autocast_enabled():
        return None
    if _autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the cells compute in for data of ``dtype`` on ``device``: the autocast
    region's where it casts ``dtype``, else ``dtype``."""
    ac = _autocast_dtype(device)
    eligible = dtype.is_floating_point and dtype != torch.float64
    return ac if ac is not None and eligible else dtype


def _to(dtype: torch.dtype, *ts: Tensor | None):
    """Autocast's cast: eligible tensors (not fp64, not complex) to ``dtype``."""
    return tuple(t.to(dtype) if autocast_eligible(t) else t for t in ts)


def _in_dtype_of(x: Tensor, *ts: Tensor | None):
    """``ts`` in x's dtype, the one the math runs in: a state or weight of another dtype is
    cast first, as the modules' own tensors always are, so that every backend gets the call
    it would get with one dtype and gives its bits (the kernels round a wider h0, c0 or W_hh
    to 16-bit x's dtype anyway, and the reference computed with them unrounded)."""
    return tuple(t.to(x.dtype) if t is not None and t.dtype != x.dtype else t for t in ts)


def _config(mode: str, x: Tensor, w_hh: Tensor, w_hr: Tensor | None, lengths) -> dict:
    return dict(
        mode=mode,
        device=x.device,
        dtype=x.dtype,
        input_size=x.shape[-1],
        hidden_size=w_hh.shape[0] // GATES[mode],
        proj_size=0 if w_hr is None else w_hr.shape[0],
        has_lengths=lengths is not None,
    )


def rnn_layer(
    mode: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
    *,
    lengths: Tensor | None = None,
    reverse: bool = False,
    backend: str = "reference",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer, one direction, over a whole chunk.

    mode: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"; x: (T, B, I); h0: (B, P); c0: (B, H) for
    LSTM else None; w_ih: (G*H, I); w_hh: (G*H, P); b_ih, b_hh: (G*H,) or None; w_hr: (P, H)
    or None; lengths: (B,) or None (rows with ``t >= lengths[b]`` keep their state and output
    zeros; what x holds there is never read, inf and NaN included; a length outside [0, T] is
    read as clamped to it, unchecked, since a check would wait for the device). Returns y: (T, B, P), h_n:
    (B, P), c_n: (B, H) or None, in x's dtype. The math runs in x's dtype: a state or weight of
    another dtype is cast to it first (its gradient returns in its own dtype), so every backend
    computes what it would with one dtype, as in the modules.

    ``backend`` is "reference", "triton" or "cuda", or "auto"/"torch": under ``torch.compile``
    on the CPU, an LSTM layer without projection or lengths, in fp32/bf16, is aten's oneDNN
    kernel as one registered op (:mod:`fused_rnn.ops.aten_cpu`); otherwise these mean the
    reference math at this level, and in :func:`rnn` too. PyTorch's whole-stack kernels
    (aten, cuDNN) are the modules': ``fused_rnn.LSTM(..., backend="torch")``. A kernel
    backend that cannot run here, or cannot take this call, hands it on (cuda to triton to
    reference) with a one-time warning naming the reason; a module raises where its backend
    cannot run on the input's device.

    Examples::

        >>> import torch, fused_rnn.functional as Fr
        >>> x, h0, c0 = torch.randn(5, 3, 4), torch.zeros(3, 8), torch.zeros(3, 8)
        >>> w_ih, w_hh = torch.randn(32, 4), torch.randn(32, 8)
        >>> y, h, c = Fr.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh)
        >>> tuple(y.shape), tuple(h.shape), tuple(c.shape)
        ((5, 3, 8), (3, 8), (3, 8))
    """
    _check_mode(mode)
    backends.check_name(backend)
    check_rnn_args(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    ac = _autocast_dtype(x.device)
    if ac is not None:
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = _to(ac, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = _in_dtype_of(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if lengths is not None:
        x = _zero_past_lengths(x, lengths)
    # aten's op has a backward formula only, as the kernels' ops: inside a torch.func
    # transform it would give zero tangents (jvp, jacfwd) or fail (grad, jacrev).
    if (backend in ("auto", "torch") and backends.torch_runs_per_layer(x.device)
            and aten_cpu.unsupported_reason(mode, x, w_hr, lengths, h0, c0, w_ih, w_hh, b_ih,
                                            b_hh) is None
            and backends._transform_reason() is None):
        impl = aten_cpu
    else:
        name = backend if backend in backends.KERNEL_BACKENDS else "reference"
        impl = backends.kernel_impl(name, "layer", **_config(mode, x, w_hh, w_hr, lengths))
    # With the inputs cast, autocast is off inside: the reference's GEMMs then accumulate and
    # return fp32 as the kernels' ops (autocast off, ops.common.register_autocast) do, rather
    # than gates rounded to the autocast dtype.
    with _autocast_off(x.device) if ac is not None else contextlib.nullcontext():
        return impl.rnn_layer(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)


def rnn_cell(
    mode: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    backend: str = "reference",
) -> tuple[Tensor, Tensor | None]:
    """One step. x: (B, I); h: (B, H); c: (B, H) for LSTM else None. Returns (h', c') in x's
    dtype; as in :func:`rnn_layer`, states and weights of another dtype are cast to it first.

    ``backend`` "torch" is PyTorch's cell kernels (``torch._VF``), as in the cell modules;
    "auto" is those too, but the reference inside ``vmap`` or forward-mode AD, where they fail
    (``backends.resolve_stack``, as the modules decide)."""
    _check_mode(mode)
    backends.check_name(backend)
    check_rnn_args(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, step=True)
    if backend == "auto":
        backend = backends.resolve_stack(backend, x.device)
    return _checked_rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, backend=backend)


def _checked_rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, *, backend, one_dtype=False):
    """:func:`rnn_cell` for a caller that has made all of its checks (the cell modules, in
    their own words): the kernels index every tensor with sizes taken from x and w_hh.
    ``one_dtype``: the caller found every tensor in x's dtype (the cells' quick path)."""
    ac = _autocast_dtype(x.device)
    if ac is not None:
        x, h, c, w_ih, w_hh, b_ih, b_hh = _to(ac, x, h, c, w_ih, w_hh, b_ih, b_hh)
    if not one_dtype:
        # The math runs in x's dtype on every backend, as in rnn_layer (torch._VF's cells
        # would promote a wider c and refuse a wider h).
        h, c, w_ih, w_hh, b_ih, b_hh = _in_dtype_of(x, h, c, w_ih, w_hh, b_ih, b_hh)
    if backend in ("auto", "torch"):
        return _torch_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh)
    impl = backends.kernel_impl(backend, "cell", **_config(mode, x, w_hh, None, None))
    with _autocast_off(x.device) if ac is not None else contextlib.nullcontext():  # as above
        return impl.rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh)


def _zero_past_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """x with the steps past each row's length zeroed. Every backend discards those steps'
    results, but a product with x still reaches the weights' gradient (the kernels' dW_ih =
    dgx^T x, whose dgx there is 0: 0 * NaN = NaN), so an inf or NaN in a caller's padding made
    them NaN. The modules' padding is zeros already (from a PackedSequence)."""
    steps = torch.arange(x.shape[0], device=x.device)[:, None]
    valid = (steps < lengths.to(x.device)[None, :]).unsqueeze(-1)
    return torch.where(valid, x, x.new_zeros(()))


# torch._VF's cells, looked up once (each torch._VF attribute is a module __getattr__ call).
_VF_CELL = {"GRU": torch._VF.gru_cell, "RNN_TANH": torch._VF.rnn_tanh_cell,
            "RNN_RELU": torch._VF.rnn_relu_cell}
_VF_LSTM_CELL = torch._VF.lstm_cell


def _torch_cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
    if mode == "LSTM":
        h1, c1 = _VF_LSTM_CELL(x, (h, c), w_ih, w_hh, b_ih, b_hh)
        return h1, c1
    return _VF_CELL[mode](x, h, w_ih, w_hh, b_ih, b_hh), None


def rnn(
    mode: str,
    x: Tensor,
    hx: Tensor,
    cx: Tensor | None,
    weights: Sequence[Sequence[Tensor | None]],
    *,
    num_layers: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
    lengths: Tensor | None = None,
    backend: str = "reference",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A stack of layers, time-major, through per-layer ops (:func:`rnn_layer`, whose
    ``backend`` this takes: "auto"/"torch" are the reference math here, see there).

    x: (T, B, I); hx: (L*D, B, P); cx: (L*D, B, H) for LSTM else None; ``weights[l*D + d]`` is
    ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` (absent ones None). Dropout is applied to every layer's
    output but the last, in training mode only, as torch.nn does; with ``lengths``, to the
    steps inside the lengths only (see :func:`_dropout`).
    Returns y: (T, B, D*P), h_n: (L*D, B, P), c_n: (L*D, B, H) or None.
    """
    for name, value in (("bidirectional", bidirectional), ("training", training)):
        if not isinstance(value, bool):  # a truthy "False" would count as True
            raise TypeError(f"rnn: {name} must be a bool, got {value!r}")
    try:
        if isinstance(num_layers, bool):
            raise TypeError
        num_layers = operator.index(num_layers)
    except TypeError:
        raise TypeError(f"rnn: num_layers must be an integer, got {num_layers!r}") from None
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"rnn: dropout must be a number, got {dropout!r}")
    num_dir = 2 if bidirectional else 1
    n = num_layers * num_dir
    if num_layers < 1:
        raise ValueError(f"rnn: num_layers must be at least 1, got {num_layers}")
    if not 0 <= dropout <= 1:
        raise ValueError(f"rnn: dropout must be in [0, 1], got {dropout}")
    if len(weights) != n:
        raise ValueError(f"rnn: {num_layers} layers x {num_dir} directions need {n} weight "
                         f"tuples, got {len(weights)}")
    for k, w in enumerate(weights):
        if len(w) != 5:
            raise ValueError(f"rnn: weights[{k}] must be (w_ih, w_hh, b_ih, b_hh, w_hr), absent "
                             f"ones None, got {len(w)} items")
    if not isinstance(hx, Tensor):
        raise TypeError(f"rnn: hx must be a tensor ({n}, B, size), got {type(hx).__name__}")
    for name, t in (("hx", hx), ("cx", cx)):
        if t is not None and (t.dim() != 3 or t.shape[0] != n):
            raise RuntimeError(f"rnn: {name} must be ({n}, B, size), got {tuple(t.shape)}")
    ac = _autocast_dtype(x.device)
    if ac is not None:
        # Cast once for the stack, as torch.nn's kernels are: a layer's two directions then
        # read one cast of their input, whose gradient sums in the autocast dtype before it
        # is widened (cast by each rnn_layer, x's gradient summed the two in fp32).
        x, hx, cx = _to(ac, x, hx, cx)
        weights = [_to(ac, *w) for w in weights]
    layer_input = x
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    for layer in range(num_layers):
        outs = []
        for d in range(num_dir):
            k = layer * num_dir + d
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            y, h, c = rnn_layer(
                mode,
                layer_input,
                hx[k],
                None if cx is None else cx[k],
                w_ih,
                w_hh,
                b_ih,
                b_hh,
                w_hr,
                lengths=lengths,
                reverse=d == 1,
                backend=backend,
            )
            outs.append(y)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        layer_input = outs[0] if num_dir == 1 else torch.cat(outs, dim=2)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = _dropout(layer_input, dropout, lengths)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if c_n else None)


def _dropout(y: Tensor, p: float, lengths: Tensor | None) -> Tensor:
    """Dropout between layers. torch.nn applies it to a packed sequence's data: the steps
    inside each row's length, time-major. Drawing over those elements in that order gives
    nn's masks for the same seed (and leaves the generator where nn leaves it) when the rows
    are sorted by length, longest first, as the modules pass them. The steps past a length
    stay zero. (Boolean indexing: one device sync a layer on a GPU.)

    Under ``torch.compile`` the whole padded output is dropped out instead, with the steps
    past the lengths kept zero: the packed draw's data-dependent size would break the graph,
    and compiled dropout does not draw torch.nn's eager masks anyway."""
    if lengths is not None and torch.compiler.is_compiling():
        steps = torch.arange(y.shape[0], device=y.device)[:, None]
        valid = (steps < lengths.to(y.device)[None, :]).unsqueeze(-1)
        return torch.where(valid, F.dropout(y, p, training=True), y.new_zeros(()))
    if lengths is None:
        return F.dropout(y, p, training=True)
    valid = torch.arange(y.shape[0], device=y.device)[:, None] < lengths.to(y.device)[None, :]
    return y.index_put((valid,), F.dropout(y[valid], p, training=True))
