"""Which paths a training step trains: the sampling rules, drawn from per-step seeds.

Every random draw of a step (its paths, its max-recover probes, its data order and
augmentation) comes from a generator seeded by ``(run seed, stage, step, purpose)``. Nothing
carries over from one step to the next, so a resumed run draws exactly what an uninterrupted
one would, and every rank of a distributed run draws the same paths without communicating.
"""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

from ..space import Arch, ChannelSpace

__all__ = ["derive_seed", "PathSampler", "SAMPLING_RULES"]

SAMPLING_RULES = ("largest", "uniform", "sandwich", "fair")


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed determined by ``seed`` and ``keys`` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr((int(seed),) + tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PathSampler:
    """The paths of each step under one rule (see :class:`~fastsupernet.training.config.SamplingConfig`)."""

    def __init__(self, space: ChannelSpace, rule: str, paths: int, seed: int) -> None:
        if rule not in SAMPLING_RULES:
            raise ValueError(f"unknown sampling rule {rule!r}; known: {', '.join(SAMPLING_RULES)}")
        if paths < 1 or (rule == "largest" and paths != 1) or (rule == "sandwich" and paths < 2):
            raise ValueError(f"sampling rule {rule!r} cannot draw {paths} paths")
        self.space, self.rule, self.paths, self.seed = space, rule, int(paths), int(seed)

    def _rng(self, stage: int, step: int, purpose: str) -> random.Random:
        return random.Random(derive_seed(self.seed, "paths", purpose, stage, step))

    def sample(self, stage: int, step: int) -> list[Arch]:
        """The paths of step ``step`` (0-based within the stage) of stage ``stage``."""
        sp, k = self.space, self.paths
        rng = self._rng(stage, step, "train")
        if self.rule == "largest":
            return [sp.largest()]
        if self.rule == "uniform":
            return [sp.sample(rng) for _ in range(k)]
        if self.rule == "sandwich":
            return [sp.largest(), sp.smallest()] + [sp.sample(rng) for _ in range(k - 2)]
        return fair_paths(sp, k, rng)

    def probes(self, stage: int, step: int, count: int) -> list[Arch]:
        """``count`` uniform random paths for max-recover, from their own stream."""
        rng = self._rng(stage, step, "probe")
        return [self.space.sample(rng) for _ in range(count)]


def fair_paths(space: ChannelSpace, k: int, rng: random.Random) -> list[Arch]:
    """``k`` paths in which every position uses each of its choices ``k // n`` or ``k // n + 1`` times."""
    columns: list[Sequence[int]] = []
    for choices in space.choices:
        n = len(choices)
        seq = list(choices) * (k // n) + rng.sample(list(choices), k % n)
        rng.shuffle(seq)
        columns.append(seq)
    return [Arch(tuple(col[i] for col in columns), space.num_network_positions) for i in range(k)]
