"""multi_conv2d kernels vs the per-candidate PyTorch loop, on Track-1 layer shapes (markdown table).

    python benchmarks/gpu_kernels.py                  # on the GPU: cuda and triton backends
    python benchmarks/gpu_kernels.py --dry-run        # CPU, tiny shapes: exercises the whole script

Per layer shape (batch 256, 3x3 stride 1 padding 1: 32x32 with widths <= 16, 16x16 with widths
<= 32, 8x8 with widths <= 64; input and output widths of each candidate drawn from the layer's
Track-1 choices 4, 8, ...) and K candidates (8, 32, 128), each reading its own slice of a packed
input, the table compares:

- loop: the peer sequence per candidate in a Python loop: slice of x, ``.contiguous()``,
  ``F.conv2d`` with the candidate's weight slice, ``F.batch_norm`` in eval mode, ReLU;
- cuda: ``torch.ops.fastsupernet.multi_conv2d`` on CUDA tensors (the compiled CUDA kernel), one
  call with the folded BN (scale, shift) and ReLU fused;
- cuda2img (``--two-images``, fp32, instead of the triton column): the same CUDA kernel with two
  images per pixel tile (``FASTSUPERNET_CUDA_CONV_IMAGES=2``, an experiment: every staged weight
  serves twice the multiply-adds; a separate run, so that a fault in it cannot cost the main table);
- triton: ``fastsupernet.ops.triton_conv.multi_conv2d_triton`` with the same arguments (shown as
  n/a when that module is missing or fails);
- triton_cl: the same Triton kernel on channels_last copies of x and the weight (made once per
  shape, outside the timing), the layout the ranking engine gives it: the channels are then
  contiguous and, the Track-1 widths being multiples of 4, loaded 4 per vector (``VEC_X``);
- triton_x3 (fp32 only): triton_cl with ``input_precision="tf32x3"``, each fp32 product as three
  TF32 tensor-core products (errors near fp32's: the ranking engine's ``conv_route=
  "triton_tf32x3"``), its tiles chosen per shape from the sm_90 loop counts
  (``FASTSUPERNET_TRITON_CONFIG=static``: one compile per shape, no autotuning sweep);

Times are medians of CUDA-event timings (host timers on CPU) after a warm-up call. By default
everything is float32 with TF32 off (cuDNN and matmul), so all columns compute the same fp32
result; ``--precision tf32`` turns TF32 on for the loop (cuDNN) and the Triton dot and runs
the CUDA column as ``torch.ops.fastsupernet.multi_conv2d_tf32`` (the tensor-core kernel), and
``--precision bf16`` runs the loop and Triton on bfloat16 tensors (the CUDA kernel column is
n/a: it computes float32 / float64 / TF32 only); the floor then uses that precision's GEMM rate. ``x loop``
is the speed-up over the loop. The floor is the larger of FLOPs / (the card's measured fp32 GEMM
rate: torch.mm 4096^3, TF32 off) and bytes / (measured copy bandwidth: read + write of 1 GiB),
counting the bytes a fused kernel must move (each input slice read once, the output written
once, the weights); ``/floor`` is the time over that floor. ``max diff`` is the largest absolute
difference between the fused output and the loop's (a broken kernel cannot hide behind a fast time).

Exit status 1 when the compiled op fails on any shape (the Triton column only reports).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

EPS = 1e-5
LAYERS = [(32, 16), (16, 32), (8, 64)]  # (spatial size, largest width) of the three Track-1 stages
KS = (8, 32, 128)
BATCH = 256
TINY_LAYERS = [(8, 8), (5, 12)]
TINY_KS = (2, 3)
TINY_BATCH = 2


@dataclass
class Case:
    hw: int
    max_width: int
    k: int
    x: torch.Tensor
    weight: torch.Tensor
    in_offsets: list[int]
    in_widths: list[int]
    out_widths: list[int]
    row_offsets: list[int]
    bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # mean, var, gamma, beta (packed)
    scale: torch.Tensor
    shift: torch.Tensor

    @property
    def name(self) -> str:
        return f"{self.hw}x{self.hw} w<={self.max_width}"

    def op_args(self) -> tuple:
        return (self.x, self.weight, self.in_offsets, self.in_widths, self.out_widths, self.row_offsets, 1, 1,
                self.scale, self.shift, None, "relu", None, False)  # fmt: skip

    def flops(self) -> float:
        n, _, h, w = self.x.shape
        return 2.0 * n * h * w * 9 * sum(i * o for i, o in zip(self.in_widths, self.out_widths))

    def min_bytes(self) -> float:
        n, _, h, w = self.x.shape
        e = self.x.element_size()
        weights = 9 * sum(i * o for i, o in zip(self.in_widths, self.out_widths))
        return float(e * (n * h * w * (sum(self.in_widths) + sum(self.out_widths)) + weights))


def make_case(hw: int, max_width: int, k: int, batch: int, device: str, seed: int,
              dtype: torch.dtype = torch.float32) -> Case:
    g = torch.Generator().manual_seed(seed)  # widths and small tensors
    gd = torch.Generator(device=device).manual_seed(seed)  # the input, drawn on the device
    choices = list(range(4, max_width + 1, 4)) or [max_width]
    pick = lambda: [choices[int(i)] for i in torch.randint(0, len(choices), (k,), generator=g)]  # noqa: E731
    in_w, out_w = pick(), pick()
    in_off = [sum(in_w[:j]) for j in range(k)]
    # Packed weight of two groups (narrow and wide widths, as the supernet packs them).
    half = max(max_width // 2, 1)
    rows = half + max_width
    row_off = [0 if o <= half else half for o in out_w]
    x = torch.randn(batch, sum(in_w), hw, hw, generator=gd, device=device).mul_(2).add_(0.5)
    weight = torch.randn(rows, max_width, 3, 3, generator=g) / math.sqrt(9 * max_width)
    c_out = sum(out_w)
    mean = torch.randn(c_out, generator=g) * 0.1
    var = torch.rand(c_out, generator=g) + 0.5
    gamma = 1 + torch.randn(c_out, generator=g) * 0.1
    beta = torch.randn(c_out, generator=g) * 0.1
    scale = gamma / torch.sqrt(var + EPS)
    shift = beta - mean * scale
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return Case(hw, max_width, k, to(x), to(weight), in_off, in_w, out_w, row_off,
                (to(mean), to(var), to(gamma), to(beta)), to(scale), to(shift))  # fmt: skip


def peer_loop(c: Case) -> list[torch.Tensor]:
    mean, var, gamma, beta = c.bn
    outs = []
    o = 0
    for io, iw, ow, ro in zip(c.in_offsets, c.in_widths, c.out_widths, c.row_offsets):
        xs = c.x[:, io : io + iw].contiguous()
        y = F.conv2d(xs, c.weight[ro : ro + ow, :iw], stride=1, padding=1)
        sl = slice(o, o + ow)
        y = F.batch_norm(y, mean[sl], var[sl], gamma[sl], beta[sl], training=False, eps=EPS)
        outs.append(F.relu(y))
        o += ow
    return outs


# --- backends of the fused op -------------------------------------------------------------------


def _compiled_op(device: str, name: str = "multi_conv2d") -> tuple[Callable | None, str]:
    try:
        from fastsupernet.ops import _extension

        _extension.require()
        key = "CUDA" if device == "cuda" else "CPU"
        if not _extension.has_kernel(name, key):
            return None, f"fastsupernet::{name} has no {key} kernel in this build"
        return getattr(torch.ops.fastsupernet, name), ""
    except Exception as exc:  # noqa: BLE001 (reported in the table notes)
        return None, f"{type(exc).__name__}: {exc}"


def _triton_op(input_precision: str = "ieee") -> tuple[Callable | None, str]:
    try:
        from fastsupernet.ops.triton_conv import multi_conv2d_triton

        return (lambda *args: multi_conv2d_triton(*args, input_precision=input_precision)), ""
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"


def _channels_last(op: Callable) -> Callable:
    """``op`` on channels_last copies of its x and weight, kept for the last pair seen (so that the
    timed calls do not pay for the copies)."""
    last: dict = {}

    def run(x, weight, *rest):
        key = (x.data_ptr(), weight.data_ptr(), x.shape, weight.shape)
        if last.get("key") != key:
            last.clear()
            last.update(key=key, x=x.contiguous(memory_format=torch.channels_last),
                        weight=weight.contiguous(memory_format=torch.channels_last))
        return op(last["x"], last["weight"], *rest)

    return run


def _static_tiles(op: Callable) -> Callable:
    """``op`` with the Triton tiles chosen per call from the loop counts (no autotuning)."""
    from fastsupernet.ops.triton_conv import CONFIG_ENV_VAR, STATIC

    def run(*args):
        with env_setting(CONFIG_ENV_VAR, STATIC):
            return op(*args)

    return run


def _reference_op() -> tuple[Callable | None, str]:
    from fastsupernet.ops import reference

    def run(x, weight, io, iw, ow, ro, stride, padding, scale, shift, residual, activation, slope, stats):
        y = reference.multi_conv2d(x, weight, io, iw, ow, ro, stride=stride, padding=padding, scale=scale,
                                   shift=shift, residual=residual, activation=activation, prelu_slope=slope)  # fmt: skip
        return y, None, None

    return (run, "") if hasattr(reference, "multi_conv2d") else (None, "reference.multi_conv2d is missing")


IMAGES_VAR = "FASTSUPERNET_CUDA_CONV_IMAGES"


@contextlib.contextmanager
def env_setting(name: str, value: str):
    """Environment variable ``name`` set to ``value`` inside the block, as before after it (the
    kernels read their experiment switches per call; also used by gpu_rank.py and gpu_ncu.py)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def two_image_tiles():
    """The CUDA fp32 kernel's two-image tiles (csrc/cuda/conv.cu) inside the block, the previous
    setting after it (also used by gpu_rank.py)."""
    return env_setting(IMAGES_VAR, "2")


