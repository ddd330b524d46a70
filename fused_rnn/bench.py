"""``fused-rnn bench``: truncated-BPTT training throughput, fused_rnn's backends against torch.nn.

Every implementation (torch.nn, then each fused_rnn backend) trains the same character model
from the same initial weights on the same data, precision by precision. The implementations
of a precision train side by side, in rounds of consecutive steps, so that on a shared machine
the others' load falls on every row alike. Each row is checked against torch.nn's twice: the
first steps (the second chunk's logits and every parameter's gradient from the initial weights)
and the validation loss after all the steps. Then each row's trained model samples text one
character at a time, as ``fused-rnn sample`` does, for its ms/char. The table, CSV and plot
go to ``--out``.

A CUDA kernel fault is sticky: every later CUDA call of the process fails. When a row's error
leaves the device unusable (:func:`_context_lost`), that row keeps its error and the rows not
done yet train in a fresh process (:func:`_bench_in_fresh_process`), so a fault costs one row.
``FRNN_BENCH_FAULT`` injects such faults for the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

import fused_rnn
from fused_rnn import backends as _backends
from fused_rnn.charlm import CELLS
from fused_rnn.cli import (
    PRECISIONS,
    CLIError,
    Corpus,
    Splits,
    _auto_resolves_to,
    _build_model,
    _check_torch_nn_runs,
    _check_writable,
    _csv_list,
    _device,
    _float_in,
    _int_at_least,
    _precision,
    _seed,
    _sync,
    _torch_nn_failure,
    generate,
    load_default_corpus,
    load_text_file,
    split_corpus,
)
from fused_rnn.ops.common import cudnn_rnn_tf32
from fused_rnn.tbptt import StreamBatcher, evaluate, train_chunk

__all__ = ["BENCH_TOLERANCE", "FIRST_STEPS_TOLERANCE", "add_parser", "run"]

# Validation loss after the same steps must agree with torch.nn's in the same precision.
# fp32: rounding differences grow through a few Adam steps to ~1e-4 nats at the defaults;
# bf16/fp16 round every matmul input to 8/11 bits, measured differences ~1e-2.
BENCH_TOLERANCE = {"fp32": 2e-3, "bf16": 6e-2, "fp16": 3e-2, "amp-bf16": 6e-2, "amp-fp16": 3e-2}
# The first-steps check, sharper than the loss: from the same initial weights, the logits of
# the second chunk (state carried from the first) step by step, and the gradients of its loss
# parameter by parameter, must match torch.nn's by relative norm error. The bounds are
# bench_gpu.py's: they catch wrong math, not rounding. Measured on the CPU at the GPU defaults
# (H=1024, B=64, T=128) against torch.nn: correct fp32 2e-7 (logits) and 1e-6 (gradients),
# correct amp-bf16 5e-3 and 4e-3; a backend that drops the carried state 0.55 on the logits,
# one with dW_hh halved 0.5 on weight_hh_l0. Both moved the validation loss after the bench's
# training by only ~0.02, inside the 16-bit loss tolerance. The logits are taken under no_grad
# too (evaluate's path: a backend that dropped the carried state only there moved the loss by
# 4e-2 in amp-bf16) and the entering state's gradient is compared (one that dropped it moved
# the fp32 loss by 5e-6).
FIRST_STEPS_TOLERANCE = {"fp32": 2e-2, "bf16": 1e-1, "fp16": 2e-2, "amp-bf16": 1e-1,
                         "amp-fp16": 2e-2}
FIRST_STEPS_STRICT = 1e-3  # fp32 where nothing uses TF32: the CPU, or cuDNN with TF32 off
BENCH_DEFAULTS = {
    "cpu": dict(hidden_size=128, batch_size=16, bptt=64, steps=10, warmup=3, rounds=5,
                precisions=["fp32", "amp-bf16"], sample_chars=32),
    "cuda": dict(hidden_size=1024, batch_size=64, bptt=128, steps=30, warmup=5, rounds=1,
                 precisions=["fp32", "bf16", "amp-fp16", "amp-bf16"], sample_chars=200),
}
CSV_FIELDS = ("device", "torch", "cell", "layers", "hidden", "batch", "bptt", "steps",
              "precision", "impl", "ms_per_step", "tokens_per_s", "speedup_vs_torch_nn",
              "sample_ms_per_char", "peak_mib", "val_loss", "delta_vs_torch_nn",
              "first_logits_err", "first_grad_err", "first_grad_param", "check", "error",
              "fallback")

# The test hook for the recovery from a fault: FRNN_BENCH_FAULT="IMPL@PRECISION[:validate][,...]"
# makes those rows fail at their first timed step (or in their validation pass) as if a
# kernel had faulted and taken the CUDA context with it, so that the recovery is exercised
# without a GPU.
_FAULT_ENV = "FRNN_BENCH_FAULT"


def add_parser(sub) -> None:
    """Add the ``bench`` subcommand to the ``fused-rnn`` subparsers ``sub``."""
    p = sub.add_parser(
        "bench", help="truncated-BPTT training throughput: fused_rnn backends vs torch.nn",
        description="Train the same character model with the same data and seed on every "
        "available fused_rnn backend and on torch.nn, in each precision; report tokens/s, "
        "ms/step, peak memory and the validation loss after the same steps.")
    p.add_argument("--text", metavar="FILE", help="default: the embedded standard-library corpus")
    p.add_argument("--cell", choices=CELLS, default="lstm")
    p.add_argument("--hidden-size", type=_int_at_least(1), help="CPU 128, GPU 1024")
    p.add_argument("--layers", type=_int_at_least(1), default=1)
    p.add_argument("--batch-size", type=_int_at_least(1), help="CPU 16, GPU 64")
    p.add_argument("--bptt", type=_int_at_least(1), help="CPU 64, GPU 128")
    p.add_argument("--steps", type=_int_at_least(1), help="timed steps: CPU 10, GPU 30")
    p.add_argument("--warmup", type=_int_at_least(0), help="untimed steps first: CPU 3, GPU 5")
    p.add_argument("--rounds", type=_int_at_least(1),
                   help="the timed steps are split into rounds; in each round every "
                   "implementation runs its block of steps in turn (CPU 5: fair on a shared "
                   "machine; GPU 1: each runs all its steps back to back)")
    p.add_argument("--lr", type=_float_in(0.0, lo_open=True), default=3e-3)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backends", type=_csv_list(fused_rnn.BACKENDS), default=None,
                   help="fused_rnn backends, comma-separated (default: every available one; "
                   "'auto' only where it differs from the others; triton on the CPU only if asked)")
    p.add_argument("--precisions", type=_csv_list(PRECISIONS), default=None,
                   help="CPU: fp32,amp-bf16; GPU: fp32,bf16,amp-fp16,amp-bf16 (fp16 is "
                   "refused, as by train)")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="CPU threads (torch.set_num_threads; default: PyTorch's choice)")
    p.add_argument("--sample-chars", type=_int_at_least(0), default=None,
                   help="characters each row samples after training, one step of the model's "
                   "cells at a time as fused-rnn sample does, for its ms/char: CPU 32, GPU 200 "
                   "(0: none)")
    p.add_argument("--val-chunks", type=_int_at_least(1), default=4,
                   help="validation chunks for the loss check (default: %(default)s)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), metavar="DIR",
                   help="where the .md/.csv/.png go (default: %(default)s)")
    # For the bench's own recovery from a fault (see _bench_in_fresh_process), not for users.
    p.add_argument("--skip", action="append", default=[], metavar="IMPL@PRECISION",
                   help=argparse.SUPPRESS)
    p.add_argument("--rows-json", metavar="FILE", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- the set-up
@dataclass
class Bench:
    """What every row of one bench shares: the sizes, data, initial weights and the
    implementations to time."""

    args: argparse.Namespace
    device: torch.device
    H: int
    B: int
    T: int
    steps: int
    warmup: int
    rounds: int
    sample_chars: int  # sampled after training, for the row's ms/char (0: none)
    precisions: list[str]
    corpus: Corpus
    splits: Splits
    base_cfg: dict
    impls: list[tuple[str, str | None]]  # (row label, fused_rnn backend or None for torch.nn)
    notes: list[str]
    init_state: dict = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)  # "IMPL@PRECISION" -> phase to fail in
    # precision -> why torch.nn's first-steps probe failed there (its rows go unchecked by it)
    probe_failed: dict[str, str] = field(default_factory=dict)
    started: datetime.datetime = field(default_factory=datetime.datetime.now)  # names the files
    load_before: str = "n/a"

    @property
    def vocab_size(self) -> int:
        return len(self.splits.vocab)

    def batcher(self, split: str = "train") -> StreamBatcher:
        data, bounds = ((self.splits.train, self.splits.train_bounds) if split == "train"
                        else (self.splits.val, self.splits.val_bounds))
        return StreamBatcher(data, self.B, self.T, boundaries=bounds, device=self.device)


def _backend_names(args, device: torch.device, base_cfg: dict, vocab_size: int,
                   precisions: list[str], B: int, notes: list[str]) -> list[str]:
    """The fused_rnn backends to time: ``--backends`` (each must be available), else every
    available one, with ``auto`` only where it resolves to none of the others (and triton on
    the CPU, interpreted, only if asked). Adds what it leaves out, and why, to ``notes``."""
    if args.backends is not None:
        for n in args.backends:
            reason = _backends.unavailable_reason(n, device)
            if reason:
                raise CLIError(f"--backends {n}: unavailable here ({reason})")
        return list(args.backends)
    available = fused_rnn.available_backends(device)
    names = [n for n in available if n != "auto"]
    if device.type == "cpu" and "triton" in names:
        names.remove("triton")
        notes.append("triton runs on the CPU only through its interpreter; not timed "
                     "(pass --backends triton to include it)")
    probe = _build_model(base_cfg, vocab_size, False, "auto").rnn
    T = args.bptt or BENCH_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]["bptt"]
    auto_to = {_auto_resolves_to(probe, device, p, B, T) for p in precisions}
    auto_to = auto_to.pop() if len(auto_to) == 1 else None  # differs by precision
    if auto_to not in names:
        names.insert(0, "auto")
    else:
        notes.append(f"backend 'auto' resolves to '{auto_to}' here; not timed twice")
    for n in fused_rnn.BACKENDS:
        if n not in available:
            notes.append(f"backend '{n}' unavailable: {_backends.unavailable_reason(n, device)}")
    return names


def _injected_faults() -> dict[str, str]:
    """``FRNN_BENCH_FAULT`` parsed: "IMPL@PRECISION" -> "train" or "validate" (IMPL has a
    colon of its own)."""
    faults = {}
    for fault in filter(None, os.environ.get(_FAULT_ENV, "").split(",")):
        row, _, phase = fault.rpartition(":")
        if phase not in ("train", "validate"):
            row, phase = fault, "train"
        faults[row] = phase
    return faults


def _configure(args) -> Bench:
    _check_writable(args.out)  # before any work: the report is written after each precision
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    dflt = BENCH_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    B = args.batch_size or dflt["batch_size"]
    steps = args.steps or dflt["steps"]
    precisions = args.precisions or list(dflt["precisions"])
    corpus = load_text_file(args.text) if args.text else load_default_corpus()
    splits = split_corpus(corpus, 0.05, 100_000, B, split_flags=False)
    if device.type == "cuda" and "amp-bf16" in precisions and "fp32" not in precisions:
        raise CLIError("--precisions amp-bf16 on CUDA needs fp32 too: torch.nn's amp-bf16 "
                       "RNN computes in fp16 with no loss scaling and trains worse, so the "
                       "other rows' val loss is held to torch.nn's fp32 row")
    notes: list[str] = []
    for p in list(precisions):
        _precision(p, device, "--precisions")  # CLIError for fp16, or bf16 where unsupported
        if args.precisions:  # asked for: refused in one line where torch.nn cannot run it
            _check_torch_nn_runs(args.cell, device, p, "--precisions",
                                 "every row is checked against torch.nn's, so leave it out")
        elif (why := _torch_nn_failure(args.cell, device, p, "--precisions")) is not None:
            # a default (amp-bf16 on a CPU with no oneDNN bf16): the rest of the bench runs
            precisions.remove(p)
            notes.append(f"{p}, a default precision, left out: {why}")
    base_cfg = dict(cell=args.cell, hidden_size=args.hidden_size or dflt["hidden_size"],
                    layers=args.layers, embedding_size=None, dropout=0.0, tie_weights=False)
    names = _backend_names(args, device, base_cfg, len(splits.vocab), precisions, B, notes)
    if device.type == "cuda" and "amp-bf16" in precisions:
        notes.append("torch.nn's amp-bf16 row computes its RNN in fp16: torch's autocast rule "
                     "for cuDNN RNNs casts to half whatever the autocast dtype; fused_rnn's rows "
                     "(its 'torch' backend on cuDNN too) compute in bf16"
                     + "; their val loss is held to torch.nn's fp32 row (Δ is against it), "
                       "as fp16 with no loss scaling trains worse")
    bench = Bench(
        args=args, device=device, H=base_cfg["hidden_size"], B=B, T=args.bptt or dflt["bptt"],
        steps=steps, warmup=dflt["warmup"] if args.warmup is None else args.warmup,
        rounds=min(args.rounds or dflt["rounds"], steps), precisions=precisions,
        sample_chars=(dflt["sample_chars"] if args.sample_chars is None
                      else args.sample_chars),
        corpus=corpus, splits=splits, base_cfg=base_cfg,
        impls=[("torch.nn", None)] + [(f"fused_rnn:{n}", n) for n in names], notes=notes,
        faults=_injected_faults())
    torch.manual_seed(args.seed)
    bench.init_state = _build_model(base_cfg, bench.vocab_size, True, "auto").state_dict()
    return bench


# --------------------------------------------------------------------------- the checks
def _first_steps(model, batcher: StreamBatcher, ac_dtype) -> tuple[torch.Tensor, dict]:
    """The first-steps probe of ``model`` at its current weights, all in fp32: the logits of
    ``batcher``'s second chunk, entered with the state the first chunk leaves, twice (2T, B,
    V): under ``no_grad`` first (the path ``evaluate`` and sampling take), then with autograd;
    and the gradients of that chunk's loss for each parameter and for the entering state
    (``state[i]``: what a chunk cut at a document start, or a caller's own state, passes back).
    The loss is scaled by 2**12 for the backward (exact in binary floating point) so that
    fp16's gradients do not underflow, as a GradScaler would. Leaves no gradients behind and
    the random number generators as found."""
    device = batcher.streams.device
    first, second = batcher.next_chunk(), batcher.next_chunk()
    params = dict(model.named_parameters())

    def autocast():
        return torch.autocast(device.type, dtype=ac_dtype or torch.float32,
                              enabled=ac_dtype is not None)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # Separate autocast regions: torch 2.6 caches the casts of weights made under no_grad
        # for the rest of a region, and the next call then reached no parameter of torch.nn's.
        with autocast(), torch.no_grad():
            _, state = model(first.x, None, first.reset)
        with autocast(), torch.no_grad():
            eval_logits, _ = model(second.x, state, second.reset)
        leaves = [state] if isinstance(state, torch.Tensor) else list(state)
        leaves = [t.detach().requires_grad_() for t in leaves]
        state = leaves[0] if isinstance(state, torch.Tensor) else type(state)(leaves)
        with autocast():
            logits, _ = model(second.x, state, second.reset)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                     second.y.flatten())
        inputs = [*params.values(), *leaves]
        # allow_unused: a model that drops what it was given must come out as zero gradients
        # to compare, not as this probe's error
        grads = torch.autograd.grad(loss * 2**12, inputs, allow_unused=True)
    names = [*params, *(f"state[{i}]" for i in range(len(leaves)))]
    return (torch.cat([eval_logits.detach().float(), logits.detach().float()]),
            {n: (torch.zeros_like(t) if g is None else g).float() / 2**12
             for n, g, t in zip(names, grads, inputs)})


def _first_steps_tolerance(precision: str, device: torch.device) -> float:
    if precision == "fp32" and (device.type == "cpu" or not cudnn_rnn_tf32()):
        return FIRST_STEPS_STRICT
    return FIRST_STEPS_TOLERANCE[precision]


def _first_steps_error(got, ref) -> tuple[float, float, str]:
    """(largest relative error of a step's logits, largest of a parameter's gradient, that
    parameter's name) of one :func:`_first_steps` probe against another, in fp64."""
    (logits, grads), (ref_logits, ref_grads) = got, ref
    d = (logits.double() - ref_logits.double()).flatten(1).norm(dim=1)
    out = (d / ref_logits.double().flatten(1).norm(dim=1)).max().item()
    errs = {}
    for n, g in ref_grads.items():
        diff, norm = (grads[n].double() - g.double()).norm().item(), g.double().norm().item()
        errs[n] = diff / norm if norm else (0.0 if diff == 0 else math.inf)
    worst = max(errs, key=lambda n: errs[n] if errs[n] == errs[n] else math.inf)  # NaN first
    return out, errs[worst], (worst if errs[worst] != 0 else "")


def _torch_nn_row(results: list[dict], precision: str) -> dict | None:
    return next((r for r in results
                 if r["impl"] == "torch.nn" and r["precision"] == precision), None)


def _loss_baseline(results: list[dict], precision: str, device: torch.device) -> dict | None:
    """The torch.nn row a row's validation loss is held to: the same precision's, except for
    amp-bf16 on CUDA, where torch.nn's RNN computes in fp16 with no loss scaling (torch's
    autocast rule for cuDNN RNNs casts to half whatever the autocast dtype) and so trains
    worse (on an H200, 35 steps: val loss 3.52 against 2.73 in every other precision): there
    torch.nn's fp32 row, where the run has one."""
    if precision == "amp-bf16" and device.type == "cuda":
        fp32 = _torch_nn_row(results, "fp32")  # (the CLI runs fp32 with amp-bf16 on CUDA)
        return fp32 if fp32 is not None and not fp32["error"] else None
    return _torch_nn_row(results, precision)


def _check(results: list[dict], device: torch.device) -> bool:
    """Fill each row's ``delta``, ``speedup`` and ``check`` against torch.nn's row of the same
    precision (the loss: :func:`_loss_baseline`'s); returns whether every row is clean."""
    ok = True
    for row in results:
        base = _torch_nn_row(results, row["precision"])
        if row["error"]:
            row["check"], ok = "ERROR", False
            row["delta"] = row["speedup"] = None
            continue
        if base is None or base["error"]:
            row["delta"] = row["speedup"] = None
            row["check"] = "no baseline"
            continue
        loss_base = (base if row["impl"] == "torch.nn"
                     else _loss_baseline(results, row["precision"], device))
        if loss_base is None:  # its torch.nn fp32 row failed (and says so: ERROR)
            row["delta"] = row["speedup"] = None
            row["check"] = "no baseline"
            continue
        row["delta"] = row["val_loss"] - loss_base["val_loss"]
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        wrong = []
        tol = BENCH_TOLERANCE[row["precision"]]
        if not (abs(row["delta"]) <= tol and math.isfinite(row["val_loss"])):
            wrong.append(f"loss Δ > {tol:g}")
        first_tol = _first_steps_tolerance(row["precision"], device)
        if row.get("first_logits_err") is not None:
            if not row["first_logits_err"] <= first_tol:
                wrong.append(f"first-steps logits {row['first_logits_err']:.1e} > {first_tol:g}")
            if not row["first_grad_err"] <= first_tol:
                wrong.append(f"first-steps grad of {row['first_grad_param']} "
                             f"{row['first_grad_err']:.1e} > {first_tol:g}")
        label = "MISMATCH" if wrong else "UNCHECKED"
        if row.get("first_steps_unchecked"):
            wrong.append(f"first steps not checked ({row['first_steps_unchecked']})")
        row["check"] = "ok" if not wrong else f"{label} ({'; '.join(wrong)})"
        ok &= not wrong
    return ok


# --------------------------------------------------------------------------- one row
def _not_run(label: str, precision: str, why: str) -> dict:
    return {"impl": label, "precision": precision, "error": why, "ms_per_step": None,
            "tokens_per_s": None, "sample_ms_per_char": None, "peak_mib": None,
            "val_loss": None, "fallback": ""}


class _Run:
    """One implementation in one precision: its model, optimizer, data and timings. An error
    anywhere is kept in the row (a backend failing is a finding: the bench exits 1)."""

    def __init__(self, bench: Bench, label: str, backend: str | None, prec: str):
        self.bench = bench
        self.row = {"impl": label, "precision": prec, "error": ""}
        self.param_dtype, self.ac_dtype, use_scaler = _precision(prec, bench.device)
        self.times: list[float] = []
        self.tokens: list[int] = []  # of each timed step: B x T, less where a stream ends
        self.peak = None
        self.state = None
        self.fallbacks: set[str] = set()  # what ran instead of the named backend, and why
        self.injected = bench.faults.get(f"{label}@{prec}")  # the test hook: fail as a fault would
        try:
            torch.manual_seed(bench.args.seed)
            model = _build_model(bench.base_cfg, bench.vocab_size, backend is None,
                                 backend or "auto")
            model.load_state_dict(bench.init_state)
            self.model = model.to(device=bench.device, dtype=self.param_dtype)
            self.opt = torch.optim.Adam(model.parameters(), lr=bench.args.lr)
            self.scaler = torch.amp.GradScaler(bench.device.type) if use_scaler else None
            self.train = bench.batcher("train")
        except Exception as e:
            self.fail(e)

    def fail(self, e: Exception) -> None:
        self.row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]

    def first_steps(self, ref) -> None:
        """The first-steps probe at the initial weights, against torch.nn's (``ref``; None
        where torch.nn's failed, which leaves the row unchecked by it: not a pass)."""
        why = self.bench.probe_failed.get(self.row["precision"])
        if ref is None and why is not None:
            self.row["first_steps_unchecked"] = f"torch.nn's probe failed: {why}"
        if self.row["error"] or ref is None:
            return
        try:
            got = _first_steps(self.model, self.bench.batcher("train"), self.ac_dtype)
            self.row.update(zip(("first_logits_err", "first_grad_err", "first_grad_param"),
                                _first_steps_error(got, ref)))
        except Exception as e:
            self.fail(e)

    def steps(self, n: int, timed: bool) -> None:
        """``n`` consecutive training steps; each timed and its transient memory taken."""
        device = self.bench.device
        for _ in range(n):
            if self.row["error"]:
                return
            try:
                if self.injected == "train" and timed:
                    raise RuntimeError(f"a fault injected by {_FAULT_ENV}")
                chunk = self.train.next_chunk()
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                before = _backends.fallback_counts()
                t0 = time.perf_counter()
                _, self.state, _ = train_chunk(self.model, chunk, self.state, self.opt,
                                               clip=1.0, autocast_dtype=self.ac_dtype,
                                               scaler=self.scaler)
                _sync(device)
                dt = time.perf_counter() - t0
                for (frm, why, to), count in _backends.fallback_counts().items():
                    if count > before.get((frm, why, to), 0):
                        self.fallbacks.add(f"{frm} -> {to}: {why}")
                if timed:
                    self.times.append(dt)
                    self.tokens.append(chunk.num_tokens)
                    if device.type == "cuda":
                        mem = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                        self.peak = max(self.peak or 0.0, mem)
            except Exception as e:
                self.fail(e)

    def sample_speed(self) -> float | None:
        """Milliseconds a sampled character takes the trained model: ``generate``, the loop
        of ``fused-rnn sample`` (a step of the model's cells on the row's backend, the logits
        to the CPU, a draw), from the first validation character, in the row's precision
        (autocast as in training; the CLI itself samples in fp32); the mean over
        ``sample_chars`` characters, after two untimed ones. The call's setup (the cells'
        construction, the mode switches) is in it: ~6% of 32 characters on the CPU (a
        helper's measurement; subtracting a timed call that samples none instead gave 0 on a
        loaded machine). None when the bench samples none. A backend that cannot sample
        fails its row, as one that cannot train."""
        bench = self.bench
        if not bench.sample_chars:
            return None
        vocab = bench.splits.vocab
        prime = vocab.decode(bench.splits.val[:1].tolist())
        before = _backends.fallback_counts()
        autocast = (torch.autocast(bench.device.type, dtype=self.ac_dtype)
                    if self.ac_dtype is not None else contextlib.nullcontext())
        with autocast:
            generate(self.model, vocab, prime, 2, generator=torch.Generator().manual_seed(0))
            _sync(bench.device)
            t0 = time.perf_counter()
            generate(self.model, vocab, prime, bench.sample_chars,
                     generator=torch.Generator().manual_seed(bench.args.seed))
            _sync(bench.device)
            dt = time.perf_counter() - t0
        for (frm, why, to), count in _backends.fallback_counts().items():
            if count > before.get((frm, why, to), 0):
                self.fallbacks.add(f"{frm} -> {to} (sampling): {why}")
        return 1000 * dt / bench.sample_chars

    def finish(self) -> dict:
        """Validate, fill the row's numbers and free the model; returns the row."""
        row = self.row
        if not row["error"]:
            try:
                if self.injected == "validate":
                    raise RuntimeError(f"a fault injected by {_FAULT_ENV}")
                total, count = evaluate(self.model, self.bench.batcher("val"),
                                        max_chunks=self.bench.args.val_chunks,
                                        autocast_dtype=self.ac_dtype)
                med = statistics.median(self.times)
                tokens = sum(self.tokens) / len(self.tokens)
                row.update(ms_per_step=1000 * med, tokens_per_s=tokens / med,
                           peak_mib=self.peak, val_loss=total / count,
                           sample_ms_per_char=self.sample_speed())
            except Exception as e:
                self.fail(e)
        if row["error"]:
            row.update(ms_per_step=None, tokens_per_s=None, sample_ms_per_char=None,
                       peak_mib=None, val_loss=None)
        row["fallback"] = "; ".join(sorted(self.fallbacks))
        self.model = self.opt = self.train = self.state = None
        return row


# --------------------------------------------------------------------------- a fault
def _context_lost(device: torch.device) -> bool:
    """Whether ``device`` is unusable in this process after an error. A kernel fault (an
    illegal address, say) is sticky: every later CUDA call of the process fails with it."""
    if device.type != "cuda":
        return False
    try:
        torch.ones(1, device=device).add_(1).item()
        return False
    except Exception:  # whatever the error, the device cannot run work
        return True


def _bench_in_fresh_process(args, precisions: list[str], done: set[str],
                            backends: list[str]) -> list[dict]:
    """The rows of ``precisions`` not in ``done`` ("IMPL@PRECISION"), trained by a new
    ``fused-rnn bench`` process with this one's arguments and fused_rnn ``backends`` (this
    process's list: the default one depends on the precisions); it writes them to a JSON
    file. Where that process fails to, its rows say so."""
    labels = ["torch.nn"] + [f"fused_rnn:{n}" for n in backends]
    with tempfile.TemporaryDirectory(prefix="fused_rnn_bench_") as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "fused_rnn.cli", *args.argv,
               "--precisions", ",".join(precisions), "--out", tmp, "--rows-json", out]
        if backends:
            cmd += ["--backends", ",".join(backends)]
        for s in sorted(done):
            cmd += ["--skip", s]
        print(f"fused-rnn bench: the rest in a fresh process: {' '.join(cmd[3:])}",
              file=sys.stderr)
        rc = None
        try:
            rc = subprocess.run(cmd, check=False).returncode  # it prints to stderr only
            with open(out) as fh:
                return [r for r in json.load(fh) if r["impl"] in labels]
        except (OSError, ValueError) as e:
            status = "" if rc is None else f"exit {rc}: "
            why = (f"not run: the fresh process for the rows after the fault failed "
                   f"({status}{type(e).__name__}: {e})")
    return [_not_run(label, p, why) for p in precisions for label in labels
            if f"{label}@{p}" not in done]


