"""``fused-rnn``: train, sample from and benchmark a character-level language model.

Subcommands::

    fused-rnn train  [--text FILE] [--cell lstm|gru|rnn] [--steps N] [--out DIR] [--resume] ...
    fused-rnn sample --checkpoint DIR/checkpoint.pt [--prime TEXT] [--length N] ...
    fused-rnn bench  [--out DIR] [--backends ...] [--precisions ...] ...

``train`` without ``--text`` trains on an embedded corpus every machine has: the source of a
fixed, sorted list of Python standard-library modules (identical for one Python minor
version; its size and sha256 are printed). Under ``torchrun --nproc_per_node=N -m
fused_rnn.cli train ...`` it trains with DistributedDataParallel (nccl on GPUs, gloo on
CPUs); ``--batch-size`` is then the global number of streams, split between the ranks, so
N ranks compute what one process computes with the whole batch.

Bad input exits with status 2 and one line on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import fused_rnn
from fused_rnn import backends as _backends
from fused_rnn.charlm import CELLS, CharLM, Vocab
from fused_rnn.ops.common import cudnn_rnn_tf32
from fused_rnn.tbptt import StreamBatcher, atomic_save, bits, evaluate, train_chunk

__all__ = ["main", "load_default_corpus", "DEFAULT_CORPUS_MODULES"]

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
INTERVAL_DEFAULTS = {"eval_every": 100, "ckpt_every": 200, "log_every": 25}
PRECISIONS = ("fp32", "bf16", "fp16", "amp-bf16", "amp-fp16")


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


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
        if not (lo < v if lo_open else lo <= v) or not v <= hi or math.isnan(v):
            rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be in {rng}, got {s}")
        return v

    return parse


def _csv_list(choices):
    def parse(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"invalid choice {','.join(bad) or s!r} (choose from {', '.join(choices)})"
            )
        return items

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
        f"{sorted(DEFAULT_CORPUS_MODULES)[-1]}), {len(text):,} characters, "
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


def split_corpus(corpus: Corpus, val_frac: float, max_val_chars: int, batch_size: int) -> Splits:
    """Encode; the last ``val_frac`` (at most ``max_val_chars``) is validation."""
    vocab = Vocab.from_text(corpus.text)
    n = len(corpus.text)
    n_val = min(int(n * val_frac), max_val_chars)
    n_train = n - n_val
    need = batch_size + 1
    if n_val < need or n_train < need:
        raise CLIError(
            f"text too short: {n:,} characters give {n_train:,} for training and {n_val:,} "
            f"for validation; --batch-size {batch_size} needs at least {need} of each "
            f"(use a longer text, a smaller --batch-size or a larger --val-frac)"
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


def _precision(name: str, device: torch.device):
    """(parameter dtype, autocast dtype or None, use a GradScaler)."""
    if name in ("bf16", "amp-bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CLIError(f"--precision {name}: this GPU does not support bfloat16")
    if name == "fp16":
        # Measured: the loss is not finite by step 2 of the default job, whatever the lr.
        raise CLIError(
            "--precision fp16 would keep the parameters and Adam's moments in fp16, where the "
            "squared gradients underflow and Adam's eps (1e-8) rounds to 0, so training diverges "
            "within a few steps; use amp-fp16 (fp32 parameters, fp16 compute, a GradScaler on "
            "a GPU) or bf16"
        )
    return {
        "fp32": (torch.float32, None, False),
        "bf16": (torch.bfloat16, None, False),
        "fp16": (torch.float16, None, False),
        "amp-bf16": (torch.float32, torch.bfloat16, False),
        "amp-fp16": (torch.float32, torch.float16, device.type == "cuda"),
    }[name]


def _auto_resolves_to(rnn, device: torch.device, precision: str, batch: int) -> str:
    """The backend ``backend="auto"`` runs for the fused_rnn stack ``rnn`` in ``precision``
    with ``batch`` rows per process (fused_rnn.backends.resolve_stack)."""
    param_dtype, ac_dtype, _ = _precision(precision, device)
    return _backends.resolve_stack(
        "auto", device, **rnn.stack_config(device, ac_dtype or param_dtype, batch))


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
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled and self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
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
            if None in row.values():
                continue
            rows.append(row)
    return rows


def _write_log(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, LOG_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


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
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=0.8, label="train (per chunk)")
        ema, sm = 0.0, []
        for k, y in enumerate(ys, 1):  # debiased exponential moving average
            ema = 0.95 * ema + 0.05 * y
            sm.append(ema / (1 - 0.95**k))
        ax.plot(xs, sm, color="tab:blue", lw=1.5, label="train (smoothed)")
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


def _load_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CLIError(f"no checkpoint at {path}") from None
    except IsADirectoryError:
        raise CLIError(f"{path} is a directory; pass the checkpoint file (…/checkpoint.pt)") from None
    except Exception as e:  # torn, foreign or not a torch file at all
        raise CLIError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CLIError(f"{path} is not a fused-rnn character-model checkpoint")
    return ckpt


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train the character-level language model (truncated BPTT)",
                       description="Train a character-level LM with truncated BPTT.")
    p.add_argument("--text", metavar="FILE",
                   help="UTF-8 training text (default: the embedded Python standard-library corpus)")
    p.add_argument("--out", default="runs/charlm", metavar="DIR",
                   help="output directory: checkpoint.pt, log.csv, loss.png (default: %(default)s)")
    p.add_argument("--steps", type=_int_at_least(0), default=1000,
                   help="total training steps (one chunk each; default: %(default)s)")
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
                   help="AWD-LSTM's randomised chunk lengths (lr scaled by length/bptt)")
    g.add_argument("--lr", type=_float_in(0.0, lo_open=True), default=None,
                   help="Adam's peak learning rate (default: 5e-3)")
    g.add_argument("--lr-schedule", choices=("cosine", "constant"), default=None,
                   help="cosine: decay to lr/10 at --steps (a resumed run matches an "
                   "uninterrupted one with the same --steps); default: constant")
    g.add_argument("--clip", type=_float_in(0.0), default=None,
                   help="gradient-norm clip, 0 = off (default: 1.0)")
    g.add_argument("--weight-decay", type=_float_in(0.0), default=None, help="default: 0")
    g.add_argument("--seed", type=int, default=None, help="default: 0")
    g.add_argument("--val-frac", type=_float_in(0.0, 0.5, lo_open=True), default=None,
                   help="fraction of the text held out for validation, taken from its end (default: 0.05)")
    g.add_argument("--max-val-chars", type=_int_at_least(1), default=None,
                   help="cap on validation characters (default: 100000)")
    g.add_argument("--precision", choices=PRECISIONS, default=None, help="default: fp32")
    r = p.add_argument_group("running")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--backend", default="auto", choices=fused_rnn.BACKENDS,
                   help="fused_rnn backend (default: %(default)s)")
    r.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="CPU threads (default: PyTorch's choice, less the cores that the load "
                   "average says other processes hold: waiting on preempted threads is ~10x slower)")
    r.add_argument("--torch-nn", action="store_true",
                   help="use torch.nn's LSTM/GRU/RNN instead of fused_rnn's (for comparison)")
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
        if cfg[k] != v:
            flag = "--" + k.replace("_", "-")
            raise CLIError(
                f"--resume: the checkpoint was trained with {flag} {cfg[k]}, not {v} "
                "(drop the flag to continue it, or train into a new --out)"
            )
    return cfg


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

    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise CLIError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = _load_checkpoint(ckpt_path)
    elif os.path.exists(ckpt_path) and not args.overwrite:
        raise CLIError(
            f"{ckpt_path} exists; pass --resume to continue it, --overwrite to start "
            "afresh, or another --out"
        )
    text_path = args.text
    if text_path is None and ckpt is not None and ckpt["corpus"]["source"] != "default":
        text_path = ckpt["corpus"]["source"]
    corpus = load_text_file(text_path) if text_path is not None else load_default_corpus()
    cfg = _resolve_run_config(args, ckpt, corpus.sha256)
    if cfg["batch_size"] % d.world:
        raise CLIError(
            f"--batch-size {cfg['batch_size']} (global) must be divisible by the "
            f"{d.world} ranks"
        )
    if cfg["tie_weights"] and cfg["embedding_size"] not in (None, cfg["hidden_size"]):
        raise CLIError("--tie-weights needs --embedding-size equal to --hidden-size")
    for k, v in INTERVAL_DEFAULTS.items():  # not part of the run: may change on --resume
        if getattr(args, k) is None:
            setattr(args, k, (ckpt or {}).get("intervals", {}).get(k, v))
    # The thread count can change the rounding of CPU reductions, so a resumed run keeps the
    # checkpoint's unless told otherwise.
    args.threads = args.threads or (ckpt or {}).get("threads") or _busy_machine_threads()
    torch.set_num_threads(args.threads)
    param_dtype, ac_dtype, use_scaler = _precision(cfg["precision"], device)
    splits = split_corpus(corpus, cfg["val_frac"], cfg["max_val_chars"], cfg["batch_size"])
    if ckpt is not None and ckpt["vocab"] != splits.vocab.chars:
        raise CLIError("--resume: the checkpoint's vocabulary differs from this text's")
    if not args.torch_nn:
        try:
            _backends.require(args.backend, device)
        except RuntimeError as e:
            raise CLIError(str(e)) from None

    _init_dist(d, device)
    try:
        return _train(args, cfg, d, device, corpus, splits, ckpt, param_dtype, ac_dtype,
                      use_scaler, ckpt_path, log_path, plot_path)
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


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
    say = print if d.main else (lambda *a, **k: None)
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
        rng = ckpt["rng"]
        if ckpt["world_size"] == d.world:
            _set_rng_state(rng[d.rank], device)
        else:
            say(f"note: the checkpoint was written by {ckpt['world_size']} processes, this run "
                f"has {d.world}: random draws (dropout) will differ from an uninterrupted run")
            _set_rng_state(rng[0], device)
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
            + (f" (→ {_auto_resolves_to(model.rnn, device, cfg['precision'], local)})"
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
    say(f"training: {args.steps} steps of {cfg['batch_size']} streams x {cfg['bptt']} characters "
        f"({tok_per_step:,} tokens/step), Adam lr {cfg['lr']:g} ({cfg['lr_schedule']}), "
        f"clip {cfg['clip']:g}; "
        f"output in {args.out}" + (f"; resuming at step {step}" if ckpt is not None else ""))

    def validate() -> float:
        total, count = evaluate(model, val, autocast_dtype=ac_dtype)
        total, count = _all_sum([total, float(count)], device, d)
        return bits(total / count)

    def flush(pending: list[dict]) -> None:
        if not pending:
            return
        if d.main:
            with open(log_path, "a", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS, lineterminator="\n").writerows(pending)
        rows.extend(pending)
        pending.clear()

    def save() -> None:
        hidden = _gather_state(state, d)
        rng = [_rng_state(device)]
        if d.enabled:
            rng = [None] * d.world
            dist.all_gather_object(rng, _rng_state(device))
        if not d.main:
            return
        atomic_save(
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
                "versions": {"torch": str(torch.__version__), "fused_rnn": str(fused_rnn.__version__)},
            },
            ckpt_path,
        )

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
        losses.append((step, loss, gnorm, lr, tokens_seen, batcher.epoch_index))
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
                f"lr {cfg['lr']:g}); the last good checkpoint is kept. Try a lower --lr or an "
                "amp-* --precision"
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
            say(f"step {step}: validation {last_val:.3f} bpc, train {bits(vals[-1].item()):.3f} bpc, "
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
        say(f"done: {trained} steps, {new_tokens:,} tokens in {_fmt_time(wall)} "
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
                       description="Generate text one character at a time through the fused "
                       "single-step (cell) path.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="…/checkpoint.pt from train")
    p.add_argument("--prime", default=None, help="text to start from (default: a newline)")
    p.add_argument("--length", type=_int_at_least(0), default=500, help="characters to generate (default: %(default)s)")
    p.add_argument("--temperature", type=_float_in(0.0, lo_open=True), default=0.8,
                   help="softmax temperature (default: %(default)s)")
    p.add_argument("--top-k", type=_int_at_least(0), default=0,
                   help="sample among the k likeliest characters only; 0 = all (default)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh randomness)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    p.add_argument("--backend", default="auto", choices=fused_rnn.BACKENDS, help="default: %(default)s")
    p.set_defaults(func=_cmd_sample)


def generate(model: CharLM, vocab: Vocab, prime: str, length: int, *, temperature: float = 1.0,
             top_k: int = 0, generator: torch.Generator | None = None) -> str:
    """``prime`` followed by ``length`` sampled characters.

    The prime (but its last character) goes through the recurrent layers as one chunk; then
    each character is one step through the model's cells (the fused single-step path),
    sharing the layers' weights and carrying their state.
    """
    device = next(model.parameters()).device
    ids = vocab.encode(prime).to(device)
    model.eval()
    out = []
    with torch.no_grad():
        state = None
        if ids.numel() > 1:
            _, state = model(ids[:-1].view(-1, 1), None)
        cells = model.step_cells()
        tok = ids[-1:]
        for _ in range(length):
            logits, state = model.step(tok, state, cells)
            logits = logits[0].float().cpu() / temperature
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
    vocab = Vocab(ckpt["vocab"])
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
    model = CharLM(**ckpt["model_config"], rnn_kwargs={"backend": args.backend})
    model.load_state_dict(ckpt["model"])
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


# --------------------------------------------------------------------------- bench
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
# training by only ~0.02, inside the 16-bit loss tolerance.
FIRST_STEPS_TOLERANCE = {"fp32": 2e-2, "bf16": 1e-1, "fp16": 2e-2, "amp-bf16": 1e-1,
                         "amp-fp16": 2e-2}
FIRST_STEPS_STRICT = 1e-3  # fp32 where nothing uses TF32: the CPU, or cuDNN with TF32 off
BENCH_DEFAULTS = {
    "cpu": dict(hidden_size=128, batch_size=16, bptt=64, steps=10, warmup=3, rounds=5,
                precisions=["fp32", "amp-bf16"]),
    "cuda": dict(hidden_size=1024, batch_size=64, bptt=128, steps=30, warmup=5, rounds=1,
                 precisions=["fp32", "bf16", "amp-fp16", "amp-bf16"]),
}


def _bench_parser(sub) -> None:
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backends", type=_csv_list(fused_rnn.BACKENDS), default=None,
                   help="fused_rnn backends, comma-separated (default: every available one; "
                   "'auto' only where it differs from the others; triton on the CPU only if asked)")
    p.add_argument("--precisions", type=_csv_list(PRECISIONS), default=None,
                   help="CPU: fp32,amp-bf16; GPU: fp32,bf16,amp-fp16,amp-bf16")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="CPU threads (torch.set_num_threads; default: PyTorch's choice)")
    p.add_argument("--val-chunks", type=_int_at_least(1), default=4,
                   help="validation chunks for the loss check (default: %(default)s)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), metavar="DIR",
                   help="where the .md/.csv/.png go (default: %(default)s)")
    # For the bench's own recovery from a fault (see _bench_in_fresh_process), not for users.
    p.add_argument("--skip", action="append", default=[], metavar="IMPL@PRECISION",
                   help=argparse.SUPPRESS)
    p.add_argument("--rows-json", metavar="FILE", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_bench)


# The test hook for the recovery below: FRNN_BENCH_FAULT="IMPL@PRECISION[:validate][,...]"
# makes those rows fail at their first timed step (or in their validation pass) as if a
# kernel had faulted and taken the CUDA context with it, so that the recovery is exercised
# without a GPU.
_FAULT_ENV = "FRNN_BENCH_FAULT"


def _context_lost(device: torch.device) -> bool:
    """Whether ``device`` is unusable in this process after an error. A kernel fault (an
    illegal address, say) is sticky: every later CUDA call of the process fails with it."""
    if device.type != "cuda":
        return False
    try:
        torch.ones(1, device=device).add_(1).item()
        return False
    except Exception:  # noqa: BLE001 (whatever the error, the device cannot run work)
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
    return [{"impl": label, "precision": p, "error": why, "ms_per_step": None,
             "tokens_per_s": None, "peak_mib": None, "val_loss": None, "fallback": ""}
            for p in precisions for label in labels if f"{label}@{p}" not in done]


def _first_steps(model, batcher: StreamBatcher, ac_dtype) -> tuple[torch.Tensor, dict]:
    """The first-steps probe of ``model`` at its current weights: the logits (T, B, V) of
    ``batcher``'s second chunk, entered with the state the first chunk leaves, and the
    gradients of that chunk's loss, all in fp32. The loss is scaled by 2**12 for the backward
    (exact in binary floating point) so that fp16's gradients do not underflow, as a
    GradScaler would. Leaves no gradients behind and the random number generators as found."""
    device = batcher.streams.device
    first, second = batcher.next_chunk(), batcher.next_chunk()
    params = dict(model.named_parameters())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.autocast(device.type, dtype=ac_dtype or torch.float32,
                            enabled=ac_dtype is not None):
            with torch.no_grad():
                _, state = model(first.x, None, first.reset)
            logits, _ = model(second.x, state, second.reset)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                     second.y.flatten())
        grads = torch.autograd.grad(loss * 2**12, list(params.values()))
    return logits.detach().float(), {n: g.float() / 2**12 for n, g in zip(params, grads)}


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


def _split(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` nearly equal consecutive pieces."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


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
                           text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return r.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _cmd_bench(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    dflt = BENCH_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    H = args.hidden_size or dflt["hidden_size"]
    B = args.batch_size or dflt["batch_size"]
    T = args.bptt or dflt["bptt"]
    steps = args.steps or dflt["steps"]
    warmup = dflt["warmup"] if args.warmup is None else args.warmup
    rounds = min(args.rounds or dflt["rounds"], steps)
    precisions = args.precisions or list(dflt["precisions"])
    corpus = load_text_file(args.text) if args.text else load_default_corpus()
    splits = split_corpus(corpus, 0.05, 100_000, B)
    for p in precisions:
        _precision(p, device)  # raises CLIError for bf16 on a GPU without it

    vocab_size = len(splits.vocab)
    base_cfg = dict(cell=args.cell, hidden_size=H, layers=args.layers, embedding_size=None,
                    dropout=0.0, tie_weights=False)
    notes = []
    available = fused_rnn.available_backends(device)
    if args.backends is None:
        names = [n for n in available if n != "auto"]
        if device.type == "cpu" and "triton" in names:
            names.remove("triton")
            notes.append("triton runs on the CPU only through its interpreter; not timed "
                         "(pass --backends triton to include it)")
        probe = _build_model(base_cfg, vocab_size, False, "auto").rnn
        auto_to = {_auto_resolves_to(probe, device, p, B) for p in precisions}
        auto_to = auto_to.pop() if len(auto_to) == 1 else None  # differs by precision
        if auto_to not in names:
            names.insert(0, "auto")
        else:
            notes.append(f"backend 'auto' resolves to '{auto_to}' here; not timed twice")
        for n in fused_rnn.BACKENDS:
            if n not in available:
                notes.append(f"backend '{n}' unavailable: "
                             f"{_backends.unavailable_reason(n, device)}")
    else:
        names = []
        for n in args.backends:
            reason = _backends.unavailable_reason(n, device)
            if reason:
                raise CLIError(f"--backends {n}: unavailable here ({reason})")
            names.append(n)
    impls = [("torch.nn", None)] + [(f"fused_rnn:{n}", n) for n in names]
    if device.type == "cuda" and "amp-bf16" in precisions:
        notes.append("torch.nn's amp-bf16 row computes its RNN in fp16: torch's autocast rule "
                     "for cuDNN RNNs casts to half whatever the autocast dtype; fused_rnn's rows "
                     "(its 'torch' backend on cuDNN too) compute in bf16")

    torch.manual_seed(args.seed)
    init_state = _build_model(base_cfg, vocab_size, True, "auto").state_dict()

    print(f"bench: {args.layers}-layer {args.cell.upper()} H={H}, B={B}, T={T}, {warmup} warm-up "
          f"+ {steps} timed steps in {rounds} rounds, Adam lr {args.lr:g}, seed {args.seed}; {device} "
          f"({_device_name(device)}); corpus {corpus.description}", file=sys.stderr)

    faults = {}  # "IMPL@PRECISION" -> the phase to fail in (IMPL has a colon of its own)
    for fault in filter(None, os.environ.get(_FAULT_ENV, "").split(",")):
        row, _, phase = fault.rpartition(":")
        if phase not in ("train", "validate"):
            row, phase = fault, "train"
        faults[row] = phase

    class _Run:
        """One implementation in one precision: its model, optimizer, data and timings."""

        def __init__(self, label, backend, prec):
            self.row = {"impl": label, "precision": prec, "error": ""}
            self.param_dtype, self.ac_dtype, use_scaler = _precision(prec, device)
            self.times: list[float] = []
            self.peak = None
            self.state = None
            self.fallbacks: set[str] = set()  # what ran instead of the named backend, and why
            self.injected = faults.get(f"{label}@{prec}")  # the test hook: fail as a fault would
            try:
                torch.manual_seed(args.seed)
                model = _build_model(base_cfg, vocab_size, backend is None, backend or "auto")
                model.load_state_dict(init_state)
                self.model = model.to(device=device, dtype=self.param_dtype)
                self.opt = torch.optim.Adam(model.parameters(), lr=args.lr)
                self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
                self.train = StreamBatcher(splits.train, B, T, boundaries=splits.train_bounds,
                                           device=device)
            except Exception as e:
                self.fail(e)

        def first_steps(self, ref) -> None:
            """The first-steps probe at the initial weights, against torch.nn's (``ref``)."""
            if self.row["error"] or ref is None:
                return
            try:
                batcher = StreamBatcher(splits.train, B, T, boundaries=splits.train_bounds,
                                        device=device)
                got = _first_steps(self.model, batcher, self.ac_dtype)
                self.row.update(zip(("first_logits_err", "first_grad_err", "first_grad_param"),
                                    _first_steps_error(got, ref)))
            except Exception as e:
                self.fail(e)

        def fail(self, e: Exception) -> None:
            self.row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]

        def steps(self, n: int, timed: bool) -> None:
            """``n`` consecutive training steps; each timed and its transient memory taken."""
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
                    for (frm, why, to), n in _backends.fallback_counts().items():
                        if n > before.get((frm, why, to), 0):
                            self.fallbacks.add(f"{frm} -> {to}: {why}")
                    mem = None
                    if device.type == "cuda":
                        mem = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                    if timed:
                        self.times.append(dt)
                        if mem is not None:
                            self.peak = max(self.peak or 0.0, mem)
                except Exception as e:  # a backend failing is a finding: exit status 1
                    self.fail(e)

        def finish(self) -> dict:
            row = self.row
            if not row["error"]:
                try:
                    if self.injected == "validate":
                        raise RuntimeError(f"a fault injected by {_FAULT_ENV}")
                    val = StreamBatcher(splits.val, B, T, boundaries=splits.val_bounds,
                                        device=device)
                    total, count = evaluate(self.model, val, max_chunks=args.val_chunks,
                                            autocast_dtype=self.ac_dtype)
                    med = sorted(self.times)[len(self.times) // 2]
                    row.update(ms_per_step=1000 * med, tokens_per_s=B * T / med,
                               peak_mib=self.peak, val_loss=total / count)
                except Exception as e:
                    self.fail(e)
            if row["error"]:
                row.update(ms_per_step=None, tokens_per_s=None, peak_mib=None, val_loss=None)
            row["fallback"] = "; ".join(sorted(self.fallbacks))
            self.model = self.opt = self.train = self.state = None
            return row

    now = datetime.datetime.now()  # names the files, which every write replaces

    def say(row: dict) -> None:
        msg = (f"FAILED ({row['error']})" if row["error"] else
               f"{row['ms_per_step']:.1f} ms/step, val loss {row['val_loss']:.4f}")
        print(f"  {row['precision']:8s} {row['impl']:22s} {msg}", file=sys.stderr)

    def write_tables(results: list[dict], final: bool) -> bool:
        """Check ``results`` against torch.nn and write the table (and at the end the plot).

        Written after every precision too, so that a run cut short by a timeout leaves the
        precisions it finished. Returns whether every row is clean."""
        # Agreement and speed, against torch.nn in the same precision.
        ok = True
        for row in results:
            base = next((r for r in results
                         if r["impl"] == "torch.nn" and r["precision"] == row["precision"]), None)
            tol = BENCH_TOLERANCE[row["precision"]]
            if row["error"]:
                row["check"], ok = "ERROR", False
                row["delta"] = row["speedup"] = None
                continue
            if base is None or base["error"]:
                row["delta"] = row["speedup"] = None
                row["check"] = "no baseline"
                continue
            row["delta"] = row["val_loss"] - base["val_loss"]
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            wrong = []
            if not (abs(row["delta"]) <= tol and math.isfinite(row["val_loss"])):
                wrong.append(f"loss Δ > {tol:g}")
            first_tol = _first_steps_tolerance(row["precision"], device)
            if row.get("first_logits_err") is not None:
                if not row["first_logits_err"] <= first_tol:
                    wrong.append(f"first-steps logits {row['first_logits_err']:.1e} > {first_tol:g}")
                if not row["first_grad_err"] <= first_tol:
                    wrong.append(f"first-steps grad of {row['first_grad_param']} "
                                 f"{row['first_grad_err']:.1e} > {first_tol:g}")
            row["check"] = "ok" if not wrong else f"MISMATCH ({'; '.join(wrong)})"
            ok &= not wrong

        def f(v, fmt):
            return "n/a" if v is None else format(v, fmt)

        def first(r):
            if r.get("first_logits_err") is None:
                return "n/a"
            named = f" ({r['first_grad_param']})" if r.get("first_grad_param") else ""
            return f"{r['first_logits_err']:.1e}, {r['first_grad_err']:.1e}{named}"

        dev_tag = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", _device_name(device).lower()).strip("-")
        stem = os.path.join(args.out, f"{now:%Y-%m-%d}-{dev_tag}-charlm-bench")
        mem_col = "step peak GPU mem (MiB)" if device.type == "cuda" else "peak mem"
        lines = [
            f"# Character-LM truncated-BPTT training: fused_rnn vs torch.nn ({'CPU' if device.type == 'cpu' else _device_name(device)})",
            "",
            f"- {now:%Y-%m-%d %H:%M}, commit {_git_commit()}, torch {torch.__version__}"
            + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if device.type == "cuda" else "")
            + f", device {device} ({_device_name(device)}"
            + (f", {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}; load average {load_before} before, "
               f"{_load_avg()} after: other processes on these cores slow every row)"
               if device.type == "cpu" else ")"),
            f"- model: embedding → {args.layers}-layer {args.cell.upper()} (hidden {H}) → linear, "
            f"vocab {vocab_size}; B={B} streams × T={T} steps per chunk ({B * T:,} tokens/step); "
            f"Adam lr {args.lr:g}, clip 1.0; same initial weights, data and seed for every row",
            f"- {warmup} warm-up steps, then {steps} timed steps (each synchronised) in {rounds} "
            f"round{'s' if rounds > 1 else ''}: every implementation of a precision trains side by "
            f"side, each running its block of steps in turn; ms/step is the median step (forward, "
            f"backward, clipping, Adam step), tokens/s = B×T / that median",
            f"- val loss: mean cross-entropy (nats) over {args.val_chunks} validation chunks after "
            f"all {warmup + steps} steps; it must agree with torch.nn in the same precision within "
            + ", ".join(f"{p} {BENCH_TOLERANCE[p]:g}" for p in precisions),
            "- first steps: from the initial weights, the logits of the second chunk (entered "
            "with the state the first leaves) and the gradients of its loss, against torch.nn's "
            "by relative norm error: the worst step's logits, then the worst parameter's "
            "gradient (named); within "
            + ", ".join(f"{p} {_first_steps_tolerance(p, device):g}" for p in precisions)
            + " (bounds for wrong math, not rounding)",
            ("- memory: the largest growth of torch.cuda.max_memory_allocated within one timed "
             "step over what was allocated before it (activations, workspace, gradients; "
             "parameters and Adam state are the same for every row)" if device.type == "cuda" else
             "- memory: n/a on the CPU: PyTorch keeps no per-step peak there, and the resident "
             "set does not grow in a step once the allocator holds memory freed by earlier steps "
             "(measured: 0.0 MiB for every row), so it says nothing about an implementation"),
            f"- corpus: {corpus.description}",
        ] + [f"- note: {n}" for n in notes] + ([] if final else [
            (f"- INCOMPLETE: written after "
             f"{', '.join(sorted({r['precision'] for r in results}, key=precisions.index))}; "
             "the run had not finished the other precisions (see its log)")]) + [
            "",
            f"| precision | implementation | ms/step | tokens/s | vs torch.nn | {mem_col} | val loss | Δ vs torch.nn | first steps: logits, grad | check |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            lines.append(
                f"| {r['precision']} | {r['impl']} | {f(r['ms_per_step'], '.2f')} | "
                f"{f(r['tokens_per_s'], ',.0f')} | {f(r['speedup'], '.2f') + ('×' if r['speedup'] is not None else '')} | "
                f"{f(r['peak_mib'], '.1f')} | {f(r['val_loss'], '.5f')} | {f(r['delta'], '+.2e')} | "
                f"{first(r)} | {r['check']}{': ' + r['error'] if r['error'] else ''}"
                f"{'; ran partly elsewhere (' + r['fallback'] + ')' if r.get('fallback') else ''} |"
            )
        md = "\n".join(lines) + "\n"
        os.makedirs(args.out, exist_ok=True)
        with open(stem + ".md", "w") as fh:
            fh.write(md)
        with open(stem + ".csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["device", "torch", "cell", "layers", "hidden", "batch", "bptt", "steps",
                        "precision", "impl", "ms_per_step", "tokens_per_s", "speedup_vs_torch_nn",
                        "peak_mib", "val_loss", "delta_vs_torch_nn", "first_logits_err",
                        "first_grad_err", "first_grad_param", "check", "error", "fallback"])
            for r in results:
                w.writerow([_device_name(device), torch.__version__, args.cell, args.layers, H, B, T,
                            steps, r["precision"], r["impl"], r["ms_per_step"], r["tokens_per_s"],
                            r["speedup"], r["peak_mib"], r["val_loss"], r["delta"],
                            r.get("first_logits_err"), r.get("first_grad_err"),
                            r.get("first_grad_param"), r["check"], r["error"],
                            r.get("fallback", "")])
        if not final:
            return ok
        written = [stem + ".md", stem + ".csv"]
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(7, 4), dpi=110)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            labels = [label for label, _ in impls]
            width = 0.8 / max(len(precisions), 1)
            for j, prec in enumerate(precisions):
                ys = [next(((r["tokens_per_s"] or 0) for r in results
                            if r["impl"] == label and r["precision"] == prec), 0) for label in labels]
                ax.bar([i + (j - (len(precisions) - 1) / 2) * width for i in range(len(labels))],
                       ys, width, label=prec)
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_ylabel("training tokens/s")
            ax.set_title(f"char-LM TBPTT, {args.cell.upper()} H={H} B={B} T={T}, "
                         f"{_device_name(device) if device.type == 'cuda' else 'CPU'}", fontsize=9)
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            fig.savefig(stem + ".png")
            written.append(stem + ".png")
        except ImportError:
            print("note: matplotlib is not installed; skipped the plot", file=sys.stderr)
        print(md)
        print("wrote " + ", ".join(written), file=sys.stderr)
        return ok

    # A throwaway run first, so that the first row does not pay for first-call set-up
    # (thread pools, allocator growth, lazy imports) that later rows get for free.
    _Run("torch.nn", None, precisions[0]).steps(2, timed=False)
    load_before = _load_avg()
    # Every implementation of a precision trains side by side: warm-up steps, then the timed
    # steps in rounds (each implementation runs a block of consecutive steps per round), so
    # that on a shared machine the others' load falls on every row alike.
    blocks = [len(r) for r in _split(steps, rounds)]
    skip = set(args.skip)
    order = {label: i for i, (label, _) in enumerate(impls)}

    def reference_probe(prec: str):
        """torch.nn's first-steps probe in ``prec`` (None, said, if it fails)."""
        try:
            param_dtype, ac_dtype, _ = _precision(prec, device)
            model = _build_model(base_cfg, vocab_size, True, "auto")
            model.load_state_dict(init_state)
            model.to(device=device, dtype=param_dtype)
            batcher = StreamBatcher(splits.train, B, T, boundaries=splits.train_bounds,
                                    device=device)
            return _first_steps(model, batcher, ac_dtype)
        except Exception as e:
            print(f"  {prec:8s} torch.nn's first-steps probe failed ({type(e).__name__}: {e}); "
                  "this precision's rows are checked by their loss only", file=sys.stderr)
            return None

    def side_by_side(runs, ref) -> _Run | None:
        """Probe, then train ``runs`` side by side; the run whose error took the device with
        it, if any."""
        for run in runs:  # a fault while building (moving the model to the device)
            if run.row["error"] and _context_lost(device):
                return run
        for n, timed in [(None, False), (warmup, False)] + [(n, True) for n in blocks]:
            for run in runs:
                had = bool(run.row["error"])
                if n is None:
                    if run.row["impl"] != "torch.nn":
                        run.first_steps(ref)
                else:
                    run.steps(n, timed)
                if not had and run.row["error"] and (run.injected or _context_lost(device)):
                    return run
        return None

    results: list[dict] = []
    for i, prec in enumerate(precisions):
        ref = reference_probe(prec)
        if ref is None and _context_lost(device):
            # cuDNN itself faulted: the baseline is gone, and a fresh process would fault the
            # same way; every row left says so.
            why = "not run: torch.nn's first-steps probe took the CUDA context with it"
            results += [{"impl": label, "precision": p, "error": why, "ms_per_step": None,
                         "tokens_per_s": None, "peak_mib": None, "val_loss": None,
                         "fallback": ""}
                        for p in precisions[i:] for label, _ in impls
                        if f"{label}@{p}" not in skip]
            break
        runs = [_Run(label, backend, prec) for label, backend in impls
                if f"{label}@{prec}" not in skip]
        culprit = side_by_side(runs, ref)
        ref = None
        finished = []
        for run in runs if culprit is None else []:
            row = run.finish()
            if row["error"] and (run.injected or _context_lost(device)):  # in validation
                culprit = run
                break
            finished.append(row)
        if culprit is None:
            for row in finished:
                results.append(row)
                say(row)
            del runs
            if not args.rows_json:
                write_tables(results, final=False)
            continue
        # A kernel fault is sticky: every later CUDA call in this process fails. The faulting
        # row keeps its error; this precision's other rows (all of them, so that they are
        # timed side by side in one process) and the later precisions' run in a fresh one.
        row = culprit.finish()
        row["error"] += ("; it took the CUDA context with it: the other rows of this "
                         "precision and the later precisions ran in a fresh process")
        results.append(row)
        say(row)
        del runs, finished
        if not args.rows_json:
            write_tables(results, final=False)
        done = skip | {f"{r['impl']}@{r['precision']}" for r in results}
        results += _bench_in_fresh_process(args, precisions[i:], done,
                                           [backend for _, backend in impls if backend])
        break
    results.sort(key=lambda r: (precisions.index(r["precision"]), order[r["impl"]]))
    if args.rows_json:  # a fresh process's rows, for the process that started it
        with open(args.rows_json, "w") as fh:
            json.dump(results, fh)
        return 0
    ok = write_tables(results, final=True)
    if not ok:
        print("fused-rnn bench: error: some rows failed or disagree with torch.nn "
              "(see the check column)", file=sys.stderr)
        return 1
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
    _bench_parser(sub)
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
    except KeyboardInterrupt:
        print(f"\nfused-rnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
