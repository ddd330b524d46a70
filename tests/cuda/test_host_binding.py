"""``csrc/binding.cpp`` itself on the CPU (``host_binding.py``): it gives the bits of its
mirror, ``simulate.Simulator``, on which the accuracy and fuzz sweeps and ``test_cuda_sim.py``
rely; it leaves its inputs alone; its backstop refuses a device too small for the plan; its
per-step path falls back as it says where torch refuses its 16-bit GEMM; its device queries
answer for the simulated device.

``test_cuda_gpu.py`` runs behind the host build by default (``FUSED_RNN_CUDA_SIM=binding``), its
binding refusals included, and ``test_cuda_sim.py``'s AddressSanitizer run does so with the
binding itself instrumented.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import simulate
import torch

host_binding = pytest.importorskip("host_binding")
REASON = host_binding.unavailable_reason()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"no host build: {REASON}"),
    # the per-step path's fallback on the CPU (its own test below counts it)
    pytest.mark.filterwarnings("ignore:fused_rnn CUDA backend. torch refused the per-step path"),
]

HERE = Path(__file__).resolve().parent
CELLS = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (name, B, H, launch settings): plain; lengths and reverse; batch groups; K parts in teams of 2
# with an uneven last part (H=44 on 8 blocks); groups as clusters, with the exchange in DSMEM;
# the epilogue's one-point batches, generic fragment loads and single tiles; the register stage
# copy over 16-column slices; the tagged exchange (its word buffers in 16 bits, the registers
# copy it falls back to in fp32), with groups as clusters, and with K parts (a fallback too).
SETTINGS = [
    ("plain", 3, 20, {}),
    ("lengths-rev", 3, 20, {"lengths": True, "reverse": True}),
    ("groups3", 70, 20, {"max_groups": 3}),
    ("parts2", 3, 44, {"k_parts": 2, "max_blocks": 8}),
    ("cluster8", 70, 20, {"max_groups": 3, "cluster": 8}),
    ("dsmem", 70, 20, {"max_groups": 3, "cluster": 8, "dsmem": True}),
    ("pb1-generic-tb1", 3, 20, {"point_batch": 1, "frag_loads": 1, "tile_block": 1}),
    ("regcopy-k16", 3, 37, {"stage_copy": 0, "max_stage_k": 16}),
    ("tagged", 3, 37, {"stage_copy": 3, "lengths": True}),
    ("tagged-cluster8", 70, 20, {"max_groups": 3, "cluster": 8, "stage_copy": 3}),
    ("tagged-parts2", 3, 44, {"stage_copy": 3, "k_parts": 2, "max_blocks": 8}),
]


@pytest.fixture(scope="module")
def pair():
    """(the host build, its mirror) on one simulated device of 8 SMs."""
    return host_binding.HostBinding(sms=8), simulate.Simulator(sms=8)


def _inputs(cell: int, T: int, B: int, H: int, dtype, lengths: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    G = (4, 3, 1, 1)[cell]

    def r(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    fwd = {"mode": cell, "xproj": r(T, B, G * H), "h0": r(B, H, dt=dtype),
           "c0": r(B, H, dt=dtype) if cell == 0 else None, "w_hh": r(G * H, H, scale=0.3, dt=dtype),
           "b_hh": r(G * H), "b_ih": r(G * H),
           "lengths": (torch.randint(1, T + 1, (B,), generator=g, dtype=torch.int32)
                       if lengths else None)}
    grads = {"dy": r(T, B, H, dt=dtype), "dh_n": r(B, H),
             "dc_n": r(B, H) if cell == 0 else None}
    return fwd, grads


def _clone(args: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _chunk(ext, cell, fwd, grads, settings, allow_tf32, steps=False):
    """Forward (saving) then backward over one chunk through ``ext``: every tensor either
    returns, the forward's overwritten xproj (the saved activations) included."""
    fwd = _clone(fwd)
    tune = {"max_groups": 1, "max_stage_k": 1 << 30}
    tune.update({k: v for k, v in settings.items() if k not in ("lengths", "reverse")})
    reverse = settings.get("reverse", False)
    if steps:
        y, h_n, c_n, aux = ext.forward_steps(**fwd, reverse=reverse, save=True)
    else:
        y, h_n, c_n, aux = ext.forward(**fwd, reverse=reverse, allow_tf32=allow_tf32, save=True,
                                       **tune)
    bwd = {"mode": cell, **_clone(grads), "w_hh": fwd["w_hh"], "gates": fwd["xproj"],
           "aux": aux if cell in (0, 1) else None,
           "c0": fwd["c0"].float() if cell == 0 else None,
           "hprev": (torch.cat([fwd["h0"][None], y[:-1]]) if not reverse else
                     torch.cat([y[1:], fwd["h0"][None]])) if cell == 1 else None,
           "lengths": fwd["lengths"]}
    if steps:
        out = ext.backward_steps(**bwd, reverse=reverse)
    else:
        tune.pop("b_ih", None)
        out = ext.backward(**bwd, reverse=reverse, allow_tf32=allow_tf32, **tune)
    return [y, h_n, c_n, aux, fwd["xproj"], *out]


def _same_bits(a, b, what):
    assert len(a) == len(b), what
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, (what, i, u.shape, v.shape)
        assert torch.equal(u.view(torch.uint8) if u.numel() else u,
                           v.view(torch.uint8) if v.numel() else v), (
            f"{what}: tensor {i} differs between binding.cpp and its mirror")


@pytest.mark.parametrize("name,B,H,settings", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("mode", list(CELLS))
def test_the_binding_gives_its_mirrors_bits(pair, mode, dt, name, B, H, settings):
    """Every output and gradient of a chunk, and the saved activations, bit for bit (NaN
    patterns too: the bytes are compared) between binding.cpp and simulate.py's mirror of it;
    and the kernels were launched with the same plan and settings (read off the params each
    filled), the plan the mirror asked plan.h for. fp32 runs with TF32 allowed (the
    tensor-core path)."""
    cell = CELLS[mode]
    fwd, grads = _inputs(cell, 3, B, H, DTYPES[dt], settings.get("lengths", False),
                         seed=zlib.crc32(f"{mode} {dt} {name}".encode()) % 1000)
    host, sim = pair
    before, sim_before = len(host.launches), len(sim.launches)
    ours = _chunk(host, cell, fwd, grads, settings, allow_tf32=dt == "fp32")
    mirror = _chunk(sim, cell, fwd, grads, settings, allow_tf32=dt == "fp32")
    assert sim.last_launch()[1] == sim.launches[-1][2]  # the mirror launched what it asked for
    _same_bits(ours, mirror, f"{mode} {dt} {name}")
    assert host.launches[before:] == sim.launches[sim_before:]
    assert [d for d, *_ in host.launches[before:]] == ["forward", "backward"]
    if name == "parts2":  # the uneven K split really ran
        assert all(pl["parts"] == 2 for *_, pl in host.launches[before:])
    if name in ("cluster8", "dsmem", "tagged-cluster8"):
        assert all(pl["cluster"] != 0 for *_, pl in host.launches[before:])
    if name.startswith("tagged"):  # tagged in 16 bits where the plan takes it, else registers
        tagged = dt != "fp32" and name != "tagged-parts2"
        assert [pl["stage_copy"] for *_, pl in host.launches[before:]] == [3 if tagged else 0] * 2


@pytest.mark.parametrize("lengths_rev", [False, True], ids=["dense", "lengths-rev"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("mode", list(CELLS))
def test_the_per_step_path_gives_its_mirrors_bits(pair, mode, dt, lengths_rev):
    """forward_steps and backward_steps: the binding's loop of torch GEMMs (step_mm) and step
    launches against the mirror's, bit for bit. 16-bit operands go to the GEMM as they are, as
    on a GPU (aten::mm.dtype_out: HostBinding's stand-in for cuBLAS's), one a step forward and
    one a step after the first backward, with no fallback; fp32 ones to torch's fp32 GEMM."""
    cell = CELLS[mode]
    settings = {"lengths": True, "reverse": True} if lengths_rev else {}
    T = 4
    fwd, grads = _inputs(cell, T, 5, 24, DTYPES[dt], lengths_rev, seed=7)
    host, sim = pair
    calls = len(host_binding.GEMM_CALLS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's warning would be an error here
        ours = _chunk(host, cell, fwd, grads, settings, allow_tf32=False, steps=True)
    mirror = _chunk(sim, cell, fwd, grads, settings, allow_tf32=False, steps=True)
    _same_bits(ours, mirror, f"{mode} {dt} steps")
    sixteen = DTYPES[dt] != torch.float32 and host_binding.install_sixteen_bit_gemm()
    assert host_binding.GEMM_CALLS[calls:] == (
        [(DTYPES[dt], torch.float32)] * (2 * T) if sixteen else [])


_FALLBACK_CHILD = r"""
import json, sys, warnings, torch
sys.path.insert(0, sys.argv[1])
import host_binding, simulate
from test_host_binding import _inputs, _chunk
host, sim = host_binding.HostBinding(sms=8, sixteen_bit_gemm=False), simulate.Simulator(sms=8)
fwd, grads = _inputs(1, 3, 4, 16, torch.bfloat16, False, seed=3)
try:  # the CPU's own torch: no 16-bit GEMM with an fp32 result
    torch.mm(fwd["h0"], fwd["w_hh"].t(), out_dtype=torch.float32)
    sys.exit("the CPU took torch.mm(..., out_dtype=float32) on bf16 operands")
except NotImplementedError:
    pass
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    runs = [_chunk(host, 1, fwd, grads, {}, False, steps=True) for _ in range(2)]
    mirror = _chunk(sim, 1, fwd, grads, {}, False, steps=True)
print(json.dumps({"warnings": [str(w.message) for w in caught],
                  "same": [all(torch.equal(a, b) for a, b in zip(r, mirror)) for r in runs]}))
"""


def test_the_per_step_path_promotes_once_with_a_warning_where_torch_refuses():
    """binding.cpp step_mm: where torch refuses the 16-bit GEMM with an fp32 result (the CPU's
    torch, without HostBinding's stand-in for cuBLAS's; some cuBLAS layouts may), the operands
    are promoted, with one warning a process that names torch's refusal, and the results are
    still the mirror's bits. In a child process, as the warning is once a process."""
    r = subprocess.run([sys.executable, "-c", _FALLBACK_CHILD, str(HERE)], capture_output=True,
                       text=True, timeout=600, check=False, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    refused = [w for w in got["warnings"] if "refused the per-step path's 16-bit GEMM" in w]
    assert len(refused) == 1, got["warnings"]
    assert "mm.dtype_out" in refused[0] and "promoted to fp32" in refused[0], refused[0]
    assert got["same"] == [True, True]


_OOM_CHILD = r"""
import json, sys, warnings, torch
sys.path.insert(0, sys.argv[1])
import host_binding
from test_host_binding import _inputs
host = host_binding.HostBinding(sms=8, sixteen_bit_gemm=False)
host_binding.install_oom_gemm(host)
fwd, _ = _inputs(1, 3, 4, 16, torch.bfloat16, False, seed=3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        host.forward_steps(**fwd, reverse=False, save=False)
        raised = None
    except Exception as e:
        raised = [type(e).__name__, str(e)]
print(json.dumps({"raised": raised, "warnings": [str(w.message) for w in caught]}))
"""


@pytest.mark.skipif(not hasattr(torch.ops.aten.mm, "dtype_out"),
                    reason="torch < 2.8 has no aten::mm.dtype_out: every 16-bit step GEMM is "
                           "promoted without asking")
def test_the_per_step_path_does_not_take_running_out_of_memory_for_a_refusal():
    """binding.cpp step_mm: an out-of-memory error from the 16-bit GEMM is not torch refusing
    it. It propagates as torch.OutOfMemoryError, with no "refused" warning and no promoted
    retry (which would need more memory still). In a child process: the failing GEMM (the host
    build's test hook) replaces the CPU's for good."""
    r = subprocess.run([sys.executable, "-c", _OOM_CHILD, str(HERE)], capture_output=True,
                       text=True, timeout=600, check=False, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["raised"] and got["raised"][0] == "OutOfMemoryError", got
    assert "host_binding's stand-in" in got["raised"][1], got
    assert not [w for w in got["warnings"] if "refused" in w], got["warnings"]


def test_device_queries_answer_for_the_simulated_device(pair):
    """device_info and kernel_image go to cudasim's runtime (device 0, sm_90, the configured
    SMs and shared memory), through the binding's own checks: a device it does not have is
    refused by name."""
    host, sim = pair
    assert host.device_info(0) == sim.device_info(0) == [8, 227 * 1024, 9, 0, 1]
    assert host.kernel_image(0) == [0, 90, 90]
    for index in (1, -1, 2**32):  # 2**32 was read as device 0 (an int cast)
        for query in (host.kernel_image, host.device_info):
            with pytest.raises(RuntimeError, match=f"no CUDA device {index}"):
                query(index)
    old = host_binding.HostBinding(sms=8, ptx_version=80)  # a build without sm_90 code
    assert old.kernel_image(0) == [0, 90, 80]
    host.sim._configure()  # the library is shared: back to the module fixture's device


def test_the_build_names_the_torch_release_it_was_compiled_against(pair):
    """binding.cpp reports torch's TORCH_VERSION_* (its headers) as ``torch_version``, which
    the loader compares with the running torch before using a prebuilt extension."""
    from fused_rnn.ops.cuda import _ext

    host, _ = pair
    assert tuple(host.ext.torch_version) == _ext._torch_release()
    assert len(_ext._torch_release()) == 3


def test_plan_info_is_make_plans_arithmetic(pair):
    """plan_info (binding.cpp) and sim_make_plan (sim_api.cpp) both call plan.h's make_plan:
    the same fields for every cell, math, size and split; bad arguments refused by both."""
    host, sim = pair
    for cell in range(4):
        for math in range(3):
            for hidden, backward, blocks, groups, stage, parts in (
                    (20, False, 8, 1, (0, 0), 1), (44, True, 8, 1, (0, 0), 2),
                    (300, False, 132, 3, (32, 64), 1), (1024, True, 132, 1, (64, 1024), 4)):
                args = (cell, math, hidden, backward, blocks, groups, *stage, parts)
                assert host.plan_info(*args) == sim.plan_info(*args), args
    with pytest.raises(RuntimeError, match="bad groups"):
        host.plan_info(0, 0, 20, False, 8, 9)
    with pytest.raises(RuntimeError, match="math code must be 0, 1 or 2"):
        host.plan_info(0, 3, 20, False, 8)
    # A hidden size of 0 divided by zero (SIGFPE), 2**32 was read as 0, and -40 planned.
    for hidden in (0, -40, 2**32):
        with pytest.raises(RuntimeError, match=f"bad hidden size {hidden} "):
            host.plan_info(0, 0, hidden, False, 8)
    with pytest.raises(RuntimeError, match="bad max_blocks 0"):
        host.plan_info(0, 0, 20, False, 0)
    with pytest.raises(RuntimeError, match="bad staging"):
        host.plan_info(0, 0, 20, False, 8, 1, -32, 64)
    for args in ((0, 0, 0, False, 8), (0, 0, 20, False, 0)):
        with pytest.raises(RuntimeError, match="bad plan arguments"):
            sim.plan_info(*args)


def test_every_entry_point_refuses_what_its_kernels_cannot_count(pair):
    """The per-step entry points checked no hidden size (H=0 reached a launch of no points and
    came back as cudaErrorInvalidValue), and a chunk's step and row limits are checked before
    its tensors: INT_MAX steps overflowed the backward's step counter (s = 0 .. T)."""
    host, _ = pair
    tune = {"allow_tf32": False, "max_groups": 1, "max_stage_k": 1 << 30}
    fwd, grads = _inputs(1, 2, 2, 8, torch.float32, False, seed=4)
    empty = {**fwd, "xproj": fwd["xproj"][..., :0], "h0": fwd["h0"][:, :0],
             "w_hh": fwd["w_hh"][:0, :0], "b_hh": None, "b_ih": None}
    bwd = {"mode": 1, "dy": grads["dy"][..., :0], "dh_n": grads["dh_n"][:, :0], "dc_n": None,
           "w_hh": empty["w_hh"], "gates": empty["xproj"], "aux": fwd["h0"].new_zeros(2, 2, 0),
           "c0": None, "hprev": fwd["h0"].new_zeros(2, 2, 0), "lengths": None, "reverse": False}
    for call in (lambda: host.forward(**empty, reverse=False, save=True, **tune),
                 lambda: host.forward_steps(**empty, reverse=False, save=True),
                 lambda: host.backward(**bwd, **tune),
                 lambda: host.backward_steps(**bwd)):
        with pytest.raises(RuntimeError, match="bad hidden size 0 "):
            call()
    long = {**fwd, "xproj": fwd["xproj"][:1].expand(2**31 - 1, 2, 24)}
    for call in (lambda: host.forward(**long, reverse=False, save=True, **tune),
                 lambda: host.forward_steps(**long, reverse=False, save=True)):
        with pytest.raises(RuntimeError, match=f"at most {2**31 - 2} steps and {2**31 - 97} "):
            call()


def test_a_tensor_elsewhere_is_refused_as_not_on_the_device(pair):
    """The host build's one rename: binding.cpp's "inputs must be CUDA tensors" check reads
    is_cpu there, so a tensor on another device (meta) is refused by it, with its message."""
    host, _ = pair
    fwd, _ = _inputs(2, 2, 2, 8, torch.float32, False, seed=1)
    with pytest.raises(RuntimeError, match="inputs must be CUDA tensors, got meta"):
        host.forward(**{**fwd, "xproj": fwd["xproj"].to("meta")}, reverse=False,
                     allow_tf32=False, save=False, max_groups=1, max_stage_k=1 << 30)


def test_cluster_launches_are_the_kernels_count(pair):
    """fused_rnn::cluster_launches is an inline variable of fused_rnn.h: the binding's module
    and the cudasim library must share one copy (GCC makes it a unique symbol), or the
    binding would report 0 cluster launches forever."""
    host, sim = pair
    before = host.cluster_launches(), sim.cluster_launches()
    fwd, grads = _inputs(0, 2, 70, 20, torch.bfloat16, False, seed=2)
    _chunk(host, 0, fwd, grads, {"max_groups": 3, "cluster": 8}, allow_tf32=False)
    assert host.cluster_launches() - before[0] == 2
    assert sim.cluster_launches() - before[1] == 2


def test_the_host_build_renames_two_names_and_includes_the_binding_unchanged():
    """What sim/host/binding_host.cpp may change: is_cuda and cudaDeviceGetAttribute, as
    macros, before it includes binding.cpp; binding.cpp uses each where the renaming is meant
    (its device checks and its device attribute queries) and nowhere else. After the include
    comes only the test hook (a function of its own, called through ctypes), which no macro
    or binding name reaches."""
    host_src = (host_binding.HOST / "binding_host.cpp").read_text()
    code = [ln for ln in host_src.splitlines() if ln.strip() and not ln.lstrip().startswith("//")]
    assert [ln for ln in code if ln.startswith(("#define", "#undef"))] == [
        "#define is_cuda is_cpu", "#define cudaDeviceGetAttribute host_device_attribute"]
    (at,) = [i for i, ln in enumerate(code) if ln.startswith('#include "binding.cpp"')]
    after = "\n".join(code[at + 1:])
    assert not [ln for ln in code[at + 1:] if ln.startswith("#")], after
    assert 'extern "C" void fused_rnn_host_install_oom_gemm()' in after
    assert "is_cuda" not in after and "cudaDeviceGetAttribute" not in after
    binding = (simulate.CSRC / "binding.cpp").read_text()
    assert binding.count("is_cuda()") == 2
    assert binding.count(".is_cuda(), \"fused_rnn CUDA backend: inputs must be CUDA tensors") == 2
    assert binding.count("cudaDeviceGetAttribute(") == 5
    assert binding.count("FRNN_CHECK_CUDA(cudaDeviceGetAttribute(") + binding.count(
        "FRNN_CHECK_CUDA(\n      cudaDeviceGetAttribute(") == 5


def test_what_torch_allocates_during_a_call_is_junk_filled(pair, monkeypatch):
    """HostBinding arms c10's junk fill for the length of each call of the binding (its
    at::empty outputs and buffers start as NaN patterns, like the mirror's NaN-filled
    torch.empty), and disarms it after."""
    host, _ = pair
    monkeypatch.setattr(host, "ext", type("Stub", (), {
        "device_info": staticmethod(lambda index: torch.empty_strided((256,), (1,)))})())
    got = host.device_info(0)
    assert got.isnan().all() and got.view(torch.int32).eq(0x7FEDBEEF).all()
    assert not host_binding._junk_fill().value


def test_h_n_owns_its_memory_where_it_fills_the_exchange_buffer(pair):
    """binding.cpp copies h_n out of the exchange buffer even where B and H fill its padded
    rows and columns (B=32, H=64), where the slice is contiguous already: a view would keep
    all of the (2, B_pad, k_pad) buffer alive with the carried state, across every chunk of a
    truncated-BPTT run."""
    host, _ = pair
    for cell in range(4):
        fwd, _ = _inputs(cell, 2, 32, 64, torch.bfloat16, False, seed=5)
        _, h_n, c_n, _ = host.forward(**fwd, reverse=False, allow_tf32=False, save=False,
                                      max_groups=1, max_stage_k=1 << 30)
        for t in (h_n, c_n) if cell == 0 else (h_n,):
            assert t.shape == (32, 64) and t.is_contiguous()
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), cell


def test_the_shared_memory_backstop_refuses_a_plan_one_byte_too_large():
    """The Python side refuses such sizes first (unsupported_reason), so only a direct call
    reaches binding.cpp's backstop: on a device with one byte less shared memory a block than
    the smallest plan plan.h can make for RNN fp32 H=600 on 8 SMs, the binding refuses with
    the bytes needed and allowed, and launches nothing."""
    optin, need = 227 * 1024, None
    while True:  # shrink the device to just under the smallest plan: the mirror says when
        sim = simulate.Simulator(sms=8, smem_optin=optin, smem_per_sm=optin + 1024)
        try:
            need = sim.plan(2, torch.float32, False, 600, False)["smem_bytes"]
        except RuntimeError:
            break
        optin = need - 1
    assert need is not None and optin == need - 1
    host = host_binding.HostBinding(sms=8, smem_optin=optin, smem_per_sm=optin + 1024)
    fwd, _ = _inputs(2, 1, 1, 600, torch.float32, False, seed=6)
    launches = len(host.launches)
    with pytest.raises(RuntimeError, match=rf"hidden_size=600 needs {need} bytes of shared "
                                           rf"memory per block .*this GPU allows {optin}$"):
        host.forward(**fwd, reverse=False, allow_tf32=False, save=False, max_groups=1,
                     max_stage_k=1 << 30)
    assert len(host.launches) == launches
    simulate.Simulator(sms=8)._configure()  # the shared library: back to the fixture's device


@pytest.mark.parametrize("steps", [False, True], ids=["persistent", "steps"])
@pytest.mark.parametrize("mode", list(CELLS))
def test_the_binding_leaves_its_inputs_as_they_were(pair, mode, steps):
    """binding.cpp writes only what it allocates, and xproj where asked to save (its
    documented use as the activations' buffer): h0, c0, the weights, the biases and lengths
    forward, and every input backward (dh_n and dc_n are autograd's incoming gradients, which
    a retained .grad or a hook may hold; c0 is saved for the backward) come back unchanged.
    fp32, where ops.py's casts return the caller's own tensors."""
    host, _ = pair
    cell = CELLS[mode]
    fwd, grads = _inputs(cell, 3, 3, 20, torch.float32, True, seed=8)
    kept = _clone(fwd)
    extra = {} if steps else {"allow_tf32": False, "max_groups": 1, "max_stage_k": 1 << 30}
    run = host.forward_steps if steps else host.forward
    run(**fwd, reverse=False, save=False, **extra)
    for k, v in kept.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(fwd[k], v), f"forward wrote its input {k}"
    aux = run(**fwd, reverse=False, save=True, **extra)[3]  # xproj: now the activations
    bwd = {"mode": cell, **grads, "w_hh": fwd["w_hh"], "gates": fwd["xproj"],
           "aux": aux if cell == 0 else (torch.randn(3, 3, 20) if cell == 1 else None),
           "c0": fwd["c0"] if cell == 0 else None,
           "hprev": torch.randn(3, 3, 20) if cell == 1 else None, "lengths": fwd["lengths"]}
    kept = _clone(bwd)
    extra.pop("save", None)
    (host.backward_steps if steps else host.backward)(**bwd, reverse=False, **extra)
    for k, v in kept.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(bwd[k], v), f"backward wrote its input {k}"


@pytest.mark.parametrize("name,settings,steps", [
    ("plain", {}, False), ("cluster8", {"max_groups": 3, "cluster": 8}, False),
    ("lengths-rev-steps", {"lengths": True, "reverse": True}, True)],
    ids=["plain", "cluster8", "steps"])
def test_every_launch_names_c10s_current_stream(pair, name, settings, steps):
    """binding.cpp queues its kernels on c10's current stream of the tensors' device: on a GPU
    a launch on any other (the legacy stream 0, say) runs unordered with the torch ops around
    it, and breaks CUDA graph capture. HostBinding gives each call a current stream of its
    own; every launch of a chunk named it (a persistent launch a direction, as a cluster too;
    on the per-step path one launch a step forward, and T + 1 backward, the last one dh0's)
    and none named another."""
    host, _ = pair
    T = 3
    fwd, grads = _inputs(0, T, 70, 20, torch.bfloat16, settings.get("lengths", False), seed=9)
    on, off = host.stream_launches()
    clusters = host.cluster_launches()
    _chunk(host, 0, fwd, grads, settings, allow_tf32=False, steps=steps)
    assert host.stream_launches() == (on + (2 * T + 1 if steps else 2), off)
    assert host.cluster_launches() - clusters == (2 if name == "cluster8" else 0)


def _guarded(run):
    """``run`` (the mirror's) as from inside a device guard: device 0 current, then the
    caller's again."""
    def call(*args, **kwargs):
        sim = simulate.Simulator(sms=8)
        before = sim.current_device()
        sim.set_current_device(0)
        try:
            return run(*args, **kwargs)
        finally:
            sim.set_current_device(before)
    return staticmethod(call)


def test_a_launch_off_the_current_stream_fails_the_call(pair, monkeypatch):
    """The check above can fail: the mirror launches on the legacy stream (nullptr), so a
    'binding' that is the mirror (with a device guard) counts one launch off the stream
    HostBinding named, and the call fails with an AssertionError that says so."""
    host, sim = pair
    monkeypatch.setattr(host, "ext", type("Stub", (), {"forward": _guarded(sim.forward)})())
    fwd, _ = _inputs(2, 2, 3, 20, torch.float32, False, seed=10)
    on, off = host.stream_launches()
    with pytest.raises(AssertionError, match=r"forward made 1 launch\(es\) on a stream other "
                                             r"than c10's current one \(0x[0-9a-f]+\)"):
        host.forward(**fwd, reverse=False, allow_tf32=False, save=False, max_groups=1,
                     max_stage_k=1 << 30)
    assert host.stream_launches() == (on, off + 1)
    sim.forward(**fwd, reverse=False, allow_tf32=False, save=False, max_groups=1,
                max_stage_k=1 << 30)  # the stream is the legacy one again after the call
    assert host.stream_launches() == (on + 1, off + 1)


def test_the_binding_launches_under_its_device_guard(pair, monkeypatch):
    """HostBinding calls the binding with another device current (a model on cuda:0 called
    while cuda:1 is current); binding.cpp's device guard makes the tensors' device current for
    its launches and device queries, and the caller's again after (HostBinding asserts that
    too). Without a guard (the mirror, which has none) the launcher's device queries are
    refused on the wrong device (cudasim simulates device 0 only), and nothing runs."""
    host, sim = pair
    fwd, grads = _inputs(0, 2, 3, 20, torch.float32, False, seed=11)
    _chunk(host, 0, fwd, grads, {}, allow_tf32=False)
    _chunk(host, 0, fwd, grads, {}, allow_tf32=False, steps=True)
    assert host.kernel_image(0) == [0, 90, 90]
    assert sim.current_device() == 0  # HostBinding leaves device 0 current for the mirror
    monkeypatch.setattr(host, "ext", type("Stub", (), {"forward": staticmethod(sim.forward)})())
    on, off = host.stream_launches()
    with pytest.raises(RuntimeError, match="cudaErrorInvalidDevice"):
        host.forward(**fwd, reverse=False, allow_tf32=False, save=False, max_groups=1,
                     max_stage_k=1 << 30)
    assert host.stream_launches() == (on, off)
    assert sim.current_device() == 0
