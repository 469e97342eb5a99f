"""The ranking study: does a supernet rank candidates like stand-alone training does?

Holds the mini benchmark's fixed candidate list (a seeded sample spread evenly over the
multiply-add range), the training budget of a pipeline counted in path-images, and the study
itself: :func:`run_study` trains each pipeline (or reuses its finished run), ranks the ground
truth's candidates with it and compares the ranking with the stand-alone accuracies, next to
the zero-training proxies and the ground truth's own seed-to-seed agreement (the ceiling).
:func:`run_demo` is the one-pipeline study behind ``python -m fastsupernet demo``.

Outputs (all written atomically into the study folder)::

    <name>/                 each pipeline's training run folder (config.yaml, final.pt, ...)
    <name>/ranking.json     its ranking of the ground truth's candidates (a submission)
    study.json              every number: correlations, budgets, seconds, predictions
    study.md                the table (pipelines, proxies, ceiling), ready to paste
    scatter_<name>.png      supernet prediction vs stand-alone accuracy, one per pipeline
"""
from __future__ import annotations

import io as _bytes_io
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .space import Arch, ChannelSpace, Track1Space

__all__ = [
    "spread_candidates",
    "StudyError",
    "BUDGET_TOLERANCE",
    "preset_path",
    "load_pipeline_config",
    "shrink_config",
    "paths_per_step",
    "stage_steps",
    "path_images",
    "seed_agreement",
    "PipelineResult",
    "StudyResult",
    "run_study",
    "shipped_ground_truth_path",
    "run_demo",
    "QUICK_TRAINING",
    "QUICK_RANKING",
]

#: Budgets (path-images) of the compared pipelines may differ by this fraction before the study warns.
BUDGET_TOLERANCE = 0.05

_RESOURCES = Path(__file__).resolve().parent / "resources"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class StudyError(ValueError):
    """A study that cannot run as asked (names the file, pipeline or option and why)."""


def spread_candidates(n: int, *, seed: int = 0, pool: int = 20000, space: ChannelSpace | None = None) -> dict[str, Arch]:
    """``n`` distinct architectures spread evenly over the space's multiply-add range.

    A seeded pool of ``pool`` architectures is drawn with a random overall size per
    architecture (``u ~ U(0, 1)``; each position takes the choice nearest to ``u`` of its range,
    jittered by a normal step of one choice), so the pool reaches from the smallest to the
    largest networks, not only around the mean as uniform sampling does. Then for ``n`` evenly
    spaced multiply-add targets between the pool's extremes the nearest unused architecture is
    kept. Ids are ``arch1..archN`` in increasing multiply-adds; same arguments, same list.
    """
    sp = space if space is not None else Track1Space()
    if n < 1 or n > pool:
        raise ValueError(f"n must be in [1, pool={pool}], got {n}")
    rng = np.random.default_rng(seed)
    cands: dict[tuple[int, ...], Arch] = {}
    for _ in range(pool):
        u = rng.random()
        values = []
        for choices in sp.choices:
            k = int(np.clip(np.rint(u * (len(choices) - 1) + rng.normal()), 0, len(choices) - 1))
            values.append(choices[k])
        a = Arch(tuple(values), sp.num_network_positions)
        cands.setdefault(tuple(a.widths), a)
    archs = list(cands.values())
    macs = np.asarray(sp.costs(archs)[0], dtype=np.float64)
    order = np.argsort(macs, kind="stable")
    sorted_macs = macs[order]
    used: set[int] = set()
    picks: list[int] = []
    for target in np.linspace(sorted_macs[0], sorted_macs[-1], n):
        pos = int(np.searchsorted(sorted_macs, target))
        best = None
        for d in range(len(order)):  # nearest unused, looking outwards
            for q in (pos - d, pos + d):
                if 0 <= q < len(order) and q not in used:
                    if best is None or abs(sorted_macs[q] - target) < abs(sorted_macs[best] - target):
                        best = q
            if best is not None and d > 0:
                break
        used.add(best)
        picks.append(best)
    picks.sort()
    return {f"arch{i + 1}": archs[order[p]] for i, p in enumerate(picks)}


# ----------------------------------------------------------------------------- configs


