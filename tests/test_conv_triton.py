"""Triton kernels of multi_conv2d / sliced_conv2d against a float64 oracle.

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py),
which is slow: shapes here are tiny and odd (ragged tiles everywhere). Every call fills its
outputs and partial buffers with NaN first (``_poison=True``), so an element the kernel never
writes fails the comparison.

Error bounds vs the float64 oracle, per value. ``conv_abs`` is the conv of ``|x|`` and ``|weight|``
(the sum of the absolute products), ``K_gemm = in_width * kh * kw`` of the value's candidate,
``u = 2**-24`` and ``mag = |scale * conv| + |shift| + |residual|`` (the size of the epilogue's terms):

- the float32 accumulator: ``|e| <= (d_in + c * (K_gemm + 1) * u) * conv_abs``, which holds for any
  summation order; ``d_in`` is 0 for float32 ``"ieee"`` (and for float16 / bfloat16 inputs, whose
  products are exact), ``2**-9`` for ``"tf32"`` (rounded inputs); ``c`` is 1 for ``"ieee"`` and
  4 (margin) for tensor cores;
- the output: ``|scale| * |e| + 4 u * mag + d_out * |out|``, ``d_out`` the rounding of the stored
  dtype (``u`` float32, ``2**-11`` float16, ``2**-8`` bfloat16);
- float32 ``"ieee"`` also meets the simple rule ``1e-4 * mag + 1e-5 * sqrt(K_gemm) * max(1, |scale|)``;
  in relative terms tf32 is about ``2e-3`` and bfloat16 about ``2e-2``;
- statistics (float64 sum and sum of squares of the conv values): ``sum(e)`` and
  ``sum(e * (2 |conv| + e))`` over the channel's values (the float64 additions add ~1e-13).

Exercised here: float32 ``"ieee"``, float16, and ``"tf32"`` (which the interpreter computes in
float32); bfloat16 only on a GPU (the interpreter has no bfloat16 arithmetic).

The ``slow`` sweep (up to 64 candidates) is marked ``@pytest.mark.slow``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from fastsupernet.ops import reference  # noqa: E402
from fastsupernet.ops import triton_conv as tc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tc._interpreted():
    pytest.skip("CPU tensors need Triton imported with TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def _one_config_on_gpu(monkeypatch):
    """On a GPU, one fixed tile configuration unless the run names one: autotuning would compile
    and time up to six configurations for every new shape bucket of these small cases (the
    configurations are checked one by one in test_every_config_matches_oracle)."""
    if DEVICE == "cuda" and not os.environ.get(tc.CONFIG_ENV_VAR):
        monkeypatch.setenv(tc.CONFIG_ENV_VAR, "0")


U32 = 2.0**-24  # float32 unit roundoff
# relative rounding of a product's inputs (tf32: 10-bit mantissa, truncation allowed for) ...
# (tf32x3: the tails' TF32 rounding and the dropped tail x tail product, < 3 * 2^-20 with truncation)
IN_ROUNDING = {"ieee": 0.0, "tf32": 2.0**-9, "tf32x3": 2.0**-18}
# ... and of the stored output
OUT_ROUNDING = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
LAYOUTS = ("nchw", "channels_last", "slice", "slice_cl")


# ---------------------------------------------------------------------------- inputs and oracle


def _rand(gen, *shape, dtype=torch.float32):
    """randn * 2 + 0.5: never zero, mean away from zero (float32 on the CPU, then moved)."""
    return (torch.randn(*shape, generator=gen) * 2 + 0.5).to(device=DEVICE, dtype=dtype)


def _make_x(gen, n, c, h, w, layout, dtype):
    """x in the given layout: NCHW, channels_last, or a strided channel slice of a bigger tensor."""
    if layout in ("nchw", "channels_last"):
        x = _rand(gen, n, c, h, w, dtype=dtype)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    big = _rand(gen, n, c + 5, h, w, dtype=dtype)
    if layout == "slice_cl":
        big = big.contiguous(memory_format=torch.channels_last)
    return big[:, 3 : 3 + c]


def _bounds(conv_abs, want, mag, k_gemm, scale, dtype, input_precision):
    """(per conv value, per output value) error bounds; see the module docstring."""
    exact = dtype == torch.float32 and input_precision == "ieee"
    # float32 accumulation, any summation order (tensor cores: 4x margin), after rounded inputs
    conv_tol = (IN_ROUNDING[input_precision] + (1 if exact else 4) * (k_gemm + 1) * U32) * conv_abs
    # the epilogue: scale, then at most 4 float32 roundings of terms of size mag, then the store
    tol = (conv_tol if scale is None else scale * conv_tol) + 4 * U32 * mag + OUT_ROUNDING[dtype] * want.abs()
    if exact:  # the simple rule holds as well
        scale1 = 1.0 if scale is None else scale.clamp_min(1)
        tol = torch.minimum(tol, 1e-4 * mag + 1e-5 * torch.sqrt(torch.as_tensor(k_gemm)) * scale1)
    return conv_tol, tol


def _assert_within(out, want, tol):
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} output values never written"
    err = (out.double() - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{int(bad.sum())} of {out.numel()} values off, worst error {float(err.max()):.3g} "
        f"(tolerance there {float(tol.flatten()[int(err.flatten().argmax())]):.3g}), "
        f"first at {tuple(int(i) for i in bad.nonzero()[0])}"
    )


def _assert_stats_within(s, q, conv, conv_tol):
    """The float64 sums of the conv values and their squares, each within the sum of the bounds of
    its terms (plus float64 rounding)."""
    dims = (0, 2, 3)
    want_s, want_q = conv.sum(dims), (conv * conv).sum(dims)
    bound_s = conv_tol.sum(dims) + 1e-12 * conv.abs().sum(dims)
    bound_q = (conv_tol * (2 * conv.abs() + conv_tol)).sum(dims) + 1e-12 * (conv * conv).sum(dims)
    err_s, err_q = (s - want_s).abs(), (q - want_q).abs()
    assert torch.all(err_s <= bound_s), f"sum off by {err_s.max():.3g} (bound {bound_s.min():.3g})"
    assert torch.all(err_q <= bound_q), f"sumsq off by {err_q.max():.3g} (bound {bound_q.min():.3g})"


class Case:
    """One multi_conv2d call: inputs, the float64 oracle, and the check of the kernel's result."""

    def __init__(
        self,
        *,
        n=2,
        h=5,
        w=5,
        ksize=3,
        stride=1,
        padding=1,
        in_widths=(3, 5, 2),
        out_widths=(3, 1, 5),
        packed_input=False,
        layout="nchw",
        scale=True,
        shift=True,
        residual=True,
        activation="prelu",
        stats=True,
        dtype=torch.float32,
        seed=0,
        weight_layout="contiguous",
        c_max=None,
        residual_layout=None,
        spare_channels=1,
    ):
        gen = torch.Generator().manual_seed(seed)
        k = len(out_widths)
        self.in_widths, self.out_widths = list(in_widths), list(out_widths)
        if packed_input:  # disjoint slices of a packed input
            self.in_offsets = [sum(in_widths[:i]) for i in range(k)]
            c_in = sum(in_widths)
        else:  # every candidate reads the first in_width channels of the same input (plus spare ones)
            self.in_offsets = [0] * k
            c_in = max(in_widths) + spare_channels
        # packed weight, bigger than used: candidate i's rows start after a gap of i + 1 rows
        self.row_offsets, r = [], 0
        for i in range(k):
            r += i % 3 + 1
            self.row_offsets.append(r)
            r += out_widths[i]
        self.rows, self.c_max = r + 2, c_max or max(in_widths) + 2
        self.stride, self.padding, self.activation, self.stats, self.dtype = stride, padding, activation, stats, dtype

        self.x = _make_x(gen, n, c_in, h, w, layout, dtype)
        self.weight = _rand(gen, self.rows, self.c_max, ksize, ksize, dtype=dtype)
        if weight_layout == "channels_last":
            self.weight = self.weight.contiguous(memory_format=torch.channels_last)
        c_out = sum(out_widths)
        h_out = (h + 2 * padding - ksize) // stride + 1
        w_out = (w + 2 * padding - ksize) // stride + 1
        self.out_shape = (n, c_out, h_out, w_out)
        self.scale = _rand(gen, c_out) if scale else None
        self.shift = _rand(gen, c_out) if shift else None
        self.residual = None
        if residual:  # the other layout than x, or a strided slice; or residual_layout's
            res = _rand(gen, n, c_out + 2, h_out, w_out)[:, 1 : 1 + c_out]
            if residual_layout is not None:
                fmt = torch.channels_last if residual_layout == "channels_last" else torch.contiguous_format
                res = res.contiguous(memory_format=fmt)
            elif layout == "nchw":
                res = res.contiguous(memory_format=torch.channels_last)
            elif layout == "channels_last":
                res = res.contiguous()
            self.residual = res
        # slopes in (0.1, 0.9), one per candidate, all different
        self.slope = (torch.rand(k, generator=gen) * 0.8 + 0.1).to(DEVICE) if activation == "prelu" else None
        self.expect_channels_last = layout in ("channels_last", "slice_cl") and h_out * w_out > 1
        self.k_gemm = torch.tensor(
            [float(in_widths[i] * ksize * ksize) for i in range(k) for _ in range(out_widths[i])], dtype=torch.float64
        )

    def args(self):
        return (
            self.x, self.weight, self.in_offsets, self.in_widths, self.out_widths, self.row_offsets, self.stride,
            self.padding, self.scale, self.shift, self.residual, self.activation, self.slope, self.stats,
        )

    def oracle(self):
        """float64 (conv, conv_abs, out, mag): a loop over the candidates of F.conv2d on the slices, the same
        with |x| and |weight| (the sum of |products| of each value), the epilogue, and the size of its terms."""
        x, w = self.x.double(), self.weight.double()
        cands = list(zip(self.in_offsets, self.in_widths, self.out_widths, self.row_offsets))

        def conv_of(x, w):
            return torch.cat(
                [F.conv2d(x[:, o : o + a], w[r : r + b, :a], stride=self.stride, padding=self.padding)
                 for o, a, b, r in cands],
                dim=1,
            )

        conv, conv_abs = conv_of(x, w), conv_of(x.abs(), w.abs())
        y, mag = conv, conv.abs()
        if self.scale is not None:
            y = y * self.scale.double().view(1, -1, 1, 1)
            mag = y.abs()
        if self.shift is not None:
            y = y + self.shift.double().view(1, -1, 1, 1)
            mag = mag + self.shift.double().abs().view(1, -1, 1, 1)
        if self.residual is not None:
            y = y + self.residual.double()
            mag = mag + self.residual.double().abs()
        if self.activation == "relu":
            y = torch.where(y > 0, y, torch.zeros_like(y))
        elif self.activation == "prelu":
            per_channel = torch.repeat_interleave(self.slope.double(), torch.tensor(self.out_widths, device=DEVICE))
            y = torch.where(y > 0, y, per_channel.view(1, -1, 1, 1) * y)
        return conv, conv_abs, y, mag

    def check(self, result, input_precision="ieee"):
        out, s, q = result
        assert out.shape == self.out_shape and out.dtype == self.dtype and out.device.type == DEVICE
        fmt = torch.channels_last if self.expect_channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt), f"out strides {out.stride()}, expected {fmt}"
        assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} output values never written"
        conv, conv_abs, want, mag = self.oracle()
        scale = self.scale.double().abs().view(1, -1, 1, 1) if self.scale is not None else None
        k_gemm = self.k_gemm.to(DEVICE).view(1, -1, 1, 1)
        conv_tol, tol = _bounds(conv_abs, want, mag, k_gemm, scale, self.dtype, input_precision)
        _assert_within(out, want, tol)
        assert s.dtype == q.dtype == torch.float64
        if not self.stats:
            assert s.shape == q.shape == (0,)
            return
        assert s.shape == q.shape == (self.out_shape[1],)
        _assert_stats_within(s, q, conv, conv_tol)

    def run_and_check(self, **kwargs):
        x0, w0 = self.x.clone(), self.weight.clone()
        result = tc.multi_conv2d_triton(*self.args(), _poison=True, **kwargs)
        assert torch.equal(self.x, x0) and torch.equal(self.weight, w0), "inputs were modified"
        self.check(result, **kwargs)
        return result


