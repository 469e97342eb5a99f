"""Shared pieces of the ranking-driver tests: a tiny protocol, candidate files, CLI runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastsupernet import io as fio
from fastsupernet.space import Arch, Track1Space

ROOT = Path(__file__).resolve().parents[1]
SPACE = Track1Space()
#: The tiny protocol every driver test runs: a few images, so a candidate takes milliseconds.
TINY = {"recal_images": 64, "recal_batch": 32, "eval_images": 128}
TINY_ARGS = ["--recal-images", "64", "--recal-batch", "32", "--eval-images", "128"]


def twin(arch: Arch) -> Arch:
    """The same network as ``arch`` under another string: only the trailing position differs."""
    last = SPACE.choices[-1]
    other = last[(last.index(arch.values[-1]) + 1) % len(last)]
    return SPACE.parse(arch.values[:-1] + (other,))


def candidates(n: int, seed: int = 0) -> dict[str, Arch]:
    """``n`` sampled candidates (ids arch1..) plus one twin of arch1 under the last id."""
    archs = SPACE.sample_many(n, seed=seed)
    archs.append(twin(archs[0]))
    return {f"arch{i + 1}": a for i, a in enumerate(archs)}


def write_candidates(path: Path, cands: dict[str, Arch]) -> Path:
    fio.write_candidates(path, cands)
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def rank_cmd(ckpt: Path, archs: Path, out: Path, *extra: str) -> list[str]:
    return ["rank", "--checkpoint", str(ckpt), "--archs", str(archs), "--out", str(out), *TINY_ARGS,
            "--no-progress", *extra]


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastsupernet", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def entries(path: Path) -> dict[str, tuple[str, float, float]]:
    """The submission's entries as plain tuples (arch string, acc, loss), ``_meta`` left out."""
    return {k: (str(s.arch), s.acc, s.loss) for k, s in fio.read_scores(path).items()}


def journal_header(path: Path) -> dict:
    """The fingerprint on a journal's first line."""
    return json.loads(path.read_bytes().split(b"\n", 1)[0])


def journal_nets(path: Path) -> list[str]:
    """The networks a journal records, in order; a torn last line (a killed writer) is left out."""
    lines = path.read_bytes().split(b"\n")[1:-1]
    return [json.loads(line)["net"] for line in lines]
