"""``fused-rnn``: train, sample from and benchmark a character-level language model.

Subcommands::

    fused-rnn train  [--text FILE] [--cell lstm|gru|rnn] [--steps N] [--out DIR] [--resume] ...
    fused-rnn sample --checkpoint DIR/checkpoint.pt [--prime TEXT] [--length N] ...
    fused-rnn bench  [--out DIR] [--backends ...] [--precisions ...] ...   (fused_rnn/bench.py)

``train`` without ``--text`` trains on an embedded corpus every machine has: the source of a
fixed, sorted list of Python standard-library modules (identical for one Python version;
patch releases change a few modules; its size and sha256 are printed). Under ``torchrun --nproc_per_node=N -m
fused_rnn.cli train ...`` it trains with DistributedDataParallel (nccl on GPUs, gloo on
CPUs); ``--batch-size`` is then the global number of streams, split between the ranks, so
N ranks compute what one process computes with the whole batch.

Bad input exits with status 2 and one line on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import hashlib
import importlib.util
import io
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

import fused_rnn
from fused_rnn import backends as _backends
from fused_rnn.charlm import CELLS, CharLM, Vocab
from fused_rnn.tbptt import (
    StreamBatcher,
    atomic_save,
    bits,
    eval_mode,
    evaluate,
    train_chunk,
)

__all__ = ["DEFAULT_CORPUS_MODULES", "load_default_corpus", "main"]

CHECKPOINT_FORMAT = "fused_rnn.charlm/1"

# The embedded default corpus: pure-Python standard-library modules present (as source)
# from Python 3.10 to 3.14, none of them frozen or patched by distributions. About 0.8 MB.
DEFAULT_CORPUS_MODULES = (
    "argparse", "ast", "bisect", "calendar", "colorsys", "contextlib", "copy", "csv",
    "dataclasses", "difflib", "fnmatch", "fractions", "functools", "getopt", "glob",
    "graphlib", "heapq", "numbers", "operator", "pprint", "queue", "random", "reprlib",
    "sched", "shlex", "statistics", "string", "textwrap", "timeit", "tokenize", "traceback",
    "weakref",
)  # fmt: skip

# Options that define a training run: on --resume they come from the checkpoint, and giving
# one with a different value is an error. Values here are the defaults for a new run,
# chosen so that the default run takes 1-3 minutes on a 2-core CPU (see the README).
RUN_DEFAULTS = {
    "cell": "lstm",
    "hidden_size": 256,
    "layers": 1,
    "embedding_size": None,
    "dropout": 0.0,
    "tie_weights": False,
    "weight_drop": 0.0,
    "batch_size": 32,
    "bptt": 128,
    "variable_bptt": False,
    "lr": 5e-3,
    "lr_schedule": "constant",
    "clip": 1.0,
    "weight_decay": 0.0,
    "seed": 0,
    "val_frac": 0.05,
    "max_val_chars": 100_000,
    "precision": "fp32",
}
VARIABLE_BPTT_MIN = 5  # AWD-LSTM's shortest chunk (StreamBatcher's min_length)
INTERVAL_DEFAULTS = {"eval_every": 100, "ckpt_every": 200, "log_every": 25}
PRECISIONS = ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a batch scheduler), stopping a run as Ctrl-C does: the last
    checkpoint is kept and the run resumes exactly. Exit status 143."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM wait for the end of the block, then are delivered again. A
    KeyboardInterrupt inside torch.save's writer came out as a RuntimeError ("unexpected
    pos"): the run then reported a failed write, not the interrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if got:
        signal.raise_signal(got[0])


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), so every bad input reads the same."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# --------------------------------------------------------------------------- argument types
def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v

    return parse


def _float_in(lo: float, hi: float = math.inf, lo_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not (lo < v if lo_open else lo <= v) or not v <= hi or not math.isfinite(v):
            rng = (f"a finite number {'>' if lo_open else '>='} {lo:g}" if hi == math.inf else
                   f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {s}")
        return v

    return parse


def _seed(s: str) -> int:
    """A seed torch.manual_seed takes: an integer in [-2**63, 2**64)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if not -(2**63) <= v < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64), got {s}")
    return v


def _csv_list(choices):
    def parse(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"invalid choice {','.join(bad) or s!r} (choose from {', '.join(choices)})"
            )
        return list(dict.fromkeys(items))  # each once: a repeat would be run (and checked) twice

    return parse


# --------------------------------------------------------------------------- corpora
@dataclass
class Corpus:
    text: str
    doc_starts: list[int]  # character offsets where documents begin
    description: str
    source: str  # "default" or the path given

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise CLIError(
            f"the default corpus needs the standard-library module {name!r}, which this "
            "Python lacks; pass --text FILE"
        )
    if spec.origin and os.path.isfile(spec.origin):
        with open(spec.origin, "rb") as f:
            raw = f.read()
        src = raw.decode("utf-8")
    else:  # zipped standard library
        src = spec.loader.get_source(name) if spec.loader else None
        if src is None:
            raise CLIError(f"no source for standard-library module {name!r}; pass --text FILE")
    return src.replace("\r\n", "\n")


def load_default_corpus() -> Corpus:
    """The source of ``DEFAULT_CORPUS_MODULES`` (in that sorted order), one document each."""
    parts, starts, offset = [], [], 0
    for name in sorted(DEFAULT_CORPUS_MODULES):
        src = _module_source(name)
        starts.append(offset)
        parts.append(src)
        offset += len(src)
    text = "".join(parts)
    v = sys.version_info
    corpus = Corpus(text, starts, "", "default")
    corpus.description = (
        f"Python {v.major}.{v.minor} standard-library source, {len(parts)} modules "
        f"({', '.join(sorted(DEFAULT_CORPUS_MODULES)[:3])}, ..., "
        f"{max(DEFAULT_CORPUS_MODULES)}), {len(text):,} characters, "
        f"sha256 {corpus.sha256[:12]}"
    )
    return corpus


