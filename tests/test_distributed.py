"""The launcher: results in rank order, errors and hangs brought back, bad input refused.

Each ``launch`` starts fresh Python processes (a second or two each), so the checks share
few launches.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dlabc import book
from dlabc.distributed import launch, main
from helpers_distributed import (
    all_reduce_ranks,
    fail_on_rank_one,
    lonely_receive,
    report_constant,
)


def test_results_come_back_in_rank_order_from_one_group():
    results = launch(all_reduce_ranks, 2)
    assert [r["rank"] for r in results] == [0, 1]
    # the group is real: an all-reduce of the ranks sums them on every process
    assert [r["sum"] for r in results] == [1.0, 1.0]
    assert all(r["backend"] == "gloo" and r["threads"] == 1 for r in results)
    assert torch.equal(results[1]["tensor"], torch.arange(3.0) + 1)


def test_a_failing_worker_brings_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 .*ZeroDivisionError"):
        launch(fail_on_rank_one, 2, deadline=60)


def test_a_collective_that_waits_forever_times_out():
    # rank 1 waits for a message rank 0 never sends: the group's timeout ends it
    with pytest.raises(RuntimeError, match="rank 1"):
        launch(lonely_receive, 2, timeout=2, deadline=60)


def test_edited_implementation_cells_reach_the_workers(monkeypatch):
    monkeypatch.setattr(book, "_EDITED", {})
    line = "helpers_distributed CONSTANT_SOURCE"
    book.implementation(line, "def CONSTANT_SOURCE():\n    return 42\n")
    try:
        assert launch(report_constant, 1) == [42]
    finally:
        import helpers_distributed as helpers

        helpers.CONSTANT_SOURCE = helpers._original_constant


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="module-level"):
        launch(lambda rank, world: rank, 2)
    with pytest.raises(ValueError, match="at least 1"):
        launch(all_reduce_ranks, 0)
    with pytest.raises(TypeError, match="world_size"):
        launch(all_reduce_ranks, 2.0)
    with pytest.raises(ValueError, match="positive"):
        launch(all_reduce_ranks, 2, timeout=0)
    with pytest.raises(SystemExit, match="usage"):
        main([])
    assert not dist.is_initialized()


def test_the_same_worker_runs_under_torchrun():
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    command = torchrun + [
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "dlabc.distributed",
        "helpers_distributed:all_reduce_sum",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1.0"
