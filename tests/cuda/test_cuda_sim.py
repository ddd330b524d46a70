"""The CUDA kernels of ``csrc/`` executed on the CPU by cudasim (``simulate.py``, ``sim/``): the
checks a GPU run would make with compute-sanitizer, made here without one.

* racecheck: every output bit for bit the same whichever thread runs first between barriers
  (ascending, descending, shuffled);
* racecheck by happens-before: the kernels under ThreadSanitizer (``tsan_run.py``), which names
  two unordered accesses even where no result shows them;
* memcheck: a part of ``test_cuda_gpu.py`` in a process built with AddressSanitizer and UBSan,
  so an out-of-bounds access to a tensor or to shared memory, or a misaligned vector load,
  aborts it;
* batch groups and X staging (plan.h) change the partition, not the results;
* the launch path of ``rnn_common.cuh`` (opt-in shared memory, co-residency check) meets a
  device that refuses;
* mutation tests: copies of ``csrc/`` with one deliberate bug each (a missing barrier, a
  single-buffered exchange, a skipped grid sync, a padding row written, a thread leaving
  early, a misaligned WMMA stride) must each be caught, so a clean run above means something.

``test_cuda_gpu.py`` itself runs on cudasim by default on a machine without a GPU (its
accuracy tests against the reference).
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import host_binding
import pytest
import torch
from cases import blockings, install_standin, layer_inputs, rel, run_layer
from emulate import Emulator
from helpers import record_gemm_precision

import fused_rnn.ops.cuda as cuda_backend
from fused_rnn.ops import common, reference
from fused_rnn.ops.cuda import ops, profile
from fused_rnn.ops.cuda import plan as P
from fused_rnn.ops.reference import MODES

simulate = pytest.importorskip("simulate")
if simulate.unavailable_reason():
    pytest.skip(simulate.unavailable_reason(), allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture
def install(monkeypatch):
    """Returns a function that makes a Simulator and installs it as the extension. Mutant
    copies (csrc=) have their kernels compiled quick (-O0, simulate.build), unless the test asks
    otherwise, and their libraries' stacks are released after the test
    (Simulator.release_stacks): a worker loads dozens of them."""
    mutants = []

    def make(**kwargs):
        if "csrc" in kwargs:
            kwargs.setdefault("quick", True)
        sim = simulate.Simulator(**kwargs)
        if "csrc" in kwargs:
            mutants.append(sim)
        return install_standin(monkeypatch, sim)

    yield make
    for sim in mutants:
        sim.release_stacks()


DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True),
          "bf16": (torch.bfloat16, False), "fp16": (torch.float16, False)}


def _layer(mode, dt, T=4, B=3, I=5, H=37, lengths=True, reverse=True, seed=0):
    """Outputs and every gradient of one layer on the installed extension."""
    dtype, tf32 = DTYPES[dt]
    leaves, lens, cots = layer_inputs(mode, T, B, I, H, seed, lengths)
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        return run_layer(cuda_backend.rnn_layer, mode, leaves, dtype, lens, reverse, cots, "cpu")
    finally:
        torch.backends.cudnn.allow_tf32 = prev


# How far two partitions of the same launch may differ: only the order of the fp32 K sums does.
SUM_ORDER_TOL = {"tf32": 2e-3, "bf16": 2e-2, "fp32": 1e-5}


def _assert_same_up_to_sum_order(base, other, dt, label):
    tol = SUM_ORDER_TOL[dt]
    for i, (a, b) in enumerate(zip(base, other, strict=True)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol,
                                   msg=lambda m, i=i: f"{label}, tensor {i}: {m}")

# ---------------------------------------------------------------------------------- racecheck
# (FUSED_RNN_CUDA_MAX_GROUPS, FUSED_RNN_CUDA_STAGE_K, FUSED_RNN_CUDA_K_PARTS, H)
# slices16: one stage buffer, several slices; slices32: the pipelined copy's two 16-column buffers;
# parts2: teams of two blocks split K (H=60: 4 blocks of 16 units for every cell and math), with
# one stage buffer or pipelined.
PARTITIONS = {"ungrouped-direct": ("1", "0", "1", 37), "grouped-staged": ("8", "auto", "1", 37),
              "ungrouped-slices16": ("1", "16", "1", 37),
              "ungrouped-slices32": ("1", "32", "1", 37),
              "ungrouped-parts2-slices16": ("1", "16", "2", 60),
              "ungrouped-parts2-slices32": ("1", "32", "2", 60)}


@pytest.mark.parametrize("partition", list(PARTITIONS))
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
def test_results_do_not_depend_on_thread_order(install, monkeypatch, mode, dt, partition):
    """A race (a thread reading what another writes between the same two barriers) makes the
    result depend on which runs first; four orders must agree bit for bit, with cp.async copies
    landing as late and as early as the hardware allows. B=70: ungrouped,
    two batch chunks per block; grouped, three batch groups of one chunk; X read directly,
    staged whole, or staged 16 columns at a time; K split over two blocks. H=37 over 4 SMs
    gives a ragged last block."""
    groups, stage_k, parts, H = PARTITIONS[partition]
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", groups)
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", stage_k)
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", parts)
    runs = []
    for order, seed, cp_async in (("ascending", 0, "late"), ("descending", 0, "early"),
                                  ("shuffle", 1, "late"), ("shuffle", 2, "early")):
        sim = install(sms=4, order=order, seed=seed, cp_async=cp_async)
        runs.append(_layer(mode, dt, B=70, T=3, H=H))
        assert {pl["parts"] for _, _, pl in sim.launches} == {int(parts)}
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            assert torch.equal(a, b), f"tensor {i} depends on the thread order"



@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
def test_kernels_round_where_their_emulation_does(install, monkeypatch, mode, dt):
    """The kernels against ``emulate.py``, which re-derives their arithmetic in torch: the same
    rounding points (W and X to TF32 by round-to-nearest, dh to the storage dtype before the
    recurrent matmul, LSTM c kept in fp32, GRU dgr[n] = dn * r unrounded). The accuracy tests
    hold each dtype to its floor against fp64, which leaves those points free: an extra or
    missing rounding moves results by 5e-4 to 4e-3 here, inside every floor. The clean kernels
    differ from the emulation by up to about 4e-5 in 16 bits (a storage ulp now and then: the
    simulated kernels run glibc's expf/tanhf, the emulation torch's activations), and by about
    2e-7 in fp32."""
    install(sms=4)
    runs = [_layer(mode, dt, T=5, I=7)]
    install_standin(monkeypatch, Emulator(sms=4))
    runs.append(_layer(mode, dt, T=5, I=7))
    for i, (sim, emu) in enumerate(zip(*runs, strict=True)):
        assert rel(sim, emu) <= 1e-4, f"tensor {i}: {rel(sim, emu):.2e} from the emulation"


# K parts change only the order of the fp32 K sums, which the emulation does not model (it
# sums K in one block): measured at H=60 on 4 SMs, teams of 2 and 4, every cell, the kernels
# are within 3e-7 of it in fp32, 2e-5 in TF32, 9.2e-4 in 16 bits (storage ulps the new order
# flips, LSTM bf16 with teams of 4); a partial sum 1% off moves results by ~1e-2.
PARTS_EMULATION_TOL = {"fp32": 1e-5, "tf32": 1e-4, "bf16": 3e-3, "fp16": 3e-3}


@pytest.mark.parametrize("parts", ["2", "4"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
def test_k_parts_round_where_their_emulation_does(install, monkeypatch, mode, dt, parts):
    """The test above with K split over teams of 2 or 4 blocks (the partial sums added in rank
    order after the parts' barrier): held to the sum-order tolerance above, not 1e-4 (the
    accuracy tests' bf16 floors let a 1% error in the partial sums through)."""
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", parts)
    sim = install(sms=4)
    runs = [_layer(mode, dt, T=5, I=7, H=60)]
    assert {pl["parts"] for _, _, pl in sim.launches} == {int(parts)}
    install_standin(monkeypatch, Emulator(sms=4))
    runs.append(_layer(mode, dt, T=5, I=7, H=60))
    tol = PARTS_EMULATION_TOL[dt]
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        assert rel(a, b) <= tol, f"tensor {i}: {rel(a, b):.2e} from the emulation"


def _defines_symbol(lib_path, name: str) -> bool:
    nm = subprocess.run(["nm", str(lib_path)], capture_output=True, text=True, check=True)
    return any(line.split()[-1] == name for line in nm.stdout.splitlines() if line.strip())


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("nm"),
                    reason="the hand-written fiber switch is x86-64 only; nm reads the library")
@pytest.mark.parametrize("order,seed", [("descending", 0), ("shuffle", 5)])
def test_both_fiber_switches_give_the_same_bits(install, order, seed):
    """runtime.cpp switches fibers with a few instructions on x86-64 and with swapcontext
    elsewhere (CUDASIM_UCONTEXT here): the two runtimes give the same bits. The first library
    must really hold the hand-written switch, and the second not."""
    assert _defines_symbol(simulate.build(), "cudasim_switch")
    assert not _defines_symbol(simulate.build(ucontext=True), "cudasim_switch")
    runs = []
    for ucontext in (False, True):
        install(sms=4, order=order, seed=seed, ucontext=ucontext)
        runs.append(_layer("LSTM", "bf16", B=70, T=3))
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        assert torch.equal(a, b), f"tensor {i} differs between the fiber switches"


# ---------------------------------------------------------------------------------- memcheck
@pytest.mark.slow
def test_gpu_suite_under_address_sanitizer(tmp_path):
    """test_cuda_gpu.py's small cases in a process with ASan/UBSan loaded and the kernels and
    binding.cpp (its host build, host_binding.py, where it builds here) built with them: clean,
    and the sanitizer is really armed (a canary must trip it, and the binding's module must
    call ASan's checks)."""
    simulate.build(sanitize="address")
    mode = "asan"
    if host_binding.unavailable_reason() is None:
        mode = "binding-asan"
        module = host_binding.build(sanitize="address")
        assert shutil.which("nm"), "nm (binutils) reads the binding's module"
        nm = subprocess.run(["nm", "-D", "--undefined-only", str(module)], capture_output=True,
                            text=True, check=True).stdout
        assert "__asan_report_load8" in nm and "__ubsan_handle" in nm, nm[-2000:]
    else:
        print(f"the host binding cannot build ({host_binding.unavailable_reason()}): "
              "ASan runs the kernels behind the binding's mirror")
    env = {**simulate.sanitizer_env("address"), "FUSED_RNN_CUDA_SIM": mode}
    canary = subprocess.run(
        [sys.executable, "-c",
         ("import ctypes, simulate; simulate.Simulator(sanitize='address');"
          "b = ctypes.create_string_buffer(8); import torch; t = torch.empty(3);"
          "ctypes.memmove(ctypes.c_void_p(t.data_ptr()), b, 16)")],
        cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert canary.returncode != 0 and "AddressSanitizer" in canary.stderr, canary.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(Path(__file__).parent / "test_cuda_gpu.py"),
         # Left out, as they touch exactly the memory of a case that runs: RNN_RELU (RNN_TANH
         # but for the activation); fp16 (bf16's plans, element size and buffers; only the
         # conversions differ); the K-parts teams as clusters (the parts4 plan with another
         # barrier, which the TSan tests cover); of the mma shapes, the 2 x 2 blocks (the
         # single tiles' rows, a tile at a time).
         "-k", ("((T5-B3 or T1-B1 or T7-B70) and (lengths-rev or dense-fwd) or largest)"
                " and not (dsmem and dense-fwd) and not RNN_RELU and not blocks2-mma"
                " and not fp16 and not teamclusters4")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "failed" not in r.stdout, tail


# ---------------------------------------------------------------------- what a device refuses
def test_cooperative_grid_that_cannot_be_co_resident_is_refused(install):
    """launch_cooperative (rnn_common.cuh) asks the occupancy API first: on a device where only
    one of the blocks fits per SM and there are fewer SMs' worth of room, it returns
    cudaErrorCooperativeLaunchTooLarge rather than deadlocking on grid.sync()."""
    sim = install(sms=4)
    plan = sim.plan(0, torch.bfloat16, False, 37, False)
    assert plan["blocks"] == 4
    install(sms=4, smem_per_sm=plan["smem_bytes"])  # room for less than one block per SM
    with pytest.raises(RuntimeError, match="cudaErrorCooperativeLaunchTooLarge"):
        _layer("LSTM", "bf16")


@pytest.mark.parametrize("clusters", [False, True], ids=["grid", "clusters"])
def test_an_error_left_pending_by_someone_else_is_not_reported_as_ours(install, monkeypatch,
                                                                       clusters):
    """The launch API returns a launch's own errors. An error that an earlier runtime call of
    another library left pending in cudaGetLastError (cudaErrorInvalidValue here) is not read
    back after our good launches, which would fail them (and clear the other's error)."""
    B, H = 3, 37
    if clusters:
        env, B, H = NO_SM90_CASES["groups"]
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    sim = install(sms=8)
    before = sim.cluster_launches()
    sim.lib.sim_set_cuda_error(1)  # cudaErrorInvalidValue
    outs = _layer("LSTM", "bf16", B=B, T=3, H=H)
    assert all(torch.isfinite(t).all() for t in outs)
    assert [d for d, *_ in sim.launches] == ["forward", "backward"]
    assert sim.cluster_launches() - before == (2 if clusters else 0)


def test_shared_memory_beyond_the_opt_in_limit_is_refused(install):
    sim = install(sms=4)
    # without staging, which only takes what is left over
    need = sim.plan(1, torch.float32, False, 37, False, max_stage_k=0)["smem_bytes"]
    sim = install(sms=4, smem_optin=need - 16)
    with pytest.raises(RuntimeError, match="shared memory"):
        sim.plan(1, torch.float32, False, 37, False)


@pytest.mark.parametrize("T,B", [(2**31 - 1, 1), (1, 2**31 - 96)])
def test_a_chunk_the_kernels_cannot_count_is_refused(install, T, B):
    """The kernels count steps and batch rows in int32: a longer chunk or a wider batch is
    refused with the limits, before anything is allocated (zero-stride inputs here; on an
    H200 such a chunk fits in memory). One step or row fewer is taken. The backward's step
    counter reaches T, and a block's batch chunks advance 64 rows at a time up to the batch
    padded to 32, so the limits are INT_MAX - 1 steps and INT_MAX - 32 - 64 rows (at INT_MAX
    steps the backward's counter overflowed)."""
    install(sms=4)
    H = 8

    def inputs(T, B):
        x = torch.zeros(1, 1, 5).expand(T, B, 5)
        return x, torch.zeros(1, H).expand(B, H), torch.zeros(3 * H, 5), torch.zeros(3 * H, H)

    x, h0, w_ih, w_hh = inputs(T, B)
    with pytest.raises(RuntimeError, match=rf"at most {2**31 - 2} steps and {2**31 - 97} batch "
                                           rf"rows per launch, got T={T}, B={B}"):
        cuda_backend.rnn_layer("GRU", x, h0, None, w_ih, w_hh)
    ops.check_counts(min(T, ops.MAX_STEPS), min(B, ops.MAX_ROWS))  # the limits themselves pass


@pytest.mark.parametrize("rnn,conv,math", [("ieee", "tf32", "fma"), ("tf32", "ieee", "tf32")])
def test_fp32_math_follows_cudnn_rnn_precision(install, fp32_precision_restored, rnn, conv,
                                               math):
    """fp32 runs on TF32 tensor cores exactly where cuDNN's RNNs may use TF32, read from the
    per-operator setting (torch >= 2.9) even where conv differs and the legacy flag raises."""
    torch.backends.cudnn.conv.fp32_precision = conv
    common.cudnn_rnn_setting().fp32_precision = rnn
    sim = install(sms=4)
    g = torch.Generator().manual_seed(0)
    x, h0 = torch.randn(2, 3, 5, generator=g), torch.randn(3, 8, generator=g)
    w_ih, w_hh = torch.randn(24, 5, generator=g), torch.randn(24, 8, generator=g)
    cuda_backend.rnn_layer("GRU", x, h0, None, w_ih, w_hh)
    assert [pl["math"] for _, _, pl in sim.launches] == [P.MATHS[math]]


@pytest.mark.parametrize("dt,rnn,want", [("fp32", "ieee", "ieee"), ("fp32", "tf32", "tf32"),
                                          ("bf16", "ieee", "tf32"), ("fp16", "ieee", "tf32")])
def test_time_parallel_gemms_use_tf32_like_cudnn(install, monkeypatch, fp32_precision_restored,
                                                  dt, rnn, want):
    """The projection, dx, dW_ih and dW_hh GEMMs (cuBLAS through torch) run on TF32 where
    cuDNN's whole RNN would for fp32, and always for fp16/bf16 data (exact in TF32), whatever
    torch's matmul setting; the setting is left as it was. Strict fp32 GEMMs cost more than
    cuDNN's whole layer at 256x128x1024 (common.gemms_use_tf32)."""
    common.cudnn_rnn_setting().fp32_precision = rnn
    torch.backends.cuda.matmul.fp32_precision = "ieee" if want == "tf32" else "tf32"
    before = torch.backends.cuda.matmul.fp32_precision
    install(sms=4)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
    g = torch.Generator().manual_seed(0)
    x, h0, c0 = (torch.randn(s, generator=g).to(dtype).requires_grad_()
                 for s in ((3, 2, 5), (2, 8), (2, 8)))
    w_ih, w_hh = (torch.randn(s, generator=g).to(dtype).requires_grad_()
                  for s in ((32, 5), (32, 8)))
    seen = record_gemm_precision(monkeypatch)
    y, h_n, c_n = cuda_backend.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh)
    assert seen == [want], "the input projection"
    (y.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
    assert seen == [want] * 4, "the projection, then dx, dW_ih and dW_hh"
    assert torch.backends.cuda.matmul.fp32_precision == before


# ----------------------------------------------------------------------- the per-step path
# How far the per-step path may be from the persistent launch (elementwise): only the recurrent
# matmul's fp32 K sums differ in order, which flips a storage ulp now and then in 16 bits.
STEP_TOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-3}