def load_text_file(path: str) -> Corpus:
    """A UTF-8 text file as one document; bad files raise CLIError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CLIError(f"--text {path}: no such file") from None
    except IsADirectoryError:
        raise CLIError(f"--text {path}: is a directory, not a text file") from None
    except OSError as e:
        raise CLIError(f"--text {path}: cannot read it ({e.strerror or e})") from None
    if not raw:
        raise CLIError(f"--text {path}: the file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(
            f"--text {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text.strip():
        raise CLIError(f"--text {path}: the file has only whitespace")
    corpus = Corpus(text, [0], "", os.path.abspath(path))
    corpus.description = f"{path}, {len(text):,} characters, sha256 {corpus.sha256[:12]}"
    return corpus


@dataclass
class Splits:
    vocab: Vocab
    train: torch.Tensor
    train_bounds: torch.Tensor
    val: torch.Tensor
    val_bounds: torch.Tensor


def split_corpus(corpus: Corpus, val_frac: float, max_val_chars: int, batch_size: int,
                 *, split_flags: bool = True) -> Splits:
    """Encode; the last ``val_frac`` (at most ``max_val_chars``) is validation.
    ``split_flags``: whether the caller has --val-frac and --max-val-chars to suggest."""
    vocab = Vocab.from_text(corpus.text)
    n = len(corpus.text)
    n_val = min(int(n * val_frac), max_val_chars)
    n_train = n - n_val
    need = batch_size + 1
    if n_val < need or n_train < need:
        hint = ""
        if split_flags and n_val < need and n - need >= need:  # a larger split could help
            hint = (", or a larger --max-val-chars" if n_val == max_val_chars
                    else ", or a larger --val-frac" if int(n * 0.5) >= need else "")
        raise CLIError(
            f"text too short: {n:,} character{'s' if n != 1 else ''} give{'' if n != 1 else 's'} "
            f"{n_train:,} for training and {n_val:,} for validation; --batch-size {batch_size} "
            f"needs at least {need} of each (use a longer text or a smaller --batch-size"
            f"{hint})"
        )
    ids = torch.tensor([vocab.index[c] for c in corpus.text], dtype=torch.long)
    bounds = torch.zeros(n, dtype=torch.bool)
    bounds[torch.tensor(corpus.doc_starts, dtype=torch.long)] = True
    return Splits(
        vocab,
        ids[:n_train],
        bounds[:n_train],
        ids[n_train : n_train + n_val],
        bounds[n_train : n_train + n_val],
    )


# --------------------------------------------------------------------------- devices, precision
def _device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA GPU is available here")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _precision(name: str, device: torch.device, flag: str = "--precision"):
    """(parameter dtype, autocast dtype or None, use a GradScaler); ``flag`` names the
    option in errors."""
    if name in ("bf16", "amp-bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CLIError(f"{flag} {name}: this GPU does not support bfloat16")
    if name == "fp16":
        # Measured: the loss is not finite by step 2 of the default job, whatever the lr.
        raise CLIError(
            f"{flag} fp16 would keep the parameters and Adam's moments in fp16, where the "
            "squared gradients underflow and Adam's eps (1e-8) rounds to 0, so training diverges "
            "within a few steps; use amp-fp16 (fp32 parameters, fp16 compute, a GradScaler) "
            "or bf16"
        )
    return {
        "fp32": (torch.float32, None, False),
        "bf16": (torch.bfloat16, None, False),
        "fp16": (torch.float16, None, False),
        "amp-bf16": (torch.float32, torch.bfloat16, False),
        "amp-fp16": (torch.float32, torch.float16, True),
    }[name]


def _torch_nn_failure(cell: str, device: torch.device, precision: str,
                      flag: str = "--precision") -> str | None:
    """Why torch.nn's own ``cell`` layer cannot run ``precision`` on ``device`` (None where it
    can), found by one step of a one-unit layer. torch 2.13's CPU LSTM (oneDNN's) has no fp16
    kernel, and CPU autocast hands it fp16 under amp-fp16; nor bf16 on a CPU without AVX-512
    or AVX2-VNNI-2 (AMD's Zen 3, say), which amp-bf16 hands it there. A run would otherwise
    stop at its first step with oneDNN's error and a traceback."""
    param_dtype, ac_dtype, _ = _precision(precision, device, flag)
    rnn_class = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    layer = rnn_class(1, 1).to(device, param_dtype)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=ac_dtype,
                                             enabled=ac_dtype is not None):
            layer(torch.zeros(1, 1, 1, device=device, dtype=param_dtype))
    except RuntimeError as e:
        return (f"torch.nn.{rnn_class.__name__} cannot run it on {device.type} "
                f"({str(e).splitlines()[0].split('. ')[0].rstrip('.')})")
    return None


def _check_torch_nn_runs(cell: str, device: torch.device, precision: str,
                         flag: str = "--precision",
                         advice: str = "fused_rnn's modules (drop --torch-nn) run it") -> None:
    """A CLIError where :func:`_torch_nn_failure` says why torch.nn cannot run ``precision``."""
    why = _torch_nn_failure(cell, device, precision, flag)
    if why is not None:
        raise CLIError(f"{flag} {precision}: {why}; {advice}")


def _auto_resolves_to(rnn, device: torch.device, precision: str, batch: int,
                      steps: int | None = None) -> str:
    """The backend ``backend="auto"`` runs for the fused_rnn stack ``rnn`` in ``precision``
    with ``batch`` rows per process and chunks of ``steps`` (fused_rnn.backends.resolve_stack;
    a chunk cut shorter at a document boundary can resolve otherwise)."""
    param_dtype, ac_dtype, _ = _precision(precision, device)
    return _backends.resolve_stack(
        "auto", device,
        **rnn.stack_config(device, ac_dtype or param_dtype, batch, steps=steps))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_from_env() -> _Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    return _Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def _init_dist(d: _Dist, device: torch.device) -> None:
    if not d.enabled:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def _destroy_process_group() -> None:
    """``dist.destroy_process_group()``, after the DDP wrappers are gone. Drop yours first.

    A DDP Reducer holds its process group. If the Reducer lets go of a gloo group last, then
    ``~ProcessGroupGloo`` joins the gloo worker threads with the GIL held. A worker may at that
    moment be freeing a finished backward's allreduce. Since torch 2.13 that work's
    thread-local state holds a Python object (backward stashes its ``contextvars`` context
    there), whose release waits for the GIL: a deadlock. It hung one CI run, and a loop of
    short DDP trainings in about one of 100. Freed while the group is still registered, the
    Reducer is not the last; the registry's Python reference is, and its destructor joins
    the workers with the GIL released. ``gc.collect()`` frees wrappers held in reference
    cycles (DDP is one in a process that has not imported torch._dynamo).
    """
    gc.collect()
    dist.destroy_process_group()


