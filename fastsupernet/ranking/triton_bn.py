"""One-pass batch-norm apply, residual add and activation (Triton), for recalibration on the GPU.

During recalibration a level's convolution output ``y`` is normalised with that batch's own
statistics, which exist only after the convolution; this kernel then does, per element of
channel ``c``, in float32::

    v = y * scale[c] + shift[c]
    v += r * r_scale[c] + r_shift[c]      (residual with its own BN: a shortcut conv's output)
    v += r                                (or an already finished residual)
    v = relu(v) | prelu(v, slope[0]) | v

and writes ``v`` in ``y``'s dtype: one read of ``y`` (and ``r``) and one write, instead of the
four to six passes of separate PyTorch ops. ``y`` and ``r`` are dense NCHW or dense
channels_last (``r`` is made to match ``y``). Every element runs the same code, so a value
does not depend on where its channel sits in the packed tensor.

This module imports triton; the fast engine imports it only on CUDA. Under
``TRITON_INTERPRET=1`` it runs on CPU tensors (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["bn_act", "ACTIVATIONS"]

ACTIVATIONS = ("none", "relu", "prelu")
_BLOCK = 1024


@triton.jit
def _bn_act_kernel(y_ptr, out_ptr, scale_ptr, shift_ptr, r_ptr, r_scale_ptr, r_shift_ptr, slope_ptr, total, C, HW,
                   CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr, RES_AFFINE: tl.constexpr, ACT: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    if CHANNELS_LAST:
        c = offs % C
    else:
        c = (offs // HW) % C
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + c, mask=mask, other=0.0)
    t = tl.load(shift_ptr + c, mask=mask, other=0.0)
    v = y * s + t
    if HAS_RES:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RES_AFFINE:
            rs = tl.load(r_scale_ptr + c, mask=mask, other=0.0)
            rt = tl.load(r_shift_ptr + c, mask=mask, other=0.0)
            r = r * rs + rt
        v = v + r
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        a = tl.load(slope_ptr).to(tl.float32)
        v = tl.where(v > 0, v, v * a)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _dense_format(y: torch.Tensor) -> torch.memory_format | None:
    if y.is_contiguous():
        return torch.contiguous_format
    if y.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def bn_act(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None = None,
           r_scale: torch.Tensor | None = None, r_shift: torch.Tensor | None = None, activation: str = "none",
           slope: torch.Tensor | None = None) -> torch.Tensor:
    """``act(y * scale + shift [+ residual [* r_scale + r_shift]])`` per channel, written over ``y``.

    ``scale``/``shift``/``r_scale``/``r_shift``: float32, one value per channel of ``y``;
    ``slope``: a 1-element tensor for ``prelu``. Returns ``y`` (made dense first if it was not).
    """
    if y.dim() != 4:
        raise ValueError(f"bn_act expects (N, C, H, W), got shape {tuple(y.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "prelu" and (slope is None or slope.numel() != 1):
        raise ValueError("activation 'prelu' needs a 1-element slope")
    if (r_scale is None) != (r_shift is None) or (r_scale is not None and residual is None):
        raise ValueError("r_scale and r_shift go together, and only with a residual")
    n, c, h, w = y.shape
    fmt = _dense_format(y)
    if fmt is None:
        y, fmt = y.contiguous(), torch.contiguous_format
    for name, v in (("scale", scale), ("shift", shift), ("r_scale", r_scale), ("r_shift", r_shift)):
        if v is not None and (v.dtype != torch.float32 or v.numel() != c or v.device != y.device):
            raise ValueError(f"bn_act: {name} must be float32 with {c} values on {y.device}, "
                             f"got {v.dtype} {tuple(v.shape)} on {v.device}")
    if residual is not None:
        if tuple(residual.shape) != tuple(y.shape):
            raise ValueError(f"bn_act: residual has shape {tuple(residual.shape)}, y {tuple(y.shape)}")
        if residual.stride() != y.stride():
            residual = residual.contiguous(memory_format=fmt)
    total = y.numel()
    if total == 0:
        return y
    dummy = scale
    grid = (triton.cdiv(total, _BLOCK),)
    _bn_act_kernel[grid](
        y, y, scale.contiguous(), shift.contiguous(),
        residual if residual is not None else y,
        r_scale.contiguous() if r_scale is not None else dummy,
        r_shift.contiguous() if r_shift is not None else dummy,
        slope if slope is not None else dummy,
        total, c, h * w,
        CHANNELS_LAST=fmt == torch.channels_last,
        HAS_RES=residual is not None,
        RES_AFFINE=r_scale is not None,
        ACT=ACTIVATIONS.index(activation),
        BLOCK=_BLOCK,
    )
    return y
