"""The CUDA backend end to end on the CPU, with the compiled kernels replaced by their emulation.

What runs for real: ``fused_rnn.ops.cuda`` (``rnn_layer``, ``unsupported_reason``), the custom
ops, their autograd formula, ``previous_hidden`` and the time-parallel gradient GEMMs. What is
emulated: the extension (``emulate.Emulator``: the kernels' partition, tiling, slot layout,
epilogues, exchange protocol and carries -- see its docstring). Compared with the reference
(``fused_rnn/ops/reference.py``) on every output and every gradient, with random cotangents on
y, h_n and c_n.

In float64 the emulated kernels must agree with the reference to 1e-10 for every tile shape
(this checks the partition and the formulas, not rounding); in fp32/bf16/fp16 they must agree
within the dtype's tolerance (wide enough that an extra or missing rounding of dh or dgx passes:
where the kernels round is checked against the kernels in test_cuda_sim.py).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from cases import register_cpu_kernels
from emulate import Emulator

import fused_rnn.ops.cuda as cuda_backend
from fused_rnn.ops import reference
from fused_rnn.ops.cuda import _ext, ops
from fused_rnn.ops.cuda import plan as P
from fused_rnn.ops.reference import GATES, MODES

register_cpu_kernels()


@pytest.fixture
def emulate(monkeypatch):
    """Install an emulator as the extension; returns a setter for its configuration."""

    def install(**kwargs) -> Emulator:
        emu = Emulator(**kwargs)
        monkeypatch.setattr(_ext, "extension", lambda: emu)
        monkeypatch.setattr(_ext, "unavailable_reason", lambda device: None)
        return emu

    return install


def _inputs(mode, T, B, I, H, dtype, seed, lengths=False):
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode]

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    s = 1.5 / H**0.5
    x = r(T, B, I)
    h0 = r(B, H, scale=0.5)
    c0 = r(B, H, scale=0.5) if mode == "LSTM" else None
    w_ih, w_hh = r(G * H, I, scale=s), r(G * H, H, scale=s)
    b_ih, b_hh = r(G * H, scale=0.3), r(G * H, scale=0.3)
    lens = None
    if lengths:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
        if B > 1:
            lens[1] = 1
    cot = [r(T, B, H), r(B, H), r(B, H)]
    return [x, h0, c0, w_ih, w_hh, b_ih, b_hh], lens, cot


def _run(fn, mode, leaves, lens, reverse, cot):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in leaves]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
    y, h, c = fn(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lens, reverse)
    outs = [y, h] + ([c] if c is not None else [])
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, cot))
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, present, allow_unused=True)  # T=0: the reference skips x
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, present)]
    return [o.detach() for o in outs], grads


def _compare(mode, T, B, I, H, dtype, lengths, reverse, seed=0, ref_dtype=None):
    leaves, lens, cot = _inputs(mode, T, B, I, H, dtype, seed, lengths)
    ours = _run(cuda_backend.rnn_layer, mode, leaves, lens, reverse, cot)
    ref_leaves = leaves if ref_dtype is None else [
        None if t is None else t.to(ref_dtype) for t in leaves
    ]
    ref = _run(reference.rnn_layer, mode, ref_leaves, lens, reverse, cot)
    return ours, ref


NAMES_OUT = ("y", "h_n", "c_n")
NAMES_GRAD = ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh")


def _grad_names(mode):
    return [n for n in NAMES_GRAD if n != "dc0" or mode == "LSTM"]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [False, True], ids=["dense", "lengths"])
@pytest.mark.parametrize("math", ["wmma16", "tf32", "fma"])
@pytest.mark.parametrize("mode", MODES)
def test_exact_math_every_tile_shape(emulate, mode, math, lengths, reverse):
    """float64: partition, tiling, slots, epilogues and carries reproduce the reference."""
    emu = emulate(sms=4, math=P.MATHS[math])
    (outs, grads), (routs, rgrads) = _compare(mode, 5, 3, 4, 37, torch.float64, lengths, reverse)
    assert {d for d, *_ in emu.launches} == {"forward", "backward"}
    assert all(pl.blocks > 1 for *_, pl in emu.launches)  # ragged multi-block partitions
    for name, a, b in zip(NAMES_OUT, outs, routs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name, a, b in zip(_grad_names(mode), grads, rgrads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")


# Odd shapes: T=1, B=1, H=1, H below the block count, B over one chunk (64) so the batch loop and
# batch padding run, H with a ragged last block.
@pytest.mark.parametrize(
    "T,B,I,H,sms",
    [(1, 1, 3, 5, 4), (3, 2, 2, 1, 4), (2, 70, 3, 9, 2), (4, 3, 6, 16, 5), (3, 33, 5, 23, 7)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("mode", MODES)
def test_exact_math_odd_shapes(emulate, mode, T, B, I, H, sms):
    emulate(sms=sms, math=P.MATHS["wmma16"])
    (outs, grads), (routs, rgrads) = _compare(mode, T, B, I, H, torch.float64, True, T % 2 == 1)
    for name, a, b in zip(NAMES_OUT + tuple(_grad_names(mode)), outs + grads, routs + rgrads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# Storage dtypes with the kernels' real rounding. Tolerances (relative Frobenius error against
# the reference in the same dtype, which rounds h but not the recurrent dgates) sit beside the
# dtype: fp32 differs only in accumulation order; bf16/fp16 also round the recurrent dgates.
@pytest.mark.parametrize(
    "dtype,allow_tf32,tol_out,tol_grad",
    [
        (torch.float32, False, 1e-5, 1e-5),
        (torch.float32, True, 5e-3, 1e-2),
        (torch.bfloat16, False, 2e-2, 4e-2),
        (torch.float16, False, 3e-3, 6e-3),
    ],
    ids=["fp32", "tf32", "bf16", "fp16"],
)
@pytest.mark.parametrize("lengths", [False, True], ids=["dense", "lengths"])
@pytest.mark.parametrize("mode", MODES)
def test_storage_dtypes(emulate, monkeypatch, mode, lengths, dtype, allow_tf32, tol_out, tol_grad):
    emulate(sms=3)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    (outs, grads), (routs, rgrads) = _compare(mode, 6, 5, 7, 24, dtype, lengths, lengths, seed=1)
    for name, a, b in zip(NAMES_OUT, outs, routs):
        assert a.dtype == dtype
        assert _rel_err(a, b) <= tol_out, (name, _rel_err(a, b))
    for name, a, b in zip(_grad_names(mode), grads, rgrads):
        assert torch.isfinite(a).all(), name
        assert _rel_err(a, b) <= tol_grad, (name, _rel_err(a, b))


def test_math_choice_follows_allow_tf32(emulate, monkeypatch):
    """fp32 runs the TF32 tiles when cudnn.allow_tf32 is set (at a size whose TF32 plan fits)
    and FMA when it is not; 16-bit runs WMMA16."""
    for allow, dtype, want in (
        (True, torch.float32, "tf32"), (False, torch.float32, "fma"),
        (True, torch.bfloat16, "wmma16"), (False, torch.float16, "wmma16"),
    ):
        emu = emulate(sms=2)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        _compare("GRU", 2, 2, 3, 16, dtype, False, False)
        granule = P.TILE_SHAPES[P.MATHS[want]][5]
        assert len(emu.launches) == 2  # forward and backward
        assert emu.maths == [P.MATHS[want]] * 2, (allow, dtype, emu.maths)
        for _, _, pl in emu.launches:
            assert pl.m_pad == -(-pl.m_rows // granule) * granule


def test_inference_saves_nothing(emulate):
    emulate(sms=2)
    leaves, _, _ = _inputs("LSTM", 3, 2, 4, 8, torch.float32, 0)
    with torch.no_grad():
        y, _h, c, gates, aux = ops.cuda_layer(
            "LSTM", *leaves, None, False, False, False
        )
        ry, _rh, rc = reference.rnn_layer("LSTM", *leaves)
    assert gates.numel() == 0 and aux.numel() == 0
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, rc, rtol=1e-5, atol=1e-5)


def test_empty_chunk_needs_no_kernel(emulate):
    emu = emulate(sms=2)
    (outs, grads), (routs, rgrads) = _compare("LSTM", 0, 3, 4, 8, torch.float32, False, False)
    assert emu.launches == []
    for a, b in zip(outs + grads, routs + rgrads):
        torch.testing.assert_close(a, b)


def test_double_backward_is_refused_clearly(emulate):
    emulate(sms=2)
    leaves, _, _ = _inputs("LSTM", 3, 2, 4, 8, torch.float32, 0)
    x = leaves[0].clone().requires_grad_(True)
    y, _, _ = cuda_backend.rnn_layer("LSTM", x, *leaves[1:], None, None, False)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward.*'cuda'.*backend=\"reference\""):
        torch.autograd.grad(gx.pow(2).sum(), x)


def test_cell_is_a_one_step_layer(emulate):
    emulate(sms=2)
    leaves, _, _ = _inputs("GRU", 1, 3, 4, 8, torch.float64, 0)
    x, h0, _, w_ih, w_hh, b_ih, b_hh = leaves
    h1, c1 = cuda_backend.rnn_cell("GRU", x[0], h0, None, w_ih, w_hh, b_ih, b_hh)
    rh, _ = reference.rnn_cell("GRU", x[0], h0, None, w_ih, w_hh, b_ih, b_hh)
    assert c1 is None
    torch.testing.assert_close(h1, rh, rtol=1e-12, atol=1e-12)


def test_unsupported_reason_sizes_against_the_device(emulate):
    """Limits come from the device's SM count and opt-in shared memory (here an H100's)."""
    emulate(sms=132, smem_optin=227 * 1024)
    dev = torch.device("cuda", 0)
    cfg = dict(device=dev, input_size=8, proj_size=0, has_lengths=True)
    lim = P.max_hidden(0, True, False, 132, 227 * 1024)
    assert cuda_backend.unsupported_reason("layer", mode="LSTM", dtype=torch.bfloat16,
                                           hidden_size=lim, **cfg) is None
    why = cuda_backend.unsupported_reason("layer", mode="LSTM", dtype=torch.bfloat16,
                                          hidden_size=lim + 1, **cfg)
    assert why and "shared memory" in why and f"hidden_size={lim + 1}" in why
    why = cuda_backend.unsupported_reason("layer", mode="LSTM", dtype=torch.float64,
                                          hidden_size=64, **cfg)
    assert why and "float64" in why
    why = cuda_backend.unsupported_reason("layer", mode="LSTM", dtype=torch.float32,
                                          hidden_size=64, **{**cfg, "proj_size": 16})
    assert why and "proj_size" in why
    assert cuda_backend.unsupported_reason("cell", mode="GRU", dtype=torch.float16,
                                           hidden_size=1024, **cfg) is None


def test_documented_limits_match_the_plan():
    """The table in plan.py's docstring is what limits_table() computes, cell for cell."""
    table = P.limits_table()
    labels = ("bf16/fp16", "fp32 TF32", "fp32")
    want = {cell: [table[gpu][cell][label] for gpu in ("H100", "A100") for label in labels]
            for cell in table["H100"]}
    got = {}
    for line in P.__doc__.splitlines():
        cols = re.split(r"\s{2,}", line.strip())
        if cols[0] in want:
            got[cols[0]] = [int(c) for c in cols[1:]]
    assert got == want
    assert table["H100"]["LSTM"]["bf16/fp16"] >= 1024  # ANCHORS.md's shapes all fit


