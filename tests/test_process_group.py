"""Leaving a torchrun group ends it: no gloo thread outlives ProcessGroup.close().

Once a group existed when torch._dynamo was first imported (an optimizer's first step imports
it), torch kept that group, and its gloo threads, alive past destroy_process_group into the
interpreter's exit, where a rank now and then died of SIGABRT after finishing its work (seen in
the two-rank groundtruth test). fastsupernet.distributed imports torch._dynamo before it
creates the group."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from torchrun_cli import assert_succeeded, rank_stderr, run_torchrun

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the threads from /proc")
def test_close_ends_the_group_threads(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    logs = tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = run_torchrun([], logs, env=env, script=HERE / "group_close_probe.py")
    assert_succeeded(r, logs)
    reports = list(rank_stderr(logs).values())
    assert len(reports) == 2 and all("sum 1, gloo threads after close: []" in t for t in reports), reports
