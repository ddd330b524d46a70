"""Paths a coverage run of the suite found no test reaching, though a CPU runs them: error
messages a user can meet, documented fallbacks and notes, and option branches.

Each test names the code it reaches. Tiny shapes throughout: each runs in well under 2 s.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
import threading
import types

import pytest
import torch
from helpers import tiny_text
from test_bench_gpu import _import as _benchmark
from test_cli import BENCH_TINY, TINY, run

import fused_rnn
from fused_rnn import bench, cli
from fused_rnn.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # as in test_cli.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-step training run's checkpoint."""
    out = tmp_path_factory.mktemp("trained")
    (out / "tiny.txt").write_text(tiny_text())
    n = torch.get_num_threads()
    try:
        rc = main(["train", "--text", str(out / "tiny.txt"), "--out", str(out / "run"), *TINY,
                   "--steps", "1"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    return out / "run" / "checkpoint.pt"


# --------------------------------------------------------------------------- cli: bad input
@pytest.mark.parametrize("flag,value,said", [
    ("--lr", "abc", "argument --lr: expected a number, got 'abc'"),
    ("--dropout", "half", "argument --dropout: expected a number, got 'half'"),
    ("--seed", "x1", "argument --seed: expected an integer, got 'x1'"),
])
def test_a_number_flag_that_is_not_a_number_is_one_line(capsys, tmp_path, text_file, flag, value,
                                                        said):
    """cli._float_in and cli._seed: a value float()/int() cannot read (their range checks are
    tested in test_cli.py)."""
    rc, _, err = run(capsys, "train", "--text", text_file, "--out", tmp_path / "r", *TINY,
                     flag, value)
    assert rc == 2 and said in err and "Traceback" not in err, err


def test_a_text_that_cannot_be_read_says_why(capsys, tmp_path):
    """cli.load_text_file: an OSError other than a missing file or a directory (here a loop of
    symbolic links) is one line with the system's reason."""
    loop = tmp_path / "loop.txt"
    os.symlink(loop, loop)
    rc, _, err = run(capsys, "train", "--text", loop, "--out", tmp_path / "r", *TINY)
    assert rc == 2, err
    assert "--text " in err and "cannot read it (Too many levels of symbolic links)" in err


@pytest.mark.parametrize("command", ["train", "sample"])
def test_device_cuda_without_a_gpu_is_refused(capsys, tmp_path, text_file, monkeypatch, command):
    """cli._device: --device cuda where torch sees no GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = (["train", "--text", text_file, "--out", tmp_path / "r", *TINY] if command == "train"
            else ["sample", "--checkpoint", tmp_path / "none.pt"])
    rc, _, err = run(capsys, *argv, "--device", "cuda")
    assert rc == 2 and "--device cuda: no CUDA GPU is available here" in err, err
    assert not (tmp_path / "r").exists()


def _cuda_unavailable(monkeypatch):
    import fused_rnn.ops.cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda device: "no GPU in this test")


def test_train_on_a_backend_that_cannot_run_is_one_line(capsys, tmp_path, text_file, monkeypatch):
    """cli._cmd_train: backends.require's RuntimeError becomes the CLI's error, before any
    output file is written."""
    _cuda_unavailable(monkeypatch)
    rc, out, err = run(capsys, "train", "--text", text_file, "--out", tmp_path / "r", *TINY,
                       "--backend", "cuda")
    assert rc == 2, out + err
    assert err.strip() == ("fused-rnn train: error: fused_rnn backend 'cuda' is unavailable: "
                           "no GPU in this test")
    assert not (tmp_path / "r" / "log.csv").exists()


def test_sample_on_a_backend_that_cannot_run_is_one_line(capsys, checkpoint, monkeypatch):
    """cli._cmd_sample: the same for sampling."""
    _cuda_unavailable(monkeypatch)
    rc, out, err = run(capsys, "sample", "--checkpoint", checkpoint, "--backend", "cuda",
                       "--length", 3)
    assert rc == 2 and out == "", out + err
    assert err.strip() == ("fused-rnn sample: error: fused_rnn backend 'cuda' is unavailable: "
                           "no GPU in this test")


@pytest.mark.parametrize("vocab,why", [("ba", "a vocabulary is a string of sorted, distinct"),
                                       ("aab", "a vocabulary is a string of sorted, distinct"),
                                       (7, "'int' object is not iterable")])
def test_sample_says_a_checkpoints_vocabulary_is_broken(capsys, tmp_path, checkpoint, vocab, why):
    """cli._cmd_sample: a vocabulary Vocab refuses (unsorted, repeated, not a string)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["vocab"] = vocab
    path = tmp_path / "broken.pt"
    torch.save(ckpt, path)
    rc, _, err = run(capsys, "sample", "--checkpoint", path, "--length", 3)
    assert rc == 2 and f"error: {path} has a broken vocabulary ({why}" in err, err
    assert len(err.strip().splitlines()) == 1


def test_sample_writes_what_stdouts_encoding_cannot_as_escapes(checkpoint, monkeypatch):
    """cli._cmd_sample: print's UnicodeEncodeError (stdout in ASCII, say LANG=C) falls back to
    the text's UTF-8 bytes on stdout's buffer instead of a traceback."""
    monkeypatch.setattr(cli, "generate", lambda *a, **k: "caf\u00e9 \u2713")
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    assert main(["sample", "--checkpoint", str(checkpoint), "--length", "3", "--seed", "0"]) == 0
    sys.stdout.flush()
    assert raw.getvalue() == "caf\u00e9 \u2713\n".encode()


def test_a_log_that_cannot_be_written_is_one_line(capsys, tmp_path, text_file):
    """cli._write_log: the fresh log.csv's write failing (its temporary name is a directory)."""
    out = tmp_path / "r"
    (out / "log.csv.tmp").mkdir(parents=True)
    rc, _, err = run(capsys, "train", "--text", text_file, "--out", out, *TINY, "--steps", 1)
    assert rc == 2, err
    assert f"could not write {out / 'log.csv'} (IsADirectoryError" in err
    assert len(err.strip().splitlines()) == 1


def test_streams_shorter_than_bptt_get_a_note(capsys, tmp_path, text_file):
    """cli._cmd_train: a text too short for whole --bptt chunks trains on shorter ones and
    says so."""
    rc, out, err = run(capsys, "train", "--text", text_file, "--out", tmp_path / "r",
                       "--hidden-size", "8", "--threads", "1", "--batch-size", "2",
                       "--bptt", "4000", "--steps", "0")
    assert rc == 0, err
    assert re.search(r"^note: each stream holds only \d+ steps of the text, fewer than --bptt "
                     r"4000: every chunk is that short or shorter$", out, re.MULTILINE), out


def test_resume_refuses_a_checkpoint_whose_vocabulary_is_not_the_texts(capsys, tmp_path,
                                                                        checkpoint):
    """cli._cmd_train: the text's checksum matches but the checkpoint's vocabulary does not (a
    checkpoint edited, or written by a tool of its own): refused before any training."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(checkpoint.parent, out)
    (out / ".lock").unlink(missing_ok=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["vocab"] = ckpt["vocab"][:-1] + chr(ord(ckpt["vocab"][-1]) + 1)
    torch.save(ckpt, out / "checkpoint.pt")
    log = (out / "log.csv").read_text()
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--steps", 2)
    assert rc == 2, err
    assert err.strip().endswith("error: --resume: the checkpoint's vocabulary differs from this "
                                "text's")
    assert (out / "log.csv").read_text() == log


# --------------------------------------------------------------------------- cli: helpers
def test_read_log_skips_torn_rows_and_a_missing_file_is_empty(tmp_path):
    """cli._read_log, which --resume and the plot read: a row a crash tore (a step that is not
    an integer, too few fields or too many) is dropped; no file, no rows. A row with too many
    fields once reached _write_log, whose csv.DictWriter raised on it at --resume."""
    assert cli._read_log(str(tmp_path / "none.csv")) == []
    path = tmp_path / "log.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(cli.LOG_FIELDS)
        w.writerow(["0"] + [""] * (len(cli.LOG_FIELDS) - 1))
        w.writerow(["1"] + ["x"] * (len(cli.LOG_FIELDS) - 1))
        w.writerow(["2"] + ["x"] * (len(cli.LOG_FIELDS) - 3))  # torn: too few fields
        w.writerow(["3"] + ["x"] * len(cli.LOG_FIELDS))  # torn: too many (two lines run together)
        w.writerow(["ste"] + ["x"] * (len(cli.LOG_FIELDS) - 1))  # torn: not a step
    assert [r["step"] for r in cli._read_log(str(path))] == ["0", "1"]


def test_corpus_modules_without_a_source_file(monkeypatch):
    """cli._module_source: a standard-library module that is missing, or not a file (a zipped
    or frozen standard library), whose loader has the source or has none."""
    from importlib.machinery import ModuleSpec

    class Loader:
        def __init__(self, src):
            self.src = src

        def get_source(self, name):
            return self.src

    specs = {"zipped": ModuleSpec("zipped", Loader("a = 1\r\nb = 2\r\n"), origin=None),
             "frozen": ModuleSpec("frozen", Loader(None), origin="frozen")}
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: specs.get(name))
    assert cli._module_source("zipped") == "a = 1\nb = 2\n"
    with pytest.raises(cli.CLIError, match="^no source for standard-library module 'frozen'; "
                                           "pass --text FILE$"):
        cli._module_source("frozen")
    with pytest.raises(cli.CLIError, match="^the default corpus needs the standard-library "
                                           "module 'gone', which this Python lacks; pass --text"):
        cli._module_source("gone")


def test_signals_are_left_alone_outside_the_main_thread():
    """cli._signals_deferred in another thread (train run from a worker thread, say): Python
    lets only the main thread set handlers, so the block runs as it is."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    seen = []

    def body():
        try:
            with cli._signals_deferred():
                seen.append(signal.getsignal(signal.SIGINT))
        except Exception as e:
            seen.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert seen == [before]


def test_machine_facts_where_the_platform_has_none(monkeypatch, tmp_path):
    """Without os.getloadavg (or where it fails) train keeps torch's thread count and the bench
    records the load as "n/a"; where git cannot run, the bench's commit is "unknown"; a file
    that is gone has no identity."""
    def no_load():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert cli._busy_machine_threads() == torch.get_num_threads()
    assert bench._load_avg() == "n/a"
    monkeypatch.delenv("FRNN_COMMIT", raising=False)

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(bench.subprocess, "run", no_git)
    assert bench._git_commit() == "unknown"
    assert cli._file_identity(str(tmp_path / "gone.pt")) is None


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_rewrites_one_line_and_clears_it(monkeypatch):
    """cli._Progress on a tty: "\\r"-updated, at most every 0.2 s unless forced, cleared at the
    end; disabled (a rank other than 0) it writes nothing; an unknown ETA is "?"."""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    off = cli._Progress(10, enabled=False)
    off.update(1, 1.0, 1000.0, 5.0, force=True)
    off.clear()
    assert term.getvalue() == ""
    bar = cli._Progress(10, enabled=True)
    bar.update(5, 1.0, 2000.0, math.inf)
    first = term.getvalue()
    assert first.startswith("\r[##########..........] 5/10 loss 1.000") and first.endswith("eta ?")
    bar.update(6, 1.0, 2000.0, 3.0)  # within 0.2 s of the last: skipped
    assert term.getvalue() == first
    bar.update(7, 1.0, 2000.0, 3.0, force=True)
    assert term.getvalue().endswith("eta 0:03") and term.getvalue().count("\r") == 2
    width = bar.width
    bar.clear()
    assert term.getvalue().endswith("\r" + " " * width + "\r") and bar.width == 0


# --------------------------------------------------------------------------- bench
def test_bench_rows_without_a_working_torch_nn_row_say_no_baseline():
    """bench._check: a row whose precision's torch.nn row failed is not compared (and the run
    is not clean)."""
    def row(impl, error=""):
        return {"impl": impl, "precision": "fp32", "error": error, "val_loss": 2.0,
                "tokens_per_s": 100.0}

    results = [row("torch.nn", error="RuntimeError: boom"), row("fused_rnn:reference")]
    assert bench._check(results, torch.device("cpu")) is False
    assert results[0]["check"] == "ERROR"
    assert results[1]["check"] == "no baseline"
    assert results[1]["delta"] is None and results[1]["speedup"] is None


def test_bench_without_matplotlib_writes_the_table_and_says_so(capsys, tmp_path, text_file,
                                                               no_matplotlib):
    """bench._plot/_write_report: no matplotlib, no plot, a note."""
    rc, _, err = run(capsys, *BENCH_TINY, "--text", text_file, "--backends", "reference",
                     "--precisions", "fp32", "--out", tmp_path)
    assert rc == 0, err
    assert "note: matplotlib is not installed; skipped the plot" in err
    assert [p.suffix for p in sorted(tmp_path.glob("*-charlm-bench.*"))] == [".csv", ".md"]


# --------------------------------------------------------------------------- charlm, modules
def test_step_cells_take_a_parametrized_weight_as_computed():
    """CharLM.step_cells: a weight a parametrization computes (weight_norm here; weight
    dropout is the identity in eval mode) goes to the cell detached, as its value now, and
    stepping the cells gives the layer's logits."""
    from torch.nn.utils.parametrizations import weight_norm

    from fused_rnn.charlm import CharLM

    torch.manual_seed(0)
    model = CharLM(7, hidden_size=5, num_layers=1, rnn_kwargs={"backend": "reference"}).eval()
    weight_norm(model.rnn, "weight_hh_l0")
    with torch.no_grad():
        model.rnn.parametrizations.weight_hh_l0.original0.mul_(3.0)  # computed != stored
    cells = model.step_cells()
    w = cells[0].weight_hh
    assert not isinstance(w, torch.nn.Parameter) and not w.requires_grad
    assert torch.equal(w, model.rnn.weight_hh_l0)
    assert isinstance(cells[0].weight_ih, torch.nn.Parameter)
    assert cells[0].weight_ih is model.rnn.weight_ih_l0  # shared, not copied
    tokens = torch.tensor([[1, 2], [3, 4], [0, 6]])
    with torch.no_grad():
        want, _ = model(tokens)
        states, got = None, []
        for t in tokens:
            logits, states = model.step_layers(t, states, cells)
            got.append(logits)
    torch.testing.assert_close(torch.stack(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [fused_rnn.LSTMCell, fused_rnn.GRUCell, fused_rnn.RNNCell])
def test_a_cells_repr_names_a_backend_other_than_auto(cls):
    """modules.*Cell.extra_repr."""
    assert repr(cls(2, 3, backend="reference")).endswith("(2, 3, backend='reference')")
    assert repr(cls(2, 3)).endswith("(2, 3)")


# --------------------------------------------------------------------------- ops.common
def test_check_saved_args_refuses_a_non_tensor_and_another_device():
    """common.check_saved_args (the backward ops' check of their saved tensors)."""
    from fused_rnn.ops.common import check_saved_args

    x = torch.zeros(2, 3)
    check_saved_args("op", x, {"dy": (torch.zeros(2, 3), (2, 3), torch.float32),
                               "dc": (None, (2, 3), None)})
    with pytest.raises(TypeError, match="op: dy must be a tensor or None, got list"):
        check_saved_args("op", x, {"dy": ([0.0] * 6, (2, 3), None)})
    with pytest.raises(RuntimeError, match="op: dy is on meta but x is on cpu"):
        check_saved_args("op", x, {"dy": (torch.zeros(2, 3, device="meta"), (2, 3), None)})


def test_autocast_off_is_a_no_op_where_autocast_has_no_key():
    """common.autocast_off on the meta device (no autocast key: asking it would raise)."""
    import contextlib

    from fused_rnn.ops.common import autocast_off

    assert isinstance(autocast_off(torch.device("meta")), contextlib.nullcontext)
    assert isinstance(autocast_off(torch.device("cpu")), torch.autocast)


# --------------------------------------------------------------------------- tbptt.atomic_save
def test_atomic_save_keeps_the_original_error_when_the_temporary_file_is_gone(tmp_path,
                                                                              monkeypatch):
    """tbptt.atomic_save: a failure after the temporary file went away (another cleaner, or
    a rename that happened before the error) re-raises that failure, not FileNotFoundError,
    and the old file stays."""
    from fused_rnn import tbptt

    path = tmp_path / "ckpt.pt"
    tbptt.atomic_save({"v": 1}, path)

    def replace_then_fail(src, dst):
        os.unlink(src)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tbptt.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        tbptt.atomic_save({"v": 2}, path)
    assert torch.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to count")
def test_atomic_save_closes_its_file_when_setting_the_mode_fails(tmp_path, monkeypatch):
    """tbptt.atomic_save: a failed chmod of the temporary file (a file system that refuses it)
    left its descriptor open; now the file is closed and removed, and the error raised."""
    from fused_rnn import tbptt

    def refuse(fd, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tbptt.os, "fchmod", refuse)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(PermissionError):
        tbptt.atomic_save({"v": 1}, tmp_path / "ckpt.pt")
    assert len(os.listdir("/proc/self/fd")) == before
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_where_a_directory_cannot_be_opened(tmp_path, monkeypatch):
    """tbptt.atomic_save: the directory fsync is skipped where the platform cannot open a
    directory; the file is written all the same."""
    from fused_rnn import tbptt

    real_open = os.open

    def no_dirs(path, flags, *a, **k):
        if os.path.isdir(path):
            raise PermissionError(13, "cannot open a directory here")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(tbptt.os, "open", no_dirs)
    tbptt.atomic_save({"v": 3}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt")["v"] == 3


# --------------------------------------------------------------------------- cuda backend
@pytest.mark.parametrize("name,value,said", [
    ("FUSED_RNN_CUDA_STAGE_K", "sixteen",
     "FUSED_RNN_CUDA_STAGE_K must be 'auto', 0 or a positive multiple of 16, got 'sixteen'"),
    ("FUSED_RNN_CUDA_GEMMS", "tf32", "FUSED_RNN_CUDA_GEMMS must be one of auto, fp32, got 'tf32'"),
])
def test_a_cuda_setting_that_is_not_understood_is_refused(monkeypatch, name, value, said):
    """ops.cuda.ops.max_stage_k (a value int() cannot read) and gemm_operands."""
    from fused_rnn.ops.cuda import ops

    monkeypatch.setenv(name, value)
    read = {"FUSED_RNN_CUDA_STAGE_K": ops.max_stage_k,
            "FUSED_RNN_CUDA_GEMMS": ops.gemm_operands}[name]
    with pytest.raises(ValueError, match=f"^{said}$"):
        read()


def test_the_cuda_backend_refuses_a_projection_and_an_unknown_mode():
    """ops.cuda.rnn_layer with w_hr (backends.kernel_impl never sends one: unsupported_reason
    says no first) and unsupported_reason's unknown mode; neither needs the extension."""
    import fused_rnn.ops.cuda as cuda_backend

    x, h0, c0 = torch.zeros(2, 1, 3), torch.zeros(1, 2), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="no LSTM projection .w_hr.; use backend='triton'"):
        cuda_backend.rnn_layer("LSTM", x, h0, c0, torch.zeros(16, 3), torch.zeros(16, 2),
                               w_hr=torch.zeros(2, 4))
    assert cuda_backend.unsupported_reason(
        "layer", mode="LSTMX", device=torch.device("cpu"), dtype=torch.float32, input_size=3,
        hidden_size=4, proj_size=0, has_lengths=False) == "unknown mode 'LSTMX'"


def test_arch_list_entries_may_be_separated_by_any_run_of_separators():
    """buildinfo.filter_arch_list: empty entries (";;", a trailing ";") are skipped."""
    from fused_rnn.ops.cuda.buildinfo import filter_arch_list

    assert filter_arch_list(" 7.5;;8.0 ;9.0+PTX; ") == (["8.0", "9.0+PTX"], ["7.5"])


@pytest.fixture
def no_arch_list(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    from fused_rnn.ops.cuda import _ext

    return _ext


def test_jit_obstacle_names_missing_sources(no_arch_list, monkeypatch):
    """_ext.sources_dir finds no csrc/ (an install without the sources): jit_obstacle says so."""
    _ext = no_arch_list
    monkeypatch.setattr(_ext, "SOURCES", ("binding.cpp", "no_such_kernel.cu"))
    assert _ext.sources_dir() is None
    assert _ext.jit_obstacle() == ("the CUDA sources (binding.cpp, no_such_kernel.cu) were not "
                                   "found next to the package")


def test_jit_obstacle_names_a_missing_ninja(no_arch_list, monkeypatch):
    from torch.utils import cpp_extension

    _ext = no_arch_list
    monkeypatch.setattr(_ext, "_find_nvcc", lambda: "/opt/fake/nvcc")
    monkeypatch.setattr(_ext, "_nvcc_version", lambda nvcc: None)
    monkeypatch.setattr(_ext, "_find_cxx", lambda: "/usr/bin/c++")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    why = _ext.jit_obstacle()
    assert why.startswith("ninja is not installed (pip install ninja)") and \
        "FUSED_RNN_BUILD_CUDA=1" in why
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert _ext.jit_obstacle() is None


def test_nvcc_is_found_under_cuda_home_and_its_version_read(no_arch_list, monkeypatch, tmp_path):
    """_ext._find_nvcc ($CUDA_HOME/bin/nvcc first) and _nvcc_version (its "release X.Y"; None
    where it cannot run or says no version)."""
    from torch.utils import cpp_extension

    _ext = no_arch_list
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert _ext._find_nvcc() == str(nvcc)
    assert _ext._nvcc_version(str(nvcc)) == (12, 4)
    assert _ext._nvcc_version(str(tmp_path / "missing")) is None
    nvcc.write_text("#!/bin/sh\necho 'something else'\n")
    assert _ext._nvcc_version(str(nvcc)) is None
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)  # then nvcc on PATH
    monkeypatch.setenv("PATH", str(nvcc.parent))
    assert _ext._find_nvcc() == str(nvcc)


def test_pytorch_nvcc_names_the_nvcc_that_is_checked(no_arch_list, monkeypatch, tmp_path):
    """torch's JIT build runs ``PYTORCH_NVCC`` (e.g. ``ccache <nvcc>``) as nvcc where it is
    set: that nvcc's version is the one compared with torch's CUDA, not CUDA_HOME's, and a
    setting that names no nvcc to be found is the reason, not a failed build."""
    from torch.utils import cpp_extension

    _ext = no_arch_list
    for version, where in (("12.4", "home"), ("13.0", "other")):
        nvcc = tmp_path / where / "bin" / "nvcc"
        nvcc.parent.mkdir(parents=True)
        nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V1'\n")
        nvcc.chmod(0o755)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_ext, "_find_cxx", lambda: "/usr/bin/c++")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert _ext.jit_obstacle() is None
    other = tmp_path / "other" / "bin" / "nvcc"
    monkeypatch.setenv("PYTORCH_NVCC", f"ccache {other}")
    assert _ext._find_nvcc() == str(other)
    why = _ext.jit_obstacle()
    assert why and f"nvcc 13.0 ({other}) does not match the CUDA 12.8" in why
    monkeypatch.setenv("PYTORCH_NVCC", "ccache nvcc")  # the nvcc on PATH
    monkeypatch.setenv("PATH", f"{other.parent}:{os.environ['PATH']}")
    assert _ext._find_nvcc() == str(other)
    monkeypatch.setenv("PYTORCH_NVCC", str(tmp_path / "missing" / "nvcc"))
    why = _ext.jit_obstacle()
    assert why and why.startswith("PYTORCH_NVCC=") and "names no nvcc found" in why
    monkeypatch.setenv("PYTORCH_NVCC", " ")  # blank: as unset
    assert _ext._find_nvcc() == str(tmp_path / "home" / "bin" / "nvcc")
    assert _ext.jit_obstacle() is None


def test_no_prebuilt_extension_is_none(monkeypatch):
    """_ext._prebuilt where no ahead-of-time build is installed (the usual case)."""
    from fused_rnn.ops.cuda import _ext

    monkeypatch.setattr(_ext, "PREBUILT", "fused_rnn._no_such_cuda_ext")
    assert _ext._prebuilt() is None


def test_the_cuda_layer_backward_refuses_a_forward_that_saved_nothing():
    """ops.cuda.ops._layer_backward (the CUDA twin of the Triton cell test below; a program
    exported under no_grad records save=False): it says how to get a program that trains,
    before touching the extension."""
    from fused_rnn.ops.cuda import ops

    with pytest.raises(RuntimeError, match="fused_rnn::cuda_layer ran with save=False .no "
                                           "gradients were needed"):
        ops._layer_backward(types.SimpleNamespace(save=False), None, None, None, None, None)


@pytest.mark.parametrize("bad,says", [
    ("x", "h0 must have shape"),  # x as (B, T, I): the GEMMs took it, dW_ih came out wrong
    ("b_ih", "b_ih"),  # db_ih came back (G*H,), the fake said b_ih's shape
    ("gates", "gates must have shape"),
    ("aux", "aux must be torch.float32"),
    ("y", "y must have shape"),
    ("dy", "dy must have shape"),
    ("dc_n", "dc_n must have shape"),
])
def test_the_cuda_layer_backward_op_checks_its_arguments_against_x(monkeypatch, bad, says):
    """torch.ops.fused_rnn.cuda_layer_backward called directly: every argument is checked
    against x's sizes before the extension is touched, as the Triton op's are. The binding
    checks only what it takes against dy; x, y, the weights and biases reach the GEMMs."""
    from fused_rnn.ops.cuda import _ext, ops

    class Reached(Exception):
        pass

    def extension():
        raise Reached

    monkeypatch.setattr(_ext, "extension", extension)
    T, B, I, H = 3, 2, 5, 4
    z = torch.zeros
    args = dict(mode="LSTM", x=z(T, B, I), h0=z(B, H), c0=z(B, H), w_ih=z(4 * H, I),
                w_hh=z(4 * H, H), b_ih=z(4 * H), b_hh=z(4 * H), lengths=None, reverse=False,
                allow_tf32=False, y=z(T, B, H), gates=z(T, B, 4 * H), aux=z(T, B, H),
                dy=z(T, B, H), dh_n=z(B, H), dc_n=z(B, H))
    with pytest.raises(Reached):  # the valid call passes every check
        ops._layer_backward_impl(**args)
    args[bad] = {"x": z(B, T, I), "b_ih": z(1), "gates": z(T, B, 3 * H),
                 "aux": z(T, B, H, dtype=torch.float64), "y": z(T, B, H + 1),
                 "dy": z(B, T, H), "dc_n": z(B, H + 1)}[bad]
    with pytest.raises(RuntimeError, match=says):
        ops._layer_backward_impl(**args)


def test_loading_the_extension_turns_an_obstacle_or_a_failed_build_into_a_reason(
        monkeypatch, tmp_path):
    """_ext._load: a prebuilt extension is taken as it is; otherwise what stops a JIT build, or
    the build's failure (its first error lines and its last 15), is the backend's reason, not
    an exception. An obstacle is not final (a setting can change); a failed build is."""
    from fused_rnn.ops.cuda import _ext

    monkeypatch.setenv("FUSED_RNN_CUDA_BUILD_DIR", str(tmp_path))
    prebuilt = types.ModuleType("prebuilt")
    monkeypatch.setattr(_ext, "_prebuilt", lambda: prebuilt)
    assert _ext._load() == (prebuilt, None, True)
    monkeypatch.setattr(_ext, "_prebuilt", lambda: None)
    monkeypatch.setattr(_ext, "jit_obstacle", lambda: "nvcc was not found")
    assert _ext._load() == (None, "nvcc was not found", False)
    monkeypatch.setattr(_ext, "jit_obstacle", lambda: None)

    def failing_build(bdir):
        assert bdir == tmp_path and bdir.is_dir()
        raise RuntimeError("\n".join(f"line {i}" for i in range(20)))

    monkeypatch.setattr(_ext, "_jit_build", failing_build)
    mod, why, final = _ext._load()
    assert mod is None and final
    assert why == (f"the JIT build of the CUDA extension in {tmp_path} failed "
                   "(FUSED_RNN_CUDA_VERBOSE=1 shows the compiler output):\n"
                   + "\n".join(f"line {i}" for i in range(5, 20)))

    # nvcc follows each error with a long instantiation backtrace: the tail alone can show
    # none of the errors, so the first error lines come first
    def nvcc_failure(bdir):
        raise RuntimeError("\n".join(["rnn_forward.cu(10): error: identifier \"x\" is undefined",
                                      *(f"  detected during instantiation {i}" for i in range(40))]))

    monkeypatch.setattr(_ext, "_jit_build", nvcc_failure)
    why = _ext._load()[1]
    assert why.splitlines()[1] == 'rnn_forward.cu(10): error: identifier "x" is undefined'
    assert why.splitlines()[2] == "..." and why.endswith("instantiation 39"), why


def test_sanitize_cuda_without_the_backend_says_why(monkeypatch, capsys):
    """benchmarks/sanitize_cuda.py on a machine where the CUDA backend cannot run: exit 2 and
    the reason, no case run."""
    import fused_rnn.ops.cuda as cuda_backend

    sanitize_cuda = _benchmark("sanitize_cuda")
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda device: "no GPU in this test")
    monkeypatch.setattr(sys, "argv", ["sanitize_cuda.py"])
    assert sanitize_cuda.main() == 2
    out = capsys.readouterr()
    assert out.err.strip() == "CUDA backend unavailable: no GPU in this test"
    assert "cases match" not in out.out


def test_a_profile_of_a_launch_that_ran_no_kernel_is_its_header():
    """ops.cuda.profile.summarize of an empty buffer (the launch did not run the kernels)."""
    from fused_rnn.ops.cuda import profile

    launch = profile.Launch("forward", "GRU", torch.float16, 5, 3, 8,
                            torch.zeros(profile.MAX_BLOCKS, profile.PROF_SLOTS, dtype=torch.int64))
    assert profile.summarize(launch) == {"direction": "forward", "mode": "GRU",
                                         "dtype": "float16", "BxTxH": "3x5x8", "blocks": 0}


# --------------------------------------------------------------------------- triton backend
def test_triton_unavailable_reasons(monkeypatch):
    """ops.triton._unavailable_reason where the interpreter is off and no GPU is visible (for
    the machine, a CUDA device, the CPU), and where triton cannot be imported."""
    import fused_rnn.ops.triton as triton_backend

    monkeypatch.setattr(triton_backend, "_interpreter_on", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert triton_backend.unavailable_reason(None).startswith(
        "no CUDA GPU is visible; on the CPU the Triton kernels only run under the interpreter")
    assert triton_backend.unavailable_reason(torch.device("cuda")) == (
        "CUDA is not available to torch on this machine (need a CUDA GPU)")
    assert triton_backend.unavailable_reason(torch.device("cpu")).startswith(
        "Triton kernels need a CUDA GPU; to run them on the CPU")
    from fused_rnn.ops.triton import ops  # an op's call where the kernels cannot run

    with pytest.raises(RuntimeError, match="^fused_rnn backend 'triton' is unavailable: Triton "
                                           "kernels need a CUDA GPU"):
        ops.triton_cell("GRU", torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(6, 2),
                        torch.zeros(6, 2), None, None, False)
    monkeypatch.setitem(sys.modules, "triton", None)  # an import of it fails: find_spec is None
    assert triton_backend.unavailable_reason(torch.device("cpu")).startswith(
        "triton is not installed (pip install triton")
    spec_less = types.ModuleType("triton")  # a stand-in without a spec: find_spec raises
    spec_less.__spec__ = None
    monkeypatch.setitem(sys.modules, "triton", spec_less)
    assert triton_backend.unavailable_reason(torch.device("cpu")).startswith(
        "triton is not installed (pip install triton")


def test_the_triton_cell_backward_refuses_a_forward_that_saved_nothing():
    """ops.triton.ops: the cell op called with save=False cannot be differentiated (its
    backward says how to get one that can), and the backward op called directly without the
    forward's gates says so."""
    from fused_rnn.ops.triton import ops

    B, I, H = 1, 2, 2
    x = torch.randn(B, I, requires_grad=True)
    h, w_ih, w_hh = torch.randn(B, H), torch.randn(3 * H, I), torch.randn(3 * H, H)
    h1, _, _, _ = ops.triton_cell("GRU", x, h, None, w_ih, w_hh, None, None, False)
    with pytest.raises(RuntimeError, match="fused_rnn::triton_cell ran with save=False"):
        h1.sum().backward()
    with pytest.raises(RuntimeError, match=r"the forward did not save its gates \(triton_cell "
                                           r"with save=True\)"):
        ops.triton_cell_backward("GRU", x.detach(), h, None, w_ih, w_hh, None, None, h,
                                 torch.zeros(0), torch.zeros(1, B, H), torch.ones(B, H), None)


# --------------------------------------------------------------------------- benchmarks/
def test_bench_gpu_refuses_unknown_list_items():
    """bench_gpu._split: an unknown or empty --modes/--dtypes/... value."""
    bench_gpu = _benchmark("bench_gpu")
    with pytest.raises(SystemExit, match=r"unknown mode\(s\) \['RNN'\]; choose from LSTM, GRU"):
        bench_gpu.parse_args(["--modes", "LSTM,RNN"])
    with pytest.raises(SystemExit, match=r"unknown dtype\(s\) ' , '; choose from"):
        bench_gpu.parse_args(["--dtypes", " , "])


def test_bench_gpu_without_a_gpu_or_dry_run_says_what_to_do(capsys, monkeypatch):
    bench_gpu = _benchmark("bench_gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu.main(["--modes", "GRU"]) == 2
    assert "bench_gpu.py needs a CUDA GPU (use --dry-run" in capsys.readouterr().out


def test_bench_gpu_compare_flags_a_missing_tensor_and_an_all_zero_reference():
    """bench_gpu.compare: a probe tensor that is None fails the check by name; slice_error of
    a reference that is zero throughout is 0 where ours is zero too, else infinite."""
    bench_gpu = _benchmark("bench_gpu")
    y = torch.randn(2, 3, 4)
    _, _, check = bench_gpu.compare({"y": y, "dx": None}, {"y": y, "dx": y}, 1e-3)
    assert check.startswith("FAIL") and "dx missing" in check
    zero = torch.zeros(2, 3)
    assert bench_gpu.slice_error(zero, zero, 0) == 0.0
    assert bench_gpu.slice_error(torch.ones(2, 3), zero, 1) == math.inf


def test_bench_gpu_recheck_and_moot_take_a_failure_as_a_finding(monkeypatch):
    """bench_gpu.recheck: a probe that raises after the timing fails the row's check, naming
    the error; _moot: a variant whose plan cannot be worked out runs (is not moot)."""
    bench_gpu = _benchmark("bench_gpu")

    def boom(*a, **k):
        raise RuntimeError("kernel fault")

    monkeypatch.setattr(bench_gpu, "probe", boom)
    check = bench_gpu.recheck(None, "GRU", None, None, "cpu", {}, "fp32", backward=True)
    assert check.startswith("FAIL: after timing, ") and "kernel fault" in check
    monkeypatch.setattr(bench_gpu, "_variant_is_moot", boom)
    assert bench_gpu._moot("cuda-g1", "GRU", (4, 2, 8), "fp32", "cuda") is False


def test_bench_cpu_compile_option_compiles_ours_fullgraph(monkeypatch):
    """bench_cpu.bench(compile_ours=True) (--compile): ours through torch.compile with
    fullgraph=True, torch.nn eager, and the row says so. (torch.compile stubbed: compiling is
    test_compile.py's, and slow.)"""
    bench_cpu = _benchmark("bench_cpu")
    calls = []

    def fake_compile(model, **kwargs):
        calls.append((type(model), kwargs))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    row = bench_cpu.bench("gru", 2, 2, 4, 1, 1, "reference", compile_ours=True)
    assert calls == [(fused_rnn.GRU, {"fullgraph": True})]
    assert row["backend"] == "reference, compiled" and row["ours_ms"] > 0


def test_auto_rules_refuse_an_empty_table_and_skip_rows_of_other_dtypes():
    """auto_rules.refusal of a table without rows; propose ignores rows of a dtype it has no
    rules for."""
    auto_rules = _benchmark("auto_rules")
    assert auto_rules.refusal([], "cuda") == "the table has no rows"
    rows = [{"cell": "GRU", "dtype": "fp64", "pass": "fwd+bwd", "backend": "cuda", "shape": "S1"}]
    assert auto_rules.propose(rows, "cuda", 1.05) == ([], [])