def test_the_readme_gives_the_plans_limits_and_the_int32_counts():
    """README's CUDA section quotes the H100 limits and the largest chunk; the counts' limits
    went stale (2^31-1 steps and 2^31-33 rows, where the code takes 2^31-2 and 2^31-97)."""
    from pathlib import Path

    from fused_rnn.ops.cuda import ops

    text = " ".join((Path(P.__file__).parents[3] / "README.md").read_text().split())
    m = re.search(r"a chunk of more than 2\^31−(\d+) steps or 2\^31−(\d+) rows", text)
    assert m and (2**31 - int(m.group(1)), 2**31 - int(m.group(2))) == (ops.MAX_STEPS,
                                                                          ops.MAX_ROWS)
    h100 = P.limits_table()["H100"]
    m = re.search(r"132 SMs: LSTM (\d+) bf16/fp16, (\d+) fp32; GRU (\d+)/(\d+); RNN (\d+)/(\d+);",
                  text)
    assert m and [int(v) for v in m.groups()] == [
        h100[cell][label] for cell in ("LSTM", "GRU", "RNN tanh/relu")
        for label in ("bf16/fp16", "fp32")], m and m.groups()


def test_the_size_check_is_kept_between_calls():
    """plan.fits (four plans, asked at every cuda call by unsupported_reason) answers a
    repeated question from its cache, the same answer as a fresh computation."""
    P.fits.cache_clear()
    args = (P.CELLS["LSTM"], True, False, 1024, 132, 227 * 1024)
    first = P.fits(*args)
    assert P.fits(*args) == first and P.fits.cache_info().hits == 1
    assert P.fits.__wrapped__(*args) == first is None
    big = (P.CELLS["LSTM"], False, False, 1 << 14, 132, 227 * 1024)
    assert P.fits(*big) == P.fits.__wrapped__(*big) and "shared memory" in P.fits(*big)


