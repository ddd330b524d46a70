"""Random layers on cudasim's ThreadSanitizer build: a race check beyond tsan_run.py's fixed
configurations. By hand, not in the test suite (about 20 cases a minute on one core):

    python tests/cuda/tsan_sweep.py FIRST_SEED COUNT [LOG]

Each seed draws a case: cell, dtype, H (partial last blocks), B (across the 16-row padding), T,
lengths, reverse, the simulated device (1-16 SMs; 227, 163, 99 or 48 KB of shared memory), the
thread order, cp.async landing late or early, and each ``FUSED_RNN_CUDA_*`` plan setting drawn
independently (groups, stage_k, K parts, clusters, DSMEM, team clusters, the stage copy, the grid
cap, the register blocking, the epilogue's point batches). A case the backend refuses
(``unsupported_reason``: H too large for the device) is listed as refused: backends.py would fall
back. Each case runs forward and every gradient; the line ``done SEED`` gives the launched plans
and the largest relative error against the fp64 reference, not checked here: ``accuracy_sweep.py``
runs the same draws on the plain build and holds them to the accuracy rule. The cases run
in child processes of 25, started with ``simulate.sanitizer_env("thread")``; a race report ends a
child with exit code 66: its report goes to the log with the seed, and the sweep goes on after that
seed.
"""

from __future__ import annotations

import ctypes
import json
import random
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
CHILD_CASES = 25
# TSan's limit on threads (each simulated CUDA thread is a fiber of its own): a launch with
# more dies with "can not mmap thread trace", which is no race. The persistent grids stay under
# it (at most 16 SMs' blocks); a step launch has a thread a point, B x H rounded up to blocks.
TSAN_THREADS = 8128
STEP_THREADS = 256  # rnn_common.cuh kStepThreads


def draw(seed: int) -> dict:
    """The case of ``seed`` (JSON-able)."""
    r = random.Random(seed)
    sms = r.choice([1, 2, 3, 4, 5, 6, 8, 12, 16])  # 16 x 2 blocks x 256 threads < TSan's 8128
    settings = {
        "MAX_GROUPS": r.choice(["1", "2", "8", None]),
        "STAGE_K": r.choice(["auto", "0", "16", "32", "64", None]),
        "K_PARTS": r.choice(["auto", "1", "2", "4", None]),
        "CLUSTER": r.choice(["off", "2", "4", "8", None, None]),
        "CLUSTER_EXCHANGE": r.choice(["global", "dsmem", None]),
        "TEAM_CLUSTERS": r.choice(["off", "on", None]),
        "STAGE_COPY": r.choice(["registers", "async", "pipelined", None]),
        "MAX_BLOCKS": r.choice(["auto", str(r.randint(1, sms)), None]),
    }
    case = {
        "mode": r.choice(MODES), "dtype": r.choice(["fp32", "tf32", "bf16", "fp16"]),
        "H": r.choice([1, 7, 16, 33, 37, 60, 64, 100, 130, 160, r.randint(1, 200)]),
        "B": r.choice([1, 3, 8, 16, 17, 33, 70, r.randint(1, 97)]), "T": r.randint(1, 5),
        "I": r.randint(1, 9), "lengths": r.random() < 0.4, "reverse": r.random() < 0.5,
        "sms": sms, "smem_kb": r.choice([227, 227, 163, 99, 48]),
        "order": r.choice(["ascending", "descending", "shuffle"]),
        "cp_async": r.choice(["late", "early"]),
        "settings": {k: v for k, v in settings.items() if v is not None},
    }
    # Drawn last, so the seeds before it was added still draw the same cases otherwise.
    tile_block = r.choice(["1", "2", "4", None])
    if tile_block is not None:
        case["settings"]["TILE_BLOCK"] = tile_block
    if r.random() < 0.25:  # drawn after TILE_BLOCK, for the same reason
        case["settings"]["POINT_BATCH"] = "1"
    if r.random() < 0.15:  # a larger batch: threads with several epilogue points (same reason)
        case["B"] = r.choice([100, 160, 257])
    frag_loads = r.choice(["shared", "generic", "mma", "mma", None, None])  # last (same reason)
    if frag_loads is not None:
        case["settings"]["FRAG_LOADS"] = frag_loads
    if r.random() < 0.2:  # the per-step path (drawn last; swept from seed 6100 on)
        case["settings"]["PATH"] = "step"
    if r.random() < 0.15:  # teams of 8 (the H200's backward plans at S1-S4; from seed 8255 on)
        case["settings"]["K_PARTS"] = "8"
    if r.random() < 0.2:  # the tagged exchange (runs as registers where the plan cannot take
        case["settings"]["STAGE_COPY"] = "tagged"  # it; drawn last, from seed 8885 on)
    return case


