"""fastsupernet::multi_conv2d_tf32 (the tensor-core kernel, csrc/cuda/conv_tf32.cu) against float64 oracles.

The problems, inputs and epilogue oracle are those of tests/test_conv_cuda.py (``Problem``).

Two oracles, two bounds, per output element, with A = the convolution of |x| and |w| (float64)
and R = in_width * k * k the candidate's reduction length:

- exact arithmetic on the TF32-ROUNDED inputs (x and weight rounded as ``cvt.rna.tf32.f32``
  does, emulated on the bits): the kernel's products are then exact and only its fp32
  accumulation differs, ``|conv - ref| <= R * 2**-23 * A``; this bound is sharp enough that a
  wrong operand layout, tap, channel or image fails it by orders of magnitude;
- exact arithmetic on the unrounded inputs: ``|conv - ref| <= (2**-10 + R * 2**-23) * A``, the
  error bound TF32 promises (each input rounded to 11 significant bits).

The epilogue (scale, shift, residual, activation) is fp32 and adds a few roundings of its own
size: ``2**-22 * (|conv * scale| + |shift| + |residual|)``; the activation scales errors by at
most max(1, |slope|). Statistics: float64 sums of the fp32 conv values, so their error is the
sum of the per-element conv errors. Outputs are allocated by the op (they cannot be poisoned);
every output is checked to be finite and every channel and pixel is compared.

Skipped without a GPU; with a GPU, a build without the kernel is a failure.
"""
from __future__ import annotations

import pytest
import torch

from fastsupernet.ops import _extension
from test_conv_cuda import EPILOGUES, Problem

U23 = 2.0**-23


@pytest.fixture(scope="module")
def tf32_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CUDA kernels cannot run here)")
    _extension.require()
    assert _extension.has_kernel("multi_conv2d_tf32", "CUDA"), (
        f"fastsupernet::multi_conv2d_tf32 has no CUDA kernel: {_extension.BUILD_HINT} with a CUDA torch and nvcc"
    )
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 tensor cores need compute capability 8.0 or newer")


