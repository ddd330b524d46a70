"""Implementations of the per-layer and per-step ops, one subpackage per kernel backend.

Every backend module exposes the same functions as :mod:`fused_rnn.ops.reference`
(``rnn_layer`` and ``rnn_cell``), plus ``unavailable_reason(device)`` and
``unsupported_reason(kind, **config)`` used by :mod:`fused_rnn.backends`.
"""
