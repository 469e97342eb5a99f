"""Benchmarks run with the CPU allocator the command line uses (fastsupernet.allocator): large
blocks from the heap, and freed large blocks kept whole for reuse (the block cache).
FASTSUPERNET_CPU_ALLOCATOR=system measures glibc's default instead; FASTSUPERNET_CPU_BLOCK_CACHE_MB=0
the heap without the block cache."""
from fastsupernet.allocator import cpu_block_cache_stats, tune_cpu_allocator
from fastsupernet.ops._extension import cpu_conv_isa

ALLOCATOR_TUNED = tune_cpu_allocator()


def pytest_report_header(config):
    if not ALLOCATOR_TUNED:
        return f"fastsupernet CPU allocator: system default; CPU kernels: {cpu_conv_isa()}"
    cache = cpu_block_cache_stats()
    kept = f"block cache up to {cache['keep_bytes'] >> 20} MiB" if cache and cache["keep_bytes"] else "no block cache"
    return f"fastsupernet CPU allocator: heap (tuned), {kept}; CPU kernels: {cpu_conv_isa()}"
