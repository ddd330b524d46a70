"""Pieces shared by the registered ops (Triton, CUDA, and aten's CPU LSTM in ``aten_cpu``).

Only backend-independent glue lives here: when to save for backward, placeholder gradients for
absent inputs, rebuilding h_{t-1} from the outputs, the autocast rule, the refusal of double
backward, and when fp32 may use TF32 (in the kernels and in the time-parallel GEMMs).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
import weakref

import torch
from torch import Tensor


def cudnn_rnn_tf32() -> bool:
    """Whether cuDNN's RNNs may use TF32 for fp32 data now, i.e. what nn.LSTM does on a GPU.

    torch >= 2.9 sets TF32 per operator (``torch.backends.cudnn.rnn.fp32_precision``, whose
    getter resolves an inherited "none"; read through :func:`cudnn_rnn_setting`); the legacy
    ``torch.backends.cudnn.allow_tf32`` that maps onto it raises once conv and RNN precision
    differ, so it is read only on a torch without the new setting. dynamo traces both reads
    (and guards on them) from torch 2.11."""
    if _PRECISION_UNTRACEABLE and torch.compiler.is_compiling():
        return _rnn_precision_at_trace() == "tf32"
    precision = getattr(cudnn_rnn_setting(), "fp32_precision", None)
    if precision is None:
        return bool(torch.backends.cudnn.allow_tf32)
    return precision == "tf32"


def cudnn_rnn_setting() -> object | None:
    """The object whose ``fp32_precision`` is cuDNN's RNN precision (None, or an object without
    it, on a torch before 2.9).

    That is ``torch.backends.cudnn.rnn``, except on torch 2.9 and 2.10, where the setting is a
    class attribute of ``torch.backends.cudnn`` named like its submodule
    ``torch.backends.cudnn.rnn``: once that submodule is imported (nn.RNNBase.flatten_parameters
    imports it on a GPU, and so does ``modules.py``), the module shadows the setting on the
    instance. A read there found no ``fp32_precision`` (or a value written onto the module,
    which cuDNN never sees), so the setting is taken from the class. From torch 2.11 the
    submodule itself carries it."""
    cudnn = torch.backends.cudnn
    setting = getattr(type(cudnn), "rnn", None)
    return setting if setting is not None else getattr(cudnn, "rnn", None)


# torch 2.9 and 2.10 have the per-operator settings, but their dynamo refuses to trace the
# read (``_FP32Precision.__getattr__`` is on its skip list), which failed every
# fullgraph=True compile reaching a kernel backend. There the setting is read once, when the
# graph is traced: a graph compiled before the setting changes keeps the precision it was
# compiled with (torch.compiler.reset() recompiles). torch 2.11 traces it and guards on it.
_PRECISION_UNTRACEABLE = (2, 9) <= torch.torch_version.TorchVersion(torch.__version__) < (2, 11)


@torch._dynamo.assume_constant_result
def _rnn_precision_at_trace() -> str:
    return cudnn_rnn_setting().fp32_precision


def gemm_fp32_precision() -> str:
    """The precision cuBLAS runs fp32 GEMMs in now, by torch's per-operator name
    (``torch.backends.cuda.matmul.fp32_precision``, torch >= 2.9), or ``"tf32"``/``"ieee"``
    from the legacy ``allow_tf32`` before it: what :func:`tf32_gemms` sets."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9
        return "tf32" if matmul.allow_tf32 else "ieee"
    return precision


def gemms_use_tf32(dtype: torch.dtype, fp32_tf32: bool) -> bool:
    """Whether a backend's time-parallel fp32 GEMMs (the input projection for all steps, dx,
    dW_ih, dW_hh) may run on TF32 tensor cores, for layer data of ``dtype``.

    fp32 data: exactly when its recurrence may (``fp32_tf32``, :func:`cudnn_rnn_tf32` at the
    call), which is what cuDNN does for the whole of nn.LSTM. fp16/bf16 data: always. Their
    operands are 16-bit values (x, the weights, h, and in backward the dgates rounded to the
    storage dtype, as the contract says), exact in TF32 (10-bit mantissa), so the products are
    the reference's fp32 ones; where torch can, :func:`mm_f32` skips the promotion altogether. Left to torch's default
    (strict fp32, CUDA cores), the four GEMMs of a 256x128x1024 LSTM layer are ~1.1 TFLOP, about
    20 ms at the H100's ~55 TFLOP/s of fp32, against cuDNN's 7.9 ms for the whole bf16 layer
    (ANCHORS.md); on TF32 tensor cores, a few ms (an estimate, not measured).
    """
    return dtype != torch.float32 or fp32_tf32


SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def check_measured_rule(kind: str, modes, dtypes, tf32: bool | None, evidence: str,
                        **ranges: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless the fields of a rule drawn from a GPU table (``kind``, with
    its article: "an AutoRule" of backends.py, "a PathRule" of the CUDA backend) make sense: its evidence named, its modes cells, its
    dtypes the three float types, a tf32 setting only with float32, each range
    ``1 <= low <= high``."""
    from fused_rnn.ops.reference import MODES

    if not evidence:
        raise ValueError(f"{kind} needs its evidence: the results file it comes from")
    if not modes or not set(modes) <= set(MODES):
        raise ValueError(f"{kind}'s modes are some of {MODES}, not {modes!r}")
    if not dtypes or not set(dtypes) <= {torch.float32, *SIXTEEN_BIT}:
        raise ValueError(f"{kind}'s dtypes are some of float32, float16 and bfloat16, "
                         f"not {dtypes!r}")
    if tf32 is not None and torch.float32 not in dtypes:
        raise ValueError(f"{kind}'s tf32 setting applies to float32, which its dtypes do "
                         "not include")
    for what, (lo, hi) in ranges.items():
        if not 1 <= lo <= hi:
            raise ValueError(f"{kind}'s {what} range must satisfy 1 <= low <= high, "
                             f"got {(lo, hi)}")
# torch.mm(a, b, out_dtype=torch.float32) on fp16/bf16 operands (aten::mm.dtype, torch >= 2.8;
# CUDA kernels only).
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def sixteen_bit_gemm(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`mm_f32` can hand ``a`` and ``b`` to cuBLAS as they are: one 16-bit dtype,
    CUDA, a torch with ``mm(..., out_dtype=)``, and K > 0 (``input_size`` 0 is promoted)."""
    return (a.dtype == b.dtype and a.dtype in SIXTEEN_BIT and a.is_cuda and _MM_OUT_DTYPE
            and a.shape[1] > 0)


mm_refused: str | None = None  # what torch.mm(..., out_dtype=) raised first, if it ever did


def mm_f32(a: Tensor, b: Tensor, cd: torch.dtype, *, sixteen_bit: bool = True) -> Tensor:
    """a @ b (2-D) in the compute dtype ``cd`` (fp32; fp64 only in the CPU emulation): the time-
    parallel GEMMs around the recurrent kernels. Two operands of one 16-bit dtype go to cuBLAS
    as they are, with an fp32 result (:func:`sixteen_bit_gemm`, unless ``sixteen_bit`` is
    False); anything else is promoted to ``cd`` first and runs under the caller's TF32 setting
    (:func:`tf32_gemms`). 16-bit values are exact in fp32 and in TF32, so both form the same
    products and sum them in fp32. Where torch refuses the 16-bit GEMM (a layout its cuBLAS call
    does not take, say), that call is promoted too, with a warning the first time."""
    global mm_refused
    if sixteen_bit and sixteen_bit_gemm(a, b):
        try:
            return torch.mm(a, b, out_dtype=cd)
        except RuntimeError as e:
            if mm_refused is None:
                mm_refused = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                warn_at_caller(
                    f"fused_rnn: torch.mm(..., out_dtype={cd}) refused {tuple(a.shape)} x "
                    f"{tuple(b.shape)} {a.dtype} operands ({mm_refused}); such GEMMs run on "
                    "operands promoted to fp32 (TF32) instead, the same products, more slowly")
    return a.to(cd) @ b.to(cd)


class ForkSafeLock:
    """A ``threading.Lock`` (or ``RLock``: ``factory``) that a forked child gets fresh.

    fork() copies a lock in the state another thread left it: held, by a thread the child does
    not have, so the child would wait on it forever (DataLoader workers forked while a thread
    of the parent was inside one). Every such lock of the package is one of these; after a
    fork the child replaces each with a new, unheld one. The parent's are untouched."""

    def __init__(self, factory=threading.Lock):
        self._factory = factory
        self._lock = factory()
        self._held = threading.local()  # per thread: the lock objects it entered, innermost last
        _FORK_SAFE_LOCKS.add(self)

    def __enter__(self):
        lock = self._lock
        lock.acquire()
        stack = getattr(self._held, "stack", None)
        if stack is None:
            stack = self._held.stack = []
        stack.append(lock)
        return self

    def __exit__(self, *exc) -> None:
        # The object entered, not the current one: a thread that forks inside the block leaves
        # it in the child after the fork renewed the lock.
        self._held.stack.pop().release()


_FORK_SAFE_LOCKS: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


def _renew_locks() -> None:
    for lock in list(_FORK_SAFE_LOCKS):
        lock._lock = lock._factory()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks)

