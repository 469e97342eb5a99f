"""Ops of fastsupernet: plain-PyTorch references and their fast backends.

``channel_stats``, ``sliced_conv2d`` and ``multi_conv2d`` dispatch to the fastest backend
available for the tensor's device (compiled C++/CUDA extension, Triton, or plain PyTorch); see
:mod:`fastsupernet.ops.dispatch`. The sliced BN and linear references are re-exported from
:mod:`fastsupernet.ops.reference`.
"""
from __future__ import annotations

from . import reference
from .dispatch import BACKENDS, ENV_VAR, available_backends, resolve_backend
from .reference import ACTIVATIONS, apply_activation, sliced_batch_norm, sliced_linear
from .conv import multi_conv2d, sliced_conv2d
from .stats import channel_stats

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "ENV_VAR",
    "apply_activation",
    "available_backends",
    "channel_stats",
    "multi_conv2d",
    "reference",
    "resolve_backend",
    "sliced_batch_norm",
    "sliced_conv2d",
    "sliced_linear",
]
