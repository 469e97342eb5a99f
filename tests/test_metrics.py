import math

import numpy as np
import pytest
from scipy import stats

from fastsupernet import io as fio
from fastsupernet.io import Score
from fastsupernet.metrics import (
    Evaluation,
    evaluate,
    id_sort_key,
    kendall_tau,
    pearson,
    spearman,
    top_k_overlap,
)
from fastsupernet.space import Track1Space

SPACE = Track1Space()
CLI_KEYS = {"kendall_tau", "spearman", "pearson", "top10_overlap", "n", "missing", "mismatched"}


# ---------------------------------------------------------------------------- correlations
def test_against_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, size=300).astype(float)  # many ties
    y = x + rng.integers(-3, 4, size=300)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert isinstance(kendall_tau(list(x), list(y)), float)


def test_hand_computed_small_examples():
    # pairs: (0,1) C, (0,2) C, (0,3) C, (1,2) tie in x only, (1,3) tie in y only, (2,3) C
    # tau_b = (C - D) / sqrt((C + D + Tx) (C + D + Ty)) = 4 / sqrt(5 * 5)
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 3]) == pytest.approx(0.8)
    # C = 5, D = 1 -> 4 / 6; Spearman 1 - 6 * 2 / (4 * 15) = 0.8
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # a pair tied in both inputs drops out of both denominators
    assert kendall_tau([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # cov 3, var_x 2, var_y 42/9 -> 9 / sqrt(84)
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))


def test_degenerate_inputs():
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert math.isnan(pearson([2, 2], [1, 2]))
    with pytest.raises(ValueError, match="at least 2"):
        kendall_tau([1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        pearson([1, 2, math.nan], [1, 2, 3])


# ---------------------------------------------------------------------------- top-k
def test_top_k_overlap():
    pred = {"a": 3, "b": 2, "c": 1, "d": 0}
    gt = {"a": 0, "b": 1, "c": 2, "d": 3}
    assert top_k_overlap(pred, gt, 2) == 0.0
    assert top_k_overlap(pred, gt, 3) == pytest.approx(2 / 3)
    assert top_k_overlap(pred, pred, 2) == 1.0
    assert top_k_overlap(pred, gt, 100) == 1.0  # k capped at the common ids
    assert top_k_overlap({"a": 1, "b": 2, "zz": 9}, {"a": 1, "b": 2}, 1) == 1.0  # only common ids
    with pytest.raises(ValueError):
        top_k_overlap(pred, gt, 0)
    with pytest.raises(ValueError, match="no id in common"):
        top_k_overlap({"x": 1}, {"y": 1}, 1)


def test_top_k_ties_break_by_natural_id_order():
    assert sorted(["arch10", "arch2", "arch1", "b", "arch"], key=id_sort_key) == ["arch", "arch1", "arch2", "arch10", "b"]
    flat = {"arch10": 0.5, "arch2": 0.5, "arch1": 0.5}
    # pred all tied -> its top-2 is arch1, arch2
    assert top_k_overlap(flat, {"arch10": 0.0, "arch2": 0.9, "arch1": 0.8}, 2) == 1.0
    assert top_k_overlap(flat, {"arch10": 0.9, "arch2": 0.1, "arch1": 0.8}, 2) == 0.5
    # deterministic whatever the insertion order
    rev = dict(reversed(list(flat.items())))
    assert top_k_overlap(rev, {"arch10": 0.9, "arch2": 0.1, "arch1": 0.8}, 2) == 0.5


# ---------------------------------------------------------------------------- evaluate
def _scores(pairs):
    return {i: Score(SPACE.parse(a), acc) for i, a, acc in pairs}


def test_evaluate_missing_and_mismatched():
    archs = SPACE.sample_many(6, seed=1)
    gt = _scores([(f"arch{i + 1}", a, 0.1 * (i + 1)) for i, a in enumerate(archs)])
    pred = {
        "arch1": Score(archs[0], 0.1),
        "arch2": Score(archs[1], 0.3),
        "arch3": Score(archs[2], 0.2),
        "arch4": Score(archs[5], 0.9),  # another architecture under this id
        "arch6": Score(archs[5], 0.5),
        "extra": Score(archs[3], 0.5),  # not in gt: ignored
    }
    ev = evaluate(pred, gt)
    assert ev.n == 4
    assert ev.missing == ("arch5",)
    assert ev.mismatched == ("arch4",)
    x, y = [0.1, 0.3, 0.2, 0.5], [0.1, 0.2, 0.3, 0.6]
    assert ev.kendall_tau == pytest.approx(stats.kendalltau(x, y).statistic)
    assert ev.spearman == pytest.approx(stats.spearmanr(x, y).statistic)
    assert ev.pearson == pytest.approx(stats.pearsonr(x, y).statistic)
    assert ev.top10_overlap == 1.0
    d = ev.to_json_dict()
    assert set(d) == CLI_KEYS
    assert d["missing"] == 1 and d["mismatched"] == 1 and d["n"] == 4


def test_evaluate_needs_two_matches():
    a, b = SPACE.sample_many(2, seed=2)
    gt = {"arch1": Score(a, 0.5), "arch2": Score(b, 0.6)}
    with pytest.raises(ValueError, match="only 1 id"):
        evaluate({"arch1": Score(a, 0.5), "arch2": Score(a, 0.1)}, gt)
    with pytest.raises(ValueError, match="only 0 id"):
        evaluate({}, gt)


def test_evaluate_k_and_json_dict():
    gt = fio.read_scores(fio.ground_truth_path())
    ev = evaluate(gt, gt, k=5)
    assert isinstance(ev, Evaluation)
    assert ev.kendall_tau == pytest.approx(1.0) and ev.top10_overlap == 1.0 and ev.top_k_overlap == 1.0
    assert set(ev.to_json_dict()) == CLI_KEYS | {"top5_overlap"}
    assert set(evaluate(gt, gt).to_json_dict()) == CLI_KEYS
    const = {i: Score(s.arch, 0.5) for i, s in gt.items()}
    d = evaluate(const, gt).to_json_dict()
    assert d["kendall_tau"] is None and d["pearson"] is None


# ---------------------------------------------------------------------------- literature sanity
def _conv_params(w, shortcut):
    """Conv weights only: stem 3*w0*9, each block conv1 in*w*9 + conv2 w*w*9 (+ 1x1 shortcut in*out)."""
    total = 3 * w[0] * 9
    cin = w[0]
    for b in range(9):
        w1, w2 = w[1 + 2 * b], w[2 + 2 * b]
        total += cin * w1 * 9 + w1 * w2 * 9 + (cin * w2 if shortcut else 0)
        cin = w2
    return total


def test_proxies_on_bundled_ground_truth():
    gt = fio.read_scores(fio.ground_truth_path())
    acc = [s.acc for s in gt.values()]
    widths = [s.arch.widths for s in gt.values()]
    assert all(len(w) == 19 for w in widths)
    tau_sum = kendall_tau([sum(w) for w in widths], acc)
    assert abs(tau_sum - 0.585) < 0.01, tau_sum  # measured 0.5852
    # the literature's 0.540 for the parameter count matches convs WITHOUT shortcut convs;
    # a 1x1 shortcut conv in every block gives 0.559 instead
    tau_plain = kendall_tau([_conv_params(w, False) for w in widths], acc)
    assert abs(tau_plain - 0.540) < 0.01, tau_plain  # measured 0.5404
    tau_sc = kendall_tau([_conv_params(w, True) for w in widths], acc)
    assert abs(tau_sc - 0.559) < 0.01, tau_sc  # measured 0.5587
