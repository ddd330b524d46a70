"""Drop-in replacements for torch.nn.LSTM/GRU/RNN and their cells.

Same constructor arguments, parameter names, shapes, order and initialisation as torch.nn,
so state_dicts move both ways, plus a keyword-only ``backend``. The classes derive from
``nn.Module``, not ``nn.LSTM``/``GRU``/``RNN``: dynamo deliberately graph-breaks on those and
their subclasses, and these modules are meant to be traced by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fused_rnn import backends, functional, fx
from fused_rnn.ops.common import autocast_eligible
from fused_rnn.ops.reference import GATES

__all__ = ["GRU", "LSTM", "RNN", "GRUCell", "LSTMCell", "RNNCell"]

_MODE_NAMES = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}
_VF_LAYER = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def _dtypes_differ(a: Tensor, b: Tensor) -> bool:
    """Two dtypes a call cannot mix: different, unless an autocast region will cast both to its
    own (it casts floating tensors other than fp64; fp64 and complex keep theirs)."""
    if a.dtype == b.dtype:
        return False
    return not (torch._C._is_any_autocast_enabled() and autocast_eligible(a)
                and autocast_eligible(b))


# The dtypes a cell computes in: the floating ones (complex ones reach torch's own errors).
_CELL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _plain(t, shape: tuple, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``t`` is a tensor of ``shape``, ``dtype`` and ``device`` (the cells' quick
    check; anything else takes the checks that say what is wrong)."""
    return (isinstance(t, Tensor) and t.dtype is dtype and t.shape == shape
            and t.device == device)


def _check_batch_sizes(data: Tensor, batch_sizes: Tensor) -> None:
    """A PackedSequence's batch_sizes as pack_padded_sequence makes them, or a RuntimeError
    naming them (PackedSequence's constructor takes any): 1-D int64 on the CPU, positive,
    non-increasing, summing to data's rows. A short one dropped rows silently here; torch.nn's
    kernels fail on it with a view's shape error, or take it (GRU)."""
    if batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
        raise RuntimeError(
            f"PackedSequence: batch_sizes must be a 1-D int64 CPU tensor, got a "
            f"{batch_sizes.dim()}-D {batch_sizes.dtype} one on {batch_sizes.device}")
    if torch.compiler.is_compiling():  # data-dependent: eager only
        return
    if batch_sizes.numel() == 0 or bool((batch_sizes <= 0).any()) or bool(
            (batch_sizes[1:] > batch_sizes[:-1]).any()):
        raise RuntimeError(
            "PackedSequence: batch_sizes must be positive and non-increasing (as "
            f"pack_padded_sequence makes them), got {batch_sizes.tolist()}")
    rows = int(batch_sizes.sum())
    if rows != data.size(0):
        raise RuntimeError(f"PackedSequence: batch_sizes sum to {rows} rows, but its data has "
                           f"{data.size(0)}")


def _apply_permutation(t: Tensor, permutation: Tensor | None, dim: int = 1) -> Tensor:
    return t if permutation is None else t.index_select(dim, permutation)


def _refuse_torchscript(self: nn.Module):
    """``torch.jit.script`` calls this first. The backends are torch.library ops chosen in
    Python, which TorchScript cannot compile; without this it fails deep in the frontend."""
    # The fused_rnn class it is (a subclass of one is named by its own name and that class's):
    # torch.nn has a class of that name, which a user's subclass has not.
    base = next(c for c in type(self).__mro__ if c.__module__ == __name__)
    name = type(self).__name__
    what = f"fused_rnn.{name}" if type(self) is base else f"{name} (a fused_rnn.{base.__name__})"
    # Scripting torch.nn's cell with the same state_dict works; a scripted torch.nn layer
    # (torch 2.13) has no forward, so for the layers that is no advice.
    other = (f", or script a torch.nn.{base.__name__} with this module's state_dict loaded "
             f"(the two are interchangeable)" if base.__name__.endswith("Cell") else "")
    raise RuntimeError(
        f"{what} cannot be compiled by TorchScript (torch.jit.script). Use "
        f"torch.compile or torch.export instead{other}."
    )


class _Recurrent(nn.Module):
    """What the layers and the cells share: torch.nn's initialisation, a ``backend`` checked
    where it is set, and a clear refusal from TorchScript."""

    __prepare_scriptable__ = _refuse_torchscript

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def __setattr__(self, name: str, value) -> None:
        # ``m.backend = ...`` is checked where it is written; a bad name used to surface at the
        # next call, under torch.compile(fullgraph=True) as dynamo's "Observed exception".
        if name == "backend":
            value = backends.check_name(value)
        super().__setattr__(name, value)


