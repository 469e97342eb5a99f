"""Sliced and multi-candidate convolutions with fused epilogues, on every backend, with autograd.

``multi_conv2d`` runs K candidate convolutions in one call: candidate k reads its input
channels ``[in_offsets[k], in_offsets[k] + in_widths[k])`` of ``x`` and its weight
``weight[row_offsets[k] : row_offsets[k] + out_widths[k], :in_widths[k]]`` in place, and its
outputs land in a packed (N, sum(out_widths), H', W') tensor at the prefix-sum channel
offset. ``sliced_conv2d`` is the one-candidate case. The full semantics are in
``csrc/README.md``; :mod:`fastsupernet.ops.reference` is the plain-PyTorch oracle.

Backends (see :mod:`fastsupernet.ops.dispatch`): ``reference`` (PyTorch autograd), ``cpp`` and
``cuda`` (``torch.ops.fastsupernet.*``, compiled), ``triton`` (``torch.ops.fastsupernet.
multi_conv2d_triton``). The compiled and Triton kernels are forward-only; the backward below is
registered for them. Its conv part either runs batched (the input gradient of all candidates as
one compiled ``multi_conv2d`` on transposed, flipped weights; the weight gradient as one
compiled ``multi_conv2d_weight_grad``) or loops aten's convolution backward over the
candidates' slices; see :func:`backward_mode`. Either way the weight gradient has the packed
weight's full shape and is zero outside the rows/columns the call read (autograd accumulates it
into the shared parameter). Statistics outputs are not differentiable.

Memory formats: every backend accepts NCHW, channels_last and strided (e.g. channel-slice)
inputs; the compiled CPU kernel returns NCHW; the GPU kernels document theirs. Values never
depend on the format.
"""
from __future__ import annotations

import os
from itertools import accumulate
from typing import Any, Sequence

import torch

from . import dispatch, reference

__all__ = ["multi_conv2d", "sliced_conv2d", "conv_backward", "backward_mode", "BACKWARD_ENV_VAR"]

_EMPTY_STATS_SHAPE = (0,)


