"""Splitting a ranking across processes (``torchrun``) and the process group it runs in.

Candidates that share their first widths share computation (prefix sharing), so a shard is a
set of whole *prefix subtrees*: networks are grouped by their first ``depth`` widths and the
groups are packed onto ranks greedily, largest first, each onto the least loaded rank, by
multiply-adds. ``depth`` is the shallowest that balances the ranks within
:data:`BALANCE_TOLERANCE` (deeper splits balance better but repeat more shared prefixes on
several ranks). The plan depends only on the networks, their costs and the world size, so every
rank computes the same plan without talking to the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


__all__ = ["BALANCE_TOLERANCE", "ShardPlan", "plan_shards"]

#: The largest rank's multiply-adds may exceed the mean by this fraction before ``depth`` grows.
BALANCE_TOLERANCE = 0.02


@dataclass(frozen=True)
class ShardPlan:
    """Which networks each rank runs: ``shards[r]`` lists indices into the planned sequence,
    in their original order; ``loads[r]`` is that rank's multiply-adds; ``depth`` the prefix
    length the subtrees were cut at."""

    shards: tuple[tuple[int, ...], ...]
    loads: tuple[int, ...]
    depth: int

    @property
    def imbalance(self) -> float:
        """Largest load over mean load (1.0: perfectly balanced)."""
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean > 0 else 1.0


def _pack(widths: Sequence[tuple[int, ...]], costs: Sequence[int], world_size: int, depth: int) -> ShardPlan:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(widths):
        groups.setdefault(tuple(w[:depth]), []).append(i)
    weight = {p: sum(int(costs[i]) for i in members) for p, members in groups.items()}
    order = sorted(groups, key=lambda p: (-weight[p], p))
    loads = [0] * world_size
    owner: dict[tuple[int, ...], int] = {}
    for p in order:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        owner[p] = r
        loads[r] += weight[p]
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i, w in enumerate(widths):
        shards[owner[tuple(w[:depth])]].append(i)
    return ShardPlan(tuple(tuple(s) for s in shards), tuple(loads), depth)


def plan_shards(widths: Sequence[Sequence[int]], costs: Sequence[int], world_size: int) -> ShardPlan:
    """Split networks (``widths``, one tuple each, all the same length) over ``world_size`` ranks.

    ``costs`` are the networks' multiply-adds (any positive weight works). Returns the plan of
    the shallowest prefix depth whose imbalance is within :data:`BALANCE_TOLERANCE`, else the
    best balanced one found.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(widths) != len(costs):
        raise ValueError(f"{len(widths)} networks but {len(costs)} costs")
    nets = [tuple(int(v) for v in w) for w in widths]
    if not nets:
        return ShardPlan(tuple(() for _ in range(world_size)), (0,) * world_size, 0)
    if world_size == 1:
        return ShardPlan((tuple(range(len(nets))),), (sum(int(c) for c in costs),), 0)
    positions = len(nets[0])
    best: ShardPlan | None = None
    for depth in range(1, positions + 1):
        plan = _pack(nets, costs, world_size, depth)
        if best is None or plan.imbalance < best.imbalance - 1e-12:
            best = plan
        if plan.imbalance <= 1.0 + BALANCE_TOLERANCE:
            return plan
    assert best is not None
    return best