def _two_images(op: Callable) -> Callable:
    """``op`` with the CUDA fp32 kernel's two-image tiles, for this call only."""

    def run(*args):
        with two_image_tiles():
            return op(*args)

    return run


def backends(device: str, precision: str = "fp32", two_images: bool = False) -> list[tuple[str, Callable | None, str, bool]]:
    """(column, fn or None, why not available, required) per fused backend on the device
    (``two_images``: the CUDA fp32 kernel with one and with two images per pixel tile)."""
    if device == "cuda":
        op, why = _compiled_op("cuda", "multi_conv2d_tf32" if precision == "tf32" else "multi_conv2d")
        if precision == "bf16":
            op, why = None, "the CUDA kernels compute float32 / float64 (and TF32) only"
        tri, why_t = _triton_op("tf32" if precision == "tf32" else "ieee")
        if two_images:  # the fp32 kernel's two-image experiment next to the kernel itself, nothing else
            return [("cuda", op, why, True), ("cuda2img", _two_images(op) if op is not None else None, why, False)]
        tri_cl = _channels_last(tri) if tri is not None else None
        cols = [("cuda", op, why, precision != "bf16"), ("triton", tri, why_t, False),
                ("triton_cl", tri_cl, why_t, False)]
        if precision == "fp32":
            x3, why_x3 = _triton_op("tf32x3")
            cols.append(("triton_x3", _static_tiles(_channels_last(x3)) if x3 is not None else None, why_x3, False))
        return cols
    op, why = _compiled_op("cpu")
    ref, why_r = _reference_op()
    return [("cpp", op, why, False), ("reference", ref, why_r, False)]


