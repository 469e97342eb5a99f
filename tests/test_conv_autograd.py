"""The Python face of sliced_conv2d / multi_conv2d: its backward, and every backend through it.

The registered backward (used by the forward-only compiled and Triton kernels) is checked
against PyTorch autograd through the reference in float64; then each backend available here
runs forward and backward through ``fastsupernet.ops`` and is compared with float64 references.
Bounds: float64 1e-10 relative; float32 rtol 1e-4 / atol 1e-5 (sums of at most 600 products).
"""
import itertools

import zlib

import pytest
import torch

from fastsupernet import ops
from fastsupernet.ops import reference
from fastsupernet.ops.conv import conv_backward

EPILOGUES = list(itertools.product([False, True], [False, True], [False, True], ["none", "relu", "prelu"]))


def make_case(seed, k=3, n=2, hw=5, kernel=3, stride=1, dtype=torch.float64, shared_input=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)

    in_w = [int(v) for v in torch.randint(1, 7, (k,), generator=g)]
    out_w = [int(v) for v in torch.randint(1, 6, (k,), generator=g)]
    if shared_input:
        in_off = [0] * k
        cin = max(in_w)
    else:
        in_off = [sum(in_w[:i]) for i in range(k)]
        cin = sum(in_w)
    rows = sum(out_w) + 4
    row_off = [int(v) for v in torch.randint(0, 5, (k,), generator=g)]
    row_off = [min(r, rows - o) for r, o in zip(row_off, out_w)]
    x = rnd(n, cin, hw, hw)
    w = rnd(rows, max(in_w) + 2, kernel, kernel) * 0.3
    c = sum(out_w)
    ho = (hw + 2 * (kernel // 2) - kernel) // stride + 1
    extra = dict(scale=rnd(c) * 0.5, shift=rnd(c), residual=rnd(n, c, ho, ho), slope=rnd(k) * 0.2)
    return x, w, (in_off, in_w, out_w, row_off), extra


@pytest.mark.parametrize("use_scale, use_shift, use_res, act", EPILOGUES)
def test_registered_backward_matches_autograd(use_scale, use_shift, use_res, act):
    x, w, meta, e = make_case(zlib.crc32(repr((use_scale, use_shift, use_res, act)).encode()) % 1000)
    scale = e["scale"].requires_grad_() if use_scale else None
    shift = e["shift"].requires_grad_() if use_shift else None
    res = e["residual"].requires_grad_() if use_res else None
    slope = e["slope"].requires_grad_() if act == "prelu" else None
    x.requires_grad_()
    w.requires_grad_()
    kw = dict(stride=1, padding=1, scale=scale, shift=shift, residual=res, activation=act, prelu_slope=slope)
    out = reference.multi_conv2d(x, w, *meta, **kw)
    g = torch.randn_like(out)
    inputs = [t for t in (x, w, scale, shift, res, slope) if t is not None]
    want = torch.autograd.grad(out, inputs, g)
    got = conv_backward(g, x.detach(), w.detach(), out.detach(), meta, 1, 1, scale, shift, res, act, slope,
                        (True,) * 6)
    got = [t for t, src in zip(got, (x, w, scale, shift, res, slope)) if src is not None]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def backends():
    """Backends that run here: the compiled ones if built, Triton under the interpreter."""
    import importlib.util
    import os

    names = [b for b in ops.available_backends("cpu", "multi_conv2d") if b != "triton"]
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("fastsupernet.ops.triton_conv"):
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
def test_backend_forward_backward_fp32(backend, shared_input, kernel, stride):
    x64, w64, meta, e = make_case(kernel * 10 + stride + shared_input, k=4, kernel=kernel, stride=stride,
                                  shared_input=shared_input)
    pad = kernel // 2
    kw64 = dict(stride=stride, padding=pad, scale=e["scale"], shift=e["shift"], residual=e["residual"],
                activation="prelu", prelu_slope=e["slope"])
    x64.requires_grad_()
    w64.requires_grad_()
    want, s_want, q_want = reference.multi_conv2d(x64, w64, *meta, stats=True, **kw64)
    g = torch.randn_like(want)
    gx_want, gw_want = torch.autograd.grad(want, (x64, w64), g)

    x = x64.detach().float().requires_grad_()
    w = w64.detach().float().requires_grad_()
    kw = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw64.items()}
    out, s, q = ops.multi_conv2d(x, w, *meta, stats=True, backend=backend, **kw)
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(q, q_want, rtol=1e-5, atol=1e-4)
    gx, gw = torch.autograd.grad(out, (x, w), g.float())
    torch.testing.assert_close(gx.double(), gx_want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), gw_want, rtol=1e-4, atol=1e-4)
    # the weight gradient is full-shape and zero outside the rows/columns the call read
    read = torch.zeros_like(w, dtype=torch.bool)
    for iw, ow, ro in zip(meta[1], meta[2], meta[3]):
        read[ro : ro + ow, :iw] = True
    assert gw.shape == w.shape and gw[~read].abs().sum() == 0


