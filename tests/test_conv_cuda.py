"""multi_conv2d and sliced_conv2d on CUDA tensors (the compiled CUDA kernels, csrc/cuda/conv.cu)
against a float64 oracle.

Oracle: the op semantics of csrc/README.md in float64 on the CPU, a loop over candidates of
``F.conv2d(x[:, off:off+w], weight[r:r+o, :w])`` on the float64 copies of the inputs, then the
epilogue (scale, shift, residual, activation with the candidate's PReLU slope), concatenated on
channels; statistics are float64 sums over (N, H', W') of the conv output before the epilogue.

Inputs: ``randn * 2 + 0.5`` for x and residual (nonzero mean), weights ``randn / sqrt(C_max * k * k)``
(He-style scale, so outputs are O(1)), scale ``1 + randn / 2``, shift ``randn``, PReLU slopes
``randn / 4``. The op allocates its outputs, so they cannot be poisoned beforehand; every output
is checked to be finite instead (the inputs are).

Error bounds. float32: each output is an fp32 FMA chain over R = in_width * k * k <= 576
products; with He-scaled weights its rounding error is about sqrt(R) * 2**-24 times the partial
sums (~1e-6 at R = 576), far inside ``|out - ref| <= atol + rtol * |ref|`` with rtol = 1e-4,
atol = 1e-5 (the epilogue adds a few roundings of its own size, covered by rtol). Statistics
are float64 sums of the fp32 conv values, so their error is the sum of the per-element errors:
``|sum - ref| <= M * atol + rtol * sum|ref|`` and ``|sumsq - ref| <= 2.5 * (atol * sum|ref| +
rtol * sum ref**2)`` over the M = N * H' * W' values of a channel. float64: the same with
rtol = 1e-10, atol = 1e-11 (the float64 FMA chain is ~1e-14 relative).

Skipped without a GPU; with a GPU, a build without the CUDA kernels is a failure.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastsupernet.ops import _extension

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA kernels cannot run here)")

DEVICE = "cuda"
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-11)}


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernels():
    _extension.require()
    for op in ("multi_conv2d", "sliced_conv2d"):
        assert _extension.has_kernel(op, "CUDA"), (
            f"fastsupernet::{op} has no CUDA kernel: the extension was built without CUDA; {_extension.BUILD_HINT} "
            "with a CUDA torch and nvcc available"
        )


def _ops():
    return torch.ops.fastsupernet


# --- problem construction and oracle ----------------------------------------------------------


class Problem:
    """Arguments of one multi_conv2d call, on the CPU (float64 masters) and on the device."""

    def __init__(
        self,
        *,
        n: int,
        h: int,
        w: int,
        kernel: int,
        stride: int,
        padding: int,
        in_widths: list[int],
        out_widths: list[int],
        shared_input: bool = False,
        weight_cols: int | None = None,
        extra_rows: int = 3,
        scale: bool = False,
        shift: bool = False,
        residual: bool = False,
        activation: str = "none",
        stats: bool = False,
        dtype: torch.dtype = torch.float32,
        x_layout: str = "nchw",  # nchw | channels_last | slice (a channel slice of a wider tensor)
        residual_layout: str = "nchw",
        seed: int = 0,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        k = len(in_widths)
        assert len(out_widths) == k
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.in_widths, self.out_widths = list(in_widths), list(out_widths)
        # Input channels: every candidate reads [0, w) of a shared input, or its own disjoint slice.
        if shared_input:
            self.in_offsets = [0] * k
            c_in = max(in_widths) + 1
        else:
            self.in_offsets, c_in = [], 1  # channel 0 is read by nobody
            for wdt in in_widths:
                self.in_offsets.append(c_in)
                c_in += wdt
        # Packed weight: rows of several groups; every candidate at a row offset inside it.
        c_max = weight_cols if weight_cols is not None else max(in_widths) + 2
        rows = max(out_widths) + extra_rows
        self.row_offsets = [int(torch.randint(0, rows - o + 1, (1,), generator=g)) for o in out_widths]
        c_out = sum(out_widths)
        ho = (h + 2 * padding - kernel) // stride + 1
        wo = (w + 2 * padding - kernel) // stride + 1
        self.out_shape = (n, c_out, ho, wo)

        extra = 3 if x_layout == "slice" else 0
        x_full = torch.randn(n, c_in + extra, h, w, generator=g, dtype=torch.float64) * 2 + 0.5
        self.w64 = torch.randn(rows, c_max, kernel, kernel, generator=g, dtype=torch.float64) / math.sqrt(
            c_max * kernel * kernel
        )
        self.scale64 = 1 + torch.randn(c_out, generator=g, dtype=torch.float64) / 2 if scale else None
        self.shift64 = torch.randn(c_out, generator=g, dtype=torch.float64) if shift else None
        self.res64 = (torch.randn(self.out_shape, generator=g, dtype=torch.float64) * 2 + 0.5) if residual else None
        self.slope64 = torch.randn(k, generator=g, dtype=torch.float64) / 4 if activation == "prelu" else None
        self.activation, self.stats, self.dtype = activation, stats, dtype

        # Values rounded to the test dtype: the oracle uses exactly the values the kernel sees.
        def dev(t):
            return None if t is None else t.to(dtype).to(DEVICE)

        x_dev = x_full.to(dtype).to(DEVICE)
        x_dev = x_dev[:, 1 : 1 + c_in] if extra else x_dev
        if x_layout == "channels_last":
            x_dev = x_dev.contiguous(memory_format=torch.channels_last)
        self.x = x_dev
        self.weight = dev(self.w64)
        self.scale, self.shift, self.slope = dev(self.scale64), dev(self.shift64), dev(self.slope64)
        self.residual = dev(self.res64)
        if self.residual is not None and residual_layout == "channels_last":
            self.residual = self.residual.contiguous(memory_format=torch.channels_last)

    def args(self) -> tuple:
        return (
            self.x,
            self.weight,
            self.in_offsets,
            self.in_widths,
            self.out_widths,
            self.row_offsets,
            self.stride,
            self.padding,
            self.scale,
            self.shift,
            self.residual,
            self.activation,
            self.slope,
            self.stats,
        )

    def run(self):
        return _ops().multi_conv2d(*self.args())

    def oracle(self):
        """(out, conv) in float64 from the dtype-rounded inputs."""
        conv = self.convs(self.x.detach().to("cpu", torch.float64), self.weight.detach().to("cpu", torch.float64))
        return self.epilogue(conv), conv

    def convs(self, x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        """The K convolutions of CPU tensors x and wt, packed on channels."""
        convs = [
            F.conv2d(x[:, o : o + i], wt[r : r + c, :i], stride=self.stride, padding=self.padding)
            for o, i, c, r in zip(self.in_offsets, self.in_widths, self.out_widths, self.row_offsets)
        ]
        return torch.cat(convs, dim=1)

    def epilogue(self, conv: torch.Tensor) -> torch.Tensor:
        """The op's epilogue on a float64 CPU conv output."""
        y = conv
        if self.scale is not None:
            y = y * self.scale.cpu().double().view(1, -1, 1, 1)
        if self.shift is not None:
            y = y + self.shift.cpu().double().view(1, -1, 1, 1)
        if self.residual is not None:
            y = y + self.residual.cpu().double()
        if self.activation == "relu":
            y = torch.relu(y)
        elif self.activation == "prelu":
            slope = torch.repeat_interleave(self.slope.cpu().double(), torch.tensor(self.out_widths))
            y = torch.where(y > 0, y, slope.view(1, -1, 1, 1) * y)
        return y