def test_sanitize_script_dry_run(emulate, monkeypatch, capsys):
    """benchmarks/sanitize_cuda.py (run under compute-sanitizer on a GPU) works end to end."""
    import importlib.util

    from fused_rnn.ops.cuda import _ext as ext_mod

    path = P.__file__.rsplit("fused_rnn", 1)[0] + "benchmarks/sanitize_cuda.py"
    spec = importlib.util.spec_from_file_location("sanitize_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    emulate(sms=3)
    monkeypatch.setattr(mod, "DEVICE", "cpu")
    monkeypatch.setattr(ext_mod, "unavailable_reason", lambda device: None)
    monkeypatch.setattr("sys.argv", ["sanitize_cuda.py"])
    names = ("FUSED_RNN_CUDA_MAX_GROUPS", "FUSED_RNN_CUDA_STAGE_K", "FUSED_RNN_CUDA_K_PARTS",
             "FUSED_RNN_CUDA_CLUSTER", "FUSED_RNN_CUDA_FRAG_LOADS", "FUSED_RNN_CUDA_STAGE_COPY")
    before = [os.environ.get(k) for k in names], torch.backends.cudnn.allow_tf32
    assert mod.main() == 0
    # no leak into later tests (the TF32 flag once did: later plans then took the FMA math)
    assert ([os.environ.get(k) for k in names], torch.backends.cudnn.allow_tf32) == before
    # out of time: no case starts, none counts as checked, and the status says so
    monkeypatch.setattr("sys.argv", ["sanitize_cuda.py", "--time-budget", "-1"])
    assert mod.main() == 1
    assert "0/0 cases match the reference; 47 not checked" in capsys.readouterr().out
    # a wrong result is a failure of the run, named (its check is what makes it a test)
    real = cuda_backend.rnn_layer

    def wrong(mode, x, *rest):
        y, h, c = real(mode, x, *rest)
        return y * 1.5, h, c

    monkeypatch.setattr(cuda_backend, "rnn_layer", wrong)
    monkeypatch.setattr("sys.argv", ["sanitize_cuda.py"])
    assert mod.main() == 1
    out = capsys.readouterr()
    assert "tensor 0 err" in out.out + out.err, out


def test_what_the_ops_hand_the_extension(emulate, monkeypatch):
    """The extension gets contiguous h0/c0/w_hh/dy, int32 lengths, cuDNN's TF32 choice for fp32,
    and save=False under no_grad (it trusts all of these; binding.cpp only checks them)."""
    emu = emulate(sms=2)
    seen = {}

    def record(name, fn):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, []).append(args)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(emu, "forward", record("forward", emu.forward))
    monkeypatch.setattr(emu, "backward", record("backward", emu.backward))
    leaves, lens, _ = _inputs("LSTM", 4, 3, 5, 8, torch.float32, 0, lengths=True)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
    h0, c0 = h0.t().contiguous().t(), c0.t().contiguous().t()  # (B, H) views, column-major
    w_hh = w_hh.t().contiguous().t()
    assert not (h0.is_contiguous() or c0.is_contiguous() or w_hh.is_contiguous())
    assert lens.dtype == torch.int64
    for allow in (False, True):
        seen.clear()
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        xg = x.clone().requires_grad_(True)
        y, _, _ = cuda_backend.rnn_layer("LSTM", xg, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lens,
                                         True)
        # dy arrives as the transpose of a contiguous (B, T, H) gradient: not contiguous
        (y.transpose(0, 1) * torch.randn(3, 4, 8)).sum().backward()
        (fwd,), (bwd,) = seen["forward"], seen["backward"]
        _, _, fh0, fc0, fw_hh, _, flens, frev, ftf32, fsave = fwd[:10]
        assert all(t.is_contiguous() for t in (fh0, fc0, fw_hh))
        assert flens.dtype == torch.int32 and flens.is_contiguous()
        assert torch.equal(flens.long(), lens)
        assert (frev, ftf32, fsave) == (True, allow, True)
        bdy, bw_hh, blens, brev, btf32 = bwd[1], bwd[4], bwd[9], bwd[10], bwd[11]
        assert bdy.is_contiguous() and bw_hh.is_contiguous()
        assert blens.dtype == torch.int32 and (brev, btf32) == (True, allow)
    seen.clear()
    with torch.no_grad():
        cuda_backend.rnn_layer("LSTM", x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lens, False)
    assert seen["forward"][0][9] is False  # save


