"""CPU kernels of ``fastsupernet::bn_act`` and ``fastsupernet::bn_act_backward``.

Oracle: the same formulas in float64 from the same (float32) inputs: the forward
``act((y * scale + shift) + r)`` and, for the backward, autograd through plain train-mode
BatchNorm, the residual add and the activation.

Error bounds. Forward: at most five roundings, each relative to the magnitude of the value
then, so |out - oracle| <= 8 u (|y scale| + |shift| + |r|) max(1, |slope|) with u = 2**-24
(float32) or 2**-53 (float64). Backward: the per-channel sums are accumulated in float64, so
the float32 gradient's error is a few roundings of its terms: we allow 1e-5 relative to the
largest gradient of the tensor (float32) and compare float64 runs with ``gradcheck``.
Inputs are ``randn * 2 + 0.5`` (never zero); rows of 9 and 14 values exercise the AVX2
kernel's 8-wide body and its scalar tail. The ops allocate their outputs, so instead of
poisoning buffers we check shapes, dtypes and that every value is finite.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastsupernet.ops._extension import has_kernel, load

pytestmark = pytest.mark.skipif(load() is None or not has_kernel("bn_act", "CPU"),
                                reason="fastsupernet._C (with bn_act) is not built")

OPS = torch.ops.fastsupernet
SHAPES = [(3, 5, 7, 9), (2, 16, 8, 8), (1, 3, 1, 1), (4, 7, 14, 14)]
ACTS = ["none", "relu", "prelu"]


def _rand(*shape, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _act(z, act, slope):
    if act == "relu":
        return z.clamp_min(0)
    if act == "prelu":
        return torch.where(z > 0, z, slope.to(z.dtype) * z)
    return z


@pytest.fixture(params=["default", "generic"])
def kernel(request, monkeypatch):
    """Both float32 kernels: AVX2 (the default where the CPU has it) and the portable one."""
    if request.param == "generic":
        monkeypatch.setenv("FASTSUPERNET_CPU_KERNEL", "generic")
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("res", ["none", "plain", "affine"])
def test_forward_matches_float64_oracle(shape, act, res, kernel):
    n, c, h, w = shape
    y, a, b = _rand(*shape, seed=1), _rand(c, seed=2), _rand(c, seed=3)
    r = _rand(*shape, seed=4) if res != "none" else None
    ra, rb = (_rand(c, seed=5), _rand(c, seed=6)) if res == "affine" else (None, None)
    slope = _rand(1, seed=7) * 0.1 if act == "prelu" else None
    out = OPS.bn_act(y, a, b, r, ra, rb, act, slope)
    assert out.shape == y.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.isfinite(out).all()
    view = (1, -1, 1, 1)
    z = y.double() * a.double().view(view) + b.double().view(view)
    mag = (y.double() * a.double().view(view)).abs() + b.double().abs().view(view)
    if r is not None:
        rr = r.double() if ra is None else r.double() * ra.double().view(view) + rb.double().view(view)
        z = z + rr
        mag = mag + rr.abs() + (0 if ra is None else (r.double() * ra.double().view(view)).abs())
    ref = _act(z, act, slope.double() if slope is not None else None)
    bound = 8 * 2.0**-24 * mag * (max(1.0, abs(slope.item())) if slope is not None else 1.0)
    assert ((out.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("act", ACTS)
def test_forward_is_the_separately_rounded_torch_sequence(act, kernel):
    """Bitwise equal to mul, add, add, activation as separate float32 torch ops: the ranking
    engine's position-independence argument rests on it."""
    y, a, b, r = _rand(3, 6, 5, 11, seed=11), _rand(6, seed=12), _rand(6, seed=13), _rand(3, 6, 5, 11, seed=14)
    ra, rb = _rand(6, seed=15), _rand(6, seed=16)
    slope = torch.tensor([0.25])
    v = (1, -1, 1, 1)
    z = y.mul(a.view(v)).add(b.view(v)).add(r.mul(ra.view(v)).add(rb.view(v)))
    want = {"none": z, "relu": z.relu(), "prelu": F.prelu(z, slope)}[act]
    got = OPS.bn_act(y, a, b, r, ra, rb, act, slope if act == "prelu" else None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("act", ACTS)
def test_forward_streaming_stores_change_no_value(act, monkeypatch):
    """Outputs of 16 MiB and more are written with streaming stores (aligned vectors; planes of
    an odd size leave some unaligned): the same bits as with FASTSUPERNET_CPU_STREAM_STORES=0,
    and as the separately rounded torch sequence."""
    y, r = _rand(16, 31, 97, 97, seed=21), _rand(16, 31, 97, 97, seed=24)
    a, b = _rand(31, seed=22), _rand(31, seed=23)
    assert y.numel() * 4 >= 16 << 20
    slope = torch.tensor([0.25])
    args = (y, a, b, r, None, None, act, slope if act == "prelu" else None)
    streamed = OPS.bn_act(*args)
    monkeypatch.setenv("FASTSUPERNET_CPU_STREAM_STORES", "0")
    assert torch.equal(streamed, OPS.bn_act(*args))
    v = (1, -1, 1, 1)
    z = y.mul(a.view(v)).add(b.view(v)).add(r)
    assert torch.equal(streamed, {"none": z, "relu": z.relu(), "prelu": F.prelu(z, slope)}[act])


@pytest.mark.parametrize("act", ["none", "relu", "prelu"])
def test_backward_streaming_stores_change_no_value(act, monkeypatch):
    """Train mode without a residual, grad_y of 16 MiB and more: pass 2 rebuilds gz and streams
    grad_y out: the same bits as with FASTSUPERNET_CPU_STREAM_STORES=0 (gz stored by pass 1),
    planes of an odd size included."""
    y, g = _rand(16, 31, 97, 97, seed=31), _rand(16, 31, 97, 97, seed=32)
    a, b = _rand(31, seed=33), _rand(31, seed=34)
    mean, invstd = _rand(31, seed=35), _rand(31, seed=36).abs() + 0.5
    assert y.numel() * 4 >= 16 << 20
    slope = torch.tensor([0.25])
    args = (g, y, a, b, None, act, slope if act == "prelu" else None, mean, invstd)
    streamed = OPS.bn_act_backward(*args)
    monkeypatch.setenv("FASTSUPERNET_CPU_STREAM_STORES", "0")
    stored = OPS.bn_act_backward(*args)
    for s_, t_ in zip(streamed, stored):
        assert torch.equal(s_, t_)


def test_forward_nan_propagates_through_relu(kernel):
    y = torch.tensor([float("nan"), -1.0, 2.0]).view(1, 3, 1, 1).expand(1, 3, 1, 9).contiguous()  # body + tail
    out = OPS.bn_act(y, torch.ones(3), torch.zeros(3), None, None, None, "relu", None)
    assert torch.isnan(out[0, 0]).all() and (out[0, 1] == 0.0).all() and (out[0, 2] == 2.0).all()


def _fused(y, gamma, beta, residual, act, slope, eps=1e-5):
    from fastsupernet.multipath import _BatchNormAct

    yd = y.detach()
    s = yd.double().sum((0, 2, 3))
    q = (yd.double() ** 2).sum((0, 2, 3))
    return _BatchNormAct.apply(y, s, q, gamma, beta, eps, residual, act, slope)


def _plain(y, gamma, beta, residual, act, slope, eps=1e-5):
    z = F.batch_norm(y, None, None, gamma, beta, training=True, eps=eps)
    if residual is not None:
        z = z + residual
    if act == "relu":
        return F.relu(z)
    return F.prelu(z, slope.reshape(1)) if act == "prelu" else z


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 7, 14, 14), (2, 3, 1, 1)])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_backward_matches_float64_autograd(shape, act, with_residual, kernel):
    n, c, h, w = shape
    y32 = _rand(*shape, seed=21).requires_grad_()
    g32, b32 = _rand(c, seed=22).requires_grad_(), _rand(c, seed=23).requires_grad_()
    r32 = _rand(*shape, seed=24).requires_grad_() if with_residual else None
    s32 = torch.tensor([0.2], requires_grad=True) if act == "prelu" else None
    out = _fused(y32, g32, b32, r32, act, s32)
    grad = _rand(*shape, seed=25)
    leaves32 = [t for t in (y32, g32, b32, r32, s32) if t is not None]
    got = torch.autograd.grad(out, leaves32, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves32]
    it = iter(leaves64)
    y64, g64, b64 = next(it), next(it), next(it)
    r64 = next(it) if with_residual else None
    s64 = next(it) if act == "prelu" else None
    ref_out = _plain(y64, g64, b64, r64, act, s64)
    want = torch.autograd.grad(ref_out, leaves64, grad.double())
    assert torch.allclose(out.double(), ref_out, rtol=1e-5, atol=1e-5 * ref_out.abs().max().item())
    # grad_y is a difference of terms of size |gamma| invstd |dL/dz|, which can cancel (two
    # values per channel): its bound is relative to those terms, the others' to themselves
    invstd = torch.rsqrt(y64.detach().var((0, 2, 3), unbiased=False) + 1e-5)
    term = (g64.detach().abs() * invstd).max().item() * grad.abs().max().item() * max(1.0, 0.2)
    for i, (gg, ww) in enumerate(zip(got, want)):
        assert gg.dtype == torch.float32 and gg.shape == ww.shape and torch.isfinite(gg).all()
        scale = max(ww.abs().max().item(), term if i == 0 else 0.0, 1e-3)
        assert (gg.double() - ww).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act):
    torch.manual_seed(0)
    y = (torch.randn(3, 4, 5, 3, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    gamma = (torch.randn(4, dtype=torch.float64) + 1).requires_grad_()
    beta = torch.randn(4, dtype=torch.float64).requires_grad_()
    r = torch.randn(3, 4, 5, 3, dtype=torch.float64).requires_grad_()
    slope = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    if act == "prelu":
        fn, inputs = (lambda y, g, b, r, s: _fused(y, g, b, r, act, s)), (y, gamma, beta, r, slope)
    else:
        fn, inputs = (lambda y, g, b, r: _fused(y, g, b, r, act, None)), (y, gamma, beta, r)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_does_not_depend_on_thread_count():
    shape = (8, 24, 16, 16)
    y, r, grad = _rand(*shape, seed=31), _rand(*shape, seed=32), _rand(*shape, seed=33)
    a, b = _rand(24, seed=34), _rand(24, seed=35)
    mean, invstd = y.mean((0, 2, 3)), torch.rsqrt(y.var((0, 2, 3), unbiased=False) + 1e-5)
    slope = torch.tensor([0.1])
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(OPS.bn_act_backward(grad, y, a, b, r, "prelu", slope, mean, invstd))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for t0, t1 in zip(results[0], other):
            assert torch.equal(t0, t1)


def test_bad_input_is_named():
    y = _rand(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="activation must be"):
        OPS.bn_act(y, torch.ones(3), torch.zeros(3), None, None, None, "gelu", None)
    with pytest.raises(RuntimeError, match=r"scale must have shape \(3,\)"):
        OPS.bn_act(y, torch.ones(4), torch.zeros(3), None, None, None, "relu", None)
    with pytest.raises(RuntimeError, match="residual must have y's shape"):
        OPS.bn_act(y, torch.ones(3), torch.zeros(3), _rand(2, 3, 4, 5), None, None, "relu", None)
    with pytest.raises(RuntimeError, match="needs a 1-element slope"):
        OPS.bn_act(y, torch.ones(3), torch.zeros(3), None, None, None, "prelu", None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        OPS.bn_act(y.half(), torch.ones(3).half(), torch.zeros(3).half(), None, None, None, "relu", None)


def test_opcheck():
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:  # pragma: no cover
        pytest.skip("torch.library.opcheck not available")
    y, a, b, r = _rand(2, 3, 4, 5), _rand(3), _rand(3), _rand(2, 3, 4, 5)
    slope = torch.tensor([0.2])
    opcheck(OPS.bn_act.default, (y, a, b, r, _rand(3), _rand(3), "prelu", slope),
            test_utils=("test_schema", "test_faketensor"))
    opcheck(OPS.bn_act_backward.default, (_rand(2, 3, 4, 5), y, a, b, r, "prelu", slope, _rand(3), _rand(3).abs()),
            test_utils=("test_schema", "test_faketensor"))
    opcheck(OPS.bn_act_backward.default, (_rand(2, 3, 4, 5), y, a, b, None, "relu", None, None, None),
            test_utils=("test_schema", "test_faketensor"))


# --- without statistics: scale and shift as plain inputs (a folded eval-mode BN) ------------------
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 7, 14, 14), (2, 3, 1, 1)])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_backward_without_statistics_matches_float64_autograd(shape, act, with_residual, kernel):
    """grad_y = scale * dL/dz, and the gradients of scale and shift (float64 sums) in the
    grad_gamma / grad_beta slots; oracle: autograd through ``act(y * scale + shift + r)`` in
    float64. Without a residual the op writes grad_y in its first pass, with one in a second."""
    n, c, h, w = shape
    y, a, b, grad = _rand(*shape, seed=41), _rand(c, seed=42), _rand(c, seed=43), _rand(*shape, seed=44)
    r = _rand(*shape, seed=45) if with_residual else None
    slope = torch.tensor([0.2]) if act == "prelu" else None
    gy, gr, ga, gb, gs = OPS.bn_act_backward(grad, y, a, b, r, act, slope, None, None)
    leaves = [t.double().requires_grad_() for t in (y, a, b) + ((r,) if with_residual else ())
              + ((slope,) if act == "prelu" else ())]
    y64, a64, b64 = leaves[:3]
    z = y64 * a64.view(1, -1, 1, 1) + b64.view(1, -1, 1, 1)
    if with_residual:
        z = z + leaves[3]
    want = torch.autograd.grad(_act(z, act, leaves[-1] if act == "prelu" else None), leaves, grad.double())
    got = [gy, ga, gb] + ([gr] if with_residual else []) + ([gs] if act == "prelu" else [])
    assert gr.numel() == (y.numel() if with_residual else 0)
    for i, (g, wnt) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32 and g.shape == wnt.shape and torch.isfinite(g).all(), i
        assert (g.double() - wnt).abs().max().item() <= 1e-5 * max(wnt.abs().max().item(), 1e-3), i


def test_backward_needs_both_statistics_or_neither():
    y, a, b = _rand(2, 3, 4, 4), _rand(3), _rand(3)
    with pytest.raises(ValueError, match="mean and invstd must be given together"):
        OPS.bn_act_backward(y, y, a, b, None, "relu", None, _rand(3), None)
