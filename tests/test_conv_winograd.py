"""The Winograd paths of the CPU ``multi_conv2d`` (float32, AVX2 or AVX-512; 3x3, stride 1,
padding 1, output width a multiple of 8, even height): F(4x4, 3x3) where the output is 8, 16 or
32 wide, its height a multiple of 4 and x's columns contiguous, F(2x2, 3x3) elsewhere or with
``FASTSUPERNET_CPU_WINOGRAD_TILE=2``; per candidate, input width at least the thresholds of
csrc/cpu/conv.cpp (``min_width`` below). The cases run with ``FASTSUPERNET_CPU_WINOGRAD=all``
(every candidate, whatever its width), with either tile where the shape allows; the thresholds
have their own test.

Oracle: the same float64 oracle as tests/test_conv_cpu.py (a loop of ``F.conv2d`` per
candidate, then the epilogue). The error bounds are the ones csrc/cpu/conv_winograd.cpp states:
the conv value is within ``(in_width + c) u A_w`` of the exact one (c = 8 for F(2x2), 11 for
F(4x4)), ``A_w`` being the Winograd algorithm run in float64 on absolute values (``|A^T| [sum_c
(|G| |g| |G^T|) . (|B^T| |d| |B|)] |A|``, computed here with ``unfold``), plus 4 roundings for
the epilogue: ``(in_width + c + 4) u mag_w`` with ``mag_w = (A_w |scale| + |shift| +
|residual|) max(1, |slope|)``. The statistics bound is the conv bound summed over a channel plus
the float64 summation error.

Each case also runs with ``FASTSUPERNET_CPU_WINOGRAD=0`` (the direct kernel) and must differ
from it somewhere: the Winograd path really ran.
"""
from __future__ import annotations

import random
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

import fastsupernet._C  # noqa: F401  (registers the ops)
from fastsupernet.ops._extension import cpu_conv_isa, has_kernel

from conv_oracle import assert_stats_match_output, assert_stats_within, cpu_env, epilogue

OPS = torch.ops.fastsupernet
U32 = 2.0**-24


def _avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


pytestmark = pytest.mark.skipif(not (has_kernel("multi_conv2d", "CPU") and _avx2()),
                                reason="needs the compiled CPU kernels on an AVX2 + FMA CPU")

def _f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


