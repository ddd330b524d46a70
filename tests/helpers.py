"""Helpers shared by the test modules: building module pairs, inputs and comparisons."""

from __future__ import annotations

import functools

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


@functools.cache
def nn_lstm_autocast_failure(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why torch.nn.LSTM cannot run under CPU autocast in ``dtype`` here, or None where it can.

    Under CPU autocast nn.LSTM (fp32) reaches oneDNN's layer, which autocast hands the dtype;
    oneDNN has no bf16 on a CPU without AVX-512 or AVX2-VNNI-2 (AMD's Zen 3, say), and fails
    to create its primitive. nn.LSTM on bf16 tensors runs its native math there instead, and
    so do fused_rnn's modules under autocast (they cast before PyTorch's kernel). Tests that
    hold something to torch.nn under autocast compare, where this says why not, with torch.nn
    on the autocast dtype outright (:func:`nn_under_cpu_autocast`): what autocast would hand
    its kernel."""
    try:
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            torch.nn.LSTM(1, 1)(torch.zeros(1, 1, 1))
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def nn_under_cpu_autocast(module: torch.nn.Module, x: torch.Tensor, dtype=torch.bfloat16):
    """``module(x)`` under CPU autocast in ``dtype``; where nn.LSTM cannot run there
    (:func:`nn_lstm_autocast_failure`), a copy of ``module`` cast to ``dtype`` on ``x`` cast
    to it."""
    if not isinstance(module, torch.nn.LSTM) or nn_lstm_autocast_failure(dtype) is None:
        with torch.autocast("cpu", dtype=dtype):
            return module(x)
    import copy

    return copy.deepcopy(module).to(dtype)(x.to(dtype))


def outputs_of(out) -> list[torch.Tensor]:
    """Flatten (output, h_n) / (output, (h_n, c_n)) / PackedSequence into a tensor list."""
    y, hidden = out
    ys = [y.data if isinstance(y, PackedSequence) else y]
    hs = list(hidden) if isinstance(hidden, tuple) else [hidden]
    return ys + hs


def seq_lengths(B: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths in [1, T] with T present, in random order. With B and T above 1, not all equal
    and not longest-first (a row shorter than a later one), so that enforce_sorted=False and
    the sort matter: drawn freely, a quarter of test_modules' packed cases had equal lengths."""
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    if B >= 2 and T >= 2:
        i, j = sorted(torch.randperm(B, generator=generator)[:2].tolist())
        lengths[i], lengths[j] = 1, T
    else:
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
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


def record_gemm_precision(monkeypatch) -> list[str]:
    """From now on, each fp32 GEMM a backend issues through ``F.linear``, ``@`` or ``torch.mm``
    appends the cuBLAS precision set when it ran (``torch.backends.cuda.matmul.fp32_precision``
    on torch >= 2.9; ``"tf32"`` or ``"ieee"`` from the legacy ``allow_tf32`` before) to the
    returned list: the setting is only read by cuBLAS on a GPU, so on the CPU this is how a
    test sees which one a GPU would have used."""
    from fused_rnn.ops.common import gemm_fp32_precision

    seen: list[str] = []

    def wrap(fn):
        def recorded(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args[:2]):
                seen.append(gemm_fp32_precision())
            return fn(*args, **kwargs)

        return recorded

    monkeypatch.setattr(torch.nn.functional, "linear", wrap(torch.nn.functional.linear))
    monkeypatch.setattr(torch.Tensor, "__matmul__", wrap(torch.Tensor.__matmul__))
    monkeypatch.setattr(torch, "mm", wrap(torch.mm))
    return seen


# Where one non-finite value goes in: (what, its index). H=5 pads every kernel tile, and a
# padded lane that turns NaN (inf * 0 in the matmul) reaches every unit at the next step.
NON_FINITE_CASES = {
    "inf-in-h0": ("h0", (0, 1, 2), float("inf")),
    "nan-in-x": ("x", (1, 0, 0), float("nan")),
    # in row 0, whose length (T) keeps step 1 in a packed batch (row 1's ends after step 0)
    "inf-in-dy": ("dy", (1, 0, 2), float("inf")),
    # A weight's inf saturates a gate where torch.nn multiplies it by real values only; a
    # padding step's zeros (x, or the dgates W_hh carries back) times it are 0 * inf = NaN.
    # w_ih row -2: LSTM's o gate, GRU's n gate; w_hh row 1: LSTM's i gate, GRU's r gate.
    "inf-in-w_ih": ("weight_ih_l0", (-2, 0), float("inf")),
    "inf-in-w_hh": ("weight_hh_l0", (1, 0), float("inf")),
}


def non_finite_params(proj: bool = True) -> list:
    """(cell, case, proj_size, packed) for :func:`check_non_finite_like_torch_nn`; with
    ``proj``, LSTM with a projection too."""
    import pytest

    return [pytest.param(cell, case, p, packed,
                         id=f"{cell}-{case}{'-proj' if p else ''}{'-packed' if packed else ''}")
            for cell in CELLS for case in NON_FINITE_CASES for packed in (False, True)
            for p in ((0, 3) if proj and cell == "lstm" else (0,))]


def check_non_finite_like_torch_nn(cell: str, backend: str, device, case: str,
                                   proj_size: int = 0, packed: bool = False) -> None:
    """One inf or NaN in h0, x or the output's gradient: the outputs and every gradient have
    torch.nn's NaN and inf entries, and its values elsewhere (fp32, T=3, B=2, H=5). With an
    inf in the output's gradient, only which entries are finite must match: where torch.nn's
    are non-finite, inf or NaN depends on how a backward arranges its products (0 * inf), and
    the Triton kernels' GRU backward gives inf at some entries where autograd gives NaN.
    torch.nn runs on the CPU (aten's math, the definition), also when ours runs on a GPU:
    where a non-finite value meets a product that cuDNN forms and aten does not (a padding
    step, the zero gradient of the last step times an inf weight), cuDNN's result says nothing
    about ours."""
    where, index, value = NON_FINITE_CASES[case]
    T, B, I, H = 3, 2, 4, 5
    kw = {"proj_size": proj_size} if proj_size else {}
    ref, ours = make_pair(cell, I, H, backend=backend, **kw)
    ours = ours.to(device)
    P = proj_size or H
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, I, generator=g)
    hx = [torch.randn(1, B, P, generator=g) * 0.5]
    if cell == "lstm":
        hx.append(torch.randn(1, B, H, generator=g) * 0.5)
    dy = torch.randn(T, B, P, generator=g)
    if where.startswith("weight"):
        with torch.no_grad():
            for m in (ref, ours):
                getattr(m, where)[index] = value
    else:
        {"x": x, "h0": hx[0], "dy": dy}[where][index] = value
    lengths = torch.tensor([T, T - 2])
    if packed and where in ("x", "dy"):  # else packing drops it, and the case tests nothing
        assert index[0] < lengths[index[1]], f"{case}: {index} is past its row's length"

    def run(module, device):
        xs = x.to(device).requires_grad_()
        hs = [h.to(device).requires_grad_() for h in hx]
        inp = pack_padded_sequence(xs, lengths) if packed else xs
        y, state = module(inp, tuple(hs) if cell == "lstm" else hs[0])
        y = y.data if packed else y
        d = (pack_padded_sequence(dy, lengths).data if packed else dy).to(device)
        states = list(state) if cell == "lstm" else [state]
        torch.autograd.backward([y, *states], [d, *[torch.ones_like(s) for s in states]])
        grads = [xs.grad, *[h.grad for h in hs], *[p.grad for p in module.parameters()]]
        return [t.detach().cpu() for t in (y, *states, *grads)]

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 on a GPU (and cudasim) as on the CPU
    try:
        want, got = run(ref, "cpu"), run(ours, device)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    names = ["y", *(["h_n", "c_n"] if cell == "lstm" else ["h_n"]), "dx",
             *(["dh0", "dc0"] if cell == "lstm" else ["dh0"]), *[n for n, _ in ref.named_parameters()]]
    tests = ((("finite", torch.isfinite),) if where == "dy" else
             (("NaN", torch.isnan), ("inf", torch.isinf)))
    for name, a, e in zip(names, got, want, strict=True):
        for kind, test in tests:
            assert torch.equal(test(a), test(e)), (
                f"{name}: {kind} at {test(a).nonzero().tolist()[:6]}, torch.nn has them at "
                f"{test(e).nonzero().tolist()[:6]}")
        finite = torch.isfinite(e)
        torch.testing.assert_close(a[finite], e[finite], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def check_padding_is_ignored(backend: str, device, mode: str, proj: bool = False) -> None:
    """``fused_rnn.functional.rnn_layer`` and ``rnn`` with ``lengths``: what x, and y's
    incoming gradient, hold past a row's length is never read, so inf and NaN there give the
    outputs and every gradient that zeros do, all finite (T=4, B=3, fp32). Before, the input GEMM's weight gradient took
    0 * NaN = NaN from them on every backend: the kernels' dW_ih = dgx^T x, and the reference's
    discarded cell output through autograd."""
    import fused_rnn.functional as Fr
    from fused_rnn.ops.reference import GATES

    T, B, I, H = 4, 3, 2, 5
    P = 3 if proj else H
    G = GATES[mode]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, I, generator=g)
    lengths = torch.tensor([4, 2, 1])
    pad = torch.arange(T)[:, None] >= lengths[None, :]  # (T, B)
    params = [torch.randn(G * H, I, generator=g) * 0.5, torch.randn(G * H, P, generator=g) * 0.5,
              torch.randn(G * H, generator=g) * 0.5, torch.randn(G * H, generator=g) * 0.5]
    w_hr = [torch.randn(P, H, generator=g) * 0.5] if proj else []
    h0 = torch.randn(B, P, generator=g) * 0.5
    c0 = torch.randn(B, H, generator=g) * 0.5 if mode == "LSTM" else None

    def run(fill: torch.Tensor, stack: bool, dy_fill: float = 0.0):
        xs = torch.where(pad[..., None], fill, x).to(device).requires_grad_()
        ws = [w.to(device).requires_grad_() for w in params + w_hr]
        d = torch.device(device)
        lens = lengths.to(d)
        if stack:
            wts = [(*ws[:4], ws[4] if proj else None)]
            outs = Fr.rnn(mode, xs, h0.to(d)[None], None if c0 is None else c0.to(d)[None], wts,
                          num_layers=1, bidirectional=False, lengths=lens, backend=backend)
        else:
            outs = Fr.rnn_layer(mode, xs, h0.to(d), None if c0 is None else c0.to(d), *ws[:4],
                                ws[4] if proj else None, lengths=lens, backend=backend)
        outs = [o for o in outs if o is not None]
        cots = [torch.linspace(-1, 1, o.numel(), device=d).view_as(o) for o in outs]
        # y's incoming gradient past the lengths (what torch.nn's packed output never has)
        cots[0] = torch.where(pad[..., None].to(d), dy_fill, cots[0])
        loss = sum((o * c).sum() for o, c in zip(outs, cots))
        grads = torch.autograd.grad(loss, [xs, *ws])
        # the input's gradient past the lengths is not compared: zero or not, nothing reads it
        dx = torch.where(pad[..., None].to(d), 0.0, grads[0])
        return [t.detach().cpu() for t in (*outs, dx, *grads[1:])]

    zero = torch.tensor(0.0)
    for stack in (False, True):
        want = run(zero, stack)
        for fill in (float("nan"), float("inf"), -1e30):
            # in x past the lengths, then in y's incoming gradient there (a padding step's
            # dh reached dW_hr through the persistent backward's unmasked store)
            for where, got in (("x", run(torch.tensor(fill), stack)),
                               ("dy", run(zero, stack, dy_fill=fill))):
                for k, (a, e) in enumerate(zip(got, want, strict=True)):
                    assert torch.isfinite(a).all(), (
                        f"{backend} {mode} {'rnn' if stack else 'rnn_layer'}: {fill} in {where} "
                        f"past the lengths reached result {k} (non-finite at "
                        f"{(~torch.isfinite(a)).nonzero().tolist()[:4]})")
                    torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