@pytest.mark.parametrize("dt", list(STEP_TOL))
@pytest.mark.parametrize("mode", MODES)
def test_the_step_path_runs_the_persistent_kernels_cells(install, monkeypatch, mode, dt):
    """FUSED_RNN_CUDA_PATH=step (a GEMM, then a launch of the step's points, each step) against
    the persistent launch: the same cell code (ForwardPoint, BackwardPoint), so every output and
    gradient agrees up to the order of the matmul's sums; whichever thread runs first, the
    same bits; and the step loops ran, not the persistent kernels. B=70 with lengths, reversed.
    (TF32 is left out: cudasim's step GEMMs are torch's exact fp32 ones on the CPU; the test
    below checks that they would run as TF32 on a GPU.)"""
    install(sms=4)
    base = _layer(mode, dt, B=70, T=3)
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "step")
    runs = []
    for order, seed in (("ascending", 0), ("descending", 0), ("shuffle", 1)):
        sim = install(sms=4, order=order, seed=seed)
        runs.append(_layer(mode, dt, B=70, T=3))
        assert [d for d, _, _ in sim.launches] == ["forward_steps", "backward_steps"]
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other, strict=True)):
            assert torch.equal(a, b), f"tensor {i} depends on the thread order"
    tol = STEP_TOL[dt]
    for i, (a, b) in enumerate(zip(base, runs[0], strict=True)):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize("standin", ["mirror", "binding"])
@pytest.mark.parametrize("rnn", ["ieee", "tf32"])
def test_the_step_paths_gemms_follow_cudnn_rnn_precision(install, monkeypatch,
                                                         fp32_precision_restored, rnn, standin):
    """fp32 data: every step GEMM (forward and backward) runs on TF32 exactly where cuDNN's RNN
    may, whatever torch's matmul setting was, and that setting is left as it was. Behind the
    mirror (its GEMMs in Python) and behind binding.cpp itself (its at::mm_out calls, recorded
    by HostBinding as they dispatch)."""
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "step")
    common.cudnn_rnn_setting().fp32_precision = rnn
    torch.backends.cuda.matmul.fp32_precision = "ieee" if rnn == "tf32" else "tf32"
    before = torch.backends.cuda.matmul.fp32_precision
    if standin == "binding":
        host_binding = pytest.importorskip("host_binding")
        reason = host_binding.unavailable_reason()
        if reason:
            pytest.skip(f"the host build of binding.cpp: {reason}")
        sim = install_standin(monkeypatch, host_binding.HostBinding(sms=4))
    else:
        sim = install(sms=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, generator=g, requires_grad=True)
    h0 = torch.randn(2, 8, generator=g, requires_grad=True)
    w_ih = torch.randn(24, 5, generator=g, requires_grad=True)
    w_hh = torch.randn(24, 8, generator=g, requires_grad=True)
    y, h_n, _ = cuda_backend.rnn_layer("GRU", x, h0, None, w_ih, w_hh)
    (y.sum() + h_n.sum()).backward()
    assert sim.step_gemm_precisions == [rnn] * (3 + 3)  # T forward, T backward (not at s = 0)
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_the_step_path_takes_any_hidden_size_and_its_setting_is_checked(install, monkeypatch):
    """Nothing of the per-step path lives in shared memory, so a hidden size no persistent plan
    fits runs there (cudasim's device: 48 KB a block); a bad setting is refused by name."""
    install(sms=2, smem_optin=48 * 1024, smem_per_sm=48 * 1024)
    cfg = dict(mode="LSTM", device=torch.device("cuda", 0), dtype=torch.float32, input_size=4,
               hidden_size=200, proj_size=0, has_lengths=False)
    assert "shared memory" in (cuda_backend.unsupported_reason("layer", **cfg) or "")
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "step")
    assert cuda_backend.unsupported_reason("layer", **cfg) is None
    g = torch.Generator().manual_seed(0)
    x, h0, c0 = torch.randn(2, 3, 4, generator=g), torch.zeros(3, 200), torch.zeros(3, 200)
    w_ih, w_hh = torch.randn(800, 4, generator=g) * 0.1, torch.randn(800, 200, generator=g) * 0.05
    ours = cuda_backend.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh)
    ref = reference.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "steps")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_PATH must be one of auto, persistent, "
                                         "step, got 'steps'"):
        ops.cuda_path_setting()
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_PATH must be one of"):
        cuda_backend.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_either_paths_backward_takes_either_paths_forward(install, monkeypatch, mode):
    """Both paths save the same activations (gates, aux) in the same layout, so a backward on
    one path takes a forward run on the other (say, FUSED_RNN_CUDA_PATH changed in between):
    the gradients agree with one path's up to the order of the matmul's sums."""
    leaves, lens, cots = layer_inputs(mode, 3, 5, 4, 24, 0, True)

    def run(fwd, bwd):
        def layer(*args):
            monkeypatch.setenv("FUSED_RNN_CUDA_PATH", fwd)
            out = cuda_backend.rnn_layer(*args)
            monkeypatch.setenv("FUSED_RNN_CUDA_PATH", bwd)
            return out

        sim = install(sms=4)
        got = run_layer(layer, mode, leaves, torch.bfloat16, lens, True, cots, "cpu")
        return [d for d, _, _ in sim.launches], got

    launches, base = run("persistent", "persistent")
    assert launches == ["forward", "backward"]
    for fwd, bwd in (("step", "persistent"), ("persistent", "step")):
        launches, got = run(fwd, bwd)
        assert launches == [{"step": "forward_steps"}.get(fwd, "forward"),
                            {"step": "backward_steps"}.get(bwd, "backward")]
        for i, (a, b) in enumerate(zip(base, got, strict=True)):
            torch.testing.assert_close(b, a, rtol=STEP_TOL["bf16"], atol=STEP_TOL["bf16"],
                                       msg=lambda m, i=i, f=fwd, b=bwd: f"{f}/{b}, tensor {i}: {m}")


def test_path_rules_choose_the_per_step_path_where_they_match(install, monkeypatch):
    """FUSED_RNN_CUDA_PATH=auto (the default) runs a layer on the per-step path exactly where a
    PathRule matches its cell, compute dtype, batch, hidden size, chunk length (T = 2 here), the
    GPU's compute capability
    (cudasim's: 9.0) and, for fp32, the TF32 setting; forward and backward both; persistent
    elsewhere, and always under an explicit setting. The results are the same either way, up to
    the order of the matmul's sums (STEP_TOL)."""
    from fused_rnn.ops.cuda.ops import PathRule

    def paths(mode, dt, B, H=37, T=2):
        sim = install(sms=4)
        out = _layer(mode, dt, T=T, B=B, H=H)
        return [d for d, _, _ in sim.launches], out

    persistent = ["forward", "backward"]
    steps = ["forward_steps", "backward_steps"]
    assert ops.cuda_path_setting() == "auto" and ops.PATH_RULES == ()
    assert paths("LSTM", "bf16", 4)[0] == persistent  # no rule: the persistent kernel
    rule = dict(modes=frozenset({"LSTM"}), dtypes=frozenset({torch.bfloat16, torch.float32}),
                batch=(3, 5), hidden=(30, 40), capability=(9, 0), evidence="a test",
                steps=(2, 64))
    monkeypatch.setattr(ops, "PATH_RULES", (PathRule(**rule, tf32=True),))
    got, stepped = paths("LSTM", "bf16", 4)
    assert got == steps
    ran = {"bf16": stepped}
    for mode, dt, B, H in (("LSTM", "bf16", 6, 37), ("LSTM", "bf16", 2, 37),
                           ("LSTM", "bf16", 4, 41), ("GRU", "bf16", 4, 37),
                           ("LSTM", "fp16", 4, 37), ("LSTM", "fp32", 4, 37)):
        assert paths(mode, dt, B, H)[0] == persistent, (mode, dt, B, H)
    assert paths("LSTM", "bf16", 4, T=1)[0] == persistent  # a chunk shorter than measured
    assert paths("LSTM", "tf32", 4)[0] == steps  # fp32 while the recurrence may use TF32
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "persistent")
    got, ran["persistent"] = paths("LSTM", "bf16", 4)
    assert got == persistent
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", "step")
    assert paths("LSTM", "bf16", 6)[0] == steps
    for i, (a, b) in enumerate(zip(ran["persistent"], ran["bf16"], strict=True)):
        torch.testing.assert_close(b, a, rtol=STEP_TOL["bf16"], atol=STEP_TOL["bf16"],
                                   msg=lambda m, i=i: f"tensor {i}: {m}")
    monkeypatch.delenv("FUSED_RNN_CUDA_PATH")
    monkeypatch.setattr(ops, "PATH_RULES", (PathRule(**{**rule, "capability": (8, 0)}),))
    assert paths("LSTM", "bf16", 4)[0] == persistent  # measured on another kind of GPU
    with pytest.raises(ValueError, match="a PathRule needs its evidence"):
        PathRule(**{**rule, "evidence": ""})
    with pytest.raises(ValueError, match="a PathRule's batch range"):
        PathRule(**{**rule, "batch": (5, 3)})
    with pytest.raises(ValueError, match="a PathRule's steps range"):
        PathRule(**{**rule, "steps": (0, 3)})
    with pytest.raises(ValueError, match="a PathRule's tf32 setting"):
        PathRule(**{**rule, "dtypes": frozenset({torch.bfloat16})}, tf32=True)


