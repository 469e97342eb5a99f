"""Loading of the compiled extension ``fastsupernet._C``.

Importing ``fastsupernet._C`` runs the C++ static registrations, after which the compiled ops
live under ``torch.ops.fastsupernet``. Nothing here runs at import of ``fastsupernet``: the
extension is loaded on first use, and a missing or broken build is reported, not raised,
unless the caller asks for the extension with :func:`require`.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

__all__ = ["load", "require", "load_error", "has_kernel", "BUILD_HINT"]

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
    "from the repository root"
)


def _import() -> ModuleType:
    loaded = sys.modules.get("fastsupernet._C")
    if loaded is not None and "fastsupernet.ops._registration" in sys.modules:
        return loaded  # fast path: this runs on every dispatched call
    # The sibling module imports fastsupernet._C and then registers the Python-side parts of
    # the ops (fake kernels). Python's module cache makes both happen once per process.
    importlib.import_module("fastsupernet.ops._registration")
    return importlib.import_module("fastsupernet._C")


def load() -> ModuleType | None:
    """The loaded ``fastsupernet._C`` module, or ``None`` if it is not built (or fails to load)."""
    try:
        return _import()
    except ImportError:
        return None


def load_error() -> str | None:
    """Why the extension does not load, or ``None`` if it does."""
    try:
        _import()
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def require() -> ModuleType:
    """The loaded ``fastsupernet._C`` module; raises ImportError with build instructions if absent."""
    try:
        return _import()
    except ImportError as exc:
        raise ImportError(f"fastsupernet._C is not available ({exc}); {BUILD_HINT}") from exc


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded extension registered a kernel of ``fastsupernet::<op>`` for a dispatch key.

    ``dispatch_key`` is e.g. ``"CPU"`` or ``"CUDA"``; a CPU-only build has no CUDA kernels.
    """
    if load() is None:
        return False
    name = f"fastsupernet::{op}"
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key))
    except (AttributeError, RuntimeError):  # private API moved, or op unknown
        return False


def cpu_conv_isa() -> str:
    """The instruction set the float32 CPU convolution kernels run with: ``"avx512"``,
    ``"avx2"``, ``"generic"`` (portable), or ``"none"`` without the compiled extension.

    Read at every call: ``FASTSUPERNET_CPU_KERNEL=avx2`` or ``=generic`` forces a lower one.
    """
    if load() is None or not hasattr(torch.ops.fastsupernet, "_cpu_conv_isa"):
        return "none"
    return str(torch.ops.fastsupernet._cpu_conv_isa())
