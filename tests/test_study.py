"""The ranking study (budgets, correlations, outputs, reuse) and the study and demo commands."""
from __future__ import annotations

import json
import math
import random

import pytest
import yaml

from fastsupernet.cli import main
from fastsupernet.io import read_scores, write_submission
from fastsupernet.metrics import kendall_tau, pearson, spearman
from fastsupernet.study import (
    StudyError,
    load_pipeline_config,
    path_images,
    paths_per_step,
    preset_path,
    run_study,
    seed_agreement,
    shrink_config,
    spread_candidates,
    stage_steps,
)
from train_tiny import make_tiny_data

# shrunk mini presets: 2 steps of 16 images per stage
TINY = {"max_steps": 2, "train_images": 256, "batch_size": 16}


def write_synthetic_gt(path, n: int = 8, seeds: int = 2, seed: int = 0, data: str = "fashion-mnist"):
    """A ground truth whose accuracies grow with multiply-adds, per-seed noise on top."""
    rng = random.Random(seed)
    scores = {}
    for i, (key, arch) in enumerate(spread_candidates(n, pool=2000, seed=seed).items()):
        accs = [0.6 + 0.03 * i + rng.gauss(0, 0.02) for _ in range(seeds)]
        scores[key] = {"arch": arch, "acc": sum(accs) / seeds, "accs": accs, "losses": [1.0] * seeds}
    write_submission(path, scores, {"recipe": {"data": data, "resolution": 14, "shortcut": "all"},
                                    "seeds": list(range(seeds))})
    return path


# ----------------------------------------------------------------------------- budgets


def test_presets_resolve_by_name_and_the_mini_pair_is_at_equal_budget():
    seed, base = load_pipeline_config("mini_seed"), load_pipeline_config("mini_baseline")
    assert preset_path("mini_seed").name == "mini_seed.yaml"
    # bundled data: 12,000 training images, batch 128 -> 93 steps per epoch.
    # seed: fullwidth 2 epochs x 1 path; singlepath 3 uniform + the live teacher's largest + 2
    # max-recover probes = 6; multibranch 3 + largest (train_largest) = 4; morebranches 3 + 1 = 4.
    assert [paths_per_step(st) for st in seed.stages] == [1, 6, 4, 4]
    assert stage_steps(seed, 12000) == [186, 93, 93, 93]
    assert path_images(seed, num_train=12000) == 128 * (186 * 1 + 93 * 6 + 93 * 4 + 93 * 4) == 190_464
    # baseline: 16 epochs x 93 steps x 1 path
    assert path_images(base, num_train=12000) == 16 * 93 * 128 == 190_464
    assert path_images("mini_baseline") == 190_464  # counts the bundled data itself


def test_budget_counts_max_steps_train_images_and_sampling_rules():
    cfg = shrink_config("mini_seed", max_steps=3, train_images=40, batch_size=16)
    # 40 images / 16 = 2 steps per epoch, 1 epoch: max_steps 3 does not bind
    assert stage_steps(cfg, 12000) == [2, 2, 2, 2]
    assert path_images(cfg, num_train=12000) == 2 * 16 * (1 + 6 + 4 + 4)
    d = cfg.to_dict()
    d["stages"][1]["sampling"] = {"rule": "sandwich", "paths": 4}  # largest already sampled first
    d["stages"][1]["max_recover"] = {"probes": 0}
    d["stages"][2]["loss"]["train_largest"] = False  # frozen teacher, largest path not trained
    assert [paths_per_step(st) for st in load_pipeline_config(d).stages] == [1, 4, 3, 4]
    with pytest.raises(StudyError, match=r"stages\[0\].batch_size 16 exceeds the 10 training images"):
        stage_steps(cfg, 10)


def test_preset_and_config_errors_name_what_was_looked_for(tmp_path):
    with pytest.raises(StudyError, match="no training preset named 'nope'.*configs"):
        preset_path("nope")
    with pytest.raises(ValueError, match="no such config file"):
        load_pipeline_config(str(tmp_path / "missing.yaml"))


def test_seed_agreement_is_the_mean_pairwise_tau():
    a = [[0.1, 0.2, 0.1], [0.3, 0.1, 0.2], [0.5, 0.6, 0.4], [0.7, 0.8, 0.9]]
    cols = list(zip(*a))
    want = (kendall_tau(cols[0], cols[1]) + kendall_tau(cols[0], cols[2]) + kendall_tau(cols[1], cols[2])) / 3
    assert seed_agreement(a) == pytest.approx(want)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_agreement([[0.1], [0.2]])


