"""What a build of the CUDA extension is made from, shared by the JIT build (``_ext.py``) and the
ahead-of-time one (``setup.py``, which loads this file by path, before the package can be
imported). Standard library only.

* :func:`filter_arch_list`: the kernels need sm_80 or newer (bf16 tensor cores, TF32 WMMA,
  cp.async), and nvcc fails the whole build on an older architecture in
  ``TORCH_CUDA_ARCH_LIST`` (a broad list such as "7.5 8.0 8.6 9.0+PTX" is common in images).
  Older entries are dropped, and the caller says so.
* :func:`source_hash`: a digest of ``csrc/``, compiled into the extension and part of the JIT
  cache's directory name, so that a build from other sources (an ahead-of-time ``.so`` left in
  an editable checkout across a ``git pull``) is never taken for this one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

SOURCES = ("binding.cpp", "rnn_forward.cu", "rnn_backward.cu")
HEADERS = ("plan.h", "fused_rnn.h", "rnn_common.cuh", "warp_mma.cuh")
MIN_ARCH = (8, 0)
# torch's named architectures (TORCH_CUDA_ARCH_LIST) older than sm_80.
_OLD_NAMES = {"kepler", "kepler+tesla", "maxwell", "maxwell+tegra", "pascal", "volta", "turing"}


def filter_arch_list(value: str) -> tuple[list[str], list[str]]:
    """(entries the kernels can be built for, entries dropped as older than sm_80) of a
    ``TORCH_CUDA_ARCH_LIST`` value: "8.0", "9.0a", "9.0+PTX" or torch's names ("Ampere",
    "Hopper"; "Turing" and older are dropped). Unrecognised entries are kept for torch to
    judge."""
    kept, dropped = [], []
    for entry in re.split(r"[;\s]+", value.strip()):
        if not entry:
            continue
        m = re.match(r"(\d+)\.(\d+)", entry)
        old = (
            (int(m.group(1)), int(m.group(2))) < MIN_ARCH
            if m
            else entry.lower().removesuffix("+ptx") in _OLD_NAMES
        )
        (dropped if old else kept).append(entry)
    return kept, dropped


def source_hash(csrc: Path) -> str:
    """A short digest of the sources and headers in ``csrc`` (content and names, in order), as
    a C identifier ("h" and 16 hex digits) so it can be passed as ``-DFRNN_SOURCE_HASH=...``
    without quoting."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (csrc / name).read_bytes() + b"\0")
    return "h" + h.hexdigest()[:16]
