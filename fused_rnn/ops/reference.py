"""Reference math: plain PyTorch, the oracle every kernel is checked against.

One layer, one direction, a whole chunk (``rnn_layer``) or one step (``rnn_cell``).
Everything here is ordinary differentiable PyTorch, so autograd gives the gradients and
``torch.autograd.gradcheck`` can check them in fp64.

Precision contract (the one every kernel implements):

* fp64 and complex inputs are computed in their own dtype, everything else in fp32
  ("compute dtype");
* the input projection ``x W_ih^T + b_ih`` is one GEMM over all T steps, its result kept in
  the compute dtype;
* the LSTM cell state ``c`` is carried in the compute dtype for the whole chunk;
* the hidden state ``h`` is rounded to the input dtype after every step (it is the step's
  output ``y_t`` and the operand of the next recurrent matmul, as on tensor cores), then
  promoted again for the matmul, so low-precision results only differ from a kernel by
  accumulation order;
* in backward the same holds for the other operand of those matmuls: the gradients of the
  pre-activations (``h W_hh^T + b_hh``, and ``x W_ih^T + b_ih``) are rounded to the input
  dtype before any use -- the gradients of h and x, of the weights and of the biases all
  come from the rounded values, as on 16-bit tensor cores, with fp32 sums (:class:`_Linear16`).
  In fp32 and fp64 that rounding is the identity;
* outputs are cast back to the input dtype.

Variable lengths (packed sequences) are expressed as ``lengths`` (B,): at step t a row with
``t >= lengths[b]`` keeps its state and outputs zeros. In the reverse direction this means the
state stays at h0 until the row's last real step, exactly like packed cuDNN/aten.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_rnn.ops.common import autocast_off, warn_at_caller

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 and complex stays complex (torch.nn computes complex RNNs too); fp32,
    fp16 and bf16 are computed in fp32."""
    if dtype in (torch.float64, torch.complex64, torch.complex128):
        return dtype
    return torch.float32


def cell_update(mode: str, gx: Tensor, gh: Tensor, h: Tensor, c: Tensor | None):
    """The pointwise part of one step.

    gx: (B, G*H) = x W_ih^T + b_ih, gh: (B, G*H) = h W_hh^T + b_hh, both in compute dtype;
    h: (B, H) previous hidden state (compute dtype); c: (B, H) previous cell state (LSTM).
    Returns (h_new, c_new) before any projection; c_new is None except for LSTM.
    The operation order follows aten's CPU cells so that fp32 results agree to rounding.
    """
    if mode == "LSTM":
        i, f, g, o = (gx + gh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
    if mode == "GRU":
        xr, xz, xn = gx.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)  # b_hn sits inside r * (.), as in torch.nn.GRU
        return n + z * (h - n), None
    if mode == "RNN_TANH":
        return torch.tanh(gx + gh), None
    if mode == "RNN_RELU":
        if gx.is_complex():  # as torch.nn: relu has no complex form
            raise NotImplementedError("RNN with nonlinearity='relu' is not defined for complex "
                                      "numbers; use nonlinearity='tanh'")
        return torch.relu(gx + gh), None
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


