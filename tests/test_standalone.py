"""Stand-alone training, the journal it streams to, and the groundtruth command."""
from __future__ import annotations

import json

import pytest
import torch

from fastsupernet import Track1Space, read_scores
from fastsupernet.cli import main
from fastsupernet.io import read_meta, write_candidates
from fastsupernet.journal import Journal, JournalError, fingerprint_diff
from fastsupernet.standalone import (
    RecipeError,
    groundtruth,
    load_recipe,
    prepare_standalone_data,
    train_candidate,
)
from fastsupernet.study import spread_candidates

from torchrun_cli import assert_succeeded, run_torchrun

TINY = {"data": "fashion-mnist@7", "train_images": 256, "epochs": 1, "batch_size": 64}


@pytest.fixture(scope="module")
def tiny_data():
    return prepare_standalone_data(load_recipe(TINY))


def test_recipe_defaults_and_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("epochs: 3\nlr: 1\ntrain_images: null\n")
    r = load_recipe(p)
    assert r.epochs == 3 and r.lr == 1.0 and isinstance(r.lr, float) and r.train_images is None
    assert load_recipe(None) == load_recipe({})


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"epoch": 3}, "unknown key 'epoch'"),
        ({"epochs": "3"}, "key 'epochs' must be int"),
        ({"epochs": True}, "key 'epochs' must be int"),
        ({"lr": -0.1}, "key 'lr' must be positive"),
        ({"shortcut": "none"}, "key 'shortcut'"),
        ({"train_images": 0}, "key 'train_images'"),
    ],
)
def test_recipe_errors_name_the_key(raw, needle):
    with pytest.raises(RecipeError, match=needle):
        load_recipe(raw)


def test_recipe_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("epochs: [1\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        load_recipe(p)
    p.write_text("- 1\n")
    with pytest.raises(RecipeError, match="bad.yaml: expected a mapping"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="missing.yaml"):
        load_recipe(tmp_path / "missing.yaml")


def test_data_resized_subset_fixed(tiny_data):
    d = tiny_data
    assert tuple(d.train_x.shape) == (256, 1, 7, 7) and d.test_x.shape[-1] == 7
    again = prepare_standalone_data(load_recipe(TINY))
    assert torch.equal(d.train_y, again.train_y) and torch.equal(d.train_x, again.train_x)
    with pytest.raises(RecipeError, match="train_images"):
        prepare_standalone_data(load_recipe({"train_images": 10**7}))


def test_train_candidate_seeded_and_learns(tiny_data):
    sp = Track1Space()
    arch = sp.parse("8-8-8-8-8-8-8-16-16-16-16-16-16-32-32-32-32-32-32-32")
    r = load_recipe(dict(TINY, epochs=6, batch_size=32, lr=0.05, crop_padding=0))
    torch.set_num_threads(1)
    a = train_candidate(arch, r, 0, tiny_data, sp)
    b = train_candidate(arch, r, 0, tiny_data, sp)
    c = train_candidate(arch, r, 1, tiny_data, sp)
    assert (a.acc, a.loss) == (b.acc, b.loss)  # a seed fixes init, order and augmentation
    assert (a.acc, a.loss) != (c.acc, c.loss)
    assert a.acc > 0.3  # 10 classes: chance is 0.1
    assert 0 < a.loss < 2.3


def test_journal_resume_torn_line_and_fingerprint(tmp_path):
    p = tmp_path / "j.journal"
    with Journal(p, {"a": 1, "b": {"c": 2}}, resume=False) as j:
        j.append({"x": 1})
        j.append({"x": 2})
    with open(p, "ab") as f:
        f.write(b'{"x": 3, "tor')  # killed mid-write
    with pytest.raises(JournalError, match="earlier run"):
        Journal(p, {"a": 1, "b": {"c": 2}}, resume=False)
    with pytest.raises(JournalError, match=r"changed: b\.c"):
        Journal(p, {"a": 1, "b": {"c": 3}}, resume=True)
    with Journal(p, {"a": 1, "b": {"c": 2}}, resume=True) as j:
        assert j.records == [{"x": 1}, {"x": 2}]
        j.append({"x": 3})
    lines = p.read_text().splitlines()
    assert [json.loads(s) for s in lines[1:]] == [{"x": 1}, {"x": 2}, {"x": 3}]
    assert fingerprint_diff({"a": 1}, {"a": 1, "z": 0}) == ["z"]


def test_groundtruth_resume_dedup_and_cli(tmp_path):
    sp = Track1Space()
    a, b = sp.sample_many(2, seed=3)
    twin = sp.parse("-".join(map(str, a.widths)) + "-4")
    archs = {"arch1": a, "arch2": b, "arch3": twin}
    cand = tmp_path / "c.json"
    write_candidates(cand, archs)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in TINY.items()))
    out = tmp_path / "gt.json"
    res = groundtruth({"arch1": a}, out, recipe, seeds=[0], progress=False)
    assert res.trained == 1
    # CLI, resuming the journal: arch1/seed 0 reused; arch3 is arch1's network.
    assert main(["groundtruth", "--archs", str(cand), "--out", str(out), "--config", str(recipe),
                 "--seeds", "0,1", "--resume", "--no-progress"]) == 0
    gt = read_scores(out)
    assert set(gt) == {"arch1", "arch2", "arch3"}
    raw = json.loads(out.read_text())
    assert raw["arch1"]["accs"] == raw["arch3"]["accs"] and len(raw["arch1"]["accs"]) == 2
    assert raw["arch1"]["acc"] == pytest.approx(sum(raw["arch1"]["accs"]) / 2)
    assert read_meta(out)["seeds"] == [0, 1] and read_meta(out)["recipe"]["epochs"] == 1
    lines = (tmp_path / "gt.json.journal").read_text().splitlines()
    assert len(lines) == 1 + 4  # fingerprint + 2 networks x 2 seeds
    # a different recipe is refused, naming the key; the earlier output stays
    before = out.read_bytes()
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in dict(TINY, epochs=2).items()))
    assert main(["groundtruth", "--archs", str(cand), "--out", str(out), "--config", str(recipe),
                 "--resume", "--no-progress"]) == 2
    assert out.read_bytes() == before
    assert main(["groundtruth", "--archs", str(cand), "--out", str(out), "--seeds", "x"]) == 2


