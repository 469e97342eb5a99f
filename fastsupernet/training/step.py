"""One training step: the paths' logits, their losses, the update, max-recover.

A step's batch arrives as *shards* (this rank's part of the global batch, split further when
``accumulate`` > 1); each shard is forwarded alone, so its BN layers see only its images, and
every loss is divided by the total shard count across ranks before ``backward`` so that the
summed gradients are the mean over shards. Across ranks the gradients are summed with one
all-reduce per update; every decision that depends on data (a non-finite loss, which probe
paths to recover) is taken on values all-reduced first, so all ranks take it alike.

The model is not wrapped in ``DistributedDataParallel``: a step runs several backward passes
(the paths, then max-recover) and leaves parameters unused (other branch groups, identity
shortcuts), which the explicit all-reduce handles without DDP's per-forward bookkeeping.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..space import Arch
from .config import StageConfig

__all__ = [
    "path_logits",
    "distillation_loss",
    "StepPlan",
    "plan_step",
    "StepStats",
    "TrainingDiverged",
    "Trainer",
]


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the step's update was not applied."""


def path_logits(model: nn.Module, x: torch.Tensor, archs: Sequence[Arch], batched: bool) -> torch.Tensor:
    """Logits ``(K, N, classes)`` of every path in ``archs`` on the same images.

    ``batched``: one pass through ``model.forward_paths`` (multi-candidate kernels; it leaves BN
    running statistics alone); otherwise one ``model(x, arch)`` per path, stacked.
    """
    if batched:
        return model.forward_paths(x, list(archs))
    return torch.stack([model(x, a) for a in archs])


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """``alpha * CE(student, target) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))``."""
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean", log_target=True
    )
    loss = (1.0 - alpha) * (t * t) * soft
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(student, target)
    return loss


@dataclass(frozen=True)
class StepPlan:
    """The paths a step runs: ``archs[i]`` for ``i`` in ``ce`` get CE, those in ``students`` are distilled."""

    archs: tuple[Arch, ...]
    ce: tuple[int, ...]
    students: tuple[int, ...]
    largest_index: int | None  # where the largest path sits in ``archs`` (its accuracy is reported)


def plan_step(stage: StageConfig, sampled: Sequence[Arch], largest: Arch) -> StepPlan:
    """Turn the sampled paths into what the step trains, following the stage's loss settings."""
    loss = stage.loss
    archs = list(sampled)
    if loss.kind == "ce":
        idx = next((i for i, a in enumerate(archs) if a.widths == largest.widths), None)
        return StepPlan(tuple(archs), tuple(range(len(archs))), (), idx)
    with_largest = loss.teacher == "live" or loss.train_largest
    if with_largest:
        if archs[0].widths != largest.widths:
            archs = [largest] + archs
        return StepPlan(tuple(archs), (0,), tuple(range(1, len(archs))), 0)
    idx = next((i for i, a in enumerate(archs) if a.widths == largest.widths), None)
    return StepPlan(tuple(archs), (), tuple(range(len(archs))), idx)


@dataclass
class StepStats:
    """What a step reports (already averaged over shards and ranks)."""

    loss: float = 0.0
    largest_ce: float = math.nan
    student_loss: float = math.nan
    largest_correct: float = 0.0  # correct predictions of the largest path over the global batch
    largest_seen: int = 0
    recovered: int = 0


