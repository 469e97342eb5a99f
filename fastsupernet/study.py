"""The ranking study: does a supernet rank candidates like stand-alone training does?

Holds the mini benchmark's fixed candidate list (a seeded sample spread evenly over the
multiply-add range) and the pilot subset used to measure seed-to-seed agreement.
"""
from __future__ import annotations

import numpy as np

from .space import Arch, ChannelSpace, Track1Space

__all__ = ["spread_candidates"]


def spread_candidates(n: int, *, seed: int = 0, pool: int = 20000, space: ChannelSpace | None = None) -> dict[str, Arch]:
    """``n`` distinct architectures spread evenly over the multiply-add range of a seeded pool.

    Draws ``pool`` uniform samples, sorts them by multiply-adds at the space's default shape and
    keeps the ones at ``n`` evenly spaced ranks, so small, medium and large networks are all
    represented (a plain uniform sample crowds around the mean). Ids are ``arch1..archN`` in
    increasing multiply-adds.
    """
    sp = space if space is not None else Track1Space()
    if n < 1 or n > pool:
        raise ValueError(f"n must be in [1, pool={pool}], got {n}")
    cands: dict[tuple[int, ...], Arch] = {}
    for a in sp.sample_many(pool, seed=seed):
        cands.setdefault(tuple(a.widths), a)
    archs = list(cands.values())
    macs = np.asarray(sp.costs(archs)[0], dtype=np.float64)
    order = np.argsort(macs, kind="stable")
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, n)).astype(int))
    return {f"arch{i + 1}": archs[order[p]] for i, p in enumerate(picks)}