_tf32_lock = ForkSafeLock(threading.RLock)
# The windows open now (the thread, the setting it changed, the value before), outermost first:
# they are all one thread's, since the lock admits one at a time.
_open_windows: list[tuple[int, str, object]] = []


def _close_orphaned_windows() -> None:
    """In a forked child: a window another thread had open at the fork would never close (that
    thread is not in the child), leaving its setting for good. Put back what it changed."""
    if _open_windows and _open_windows[0][0] != threading.get_ident():
        _, name, old = _open_windows[0]
        setattr(torch.backends.cuda.matmul, name, old)
        _open_windows.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_orphaned_windows)


@contextlib.contextmanager
def tf32_gemms(enabled: bool):
    """cuBLAS fp32 GEMMs on TF32 (``enabled``) or strict fp32 inside the block, then as before.

    torch has no per-call switch, so this sets the process-wide matmul precision and restores
    it on exit; it writes nothing where the setting already agrees. The GEMMs it covers run
    inside an opaque custom op, so a graph captured or compiled around the op keeps the choice
    made here. Our windows are serialized by a lock: autograd runs backward on one thread per
    GPU, and two layers' windows interleaving their saves and restores could run each other's
    GEMMs in the wrong precision and leave the process on the wrong one. Another library's
    fp32 matmuls on another thread inside a window still see the setting. Set through the
    per-operator API where torch has it (>= 2.9): reading the legacy flag raises once a user
    has set the new one.
    """
    matmul = torch.backends.cuda.matmul
    with _tf32_lock:
        if getattr(matmul, "fp32_precision", None) is None:  # torch < 2.9
            old, new = matmul.allow_tf32, bool(enabled)
            name = "allow_tf32"
        else:
            old, new = matmul.fp32_precision, "tf32" if enabled else "ieee"
            name = "fp32_precision"
        if old == new:
            yield
            return
        setattr(matmul, name, new)
        _open_windows.append((threading.get_ident(), name, old))
        try:
            yield
        finally:
            setattr(matmul, name, old)
            _open_windows.pop()


_INTERNAL_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # fused_rnn/
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,  # torch/
    os.path.abspath(contextlib.__file__),  # the frames of @contextmanager blocks
)


