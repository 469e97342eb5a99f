"""Per-channel statistics (BatchNorm recalibration), dispatched to the fastest backend."""
from __future__ import annotations

import torch

from . import dispatch

__all__ = ["channel_stats"]


def channel_stats(x: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(sum, sum of squares)`` of an (N, C, H, W) tensor, accumulated in float64.

    Returns two float64 tensors of shape (C,) on ``x``'s device. Accepts float32 and float64
    (float16/bfloat16 too), NCHW, channels_last or any strided view. ``backend`` picks the
    implementation (see :mod:`fastsupernet.ops.dispatch`); by default the fastest available.

    Statistics only: the result is not differentiable (``x`` is detached).
    """
    if x.dim() != 4:
        raise ValueError(f"channel_stats expects (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"channel_stats expects a floating-point tensor, got {x.dtype}")
    return dispatch.run("channel_stats", x, backend=backend)