class _RNNStack(_Recurrent):
    """Parameters, layers, directions, dropout, packing and hx defaults for all three RNNs."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # The checks and messages follow torch.nn.RNNBase, in its order, so callers see the
        # same errors. It converts dropout with float() before it checks it: a TypeError for
        # None, and a string float() reads goes on to the range check's ValueError.
        float(dropout)
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of "
                "an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                "dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}",
                stacklevel=3,
            )
        # bidirectional too: torch.nn refuses a non-bool one at the first call (its kernel's
        # argument parsing), where "False", a truthy string, would make this stack two-way
        for name, value in (("bias", bias), ("batch_first", batch_first),
                            ("bidirectional", bidirectional)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        # torch.nn takes any integer here (a numpy int, a 0-d tensor) and refuses others with
        # a TypeError; the kernels get a Python int. It compares num_layers and proj_size
        # before it uses them: a float num_layers <= 0 or a bad proj_size is a ValueError
        # first, and only then is any other float num_layers a TypeError (its range()). So is
        # proj_size only compared before it sizes a weight: torch.nn also takes a False or a
        # 0.0 (no projection) and refuses other bools and floats by their value first
        # (ValueError) or at the weight (TypeError).
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections"
            )
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if isinstance(num_layers, bool):  # operator.index takes True as 1; torch.nn's call not
            raise TypeError("num_layers should be of type int, got: bool")
        num_layers = operator.index(num_layers)
        if isinstance(proj_size, (bool, float)) and proj_size != 0:
            raise TypeError(f"proj_size must be an integer, got {proj_size!r}")
        proj_size = 0 if isinstance(proj_size, (bool, float)) else operator.index(proj_size)
        self.backend = backends.check_name(backend)

        self.mode = mode
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        # The weights' order in cuDNN's buffer, when flatten_parameters laid them out in one
        # (a GPU); the torch backend then lays out casts and single layers the same way.
        self._cudnn_order: list[int] | None = None
        for layer_shapes in self._weight_shapes():
            for name, shape in layer_shapes:
                setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
            names = [name for name, _ in layer_shapes]
            self._flat_weights_names.extend(names)
            self._all_weights.append(names)
        self.reset_parameters()
        self.flatten_parameters()

    def __setstate__(self, state: dict) -> None:
        """Unpickling: what a module pickled by an older version, or a torch.nn module
        unpickled as this class, lacks gets its default."""
        super().__setstate__(state)
        # nn.RNNBase keeps its weights in a list too: hidden by the property here, that list
        # would keep the first weights alive (and in every pickle) after they are replaced.
        self.__dict__.pop("_flat_weights", None)
        self.__dict__.pop("_flat_weight_refs", None)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_cudnn_order", None)
        self.__dict__.setdefault("proj_size", 0)  # torch.nn before 1.8 had none

    def _weight_shapes(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """(name, shape) of every weight, one list per layer and direction, in torch.nn's
        names and order."""
        gate_size = GATES[self.mode] * self.hidden_size
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        num_dir = 2 if self.bidirectional else 1
        out = []
        for layer in range(self.num_layers):
            for direction in range(num_dir):
                layer_in = self.input_size if layer == 0 else real_hidden * num_dir
                shapes = [("weight_ih", (gate_size, layer_in)),
                          ("weight_hh", (gate_size, real_hidden))]
                if self.bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if self.proj_size > 0:
                    shapes += [("weight_hr", (self.proj_size, self.hidden_size))]
                suffix = "_reverse" if direction == 1 else ""
                out.append([(f"{base}_l{layer}{suffix}", shape) for base, shape in shapes])
        return out

    def flatten_parameters(self) -> None:
        """Lay the parameters out in one buffer, in cuDNN's order, as ``nn.RNNBase`` does.

        Only on a GPU, with cuDNN usable for the weights' dtype; elsewhere a no-op. The
        ``torch`` backend (and so ``auto`` wherever no rule picks a kernel) hands the weights
        to cuDNN, which otherwise copies them into such a buffer at every call and warns. The
        parameters stay separate, contiguous tensors (views into the buffer), which is all the
        kernel backends need. Called on construction and after ``.to()``/``.cuda()``/``.half()``.

        The order the buffer holds them in is kept: what the ``torch`` backend hands cuDNN
        in another buffer (casts under autocast; one layer at a time when dropout between
        layers runs outside cuDNN) is laid out the same way, so cuDNN takes that in place too.
        """
        self._cudnn_order = None
        if any(parametrize.is_parametrized(self, n) for n in self._flat_weights_names):
            return  # computed anew at every call: nothing stays in a buffer (cuDNN copies)
        w = self._present_weights()
        if any(t is None for t in w):
            return  # one deleted for now (a weight-dropout wrapper sets it at each call): as nn
        if not _cudnn_can_flatten(w):
            return
        import torch.backends.cudnn.rnn as cudnn_rnn

        with torch.cuda.device_of(w[0]), torch.no_grad():
            if torch._use_cudnn_rnn_flatten_weight():
                torch._cudnn_rnn_flatten_weight(
                    w,
                    len(self._all_weights[0]),  # tensors per layer and direction
                    self.input_size,
                    cudnn_rnn.get_cudnn_mode(self.mode),
                    self.hidden_size,
                    self.proj_size,
                    self.num_layers,
                    self.batch_first,
                    bool(self.bidirectional),
                )
        self._cudnn_order = _buffer_order(self._flat_weights)

    def _apply(self, fn, recurse=True):
        ret = super()._apply(fn, recurse)
        self.flatten_parameters()  # .to()/.cuda()/.half() made new tensors
        return ret

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The weights as this call sees them, read from their attributes each time (so a
        weight assigned, deleted and set again, or swapped by ``functional_call``, is seen).
        No ``getattr`` default: with one, dynamo guards on the attribute, and evaluating that
        guard before each compiled call computed a parametrized weight once more (a second
        dropout mask drawn, outside ``parametrize.cached()``; NOTES, twenty-second session).
        A deleted weight's AttributeError would come out of this property as a missing
        ``_flat_weights`` (``nn.Module.__getattr__``), so it is said as a TypeError."""
        flat = []
        for name in self._flat_weights_names:
            try:
                flat.append(getattr(self, name))
            except AttributeError as e:
                raise TypeError(
                    f"{type(self).__name__}: weight {name} is missing (a module built with "
                    f"bias={self.bias} uses every weight in _flat_weights_names)"
                ) from e
        return flat

    @_flat_weights.setter
    def _flat_weights(self, value) -> None:
        raise AttributeError(
            "fused_rnn modules read their weights from the attributes named in "
            "_flat_weights_names at every call; assign those (e.g. "
            f"setattr(module, {self._flat_weights_names[0]!r}, w)) instead of _flat_weights"
        )

    # nn.RNNBase keeps _flat_weights as a list that these refresh; code written for it (weight
    # dropout wrappers, pruning) calls them after swapping weights. Here there is nothing to
    # refresh: _flat_weights reads the attributes.
    def _init_flat_weights(self) -> None:
        self.flatten_parameters()

    def _update_flat_weights(self) -> None:
        pass

    @property
    def _flat_weight_refs(self) -> list:
        return [None if w is None else weakref.ref(w) for w in self._present_weights()]

    def _present_weights(self) -> list[Tensor | None]:
        """The weights, None for one deleted for now, as nn.RNNBase's list holds it (AWD-LSTM's
        weight dropout deletes W_hh and sets it again in each forward, and the model is moved
        in between). Not for forward: the getattr default would be a dynamo guard there
        (_flat_weights)."""
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def _layer_weights(self, flat: list[Tensor]) -> list[tuple[Tensor | None, ...]]:
        """``flat`` (``_flat_weights``, fetched once per call) as per-layer tuples."""
        by_name = dict(zip(self._flat_weights_names, flat))
        out = []
        for names in self._all_weights:
            w = {n.split("_l")[0]: by_name[n] for n in names}
            out.append(tuple(w.get(k) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")))
        return out

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    # ---------------------------------------------------------------- argument checks
    def _check_input(self, input: Tensor, packed: bool, w: Tensor | None = None) -> None:
        """w: the first weight as this call uses it (default: fetched here)."""
        if w is None:
            w = getattr(self, self._flat_weights_names[0])
        if _dtypes_differ(input, w):
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
                f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})"
            )
        if input.device != w.device:
            raise RuntimeError(
                f"Input and parameter tensors are not at the same device, found input tensor "
                f"at {input.device} and parameter tensor at {w.device}"
            )
        expected = 2 if packed else 3
        if input.dim() != expected:
            raise RuntimeError(f"input must have {expected} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.size(-1)}"
            )

    def _check_weights(self, flat: list) -> None:
        """Every weight a tensor of its shape, all of one dtype (autocast casts them) and on
        one device: what PyTorch's kernels require (torch.nn raises the same exception types;
        for a wrong shape, aten's CPU LSTM reads and writes out of bounds instead)."""
        first = flat[0]
        # From the settings as they are now: nn lets a user change input_size and the weights.
        shapes = [shape for layer in self._weight_shapes() for _, shape in layer]
        if len(shapes) != len(flat):  # num_layers, bidirectional, bias or proj_size set since
            raise RuntimeError(
                f"{type(self).__name__}: num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, bias={self.bias} and "
                f"proj_size={self.proj_size} take {len(shapes)} weights, but the module has "
                f"{len(flat)} ({', '.join(self._flat_weights_names)}): they size the weights "
                "when it is built; build a new module to change them"
            )
        for name, w, shape in zip(self._flat_weights_names, flat, shapes):
            if not isinstance(w, Tensor):
                raise TypeError(
                    f"{type(self).__name__}: weight {name} is {type(w).__name__}, not a tensor "
                    f"(a module built with bias={self.bias} uses every weight in "
                    "_flat_weights_names)"
                )
            if tuple(w.shape) != shape:
                raise RuntimeError(
                    f"{type(self).__name__}: weight {name} has shape {tuple(w.shape)}, expected "
                    f"{shape} (input_size={self.input_size}, hidden_size={self.hidden_size}, "
                    f"proj_size={self.proj_size})"
                )
            if _dtypes_differ(w, first):
                raise RuntimeError(
                    f"{type(self).__name__}: weight {name} is {w.dtype} but "
                    f"{self._flat_weights_names[0]} is {first.dtype}; all weights need one dtype"
                )
            if w.device != first.device:
                raise RuntimeError(
                    f"{type(self).__name__}: weight {name} is on {w.device} but "
                    f"{self._flat_weights_names[0]} is on {first.device}"
                )

    def _check_hidden(self, h: Tensor, expected: tuple[int, ...], msg: str, input: Tensor) -> None:
        if tuple(h.size()) != expected:
            raise RuntimeError(msg.format(expected, list(h.size())))
        if h.device != input.device:
            raise RuntimeError(
                f"Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {h.device}"
            )
        if _dtypes_differ(h, input):
            raise RuntimeError(
                f"hidden state dtype ({h.dtype}) does not match input dtype ({input.dtype})"
            )

    # ---------------------------------------------- nn.RNNBase's public helpers, for subclasses
    # Code that subclasses nn.LSTM/GRU/RNN (its own forward) calls these; same results and
    # exceptions as torch.nn (check_input also rejects a device mismatch).
    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        self._check_input(input, packed=batch_sizes is not None)

    def get_expected_hidden_size(self, input: Tensor,
                                 batch_sizes: Tensor | None) -> tuple[int, int, int]:
        if batch_sizes is not None:
            batch = int(batch_sizes[0])
        else:
            batch = input.size(0) if self.batch_first else input.size(1)
        size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (self.num_layers * (2 if self.bidirectional else 1), batch, size)

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: tuple[int, int, int],
                          msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(self, input: Tensor, hidden, batch_sizes: Tensor | None) -> None:
        self.check_input(input, batch_sizes)
        expected = self.get_expected_hidden_size(input, batch_sizes)
        if self.mode != "LSTM":
            self.check_hidden_size(hidden, expected)
            return
        self.check_hidden_size(hidden[0], expected, "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx, permutation: Tensor | None):
        if permutation is None:
            return hx
        if self.mode == "LSTM":
            return _apply_permutation(hx[0], permutation), _apply_permutation(hx[1], permutation)
        return _apply_permutation(hx, permutation)

    # ---------------------------------------------------------------- forward
    def _forward(self, input, hx):
        """Shared forward. hx: Tensor (GRU/RNN), tuple (LSTM) or None."""
        fx.refuse_proxy(self, input, hx)
        # Every weight is read once a call: a parametrized weight (weight dropout, weight
        # norm) is computed once, and that value is what the checks and the kernels see.
        flat = self._flat_weights
        is_lstm = self.mode == "LSTM"
        num_dir = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        is_batched = True
        sorted_indices = unsorted_indices = batch_sizes = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            # the input against the first weight first, then the weights (torch.nn's order)
            self._check_input(data, packed=True, w=flat[0])
            self._check_weights(flat)
            _check_batch_sizes(data, batch_sizes)
            batch = int(batch_sizes[0])
            ref = data
        else:
            if input.dim() not in (2, 3):
                # torch.nn's wording, which differs by class ("tensor" in RNN's only)
                what = "D tensor" if self.mode.startswith("RNN") else "D"
                raise ValueError(
                    f"{_MODE_NAMES[self.mode]}: Expected input to be 2D or 3D, got "
                    f"{input.dim()}{what} instead"
                )
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            self._check_input(input, packed=False, w=flat[0])
            self._check_weights(flat)
            if not torch.jit.is_tracing() and input.size(1 - batch_dim) == 0:  # as aten's
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            batch = input.size(batch_dim)
            ref = input
            if hx is not None:
                if (is_lstm and isinstance(hx, Tensor) and hx.dim() > 0 and hx.size(0) >= 2
                        and (not is_batched or hx.dim() != 4)):
                    # torch.nn.LSTM reads hx[0] and hx[1] before it looks at hx's type: h_0
                    # and c_0 stacked in one tensor work with an unbatched input, and with a
                    # batched one fail on their dimensions (RuntimeError), as here. More than
                    # two stacked are refused, as three in a tuple (nn drops the rest); fewer
                    # than two (nn: an IndexError) get the TypeError of any other tensor.
                    # (Batched, only the first two are read, as by nn: a lone h_0 of a
                    # 3-layer stack gets nn's "should also be 3-D", not "got 3" tensors.)
                    hx = tuple(hx) if hx.size(0) > 2 and not is_batched else (hx[0], hx[1])
                self._check_hx_structure(hx)
                hs = hx if is_lstm else (hx,)
                want = 3 if is_batched else 2
                if any(h.dim() != want for h in hs):
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    dims = ", ".join(f"{h.dim()}-D" for h in hs)  # torch.nn's wording:
                    got = f"({dims}) tensors" if is_lstm else f"{dims} tensor"
                    raise RuntimeError(
                        f"For {kind} input, hx{' and cx' if is_lstm else ''} should also be "
                        f"{want}-D but got {got}"
                    )
                if not is_batched:
                    hs = tuple(h.unsqueeze(1) for h in hs)
                hx = hs if is_lstm else hs[0]

        h_shape = (self.num_layers * num_dir, batch, real_hidden)
        c_shape = (self.num_layers * num_dir, batch, self.hidden_size)
        if hx is None:
            h0 = torch.zeros(h_shape, dtype=ref.dtype, device=ref.device)
            c0 = torch.zeros(c_shape, dtype=ref.dtype, device=ref.device) if is_lstm else None
        elif is_lstm:
            self._check_hx_structure(hx)
            h0, c0 = hx
            self._check_hidden(h0, h_shape, "Expected hidden[0] size {}, got {}", ref)
            self._check_hidden(c0, c_shape, "Expected hidden[1] size {}, got {}", ref)
        else:
            self._check_hx_structure(hx)
            h0, c0 = hx, None
            self._check_hidden(h0, h_shape, "Expected hidden size {}, got {}", ref)
        # Caller's batch order -> the packed (sorted) order.
        h0 = _apply_permutation(h0, sorted_indices)
        c0 = None if c0 is None else _apply_permutation(c0, sorted_indices)

        steps = batch_sizes.size(0) if packed else input.size(1 - batch_dim)
        stack = (self.stack_config(ref.device, ref.dtype, batch, packed, steps)
                 if backends.reads_stack(self.backend) else {})
        backend = backends.resolve_stack(self.backend, ref.device, **stack)
        if backend == "torch" and not backends.torch_runs_per_layer(ref.device):
            y, h_n, c_n = self._torch_stack(input, h0, c0, packed, flat)
        else:
            lengths = None
            if packed:
                x, lengths_cpu = pad_packed_sequence(PackedSequence(data, batch_sizes))
                lengths = lengths_cpu.to(x.device)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
            # As torch.nn: dropout (which a user may set after construction) is read, and
            # checked, only where it applies
            dropout = self.dropout if self.training and self.num_layers > 1 else 0.0
            if not 0 <= dropout <= 1:
                raise RuntimeError(
                    f"dropout probability has to be between 0 and 1, but got {dropout:g}")
            y, h_n, c_n = functional.rnn(
                self.mode,
                x,
                h0,
                c0,
                self._layer_weights(flat),
                num_layers=self.num_layers,
                bidirectional=self.bidirectional,
                dropout=dropout,
                training=self.training,
                lengths=lengths,
                backend=backend,
            )
            if packed:
                y = pack_padded_sequence(y, lengths_cpu).data
            elif self.batch_first:
                y = y.transpose(0, 1)

        h_n = _apply_permutation(h_n, unsorted_indices)
        c_n = None if c_n is None else _apply_permutation(c_n, unsorted_indices)
        if packed:
            out = PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices)
        elif not is_batched:
            out = y.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        else:
            out = y
        return out, ((h_n, c_n) if is_lstm else h_n)

    def _check_hx_structure(self, hx) -> None:
        """hx is (h_0, c_0) for LSTM, one tensor otherwise. torch.nn's errors for other
        structures come from wherever they first break (an IndexError for a 1-tuple, an
        AttributeError for a tuple given to a GRU); these say what is wrong, as TypeError for
        the wrong kind and RuntimeError for the wrong count (nn's "lstm expects two hidden
        states")."""
        name = _MODE_NAMES[self.mode]
        if self.mode == "LSTM":
            if not isinstance(hx, (tuple, list)):
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            if len(hx) != 2:
                raise RuntimeError(f"{name}: hx must be a tuple (h_0, c_0) of two tensors, got "
                                   f"{len(hx)}")
            if not all(isinstance(h, Tensor) for h in hx):
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0) of two tensors, got "
                                f"({', '.join(type(h).__name__ for h in hx)})")
        elif not isinstance(hx, Tensor):
            raise TypeError(f"{name}: hx must be a tensor (h_0), got {type(hx).__name__}")

    def stack_config(self, device: torch.device, dtype: torch.dtype, batch: int,
                     packed: bool = False, steps: int | None = None) -> dict:
        """What ``backend="auto"`` decides on (backends.resolve_stack) for a call with input of
        ``dtype`` on ``device``, ``batch`` rows and ``steps`` time steps (None: not known):
        under autocast the cells compute in its dtype."""
        return dict(
            mode=self.mode, dtype=functional.compute_dtype(torch.device(device), dtype),
            hidden_size=self.hidden_size, proj_size=self.proj_size, batch=batch,
            num_layers=self.num_layers, bidirectional=self.bidirectional,
            input_size=self.input_size, has_lengths=packed, steps=steps,
        )

    def _torch_stack(self, input, h0, c0, packed, w):
        """The whole stack through PyTorch's own kernels (aten on CPU, cuDNN on GPU).

        Under autocast every cell runs in the autocast dtype. torch.nn's own rules differ: on
        CUDA its cuDNN RNNs run in fp16 under any autocast dtype (torch's autocast wrapper of
        ``_cudnn_rnn`` casts to half; checked on torch 2.11), so an ``amp-bf16`` nn.LSTM
        computes in fp16; on the CPU nn.LSTM/RNN follow the autocast dtype and nn.GRU (and
        nn.LSTM on packed input) stays fp32 (torch 2.13). fp64 and complex data are not cast, as in torch. We follow the dtype the region asked for, on every device and cell. w: the
        call's ``_flat_weights``.
        """
        data = input.data if packed else input
        ac = functional._autocast_dtype(data.device)
        autocast_on = ac is not None
        order = self._cudnn_order
        if ac is not None and not autocast_eligible(data):
            ac = None  # fp64 and complex stay as they are, as in torch.nn
        if ac is not None:
            data, h0 = data.to(ac), h0.to(ac)
            c0 = None if c0 is None else c0.to(ac)
        cast = ac if ac is not None and any(t.dtype != ac for t in w) else None
        fn = getattr(torch._VF, _VF_LAYER[self.mode])  # one lookup: _VF's are not cheap

        def run(data, h0, c0, w, layers, dropout):
            hx = (h0, c0) if self.mode == "LSTM" else h0
            args = (self.bias, layers, dropout, self.training, self.bidirectional)
            if packed:
                res = fn(data, input.batch_sizes, hx, w, *args)
            else:
                res = fn(data, hx, w, *args, self.batch_first)
            return res[0], res[1], (res[2] if self.mode == "LSTM" else None)

        # Autocast off where it is on (entering the region costs ~10 us a call otherwise).
        with functional._autocast_off(data.device) if autocast_on else contextlib.nullcontext():
            if not _dropout_outside_torch_rng(data.device, self.dropout, self.training,
                                              self.num_layers):
                if cast is not None:  # one buffer, as cuDNN's, or one cast per weight
                    w = (_in_one_buffer(w, order, cast) if order is not None
                         else [t.to(cast) for t in w])
                return run(data, h0, c0, w, self.num_layers, self.dropout)
            # One layer a call, the dropout between them drawn from torch's generator. Each
            # layer's weights go to cuDNN at the start of a buffer of their own, as it takes
            # them without a copy. Layer 0's can stay in the module's buffer only where no cast
            # is needed and they tile its start without a gap: cuDNN's layout need not keep a
            # layer's tensors together (on an H200, torch 2.11, cuDNN 9.19, fp32 stacks warned).
            D = 2 if self.bidirectional else 1
            k = len(w) // (self.num_layers * D)  # tensors per layer and direction
            hs, cs = [], []
            for layer in range(self.num_layers):
                if layer:
                    # Drawn on the time-major tensor, as aten's stack draws it: torch 2.6
                    # fills a transposed (batch_first) view's mask in another order.
                    if self.batch_first and not packed:
                        data = F.dropout(data.transpose(0, 1), self.dropout,
                                         training=True).transpose(0, 1)
                    else:
                        data = F.dropout(data, self.dropout, training=True)
                rows = slice(layer * D, (layer + 1) * D)
                first = layer * D * k
                lw = w[first:first + D * k]
                sub = (None if order is None else
                       [i - first for i in order if first <= i < first + D * k])
                if sub is not None and (layer or cast is not None
                                        or _buffer_order(lw) is None):
                    lw = _in_one_buffer(lw, sub, cast or lw[0].dtype)
                elif cast is not None:
                    lw = [t.to(cast) for t in lw]
                data, h, c = run(data, h0[rows], None if c0 is None else c0[rows], lw, 1, 0.0)
                hs.append(h)
                cs.append(c)
            return data, torch.cat(hs), (torch.cat(cs) if self.mode == "LSTM" else None)


