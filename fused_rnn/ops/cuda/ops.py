"""The CUDA backend's registered ops: ``torch.library`` custom ops with fake kernels, an autograd
formula and an autocast rule.

=================================== ==========================================================
``fused_rnn::cuda_layer``            one layer, one direction, a whole chunk (forward)
``fused_rnn::cuda_layer_backward``   its gradients (called by the autograd formula)
=================================== ==========================================================

The split of work (DESIGN.md): the input projection ``x W_ih^T + b_ih`` for all T steps is one
GEMM with an fp32 result here (cuBLAS through torch: for fp32 data on TF32 tensor cores where
``common.gemms_use_tf32`` allows; for 16-bit data on its 16-bit operands, :func:`_mm`, with
b_ih added by the kernel); the recurrence is one persistent cooperative kernel
(``csrc/rnn_forward.cu``), or, on the per-step path (:func:`cuda_path`), a cuBLAS GEMM and
a launch of the same cell code each step; backward is one persistent kernel for the
reverse-time recurrence (``csrc/rnn_backward.cu``), or its per-step counterpart, that yields
the pre-activation gradients of every step in the storage dtype, after which dx, dW_ih, dW_hh
and the bias gradients are time-parallel GEMMs/reductions here again, with fp32 results.

Registering the ops never needs the compiled extension: it is loaded by the CUDA kernels of the
ops on first call (``_ext.extension()``), so importing works on any machine. The ops have no
CPU kernel; the dispatcher (``fused_rnn.backends``) only routes CUDA tensors here.

Absent optional outputs are empty tensors (custom ops cannot return None). The forward returns
the tensors backward needs (``gates``, ``aux``) as extra non-differentiable outputs: a custom
op's autograd can only save its inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_rnn.ops.common import (
    SIXTEEN_BIT,
    check_measured_rule,
    check_rnn_args,
    check_saved_args,
    gemms_use_tf32,
    grad_like,
    mm_f32,
    previous_hidden,
    refuse_double_backward,
    refuse_unsaved,
    register_autocast,
    register_autocast_off,
    tf32_gemms,
)
from fused_rnn.ops.cuda import _ext, profile
from fused_rnn.ops.cuda.plan import CELLS, K_BATCH_PAD, K_CHUNK_COLS
from fused_rnn.ops.reference import GATES, compute_dtype


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


# The most a count setting passes on (the binding takes int64 and clamps each to far less): a
# larger number means "as many as there are", and it no longer fails pybind11's conversion.
_SETTING_CAP = 2**31 - 1


def _count_setting(name: str, default: str, accepted: str = "an integer >= 1") -> int:
    raw = os.environ.get(name, default)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be {accepted}, got {raw!r}")
    return min(value, _SETTING_CAP)


def max_groups() -> int:
    """The most batch groups a launch may use (plan.h: batch groups), from
    ``FUSED_RNN_CUDA_MAX_GROUPS`` (default 8; 1 turns grouping off). Read at every call so a
    benchmark can compare settings in one process; it changes the partition, not the math."""
    return _count_setting("FUSED_RNN_CUDA_MAX_GROUPS", "8")


def k_parts() -> int:
    """K parts (plan.h: several blocks share one unit slice's matmul, each over part of K), from
    ``FUSED_RNN_CUDA_K_PARTS``: ``auto`` (default: the plan picks 1, 2, 4 or 8 by the bytes each
    block moves per step) or a positive integer N (the largest power of two <= min(N, 8) that
    the size allows; 1 turns them off). Returns 0 for auto. Read at every call, like
    :func:`max_groups`; it changes the order of the fp32 K sums, not the math."""
    raw = os.environ.get("FUSED_RNN_CUDA_K_PARTS", "auto")
    if raw == "auto":
        return 0
    return _count_setting("FUSED_RNN_CUDA_K_PARTS", raw, "'auto' or an integer >= 1")


def max_blocks() -> int:
    """The grid cap (plan.h: select_plan_capped), from ``FUSED_RNN_CUDA_MAX_BLOCKS``: ``auto``
    (default: H spread over up to one block per SM) or a positive integer N (the fewest blocks
    >= N whose W_hh slices fit in shared memory with the same math; where none does, one block
    per SM). Returns 0 for auto. Read at every call, like :func:`max_groups`; it changes the
    partition and the order of the fp32 K sums, not the math."""
    raw = os.environ.get("FUSED_RNN_CUDA_MAX_BLOCKS", "auto")
    if raw == "auto":
        return 0
    return _count_setting("FUSED_RNN_CUDA_MAX_BLOCKS", raw, "'auto' or an integer >= 1")


def cluster() -> int:
    """Cluster mode (plan.h select_plan_clustered), from ``FUSED_RNN_CUDA_CLUSTER``: ``off``
    (default) or N in 1..16: where each batch group fits on at most N blocks, the groups run as
    thread-block clusters and every step ends at the cluster's barrier instead of a grid-wide
    sync (sm_90+; more than 8 is a non-portable cluster size, which H100 allows). Elsewhere, and
    where the device cannot hold all the clusters at once, the grid plan runs. Returns 0 for
    off. Read at every call, like :func:`max_groups`; a plan found this way may differ from
    the grid plan, which changes the order of the fp32 K sums, not the math."""
    raw = os.environ.get("FUSED_RNN_CUDA_CLUSTER", "off")
    if raw == "off":
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 16:
        raise ValueError(f"FUSED_RNN_CUDA_CLUSTER must be 'off' or an integer 1..16, got {raw!r}")
    return value


def team_clusters() -> bool:
    """K-parts teams as thread-block clusters (fused_rnn.h kClusterTeams), from
    ``FUSED_RNN_CUDA_TEAM_CLUSTERS``: ``off`` (default) or ``on``: where a launch has K parts and
    cluster mode did not take it, each team of 2-8 blocks is one cluster of a cooperative grid,
    and the barrier after the partial sums is the team's instead of a second ``grid.sync()``
    (sm_90+; elsewhere, or where the device refuses, the plain grid). Same plan, same bits.
    Read at every call, like :func:`max_groups`."""
    raw = os.environ.get("FUSED_RNN_CUDA_TEAM_CLUSTERS", "off")
    if raw not in ("off", "on"):
        raise ValueError(f"FUSED_RNN_CUDA_TEAM_CLUSTERS must be 'off' or 'on', got {raw!r}")
    return raw == "on"


def cluster_exchange_dsmem() -> bool:
    """How cluster mode's groups exchange h (forward) and the dgates (backward), from
    ``FUSED_RNN_CUDA_CLUSTER_EXCHANGE``: ``global`` (default: through global memory/L2, copied
    into shared memory before the matmul) or ``dsmem``: every block keeps its group's exchange
    rows in its own shared memory and writes what it computes straight into its peers' copies
    (distributed shared memory, fused_rnn.h kClusterGroupsDsmem), where that fits without
    staging and without K parts; elsewhere the ``global`` exchange runs. Only with
    ``FUSED_RNN_CUDA_CLUSTER``. The plan is the one cluster mode picks with
    ``FUSED_RNN_CUDA_STAGE_K=0`` and ``FUSED_RNN_CUDA_K_PARTS=1``, and the results are that
    plan's bit for bit. Read at every call, like :func:`max_groups`."""
    raw = os.environ.get("FUSED_RNN_CUDA_CLUSTER_EXCHANGE", "global")
    if raw not in ("global", "dsmem"):
        raise ValueError(
            f"FUSED_RNN_CUDA_CLUSTER_EXCHANGE must be 'global' or 'dsmem', got {raw!r}")
    return raw == "dsmem"


def max_stage_k() -> int:
    """The most K columns per X staging slice (plan.h: staging), from
    ``FUSED_RNN_CUDA_STAGE_K``: ``auto`` (default: as many as fit), ``0`` (no staging: the MMAs
    read h from global memory) or a positive multiple of 16. Read at every call, like
    :func:`max_groups`; it changes the summation order of the recurrent matmul, not the math."""
    raw = os.environ.get("FUSED_RNN_CUDA_STAGE_K", "auto")
    if raw == "auto":
        return 1 << 30
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or value % 16:
        raise ValueError(
            f"FUSED_RNN_CUDA_STAGE_K must be 'auto', 0 or a positive multiple of 16, got {raw!r}"
        )
    return min(value, 1 << 30)  # auto's value: more columns than any plan has


def tile_block() -> int:
    """The most output tiles one warp multiplies at once in the recurrent matmul (plan.h
    tile_block: register blocking), from ``FUSED_RNN_CUDA_TILE_BLOCK``: ``4`` (default), ``2`` or
    ``1`` (off: one tile at a time). A block of tiles loads fewer operands per MMA from shared
    memory and keeps several independent MMA chains in flight; it applies only where a chunk has
    at least as many tiles as the block has warps. Every tile's K sum keeps its order, so the
    results are the same bits whatever the setting. Read at every call, like :func:`max_groups`."""
    raw = os.environ.get("FUSED_RNN_CUDA_TILE_BLOCK", "4")
    if raw not in ("1", "2", "4"):
        raise ValueError(f"FUSED_RNN_CUDA_TILE_BLOCK must be 1, 2 or 4, got {raw!r}")
    return int(raw)


def point_batch() -> int:
    """How the epilogue reads its points (rnn_common.cuh run_points), from
    ``FUSED_RNN_CUDA_POINT_BATCH``: ``auto`` (default: where a thread has two or more points
    (batch row, unit) a step, it loads the values of up to 4 of them (2 on the fp32 path without
    TF32, 1 in fp16) before it computes any, one L2 round trip for all of them) or ``1`` (one
    point at a time). Returns 0 for auto, as the kernels take it. Each point's arithmetic is the
    same either way, so are the results, bit for bit. Read at every call, like
    :func:`max_groups`."""
    raw = os.environ.get("FUSED_RNN_CUDA_POINT_BATCH", "auto")
    if raw not in ("auto", "1"):
        raise ValueError(f"FUSED_RNN_CUDA_POINT_BATCH must be 'auto' or 1, got {raw!r}")
    return 0 if raw == "auto" else 1


FRAG_LOADS = {"shared": 0, "generic": 1, "mma": 2}  # fused_rnn.h FragLoads


def frag_loads() -> int:
    """How the recurrent matmul's tensor-core operands are loaded (rnn_common.cuh frag_load),
    from ``FUSED_RNN_CUDA_FRAG_LOADS``: ``shared`` (default: where the operands are in shared
    memory, the ``.shared`` forms of ``wmma.load``/``wmma.store``, which ptxas turns into
    ldmatrix and LDS/STS), ``generic`` (WMMA's generic forms everywhere: one generic load per
    register), or ``mma`` (the TF32 tiles as two ``mma.sync.m16n8k8`` a k-step with their
    operands through ``ldmatrix``, warp_mma.cuh, instead of WMMA m16n16k8, where X is in shared
    memory; elsewhere, and in the 16-bit kernels, as ``shared``). The first two are the same
    instructions in another address space, the same bits; ``mma`` gives the same bits on
    cudasim, and on a GPU may differ in the last bits of a TF32 sum (one MMA a k-step instead of
    two chained). Read at every call, like :func:`max_groups`."""
    raw = os.environ.get("FUSED_RNN_CUDA_FRAG_LOADS", "shared")
    if raw not in FRAG_LOADS:
        raise ValueError(
            f"FUSED_RNN_CUDA_FRAG_LOADS must be one of {', '.join(FRAG_LOADS)}, got {raw!r}")
    return FRAG_LOADS[raw]


STAGE_COPIES = {"registers": 0, "async": 1, "pipelined": 2, "tagged": 3}  # fused_rnn.h StageCopy
STAGE_COPY_SETTINGS = ("auto", *STAGE_COPIES)  # what FUSED_RNN_CUDA_STAGE_COPY may say


def stage_copy_setting() -> str:
    """``FUSED_RNN_CUDA_STAGE_COPY``: how X is copied into the stage (plan.h: staging).
    ``pipelined``: cp.async into two half-width buffers, the next slice landing during this
    one's matmul; ``async``: cp.async, one buffer; ``registers``: 8 loads in flight per thread;
    ``tagged`` (bf16 and fp16): h, and the backward's dgates, travel as 32-bit words that carry
    their step's tag, and the copy reloads each word until it has the tag, so no step ends at a
    barrier (fused_rnn.h tagged_exchange; where the plan has no stage, has K parts or keeps the
    exchange in DSMEM, and in fp32, it runs as ``registers``). ``auto`` (default): ``tagged``
    where a rule of :data:`STAGE_COPY_RULES` matches the call, else ``pipelined``
    (:func:`stage_copy`). Read at every call, like :func:`max_groups`. The pipelined copy
    multiplies slices half as wide, which changes the order of the fp32 K sums (not the math);
    the other three give the same bits."""
    raw = os.environ.get("FUSED_RNN_CUDA_STAGE_COPY", "auto")
    if raw not in STAGE_COPY_SETTINGS:
        raise ValueError(
            f"FUSED_RNN_CUDA_STAGE_COPY must be one of {', '.join(STAGE_COPY_SETTINGS)}, "
            f"got {raw!r}")
    return raw


def stage_copy(mode: str, dtype: torch.dtype, batch: int, hidden: int, steps: int,
               device: torch.device) -> int:
    """The stage copy (fused_rnn.h StageCopy) of a persistent launch for a layer call of
    ``mode`` over ``steps`` steps of ``batch`` rows of ``hidden`` units stored in ``dtype`` on
    ``device``: :func:`stage_copy_setting` unless it is ``auto``; then ``tagged`` where a rule
    of :data:`STAGE_COPY_RULES` matches, else ``pipelined``."""
    setting = stage_copy_setting()
    if setting == "auto":
        setting = "pipelined"
        if STAGE_COPY_RULES and dtype in SIXTEEN_BIT:
            capability = _capability(device)
            if any(r.matches(mode, dtype, batch, hidden, steps, capability, False)
                   for r in STAGE_COPY_RULES):
                setting = "tagged"
    return STAGE_COPIES[setting]


PATHS = ("persistent", "step")  # the two ways a chunk runs
CUDA_PATHS = ("auto", *PATHS)  # what FUSED_RNN_CUDA_PATH may say


def cuda_path_setting() -> str:
    """``FUSED_RNN_CUDA_PATH``: how a chunk's recurrence runs. ``persistent``: one cooperative
    launch a chunk, W_hh on chip, one grid barrier a step. ``step`` (binding.cpp
    forward_steps): each step's recurrent matmul a cuBLAS GEMM through torch with an fp32
    result, then one plain launch of the persistent kernels' own cell code for that step's
    points; no size limit from shared memory, no cooperative launch, two launches a step.
    ``auto`` (default): whichever :data:`PATH_RULES` says for the call (:func:`cuda_path`). Both
    paths run the same cell arithmetic; the GEMMs sum K in their own order (fp32 on TF32 tensor
    cores where the recurrence may use TF32). Read at every call, like :func:`max_groups`."""
    raw = os.environ.get("FUSED_RNN_CUDA_PATH", "auto")
    if raw not in CUDA_PATHS:
        raise ValueError(
            f"FUSED_RNN_CUDA_PATH must be one of {', '.join(CUDA_PATHS)}, got {raw!r}")
    return raw


@dataclasses.dataclass(frozen=True)
class MeasuredRule:
    """Layer calls that a setting's ``auto`` treats otherwise than by default: the fields and
    the match that :class:`PathRule` and :class:`StageCopyRule` share.

    A rule comes only from a committed GPU table (``evidence``, under ``benchmarks/results/``)
    whose CUDA GPU tests passed and in which the choice it makes beat the default, forward and
    fwd+bwd, with every check passed, on every measured shape inside its ranges and lost on
    none there: ``benchmarks/auto_rules.py`` prints them. Ranges are inclusive; ``dtypes``
    holds the layer's data dtype (the op's input, autocast's where autocast is on). It holds
    on GPUs of the table's compute capability only; for float32, ``tf32`` says whether it
    holds while the recurrence may use TF32 (True) or may not (False), as AutoRule's.
    ``steps`` (required) spans the chunk lengths measured.
    """

    modes: frozenset[str]
    dtypes: frozenset[torch.dtype]
    batch: tuple[int, int]
    hidden: tuple[int, int]
    steps: tuple[int, int]
    capability: tuple[int, int]
    evidence: str
    tf32: bool | None = None

    def __post_init__(self) -> None:
        check_measured_rule(f"a {type(self).__name__}", self.modes, self.dtypes, self.tf32,
                            self.evidence, batch=self.batch, hidden=self.hidden,
                            steps=self.steps)

    def matches(self, mode: str, dtype: torch.dtype, batch: int, hidden: int, steps: int,
                capability: tuple[int, int], tf32: bool) -> bool:
        return (mode in self.modes and dtype in self.dtypes and capability == self.capability
                and (dtype != torch.float32 or self.tf32 is None or self.tf32 == tf32)
                and self.batch[0] <= batch <= self.batch[1]
                and self.hidden[0] <= hidden <= self.hidden[1]
                and self.steps[0] <= steps <= self.steps[1])


@dataclasses.dataclass(frozen=True)
class PathRule(MeasuredRule):
    """Layer calls that ``FUSED_RNN_CUDA_PATH=auto`` runs on the per-step path: where
    ``cuda-step`` beat the persistent kernel (``auto_rules.py --paths``). A one-step call (a
    cell) pays the persistent launch's W_hh load for one step, so a win at T = 64..1024 says
    nothing about T = 1; a rule for cells (steps (1, 1)) comes from the bench's one-step shapes
    (bench_gpu.STEP_SHAPES), which ``--paths`` reads apart from the chunks.
    """


@dataclasses.dataclass(frozen=True)
class StageCopyRule(MeasuredRule):
    """Layer calls whose persistent launches ``FUSED_RNN_CUDA_STAGE_COPY=auto`` runs with the
    tagged exchange: where ``cuda-tagged`` beat the pipelined copy (``auto_rules.py
    --stage-copy``). Its dtypes are 16-bit, the only ones the tagged exchange takes; a launch
    whose plan cannot take it (no stage, K parts, a DSMEM mirror) runs ``registers``, as under
    the setting.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if not set(self.dtypes) <= set(SIXTEEN_BIT):
            raise ValueError("a StageCopyRule's dtypes are float16 and bfloat16 (the tagged "
                             f"exchange holds 16-bit values), not {self.dtypes!r}")


# First match wins; no match: persistent. None yet: the per-step path has not run on a GPU.
PATH_RULES: tuple[PathRule, ...] = ()
# Any match: tagged; else pipelined. None yet: the tagged exchange has not run on a GPU.
STAGE_COPY_RULES: tuple[StageCopyRule, ...] = ()


def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of ``device``, as the extension reports it (cudasim's simulated
    device for the CPU tensors of the simulation tests: its index 0)."""
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else 0)
    _, _, major, minor, _ = _ext.extension().device_info(index)
    return int(major), int(minor)