@pytest.mark.parametrize("path", ["persistent", "step"])
def test_lengths_past_int32_are_the_whole_chunk(install, monkeypatch, path):
    """The kernels take lengths as int32; a length of 2**32 + 1 used to wrap to 1 in the cast.
    They are clamped to [0, T] first, which changes nothing else: a row is valid at step t
    where t < its length, so past T is the whole chunk and below 0 none of it."""
    monkeypatch.setenv("FUSED_RNN_CUDA_PATH", path)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32: the reference's math
    install(sms=4)
    g = torch.Generator().manual_seed(5)
    T, B, I, H = 3, 3, 4, 37
    x, h0 = torch.randn(T, B, I, generator=g), torch.randn(B, H, generator=g)
    w_ih, w_hh = torch.randn(3 * H, I, generator=g) * 0.3, torch.randn(3 * H, H, generator=g) * 0.3
    lengths = torch.tensor([2**32 + 1, 2, -(2**32) + 1])
    got = cuda_backend.rnn_layer("GRU", x, h0, None, w_ih, w_hh, lengths=lengths)
    want = reference.rnn_layer("GRU", x, h0, None, w_ih, w_hh, lengths=lengths)
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1][2], h0[2])  # a negative length: the row keeps its state


def test_a_one_step_path_rule_routes_cell_calls(install, monkeypatch):
    """A cell on the CUDA backend is a one-step layer call (ops/cuda rnn_cell), so a PathRule
    whose steps range is (1, 1), as auto_rules.py --paths gives from the one-step shapes G1-G3,
    sends cell calls, forward and backward, to the per-step path, and leaves chunks of two
    steps on the persistent kernel; a rule measured on chunks (steps from 2) leaves cells on
    it. The cell's outputs and gradients are the persistent launch's up to the order of the
    matmul's sums."""
    from fused_rnn.ops.cuda.ops import PathRule

    def cell(mode):
        sim = install(sms=4)
        g = torch.Generator().manual_seed(3)
        B, I, H = 3, 5, 37
        x, h, c = (torch.randn(B, n, generator=g).requires_grad_() for n in (I, H, H))
        rows = {"LSTM": 4, "GRU": 3}[mode] * H
        w_ih, w_hh = (torch.randn(rows, n, generator=g).mul_(0.3).requires_grad_()
                      for n in (I, H))
        b_ih, b_hh = (torch.randn(rows, generator=g).mul_(0.3).requires_grad_() for _ in "ih")
        leaves = (x, h, c, w_ih, w_hh, b_ih, b_hh) if mode == "LSTM" else (
            x, h, w_ih, w_hh, b_ih, b_hh)
        to = [t.detach().to(torch.bfloat16).requires_grad_() for t in leaves]
        args = (*to[:3], *to[3:]) if mode == "LSTM" else (*to[:2], None, *to[2:])
        h1, c1 = cuda_backend.rnn_cell(mode, *args)
        outs = (h1, c1) if mode == "LSTM" else (h1,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return [d for d, _, _ in sim.launches], [*outs, *(t.grad for t in to)]

    rule = dict(modes=frozenset({"LSTM", "GRU"}), dtypes=frozenset({torch.bfloat16}),
                batch=(1, 64), hidden=(16, 64), capability=(9, 0), evidence="a test")
    for mode in ("LSTM", "GRU"):
        monkeypatch.setattr(ops, "PATH_RULES", (PathRule(**rule, steps=(2, 128)),))
        launches, base = cell(mode)
        assert launches == ["forward", "backward"], mode  # measured on chunks: not for cells
        monkeypatch.setattr(ops, "PATH_RULES", (PathRule(**rule, steps=(1, 1)),))
        launches, got = cell(mode)
        assert launches == ["forward_steps", "backward_steps"], mode
        for i, (a, b) in enumerate(zip(base, got, strict=True)):
            torch.testing.assert_close(b, a, rtol=STEP_TOL["bf16"], atol=STEP_TOL["bf16"],
                                       msg=lambda m, i=i, mode=mode: f"{mode}, tensor {i}: {m}")
        sim = install(sms=4)
        _layer(mode, "bf16", T=2)
        assert [d for d, _, _ in sim.launches] == ["forward", "backward"]  # chunks: persistent


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="counts /proc/self/maps")
def test_released_stacks_are_unmapped_and_mapped_again(install):
    """Simulator.release_stacks gives the simulated threads' stacks back (two mappings each, 256
    threads a block of the largest launch); the next launch maps them again and gives the same
    bits."""
    sim = install(sms=4)
    first = _layer("GRU", "bf16", B=70, T=2)

    def maps() -> int:
        return len(Path("/proc/self/maps").read_text().splitlines())

    # (the library may hold more stacks than this launch's, from a larger launch before)
    threads = 256 * max(pl["blocks"] for _, _, pl in sim.launches)
    before = maps()
    sim.release_stacks()
    released = maps()
    assert before - released >= 2 * threads
    again = _layer("GRU", "bf16", B=70, T=2)
    assert maps() - released >= 2 * threads - 64  # mapped again (give or take malloc's own)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- mutations
def _mutant(tmp_path: Path, file: str, old: str, new: str) -> Path:
    """A copy of csrc/ with exactly one occurrence of ``old`` in ``file`` replaced."""
    dst = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", dst)
    text = (dst / file).read_text()
    assert text.count(old) == 1, f"mutation site not found once in {file}: {old!r}"
    (dst / file).write_text(text.replace(old, new))
    return dst


def _differs_from_clean(install, csrc, mode="GRU", dt="bf16", **shape):
    """True when the mutant's results differ from the clean kernels' or depend on the order."""
    install(sms=4)
    clean = _layer(mode, dt, **shape)
    results = []
    for order, cp_async in (("ascending", "late"), ("descending", "early")):
        install(sms=4, order=order, csrc=csrc, cp_async=cp_async)
        results.append(_layer(mode, dt, **shape))
    return any(not torch.equal(a, b) for run in results for a, b in zip(run, clean))


MUTANTS = {
    # the epilogue reads the scratch slots before the other warps have written them
    "no-barrier-after-matmul": ("rnn_common.cuh", """bs.frag_loads, clk);
    __syncthreads();""", """bs.frag_loads, clk);"""),
    # the next chunk's matmul overwrites slots the epilogue is still reading
    "no-barrier-after-epilogue": ("rnn_common.cuh",
                                  "    __syncthreads();  // the slots are reused by the next chunk",
                                  "    // (removed)"),
    # one exchange buffer: blocks overwrite h_{t-1} that other blocks have not read yet
    "single-buffer": ("rnn_common.cuh",
                      "global + ((s + 1) & 1) * global_buf, k_pad, 0, 0,",
                      "global + (s & 1) * global_buf, k_pad, 0, 0,"),
    # steps of different blocks overlap
    "no-grid-sync-forward": ("rnn_forward.cu", "      if constexpr (!Tagged) bar.sync();",
                             "      (void)bar;"),
    "no-grid-sync-backward": ("rnn_backward.cu", "      if constexpr (!Tagged) bar.sync();",
                              "      (void)bar;"),
}
# clusters: the cluster barrier does nothing, with the 4 blocks as one cluster
# (FUSED_RNN_CUDA_CLUSTER=4), or with K-parts teams of 2 as clusters of a cooperative grid
# (FUSED_RNN_CUDA_TEAM_CLUSTERS=on)
_NO_CLUSTER_SYNC = ("rnn_common.cuh", "  cooperative_groups::this_cluster().sync();", "  (void)0;")
CLUSTER_MUTANTS = {"no-cluster-sync-groups": _NO_CLUSTER_SYNC,
                   "no-cluster-sync-teams": _NO_CLUSTER_SYNC}
# The exchange through distributed shared memory (FUSED_RNN_CUDA_CLUSTER=4,
# FUSED_RNN_CUDA_CLUSTER_EXCHANGE=dsmem: the 4 blocks as one cluster, each with the mirrors).
DSMEM_MUTANTS = {
    # a block writes into a peer's mirror before the peer has zeroed it
    "dsmem-no-init-barrier": ("rnn_common.cuh", "    }\n    cluster_sync();\n  }\n  // dsmem, after",
                              "    }\n  }\n  // dsmem, after"),
    # one mirror: a block overwrites X a slower peer has not read yet
    "dsmem-single-mirror": ("rnn_common.cuh", "mirror + ((s + 1) & 1) * mirror_buf, ld, row0,",
                            "mirror + (s & 1) * mirror_buf, ld, row0,"),
}
# (Storing into the own mirror only, or leaving h_n in shared memory, changes the results in
# every order; test_dsmem_exchange_gives_the_global_exchanges_bits fails on them, checked by
# hand. The two above are races: wrong only in some orders.)
# K parts (run with FUSED_RNN_CUDA_K_PARTS=2, H=60): a block adds its team's partial sums
# before the other ranks have written them
PART_MUTANTS = {
    "no-grid-sync-parts": ("rnn_common.cuh", "    bar.parts_sync();\n    clk.mark(kPhaseParts);",
                           "    (void)bar;\n    clk.mark(kPhaseParts);"),
    # the partials of the last rank are left out of the sum
    "parts-sum-short": ("rnn_common.cuh", "if (r < pl.parts) acc += v[r];",
                        "if (r < pl.parts - 1) acc += v[r];"),
}


STAGE_MUTANTS = {
    # the next K slice is copied into the stage while other warps still read the previous one
    "no-barrier-between-slices": ("rnn_common.cuh", "      if (s > 0) __syncthreads();", ""),
    # the last real batch row of a chunk is not staged (the MMAs read a stale row for it)
    "real-row-not-staged": ("rnn_common.cuh", """  const int total = rows * per_row;
  for (int i = threadIdx.x; i < total; i += kThreads)
    cp_async16(""", """  const int total = (rows - 1) * per_row;
  for (int i = threadIdx.x; i < total; i += kThreads)
    cp_async16("""),
    # the MMAs read the stage before every thread has copied its part
    "no-barrier-after-stage-copy": ("rnn_common.cuh",
                                    "      __syncthreads();  // ... and for every thread", ""),
}
# Stage mutants run with one buffer (16-column slices) and pipelined (two 16-column buffers).
STAGE_CASES = [f"{name}@{k}" for name in STAGE_MUTANTS for k in ("16", "32")]


@pytest.mark.parametrize("name", list(MUTANTS) + STAGE_CASES + list(PART_MUTANTS)
                         + list(CLUSTER_MUTANTS) + list(DSMEM_MUTANTS))
def test_races_are_caught(install, monkeypatch, tmp_path, name):
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "1")  # two batch chunks per block
    shape = dict(B=70, T=3)
    if name in PART_MUTANTS or name == "no-cluster-sync-teams":
        monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", "2")
        shape["H"] = 60
    if name == "no-cluster-sync-groups" or name in DSMEM_MUTANTS:
        monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER", "4")
    if name in DSMEM_MUTANTS:
        monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER_EXCHANGE", "dsmem")
    if name == "no-cluster-sync-teams":
        monkeypatch.setenv("FUSED_RNN_CUDA_TEAM_CLUSTERS", "on")
    if "@" in name:
        name, stage_k = name.split("@")
        monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", stage_k)  # several K slices per chunk
    if name == "no-barrier-after-epilogue":
        # with staging the next chunk's stage copy ends in a barrier before any slot is written;
        # unstaged, only this barrier keeps the next matmul off the slots being read
        monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", "0")
    file, old, new = {**MUTANTS, **STAGE_MUTANTS, **PART_MUTANTS, **CLUSTER_MUTANTS,
                      **DSMEM_MUTANTS}[name]
    csrc = _mutant(tmp_path, file, old, new)
    assert _differs_from_clean(install, csrc, **shape), f"mutant {name} went unnoticed"


def test_a_thread_leaving_before_a_barrier_is_reported(install, tmp_path):
    site = "  const BlockState<W> bs = block_state<W, M>("
    csrc = _mutant(tmp_path, "rnn_forward.cu", site, "  if (threadIdx.x == 5) return;\n" + site)
    install(sms=4, csrc=csrc)
    with pytest.raises(RuntimeError, match=r"__syncthreads\(\) at .* is not reached by block 0 "
                                           r"thread 5 \(it exited\)"):
        _layer("RNN_TANH", "fp32")


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_a_store_into_a_peer_that_has_exited_is_reported(install, monkeypatch, tmp_path, order):
    """The dsmem exchange's last step stores locally only: after the last barrier a peer may
    have exited and its shared memory be gone. Stored into the peers too, the results are the
    same (h_n comes from each block's own units), so only cudasim's check of what an exited
    block's shared memory holds at the launch's end can see it."""
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "1")
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER", "4")
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER_EXCHANGE", "dsmem")
    install(sms=4, order=order)
    _layer("GRU", "bf16", B=70, T=3)  # the clean kernels pass the check
    csrc = _mutant(tmp_path, "rnn_common.cuh", "            last ? 0 : peers, 0u};",
                   "            last ? peers : peers, 0u};")
    install(sms=4, order=order, csrc=csrc)
    with pytest.raises(RuntimeError, match=r"the shared memory of block \d+ was written .* after "
                                           r"the block exited"):
        _layer("GRU", "bf16", B=70, T=3)


def test_misaligned_wmma_stride_is_reported(install, tmp_path):
    """A scratch-slot row of 34 floats (136 bytes) breaks WMMA's 16-byte ldm rule."""
    csrc = _mutant(tmp_path, "plan.h", "constexpr int kSlotPad = 4;", "constexpr int kSlotPad = 2;")
    install(sms=4, csrc=csrc)
    with pytest.raises(RuntimeError, match="ldm of 136 bytes is not a multiple of 16"):
        _layer("LSTM", "bf16")


