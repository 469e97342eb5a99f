"""What bounds the multi_conv2d kernels: Nsight Compute's counters for one launch of each.

    python benchmarks/gpu_ncu.py             # on the GPU, ncu on PATH: runs itself under ncu, prints a table
    python benchmarks/gpu_ncu.py --dry-run   # CPU, tiny shapes: the launches only (no ncu), a code-path check

The event timings of gpu_kernels.py say how far each kernel is from its floor, not why. This
script launches each variant once on Track-1 layers (batch 256, K = 128 random candidates, the
layers of gpu_kernels.py: 32x32 with widths <= 16 and 8x8 with widths <= 64), after a warm-up
call (compilation, autotuning), between cudaProfilerStart and cudaProfilerStop, under

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section LaunchStats
        --section Occupancy --section ComputeWorkloadAnalysis --section WarpStateStats
        --metrics <stall reasons, shared-memory wavefronts and bank conflicts, pipe utilisation>

(clocks left as the card runs them), and prints per variant and layer: duration, SM and
memory throughput, issue slots busy, achieved occupancy, registers, the FMA / tensor pipes'
utilisation, shared-memory load wavefronts per instruction and bank conflicts, warp cycles per
issued instruction and the three largest stall reasons. Variants: ``cuda`` (the fp32 CUDA
kernel), ``cuda2img`` (its two-image tiles), ``tf32`` (the CUDA TF32 tensor-core kernel),
``triton_cl_tf32x3`` (the Triton kernel on channels_last fp32, each product three TF32 ones)
and ``triton_cl_bf16`` (Triton, channels_last bfloat16), Triton's tiles chosen per layer from
its sm_90 loop counts (``--triton-config``, default ``static``) rather than autotuned. A variant that fails is reported and skipped.
Exit status: 2 without a GPU or ncu, 1 when ncu fails, else 0.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_kernels import env_setting, make_case, two_image_tiles  # noqa: E402

LAYERS = [(32, 16), (8, 64)]
K = 128
BATCH = 256
VARIANTS = ("cuda", "cuda2img", "tf32", "triton_cl_tf32x3", "triton_cl_bf16")
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "ComputeWorkloadAnalysis", "WarpStateStats")
METRICS = (
    r"regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$",
    r"regex:^l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld\.sum$",
    r"regex:^l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld\.sum$",
    r"regex:^smsp__inst_executed_op_shared_ld\.sum$",
    r"regex:^sm__pipe_(fma|tensor|shared|alu).*_cycles_active\.avg\.pct_of_peak_sustained_active$",
)
STALL_PREFIX = "smsp__average_warps_issue_stalled_"


def _variant_call(name: str, case, device: str, triton_config: str) -> tuple[Callable[[], object], str]:
    """A zero-argument function making the variant's one kernel launch on ``case``, and what runs it."""
    args = case.op_args()
    triton = name.startswith("triton")
    if device != "cuda" and not (triton and _interpreted()):
        # --dry-run: the CPU kernel stands in for the CUDA variants (and for Triton's without
        # TRITON_INTERPRET=1, under which the Triton variants run through the interpreter)
        return (lambda: torch.ops.fastsupernet.multi_conv2d(*args)), "CPU kernel stand-in"
    if name in ("cuda", "cuda2img"):
        op = torch.ops.fastsupernet.multi_conv2d
        if name == "cuda":
            return (lambda: op(*args)), "CUDA kernel"

        def two():
            with two_image_tiles():
                return op(*args)

        return two, "CUDA kernel, two-image tiles"
    if name == "tf32":
        return (lambda: torch.ops.fastsupernet.multi_conv2d_tf32(*args)), "CUDA TF32 kernel"
    from fastsupernet.ops.triton_conv import CONFIG_ENV_VAR, multi_conv2d_triton

    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    if dtype == torch.bfloat16 and device != "cuda":
        dtype = torch.float16  # the interpreter has no bfloat16 arithmetic
    precision = "tf32x3" if name.endswith("tf32x3") else "ieee"
    x = case.x.to(dtype).contiguous(memory_format=torch.channels_last)
    w = case.weight.to(dtype).contiguous(memory_format=torch.channels_last)
    rest = list(args[2:])

    def tri():
        with env_setting(CONFIG_ENV_VAR, triton_config):
            return multi_conv2d_triton(x, w, *rest, input_precision=precision)

    return tri, f"Triton {'interpreter' if device != 'cuda' else 'kernel'}, {dtype}, {precision}"


