"""Ranking on CPU: the ``fast`` engine vs the ``reference`` engine, same candidates, same protocol.

    pytest benchmarks/bench_rank.py --benchmark-only -s                 # 256 candidates: long on 2 cores
    FASTSUPERNET_BENCH_RANK_CANDIDATES=32 pytest benchmarks/bench_rank.py --benchmark-only -s   # quick

Candidates: the first N official Track-1 candidates (N = ``FASTSUPERNET_BENCH_RANK_CANDIDATES``,
default 256). Protocol: 512 recalibration images (batches of 128) + 1,024 evaluation images
of synthetic 3x32x32 pixels, 100 classes, a randomly initialised Track-1 supernet (timing does
not depend on the weights). ``test_rank_full_protocol`` times ``FASTSUPERNET_BENCH_RANK_FULL``
candidates (default 2; 0 skips) at the full protocol, 5,000 + 10,000 images.

Supernet: the default configuration (one branch group per layer, so siblings that differ in
one width nest, see ``fastsupernet.ranking.tree``), or with ``FASTSUPERNET_BENCH_RANK_BRANCHES``
= e.g. ``4,8,16`` the enhanced configuration with that many branches per stage (and as many
for the classifier as the last stage): the final stage of ``configs/track1_seed.yaml``, where
every width has its own weights and nothing nests.

``test_rank_interleaved`` (``FASTSUPERNET_BENCH_RANK_INTERLEAVED=R``, R >= 1; 0 skips) runs
the two engines in turns on the same candidates, so that this machine's speed drift between
runs hits both: the reference on R + 1 consecutive slices of the candidates (its time per
candidate does not depend on the others), the fast engine on all of them between slices.
Ratio: the reference's total over the median fast run; per fast run, the reference's rate on
the slices before and after it.

Floors, printed and stored in ``extra_info``: the multiply-adds each engine must do (the
reference: every candidate in full; fast: after prefix sharing) as FLOPs over the fp32 GEMM
rate of ``torch.mm`` 1024^3 measured in this run.
"""
from __future__ import annotations

import functools
import os
import statistics
import time

import pytest
import torch

from fastsupernet import Supernet, SupernetConfig, read_candidates
from fastsupernet.io import official_candidates_path
from fastsupernet.ranking.engines import RankData, make_engine, prefix_sharing

CANDIDATES = int(os.environ.get("FASTSUPERNET_BENCH_RANK_CANDIDATES", "256"))
FULL = int(os.environ.get("FASTSUPERNET_BENCH_RANK_FULL", "2"))
BRANCHES = os.environ.get("FASTSUPERNET_BENCH_RANK_BRANCHES", "")
INTERLEAVED = int(os.environ.get("FASTSUPERNET_BENCH_RANK_INTERLEAVED", "0"))
RECAL, EVAL, BATCH, CLASSES = 512, 1024, 128, 100