# Mutants that touch memory past a tensor's end, all in one copy of csrc/ so that one ASan
# build serves them: each change is switched on by FRNN_OOB_MUTANT naming it (off, the copy
# computes exactly what csrc/ does). (file, site, the site switched, what ASan reports.)
_ON = 'frnn_oob_mutant("{}")'
OUT_OF_BOUNDS = {
    # the epilogue run over the batch padding rows: reads x W_ih^T (then writes y) past the end
    "epilogue": ("rnn_common.cuh", "const int nb = imin(ncols, batch - n0);",
                 "const int nb = {on} ? ncols : imin(ncols, batch - n0);", "READ of size 4"),
    # the L2 prefetch also issued after the last step reads x W_ih^T of a step that is not there
    "prefetch": ("rnn_forward.cu", "    if (s + 1 < p.steps) {\n      prefetch_step<C>(",
                 ("    if ({on}) prefetch_step<C>(p, p.reverse ? t - 1 : t + 1, bs);\n"
                  "    if (s + 1 < p.steps) {\n      prefetch_step<C>("), "READ of size 1"),
    # W_hh's slice loaded one hidden unit past the last: a row of W past its end (H=37 gives
    # the last block a ragged slice)
    "w-rows": ("rnn_common.cuh", "team_u0 + j < hidden && k0 + kk < hidden;",
               "(team_u0 + j < hidden || ({on} && team_u0 + j == hidden)) && k0 + kk < hidden;",
               "READ of size"),
}
_OOB_SWITCH = """#include <cstdlib>
#include <cstring>
// test_cuda_sim.py: which out-of-bounds mutant this process runs (FRNN_OOB_MUTANT), if any.
static inline bool frnn_oob_mutant(const char* name) {
  static const char* const on = std::getenv("FRNN_OOB_MUTANT");
  return on != nullptr && std::strcmp(on, name) == 0;
}
"""
_OOB_SCRIPT = """import torch, simulate
sim = simulate.Simulator(sms=4, sanitize='address', csrc={csrc!r}, quick=True)
T, B, H = 2, 3, 37
x = torch.randn(T, B, 3 * H); h0 = torch.randn(B, H)
w = torch.randn(3 * H, H) * 0.1
sim.forward(1, x, h0, None, w, None, None, False, False, True, 1, 1 << 30)
print('no error')
"""


def test_out_of_bounds_access_is_caught_by_the_sanitizer(tmp_path):
    """Mutant kernels that touch memory past a tensor's end: ASan aborts on each, and on
    nothing with every mutant switched off (so what trips it is the mutation)."""
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    common = csrc / "rnn_common.cuh"
    common.write_text(_OOB_SWITCH + common.read_text())
    for name, (file, old, new, _) in OUT_OF_BOUNDS.items():
        text = (csrc / file).read_text()
        assert text.count(old) == 1, f"mutation site not found once in {file}: {old!r}"
        (csrc / file).write_text(text.replace(old, new.replace("{on}", _ON.format(name))))
    simulate.build(sanitize="address", csrc=csrc, quick=True)
    script = _OOB_SCRIPT.format(csrc=str(csrc))
    for name in [None, *OUT_OF_BOUNDS]:
        env = {**simulate.sanitizer_env("address"), "FRNN_OOB_MUTANT": name or "none"}
        r = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
        tail = f"mutant {name}:\n" + (r.stdout + r.stderr)[-3000:]
        if name is None:
            assert r.returncode == 0 and "no error" in r.stdout, tail
            continue
        assert r.returncode != 0 and "AddressSanitizer" in r.stderr, tail
        # Past the end of a tensor: into ASan's redzone, or (far past it, as the epilogue
        # mutant reads whole padding rows, ~13 KB) into a block that was freed; both abort with
        # this access. Or, where the heap's layout leaves no block there, into memory nothing
        # maps: ASan's SEGV report, of a read in the mutated epilogue's load (a cold CI run
        # at f581189 drew that layout).
        caught = re.search(r"AddressSanitizer: heap-(buffer-overflow|use-after-free)", r.stderr)
        unmapped = (name == "epilogue"
                    and "The signal is caused by a READ memory access" in r.stderr
                    and re.search(r"SUMMARY: AddressSanitizer: SEGV .*"
                                  r"fused_rnn::detail::ForwardPoint<[^>]*>::load<", r.stderr))
        assert caught or unmapped, tail
        assert unmapped or OUT_OF_BOUNDS[name][3] in r.stderr, tail


# ---------------------------------------------------------- racecheck by happens-before (TSan)
# The kernels built with ThreadSanitizer, each simulated thread a TSan fiber whose only
# happens-before edges are CUDA's (the launch, the block, cluster and grid barriers, mbarrier
# phases; sim/runtime.cpp, CUDASIM_TSAN), run by tsan_run.py in a process of its own. TSan then
# names any two accesses to the same bytes, one a write, by threads no barrier orders, in shared,
# distributed shared and global memory: a race whether or not the results show it, which the
# thread-order check above needs them to.
needs_tsan = pytest.mark.skipif(simulate.sanitizer_missing("thread") is not None,
                                reason=str(simulate.sanitizer_missing("thread")))


def _run_under_tsan(csrc: Path, cp_async: str, names: list[str],
                    quick: bool = False) -> tuple[int, str, dict]:
    """tsan_run.py on ``csrc`` (``quick``: its kernels compiled at -O0, as for a mutant): its
    exit code, stderr, and what each configuration ran."""
    simulate.build(sanitize="thread", csrc=csrc, quick=quick)  # here: a build error reads as one
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "tsan_run.py"),
                        *["--quick"] * quick, str(csrc), cp_async, *names],
                       cwd=Path(__file__).parent,
                       env=simulate.sanitizer_env("thread"), capture_output=True, text=True,
                       timeout=900, check=False)
    ran = {m[1]: json.loads(m[2])
           for m in re.finditer(r"^ran (\S+) (.*)$", r.stdout, re.MULTILINE)}
    return r.returncode, r.stderr, ran


@pytest.mark.slow
@needs_tsan
@pytest.mark.parametrize("cp_async", ["late", "early"])
def test_no_data_race_under_thread_sanitizer(cp_async):
    """Every partition and launch mode, forward and backward, cp.async landing late and early:
    no race reported, and each configuration ran the plan it names (clusters as clusters)."""
    import tsan_run

    code, err, ran = _run_under_tsan(ROOT / "csrc", cp_async, list(tsan_run.CONFIGS))
    assert code == 0 and "ThreadSanitizer" not in err, err[-6000:]
    assert list(ran) == list(tsan_run.CONFIGS)
    for name, (*_, want) in tsan_run.CONFIGS.items():
        plans = ran[name]["plans"]
        assert len(plans) == 2, (name, plans)  # forward and backward
        assert all({k: pl[k] for k in want} == want for pl in plans), (name, plans)
        assert ran[name]["cluster_launches"] == (2 if want["cluster"] else 0), (name, ran[name])


# (mutation, the configuration it runs in): each a race TSan must name, with a frame in the
# mutated sources. The first changes no result in any thread order or configuration the checks
# above run (iteration 0 of the backward multiplies the W slice by the zeroed exchange buffer,
# so W read before or after its load gives the same zeros): only a race detector sees it.
TSAN_MUTANTS = {
    "no-barrier-after-w-load-backward": (
        ("rnn_backward.cu", "bs.w_swizzle);\n  __syncthreads();", "bs.w_swizzle);"), "direct"),
    "no-barrier-after-matmul": (MUTANTS["no-barrier-after-matmul"], "direct"),
    "no-grid-sync-forward": (MUTANTS["no-grid-sync-forward"], "grouped-staged"),
    "no-barrier-after-stage-copy": (STAGE_MUTANTS["no-barrier-after-stage-copy"], "slices32"),
    "dsmem-single-mirror": (DSMEM_MUTANTS["dsmem-single-mirror"], "dsmem-one-cluster"),
    # the next slice copied through registers while other warps still read the stage
    "no-barrier-between-slices-registers": (STAGE_MUTANTS["no-barrier-between-slices"],
                                            "parts2-registers"),
}


@pytest.mark.slow
@needs_tsan
@pytest.mark.parametrize("name", list(TSAN_MUTANTS))
def test_races_are_named_by_thread_sanitizer(tmp_path, name):
    (file, old, new), config = TSAN_MUTANTS[name]
    csrc = _mutant(tmp_path, file, old, new)
    code, err, ran = _run_under_tsan(csrc, "late", [config], quick=True)
    assert code == simulate.TSAN_EXIT_CODE, (code, err[-4000:])
    assert "WARNING: ThreadSanitizer: data race" in err, err[-4000:]
    report = err[err.index("WARNING: ThreadSanitizer"):err.index("SUMMARY: ThreadSanitizer")]
    # both racing accesses are the kernels' (the stacks below the first two frames)
    now, before = report.split("\n\n")[0], report.split("\n\n")[1]
    assert "Previous" in before and all("fused_rnn::detail::" in a for a in (now, before)), report
    assert re.search(r"Thread T\d+ 'block \d+ thread \d+'", report), report  # fiber names
    assert not ran  # the first report ends the process


@pytest.mark.parametrize("stage_k", ["auto", "16", "32"])
def test_clean_sources_pass_the_mutation_harness(install, monkeypatch, stage_k):
    """The harness itself: the unmutated sources, compiled quick as mutants are, are not
    flagged."""
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "1")
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", stage_k)
    assert not _differs_from_clean(install, simulate.CSRC, B=70, T=3)


@pytest.mark.parametrize("dt", list(DTYPES))
def test_a_quick_build_gives_the_same_bits(install, dt):
    """The kernels compiled at -O0 (how mutants are built) compute exactly what the optimized
    build does, in every cell and math path: a mutant's differing results are the mutation's."""
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        install(sms=4)
        want = _layer(mode, dt, B=33)
        install(sms=4, quick=True)
        got = _layer(mode, dt, B=33)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (mode, dt)


def test_staging_plans_and_settings(install, monkeypatch):
    """auto stages all of K when it fits; a cap gives several slices; 0 turns staging off;
    anything else is refused with the rule."""
    for setting, want in (("auto", {48, 160}), ("16", {16}), ("0", {0})):
        monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", setting)
        sim = install(sms=4)
        _layer("LSTM", "bf16")
        assert {pl["stage_k"] for _, _, pl in sim.launches} == want, setting
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", "24")
    with pytest.raises(ValueError, match="positive multiple of 16"):
        _layer("LSTM", "bf16")


@pytest.mark.parametrize("name,huge,same", [
    ("FUSED_RNN_CUDA_STAGE_K", str(10**21), "auto"),
    ("FUSED_RNN_CUDA_MAX_GROUPS", str(2**64), str(2**16)),
    ("FUSED_RNN_CUDA_K_PARTS", str(10**20), "8"),
    ("FUSED_RNN_CUDA_MAX_BLOCKS", str(2**63), "auto"),
])
def test_a_setting_past_int64_means_as_many_as_there_are(monkeypatch, name, huge, same):
    """A count setting of 2**63 or more failed pybind11's argument conversion (binding.cpp
    itself, host-built) with a TypeError that named no setting; it is clamped (the binding
    clamps each far lower), so it gives the launches of the largest setting that changes
    anything."""
    if host_binding.unavailable_reason() is not None:
        pytest.skip(f"no host build: {host_binding.unavailable_reason()}")
    plans = []
    for value in (huge, same):
        monkeypatch.setenv(name, value)
        host = install_standin(monkeypatch, host_binding.HostBinding(sms=4))
        _layer("GRU", "bf16", B=70)
        plans.append([pl for _, _, pl in host.launches])
    assert plans[0] == plans[1]


def test_narrow_integer_lengths_longer_than_their_dtype_holds(install):
    """lengths of int8 (or uint8) are valid for any T: the clamp to [0, T] ran in the lengths'
    dtype and failed where T did not fit it (T=130 in int8)."""
    install(sms=4)
    T, B, H = 130, 2, 5
    g = torch.Generator().manual_seed(0)
    x, h0 = torch.randn(T, B, 3, generator=g), torch.randn(B, H, generator=g)
    w_ih, w_hh = torch.randn(H, 3, generator=g) * 0.3, torch.randn(H, H, generator=g) * 0.3
    for dtype in (torch.int8, torch.uint8):
        lengths = torch.tensor([127, 5], dtype=dtype)
        got = cuda_backend.rnn_layer("RNN_TANH", x, h0, None, w_ih, w_hh, None, None, None,
                                     lengths, False)
        want = cuda_backend.rnn_layer("RNN_TANH", x, h0, None, w_ih, w_hh, None, None, None,
                                      lengths.long(), False)
        for a, b in zip(got, want):
            assert a is None and b is None or torch.equal(a, b), dtype