def _interpreted() -> bool:
    try:
        from fastsupernet.ops import triton_conv
    except ImportError:
        return False
    return triton_conv._interpreted()


def launch(variants: Iterable[str], layers, k: int, batch: int, device: str, triton_config: str,
           manifest: Path | None) -> list[str]:
    """Warm every variant up, then launch each once inside the profiler range; the labels of the
    launches made, in order (also written to ``manifest``)."""
    from fastsupernet.ops import _extension

    _extension.require()  # registers torch.ops.fastsupernet.*
    calls: list[tuple[str, Callable[[], object]]] = []
    for hw, width in layers:
        case = make_case(hw, width, k, batch, device, seed=0)
        for name in variants:
            label = f"{name} {case.name} K={k}"
            try:
                fn, how = _variant_call(name, case, device, triton_config)
                fn()  # warm-up: compile, autotune, load modules
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 (reported; the other variants go on)
                print(f"gpu_ncu: {label}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
                continue
            calls.append((label if device == "cuda" else f"{label} [{how}]", fn))
    profiler = torch.cuda.profiler if device == "cuda" else None
    with profiler.profile() if profiler is not None else contextlib.nullcontext():
        for _, fn in calls:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
    labels = [label for label, _ in calls]
    if manifest is not None:
        manifest.write_text(json.dumps(labels))
    return labels


def parse_details(text: str) -> dict[int, dict]:
    """ncu's ``--csv --page details`` output: per launch ID, its kernel name and metrics
    {metric name: (unit, value as printed)}."""
    start = text.find('"ID"')
    rows = csv.DictReader(io.StringIO(text[start:] if start >= 0 else ""))
    out: dict[int, dict] = {}
    for row in rows:
        try:
            launch_id = int(row["ID"])
        except (KeyError, TypeError, ValueError):
            continue
        entry = out.setdefault(launch_id, {"kernel": row.get("Kernel Name", ""), "metrics": {}})
        entry["metrics"][row.get("Metric Name", "")] = (row.get("Metric Unit", ""), row.get("Metric Value", ""))
    return out


def _number(value: str) -> float | None:
    try:
        return float(value.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def summary(metrics: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """The figures that say what bounds a kernel, as (label, value) pairs, from one launch's metrics."""

    def get(name: str) -> str:
        unit, value = metrics.get(name, ("", ""))
        if not value:
            return "n/a"
        return f"{value} {unit}".strip() if unit not in ("", "%") else f"{value}{unit}"

    rows = [(label, get(name)) for label, name in (
        ("duration", "Duration"), ("SM throughput", "Compute (SM) Throughput"),
        ("memory throughput", "Memory Throughput"), ("issue slots busy", "Issue Slots Busy"),
        ("executed IPC", "Executed Ipc Active"), ("achieved occupancy", "Achieved Occupancy"),
        ("theoretical occupancy", "Theoretical Occupancy"), ("registers/thread", "Registers Per Thread"),
        ("block", "Block Size"), ("warp cycles/issued instr", "Warp Cycles Per Issued Instruction"),
    )]
    for name, (_, value) in sorted(metrics.items()):
        if name.startswith("sm__pipe_") and name.endswith("pct_of_peak_sustained_active"):
            rows.append((name.removeprefix("sm__").removesuffix(".avg.pct_of_peak_sustained_active"), f"{value}%"))
    loads = _number(metrics.get("smsp__inst_executed_op_shared_ld.sum", ("", ""))[1])
    waves = _number(metrics.get("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum", ("", ""))[1])
    conflicts = _number(metrics.get("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum", ("", ""))[1])
    if loads and waves is not None:
        rows.append(("shared-load wavefronts/instr", f"{waves / loads:.2f}"))
    if conflicts is not None and waves:
        rows.append(("shared-load bank conflicts", f"{conflicts:.3g} ({100 * conflicts / waves:.0f}% of wavefronts)"))
    stalls = []
    for name, (_, value) in metrics.items():
        v = _number(value)
        if name.startswith(STALL_PREFIX) and v is not None:
            stalls.append((v, name.removeprefix(STALL_PREFIX).removesuffix("_per_issue_active.ratio")))
    if stalls:
        stalls.sort(reverse=True)
        rows.append(("largest stalls (cycles/issue)", ", ".join(f"{n} {v:.2f}" for v, n in stalls[:3])))
    return rows


def print_table(labels: list[str], details: dict[int, dict]) -> None:
    """One markdown table: a row per figure, a column per profiled launch (the conv kernels in
    launch order, one per label)."""
    convs = [details[i] for i in sorted(details) if "conv" in details[i]["kernel"].lower()]
    if len(convs) != len(labels):
        print(f"gpu_ncu: {len(convs)} conv kernels profiled for {len(labels)} launches: columns may be misnamed")
    cols = [(label, summary(d["metrics"])) for label, d in zip(labels, convs)]
    if not cols:
        print("gpu_ncu: ncu reported no kernels")
        return
    names = [label for label, _ in cols[0][1]]
    for _, rows in cols[1:]:
        names += [label for label, _ in rows if label not in names]
    print("| figure | " + " | ".join(label for label, _ in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(dict(rows).get(name, "n/a") for _, rows in cols) + " |")
    for label, d in zip(labels, convs):
        print(f"{label}: kernel {d['kernel'][:100]}")


def _ncu_command(ncu: str, report: Path, inner: list[str], metrics: bool) -> list[str]:
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--target-processes", "all",
           "--kernel-name", "regex:conv", "--force-overwrite", "--export", str(report)]
    for s in SECTIONS:
        cmd += ["--section", s]
    if metrics:
        cmd += ["--metrics", ",".join(METRICS)]
    return cmd + inner


def _run_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` in a process group of its own, all of it killed when ``timeout`` passes (ncu's
    profiled child must not outlive this script and hold the GPU into the next step)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\ngpu_ncu: killed after {timeout:.0f} s"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def profile(args) -> int:
    ncu = shutil.which("ncu")
    if ncu is None:
        print("gpu_ncu: ncu (Nsight Compute) is not on PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        manifest, report = Path(tmp) / "launches.json", Path(tmp) / "conv"
        inner = [sys.executable, str(Path(__file__).resolve()), "--launch", "--manifest", str(manifest),
                 "--variants", ",".join(args.variants), "--triton-config", args.triton_config]
        deadline = time.monotonic() + args.timeout_s  # for both tries and the import
        for metrics in (True, False):  # a metric this ncu does not know fails the run: once more without them
            proc = _run_group(_ncu_command(ncu, report, inner, metrics), deadline - time.monotonic())
            print(proc.stdout[-3000:], end="")
            if proc.returncode == 0:
                break
            print(f"gpu_ncu: ncu exited {proc.returncode}{' (retrying without --metrics)' if metrics else ''}:\n"
                  f"{proc.stderr[-2000:]}", file=sys.stderr)
        else:
            return 1
        rep = report.with_suffix(".ncu-rep")
        out = _run_group([ncu, "--import", str(rep), "--csv", "--page", "details"], deadline - time.monotonic())
        if out.returncode != 0:
            print(f"gpu_ncu: ncu --import failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        labels = json.loads(manifest.read_text())
        print_table(labels, parse_details(out.stdout))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no ncu: the launch path only")
    p.add_argument("--launch", action="store_true", help="(internal) the launches ncu profiles")
    p.add_argument("--manifest", type=Path, default=None, help="(internal) where --launch lists its launches")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--triton-config", default="static",
                   help="Triton tiles (FASTSUPERNET_TRITON_CONFIG): 'static' (default, per layer) or an index")
    p.add_argument("--timeout-s", type=float, default=240.0, help="limit for the profiled runs and the report")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (expected {', '.join(VARIANTS)})")
    if args.dry_run:
        labels = launch(args.variants, [(6, 8)], 3, 2, "cpu", args.triton_config, args.manifest)
        print(f"gpu_ncu: dry run, {len(labels)} launches: {'; '.join(labels)}")
        return 0 if len(labels) == len(args.variants) else 1
    if not torch.cuda.is_available():
        print("gpu_ncu: no CUDA GPU (use --dry-run on CPU)", file=sys.stderr)
        return 2
    if args.launch:
        launch(args.variants, LAYERS, K, BATCH, "cuda", args.triton_config, args.manifest)
        return 0
    print(f"gpu_ncu: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    return profile(args)


if __name__ == "__main__":
    sys.exit(main())
