"""channel_stats: plain PyTorch reference vs the compiled CPU op, on BN-recalibration shapes.

    pytest benchmarks/bench_channel_stats.py                  # pytest-benchmark tables
    python benchmarks/bench_channel_stats.py                  # compact summary: ratio, GB/s

The summary also measures the copy bandwidth of a buffer larger than the caches, and reports
the bandwidth floor of each shape: bytes read / that bandwidth, the time a single pass over
the input cannot beat (inputs of a few MiB may sit in cache and beat it).
"""
from __future__ import annotations

import pytest
import torch

import fastsupernet.ops as ops

SHAPES = [(256, 64, 8, 8), (256, 16, 32, 32)]
BACKENDS = ["reference", "cpp"]


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g) * 3 + 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channel_stats(benchmark, shape, backend):
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"backend {backend} not available")
    x = _input(shape)
    benchmark.group = "channel_stats " + "x".join(map(str, shape))
    benchmark.extra_info["bytes_read"] = x.numel() * x.element_size()
    s, q = benchmark(ops.channel_stats, x, backend=backend)
    ref = ops.reference.channel_stats(x)
    torch.testing.assert_close(s, ref[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(q, ref[1], rtol=1e-12, atol=0)


def test_copy_bandwidth(benchmark):
    """Copy of 256 MiB (read + write): the memory bandwidth the floor is computed from."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    benchmark.group = "memory bandwidth"
    benchmark.extra_info["bytes_moved"] = 2 * src.numel() * src.element_size()
    benchmark.pedantic(dst.copy_, args=(src,), rounds=10, iterations=1, warmup_rounds=1)


def _summary() -> None:
    from torch.utils.benchmark import Timer

    def median(stmt: str, **env) -> float:
        return Timer(stmt, globals={"ops": ops, "torch": torch, **env}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=1.0).median

    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / median("dst.copy_(src)", src=src, dst=dst)
    print(f"threads {torch.get_num_threads()}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    for shape in SHAPES:
        x = _input(shape)
        nbytes = x.numel() * x.element_size()
        t = {b: median(f"ops.channel_stats(x, backend={b!r})", x=x) for b in BACKENDS}
        print(
            f"{'x'.join(map(str, shape)):>14}: reference {t['reference'] * 1e3:7.3f} ms, cpp {t['cpp'] * 1e3:7.3f} ms"
            f" ({t['reference'] / t['cpp']:.1f}x), cpp reads at {nbytes / t['cpp'] / 1e9:.1f} GB/s,"
            f" bandwidth floor {nbytes / bandwidth * 1e3:.3f} ms"
        )


if __name__ == "__main__":
    _summary()
