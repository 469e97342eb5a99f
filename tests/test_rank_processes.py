"""Whole ranking processes: SIGKILL and --resume, and torchrun with two CPU processes (gloo).

Both compare with one uninterrupted single-process run of the same candidates (the reference
engine, whose numbers do not depend on which other candidates share a run), bit for bit.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fastsupernet import io as fio
from fastsupernet.ranking import existing_journals, journal_path, network_key

from torchrun_cli import assert_succeeded, run_torchrun
from rank_helpers import ROOT, candidates, cli_env, entries, journal_nets, one_json, rank_cmd, run_cli, write_candidates

NETWORKS = 12


@pytest.fixture(scope="module")
def uninterrupted(trained_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("rank_processes")
    cands = candidates(NETWORKS, seed=11)
    archs = write_candidates(d / "c.json", cands)
    full = d / "full.json"
    r = run_cli(rank_cmd(trained_checkpoint, archs, full, "--engine", "reference"))
    assert r.returncode == 0, r.stderr
    return cands, archs, full


def _result_lines(path) -> int:
    try:
        return len(journal_nets(path))
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_gives_the_uninterrupted_output(uninterrupted, trained_checkpoint, tmp_path):
    _, archs, full = uninterrupted
    killed = tmp_path / "killed.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsupernet", *rank_cmd(trained_checkpoint, archs, killed, "--engine", "reference")],
        cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    journal = journal_path(killed)
    deadline = time.monotonic() + 240
    while _result_lines(journal) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    done = len(journal_nets(journal))
    assert 1 <= done < NETWORKS, f"the kill landed after {done} of {NETWORKS} networks"
    assert not killed.exists()

    r = run_cli(rank_cmd(trained_checkpoint, archs, killed, "--engine", "reference", "--resume"))
    assert r.returncode == 0, r.stderr
    d = one_json(r.stdout)
    assert d["resumed"] == done and d["computed"] == NETWORKS - done and d["unique"] == NETWORKS
    assert entries(killed) == entries(full)
    meta_full, meta_killed = fio.read_meta(full), fio.read_meta(killed)
    for key in ("checkpoint", "protocol", "data", "engine", "precision"):
        assert meta_killed[key] == meta_full[key]
    assert meta_killed["counts"]["resumed"] == done
    # every network appears once in the journal: nothing finished was computed twice
    nets = journal_nets(journal)
    assert len(nets) == len(set(nets)) == NETWORKS


def test_two_processes_give_the_output_of_one(uninterrupted, trained_checkpoint, tmp_path):
    cands, archs, full = uninterrupted
    two = tmp_path / "two.json"
    logs = tmp_path / "logs"
    r = run_torchrun(rank_cmd(trained_checkpoint, archs, two, "--engine", "reference"), logs, env=cli_env(), cwd=ROOT)
    assert_succeeded(r, logs)
    d = one_json(r.stdout)  # only rank 0 prints
    assert d["world_size"] == 2 and d["unique"] == NETWORKS and d["computed"] == NETWORKS
    assert d["candidates"] == NETWORKS + 1

    assert entries(two) == entries(full)
    meta = fio.read_meta(two)
    assert meta["world_size"] == 2 and meta["protocol"] == fio.read_meta(full)["protocol"]
    # each rank journaled its own shard: disjoint, both non-empty, together every network
    journals = existing_journals(two)
    assert [p.name for p in journals] == ["two.json.journal", "two.json.journal.1"]
    shards = [set(journal_nets(p)) for p in journals]
    assert all(shards) and not (shards[0] & shards[1])
    assert shards[0] | shards[1] == {network_key(a) for a in cands.values()}