def test_spread_candidates_cover_the_range():
    sp = Track1Space()
    c = spread_candidates(20, seed=0, pool=2000)
    assert list(c) == [f"arch{i}" for i in range(1, 21)]
    macs = sp.costs(list(c.values()))[0]
    assert all(x < y for x, y in zip(macs, macs[1:]))
    full = sp.costs([sp.smallest(), sp.largest()])[0]
    # from near the smallest network to near the largest, evenly spaced
    assert macs[0] < full[0] * 1.5 and macs[-1] > full[1] * 0.9
    step = (macs[-1] - macs[0]) / 19
    assert max(abs(m - (macs[0] + i * step)) for i, m in enumerate(macs)) < 0.25 * step
    assert spread_candidates(20, seed=0, pool=2000) == c
    assert spread_candidates(20, seed=1, pool=2000) != c


def test_groundtruth_torchrun_two_ranks_match_one(tmp_path):
    import os
    import subprocess
    import sys

    sp = Track1Space()
    cand = tmp_path / "c.json"
    write_candidates(cand, {f"arch{i + 1}": a for i, a in enumerate(sp.sample_many(3, seed=5))})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in TINY.items()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["groundtruth", "--archs", str(cand), "--config", str(recipe), "--seeds", "0,1", "--no-progress"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "fastsupernet", *common, "--out", str(one)], env=env, check=True,
                   capture_output=True)
    r = run_torchrun([*common, "--out", str(two)], tmp_path / "logs", env=env)
    assert_succeeded(r, tmp_path / "logs")
    assert len([line for line in r.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 reports
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert {k: v for k, v in a.items() if k != "_meta"} == {k: v for k, v in b.items() if k != "_meta"}
    j0, j1 = (tmp_path / "two.json.journal").read_text(), (tmp_path / "two.json.journal.1").read_text()
    n0, n1 = len(j0.splitlines()) - 1, len(j1.splitlines()) - 1
    assert n0 >= 1 and n1 >= 1 and n0 + n1 == 6  # 3 networks x 2 seeds, shared by the two ranks


def test_train_candidates_packed_equals_one_at_a_time(tiny_data):
    """Several candidates trained at once through multi_conv2d: in float64 each result is the
    one-at-a-time result (same init, batches, augmentation, BN running statistics, SGD)."""
    import dataclasses

    from fastsupernet.standalone import train_candidates

    sp = Track1Space()
    archs = sp.sample_many(3, seed=11) + [sp.parse("4-4-4-4-4-4-4-4-4-4-4-4-4-4-4-4-4-4-4-4")]
    r = load_recipe(dict(TINY, epochs=2, batch_size=64, lr=0.05, crop_padding=1))
    d64 = dataclasses.replace(tiny_data, train_x=tiny_data.train_x.double(), test_x=tiny_data.test_x.double())
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        nets = []
        packed = train_candidates(archs, r, 1, d64, sp, nets_out=nets)
        single = [train_candidate(a, r, 1, d64, sp) for a in archs]
    finally:
        torch.set_default_dtype(old)
    assert len(nets) == len(archs) and all(n.run_widths == a.widths for n, a in zip(nets, archs))
    for p, s in zip(packed, single):
        assert p.acc == pytest.approx(s.acc, abs=1e-12)
        assert p.loss == pytest.approx(s.loss, rel=1e-9)
    assert len({round(p.loss, 6) for p in packed}) == len(archs)  # four different networks


def test_groundtruth_pack_journals_every_training(tmp_path):
    sp = Track1Space()
    archs = {f"arch{i}": a for i, a in enumerate(sp.sample_many(3, seed=4), 1)}
    out = tmp_path / "gt.json"
    res = groundtruth(archs, out, TINY, seeds=[0, 1], progress=False, pack=2)
    assert res.trained == 6
    raw = json.loads(out.read_text())
    assert all(len(raw[k]["accs"]) == 2 and 0 < raw[k]["acc"] < 1 for k in archs)
    with pytest.raises(ValueError, match="pack"):
        groundtruth(archs, tmp_path / "x.json", TINY, pack=0)
