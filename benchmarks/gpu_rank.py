"""Ranking on one GPU: throughput of the fast engine at the full protocol, and precision fidelity.

    python benchmarks/gpu_rank.py                 # on a CUDA machine (a section of gpu_check.sh)
    python benchmarks/gpu_rank.py --dry-run       # the same code path on CPU with tiny sizes

1. Throughput: a randomly initialised Track-1 supernet (3x32x32, 100 classes; timing does not
   depend on the weights), synthetic pixels, the full protocol (5,000 recalibration images in
   batches of 128, 10,000 evaluation images), the first ``--candidates`` official candidates
   (default 1,000), fp32; ``--branches 4,8,16`` times the enhanced supernet with one branch per
   width in every stage (the final stage of ``configs/track1_seed.yaml``: no siblings nest). Results stream per group of networks; the timed phase stops after
   ``--throughput-s`` seconds and reports what finished. Printed: candidates/s, the
   prefix-sharing ratio of the timed set and of all 50,000, peak GPU memory against the
   engine's limit, and a PROJECTION (not a measurement) of the time for all 50,000: the
   measured seconds per computed multiply-add times the multiply-adds all 50,000 need.
   With time left, tf32 and bf16 are timed on ``--other-candidates`` the same way after a
   warm-up (Triton's compile and autotuning; tf32 runs the CUDA tensor-core kernel where built);
   ``fp32/class`` and ``tf32/class`` time the engine's ``conv_route="class"`` experiment (one
   cuDNN convolution per chunk of a width class instead of ``multi_conv2d``), ``fp32/img2`` the
   CUDA fp32 kernel with two images per pixel tile (``FASTSUPERNET_CUDA_CONV_IMAGES=2``),
   ``fp32/triton`` and ``tf32/triton`` the engine's ``conv_route="triton"`` (the Triton kernel
   instead of the CUDA kernels; bf16 always runs it), ``fp32/triton_tf32x3`` its fp32 products
   as three TF32 tensor-core products each (``conv_route="triton_tf32x3"``).
2. Fidelity: a supernet trained for a few hundred steps on the bundled Fashion-MNIST subset
   (on the GPU, seconds), ``--tau-candidates`` random candidates (default 200) at the bundled
   data's protocol (1,200 recalibration images, 2,000 test images): Kendall tau of the
   ``--fidelity-runs`` (default tf32 and bf16) vs fp32 accuracies (target >= 0.98), fp32 fast vs the reference engine on the first 30, and a
   candidate's logits alone vs inside the whole set.

Writes a JSON summary with ``--json PATH``. Exit status 1 if a fidelity target is missed.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from fastsupernet import Supernet, SupernetConfig, Track1Space, load_data, read_candidates
from fastsupernet.data import normalize
from fastsupernet.io import official_candidates_path
from fastsupernet.metrics import kendall_tau
from fastsupernet.ranking.engines import Protocol, RankData, make_engine, prefix_sharing, prepare_data

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_kernels import two_image_tiles  # noqa: E402  (the sibling script)

TAU_TARGET = 0.98
_T0 = time.perf_counter()


def _left(args) -> float:
    """Seconds left before ``--deadline-s`` (counted from the start of the script)."""
    return args.deadline_s - (time.perf_counter() - _T0)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _synthetic(dev, recal: int, evals: int, batch: int) -> RankData:
    g = torch.Generator(device="cpu").manual_seed(1)
    return RankData(
        recal_x=torch.randn(recal, 3, 32, 32, generator=g).to(dev),
        eval_x=torch.randn(evals, 3, 32, 32, generator=g).to(dev),
        eval_y=torch.randint(0, 100, (evals,), generator=g).to(dev),
        recal_batch=batch,
    )


def _timed_score(engine, archs, groups, budget_s: float, dev) -> tuple[int, float, list[int]]:
    """Score until done or ``budget_s`` passed, stopping only between ``groups`` (the engine's
    ``candidate_groups(archs)``: a group's results arrive together once it is computed, so every
    group timed is counted whole); (candidates done, seconds, their indices)."""
    ends = set(itertools.accumulate(len(g) for g in groups))
    _sync(dev)
    t0 = time.perf_counter()
    done = []
    for s in engine.score(archs):
        done.append(s.index)
        if len(done) in ends and time.perf_counter() - t0 > budget_s:
            break
    _sync(dev)
    return len(done), time.perf_counter() - t0, done


RUNS = ("fp32", "tf32", "bf16", "fp32/class", "tf32/class", "fp32/img2", "fp32/triton", "tf32/triton",
        "fp32/triton_tf32x3")


def _run_kind(entry: str) -> tuple[str, str]:
    """(precision, conv route) of a --precisions / --fidelity-runs entry such as tf32 or tf32/class
    (fp32/img2: the kernel route with the CUDA fp32 kernel's two-image tiles, see :func:`_run_env`)."""
    precision, _, route = entry.partition("/")
    return precision, "kernel" if route in ("", "img2") else route


def _run_env(entry: str):
    """The environment of a run: the fp32 kernel's two-image tiles for fp32/img2, else unchanged."""
    return two_image_tiles() if entry.endswith("/img2") else contextlib.nullcontext()


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 4,8,16, got {text!r}") from None


def throughput(args, dev, out: dict) -> None:
    torch.manual_seed(0)
    config = SupernetConfig()
    if args.branches:
        config = SupernetConfig.enhanced(branches=args.branches, classifier_branches=args.branches[-1])
    model = Supernet(config=config, in_channels=3, num_classes=100).to(dev)
    every = list(read_candidates(official_candidates_path()).values())
    archs = every[: args.candidates]
    data = _synthetic(dev, args.recal_images, args.eval_images, 128)
    total_all, shared_all = prefix_sharing(model, every)
    out["all_50000"] = {"candidates": len(every), "macs_per_image_total": total_all,
                        "macs_per_image_shared": shared_all, "sharing_ratio": total_all / shared_all}
    print(f"all {len(every)} official candidates: prefix sharing {total_all / shared_all:.3f}x "
          f"({total_all / 1e9:.0f} G -> {shared_all / 1e9:.0f} G multiply-adds per image)")
    # warm-up: CUDA context, cuBLAS, allocator (tiny data, a few candidates)
    warm = _synthetic(dev, 256, 256, 128)
    list(make_engine("fast", model, warm).score(archs[:4]))
    images = data.recal_x.shape[0] + data.eval_x.shape[0]
    rows = []
    budget_end = time.perf_counter() + args.throughput_s
    for entry in args.precisions:
        precision, route = _run_kind(entry)
        n_cand = len(archs) if entry == "fp32" else args.other_candidates
        if precision == "bf16" and dev.type != "cuda":
            print("bf16: skipped (needs CUDA)")
            continue
        left = min(budget_end - time.perf_counter(), _left(args))
        if entry != "fp32" and left < 10:
            print(f"{entry}: skipped (time budget spent)")
            continue
        sub = archs[:n_cand]
        if not sub:
            continue
        try:
            row = _throughput_run(args, dev, model, data, sub, entry, precision, route, budget_end, left, images,
                                  shared_all)
        except Exception as exc:  # noqa: BLE001 (an experiment's failure must not cost the other runs)
            print(f"{entry}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            out.setdefault("failed_runs", []).append(f"throughput {entry}: {type(exc).__name__}: {exc}")
            continue
        rows.append(row)
    out["throughput"] = rows
    if args.profile:
        out["profile"] = profile(model, data, archs[: args.profile], dev, args.profile_precision)


def _throughput_run(args, dev, model, data, sub, entry, precision, route, budget_end, left, images, shared_all):
    """One timed run of the throughput phase; its row (printed)."""
    with _run_env(entry):
        if entry != "fp32":
            # first calls (Triton: compiles, autotuning; cuDNN: algorithm choice) outside the timing:
            # the same candidates, memory limit (hence groups) and batch size as the timed run, on
            # one batch of each kind, so that every call the timed run makes has been made once
            t = time.perf_counter()
            list(make_engine("fast", model, _synthetic(dev, 128, 128, 128), precision=precision,
                             memory_limit_bytes=args.memory_limit, conv_route=route).score(sub))
            _sync(dev)
            print(f"{entry}: warm-up (first calls: Triton compiles and autotunes, cuDNN picks algorithms) "
                  f"{time.perf_counter() - t:.1f} s")
            left = budget_end - time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        engine = make_engine("fast", model, data, precision=precision, memory_limit_bytes=args.memory_limit,
                             conv_route=route)
        budget = args.fp32_s if entry == "fp32" else max(left, 1.0)
        groups = engine.candidate_groups(sub)
        n_done, secs, done = _timed_score(engine, sub, groups, budget, dev)
    finished = [sub[i] for i in done]
    tot, shr = prefix_sharing(model, finished) if finished else (0, 1)
    # what the engine computed: prefixes shared within each group it finished, not across groups
    done_set = set(done)
    computed = sum(prefix_sharing(model, [sub[i] for i in g])[1] for g in groups if done_set.issuperset(g))
    row = {
        "run": entry, "precision": precision, "conv_route": route, "candidates": n_done, "of": len(sub), "seconds": secs,
        "candidates_per_s": n_done / secs, "images": images, "groups": engine.stats.groups,
        "sharing_ratio_timed": tot / shr, "tflops_effective": 2 * computed * images / secs / 1e12,
        "memory_limit_bytes": engine.memory_limit_bytes,
    }
    if dev.type == "cuda":
        row["peak_working_bytes"] = torch.cuda.max_memory_allocated(dev) - base
    # projection: measured seconds per computed multiply-add x what all 50,000 need (shared)
    row["projected_50000_s"] = secs / computed * shared_all if computed else math.nan
    mem = (f", peak working memory {row['peak_working_bytes'] / 2**30:.2f} GiB of a "
           f"{row['memory_limit_bytes'] / 2**30:.2f} GiB limit" if "peak_working_bytes" in row else "")
    tiles = ""
    if route == "class":
        tiles = f" (width classes through F.conv2d, {engine.class_chunk} units per call)"
    elif engine._tf32_cuda:
        tiles = " (CUDA tensor-core kernel multi_conv2d_tf32)"
        row["conv"] = "multi_conv2d_tf32"
    elif engine._triton:
        from fastsupernet.ops.triton_conv import CONFIG_ENV_VAR

        fixed = os.environ.get(CONFIG_ENV_VAR, "")
        how = ("chosen per call from the sm_90 loop counts" if fixed == "static"
               else f"fixed configuration {fixed}" if fixed else "autotuned")
        tiles = f" (Triton tiles: {how})"
        row["triton_config"] = fixed or "autotune"
    print(f"{entry}{tiles}: {n_done}/{len(sub)} candidates x {images} images in {secs:.1f} s = "
          f"{n_done / secs:.2f} candidates/s, {row['tflops_effective']:.1f} TFLOP/s effective, "
          f"prefix sharing of the timed set {tot / shr:.3f}x, {engine.stats.groups} groups{mem}; "
          f"PROJECTED all 50,000: {row['projected_50000_s'] / 60:.1f} min (a projection, not a measurement)")
    return row


TARGET_50000_S = 600.0  # issue target: all 50,000 official candidates in 10 minutes


def verdict(out: dict) -> dict | None:
    """The fastest throughput run whose ranking agrees with fp32 (Kendall tau >= TAU_TARGET in
    the fidelity phase; fp32 itself needs none), its projection against the 10-minute target and
    the ``rank`` command that runs it; None when no run qualifies. A run whose tau was not
    measured is listed as unchecked, never chosen."""
    fid = out.get("fidelity", {})
    ok, unchecked = [], []
    for row in out.get("throughput", []):
        if not math.isfinite(row.get("projected_50000_s", math.nan)):
            continue
        tau = 1.0 if row["run"] == "fp32" else fid.get(f"tau_{row['run']}_vs_fp32")
        if tau is None:
            unchecked.append(row)
        elif tau >= TAU_TARGET:
            ok.append((row, tau))
    if not ok:
        return None
    row, tau = min(ok, key=lambda rt: rt[0]["projected_50000_s"])
    cmd = f"python -m fastsupernet rank --precision {row['precision']}"
    if row["conv_route"] != "kernel":
        cmd += f" --conv-route {row['conv_route']}"
    if row["run"].endswith("/img2"):
        cmd = "FASTSUPERNET_CUDA_CONV_IMAGES=2 " + cmd
    if row.get("triton_config", "autotune") != "autotune":  # the Triton tiles the run was timed with
        cmd = f"FASTSUPERNET_TRITON_CONFIG={row['triton_config']} " + cmd
    return {"run": row["run"], "tau_vs_fp32": tau, "projected_50000_s": row["projected_50000_s"],
            "meets_target": row["projected_50000_s"] <= TARGET_50000_S, "command": cmd,
            "faster_but_unchecked": [r["run"] for r in unchecked if r["projected_50000_s"] < row["projected_50000_s"]]}


def profile(model, data, archs, dev, precision: str = "fp32") -> list[dict]:
    """The fast engine on ``archs`` under torch.profiler: the GPU kernels that take its time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine = make_engine("fast", model, data, precision=precision)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    _sync(dev)
    t = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        list(engine.score(archs))
        _sync(dev)
    wall = time.perf_counter() - t

    def self_time(e) -> float:  # microseconds of the event's own work on the device (CPU: on the host)
        if dev.type == "cuda":
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    def on_device(e) -> bool:  # CUDA: kernels and copies only (an op's own entry repeats its kernels' time)
        return dev.type != "cuda" or str(getattr(e, "device_type", "CUDA")).endswith("CUDA")

    events = [e for e in prof.key_averages() if self_time(e) > 0 and on_device(e)]
    total = sum(self_time(e) for e in events)
    rows = []
    for e in sorted(events, key=self_time, reverse=True)[:15]:
        us = self_time(e)
        rows.append({"name": e.key[:90], "calls": e.count, "ms": us / 1e3, "share": us / total if total else 0.0})
    print(f"profile: {precision} fast engine, {len(archs)} candidates, {wall:.1f} s wall under the profiler, "
          f"{total / 1e6:.2f} s of device kernels")
    for r in rows:
        print(f"  {r['share'] * 100:5.1f}% {r['ms']:9.1f} ms {r['calls']:7d} calls  {r['name']}")
    return rows


def _train_mini(dev, steps: int) -> tuple[Supernet, object]:
    """A Track-1 supernet trained briefly on the bundled Fashion-MNIST subset (largest + random paths)."""
    data = load_data("fashion-mnist")
    info = data.info
    torch.manual_seed(0)
    model = Supernet(in_channels=info.in_channels, num_classes=info.num_classes).to(dev)
    space = model.space
    x_all = normalize(data.train_images, info, device=dev)
    y_all = data.train_labels.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rng = random.Random(0)
    g = torch.Generator(device="cpu").manual_seed(0)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (128,), generator=g).to(dev)
        arch = space.largest() if step % 2 == 0 else space.sample(rng)
        loss = F.cross_entropy(model(x_all[idx], arch), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, data


def fidelity(args, dev, out: dict) -> bool:
    if _left(args) < 30:
        print(f"fidelity: NOT RUN (deadline --deadline-s {args.deadline_s:.0f} s near)")
        out["fidelity"] = {"not_run": "deadline"}
        return False
    t = time.perf_counter()
    model, data = _train_mini(dev, args.train_steps)
    _sync(dev)
    print(f"fidelity: trained {args.train_steps} steps in {time.perf_counter() - t:.1f} s")
    protocol = Protocol(recal_images=args.tau_recal, eval_images=args.tau_eval)
    rd = prepare_data(data, protocol, dev)
    archs = Track1Space().sample_many(args.tau_candidates, seed=7)
    scores, not_run = {}, []
    for entry in ["fp32"] + [e for e in args.fidelity_runs if e != "fp32"]:
        precision, route = _run_kind(entry)
        if precision == "bf16" and dev.type != "cuda":
            continue
        if entry != "fp32" and _left(args) < 15:
            print(f"fidelity: {entry} NOT RUN (deadline --deadline-s {args.deadline_s:.0f} s near)")
            not_run.append(entry)
            continue
        t = time.perf_counter()
        try:
            with _run_env(entry):
                eng = make_engine("fast", model, rd, precision=precision, conv_route=route)
                scores[entry] = sorted(eng.score(archs), key=lambda s: s.index)
                _sync(dev)
        except Exception as exc:  # noqa: BLE001 (reported; the other runs go on)
            if entry == "fp32":
                raise
            print(f"fidelity: {entry} FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            out.setdefault("failed_runs", []).append(f"fidelity {entry}: {type(exc).__name__}: {exc}")
            continue
        print(f"fidelity: fast {entry} on {len(archs)} candidates in {time.perf_counter() - t:.1f} s")
    ok = True
    res = {"candidates": len(archs), "protocol": protocol.to_dict(), "precisions_not_run": not_run}
    acc32 = [s.acc for s in scores["fp32"]]
    for precision in scores:
        if precision == "fp32":
            continue
        acc = [s.acc for s in scores[precision]]
        tau = kendall_tau(acc32, acc)
        res[f"tau_{precision}_vs_fp32"] = tau
        res[f"max_abs_acc_diff_{precision}"] = max(abs(a - b) for a, b in zip(acc32, acc))
        good = tau >= TAU_TARGET
        ok &= good
        print(f"fidelity: Kendall tau {precision} vs fp32 = {tau:.4f} (target >= {TAU_TARGET}: "
              f"{'met' if good else 'MISSED'}), largest accuracy change {res[f'max_abs_acc_diff_{precision}']:.4f}")
    n_ref = min(args.ref_candidates, len(archs)) if _left(args) > 10 else 2
    t = time.perf_counter()
    ref = sorted(make_engine("reference", model, rd).score(archs[:n_ref]), key=lambda s: s.index)
    _sync(dev)
    ref_s = time.perf_counter() - t
    tau_ref = kendall_tau([s.acc for s in ref], acc32[:n_ref])
    diff = max(abs(a.acc - b.acc) for a, b in zip(ref, scores["fp32"]))
    res.update(tau_fast_vs_reference=tau_ref, max_abs_acc_diff_fast_vs_reference=diff, reference_seconds=ref_s,
               reference_candidates=n_ref)
    good = not (tau_ref < 0.99) and diff <= 2 / rd.eval_x.shape[0]
    ok &= good
    print(f"fidelity: fp32 fast vs reference on {n_ref} candidates: tau {tau_ref:.4f}, largest accuracy "
          f"difference {diff:.5f} ({'ok' if good else 'MISSED'}); reference took {ref_s:.1f} s "
          f"({n_ref / ref_s:.2f} candidates/s at this protocol)")
    x = rd.eval_x[:256]
    group = archs[:50]
    k = len(group) // 2
    for route in ["kernel"] + (["class"] if any(_run_kind(e)[1] == "class" for e in scores) else []):
        fast = make_engine("fast", model, rd, conv_route=route)
        together = fast._logits(group, x)
        alone = fast._logits([group[k]], x)[0]
        d = (alone - together[k]).abs().max().item()
        res["independence_max_abs_logit_diff" + ("" if route == "kernel" else "_class")] = d
        print(f"fidelity ({route} route): a candidate's logits alone vs among {len(group)}: largest difference {d:.3g}")
    out["fidelity"] = res
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the code path only")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--other-candidates", type=int, default=300, help="candidates timed in tf32 and bf16")
    p.add_argument("--recal-images", type=int, default=5000)
    p.add_argument("--eval-images", type=int, default=10000)
    p.add_argument("--fp32-s", type=float, default=40.0, help="stop the fp32 timing at the first group boundary after this many seconds")
    p.add_argument("--throughput-s", type=float, default=60.0, help="time for the whole throughput phase")
    p.add_argument("--branches", default=(), type=_int_list,
                   help="throughput supernet: enhanced with these branches per stage, e.g. 4,8,16 (default: one group)")
    p.add_argument("--memory-limit", type=int, default=16 << 30, help="fast engine working memory, bytes")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--tau-candidates", type=int, default=200)
    p.add_argument("--tau-recal", type=int, default=None, help="recalibration images (default: the whole split)")
    p.add_argument("--tau-eval", type=int, default=None, help="test images (default: all)")
    p.add_argument("--ref-candidates", type=int, default=30)
    p.add_argument("--deadline-s", type=float, default=1e9,
                   help="skip the remaining precisions once fewer than ~15 s of this budget are left")
    p.add_argument("--precisions", default="fp32,tf32,bf16",
                   help="comma-separated runs of the throughput phase, in the order they are timed: fp32, tf32, "
                        "bf16, or fp32/class, tf32/class (the fast engine's conv_route='class' experiment), "
                        "fp32/triton, tf32/triton (conv_route='triton'), fp32/triton_tf32x3, fp32/img2")
    p.add_argument("--fidelity-runs", default="tf32,bf16",
                   help="comma-separated runs whose Kendall tau vs fp32 the fidelity phase measures "
                        "(same names as --precisions)")
    p.add_argument("--triton-config", default=None,
                   help="Triton tiles instead of autotuning (FASTSUPERNET_TRITON_CONFIG): the index of one fixed "
                        "configuration, or 'static' (per call, from the sm_90 loop counts): fewer compiles")
    p.add_argument("--profile", type=int, default=0, help="profile the fast engine on this many candidates")
    p.add_argument("--profile-precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="the precision --profile runs (default fp32)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-fidelity", action="store_true")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    for name in ("precisions", "fidelity_runs"):
        runs = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        unknown = [v for v in runs if v not in RUNS]
        if unknown:
            p.error(f"--{name.replace('_', '-')}: unknown {', '.join(unknown)} (expected {', '.join(RUNS)})")
        setattr(args, name, runs)
    if args.triton_config is not None:
        from fastsupernet.ops.triton_conv import CONFIG_ENV_VAR

        os.environ[CONFIG_ENV_VAR] = args.triton_config
    if args.dry_run:
        dev = torch.device("cpu")
        args.candidates, args.other_candidates = min(args.candidates, 6), min(args.other_candidates, 4)
        args.recal_images, args.eval_images = 128, 64
        args.fp32_s, args.throughput_s = 600.0, 600.0
        args.memory_limit = 256 << 20
        args.train_steps, args.tau_candidates = 4, 8
        args.tau_recal, args.tau_eval, args.ref_candidates = 32, 64, 3
    else:
        if not torch.cuda.is_available():
            print("gpu_rank: no CUDA GPU (use --dry-run on CPU)", file=sys.stderr)
            return 2
        dev = torch.device("cuda")
        print(f"gpu_rank: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    out: dict = {"device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev)}
    t0 = time.perf_counter()
    ok = True
    if not args.skip_throughput:
        throughput(args, dev, out)
    if not args.skip_fidelity:
        ok = fidelity(args, dev, out)
    best = verdict(out)
    if best is not None:
        out["verdict"] = best
        print(f"gpu_rank: fastest run that ranks like fp32: {best['run']} (tau {best['tau_vs_fp32']:.4f}), "
              f"PROJECTED all 50,000 in {best['projected_50000_s'] / 60:.1f} min (target {TARGET_50000_S / 60:.0f} "
              f"min: {'met' if best['meets_target'] else 'NOT met'}); run it with: {best['command']}"
              + (f"; faster, fidelity not measured: {', '.join(best['faster_but_unchecked'])}"
                 if best["faster_but_unchecked"] else ""))
    out["seconds"] = time.perf_counter() - t0
    print(f"gpu_rank: done in {out['seconds']:.0f} s{'' if ok else ' (a fidelity target was MISSED)'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if out.get("failed_runs"):
        print("gpu_rank: FAILED runs: " + "; ".join(r.splitlines()[0][:160] for r in out["failed_runs"]))
        return 1
    return 0 if ok or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())