def _cudnn_can_flatten(weights: list[Tensor]) -> bool:
    """nn.RNNBase.flatten_parameters' conditions: CUDA tensors of one dtype that cuDNN takes,
    none aliasing another."""
    if not weights or not all(isinstance(w, Tensor) for w in weights):
        return False
    dtype = weights[0].dtype
    if any(w.dtype != dtype or not w.is_cuda or not torch.backends.cudnn.is_acceptable(w)
           for w in weights):
        return False
    return len({w.data_ptr() for w in weights}) == len(weights)


def _buffer_order(weights: list[Tensor]) -> list[int] | None:
    """The weights' indices in the order they lie in one buffer, when they tile it from its
    start without gaps (as flatten_parameters lays them out); None when they do not."""
    if not weights or any(not w.is_contiguous() for w in weights):
        return None
    storage = weights[0].untyped_storage().data_ptr()
    if any(w.untyped_storage().data_ptr() != storage for w in weights):
        return None
    order = sorted(range(len(weights)), key=lambda i: weights[i].storage_offset())
    offset = 0
    for i in order:
        if weights[i].storage_offset() != offset:
            return None
        offset += weights[i].numel()
    return order


# Zeros after the weights in a buffer of ours: cuDNN takes a buffer at least as long as its
# weight space (cudnnGetRNNWeightSpaceSize), which may round the weights' total up.
_BUFFER_SLACK = 1024


