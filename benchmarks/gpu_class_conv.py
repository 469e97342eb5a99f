"""One width class of a ranking level: ``multi_conv2d`` vs one batched ``F.conv2d`` (markdown table).

    python benchmarks/gpu_class_conv.py                 # on the GPU, fp32 (TF32 off) and tf32
    python benchmarks/gpu_class_conv.py --dry-run       # CPU, tiny shapes: exercises the whole script
    python benchmarks/gpu_class_conv.py --cpu           # CPU, the same classes with G / 4 units (C++ kernel vs oneDNN)

At the deep levels of the ranking tree (16x16 and 8x8 in Track 1, 85% of the multiply-adds of
all 50,000 official candidates) every tree node has one child, so ``multi_conv2d`` computes G
unrelated candidates, each reading its own channel slice of the packed input. Candidates of one
level with the same input width, output width and weight rows ("a width class") apply the SAME
weight slice to different inputs, so the class is also one convolution over G x N images:
gather the G input slices into a (G N, a, H, W) batch, one ``F.conv2d`` (cuDNN), scatter the
(G N, o, H, W) result back into the packed channel layout and apply the folded BN and ReLU in
one more pass. This script measures whether that beats the multi-candidate kernel on the
device, per class shape (the question decides how the fast engine should run its deep levels):

- ``multi``: ``fastsupernet::multi_conv2d`` (``multi_conv2d_tf32`` for tf32) with the BN + ReLU
  epilogue fused: the fast engine's call today;
- ``class``: gather + ``F.conv2d`` + scatter + BN/ReLU (in place), everything the engine
  would run instead;
- ``conv only``: the ``F.conv2d`` of the gathered batch alone (the floor of that route).

TF32 is off for fp32 and on (cuDNN) for tf32. ``max diff``: largest difference between the
two routes' outputs. Times: medians of CUDA-event timings (host timers on CPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import gemm_rate, median_time  # noqa: E402

# (spatial size, input width, output width, candidates in the class): the engine's deep levels
CLASSES = [(16, 16, 16, 256), (16, 32, 32, 256), (16, 16, 32, 256), (8, 32, 32, 256), (8, 64, 64, 256),
           (8, 32, 64, 256), (32, 16, 16, 64), (16, 32, 32, 32)]
TINY_CLASSES = [(6, 3, 5, 3), (5, 4, 4, 2)]
BATCH = 128  # the engine's images per call (recalibration batch)


def make_class(hw: int, a: int, o: int, g: int, batch: int, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, g * a, hw, hw, generator=gen, device=device)
    rows = 3  # the class's weight rows start here in the packed (R, C_max, 3, 3) weight
    weight = torch.randn(rows + o + 2, a + 4, 3, 3, generator=gen, device=device) / (3 * a**0.5)
    scale = 1 + 0.1 * torch.randn(g * o, generator=gen, device=device)
    shift = 0.1 * torch.randn(g * o, generator=gen, device=device)
    meta = ([j * a for j in range(g)], [a] * g, [o] * g, [rows] * g)
    return x, weight, scale, shift, meta, rows


def run(device: str, classes, batch: int, precision: str) -> int:
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    op_name = "multi_conv2d_tf32" if precision == "tf32" and device == "cuda" else "multi_conv2d"
    import fastsupernet._C  # noqa: F401  (registers the ops)

    op = getattr(torch.ops.fastsupernet, op_name)
    rate = gemm_rate(device, 4096 if device == "cuda" else 1024 if batch > 2 else 256)
    print(f"\n{precision}: {op_name} vs one batched F.conv2d per width class, batch {batch}, 3x3 stride 1; "
          f"GEMM {rate / 1e12:.1f} TFLOP/s ({'TF32' if precision == 'tf32' else 'fp32'})\n")
    print("| class (HxW a->o, G) | multi ms | class ms | conv only ms | class x multi | multi TFLOP/s | "
          "conv TFLOP/s | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    status = 0
    for hw, a, o, g in classes:
        x, weight, scale, shift, meta, rows = make_class(hw, a, o, g, batch, device)
        w = weight[rows : rows + o, :a].contiguous()
        n = x.shape[0]

        def multi():
            return op(x, weight, *meta, 1, 1, scale, shift, None, "relu", None, False)[0]

        def gathered():
            return x.view(n, g, a, hw, hw).transpose(0, 1).reshape(g * n, a, hw, hw)

        xg = gathered()

        def conv_only():
            return F.conv2d(xg, w, padding=1)

        def by_class():
            y = F.conv2d(gathered(), w, padding=1)
            y = y.view(g, n, o, hw, hw).transpose(0, 1).reshape(n, g * o, hw, hw)
            return y.mul_(scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1)).relu_()

        try:
            diff = (multi() - by_class()).abs().max().item()
            t_multi, t_class, t_conv = (median_time(f, device) for f in (multi, by_class, conv_only))
        except Exception as exc:  # noqa: BLE001 (reported, exit status 1)
            print(f"| {hw}x{hw} {a}->{o}, {g} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} |")
            status = 1
            continue
        flops = 2.0 * n * g * hw * hw * 9 * a * o
        print(f"| {hw}x{hw} {a}->{o}, {g} | {t_multi * 1e3:.3f} | {t_class * 1e3:.3f} | {t_conv * 1e3:.3f} | "
              f"{t_multi / t_class:.2f} | {flops / t_multi / 1e12:.3g} | {flops / t_conv / 1e12:.3g} | {diff:.1e} |")
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (checks the script, not the speed)")
    ap.add_argument("--cpu", action="store_true", help="CPU, fp32, the GPU's classes with a quarter of the units")
    ap.add_argument("--precisions", default="fp32,tf32", help="comma-separated: fp32, tf32 (default both)")
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("fp32", "tf32")]
    if bad or not precisions:
        ap.error(f"--precisions: expected fp32 and/or tf32, got {args.precisions!r}")
    if args.dry_run or args.cpu:
        device, classes, batch = "cpu", TINY_CLASSES, 2
        if args.cpu:
            from fastsupernet.allocator import tune_cpu_allocator

            tune_cpu_allocator()  # as the command line does: large blocks kept mapped (no page faults per call)
            classes, batch = [(hw, a, o, max(g // 4, 1)) for hw, a, o, g in CLASSES], BATCH
            print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
        precisions = ["fp32"]  # tf32 is a CUDA kernel
    else:
        if not torch.cuda.is_available():
            print("gpu_class_conv: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
            return 2
        device, classes, batch = "cuda", CLASSES, BATCH
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    status = 0
    for p in precisions:
        status |= run(device, classes, batch, p)
    return status


if __name__ == "__main__":
    sys.exit(main())