def _release_frames(exc: BaseException) -> None:
    """Clears the locals of the finished frames that ``exc``'s traceback holds, and those of
    the exceptions it chains to: what a stopped run's frames held (its DDP wrapper) is freed
    then, as after a normal return, not when the caller drops the exception, after
    :func:`_destroy_process_group`. Frames still running keep theirs."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += [e.__context__, e.__cause__]


def _all_sum(values: list[float], device: torch.device, d: _Dist) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- output helpers
class _Progress:
    """A one-line progress bar on stderr (``\\r``-updated on a terminal, else a line per log)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.width = 0
        self.last = 0.0

    def update(self, step: int, loss: float, tok_s: float, eta_s: float, force=False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty and not force and now - self.last < 0.2:
            return
        self.last = now
        frac = step / self.total if self.total else 1.0
        filled = int(20 * frac)
        line = (
            f"[{'#' * filled}{'.' * (20 - filled)}] {step}/{self.total} "
            f"loss {loss:.3f} ({bits(loss):.3f} bpc) | {tok_s / 1000:.1f}k tok/s | "
            f"eta {_fmt_time(eta_s)}"
        )
        try:
            if self.tty:
                sys.stderr.write("\r" + line.ljust(self.width))
                self.width = len(line)
            else:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except BrokenPipeError:  # stderr's reader is gone (2>&1 | head): no more progress
            self.enabled = False
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stderr.fileno())
            os.close(devnull)

    def clear(self) -> None:
        if self.enabled and self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


LOG_FIELDS = ("step", "epoch", "tokens", "train_loss", "train_bpc", "val_bpc", "grad_norm",
              "lr", "tokens_per_s", "elapsed_s")  # fmt: skip


def _read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            try:
                int(row["step"])
            except (TypeError, ValueError, KeyError):
                continue  # a line torn by a crash
            if None in row or None in row.values():
                continue  # too many fields (DictReader's key None) or too few (values None)
            rows.append(row)
    return rows


