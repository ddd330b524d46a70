"""Shared test set-up.

* ``torch.empty``/``empty_like``/``new_empty`` return NaN-filled tensors (integers: a huge
  sentinel) during every test, so an output a kernel forgot to write cannot pass by luck.
  Tests that trace with ``torch.compile`` opt out with ``@pytest.mark.no_nan_fill``
  (dynamo would trace our wrapper instead of the real factory).
* ``gpu`` marks tests that need a CUDA GPU; they are skipped without one, with the reason.
* ``slow`` marks the few tests that take minutes on 2 cores; they are collected first.
* Without a GPU, ``TRITON_INTERPRET=1`` (Triton kernels run on the CPU, slowly).
* Inductor's on-disk cache is a fresh directory per test run: its key does not cover our ops'
  fake kernels, so a compiled graph cached under an earlier version of one would be reused.
* One intra-op thread per test process (and its children), unless ``OMP_NUM_THREADS`` is set;
  what collection made is frozen out of the garbage collector's way (gc.freeze).
* ``torch.backends.cudnn.rnn`` is imported first (torch 2.9 and 2.10: see below).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's CPU interpreter. ``@triton.jit`` reads
# TRITON_INTERPRET when a kernel is defined, so it is set here, in the root conftest, before
# any test module (or the report header below) can import the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The same torch.backends.cudnn in every test, whatever ran before: on torch 2.9 and 2.10,
# importing the submodule torch.backends.cudnn.rnn (nn.RNNBase.flatten_parameters does on a GPU,
# and so do some tests) shadows ``torch.backends.cudnn.rnn.fp32_precision``; tests set that
# setting through ``common.cudnn_rnn_setting()``, which finds it either way.
import torch.backends.cudnn.rnn

# The tests' tensors are tiny. With two pytest-xdist workers on two cores, each worker's
# OpenMP threads spin at every parallel region waiting for a core the other worker holds: with
# torch's default (one thread a core) 624 cudasim cases took 85 s on this repo's 2-core
# machine, and 27 s on one thread each. The environment variable reaches the child processes
# (the sanitized suite, the scripts); this process is already initialised, hence the call.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Read when torch._inductor is first imported (by the first torch.compile), so set here too.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # this run's own, removed when it ends
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fused_rnn_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

_real_empty = torch.empty
_real_empty_like = torch.empty_like
_real_new_empty = torch.Tensor.new_empty


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).max)
    return t


def _nan_empty(*args, **kwargs):
    return _poison(_real_empty(*args, **kwargs))


def _nan_empty_like(*args, **kwargs):
    return _poison(_real_empty_like(*args, **kwargs))


def _nan_new_empty(self, *args, **kwargs):
    return _poison(_real_new_empty(self, *args, **kwargs))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "no_nan_fill: do not poison torch.empty in this test")
    config.addinivalue_line("markers", "slow: long-running test")
    if not config.pluginmanager.hasplugin("timeout"):  # pytest-timeout's, where it is absent
        config.addinivalue_line("markers", "timeout(seconds): pytest-timeout's limit (no-op)")


def pytest_collection_modifyitems(config, items):
    # Longest first: tests marked ``slow`` (minutes on 2 cores: the sanitized cudasim run, the
    # big compile checks) start at once, so that with pytest-xdist (the README's command) they
    # do not end up last on one worker while the other idles. Stable: the rest keep their order.
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    # What collection made (torch, Inductor, the test modules, ~3000 items) lives to the end
    # of the run: frozen, Python's full collections no longer walk it. They did at every one:
    # gc_collect_main and its visitors were ~15% of a cudasim case's profile, ~5% frozen.
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _nan_fill_empty(request, monkeypatch):
    if request.node.get_closest_marker("no_nan_fill") is None:
        monkeypatch.setattr(torch, "empty", _nan_empty)
        monkeypatch.setattr(torch, "empty_like", _nan_empty_like)
        monkeypatch.setattr(torch.Tensor, "new_empty", _nan_new_empty)
    yield

    # torch.testing._internal.common_utils freezes torch.backends' flags when it is imported
    # (torch 2.6's dynamo imports it while compiling torch.func transforms), after which our
    # tests could no longer set cudnn.allow_tf32 as a user does: they are thawed again.
    if torch.backends.flags_frozen():
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True


FP32_PRECISION_KEYS = [("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn"),
                       ("cuda", "matmul")]


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def text_file(tmp_path):
    """A tiny text file (helpers.tiny_text) for the CLI and the bench."""
    from helpers import tiny_text

    p = tmp_path / "tiny.txt"
    p.write_text(tiny_text())
    return p


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as where the "train" extra is not installed."""
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)


@pytest.fixture
def fp32_precision_restored():
    """Saves torch's per-operator fp32 precision settings (torch >= 2.9) and restores them."""
    get = getattr(torch._C, "_get_fp32_precision_getter", None)
    if get is None:
        pytest.skip(f"torch {torch.__version__} has no per-operator fp32 precision")
    saved = [(key, get(*key)) for key in FP32_PRECISION_KEYS]
    yield
    for key, value in saved:
        torch._C._set_fp32_precision_setter(*key, value)


def pytest_report_header(config):
    from fused_rnn import backends

    lines = [f"torch {torch.__version__}"]
    # benchmarks/gpu_check.sh sets FRNN_SKIP_CUDA_PROBE=1 after the CUDA build failed there:
    # probing cuda here would build it again (minutes) at the start of every later pytest step.
    skip_cuda = os.environ.get("FRNN_SKIP_CUDA_PROBE") == "1"
    for name in backends.BACKENDS:
        state = ("not probed (FRNN_SKIP_CUDA_PROBE=1: its build failed earlier in this run)"
                 if skip_cuda and name == "cuda" else backends.unavailable_reason(name) or
                 "available")
        lines.append(f"fused_rnn backend {name}: {state}")
    return lines
