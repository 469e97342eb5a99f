"""sliced_conv2d / multi_conv2d on CPU: the compiled kernels vs the plain-PyTorch "peer sequence".

    pytest benchmarks/bench_conv_cpu.py --benchmark-only --benchmark-json=conv.json   # ~3 min
    python benchmarks/bench_conv_cpu.py conv.json        # markdown table: medians, ratios, floors
    python benchmarks/bench_conv_cpu.py --interleaved "16x16 32->64 3x3 s2" [--pairs 60] [--backward]

The last form times one layer of ``test_sliced`` (forward, folded BN + ReLU; with
``--backward`` of ``test_sliced_forward_backward``) as alternating peer / ours calls in one
process (each after a warm-up call of its own): on a machine whose speed drifts within
minutes, the ratio of such pairs is the one to trust.

The peer sequence of one candidate is what a supernet forward does without the kernels::

    w = weight[r:r+o, :a].contiguous()
    y = F.conv2d(x_slice, w, stride=s, padding=p)
    y = F.batch_norm(y, running_mean, running_var, gamma, beta, training=False)
    y = F.relu(y)

and ``multi_conv2d`` is compared with a Python loop of it over the K candidates. The kernels
get the same BatchNorm folded into (scale, shift), computed inside the timed call, and fuse
it with the ReLU into the convolution's output pass.

Shapes: Track-1 layers at batch 256 (32x32 with widths <= 16, 16x16 with <= 32, 8x8 with
<= 64), 3x3 stride 1 and 2, 1x1 shortcuts. Multi-candidate cases draw each candidate's input
and output widths from {4, 8, ..., max} (seeded), all reading channels [0, a) of one input
("shared", the children of one prefix-tree node) or each its own slice of a packed input
("packed").

Floors, in ``extra_info``: ``flops = 2 N H' W' sum_k out_k in_k kh kw`` over the fp32 GEMM rate
(``torch.mm`` 1024^3, measured in this run), and ``bytes`` (input read once + output written
once) over the copy bandwidth of a 256 MiB buffer (measured in this run); ``floor_ms`` is the
larger of the two. The GEMM rate is MKL's on this machine, not the FMA peak of the cores, so a
kernel may come closer to it than 1.0x. ``floor_alg_ms`` is the same floor for the
multiplications the kernel's algorithm does: candidates a Winograd path takes (3x3 stride 1,
input width at least the kernel's threshold) need 16/36 (F(2x2, 3x3)) or 36/144 (F(4x4, 3x3))
of the direct FLOPs.
"""
from __future__ import annotations

import functools
import json
import random
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

try:
    import fastsupernet._C  # noqa: F401  (registers the ops)

    HAVE_EXT = hasattr(torch.ops.fastsupernet, "multi_conv2d")
except ImportError:  # pragma: no cover
    HAVE_EXT = False

EPS = 1e-5
BATCH = 256