def _ints(v: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    if isinstance(v, torch.Tensor):
        if v.dtype not in (torch.int32, torch.int64) or v.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor or a list of ints, got {v.dtype} {tuple(v.shape)}")
        return [int(i) for i in v.tolist()]
    out = [int(i) for i in v]
    return out


def _out_hw(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1


# --------------------------------------------------------------------------- autograd
def conv_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    meta: tuple[list[int], list[int], list[int], list[int]],
    stride: int,
    padding: int,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    prelu_slope: torch.Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Any, ...]:
    """Gradients of multi_conv2d w.r.t. (x, weight, scale, shift, residual, prelu_slope).

    ``needs`` flags which of the six are wanted. The conv output ``y`` before the epilogue is
    recomputed only where the epilogue's derivative needs it (a scale gradient or PReLU).
    """
    in_offsets, in_widths, out_widths, row_offsets = meta
    need_x, need_w, need_scale, need_shift, need_res, need_slope = needs
    y = None
    if (scale is not None and need_scale) or activation == "prelu":
        with torch.no_grad():  # the fastest backend on the device (the compiled kernel where built)
            y = multi_conv2d(x, weight, in_offsets, in_widths, out_widths, row_offsets, stride=stride,
                             padding=padding)
    g = grad_out
    grad_slope = None
    if activation == "relu":
        g = g * (out > 0)
    elif activation == "prelu":
        z = y
        if scale is not None:
            z = z * scale.view(1, -1, 1, 1)
        if shift is not None:
            z = z + shift.view(1, -1, 1, 1)
        if residual is not None:
            z = z + residual
        k = len(out_widths)
        counts = torch.tensor(out_widths, device=g.device)
        slope_c = prelu_slope.reshape(k).repeat_interleave(counts).view(1, -1, 1, 1).to(g.dtype)
        neg = z <= 0
        if need_slope:
            per_channel = (g * z * neg).sum(dim=(0, 2, 3))
            grad_slope = torch.zeros(k, dtype=per_channel.dtype, device=g.device)
            grad_slope.index_add_(0, torch.arange(k, device=g.device).repeat_interleave(counts), per_channel)
            grad_slope = grad_slope.reshape(prelu_slope.shape).to(prelu_slope.dtype)
        g = torch.where(neg, g * slope_c, g)
    grad_res = g if (residual is not None and need_res) else None
    grad_shift = g.sum(dim=(0, 2, 3)) if (shift is not None and need_shift) else None
    grad_scale = (g * y).sum(dim=(0, 2, 3)) if (scale is not None and need_scale) else None
    if scale is not None:
        g = g * scale.view(1, -1, 1, 1)
    mode = backward_mode(x.device)
    grad_x = grad_w = None
    if need_x and mode != "loop":
        grad_x = _input_grad_batched(g, x, weight, meta, stride, padding)
    if need_w and mode != "loop" and not _weight_grad_by_aten(g, x, weight, meta, stride, padding):
        grad_w = _weight_grad_batched(g, x, weight, meta, stride, padding)
    if (need_x and grad_x is None) or (need_w and grad_w is None):
        gx, gw = _conv_grads_loop(g, x, weight, meta, stride, padding, need_x and grad_x is None,
                                  need_w and grad_w is None)
        grad_x = gx if grad_x is None else grad_x
        grad_w = gw if grad_w is None else grad_w
    return grad_x, grad_w, grad_scale, grad_shift, grad_res, grad_slope


BACKWARD_ENV_VAR = "FASTSUPERNET_CONV_BACKWARD"
_BACKWARD_MODES = ("auto", "batched", "loop")


def backward_mode(device: torch.device) -> str:
    """How the conv part of the backward runs: ``"batched"`` or ``"loop"``.

    ``batched``: the input gradient of all K candidates is one ``multi_conv2d`` call (compiled
    kernel) on transposed, flipped weights, or for 3x3 stride-2 padding-1 layers one
    ``_cpu_conv2d_s2_input_grad`` call (other strided 3x3 layers loop), the weight gradient one
    ``multi_conv2d_weight_grad`` call, where the device has those kernels (else that part
    loops). ``loop``: aten's convolution backward per candidate. Set by the environment
    variable ``FASTSUPERNET_CONV_BACKWARD`` (read at every call); ``auto`` (default) is
    ``batched`` on CPU, where it was measured faster, and ``loop`` elsewhere; on AVX-512 CPUs
    the weight gradient of a single candidate then comes from aten (oneDNN), measured faster,
    except where the compiled kernel computes it by Winograd F(4x4) (faster still).
    """
    mode = _backward_setting()
    if mode == "auto":
        return "batched" if device.type == "cpu" else "loop"
    return mode


def _backward_setting() -> str:
    """``FASTSUPERNET_CONV_BACKWARD`` as set: ``auto`` (unset or empty), ``batched`` or ``loop``."""
    mode = os.environ.get(BACKWARD_ENV_VAR, "").strip().lower() or "auto"
    if mode not in _BACKWARD_MODES:
        raise ValueError(f"{BACKWARD_ENV_VAR}={mode!r}; expected one of {', '.join(_BACKWARD_MODES)}")
    return mode


def _weight_grad_by_aten(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, meta, stride: int,
                         padding: int) -> bool:
    """Whether ``auto`` mode takes aten's weight gradient for this call: one candidate on a CPU
    whose kernels run AVX-512, where oneDNN's weight-gradient kernel beat the batched direct one
    (sliced Track-1 layers, batch 256: 1.4x-3.1x), unless the compiled kernel computes that
    candidate's gradient by Winograd F(4x4) (3x3 stride-1 layers with 8-, 16- or 32-wide outputs,
    input width >= 8, output width >= 12: 1.1x-3x faster than aten); with several candidates
    the batched kernel saves one aten call per candidate and stays (2.2x-2.7x on 32x32 and 1.3x
    on 16x16 at K = 8)."""
    in_offsets, in_widths, out_widths, row_offsets = meta
    if len(out_widths) != 1 or x.device.type != "cpu" or _backward_setting() != "auto":
        return False
    from ._extension import cpu_conv_isa

    if cpu_conv_isa() != "avx512":
        return False
    if weight.shape[2] == weight.shape[3] and _has_compiled("multi_conv2d_weight_grad", x.device):
        xs = x[:, int(in_offsets[0]) : int(in_offsets[0]) + int(in_widths[0])]
        if torch.ops.fastsupernet._cpu_weight_grad_winograd(g, xs, int(weight.shape[2]), stride, padding,
                                                              int(in_widths[0]), int(out_widths[0])):
            return False
    return True


def _has_compiled(op: str, device: torch.device) -> bool:
    from . import _extension

    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and _extension.has_kernel(op, key)


def _conv_grads_loop(g, x, weight, meta, stride, padding, need_x, need_w):
    """Input/weight gradients by aten's convolution backward, one candidate at a time."""
    in_offsets, in_widths, out_widths, row_offsets = meta
    # one candidate reading all of x: its input gradient is the whole one (no zero-fill and add)
    whole_x = len(out_widths) == 1 and in_offsets[0] == 0 and in_widths[0] == x.shape[1]
    grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format) if need_x and not whole_x else None
    grad_w = torch.zeros_like(weight) if need_w else None
    o = 0
    for io, iw, ow, ro in zip(in_offsets, in_widths, out_widths, row_offsets):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g[:, o : o + ow], x[:, io : io + iw], weight[ro : ro + ow, :iw], None, [stride, stride],
            [padding, padding], [1, 1], False, [0, 0], 1, [need_x, need_w, False],
        )
        if need_x and whole_x:
            grad_x = gx
        elif need_x:
            grad_x[:, io : io + iw] += gx
        if need_w:
            grad_w[ro : ro + ow, :iw] += gw
        o += ow
    return grad_x, grad_w


