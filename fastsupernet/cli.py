"""Command-line interface: ``python -m fastsupernet COMMAND ...``.

Each command is one ``_add_<name>`` function that registers its subparser and one
``cmd_<name>(args) -> int`` that runs it; :data:`COMMANDS` lists the registrars in help order.
Bad input ends with a one-line ``error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np

from . import io as fio
from .space import Arch, ChannelSpace, get_space
from .ranking.engines import CONV_ROUTES

__all__ = ["main", "build_parser", "CLIError", "COMMANDS"]

EXIT_BAD_INPUT = 2

_DATA_HELP = (
    "a JSON (or .json.gz) challenge file; the literal 'official' names the bundled 50,000 official "
    "Track-1 candidates and 'gt1000' the bundled ground truth of arch1..arch1000 "
    "(write ./official for a file of that name)"
)


class CLIError(Exception):
    """Bad input detected by a command; reported as ``error: ...`` with exit status 2."""


def _print_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, allow_nan=False) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="rank correlation of predicted accuracies with the ground truth",
        description=(
            "Compare predicted accuracies with ground-truth accuracies over the ids both files hold "
            "with the same architecture, and print one JSON object: kendall_tau (tau-b), spearman, "
            "pearson, top10_overlap, n (ids scored), missing (ground-truth ids absent from the "
            "prediction) and mismatched (ids whose architecture strings differ). "
            "Accuracies in percent are recognised and converted."
        ),
    )
    p.add_argument("pred", metavar="PRED.json", help="predictions {id: {arch, acc}}; " + _DATA_HELP)
    p.add_argument("gt", metavar="GT.json", help="ground truth {id: {arch, acc}}; " + _DATA_HELP)
    p.add_argument("--k", type=int, default=10, help="also report top{k}_overlap when k is not 10 (default 10)")
    p.add_argument("--space", default="track1", help="search space of the architectures (default track1)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate

    if args.k < 1:
        raise CLIError(f"--k must be >= 1, got {args.k}")
    space = get_space(args.space)
    pred = fio.read_scores(fio.resolve_data_path(args.pred), space)
    gt = fio.read_scores(fio.resolve_data_path(args.gt), space)
    _print_json(evaluate(pred, gt, k=args.k).to_json_dict())
    return 0


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    """Space and network shape options shared by the commands that count costs."""
    p.add_argument("--space", default="track1", help="search space (default track1)")
    p.add_argument("--resolution", type=int, default=32, help="input height and width (default 32)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--num-classes", type=int, default=100, help="classifier outputs (default 100)")


def _read_archs(args: argparse.Namespace) -> tuple[ChannelSpace, dict[str, Arch]]:
    """Check the shape options, then read the command's ARCHS file (never empty)."""
    for name in ("resolution", "in_channels", "num_classes"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    space = get_space(args.space)
    path = fio.resolve_data_path(args.archs)
    archs = fio.read_candidates(path, space)
    if not archs:
        raise CLIError(f"{path}: holds no architectures")
    return space, archs


# ---------------------------------------------------------------------------- space
def _add_space(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "space",
        help="count and cost statistics of a list of architectures",
        description=(
            "Parse every architecture of a challenge file and print one JSON object: count, "
            "unique_networks (distinct network widths, trailing positions ignored), and the min, "
            "mean and max of MACs and parameters. Defaults are Track-1 CIFAR-100 shapes (32x32 "
            "input, 3 channels, 100 classes) with a 1x1 shortcut conv in every block."
        ),
    )
    p.add_argument("archs", metavar="ARCHS.json", help="architectures {id: {arch, ...}}; " + _DATA_HELP)
    _add_shape_args(p)
    p.add_argument(
        "--shortcut",
        choices=("all", "projection"),
        default="all",
        help="'all': a 1x1 conv shortcut in every block (default); 'projection': only where the "
        "stride or width changes",
    )
    p.set_defaults(func=cmd_space)


def cmd_space(args: argparse.Namespace) -> int:
    space, cands = _read_archs(args)
    archs = list(cands.values())
    macs, params = space.costs(
        archs,
        resolution=args.resolution,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        shortcut=args.shortcut,
    )
    _print_json(
        {
            "count": len(archs),
            "unique_networks": len({a.widths for a in archs}),
            "macs_min": int(macs.min()),
            "macs_mean": float(macs.mean()),
            "macs_max": int(macs.max()),
            "params_min": int(params.min()),
            "params_mean": float(params.mean()),
            "params_max": int(params.max()),
        }
    )
    return 0


# ---------------------------------------------------------------------------- proxy
def _add_proxy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "proxy",
        help="score architectures with a zero-training proxy (channels, params, macs)",
        description=(
            "Write a submission that predicts each architecture's accuracy from its size alone: the "
            "sum of its widths, its parameter count or its multiply-adds (Track-1 CIFAR-100 shapes by "
            "default). 'acc' holds the proxy scaled linearly into [0, 1], which keeps Kendall tau, "
            "Spearman and Pearson unchanged; _meta records the proxy and its range. These are the "
            "baselines a supernet ranking has to beat."
        ),
    )
    p.add_argument("archs", metavar="ARCHS.json", help="architectures {id: {arch, ...}}; " + _DATA_HELP)
    p.add_argument("--by", choices=("channels", "params", "macs"), default="params", help="the proxy (default params)")
    p.add_argument("--out", required=True, metavar="OUT.json", help="submission to write (atomically)")
    _add_shape_args(p)
    p.set_defaults(func=cmd_proxy)


