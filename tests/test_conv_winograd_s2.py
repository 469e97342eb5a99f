"""The stride-2 Winograd path of the CPU ``multi_conv2d`` (float32, AVX-512): 3x3 stride-2
padding-1 layers on 16x16 inputs with unit column stride, no residual, no statistics, per
candidate where in_width >= 16 and out_width >= 32 (``FASTSUPERNET_CPU_WINOGRAD=all``: every
candidate), as F(4x4, 2x2) on the input's four stride phases (csrc/cpu/conv_winograd_s2.cpp).

Oracle: the float64 ``F.conv2d`` of each candidate, then the epilogue. The bound is the one
conv_winograd_s2.cpp states: the conv value is within ``(4 in_width + 11) u A_w`` of the exact
one, ``A_w`` the same algorithm run in float64 on absolute values and matrices (computed here
from the phase planes), plus 4 roundings for the epilogue: ``(4 in_width + 15) u mag_w``,
``mag_w = (A_w |scale| + |shift|) max(1, |slope|)``. Each case also runs with
``FASTSUPERNET_CPU_WINOGRAD=0`` (the direct kernel) and must differ from it somewhere: the
Winograd path really ran.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import fastsupernet._C  # noqa: F401  (registers the ops)
from fastsupernet.ops._extension import cpu_conv_isa, has_kernel

from conv_oracle import cpu_env, epilogue

OPS = torch.ops.fastsupernet
U32 = 2.0**-24

pytestmark = pytest.mark.skipif(not (has_kernel("multi_conv2d", "CPU") and cpu_conv_isa() == "avx512"),
                                reason="needs the compiled CPU kernels on an AVX-512 CPU")


def _f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


BT = _f64([[2, -1, -2, 1, 0], [0, 2, 1, -1, 0], [0, -2, 3, -1, 0], [0, -1, 0, 1, 0], [0, 2, -1, -2, 1]])
G = _f64([[0.5, 0], [0.5, 0.5], [1 / 6, -1 / 6], [1 / 6, 1 / 3], [0, 1]])
AT = _f64([[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 0], [0, 1, -1, 8, 1]])


def winograd_s2(x: torch.Tensor, w: torch.Tensor, absolute: bool = True) -> torch.Tensor:
    """F(4x4, 2x2) on the stride phases in float64 (x: (N, C, 16, 16), w: (O, C, 3, 3)); with
    ``absolute``, on absolute values and matrices: A_w."""
    bt, g, at = (m.abs() if absolute else m for m in (BT, G, AT))
    x, w = (x.double().abs(), w.double().abs()) if absolute else (x.double(), w.double())
    n, o = x.shape[0], w.shape[0]
    xp = F.pad(x, (1, 2, 1, 2))  # phases of 9 x 9: P_pq[a][b] = x_pad[2a + p][2b + q]
    wp = F.pad(w, (0, 1, 0, 1))  # K_pq[u][v] = w[2u + p][2v + q], 0 past the kernel
    m = torch.zeros(n, o, 2, 2, 5, 5, dtype=torch.float64)
    for p in range(2):
        for q in range(2):
            d = xp[:, :, p::2, q::2][:, :, :9, :9].unfold(2, 5, 4).unfold(3, 5, 4)  # (N, C, 2, 2, 5, 5)
            u = g @ wp[:, :, p::2, q::2] @ g.T  # (O, C, 5, 5)
            m += torch.einsum("ocab,ncyxab->noyxab", u, bt @ d @ bt.T)
    y = at @ m @ at.T  # (N, O, 2, 2, 4, 4)
    return y.permute(0, 1, 2, 4, 3, 5).reshape(n, o, 8, 8)


def test_oracle_is_the_convolution():
    """The float64 algorithm with signed matrices is the layer (checks the matrices and the
    phase split the bound uses)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 16, 16, generator=g), torch.randn(3, 5, 3, 3, generator=g)
    exact = F.conv2d(x.double(), w.double(), stride=2, padding=1)
    torch.testing.assert_close(winograd_s2(x, w, absolute=False), exact, rtol=0, atol=1e-12)
    assert (winograd_s2(x, w) >= exact.abs() - 1e-12).all()


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).mul(2).add(0.5).float()


