"""Watching a run: test accuracy of a few fixed candidates after BN recalibration.

Supernet training leaves BN running statistics that belong to no candidate in particular
(every path updates the shared rows), so a candidate is scored the way ranking scores it:
reset its BN statistics, re-estimate them in train mode (cumulative average) on a few
un-augmented training batches, then evaluate. The model's own buffers, BN momentum and
train/eval mode are restored afterwards, so scoring never changes what training does next.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from ..space import Arch, ChannelSpace
from ..supernet import Supernet

__all__ = ["probe_archs", "probe_accuracy"]


def probe_archs(space: ChannelSpace, count: int, seed: int) -> list[Arch]:
    """The fixed probe candidates: the largest, the smallest, then seeded uniform ones."""
    fixed = [space.largest(), space.smallest()][:count]
    rng = random.Random(seed)
    return fixed + [space.sample(rng) for _ in range(count - len(fixed))]


@torch.no_grad()
def probe_accuracy(
    model: Supernet,
    archs: Sequence[Arch],
    recal_batches: Sequence[torch.Tensor],
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    batch_size: int,
) -> list[float]:
    """Top-1 accuracy of each candidate on ``eval_images`` after BN recalibration on ``recal_batches``.

    Inputs are normalised float tensors already on the model's device. Recalibration is per
    process (SyncBN, if on, is off meanwhile: one process runs the probes).
    """
    layers = model.conv_layers()
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    momenta = [m.momentum for m in layers]
    synced = [m.sync_bn for m in layers]
    was_training = model.training
    out = []
    try:
        for m in layers:
            m.momentum = None  # cumulative average over the recalibration batches
            m.sync_bn = False
        for arch in archs:
            model.reset_running_stats()
            model.train()
            for xb in recal_batches:
                model(xb, arch)
            model.eval()
            correct = 0
            for i in range(0, eval_images.shape[0], batch_size):
                pred = model(eval_images[i : i + batch_size], arch).argmax(-1)
                correct += int((pred == eval_labels[i : i + batch_size]).sum())
            out.append(correct / max(1, eval_images.shape[0]))
    finally:
        for m, mom, sync in zip(layers, momenta, synced):
            m.momentum, m.sync_bn = mom, sync
        bufs = dict(model.named_buffers())
        for name, value in saved.items():
            bufs[name].copy_(value)
        model.train(was_training)
    return out