@pytest.mark.parametrize("backend", backends())
def test_channels_last_weight(backend):
    # a model moved to channels_last has channels_last conv weights: the face copies them to a
    # contiguous tensor and the gradient reaches the parameter in its own layout
    x64, w64, meta, _ = make_case(21, k=3)
    x = x64.float().contiguous(memory_format=torch.channels_last)
    w_dense = w64.float().requires_grad_()
    w_cl = w64.float().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert not w_cl.is_contiguous()
    out_dense = ops.multi_conv2d(x, w_dense, *meta, padding=1, activation="relu", backend=backend)
    out_cl = ops.multi_conv2d(x, w_cl, *meta, padding=1, activation="relu", backend=backend)
    torch.testing.assert_close(out_cl, out_dense, rtol=0, atol=0)
    g = torch.randn_like(out_dense)
    (gw_dense,) = torch.autograd.grad(out_dense, (w_dense,), g)
    (gw_cl,) = torch.autograd.grad(out_cl, (w_cl,), g)
    assert gw_cl.shape == w_cl.shape
    torch.testing.assert_close(gw_cl, gw_dense, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backends())
def test_sliced_conv2d_face(backend):
    x64, w64, _, _ = make_case(7, k=1)
    x = x64[:, :3].float().contiguous()
    w = w64.float()
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    out = ops.sliced_conv2d(x, w, 4, row_offset=1, padding=1, scale=scale, shift=shift, activation="relu",
                            backend=backend)
    want = reference.sliced_conv2d(x.double(), w.double(), 4, row_offset=1, padding=1, scale=scale.double(),
                                   shift=shift.double(), activation="relu")
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    out, s, q = ops.sliced_conv2d(x, w, 4, row_offset=1, padding=1, stats=True, backend=backend)
    assert s.dtype == torch.float64 and s.shape == (4,)
    out = ops.sliced_conv2d(x, w, 4, padding=1, backend=backend)
    assert out.shape == (x.shape[0], 4, x.shape[2], x.shape[3])


def test_face_errors():
    x = torch.randn(1, 4, 3, 3)
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.multi_conv2d(x, w, [0], [4], [2], [0], activation="gelu")
    with pytest.raises(ValueError, match="needs prelu_slope"):
        ops.multi_conv2d(x, w, [0], [4], [2], [0], activation="prelu")
    with pytest.raises(ValueError, match="1-D int32/int64"):
        ops.multi_conv2d(x, w, torch.zeros(1), [4], [2], [0])
    with pytest.raises(ValueError, match="out of range"):
        ops.multi_conv2d(x, w, [0], [4], [5], [4], backend="reference")
    with pytest.raises(ValueError, match="prelu_slope must hold one value"):
        ops.sliced_conv2d(x, w, 2, activation="prelu", prelu_slope=torch.ones(2))
    out = ops.multi_conv2d(x, w, torch.tensor([0, 0], dtype=torch.int32), torch.tensor([4, 2]), [2, 3], [0, 2],
                           padding=1, backend="reference")
    assert out.shape == (1, 5, 3, 3)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("k, shift_on, res_on, act", [(1, True, False, "relu"), (1, False, True, "none"),
                                                      (3, True, True, "relu"), (1, True, True, "relu")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trainable_scale(backend, k, shift_on, res_on, act, dtype):
    """scale (a folded BN's gamma * invstd) needing its gradient: the face runs the kernel without
    epilogue and the epilogue as a differentiable pass (compiled CPU: fastsupernet::bn_act and
    its backward without statistics); every gradient against float64 autograd of the reference.
    One candidate reading all of x takes the weight gradient from aten on AVX-512 CPUs."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel takes float32, float16 or bfloat16")
    x64, w64, meta, e = make_case(100 + k, k=k, n=3, hw=6, shared_input=k == 1)
    if k == 1:
        meta = ([0], [x64.shape[1]], meta[2], meta[3])
    leaves64 = {"x": x64, "w": w64, "scale": e["scale"], "shift": e["shift"] if shift_on else None,
                "residual": e["residual"] if res_on else None}
    leaves64 = {n: t.clone().requires_grad_() for n, t in leaves64.items() if t is not None}
    kw = dict(stride=1, padding=1, activation=act)
    want = reference.multi_conv2d(leaves64["x"], leaves64["w"], *meta, scale=leaves64["scale"],
                                  shift=leaves64.get("shift"), residual=leaves64.get("residual"), **kw)
    g = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, list(leaves64.values()), g)
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in leaves64.items()}
    out = ops.multi_conv2d(leaves["x"], leaves["w"], *meta, scale=leaves["scale"], shift=leaves.get("shift"),
                           residual=leaves.get("residual"), backend=backend, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), g.to(dtype))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    for name, got, wnt in zip(leaves, grads, grads_want):
        torch.testing.assert_close(got.double(), wnt, **tol, msg=lambda m: f"{name}: {m}")