@functools.lru_cache(maxsize=None)
def gemm_rate() -> float:
    """fp32 FLOP/s of torch.mm 1024^3 (median of 15)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * 1024**3 / statistics.median(times)


@functools.lru_cache(maxsize=None)
def _setup(n_cand: int, recal: int, evals: int):
    torch.manual_seed(0)
    config = SupernetConfig()
    if BRANCHES:
        try:
            g = tuple(int(b) for b in BRANCHES.split(","))
        except ValueError:
            raise ValueError(f"FASTSUPERNET_BENCH_RANK_BRANCHES must be comma-separated ints, got {BRANCHES!r}") from None
        config = SupernetConfig.enhanced(branches=g, classifier_branches=g[-1])
    model = Supernet(config=config, in_channels=3, num_classes=CLASSES)
    g = torch.Generator().manual_seed(1)
    data = RankData(
        recal_x=torch.randn(recal, 3, 32, 32, generator=g),
        eval_x=torch.randn(evals, 3, 32, 32, generator=g),
        eval_y=torch.randint(0, CLASSES, (evals,), generator=g),
        recal_batch=BATCH,
    )
    archs = list(read_candidates(official_candidates_path()).values())[:n_cand]
    return model, data, archs


def _run(benchmark, engine_name: str, n_cand: int, recal: int, evals: int, group: str) -> None:
    model, data, archs = _setup(n_cand, recal, evals)
    engine = make_engine(engine_name, model, data)
    total, shared = prefix_sharing(model, archs)
    images = recal + evals
    macs = shared if engine_name == "fast" else total
    results = benchmark.pedantic(lambda: list(engine.score(archs)), rounds=1, iterations=1)
    assert len(results) == len(archs)
    rate = gemm_rate()
    seconds = benchmark.stats["median"]
    floor_s = 2 * macs * images / rate
    benchmark.group = group
    benchmark.extra_info.update(
        candidates=len(archs), images=images, macs_per_image_total=total, macs_per_image_computed=shared,
        sharing_ratio=total / shared, gemm_gflops=rate / 1e9, floor_s=floor_s,
        candidates_per_s=len(archs) / seconds, groups=engine.stats.groups,
    )
    print(f"\n{group} {engine_name}: {len(archs)} candidates x {images} images in {seconds:.1f} s "
          f"({len(archs) / seconds:.2f} candidates/s); prefix sharing {total / shared:.3f}x; "
          f"floor {floor_s:.1f} s (FLOPs {2 * macs * images / 1e12:.2f} T at {rate / 1e9:.0f} GFLOP/s, "
          f"ratio to floor {seconds / floor_s:.2f})")


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_rank_candidates(benchmark, engine):
    net = f", branches {BRANCHES}" if BRANCHES else ""
    _run(benchmark, engine, CANDIDATES, RECAL, EVAL, f"rank {CANDIDATES} official, {RECAL}+{EVAL} images{net}")


@pytest.mark.skipif(FULL < 1, reason="FASTSUPERNET_BENCH_RANK_FULL=0")
@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_rank_full_protocol(benchmark, engine):
    _run(benchmark, engine, FULL, 5000, 10000, f"rank {FULL} official, 5000+10000 images")


@pytest.mark.skipif(INTERLEAVED < 1, reason="FASTSUPERNET_BENCH_RANK_INTERLEAVED=0")
def test_rank_interleaved(benchmark):
    model, data, archs = _setup(CANDIDATES, RECAL, EVAL)
    n = len(archs)
    cuts = [round(i * n / (INTERLEAVED + 1)) for i in range(INTERLEAVED + 2)]
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"FASTSUPERNET_BENCH_RANK_INTERLEAVED={INTERLEAVED} needs at least {INTERLEAVED + 1} candidates")
    ref, fast = make_engine("reference", model, data), make_engine("fast", model, data)
    ref_s: list[float] = []
    fast_s: list[float] = []

    def timed(engine, subset) -> float:
        t = time.perf_counter()
        assert len(list(engine.score(subset))) == len(subset)
        return time.perf_counter() - t

    def turns() -> None:
        for i in range(INTERLEAVED + 1):
            ref_s.append(timed(ref, archs[cuts[i]:cuts[i + 1]]))
            if i < INTERLEAVED:
                fast_s.append(timed(fast, archs))

    benchmark.pedantic(turns, rounds=1, iterations=1)
    sizes = [b - a for a, b in zip(cuts, cuts[1:])]
    ref_total, fast_median = sum(ref_s), statistics.median(fast_s)
    # per fast run: the reference's seconds per candidate on the slices either side of it, times n
    local = [n * (ref_s[i] + ref_s[i + 1]) / (sizes[i] + sizes[i + 1]) / f for i, f in enumerate(fast_s)]
    total, shared = prefix_sharing(model, archs)
    group = f"rank {n} official interleaved, {RECAL}+{EVAL} images" + (f", branches {BRANCHES}" if BRANCHES else "")
    benchmark.group = group
    benchmark.extra_info.update(
        candidates=n, reference_slices_s=ref_s, reference_total_s=ref_total, fast_runs_s=fast_s,
        ratio=ref_total / fast_median, ratio_per_fast_run=local, sharing_ratio=total / shared,
    )
    print(f"\n{group}: reference {ref_total:.1f} s in {len(ref_s)} slices "
          f"({', '.join(f'{t:.1f}' for t in ref_s)}); fast runs {', '.join(f'{t:.1f}' for t in fast_s)} s; "
          f"ratio {ref_total / fast_median:.2f}x (per fast run {', '.join(f'{r:.2f}' for r in local)}); "
          f"prefix sharing {total / shared:.3f}x")
