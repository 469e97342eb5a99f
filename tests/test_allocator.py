"""The CPU allocator tuning the command line applies (fastsupernet.allocator)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

LINUX_GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None

# Counts glibc's mmap()ed blocks (mallinfo2().hblks) while a 256 MiB tensor is alive.
PROBE = r"""
import ctypes, sys, torch
from fastsupernet.allocator import tune_cpu_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = tune_cpu_allocator() if sys.argv[1] == "tune" else False
before = libc.mallinfo2().hblks
t = torch.empty(64 * 2**20)  # 256 MiB
print(applied, libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc only")
def test_large_blocks_come_from_the_heap_once_tuned():
    def probe(mode: str, **env: str) -> str:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        return out.stdout.split()

    assert probe("default") == ["False", "1"]  # glibc default: a fresh mmap for the tensor
    assert probe("tune") == ["True", "0"]  # tuned: served from the heap (kept mapped when freed)
    assert probe("tune", FASTSUPERNET_CPU_ALLOCATOR="system") == ["False", "1"]


def test_bad_setting_is_an_error_naming_the_variable(monkeypatch):
    from fastsupernet.allocator import tune_cpu_allocator

    monkeypatch.setenv("FASTSUPERNET_CPU_ALLOCATOR", "huge")
    with pytest.raises(ValueError, match="FASTSUPERNET_CPU_ALLOCATOR.*'huge'"):
        tune_cpu_allocator()
    out = subprocess.run([sys.executable, "-m", "fastsupernet", "space"], capture_output=True, text=True,
                         env={**os.environ, "FASTSUPERNET_CPU_ALLOCATOR": "huge"})
    assert out.returncode == 2 and "FASTSUPERNET_CPU_ALLOCATOR" in out.stderr
