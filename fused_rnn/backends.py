"""Backend names, what this machine can run, and which implementation a call gets.

Backends:

=========== ===================================================================================
reference   plain PyTorch (``fused_rnn/ops/reference.py``): every device and dtype, slow, exact
torch       PyTorch's own RNN kernels (aten on the CPU, cuDNN on a GPU) for the whole stack
triton      fused Triton kernels (a CUDA GPU, or the CPU under ``TRITON_INTERPRET=1``)
cuda        persistent CUDA C++ kernels from ``csrc/`` (a CUDA GPU and a built extension)
auto        the fastest backend verified for the configuration (``resolve_stack``)
=========== ===================================================================================

A kernel backend that cannot take a configuration (size, dtype, device) falls back to the next
one (cuda → triton → reference) with a one-time warning naming the reason; it never computes
something it was not verified for.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import threading
from types import ModuleType

import torch

from fused_rnn.ops.common import ForkSafeLock, check_measured_rule, warn_at_caller

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")
_FALLBACK = {"cuda": "triton", "triton": "reference"}


def check_name(name: object) -> str:
    """Raise ``ValueError`` unless ``name`` is a backend name; return it."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; valid backends are {', '.join(map(repr, BACKENDS))}"
        )
    return name


def _kernel_module(name: str) -> ModuleType:
    # sys.modules first: dynamo traces a dict lookup but graph-breaks on importlib, so a call
    # under torch.compile(fullgraph=True) must find the module already imported (it is:
    # ``unavailable_reason`` below runs eagerly and imports it).
    key = f"fused_rnn.ops.{name}"
    return sys.modules[key] if key in sys.modules else importlib.import_module(key)


# Runs eagerly even under torch.compile (dynamo keeps the answer as a constant): availability
# checks import modules and probe the machine, which dynamo cannot trace.
@torch.compiler.assume_constant_result
def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run here (on ``device`` if given), or None if it can."""
    check_name(name)
    if name in ("auto", "reference", "torch"):
        return None
    try:
        mod = _kernel_module(name)
    except ImportError as e:  # the backend's package is not there at all
        return f"its module could not be imported ({e})"
    return mod.unavailable_reason(None if device is None else torch.device(device))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on this machine (on ``device`` if given).

    Examples::

        >>> import fused_rnn
        >>> "reference" in fused_rnn.available_backends()
        True
    """
    return [n for n in BACKENDS if unavailable_reason(n, device) is None]


def backend_report(device: torch.device | str | None = None) -> dict[str, str]:
    """Every backend name mapped to "available" or the reason it is not."""
    return {n: unavailable_reason(n, device) or "available" for n in BACKENDS}


def require(name: str, device: torch.device | str | None = None) -> None:
    """Raise ``RuntimeError`` (saying why and how to get it) if ``name`` cannot run."""
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"fused_rnn backend {name!r} is unavailable: {reason}")


