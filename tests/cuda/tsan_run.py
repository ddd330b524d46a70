"""Run layers (forward and every gradient) on cudasim's ThreadSanitizer build, in this process.

    python tsan_run.py [--quick] CSRC CP_ASYNC CONFIG...

CONFIG is a name from ``CONFIGS``; ``--quick``: the library with the kernels compiled at -O0
(``simulate.build``), as the tests build a mutant copy of csrc/. The process must start with ``simulate.sanitizer_env("thread")``
(TSan loaded first, torch on one thread); its first race report ends it with exit code 66 and
the report on stderr. ``test_cuda_sim.py`` runs it. After each configuration's layer, one line:
``ran NAME {json}`` with the plans it launched (the fields that tell the launch modes apart) and
how many of its launches ran as clusters.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import torch

# Partitions and launch modes, each with its own synchronization (plan.h, rnn_common.cuh):
# (mode, dtype, H, SMs, settings, plan): settings are FUSED_RNN_CUDA_* without the prefix, plan
# the fields both launches' plans must have, so each configuration is known to run what it
# names. B=70 gives every block more than one batch chunk, or (on 8 SMs) three batch groups of
# two blocks.
CONFIGS = {
    # X read directly from the exchange buffer, one group (two batch chunks a block)
    "direct": ("GRU", "bf16", 37, 4, {"MAX_GROUPS": "1", "STAGE_K": "0"},
               {"cluster": 0, "parts": 1, "groups": 1, "stage_k": 0}),
    # three batch groups, X staged whole
    "grouped-staged": ("LSTM", "tf32", 37, 8, {"MAX_GROUPS": "8", "STAGE_K": "auto"},
                       {"cluster": 0, "parts": 1, "groups": 3, "group_blocks": 2}),
    # one stage buffer, several 16-column slices; plain fp32 (FMA) math
    "slices16": ("RNN_TANH", "fp32", 37, 4, {"MAX_GROUPS": "1", "STAGE_K": "16"},
                 {"cluster": 0, "parts": 1, "groups": 1, "stage_k": 16}),
    # the pipelined copy's two 16-column buffers
    "slices32": ("LSTM", "fp16", 37, 4, {"MAX_GROUPS": "1", "STAGE_K": "32"},
                 {"cluster": 0, "parts": 1, "groups": 1, "stage_k": 32, "stage_copy": 2}),
    # teams of two blocks split K (partial sums through global memory and grid.sync)
    "parts2": ("GRU", "bf16", 60, 4, {"MAX_GROUPS": "1", "STAGE_K": "16", "K_PARTS": "2"},
               {"cluster": 0, "parts": 2, "stage_k": 16}),
    "parts2-pipelined": ("LSTM", "tf32", 60, 4,
                         {"MAX_GROUPS": "1", "STAGE_K": "32", "K_PARTS": "2"},
                         {"cluster": 0, "parts": 2, "stage_k": 32}),
    # the other two ways of copying X into the stage (plan.h staging; the default is pipelined)
    "slices32-async": ("GRU", "fp16", 37, 4,
                       {"MAX_GROUPS": "1", "STAGE_K": "32", "STAGE_COPY": "async"},
                       {"cluster": 0, "parts": 1, "stage_k": 32, "stage_copy": 1}),
    "parts2-registers": ("LSTM", "bf16", 60, 4, {"MAX_GROUPS": "1", "STAGE_K": "16",
                                                 "K_PARTS": "2", "STAGE_COPY": "registers"},
                         {"cluster": 0, "parts": 2, "stage_k": 16, "stage_copy": 0}),
    "grouped-registers": ("RNN_RELU", "tf32", 37, 8, {"MAX_GROUPS": "8", "STAGE_K": "auto",
                                                      "STAGE_COPY": "registers"},
                          {"cluster": 0, "groups": 3, "stage_copy": 0}),
    # batch groups as thread-block clusters: the step barrier is the cluster's
    "cluster-groups": ("GRU", "bf16", 60, 8, {"MAX_GROUPS": "8", "CLUSTER": "4"},
                       {"cluster": 1, "parts": 1, "groups": 3, "group_blocks": 2}),
    # K-parts teams as clusters of a cooperative grid
    "team-clusters": ("LSTM", "bf16", 60, 4, {"MAX_GROUPS": "1", "K_PARTS": "2",
                                              "TEAM_CLUSTERS": "on"},
                      {"cluster": 2, "parts": 2, "group_blocks": 4}),
    # the exchange through distributed shared memory: three groups of two, and 4 blocks as one
    "dsmem-groups": ("GRU", "fp16", 60, 8, {"MAX_GROUPS": "8", "CLUSTER": "4",
                                            "CLUSTER_EXCHANGE": "dsmem"},
                     {"cluster": 3, "groups": 3, "group_blocks": 2}),
    "dsmem-one-cluster": ("LSTM", "tf32", 60, 4, {"MAX_GROUPS": "1", "CLUSTER": "4",
                                                  "CLUSTER_EXCHANGE": "dsmem"},
                          {"cluster": 3, "groups": 1, "group_blocks": 4}),
    # warps multiplying blocks of tiles (one block holds all of H: 2x2 and 2x1 forward, 2x1
    # backward), X staged (pipelined) and read directly
    "tile-blocks": ("LSTM", "bf16", 60, 1, {"MAX_GROUPS": "1", "TILE_BLOCK": "4"},
                    {"cluster": 0, "parts": 1, "blocked": True}),
    "tile-blocks-direct": ("LSTM", "tf32", 64, 1, {"MAX_GROUPS": "1", "STAGE_K": "0"},
                           {"cluster": 0, "parts": 1, "stage_k": 0, "blocked": True}),
    # the TF32 tiles through mma.sync and ldmatrix (each lane reads its own rows of the stage
    # and W; a lane's accumulator elements are its own): single tiles over three batch groups,
    # and blocks of tiles
    "mma-grouped": ("LSTM", "tf32", 37, 8, {"MAX_GROUPS": "8", "STAGE_K": "auto",
                                            "FRAG_LOADS": "mma"},
                    {"cluster": 0, "parts": 1, "groups": 3}),
    "mma-tile-blocks": ("GRU", "tf32", 60, 1, {"MAX_GROUPS": "1", "TILE_BLOCK": "4",
                                               "FRAG_LOADS": "mma"},
                        {"cluster": 0, "parts": 1, "blocked": True}),
    # the tagged exchange (no step barrier: relaxed word stores and polled loads, which TSan
    # counts as atomics): 16-column slices, and three batch groups staged whole
    "tagged": ("LSTM", "bf16", 37, 4, {"MAX_GROUPS": "1", "STAGE_K": "16", "STAGE_COPY": "tagged"},
               {"cluster": 0, "parts": 1, "stage_k": 16, "stage_copy": 3}),
    "tagged-grouped": ("GRU", "fp16", 37, 8, {"MAX_GROUPS": "8", "STAGE_K": "auto",
                                              "STAGE_COPY": "tagged"},
                       {"cluster": 0, "parts": 1, "groups": 3, "stage_copy": 3}),
    # the per-step path (FUSED_RNN_CUDA_PATH=step): one launch a step, one thread a point
    "step": ("LSTM", "bf16", 37, 4, {"PATH": "step"}, {"path": "step", "cluster": 0}),
}
SETTINGS = ("MAX_GROUPS", "STAGE_K", "K_PARTS", "CLUSTER", "CLUSTER_EXCHANGE", "TEAM_CLUSTERS",
            "STAGE_COPY", "TILE_BLOCK", "POINT_BATCH", "FRAG_LOADS", "PATH")


def launch_plans(sim, batch: int) -> list[dict]:
    """What each launch of ``sim`` so far ran: the plan fields that tell the persistent launch
    modes apart, or ``{"path": "step", "cluster": 0}`` for the per-step path's loops."""
    from cases import blockings

    return [{"path": "step", "cluster": 0} if kind.endswith("_steps") else
            {**{k: pl[k] for k in ("cluster", "parts", "groups", "group_blocks", "stage_k",
                                   "stage_copy")},
             "blocked": blockings([(kind, cell, pl)], batch) != {(1, 1)}}
            for kind, cell, pl in sim.launches]
DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True),
          "bf16": (torch.bfloat16, False), "fp16": (torch.float16, False)}


class _Setattr:
    """install_standin's monkeypatch, for a process that ends after the runs."""

    def setattr(self, obj, name, value):
        setattr(obj, name, value)


def main(argv: list[str]) -> None:
    quick = argv[0] == "--quick"  # the kernels compiled at -O0 (simulate.build): a mutant
    csrc, cp_async, *names = argv[quick:]
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    import simulate
    from cases import install_standin, layer_inputs, run_layer

    import fused_rnn.ops.cuda as cuda_backend

    if not hasattr(ctypes.CDLL(None), "__tsan_init"):
        raise SystemExit("ThreadSanitizer is not loaded in this process: start it with "
                         "simulate.sanitizer_env('thread')")
    torch.set_num_threads(1)
    for name in names:
        mode, dt, hidden, sms, settings, _ = CONFIGS[name]
        sim = install_standin(_Setattr(), simulate.Simulator(sms=sms, sanitize="thread",
                                                             csrc=Path(csrc), cp_async=cp_async,
                                                             quick=quick))
        for key in SETTINGS:
            os.environ.pop(f"FUSED_RNN_CUDA_{key}", None)
        os.environ.update({f"FUSED_RNN_CUDA_{k}": v for k, v in settings.items()})
        # the configurations name their path: the persistent kernel unless "step", whatever
        # the CUDA backend's path rules (ops.PATH_RULES) would choose
        os.environ.setdefault("FUSED_RNN_CUDA_PATH", "persistent")
        dtype, tf32 = DTYPES[dt]
        torch.backends.cudnn.allow_tf32 = tf32
        leaves, lens, cots = layer_inputs(mode, 3, 70, 5, hidden, 0, True)
        before = sim.cluster_launches()
        run_layer(cuda_backend.rnn_layer, mode, leaves, dtype, lens, True, cots, "cpu")
        ran = {"plans": launch_plans(sim, 70), "cluster_launches": sim.cluster_launches() - before}
        print(f"ran {name} {json.dumps(ran)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