# ---------------------------------------------------------------------------- multi_conv2d

# (n, h, w, ksize, stride, padding, in_widths, out_widths, packed_input, layout)
SHAPES = [
    (1, 1, 1, 1, 1, 0, (4,), (3,), False, "nchw"),
    (2, 3, 3, 3, 1, 1, (1,), (1,), False, "channels_last"),
    (2, 6, 5, 3, 2, 1, (5, 2, 7), (3, 5, 1), False, "slice"),
    (1, 5, 6, 3, 1, 0, (3, 3, 3), (5, 5, 5), True, "slice_cl"),
    (2, 6, 6, 1, 2, 0, (12, 1, 6), (1, 3, 5), True, "nchw"),
    (1, 3, 5, 3, 2, 0, (2, 9, 4), (5, 1, 3), False, "channels_last"),
    (2, 5, 3, 1, 1, 0, (1, 2, 3, 4, 5, 6, 7), (1, 3, 5, 1, 3, 5, 1), True, "slice_cl"),
    (2, 5, 5, 3, 1, 1, (6, 1, 12, 3, 9, 2, 5), (5, 3, 1, 5, 1, 3, 5), False, "nchw"),
    (1, 6, 6, 3, 2, 1, (2, 7, 4, 11, 1, 8, 3), (3, 5, 1, 3, 5, 1, 3), True, "channels_last"),
    (2, 1, 1, 3, 1, 1, (5, 2, 8), (17, 3, 16), False, "slice"),  # wider than one BLOCK_N tile
    (1, 6, 5, 1, 1, 0, (20, 3, 17), (5, 1, 3), True, "nchw"),  # more than one BLOCK_K block
]


