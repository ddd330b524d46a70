"""Truncated backpropagation through time (TBPTT) over a token stream.

Works with any recurrent module that has ``torch.nn.LSTM``'s interface, time-major
(``batch_first=False``): ``fused_rnn.LSTM/GRU/RNN`` and ``torch.nn.LSTM/GRU/RNN`` alike, so
that comparisons between them are fair. LSTM state is the tuple ``(h, c)``, GRU/RNN state a
tensor ``h``; both are ``(num_layers * num_directions, B, H)``, and ``None`` means zeros.

The pieces:

- :class:`StreamBatcher` lays a token stream out as ``B`` contiguous streams (one per batch
  row) and yields chunks of ``bptt`` steps, optionally of randomised length as AWD-LSTM does.
  Under DistributedDataParallel each rank takes its own rows of the same global layout.
- :func:`detach_state` cuts the autograd graph between chunks; :func:`mask_state` zeroes the
  state of rows whose document ends; :func:`run_rnn` runs a recurrent module over one chunk,
  zeroing rows at the document boundaries inside it.
- :func:`train_chunk` is one TBPTT step: forward, mean cross-entropy, backward, gradient
  clipping by norm, optimizer step; it returns the loss and the detached state to carry.
- :func:`evaluate` sums the cross-entropy over a whole stream and counts its tokens (the
  mean is their ratio), state carried, in :func:`eval_mode`.
- :func:`atomic_save` writes a checkpoint that a crash cannot leave half-written.

Examples::

    >>> import torch, fused_rnn
    >>> from fused_rnn.tbptt import StreamBatcher, run_rnn, detach_state
    >>> batcher = StreamBatcher(torch.arange(101), batch_size=4, bptt=10)
    >>> rnn = fused_rnn.GRU(1, 8)
    >>> state = None
    >>> for chunk in batcher.epoch():
    ...     out, state = run_rnn(rnn, chunk.x.unsqueeze(-1).float(), state, chunk.reset)
    ...     state = detach_state(state)
    >>> tuple(state.shape), state.grad_fn is None
    ((1, 4, 8), True)
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Chunk",
    "Resets",
    "StreamBatcher",
    "atomic_save",
    "detach_state",
    "eval_mode",
    "evaluate",
    "mask_state",
    "run_rnn",
    "state_rows",
    "train_chunk",
]

State = Tensor | tuple[Tensor, ...] | None


# --------------------------------------------------------------------------- the state
def _map(state: State, fn: Callable[[Tensor], Tensor]) -> State:
    if state is None:
        return None
    if isinstance(state, Tensor):
        return fn(state)
    return tuple(fn(s) for s in state)


def detach_state(state: State) -> State:
    """The state with its autograd history cut: the next chunk's backward stops here."""
    return _map(state, lambda s: s.detach())


def mask_state(state: State, keep: Tensor) -> State:
    """Zero the batch rows where ``keep`` (B,) is False; state tensors are (L*D, B, H).

    A select, not a product with the mask: a dropped row that holds inf or NaN (a diverged
    stream) still comes out zero, as a fresh document's state must.
    """
    if keep.dtype != torch.bool:
        raise TypeError(f"mask_state: keep must be a bool tensor, got {keep.dtype}")
    if keep.dim() != 1:
        raise ValueError(f"mask_state: keep must be 1-D (B,), got shape {tuple(keep.shape)}")

    def select(s: Tensor) -> Tensor:
        # torch.where would broadcast a state of another batch size (or unbatched) silently.
        if s.dim() != 3 or s.shape[1] != keep.numel():
            raise ValueError(f"mask_state: state tensors must be (L*D, B, H) with B = "
                             f"{keep.numel()} (keep's length), got {tuple(s.shape)}")
        return torch.where(keep.view(1, -1, 1), s, s.new_zeros(()))

    return _map(state, select)


def state_rows(state: State, rows: slice) -> State:
    """The batch rows ``rows`` of a state (dim 1)."""
    return _map(state, lambda s: s[:, rows])