class _Linear16(torch.autograd.Function):
    """``a W^T + b`` in the compute dtype, differentiated as a 16-bit kernel does it: the incoming
    gradient (a projection's dgates) is the operand of every matmul that uses it -- W for the
    gradient of ``a``, ``a`` for the gradient of W -- so on tensor cores it is rounded to the
    storage dtype first, and the gradients of ``a``, W and b are fp32 sums of the rounded values.
    Where the dgates cancel (a few terms summing to much less than their size) that rounding, not
    the one of the result after the sum, is most of a kernel's error, and the reference has to
    make it for its own error to be the kernel's. ``round_grad`` False: the gradient is used as
    it comes, in fp32 (LSTM's W_hr, which the kernels multiply in fp32).
    The backward runs with autocast off, as the kernels' backward ops do: a ``backward()``
    inside an autocast region must not round its GEMMs to the region's dtype.
    ``vmap`` and forward-mode AD (``jvp``: the linear map's own, no rounding) work on it, as
    the fp32 path's plain ops do: ``auto`` runs the reference inside them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, w: Tensor, b: Tensor | None, storage: torch.dtype,
                round_grad: bool) -> Tensor:
        return F.linear(a, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        a, w, b, storage, round_grad = inputs
        ctx.save_for_backward(a, w)
        ctx.save_for_forward(a, w)
        ctx.storage, ctx.has_bias, ctx.round_grad = storage, b is not None, round_grad

    @staticmethod
    def jvp(ctx, da: Tensor | None, dw: Tensor | None, db: Tensor | None, _storage, _round):
        a, w = ctx.saved_tensors
        out = None
        for term in (None if da is None else F.linear(da, w),
                     None if dw is None else F.linear(a, dw), db):
            if term is not None:
                out = term if out is None else out + term
        return out if out is not None else torch.zeros_like(F.linear(a, w))

    @staticmethod
    def backward(ctx, dg: Tensor):
        a, w = ctx.saved_tensors
        with autocast_off(dg.device):
            if ctx.round_grad:
                dg = dg.to(ctx.storage).to(dg.dtype)
            da = dw = db = None
            if ctx.needs_input_grad[0]:
                da = dg @ w
            rows = dg.flatten(0, -2)  # not reshape(-1, n): ambiguous for a size of 0
            if ctx.needs_input_grad[1]:
                dw = rows.t() @ a.flatten(0, -2)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = rows.sum(0)
        return da, dw, db, None, None


class _StoreH(torch.autograd.Function):
    """h rounded to the storage dtype, as a kernel stores it (y_t, the next step's operand), with
    its gradient passed through in the compute dtype: the kernels add the gradients reaching h_t
    (dy_t, the next step's recurrent share, the carry) in fp32 and hand the sum on unrounded.
    A plain ``h.to(dtype).to(cd)`` would round that sum to the dtype in backward (autograd casts
    a gradient to its tensor's dtype), a rounding no kernel makes; where the gradient then
    cancels (api_fuzz seed 6522: dh through a size-3 projection, then dx, a sum of 40 dgates, to
    1/35 of their size) the two roundings leave the reference and the kernels 15% apart, and
    the bound, twice the reference's error, cannot tell that from a bug."""

    generate_vmap_rule = True  # as _Linear16

    @staticmethod
    def forward(h: Tensor, storage: torch.dtype) -> Tensor:
        return h.to(storage).to(h.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, dh: Tensor):
        return dh, None

    @staticmethod
    def jvp(ctx, dh: Tensor, _storage) -> Tensor:
        return dh  # the backward's rule: passed through in the compute dtype


# The two Functions as torch.compile traces them: without the jvp, which dynamo refuses (a
# graph break, and an error under fullgraph=True, for every 16-bit layer that trains) and which
# forward-mode AD, the only user of it, does not need in a compiled graph (dynamo does not
# trace forward-mode AD; torch.func transforms over a compiled function run it eagerly).
class _Linear16Traced(_Linear16):
    jvp = torch.autograd.Function.jvp


class _StoreHTraced(_StoreH):
    jvp = torch.autograd.Function.jvp


def _fn(eager: type[torch.autograd.Function], traced: type[torch.autograd.Function]):
    return traced if torch.compiler.is_compiling() else eager


def _store_h(h: Tensor, storage: torch.dtype) -> Tensor:
    """h as stored between steps (:class:`_StoreH`); the identity where storage is the compute
    dtype."""
    if storage == h.dtype:
        return h
    return _fn(_StoreH, _StoreHTraced).apply(h, storage)


def _linear(a: Tensor, w: Tensor, b: Tensor | None, storage: torch.dtype) -> Tensor:
    """a W^T + b; 16-bit storage differentiates as :class:`_Linear16`."""
    if storage in (torch.float16, torch.bfloat16):
        return _fn(_Linear16, _Linear16Traced).apply(a, w, b, storage, True)
    return F.linear(a, w, b)


def _projection(h: Tensor, w_hr: Tensor, storage: torch.dtype) -> Tensor:
    """LSTM's h W_hr^T in the compute dtype; in 16-bit storage its backward, in fp32 from the
    unrounded gradient as in the kernels, runs with autocast off (:class:`_Linear16`)."""
    if storage in (torch.float16, torch.bfloat16):
        return _fn(_Linear16, _Linear16Traced).apply(h, w_hr, None, storage, False)
    return F.linear(h, w_hr)


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
    lengths: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer, one direction, over a whole chunk.

    x: (T, B, I); h0: (B, P) with P = proj_size or H; c0: (B, H) for LSTM, else None;
    w_ih: (G*H, I); w_hh: (G*H, P); b_ih, b_hh: (G*H,) or None; w_hr: (P, H) or None (LSTM);
    lengths: (B,) integer tensor or None.
    Returns y: (T, B, P), h_n: (B, P), c_n: (B, H) or None — all in x's dtype.
    """
    dtype = x.dtype
    cd = compute_dtype(dtype)
    T = x.shape[0]
    if torch.jit.is_tracing():
        warn_at_caller(
            f"fused_rnn: torch.jit.trace records the reference backend's time loop step by "
            f"step, so the traced module takes sequences of length {T} only: another length "
            f"gives wrong results, with no error. Trace a module on backend='auto' (PyTorch's "
            f"kernels, one op per stack), or use torch.export or torch.compile.",
            torch.jit.TracerWarning)
    gx_all = _linear(x.to(cd), w_ih.to(cd), _cast(b_ih, cd), dtype)  # (T, B, G*H): one GEMM
    w_hh_c, b_hh_c, w_hr_c = w_hh.to(cd), _cast(b_hh, cd), _cast(w_hr, cd)
    h = h0.to(cd)
    c = _cast(c0, cd) if mode == "LSTM" else None
    mask_all = None
    if lengths is not None:
        steps_idx = torch.arange(T, device=x.device).unsqueeze(1)
        mask_all = (steps_idx < lengths.to(x.device).unsqueeze(0)).unsqueeze(2)  # (T, B, 1)
    # The outputs in the order computed: appended, as torch 2.6's dynamo cannot assign into a
    # list sized by a symbolic length.
    ys: list[Tensor] = []
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h_in, c_in, gx = h, c, gx_all[t]
        if mask_all is not None:
            # Rows past their length compute on zeros: their result is discarded below, and the
            # zero gradient of a discarded branch times an inf in their carried state would be
            # NaN (torch.nn does not compute those rows at all). So are their pre-activations:
            # a zero input times an inf weight is NaN already.
            h_in = torch.where(mask_all[t], h, torch.zeros_like(h))
            c_in = None if c is None else torch.where(mask_all[t], c, torch.zeros_like(c))
            gx = torch.where(mask_all[t], gx, torch.zeros_like(gx))
        gh = _linear(h_in, w_hh_c, b_hh_c, dtype)
        if mask_all is not None:
            gh = torch.where(mask_all[t], gh, torch.zeros_like(gh))
        h_new, c_new = cell_update(mode, gx, gh, h_in, c_in)
        if w_hr_c is not None:
            h_new = _projection(h_new, w_hr_c, dtype)
        # Round h to the storage dtype: it is y_t and the next step's matmul operand. Its
        # gradient stays in the compute dtype (_StoreH).
        h_new = _store_h(h_new, dtype)
        if mask_all is not None:
            m = mask_all[t]
            ys.append(torch.where(m, h_new, torch.zeros_like(h_new)))
            h = torch.where(m, h_new, h)
            if c is not None:
                c = torch.where(m, c_new, c)
        else:
            ys.append(h_new)
            h, c = h_new, c_new
    if T > 0:
        y = torch.stack(ys[::-1] if reverse else ys).to(dtype)
    else:  # h_n and c_n fresh tensors, as the kernels' (not the caller's h0 and c0)
        y = x.new_zeros((0, h0.shape[0], h0.shape[1]))
        h, c = h.clone(), None if c is None else c.clone()
    return y, h.to(dtype), _cast(c, dtype)


def rnn_cell(
    mode: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One step. x: (B, I); h: (B, H); c: (B, H) for LSTM. Returns (h', c') in x's dtype."""
    dtype = x.dtype
    cd = compute_dtype(dtype)
    hc = h.to(cd)
    gx = _linear(x.to(cd), w_ih.to(cd), _cast(b_ih, cd), dtype)
    gh = _linear(hc, w_hh.to(cd), _cast(b_hh, cd), dtype)
    h_new, c_new = cell_update(mode, gx, gh, hc, _cast(c, cd))
    return h_new.to(dtype), _cast(c_new, dtype)
