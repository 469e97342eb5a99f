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

from torchrun_cli import failure_report

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the threads from /proc")
def test_close_ends_the_group_threads(tmp_path):
    import subprocess

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "2", str(HERE / "group_close_probe.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, failure_report(r, logs)
    reports = [p.read_text() for p in sorted(logs.glob("*/attempt_*/*/stderr.log"))]
    assert len(reports) == 2 and all("sum 1, gloo threads after close: []" in t for t in reports), reports
