"""CUDA backend: forward and every gradient against the reference, lengths, reverse, odd sizes,
determinism, opcheck, the nn modules, size limits, streams, autocast and torch.compile.

On a GPU machine these are marked ``gpu`` and a backend that cannot load is a failure here, not
a skip.

Without a GPU the same tests run on a CPU stand-in (the tests that need CUDA itself skip):

* by default where g++ is on PATH the kernels of ``csrc/`` themselves, compiled with g++
  against cudasim (``simulate.py``, ``sim/``), every CUDA thread of every launch executed,
  behind ``csrc/binding.cpp`` itself, compiled for the CPU (``host_binding.py``;
  ``FUSED_RNN_CUDA_SIM=binding``), or where that cannot build (no Python headers, say) behind
  the binding's mirror in ``simulate.py`` (``FUSED_RNN_CUDA_SIM=1``); without g++ the default
  is ``0``, below;
  ``FUSED_RNN_CUDA_SIM=binding-asan`` runs binding.cpp and the kernels under AddressSanitizer
  and UBSan (the process must start with ``simulate.sanitizer_env("address")``;
  ``test_cuda_sim.py`` runs a part of this file that way), ``asan`` the kernels alone behind
  the mirror, ``FUSED_RNN_CUDA_SIM=tsan`` the kernels under ThreadSanitizer behind the mirror
  (start with ``simulate.sanitizer_env("thread")``; by hand: 330 of this file's cases took 15
  minutes);
* ``FUSED_RNN_CUDA_EMULATE=1``: their torch emulation (``emulate.py``) instead;
* ``FUSED_RNN_CUDA_SIM=0``: nothing; the tests skip as GPU-only.

Accuracy rule (FlashAttention's): against the reference in float64, our relative error may be
at most twice the error of the reference computed in the same dtype, or the dtype's floor
(beside the dtype below) -- the floor covers what the kernels round and the reference does not:
the recurrent dgates are a tensor-core operand in the storage dtype.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import training_checks
from binding_refusals import BAD_BINDING_ARGS
from binding_refusals import CASE_IDS as BINDING_CASE_IDS
from cases import (
    FLOORS,
    accuracy_floor,
    install_standin,
    layer_inputs,
    round_to_tf32,
    run_layer,
)
from cases import rel as _rel
from helpers import (
    check_non_finite_like_torch_nn,
    check_padding_is_ignored,
    non_finite_params,
)
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
import fused_rnn.ops.cuda as cuda_backend
from fused_rnn import functional
from fused_rnn.ops import common, reference
from fused_rnn.ops.cuda import _ext, ops
from fused_rnn.ops.cuda import plan as P
from fused_rnn.ops.reference import MODES


def _default_sim() -> str:
    """Without a GPU: cudasim behind binding.cpp itself where it builds here, else behind its
    mirror (simulate.py), else nothing (no g++)."""
    if torch.cuda.is_available() or not shutil.which("g++"):
        return "0"
    from host_binding import unavailable_reason

    return "binding" if unavailable_reason() is None else "1"


# Without a GPU this file runs on cudasim unless told otherwise (FUSED_RNN_CUDA_SIM=0 skips it).
SIM = os.environ.get("FUSED_RNN_CUDA_SIM") or _default_sim()
# FUSED_RNN_CUDA_SIM -> (the cudasim build's sanitizer, whether binding.cpp itself runs)
SIM_BUILDS = {"1": ("", False), "asan": ("address", False), "tsan": ("thread", False),
              "binding": ("", True), "binding-asan": ("address", True)}
EMULATE = os.environ.get("FUSED_RNN_CUDA_EMULATE", "0") == "1"
STANDIN = "emulate" if EMULATE else "sim" if SIM in SIM_BUILDS else None
HOST_BINDING = STANDIN == "sim" and SIM_BUILDS[SIM][1]
DEVICE = "cpu" if STANDIN else "cuda"
pytestmark = [] if STANDIN else [pytest.mark.gpu]
gpu_only = pytest.mark.skipif(STANDIN is not None, reason=f"needs a GPU (stand-in: {STANDIN})")


def _sim_standin(**kwargs):
    """The cudasim stand-in FUSED_RNN_CUDA_SIM names: ``simulate.Simulator`` (the binding's
    mirror) or, for "binding*", ``host_binding.HostBinding`` (binding.cpp itself)."""
    sanitize, binding = SIM_BUILDS[SIM]
    if binding:
        from host_binding import HostBinding as Standin
    else:
        from simulate import Simulator as Standin
    return Standin(sanitize=sanitize, **kwargs)


@pytest.fixture(autouse=True)
def cuda_ext(monkeypatch):
    """The real extension (must load on a GPU machine), or a CPU stand-in (see above)."""
    if STANDIN == "sim":
        return install_standin(monkeypatch, _sim_standin(sms=8))
    if STANDIN == "emulate":
        from emulate import Emulator

        return install_standin(monkeypatch, Emulator(sms=8))
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert reason is None, f"a GPU is present but the CUDA backend is unavailable: {reason}"
    return _ext.extension()


def _inputs(mode, T, B, I, H, dtype, seed, lengths):
    return layer_inputs(mode, T, B, I, H, seed, lengths)  # float64; _run casts to dtype


def _run(fn, mode, leaves, dtype, lens, reverse, cots):
    return run_layer(fn, mode, leaves, dtype, lens, reverse, cots, DEVICE)


# (T, B, I, H, environment). Defaults: batch groups and X staging as the plan chooses (plan.h).
# B=70 runs as 3 batch groups of one chunk, or ungrouped as two chunks per block; "slices16"
# stages K 16 columns at a time (several slices per chunk, one buffer), "slices32" 32 at a time
# (the pipelined copy: two buffers of 16), "direct" does not stage. "partsN" forces N K parts
# (plan.h: teams of N blocks split K and exchange partial sums): H=60 gives 8 blocks on cudasim's
# 8 SMs with a ragged last one (on a 132-SM GPU: LSTM bf16/fp16/TF32 30 blocks in teams of 2,
# everything else teams of 4), H=256 teams of 4 on both. "blocks2" caps the grid at 2 blocks
# (FUSED_RNN_CUDA_MAX_BLOCKS; every cell's H=37 fits in two), each owning 19-24 units.
# "cluster8" runs the three batch groups as thread-block clusters of at most 8 blocks, each step
# ending at the cluster barrier (FUSED_RNN_CUDA_CLUSTER; sm_90, else the grid plan); "-direct"
# reads h with plain loads after it (no cp.async.cg staging), "-parts4" adds K parts in teams of
# 4 within each cluster (plain loads of the partial sums after the cluster barrier);
# "-dsmem" keeps each cluster's exchange in its blocks' shared memory, written by the peers
# directly (FUSED_RNN_CUDA_CLUSTER_EXCHANGE=dsmem); "teamclusters4" runs K-parts teams of 4 as
# clusters of the cooperative grid
# (FUSED_RNN_CUDA_TEAM_CLUSTERS; its id says "cluster", not "parts", so that a failure there
# makes gpu_check.sh drop the cluster variants rather than turn K parts off).
UNGROUPED = {"FUSED_RNN_CUDA_MAX_GROUPS": "1"}
STEP = {"FUSED_RNN_CUDA_PATH": "step"}
SHAPES = {"T5-B3-I7-H37": (5, 3, 7, 37, {}), "T1-B1-I4-H16": (1, 1, 4, 16, {}),
          "T5-B3-I7-H37-slices16": (5, 3, 7, 37, {"FUSED_RNN_CUDA_STAGE_K": "16"}),
          "T5-B3-I7-H37-slices32": (5, 3, 7, 37, {"FUSED_RNN_CUDA_STAGE_K": "32"}),
          "T5-B3-I7-H37-blocks2": (5, 3, 7, 37, {"FUSED_RNN_CUDA_MAX_BLOCKS": "2"}),
          "T7-B70-I9-H24": (7, 70, 9, 24, {}),
          "T7-B70-I9-H24-ungrouped": (7, 70, 9, 24, UNGROUPED),
          "T7-B70-I9-H24-cluster8": (7, 70, 9, 24, {"FUSED_RNN_CUDA_CLUSTER": "8"}),
          "T7-B70-I9-H24-cluster8-direct": (7, 70, 9, 24, {"FUSED_RNN_CUDA_CLUSTER": "8",
                                                           "FUSED_RNN_CUDA_STAGE_K": "0"}),
          # B=40: two batch groups of 4 blocks, K parts of 4 (at B=70 the plan takes parts=2)
          "T7-B40-I9-H60-cluster8-parts4": (7, 40, 9, 60, {"FUSED_RNN_CUDA_CLUSTER": "8",
                                                           "FUSED_RNN_CUDA_K_PARTS": "4"}),
          "T7-B70-I9-H24-cluster8-dsmem": (7, 70, 9, 24,
                                           {"FUSED_RNN_CUDA_CLUSTER": "8",
                                            "FUSED_RNN_CUDA_CLUSTER_EXCHANGE": "dsmem"}),
          # At most 8 blocks (the stand-in's SM count): on 132 SMs the plan takes teams of 2
          # at H=60, not the 4 these names promise.
          "T7-B70-I9-H60-ungrouped-teamclusters4-blocks8": (
              7, 70, 9, 60, {**UNGROUPED, "FUSED_RNN_CUDA_K_PARTS": "4",
                             "FUSED_RNN_CUDA_TEAM_CLUSTERS": "on",
                             "FUSED_RNN_CUDA_MAX_BLOCKS": "8"}),
          "T7-B70-I9-H24-ungrouped-direct": (7, 70, 9, 24,
                                             {**UNGROUPED, "FUSED_RNN_CUDA_STAGE_K": "0"}),
          "T7-B70-I9-H60-ungrouped-parts4-blocks8": (
              7, 70, 9, 60, {**UNGROUPED, "FUSED_RNN_CUDA_K_PARTS": "4",
                             "FUSED_RNN_CUDA_MAX_BLOCKS": "8"}),
          # The TF32 tiles through mma.sync and ldmatrix (FUSED_RNN_CUDA_FRAG_LOADS=mma): single
          # tiles, and at H=60 over 2 blocks 8 x 4 tiles a chunk, multiplied in 2 x 2 blocks.
          "T7-B70-I9-H24-mma": (7, 70, 9, 24, {"FUSED_RNN_CUDA_FRAG_LOADS": "mma"}),
          "T7-B70-I9-H60-ungrouped-blocks2-mma": (
              7, 70, 9, 60, {**UNGROUPED, "FUSED_RNN_CUDA_MAX_BLOCKS": "2",
                             "FUSED_RNN_CUDA_FRAG_LOADS": "mma"}),
          # The tagged exchange (FUSED_RNN_CUDA_STAGE_COPY=tagged; 16-bit only): no step
          # barrier, h and the dgates as words tagged with their step, polled by the stage
          # copy; over the grid, and within clusters (an ordinary launch, no grid to sync).
          "T5-B3-I7-H37-tagged": (5, 3, 7, 37, {"FUSED_RNN_CUDA_STAGE_COPY": "tagged"}),
          "T7-B70-I9-H24-cluster8-tagged": (7, 70, 9, 24, {"FUSED_RNN_CUDA_CLUSTER": "8",
                                                           "FUSED_RNN_CUDA_STAGE_COPY": "tagged"}),
          # The per-step path (FUSED_RNN_CUDA_PATH=step): a GEMM and a launch of the cells'
          # points a step, no plan.
          "T5-B3-I7-H37-step": (5, 3, 7, 37, STEP),
          "T1-B1-I4-H16-step": (1, 1, 4, 16, STEP),
          "T7-B70-I9-H24-step": (7, 70, 9, 24, STEP),
          "T16-B16-I32-H256": (16, 16, 32, 256, {}),
          # At most 64 blocks: with more SMs than 64 units' worth of blocks (a 114-SM H100
          # PCIe: 86 blocks in fp32) the plan takes teams of 2, not the 4 the name says.
          "T16-B16-I32-H256-parts4-blocks64": (16, 16, 32, 256, {"FUSED_RNN_CUDA_K_PARTS": "4",
                                                                 "FUSED_RNN_CUDA_MAX_BLOCKS": "64"})}
@pytest.fixture(autouse=True)
def _persistent_unless_asked(monkeypatch):
    """The tests here name the path they check: the persistent kernel, unless a test (or the
    whole run) sets FUSED_RNN_CUDA_PATH itself, whatever the path rules (ops.PATH_RULES)
    would choose; test_cuda_sim.py checks those rules."""
    if "FUSED_RNN_CUDA_PATH" not in os.environ:
        monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "persistent")


# dtype, cudnn.allow_tf32, floor for outputs, floor for gradients
DTYPES = {
    "fp32": (torch.float32, False, *FLOORS["fp32"]),
    "tf32": (torch.float32, True, *FLOORS["tf32"]),
    "bf16": (torch.bfloat16, False, *FLOORS["bf16"]),
    "fp16": (torch.float16, False, *FLOORS["fp16"]),
}


def _assert_plan_named(shape: str, plans: list[dict]) -> None:
    """Each launch (forward and backward) runs the partition ``shape``'s name says: batch
    groups off for "ungrouped", X read directly for "direct", staged N columns a slice for
    "slicesN", at most N blocks for "blocksN", K parts of N for "teamclustersN" and for
    "partsN" (in one launch at least; a count is the largest team that may be taken),
    cluster groups for "clusterN" (their blocks exchanging through DSMEM for "-dsmem", where
    the mirrors fit), team clusters for "teamclusters"."""
    assert len(plans) == 2, f"{shape}: {len(plans)} launches"
    for pl in plans:
        words = shape.split("-")[4:]
        for word in words:
            num = int("".join(c for c in word if c.isdigit()) or 0)
            if word == "ungrouped":
                assert pl["groups"] == 1, (shape, pl)
            elif word == "direct":
                assert pl["stage_k"] == 0, (shape, pl)
            elif word.startswith("slices"):
                assert pl["stage_k"] == num, (shape, pl)
            elif word.startswith("blocks"):
                assert pl["blocks"] <= num, (shape, pl)
            elif word.startswith("parts"):  # the largest team <= N that fits, N somewhere
                assert 1 < pl["parts"] <= num, (shape, pl)
            elif word.startswith("teamclusters"):
                assert pl["parts"] == num and pl["cluster"] == P.CLUSTER_TEAMS, (shape, pl)
            elif word.startswith("cluster"):
                want = ((P.CLUSTER_GROUPS, P.CLUSTER_GROUPS_DSMEM) if "dsmem" in words
                        else (P.CLUSTER_GROUPS,))
                assert pl["groups"] > 1 and pl["cluster"] in want, (shape, pl)
            elif word == "tagged":  # the tagged kernels ran (recorded on cudasim only)
                assert pl.get("stage_copy", 3) == 3, (shape, pl)
            elif word not in ("dsmem", "mma"):  # mma: how the tiles multiply, not the plan
                raise AssertionError(f"{shape}: no rule for {word!r}")
    for word in shape.split("-")[4:]:
        if word.startswith("parts"):
            assert any(pl["parts"] == int(word[5:]) for pl in plans), (shape, plans)
        if word == "dsmem":
            assert any(pl["cluster"] == P.CLUSTER_GROUPS_DSMEM for pl in plans), (shape, plans)


PLAN_KEYS = ("groups", "stage_k", "blocks", "parts", "cluster")


def _mirror_plans(mode, dtype, tf32, batch, hidden, device_info,
                  keys: tuple[str, ...] = PLAN_KEYS) -> list[dict]:
    """The forward and backward plans of a call under the current settings, from plan.py (the
    mirror of plan.h's choose_launch, checked against it on a GPU by
    test_plan_matches_python_mirror) for a device of ``device_info`` (the extension's: SMs,
    opt-in shared memory, major, ...). On a GPU, where no launch is recorded, what
    _assert_plan_named checks."""
    sms, smem, major = (int(v) for v in device_info[:3])
    is16 = dtype != torch.float32
    b_pad = -(-batch // P.K_BATCH_PAD) * P.K_BATCH_PAD
    plans = []
    for backward in (False, True):
        _, pl = P.choose_launch(P.CELLS[mode], is16, tf32 and not is16, hidden, backward, sms,
                                smem, b_pad, ops.max_groups(), ops.max_stage_k(), ops.k_parts(),
                                ops.max_blocks(), ops.cluster(), ops.team_clusters(), major >= 9,
                                ops.cluster_exchange_dsmem())
        plans.append({k: getattr(pl, k) for k in keys})
    return plans


def test_every_shape_keeps_its_name_on_the_gpus_we_may_get(monkeypatch):
    """What a GPU run of test_matches_reference tests is what each shape's name says, on an
    H100 SXM's or H200's dimensions (132 SMs, 227 KB of shared memory a block, sm_90), an H100
    PCIe's (114 SMs), an A100's (108 SMs, 163 KB, sm_80) and the stand-in's (8 SMs): on the
    H200, before the "-blocks8" settings, two "parts4" shapes took teams of 2 in 16 bits and
    TF32, and on 114 SMs the H256 one did in fp32 before "-blocks64"."""
    for shape, (_, B, _, H, env) in SHAPES.items():
        if shape.endswith("-step"):  # no plan
            continue
        for dt, (dtype, tf32, *_) in DTYPES.items():
            for mode in MODES:
                with monkeypatch.context() as m:
                    for k, v in env.items():
                        m.setenv(k, v)
                    for sms, smem, major in ((132, 232448, 9), (114, 232448, 9),
                                             (108, 166912, 8), (8, 232448, 9)):
                        if major < 9 and "cluster" in shape:  # clusters need sm_90
                            continue
                        plans = _mirror_plans(mode, dtype, tf32, B, H, (sms, smem, major))
                        try:
                            _assert_plan_named(shape, plans)
                        except AssertionError as e:
                            raise AssertionError(f"{dt} {mode} on {sms} SMs: {e}") from None


# (mode, dt, shape): every combination, but the "-mma" shapes in TF32 only and the "-tagged"
# ones in 16 bits only (the settings change nothing else).
REFERENCE_CASES = [(mode, dt, shape) for mode in MODES for dt in DTYPES for shape in SHAPES
                   if (dt == "tf32" or not shape.endswith("-mma"))
                   and (dt in ("bf16", "fp16") or not shape.endswith("-tagged"))]


@pytest.mark.parametrize("variant", ["dense-fwd", "lengths-rev", "lengths-fwd"])
@pytest.mark.parametrize("mode,dt,shape", REFERENCE_CASES)
def test_matches_reference(cuda_ext, monkeypatch, mode, dt, shape, variant):
    if STANDIN == "emulate" and shape.startswith("T16-B16-I32-H256"):
        pytest.skip(f"too slow on the CPU ({STANDIN})")
    step = shape.endswith("-step")
    if STANDIN == "emulate" and step:
        pytest.skip("the emulation has no per-step path (cudasim runs its kernels)")
    dtype, tf32, _, _ = DTYPES[dt]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    T, B, I, H, env = SHAPES[shape]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    lengths, reverse = variant.startswith("lengths"), variant.endswith("rev")
    leaves, lens, cots = _inputs(mode, T, B, I, H, dtype, 0, lengths)
    before = len(cuda_ext.launches) if STANDIN == "sim" else 0
    if STANDIN is None:  # on a GPU: the plans from the mirror, the cluster launches counted
        info = cuda_ext.device_info(torch.cuda.current_device())
        plans = [] if step else _mirror_plans(mode, dtype, tf32, B, H, info)
        clustered = sum(pl["cluster"] != P.CLUSTER_NONE for pl in plans)
        clusters_before = cuda_ext.cluster_launches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _run(cuda_backend.rnn_layer, mode, leaves, dtype, lens, reverse, cots)
    # cuBLAS took the step GEMMs' 16-bit operands as they are (binding.cpp step_mm warns, once
    # a process, where torch refused and it promoted them): on a GPU, and on the host build,
    # whose HostBinding gives the CPU a stand-in for that GEMM (test_host_binding.py checks
    # the fallback without it).
    refused = [str(w.message) for w in caught if "refused the per-step path" in str(w.message)]
    assert not refused, refused
    if STANDIN == "sim" and step:  # the per-step loops ran, and nothing else
        assert [d for d, _, _ in cuda_ext.launches[before:]] == ["forward_steps",
                                                                 "backward_steps"]
    elif STANDIN == "sim":  # the plan the shape's name promises (the settings are only asked)
        recorded = [pl for _, _, pl in cuda_ext.launches[before:]]
        _assert_plan_named(shape, recorded)
        info = cuda_ext.device_info(0)
        assert _mirror_plans(mode, dtype, tf32, B, H, info) == [
            {k: pl[k] for k in PLAN_KEYS} for pl in recorded]
    elif STANDIN is None and not step:
        if info[2] >= 9 or "cluster" not in shape:  # no clusters before sm_90
            _assert_plan_named(shape, plans)
        # a cluster plan that fell back to the cooperative grid would pass the checks below
        assert cuda_ext.cluster_launches() - clusters_before == clustered, (shape, plans)
    same = _run(reference.rnn_layer, mode, leaves, dtype, lens, reverse, cots)
    exact = _run(reference.rnn_layer, mode, leaves, torch.float64, lens, reverse, cots)
    n_out = 3 if mode == "LSTM" else 2
    for i, (a, s, e) in enumerate(zip(ours, same, exact)):
        assert a.dtype == dtype and a.shape == e.shape
        assert torch.isfinite(a).all(), f"tensor {i} has non-finite values"
        floor = accuracy_floor(mode, dt, gradient=i >= n_out)
        err, err_ref = _rel(a, e), _rel(s, e)
        assert err <= max(2 * err_ref, floor), (i, err, err_ref)


@pytest.mark.skipif(not STANDIN, reason="on a GPU cuBLAS rounds to TF32 itself")
@pytest.mark.parametrize("dt", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_with_tf32_gemms(cuda_ext, monkeypatch, mode, dt):
    """The accuracy test, with the time-parallel GEMMs' operands rounded to TF32 as a GPU's
    cuBLAS would (common.gemms_use_tf32: always for 16-bit data, for fp32 where cuDNN's RNN
    may): the CPU stand-in's GEMMs are exact, so this is how the CPU sees the GPU's error."""
    seen = []

    def tf32(fn):
        def gemm(*args):
            if common.gemm_fp32_precision() != "tf32":
                return fn(*args)
            seen.append(fn)
            return fn(*(round_to_tf32(a) for a in args[:2]), *args[2:])
        return gemm

    monkeypatch.setattr(torch.nn.functional, "linear", tf32(torch.nn.functional.linear))
    monkeypatch.setattr(torch.Tensor, "__matmul__", tf32(torch.Tensor.__matmul__))
    test_matches_reference(cuda_ext, monkeypatch, mode, dt, "T5-B3-I7-H37", "lengths-rev")
    # GRU's dW_hh is two GEMMs: its n rows come from another tensor (ops.py).
    assert len(seen) == (5 if mode == "GRU" else 4), \
        "the projection, dx, dW_ih and dW_hh ran on TF32"


@pytest.mark.parametrize("setting", ops.GEMM_OPERANDS)
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_16_bit_gemms_form_exact_products_and_sum_in_fp32(monkeypatch, dt, setting):
    """The time-parallel GEMMs of a 16-bit layer (ops._mm): on a GPU with
    FUSED_RNN_CUDA_GEMMS=auto one cuBLAS GEMM on the 16-bit operands with an fp32 result
    (torch.mm out_dtype), with ``fp32`` the operands promoted to fp32 on TF32 tensor cores;
    on the CPU stand-in promoted. Either way every product is exact and the sums are fp32. The
    operands are positive, so each result is the sum of its terms' sizes, and an fp32 sum of n
    of them in any order, even truncating, is within 2 n 2^-24 (1.2e-4) of it relative; a result
    or partial sums rounded to 16 bits would be up to 2^-9 (bf16) or 2^-12 (fp16) off."""
    monkeypatch.setenv("FUSED_RNN_CUDA_GEMMS", setting)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
    g = torch.Generator().manual_seed(0)
    n = 1000
    a, b = (torch.randn(s, generator=g).abs().to(dtype).to(DEVICE) for s in ((256, n), (n, 192)))
    out_dtypes = []
    mm = torch.mm

    def recording_mm(*args, **kwargs):
        out_dtypes.append(kwargs.get("out_dtype"))
        return mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    with ops.tf32_gemms(True):
        got = ops._mm(a, b.t().contiguous().t(), torch.float32)
    assert got.dtype == torch.float32
    exact = a.double() @ b.double()
    err = ((got.double() - exact).abs() / exact).max().item()
    assert err <= 2 * n * 2.0**-24, err
    on_16_bit = STANDIN is None and setting == "auto"
    assert out_dtypes == ([torch.float32] if on_16_bit else []), out_dtypes
    # ... and torch took it, here and in every GEMM this process ran before (common.mm_f32
    # promotes a refused one, with a warning)
    assert common.mm_refused is None, common.mm_refused


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_16_bit_layers_hand_every_gemm_16_bit_operands(cuda_ext, monkeypatch, mode):
    """A bf16 layer's projection, dx, dW_ih and dW_hh (GRU's in two) all get bf16 operands
    (ops._mm -> common.mm_f32: 16-bit tensor cores on a GPU): x and W_ih, and the dgates the
    backward kernel wrote in the storage dtype, never fp32 copies."""
    seen = []

    def recording(a, b, cd, **kw):
        seen.append((a.dtype, b.dtype, cd))
        return common.mm_f32(a, b, cd, **kw)

    monkeypatch.setattr(ops, "mm_f32", recording)
    leaves, lens, cots = _inputs(mode, 4, 3, 5, 37, torch.bfloat16, 0, True)
    _run(cuda_backend.rnn_layer, mode, leaves, torch.bfloat16, lens, True, cots)
    bf16 = (torch.bfloat16, torch.bfloat16, torch.float32)
    assert seen == [bf16] * (5 if mode == "GRU" else 4), seen


@pytest.mark.parametrize("path", ops.PATHS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_bitwise_reproducible(monkeypatch, mode, dt, path):
    """Two runs, the same bits, on either path (``ops.cuda_path_setting``; the per-step one's
    GEMMs are cuBLAS's). On cudasim the second runs its threads in another order, with cp.async copies
    landing early (the same order twice could not tell a race); the emulation has no threads."""
    if STANDIN == "emulate":
        pytest.skip("the emulation has no thread order to vary")
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", path)
    dtype, tf32, *_ = DTYPES[dt]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    leaves, lens, cots = _inputs(mode, 6, 37, 5, 29, dtype, 1, True)
    a = _run(cuda_backend.rnn_layer, mode, leaves, dtype, lens, True, cots)
    if STANDIN == "sim":
        install_standin(monkeypatch, _sim_standin(sms=8, order="shuffle", seed=3,
                                                  cp_async="early"))
    b = _run(cuda_backend.rnn_layer, mode, leaves, dtype, lens, True, cots)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"tensor {i} differs between two identical runs"


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_tagged_exchange_gives_the_barriers_bits(cuda_ext, monkeypatch, mode, dt):
    """FUSED_RNN_CUDA_STAGE_COPY=tagged (no step barrier: every stage copy polls words tagged
    with their step) against ``registers`` (the same slices, after the grid barrier): every
    output and gradient the same bits, over all the GPU's blocks and many steps (on cudasim, 8
    blocks and a few, the pollers woken as late as a GPU could). A word read before its step's
    value landed, or overwritten before a slow block read it, would show here."""
    dtype = DTYPES[dt][0]
    T, B, H = (4, 40, 100) if STANDIN else (200, 64, 512)
    if STANDIN is None:  # H100: 128 blocks in two batch groups, staged, no K parts (plan.py)
        info = cuda_ext.device_info(torch.cuda.current_device())
        plans = _mirror_plans(mode, dtype, False, B, H, info)
        if not all(pl["stage_k"] > 0 and pl["parts"] == 1 for pl in plans):
            pytest.skip(f"this GPU's plans for B={B}, H={H} cannot take the tagged exchange: "
                        f"{plans}")
    leaves, lens, cots = _inputs(mode, T, B, 24, H, dtype, 2, True)
    runs = []
    for setting in ("registers", "tagged"):
        monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_COPY", setting)
        before = len(cuda_ext.launches) if STANDIN == "sim" else 0
        runs.append(_run(cuda_backend.rnn_layer, mode, leaves, dtype, lens, True, cots))
        if STANDIN == "sim":  # the tagged kernels ran, forward and backward (no fallback)
            want = 3 if setting == "tagged" else 0
            assert [pl["stage_copy"] for *_, pl in cuda_ext.launches[before:]] == [want] * 2
    for i, (u, v) in enumerate(zip(*runs, strict=True)):
        assert torch.equal(u, v), f"tensor {i} differs between the tagged and barrier exchanges"


@pytest.mark.no_nan_fill
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    leaves, lens, _ = _inputs(mode, 4, 3, 5, 24, torch.float32, 2, True)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = [
        None if t is None else t.to(DEVICE, torch.float32).requires_grad_() for t in leaves
    ]
    args = (mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lens.to(DEVICE), False, True, False)
    torch.library.opcheck(torch.ops.fused_rnn.cuda_layer.default, args)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a transposed layout (a batch_first input's view, say), not contiguous."""
    if t.dim() < 2:
        return t
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.no_nan_fill
@pytest.mark.parametrize("T", [4, 0])
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_strided_inputs_and_backward(mode, T):
    """Both ops, fake against real, with every input in a transposed layout (a batch_first
    model's x is one): the gradients come back contiguous from both, which torch.compile
    checks (a fake that copied x's strides failed every compiled batch_first model)."""
    leaves, _lens, _ = _inputs(mode, max(T, 1), 3, 5, 24, torch.float32, 2, False)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = [
        None if t is None else _strided(t.to(DEVICE, torch.float32)) for t in leaves
    ]
    x = x[:T]
    assert (T == 0 or not x.is_contiguous()) and not h0.is_contiguous()
    args = (mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, True, False)
    torch.library.opcheck(torch.ops.fused_rnn.cuda_layer.default, args)
    y, h_n, _c_n, gates, aux = ops.cuda_layer(*args)
    g = torch.Generator().manual_seed(3)
    dy, dh_n, dc_n = (_strided(torch.randn(t.shape, generator=g).to(DEVICE))
                      for t in (y, h_n, h_n))
    bargs = (mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, False, y, gates, aux,
             dy, dh_n, dc_n if mode == "LSTM" else None)
    torch.library.opcheck(torch.ops.fused_rnn.cuda_layer_backward.default, bargs)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_nn_module_drop_in(monkeypatch, cell):
    """fused_rnn.<cell>(backend="cuda") vs torch.nn (cuDNN): 2 layers, bidirectional, packed."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    nn_cls, our_cls = getattr(torch.nn, cell), getattr(fused_rnn, cell)
    ref = nn_cls(6, 20, num_layers=2, bidirectional=True, batch_first=True).to(DEVICE)
    ours = our_cls(6, 20, num_layers=2, bidirectional=True, batch_first=True,
                   backend="cuda").to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 9, 6, device=DEVICE)
    lengths = torch.tensor([9, 3, 7, 1])
    # The CUDA backend takes every layer of this stack (fallback warnings are once-only, so
    # ask the backend directly rather than watching for one).
    for input_size in (6, 40):
        assert cuda_backend.unsupported_reason(
            "layer", mode="RNN_TANH" if cell == "RNN" else cell, device=torch.device(DEVICE),
            dtype=torch.float32, input_size=input_size, hidden_size=20, proj_size=0,
            has_lengths=True,
        ) is None
    outs = []
    for m in (ref, ours):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback (if not warned before)
            y, hid = m(packed)
        y, _ = pad_packed_sequence(y, batch_first=True)
        hs = list(hid) if isinstance(hid, tuple) else [hid]
        loss = y.square().sum() + sum(h.sum() for h in hs)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        outs.append([y.detach(), *[h.detach() for h in hs], *grads])
    for i, (a, b) in enumerate(zip(*outs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5,
                                   msg=lambda s, i=i: f"tensor {i}: {s}")


@pytest.mark.parametrize("path", ["persistent", "step"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN", "LSTMCell"])
def test_inference_mode_gives_no_grads_outputs_then_trains(monkeypatch, cell, path):
    """Under ``torch.inference_mode`` the modules run the kernels with nothing saved, as under
    ``no_grad``: the same bits, as inference tensors; the module then trains as torch.nn does."""
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", path)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    nn_cls, our_cls = getattr(torch.nn, cell), getattr(fused_rnn, cell)
    kw = {} if cell.endswith("Cell") else {"num_layers": 2}
    ref = nn_cls(5, 12, **kw).to(DEVICE)
    ours = our_cls(5, 12, **kw, backend="cuda").to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn((3, 5) if cell.endswith("Cell") else (4, 3, 5), device=DEVICE)

    def outputs(out):
        return [out] if isinstance(out, torch.Tensor) else [
            t for o in out for t in (o if isinstance(o, tuple) else (o,))]

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback (if not warned before)
        with torch.no_grad():
            plain = outputs(ours(x))
        with torch.inference_mode():
            got = outputs(ours(x))
    assert all(t.is_inference() for t in got)
    for a, b in zip(got, plain, strict=True):
        assert torch.equal(a, b)
    grads = []
    for m in (ours, ref):
        sum(t.square().sum() for t in outputs(m(x))).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        x_inference = x.clone()
    for m in (ours, ref):  # fed to a module that trains: PyTorch's own error, as torch.nn
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            m(x_inference)


@pytest.mark.parametrize("path", ["persistent", "step"])
@pytest.mark.parametrize("cell,case,proj,packed", non_finite_params(proj=False))
def test_non_finite_values_go_where_torch_nn_puts_them(cell, case, proj, packed, path,
                                                       monkeypatch):
    """relu(NaN) was 0 (fmaxf) and its gradient 0, where torch gives NaN and passes the
    gradient; a packed row's inf state put 0 * inf = NaN into dW_hh through its padding steps;
    an inf in W_hh times the zero dgates of backward's first iteration, or of a padding step,
    made NaN that torch.nn, which computes neither, does not have."""
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", path)
    check_non_finite_like_torch_nn(cell, "cuda", DEVICE, case, proj, packed)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_functional_layers_never_read_x_past_the_lengths(mode):
    """inf or NaN in x's padding reached dW_ih as 0 * NaN through the time-parallel GEMM."""
    check_padding_is_ignored("cuda", DEVICE, mode)


