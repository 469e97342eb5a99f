"""Triton kernel of ``channel_stats``: per-channel sum and sum of squares, in float64.

This module imports triton; the dispatcher imports it only when the ``"triton"`` backend is
used, so ``import fastsupernet`` works without Triton installed.

Layout of the work. For a channel ``c`` its ``M = N * H * W`` values are numbered
``j = n * (H * W) + h * W + w`` and split into ``S`` equal chunks; program ``(c, k)`` reads
chunk ``k`` of channel ``c`` through the tensor's strides (any layout, no copy), ``BLOCK``
values per step, and writes one float64 partial sum and sum of squares. The ``S`` partials
of a channel are then added in float64, in order (no atomics). ``S`` depends only on the
shape, never on the autotuned ``BLOCK``.

Error bound. Every value is widened to float64 before it is added (squares too), so the
only rounding is float64 addition: each of the ``BLOCK`` lanes of a program adds at most
``ceil(M / (S * BLOCK))`` values, the lanes are summed as a tree (``log2(BLOCK)`` levels),
and ``S`` partials are added last. With ``u = 2**-53`` the error of a channel's sum is below
``(M / (S * BLOCK) + log2(BLOCK) + S) * u * sum(|x|)`` (and likewise for ``sum(x * x)``),
i.e. about 1e-13 relative for a 5M-value channel: far below float32 resolution, whatever the
mean of the data.

Under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors through the interpreter
(slow: for tests on small shapes). The kernel only computes integer offsets and loads values
at them (no pointers are read from memory), and under the interpreter it loops a
compile-time number of times (``ITERS``): a run-time loop bound makes the interpreter convert
a 1-element array to a Python int, which numpy deprecates (and numpy >= 2.3 refuses).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["channel_stats_triton"]

# Programs launched per tensor, roughly: enough to fill a large GPU when C is small.
_TARGET_PROGRAMS = 1024
# Smallest chunk a program is given, so that per-program overhead stays small.
_MIN_CHUNK = 4096


@triton.jit
def _accumulate(x_ptr, base, off, end, HW, W, stride_n, stride_h, stride_w, acc_sum, acc_sq, BLOCK: tl.constexpr):
    """Adds x[j] and x[j]**2 for j in [off, off + BLOCK) (j < end) to the float64 accumulators."""
    j = off + tl.arange(0, BLOCK)
    mask = j < end
    # j -> (n, h, w) -> memory offset
    n = j // HW
    hw = j - n * HW
    h = hw // W
    w = hw - h * W
    offs = base + n.to(tl.int64) * stride_n + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    return acc_sum + x, acc_sq + x * x


@triton.jit
def _channel_stats_kernel(
    x_ptr,  # (N, C, H, W), any strides
    psum_ptr,  # (S, C) float64 partial sums
    psq_ptr,  # (S, C) float64 partial sums of squares
    C,
    HW,
    W,
    M,  # values per channel: N * H * W
    chunk,  # values per program
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,  # 0: loop over the chunk at run time; > 0: exactly ITERS steps
):
    c = tl.program_id(0)
    k = tl.program_id(1)
    start = k * chunk
    end = tl.minimum(start + chunk, M)
    base = c.to(tl.int64) * stride_c

    acc_sum = tl.zeros([BLOCK], dtype=tl.float64)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float64)
    if ITERS > 0:
        # compile-time trip count, for the interpreter (whose run-time loop bounds trip numpy)
        for it in range(ITERS):
            acc_sum, acc_sq = _accumulate(
                x_ptr, base, start + it * BLOCK, end, HW, W, stride_n, stride_h, stride_w, acc_sum, acc_sq, BLOCK
            )
    else:
        for off in range(start, end, BLOCK):
            acc_sum, acc_sq = _accumulate(
                x_ptr, base, off, end, HW, W, stride_n, stride_h, stride_w, acc_sum, acc_sq, BLOCK
            )

    tl.store(psum_ptr + k * C + c, tl.sum(acc_sum, axis=0))
    tl.store(psq_ptr + k * C + c, tl.sum(acc_sq, axis=0))


# Autotuning picks BLOCK and the warp count per chunk length on a GPU.
_CONFIGS = [
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=8),
    triton.Config({"BLOCK": 2048}, num_warps=8),
]
_channel_stats_tuned = triton.autotune(configs=_CONFIGS, key=["chunk"])(_channel_stats_kernel)

# The interpreter does not benchmark: it runs one fixed, small block.
_INTERPRETER_BLOCK = 256


def _interpreted() -> bool:
    # triton.jit returns an interpreter object instead of a JITFunction when TRITON_INTERPRET=1
    # was set at import time.
    return not isinstance(_channel_stats_kernel, triton.runtime.jit.JITFunction)


def _num_chunks(c: int, m: int) -> int:
    """Chunks per channel, ``S``: a function of the shape only."""
    want = max(1, -(-_TARGET_PROGRAMS // max(c, 1)))
    most = max(1, -(-m // _MIN_CHUNK))
    return min(want, most)


def channel_stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(sum, sum of squares)`` of an (N, C, H, W) tensor, float64, via Triton.

    Reads ``x`` through its strides (NCHW, channels_last or a strided view, no copy). Needs a
    CUDA tensor, or a CPU tensor when Triton was imported with ``TRITON_INTERPRET=1``.
    """
    if x.dim() != 4:
        raise ValueError(f"channel_stats expects (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"channel_stats expects a floating-point tensor, got {x.dtype}")
    x = x.detach()
    n, c, h, w = x.shape
    m = n * h * w
    if c == 0 or m == 0:
        z = torch.zeros(c, dtype=torch.float64, device=x.device)
        return z, z.clone()

    s = _num_chunks(c, m)
    chunk = -(-m // s)
    s = -(-m // chunk)
    psum = torch.empty((s, c), dtype=torch.float64, device=x.device)
    psq = torch.empty((s, c), dtype=torch.float64, device=x.device)
    args = (x, psum, psq, c, h * w, w, m, chunk, *x.stride())
    if _interpreted():
        iters = -(-chunk // _INTERPRETER_BLOCK)
        _channel_stats_kernel[(c, s)](*args, BLOCK=_INTERPRETER_BLOCK, ITERS=iters)
    else:
        with torch.cuda.device(x.device):
            _channel_stats_tuned[(c, s)](*args, ITERS=0)
    return psum.sum(dim=0), psq.sum(dim=0)