def _input_grad_batched(g, x, weight, meta, stride, padding):
    """grad x of all candidates in one compiled ``multi_conv2d`` call, or None where unsupported.

    The input gradient of a stride-1 convolution is the convolution of the output gradient
    with the transposed, spatially flipped weight, padded by kernel - 1 - padding; a strided
    1x1 convolution (no padding) reads only pixels (h' s, w' s), so its input gradient is that
    1x1 convolution of g written to those pixels, zero elsewhere. Candidate k's transposed
    weight is ``weight[rows_k, :in_k]`` swapped and flipped (a small copy), stacked by rows; it
    reads its own channel block of the output gradient and writes its in_k channels. 3x3
    stride-2 padding-1 layers take the polyphase kernel (:func:`_input_grad_s2`); other strided
    3x3 layers return None (the caller loops aten's backward over them: measured faster than
    one call on a zero-dilated gradient, which wastes 3/4 of its multiplies at stride 2).
    """
    in_offsets, in_widths, out_widths, row_offsets = meta
    kh, kw = weight.shape[2], weight.shape[3]
    if (stride == 2 and kh == kw == 3 and padding == 1 and x.dtype in (torch.float32, torch.float64)
            and _has_compiled("_cpu_conv2d_s2_input_grad", x.device)):
        return _input_grad_s2(g, x, weight, meta)
    pad_t = kh - 1 - padding
    strided_1x1 = stride > 1 and kh == 1 and kw == 1 and padding == 0
    if (kh != kw or pad_t < 0 or (stride > 1 and not strided_1x1)
            or x.dtype not in (torch.float32, torch.float64) or not _has_compiled("multi_conv2d", x.device)):
        return None
    N, C = x.shape[0], x.shape[1]
    Ho, Wo = g.shape[2], g.shape[3]
    wt = weight.new_zeros((sum(in_widths), max(out_widths), kh, kw))
    r = 0
    for iw, ow, ro in zip(in_widths, out_widths, row_offsets):
        wt[r : r + iw, :ow] = weight[ro : ro + ow, :iw].transpose(0, 1).flip(2, 3)
        r += iw
    g_in = list(accumulate(out_widths, initial=0))[:-1]
    rows = list(accumulate(in_widths, initial=0))[:-1]
    gx, _, _ = torch.ops.fastsupernet.multi_conv2d.default(
        g, wt, g_in, list(out_widths), list(in_widths), rows, 1, pad_t, None, None, None, "none", None, False
    )
    if not (list(in_offsets) == rows and sum(in_widths) == C):  # candidates do not tile x in order
        idx = torch.tensor([c for io, iw in zip(in_offsets, in_widths) for c in range(io, io + iw)], device=x.device)
        gx = gx.new_zeros((N, C, gx.shape[2], gx.shape[3])).index_add_(1, idx, gx)
    if not strided_1x1:
        return gx
    grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format)
    grad_x[:, :, : (Ho - 1) * stride + 1 : stride, : (Wo - 1) * stride + 1 : stride] = gx
    return grad_x


