"""CPU kernels of ``fastsupernet::multi_conv2d`` and ``fastsupernet::sliced_conv2d``.

Oracle: a loop of ``F.conv2d`` in float64 over each candidate's slices of x and of the packed
weight, then the epilogue (``* scale``, ``+ shift``, ``+ residual``, activation), all in float64.
The statistics oracle is the float64 per-channel sum and sum of squares of the float64 conv
output before the epilogue.

Error bounds, per output element (u = 2**-24 for float32, 2**-53 for float64; d = the
element's reduction length in_width * kh * kw; A = the same conv on |x| and |w|, i.e.
sum |w| |x| over the d terms):

* conv output: the kernel adds the d products in one sequential chain (one rounding per
  fused multiply-add, or two without FMA), so ``|y - y_exact| <= 2 d u A``;
* epilogue: at most four more roundings, each relative to the magnitude the value has then;
  we propagate ``mag = (A * |scale| + |shift| + |residual|) * max(1, |slope|)`` and allow
  ``(2 d + 8) u mag`` (for float64 the oracle's own error is of the same order, so we allow
  twice that). For the float32 shapes here (d <= 576) that is at most ~7e-5 relative to mag,
  typically ~1e-6: the "rtol ~1e-4 relative to the float64 oracle" of a float32 kernel; for
  float64 ~1e-13 relative.
* statistics (float64 accumulation of the output values before the epilogue): the sum over
  a channel's n values is within ``sum_i e_i + (n + 2) u64 sum_i |y_i|`` of the oracle, e_i the
  per-element conv bound above; the sum of squares within
  ``sum_i e_i (2 |y_i| + e_i) + (n + 2) u64 sum_i y_i^2``. Without epilogue the output holds
  exactly the values the statistics add, and they must match the float64 sums of the output
  to ``(n + 2) u64`` relative.

Inputs are ``randn * 2 + 0.5`` (never zero; nonzero mean); packed weights have more rows and
columns than any candidate uses, and candidates start at row offsets > 0. The ops allocate
their outputs, so instead of poisoning output buffers we check exact shapes, dtypes, layout
and that every value is finite; a child process checks that no read leaves the input tensors
(guard pages). The portable kernel (``FASTSUPERNET_CPU_KERNEL=generic``) runs a subset; the
whole file passes under it too.
"""
from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import fastsupernet._C  # noqa: F401  (registers the ops)
from conv_oracle import assert_stats_match_output, assert_stats_within, cpu_env, epilogue

try:  # fake (meta) kernels, where the Python side defines them
    import fastsupernet.ops._registration  # noqa: F401
except ImportError:  # pragma: no cover
    pass

OPS = torch.ops.fastsupernet
U = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
ACTS = ("none", "relu", "prelu")


def _rand(*shape, dtype=torch.float32, gen=None):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _layout(x: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """x in the requested memory layout, same values."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":  # a view of a wider tensor: channel and image strides differ
        n, c, h, w = x.shape
        big = _rand(n, c + 5, h, w, dtype=x.dtype, gen=gen)
        big[:, 2 : 2 + c] = x
        return big[:, 2 : 2 + c]
    if layout == "row_slice":  # columns of a wider tensor: unit W stride, rows W + 3 apart
        n, c, h, w = x.shape
        big = _rand(n, c, h, w + 3, dtype=x.dtype, gen=gen)
        big[..., 1 : 1 + w] = x
        return big[..., 1 : 1 + w]
    if layout == "strided_w":  # every other column of a wider tensor: W stride 2
        n, c, h, w = x.shape
        big = _rand(n, c, h, 2 * w, dtype=x.dtype, gen=gen)
        big[..., ::2] = x
        return big[..., ::2]
    raise AssertionError(layout)


class Case:
    """Arguments of one multi_conv2d call plus its oracle."""

    def __init__(self, *, N, C, H, W, kh, kw, stride, padding, in_offsets, in_widths, out_widths, row_offsets,
                 dtype, scale=False, shift=False, residual=False, activation="none", stats=False, seed=0,
                 layout="nchw", weight_view=False):
        g = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.K = len(in_offsets)
        self.M = sum(out_widths)
        rows = max(r + o for r, o in zip(row_offsets, out_widths)) + 2
        cols = max(in_widths) + 3
        self.x = _layout(_rand(N, C, H, W, dtype=dtype, gen=g), layout, g)
        w = _rand(rows, cols, kh, kw, dtype=dtype, gen=g) * (1.0 / math.sqrt(max(in_widths) * kh * kw))
        if weight_view:  # a non-contiguous view of a larger parameter
            big = _rand(rows + 1, cols + 2, kh, kw, dtype=dtype, gen=g)
            big[1:, 2:] = w
            w = big[1:, 2:]
        self.weight = w
        self.args = dict(in_offsets=list(in_offsets), in_widths=list(in_widths), out_widths=list(out_widths),
                         row_offsets=list(row_offsets), stride=stride, padding=padding)
        self.Ho = (H + 2 * padding - kh) // stride + 1
        self.Wo = (W + 2 * padding - kw) // stride + 1
        self.scale = _rand(self.M, dtype=dtype, gen=g) if scale else None
        self.shift = _rand(self.M, dtype=dtype, gen=g) if shift else None
        self.residual = _rand(N, self.M, self.Ho, self.Wo, dtype=dtype, gen=g) if residual else None
        self.activation = activation
        self.slope = None
        if activation == "prelu":  # slopes of both signs
            self.slope = (torch.rand(self.K, generator=g, dtype=torch.float64) - 0.3).to(dtype)
        self.stats = stats
        self.kh, self.kw = kh, kw

    def run(self):
        a = self.args
        return OPS.multi_conv2d(self.x, self.weight, a["in_offsets"], a["in_widths"], a["out_widths"],
                                a["row_offsets"], a["stride"], a["padding"], self.scale, self.shift, self.residual,
                                self.activation, self.slope, self.stats)

    def oracle(self):
        a = self.args
        x64, w64 = self.x.double(), self.weight.double()
        ys, absys, depth, cand = [], [], [], []
        for k, (off, iw, ow, ro) in enumerate(zip(a["in_offsets"], a["in_widths"], a["out_widths"], a["row_offsets"])):
            xs, wk = x64[:, off : off + iw], w64[ro : ro + ow, :iw]
            ys.append(F.conv2d(xs, wk, stride=a["stride"], padding=a["padding"]))
            absys.append(F.conv2d(xs.abs(), wk.abs(), stride=a["stride"], padding=a["padding"]))
            depth += [iw * self.kh * self.kw] * ow
            cand += [k] * ow
        y, absy = torch.cat(ys, 1), torch.cat(absys, 1)
        depth = torch.tensor(depth, dtype=torch.float64).view(1, -1, 1, 1)
        z, mag = epilogue(y, absy, self.scale, self.shift, self.residual, self.activation, self.slope, cand)
        return z, y, absy, depth, mag

    def check(self, out, s, q):
        u = U[self.dtype]
        factor = 2.0 if self.dtype == torch.float64 else 1.0
        N = self.x.shape[0]
        assert out.shape == (N, self.M, self.Ho, self.Wo)
        assert out.dtype == self.dtype and out.is_contiguous()
        assert torch.isfinite(out).all()
        z, y, absy, depth, mag = self.oracle()
        err = (out.double() - z).abs()
        bound = factor * (2 * depth + 8) * u * mag + 1e-300
        worst = (err / bound).max().item() if err.numel() else 0.0
        assert worst <= 1.0, f"output error {worst:.3g} x the bound"
        assert s.dtype == torch.float64 and q.dtype == torch.float64
        if not self.stats:
            assert s.numel() == 0 and q.numel() == 0
            return
        assert s.shape == (self.M,) and q.shape == (self.M,)
        assert torch.isfinite(s).all() and torch.isfinite(q).all()
        assert_stats_within(s, q, y, factor * 2 * depth * u * absy)
        identity = self.scale is None and self.shift is None and self.residual is None and self.activation == "none"
        if identity:  # out holds the very values the statistics add: a tight check
            assert_stats_match_output(s, q, out)


def _sliced(case: Case):
    """The same computation through sliced_conv2d (K = 1, offset 0, in_width = x.size(1))."""
    a = case.args
    assert case.K == 1 and a["in_offsets"] == [0] and a["in_widths"] == [case.x.shape[1]]
    return OPS.sliced_conv2d(case.x, case.weight, a["out_widths"][0], a["row_offsets"][0], a["stride"],
                             a["padding"], case.scale, case.shift, case.residual, case.activation, case.slope,
                             case.stats)


DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]


# --- every epilogue combination, multi (packed, K = 3) and sliced --------------------------
EPILOGUES = list(itertools.product([False, True], [False, True], [False, True], ACTS, [False, True]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale,shift,residual,activation,stats", EPILOGUES)
def test_epilogues(dtype, scale, shift, residual, activation, stats):
    kw = dict(scale=scale, shift=shift, residual=residual, activation=activation, stats=stats, dtype=dtype)
    multi = Case(N=3, C=9, H=7, W=9, kh=3, kw=3, stride=1, padding=1, in_offsets=[0, 0, 2],
                 in_widths=[5, 3, 7], out_widths=[3, 5, 1], row_offsets=[1, 4, 2], **kw)
    multi.check(*multi.run())
    sliced = Case(N=2, C=6, H=8, W=8, kh=3, kw=3, stride=2, padding=1, in_offsets=[0], in_widths=[6],
                  out_widths=[5], row_offsets=[3], **kw)
    sliced.check(*_sliced(sliced))


# --- geometry: odd sizes, strides, kernels, layouts ---------------------------------------
GEOMETRIES = [
    # N, H, W, kh, kw, stride, padding
    (1, 1, 1, 1, 1, 1, 0),
    (3, 1, 1, 3, 3, 1, 1),
    (1, 5, 5, 3, 3, 1, 1),
    (3, 5, 5, 3, 3, 2, 1),
    (3, 7, 7, 3, 3, 1, 1),
    (1, 7, 7, 3, 3, 2, 1),
    (3, 8, 8, 3, 3, 1, 1),
    (3, 8, 8, 3, 3, 2, 1),
    (3, 8, 8, 1, 1, 1, 0),
    (3, 8, 8, 1, 1, 2, 0),
    (1, 7, 7, 1, 1, 2, 0),
    (2, 5, 11, 1, 1, 1, 0),
    (2, 16, 16, 3, 3, 1, 1),
    (2, 16, 16, 3, 3, 2, 1),
    (2, 16, 24, 1, 1, 1, 0),
    (1, 32, 32, 3, 3, 1, 1),
    (1, 32, 32, 3, 3, 2, 1),
    (1, 32, 32, 1, 1, 2, 0),
    (2, 9, 6, 3, 1, 1, 0),  # non-square kernel, no padding
    (2, 6, 9, 3, 3, 1, 2),  # padding wider than the kernel reach
    (2, 9, 9, 5, 5, 3, 2),  # 5x5, stride 3
    (2, 1, 1, 1, 1, 2, 1),  # strided 1x1 that reads only padding
]
LAYOUTS = ["nchw", "channels_last", "channel_slice", "row_slice", "strided_w"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "n{}_{}x{}_k{}x{}_s{}_p{}".format(*g))
def test_geometry(geom, layout, dtype):
    N, H, W, kh, kw, stride, padding = geom
    rng = random.Random(zlib.crc32(repr((geom, layout)).encode()))
    C = rng.choice([3, 8, 13])
    K = rng.choice([1, 2, 4])
    in_widths = [rng.randint(1, C) for _ in range(K)]
    in_offsets = [rng.randint(0, C - w) for w in in_widths]
    out_widths = [rng.choice([1, 3, 5, 8]) for _ in range(K)]
    row_offsets = [rng.randint(0, 6) for _ in range(K)]
    case = Case(N=N, C=C, H=H, W=W, kh=kh, kw=kw, stride=stride, padding=padding, in_offsets=in_offsets,
                in_widths=in_widths, out_widths=out_widths, row_offsets=row_offsets, dtype=dtype, scale=True,
                shift=True, residual=rng.random() < 0.5, activation=rng.choice(ACTS), stats=True, layout=layout,
                weight_view=rng.random() < 0.5, seed=rng.randint(0, 1000))
    case.check(*case.run())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("geom", GEOMETRIES[::3], ids=lambda g: "n{}_{}x{}_k{}x{}_s{}_p{}".format(*g))
def test_sliced_geometry(geom, dtype):
    N, H, W, kh, kw, stride, padding = geom
    for width, rows in ((1, 1), (4, 3), (11, 5)):
        case = Case(N=N, C=width, H=H, W=W, kh=kh, kw=kw, stride=stride, padding=padding, in_offsets=[0],
                    in_widths=[width], out_widths=[rows], row_offsets=[2], dtype=dtype, scale=True, shift=True,
                    activation="relu", stats=True, seed=width)
        case.check(*_sliced(case))


# --- many candidates: shared input (prefix-tree children) and packed inputs ----------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("K", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("inputs", ["shared", "packed", "mixed"])
def test_many_candidates(K, inputs, dtype):
    rng = random.Random(K * 7 + len(inputs))
    cmax = 12
    in_widths = [rng.randint(1, cmax) for _ in range(K)]
    if inputs == "shared":
        C, in_offsets = cmax, [0] * K
    elif inputs == "packed":  # candidate k reads its own slice of a packed input
        in_offsets = [sum(in_widths[:k]) for k in range(K)]
        C = sum(in_widths)
    else:  # runs of equal offsets, interleaved, overlapping slices
        C = cmax + 4
        starts = [0, 4, 2]
        in_offsets = [starts[(k // 3) % 3] for k in range(K)]
        in_widths = [min(w, C - o) for w, o in zip(in_widths, in_offsets)]
    out_widths = [rng.randint(1, 9) for _ in range(K)]
    row_offsets = [rng.randint(0, 20) for _ in range(K)]
    stride = 2 if K % 2 else 1
    case = Case(N=2, C=C, H=8, W=7, kh=3, kw=3, stride=stride, padding=1, in_offsets=in_offsets,
                in_widths=in_widths, out_widths=out_widths, row_offsets=row_offsets, dtype=dtype, scale=True,
                shift=True, residual=True, activation="prelu", stats=True, seed=K)
    case.check(*case.run())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("N", [1, 3])
def test_weights_larger_than_one_panel_group(N, dtype):
    """Packed weights of several MiB: blocks run in several cache-sized groups, and with N = 1
    the blocks are also split across work items."""
    rng = random.Random(N)
    K = 64
    in_widths = [rng.randint(1, 48) for _ in range(K)]
    out_widths = [rng.randint(1, 40) for _ in range(K)]
    case = Case(N=N, C=48, H=3, W=4, kh=3, kw=3, stride=1, padding=1, in_offsets=[0] * K, in_widths=in_widths,
                out_widths=out_widths, row_offsets=[rng.randint(0, 8) for _ in range(K)], dtype=dtype, scale=True,
                shift=True, activation="relu", stats=True, seed=N)
    case.check(*case.run())


def test_generic_kernel_matches_oracle(monkeypatch):
    """The portable kernel (CPUs without AVX2/FMA) on a few cases, forced by the environment."""
    monkeypatch.setenv("FASTSUPERNET_CPU_KERNEL", "generic")
    for dtype in DTYPES:
        for geom in [(3, 8, 8, 3, 3, 1, 1), (2, 7, 7, 3, 3, 2, 1), (2, 16, 16, 1, 1, 1, 0), (1, 5, 9, 1, 1, 2, 0)]:
            N, H, W, kh, kw, stride, padding = geom
            case = Case(N=N, C=10, H=H, W=W, kh=kh, kw=kw, stride=stride, padding=padding, in_offsets=[0, 0, 3],
                        in_widths=[10, 4, 7], out_widths=[5, 3, 9], row_offsets=[1, 0, 2], dtype=dtype, scale=True,
                        shift=True, residual=True, activation="prelu", stats=True, layout="channel_slice")
            case.check(*case.run())


def test_avx512_kernel_equals_avx2():
    """The AVX-512 kernel (float32: row-pair tiles of 16 lanes) runs the same chain of fused
    multiply-adds per output as the AVX2 one: outputs equal bit for bit, and the float64
    statistics to their rounding (the per-tile partial sums group 8 vectors instead of 3), over
    random shapes (odd sizes, 1x1 and 3x3, stride 1 and 2, 1..9 rows per candidate so every
    block height and pair, up to 3 tiles of 8 vectors per row: tiles of contiguous 16-pixel runs
    and tiles of row pairs), epilogues and input layouts."""
    from fastsupernet.ops._extension import cpu_conv_isa

    if cpu_conv_isa() != "avx512":
        pytest.skip(f"this CPU runs the {cpu_conv_isa()} kernel")
    rng = random.Random(512)
    # the direct kernels (Winograd is AVX2 on both)
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD="0", FASTSUPERNET_CPU_KERNEL=None):
        for trial in range(40):
            h, w = rng.choice([1, 3, 7, 8, 9, 16, 17, 33]), rng.choice([1, 5, 8, 15, 16, 24, 33])
            kernel, stride = rng.choice([1, 3]), rng.choice([1, 2])
            padding = kernel // 2 if rng.random() < 0.8 else 0
            if (h + 2 * padding - kernel) < 0 or (w + 2 * padding - kernel) < 0:
                padding = kernel // 2
            K = rng.choice([1, 2, 3, 5, 8, 13])
            in_w = [rng.randint(1, 20) for _ in range(K)]
            out_w = [rng.randint(1, 9) for _ in range(K)]
            shared = rng.random() < 0.5
            in_off = [0] * K if shared else [sum(in_w[:i]) for i in range(K)]
            cin = max(in_w) if shared else sum(in_w)
            rows = sum(out_w) + 5
            gen = torch.Generator().manual_seed(trial)
            x = _layout(_rand(rng.randint(1, 3), cin, h, w, gen=gen), rng.choice(["nchw", "channels_last"]), gen)
            weight = _rand(rows, max(in_w) + 2, kernel, kernel, gen=gen)
            M = sum(out_w)
            ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
            act = rng.choice(ACTS)
            affine = act != "none" or rng.random() < 0.5
            scale = _rand(M, gen=gen) if affine else None
            shift = _rand(M, gen=gen) if affine else None
            residual = _rand(x.shape[0], M, ho, wo, gen=gen) if affine and rng.random() < 0.4 else None
            slope = _rand(K, gen=gen) if act == "prelu" else None
            stats = not affine or rng.random() < 0.3
            args = (x, weight, in_off, in_w, out_w, [rng.randint(0, rows - o) for o in out_w], stride, padding,
                    scale, shift, residual, act, slope, stats)
            wide = OPS.multi_conv2d(*args)
            with cpu_env(FASTSUPERNET_CPU_KERNEL="avx2"):
                narrow = OPS.multi_conv2d(*args)
            where = (trial, h, w, kernel, stride, K, in_w, out_w, act)
            assert torch.equal(wide[0], narrow[0]), where
            for a, b in zip(wide[1:], narrow[1:]):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=0, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "channel_slice", "row_slice", "channels_last"])
@pytest.mark.parametrize("hw", [(16, 16), (16, 17), (15, 16), (16, 15), (17, 17), (32, 32), (7, 6)])
def test_stride2_copies(hw, layout, segments):
    """A 3x3 stride-2 padding-1 layer builds its phase-split scratch with dedicated copies: on
    AVX-512 CPUs a 16x16 input plane is written as 19 whole vectors, each a permute of two input
    rows (rows 17 values apart); elsewhere the rows of one segment (candidates reading one input
    slice) are deinterleaved (both stride phases from one read) or copied phase by phase (an odd
    width), and several segments take the prefetching loop. float32 against the float64
    oracle, with more channels than one register tile reduces over and several images; on
    AVX-512 CPUs also bit for bit against the AVX2 kernel (same sums, other copy)."""
    from fastsupernet.ops._extension import cpu_conv_isa

    H, W = hw
    in_offsets = [0, 0, 0] if segments == 1 else [0, 2, 0]
    case = Case(N=3, C=19, H=H, W=W, kh=3, kw=3, stride=2, padding=1, in_offsets=in_offsets,
                in_widths=[19, 13, 7], out_widths=[9, 4, 6], row_offsets=[0, 3, 1], dtype=torch.float32, scale=True,
                shift=True, residual=True, activation="relu", stats=True, layout=layout, seed=H * 100 + W)
    got = case.run()
    case.check(*got)
    if cpu_conv_isa() == "avx512":
        with cpu_env(FASTSUPERNET_CPU_KERNEL="avx2"):
            narrow = case.run()
        assert torch.equal(got[0], narrow[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ["32x32 direct", "16x16 winograd", "24-wide"])
def test_streaming_stores_change_no_value(shape, dtype):
    """Outputs of 16 MiB and more are written with streaming stores (whole aligned vectors; the
    others, and every output with FASTSUPERNET_CPU_STREAM_STORES=0, with normal ones): the same
    bits, statistics included, with every epilogue part, through the direct kernel (32-wide and
    24-wide rows: some vectors unaligned) and through Winograd (float32)."""
    N, C, H, W, M = {"32x32 direct": (16, 6, 32, 32, 256), "16x16 winograd": (64, 16, 16, 16, 256),
                     "24-wide": (29, 6, 24, 24, 256)}[shape]
    assert N * M * H * W * torch.tensor([], dtype=dtype).element_size() >= 16 << 20
    g = torch.Generator().manual_seed(5)
    x = _rand(N, C, H, W, dtype=dtype, gen=g)
    w = _rand(M // 2 + 1, C, 3, 3, dtype=dtype, gen=g) * 0.3
    res = _rand(N, M, H, W, dtype=dtype, gen=g)
    scale, shift, slope = _rand(M, dtype=dtype, gen=g), _rand(M, dtype=dtype, gen=g), _rand(2, dtype=dtype, gen=g)
    args = (x, w, [0, 0], [C, C - 1], [M // 2, M // 2], [0, 1], 1, 1, scale, shift, res, "prelu", slope, True)
    streamed = OPS.multi_conv2d(*args)
    with cpu_env(FASTSUPERNET_CPU_STREAM_STORES="0"):
        plain = OPS.multi_conv2d(*args)
    assert torch.isfinite(plain[0]).all()
    for a, b in zip(streamed, plain):
        assert torch.equal(a, b)


def test_threads_do_not_change_results():
    """The work split depends on the shape only for the statistics; outputs are per element."""
    case = Case(N=5, C=16, H=16, W=16, kh=3, kw=3, stride=1, padding=1, in_offsets=[0, 0], in_widths=[16, 9],
                out_widths=[16, 7], row_offsets=[0, 3], dtype=torch.float32, scale=True, shift=True,
                activation="relu", stats=True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = case.run()
        torch.set_num_threads(max(2, n))
        many = case.run()
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    case.check(*many)


@pytest.mark.parametrize("kernel", ["avx2", "generic"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_candidate_values_do_not_depend_on_its_row_blocks(kernel, dtype, monkeypatch):
    """Rows are cut into register blocks per run of rows (4 + ... or 3 + 3 ...), and a run spans
    every candidate of a shared input: a candidate's values and statistics are the same bits
    whatever its neighbours (so whatever blocks its rows fall into)."""
    if kernel == "generic":
        monkeypatch.setenv("FASTSUPERNET_CPU_KERNEL", "generic")
    monkeypatch.setenv("FASTSUPERNET_CPU_WINOGRAD", "0")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 12, 9, 8, generator=g, dtype=dtype)
    w = torch.randn(16, 12, 3, 3, generator=g, dtype=dtype)
    for width in range(1, 14):
        outs = []
        for before in ([], [1], [2], [3], [5, 2]):
            K = len(before) + 1
            y, s, q = OPS.multi_conv2d(x, w, [0] * K, [12] * K, before + [width], [0] * K, 1, 1, None, None, None,
                                       "none", None, True)
            start = sum(before)
            outs.append((y[:, start:start + width], s[start:start + width], q[start:start + width]))
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                assert torch.equal(a, b), width


def test_empty_batch():
    x = _rand(0, 4, 5, 5)
    w = _rand(6, 4, 3, 3)
    out, s, q = OPS.multi_conv2d(x, w, [0], [4], [3], [1], 1, 1, None, None, None, "none", None, True)
    assert out.shape == (0, 3, 5, 5)
    assert s.tolist() == [0.0] * 3 and q.tolist() == [0.0] * 3


def test_output_is_nchw_for_channels_last_input():
    x = _rand(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    w = _rand(8, 8, 3, 3)
    out, _, _ = OPS.sliced_conv2d(x, w, 8, 0, 1, 1, None, None, None, "none", None, False)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)


# --- memory safety ----------------------------------------------------------------------------
_GUARD_SCRIPT = r'''
import ctypes
import itertools
import mmap
import os

import torch
import torch.nn.functional as F

import fastsupernet._C  # noqa: F401

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
mappings = []


def guarded(shape, dtype, at_end):
    # a tensor that starts right after, or ends right before, an inaccessible page
    n = 1
    for s in shape:
        n *= s
    nbytes = n * torch.tensor([], dtype=dtype).element_size()
    pages = (nbytes + PAGE - 1) // PAGE
    m = mmap.mmap(-1, (pages + 2) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(base, PAGE, 0) == 0
    assert libc.mprotect(base + (pages + 1) * PAGE, PAGE, 0) == 0
    offset = PAGE + (pages * PAGE - nbytes if at_end else 0)
    mappings.append(m)
    return torch.frombuffer(m, dtype=dtype, count=n, offset=offset).view(shape)


GEOMETRIES = [  # N, C, H, W, k, stride, padding
    (2, 3, 5, 5, 3, 1, 1), (2, 3, 5, 5, 3, 2, 1), (1, 4, 8, 8, 1, 1, 0), (1, 4, 8, 8, 1, 2, 0),
    (2, 5, 7, 9, 3, 2, 1), (1, 2, 16, 16, 3, 2, 1), (1, 2, 9, 16, 1, 1, 0), (3, 2, 1, 1, 1, 1, 0),
    (1, 3, 7, 7, 3, 1, 2), (1, 2, 6, 6, 5, 3, 2),
    # float32 ones take the Winograd path (3x3, stride 1, W % 8 == 0, even H, width 20):
    # F(4x4) for 8x8 and 4x16, F(2x2) for 6x24
    (1, 20, 8, 8, 3, 1, 1), (1, 20, 6, 24, 3, 1, 1), (2, 20, 4, 16, 3, 1, 1),
]
count = 0
for dtype, (N, C, H, W, k, s, p), at_end in itertools.product(
        [torch.float32, torch.float64], GEOMETRIES, [True, False]):
    x = guarded((N, C, H, W), dtype, at_end)
    x.copy_(torch.randn(N, C, H, W, dtype=dtype))
    w = guarded((4, C, k, k), dtype, at_end)
    w.copy_(torch.randn(4, C, k, k, dtype=dtype))
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    res = guarded((N, 6, Ho, Wo), dtype, at_end)
    res.copy_(torch.randn(N, 6, Ho, Wo, dtype=dtype))
    out, _, _ = torch.ops.fastsupernet.multi_conv2d(
        x, w, [0, C - 1], [C, 1], [4, 2], [0, 1], s, p, None, None, res, "relu", None, True)
    ref = torch.cat([F.conv2d(x, w, stride=s, padding=p),
                     F.conv2d(x[:, C - 1:], w[1:3, :1], stride=s, padding=p)], 1)
    # unnormalised weights: outputs up to ~15, where float32 Winograd F(4x4) errs by ~1e-4
    # (its error bound is tests/test_conv_winograd.py's; this test is about the reads)
    tol = 1e-3 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(out, torch.relu(ref + res), rtol=1e-4, atol=tol)
    xcl = guarded((N, H, W, C), dtype, at_end)  # channels_last storage
    xcl.copy_(x.permute(0, 2, 3, 1))
    out, _, _ = torch.ops.fastsupernet.sliced_conv2d(
        xcl.permute(0, 3, 1, 2), w, 4, 0, s, p, None, None, None, "none", None, False)
    torch.testing.assert_close(out, F.conv2d(x, w, stride=s, padding=p), rtol=1e-4, atol=tol)
    # the weight gradient reads x and grad_out (direct kernel; Winograd F(4x4) where forced)
    gy = guarded((N, 6, Ho, Wo), dtype, at_end)
    gy.copy_(torch.randn(N, 6, Ho, Wo, dtype=dtype))
    want = torch.zeros(4, C, k, k, dtype=dtype)
    want += torch.nn.grad.conv2d_weight(x, (4, C, k, k), gy[:, :4], stride=s, padding=p)
    want[1:3, :1] += torch.nn.grad.conv2d_weight(x[:, C - 1:], (2, 1, k, k), gy[:, 4:], stride=s, padding=p)
    for flag in ("1", "all"):
        os.environ["FASTSUPERNET_CPU_WINOGRAD"] = flag
        got = torch.ops.fastsupernet.multi_conv2d_weight_grad(gy, x, w, [0, C - 1], [C, 1], [4, 2], [0, 1], s, p)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    del os.environ["FASTSUPERNET_CPU_WINOGRAD"]
    count += 1
print("ok", count)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mmap/mprotect guard pages")
@pytest.mark.parametrize("kernel", ["auto", "generic"])
def test_reads_stay_inside_the_tensors(kernel):
    """x (NCHW and channels_last), weight, residual and (for the weight gradient) grad_out placed
    against inaccessible guard pages at either end: a read outside a tensor (by a short vector at
    the end of a row, or by the strided copy) crashes the child process. Software prefetches
    never fault: not covered."""
    env = dict(os.environ)
    if kernel == "generic":
        env["FASTSUPERNET_CPU_KERNEL"] = "generic"
    proc = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok 52"


# --- validation -----------------------------------------------------------------------------
def _multi_args(**over):
    args = dict(x=_rand(2, 6, 5, 5), weight=_rand(8, 6, 3, 3), in_offsets=[0, 1], in_widths=[3, 4],
                out_widths=[2, 3], row_offsets=[0, 4], stride=1, padding=1, scale=None, shift=None, residual=None,
                activation="none", prelu_slope=None, stats=False)
    args.update(over)
    return list(args.values())


BAD_MULTI = {
    "x_3d": dict(x=_rand(2, 6, 5)),
    "weight_3d": dict(weight=_rand(8, 6, 3)),
    "x_int": dict(x=torch.ones(2, 6, 5, 5, dtype=torch.int64)),
    "x_half": dict(x=_rand(2, 6, 5, 5).half(), weight=_rand(8, 6, 3, 3).half()),
    "dtype_mismatch": dict(weight=_rand(8, 6, 3, 3, dtype=torch.float64)),
    "no_candidates": dict(in_offsets=[], in_widths=[], out_widths=[], row_offsets=[]),
    "list_lengths": dict(in_widths=[3]),
    "input_range": dict(in_offsets=[0, 3]),
    "negative_offset": dict(in_offsets=[-1, 1]),
    "zero_in_width": dict(in_widths=[0, 4]),
    "in_width_over_weight": dict(weight=_rand(8, 3, 3, 3)),
    "row_range": dict(row_offsets=[0, 6]),
    "zero_out_width": dict(out_widths=[0, 3]),
    "stride_0": dict(stride=0),
    "negative_padding": dict(padding=-1),
    "kernel_too_big": dict(x=_rand(2, 6, 1, 1), padding=0),
    "scale_shape": dict(scale=_rand(4)),
    "shift_2d": dict(shift=_rand(5, 1)),
    "residual_shape": dict(residual=_rand(2, 5, 4, 4)),
    "activation": dict(activation="gelu"),
    "prelu_without_slope": dict(activation="prelu"),
    "prelu_slope_count": dict(activation="prelu", prelu_slope=_rand(1)),
}


@pytest.mark.parametrize("name", list(BAD_MULTI))
def test_multi_validation(name):
    with pytest.raises((ValueError, TypeError)):
        OPS.multi_conv2d(*_multi_args(**BAD_MULTI[name]))


def test_sliced_validation():
    x, w = _rand(2, 6, 5, 5), _rand(8, 6, 3, 3)
    call = OPS.sliced_conv2d
    with pytest.raises(ValueError):
        call(_rand(2, 7, 5, 5), w, 4, 0, 1, 1, None, None, None, "none", None, False)  # more channels than columns
    with pytest.raises(ValueError):
        call(x, w, 0, 0, 1, 1, None, None, None, "none", None, False)
    with pytest.raises(ValueError):
        call(x, w, 4, 5, 1, 1, None, None, None, "none", None, False)
    with pytest.raises(ValueError):
        call(x, w, 4, 0, 1, 1, None, None, None, "prelu", _rand(2), False)
    with pytest.raises(ValueError):
        call(_rand(6, 5, 5), w, 4, 0, 1, 1, None, None, None, "none", None, False)
    out, s, q = call(x, w, 4, 0, 1, 1, None, None, None, "prelu", _rand(1), False)
    assert out.shape == (2, 4, 5, 5)


# --- opcheck ---------------------------------------------------------------------------------
def _has_fake(qualname: str) -> bool:
    try:
        from torch._library.simple_registry import singleton

        return singleton.find(qualname).fake_impl.kernel is not None
    except Exception:  # pragma: no cover  (private API moved)
        return False


def test_opcheck():
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:  # pragma: no cover
        pytest.skip("torch.library.opcheck not available")
    for name in ("multi_conv2d", "sliced_conv2d"):
        utils = ("test_schema", "test_faketensor") if _has_fake(f"fastsupernet::{name}") else ("test_schema",)
        op = getattr(OPS, name).default
        x, w = _rand(2, 6, 7, 7), _rand(8, 6, 3, 3)
        for act, stats in (("relu", True), ("prelu", False)):
            if name == "multi_conv2d":
                args = (x, w, [0, 2], [6, 3], [3, 2], [1, 5], 2, 1, _rand(5), _rand(5), _rand(2, 5, 4, 4), act,
                        _rand(2), stats)
            else:
                args = (x, w, 5, 2, 1, 1, _rand(5), None, _rand(2, 5, 7, 7), act, _rand(1), stats)
            opcheck(op, args, test_utils=utils)


# --- input gradient of 3x3 stride-2 padding-1 layers (the polyphase kernel) -------------------
def _s2_input_grad_oracle(g, x_shape, weight, in_offsets, in_widths, out_widths, row_offsets):
    """(exact, A, d): the float64 input gradient of the candidates' convolutions, the same on
    |g| and |w| (the magnitude the roundings are relative to), and each channel's longest
    chain (4 taps per output channel of a candidate reading it)."""
    N, C, H, W = x_shape
    exact = torch.zeros(x_shape, dtype=torch.float64)
    mag = torch.zeros(x_shape, dtype=torch.float64)
    d = torch.zeros(C, dtype=torch.float64)
    x0 = torch.zeros(x_shape, dtype=torch.float64)
    o = 0
    for io, iw, ow, ro in zip(in_offsets, in_widths, out_widths, row_offsets):
        gk, wk = g[:, o : o + ow].double(), weight[ro : ro + ow, :iw].double()
        for dst, gg, ww in ((exact, gk, wk), (mag, gk.abs(), wk.abs())):
            dst[:, io : io + iw] += torch.ops.aten.convolution_backward(
                gg, x0[:, io : io + iw], ww, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        d[io : io + iw] = torch.maximum(d[io : io + iw], torch.tensor(4.0 * ow))
        o += ow
    return exact, mag, d.view(1, -1, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hw", [(16, 16), (32, 32), (15, 9), (8, 7), (1, 1), (2, 3), (5, 33)])
@pytest.mark.parametrize("inputs", ["one", "packed", "shared"])
def test_s2_input_grad(hw, inputs, dtype):
    """``_cpu_conv2d_s2_input_grad`` (the phases on the direct kernel: float32 16x16 layers on
    AVX-512 CPUs take Winograd by default, tested in test_conv_winograd_s2.py) against the
    float64 input gradient of each candidate's
    3x3 stride-2 padding-1 convolution: odd and even sizes, widths 1..37, candidates tiling x
    (grad_x poisoned with NaN: every element must be written) or reading one shared slice
    (accumulate into a random grad_x), a grad_out with non-unit strides. Bound per element:
    one chain of at most d = 4 out_width fused multiply-adds per candidate, then one addition
    per candidate: (2 d + 2 K) u A, A the same gradient on |grad_out| and |w| plus |grad_x|'s
    initial value (float64: twice that, the oracle's own error)."""
    H, W = hw
    gen = torch.Generator().manual_seed(H * 100 + W)
    if inputs == "one":
        in_w, out_w = [13], [37]
        in_off = [0]
    else:
        in_w, out_w = [5, 1, 16, 3], [7, 2, 30, 1]
        in_off = [0] * 4 if inputs == "shared" else [sum(in_w[:k]) for k in range(4)]
    C = max(in_w) if inputs == "shared" else sum(in_w)
    rows = sum(out_w) + 4
    row_off = [rows - sum(out_w[: k + 1]) - 1 for k in range(len(out_w))]  # packed in reverse order
    weight = _rand(rows + 2, max(in_w) + 3, 3, 3, dtype=dtype, gen=gen)[1:-1]  # a view: rows apart by more
    N, Ho, Wo, M = 3, (H + 1) // 2, (W + 1) // 2, sum(out_w)
    g = _rand(N, M, Ho, Wo + 2, dtype=dtype, gen=gen)[..., 1 : 1 + Wo]  # rows Wo + 2 apart
    accumulate = inputs == "shared"
    start = _rand(N, C, H, W, dtype=dtype, gen=gen) if accumulate else torch.full((N, C, H, W), math.nan, dtype=dtype)
    gx = start.clone()
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD="0"):
        OPS._cpu_conv2d_s2_input_grad(g, weight, in_off, in_w, out_w, row_off, gx, accumulate)
    exact, mag, d = _s2_input_grad_oracle(g, (N, C, H, W), weight, in_off, in_w, out_w, row_off)
    if accumulate:
        exact, mag = exact + start.double(), mag + start.double().abs()
    assert torch.isfinite(gx).all()
    u, K = U[dtype], len(in_w)
    bound = (2.0 if dtype == torch.float64 else 1.0) * (2 * d + 2 * K) * u * mag + 1e-300
    worst = ((gx.double() - exact).abs() / bound).max().item()
    assert worst <= 1.0, f"input gradient error {worst:.3g} x the bound"


def test_s2_input_grad_kernels_agree():
    """The AVX-512, AVX2 and portable kernels compute the polyphase input gradient: AVX-512 and
    AVX2 bit for bit (the same chains of fused multiply-adds), the portable one within the bound;
    and one thread gives the bits of two."""
    gen = torch.Generator().manual_seed(7)
    g = _rand(5, 40, 8, 8, gen=gen)
    weight = _rand(44, 33, 3, 3, gen=gen)
    args = (g, weight, [0, 0], [32, 9], [24, 16], [3, 27])

    def run():
        gx = torch.zeros(5, 32, 16, 16)
        OPS._cpu_conv2d_s2_input_grad(*args, gx, True)
        return gx

    with cpu_env(FASTSUPERNET_CPU_WINOGRAD="0"):  # the phases on the direct kernel
        ref = run()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(run(), ref)
        finally:
            torch.set_num_threads(threads)
        with cpu_env(FASTSUPERNET_CPU_KERNEL="avx2"):
            assert torch.equal(run(), ref)
        with cpu_env(FASTSUPERNET_CPU_KERNEL="generic"):
            torch.testing.assert_close(run(), ref, rtol=1e-4, atol=1e-4)


def test_s2_input_grad_opcheck():
    """The mutating schema (grad_x written in place) is what the op does."""
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:  # pragma: no cover
        pytest.skip("torch.library.opcheck not available")
    gen = torch.Generator().manual_seed(1)
    args = (_rand(2, 9, 8, 8, gen=gen), _rand(20, 8, 3, 3, gen=gen), [0, 6], [6, 3], [4, 5], [0, 4],
            torch.zeros(2, 9, 16, 16), True)
    opcheck(OPS._cpu_conv2d_s2_input_grad.default, args, test_utils=("test_schema",))


@pytest.mark.parametrize("bad, match", [
    (dict(gx_shape=(2, 6, 16, 16), accumulate=False, in_off=[0, 0]), "exactly once"),
    (dict(g_hw=(7, 8)), "not the output of a 3x3 stride-2"),
    (dict(kernel=1), "3x3 kernel"),
    (dict(rows=[30, 0]), "weight rows"),
    (dict(gx_dtype=torch.float64), "float32 or all float64"),
])
def test_s2_input_grad_validation(bad, match):
    """Bad arguments name what is wrong, and grad_x is left as it was."""
    gen = torch.Generator().manual_seed(0)
    kernel = bad.get("kernel", 3)
    weight = _rand(20, 8, kernel, kernel, gen=gen)
    gh, gw = bad.get("g_hw", (8, 8))
    g = _rand(2, 9, gh, gw, gen=gen)
    gx = torch.ones(bad.get("gx_shape", (2, 9, 16, 16)), dtype=bad.get("gx_dtype", torch.float32))
    before = gx.clone()
    in_off = bad.get("in_off", [0, 6])
    with pytest.raises(ValueError if "dtype" not in str(bad) else TypeError, match=match):
        OPS._cpu_conv2d_s2_input_grad(g, weight, in_off, [6, 3], [4, 5], bad.get("rows", [0, 4]), gx,
                                      bad.get("accumulate", False))
    assert torch.equal(gx, before)