# --------------------------------------------------------------------------- the data
class Resets:
    """The document starts inside one chunk: a mask for the device, its steps for the host.

    mask: (T, B) bool, True where the state entering step t of row b must be zero.
    steps: the t at which some row is True, ascending. :func:`run_rnn` cuts the chunk there,
    and knowing them on the host spares it reading a GPU mask back (a host sync per chunk).

    ``Resets(mask)`` reads the steps from the mask (one sync if the mask is on a GPU; none
    on the CPU). ``Resets.from_host(host_mask, mask)`` takes them from a CPU copy of the
    same mask; that is how :class:`StreamBatcher` builds them. A CPU mask is checked
    against the steps it is given.
    """

    __slots__ = ("mask", "steps")

    def __init__(self, mask: Tensor, steps: tuple[int, ...] | None = None) -> None:
        if torch.compiler.is_compiling():
            # Where a chunk is cut depends on the mask's values, which a graph cannot read
            # (torch.compile: "Could not guard on data-dependent expression"). Without
            # fullgraph=True this raise is a graph break, and the compiler runs it eagerly.
            raise ValueError(
                "a Resets is built on the host from its mask's values, which torch.compile "
                "cannot trace: build it outside the compiled function (StreamBatcher's chunks "
                "carry one) and pass that in place of a bare (T, B) mask, or compile without "
                "fullgraph=True"
            )
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(
                f"a reset mask must be (T, B) bool, got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        if steps is None or mask.device.type == "cpu":
            found = tuple(torch.nonzero(mask.any(1)).flatten().tolist())
            if steps is not None and tuple(steps) != found:
                raise ValueError(f"reset steps {tuple(steps)} do not match the mask's {found}")
            steps = found
        steps = tuple(int(t) for t in steps)
        if any(not 0 <= t < mask.shape[0] for t in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(
                f"reset steps must be ascending, distinct and in [0, {mask.shape[0]}), "
                f"got {steps}"
            )
        self.mask = mask
        self.steps = steps

    @classmethod
    def from_host(cls, host_mask: Tensor, mask: Tensor) -> Resets:
        """``mask`` (on any device) with its steps read from ``host_mask``, a CPU copy."""
        if host_mask.device.type != "cpu" or host_mask.shape != mask.shape:
            raise ValueError("host_mask must be a CPU tensor of the mask's shape")
        return cls(mask, tuple(torch.nonzero(host_mask.any(1)).flatten().tolist()))

    def __reduce__(self):  # every pickle protocol (slots alone need 2+); checked again
        return (Resets, (self.mask, self.steps))

    def __repr__(self) -> str:
        return f"Resets(steps={self.steps}, mask={tuple(self.mask.shape)} on {self.mask.device})"


@dataclass
class Chunk:
    """One TBPTT chunk, time-major.

    x: (T, B) inputs; y: (T, B) targets (``y[t] = x[t+1]`` within a stream); reset:
    :class:`Resets` marking where the token ``x[t]`` starts a new document so the state
    entering step t must be zero, or None when no row starts a document in this chunk;
    start: the stream position of ``x[0]``; first: True for the first chunk of an epoch
    (no state to carry: the previous chunk ended at the other end of the streams).

    ``x`` and ``y`` are views of the batcher's streams (no copy a chunk): write to a clone,
    or an in-place edit changes the other and every later epoch.
    """

    x: Tensor
    y: Tensor
    reset: Resets | None
    start: int
    first: bool

    @property
    def num_tokens(self) -> int:
        return self.y.numel()


class StreamBatcher:
    """Lay ``tokens`` out as ``batch_size`` contiguous streams; iterate TBPTT chunks.

    tokens: (N,) integer tensor. Stream ``b`` is ``tokens[b*n : (b+1)*n + 1]`` with
    ``n = (N - 1) // batch_size``: neighbouring streams overlap by one token, so over one
    epoch every token of ``tokens[:B*n]`` is an input exactly once and every token of
    ``tokens[1:B*n+1]`` a target exactly once (the last ``N - 1 - B*n`` tokens are unused).

    boundaries: (N,) bool or None, True at the first token of each document; the chunk's
    ``reset`` mask marks them (see :func:`run_rnn`).

    variable_length: AWD-LSTM's randomised chunk length: ``bptt`` with probability 0.95,
    else ``bptt / 2``, plus normal noise of std 5, at least ``min_length`` and at most
    ``bptt + 20``. The draws come from a generator of their own (seeded with ``seed``), so
    every rank draws the same lengths and :meth:`state_dict` restores them exactly.

    rank, world_size: under DistributedDataParallel rank ``r`` gets rows
    ``[r*B/W, (r+1)*B/W)`` of the same ``batch_size``-row layout (``batch_size`` is global
    and must divide by ``world_size``), so W ranks together see exactly what one process
    with the whole batch sees.

    Examples::

        >>> import torch
        >>> from fused_rnn.tbptt import StreamBatcher
        >>> b = StreamBatcher(torch.arange(13), batch_size=3, bptt=3)
        >>> [c.x.T.tolist() for c in b.epoch()]
        [[[0, 1, 2], [4, 5, 6], [8, 9, 10]], [[3], [7], [11]]]
        >>> b.streams.T.tolist()
        [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]]
    """

    def __init__(
        self,
        tokens: Tensor,
        batch_size: int,
        bptt: int,
        *,
        boundaries: Tensor | None = None,
        variable_length: bool = False,
        min_length: int = 5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        # Integers (a numpy or 0-d tensor one too), kept as Python ints: a float would slice
        # the streams only at the first chunk, with an error about slices.
        for name, value in (("batch_size", batch_size), ("bptt", bptt),
                            ("min_length", min_length), ("seed", seed), ("rank", rank),
                            ("world_size", world_size)):
            if isinstance(value, bool) or not hasattr(value, "__index__"):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        batch_size, bptt, min_length, seed, rank, world_size = (
            operator.index(v) for v in (batch_size, bptt, min_length, seed, rank, world_size))
        if batch_size < 1 or bptt < 1:
            raise ValueError(f"batch_size and bptt must be positive, got {batch_size}, {bptt}")
        if world_size < 1:
            raise ValueError(f"world_size must be positive, got {world_size}")
        if variable_length and not 1 <= min_length <= bptt:
            raise ValueError(
                f"variable_length draws lengths of at least min_length around bptt: "
                f"min_length must be in [1, bptt], got {min_length} with bptt {bptt}")
        if batch_size % world_size != 0:
            raise ValueError(
                f"batch_size {batch_size} (the global number of streams) must be divisible "
                f"by the world size {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        n = (tokens.numel() - 1) // batch_size
        if n < 1:
            raise ValueError(
                f"{tokens.numel()} tokens are too few for {batch_size} streams "
                f"(need at least {batch_size + 1})"
            )
        self.batch_size = batch_size
        self.bptt = bptt
        self.variable_length = variable_length
        self.min_length = min_length
        self.rank = rank
        self.world_size = world_size
        self.steps_per_stream = n
        local = batch_size // world_size
        rows = slice(rank * local, (rank + 1) * local)
        # index[b, t] = b*n + t: stream b's position t, overlapping the next stream by one.
        index = torch.arange(batch_size)[:, None] * n + torch.arange(n + 1)[None, :]
        # int64: what nn.Embedding and cross_entropy's targets take (a uint8 or int32 corpus
        # failed there, chunks later).
        tokens = tokens.cpu().long()
        self.streams = tokens[index[rows]].t().contiguous().to(device)  # (n+1, local)
        if boundaries is not None:
            if boundaries.shape != tokens.shape:
                raise ValueError("boundaries must have the shape of tokens")
            b = boundaries.cpu().bool()[index[rows]].t().contiguous()  # (n+1, local)
            # Kept on the host too: chunks without a reset skip the mask, and the cut steps
            # of those with one come from here, not from reading the device mask back.
            self._host_resets = b
            self._any_reset = b.any(1)
            self._resets = b.to(device)
        else:
            self._host_resets = None
            self._any_reset = None
            self._resets = None
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.pos = 0
        self.epoch_index = 0

    # ---- iteration
    def _next_length(self) -> int:
        if not self.variable_length:
            return self.bptt
        g, f32 = self.generator, torch.float32  # fp32 draws whatever the default dtype
        base = self.bptt if torch.rand((), generator=g, dtype=f32).item() < 0.95 else self.bptt / 2
        length = int(base + 5.0 * torch.randn((), generator=g, dtype=f32).item())
        return max(self.min_length, min(length, self.bptt + 20))

    def next_chunk(self) -> Chunk:
        """The next chunk; wraps to a new epoch (``first=True``) after the streams' end."""
        n = self.steps_per_stream
        start = self.pos
        length = min(self._next_length(), n - start)
        end = start + length
        x = self.streams[start:end]
        y = self.streams[start + 1 : end + 1]
        reset = None
        if self._any_reset is not None and bool(self._any_reset[start:end].any()):
            reset = Resets.from_host(self._host_resets[start:end], self._resets[start:end])
        chunk = Chunk(x=x, y=y, reset=reset, start=start, first=start == 0)
        self.pos = end
        if self.pos >= n:
            self.pos = 0
            self.epoch_index += 1
        return chunk

    def epoch(self) -> Iterator[Chunk]:
        """The chunks from the current position to the end of the current epoch."""
        current = self.epoch_index
        while self.epoch_index == current:
            yield self.next_chunk()

    # ---- checkpointing
    def state_dict(self) -> dict:
        return {
            "pos": self.pos,
            "epoch": self.epoch_index,
            "generator": self.generator.get_state(),
            "steps_per_stream": self.steps_per_stream,
            "batch_size": self.batch_size,
            "bptt": self.bptt,
            "variable_length": self.variable_length,
            "min_length": self.min_length,
        }

    def load_state_dict(self, state: dict) -> None:
        # min_length shapes the drawn lengths; a state saved before it was recorded has none.
        keys = ("steps_per_stream", "batch_size", "bptt", "variable_length") + (
            ("min_length",) if self.variable_length and "min_length" in state else ())
        for key in keys:
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data layout differs from the checkpoint's: {key} is "
                    f"{getattr(self, key)}, the checkpoint has {state[key]}"
                )
        if not 0 <= int(state["pos"]) < self.steps_per_stream:
            raise ValueError(f"the checkpoint's position {state['pos']} is outside the "
                             f"{self.steps_per_stream} steps of a stream")
        self.pos = int(state["pos"])
        self.epoch_index = int(state["epoch"])
        self.generator.set_state(state["generator"])


# --------------------------------------------------------------------------- the model side
def run_rnn(rnn: nn.Module, x: Tensor, state: State, reset: Resets | Tensor | None = None):
    """Run a time-major recurrent module over one chunk, zeroing state at document starts.

    rnn: any module with nn.LSTM's interface and ``batch_first=False``; x: (T, B, I);
    state: as the module takes it (None = zeros); reset: :class:`Resets`, or its (T, B)
    bool mask alone, or None: True where the state entering step t of row b must be zero.
    The chunk is cut at the steps where some row resets, each piece one call of ``rnn`` (so
    the fused whole-chunk kernels still run; documents are long against a chunk, so there
    are few cuts). A bare GPU mask costs one host sync to find the cuts; :class:`Resets`
    carries them. Returns (out, state).
    """
    if _attribute(rnn, "batch_first"):
        raise ValueError(
            f"run_rnn: {type(rnn).__name__} has batch_first=True; the chunks are time-major "
            "(T, B), so it would run its recurrence across the batch"
        )
    if reset is None:
        return rnn(x, state)
    if not isinstance(reset, Resets):
        reset = Resets(reset)
    if reset.mask.shape != x.shape[:2]:
        raise ValueError(
            f"reset mask {tuple(reset.mask.shape)} does not match the input's (T, B) "
            f"{tuple(x.shape[:2])}"
        )
    if _attribute(rnn, "bidirectional") and any(t > 0 for t in reset.steps):
        raise ValueError(
            f"run_rnn: {type(rnn).__name__} is bidirectional, and a document starts inside "
            "the chunk: cut there, the reverse direction of every row would start at the cut "
            "instead of the chunk's end"
        )
    outs = []
    begin = 0
    for t in reset.steps:
        if t > begin:
            out, state = rnn(x[begin:t], state)
            outs.append(out)
            begin = t
        state = mask_state(state, ~reset.mask[t])
    out, state = rnn(x[begin:], state)
    outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 0)), state


def _attribute(rnn: nn.Module, name: str):
    """``rnn.name``, looked up through wrappers that do not forward attributes (DDP's and
    DataParallel's ``.module``); False where no module in the chain has it."""
    while not hasattr(rnn, name) and isinstance(getattr(rnn, "module", None), nn.Module):
        rnn = rnn.module
    return getattr(rnn, name, False)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def chunk_loss(model: nn.Module, chunk: Chunk, state: State, *, autocast_dtype=None):
    """Mean cross-entropy (nats, fp32) of ``model(x, state, reset) -> (logits, state)``."""
    with _autocast(chunk.x.device, autocast_dtype):
        logits, state = model(chunk.x, state, chunk.reset)
    loss = F.cross_entropy(logits.float().flatten(0, 1), chunk.y.flatten())
    return loss, state


def train_chunk(
    model: nn.Module,
    chunk: Chunk,
    state: State,
    optimizer: torch.optim.Optimizer | None,
    *,
    clip: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, State, Tensor | None]:
    """One TBPTT step on ``model(x, state, reset) -> (logits, state)``.

    Drops the carried state at the start of an epoch, forwards the chunk, backpropagates
    the mean cross-entropy (through this chunk only: ``state`` is detached first), clips
    the gradient norm to ``clip`` (None or 0: no clipping), steps ``optimizer`` (None: leave
    the gradients for the caller). Returns (loss, detached state, gradient norm or None);
    the loss is a detached 0-d tensor (no host sync here).
    """
    if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip)
                                 and clip >= 0):
        raise ValueError(f"train_chunk: clip must be a finite number >= 0 or None, got {clip!r}")
    if clip and optimizer is None:
        raise ValueError("train_chunk: clip is applied to the optimizer's parameters before its "
                         "step; with optimizer=None the gradients are left to the caller, so "
                         "clip them there (clip=None)")
    state = None if chunk.first else detach_state(state)  # a caller's state with history too
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss, state = chunk_loss(model, chunk, state, autocast_dtype=autocast_dtype)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    grad_norm = None
    if optimizer is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return loss.detach(), detach_state(state), grad_norm


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batcher: StreamBatcher,
    *,
    max_chunks: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Summed cross-entropy (nats) and token count over one epoch of ``batcher`` from its
    start, state carried.

    Both are over this process's rows, so that ranks can all-reduce them; the mean loss is
    their ratio. The model is in eval mode meanwhile
    (:func:`eval_mode`: every submodule's mode is restored after).
    Nothing here draws from torch's generators, so evaluating does not change a training run.
    A variable-length batcher draws its lengths afresh from its seed (its own generator is
    restored after), so every evaluation scores the same chunks, whenever it runs.
    """
    with eval_mode(model):
        return _evaluate(model, batcher, max_chunks, autocast_dtype)


def _evaluate(model, batcher, max_chunks, autocast_dtype) -> tuple[float, int]:
    saved = batcher.state_dict()
    batcher.pos = 0
    batcher.generator.manual_seed(batcher.seed)
    total = torch.zeros((), dtype=torch.float64, device=batcher.streams.device)
    count = 0
    state = None
    try:
        for i, chunk in enumerate(batcher.epoch()):
            if max_chunks is not None and i >= max_chunks:
                break
            loss, state = chunk_loss(model, chunk, state, autocast_dtype=autocast_dtype)
            total += loss.double() * chunk.num_tokens
            count += chunk.num_tokens
    finally:
        batcher.load_state_dict(saved)
    return float(total), count


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the block, then every submodule back in the mode it was in.

    ``model.train(was_training)`` alone would also switch on a submodule the caller had put
    in eval mode (a frozen dropout or batch norm). Modes are restored through ``train()``,
    parents before children, so a module that overrides it (a LoRA layer that merges its
    update in eval mode) sees every switch."""
    modes = [(m, m.training) for m in model.modules()]  # parents before children
    model.eval()
    try:
        yield model
    finally:
        model.train(modes[0][1])
        for m, training in modes[1:]:
            if m.training != training:
                m.train(training)


def bits(nats: float) -> float:
    """Nats to bits (bits per character for a character model's cross-entropy)."""
    return nats / math.log(2)


# --------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, ``os.replace``.

    A crash (even SIGKILL) leaves either the previous file or the new one, never a torn
    one; the directory is fsynced too so the rename itself survives a power loss.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # The name's first 64 characters: a long one would pass the file system's limit (255)
    # with mkstemp's additions, where torch.save takes it.
    prefix = "." + os.path.basename(path)[:64] + "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        # mkstemp's file is 0600; the checkpoint gets the mode a plain torch.save would give
        # it (0666 less the umask), so that a group sharing the run directory can read it.
        with os.fdopen(fd, "wb") as f:  # owns fd from here: closed whatever fails below
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
