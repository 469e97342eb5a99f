"""CPU memory: keep the memory of large tensors mapped between uses.

Training and ranking on CPU allocate activation tensors of tens to hundreds of MiB at every
step, and free them a moment later. glibc's ``malloc`` serves every block above 32 MiB with a
fresh ``mmap`` and returns it with ``munmap`` when freed, so each step the kernel maps and
zeroes those pages again: on the 2-core development machine that page zeroing was about a
fifth of a ranking run's time (``perf``: ``clear_page_erms``), and it hits the multi-candidate
path (one large packed tensor per layer) harder than a loop of single candidates (several
smaller tensors that stay inside the heap). Serving large blocks from the heap instead, and
not returning freed memory to the system at once, removes that cost: measured 1.2-1.5x on
ranking and on the batched training step (benchmarks/RESULTS.md).

The command line applies :func:`tune_cpu_allocator` when it starts (set
``FASTSUPERNET_CPU_ALLOCATOR=system`` to leave the allocator alone). Library users call it
themselves: it changes the allocator of the whole process (freed memory is kept for reuse up
to :data:`KEEP_FREE_BYTES` instead of going back to the system), which is a choice for the
program, not for a library import.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator", "KEEP_FREE_BYTES"]

#: Free memory at the top of the heap kept for reuse before it is returned to the system.
KEEP_FREE_BYTES = 2**31 - 1  # mallopt takes an int

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_cpu_allocator() -> bool:
    """Serve large CPU blocks from the heap and keep freed memory for reuse (glibc only).

    Returns whether the allocator was changed: ``False`` on other C libraries or platforms, or
    when ``FASTSUPERNET_CPU_ALLOCATOR=system``. Safe to call more than once.
    """
    choice = os.environ.get("FASTSUPERNET_CPU_ALLOCATOR", "heap").strip().lower()
    if choice == "system":
        return False
    if choice != "heap":
        raise ValueError(f"FASTSUPERNET_CPU_ALLOCATOR must be 'heap' or 'system', got {choice!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has mallopt with other meanings
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # no mmap for large blocks (they come from the heap and stay mapped when freed) ...
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    # ... and up to KEEP_FREE_BYTES of free heap top is kept rather than trimmed after each free
    return bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES) == 1 and ok)