# ----------------------------------------------------------------------------- the study


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """One study of two shrunk mini pipelines on tiny 8x8 data, against a synthetic ground truth."""
    root = tmp_path_factory.mktemp("study")
    data = make_tiny_data(root, train=320, test=64)
    gt = write_synthetic_gt(root / "gt.json")
    configs = {name: shrink_config(load_pipeline_config(preset).replace(data=data), **TINY)
               for name, preset in (("baseline", "mini_baseline"), ("seed", "mini_seed"))}
    res = run_study(gt, configs, root / "out", eval_images=64, progress=False)
    return root, gt, configs, res


def test_study_writes_its_files_and_numbers_in_range(tiny_study):
    root, gt, _, res = tiny_study
    out = root / "out"
    assert res.study_json == out / "study.json" and res.study_md == out / "study.md"
    doc = json.loads(res.study_json.read_text())
    assert set(doc["pipelines"]) == {"baseline", "seed"}
    for name, p in doc["pipelines"].items():
        assert (out / name / "final.pt").is_file() and (out / name / "ranking.json").is_file()
        png = out / f"scatter_{name}.png"
        assert p["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p["trained"] is True and p["path_images"] > 0 and p["rank_seconds"] >= 0
        for key in ("kendall_tau", "spearman", "pearson"):
            assert p[key] is None or -1.0 <= p[key] <= 1.0
        assert len(p["predictions"]) == 8 and all(0.0 <= v <= 1.0 for v in p["predictions"].values())
    for by in ("channels", "params", "macs"):
        assert -1.0 <= doc["proxies"][by]["kendall_tau"] <= 1.0
    assert doc["proxy_shape"]["resolution"] == 14  # the ground truth's recipe resolution
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp file behind
    table = res.study_md.read_text()
    for row in ("| baseline", "| seed", "| proxy: channels", "| proxy: params", "| proxy: macs", "| ceiling"):
        assert row in table


def test_study_correlations_recompute_from_its_json(tiny_study):
    _, gt, _, res = tiny_study
    doc = json.loads(res.study_json.read_text())
    truth = read_scores(gt)
    ids = list(truth)
    y = [truth[i].acc for i in ids]
    assert doc["ground_truth"]["acc"] == {i: truth[i].acc for i in ids}
    for name, p in doc["pipelines"].items():
        pred = [p["predictions"][i] for i in ids]
        ranked = read_scores(res.pipelines[name].ranking)
        assert pred == [ranked[i].acc for i in ids]
        for key, fn in (("kendall_tau", kendall_tau), ("spearman", spearman), ("pearson", pearson)):
            want = fn(pred, y)
            assert (p[key] is None and math.isnan(want)) or p[key] == pytest.approx(want, abs=1e-12)
    per_seed = [truth[i].extra["accs"] for i in ids]
    assert doc["ceiling"]["kendall_tau"] == pytest.approx(kendall_tau([a[0] for a in per_seed], [a[1] for a in per_seed]))
    assert doc["ceiling"]["seeds"] == 2


def test_study_budgets_and_mismatch_warning(tiny_study):
    _, _, configs, res = tiny_study
    doc = json.loads(res.study_json.read_text())
    # 2 steps x 16 images per stage: baseline 1 path; seed 1 + 6 + 4 + 4 paths
    assert doc["pipelines"]["baseline"]["path_images"] == 2 * 16 * 1 == path_images(configs["baseline"])
    assert doc["pipelines"]["seed"]["path_images"] == 2 * 16 * 15 == path_images(configs["seed"])
    assert doc["pipelines"]["seed"]["stage_path_images"] == [32, 192, 128, 128]
    measured = doc["pipelines"]["seed"]["path_images_measured"]
    assert 2 * 16 * 13 <= measured <= 2 * 16 * 15  # max-recover as it happened, within its bound
    warning = doc["budget"]["warning"]
    assert warning and "differ by 1400.0%" in warning and res.budget_warning == warning
    assert "(!)" in res.study_md.read_text()


def test_study_command_reuses_finished_runs(tiny_study, capsys):
    root, gt, configs, res = tiny_study
    before = {n: (root / "out" / n / "final.pt").stat().st_mtime_ns for n in configs}
    files = []
    for name, cfg in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        files += ["--config", f"{name}={path}"]
    rc = main(["study", "--gt", str(gt), *files, "--out-dir", str(root / "out"), "--eval-images", "64",
               "--resume", "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    for name in configs:
        assert out["pipelines"][name]["trained"] is False
        assert (root / "out" / name / "final.pt").stat().st_mtime_ns == before[name]
        assert out["pipelines"][name]["kendall_tau"] == pytest.approx(res.pipelines[name].kendall_tau, nan_ok=True)
    assert out["ceiling"] == pytest.approx(res.ceiling)
    assert out["study_md"] == str(root / "out" / "study.md") and out["budget_warning"]


def test_study_refuses_a_finished_run_of_another_config(tiny_study):
    root, gt, configs, _ = tiny_study
    other = configs["baseline"].to_dict()
    other["stages"][0]["optimizer"]["lr"] = 0.05
    with pytest.raises(StudyError, match=r"different config \(differs at stages\[0\].optimizer.lr\)"):
        run_study(gt, {"baseline": other}, root / "out", eval_images=64, progress=False)


def test_study_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["study", "--gt", str(tmp_path / "none.json"), "--out-dir", str(tmp_path)]) == 2
    assert "none.json: no such ground-truth file" in capsys.readouterr().err
    gt = write_synthetic_gt(tmp_path / "gt.json")
    assert main(["study", "--gt", str(gt), "--out-dir", str(tmp_path), "--config", "a=mini_seed", "--config", "a=x"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["study", "--gt", str(gt), "--out-dir", str(tmp_path), "--config", "a=nope"]) == 2
    assert "no training preset named 'nope'" in capsys.readouterr().err
    # the bundled data's recalibration split is 10% of 12,000 images: refused before any training
    assert main(["study", "--gt", str(gt), "--out-dir", str(tmp_path / "o"), "--config", "a=mini_seed",
                 "--recal-images", "1201"]) == 2
    assert "recal_images 1201 exceeds the 1200 images of the recalibration split" in capsys.readouterr().err
    assert not (tmp_path / "o" / "a").exists()


# ----------------------------------------------------------------------------- the demo


def test_demo_quick_prints_tau_and_writes_the_plot(tmp_path, capsys):
    gt = write_synthetic_gt(tmp_path / "gt.json", n=6)
    rc = main(["demo", "--quick", "--gt", str(gt), "--out-dir", str(tmp_path / "demo"), "--recal-images", "32",
               "--eval-images", "64", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    seed = out["pipelines"]["seed"]
    assert set(out["pipelines"]) == {"seed"} and out["candidates"] == 6
    assert seed["kendall_tau"] is None or -1.0 <= seed["kendall_tau"] <= 1.0
    assert "Kendall tau" in captured.err and "ceiling" in captured.err
    assert (tmp_path / "demo" / "scatter_seed.png").is_file() and seed["plot"] == str(tmp_path / "demo" / "scatter_seed.png")
    doc = json.loads((tmp_path / "demo" / "study.json").read_text())
    assert doc["pipelines"]["seed"]["path_images"] == 2 * 32 * 15  # QUICK_TRAINING: 2 steps of 32 per stage
    assert doc["protocol"] == {"recal_images": 32, "eval_images": 64, "engine": "fast"}


def test_demo_without_the_shipped_ground_truth_names_the_file(tmp_path, capsys, monkeypatch):
    import fastsupernet.study as study

    missing = tmp_path / "resources" / "mini_gt.json"
    monkeypatch.setattr(study, "shipped_ground_truth_path", lambda: missing)
    assert main(["demo", "--quick", "--out-dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "--gt" in err
    assert not (tmp_path / "demo").exists()  # nothing trained or written


def test_shipped_ground_truth_is_the_benchmarks_computed_file():
    """The shipped mini ground truth: the 100 benchmark candidates, two seeds each, made with the
    recorded recipe, its accuracies the means of its per-seed values (never recomputed here)."""
    from pathlib import Path

    from fastsupernet.io import read_candidates, read_meta
    from fastsupernet.standalone import load_recipe
    from fastsupernet.study import shipped_ground_truth_path

    shipped = shipped_ground_truth_path()
    if not shipped.is_file():
        pytest.skip(f"{shipped} is not shipped yet (benchmarks/mini_gt/README.md: being computed)")
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "mini_gt"
    cands = read_candidates(bench / "candidates100.json")
    raw = json.loads(shipped.read_text())
    gt = {k: v for k, v in raw.items() if k != "_meta"}
    assert set(gt) == set(cands)
    for k, v in gt.items():
        assert v["arch"] == str(cands[k])
        assert len(v["accs"]) == 2 and all(0.0 < a < 1.0 for a in v["accs"])
        assert v["acc"] == pytest.approx(sum(v["accs"]) / 2, abs=1e-12)
    meta = read_meta(shipped)
    assert meta["seeds"] == [0, 1]
    assert load_recipe(meta["recipe"]) == load_recipe(bench / "recipe_pilotC.yaml")