def test_a_strided_fp32_input_bias_with_16_bit_input(install):
    """With 16-bit x, b_ih goes to the kernel in fp32 as given: an fp32 b_ih that was a strided
    view (or an expanded scalar) reached the binding non-contiguous and was refused as "b_ih
    must be contiguous"."""
    install(sms=4)
    leaves, _, _ = layer_inputs("LSTM", 3, 2, 5, 8, 0, False)
    x, h0, c0, w_ih, w_hh, _, b_hh = (None if t is None else t.to(torch.bfloat16)
                                      for t in leaves)
    wide = torch.randn(64)
    for b_ih in (wide[::2], torch.tensor(0.5).expand(32)):
        got = torch.ops.fused_rnn.cuda_layer("LSTM", x, h0, c0, w_ih, w_hh, b_ih, b_hh, None,
                                             False, False, False)
        want = torch.ops.fused_rnn.cuda_layer("LSTM", x, h0, c0, w_ih, w_hh, b_ih.contiguous(),
                                              b_hh, None, False, False, False)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("step", [False, True], ids=["layer", "cell"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_functional_states_and_weights_of_another_dtype_run_in_x_dtype(install, mode, step):
    """As on the other backends (test_errors.py): a bf16 x with fp32 states and weights gives
    the bits of the call in bf16. The op rounded h0, c0 and W_hh but not W_ih."""
    from helpers import check_mixed_dtypes_run_in_x_dtype

    sim = install(sms=4)
    check_mixed_dtypes_run_in_x_dtype("cuda", mode, step=step)
    assert sim.launches, "the call did not reach the kernels"


# ------------------------------------------------------------------ register blocking
# (mode, dtype, H, B, a blocking the default setting must use); one block (sms=1) holds all of
# H, so the chunks have many W-row tiles. fp32 (the FMA path) never blocks.
TILE_BLOCK_CASES = [("LSTM", "bf16", 60, 70, (2, 2)), ("LSTM", "tf32", 64, 70, (2, 2)),
                    ("LSTM", "bf16", 16, 70, (2, 1)), ("LSTM", "tf32", 16, 70, (2, 1)),
                    ("GRU", "fp16", 37, 33, (1, 2)), ("LSTM", "tf32", 37, 70, (1, 2)),
                    ("GRU", "fp32", 37, 70, (1, 1))]
# Every case with X staged and read straight from the exchange buffer; two on K-parts teams (4
# SMs, teams of 2: a block's rows are its team's).
TILE_BLOCK_SETTINGS = {"staged": (1, {}), "direct": (1, {"FUSED_RNN_CUDA_STAGE_K": "0"}),
                       "parts2": (4, {"FUSED_RNN_CUDA_K_PARTS": "2",
                                      "FUSED_RNN_CUDA_MAX_GROUPS": "1"})}
TILE_BLOCK_RUNS = [(*case, partition) for partition in ("staged", "direct")
                   for case in TILE_BLOCK_CASES] + [(*case, "parts2")
                                                    for case in TILE_BLOCK_CASES[:2]]


@pytest.mark.parametrize("mode,dt,H,B,want,partition", TILE_BLOCK_RUNS)
def test_tile_blocks_give_the_same_bits(install, monkeypatch, mode, dt, H, B, want, partition):
    """FUSED_RNN_CUDA_TILE_BLOCK (1, 2, 4): a warp multiplying a block of tiles sums each
    tile's K in the order it would alone, so every output and gradient is the same bits with
    any setting; and each setting does block (a blocking that silently fell back to single
    tiles would pass the comparison)."""
    sms, env = TILE_BLOCK_SETTINGS[partition]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runs, used = {}, {}
    for setting in ("1", "2", "4"):
        monkeypatch.setenv("FUSED_RNN_CUDA_TILE_BLOCK", setting)
        sim = install(sms=sms, order="shuffle", seed=5)
        runs[setting] = _layer(mode, dt, B=B, T=3, H=H)
        used[setting] = blockings(sim.launches, B)
        if partition == "parts2":
            assert {pl["parts"] for _, _, pl in sim.launches} == {2}
    assert used["1"] == {(1, 1)}
    assert all(bm * bn <= 2 for bm, bn in used["2"])
    assert want in used["4"], used["4"]
    assert (used["4"] == {(1, 1)}) == (dt == "fp32"), used["4"]
    for setting in ("2", "4"):
        for i, (a, b) in enumerate(zip(runs["1"], runs[setting], strict=True)):
            assert torch.equal(a, b), (setting, i)
    # ... and right: the emulation sums K in another order (unstaged), so to that tolerance.
    install_standin(monkeypatch, Emulator(sms=sms))
    monkeypatch.delenv("FUSED_RNN_CUDA_TILE_BLOCK")
    for i, (a, b) in enumerate(zip(runs["4"], _layer(mode, dt, B=B, T=3, H=H), strict=True)):
        assert rel(a, b) <= PARTS_EMULATION_TOL[dt], f"tensor {i}: {rel(a, b):.2e}"
    monkeypatch.setenv("FUSED_RNN_CUDA_TILE_BLOCK", "3")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_TILE_BLOCK must be 1, 2 or 4"):
        _layer(mode, dt)


# ------------------------------------------------------------------ the epilogue's point batches
# (environment, H) of each partition the points run in
_POINT_PARTITIONS = {
    "direct": ({"FUSED_RNN_CUDA_MAX_GROUPS": "1", "FUSED_RNN_CUDA_STAGE_K": "0"}, 37),
    "grouped-staged": ({"FUSED_RNN_CUDA_MAX_GROUPS": "8"}, 37),
    "parts2": ({"FUSED_RNN_CUDA_K_PARTS": "2", "FUSED_RNN_CUDA_MAX_GROUPS": "1"}, 60),
    "dsmem": ({"FUSED_RNN_CUDA_CLUSTER": "4", "FUSED_RNN_CUDA_CLUSTER_EXCHANGE": "dsmem"}, 37)}


def _point_batches(launches, B, T, dt) -> int:
    """plan.py's count of the batches of points of these launches (of DTYPES[dt], T steps: a
    backward launch runs T + 1 iterations)."""
    dtype = DTYPES[dt][0]
    total = 0
    for direction, _, pl in launches:
        size = P.point_batch_size(dtype != torch.float32, dtype == torch.float16, pl["math"])
        per_step = P.point_batches(P.Plan(**{k: pl[k] for k in P.PLAN_FIELDS}), B, size)
        total += per_step * (T + (direction == "backward"))
    return total


def test_point_batches_give_the_same_bits(install, monkeypatch):
    """A thread loads a batch of its epilogue points before it finishes any (rnn_common.cuh
    run_points: 4 in 16 bits and TF32, 2 on the FMA path) where its warp has two or more points
    a thread: every output and gradient is the same bits as with FUSED_RNN_CUDA_POINT_BATCH=1
    (one point at a time, the other loop), for every cell, with padded rows (lengths) and both
    directions. B=70 over 4 SMs: up to three points a thread and chunk, so batches are full,
    partial and, for some threads, missing; with K parts the points add the partials of the
    team; with the exchange through the cluster's shared memory they store into the peers.
    cudasim counts the batches (one a thread): some at B=70 and B=27 (none with the setting at
    1), none at B=8, where no thread has two points (the one-point code, as before batches),
    and as many as plan.py's point_batches (which the bench's cuda-pb1 rule uses) says: a warp
    batches while its lane 0 has two or more points left (at B=27, 270 points a chunk: warp 0
    alone, though only 14 of its threads have a second point)."""
    for partition, (env, H) in _POINT_PARTITIONS.items():
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            for mode in MODES:
                for dt in ("bf16", "tf32", "fp32"):
                    for B in (70, 27, 8) if mode == "LSTM" else (70,):
                        runs = {}
                        for setting in ("auto", "1"):
                            m.setenv("FUSED_RNN_CUDA_POINT_BATCH", setting)
                            sim = install(sms=4, order="shuffle", seed=7)
                            before = sim.point_batch_count()
                            runs[setting] = _layer(mode, dt, B=B, T=3, H=H)
                            batches = sim.point_batch_count() - before
                            key = (partition, mode, dt, B, setting)
                            if setting == "1":
                                assert batches == 0, key
                            else:
                                assert (batches > 0) == (B != 8), (key, batches)
                                assert batches == _point_batches(sim.launches, B, 3, dt), key
                            if partition == "parts2":
                                assert {pl["parts"] for _, _, pl in sim.launches} == {2}
                            if partition == "dsmem":
                                assert sim.cluster_launches() > 0
                        for i, (a, b) in enumerate(zip(runs["1"], runs["auto"], strict=True)):
                            assert torch.equal(a, b), (partition, mode, dt, B, i)
    monkeypatch.setenv("FUSED_RNN_CUDA_POINT_BATCH", "4")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_POINT_BATCH must be 'auto' or 1"):
        _layer("LSTM", "bf16")


# ------------------------------------------------------------------ WMMA fragments in shared memory
# (environment, sms, H, where X is: "shared" (staged, or the dsmem mirror) or "global"); one SM
# holds all of H, so its chunks have many W-row tiles and multiply blocks of them.
_FRAG_PARTITIONS = {
    "staged": ({"FUSED_RNN_CUDA_MAX_GROUPS": "8"}, 4, 37, "shared"),
    "staged-blocks": ({}, 1, 60, "shared"),
    "pipelined-parts2": ({"FUSED_RNN_CUDA_K_PARTS": "2", "FUSED_RNN_CUDA_MAX_GROUPS": "1",
                          "FUSED_RNN_CUDA_STAGE_K": "32"}, 4, 60, "shared"),
    "dsmem": ({"FUSED_RNN_CUDA_CLUSTER": "4", "FUSED_RNN_CUDA_CLUSTER_EXCHANGE": "dsmem"}, 4, 37,
              "shared"),
    "direct": ({"FUSED_RNN_CUDA_STAGE_K": "0"}, 4, 37, "global"),
    "direct-blocks": ({"FUSED_RNN_CUDA_STAGE_K": "0"}, 1, 60, "global")}


def _same_bits_under_each_frag_setting(install, monkeypatch, partition, cases, settings, seed,
                                       count, check):
    """For each (mode, dt) of `cases`, under the partition's environment: one layer per
    FUSED_RNN_CUDA_FRAG_LOADS setting, every output and gradient the same bits under all of
    them. `count(sim)` is a tuple of counters; `check(key, sim, grew)` is called after each
    setting's layer with how much each grew during it, key = (partition, mode, dt, setting)."""
    env, sms, H, _ = _FRAG_PARTITIONS[partition]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for mode, dt in cases:
        runs = []
        for setting in settings:
            monkeypatch.setenv("FUSED_RNN_CUDA_FRAG_LOADS", setting)
            sim = install(sms=sms, order="shuffle", seed=seed)
            before = count(sim)
            runs.append(_layer(mode, dt, B=40, T=3, H=H))
            grew = tuple(a - b for a, b in zip(count(sim), before, strict=True))
            check((partition, mode, dt, setting), sim, grew)
        for other, setting in zip(runs[1:], settings[1:], strict=True):
            for i, (a, b) in enumerate(zip(runs[0], other, strict=True)):
                assert torch.equal(a, b), (partition, mode, dt, setting, i)


@pytest.mark.parametrize("partition", list(_FRAG_PARTITIONS))
def test_fragments_in_shared_memory_give_the_same_bits(install, monkeypatch, partition):
    """FUSED_RNN_CUDA_FRAG_LOADS: by default the WMMA kernels load their fragments (W, the staged
    or mirrored X, the scratch slots' accumulators) through the .shared forms of wmma.load and
    wmma.store (rnn_common.cuh frag_load), and X from the exchange buffer in global memory (not
    staged) through WMMA's generic ones, with W and the slots then generic too; `generic` is the
    old code everywhere. The same instructions, so the same bits: every output and gradient,
    every cell, bf16 / fp16 / TF32 (and the FMA path, which loads its own). cudasim checks that
    every element a .shared form touches lies in the block's shared memory (a .shared access
    elsewhere reads other shared memory on a GPU) and counts the accumulator stores of each
    form: where X is in shared memory all of them take the .shared form, where it is in global
    memory none do, and with `generic` none do."""
    where = _FRAG_PARTITIONS[partition][3]

    def check(key, sim, grew):
        _, _, dt, setting = key
        total, shared = grew
        assert (total > 0) == (dt != "fp32"), (key, total)
        want = total if setting == "shared" and where == "shared" else 0
        assert shared == want, (key, total, shared)
        if partition == "dsmem":
            assert sim.cluster_launches() > 0, key
        if partition == "pipelined-parts2":
            assert {pl["parts"] for _, _, pl in sim.launches} == {2}, key

    cases = [(mode, dt) for mode in MODES for dt in ("bf16", "fp16", "tf32", "fp32")]
    _same_bits_under_each_frag_setting(install, monkeypatch, partition, cases,
                                       ("shared", "generic"), 3, lambda sim: sim.frag_stores(),
                                       check)
    monkeypatch.setenv("FUSED_RNN_CUDA_FRAG_LOADS", "ldmatrix")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_FRAG_LOADS must be one of shared, generic"):
        _layer("LSTM", "bf16")


@pytest.mark.parametrize("partition", list(_FRAG_PARTITIONS))
def test_tf32_mma_sync_gives_the_wmma_bits(install, monkeypatch, partition):
    """FUSED_RNN_CUDA_FRAG_LOADS=mma: the TF32 tiles as two mma.sync.m16n8k8 a k-step with
    ldmatrix operands (rnn_common.cuh MmaTf32Ops) instead of WMMA m16n16k8. cudasim runs both
    instructions as warp collectives in the PTX layouts (warp_mma_check.cu holds them to a plain
    matmul, and on a GPU to the hardware) with the WMMA model's arithmetic, so every output and
    gradient of every cell has the WMMA path's bits, in every partition: X staged or in the
    dsmem mirror, single tiles, blocks of tiles, K parts. The count of mma.sync shows which path
    ran: some in TF32 where X is in shared memory; none with `shared`, none where X is read from
    global memory and none in bf16 (those take `shared`'s path under `mma`).
    Every ldmatrix read is free of bank conflicts (cudasim counts the shared-memory passes of
    each of its 8 x 8 matrices): W's 16 x 8 k-step blocks are stored swizzled for it
    (rnn_common.cuh w_index), and the stage and mirror rows are 16 bytes past a multiple of
    128."""
    where = _FRAG_PARTITIONS[partition][3]

    def check(key, sim, grew):
        _, _, dt, setting = key
        want = setting == "mma" and dt == "tf32" and where == "shared"
        mma_syncs, matrices, wavefronts = grew
        assert (mma_syncs > 0) == want, (key, grew)
        # a k-step: two ldmatrix.x4 (A, B) for two mma.sync; for eight in a 2 x 2 block, four
        assert matrices >= 2 * mma_syncs and (matrices > 0) == want, (key, grew)
        assert wavefronts == matrices, (key, grew)

    # one cell in bf16 shows the 16-bit kernels ignore the setting
    cases = [(mode, "tf32") for mode in MODES] + [("GRU", "bf16")]
    _same_bits_under_each_frag_setting(install, monkeypatch, partition, cases, ("shared", "mma"),
                                       5, lambda sim: (sim.mma_sync_count(), *sim.ldmatrix_count()),
                                       check)


@pytest.mark.parametrize("dt,B", [("tf32", 16), ("tf32", 70), ("bf16", 8), ("tf32", 40),
                                  ("bf16", 70)])
def test_the_matmul_skips_batch_tiles_past_the_real_rows(install, dt, B):
    """chunk_matmul multiplies the batch tiles that hold real rows, ceil(rows / wn) of them, not
    the chunk's padded columns / wn: at B=16 in TF32 (16-column tiles, 32 padded rows) half the
    MMAs. Counted: cudasim's mma_sync calls in one forward launch against the tiles the plan
    mirror says each block multiplies (every tile over all of K, whatever the K split)."""
    dtype, tf32 = DTYPES[dt]
    sim = install(sms=4)
    T, H, G = 2, 37, 4
    g = torch.Generator().manual_seed(0)
    xproj = torch.randn(T, B, G * H, generator=g)
    h0, c0 = (torch.randn(B, H, generator=g).to(dtype) for _ in range(2))
    w_hh = (torch.randn(G * H, H, generator=g) / 8).to(dtype)
    before = sim.mma_count()
    sim.forward(P.CELLS["LSTM"], xproj, h0, c0, w_hh, torch.zeros(G * H), None, False, tf32,
                False, 8, 1 << 30, k_parts=1)
    counted = sim.mma_count() - before
    (_, _, pl), = sim.launches
    rows = -(-B // P.K_BATCH_PAD) * P.K_BATCH_PAD // pl["groups"]
    wk = P.TILE_SHAPES[pl["math"]][2]
    want = padded = 0
    for blk in range(pl["blocks"]):
        begin = blk // pl["group_blocks"] * rows
        for n0 in range(begin, min(begin + rows, B), P.K_CHUNK_COLS):
            ncols = min(P.K_CHUNK_COLS, begin + rows - n0)
            mfr, nfr = P.chunk_tiles(pl["m_pad"], pl["math"], min(ncols, B - n0))
            want += mfr * nfr * (pl["k_pad"] // wk) * T
            padded += mfr * P.chunk_tiles(pl["m_pad"], pl["math"], ncols)[1] * (pl["k_pad"] // wk) * T
    assert counted == want, (counted, want, padded)
    if (dt, B) in (("tf32", 16), ("tf32", 70)):
        assert want < padded, (want, padded)


@pytest.mark.parametrize("dt", ["bf16", "tf32"])
@pytest.mark.parametrize("mode", MODES)
def test_the_kernel_adds_b_ih_as_the_gemm_would(install, mode, dt):
    """16-bit layers hand the forward kernel x W_ih^T alone and b_ih apart (ops.py: torch has
    no 16-bit GEMM with an fp32 bias and an fp32 result). The epilogue's one fp32 sum must give
    the bits of b_ih added to xproj before the launch: every output, aux and the activations
    saved over xproj."""
    dtype, tf32 = DTYPES[dt]
    sim = install(sms=4)
    T, B, H, G = 3, 5, 37, reference.GATES[mode]
    g = torch.Generator().manual_seed(0)
    xw, b_ih = torch.randn(T, B, G * H, generator=g), torch.randn(G * H, generator=g)
    h0, c0 = (torch.randn(B, H, generator=g).to(dtype) for _ in range(2))
    w_hh = (torch.randn(G * H, H, generator=g) / 8).to(dtype)
    b_hh = torch.randn(G * H, generator=g)

    def run(xproj, **kw):
        out = sim.forward(P.CELLS[mode], xproj, h0, c0 if mode == "LSTM" else None, w_hh, b_hh,
                          None, False, tf32, True, 8, 1 << 30, **kw)
        return [*out, xproj]

    before = run(xw + b_ih)
    after = run(xw.clone(), b_ih=b_ih)
    for i, (u, v) in enumerate(zip(before, after, strict=True)):
        assert torch.equal(u, v), f"tensor {i}"
    assert not torch.equal(before[0], run(xw.clone())[0]), "b_ih must matter here"


# ------------------------------------------------------------------ cp.async stage copies
@pytest.mark.parametrize("mode,dt", [("LSTM", "bf16"), ("GRU", "tf32"), ("RNN_RELU", "fp32"),
                                     ("RNN_TANH", "fp16")])
def test_stage_copy_modes_move_the_same_bytes(install, monkeypatch, mode, dt):
    """FUSED_RNN_CUDA_STAGE_COPY: ``registers`` and ``async`` (cp.async, one buffer) give the
    same bits; ``pipelined`` (the default: two half-width buffers) multiplies narrower slices,
    so only the order of fp32 K sums differs. X staged whole and in several slices; cudasim
    completes a cp.async only when its group is waited for, so an early read would see NaN."""
    for stage_k in ("auto", "32"):
        monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", stage_k)
        runs = {}
        for setting in ("registers", "async", "pipelined"):
            monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_COPY", setting)
            install(sms=4, order="shuffle", seed=3)
            runs[setting] = _layer(mode, dt, B=70, T=3)
        close = 1e-5 if dt in ("fp32", "tf32") else 1e-2
        for i, (r, a, p) in enumerate(zip(runs["registers"], runs["async"], runs["pipelined"])):
            assert torch.equal(r, a), (stage_k, i)
            assert rel(p, a) <= close, (stage_k, i, rel(p, a))
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_COPY", "yes")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_STAGE_COPY must be one of auto, "):
        _layer(mode, dt)


# ------------------------------------------------------------------ the tagged exchange
@pytest.mark.parametrize("mode,dt", [("LSTM", "bf16"), ("GRU", "fp16"), ("RNN_TANH", "bf16"),
                                     ("RNN_RELU", "fp16")])
@pytest.mark.parametrize("order", ["shuffle", "descending"])
def test_tagged_exchange_gives_the_registers_copy_bits(install, monkeypatch, mode, dt, order):
    """FUSED_RNN_CUDA_STAGE_COPY=tagged: no step barrier, h and the dgates travel as words
    tagged with their step, and every stage copy polls them. It copies the same slices as
    ``registers``, so every output and gradient is the same bits, staged whole and in slices,
    over 4 blocks. cudasim wakes a polling reader only when no thread can run (as late as a GPU
    could), so a word read too early, or overwritten too soon, would change the results or
    deadlock. The launches took the tagged exchange (no fallback), forward and backward."""
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "1")
    for stage_k in ("auto", "32"):
        monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", stage_k)
        runs = {}
        for setting in ("registers", "tagged"):
            monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_COPY", setting)
            sim = install(sms=4, order=order, seed=5)
            runs[setting] = _layer(mode, dt, B=40, T=3)
            assert [(d, pl["stage_copy"]) for d, _, pl in sim.launches] == [
                ("forward", simulate.STAGE_COPIES[setting]),
                ("backward", simulate.STAGE_COPIES[setting])], (stage_k, setting)
        for i, (r, t) in enumerate(zip(runs["registers"], runs["tagged"], strict=True)):
            assert torch.equal(r, t), (stage_k, i)


def test_stage_copy_rules_send_matching_layers_to_the_tagged_exchange(install, monkeypatch):
    """FUSED_RNN_CUDA_STAGE_COPY=auto (the default) launches the tagged exchange exactly where a
    StageCopyRule matches the layer call (cell, dtype, batch, hidden size, chunk length,
    cudasim's compute capability 9.0), forward and backward, and the pipelined copy elsewhere;
    the tagged launches give what the setting gives, bit for bit."""
    from fused_rnn.ops.cuda.ops import StageCopyRule

    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "1")
    monkeypatch.delenv("FUSED_RNN_CUDA_STAGE_COPY", raising=False)

    def copies(mode, dt, B, T=3):
        sim = install(sms=4, order="shuffle", seed=5)
        out = _layer(mode, dt, B=B, T=T)
        return [pl["stage_copy"] for _, _, pl in sim.launches], out

    tagged, pipelined = simulate.STAGE_COPIES["tagged"], simulate.STAGE_COPIES["pipelined"]
    assert ops.STAGE_COPY_RULES == () and copies("GRU", "bf16", 40)[0] == [pipelined] * 2
    monkeypatch.setattr(ops, "STAGE_COPY_RULES", (StageCopyRule(
        modes=frozenset({"GRU"}), dtypes=frozenset({torch.bfloat16}), batch=(30, 50),
        hidden=(37, 37), steps=(3, 8), capability=(9, 0), evidence="a test"),))
    got, ruled = copies("GRU", "bf16", 40)
    assert got == [tagged] * 2
    for mode, dt, B, T in (("GRU", "bf16", 20, 3), ("GRU", "bf16", 40, 2), ("GRU", "fp16", 40, 3),
                           ("LSTM", "bf16", 40, 3), ("GRU", "fp32", 40, 3)):
        assert copies(mode, dt, B, T)[0] == [pipelined] * 2, (mode, dt, B, T)
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_COPY", "tagged")
    got, forced = copies("GRU", "bf16", 40)
    assert got == [tagged] * 2
    for i, (a, b) in enumerate(zip(ruled, forced, strict=True)):
        assert torch.equal(a, b), i


def test_pipelined_copy_without_its_waits(install, monkeypatch, tmp_path):
    """Mutants of the pipelined copy: without the wait for slice s the matmul reads a slice that
    has not landed (the results change); without the last wait the copies are never retired
    and the launch fails naming the thread."""
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", "32")
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "1")
    csrc = _mutant(tmp_path / "a", "rnn_common.cuh", "          cp_async_wait<1>();", "")
    assert _differs_from_clean(install, csrc, B=70, T=3), "missing wait<1> went unnoticed"
    csrc = _mutant(tmp_path / "b", "rnn_common.cuh", """        } else {
          cp_async_wait<0>();
        }""", """        }""")
    install(sms=4, csrc=csrc)
    with pytest.raises(RuntimeError, match="cp.async copies never waited for"):
        _layer("GRU", "bf16", B=70, T=3)


# -------------------------------------------------------------------- k-blocked TF32 slices
@pytest.mark.parametrize("stage_k", ["auto", "16"])
@pytest.mark.parametrize("mode", MODES)
def test_tf32_tiles_past_an_8_row_slice_change_nothing(install, monkeypatch, mode, stage_k):
    """TF32 keeps the W slice k-blocked (plan.h) with rows padded to 8, not 16: the last tile of
    an 8-mod-16-row slice reads the next k-block's first rows (or the zero tail) as its rows
    8..15. Those reach only output rows the epilogue never reads. H=16 on 2 SMs gives such
    slices in every cell (asserted); the results must match the float64 reference as TF32
    allows, with X read whole or in 16-column stage slices (k0 > 0 offsets into the blocks)."""
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", stage_k)
    sim = install(sms=2)
    H = 16
    ours = _layer(mode, "tf32", H=H, B=5, T=4)
    aliased = [d for d, _, pl in sim.launches if pl["m_pad"] % 16 == 8]
    assert aliased, "no 8-mod-16-row TF32 slice was exercised"
    assert all(math == 1 for math in (pl["math"] for _, _, pl in sim.launches))
    leaves, lens, cots = layer_inputs(mode, 4, 5, 5, H, 0, True)
    exact = run_layer(reference.rnn_layer, mode, leaves, torch.float64, lens, True, cots, "cpu")
    n_out = 3 if mode == "LSTM" else 2
    for i, (a, e) in enumerate(zip(ours, exact)):
        assert torch.isfinite(a).all(), i
        # TF32 operands (10-bit mantissa); relu' flips where a pre-activation rounds across 0.
        floor = 5e-3 if i < n_out else (0.15 if mode == "RNN_RELU" else 1e-2)
        assert rel(a, e) <= floor, (i, rel(a, e), aliased)


# --------------------------------------------------------------------------- phase timing
@pytest.mark.parametrize("stage_k,parts", [("auto", "1"), ("0", "1"), ("auto", "2")])
@pytest.mark.parametrize("mode,dt", [("LSTM", "bf16"), ("GRU", "fp32"), ("RNN_TANH", "tf32")])
def test_phase_timing_records_every_block_and_changes_nothing(install, monkeypatch, mode, dt,
                                                              stage_k, parts):
    """profile.recording(): every launch gets a buffer that each block's thread 0 fills
    (phases adding up to the total, as many steps as the kernel ran, stage copies only when
    staged, the partial-sum sync only with K parts), and the results are bit for bit those of
    an unrecorded run."""
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", stage_k)
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "1")  # two batch chunks per block
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", parts)
    H = 60 if parts != "1" else 37  # 4 unit slices for every cell (teams of 2)
    sim = install(sms=4)
    plain = _layer(mode, dt, B=70, T=3, H=H)
    with profile.recording() as launches:
        timed = _layer(mode, dt, B=70, T=3, H=H)
    for i, (a, b) in enumerate(zip(plain, timed)):
        assert torch.equal(a, b), f"tensor {i} changed under recording"
    assert [ln.direction for ln in launches] == ["forward", "backward"]
    plans = {d: pl for d, _, pl in sim.launches}
    for launch in launches:
        row = profile.summarize(launch)  # asserts that the phases add up to the total
        blocks = plans[launch.direction]["blocks"]
        assert row["blocks"] == blocks > 1
        assert row["steps"] == (3 if launch.direction == "forward" else 4)
        assert row["mma_us"] > 0 and row["epilogue_us"] > 0 and row["sync_us"] > 0
        # the own spans lie inside their phases (cudasim's clock counts clock reads: the
        # phase's span holds the own span's reads and more)
        assert 0 < row["mma_own_us"] < row["mma_us"], row
        assert 0 < row["epilogue_own_us"] < row["epilogue_us"], row
        assert row["load_us"] > 0
        assert (row["copy_us"] > 0) == (plans[launch.direction]["stage_k"] > 0)
        assert (plans[launch.direction]["stage_k"] > 0) == (stage_k == "auto")
        assert plans[launch.direction]["parts"] == int(parts)
        assert (row["parts_us"] > 0) == (parts != "1")
        rows_used = (launch.prof[:, len(profile.PHASES)] > 0).sum()
        assert rows_used == blocks and not launch.prof[blocks:].any(), "only the grid writes"