def _run(x, weight, meta, scale, shift, act, slope, flag):
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD=flag):
        return OPS.multi_conv2d(x, weight, *meta, 2, 1, scale, shift, None, act, slope, False)[0]


def _check(x, weight, meta, scale=None, shift=None, act="none", slope=None, *, expect_winograd):
    """The op (with FASTSUPERNET_CPU_WINOGRAD=all) within the bound of every element; it differs
    from the direct kernel exactly when ``expect_winograd``."""
    in_off, in_w, out_w, rows = meta
    out = _run(x, weight, meta, scale, shift, act, slope, "all")
    direct = _run(x, weight, meta, scale, shift, act, slope, "0")
    assert out.shape == direct.shape and torch.isfinite(out).all()
    ys, mags, depth, cand = [], [], [], []
    for k, (io, iw, ow, ro) in enumerate(zip(in_off, in_w, out_w, rows)):
        xs, wk = x[:, io : io + iw], weight[ro : ro + ow, :iw]
        ys.append(F.conv2d(xs.double(), wk.double(), stride=2, padding=1))
        mags.append(winograd_s2(xs, wk))
        depth += [4 * iw] * ow
        cand += [k] * ow
    z, mag = epilogue(torch.cat(ys, 1), torch.cat(mags, 1), scale, shift, None, act, slope, cand)
    d = torch.tensor(depth, dtype=torch.float64).view(1, -1, 1, 1)
    worst = ((out.double() - z).abs() / ((d + 15) * U32 * mag + 1e-300)).max().item()
    assert worst <= 1.0, f"error {worst:.3g} x the bound"
    assert (not torch.equal(out, direct)) == expect_winograd


@pytest.mark.parametrize("N", [1, 15, 16, 33])
@pytest.mark.parametrize("inputs", ["one", "packed", "shared"])
def test_batches_and_candidates(N, inputs):
    """Partial and whole chunks of 16 images; one candidate, candidates reading their own
    channels (packed) or one slice (shared), widths from 1 to 37, rows in reverse order."""
    gen = torch.Generator().manual_seed(N * 10 + len(inputs))
    in_w, out_w = ([20], [37]) if inputs == "one" else ([16, 1, 7, 32], [33, 5, 2, 64])
    in_off = [0] * len(in_w) if inputs != "packed" else [sum(in_w[:k]) for k in range(len(in_w))]
    C = max(in_w) if inputs != "packed" else sum(in_w)
    R = sum(out_w) + 3
    rows = [R - sum(out_w[: k + 1]) - 1 for k in range(len(out_w))]
    x = _rand(N, C, 16, 16, gen=gen)
    weight = _rand(R, max(in_w) + 2, 3, 3, gen=gen) * 0.2
    M = sum(out_w)
    _check(x, weight, (in_off, in_w, out_w, rows), _rand(M, gen=gen), _rand(M, gen=gen), "relu",
           expect_winograd=True)


@pytest.mark.parametrize("scale,shift,act", [(False, False, "none"), (True, False, "none"), (False, True, "relu"),
                                             (True, True, "prelu"), (True, True, "relu")])
def test_epilogues(scale, shift, act):
    gen = torch.Generator().manual_seed(hash((scale, shift, act)) % 1000)
    in_w, out_w = [16, 24], [32, 40]
    x = _rand(18, 24, 16, 16, gen=gen)
    weight = _rand(80, 26, 3, 3, gen=gen) * 0.2
    M = sum(out_w)
    slope = (torch.rand(2, generator=gen, dtype=torch.float64) - 0.3).float() if act == "prelu" else None
    _check(x, weight, ([0, 0], in_w, out_w, [1, 37]), _rand(M, gen=gen) if scale else None,
           _rand(M, gen=gen) if shift else None, act, slope, expect_winograd=True)