def _input_grad_s2(g, x, weight, meta):
    """grad x of all candidates of a 3x3 stride-2 padding-1 layer in one compiled call
    (``_cpu_conv2d_s2_input_grad``: the four parity phases of grad x as stride-1 correlations of
    g with only the taps each phase uses, on the direct kernel or, for 16x16 float32 inputs on
    AVX-512, by one Winograd F(4x4, 2x2) transform of each g channel)."""
    in_offsets, in_widths, out_widths, row_offsets = meta
    tiles = list(in_offsets) == list(accumulate(in_widths, initial=0))[:-1] and sum(in_widths) == x.shape[1]
    gx = (torch.empty if tiles else torch.zeros)(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.fastsupernet._cpu_conv2d_s2_input_grad(g, weight, list(in_offsets), list(in_widths),
                                                     list(out_widths), list(row_offsets), gx, not tiles)
    return gx


def _weight_grad_batched(g, x, weight, meta, stride, padding):
    """grad weight of all candidates in one ``multi_conv2d_weight_grad`` call, or None where unsupported."""
    if x.dtype not in (torch.float32, torch.float64) or not _has_compiled("multi_conv2d_weight_grad", x.device):
        return None
    in_offsets, in_widths, out_widths, row_offsets = meta
    return torch.ops.fastsupernet.multi_conv2d_weight_grad.default(
        g, x, weight, list(in_offsets), list(in_widths), list(out_widths), list(row_offsets), stride, padding
    )


# positions of (x, weight, scale, shift, residual, prelu_slope) among each op's inputs
_MULTI_SLOTS = (0, 1, 8, 9, 10, 12)
_SLICED_SLOTS = (0, 1, 6, 7, 8, 10)


def _save(ctx, inputs, slots, meta, stride, padding, activation, out) -> None:
    ctx.meta, ctx.slots, ctx.num_inputs = meta, slots, len(inputs)
    ctx.stride, ctx.padding, ctx.activation = stride, padding, activation
    ctx.save_for_backward(*(inputs[i] for i in slots), out)


def _backward(ctx, grad_out, _grad_sum, _grad_sumsq):
    """Gradients for the op's inputs, in its argument order (None for the non-tensor ones)."""
    grads = [None] * ctx.num_inputs
    if grad_out is None:
        return tuple(grads)
    x, weight, scale, shift, residual, prelu_slope, out = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[i] for i in ctx.slots)
    got = conv_backward(grad_out, x, weight, out, ctx.meta, ctx.stride, ctx.padding, scale, shift, residual,
                        ctx.activation, prelu_slope, needs)
    for i, g in zip(ctx.slots, got):
        grads[i] = g
    return tuple(grads)


def _setup_multi(ctx, inputs, output) -> None:
    x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding = inputs[:8]
    meta = (list(in_offsets), list(in_widths), list(out_widths), list(row_offsets))
    _save(ctx, inputs, _MULTI_SLOTS, meta, stride, padding, inputs[11], output[0])


def _setup_sliced(ctx, inputs, output) -> None:
    x, weight, out_rows, row_offset, stride, padding = inputs[:6]
    meta = ([0], [x.shape[1]], [out_rows], [row_offset])
    _save(ctx, inputs, _SLICED_SLOTS, meta, stride, padding, inputs[9], output[0])


def fake_multi(x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding, scale, shift, residual,
               activation, prelu_slope, stats):
    """Output shapes of multi_conv2d without running it (FakeTensor / torch.compile)."""
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "multi_conv2d expects 4-D x and weight")
    ho, wo = _out_hw(x.shape[2], x.shape[3], weight.shape[2], stride, padding)
    c = sum(out_widths)
    out = x.new_empty((x.shape[0], c, ho, wo))
    n = c if stats else 0
    return out, x.new_empty((n,), dtype=torch.float64), x.new_empty((n,), dtype=torch.float64)