# --- measurement --------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, min_time: float = 0.3, min_reps: int = 3,
                max_reps: int = 25) -> float:  # fmt: skip
    """Median seconds per call, after one warm-up call (compilation, autotuning, caches)."""
    fn()
    _sync(device)
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < min_time and len(times) < max_reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_rate(device: str, n: int, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of torch.mm n x n x n in dtype (float32: TF32 as set by the caller)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n**3 / median_time(lambda: torch.mm(a, b), device, min_time=0.5)


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s moved (read + write) by a device copy of nbytes."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2.0 * nbytes / median_time(lambda: dst.copy_(src), device, min_time=0.5)


def _fmt_ms(t: float | None) -> str:
    return "n/a" if t is None else f"{t * 1e3:.3f}"


def _fmt_x(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def run(device: str, layers, ks, batch: int, precision: str = "fp32", two_images: bool = False) -> int:
    dtype = PRECISIONS[precision]
    if device == "cuda":
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        name = torch.cuda.get_device_name(0)
        rate = gemm_rate(device, 4096, dtype)
        bandwidth = copy_bandwidth(device, 1 << 30)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
        rate = gemm_rate(device, 256)
        bandwidth = copy_bandwidth(device, 1 << 24)
    cols = backends(device, precision, two_images)
    what = {"fp32": "fp32 (TF32 off)",
            "tf32": "fp32 tensors, TF32 on (loop: cuDNN; cuda: multi_conv2d_tf32; triton: tf32 dot)",
            "bf16": "bf16"}[precision]
    print(f"## multi_conv2d on {name}, {what}\n")
    print(f"{precision} GEMM rate {rate / 1e9:.0f} GFLOP/s (torch.mm); copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"batch {batch}, 3x3 stride 1, folded BN + ReLU epilogue; times in ms (median)\n")  # fmt: skip
    head = ["layer", "K", "loop ms"]
    for c, *_ in cols:
        head += [f"{c} ms", f"{c} x loop"]
    head += ["floor ms"] + [f"{c} /floor" for c, *_ in cols] + [f"{c} max diff" for c, *_ in cols]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))

    notes = {c: why for c, fn, why, _ in cols if fn is None}
    failed_required = False
    seed = 0
    for hw, max_width in layers:
        for k in ks:
            seed += 1
            case = make_case(hw, max_width, k, batch, device, seed, dtype)
            with torch.no_grad():
                t_loop = median_time(lambda: peer_loop(case), device)
                ref = torch.cat(peer_loop(case), dim=1)
                times, diffs = [], []
                for col, fn, _, required in cols:
                    t = d = None
                    if fn is not None:
                        try:
                            out = fn(*case.op_args())[0]
                            d = float((out.float() - ref.float()).abs().max())
                            del out
                            t = median_time(lambda: fn(*case.op_args()), device)
                        except Exception as exc:  # noqa: BLE001 (reported below the table)
                            notes.setdefault(col, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                            failed_required |= required
                            t = d = None
                    times.append(t)
                    diffs.append(d)
                del ref
            floor = max(case.flops() / rate, case.min_bytes() / bandwidth)
            row = [case.name, str(k), _fmt_ms(t_loop)]
            for t in times:
                row += [_fmt_ms(t), _fmt_x(t_loop, t)]
            row += [_fmt_ms(floor)] + [_fmt_x(t, floor) for t in times]
            row += ["n/a" if d is None else f"{d:.1e}" for d in diffs]
            print("| " + " | ".join(row) + " |", flush=True)
            del case
            if device == "cuda":
                torch.cuda.empty_cache()
    if notes:
        print()
        for col, why in notes.items():
            print(f"- {col}: n/a ({why})")
    return 1 if failed_required else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (checks the script, not the speed)")
    ap.add_argument("--dry-run", action="store_true", help="same as --device cpu --tiny")
    ap.add_argument("--ks", default=None, help="comma-separated candidate counts (default 8,32,128; tiny 2,3)")
    ap.add_argument("--batch", type=int, default=None, help=f"batch size (default {BATCH}; tiny {TINY_BATCH})")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                    help="fp32 (default; TF32 off everywhere), tf32 (TF32 on: cuDNN loop, the CUDA tensor-core "
                         "kernel, Triton tf32 dot) or bf16 (bf16 tensors; no CUDA kernel column); GPU only")
    ap.add_argument("--two-images", action="store_true",
                    help="the CUDA fp32 kernel with one and with two images per pixel tile (no triton column)")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else (args.device or "cuda")
    tiny = args.tiny or args.dry_run
    if device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_kernels: no CUDA GPU visible to torch {torch.__version__} (torch.version.cuda={torch.version.cuda}); "
              "use --dry-run to check the script on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    ks = tuple(int(v) for v in args.ks.split(",")) if args.ks else (TINY_KS if tiny else KS)
    batch = args.batch or (TINY_BATCH if tiny else BATCH)
    torch.manual_seed(0)
    if args.precision != "fp32" and device != "cuda":
        ap.error("--precision tf32 / bf16 needs the GPU")
    if args.two_images and (args.precision != "fp32" or device != "cuda"):
        ap.error("--two-images is an experiment of the CUDA fp32 kernel: fp32 on the GPU only")
    return run(device, TINY_LAYERS if tiny else LAYERS, ks, batch, args.precision, args.two_images)


if __name__ == "__main__":
    sys.exit(main())
