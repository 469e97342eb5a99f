"""Supernet forward with in-place sliced weights vs the same candidate exported to a static net.

Both run one Track-1 candidate on a batch of 32x32 images in eval mode; the ratio is the cost
of reading weights as slices of packed parameters (plain-PyTorch reference path). The floor
is the candidate's FLOPs over the measured fp32 GEMM rate (``test_gemm_rate``).

    python -m pytest benchmarks/bench_supernet.py --benchmark-only
"""
import pytest
import torch

from fastsupernet.space import Track1Space
from fastsupernet.supernet import Supernet, SupernetConfig

BATCH = 128
SPACE = Track1Space()
ARCH = SPACE.parse("12-12-8-16-12-12-8-20-16-28-12-24-20-36-40-28-44-32-36-32")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = Supernet(SPACE, SupernetConfig.enhanced((1, 1, 1)), in_channels=3, num_classes=100).eval()
    x = torch.randn(BATCH, 3, 32, 32)
    return net, net.export(ARCH).eval(), x


def test_gemm_rate(benchmark):
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    benchmark(torch.mm, a, b)
    benchmark.extra_info["gflops"] = 2 * n**3 / benchmark.stats["mean"] / 1e9


@torch.no_grad()
def test_supernet_sliced(benchmark, setup):
    net, _, x = setup
    benchmark(net, x, ARCH)
    macs = SPACE.macs(ARCH, width_map=dict(net.config.width_map))
    benchmark.extra_info["gflops_effective"] = 2 * macs * BATCH / benchmark.stats["mean"] / 1e9


@torch.no_grad()
def test_static_export(benchmark, setup):
    net, static, x = setup
    benchmark(static, x)
    macs = SPACE.macs(ARCH, width_map=dict(net.config.width_map))
    benchmark.extra_info["gflops_effective"] = 2 * macs * BATCH / benchmark.stats["mean"] / 1e9
