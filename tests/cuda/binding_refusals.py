"""The extension's own argument checks (``csrc/binding.cpp``), called directly with one bad
argument each, in child processes: a check that crashes instead of raising (seen once on an
H200, torch 2.11: a segmentation fault on the first refusal) costs its own case, not the pytest
run and every GPU test after it.

``python binding_refusals.py FIRST LAST`` runs cases FIRST..LAST-1 in order and prints one JSON
line per event: ``{"start": i}`` before case i, then ``{"case": i, ...}`` with what happened: the valid
call's failure, or the bad call's exception type and message (or that it returned). The parent
(:func:`run_cases`) starts a child again after the case a child died in, and for the first
such case runs that case alone under cuda-gdb (where there is one) for a native backtrace.

With ``host`` set (the children see it in ``FUSED_RNN_REFUSALS_HOST``) the same cases run
against binding.cpp compiled for the CPU (``host_binding.py``), on CPU tensors: no GPU needed;
``host="address"`` with the binding and the kernels under AddressSanitizer (the caller's
environment must preload it: ``simulate.sanitizer_env``), ``host="plain"`` without.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


HOST_ENV = "FUSED_RNN_REFUSALS_HOST"


def binding_args(mode, T=3, B=2, H=20, dtype=torch.float16, device="cuda"):
    """A valid (forward kwargs, backward kwargs) pair for the extension's own functions, on
    ``device`` (the GPU; the CPU for the host build): what ``ops.py`` hands them, before any
    check of ours."""
    from fused_rnn.ops.cuda import ops

    G = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}[mode]

    def z(*shape, dt=torch.float32):
        return torch.zeros(shape, device=device, dtype=dt)

    lstm, gru = mode == "LSTM", mode == "GRU"
    common = {"w_hh": z(G * H, H, dt=dtype), "reverse": False, "allow_tf32": False,
              "lengths": torch.full((B,), T, device=device, dtype=torch.int32),
              "max_groups": 1, "max_stage_k": 0}
    fwd = {"mode": ops.CELLS[mode], "xproj": z(T, B, G * H), "h0": z(B, H, dt=dtype),
           "c0": z(B, H, dt=dtype) if lstm else None, "b_hh": z(G * H), "save": True, **common}
    bwd = {"mode": ops.CELLS[mode], "dy": z(T, B, H, dt=dtype), "dh_n": z(B, H),
           "dc_n": z(B, H) if lstm else None, "gates": z(T, B, G * H),
           "aux": z(T, B, H) if lstm or gru else None, "c0": z(B, H) if lstm else None,
           "hprev": z(T, B, H, dt=dtype) if gru else None, **common}
    return fwd, bwd


# (cell, "forward"/"backward", argument, a bad value (from the valid args), what the error says:
# a literal part of its message)
BAD_BINDING_ARGS = [
    ("LSTM", "forward", "w_hh", lambda a: a["w_hh"][:-1], "w_hh must have shape"),
    ("LSTM", "forward", "h0", lambda a: a["h0"].t().contiguous().t(), "h0 must be contiguous"),
    ("LSTM", "forward", "c0", lambda a: None, "c0 is required for LSTM"),
    ("LSTM", "forward", "c0", lambda a: a["c0"][:1], "c0 must have shape"),
    ("GRU", "forward", "b_hh", lambda a: a["b_hh"].half(), "b_hh must be"),
    ("LSTM", "forward", "b_ih", lambda a: a["b_hh"][:-1], "b_ih must have shape"),
    ("GRU", "forward", "w_hh", lambda a: a["w_hh"].float(), "w_hh must be"),
    ("RNN_TANH", "forward", "lengths", lambda a: a["lengths"].long(), "lengths must be"),
    # on another device than the others: the CPU (on a GPU) or meta (the host build's)
    ("RNN_TANH", "forward", "h0", lambda a: a["h0"].to("cpu" if a["h0"].is_cuda else "meta"),
     "h0 must be on"),
    ("RNN_TANH", "forward", "mode", lambda a: 7, "mode code must be"),
    ("RNN_TANH", "forward", "h0", lambda a: a["h0"].double(), "float32, float16 or bfloat16"),
    ("LSTM", "backward", "dc_n", lambda a: None, "dc_n is required for LSTM"),
    ("GRU", "backward", "hprev", lambda a: None, "hprev is required for GRU"),
    ("GRU", "backward", "aux", lambda a: a["aux"][:, :1], "aux must have shape"),
    ("LSTM", "backward", "gates", lambda a: a["gates"].half(), "gates must be"),
    ("RNN_TANH", "backward", "dh_n", lambda a: a["dh_n"].t(), "dh_n must have shape"),
    ("LSTM", "forward", "tile_block", lambda a: 3, "tile_block must be 1, 2 or 4, got 3"),
    ("GRU", "backward", "tile_block", lambda a: 0, "tile_block must be 1, 2 or 4, got 0"),
    ("RNN_RELU", "forward", "point_batch", lambda a: 4,
     "point_batch must be 0 (batches) or 1, got 4"),
    ("LSTM", "backward", "point_batch", lambda a: -1,
     "point_batch must be 0 (batches) or 1, got -1"),
    ("GRU", "forward", "frag_loads", lambda a: 3,
     "frag_loads must be 0 (shared), 1 (generic) or 2 (mma), got 3"),
    ("LSTM", "backward", "frag_loads", lambda a: -1,
     "frag_loads must be 0 (shared), 1 (generic) or 2 (mma), got -1"),
    # a 16-bit storage type for another of the same size
    ("LSTM", "forward", "w_hh", lambda a: a["w_hh"].bfloat16(), "w_hh must be Half, got BFloat16"),
    ("GRU", "backward", "hprev", lambda a: a["hprev"].bfloat16(), "hprev must be Half, got BFloat16"),
    # the launch settings ops.py checks first (plan.h takes them as they come)
    ("LSTM", "forward", "max_groups", lambda a: 0, "max_groups must be >= 1, got 0"),
    ("GRU", "backward", "max_stage_k", lambda a: -1, "max_stage_k must be >= 0, got -1"),
    ("RNN_TANH", "forward", "k_parts", lambda a: -1, "k_parts must be >= 0 (0: auto), got -1"),
    ("LSTM", "backward", "max_blocks", lambda a: -2,
     "max_blocks must be >= 0 (0: one block per SM), got -2"),
    ("GRU", "forward", "cluster", lambda a: 17, "cluster must be 0 (off) or 1..16 blocks, got 17"),
    ("RNN_RELU", "backward", "stage_copy", lambda a: 4,
     "stage_copy must be 0 (registers), 1 (cp.async), 2 (pipelined cp.async) or 3 (tagged), got 4"),
    ("LSTM", "forward", "stage_copy", lambda a: -1, "stage_copy must be 0 (registers), 1"),
    ("LSTM", "forward", "prof", lambda a: torch.zeros(1, dtype=torch.int64, device=a["h0"].device),
     "prof needs"),
    ("GRU", "backward", "prof", lambda a: torch.zeros(4096, device=a["dy"].device),
     "prof must be a contiguous int64 tensor on"),
    # The per-step path's entry points check their tensors as forward and backward do.
    ("LSTM", "forward_steps", "w_hh", lambda a: a["w_hh"][:-1], "w_hh must have shape"),
    ("GRU", "forward_steps", "b_hh", lambda a: a["b_hh"].half(), "b_hh must be"),
    ("LSTM", "forward_steps", "c0", lambda a: None, "c0 is required for LSTM"),
    ("GRU", "backward_steps", "hprev", lambda a: None, "hprev is required for GRU"),
    ("RNN_TANH", "backward_steps", "gates", lambda a: a["gates"][:, :1], "gates must have shape"),
    # dy is read as dense (T, B, H): a transposed or expanded one is refused, before the
    # sizes' product is taken (an expanded dy of 2^31-2 steps of 2^31-97 rows overflowed it)
    ("LSTM", "backward", "dy", lambda a: a["dy"].transpose(0, 1).contiguous().transpose(0, 1),
     "dy must be contiguous"),
    ("GRU", "backward_steps", "dy", lambda a: a["dy"][:1].expand_as(a["dy"]),
     "dy must be contiguous"),
    ("LSTM", "backward", "dy", lambda a: a["dy"][:1, :1, :1].expand(2**31 - 2, 2**31 - 97, 1),
     "dy must be contiguous"),
]
# What the per-step entry points take of forward's and backward's arguments (no plan settings).
STEP_ARGS = {"forward_steps": ("mode", "xproj", "h0", "c0", "w_hh", "b_hh", "lengths",
                               "reverse", "save"),
             "backward_steps": ("mode", "dy", "dh_n", "dc_n", "w_hh", "gates", "aux", "c0",
                                "hprev", "lengths", "reverse")}
CASE_IDS = [f"{c}-{f}-{a}-{i}" for i, (c, f, a, *_) in enumerate(BAD_BINDING_ARGS)]


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def run_in_child(first: int, last: int) -> None:
    """Cases first..last-1 in this process (the child's side)."""
    host = os.environ.get(HOST_ENV, "")
    if host:
        from host_binding import HostBinding

        ext, device = HostBinding(sms=8, sanitize="" if host == "plain" else host), "cpu"
    else:
        from fused_rnn.ops.cuda import _ext

        ext, device = _ext.extension(), "cuda"
    for i in range(first, last):
        cell, fn, arg, bad, _ = BAD_BINDING_ARGS[i]
        _emit(start=i)
        fwd, bwd = binding_args(cell, device=device)
        call = getattr(ext, fn)
        kwargs = fwd if fn.startswith("forward") else bwd
        if fn in STEP_ARGS:
            kwargs = {k: v for k, v in kwargs.items() if k in STEP_ARGS[fn]}
        try:
            call(**kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # the valid call must run: said, not raised
            _emit(case=i, valid_failed=f"{type(e).__name__}: {e}")
            continue
        try:
            call(**{**kwargs, arg: bad(kwargs)})
        except Exception as e:  # what the binding raised is the result
            _emit(case=i, raised=type(e).__name__, message=str(e))
        else:
            _emit(case=i, returned=True)


def _child_command(first: int, last: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), str(first), str(last)]


def _how_it_died(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def native_backtrace(case: int, timeout: float = 75, host: str = "") -> str:
    """Case ``case`` alone under cuda-gdb (or gdb) in batch mode: the native stack where it
    stops on a signal. Symbols (and so unwind tables) only of the libraries that can be on that
    stack, not libtorch_cuda's or the CUDA libraries' (hundreds of MB to read); ``_ctypes`` and
    ``libffi`` for the harness's own test."""
    from torch.utils.cpp_extension import CUDA_HOME

    gdb = (shutil.which("cuda-gdb") or (CUDA_HOME and shutil.which(
        "cuda-gdb", path=os.path.join(CUDA_HOME, "bin"))) or shutil.which("gdb"))
    if gdb is None:
        return "(no cuda-gdb or gdb on PATH: no native backtrace)"
    libs = ["fused_rnn", r"libc10\.so", "libtorch_cpu", "libtorch_python", r"libtorch\.so",
            "libstdc", "libgcc", "libpython", r"libc\.so", "_ctypes", "libffi", "libcudasim"]
    cmd = [gdb, "-batch", "-nx", "-ex", "set auto-solib-add off", "-ex", "set pagination off",
           "-ex", "run"]
    for lib in libs:
        cmd += ["-ex", f"sharedlibrary {lib}"]
    cmd += ["-ex", "bt 40", "--args", *_child_command(case, case + 1)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env=_child_env(host), cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return f"({os.path.basename(gdb)} took over {timeout:.0f} s: no backtrace)"
    text = out.stdout + out.stderr
    at = text.find("received signal")
    if at < 0:
        return text[-6000:]  # no signal: gdb's own complaint, if any, is at the end
    # From just before the signal line: that line, then the innermost frames first. A frame of
    # a library with debug information (source paths, arguments) can take 300 characters, so
    # the cap keeps the head, never the tail (the outermost frames: main, _start).
    return text[max(at - 200, 0):][:6000]


def _child_env(host: str = "") -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, HERE, env.get("PYTHONPATH")) if p)
    env[HOST_ENV] = host
    return env


def run_cases(timeout: float = 240, host: str = "") -> dict[int, dict]:
    """Every case, in child processes: {case: its event}; a case its child died in is
    ``{"case": i, "died": how, "stderr": tail}``, the first such with ``"backtrace"``.
    ``host`` ("plain" or "address"): against the host build of binding.cpp (CPU tensors),
    not the extension."""
    results: dict[int, dict] = {}
    first, n = 0, len(BAD_BINDING_ARGS)
    backtrace_taken = False
    while first < n:
        proc = subprocess.run(_child_command(first, n), capture_output=True, text=True,
                              timeout=timeout, env=_child_env(host), cwd=ROOT, check=False)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if "start" in event:
                started = event["start"]
            else:
                results[event["case"]] = event
        if proc.returncode == 0 and all(i in results for i in range(first, n)):
            break
        if started is None:  # died before its first case (an import, the extension's load):
            for i in range(first, n):  # the same for every case, so one child says it
                results[i] = {"case": i, "died": _how_it_died(proc.returncode),
                              "stderr": proc.stderr[-3000:]}
            break
        dead = started if started not in results else first
        results[dead] = {"case": dead, "died": _how_it_died(proc.returncode),
                         "stderr": proc.stderr[-3000:]}
        if not backtrace_taken:
            backtrace_taken = True
            results[dead]["backtrace"] = native_backtrace(dead, host=host)
        first = dead + 1
    return results


if __name__ == "__main__":
    run_in_child(int(sys.argv[1]), int(sys.argv[2]))