def test_profile_script_on_cudasim(tmp_path):
    """benchmarks/profile_cuda.py --sim: a forward and a backward row per configuration, and
    the table written where asked; --variants adds rows timed under a bench variant's
    settings, named in the run column."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_cuda.py"), "--sim", "--modes", "GRU",
         "--shapes", "D1,D3", "--dtypes", "fp32", "--out-dir", str(tmp_path),
         "--variants", "cuda-cl8", "--variant-shapes", "D1"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (md,) = tmp_path.glob("*-cpu-sim-phases.md")
    rows = [line for line in md.read_text().splitlines() if line.startswith("| GRU |")]
    assert [row.split(" | ")[3] for row in rows] == ["fwd", "bwd", "fwd", "bwd", "fwd", "bwd"]
    assert [row.split(" | ")[-1].rstrip(" |") for row in rows] == ["cuda"] * 4 + ["cuda-cl8"] * 2
    assert "mean nothing" in md.read_text() and "Failed" not in md.read_text()


def test_profile_script_time_budget_still_writes_the_table(tmp_path):
    """--time-budget 0: no configuration starts, the table says which were skipped, and the
    exit status is 1 (gpu_check_cuda.sh passes a budget inside its step's timeout)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_cuda.py"), "--sim", "--modes", "GRU",
         "--shapes", "D1", "--dtypes", "fp32,bf16", "--out-dir", str(tmp_path),
         "--time-budget", "0"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    (md,) = tmp_path.glob("*-cpu-sim-phases.md")
    assert "Skipped after the time budget (0 s): GRU-D1-fp32, GRU-D1-bf16" in md.read_text()


def test_phase_timing_is_off_outside_recording(install):
    install(sms=4)
    assert profile.buffer("forward", "GRU", torch.float32, 1, 1, 1, torch.device("cpu")) is None
    with profile.recording() as outer:
        with profile.recording() as inner:
            _layer("GRU", "fp32", T=2)
        assert len(inner) == 2 and outer == []
    assert profile._active == []
    assert profile.buffer("forward", "GRU", torch.float32, 1, 1, 1, torch.device("cpu")) is None


def test_recordings_closed_out_of_order_each_collect_their_own(install):
    """Two threads' recordings interleave: A opens, B opens, A closes, B closes. B records
    its launch after A closed, and afterwards nothing records (a block that restored "the
    previous" recording left A's switched on for good, every later launch instrumented)."""
    install(sms=4)
    a, b = profile.recording(), profile.recording()
    got_a = a.__enter__()
    got_b = b.__enter__()
    a.__exit__(None, None, None)
    _layer("GRU", "fp32", T=2)
    b.__exit__(None, None, None)
    assert got_a == [] and len(got_b) == 2
    assert profile._active == []
    assert profile.buffer("forward", "GRU", torch.float32, 1, 1, 1, torch.device("cpu")) is None


# ------------------------------------------------------------------------------ batch groups
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_batch_groups_split_the_batch_not_the_math(install, monkeypatch, mode):
    """B=70 (padded to 96) on 4 SMs: by default 3 groups of 32 rows, each block owning all 37
    units; with FUSED_RNN_CUDA_MAX_GROUPS=1, 4 blocks of 10 units over both chunks. Same
    results up to the order of fp32 sums (the K split differs)."""
    results = {}
    for groups in ("1", "8"):
        monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", groups)
        sim = install(sms=4)
        results[groups] = _layer(mode, "fp32", B=70, T=3)
        results[groups + "-plans"] = {(d, pl["groups"], pl["blocks"]) for d, _, pl in sim.launches}
    assert results["1-plans"] == {("forward", 1, 4), ("backward", 1, 4)}
    assert results["8-plans"] == {("forward", 3, 3), ("backward", 3, 3)}
    _assert_same_up_to_sum_order(results["1"], results["8"], "fp32", "groups")



def test_groups_give_way_to_a_stage(install, monkeypatch):
    """plan.h select_plan on a device with 48 KB of shared memory a block: GRU bf16 (H=37, B=70
    padded to 96, 4 SMs) forward, with 3 batch groups, would hold all of W_hh in every block
    and leave no room for a stage; it runs 1 group with all of K staged instead (the backward
    stages with 3 groups and keeps them). With FUSED_RNN_CUDA_STAGE_K=0 (no stage wanted) the
    most groups run, as before. The plans are the mirror's (plan.py choose_launch), and both
    give the same results up to the order of the fp32 K sums."""
    results, plans = {}, {}
    for stage_k in ("auto", "0"):
        monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", stage_k)
        sim = install(sms=4, smem_optin=48 * 1024, smem_per_sm=49 * 1024)
        results[stage_k] = _layer("GRU", "bf16", B=70, T=3, H=37)
        plans[stage_k] = {d: (pl["groups"], pl["stage_k"]) for d, _, pl in sim.launches}
        for d, _, pl in sim.launches:
            _, want = P.choose_launch(1, True, False, 37, d == "backward", 4, 48 * 1024, 96, 8,
                                      ops.max_stage_k(), 0, 0, 0, False, True)
            assert (pl["groups"], pl["stage_k"], pl["parts"]) == (
                want.groups, want.stage_k, want.parts), (stage_k, d)
    assert plans["auto"] == {"forward": (1, 48), "backward": (3, 112)}, plans
    assert plans["0"] == {"forward": (3, 0), "backward": (3, 0)}, plans
    _assert_same_up_to_sum_order(results["auto"], results["0"], "bf16", "stage over groups")


def test_max_groups_setting_is_checked(install, monkeypatch):
    install(sms=4)
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "0")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_MAX_GROUPS must be an integer >= 1"):
        _layer("GRU", "fp32")