@pytest.mark.parametrize("layout", ["channel_slice", "row_slice", "image_slice"])
def test_layouts(layout):
    """x as a view of a larger tensor (channels, rows or images apart by more than its size)."""
    gen = torch.Generator().manual_seed(3)
    if layout == "channel_slice":
        x = _rand(17, 40, 16, 16, gen=gen)[:, 3:35]
    elif layout == "row_slice":
        x = _rand(17, 32, 16, 19, gen=gen)[..., 2:18]
    else:
        x = _rand(40, 32, 16, 16, gen=gen)[::2]
    weight = _rand(70, 32, 3, 3, gen=gen) * 0.2
    _check(x, weight, ([0], [32], [64], [4]), _rand(64, gen=gen), _rand(64, gen=gen), "relu", expect_winograd=True)


def test_choice():
    """By default a candidate takes it where the call has at least 64 images and its widths are
    in >= 16 and out >= 32, whether or not others read its input slice (it then differs from
    the direct kernel); the others keep the direct kernel (equal bit for bit); channels_last
    inputs, 32x32 inputs, a residual, statistics and FASTSUPERNET_CPU_WINOGRAD=0 keep it
    everywhere."""
    gen = torch.Generator().manual_seed(4)
    x = _rand(64, 76, 16, 16, gen=gen)
    weight = _rand(200, 32, 3, 3, gen=gen) * 0.2
    meta = ([0, 16, 28, 60, 60], [16, 12, 32, 16, 16], [32, 64, 16, 40, 40], [0, 32, 96, 100, 140])
    M = sum(meta[2])

    def call(x=x, residual=None, stats=False, flag=None):
        with cpu_env(FASTSUPERNET_CPU_WINOGRAD=flag):
            return OPS.multi_conv2d(x, weight, *meta, 2, 1, None, None, residual, "none", None, stats)

    base = call(flag="0")[0]
    out = call()[0]
    starts = [0, 32, 96, 112, 152, 192]
    took = [not torch.equal(out[:, a:b], base[:, a:b]) for a, b in zip(starts, starts[1:])]
    assert took == [True, False, False, True, True]
    assert torch.equal(call(x=x[:63])[0], base[:63])
    assert torch.equal(call(x=x.contiguous(memory_format=torch.channels_last))[0], base)
    res = _rand(64, M, 8, 8, gen=gen)
    assert torch.equal(call(residual=res)[0], call(residual=res, flag="0")[0])
    assert torch.equal(call(stats=True)[0], base)
    x32 = _rand(2, 76, 32, 32, gen=gen)
    assert torch.equal(call(x=x32)[0], call(x=x32, flag="0")[0])
    # the choice as the benchmarks read it
    assert OPS._cpu_winograd_s2(64, 16, 16, 16, 32) and not OPS._cpu_winograd_s2(64, 16, 16, 12, 64)
    assert not OPS._cpu_winograd_s2(64, 16, 16, 32, 16) and not OPS._cpu_winograd_s2(64, 32, 32, 16, 32)
    assert not OPS._cpu_winograd_s2(63, 16, 16, 32, 64)
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD="0"):
        assert not OPS._cpu_winograd_s2(256, 16, 16, 32, 64)
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD="all"):
        assert OPS._cpu_winograd_s2(1, 16, 16, 1, 1)


def test_threads_and_other_candidates_change_nothing():
    """One thread gives the bits of two; a candidate's values are the same alone as with others
    (here a wider candidate on the same input: the input is transformed once for both)."""
    gen = torch.Generator().manual_seed(5)
    x = _rand(35, 32, 16, 16, gen=gen)
    weight = _rand(100, 32, 3, 3, gen=gen) * 0.2
    meta = ([0, 0], [32, 16], [64, 32], [2, 66])
    ref = _run(x, weight, meta, None, None, "none", None, "all")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(_run(x, weight, meta, None, None, "none", None, "all"), ref)
    finally:
        torch.set_num_threads(threads)
    alone = _run(x, weight, ([0], [16], [32], [66]), None, None, "none", None, "all")
    assert torch.equal(alone, ref[:, 64:])