def preset_path(name: str) -> Path:
    """The YAML file of the training preset ``name`` (e.g. ``mini_seed``).

    Presets ship inside the package (``fastsupernet/resources/configs/NAME.yaml``); the
    checkout's ``configs/`` folder links to the same files.
    """
    if not _NAME.match(name):
        raise StudyError(f"preset name {name!r}: expected letters, digits, '_', '.', '-' (such as mini_seed)")
    path = _RESOURCES / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise StudyError(f"no training preset named {name!r}: looked for {path}")
    return path


def load_pipeline_config(spec: "str | os.PathLike | Mapping | Any"):
    """A validated :class:`~fastsupernet.training.TrainConfig` from a YAML path, a preset name,
    a mapping or a config. A string that is not an existing file and has no ``.yaml``/``.yml``
    suffix or folder part is taken as a preset name (:func:`preset_path`)."""
    from .training import load_config

    if isinstance(spec, str) and not Path(spec).exists() and _NAME.match(spec) and not spec.endswith((".yaml", ".yml")):
        return load_config(preset_path(spec))
    return load_config(spec)


def shrink_config(
    cfg: Any,
    *,
    max_steps: int = 2,
    train_images: int = 256,
    batch_size: int = 32,
) -> Any:
    """A tiny version of a training config (quick demos and tests): every stage runs one epoch of
    at most ``max_steps`` steps with batches of at most ``batch_size`` on the first
    ``train_images`` training images; per-epoch probe scoring is off and warm-up is capped.
    Structure (stages, supernets, sampling, losses) is unchanged."""
    from .training import load_config

    cfg = load_pipeline_config(cfg)
    d = cfg.to_dict()
    d["train_images"] = min(train_images, d["train_images"] or train_images)
    d["metrics"]["probes"] = 0
    d["checkpoint"]["every_steps"] = 0
    for st in d["stages"]:
        acc = st["accumulate"]
        batch = min(st["batch_size"], batch_size)
        st["batch_size"] = max(acc, batch - batch % acc)
        st["epochs"] = 1
        st["max_steps"] = min(st["max_steps"] or max_steps, max_steps)
        st["schedule"]["warmup_steps"] = min(st["schedule"]["warmup_steps"], max_steps)
    return load_config(d, source=f"{cfg.source} (shrunk)")


# ----------------------------------------------------------------------------- budget


def paths_per_step(stage: Any) -> int:
    """How many paths one step of ``stage`` trains on its batch (an upper bound).

    The sampled paths (``sampling.paths``), plus the largest path when distillation trains it
    too (a ``live`` teacher or ``train_largest``; under ``sandwich`` it is already the first
    sampled path), plus ``max_recover.probes``: each probe whose loss rose gets one more pass,
    counted here as if all of them did. Forward-only passes (a frozen teacher, the probes'
    scoring) are not counted. A uniform draw that happens to hit the largest path is counted
    twice, so the count is exact only up to that (rare) coincidence.
    """
    n = int(stage.sampling.paths)
    loss = stage.loss
    if loss.kind == "distill" and (loss.teacher == "live" or loss.train_largest) and stage.sampling.rule != "sandwich":
        n += 1
    return n + int(stage.max_recover.probes)


def stage_steps(cfg: Any, num_train: int) -> list[int]:
    """Optimizer steps of each stage of ``cfg`` on ``num_train`` available training images
    (``train_images`` applied), as the training pipeline counts them."""
    n = num_train if cfg.train_images is None else min(num_train, cfg.train_images)
    steps = []
    for i, st in enumerate(cfg.stages):
        per_epoch = n // st.batch_size
        if per_epoch < 1:
            raise StudyError(f"{cfg.source}: stages[{i}].batch_size {st.batch_size} exceeds the {n} training images")
        total = per_epoch * st.epochs
        steps.append(total if st.max_steps is None else min(total, st.max_steps))
    return steps


def path_images(cfg: Any, *, num_train: int | None = None) -> int:
    """The training budget of a config in path-images: the sum over stages and steps of the batch
    size times the paths trained in that step (:func:`paths_per_step`, max-recover counted at its
    upper bound). ``num_train``: training images available (default: loaded from the config's data)."""
    cfg = load_pipeline_config(cfg)
    if num_train is None:
        from .data import load_data

        num_train = int(load_data(cfg.data).train_images.shape[0])
    return sum(s * st.batch_size * paths_per_step(st) for s, st in zip(stage_steps(cfg, num_train), cfg.stages))


