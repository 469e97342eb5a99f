"""Training config: schema validation with key paths and file names, presets, resume diffs."""
from pathlib import Path

import pytest
import yaml

from fastsupernet.training import ConfigError, config_diff, load_config

from train_tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["track1_seed.yaml", "track1_baseline.yaml", "mini_seed.yaml", "mini_baseline.yaml"]


def write(tmp_path: Path, doc: dict, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.stages and cfg.source.endswith(name)
    for st in cfg.stages:
        st.supernet.build()


def test_seed_preset_follows_the_method():
    cfg = load_config(ROOT / "configs" / "track1_seed.yaml")
    assert cfg.data.startswith("cifar100:")
    assert [tuple(s.supernet.branches) for s in cfg.stages] == [(1, 1, 1), (1, 1, 1), (4, 4, 4), (4, 8, 16)]
    assert [s.epochs for s in cfg.stages] == [300, 300, 300, 100]
    assert [s.optimizer.lr for s in cfg.stages] == [0.1, 0.01, 1e-3, 1e-3]
    assert cfg.stages[1].max_recover.probes == 5 and cfg.stages[1].sampling.paths == 8
    assert cfg.stages[2].loss.teacher == "frozen" and cfg.stages[3].loss.teacher == "live"
    assert all(s.supernet.build().residual_activation == "prelu" for s in cfg.stages)
    base = load_config(ROOT / "configs" / "track1_baseline.yaml")
    assert len(base.stages) == 1 and base.stages[0].sampling.rule == "uniform" and base.stages[0].sampling.paths == 1


def test_defaults_and_yaml_float(tmp_path):
    doc = tiny_config("fashion-mnist")
    text = yaml.safe_dump(doc).replace("lr: 0.02", "lr: 2e-2")
    p = tmp_path / "c.yaml"
    p.write_text(text)
    cfg = load_config(p)
    assert cfg.stages[1].optimizer.lr == pytest.approx(0.02)
    assert cfg.stages[0].optimizer.momentum == 0.9 and cfg.stages[0].init == "scratch"
    assert load_config(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert load_config({**doc, "data": "fashion-mnist@14"}).data == "fashion-mnist@14"  # resized at load


@pytest.mark.parametrize(
    "mutate, path, words",
    [
        (lambda d: d["stages"][1]["optimizer"].update(lrr=0.1), "stages[1].optimizer.lrr", "unknown key"),
        (lambda d: d["stages"][1]["optimizer"].update(lr="fast"), "stages[1].optimizer.lr", "expected a number"),
        (lambda d: d["stages"][0].update(epochs=1.5), "stages[0].epochs", "expected an integer"),
        (lambda d: d["stages"][1]["sampling"].update(rule="random"), "stages[1].sampling.rule", "'uniform'"),
        (lambda d: d.update(seeed=1), "seeed", "unknown key"),
        (lambda d: d["stages"][0]["supernet"].pop("branches"), "stages[0].supernet.branches", "missing"),
        (lambda d: d["stages"][0]["supernet"].update(branches=[1, 1]), "stages[0].supernet.branches", "one branch count"),
        (lambda d: d["stages"][0]["supernet"].update(branches=[1, 1, 17]), "stages[0].supernet.branches[2]", "between 1 and 16"),
        (lambda d: d["stages"][0].update(init="previous"), "stages[0].init", "no previous stage"),
        (lambda d: d["stages"][1]["supernet"].update(enhanced=False), "stages[1].supernet", "width_map"),
        (lambda d: d["stages"][1]["sampling"].update(rule="sandwich", paths=1), "stages[1].sampling.paths", "sandwich"),
        (lambda d: d["stages"][1]["loss"].update(alpha=2), "stages[1].loss.alpha", "[0, 1]"),
        (lambda d: d.update(data="imagenet"), "data", "unknown data name"),
        (lambda d: d["stages"].append(d["stages"][1]), "stages[2].name", "unique"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, mutate, path, words):
    doc = tiny_config("fashion-mnist")
    mutate(doc)
    p = write(tmp_path, doc, "bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and f" {path}:" in msg and words in msg, msg


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(p)
    p.write_text("stages: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_config_diff_names_changed_keys():
    a = load_config(tiny_config("fashion-mnist")).to_dict()
    doc = tiny_config("fashion-mnist")
    doc["stages"][1]["optimizer"]["lr"] = 0.5
    doc["seed"] = 9
    b = load_config(doc).to_dict()
    assert config_diff(a, b) == ["seed", "stages[1].optimizer.lr"]
    assert config_diff(a, a) == []