def cuda_path(mode: str, dtype: torch.dtype, batch: int, hidden: int, steps: int,
              device: torch.device, allow_tf32: bool) -> str:
    """``persistent`` or ``step``: the path a layer call of ``mode`` over ``steps`` steps of
    ``batch`` rows of ``hidden`` units takes, computing in ``dtype`` on ``device``
    (``allow_tf32``: whether the recurrence may use TF32). :func:`cuda_path_setting` unless
    it is ``auto``; then ``step`` where a rule of :data:`PATH_RULES` matches, else
    ``persistent``."""
    setting = cuda_path_setting()
    if setting != "auto":
        return setting
    if PATH_RULES:
        capability = _capability(device)
        if any(r.matches(mode, dtype, batch, hidden, steps, capability, allow_tf32)
               for r in PATH_RULES):
            return "step"
    return "persistent"


GEMM_OPERANDS = ("auto", "fp32")


def gemm_operands() -> str:
    """How the time-parallel GEMMs of 16-bit layers take their operands, from
    ``FUSED_RNN_CUDA_GEMMS``: ``auto`` (default: as they are stored, on 16-bit tensor cores with
    an fp32 result, where torch can return one: CUDA, torch >= 2.8) or ``fp32`` (promoted to
    fp32 first, on TF32 tensor cores). Every operand is a 16-bit value, exact in fp32 and in
    TF32, so both form the same products and sum them in fp32: the results differ only by the
    order of those sums. Read at every call, like :func:`max_groups`."""
    raw = os.environ.get("FUSED_RNN_CUDA_GEMMS", "auto")
    if raw not in GEMM_OPERANDS:
        raise ValueError(
            f"FUSED_RNN_CUDA_GEMMS must be one of {', '.join(GEMM_OPERANDS)}, got {raw!r}")
    return raw


