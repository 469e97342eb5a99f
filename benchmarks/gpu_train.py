"""GPU training-step timings, batched K paths vs a loop, and the projected time of a whole pipeline.

On a CUDA GPU (the "training" section of ``benchmarks/gpu_check.sh``):

    python benchmarks/gpu_train.py [--config configs/track1_seed.yaml] [--batch 128] [--reps 5]

1. Times one training step (forward + backward + SGD update) of the largest path + 8 random
   paths on a batch of 3x32x32 images, enhanced Track-1 supernet, 100 classes: the loop of
   single paths vs one ``forward_paths`` pass, in float32 and under bf16 autocast, NCHW and
   channels_last, with the conv backward batched (``FASTSUPERNET_CONV_BACKWARD=batched``) or
   looped, and with the Triton conv backend (which computes in bf16 under autocast; the CUDA
   kernels compute in float32). Medians of ``--reps`` steps after warm-up, CUDA-synchronised. Next to each: the
   floor, the step's FLOPs (3 x forward multiply-adds x 2) at the measured GEMM rate of that
   precision (a 4096^3 matmul).
2. Projects the pipeline of ``--config`` (epochs, batch size, paths per step, teacher and
   max-recover per stage; 50,000 CIFAR-100 training images per epoch) from the measured
   step times of the best configuration. A PROJECTION, not a measured run: data loading and
   augmentation, evaluation and checkpoints are not included. If the file is missing or lacks
   a key, the numbers of the method's public code are used and the output says so.

``--dry-run`` runs everything on CPU at toy sizes (a few images at 16x16, 3 paths, one rep) to
check the script itself; its numbers mean nothing.

``--cpu`` measures on this machine's CPU at the real sizes (fp32, NCHW only; ``--reps``
defaults to 2 there): the projection of the pipeline on a CPU, for comparison with a GPU's.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SPACE, gemm_rate, make_model, make_steps, sample_archs, step_flops  # noqa: E402

from fastsupernet.ops import ENV_VAR  # noqa: E402
from fastsupernet.ops.conv import BACKWARD_ENV_VAR  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGES_PER_EPOCH = 50_000
# The method's public code (used where the config file is missing or silent).
DEFAULT_STAGES = [
    dict(name="fullwidth", epochs=300, batch_size=128, paths=1, teacher="none", probes=0),
    dict(name="singlepath", epochs=300, batch_size=128, paths=9, teacher="live", probes=5),
    dict(name="multibranch", epochs=300, batch_size=128, paths=8, teacher="frozen", probes=0),
    dict(name="morebranches", epochs=100, batch_size=128, paths=9, teacher="live", probes=0),
]


@contextlib.contextmanager
def env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def load_stages(path: Path) -> tuple[list[dict], list[str]]:
    """Per stage: epochs, batch_size, trained paths per step, teacher kind, probe paths; and notes."""
    notes: list[str] = []
    if not path.is_file():
        return [dict(s) for s in DEFAULT_STAGES], [f"{path} not found: using the method's published numbers"]
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    stages = cfg.get("stages")
    if not isinstance(stages, list) or not stages:
        return [dict(s) for s in DEFAULT_STAGES], [f"{path} has no 'stages' list: using the method's numbers"]
    out = []
    for i, st in enumerate(stages):
        d = DEFAULT_STAGES[min(i, len(DEFAULT_STAGES) - 1)]
        name = st.get("name", f"stage{i}")
        sampling = st.get("sampling") or {}
        loss = st.get("loss") or {}
        rule = sampling.get("rule")
        for key, val in (("epochs", st.get("epochs")), ("batch_size", st.get("batch_size")), ("sampling.rule", rule)):
            if val is None:
                notes.append(f"stages[{i}] ({name}) has no {key}: using {d.get(key, d['paths'])}")
        epochs = int(st.get("epochs", d["epochs"]))
        batch = int(st.get("batch_size", d["batch_size"]))
        if rule == "largest":
            paths, teacher = 1, "none"
        else:
            sampled = int(sampling.get("paths", d["paths"]))
            teacher = loss.get("teacher", "none") if loss.get("kind", "ce") == "distill" else "none"
            # a live teacher is the step's largest path, trained with CE next to the sampled paths
            paths = sampled + (1 if teacher == "live" or loss.get("train_largest") else 0)
        probes = int((st.get("max_recover") or {}).get("probes", 0))
        out.append(dict(name=name, epochs=epochs, batch_size=batch, paths=paths, teacher=teacher, probes=probes))
    return out, notes


def timed(steps: dict, reps: int, sync) -> dict[str, float]:
    """Median seconds per step of each step function (one warm-up call each, interleaved)."""
    for f in steps.values():
        f()
    sync()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def forward_only(model, archs, x, autocast_dtype):
    dev = x.device.type

    def run() -> None:
        amp = contextlib.nullcontext() if autocast_dtype is None else torch.autocast(dev, dtype=autocast_dtype)
        with torch.no_grad(), amp:
            model.forward_paths(x, archs)

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "track1_seed.yaml"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=None, help="steps timed per configuration (default 5; 2 with --cpu)")
    ap.add_argument("--budget-s", type=float, default=40.0,
                    help="start no further configuration after this many seconds (the projection still runs)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script, numbers mean nothing")
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU at the real sizes (fp32, NCHW)")
    args = ap.parse_args()

    if args.dry_run:
        device, batch, res, reps, k_rand = torch.device("cpu"), 4, 16, 1, 2
    elif args.cpu:
        from fastsupernet.allocator import tune_cpu_allocator

        tune_cpu_allocator()
        device, batch, res, reps, k_rand = torch.device("cpu"), args.batch, 32, args.reps or 2, 8
    else:
        if not torch.cuda.is_available():
            print("gpu_train: no CUDA GPU (use --dry-run to check the script on CPU)", file=sys.stderr)
            return 2
        device, batch, res, reps, k_rand = torch.device("cuda"), args.batch, 32, args.reps or 5, 8
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = (torch.cuda.get_device_name(0) if device.type == "cuda"
            else f"CPU ({torch.get_num_threads()} threads)" if args.cpu else "CPU (dry run)")
    print(f"gpu_train: {name}, torch {torch.__version__}; batch {batch} at 3x{res}x{res}, "
          f"largest + {k_rand} random paths, medians of {reps} steps")

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 3, res, res, generator=g).to(device)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)
    archs = sample_archs(1, k_rand)
    rates = {None: gemm_rate(256 if args.dry_run else 1024 if args.cpu else 4096, device=device.type)}
    if device.type == "cuda":
        rates[torch.bfloat16] = gemm_rate(4096, device="cuda", dtype=torch.bfloat16)

    # ---------------------------------------------------------------- step timings
    # (autocast dtype, channels_last, conv backward mode, conv backend of the batched path)
    variants = [(None, False, None, None), (None, False, "batched", None), (None, True, None, None),
                (torch.bfloat16, False, None, None), (torch.bfloat16, True, None, None),
                (torch.bfloat16, True, None, "triton")]
    rows, best = [], None
    t_start = time.perf_counter()
    for amp, cl, bwd, backend in variants:
        if args.dry_run and backend == "triton":
            continue  # CPU tensors would need the Triton interpreter
        if args.cpu and (amp is not None or cl or backend):
            continue  # the CPU recipe: fp32, NCHW, the compiled kernels
        if time.perf_counter() - t_start > args.budget_s:
            print(f"  (time budget of {args.budget_s:.0f} s spent: remaining configurations skipped)")
            break
        label = (f"{'bf16' if amp else 'fp32'} {'channels_last' if cl else 'NCHW'} backward={bwd or 'auto'}"
                 f"{' ' + backend if backend else ''}")
        try:
            model = make_model().to(device)
            x = x0.to(memory_format=torch.channels_last) if cl else x0
            if cl:
                model = model.to(memory_format=torch.channels_last)
            with env(BACKWARD_ENV_VAR, bwd), env(ENV_VAR, backend):
                t = timed(make_steps(model, archs, x, y, autocast_dtype=amp), reps, sync)
        except Exception as exc:  # report and go on: one failing option must not hide the others
            print(f"  {label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            if os.environ.get("GPU_TRAIN_TRACEBACK"):
                traceback.print_exc()
            continue
        flops = step_flops(model, archs, batch, res)
        floor = flops / rates.get(amp, rates[None])
        rows.append((label, t, floor))
        if best is None or t["batched"] < best[1]["batched"]:
            best = (label, t, amp, cl, bwd, backend)
    if not rows:
        print("gpu_train: every configuration failed", file=sys.stderr)
        return 1
    print(f"GEMM rate: fp32 {rates[None] / 1e12:.1f} TFLOP/s"
          + (f", bf16 {rates[torch.bfloat16] / 1e12:.1f} TFLOP/s" if torch.bfloat16 in rates else ""))
    print(f"{'configuration':44s} {'loop ms':>9s} {'batched ms':>11s} {'ratio':>6s} {'img/s batched':>14s} "
          f"{'floor ms':>9s} {'x floor':>8s}")
    for label, t, floor in rows:
        print(f"{label:44s} {t['loop'] * 1e3:9.2f} {t['batched'] * 1e3:11.2f} {t['loop'] / t['batched']:5.2f}x "
              f"{batch / t['batched']:14.0f} {floor * 1e3:9.3f} {t['batched'] / floor:8.1f}")

    # ---------------------------------------------------------------- projection
    label, _, amp, cl, bwd, backend = best
    stages, notes = load_stages(Path(args.config))
    needed_train = sorted({s["paths"] for s in stages} | {1})
    needed_fwd = sorted({s["probes"] for s in stages if s["probes"]} | {1})
    model = make_model().to(device)
    x = x0
    if cl:
        model = model.to(memory_format=torch.channels_last)
        x = x0.to(memory_format=torch.channels_last)
    train_t, fwd_t = {}, {}
    with env(BACKWARD_ENV_VAR, bwd), env(ENV_VAR, backend):
        for k in needed_train:
            a = [SPACE.largest()] + sample_archs(2, k - 1)[1:] if k > 1 else [SPACE.largest()]
            train_t[k] = timed({"batched": make_steps(model, a, x, y, autocast_dtype=amp)["batched"]}, reps, sync)["batched"]
        for k in needed_fwd:
            a = sample_archs(3, k)[1:] if k > 1 else [SPACE.largest()]
            fwd_t[k] = timed({"f": forward_only(model, a, x, amp)}, reps, sync)["f"]
    print(f"\nPROJECTION of {args.config} from measured step times ({label}; batch {batch} measured, "
          f"steps scaled by batch size; {IMAGES_PER_EPOCH} images per epoch; not a measured run: no data "
          f"loading, evaluation or checkpoints)")
    for n in notes:
        print(f"  note: {n}")
    total = total_upper = 0.0
    for s in stages:
        steps = s["epochs"] * math.ceil(IMAGES_PER_EPOCH / s["batch_size"])
        scale = s["batch_size"] / batch
        per = train_t.get(s["paths"], train_t[1] * s["paths"]) * scale
        if s["teacher"] == "frozen":
            per += fwd_t[1] * scale
        extra = 0.0
        if s["probes"]:
            per += 2 * fwd_t[s["probes"]] * scale  # probe losses before and after the update
            extra = s["probes"] * train_t[1] * scale  # every probe recovered: one more step each
        total += steps * per
        total_upper += steps * (per + extra)
        print(f"  {s['name']:14s} {s['epochs']:4d} epochs x {steps // s['epochs']} steps, {s['paths']} trained "
              f"path(s)/step, teacher {s['teacher']}, {s['probes']} probes: {per * 1e3:7.2f} ms/step -> "
              f"{steps * per / 3600:6.2f} h" + (f" (+{steps * extra / 3600:.2f} h if every probe recovers)" if extra else ""))
    print(f"  total: {total / 3600:.2f} h projected ({total_upper / 3600:.2f} h if every probe path is recovered "
          f"every step) on {name}; target <= 1 h on one H100")
    return 0


if __name__ == "__main__":
    sys.exit(main())
