"""Run ``torchrun -m fastsupernet ...`` on CPU for the multi-process tests.

Each rank's stderr goes to its own file under ``log_dir`` (torchrun's ``--redirects 2``), so when a
rank dies the failure message shows that rank's own last words, not only torchrun's report of
the exit code (which pushes the rank's message out of any short tail). The ranks run with
Python's fault handler on: a rank killed by a signal (SIGABRT, SIGSEGV) also prints where each
of its threads was.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence


def run_torchrun(args: Sequence[str], log_dir: Path, *, env: Mapping[str, str], cwd: Path | None = None,
                 nproc: int = 2, timeout: float = 300, script: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc -m fastsupernet *args`` (or ``script *args``);
    stdout and torchrun's own stderr captured, each rank's stderr in ``log_dir``."""
    target = [str(script)] if script is not None else ["-m", "fastsupernet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--log-dir", str(log_dir), "--redirects", "2", *target, *args]
    return subprocess.run(cmd, env={**env, "PYTHONFAULTHANDLER": "1"}, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def rank_stderr(log_dir: Path) -> dict[str, str]:
    """Every rank's stderr file under ``log_dir``, keyed ``attempt/rank``."""
    return {f"{p.parent.parent.name}/rank {p.parent.name}": p.read_text(errors="replace")
            for p in sorted(Path(log_dir).glob("*/attempt_*/*/stderr.log"))}


def failure_report(r: subprocess.CompletedProcess, log_dir: Path, tail: int = 2500) -> str:
    """Exit code, each rank's stderr (last ``tail`` characters, and the fault handler's report of
    a fatal signal from its start, which its list of extension modules would push out of the
    tail) and torchrun's own stderr."""
    parts = [f"torchrun exited with {r.returncode}"]
    for key, text in rank_stderr(log_dir).items():
        fatal = text.find("Fatal Python error")
        if fatal >= 0:
            report = text[fatal:].split("\nExtension modules:")[0]
            parts.append(f"--- {key} before the fault ---\n{text[max(0, fatal - tail):fatal]}")
            parts.append(f"--- {key} fault handler ---\n{report[:tail]}")
        parts.append(f"--- {key} stderr ---\n{text[-tail:]}")
    parts.append(f"--- torchrun stderr ---\n{r.stderr[-tail:]}")
    return "\n".join(parts)


def assert_succeeded(r: subprocess.CompletedProcess, log_dir: Path) -> None:
    assert r.returncode == 0, failure_report(r, log_dir)
