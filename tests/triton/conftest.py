"""Run the Triton kernels under Triton's CPU interpreter when there is no GPU.

``@triton.jit`` reads TRITON_INTERPRET when a kernel is *defined*, so this must happen before
``fused_rnn.ops.triton.kernels`` is imported; pytest imports this file before the test modules
of this directory (and the package imports its kernels lazily, on first use). With a CUDA GPU
the same tests run the compiled kernels on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
