"""Python-side registrations of the compiled ops; imported (once) by ``_extension``.

Importing this module loads ``fastsupernet._C`` (ImportError if it is not built) and adds the
fake (meta) kernels that let ``torch.compile`` and FakeTensor trace the ops without running
them.

The ops are not differentiable: ``channel_stats`` returns statistics of its input (for
BatchNorm recalibration), so no autograd formula is registered. Callers pass a detached tensor
(``fastsupernet.ops.channel_stats`` does); backpropagating through the raw op is an error.
"""
from __future__ import annotations

import torch

import fastsupernet._C  # noqa: F401  (runs the C++ op registrations)


@torch.library.register_fake("fastsupernet::channel_stats")
def _channel_stats_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(x.dim() == 4, lambda: f"fastsupernet::channel_stats expects (N, C, H, W), got {x.dim()} dims")
    torch._check(x.is_floating_point(), lambda: f"fastsupernet::channel_stats expects a float tensor, got {x.dtype}")
    c = x.shape[1]
    return x.new_empty((c,), dtype=torch.float64), x.new_empty((c,), dtype=torch.float64)


# fake kernels and autograd of the conv ops (their compiled kernels are forward-only)
from .conv import register_compiled  # noqa: E402

register_compiled()


@torch.library.register_fake("fastsupernet::bn_act")
def _bn_act_fake(y, scale, shift, residual, res_scale, res_shift, activation, slope):
    torch._check(y.dim() == 4, lambda: f"fastsupernet::bn_act expects (N, C, H, W), got {y.dim()} dims")
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastsupernet::bn_act_backward")
def _bn_act_backward_fake(grad_out, y, scale, shift, residual, activation, slope, mean, invstd):
    gy = torch.empty_like(y, memory_format=torch.contiguous_format)
    gr = torch.empty_like(gy) if residual is not None else y.new_empty((0,))
    gs = slope.new_empty((1,)) if activation == "prelu" else scale.new_empty((0,))
    return gy, gr, scale.new_empty(scale.shape), scale.new_empty(scale.shape), gs
