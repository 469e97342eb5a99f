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


# The block cache: a freed large block serves the next request of about its size, whole.
CACHE_PROBE = r"""
import json, os, sys, torch
import fastsupernet._C
from fastsupernet.allocator import cpu_block_cache_stats, tune_cpu_allocator
MiB = 2**20
out = {"before": cpu_block_cache_stats(), "applied": tune_cpu_allocator()}
a = torch.empty(40 * MiB, dtype=torch.uint8)
a_ptr = a.data_ptr()
a.fill_(7)
del a
b = torch.empty(38 * MiB, dtype=torch.uint8)           # fits the 40 MiB block (<= 1/4 spare): reused
out["reused"] = b.data_ptr() == a_ptr
c = torch.empty(60 * MiB, dtype=torch.uint8)           # nothing idle fits: a new block
d = torch.empty(MiB, dtype=torch.uint8)                # small: not cached
del b
e = torch.empty(20 * MiB, dtype=torch.uint8)           # the idle 40 MiB block would waste half: not used
out["small_request_took_big_block"] = e.data_ptr() == a_ptr
out["stats"] = cpu_block_cache_stats()
# oneDNN takes its buffers through the allocator's raw interface (pointer = context)
x, w = torch.randn(64, 16, 64, 64), torch.randn(16, 16, 3, 3)
want = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
out["onednn_ok"] = all(torch.allclose(torch.nn.functional.conv2d(x, w, padding=1).double(), want, atol=1e-3)
                       for _ in range(3))
# keep 0: idle blocks are returned and nothing is cached from then on
torch.ops.fastsupernet._cpu_block_cache(0, 16 * MiB)
out["off"] = cpu_block_cache_stats()
del c, e
out["off_after_free"] = cpu_block_cache_stats()
print(json.dumps(out))
"""


def _cache_probe(**env: str) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTSUPERNET_CPU_")} | env
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc only")
def test_block_cache_reuses_a_freed_large_block_of_about_the_same_size():
    pytest.importorskip("fastsupernet._C")
    out = _cache_probe(FASTSUPERNET_CPU_BLOCK_CACHE_MB="256")
    assert out["before"] is None and out["applied"] is True
    assert out["reused"] is True and out["onednn_ok"] is True
    assert out["small_request_took_big_block"] is False
    s = out["stats"]
    # a (miss), b (hit), c (miss), e (miss); d is below the cache's 16 MiB minimum
    assert (s["hits"], s["misses"]) == (1, 3)  # counted before the convolutions
    assert (s["idle_blocks"], s["idle_bytes"]) == (1, 40 * 2**20)  # b's block, rounded to 2 MiB
    assert (s["keep_bytes"], s["min_bytes"]) == (256 * 2**20, 16 * 2**20)
    assert (out["off"]["idle_blocks"], out["off"]["idle_bytes"]) == (0, 0)
    assert (out["off_after_free"]["idle_blocks"], out["off_after_free"]["idle_bytes"]) == (0, 0)


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc only")
def test_block_cache_limit_and_switches():
    pytest.importorskip("fastsupernet._C")
    # a limit below one block keeps nothing idle
    tiny = _cache_probe(FASTSUPERNET_CPU_BLOCK_CACHE_MB="16")
    assert tiny["stats"]["hits"] == 0 and tiny["stats"]["idle_bytes"] == 0
    # 0: never installed; system: the allocator is left alone entirely
    assert _cache_probe(FASTSUPERNET_CPU_BLOCK_CACHE_MB="0")["stats"] is None
    system = _cache_probe(FASTSUPERNET_CPU_ALLOCATOR="system")
    assert system["applied"] is False and system["stats"] is None


def test_bad_block_cache_setting_is_an_error_naming_the_variable(monkeypatch):
    from fastsupernet.allocator import tune_cpu_allocator

    for bad in ("-1", "2G", ""):
        monkeypatch.setenv("FASTSUPERNET_CPU_BLOCK_CACHE_MB", bad)
        with pytest.raises(ValueError, match=f"FASTSUPERNET_CPU_BLOCK_CACHE_MB.*{bad!r}"):
            tune_cpu_allocator()


def test_block_cache_op_rejects_bad_limits():
    pytest.importorskip("fastsupernet._C")
    import torch

    with pytest.raises(RuntimeError, match="keep_bytes must be >= 0, got -5"):
        torch.ops.fastsupernet._cpu_block_cache(-5, 1)
    with pytest.raises(RuntimeError, match="min_bytes must be >= 1, got 0"):
        torch.ops.fastsupernet._cpu_block_cache(0, 0)


def test_block_cache_default_limit_is_at_most_an_eighth_of_the_memory(monkeypatch):
    from fastsupernet import allocator

    monkeypatch.delenv("FASTSUPERNET_CPU_BLOCK_CACHE_MB", raising=False)
    sizes = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2 * 2**30 // 4096}  # a 2 GiB machine
    monkeypatch.setattr(allocator.os, "sysconf", lambda name: sizes[name])
    assert allocator._block_cache_bytes() == 256 * 2**20
    sizes["SC_PHYS_PAGES"] = 64 * 2**30 // 4096
    assert allocator._block_cache_bytes() == allocator.BLOCK_CACHE_DEFAULT_MB * 2**20


THREADS_PROBE = r"""
import json, threading, torch
import fastsupernet._C
from fastsupernet.allocator import cpu_block_cache_stats, tune_cpu_allocator
tune_cpu_allocator()
torch.set_num_threads(1)
errors = []
def work(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2048, 1024, generator=g)  # 8 MiB
    b = torch.randn(1024, 2560, generator=g)  # 10 MiB; the products are 20 MiB: cached blocks
    want = (a.double() @ b.double()).float()
    for _ in range(12):
        c = a @ b  # allocated inside the op, with the GIL released
        if not torch.allclose(c, want, rtol=1e-4, atol=1e-3):
            errors.append(seed)
        del c
threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"errors": errors, "stats": cpu_block_cache_stats()}))
"""


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc only")
def test_block_cache_under_threads():
    """Four threads allocating and freeing cached blocks inside ops (GIL released): right
    results, and the counters add up."""
    pytest.importorskip("fastsupernet._C")
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTSUPERNET_CPU_")}
    env["FASTSUPERNET_CPU_BLOCK_CACHE_MB"] = "64"
    out = subprocess.run([sys.executable, "-c", THREADS_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    s = res["stats"]
    assert res["errors"] == []
    assert s["hits"] + s["misses"] >= 4 * 12 and s["hits"] > 0
    assert s["idle_bytes"] <= 64 * 2**20