@dataclasses.dataclass(frozen=True)
class AutoRule:
    """Configurations of a layer stack where ``auto`` runs a kernel backend instead of
    PyTorch's own kernels.

    A rule is added to :data:`AUTO_RULES` only from a committed GPU run (``evidence``: its file
    under ``benchmarks/results/``) in which the backend passed its GPU tests and beat cuDNN on
    these configurations. Ranges are inclusive; ``dtypes`` is the dtype the cells compute in
    (autocast's where autocast is on).
    """

    backend: str
    modes: frozenset[str]
    dtypes: frozenset[torch.dtype]
    hidden: tuple[int, int]
    batch: tuple[int, int]
    evidence: str
    layers: tuple[int, int] = (1, 1)
    bidirectional: bool = False  # whether bidirectional stacks are included
    device_type: str = "cuda"
    # For fp32: True, the rule holds only while cuDNN's RNNs may use TF32 (the default, and
    # what an "fp32" row measures with it on); False, only while they may not ("fp32-strict"
    # rows: the plain-fp32 kernels against strict cuDNN); None, either way.
    tf32: bool | None = None
    # The compute capability of the GPU the rule was measured on; it holds on that kind of GPU
    # only (the kernels' plans follow its SM count and shared memory). None: any.
    capability: tuple[int, int] | None = None
    # The sequence lengths (steps a call) measured: a short chunk pays a launch and W_hh's
    # load for few steps, so a win at T=64..1024 says nothing about T=4.
    steps: tuple[int, int] = (1, 2**31 - 1)
    # Whether LSTM projections (proj_size) and calls with lengths (packed sequences) are
    # included: the bench times neither (bench_gpu.py: one layer, no projection, no lengths).
    projection: bool = False
    lengths: bool = False

    def __post_init__(self) -> None:
        if self.backend not in KERNEL_BACKENDS:
            raise ValueError(f"an AutoRule names a kernel backend {KERNEL_BACKENDS}, "
                             f"not {self.backend!r}")
        check_measured_rule("an AutoRule", self.modes, self.dtypes, self.tf32, self.evidence,
                            hidden=self.hidden, batch=self.batch, layers=self.layers,
                            steps=self.steps)

    def matches(self, device_type: str, mode: str, dtype: torch.dtype, hidden_size: int,
                batch: int, num_layers: int, bidirectional: bool, tf32: bool = True,
                capability: tuple[int, int] | None = None, steps: int | None = None) -> bool:
        """tf32: whether cuDNN's RNNs may use TF32 now (``ops.common.cudnn_rnn_tf32``);
        capability: the device's compute capability; steps: the call's sequence length
        (None: not known, not checked)."""
        return (self.matches_stack(device_type, mode, dtype, hidden_size, num_layers,
                                   bidirectional, tf32, capability)
                and self.takes_sizes(batch, steps))

    def matches_stack(self, device_type: str, mode: str, dtype: torch.dtype, hidden_size: int,
                      num_layers: int, bidirectional: bool, tf32: bool = True,
                      capability: tuple[int, int] | None = None) -> bool:
        """:meth:`matches` but for the batch and the sequence length, which change from call
        to call (under ``torch.compile`` with dynamic shapes they are symbolic)."""
        return (device_type == self.device_type and mode in self.modes and dtype in self.dtypes
                and (self.capability is None or self.capability == capability)
                and (dtype != torch.float32 or self.tf32 is None or self.tf32 == tf32)
                and self.hidden[0] <= hidden_size <= self.hidden[1]
                and self.layers[0] <= num_layers <= self.layers[1]
                and (self.bidirectional or not bidirectional))

    def takes_sizes(self, batch, steps=None) -> bool:
        """Whether the batch and the sequence length (None: not known, not checked) are in
        the rule's ranges."""
        return (self.batch[0] <= batch <= self.batch[1]
                and (steps is None or self.steps[0] <= steps <= self.steps[1]))


# First match wins. None yet: no kernel backend has passed its GPU tests on a real GPU.
AUTO_RULES: tuple[AutoRule, ...] = ()


# Eager even under torch.compile, like unavailable_reason: it probes the machine. What changes
# from call to call is passed in (tf32) or left to the caller (batch, steps: symbolic under
# dynamic shapes, which a constant-result function cannot take), so that dynamo guards on it.
@torch.compiler.assume_constant_result
def _auto_candidates(device: torch.device, mode: str, dtype: torch.dtype, hidden_size: int,
                     proj_size: int, num_layers: int, bidirectional: bool, input_size: int,
                     has_lengths: bool, tf32: bool) -> tuple:
    """The indices in :data:`AUTO_RULES` of the rules that match this stack but for its batch
    and sequence length, in order, whose backend is available and takes every layer."""
    capability = None
    if device.type == "cuda" and torch.cuda.is_available():
        capability = tuple(torch.cuda.get_device_capability(device))
    out = []
    for index, rule in enumerate(AUTO_RULES):
        if not rule.matches_stack(device.type, mode, dtype, hidden_size, num_layers,
                                  bidirectional, tf32, capability):
            continue
        if (proj_size and not rule.projection) or (has_lengths and not rule.lengths):
            continue
        if unavailable_reason(rule.backend, device) is not None:
            continue
        mod = _kernel_module(rule.backend)
        # Layers past the first take the stack's output width as their input size.
        widths = {input_size, (proj_size or hidden_size) * (2 if bidirectional else 1)}
        if all(mod.unsupported_reason("layer", mode=mode, device=device, dtype=dtype,
                                      input_size=i, hidden_size=hidden_size,
                                      proj_size=proj_size, has_lengths=has_lengths) is None
               for i in (widths if num_layers > 1 else {input_size})):
            out.append(index)
    return tuple(out)


