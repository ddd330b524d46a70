"""fused_rnn: LSTM, GRU and Elman RNN layers on fused kernels, drop-in for torch.nn.

Examples::

    >>> import torch, fused_rnn
    >>> lstm = fused_rnn.LSTM(8, 16, batch_first=True, backend="reference")
    >>> out, (h, c) = lstm(torch.randn(2, 5, 8))
    >>> tuple(out.shape)
    (2, 5, 16)
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
