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
_OLD_NAMES = {"kepler", "kepler+tesla", "maxwell", "maxwell+tegra", "pascal", "volta",
              "volta+tegra", "turing"}


def arch_list_setting(value: str | None) -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` as torch's build reads it: None where torch picks the visible
    GPUs itself (unset, empty, or "native"), else the value."""
    return None if not value or value == "native" else value


def newest_arch(torch_arch_list: list[str]) -> tuple[int, int] | None:
    """The newest sm_XY in ``torch.cuda.get_arch_list()`` (what torch's build targets; torch
    clamps a newer GPU to it), or None."""
    sms = [int(m.group(1)) for a in torch_arch_list if (m := re.fullmatch(r"sm_(\d+)[a-z]?", a))]
    return max(((sm // 10, sm % 10) for sm in sms), default=None)


def visible_arch_list(caps: list[tuple[int, int]],
                      newest: tuple[int, int] | None) -> tuple[str | None, list[str]]:
    """(the ``TORCH_CUDA_ARCH_LIST`` to build with, the entries left out) where the setting
    leaves the choice to torch (:func:`arch_list_setting` is None) and ``caps`` are the visible
    GPUs' compute capabilities. torch would build for every one of them, each clamped to the
    ``newest`` its own build targets; nvcc fails the whole build on one older than sm_80, so
    where one is, the list becomes the sm_80+ ones (the newest with PTX, as torch does). None:
    leave it to torch (nothing to drop, or nothing sm_80+ to build for)."""
    if newest is not None:
        caps = [min(c, newest) for c in caps]
    caps = sorted(set(caps))
    new = [c for c in caps if c >= MIN_ARCH]
    if len(new) == len(caps) or not new:
        return None, []
    entries = [f"{a}.{b}" for a, b in new]
    entries[-1] += "+PTX"
    return ";".join(entries), [f"{a}.{b}" for a, b in caps if (a, b) < MIN_ARCH]


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
