"""ONNX export, run in ONNX Runtime, against eager: both of PyTorch's exporters, the layers
with their state in and out, and the single-step cells that sampling uses.

* The TorchScript-based exporter (``dynamo=False``) traces the ``auto`` backend's whole-stack
  call, which it writes as ONNX's own LSTM/GRU/RNN ops, so the sequence length and the batch
  stay dynamic (as for ``torch.nn``'s layers).
* The default (``dynamo=True``) exporter records the reference math step by step, so the model
  is for the example's sequence length, as ``torch.nn``'s LSTM exports there; ONNX Runtime
  refuses another length.
* The kernel backends' registered ops have no ONNX translation: export fails, naming the op.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import fused_rnn

ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install -e '.[test]')")
pytest.importorskip("onnxscript", reason="needs onnxscript (pip install -e '.[test]')")

pytestmark = pytest.mark.no_nan_fill  # the exporters trace; torch.empty must be torch's

CLASSES = {"lstm": fused_rnn.LSTM, "gru": fused_rnn.GRU, "rnn": fused_rnn.RNN}
ATOL = RTOL = 1e-5  # fp32; ONNX Runtime's kernels against PyTorch's CPU kernels


class CharModel(torch.nn.Module):
    """Tokens and a state in, logits and the new state out (the char-LM's inference graph)."""

    def __init__(self, cell: str, batch_first: bool, **kw):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.rnn = CLASSES[cell](6, 8, 2, batch_first=batch_first, **kw)
        out = (getattr(self.rnn, "proj_size", 0) or 8) * (2 if self.rnn.bidirectional else 1)
        self.head = torch.nn.Linear(out, 11)

    def forward(self, tokens, *state):
        y, new = self.rnn(self.emb(tokens), state if len(state) == 2 else state[0])
        return (self.head(y), *(new if isinstance(new, tuple) else (new,)))


def _state(model: CharModel, batch: int) -> tuple[torch.Tensor, ...]:
    rnn = model.rnn
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h = torch.randn(layers, batch, getattr(rnn, "proj_size", 0) or rnn.hidden_size)
    return (h, torch.randn(layers, batch, rnn.hidden_size)) if rnn.mode == "LSTM" else (h,)


def _tokens(batch_first: bool, T: int, B: int) -> torch.Tensor:
    return torch.randint(0, 11, (B, T) if batch_first else (T, B))


def _run(path, args) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    assert len(feeds) == len(args), [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _assert_matches_eager(model, path, args):
    with torch.no_grad():
        want = model(*args)
    got = _run(path, args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)


# (cell, constructor keywords): each cell, both directions, a projection, RNN's ReLU
CONFIGS = [
    ("lstm", {}),
    ("lstm", {"bidirectional": True}),
    ("lstm", {"proj_size": 5}),
    ("gru", {}),
    ("gru", {"bidirectional": True}),
    ("rnn", {"nonlinearity": "relu"}),
]
IDS = ["-".join([cell, *(f"{k}={v}" for k, v in kw.items())]) for cell, kw in CONFIGS]


def _export_torchscript(model, example, path):
    names = ["tokens"] + [f"state{i}" for i in range(len(example) - 1)]
    out_names = ["logits"] + [f"new_state{i}" for i in range(len(example) - 1)]
    seq_axes = {0: "B", 1: "T"} if model.rnn.batch_first else {0: "T", 1: "B"}
    dynamic = {"tokens": seq_axes, "logits": seq_axes}
    dynamic.update({n: {1: "B"} for n in names[1:] + out_names[1:]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(model, example, str(path), dynamo=False, input_names=names,
                          output_names=out_names, dynamic_axes=dynamic)


TS_CASES = [(c, k) for c, k in CONFIGS if "proj_size" not in k]


@pytest.mark.parametrize("batch_first", [False, True], ids=["tbf", "btf"])
@pytest.mark.parametrize("cell,kw", TS_CASES, ids=[i for i in IDS if "proj" not in i])
def test_torchscript_exporter_keeps_length_and_batch_dynamic(tmp_path, cell, kw, batch_first):
    torch.manual_seed(0)
    model = CharModel(cell, batch_first, backend="auto", **kw).eval()
    path = tmp_path / "model.onnx"
    _export_torchscript(model, (_tokens(batch_first, 5, 3), *_state(model, 3)), path)
    for T, B in [(5, 3), (17, 2), (1, 4)]:
        torch.manual_seed(T)
        _assert_matches_eager(model, path, (_tokens(batch_first, T, B), *_state(model, B)))


def test_torchscript_exporter_refuses_a_projection_as_for_torch_nn(tmp_path):
    """ONNX's LSTM op has no projection; the exporter says so for torch.nn's LSTM and ours."""
    torch.manual_seed(0)
    model = CharModel("lstm", False, backend="auto", proj_size=5).eval()
    example = (_tokens(False, 5, 3), *_state(model, 3))
    for rnn in (model.rnn, fused_rnn.to_torch_nn(model.rnn)):
        model.rnn = rnn
        with pytest.raises(torch.onnx.errors.SymbolicValueError, match="projections"):
            _export_torchscript(model, example, tmp_path / "model.onnx")


# every configuration on auto; the plain layers on the reference backend too
DYNAMO_CASES = [(cell, kw, "auto") for cell, kw in CONFIGS] + [
    (cell, {}, "reference") for cell in ("lstm", "gru", "rnn")]
DYNAMO_IDS = [f"{i}-auto" for i in IDS] + [f"{c}-reference" for c in ("lstm", "gru", "rnn")]


@pytest.mark.parametrize("cell,kw,backend", DYNAMO_CASES, ids=DYNAMO_IDS)
def test_dynamo_exporter_matches_eager_at_the_example_length(tmp_path, cell, kw, backend):
    torch.manual_seed(0)
    model = CharModel(cell, True, backend=backend, **kw).eval()
    example = (_tokens(True, 5, 3), *_state(model, 3))
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, dynamo=True).save(str(path))
    torch.manual_seed(1)
    _assert_matches_eager(model, path, (_tokens(True, 5, 3), *_state(model, 3)))
    # the program is for length 5: ONNX Runtime refuses another, rather than computing it wrong
    with pytest.raises(Exception, match="dimension"):
        _run(path, (_tokens(True, 6, 3), *_state(model, 3)))


class Step(torch.nn.Module):
    """One character through a cell (what sampling runs per character)."""

    def __init__(self, cell: str):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        cls = {"lstm": fused_rnn.LSTMCell, "gru": fused_rnn.GRUCell, "rnn": fused_rnn.RNNCell}
        self.cell = cls[cell](6, 8, backend="auto")
        self.head = torch.nn.Linear(8, 11)

    def forward(self, token, *state):
        new = self.cell(self.emb(token), state if len(state) == 2 else state[0])
        h = new[0] if isinstance(new, tuple) else new
        return (self.head(h), *(new if isinstance(new, tuple) else (new,)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_single_step_cells_export(tmp_path, cell, dynamo):
    torch.manual_seed(0)
    model = Step(cell).eval()
    n_state = 2 if cell == "lstm" else 1
    example = (torch.randint(0, 11, (3,)), *(torch.randn(3, 8) for _ in range(n_state)))
    path = tmp_path / "step.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, example, dynamo=True).save(str(path))
        else:
            torch.onnx.export(model, example, str(path), dynamo=False)
    torch.manual_seed(1)
    _assert_matches_eager(model, path, (torch.randint(0, 11, (3,)),
                                        *(torch.randn(3, 8) for _ in range(n_state))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_kernel_backend_fails_to_export_naming_its_op(tmp_path, dynamo):
    """The fused kernels are registered ops without an ONNX translation: both exporters stop
    at the op, by name (README: export on backend auto, or convert with to_torch_nn)."""
    if "triton" not in fused_rnn.available_backends():
        pytest.skip(f"needs the triton backend: {fused_rnn.backends.unavailable_reason('triton')}")
    torch.manual_seed(0)
    model = CharModel("gru", False, backend="triton").eval()
    example = (_tokens(False, 2, 2), *_state(model, 2))
    with warnings.catch_warnings(), pytest.raises(Exception) as failed:
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, example, dynamo=True)
        else:
            torch.onnx.export(model, example, str(tmp_path / "m.onnx"), dynamo=False)
    assert re.search(r"fused_rnn(::|\.)triton_layer", _named_op(failed)), str(failed.value)


def _named_op(failed: pytest.ExceptionInfo) -> str:
    """The exporter's message, or, where that is torch 2.9's TorchScript exporter's template
    with ``{op_name}`` left unformatted, the op name its raising frame held."""
    message = str(failed.value)
    if "{op_name}" not in message:
        return message
    for entry in reversed(failed.traceback):
        name = entry.frame.f_locals.get("symbolic_function_name")
        if name is not None:
            return f"{message} ({name})"
    return message


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_charlm_trained_with_weight_dropout_exports(tmp_path, cell):
    """CharLM(weight_drop>0) in eval: the dropout is the identity, and the model traces (into
    torch.jit.trace and the TorchScript-based exporter). It used to enter parametrize.cached()
    in eval too, where tracing raises "Cannot trace a model while caching parametrizations"."""
    from fused_rnn.charlm import CharLM

    class Step(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, tokens, *state):
            logits, new = self.lm(tokens, state if len(state) == 2 else state[0])
            return (logits, *(new if isinstance(new, tuple) else (new,)))

    torch.manual_seed(0)
    lm = CharLM(11, cell=cell, hidden_size=8, num_layers=2, weight_drop=0.5)
    opt = torch.optim.SGD(lm.parameters(), lr=0.5)
    logits, _ = lm(torch.randint(0, 11, (6, 3)))  # one training step: the weights move
    logits.logsumexp(-1).mean().backward()
    opt.step()
    model = Step(lm).eval()  # export restores the mode of the module it is given, recursively
    layers = 2
    state = ((torch.randn(layers, 3, 8), torch.randn(layers, 3, 8)) if cell == "lstm"
             else (torch.randn(layers, 3, 8),))
    example = (torch.randint(0, 11, (5, 3)), *state)
    traced = torch.jit.trace(model, example, check_trace=False)
    for a, b in zip(traced(*example), model(*example), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    names = ["tokens"] + [f"state{i}" for i in range(len(state))]
    out_names = ["logits"] + [f"new_state{i}" for i in range(len(state))]
    dynamic = {"tokens": {0: "T", 1: "B"}, "logits": {0: "T", 1: "B"}}
    dynamic.update({n: {1: "B"} for n in names[1:] + out_names[1:]})
    path = tmp_path / "charlm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, input_names=names,
                          output_names=out_names, dynamic_axes=dynamic)
    for T, B in [(5, 3), (9, 2)]:
        state = tuple(torch.randn(layers, B, 8) for _ in state)
        _assert_matches_eager(model, path, (torch.randint(0, 11, (T, B)), *state))
