"""Random module configurations against torch.nn: outputs and every gradient.

The test grids (test_modules.py) cover each option at fixed small sizes; this draws the
options and the sizes together, from a seed: layer or cell module, cell, input/hidden sizes
(1 included), layers, bias, batch_first, bidirectional, proj_size, dropout (off: eval mode),
fp32 or fp64, input batched, unbatched or packed (sorted or not), with or without hx, a batch
of one and a sequence of one among them, input and hx as strided views (not contiguous;
packing copies the input, and the sorted packed form's reordering the state), and some
inputs, states and parameters not requiring grad (frozen weights). ``test_api_fuzz.py`` runs
a slice of it in the suite; by hand, for a sweep after a change:

    python tests/api_fuzz.py BACKEND FIRST_SEED COUNT [DTYPE]

prints each failing seed with its case and the error, then a count and the fallbacks taken
(exit code 1 if any case failed). DTYPE:

* none, ``float32`` or ``float64``: :func:`check` (``float32`` for the kernel backends,
  which take no fp64);
* ``bfloat16``, ``float16``, ``amp-bfloat16``, ``amp-float16``: :func:`check_low_precision`,
  FlashAttention's rule for the kernel backends (triton, cuda), in the dtype or under
  ``torch.autocast``; PyTorch's own CPU kernels (auto, torch) round otherwise and are not
  held to it;
* ``bad`` or ``bad-float32``: :func:`check_bad_input`, every corruption of CORRUPTIONS in
  turn: torch.nn's errors, or its outputs.

BACKEND may name a torch.compile backend after an @ (``auto@inductor``, ``triton@aot_eager``):
ours then runs compiled, a fresh compile each case (seconds each on the CPU), in every check but
the bad-input one, which compares errors and runs eagerly. Without a GPU,
``cuda`` runs the CUDA kernels on cudasim with TF32 off; on a GPU machine the modules run on
the GPU (TF32 off).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

# As conftest.py: without a GPU the Triton kernels run under the interpreter, which Triton
# reads when the kernels are defined (fused_rnn imports them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import CELLS, STEP_CELLS, assert_close_list, make_packed, outputs_of

# As test_modules.py: fp32 covers summation-order differences, fp64 must agree to rounding.
TOLERANCES = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-5, 1e-4)}


def draw(seed: int) -> dict:
    """The case of ``seed``: a dict of plain values (printable, and all a run needs)."""
    r = random.Random(seed)
    cell = r.choice(list(CELLS))
    case = {"seed": seed, "cell": cell, "step": r.random() < 0.25, "I": r.randint(1, 6),
            "H": r.randint(1, 7), "B": r.choice([1, 1, 2, 3, 5]), "bias": r.random() < 0.8,
            "dtype": r.choice(["float32", "float64"]), "hx": r.random() < 0.6,
            "strided": r.random() < 0.3}
    if case["step"]:
        case["form"] = r.choice(["batched", "batched", "unbatched"])
        case["grads"] = _draw_grads(r)
        return case
    case.update(T=r.choice([1, 2, 3, 5, 8]), layers=r.choice([1, 1, 2, 3]),
                bidirectional=r.random() < 0.4, batch_first=r.random() < 0.4,
                form=r.choice(["batched", "batched", "unbatched", "packed_sorted",
                               "packed_unsorted"]),
                dropout=r.choice([0.0, 0.0, 0.4]))
    case["proj"] = r.randint(1, case["H"] - 1) if cell == "lstm" and case["H"] > 1 \
        and r.random() < 0.3 else 0
    case["grads"] = _draw_grads(r)
    return case


def _draw_grads(r: random.Random) -> str:
    """Which tensors require grad: "all", or "some" (input, state and each parameter with
    probability 1/2 each, from the case's seed: frozen weights, a constant input)."""
    return r.choice(["all", "all", "all", "some"])


def _requires_grad(case: dict, names: list[str]) -> dict[str, bool]:
    """For each of ``names`` ("x", "h0", "h1", then the parameters in order), whether it
    requires grad in this case."""
    if case.get("grads", "all") == "all":
        return dict.fromkeys(names, True)
    r = random.Random(case["seed"] + 7)
    return {name: r.random() < 0.5 for name in names}


def _pair(case: dict, backend: str):
    nn_cls, our_cls, extra = (STEP_CELLS if case["step"] else CELLS)[case["cell"]]
    dtype = getattr(torch, case["dtype"])
    kwargs = dict(bias=case["bias"], dtype=dtype, **extra)
    if not case["step"]:
        kwargs.update(num_layers=case["layers"], bidirectional=case["bidirectional"],
                      batch_first=case["batch_first"], dropout=case["dropout"])
        if case["proj"]:
            kwargs["proj_size"] = case["proj"]
    torch.manual_seed(case["seed"])
    with warnings.catch_warnings():  # both warn of dropout with one layer, as they should
        warnings.simplefilter("ignore", UserWarning)
        ref = nn_cls(case["I"], case["H"], **kwargs)
        ours = our_cls(case["I"], case["H"], **kwargs, backend=backend)
    ours.load_state_dict(ref.state_dict())
    names = [name for name, _ in ref.named_parameters()]
    wants = _requires_grad(case, ["x", "h0", "h1", *names])
    for m in (ref, ours):
        for name, p in m.named_parameters():
            p.requires_grad_(wants[name])
    # Dropout between layers is drawn from torch's generator in training (a test of its
    # own, test_modules.py); here it must be off, as eval mode makes it.
    for m in (ref, ours):
        m.train(case.get("dropout", 0.0) == 0.0)
    return ref, ours


def _inputs(case: dict):
    """(x, hx leaves, lengths) for the case, from its seed."""
    g = torch.Generator().manual_seed(case["seed"] + 1)
    dtype = getattr(torch, case["dtype"])
    B, I, H = case["B"], case["I"], case["H"]
    lstm = case["cell"] == "lstm"
    if case["step"]:
        x = torch.randn(B, I, generator=g, dtype=dtype)
        hs = [torch.randn(B, H, generator=g, dtype=dtype) for _ in range(2 if lstm else 1)]
        return x, hs, None
    T, D = case["T"], 2 if case["bidirectional"] else 1
    P = case["proj"] or H
    x = torch.randn((B, T, I) if case["batch_first"] else (T, B, I), generator=g, dtype=dtype)
    hs = [torch.randn(case["layers"] * D, B, P, generator=g, dtype=dtype)]
    if lstm:
        hs.append(torch.randn(case["layers"] * D, B, H, generator=g, dtype=dtype))
    lengths = None
    if case["form"].startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[int(torch.randint(0, B, (1,), generator=g))] = T
    return x, hs, lengths


def _strided(t: Tensor) -> Tensor:
    """``t``'s values in a view that is not contiguous: every other column of a wider buffer."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype,
                      device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _run(module, case: dict, x, hs, lengths, cot_round: torch.dtype | None = None,
         backward_region=contextlib.nullcontext):
    """Outputs and gradients (inputs' then parameters') of ``module`` on the case's input,
    from cotangents drawn from the case's seed: drawn in fp64 and cast, since torch.randn's
    values for one seed differ across dtypes (from 16 elements on, CPU), and rounded through
    ``cot_round`` first where given (an fp64 run standing for a 16-bit one). The backward runs
    inside ``backward_region()`` (within the caller's region, if it has one)."""
    lstm = case["cell"] == "lstm"
    wants = _requires_grad(case, ["x", "h0", "h1"])
    xi = x.clone().requires_grad_(wants["x"])
    his = [h.clone().requires_grad_(wants[f"h{i}"]) for i, h in enumerate(hs)]
    if case.get("strided"):  # the leaves stay contiguous; the module sees strided views
        xi_in, his_in = _strided(xi), [_strided(h) for h in his]
    else:
        xi_in, his_in = xi, his
    form = case["form"]
    if form == "unbatched":
        bdim = 0 if case["step"] else (0 if case["batch_first"] else 1)
        xin = xi_in.select(bdim, 0)
        hin = [h[0] if case["step"] else h[:, 0] for h in his_in]
    elif form.startswith("packed"):
        sorted_ = form == "packed_sorted"
        xin = make_packed(xi_in, lengths, case["batch_first"], enforce_sorted=sorted_)
        hin = list(his_in)
        if sorted_:  # enforce_sorted=True: the caller sorted the batch, hx with it
            order = torch.argsort(lengths, descending=True, stable=True)
            hin = [h[:, order] for h in hin]
    else:
        xin, hin = xi_in, list(his_in)
    leaves = [xi]
    if case["hx"]:
        out = module(xin, tuple(hin) if lstm else hin[0])
        leaves += his
    else:
        out = module(xin)
    if case["step"]:
        outs = list(out) if lstm else [out]
    else:
        outs = outputs_of(out)
    g = torch.Generator().manual_seed(case["seed"] + 2)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(cot_round or o.dtype)
            .to(o.device, o.dtype) for o in outs]
    pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
    if pairs:  # (nothing may require grad)
        with backward_region():
            torch.autograd.backward(*zip(*pairs))
    return outs, [t.grad for t in leaves] + [p.grad for p in module.parameters()]


@contextlib.contextmanager
def _cudnn_off_in_eval(device, module):
    """cuDNN's RNN backward refuses a module in eval mode ("cudnn RNN backward can only be
    called in training mode"), which a case with dropout runs in: there, torch.nn (and ours on
    auto/torch) take PyTorch's native CUDA kernels instead. Set and restored directly, not
    through ``cudnn.flags()``, which would also reset TF32 through its legacy setter."""
    if torch.device(device).type != "cuda" or module.training:
        yield
        return
    prev = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = prev


def check(seed: int, backend: str, dtype: str | None = None, device: str = "cpu") -> dict:
    """Run case ``seed`` on torch.nn and on ``backend``, on ``device``; raise AssertionError
    where they differ. ``backend`` may name a torch.compile backend after an @
    ("auto@inductor", "reference@aot_eager"): ours then runs compiled. ``dtype``
    ("float32"/"float64") replaces the drawn one (the kernels take no fp64). On a GPU, fp32
    compares at fp32's tolerance with TF32 off only. Returns the case."""
    case = draw(seed)
    if dtype is not None:
        case["dtype"] = dtype
    backend, _, compiler = backend.partition("@")
    ref, ours = (m.to(device) for m in _pair(case, backend))
    x, hs, lengths = _inputs(case)  # lengths stay on the CPU, as packing wants them
    x, hs = x.to(device), [h.to(device) for h in hs]
    with _cudnn_off_in_eval(device, ref):
        outs_ref, grads_ref = _run(ref, case, x, hs, lengths)
        if compiler:
            torch._dynamo.reset()
            ours = torch.compile(ours, backend=compiler)
        outs, grads = _run(ours, case, x, hs, lengths)
    atol, rtol = TOLERANCES[getattr(torch, case["dtype"])]
    assert_close_list(outs, outs_ref, atol, rtol, f"seed {seed} outputs")
    assert_close_list(grads, grads_ref, atol, rtol, f"seed {seed} grads")
    return case


# 16-bit dtypes: FlashAttention's rule, as tests/cuda and tests/triton use it per layer. All
# runs start from the same values (weights, inputs, cotangents rounded to the dtype); against
# the fp64 run, our relative error (Frobenius, per tensor) may be at most twice the error of
# the reference backend computed in the dtype, or the floor (outputs, gradients): the floor
# covers what the kernels round and the reference does not. Measured (api_fuzz CLI, seeds
# 1000..1599, triton and cuda, each dtype plain and under autocast): no output needed a floor;
# the largest gradient floor needed was 2.8e-2 in bf16 (a tensor of a few elements, of a
# 3-layer GRU with hidden size 1), 2.1e-3 in fp16. RNN_RELU's gradients take bf16's floor in both dtypes: relu' jumps at 0, so
# a pre-activation rounded to the other side of it moves a gradient element by its whole value
# (2.1e-2 seen in fp16 under autocast, on a 2-element h0 grad). A gradient of fewer than
# SMALL elements takes twice the floor: one element that is a sum of many terms cancelling
# is the whole of its relative error (held-out seeds 2000..2599 found a 1-element W_hh grad
# at 6.7e-2 in bf16 on triton, a 1-element h0 grad at 8.0e-3 in fp16 on cuda).
LOW_PRECISION_FLOORS = {"bfloat16": (4e-3, 4e-2), "float16": (1e-3, 6e-3)}
# What DTYPE may be (the module docstring); None: not given.
DTYPE_CHOICES = (None, "float32", "float64", *LOW_PRECISION_FLOORS,
                 *(f"amp-{d}" for d in LOW_PRECISION_FLOORS), "bad", "bad-float32")
RELU_GRAD_FLOOR = 4e-2
SMALL = 4


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _to_reference() -> int:
    """How many calls so far fell back to the reference backend."""
    from fused_rnn import backends

    return sum(n for (_, _, to), n in backends.fallback_counts().items() if to == "reference")


def check_low_precision(seed: int, backend: str, dtype: str, device: str = "cpu",
                        autocast: bool = False) -> float:
    """Case ``seed`` in ``dtype`` (bfloat16 or float16) on ``backend`` against the same module
    in fp64, by the rule above. The module is built in fp64 and rounded to ``dtype``, its
    inputs too, so all three runs compute from the same values. ``autocast``: module and data
    in fp32 (holding those values), the runs but the fp64 one inside ``torch.autocast`` to
    ``dtype`` (outputs in ``dtype``, gradients in fp32). ``backend`` may name a torch.compile
    backend after an @, as in :func:`check`: ours then runs compiled. Returns the largest error
    over its bound (at most 1 where the case passes; AssertionError otherwise)."""
    backend, _, compiler = backend.partition("@")
    floor_out, floor_grad = LOW_PRECISION_FLOORS[dtype]
    low = getattr(torch, dtype)
    handed = torch.float32 if autocast else low  # what module and data are in for the runs
    case = {**draw(seed), "dtype": "float64"}
    runs = {}
    before = _to_reference()
    for name, b in (("exact", "reference"), ("same", "reference"), ("ours", backend)):
        module, (x, hs, lengths) = _pair(case, b)[1], _inputs(case)
        # All three start from the same values: rounded to the dtype (the fp64 run too; under
        # autocast, which would round them on the way in anyway), and so are the cotangents.
        module, x, hs = module.to(low), x.to(low), [h.to(low) for h in hs]
        dt = torch.float64 if name == "exact" else handed
        module = module.to(device, dt)
        if name == "ours" and compiler:
            torch._dynamo.reset()
            module = torch.compile(module, backend=compiler)
        region = torch.autocast(torch.device(device).type, dtype=low,
                                enabled=autocast and name != "exact")
        with region:
            outs, grads = _run(module, case, x.to(device, dt), [h.to(device, dt) for h in hs],
                               lengths, cot_round=low)
        runs[name] = (len(outs), outs + grads)
    # Ours on the reference would be held to twice its own error: a test that cannot fail.
    assert _to_reference() == before, f"seed {seed}: {backend} fell back to the reference"
    n_out = runs["exact"][0]
    assert len(runs["ours"][1]) == len(runs["exact"][1]) and runs["ours"][0] == n_out, seed
    worst = 0.0
    for i, (a, s, e) in enumerate(zip(runs["ours"][1], runs["same"][1], runs["exact"][1])):
        assert (a is None) == (e is None), f"seed {seed} tensor {i}: {a is None=}, {e is None=}"
        if e is None:
            continue
        assert a.shape == e.shape, f"seed {seed} tensor {i}: {tuple(a.shape)} vs {tuple(e.shape)}"
        if not e.numel() or not e.any():
            assert not a.any(), f"seed {seed} tensor {i}: expected zeros"
            continue
        want = low if i < n_out or not autocast else torch.float32
        assert a.dtype == want and torch.isfinite(a).all(), (seed, i, a.dtype)
        floor = floor_out if i < n_out else floor_grad
        if i >= n_out and case["cell"] == "rnn_relu":
            floor = max(floor, RELU_GRAD_FLOOR)
        if i >= n_out and e.numel() < SMALL:
            floor *= 2
        bound = max(2 * _rel(s, e), floor)
        err = _rel(a, e)
        assert err <= bound, f"seed {seed} tensor {i}: error {err:.3g} > bound {bound:.3g}"
        worst = max(worst, err / bound)
    return worst


def amp_backward_region_runs(seed: int, backend: str, dtype: str, device: str = "cpu"):
    """Case ``seed`` on ``backend`` in fp32 under ``torch.autocast`` to ``dtype``, twice: the
    backward inside the autocast region (as :func:`check_low_precision` runs it), then with
    autocast off around it (as PyTorch's AMP recipe puts it). Returns both runs' outputs and
    gradients."""
    low = getattr(torch, dtype)
    case = {**draw(seed), "dtype": "float32"}
    runs = []
    for region in (contextlib.nullcontext,
                   lambda: torch.autocast(torch.device(device).type, enabled=False)):
        module, (x, hs, lengths) = _pair(case, backend)[1], _inputs(case)
        module = module.to(device, torch.float32)
        with torch.autocast(torch.device(device).type, dtype=low):
            outs, grads = _run(module, case, x.to(device), [h.to(device) for h in hs], lengths,
                               cot_round=low, backward_region=region)
        runs.append(outs + grads)
    return runs


# ------------------------------------------------------------------ bad input
CORRUPTIONS = ("x_size", "x_more_dims", "x_fewer_dims", "x_integer", "x_other_dtype", "x_no_rows",
               "x_no_steps", "x_nan", "h_rows", "h_layers", "h_size", "h_other_dtype",
               "h_integer", "h_fewer_dims", "hx_count", "hx_kind", "hx_none", "c_size")
DTYPE_CORRUPTIONS = ("x_integer", "x_other_dtype", "h_other_dtype", "h_integer")
# Packed input: where torch.nn checks less than for the same input unpacked, what ours raises
# (torch.nn's exception for the fault where it does check). nn.LSTM checks nothing of packed
# input (torch 2.13: its forward skips check_forward_args there), and accepts a state of the
# wrong layer count or size; GRU and RNN reorder the state by the sort before they check it,
# so they accept one with more rows than the batch (picking some) and report a 2-D state's
# shape after reordering its last dim.
PACKED_LAX = {"x_size": (RuntimeError, "input.size(-1) must be equal to input_size"),
              "x_integer": (ValueError, "does not match weight dtype"),
              "x_other_dtype": (ValueError, "does not match weight dtype"),
              "h_rows": (RuntimeError, "Expected hidden"),
              "h_layers": (RuntimeError, "Expected hidden"),
              "h_size": (RuntimeError, "Expected hidden"),
              "c_size": (RuntimeError, "Expected hidden"),
              "h_fewer_dims": (RuntimeError, "Expected hidden")}


def corrupt(case: dict, which: str, x: Tensor, hs: list[Tensor]):
    """The case's (x, hx) with one thing made wrong (``which``, one of CORRUPTIONS), or None
    where that does not apply to the case. Unbatched cases keep the unbatched shapes."""
    lstm, step = case["cell"] == "lstm", case["step"]
    if case["form"] == "unbatched":
        bdim = 0 if step else (0 if case["batch_first"] else 1)
        x, hs = x.select(bdim, 0), [h[0] if step else h[:, 0] for h in hs]
    hs = list(hs)
    i = case["seed"] % len(hs)  # which state tensor a state corruption hits
    other = torch.float64 if x.dtype == torch.float32 else torch.float32
    if which == "x_size":
        x = torch.randn(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
    elif which == "x_more_dims":
        x = x.unsqueeze(0)
    elif which == "x_fewer_dims":
        x = x.reshape(-1) if x.dim() == 2 else x[0]
    elif which == "x_integer":
        x = (x * 3).long()
    elif which == "x_other_dtype":
        x = x.to(other)
    elif which == "x_no_rows" and case["form"] != "unbatched":
        x = x.narrow(0 if step or case["batch_first"] else 1, 0, 0)
    elif which == "x_no_steps" and not step:  # the time axis: (T, I), (T, B, I) or (B, T, I)
        x = x.narrow(1 if case["batch_first"] and case["form"] != "unbatched" else 0, 0, 0)
    elif which == "x_nan":
        x = x.clone()
        x.view(-1)[0] = float("nan")
    elif which == "h_rows" and case["form"] != "unbatched":  # the batch axis: (B, H), (L, B, H)
        hs[i] = torch.cat([hs[i], hs[i]], hs[i].dim() - 2)
    elif which == "h_layers" and not step:
        hs[i] = torch.cat([hs[i], hs[i][:1]], 0)
    elif which == "h_size":
        hs[i] = torch.cat([hs[i], hs[i][..., :1]], -1)
    elif which == "h_other_dtype":
        hs[i] = hs[i].to(other)
    elif which == "h_integer":
        hs[i] = hs[i].long()
    elif which == "h_fewer_dims":
        hs[i] = hs[i][0]
    elif which == "hx_count":
        hs = hs + [hs[0]] if lstm else [hs[0], hs[0]]
    elif which == "hx_kind":
        return x, (hs[0] if lstm else tuple(hs))
    elif which == "hx_none" and lstm:  # (a GRU's or RNN's hx of None is no corruption)
        hs[i] = None
    elif which == "c_size" and lstm:
        hs[1] = torch.cat([hs[1], hs[1]], -1)
    else:
        return None
    return x, (tuple(hs) if lstm or len(hs) != 1 else hs[0])


def _call(module, x, hx):
    try:
        with torch.no_grad():
            return module(x, hx), None
    except Exception as e:  # comparing what each raises is the point
        return None, e


def check_bad_input(seed: int, backend: str, which: str, dtype: str | None = None) -> str:
    """Case ``seed`` with one corruption, through torch.nn and ours, on the CPU without grad.
    ``dtype`` replaces the drawn one (the Triton kernels take no fp64).

    Packed cases take the corruptions of the state and of the values (an input that cannot
    be packed is not drawn). Where torch.nn raises, ours raises the same exception with the
    same message (a dtype
    mismatch aside: torch.nn's words come from aten's matmul, ours name the dtypes); where
    torch.nn accepts, ours gives its outputs. The differences README names: an hx of the
    wrong structure gets a
    TypeError or RuntimeError that names hx, whatever torch.nn did (its AttributeErrors and
    IndexErrors come by accident, and an unbatched nn.LSTM drops the third tensor of a
    3-tuple); a state of another dtype than the input is refused
    (torch.nn's CPU kernels compute in the wider one); a cell given batched input and an
    unbatched state or the reverse says so, and torch.nn's is not run there (nn.LSTMCell of
    hidden size 1 crashes the process); packed input of the wrong width, or a state with more
    rows than its batch, is refused in the words torch.nn uses unpacked (torch.nn checks
    neither when the input is packed: it may accept them, see PACKED_LAX). Returns what
    happened, for a summary."""
    case = {**draw(seed), "hx": True}
    if dtype is not None:
        case["dtype"] = dtype
    packed = case["form"].startswith("packed")
    if packed and which in ("x_more_dims", "x_fewer_dims", "x_no_rows", "x_no_steps"):
        return "n/a"  # no such input can be packed
    ref, ours = _pair(case, backend)
    x, hs, lengths = _inputs(case)
    got = corrupt({**case, "form": "batched"} if packed else case, which, x, hs)
    if got is None:
        return "n/a"
    x, hx = got
    if packed:  # (hx stays in the caller's order: the same for both, right or wrong)
        x = make_packed(x, lengths, case["batch_first"],
                        enforce_sorted=case["form"] == "packed_sorted")
    states = [h for h in (hx if isinstance(hx, tuple) else (hx,)) if isinstance(h, Tensor)]
    where = f"seed {seed} {which}"
    if case["step"] and x.dim() in (1, 2) and any(h.dim() in (1, 2) and h.dim() != x.dim()
                                                  for h in states):
        _, err = _call(ours, x, hx)
        assert isinstance(err, RuntimeError) and "should also be" in str(err), (where, err)
        return "refused (dims)"
    if packed and case["cell"] == "lstm" and which.startswith(("h_", "c_")):
        # nn.LSTM checks nothing of a packed input's state, and some of these crash the
        # process there (torch 2.13 CPU: h of 3 layers and c of 2 for a bidirectional layer,
        # a segfault): not run. Ours refuses each, as torch.nn's GRU and RNN would.
        _, err = _call(ours, x, hx)
        kind, said = PACKED_LAX.get(which, (RuntimeError, "dtype"))
        assert type(err) is kind and said in str(err), (where, err)
        return "refused (packed LSTM state; nn not run)"
    out_ref, err_ref = _call(ref, x, hx)
    out, err = _call(ours, x, hx)
    if packed and which in PACKED_LAX:
        kind, said = PACKED_LAX[which]
        assert type(err) is kind and said in str(err), (where, err)
        return "refused (packed)" if err_ref is not None else "refused (packed; nn accepted)"
    if which.startswith("hx_"):  # never a valid hx; torch.nn.LSTM takes a 3-tuple unbatched
        assert isinstance(err, (TypeError, RuntimeError)) and "hx" in str(err), (where, err)
        return "refused (hx)" if err_ref is not None else "refused (hx; torch.nn accepted)"
    if which in ("h_other_dtype", "h_integer") and err_ref is None:
        assert isinstance(err, RuntimeError) and "dtype" in str(err), (where, err)
        return "refused (state dtype)"
    if err_ref is not None:
        assert err is not None, f"{where}: torch.nn raised {err_ref!r}, ours did not"
        assert type(err) is type(err_ref), f"{where}: torch.nn raised {err_ref!r}, ours {err!r}"
        if which in DTYPE_CORRUPTIONS:  # torch.nn's words come from aten's matmul here
            assert "dtype" in str(err), (where, err)
        else:
            assert str(err) == str(err_ref), f"{where}: torch.nn said {err_ref}, ours {err}"
        return "both raised"
    assert err is None, f"{where}: torch.nn accepted, ours raised {err!r}"
    flat = (lambda o: list(o) if isinstance(o, tuple) else [o]) if case["step"] else outputs_of
    atol, rtol = TOLERANCES[getattr(torch, case["dtype"])]
    got, want = flat(out), flat(out_ref)
    assert len(got) == len(want), f"{where}: {len(got)} outputs, torch.nn {len(want)}"
    for a, b in zip(got, want):  # NaN input: NaN where torch.nn has NaN
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)
    return "both accepted"


def _cuda_tests_importable() -> None:
    here = str(Path(__file__).resolve().parent / "cuda")
    if here not in sys.path:
        sys.path.insert(0, here)


def cudasim_reason() -> str | None:
    """Why cudasim cannot run here (None where it can)."""
    _cuda_tests_importable()
    from simulate import unavailable_reason

    return unavailable_reason()


def cuda_standin(monkeypatch) -> None:
    """Without a GPU, ``cuda`` runs csrc/'s kernels on cudasim (tests/cuda/simulate.py, every
    CUDA thread executed; needs g++), as test_cuda_gpu.py does: behind binding.cpp itself
    (tests/cuda/host_binding.py) where it builds, else (or with ``FUSED_RNN_CUDA_SIM=1``)
    behind its mirror. ``monkeypatch``: pytest's. (Compare fp32 inside :func:`tf32_off`.)"""
    _cuda_tests_importable()
    from cases import install_standin
    from host_binding import HostBinding
    from host_binding import unavailable_reason as no_host_build
    from simulate import Simulator

    mirror = os.environ.get("FUSED_RNN_CUDA_SIM") == "1" or no_host_build() is not None
    install_standin(monkeypatch, (Simulator if mirror else HostBinding)(sms=8))


@contextlib.contextmanager
def tf32_off():
    """No TF32 for fp32 inside (so fp32 compares at fp32's tolerance): cuDNN's RNNs, which the
    kernel backends follow, and cuBLAS, which runs their time-parallel GEMMs; restored after.

    Through torch's own getters and setters, not pytest's monkeypatch: pytest 9.2's undo
    deletes an attribute that the instance's ``__dict__`` lacked, and these settings live
    behind ``__getattr__`` (the undo failed, the rest of it was skipped, and cuDNN's RNN
    precision stayed changed for the later tests of that worker). Through the per-operator
    ``fp32_precision`` where torch has it: after that is used, its legacy ``allow_tf32`` flags
    raise (a mix of the two APIs)."""
    get = getattr(torch._C, "_get_fp32_precision_getter", None)
    if get is None:  # torch < 2.9
        cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
        saved = cudnn.allow_tf32, matmul.allow_tf32
        cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            cudnn.allow_tf32, matmul.allow_tf32 = saved
        return
    keys = [("cuda", "rnn"), ("cuda", "matmul")]  # torch.backends.cudnn.rnn, .cuda.matmul
    saved = [(key, get(*key)) for key in keys]
    for key in keys:
        torch._C._set_fp32_precision_setter(*key, "ieee")
    try:
        yield
    finally:
        for key, value in saved:
            torch._C._set_fp32_precision_setter(*key, value)


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__)
        return 2
    backend, first, count = argv[0], int(argv[1]), int(argv[2])
    dtype = argv[3] if len(argv) == 4 else None
    if dtype not in DTYPE_CHOICES:  # else every case fails on the name (amp-bf16: KeyError)
        print(f"DTYPE must be one of {', '.join(d for d in DTYPE_CHOICES if d)}, not {dtype!r}")
        return 2
    if "@" in backend and dtype in ("bad", "bad-float32"):
        print(f"{backend!r}: the bad-input check runs eagerly only (torch.compile wraps the "
              "errors it compares); name the backend without @")
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend.partition("@")[0] == "cuda" and device == "cpu":
        import pytest

        cuda_standin(pytest.MonkeyPatch())
    failed = 0
    with tf32_off():
        for seed in range(first, first + count):
            try:
                _check_one(seed, backend, dtype, device)
            except Exception as e:  # a sweep reports every kind of failure
                failed += 1
                case = {**draw(seed), **({"dtype": dtype} if dtype else {})}
                print(f"seed {seed} FAILED {case}\n  {type(e).__name__}: {e}")
    print(f"{count} cases on {backend!r} from seed {first}: {failed} failed")
    from fused_rnn import backends

    for (name, reason, to), calls in sorted(backends.fallback_counts().items()):
        print(f"  fell back from {name!r} to {to!r} {calls} times: {reason}")
    return 1 if failed else 0


def _check_one(seed: int, backend: str, dtype: str | None, device: str) -> None:
    """Case ``seed`` by the check DTYPE names (the module docstring)."""
    if dtype in ("bad", "bad-float32"):
        for which in CORRUPTIONS:
            check_bad_input(seed, backend, which, "float32" if dtype == "bad-float32" else None)
    elif dtype in LOW_PRECISION_FLOORS:
        check_low_precision(seed, backend, dtype, device)
    elif dtype and dtype.startswith("amp-"):
        check_low_precision(seed, backend, dtype[4:], device, autocast=True)
    else:
        check(seed, backend, dtype, device)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