def test_saved_activations_are_not_differentiable(emulate):
    """The forward's extra outputs (gates, aux) are marked non-differentiable; y, h_n, c_n are
    not."""
    emulate(sms=2)
    leaves, _, _ = _inputs("GRU", 3, 2, 4, 8, torch.float32, 0)
    leaves = [None if t is None else t.requires_grad_(True) for t in leaves]
    y, h_n, c_n, gates, aux = ops.cuda_layer("GRU", *leaves, None, False, True, False)
    assert gates.numel() and aux.numel()
    assert not gates.requires_grad and not aux.requires_grad
    assert y.requires_grad and h_n.requires_grad and c_n.numel() == 0


def test_unsupported_reason_before_the_device(emulate, monkeypatch):
    """An unknown kind, a size of 0 (either one), a non-CUDA device and an unavailable backend
    are refused with a reason; the limits are read from the device asked about (its index)."""
    emu = emulate(sms=132, smem_optin=227 * 1024)
    asked = []
    info = emu.device_info
    emu.device_info = lambda index: (asked.append(index), info(index))[1]
    cfg = {"mode": "GRU", "dtype": torch.float16, "proj_size": 0, "has_lengths": False}
    cuda = torch.device("cuda", 1)
    for I, H in ((0, 8), (8, 0)):
        why = cuda_backend.unsupported_reason("layer", device=cuda, input_size=I, hidden_size=H,
                                              **cfg)
        assert why and "size of 0" in why
    why = cuda_backend.unsupported_reason("layer", device=torch.device("cpu"), input_size=8,
                                          hidden_size=8, **cfg)
    assert why and "not cpu" in why
    assert asked == []
    assert cuda_backend.unsupported_reason("cell", device=cuda, input_size=8, hidden_size=8,
                                           **cfg) is None
    assert asked == [1]
    why = cuda_backend.unsupported_reason("step", device=cuda, input_size=8, hidden_size=8, **cfg)
    assert why and "unknown kind 'step'" in why
    monkeypatch.setattr(_ext, "unavailable_reason", lambda device: "no GPU here")
    assert cuda_backend.unsupported_reason("layer", device=cuda, input_size=8, hidden_size=8,
                                           **cfg) == "no GPU here"
    assert asked == [1]


