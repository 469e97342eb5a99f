"""The progressive training pipeline: stages, run folder, checkpoints, exact resume, metrics.

A run folder holds::

    config.yaml            the resolved config (every default written out)
    checkpoints/step-N.pt  training checkpoints (model + train_state), the newest few kept
    stage<i>-<name>.pt     each stage's final supernet (no training state)
    final.pt               the last stage's final supernet: what ranking reads
    metrics.jsonl          one JSON line per epoch

Checkpoints are the :mod:`fastsupernet.checkpoint` format; ``train_state`` holds the config,
the stage and step, the optimizer state, the frozen teacher (if any), the RNG states and the
running epoch statistics. The data order, augmentation and sampled paths of every step are
drawn from seeds derived from ``(seed, stage, epoch/step)``, so resuming from any checkpoint
replays exactly the steps an uninterrupted run would take (bit-identical on the same device
and thread count).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import yaml

from .._atomic import atomic_write_text
from ..checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from ..data import DataInfo, Dataset, augment_batch, load_data, normalize
from ..distributed import ProcessGroup, process_group_from_env
from ..space import ChannelSpace
from ..supernet import Supernet
from .config import StageConfig, TrainConfig, config_diff, load_config
from .probe import probe_accuracy, probe_archs
from .sampling import PathSampler, derive_seed
from .step import Trainer, TrainingDiverged

__all__ = ["TrainError", "TrainResult", "train", "write_initial_checkpoint", "lr_at", "TRAIN_STATE_KIND"]

TRAIN_STATE_KIND = "fastsupernet.train"
#: Config keys that may differ when resuming (they do not change what is computed).
IGNORED_ON_RESUME = ("out", "progress", "device", "metrics.tensorboard")
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class TrainError(ValueError):
    """A run that cannot start or resume as asked (names the file or key and why)."""


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced."""

    run_dir: Path
    final_checkpoint: Path
    stage_checkpoints: tuple[Path, ...]
    metrics_file: Path
    global_step: int
    resumed_from: Path | None

    def to_json_dict(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "final_checkpoint": str(self.final_checkpoint),
            "stage_checkpoints": [str(p) for p in self.stage_checkpoints],
            "metrics": str(self.metrics_file),
            "global_step": self.global_step,
            "resumed_from": None if self.resumed_from is None else str(self.resumed_from),
        }


def lr_at(step: int, total: int, lr: float, warmup_steps: int, min_lr: float) -> float:
    """Learning rate of step ``step`` (0-based) of ``total``: linear warm-up, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- set-up


def _resolve_device(device_opt: str) -> torch.device:
    """The config's ``device`` for this process (the local rank's GPU under torchrun)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device_opt == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif device_opt == "cuda":
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device(device_opt)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device {device_opt!r}: CUDA is not available here")
        torch.cuda.set_device(device)
    return device


def _run_dir(cfg: TrainConfig, out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out)
    if cfg.out:
        return Path(cfg.out)
    stem = Path(cfg.source).stem if cfg.source.endswith((".yaml", ".yml")) else "run"
    return Path("runs") / stem


def _step_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def _comparable(d: Mapping) -> dict:
    out = copy.deepcopy(dict(d))
    for key in IGNORED_ON_RESUME:
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _training_subset(data: Dataset, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data.train_images, data.train_labels
    if cfg.train_images is not None and cfg.train_images < images.shape[0]:
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "subset"))
        idx = torch.randperm(images.shape[0], generator=gen)[: cfg.train_images]
        images, labels = images[idx], labels[idx]
    return images, labels


def _build_stage_model(
    cfg: TrainConfig, si: int, previous: Supernet | None, space: ChannelSpace, info: DataInfo
) -> Supernet:
    """The supernet a stage starts from: fresh, the previous stage's grown, or a checkpoint's grown."""
    st = cfg.stages[si]
    want = st.supernet.build()
    if st.init == "scratch":
        torch.manual_seed(derive_seed(cfg.seed, "init", si))
        return Supernet(space, want, in_channels=info.in_channels, num_classes=info.num_classes)
    if st.init == "previous":
        assert previous is not None
        base = previous
    else:
        ck = load_checkpoint(st.init)
        where = f"{cfg.source}: stages[{si}].init: {st.init}"
        if ck.space != space:
            raise TrainError(f"{where}: the checkpoint's space {ck.space.name!r} is not the config's {space.name!r}")
        if (ck.in_channels, ck.num_classes) != (info.in_channels, info.num_classes):
            raise TrainError(
                f"{where}: the checkpoint has {ck.in_channels} input channels and {ck.num_classes} classes, "
                f"the data {info.in_channels} and {info.num_classes}"
            )
        diff = [k for k in ("width_map", "residual_activation", "shortcut", "bn_momentum", "bn_eps", "prelu_init")
                if getattr(ck.config, k) != getattr(want, k)]
        if diff:
            raise TrainError(f"{where}: the checkpoint's supernet options {', '.join(diff)} differ from the stage's")
        base = ck.build_supernet()
    return base.grow(want.branches, want.classifier_branches)


