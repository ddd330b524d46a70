"""Swap torch.nn's RNN modules for fused_rnn's in a model, and back.

:func:`from_torch_nn` replaces every ``nn.LSTM``/``GRU``/``RNN``/``LSTMCell``/``GRUCell``/
``RNNCell`` in a model by fused_rnn's module of the same configuration; :func:`to_torch_nn`
does the reverse (for tools that look for torch.nn's classes, such as
``torch.ao.quantization.quantize_dynamic``). The new module holds the very same
``nn.Parameter`` objects, so an optimizer built before the swap keeps training them, and its
training mode is the old one's.

Only modules of exactly those classes are swapped: a subclass has its own ``forward`` or
state, which a swap would lose, and stays as it is. A module held in several places becomes one
new module held in the same places. Buffers and the public attributes a user set on a module
come along. A module with hooks or parametrizations is refused (they belong to that module
object), and so is the module inside a ``torch.compile`` wrapper (its compiled forward would
keep the old one); swap first, then add them or compile.

Examples::

    >>> import torch, fused_rnn
    >>> from fused_rnn.convert import from_torch_nn, to_torch_nn
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LSTM(4, 8))
    >>> weight = model[1].weight_hh_l0
    >>> model = from_torch_nn(model, backend="reference")
    >>> type(model[1]).__name__, model[1].backend, model[1].weight_hh_l0 is weight
    ('LSTM', 'reference', True)
    >>> type(to_torch_nn(model)[1]).__module__
    'torch.nn.modules.rnn'
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from fused_rnn import backends, modules

__all__ = ["from_torch_nn", "to_torch_nn"]

_PAIRS = [
    (nn.LSTM, modules.LSTM),
    (nn.GRU, modules.GRU),
    (nn.RNN, modules.RNN),
    (nn.LSTMCell, modules.LSTMCell),
    (nn.GRUCell, modules.GRUCell),
    (nn.RNNCell, modules.RNNCell),
]
_TO_OURS = {a: b for a, b in _PAIRS}
_TO_NN = {b: a for a, b in _PAIRS}
# fused_rnn's own settings, which torch.nn's modules do not have.
_CONFIG = {"backend", "mode"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
          "_load_state_dict_post_hooks")


def from_torch_nn(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """``model`` with each torch.nn RNN module (exact class) swapped for fused_rnn's, on
    ``backend``. Submodules are replaced in place; the return value is ``model``, or the new
    module when ``model`` itself is one of those classes."""
    backends.check_name(backend)
    return _swap(model, _TO_OURS, {"backend": backend})


def to_torch_nn(model: nn.Module) -> nn.Module:
    """``model`` with each fused_rnn RNN module (exact class) swapped for torch.nn's. Submodules
    are replaced in place; the return value is ``model``, or the new module when ``model``
    itself is one of those classes."""
    return _swap(model, _TO_NN, {})


def _class(m: nn.Module) -> type:
    """``m``'s class, or the class it had before a parametrization (which swaps a module's
    class for a generated subclass of it)."""
    return type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)


def _compiled(m: nn.Module) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(m, OptimizedModule)


def _swap(model: nn.Module, table: dict, extra: dict) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if _class(model) in table:
        return _converted(model, table[_class(model)], extra, "the model")
    # A module held in several places (tied encoder/decoder) becomes one new module held in
    # the same places: named_modules() lists it once, so each parent's slots are walked.
    new: dict[int, nn.Module] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if child is None or _class(child) not in table:
                continue
            where = f"{parent_name}.{name}" if parent_name else name
            if _compiled(parent):
                raise ValueError(
                    f"cannot swap {where}: it is the module torch.compile wrapped, whose "
                    f"compiled forward would keep running the old one; swap before compiling "
                    f"(torch.compile(fused_rnn.from_torch_nn(m)))"
                )
            if id(child) not in new:
                new[id(child)] = _converted(child, table[_class(child)], extra, where)
            setattr(parent, name, new[id(child)])
    return model


def _converted(old: nn.Module, cls: type, extra: dict, where: str) -> nn.Module:
    hooked = [h for h in _HOOKS if getattr(old, h, None)]
    if hooked or parametrize.is_parametrized(old):
        what = "parametrizations" if parametrize.is_parametrized(old) else ", ".join(hooked)
        raise ValueError(
            f"cannot swap {where} ({_class(old).__name__}): it has {what}, which belong to "
            f"that module object; swap the modules first, then register them"
        )
    is_cell = not hasattr(old, "num_layers")
    kwargs = {"bias": old.bias}
    if hasattr(old, "nonlinearity"):
        # A layer computes by its mode, fixed when built (a later change of .nonlinearity does
        # nothing in nn.RNN or here); a cell reads .nonlinearity at each call.
        kwargs["nonlinearity"] = (old.nonlinearity if is_cell else
                                  "relu" if old.mode == "RNN_RELU" else "tanh")
    if not is_cell:
        kwargs.update(num_layers=old.num_layers, batch_first=old.batch_first,
                      dropout=old.dropout, bidirectional=old.bidirectional)
        if old.proj_size:
            kwargs["proj_size"] = old.proj_size
    with torch.device("meta"), warnings.catch_warnings():
        # No initialisation work: every parameter is replaced below. The old module already
        # gave the warnings its arguments call for (dropout with one layer).
        warnings.simplefilter("ignore", UserWarning)
        new = cls(old.input_size, old.hidden_size, **kwargs, **extra)
    names = [n for n, _ in new.named_parameters()]
    # Its own parameters, tied ones under each name, in its order (weight_norm's removal
    # re-registers a weight last): a child module's are the child's, moved with it below.
    params = dict(old.named_parameters(recurse=False, remove_duplicate=False))
    if sorted(names) != sorted(params):
        raise ValueError(f"cannot swap {where}: its parameters {sorted(params)} are not "
                         f"{cls.__name__}'s {sorted(names)}")
    for name, param in params.items():
        setattr(new, name, param)
    # old's order; a None slot (a cell's bias=False) stays registered, as nn has it
    order = [*params, *(n for n, p in new._parameters.items() if p is None)]
    new._parameters = {name: new._parameters[name] for name in order}
    new.train(old.training)  # before the user's children come: their modes are their own
    for name, child in old.named_children():  # a user's (a dropout it calls): as attributes
        if hasattr(new, name):
            raise ValueError(f"cannot swap {where}: its child module {name!r} has the name "
                             f"of {cls.__name__}'s attribute")
        new.add_module(name, child)
    for name, buf in old.named_buffers(recurse=False):
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)
    # Attributes a user set on the module (a tag, a flag): public names the new one lacks.
    for key, value in vars(old).items():
        if not key.startswith("_") and key not in vars(new) and key not in _CONFIG:
            setattr(new, key, value)
    if hasattr(new, "flatten_parameters"):
        new.flatten_parameters()  # on a GPU, the weights into cuDNN's one buffer, as nn does
    return new
