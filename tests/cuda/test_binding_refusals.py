"""The child-process harness of the binding-refusal GPU test (``binding_refusals.py``), on the
CPU: a child that crashes in one case costs that case, the cases after it still run, and the
crashed case gets a native backtrace where a debugger is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import binding_refusals as br
import pytest

# A stand-in child: case 3 dies of a segmentation fault (a null read), case 5 returns instead
# of raising, the others raise a RuntimeError that names their case.
FAKE_CHILD = r"""
import ctypes, json, sys
first, last = int(sys.argv[1]), int(sys.argv[2])
for i in range(first, last):
    print(json.dumps({"start": i}), flush=True)
    if i == 3:
        ctypes.string_at(0)
    if i == 5:
        print(json.dumps({"case": i, "returned": True}), flush=True)
        continue
    print(json.dumps({"case": i, "raised": "RuntimeError", "message": f"case {i}"}), flush=True)
"""


@pytest.fixture
def fake_child(monkeypatch):
    monkeypatch.setattr(br, "_child_command",
                        lambda first, last: [sys.executable, "-c", FAKE_CHILD, str(first),
                                             str(last)])
    monkeypatch.setattr(br, "BAD_BINDING_ARGS", br.BAD_BINDING_ARGS[:8])


def test_a_crash_costs_its_case_only(fake_child, monkeypatch):
    monkeypatch.setattr(br, "native_backtrace", lambda case, host="": f"backtrace of {case}")
    results = br.run_cases(timeout=120)
    assert sorted(results) == list(range(8))
    assert results[3]["died"] == "killed by SIGSEGV"
    assert results[3]["backtrace"] == "backtrace of 3"
    assert results[5] == {"case": 5, "returned": True}
    for i in (0, 1, 2, 4, 6, 7):
        assert results[i] == {"case": i, "raised": "RuntimeError", "message": f"case {i}"}


@pytest.mark.skipif(shutil.which("gdb") is None and shutil.which("cuda-gdb") is None,
                    reason="no gdb or cuda-gdb on PATH")
def test_the_crashed_case_gets_a_native_backtrace(fake_child):
    """Under the debugger, the crashed case alone stops on the signal and prints its stack
    (here: ctypes' string_at, called from Python)."""
    trace = br.native_backtrace(3, timeout=120)
    assert "SIGSEGV" in trace, trace
    assert "#0" in trace and "string_at" in trace, trace



def test_a_long_backtrace_keeps_the_signal_and_the_innermost_frames(monkeypatch):
    """Frames with debug information run to hundreds of characters each (pyenv's Python 3.10
    under gdb: 40 frames past 6000), so the capped trace keeps its head, the signal line and
    frame #0, not the outermost frames. No debugger needed: gdb's output is made up."""
    frames = "".join(f"#{i:<2} 0x{i:016x} in frame_{i} (arg=0x0) at /a/long/source/path/"
                     f"{'x' * 200}.c:{i}\n" for i in range(40))
    gdb_out = ("[Thread debugging using libthread_db enabled]\n" * 5
               + "\nProgram received signal SIGSEGV, Segmentation fault.\n" + frames)
    monkeypatch.setattr(br.shutil, "which", lambda *a, **k: "/usr/bin/gdb")
    monkeypatch.setattr(br.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, -11, stdout=gdb_out, stderr=""))
    trace = br.native_backtrace(3)
    assert len(gdb_out) > 6200 and len(trace) <= 6000
    assert "received signal SIGSEGV" in trace and "#0  0x" in trace and "frame_0 " in trace
    assert "frame_39 " not in trace  # the tail is what gives way
    # Without a signal in the output (gdb failed), its last 6000 characters, where gdb says why.
    monkeypatch.setattr(br.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, stdout="y" * 7000, stderr="gdb: cannot run the program"))
    assert br.native_backtrace(3).endswith("gdb: cannot run the program")

def test_a_child_that_dies_before_its_first_case_is_run_once(monkeypatch, tmp_path):
    """A child that cannot start (an import error, the extension failing to load) fails every
    case with its reason, after one run, not one run per case."""
    runs = tmp_path / "runs"
    script = (f"import sys; open({str(runs)!r}, 'a').write('x');"
              " sys.stderr.write('ImportError: no extension'); sys.exit(3)")
    monkeypatch.setattr(br, "_child_command", lambda first, last: [sys.executable, "-c", script])
    monkeypatch.setattr(br, "native_backtrace", lambda case, host="": pytest.fail("no crash to trace"))
    results = br.run_cases(timeout=120)
    assert runs.read_text() == "x"
    assert sorted(results) == list(range(len(br.BAD_BINDING_ARGS)))
    for got in results.values():
        assert got["died"] == "exited with code 3" and "no extension" in got["stderr"], got


def test_the_step_entry_points_take_what_the_cases_pass():
    """The per-step cases call forward_steps/backward_steps with forward's/backward's valid
    arguments cut to ``STEP_ARGS``: those are the binding's own argument names for them, in
    order, and every bad argument a case swaps in is one of them."""
    src = (Path(__file__).resolve().parents[2] / "csrc" / "binding.cpp").read_text()
    for fn, names in br.STEP_ARGS.items():
        m = re.search(rf'm\.def\("{fn}",(.*?)\);', src, re.DOTALL)
        assert m, f"binding.cpp defines no {fn}"
        declared = tuple(re.findall(r'py::arg\("(\w+)"\)', m.group(1)))
        assert declared[:len(names)] == names and declared[len(names):] == ("b_ih",) * (
            fn == "forward_steps"), (fn, declared)
    steps = [(fn, arg) for _, fn, arg, *_ in br.BAD_BINDING_ARGS if fn in br.STEP_ARGS]
    assert {fn for fn, _ in steps} == set(br.STEP_ARGS)
    for fn, arg in steps:
        assert arg in br.STEP_ARGS[fn], (fn, arg)