def install_case(c: dict, seed: int, mp, sanitize: str, step_threads: tuple[int, str]):
    """Case ``c`` (of ``draw(seed)``) set up through ``mp`` (pytest's MonkeyPatch): its simulated
    device as the CUDA backend's stand-in (cudasim built with ``sanitize``), its plan settings
    in the environment (none other), its TF32 flag. Returns the Simulator and why the backend
    refuses the case, or None; ``step_threads``: (the most threads a step launch may have, whose
    limit that is)."""
    import simulate
    import torch
    from cases import install_standin
    from tsan_run import DTYPES, SETTINGS

    import fused_rnn.ops.cuda as cuda_backend

    sim = install_standin(mp, simulate.Simulator(
        sms=c["sms"], order=c["order"], seed=seed, smem_optin=c["smem_kb"] * 1024,
        smem_per_sm=(c["smem_kb"] + 1) * 1024, sanitize=sanitize, cp_async=c["cp_async"]))
    for key in (*SETTINGS, "MAX_BLOCKS"):
        mp.delenv(f"FUSED_RNN_CUDA_{key}", raising=False)
    for key, value in c["settings"].items():
        mp.setenv(f"FUSED_RNN_CUDA_{key}", value)
    dtype, tf32 = DTYPES[c["dtype"]]
    mp.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    why = cuda_backend.unsupported_reason(
        "layer", mode=c["mode"], device=torch.device("cuda", 0), dtype=dtype,
        input_size=c["I"], hidden_size=c["H"], proj_size=0, has_lengths=c["lengths"])
    threads = -(-c["B"] * c["H"] // STEP_THREADS) * STEP_THREADS
    limit, whose = step_threads
    if why is None and c["settings"].get("PATH") == "step" and threads > limit:
        why = f"a step launch of {threads} threads, past {whose} {limit}"
    return sim, why


def run_cases(first: int, count: int) -> None:
    """In a process under TSan: the cases, one ``start``/``done``/``refused`` line each."""
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    import pytest
    import torch
    from cases import blockings, layer_inputs, rel, run_layer
    from tsan_run import DTYPES

    import fused_rnn.ops.cuda as cuda_backend
    from fused_rnn.ops import reference

    if not hasattr(ctypes.CDLL(None), "__tsan_init"):
        raise SystemExit("ThreadSanitizer is not loaded: run this file without --child")
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()  # each case's setup replaces the last one's; never undone
    for seed in range(first, first + count):
        c = draw(seed)
        print(f"start {seed} {json.dumps(c)}", flush=True)
        mp.undo()
        sim, why = install_case(c, seed, mp, "thread", (TSAN_THREADS, "TSan's"))
        dtype, _ = DTYPES[c["dtype"]]
        if why is not None:
            print(f"refused {seed} {why}", flush=True)
            continue
        leaves, lens, cots = layer_inputs(c["mode"], c["T"], c["B"], c["I"], c["H"], seed,
                                          c["lengths"])
        args = (c["mode"], leaves)
        batches = sim.point_batch_count()
        got = run_layer(cuda_backend.rnn_layer, *args, dtype, lens, c["reverse"], cots, "cpu")
        want = run_layer(reference.rnn_layer, *args, torch.float64, lens, c["reverse"], cots,
                         "cpu")
        err = max(rel(a, b) for a, b in zip(got, want) if b.numel())
        plans = [{"path": "step"} if launch[0].endswith("_steps") else
                 {**{k: launch[2][k] for k in ("blocks", "groups", "parts", "cluster",
                                               "stage_k", "stage_copy")},
                  "blocked": sorted(blockings([launch], c["B"]))} for launch in sim.launches]
        batches = sim.point_batch_count() - batches  # the epilogue's batches of points
        print(f"done {seed} rel {err:.2e} {json.dumps(plans)} point_batches {batches}",
              flush=True)


def main(first: int, count: int, log_path: str) -> int:
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    import simulate

    why = simulate.sanitizer_missing("thread")
    if why is not None:
        raise SystemExit(why)
    simulate.build(sanitize="thread")
    seed, end, races, failed = first, first + count, 0, 0
    with open(log_path, "a") as log:
        while seed < end:
            n = min(CHILD_CASES, end - seed)
            r = subprocess.run([sys.executable, __file__, "--child", str(seed), str(n)],
                               cwd=HERE, env=simulate.sanitizer_env("thread"),
                               capture_output=True, text=True, check=False)
            log.write(r.stdout)
            started = [int(s) for s in re.findall(r"^start (\d+)", r.stdout, re.MULTILINE)]
            if r.returncode == 0:
                seed += n
                continue
            last = started[-1] if started else seed
            races += r.returncode == simulate.TSAN_EXIT_CODE
            failed += r.returncode != simulate.TSAN_EXIT_CODE
            log.write(f"EXIT {r.returncode} at seed {last}\n{r.stderr[-8000:]}\n")
            log.flush()
            print(f"seed {last}: exit {r.returncode} (see {log_path})", flush=True)
            seed = last + 1
        log.write(f"sweep {first}..{end - 1} done\n")
    print(f"seeds {first}..{end - 1}: {races} race report(s), {failed} other failure(s); log in "
          f"{log_path}")
    return 1 if races or failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        run_cases(int(sys.argv[2]), int(sys.argv[3]))
    else:
        first, count = int(sys.argv[1]), int(sys.argv[2])
        log = sys.argv[3] if len(sys.argv) > 3 else f"tsan_sweep_{first}_{count}.log"
        sys.exit(main(first, count, str(Path(log).resolve())))
