"""Plain-PyTorch reference ops: the oracle every fast backend is tested against.

Each function reads a candidate's slice of a packed parameter, ``weight[row_offset :
row_offset + out_rows, :in_width]``, as a view: nothing is copied here, and autograd routes
the gradient of the slice into the full packed parameter.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "sliced_conv2d",
    "multi_conv2d",
    "sliced_batch_norm",
    "sync_batch_norm",
    "sliced_linear",
    "channel_stats",
    "apply_activation",
]

ACTIVATIONS = ("none", "relu", "prelu")


def _check_rows(weight: torch.Tensor, out_rows: int, row_offset: int, what: str) -> None:
    if out_rows < 1 or row_offset < 0 or row_offset + out_rows > weight.shape[0]:
        raise ValueError(
            f"{what}: rows [{row_offset}, {row_offset + out_rows}) out of range for a packed weight "
            f"with {weight.shape[0]} rows"
        )


def apply_activation(y: torch.Tensor, activation: str, prelu_slope: torch.Tensor | None = None) -> torch.Tensor:
    """``none``, ``relu``, or ``prelu`` with one slope (a 1-element tensor) for all channels."""
    if activation == "none":
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "prelu":
        if prelu_slope is None:
            raise ValueError("activation 'prelu' needs prelu_slope")
        return F.prelu(y, prelu_slope.reshape(1))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def sliced_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    out_rows: int,
    *,
    row_offset: int = 0,
    stride: int = 1,
    padding: int = 0,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    prelu_slope: torch.Tensor | None = None,
    stats: bool = False,
):
    """Convolve ``x`` (N, a, H, W) with ``weight[row_offset:row_offset+out_rows, :a]``.

    Epilogue, in order: ``y * scale + shift`` per channel (folded BN), ``+ residual``, activation.
    With ``stats=True`` also returns the per-channel sum and sum of squares (float64) of the
    conv output before the epilogue.
    """
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"sliced_conv2d expects 4-D x and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    a = x.shape[1]
    if a > weight.shape[1]:
        raise ValueError(f"sliced_conv2d: input has {a} channels, packed weight only {weight.shape[1]} columns")
    _check_rows(weight, out_rows, row_offset, "sliced_conv2d")
    return multi_conv2d(
        x, weight, [0], [a], [out_rows], [row_offset], stride=stride, padding=padding, scale=scale, shift=shift,
        residual=residual, activation=activation, prelu_slope=prelu_slope, stats=stats,
    )


def multi_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_offsets: Sequence[int],
    in_widths: Sequence[int],
    out_widths: Sequence[int],
    row_offsets: Sequence[int],
    *,
    stride: int = 1,
    padding: int = 0,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    prelu_slope: torch.Tensor | None = None,
    stats: bool = False,
):
    """K candidate convolutions, outputs packed on channels in candidate order.

    Candidate k convolves ``x[:, in_offsets[k] : in_offsets[k] + in_widths[k]]`` with
    ``weight[row_offsets[k] : row_offsets[k] + out_widths[k], :in_widths[k]]``. ``scale``,
    ``shift`` (and the statistics) are packed per output channel, ``residual`` has the output's
    shape and ``prelu_slope`` holds one slope per candidate. Epilogue as in :func:`sliced_conv2d`.
    """
    k = len(out_widths)
    if not (len(in_offsets) == len(in_widths) == len(row_offsets) == k) or k == 0:
        raise ValueError(
            f"multi_conv2d: in_offsets, in_widths, out_widths, row_offsets must have one entry per candidate "
            f"(got {len(in_offsets)}, {len(in_widths)}, {k}, {len(row_offsets)})"
        )
    ys = []
    for io, iw, ow, ro in zip(in_offsets, in_widths, out_widths, row_offsets):
        if io < 0 or iw < 1 or io + iw > x.shape[1]:
            raise ValueError(f"multi_conv2d: input channels [{io}, {io + iw}) out of range for x with {x.shape[1]}")
        if iw > weight.shape[1]:
            raise ValueError(f"multi_conv2d: in_width {iw} exceeds the packed weight's {weight.shape[1]} columns")
        _check_rows(weight, ow, ro, "multi_conv2d")
        ys.append(F.conv2d(x[:, io : io + iw], weight[ro : ro + ow, :iw], stride=stride, padding=padding))
    y = torch.cat(ys, 1) if k > 1 else ys[0]
    sums = channel_stats(y) if stats else None
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    if activation == "prelu":
        if prelu_slope is None or prelu_slope.numel() != k:
            raise ValueError(f"multi_conv2d: activation 'prelu' needs prelu_slope with one value per candidate ({k})")
        counts = torch.tensor(list(out_widths), device=prelu_slope.device)
        y = F.prelu(y, prelu_slope.reshape(k).repeat_interleave(counts))
    else:
        y = apply_activation(y, activation)
    if stats:
        return y, sums[0], sums[1]
    return y


def sync_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    momentum: float | None,
    eps: float,
    group: Any,
) -> torch.Tensor:
    """Training-mode BatchNorm of ``x`` (N, C, H, W) with the statistics of the whole batch of
    every process of the ``torch.distributed`` ``group`` (SyncBN).

    Per-channel sums and sums of squares (float64) are all-reduced with autograd's
    ``all_reduce``, so the backward pass all-reduces their gradients too and each process gets
    the gradient of the global batch's normalisation. The running statistics (when given) move
    towards the global batch mean and unbiased variance by ``momentum``, as ``F.batch_norm``'s.
    Every process of the group must call it for the same layers in the same order.
    """
    from torch.distributed.nn.functional import all_reduce

    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    local = torch.cat([
        x.sum(dims, dtype=torch.float64),
        (x * x).sum(dims, dtype=torch.float64),
        torch.full((1,), float(x.numel() // max(c, 1)), dtype=torch.float64, device=x.device),
    ])
    total = all_reduce(local, group=group)
    n = total[-1]
    mean = total[:c] / n
    var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)
    if running_mean is not None and running_var is not None and momentum:
        with torch.no_grad():
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    shape = [1, c] + [1] * (x.dim() - 2)
    scale = weight.double() * torch.rsqrt(var + eps)
    shift = bias.double() - mean * scale
    return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)


def sliced_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    row_offset: int = 0,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: torch.Tensor | None = None,
    group: Any = None,
) -> torch.Tensor:
    """BatchNorm over the channels ``[row_offset, row_offset + C)`` of packed BN tensors.

    In training mode the running statistics of that slice are updated in place
    (``momentum=None``: cumulative average, which needs ``num_batches_tracked``). With a
    ``torch.distributed`` ``group``, training-mode statistics are those of the batch of every
    process of the group (:func:`sync_batch_norm`).
    """
    c = x.shape[1]
    sl = slice(row_offset, row_offset + c)
    if row_offset < 0 or row_offset + c > weight.shape[0]:
        raise ValueError(f"sliced_batch_norm: channels [{row_offset}, {row_offset + c}) out of {weight.shape[0]}")
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if training and momentum is None:
        if num_batches_tracked is None:
            raise ValueError("sliced_batch_norm: momentum=None (cumulative average) needs num_batches_tracked")
        momentum = 1.0 / float(num_batches_tracked.item())
    if training and group is not None:
        return sync_batch_norm(x, weight[sl], bias[sl], running_mean[sl], running_var[sl], momentum=momentum,
                               eps=eps, group=group)
    return F.batch_norm(
        x,
        running_mean[sl],
        running_var[sl],
        weight[sl],
        bias[sl],
        training=training,
        momentum=0.0 if momentum is None else momentum,
        eps=eps,
    )


def sliced_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out_rows: int, *, row_offset: int = 0
) -> torch.Tensor:
    """``x @ weight[row_offset:row_offset+out_rows, :a].T + bias[row_offset:row_offset+out_rows]``."""
    a = x.shape[1]
    if a > weight.shape[1]:
        raise ValueError(f"sliced_linear: input has {a} features, packed weight only {weight.shape[1]} columns")
    _check_rows(weight, out_rows, row_offset, "sliced_linear")
    sl = slice(row_offset, row_offset + out_rows)
    return F.linear(x, weight[sl, :a], bias[sl])


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum and sum of squares of an (N, C, H, W) tensor, accumulated in float64."""
    if x.dim() != 4:
        raise ValueError(f"channel_stats expects (N, C, H, W), got shape {tuple(x.shape)}")
    x64 = x.detach().to(torch.float64)
    return x64.sum(dim=(0, 2, 3)), (x64 * x64).sum(dim=(0, 2, 3))