def _mm(a: Tensor, b: Tensor, cd: torch.dtype) -> Tensor:
    """a @ b in the compute dtype ``cd`` (fp32 but in the CPU emulation's fp64):
    ``common.mm_f32``, on 16-bit operands as they are unless :func:`gemm_operands` says
    ``fp32``."""
    return mm_f32(a, b, cd, sixteen_bit=gemm_operands() == "auto")


def _lengths32(lengths: Tensor | None, device: torch.device, steps: int) -> Tensor | None:
    """lengths as the kernels' int32, clamped to [0, steps] first: a row is valid at step t
    where t < lengths[b], so that changes nothing, and a length of 2**31 or more no longer
    wraps in the cast (2**32 + 1 read as 1). The clamp runs in int64: ``steps`` need not fit
    the caller's dtype (int8 lengths with T=130)."""
    if lengths is None:
        return None
    wide = lengths.to(device=device, dtype=torch.int64)
    return wide.clamp(0, steps).to(torch.int32).contiguous()


def _settings(direction: str, mode: str, dtype: torch.dtype, T: int, B: int, H: int,
              device: torch.device) -> tuple:
    """The persistent launch's settings, in the binding's order after ``save`` (forward) or
    ``allow_tf32`` (backward) up to ``point_batch``: max_groups, max_stage_k, the phase-timing
    buffer, stage_copy, k_parts, max_blocks, cluster, team_clusters, the dsmem exchange,
    tile_block, point_batch."""
    return (max_groups(), max_stage_k(), profile.buffer(direction, mode, dtype, T, B, H, device),
            stage_copy(mode, dtype, B, H, T, device), k_parts(), max_blocks(), cluster(),
            team_clusters(), cluster_exchange_dsmem(), tile_block(), point_batch())