# ------------------------------------------------------------------------------- grid cap
@pytest.mark.parametrize("mode,dt", [("LSTM", "bf16"), ("GRU", "tf32"), ("RNN_TANH", "fp32")])
def test_max_blocks_caps_the_grid_not_the_math(install, monkeypatch, mode, dt):
    """FUSED_RNN_CUDA_MAX_BLOCKS: H=60 on 8 SMs spreads over 8 blocks of 8 units by default;
    capped at 2 or 3 the same launch runs on that many blocks of 20-32 units (fewer K splits
    per warp). Same results up to the order of fp32 sums."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dt == "tf32")
    runs, blocks = {}, {}
    for cap in ("auto", "2", "3"):
        monkeypatch.setenv("FUSED_RNN_CUDA_MAX_BLOCKS", cap)
        sim = install(sms=8)
        runs[cap] = _layer(mode, dt, B=5, T=3, H=60)
        blocks[cap] = {(d, pl["blocks"]) for d, _, pl in sim.launches}
    assert blocks["2"] == {("forward", 2), ("backward", 2)}
    assert blocks["3"] == {("forward", 3), ("backward", 3)}
    assert all(n > 3 for _, n in blocks["auto"]), blocks["auto"]
    for cap in ("2", "3"):
        _assert_same_up_to_sum_order(runs["auto"], runs[cap], dt, f"cap {cap}")


def test_max_blocks_cap_rises_to_what_fits_and_is_checked(install, monkeypatch):
    """A cap the W_hh slices cannot fit under takes the fewest blocks that fit, with the
    uncapped math (TF32 stays TF32); bad values are refused."""
    sim = install(sms=132)
    full = sim.plan(0, torch.float32, True, 1024, False, batch=64, max_groups=8)
    capped = sim.plan(0, torch.float32, True, 1024, False, batch=64, max_groups=8, max_blocks=1)
    assert full["math"] == capped["math"] == P.MATHS["tf32"]
    assert full["blocks"] == 128 and 1 < capped["blocks"] < 128
    assert capped["smem_bytes"] <= 227 * 1024
    fewer = sim.plan(0, torch.float32, True, 1024, False, batch=64, max_groups=8,
                     max_blocks=capped["blocks"] - 1)
    assert fewer["blocks"] == capped["blocks"]
    for bad in ("0", "-1", "many"):
        monkeypatch.setenv("FUSED_RNN_CUDA_MAX_BLOCKS", bad)
        with pytest.raises(ValueError,
                           match="FUSED_RNN_CUDA_MAX_BLOCKS must be 'auto' or an integer >= 1"):
            _layer("GRU", "fp32")


# ---------------------------------------------------------------------------- cluster mode
# (MAX_GROUPS, K_PARTS, B, H, cluster size): on 8 SMs each gives the grid plan itself in cluster
# mode, so the results must be the same bits. "groups3": B=70 as three batch groups of two
# blocks (30 units each); "groups2-parts2": B=40 as two groups of four blocks in teams of two
# that split K (the parts' barrier is then the cluster's too).
CLUSTERS = {"groups3": ("8", "1", 70, 60, 2), "groups2-parts2": ("8", "2", 40, 60, 4)}


@pytest.mark.parametrize("case", list(CLUSTERS))
@pytest.mark.parametrize("mode,dt", [("LSTM", "bf16"), ("GRU", "tf32"), ("RNN_RELU", "fp32")])
def test_cluster_mode_gives_the_grid_plans_bits(install, monkeypatch, mode, dt, case):
    """FUSED_RNN_CUDA_CLUSTER: each batch group runs as one cluster whose steps end at the
    cluster barrier, and cudasim lets a cluster run to its end before the next starts (a read
    across groups, or a grid.sync left in, would change the bits or fail the launch). Four
    thread and cluster orders, cp.async early and late, against the cooperative grid."""
    groups, parts, B, H, size = CLUSTERS[case]
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", groups)
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", parts)
    monkeypatch.delenv("FUSED_RNN_CUDA_CLUSTER", raising=False)
    sim = install(sms=8)
    grid = _layer(mode, dt, B=B, T=3, H=H)
    grid_plans = [pl for _, _, pl in sim.launches]
    assert all(pl["cluster"] == 0 for pl in grid_plans)
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER", str(size))
    for order, seed, cp_async in (("ascending", 0, "late"), ("descending", 0, "early"),
                                  ("shuffle", 1, "late"), ("shuffle", 2, "early")):
        sim = install(sms=8, order=order, seed=seed, cp_async=cp_async)
        before = sim.cluster_launches()
        run = _layer(mode, dt, B=B, T=3, H=H)
        assert sim.cluster_launches() - before == 2  # forward and backward ran as clusters
        plans = [pl for _, _, pl in sim.launches]
        assert all(pl["cluster"] == 1 and pl["group_blocks"] <= size for pl in plans)
        assert [{**pl, "cluster": 0} for pl in plans] == grid_plans
        for i, (a, b) in enumerate(zip(grid, run, strict=True)):
            assert torch.equal(a, b), f"{order}/{cp_async}: tensor {i} differs from the grid's"


@pytest.mark.parametrize("mode,dt", [("LSTM", "tf32"), ("GRU", "bf16")])
def test_team_clusters_give_the_grid_plans_bits(install, monkeypatch, mode, dt):
    """FUSED_RNN_CUDA_TEAM_CLUSTERS=on: K-parts teams of 2 (H=60, B=40: two batch groups of four
    blocks) as clusters of a cooperative grid; the partial sums meet at the team's barrier,
    each step still ends at grid.sync(). Same plan, same bits as the plain grid, in four
    orders; forward and backward both ran with clusters."""
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", "2")
    monkeypatch.delenv("FUSED_RNN_CUDA_TEAM_CLUSTERS", raising=False)
    install(sms=8)
    grid = _layer(mode, dt, B=40, T=3, H=60)
    monkeypatch.setenv("FUSED_RNN_CUDA_TEAM_CLUSTERS", "on")
    for order, seed, cp_async in (("ascending", 0, "late"), ("descending", 0, "early"),
                                  ("shuffle", 1, "late"), ("shuffle", 2, "early")):
        sim = install(sms=8, order=order, seed=seed, cp_async=cp_async)
        before = sim.cluster_launches()
        run = _layer(mode, dt, B=40, T=3, H=60)
        assert sim.cluster_launches() - before == 2
        assert [(pl["cluster"], pl["parts"]) for _, _, pl in sim.launches] == [(2, 2), (2, 2)]
        for i, (a, b) in enumerate(zip(grid, run, strict=True)):
            assert torch.equal(a, b), f"{order}/{cp_async}: tensor {i} differs from the grid's"
    # without K parts there is no team: the plain grid runs
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", "1")
    sim = install(sms=8)
    _layer(mode, dt, B=40, T=3, H=60)
    assert {pl["cluster"] for _, _, pl in sim.launches} == {0}
    monkeypatch.setenv("FUSED_RNN_CUDA_TEAM_CLUSTERS", "yes")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_TEAM_CLUSTERS must be 'off' or 'on'"):
        _layer(mode, dt)


# (MAX_GROUPS, B, H, cluster size, the plan's groups): "groups3": B=70 as three batch groups
# (clusters) of two blocks; "one-cluster": B=40 as one group of all 8 blocks (8 peers).
DSMEM_CASES = {"groups3": ("8", 70, 60, 2, 3), "one-cluster": ("1", 40, 60, 8, 1)}


@pytest.mark.parametrize("case", list(DSMEM_CASES))
@pytest.mark.parametrize("mode,dt", [("LSTM", "bf16"), ("GRU", "tf32"), ("RNN_RELU", "fp32")])
def test_dsmem_exchange_gives_the_global_exchanges_bits(install, monkeypatch, mode, dt, case):
    """FUSED_RNN_CUDA_CLUSTER_EXCHANGE=dsmem: the same plan as cluster mode without staging
    or K parts (FUSED_RNN_CUDA_STAGE_K=0, FUSED_RNN_CUDA_K_PARTS=1), its exchange in the
    blocks' shared memory instead of global memory: the same bits, forward (h_n included) and
    backward, with lengths and in reverse, in three thread and cluster orders."""
    groups, B, H, size, want_groups = DSMEM_CASES[case]
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", groups)
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER", str(size))
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", "0")
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", "1")
    monkeypatch.delenv("FUSED_RNN_CUDA_CLUSTER_EXCHANGE", raising=False)
    sim = install(sms=8)
    base = _layer(mode, dt, B=B, T=3, H=H)
    base_plans = [pl for _, _, pl in sim.launches]
    assert [(pl["cluster"], pl["groups"]) for pl in base_plans] == [(1, want_groups)] * 2
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER_EXCHANGE", "dsmem")
    monkeypatch.setenv("FUSED_RNN_CUDA_STAGE_K", "auto")  # dsmem plans never stage
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", "auto")  # ... nor split K
    for order, seed in (("ascending", 0), ("descending", 0), ("shuffle", 1)):
        sim = install(sms=8, order=order, seed=seed)
        before = sim.cluster_launches()
        run = _layer(mode, dt, B=B, T=3, H=H)
        assert sim.cluster_launches() - before == 2
        plans = [pl for _, _, pl in sim.launches]
        assert [pl["cluster"] for pl in plans] == [3, 3]
        for pl, bp in zip(plans, base_plans):
            assert pl["smem_bytes"] > bp["smem_bytes"]  # the two mirrors
            assert {**pl, "cluster": 1, "smem_bytes": 0} == {**bp, "smem_bytes": 0}
        for i, (a, b) in enumerate(zip(base, run, strict=True)):
            assert torch.equal(a, b), f"{order}: tensor {i} differs from the global exchange's"
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER_EXCHANGE", "l2")
    with pytest.raises(ValueError, match="FUSED_RNN_CUDA_CLUSTER_EXCHANGE must be 'global' or"):
        _layer(mode, dt)


def test_dsmem_needs_cluster_mode_and_room(install, monkeypatch):
    """Without FUSED_RNN_CUDA_CLUSTER the setting changes nothing; where the mirrors do not
    fit next to the W slice, cluster mode exchanges through global memory."""
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER_EXCHANGE", "dsmem")
    sim = install(sms=8)
    assert sim.plan(0, torch.bfloat16, False, 60, False, batch=40, dsmem=True)["cluster"] == 0
    assert sim.plan(0, torch.bfloat16, False, 60, False, batch=40, cluster=8,
                    dsmem=True)["cluster"] == 3
    # one byte short of room for the mirrors: the global exchange (with its stage)
    need = sim.plan(0, torch.bfloat16, False, 60, False, batch=40, cluster=8,
                    dsmem=True)["smem_bytes"]
    sim = install(sms=8, smem_optin=need - 1)
    plan = sim.plan(0, torch.bfloat16, False, 60, False, batch=40, cluster=8, dsmem=True)
    assert plan["cluster"] == 1 and plan["stage_k"] > 0


def test_cluster_mode_falls_back_to_the_grid(install, monkeypatch):
    """Where the device cannot hold every cluster at once, the same plan runs as one cooperative
    grid (same bits); where no group fits in a cluster of the size asked, the grid plan runs;
    bad values are refused."""
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "8")
    monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER", "2")
    sim = install(sms=8)
    want = _layer("GRU", "fp32", B=70, T=3, H=60)
    sim = install(sms=8, max_clusters=2)  # three groups: one cluster too many
    before = sim.cluster_launches()
    got = _layer("GRU", "fp32", B=70, T=3, H=60)
    assert sim.cluster_launches() == before
    assert all(pl["cluster"] == 1 for _, _, pl in sim.launches)  # chosen, then not launched
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    # LSTM TF32 at H=200 needs all 8 SMs' shared memory (fewer blocks would mean FMA)
    for size, clustered in ((1, 0), (4, 0), (8, 1)):
        plan = sim.plan(0, torch.float32, True, 200, False, batch=8, cluster=size)
        assert (plan["cluster"], plan["blocks"], plan["math"]) == (clustered, 8, P.MATHS["tf32"])
    for bad in ("0", "17", "on"):
        monkeypatch.setenv("FUSED_RNN_CUDA_CLUSTER", bad)
        with pytest.raises(ValueError,
                           match="FUSED_RNN_CUDA_CLUSTER must be 'off' or an integer 1..16"):
            _layer("GRU", "fp32")


# (the settings, B, H) of one launch per cluster mode: batch groups, teams, the DSMEM exchange
NO_SM90_CASES = {
    "groups": ({"FUSED_RNN_CUDA_MAX_GROUPS": "8", "FUSED_RNN_CUDA_CLUSTER": "2"}, 70, 60),
    "teams": ({"FUSED_RNN_CUDA_K_PARTS": "2", "FUSED_RNN_CUDA_TEAM_CLUSTERS": "on"}, 40, 60),
    "dsmem": ({"FUSED_RNN_CUDA_MAX_GROUPS": "1", "FUSED_RNN_CUDA_CLUSTER": "8",
               "FUSED_RNN_CUDA_CLUSTER_EXCHANGE": "dsmem"}, 40, 60),
}


@pytest.mark.parametrize("case", list(NO_SM90_CASES))
def test_a_build_without_sm90_code_runs_the_grid(install, monkeypatch, case):
    """An extension built without sm_90 code (TORCH_CUDA_ARCH_LIST="8.0+PTX") runs on an H100 as
    compute_80 PTX, where csrc's cluster branches are __trap() (cudasim fails any cluster
    instruction when the kernels report ptxVersion < 90). Cluster settings then run the same
    plan as the plain grid, with the same bits, and no launch uses clusters."""
    env, B, H = NO_SM90_CASES[case]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    sim = install(sms=8)
    before = sim.cluster_launches()
    clustered = _layer("LSTM", "bf16", B=B, T=3, H=H)
    assert sim.cluster_launches() - before == 2  # the device takes these clusters
    plans = [pl for _, _, pl in sim.launches]
    sim = install(sms=8, ptx_version=80)
    before = sim.cluster_launches()
    got = _layer("LSTM", "bf16", B=B, T=3, H=H)
    assert sim.cluster_launches() == before
    assert [pl for _, _, pl in sim.launches] == plans  # chosen, then run as the grid
    for i, (a, b) in enumerate(zip(clustered, got, strict=True)):
        assert torch.equal(a, b), f"tensor {i} differs from the clustered launch's"


# Calls a GPU may refuse although the queries before them said yes (sim_api.h Refuse), each
# with (the settings, B, H) that reach it and the line of rnn_common.cuh that clears its error.
REFUSALS = {
    "cluster-launch": (4, NO_SM90_CASES["groups"],
                       "    return cudaSuccess;\n  }\n  *launched = true;"),
    "cluster-occupancy": (2, NO_SM90_CASES["groups"],
                          "    return cudaSuccess;\n  }\n  if (clusters < needed)"),
    "non-portable-size": (1, ({"FUSED_RNN_CUDA_MAX_GROUPS": "1", "FUSED_RNN_CUDA_CLUSTER": "16"},
                              40, 60), "    return cudaSuccess;\n  }\n  cudaLaunchAttribute"),
}


@pytest.mark.parametrize("refused", list(REFUSALS))
def test_a_refused_cluster_launch_runs_the_grid_and_leaves_no_error(install, monkeypatch,
                                                                    tmp_path, refused):
    """launch_clusters' refusal paths, which a GPU takes where another process holds SMs (or
    has no non-portable cluster sizes) and cudasim took never: the plan runs as the plain grid,
    same bits, and the refusal's error, which the runtime also leaves pending in
    cudaGetLastError, is cleared. Left pending, torch's next launch check raises it on a GPU
    from another operation; sim_api's entry points report it (a mutant without the clear)."""
    calls, (env, B, H), site = REFUSALS[refused]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    sms = 16 if refused == "non-portable-size" else 8
    sims = [install(sms=sms)]
    before = sims[0].cluster_launches()
    clustered = _layer("LSTM", "bf16", B=B, T=3, H=H)
    assert sims[0].cluster_launches() - before == 2  # the device takes these clusters
    plans = [pl for _, _, pl in sims[0].launches]
    old = "    (void)cudaGetLastError();\n" + site
    csrc = _mutant(tmp_path, "rnn_common.cuh", old, site)
    try:
        sims[0].lib.sim_refuse(calls)
        got = _layer("LSTM", "bf16", B=B, T=3, H=H)
        assert sims[0].cluster_launches() == before + 2
        assert [pl for _, _, pl in sims[0].launches[2:]] == plans  # chosen, run as the grid
        for i, (a, b) in enumerate(zip(clustered, got, strict=True)):
            assert torch.equal(a, b), f"tensor {i} differs from the clustered launch's"
        sims.append(install(sms=sms, csrc=csrc))
        sims[1].lib.sim_refuse(calls)
        with pytest.raises(RuntimeError, match="left pending in cudaGetLastError"):
            _layer("LSTM", "bf16", B=B, T=3, H=H)
    finally:
        for sim in sims:
            sim.lib.sim_refuse(0)