def fake_sliced(x, weight, out_rows, row_offset, stride, padding, scale, shift, residual, activation, prelu_slope,
                stats):
    return fake_multi(x, weight, [0], [x.shape[1]], [out_rows], [row_offset], stride, padding, scale, shift,
                      residual, activation, prelu_slope, stats)


def fake_weight_grad(grad_out, x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding):
    """Output of multi_conv2d_weight_grad without running it: weight's shape."""
    return weight.new_empty(weight.shape)


def register_compiled() -> None:
    """Fake kernels and autograd of the compiled ops (called once, when the extension loads)."""
    if hasattr(torch.ops.fastsupernet, "multi_conv2d_weight_grad"):
        torch.library.register_fake("fastsupernet::multi_conv2d_weight_grad")(fake_weight_grad)
    for name, fake, backward, setup in (
        ("multi_conv2d", fake_multi, _backward, _setup_multi),
        ("multi_conv2d_tf32", fake_multi, _backward, _setup_multi),
        ("sliced_conv2d", fake_sliced, _backward, _setup_sliced),
    ):
        if not hasattr(torch.ops.fastsupernet, name):  # an extension built before the op existed
            continue
        torch.library.register_fake(f"fastsupernet::{name}")(fake)
        torch.library.register_autograd(f"fastsupernet::{name}", backward, setup_context=setup)


# --------------------------------------------------------------------------- Triton as an op
@torch.library.custom_op("fastsupernet::multi_conv2d_triton", mutates_args=())
def _multi_conv2d_triton(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_conv import multi_conv2d_triton

    return multi_conv2d_triton(x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding, scale,
                               shift, residual, activation, prelu_slope, stats)


_multi_conv2d_triton.register_fake(fake_multi)
_multi_conv2d_triton.register_autograd(_backward, setup_context=_setup_multi)


# --------------------------------------------------------------------------- epilogue with autograd
class _AffineAct(torch.autograd.Function):
    """``act(y * scale + shift + residual)`` with scale and shift plain per-channel inputs (a
    folded eval-mode BN), one compiled pass each way (``fastsupernet::bn_act``, and
    ``bn_act_backward`` without statistics: the gradients of y, scale, shift and the residual
    in one read of the output gradient and y) instead of the tensor ops and their backwards."""

    @staticmethod
    def forward(ctx, y, scale, shift, residual, activation):
        out = torch.ops.fastsupernet.bn_act(y, scale, shift, residual, None, None, activation, None)
        ctx.save_for_backward(y, scale, shift, residual)
        ctx.activation = activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, scale, shift, residual = ctx.saved_tensors
        gy, gr, gs, gb, _ = torch.ops.fastsupernet.bn_act_backward(
            grad_out.contiguous(), y, scale, shift, residual, ctx.activation, None, None, None)
        return gy, gs, gb, (gr if residual is not None else None), None


def _affine_act(y, scale, shift, residual, activation):
    """The epilogue ``act(y * scale + shift + residual)`` (activation none or relu) under autograd."""
    if (y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64) and _has_compiled("bn_act", y.device)
            and (residual is None or (residual.dtype == y.dtype and residual.shape == y.shape))):
        scale = scale.to(y.dtype)
        shift = torch.zeros_like(scale) if shift is None else shift.to(y.dtype)
        return _AffineAct.apply(y, scale, shift, residual, activation)
    c = (1, -1, 1, 1)
    out = torch.addcmul(shift.view(c), y, scale.view(c)) if shift is not None else y * scale.view(c)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if activation == "relu" else out


# --------------------------------------------------------------------------- dispatch
def _run_reference(x, weight, io, iw, ow, ro, stride, padding, scale, shift, residual, activation, slope, stats):
    r = reference.multi_conv2d(x, weight, io, iw, ow, ro, stride=stride, padding=padding, scale=scale, shift=shift,
                               residual=residual, activation=activation, prelu_slope=slope, stats=stats)
    if stats:
        return r
    empty = x.new_empty(_EMPTY_STATS_SHAPE, dtype=torch.float64)
    return r, empty, empty