def write_initial_checkpoint(
    cfg: "str | os.PathLike | Mapping | TrainConfig", out: str | os.PathLike, *, data: str | None = None
) -> Path:
    """Write the untrained (or ``init``-loaded) supernet of the config's first stage to ``out``."""
    cfg = load_config(cfg)
    if data is not None:
        cfg = cfg.replace(data=data)
    dataset = load_data(cfg.data)
    model = _build_stage_model(cfg, 0, None, cfg.get_space(), dataset.info)
    meta = {"purpose": "initial supernet of the first stage", "stage": cfg.stages[0].name or "stage0", "seed": cfg.seed}
    return save_checkpoint(out, model, data=dataset.info, meta=meta)


# ----------------------------------------------------------------------------- metrics


def _finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


class _EpochStats:
    """Running sums of one epoch (stored in checkpoints so a resumed epoch reports the same)."""

    KEYS = ("steps", "loss", "largest_ce", "largest_ce_n", "student", "student_n", "correct", "seen", "recovered", "images")

    def __init__(self, state: Mapping | None = None) -> None:
        self.v = {k: float((state or {}).get(k, 0.0)) for k in self.KEYS}

    def add(self, s, images: int) -> None:
        v = self.v
        v["steps"] += 1
        v["loss"] += s.loss
        if math.isfinite(s.largest_ce):
            v["largest_ce"] += s.largest_ce
            v["largest_ce_n"] += 1
        if math.isfinite(s.student_loss):
            v["student"] += s.student_loss
            v["student_n"] += 1
        v["correct"] += s.largest_correct
        v["seen"] += s.largest_seen
        v["recovered"] += s.recovered
        v["images"] += images

    def summary(self) -> dict:
        v = self.v
        n = max(1.0, v["steps"])
        return {
            "loss": _finite_or_none(v["loss"] / n),
            "largest_ce": _finite_or_none(v["largest_ce"] / v["largest_ce_n"]) if v["largest_ce_n"] else None,
            "student_loss": _finite_or_none(v["student"] / v["student_n"]) if v["student_n"] else None,
            "train_acc_largest": v["correct"] / v["seen"] if v["seen"] else None,
            "recovered_per_step": v["recovered"] / n,
            "steps": int(v["steps"]),
        }


