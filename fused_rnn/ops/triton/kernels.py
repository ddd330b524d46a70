"""Triton kernels for the recurrent part of LSTM / GRU / Elman RNN layers.

Only the sequential part lives here (DESIGN.md, "The recurrence"): the input projection
``x W_ih^T + b_ih`` for all T steps and the weight gradients are time-parallel GEMMs done by
torch in :mod:`fused_rnn.ops.triton.launch`.

Kernels (``MODE``: 0 LSTM, 1 GRU, 2 RNN_TANH, 3 RNN_RELU; G gates, H hidden, P = proj or H):

``_step_fwd_kernel``        one step, grid (B tiles, H tiles): recurrent matmul over K = P,
                            gate math, state update. The fused cell step, and the per-step
                            path of a layer for any H (one launch per step).
``_step_bwd_kernel``        one step backward, grid (B tiles, H tiles): ``dh_t`` for its hidden
                            tile from the previous backward step's dgates (matmul over K = G*H),
                            then the gate gradients and ``dc_{t-1}``.
``_persistent_fwd_kernel``  a whole chunk, grid (B tiles,): one program owns *all* hidden units
``_persistent_bwd_kernel``  of its batch rows, keeps W_hh (and W_hr) on chip for the whole
                            chunk (the compiler stages them in shared memory once, before the
                            time loop) and carries h, c (dh, dc) in registers from step to step. No
                            other program ever reads its state, so there is no grid barrier
                            (and nothing that could deadlock the interpreter, which runs
                            programs one after another). Used where W fits on chip.

Precision (the contract of ``fused_rnn/ops/reference.py``): gate math, accumulators and the
LSTM cell state in fp32; the recurrent matmul's operands are rounded to the storage dtype
(h is rounded after every step anyway, as in the reference; in backward the dgates are rounded
to the storage dtype before they meet W_hh, as the reference's ``_Linear16`` rounds them; the
launcher rounds them so for the time-parallel GEMMs after this backward too). fp32 dots use TF32 only when the launcher passes ``PRECISION="tf32"``
(``torch.backends.cudnn.allow_tf32``). Under ``TRITON_INTERPRET=1`` (``INTERPRET``) operands
are promoted to fp32 *after* rounding, because the interpreter's ``tl.dot`` on bf16 is wrong;
the numbers are the same as the tensor-core dot up to accumulation order.

tanh is written as ``2*sigmoid(2x) - 1``: the interpreter has no libdevice, and one formula on
both sides keeps interpreter and GPU results comparable.

Saved for backward (decided in :mod:`~fused_rnn.ops.triton.launch`): the *activated* gates are
written over the fp32 ``gx`` buffer in place (no extra memory), plus for LSTM the carried cell
state after each step and for GRU ``W_hn h + b_hn`` (needed for dr).
"""

from __future__ import annotations

import triton
import triton.language as tl

LSTM: tl.constexpr = tl.constexpr(0)
GRU: tl.constexpr = tl.constexpr(1)
RNN_TANH: tl.constexpr = tl.constexpr(2)
RNN_RELU: tl.constexpr = tl.constexpr(3)


# --------------------------------------------------------------------------- helpers
@triton.jit
def _sigmoid(x):
    # Not tl.sigmoid: that is a @jit function of triton.language, and if triton was imported
    # before TRITON_INTERPRET was set (a test run that compiled something first), it is a
    # compiled-only function the interpreter refuses to call. Same formula. For the same
    # reason these kernels use tl.full, not tl.zeros; only builtins and our own @jit helpers.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # No libdevice under the interpreter, so from exp. Below |x| = 0.25 the odd Taylor series
    # to x^11 (its first dropped term is under 1e-10; evaluated on x clamped to that range, so
    # large inputs do not overflow it): 2*sigmoid(2x)-1 was 6% off relative at 1e-5. Above it,
    # from e = exp(-2|x|): (1 - e) / (1 + e) below 1 (1 - e exact for e >= 0.5), 1 - 2e / (1 + e)
    # from 1, whose rounding near saturation is tanh's own: within 5.1 ulps of tanh at fp32
    # below 1 and 1.2 from 1, where 2*sigmoid(2x)-1 was 10 off and its 1 - tanh^2 (the
    # backward's) came out 0 from |x| = 8.3, where torch's is still within 10% of the truth.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    r = 1.0 / (1.0 + e)
    large = tl.where(ax < 1.0, (1.0 - e) * r, 1.0 - (2.0 * e) * r)  # NaN: NaN
    xs = tl.minimum(tl.maximum(x, -0.25), 0.25)
    x2 = xs * xs
    p = -1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    small = xs + xs * x2 * p
    return tl.where(ax < 0.25, small, tl.where(x < 0.0, -large, large))


