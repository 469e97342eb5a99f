"""bn_act: train-mode BN apply + residual + activation, forward and backward, the aten sequence vs
the compiled one-pass CPU op, on the batched training step's packed shapes.

    pytest benchmarks/bench_bn_act.py --benchmark-only     # pytest-benchmark tables
    python benchmarks/bench_bn_act.py [--threads 2]         # summary: ratios and bandwidth floors

Case: a block's last layer, ``prelu(BN(y) + residual)`` with one shared slope (the enhanced
supernet's block output), and a plain ``relu(BN(y))`` layer; y is the packed conv output of 9
paths (batch 64, 144 channels at 32x32: 37.7 MB in float32).
aten forward: ``addcmul`` (BN apply from the statistics) + add + activation; aten backward:
the activation's backward + ``native_batch_norm_backward``. Ours: ``fastsupernet::bn_act`` and
``fastsupernet::bn_act_backward``. Floor: the bytes the op must move (forward: read y and the
residual, write the output; backward: read grad, y and the residual, write the two gradients)
over the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from bench_conv_cpu import _median_seconds

SHAPE = (64, 144, 32, 32)


def _case(residual: bool, act: str):
    g = torch.Generator().manual_seed(0)
    n, c = SHAPE[0], SHAPE[1]
    y = torch.randn(SHAPE, generator=g) * 2 + 0.5
    r = torch.randn(SHAPE, generator=g) if residual else None
    grad = torch.randn(SHAPE, generator=g)
    mean = y.mean((0, 2, 3))
    invstd = torch.rsqrt(y.var((0, 2, 3), unbiased=False) + 1e-5)
    gamma = torch.rand(c, generator=g) + 0.5
    beta = torch.randn(c, generator=g)
    a = gamma * invstd
    b = beta - mean * a
    slope = torch.tensor([0.25]) if act == "prelu" else None
    v = (1, -1, 1, 1)

    def aten_fwd():
        z = torch.addcmul(b.view(v), y, a.view(v))
        if r is not None:
            z = z + r
        return F.prelu(z, slope) if act == "prelu" else F.relu(z)

    z_saved = aten_fwd() if act == "relu" else (torch.addcmul(b.view(v), y, a.view(v)) + (r if r is not None else 0))

    def aten_bwd():
        if act == "prelu":
            gz, _ = torch.ops.aten._prelu_kernel_backward(grad, z_saved, slope)
        else:
            gz = torch.ops.aten.threshold_backward(grad, z_saved, 0)
        return torch.ops.aten.native_batch_norm_backward(gz, y, gamma, None, None, mean, invstd, True, 1e-5,
                                                         [True, True, True])

    def ours_fwd():
        return torch.ops.fastsupernet.bn_act(y, a, b, r, None, None, act, slope)

    def ours_bwd():
        return torch.ops.fastsupernet.bn_act_backward(grad, y, a, b, r, act, slope, mean, invstd)

    elt = y.element_size() * y.numel()
    moved = {"forward": elt * (3 if residual else 2), "backward": elt * (5 if residual else 3)}
    return {"aten": {"forward": aten_fwd, "backward": aten_bwd}, "ours": {"forward": ours_fwd, "backward": ours_bwd}}, moved


CASES = {"prelu+residual": (True, "prelu"), "relu": (False, "relu")}


def _require_op():
    from fastsupernet.ops._extension import has_kernel

    if not has_kernel("bn_act", "CPU"):
        pytest.skip("fastsupernet._C with bn_act is not built")


@pytest.mark.parametrize("impl", ["aten", "ours"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("case", list(CASES))
def test_bn_act(benchmark, case, direction, impl):
    _require_op()
    fns, moved = _case(*CASES[case])
    benchmark.group = f"bn_act {case} {direction}"
    benchmark.extra_info["bytes_moved"] = moved[direction]
    benchmark.pedantic(fns[impl][direction], rounds=10, iterations=1, warmup_rounds=2)


def _median_ms(fn, reps: int = 15) -> float:
    return _median_seconds(fn, reps) * 1e3


def main() -> None:
    from fastsupernet.allocator import tune_cpu_allocator
    from fastsupernet.ops._extension import require

    require()  # registers torch.ops.fastsupernet.*
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / (_median_ms(lambda: dst.copy_(src)) / 1e3)
    print(f"threads {args.threads}, copy bandwidth {bw / 1e9:.1f} GB/s, shape {SHAPE}")
    print("| case | direction | aten ms | ours ms | ratio | floor ms | ours vs floor |")
    print("|---|---|---|---|---|---|---|")
    for case, spec in CASES.items():
        fns, moved = _case(*spec)
        for d in ("forward", "backward"):
            ta, to = _median_ms(fns["aten"][d]), _median_ms(fns["ours"][d])
            floor = moved[d] / bw * 1e3
            print(f"| {case} | {d} | {ta:.1f} | {to:.1f} | {ta / to:.2f}x | {floor:.1f} | {to / floor:.2f} |")


if __name__ == "__main__":
    main()
