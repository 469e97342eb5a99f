import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fastsupernet import io as fio
from fastsupernet.cli import main
from fastsupernet.io import Score
from fastsupernet.space import Track1Space

ROOT = Path(__file__).resolve().parents[1]
SPACE = Track1Space()
A1 = "16-4-12-16-8-16-16-24-12-8-16-4-32-52-52-52-20-40-8-44"
EVAL_KEYS = {"kendall_tau", "spearman", "pearson", "top10_overlap", "n", "missing", "mismatched"}
SPACE_KEYS = {"count", "unique_networks", "macs_min", "macs_mean", "macs_max", "params_min", "params_mean", "params_max"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "fastsupernet", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def one_json(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def gt():
    return fio.read_scores(fio.ground_truth_path())


@pytest.fixture()
def perturbed(tmp_path, gt):
    rng = np.random.default_rng(7)
    noisy = {i: Score(s.arch, float(np.clip(s.acc + rng.normal(0, 0.03), 0, 1))) for i, s in gt.items()}
    p = tmp_path / "pred.json"
    fio.write_submission(p, noisy, meta={"what": "noisy copy"})
    return p, noisy


# ---------------------------------------------------------------------------- evaluate
def test_evaluate_subprocess_matches_scipy(perturbed, gt):
    p, noisy = perturbed
    r = run_cli("evaluate", str(p), "gt1000")
    assert r.returncode == 0, r.stderr
    d = one_json(r.stdout)
    assert set(d) == EVAL_KEYS
    x = [noisy[i].acc for i in gt]
    y = [gt[i].acc for i in gt]
    assert d["kendall_tau"] == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)
    assert d["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert d["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert d["n"] == 1000 and d["missing"] == 0 and d["mismatched"] == 0
    assert 0 <= d["top10_overlap"] <= 1


def test_evaluate_main_gt_vs_itself(capsys):
    assert main(["evaluate", "gt1000", str(fio.ground_truth_path())]) == 0
    d = one_json(capsys.readouterr().out)
    assert d["kendall_tau"] == 1.0 and d["top10_overlap"] == 1.0 and d["n"] == 1000


def test_evaluate_main_counts_missing_and_mismatched(tmp_path, gt, capsys):
    items = list(gt.items())
    pred = dict(items[:900])  # 100 missing
    other = SPACE.parse(A1)
    for i, _ in items[:5]:
        pred[i] = Score(other if str(gt[i].arch) != A1 else SPACE.smallest(), pred[i].acc)
    p = tmp_path / "pred.json.gz"
    fio.write_submission(p, pred)
    assert main(["evaluate", str(p), "gt1000", "--k", "20"]) == 0
    d = one_json(capsys.readouterr().out)
    assert d["missing"] == 100 and d["mismatched"] == 5 and d["n"] == 895
    assert d["kendall_tau"] == pytest.approx(1.0) and d["top20_overlap"] == 1.0


def test_evaluate_percent_prediction(tmp_path, gt, capsys):
    p = tmp_path / "pct.json"
    p.write_text(json.dumps({i: {"arch": str(s.arch), "acc": round(s.acc * 100, 4)} for i, s in gt.items()}))
    assert main(["evaluate", str(p), "gt1000"]) == 0
    assert one_json(capsys.readouterr().out)["kendall_tau"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- space
def test_space_official_subprocess():
    r = run_cli("space", "official")
    assert r.returncode == 0, r.stderr
    d = one_json(r.stdout)
    assert set(d) == SPACE_KEYS
    assert d["count"] == 50000 and d["unique_networks"] == 50000
    for k in ("macs_min", "macs_max", "params_min", "params_max"):
        assert isinstance(d[k], int)
    assert isinstance(d["macs_mean"], float) and isinstance(d["params_mean"], float)
    assert d["macs_min"] < d["macs_mean"] < d["macs_max"]
    assert d["params_min"] < d["params_mean"] < d["params_max"]


def test_space_main_matches_space_formulas(tmp_path, capsys):
    archs = SPACE.sample_many(40, seed=3) + [SPACE.parse(A1), SPACE.parse(A1)]
    p = tmp_path / "c.json"
    fio.write_candidates(p, archs)
    assert main(["space", str(p)]) == 0
    d = one_json(capsys.readouterr().out)
    macs = [SPACE.macs(a) for a in archs]
    params = [SPACE.params(a) for a in archs]
    assert d["count"] == 42 and d["unique_networks"] == 41
    assert (d["macs_min"], d["macs_max"]) == (min(macs), max(macs))
    assert (d["params_min"], d["params_max"]) == (min(params), max(params))
    assert d["macs_mean"] == pytest.approx(np.mean(macs)) and d["params_mean"] == pytest.approx(np.mean(params))
    # other shapes
    assert main(["space", str(p), "--resolution", "64", "--in-channels", "1", "--num-classes", "10"]) == 0
    d = one_json(capsys.readouterr().out)
    assert d["macs_max"] == max(SPACE.macs(a, resolution=64, in_channels=1, num_classes=10) for a in archs)
    assert d["params_max"] == max(SPACE.params(a, in_channels=1, num_classes=10) for a in archs)


def test_unique_networks_ignore_trailing_position(tmp_path, capsys):
    a = SPACE.parse(A1)
    b = SPACE.parse(list(a.widths) + [4])
    p = tmp_path / "c.json"
    fio.write_candidates(p, [a, b])
    assert main(["space", str(p)]) == 0
    d = one_json(capsys.readouterr().out)
    assert d["count"] == 2 and d["unique_networks"] == 1


# ---------------------------------------------------------------------------- errors
def _bad_file(tmp_path: Path) -> Path:
    p = tmp_path / "broken.json"
    p.write_text(json.dumps({"arch1": {"arch": A1, "acc": 0.5}, "arch2": {"arch": A1[:-2] + "99", "acc": 0.4}}))
    return p


def test_bad_file_subprocess(tmp_path):
    p = _bad_file(tmp_path)
    r = run_cli("space", str(p))
    assert r.returncode == 2
    assert r.stdout == ""
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in r.stderr
    assert str(p) in err and "'arch2'" in err and "position 20 value 99" in err


def test_bad_file_main(tmp_path, capsys):
    p = _bad_file(tmp_path)
    assert main(["evaluate", str(p), "gt1000"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.startswith("error: ") and str(p) in cap.err and "'arch2'" in cap.err
    assert main(["evaluate", "gt1000", str(tmp_path / "none.json")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
    p2 = tmp_path / "notjson.json"
    p2.write_text("{oops")
    assert main(["space", str(p2)]) == 2
    assert "notjson.json: not valid JSON" in capsys.readouterr().err


def test_usage_errors_and_help(tmp_path, capsys):
    assert main([]) == 2
    assert main(["nope"]) == 2
    assert main(["evaluate", "gt1000"]) == 2
    assert main(["evaluate", "gt1000", "gt1000", "--k", "0"]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err
    assert main(["space", "official", "--space", "track9"]) == 2
    assert "unknown space" in capsys.readouterr().err
    p = tmp_path / "empty.json"
    p.write_text("{}")
    assert main(["space", str(p)]) == 2
    assert "holds no architectures" in capsys.readouterr().err
    assert main(["evaluate", str(p), "gt1000"]) == 2
    assert "need at least 2" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "evaluate" in out and "space" in out and "official" in out and "gt1000" in out
    assert main(["space", "--help"]) == 0
    assert "official" in capsys.readouterr().out


def test_help_subprocess():
    r = run_cli("--help")
    assert r.returncode == 0 and "evaluate" in r.stdout


# ---------------------------------------------------------------------------- proxy
def test_proxy_channels_matches_literature_tau(tmp_path, capsys):
    out = tmp_path / "proxy.json"
    assert main(["proxy", "gt1000", "--by", "channels", "--out", str(out)]) == 0
    assert one_json(capsys.readouterr().out) == {"out": str(out), "count": 1000, "proxy": "channels"}
    pred = fio.read_scores(out)
    assert min(s.acc for s in pred.values()) == 0.0 and max(s.acc for s in pred.values()) == 1.0
    assert fio.read_meta(out)["proxy"] == "channels"
    assert main(["evaluate", str(out), "gt1000"]) == 0
    d = one_json(capsys.readouterr().out)
    assert abs(d["kendall_tau"] - 0.585) < 0.01 and d["n"] == 1000


def test_proxy_scaling_keeps_correlations(tmp_path, capsys):
    from fastsupernet.metrics import kendall_tau, pearson, proxy_scores

    out = tmp_path / "proxy.json"
    assert main(["proxy", "gt1000", "--by", "macs", "--out", str(out)]) == 0
    capsys.readouterr()
    gt = fio.read_scores(fio.ground_truth_path())
    raw = proxy_scores([s.arch for s in gt.values()], "macs")
    scaled = [s.acc for s in fio.read_scores(out).values()]
    acc = [s.acc for s in gt.values()]
    assert kendall_tau(scaled, acc) == pytest.approx(kendall_tau(raw, acc), abs=1e-12)
    assert pearson(scaled, acc) == pytest.approx(pearson(raw, acc), abs=1e-9)
    with pytest.raises(ValueError, match="unknown proxy"):
        proxy_scores([], "flops")
    assert main(["proxy", "gt1000", "--by", "flops", "--out", str(out)]) == 2
