"""Choice of the backend that runs an op, per call.

Backends:

``"reference"``  plain PyTorch (:mod:`fastsupernet.ops.reference`), any device;
``"cpp"``        the op registered by the compiled extension, CPU tensors;
``"cuda"``       the op registered by the compiled extension, CUDA tensors (CUDA builds only);
``"triton"``     Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
                 (the interpreter is slow; it is never picked by default on CPU).

The backend is, in order of precedence: the ``backend=`` argument of the call, the
environment variable ``FASTSUPERNET_BACKEND`` (read at every call), else the fastest one
available for the tensor's device (``cuda`` > ``triton`` > ``reference`` on a GPU,
``cpp`` > ``reference`` on CPU). ``None``, ``""`` and ``"auto"`` mean "no choice". A name
that is unknown, or not available for the device, raises ``ValueError``.

Nothing here imports triton until a Triton kernel actually runs, and nothing is cached at
module level: availability is worked out from the installed packages and loaded modules.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from . import _extension
from . import reference

__all__ = ["BACKENDS", "ENV_VAR", "available_backends", "resolve_backend", "run"]

BACKENDS = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "FASTSUPERNET_BACKEND"
_AUTO = ("", "auto")

# Preference order per device type: the first available one is the default.
_PREFERENCE = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpp", "reference", "triton"),
}


def _compiled_op(name: str) -> Callable[..., Any]:
    def call(x: torch.Tensor, *args: Any) -> Any:
        _extension.require()
        return getattr(torch.ops.fastsupernet, name).default(x.detach(), *args)

    call.__name__ = f"{name}_compiled"
    return call


def _triton_channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_stats import channel_stats_triton

    return channel_stats_triton(x)


def _conv_impl(name: str) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        from . import conv

        return getattr(conv, name)(*args)

    call.__name__ = name
    return call


# op -> backend -> implementation (a constant table)
_IMPLS: dict[str, dict[str, Callable[..., Any]]] = {
    "channel_stats": {
        "reference": reference.channel_stats,
        "cpp": _compiled_op("channel_stats"),
        "cuda": _compiled_op("channel_stats"),
        "triton": _triton_channel_stats,
    },
    "multi_conv2d": {
        "reference": _conv_impl("_run_reference"),
        "cpp": _conv_impl("_run_compiled"),
        "cuda": _conv_impl("_run_compiled"),
        "triton": _conv_impl("_run_triton"),
    },
    "sliced_conv2d": {
        "reference": _conv_impl("_run_reference"),
        "cpp": _conv_impl("_run_compiled_sliced"),
        "cuda": _conv_impl("_run_compiled_sliced"),
        "triton": _conv_impl("_run_triton"),
    },
}


def _triton_installed() -> bool:
    return "triton" in sys.modules or importlib.util.find_spec("triton") is not None


def _triton_usable(device: torch.device) -> bool:
    if device.type not in ("cuda", "cpu") or not _triton_installed():
        return False
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    # CPU tensors need the interpreter, which triton.jit picks when its module is imported.
    loaded = sys.modules.get("fastsupernet.ops.triton_stats")
    if loaded is not None:
        return loaded._interpreted()
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _usable(backend: str, device: torch.device, op: str) -> bool:
    if backend == "reference":
        return True
    if backend == "cpp":
        return device.type == "cpu" and _extension.has_kernel(op, "CPU")
    if backend == "cuda":
        return device.type == "cuda" and _extension.has_kernel(op, "CUDA")
    if backend == "triton":
        return _triton_usable(device)
    return False


def _impls(op: str) -> dict[str, Callable[..., Any]]:
    try:
        return _IMPLS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(sorted(_IMPLS))}") from None


def available_backends(device: torch.device | str, op: str = "channel_stats") -> tuple[str, ...]:
    """Backends that can run ``op`` on tensors of ``device``, the default (fastest) first."""
    device = torch.device(device)
    impls = _impls(op)
    order = _PREFERENCE.get(device.type, ("reference",))
    return tuple(b for b in order if b in impls and _usable(b, device, op))


def resolve_backend(device: torch.device | str, backend: str | None = None, op: str = "channel_stats") -> str:
    """The backend a call of ``op`` on ``device`` uses: ``backend``, else ``$FASTSUPERNET_BACKEND``,
    else the fastest available. Raises ValueError for an unknown or unavailable backend."""
    device = torch.device(device)
    impls = _impls(op)
    source = "backend="
    if backend is None or backend.strip().lower() in _AUTO:
        backend = os.environ.get(ENV_VAR, "")
        source = f"environment variable {ENV_VAR}"
    name = backend.strip().lower()
    if name in _AUTO:
        # first usable in preference order; checks stop there (this runs on every call)
        for b in _PREFERENCE.get(device.type, ("reference",)):
            if b in impls and _usable(b, device, op):
                return b
        return "reference"
    if name not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} (from {source}) for {op}; known backends: {', '.join(BACKENDS)}; "
            f"available on {device}: {', '.join(available_backends(device, op))}"
        )
    if name not in impls or not _usable(name, device, op):
        why = ""
        if name in ("cpp", "cuda") and _extension.load() is None:
            why = f" (the compiled extension is not built: {_extension.BUILD_HINT})"
        elif name == "triton" and not _triton_installed():
            why = " (triton is not installed)"
        raise ValueError(
            f"backend {name!r} (from {source}) is not available for {op} on {device}{why}; "
            f"available: {', '.join(available_backends(device, op))}"
        )
    return name


def run(op: str, x: torch.Tensor, *args: Any, backend: str | None = None) -> Any:
    """Run ``op`` on ``x`` (which decides the device) with the resolved backend."""
    name = resolve_backend(x.device, backend, op)
    return _IMPLS[op][name](x, *args)
