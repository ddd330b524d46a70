"""Training-loop checks shared by the kernel backends' test files.

What a user's truncated-BPTT loop does around the layers, on a small sequence regressor
(recurrent stack → linear head): the state carried from chunk to chunk and detached, the
gradient norm clipped, SGD. Each check takes the backend and the device, so the same body runs
on a GPU (the compiled kernels) and on the CPU stand-ins (Triton's interpreter, cudasim):

* :func:`check_ddp_matches_one_process`: DistributedDataParallel (one rank: gloo on the CPU,
  nccl on a GPU) trains to the same bits as the bare model, and compiled, to its losses;
* :func:`check_amp_tracks_torch_nn`: autocast (fp16 on a GPU, bf16 on the CPU) with a
  GradScaler; our losses, and each parameter's first gradient, stay as close to the fp32
  run as ``torch.nn``'s do under the same autocast (FlashAttention's rule: at most twice
  torch.nn's error, plus a small floor);
* :func:`check_compiled_training_matches_eager`: ``torch.compile`` of the model (with
  ``mode="reduce-overhead"``, i.e. CUDA graphs, on a GPU) gives the eager losses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import nn_lstm_autocast_failure
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fused_rnn
from fused_rnn.cli import _destroy_process_group

_CLASSES = {"LSTM": (nn.LSTM, fused_rnn.LSTM), "GRU": (nn.GRU, fused_rnn.GRU)}
I, H, LAYERS, T, B, STEPS = 6, 16, 2, 5, 3, 3


class Regressor(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 1)

    def forward(self, x, state=None):
        y, state = self.rnn(x, state)
        return self.head(y).squeeze(-1), state


def make_model(cell: str, backend: str | None, device, seed: int = 0) -> Regressor:
    """``backend=None``: torch.nn's layer; otherwise fused_rnn's with that backend. The same
    seed gives the same weights either way (ours is initialised like nn's)."""
    nn_cls, our_cls = _CLASSES[cell]
    torch.manual_seed(seed)
    ref = Regressor(nn_cls(I, H, LAYERS))
    if backend is None:
        return ref.to(device)
    ours = Regressor(our_cls(I, H, LAYERS, backend=backend))
    ours.load_state_dict(ref.state_dict())
    return ours.to(device)


def chunks(device, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, B, I, generator=g).to(device), torch.randn(T, B, generator=g).to(device))
            for _ in range(STEPS)]


def _detached(state):
    # clone: under CUDA graphs the next replay overwrites the graph's outputs
    return tuple(s.detach().clone() for s in state) if isinstance(state, tuple) else state.detach().clone()


