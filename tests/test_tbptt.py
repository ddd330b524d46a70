"""Truncated BPTT (fused_rnn.tbptt) and the character model (fused_rnn.charlm).

Each property is checked on fused_rnn's modules and on torch.nn's, since the training loop
must treat both the same (the benchmark compares them).
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
from helpers import dynamo_reports_raised_messages

import fused_rnn
from fused_rnn.charlm import CharLM, Vocab, WeightDrop
from fused_rnn.tbptt import (
    Resets,
    StreamBatcher,
    atomic_save,
    chunk_loss,
    detach_state,
    eval_mode,
    evaluate,
    mask_state,
    run_rnn,
    state_rows,
    train_chunk,
)

# (id, class, kwargs): both implementations of every cell kind.
RNNS = [
    ("fused-lstm", fused_rnn.LSTM, {}),
    ("fused-gru", fused_rnn.GRU, {}),
    ("fused-rnn", fused_rnn.RNN, {}),
    ("fused-lstm-reference", fused_rnn.LSTM, {"backend": "reference"}),
    ("nn-lstm", torch.nn.LSTM, {}),
    ("nn-gru", torch.nn.GRU, {}),
    ("nn-rnn", torch.nn.RNN, {}),
]
RNN_IDS = [r[0] for r in RNNS]


def _make_rnn(cls, kwargs, I=3, H=5, L=2, seed=0):
    torch.manual_seed(seed)
    return cls(I, H, L, **kwargs)


# --------------------------------------------------------------------------- the batcher
@pytest.mark.parametrize("variable", [False, True], ids=["fixed", "variable"])
@pytest.mark.parametrize("N,B,T", [(101, 4, 7), (1000, 3, 16), (37, 5, 1), (12, 11, 4)],
                         ids=lambda v: str(v))
def test_every_token_once_per_epoch(N, B, T, variable):
    batcher = StreamBatcher(torch.arange(N), B, T, variable_length=variable, min_length=1, seed=3)
    n = (N - 1) // B
    xs, ys = [], []
    chunks = list(batcher.epoch())
    assert chunks[0].first and not any(c.first for c in chunks[1:])
    for c in chunks:
        assert c.x.shape == c.y.shape and c.x.shape[1] == B
        xs.append(c.x.flatten())
        ys.append(c.y.flatten())
        # targets are the next token of the same stream
        assert torch.equal(c.y[:-1], c.x[1:])
    xs, ys = torch.cat(xs).sort().values, torch.cat(ys).sort().values
    assert torch.equal(xs, torch.arange(B * n)), "each input token exactly once"
    assert torch.equal(ys, torch.arange(1, B * n + 1)), "each target token exactly once"
    # the next epoch starts over from the streams' beginning
    assert batcher.epoch_index == 1 and batcher.pos == 0
    nxt = batcher.next_chunk()
    assert nxt.first and nxt.start == 0


def test_variable_lengths_follow_awd_and_restore_exactly():
    batcher = StreamBatcher(torch.arange(100_000), 2, 70, variable_length=True, seed=0)
    lengths = [batcher.next_chunk().x.shape[0] for _ in range(200)]
    assert len(set(lengths)) > 10 and min(lengths) >= 5 and max(lengths) <= 90
    assert any(x < 50 for x in lengths), "about 5% of chunks use bptt/2"
    saved = batcher.state_dict()
    ahead = [batcher.next_chunk().x.shape[0] for _ in range(20)]
    batcher.load_state_dict(saved)
    assert [batcher.next_chunk().x.shape[0] for _ in range(20)] == ahead
    fixed = StreamBatcher(torch.arange(1000), 2, 70)
    assert {fixed.next_chunk().x.shape[0] for _ in range(3)} == {70}


def test_ranks_take_disjoint_rows_of_the_global_layout():
    tokens = torch.randint(0, 50, (503,))
    whole = StreamBatcher(tokens, 6, 8)
    parts = [StreamBatcher(tokens, 6, 8, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(torch.cat([p.streams for p in parts], 1), whole.streams)
    for _ in range(3):
        c = whole.next_chunk()
        cs = [p.next_chunk() for p in parts]
        assert torch.equal(torch.cat([x.x for x in cs], 1), c.x)
    with pytest.raises(ValueError, match="divisible"):
        StreamBatcher(tokens, 6, 8, rank=0, world_size=4)


def test_boundary_mask_marks_document_starts():
    N = 41
    bounds = torch.zeros(N, dtype=torch.bool)
    bounds[[0, 13, 30]] = True
    batcher = StreamBatcher(torch.arange(N), 2, 5, boundaries=bounds)  # n = 20
    marked = []
    for c in batcher.epoch():
        if c.reset is None:
            continue
        assert c.reset.steps == tuple(torch.nonzero(c.reset.mask.any(1)).flatten().tolist())
        for t, b in torch.nonzero(c.reset.mask).tolist():
            marked.append(int(c.x[t, b]))
    assert sorted(marked) == [0, 13, 30]


# --------------------------------------------------------------------------- the state
@pytest.mark.parametrize("name,cls,kwargs", RNNS, ids=RNN_IDS)
def test_chunks_with_carried_state_equal_one_pass(name, cls, kwargs):
    rnn = _make_rnn(cls, kwargs)
    x = torch.randn(23, 4, 3)
    full, full_state = rnn(x)
    outs, state = [], None
    for s in range(0, 23, 5):
        out, state = run_rnn(rnn, x[s : s + 5], state)
        state = detach_state(state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs), full, rtol=1e-5, atol=1e-6)
    for a, b in zip(state if isinstance(state, tuple) else (state,),
                    full_state if isinstance(full_state, tuple) else (full_state,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,cls,kwargs", RNNS, ids=RNN_IDS)
def test_detached_state_stops_backward_at_the_chunk(name, cls, kwargs):
    rnn = _make_rnn(cls, kwargs)
    x1 = torch.randn(6, 2, 3, requires_grad=True)
    x2 = torch.randn(6, 2, 3)
    _, state = rnn(x1)
    carried = detach_state(state)
    for s in carried if isinstance(carried, tuple) else (carried,):
        assert s.grad_fn is None and not s.requires_grad
    out, _ = rnn(x2, carried)
    out.sum().backward()
    assert x1.grad is None, "chunk 2's backward reached chunk 1"
    # Control: without the detach, the same backward does reach chunk 1.
    out, _ = rnn(x2, state)
    out.sum().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("torch_nn", [False, True], ids=["fused", "nn"])
def test_train_chunk_returns_detached_state_and_graph_does_not_grow(cell, torch_nn):
    rnn_class = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell] if torch_nn else None
    torch.manual_seed(0)
    model = CharLM(11, cell=cell, hidden_size=8, num_layers=2, rnn_class=rnn_class)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batcher = StreamBatcher(torch.randint(0, 11, (400,)), 3, 6)
    state = None
    node_counts = []
    for _ in range(4):
        chunk = batcher.next_chunk()
        loss, state, _ = train_chunk(model, chunk, state, opt)
        assert loss.grad_fn is None
        for s in state if isinstance(state, tuple) else (state,):
            assert s.grad_fn is None and not s.requires_grad
        # The graph of the next chunk's loss is the same size every time: nothing of the
        # earlier chunks hangs off the carried state.
        with torch.enable_grad():
            logits, _ = model(batcher.streams[:6], state)
            node_counts.append(_graph_size(logits.sum().grad_fn))
    assert len(set(node_counts)) == 1


def _graph_size(fn) -> int:
    seen, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack.extend(g for g, _ in f.next_functions)
    return len(seen)


def test_train_chunk_drops_state_at_epoch_start():
    torch.manual_seed(0)
    model = CharLM(7, cell="gru", hidden_size=4)
    batcher = StreamBatcher(torch.randint(0, 7, (50,)), 2, 100)  # one chunk per epoch
    chunk = batcher.next_chunk()
    assert chunk.first
    junk = torch.full((1, 2, 4), 50.0)
    loss_junk, _, _ = train_chunk(model, chunk, junk, None)
    model.zero_grad()
    loss_none, _, _ = train_chunk(model, chunk, None, None)
    assert torch.equal(loss_junk, loss_none)


def test_train_chunk_clips_gradient_norm():
    torch.manual_seed(0)
    model = CharLM(9, hidden_size=8)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    chunk = StreamBatcher(torch.randint(0, 9, (200,)), 2, 10).next_chunk()
    _, _, norm = train_chunk(model, chunk, None, opt, clip=1e-3)
    assert norm > 1e-3  # the raw norm is reported, the step uses the clipped one
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    torch.testing.assert_close(step.norm(), torch.tensor(1e-3), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- boundary resets
@pytest.mark.parametrize("name,cls,kwargs", RNNS, ids=RNN_IDS)
def test_reset_zeroes_state_of_that_row_at_that_step(name, cls, kwargs):
    rnn = _make_rnn(cls, kwargs)
    T, B = 9, 3
    x = torch.randn(T, B, 3)
    h0 = torch.randn(2, B, 5)
    state = (h0, torch.randn(2, B, 5)) if isinstance(rnn, (torch.nn.LSTM, fused_rnn.LSTM)) else h0
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[4, 1] = True  # row 1: a document starts at step 4
    reset[0, 2] = True  # row 2: at the chunk's first step
    out, _ = run_rnn(rnn, x, state, reset)
    plain, _ = rnn(x, state)
    # Row 0: untouched. Row 1: as before up to step 4, then as a fresh start from zeros.
    torch.testing.assert_close(out[:, 0], plain[:, 0])
    torch.testing.assert_close(out[:4, 1], plain[:4, 1])
    fresh1, _ = rnn(x[4:, 1:2])
    torch.testing.assert_close(out[4:, 1:2], fresh1, rtol=1e-5, atol=1e-6)
    fresh2, _ = rnn(x[:, 2:3])
    torch.testing.assert_close(out[:, 2:3], fresh2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[4:, 1], plain[4:, 1])  # the reset did change something


def _mask_and_resets():
    reset = torch.zeros(9, 3, dtype=torch.bool)
    reset[[0, 4, 4, 7], [2, 0, 1, 1]] = True
    return reset, Resets(reset)


def test_resets_carry_the_steps_and_give_the_bare_masks_results_bit_for_bit():
    rnn = _make_rnn(fused_rnn.LSTM, {})
    x = torch.randn(9, 3, 3)
    state = (torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    mask, resets = _mask_and_resets()
    assert resets.steps == (0, 4, 7)
    a, (ha, ca) = run_rnn(rnn, x, state, mask)
    b, (hb, cb) = run_rnn(rnn, x, state, resets)
    assert torch.equal(a, b) and torch.equal(ha, hb) and torch.equal(ca, cb)


def test_run_rnn_with_resets_never_reads_the_mask_on_the_host():
    # A meta tensor has no data: anything that reads the mask's values back (the host sync
    # a GPU mask would cost) raises. With the steps known the chunk still runs, in 3 pieces.
    mask, _ = _mask_and_resets()
    meta = mask.to("meta")
    with pytest.raises(Exception, match="meta"):
        meta.tolist()
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x, state):
            calls.append(x.shape[0])
            return x * 2, state if state is not None else torch.zeros(1, x.shape[1], 1, device="meta")

    out, state = run_rnn(Counting(), torch.empty(9, 3, 1, device="meta"), None,
                         Resets(meta, (0, 4, 7)))
    assert calls == [4, 3, 2] and out.shape == (9, 3, 1) and state.device.type == "meta"


def test_resets_pickle_and_copy():
    import copy

    mask, resets = _mask_and_resets()
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(resets, protocol=proto))
        assert back.steps == resets.steps and torch.equal(back.mask, mask)
    deep = copy.deepcopy(resets)
    assert deep.steps == (0, 4, 7) and torch.equal(deep.mask, mask)


def test_resets_refuse_what_they_cannot_hold():
    mask, _ = _mask_and_resets()
    with pytest.raises(ValueError, match=r"\(T, B\) bool"):
        Resets(mask.long())
    with pytest.raises(ValueError, match=r"\(T, B\) bool"):
        Resets(mask[0])
    with pytest.raises(ValueError, match="do not match"):
        Resets(mask, (0, 4))  # a CPU mask is checked against the steps it is given
    meta = mask.to("meta")
    for bad in [(4, 0), (0, 0), (9,), (-1,)]:
        with pytest.raises(ValueError, match="ascending, distinct"):
            Resets(meta, bad)
    with pytest.raises(ValueError, match="CPU tensor"):
        Resets.from_host(meta, meta)
    with pytest.raises(ValueError, match="does not match the input"):
        run_rnn(torch.nn.GRU(3, 5), torch.randn(8, 3, 3), None, Resets(mask))


def test_variable_lengths_do_not_depend_on_the_default_dtype():
    def lengths():
        b = StreamBatcher(torch.arange(2000), 2, 20, variable_length=True, seed=3)
        return [b.next_chunk().x.shape[0] for _ in range(20)]

    want = lengths()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert lengths() == want
    finally:
        torch.set_default_dtype(old)


def test_mask_state_keeps_gradients_of_kept_rows():
    h = torch.randn(2, 3, 4, requires_grad=True)
    masked = mask_state((h, h * 2), torch.tensor([True, False, True]))
    assert torch.equal(masked[0][:, 1], torch.zeros(2, 4))
    masked[0].sum().backward()
    assert torch.equal(h.grad[:, 1], torch.zeros(2, 4)) and h.grad[:, 0].abs().sum() > 0


def test_mask_state_zeroes_rows_that_hold_inf_or_nan():
    h = torch.randn(1, 3, 4)
    h[0, 1, 0], h[0, 1, 1] = float("inf"), float("nan")
    masked = mask_state(h, torch.tensor([True, False, True]))
    assert torch.equal(masked[0, 1], torch.zeros(4)) and torch.equal(masked[:, 0], h[:, 0])
    with pytest.raises(TypeError, match="bool"):
        mask_state(h, torch.tensor([1.0, 0.0, 1.0]))


# --------------------------------------------------------------------------- evaluate, save
def test_evaluate_restores_each_submodules_mode():
    """A submodule the caller put in eval mode (a frozen dropout) stays there: evaluate used
    to end with model.train(True), which switched it back on."""
    model = CharLM(9, hidden_size=8, num_layers=2, dropout=0.5)
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    frozen.eval()
    evaluate(model, StreamBatcher(torch.randint(0, 9, (100,)), 2, 10), max_chunks=1)
    assert model.training and not frozen.training
    model.eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not model.training


def test_eval_mode_switches_modes_through_train():
    """A module that overrides train() (a LoRA layer merging its update in eval mode) must see
    the switch back; writing .training directly skipped it."""
    calls = []

    class Merging(torch.nn.Linear):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    outer = torch.nn.Sequential(torch.nn.Sequential(Merging(2, 2)), torch.nn.Dropout(0.5))
    outer[0].eval()  # a frozen part: eval inside a training model
    outer.training = True
    with eval_mode(outer):
        assert calls[-1] is False
    assert calls[-1] is False and not outer[0].training and not outer[0][0].training
    assert outer.training and outer[1].training
    outer[0].train()
    calls.clear()
    with eval_mode(outer):
        pass
    assert calls == [False, True] and all(m.training for m in outer.modules())


def test_evaluate_leaves_training_state_alone():
    torch.manual_seed(0)
    model = CharLM(9, hidden_size=8, num_layers=2, dropout=0.5)
    batcher = StreamBatcher(torch.randint(0, 9, (300,)), 2, 10, variable_length=True)
    batcher.next_chunk()
    saved = batcher.state_dict()
    rng = torch.get_rng_state()
    total1, count1 = evaluate(model, batcher)
    total2, _count2 = evaluate(model, batcher)
    assert model.training
    assert count1 == 2 * 149 and total1 == total2  # eval mode: no dropout, deterministic
    assert torch.equal(torch.get_rng_state(), rng)
    assert batcher.state_dict()["pos"] == saved["pos"]
    assert torch.equal(batcher.state_dict()["generator"], saved["generator"])


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom")


def test_atomic_save_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises((RuntimeError, pickle.PicklingError)):
        atomic_save({"step": 2, "bad": _Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"], "no temporary file left behind"
    atomic_save({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


# --------------------------------------------------------------------------- the model
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("torch_nn", [False, True], ids=["fused", "nn"])
def test_step_through_cells_equals_layer_forward(cell, torch_nn):
    rnn_class = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell] if torch_nn else None
    torch.manual_seed(0)
    model = CharLM(13, cell=cell, hidden_size=12, num_layers=2, rnn_class=rnn_class).eval()
    tokens = torch.randint(0, 13, (8, 3))
    logits, _state = model(tokens)
    cells = model.step_cells()
    assert all(c.weight_hh is getattr(model.rnn, f"weight_hh_l{i}") for i, c in enumerate(cells))
    step_state, outs = None, []
    for t in range(8):
        out, step_state = model.step(tokens[t], step_state, cells)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs), logits, rtol=1e-5, atol=1e-6)
    # The same steps with the state one entry a layer (generation's loop): the same bits,
    # and split_state gives views of the layer's state that step_layers takes.
    layers, layer_outs = None, []
    for t in range(8):
        out, layers = model.step_layers(tokens[t], layers, cells)
        layer_outs.append(out)
    assert torch.equal(torch.stack(layer_outs), torch.stack(outs))
    split = model.split_state(step_state)
    assert len(split) == 2 and model.split_state(None) is None
    for wrong in (split[:1], split + split[:1]):
        with pytest.raises(ValueError, match=f"{len(wrong)} layer states for 2 cells"):
            model.step_layers(tokens[0], wrong, cells)
    for layer, entry in enumerate(split):
        want = layers[layer]
        if cell == "lstm":
            assert isinstance(entry, tuple) and len(entry) == 2
            assert all(torch.equal(a, b) for a, b in zip(entry, want))
            assert entry[0]._base is step_state[0] and entry[1]._base is step_state[1]
        else:
            assert torch.equal(entry, want) and entry._base is step_state
    assert set(model.state_dict()) == set(CharLM(13, cell=cell, hidden_size=12, num_layers=2).state_dict())


@pytest.mark.parametrize("torch_nn", [False, True], ids=["fused", "nn"])
def test_weight_drop_is_one_mask_a_chunk_in_training_only(monkeypatch, torch_nn):
    """AWD-LSTM's DropConnect: one mask per weight_hh for the whole chunk, even when document
    starts cut it into several calls of the layer; gradients reach the kept elements only."""
    rnn_class = torch.nn.LSTM if torch_nn else None
    drawn = []
    real = WeightDrop.forward

    def recording(self, w):
        out = real(self, w)
        drawn.append(out.detach().clone())
        return out

    torch.manual_seed(0)
    model = CharLM(13, hidden_size=12, num_layers=2, weight_drop=0.5, rnn_class=rnn_class)
    tokens = torch.randint(0, 13, (9, 3))
    mask = torch.zeros(9, 3, dtype=torch.bool)
    mask[[3, 6], [0, 2]] = True  # two document starts: three calls of the layer
    monkeypatch.setattr(WeightDrop, "forward", recording)
    logits, _ = model(tokens, None, Resets(mask))
    assert len(drawn) == 2, "one mask per layer for the chunk"
    # The same chunk through a model without weight drop, holding the masked weights.
    plain = CharLM(13, hidden_size=12, num_layers=2, rnn_class=rnn_class)
    state = {k.replace("parametrizations.", "").replace(".original", ""): v
             for k, v in model.state_dict().items()}
    plain.load_state_dict(state)
    with torch.no_grad():
        plain.rnn.weight_hh_l0.copy_(drawn[-2])
        plain.rnn.weight_hh_l1.copy_(drawn[-1])
    torch.testing.assert_close(logits, plain(tokens, None, mask)[0], rtol=0, atol=0)
    logits.sum().backward()
    grad = model.rnn.parametrizations.weight_hh_l0.original.grad
    assert torch.all(grad[drawn[-2] == 0] == 0) and grad[drawn[-2] != 0].abs().sum() > 0
    model.eval()
    plain.load_state_dict(state)
    torch.testing.assert_close(model(tokens)[0], plain.eval()(tokens)[0], rtol=0, atol=0)
    cells = model.step_cells()  # computed weights, taken as they are in eval
    step_state, outs = None, []
    for t in range(9):
        out, step_state = model.step(tokens[t], step_state, cells)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs), model(tokens)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="between 0 and 1"):
        CharLM(13, hidden_size=12, weight_drop=1.5)


def test_weight_tying_and_injected_class():
    m = CharLM(20, hidden_size=16, tie_weights=True, rnn_class=torch.nn.LSTM)
    assert m.decoder.weight is m.encoder.weight and isinstance(m.rnn, torch.nn.LSTM)
    with pytest.raises(ValueError, match="embedding_size == hidden_size"):
        CharLM(20, hidden_size=16, embedding_size=8, tie_weights=True)
    fused = CharLM(20, hidden_size=16, tie_weights=True, rnn_kwargs={"backend": "reference"})
    fused.load_state_dict(m.state_dict())  # same names both ways
    assert fused.rnn.backend == "reference"


def test_vocab_roundtrip_and_missing():
    v = Vocab.from_text("hello world")
    assert v.chars == " dehlorw" and v.decode(v.encode("world")) == "world"
    assert v.missing("hex!x") == ["x", "!"]
    with pytest.raises(KeyError):
        v.encode("x")


@pytest.mark.parametrize("kwargs,said", [
    ({"variable_length": True, "min_length": 0}, "min_length must be in"),
    ({"variable_length": True, "bptt": 3}, "min_length must be in"),
    ({"world_size": 0}, "world_size must be positive"),
])
def test_stream_batcher_refuses_settings_that_give_empty_chunks(kwargs, said):
    args = {"batch_size": 2, "bptt": 8, **kwargs}
    with pytest.raises(ValueError, match=said):
        StreamBatcher(torch.arange(100), **args)


@pytest.mark.parametrize("clip", [-1.0, float("nan"), float("inf"), "1"])
def test_train_chunk_refuses_a_bad_clip(clip):
    """A negative clip flipped the gradient and NaN made every weight NaN; now refused."""
    model = CharLM(7, cell="gru", hidden_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    chunk = StreamBatcher(torch.randint(0, 7, (50,)), 2, 10).next_chunk()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="clip"):
        train_chunk(model, chunk, None, opt, clip=clip)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_batch_first_rnn_is_refused():
    """Chunks are time-major: a batch_first module would run its recurrence across the batch."""
    with pytest.raises(ValueError, match="batch_first"):
        CharLM(7, cell="gru", hidden_size=4, rnn_kwargs={"batch_first": True})
    rnn = torch.nn.GRU(3, 4, batch_first=True)
    with pytest.raises(ValueError, match="batch_first"):
        run_rnn(rnn, torch.randn(5, 2, 3), None)


# ------------------------------------------------------------- found by a review (session 17)
def test_run_rnn_refuses_a_bidirectional_module_across_a_document_start():
    """Cut at a document start, the reverse direction of every row started at the cut, not at
    the chunk's end: rows without a reset came out other than ``rnn(x)``, with no error."""
    rnn = fused_rnn.GRU(3, 4, bidirectional=True, backend="reference")
    x = torch.randn(6, 2, 3)
    reset = torch.zeros(6, 2, dtype=torch.bool)
    reset[3, 1] = True
    with pytest.raises(ValueError, match="bidirectional, and a document starts inside"):
        run_rnn(rnn, x, None, reset)
    reset = torch.zeros(6, 2, dtype=torch.bool)
    reset[0, 1] = True  # at the chunk's first step there is no cut: allowed, and exact
    h = torch.randn(2, 2, 4)
    out, _ = run_rnn(rnn, x, h, reset)
    torch.testing.assert_close(out, rnn(x, mask_state(h, torch.tensor([True, False])))[0])