def _shape_id(s):
    return f"n{s[0]}h{s[1]}w{s[2]}k{s[3]}s{s[4]}p{s[5]}K{len(s[6])}-{s[9]}"


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_multi_conv2d_matches_oracle(shape):
    n, h, w, ksize, stride, padding, in_widths, out_widths, packed, layout = shape
    seed = SHAPES.index(shape)
    common = dict(n=n, h=h, w=w, ksize=ksize, stride=stride, padding=padding, in_widths=in_widths,
                  out_widths=out_widths, packed_input=packed, layout=layout, seed=seed)
    Case(**common).run_and_check()  # full epilogue, statistics
    if seed % 3 == 0:  # plain conv, no statistics
        Case(**common, scale=False, shift=False, residual=False, activation="none", stats=False).run_and_check()


# ---------------------------------------------------------------------------- vector loads

# (n, h, w, ksize, stride, padding, in_widths, out_widths, packed_input): every channel offset and
# width a multiple of 4, channels_last tensors, so the kernel takes its 4-channel vector path
VECTOR_SHAPES = [
    (2, 5, 7, 3, 1, 1, (4, 8, 12), (8, 4, 16), True),
    (1, 6, 5, 3, 2, 1, (8, 4), (4, 20), False),  # one image: the image stride never enters an address
    (3, 4, 4, 1, 1, 0, (16, 4, 8), (4, 12, 4), True),
    (2, 7, 6, 1, 2, 0, (4, 20), (8, 8), False),
    (1, 1, 1, 3, 1, 1, (8,), (36,), False),  # a 1x1 image: only the centre tap; more than one BLOCK_N tile
]