def _in_one_buffer(weights: list[Tensor], order: list[int], dtype: torch.dtype) -> list[Tensor]:
    """``weights`` in ``dtype``, copied into one new buffer in ``order`` (their order in
    cuDNN's layout, from :func:`_buffer_order`) and returned as views into it, so that cuDNN
    uses them in place: no second copy, and no warning about weights "not part of single
    contiguous chunk of memory". One cat and one cast, both differentiable: each view's
    gradient reaches its weight."""
    parts = [weights[i].reshape(-1) for i in order]
    parts.append(weights[0].new_zeros(_BUFFER_SLACK))
    flat = torch.cat(parts)
    if flat.dtype != dtype:
        flat = flat.to(dtype)
    views = flat.split([t.numel() for t in parts])
    out: list[Tensor | None] = [None] * len(weights)
    for i, v in zip(order, views):
        out[i] = v.view(weights[i].shape)
    return out


def _dropout_outside_torch_rng(device: torch.device, dropout: float, training: bool,
                               num_layers: int) -> bool:
    """Whether PyTorch's whole-stack kernel would draw its between-layer dropout from a state
    torch's generator does not hold: cuDNN keeps its own dropout state, seeded once a process,
    which ``torch.cuda.get_rng_state`` neither saves nor restores. Such a stack runs one layer
    a call instead, with ``F.dropout`` between, so a seeded or resumed run repeats its masks
    (``fused-rnn train --resume``). aten's CPU kernel draws from torch's generator already."""
    return device.type == "cuda" and dropout > 0 and training and num_layers > 1


