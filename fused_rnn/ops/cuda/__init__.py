"""CUDA backend: persistent cooperative kernels from ``csrc/`` behind the interface of
:mod:`fused_rnn.ops.reference`.

=================== ==========================================================================
``csrc/``            the kernels (``rnn_forward.cu``, ``rnn_backward.cu``; CUDA headers only),
                     the launch plan (``plan.h``) and the one torch binding (``binding.cpp``)
``_ext``             finding/JIT-building/loading the compiled extension, and why it cannot be
``plan``             the launch plan in Python (size limits, checked against ``plan.h``)
``ops``              ``torch.library`` custom ops (fake, autograd, autocast) over the extension
this module          what :mod:`fused_rnn.backends` asks for: ``unavailable_reason``,
                     ``unsupported_reason``, ``rnn_layer``, ``rnn_cell``
=================== ==========================================================================

Kernel design: one cooperative launch per chunk and direction; block b owns hidden units
[b*U, (b+1)*U) with all their gates, keeps their slice of W_hh in shared memory for the whole
chunk, and exchanges h_t through a double-buffered global (L2) buffer with one ``grid.sync()``
per step. At larger batch the grid is split into batch groups when shared memory allows (each
block then holds a larger W_hh slice and reads only its group's rows of the exchange buffer;
``FUSED_RNN_CUDA_MAX_GROUPS``, default 8, 1 turns it off), but never at the cost of the stage
below: fewer groups run where the most would leave it no room. Where shared memory leaves no room
for groups, K parts cut the same reads: teams of 2-8 blocks share one slice of units, each
multiplying 1/P of the exchange buffer's columns, and add their fp32 partial sums after one more
grid sync per step (``FUSED_RNN_CUDA_K_PARTS``: ``auto`` by a byte model in ``plan.h``, or a
count; 1 turns it off). Each batch chunk of h is staged into shared memory by the whole block
before the MMAs read it (``FUSED_RNN_CUDA_STAGE_K``: ``auto``, ``0`` off, or K columns per
slice; ``FUSED_RNN_CUDA_STAGE_COPY`` says how: ``auto``, the default, is ``pipelined`` but
where a measured rule, ``ops.STAGE_COPY_RULES`` (none yet), says ``tagged``: 16-bit h and
dgates as words tagged with their step, which the copy polls, so no ``grid.sync()`` ends a
step). ``FUSED_RNN_CUDA_MAX_BLOCKS`` caps the grid (default ``auto``: up to one block per SM;
fewer, fatter blocks trade a cheaper grid sync for more matmul per block; a cap the W_hh slices
do not fit under is raised to the fewest blocks that fit). ``FUSED_RNN_CUDA_CLUSTER`` (``off``,
or 1..16 on sm_90) runs each batch group that fits on that many blocks as a thread-block
cluster whose steps end at the cluster barrier instead of ``grid.sync()``;
``FUSED_RNN_CUDA_TEAM_CLUSTERS=on`` makes each K-parts team a cluster, whose barrier then
replaces the parts' second ``grid.sync()`` of a step. bf16/fp16 use
tensor cores (WMMA) with fp32 accumulation; fp32 uses TF32 tensor cores only when
cuDNN's RNNs may (``torch.backends.cudnn.allow_tf32``, or ``cudnn.rnn.fp32_precision``; as
nn.LSTM does) and the TF32 plan fits (``plan.h`` choose_math), else plain fp32 FMA. The
time-parallel GEMMs of 16-bit layers take their 16-bit operands, with fp32 results
(``FUSED_RNN_CUDA_GEMMS``: ``auto``, or ``fp32`` to promote them first). The LSTM cell state
and every activation saved for backward are fp32; the dgates backward hands the GEMMs are in
the storage dtype (the reference's contract). Size limits (largest H that fits on
chip, H100 / A100): ``fused_rnn.ops.cuda.plan``. ``FUSED_RNN_CUDA_PATH=step`` runs the
recurrence without the persistent launch: a cuBLAS GEMM (through torch) and one plain launch of
the same cell code a step, with no size limit from shared memory; ``auto`` (the default) runs
it where a measured rule says (``ops.PATH_RULES``, none yet). Not supported (falls back to
Triton): LSTM projections (``proj_size > 0``), float64. A GPU older than sm_80 (or one the build
holds no code for) makes the backend unavailable there: :func:`unavailable_reason` says why, and
a module's call raises it (``fused_rnn.functional`` falls back instead).

Importing this module never needs a GPU, nvcc or the compiled extension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_rnn.ops.common import cudnn_rnn_tf32, needs_grad
from fused_rnn.ops.cuda import _ext, plan
from fused_rnn.ops.reference import MODES

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device | None) -> str | None:
    """None when the CUDA kernels can run on ``device`` (None: on this machine), else why not.

    The first call on a GPU machine loads the prebuilt extension or JIT-builds it."""
    return _ext.unavailable_reason(device)


def _device_limits(device: torch.device) -> tuple[int, int, bool]:
    """(SM count, opt-in shared memory per block, whether it takes cooperative launches) of
    ``device``, from the extension."""
    index = torch.cuda.current_device() if device.index is None else device.index
    sms, smem_optin, _, _, cooperative = _ext.extension().device_info(index)
    return int(sms), int(smem_optin), bool(cooperative)


def unsupported_reason(
    kind: str,
    *,
    mode: str,
    device: torch.device,
    dtype: torch.dtype,
    input_size: int,
    hidden_size: int,
    proj_size: int,
    has_lengths: bool,
) -> str | None:
    """None if the CUDA kernels take this configuration, else why not (backends.py falls back).

    ``kind`` "cell" runs as a one-step chunk of the layer kernels, so it has the same limits.
    ``input_size`` and ``has_lengths`` never limit: the input projection is a torch GEMM and
    packed lengths are handled in the kernels.
    """
    if kind not in ("layer", "cell"):
        return f"unknown kind {kind!r}"
    if mode not in MODES:
        return f"unknown mode {mode!r}"
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} (the CUDA kernels take float32, float16 and bfloat16)"
    if proj_size:
        return "LSTM projections (proj_size > 0) are not implemented by the CUDA kernels"
    if hidden_size == 0 or input_size == 0:  # torch.nn's cells allow it
        return "a size of 0 (input_size or hidden_size): nothing for a kernel to compute"
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA devices, not {device.type}"
    return _device_reason(mode, device.index, dtype != torch.float32, cudnn_rnn_tf32(),
                          hidden_size)


# Evaluated eagerly even under torch.compile (dynamo bakes the answer into the graph): the
# first call loads the extension under a threading lock and every call asks it for the
# device's limits through pybind11, neither of which dynamo can trace (on an H200,
# torch.compile(fullgraph=True) of a model on this backend failed at the lock).
@torch.compiler.assume_constant_result
def _device_reason(mode: str, index: int | None, half: bool, tf32: bool,
                   hidden_size: int) -> str | None:
    """Why CUDA device ``index`` (None: the current one) cannot run ``mode`` at
    ``hidden_size`` (the extension cannot load or run there, or the plan does not fit), or
    None. ``FUSED_RNN_CUDA_PATH=step`` keeps nothing on chip, so any size fits it; under
    ``auto`` the plan must fit, as a path rule's sizes are ones the persistent kernel ran."""
    from fused_rnn.ops.cuda.ops import cuda_path_setting

    device = torch.device("cuda", index) if index is not None else torch.device("cuda")
    reason = unavailable_reason(device)
    if reason is not None or cuda_path_setting() == "step":
        return reason
    sms, smem_optin, cooperative = _device_limits(device)
    if not cooperative:  # the persistent kernel's grid barrier needs one (binding.cpp checks)
        return (f"CUDA device {device.index if device.index is not None else 'current'} does "
                "not support cooperative launches (cudaDevAttrCooperativeLaunch is 0), which "
                "the persistent kernels need; FUSED_RNN_CUDA_PATH=step runs without them")
    return plan.fits(plan.CELLS[mode], half, tf32, hidden_size, sms, smem_optin)


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
    """One layer, one direction over a chunk; same contract as ``reference.rnn_layer``.

    x: (T, B, I); h0: (B, H); c0: (B, H) for LSTM else None; w_ih: (G*H, I); w_hh: (G*H, H);
    b_ih, b_hh: (G*H,) or None; w_hr must be None (no projections); lengths: (B,) or None.
    Returns y: (T, B, H), h_n: (B, H), c_n: (B, H) or None, in x's dtype.

    fp32 matmuls use TF32 only when cuDNN's RNNs may (``common.cudnn_rnn_tf32``): the GEMMs
    always then, the recurrence where its TF32 plan fits (``plan.h`` choose_math).
    """
    from fused_rnn.ops.cuda import ops

    if w_hr is not None:
        raise ValueError("the CUDA backend has no LSTM projection (w_hr); use backend='triton'")
    save = needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    y, h_n, c_n, _, _ = ops.cuda_layer(
        mode, x, h0, c0 if mode == "LSTM" else None, w_ih, w_hh, b_ih, b_hh, lengths, reverse,
        save, cudnn_rnn_tf32(),
    )
    return y, h_n, (c_n if mode == "LSTM" else None)


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
    """One step; same contract as ``reference.rnn_cell``. x: (B, I); h, c: (B, H).

    A one-step chunk of the layer's kernels: one cooperative launch of the persistent kernel
    (which loads W_hh on chip for that one step), or the per-step path's GEMM and launch where
    ``FUSED_RNN_CUDA_PATH`` says so. For token-by-token generation the Triton backend's fused
    step kernel is the lighter tool."""
    _, h1, c1 = rnn_layer(mode, x[None], h, c, w_ih, w_hh, b_ih, b_hh)
    return h1, c1