@pytest.mark.parametrize("path", ["persistent", "step"])
def test_an_inf_recurrent_weight_reaches_no_padding_step(path, monkeypatch):
    """A short packed row's padding steps sent zero dgates back through W_hh: with an inf
    there, 0 * inf = NaN reached the row's real step (dx, dc0), where torch.nn, which skips
    those steps, is finite. (The step path's GEMM sees the same zeros.) fp32 without TF32: on a
    GPU the input projection and dx would otherwise run on TF32, beyond these tolerances."""
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", path)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    ref, ours = torch.nn.LSTM(3, 5), fused_rnn.LSTM(3, 5, backend="cuda")
    with torch.no_grad():
        ref.weight_hh_l0[1, 0] = float("inf")
    ours.load_state_dict(ref.state_dict())
    x, h0, c0 = torch.randn(3, 2, 3), torch.randn(1, 2, 5) * 0.5, torch.randn(1, 2, 5) * 0.5
    grads = []
    for m in (ref, ours.to(DEVICE)):
        d = "cpu" if m is ref else DEVICE
        xs, hs, cs = (t.to(d).requires_grad_() for t in (x, h0, c0))
        y, (h, c) = m(pack_padded_sequence(xs, torch.tensor([3, 1])), (hs, cs))
        (y.data.sum() + h.sum() + c.sum()).backward()
        grads.append([xs.grad[0, 1].cpu(), cs.grad[0, 1].cpu()])  # row 1's one real step
    for a, e in zip(*reversed(grads), strict=True):
        assert torch.isfinite(e).all()
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