class _Metrics:
    """Appends per-epoch records to metrics.jsonl (and TensorBoard when asked and installed)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed
                warnings.warn("metrics.tensorboard is on but TensorBoard is not installed; writing metrics.jsonl only")

    def truncate_after(self, global_step: int) -> None:
        """Drop records past ``global_step`` (a resumed run recomputes them)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if rec.get("global_step", 0) <= global_step:
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.writer is not None:
            step = record["global_step"]
            for key in ("loss", "largest_ce", "student_loss", "train_acc_largest", "lr", "images_per_s"):
                if record.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], step)
            for name, acc in (record.get("probe_acc") or {}).items():
                self.writer.add_scalar(f"probe/{name}", acc, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- the run


def train(
    cfg: "str | os.PathLike | Mapping | TrainConfig",
    *,
    out: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    data: str | None = None,
) -> TrainResult:
    """Run (or resume) the training pipeline a config describes; returns where its results are.

    ``cfg``: a YAML path, a mapping or a :class:`TrainConfig`. ``out``: the run folder (default:
    the config's ``out``, else ``runs/<config file stem>``). ``resume``: ``True`` continues from the
    newest checkpoint of the run folder, a path from that checkpoint. ``data``: replaces the
    config's data spec. Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this.
    Raises :class:`ConfigError` / :class:`TrainError` / :class:`CheckpointError` (bad input) and
    :class:`TrainingDiverged` (a non-finite loss; the last good checkpoint is kept).
    """
    cfg = load_config(cfg)
    if data is not None:
        cfg = cfg.replace(data=data)
    device = _resolve_device(cfg.device)
    group = process_group_from_env(device)
    try:
        return _Run(cfg, group, device, _run_dir(cfg, out), resume).run()
    finally:
        group.close()


class _Run:
    def __init__(
        self, cfg: TrainConfig, group: ProcessGroup, device: torch.device, run_dir: Path, resume: bool | str | os.PathLike
    ) -> None:
        self.cfg, self.group, self.run_dir = cfg, group, run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.is_main = group.rank == 0
        self.space = cfg.get_space()
        self.device = device
        self.resume_path: Path | None = None
        self.resume_ck = None
        if resume:
            self._open_resume(resume)
        elif _step_checkpoints(self.ckpt_dir) or (run_dir / "final.pt").exists():
            raise TrainError(
                f"{run_dir}: already holds a training run (checkpoints in {self.ckpt_dir}); "
                f"pass --resume to continue it or choose another --out"
            )
        self.dataset = load_data(cfg.data)
        self.info = self.dataset.info
        if self.resume_ck is not None and self.resume_ck.data != self.info.to_dict():
            raise TrainError(
                f"{self.resume_path}: cannot resume: the data {cfg.data!r} now loads with another description "
                f"({self.info.to_dict()}) than the run's ({self.resume_ck.data})"
            )
        images, labels = _training_subset(self.dataset, cfg)
        self.train_x = images.to(self.device)
        self.train_y = labels.to(self.device)
        self.n_train = int(images.shape[0])
        self.metrics = _Metrics(run_dir, self.is_main, cfg.metrics.tensorboard)
        self.last_checkpoint: Path | None = self.resume_path
        self.stage_files: list[Path] = []
        self._probe_data = None

    # ------------------------------------------------------------------ resume
    def _open_resume(self, resume: bool | str | os.PathLike) -> None:
        if resume is True:
            found = _step_checkpoints(self.ckpt_dir)
            if not found:
                raise TrainError(f"{self.ckpt_dir}: no training checkpoint to resume from")
            path = found[-1][1]
        else:
            path = Path(resume)
        ck = load_checkpoint(path)
        ts = ck.train_state
        if not isinstance(ts, dict) or ts.get("kind") != TRAIN_STATE_KIND:
            raise CheckpointError(f"{path}: holds no training state to resume from (a stage or final checkpoint?)")
        diff = config_diff(_comparable(ts["config"]), _comparable(self.cfg.to_dict()))
        if diff:
            raise TrainError(
                f"{path}: cannot resume: the config differs from the run's at {', '.join(diff)} "
                f"(the run's config is {self.run_dir / 'config.yaml'})"
            )
        if int(ts["world_size"]) != self.group.world_size:
            raise TrainError(f"{path}: the run used {ts['world_size']} process(es); resume it with the same number, not {self.group.world_size}")
        self.resume_path, self.resume_ck = path, ck

    # ------------------------------------------------------------------ helpers
    def _stage_total(self, st: StageConfig) -> tuple[int, int]:
        spe = self.n_train // st.batch_size
        if spe < 1:
            i = self.cfg.stages.index(st)
            raise TrainError(f"{self.cfg.source}: stages[{i}].batch_size {st.batch_size} exceeds the {self.n_train} training images")
        total = spe * st.epochs
        if st.max_steps is not None:
            total = min(total, st.max_steps)
        return spe, total

    def _save(self, path: Path, model: Supernet, train_state: dict | None, meta: dict) -> None:
        save_checkpoint(path, model, data=self.info, train_state=train_state, meta=meta)

    def _prune(self) -> None:
        found = _step_checkpoints(self.ckpt_dir)
        for _, p in found[: max(0, len(found) - self.cfg.checkpoint.keep)]:
            p.unlink(missing_ok=True)

    def _probe_inputs(self):
        if self._probe_data is None:
            m = self.cfg.metrics
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "recal"))
            count = min(self.n_train, m.recal_batches * m.batch_size)
            idx = torch.randperm(self.n_train, generator=gen)[:count].to(self.device)
            recal = normalize(self.train_x[idx], self.info)
            batches = list(recal.split(m.batch_size))
            ex = normalize(self.dataset.test_images[: m.eval_images], self.info, device=self.device)
            ey = self.dataset.test_labels[: m.eval_images].to(self.device)
            archs = probe_archs(self.space, m.probes, derive_seed(self.cfg.seed, "probes"))
            self._probe_data = (archs, batches, ex, ey)
        return self._probe_data

    def _probe_record(self, model: Supernet) -> dict:
        if self.cfg.metrics.probes == 0 or not self.is_main:
            return {}
        archs, batches, ex, ey = self._probe_inputs()
        accs = probe_accuracy(model, archs, batches, ex, ey, self.cfg.metrics.batch_size)
        names = ["largest", "smallest"] + [str(a) for a in archs[2:]]
        return {"probe_acc": dict(zip(names, accs))}

    # ------------------------------------------------------------------ main loop
    def run(self) -> TrainResult:
        cfg, g = self.cfg, self.group
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for tmp in self.ckpt_dir.glob(".step-*.tmp"):  # a write cut short by a kill
                tmp.unlink(missing_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        ts = self.resume_ck.train_state if self.resume_ck is not None else None
        if ts is not None and self.is_main:
            self.metrics.truncate_after(int(ts["global_step"]))
        g.barrier()
        model: Supernet | None = None
        base = 0
        for si, st in enumerate(cfg.stages):
            spe, total = self._stage_total(st)
            name = st.name or f"stage{si}"
            stage_file = self.run_dir / f"stage{si}-{name}.pt"
            if ts is not None and si < int(ts["stage"]):
                self.stage_files.append(stage_file)
                base += total
                continue
            if ts is not None and si == int(ts["stage"]):
                model = self.resume_ck.build_supernet(self.device)
                if ts["stage_complete"]:
                    if self.is_main and not stage_file.exists():  # killed between the two writes
                        self._save(stage_file, model, None, {"stage": name, "stage_index": si, "global_step": base + total})
                    self.stage_files.append(stage_file)
                    base += total
                    ts = None
                    continue
                start, state = int(ts["stage_step"]), ts
                ts = None
            else:
                model = _build_stage_model(cfg, si, model, self.space, self.info).to(self.device)
                start, state = 0, None
            model = self._run_stage(si, st, model, spe, total, base, start, state)
            if self.is_main:
                self._save(stage_file, model, None, {"stage": name, "stage_index": si, "global_step": base + total})
            self.stage_files.append(stage_file)
            base += total
        assert model is not None
        final = self.run_dir / "final.pt"
        if self.is_main:
            self._save(final, model, None, {"stages": [s.name or f"stage{i}" for i, s in enumerate(cfg.stages)],
                                            "global_step": base, "config": cfg.to_dict()})
        self.metrics.close()
        g.barrier()
        return TrainResult(self.run_dir, final, tuple(self.stage_files), self.metrics.path, base, self.resume_path)

    def _run_stage(
        self, si: int, st: StageConfig, model: Supernet, spe: int, total: int, base: int, start: int, state: dict | None
    ) -> Supernet:
        cfg, g, dev = self.cfg, self.group, self.device
        name = st.name or f"stage{si}"
        shards_total = g.world_size * st.accumulate
        if st.batch_size % shards_total:
            raise TrainError(
                f"{cfg.source}: stages[{si}].batch_size {st.batch_size} is not divisible by "
                f"{g.world_size} process(es) x accumulate {st.accumulate}"
            )
        cuda = dev.type == "cuda"
        channels_last = cuda if st.speed.channels_last == "auto" else bool(st.speed.channels_last)
        bf16 = cuda if st.speed.bf16 == "auto" else bool(st.speed.bf16)
        batched = hasattr(model, "forward_paths") if st.speed.batched_paths == "auto" else bool(st.speed.batched_paths)
        if batched and not hasattr(model, "forward_paths"):
            raise TrainError(f"{cfg.source}: stages[{si}].speed.batched_paths is true but this supernet has no forward_paths")
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        model.set_sync_bn(st.sync_bn and g.world_size > 1)  # the frozen teacher below inherits it
        o = st.optimizer
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
        teacher = None
        if st.loss.kind == "distill" and st.loss.teacher == "frozen":
            teacher = copy.deepcopy(model).requires_grad_(False)
            teacher.train()
        stats = _EpochStats()
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            if teacher is not None:
                teacher.load_state_dict(state["teacher"])
            stats = _EpochStats(state["epoch_stats"])
            restore_rng_state(state["rng"])
        trainer = Trainer(
            model, opt, st, teacher=teacher, largest=self.space.largest(), batched=batched,
            autocast_dtype=torch.bfloat16 if bf16 else None, world_size=g.world_size,
        )
        sampler = PathSampler(self.space, st.sampling.rule, st.sampling.paths, cfg.seed)
        hflip = self.info.hflip if st.augment.hflip == "auto" else bool(st.augment.hflip)
        local = st.batch_size // g.world_size
        every = cfg.checkpoint.every_steps
        show = self.is_main and cfg.progress is not False
        from tqdm.auto import tqdm

        # tqdm's disable=None shows the bar only when stderr is a terminal ("auto")
        disable = True if not show else (None if cfg.progress == "auto" else False)
        bar = tqdm(total=total, initial=start, desc=name, unit="step", disable=disable)
        orders: dict[int, torch.Tensor] = {}
        epoch_t0 = time.perf_counter()
        epoch_images0 = stats.v["images"]
        try:
            for step in range(start, total):
                epoch, j = divmod(step, spe)
                if epoch not in orders:
                    orders.clear()
                    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "order", si, epoch))
                    orders[epoch] = torch.randperm(self.n_train, generator=gen).to(dev)
                idx = orders[epoch][j * st.batch_size : (j + 1) * st.batch_size]
                aug = torch.Generator(device=dev).manual_seed(derive_seed(cfg.seed, "augment", si, step))
                xb = augment_batch(self.train_x[idx], generator=aug, pad=st.augment.pad, hflip=hflip)
                xb = normalize(xb[g.rank * local : (g.rank + 1) * local], self.info)
                yb = self.train_y[idx][g.rank * local : (g.rank + 1) * local]
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                shards = list(zip(xb.chunk(st.accumulate), yb.chunk(st.accumulate)))
                lr = lr_at(step, total, o.lr, st.schedule.warmup_steps, st.schedule.min_lr)
                for pg in opt.param_groups:
                    pg["lr"] = lr
                sampled = sampler.sample(si, step)
                probes = sampler.probes(si, step, st.max_recover.probes) if st.max_recover.probes else []
                try:
                    s = trainer.step(shards, sampled, probes)
                except TrainingDiverged as e:
                    last = self.last_checkpoint or "none (no checkpoint was written yet)"
                    raise TrainingDiverged(
                        f"stage {name!r} (stages[{si}]) epoch {epoch} step {step}: {e}; training stopped "
                        f"before applying this update. The last good checkpoint is {last}"
                    ) from None
                stats.add(s, st.batch_size)
                done = step + 1
                elapsed = max(1e-9, time.perf_counter() - epoch_t0)
                ips = (stats.v["images"] - epoch_images0) / elapsed
                bar.update(1)
                if show:
                    bar.set_postfix(loss=f"{s.loss:.3f}", img_s=f"{ips:.0f}", refresh=False)
                end_epoch = done % spe == 0 or done == total
                if end_epoch:
                    record = {
                        "stage": name, "stage_index": si, "epoch": (done - 1) // spe + 1,
                        "global_step": base + done, "stage_step": done, "lr": lr,
                        **stats.summary(), "images_per_s": ips, "seconds": elapsed,
                    }
                    record.update(self._probe_record(model))
                    self.metrics.append(record)
                    stats = _EpochStats()
                    epoch_t0, epoch_images0 = time.perf_counter(), 0.0
                if end_epoch or (every and done % every == 0):
                    self._checkpoint(si, name, model, opt, teacher, stats, spe, total, base, done, lr, st)
        finally:
            bar.close()
        if channels_last:
            model = model.to(memory_format=torch.contiguous_format)
        return model

    def _checkpoint(
        self, si: int, name: str, model: Supernet, opt: torch.optim.Optimizer, teacher: Supernet | None,
        stats: _EpochStats, spe: int, total: int, base: int, done: int, lr: float, st: StageConfig,
    ) -> None:
        if not self.is_main:
            return
        ts = {
            "kind": TRAIN_STATE_KIND,
            "config": self.cfg.to_dict(),
            "stage": si,
            "stage_name": name,
            "stage_step": done,
            "stage_total": total,
            "stage_complete": done == total,
            "global_step": base + done,
            "world_size": self.group.world_size,
            "optimizer": opt.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "step": done, "total": total,
                          "warmup_steps": st.schedule.warmup_steps, "last_lr": lr},
            "sampler": {"rule": st.sampling.rule, "paths": st.sampling.paths, "seed": self.cfg.seed, "next_step": done},
            "data_order": {"seed": self.cfg.seed, "epoch": done // spe, "next_batch": done % spe},
            "rng": capture_rng_state(),
            "teacher": None if teacher is None else {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
            "epoch_stats": dict(stats.v),
        }
        path = self.ckpt_dir / f"step-{base + done:09d}.pt"
        self._save(path, model, ts, {"stage": name, "stage_index": si, "global_step": base + done})
        self.last_checkpoint = path
        self._prune()