def test_occupancy_is_asked_after_the_shared_memory_limit_is_raised(install, tmp_path):
    """CUDA's occupancy calculator counts no block that needs more dynamic shared memory than
    the kernel's MaxDynamicSharedMemorySize (48 KiB until allow_optin_smem raises it), and
    cudasim's follows it: launch_cooperative asked before raising it reads a plan over 48 KiB
    as not co-resident and refuses it (cudasim used to answer by the SM's memory alone)."""
    sim = install(sms=2)
    assert sim.plan(0, torch.float32, False, 48, False)["smem_bytes"] > 48 * 1024
    assert all(torch.isfinite(t).all() for t in _layer("LSTM", "fp32", H=48))
    raise_limit = "  FRNN_CUDA_TRY(allow_optin_smem(reinterpret_cast<const void*>(kernel)));\n"
    query = ("  FRNN_CUDA_TRY(\n      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, "
             "kernel, kThreads, p.plan.smem_bytes));\n")
    install(sms=2, csrc=_mutant(tmp_path, "rnn_common.cuh", raise_limit + query,
                                query + raise_limit))
    with pytest.raises(RuntimeError, match="cudaErrorCooperativeLaunchTooLarge"):
        _layer("LSTM", "fp32", H=48)


# --------------------------------------------------------------------------------- K parts
@pytest.mark.parametrize("mode,dt", [("LSTM", "tf32"), ("GRU", "bf16"), ("RNN_RELU", "fp32")])
def test_k_parts_split_k_not_the_math(install, monkeypatch, mode, dt):
    """FUSED_RNN_CUDA_K_PARTS: 8 SMs, H=60, B=40 (two batch groups of 4 blocks, the last block of
    each owning 12 of its 16 units): without parts, in teams of 2 and of 4 blocks that split K
    and add their partial sums. Same results up to the order of fp32 sums."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dt == "tf32")
    runs = {}
    for parts in ("1", "2", "4"):
        monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", parts)
        sim = install(sms=8)
        runs[parts] = _layer(mode, dt, B=40, T=3, H=60)
        plans = {(d, pl["groups"], pl["blocks"], pl["parts"]) for d, _, pl in sim.launches}
        assert plans == {("forward", 2, 8, int(parts)), ("backward", 2, 8, int(parts))}, plans
    for parts in ("2", "4"):
        _assert_same_up_to_sum_order(runs["1"], runs[parts], dt, f"parts {parts}")


def test_k_parts_auto_and_setting(install, monkeypatch):
    """auto keeps small launches whole (the extra grid sync would cost more than the reads it
    saves) and splits S4's fp32 LSTM backward 8 ways (by plan.h's byte model); a count that the
    unit slices do not divide falls back to the largest power of two that does, and no count
    goes past 8; bad values are refused."""
    monkeypatch.delenv("FUSED_RNN_CUDA_K_PARTS", raising=False)
    sim = install(sms=4)
    _layer("LSTM", "bf16")
    assert {pl["parts"] for _, _, pl in sim.launches} == {1}
    sim = install(sms=132)
    plan = sim.plan(0, torch.float32, True, 1024, True, batch=256, max_groups=8, k_parts=0)
    assert (plan["parts"], plan["k_part"], plan["m_rows"]) == (8, 512, 64)
    plan = sim.plan(0, torch.float32, True, 1024, True, batch=256, max_groups=8, k_parts=64)
    assert plan["parts"] == 8  # kMaxParts: the kernels add at most 8 partials
    monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", "3")  # 4 unit slices: teams of 2
    sim = install(sms=4)
    _layer("LSTM", "bf16", H=60)
    assert {pl["parts"] for _, _, pl in sim.launches} == {2}
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", bad)
        with pytest.raises(ValueError,
                           match="FUSED_RNN_CUDA_K_PARTS must be 'auto' or an integer >= 1"):
            _layer("GRU", "fp32")


@pytest.mark.parametrize("dt", ["tf32", "bf16"])
def test_k_parts_in_teams_of_8_over_four_batch_chunks(install, monkeypatch, dt):
    """S4's structure at a size cudasim can run: B=256 (four 64-row chunks per block, no batch
    groups), 16 blocks in two teams of 8 (the most parts there are), X staged. LSTM against
    the same launch without parts, up to the order of fp32 sums."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dt == "tf32")
    monkeypatch.setenv("FUSED_RNN_CUDA_MAX_GROUPS", "1")
    runs = {}
    for parts in ("1", "8"):
        monkeypatch.setenv("FUSED_RNN_CUDA_K_PARTS", parts)
        sim = install(sms=16)
        runs[parts] = _layer("LSTM", dt, B=256, T=2, I=8, H=128, lengths=False)
        assert [(d, pl["blocks"], pl["parts"], pl["stage_k"] > 0) for d, _, pl in sim.launches] \
            == [("forward", 16, int(parts), True), ("backward", 16, int(parts), True)]
    _assert_same_up_to_sum_order(runs["1"], runs["8"], dt, "parts 8")
