"""Build script for the compiled part of fastsupernet (the ``fastsupernet._C`` module).

Project metadata lives in ``pyproject.toml``; this file only declares the extension. The
build needs torch at build time, so install without build isolation, against the torch
already in the environment::

    pip install --no-build-isolation .        # or: pip install --no-build-isolation -e .

A CPU-only torch gives a C++ extension (CPU kernels, OpenMP). A torch with CUDA, with the CUDA
toolkit found (CUDA_HOME or nvcc on PATH), gives a CUDA extension that also compiles
``csrc/cuda/*.cu`` and the CUDA bindings.

Environment switches:
    FASTSUPERNET_NO_CUDA=1      build the CPU extension even when torch has CUDA
    FASTSUPERNET_MARCH=<arch>   add -march=<arch> (e.g. native) to the C++ flags; the default
                                build targets the baseline ISA so that wheels move between machines
    FASTSUPERNET_DEBUG=1        -O0 -g instead of -O3
    TORCH_CUDA_ARCH_LIST        CUDA architectures (torch's own variable), e.g. "9.0"
    MAX_JOBS                    parallel compile jobs (torch's own variable)
"""
from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    # setuptools wants paths relative to setup.py
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def nvcc_flags(debug: bool) -> list[str]:
    """nvcc's own flags for csrc/cuda/*.cu (tests/test_build.py compiles with them). nvcc takes
    -O3 and -g, but not gcc's -g0; device code gets -G in debug builds."""
    return (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + ["-DFASTSUPERNET_WITH_CUDA"]


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = os.environ.get("FASTSUPERNET_DEBUG", "0") == "1"
    # -g0: Python's own CFLAGS carry -g, which roughly doubles the compile time of torch headers
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    march = os.environ.get("FASTSUPERNET_MARCH", "").strip()
    if march:
        cxx.append(f"-march={march}")
    # The shared C++ runtime by file name, before the driver's own libraries: a toolchain that
    # links libstdc++ statically (-static-libstdc++, or only libstdc++.a on its search path) would
    # give the extension a private copy of the runtime, and an error raised in a kernel
    # (TORCH_CHECK) then crashes the process where torch catches it.
    link = ["-fopenmp", "-l:libstdc++.so.6"]

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # headers and CUDA files: rebuild triggers, and part of the sdist whatever torch builds it
    depends = _sources("csrc/**/*.h") + _sources("csrc/**/*.cuh") + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp") + ["CMakeLists.txt"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("FASTSUPERNET_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        nvcc = nvcc_flags(debug)
        ext = CUDAExtension(
            "fastsupernet._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=depends,
            extra_compile_args={"cxx": cxx + ["-DFASTSUPERNET_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "fastsupernet._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=depends,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            py_limited_api=True,
        )
    return [ext]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


if __name__ == "__main__":  # also under pip: setuptools runs this file as __main__
    setup(
        ext_modules=_extensions(),
        cmdclass=_cmdclass(),
        # The module uses only the stable Python ABI (ops are reached through torch.ops), so one
        # wheel serves CPython >= 3.10.
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
