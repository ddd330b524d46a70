"""Inputs and runners shared by the CUDA backend's tests (real GPU, cudasim, emulation)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_rnn.ops.cuda as cuda_backend
from fused_rnn.ops.common import register_autocast, register_autocast_off
from fused_rnn.ops.cuda import _ext, ops
from fused_rnn.ops.cuda import plan as P
from fused_rnn.ops.reference import GATES

_cpu_autocast = False


def register_cpu_kernels() -> None:
    """The ops' implementations for CPU tensors, and their CUDA autocast rules for CPU autocast
    (once per process). Without an installed stand-in the implementations raise the backend's
    "unavailable" RuntimeError, so registering them changes nothing for other tests."""
    global _cpu_autocast
    if "cpu" not in ops.cuda_layer._backend_fns:
        ops.cuda_layer.register_kernel("cpu")(ops._layer_forward_impl)
        ops.cuda_layer_backward.register_kernel("cpu")(ops._layer_backward_impl)
    if not _cpu_autocast:
        register_autocast(ops.cuda_layer, "cpu")
        register_autocast_off(ops.cuda_layer_backward, "cpu")
        _cpu_autocast = True


def install_standin(monkeypatch, ext):
    """Make the CUDA backend run ``ext`` (cudasim's Simulator or the Emulator) on CPU tensors:
    the ops get CPU kernels (their real implementations) and CPU autocast (the CUDA rule), the
    extension is ``ext``, and
    configurations are sized as if on CUDA device 0 (``ext.device_info``). Returns ``ext``."""
    register_cpu_kernels()
    monkeypatch.setattr(_ext, "extension", lambda: ext)
    monkeypatch.setattr(_ext, "unavailable_reason", lambda device: None)
    real = cuda_backend.unsupported_reason
    monkeypatch.setattr(
        cuda_backend, "unsupported_reason",
        lambda kind, **cfg: real(kind, **{**cfg, "device": torch.device("cuda", 0)}),
    )
    return ext


# The accuracy rule's floors (test_cuda_gpu.py's docstring): dtype name -> (outputs, gradients).
FLOORS = {"fp32": (1e-5, 2e-5), "tf32": (5e-3, 1e-2), "bf16": (2e-2, 4e-2), "fp16": (3e-3, 6e-3)}


def accuracy_floor(mode: str, dt: str, gradient: bool) -> float:
    """The relative error a kernel's tensor may have against the float64 reference even where
    the reference computed in ``dt`` has less (the rule: at most max(twice that, the floor))."""
    if gradient and mode == "RNN_RELU" and dt == "tf32":
        # relu' jumps at 0: a 10-bit-mantissa pre-activation flips some of its mask bits.
        # The fp32 reference has no TF32 to compare with; fp16 (same mantissa) shows the
        # reference's own gradient error at ~8e-2 on these inputs.
        return 0.15
    return FLOORS[dt][gradient]


def round_to_tf32(t):
    """fp32 values rounded to TF32's 10-bit mantissa (to nearest): the stand-in for cuBLAS's
    TF32 GEMMs. Whether those round or truncate (PyTorch's notes: tensor cores read the first
    10 mantissa bits) is not known here; the two differ by at most one TF32 ulp an operand.
    Anything else comes back as it is."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(t.shape)


# aten's matrix products -> the positions of their two factors (addmm's first is the bias)
_TF32_FACTORS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.bmm.default: (0, 1),
                 torch.ops.aten.mv.default: (0, 1), torch.ops.aten.addmm.default: (1, 2),
                 torch.ops.aten.baddbmm.default: (1, 2), torch.ops.aten.addmv.default: (1, 2)}


class TF32Matmuls(TorchDispatchMode):
    """Inside, every fp32 matrix product on the CPU, forward and backward, takes its two
    factors rounded to TF32 (``round_to_tf32``) and sums in fp32, as a GPU's TF32 tensor cores
    do: for the reference, TF32 math throughout; for the CUDA backend on cudasim, its
    time-parallel GEMMs as cuBLAS runs them there (cudasim rounds the recurrence itself)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        factors = _TF32_FACTORS.get(func)
        if factors is not None:
            args = tuple(round_to_tf32(a) if i in factors else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` (Frobenius norms, in float64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def layer_inputs(mode, T, B, I, H, seed, lengths):
    """(leaves, lengths or None, cotangents) in float64 on the CPU; the leaves are
    x, h0, c0 (None unless LSTM), w_ih, w_hh, b_ih, b_hh, with x non-contiguous (run_layer's
    cast to another dtype or device copies it contiguous; test_cuda_gpu.py's opcheck test
    passes strided inputs to the ops)."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode]

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    # x is a non-contiguous slice of a larger buffer (every other feature).
    x = r(T, B, 2 * I)[..., ::2]
    leaves = [x, r(B, H, s=0.5), r(B, H, s=0.5) if mode == "LSTM" else None,
              r(G * H, I, s=1.5 * H**-0.5), r(G * H, H, s=1.5 * H**-0.5), r(G * H, s=0.3),
              r(G * H, s=0.3)]
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
    cots = [r(T, B, H), r(B, H), r(B, H)]
    return leaves, lens, cots


def run_layer(fn, mode, leaves, dtype, lens, reverse, cots, device):
    """fn (a ``rnn_layer``) on the leaves cast to ``dtype`` on ``device``: the outputs
    (y, h_n[, c_n]) followed by the gradients of every present leaf for the cotangents."""
    ls = [None if t is None else t.to(device, dtype).requires_grad_() for t in leaves]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ls
    lens = None if lens is None else lens.to(device)
    y, h, c = fn(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lens, reverse)
    outs = [o for o in (y, h, c) if o is not None]
    present = [t for t in ls if t is not None]
    grads = torch.autograd.grad(outs, present, [g.to(device, dtype) for g in cots[: len(outs)]])
    return [o.detach() for o in outs] + list(grads)


def blockings(launches, batch: int) -> set[tuple[int, int]]:
    """The (bm, bn) register blocking of every chunk of a Simulator's recorded launches (plan.h
    tile_block, from each launch's plan and tile_block setting)."""
    return set().union(*(P.chunk_blockings(pl["m_pad"], pl["groups"], pl["math"], batch,
                                           pl["tile_block"]) for _, _, pl in launches))
