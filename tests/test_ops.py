"""channel_stats on every backend available here, and the backend dispatcher.

Oracle: for each channel, ``math.fsum`` (exactly rounded) of the values widened to float64
and of their float64 squares. A float32 value squared is exact in float64 (24 + 24 <= 53
mantissa bits), so for float32 inputs the oracle is the exactly rounded true result.

Error bound, per channel with M values: every backend widens each value to float64 and adds
in float64, in some order. Any order of M - 1 float64 additions is within
``(M - 1) * u * sum|terms|`` of the exact sum (u = 2**-53); float64 inputs add one more
rounding per square. We allow ``(M + 2) * u * sum|terms|`` for float32, float64 and
float16/bfloat16 inputs alike: with M <= 1e5 that is ~1e-11 relative to sum|x|, while a
float32 accumulator would be off by ~1e-7 relative, and fail.

Inputs are ``randn * 3 + 5`` (nonzero mean, so that sums of squares are dominated by the mean
and naive variance-by-difference would cancel).
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastsupernet.ops as ops
from fastsupernet.ops import dispatch

U64 = 2.0**-53

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backends(device: str) -> list[str]:
    return list(ops.available_backends(device))


def _interpreted_triton(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


# Small shapes, run on every backend (the Triton interpreter is slow: keep these tiny).
SMALL_SHAPES = [
    (1, 1, 1, 1),
    (3, 5, 7, 7),
    (1, 13, 7, 7),
    (3, 13, 1, 1),
    (3, 1, 7, 7),
    (1, 5, 1, 7),
]
# Shapes that cross the CPU kernel's chunk (32768 values per channel) and channel-tile (1024)
# boundaries, and the GPU kernels' multi-chunk paths.
LARGE_SHAPES = [
    (700, 2, 7, 7),  # planes: chunks end in the middle of a plane
    (4, 3, 128, 128),  # planes: several chunks per channel, whole-plane loop on GPU
    (2, 1500, 3, 5),  # rows: two channel tiles
    (256, 64, 8, 8),  # recalibration-like
]
LAYOUTS = ["nchw", "channels_last", "strided"]
DTYPES = [torch.float32, torch.float64]


def _make_input(shape, layout: str, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "strided":
        # A non-contiguous view: every other channel and a cropped, transposed spatial window
        # of a bigger tensor, with a storage offset.
        big = torch.randn(n + 1, 2 * c + 1, w + 2, h + 3, generator=g, dtype=torch.float64) * 3 + 5
        x = big.to(dtype).to(device)[1:, 1::2, 1 : w + 1, 2 : h + 2].transpose(2, 3)
        assert x.shape == shape
        if c > 1 or h * w > 1:
            assert not x.is_contiguous()
        return x
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _oracle(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exactly rounded per-channel sum and sum of squares, and the sums of their magnitudes."""
    a = x.detach().to("cpu", torch.float64).permute(1, 0, 2, 3).reshape(x.shape[1], -1).numpy()
    sq = a * a
    s = np.array([math.fsum(row) for row in a])
    q = np.array([math.fsum(row) for row in sq])
    return s, q, np.abs(a).sum(axis=1), sq.sum(axis=1)


def _check(x: torch.Tensor, got: tuple[torch.Tensor, torch.Tensor]) -> None:
    s, q = got
    c = x.shape[1]
    m = x.numel() // max(c, 1)
    for t in (s, q):
        assert t.dtype == torch.float64
        assert t.shape == (c,)
        assert t.device == x.device
    want_s, want_q, abs_s, abs_q = _oracle(x)
    tol = (m + 2) * U64
    err_s = np.abs(s.cpu().numpy() - want_s)
    err_q = np.abs(q.cpu().numpy() - want_q)
    assert np.all(err_s <= tol * abs_s), f"sum error {err_s.max()} > bound {(tol * abs_s).min()}"
    assert np.all(err_q <= tol * abs_q), f"sumsq error {err_q.max()} > bound {(tol * abs_q).min()}"


