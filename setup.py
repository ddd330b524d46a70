"""Packaging for fused_rnn.

``pip install -e .`` is pure Python: it needs no GPU and no nvcc. The CUDA extension is built
ahead of time only when asked (see the README); otherwise it is JIT-built on first use.
"""

from setuptools import find_packages, setup

setup(
    name="fused_rnn",
    version="0.1.0",
    description="LSTM, GRU and Elman RNN layers on fused Triton/CUDA kernels, drop-in for torch.nn",
    packages=find_packages(include=["fused_rnn", "fused_rnn.*"]),
    package_data={"fused_rnn": ["csrc/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "train": ["matplotlib"],
        # The CI set: Triton 3.6 is what the lent GPU machines run, and its CPU interpreter
        # needs numpy < 2.4 (DESIGN.md).
        "test": ["pytest", "expecttest", "matplotlib", "triton==3.6.0", "numpy<2.4"],
    },
    entry_points={"console_scripts": ["fused-rnn=fused_rnn.cli:main"]},
)