def _vector_layout(c_max: int) -> dict:
    """Case arguments for the 4-channel vector path: channels_last x, weight and residual, every
    channel count a multiple of 4."""
    return dict(layout="channels_last", weight_layout="channels_last", c_max=c_max, spare_channels=4,
                residual_layout="channels_last")


@pytest.mark.parametrize("shape", VECTOR_SHAPES, ids=lambda s: f"n{s[0]}h{s[1]}w{s[2]}k{s[3]}s{s[4]}K{len(s[6])}")
def test_vector_path_matches_oracle(shape, monkeypatch):
    """The 4-channel vector loads and stores (VEC_X = VEC_W = 4) against the float64 oracle, with
    the full epilogue (a channels_last residual) and statistics, then plain."""
    n, h, w, ksize, stride, padding, in_widths, out_widths, packed = shape
    seed = 100 + VECTOR_SHAPES.index(shape)
    chosen = []
    real = tc._vector_widths
    monkeypatch.setattr(tc, "_vector_widths", lambda *a: chosen.append(real(*a)) or chosen[-1])
    common = dict(n=n, h=h, w=w, ksize=ksize, stride=stride, padding=padding, in_widths=in_widths,
                  out_widths=out_widths, packed_input=packed, seed=seed, **_vector_layout(max(in_widths) + 4))
    Case(**common).run_and_check()
    Case(**common, scale=False, shift=False, residual=False, activation="none", stats=False).run_and_check()
    assert chosen == [{"VEC_X": 4, "VEC_W": 4}] * 2


@pytest.mark.parametrize("view", ["taps_transposed", "column_slice"])
def test_weight_read_through_its_strides(view):
    """The weight is read in place through any strides (the same values as a contiguous copy)."""
    case = Case(n=2, h=5, w=4, in_widths=(3, 5), out_widths=(4, 2), layout="channels_last", seed=7)
    w = case.weight
    if view == "taps_transposed":  # strides (C * 9, 9, 1, 3)
        case.weight = w.transpose(2, 3).contiguous().transpose(2, 3)
    else:  # the columns of a wider weight
        wide = _rand(torch.Generator().manual_seed(1), w.shape[0], w.shape[1] + 3, 3, 3)
        wide[:, 2:2 + w.shape[1]] = w
        case.weight = wide[:, 2:2 + w.shape[1]]
    assert torch.equal(case.weight, w) and not case.weight.is_contiguous()
    case.run_and_check()


# (n, h, w, ksize, stride, padding, in_widths, out_widths, packed_input, vector)
RUNTIME_LOOP_SHAPES = [
    (2, 5, 6, 3, 1, 1, (36, 20, 4), (8, 20, 12), False, True),  # 3, 2 and 1 channel blocks per tap
    (1, 6, 5, 3, 2, 1, (17, 3, 33), (5, 1, 3), True, False),
    (2, 4, 5, 1, 2, 0, (40, 8), (12, 4), True, True),
]


@pytest.mark.parametrize("shape", RUNTIME_LOOP_SHAPES, ids=lambda s: f"k{s[3]}s{s[4]}-vec{int(s[9])}")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy on the interpreter's run-time loop bound
def test_runtime_loop_matches_oracle(shape, monkeypatch):
    """The reduction loop a GPU runs (run-time trip count, the tap of a step by a float reciprocal),
    which the interpreter otherwise replaces by compile-time loops, against the oracle."""
    if DEVICE == "cpu":
        major, minor = (int(v) for v in __import__("numpy").__version__.split(".")[:2])
        if (major, minor) >= (2, 3):
            pytest.skip("the interpreter's run-time loops need numpy < 2.3")
        monkeypatch.setattr(tc, "_INTERPRET_RUNTIME_LOOP", True)
    n, h, w, ksize, stride, padding, in_widths, out_widths, packed, vector = shape
    layout = _vector_layout(max(in_widths) + 4) if vector else dict(layout="slice")
    Case(n=n, h=h, w=w, ksize=ksize, stride=stride, padding=padding, in_widths=in_widths, out_widths=out_widths,
         packed_input=packed, seed=200 + RUNTIME_LOOP_SHAPES.index(shape), **layout).run_and_check()