def _poison(device: str, c: int) -> None:
    """Leave freed NaN blocks of the outputs' size in the allocator, so that an uninitialised
    output or workspace read shows up as NaN (reliable with the CUDA caching allocator,
    best effort on CPU)."""
    for numel in (c, 2 * c, 1024 * c):
        torch.full((numel,), float("nan"), dtype=torch.float64, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channel_stats_small(shape, layout, dtype, device):
    x = _make_input(shape, layout, dtype, device, seed=31 * sum(shape) + LAYOUTS.index(layout))
    backends = _backends(device)
    assert "reference" in backends
    for backend in backends:
        _poison(device, shape[1])
        _check(x, ops.channel_stats(x, backend=backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channel_stats_large(shape, layout, dtype, device):
    x = _make_input(shape, layout, dtype, device, seed=7)
    for backend in _backends(device):
        if _interpreted_triton(backend, device):
            continue  # the interpreter is too slow for these
        _poison(device, shape[1])
        _check(x, ops.channel_stats(x, backend=backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_channel_stats_half_precision(dtype, device):
    for shape in [(3, 5, 7, 7), (2, 40, 3, 3)]:
        x = _make_input(shape, "channels_last", dtype, device, seed=3)
        for backend in _backends(device):
            _check(x, ops.channel_stats(x, backend=backend))


@pytest.mark.parametrize("device", DEVICES)
def test_channel_stats_empty(device):
    for shape in [(0, 3, 4, 4), (2, 3, 0, 4), (2, 0, 4, 4)]:
        x = torch.empty(shape, device=device)
        for backend in _backends(device):
            s, q = ops.channel_stats(x, backend=backend)
            assert s.shape == q.shape == (shape[1],)
            assert torch.all(s == 0) and torch.all(q == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_channel_stats_not_differentiable(device):
    x = _make_input((2, 3, 4, 4), "nchw", torch.float32, device, seed=1).requires_grad_()
    for backend in _backends(device):
        s, q = ops.channel_stats(x, backend=backend)
        assert not s.requires_grad and not q.requires_grad


def test_channel_stats_rejects_bad_input():
    for bad in (torch.randn(3, 4), torch.randn(2, 3, 4, 4, 1), torch.ones(2, 3, 4, 4, dtype=torch.int32)):
        for backend in _backends("cpu"):
            with pytest.raises(ValueError, match="channel_stats"):
                ops.channel_stats(bad, backend=backend)
    with pytest.raises(RuntimeError, match="channel_stats"):
        torch.ops.fastsupernet.channel_stats(torch.randn(3, 4))


def test_cpp_result_independent_of_thread_count():
    x = _make_input((64, 3, 33, 33), "nchw", torch.float32, "cpu", seed=5)
    y = x.contiguous(memory_format=torch.channels_last)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([t.clone() for t in (*ops.channel_stats(x, backend="cpp"), *ops.channel_stats(y, backend="cpp"))])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(3, 5, 7, 7) * 3 + 5,
        lambda: (torch.randn(2, 13, 4, 4, dtype=torch.float64) * 3 + 5).contiguous(memory_format=torch.channels_last),
        lambda: (torch.randn(4, 10, 6, 6) * 3 + 5)[:, 1::3, :, 2:],
    ],
    ids=["nchw", "channels_last-fp64", "strided"],
)
def test_opcheck_cpu(make):
    torch.library.opcheck(torch.ops.fastsupernet.channel_stats.default, (make(),))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 7, 3, 3)
        s, q = torch.ops.fastsupernet.channel_stats(x)
        assert s.shape == q.shape == (7,) and s.dtype == q.dtype == torch.float64


# ----- dispatcher --------------------------------------------------------------------------------


def test_default_backend_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    available = ops.available_backends("cpu")
    # the extension is built by every install, so the compiled op is the CPU default
    assert available[0] == "cpp"
    assert "cuda" not in available
    assert ops.resolve_backend("cpu") == "cpp"
    assert ops.resolve_backend(torch.device("cpu"), "auto") == "cpp"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_default_backend_cuda(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    available = ops.available_backends("cuda")
    assert available[-1] == "reference"
    assert "cpp" not in available
    if dispatch._extension.has_kernel("channel_stats", "CUDA"):
        assert ops.resolve_backend("cuda") == "cuda"


def _spy(monkeypatch, backend: str) -> list[str]:
    calls: list[str] = []
    real = dispatch._IMPLS["channel_stats"][backend]

    def spy(x, *args):
        calls.append(backend)
        return real(x, *args)

    monkeypatch.setitem(dispatch._IMPLS["channel_stats"], backend, spy)
    return calls


def test_env_var_override(monkeypatch):
    calls = _spy(monkeypatch, "reference")
    x = torch.randn(2, 3, 4, 4)
    ops.channel_stats(x)
    assert calls == []
    monkeypatch.setenv("FASTSUPERNET_BACKEND", "reference")
    assert ops.resolve_backend("cpu") == "reference"
    ops.channel_stats(x)
    assert calls == ["reference"]
    monkeypatch.setenv("FASTSUPERNET_BACKEND", "auto")
    assert ops.resolve_backend("cpu") == "cpp"


def test_per_call_override_beats_env(monkeypatch):
    calls = _spy(monkeypatch, "cpp")
    monkeypatch.setenv("FASTSUPERNET_BACKEND", "reference")
    ops.channel_stats(torch.randn(2, 3, 4, 4), backend="cpp")
    assert calls == ["cpp"]


def test_unknown_backend_error(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError) as info:
        ops.channel_stats(x, backend="cudnn")
    msg = str(info.value)
    assert "'cudnn'" in msg and "cpp" in msg and "reference" in msg
    monkeypatch.setenv("FASTSUPERNET_BACKEND", "fortran")
    with pytest.raises(ValueError, match="'fortran'.*FASTSUPERNET_BACKEND.*reference"):
        ops.channel_stats(x)


def test_unavailable_backend_error(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"'cuda'.*not available.*available: cpp, reference"):
        ops.channel_stats(x, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if "fastsupernet.ops.triton_stats" not in sys.modules:
        with pytest.raises(ValueError, match="'triton'.*not available"):
            ops.channel_stats(x, backend="triton")


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        ops.available_backends("cpu", op="nope")


def test_import_does_not_import_triton():
    code = (
        "import sys, torch, fastsupernet, fastsupernet.ops as o\n"
        "o.available_backends('cpu'); o.channel_stats(torch.randn(2, 3, 4, 4))\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_reference_reexports():
    from fastsupernet.ops import reference

    from fastsupernet.ops import conv

    assert ops.sliced_conv2d is conv.sliced_conv2d and ops.multi_conv2d is conv.multi_conv2d  # dispatched
    assert ops.sliced_batch_norm is reference.sliced_batch_norm
    assert ops.sliced_linear is reference.sliced_linear
