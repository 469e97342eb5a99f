"""One-pass batch-norm apply, residual add and activation (Triton), for recalibration on the GPU.

During recalibration a level's convolution output ``y`` is normalised with that batch's own
statistics, which exist only after the convolution; this kernel then does, per element of
channel ``c``, in float32::

    v = y * scale[c] + shift[c]
    v += r * r_scale[c] + r_shift[c]      (residual with its own BN: a shortcut conv's output)
    v += r                                (or an already finished residual)
    v = relu(v) | prelu(v, slope[0]) | v

and writes ``v`` in ``y``'s dtype: one read of ``y`` (and ``r``) and one write, instead of the
four to six passes of separate PyTorch ops; in 2-D tiles whose channel index comes from the
column (channels_last) or the row (NCHW), and by 4-element vectors where the rows allow. ``y``
and ``r`` are dense NCHW or dense channels_last (``r`` is made to match ``y``). Every element runs the same code, so a value
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
_BLOCK_ROWS = 32
_BLOCK_COLS = 64


@triton.jit
def _bn_act_kernel(y_ptr, out_ptr, scale_ptr, shift_ptr, r_ptr, r_scale_ptr, r_shift_ptr, slope_ptr, rows, cols, C,
                   CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr, RES_AFFINE: tl.constexpr, ACT: tl.constexpr,
                   VEC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """A (BLOCK_ROWS, BLOCK_COLS) tile of the dense tensor seen as a (rows, cols) matrix: (pixels,
    channels) for channels_last, (images x channels, pixels) for NCHW. The channel of an element
    comes from its column or its row, so no element divides its flat index. ``cols`` arrives
    divided by VEC (a divisor of it): multiplied here, it tells the compiler that rows start at
    multiples of VEC elements, so VEC consecutive ones load as one vector."""
    cols = cols * VEC
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (row < rows)[:, None] & (col < cols)[None, :]
    offs = row.to(tl.int64)[:, None] * cols + col[None, :]
    if CHANNELS_LAST:
        c = col[None, :]  # (1, BLOCK_COLS)
        c_mask = (col < cols)[None, :]
    else:
        c = (row % C)[:, None]  # (BLOCK_ROWS, 1)
        c_mask = (row < rows)[:, None]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    t = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    v = y * s + t
    if HAS_RES:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RES_AFFINE:
            rs = tl.load(r_scale_ptr + c, mask=c_mask, other=0.0)
            rt = tl.load(r_shift_ptr + c, mask=c_mask, other=0.0)
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
    rows, cols = (n * h * w, c) if fmt == torch.channels_last else (n * c, h * w)
    vec = 4 if cols % 4 == 0 else 1
    grid = (triton.cdiv(rows, _BLOCK_ROWS), triton.cdiv(cols, _BLOCK_COLS))
    _bn_act_kernel[grid](
        y, y, scale.contiguous(), shift.contiguous(),
        residual if residual is not None else y,
        r_scale.contiguous() if r_scale is not None else dummy,
        r_shift.contiguous() if r_shift is not None else dummy,
        slope if slope is not None else dummy,
        rows, cols // vec, c,
        CHANNELS_LAST=fmt == torch.channels_last,
        HAS_RES=residual is not None,
        RES_AFFINE=r_scale is not None,
        ACT=ACTIVATIONS.index(activation),
        VEC=vec,
        BLOCK_ROWS=_BLOCK_ROWS,
        BLOCK_COLS=_BLOCK_COLS,
    )
    return y