def _stack_args(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None) -> dict:
    """torch.nn.RNNBase's arguments after ``mode``, by name: the positional order that
    nn.GRU and nn.RNN pass on (``proj_size`` included)."""
    return dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                bias=bias, batch_first=batch_first, dropout=dropout,
                bidirectional=bidirectional, proj_size=proj_size, device=device, dtype=dtype)


def _no_proj_size_args(name: str, args: tuple, kwargs: dict) -> dict:
    """GRU's and RNN's arguments: torch.nn's refuses ``proj_size`` by keyword; positionally a
    0 is taken and another value refused (nn.GRU would build projection weights it cannot
    use)."""
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    try:
        bound = _stack_args(*args, **kwargs)
    except TypeError as e:  # too many arguments, or an unknown keyword
        raise TypeError(str(e).replace("_stack_args()", f"{name}()")) from None
    if bound["proj_size"] != 0:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    return bound


class LSTM(_RNNStack):
    r"""Drop-in ``torch.nn.LSTM`` with a keyword-only ``backend``.

    Inputs: ``input`` (T, B, input_size), (B, T, input_size) with ``batch_first``, (T,
    input_size) unbatched, or a PackedSequence; ``(h_0, c_0)``: (L*D, B, proj_size or H) and
    (L*D, B, H), zeros when omitted. Outputs: ``output, (h_n, c_n)`` as torch.nn.LSTM.
    ``backend``: "auto" (default), "torch", "reference", "triton" or "cuda"; ``help(fused_rnn)``.

    Examples::

        >>> import torch, fused_rnn
        >>> lstm = fused_rnn.LSTM(10, 20, num_layers=2, batch_first=True)
        >>> out, (h, c) = lstm(torch.randn(3, 5, 10))
        >>> tuple(out.shape), tuple(h.shape), tuple(c.shape)
        ((3, 5, 20), (2, 3, 20), (2, 3, 20))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            "LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, proj_size, device, dtype, backend=backend,
        )

    def get_expected_cell_size(self, input: Tensor,
                               batch_sizes: Tensor | None) -> tuple[int, int, int]:
        layers, batch, _ = self.get_expected_hidden_size(input, batch_sizes)
        return (layers, batch, self.hidden_size)

    def forward(self, input, hx: tuple[Tensor, Tensor] | None = None):
        return self._forward(input, hx)


class GRU(_RNNStack):
    r"""Drop-in ``torch.nn.GRU`` with a keyword-only ``backend``.

    Arguments, in torch.nn's positional order: ``input_size, hidden_size, num_layers=1,
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, proj_size=0`` (0 only;
    by keyword it is refused, as by torch.nn) ``, device=None, dtype=None``. Inputs ``input``
    as :class:`LSTM`'s, ``h_0``: (L*D, B, H); outputs ``output, h_n``. ``backend``: as
    :class:`LSTM`'s.

    Examples::

        >>> import torch, fused_rnn
        >>> gru = fused_rnn.GRU(10, 20, bidirectional=True)
        >>> out, h = gru(torch.randn(5, 3, 10))
        >>> tuple(out.shape), tuple(h.shape)
        ((5, 3, 40), (2, 3, 20))
    """

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__("GRU", **_no_proj_size_args("GRU", args, kwargs), backend=backend)

    def forward(self, input, hx: Tensor | None = None):
        return self._forward(input, hx)


class RNN(_RNNStack):
    r"""Drop-in ``torch.nn.RNN`` (tanh or relu) with a keyword-only ``backend``.

    Arguments, in torch.nn's positional order: ``input_size, hidden_size, num_layers=1,
    nonlinearity="tanh", bias=True, batch_first=False, dropout=0.0, bidirectional=False,
    proj_size=0`` (0 only) ``, device=None, dtype=None``. The nonlinearity is fixed when the
    module is built, as in torch.nn.RNN. ``backend``: as :class:`LSTM`'s.

    Examples::

        >>> import torch, fused_rnn
        >>> rnn = fused_rnn.RNN(10, 20, 2, nonlinearity="relu")
        >>> out, h = rnn(torch.randn(5, 3, 10))
        >>> tuple(out.shape), tuple(h.shape)
        ((5, 3, 20), (2, 3, 20))
    """

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        # nonlinearity is the fourth positional argument, as in torch.nn.RNN.
        if len(args) > 3:
            nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__(mode, **_no_proj_size_args("RNN", args, kwargs), backend=backend)

    def forward(self, input, hx: Tensor | None = None):
        return self._forward(input, hx)


class _CellBase(_Recurrent):
    """Parameters and argument checks shared by the three cells (as torch.nn.RNNCellBase)."""

    def __init__(self, mode, input_size, hidden_size, bias, device, dtype, backend):
        super().__init__()
        # As torch.nn's cells: any integer (a numpy int too), zero included; a negative size
        # is torch.empty's RuntimeError there, said plainly here.
        input_size, hidden_size = operator.index(input_size), operator.index(hidden_size)
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if value < 0:
                raise RuntimeError(f"{name} must be at least zero, got {value}")
        self.backend = backends.check_name(backend)
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        g = GATES[mode] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((g, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((g, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(g, **factory))
            self.bias_hh = nn.Parameter(torch.empty(g, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def __setstate__(self, state: dict) -> None:
        """Unpickling: what a cell pickled by an older version, or a torch.nn cell unpickled
        as this class, lacks gets its default."""
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        if "mode" not in self.__dict__:  # torch.nn's cells have no mode
            relu = getattr(self, "nonlinearity", "tanh") == "relu"
            self.mode = ("LSTM" if isinstance(self, LSTMCell) else
                         "GRU" if isinstance(self, GRUCell) else
                         "RNN_RELU" if relu else "RNN_TANH")

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def _call_mode(self) -> str:
        return self.mode

    def _step(self, input: Tensor, hx):
        # The common call first: a batch of one dtype on one device, the state given as
        # tensors or not at all. Every check _checked_step makes, made the quick way (one
        # dtype by identity, whole shapes at once) and in its order (the state before the
        # weights are read, the mode after: plain tensors are no fx proxies); a cell is
        # called once per token in generation, where this Python is a visible share of a
        # step. Anything else (an unbatched call, autocast's mixed dtypes, every error)
        # takes _checked_step.
        if type(input) is Tensor and input.dim() == 2:
            is_lstm = self.mode == "LSTM"  # the one mode _call_mode does not read anew
            hs = ((hx,) if type(hx) is Tensor else None) if not is_lstm else (
                tuple(hx) if type(hx) is tuple and len(hx) == 2
                and type(hx[0]) is Tensor and type(hx[1]) is Tensor else None)
            dtype, device = input.dtype, input.device
            batch, hidden = input.size(0), self.hidden_size
            if (hx is None or hs is not None and all(_plain(h, (batch, hidden), dtype, device)
                                                      for h in hs)):
                mode = self._call_mode()
                w_ih, w_hh, b_ih, b_hh = (self.weight_ih, self.weight_hh, self.bias_ih,
                                          self.bias_hh)
                g = GATES[mode] * hidden
                if (dtype in _CELL_DTYPES and input.size(1) == self.input_size
                        and _plain(w_ih, (g, self.input_size), dtype, device)
                        and _plain(w_hh, (g, hidden), dtype, device)
                        and (b_ih is None or _plain(b_ih, (g,), dtype, device))
                        and (b_hh is None or _plain(b_hh, (g,), dtype, device))):
                    if hs is None:
                        z = torch.zeros(batch, hidden, dtype=dtype, device=device)
                        hs = (z, z) if is_lstm else (z,)
                    return self._run(mode, True, input, hs, w_ih, w_hh, b_ih, b_hh,
                                     one_dtype=True)
                return self._checked_step(input, hx, (w_ih, w_hh, b_ih, b_hh))
        return self._checked_step(input, hx, None)

    def _checked_step(self, input, hx, weights):
        """The cell call with every check, each in the words of torch.nn's cells or layers.
        ``weights``: (w_ih, w_hh, b_ih, b_hh) where the caller read them already, else None
        (read here after the input's and state's checks, where torch.nn reads them)."""
        cls = type(self).__name__
        fx.refuse_proxy(self, input, hx)
        mode = self._call_mode()
        is_lstm = mode == "LSTM"
        if input.dim() not in (1, 2):
            raise ValueError(f"{cls}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        # torch.nn's types where it means them: RuntimeError for a tuple of another length
        # ("lstm_cell expects two hidden states"), TypeError for a tensor given to an LSTMCell.
        # Where torch.nn fails by accident (an AttributeError on .dim() of a None, a list or a
        # tuple, the GRU and RNN cells' only error), a TypeError that says what hx must be.
        if hx is not None:
            if is_lstm:
                if not isinstance(hx, (tuple, list)):
                    raise TypeError(f"{cls}: hx must be a tuple (h_0, c_0), got "
                                    f"{type(hx).__name__}")
                if len(hx) != 2:
                    raise RuntimeError(f"{cls}: hx must be a tuple (h_0, c_0) of two tensors, "
                                       f"got {len(hx)}")
            if not all(isinstance(h, Tensor) for h in (hx if is_lstm else (hx,))):
                raise TypeError(f"{cls}: hx must be {'two tensors' if is_lstm else 'a tensor'}")
        hs = None if hx is None else (tuple(hx) if is_lstm else (hx,))
        if hs is not None:
            for idx, h in enumerate(hs):
                if h.dim() not in (1, 2):
                    which = f"hx[{idx}]" if is_lstm else "hidden"
                    raise ValueError(f"{cls}: Expected {which} to be 1D or 2D, got {h.dim()}D instead")
            if any(h.dim() != input.dim() for h in hs):
                # torch.nn's cells say something else here: a size mismatch of the state they
                # unsqueezed (and nn.LSTMCell of hidden size 1 crashes, torch 2.13 CPU). These
                # are the words of its layers.
                kind = "batched 2-D" if input.dim() == 2 else "unbatched 1-D"
                dims = ", ".join(f"{h.dim()}-D" for h in hs)
                got = f"({dims}) tensors" if is_lstm else f"{dims} tensor"
                raise RuntimeError(f"{cls}: for {kind} input, hx{' and cx' if is_lstm else ''} "
                                   f"should also be {input.dim()}-D but got {got}")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        # Each weight read once a call (a parametrized one is computed once; see _forward).
        if weights is None:
            weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        w_ih, w_hh, b_ih, b_hh = weights
        w = w_ih
        g = GATES[mode] * self.hidden_size
        # Every check functional.rnn_cell makes is made here, in the module's terms, so the
        # call below skips them: a cell is called once per token in generation, where this
        # Python is a visible share of a step.
        for name, t, shape in (("weight_ih", w_ih, (g, self.input_size)),
                               ("weight_hh", w_hh, (g, self.hidden_size)),
                               ("bias_ih", b_ih, (g,)), ("bias_hh", b_hh, (g,))):
            if t is None:  # a bias set to None is left out, as by torch.nn
                continue
            if t.shape != shape:
                raise RuntimeError(f"{cls}: weight {name} has shape {tuple(t.shape)}, expected "
                                   f"{shape} (input_size={self.input_size}, "
                                   f"hidden_size={self.hidden_size})")
            if t.dtype != w.dtype and _dtypes_differ(t, w):
                raise RuntimeError(f"{cls}: {name} is {t.dtype} but weight_ih is {w.dtype}; "
                                   "all weights need one dtype")
            if t.device != w.device:
                raise RuntimeError(f"{cls}: {name} is on {t.device} but weight_ih is on "
                                   f"{w.device}")
        if input.dtype != w.dtype and _dtypes_differ(input, w):
            raise RuntimeError(
                f"{cls}: input dtype ({input.dtype}) does not match weight dtype ({w.dtype})"
            )
        if input.device != w.device:
            raise RuntimeError(
                f"{cls}: input is on {input.device} but the parameters are on {w.device}"
            )
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}"
            )
        if not (input.is_floating_point() or input.is_complex()):
            raise TypeError(f"{cls}: input must be floating point, got {input.dtype}")
        if hs is None:
            z = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hs = (z, z) if is_lstm else (z,)
        elif not is_batched:
            hs = tuple(h.unsqueeze(0) for h in hs)
        for idx, h in enumerate(hs):
            if h.dim() != 2 or h.size(0) != input.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{idx} batch size "
                    f"{h.size(0) if h.dim() == 2 else tuple(h.shape)}"
                )
            if h.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{idx} has inconsistent hidden_size: got {h.size(1)}, "
                    f"expected {self.hidden_size}"
                )
            if h.device != input.device:
                raise RuntimeError(f"{cls}: hidden{idx} is on {h.device}, input on {input.device}")
            if h.dtype != input.dtype and _dtypes_differ(h, input):
                raise RuntimeError(
                    f"{cls}: hidden{idx} dtype ({h.dtype}) does not match input dtype ({input.dtype})"
                )
        return self._run(mode, is_batched, input, hs, w_ih, w_hh, b_ih, b_hh)

    def _run(self, mode: str, is_batched: bool, input: Tensor, hs: tuple, w_ih, w_hh, b_ih,
             b_hh, one_dtype: bool = False):
        """The checked call on this cell's backend; ``input`` and ``hs`` batched;
        ``one_dtype``: every tensor is in the input's dtype."""
        is_lstm = mode == "LSTM"
        backend = backends.resolve_stack(self.backend, input.device)
        h1, c1 = functional._checked_rnn_cell(
            mode,
            input,
            hs[0],
            hs[1] if is_lstm else None,
            w_ih,
            w_hh,
            b_ih,
            b_hh,
            backend=backend,
            one_dtype=one_dtype,
        )
        if not is_batched:
            h1 = h1.squeeze(0)
            c1 = None if c1 is None else c1.squeeze(0)
        return (h1, c1) if is_lstm else h1