def test_time_parallel_gemms_follow_the_recurrence_math(emulate, monkeypatch):
    """The input projection and the dx/dW GEMMs run under TF32 for fp32 exactly when cuDNN's
    RNNs may, and always for 16-bit data (common.gemms_use_tf32)."""
    import contextlib

    emulate(sms=2)
    windows = []

    @contextlib.contextmanager
    def record(enabled):
        windows.append(enabled)
        yield

    monkeypatch.setattr(ops, "tf32_gemms", record)
    for allow, dtype, want in ((False, torch.float32, False), (True, torch.float32, True),
                               (False, torch.bfloat16, True)):
        windows.clear()
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        _compare("GRU", 2, 2, 3, 16, dtype, False, False)
        assert windows == [want, want]  # forward projection, backward GEMMs


@pytest.mark.parametrize("mode", MODES)
def test_fake_outputs_match_the_real_ones_in_16_bit(emulate, mode):
    """The fake kernel (torch.compile's view of the op) gives every output the real one's shape
    and dtype, including the fp32 saved activations of bf16 data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    emulate(sms=2)
    leaves, lens, _ = _inputs(mode, 3, 2, 4, 8, torch.bfloat16, 0, lengths=True)
    for save in (True, False):
        args = (mode, *leaves, lens, False, save, False)
        real = ops.cuda_layer(*args)
        with FakeTensorMode() as fm:
            fake_args = [fm.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = ops.cuda_layer(*fake_args)
        assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
        assert real[3].dtype == torch.float32 and (real[3].numel() > 0) == save