def _median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def machine_rates() -> tuple[float, float]:
    """(fp32 GEMM FLOP/s of torch.mm 1024^3, copy bandwidth in bytes/s of a 256 MiB buffer)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gemm = 2 * 1024**3 / _median_seconds(lambda: torch.mm(a, b), 15)
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), 7)
    return gemm, bandwidth


def winograd_mult_ratio(in_width: int, out_hw: int, k: int, stride: int, out_width: int | None = None) -> float:
    """Multiplies of the CPU kernel's forward algorithm for this candidate over the direct
    algorithm's: 16/36 for Winograd F(2x2, 3x3), 36/144 for F(4x4, 3x3), 81/144 for F(4x4, 2x2)
    on the stride phases (3x3 stride 2 on 16x16 inputs), 1 for the direct kernel
    (csrc/cpu/conv.cpp chooses)."""
    if not HAVE_EXT or k != 3:
        return 1.0
    ops = torch.ops.fastsupernet
    if stride == 2:
        s2 = (out_width is not None and hasattr(ops, "_cpu_winograd_s2")  # (builds before it: never)
              and ops._cpu_winograd_s2(BATCH, 2 * out_hw, 2 * out_hw, in_width, out_width))
        return 81 / 144 if s2 else 1.0
    if stride != 1:
        return 1.0
    least, tile = ops._cpu_winograd_min_width(out_hw, out_hw), ops._cpu_winograd_tile(out_hw, out_hw)
    if least < 0 or in_width < least:
        return 1.0
    return (tile + 2) ** 2 / (9 * tile * tile)


def _floor(benchmark, flops: float, nbytes: float, alg_flops: float | None = None) -> None:
    gemm, bandwidth = machine_rates()
    alg_flops = flops if alg_flops is None else alg_flops
    benchmark.extra_info.update(
        flops=flops,
        bytes=nbytes,
        gemm_gflops=gemm / 1e9,
        bandwidth_gbs=bandwidth / 1e9,
        floor_ms=1e3 * max(flops / gemm, nbytes / bandwidth),
        floor_alg_ms=1e3 * max(alg_flops / gemm, nbytes / bandwidth),
    )


class BN:
    """Packed BatchNorm parameters and statistics with R rows."""

    def __init__(self, rows: int, g: torch.Generator) -> None:
        self.mean = torch.randn(rows, generator=g)
        self.var = torch.rand(rows, generator=g) + 0.5
        self.gamma = torch.randn(rows, generator=g)
        self.beta = torch.randn(rows, generator=g)

    def folded(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.gamma[idx] * torch.rsqrt(self.var[idx] + EPS)
        return scale, self.beta[idx] - self.mean[idx] * scale


# --- reference rates --------------------------------------------------------------------------
def test_gemm_rate(benchmark):
    """fp32 torch.mm 1024^3: the compute rate the floors use."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    from fastsupernet.ops._extension import cpu_conv_isa

    benchmark.group = "reference rates"
    benchmark.extra_info["flops"] = 2 * 1024**3
    benchmark.extra_info["cpu_isa"] = cpu_conv_isa()
    benchmark.pedantic(torch.mm, args=(a, b), rounds=20, iterations=1, warmup_rounds=2)


