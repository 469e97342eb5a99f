"""Sampling rules, learning-rate schedule, distillation loss and step plans."""
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from fastsupernet import Track1Space
from fastsupernet.training import PathSampler, distillation_loss, load_config, lr_at
from fastsupernet.training.step import plan_step

from train_tiny import tiny_config

SPACE = Track1Space()


def test_largest_uniform_sandwich():
    assert PathSampler(SPACE, "largest", 1, 0).sample(0, 5) == [SPACE.largest()]
    uni = PathSampler(SPACE, "uniform", 6, 0)
    paths = uni.sample(1, 7)
    assert len(paths) == 6 and all(SPACE.parse(str(a)) == a for a in paths)
    assert uni.sample(1, 7) == paths  # a step's paths depend on (seed, stage, step) only
    assert uni.sample(1, 8) != paths and uni.sample(2, 7) != paths
    assert PathSampler(SPACE, "uniform", 6, 1).sample(1, 7) != paths
    sw = PathSampler(SPACE, "sandwich", 4, 0).sample(0, 0)
    assert sw[0] == SPACE.largest() and sw[1] == SPACE.smallest() and len(sw) == 4
    with pytest.raises(ValueError):
        PathSampler(SPACE, "sandwich", 1, 0)


@pytest.mark.parametrize("k", [4, 8, 16, 10])
def test_fair_rule_balances_every_position(k):
    paths = PathSampler(SPACE, "fair", k, 0).sample(0, 3)
    assert len(paths) == k
    for pos, choices in enumerate(SPACE.choices):
        counts = Counter(a.values[pos] for a in paths)
        full = [counts.get(c, 0) for c in choices]
        assert max(full) - min(full) <= 1
        if k % len(choices) == 0:
            assert set(full) == {k // len(choices)}
    # not always the same columns: the positions are shuffled independently
    assert len({a.widths for a in paths}) == k


def test_lr_schedule():
    lrs = [lr_at(s, 20, 0.1, 4, 0.001) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(20, 20, 0.1, 4, 0.001) == pytest.approx(0.001)
    mid = 4 + 8
    assert lrs[mid] == pytest.approx(0.001 + 0.099 * 0.5)


def test_distillation_loss_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (5,), generator=g)
    T, alpha = 2.5, 0.3
    pt = torch.softmax(t / T, -1)
    kl = (pt * (torch.log(pt) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    ce = -torch.log_softmax(s, -1)[torch.arange(5), y].mean()
    want = alpha * ce + (1 - alpha) * T * T * kl
    assert distillation_loss(s, t, y, alpha, T).item() == pytest.approx(want.item(), rel=1e-12)
    assert distillation_loss(s, t, y, 1.0, T).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-12)
    assert distillation_loss(t, t, y, 0.0, T).item() == pytest.approx(0.0, abs=1e-12)


def test_step_plans():
    cfg = load_config(tiny_config("fashion-mnist"))
    st = cfg.stages[1]  # sandwich + distill, frozen teacher, largest trained
    sampled = PathSampler(SPACE, "sandwich", 3, 0).sample(0, 0)
    plan = plan_step(st, sampled, SPACE.largest())
    assert plan.archs[0] == SPACE.largest() and plan.ce == (0,) and plan.students == (1, 2) and len(plan.archs) == 3
    uni = PathSampler(SPACE, "uniform", 2, 0).sample(0, 0)
    plan = plan_step(st, uni, SPACE.largest())
    assert plan.archs == (SPACE.largest(), *uni) and plan.students == (1, 2)
    frozen_only = cfg.replace(stages=[cfg.to_dict()["stages"][0], {**cfg.to_dict()["stages"][1],
                              "loss": {"kind": "distill", "teacher": "frozen", "train_largest": False}}]).stages[1]
    plan = plan_step(frozen_only, uni, SPACE.largest())
    assert plan.archs == tuple(uni) and plan.ce == () and plan.students == (0, 1)
    ce = cfg.stages[0]
    plan = plan_step(ce, [SPACE.largest()], SPACE.largest())
    assert plan.ce == (0,) and plan.students == () and plan.largest_index == 0
    assert math.isfinite(lr_at(0, 1, 0.1, 0, 0.0))
