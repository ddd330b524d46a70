"""A character-level language model: embedding → recurrent stack → linear.

The recurrent class is injectable (``rnn_class``): ``fused_rnn.LSTM`` (the default for
``cell="lstm"``, with any ``backend``) or ``torch.nn.LSTM``, so the benchmark trains the same
model on either. Both have the same parameter names, so a state_dict moves between them.

Examples::

    >>> import torch
    >>> from fused_rnn.charlm import CharLM
    >>> model = CharLM(vocab_size=50, cell="gru", hidden_size=32, num_layers=2)
    >>> logits, h = model(torch.randint(0, 50, (7, 3)))  # (T, B) token ids, time-major
    >>> tuple(logits.shape), tuple(h.shape)
    ((7, 3, 50), (2, 3, 32))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import fused_rnn
from fused_rnn.tbptt import Resets, State, run_rnn

__all__ = ["CELLS", "CharLM", "Vocab", "WeightDrop"]

CELLS = ("lstm", "gru", "rnn")


def _fused_class(cell: str):
    return {"lstm": fused_rnn.LSTM, "gru": fused_rnn.GRU, "rnn": fused_rnn.RNN}[cell]


# The single-step counterpart of each layer class, for generation one token at a time.
_CELL_OF = {
    fused_rnn.LSTM: fused_rnn.LSTMCell,
    fused_rnn.GRU: fused_rnn.GRUCell,
    fused_rnn.RNN: fused_rnn.RNNCell,
    nn.LSTM: nn.LSTMCell,
    nn.GRU: nn.GRUCell,
    nn.RNN: nn.RNNCell,
}


def _step_cell_class(rnn: nn.Module):
    # isinstance, not type(): a parametrized module's class is a subclass made for it.
    return next((cell for layer, cell in _CELL_OF.items() if isinstance(rnn, layer)), None)


class WeightDrop(nn.Module):
    """DropConnect on a weight, AWD-LSTM's regulariser of the recurrent weights, as a
    ``torch.nn.utils.parametrize`` parametrization: in training each element is zeroed with
    probability ``p`` (the rest scaled by 1/(1-p)); in eval the weight is unchanged.

    One mask a call of the module; :class:`CharLM` keeps one mask for a whole chunk, however
    many calls document starts cut it into. The kernels see an ordinary weight, so every
    backend runs it.

    Examples::

        >>> import torch, fused_rnn
        >>> from torch.nn.utils import parametrize
        >>> lstm = fused_rnn.LSTM(4, 8)
        >>> _ = parametrize.register_parametrization(lstm, "weight_hh_l0", WeightDrop(0.5))
        >>> _ = torch.manual_seed(0)
        >>> dropped = (lstm.weight_hh_l0 == 0).float().mean().item()
        >>> 0.3 < dropped < 0.7, torch.equal(lstm.eval().weight_hh_l0,
        ...                                  lstm.parametrizations.weight_hh_l0.original)
        (True, True)
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:  # as nn.Dropout
            raise ValueError(f"weight dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, weight: Tensor) -> Tensor:
        return F.dropout(weight, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Vocab:
    """Characters ↔ ids; ids follow the sorted characters (so a vocab is just a string)."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError("a vocabulary is a string of sorted, distinct characters")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def missing(self, text: str) -> list[str]:
        """The distinct characters of ``text`` not in the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.index))

    def encode(self, text: str) -> Tensor:
        missing = self.missing(text)
        if missing:
            raise KeyError(f"characters not in the vocabulary: {''.join(missing)!r}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        n = len(self.chars)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:  # a negative id would index from the end
                raise IndexError(f"Vocab.decode: id {i} outside the vocabulary's 0..{n - 1}")
            out.append(self.chars[i])
        return "".join(out)


# The torch.nn (and fused_rnn) layers' mode, as CharLM's cell.
_KINDS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn", "RNN_RELU": "rnn"}


class CharLM(nn.Module):
    """Embedding → recurrent stack (``num_layers``, dropout) → linear, optional weight tying.

    vocab_size: number of characters; cell: "lstm", "gru" or "rnn" (tanh); embedding_size:
    defaults to ``hidden_size`` with ``tie_weights`` (required then) else 64; dropout: on the
    embeddings, between recurrent layers and on the last layer's output (training only);
    weight_drop: AWD-LSTM's DropConnect on every layer's ``weight_hh`` (:class:`WeightDrop`;
    one mask a chunk; training only; 0 = off, and the state_dict keys are then torch.nn's);
    rnn_class: a class with nn.LSTM's constructor (default: fused_rnn's class for ``cell``);
    rnn_kwargs: extra keyword arguments for it, e.g. ``{"backend": "triton"}``.

    ``forward(tokens, state=None, reset=None)``: tokens (T, B) long; state as the recurrent
    class takes it; reset a :class:`~fused_rnn.tbptt.Resets`, a (T, B) bool mask or None
    (see :func:`fused_rnn.tbptt.run_rnn`).
    Returns logits (T, B, vocab_size) and the new state.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        cell: str = "lstm",
        hidden_size: int = 256,
        num_layers: int = 1,
        embedding_size: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = False,
        weight_drop: float = 0.0,
        rnn_class=None,
        rnn_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; expected one of {', '.join(CELLS)}")
        if embedding_size is None:
            embedding_size = hidden_size if tie_weights else 64
        if tie_weights and embedding_size != hidden_size:
            raise ValueError(
                f"tied weights need embedding_size == hidden_size, got {embedding_size} "
                f"and {hidden_size}"
            )
        self.config = dict(
            vocab_size=vocab_size,
            cell=cell,
            hidden_size=hidden_size,
            num_layers=num_layers,
            embedding_size=embedding_size,
            dropout=dropout,
            tie_weights=tie_weights,
            weight_drop=weight_drop,
        )
        self.cell = cell
        self.encoder = nn.Embedding(vocab_size, embedding_size)
        self.drop = nn.Dropout(dropout)
        rnn_class = rnn_class or _fused_class(cell)
        if (rnn_kwargs or {}).get("batch_first"):
            raise ValueError("CharLM: rnn_kwargs batch_first=True is not supported (the model "
                             "is time-major: tokens are (T, B))")
        for key, why in (("bidirectional", "a language model predicts from the past only"),
                         ("proj_size", "the decoder reads hidden_size features"),
                         ("dropout", "CharLM's own dropout= sets it between layers")):
            if (rnn_kwargs or {}).get(key):
                raise ValueError(f"CharLM: rnn_kwargs {key}={rnn_kwargs[key]!r} is not "
                                 f"supported ({why})")
        self.rnn = rnn_class(
            embedding_size,
            hidden_size,
            num_layers,
            dropout=dropout if num_layers > 1 else 0.0,
            **(rnn_kwargs or {}),
        )
        # cell decides the state's form in step(), split_state() and generation: a class of
        # another kind (rnn_class=nn.GRU with the default cell "lstm") failed only there.
        kind = _KINDS.get(getattr(self.rnn, "mode", None))
        if kind is not None and kind != cell:
            raise ValueError(f"CharLM: rnn_class {rnn_class.__name__} builds a {kind} layer "
                             f"but cell is {cell!r}; pass cell={kind!r}")
        if weight_drop:
            drop = WeightDrop(weight_drop)  # checks the range
            for name in [n for n, _ in self.rnn.named_parameters() if n.startswith("weight_hh")]:
                parametrize.register_parametrization(self.rnn, name, WeightDrop(drop.p))
        self.decoder = nn.Linear(hidden_size, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor, state: State = None, reset: Resets | Tensor | None = None):
        x = self.drop(self.encoder(tokens))
        # In training, one weight-dropout mask for all the chunk's pieces. In eval the dropout
        # is the identity, and no cache lets torch.jit.trace and the ONNX exporter trace the
        # model (parametrize refuses to trace inside cached()).
        if self.training and parametrize.is_parametrized(self.rnn):
            with parametrize.cached():
                out, state = run_rnn(self.rnn, x, state, reset)
        else:
            out, state = run_rnn(self.rnn, x, state, reset)
        return self.decoder(self.drop(out)), state

    # ---------------------------------------------------------------- one step at a time
    def step_cells(self) -> list[nn.Module]:
        """One cell module per layer, sharing the layer's parameters (no copies).

        For fused_rnn layers these are fused_rnn cells with the layer's backend: the fused
        single-step path. Kept in a plain list, so they add nothing to the state_dict. A
        parametrized weight (weight dropout) is taken as it is computed now, detached: call
        this in eval mode, after training, as generation does.
        """
        rnn = self.rnn
        cell_class = _step_cell_class(rnn)
        if cell_class is None:
            raise TypeError(f"no single-step cell known for {type(rnn).__name__}")
        if getattr(rnn, "bidirectional", False) or getattr(rnn, "proj_size", 0):
            raise ValueError("step-by-step generation needs a unidirectional stack, no proj_size")
        kwargs = {}
        if isinstance(rnn, (fused_rnn.RNN, nn.RNN)):
            kwargs["nonlinearity"] = rnn.nonlinearity
        if cell_class in (fused_rnn.LSTMCell, fused_rnn.GRUCell, fused_rnn.RNNCell):
            kwargs["backend"] = rnn.backend
        cells = []
        p = next(rnn.parameters())
        for layer in range(rnn.num_layers):
            in_size = rnn.input_size if layer == 0 else rnn.hidden_size
            cell = cell_class(in_size, rnn.hidden_size, bias=rnn.bias, device="meta",
                              dtype=p.dtype, **kwargs)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if rnn.bias or name.startswith("weight"):
                    value = getattr(rnn, f"{name}_l{layer}")
                    if not isinstance(value, nn.Parameter):  # computed by a parametrization
                        delattr(cell, name)
                        value = value.detach()
                    setattr(cell, name, value)
            cells.append(cell)
        return cells

    def step(self, tokens: Tensor, state: State, cells: list[nn.Module]):
        """One token per row through the cells: tokens (B,) → logits (B, V), new state.

        ``state`` is in the layer's format ((L, B, H), a tuple for LSTM, or None).
        """
        logits, layers = self.step_layers(tokens, self.split_state(state), cells)
        if self.cell == "lstm":
            return logits, (torch.stack([h for h, _ in layers]),
                            torch.stack([c for _, c in layers]))
        return logits, torch.stack(layers)

    def split_state(self, state: State) -> list | None:
        """The layer's state ((L, B, H), a tuple for LSTM, or None) as :meth:`step_layers`
        takes it: a list of one entry a layer (views, no copies), or None."""
        if state is None:
            return None
        if self.cell == "lstm":
            return list(zip(state[0].unbind(0), state[1].unbind(0)))
        return list(state.unbind(0))

    def step_layers(self, tokens: Tensor, states: list | None, cells: list[nn.Module]):
        """:meth:`step` with the state one entry a layer, as the cells take it: ``(h, c)``
        for LSTM, else ``h`` ((B, H) each); None for zeros. Returns logits (B, V) and the new
        list. A loop that carries this list, as generation does, slices and stacks no state
        a token (on a GPU, two kernel launches fewer a token).

        Examples::

            >>> import torch
            >>> from fused_rnn.charlm import CharLM
            >>> model = CharLM(10, hidden_size=8, num_layers=2).eval()
            >>> cells, states = model.step_cells(), None
            >>> with torch.no_grad():
            ...     for token in torch.tensor([[1], [2], [3]]):
            ...         logits, states = model.step_layers(token, states, cells)
            >>> tuple(logits.shape), len(states), tuple(states[1][0].shape)
            ((1, 10), 2, (1, 8))
        """
        if states is not None and len(states) != len(cells):
            raise ValueError(f"step_layers: {len(states)} layer states for {len(cells)} "
                             "cells; give one a layer (split_state), or None for zeros")
        x = self.encoder(tokens)
        new_states = []
        for layer, cell in enumerate(cells):
            state = cell(x, None if states is None else states[layer])
            new_states.append(state)
            x = state[0] if self.cell == "lstm" else state
        return self.decoder(x), new_states

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