def test_vector_widths_rules():
    """When the kernel may take 4 channels per vector: exactly where every address it forms is a
    multiple of 4 elements (or the stride of a size-1 dimension, which never enters one)."""
    cl = torch.channels_last
    x = torch.zeros(2, 12, 3, 5).contiguous(memory_format=cl)
    out = torch.zeros(2, 8, 3, 5).contiguous(memory_format=cl)
    w3 = torch.zeros(8, 12, 3, 3).contiguous(memory_format=cl)
    args = ([0, 4], [4, 8], [4, 4])  # in_offsets, in_widths, out_widths
    vw = tc._vector_widths
    assert vw(x, out, None, w3, *args) == {"VEC_X": 4, "VEC_W": 4}
    assert vw(x, out, out, w3, *args) == {"VEC_X": 4, "VEC_W": 4}
    assert vw(x, out, out.contiguous(), w3, *args)["VEC_X"] == 1  # an NCHW residual
    assert vw(x.contiguous(), out.contiguous(), None, w3, *args)["VEC_X"] == 1  # NCHW activations
    assert vw(x, out, None, w3, [0, 2], [4, 8], [4, 4])["VEC_X"] == 1  # an offset of 2
    assert vw(x, out, None, w3, [0, 4], [4, 6], [4, 4]) == {"VEC_X": 1, "VEC_W": 1}  # a width of 6
    assert vw(x, out, None, w3, [0, 4], [4, 8], [4, 6])["VEC_X"] == 1  # an output width of 6
    odd = torch.zeros(2, 14, 3, 5).contiguous(memory_format=cl)[:, 1:13]  # pixel stride 14
    assert vw(odd, out, None, w3, *args)["VEC_X"] == 1
    one = torch.zeros(1, 14, 1, 1)[:, 1:13]  # one pixel: no pixel stride is ever used
    assert vw(one, out[:1, :, :1, :1], None, w3, *args)["VEC_X"] == 4
    assert vw(x, out, None, w3.contiguous(), *args)["VEC_W"] == 1  # (R, C, 3, 3): channels 9 apart
    assert vw(x, out, None, torch.zeros(8, 10, 3, 3).contiguous(memory_format=cl), *args)["VEC_W"] == 1
    assert vw(x, out, None, torch.zeros(8, 12, 1, 1), *args)["VEC_W"] == 4  # any 1x1 weight of 4k columns
    assert tc._strides(x, 4) == (45, 1, 15, 3) and tc._strides(x, 1) == x.stride()
    assert tc._strides(one, 4) == (0, 1, 0, 0)


EPILOGUES = [
    (scale, shift, residual, activation)
    for scale in (False, True)
    for shift in (False, True)
    for residual in (False, True)
    for activation in tc.ACTIVATIONS
]


@pytest.mark.parametrize("stats", [False, True], ids=["nostats", "stats"])
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: f"sc{int(e[0])}sh{int(e[1])}res{int(e[2])}-{e[3]}")
def test_multi_conv2d_epilogues(epilogue, stats):
    scale, shift, residual, activation = epilogue
    Case(n=1, h=3, w=3, ksize=1, padding=0, in_widths=(3, 5, 2), out_widths=(3, 1, 5), layout="channels_last",
         scale=scale, shift=shift, residual=residual, activation=activation, stats=stats,
         seed=EPILOGUES.index(epilogue)).run_and_check()


def test_multi_conv2d_statistics_many_chunks():
    # M = 2 * 9 * 9 = 162 output pixels: 6 chunks of STATS_CHUNK, the last one ragged
    Case(n=2, h=9, w=9, ksize=1, padding=0, in_widths=(3, 2), out_widths=(5, 3), activation="relu",
         seed=5).run_and_check()


@pytest.mark.parametrize("config", range(len(tc._CONFIGS)))
def test_every_config_matches_oracle(config, monkeypatch):
    # each tile configuration alone (the autotuner may pick any of them): several pixel tiles,
    # channel tiles and reduction blocks per candidate at the widest blocks (64)
    monkeypatch.setenv(tc.CONFIG_ENV_VAR, str(config))
    Case(n=2, h=9, w=9, in_widths=(70, 5, 33), out_widths=(66, 3, 17), layout="slice_cl", packed_input=True,
         activation="prelu", seed=40 + config).run_and_check()


