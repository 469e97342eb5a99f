import os
import pickle
import random

import pytest
import torch

from fastsupernet.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from fastsupernet.space import Track1Space
from fastsupernet.supernet import Supernet, SupernetConfig

DATA = {"spec": "fashion-mnist", "name": "fashion-mnist", "in_channels": 1, "num_classes": 10, "resolution": 28,
        "mean": [0.286], "std": [0.353], "hflip": True}


def make_net(seed=0):
    torch.manual_seed(seed)
    return Supernet(Track1Space(), SupernetConfig.enhanced((2, 4, 8), 4), in_channels=1, num_classes=10)


def test_round_trip_restores_everything(tmp_path):
    net = make_net()
    net.train()
    net(torch.randn(4, 1, 8, 8), Track1Space().sample(0))  # move some running statistics
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 1, 8, 8), Track1Space().largest()).sum().backward()
    opt.step()
    train_state = {"optimizer": opt.state_dict(), "step": 7, "stage": 1, "rng": capture_rng_state()}
    path = save_checkpoint(tmp_path / "a.pt", net, data=DATA, train_state=train_state, meta={"command": "test"})
    ck = load_checkpoint(path)
    assert ck.space == Track1Space() and ck.config == net.config
    assert ck.in_channels == 1 and ck.num_classes == 10 and ck.data == DATA
    assert ck.meta == {"command": "test"} and ck.train_state["step"] == 7
    net2 = ck.build_supernet().eval()
    net.eval()
    x = torch.randn(3, 1, 8, 8)
    for arch in Track1Space().sample_many(3, seed=1):
        torch.testing.assert_close(net2(x, arch), net(x, arch), rtol=0, atol=0)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ck.train_state["optimizer"])
    assert len(opt2.state) == len(opt.state)


def test_loads_with_weights_only_and_no_pickled_code(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", make_net(), data=DATA)
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "fastsupernet.checkpoint" and obj["version"] == 1


class Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def test_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "fastsupernet.checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not (tmp_path / "EVIL_RAN").exists()


def test_truncated_foreign_and_missing_files(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", make_net(), data=DATA)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pt: not a readable fastsupernet checkpoint"):
        load_checkpoint(trunc)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a fastsupernet checkpoint \(expected a dict with format"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    obj = torch.load(good, weights_only=True)
    obj["version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(obj, newer)
    with pytest.raises(CheckpointError, match="newer.pt: checkpoint format version 99"):
        load_checkpoint(newer)
    obj["version"] = 1
    del obj["state_dict"]
    torch.save(obj, newer)
    with pytest.raises(CheckpointError, match=r"lacks required key\(s\) \['state_dict'\]"):
        load_checkpoint(newer)


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "a.pt", make_net(), data=DATA)
    obj = torch.load(path, weights_only=True)
    obj["supernet"]["branches"] = [1, 1, 1]
    torch.save(obj, path)
    ck = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="a.pt: weights do not fit"):
        ck.build_supernet()


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "a.pt", make_net(0), data=DATA, meta={"n": 1})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_net(1), data=DATA, meta={"n": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left behind
    monkeypatch.undo()
    assert load_checkpoint(path).meta == {"n": 1}


def test_rng_state_round_trip(tmp_path):
    random.seed(5)
    torch.manual_seed(5)
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    a = (random.random(), torch.rand(3))
    restore_rng_state(torch.load(path, weights_only=True))
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert pickle.loads(pickle.dumps(a[0])) == b[0]