@pytest.mark.parametrize("state,keep", [
    pytest.param(torch.randn(2, 1, 4), torch.tensor([True, False, True]), id="batch-1-state"),
    pytest.param(torch.randn(2, 4), torch.tensor([False]), id="unbatched-state"),
    pytest.param(torch.randn(2, 3, 4), torch.tensor(True), id="0-d-keep"),
])
def test_mask_state_refuses_shapes_it_would_broadcast(state, keep):
    """torch.where broadcast them: a (L, 1, H) state came back (L, B, H), through run_rnn too."""
    with pytest.raises(ValueError, match="mask_state: "):
        mask_state(state, keep)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_stream_batcher_takes_any_integer_tokens(dtype):
    """A uint8 (byte-level) or int32 corpus failed later, in nn.Embedding or cross_entropy."""
    tokens = torch.randint(0, 11, (100,))
    got = StreamBatcher(tokens.to(dtype), 2, 5).next_chunk()
    want = StreamBatcher(tokens, 2, 5).next_chunk()
    assert got.x.dtype == got.y.dtype == torch.int64
    assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
    model = CharLM(11, hidden_size=8)
    train_chunk(model, got, None, torch.optim.SGD(model.parameters(), 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_stream_batcher_refuses_tokens_that_are_not_integers(dtype):
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        StreamBatcher(torch.zeros(100, dtype=dtype), 2, 5)


def test_train_chunk_refuses_clip_without_an_optimizer():
    """clip was ignored with optimizer=None (the gradients came back unclipped)."""
    model = CharLM(5, hidden_size=4)
    chunk = StreamBatcher(torch.randint(0, 5, (60,)), 2, 5).next_chunk()
    with pytest.raises(ValueError, match="with optimizer=None the gradients are left"):
        train_chunk(model, chunk, None, None, clip=1e-6)
    train_chunk(model, chunk, None, None)  # no clip: the gradients are the caller's


def test_atomic_save_gives_the_mode_torch_save_would(tmp_path):
    """mkstemp's 0600 used to survive the rename: others in a group could not read it."""
    old = os.umask(0o022)
    try:
        atomic_save({"a": 1}, tmp_path / "a.pt")
        torch.save({"a": 1}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    modes = [os.stat(tmp_path / n).st_mode & 0o777 for n in ("a.pt", "b.pt")]
    assert modes == [0o644, 0o644]


@pytest.mark.parametrize("kwargs", [{"proj_size": 4}, {"bidirectional": True}, {"dropout": 0.1}])
def test_charlm_refuses_rnn_kwargs_it_cannot_work_with(kwargs):
    """proj_size and bidirectional failed at the first forward with a shape mismatch in the
    decoder; dropout with a duplicate keyword."""
    with pytest.raises(ValueError, match=f"rnn_kwargs {next(iter(kwargs))}="):
        CharLM(8, hidden_size=8, rnn_kwargs=kwargs)


# ------------------------------------------------------------- found by mutation testing
def test_train_chunk_clips_the_unscaled_gradient_under_a_grad_scaler():
    """With a GradScaler the gradients are unscaled before the clip: the reported norm is the
    true one and the step's norm is clip. A power-of-two scale is exact, so both runs agree
    bit for bit with the run without a scaler."""
    def one_step(scaler):
        torch.manual_seed(0)
        model = CharLM(9, hidden_size=8)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        tokens = torch.randint(0, 9, (200,), generator=torch.Generator().manual_seed(1))
        chunk = StreamBatcher(tokens, 2, 10).next_chunk()
        _, _, norm = train_chunk(model, chunk, None, opt, clip=1e-3, scaler=scaler)
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        return norm, step

    norm, step = one_step(None)
    scaled_norm, scaled_step = one_step(torch.amp.GradScaler("cpu", init_scale=2.0**16))
    assert norm > 1e-3
    assert torch.equal(scaled_norm, norm) and torch.equal(scaled_step, step)
    torch.testing.assert_close(scaled_step.norm(), torch.tensor(1e-3), rtol=1e-3, atol=0)


def test_evaluate_is_the_mean_cross_entropy_of_whole_streams_with_state_carried():
    """evaluate's (total, count) over chunks of 7 (the last one short) equals one forward over
    each row's whole stream: the state is carried, each chunk weighs its own tokens, and the
    loss summed is the mean per token times the tokens."""
    torch.manual_seed(0)
    V = 11
    model = CharLM(V, cell="gru", hidden_size=8)
    tokens = torch.randint(0, V, (103,))
    whole = StreamBatcher(tokens, 3, 10_000).next_chunk()  # n = 34 steps a stream
    with torch.no_grad():
        logits, _ = model.eval()(whole.x)
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), whole.y.flatten(),
                                                 reduction="sum").item()
    model.train()
    total, count = evaluate(model, StreamBatcher(tokens, 3, 7))  # chunks of 7, 7, 7, 7, 6
    assert count == 3 * 34
    assert total == pytest.approx(want, rel=1e-6)


def test_evaluate_max_chunks_evaluates_exactly_that_many_chunks():
    """The bench's --val-chunks: max_chunks=k is k chunks, not k + 1."""
    model = CharLM(9, hidden_size=8)
    batcher = StreamBatcher(torch.randint(0, 9, (301,)), 2, 10)
    for k in (1, 2, 5):
        assert evaluate(model, batcher, max_chunks=k)[1] == k * 2 * 10


def test_evaluate_without_autocast_dtype_is_fp32_inside_a_callers_autocast():
    """autocast_dtype=None turns autocast off for the forward: a caller's bf16 region does not
    leak in (its rounding would change the validation loss)."""
    torch.manual_seed(0)
    model = CharLM(11, hidden_size=16)
    batcher = StreamBatcher(torch.randint(0, 11, (301,)), 3, 10)
    plain = evaluate(model, batcher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert evaluate(model, batcher) == plain
        assert evaluate(model, batcher, autocast_dtype=torch.bfloat16) != plain  # control


def test_bits_converts_nats_to_bits():
    """The CLI's *_bpc columns are bits(nats)."""
    from fused_rnn.tbptt import bits

    assert bits(math.log(2)) == pytest.approx(1.0, rel=1e-15)
    assert bits(math.log(256)) == pytest.approx(8.0, rel=1e-15)


def test_a_document_start_at_any_position_is_marked_once():
    """Each position in turn holds the only document start, the last step of a chunk
    included: exactly that token is marked (one start beyond B*n is in no stream)."""
    N, B, T = 61, 2, 5  # n = 30 steps a stream, chunks of 5
    for pos in range(N):  # the last, 60, is beyond B*n
        bounds = torch.zeros(N, dtype=torch.bool)
        bounds[pos] = True
        marked = []
        for c in StreamBatcher(torch.arange(N), B, T, boundaries=bounds).epoch():
            if c.reset is not None:
                marked += [int(c.x[t, b]) for t, b in torch.nonzero(c.reset.mask).tolist()]
        assert marked == ([pos] if pos < B * 30 else []), pos


@pytest.mark.parametrize("name,cls,kwargs", RNNS, ids=RNN_IDS)
def test_resets_at_step_1_and_at_adjacent_steps_match_a_step_by_step_run(name, cls, kwargs):
    """run_rnn cuts the chunk at every reset step, one-step pieces between adjacent cuts
    included: the same as stepping and zeroing each reset row's state before its step."""
    rnn = _make_rnn(cls, kwargs)
    T, B = 8, 3
    x = torch.randn(T, B, 3)
    mask = torch.zeros(T, B, dtype=torch.bool)
    mask[[1, 2, 3, 6, 7], [0, 1, 2, 0, 1]] = True
    h0 = torch.randn(2, B, 5)
    state = (h0, torch.randn(2, B, 5)) if isinstance(rnn, (torch.nn.LSTM, fused_rnn.LSTM)) else h0
    out, _ = run_rnn(rnn, x, state, mask)
    want = []
    for t in range(T):
        state = mask_state(state, ~mask[t])
        o, state = rnn(x[t : t + 1], state)
        want.append(o)
    torch.testing.assert_close(out, torch.cat(want), rtol=1e-5, atol=1e-6)


def test_batcher_state_restores_the_epoch_and_refuses_another_layout():
    """A resumed batcher continues in the saved epoch; a state of another bptt is refused."""
    tokens = torch.arange(101)
    a = StreamBatcher(tokens, 4, 7)
    for _ in range(5):  # 25 steps a stream, 4 chunks an epoch: into epoch 1
        a.next_chunk()
    b = StreamBatcher(tokens, 4, 7)
    b.load_state_dict(a.state_dict())
    assert (b.epoch_index, b.pos) == (1, 7)
    with pytest.raises(ValueError, match="bptt"):
        StreamBatcher(tokens, 4, 8).load_state_dict(a.state_dict())


def test_variable_lengths_are_clamped_and_halved_one_time_in_twenty():
    """AWD-LSTM's lengths: bptt (p 0.95) or bptt/2, plus N(0, 5) noise, clamped to
    [min_length, bptt + 20]. bptt + 20 is 4 sigma above bptt (p ~3e-5 a draw): 300k draws
    reach both clamps. The share of halved chunks: 0.05, within 6 sigma for 2000 chunks."""
    b = StreamBatcher(torch.arange(1000), 2, 8, variable_length=True, min_length=6, seed=0)
    lengths = [b._next_length() for _ in range(300_000)]
    assert (min(lengths), max(lengths)) == (6, 28)
    b = StreamBatcher(torch.arange(1_000_000), 2, 100, variable_length=True, seed=0)
    n = 2000
    short = sum(b.next_chunk().x.shape[0] < 75 for _ in range(n)) / n
    assert abs(short - 0.05) < 6 * math.sqrt(0.05 * 0.95 / n), short


def test_ranks_get_the_reset_masks_of_their_own_rows():
    """Under DDP the ranks' reset masks side by side are the one-process mask."""
    N = 503
    bounds = torch.zeros(N, dtype=torch.bool)
    bounds[[0, 37, 100, 260, 261, 400, 480]] = True
    whole = StreamBatcher(torch.arange(N), 6, 8, boundaries=bounds)
    parts = [StreamBatcher(torch.arange(N), 6, 8, boundaries=bounds, rank=r, world_size=3)
             for r in range(3)]

    def mask(c):
        return c.reset.mask if c.reset is not None else torch.zeros_like(c.x, dtype=torch.bool)

    resets = 0
    for _ in range(whole.steps_per_stream // 8 + 1):
        c = whole.next_chunk()
        assert torch.equal(torch.cat([mask(p.next_chunk()) for p in parts], 1), mask(c))
        resets += int(mask(c).sum())
    assert resets == 7  # every start lies in the inputs, tokens [0, 6 * 83)


# --------------------------------------------------------------------------- the model (more)
def test_charlm_dropout_acts_on_embeddings_between_layers_and_on_the_output():
    """dropout=p zeroes a share p of the embeddings and of the last layer's output (each kept
    element scaled by 1/(1-p)), and is the RNN's inter-layer dropout; weight_drop=p zeroes a
    share p of weight_hh. Shares within 6 sigma. None of it in eval mode. Without tied
    weights the embeddings are 64 wide."""
    torch.manual_seed(0)
    p = 0.5
    model = CharLM(50, cell="lstm", hidden_size=64, num_layers=2, dropout=p, weight_drop=p)
    seen = {}
    model.rnn.register_forward_hook(lambda m, inp, out: seen.__setitem__("rnn_in", inp[0]))
    model.decoder.register_forward_hook(lambda m, inp, out: seen.__setitem__("dec_in", inp[0]))
    tokens = torch.randint(0, 50, (40, 8))
    model.train()
    model(tokens)

    def zeros(t):
        return (t == 0).double().mean().item()

    def near_p(t):
        return abs(zeros(t) - p) < 6 * math.sqrt(p * (1 - p) / t.numel())

    emb = model.encoder(tokens)
    kept = seen["rnn_in"] != 0
    assert near_p(seen["rnn_in"]) and torch.equal(seen["rnn_in"][kept], emb[kept] / (1 - p))
    assert near_p(seen["dec_in"])
    assert model.rnn.dropout == p
    assert near_p(model.rnn.weight_hh_l0)
    model.eval()
    model(tokens)
    assert torch.equal(seen["rnn_in"], model.encoder(tokens))
    assert torch.equal(model.rnn.weight_hh_l0,
                       model.rnn.parametrizations.weight_hh_l0.original)
    assert CharLM(50, hidden_size=16).encoder.embedding_dim == 64
    assert CharLM(50, hidden_size=16, tie_weights=True).encoder.embedding_dim == 16


@pytest.mark.parametrize("torch_nn", [False, True], ids=["fused", "nn"])
def test_step_through_cells_keeps_a_relu_rnns_nonlinearity(torch_nn):
    """step_cells of a ReLU RNN are ReLU cells: stepping equals the layer forward."""
    rnn_class = torch.nn.RNN if torch_nn else None
    kw = {"nonlinearity": "relu"} | ({} if torch_nn else {"backend": "reference"})
    torch.manual_seed(0)
    model = CharLM(7, cell="rnn", hidden_size=6, num_layers=2, rnn_class=rnn_class,
                   rnn_kwargs=kw).eval()
    tokens = torch.randint(0, 7, (5, 2))
    with torch.no_grad():
        full, _ = model(tokens)
        cells, state, outs = model.step_cells(), None, []
        for t in range(5):
            logits, state = model.step(tokens[t], state, cells)
            outs.append(logits)
    torch.testing.assert_close(torch.stack(outs), full, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ raise statements no test reached (coverage)
@pytest.mark.parametrize("tokens,kwargs,said", [
    pytest.param(torch.arange(100).view(10, 10), {}, r"tokens must be 1-D, got shape \(10, 10\)",
                 id="2-d-tokens"),
    pytest.param(torch.arange(100), {"batch_size": 0}, "batch_size and bptt must be positive, got 0",
                 id="no-streams"),
    pytest.param(torch.arange(100), {"bptt": 0}, "batch_size and bptt must be positive, got 2, 0",
                 id="no-steps"),
    pytest.param(torch.arange(100), {"rank": 2, "world_size": 2},
                 "rank 2 out of range for world size 2", id="rank-past-the-end"),
    pytest.param(torch.arange(100), {"rank": -1, "world_size": 2},
                 "rank -1 out of range for world size 2", id="negative-rank"),
    pytest.param(torch.arange(4), {"batch_size": 4},
                 r"4 tokens are too few for 4 streams \(need at least 5\)", id="too-few-tokens"),
    pytest.param(torch.arange(100), {"boundaries": torch.zeros(99, dtype=torch.bool)},
                 "boundaries must have the shape of tokens", id="boundaries-shorter"),
    pytest.param(torch.arange(100), {"boundaries": torch.zeros(1, 100, dtype=torch.bool)},
                 "boundaries must have the shape of tokens", id="boundaries-2-d"),
])
def test_stream_batcher_refuses_a_bad_layout(tokens, kwargs, said):
    """Each refused before any stream is cut, saying which argument is wrong."""
    args = {"batch_size": 2, "bptt": 8, **kwargs}
    with pytest.raises(ValueError, match=said):
        StreamBatcher(tokens, **args)


@pytest.mark.parametrize("kwargs", [{"bptt": 2.5}, {"batch_size": 2.0}, {"rank": 0.5},
                                    {"world_size": "2"}, {"min_length": None}, {"seed": 1.0},
                                    {"bptt": True}])
def test_stream_batcher_refuses_sizes_that_are_not_integers(kwargs):
    """A float bptt used to build, then fail at the first chunk ("slice indices must be
    integers"); a float batch_size was blamed on the world size."""
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=f"{name} must be an integer, got"):
        StreamBatcher(torch.arange(100), **{"batch_size": 2, "bptt": 8, **kwargs})
    got = StreamBatcher(torch.arange(100), np.int64(2), torch.tensor(8), rank=np.int32(0))
    assert (type(got.batch_size), type(got.bptt), type(got.rank)) == (int, int, int)
    assert got.next_chunk().x.shape == (8, 2)


def test_a_bare_reset_mask_under_fullgraph_compile_says_what_to_pass():
    """Where a chunk is cut depends on the mask's values: compiled with fullgraph=True, a bare
    mask fails saying to pass a Resets built outside (which compiles); without fullgraph the
    compiler runs that part eagerly, with the eager results. (Without grad: before torch 2.10
    a compiled LSTM layer that trains runs the reference math, within rounding.)"""
    torch._dynamo.reset()
    model = CharLM(9, hidden_size=8, embedding_size=6).eval().requires_grad_(False)
    tokens = torch.randint(0, 9, (10, 3), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(10, 3, dtype=torch.bool)
    mask[4, 1] = True
    want, _ = model(tokens, None, mask)
    # torch 2.6's dynamo says only "Observed exception", with the line that raised
    says = ("build it outside the compiled function" if dynamo_reports_raised_messages()
            else "Observed exception")
    with pytest.raises(Exception, match=says):
        torch.compile(model, backend="eager", fullgraph=True)(tokens, None, mask)
    torch._dynamo.reset()
    got, _ = torch.compile(model, backend="eager")(tokens, None, mask)
    assert torch.equal(got, want)
    torch._dynamo.reset()
    got, _ = torch.compile(model, backend="eager", fullgraph=True)(tokens, None, Resets(mask))
    assert torch.equal(got, want)
    torch._dynamo.reset()


def test_state_rows_and_the_resets_repr():
    """state_rows takes batch rows (dim 1) of every state tensor; a Resets shows its steps."""
    h = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(state_rows(h, slice(1, 3)), h[:, 1:3])
    got = state_rows((h, h + 1), slice(0, 1))
    assert isinstance(got, tuple) and [tuple(t.shape) for t in got] == [(2, 1, 4)] * 2
    assert torch.equal(got[1], h[:, :1] + 1)
    assert state_rows(None, slice(0, 1)) is None
    _, resets = _mask_and_resets()
    assert repr(resets) == f"Resets(steps=(0, 4, 7), mask={tuple(resets.mask.shape)} on cpu)"


def test_charlm_refuses_what_it_cannot_build_or_step():
    """An unknown cell or vocabulary, and step-by-step generation through a stack without a
    single-step cell (a plain RNNBase), bidirectional, or with proj_size."""
    import functools

    assert repr(WeightDrop(0.25)) == "WeightDrop(p=0.25)"
    for chars in ("ba", "abca", "aab"):
        with pytest.raises(ValueError, match="sorted, distinct characters"):
            Vocab(chars)
    with pytest.raises(ValueError, match="unknown cell 'transformer'; expected one of lstm, gru"):
        CharLM(5, cell="transformer")
    model = CharLM(5, hidden_size=4, rnn_class=functools.partial(torch.nn.RNNBase, "LSTM"))
    with pytest.raises(TypeError, match="no single-step cell known for RNNBase"):
        model.step_cells()
    for kw in ({"bidirectional": True}, {"proj_size": 2}):
        model = CharLM(5, hidden_size=4, rnn_class=functools.partial(fused_rnn.LSTM, **kw))
        with pytest.raises(ValueError, match="needs a unidirectional stack, no proj_size"):
            model.step_cells()


# --------------------------------------------------------------------------- a helper's audit
def test_charlm_refuses_an_rnn_class_of_another_kind_than_its_cell():
    """rnn_class=nn.GRU with the default cell "lstm" built and trained, and step-by-step
    generation then failed (an IndexError, or logits of the wrong shape at batch 1): cell
    decides the state's form there."""
    with pytest.raises(ValueError, match=r"rnn_class GRU builds a gru layer but cell is "
                                         r"'lstm'; pass cell='gru'"):
        CharLM(9, hidden_size=8, rnn_class=torch.nn.GRU)
    model = CharLM(9, cell="rnn", hidden_size=8, rnn_class=torch.nn.RNN,
                   rnn_kwargs={"nonlinearity": "relu"})
    logits, _ = model.step(torch.tensor([1]), None, model.step_cells())
    assert logits.shape == (1, 9)


def test_evaluate_on_a_variable_length_batcher_scores_the_same_chunks_whenever_it_runs():
    """The lengths were drawn from wherever the batcher's generator stood, so a chunk drawn
    between two evaluations of the same model changed the score (and which tokens max_chunks
    covered)."""
    torch.manual_seed(0)
    model = CharLM(9, hidden_size=8)
    batcher = StreamBatcher(torch.randint(0, 9, (400,)), 2, 10, variable_length=True)
    for max_chunks in (None, 3):
        first = evaluate(model, batcher, max_chunks=max_chunks)
        batcher.next_chunk()
        assert evaluate(model, batcher, max_chunks=max_chunks) == first


def test_a_batcher_state_of_another_min_length_or_position_is_refused():
    """min_length shapes the drawn lengths but was neither saved nor checked, so a state
    loaded into a batcher of another min_length resumed with other chunks; a position past
    the streams gave an empty chunk. A state saved before min_length was recorded loads."""
    tokens = torch.randint(0, 9, (400,))
    saved = StreamBatcher(tokens, 2, 20, variable_length=True, min_length=5).state_dict()
    other = StreamBatcher(tokens, 2, 20, variable_length=True, min_length=18)
    with pytest.raises(ValueError, match="min_length is 18, the checkpoint has 5"):
        other.load_state_dict(saved)
    old = {k: v for k, v in saved.items() if k != "min_length"}
    other.load_state_dict(old)
    for pos in (-1, other.steps_per_stream):
        with pytest.raises(ValueError, match=f"position {pos} is outside"):
            other.load_state_dict({**old, "pos": pos})


def test_run_rnn_sees_through_a_wrapper_that_does_not_forward_attributes():
    """DataParallel and DistributedDataParallel keep the layer as ``.module`` without
    forwarding its attributes: run_rnn's guard against cutting a bidirectional layer at a
    document start did not see it, and the wrong result came back with no error."""
    rnn = torch.nn.DataParallel(fused_rnn.GRU(3, 4, bidirectional=True, backend="reference"))
    reset = torch.zeros(6, 2, dtype=torch.bool)
    reset[3, 1] = True
    with pytest.raises(ValueError, match="bidirectional, and a document starts inside"):
        run_rnn(rnn, torch.randn(6, 2, 3), None, reset)
    batch_first = torch.nn.DataParallel(torch.nn.GRU(3, 4, batch_first=True))
    with pytest.raises(ValueError, match="batch_first=True"):
        run_rnn(batch_first, torch.randn(6, 2, 3), None)


def test_train_chunk_detaches_a_state_that_comes_with_history():
    """The docstring said the state "comes in detached"; one with history made backward run
    into the previous chunk's graph (other gradients). It is detached first now."""
    torch.manual_seed(0)
    model = CharLM(9, hidden_size=8)
    batcher = StreamBatcher(torch.randint(0, 9, (200,)), 2, 10)
    first, second = batcher.next_chunk(), batcher.next_chunk()
    _, attached = model(first.x)  # the state with first's graph behind it
    grads = []
    for state in (attached, detach_state(attached)):
        train_chunk(model, second, state, None)
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_train_chunk_enters_a_chunk_with_the_state_it_is_given():
    """The chunk's loss and gradients are those of the state carried in (not of a zero state,
    which a train_chunk that dropped it would pass every other test with), except at an
    epoch's first chunk, which starts from zeros."""
    torch.manual_seed(0)
    model = CharLM(9, hidden_size=8)
    batcher = StreamBatcher(torch.randint(0, 9, (200,)), 2, 10)
    first, second = batcher.next_chunk(), batcher.next_chunk()
    assert first.first and not second.first
    with torch.no_grad():
        _, carried = model(first.x)
    results = {}
    for name, state in (("carried", carried), ("zeros", None)):
        want, _ = chunk_loss(model, second, state)
        loss, _, _ = train_chunk(model, second, state, None)
        assert loss.item() == pytest.approx(want.item(), rel=1e-6), name
        results[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert results["carried"][0] != pytest.approx(results["zeros"][0], rel=1e-4)
    assert not all(torch.equal(a, b) for a, b in zip(results["carried"][1], results["zeros"][1]))
    loss, _, _ = train_chunk(model, first, carried, None)  # an epoch starts: zeros
    assert loss.item() == pytest.approx(chunk_loss(model, first, None)[0].item(), rel=1e-6)


def test_atomic_save_takes_a_name_as_long_as_torch_save_does(tmp_path):
    """The temporary file's name added mkstemp's characters to the whole name, so a name of
    ~240 characters, which torch.save takes, passed the file system's limit."""
    path = tmp_path / ("c" * 240 + ".pt")
    atomic_save({"step": 1}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == [path.name]


def test_vocab_decode_refuses_an_id_outside_the_vocabulary():
    """A negative id indexed from the end of the vocabulary (-1: its last character)."""
    vocab = Vocab("abc")
    assert vocab.decode([0, 2]) == "ac"
    for bad in (-1, 3):
        with pytest.raises(IndexError, match=f"id {bad} outside"):
            vocab.decode([bad])
