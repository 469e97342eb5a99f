"""The training pipeline end to end on tiny data: run folder, metrics, checkpoints, exact resume
after SIGKILL, refusals, the NaN stop, and the train/init commands."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fastsupernet import load_checkpoint
from fastsupernet.checkpoint import CheckpointError
from fastsupernet.cli import main
from fastsupernet.training import TrainError, TrainingDiverged, train
from fastsupernet.training import step as step_module

from train_tiny import make_tiny_data, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from fastsupernet.training import train
from fastsupernet.training import step as step_module
cfg, out, resume, pause = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
if pause:  # slows the run down (the arithmetic is untouched) so the test can kill it mid-stage
    plain = step_module.Trainer.step
    def slowed(self, *args, **kw):
        out_ = plain(self, *args, **kw)
        time.sleep(pause)
        return out_
    step_module.Trainer.step = slowed
res = train(cfg, out=out, resume=resume)
print(json.dumps(res.to_json_dict()))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    spec = make_tiny_data(folder)
    cfg = tiny_config(spec)
    res = train(cfg, out=folder / "run")
    return spec, cfg, res


def child(cfg: dict, out: Path, resume: bool = False, pause: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg), str(out), "1" if resume else "0", str(pause)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_run_folder_metrics_and_self_describing_checkpoint(tiny):
    spec, cfg, res = tiny
    run = res.run_dir
    assert res.final_checkpoint == run / "final.pt" and res.final_checkpoint.is_file()
    assert [p.name for p in res.stage_checkpoints] == ["stage0-largest.pt", "stage1-multi.pt"]
    assert res.global_step == 3 + 10 and res.resumed_from is None
    raw = torch.load(res.final_checkpoint, weights_only=True)
    assert raw["data"]["spec"] == spec and raw["data"]["num_classes"] == 4 and raw["data"]["resolution"] == 8
    ck = load_checkpoint(res.final_checkpoint)
    assert ck.config.branches == (2, 2, 2) and ck.config.residual_activation == "prelu"
    net = ck.build_supernet()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    stage0 = load_checkpoint(res.stage_checkpoints[0])
    assert stage0.config.branches == (1, 1, 1)
    assert yaml.safe_load((run / "config.yaml").read_text())["stages"][1]["optimizer"]["momentum"] == 0.9
    steps = sorted(run.joinpath("checkpoints").glob("step-*.pt"))
    assert len(steps) == cfg["checkpoint"]["keep"]
    ts = load_checkpoint(steps[-1]).train_state
    assert ts["stage"] == 1 and ts["stage_complete"] and ts["global_step"] == 13
    assert set(ts) >= {"optimizer", "scheduler", "sampler", "data_order", "rng", "teacher", "config"}
    lines = [json.loads(x) for x in res.metrics_file.read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r["global_step"]) for r in lines] == [("largest", 1, 3), ("multi", 1, 13)]
    for r in lines:
        assert set(r["probe_acc"]) >= {"largest", "smallest"} and len(r["probe_acc"]) == 3
        assert all(0.0 <= a <= 1.0 for a in r["probe_acc"].values())
        assert r["loss"] > 0 and r["images_per_s"] > 0 and 0 <= r["train_acc_largest"] <= 1
    assert lines[0]["student_loss"] is None and lines[1]["student_loss"] > 0
    assert lines[1]["recovered_per_step"] <= 2


def test_fresh_start_in_used_folder_and_changed_config_are_refused(tiny):
    spec, cfg, res = tiny
    with pytest.raises(TrainError, match="already holds a training run"):
        train(cfg, out=res.run_dir)
    changed = tiny_config(spec)
    changed["stages"][1]["optimizer"]["lr"] = 0.5
    changed["seed"] = 11
    with pytest.raises(TrainError) as e:
        train(changed, out=res.run_dir, resume=True)
    assert "seed" in str(e.value) and "stages[1].optimizer.lr" in str(e.value) and "step-000000013.pt" in str(e.value)
    # a finished run resumes to the same result without training
    again = train(cfg, out=res.run_dir, resume=True)
    assert again.final_checkpoint == res.final_checkpoint and again.global_step == 13


def test_corrupt_checkpoint_names_the_file_and_leaves_earlier_ones(tiny, tmp_path):
    spec, cfg, res = tiny
    run = tmp_path / "run"
    shutil.copytree(res.run_dir, run)
    steps = sorted((run / "checkpoints").glob("step-*.pt"))
    newest = steps[-1]
    newest.write_bytes(newest.read_bytes()[:5000])
    before = {p: p.read_bytes() for p in steps[:-1]}
    with pytest.raises(CheckpointError, match=str(newest)):
        train(cfg, out=run, resume=True)
    for p, data in before.items():
        assert p.read_bytes() == data
        assert load_checkpoint(p).train_state["stage"] == 1
    with pytest.raises(CheckpointError, match="no training state"):
        train(cfg, out=run, resume=run / "final.pt")


def test_sigkill_mid_stage_then_resume_is_bit_identical(tmp_path):
    spec = make_tiny_data(tmp_path)
    cfg = tiny_config(spec, checkpoint={"every_steps": 2, "keep": 2})
    cfg["stages"][1]["max_steps"] = 16  # two epochs of 12 and 4 steps
    whole = child(cfg, tmp_path / "whole")
    killed = child(cfg, tmp_path / "killed", pause=0.25)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        if any(int(p.stem.split("-")[1]) >= 3 + 6 for p in ckpts.glob("step-*.pt")):
            break
        time.sleep(0.02)
    assert killed.poll() is None, "the run ended before it could be killed: " + killed.communicate()[1]
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final.pt").exists()
    newest = sorted(ckpts.glob("step-*.pt"))[-1]
    ts = load_checkpoint(newest).train_state
    assert ts["stage"] == 1 and 0 < ts["stage_step"] < 16  # killed mid-stage
    ref = finish(whole)
    resumed = finish(child(cfg, tmp_path / "killed", resume=True))
    assert resumed["resumed_from"] == str(newest)
    a = load_checkpoint(ref["final_checkpoint"]).state_dict
    b = load_checkpoint(resumed["final_checkpoint"]).state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run's metrics equal the uninterrupted run's, record by record
    drop = ("images_per_s", "seconds")
    ma = [{k: v for k, v in json.loads(x).items() if k not in drop} for x in Path(ref["metrics"]).read_text().splitlines()]
    mb = [{k: v for k, v in json.loads(x).items() if k not in drop} for x in Path(resumed["metrics"]).read_text().splitlines()]
    assert ma == mb and len(ma) == 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    spec = make_tiny_data(tmp_path)
    cfg = tiny_config(spec, checkpoint={"every_steps": 1, "keep": 2})
    plain = step_module.path_logits
    calls = {"n": 0}

    def poisoned(model, x, archs, batched):
        out = plain(model, x, archs, batched)
        if len(archs) == 3:  # the sandwich paths of a stage 'multi' step (teacher: 1 path, probes: 2)
            calls["n"] += 1
            if calls["n"] == 2:
                return out * float("nan")
        return out

    monkeypatch.setattr(step_module, "path_logits", poisoned)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, out=tmp_path / "run")
    msg = str(e.value)
    assert "non-finite training loss" in msg and "stage 'multi'" in msg and "step 1:" in msg
    last = Path(msg.rsplit("The last good checkpoint is ", 1)[1])
    assert last.is_file() and last == sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1]
    ck = load_checkpoint(last)
    assert all(torch.isfinite(t).all() for t in ck.state_dict.values())
    assert not (tmp_path / "run" / "final.pt").exists()


def test_train_and_init_commands(tmp_path, capsys):
    spec = make_tiny_data(tmp_path)
    cfg = tiny_config(spec)
    cfg["stages"] = cfg["stages"][:1]
    cfg["metrics"]["probes"] = 0
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["final_checkpoint"] == str(tmp_path / "run" / "final.pt") and out["global_step"] == 3
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"].endswith("step-000000003.pt")

    cfg["stages"][0]["optimizer"]["lr"] = "fast"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "stages[0].optimizer.lr" in err

    assert main(["init", "--config", str(ROOT / "configs" / "mini_seed.yaml"), "--out", str(tmp_path / "i.pt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["branches"] == [1, 1, 1] and info["data"] == "fashion-mnist@14" and info["parameters"] > 0
    ck = load_checkpoint(tmp_path / "i.pt")
    assert ck.train_state is None and ck.data["num_classes"] == 10 and ck.config.residual_activation == "prelu"
    assert main(["init", "--space", "track1", "--data", spec, "--branches", "4,8,16", "--enhanced",
                 "--out", str(tmp_path / "j.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["branches"] == [4, 8, 16]
    assert main(["init", "--data", spec, "--branches", "4,8", "--out", str(tmp_path / "k.pt")]) == 2
    assert "branches" in capsys.readouterr().err and not (tmp_path / "k.pt").exists()


def test_stage_init_from_a_checkpoint_is_grown_and_checked(tmp_path):
    from fastsupernet.training import load_config, write_initial_checkpoint
    from fastsupernet.training.pipeline import _build_stage_model

    spec = make_tiny_data(tmp_path)
    first = write_initial_checkpoint(tiny_config(spec), tmp_path / "init.pt")
    cfg = tiny_config(spec)
    cfg["stages"] = cfg["stages"][:1]
    cfg["stages"][0]["init"] = str(first)
    cfg["stages"][0]["supernet"]["branches"] = [2, 2, 2]
    loaded = load_config(cfg)
    ck = load_checkpoint(first)
    model = _build_stage_model(loaded, 0, None, loaded.get_space(), ck.data_info())
    want = ck.build_supernet().grow((2, 2, 2))
    assert model.config.branches == (2, 2, 2)
    for (n, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), n
    cfg["stages"][0]["supernet"]["enhanced"] = False
    with pytest.raises(TrainError, match=r"stages\[0\]\.init: .*init\.pt: the checkpoint's supernet options width_map"):
        _build_stage_model(load_config(cfg), 0, None, loaded.get_space(), ck.data_info())


def test_progress_bar_data_override_and_image_subset(tmp_path, capsys):
    spec = make_tiny_data(tmp_path)
    (tmp_path / "other").mkdir()
    other = make_tiny_data(tmp_path / "other", seed=1)
    cfg = tiny_config("fashion-mnist", progress=True, train_images=48)
    cfg["stages"] = cfg["stages"][:1]
    cfg["stages"][0]["max_steps"] = None  # a whole epoch: 48 images / 16 = 3 steps
    cfg["metrics"]["probes"] = 0
    res = train(cfg, out=tmp_path / "run", data=other)
    assert res.global_step == 3
    err = capsys.readouterr().err
    assert "largest" in err and "img_s=" in err and "loss=" in err
    assert load_checkpoint(res.final_checkpoint).data["spec"] == other != spec
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert saved["data"] == other and saved["train_images"] == 48


def test_batched_paths_and_the_loop_train_alike(tmp_path):
    spec = make_tiny_data(tmp_path)
    finals = []
    for batched in (False, True):
        cfg = tiny_config(spec, metrics={"probes": 0})
        cfg["stages"] = cfg["stages"][:1]
        st = cfg["stages"][0]
        st.update(max_steps=3, sampling={"rule": "sandwich", "paths": 3}, max_recover={"probes": 2},
                  loss={"kind": "distill", "teacher": "live", "alpha": 0.5, "temperature": 2.0},
                  speed={"batched_paths": batched})
        finals.append(load_checkpoint(train(cfg, out=tmp_path / f"run{batched}").final_checkpoint))
    loop, batched = finals
    names = [n for n, _ in loop.build_supernet().named_parameters()]
    for n in names:
        torch.testing.assert_close(batched.state_dict[n], loop.state_dict[n], rtol=1e-4, atol=1e-5, msg=n)


def test_max_recover_steps_again_for_exactly_the_paths_whose_loss_rose(tmp_path, monkeypatch):
    from fastsupernet import Supernet, SupernetConfig, Track1Space
    from fastsupernet.training import load_config
    from fastsupernet.training.step import Trainer

    cfg = load_config(tiny_config("fashion-mnist"))
    space = Track1Space()
    torch.manual_seed(0)
    model = Supernet(space, SupernetConfig.enhanced((2, 2, 2), 2), in_channels=1, num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = Trainer(model, opt, cfg.stages[1], teacher=model, largest=space.largest(), batched=False,
                      autocast_dtype=None, world_size=1)
    scores = iter([torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64)])
    monkeypatch.setattr(trainer, "_probe_losses", lambda *a: next(scores))
    recovered, steps = [], []
    plain_recover, plain_step = trainer._recover, opt.step
    monkeypatch.setattr(trainer, "_recover", lambda shards, arch, t, total: (recovered.append(arch), plain_recover(shards, arch, t, total)))
    monkeypatch.setattr(opt, "step", lambda *a, **k: (steps.append(1), plain_step(*a, **k)))
    probes = space.sample_many(3, seed=5)
    g = torch.Generator().manual_seed(0)
    shard = (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
    stats = trainer.step([shard], space.sample_many(2, seed=1), probes)
    assert recovered == [probes[0], probes[2]] and stats.recovered == 2 and len(steps) == 3


def test_speed_options_bf16_autocast_and_channels_last_run(tmp_path):
    spec = make_tiny_data(tmp_path)
    cfg = tiny_config(spec, metrics={"probes": 1, "recal_batches": 1, "batch_size": 32, "eval_images": 32})
    cfg["stages"] = cfg["stages"][:1]
    cfg["stages"][0].update(max_steps=2, speed={"bf16": True, "channels_last": True, "batched_paths": False})
    res = train(cfg, out=tmp_path / "run")
    ck = load_checkpoint(res.final_checkpoint)
    assert all(t.dtype != torch.bfloat16 for t in ck.state_dict.values())  # fp32 weights, bf16 arithmetic
    assert all(torch.isfinite(t).all() for t in ck.state_dict.values())
    assert ck.state_dict["stem.weight"].is_contiguous()
    rec = json.loads(res.metrics_file.read_text().splitlines()[-1])
    assert math.isfinite(rec["loss"]) and 0 <= rec["probe_acc"]["largest"] <= 1
