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

That is not enough when a tensor of hundreds of MiB is allocated while the previous one of
the same size is still alive (``y = op(x)`` in a loop): glibc carves small blocks out of the
freed hole, the next large request no longer fits in it and the heap grows onto fresh pages
again (a 580 MiB ``multi_conv2d`` output: 0.31 s per call reusing pages, 0.70-0.88 s on fresh
ones). The compiled extension therefore adds a block cache (``csrc/cpu/block_cache.cpp``):
freed blocks of at least :data:`BLOCK_CACHE_MIN_BYTES` are kept whole, up to a total of
``FASTSUPERNET_CPU_BLOCK_CACHE_MB`` (default 2048, or an eighth of the machine's memory where
that is less; 0 turns it off), and serve the next request of about their size (at most a
quarter larger).

The command line applies :func:`tune_cpu_allocator` when it starts (set
``FASTSUPERNET_CPU_ALLOCATOR=system`` to leave the allocator alone). Library users call it
themselves: it changes the allocator of the whole process (freed memory is kept for reuse up
to :data:`KEEP_FREE_BYTES` instead of going back to the system, and up to the block cache's
limit in large blocks), which is a choice for the program, not for a library import.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

__all__ = ["tune_cpu_allocator", "cpu_block_cache_stats", "KEEP_FREE_BYTES", "BLOCK_CACHE_MIN_BYTES",
           "BLOCK_CACHE_DEFAULT_MB"]

#: Free memory at the top of the heap kept for reuse before it is returned to the system.
KEEP_FREE_BYTES = 2**31 - 1  # mallopt takes an int

#: Smallest block the block cache keeps.
BLOCK_CACHE_MIN_BYTES = 16 * 2**20
#: Default total of idle large blocks the block cache keeps (FASTSUPERNET_CPU_BLOCK_CACHE_MB),
#: or an eighth of the machine's memory where that is less.
BLOCK_CACHE_DEFAULT_MB = 2048

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _default_block_cache_mb() -> int:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return BLOCK_CACHE_DEFAULT_MB
    return min(BLOCK_CACHE_DEFAULT_MB, ram // 8 // 2**20)


def _block_cache_bytes() -> int:
    raw = os.environ.get("FASTSUPERNET_CPU_BLOCK_CACHE_MB", str(_default_block_cache_mb())).strip()
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(f"FASTSUPERNET_CPU_BLOCK_CACHE_MB must be a whole number of MiB >= 0, got {raw!r}")
    return mb * 2**20


def tune_cpu_allocator() -> bool:
    """Serve large CPU blocks from the heap and keep freed memory for reuse (glibc only), and
    keep large freed blocks whole for the next tensor of their size (the extension's block cache).

    Returns whether the allocator was changed: ``False`` on other C libraries or platforms, or
    when ``FASTSUPERNET_CPU_ALLOCATOR=system``. Safe to call more than once (a later call sets
    the block cache's limit again from the environment).
    """
    choice = os.environ.get("FASTSUPERNET_CPU_ALLOCATOR", "heap").strip().lower()
    if choice == "system":
        return False
    if choice != "heap":
        raise ValueError(f"FASTSUPERNET_CPU_ALLOCATOR must be 'heap' or 'system', got {choice!r}")
    keep = _block_cache_bytes()  # checked before anything changes
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
    ok = mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES) == 1 and ok
    if keep > 0 or cpu_block_cache_stats() is not None:  # never installs it only to turn it off
        from .ops import _extension

        if _extension.load() is not None:
            torch.ops.fastsupernet._cpu_block_cache(keep, BLOCK_CACHE_MIN_BYTES)
    return bool(ok)


def cpu_block_cache_stats() -> dict[str, int] | None:
    """Counters of the block cache (``hits``, ``misses``, ``idle_blocks``, ``idle_bytes``,
    ``keep_bytes``, ``min_bytes``), or ``None`` if it is not installed in this process."""
    if "fastsupernet._C" not in sys.modules:
        return None
    values = list(torch.ops.fastsupernet._cpu_block_cache_stats())
    if not values:
        return None
    return dict(zip(("hits", "misses", "idle_blocks", "idle_bytes", "keep_bytes", "min_bytes"), values))