def _auto_kernel(device: torch.device, mode: str, dtype: torch.dtype, hidden_size: int,
                 proj_size: int, batch, num_layers: int, bidirectional: bool,
                 input_size: int, has_lengths: bool, steps=None) -> str | None:
    """The kernel backend ``auto`` takes for this stack, or None (PyTorch's kernels): the first
    rule that matches, names an available backend, and whose backend takes every layer.
    Traced under ``torch.compile``: the TF32 setting is read here, and the batch and sequence
    length are compared here, so a compiled graph is guarded on both (it was built for the
    setting and the sizes it was traced with, and stayed with that backend after either
    changed; symbolic sizes broke the graph and then failed)."""
    from fused_rnn.ops.common import cudnn_rnn_tf32

    for index in _auto_candidates(device, mode, dtype, hidden_size, proj_size, num_layers,
                                  bidirectional, input_size, has_lengths, cudnn_rnn_tf32()):
        rule = AUTO_RULES[index]
        if rule.takes_sizes(batch, steps):
            return rule.backend
    return None


def reads_stack(name: str) -> bool:
    """Whether :func:`resolve_stack` reads the description of a call (``stack``) for backend
    ``name``: only ``auto`` does, and only once :data:`AUTO_RULES` holds a rule. Building it
    costs a few microseconds a call, which a module skips where it is not read."""
    return name == "auto" and len(AUTO_RULES) > 0  # not bool(): torch 2.6's dynamo refuses it


def resolve_stack(name: str, device: torch.device, **stack) -> str:
    """The backend a whole module call runs on.

    ``stack`` describes the call for ``auto``: mode, dtype (the compute dtype), hidden_size,
    proj_size, batch, num_layers, bidirectional, input_size, has_lengths, and steps (the
    sequence length; optional).

    ``auto`` runs a kernel backend where a rule of :data:`AUTO_RULES` says so, and PyTorch's
    own kernels (aten on the CPU, cuDNN on a GPU) everywhere else: they are torch.nn's math
    exactly and what the targets are measured against. A rule comes only from recorded GPU
    results (DESIGN.md), and there are none yet. ``auto`` runs the reference only where
    PyTorch's kernels may fail: inside ``vmap`` or forward-mode AD in eager mode
    (:func:`torch_kernels_reason`), and inside any ``torch.func`` transform under
    ``torch.compile``. A rule applies only where its backend takes every layer of the stack.

    Under ``torch.compile`` on the CPU the ``torch`` backend runs layer by layer
    (:func:`torch_runs_per_layer`): compiled whole, aten's CPU LSTM is unrolled into per-step
    ops where a layer's input requires grad, and inductor fails on the oneDNN op the other
    layers keep when their weights require grad (even at static shapes in fp32), and with
    dynamic shapes, autocast or dropout (torch 2.13). On a GPU inductor keeps cuDNN's RNN as an
    extern kernel (``make_fallback(aten._cudnn_rnn)``), so the stack stays whole there (not yet
    run on a GPU).
    """
    check_name(name)
    if name == "auto":
        device = torch.device(device)
        if stack and AUTO_RULES:
            kernel = _auto_kernel(device, **stack)
            if kernel is not None:
                return kernel
        # Dynamo cannot read functorch's whole interpreter stack, only its top: compiled,
        # any transform takes the reference (on the CPU the per-layer ops would anyway).
        compiling = torch.compiler.is_compiling()
        if (_transform_reason() if compiling else torch_kernels_reason()) is not None:
            return "reference"
        return "torch"
    if torch.device(device).type == "meta":
        # Meta tensors carry shapes, no values: the reference math gives torch.nn's shapes
        # for any backend, with no kernel to run and so none to be available.
        return "reference"
    require(name, device)
    return name


def torch_runs_per_layer(device: torch.device) -> bool:
    """Whether the ``torch`` backend runs a stack layer by layer (``functional.rnn``) rather
    than whole (``torch._VF``): under ``torch.compile`` on the CPU. Each LSTM layer is then
    aten's oneDNN kernel as one registered op (:mod:`fused_rnn.ops.aten_cpu`, eager's results
    bit for bit), and GRU/RNN layers (and LSTMs it cannot take) the reference math, which
    inductor compiles into fused loops."""
    return torch.compiler.is_compiling() and torch.device(device).type == "cpu"


_warned: set[tuple[str, str]] = set()
_warned_lock = ForkSafeLock(threading.RLock)
# Every fallback taken, (from, reason, to) -> how many times: the warning says it once a
# process, and a benchmark row labelled with a backend must be able to tell whether it ran.
_fallbacks: dict[tuple[str, str, str], int] = {}