class Trainer:
    """Runs steps of one stage: the model, its optimizer, an optional frozen teacher, the group."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stage: StageConfig,
        *,
        teacher: nn.Module | None,
        largest: Arch,
        batched: bool,
        autocast_dtype: torch.dtype | None,
        world_size: int,
    ) -> None:
        self.model, self.optimizer, self.stage = model, optimizer, stage
        self.teacher, self.largest, self.batched = teacher, largest, batched
        self.autocast_dtype = autocast_dtype
        self.world_size = world_size
        self.params = [p for p in model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ helpers
    def _autocast(self, x: torch.Tensor):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=self.autocast_dtype)

    def _logits(self, model: nn.Module, x: torch.Tensor, archs: Sequence[Arch]) -> torch.Tensor:
        with self._autocast(x):
            out = path_logits(model, x, archs, self.batched)
        return out.float()

    def _all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values)
        return values

    def _reduce_grads(self) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all gradients
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _teacher_logits(self, x: torch.Tensor, logits: torch.Tensor, plan: StepPlan) -> torch.Tensor | None:
        if not plan.students:
            return None
        if self.stage.loss.teacher == "live":
            return logits[0].detach()
        with torch.no_grad():
            return self._logits(self.teacher, x, [self.largest])[0]

    def _student_loss(self, student: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        ls = self.stage.loss
        if teacher is None:
            return F.cross_entropy(student, y)
        return distillation_loss(student, teacher, y, ls.alpha, ls.temperature)

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        flag = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=value.device)
        if self._all_sum(flag).item() > 0:
            raise TrainingDiverged(f"non-finite {what} ({value.flatten()[:4].tolist()})")

    @torch.no_grad()
    def _probe_losses(self, shards, archs: Sequence[Arch], teachers) -> torch.Tensor:
        """Mean loss of each probe path over all shards and ranks (no update, no BN statistics kept)."""
        total = len(shards) * self.world_size
        acc = None
        was = [m.momentum for m in self.model.conv_layers()]
        try:
            for m in self.model.conv_layers():
                m.momentum = 0.0  # leave running statistics as they are
            for (x, y), t in zip(shards, teachers):
                logits = self._logits(self.model, x, archs)
                vals = torch.stack([self._student_loss(logits[i], t, y) for i in range(len(archs))]) / total
                acc = vals if acc is None else acc + vals
        finally:
            for m, mom in zip(self.model.conv_layers(), was):
                m.momentum = mom
        return self._all_sum(acc)

    # ------------------------------------------------------------------ the step
    def step(self, shards: Sequence[tuple[torch.Tensor, torch.Tensor]], sampled: Sequence[Arch], probes: Sequence[Arch]) -> StepStats:
        """One update on this rank's shards; ``probes``: max-recover candidates (may be empty)."""
        plan = plan_step(self.stage, sampled, self.largest)
        total = len(shards) * self.world_size
        stats = StepStats()
        teachers: list[torch.Tensor | None] = []
        before = None
        self.optimizer.zero_grad(set_to_none=True)
        # sums over shards: [total loss, largest CE, student loss, largest correct]
        sums = torch.zeros(4, dtype=torch.float64, device=shards[0][0].device)
        for x, y in shards:
            logits = self._logits(self.model, x, plan.archs)
            teacher = self._teacher_logits(x, logits, plan)
            teachers.append(teacher)
            parts = [F.cross_entropy(logits[i], y) for i in plan.ce]
            studs = [self._student_loss(logits[i], teacher, y) for i in plan.students]
            loss = torch.stack(parts + studs).sum()
            (loss / total).backward()
            with torch.no_grad():
                sums[0] += loss.detach().double()
                if plan.ce and plan.ce[0] == plan.largest_index:
                    sums[1] += parts[0].detach().double()
                if studs:
                    sums[2] += torch.stack(studs).detach().double().mean()
                if plan.largest_index is not None:
                    sums[3] += (logits[plan.largest_index].argmax(-1) == y).sum().double()
        if probes:
            before = self._probe_losses(shards, probes, teachers)
            self._check_finite(before, "max-recover probe loss")
        sums = self._all_sum(sums)
        self._check_finite(sums[:3], "training loss")
        self._reduce_grads()
        self.optimizer.step()
        stats.loss = float(sums[0]) / total
        stats.largest_ce = float(sums[1]) / total if plan.ce and plan.ce[0] == plan.largest_index else math.nan
        stats.student_loss = float(sums[2]) / total if plan.students else math.nan
        if plan.largest_index is not None:
            stats.largest_correct = float(sums[3])
            stats.largest_seen = sum(int(y.shape[0]) for _, y in shards) * self.world_size
        if probes:
            after = self._probe_losses(shards, probes, teachers)
            self._check_finite(after, "max-recover probe loss")
            risen = [a for a, b0, b1 in zip(probes, before.tolist(), after.tolist()) if b1 > b0]
            for arch in risen:
                self._recover(shards, arch, teachers, total)
            stats.recovered = len(risen)
        return stats

    def _recover(self, shards, arch: Arch, teachers, total: int) -> None:
        """One more backward pass and optimizer step for a path whose loss rose with the update."""
        self.optimizer.zero_grad(set_to_none=True)
        value = torch.zeros(1, dtype=torch.float64, device=shards[0][0].device)
        for (x, y), t in zip(shards, teachers):
            loss = self._student_loss(self._logits(self.model, x, [arch])[0], t, y)
            (loss / total).backward()
            value += loss.detach().double()
        self._check_finite(self._all_sum(value), "max-recover loss")
        self._reduce_grads()
        self.optimizer.step()