def warn_at_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside fused_rnn, torch and
    contextlib: the user's line that called the module or function, whatever the depth of the
    code that noticed."""
    if torch.compiler.is_compiling():  # dynamo does not trace frame walks
        warnings.warn(message, category, stacklevel=2)
        return
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level - 1 if frame is None else level)


def needs_grad(*ts: Tensor | None) -> bool:
    """Save for backward only when autograd will ask for it (inference writes no gates).

    Always under ``torch.jit.trace``: the trace records the choice as a constant, and the
    traced program may run with gradients later whatever the mode it was traced in."""
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def refuse_unsaved(op: str) -> None:
    """The backward of a call that saved nothing (``save=False``, chosen by
    :func:`needs_grad`): say how to get one that did."""
    raise RuntimeError(
        f"fused_rnn::{op} ran with save=False (no gradients were needed when it was called or "
        f"traced) and cannot be differentiated. A program made by torch.export or "
        f"torch.compile under torch.no_grad() keeps that choice: export it with gradients "
        f"enabled to train it. Called directly, pass save=True.")


def grad_like(t: Tensor | None, like: Tensor) -> Tensor:
    """A fake-kernel gradient shaped like ``t`` and contiguous, whatever ``t``'s strides (the
    backward kernels write contiguous gradients; ``empty_like`` would copy the strides of a
    ``batch_first`` input's transposed view, and torch.compile checks them against the real
    op's), or an empty (0,) stand-in for an absent ``t`` (custom ops return Tensors, not
    None)."""
    return like.new_empty((0,)) if t is None else t.new_empty(t.shape)


def previous_hidden(y: Tensor, h0: Tensor, lengths: Tensor | None, reverse: bool) -> Tensor:
    """h_{t-1} for every step t, (T, B, P), rebuilt from the outputs y (T, B, P).

    The previous step's output, or h0 where the previous step is out of range or padding
    (``t_prev >= lengths[b]``): a row's real steps are contiguous in processing order, so the
    step before a real one was either real or the row had not started (the reverse direction
    of a packed row starts from h0 at its own last step). At padding steps (``t >=
    lengths[b]``) it is zero: their dgates are zero, but dW_hh = dgates^T h_prev would add
    0 * inf = NaN for a row whose carried state holds an inf (torch.nn skips those steps).
    """
    T = y.shape[0]
    h0e = h0.to(y.dtype)[None]
    if T == 0:
        return y
    shifted = torch.cat([y[1:], h0e]) if reverse else torch.cat([h0e, y[:-1]])
    if lengths is None:
        return shifted
    t = torch.arange(T, device=y.device)
    tp = t + 1 if reverse else t - 1
    valid = (tp >= 0) & (tp < T)
    lengths = lengths.to(y.device)[None, :]
    valid = valid[:, None] & (tp[:, None] < lengths)
    real = t[:, None] < lengths
    return torch.where(real[..., None], torch.where(valid[..., None], shifted, h0e), 0)


def autocast_eligible(t) -> bool:
    """Whether autocast casts ``t``: a floating tensor other than fp64 (torch's own rule; fp64
    and complex tensors keep their dtype in an autocast region)."""
    return isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64


@torch.compiler.assume_constant_result
def autocast_available(device_type: str) -> bool:
    """Whether autocast has a key for this device type (meta and lazy have none: asking them
    whether autocast is enabled raises). A constant to dynamo: torch 2.11's cannot trace the
    C function behind it, and fullgraph compiles would fail on it."""
    return torch.amp.is_autocast_available(device_type)


def autocast_off(device: torch.device):
    """A region with autocast off on ``device``'s type (nothing to do where it has none)."""
    if autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def register_autocast(op, device_type: str) -> None:
    """Autocast: floating inputs on ``device_type`` are cast to the *current* autocast dtype
    (fp16 or bf16, whichever the region asked for), then the op runs with autocast off.
    (``torch.library.register_autocast`` fixes one dtype at registration; torch's own rule for
    cuDNN RNNs fixes fp16 even in a bf16 region, which we do not copy: modules.py.)"""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(a):
            if autocast_eligible(a) and a.device.type == device_type:
                return a.to(dtype)
            return a

        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op._opoverload(*(cast(a) for a in args))

    op._lib.impl(op._name, kernel, key, with_keyset=True)