def test_streaming_stores_change_no_value():
    """Outputs of 16 MiB and more are stored with streaming stores: the same values."""
    gen = torch.Generator().manual_seed(6)
    x = _rand(1040, 16, 16, 16, gen=gen)  # 1040 x 64 x 64 floats: 17 MiB of output
    weight = _rand(64, 16, 3, 3, gen=gen) * 0.2
    meta = ([0], [16], [64], [0])
    streamed = _run(x, weight, meta, None, None, "relu", None, None)
    with cpu_env(FASTSUPERNET_CPU_STREAM_STORES="0"):
        plain = _run(x, weight, meta, None, None, "relu", None, None)
    assert torch.equal(streamed, plain)


def test_random_widths():
    """Random candidate sets (all widths, shared and packed) against the bound."""
    rng = random.Random(7)
    for trial in range(6):
        K = rng.choice([1, 2, 5])
        in_w = [rng.randint(1, 32) for _ in range(K)]
        out_w = [rng.randint(1, 64) for _ in range(K)]
        shared = rng.random() < 0.5
        in_off = [0] * K if shared else [sum(in_w[:k]) for k in range(K)]
        C = max(in_w) if shared else sum(in_w)
        gen = torch.Generator().manual_seed(trial)
        x = _rand(rng.choice([3, 17]), C, 16, 16, gen=gen)
        R = sum(out_w) + 4
        weight = _rand(R, 34, 3, 3, gen=gen) * 0.2
        rows = [rng.randint(0, R - o) for o in out_w]
        _check(x, weight, (in_off, in_w, out_w, rows), expect_winograd=True)


# --- the input gradient (fastsupernet::_cpu_conv2d_s2_input_grad) ------------------------------
def _tap(p: int, d: int) -> int:
    """Kernel index along an axis of grad x's parity p for g offset d (-1: none)."""
    return (1 if d == 0 else -1) if p == 0 else (2 if d == 0 else 0)


def winograd_s2_grad(g: torch.Tensor, w: torch.Tensor, absolute: bool = True) -> torch.Tensor:
    """The input gradient by F(4x4, 2x2) per phase in float64 (g: (N, O, 8, 8), w: (O, C, 3, 3));
    with ``absolute``, on absolute values and matrices: A_w."""
    bt, gm, at = (m.abs() if absolute else m for m in (BT, G, AT))
    g, w = (g.double().abs(), w.double().abs()) if absolute else (g.double(), w.double())
    n, c = g.shape[0], w.shape[1]
    d = F.pad(g, (0, 1, 0, 1)).unfold(2, 5, 4).unfold(3, 5, 4)  # (N, O, 2, 2, 5, 5)
    v = bt @ d @ bt.T
    gx = torch.zeros(n, c, 16, 16, dtype=torch.float64)
    for p in range(2):
        for q in range(2):
            k = torch.zeros(w.shape[0], c, 2, 2, dtype=torch.float64)
            for di in range(2):
                for dj in range(2):
                    if _tap(p, di) >= 0 and _tap(q, dj) >= 0:
                        k[:, :, di, dj] = w[:, :, _tap(p, di), _tap(q, dj)]
            m = torch.einsum("ocab,noyxab->ncyxab", gm @ k @ gm.T, v)
            y = at @ m @ at.T  # (N, C, 2, 2, 4, 4)
            gx[:, :, p::2, q::2] = y.permute(0, 1, 2, 4, 3, 5).reshape(n, c, 8, 8)
    return gx


def test_grad_oracle_is_the_gradient():
    gen = torch.Generator().manual_seed(10)
    g, w = torch.randn(2, 5, 8, 8, generator=gen), torch.randn(5, 3, 3, 3, generator=gen)
    exact = torch.ops.aten.convolution_backward(g.double(), torch.zeros(2, 3, 16, 16, dtype=torch.float64),
                                                w.double(), None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1,
                                                [True, False, False])[0]
    torch.testing.assert_close(winograd_s2_grad(g, w, absolute=False), exact, rtol=0, atol=1e-12)


def _grad(g, weight, meta, gx, accumulate, flag=None):
    with cpu_env(FASTSUPERNET_CPU_WINOGRAD=flag):
        OPS._cpu_conv2d_s2_input_grad(g, weight, *meta, gx, accumulate)
    return gx


