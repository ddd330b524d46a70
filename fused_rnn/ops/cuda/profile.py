"""Where a persistent kernel's time goes: per-phase timings of the CUDA backend's launches.

::

    from fused_rnn.ops.cuda import profile

    with profile.recording() as launches:
        lstm(x)[0].backward(g)          # any use of backend="cuda"
    torch.cuda.synchronize()
    for launch in launches:
        print(profile.summarize(launch))

Inside ``recording()`` every launch gets an int64 buffer (``prof``). Thread 0 of each block
fills it with the ``clock64()`` cycles it spent in each phase of ``csrc/fused_rnn.h``'s
``Phase``:

- ``load``: the W slice into shared memory;
- ``copy``: X stage copies;
- ``mma``: the recurrent matmul, up to the slowest warp;
- ``epilogue``: the cell math and stores;
- ``sync``: the L2 prefetch issue and the step barrier (``grid.sync()``, or in cluster mode the
  cluster's), i.e. the wait for the slowest block;
- ``parts``: with K parts (``csrc/plan.h``), the second barrier of a step, after the partial
  sums are written (0 without parts).

It also writes the total cycles, the total nanoseconds (``%globaltimer``, which converts cycles
to time) and the number of steps, and two spans inside phases: thread 0's cycles in its own
warp's matmul tasks (``mma_own``: the MMA loops alone, without staging or the wait for the other
warps) and in its own epilogue points (``epilogue_own``: their loads and cells, without the wait
for the other threads). A phase much longer than its own span is spent waiting.

Outside ``recording()`` the kernels take one uniform branch per phase mark and write nothing.
Recording is meant for eager runs: the buffers are allocated per launch, which CUDA graph
capture would freeze.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fused_rnn.ops.common import ForkSafeLock

PHASES = ("load", "copy", "mma", "epilogue", "sync", "parts")  # fused_rnn.h Phase, in order
# + total cycles, total ns, steps, then the spans mma_own and epilogue_own (fused_rnn.h
# kProfSlots, kProfMmaOwn, kProfEpilogueOwn)
PROF_SLOTS = len(PHASES) + 5
OWN_SPANS = ("mma_own", "epilogue_own")
MAX_BLOCKS = 1024  # rows per buffer; a grid never has more blocks than the GPU has SMs


@dataclass
class Launch:
    """One kernel launch recorded by :func:`recording`."""

    direction: str  # "forward" or "backward"
    mode: str
    dtype: torch.dtype
    steps: int
    batch: int
    hidden: int
    prof: torch.Tensor  # (MAX_BLOCKS, PROF_SLOTS) int64; rows of blocks that ran are non-zero


# The recordings open now, innermost last. Process-wide, not per thread: autograd runs the
# backward launches on its own thread. Blocks on several threads may close in any order.
_active: list[list[Launch]] = []
_active_lock = ForkSafeLock()


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Record every CUDA-backend launch in this block (nestable: the innermost open one
    collects; each block collects until it closes, whichever order blocks close in)."""
    launches: list[Launch] = []
    with _active_lock:
        _active.append(launches)
    try:
        yield launches
    finally:
        with _active_lock:
            del _active[next(i for i, r in enumerate(_active) if r is launches)]


def buffer(direction: str, mode: str, dtype: torch.dtype, steps: int, batch: int, hidden: int,
           device: torch.device) -> torch.Tensor | None:
    """The ``prof`` argument for one launch: None unless recording."""
    with _active_lock:
        if not _active:
            return None
        launches = _active[-1]
    prof = torch.zeros(MAX_BLOCKS, PROF_SLOTS, dtype=torch.int64, device=device)
    launches.append(Launch(direction, mode, dtype, steps, batch, hidden, prof))
    return prof


def summarize(launch: Launch) -> dict:
    """Microseconds per step of each per-step phase (``copy_us`` .. ``parts_us``, mean over
    blocks) and of the spans ``mma_own_us`` and ``epilogue_own_us``, the shortest sync wait per step (``sync_min_us``: the block that arrives last
    waits only for the barrier itself, so mean - min is time spent waiting for slower blocks),
    and for the whole launch the W load
    (``load_us``) and the kernel's wall time (``kernel_us``). Synchronise the device first."""
    p = launch.prof.cpu()
    n = len(PHASES)
    ran = p[p[:, n] > 0]
    out = {"direction": launch.direction, "mode": launch.mode,
           "dtype": str(launch.dtype).removeprefix("torch."),
           "BxTxH": f"{launch.batch}x{launch.steps}x{launch.hidden}", "blocks": ran.shape[0]}
    if ran.shape[0] == 0:
        return out  # nothing recorded (the launch did not run the CUDA kernels)
    cycles = ran[:, :n].double()
    total, ns, steps = ran[:, n].double(), ran[:, n + 1].double(), int(ran[:, n + 2].max())
    assert torch.equal(cycles.sum(1), total), "phases must add up to the total"
    us_per_cycle = float(ns.sum() / total.sum()) / 1e3
    per_step = max(steps, 1)
    for i, name in enumerate(PHASES):
        out[f"{name}_us"] = float(cycles[:, i].mean()) * us_per_cycle / (1 if i == 0 else per_step)
    out["sync_min_us"] = float(cycles[:, PHASES.index("sync")].min()) * us_per_cycle / per_step
    for i, name in enumerate(OWN_SPANS):
        out[f"{name}_us"] = float(ran[:, n + 3 + i].double().mean()) * us_per_cycle / per_step
    out["kernel_us"] = float(ns.mean()) / 1e3
    out["steps"] = steps
    out["ghz"] = 1e-3 / us_per_cycle
    return out