def cmd_proxy(args: argparse.Namespace) -> int:
    from .metrics import proxy_scores

    space, cands = _read_archs(args)
    raw = proxy_scores(
        list(cands.values()), args.by, space, resolution=args.resolution, in_channels=args.in_channels,
        num_classes=args.num_classes,
    )
    lo, hi = float(raw.min()), float(raw.max())
    scaled = (raw - lo) / (hi - lo) if hi > lo else np.full_like(raw, 0.5)
    scores = {k: {"arch": str(a), "acc": float(v)} for (k, a), v in zip(cands.items(), scaled)}
    meta = {
        "proxy": args.by,
        "acc": "proxy scaled linearly into [0, 1]: (value - min) / (max - min)",
        "min": lo,
        "max": hi,
        "shape": {"resolution": args.resolution, "in_channels": args.in_channels, "num_classes": args.num_classes},
        "source": str(fio.resolve_data_path(args.archs)),
    }
    fio.write_submission(args.out, scores, meta=meta, space=space)
    _print_json({"out": str(args.out), "count": len(scores), "proxy": args.by})
    return 0


# ---------------------------------------------------------------------------- groundtruth
def _add_groundtruth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "groundtruth",
        help="train candidates stand-alone from scratch: the ground truth for ranking studies",
        description=(
            "Train every listed architecture from scratch as its own network with one recipe "
            "(YAML, see fastsupernet.standalone) and each seed; write a challenge-shape file whose "
            "'acc' is the mean test accuracy over seeds ('accs'/'losses' per seed, recipe and seeds "
            "under _meta). Finished trainings stream to OUT.journal; --resume skips them. Prints "
            "{out, candidates, trained, reused}."
        ),
    )
    p.add_argument("--archs", required=True, metavar="ARCHS.json", help="architectures {id: {arch, ...}}; " + _DATA_HELP)
    p.add_argument("--out", required=True, metavar="GT.json", help="ground-truth file to write (atomically)")
    p.add_argument("--config", default=None, metavar="RECIPE.yaml", help="training recipe (default: built-in defaults)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its journal")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--space", default="track1", help="search space of the architectures (default track1)")
    p.add_argument("--pack", type=int, default=1, metavar="K",
                   help="train up to K candidates of a seed at once through multi_conv2d (default 1: one at a time)")
    p.set_defaults(func=cmd_groundtruth)


