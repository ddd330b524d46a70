"""Inputs and runners shared by the CUDA backend's tests (real GPU, cudasim, emulation)."""

from __future__ import annotations

import torch

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
