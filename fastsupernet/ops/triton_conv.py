"""Triton kernels of ``multi_conv2d`` and ``sliced_conv2d`` (forward only): grouped implicit GEMM.

This module imports triton; the dispatcher imports it only when the ``"triton"`` backend is
used, so ``import fastsupernet`` works without Triton installed. Autograd is not defined here.

The math. Candidate ``k`` of a ``multi_conv2d`` call is one GEMM over output pixels::

    out[m, o_k + j] = sum_{t, c} A_k[m, (t, c)] * B_k[(t, c), j]
    A_k[m, (t, c)] = x[n, in_offset_k + c, oh * stride - padding + r, ow * stride - padding + s]
    B_k[(t, c), j] = weight[row_offset_k + j, c, r, s]

with ``m = (n, oh, ow)`` one of ``M = N * H' * W'`` output pixels, ``j < out_width_k``, filter
tap ``t = (r, s)`` of ``kh * kw`` and input channel ``c < in_width_k`` (so the reduction length
is ``in_width_k * kh * kw``); ``A_k`` is zero where the tap falls into the padding. ``A_k`` is
never materialised: each step loads a ``(BLOCK_M, BLOCK_K)`` tile of it straight from ``x``
(one tap, ``BLOCK_K`` channels) and a ``(BLOCK_K, BLOCK_N)`` tile of ``B_k`` straight from the
packed ``weight`` (read in place: row stride ``C_max * kh * kw``, nothing is copied), and
``tl.dot`` adds their product to a float32 accumulator.

One launch for all candidates. The output channels of all candidates are cut into tiles of
``BLOCK_N`` channels, each tile inside one candidate (a candidate of width 40 gets tiles of
16, 16 and 8 channels when ``BLOCK_N`` is 16). The 1-D grid has ``cdiv(M, BLOCK_M) * T``
programs (``T`` tiles); program ``pid`` computes pixel tile ``pid // T`` of channel tile
``pid % T``, so that the programs running together share their pixels and read the same
piece of ``x`` from L2. Which candidate and which of its channels a tile covers comes from
small int32 tables on the device (``_Metadata``): integer offsets, never pointers.

Epilogue (per output channel ``c`` of candidate ``k``, in order): ``y = conv``, ``y *= scale[c]``,
``y += shift[c]``, ``y += residual[n, c, h, w]``, then ``none`` / ``relu`` / ``prelu`` with
``prelu_slope[k]``. It runs in float32 on the accumulator; ``out`` gets ``x``'s dtype.

Statistics. With ``stats=True`` the kernel also writes, for each chunk of ``STATS_CHUNK``
consecutive output pixels and each output channel, the float64 sum and sum of squares of the
float32 accumulator (before the epilogue) to a ``(cdiv(M, STATS_CHUNK), C_out)`` float64
buffer; torch adds its rows in float64 (deterministic, no atomics). Every value is widened to
float64 before it is squared or added, so with ``u = 2**-53`` the error of a channel's sum is
below ``(STATS_CHUNK + cdiv(M, STATS_CHUNK)) * u * sum(|y|)`` (likewise for the squares):
about 2e-12 relative at 5M values per channel, negligible next to the float32 rounding of the
conv values ``y`` themselves, which are exactly the values the statistics are taken of. The
buffer has ``2 * 8 / STATS_CHUNK`` bytes per output value (1/16 of a float32 ``out`` and
its sums together) and its layout does not depend on the autotuned tile sizes.

Precision. ``tl.dot`` accumulates in float32. ``input_precision="ieee"`` (the default) keeps
float32 inputs exact (FMA, no tensor cores): error vs float64 about ``sqrt(K_gemm) * 2**-24``
relative to ``sum |a * b|``. ``"tf32"`` (tensor cores, 10-bit mantissa inputs, about 2e-3
relative) and ``"tf32x3"`` are opt-in. float16 / bfloat16 inputs always use tensor cores with
float32 accumulation (about 1e-3 / 1e-2 relative).

Layouts. ``x`` and ``residual`` are read through their strides: NCHW, channels_last, or a
strided view such as a channel slice of a packed tensor, with no copy. channels_last is the
fast layout (the reduction runs along the channels, which are then contiguous); NCHW works at
lower speed. ``out`` is allocated channels_last when ``x``'s channel stride is smaller than
its width stride (channels_last, or a channel slice of a channels_last tensor), else NCHW
(contiguous). ``weight`` is read through its strides too; channels_last (channels contiguous,
what the ranking engine passes) is its fast layout. Where channels are contiguous and every
channel offset, width and other stride is a multiple of 4 (``_vector_widths``; the Track-1
widths are), the kernel reads and writes 4 channels per vector (8 bytes in bfloat16, which can
then be copied asynchronously and pipelined; element by element, 2-byte loads cannot), else one
channel at a time.

``FASTSUPERNET_TRITON_CONFIG=I`` (read per call) runs configuration ``_CONFIGS[I]`` instead of
autotuning (quick checks, tests, and each configuration checked alone);
``FASTSUPERNET_TRITON_CONFIG=static`` picks, per call and without timing anything, the
configuration that issues the fewest instructions for that call's widths by the loop counts of
the kernel compiled for sm_90 (:func:`static_config`): one compile per call kind instead of the
autotuner's sweep, and tiles fitted to each layer (a single fixed tile is 2x-2.5x off on the
16x16 and 8x8 layers by those counts).

Under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors through the interpreter
(slow: for tests on small shapes), with one fixed small configuration instead of autotuning,
and compile-time trip counts (``CBLOCKS`` channel blocks per tap, enough for the widest
candidate; the masks skip the rest): a run-time loop bound makes the interpreter convert a
1-element array to a Python int, which numpy deprecates (and numpy >= 2.3 refuses). The
interpreter has no bfloat16 arithmetic; float32 and float16 work there.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch
import triton
import triton.language as tl

__all__ = ["multi_conv2d_triton", "sliced_conv2d_triton", "ACTIVATIONS", "INPUT_PRECISIONS"]

ACTIVATIONS = ("none", "relu", "prelu")
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Output pixels per statistics partial. Every BLOCK_M is a multiple of it.
STATS_CHUNK = 32
# Tile widths that have a channel-tile table; BLOCK_N picks row BLOCK_N // 32 of the tables.
_BLOCK_N_CHOICES = (16, 32, 64)


@triton.jit
def _conv_step(
    acc,
    a_tile,  # (BLOCK_M, BLOCK_K) pointers to x[n, in_offset + c, oh * stride - padding, ow * stride - padding]
    b_tile,  # (BLOCK_K, BLOCK_N) pointers to weight[row_offset + j, c, 0, 0]
    taps_in,  # (BLOCK_M,) bit r * KSIZE + s set where tap (r, s) lies inside x (else zero padding)
    valid_j,  # (BLOCK_N,) channel j exists in this candidate
    in_width,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wc,
    stride_wh,
    stride_ww,
    r,  # filter tap row
    s,  # filter tap column
    c0,  # first input channel of the block
    KSIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += A[:, (t, cs)] @ B[(t, cs), :] for the filter tap t = (r, s) and the input channels
    cs = c0 + [0, BLOCK_K) (those below in_width)."""
    valid_c = tl.arange(0, BLOCK_K) < in_width - c0
    inside = ((taps_in >> (r * KSIZE + s)) & 1) != 0

    a = tl.load(a_tile + (r * stride_xh + s * stride_xw + c0 * stride_xc), mask=inside[:, None] & valid_c[None, :],
                other=0.0)
    b = tl.load(b_tile + (c0 * stride_wc + r * stride_wh + s * stride_ww), mask=valid_c[:, None] & valid_j[None, :],
                other=0.0)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