def _write_log(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, LOG_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", newline="") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except OSError as e:
        raise CLIError(f"could not write {path} ({type(e).__name__}: {e})") from None


def _plot_log(rows: list[dict], path: str, title: str) -> str | None:
    """loss.png from the log rows; returns a note instead when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed; skipped the loss plot (pip install 'fused_rnn[train]')"
    tr = [(int(r["step"]), float(r["train_bpc"])) for r in rows if r["train_bpc"]]
    va = [(int(r["step"]), float(r["val_bpc"])) for r in rows if r["val_bpc"]]
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if tr:
        xs, ys = zip(*tr)
        one = "o" if len(xs) == 1 else None  # a line through one point draws nothing
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=0.8, marker=one,
                label="train (per chunk)")
        ema, sm = 0.0, []
        for k, y in enumerate(ys, 1):  # debiased exponential moving average
            ema = 0.95 * ema + 0.05 * y
            sm.append(ema / (1 - 0.95**k))
        ax.plot(xs, sm, color="tab:blue", lw=1.5, marker=one, label="train (smoothed)")
    if va:
        xs, ys = zip(*va)
        ax.plot(xs, ys, "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return None


# --------------------------------------------------------------------------- train
def _rng_state(device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def _restore_rng(ckpt: dict, d: _Dist, device: torch.device, seed: int) -> None:
    """Each rank's random state from a checkpoint: its own where the world size is the one
    that wrote it. Otherwise the states cannot be matched to ranks, and each rank seeds its
    generators afresh from the run's seed, its rank and the step, so that the ranks draw
    different dropout masks as they do from the start of a run (all of them once took rank
    0's state, and drew the same masks)."""
    if ckpt["world_size"] == d.world:
        _set_rng_state(ckpt["rng"][d.rank], device)
        return
    digest = hashlib.sha256(f"{seed} {d.rank} {ckpt['step']}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))
    random.seed(digest)


def _gather_state(state, d: _Dist):
    """The carried hidden state of all ranks, concatenated along the batch, on the CPU."""
    if state is None:
        return None
    parts = (state,) if isinstance(state, torch.Tensor) else tuple(state)
    out = []
    for s in parts:
        if d.enabled:
            chunks = [torch.empty_like(s) for _ in range(d.world)]
            dist.all_gather(chunks, s.contiguous())
            s = torch.cat(chunks, 1)
        out.append(s.detach().cpu())
    return out[0] if isinstance(state, torch.Tensor) else tuple(out)


def _write_or_say(path: str, kept, write) -> None:
    """``write()``, with a failure (a full disk, a lost mount) said in one line: which file,
    why, and which checkpoint is kept. torch.save reports a short write as a RuntimeError."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"could not write {path} ({type(e).__name__}: {why}); {kept()}") from None


def _print_or_drop(*args, **kwargs) -> None:
    """print, except that once stdout's reader is gone (``| head``, a dead ``tee``) the run
    goes on and its output goes nowhere: a progress line is not worth a crashed run."""
    try:
        print(*args, **kwargs)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not fail too
        os.close(devnull)


def _file_identity(path: str) -> tuple | None:
    """What tells a rewritten file from the one read: (inode, size, mtime), or None if gone.
    (atomic_save replaces the file, so a new checkpoint has a new inode.)"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _resolve_running_flags(args, ckpt: dict | None, say) -> None:
    """--steps, --backend and --torch-nn: given, or the checkpoint's on --resume (a resumed
    run keeps what it trained with), or the defaults. Overriding the implementation of a
    resumed run is allowed, with a note: its rounding differs."""
    saved = ckpt or {}
    if args.steps is None:
        args.steps = saved.get("steps", 1000)
    elif "steps" in saved and args.steps != saved["steps"] and saved.get("run", {}).get(
            "lr_schedule") == "cosine":
        say(f"note: the cosine schedule now spans --steps {args.steps}, the checkpoint's "
              f"{saved['steps']}: the learning rate jumps at the resumed step")
    if args.torch_nn is None:  # an explicit --backend means fused_rnn's modules
        args.torch_nn = False if args.backend is not None else bool(saved.get("torch_nn", False))
    if args.backend is None:
        args.backend = "auto" if args.torch_nn else saved.get("backend", "auto")
    if "backend" in saved:
        before = "torch.nn" if saved.get("torch_nn") else f"backend {saved['backend']}"
        now = "torch.nn" if args.torch_nn else f"backend {args.backend}"
        if before != now:
            say(f"note: the checkpoint trained on {before}, this run on {now}: the losses "
                  "will differ from an uninterrupted run by rounding")


def _load_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CLIError(f"no checkpoint at {path}") from None
    except IsADirectoryError:
        raise CLIError(f"{path} is a directory; pass the checkpoint file (…/checkpoint.pt)") from None
    except Exception as e:  # torn, foreign or not a torch file at all
        raise CLIError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if isinstance(fmt, str) and fmt.startswith("fused_rnn.charlm/") and fmt != CHECKPOINT_FORMAT:
        raise CLIError(f"{path} was written by another version of fused-rnn (format {fmt}; "
                       f"this one reads {CHECKPOINT_FORMAT})")
    if fmt != CHECKPOINT_FORMAT:
        raise CLIError(f"{path} is not a fused-rnn character-model checkpoint")
    missing = [k for k in ("step", "run", "model_config", "vocab", "model") if k not in ckpt]
    if missing:
        raise CLIError(f"{path} is incomplete: it has no {', '.join(missing)}")
    return ckpt


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train the character-level language model (truncated BPTT)",
                       description="Train a character-level LM with truncated BPTT.")
    p.add_argument("--text", metavar="FILE",
                   help="UTF-8 training text (default: the embedded Python standard-library corpus)")
    p.add_argument("--out", default="runs/charlm", metavar="DIR",
                   help="output directory: checkpoint.pt, log.csv, loss.png (default: %(default)s)")
    p.add_argument("--steps", type=_int_at_least(0), default=None,
                   help="total training steps (one chunk each; default: 1000, or the "
                   "checkpoint's total on --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue DIR/checkpoint.pt exactly (same losses as an uninterrupted run)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if DIR has a checkpoint")
    g = p.add_argument_group("model and optimisation (taken from the checkpoint on --resume)")
    g.add_argument("--cell", choices=CELLS, default=None, help="recurrent cell (default: lstm)")
    g.add_argument("--hidden-size", type=_int_at_least(1), default=None, help="default: 256")
    g.add_argument("--layers", type=_int_at_least(1), default=None, help="default: 1")
    g.add_argument("--embedding-size", type=_int_at_least(1), default=None,
                   help="default: 64, or the hidden size with --tie-weights")
    g.add_argument("--dropout", type=_float_in(0.0, 1.0), default=None, help="default: 0")
    g.add_argument("--tie-weights", action="store_const", const=True, default=None,
                   help="share the embedding and output weights")
    g.add_argument("--weight-drop", type=_float_in(0.0, 1.0), default=None,
                   help="AWD-LSTM's DropConnect on the recurrent weights: the probability of "
                   "zeroing each element of weight_hh, one mask a chunk (default: 0)")
    g.add_argument("--batch-size", type=_int_at_least(1), default=None,
                   help="number of parallel streams, global under torchrun (default: 32)")
    g.add_argument("--bptt", type=_int_at_least(1), default=None, help="chunk length (default: 128)")
    g.add_argument("--variable-bptt", action="store_const", const=True, default=None,
                   help="AWD-LSTM's randomised chunk lengths (lr scaled by length/bptt; the "
                   "lengths have noise of std 5 and are at least 5, so --bptt must be too)")
    g.add_argument("--lr", type=_float_in(0.0, lo_open=True), default=None,
                   help="Adam's peak learning rate (default: 5e-3)")
    g.add_argument("--lr-schedule", choices=("cosine", "constant"), default=None,
                   help="cosine: decay to lr/10 at --steps (a resumed run matches an "
                   "uninterrupted one with the same --steps); default: constant")
    g.add_argument("--clip", type=_float_in(0.0), default=None,
                   help="gradient-norm clip, 0 = off (default: 1.0)")
    g.add_argument("--weight-decay", type=_float_in(0.0), default=None, help="default: 0")
    g.add_argument("--seed", type=_seed, default=None, help="default: 0")
    g.add_argument("--val-frac", type=_float_in(0.0, 0.5, lo_open=True), default=None,
                   help="fraction of the text held out for validation, taken from its end (default: 0.05)")
    g.add_argument("--max-val-chars", type=_int_at_least(1), default=None,
                   help="cap on validation characters (default: 100000)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: fp32 (fp16 is refused: Adam's moments underflow in fp16 "
                   "parameters; use amp-fp16)")
    r = p.add_argument_group("running")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--backend", default=None, choices=fused_rnn.BACKENDS,
                   help="fused_rnn backend (default: auto, or the checkpoint's on --resume)")
    r.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="CPU threads (default: PyTorch's choice, less the cores that the load "
                   "average says other processes hold: on a busy 2-core machine 2 threads "
                   "ran ~15x slower than 1; or the checkpoint's on --resume)")
    r.add_argument("--torch-nn", action=argparse.BooleanOptionalAction, default=None,
                   help="use torch.nn's LSTM/GRU/RNN instead of fused_rnn's (for comparison; "
                   "default: no, or the checkpoint's on --resume)")
    r.add_argument("--eval-every", type=_int_at_least(1), default=None,
                   help="validate every N steps (default: 100, or the checkpoint's)")
    r.add_argument("--ckpt-every", type=_int_at_least(1), default=None,
                   help="write the checkpoint every N steps (default: 200, or the checkpoint's)")
    r.add_argument("--log-every", type=_int_at_least(1), default=None,
                   help="flush log rows / print a progress line (when stderr is not a terminal) "
                   "every N steps (default: 25, or the checkpoint's)")
    p.set_defaults(func=_cmd_train)


def _resolve_run_config(args, ckpt: dict | None, corpus_sha: str) -> dict:
    given = {k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k) is not None}
    if ckpt is None:
        cfg = {**RUN_DEFAULTS, **given}
        cfg["corpus_sha256"] = corpus_sha
        return cfg
    cfg = dict(ckpt["run"])
    cfg.setdefault("weight_drop", 0.0)  # checkpoints from before --weight-drop
    if cfg["corpus_sha256"] != corpus_sha:
        raise CLIError(
            f"--resume: the checkpoint was trained on a different text (sha256 "
            f"{cfg['corpus_sha256'][:12]}, this one {corpus_sha[:12]})"
        )
    for k, v in given.items():
        built = cfg["hidden_size"] if cfg["tie_weights"] else 64  # embedding_size None's value
        if k == "embedding_size" and cfg[k] is None and v == built:
            continue
        if cfg[k] != v:
            flag = "--" + k.replace("_", "-")
            had = built if k == "embedding_size" and cfg[k] is None else cfg[k]
            raise CLIError(
                f"--resume: the checkpoint was trained with {flag} {had}, not {v} "
                "(drop the flag to continue it, or train into a new --out)"
            )
    return cfg