def check(p: Problem, result=None) -> None:
    out, s, q = p.run() if result is None else result
    rtol, atol = TOL[p.dtype]
    assert out.device.type == "cuda" and out.dtype == p.dtype
    assert tuple(out.shape) == p.out_shape
    assert out.is_contiguous(), "out must be contiguous NCHW"
    assert s.dtype == torch.float64 and q.dtype == torch.float64
    ref, conv = p.oracle()
    got = out.cpu().double()
    assert torch.isfinite(got).all(), "non-finite values in the output"
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    if not p.stats:
        assert s.numel() == 0 and q.numel() == 0, "stats=False must return empty sum and sumsq"
        return
    c_out = p.out_shape[1]
    assert tuple(s.shape) == (c_out,) and tuple(q.shape) == (c_out,)
    m = conv.numel() // c_out if c_out else 0
    ref_s = conv.sum(dim=(0, 2, 3))
    ref_q = (conv * conv).sum(dim=(0, 2, 3))
    abs_s = conv.abs().sum(dim=(0, 2, 3))
    tol_s = m * atol + rtol * abs_s
    tol_q = 2.5 * (atol * abs_s + rtol * ref_q)
    err_s = (s.cpu() - ref_s).abs()
    err_q = (q.cpu() - ref_q).abs()
    assert (err_s <= tol_s).all(), f"sum off by up to {float((err_s - tol_s).max()):.3g} beyond the bound"
    assert (err_q <= tol_q).all(), f"sumsq off by up to {float((err_q - tol_q).max()):.3g} beyond the bound"