# Sizes change from call to call: no specialised variants for them (strides keep theirs: a
# unit channel stride is what makes channels_last loads contiguous).
_NOT_SPECIALIZED = ["tiles_start", "tiles_len", "M", "H", "W", "Wo", "HWo", "C_out", "padding", "num_chunks",
                    "tune_m", "tune_n", "tune_k"]
# The image, row and pixel strides of channels_last tensors are multiples of their packed
# channel counts, which a ranking run changes from group to group: a variant per "divisible by
# 16 or not" pattern would be compiled (and autotuned) again and again. What the loads need of
# them, divisibility by the vector width, the VEC_X / VEC_W flags say instead; the channel
# strides keep their specialisation (1: the contiguous dimension).
_NO_ALIGNMENT_VARIANTS = ["stride_xn", "stride_xh", "stride_xw", "stride_on", "stride_oh", "stride_ow",
                          "stride_rn", "stride_rh", "stride_rw", "stride_wo", "stride_wh", "stride_ww"]


@triton.jit(do_not_specialize=_NOT_SPECIALIZED, do_not_specialize_on_alignment=_NO_ALIGNMENT_VARIANTS)
def _multi_conv2d_kernel(
    x_ptr,  # (N, C_in, H, W), any strides
    w_ptr,  # (R, C_max, KSIZE, KSIZE), any strides
    out_ptr,  # (N, C_out, H', W'), any strides
    scale_ptr,  # (C_out,)
    shift_ptr,  # (C_out,)
    res_ptr,  # out's shape, any strides
    slope_ptr,  # (K,): one PReLU slope per candidate
    psum_ptr,  # (num_chunks, C_out) float64 partial sums
    psq_ptr,  # (num_chunks, C_out) float64 partial sums of squares
    meta_ptr,  # int32: (K, 5) candidate rows, then one channel-tile table per BLOCK_N
    tiles_start,  # where the tables start in meta
    tiles_len,  # length of one table: [T, (candidate, first channel) * T, padding]
    M,  # N * H' * W'
    H,
    W,
    Wo,
    HWo,
    C_out,
    conv_stride,
    padding,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    stride_rn,
    stride_rc,
    stride_rh,
    stride_rw,
    stride_wo,
    stride_wc,
    stride_wh,
    stride_ww,
    num_chunks,  # cdiv(M, STATS_CHUNK)
    tune_m,  # autotuning keys (size buckets), unused by the kernel
    tune_n,
    tune_k,
    KSIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 none, 1 relu, 2 prelu
    STATS: tl.constexpr,
    STATS_CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    VEC_X: tl.constexpr,  # x, out and residual: channel offsets, widths and pixel strides are multiples of VEC_X
    VEC_W: tl.constexpr,  # weight: row and pixel strides are multiples of VEC_W
    CBLOCKS: tl.constexpr,  # 0: loop over the reduction at run time; > 0: CBLOCKS channel blocks per tap
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # -- which pixels, which candidate, which of its output channels
    pid = tl.program_id(0)
    table = meta_ptr + tiles_start + (BLOCK_N // 32) * tiles_len
    num_tiles = tl.load(table)
    pid_m = pid // num_tiles
    pid_t = pid - pid_m * num_tiles
    cand = tl.load(table + 1 + 2 * pid_t)
    first = tl.load(table + 2 + 2 * pid_t)
    row = meta_ptr + cand * 5
    in_offset = tl.load(row + 0)
    in_width = tl.load(row + 1)
    out_width = tl.load(row + 2)
    row_offset = tl.load(row + 3)
    out_offset = tl.load(row + 4)
    first = tl.multiple_of(first, BLOCK_N)  # the channel tiles start at multiples of BLOCK_N
    # Divisibility the host has checked (_vector_widths): with it the compiler loads and stores
    # VEC_X (VEC_W) consecutive channels as one vector, asynchronously where it pipelines. The
    # strides then arrive divided by the vector width; multiplying them here is what tells the
    # compiler they are multiples of it.
    if VEC_X > 1:
        in_offset = tl.multiple_of(in_offset, VEC_X)
        in_width = tl.multiple_of(in_width, VEC_X)
        out_offset = tl.multiple_of(out_offset, VEC_X)
        out_width = tl.multiple_of(out_width, VEC_X)
        stride_xn, stride_xh, stride_xw = stride_xn * VEC_X, stride_xh * VEC_X, stride_xw * VEC_X
        stride_on, stride_oh, stride_ow = stride_on * VEC_X, stride_oh * VEC_X, stride_ow * VEC_X
        stride_rn, stride_rh, stride_rw = stride_rn * VEC_X, stride_rh * VEC_X, stride_rw * VEC_X
    if VEC_W > 1:
        in_width = tl.multiple_of(in_width, VEC_W)
        stride_wo, stride_wh, stride_ww = stride_wo * VEC_W, stride_wh * VEC_W, stride_ww * VEC_W

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (n, oh, ow)
    valid_m = m < M
    n = m // HWo
    hw = m - n * HWo
    oh = hw // Wo
    ow = hw - oh * Wo
    n64 = n.to(tl.int64)

    j = first + tl.arange(0, BLOCK_N)  # output channels of the candidate
    valid_j = j < out_width
    c_out = out_offset + j  # ... and of out

    # -- out[m, c_out] = sum over taps t and input channels c of A[m, (t, c)] * B[(t, c), j]
    ih0 = oh * conv_stride - padding  # tap (r, s) reads x[..., ih0 + r, iw0 + s]
    iw0 = ow * conv_stride - padding
    # the taps inside x, once per pixel: bit r * KSIZE + s (an absent pixel has none)
    taps_in = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for tr in tl.static_range(KSIZE):
        for ts in tl.static_range(KSIZE):
            inside = valid_m & (0 <= ih0 + tr) & (ih0 + tr < H) & (0 <= iw0 + ts) & (iw0 + ts < W)
            taps_in = taps_in | (inside.to(tl.int32) << (tr * KSIZE + ts))
    k = tl.arange(0, BLOCK_K)
    x_pix = n64 * stride_xn + (in_offset * stride_xc + ih0 * stride_xh + iw0 * stride_xw)
    a_tile = x_ptr + x_pix[:, None] + (k * stride_xc)[None, :]
    b_tile = w_ptr + ((row_offset + j) * stride_wo)[None, :] + (k * stride_wc)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if CBLOCKS > 0:
        # compile-time trip counts, for the interpreter (whose run-time loop bounds trip numpy)
        for r in range(KSIZE):
            for s in range(KSIZE):
                for cb in range(CBLOCKS):
                    acc = _conv_step(acc, a_tile, b_tile, taps_in, valid_j, in_width, stride_xc, stride_xh,
                                     stride_xw, stride_wc, stride_wh, stride_ww, r, s, cb * BLOCK_K, KSIZE,
                                     INPUT_PRECISION, BLOCK_K)
    else:
        # one loop over all (tap, channel block) steps, so that it pipelines; the step's tap by a
        # float reciprocal instead of an integer division (exact: (step + 0.5) / num_cblocks is at
        # least 0.5 / num_cblocks from an integer, its float product off by < 2^-21 * KSIZE^2)
        num_cblocks = tl.cdiv(in_width, BLOCK_K)
        inv_cblocks = 1.0 / num_cblocks.to(tl.float32)
        for step in range(0, KSIZE * KSIZE * num_cblocks):
            tap = ((step + 0.5) * inv_cblocks).to(tl.int32)
            r = tap // KSIZE
            s = tap - r * KSIZE
            c0 = (step - tap * num_cblocks) * BLOCK_K
            acc = _conv_step(acc, a_tile, b_tile, taps_in, valid_j, in_width, stride_xc, stride_xh,
                             stride_xw, stride_wc, stride_wh, stride_ww, r, s, c0, KSIZE, INPUT_PRECISION,
                             BLOCK_K)

    # -- statistics of the conv output: float64 sums over chunks of STATS_CHUNK pixels
    if STATS:
        y64 = acc.to(tl.float64)  # rows of absent pixels are 0
        chunks: tl.constexpr = BLOCK_M // STATS_CHUNK
        chunk_sum = tl.sum(tl.reshape(y64, (chunks, STATS_CHUNK, BLOCK_N)), axis=1)
        chunk_sq = tl.sum(tl.reshape(y64 * y64, (chunks, STATS_CHUNK, BLOCK_N)), axis=1)
        rows = pid_m * chunks + tl.arange(0, chunks)
        p_offs = rows.to(tl.int64)[:, None] * C_out + c_out[None, :]
        p_mask = (rows < num_chunks)[:, None] & valid_j[None, :]
        tl.store(psum_ptr + p_offs, chunk_sum, mask=p_mask)
        tl.store(psq_ptr + p_offs, chunk_sq, mask=p_mask)

    # -- epilogue: scale, shift, residual, activation
    y = acc
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + c_out, mask=valid_j, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + c_out, mask=valid_j, other=0.0).to(tl.float32)[None, :]
    mask = valid_m[:, None] & valid_j[None, :]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + (n64 * stride_rn + oh * stride_rh + ow * stride_rw)[:, None] + (c_out * stride_rc)[None, :]
        y = y + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == 1:
        y = tl.where(y < 0, 0.0, y)
    if ACTIVATION == 2:
        slope = tl.load(slope_ptr + cand).to(tl.float32)
        y = tl.where(y > 0, y, slope * y)

    o_ptrs = out_ptr + (n64 * stride_on + oh * stride_oh + ow * stride_ow)[:, None] + (c_out * stride_oc)[None, :]
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# Autotuning picks the tiles per size bucket on a GPU: widths of 4..64 channels, with 1x1 and
# 3x3 filters. Every BLOCK_M is a multiple of STATS_CHUNK and every BLOCK_N in _BLOCK_N_CHOICES.
_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    # (appended: the indices above are FASTSUPERNET_TRITON_CONFIG's) narrow layers, inputs of
    # at most 16 channels, where the pruning leaves only 64x16x16: twice the pixels per weight
    # load and loop iteration (on sm_90 with vector loads, 74 multiply-adds per warp instruction
    # of its reduction loop instead of 49: benchmarks/triton_sass.py)
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=4),
]