# H=44 splits K unevenly over a team of two in both directions: forward K = 44 (padded to 48)
# in ranks of 32 and 16 columns, backward K = G*H (48, 144 or 176) alike.
UNEVEN_PARTS = {**UNGROUPED, "FUSED_RNN_CUDA_K_PARTS": "2", "FUSED_RNN_CUDA_MAX_BLOCKS": "8"}


@pytest.mark.parametrize("where", ["h0", "dy"])
@pytest.mark.parametrize("mode", MODES)
def test_a_non_finite_row_stays_in_its_row_under_uneven_k_parts(cuda_ext, monkeypatch, mode,
                                                                 where):
    """Batch rows are independent: an inf in one row's h0 (read by the forward's first step) or
    in its output's gradient (the backward's dgates) leaves every other row's outputs and
    gradients as the reference has them. The last rank of a K-parts team multiplies a shorter
    K range (block_state's klen); were it to take a whole part, its columns past the end of a
    row of the exchange buffer would be the next row's, times zero columns of W_hh, and
    0 * inf = NaN would reach a finite row. Finite values there add zeros, so no accuracy test
    can tell."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for k, v in UNEVEN_PARTS.items():
        monkeypatch.setenv(k, v)
    T, B, I, H = 3, 3, 4, 44
    leaves, _, cots = _inputs(mode, T, B, I, H, torch.float32, 0, False)
    if where == "h0":
        leaves[1][1, 0] = float("inf")
    else:
        cots[0][1, 1, 0] = float("inf")
    before = len(cuda_ext.launches) if STANDIN == "sim" else 0
    ours = _run(cuda_backend.rnn_layer, mode, leaves, torch.float32, None, False, cots)
    if STANDIN == "sim":
        plans = [pl for _, _, pl in cuda_ext.launches[before:]]
    else:
        info = cuda_ext.device_info(0 if STANDIN else torch.cuda.current_device())
        plans = _mirror_plans(mode, torch.float32, False, B, H, info, ("parts", "k_part", "k_pad"))
    assert len(plans) == 2 and all(
        pl["parts"] == 2 and 2 * pl["k_part"] > pl["k_pad"] for pl in plans), plans
    exact = _run(reference.rnn_layer, mode, leaves, torch.float64, None, False, cots)
    # The tensors with a batch dimension (y, h_n, c_n, dx, dh0, dc0) and where it is.
    n_out = 3 if mode == "LSTM" else 2
    batch_dims = [1] + [0] * (n_out - 1) + [1] + [0] * (n_out - 1)
    for i, dim in enumerate(batch_dims):
        for row in (0, 2):
            a, e = ours[i].select(dim, row), exact[i].select(dim, row).float()
            assert torch.isfinite(e).all(), (i, row)
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, i=i, row=row: f"tensor {i}, row {row}: {m}")


def test_projection_falls_back_with_a_reason():
    x = torch.randn(3, 2, 4, device=DEVICE)
    lstm = fused_rnn.LSTM(4, 8, proj_size=3, backend="cuda").to(DEVICE)
    with pytest.warns(RuntimeWarning, match="proj_size"):
        lstm(x)


@pytest.mark.skipif(STANDIN == "emulate", reason="the emulation is too slow at this size")
@pytest.mark.parametrize("is16", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_largest_supported_hidden_size_runs(cuda_ext, monkeypatch, mode, is16):
    """At the computed on-chip limit for this GPU the kernels launch (occupancy, shared memory)
    and are right; one more unit is refused with the shared-memory reason."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    sms, smem, *_ = cuda_ext.device_info(0 if STANDIN else torch.cuda.current_device())
    H = P.max_hidden(P.CELLS[mode], is16, True, sms, smem)
    dtype = torch.bfloat16 if is16 else torch.float32
    cfg = dict(mode=mode, device=torch.device("cuda"), dtype=dtype, input_size=8, proj_size=0,
               has_lengths=False)
    assert cuda_backend.unsupported_reason("layer", hidden_size=H, **cfg) is None
    why = cuda_backend.unsupported_reason("layer", hidden_size=H + 1, **cfg)
    assert why and "shared memory" in why
    leaves, lens, cots = _inputs(mode, 2, 2, 8, H, dtype, 3, False)
    ours = _run(cuda_backend.rnn_layer, mode, leaves, dtype, lens, False, cots)
    exact = _run(reference.rnn_layer, mode, leaves, torch.float64, lens, False, cots)
    for i, (a, e) in enumerate(zip(ours, exact)):
        assert _rel(a, e) <= (5e-2 if is16 else 2e-2), (i, _rel(a, e))