# The kernels count steps and batch rows in int32 (binding.cpp: check_counts): the backward's
# loop runs T + 1 iterations, and batch rows are padded to a multiple of plan.K_BATCH_PAD and
# walked in chunks of plan.K_CHUNK_COLS.
MAX_STEPS = 2**31 - 2
MAX_ROWS = 2**31 - 1 - K_BATCH_PAD - K_CHUNK_COLS


def check_counts(T: int, B: int) -> None:
    """A clear error, before anything is allocated, for a chunk the kernels cannot count."""
    if T > MAX_STEPS or B > MAX_ROWS:
        raise RuntimeError(
            f"fused_rnn CUDA backend: at most {MAX_STEPS} steps and {MAX_ROWS} batch rows per "
            f"launch, got T={T}, B={B}; split the sequence into chunks (truncated BPTT) or the "
            "batch into parts"
        )


def saved_shapes(mode: str, T: int, B: int, H: int, save: bool):
    """Shapes of (gates, aux): the fp32 activations and the per-unit extra (LSTM c_t, GRU
    W_hn h + b_hn) that backward reads; empty for inference."""
    gates = (T, B, GATES[mode] * H) if save else (0,)
    aux = (T, B, H) if save and mode in ("LSTM", "GRU") else (0,)
    return gates, aux