def _prune_configs(configs, named_args, **kwargs):
    """Drops tiles wider than the widest candidate (its width bucket) in N or in K."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= args["tune_n"] and c.kwargs["BLOCK_K"] <= args["tune_k"]]
    return kept or configs[:1]


_TUNE_KEY = ["tune_m", "tune_n", "tune_k", "KSIZE", "HAS_SCALE", "HAS_SHIFT", "HAS_RESIDUAL", "ACTIVATION",
             "STATS", "INPUT_PRECISION", "VEC_X", "VEC_W"]
# Pixel counts above this share one tuning bucket: every tile then has many programs to fill the
# GPU, and the recalibration and evaluation batches of all three resolutions tune once.
_TUNE_M_CAP = 8192


def _short_bench(kernel_call, quantiles):
    """Autotuning compiles every surviving configuration once per set of constexpr flags and
    times each per key: 25 ms per configuration instead of Triton's default 125."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# (cache_results: the chosen configurations are kept in Triton's cache directory for later processes)
_multi_conv2d_tuned = triton.autotune(
    configs=_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_short_bench, cache_results=True,
)(_multi_conv2d_kernel)

# The interpreter does not benchmark: it runs one fixed, small configuration.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}
# Tests set this to run the GPU's run-time reduction loop in the interpreter too (numpy < 2.3 only).
_INTERPRET_RUNTIME_LOOP = False