# The CLI tests' corpus: a few hundred words, seeded, written to tmp_path (conftest's text_file).
WORDS = ["alpha", "beta", "gamma", "delta", "lstm", "gru", "rnn", "cell", "state", "chunk",
         "stream", "token", "fused", "kernel", "tensor", "step", "loss", "grad", "norm", "clip",
         "epoch", "batch"]


def tiny_text(n_lines: int = 120, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n_lines):
        k = int(torch.randint(3, 8, (), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        lines.append(f"{i % 10}: " + " ".join(WORDS[j] for j in idx) + ".")
    return "\n".join(lines) + "\n"


@functools.cache
def dynamo_reports_raised_messages() -> bool:
    """Whether this torch's dynamo, under ``fullgraph=True``, fails with the message of an
    exception a constructor in the traced code raises (torch 2.13), or only with "Observed
    exception" and the line (torch 2.6; there a bare ``raise`` in a function shows it)."""
    class Refuses:
        def __init__(self, x):
            raise ValueError("fused_rnn's probe message")

    def build(x):
        Refuses(x)
        return x

    torch._dynamo.reset()
    try:
        torch.compile(build, backend="eager", fullgraph=True)(torch.zeros(1))
    except Exception as e:
        return "fused_rnn's probe message" in str(e)
    finally:
        torch._dynamo.reset()
    raise AssertionError("the probe did not raise")


def check_mixed_dtypes_run_in_x_dtype(backend: str, mode: str, step: bool = False,
                                      dtype: torch.dtype = torch.bfloat16) -> None:
    """``fused_rnn.functional.rnn_layer`` (or ``rnn_cell``, ``step``) given 16-bit x with fp32
    states and weights gives the bits of the same call with each of them cast to x's dtype
    first, inside the graph: outputs, and the gradients of every leaf in its own dtype. (The
    reference used them unrounded and the kernels rounded h0, c0 and W_hh only, so the backends
    disagreed by an ulp of x's dtype.)"""
    import fused_rnn.functional as Fr

    g = torch.Generator().manual_seed(3)
    G, T, B, I, H = {"LSTM": 4, "GRU": 3}.get(mode, 1), 3, 2, 4, 8

    def r(*shape, s=0.5):
        return torch.randn(*shape, generator=g) * s

    x = r(B, I).to(dtype) if step else r(T, B, I).to(dtype)
    wide = [r(B, H), r(B, H) if mode == "LSTM" else None, r(G * H, I), r(G * H, H), r(G * H),
            r(G * H)]
    runs = []
    for cast in (False, True):
        leaves = [x.clone().requires_grad_()] + [
            None if t is None else t.clone().requires_grad_() for t in wide]
        args = [leaves[0]] + [None if t is None or not cast else t.to(dtype)
                              for t in leaves[1:]]
        args = [a if a is not None or t is None else t for a, t in zip(args, leaves)]
        if step:
            out = Fr.rnn_cell(mode, *args, backend=backend)
        else:
            out = Fr.rnn_layer(mode, *args, backend=backend)
        outs = [o for o in out if o is not None]
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad([o.float().sum() * 0.1 + (o.float() ** 2).sum()
                                     for o in outs], present)
        runs.append([o.detach() for o in outs] + list(grads))
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a, b), (
            f"{backend} {mode}: tensor {i} differs from the call in x's dtype")