def fallback_counts() -> dict[tuple[str, str, str], int]:
    """A copy of the fallbacks taken so far in this process: (backend, reason, the backend it
    handed over to) -> times (a layer or cell call each)."""
    return dict(_fallbacks)


# Eager under torch.compile too (dynamo cannot trace warnings.warn, and fullgraph would fail
# on it): the warning is given once, while the graph is traced.
@torch.compiler.assume_constant_result
def _warn_once(name: str, reason: str, to: str) -> bool:
    """Once a process per (backend, reason); True when it warned. Marked as said only once
    the warning returns: a filter that turns it into an exception raises at every such call,
    not just the first."""
    key = (name, reason)
    with _warned_lock:  # threads falling back at once: one of them says it
        if key in _warned:
            return False
        warn_at_caller(
            f"fused_rnn: backend {name!r} cannot take this call ({reason}); falling back to "
            f"{to!r}"
        )
        _warned.add(key)
    return True


# Eager under torch.compile too: dynamo cannot trace the functorch stack, and while it traces
# a transform (a compiled jacfwd, vmap, grad) the stack holds that transform's levels, so the
# answer is right for the graph being built.
@torch.compiler.assume_constant_result
def _transform_reason() -> str | None:
    """Why a kernel backend cannot run inside a ``torch.func`` transform or a forward-mode AD
    region (``torch.autograd.forward_ad``), or None outside them.

    The fused ops carry a backward formula only. Under ``torch.func.jvp``/``jacfwd`` torch
    gives such an op a zero tangent without an error, ``grad``/``jacrev`` fail inside torch,
    and ``vmap`` runs it once per sample (torch's fallback, with a warning); the reference is
    plain torch code, which every transform handles. (Under ``torch.compile`` this check used
    to be skipped: a compiled jacfwd or jvp came out all zeros.)"""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return ("inside a torch.func transform (jvp, jacfwd, grad, jacrev, vmap): the fused ops "
                "have no forward-mode or functorch rules")
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return ("inside torch.autograd.forward_ad.dual_level(): the fused ops have no "
                "forward-mode rule")
    return None


def torch_kernels_reason() -> str | None:
    """Why PyTorch's own RNN kernels, which ``auto`` runs in eager mode, may fail where this
    call is made (None where they work): inside ``torch.func.vmap`` (aten's RNN layers and
    LSTM cell have no batching rule; under ``vmap(grad)`` its GRU and RNN layers and cells
    fail on a shape), or under forward-mode AD (``jvp``, ``jacfwd``, ``forward_ad``: oneDNN's
    LSTM has no forward-mode rule, nor on a GPU PyTorch's fused GRU cell, nor, we expect,
    cuDNN's RNNs; not run on a GPU). ``torch.nn``'s modules fail there. Any
    vmap or forward-mode level counts, whichever kernel the call would reach. ``auto`` then
    runs the reference, which every transform handles; ``torch`` runs PyTorch's kernels as
    asked. Backward-mode transforms (``grad``, ``jacrev``) keep PyTorch's kernels, which work
    there."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        keys = {ci.key() for ci in torch._C._functorch.get_interpreter_stack()}
        transforms = torch._C._functorch.TransformType
        if transforms.Vmap in keys:
            return "inside torch.func.vmap, where PyTorch's RNN kernels have no batching rule"
        if transforms.Jvp in keys:
            return "under forward-mode AD, which PyTorch's RNN kernels do not support"
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return "under forward-mode AD, which PyTorch's RNN kernels do not support"
    return None


def kernel_impl(name: str, kind: str, **config) -> ModuleType:
    """The module implementing ``kind`` ("layer" or "cell") for ``name`` and this config.

    ``name`` is "reference", "triton" or "cuda". A kernel backend that rejects the
    configuration (its ``unsupported_reason`` returns a string) hands over to the next one in
    the fallback chain, warning once per reason. On the meta device (shapes only) it is the
    reference, without a warning: no kernel runs there.
    """
    device = config.get("device")
    if device is not None and torch.device(device).type == "meta":
        name = "reference"
    while name in KERNEL_BACKENDS:
        reason = unavailable_reason(name, config.get("device"))
        if reason is None:
            mod = _kernel_module(name)
            reason = mod.unsupported_reason(kind, **config) or _transform_reason()
            if reason is None:
                return mod
        nxt = _FALLBACK[name]
        _warn_once(name, reason, nxt)
        _fallbacks[(name, reason, nxt)] = _fallbacks.get((name, reason, nxt), 0) + 1
        name = nxt
    from fused_rnn.ops import reference

    return reference