assert all(c.kwargs["BLOCK_N"] in _BLOCK_N_CHOICES and c.kwargs["BLOCK_M"] % STATS_CHUNK == 0 for c in _CONFIGS)
assert _INTERPRETER_CONFIG["BLOCK_N"] in _BLOCK_N_CHOICES and _INTERPRETER_CONFIG["BLOCK_M"] % STATS_CHUNK == 0
assert all(_BLOCK_N_CHOICES.index(b) == b // 32 for b in _BLOCK_N_CHOICES)


CONFIG_ENV_VAR = "FASTSUPERNET_TRITON_CONFIG"
STATIC = "static"

# Multiply-adds per warp instruction of each configuration's reduction loop (index as _CONFIGS),
# compiled for sm_90 on the 4-channel vector path, by operand kind: counted by
# benchmarks/triton_sass.py (benchmarks/RESULTS.md, "The Triton conv kernel compiled for sm_90").
# What the static choice weighs; tests check the table's shape, not the counts.
LOOP_RATES = {
    "bf16": (49, 132, 144, 256, 321, 405, 74),  # (also float16: the same mma shapes)
    "tf32": (44, 120, 139, 234, 309, 377, 71),
    "tf32x3": (24, 43, 57, 72, 97, 101, 32),
    "ieee": (18, 24, 25, 26, 27, 27, 22),  # fp32 FMAs
}


def static_config(m: int, in_widths, out_widths, rates) -> int:
    """The index into ``_CONFIGS`` that issues the fewest loop instructions for one call: per
    configuration the multiply-adds it computes, padding included (pixels rounded up to
    BLOCK_M, each candidate's output channels to BLOCK_N and input channels to BLOCK_K), over
    its multiply-adds per warp instruction (``rates``, one of :data:`LOOP_RATES`). Memory
    traffic and occupancy are not modelled: a first choice, not a measurement."""
    best, best_cost = 0, None
    for i, c in enumerate(_CONFIGS):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        padded = sum(triton.cdiv(o, bn) * bn * triton.cdiv(a, bk) * bk for a, o in zip(in_widths, out_widths))
        cost = triton.cdiv(m, bm) * bm * padded / rates[i]
        if best_cost is None or cost < best_cost:
            best, best_cost = i, cost
    return best


def _rates_of(dtype: torch.dtype, input_precision: str) -> tuple[int, ...]:
    return LOOP_RATES["bf16" if dtype in (torch.bfloat16, torch.float16) else input_precision]


def fixed_config() -> triton.Config | str | None:
    """The configuration named by ``$FASTSUPERNET_TRITON_CONFIG``: ``_CONFIGS[I]`` for an index,
    :data:`STATIC` for ``static`` (chosen per call, :func:`static_config`), or None (unset,
    empty or ``autotune``: autotuning on a GPU, the small fixed configuration in the
    interpreter). A fixed configuration skips the autotuner's compile-and-time sweep of every
    new shape bucket (tests, quick checks) and lets each configuration be checked alone."""
    value = os.environ.get(CONFIG_ENV_VAR, "").strip().lower()
    if value in ("", "autotune"):
        return None
    if value == STATIC:
        return STATIC
    try:
        index = int(value)
    except ValueError:
        index = -1
    if not 0 <= index < len(_CONFIGS):
        raise ValueError(
            f"environment variable {CONFIG_ENV_VAR}={value!r}: expected 'autotune', 'static' or an index "
            f"0..{len(_CONFIGS) - 1} into the Triton conv configurations"
        )
    return _CONFIGS[index]


def _interpreted() -> bool:
    # triton.jit returns an interpreter object instead of a JITFunction when TRITON_INTERPRET=1
    # was set at import time.
    return not isinstance(_multi_conv2d_kernel, triton.runtime.jit.JITFunction)


class _Metadata:
    """Per-candidate rows and channel-tile tables of one set of candidates, in one int32 tensor.

    ``meta[5 * k : 5 * k + 5] = (in_offset, in_width, out_width, row_offset, out_offset)`` of
    candidate ``k``; then, at ``tiles_start + i * tiles_len`` for ``BLOCK_N = _BLOCK_N_CHOICES[i]``,
    ``[T, cand_0, first_0, cand_1, first_1, ...]``: ``T`` channel tiles, tile ``t`` covering
    channels ``[first_t, first_t + BLOCK_N)`` (clipped to its width) of candidate ``cand_t``.
    """

    def __init__(self, in_offsets, in_widths, out_widths, row_offsets, device):
        k = len(out_widths)
        out_offsets = [sum(out_widths[:i]) for i in range(k)]
        fields = zip(in_offsets, in_widths, out_widths, row_offsets, out_offsets)
        rows = [v for row in fields for v in row]
        self.num_tiles = {}
        tables = []
        for block_n in _BLOCK_N_CHOICES:
            tiles = [(i, f) for i in range(k) for f in range(0, out_widths[i], block_n)]
            self.num_tiles[block_n] = len(tiles)
            tables.append([len(tiles)] + [v for t in tiles for v in t])
        self.tiles_start = len(rows)
        self.tiles_len = max(len(t) for t in tables)
        flat = rows + [v for t in tables for v in t + [0] * (self.tiles_len - len(t))]
        self.tensor = torch.tensor(flat, dtype=torch.int32).to(device)
        self.max_in_width = max(in_widths)
        self.max_out_width = max(out_widths)
        self._widths = (tuple(in_widths), tuple(out_widths))
        self._static: dict[tuple, int] = {}

    def static_choice(self, m: int, rates: tuple[int, ...]) -> int:
        """:func:`static_config` for these candidates, remembered per (pixels, rates)."""
        key = (m, rates)
        if key not in self._static:
            self._static[key] = static_config(m, *self._widths, rates)
        return self._static[key]


# Metadata of recent candidate sets, per device: a repeated call makes no host-to-device copy.
_META_CACHE: OrderedDict = OrderedDict()
_META_CACHE_SIZE = 256
_META_LOCK = threading.Lock()


def _metadata(in_offsets, in_widths, out_widths, row_offsets, device) -> _Metadata:
    key = (str(device), tuple(in_offsets), tuple(in_widths), tuple(out_widths), tuple(row_offsets))
    with _META_LOCK:
        meta = _META_CACHE.get(key)
        if meta is not None:
            _META_CACHE.move_to_end(key)
            return meta
    meta = _Metadata(in_offsets, in_widths, out_widths, row_offsets, device)
    with _META_LOCK:
        _META_CACHE[key] = meta
        if len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.popitem(last=False)
    return meta


VECTOR = 4  # channels per vector load where the layout allows (8 bytes of bfloat16, 16 of float32)


def _vector_widths(x, out, residual, weight, in_offsets, in_widths, out_widths) -> dict[str, int]:
    """The kernel's ``VEC_X`` and ``VEC_W``: ``VECTOR`` where that many consecutive channels can be
    loaded (stored) as one vector, else 1. Activations (x, out, residual) qualify when their
    channels are contiguous and their other strides, and every candidate's channel offsets and
    widths, are multiples of ``VECTOR``; the weight when its channels are contiguous (a
    channels_last 3x3 weight, any 1x1 weight) and its other strides and the input widths are
    multiples. The kernel takes these as promises, so they are checked exactly here."""
    def channels_vector(t) -> bool:  # (the stride of a dimension of size 1 never enters an address)
        dims = zip(range(4), t.stride(), t.shape)
        return t.stride(1) == 1 and all(st % VECTOR == 0 for i, st, size in dims if i != 1 and size > 1)

    widths_ok = all(v % VECTOR == 0 for v in (*in_widths, *in_offsets, *out_widths))
    acts = [x, out] + ([residual] if residual is not None else [])
    vec_x = VECTOR if widths_ok and all(channels_vector(t) for t in acts) else 1
    vec_w = VECTOR if all(v % VECTOR == 0 for v in in_widths) and channels_vector(weight) else 1
    return {"VEC_X": vec_x, "VEC_W": vec_w}


def _strides(t: torch.Tensor, vec: int) -> tuple[int, ...]:
    """``t``'s strides as the kernel takes them: with ``vec > 1`` every stride but the channels'
    divided by ``vec`` (exact: ``_vector_widths`` checked it; 0 for a dimension of size 1)."""
    if vec == 1:
        return tuple(t.stride())
    dims = enumerate(zip(t.stride(), t.shape))
    return tuple(st if i == 1 else (st // vec if size > 1 else 0) for i, (st, size) in dims)


def _bucket(v: int, lo: int = 16, hi: int | None = None) -> int:
    b = max(lo, triton.next_power_of_2(max(int(v), 1)))
    return b if hi is None else min(b, hi)


def _int_list(name: str, fn: str, v) -> list[int]:
    try:
        out = [int(e) for e in v]
    except TypeError:
        raise ValueError(f"{fn}: {name} must be a list of ints, got {type(v).__name__}") from None
    return out


def _check_vector(fn: str, name: str, t, length: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.dim() > 1 or t.numel() != length:  # (a 0-d tensor is taken for a single value)
        raise ValueError(f"{fn}: {name} must be 1-D of length {length}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{fn}: {name} must be floating point, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, x on {device}")
    return t.detach().reshape(-1).contiguous()


def _multi_conv2d(
    fn: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    in_offsets,
    in_widths,
    out_widths,
    row_offsets,
    stride: int,
    padding: int,
    scale,
    shift,
    residual,
    activation: str,
    prelu_slope,
    stats: bool,
    input_precision: str,
    poison: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # ---- validation
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{fn}: x must be a 4-D (N, C_in, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = getattr(weight, "shape", type(weight))
        raise ValueError(f"{fn}: weight must be a 4-D (R, C_max, k, k) tensor, got {got}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{fn}: x has dtype {x.dtype}; the triton backend takes float32, float16 or bfloat16")
    if weight.dtype != x.dtype:
        raise ValueError(f"{fn}: weight has dtype {weight.dtype}, x has {x.dtype}; they must match")
    if weight.device != x.device:
        raise ValueError(f"{fn}: weight is on {weight.device}, x on {x.device}")
    if x.device.type == "cpu" and not _interpreted():
        raise ValueError(f"{fn}: x is a CPU tensor; the triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: x is on {x.device}; the triton backend needs CUDA tensors")
    ksize = weight.shape[2]
    if weight.shape[3] != ksize or ksize not in (1, 3):
        raise ValueError(f"{fn}: weight must have a 1x1 or 3x3 kernel, got {tuple(weight.shape[2:])}")
    in_offsets = _int_list("in_offsets", fn, in_offsets)
    in_widths = _int_list("in_widths", fn, in_widths)
    out_widths = _int_list("out_widths", fn, out_widths)
    row_offsets = _int_list("row_offsets", fn, row_offsets)
    k = len(out_widths)
    if k == 0:
        raise ValueError(f"{fn}: out_widths is empty: need at least one candidate")
    lengths = {"in_offsets": len(in_offsets), "in_widths": len(in_widths), "out_widths": k,
               "row_offsets": len(row_offsets)}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"{fn}: in_offsets, in_widths, out_widths and row_offsets must have the same length, got {lengths}"
        )
    n_img, c_in, h, w = x.shape
    rows, c_max = weight.shape[0], weight.shape[1]
    for i in range(k):
        if in_widths[i] < 1:
            raise ValueError(f"{fn}: in_widths[{i}] = {in_widths[i]} must be >= 1")
        if out_widths[i] < 1:
            raise ValueError(f"{fn}: out_widths[{i}] = {out_widths[i]} must be >= 1")
        if in_offsets[i] < 0 or in_offsets[i] + in_widths[i] > c_in:
            raise ValueError(
                f"{fn}: in_offsets[{i}] / in_widths[{i}] select x channels [{in_offsets[i]}, "
                f"{in_offsets[i] + in_widths[i]}), out of range for x with {c_in} channels"
            )
        if in_widths[i] > c_max:
            raise ValueError(f"{fn}: in_widths[{i}] = {in_widths[i]} exceeds the {c_max} columns of weight")
        if row_offsets[i] < 0 or row_offsets[i] + out_widths[i] > rows:
            raise ValueError(
                f"{fn}: row_offsets[{i}] / out_widths[{i}] select weight rows [{row_offsets[i]}, "
                f"{row_offsets[i] + out_widths[i]}), out of range for weight with {rows} rows"
            )
    stride, padding = int(stride), int(padding)
    if stride < 1:
        raise ValueError(f"{fn}: stride must be >= 1, got {stride}")
    if padding < 0:
        raise ValueError(f"{fn}: padding must be >= 0, got {padding}")
    h_out = (h + 2 * padding - ksize) // stride + 1
    w_out = (w + 2 * padding - ksize) // stride + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"{fn}: x of spatial size {h}x{w} with padding {padding} is smaller than the {ksize}x{ksize} kernel"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"{fn}: input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    c_out = sum(out_widths)
    out_shape = (n_img, c_out, h_out, w_out)
    if scale is not None:
        scale = _check_vector(fn, "scale", scale, c_out, x.device)
    if shift is not None:
        shift = _check_vector(fn, "shift", shift, c_out, x.device)
    if activation == "prelu":
        if prelu_slope is None:
            raise ValueError(f"{fn}: activation 'prelu' needs prelu_slope")
        prelu_slope = _check_vector(fn, "prelu_slope", prelu_slope, k, x.device)
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != out_shape:
            got = tuple(getattr(residual, "shape", ()))
            raise ValueError(f"{fn}: residual must have out's shape {out_shape}, got {got}")
        if not residual.is_floating_point():
            raise ValueError(f"{fn}: residual must be floating point, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"{fn}: residual is on {residual.device}, x on {x.device}")
        residual = residual.detach()

    # ---- outputs
    x = x.detach()
    weight = weight.detach()
    channels_last = x.stride(1) < x.stride(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if poison:
        out.fill_(float("nan"))
    m = n_img * h_out * w_out
    if not stats:
        sums = torch.empty(0, dtype=torch.float64, device=x.device)
        sumsq = torch.empty(0, dtype=torch.float64, device=x.device)
    if m == 0:
        if stats:
            sums = torch.zeros(c_out, dtype=torch.float64, device=x.device)
            sumsq = torch.zeros(c_out, dtype=torch.float64, device=x.device)
        return out, sums, sumsq
    num_chunks = triton.cdiv(m, STATS_CHUNK)
    if stats:
        psum = torch.empty((num_chunks, c_out), dtype=torch.float64, device=x.device)
        psq = torch.empty((num_chunks, c_out), dtype=torch.float64, device=x.device)
        if poison:
            psum.fill_(float("nan"))
            psq.fill_(float("nan"))
    else:
        psum = psq = out  # never written

    # ---- launch
    meta = _metadata(in_offsets, in_widths, out_widths, row_offsets, x.device)
    res = residual if residual is not None else out
    vec = _vector_widths(x, out, residual, weight, in_offsets, in_widths, out_widths)
    args = (
        x, weight, out,
        scale if scale is not None else out,
        shift if shift is not None else out,
        res,
        prelu_slope if prelu_slope is not None else out,
        psum, psq,
        meta.tensor, meta.tiles_start, meta.tiles_len,
        m, h, w, w_out, h_out * w_out, c_out,
        stride, padding,
        *_strides(x, vec["VEC_X"]), *_strides(out, vec["VEC_X"]),
        *(_strides(res, vec["VEC_X"]) if residual is not None else (0, 0, 0, 0)), *_strides(weight, vec["VEC_W"]),
        num_chunks,
        _bucket(m, hi=_TUNE_M_CAP), _bucket(meta.max_out_width, hi=64), _bucket(meta.max_in_width, hi=64),
    )
    flags = dict(
        KSIZE=ksize,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=ACTIVATIONS.index(activation),
        STATS=bool(stats),
        STATS_CHUNK=STATS_CHUNK,
        INPUT_PRECISION=input_precision,
        **vec,
    )

    def grid(meta_args):
        return (triton.cdiv(m, meta_args["BLOCK_M"]) * meta.num_tiles[meta_args["BLOCK_N"]],)

    fixed = fixed_config()
    if isinstance(fixed, str):  # STATIC (a Config's == compares with configs only)
        fixed = _CONFIGS[meta.static_choice(m, _rates_of(x.dtype, input_precision))]
    if _interpreted():
        cfg = _INTERPRETER_CONFIG if fixed is None else fixed.kwargs
        cblocks = 0 if _INTERPRET_RUNTIME_LOOP else triton.cdiv(meta.max_in_width, cfg["BLOCK_K"])
        _multi_conv2d_kernel[grid(cfg)](*args, **flags, CBLOCKS=cblocks, **cfg)
    elif fixed is not None:
        with torch.cuda.device(x.device):
            _multi_conv2d_kernel[grid(fixed.kwargs)](
                *args, **flags, CBLOCKS=0, **fixed.kwargs, num_warps=fixed.num_warps, num_stages=fixed.num_stages
            )
    else:
        with torch.cuda.device(x.device):
            _multi_conv2d_tuned[grid](*args, **flags, CBLOCKS=0)
    if stats:
        sums, sumsq = psum.sum(dim=0), psq.sum(dim=0)
    return out, sums, sumsq


def multi_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_offsets: list[int],
    in_widths: list[int],
    out_widths: list[int],
    row_offsets: list[int],
    stride: int,
    padding: int,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    prelu_slope: torch.Tensor | None,
    stats: bool,
    *,
    input_precision: str = "ieee",
    _poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ``K`` candidates of a ``multi_conv2d`` in one launch; returns ``(out, sum, sumsq)``.

    Candidate ``k`` convolves ``x[:, in_offsets[k] : in_offsets[k] + in_widths[k]]`` with
    ``weight[row_offsets[k] : row_offsets[k] + out_widths[k], :in_widths[k]]`` (read in place)
    into channels ``[o_k, o_k + out_widths[k])`` of ``out``, ``o_k = sum(out_widths[:k])``, then
    applies the epilogue (scale, shift, residual, activation; see the module docstring).
    ``sum`` / ``sumsq``: float64 per-channel statistics of the conv output before the
    epilogue when ``stats``, else empty float64 tensors. Forward only (no autograd).

    ``input_precision``: ``"ieee"`` (float32-exact, default), ``"tf32"`` or ``"tf32x3"`` for
    float32 inputs. ``_poison`` fills the outputs and partial buffers with NaN before the
    launch (tests: an element the kernel forgets stays NaN).
    """
    return _multi_conv2d(
        "multi_conv2d", x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding,
        scale, shift, residual, activation, prelu_slope, stats, input_precision, _poison,
    )


def sliced_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    out_rows: int,
    row_offset: int,
    stride: int,
    padding: int,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    prelu_slope: torch.Tensor | None,
    stats: bool,
    *,
    input_precision: str = "ieee",
    _poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sliced_conv2d``: the one-candidate ``multi_conv2d`` with ``in_offset 0`` and
    ``in_width = x.size(1)``, i.e. ``conv(x, weight[row_offset : row_offset + out_rows, :C_in])``
    plus the epilogue; ``prelu_slope`` has one element. Returns ``(out, sum, sumsq)``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"sliced_conv2d: x must be a 4-D (N, C_in, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(
            f"sliced_conv2d: weight must be a 4-D (R, C_max, k, k) tensor, got {getattr(weight, 'shape', type(weight))}"
        )
    out_rows, row_offset = int(out_rows), int(row_offset)
    if x.shape[1] < 1 or x.shape[1] > weight.shape[1]:
        raise ValueError(f"sliced_conv2d: x has {x.shape[1]} channels but weight only {weight.shape[1]} columns")
    if out_rows < 1 or row_offset < 0 or row_offset + out_rows > weight.shape[0]:
        raise ValueError(
            f"sliced_conv2d: out_rows / row_offset select weight rows [{row_offset}, {row_offset + out_rows}), "
            f"out of range for weight with {weight.shape[0]} rows"
        )
    return _multi_conv2d(
        "sliced_conv2d", x, weight, [0], [x.shape[1]], [out_rows], [row_offset], stride, padding,
        scale, shift, residual, activation, prelu_slope, stats, input_precision, _poison,
    )