@pytest.mark.parametrize("N", [1, 15, 16, 33])
@pytest.mark.parametrize("inputs", ["one", "packed", "shared"])
def test_input_grad(N, inputs):
    """Every width (1..64), partial and whole chunks; candidates tiling grad x (poisoned with NaN:
    every element written) or reading one slice (added to a random grad x). Bound per element:
    ``(out_width + 11) u A_w`` per candidate, then one addition per candidate: ``(out_w + 11 + K)
    u (sum A_w + |initial|)``; the Winograd path ran (differs from FASTSUPERNET_CPU_WINOGRAD=0)."""
    gen = torch.Generator().manual_seed(N * 10 + len(inputs))
    in_w, out_w = ([32], [64]) if inputs == "one" else ([16, 1, 7, 9], [33, 5, 2, 64])
    in_off = [0] * len(in_w) if inputs == "shared" else [sum(in_w[:k]) for k in range(len(in_w))]
    C = max(in_w) if inputs == "shared" else sum(in_w)
    R = sum(out_w) + 3
    rows = [R - sum(out_w[: k + 1]) - 1 for k in range(len(out_w))]
    weight = _rand(R, max(in_w) + 2, 3, 3, gen=gen) * 0.2
    g = _rand(N, sum(out_w), 8, 8, gen=gen)
    meta = (in_off, in_w, out_w, rows)
    accumulate = inputs == "shared"
    start = _rand(N, C, 16, 16, gen=gen) if accumulate else torch.full((N, C, 16, 16), float("nan"))
    out = _grad(g, weight, meta, start.clone(), accumulate, flag="all")  # by default from 64 images
    direct = _grad(g, weight, meta, start.clone(), accumulate, flag="0")
    assert torch.isfinite(out).all()
    exact = start.double() if accumulate else torch.zeros(N, C, 16, 16, dtype=torch.float64)
    mag = exact.abs()
    d = torch.zeros(1, C, 1, 1, dtype=torch.float64)
    o = 0
    for io, iw, ow, ro in zip(in_off, in_w, out_w, rows):
        gk, wk = g[:, o : o + ow], weight[ro : ro + ow, :iw]
        exact[:, io : io + iw] += winograd_s2_grad(gk, wk, absolute=False)
        mag[:, io : io + iw] += winograd_s2_grad(gk, wk)
        d[:, io : io + iw] = torch.clamp(d[:, io : io + iw], min=ow)
        o += ow
    worst = ((out.double() - exact).abs() / ((d + 11 + len(in_w)) * U32 * mag + 1e-300)).max().item()
    assert worst <= 1.0, f"error {worst:.3g} x the bound"
    assert not torch.equal(out, direct)


def test_input_grad_choice_and_threads():
    """By default from 64 images; fewer images, float64, other sizes and a g with non-unit
    column stride keep the phases on the direct kernel (the bits of FASTSUPERNET_CPU_WINOGRAD=0);
    one thread gives the bits of two."""
    gen = torch.Generator().manual_seed(11)
    weight = _rand(40, 20, 3, 3, gen=gen)
    meta = ([0], [16], [32], [4])
    g = _rand(64, 32, 8, 8, gen=gen)
    a = _grad(g, weight, meta, torch.zeros(64, 16, 16, 16), False)
    assert not torch.equal(a, _grad(g, weight, meta, torch.zeros(64, 16, 16, 16), False, flag="0"))
    for gg, shape in ((g[:63], (63, 16, 16, 16)), (g.double(), (64, 16, 16, 16)), (g, (64, 16, 15, 16)),
                      (g, (64, 16, 16, 15)), (_rand(64, 32, 8, 16, gen=gen)[..., ::2], (64, 16, 16, 16))):
        ww = weight.double() if gg.dtype == torch.float64 else weight
        a = _grad(gg, ww, meta, torch.zeros(shape, dtype=gg.dtype), False)
        b = _grad(gg, ww, meta, torch.zeros(shape, dtype=gg.dtype), False, flag="0")
        assert torch.equal(a, b), shape
    ref = _grad(g, weight, meta, torch.zeros(64, 16, 16, 16), False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(_grad(g, weight, meta, torch.zeros(64, 16, 16, 16), False), ref)
    finally:
        torch.set_num_threads(threads)
