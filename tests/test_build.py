"""The compiled extension is built and loads; the CUDA kernels compile with nvcc.

(a) Every install builds ``fastsupernet._C``, so a missing extension is a failure here, not a
    skip.
(b) The CUDA sources in ``csrc/cuda`` are compiled by nvcc through the CMake target
    ``fastsupernet_cuda_kernels`` (no torch, no GPU needed). Skipped when nvcc or cmake is
    absent, unless ``FASTSUPERNET_REQUIRE_NVCC`` is set (CI sets it to 1), then it fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsupernet.ops import _extension

ROOT = Path(__file__).resolve().parents[1]


def test_extension_imports_and_registers_ops():
    import fastsupernet._C as C  # noqa: F401  (ImportError here means the build is broken)

    assert hasattr(torch.ops.fastsupernet, "channel_stats")
    assert _extension.load() is not None
    assert _extension.load_error() is None
    assert _extension.has_kernel("channel_stats", "CPU")
    s, q = torch.ops.fastsupernet.channel_stats(torch.ones(2, 3, 2, 2))
    assert s.tolist() == [8.0, 8.0, 8.0] and q.tolist() == [8.0, 8.0, 8.0]


def test_cuda_build_registers_cuda_kernel():
    if torch.version.cuda is None or not torch.cuda.is_available():
        pytest.skip("torch without CUDA, or no GPU: the CPU extension is built")
    assert _extension.has_kernel("channel_stats", "CUDA")


def _find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _require(tool: str, path: str | None) -> str:
    """``path``, or skip (fail when ``FASTSUPERNET_REQUIRE_NVCC`` is set) because ``tool`` is missing."""
    if path is None:
        if os.environ.get("FASTSUPERNET_REQUIRE_NVCC"):
            pytest.fail(f"{tool} not found, and FASTSUPERNET_REQUIRE_NVCC is set")
        pytest.skip(f"{tool} not found (set FASTSUPERNET_REQUIRE_NVCC=1 to make this a failure)")
    return path


def test_cuda_kernels_compile_with_nvcc(tmp_path):
    nvcc = _require("nvcc", _find_nvcc())
    cmake = _require("cmake", shutil.which("cmake"))

    build = tmp_path / "cuda-check"
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(build),
        "-DFASTSUPERNET_CUDA_KERNELS_ONLY=ON",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
    ]
    compile_ = [cmake, "--build", str(build), "--target", "fastsupernet_cuda_kernels", "-j", str(os.cpu_count() or 2)]
    for cmd in (configure, compile_):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    libs = list(build.glob("*fastsupernet_cuda_kernels*"))
    assert libs, f"no fastsupernet_cuda_kernels library in {build}"
    sources = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources in csrc/cuda"


def _setup_module():
    """setup.py as a module (it calls setup() only when run as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastsupernet_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_nvcc_flags_compile_every_cuda_source(tmp_path):
    """The flags setup.py gives nvcc for the torch build (not the CMake check above) compile every
    .cu file: a gcc-only flag among them once broke the CUDA build on a GPU machine. Also for
    sm_75 (the staging without cp.async, and the TF32 kernel's stub: it refuses to run below
    sm_80) and sm_80 (A100), which users' TORCH_CUDA_ARCH_LIST may include."""
    nvcc = _require("nvcc", _find_nvcc())
    setup = _setup_module()
    assert "-g0" not in setup.nvcc_flags(True)
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources
    for src in sources:
        cmd = [nvcc, "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")), f"-I{ROOT / 'csrc'}", "-std=c++17",
               "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
               "-gencode=arch=compute_75,code=sm_75", *setup.nvcc_flags(False)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"


def test_extension_uses_the_shared_cpp_runtime():
    """The extension links libstdc++ dynamically: with a private static copy (some toolchains
    link it statically by default) an error raised in a kernel crashed the process."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    import fastsupernet._C as C

    needed = subprocess.run([readelf, "-d", C.__file__], capture_output=True, text=True, timeout=60).stdout
    assert "libstdc++.so.6" in needed, needed
    with pytest.raises((RuntimeError, ValueError), match="weight rows"):  # an error in the extension arrives
        torch.ops.fastsupernet.multi_conv2d(torch.ones(1, 2, 3, 3), torch.ones(2, 2, 3, 3), [0], [2], [2], [5], 1, 1,
                                            None, None, None, "none", None, False)


def test_triton_kernel_compiles_for_hopper():
    """The Triton kernel compiles (to a sm_90 cubin, every autotune config) without a GPU."""
    pytest.importorskip("triton")
    code = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from fastsupernet.ops import triton_stats as ts\n"
        "assert isinstance(ts._channel_stats_kernel, triton.runtime.jit.JITFunction)\n"
        "ints = ['C', 'HW', 'W', 'M', 'chunk', 'stride_n', 'stride_c', 'stride_h', 'stride_w']\n"
        "for dtype in ('*fp32', '*bf16'):\n"
        "    for cfg in ts._CONFIGS:\n"
        "        sig = {'x_ptr': dtype, 'psum_ptr': '*fp64', 'psq_ptr': '*fp64', **{k: 'i32' for k in ints},\n"
        "               'BLOCK': 'constexpr', 'ITERS': 'constexpr'}\n"
        "        src = ASTSource(fn=ts._channel_stats_kernel, signature=sig, constexprs={**cfg.kwargs, 'ITERS': 0})\n"
        "        out = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': cfg.num_warps})\n"
        "        assert out.asm['cubin']\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
