"""The test harness's own settings (tests/conftest.py), which the suite's run time rests on."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def test_one_intra_op_thread_here_and_in_child_processes():
    """With two xdist workers on two cores, more than one OpenMP thread a process makes them
    spin for each other's cores (3x the cudasim cases' time); a child inherits the setting."""
    want = int(os.environ["OMP_NUM_THREADS"])
    assert torch.get_num_threads() == want
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True, timeout=120)
    assert int(child.stdout) == want


def test_what_collection_made_is_out_of_the_garbage_collectors_way():
    """Frozen after collection (conftest.pytest_collection_finish): full collections no longer
    walk torch's and the test items' objects."""
    import gc

    assert gc.get_freeze_count() > 100_000