# --- correctness ----------------------------------------------------------------------------

EPILOGUES = {
    "plain": {},
    "bn_relu": {"scale": True, "shift": True, "activation": "relu"},
    "res_prelu": {"residual": True, "activation": "prelu"},
    "all_relu": {"scale": True, "shift": True, "residual": True, "activation": "relu"},
    "shift_prelu": {"shift": True, "activation": "prelu"},
}


@pytest.mark.parametrize("stats", [False, True], ids=["nostats", "stats"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3])
def test_multi_conv2d_cuda_epilogues(kernel, stride, epilogue, stats):
    # odd shapes, widths that are and are not multiples of 4, one candidate wider than a 16-channel tile
    p = Problem(
        n=3,
        h=13,
        w=11,
        kernel=kernel,
        stride=stride,
        padding=kernel // 2,
        in_widths=[3, 16, 7, 1],
        out_widths=[5, 17, 4, 12],
        stats=stats,
        seed=kernel * 100 + stride * 10 + stats,
        **EPILOGUES[epilogue],
    )
    check(p)


@pytest.mark.parametrize("k", [1, 2, 7, 16, 64])
def test_multi_conv2d_cuda_candidate_counts(k):
    g = torch.Generator().manual_seed(k)
    in_w = [int(v) for v in torch.randint(1, 33, (k,), generator=g)]
    out_w = [int(v) for v in torch.randint(1, 41, (k,), generator=g)]
    p = Problem(
        n=2, h=9, w=10, kernel=3, stride=1, padding=1, in_widths=in_w, out_widths=out_w,
        scale=True, shift=True, activation="relu", stats=True, seed=k,
    )  # fmt: skip
    check(p)


