"""fused_rnn: LSTM, GRU and Elman RNN layers on fused kernels, drop-in for torch.nn.

Examples::

    >>> import torch, fused_rnn
    >>> lstm = fused_rnn.LSTM(8, 16, batch_first=True, backend="reference")
    >>> out, (h, c) = lstm(torch.randn(2, 5, 8))
    >>> tuple(out.shape)
    (2, 5, 16)

Every module takes torch.nn's arguments and a keyword-only ``backend`` that picks the kernels
running it (the README's "Backends" has the details):

- ``"auto"``, the default: PyTorch's own kernels (aten on the CPU, cuDNN on a GPU), except
  where a rule in ``fused_rnn.backends.AUTO_RULES`` names a fused backend measured faster on a
  GPU for that configuration;
- ``"torch"``: PyTorch's own kernels;
- ``"reference"``: plain PyTorch tensor math, the oracle the kernels are checked against;
- ``"triton"``: fused Triton kernels (a CUDA GPU, or the CPU under ``TRITON_INTERPRET=1``);
- ``"cuda"``: persistent CUDA C++ kernels (``csrc/``; sm_80 or newer; built at install when
  asked, else at first use).

An unknown name raises ``ValueError``; a backend that cannot run in this process raises
``RuntimeError`` at the call, saying why (:func:`backend_report` says it for every backend).
A module whose backend cannot run on its input's device raises the same. A kernel backend
that cannot take one particular call (its sizes or dtype) falls back, ``cuda`` to ``triton`` to
``reference``, with a warning naming the reason (once a process for each reason); the ops of
:mod:`fused_rnn.functional` fall back on an unusable device too.

    >>> fused_rnn.backend_report()["reference"]
    'available'
    >>> lstm.backend = "torch"  # checked where it is set
    >>> lstm.backend = "cudnn"
    Traceback (most recent call last):
    ...
    ValueError: unknown backend 'cudnn'; valid backends are 'auto', 'reference', 'torch', ...
"""

from fused_rnn.backends import BACKENDS, available_backends, backend_report
from fused_rnn.convert import from_torch_nn, to_torch_nn
from fused_rnn.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

# The kernel backends' torch.library ops, registered now (they need only torch): a program
# saved by torch.export or AOTInductor that calls them then loads in any process that imported
# fused_rnn. Their kernels are imported, and checked for, at the first call.
from fused_rnn.ops.cuda import ops as _cuda_ops  # noqa: F401
from fused_rnn.ops.triton import ops as _triton_ops  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "GRU",
    "LSTM",
    "RNN",
    "GRUCell",
    "LSTMCell",
    "RNNCell",
    "available_backends",
    "backend_report",
    "from_torch_nn",
    "to_torch_nn",
]