def _measured_path_images(cfg: Any, metrics_file: Path) -> int | None:
    """Path-images the run actually trained, from its metrics.jsonl (max-recover as it happened)."""
    if not metrics_file.is_file():
        return None
    total = 0.0
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            st = cfg.stages[int(rec["stage_index"])]
            steps = int(rec["steps"])
            base = paths_per_step(st) - st.max_recover.probes
            total += steps * st.batch_size * (base + float(rec.get("recovered_per_step") or 0.0))
        except (ValueError, KeyError, IndexError, TypeError):
            return None
    return int(round(total))


def _trained_seconds(metrics_file: Path) -> float | None:
    """Seconds of training steps as metrics.jsonl records them (per-epoch probe scoring excluded)."""
    if not metrics_file.is_file():
        return None
    total = 0.0
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            total += float(json.loads(line)["seconds"])
        except (ValueError, KeyError, TypeError):
            return None
    return total


# ----------------------------------------------------------------------------- ground truth


def seed_agreement(per_seed: Sequence[Sequence[float]]) -> float:
    """Mean Kendall tau over all pairs of seeds: ``per_seed[i][j]`` is candidate i's accuracy
    with seed j. With two seeds, the tau between them: the ceiling of any predictor."""
    from .metrics import kendall_tau

    a = np.asarray(per_seed, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"need per-seed accuracies of at least 2 seeds per candidate, got shape {a.shape}")
    taus = [kendall_tau(a[:, i], a[:, j]) for i, j in itertools.combinations(range(a.shape[1]), 2)]
    return float(np.mean(taus))


def _ceiling(gt: Mapping[str, Any]) -> tuple[float | None, int, str | None]:
    """(ceiling tau, seeds, why it is missing) from the ground truth's per-seed ``accs``."""
    rows = []
    for key, s in gt.items():
        accs = s.extra.get("accs")
        if not isinstance(accs, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in accs):
            return None, 0, f"entry {key!r} has no per-seed 'accs' list"
        rows.append([float(v) for v in accs])
    seeds = {len(r) for r in rows}
    if len(seeds) != 1:
        return None, 0, f"entries hold different numbers of seeds ({sorted(seeds)})"
    n_seeds = seeds.pop()
    if n_seeds < 2:
        return None, n_seeds, "only one seed per candidate"
    tau = seed_agreement(rows)
    if math.isnan(tau):
        return None, n_seeds, "constant per-seed accuracies"
    return tau, n_seeds, None


def _proxy_shape(gt_meta: Mapping | None, fallback: Mapping[str, Any]) -> dict[str, Any]:
    """Network shape of the ground truth's networks: from its recipe when it names readable data."""
    recipe = (gt_meta or {}).get("recipe") if isinstance(gt_meta, Mapping) else None
    if isinstance(recipe, Mapping) and isinstance(recipe.get("data"), str):
        from .data import load_data

        try:
            info = load_data(recipe["data"]).info
        except (ValueError, OSError):
            info = None
        if info is not None:
            res = recipe.get("resolution")
            shortcut = recipe.get("shortcut") if recipe.get("shortcut") in ("all", "projection") else "all"
            return {"resolution": int(res) if isinstance(res, int) else info.resolution,
                    "in_channels": info.in_channels, "num_classes": info.num_classes, "shortcut": shortcut}
    return dict(fallback)


# ----------------------------------------------------------------------------- results


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


@dataclass
class PipelineResult:
    """One pipeline of a study: where its run and ranking are, how well it ranks, what it cost."""

    name: str
    config_source: str
    run_dir: Path
    checkpoint: Path
    ranking: Path
    trained: bool  # trained (or resumed) by this study; False when a finished run was reused
    predictions: dict[str, float]
    kendall_tau: float
    spearman: float
    pearson: float
    path_images: int
    path_images_measured: int | None
    stage_path_images: list[int]
    train_seconds: float | None
    train_wall_seconds: float | None
    rank_seconds: float
    rank_computed: int
    plot: Path | None = None

    def to_json_dict(self, *, predictions: bool = True) -> dict[str, Any]:
        d = {
            "config": self.config_source,
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "ranking": str(self.ranking),
            "trained": self.trained,
            "kendall_tau": _num(self.kendall_tau),
            "spearman": _num(self.spearman),
            "pearson": _num(self.pearson),
            "path_images": self.path_images,
            "path_images_measured": self.path_images_measured,
            "stage_path_images": self.stage_path_images,
            "train_seconds": None if self.train_seconds is None else round(self.train_seconds, 3),
            "train_wall_seconds": None if self.train_wall_seconds is None else round(self.train_wall_seconds, 3),
            "rank_seconds": round(self.rank_seconds, 3),
            "rank_computed": self.rank_computed,
            "plot": None if self.plot is None else str(self.plot),
        }
        if predictions:
            d["predictions"] = self.predictions
        return d


