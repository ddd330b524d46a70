"""Launchers: forward and backward of one layer/direction on the Triton kernels (no autograd).

The split (DESIGN.md): the input projection ``x W_ih^T + b_ih`` for all T steps is one torch
GEMM; only the recurrence runs in our kernels, on one of two paths:

``persistent``  one launch per chunk and direction (``_persistent_fwd_kernel``): one program per
                16 batch rows owns all hidden units, W_hh (and W_hr) stay on chip for the
                whole chunk (staged in shared memory once), h and c never leave the chip between
                steps. Taken when W fits the budget below.
``step``        one launch per step (``_step_fwd_kernel``), grid (batch tiles, hidden tiles),
                any size; W_hh is re-read from L2 every step.

Backward mirrors it in reverse time and produces the gate gradients ``dG`` (T, B, G*H);
dx, dW_ih, dW_hh, dW_hr and the bias gradients are then time-parallel GEMMs/reductions.

What is saved for backward, and why: the *activated* gates of every step, written by the
forward kernel over the fp32 ``gx`` buffer it has just consumed (so they cost no extra memory),
plus the LSTM cell state after every step (T, B, H) or GRU's ``W_hn h + b_hn`` (T, B, H). The
alternative, recomputing the gates from the saved outputs, needs a (T*B, P) x (P, G*H) GEMM
(time-parallel, but as many FLOPs as the forward's recurrent matmuls) plus a sequential scan
to rebuild c, and its accumulation order would differ from the forward's; reading back
G*H fp32 values per row and step is cheaper than that and gives the gradient of exactly the
function the forward computed. h_{t-1} is not saved: it is y shifted by one step.
Inference (``save=False``) writes none of it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
import triton
from torch import Tensor
from triton.runtime.errors import OutOfResources

from fused_rnn.ops.common import (
    ForkSafeLock,
    cudnn_rnn_tf32,
    gemms_use_tf32,
    mm_f32,
    previous_hidden,
    tf32_gemms,
    warn_at_caller,
)
from fused_rnn.ops.reference import GATES
from fused_rnn.ops.triton import kernels

MODE_ID = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
PATHS = ("auto", "persistent", "step")

# On-chip budget of the persistent kernel, in W elements per program (W_hh plus W_hr, padded
# to powers of two): LSTM H=64, GRU H=64, RNN H=128, LSTM H=64 with P=32. The compiler stages W
# in shared memory once, before the time loop; compiled for sm_90 (compile_check.py, no GPU
# needed), the largest of these needs 143 KB of shared memory (LSTM H=64 fp32, backward)
# against 227 KB per block (163 KB on an A100), with at most 16 bytes of spilled registers per
# thread (compile_check fails a variant past 32). LSTM H=128 would need 246-418 KB. Larger layers take the per-step path until a multi-program
# persistent form (W split across SMs, grid barrier) exists. Speed: not measured yet.
PERSISTENT_MAX_W_ELEMS = 16 * 1024

# Tiles of the per-step kernels: tl.dot wants every dimension >= 16. K slices of 32 and 8 warps:
# with 64 and 4 warps, LSTM's four gate accumulators and W tiles took 255 registers and spilled
# up to 320 bytes per thread on sm_90 (compile_check now fails such a variant). One forward
# variant takes slices of 16 on Triton >= 3.9 (step_fwd_block_k).
STEP_BLOCK_H = 32
STEP_BLOCK_K = 32


def interpreting() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they run on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels._step_fwd_kernel, InterpretedFunction)


# Triton's interpreter is not thread-safe: while a kernel runs it patches ``triton.language``
# for the whole process, and restores it after, so two threads interpreting at once break each
# other's kernels ("Did you forget to add @triton.jit ?"). On the CPU our launches therefore
# run one at a time; on a GPU they are not serialized.
_interpreter_lock = ForkSafeLock()


def _one_at_a_time(interp: bool):
    """The context a launch runs in: the interpreter's lock when ``interp``, else nothing."""
    return _interpreter_lock if interp else contextlib.nullcontext()


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _fp32_dot_precision() -> str:
    """tl.dot input_precision for fp32 operands: TF32 exactly when cuDNN's RNNs may use it."""
    return "tf32" if cudnn_rnn_tf32() and not interpreting() else "ieee"