def cmd_groundtruth(args: argparse.Namespace) -> int:
    from .standalone import groundtruth

    space = get_space(args.space)
    path = fio.resolve_data_path(args.archs)
    cands = fio.read_candidates(path, space)
    if not cands:
        raise CLIError(f"{path}: holds no architectures")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if args.pack < 1:
        raise CLIError(f"--pack must be a positive integer, got {args.pack}")
    res = groundtruth(cands, args.out, args.config, seeds=seeds, space=space, resume=args.resume,
                      progress=not args.no_progress, pack=args.pack)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun, rank 0 reports
        _print_json({"out": str(res.out), "candidates": len(cands), "trained": res.trained, "reused": res.reused})
    return 0


# ---------------------------------------------------------------------------- rank
_BYTE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_bytes(text: str) -> int:
    """``4GiB``, ``512MiB``, ``2GB`` or a plain number of bytes."""
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num) * _BYTE_UNITS[unit]
    except (ValueError, KeyError):
        raise CLIError(f"--memory-limit {text!r}: expected bytes such as 4GiB, 512MiB, 2GB or 1000000") from None
    if value < 1:
        raise CLIError(f"--memory-limit {text!r} must be positive")
    return int(value)


def _add_rank(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rank",
        help="score candidates with a trained supernet checkpoint (BN recalibration, then test accuracy)",
        description=(
            "Score every candidate of ARCHS.json with the checkpoint: per distinct network, reset BN "
            "statistics, re-estimate them on the recalibration split in train mode, then measure top-1 "
            "accuracy and mean cross-entropy on the test split (README, 'Ranking'). Writes OUT.json, a "
            "submission {id: {arch, acc, loss}} with _meta (checkpoint sha256, protocol, data, engine, "
            "precision, counts, seconds), atomically; results stream to OUT.json.journal as they finish, "
            "so --resume continues a killed run. Under torchrun every rank scores a shard and rank 0 "
            "writes OUT.json. Prints {out, candidates, unique, computed, resumed, seconds, "
            "candidates_per_s, macs_per_image_total, macs_per_image_computed, prefix_sharing_saved, "
            "engine, precision, conv_route, world_size}."
        ),
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="trained supernet checkpoint")
    p.add_argument("--archs", required=True, metavar="ARCHS.json", help="candidates {id: {arch, ...}}; " + _DATA_HELP)
    p.add_argument("--out", required=True, metavar="OUT.json", help="submission to write (atomically)")
    p.add_argument("--data", default=None, metavar="SPEC", help="data spec NAME[:PATH] (default: the checkpoint's)")
    p.add_argument("--recal-images", type=int, default=None, metavar="N",
                   help="first N images of the recalibration split (default: all of it, 10%% of the training set)")
    p.add_argument("--recal-batch", type=int, default=128, metavar="B", help="recalibration batch size (default 128)")
    p.add_argument("--eval-images", type=int, default=None, metavar="M",
                   help="first M test images (default: the whole test split)")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast", help="engine (default fast)")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32", help="arithmetic (default fp32)")
    p.add_argument("--conv-route", choices=CONV_ROUTES, default="kernel",
                   help="how the fast engine runs its convolutions on a GPU: kernel (default; the compiled kernel of "
                        "the precision), triton (the Triton kernel at every precision), triton_tf32x3 (fp32 as three "
                        "TF32 tensor-core products) or class (one cuDNN conv per width class)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its journal(s)")
    p.add_argument("--force", action="store_true", help="discard an earlier run's OUT.json and journals and start over")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--memory-limit", default=None, metavar="BYTES",
                   help="peak memory the fast engine may plan for, e.g. 8GiB (default: half the free GPU memory, or 1GiB on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar and no summary line on stderr")
    p.set_defaults(func=cmd_rank)


