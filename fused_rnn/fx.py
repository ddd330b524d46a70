"""``torch.fx`` symbolic tracing of models that hold fused_rnn modules.

``torch.fx.symbolic_trace`` keeps torch.nn's own modules (``nn.LSTM`` among them) as leaf
``call_module`` nodes because they live in the ``torch.nn`` package, and traces into every
other module. A fused_rnn module cannot be traced into: it checks shapes, picks a backend and
reads its weights in Python. :class:`Tracer` keeps fused_rnn's modules as leaves too, so a
model traces to the same graph it would with torch.nn's RNNs in their place.

Examples::

    >>> import torch, fused_rnn, fused_rnn.fx
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rnn = fused_rnn.GRU(4, 8)
    ...         self.head = torch.nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         return self.head(self.rnn(x)[0])
    >>> gm = fused_rnn.fx.symbolic_trace(Net())
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_function', 'call_module', 'output']
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = ["Tracer", "is_fused_rnn_module", "symbolic_trace"]


def is_fused_rnn_module(m: nn.Module) -> bool:
    """Whether ``m`` is one of fused_rnn's RNN or cell modules (or a subclass of one)."""
    from fused_rnn import modules

    return isinstance(m, modules._Recurrent)


class Tracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that keeps fused_rnn's modules as leaf modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_fused_rnn_module(m) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(root: nn.Module, concrete_args: dict[str, Any] | None = None
                   ) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` with fused_rnn's modules kept as leaves (:class:`Tracer`)."""
    if isinstance(root, nn.Module) and is_fused_rnn_module(root):
        raise TypeError(
            f"fused_rnn.{type(root).__name__} is a leaf for torch.fx, so it cannot be the root "
            "of a trace (nor can nn.LSTM): trace a module that calls it"
        )
    tracer = Tracer()
    graph = tracer.trace(root, concrete_args)
    name = root.__class__.__name__ if isinstance(root, nn.Module) else root.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


def refuse_proxy(module: nn.Module, *args: Any) -> None:
    """Raise a clear error when a fused_rnn module is being traced into by torch.fx (its
    input is a ``torch.fx.Proxy``): the plain tracer does not know to keep it as a leaf."""
    for a in args:
        for t in (a if isinstance(a, (tuple, list)) else (a,)):
            if isinstance(t, torch.fx.Proxy):
                raise TypeError(
                    f"torch.fx cannot trace into fused_rnn.{type(module).__name__}: it keeps "
                    "torch.nn's modules as leaves but not others. Trace with "
                    "fused_rnn.fx.symbolic_trace(model) (or a tracer whose is_leaf_module "
                    "accepts fused_rnn.fx.is_fused_rnn_module), which keeps fused_rnn's "
                    "modules as leaf call_module nodes, as nn.LSTM is."
                )