@dataclass
class StudyResult:
    """What :func:`run_study` measured and wrote."""

    out_dir: Path
    ground_truth: Path
    candidates: int
    pipelines: dict[str, PipelineResult]
    proxies: dict[str, dict[str, float | None]]
    proxy_shape: dict[str, Any]
    ceiling: float | None
    ceiling_seeds: int
    ceiling_note: str | None
    budget_warning: str | None
    protocol: dict[str, Any]
    study_json: Path
    study_md: Path
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON the ``study`` and ``demo`` commands print (no per-candidate predictions)."""
        return {
            "out_dir": str(self.out_dir),
            "ground_truth": str(self.ground_truth),
            "candidates": self.candidates,
            "pipelines": {
                n: {k: v for k, v in p.to_json_dict(predictions=False).items()
                    if k in ("kendall_tau", "spearman", "pearson", "path_images", "train_seconds", "rank_seconds",
                             "trained", "checkpoint", "ranking", "plot")}
                for n, p in self.pipelines.items()
            },
            "proxies": self.proxies,
            "ceiling": self.ceiling,
            "budget_warning": self.budget_warning,
            "study_json": str(self.study_json),
            "study_md": str(self.study_md),
            "warnings": self.warnings,
        }


# ----------------------------------------------------------------------------- the study


def _correlations(pred: Sequence[float], truth: Sequence[float]) -> tuple[float, float, float]:
    from .metrics import kendall_tau, pearson, spearman

    return kendall_tau(pred, truth), spearman(pred, truth), pearson(pred, truth)


def _finished_run(run_dir: Path, cfg: Any) -> Path | None:
    """``run_dir/final.pt`` when it holds a finished run of ``cfg``; an error when of another config."""
    from .checkpoint import load_checkpoint
    from .training import config_diff
    from .training.pipeline import IGNORED_ON_RESUME

    final = run_dir / "final.pt"
    if not final.is_file():
        return None
    stored = load_checkpoint(final).meta.get("config")
    if not isinstance(stored, Mapping):
        raise StudyError(f"{final}: records no training config, so it cannot be reused; remove {run_dir} or choose another out-dir")
    diff = [k for k in config_diff(stored, cfg.to_dict())
            if not any(k == ig or k.startswith(ig + ".") for ig in IGNORED_ON_RESUME)]
    if diff:
        shown = ", ".join(diff[:5]) + (f" and {len(diff) - 5} more" if len(diff) > 5 else "")
        raise StudyError(
            f"{run_dir}: holds a finished run of a different config (differs at {shown}); "
            f"remove it or choose another out-dir"
        )
    return final


def _train_or_reuse(cfg: Any, run_dir: Path, resume: bool) -> tuple[Path, bool, float | None]:
    """(final checkpoint, trained now?, wall seconds of this call's training)."""
    from .training import train

    final = _finished_run(run_dir, cfg)
    if final is not None:
        return final, False, None
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*.pt"))
    t0 = time.perf_counter()
    res = train(cfg, out=run_dir, resume=bool(resume and has_checkpoints))
    return res.final_checkpoint, True, time.perf_counter() - t0


def _rank(checkpoint: Path, archs: Mapping[str, Arch], out: Path, *, resume: bool, **options: Any):
    from .journal import JournalError
    from .ranking import existing_journals, rank

    if resume and existing_journals(out):
        try:
            return rank(checkpoint, archs, out, resume=True, **options)
        except JournalError:
            pass  # an earlier ranking of another checkpoint or protocol: start over
    return rank(checkpoint, archs, out, force=True, **options)


def _scatter_png(name: str, pred: Sequence[float], truth: Sequence[float], tau: float) -> bytes:
    """A scatter plot (PNG bytes) of supernet predictions against stand-alone accuracies."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(np.asarray(pred) * 100, np.asarray(truth) * 100, s=12, alpha=0.8)
    ax.set_xlabel("supernet accuracy after BN recalibration (%)")
    ax.set_ylabel("stand-alone accuracy (%)")
    tau_text = "undefined" if not math.isfinite(tau) else f"{tau:.3f}"
    ax.set_title(f"{name}: Kendall tau = {tau_text} (n = {len(pred)})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _table(res: StudyResult) -> str:
    """The markdown table of a study (study.md)."""
    lines = [
        f"Ranking of {res.candidates} candidates of `{res.ground_truth.name}` against their stand-alone accuracies "
        f"(recalibration images: {res.protocol['recal_images'] or 'all'}, test images: "
        f"{res.protocol['eval_images'] or 'all'}, engine: {res.protocol['engine']}).",
        "",
        "| predictor | Kendall tau | Spearman | Pearson | path-images | train s | rank s |",
        "|---|---|---|---|---|---|---|",
    ]
    mark = " (!)" if res.budget_warning else ""
    for name, p in res.pipelines.items():
        lines.append(
            f"| {name} (`{Path(p.config_source).name}`) | {_fmt(p.kendall_tau)} | {_fmt(p.spearman)} | {_fmt(p.pearson)} "
            f"| {p.path_images:,}{mark} | {_fmt(p.train_seconds, 1)} | {_fmt(p.rank_seconds, 1)} |"
        )
    shape = res.proxy_shape
    for name, c in res.proxies.items():
        lines.append(
            f"| proxy: {name} ({shape['resolution']}x{shape['resolution']}) | {_fmt(c['kendall_tau'])} "
            f"| {_fmt(c['spearman'])} | {_fmt(c['pearson'])} | 0 | 0 | 0 |"
        )
    ceiling = _fmt(res.ceiling) if res.ceiling is not None else f"n/a ({res.ceiling_note})"
    lines.append(f"| ceiling: seed-to-seed ({res.ceiling_seeds} seeds) | {ceiling} | | | | | |")
    lines.append("")
    lines.append(
        "path-images: the sum over training steps of batch size x paths trained (max-recover counted at its upper bound)."
    )
    if res.budget_warning:
        lines.append(f"(!) {res.budget_warning}")
    return "\n".join(lines) + "\n"


def _check_protocol(name: str, spec: str, dataset: Any, recal_images: int | None, eval_images: int | None) -> None:
    """Ranking image counts that the pipeline's data cannot supply fail before any training."""
    from .ranking import Protocol

    recal_split = int(round(Protocol().recal_fraction * int(dataset.train_images.shape[0])))
    for option, value, available, what in (
        ("recal_images", recal_images, recal_split, "recalibration split"),
        ("eval_images", eval_images, int(dataset.test_images.shape[0]), "test split"),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StudyError(f"{option} must be a positive integer, got {value!r}")
        if value > available:
            raise StudyError(f"{option} {value} exceeds the {available} images of the {what} of "
                             f"pipeline {name!r}'s data {spec!r}")


def run_study(
    gt: str | os.PathLike,
    configs: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    recal_images: int | None = None,
    eval_images: int | None = None,
    engine: str = "fast",
    device: str | None = None,
    resume: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> StudyResult:
    """Train each pipeline, rank the ground truth's candidates with it, and compare with the truth.

    ``gt``: a ground-truth file (challenge shape; per-seed ``accs`` give the ceiling).
    ``configs``: pipeline name -> training config (YAML path, preset name, mapping or config).
    Each pipeline trains into ``out_dir/NAME`` (a finished run there with the same config is
    reused; with ``resume`` an interrupted one is continued, and a ranking journal left by an
    interrupted ranking too) and ranks with ``engine`` using the first ``recal_images``
    recalibration and ``eval_images`` test images (``None``: all). Writes ``study.json``,
    ``study.md`` and (``plots``, needs matplotlib) ``scatter_NAME.png`` into ``out_dir``.
    """
    from . import io as fio
    from .data import load_data
    from .metrics import PROXIES, proxy_scores

    if not configs:
        raise StudyError("a study needs at least one pipeline config")
    for name in configs:
        if not isinstance(name, str) or not _NAME.match(name):
            raise StudyError(f"pipeline name {name!r}: expected letters, digits, '_', '.', '-'")
    gt_path = Path(gt)
    if not gt_path.is_file():
        raise StudyError(f"{gt_path}: no such ground-truth file")
    loaded = {name: load_pipeline_config(c) for name, c in configs.items()}
    spaces = {cfg.space for cfg in loaded.values()}
    if len(spaces) != 1:
        raise StudyError(f"the pipelines use different search spaces ({', '.join(sorted(spaces))}); a study compares one")
    space = next(iter(loaded.values())).get_space()
    truth = fio.read_scores(gt_path, space)
    if len(truth) < 2:
        raise StudyError(f"{gt_path}: holds {len(truth)} candidate(s); a ranking study needs at least 2")
    gt_meta = fio.read_meta(gt_path)
    ids = list(truth)
    archs = {i: truth[i].arch for i in ids}
    y = [truth[i].acc for i in ids]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings_: list[str] = []

    # budgets first: a config that cannot run on its data fails before any training
    num_train_of: dict[str, int] = {}
    budgets: dict[str, tuple[int, list[int]]] = {}
    for name, cfg in loaded.items():
        if cfg.data not in num_train_of:
            dataset = load_data(cfg.data)
            num_train_of[cfg.data] = int(dataset.train_images.shape[0])
            _check_protocol(name, cfg.data, dataset, recal_images, eval_images)
        steps = stage_steps(cfg, num_train_of[cfg.data])
        per_stage = [s * st.batch_size * paths_per_step(st) for s, st in zip(steps, cfg.stages)]
        budgets[name] = (sum(per_stage), per_stage)
    totals = [b for b, _ in budgets.values()]
    spread = (max(totals) - min(totals)) / min(totals) if len(totals) > 1 and min(totals) > 0 else 0.0
    budget_warning = None
    if spread > BUDGET_TOLERANCE:
        listing = ", ".join(f"{n} {b:,}" for n, (b, _) in budgets.items())
        budget_warning = (f"training budgets differ by {100 * spread:.1f}% (more than {100 * BUDGET_TOLERANCE:.0f}%): "
                          f"{listing} path-images; the comparison is not at equal budget")
        warnings_.append(budget_warning)

    rank_options = {"recal_images": recal_images, "eval_images": eval_images, "engine": engine,
                    "device": device, "progress": progress}
    pipelines: dict[str, PipelineResult] = {}
    first_info: dict[str, Any] | None = None
    for name, cfg in loaded.items():
        cfg = cfg.replace(progress=True if progress else False)
        run_dir = out_dir / name
        checkpoint, trained, wall = _train_or_reuse(cfg, run_dir, resume)
        ranking = run_dir / "ranking.json"
        rres = _rank(checkpoint, archs, ranking, resume=resume, **rank_options)
        pred = [rres.scores[i].acc for i in ids]
        tau, rho, r = _correlations(pred, y)
        if first_info is None:
            from .checkpoint import load_checkpoint

            ck = load_checkpoint(checkpoint)
            first_info = {"resolution": int(ck.data.get("resolution", 32)), "in_channels": ck.in_channels,
                          "num_classes": ck.num_classes, "shortcut": "all"}
        if math.isnan(tau):
            warnings_.append(f"{name}: Kendall tau is undefined (the supernet predicted the same accuracy for every candidate)")
        metrics_file = run_dir / "metrics.jsonl"
        pipelines[name] = PipelineResult(
            name=name, config_source=cfg.source, run_dir=run_dir, checkpoint=checkpoint, ranking=ranking,
            trained=trained, predictions={i: p for i, p in zip(ids, pred)}, kendall_tau=tau, spearman=rho, pearson=r,
            path_images=budgets[name][0], path_images_measured=_measured_path_images(cfg, metrics_file),
            stage_path_images=budgets[name][1], train_seconds=_trained_seconds(metrics_file),
            train_wall_seconds=wall, rank_seconds=rres.seconds, rank_computed=rres.computed,
        )

    assert first_info is not None
    shape = _proxy_shape(gt_meta, first_info)
    proxies: dict[str, dict[str, float | None]] = {}
    for by in PROXIES:
        scores = proxy_scores([archs[i] for i in ids], by, space, **shape)
        tau, rho, r = _correlations(scores, y)
        proxies[by] = {"kendall_tau": _num(tau), "spearman": _num(rho), "pearson": _num(r)}
    ceiling, n_seeds, ceiling_note = _ceiling(truth)
    if ceiling is None:
        warnings_.append(f"no ceiling: {ceiling_note}")

    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            warnings_.append("matplotlib is not installed (pip install 'fastsupernet[plot]'): no scatter plots written")
            plots = False
    if plots:
        from ._atomic import atomic_write_bytes

        for name, p in pipelines.items():
            path = out_dir / f"scatter_{name}.png"
            atomic_write_bytes(path, _scatter_png(name, [p.predictions[i] for i in ids], y, p.kendall_tau))
            p.plot = path

    protocol = {"recal_images": recal_images, "eval_images": eval_images, "engine": engine}
    result = StudyResult(
        out_dir=out_dir, ground_truth=gt_path, candidates=len(ids), pipelines=pipelines, proxies=proxies,
        proxy_shape=shape, ceiling=ceiling, ceiling_seeds=n_seeds, ceiling_note=ceiling_note,
        budget_warning=budget_warning, protocol=protocol, study_json=out_dir / "study.json",
        study_md=out_dir / "study.md", warnings=warnings_,
    )
    _write_outputs(result, {i: truth[i].acc for i in ids})
    return result


def _write_outputs(res: StudyResult, truth: Mapping[str, float]) -> None:
    from ._atomic import atomic_write_text

    doc = {
        "ground_truth": {"path": str(res.ground_truth), "candidates": res.candidates, "acc": dict(truth)},
        "protocol": res.protocol,
        "pipelines": {n: p.to_json_dict() for n, p in res.pipelines.items()},
        "proxies": res.proxies,
        "proxy_shape": res.proxy_shape,
        "ceiling": {"kendall_tau": res.ceiling, "seeds": res.ceiling_seeds, "note": res.ceiling_note},
        "budget": {
            "path_images": {n: p.path_images for n, p in res.pipelines.items()},
            "tolerance": BUDGET_TOLERANCE,
            "warning": res.budget_warning,
        },
        "files": {"study_md": str(res.study_md),
                  "plots": {n: (None if p.plot is None else str(p.plot)) for n, p in res.pipelines.items()}},
        "warnings": res.warnings,
    }
    atomic_write_text(res.study_json, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    atomic_write_text(res.study_md, _table(res))


# ----------------------------------------------------------------------------- the demo


def shipped_ground_truth_path() -> Path:
    """The mini benchmark's ground truth shipped with the package (stand-alone accuracies of its
    candidates on the bundled Fashion-MNIST subset)."""
    return _RESOURCES / "mini_gt.json"


#: What ``--quick`` shrinks the demo to: training (see :func:`shrink_config`) and ranking.
QUICK_TRAINING = {"max_steps": 2, "train_images": 256, "batch_size": 32}
QUICK_RANKING = {"recal_images": 64, "eval_images": 200}


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    *,
    gt: str | os.PathLike | None = None,
    quick: bool = False,
    recal_images: int | None = None,
    eval_images: int | None = None,
    progress: bool = True,
) -> StudyResult:
    """Train the mini seed pipeline on the bundled data, rank the ground truth's candidates with
    it (fast engine) and compare: a one-pipeline :func:`run_study` into ``out_dir``.

    ``gt`` defaults to the shipped ground truth (:func:`shipped_ground_truth_path`). ``quick``
    shrinks training and ranking to seconds (:data:`QUICK_TRAINING`, :data:`QUICK_RANKING`).
    A finished run in ``out_dir`` is reused and an interrupted one continued.
    """
    if gt is None:
        gt = shipped_ground_truth_path()
        if not Path(gt).is_file():
            raise StudyError(
                f"{gt}: the shipped ground truth is missing from this installation; pass --gt GT.json "
                f"(a file written by 'python -m fastsupernet groundtruth')"
            )
    cfg = load_pipeline_config("mini_seed")
    if quick:
        cfg = shrink_config(cfg, **QUICK_TRAINING)
        recal_images = QUICK_RANKING["recal_images"] if recal_images is None else recal_images
        eval_images = QUICK_RANKING["eval_images"] if eval_images is None else eval_images
    return run_study(gt, {"seed": cfg}, out_dir, recal_images=recal_images, eval_images=eval_images,
                     resume=True, progress=progress)