def cmd_rank(args: argparse.Namespace) -> int:
    from .ranking import rank

    if args.resume and args.force:
        raise CLIError("--resume and --force exclude each other")
    memory = _parse_bytes(args.memory_limit) if args.memory_limit is not None else None
    res = rank(
        args.checkpoint, args.archs, args.out, data=args.data, recal_images=args.recal_images,
        recal_batch=args.recal_batch, eval_images=args.eval_images, engine=args.engine,
        precision=args.precision, conv_route=args.conv_route, resume=args.resume, force=args.force, device=args.device,
        memory_limit=memory, progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0") or 0) == 0:
        _print_json(res.to_json_dict())
    return 0


# ---------------------------------------------------------------------------- train / init
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a supernet with the multi-stage pipeline a YAML config describes",
        description=(
            "Run the stages of FILE.yaml (configs/ holds presets; configs/README.md lists every key). "
            "The run folder gets config.yaml, checkpoints/ (written atomically every "
            "checkpoint.every_steps steps and at each epoch end), stage<i>-<name>.pt, final.pt and "
            "metrics.jsonl. --resume continues from the newest checkpoint exactly as an uninterrupted "
            "run would go on; a different config is refused naming the keys that differ. Under "
            "torchrun every rank trains on its shard of each batch (gloo on CPU, NCCL on GPU). "
            "Prints {run_dir, final_checkpoint, stage_checkpoints, metrics, global_step, resumed_from}. "
            "A NaN or infinite loss stops the run (exit status 1) and keeps the last good checkpoint."
        ),
    )
    p.add_argument("--config", required=True, metavar="FILE.yaml", help="training config")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default: the config's out, else runs/<config stem>)")
    p.add_argument("--data", default=None, metavar="SPEC", help="data spec NAME[:PATH] replacing the config's data")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue the run: from the newest checkpoint of the run folder, or from CKPT")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainingDiverged, train

    try:
        res = train(args.config, out=args.out, resume=args.resume, data=args.data)
    except TrainingDiverged as e:
        sys.stderr.write(f"error: {_one_line(e)}\n")
        return 1
    if int(os.environ.get("RANK", "0") or 0) == 0:
        _print_json(res.to_json_dict())
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="write an untrained supernet checkpoint (the first stage of a config, or a plain supernet)",
        description=(
            "Write the supernet of FILE.yaml's first stage before any training (seeded by the "
            "config's seed), or with --space/--data a fully shared supernet (--enhanced: candidates "
            "enhancement; --branches: branch counts per stage), with the data description inside. "
            "Prints {out, space, data, branches, classifier_branches, parameters}."
        ),
    )
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="training config whose first stage to write")
    p.add_argument("--space", default=None, help="search space when there is no --config (default track1)")
    p.add_argument("--data", default=None, metavar="SPEC", help="data spec NAME[:PATH] (replaces the config's)")
    p.add_argument("--branches", default=None, metavar="G1,G2,...", help="branch counts per stage without --config (default all 1)")
    p.add_argument("--enhanced", action="store_true", help="candidates enhancement without --config")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed without --config (default 0)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint to write (atomically)")
    p.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .training import write_initial_checkpoint

    if args.config is not None:
        if args.space is not None or args.branches is not None or args.enhanced:
            raise CLIError("--space, --branches and --enhanced only apply without --config")
        cfg = args.config
    else:
        if args.data is None:
            raise CLIError("init needs --config FILE.yaml, or --data SPEC (with optional --space)")
        space = get_space(args.space or "track1")
        if args.branches is None:
            branches = [1] * len(space.stages)
        else:
            try:
                branches = [int(v) for v in args.branches.split(",")]
            except ValueError:
                raise CLIError(f"--branches {args.branches!r}: expected comma-separated integers such as 4,8,16") from None
        cfg = {"space": space.name, "data": args.data, "seed": args.seed,
               "stages": [{"supernet": {"branches": branches, "enhanced": bool(args.enhanced)}, "optimizer": {"lr": 0.1}}]}
    from .training import load_config

    if not isinstance(cfg, str):
        cfg = load_config(cfg, source="init options")
    path = write_initial_checkpoint(cfg, args.out, data=args.data)
    ck = load_checkpoint(path)
    _print_json({
        "out": str(path), "space": ck.space.name, "data": ck.data.get("spec"), "branches": list(ck.config.branches),
        "classifier_branches": ck.config.classifier_branches,
        "parameters": sum(p.numel() for p in ck.build_supernet().parameters()),
    })
    return 0