def register_autocast_off(op, device_type: str) -> None:
    """Autocast for a backward op: its inputs as they are (the fp32 gates, states and sums it
    needs), and the op runs with autocast off. Without it a backward run inside an autocast
    region (``loss.backward()`` within ``torch.autocast``) would reach the op's torch GEMMs
    with autocast on and round their fp32 results to the region's dtype, so the gradients would
    depend on where the caller put ``backward()``."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op._opoverload(*args)

    op._lib.impl(op._name, kernel, key, with_keyset=True)


def refuse_double_backward(backward_op, backend: str) -> None:
    """Give a backward op a derivative that refuses, clearly.

    The backward kernels have no derivative of their own, so double backward (a gradient
    penalty, Hessian-vector products) cannot go through them, as it cannot through torch.nn's
    cuDNN RNNs. Without this, PyTorch's error names an internal op and asks for an autograd
    formula; this one says what to do instead. First-order gradients are unaffected: the op's
    autograd kernel only records it when grad mode is on during backward (create_graph=True).
    """

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"double backward is not supported by fused_rnn's {backend!r} backend: its backward "
            f"is a fused kernel with no derivative of its own (torch.nn's cuDNN RNNs refuse it "
            f"too). Run the forward that needs it with backend=\"reference\", which computes "
            f"the same math with differentiable PyTorch ops."
        )

    backward_op.register_autograd(backward, setup_context=setup_context)


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
# Integer dtypes lengths may not have: bool, and the wider unsigned ones, which most of torch's
# ops do not take (comparing or promoting one fails inside the backward, the reference's too).
_NOT_LENGTHS = frozenset({torch.bool} | {getattr(torch, n) for n in ("uint16", "uint32", "uint64")
                                         if hasattr(torch, n)})


def check_saved_args(where: str, x: Tensor,
                     expected: dict[str, tuple[Tensor | None, tuple[int, ...],
                                               torch.dtype | None]]) -> None:
    """The tensors a backward op takes besides the layer's inputs (the forward's outputs and
    saved activations, the incoming gradients), as ``name: (tensor or None, shape, dtype or
    None for any)``: a kernel indexes them with the layer's sizes, so a call of the op with
    another shape would read or write out of bounds. RuntimeError for a wrong shape, device or
    dtype, TypeError for something not a tensor."""
    for name, (t, shape, dtype) in expected.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"{where}: {name} must have shape {tuple(shape)}, got "
                               f"{tuple(t.shape)}")
        if t.device != x.device:
            raise RuntimeError(f"{where}: {name} is on {t.device} but x is on {x.device}")
        if dtype is not None and t.dtype != dtype:
            raise RuntimeError(f"{where}: {name} must be {dtype}, got {t.dtype}")
        if t.is_complex() and not x.is_complex():  # its imaginary part would be dropped
            raise TypeError(f"{where}: {name} is complex ({t.dtype}) but x is real "
                            f"({x.dtype})")


def check_rnn_args(mode: str, x: Tensor, h: Tensor, c: Tensor | None, w_ih: Tensor,
                   w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                   w_hr: Tensor | None = None, lengths: Tensor | None = None,
                   *, step: bool = False) -> None:
    """Every shape, kind and device the layer (``step=False``: x (T, B, I)) or cell (x (B, I))
    contract names, checked before any backend runs: the kernels index h, c, the biases,
    w_hr and lengths with sizes taken from x and w_hh, so a tensor of another shape would be
    read or written out of bounds. Raises ValueError for a wrong structure, RuntimeError
    for a wrong shape or device, TypeError for a wrong kind."""
    if mode not in _GATES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {tuple(_GATES)}")
    where = "rnn_cell" if step else "rnn_layer"
    named = {"x": x, "h0": h, "w_ih": w_ih, "w_hh": w_hh}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (("c0", c), ("b_ih", b_ih), ("b_hh", b_hh), ("w_hr", w_hr),
                    ("lengths", lengths)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a tensor or None, got {type(t).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{where}: x must be floating point, got {x.dtype}")
    if x.dim() != (2 if step else 3):
        raise RuntimeError(f"{where}: x must be {'(B, I)' if step else '(T, B, I)'}, got shape "
                           f"{tuple(x.shape)}")
    if mode == "LSTM" and c is None:
        raise ValueError(f"{where}: LSTM needs c0 (the cell state), got None")
    if mode != "LSTM" and c is not None:
        raise ValueError(f"{where}: c0 is for LSTM only; mode {mode} takes None")
    if w_hr is not None and mode != "LSTM":
        raise ValueError(f"{where}: w_hr (a projection) is for LSTM only; mode {mode} takes None")
    G = _GATES[mode]
    if w_hh.dim() != 2 or w_hh.shape[0] % G:
        raise RuntimeError(f"{where}: w_hh must be ({G}*H, P) for {mode}, got shape "
                           f"{tuple(w_hh.shape)}")
    H = w_hh.shape[0] // G
    P = H if w_hr is None else w_hh.shape[1]  # a projection: w_hh's columns, w_hr's rows
    B, I = x.shape[-2], x.shape[-1]
    want = {"w_hh": (G * H, P), "w_ih": (G * H, I), "h0": (B, P), "c0": (B, H),
            "b_ih": (G * H,), "b_hh": (G * H,), "w_hr": (P, H), "lengths": (B,)}
    given = {"w_hh": w_hh, "w_ih": w_ih, "h0": h, "c0": c, "b_ih": b_ih, "b_hh": b_hh,
             "w_hr": w_hr, "lengths": lengths}
    for name, t in given.items():
        if t is None:
            continue
        if tuple(t.shape) != want[name]:
            raise RuntimeError(f"{where}: {name} must have shape {want[name]} (B={B}, I={I}, "
                               f"H={H}, P={P}), got {tuple(t.shape)}")
        if t.device != x.device:
            raise RuntimeError(f"{where}: {name} is on {t.device} but x is on {x.device}")
    if lengths is not None and (lengths.is_floating_point() or lengths.is_complex()
                                or lengths.dtype in _NOT_LENGTHS):
        raise TypeError(f"{where}: lengths must be an integer tensor of int8 to int64 or "
                        f"uint8, got {lengths.dtype}")
    if not x.is_complex():  # the math runs in x's dtype: an imaginary part would be dropped
        for name, t in given.items():
            if name != "lengths" and t is not None and t.is_complex():
                raise TypeError(f"{where}: {name} is complex ({t.dtype}) but x is real "
                                f"({x.dtype}); its imaginary part would be discarded")