class LSTMCell(_CellBase):
    r"""Drop-in ``torch.nn.LSTMCell``: ``h', c' = cell(x, (h, c))``; x: (B, I) or (I,).
    ``backend``: as :class:`LSTM`'s ("auto" runs PyTorch's kernels for a single step).

    Examples::

        >>> import torch, fused_rnn
        >>> cell = fused_rnn.LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
        >>> tuple(h.shape), tuple(c.shape)
        ((3, 20), (3, 20))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str = "auto") -> None:
        super().__init__("LSTM", input_size, hidden_size, bias, device, dtype, backend)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        return self._step(input, hx)


class GRUCell(_CellBase):
    r"""Drop-in ``torch.nn.GRUCell``: ``h' = cell(x, h)``. ``backend``: as :class:`LSTM`'s.

    Examples::

        >>> import torch, fused_rnn
        >>> tuple(fused_rnn.GRUCell(10, 20)(torch.randn(3, 10)).shape)
        (3, 20)
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str = "auto") -> None:
        super().__init__("GRU", input_size, hidden_size, bias, device, dtype, backend)

    def forward(self, input: Tensor, hx: Tensor | None = None):
        return self._step(input, hx)


class RNNCell(_CellBase):
    r"""Drop-in ``torch.nn.RNNCell`` (tanh or relu): ``h' = cell(x, h)``. ``backend``: as
    :class:`LSTM`'s.

    Examples::

        >>> import torch, fused_rnn
        >>> tuple(fused_rnn.RNNCell(10, 20, nonlinearity="relu")(torch.randn(3, 10)).shape)
        (3, 20)
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        if nonlinearity not in ("tanh", "relu"):  # torch.nn's fails only at the first call
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}")
        self.nonlinearity = nonlinearity
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, input_size, hidden_size, bias, device, dtype, backend)

    def _call_mode(self) -> str:
        # Read at every call, as torch.nn.RNNCell does: setting .nonlinearity afterwards counts.
        if self.nonlinearity == "tanh":
            return "RNN_TANH"
        if self.nonlinearity == "relu":
            return "RNN_RELU"
        raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")

    def forward(self, input: Tensor, hx: Tensor | None = None):
        return self._step(input, hx)