def test_copy_bandwidth(benchmark):
    """Copy of 256 MiB (read + write): the bandwidth the floors use."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    benchmark.group = "reference rates"
    benchmark.extra_info["bytes"] = 2 * src.numel() * src.element_size()
    benchmark.pedantic(dst.copy_, args=(src,), rounds=7, iterations=1, warmup_rounds=1)


# --- one candidate: sliced_conv2d + folded BN + ReLU ---------------------------------------------
# name: (C_in, H, C_out, k, stride)
SLICED = {
    "32x32 16->16 3x3": (16, 32, 16, 3, 1),
    "16x16 32->32 3x3": (32, 16, 32, 3, 1),
    "8x8 64->64 3x3": (64, 8, 64, 3, 1),
    "32x32 16->32 3x3 s2": (16, 32, 32, 3, 2),
    "16x16 32->64 3x3 s2": (32, 16, 64, 3, 2),
    "32x32 16->32 1x1 s2": (16, 32, 32, 1, 2),
    "16x16 32->64 1x1 s2": (32, 16, 64, 1, 2),
    "16x16 32->32 1x1": (32, 16, 32, 1, 1),
}
ROW_OFFSET = 3


def _sliced_setup(name: str):
    cin, h, cout, k, stride = SLICED[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, cin, h, h, generator=g) * 2 + 0.5
    weight = torch.randn(2 * cout + ROW_OFFSET, cin + 4, k, k, generator=g) * 0.1  # packed, more rows/cols
    bn = BN(weight.shape[0], g)
    ho = (h + 2 * (k // 2) - k) // stride + 1
    flops = 2 * BATCH * ho * ho * cout * cin * k * k
    nbytes = 4 * (x.numel() + BATCH * cout * ho * ho)
    alg = flops * winograd_mult_ratio(cin, ho, k, stride, cout)
    return x, weight, bn, cout, k, stride, flops, nbytes, alg


def _sliced_fns(x, weight, bn, cout, k, stride, stats=False):
    """(peer, ours) forward of one sliced layer: the peer sequence and sliced_conv2d with the
    folded BN + ReLU epilogue (and the statistics when asked)."""
    a, pad = x.shape[1], k // 2
    sl = slice(ROW_OFFSET, ROW_OFFSET + cout)
    idx = torch.arange(ROW_OFFSET, ROW_OFFSET + cout)

    def peer():
        w = weight[sl, :a].contiguous()
        y = F.conv2d(x, w, stride=stride, padding=pad)
        y = F.batch_norm(y, bn.mean[sl], bn.var[sl], bn.gamma[sl], bn.beta[sl], training=False)
        return F.relu(y)

    def ours():
        scale, shift = bn.folded(idx)
        return torch.ops.fastsupernet.sliced_conv2d(x, weight, cout, ROW_OFFSET, stride, pad, scale, shift, None,
                                                    "relu", None, stats)[0]

    return peer, ours


@pytest.mark.parametrize("impl", ["peer", "ours", "ours+stats"])
@pytest.mark.parametrize("name", list(SLICED))
def test_sliced(benchmark, name, impl):
    if impl != "peer" and not HAVE_EXT:
        pytest.skip("compiled extension not built")
    x, weight, bn, cout, k, stride, flops, nbytes, alg = _sliced_setup(name)
    if impl == "ours+stats" and (k != 3 or stride != 1):
        pytest.skip("statistics overhead: stride-1 3x3 shapes only")
    peer, ours = _sliced_fns(x, weight, bn, cout, k, stride, stats=impl == "ours+stats")
    benchmark.group = f"sliced {name}"
    _floor(benchmark, flops, nbytes, alg)
    fn = peer if impl == "peer" else ours
    out = benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)
    if impl != "peer":
        want = peer()  # Winograd F(4x4) errs by ~1e-5 of the output's scale in float32
        torch.testing.assert_close(out, want, rtol=1e-4, atol=2e-5 * float(want.abs().max()))


def _sliced_train_fns(x, weight, bn, cout, k, stride):
    """(peer, ours) forward + backward of one sliced layer: the gradients of x, the packed weight
    and the BN's gamma and beta, from the peer sequence under autograd and from
    ``fastsupernet.ops.sliced_conv2d`` (its registered autograd). Makes x and weight require grad."""
    from fastsupernet.ops import sliced_conv2d

    x.requires_grad_(True)
    weight.requires_grad_(True)
    gamma, beta = bn.gamma.clone().requires_grad_(True), bn.beta.clone().requires_grad_(True)
    a, pad = x.shape[1], k // 2
    sl = slice(ROW_OFFSET, ROW_OFFSET + cout)
    ho = (x.shape[2] + 2 * pad - k) // stride + 1
    grad_out = torch.randn(BATCH, cout, ho, ho, generator=torch.Generator().manual_seed(2))
    inputs = (x, weight, gamma, beta)

    def peer():
        w = weight[sl, :a].contiguous()
        y = F.conv2d(x, w, stride=stride, padding=pad)
        y = F.batch_norm(y, bn.mean[sl], bn.var[sl], gamma[sl], beta[sl], training=False)
        return torch.autograd.grad(F.relu(y), inputs, grad_out)

    def ours():
        scale = gamma[sl] * torch.rsqrt(bn.var[sl] + EPS)
        shift = beta[sl] - bn.mean[sl] * scale
        y = sliced_conv2d(x, weight, cout, row_offset=ROW_OFFSET, stride=stride, padding=pad, scale=scale,
                          shift=shift, activation="relu")
        return torch.autograd.grad(y, inputs, grad_out)

    return peer, ours


# forward + backward (training): gradients of x, the packed weight and the BN's gamma and beta
SLICED_TRAIN = ["32x32 16->16 3x3", "16x16 32->32 3x3", "8x8 64->64 3x3", "16x16 32->64 3x3 s2",
                "16x16 32->64 1x1 s2"]


@pytest.mark.parametrize("impl", ["peer", "ours"])
@pytest.mark.parametrize("name", SLICED_TRAIN)
def test_sliced_forward_backward(benchmark, name, impl):
    """Forward + backward of one candidate with the folded-BN + ReLU epilogue: the peer sequence
    under autograd vs ``fastsupernet.ops.sliced_conv2d`` (its registered autograd). Floor: 3x the
    forward's FLOPs and bytes (forward, input gradient, weight gradient), direct algorithm."""
    if impl != "peer" and not HAVE_EXT:
        pytest.skip("compiled extension not built")
    x, weight, bn, cout, k, stride, flops, nbytes, _ = _sliced_setup(name)
    peer, ours = _sliced_train_fns(x, weight, bn, cout, k, stride)

    benchmark.group = f"sliced {name} forward+backward"
    _floor(benchmark, 3 * flops, 3 * nbytes)
    got = benchmark.pedantic(peer if impl == "peer" else ours, rounds=5, iterations=1, warmup_rounds=1)
    if impl != "peer":
        for g, want in zip(got, peer()):  # fp32 sums of up to 262k products in two orders
            torch.testing.assert_close(g, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


# --- K candidates: multi_conv2d vs a loop of the peer sequence -----------------------------------
# name: (H, max width)
SPACES = {"32x32 w<=16": (32, 16), "16x16 w<=32": (16, 32), "8x8 w<=64": (8, 64)}
KS = [8, 32, 128]


@functools.lru_cache(maxsize=2)
def _multi_setup(space: str, K: int, inputs: str):
    h, wmax = SPACES[space]
    rng = random.Random(K * 1000 + wmax)
    choices = list(range(4, wmax + 1, 4))
    in_w = [rng.choice(choices) for _ in range(K)]
    out_w = [rng.choice(choices) for _ in range(K)]
    # packed weight: 3 rows between candidates, wmax + 4 columns
    row_off, r = [], 3
    for o in out_w:
        row_off.append(r)
        r += o + 3
    g = torch.Generator().manual_seed(K)
    weight = torch.randn(r, wmax + 4, 3, 3, generator=g) * 0.1
    bn = BN(r, g)
    if inputs == "shared":
        in_off = [0] * K
        c = max(in_w)
    else:
        in_off = [sum(in_w[:k]) for k in range(K)]
        c = sum(in_w)
    x = torch.randn(BATCH, c, h, h, generator=g) * 2 + 0.5
    idx = torch.cat([torch.arange(ro, ro + o) for ro, o in zip(row_off, out_w)])
    M = sum(out_w)
    flops = 2 * BATCH * h * h * 9 * sum(o * a for o, a in zip(out_w, in_w))
    alg = 2 * BATCH * h * h * 9 * sum(o * a * winograd_mult_ratio(a, h, 3, 1) for o, a in zip(out_w, in_w))
    nbytes = 4 * (x.numel() + BATCH * M * h * h)
    return x, weight, bn, in_off, in_w, out_w, row_off, idx, flops, nbytes, alg


def _rounds(K: int) -> int:
    return {8: 7, 32: 5, 128: 3}[K]


@pytest.mark.parametrize("impl", ["peer", "ours"])
@pytest.mark.parametrize("inputs", ["shared", "packed"])
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("space", list(SPACES))
def test_multi(benchmark, space, K, inputs, impl):
    if impl != "peer" and not HAVE_EXT:
        pytest.skip("compiled extension not built")
    x, weight, bn, in_off, in_w, out_w, row_off, idx, flops, nbytes, alg = _multi_setup(space, K, inputs)

    def peer():
        outs = []
        for off, a, o, r in zip(in_off, in_w, out_w, row_off):
            sl = slice(r, r + o)
            w = weight[sl, :a].contiguous()
            y = F.conv2d(x[:, off : off + a], w, padding=1)
            y = F.batch_norm(y, bn.mean[sl], bn.var[sl], bn.gamma[sl], bn.beta[sl], training=False)
            outs.append(F.relu(y))
        return outs

    def ours():
        scale, shift = bn.folded(idx)
        return torch.ops.fastsupernet.multi_conv2d(x, weight, in_off, in_w, out_w, row_off, 1, 1, scale, shift,
                                                   None, "relu", None, False)[0]

    benchmark.group = f"multi {space} K={K} {inputs}"
    _floor(benchmark, flops, nbytes, alg)
    # two warm-up calls: the first calls pay one-off costs (oneDNN primitive creation for the
    # peer, first faults of fresh huge pages for the kernels' large outputs)
    benchmark.pedantic(peer if impl == "peer" else ours, rounds=_rounds(K), iterations=1, warmup_rounds=2)


def test_multi_matches_peer():
    """The timed multi call computes what the peer loop computes (one small space, K = 8)."""
    if not HAVE_EXT:
        pytest.skip("compiled extension not built")
    x, weight, bn, in_off, in_w, out_w, row_off, idx, _, _, _ = _multi_setup("8x8 w<=64", 8, "packed")
    x = x[:4]
    scale, shift = bn.folded(idx)
    out = torch.ops.fastsupernet.multi_conv2d(x, weight, in_off, in_w, out_w, row_off, 1, 1, scale, shift, None,
                                              "relu", None, False)[0]
    ref = []
    for off, a, o, r in zip(in_off, in_w, out_w, row_off):
        sl = slice(r, r + o)
        y = F.conv2d(x[:, off : off + a], weight[sl, :a], padding=1)
        ref.append(F.relu(F.batch_norm(y, bn.mean[sl], bn.var[sl], bn.gamma[sl], bn.beta[sl], training=False)))
    torch.testing.assert_close(out, torch.cat(ref, 1), rtol=1e-4, atol=1e-4)


# --- table from a --benchmark-json file ----------------------------------------------------------
def _table(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, dict]] = {}
    for b in data["benchmarks"]:
        impl = b["params"].get("impl") if b.get("params") else None
        groups.setdefault(b["group"], {})[impl or b["name"]] = b
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
    rates = groups.get("reference rates", {})
    isa = next((b["extra_info"]["cpu_isa"] for b in rates.values() if "cpu_isa" in b["extra_info"]), "?")
    print(f"CPU: {cpu}; fastsupernet CPU kernels: {isa}")
    for name, b in rates.items():
        med = b["stats"]["median"]
        if "flops" in b["extra_info"]:
            print(f"{name}: median {med * 1e3:.2f} ms, {b['extra_info']['flops'] / med / 1e9:.1f} GFLOP/s")
        else:
            print(f"{name}: median {med * 1e3:.2f} ms, {b['extra_info']['bytes'] / med / 1e9:.1f} GB/s")
    print()
    print("| group | peer (ms) | ours (ms) | ratio | GFLOP/s ours | floor (ms) | ours / floor "
          "| algorithm floor (ms) | ours / algorithm floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for group, impls in groups.items():
        if group == "reference rates" or "ours" not in impls:
            continue
        ours = impls["ours"]
        med = ours["stats"]["median"]
        info = ours["extra_info"]
        peer = impls.get("peer")
        pm = peer["stats"]["median"] if peer else float("nan")
        alg = info.get("floor_alg_ms", info["floor_ms"])
        print(f"| {group} | {pm * 1e3:.1f} | {med * 1e3:.1f} | {pm / med:.2f}x | {info['flops'] / med / 1e9:.0f} |"
              f" {info['floor_ms']:.1f} | {med * 1e3 / info['floor_ms']:.2f} | {alg:.1f} | {med * 1e3 / alg:.2f} |")
        if "ours+stats" in impls:
            sm = impls["ours+stats"]["stats"]["median"]
            print(f"| {group} (ours + stats) | {pm * 1e3:.1f} | {sm * 1e3:.1f} | {pm / sm:.2f}x |"
                  f" {info['flops'] / sm / 1e9:.0f} | {info['floor_ms']:.1f} | {sm * 1e3 / info['floor_ms']:.2f} |"
                  f" {alg:.1f} | {sm * 1e3 / alg:.2f} |")


def _interleaved(name: str, pairs: int, backward: bool = False) -> None:
    """Peer and ours of ``test_sliced`` (with ``backward``: of ``test_sliced_forward_backward``)
    for layer ``name``, alternating, ``pairs`` times."""
    from fastsupernet.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # as conftest.py does for the pytest runs
    if not HAVE_EXT:
        sys.exit("compiled extension not built")
    x, weight, bn, cout, k, stride, *_ = _sliced_setup(name)
    peer, ours = (_sliced_train_fns if backward else _sliced_fns)(x, weight, bn, cout, k, stride)
    times: dict[str, list[float]] = {"peer": [], "ours": []}
    for _ in range(pairs):
        for key, fn in (("peer", peer), ("ours", ours)):
            fn()
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in times.items()}
    per_pair = statistics.median(p / o for p, o in zip(times["peer"], times["ours"]))
    print(f"sliced {name}{' forward+backward' if backward else ''}, batch {BATCH}, {torch.get_num_threads()} threads, {pairs} interleaved pairs: "
          f"peer {med['peer'] * 1e3:.3f} ms, ours {med['ours'] * 1e3:.3f} ms, ratio of medians "
          f"{med['peer'] / med['ours']:.3f}x, median per-pair ratio {per_pair:.3f}x")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--interleaved":
        if sys.argv[2] not in SLICED:
            sys.exit(f"unknown layer {sys.argv[2]!r}; one of: {', '.join(SLICED)}")
        rest = sys.argv[3:]
        backward = "--backward" in rest
        rest = [a for a in rest if a != "--backward"]
        if rest and (len(rest) != 2 or rest[0] != "--pairs" or not rest[1].isdigit()):
            sys.exit("usage: bench_conv_cpu.py --interleaved LAYER [--pairs N] [--backward]")
        _interleaved(sys.argv[2], int(rest[1]) if rest else 60, backward)
    elif len(sys.argv) == 2:
        _table(sys.argv[1])
    else:
        sys.exit(__doc__)