# ---------------------------------------------------------------------------- study / demo
_STUDY_PRINTS = (
    "Prints {out_dir, ground_truth, candidates, pipelines: {NAME: {kendall_tau, spearman, pearson, "
    "path_images, train_seconds, rank_seconds, trained, checkpoint, ranking, plot}}, proxies: {channels, "
    "params, macs: {kendall_tau, spearman, pearson}}, ceiling (seed-to-seed Kendall tau of the ground "
    "truth), budget_warning, study_json, study_md, warnings}."
)


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="ranking study: train pipelines, rank the ground truth's candidates, compare with stand-alone accuracies",
        description=(
            "For each --config NAME=FILE (a YAML path or a preset name such as mini_seed): train the pipeline "
            "into OUT_DIR/NAME (a finished run of the same config there is reused), rank the ground truth's "
            "candidates with the fast engine, and compute Kendall tau, Spearman and Pearson against the "
            "ground truth; also for the zero-training proxies (channels, params, macs) and the ceiling "
            "(seed-to-seed Kendall tau of the ground truth's per-seed accuracies). Training budgets are "
            "counted in path-images (batch size x paths trained, summed over steps) and a difference above "
            "5% is flagged. Writes OUT_DIR/study.json, OUT_DIR/study.md (a markdown table) and one "
            "OUT_DIR/scatter_NAME.png per pipeline. Default pipelines: baseline=mini_baseline, "
            "seed=mini_seed. " + _STUDY_PRINTS
        ),
    )
    p.add_argument("--gt", required=True, metavar="GT.json", help="ground truth with per-seed 'accs' (written by groundtruth)")
    p.add_argument("--config", action="append", default=None, metavar="NAME=FILE",
                   help="a pipeline: its name and training config (YAML path or preset name); repeat for each")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="study folder (run folders, rankings, tables, plots)")
    p.add_argument("--recal-images", type=int, default=None, metavar="N",
                   help="recalibration images per candidate (default: the whole recalibration split)")
    p.add_argument("--eval-images", type=int, default=None, metavar="M", help="test images per candidate (default: all)")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast", help="ranking engine (default fast)")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted training runs and rankings in DIR (finished runs are always reused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_study)


def _parse_pipelines(values: Sequence[str] | None) -> dict[str, str]:
    if not values:
        return {"baseline": "mini_baseline", "seed": "mini_seed"}
    out: dict[str, str] = {}
    for v in values:
        name, sep, cfg = v.partition("=")
        if not sep or not name or not cfg:
            raise CLIError(f"--config {v!r}: expected NAME=FILE.yaml (or NAME=PRESET)")
        if name in out:
            raise CLIError(f"--config {v!r}: pipeline name {name!r} given twice")
        out[name] = cfg
    return out