def _gemm_tf32(dtype: torch.dtype):
    """TF32 or not for the time-parallel GEMMs (torch) of ``dtype`` data, as
    :func:`common.gemms_use_tf32` says (on CUDA only: cuBLAS's setting)."""
    return tf32_gemms(gemms_use_tf32(dtype, cudnn_rnn_tf32()))


def _persistent_block_p(P: int, proj: bool) -> int:
    """BLOCK_P of the persistent kernels. A projection narrower than 32 is padded to 32: with
    N = 16 the compiler lays a (16, 16) dot out as 8 warps over 16 rows, all computing the same
    tile, and LSTM H = 65-128 with P <= 16 then spilled 4-13 KB per thread on sm_90."""
    return _pow2(P, 32 if proj else 16)


_refused: set[tuple[str, str]] = set()


def _persistent_refused(kernel: str, requested: str, err: OutOfResources) -> None:
    """The device cannot hold a persistent kernel (Triton refuses it at its first launch: an
    sm_86/89 GPU's 99 KB of shared memory per block, say, against the 143 KB of LSTM H=64 fp32
    backward): where "auto" chose the path, the step kernels run instead, with a warning the
    first time; a path asked for by name is an error."""
    if requested != "auto":
        raise err
    key = (kernel, str(err))
    if key not in _refused:
        warn_at_caller(f"fused_rnn triton: the device cannot run {kernel} ({err}); running the "
                       "per-step kernels instead")
        _refused.add(key)