MATRICES = {  # tile: (B^T, G, A^T), as in csrc/cpu/conv_winograd.cpp
    2: (_f64([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        _f64([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
        _f64([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (_f64([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
              [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        _f64([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        _f64([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])),
}
ROUNDINGS = {2: 8, 4: 11}  # conv value: (in_width + this) roundings of A_w


def winograd(x: torch.Tensor, w: torch.Tensor, tile: int, absolute: bool = True) -> torch.Tensor:
    """F(t x t, 3x3) in float64 (x: (N, C, H, W), w: (O, C, 3, 3); H, W multiples of t); with
    ``absolute``, on absolute values and matrices: A_w."""
    bt, g, at = (m.abs() if absolute else m for m in MATRICES[tile])
    x, w = (x.abs(), w.abs()) if absolute else (x, w)
    n, c, h, wd = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    d = xp.unfold(2, tile + 2, tile).unfold(3, tile + 2, tile)  # (N, C, H/t, W/t, t+2, t+2)
    v = bt @ d @ bt.T
    u = g @ w @ g.T  # (O, C, t+2, t+2)
    m = torch.einsum("ocab,ncyxab->noyxab", u, v)
    y = at @ m @ at.T  # (N, O, H/t, W/t, t, t)
    return y.permute(0, 1, 2, 4, 3, 5).reshape(n, w.shape[0], h, wd)


def winograd_abs(x: torch.Tensor, w: torch.Tensor, tile: int = 2) -> torch.Tensor:
    return winograd(x, w, tile)


def tile_of(x: torch.Tensor, forced: str | None = None) -> int:
    """The tile the kernel takes for this input (csrc/cpu/conv.cpp's winograd_tile)."""
    h, w = x.shape[2:]
    return 4 if forced != "2" and h % 4 == 0 and w in (8, 16, 32) and x.stride(3) == 1 else 2


@pytest.mark.parametrize("tile", [2, 4])
def test_absolute_oracle_bounds_the_conv(tile):
    """The oracle's own sanity: the float64 algorithm is the convolution; A_w >= |conv| and >=
    the direct |w| |x| sum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(winograd(x, w, tile, absolute=False), F.conv2d(x, w, padding=1), rtol=0, atol=1e-12)
    aw = winograd_abs(x, w, tile)
    assert (aw >= F.conv2d(x, w, padding=1).abs() - 1e-12).all()
    assert (aw >= F.conv2d(x.abs(), w.abs(), padding=1) - 1e-12).all()


class WCase:
    def __init__(self, *, N, H, W, in_offsets, in_widths, out_widths, row_offsets, C=None, scale=True, shift=True,
                 residual=True, activation="relu", stats=True, layout="nchw", weight_view=False, seed=0,
                 force_tile=None):
        g = torch.Generator().manual_seed(seed)
        self.K = len(in_offsets)
        self.M = sum(out_widths)
        C = C if C is not None else max(o + w for o, w in zip(in_offsets, in_widths))
        rows = max(r + o for r, o in zip(row_offsets, out_widths)) + 2
        cols = max(in_widths) + 3
        x = torch.randn(N, C, H, W, generator=g) * 2 + 0.5
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        self.x = x
        w = torch.randn(rows, cols, 3, 3, generator=g) / max(in_widths) ** 0.5 / 3
        if weight_view:
            big = torch.randn(rows + 1, cols + 2, 3, 3, generator=g)
            big[1:, 2:] = w
            w = big[1:, 2:]
        self.weight = w
        self.meta = (list(in_offsets), list(in_widths), list(out_widths), list(row_offsets))
        self.scale = torch.randn(self.M, generator=g) if scale else None
        self.shift = torch.randn(self.M, generator=g) if shift else None
        self.residual = torch.randn(N, self.M, H, W, generator=g) if residual else None
        self.activation = activation
        self.slope = (torch.rand(self.K, generator=g) - 0.3) if activation == "prelu" else None
        self.stats = stats
        self.force_tile = force_tile  # "2": FASTSUPERNET_CPU_WINOGRAD_TILE=2
        self.tile = tile_of(x, force_tile)

    def run(self, winograd: bool = True):
        with cpu_env(FASTSUPERNET_CPU_WINOGRAD="all" if winograd else "0",
                     FASTSUPERNET_CPU_WINOGRAD_TILE=self.force_tile):
            return OPS.multi_conv2d(self.x, self.weight, *self.meta, 1, 1, self.scale, self.shift, self.residual,
                                    self.activation, self.slope, self.stats)

    def check(self, out, s, q):
        io, iw, ow, ro = self.meta
        x64, w64 = self.x.double(), self.weight.double()
        ys, aws, depth, cand = [], [], [], []
        for k, (off, a, o, r) in enumerate(zip(io, iw, ow, ro)):
            xs, wk = x64[:, off : off + a], w64[r : r + o, :a]
            ys.append(F.conv2d(xs, wk, padding=1))
            aws.append(winograd_abs(xs, wk, self.tile))
            depth += [a] * o
            cand += [k] * o
        y, aw = torch.cat(ys, 1), torch.cat(aws, 1)
        depth = torch.tensor(depth, dtype=torch.float64).view(1, -1, 1, 1)
        z, mag = epilogue(y, aw, self.scale, self.shift, self.residual, self.activation, self.slope, cand)
        assert out.shape == z.shape and out.dtype == torch.float32 and out.is_contiguous()
        assert torch.isfinite(out).all()
        err = (out.double() - z).abs()
        c = ROUNDINGS[self.tile]
        worst = (err / ((depth + c + 4) * U32 * mag + 1e-300)).max().item()
        assert worst <= 1.0, f"output error {worst:.3g} x the bound (tile {self.tile})"
        if not self.stats:
            assert s.numel() == 0 and q.numel() == 0
            return
        assert_stats_within(s, q, y, (depth + c) * U32 * aw)


def _check_against_direct(case: WCase):
    out, s, q = case.run(True)
    case.check(out, s, q)
    direct = case.run(False)[0]
    assert not torch.equal(out, direct), "the Winograd path did not run"
    return out, s, q


SHAPES = [  # N, H, W. F(2x2): pairs of tile rows (W = 8), an odd tile-row count, 16/32-wide rows,
    # W % 16 == 8; F(4x4): 8/16/32-wide rows, 1 and 3 tile rows (groups of 8 tiles across images)
    (3, 8, 8), (2, 6, 8), (2, 16, 16), (1, 32, 32), (2, 4, 24), (2, 2, 40), (5, 12, 8), (3, 4, 16), (2, 4, 8),
    (1, 8, 32),
]


# every shape as the kernel chooses ("auto"), and F(2x2) forced where F(4x4) would run
SHAPE_TILES = [(s, "auto") for s in SHAPES] + [(s, "2") for s in SHAPES if s[1] % 4 == 0 and s[2] in (8, 16, 32)]


@pytest.mark.parametrize("shape,tile", SHAPE_TILES, ids=lambda v: "n{}_{}x{}".format(*v) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("inputs", ["shared", "packed", "mixed"])
def test_shapes_and_inputs(shape, inputs, tile):
    N, H, W = shape
    rng = random.Random(zlib.crc32(repr((shape, inputs)).encode()))
    K = rng.choice([1, 3, 6])
    in_widths = [rng.randint(20, 29) for _ in range(K)]
    if inputs == "shared":
        in_offsets = [0] * K
    elif inputs == "packed":
        in_offsets = [sum(in_widths[:k]) for k in range(K)]
    else:
        in_offsets = [(k // 2) * 3 for k in range(K)]
    out_widths = [rng.randint(1, 11) for _ in range(K)]
    row_offsets = [rng.randint(0, 9) for _ in range(K)]
    case = WCase(N=N, H=H, W=W, in_offsets=in_offsets, in_widths=in_widths, out_widths=out_widths,
                 row_offsets=row_offsets, activation=rng.choice(["none", "relu", "prelu"]),
                 residual=rng.random() < 0.5, seed=rng.randint(0, 999), force_tile=None if tile == "auto" else tile)
    assert case.tile == (2 if tile == "2" or not (H % 4 == 0 and W in (8, 16, 32)) else 4)
    _check_against_direct(case)


EPILOGUES = [  # scale, shift, residual, activation, stats
    (False, False, False, "none", True), (True, False, False, "none", False), (False, True, True, "relu", True),
    (True, True, True, "prelu", True), (True, True, False, "relu", False),
]


@pytest.mark.parametrize("tile", ["auto", "2"])
@pytest.mark.parametrize("scale,shift,residual,activation,stats", EPILOGUES)
def test_epilogues(scale, shift, residual, activation, stats, tile):
    case = WCase(N=2, H=8, W=16, in_offsets=[0, 0, 4], in_widths=[20, 23, 21], out_widths=[5, 8, 3],
                 row_offsets=[1, 7, 0], scale=scale, shift=shift, residual=residual, activation=activation,
                 stats=stats, seed=3, force_tile=None if tile == "auto" else tile)
    out, s, q = _check_against_direct(case)
    if not (scale or shift or residual) and activation == "none":  # out holds what the statistics add
        assert_stats_match_output(s, q, out)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_layouts_and_weight_views(layout):
    """channels_last inputs (columns not contiguous) take F(2x2) on every shape."""
    case = WCase(N=2, H=8, W=8, C=40, in_offsets=[3, 3], in_widths=[30, 17], out_widths=[6, 4], row_offsets=[2, 0],
                 layout=layout, weight_view=True, activation="prelu", seed=5)
    assert case.tile == (4 if layout == "nchw" else 2)
    _check_against_direct(case)


@pytest.mark.parametrize("tile", ["auto", "2"])
def test_several_chunks_and_a_partial_last_one(tile):
    """8x8 images with 16 channels: a chunk holds at most 256 KiB to 1 MiB of transformed input
    (a quarter of the L2), 9 KiB (F(4x4)) or 16 KiB (F(2x2)) per image, so 151 images make at
    least 2 chunks, the last one shorter (151 is odd)."""
    case = WCase(N=151, H=8, W=8, in_offsets=[0, 0], in_widths=[16, 16], out_widths=[3, 2], row_offsets=[0, 5],
                 seed=7, force_tile=None if tile == "auto" else tile)
    _check_against_direct(case)


@pytest.mark.parametrize("hw", [(8, 16), (6, 16)])
def test_sliced_conv2d_uses_it(hw):
    """Default thresholds: 24 input channels take F(4x4) on 8x16 outputs, F(2x2) on 6x16 ones
    (height not a multiple of 4) under AVX2's thresholds; the direct kernel is exact enough
    for neither bound to tell, so the direct run must differ too."""
    h, wd = hw
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 24, h, wd, generator=g)
    w = torch.randn(40, 30, 3, 3, generator=g) / 10
    tile = tile_of(x)
    if 24 < min_width(h, wd):
        pytest.skip(f"24 channels keep the direct kernel on {h}x{wd} outputs with {cpu_conv_isa()} kernels")
    out, _, _ = OPS.sliced_conv2d(x, w, 33, 4, 1, 1, None, None, None, "none", None, False)
    ref = F.conv2d(x.double(), w[4:37, :24].double(), padding=1)
    aw = winograd_abs(x.double(), w[4:37, :24].double(), tile)
    assert ((out.double() - ref).abs() <= (24 + ROUNDINGS[tile] + 4) * U32 * aw).all()
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD="0"):
        direct = OPS.sliced_conv2d(x, w, 33, 4, 1, 1, None, None, None, "none", None, False)[0]
    assert not torch.equal(out, direct)


def min_width(out_h: int, out_w: int) -> int:
    """The input width from which a candidate takes Winograd (csrc/cpu/conv.cpp)."""
    wide = cpu_conv_isa() == "avx512"
    if out_h % 4 == 0 and out_w in (8, 16, 32):  # F(4x4)
        return (20 if out_w >= 32 else 16 if out_w >= 16 else 8) if wide else 8
    if wide:
        return 20 if out_w <= 8 else 36
    return 8 if out_w <= 8 else 20


def _both_ways(x, w, C, stride, flag):
    outs = []
    for f in (flag, "0"):
        with cpu_env(FASTSUPERNET_CPU_WINOGRAD=f):
            outs.append(OPS.multi_conv2d(x, w, [0], [C], [9], [0], stride, 1, None, None, None, "none", None, True))
    return outs


def test_narrow_widths_and_other_shapes_keep_the_direct_kernel():
    """Inputs narrower than the threshold, stride 2, odd sizes: bitwise the same with the switch
    on (default thresholds) or off; at the threshold, Winograd runs."""
    g = torch.Generator().manual_seed(2)
    for (C, H, W, stride) in [(min_width(8, 8) - 1, 8, 8, 1), (min_width(16, 16) - 1, 16, 16, 1),
                              (min_width(8, 32) - 1, 8, 32, 1), (min_width(6, 16) - 1, 6, 16, 1),
                              (min_width(6, 8) - 1, 6, 8, 1), (24, 8, 8, 2), (24, 7, 8, 1), (24, 8, 12, 1)]:
        x = torch.randn(2, C, H, W, generator=g)
        w = torch.randn(9, C, 3, 3, generator=g)
        for a, b in zip(*_both_ways(x, w, C, stride, "1")):
            assert torch.equal(a, b), (C, H, W, stride)
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD="0"):
        assert OPS._cpu_winograd_min_width(8, 8) == -1 and OPS._cpu_winograd_tile(8, 8) == 0
    assert OPS._cpu_winograd_tile(7, 8) == 0 and OPS._cpu_winograd_tile(8, 12) == 0
    for H, W in [(8, 8), (16, 16), (8, 32), (6, 16), (6, 8), (4, 24)]:
        # what the benchmarks' floors read
        assert OPS._cpu_winograd_min_width(H, W) == min_width(H, W)
        assert OPS._cpu_winograd_tile(H, W) == (4 if H % 4 == 0 and W in (8, 16, 32) else 2)
        C = min_width(H, W)
        x = torch.randn(2, C, H, W, generator=g)
        w = torch.randn(9, C, 3, 3, generator=g)
        on, off = _both_ways(x, w, C, 1, "1")
        assert not torch.equal(on[0], off[0]), (C, H, W)


@pytest.mark.skipif(cpu_conv_isa() != "avx512", reason="needs a CPU with AVX-512 F/DQ/VL")
@pytest.mark.parametrize("tile", ["auto", "2"])
def test_avx512_gemm_step_equals_avx2(monkeypatch, tile):
    """The GEMM step on 512-bit row pairs runs the AVX2 step's fused multiply-add chains: the
    same outputs and statistics, bit for bit."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 40, 8, 16, generator=g)
    w = torch.randn(50, 40, 3, 3, generator=g) / 10
    meta = ([0, 0, 8], [40, 13, 32], [9, 6, 11], [0, 20, 30])  # rows 9 = 4 + 4 + 1 (a half-empty pair)
    scale = torch.randn(26, generator=g)
    monkeypatch.setenv("FASTSUPERNET_CPU_WINOGRAD", "all")
    if tile == "2":
        monkeypatch.setenv("FASTSUPERNET_CPU_WINOGRAD_TILE", "2")
    outs = []
    for kernel in ("avx512", "avx2"):
        monkeypatch.setenv("FASTSUPERNET_CPU_KERNEL", kernel)
        outs.append(OPS.multi_conv2d(x, w, *meta, 1, 1, scale, None, None, "none", None, True))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


_THREADS_SCRIPT = r"""
import torch, fastsupernet._C
g = torch.Generator().manual_seed(4)
x = torch.randn(40, 48, 8, 8, generator=g)
w = torch.randn(64, 48, 3, 3, generator=g) / 20
res = []
for t in (1, 2):
    torch.set_num_threads(t)
    res.append(torch.ops.fastsupernet.multi_conv2d(x, w, [0, 16], [32, 32], [30, 34], [0, 30], 1, 1, None, None,
                                                   None, "relu", None, True))
print(all(torch.equal(a, b) for a, b in zip(*res)))
"""


def test_threads_do_not_change_results():
    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_each_candidate_independent_of_the_others():
    """A candidate's output rows and statistics are bitwise the same alone and in a call with
    others: narrow ones (direct kernel) and a wide one (fewer images per chunk)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(37, 96, 8, 16, generator=g)
    w = torch.randn(40, 96, 3, 3, generator=g) / 30
    cands = [(0, 20, 7, 0), (4, 8, 5, 3), (0, 96, 6, 10), (10, 17, 9, 20), (10, 12, 4, 1)]  # offset, in, out, row
    meta = [list(c) for c in zip(*[(o, i, w_, r) for o, i, w_, r in cands])]
    out, s, q = OPS.multi_conv2d(x, w, *meta, 1, 1, None, None, None, "relu", None, True)
    row = 0
    for off, iw, ow, ro in cands:
        alone = OPS.multi_conv2d(x, w, [off], [iw], [ow], [ro], 1, 1, None, None, None, "relu", None, True)
        assert torch.equal(out[:, row : row + ow], alone[0])
        assert torch.equal(s[row : row + ow], alone[1]) and torch.equal(q[row : row + ow], alone[2])
        row += ow


# --- weight gradient: F(4x4) transposed -------------------------------------------------------
def winograd_grad_abs(x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """|G|^T [sum over images and tiles of (|A| |dY| |A^T|) . (|B^T| |d| |B|)] |G| in float64:
    the F(4x4) weight gradient run on absolute values, (O, C, 3, 3) for x (N, C, H, W) and
    gy (N, O, H, W)."""
    bt, g, at = (m.abs() for m in MATRICES[4])
    d = F.pad(x.abs(), (1, 1, 1, 1)).unfold(2, 6, 4).unfold(3, 6, 4)  # (N, C, H/4, W/4, 6, 6)
    v = bt @ d @ bt.T
    t = gy.abs().unfold(2, 4, 4).unfold(3, 4, 4)  # (N, O, H/4, W/4, 4, 4)
    u = at.T @ t @ at  # (N, O, H/4, W/4, 6, 6)
    m = torch.einsum("noyxab,ncyxab->ocab", u, v)
    return g.T @ m @ g


def _weight_grad(gy, x, w, meta, flag):
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD=flag):
        return OPS.multi_conv2d_weight_grad(gy, x, w, *meta, 1, 1)


GRAD_CASES = [  # N, C, H, W, (in_offsets, in_widths, out_widths, row_offsets)
    (3, 24, 8, 8, ([0, 2], [20, 22], [7, 5], [0, 3])),  # shared rows 3..6: added in candidate order
    (2, 40, 16, 16, ([0], [33], [17], [2])),
    (2, 17, 32, 32, ([0], [17], [9], [0])),
    (5, 24, 12, 8, ([0, 0], [24, 9], [6, 20], [0, 1])),  # groups of 8 tiles across images
    (37, 20, 4, 16, ([0, 3], [20, 1], [3, 2], [0, 4])),  # items of 10 images, a narrow candidate
    (70, 12, 8, 8, ([0], [12], [33], [1])),  # several chunks per item
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "n{}_c{}_{}x{}".format(*c[:4]))
def test_weight_grad_by_winograd(case):
    """Every candidate's weight gradient against float64, within (n + 12) u A_g per element (n:
    the image-tiles summed, u = 2^-24, A_g the algorithm on absolute values); zero outside the
    rows/columns read; different from the direct kernel's (the Winograd path ran)."""
    N, C, H, W, meta = case
    g = torch.Generator().manual_seed(N * 1000 + C)
    x = torch.randn(N, C, H, W, generator=g) * 2 + 0.5
    gy = torch.randn(N, sum(meta[2]), H, W, generator=g)
    w = torch.randn(max(r + o for r, o in zip(meta[3], meta[2])) + 2, C + 1, 3, 3, generator=g)
    got = _weight_grad(gy, x, w, meta, "all")
    assert got.shape == w.shape and got.dtype == torch.float32
    want = torch.zeros(w.shape, dtype=torch.float64)
    bound = torch.zeros(w.shape, dtype=torch.float64)
    n_sum = N * (H // 4) * (W // 4) + 12
    row = 0
    for off, iw, ow, ro in zip(*meta):
        xs, gs = x[:, off : off + iw].double(), gy[:, row : row + ow].double()
        wk = torch.zeros(ow, iw, 3, 3, dtype=torch.float64, requires_grad=True)
        F.conv2d(xs, wk, padding=1).backward(gs)
        want[ro : ro + ow, :iw] += wk.grad
        bound[ro : ro + ow, :iw] += n_sum * U32 * winograd_grad_abs(xs, gs)
        row += ow
    err = (got.double() - want).abs()
    assert (err <= bound).all(), f"worst error {float((err / (bound + 1e-300)).max()):.3g} x the bound"
    assert (got[bound == 0] == 0).all()
    assert not torch.equal(got, _weight_grad(gy, x, w, meta, "0"))


def test_weight_grad_choice():
    """Winograd from input width 8 and output width 12 on F(4x4) shapes (float32, 3x3, stride 1,
    padding 1); never elsewhere, and the op agrees with what autograd asks."""
    x = torch.randn(2, 16, 8, 16)
    gy = torch.randn(2, 12, 8, 16)
    ask = OPS._cpu_weight_grad_winograd
    assert ask(gy, x, 3, 1, 1, 8, 12) and ask(gy, x, 3, 1, 1, 16, 16)
    assert not ask(gy, x, 3, 1, 1, 7, 12) and not ask(gy, x, 3, 1, 1, 16, 11)
    assert not ask(gy, x.double(), 3, 1, 1, 16, 16)  # float32 only
    assert not ask(gy, x, 1, 1, 0, 16, 16)  # 1x1
    assert not ask(torch.randn(2, 12, 6, 16), torch.randn(2, 16, 6, 16), 3, 1, 1, 16, 16)  # height 6: F(2x2)
    assert not ask(gy, x.contiguous(memory_format=torch.channels_last), 3, 1, 1, 16, 16)
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD="0"):
        assert not ask(gy, x, 3, 1, 1, 16, 16)
    w = torch.randn(12, 16, 3, 3)
    for iw, ow, wino in [(16, 12, True), (16, 8, False)]:
        meta = ([0], [iw], [ow], [0])
        default = OPS.multi_conv2d_weight_grad(gy[:, :ow], x, w, *meta, 1, 1)
        forced = _weight_grad(gy[:, :ow], x, w, meta, "all" if wino else "0")
        assert torch.equal(default, forced), (iw, ow)


_GRAD_THREADS_SCRIPT = r"""
import torch, fastsupernet._C
g = torch.Generator().manual_seed(4)
x = torch.randn(41, 24, 8, 16, generator=g)
gy = torch.randn(41, 30, 8, 16, generator=g)
w = torch.randn(40, 24, 3, 3, generator=g)
res = []
for t in (1, 2):
    torch.set_num_threads(t)
    res.append(torch.ops.fastsupernet.multi_conv2d_weight_grad(gy, x, w, [0, 4], [24, 16], [14, 16], [0, 10], 1, 1))
print(torch.equal(res[0], res[1]))
"""


def test_weight_grad_threads_do_not_change_results():
    proc = subprocess.run([sys.executable, "-c", _GRAD_THREADS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