# --------------------------------------------------------------------------- the report
def _split(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` nearly equal consecutive pieces."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def _load_avg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):
        return "n/a"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _git_commit() -> str:
    """The checkout's commit; FRNN_COMMIT when set (the lent GPU gets the tree without .git,
    so its command passes the hash)."""
    if os.environ.get("FRNN_COMMIT"):
        return os.environ["FRNN_COMMIT"]
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           check=False, text=True, timeout=5,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        return r.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _say(row: dict) -> None:
    msg = (f"FAILED ({row['error']})" if row["error"] else
           f"{row['ms_per_step']:.1f} ms/step, val loss {row['val_loss']:.4f}")
    print(f"  {row['precision']:8s} {row['impl']:22s} {msg}", file=sys.stderr)


def _markdown(bench: Bench, results: list[dict], final: bool) -> str:
    args, device, precisions = bench.args, bench.device, bench.precisions
    H, B, T = bench.H, bench.B, bench.T
    cpu = device.type == "cpu"
    threads = torch.get_num_threads()

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    def first(r):
        if r.get("first_logits_err") is None:
            return "n/a"
        named = f" ({r['first_grad_param']})" if r.get("first_grad_param") else ""
        return f"{r['first_logits_err']:.1e}, {r['first_grad_err']:.1e}{named}"

    mem_col = "peak mem" if cpu else "step peak GPU mem (MiB)"
    lines = [
        (f"# Character-LM truncated-BPTT training: fused_rnn vs torch.nn "
         f"({'CPU' if cpu else _device_name(device)})"),
        "",
        f"- {bench.started:%Y-%m-%d %H:%M}, commit {_git_commit()}, torch {torch.__version__}"
        + ("" if cpu else
           f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
        + f", device {device} ({_device_name(device)}"
        + (f", {threads} thread{'s' if threads != 1 else ''}; load average {bench.load_before} "
           f"before, {_load_avg()} after: other processes on these cores slow every row)"
           if cpu else ")"),
        (f"- model: embedding → {args.layers}-layer {args.cell.upper()} (hidden {H}) → linear, "
         f"vocab {bench.vocab_size}; B={B} streams × T={T} steps per chunk ({B * T:,} "
         f"tokens/step); Adam lr {args.lr:g}, clip 1.0; same initial weights, data and seed for "
         "every row"),
        (f"- {bench.warmup} warm-up steps, then {bench.steps} timed steps (each synchronised) in "
         f"{bench.rounds} round{'s' if bench.rounds > 1 else ''}: every implementation of a "
         "precision trains side by side, each running its block of steps in turn; ms/step is "
         "the median step (forward, backward, clipping, Adam step), tokens/s = the mean tokens "
         "of a timed step (B×T, less where a chunk meets the end of the streams) / that median"),
        f"- val loss: mean cross-entropy (nats) over {args.val_chunks} validation chunks after "
        f"all {bench.warmup + bench.steps} steps; it must agree with torch.nn in the same "
        "precision within " + ", ".join(f"{p} {BENCH_TOLERANCE[p]:g}" for p in precisions),
        "- first steps: from the initial weights, the logits of the second chunk (entered "
        "with the state the first leaves; under no_grad, then with autograd) and the "
        "gradients of its loss for each parameter and the entering state, against torch.nn's "
        "by relative norm error: the worst step's logits, then the worst gradient (named); "
        "within "
        + ", ".join(f"{p} {_first_steps_tolerance(p, device):g}" for p in precisions)
        + " (bounds for wrong math, not rounding)",
        ("- memory: n/a on the CPU: PyTorch keeps no per-step peak there, and the resident "
         "set does not grow in a step once the allocator holds memory freed by earlier steps "
         "(measured: 0.0 MiB for every row), so it says nothing about an implementation" if cpu
         else "- memory: the largest growth of torch.cuda.max_memory_allocated within one timed "
         "step over what was allocated before it (activations, workspace, gradients; "
         "parameters and Adam state are the same for every row)"),
        (f"- sampling: ms per character of `fused-rnn sample`'s loop (`generate`: one step of "
         "the model's cells on the row's backend, the logits to the CPU, a draw) on the "
         "trained model in the row's precision and autocast (`fused-rnn sample` itself loads "
         f"a checkpoint in fp32), the mean over {bench.sample_chars} characters from the "
         "first validation character after 2 untimed; each row samples from its own trained "
         "weights, so this is a speed, not a check" if bench.sample_chars else
         "- sampling: not timed (--sample-chars 0)"),
        f"- corpus: {bench.corpus.description}",
    ] + [f"- note: {n}" for n in bench.notes]
    if not final:
        done = sorted({r["precision"] for r in results}, key=precisions.index)
        lines.append(f"- INCOMPLETE: written after {', '.join(done)}; the run had not "
                     "finished the other precisions (see its log)")
    lines += [
        "",
        (f"| precision | implementation | ms/step | tokens/s | vs torch.nn | sampling ms/char | "
         f"{mem_col} | val loss | Δ vs torch.nn | first steps: logits, grad | check |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speedup = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        check = (r["check"] + (f": {r['error']}" if r["error"] else "")
                 + (f"; ran partly elsewhere ({r['fallback']})" if r.get("fallback") else ""))
        check = check.replace("|", "\\|")  # error text may hold one: not a column break
        lines.append(
            f"| {r['precision']} | {r['impl']} | {f(r['ms_per_step'], '.2f')} | "
            f"{f(r['tokens_per_s'], ',.0f')} | {speedup} | "
            f"{f(r.get('sample_ms_per_char'), '.3f')} | {f(r['peak_mib'], '.1f')} | "
            f"{f(r['val_loss'], '.5f')} | {f(r['delta'], '+.2e')} | {first(r)} | {check} |")
    return "\n".join(lines) + "\n"


def _write_csv(bench: Bench, results: list[dict], path: str) -> None:
    args = bench.args
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(CSV_FIELDS)
        for r in results:
            w.writerow([_device_name(bench.device), torch.__version__, args.cell, args.layers,
                        bench.H, bench.B, bench.T, bench.steps, r["precision"], r["impl"],
                        r["ms_per_step"], r["tokens_per_s"], r["speedup"],
                        r.get("sample_ms_per_char"), r["peak_mib"],
                        r["val_loss"], r["delta"], r.get("first_logits_err"),
                        r.get("first_grad_err"), r.get("first_grad_param"), r["check"],
                        r["error"], r.get("fallback", "")])


def _plot(bench: Bench, results: list[dict], path: str) -> bool:
    """Tokens/s per implementation and precision as a bar chart; False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    precisions = bench.precisions
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [label for label, _ in bench.impls]
    width = 0.8 / max(len(precisions), 1)
    for j, prec in enumerate(precisions):
        ys = [next(((r["tokens_per_s"] or 0) for r in results
                    if r["impl"] == label and r["precision"] == prec), 0) for label in labels]
        ax.bar([i + (j - (len(precisions) - 1) / 2) * width for i in range(len(labels))],
               ys, width, label=prec)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("training tokens/s")
    where = _device_name(bench.device) if bench.device.type == "cuda" else "CPU"
    ax.set_title(f"char-LM TBPTT, {bench.args.cell.upper()} H={bench.H} B={bench.B} "
                 f"T={bench.T}, {where}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def _write_report(bench: Bench, results: list[dict], final: bool) -> bool:
    """Check ``results`` against torch.nn and write the table and CSV (and at the end the
    plot, and the table to stdout). Written after every precision too, so that a run cut
    short by a timeout leaves the precisions it finished. Returns whether every row is clean."""
    ok = _check(results, bench.device)
    device = bench.device
    dev_tag = ("cpu" if device.type == "cpu" else
               re.sub(r"[^a-z0-9]+", "-", _device_name(device).lower()).strip("-"))
    stem = os.path.join(bench.args.out, f"{bench.started:%Y-%m-%d}-{dev_tag}-charlm-bench")
    md = _markdown(bench, results, final)
    os.makedirs(bench.args.out, exist_ok=True)
    with open(stem + ".md", "w") as fh:
        fh.write(md)
    _write_csv(bench, results, stem + ".csv")
    if not final:
        return ok
    written = [stem + ".md", stem + ".csv"]
    if _plot(bench, results, stem + ".png"):
        written.append(stem + ".png")
    else:
        print("note: matplotlib is not installed; skipped the plot", file=sys.stderr)
    print(md)
    print("wrote " + ", ".join(written), file=sys.stderr)
    return ok


# --------------------------------------------------------------------------- the run
def _reference_probe(bench: Bench, prec: str):
    """torch.nn's first-steps probe in ``prec`` (None, said and kept in
    ``bench.probe_failed``, if it fails). It ends with a device sync, so that a fault of
    cuDNN's surfaces here, not at the first row's next call (which it was then blamed on)."""
    try:
        param_dtype, ac_dtype, _ = _precision(prec, bench.device)
        model = _build_model(bench.base_cfg, bench.vocab_size, True, "auto")
        model.load_state_dict(bench.init_state)
        model.to(device=bench.device, dtype=param_dtype)
        ref = _first_steps(model, bench.batcher("train"), ac_dtype)
        _sync(bench.device)
        return ref
    except Exception as e:
        why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        bench.probe_failed[prec] = why
        print(f"  {prec:8s} torch.nn's first-steps probe failed ({why}); this precision's "
              "rows cannot pass its check", file=sys.stderr)
        return None


def _side_by_side(bench: Bench, runs: list[_Run], ref) -> _Run | None:
    """Probe, then train ``runs`` side by side: warm-up steps, then the timed steps in rounds
    (each run a block of consecutive steps per round). Returns the run whose error took the
    device with it, if any."""
    for run in runs:  # a fault while building (moving the model to the device)
        if run.row["error"] and _context_lost(bench.device):
            return run
    blocks = [len(r) for r in _split(bench.steps, bench.rounds)]
    for n, timed in [(None, False), (bench.warmup, False)] + [(n, True) for n in blocks]:
        for run in runs:
            had = bool(run.row["error"])
            if n is None:
                if run.row["impl"] != "torch.nn":
                    run.first_steps(ref)
            else:
                run.steps(n, timed)
            if not had and run.row["error"] and (run.injected or _context_lost(bench.device)):
                return run
    return None


def _run_precisions(bench: Bench) -> list[dict]:
    """Every row not skipped, precision by precision; after a fault that takes the device,
    the rest in a fresh process."""
    args, skip = bench.args, set(bench.args.skip)
    labels = [label for label, _ in bench.impls]
    results: list[dict] = []
    for i, prec in enumerate(bench.precisions):
        ref = _reference_probe(bench, prec)
        if ref is None and _context_lost(bench.device):
            # cuDNN itself faulted: the baseline is gone, and a fresh process would fault the
            # same way; every row left says so.
            why = "not run: torch.nn's first-steps probe took the CUDA context with it"
            results += [_not_run(label, p, why) for p in bench.precisions[i:] for label in labels
                        if f"{label}@{p}" not in skip]
            break
        runs = [_Run(bench, label, backend, prec) for label, backend in bench.impls
                if f"{label}@{prec}" not in skip]
        culprit = _side_by_side(bench, runs, ref)
        ref = None
        finished = []
        for run in runs if culprit is None else []:
            row = run.finish()
            if row["error"] and (run.injected or _context_lost(bench.device)):  # in validation
                culprit = run
                break
            finished.append(row)
        if culprit is None:
            for row in finished:
                results.append(row)
                _say(row)
            del runs
            if not args.rows_json:
                _write_report(bench, results, final=False)
            continue
        # A kernel fault is sticky: every later CUDA call in this process fails. The faulting
        # row keeps its error; this precision's other rows (all of them, so that they are
        # timed side by side in one process) and the later precisions' run in a fresh one.
        row = culprit.finish()
        row["error"] += ("; it took the CUDA context with it: the other rows of this "
                         "precision and the later precisions ran in a fresh process")
        results.append(row)
        _say(row)
        del runs, finished
        if not args.rows_json:
            _write_report(bench, results, final=False)
        done = skip | {f"{r['impl']}@{r['precision']}" for r in results}
        results += _bench_in_fresh_process(args, bench.precisions[i:], done,
                                           [backend for _, backend in bench.impls if backend])
        break
    order = {label: i for i, label in enumerate(labels)}
    results.sort(key=lambda r: (bench.precisions.index(r["precision"]), order[r["impl"]]))
    return results


def run(args) -> int:
    """``fused-rnn bench``; returns the exit status: 1 if a row failed or disagrees."""
    bench = _configure(args)
    print(f"bench: {args.layers}-layer {args.cell.upper()} H={bench.H}, B={bench.B}, "
          f"T={bench.T}, {bench.warmup} warm-up + {bench.steps} timed steps in {bench.rounds} "
          f"rounds, Adam lr {args.lr:g}, seed {args.seed}; {bench.device} "
          f"({_device_name(bench.device)}); corpus {bench.corpus.description}", file=sys.stderr)
    # A throwaway run first, so that the first row does not pay for first-call set-up
    # (thread pools, allocator growth, lazy imports) that later rows get for free.
    _Run(bench, "torch.nn", None, bench.precisions[0]).steps(2, timed=False)
    bench.load_before = _load_avg()
    results = _run_precisions(bench)
    if args.rows_json:  # a fresh process's rows, for the process that started it
        with open(args.rows_json, "w") as fh:
            json.dump(results, fh)
        return 0
    if not _write_report(bench, results, final=True):
        print("fused-rnn bench: error: some rows failed or disagree with torch.nn "
              "(see the check column)", file=sys.stderr)
        return 1
    return 0
