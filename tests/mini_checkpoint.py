"""A briefly trained mini supernet checkpoint for tests that need non-random weights.

Trained for a few dozen SGD steps on the bundled Fashion-MNIST subset (random paths, plain
cross-entropy) so BN statistics and predictions are those of a real, if weak, network. Built
once per test session by the ``trained_checkpoint`` fixture in ``conftest.py``.
"""
from __future__ import annotations

from pathlib import Path

import random

import torch
import torch.nn.functional as F

from fastsupernet import Supernet, SupernetConfig, load_data, save_checkpoint
from fastsupernet.data import normalize


def make_trained_checkpoint(
    path: Path,
    *,
    steps: int = 40,
    batch: int = 64,
    seed: int = 0,
    config: SupernetConfig | None = None,
) -> Path:
    """Train a Track-1 supernet on the bundled data for ``steps`` steps and save it at ``path``."""
    torch.manual_seed(seed)
    data = load_data("fashion-mnist")
    info = data.info
    model = Supernet(config=config, in_channels=info.in_channels, num_classes=info.num_classes)
    space = model.space
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    n = data.train_images.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = normalize(data.train_images[idx], info)
        y = data.train_labels[idx]
        arch = space.largest() if step % 2 == 0 else space.sample(rng)
        loss = F.cross_entropy(model(x, arch), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return save_checkpoint(path, model, data=info, meta={"purpose": "tests", "steps": steps})