def cmd_study(args: argparse.Namespace) -> int:
    from .study import run_study

    res = run_study(
        args.gt, _parse_pipelines(args.config), args.out_dir, recal_images=args.recal_images,
        eval_images=args.eval_images, engine=args.engine, resume=args.resume, progress=not args.no_progress,
    )
    _print_json(res.summary())
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train the mini seed pipeline on the bundled data and rank the mini benchmark against its ground truth",
        description=(
            "Train the mini seed pipeline (configs/mini_seed.yaml) on the bundled Fashion-MNIST subset into "
            "DIR/seed (a finished run there is reused, an interrupted one continued), rank the ground "
            "truth's candidates with the fast engine, and report Kendall tau, Spearman and Pearson against "
            "the shipped ground truth (fastsupernet/resources/mini_gt.json; --gt replaces it), next to the "
            "zero-training proxies and the seed-to-seed ceiling. Writes DIR/study.json, DIR/study.md and "
            "DIR/scatter_seed.png. --quick shrinks training and ranking to seconds (a smoke test, not a "
            "measurement). " + _STUDY_PRINTS
        ),
    )
    p.add_argument("--out-dir", default=None, metavar="DIR", help="study folder (default runs/demo, runs/demo-quick with --quick)")
    p.add_argument("--gt", default=None, metavar="GT.json", help="ground truth (default: the shipped mini_gt.json)")
    p.add_argument("--quick", action="store_true", help="a few training steps and few images: seconds instead of minutes")
    p.add_argument("--recal-images", type=int, default=None, metavar="N", help="recalibration images per candidate")
    p.add_argument("--eval-images", type=int, default=None, metavar="M", help="test images per candidate")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .study import run_demo

    out_dir = args.out_dir or ("runs/demo-quick" if args.quick else "runs/demo")
    res = run_demo(out_dir, gt=args.gt, quick=args.quick, recal_images=args.recal_images,
                   eval_images=args.eval_images, progress=not args.no_progress)
    seed = res.pipelines["seed"]

    def f(x: float | None) -> str:
        return "n/a" if x is None or x != x else f"{x:.3f}"

    best_proxy = max(res.proxies.items(), key=lambda kv: -2.0 if kv[1]["kendall_tau"] is None else kv[1]["kendall_tau"])
    sys.stderr.write(
        f"seed pipeline vs stand-alone accuracy of {res.candidates} candidates: Kendall tau {f(seed.kendall_tau)}, "
        f"Spearman {f(seed.spearman)}, Pearson {f(seed.pearson)}; best zero-training proxy ({best_proxy[0]}) "
        f"{f(best_proxy[1]['kendall_tau'])}; ceiling (seed-to-seed) {f(res.ceiling)}; plot {seed.plot}\n"
    )
    _print_json(res.summary())
    return 0


# ---------------------------------------------------------------------------- parser
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_evaluate, _add_space, _add_proxy, _add_groundtruth, _add_rank, _add_train, _add_init, _add_study, _add_demo]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = _Parser(
        prog="fastsupernet" if script == "fastsupernet" else "python -m fastsupernet",
        description="One-shot channel-width NAS for the CVPR 2021 Lightweight NAS Challenge, Track 1.",
        epilog=(
            "Wherever a command takes a challenge file, the literal 'official' names the bundled "
            "50,000 official Track-1 candidates and 'gt1000' the bundled ground truth (stand-alone "
            "CIFAR-100 accuracies of arch1..arch1000); write ./official for a file of that name. "
            "Files may be gzip-compressed. Exit status: 0 success, 2 bad input "
            "(a one-line 'error: ...' on stderr). 'COMMAND --help' describes each command."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for register in COMMANDS:
        register(sub)
    return parser


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BAD_INPUT)
    try:
        return int(args.func(args))
    except (CLIError, ValueError) as e:  # ChallengeFileError is a ValueError
        sys.stderr.write(f"error: {_one_line(e)}\n")
        return EXIT_BAD_INPUT
    except OSError as e:
        sys.stderr.write(f"error: {_one_line(e)}\n")
        return EXIT_BAD_INPUT


def run() -> int:
    """The program (``python -m fastsupernet``, the ``fastsupernet`` script): :func:`main` after
    tuning the CPU allocator for large tensors (:func:`fastsupernet.allocator.tune_cpu_allocator`,
    a whole-process choice, so made here and not in :func:`main`, which tests call in-process)."""
    from .allocator import tune_cpu_allocator

    try:
        tune_cpu_allocator()
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_BAD_INPUT
    return main()
