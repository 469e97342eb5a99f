"""The failure report of the torchrun tests' helper shows a dead rank's own words."""
from __future__ import annotations

import subprocess

from torchrun_cli import failure_report, rank_stderr


def test_failure_report_shows_each_rank_and_the_fault_handler(tmp_path):
    run = tmp_path / "abc_1" / "attempt_0"
    (run / "0").mkdir(parents=True)
    (run / "1").mkdir()
    (run / "0" / "stderr.log").write_text("rank zero was fine\n")
    modules = ", ".join(f"module{i}" for i in range(500))
    (run / "1" / "stderr.log").write_text(
        "terminate called after throwing an instance of 'gloo::IoException'\nFatal Python error: Aborted\n\nThread 0x1 (most recent call first):\n  File \"x.py\", line 6 in <module>\n\n"
        f"Extension modules: {modules} (total: 500)\n")
    assert list(rank_stderr(tmp_path)) == ["attempt_0/rank 0", "attempt_0/rank 1"]
    r = subprocess.CompletedProcess([], 1, "", "torchrun: rank 1 exited with -6")
    report = failure_report(r, tmp_path, tail=200)
    assert report.startswith("torchrun exited with 1")
    assert "--- attempt_0/rank 0 stderr ---\nrank zero was fine" in report
    # what the process printed before the signal, and the traceback, survive although the
    # module list fills the tail
    assert "rank 1 before the fault ---\nterminate called after throwing an instance of 'gloo::IoException'" in report
    assert 'attempt_0/rank 1 fault handler ---\nFatal Python error: Aborted' in report and 'File "x.py", line 6' in report
    assert report.endswith("--- torchrun stderr ---\ntorchrun: rank 1 exited with -6")