@triton.jit
def _relu(x):
    # torch.relu's values: NaN stays NaN and -0.0 stays -0.0. tl.maximum(x, 0.0) does not: on
    # a GPU its default NaN rule returns the other operand, so relu(NaN) would be 0.
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _relu_bwd(a, da):
    # torch's rule (threshold_backward on the result a): zero where a <= 0, else da, so a NaN
    # result passes the gradient through as it does in torch.
    return tl.where(a <= 0.0, 0.0, da)


@triton.jit
def _round(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``x`` rounded to ``DTYPE`` to nearest, ties to even (what ``.to`` does on the GPU).

    The interpreter truncates fp32 -> bf16 (it ignores ``fp_downcast_rounding``), which made
    half of all bf16 hidden states one ulp off torch's; round on the fp32 bits instead, after
    which the conversion is exact. (Finite values only: the recurrence has no inf/NaN to keep.)
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _mm(a, b, OPERAND: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` with fp32 accumulation; both operands rounded to ``OPERAND`` first."""
    a = _round(a, OPERAND, INTERPRET)
    b = _round(b, OPERAND, INTERPRET)
    if INTERPRET:
        # The interpreter's tl.dot on bf16 operands gives garbage; fp32 of the rounded values
        # is the same product.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if OPERAND == tl.float32:
        return tl.dot(a, b, input_precision=PRECISION)
    return tl.dot(a, b)


@triton.jit
def _load_tile(ptr, rows, cols, stride, n_rows, n_cols):
    """fp32 tile ``ptr[rows[:, None] * stride + cols[None, :]]``, zero outside the bounds."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_w(ptr, rows, cols, stride, n_rows, n_cols):
    """Like ``_load_tile`` but kept in the storage dtype: weights feed tl.dot as they are, and
    in the persistent kernels they stay on chip for the whole chunk (half the space)."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_wT(w_ptr, gate, offs_k, offs_j, H, K):
    """Gate ``gate``'s block of W (G*H, K), transposed: tile[k, j] = W[gate*H + j, k]."""
    mask = (offs_k < K)[:, None] & (offs_j < H)[None, :]
    ptrs = w_ptr + (gate * H + offs_j)[None, :] * K + offs_k[:, None]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_bias(b_ptr, gate, offs_j, H, HAS: tl.constexpr):
    """(1, BLOCK_H) fp32 row of gate ``gate``'s bias, or zeros."""
    if HAS:
        b = tl.load(b_ptr + gate * H + offs_j, mask=offs_j < H, other=0.0).to(tl.float32)
    else:
        b = tl.full(offs_j.shape, 0.0, tl.float32)
    return b[None, :]


@triton.jit
def _lstm_cell(pi, pf, pg, po, c):
    """Pre-activations -> (i, f, g, o, c', o*tanh(c')). Same operation order as aten's cell."""
    i = _sigmoid(pi)
    f = _sigmoid(pf)
    g = _tanh(pg)
    o = _sigmoid(po)
    c_new = f * c + i * g
    return i, f, g, o, c_new, o * _tanh(c_new)


@triton.jit
def _lstm_cell_bwd(dm, dc, i, f, g, o, c_new, c_prev):
    """Gradients of the pre-activations and of c_{t-1}, given dm (on o*tanh(c')) and dc'."""
    tc = _tanh(c_new)
    dc = dc + dm * o * (1.0 - tc * tc)
    d_i = dc * g * i * (1.0 - i)
    d_f = dc * c_prev * f * (1.0 - f)
    d_g = dc * i * (1.0 - g * g)
    d_o = dm * tc * o * (1.0 - o)
    return d_i, d_f, d_g, d_o, dc * f


@triton.jit
def _gru_cell(xr, xz, xn, hr, hz, hn, h):
    """(r, z, n, h') with b_hn inside r * (.), as torch.nn.GRU."""
    r = _sigmoid(xr + hr)
    z = _sigmoid(xz + hz)
    n = _tanh(xn + r * hn)
    return r, z, n, n + z * (h - n)


@triton.jit
def _gru_cell_bwd(dh, r, z, n, hn, h_prev):
    """(d r_pre, d z_pre, d n_pre, d hn, dh_prev through z) given dh on h'."""
    dn = dh * (1.0 - z) * (1.0 - n * n)
    d_r = dn * hn * r * (1.0 - r)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    return d_r, d_z, dn, dn * r, dh * z


# --------------------------------------------------------------------------- per-step kernels
# ``t`` changes every launch: do not specialise on it (t == 1 would be a second compile).
@triton.jit(do_not_specialize=["t"])
def _step_fwd_kernel(
    gx_ptr,  # (B, G*H) fp32: x_t W_ih^T + b_ih; gate activations written back when SAVE
    h_ptr,  # (B, P) storage dtype: h_{t-1} (read by every program: never written here)
    c_ptr,  # (B, H) fp32: carried c, updated in place (LSTM; each program owns its tile)
    w_hh_ptr,  # (G*H, P) storage dtype
    b_hh_ptr,  # (G*H,) or dummy
    len_ptr,  # (B,) integer or dummy
    t,  # the time index (for lengths)
    hout_ptr,  # (B, H) storage dtype: carried h after the step (no projection)
    y_ptr,  # (B, H) storage dtype: y_t (no projection) | fp32 m_t = o*tanh(c_t) (projection)
    save_ptr,  # (B, H) fp32: LSTM carried c_t | GRU W_hn h + b_hn (when SAVE)
    B,
    H,
    P,
    MODE: tl.constexpr,
    HAS_BHH: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One step for a (BLOCK_B, BLOCK_H) tile of (batch, hidden unit), all G gates of it.

    With a projection the kernel stops at m_t (fp32) and the launcher applies W_hr: h_t needs
    every hidden unit of m_t, which no single program of this grid owns.
    """
    OPERAND: tl.constexpr = w_hh_ptr.dtype.element_ty
    G: tl.constexpr = 4 if MODE == LSTM else (3 if MODE == GRU else 1)
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # B*G*H may pass 2^31
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_b < B)[:, None] & (offs_j < H)[None, :]
    GH = G * H

    # Recurrent matmul h_{t-1} (B, P) @ W_g^T (P, H) for each gate g, K-blocked.
    acc0 = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    acc1 = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    acc2 = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    acc3 = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    for k0 in range(0, P, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        hk = _load_tile(h_ptr, offs_b, offs_k, P, B, P)
        acc0 += _mm(hk, _load_wT(w_hh_ptr, 0, offs_k, offs_j, H, P), OPERAND, INTERPRET, PRECISION)
        if G > 1:
            acc1 += _mm(hk, _load_wT(w_hh_ptr, 1, offs_k, offs_j, H, P), OPERAND, INTERPRET, PRECISION)
            acc2 += _mm(hk, _load_wT(w_hh_ptr, 2, offs_k, offs_j, H, P), OPERAND, INTERPRET, PRECISION)
        if G > 3:
            acc3 += _mm(hk, _load_wT(w_hh_ptr, 3, offs_k, offs_j, H, P), OPERAND, INTERPRET, PRECISION)

    gx = gx_ptr + offs_b[:, None] * GH + offs_j[None, :]
    tile = offs_b[:, None] * H + offs_j[None, :]
    if HAS_LEN:
        lens = tl.load(len_ptr + offs_b, mask=offs_b < B, other=0)
        active = (t < lens)[:, None]
    if MODE == LSTM:
        c = tl.load(c_ptr + tile, mask=mask, other=0.0)
        i, f, g, o, c_new, h_new = _lstm_cell(
            tl.load(gx, mask=mask) + (acc0 + _load_bias(b_hh_ptr, 0, offs_j, H, HAS_BHH)),
            tl.load(gx + H, mask=mask) + (acc1 + _load_bias(b_hh_ptr, 1, offs_j, H, HAS_BHH)),
            tl.load(gx + 2 * H, mask=mask) + (acc2 + _load_bias(b_hh_ptr, 2, offs_j, H, HAS_BHH)),
            tl.load(gx + 3 * H, mask=mask) + (acc3 + _load_bias(b_hh_ptr, 3, offs_j, H, HAS_BHH)),
            c,
        )
        if HAS_LEN:
            c_new = tl.where(active, c_new, c)
        tl.store(c_ptr + tile, c_new, mask=mask)
        if SAVE:
            tl.store(gx, i, mask=mask)
            tl.store(gx + H, f, mask=mask)
            tl.store(gx + 2 * H, g, mask=mask)
            tl.store(gx + 3 * H, o, mask=mask)
            tl.store(save_ptr + tile, c_new, mask=mask)
    elif MODE == GRU:
        hn = acc2 + _load_bias(b_hh_ptr, 2, offs_j, H, HAS_BHH)
        h_prev = _load_tile(h_ptr, offs_b, offs_j, P, B, H)
        r, z, n, h_new = _gru_cell(
            tl.load(gx, mask=mask),
            tl.load(gx + H, mask=mask),
            tl.load(gx + 2 * H, mask=mask),
            acc0 + _load_bias(b_hh_ptr, 0, offs_j, H, HAS_BHH),
            acc1 + _load_bias(b_hh_ptr, 1, offs_j, H, HAS_BHH),
            hn,
            h_prev,
        )
        if SAVE:
            tl.store(gx, r, mask=mask)
            tl.store(gx + H, z, mask=mask)
            tl.store(gx + 2 * H, n, mask=mask)
            tl.store(save_ptr + tile, hn, mask=mask)
    else:
        pre = tl.load(gx, mask=mask) + (acc0 + _load_bias(b_hh_ptr, 0, offs_j, H, HAS_BHH))
        if MODE == RNN_TANH:
            h_new = _tanh(pre)
        else:
            h_new = _relu(pre)
        if SAVE:
            tl.store(gx, h_new, mask=mask)  # the activation before rounding: tanh'/relu' need it

    if HAS_PROJ:
        tl.store(y_ptr + tile, h_new, mask=mask)  # m_t, fp32; W_hr is applied by the launcher
    else:
        h_out = _round(h_new, y_ptr.dtype.element_ty, INTERPRET)
        if HAS_LEN:
            h_keep = tl.load(h_ptr + tile, mask=mask, other=0.0)
            tl.store(y_ptr + tile, tl.where(active, h_out, 0.0), mask=mask)
            tl.store(hout_ptr + tile, tl.where(active, h_out, h_keep), mask=mask)
        else:
            tl.store(y_ptr + tile, h_out, mask=mask)
            tl.store(hout_ptr + tile, h_out, mask=mask)


@triton.jit(do_not_specialize=["t", "has_next"])
def _step_bwd_kernel(
    dg_next_ptr,  # (B, G*H) fp32: dgates of the step after this one in time order (FUSE)
    dghn_next_ptr,  # (B, H) fp32: GRU hh-side dgate of n for that step, else dummy (FUSE)
    has_next,  # 0 at the first backward step (nothing to propagate yet), else 1
    carry_ptr,  # (B, H) fp32: the part of dh_t that bypasses W_hh (FUSE); in/out, own tile
    dy_ptr,  # (B, H) any float: dL/dy_t (FUSE)
    dm_ptr,  # (B, H) fp32: dL/dm_t computed by the launcher (not FUSE: projection)
    gates_ptr,  # (B, G*H) fp32: saved activations of step t
    save_ptr,  # (B, H) fp32: LSTM c_t | GRU W_hn h + b_hn
    cprev_ptr,  # (B, H) fp32: LSTM c_{t-1}
    hprev_ptr,  # (B, H) storage dtype: GRU h_{t-1}
    dc_ptr,  # (B, H) fp32: dL/dc_t in, dL/dc_{t-1} out (LSTM), own tile
    w_hh_ptr,  # (G*H, H) storage dtype
    len_ptr,
    t,
    dg_ptr,  # (B, G*H) fp32 out: dgates of step t (input side; zero for inactive rows)
    dghn_ptr,  # (B, H) fp32 out: GRU hh-side dgate of n
    B,
    H,
    MODE: tl.constexpr,
    HAS_LEN: tl.constexpr,
    FUSE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One backward step for a (BLOCK_B, BLOCK_H) tile.

    FUSE (no projection): ``dh_t[:, tile] = carry + sum_g dG_{t+1,g} @ W_hh[g]`` (K = G*H) +
    dy_t, then the gate gradients. The launcher adds ``dG @ W_hh`` once more after the loop
    for dh0. Without FUSE (projection) the launcher computes dm_t.
    """
    OPERAND: tl.constexpr = w_hh_ptr.dtype.element_ty
    G: tl.constexpr = 4 if MODE == LSTM else (3 if MODE == GRU else 1)
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # B*G*H may pass 2^31
    offs_j = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_b < B)[:, None] & (offs_j < H)[None, :]
    GH = G * H
    tile = offs_b[:, None] * H + offs_j[None, :]
    gtile = offs_b[:, None] * GH + offs_j[None, :]
    if HAS_LEN:
        lens = tl.load(len_ptr + offs_b, mask=offs_b < B, other=0)
        active = (t < lens)[:, None]

    if FUSE:
        dh = tl.load(carry_ptr + tile, mask=mask, other=0.0)
        for g in tl.static_range(G):
            for k0 in range(0, H * has_next, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                if MODE == GRU and g == 2:
                    dgk = _load_tile(dghn_next_ptr, offs_b, offs_k, H, B, H)
                else:
                    dgk = _load_tile(dg_next_ptr + g * H, offs_b, offs_k, GH, B, H)
                w = _load_w(w_hh_ptr + g * H * H, offs_k, offs_j, H, H, H)
                dh += _mm(dgk, w, OPERAND, INTERPRET, PRECISION)
        dm = dh + tl.load(dy_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    else:
        dm = tl.load(dm_ptr + tile, mask=mask, other=0.0)

    if MODE == LSTM:
        dc = tl.load(dc_ptr + tile, mask=mask, other=0.0)
        d_i, d_f, d_g, d_o, dc_prev = _lstm_cell_bwd(
            dm,
            dc,
            tl.load(gates_ptr + gtile, mask=mask, other=0.0),
            tl.load(gates_ptr + gtile + H, mask=mask, other=0.0),
            tl.load(gates_ptr + gtile + 2 * H, mask=mask, other=0.0),
            tl.load(gates_ptr + gtile + 3 * H, mask=mask, other=0.0),
            tl.load(save_ptr + tile, mask=mask, other=0.0),
            tl.load(cprev_ptr + tile, mask=mask, other=0.0),
        )
        if HAS_LEN:
            d_i = tl.where(active, d_i, 0.0)
            d_f = tl.where(active, d_f, 0.0)
            d_g = tl.where(active, d_g, 0.0)
            d_o = tl.where(active, d_o, 0.0)
            dc_prev = tl.where(active, dc_prev, dc)
        tl.store(dg_ptr + gtile, d_i, mask=mask)
        tl.store(dg_ptr + gtile + H, d_f, mask=mask)
        tl.store(dg_ptr + gtile + 2 * H, d_g, mask=mask)
        tl.store(dg_ptr + gtile + 3 * H, d_o, mask=mask)
        tl.store(dc_ptr + tile, dc_prev, mask=mask)
        direct = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    elif MODE == GRU:
        d_r, d_z, d_n, d_hn, direct = _gru_cell_bwd(
            dm,
            tl.load(gates_ptr + gtile, mask=mask, other=0.0),
            tl.load(gates_ptr + gtile + H, mask=mask, other=0.0),
            tl.load(gates_ptr + gtile + 2 * H, mask=mask, other=0.0),
            tl.load(save_ptr + tile, mask=mask, other=0.0),
            _load_tile(hprev_ptr, offs_b, offs_j, H, B, H),
        )
        if HAS_LEN:
            d_r = tl.where(active, d_r, 0.0)
            d_z = tl.where(active, d_z, 0.0)
            d_n = tl.where(active, d_n, 0.0)
            d_hn = tl.where(active, d_hn, 0.0)
        tl.store(dg_ptr + gtile, d_r, mask=mask)
        tl.store(dg_ptr + gtile + H, d_z, mask=mask)
        tl.store(dg_ptr + gtile + 2 * H, d_n, mask=mask)
        tl.store(dghn_ptr + tile, d_hn, mask=mask)
    else:
        a = tl.load(gates_ptr + gtile, mask=mask, other=0.0)
        if MODE == RNN_TANH:
            d_pre = dm * (1.0 - a * a)
        else:
            d_pre = _relu_bwd(a, dm)
        if HAS_LEN:
            d_pre = tl.where(active, d_pre, 0.0)
        tl.store(dg_ptr + gtile, d_pre, mask=mask)
        direct = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)

    if FUSE:
        # What reaches dh_{t-1} without passing through W_hh: z*dh (GRU), or all of dh for rows
        # that skip this step (packed sequences).
        if HAS_LEN:
            direct = tl.where(active, direct, dh)
        tl.store(carry_ptr + tile, direct, mask=mask)


# --------------------------------------------------------------------------- persistent kernels
# T is not specialised: Triton compiles an integer argument equal to 1 as a constant, and the
# one-step variant that gave of the LSTM backward (H = 33-64, TF32 or 16-bit) spilled 128-424
# bytes a thread on sm_90, where the general one spills none. Its loop bound gains nothing from
# being known either.
@triton.jit(do_not_specialize=["T"])
def _persistent_fwd_kernel(
    gx_ptr,  # (T, B, G*H) fp32: x W_ih^T + b_ih; gate activations written back when SAVE
    h0_ptr,  # (B, P) storage dtype
    c0_ptr,  # (B, H) fp32 (LSTM) or dummy
    w_hh_ptr,  # (G*H, P) storage dtype
    b_hh_ptr,  # (G*H,) or dummy
    w_hr_ptr,  # (P, H) storage dtype or dummy
    len_ptr,  # (B,) integer or dummy
    y_ptr,  # (T, B, P) storage dtype
    hn_ptr,  # (B, P) storage dtype
    cn_ptr,  # (B, H) fp32 (LSTM) or dummy
    save_ptr,  # (T, B, H) fp32: LSTM carried c_t | GRU W_hn h + b_hn (when SAVE)
    T,
    B,
    H,
    P,
    MODE: tl.constexpr,
    HAS_BHH: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    HAS_LEN: tl.constexpr,
    REVERSE: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The whole chunk for BLOCK_B batch rows; BLOCK_H >= H and BLOCK_P >= P (one tile)."""
    OPERAND: tl.constexpr = w_hh_ptr.dtype.element_ty
    G: tl.constexpr = 4 if MODE == LSTM else (3 if MODE == GRU else 1)
    GH = G * H
    pid = tl.program_id(0)
    offs_b = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    mask_h = (offs_b < B)[:, None] & (offs_j < H)[None, :]
    mask_p = (offs_b < B)[:, None] & (offs_p < P)[None, :]

    # Loaded once, used T times: W_hh^T per gate (P, H) and W_hr^T (H, P), biases.
    w0 = _load_wT(w_hh_ptr, 0, offs_p, offs_j, H, P)
    b0 = _load_bias(b_hh_ptr, 0, offs_j, H, HAS_BHH)
    if G > 1:
        w1 = _load_wT(w_hh_ptr, 1, offs_p, offs_j, H, P)
        w2 = _load_wT(w_hh_ptr, 2, offs_p, offs_j, H, P)
        b1 = _load_bias(b_hh_ptr, 1, offs_j, H, HAS_BHH)
        b2 = _load_bias(b_hh_ptr, 2, offs_j, H, HAS_BHH)
    if G > 3:
        w3 = _load_wT(w_hh_ptr, 3, offs_p, offs_j, H, P)
        b3 = _load_bias(b_hh_ptr, 3, offs_j, H, HAS_BHH)
    if HAS_PROJ:
        wr = _load_wT(w_hr_ptr, 0, offs_j, offs_p, P, H)  # [j, p] = W_hr[p, j]
    if HAS_LEN:
        lens = tl.load(len_ptr + offs_b, mask=offs_b < B, other=0)

    h = _load_tile(h0_ptr, offs_b, offs_p, P, B, P)  # fp32 holding storage-dtype values
    if MODE == LSTM:
        c = _load_tile(c0_ptr, offs_b, offs_j, H, B, H)
    else:
        c = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    for s in range(T):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        row = t.to(tl.int64) * B + offs_b  # T*B may pass 2^31: multiply in int64
        gx = gx_ptr + row[:, None] * GH + offs_j[None, :]
        st = save_ptr + row[:, None] * H + offs_j[None, :]
        if MODE == LSTM:
            i, f, g, o, c_new, h_new = _lstm_cell(
                tl.load(gx, mask=mask_h, other=0.0) + (_mm(h, w0, OPERAND, INTERPRET, PRECISION) + b0),
                tl.load(gx + H, mask=mask_h, other=0.0) + (_mm(h, w1, OPERAND, INTERPRET, PRECISION) + b1),
                tl.load(gx + 2 * H, mask=mask_h, other=0.0) + (_mm(h, w2, OPERAND, INTERPRET, PRECISION) + b2),
                tl.load(gx + 3 * H, mask=mask_h, other=0.0) + (_mm(h, w3, OPERAND, INTERPRET, PRECISION) + b3),
                c,
            )
            if HAS_LEN:
                c_new = tl.where((t < lens)[:, None], c_new, c)
            c = c_new
            if SAVE:
                tl.store(gx, i, mask=mask_h)
                tl.store(gx + H, f, mask=mask_h)
                tl.store(gx + 2 * H, g, mask=mask_h)
                tl.store(gx + 3 * H, o, mask=mask_h)
                tl.store(st, c, mask=mask_h)
            if HAS_PROJ:
                # m stays fp32 as in the reference: the projection dot is an fp32 dot. Its
                # padded lanes are zeroed first (see below: an inf would make them NaN).
                h_new = tl.where(mask_h, h_new, 0.0)
                h_new = _mm(h_new, wr, tl.float32, INTERPRET, PRECISION)
        elif MODE == GRU:
            hn = _mm(h, w2, OPERAND, INTERPRET, PRECISION) + b2
            r, z, n, h_new = _gru_cell(
                tl.load(gx, mask=mask_h, other=0.0),
                tl.load(gx + H, mask=mask_h, other=0.0),
                tl.load(gx + 2 * H, mask=mask_h, other=0.0),
                _mm(h, w0, OPERAND, INTERPRET, PRECISION) + b0,
                _mm(h, w1, OPERAND, INTERPRET, PRECISION) + b1,
                hn,
                h,
            )
            if SAVE:
                tl.store(gx, r, mask=mask_h)
                tl.store(gx + H, z, mask=mask_h)
                tl.store(gx + 2 * H, n, mask=mask_h)
                tl.store(st, hn, mask=mask_h)
        else:
            pre = tl.load(gx, mask=mask_h, other=0.0) + (_mm(h, w0, OPERAND, INTERPRET, PRECISION) + b0)
            if MODE == RNN_TANH:
                h_new = _tanh(pre)
            else:
                h_new = _relu(pre)
            if SAVE:
                tl.store(gx, h_new, mask=mask_h)
        # Round to the storage dtype: h_t is y_t and the next step's matmul operand. The tile's
        # padded lanes (past H or P) are kept zero: W's padding is zero, but one inf in h makes
        # inf * 0 = NaN there, and the next step's matmul would add NaN * 0 into every unit.
        h_new = _round(h_new, y_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        h_new = tl.where(mask_p, h_new, 0.0)
        yt = y_ptr + row[:, None] * P + offs_p[None, :]
        if HAS_LEN:
            active = (t < lens)[:, None]
            tl.store(yt, tl.where(active, h_new, 0.0).to(y_ptr.dtype.element_ty), mask=mask_p)
            h = tl.where(active, h_new, h)
        else:
            tl.store(yt, h_new.to(y_ptr.dtype.element_ty), mask=mask_p)
            h = h_new
    tl.store(hn_ptr + offs_b[:, None] * P + offs_p[None, :], h.to(hn_ptr.dtype.element_ty), mask=mask_p)
    if MODE == LSTM:
        tl.store(cn_ptr + offs_b[:, None] * H + offs_j[None, :], c, mask=mask_h)


@triton.jit(do_not_specialize=["T"])  # as the forward
def _persistent_bwd_kernel(
    gates_ptr,  # (T, B, G*H) fp32: saved activations
    save_ptr,  # (T, B, H) fp32: LSTM c_t | GRU W_hn h + b_hn
    cprev_ptr,  # (T, B, H) fp32: LSTM c_{t-1}
    hprev_ptr,  # (T, B, P) storage dtype: h_{t-1} (GRU)
    dy_ptr,  # (T, B, P) any float
    dhn_ptr,  # (B, P) fp32
    dcn_ptr,  # (B, H) fp32
    w_hh_ptr,  # (G*H, P) storage dtype
    w_hr_ptr,  # (P, H) storage dtype or dummy
    len_ptr,
    dg_ptr,  # (T, B, G*H) fp32 out: dgates, input side (zero for rows that skip the step)
    dghn_ptr,  # (T, B, H) fp32 out: GRU hh-side dgate of n
    dhnew_ptr,  # (T, B, P) fp32 out: dL/dh_t on the projection's output (projection only)
    dh0_ptr,  # (B, P) fp32 out
    dc0_ptr,  # (B, H) fp32 out
    T,
    B,
    H,
    P,
    MODE: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    HAS_LEN: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Reverse-time loop over the chunk for BLOCK_B batch rows; dh, dc live in registers."""
    OPERAND: tl.constexpr = w_hh_ptr.dtype.element_ty
    G: tl.constexpr = 4 if MODE == LSTM else (3 if MODE == GRU else 1)
    GH = G * H
    pid = tl.program_id(0)
    offs_b = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    mask_h = (offs_b < B)[:, None] & (offs_j < H)[None, :]
    mask_p = (offs_b < B)[:, None] & (offs_p < P)[None, :]

    # W_hh per gate in its natural (H, P) orientation: dh_{t-1} = sum_g dG_g @ W_g.
    w0 = _load_w(w_hh_ptr, offs_j, offs_p, P, H, P)
    if G > 1:
        w1 = _load_w(w_hh_ptr + H * P, offs_j, offs_p, P, H, P)
        w2 = _load_w(w_hh_ptr + 2 * H * P, offs_j, offs_p, P, H, P)
    if G > 3:
        w3 = _load_w(w_hh_ptr + 3 * H * P, offs_j, offs_p, P, H, P)
    if HAS_PROJ:
        wr = _load_w(w_hr_ptr, offs_p, offs_j, H, P, H)  # (P, H): dm = dh @ W_hr
    if HAS_LEN:
        lens = tl.load(len_ptr + offs_b, mask=offs_b < B, other=0)

    dh = _load_tile(dhn_ptr, offs_b, offs_p, P, B, P)
    if MODE == LSTM:
        dc = _load_tile(dcn_ptr, offs_b, offs_j, H, B, H)
    else:
        dc = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    for s in range(T):
        if REVERSE:
            t = s
        else:
            t = T - 1 - s
        row = t.to(tl.int64) * B + offs_b  # T*B may pass 2^31: multiply in int64
        tile_h = row[:, None] * H + offs_j[None, :]
        tile_g = row[:, None] * GH + offs_j[None, :]
        tile_p = row[:, None] * P + offs_p[None, :]
        if HAS_LEN:
            active = (t < lens)[:, None]
        dh_new = dh + tl.load(dy_ptr + tile_p, mask=mask_p, other=0.0).to(tl.float32)
        if HAS_PROJ:
            if HAS_LEN:
                tl.store(dhnew_ptr + tile_p, tl.where(active, dh_new, 0.0), mask=mask_p)
            else:
                tl.store(dhnew_ptr + tile_p, dh_new, mask=mask_p)
            dm = _mm(dh_new, wr, tl.float32, INTERPRET, PRECISION)
        else:
            dm = dh_new
        if MODE == LSTM:
            d_i, d_f, d_g, d_o, dc_prev = _lstm_cell_bwd(
                dm,
                dc,
                tl.load(gates_ptr + tile_g, mask=mask_h, other=0.0),
                tl.load(gates_ptr + tile_g + H, mask=mask_h, other=0.0),
                tl.load(gates_ptr + tile_g + 2 * H, mask=mask_h, other=0.0),
                tl.load(gates_ptr + tile_g + 3 * H, mask=mask_h, other=0.0),
                tl.load(save_ptr + tile_h, mask=mask_h, other=0.0),
                tl.load(cprev_ptr + tile_h, mask=mask_h, other=0.0),
            )
            if HAS_LEN:
                d_i = tl.where(active, d_i, 0.0)
                d_f = tl.where(active, d_f, 0.0)
                d_g = tl.where(active, d_g, 0.0)
                d_o = tl.where(active, d_o, 0.0)
            tl.store(dg_ptr + tile_g, d_i, mask=mask_h)
            tl.store(dg_ptr + tile_g + H, d_f, mask=mask_h)
            tl.store(dg_ptr + tile_g + 2 * H, d_g, mask=mask_h)
            tl.store(dg_ptr + tile_g + 3 * H, d_o, mask=mask_h)
            dh_prev = (
                _mm(d_i, w0, OPERAND, INTERPRET, PRECISION)
                + _mm(d_f, w1, OPERAND, INTERPRET, PRECISION)
                + _mm(d_g, w2, OPERAND, INTERPRET, PRECISION)
                + _mm(d_o, w3, OPERAND, INTERPRET, PRECISION)
            )
        elif MODE == GRU:
            d_r, d_z, d_n, d_hn, direct = _gru_cell_bwd(
                dm,
                tl.load(gates_ptr + tile_g, mask=mask_h, other=0.0),
                tl.load(gates_ptr + tile_g + H, mask=mask_h, other=0.0),
                tl.load(gates_ptr + tile_g + 2 * H, mask=mask_h, other=0.0),
                tl.load(save_ptr + tile_h, mask=mask_h, other=0.0),
                tl.load(hprev_ptr + tile_p, mask=mask_p, other=0.0).to(tl.float32),
            )
            if HAS_LEN:
                d_r = tl.where(active, d_r, 0.0)
                d_z = tl.where(active, d_z, 0.0)
                d_n = tl.where(active, d_n, 0.0)
                d_hn = tl.where(active, d_hn, 0.0)
            tl.store(dg_ptr + tile_g, d_r, mask=mask_h)
            tl.store(dg_ptr + tile_g + H, d_z, mask=mask_h)
            tl.store(dg_ptr + tile_g + 2 * H, d_n, mask=mask_h)
            tl.store(dghn_ptr + tile_h, d_hn, mask=mask_h)
            dh_prev = (
                _mm(d_r, w0, OPERAND, INTERPRET, PRECISION)
                + _mm(d_z, w1, OPERAND, INTERPRET, PRECISION)
                + _mm(d_hn, w2, OPERAND, INTERPRET, PRECISION)
                + direct
            )
        else:
            a = tl.load(gates_ptr + tile_g, mask=mask_h, other=0.0)
            if MODE == RNN_TANH:
                d_pre = dm * (1.0 - a * a)
            else:
                d_pre = _relu_bwd(a, dm)
            if HAS_LEN:
                d_pre = tl.where(active, d_pre, 0.0)
            tl.store(dg_ptr + tile_g, d_pre, mask=mask_h)
            dh_prev = _mm(d_pre, w0, OPERAND, INTERPRET, PRECISION)
        if HAS_LEN:
            # Rows that skip step t pass dh, dc through unchanged (and ignore dy_t: y_t = 0).
            dh = tl.where(active, dh_prev, dh)
            if MODE == LSTM:
                dc = tl.where(active, dc_prev, dc)
        else:
            dh = dh_prev
            if MODE == LSTM:
                dc = dc_prev
    tl.store(dh0_ptr + offs_b[:, None] * P + offs_p[None, :], dh, mask=mask_p)
    if MODE == LSTM:
        tl.store(dc0_ptr + offs_b[:, None] * H + offs_j[None, :], dc, mask=mask_h)