def test_static_config_fits_the_tile_to_the_widths():
    """FASTSUPERNET_TRITON_CONFIG=static: the configuration issuing the fewest loop instructions
    for the call's widths (padding to the tile counted), from the sm_90 loop counts."""
    assert set(tc.LOOP_RATES) == {"bf16", "tf32", "tf32x3", "ieee"}
    assert all(len(r) == len(tc._CONFIGS) for r in tc.LOOP_RATES.values())
    bf16 = tc.LOOP_RATES["bf16"]
    narrow, middle, wide = range(4, 17, 4), range(4, 33, 4), range(4, 65, 4)
    # Track-1's three stages (widths 4..16 at 32x32, 4..32 at 16x16, 4..64 at 8x8; batch 256)
    assert tc._CONFIGS[tc.static_config(256 * 32 * 32, narrow, narrow, bf16)].kwargs == {
        "BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 16}
    assert tc._CONFIGS[tc.static_config(256 * 16 * 16, middle, middle, bf16)].kwargs["BLOCK_N"] == 32
    assert tc._CONFIGS[tc.static_config(256 * 8 * 8, wide, wide, bf16)].kwargs["BLOCK_N"] == 64
    # every candidate exactly 64 wide: nothing is padded, the highest rate wins
    assert tc.static_config(4096, [64] * 8, [64] * 8, bf16) == max(range(len(bf16)), key=lambda i: bf16[i])
    # the rates decide: a table that favours the first configuration picks it
    assert tc.static_config(4096, wide, wide, (1000,) + (1,) * (len(tc._CONFIGS) - 1)) == 0
    # pixels are padded to BLOCK_M: with 64 pixels a 128-pixel tile (rate 97) computes twice what a
    # 64-pixel one (rate 49) does and loses; with 128 pixels it wins
    rates = bf16[:-1] + (97,)
    assert tc._CONFIGS[tc.static_config(64, [16], [16], rates)].kwargs["BLOCK_M"] == 64
    assert tc._CONFIGS[tc.static_config(128, [16], [16], rates)].kwargs["BLOCK_M"] == 128


def test_static_config_matches_oracle(monkeypatch):
    monkeypatch.setenv(tc.CONFIG_ENV_VAR, "static")
    assert tc.fixed_config() is tc.STATIC
    Case(n=2, h=9, w=9, in_widths=(40, 8, 36), out_widths=(64, 4, 20), layout="channels_last", activation="relu",
         seed=49).run_and_check()


@pytest.mark.skipif(DEVICE != "cuda", reason="the autotuner runs only on a GPU")
def test_autotuned_matches_oracle(monkeypatch):
    monkeypatch.setenv(tc.CONFIG_ENV_VAR, "autotune")
    Case(n=2, h=7, w=6, in_widths=(24, 5, 9), out_widths=(20, 3, 40), layout="channels_last", seed=47).run_and_check()


@pytest.mark.parametrize("value", ["-1", str(len(tc._CONFIGS)), "fast"])
def test_config_variable_rejects_bad_value(value, monkeypatch):
    monkeypatch.setenv(tc.CONFIG_ENV_VAR, value)
    case = Case(n=1, h=3, w=3, in_widths=(2,), out_widths=(3,), seed=48)
    with pytest.raises(ValueError, match=tc.CONFIG_ENV_VAR):
        tc.multi_conv2d_triton(*case.args())


def test_multi_conv2d_float16():
    case = Case(n=2, h=5, w=5, in_widths=(3, 6), out_widths=(5, 3), layout="channels_last", dtype=torch.float16,
                seed=11)
    case.run_and_check()


def test_multi_conv2d_tf32_opt_in():
    case = Case(n=1, h=3, w=3, in_widths=(3, 6), out_widths=(5, 3), seed=12)
    case.run_and_check(input_precision="tf32")


@pytest.mark.parametrize("layout", ["nchw", "vector"])
def test_multi_conv2d_tf32x3_opt_in(layout):
    """Three TF32 products per float32 product (on a GPU; the interpreter computes float32): within
    2^-18 of sum |products| plus the accumulation bound, vector path included."""
    if layout == "vector":
        case = Case(n=2, h=4, w=5, in_widths=(8, 4), out_widths=(4, 12), seed=14, **_vector_layout(12))
    else:
        case = Case(n=1, h=3, w=3, in_widths=(3, 6), out_widths=(5, 3), seed=15)
    case.run_and_check(input_precision="tf32x3")


def test_multi_conv2d_deterministic():
    case = Case(n=2, h=5, w=5, in_widths=(4, 2), out_widths=(3, 5), seed=13)
    a = tc.multi_conv2d_triton(*case.args())
    b = tc.multi_conv2d_triton(*case.args(), _poison=True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_multi_conv2d_empty_batch():
    case = Case(n=1, in_widths=(2, 3), out_widths=(3, 1), residual=False)
    x = case.x[:0]
    out, s, q = tc.multi_conv2d_triton(x, case.weight, case.in_offsets, case.in_widths, case.out_widths,
                                       case.row_offsets, 1, 1, None, None, None, "relu", None, True)
    assert out.shape == (0, 4, 5, 5)
    assert s.shape == q.shape == (4,) and s.dtype == torch.float64 and not s.any() and not q.any()
    out, s, q = tc.multi_conv2d_triton(x, case.weight, case.in_offsets, case.in_widths, case.out_widths,
                                       case.row_offsets, 1, 1, None, None, None, "none", None, False)
    assert s.shape == q.shape == (0,)


@pytest.mark.slow
@pytest.mark.parametrize("k", [16, 64])
@pytest.mark.parametrize("ksize", [1, 3])
def test_multi_conv2d_many_candidates(k, ksize):
    gen = torch.Generator().manual_seed(k + ksize)
    in_widths = tuple(int(v) for v in torch.randint(1, 13, (k,), generator=gen))
    out_widths = tuple(int(v) for v in torch.randint(1, 9, (k,), generator=gen))
    for packed, layout in ((False, "channels_last"), (True, "slice")):
        Case(n=1, h=3, w=4, ksize=ksize, padding=ksize // 2, in_widths=in_widths, out_widths=out_widths,
             packed_input=packed, layout=layout, seed=k).run_and_check()


# ---------------------------------------------------------------------------- sliced_conv2d


@pytest.mark.parametrize(
    "n,c,h,w,ksize,stride,padding,out_rows,row_offset,layout",
    [
        (2, 3, 5, 5, 3, 1, 1, 5, 2, "nchw"),
        (1, 7, 6, 6, 3, 2, 1, 3, 0, "channels_last"),
        (2, 1, 3, 3, 1, 1, 0, 1, 6, "slice_cl"),
        (1, 12, 5, 6, 1, 2, 0, 17, 1, "slice"),
    ],
)
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
def test_sliced_conv2d_matches_reference(n, c, h, w, ksize, stride, padding, out_rows, row_offset, layout, epilogue):
    gen = torch.Generator().manual_seed(n + c + h + out_rows)
    x = _make_x(gen, n, c, h, w, layout, torch.float32)
    weight = _rand(gen, row_offset + out_rows + 3, c + 2, ksize, ksize)
    h_out, w_out = (h + 2 * padding - ksize) // stride + 1, (w + 2 * padding - ksize) // stride + 1
    kw = dict(scale=None, shift=None, residual=None, activation="none", prelu_slope=None)
    if epilogue:
        kw = dict(scale=_rand(gen, out_rows), shift=_rand(gen, out_rows),
                  residual=_rand(gen, n, out_rows, h_out, w_out), activation="prelu",
                  prelu_slope=torch.tensor([0.3], device=DEVICE))
    out, s, q = tc.sliced_conv2d_triton(x, weight, out_rows, row_offset, stride, padding, kw["scale"], kw["shift"],
                                        kw["residual"], kw["activation"], kw["prelu_slope"], True, _poison=True)
    d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    want, want_s, want_q = reference.sliced_conv2d(x.double(), weight.double(), out_rows, row_offset=row_offset,
                                                   stride=stride, padding=padding, stats=True, **d)
    w_slice = weight.double()[row_offset : row_offset + out_rows, :c]
    conv = F.conv2d(x.double(), w_slice, stride=stride, padding=padding)
    conv_abs = F.conv2d(x.double().abs(), w_slice.abs(), stride=stride, padding=padding)
    mag = conv.abs()
    if epilogue:
        mag = (conv * d["scale"].view(1, -1, 1, 1)).abs() + d["shift"].abs().view(1, -1, 1, 1) + d["residual"].abs()
    scale = d["scale"].abs().view(1, -1, 1, 1) if epilogue else None
    conv_tol, tol = _bounds(conv_abs, want, mag, float(c * ksize * ksize), scale, torch.float32, "ieee")
    assert out.shape == want.shape and out.dtype == torch.float32
    _assert_within(out, want, tol)
    _assert_stats_within(s, q, conv, conv_tol)


# ---------------------------------------------------------------------------- validation


def _bad_calls():
    case = Case(n=1, h=3, w=3, in_widths=(2, 3), out_widths=(3, 1), residual=False, seed=3)
    x, w = case.x, case.weight  # x: 4 channels; weight: (rows=10, c_max=5, 3, 3)
    good = dict(x=x, weight=w, in_offsets=[0, 0], in_widths=[2, 3], out_widths=[3, 1], row_offsets=[1, 6],
                stride=1, padding=1, scale=None, shift=None, residual=None, activation="none", prelu_slope=None,
                stats=False)

    def call(**changes):
        kw = {**good, **changes}
        return lambda: tc.multi_conv2d_triton(*kw.values())

    return [
        (call(in_widths=[2]), "same length"),
        (call(row_offsets=[1, 6, 0]), "same length"),
        (call(in_offsets=[0, 2]), r"in_offsets\[1\]"),
        (call(in_offsets=[-1, 0]), r"in_offsets\[0\]"),
        (call(in_widths=[0, 3]), r"in_widths\[0\]"),
        (call(out_widths=[3, 0]), r"out_widths\[1\]"),
        (call(row_offsets=[1, 9]), r"row_offsets\[1\]"),
        (call(row_offsets=[8, 6]), r"row_offsets\[0\]"),
        (call(x=torch.zeros(1, 8, 3, 3, device=DEVICE), in_widths=[2, 6]), r"in_widths\[1\].*columns of weight"),
        (call(x=x[0]), "x must be a 4-D"),
        (call(weight=w[:, :, :2, :2].contiguous()), "1x1 or 3x3"),
        (call(weight=w.double()), "weight has dtype"),
        (call(x=x.double(), weight=w.double()), "x has dtype"),
        (call(stride=0), "stride"),
        (call(padding=-1), "padding"),
        (call(padding=0, x=x[:, :, :2, :2]), "smaller than"),
        (call(activation="gelu"), "activation"),
        (call(activation="prelu"), "prelu_slope"),
        (call(activation="prelu", prelu_slope=torch.ones(3, device=DEVICE)), "prelu_slope must be 1-D of length 2"),
        (call(scale=torch.ones(3, device=DEVICE)), "scale must be 1-D of length 4"),
        (call(shift=torch.ones(1, 4, device=DEVICE)), "shift must be 1-D of length 4"),
        (call(residual=torch.ones(1, 4, 2, 3, device=DEVICE)), "residual must have out's shape"),
        (lambda: tc.multi_conv2d_triton(*good.values(), input_precision="fp64"), "input_precision"),
        (lambda: tc.sliced_conv2d_triton(x, w, 5, 6, 1, 1, None, None, None, "none", None, False),
         "out_rows / row_offset"),
        (lambda: tc.sliced_conv2d_triton(x, w[:, :3].contiguous(), 2, 0, 1, 1, None, None, None, "none", None, False),
         "x has 4 channels but weight only 3 columns"),
        (lambda: tc.sliced_conv2d_triton(x, w, 2, 0, 1, 1, None, None, None, "prelu", torch.ones(2, device=DEVICE),
                                         False), "prelu_slope must be 1-D of length 1"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error(i):
    fn, match = _bad_calls()[i]
    with pytest.raises(ValueError, match=match):
        fn()


# ---------------------------------------------------------------------------- GPU compilation


def test_kernel_compiles_for_hopper():
    """The kernel compiles to a sm_90 cubin without a GPU (two configs, float32 and bfloat16); and
    where the channels are contiguous with the vector flags set (the ranking engine's bfloat16
    calls), the 2-byte elements are copied as 8-byte vectors by cp.async (which pipelines), never
    loaded one by one."""
    code = (
        "import inspect, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from fastsupernet.ops import triton_conv as tc\n"
        "kernel = tc._multi_conv2d_kernel\n"
        "assert isinstance(kernel, triton.runtime.jit.JITFunction)\n"
        "params = inspect.signature(kernel.fn).parameters\n"
        "consts = [p for p, v in params.items() if v.annotation is not inspect.Parameter.empty]\n"
        "ptrs = {'scale_ptr': '*fp32', 'shift_ptr': '*fp32', 'slope_ptr': '*fp32', 'psum_ptr': '*fp64',\n"
        "        'psq_ptr': '*fp64', 'meta_ptr': '*i32'}\n"
        "unit = ('stride_xc', 'stride_oc', 'stride_rc', 'stride_wc')  # contiguous channels: specialised to 1\n"
        "for dtype, precision, cfg, vec in (('fp32', 'ieee', tc._CONFIGS[0], 1), ('bf16', 'ieee', tc._CONFIGS[4], 1),\n"
        "                                   ('bf16', 'ieee', tc._CONFIGS[1], 4)):\n"
        "    sig = {p: 'constexpr' if p in consts or (vec > 1 and p in unit) else ptrs.get(p, '*' + dtype)\n"
        "           if p.endswith('_ptr') else 'i32' for p in params}\n"
        "    constexprs = dict(KSIZE=3, HAS_SCALE=True, HAS_SHIFT=True, HAS_RESIDUAL=True, ACTIVATION=2, STATS=True,\n"
        "                      STATS_CHUNK=tc.STATS_CHUNK, INPUT_PRECISION=precision, CBLOCKS=0, VEC_X=vec,\n"
        "                      VEC_W=vec, **cfg.kwargs)\n"
        "    attrs = {}\n"
        "    if vec > 1:\n"
        "        constexprs.update({p: 1 for p in unit})\n"
        "        attrs = {(i,): [['tt.divisibility', 16]] for i, p in enumerate(params) if p.endswith('_ptr')}\n"
        "    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)\n"
        "    out = triton.compile(src, target=GPUTarget('cuda', 90, 32),\n"
        "                         options={'num_warps': cfg.num_warps, 'num_stages': cfg.num_stages})\n"
        "    assert out.asm['cubin']\n"
        "    ptx = out.asm['ptx']\n"
        "    assert dtype == 'fp32' or 'wgmma' in ptx, 'bfloat16 without tensor cores'\n"
        "    if vec > 1:\n"
        "        assert 'ld.global.b16' not in ptx, 'bfloat16 elements loaded one by one'\n"
        "        assert ptx.count('cp.async.ca.shared.global') >= 2 and '], 0x8,' in ptx, 'no 8-byte cp.async'\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
