"""The CUDA fp32 multi_conv2d kernel with two images per pixel tile (FASTSUPERNET_CUDA_CONV_IMAGES=2,
an experiment, csrc/cuda/conv.cu) against the float64 oracle and against the one-image kernel.

A file of its own so that gpu_check.sh runs it as a separate step: a fault in the experimental
kernel cannot take the main kernel's tests (tests/test_conv_cuda.py) down with it. Oracle, inputs
and bounds: those of tests/test_conv_cuda.py.
"""
from __future__ import annotations

import pytest
import torch

from test_conv_cuda import Problem, check  # noqa: F401  (the same oracle and bounds)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA kernels cannot run here)")


TWO_IMAGE_CASES = {
    "odd-n-stats-all": dict(n=3, h=13, w=11, kernel=3, stride=1, padding=1, in_widths=[3, 16, 7, 1],
                            out_widths=[5, 17, 4, 12], scale=True, shift=True, residual=True, activation="relu",
                            stats=True),
    "one-image": dict(n=1, h=8, w=8, kernel=3, stride=1, padding=1, in_widths=[9], out_widths=[20], shift=True,
                      activation="prelu", stats=True),
    "1x1-stride2": dict(n=5, h=16, w=16, kernel=1, stride=2, padding=0, in_widths=[32, 12], out_widths=[64, 9],
                        scale=True, shift=True, stats=True),
    "track1-16x16": dict(n=8, h=16, w=16, kernel=3, stride=1, padding=1, in_widths=[16, 32, 8], out_widths=[32, 20, 28],
                         scale=True, shift=True, residual=True, activation="relu", stats=True),
    "stride2-odd": dict(n=4, h=17, w=19, kernel=3, stride=2, padding=1, in_widths=[5, 12], out_widths=[7, 16],
                        residual=True, activation="prelu"),
    "channels-last": dict(n=6, h=8, w=8, kernel=3, stride=1, padding=1, in_widths=[24, 40], out_widths=[40, 64],
                          scale=True, shift=True, stats=True, x_layout="channels_last"),
}


@pytest.mark.parametrize("case", list(TWO_IMAGE_CASES))
def test_multi_conv2d_cuda_two_images_per_tile(case, monkeypatch):
    """The two-image kernel: the oracle's bounds, and the one-image kernel's outputs bit for bit
    (every output is the same FMA chain); only the statistics' summation order differs."""
    p = Problem(seed=len(case), **TWO_IMAGE_CASES[case])
    monkeypatch.setenv("FASTSUPERNET_CUDA_CONV_IMAGES", "1")
    one = p.run()
    monkeypatch.setenv("FASTSUPERNET_CUDA_CONV_IMAGES", "2")
    two = p.run()
    check(p, two)
    assert torch.equal(one[0], two[0]), "outputs differ between one and two images per tile"
    if p.stats:
        torch.testing.assert_close(two[1], one[1], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(two[2], one[2], rtol=1e-12, atol=1e-9)