def train(model: nn.Module, data, *, autocast_dtype=None, scaler=None, lr=0.05,
          first_grads: list | None = None) -> list[float]:
    """Truncated BPTT over ``data``: returns the loss of each chunk. ``first_grads``: a list
    that receives the first chunk's gradients (fp32, unscaled, before clipping), in
    ``model.parameters()`` order."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params = [p for p in model.parameters()]
    device_type = data[0][0].device.type
    state, losses = None, []
    for x, target in data:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out, state = model(x, state)
            loss = F.mse_loss(out.float(), target)
        state = _detached(state)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        if first_grads is not None and not losses:
            first_grads.extend(p.grad.detach().float().clone() for p in params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        losses.append(loss.item())
    return losses


def check_ddp_matches_one_process(cell: str, backend: str, device, tmp_path,
                                  compiled: bool = False) -> None:
    """``compiled``: ``torch.compile`` of the DDP-wrapped model (dynamo's DDP optimizer cuts
    the graph at the gradient buckets), to the eager losses and weights within rounding."""
    device = torch.device(device)
    data = chunks(device)
    bare = make_model(cell, backend, device)
    want = train(bare, data)
    store = dist.FileStore(str(tmp_path / "ddp_store"), 1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0,
                            world_size=1)
    try:
        wrapped = make_model(cell, backend, device)
        ddp = DistributedDataParallel(
            wrapped, device_ids=[device.index or 0] if device.type == "cuda" else None)
        got = train(torch.compile(ddp) if compiled else ddp, data)
        del ddp  # before the group: see _destroy_process_group (gloo's teardown can deadlock)
    finally:
        _destroy_process_group()
    if compiled:
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(wrapped.named_parameters(), bare.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        return
    assert got == want, f"losses under DDP {got} != without {want}"
    for (name, a), b in zip(wrapped.named_parameters(), bare.parameters()):
        assert torch.equal(a, b), f"{name} differs after training under DDP"


def amp_dtype(device) -> torch.dtype:
    """fp16 on a GPU; bf16 on the CPU, where oneDNN has no fp16 LSTM (nn.LSTM fails there)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def check_amp_tracks_torch_nn(cell: str, backend: str, device, eps: float = 1e-3,
                              grad_eps: float = 2e-3) -> None:
    """Autocast (:func:`amp_dtype`) with a GradScaler, against torch.nn under the same. On the
    CPU only nn.LSTM honours autocast (nn.GRU/RNN run fp32 there), so use LSTM on the CPU.

    Each parameter's first gradient (unscaled, before clipping) is held to the rule, relative
    to the fp32 run's: the losses alone could not fail on wrong gradients (the first loss
    precedes every update, and clipped steps at this rate move the next two by ~1e-5; on the
    CPU, gradients of W_ih/W_hh scaled by 0, -1 or 1.02 passed). Measured on the CPU (bf16):
    torch.nn's gradients are 2e-3 to 9e-3 from fp32's, the Triton and CUDA kernels' within
    1.04x of that; W_ih/W_hh gradients 2% off give ours 2e-2 to 5e-2."""
    device = torch.device(device)
    dtype = amp_dtype(device)
    data = chunks(device)
    grads = {"fp32": []}
    exact = train(make_model(cell, None, device), data, first_grads=grads["fp32"])
    runs = {}
    # Where nn.LSTM cannot run under CPU autocast (no oneDNN bf16 here), PyTorch's own kernel
    # on the autocast dtype stands for it: fused_rnn's "torch" backend casts, then calls it.
    yardstick = "torch" if device.type == "cpu" and nn_lstm_autocast_failure(dtype) else None
    for name, b in (("torch.nn", yardstick), ("ours", backend)):
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
        grads[name] = []
        runs[name] = train(make_model(cell, b, device), data, autocast_dtype=dtype,
                           scaler=scaler, first_grads=grads[name])
    for step, (e, r, o) in enumerate(zip(exact, runs["torch.nn"], runs["ours"])):
        assert r != e, f"step {step}: torch.nn's {dtype} loss equals fp32's: autocast did nothing"
        bound = 2 * abs(r - e) + eps * max(1.0, abs(e))
        assert abs(o - e) <= bound, (
            f"step {step}: {dtype} loss {o:.6g} is {abs(o - e):.3g} from fp32's {e:.6g}; "
            f"torch.nn's {dtype} loss {r:.6g} is {abs(r - e):.3g} from it (bound {bound:.3g})")
    names = [name for name, _ in make_model(cell, None, "cpu").named_parameters()]
    assert len(names) == len(grads["fp32"]) == len(grads["torch.nn"]) == len(grads["ours"])
    for name, e, r, o in zip(names, grads["fp32"], grads["torch.nn"], grads["ours"]):
        err_r, err_o = ((t - e).norm().item() / e.norm().item() for t in (r, o))
        assert err_o <= 2 * err_r + grad_eps, (
            f"{name}: {dtype} gradient {err_o:.3g} from fp32's (relative); torch.nn's "
            f"{err_r:.3g} (bound {2 * err_r + grad_eps:.3g})")


def check_compiled_training_matches_eager(cell: str, backend: str, device) -> None:
    """The compiled model's losses and its weights after training are the eager model's
    within rounding. (The losses alone passed W_hh gradients 2% off: they moved by 9e-7.)"""
    device = torch.device(device)
    data = chunks(device)
    eager = make_model(cell, backend, device)
    want = train(eager, data)
    mode = "reduce-overhead" if device.type == "cuda" else None
    model = make_model(cell, backend, device)
    got = train(torch.compile(model, mode=mode), data)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
