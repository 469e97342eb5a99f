"""Data-parallel training: 2 processes (torchrun, gloo on CPU) equal 1 process that accumulates
gradients over the same two shards of every batch."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from fastsupernet import load_checkpoint
from fastsupernet.training import train

from torchrun_cli import assert_succeeded, run_torchrun
from train_tiny import make_tiny_data, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _train_two_ranks(config: Path, out: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m fastsupernet train`` (gloo, 1 thread per rank); must succeed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    logs = out.parent / f"{out.name}-logs"
    r = run_torchrun(["train", "--config", str(config), "--out", str(out)], logs, env=env)
    assert_succeeded(r, logs)
    return r


def test_two_ranks_equal_one_process_accumulating_two_shards(tmp_path):
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    spec = make_tiny_data(tmp_path)
    cfg = tiny_config(spec, metrics={"probes": 0})
    cfg["stages"][1]["sampling"] = {"rule": "sandwich", "paths": 3}
    cfg["stages"][1]["loss"] = {"kind": "distill", "teacher": "live", "alpha": 0.2}
    cfg["stages"][1]["max_steps"] = 6
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _train_two_ranks(path, tmp_path / "ddp")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints the result
    ddp = load_checkpoint(json.loads(lines[0])["final_checkpoint"])

    for st in cfg["stages"]:
        st["accumulate"] = 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = load_checkpoint(train(cfg, out=tmp_path / "single").final_checkpoint)
    finally:
        torch.set_num_threads(threads)
    params = dict(single.build_supernet().named_parameters())
    assert params
    for name in params:
        a, b = ddp.state_dict[name], single.state_dict[name]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)
    ts = load_checkpoint(sorted((tmp_path / "ddp" / "checkpoints").glob("step-*.pt"))[-1]).train_state
    assert ts["world_size"] == 2
    # the update moved the weights: the comparison is not between two untouched initialisations
    start = load_checkpoint(tmp_path / "ddp" / "stage0-largest.pt").build_supernet().grow((2, 2, 2), 2)
    assert not torch.equal(start.stem.weight, ddp.state_dict["stem.weight"])


def test_sync_bn_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    """With sync_bn, BN of 2 processes takes the statistics of both shards: the run equals one
    process that forwards each whole batch at once (weights and BN running statistics).

    The two runs sum each weight gradient in another order (two shards, then all-reduce, vs the
    whole batch); this small net amplifies those rounding differences by two to three orders of
    magnitude in a few multi-path steps. With the direct kernels they stay within the tolerances
    below; the Winograd weight gradient (errors ~1e-6 of the largest value) does not, so the runs
    pin the direct kernels: this test is about sync-BN semantics, the kernels' accuracy has its
    own tests."""
    monkeypatch.setenv("FASTSUPERNET_CPU_WINOGRAD", "0")  # inherited by the torchrun processes
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    spec = make_tiny_data(tmp_path)
    cfg = tiny_config(spec, metrics={"probes": 1, "recal_batches": 1, "batch_size": 16, "eval_images": 32})
    cfg["stages"][1]["loss"] = {"kind": "distill", "teacher": "live", "alpha": 0.2}
    cfg["stages"][1]["max_steps"] = 4
    for st in cfg["stages"]:
        st["sync_bn"] = True
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _train_two_ranks(path, tmp_path / "ddp")
    ddp = load_checkpoint(json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][0])["final_checkpoint"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = load_checkpoint(train(cfg, out=tmp_path / "single").final_checkpoint)
    finally:
        torch.set_num_threads(threads)
    for name, b in single.state_dict.items():
        if b.is_floating_point():
            torch.testing.assert_close(ddp.state_dict[name], b, rtol=1e-4, atol=2e-5, msg=name)
    # stage 0 runs single paths (running statistics updated): they are the whole batch's
    s0 = load_checkpoint(tmp_path / "ddp" / "stage0-largest.pt").state_dict["stem.running_var"]
    s1 = load_checkpoint(tmp_path / "single" / "stage0-largest.pt").state_dict["stem.running_var"]
    torch.testing.assert_close(s0, s1, rtol=1e-4, atol=1e-6)