def _check_writable(out: str, *files: str) -> None:
    """Refuse, before any training, an --out that cannot hold the run's files (the final
    checkpoint or report would fail after all the work), or where one of ``files`` is a
    directory."""
    try:
        os.makedirs(out, exist_ok=True)
        for path in files:
            if os.path.isdir(path):
                raise CLIError(f"--out {out}: {path} is a directory; the run's file cannot "
                               "be written there")
        with tempfile.NamedTemporaryFile(dir=out, prefix=".fused_rnn_write_test."):
            pass
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _lock_out_dir(out: str):
    """An exclusive lock on --out for this run (an open file; closing it releases the lock,
    and so does the process's death). A second ``train`` on the same directory is refused
    instead of writing the same log and checkpoint. None where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    path = os.path.join(out, ".lock")
    fh = open(path, "a")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise CLIError(f"--out {out} is in use by another fused-rnn train (it holds {path}); "
                       "wait for it or pass another --out") from None
    return fh


def _busy_machine_threads() -> int:
    """PyTorch's thread count, less the cores other processes keep busy (1-min load average).

    An OpenMP thread that waits for a preempted peer loses a whole time slice at every
    barrier: on the 2-core machine with a load average of 6, the default training step took
    148 ms on 2 threads and 10 ms on 1.
    """
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    free = (os.cpu_count() or n) - load
    return max(1, min(n, int(free + 0.5)))


def _cmd_train(args) -> int:
    d = _dist_from_env()
    device = _device(args.device, d.local_rank)
    out = args.out
    ckpt_path = os.path.join(out, "checkpoint.pt")
    log_path = os.path.join(out, "log.csv")
    plot_path = os.path.join(out, "loss.png")

    if args.resume and args.overwrite:
        raise CLIError("--resume continues the run in --out and --overwrite starts a new one "
                       "there; pass one of them")
    if args.torch_nn and args.backend not in (None, "auto"):
        raise CLIError(f"--torch-nn trains torch.nn's modules, which have no backend; drop "
                       f"--backend {args.backend} or --torch-nn")
    ckpt = None
    ckpt_stat = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise CLIError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt_stat = _file_identity(ckpt_path)
        ckpt = _load_checkpoint(ckpt_path)
    elif os.path.exists(ckpt_path) and not args.overwrite:
        raise CLIError(
            f"{ckpt_path} exists; pass --resume to continue it, --overwrite to start "
            "afresh, or another --out"
        )
    _resolve_running_flags(args, ckpt, say=print if d.rank == 0 else (lambda *a: None))
    text_path = args.text
    if text_path is None and ckpt is not None and ckpt["corpus"]["source"] != "default":
        text_path = ckpt["corpus"]["source"]
        if not os.path.exists(text_path):
            raise CLIError(f"--resume: the checkpoint's text {text_path} is gone; pass --text "
                           "with where it is now (its sha256 is checked)")
    corpus = load_text_file(text_path) if text_path is not None else load_default_corpus()
    cfg = _resolve_run_config(args, ckpt, corpus.sha256)
    if cfg["batch_size"] % d.world:
        raise CLIError(
            f"--batch-size {cfg['batch_size']} (global) must be divisible by the "
            f"{d.world} ranks"
        )
    if cfg["tie_weights"] and cfg["embedding_size"] not in (None, cfg["hidden_size"]):
        raise CLIError("--tie-weights needs --embedding-size equal to --hidden-size")
    if cfg["variable_bptt"] and cfg["bptt"] < VARIABLE_BPTT_MIN:
        raise CLIError(f"--variable-bptt draws chunk lengths of at least {VARIABLE_BPTT_MIN} "
                       f"around --bptt; --bptt {cfg['bptt']} is shorter than that")
    param_dtype, ac_dtype, use_scaler = _precision(cfg["precision"], device)
    if args.torch_nn:
        _check_torch_nn_runs(cfg["cell"], device, cfg["precision"])
    if d.rank == 0:
        _check_writable(out, ckpt_path, log_path, plot_path)
    for k, v in INTERVAL_DEFAULTS.items():  # not part of the run: may change on --resume
        if getattr(args, k) is None:
            setattr(args, k, (ckpt or {}).get("intervals", {}).get(k, v))
    # The thread count can change the rounding of CPU reductions, so a resumed run keeps the
    # checkpoint's unless told otherwise.
    args.threads = args.threads or (ckpt or {}).get("threads") or _busy_machine_threads()
    torch.set_num_threads(args.threads)
    splits = split_corpus(corpus, cfg["val_frac"], cfg["max_val_chars"], cfg["batch_size"])
    if ckpt is not None and ckpt["vocab"] != splits.vocab.chars:
        raise CLIError("--resume: the checkpoint's vocabulary differs from this text's")
    if not args.torch_nn:
        try:
            _backends.require(args.backend, device)
        except RuntimeError as e:
            raise CLIError(str(e)) from None

    lock = _lock_out_dir(out) if d.rank == 0 else None
    try:
        # Checked above before the (slow) corpus load; another run may have written or
        # advanced the checkpoint since, and then released the lock.
        if d.rank == 0 and ckpt is None and not args.overwrite and os.path.exists(ckpt_path):
            raise CLIError(f"{ckpt_path} was written by another run while this one started; "
                           "pass --resume to continue it, --overwrite to start afresh, or "
                           "another --out")
        if d.rank == 0 and ckpt is not None and _file_identity(ckpt_path) != ckpt_stat:
            raise CLIError(f"--resume: {ckpt_path} changed while this run started (another "
                           "run wrote it); run again to continue from the new one")
        if ckpt is None and d.rank == 0:
            # --overwrite: the old run's files go now, not at this run's first checkpoint: a
            # run stopped before it would leave the old checkpoint beside the new log, and
            # --resume would continue the old run.
            for path in (ckpt_path, log_path, plot_path):
                if os.path.exists(path):
                    os.unlink(path)
        _init_dist(d, device)
        # SIGTERM stops the run as Ctrl-C does (in-process callers off the main thread keep
        # theirs: only the main thread may set handlers).
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main else None
        try:
            return _train(args, cfg, d, device, corpus, splits, ckpt, param_dtype, ac_dtype,
                          use_scaler, ckpt_path, log_path, plot_path)
        finally:
            if on_main:
                signal.signal(signal.SIGTERM, previous)
    except BaseException as e:
        if d.enabled:
            # A run that stops early (a non-finite loss, Ctrl-C, SIGTERM, a failed write)
            # leaves its DDP wrapper in the frames of the exception's traceback; they must let
            # go of it before the group is destroyed below.
            _release_frames(e)
        raise
    finally:
        if d.enabled and dist.is_initialized():
            _destroy_process_group()
        if lock is not None:
            lock.close()


def _build_model(cfg: dict, vocab_size: int, torch_nn: bool, backend: str) -> CharLM:
    if torch_nn:
        rnn_class = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cfg["cell"]]
        kwargs = None
    else:
        rnn_class, kwargs = None, {"backend": backend}
    return CharLM(
        vocab_size,
        cell=cfg["cell"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["layers"],
        embedding_size=cfg["embedding_size"],
        dropout=cfg["dropout"],
        tie_weights=cfg["tie_weights"],
        weight_drop=cfg.get("weight_drop", 0.0),
        rnn_class=rnn_class,
        rnn_kwargs=kwargs,
    )


def _train(args, cfg, d, device, corpus, splits, ckpt, param_dtype, ac_dtype, use_scaler,
           ckpt_path, log_path, plot_path) -> int:
    say = _print_or_drop if d.main else (lambda *a, **k: None)
    if d.main:
        os.makedirs(args.out, exist_ok=True)
        for name in os.listdir(args.out):  # temp files of a run killed while saving
            if name.startswith(".checkpoint.pt.") and name.endswith(".tmp"):
                os.unlink(os.path.join(args.out, name))

    # Same initial weights on every rank (DDP also broadcasts rank 0's); dropout draws
    # differ per rank.
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    model = _build_model(cfg, len(splits.vocab), args.torch_nn, args.backend)
    model.to(device=device, dtype=param_dtype)
    torch.manual_seed(cfg["seed"] + 1000 * d.rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    batcher = StreamBatcher(
        splits.train, cfg["batch_size"], cfg["bptt"], boundaries=splits.train_bounds,
        variable_length=cfg["variable_bptt"], seed=cfg["seed"], rank=d.rank,
        world_size=d.world, device=device,
    )
    val = StreamBatcher(
        splits.val, cfg["batch_size"], cfg["bptt"], boundaries=splits.val_bounds,
        rank=d.rank, world_size=d.world, device=device,
    )
    step, tokens_seen, elapsed, state = 0, 0, 0.0, None
    rows: list[dict] = []
    local = cfg["batch_size"] // d.world
    rows_of_rank = slice(d.rank * local, (d.rank + 1) * local)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        batcher.load_state_dict(ckpt["data"])
        step, tokens_seen, elapsed = ckpt["step"], ckpt["tokens"], ckpt["elapsed_s"]
        h = ckpt["hidden"]
        if h is not None:
            h = h if isinstance(h, torch.Tensor) else tuple(h)
            h = (h[:, rows_of_rank] if isinstance(h, torch.Tensor)
                 else tuple(s[:, rows_of_rank] for s in h))
            state = (h.to(device) if isinstance(h, torch.Tensor)
                     else tuple(s.to(device) for s in h))
        if ckpt["world_size"] != d.world:
            say(f"note: the checkpoint was written by {ckpt['world_size']} processes, this run "
                f"has {d.world}: random draws (dropout) will differ from an uninterrupted run")
        _restore_rng(ckpt, d, device, cfg["seed"])
        if d.main:
            rows = [r for r in _read_log(log_path) if int(r["step"]) <= step]
            _write_log(log_path, rows)
    elif d.main:
        _write_log(log_path, [])

    train_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    rnn_name = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[cfg["cell"]]
    impl = (f"torch.nn.{rnn_name}" if args.torch_nn else
            f"fused_rnn.{rnn_name} backend {args.backend}"
            + (f" (→ {_auto_resolves_to(model.rnn, device, cfg['precision'], local, cfg['bptt'])})"
               if args.backend == "auto" else ""))
    n_train, n_val = splits.train.numel(), splits.val.numel()
    tok_per_step = cfg["batch_size"] * cfg["bptt"]
    say(f"corpus: {corpus.description}")
    say(f"vocabulary {len(splits.vocab)} characters; {n_train:,} training and {n_val:,} "
        f"validation characters")
    say(f"model: {cfg['layers']}-layer {cfg['cell'].upper()}, hidden {cfg['hidden_size']}, "
        f"embedding {model.config['embedding_size']}, {model.num_parameters():,} parameters"
        + "".join(f", {what} {cfg[key]:g}" for key, what in
                  (("dropout", "dropout"), ("weight_drop", "weight dropout")) if cfg[key])
        + "; "
        f"{impl}; {device} {cfg['precision']}"
        + (f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"
           if device.type == "cpu" else "")
        + f"; {d.world} process{'es' if d.enabled else ''}")
    say(f"training: {args.steps} step{'' if args.steps == 1 else 's'} of {cfg['batch_size']} streams x {cfg['bptt']} characters "
        f"({tok_per_step:,} tokens/step), Adam lr {cfg['lr']:g} ({cfg['lr_schedule']}), "
        f"clip {cfg['clip']:g}; "
        f"output in {args.out}" + (f"; resuming at step {step}" if ckpt is not None else ""))
    if batcher.steps_per_stream < cfg["bptt"]:
        say(f"note: each stream holds only {batcher.steps_per_stream} steps of the text, fewer "
            f"than --bptt {cfg['bptt']}: every chunk is that short or shorter")

    def validate() -> float:
        total, count = evaluate(model, val, autocast_dtype=ac_dtype)
        total, count = _all_sum([total, float(count)], device, d)
        return bits(total / count)

    def flush(pending: list[dict]) -> None:
        if not pending:
            return
        if d.main:
            def append():
                with open(log_path, "a", newline="") as f:
                    csv.DictWriter(f, LOG_FIELDS, lineterminator="\n").writerows(pending)
            _write_or_say(log_path, kept, append)
        rows.extend(pending)
        pending.clear()

    saved_step = None if ckpt is None else ckpt["step"]
    saving = None  # the step being written, while atomic_save runs

    def kept() -> str:
        if saving is not None:  # stopped inside the write: the rename may have happened
            was = "no checkpoint" if saved_step is None else f"step {saved_step}"
            return (f"{ckpt_path} is kept, stopped while writing step {saving} (it holds that "
                    f"step or {was})")
        return ("no checkpoint was written" if saved_step is None else
                f"{ckpt_path} (step {saved_step}) is kept")

    args.kept = kept  # for main()'s message if the run is interrupted

    def save() -> None:
        nonlocal saved_step, saving
        # A finite loss at step s says nothing of step s's update: check what is saved.
        # (The parameters are the same on every rank, so every rank stops here alike.)
        bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise CLIError(
                f"the weights are not finite after step {step} ({bad}; precision "
                f"{cfg['precision']}, lr {cfg['lr']:g}); {kept()}. Try a lower --lr or an "
                "amp-* --precision")
        hidden = _gather_state(state, d)
        rng = [_rng_state(device)]
        if d.enabled:
            rng = [None] * d.world
            dist.all_gather_object(rng, _rng_state(device))
        if not d.main:
            saved_step = step
            return
        kept_before = kept()  # what a failed write leaves: atomic_save keeps the old file
        saving = step
        with _signals_deferred():
            _write_or_say(ckpt_path, lambda: kept_before, lambda: atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "tokens": tokens_seen,
                    "elapsed_s": elapsed,
                    "run": cfg,
                    "model_config": model.config,
                    "vocab": splits.vocab.chars,
                    "corpus": {"source": corpus.source, "description": corpus.description,
                               "sha256": corpus.sha256},
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "data": batcher.state_dict(),
                    "hidden": hidden,
                    "rng": rng,
                    "world_size": d.world,
                    "intervals": {k: getattr(args, k) for k in INTERVAL_DEFAULTS},
                    "threads": args.threads,
                    "steps": args.steps,
                    "backend": args.backend,
                    "torch_nn": args.torch_nn,
                    "versions": {"torch": str(torch.__version__), "fused_rnn": str(fused_rnn.__version__)},
                },
                ckpt_path,
            ))
            saved_step, saving = step, None

    pending: list[dict] = []
    first_val = None
    if ckpt is None:
        first_val = validate()
        pending.append(_row(step=0, epoch=0, tokens=0, val_bpc=first_val, elapsed_s=0.0))
        flush(pending)
        say(f"step 0: validation {first_val:.3f} bpc")
    else:
        prev = [float(r["val_bpc"]) for r in rows if r["val_bpc"]]
        first_val = prev[0] if prev else None

    progress = _Progress(args.steps, d.main)
    losses: list[tuple] = []  # (step, loss, grad norm, lr, tokens, epoch) of this interval
    window_tokens, window_time = 0, 0.0
    last_val = None
    start_step, start_tokens = step, tokens_seen
    t_run = time.perf_counter()
    while step < args.steps:
        t0 = time.perf_counter()
        epoch = batcher.epoch_index  # the chunk's epoch: next_chunk may wrap to the next
        chunk = batcher.next_chunk()
        lr = _lr_at(cfg, step, args.steps)
        if cfg["variable_bptt"]:  # AWD-LSTM: a shorter chunk takes a smaller step
            lr *= chunk.x.shape[0] / cfg["bptt"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, state, gnorm = train_chunk(
            train_model, chunk, state, optimizer, clip=cfg["clip"] or None,
            autocast_dtype=ac_dtype, scaler=scaler,
        )
        step += 1
        n_tok = chunk.num_tokens * d.world
        tokens_seen += n_tok
        losses.append((step, loss, gnorm, lr, tokens_seen, epoch))
        boundary = (step % args.log_every == 0 or step % args.eval_every == 0
                    or step % args.ckpt_every == 0 or step == args.steps)
        if boundary:
            _sync(device)
        dt = time.perf_counter() - t0
        elapsed += dt
        window_time += dt
        window_tokens += n_tok
        if not boundary:
            continue
        # One host sync per log interval: the losses of the interval, averaged over ranks.
        vals = torch.stack([x[1].float() for x in losses]).double()
        if d.enabled:
            dist.all_reduce(vals)
            vals /= d.world
        if not torch.isfinite(vals).all():
            bad = losses[int((~torch.isfinite(vals)).nonzero()[0])][0]
            raise CLIError(
                f"the training loss is not finite at step {bad} (precision {cfg['precision']}, "
                f"lr {cfg['lr']:g}); {kept()}. Try a lower --lr or an amp-* --precision"
            )
        tok_s = window_tokens / max(window_time, 1e-9)
        for (s, _, gn, lr_s, tok, ep), v in zip(losses, vals.tolist()):
            pending.append(_row(step=s, epoch=ep, tokens=tok, train_loss=v, grad_norm=gn,
                                lr=lr_s, tokens_per_s=tok_s))
        pending[-1]["elapsed_s"] = f"{elapsed:.3f}"  # training time so far, at each flush
        losses.clear()
        window_tokens, window_time = 0, 0.0
        eta = (args.steps - step) * ((time.perf_counter() - t_run) / (step - start_step))
        progress.update(step, vals[-1].item(), tok_s, eta, force=True)
        if step % args.eval_every == 0 or step == args.steps:
            last_val = validate()
            pending[-1]["val_bpc"] = f"{last_val:.6f}"
            progress.clear()
            # train: the mean over the steps since the last log line (one chunk's loss alone
            # is noisy); each step's is in log.csv
            say(f"step {step}: validation {last_val:.3f} bpc, train "
                f"{bits(vals.mean().item()):.3f} bpc "
                f"({'last step' if len(vals) == 1 else f'last {len(vals)} steps'}), "
                f"{tok_s / 1000:.1f}k tokens/s")
        flush(pending)
        if step % args.ckpt_every == 0 or step == args.steps:
            save()
    progress.clear()
    wall = time.perf_counter() - t_run
    if step == start_step:
        if ckpt is None:
            save()
        say(f"nothing to train: the run is at step {step} of --steps {args.steps}")
    else:
        trained = step - start_step
        new_tokens = tokens_seen - start_tokens
        val_note = ""
        if first_val is not None and last_val is not None:
            val_note = f"; validation bpc {first_val:.3f} -> {last_val:.3f}"
        say(f"done: {trained} step{'' if trained == 1 else 's'}, {new_tokens:,} tokens in {_fmt_time(wall)} "
            f"({new_tokens / max(wall, 1e-9) / 1000:.1f}k tokens/s including "
            f"validation){val_note}")
    if d.main:
        note = _plot_log(_read_log(log_path), plot_path,
                         f"{cfg['layers']}x{cfg['cell'].upper()}-{cfg['hidden_size']} on "
                         f"{corpus.description.split(',')[0]}")
        say(f"wrote {ckpt_path}, {log_path}" + ("" if note else f", {plot_path}"))
        if note:
            say(f"note: {note}")
    return 0


def _lr_at(cfg: dict, step: int, total: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``."""
    if cfg["lr_schedule"] == "constant" or total <= 1:
        return cfg["lr"]
    frac = min(step / (total - 1), 1.0)
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _row(**kw) -> dict:
    row = dict.fromkeys(LOG_FIELDS, "")
    for k, v in kw.items():
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            v = v.item()
        if k in ("train_loss", "val_bpc"):
            row[k] = f"{v:.6f}"
        elif k == "grad_norm":
            row[k] = f"{v:.4f}"
        elif k in ("lr",):
            row[k] = f"{v:.6g}"
        elif k in ("tokens_per_s", "elapsed_s"):
            row[k] = f"{v:.1f}" if k == "tokens_per_s" else f"{v:.3f}"
        else:
            row[k] = str(v)
    if kw.get("train_loss") is not None:
        row["train_bpc"] = f"{bits(float(kw['train_loss'])):.6f}"
    return row


