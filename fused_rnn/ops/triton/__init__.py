"""Triton backend: fused recurrent kernels behind the interface of :mod:`fused_rnn.ops.reference`.

=================== ==========================================================================
``kernels``          the ``@triton.jit`` kernels (fused step fwd/bwd, persistent chunk fwd/bwd)
``launch``           launchers: input projection GEMM, path choice, weight-gradient GEMMs
``ops``              ``torch.library`` custom ops (fake, autograd, autocast) over ``launch``
this module          what :mod:`fused_rnn.backends` asks for: ``unavailable_reason``,
                     ``unsupported_reason``, ``rnn_layer``, ``rnn_cell``
=================== ==========================================================================

Runs on a CUDA GPU, or on the CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` was
set before the kernels were defined (slow: for tests). Importing this module never fails when
triton is missing: ``unavailable_reason`` says so instead, and the kernel modules are imported
on first use.

Examples::

    >>> import torch, fused_rnn
    >>> lstm = fused_rnn.LSTM(8, 16, backend="triton")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import Tensor

from fused_rnn.ops.common import needs_grad
from fused_rnn.ops.reference import GATES

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device | None) -> str | None:
    """None when the Triton kernels can run on ``device`` (None: on this machine at all)."""
    return _unavailable_reason(None if device is None else device.type)


# Evaluated eagerly even under torch.compile (dynamo bakes the answer into the graph, guarded
# by the argument): the checks below touch importlib and sys.modules, which dynamo cannot trace.
@torch.compiler.assume_constant_result
def _unavailable_reason(device_type: str | None) -> str | None:
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] has no __spec__
        found = False
    if not found:
        return ("triton is not installed (pip install triton; it needs a CUDA GPU, or "
                "TRITON_INTERPRET=1 to run slowly on the CPU for tests)")
    interp = _interpreter_on()
    if device_type is None:
        if not (torch.cuda.is_available() or interp):
            return ("no CUDA GPU is visible; on the CPU the Triton kernels only run under the "
                    "interpreter: set TRITON_INTERPRET=1 before importing triton (slow, for tests)")
    elif device_type == "cuda":
        if not (interp or torch.cuda.is_available()):
            return "CUDA is not available to torch on this machine (need a CUDA GPU)"
    elif device_type == "cpu":
        if not interp:
            return ("Triton kernels need a CUDA GPU; to run them on the CPU (slowly, for tests) "
                    "set TRITON_INTERPRET=1 before triton is imported")
    else:
        return (f"Triton kernels run on CUDA devices (or the CPU under TRITON_INTERPRET=1), "
                f"not on {device_type}")
    # Usable: define the kernels and register the ops now, in eager Python, so that a traced
    # call finds them already imported.
    _load_ops()
    return None


def _interpreter_on() -> bool:
    """Whether our kernels are (or, once imported, will be) interpreted on the CPU.

    Triton decides at decoration time (``@triton.jit`` reads TRITON_INTERPRET), so once our
    kernel module is loaded (by whatever import) its functions are the truth; before that,
    the environment is. Another thread's import puts the module in ``sys.modules`` before its
    body has run: until ``interpreting`` is defined there (after the kernels' import), the
    environment answers.
    """
    interpreting = getattr(sys.modules.get("fused_rnn.ops.triton.launch"), "interpreting", None)
    if interpreting is not None:
        return interpreting()
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_ops():
    # The ops are registered when fused_rnn is imported; the kernels are defined here, at the
    # first check that finds them usable (or at an op's first call, for a loaded program).
    # Python's import lock makes a second thread wait here for the first one's import.
    from fused_rnn.ops.triton import launch, ops  # noqa: F401

    return ops


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
    """None if the kernels take this configuration, else why not (backends.py falls back)."""
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} (the kernels take float32, float16 and bfloat16)"
    if kind not in ("layer", "cell"):
        return f"unknown kind {kind!r}"
    if proj_size and mode != "LSTM":
        return "a projection (proj_size) exists only for LSTM"
    if hidden_size == 0 or input_size == 0:  # torch.nn's cells allow it
        return "a size of 0 (input_size or hidden_size): nothing for a kernel to compute"
    return offsets_reason(mode, hidden_size, proj_size)


def offsets_reason(mode: str, hidden_size: int, proj_size: int) -> str | None:
    """None if the kernels' int32 weight offsets reach every weight they index, else why not.
    They index W_hh, (G*H, P) with G gates and P = proj_size or H (an LSTM may project wider
    than its cells), and W_hr, (P, H), which is smaller; W_ih only meets torch's GEMM, and
    batch-row offsets are int64. The registered ops check it too (a direct call)."""
    P = proj_size or hidden_size
    if GATES[mode] * hidden_size * max(hidden_size, P) >= 2**31:
        what = f"hidden_size {hidden_size}" + (f" and proj_size {proj_size}" if proj_size else "")
        return (f"{mode} with {what} is too large for the kernels' int32 weight offsets "
                f"(W_hh's {GATES[mode]} * hidden_size * max(hidden_size, proj_size) elements "
                "reach 2**31)")
    return None


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

    x: (T, B, I); h0: (B, P); c0: (B, H) for LSTM else None; w_ih: (G*H, I); w_hh: (G*H, P);
    b_ih, b_hh: (G*H,) or None; w_hr: (P, H) or None; lengths: (B,) or None.
    Returns y: (T, B, P), h_n: (B, P), c_n: (B, H) or None, in x's dtype.
    """
    ops = _load_ops()
    save = needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    y, h_n, c_n, _, _ = ops.triton_layer(
        mode, x, h0, c0 if mode == "LSTM" else None, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
        reverse, save, "auto",
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
    """One fused step; same contract as ``reference.rnn_cell``. x: (B, I); h, c: (B, H)."""
    ops = _load_ops()
    save = needs_grad(x, h, c, w_ih, w_hh, b_ih, b_hh)
    h1, c1, _, _ = ops.triton_cell(
        mode, x, h, c if mode == "LSTM" else None, w_ih, w_hh, b_ih, b_hh, save
    )
    return h1, (c1 if mode == "LSTM" else None)
