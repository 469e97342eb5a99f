"""Benchmarks run with the CPU allocator the command line uses (fastsupernet.allocator): large
blocks from the heap. FASTSUPERNET_CPU_ALLOCATOR=system measures glibc's default instead."""
from fastsupernet.allocator import tune_cpu_allocator

ALLOCATOR_TUNED = tune_cpu_allocator()


def pytest_report_header(config):
    return f"fastsupernet CPU allocator: {'heap (tuned)' if ALLOCATOR_TUNED else 'system default'}"