def choose_path(mode: str, hidden_size: int, proj_size: int, path: str = "auto") -> str:
    """"persistent" when one program can hold W_hh (and W_hr) on chip, else "step"."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    if path != "auto":
        return path
    H = hidden_size
    P = proj_size or hidden_size
    block_p = _persistent_block_p(P, bool(proj_size))
    elems = GATES[mode] * _pow2(H) * block_p + (_pow2(H) * block_p if proj_size else 0)
    return "persistent" if elems <= PERSISTENT_MAX_W_ELEMS else "step"


def _triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton ("3.9.0+git1234" -> (3, 9))."""
    major, minor = (triton.__version__.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def backward_aborts_compiler(mode: str, dtype: torch.dtype, precision: str, hidden_size: int,
                             proj: bool) -> bool:
    """Whether Triton's compiler would abort the process on the persistent backward kernel.

    Triton 3.9.0's LLVM fails an assertion in its SLP vectorizer (an abort, not an exception)
    compiling the persistent LSTM backward with fp32 IEEE dots (TF32 off), no projection, at
    BLOCK_H 64 (H 33..64); every other variant compiles, and 3.6, 3.7.1 and 3.8.0 compile this
    one (``compile_check`` on the CPU, each hidden size in steps of 8). On 3.9 and later that
    backward takes the step path, which reads the same saved tensors (the two backward paths
    agree to an ulp), until a Triton release is checked to compile it. The CPU interpreter
    compiles nothing, so there it runs as asked."""
    return (mode == "LSTM" and dtype == torch.float32 and precision == "ieee" and not proj
            and _pow2(hidden_size) == 64 and _triton_version() >= (3, 9) and _llvm_compiles())


def step_fwd_block_k(mode: str, dtype: torch.dtype, precision: str, has_lengths: bool,
                     block_b: int, k: int) -> int:
    """BLOCK_K of the step forward kernel for a K (the recurrent input's width) of ``k``.

    ``STEP_BLOCK_K`` (less where K's power of two is), except for one variant on Triton 3.9
    and later: LSTM, fp32 operands on TF32 dots, lengths, 32-row batch tiles. There 3.9.0
    spills 88 bytes of registers a thread at 32 (``compile_check`` for sm_90 on the CPU; 3.6
    and 3.8 spill 16, inside the limit) and none at 16, which it then takes: the same sums in
    a different order. Elsewhere, and on earlier Triton, the slices stay as measured. (TF32
    dots are compiled ones: under the interpreter the precision is always "ieee".)"""
    block_k = min(STEP_BLOCK_K, _pow2(k))
    if (mode == "LSTM" and dtype == torch.float32 and precision == "tf32" and has_lengths
            and block_b == 32 and _triton_version() >= (3, 9)):
        return min(block_k, 16)
    return block_k


def _llvm_compiles() -> bool:
    """Whether the kernels go through Triton's compiler (not under the CPU interpreter)."""
    return not interpreting()


def _step_grid(B: int, H: int) -> tuple[tuple[int, int], int, int]:
    block_b = 16 if B <= 16 else 32
    block_h = min(STEP_BLOCK_H, _pow2(H))
    return (triton.cdiv(B, block_b), triton.cdiv(H, block_h)), block_b, block_h


def _shift_prev(states: Tensor, init: Tensor, reverse: bool) -> Tensor:
    """The state before each step: (T, B, N) from states after each step and the initial one."""
    if states.shape[0] == 0:
        return states
    init = init.to(states.dtype)[None]
    if reverse:
        return torch.cat([states[1:], init])
    return torch.cat([init, states[:-1]])


def _empty0(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Stand-in for an absent output (custom ops return Tensors, not None)."""
    return torch.zeros(0, dtype=dtype or like.dtype, device=like.device)


# --------------------------------------------------------------------------- forward
def _on_tensor_device(launcher):
    """Runs ``launcher(mode, x, ...)`` with x's CUDA device current. Triton launches on the
    current device and its current stream, not on the tensors' device (and torch.library adds no
    device guard): with tensors on cuda:1 while cuda:0 is current, the kernels would run on the
    wrong GPU with the other GPU's pointers, unordered against the GEMMs on cuda:1's stream."""

    @functools.wraps(launcher)
    def launch_on_device(mode, x, *args, **kwargs):
        if x.device.type != "cuda":
            return launcher(mode, x, *args, **kwargs)
        with torch.cuda.device(x.device):
            return launcher(mode, x, *args, **kwargs)

    return launch_on_device


@_on_tensor_device
def layer_forward(
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
    path: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer, one direction.

    x: (T, B, I); h0: (B, P); c0: (B, H) (LSTM) or None; w_ih: (G*H, I); w_hh: (G*H, P);
    b_ih, b_hh: (G*H,) or None; w_hr: (P, H) or None; lengths: (B,) or None.
    Returns y: (T, B, P), h_n: (B, P), c_n: (B, H) (empty for non-LSTM) in x's dtype, and the
    saved tensors (empty unless ``save``): gates (T, B, G*H) fp32 activations and state
    (T, B, H) fp32 (LSTM c_t, GRU W_hn h_{t-1} + b_hn, empty for RNN).
    """
    dtype, dev = x.dtype, x.device
    T, B, _ = x.shape
    G = GATES[mode]
    H = w_hh.shape[0] // G
    P = w_hh.shape[1]
    is_lstm = mode == "LSTM"
    proj = w_hr is not None
    requested, path = path, choose_path(mode, H, P if proj else 0, path)
    interp = interpreting()
    prec = _fp32_dot_precision()

    h0 = h0.to(dtype).contiguous()
    w_hh = w_hh.to(dtype).contiguous()
    b_hh = None if b_hh is None else b_hh.float().contiguous()
    w_hr = None if w_hr is None else w_hr.to(dtype).contiguous()
    lengths = None if lengths is None else lengths.to(dev).contiguous()
    with _gemm_tf32(dtype):  # (T, B, G*H) fp32, fresh: the kernels overwrite it with gates
        gx = F.linear(x.float(), w_ih.float(), None if b_ih is None else b_ih.float())
    gx = gx.contiguous()
    c = c0.float().clone().contiguous() if is_lstm else None  # clone: updated in place
    y = torch.empty((T, B, P), dtype=dtype, device=dev)
    keeps_state = save and mode in ("LSTM", "GRU")
    state = torch.empty((T, B, H), dtype=torch.float32, device=dev) if keeps_state else None
    dummy = gx
    common = dict(MODE=MODE_ID[mode], HAS_BHH=b_hh is not None, HAS_LEN=lengths is not None,
                  HAS_PROJ=proj, SAVE=save, INTERPRET=interp, PRECISION=prec)

    if path == "persistent":
        block_b = 16
        h_n = torch.empty((B, P), dtype=dtype, device=dev)
        c_n = torch.empty((B, H), dtype=torch.float32, device=dev) if is_lstm else None
        try:  # refused before it runs, if at all: gx and c are still untouched
            with _one_at_a_time(interp):
                kernels._persistent_fwd_kernel[(triton.cdiv(B, block_b),)](
                    gx, h0, dummy if c is None else c, w_hh, dummy if b_hh is None else b_hh,
                    dummy if w_hr is None else w_hr, dummy if lengths is None else lengths,
                    y, h_n, dummy if c_n is None else c_n, dummy if state is None else state,
                    T, B, H, P, REVERSE=reverse, BLOCK_B=block_b, BLOCK_H=_pow2(H),
                    BLOCK_P=_persistent_block_p(P, proj), num_warps=8, **common,
                )
        except OutOfResources as err:
            _persistent_refused("the persistent forward kernel", requested, err)
            path = "step"
    if path == "step":
        grid, block_b, block_h = _step_grid(B, H)
        w_hr_f = None if w_hr is None else w_hr.float()
        m = torch.empty((B, H), dtype=torch.float32, device=dev) if proj else None
        bufs = [torch.empty((B, P), dtype=dtype, device=dev) for _ in range(2)]
        h_in = h0
        for s in range(T):
            t = T - 1 - s if reverse else s
            h_out = bufs[s % 2]
            with _one_at_a_time(interp):
                kernels._step_fwd_kernel[grid](
                    gx[t], h_in, dummy if c is None else c, w_hh, dummy if b_hh is None else b_hh,
                    dummy if lengths is None else lengths, t, h_out, m if proj else y[t],
                    dummy if state is None else state[t], B, H, P,
                    BLOCK_B=block_b, BLOCK_H=block_h,
                    BLOCK_K=step_fwd_block_k(mode, dtype, prec, lengths is not None, block_b, P),
                    num_warps=8, **common,
                )
            if proj:
                # h_t needs every hidden unit of m_t: one small GEMM per step in torch.
                with _gemm_tf32(torch.float32):
                    h_new = (m @ w_hr_f.t()).to(dtype)
                if lengths is not None:
                    active = (t < lengths)[:, None]
                    y[t] = torch.where(active, h_new, torch.zeros_like(h_new))
                    h_out.copy_(torch.where(active, h_new, h_in))
                else:
                    y[t] = h_new
                    h_out.copy_(h_new)
            h_in = h_out
        h_n = h_in.clone() if T == 0 else h_in
        c_n = c
    c_out = c_n.to(dtype) if is_lstm else _empty0(x)
    gates = gx if save else _empty0(x, torch.float32)
    return y, h_n, c_out, gates, _empty0(x, torch.float32) if state is None else state


# --------------------------------------------------------------------------- backward
@_on_tensor_device
def layer_backward(
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
    path: str = "auto",
) -> tuple[Tensor, ...]:
    """Gradients of :func:`layer_forward` (which must have run with ``save=True``).

    y, gates, state: the forward's outputs; dy: (T, B, P), dh_n: (B, P), dc_n: (B, H) or None
    (None = zero). Returns (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr), each in the dtype
    of its input; absent inputs get an empty tensor.
    """
    dtype, dev = x.dtype, x.device
    T, B, I = x.shape
    G = GATES[mode]
    H = w_hh.shape[0] // G
    P = w_hh.shape[1]
    is_lstm, is_gru = mode == "LSTM", mode == "GRU"
    proj = w_hr is not None
    requested, path = path, choose_path(mode, H, P if proj else 0, path)
    interp = interpreting()
    prec = _fp32_dot_precision()
    if path == "persistent" and backward_aborts_compiler(mode, dtype, prec, H, proj):
        if requested != "auto":
            raise RuntimeError(
                f"Triton {triton.__version__} aborts the process compiling the persistent LSTM "
                f"backward kernel with fp32 IEEE dots at hidden_size {H} (an LLVM assertion); "
                f"use path='auto' or 'step', TF32, or Triton 3.6-3.8")
        path = "step"
    if gates.numel() != T * B * G * H:
        raise RuntimeError("fused_rnn triton backward: the forward did not save its gates")
    # The kernels index the saved activations row-major: the forward's are, and a caller's
    # strided or expanded ones (the ops called directly) are copied.
    gates, state = gates.contiguous(), state.contiguous()

    w_hh_s = w_hh.to(dtype).contiguous()
    w_hr_s = None if w_hr is None else w_hr.to(dtype).contiguous()
    lengths = None if lengths is None else lengths.to(dev).contiguous()
    dy = torch.zeros((T, B, P), dtype=torch.float32, device=dev) if dy is None else dy.contiguous()
    # Fresh row-major copies: the kernels update them in place, and an incoming gradient may be
    # strided (the gradient of h.t() arrives transposed; clone() would keep its strides).
    rows, f32 = torch.contiguous_format, torch.float32
    dh = (torch.zeros((B, P), dtype=f32, device=dev) if dh_n is None
          else dh_n.float().clone(memory_format=rows))
    dc = None
    if is_lstm:
        dc = (torch.zeros((B, H), dtype=f32, device=dev) if dc_n is None or dc_n.numel() == 0
              else dc_n.float().clone(memory_format=rows))
    hprev = previous_hidden(y, h0.to(dtype), lengths, reverse).contiguous()
    cprev = _shift_prev(state, c0.float(), reverse).contiguous() if is_lstm else None
    dg = torch.empty((T, B, G * H), dtype=torch.float32, device=dev)
    dghn = torch.empty((T, B, H), dtype=torch.float32, device=dev) if is_gru else None
    dhnew = torch.empty((T, B, P), dtype=torch.float32, device=dev) if proj else None
    dummy = dg

    if path == "persistent":
        block_b = 16
        dh0 = torch.empty((B, P), dtype=torch.float32, device=dev)
        dc0 = torch.empty((B, H), dtype=torch.float32, device=dev) if is_lstm else None
        try:  # refused before it runs, if at all: the carries dh and dc are still untouched
            with _one_at_a_time(interp):
                kernels._persistent_bwd_kernel[(triton.cdiv(B, block_b),)](
                    gates, state if state.numel() else dummy, dummy if cprev is None else cprev,
                    hprev, dy, dh, dummy if dc is None else dc, w_hh_s,
                    dummy if w_hr_s is None else w_hr_s, dummy if lengths is None else lengths, dg,
                    dummy if dghn is None else dghn, dummy if dhnew is None else dhnew, dh0,
                    dummy if dc0 is None else dc0, T, B, H, P, MODE=MODE_ID[mode], HAS_PROJ=proj,
                    HAS_LEN=lengths is not None, REVERSE=reverse, BLOCK_B=block_b,
                    BLOCK_H=_pow2(H), BLOCK_P=_persistent_block_p(P, proj), INTERPRET=interp,
                    PRECISION=prec, num_warps=8,
                )
        except OutOfResources as err:
            _persistent_refused("the persistent backward kernel", requested, err)
            path = "step"
    if path == "step":
        grid, block_b, block_h = _step_grid(B, H)
        w_hh_f = w_hh_s.float()
        w_hr_f = None if w_hr_s is None else w_hr_s.float()
        dm = torch.empty((B, H), dtype=torch.float32, device=dev) if proj else None
        t_next = None  # the step processed just before, i.e. the next one in time
        for s in range(T):
            t = s if reverse else T - 1 - s
            if proj:
                # dm_t = (dh_t + dy_t) W_hr needs all of dh_t: two small GEMMs per step in torch.
                if t_next is not None:
                    dh = dh + _rec_grad(dg[t_next], None, w_hh_f, mode, dtype)
                dh_new = dh + dy[t].float()
                if lengths is not None:
                    active = (t < lengths)[:, None]
                    dhnew[t] = torch.where(active, dh_new, torch.zeros_like(dh_new))
                    dh = torch.where(active, torch.zeros_like(dh), dh)
                else:
                    dhnew[t] = dh_new
                    dh = torch.zeros_like(dh)
                with _gemm_tf32(torch.float32):
                    torch.mm(dh_new, w_hr_f, out=dm)
            with _one_at_a_time(interp):
                kernels._step_bwd_kernel[grid](
                    dummy if t_next is None else dg[t_next],
                    dummy if (t_next is None or dghn is None) else dghn[t_next],
                    0 if t_next is None else 1, dh, dy[t], dummy if dm is None else dm,
                    gates[t], state[t] if state.numel() else dummy,
                    dummy if cprev is None else cprev[t], hprev[t], dummy if dc is None else dc,
                    w_hh_s, dummy if lengths is None else lengths, t, dg[t],
                    dummy if dghn is None else dghn[t], B, H,
                    MODE=MODE_ID[mode], HAS_LEN=lengths is not None, FUSE=not proj,
                    BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=min(STEP_BLOCK_K, _pow2(H)),
                    INTERPRET=interp, PRECISION=prec, num_warps=8,
                )
            t_next = t
        # dh_0: what the first step in time sends back through W_hh, plus the carry.
        if t_next is not None:
            dh = dh + _rec_grad(dg[t_next], None if dghn is None else dghn[t_next], w_hh_f, mode, dtype)
        dh0, dc0 = dh, dc

    # Time-parallel part: every step's dgates at once, rounded to the storage dtype first (the
    # contract, reference.py: they are a matmul operand wherever they are used), so 16-bit data
    # multiplies 16-bit operands (common.mm_f32), with fp32 sums.
    # GRU's n gate: its rows of dW_hh and db_hh come from dghn, the r and z rows from dg,
    # without copying both into one (T, B, 3H) tensor.
    dg2 = dg.view(T * B, G * H).to(dtype)
    dghn2 = dghn.view(T * B, H).to(dtype) if is_gru else None
    hprev2 = hprev.view(T * B, P)
    with _gemm_tf32(dtype):
        dx = mm_f32(dg2, w_ih, f32).view(T, B, I)
        dw_ih = mm_f32(dg2.t(), x.reshape(T * B, I), f32)
        if dghn2 is None:
            dw_hh = mm_f32(dg2.t(), hprev2, f32)
        else:
            dw_hh = torch.cat([mm_f32(dg2[:, : 2 * H].t(), hprev2, f32),
                               mm_f32(dghn2.t(), hprev2, f32)])
        if proj:
            # m_t = o_t * tanh(c_t), recomputed time-parallel from what the forward saved.
            m = gates[..., 3 * H:] * torch.tanh(state)
            if lengths is not None:
                # Padding steps' gates are not the forward's (it skipped them) and may be NaN
                # (a zero input times an inf weight); their dh is 0, and 0 * NaN would reach
                # dW_hr. Their m is zero instead, as torch.nn, which skips them, has it.
                steps = torch.arange(T, device=dev)[:, None]
                valid = (steps < lengths.to(dev)[None, :]).unsqueeze(-1)
                m = torch.where(valid, m, m.new_zeros(()))
    if proj:
        # fp32 values on both sides (not 16-bit ones, which TF32 holds exactly): cuDNN's RNN
        # setting, as the projection's other fp32 products.
        with _gemm_tf32(torch.float32):
            dw_hr = dhnew.view(T * B, P).t() @ m.view(T * B, H)
    db_ih = dg2.sum(0, dtype=f32)  # one read of dg for both bias gradients
    db_hh = (db_ih.clone() if dghn2 is None
             else torch.cat([db_ih[: 2 * H], dghn2.sum(0, dtype=f32)]))

    def out(grad, like):
        return _empty0(x) if like is None else grad.to(like.dtype)

    return (
        dx.to(x.dtype),
        dh0.to(h0.dtype),
        out(dc0, c0 if is_lstm else None),
        dw_ih.to(w_ih.dtype),
        dw_hh.to(w_hh.dtype),
        out(db_ih, b_ih),
        out(db_hh, b_hh),
        out(dw_hr if proj else None, w_hr),
    )


def _rec_grad(dg_t: Tensor, dghn_t: Tensor | None, w_hh_f: Tensor, mode: str, dtype) -> Tensor:
    """dG_hh @ W_hh for one step (B, P) with the kernels' rounding (dgates to the storage dtype)."""
    if dghn_t is not None:  # GRU: the hh side of the n gate differs
        H = dghn_t.shape[1]
        dg_t = torch.cat([dg_t[:, : 2 * H], dghn_t], dim=1)
    with _gemm_tf32(dtype):  # both operands hold ``dtype`` values: exact in TF32 for fp16/bf16
        return dg_t.to(dtype).float() @ w_hh_f