# --------------------------------------------------------------------------- sample
def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint, one character at a time",
                       description="Generate text one character at a time through the "
                       "single-step cells (--backend; auto runs PyTorch's cell kernels, triton "
                       "and cuda the fused ones).")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="…/checkpoint.pt from train")
    p.add_argument("--prime", default=None, help="text to start from (default: a newline)")
    p.add_argument("--length", type=_int_at_least(0), default=500, help="characters to generate (default: %(default)s)")
    p.add_argument("--temperature", type=_float_in(0.0, lo_open=True), default=0.8,
                   help="softmax temperature (default: %(default)s)")
    p.add_argument("--top-k", type=_int_at_least(0), default=0,
                   help="sample among the k likeliest characters only; 0 = all (default)")
    p.add_argument("--seed", type=_seed, default=None, help="random seed (default: fresh randomness)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    p.add_argument("--backend", default="auto", choices=fused_rnn.BACKENDS, help="default: %(default)s")
    p.set_defaults(func=_cmd_sample)


def generate(model: CharLM, vocab: Vocab, prime: str, length: int, *, temperature: float = 1.0,
             top_k: int = 0, generator: torch.Generator | None = None) -> str:
    """``prime`` followed by ``length`` sampled characters.

    The prime (but its last character) goes through the recurrent layers as one chunk; then
    each character is one step through the model's cells (:meth:`CharLM.step_cells`, on the
    layers' backend, through :meth:`CharLM.step_layers`), sharing the layers' weights and
    carrying their state. The model is in eval mode meanwhile, and every submodule's mode is
    restored after.
    """
    if not prime:
        raise ValueError("generate: prime must hold at least one character")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"generate: length must be an int >= 0, got {length!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"generate: temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0 (0: no limit), got {top_k!r}")
    device = next(model.parameters()).device
    ids = vocab.encode(prime).to(device)
    out = []
    with torch.no_grad(), eval_mode(model):
        states = None  # one entry a layer, as the cells take it (CharLM.step_layers)
        if ids.numel() > 1:
            _, state = model(ids[:-1].view(-1, 1), None)
            states = model.split_state(state)
        cells = model.step_cells()
        tok = ids[-1:]
        for _ in range(length):
            logits, states = model.step_layers(tok, states, cells)
            logits = logits[0].cpu().double()  # copied first: one launch fewer on a GPU
            # The largest logit first, so a tiny temperature tends to greedy decoding
            # instead of overflowing (inf - inf in the softmax).
            logits = (logits - logits.max()) / temperature
            if 0 < top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            out.append(int(nxt))
            tok = nxt.to(device)
    return prime + vocab.decode(out)


def _cmd_sample(args) -> int:
    device = _device(args.device)
    ckpt = _load_checkpoint(args.checkpoint)
    try:
        vocab = Vocab(ckpt["vocab"])
    except (TypeError, ValueError) as e:
        raise CLIError(f"{args.checkpoint} has a broken vocabulary ({e})") from None
    prime = args.prime
    if not prime:
        prime = "\n" if "\n" in vocab.index else vocab.chars[0]
    missing = vocab.missing(prime)
    if missing:
        raise CLIError(
            f"--prime has characters not in the model's vocabulary: {''.join(missing)!r}"
        )
    try:
        _backends.require(args.backend, device)
    except RuntimeError as e:
        raise CLIError(str(e)) from None
    try:
        vocab_size = ckpt["model_config"].get("vocab_size")
        if vocab_size != len(vocab):
            raise ValueError(f"its model predicts {vocab_size} characters, its vocabulary has "
                             f"{len(vocab)}")
        model = CharLM(**ckpt["model_config"], rnn_kwargs={"backend": args.backend})
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"{args.checkpoint} does not hold a model this version can build "
                       f"({type(e).__name__}: {why})") from None
    model.to(device)
    gen = torch.Generator()
    if args.seed is not None:
        gen.manual_seed(args.seed)
    else:
        gen.seed()
    text = generate(model, vocab, prime, args.length, temperature=args.temperature,
                    top_k=args.top_k, generator=gen)
    try:
        print(text)
    except UnicodeEncodeError:
        sys.stdout.buffer.write(text.encode("utf-8", "backslashreplace") + b"\n")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fused-rnn", description="Train, sample from and benchmark a "
                     "character-level language model on fused_rnn's recurrent layers.")
    parser.add_argument("--version", action="version", version=f"fused_rnn {fused_rnn.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,bench}", parser_class=_Parser)
    sub.required = True
    _train_parser(sub)
    _sample_parser(sub)
    from fused_rnn import bench  # imports this module: not at the top

    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fused-rnn`` console script; returns the exit status."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = build_parser().parse_args(argv)
    args.argv = argv  # as given: the bench reruns itself with it after a fault
    try:
        return args.func(args)
    except CLIError as e:
        print(f"fused-rnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        word, status = ("terminated", 143) if isinstance(e, _Terminated) else ("interrupted", 130)
        kept = getattr(args, "kept", None)
        said = "" if kept is None else f"; {kept()}" + (
            f": continue it with fused-rnn train --resume --out {args.out}"
            if "is kept" in kept() else "")
        print(f"\nfused-rnn {args.command}: {word}{said}", file=sys.stderr)
        return status


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: fused_rnn.bench imports
    # fused_rnn.cli, and its CLIError must be the class main() catches.
    from fused_rnn.cli import main as _main

    sys.exit(_main())