def _run_compiled(*args):
    from . import _extension

    _extension.require()
    return torch.ops.fastsupernet.multi_conv2d.default(*args)


def _run_triton(*args):
    return torch.ops.fastsupernet.multi_conv2d_triton.default(*args)


def _run_compiled_sliced(x, weight, io, iw, ow, ro, *rest):
    from . import _extension

    _extension.require()
    stride, padding, scale, shift, residual, activation, slope, stats = rest
    return torch.ops.fastsupernet.sliced_conv2d.default(
        x, weight, ow[0], ro[0], stride, padding, scale, shift, residual, activation, slope, stats
    )


def multi_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_offsets: Sequence[int] | torch.Tensor,
    in_widths: Sequence[int] | torch.Tensor,
    out_widths: Sequence[int] | torch.Tensor,
    row_offsets: Sequence[int] | torch.Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    prelu_slope: torch.Tensor | None = None,
    stats: bool = False,
    backend: str | None = None,
):
    """K candidate convolutions in one call; returns the packed output (and, with ``stats``,
    the float64 per-channel sum and sum of squares of the conv output before the epilogue).

    The integer vectors may be lists or 1-D int32/int64 tensors (host-side metadata). The
    kernels read ``weight`` in place when it is contiguous; any other layout (a parameter of a
    model moved to channels_last, say) is copied to a contiguous tensor once per call, and its
    gradient flows back through the copy.

    When autograd will need ``scale``'s gradient (activation none or relu), the epilogue runs
    after the kernel instead of inside it (``fastsupernet::bn_act`` and its backward on CPU,
    tensor ops elsewhere), so that the conv output it needs is kept rather than recomputed in
    the backward; the output then differs from the fused epilogue's by at most one rounding
    (``y * scale + shift`` as two roundings or one).
    """
    if isinstance(weight, torch.Tensor) and not weight.is_contiguous():
        weight = weight.contiguous()
    meta = [_ints(v, n) for v, n in ((in_offsets, "in_offsets"), (in_widths, "in_widths"),
                                      (out_widths, "out_widths"), (row_offsets, "row_offsets"))]
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    if activation == "prelu" and prelu_slope is None:
        raise ValueError("activation 'prelu' needs prelu_slope (one value per candidate)")
    op = "sliced_conv2d" if len(meta[2]) == 1 and meta[0] == [0] and meta[1] == [x.shape[1]] else "multi_conv2d"
    if (torch.is_grad_enabled() and isinstance(scale, torch.Tensor) and scale.requires_grad
            and activation in ("none", "relu")):
        # scale's gradient needs the conv output before the epilogue: keep it (the epilogue as
        # its own differentiable pass) instead of recomputing the convolution in the backward
        out, s, q = dispatch.run(op, x, weight, *meta, int(stride), int(padding), None, None, None, "none", None,
                                 bool(stats), backend=backend)
        out = _affine_act(out, scale, shift, residual, activation)
        return (out, s, q) if stats else out
    out, s, q = dispatch.run(op, x, weight, *meta, int(stride), int(padding), scale, shift, residual,
                             activation, prelu_slope, bool(stats), backend=backend)
    return (out, s, q) if stats else out


def sliced_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    out_rows: int,
    *,
    row_offset: int = 0,
    stride: int = 1,
    padding: int = 0,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    prelu_slope: torch.Tensor | None = None,
    stats: bool = False,
    backend: str | None = None,
):
    """Convolve ``x`` (N, a, H, W) with ``weight[row_offset : row_offset + out_rows, :a]`` read in
    place, then the fused epilogue: ``* scale + shift`` (folded BN), ``+ residual``, activation."""
    if prelu_slope is not None and prelu_slope.numel() != 1:
        raise ValueError(f"sliced_conv2d: prelu_slope must hold one value, got {prelu_slope.numel()}")
    return multi_conv2d(
        x, weight, [0], [x.shape[1]], [int(out_rows)], [int(row_offset)], stride=stride, padding=padding,
        scale=scale, shift=shift, residual=residual, activation=activation, prelu_slope=prelu_slope, stats=stats,
        backend=backend,
    )