# Track-1-like layers (smaller batch): 32x32 widths <= 16, 16x16 <= 32, 8x8 <= 64, strides 1 and 2.
@pytest.mark.parametrize(
    "hw,max_width,stride",
    [(32, 16, 1), (32, 32, 2), (16, 32, 1), (16, 64, 2), (8, 64, 1)],
    ids=lambda v: str(v),
)
def test_multi_conv2d_cuda_track1_shapes(hw, max_width, stride):
    g = torch.Generator().manual_seed(hw + max_width)
    choices = list(range(4, max_width + 1, 4))
    k = 8
    in_w = [choices[int(i)] for i in torch.randint(0, len(choices), (k,), generator=g)]
    in_w = [min(w, max_width // stride) for w in in_w]  # a stride-2 layer reads the previous stage
    out_w = [choices[int(i)] for i in torch.randint(0, len(choices), (k,), generator=g)]
    p = Problem(
        n=8, h=hw, w=hw, kernel=3, stride=stride, padding=1, in_widths=in_w, out_widths=out_w,
        scale=True, shift=True, residual=stride == 1, activation="relu", stats=True, seed=hw,
    )  # fmt: skip
    check(p)


@pytest.mark.parametrize(
    "h,w,kernel,stride,padding",
    [
        (1, 1, 1, 1, 0),
        (1, 1, 3, 1, 1),
        (1, 100, 3, 1, 1),
        (100, 1, 3, 2, 1),
        (2, 70, 1, 2, 0),
        (7, 7, 3, 1, 0),
        (6, 6, 3, 2, 0),
        (17, 19, 3, 3, 2),
        (9, 9, 1, 1, 1),  # 1x1 with padding: a zero border
    ],
)
def test_multi_conv2d_cuda_odd_geometry(h, w, kernel, stride, padding):
    p = Problem(
        n=2, h=h, w=w, kernel=kernel, stride=stride, padding=padding, in_widths=[2, 9], out_widths=[3, 20],
        shift=True, residual=True, activation="prelu", stats=True, seed=h * 1000 + w,
    )  # fmt: skip
    check(p)


@pytest.mark.parametrize("x_layout", ["channels_last", "slice"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_multi_conv2d_cuda_input_layouts(x_layout, kernel):
    p = Problem(
        n=2, h=10, w=12, kernel=kernel, stride=1, padding=kernel // 2, in_widths=[4, 12, 33], out_widths=[8, 16, 9],
        residual=True, residual_layout="channels_last", activation="relu", stats=True, x_layout=x_layout, seed=7,
    )  # fmt: skip
    check(p)


def test_multi_conv2d_cuda_shared_input_and_wide_weight():
    # every candidate reads channels [0, w) of one input; the weight has more columns than any reads
    p = Problem(
        n=4, h=8, w=8, kernel=3, stride=1, padding=1, in_widths=[64, 40, 8, 1], out_widths=[64, 33, 16, 1],
        shared_input=True, weight_cols=70, extra_rows=20, scale=True, activation="prelu", stats=True, seed=11,
    )  # fmt: skip
    check(p)


@pytest.mark.parametrize("kernel", [1, 3])
def test_multi_conv2d_cuda_float64(kernel):
    p = Problem(
        n=2, h=11, w=9, kernel=kernel, stride=2, padding=kernel // 2, in_widths=[5, 20], out_widths=[7, 18],
        scale=True, shift=True, residual=True, activation="prelu", stats=True, dtype=torch.float64, seed=3,
    )  # fmt: skip
    check(p)


def test_multi_conv2d_cuda_large_stats():
    # 131072 values per channel: many pixel tiles merged by the second kernel
    p = Problem(
        n=128, h=32, w=32, kernel=3, stride=1, padding=1, in_widths=[4, 16], out_widths=[16, 4], stats=True, seed=5
    )
    check(p)


def test_multi_conv2d_cuda_many_tiles():
    # 128 candidates of widths up to 64: several channel tiles per candidate
    g = torch.Generator().manual_seed(128)
    k = 128
    in_w = [int(v) * 4 for v in torch.randint(1, 17, (k,), generator=g)]
    out_w = [int(v) * 4 for v in torch.randint(1, 17, (k,), generator=g)]
    p = Problem(
        n=2, h=8, w=8, kernel=3, stride=1, padding=1, in_widths=in_w, out_widths=out_w,
        scale=True, shift=True, activation="relu", stats=True, seed=128,
    )  # fmt: skip
    check(p)


def test_multi_conv2d_cuda_empty_batch():
    p = Problem(n=0, h=5, w=5, kernel=3, stride=1, padding=1, in_widths=[3], out_widths=[4], stats=True)
    out, s, q = p.run()
    assert tuple(out.shape) == (0, 4, 5, 5)
    assert s.tolist() == [0.0] * 4 and q.tolist() == [0.0] * 4


def test_multi_conv2d_cuda_deterministic():
    p = Problem(
        n=16, h=16, w=16, kernel=3, stride=1, padding=1, in_widths=[16, 32], out_widths=[32, 20],
        residual=True, activation="relu", stats=True, seed=9,
    )  # fmt: skip
    a = p.run()
    b = p.run()
    for u, v in zip(a, b):
        assert torch.equal(u, v), "two runs differ: results must be bitwise reproducible"


def test_multi_conv2d_cuda_on_a_side_stream():
    p = Problem(n=4, h=9, w=9, kernel=3, stride=1, padding=1, in_widths=[6], out_widths=[10], stats=True, seed=4)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = p.run()
    torch.cuda.current_stream().wait_stream(stream)
    check(p, result)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("activation", ["none", "relu", "prelu"])
def test_sliced_conv2d_cuda(kernel, activation):
    p = Problem(
        n=3, h=12, w=7, kernel=kernel, stride=2, padding=kernel // 2, in_widths=[11], out_widths=[19],
        shared_input=True, scale=True, shift=True, residual=True, activation=activation, stats=True, seed=kernel,
    )  # fmt: skip
    x = p.x[:, :11]  # the sliced op reads every channel of x
    p.x = x.contiguous()
    result = _ops().sliced_conv2d(
        p.x, p.weight, 19, p.row_offsets[0], p.stride, p.padding, p.scale, p.shift, p.residual, p.activation,
        p.slope, p.stats,
    )  # fmt: skip
    check(p, result)
    multi = p.run()
    for u, v in zip(result, multi):
        assert torch.equal(u, v), "sliced_conv2d must equal multi_conv2d with one candidate"


# --- argument checks --------------------------------------------------------------------------


def _base_args(**over):
    p = Problem(n=2, h=6, w=6, kernel=3, stride=1, padding=1, in_widths=[3, 4], out_widths=[5, 6], seed=1)
    args = dict(
        x=p.x, weight=p.weight, in_offsets=p.in_offsets, in_widths=p.in_widths, out_widths=p.out_widths,
        row_offsets=p.row_offsets, stride=1, padding=1, scale=None, shift=None, residual=None,
        activation="none", prelu_slope=None, stats=False,
    )  # fmt: skip
    args.update(over)
    return list(args.values())


# Tensors are built inside the test (lambdas), so that collection needs no GPU.
@pytest.mark.parametrize(
    "over,pattern",
    [
        ({"in_widths": [3]}, "same length"),
        ({"in_offsets": [0, 6]}, r"in_offsets\[1\]"),
        ({"row_offsets": [0, 100]}, r"row_offsets\[1\]"),
        ({"in_widths": [3, 40]}, r"in_widths\[1\]"),
        ({"out_widths": [5, 0]}, r"out_widths\[1\]"),
        ({"stride": 0}, "stride"),
        ({"padding": -1}, "padding"),
        ({"activation": "gelu"}, "activation"),
        ({"activation": "prelu"}, "prelu_slope"),
        ({"scale": lambda: torch.ones(3, device=DEVICE)}, "scale"),
        ({"shift": lambda: torch.ones(11, device=DEVICE, dtype=torch.float64)}, "shift"),
        ({"residual": lambda: torch.ones(2, 11, 5, 6, device=DEVICE)}, "residual"),
        ({"prelu_slope": lambda: torch.ones(3, device=DEVICE), "activation": "prelu"}, "prelu_slope"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_multi_conv2d_cuda_rejects_bad_arguments(over, pattern):
    over = {key: value() if callable(value) else value for key, value in over.items()}
    with pytest.raises(RuntimeError, match=pattern):
        _ops().multi_conv2d(*_base_args(**over))


def test_multi_conv2d_cuda_rejects_bad_tensors():
    args = _base_args()
    x, weight, rest = args[0], args[1], args[2:]
    with pytest.raises(RuntimeError, match="weight is on"):
        _ops().multi_conv2d(x, weight.cpu(), *rest)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        _ops().multi_conv2d(x, weight.double(), *rest)
    with pytest.raises(RuntimeError, match="1x1 or 3x3"):
        _ops().multi_conv2d(x, weight[:, :, :2, :2].contiguous(), *rest)
    with pytest.raises(RuntimeError, match="contiguous"):
        _ops().multi_conv2d(x, weight.permute(0, 1, 3, 2), *rest)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _ops().multi_conv2d(x.half(), weight.half(), *rest)
    with pytest.raises(RuntimeError, match="4-D"):
        _ops().multi_conv2d(x[0], weight, *rest)