# --------------------------------------------------------------------------- forward
def _layer_forward_impl(
    mode: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    save: bool,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y (T,B,H), h_n (B,H), c_n (B,H) or empty, gates (T,B,G*H) fp32, aux (T,B,H) fp32).

    Weights are used in x's dtype (the storage type of the kernel), as nn.LSTM requires anyway.
    """
    check_rnn_args(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lengths)
    T, B, _ = x.shape
    check_counts(T, B)
    G, H = GATES[mode], w_hh.shape[1]
    dtype = x.dtype
    g_shape, a_shape = saved_shapes(mode, T, B, H, save)
    if T == 0 or B == 0:
        return (
            x.new_zeros((T, B, H)),
            h0.to(dtype, copy=True, memory_format=torch.contiguous_format),
            c0.to(dtype, copy=True, memory_format=torch.contiguous_format)
            if mode == "LSTM" else x.new_empty((0,)),
            x.new_zeros(g_shape, dtype=compute_dtype(dtype)),
            x.new_zeros(a_shape, dtype=compute_dtype(dtype)),
        )
    ext = _ext.extension()
    cd = compute_dtype(dtype)  # fp32 (fp64 only reaches here in the CPU emulation tests)
    # One GEMM for all T steps with an fp32 result, like the reference; for fp32 data on TF32
    # tensor cores where the recurrence may use TF32 (common.gemms_use_tf32). 16-bit data: x
    # W_ih^T from the 16-bit operands (_mm), and the kernel adds b_ih to it, the same fp32 sum
    # as a bias in the GEMM (torch has no 16-bit GEMM with an fp32 bias and result).
    b_ih_kernel = None
    with tf32_gemms(gemms_use_tf32(dtype, allow_tf32)):
        if dtype in SIXTEEN_BIT:
            xproj = _mm(x.reshape(T * B, -1), w_ih.t(), cd).view(T, B, G * H)
            b_ih_kernel = None if b_ih is None else b_ih.to(cd).contiguous()
        else:
            xproj = F.linear(x.to(cd), w_ih.to(cd), _to(b_ih, cd)).contiguous()
    assert xproj.shape == (T, B, G * H)
    args = (CELLS[mode], xproj, h0.to(dtype).contiguous(),
            c0.to(dtype).contiguous() if mode == "LSTM" else None, w_hh.to(dtype).contiguous(),
            None if b_hh is None else b_hh.to(cd).contiguous(), _lengths32(lengths, x.device, T),
            reverse)
    if cuda_path(mode, dtype, B, H, T, x.device, allow_tf32) == "step":
        # fp32 step GEMMs on TF32 exactly where the recurrence may use TF32 (16-bit operands
        # are exact in TF32, should the binding have to promote them: gemms_use_tf32).
        with tf32_gemms(gemms_use_tf32(dtype, allow_tf32)):
            y, h_n, c_n, aux = ext.forward_steps(*args, save, b_ih_kernel)
    else:
        y, h_n, c_n, aux = ext.forward(
            *args, allow_tf32, save, *_settings("forward", mode, dtype, T, B, H, x.device),
            b_ih=b_ih_kernel, frag_loads=frag_loads())
    gates = xproj if save else x.new_empty((0,), dtype=cd)
    return y, h_n, c_n, gates, aux


# The implementations stay plain functions so the CPU emulation test (tests/cuda) can register
# them for CPU tensors next to an emulated extension.
cuda_layer = torch.library.custom_op(
    "fused_rnn::cuda_layer", mutates_args=(), device_types="cuda"
)(_layer_forward_impl)


@cuda_layer.register_fake
def _(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, save, allow_tf32):
    check_rnn_args(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lengths)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    g_shape, a_shape = saved_shapes(mode, T, B, H, save)
    cd = compute_dtype(x.dtype)
    return (
        x.new_empty((T, B, H)),
        x.new_empty((B, H)),
        x.new_empty((B, H) if mode == "LSTM" else (0,)),
        x.new_empty(g_shape, dtype=cd),
        x.new_empty(a_shape, dtype=cd),
    )


_INPUTS = ("c0", "b_ih", "b_hh", "lengths")


def _layer_setup(ctx, inputs, output):
    mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, save, allow_tf32 = inputs
    y, _, _, gates, aux = output
    ctx.mark_non_differentiable(gates, aux)
    ctx.mode, ctx.reverse, ctx.save, ctx.allow_tf32 = mode, reverse, save, allow_tf32
    ctx.present = tuple(t is not None for t in (c0, b_ih, b_hh, lengths))
    ctx.save_for_backward(
        *(t for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths) if t is not None),
        y, gates, aux,
    )


def _unpack(ctx):
    saved = list(ctx.saved_tensors)
    y, gates, aux = saved[-3:]
    it = iter(saved[:-3])
    c0_p, bih_p, bhh_p, len_p = ctx.present
    x, h0 = next(it), next(it)
    c0 = next(it) if c0_p else None
    w_ih, w_hh = next(it), next(it)
    b_ih = next(it) if bih_p else None
    b_hh = next(it) if bhh_p else None
    lengths = next(it) if len_p else None
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, y, gates, aux


def _layer_backward(ctx, dy, dh_n, dc_n, _dgates, _daux):
    if not ctx.save:
        refuse_unsaved("cuda_layer")
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, y, gates, aux = _unpack(ctx)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = torch.ops.fused_rnn.cuda_layer_backward(
        ctx.mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, ctx.reverse, ctx.allow_tf32,
        y, gates, aux, dy, dh_n, dc_n if ctx.mode == "LSTM" else None,
    )
    c0_p, bih_p, bhh_p, _ = ctx.present
    # One gradient per input: mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, save,
    # allow_tf32.
    return (
        None, dx, dh0, dc0 if c0_p else None, dw_ih, dw_hh,
        db_ih if bih_p else None, db_hh if bhh_p else None, None, None, None, None,
    )


cuda_layer.register_autograd(_layer_backward, setup_context=_layer_setup)


# --------------------------------------------------------------------------- backward
def _layer_backward_impl(
    mode: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    allow_tf32: bool,
    y: Tensor,
    gates: Tensor,
    aux: Tensor,
    dy: Tensor | None,
    dh_n: Tensor | None,
    dc_n: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh); empty where the input is absent.

    Checks what it is given against x's sizes first, as the forward does: the binding checks
    the tensors it takes against dy's, but x, y, the weights and the biases reach only the
    GEMMs here, which would take some wrong shapes (x as (B, T, I)) and give wrong gradients."""
    check_rnn_args(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lengths)
    T, B, I = x.shape
    G, H = GATES[mode], w_hh.shape[1]
    gates_shape, aux_shape = saved_shapes(mode, T, B, H, True)
    cd = compute_dtype(x.dtype)  # fp32 (fp64 where the tests emulate the kernels exactly)
    check_saved_args("fused_rnn::cuda_layer_backward", x, {
        "y": (y, (T, B, H), x.dtype), "gates": (gates, gates_shape, cd),
        "aux": (aux, aux_shape, cd), "dy": (dy, (T, B, H), None),
        "dh_n": (dh_n, (B, H), None),
        # only an LSTM reads dc_n, which may come empty (no gradient)
        "dc_n": (dc_n if mode == "LSTM" and dc_n is not None and dc_n.numel() else None,
                 (B, H), None)})
    dtype = x.dtype
    fcd = dict(device=x.device, dtype=cd)
    dh_n = torch.zeros((B, H), **fcd) if dh_n is None else dh_n.to(cd).contiguous()
    is_lstm = mode == "LSTM"
    if is_lstm:
        dc_n = torch.zeros((B, H), **fcd) if dc_n is None else dc_n.to(cd).contiguous()
    if T == 0 or B == 0:
        dgx = torch.zeros((T, B, G * H), device=x.device, dtype=dtype)
        dghn = None
        dh0, dc0 = dh_n.clone(), (dc_n.clone() if is_lstm else None)
        hprev = y
    else:
        ext = _ext.extension()
        dy = torch.zeros_like(y) if dy is None else dy.to(dtype).contiguous()
        hprev = previous_hidden(y, h0, lengths, reverse).contiguous()
        args = (CELLS[mode], dy, dh_n, dc_n if is_lstm else None, w_hh.to(dtype).contiguous(),
                gates, aux if mode in ("LSTM", "GRU") else None,
                c0.to(cd).contiguous() if is_lstm else None, hprev if mode == "GRU" else None,
                _lengths32(lengths, x.device, T), reverse)
        if cuda_path(mode, dtype, B, H, T, x.device, allow_tf32) == "step":
            with tf32_gemms(gemms_use_tf32(dtype, allow_tf32)):
                dgx, dghn, dh0, dc0 = ext.backward_steps(*args)
        else:
            dgx, dghn, dh0, dc0 = ext.backward(
                *args, allow_tf32, *_settings("backward", mode, dtype, T, B, H, x.device),
                frag_loads=frag_loads())
    # dgx (and dghn) come in the storage dtype, rounded as the recurrent matmul's operand is
    # (reference.py: the contract), so the GEMMs below take 16-bit operands (_mm) and sum in fp32.
    # The recurrent side's dgates are the input side's, but for GRU's n gate: r * dn (b_hn sits
    # inside r * (.)), dghn. Its rows of dW_hh and db_hh come from dghn and the r, z rows from
    # dgx, without copying both into one (T, B, 3H) tensor (201 MB in bf16 at S4).
    dgx2 = dgx.reshape(T * B, G * H)
    dghn2 = dghn.reshape(T * B, H) if mode == "GRU" and dghn is not None else None
    hprev2 = hprev.reshape(T * B, H)
    with tf32_gemms(gemms_use_tf32(dtype, allow_tf32)):  # as the forward's projection
        dx = _mm(dgx2, w_ih, cd).reshape(T, B, I).to(dtype)
        dw_ih = _mm(dgx2.t(), x.reshape(T * B, I), cd).to(w_ih.dtype)
        if dghn2 is None:
            dw_hh = _mm(dgx2.t(), hprev2, cd).to(w_hh.dtype)
        else:
            dw_hh = torch.cat([_mm(dgx2[:, : 2 * H].t(), hprev2, cd),
                               _mm(dghn2.t(), hprev2, cd)]).to(w_hh.dtype)
    # Absent inputs get distinct empty tensors: custom-op outputs may not alias each other. The
    # two bias gradients share one fp32 sum over the T*B rows of dgx (67 MB read at S3), copied.
    db_sum = dgx2.sum(0, dtype=cd) if b_ih is not None or b_hh is not None else None
    db_ih = x.new_empty((0,)) if b_ih is None else db_sum.to(b_ih.dtype)
    if b_hh is None:
        db_hh = x.new_empty((0,))
    elif dghn2 is None:
        db_hh = db_sum.to(b_hh.dtype, copy=True)
    else:
        db_hh = torch.cat([db_sum[: 2 * H], dghn2.sum(0, dtype=cd)]).to(b_hh.dtype)
    dc0_out = dc0.to(c0.dtype) if (is_lstm and c0 is not None) else x.new_empty((0,))
    return dx, dh0.to(h0.dtype), dc0_out, dw_ih, dw_hh, db_ih, db_hh


cuda_layer_backward = torch.library.custom_op(
    "fused_rnn::cuda_layer_backward", mutates_args=(), device_types="cuda"
)(_layer_backward_impl)


@cuda_layer_backward.register_fake
def _(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, allow_tf32, y, gates, aux,
      dy, dh_n, dc_n):
    return (
        grad_like(x, x),
        grad_like(h0, x),
        grad_like(c0 if mode == "LSTM" else None, x),
        grad_like(w_ih, x),
        grad_like(w_hh, x),
        grad_like(b_ih, x),
        grad_like(b_hh, x),
    )


refuse_double_backward(cuda_layer_backward, "cuda")

# --------------------------------------------------------------------------- autocast
register_autocast(cuda_layer, "cuda")
register_autocast_off(cuda_layer_backward, "cuda")