@pytest.mark.skipif(STANDIN == "emulate", reason="the emulation has no compiled plan")
@pytest.mark.parametrize("path", ["persistent", "step"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_h_n_holds_only_its_own_memory(cuda_ext, monkeypatch, mode, path):
    """h_n is a (B, H) tensor of its own. Where the batch filled the padded exchange buffer
    and H its padded width, the slice of that (2, B_pad, k_pad) buffer was already contiguous,
    and .contiguous() returned it: a state carried by a cell loop (or saved for backward at each
    step) kept twice its size alive."""
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", path)
    g = torch.Generator().manual_seed(0)
    G = 4 if mode == "LSTM" else 3
    for B, H in ((32, 16), (32, 32), (64, 16)):
        x = torch.randn(2, B, 4, generator=g).to(DEVICE)
        h0 = torch.zeros(B, H, device=DEVICE)
        c0 = torch.zeros(B, H, device=DEVICE) if mode == "LSTM" else None
        w_ih = (torch.randn(G * H, 4, generator=g) * 0.1).to(DEVICE)
        w_hh = (torch.randn(G * H, H, generator=g) * 0.1).to(DEVICE)
        _, h_n, c_n = cuda_backend.rnn_layer(mode, x, h0, c0, w_ih, w_hh)
        for name, t in (("h_n", h_n), ("c_n", c_n)):
            if t is not None:
                own, held = t.numel() * t.element_size(), t.untyped_storage().nbytes()
                assert held == own, f"B={B} H={H}: {name} holds {held} bytes for {own}"


def test_plan_matches_python_mirror(cuda_ext):
    for cell in range(4):
        for math in range(3):
            for h in (1, 37, 256, 1000, 1024):
                for bw in (False, True):
                    for groups, rows, stage_k, parts in ((1, 0, 0, 1), (2, 32, 64, 2),
                                                         (4, 64, 1024, 4)):
                        got = tuple(cuda_ext.plan_info(cell, math, h, bw, 132, groups, rows,
                                                       stage_k, parts))
                        want = P.make_plan(cell, math, h, bw, 132, groups, rows, stage_k, parts)
                        assert got == want.as_tuple()


# (environment, H). Team clusters at H=64: 32 blocks of 2 units on an H100, 8 teams of 4, few
# enough clusters that any sm_90 part holds them all at once (128 blocks in clusters of 8 may
# not fit: clusters must sit within one GPC, and then the launch falls back to the plain grid).
CLUSTER_SETTINGS = {"groups8": ({"FUSED_RNN_CUDA_CLUSTER": "8"}, 256),
                    "groups16": ({"FUSED_RNN_CUDA_CLUSTER": "16"}, 256),
                    "groups16-dsmem": ({"FUSED_RNN_CUDA_CLUSTER": "16",
                                        "FUSED_RNN_CUDA_CLUSTER_EXCHANGE": "dsmem"}, 256),
                    "teams4": ({"FUSED_RNN_CUDA_K_PARTS": "4",
                                "FUSED_RNN_CUDA_TEAM_CLUSTERS": "on"}, 64)}


@pytest.mark.skipif(STANDIN == "emulate", reason="the emulation has no clusters")
@pytest.mark.parametrize("setting", list(CLUSTER_SETTINGS))
def test_cluster_mode_launches_clusters(cuda_ext, monkeypatch, setting):
    """LSTM bf16 at B=16 runs forward and backward with clusters, not the cooperative fallback,
    and agrees with the grid plan and the reference: at H=256 (S5's width) as one cluster of 8
    (portable) or 16 (non-portable, H100) blocks, the latter also exchanging through
    distributed shared memory, at H=64 with K-parts teams of 4 as clusters of the cooperative
    grid."""
    if STANDIN is None and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip(f"thread-block clusters need sm_90, this GPU is "
                    f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
    mode, dtype = "LSTM", torch.bfloat16
    env, H = CLUSTER_SETTINGS[setting]
    leaves, lens, cots = _inputs(mode, 8, 16, 32, H, dtype, 0, False)
    monkeypatch.delenv("FUSED_RNN_CUDA_CLUSTER", raising=False)
    grid = _run(cuda_backend.rnn_layer, mode, leaves, dtype, lens, False, cots)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = cuda_ext.cluster_launches()
    ours = _run(cuda_backend.rnn_layer, mode, leaves, dtype, lens, False, cots)
    assert cuda_ext.cluster_launches() - before == 2, "forward and backward should be clusters"
    exact = _run(reference.rnn_layer, mode, leaves, torch.float64, lens, False, cots)
    same = _run(reference.rnn_layer, mode, leaves, dtype, lens, False, cots)
    for i, (a, g, s, e) in enumerate(zip(ours, grid, same, exact, strict=True)):
        floor = DTYPES["bf16"][2] if i < 3 else DTYPES["bf16"][3]
        assert _rel(a, e) <= max(2 * _rel(s, e), floor), (i, _rel(a, e), _rel(s, e))
        torch.testing.assert_close(a, g, rtol=2e-2, atol=2e-2, msg=lambda m, i=i: f"{i}: {m}")


@gpu_only
def test_side_stream_and_second_device_guard():
    leaves, lens, cots = _inputs("LSTM", 5, 4, 6, 32, torch.float32, 4, True)
    base = _run(cuda_backend.rnn_layer, "LSTM", leaves, torch.float32, lens, False, cots)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        side = _run(cuda_backend.rnn_layer, "LSTM", leaves, torch.float32, lens, False, cots)
    s.synchronize()
    for a, b in zip(base, side):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def binding_refusals():
    """Every case of ``binding_refusals.BAD_BINDING_ARGS``, run in child processes (against
    the host build of binding.cpp on cudasim's "binding" stand-ins)."""
    from binding_refusals import run_cases

    return run_cases(host=(SIM_BUILDS[SIM][0] or "plain") if HOST_BINDING else "")


@pytest.mark.skipif(STANDIN is not None and not HOST_BINDING,
                    reason=f"needs a GPU or binding.cpp itself (stand-in: {STANDIN}, the "
                           "binding's mirror: FUSED_RNN_CUDA_SIM=binding runs it)")
@pytest.mark.timeout(600)  # the first case runs them all (and cuda-gdb, after a crash)
@pytest.mark.parametrize("case", range(len(BAD_BINDING_ARGS)), ids=BINDING_CASE_IDS)
def test_binding_refuses_what_its_kernels_cannot_take(binding_refusals, case):
    """``csrc/binding.cpp`` hands raw pointers to the kernels, so each wrong shape, dtype,
    layout, device or missing tensor must stop there with a message naming it, never a crash.
    ``ops.py`` never sends such a call, so only a direct call tests these checks; the valid
    call runs first, so each refusal is the bad argument's. In child processes
    (``binding_refusals.py``): a crash costs its case, with a native backtrace, not the run."""
    says = BAD_BINDING_ARGS[case][-1]
    got = binding_refusals[case]
    assert "died" not in got, (
        f"the call crashed instead of raising ({got['died']}):\n{got.get('backtrace', '')}\n"
        f"stderr:\n{got['stderr']}")
    assert "valid_failed" not in got, f"the valid call failed: {got['valid_failed']}"
    assert not got.get("returned"), "the bad call returned instead of raising"
    assert got["raised"] == "RuntimeError" and says in got["message"], got


@gpu_only
@pytest.mark.no_nan_fill
@pytest.mark.parametrize("path", ops.PATHS)
def test_cuda_graph_capture_and_replay(monkeypatch, path):
    """Forward and backward captured in one CUDA graph (cooperative launches are capturable, and
    so are the per-step path's GEMMs and launches) and replayed on new inputs give the eager
    results bit for bit."""
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", path)
    mode = "GRU"
    leaves, lens, cots = _inputs(mode, 5, 6, 7, 40, torch.bfloat16, 7, True)
    ls = [None if t is None else t.to(DEVICE, torch.bfloat16) for t in leaves]
    x, h0, _, w_ih, w_hh, b_ih, b_hh = ls
    w_ih, w_hh = w_ih.requires_grad_(), w_hh.requires_grad_()
    lens = lens.to(DEVICE)
    gy = cots[0].to(DEVICE, torch.bfloat16)
    static_x, static_h0 = x.clone(), h0.clone()

    def step():
        y, h, _ = cuda_backend.rnn_layer(mode, static_x, static_h0, None, w_ih, w_hh, b_ih,
                                         b_hh, None, lens, False)
        return (y, h, *torch.autograd.grad(y, (w_ih, w_hh), gy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, extension load)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    new_x, new_h0 = torch.randn_like(x), torch.randn_like(h0)
    static_x.copy_(new_x)
    static_h0.copy_(new_h0)
    graph.replay()
    torch.cuda.synchronize()
    static_x.copy_(new_x)
    eager = step()
    for i, (a, b) in enumerate(zip(static_out, eager)):
        assert torch.equal(a, b), f"output {i} differs between graph replay and eager"


def test_autocast_runs_in_the_autocast_dtype():
    leaves, _, _ = _inputs("GRU", 4, 3, 5, 24, torch.float32, 5, False)
    x, h0, _, w_ih, w_hh, b_ih, b_hh = [t.to(DEVICE) if t is not None else None for t in leaves]
    x, h0, w_ih, w_hh, b_ih, b_hh = (t.float() for t in (x, h0, w_ih, w_hh, b_ih, b_hh))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, _h, _ = functional.rnn_layer("GRU", x, h0, None, w_ih, w_hh, b_ih, b_hh,
                                       backend="cuda")
        # the op itself casts too (its autocast rule), whatever dtype the region asks for
        y2, *_ = ops.cuda_layer("GRU", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, False,
                                False, False)
    ry, _, _ = reference.rnn_layer("GRU", *(t.bfloat16() for t in (x, h0)), None,
                                   *(t.bfloat16() for t in (w_ih, w_hh, b_ih, b_hh)))
    assert y.dtype == torch.bfloat16 and y2.dtype == torch.bfloat16
    assert _rel(y, ry) < 2e-2 and torch.equal(y, y2)


@pytest.mark.no_nan_fill
def test_torch_compile_fullgraph(cuda_ext):
    leaves, _, _ = _inputs("LSTM", 4, 3, 5, 16, torch.float32, 6, False)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = [t.to(DEVICE, torch.float32) for t in leaves]

    def f(x, h0, c0):
        y, h, c = cuda_backend.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh, b_ih, b_hh)
        return y.sum() + h.sum() + c.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, h0, c0), f(x, h0, c0), rtol=1e-5, atol=1e-5)
    if STANDIN:  # the stand-in really ran (the kernels take fp32/fp16/bf16, not float64)
        assert [d for d, *_ in cuda_ext.launches] == ["forward"] * 2



@pytest.mark.no_nan_fill  # dynamo would trace the conftest's torch.empty wrapper
def test_compiled_batch_first_model_matches_eager(cuda_ext):
    """Embedding -> LSTM(batch_first) -> Linear, compiled with Inductor: the layer's input is a
    transposed view that needs its gradient, the case where the fake and real backward must
    agree on strides (Inductor asserts them)."""
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(11, 6), torch.nn.Linear(8, 11)
    rnn = fused_rnn.LSTM(6, 8, batch_first=True, backend="cuda")
    model = torch.nn.ModuleList([emb, rnn, head]).to(DEVICE)
    tokens = torch.randint(0, 11, (3, 5), device=DEVICE)
    state = (torch.randn(1, 3, 8, device=DEVICE), torch.randn(1, 3, 8, device=DEVICE))

    def forward(tokens, state):
        y, state = rnn(emb(tokens), state)
        return head(y), state

    def run(fn):
        model.zero_grad()
        logits, (h, c) = fn(tokens, state)
        (logits.sin().sum() + h.square().sum() + c.cos().sum()).backward()
        return [logits.detach(), h.detach(), c.detach()] + [p.grad.clone() for p in model.parameters()]

    before = len(cuda_ext.launches) if STANDIN else 0
    torch._dynamo.reset()
    compiled = run(torch.compile(forward, fullgraph=True))
    for a, b in zip(compiled, run(forward), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if STANDIN:  # both runs went through the kernels, forward and backward
        assert [d for d, *_ in cuda_ext.launches[before:]] == ["forward", "backward"] * 2


# ---------------------------------------------------------------- around the layers: training
# The shared bodies are in tests/training_checks.py. On the CPU stand-in one cell each (a
# compile or a simulated launch is slow there); on a GPU both.
TRAIN_CELLS = ["LSTM"] if STANDIN else ["LSTM", "GRU"]


@pytest.fixture
def _fp32_exact():
    """TF32 off for cuDNN and cuBLAS (saved and restored by hand: the cuBLAS flag is a
    property of a module object, which monkeypatch cannot undo)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _ran_the_kernels(ext, before: int) -> None:
    """On the stand-in: the layers ran our kernels (no fallback), forward and backward."""
    if STANDIN:
        kinds = {d for d, *_ in ext.launches[before:]}
        assert kinds == {"forward", "backward"}, f"stand-in launches: {sorted(kinds)}"


@pytest.mark.parametrize("cell", TRAIN_CELLS)
def test_ddp_training_matches_one_process(cell, tmp_path, cuda_ext, _fp32_exact):
    before = len(getattr(cuda_ext, "launches", ()))
    training_checks.check_ddp_matches_one_process(cell, "cuda", DEVICE, tmp_path)
    _ran_the_kernels(cuda_ext, before)


@pytest.mark.parametrize("cell", TRAIN_CELLS)
def test_amp_training_tracks_torch_nn(cell, cuda_ext, _fp32_exact):
    before = len(getattr(cuda_ext, "launches", ()))
    training_checks.check_amp_tracks_torch_nn(cell, "cuda", DEVICE)
    _ran_the_kernels(cuda_ext, before)


@pytest.mark.no_nan_fill
@pytest.mark.parametrize("cell", TRAIN_CELLS)
def test_compiled_training_matches_eager(cell, cuda_ext, _fp32_exact):
    """On a GPU with mode="reduce-overhead": the compiled model's CUDA graphs replay the
    kernels."""
    torch._dynamo.reset()
    before = len(getattr(cuda_ext, "launches", ()))
    training_checks.check_compiled_training_matches_eager(cell, "cuda", DEVICE)
    _ran_the_kernels(cuda_ext, before)


@pytest.mark.no_nan_fill
@pytest.mark.parametrize("cell", TRAIN_CELLS)
def test_compiled_ddp_training_matches_eager(cell, tmp_path, cuda_ext, _fp32_exact):
    """torch.compile of the DDP-wrapped model: the ops stay opaque nodes between the graph
    pieces dynamo's DDP optimizer cuts at the gradient buckets. After the CUDA-graph test, so
    that on a GPU, where gpu_check's slow-tests step has a fixed time, it takes what is left."""
    torch._dynamo.reset()
    before = len(getattr(cuda_ext, "launches", ()))
    training_checks.check_ddp_matches_one_process(cell, "cuda", DEVICE, tmp_path, compiled=True)
    _ran_the_kernels(cuda_ext, before)
    torch._dynamo.reset()
