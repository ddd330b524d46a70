"""Helpers shared by the test modules: building module pairs, inputs and comparisons."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn

# cell name -> (torch.nn class, fused_rnn class, extra constructor kwargs)
CELLS = {
    "lstm": (torch.nn.LSTM, fused_rnn.LSTM, {}),
    "gru": (torch.nn.GRU, fused_rnn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, fused_rnn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, fused_rnn.RNN, {"nonlinearity": "relu"}),
}

STEP_CELLS = {
    "lstm": (torch.nn.LSTMCell, fused_rnn.LSTMCell, {}),
    "gru": (torch.nn.GRUCell, fused_rnn.GRUCell, {}),
    "rnn_tanh": (torch.nn.RNNCell, fused_rnn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNNCell, fused_rnn.RNNCell, {"nonlinearity": "relu"}),
}


def make_pair(cell: str, *args, backend: str = "reference", seed: int = 0, step: bool = False, **kwargs):
    """A torch.nn module and ours with the same weights (ours loads nn's state_dict).

    ``step=True`` builds the single-step ``*Cell`` modules instead of the sequence layers.
    """
    nn_cls, our_cls, extra = (STEP_CELLS if step else CELLS)[cell]
    torch.manual_seed(seed)
    ref = nn_cls(*args, **extra, **kwargs)
    ours = our_cls(*args, **extra, **kwargs, backend=backend)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def outputs_of(out) -> list[torch.Tensor]:
    """Flatten (output, h_n) / (output, (h_n, c_n)) / PackedSequence into a tensor list."""
    y, hidden = out
    ys = [y.data if isinstance(y, PackedSequence) else y]
    hs = list(hidden) if isinstance(hidden, tuple) else [hidden]
    return ys + hs


def seq_lengths(B: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths in [1, T] with T present, in random order (so enforce_sorted=False matters)."""
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[int(torch.randint(0, B, (1,), generator=generator))] = T
    return lengths


def make_packed(x: torch.Tensor, lengths: torch.Tensor, batch_first: bool, enforce_sorted: bool):
    if enforce_sorted:
        order = torch.argsort(lengths, descending=True, stable=True)
        x = x[order] if batch_first else x[:, order]
        lengths = lengths[order]
    return pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)


def assert_close_list(actual, expected, atol, rtol, what=""):
    assert len(actual) == len(expected), f"{what}: {len(actual)} vs {len(expected)} tensors"
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"{what}[{i}]: expected None"
            continue
        assert a is not None, f"{what}[{i}]: missing"
        assert a.shape == e.shape, f"{what}[{i}]: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{what}[{i}]: {m}")


def record_gemm_precision(monkeypatch) -> list[str]:
    """From now on, each fp32 GEMM a backend issues through ``F.linear``, ``@`` or ``torch.mm``
    appends the cuBLAS precision set when it ran (``torch.backends.cuda.matmul.fp32_precision``,
    torch >= 2.9) to the returned list: the setting is only read by cuBLAS on a GPU, so on the
    CPU this is how a test sees which one a GPU would have used."""
    seen: list[str] = []

    def wrap(fn):
        def recorded(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args[:2]):
                seen.append(torch.backends.cuda.matmul.fp32_precision)
            return fn(*args, **kwargs)

        return recorded

    monkeypatch.setattr(torch.nn.functional, "linear", wrap(torch.nn.functional.linear))
    monkeypatch.setattr(torch.Tensor, "__matmul__", wrap(torch.Tensor.__matmul__))
    monkeypatch.setattr(torch, "mm", wrap(torch.mm))
    return seen
