"""Training step of K paths on one batch: batched (``Supernet.forward_paths``) vs a loop of single paths.

One step = forward + backward + SGD update for the largest path and 8 random paths, all on the
same batch of Track-1 shaped images (3x32x32, 100 classes), enhanced supernet (4->5, 8->9,
PReLU, 1x1 shortcut everywhere). The loop is what a trainer without the multi-candidate ops
does: ``for a in archs: cross_entropy(model(x, a), y).backward()``, then ``step()``; the
batched step runs all paths as one ``forward_paths`` call and one backward. Both compute the
same gradients (tests/test_multipath.py).

Floor: the step's FLOPs (forward + backward = 3 x forward multiply-adds x 2, summed over the
paths) at the fp32 GEMM rate measured in the same run.

pytest-benchmark (each case on its own):

    python -m pytest benchmarks/bench_train.py --benchmark-only

Interleaved pairs (loop, batched, loop, ...: on a shared machine the ratio of medians taken
side by side is the trustworthy number), printing a table:

    python benchmarks/bench_train.py [--batch 64] [--pairs 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

from fastsupernet.space import Arch, Track1Space
from fastsupernet.supernet import Supernet, SupernetConfig

SPACE = Track1Space()
NUM_CLASSES = 100
RANDOM_PATHS = 8


def sample_archs(seed: int = 1, random_paths: int = RANDOM_PATHS) -> list[Arch]:
    """The largest path and ``random_paths`` uniformly sampled ones."""
    return [SPACE.largest()] + SPACE.sample_many(random_paths, seed=seed)


def make_model(config: SupernetConfig | None = None) -> Supernet:
    torch.manual_seed(0)
    return Supernet(SPACE, config or SupernetConfig.enhanced(), in_channels=3, num_classes=NUM_CLASSES).train()


def make_steps(
    model: Supernet, archs: Sequence[Arch], x: torch.Tensor, y: torch.Tensor, *, autocast_dtype=None
) -> dict[str, Callable[[], None]]:
    """``{"loop": step, "batched": step}``: forward + backward + SGD update of every path in ``archs``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dev = x.device.type

    def ctx():
        if autocast_dtype is None:
            return torch.autocast(dev, enabled=False)
        return torch.autocast(dev, dtype=autocast_dtype)

    def loop() -> None:
        opt.zero_grad(set_to_none=True)
        for a in archs:
            with ctx():
                loss = F.cross_entropy(model(x, a), y)
            loss.backward()
        opt.step()

    def batched() -> None:
        opt.zero_grad(set_to_none=True)
        with ctx():
            logits = model.forward_paths(x, archs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.repeat(len(archs)), reduction="sum") / x.shape[0]
        loss.backward()
        opt.step()

    return {"loop": loop, "batched": batched}


def step_flops(model: Supernet, archs: Sequence[Arch], batch: int, resolution: int = 32) -> float:
    """Forward + backward FLOPs of one step: 3 x forward multiply-adds x 2, over all paths."""
    macs = SPACE.costs(archs, resolution=resolution, num_classes=model.num_classes,
                       shortcut=model.config.shortcut, width_map=dict(model.config.width_map))[0]
    return 3.0 * 2.0 * float(macs.sum()) * batch


def gemm_rate(n: int = 1024, reps: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    """Measured dense matmul rate in FLOP/s (median of ``reps``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:])


def time_interleaved(steps: dict[str, Callable[[], None]], pairs: int, sync: Callable[[], None] = lambda: None,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps alternating (one warm-up call each first)."""
    for f in steps.values():
        for _ in range(warmup):
            f()
    sync()
    out: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(pairs):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            sync()
            out[k].append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- pytest-benchmark
BATCH = 64


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    archs = sample_archs()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    return model, archs, make_steps(model, archs, x, y)


def test_gemm_rate(benchmark):
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    benchmark(torch.mm, a, b)
    benchmark.extra_info["gflops"] = 2 * n**3 / benchmark.stats["mean"] / 1e9


@pytest.mark.parametrize("kind", ["loop", "batched"])
def test_train_step(benchmark, setup, kind):
    model, archs, steps = setup
    benchmark.pedantic(steps[kind], rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats["median"]
    benchmark.extra_info["gflops_effective"] = step_flops(model, archs, BATCH) / benchmark.stats["median"] / 1e9


# --------------------------------------------------------------------------- table
def main() -> None:
    from fastsupernet.allocator import tune_cpu_allocator

    tuned = tune_cpu_allocator()  # as the command line does (FASTSUPERNET_CPU_ALLOCATOR=system: glibc default)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the 8 random paths")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model()
    archs = sample_archs(args.seed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)
    rate0 = gemm_rate()
    times = time_interleaved(make_steps(model, archs, x, y), args.pairs)
    rate = max(rate0, gemm_rate())
    flops = step_flops(model, archs, args.batch)
    floor = flops / rate
    med = {k: statistics.median(v) for k, v in times.items()}
    pair_ratios = [a / b for a, b in zip(times["loop"], times["batched"])]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator {'heap' if tuned else 'system'}; "
          f"batch {args.batch} at 3x32x32, "
          f"{len(archs)} paths (largest + {len(archs) - 1} random, seed {args.seed}); {args.pairs} interleaved pairs")
    print(f"GEMM 1024^3: {rate / 1e9:.1f} GFLOP/s; step FLOPs {flops / 1e9:.2f} G; floor {floor * 1e3:.0f} ms")
    print(f"{'step':8s} {'median ms':>10s} {'images/s':>9s} {'GFLOP/s':>8s} {'x floor':>8s}")
    for k in ("loop", "batched"):
        print(f"{k:8s} {med[k] * 1e3:10.0f} {args.batch / med[k]:9.1f} {flops / med[k] / 1e9:8.1f} {med[k] / floor:8.2f}")
    print(f"batched vs loop: {med['loop'] / med['batched']:.2f}x (ratio of medians); per-pair ratios "
          f"{' '.join(f'{r:.2f}' for r in pair_ratios)} (median {statistics.median(pair_ratios):.2f}x)")


if __name__ == "__main__":
    main()