gpu = pytest.mark.usefixtures("tf32_kernel")


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32 (10 explicit mantissa bits; nearest, ties away from zero), as float64."""
    bits = t.detach().to("cpu", torch.float32).contiguous().view(torch.int32)
    sign = bits & -(2**31)
    mag = ((bits & 0x7FFFFFFF) + 0x1000) & 0x7FFFE000
    return (sign | mag).view(torch.float32).to(torch.float64).view(t.shape)


def check_tf32(p: Problem, result=None) -> None:
    out, s, q = _ops_tf32(p) if result is None else result
    assert out.device == p.x.device and out.dtype == torch.float32
    assert tuple(out.shape) == p.out_shape
    assert out.is_contiguous(), "out must be contiguous NCHW"
    got = out.cpu().double()
    assert torch.isfinite(got).all(), "non-finite values in the output"

    x = p.x.detach().to("cpu", torch.float64)
    w = p.weight.detach().to("cpu", torch.float64)
    xr, wr = tf32_round(p.x), tf32_round(p.weight)
    conv_r = p.convs(xr, wr)
    conv_exact = p.convs(x, w)
    a = p.convs(xr.abs(), wr.abs())  # bounds A of the rounded and (within 2**-10) the exact inputs
    reach = torch.repeat_interleave(
        torch.tensor([i * p.kernel**2 for i in p.in_widths], dtype=torch.float64), torch.tensor(p.out_widths)
    ).view(1, -1, 1, 1)
    tol_acc = reach * U23 * a  # fp32 accumulation of exact products
    tol_exact = tol_acc + 2.0**-10 * 1.001 * a  # plus TF32 input rounding

    scale = p.scale.cpu().double().abs().view(1, -1, 1, 1) if p.scale is not None else 1.0
    epi = conv_r.abs() * scale
    if p.shift is not None:
        epi = epi + p.shift.cpu().double().abs().view(1, -1, 1, 1)
    if p.residual is not None:
        epi = epi + p.residual.cpu().double().abs()
    gain = 1.0
    if p.activation == "prelu":
        gain = max(1.0, float(p.slope.abs().max()))
    for name, ref_conv, tol in (("TF32-rounded inputs", conv_r, tol_acc), ("exact inputs", conv_exact, tol_exact)):
        ref = p.epilogue(ref_conv)
        bound = gain * (tol * scale + 2.0**-22 * epi) + 1e-30
        err = (got - ref).abs()
        worst = float((err / bound).max())
        assert worst <= 1.0, f"vs the oracle on {name}: error {worst:.3g} x the bound (max abs {float(err.max()):.3g})"

    assert s.dtype == torch.float64 and q.dtype == torch.float64
    if not p.stats:
        assert s.numel() == 0 and q.numel() == 0, "stats=False must return empty sum and sumsq"
        return
    c_out = p.out_shape[1]
    assert tuple(s.shape) == (c_out,) and tuple(q.shape) == (c_out,)
    dims = (0, 2, 3)
    tol_s = tol_acc.expand_as(conv_r).sum(dim=dims) + 1e-12 * conv_r.abs().sum(dim=dims)
    tol_q = (tol_acc * (2 * conv_r.abs() + tol_acc)).sum(dim=dims) + 1e-12 * (conv_r**2).sum(dim=dims)
    err_s = (s.cpu() - conv_r.sum(dim=dims)).abs()
    err_q = (q.cpu() - (conv_r**2).sum(dim=dims)).abs()
    assert (err_s <= tol_s).all(), f"sum off by up to {float((err_s - tol_s).max()):.3g} beyond the bound"
    assert (err_q <= tol_q).all(), f"sumsq off by up to {float((err_q - tol_q).max()):.3g} beyond the bound"


def _ops_tf32(p: Problem):
    return torch.ops.fastsupernet.multi_conv2d_tf32(*p.args())


def test_tf32_round_emulation():
    # 1 + 2**-11 is a tie between 1 and 1 + 2**-10: away from zero; just below it rounds down
    v = torch.tensor([1 + 2**-11, -(1 + 2**-11), 1 + 2**-11 - 2**-23, 3.0, -0.0], dtype=torch.float32)
    assert tf32_round(v).tolist() == [1 + 2**-10, -(1 + 2**-10), 1.0, 3.0, -0.0]


@gpu
@pytest.mark.parametrize("stats", [False, True], ids=["nostats", "stats"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3])
def test_multi_conv2d_tf32_epilogues(kernel, stride, epilogue, stats):
    # odd shapes and batch (images past N in the 16-image tile), widths of 1..17, a 17-channel candidate
    p = Problem(
        n=3, h=13, w=11, kernel=kernel, stride=stride, padding=kernel // 2, in_widths=[3, 16, 7, 1],
        out_widths=[5, 17, 4, 12], stats=stats, seed=kernel * 100 + stride * 10 + stats, **EPILOGUES[epilogue],
    )  # fmt: skip
    check_tf32(p)


@gpu
@pytest.mark.parametrize("k", [1, 7, 64])
def test_multi_conv2d_tf32_candidate_counts(k):
    g = torch.Generator().manual_seed(k)
    in_w = [int(v) for v in torch.randint(1, 41, (k,), generator=g)]
    out_w = [int(v) for v in torch.randint(1, 41, (k,), generator=g)]
    p = Problem(
        n=18, h=9, w=10, kernel=3, stride=1, padding=1, in_widths=in_w, out_widths=out_w,
        scale=True, shift=True, activation="relu", stats=True, seed=k,
    )  # fmt: skip
    check_tf32(p)


@gpu
@pytest.mark.parametrize(
    "hw,max_width,stride,kernel",
    [(32, 16, 1, 3), (32, 32, 2, 3), (16, 32, 1, 3), (16, 64, 2, 3), (8, 64, 1, 3), (32, 32, 2, 1), (16, 64, 2, 1)],
    ids=lambda v: str(v),
)
def test_multi_conv2d_tf32_track1_shapes(hw, max_width, stride, kernel):
    g = torch.Generator().manual_seed(hw + max_width + kernel)
    choices = list(range(4, max_width + 1, 4))
    k = 8
    in_w = [min(choices[int(i)], max_width // stride) for i in torch.randint(0, len(choices), (k,), generator=g)]
    out_w = [choices[int(i)] + (1 if choices[int(i)] <= 8 else 0) for i in torch.randint(0, len(choices), (k,), generator=g)]
    p = Problem(
        n=33, h=hw, w=hw, kernel=kernel, stride=stride, padding=kernel // 2, in_widths=in_w, out_widths=out_w,
        scale=True, shift=True, residual=stride == 1, activation="relu", stats=True, seed=hw,
    )  # fmt: skip
    check_tf32(p)


@gpu
@pytest.mark.parametrize(
    "h,w,kernel,stride,padding",
    [(1, 1, 1, 1, 0), (1, 1, 3, 1, 1), (1, 100, 3, 1, 1), (100, 1, 3, 2, 1), (2, 70, 1, 2, 0), (7, 7, 3, 1, 0),
     (17, 19, 3, 3, 2), (9, 9, 1, 1, 1)],
)  # fmt: skip
def test_multi_conv2d_tf32_odd_geometry(h, w, kernel, stride, padding):
    p = Problem(
        n=2, h=h, w=w, kernel=kernel, stride=stride, padding=padding, in_widths=[2, 9], out_widths=[3, 20],
        shift=True, residual=True, activation="prelu", stats=True, seed=h * 1000 + w,
    )  # fmt: skip
    check_tf32(p)


@gpu
@pytest.mark.parametrize("x_layout", ["channels_last", "slice"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_multi_conv2d_tf32_input_layouts(x_layout, kernel):
    p = Problem(
        n=2, h=10, w=12, kernel=kernel, stride=1, padding=kernel // 2, in_widths=[4, 12, 33], out_widths=[8, 16, 9],
        residual=True, residual_layout="channels_last", activation="relu", stats=True, x_layout=x_layout, seed=7,
    )  # fmt: skip
    check_tf32(p)


@gpu
def test_multi_conv2d_tf32_shared_input_large_stats():
    # 131072 values per channel (many pixel tiles), every candidate reading channels [0, w) of one input
    p = Problem(
        n=128, h=32, w=32, kernel=3, stride=1, padding=1, in_widths=[16, 9, 5], out_widths=[16, 5, 9],
        shared_input=True, weight_cols=20, scale=True, shift=True, activation="relu", stats=True, seed=5,
    )  # fmt: skip
    check_tf32(p)


@gpu
def test_multi_conv2d_tf32_deterministic_and_side_stream():
    p = Problem(
        n=20, h=16, w=16, kernel=3, stride=1, padding=1, in_widths=[16, 32], out_widths=[32, 20],
        residual=True, activation="relu", stats=True, seed=9,
    )  # fmt: skip
    a = _ops_tf32(p)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        b = _ops_tf32(p)
    torch.cuda.current_stream().wait_stream(stream)
    for u, v in zip(a, b):
        assert torch.equal(u, v), "two runs differ: results must be bitwise reproducible"
    check_tf32(p, b)


@gpu
def test_multi_conv2d_tf32_empty_batch():
    p = Problem(n=0, h=5, w=5, kernel=3, stride=1, padding=1, in_widths=[3], out_widths=[4], stats=True)
    out, s, q = _ops_tf32(p)
    assert tuple(out.shape) == (0, 4, 5, 5)
    assert s.tolist() == [0.0] * 4 and q.tolist() == [0.0] * 4


@gpu
def test_multi_conv2d_tf32_rejects_bad_input():
    p = Problem(n=2, h=6, w=6, kernel=3, stride=1, padding=1, in_widths=[3, 4], out_widths=[5, 6], seed=1)
    args = list(p.args())
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fastsupernet.multi_conv2d_tf32(args[0].double(), args[1].double(), *args[2:])
    bad = list(args)
    bad[5] = [0, 100]
    with pytest.raises(RuntimeError, match=r"row_offsets\[1\]"):
        torch.ops.fastsupernet.multi_conv2d_tf32(*bad)


@gpu
def test_multi_conv2d_tf32_opcheck():
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:  # pragma: no cover
        pytest.skip("torch.library.opcheck not available")
    p = Problem(
        n=2, h=6, w=7, kernel=3, stride=1, padding=1, in_widths=[3, 4], out_widths=[5, 6], scale=True,
        activation="relu", stats=True, seed=2,
    )  # fmt: skip
    opcheck(torch.ops.fastsupernet.multi_conv2d_tf32.default, p.args(),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip
